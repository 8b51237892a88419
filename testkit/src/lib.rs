//! tollgate's test harness, shared by the integration tests (`tests/it`) and the benches that
//! need it (`benches/failover.rs`): real upstream servers on loopback, a test CA, the real
//! tollgate binary, a site config builder, Consul agents, network namespaces, AWS's moto.

// `new()` here starts or creates something (a CA, namespaces, a pair of processes): not a
// value `Default` should hand out.
#![allow(clippy::new_without_default)]

pub mod attack;
pub mod aws;
pub mod config;
pub mod netns;
pub mod site;
pub mod takeover;

pub use config::{line_of, split_tables, Config, Pool, Port, Vhost};
pub use site::{issue_a, one_vhost, single_pool, site, site_config, Site};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// Wait for `cond` to hold, checking every 20 ms, failing after `deadline`.
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out after {deadline:?} waiting for {what}");
}

/// `tollgate check --config path`: its exit code and what it printed (stderr, then stdout).
pub fn run_check(path: &Path) -> (i32, String) {
    let out = Command::new(Tollgate::bin())
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap_or(-1), text)
}

/// GET an admin API path (no token) as text.
pub async fn admin_text(c: &reqwest::Client, admin: u16, path: &str) -> String {
    c.get(format!("http://127.0.0.1:{admin}{path}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// GET an admin API path (no token) as JSON.
pub async fn admin_json(c: &reqwest::Client, admin: u16, path: &str) -> serde_json::Value {
    c.get(format!("http://127.0.0.1:{admin}{path}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A loopback port that was free a moment ago, from below the kernel's ephemeral range
/// (32768+ on Linux): a port from `bind(…:0)` can be handed out again to another test's
/// outgoing connection or listener before the server under test binds it. Each test process
/// walks its own stretch (by pid), one port per call.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 997) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if StdListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN);
}

/// A loopback address nobody listens on (connect is refused).
pub fn dead_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// An HTTP/1.1 upstream that answers with JSON describing the request it got (`headers`: the
/// last value of each; `repeated`: the names that came more than once).
/// `/sleep/<ms>` waits before answering; `/hop` answers with hop-by-hop headers; `…/banner`
/// with `Server`, `X-Powered-By` and a short HSTS of its own; `/drain`
/// reads the whole request body first and answers with its length.
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    pub hits: Arc<AtomicUsize>,
    /// TCP connections accepted (keep-alive reuse keeps this small).
    pub conns: Arc<AtomicUsize>,
    /// The status `GET /healthz` answers (200 unless a test changes it); health probes are
    /// counted in `probes`, not in `hits`.
    pub health: Arc<std::sync::atomic::AtomicU16>,
    pub probes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a test upstream speaks: HTTP/1.1 only (the default), or HTTP/1.1 and HTTP/2 (h2c with
/// prior knowledge in the clear; ALPN `h2`/`http/1.1` over TLS), optionally over TLS with a
/// certificate and, for mTLS, the CA client certificates must chain to.
#[derive(Default, Clone)]
pub struct UpstreamMode {
    pub h2: bool,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub client_ca: Option<String>,
}

fn tls_acceptor(mode: &UpstreamMode) -> Option<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = mode.tls.as_ref()?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match &mode.client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_single_cert(chain, key).unwrap();
    cfg.alpn_protocols = if mode.h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        Self::start_with(name, UpstreamMode::default()).await
    }

    pub async fn start_with(name: &str, mode: UpstreamMode) -> Upstream {
        let acceptor = tls_acceptor(&mode);
        let h2 = mode.h2;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(AtomicUsize::new(0));
        let name_s = name.to_string();
        let h = hits.clone();
        let cn = conns.clone();
        let connections: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let conn_list = connections.clone();
        let health = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let probes = Arc::new(AtomicUsize::new(0));
        let (hh, pp) = (health.clone(), probes.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                cn.fetch_add(1, Ordering::SeqCst);
                let name = name_s.clone();
                let hits = h.clone();
                let (health, probes) = (hh.clone(), pp.clone());
                let acceptor = acceptor.clone();
                let conn_task = tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let name = name.clone();
                        let hits = hits.clone();
                        let (health, probes) = (health.clone(), probes.clone());
                        async move {
                            if req.uri().path() == "/healthz" {
                                probes.fetch_add(1, Ordering::SeqCst);
                                let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
                                *r.status_mut() =
                                    hyper::StatusCode::from_u16(health.load(Ordering::SeqCst))
                                        .unwrap();
                                return Ok::<_, hyper::Error>(r);
                            }
                            Ok::<_, hyper::Error>(answer(&name, peer, req, &hits).await)
                        }
                    });
                    if let Some(acceptor) = acceptor {
                        // a failed handshake (wrong CA, no client certificate) just closes
                        let Ok(tls) = acceptor.accept(stream).await else {
                            return;
                        };
                        let _ = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                    } else if h2 {
                        let _ = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    }
                });
                conn_list.lock().unwrap().push(conn_task.abort_handle());
            }
        });
        Upstream {
            addr,
            name: name.to_string(),
            hits,
            conns,
            health,
            probes,
            task,
            connections,
        }
    }

    /// Die like a crashed process: stop listening and drop every open connection.
    pub fn kill(&self) {
        self.task.abort();
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn answer(
    name: &str,
    peer: SocketAddr,
    req: Request<Incoming>,
    hits: &AtomicUsize,
) -> Response<Full<Bytes>> {
    hits.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    if path == "/drain" {
        // read the whole body before answering (most upstreams answer after the body)
        use http_body_util::BodyExt;
        let n = match req.into_body().collect().await {
            Ok(b) => b.to_bytes().len(),
            Err(_) => 0,
        };
        return Response::new(Full::new(Bytes::from(format!("{{\"body_len\":{n}}}"))));
    }
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|s| s.parse::<usize>().ok())
    {
        // a large answer, for clients that do not read it
        return Response::new(Full::new(Bytes::from(vec![b'x'; n.min(256 << 20)])));
    }
    if let Some(ms) = path
        .rsplit_once("/sleep/")
        .and_then(|(_, s)| s.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    // names the request carried more than once (a proxy's field added beside the client's)
    let mut repeated: Vec<String> = req
        .headers()
        .keys()
        .filter(|k| req.headers().get_all(*k).iter().count() > 1)
        .map(|k| k.to_string())
        .collect();
    repeated.dedup();
    let body = serde_json::json!({
        "upstream": name,
        "repeated": repeated,
        "method": req.method().as_str(),
        "path": path,
        "query": req.uri().query(),
        "version": format!("{:?}", req.version()),
        "peer": peer.to_string(),
        "headers": headers,
    });
    let mut resp = Response::builder()
        .header("content-type", "application/json")
        .header("x-upstream", name);
    if let Some((_, spec)) = path.split_once("/headers/") {
        // `/headers/<n>/<bytes>`: an answer with n header fields more, of `bytes` each
        let mut it = spec.split('/').map(|s| s.parse::<usize>().unwrap_or(1));
        let (n, len) = (it.next().unwrap_or(1), it.next().unwrap_or(1));
        let value = "v".repeat(len.min(1 << 20));
        for i in 0..n.min(100_000) {
            resp = resp.header(format!("x-h-{i}"), value.as_str());
        }
    }
    if path.ends_with("/banner") {
        // what a default upstream tells every client about itself
        resp = resp
            .header("server", "BaseHTTP/0.6 Python/3.11.7")
            .header("x-powered-by", "PHP/5.4.0")
            .header("strict-transport-security", "max-age=1");
    }
    if path == "/hop" {
        resp = resp
            .header("connection", "x-secret")
            .header("x-secret", "leak")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive");
    }
    resp.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

/// A WebSocket echo server (raw TCP, tungstenite does the handshake).
pub async fn websocket_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use futures_util::{SinkExt, StreamExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// A test certificate authority; leaf certificates are signed by it at test time.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    pub pem: String,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tollgate test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pem = cert.pem();
        TestCa { cert, key, pem }
    }

    /// Write `<dir>/<stem>.crt` and `.key` for `names`, with `cn` as the subject common name.
    pub fn issue(&self, dir: &Path, stem: &str, names: &[&str], cn: &str) -> (PathBuf, PathBuf) {
        self.issue_with(dir, stem, names, cn, rcgen::KeyPair::generate().unwrap())
    }

    /// [`Self::issue`] for a given key (PEM, PKCS#8): an RSA certificate, say.
    pub fn issue_for_key(
        &self,
        dir: &Path,
        stem: &str,
        names: &[&str],
        key_pem: &str,
    ) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::from_pem(key_pem).unwrap();
        self.issue_with(dir, stem, names, names[0], key)
    }

    fn issue_with(
        &self,
        dir: &Path,
        stem: &str,
        names: &[&str],
        cn: &str,
        key: rcgen::KeyPair,
    ) -> (PathBuf, PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let c = dir.join(format!("{stem}.crt"));
        let k = dir.join(format!("{stem}.key"));
        // write the key first: a watcher that sees the new cert must find its key
        std::fs::write(&k, key.serialize_pem()).unwrap();
        std::fs::write(&c, cert.pem()).unwrap();
        (c, k)
    }

    pub fn reqwest_cert(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.pem.as_bytes()).unwrap()
    }
}

