//! Certificates for a fleet. ACME against a real ACME server: Pebble (Debian's `pebble`),
//! started on loopback, with a real DNS server (dnsmasq) pointing the test names at
//! 127.0.0.1, so Pebble's HTTP-01 and TLS-ALPN-01 validations reach tollgate's own
//! listeners; sharing through a real Consul agent; and certificates read from Consul KV.

use crate::common::*;
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
    /// Pebble validating HTTP-01 at `http_port` and TLS-ALPN-01 at `tls_port`, issuing
    /// certificates valid for `validity` seconds (Pebble's default, 5 years, when none).
    fn start(dir: &Path, http_port: u16, tls_port: u16, validity: Option<u64>) -> Pebble {
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
                "httpPort": http_port, "tlsPort": tls_port,
                "ocspResponderURL": "", "externalAccountBindingRequired": false,
                "certificateValidityPeriod": validity.unwrap_or(5 * 365 * 86_400),
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

    /// The root Pebble issues under (it makes a new one each start), as PEM.
    async fn issuing_root_pem(&self) -> String {
        let c = reqwest::Client::builder()
            .add_root_certificate(self.https_ca.reqwest_cert())
            .no_proxy()
            .build()
            .unwrap();
        c.get(format!("https://127.0.0.1:{}/roots/0", self.management))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn issuing_root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.issuing_root_pem().await.as_bytes()).unwrap()
    }

    /// Start Pebble (validating at `http_port`), write the CA of its own HTTPS where the
    /// configs' `ca_bundle` names it, and wait until it listens.
    async fn ready(dir: &Path, http_port: u16) -> Pebble {
        Pebble::ready_with(dir, http_port, free_port(), None).await
    }

    /// [`Pebble::ready`] with a TLS-ALPN-01 port and a certificate lifetime.
    async fn ready_with(
        dir: &Path,
        http_port: u16,
        tls_port: u16,
        validity: Option<u64>,
    ) -> Pebble {
        let pebble = Pebble::start(dir, http_port, tls_port, validity);
        std::fs::write(dir.join("pebble-https-ca.pem"), &pebble.https_ca.pem).unwrap();
        wait_for("pebble to listen", Duration::from_secs(15), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", pebble.management))
                .await
                .is_ok()
        })
        .await;
        pebble
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
/// tollgate's own plain listener) with no restart, serves it (so does a vhost that no
/// certificate covers, without asking); an order the CA refuses is
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
    let pebble = Pebble::ready(dir.path(), http.port()).await;
    let cfg = dir.path().join("tollgate.toml");
    let admin = free_port();
    let tg = Config::new()
        .admin_at(admin)
        .table(
            "acme",
            &format!(
                "directory = \"{}\"\nemail = \"ops@example.org\"\nstorage = \"{{dir}}/acme\"\n\
                 ca_bundle = \"{{dir}}/pebble-https-ca.pem\"",
                pebble.directory
            ),
        )
        .listener(http, false, "")
        .listener(https, true, "")
        .vhost(
            Vhost::new(&["a.test", "www.a.test"])
                .set("acme", "true")
                .route("/", "up"),
        )
        .vhost(Vhost::new(&["auto.test"]).route("/", "up"))
        .pool("up", Pool::backends(&[up.addr]))
        .start_as(&cfg)
        .await;
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
    // a vhost with no certificate and no `acme = true`: [acme] orders one for it too
    let root_pem = pebble.issuing_root_pem().await;
    wait_for(
        "the certificate of the vhost no file covers",
        Duration::from_secs(60),
        || async { served_cert(&root_pem, https, "auto.test").await.is_some() },
    )
    .await;
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
    tg.ready(SocketAddr::from(([127, 0, 0, 1], admin))).await;
    let r = c
        .get(format!("https://a.test:{}/", https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // the issuer has looked (twice, so a first look that found something would have ordered)
    wait_for(
        "the issuer to look twice",
        Duration::from_secs(10),
        || async { acme_checks(admin).await >= 2.0 },
    )
    .await;
    let log = tg.log_text();
    assert!(!log.contains("ordering an ACME certificate"), "{log}");
    assert!(!log.contains("ACME account created"), "{log}");
}

/// TLS-ALPN-01 (RFC 8737) answered on the TLS listener itself (no plain listener at all), and
/// a short-lived certificate (45 s) renewed at 2/3 of its lifetime with no restart: the
/// listener serves the new one. A handshake that offers only `acme-tls/1` while no order is
/// pending gets no certificate at all, and ordinary clients never see a challenge one.
#[tokio::test]
async fn tls_alpn_01_is_answered_on_the_tls_listener_and_short_certificates_renew() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let https = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = free_port();
    // Pebble's HTTP-01 port is one nothing listens on: only TLS-ALPN-01 can succeed
    let pebble = Pebble::ready_with(dir.path(), free_port(), https.port(), Some(45)).await;
    let cfg = dir.path().join("tollgate.toml");
    let tg = Config::new()
        .admin_at(admin)
        .table(
            "acme",
            &format!(
                "directory = \"{}\"\nchallenge = \"tls-alpn-01\"\nstorage = \"{{dir}}/acme\"\n\
                 ca_bundle = \"{{dir}}/pebble-https-ca.pem\"",
                pebble.directory
            ),
        )
        .listener(https, true, "")
        .vhost(Vhost::new(&["c.test"]).set("acme", "true").route("/", "up"))
        .pool("up", Pool::backends(&[up.addr]))
        .start_as(&cfg)
        .await;
    let root = pebble.issuing_root_pem().await;
    wait_for(
        "the TLS-ALPN-01 certificate to serve",
        Duration::from_secs(60),
        || async { served_cert(&root, https, "c.test").await.is_some() },
    )
    .await;
    let first = served_cert(&root, https, "c.test").await.unwrap();
    let log = tg.log_text();
    assert!(log.contains("ACME certificate issued"), "{log}");
    let c = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(root.as_bytes()).unwrap())
        .resolve("c.test", https)
        .no_proxy()
        .build()
        .unwrap();
    let r = c
        .get(format!("https://c.test:{}/x", https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // /certs: the source and the next renewal (2/3 of 45 s after the start of validity)
    let entry = cert_entry(admin, "c.test").await;
    let (nb, na) = (
        entry["not_before_unix"].as_i64().unwrap(),
        entry["not_after_unix"].as_i64().unwrap(),
    );
    assert_eq!(entry["issuer"], "acme");
    assert_eq!(
        entry["renew_at_unix"].as_i64().unwrap(),
        nb + (na - nb) * 2 / 3
    );

    // the CA's validation handshakes (ALPN acme-tls/1, closed after the handshake) are no
    // reason for a warning
    assert!(
        !tg.log_text()
            .contains("custom was called on an empty on_custom"),
        "{}",
        tg.log_text()
    );
    // no order pending: a handshake that offers only acme-tls/1 gets no certificate
    let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
    let refused = crate::common::tls_over_pem(&root, tcp, "c.test", &["acme-tls/1"]).await;
    assert!(
        refused.is_err(),
        "acme-tls/1 without a pending order is refused"
    );
    // an ordinary client offering acme-tls/1 last still gets HTTP and the real certificate
    let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
    let tls = crate::common::tls_over_pem(&root, tcp, "c.test", &["http/1.1", "acme-tls/1"])
        .await
        .expect("verified against the CA's root: the issued certificate");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));

    // renewal: a new certificate serves once 2/3 of the lifetime has passed
    wait_for(
        "the renewed certificate to serve",
        Duration::from_secs(75),
        || async {
            served_cert(&root, https, "c.test")
                .await
                .is_some_and(|der| der != first)
        },
    )
    .await;
    let log = tg.log_text();
    assert!(log.matches("ACME certificate issued").count() >= 2, "{log}");
    assert!(!log.contains("ACME order failed"), "{log}");
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
    let admin = free_port();
    let tg = Config::new()
        .admin_at(admin)
        .table(
            "acme",
            &format!(
                "directory = \"https://127.0.0.1:{}/dir\"\nstorage = \"{{dir}}/acme\"",
                free_port()
            ),
        )
        .listener(http, false, "")
        .listener(https, true, "")
        .vhost(Vhost::new(&["a.test"]).set("acme", "true").route("/", "up"))
        .vhost(Vhost::new(&["b.test"]).cert("b").route("/", "up"))
        .pool("up", Pool::backends(&[up.addr]))
        .start_as(&cfg)
        .await;
    wait_for(
        "the failure to be logged",
        Duration::from_secs(10),
        || async { tg.log_text().contains("ACME account unavailable") },
    )
    .await;
    // two more looks of the issuer (4 s): within the minute's backoff, no new try
    let looked = acme_checks(admin).await;
    wait_for(
        "the issuer to look twice more",
        Duration::from_secs(10),
        || async { acme_checks(admin).await >= looked + 2.0 },
    )
    .await;
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

