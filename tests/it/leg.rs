//! The proxy leg's edges, against upstreams that write their answers byte for byte: every
//! response framing (chunked, close-delimited, HEAD, 204, 304), a client that leaves while
//! the backend thinks, a backend that closes idle pooled connections at random, a large
//! response to a slow client, an upstream that answers before the request body is complete.
//! Requests without a body take the fast leg (vendor/patches 0027); the rest the general one.

use crate::common::site::*;
use crate::common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A raw upstream: each accepted connection is handed to `serve`; `conns` counts them.
struct Raw {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Raw {
    async fn start<F, Fut>(serve: F) -> Raw
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let counted = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        Raw { addr, conns, task }
    }
}

/// One request head off `s`: (method, path, the head's text), or None at EOF. Bytes after
/// the head (a body) stay unread in `buf` for the caller.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, String, String)> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let mut first = head.split_whitespace();
            let method = first.next()?.to_string();
            let path = first.next()?.to_string();
            return Some((method, path, head));
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The bytes each path answers with; `close` means the answer ends with the connection.
fn framed(method: &str, path: &str) -> (Vec<u8>, bool) {
    let (bytes, close): (&[u8], bool) = match path {
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            false,
        ),
        "/close" => (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nclose-delimited body",
            true,
        ),
        "/204" => (b"HTTP/1.1 204 No Content\r\nX-Kind: none\r\n\r\n", false),
        "/304" => (
            b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n",
            false,
        ),
        "/dated" => (
            b"HTTP/1.1 200 OK\r\nDate: Mon, 01 Jan 2001 00:00:00 GMT\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        "/len" if method == "HEAD" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
            false,
        ),
        _ => (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world", false),
    };
    (bytes.to_vec(), close)
}

async fn serve_framed(mut s: TcpStream) {
    let mut buf = Vec::new();
    while let Some((method, path, _)) = read_head(&mut s, &mut buf).await {
        let (bytes, close) = framed(&method, &path);
        if s.write_all(&bytes).await.is_err() || close {
            return;
        }
    }
}

