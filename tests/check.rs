//! `tollgate check`: every problem named with file:line and the option; exit 1 on any.

mod common;

use std::process::Command;

fn check(src: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    std::fs::write(&path, src).unwrap();
    let (code, text) = common::run_check(&path);
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
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the configuration file"));
}