/// The real tollgate binary, running with a config file; killed when dropped.
pub struct Tollgate {
    pub child: Child,
    pub log: PathBuf,
    pub config: PathBuf,
}

impl Tollgate {
    pub fn start(config: &Path) -> Tollgate {
        Tollgate::start_cmd(Command::new(Tollgate::bin()), config)
    }

    /// The tollgate binary the tests run: `TOLLGATE_TEST_BIN` (to run the suite against
    /// another build, e.g. to see a new test fail on the code before a fix), or this build's,
    /// which cargo builds before any integration test or bench and puts one directory above
    /// the test binary (`target/<profile>/deps/it-…` → `target/<profile>/tollgate`).
    pub fn bin() -> &'static str {
        static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        BIN.get_or_init(|| {
            if let Ok(bin) = std::env::var("TOLLGATE_TEST_BIN") {
                return bin;
            }
            let exe = std::env::current_exe().expect("the test binary's path");
            let bin = exe
                .parent()
                .and_then(Path::parent)
                .map(|profile| profile.join("tollgate"))
                .expect("the test binary is under target/<profile>/deps");
            assert!(
                bin.exists(),
                "{} is missing: run the tests through cargo (it builds the binary first) or set TOLLGATE_TEST_BIN",
                bin.display()
            );
            bin.display().to_string()
        })
    }

    /// Run `tollgate run --config FILE` through `cmd` (the binary, or a wrapper such as
    /// `ip netns exec NS tollgate`); the log goes next to the config.
    pub fn start_cmd(mut cmd: Command, config: &Path) -> Tollgate {
        let log = config.with_extension("log");
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .args(["run", "--config"])
            .arg(config)
            .env("TOLLGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap();
        Tollgate {
            child,
            log,
            config: config.to_path_buf(),
        }
    }

    /// Wait until `addr` accepts connections (or fail with the server's log).
    pub async fn ready(&mut self, addr: SocketAddr) {
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("tollgate exited with {status}:\n{}", self.log_text());
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("tollgate did not listen on {addr}:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// CPU seconds (user + system) the process has used.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.child.id())
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- tollgate log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// Resident memory of process `pid` in KiB, from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A TLS server certificate verifier that accepts any certificate but checks the handshake's
/// signature with `provider`: for clients that must reach a server whatever it presents
/// (the certificate is what they look at), on loopback only.
#[derive(Debug)]
pub struct AnyCert(pub Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// CPU seconds (user + system) process `pid` has used, from /proc.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // fields 14 and 15 of the file (utime, stime), counted after the command name
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// A client that trusts the test CA and sends `hosts` to `addr` (SNI and Host as given).
pub fn client(ca: &TestCa, addr: SocketAddr, hosts: &[&str]) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca.reqwest_cert())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10));
    for h in hosts {
        b = b.resolve(h, addr);
    }
    b.build().unwrap()
}

