//! The request phases in process: a Snapshot built from TOML, a pingora session over an
//! in-memory stream (`tokio::io::duplex`), and tollgate's `ProxyHttp` phases called as
//! pingora calls them. What these show needs no process, no socket and no backend: routing
//! and local answers, the request sent upstream, the peer chosen, the access-log line.

use super::*;
use crate::config::Config;
use crate::state::{Lasting, State};
use pingora::proxy::{ProxyHttp, Session};
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A tollgate with the routing of `toml` (no listener is opened: the file's listeners are
/// only parsed), and a certificate for its TLS listener's names in `tls.certs_dir`.
fn tollgate(toml: &str) -> Tollgate {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-phases-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    crate::tls::write_dev_cert(&["a.test".into(), "secure.test".into()], &dir).unwrap();
    let toml = format!("[tls]\ncerts_dir = \"{}\"\n{toml}", dir.display());
    let cfg = Config::parse(Path::new("t.toml"), &toml).expect("a valid configuration");
    let state = State::new(cfg, Lasting::new()).expect("a Snapshot");
    // the Snapshot holds the certificate now
    std::fs::remove_dir_all(&dir).ok();
    Tollgate::new(
        state.handle(),
        true,
        ActiveRequests::default(),
        Default::default(),
    )
}

const SITE: &str = r#"
[[listener]]
address = "127.0.0.1:1"

[[listener]]
address = "127.0.0.1:2"
tls = true

[[vhost]]
names = ["a.test"]
redirect_https = false
[[vhost.route]]
path = "/"
pool = "web"
[[vhost.route]]
path = "/api"
pool = "api"

[[vhost]]
names = ["secure.test"]
[[vhost.route]]
path = "/"
pool = "web"

[pool.web]
backends = ["127.0.0.1:9001"]

[pool.api]
backends = ["127.0.0.1:9002"]
"#;

/// What one request came to.
struct Outcome {
    /// Whether tollgate answered it itself (`request_filter` returned true).
    answered: bool,
    /// What the client received (an answer of tollgate's), as text.
    written: String,
    /// The request as it would go upstream, and the backend chosen (when it was not
    /// answered).
    upstream: Option<(RequestHeader, std::net::SocketAddr)>,
    /// The access-log line.
    log: String,
}

/// Run `raw` (one HTTP/1.1 request) through the request phases, as pingora does: read the
/// header, `request_filter`, then `upstream_peer` and `upstream_request_filter` when it goes
/// upstream, then `logging`.
async fn run(t: &Tollgate, raw: &str) -> Outcome {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    client.write_all(raw.as_bytes()).await.unwrap();
    let mut session = Session::new_h1(Box::new(server));
    assert!(session.read_request().await.unwrap(), "a request header");
    let mut ctx = t.new_ctx();
    let answered = t.request_filter(&mut session, &mut ctx).await.unwrap();
    let mut upstream = None;
    if !answered {
        let peer = t.upstream_peer(&mut session, &mut ctx).await.unwrap();
        let mut req = session.req_header().clone();
        t.upstream_request_filter(&mut session, &mut req, &mut ctx)
            .await
            .unwrap();
        let addr = peer._address.as_inet().copied().expect("an inet backend");
        upstream = Some((req, addr));
    }
    let log = capture_log(async {
        t.logging(&mut session, None, &mut ctx).await;
    })
    .await;
    drop(session);
    let mut written = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        client.read_to_end(&mut written),
    )
    .await;
    Outcome {
        answered,
        written: String::from_utf8_lossy(&written).into_owned(),
        upstream,
        log,
    }
}

/// What `f` logs (the access log's target included), as text.
async fn capture_log(f: impl std::future::Future<Output = ()>) -> String {
    #[derive(Clone, Default)]
    struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let out = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || out.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    f.await;
    let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    text
}

/// A field of the request sent upstream: in the header maps, or among the fields tollgate
/// appends on the wire after them (vendor/patches 0028), as the backend would read it.
fn header<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
    req.headers
        .get(name)
        .or_else(|| {
            req.on_wire()
                .iter()
                .find(|f| f.name.as_str().eq_ignore_ascii_case(name))
                .map(|f| &f.value)
        })
        .and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn a_routed_request_goes_to_its_pool_with_the_proxy_headers_and_is_logged() {
    let t = tollgate(SITE);
    let o = run(
        &t,
        "GET /page?q=1 HTTP/1.1\r\nHost: a.test\r\nX-Request-Id: abc-123\r\n\r\n",
    )
    .await;
    assert!(!o.answered, "{}", o.written);
    let (req, backend) = o.upstream.unwrap();
    assert_eq!(backend, "127.0.0.1:9001".parse().unwrap());
    assert_eq!(req.uri.path(), "/page");
    assert_eq!(req.uri.query(), Some("q=1"));
    assert_eq!(header(&req, "x-forwarded-host"), Some("a.test"));
    assert_eq!(header(&req, "x-forwarded-proto"), Some("http"));
    // a client's request id is kept (and would be answered with)
    assert_eq!(header(&req, "x-request-id"), Some("abc-123"));
    assert!(o.log.contains("access"), "{}", o.log);
    assert!(o.log.contains("abc-123"), "{}", o.log);
}

#[tokio::test]
async fn the_longest_prefix_wins_and_spoofed_forwarding_headers_are_replaced() {
    let t = tollgate(SITE);
    let o = run(
        &t,
        "GET /api/users/7 HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-Prefix: /admin\r\n\
         X-Forwarded-Host: evil.test\r\n\r\n",
    )
    .await;
    let (req, backend) = o.upstream.unwrap();
    assert_eq!(backend, "127.0.0.1:9002".parse().unwrap());
    assert_eq!(req.uri.path(), "/api/users/7");
    // what the client claimed is not passed on as tollgate's word
    assert_eq!(header(&req, "x-forwarded-prefix"), None);
    assert_eq!(header(&req, "x-forwarded-host"), Some("a.test"));
    // a request id is made when the client sent none
    assert!(header(&req, "x-request-id").is_some_and(|v| !v.is_empty()));
    // `/apix` is not under `/api`: segment boundaries
    let o = run(&t, "GET /apix HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    assert_eq!(o.upstream.unwrap().1, "127.0.0.1:9001".parse().unwrap());
}

#[tokio::test]
async fn local_answers_421_308_and_400_are_written_and_logged_with_their_reason() {
    let t = tollgate(SITE);
    // no vhost for the host
    let o = run(&t, "GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n").await;
    assert!(o.answered);
    assert!(o.written.starts_with("HTTP/1.1 421"), "{}", o.written);
    assert!(o.written.contains("no virtual host for this host name"));
    assert!(o.log.contains("status=421"), "{}", o.log);
    // plain HTTP to a vhost that wants HTTPS: to the TLS listener's port
    let o = run(&t, "GET /x?y=1 HTTP/1.1\r\nHost: secure.test\r\n\r\n").await;
    assert!(o.written.starts_with("HTTP/1.1 308"), "{}", o.written);
    assert!(
        o.written
            .to_ascii_lowercase()
            .contains("location: https://secure.test:2/x?y=1"),
        "{}",
        o.written
    );
    // a path tollgate refuses to route (an encoded slash)
    let o = run(&t, "GET /a%2fb HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    assert!(o.written.starts_with("HTTP/1.1 400"), "{}", o.written);
    assert!(o.log.contains("status=400"), "{}", o.log);
    // a request without a Host
    let o = run(&t, "GET / HTTP/1.1\r\n\r\n").await;
    assert!(o.written.starts_with("HTTP/1.1 400"), "{}", o.written);
}
