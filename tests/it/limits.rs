//! Limits against a real tollgate: connection caps per IP (127.0.0.1 against 127.0.0.2),
//! the per-IP connection rate, slowloris, size and smuggling refusals, HTTP/2 rapid reset and
//! the PROXY protocol. Every attack loop is bounded in count and time and targets loopback.

use crate::common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Site {
    tg: Tollgate,
    _dir: tempfile::TempDir,
    https: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
    ca: TestCa,
}

/// tollgate with an HTTPS and a plain listener (`listener_extra` goes into the plain one),
/// vhost a.test without the HTTPS redirect, `/` to `up`, `/small` capped at 16 body bytes.
async fn site(up: SocketAddr, limits: &str, listener_extra: &str) -> Site {
    site_with(up, limits, listener_extra, "").await
}

/// `site`, with `pool_extra` in pool `p`.
async fn site_with(up: SocketAddr, limits: &str, listener_extra: &str, pool_extra: &str) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    ca.issue(dir.path(), "a", &["a.test"], "a");
    let cfg = Config::new()
        .table("limits", limits)
        .https()
        .listener(
            SocketAddr::from(([127, 0, 0, 1], free_port())),
            false,
            listener_extra,
        )
        .vhost(
            one_vhost()
                .set("redirect_https", "false")
                .route("/", "p")
                .route_with("/small", "p", "max_body_size = 16"),
        )
        .pool("p", Pool::backends(&[up]).with(pool_extra));
    let tg = cfg.start(dir.path()).await;
    let (https, http) = (cfg.https_addr(), cfg.http_addr());
    let admin = SocketAddr::from(([127, 0, 0, 1], cfg.admin_port()));
    Site {
        tg,
        _dir: dir,
        https,
        http,
        admin,
        ca,
    }
}

impl Site {
    async fn metric(&self, line_prefix: &str) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {line_prefix} in\n{text}"))
    }

    /// Wait until exactly `n` client connections hold a slot.
    async fn wait_open(&self, n: usize) {
        let what = format!("{n} client connections to hold a slot");
        wait_for(&what, Duration::from_secs(10), || async move {
            self.metric("tollgate_connections_open").await == n as f64
        })
        .await;
    }

    fn cpu_seconds(&self) -> f64 {
        self.tg.cpu_seconds()
    }
}