pub fn write(path: &Path, text: &str) {
    // write-then-rename so a watcher never sees a half-written file
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Handshake with `sni` and return the server certificate's common name and the ALPN chosen.
pub async fn peer_cert_cn(
    ca: &TestCa,
    addr: SocketAddr,
    sni: &str,
    alpn: &[&str],
) -> (String, Option<Vec<u8>>) {
    let stream = tls_connect(ca, addr, sni, alpn).await;
    let (_, conn) = stream.get_ref();
    let der = conn.peer_certificates().unwrap()[0].clone();
    let alpn = conn.alpn_protocol().map(|a| a.to_vec());
    let (_, x) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let cn = x
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    (cn, alpn)
}

pub async fn tls_connect(
    ca: &TestCa,
    addr: SocketAddr,
    sni: &str,
    alpn: &[&str],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tls_over(ca, tcp, sni, alpn).await.unwrap()
}

/// A TLS client handshake over an already connected socket.
pub async fn tls_over<S>(
    ca: &TestCa,
    tcp: S,
    sni: &str,
    alpn: &[&str],
) -> std::io::Result<tokio_rustls::client::TlsStream<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tls_over_pem(&ca.pem, tcp, sni, alpn).await
}

/// [`tls_over`] trusting the CA certificate in `ca_pem` (usable on another thread).
pub async fn tls_over_pem<S>(
    ca_pem: &str,
    tcp: S,
    sni: &str,
    alpn: &[&str],
) -> std::io::Result<tokio_rustls::client::TlsStream<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
}