/// Consul's HTTP API, for what the test itself does there (holding the lock, reading KV).
async fn consul_call(
    consul: &ConsulAgent,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> String {
    consul_call_as(
        consul,
        None,
        method,
        path,
        body.map(|b| b.to_string().into_bytes()),
    )
    .await
}

/// Put `value` at KV `key` (no token).
async fn kv_put(consul: &ConsulAgent, key: &str, value: impl Into<Vec<u8>>) {
    let r = consul_call_as(
        consul,
        None,
        reqwest::Method::PUT,
        &format!("/v1/kv/{key}"),
        Some(value.into()),
    )
    .await;
    assert_eq!(r.trim(), "true", "{key}: {r}");
}

/// [`consul_call`] with an ACL token and a raw body.
async fn consul_call_as(
    consul: &ConsulAgent,
    token: Option<&str>,
    method: reqwest::Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> String {
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut r = c.request(method, format!("http://{}{path}", consul.http));
    if let Some(t) = token {
        r = r.header("X-Consul-Token", t);
    }
    if let Some(b) = body {
        r = r.body(b);
    }
    r.send().await.unwrap().text().await.unwrap()
}

/// The tollgate config of one fleet member sharing ACME through Consul.
fn fleet_member(
    dir: &Path,
    name: &str,
    consul: &ConsulAgent,
    pebble: &Pebble,
    http: SocketAddr,
    https: SocketAddr,
    up: SocketAddr,
) -> std::path::PathBuf {
    let acme = format!(
        "directory = \"{}\"\nca_bundle = \"{{dir}}/pebble-https-ca.pem\"",
        pebble.directory
    );
    acme_member(dir, name, consul, "", &acme, [http, https], up)
}

/// A fleet member's config: `consul_options` under `[consul]`, `acme_options` under `[acme]`
/// besides the fleet's (`consul = true`, the shared key `{dir}/acme.key`, its own storage),
/// listeners on `http` and `https`, `a.test` by ACME to `up`.
fn acme_member(
    dir: &Path,
    name: &str,
    consul: &ConsulAgent,
    consul_options: &str,
    acme_options: &str,
    [http, https]: [SocketAddr; 2],
    up: SocketAddr,
) -> std::path::PathBuf {
    let cfg = dir.join(format!("{name}.toml"));
    Config::new()
        .consul(consul, consul_options)
        .table(
            "acme",
            &format!(
                "storage = \"{{dir}}/acme-{name}\"\nconsul = true\n\
                 encryption_key_file = \"{{dir}}/acme.key\"\n{acme_options}"
            ),
        )
        .listener(http, false, "")
        .listener(https, true, "")
        .vhost(Vhost::new(&["a.test"]).set("acme", "true").route("/", "up"))
        .pool("up", Pool::backends(&[up]))
        .write(&cfg);
    cfg
}

/// The certificate a TLS server presents for `sni`, verified against `root` (DER).
async fn served_cert(root: &str, addr: SocketAddr, sni: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(root.as_bytes()) {
        roots.add(c.ok()?).ok()?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .ok()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).ok()?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .ok()?;
    Some(
        tls.get_ref()
            .1
            .peer_certificates()?
            .first()?
            .as_ref()
            .to_vec(),
    )
}

/// Two fleet members, A and B, on one Consul agent, with Pebble validating only at B's
/// port; B is paused (SIGSTOP) and the test has just let the issuer lock go, so A takes it.
struct Fleet {
    // tollgates stop (printing their logs) before Consul, Pebble and the directory go
    a: Tollgate,
    b: Tollgate,
    consul: ConsulAgent,
    pebble: Pebble,
    https_a: SocketAddr,
    https_b: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Fleet {
    async fn paused(up: &Upstream) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let consul = ConsulAgent::start(dir.path()).await;
        std::fs::write(
            dir.path().join("acme.key"),
            "6f1c0b3e9a2d47c58e0f7a19b2c4d6e8\n",
        )
        .unwrap();
        let addr = || SocketAddr::from(([127, 0, 0, 1], free_port()));
        let (http_a, https_a, http_b, https_b) = (addr(), addr(), addr(), addr());
        let pebble = Pebble::ready(dir.path(), http_b.port()).await;
        // the test holds the issuer lock until A can take it and B cannot
        let sid = hold_lock(&consul).await;
        let cfg_a = fleet_member(dir.path(), "a", &consul, &pebble, http_a, https_a, up.addr);
        let cfg_b = fleet_member(dir.path(), "b", &consul, &pebble, http_b, https_b, up.addr);
        let mut a = Tollgate::start(&cfg_a);
        let mut b = Tollgate::start(&cfg_b);
        a.ready(http_a).await;
        b.ready(http_b).await;
        // B pauses; the lock is let go: A takes it (B goes on when the test says)
        b.signal("STOP");
        consul_call(
            &consul,
            reqwest::Method::PUT,
            &format!("/v1/kv/tollgate/acme/lock?release={sid}"),
            None,
        )
        .await;
        // B may have sent an acquire just before it stopped, which Consul then grants after
        // the release (seen once in CI): its session is destroyed, as Consul would once a
        // stopped B fails to renew it, and A takes the lock
        let (a_node, b_node) = (
            format!("acme-{}", a.child.id()),
            format!("acme-{}", b.child.id()),
        );
        wait_for(
            "A to take the issuer lock",
            Duration::from_secs(10),
            || async {
                let entry = consul_call(
                    &consul,
                    reqwest::Method::GET,
                    "/v1/kv/tollgate/acme/lock",
                    None,
                )
                .await;
                let entry: serde_json::Value = serde_json::from_str(&entry).unwrap_or_default();
                let Some(session) = entry[0]["Session"].as_str() else {
                    return false;
                };
                use base64::Engine;
                let holder = base64::engine::general_purpose::STANDARD
                    .decode(entry[0]["Value"].as_str().unwrap_or_default())
                    .unwrap_or_default();
                let holder = String::from_utf8_lossy(&holder);
                if holder == b_node {
                    consul_call(
                        &consul,
                        reqwest::Method::PUT,
                        &format!("/v1/session/destroy/{session}"),
                        None,
                    )
                    .await;
                }
                holder == a_node
            },
        )
        .await;
        Fleet {
            a,
            b,
            consul,
            pebble,
            https_a,
            https_b,
            _dir: dir,
        }
    }
}

/// Two tollgates on one Consul agent: A takes the issuer lock and orders, while the CA's
/// HTTP-01 request goes to B (Pebble validates at B's port only), which answers from the
/// shared state; then both serve the same certificate, and Consul KV holds it encrypted.
#[tokio::test]
async fn two_tollgates_share_issuance_through_consul() {
    let up = Upstream::start("up").await;
    let f = Fleet::paused(&up).await;
    let a_node = format!("acme-{}", f.a.child.id());
    wait_for(
        "A to hold the issuer lock",
        Duration::from_secs(10),
        || async {
            consul_call(
                &f.consul,
                reqwest::Method::GET,
                "/v1/kv/tollgate/acme/lock?raw=true",
                None,
            )
            .await
                == a_node
        },
    )
    .await;
    f.b.signal("CONT");
    let root = f.pebble.issuing_root_pem().await;
    wait_for(
        "both to serve the issued certificate",
        Duration::from_secs(60),
        || async {
            served_cert(&root, f.https_a, "a.test").await.is_some()
                && served_cert(&root, f.https_b, "a.test").await.is_some()
        },
    )
    .await;
    assert_eq!(
        served_cert(&root, f.https_a, "a.test").await,
        served_cert(&root, f.https_b, "a.test").await,
        "one certificate for the fleet"
    );
    // (log lines are written asynchronously: wait for them rather than race them)
    wait_for(
        "the logs to say who issued",
        Duration::from_secs(5),
        || async {
            f.a.log_text().contains("ACME certificate issued")
                && f.b
                    .log_text()
                    .contains("certificates from the shared ACME state")
        },
    )
    .await;
    assert!(
        !f.b.log_text().contains("ordering an ACME certificate"),
        "B never ordered"
    );
    // what Consul holds is sealed
    let kv = consul_call(
        &f.consul,
        reqwest::Method::GET,
        "/v1/kv/tollgate/acme/certs/a.test?raw=true",
        None,
    )
    .await;
    assert!(!kv.is_empty() && !kv.contains("PRIVATE KEY") && !kv.contains("CERTIFICATE"));
    let account = consul_call(
        &f.consul,
        reqwest::Method::GET,
        "/v1/kv/tollgate/acme/account?raw=true",
        None,
    )
    .await;
    assert!(!account.is_empty() && !account.contains("private"));
}

/// Hold the fleet's issuer lock from the test (a session of its own); returns the session.
async fn hold_lock(consul: &ConsulAgent) -> String {
    let session: serde_json::Value = serde_json::from_str(
        &consul_call(
            consul,
            reqwest::Method::PUT,
            "/v1/session/create",
            Some(serde_json::json!({"TTL": "60s", "LockDelay": "0s", "Behavior": "release"})),
        )
        .await,
    )
    .unwrap();
    let sid = session["ID"].as_str().unwrap().to_string();
    let held = consul_call(
        consul,
        reqwest::Method::PUT,
        &format!("/v1/kv/tollgate/acme/lock?acquire={sid}"),
        None,
    )
    .await;
    assert_eq!(held.trim(), "true");
    sid
}

/// The issuer dies in the middle of an order (its challenge pending; the CA can reach only
/// B, which is paused, so the order cannot finish): its lock frees when its Consul session
/// expires, B takes it, orders again, completes, and serves the certificate.
#[tokio::test]
async fn when_the_issuer_dies_mid_order_another_completes() {
    let up = Upstream::start("up").await;
    let mut f = Fleet::paused(&up).await;
    wait_for(
        "A's challenge to be pending",
        Duration::from_secs(20),
        || async {
            consul_call(
                &f.consul,
                reqwest::Method::GET,
                "/v1/kv/tollgate/acme/challenges/?keys=true",
                None,
            )
            .await
            .contains("challenges/")
        },
    )
    .await;
    let _ = f.a.child.kill();
    let _ = f.a.child.wait();
    assert!(
        !f.a.log_text().contains("ACME certificate issued"),
        "A died mid-order"
    );
    f.b.signal("CONT");
    let root = f.pebble.issuing_root_pem().await;
    // A's session expires (15 s TTL; Consul may take up to twice that), then B's order
    wait_for(
        "B to take over and serve the certificate",
        Duration::from_secs(90),
        || async { served_cert(&root, f.https_b, "a.test").await.is_some() },
    )
    .await;
    // (log lines are written asynchronously: wait for them rather than race them)
    wait_for(
        "B's log to say it issued",
        Duration::from_secs(5),
        || async {
            let log = f.b.log_text();
            log.contains("ACME certificate issued")
                && log.contains("this instance issues ACME certificates for the fleet")
        },
    )
    .await;
    // B's own challenges are gone; A's (unless B's order reused its authorization) stays
    // until its order's deadline, since an order may still need it; sealed
    let pending = consul_call(
        &f.consul,
        reqwest::Method::GET,
        "/v1/kv/tollgate/acme/challenges/?keys=true",
        None,
    )
    .await;
    let keys: Vec<String> = serde_json::from_str(&pending).unwrap_or_default();
    assert!(keys.len() <= 1, "at most A's challenge: {pending}");
    for key in keys {
        let value = consul_call(
            &f.consul,
            reqwest::Method::GET,
            &format!("/v1/kv/{key}?raw=true"),
            None,
        )
        .await;
        let token = key.rsplit('/').next().unwrap();
        assert!(!value.contains(token), "sealed, not in the clear: {value}");
    }
}

/// The `/certs` entry of the certificate whose first name is `name`.
async fn cert_entry(admin: u16, name: &str) -> serde_json::Value {
    let certs = admin_json(&reqwest::Client::new(), admin, "/certs").await;
    certs
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["names"][0] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no /certs entry for {name}: {certs}"))
}

/// The common name of the certificate served for `sni`, verified against `ca`; none when the
/// handshake fails.
async fn served_cn(ca: &TestCa, addr: SocketAddr, sni: &str) -> Option<String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let tls = crate::common::tls_over_pem(&ca.pem, tcp, sni, &[])
        .await
        .ok()?;
    let der = tls.get_ref().1.peer_certificates()?.first()?.clone();
    let (_, x) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = x.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_string())
}

