//! `tollgate check`: every problem named with file:line and the option; exit 1 on any.

use std::process::Command;

fn check(src: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    std::fs::write(&path, src).unwrap();
    let (code, text) = crate::common::run_check(&path);
    (code, text.replace(&path.display().to_string(), "t.toml"))
}

const VALID: &str = r#"[[listener]]
address = "127.0.0.1:18080"

[[vhost]]
names = ["example.com"]
[[vhost.route]]
path = "/"
pool = "web"

[pool.web]
backends = ["127.0.0.1:9000"]
"#;

#[test]
fn a_valid_config_passes() {
    let (code, out) = check(VALID);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("configuration is valid"));
}

#[test]
fn each_kind_of_problem_is_named_with_file_line_and_option() {
    let cases: &[(&str, &str, &str)] = &[
        // (config, expected "file:line: option", expected message fragment)
        (&VALID.replace("[[vhost]]\n", "[[vhost]\n"), "t.toml:4: ", "invalid table header"),
        (&VALID.replace("[pool.web]\n", "[pool.web]\nretry = 3\n"), "t.toml:11: pool.web.retry", "unknown field `retry`"),
        (&VALID.replace("pool = \"web\"", "pool = \"api\""), "t.toml:8: vhost[0].route[0].pool", "no pool named `api` (defined pools: web)"),
        (&VALID.replace("127.0.0.1:18080", "localhost"), "t.toml:2: listener[0].address", "`localhost` is not an IP:port"),
        (&VALID.replace("127.0.0.1:9000", "127.0.0.1:9000\", \"nope"), "t.toml:11: pool.web.backends[1]", "is not an IP:port"),
        (&VALID.replace("[pool.web]\n", "[pool.web]\nconnect_timeout = \"5\"\n"), "t.toml:11: pool.web.connect_timeout", "has no unit"),
        (&VALID.replace("path = \"/\"", "path = \"api\""), "t.toml:7: vhost[0].route[0].path", "must start with /"),
        (&format!("{VALID}\n[[vhost]]\nnames = [\"EXAMPLE.com\"]\n[[vhost.route]]\npath = \"/\"\npool = \"web\"\n"), "t.toml:14: vhost[1].names", "already a name of the vhost on line 5"),
        (&VALID.replace("address = \"127.0.0.1:18080\"", "address = \"127.0.0.1:18443\"\ntls = true"), "listener.tls", "needs certificates"),
        (&VALID.replace("names = [\"example.com\"]", "names = [\"example.com\"]\ncert = \"missing.crt\"\nkey = \"missing.key\"").replace("address = \"127.0.0.1:18080\"", "address = \"127.0.0.1:18443\"\ntls = true"), "t.toml:7: vhost.cert", "cannot read certificate"),
        (&VALID.replace("[pool.web]\n", "[pool.web]\nbalance = \"random\"\n"), "t.toml:11: pool.web.balance", "not one of: round_robin, p2c"),
        (&VALID.replace("names = [\"example.com\"]", "names = [\"a.*.com\"]"), "t.toml:5: vhost[0].names", "wildcard is only allowed"),
        (&VALID.replace("127.0.0.1:18080", "0.0.0.0:18080").replace("[pool.web]\n", "[admin]\naddress = \"127.0.0.1:18080\"\n[pool.web]\n"), "t.toml:11: admin.address", "shares its port with the traffic listener 0.0.0.0:18080"),
        (&VALID.replace("address = \"127.0.0.1:18080\"", "address = [\"0.0.0.0:18080\", \"127.0.0.1:18080\"]"), "t.toml:2: listener[0].address", "127.0.0.1:18080 is already used by the listener on line 2 (as 0.0.0.0:18080"),
        (&VALID.replace("path = \"/\"", "path = \"/a/../b\""), "t.toml:7: vhost[0].route[0].path", "can never match: requests are routed on their normalised path (no //, . or .. segments, %XX only for reserved characters, no ;); write `/b`"),
        (&VALID.replace("path = \"/\"", "path = \"/%61dmin\""), "t.toml:7: vhost[0].route[0].path", "write `/admin`"),
        (&VALID.replace("[pool.web]\n", "[limits]\nencoded_slashes = \"decode\"\n[pool.web]\n"), "t.toml:11: limits.encoded_slashes", "not one of: reject, keep"),
        (&VALID.replace("[pool.web]\n", "[limits]\nsend_timeout = \"60\"\n[pool.web]\n"), "t.toml:11: limits.send_timeout", "has no unit"),
    ];
    for (src, at, msg) in cases {
        let (code, out) = check(src);
        assert_eq!(code, 1, "expected failure for {at}:\n{out}");
        assert!(out.contains(at), "expected `{at}` in:\n{out}");
        assert!(out.contains(msg), "expected `{msg}` in:\n{out}");
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let src = VALID
        .replace("pool = \"web\"", "pool = \"api\"")
        .replace("127.0.0.1:18080", "nowhere")
        .replace("127.0.0.1:9000", "127.0.0.1:0:1");
    let (code, out) = check(&src);
    assert_eq!(code, 1);
    assert!(out.contains("3 problems"), "{out}");
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", "--config", "/nonexistent/tollgate.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read the configuration file"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("/nonexistent/tollgate.toml: --config: "),
        "{err}"
    );
}

