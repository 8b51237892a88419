//! ACME against a real ACME server: Pebble (Debian's `pebble`), started on loopback, with a
//! real DNS server (dnsmasq) pointing the test names at 127.0.0.1, so Pebble's HTTP-01
//! validation reaches tollgate's own plain listener.

mod common;
use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Pebble (and the dnsmasq it resolves names with), killed when dropped.
struct Pebble {
    children: Vec<Child>,
    directory: String,
    management: u16,
    /// The CA that signed Pebble's own HTTPS certificate (what `acme.ca_bundle` trusts).
    https_ca: TestCa,
}

impl Pebble {
    fn start(dir: &Path, http_port: u16) -> Pebble {
        let dns = free_port();
        let dnsmasq = Command::new("dnsmasq")
            .args([
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
            ])
            .args(["--listen-address=127.0.0.1", &format!("--port={dns}")])
            .args(["--address=/test/127.0.0.1", "--user=root", "--pid-file"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (scripts/install-deps test installs it)");
        let https_ca = TestCa::new();
        let (cert, key) = https_ca.issue(dir, "pebble", &["localhost", "127.0.0.1"], "pebble");
        let (port, management) = (free_port(), free_port());
        let cfg = dir.join("pebble.json");
        std::fs::write(
            &cfg,
            serde_json::json!({ "pebble": {
                "listenAddress": format!("127.0.0.1:{port}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": cert, "privateKey": key,
                "httpPort": http_port, "tlsPort": free_port(),
                "ocspResponderURL": "", "externalAccountBindingRequired": false,
            }})
            .to_string(),
        )
        .unwrap();
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&cfg)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            // no random sleeps before validation; every nonce accepted: a fast, exact test
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble (scripts/install-deps test installs it)");
        Pebble {
            children: vec![dnsmasq, pebble],
            directory: format!("https://127.0.0.1:{port}/dir"),
            management,
            https_ca,
        }
    }

    /// The root Pebble issues under (it makes a new one each start).
    async fn issuing_root(&self) -> reqwest::Certificate {
        let c = reqwest::Client::builder()
            .add_root_certificate(self.https_ca.reqwest_cert())
            .no_proxy()
            .build()
            .unwrap();
        let pem = c
            .get(format!("https://127.0.0.1:{}/roots/0", self.management))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        reqwest::Certificate::from_pem(pem.as_bytes()).unwrap()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A vhost with `acme = true` gets its certificate from the CA over HTTP-01 (answered by
/// tollgate's own plain listener) with no restart, serves it; an order the CA refuses is
/// logged and leaves that certificate serving; a restart reuses the saved account and
/// certificate instead of ordering again.
#[tokio::test]
async fn an_acme_vhost_gets_its_certificate_and_keeps_it_across_restarts() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let (http, https) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let pebble = Pebble::start(dir.path(), http.port());
    std::fs::write(dir.path().join("pebble-https-ca.pem"), &pebble.https_ca.pem).unwrap();
    wait_for("pebble to listen", Duration::from_secs(15), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", pebble.management))
            .await
            .is_ok()
    })
    .await;
    let cfg = dir.path().join("tollgate.toml");
    write(
        &cfg,
        &format!(
            "[admin]\naddress = \"127.0.0.1:{}\"\n\
             [acme]\ndirectory = \"{}\"\nemail = \"ops@example.org\"\nstorage = \"{}/acme\"\nca_bundle = \"{}/pebble-https-ca.pem\"\n\
             [[listener]]\naddress = \"{http}\"\n[[listener]]\naddress = \"{https}\"\ntls = true\n\
             [[vhost]]\nnames = [\"a.test\", \"www.a.test\"]\nacme = true\n\
             [[vhost.route]]\npath = \"/\"\npool = \"up\"\n[pool.up]\nbackends = [\"{}\"]\n",
            free_port(),
            pebble.directory,
            dir.path().display(),
            dir.path().display(),
            up.addr
        ),
    );
    let mut tg = Tollgate::start(&cfg);
    tg.ready(http).await;
    let root = pebble.issuing_root().await;
    let client = |root: reqwest::Certificate| {
        reqwest::Client::builder()
            .add_root_certificate(root)
            .resolve("a.test", https)
            .resolve("www.a.test", https)
            .no_proxy()
            .build()
            .unwrap()
    };
    let c = client(root);
    wait_for(
        "the ACME certificate to serve",
        Duration::from_secs(60),
        || async {
            c.get(format!("https://a.test:{}/", https.port()))
                .send()
                .await
                .is_ok()
        },
    )
    .await;
    for host in ["a.test", "www.a.test"] {
        let r = c
            .get(format!("https://{host}:{}/x", https.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let j: serde_json::Value = r.json().await.unwrap();
        assert_eq!(j["upstream"], "up");
    }
    let log = tg.log_text();
    assert!(log.contains("ACME account created and saved"), "{log}");
    assert!(log.contains("ACME certificate issued"), "{log}");
    assert!(dir.path().join("acme/account.json").exists());
    assert!(dir.path().join("acme/certs/a.test.crt").exists());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("acme/certs/a.test.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "the key is private to its owner");
    // the challenge answers are gone once the order is done
    let plain = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = plain
        .get(format!("http://{http}/.well-known/acme-challenge/anything"))
        .header("host", "a.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308, "no answer: the usual redirect to HTTPS");

    // the CA refuses the next order (a name it cannot validate: b.invalid does not
    // resolve): a clear log line, and the certificate there is keeps serving
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"www.a.test\"]", "\"www.a.test\", \"b.invalid\"]");
    write(&cfg, &text);
    wait_for(
        "the refused order to be logged",
        Duration::from_secs(60),
        || async { tg.log_text().contains("ACME order failed") },
    )
    .await;
    let log = tg.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("ACME order failed"))
        .unwrap();
    assert!(
        line.contains("b.invalid") && line.contains("retry_in=60s"),
        "{line}"
    );
    let r = c
        .get(format!("https://a.test:{}/", https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the issued certificate keeps serving");
    write(&cfg, &text.replace(", \"b.invalid\"]", "]"));

    // a restart: the saved account and certificate, no new order
    drop(tg);
    let mut tg = Tollgate::start(&cfg);
    tg.ready(https).await;
    let r = c
        .get(format!("https://a.test:{}/", https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_secs(3)).await; // the issuer's first look
    let log = tg.log_text();
    assert!(!log.contains("ordering an ACME certificate"), "{log}");
    assert!(!log.contains("ACME account created"), "{log}");
}

/// A CA that cannot be reached (or refuses): a clear log line, no retry storm, and tollgate
/// keeps serving everything else.
#[tokio::test]
async fn an_unreachable_ca_is_logged_and_retried_with_backoff() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let https = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cfg = dir.path().join("tollgate.toml");
    let ca = TestCa::new();
    ca.issue(dir.path(), "b", &["b.test"], "b");
    write(
        &cfg,
        &format!(
            "[admin]\naddress = \"127.0.0.1:{}\"\n\
             [acme]\ndirectory = \"https://127.0.0.1:{}/dir\"\nstorage = \"{d}/acme\"\n\
             [[listener]]\naddress = \"{http}\"\n[[listener]]\naddress = \"{https}\"\ntls = true\n\
             [[vhost]]\nnames = [\"a.test\"]\nacme = true\n[[vhost.route]]\npath = \"/\"\npool = \"up\"\n\
             [[vhost]]\nnames = [\"b.test\"]\ncert = \"{d}/b.crt\"\nkey = \"{d}/b.key\"\n[[vhost.route]]\npath = \"/\"\npool = \"up\"\n\
             [pool.up]\nbackends = [\"{}\"]\n",
            free_port(),
            free_port(),
            up.addr,
            d = dir.path().display(),
        ),
    );
    let mut tg = Tollgate::start(&cfg);
    tg.ready(https).await;
    wait_for(
        "the failure to be logged",
        Duration::from_secs(10),
        || async { tg.log_text().contains("ACME account unavailable") },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let log = tg.log_text();
    assert_eq!(
        log.matches("ACME account unavailable").count(),
        1,
        "backoff: one try, not a storm"
    );
    assert!(log.contains("retry_in=60s"), "{log}");
    // the other vhost serves on
    let c = client(&ca, https, &["b.test"]);
    let r = c
        .get(format!("https://b.test:{}/", https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