/// `tls.consul_kv_prefix`: certificates issued elsewhere, read from Consul KV in Fabio's
/// layout (`NAME-cert.pem` + `NAME-key.pem`, or `NAME.pem` holding both), served with no
/// certificate file at all, and replaced live when KV changes. What an attacker or a
/// mistake puts there (a key that does not belong, text that is no PEM, the prefix
/// emptied) is said in the log and leaves the certificates that were serving.
#[tokio::test]
async fn certificates_come_from_consul_kv_and_follow_it() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let consul = ConsulAgent::start(dir.path()).await;
    let ca = TestCa::new();
    let https = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = free_port();
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap();
    let (c, first_key) = ca.issue(dir.path(), "a1", &["a.test"], "a-1");
    kv_put(&consul, "edge/certs/a.test-cert.pem", read(c)).await;
    kv_put(
        &consul,
        "edge/certs/a.test-key.pem",
        read(first_key.clone()),
    )
    .await;
    let (c, k) = ca.issue(dir.path(), "b1", &["b.test"], "b-1");
    kv_put(&consul, "edge/certs/b.test.pem", read(c) + &read(k)).await;
    let state = dir.path().join("consul-view.json");
    let cfg = dir.path().join("tollgate.toml");
    let tg = Config::new()
        .admin_at(admin)
        .consul(&consul, &format!("state_file = \"{}\"", state.display()))
        .table("tls", "consul_kv_prefix = \"edge/certs\"")
        .listener(https, true, "")
        .vhost(Vhost::new(&["a.test", "b.test"]).route("/", "up"))
        .pool("up", Pool::backends(&[up.addr]))
        .start_as(&cfg)
        .await;
    wait_for(
        "both KV certificates to serve",
        Duration::from_secs(15),
        || async {
            served_cn(&ca, https, "a.test").await.as_deref() == Some("a-1")
                && served_cn(&ca, https, "b.test").await.as_deref() == Some("b-1")
        },
    )
    .await;
    let r = client(&ca, https, &["a.test"])
        .get(format!("https://a.test:{}/x", https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let a = cert_entry(admin, "a.test").await;
    assert_eq!(a["issuer"], "consul");
    assert_eq!(a["source"], "consul:edge/certs/a.test-cert.pem");
    // the saved view holds keys now: private to its owner
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&state).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the state file is private: {mode:o}");

    // a renewed certificate put in KV serves at once, no restart, no reload
    let (c2, k2) = ca.issue(dir.path(), "a2", &["a.test"], "a-2");
    kv_put(&consul, "edge/certs/a.test-key.pem", read(k2)).await;
    kv_put(&consul, "edge/certs/a.test-cert.pem", read(c2)).await;
    wait_for(
        "the renewed KV certificate",
        Duration::from_secs(15),
        || async { served_cn(&ca, https, "a.test").await.as_deref() == Some("a-2") },
    )
    .await;

    // a key that does not belong, and a value that is no PEM: said, and not served
    kv_put(&consul, "edge/certs/a.test-key.pem", read(first_key)).await;
    kv_put(
        &consul,
        "edge/certs/evil.pem",
        "<script>not a certificate</script>",
    )
    .await;
    wait_for(
        "the refusals to be logged",
        Duration::from_secs(15),
        || async {
            let log = tg.log_text();
            log.contains("does not belong") && log.contains("evil.pem")
        },
    )
    .await;
    let log = tg.log_text();
    let line = log.lines().find(|l| l.contains("does not belong")).unwrap();
    assert!(line.contains("keeps serving"), "{line}");
    // the line names the key's entry as the key, the certificate's as the certificate
    assert!(
        line.contains("the key consul:edge/certs/a.test-key.pem does not belong to the certificate consul:edge/certs/a.test-cert.pem"),
        "{line}"
    );
    assert_eq!(
        served_cn(&ca, https, "a.test").await.as_deref(),
        Some("a-2")
    );
    assert_eq!(
        served_cn(&ca, https, "b.test").await.as_deref(),
        Some("b-1")
    );

    // binary junk where a certificate was: said, and the version before keeps serving
    kv_put(
        &consul,
        "edge/certs/b.test.pem",
        vec![0xffu8, 0xfe, 0x00, 0x80, 0x13],
    )
    .await;
    wait_for(
        "the junk to be refused",
        Duration::from_secs(15),
        || async {
            tg.log_text()
                .contains("certificate in Consul KV not used: b.test.pem: not PEM text")
        },
    )
    .await;
    assert!(tg
        .log_text()
        .contains("b.test.pem: unusable now; the version read before keeps serving"));
    assert_eq!(
        served_cn(&ca, https, "b.test").await.as_deref(),
        Some("b-1")
    );

    // the prefix emptied at once: the guard keeps what was serving
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    c.delete(format!(
        "http://{}/v1/kv/edge/certs?recurse=true",
        consul.http
    ))
    .send()
    .await
    .unwrap();
    wait_for("the guard", Duration::from_secs(15), || async {
        tg.log_text()
            .contains("GUARD: the KV prefix holds no usable certificate")
    })
    .await;
    assert_eq!(
        served_cn(&ca, https, "a.test").await.as_deref(),
        Some("a-2")
    );
}