/// Send `req` and read what comes back until the server closes or `wait` passes.
/// Returns (status code or 0, closed by the server).
async fn exchange<S>(mut s: S, req: &[u8], wait: Duration) -> (u16, bool, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = s.write_all(req).await;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = Instant::now() + wait;
    let mut closed = false;
    while Instant::now() < end {
        match tokio::time::timeout(end - Instant::now(), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, closed, text)
}

/// Is the connection closed by the server (EOF or reset) within `wait`, without an answer?
async fn refused<S: tokio::io::AsyncRead + Unpin>(s: &mut S, wait: Duration) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(wait, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n";

#[tokio::test]
async fn per_ip_cap_holds_one_address_and_not_another() {
    let up = Upstream::start("up").await;
    let s = site(up.addr, "max_connections_per_ip = 4", "").await;
    // the readiness probes must have given their slots back first
    s.wait_open(0).await;
    // four idle connections from 127.0.0.1 fill its slots (two plain, two TLS before any
    // handshake: the slot is taken at accept)
    let mut held = Vec::new();
    for i in 0..4 {
        let to = if i % 2 == 0 { s.http } else { s.https };
        held.push(connect_from([127, 0, 0, 1], to).await.unwrap());
    }
    s.wait_open(4).await;
    // the fifth from 127.0.0.1 is closed at once, on either listener
    let mut fifth = connect_from([127, 0, 0, 1], s.http).await.unwrap();
    let _ = fifth.write_all(GET).await;
    assert!(
        refused(&mut fifth, Duration::from_secs(3)).await,
        "over the cap, plain"
    );
    let tcp = connect_from([127, 0, 0, 1], s.https).await.unwrap();
    assert!(
        tls_over(&s.ca, tcp, "a.test", &["http/1.1"]).await.is_err(),
        "over the cap, TLS: no handshake"
    );
    // 127.0.0.2 is another client: unaffected, over both listeners
    for _ in 0..3 {
        let c = connect_from([127, 0, 0, 2], s.http).await.unwrap();
        let (status, _, _) = exchange(c, GET, Duration::from_millis(500)).await;
        assert_eq!(status, 200);
    }
    let tcp = connect_from([127, 0, 0, 2], s.https).await.unwrap();
    let tls = tls_over(&s.ca, tcp, "a.test", &["http/1.1"]).await.unwrap();
    assert_eq!(exchange(tls, GET, Duration::from_millis(500)).await.0, 200);
    assert!(
        s.metric("tollgate_connections_rejected_total{reason=\"max_connections_per_ip\"}")
            .await
            >= 2.0
    );
    // closing one gives its slot back
    held.pop();
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let c = connect_from([127, 0, 0, 1], s.http).await.unwrap();
        if exchange(c, GET, Duration::from_millis(300)).await.0 == 200 {
            ok = true;
            break;
        }
    }
    assert!(ok, "a slot came back after a connection closed");
    drop(held);
}

#[tokio::test]
async fn connection_rate_per_ip_is_a_token_bucket() {
    let up = Upstream::start("up").await;
    let s = site(
        up.addr,
        "connection_rate_per_ip = 2\nconnection_burst_per_ip = 5",
        "",
    )
    .await;
    // the burst (5) of new connections passes, then the bucket is empty
    let mut answered = 0;
    for _ in 0..8 {
        let c = connect_from([127, 0, 0, 1], s.http).await.unwrap();
        if exchange(c, GET, Duration::from_millis(300)).await.0 == 200 {
            answered += 1;
        }
    }
    // 5 from the burst, plus at most one refilled during the loop at 2/s
    assert!((5..=6).contains(&answered), "answered {answered} of 8");
    let c = connect_from([127, 0, 0, 2], s.http).await.unwrap();
    assert_eq!(
        exchange(c, GET, Duration::from_millis(300)).await.0,
        200,
        "127.0.0.2 has its own bucket"
    );
    // after a second, two more tokens
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let c = connect_from([127, 0, 0, 1], s.http).await.unwrap();
    assert_eq!(exchange(c, GET, Duration::from_millis(300)).await.0, 200);
    assert!(
        s.metric("tollgate_connections_rejected_total{reason=\"connection_rate_per_ip\"}")
            .await
            >= 2.0
    );
}

/// Slowloris: connections that trickle a header byte by byte are cut at the header
/// deadline, and a normal client is served while they all hold on. (What the attack costs
/// a normal client's p99 against an unattacked twin, and tollgate's CPU, is measured in
/// the release build by benches/attacks.rs: timings are not judged in the debug suite.)
#[tokio::test]
async fn slowloris_is_cut_at_the_header_deadline_while_others_are_served() {
    const HEADER_TIMEOUT: Duration = Duration::from_secs(4);
    const N: u32 = 200;
    let up = Upstream::start("up").await;
    let limits = format!(
        "header_timeout = \"{}s\"\nmax_connections_per_ip = 1000\nconnection_rate_per_ip = 0",
        HEADER_TIMEOUT.as_secs()
    );
    let s = site(up.addr, &limits, "").await;
    let c = client(&s.ca, s.https, &["a.test"]);
    let url = format!("https://a.test:{}/", s.https.port());
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    let give_up = HEADER_TIMEOUT + Duration::from_secs(6);
    let (ready, attack) = attack::slowloris(s.ca.pem.clone(), s.https, "a.test", N, give_up);
    let began = ready.await.expect("the attackers connected");
    // every attacker holds a slot, and the normal client is served meanwhile
    let mut answers = Vec::new();
    for _ in 0..20 {
        answers.push(c.get(&url).send().await.unwrap().status().as_u16());
    }
    let served_within = began.elapsed();
    let open = s.metric("tollgate_connections_open").await;
    let results = tokio::task::spawn_blocking(move || attack.join().unwrap())
        .await
        .unwrap();
    let cut: Vec<Duration> = results.into_iter().flatten().collect();
    let latest = cut.iter().max().copied().unwrap_or_default();
    eprintln!(
        "slowloris: {} of {N} cut, the last after {latest:?}; 20 requests served within \
         {served_within:?} of the attack, {open} connections open then",
        cut.len()
    );
    assert!(answers.iter().all(|s| *s == 200), "{answers:?}");
    assert!(
        served_within < HEADER_TIMEOUT,
        "the requests ran while every attacker still held its connection ({served_within:?})"
    );
    assert!(open > N as f64, "the attackers held their slots: {open}");
    assert_eq!(cut.len(), N as usize, "every trickling connection is cut");
    assert!(
        latest < HEADER_TIMEOUT + Duration::from_secs(4),
        "cut near the header deadline, not later: {latest:?}"
    );
}

#[tokio::test]
async fn oversized_and_smuggled_requests_are_refused_and_closed() {
    let up = Upstream::start("up").await;
    let s = site(
        up.addr,
        "max_headers = 20\nmax_header_bytes = 4096\nmax_request_line = 1024",
        "",
    )
    .await;
    let send = |req: Vec<u8>| {
        let http = s.http;
        async move {
            let c = tokio::net::TcpStream::connect(http).await.unwrap();
            exchange(c, &req, Duration::from_secs(3)).await
        }
    };
    // honest requests pass and keep the connection
    let (st, closed, _) = send(GET.to_vec()).await;
    assert_eq!((st, closed), (200, false));
    let (st, _, _) =
        send(b"POST /small HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello".to_vec())
            .await;
    assert_eq!(st, 200);

    let smuggling: &[&str] = &[
        "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5, 5\r\n\r\nhello",
        "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: +5\r\n\r\nhello",
        "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length : 5\r\n\r\nhello",
        "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.0\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a.test\r\nX-Folded: a\r\n b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
    ];
    let hits_before = up.hits();
    for req in smuggling {
        let (st, closed, text) = send(req.as_bytes().to_vec()).await;
        assert_eq!(st, 400, "{req:?} got {text:?}");
        assert!(closed, "{req:?}: the connection must close after the 400");
    }
    assert_eq!(up.hits(), hits_before, "none of them reached the upstream");

    let bad_host = send(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n".to_vec()).await;
    assert_eq!(bad_host.0, 400);
    let no_host = send(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await;
    assert_eq!(no_host.0, 400);

    // sizes
    let mut many = String::from("GET / HTTP/1.1\r\nHost: a.test\r\n");
    for i in 0..25 {
        many.push_str(&format!("X-H{i}: 1\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(send(many.into_bytes()).await.0, 431, "header count");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: {}\r\n\r\n",
        "b".repeat(5000)
    );
    assert_eq!(send(big.into_bytes()).await.0, 431, "header bytes");
    let mut flood = String::from("GET / HTTP/1.1\r\nHost: a.test\r\n");
    for i in 0..300 {
        flood.push_str(&format!("X-F{i}: 1\r\n"));
    }
    flood.push_str("\r\n");
    assert_eq!(
        send(flood.into_bytes()).await.0,
        431,
        "over pingora's own 256-header cap"
    );
    let long = format!("GET /{} HTTP/1.1\r\nHost: a.test\r\n\r\n", "u".repeat(2000));
    assert_eq!(send(long.into_bytes()).await.0, 414, "request line");
    let (st, closed, _) = send(
        b"POST /small HTTP/1.1\r\nHost: a.test\r\nContent-Length: 17\r\n\r\n01234567890123456"
            .to_vec(),
    )
    .await;
    assert_eq!(
        (st, closed),
        (413, true),
        "declared body over the route's cap"
    );
    let (st, _, text) = send(
        b"POST /small HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n".to_vec(),
    )
    .await;
    assert_eq!(st, 413, "streamed body over the route's cap: {text}");
}

#[tokio::test]
async fn idle_connections_and_stalled_bodies_are_cut() {
    let up = Upstream::start("up").await;
    let s = site(
        up.addr,
        "keepalive_timeout = \"1s\"\nbody_idle_timeout = \"1s\"\nhandshake_timeout = \"1s\"",
        "",
    )
    .await;
    // a TLS connection that never starts its handshake is cut after handshake_timeout
    let mut silent = tokio::net::TcpStream::connect(s.https).await.unwrap();
    let start = Instant::now();
    assert!(
        refused(&mut silent, Duration::from_secs(5)).await,
        "silent TLS connection cut"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "not before the deadline: {:?}",
        start.elapsed()
    );
    // keep-alive idle: answered, then closed about a second later
    let c = tokio::net::TcpStream::connect(s.http).await.unwrap();
    let start = Instant::now();
    let (st, closed, _) = exchange(c, GET, Duration::from_secs(5)).await;
    assert_eq!(st, 200);
    assert!(
        closed && start.elapsed() < Duration::from_secs(4),
        "idle keep-alive cut: {:?}",
        start.elapsed()
    );
    // a body that stops half way is cut after body_idle_timeout
    let c = tokio::net::TcpStream::connect(s.http).await.unwrap();
    let start = Instant::now();
    let (_, closed, _) = exchange(
        c,
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100\r\n\r\nonly-a-bit",
        Duration::from_secs(6),
    )
    .await;
    assert!(
        closed && start.elapsed() < Duration::from_secs(5),
        "stalled body cut: {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn h2_rapid_reset_is_cut_off_and_others_are_served() {
    let up = Upstream::start("up").await;
    let s = site(up.addr, "", "").await;
    let cpu_before = s.cpu_seconds();
    let r = attack::rapid_reset(&s.ca, s.https, "a.test", 20_000).await;
    let cpu = s.cpu_seconds() - cpu_before;
    eprintln!(
        "rapid reset: {} streams sent before the server stopped it; {cpu:.2} s of tollgate CPU; connection ended: {}",
        r.sent, r.ended
    );
    assert!(r.sent < 20_000, "the server ends a rapid-reset connection");
    assert!(r.goaway, "with a GOAWAY error");
    // what it cost in CPU is measured in the release build: benches/attacks.rs
    // and keeps serving everyone else
    let c = client(&s.ca, s.https, &["a.test"]);
    let r = c
        .get(format!("https://a.test:{}/", s.https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn proxy_protocol_sets_the_client_and_refuses_bad_headers() {
    let up = Upstream::start("up").await;
    let s = site(
        up.addr,
        "trusted_proxies = [\"127.0.0.1\"]\nmax_connections_per_ip = 2",
        "proxy_protocol = true",
    )
    .await;
    let xff = |text: &str| {
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        let start = body.find('{').unwrap_or(0);
        let v: serde_json::Value =
            serde_json::from_str(&body[start..body.rfind('}').unwrap() + 1]).unwrap();
        v["headers"]["x-forwarded-for"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    // v1
    let c = connect_from([127, 0, 0, 1], s.http).await.unwrap();
    let mut req = b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 80\r\n".to_vec();
    req.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
    let (st, _, text) = exchange(c, &req, Duration::from_secs(3)).await;
    assert_eq!(st, 200, "{text}");
    assert_eq!(xff(&text), "203.0.113.7");
    // v2, with the request in the same packet as the header
    let c = connect_from([127, 0, 0, 1], s.http).await.unwrap();
    let mut req = tollgate::limits::proxy_protocol::v2_header(
        "[2001:db8::9]:5000".parse().unwrap(),
        "[2001:db8::1]:80".parse().unwrap(),
    );
    req.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
    let (st, _, text) = exchange(c, &req, Duration::from_secs(3)).await;
    assert_eq!(st, 200, "{text}");
    assert_eq!(xff(&text), "2001:db8::9");
    // malformed headers: closed without an answer
    for bad in [
        &b"PROXY TCP4 203.0.113.7 192.0.2.1 99999 80\r\nGET / HTTP/1.1\r\n\r\n"[..],
        b"PROXY SPX 1 2 3 4\r\n",
        b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c",
    ] {
        let c = connect_from([127, 0, 0, 1], s.http).await.unwrap();
        let (st, closed, text) = exchange(c, bad, Duration::from_secs(3)).await;
        assert_eq!(
            (st, closed),
            (0, true),
            "{:?} got {text:?}",
            String::from_utf8_lossy(bad)
        );
    }
    // from an address not in trusted_proxies: closed, its header is not believed
    let c = connect_from([127, 0, 0, 2], s.http).await.unwrap();
    let (st, closed, _) = exchange(
        c,
        b"PROXY TCP4 198.51.100.1 192.0.2.1 1 80\r\nGET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!((st, closed), (0, true));
    // the per-IP cap counts the PROXY source: two held for 203.0.113.50, the third refused,
    // while another source through the same balancer is served
    s.wait_open(0).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = connect_from([127, 0, 0, 1], s.http).await.unwrap();
        c.write_all(b"PROXY TCP4 203.0.113.50 192.0.2.1 1 80\r\n")
            .await
            .unwrap();
        held.push(c);
    }
    s.wait_open(2).await;
    let c = connect_from([127, 0, 0, 1], s.http).await.unwrap();
    let (st, closed, _) = exchange(
        c,
        b"PROXY TCP4 203.0.113.50 192.0.2.1 2 80\r\nGET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!((st, closed), (0, true));
    let c = connect_from([127, 0, 0, 1], s.http).await.unwrap();
    let (st, _, _) = exchange(c, b"PROXY TCP4 203.0.113.51 192.0.2.1 2 80\r\nGET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n", Duration::from_secs(3)).await;
    assert_eq!(st, 200);
    assert!(
        s.metric("tollgate_connections_rejected_total{reason=\"bad_proxy_header\"}")
            .await
            >= 4.0
    );
    assert!(
        s.metric("tollgate_connections_rejected_total{reason=\"untrusted_proxy\"}")
            .await
            >= 1.0
    );
    drop(held);
}

/// HTTP/2 by hand over TLS, for a client that breaks rules a compliant client keeps.
struct RawH2 {
    s: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    /// The server's SETTINGS: (identifier, value).
    settings: Vec<(u16, u32)>,
}

type Frame = (u8, u8, u32, Vec<u8>);

impl RawH2 {
    async fn open(site: &Site) -> RawH2 {
        let mut s = tls_connect(&site.ca, site.https, "a.test", &["h2"]).await;
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut h = RawH2 {
            s,
            settings: Vec::new(),
        };
        h.send(4, 0, 0, &[]).await;
        // wait for the server's SETTINGS and acknowledge them: only acknowledged settings
        // bind the server
        for _ in 0..10 {
            let (ty, flags, _, payload) = h.next(Duration::from_secs(5)).await.expect("SETTINGS");
            if ty == 4 && flags & 1 == 0 {
                h.settings = payload
                    .chunks_exact(6)
                    .map(|c| {
                        (
                            u16::from_be_bytes([c[0], c[1]]),
                            u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                        )
                    })
                    .collect();
                h.send(4, 1, 0, &[]).await;
                return h;
            }
        }
        panic!("no SETTINGS from the server");
    }

    async fn send(&mut self, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        self.s.write_all(&f).await.unwrap();
    }

    async fn next(&mut self, wait: Duration) -> Option<Frame> {
        let mut head = [0u8; 9];
        tokio::time::timeout(wait, self.s.read_exact(&mut head))
            .await
            .ok()?
            .ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        self.s.read_exact(&mut payload).await.ok()?;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        Some((head[3], head[4], stream, payload))
    }

    fn setting(&self, id: u16) -> Option<u32> {
        self.settings
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, v)| *v)
    }
}

/// An HPACK integer with an `n`-bit prefix under `pattern`.
fn hpack_int(pattern: u8, n: u32, mut v: usize) -> Vec<u8> {
    let max = (1usize << n) - 1;
    if v < max {
        return vec![pattern | v as u8];
    }
    let mut out = vec![pattern | max as u8];
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
    out
}

fn hpack_str(s: &[u8]) -> Vec<u8> {
    let mut out = hpack_int(0, 7, s.len());
    out.extend_from_slice(s);
    out
}

/// A GET header block: static-table method and scheme, literal :path and :authority, and
/// `extra` as literal headers.
fn get_block(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![0x82, 0x87];
    b.extend(hpack_int(0x00, 4, 4));
    b.extend(hpack_str(path.as_bytes()));
    b.extend(hpack_int(0x00, 4, 1));
    b.extend(hpack_str(b"a.test"));
    for (k, v) in extra {
        b.push(0x00);
        b.extend(hpack_str(k.as_bytes()));
        b.extend(hpack_str(v.as_bytes()));
    }
    b
}

#[tokio::test]
async fn h2_stream_limit_refuses_streams_over_the_cap() {
    let up = Upstream::start("up").await;
    let s = site(up.addr, "h2_max_concurrent_streams = 3", "").await;
    let mut h = RawH2::open(&s).await;
    assert_eq!(h.setting(3), Some(3), "SETTINGS_MAX_CONCURRENT_STREAMS");
    // four streams at once to a slow path: the fourth is over the cap
    for id in [1, 3, 5, 7] {
        h.send(1, 0x5, id, &get_block("/sleep/2000", &[])).await;
    }
    let mut refused = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    while refused.is_empty() && Instant::now() < end {
        match h.next(Duration::from_secs(5)).await {
            Some((3, _, stream, payload)) => {
                let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                refused.push((stream, code));
            }
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(
        refused,
        vec![(7, 7)],
        "RST_STREAM(REFUSED_STREAM) on stream 7 only"
    );
    // the three streams within the cap are answered
    let mut answered = std::collections::BTreeSet::new();
    let end = Instant::now() + Duration::from_secs(10);
    while answered.len() < 3 && Instant::now() < end {
        match h.next(Duration::from_secs(5)).await {
            Some((1, _, stream, _)) => {
                answered.insert(stream);
            }
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(answered.into_iter().collect::<Vec<_>>(), vec![1, 3, 5]);
}

#[tokio::test]
async fn h2_header_list_over_the_limit_is_refused() {
    let up = Upstream::start("up").await;
    let s = site(up.addr, "h2_max_header_list_size = 1024", "").await;
    // up to 4x the limit: that stream is answered 431, the connection goes on
    let tls = tls_connect(&s.ca, s.https, "a.test", &["h2"]).await;
    let (h2c, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let url = format!("https://a.test:{}/", s.https.port());
    let mut h2c = h2c.ready().await.unwrap();
    for (header, want) in [("x".repeat(2000), 431), ("small".to_string(), 200)] {
        let req = http::Request::get(url.as_str())
            .header("x-h", header.as_str())
            .body(())
            .unwrap();
        let (resp, _) = h2c.send_request(req, true).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), want);
        h2c = h2c.ready().await.unwrap();
    }
    assert_eq!(up.hits(), 1, "only the small request reached the upstream");
    // 4x the limit or more is abuse: GOAWAY(ENHANCE_YOUR_CALM) and the connection ends
    // (sent by hand: a client library may refuse to send it)
    let mut h = RawH2::open(&s).await;
    assert_eq!(h.setting(6), Some(1024), "SETTINGS_MAX_HEADER_LIST_SIZE");
    let big = "x".repeat(8000);
    h.send(1, 0x5, 1, &get_block("/", &[("x-big", &big)])).await;
    let mut goaway = None;
    let end = Instant::now() + Duration::from_secs(5);
    while goaway.is_none() && Instant::now() < end {
        match h.next(Duration::from_secs(5)).await {
            Some((7, _, 0, payload)) => {
                goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()))
            }
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(goaway, Some(0xb), "GOAWAY(ENHANCE_YOUR_CALM)");
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn a_body_slower_than_min_body_rate_is_cut_with_408() {
    let up = Upstream::start("up").await;
    let s = site(
        up.addr,
        "min_body_rate = 2000\nmin_body_rate_after = \"1s\"",
        "",
    )
    .await;
    let head = b"POST /drain HTTP/1.1\r\nHost: a.test\r\nContent-Length: 20000\r\n\r\n";
    // a fast body of the same size is served
    let mut fast = tokio::net::TcpStream::connect(s.http).await.unwrap();
    fast.write_all(b"POST /drain HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\nContent-Length: 20000\r\n\r\n")
        .await
        .unwrap();
    fast.write_all(&[b'a'; 20000]).await.unwrap();
    let (status, _, body) = exchange(fast, b"", Duration::from_secs(5)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"body_len\":20000"), "{body}");
    // 200 bytes every 250 ms: 800 B/s, under the 2000 B/s floor once the 1 s grace is over
    let mut slow = tokio::net::TcpStream::connect(s.http).await.unwrap();
    slow.write_all(head).await.unwrap();
    let started = Instant::now();
    let mut cut = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if slow.write_all(&[b'b'; 200]).await.is_err() {
            cut = true;
            break;
        }
        let mut buf = [0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await
        {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
            cut = true;
            break;
        }
    }
    let took = started.elapsed();
    assert!(cut, "the slow body was not cut");
    assert!(
        took > Duration::from_millis(900) && took < Duration::from_secs(4),
        "cut after {took:?} (grace 1 s)"
    );
}

#[tokio::test]
async fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
    let up = Upstream::start("up").await;
    let s = site(
        up.addr,
        "trusted_proxies = [\"127.0.0.1/32\"]\nx_forwarded_for = true",
        "",
    )
    .await;
    let seen = |from: [u8; 4]| {
        let http = s.http;
        async move {
            let c = reqwest::Client::builder()
                .no_proxy()
                .local_address(std::net::IpAddr::from(from))
                .build()
                .unwrap();
            let v: serde_json::Value = c
                .get(format!("http://{http}/"))
                .header("host", "a.test")
                .header("x-forwarded-for", "198.51.100.1, 203.0.113.9, 127.0.0.1")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["headers"]["x-forwarded-for"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    // from the trusted balancer: the nearest address that is not a trusted proxy
    assert_eq!(seen([127, 0, 0, 1]).await, "203.0.113.9");
    // from anyone else: the socket peer; the header it sent is not believed
    assert_eq!(seen([127, 0, 0, 2]).await, "127.0.0.2");
    // the access line is written after the answer: wait for it
    wait_for(
        "the access log to name the real client",
        Duration::from_secs(5),
        || async { s.tg.log_text().contains("client=203.0.113.9") },
    )
    .await;
}

/// An HTTP/2 request whose HEADERS announce a 10-byte body that never comes.
async fn h2_stalled_post(
    h2c: &mut h2::client::SendRequest<bytes::Bytes>,
) -> (Option<u16>, Duration) {
    let req = http::Request::builder()
        .method("POST")
        .uri("https://a.test/drain")
        .header("content-length", "10")
        .body(())
        .unwrap();
    let start = Instant::now();
    let (resp, _body) = h2c.send_request(req, false).unwrap();
    let status = match tokio::time::timeout(Duration::from_secs(15), resp).await {
        Ok(Ok(r)) => Some(r.status().as_u16()),
        _ => None, // reset
    };
    (status, start.elapsed())
}

#[tokio::test]
async fn a_client_that_never_sends_its_body_is_cut_and_no_backend_is_blamed() {
    let up = Upstream::start("up").await;
    // 1. HTTP/2 bodies have body_idle_timeout too
    let s = site(up.addr, "body_idle_timeout = \"1s\"", "").await;
    let tls = tls_connect(&s.ca, s.https, "a.test", &["h2"]).await;
    let (mut h2c, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let (status, took) = h2_stalled_post(&mut h2c).await;
    assert!(
        matches!(status, Some(408) | None),
        "the client's stall is answered 408 or reset: {status:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "cut after body_idle_timeout, not the pool's read_timeout: {took:?}"
    );
    drop(s);

    // 2. a pool read_timeout shorter than body_idle_timeout: the upstream timeout while the
    // client still owes body is the client's 408, and never ejects the backend
    let s = site_with(
        up.addr,
        "body_idle_timeout = \"30s\"",
        "",
        "read_timeout = \"1s\"\nmax_fails = 2",
    )
    .await;
    let tls = tls_connect(&s.ca, s.https, "a.test", &["h2"]).await;
    let (h2c, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let stalls = (0..4).map(|_| {
        let mut c = h2c.clone();
        async move { h2_stalled_post(&mut c).await }
    });
    for (status, took) in futures_util::future::join_all(stalls).await {
        assert_eq!(status, Some(408), "h2 stall after {took:?}");
    }
    let h1_stalls = (0..4).map(|_| async {
        let c = tokio::net::TcpStream::connect(s.http).await.unwrap();
        exchange(
            c,
            b"POST /drain HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\nabc",
            Duration::from_secs(10),
        )
        .await
    });
    for (status, closed, text) in futures_util::future::join_all(h1_stalls).await {
        assert_eq!((status, closed), (408, true), "{text}");
        assert!(!text.to_ascii_lowercase().contains("pingora"), "{text}");
    }
    // eight client stalls against max_fails = 2: the backend still serves everyone else
    let c = tokio::net::TcpStream::connect(s.http).await.unwrap();
    let (status, _, text) = exchange(c, GET, Duration::from_secs(3)).await;
    assert_eq!(status, 200, "backend not ejected: {text}");
    assert_eq!(
        s.metric("tollgate_backend_ejections_total").await,
        0.0,
        "no ejection"
    );
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let up = Upstream::start("up").await;
    let s = site(up.addr, "", "").await;
    let c = tokio::net::TcpStream::connect(s.http).await.unwrap();
    let three = b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n\
GET /two HTTP/1.1\r\nHost: a.test\r\n\r\n\
GET /three HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
    let (status, closed, text) = exchange(c, three, Duration::from_secs(5)).await;
    assert_eq!((status, closed), (200, true));
    assert_eq!(text.matches("HTTP/1.1 200").count(), 3, "{text}");
    let at = |p: &str| {
        text.find(&format!("\"path\":\"{p}\""))
            .unwrap_or_else(|| panic!("{p} not answered: {text}"))
    };
    assert!(
        at("/one") < at("/two") && at("/two") < at("/three"),
        "{text}"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_send_timeout() {
    let up = Upstream::start("up").await;
    let s = site(up.addr, "send_timeout = \"1s\"", "").await;
    let mut c = tokio::net::TcpStream::connect(s.http).await.unwrap();
    c.write_all(b"GET /bytes/67108864 HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    // not reading: the connection's slot is given back once send_timeout passes
    s.wait_open(1).await;
    s.wait_open(0).await;
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let end = Instant::now() + Duration::from_secs(10);
    let eof = loop {
        match tokio::time::timeout(end - Instant::now(), c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => total += n,
            Err(_) => break false,
        }
    };
    assert!(eof, "closed by tollgate");
    assert!(total < 64 << 20, "the 64 MiB answer was cut: {total} bytes");
}

#[tokio::test]
async fn idle_and_ping_only_h2_connections_are_closed() {
    let up = Upstream::start("up").await;
    let s = site(up.addr, "keepalive_timeout = \"1s\"", "").await;
    // after the preface and SETTINGS, nothing
    let mut idle = RawH2::open(&s).await;
    let start = Instant::now();
    while idle.next(Duration::from_secs(6)).await.is_some() {}
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "idle h2 connection closed: {:?}",
        start.elapsed()
    );
    // PING every 100 ms and nothing else: still closed
    let mut ping = RawH2::open(&s).await;
    let start = Instant::now();
    let mut closed = false;
    while start.elapsed() < Duration::from_secs(6) {
        let mut f = vec![0, 0, 8, 6, 0, 0, 0, 0, 0];
        f.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        if ping.s.write_all(&f).await.is_err() {
            closed = true;
            break;
        }
        let mut b = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(100), ping.s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            _ => {}
        }
    }
    assert!(
        closed && start.elapsed() < Duration::from_secs(5),
        "PING-only h2 connection closed: {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn client_caused_failures_are_logged_calmly_and_answers_do_not_name_pingora() {
    let up = Upstream::start("up").await;
    let s = site(up.addr, "", "").await;
    // a refusal pingora answers itself: no Server: Pingora, and an access line with a reason
    let c = tokio::net::TcpStream::connect(s.http).await.unwrap();
    let (status, _, text) = exchange(
        c,
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(status, 400);
    assert!(!text.to_ascii_lowercase().contains("pingora"), "{text}");
    let c = tokio::net::TcpStream::connect(s.http).await.unwrap();
    let (status, _, _) = exchange(
        c,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Folded: a\r\n b\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(status, 400);
    // what the failover self-probe does to a TLS listener, and what scanners do
    for _ in 0..5 {
        drop(tokio::net::TcpStream::connect(s.https).await.unwrap());
        let mut c = tokio::net::TcpStream::connect(s.https).await.unwrap();
        let _ = c.write_all(b"\x16\x03\x01\x00\x05hello-not-tls").await;
        let _ = refused(&mut c, Duration::from_secs(2)).await;
    }
    // h2 garbage after the preface, and a reset in the middle of a request
    let mut h = RawH2::open(&s).await;
    h.send(0x0, 0, 1, b"data on an idle stream").await;
    while h.next(Duration::from_secs(2)).await.is_some() {}
    let mut c = tokio::net::TcpStream::connect(s.http).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: a.").await.unwrap();
    drop(c);
    let refused_line = |log: &str| {
        log.lines().any(|l| {
            l.contains(" access: ") && l.contains("status=400") && l.contains("Content-Length")
        })
    };
    wait_for(
        "the access line of the refused request",
        Duration::from_secs(5),
        || async { refused_line(&s.tg.log_text()) },
    )
    .await;
    let log = s.tg.log_text();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(
        errors.is_empty(),
        "client-caused events logged as errors: {errors:#?}"
    );
}

/// The soft and hard open-file limits of a running process, from /proc.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

#[tokio::test]
async fn the_open_file_limit_is_raised_to_the_hard_limit_or_the_shortfall_said() {
    // started as a service manager would (systemd's default soft limit is 1024; 256 here)
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::new()
        .no_admin()
        .http()
        .vhost(Vhost::default_vhost().route("/", "p"))
        .pool("p", Pool::backends(&[dead_addr()]));
    let http = cfg.http_addr();
    let path = dir.path().join("tollgate.toml");
    cfg.write(&path);
    let (_, hard) = open_file_limits(std::process::id());
    let wrapped = |limit: &str| {
        let mut c = std::process::Command::new("sh");
        c.args([
            "-c",
            &format!("ulimit {limit} && exec \"$0\" \"$@\""),
            Tollgate::bin(),
        ]);
        c
    };
    let mut tg = Tollgate::start_cmd(wrapped("-Sn 256"), &path);
    tg.ready(http).await;
    assert_eq!(
        open_file_limits(tg.child.id()),
        (hard, hard),
        "the soft limit is raised to the hard one"
    );
    if hard >= 10_000 + 1024 * 2 + 256 {
        assert!(
            tg.log_text().contains("open-file limit raised"),
            "{}",
            tg.log_text()
        );
    }
    drop(tg);

    // a hard limit below what the configuration can hold open: said at start
    let path2 = dir.path().join("low.toml");
    cfg.write(&path2);
    let mut tg = Tollgate::start_cmd(wrapped("-n 256"), &path2);
    tg.ready(http).await;
    assert_eq!(open_file_limits(tg.child.id()), (256, 256));
    let log = tg.log_text();
    assert!(
        log.contains("the open-file limit is below what limits.max_connections")
            && log.contains("open_files=256"),
        "{log}"
    );
}