/// A TCP connection to `to` from the loopback address `from` (e.g. 127.0.0.2).
pub async fn connect_from(from: [u8; 4], to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((from, 0)))?;
    s.connect(to).await
}

/// A real Consul agent in -dev mode on free loopback ports (DNS and gRPC off); killed on drop.
pub struct ConsulAgent {
    pub child: Child,
    pub http: SocketAddr,
    ports: [u16; 3],
    log: PathBuf,
    /// With ACLs on: the master token (used for registrations).
    pub master_token: Option<String>,
    /// Extra agent configuration (HCL), e.g. an HTTPS listener.
    extra_hcl: Option<String>,
    /// The HTTPS API address, when the agent serves one (registrations use `http`).
    pub https: Option<SocketAddr>,
}

pub fn consul_bin() -> String {
    if let Ok(b) = std::env::var("CONSUL_BIN") {
        return b;
    }
    let ok = Command::new("consul")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "no consul binary: run scripts/install-consul (or set CONSUL_BIN)"
    );
    "consul".to_string()
}

impl ConsulAgent {
    pub async fn start(dir: &Path) -> ConsulAgent {
        Self::start_fresh(dir, None, None).await
    }

    /// An agent that is the server of datacenter `dc` (join others with `join_wan`).
    pub async fn start_in(dir: &Path, dc: &str) -> ConsulAgent {
        Self::start_fresh(dir, None, Some(format!("datacenter = \"{dc}\""))).await
    }