#[tokio::test]
async fn every_response_framing_arrives_whole_over_h1_and_h2() {
    let up = Raw::start(serve_framed).await;
    let s = site(
        single_pool("", &format!("backends = [\"{}\"]", up.addr)),
        issue_a,
    )
    .await;
    let port = s.https.port();
    let h1 = reqwest::Client::builder()
        .add_root_certificate(s.ca.reqwest_cert())
        .resolve("a.test", s.https)
        .http1_only()
        .build()
        .unwrap();
    let h2 = client(&s.ca, s.https, &["a.test"]);
    for (c, version) in [
        (&h1, reqwest::Version::HTTP_11),
        (&h2, reqwest::Version::HTTP_2),
    ] {
        // twice each, so the second runs on the connections the first left (client's and
        // backend's): a framing the leg got wrong would corrupt the next answer
        for round in 0..2 {
            let url = |p: &str| format!("https://a.test:{port}{p}");
            let r = c.get(url("/chunked")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.version(), version);
            assert_eq!(
                r.text().await.unwrap(),
                "hello world",
                "chunked, round {round}"
            );

            let r = c.get(url("/close")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(
                r.text().await.unwrap(),
                "close-delimited body",
                "close-delimited, round {round}"
            );

            let r = c.get(url("/204")).send().await.unwrap();
            assert_eq!(r.status(), 204);
            assert_eq!(r.headers()["x-kind"], "none");
            assert_eq!(r.bytes().await.unwrap().len(), 0);

            let r = c.get(url("/304")).send().await.unwrap();
            assert_eq!(r.status(), 304);
            assert_eq!(r.headers()["etag"], "\"v1\"");
            assert_eq!(r.bytes().await.unwrap().len(), 0);

            let r = c.head(url("/len")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(
                r.headers()["content-length"],
                "1234",
                "HEAD keeps the length"
            );
            assert_eq!(r.bytes().await.unwrap().len(), 0);

            let r = c.get(url("/len")).send().await.unwrap();
            assert_eq!(r.text().await.unwrap(), "hello world");

            // tollgate's own Date (and, over HTTP/1, Connection) replace the backend's
            let r = c.get(url("/dated")).send().await.unwrap();
            let dates: Vec<_> = r.headers().get_all("date").iter().collect();
            assert_eq!(dates.len(), 1, "one Date: {dates:?}");
            assert_ne!(dates[0], "Mon, 01 Jan 2001 00:00:00 GMT");
            if version == reqwest::Version::HTTP_11 {
                let conn: Vec<_> = r.headers().get_all("connection").iter().collect();
                assert_eq!(conn, ["keep-alive"], "one Connection");
            }
            assert_eq!(r.text().await.unwrap(), "ok");
        }
    }
    // 2 clients x 2 rounds x 7 requests: the close-delimited answers cost a connection each
    // (4), the other 24 share the pooled ones
    let conns = up.conns.load(Ordering::SeqCst);
    assert!(
        (4..=8).contains(&conns),
        "{conns} upstream connections for 28 requests, 4 of them close-delimited"
    );
}

/// Until the backend has the request (a new connection since `before`), then 200 ms into
/// its thinking.
async fn thinking(up: &Raw, before: usize) {
    wait_for(
        "the request at the backend",
        Duration::from_secs(5),
        || async { up.conns.load(Ordering::SeqCst) > before },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_client_gone_while_the_backend_thinks_abandons_the_upstream_request() {
    // the backend takes the request, then waits (up to 10 s) for tollgate to hang up
    let hung_up: Arc<Mutex<Option<Duration>>> = Arc::default();
    let seen = hung_up.clone();
    let up = Raw::start(move |mut s| {
        let seen = seen.clone();
        async move {
            let mut buf = Vec::new();
            if read_head(&mut s, &mut buf).await.is_none() {
                return;
            }
            let took = Instant::now();
            let mut b = [0u8; 64];
            let eof = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await;
            if matches!(eof, Ok(Ok(0)) | Ok(Err(_))) {
                *seen.lock().unwrap() = Some(took.elapsed());
            }
        }
    })
    .await;
    let s = site(
        single_pool("", &format!("backends = [\"{}\"]", up.addr)),
        issue_a,
    )
    .await;
    for alpn in ["http/1.1", "h2"] {
        *hung_up.lock().unwrap() = None;
        let before = up.conns.load(Ordering::SeqCst);
        let path = format!("/think-{}", alpn.replace('/', ""));
        let started = Instant::now();
        if alpn == "h2" {
            let tls = tls_connect(&s.ca, s.https, "a.test", &["h2"]).await;
            let (mut h2c, conn) = h2::client::handshake(tls).await.unwrap();
            let driver = tokio::spawn(conn);
            let req = http::Request::get(format!("https://a.test{path}"))
                .body(())
                .unwrap();
            let (answer, _) = h2c.send_request(req, true).unwrap();
            thinking(&up, before).await;
            // the client resets its stream and goes
            drop(answer);
            drop(h2c);
            driver.abort();
        } else {
            let mut tls = tls_connect(&s.ca, s.https, "a.test", &["http/1.1"]).await;
            tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes())
                .await
                .unwrap();
            tls.flush().await.unwrap();
            thinking(&up, before).await;
            drop(tls);
        }
        wait_for(
            "tollgate hanging up on the backend",
            Duration::from_secs(5),
            || async { hung_up.lock().unwrap().is_some() },
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{alpn}: the upstream request was abandoned when the client left, not at a timeout"
        );
        wait_for("the access line", Duration::from_secs(5), || async {
            s.tg.log_text().contains(&path)
        })
        .await;
        let log = s.tg.log_text();
        let line = log.lines().find(|l| l.contains(&path)).unwrap();
        assert!(
            line.contains("the client went away"),
            "{alpn}: the access log says the client left: {line}"
        );
    }
}

/// A tiny xorshift: reproducible randomness without a dependency.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test]
async fn a_backend_closing_idle_connections_at_random_fails_no_request() {
    // after each answer the backend keeps the connection, or closes it while idle after
    // 0-20 ms (an idle timeout shorter than the client's pauses), at random
    let seed = Arc::new(AtomicUsize::new(0x9e37_79b9));
    let closed = Arc::new(AtomicUsize::new(0));
    let (sd, cl) = (seed.clone(), closed.clone());
    let up = Raw::start(move |mut s| {
        let mut rng = Rng(sd.fetch_add(0x6a09_e667, Ordering::SeqCst) as u64 | 1);
        let closed = cl.clone();
        async move {
            let mut buf = Vec::new();
            while read_head(&mut s, &mut buf).await.is_some() {
                let (bytes, _) = framed("GET", "/");
                if s.write_all(&bytes).await.is_err() {
                    return;
                }
                if rng.below(2) == 0 {
                    let idle = Duration::from_millis(rng.below(21));
                    // closes only if no next request came within its idle time
                    let mut b = [0u8; 1];
                    match tokio::time::timeout(idle, s.peek(&mut b)).await {
                        Err(_) => {
                            closed.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        Ok(Ok(0)) | Ok(Err(_)) => return,
                        Ok(Ok(_)) => {}
                    }
                }
            }
        }
    })
    .await;
    let s = site(
        single_pool("", &format!("backends = [\"{}\"]", up.addr)),
        issue_a,
    )
    .await;
    let c = client(&s.ca, s.https, &["a.test"]);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut failed = Vec::new();
    for i in 0..300 {
        let r = c
            .get(format!("https://a.test:{}/r{i}", s.https.port()))
            .send()
            .await;
        match r {
            Ok(r) if r.status() == 200 => assert_eq!(r.text().await.unwrap(), "hello world"),
            Ok(r) => failed.push(format!("{i}: {}", r.status())),
            Err(e) => failed.push(format!("{i}: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(rng.below(26))).await;
    }
    assert!(failed.is_empty(), "requests failed: {failed:?}");
    let closed = closed.load(Ordering::SeqCst);
    assert!(
        closed >= 50,
        "the backend closed only {closed} idle connections"
    );
    assert!(up.conns.load(Ordering::SeqCst) >= closed);
}

#[tokio::test]
async fn a_100_mb_response_to_a_slow_client_keeps_memory_bounded() {
    const SIZE: usize = 100 << 20;
    // the backend writes as fast as tollgate takes it
    let up = Raw::start(|mut s| async move {
        let mut buf = Vec::new();
        if read_head(&mut s, &mut buf).await.is_none() {
            return;
        }
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n");
        if s.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let block = vec![b'x'; 1 << 20];
        for _ in 0..SIZE >> 20 {
            if s.write_all(&block).await.is_err() {
                return;
            }
        }
    })
    .await;
    let s = site(
        single_pool("", &format!("backends = [\"{}\"]", up.addr)),
        issue_a,
    )
    .await;
    let pid = s.tg.child.id();
    let before = rss_kib(pid);
    let mut tls = tls_connect(&s.ca, s.https, "a.test", &["http/1.1"]).await;
    tls.write_all(b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    // read 64 KiB at a time with a pause after each MiB: ~100 pauses of 20 ms, a client
    // ~5x slower than the backend
    let mut got = 0usize;
    let mut head_done = false;
    let mut peak = before;
    let mut buf = vec![0u8; 64 << 10];
    let mut pending = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next_pause = 1usize << 20;
    while got < SIZE {
        assert!(
            Instant::now() < deadline,
            "the response in time ({got} bytes)"
        );
        let n = tls.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed after {got} bytes");
        if head_done {
            got += n;
        } else {
            pending.extend_from_slice(&buf[..n]);
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&pending[..end]).to_string();
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                got = pending.len() - end - 4;
                head_done = true;
            }
        }
        if got >= next_pause {
            next_pause += 1 << 20;
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(got, SIZE);
    let grew = peak.saturating_sub(before);
    assert!(
        grew < 32 << 10,
        "tollgate grew by {grew} KiB while a slow client read 100 MiB (from {before} KiB)"
    );
}

#[tokio::test]
async fn an_upstream_answering_before_the_request_body_is_complete() {
    // the backend refuses after the head, without waiting for the 4 MiB body, then reads
    // (and drops) the rest so the close is not a reset
    let up = Raw::start(|mut s| async move {
        let mut buf = Vec::new();
        let Some((method, _, _)) = read_head(&mut s, &mut buf).await else {
            return;
        };
        if method == "GET" {
            let _ = s.write_all(&framed("GET", "/").0).await;
            return;
        }
        let refusal = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!";
        if s.write_all(refusal).await.is_err() {
            return;
        }
        let mut sink = vec![0u8; 1 << 16];
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
    })
    .await;
    let s = site(
        single_pool("", &format!("backends = [\"{}\"]", up.addr)),
        issue_a,
    )
    .await;
    let c = client(&s.ca, s.https, &["a.test"]);
    let r = c
        .post(format!("https://a.test:{}/upload", s.https.port()))
        .body(vec![b'u'; 4 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.text().await.unwrap(), "too big!");
    // and the site still answers
    let r = c
        .get(format!("https://a.test:{}/after", s.https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello world");
}

#[tokio::test]
async fn a_pooled_connection_closed_under_the_request_is_retried_on_the_same_backend() {
    // the keep-alive race made certain: the backend answers a connection's first request
    // and closes it, unanswered, when the second arrives (as if its idle timer had fired
    // while the request was on the wire)
    let up = Raw::start(|mut s| async move {
        let mut buf = Vec::new();
        if read_head(&mut s, &mut buf).await.is_none() {
            return;
        }
        if s.write_all(&framed("GET", "/").0).await.is_err() {
            return;
        }
        let _ = read_head(&mut s, &mut buf).await;
        // dropped: closed with the second request unanswered
    })
    .await;
    // one backend: a retry can only go to the same one
    let s = site(
        single_pool("", &format!("backends = [\"{}\"]", up.addr)),
        issue_a,
    )
    .await;
    let c = client(&s.ca, s.https, &["a.test"]);
    let url = |p: &str| format!("https://a.test:{}{p}", s.https.port());
    for i in 0..3 {
        let r = c.get(url(&format!("/get{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "GET {i} retried on a new connection");
        assert_eq!(r.text().await.unwrap(), "hello world");
    }
    // first request: a new connection; each later one met a pooled connection that closed
    // under it, then a new one
    assert_eq!(up.conns.load(Ordering::SeqCst), 3);
    // the backend is not blamed: no ejection, the next request still goes to it
    let r = c.get(url("/after")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // a POST is not repeated (it may have been acted on): the client gets the failure
    let r = c.post(url("/post")).body("x").send().await.unwrap();
    assert_eq!(r.status(), 502, "a non-idempotent request is not retried");
}