/// The config of a fleet member sharing ACME through Consul (reading its token from
/// `token_file` when given) whose CA cannot be reached: every order fails before it starts.
fn unreachable_ca_member(
    dir: &Path,
    name: &str,
    consul: &ConsulAgent,
    token_file: Option<&Path>,
    http: SocketAddr,
    https: SocketAddr,
    up: SocketAddr,
) -> std::path::PathBuf {
    let token = token_file
        .map(|t| format!("token_file = \"{}\"", t.display()))
        .unwrap_or_default();
    let acme = format!("directory = \"https://127.0.0.1:{}/dir\"", free_port());
    let cfg = acme_member(dir, name, consul, &token, &acme, [http, https], up);
    std::fs::write(dir.join("acme.key"), "6f1c0b3e9a2d47c58e0f7a19b2c4d6e8\n").unwrap();
    cfg
}

/// A KV writer who is not the fleet plants an HTTP-01 answer and a TLS-ALPN-01 digest in the
/// shared prefix, as an attacker with KV write access would to get a certificate for a name
/// that points at the fleet: tollgate refuses both (they are not sealed with the fleet's
/// key) and answers neither, for a vhost's name or any other.
#[tokio::test]
async fn challenges_a_kv_writer_plants_are_not_answered() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let consul = ConsulAgent::start(dir.path()).await;
    let addr = || SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (http, https) = (addr(), addr());
    let cfg = unreachable_ca_member(dir.path(), "a", &consul, None, http, https, up.addr);
    let mut tg = Tollgate::start(&cfg);
    tg.ready(http).await;
    // planted once the instance issues: taking the lock, an issuer deletes what it cannot
    // open, and here the follower is to be seen refusing them
    wait_for("the instance to issue", Duration::from_secs(15), || async {
        tg.log_text()
            .contains("this instance issues ACME certificates for the fleet")
    })
    .await;
    let digest = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    for (key, value) in [
        ("challenges/forgedtoken", "forgedtoken.attackers-thumbprint"),
        ("alpn/a.test", digest),
    ] {
        kv_put(&consul, &format!("tollgate/acme/{key}"), value).await;
    }
    // the follower has read both (and says why it will not answer them)
    wait_for(
        "both planted entries to be refused",
        Duration::from_secs(15),
        || async {
            let log = tg.log_text();
            log.contains("not sealed by this fleet")
                && log.contains("challenges/forgedtoken")
                && log.contains("alpn/a.test")
        },
    )
    .await;
    let c = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for host in ["a.test", "elsewhere.test"] {
        let r = c
            .get(format!(
                "http://{http}/.well-known/acme-challenge/forgedtoken"
            ))
            .header("Host", host)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        assert!(
            status != 200 && !body.contains("attackers-thumbprint"),
            "{host}: {status} {body}"
        );
    }
    // a TLS-ALPN-01 validation handshake gets no certificate at all
    assert_eq!(
        any_certificate(https, "a.test", &["acme-tls/1"]).await,
        None,
        "no certificate for a planted digest"
    );
}