#[test]
fn schema_problems_do_not_hide_the_others() {
    // an unknown option, two wrong types, a bad address and a missing pool: all at once,
    // in line order, with hints for the type mistakes
    let src = VALID
        .replace("127.0.0.1:18080", "nowhere")
        .replace("pool = \"web\"", "pool = \"api\"\nretry = 3")
        .replace(
            "[pool.web]\n",
            "[pool.web]\nread_timeout = 30\nretries = \"2\"\n",
        );
    let (code, out) = check(&src);
    assert_eq!(code, 1);
    assert!(out.contains("5 problems"), "{out}");
    for want in [
        "t.toml:2: listener[0].address: `nowhere` is not an IP:port",
        "t.toml:8: vhost[0].route[0].pool: no pool named `api`",
        "t.toml:9: vhost.route.retry: unknown field `retry`",
        "t.toml:12: pool.web.read_timeout: invalid type: integer `30`, expected a string (durations are strings with a unit: write \"30s\"",
        "t.toml:13: pool.web.retries: invalid type: string \"2\", expected i64 (write the number without quotes)",
    ] {
        assert!(out.contains(want), "expected `{want}` in:\n{out}");
    }
    let lines: Vec<usize> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("t.toml:"))
        .filter_map(|l| l.split(':').next()?.parse().ok())
        .collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]), "line order: {out}");
}

#[test]
fn errors_name_the_file_and_line_they_come_from() {
    // certs_dir that does not exist: the line of tls.certs_dir
    let src = VALID.replace("127.0.0.1:18080\"", "127.0.0.1:18443\"\ntls = true")
        + "\n[tls]\ncerts_dir = \"/nonexistent-certs\"\n";
    let (code, out) = check(&src);
    assert_eq!(code, 1);
    assert!(
        out.contains("t.toml:15: tls.certs_dir: cannot read the directory /nonexistent-certs"),
        "{out}"
    );
    // a byte that is not UTF-8: its line
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    let mut bytes = VALID.as_bytes().to_vec();
    let at = VALID.find("example.com").unwrap();
    bytes[at] = 0xff;
    std::fs::write(&path, bytes).unwrap();
    let (code, out) = crate::common::run_check(&path);
    assert_eq!(code, 1);
    let out = out.replace(&path.display().to_string(), "t.toml");
    assert!(
        out.contains("t.toml:5: --config: byte 0xff is not UTF-8"),
        "{out}"
    );
}

#[test]
fn a_plugin_that_refuses_its_configuration_says_why() {
    let wasm = concat!(env!("CARGO_MANIFEST_DIR"), "/plugins/dist/auth.wasm");
    assert!(
        std::path::Path::new(wasm).exists(),
        "{wasm} is missing: run plugins/build (scripts/test does)"
    );
    let src = format!(
        "{VALID}\n[plugin.jwt]\nfile = \"{wasm}\"\nconfig = {{ jwt = {{ es256_keys = [\"not a key\"] }} }}\n"
    )
    .replace(
        "pool = \"web\"",
        "pool = \"web\"\nplugins = [\"jwt\"]",
    );
    let (code, out) = check(&src);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("the plugin rejected its configuration"),
        "{out}"
    );
    assert!(
        out.contains("es256_keys[0]"),
        "the plugin's own reason is shown: {out}"
    );
    assert!(
        !out.contains("plugins/build"),
        "no build hint when built: {out}"
    );
}

/// Backend TLS: `verify = false` passes with a loud warning; a CA file that is missing or not
/// a certificate fails the check with the file named, at the pool's `tls` line.
#[test]
fn backend_tls_files_are_checked_and_verify_false_warns() {
    let (code, out) = check(&VALID.replace(
        "backends = [\"127.0.0.1:9000\"]\n",
        "backends = [\"127.0.0.1:9000\"]\nprotocol = \"https\"\ntls = { verify = false }\n",
    ));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("WARNING: pool.web.tls.verify = false: any certificate is accepted"),
        "{out}"
    );
    let (code, out) = check(VALID);
    assert!(code == 0 && !out.contains("WARNING"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    for (ca, words) in [
        (dir.path().join("missing.pem"), "cannot read the CA bundle"),
        (junk, "holds no certificate"),
    ] {
        let (code, out) = check(&VALID.replace(
            "backends = [\"127.0.0.1:9000\"]\n",
            &format!(
                "backends = [\"127.0.0.1:9000\"]\nprotocol = \"h2\"\ntls = {{ ca = \"{}\" }}\n",
                ca.display()
            ),
        ));
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("t.toml:13: pool.web.tls"), "{out}");
        assert!(out.contains(words), "{words}: {out}");
    }
}

/// A private key anyone on the host can read is accepted, with a warning from `check` and
/// in `run`'s log; the same key at 0600 draws none.
#[tokio::test]
async fn a_world_readable_private_key_is_warned_about_in_check_and_run() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::common::TestCa::new();
    let (cert, key) = ca.issue(dir.path(), "a", &["example.com"], "a");
    let https = std::net::SocketAddr::from(([127, 0, 0, 1], crate::common::free_port()));
    let path = dir.path().join("t.toml");
    let src = VALID
        .replace("127.0.0.1:18080\"", &format!("{https}\"\ntls = true"))
        .replace(
            "names = [\"example.com\"]",
            &format!(
                "names = [\"example.com\"]\ncert = \"{}\"\nkey = \"{}\"",
                cert.display(),
                key.display()
            ),
        );
    std::fs::write(&path, &src).unwrap();
    let warning = "has mode 0644: other users of this host";
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, out) = crate::common::run_check(&path);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains(warning), "{out}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out) = crate::common::run_check(&path);
    assert_eq!(code, 0, "still valid: {out}");
    assert!(
        out.contains("WARNING: vhost.key: the private key") && out.contains(warning),
        "{out}"
    );
    let mut tg = crate::common::Tollgate::start(&path);
    tg.ready(https).await;
    crate::common::wait_for(
        "the warning in the log",
        std::time::Duration::from_secs(5),
        || async { tg.log_text().contains(warning) },
    )
    .await;
}