    /// Federate with `other` over the WAN (two datacenters), and wait until this agent
    /// knows both.
    pub async fn join_wan(&self, other: &ConsulAgent) {
        self.put(
            &format!("/v1/agent/join/127.0.0.1:{}?wan=1", other.ports[1]),
            None,
        )
        .await;
        let c = reqwest::Client::new();
        let url = format!("http://{}/v1/catalog/datacenters", self.http);
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if let Ok(r) = c.get(&url).send().await {
                if let Ok(dcs) = r.json::<Vec<String>>().await {
                    if dcs.len() >= 2 {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the agents did not federate over the WAN in 30 s");
    }

    /// An agent that also serves its API over HTTPS, with a certificate for 127.0.0.1
    /// issued by `ca`.
    pub async fn start_tls(dir: &Path, ca: &TestCa) -> ConsulAgent {
        let (cert, key) = ca.issue(dir, "consul", &["127.0.0.1", "localhost"], "consul");
        Self::start_fresh(
            dir,
            None,
            Some(format!(
                "cert_file = \"{}\"\nkey_file = \"{}\"",
                cert.display(),
                key.display()
            )),
        )
        .await
    }

    /// An agent with ACLs on, default deny, and `master` as the master token.
    pub async fn start_with_acl(dir: &Path, master: &str) -> ConsulAgent {
        Self::start_fresh(dir, Some(master.to_string()), None).await
    }

    /// Start on fresh ports; a port taken between picking and binding (another test, another
    /// agent) makes the agent exit at once, so up to three sets of ports are tried.
    async fn start_fresh(
        dir: &Path,
        master_token: Option<String>,
        settings: Option<String>,
    ) -> ConsulAgent {
        let mut last = String::new();
        for _ in 0..3 {
            let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let ports = [free_port(), free_port(), free_port()];
            // an HTTPS listener on a fresh port, with the certificate settings given; other
            // settings (no `cert_file`) as they are
            let extra = settings.as_ref().map(|t| match t.contains("cert_file") {
                true => format!("ports {{ https = {} }}\n{t}", free_port()),
                false => t.clone(),
            });
            match Self::try_spawn(dir, http, ports, master_token.clone(), extra).await {
                Ok(a) => return a,
                Err(e) => last = e,
            }
        }
        panic!("the Consul agent did not start three times: {last}");
    }

    async fn spawn(
        dir: &Path,
        http: SocketAddr,
        ports: [u16; 3],
        master_token: Option<String>,
        extra_hcl: Option<String>,
    ) -> ConsulAgent {
        match Self::try_spawn(dir, http, ports, master_token, extra_hcl).await {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        }
    }

    async fn try_spawn(
        dir: &Path,
        http: SocketAddr,
        ports: [u16; 3],
        master_token: Option<String>,
        extra_hcl: Option<String>,
    ) -> Result<ConsulAgent, String> {
        let log = dir.join(format!("consul-{}.log", http.port()));
        let child = Command::new(consul_bin())
            .args([
                "agent",
                "-dev",
                "-bind",
                "127.0.0.1",
                "-client",
                "127.0.0.1",
                "-dns-port",
                "-1",
                "-grpc-port",
                "-1",
            ])
            .args(["-http-port", &http.port().to_string()])
            .args(["-serf-lan-port", &ports[0].to_string()])
            .args(["-serf-wan-port", &ports[1].to_string()])
            .args(["-server-port", &ports[2].to_string()])
            .arg("-log-level=warn")
            .args(master_token.iter().flat_map(|t| {
                [
                    "-hcl".to_string(),
                    format!("acl {{ enabled = true default_policy = \"deny\" tokens {{ master = \"{t}\" agent = \"{t}\" }} }}"),
                ]
            }))
            .args(
                extra_hcl
                    .iter()
                    .flat_map(|h| ["-hcl".to_string(), h.clone()]),
            )
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let https = extra_hcl.as_deref().and_then(|h| {
            let port = h
                .split("https = ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u16>()
                .ok()?;
            Some(SocketAddr::from(([127, 0, 0, 1], port)))
        });
        let mut agent = ConsulAgent {
            child,
            http,
            ports,
            log,
            master_token,
            extra_hcl,
            https,
        };
        let c = reqwest::Client::new();
        let url = format!("http://{http}/v1/status/leader");
        // A loaded 2-core CI machine can take a while to elect; the loop is bounded.
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            if let Ok(Some(status)) = agent.child.try_wait() {
                return Err(format!(
                    "the Consul agent exited ({status}) before electing itself; its log:\n{}",
                    agent.log_text()
                ));
            }
            if let Ok(r) = c.get(&url).send().await {
                if r.text().await.map(|t| t.len() > 4).unwrap_or(false) {
                    return Ok(agent);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let log = agent.log_text();
        agent.kill().await;
        Err(format!(
            "timed out after 60s waiting for the Consul agent to elect itself; its log:\n{log}"
        ))
    }

    /// Kill -9 (its state is lost) and start a fresh agent on the same ports.
    pub async fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn restart(&mut self, dir: &Path) {
        self.kill().await;
        *self = Self::spawn(
            dir,
            self.http,
            self.ports,
            self.master_token.clone(),
            self.extra_hcl.clone(),
        )
        .await;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn put(&self, path: &str, body: Option<serde_json::Value>) {
        let c = reqwest::Client::new();
        let mut r = c.put(format!("http://{}{path}", self.http));
        if let Some(t) = &self.master_token {
            r = r.header("X-Consul-Token", t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        assert!(resp.status().is_success(), "PUT {path}: {}", resp.status());
    }

    /// Register an instance with a TTL check that starts passing.
    pub async fn register(&self, id: &str, service: &str, addr: SocketAddr, tags: &[&str]) {
        self.put(
            "/v1/agent/service/register",
            Some(serde_json::json!({
                "ID": id, "Name": service, "Address": addr.ip().to_string(), "Port": addr.port(),
                "Tags": tags,
                "Check": { "CheckID": format!("check-{id}"), "TTL": "10m", "Status": "passing" },
            })),
        )
        .await;
    }

    /// Register an instance whose service meta holds `meta` (no tags).
    pub async fn register_with_meta(
        &self,
        id: &str,
        service: &str,
        addr: SocketAddr,
        meta: serde_json::Value,
    ) {
        self.put(
            "/v1/agent/service/register",
            Some(serde_json::json!({
                "ID": id, "Name": service, "Address": addr.ip().to_string(), "Port": addr.port(),
                "Meta": meta,
                "Check": { "CheckID": format!("check-{id}"), "TTL": "10m", "Status": "passing" },
            })),
        )
        .await;
    }

    pub async fn deregister(&self, id: &str) {
        self.put(&format!("/v1/agent/service/deregister/{id}"), None)
            .await;
    }

    pub async fn set_check(&self, id: &str, passing: bool) {
        let what = if passing { "pass" } else { "fail" };
        self.put(&format!("/v1/agent/check/{what}/check-{id}"), None)
            .await;
    }
}

impl Drop for ConsulAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