/// The certificate a TLS server presents for `sni` offering `alpn`, whatever it is (not
/// verified): none when the handshake fails.
async fn any_certificate(addr: SocketAddr, sni: &str, alpn: &[&str]) -> Option<Vec<u8>> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from(sni.to_string()).ok()?,
            tcp,
        )
        .await
        .ok()?;
    Some(
        tls.get_ref()
            .1
            .peer_certificates()?
            .first()?
            .as_ref()
            .to_vec(),
    )
}

/// Two instances against a CA that cannot be reached, on an ACL-enforcing Consul agent whose
/// token they read from a file. The first fails once (a minute's backoff, kept in KV) and
/// stops; the second takes the issuer lock and waits out the *fleet's* backoff instead of
/// ordering at once. The token is rotated (the old one deleted) while it holds the lock: it
/// keeps the lock past Consul's session expiry (it renews with the new token), and its next
/// failure doubles the fleet's backoff (2 minutes), saved with the new token.
#[tokio::test]
async fn a_fleet_keeps_one_renewed_issuer_lock_and_one_backoff_across_a_token_rotation() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let master = "root-token-for-tests";
    let consul = ConsulAgent::start_with_acl(dir.path(), master).await;
    let token_file = dir.path().join("consul.token");
    std::fs::write(&token_file, format!("{master}\n")).unwrap();
    let addr = || SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (http_a, https_a, http_b, https_b) = (addr(), addr(), addr(), addr());
    let tf = Some(token_file.as_path());
    let cfg_a = unreachable_ca_member(dir.path(), "a", &consul, tf, http_a, https_a, up.addr);
    let cfg_b = unreachable_ca_member(dir.path(), "b", &consul, tf, http_b, https_b, up.addr);
    let mut a = Tollgate::start(&cfg_a);
    a.ready(http_a).await;
    wait_for(
        "A to take the lock and fail once",
        Duration::from_secs(20),
        || async {
            let log = a.log_text();
            log.contains("this instance issues ACME certificates for the fleet")
                && log.contains("ACME account unavailable")
        },
    )
    .await;
    assert!(a.log_text().contains("retry_in=60s"), "{}", a.log_text());
    let mut b = Tollgate::start(&cfg_b);
    b.ready(http_b).await;
    a.signal("TERM");
    let _ = a.child.wait();
    wait_for(
        "B to take the lock and wait for the fleet's backoff",
        Duration::from_secs(45),
        || async {
            let log = b.log_text();
            log.contains("this instance issues ACME certificates for the fleet")
                && log.contains("wait for the fleet's backoff")
        },
    )
    .await;
    assert!(
        !b.log_text().contains("ACME account unavailable"),
        "B did not try the CA during A's backoff"
    );
    let lock_session = || async {
        let v: serde_json::Value = serde_json::from_str(
            &consul_call_as(
                &consul,
                Some(master),
                reqwest::Method::GET,
                "/v1/kv/tollgate/acme/lock",
                None,
            )
            .await,
        )
        .unwrap();
        v[0]["Session"].as_str().unwrap_or_default().to_string()
    };
    let held = lock_session().await;
    assert!(!held.is_empty());

    // rotate: a new token in the file, the old one (the master's, here a separate token so
    // it can be deleted) gone
    let made = |what: &'static str| {
        let consul = &consul;
        async move {
            let t: serde_json::Value = serde_json::from_str(
                &consul_call_as(
                    consul,
                    Some(master),
                    reqwest::Method::PUT,
                    "/v1/acl/token",
                    Some(
                        serde_json::json!({"Description": what, "Policies": [{"Name": "global-management"}]})
                            .to_string()
                            .into_bytes(),
                    ),
                )
                .await,
            )
            .unwrap();
            (
                t["AccessorID"].as_str().unwrap().to_string(),
                t["SecretID"].as_str().unwrap().to_string(),
            )
        }
    };
    let (old_id, old_secret) = made("first").await;
    std::fs::write(&token_file, format!("{old_secret}\n")).unwrap();
    // B reads it at its next request; let a few of them go by with the first token
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, new_secret) = made("second").await;
    std::fs::write(&token_file, format!("{new_secret}\n")).unwrap();
    consul_call_as(
        &consul,
        Some(master),
        reqwest::Method::DELETE,
        &format!("/v1/acl/token/{old_id}"),
        None,
    )
    .await;
    // the fleet's backoff ends ~60 s after A's failure: B's own try then fails and doubles
    // it; by then B's session has outlived Consul's expiry (TTL 15 s, enforced within 30 s)
    wait_for(
        "B's own failure after the fleet's backoff",
        Duration::from_secs(90),
        || async { b.log_text().contains("ACME account unavailable") },
    )
    .await;
    let log = b.log_text();
    assert!(
        log.contains("retry_in=120s"),
        "the fleet's second failure: {log}"
    );
    assert_eq!(lock_session().await, held, "B held one session throughout");
    assert_eq!(
        log.matches("this instance issues ACME certificates for the fleet")
            .count(),
        1,
        "{log}"
    );
    for refused in [
        "lapsed",
        "could not be saved",
        "cannot be read",
        "issuer lock is unavailable",
    ] {
        assert!(!log.contains(refused), "{refused}: {log}");
    }
}

/// How many times the ACME issuer has looked at what to order (`tollgate_acme_checks_total`).
async fn acme_checks(admin: u16) -> f64 {
    let m = admin_text(&reqwest::Client::new(), admin, "/metrics").await;
    m.lines()
        .find_map(|l| {
            l.strip_prefix("tollgate_acme_checks_total ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}
