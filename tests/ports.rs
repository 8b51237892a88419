//! Service ports through the real tollgate binary: TCP (a real Redis and its client), PROXY
//! headers seen by the backend, half-close, backpressure against a slow reader, UDP (a real
//! DNS server, dnsmasq, asked by dig), TLS termination and TLS passthrough by SNI.

mod common;
use common::*;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// tollgate with `body` (ports and pools) and an admin port; `{dir}` is the temp dir.
struct Site {
    tg: Tollgate,
    _dir: tempfile::TempDir,
    admin: u16,
}

async fn site(body: &str, ready: &[SocketAddr]) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = format!(
        "[server]\nthreads = 2\nshutdown_timeout = \"5s\"\n[admin]\naddress = \"127.0.0.1:{admin}\"\n{}",
        body.replace("{dir}", &dir.path().display().to_string())
    );
    let path = dir.path().join("tollgate.toml");
    write(&path, &cfg);
    let mut tg = Tollgate::start(&path);
    tg.ready(SocketAddr::from(([127, 0, 0, 1], admin))).await;
    for a in ready {
        tg.ready(*a).await;
    }
    Site {
        tg,
        _dir: dir,
        admin,
    }
}

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A real redis-server on `port`, no persistence; killed when dropped.
struct Redis(Child, SocketAddr);

impl Redis {
    async fn start() -> Redis {
        let a = addr();
        let child = Command::new("redis-server")
            .args(["--port", &a.port().to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/install-deps test installs it)");
        wait_for("redis to listen", Duration::from_secs(10), || async {
            TcpStream::connect(a).await.is_ok()
        })
        .await;
        Redis(child, a)
    }
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One RESP command on an open connection; the reply's first line (and a bulk's body).
async fn redis(c: &mut TcpStream, cmd: &str) -> std::io::Result<String> {
    c.write_all(format!("{cmd}\r\n").as_bytes()).await?;
    let mut buf = vec![0u8; 8192];
    let mut got = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("timed out"))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        // a simple reply is one line; a bulk reply is $len then the body
        if let Some(rest) = text.strip_prefix('$') {
            if let Some((len, body)) = rest.split_once("\r\n") {
                let len: i64 = len.parse().unwrap_or(-1);
                if len < 0 || body.len() >= len as usize + 2 {
                    return Ok(body.trim_end().to_string());
                }
            }
        } else if text.ends_with("\r\n") {
            return Ok(text.trim_end().to_string());
        }
    }
}

/// The port of the Redis a connection reached.
async fn redis_port(c: &mut TcpStream) -> u16 {
    let info = redis(c, "INFO server").await.unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("tcp_port:"))
        .and_then(|p| p.trim().parse().ok())
        .unwrap()
}

/// A real Redis client (redis-cli) and raw sessions through a TCP port: a session keeps its
/// backend, connections spread over both, and when one Redis is killed its clients
/// reconnect through the same port to the other.
#[tokio::test]
async fn a_tcp_port_carries_redis_sessions_and_survives_a_killed_backend() {
    let mut r1 = Redis::start().await;
    let r2 = Redis::start().await;
    let port = addr();
    let s = site(
        &format!(
            "[[port]]\nname = \"redis\"\naddress = \"{port}\"\npool = \"redis\"\n\
             [pool.redis]\nbackends = [\"{}\", \"{}\"]\nretries = 1\nconnect_timeout = \"500ms\"\n",
            r1.1, r2.1
        ),
        &[port],
    )
    .await;
    // the real client
    let out = Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.port().to_string(),
            "SET",
            "k",
            "v1",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    // round robin: two sessions land on both backends; each keeps its own
    let mut a = TcpStream::connect(port).await.unwrap();
    let mut b = TcpStream::connect(port).await.unwrap();
    let (pa, pb) = (redis_port(&mut a).await, redis_port(&mut b).await);
    assert_ne!(pa, pb, "two connections, two backends");
    for i in 0..20 {
        assert_eq!(redis(&mut a, &format!("SET a {i}")).await.unwrap(), "+OK");
        assert_eq!(redis(&mut a, "GET a").await.unwrap(), i.to_string());
        assert_eq!(
            redis_port(&mut a).await,
            pa,
            "a session stays on its backend"
        );
    }
    // kill r1: the session on it ends; reconnecting lands on r2, every time
    r1.kill();
    let (on_r1, other) = if pa == r1.1.port() {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert!(
        redis(on_r1, "PING").await.is_err(),
        "the killed backend's session ends"
    );
    assert_eq!(
        redis(other, "PING").await.unwrap(),
        "+PONG",
        "the other session goes on"
    );
    for _ in 0..6 {
        let mut c = TcpStream::connect(port).await.unwrap();
        assert_eq!(redis(&mut c, "PING").await.unwrap(), "+PONG");
        assert_eq!(redis_port(&mut c).await, r2.1.port());
    }
    let metrics = admin_text(&plain(), s.admin, "/metrics").await;
    assert!(
        metrics.contains("tollgate_port_connect_failures_total{port=\"redis\"}"),
        "{metrics}"
    );
    let failures = metric(
        &metrics,
        "tollgate_port_connect_failures_total{port=\"redis\"}",
    );
    assert!(failures >= 1.0, "{metrics}");
    assert!(metric(&metrics, "tollgate_port_connections_total{port=\"redis\"}") >= 9.0);
    assert!(
        metric(
            &metrics,
            "tollgate_port_received_bytes_total{port=\"redis\"}"
        ) > 0.0
    );
}

fn plain() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in {text}"))
}

/// A backend that reads a PROXY header, then everything up to the client's half-close,
/// and answers with what it saw before closing.
async fn proxy_aware_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut all = Vec::new();
                let _ = s.read_to_end(&mut all).await; // until the client's FIN
                let answer = match tollgate::limits::proxy_protocol::parse(&all) {
                    Ok(tollgate::limits::proxy_protocol::Parsed::Done { len, source }) => {
                        format!(
                            "source={} body={}",
                            source.map(|s| s.to_string()).unwrap_or_default(),
                            String::from_utf8_lossy(&all[len..])
                        )
                    }
                    _ => format!("no header body={}", String::from_utf8_lossy(&all)),
                };
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    a
}

/// PROXY v1 and v2 towards the backend carry the client's address; a client that
/// half-closes still gets the backend's answer.
#[tokio::test]
async fn backends_see_the_client_in_a_proxy_header_and_half_close_works() {
    let backend = proxy_aware_backend().await;
    let (v1, v2, none) = (addr(), addr(), addr());
    let _s = site(
        &format!(
            "[[port]]\naddress = \"{v1}\"\npool = \"b\"\nsend_proxy = \"v1\"\n\
             [[port]]\naddress = \"{v2}\"\npool = \"b\"\nsend_proxy = \"v2\"\n\
             [[port]]\naddress = \"{none}\"\npool = \"b\"\n\
             [pool.b]\nbackends = [\"{backend}\"]\n"
        ),
        &[v1, v2, none],
    )
    .await;
    for (port, want) in [(v1, true), (v2, true), (none, false)] {
        let mut c = TcpStream::connect(port).await.unwrap();
        let me = c.local_addr().unwrap();
        c.write_all(b"ping").await.unwrap();
        c.shutdown().await.unwrap(); // half-close: the answer still comes
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        if want {
            assert_eq!(answer, format!("source={me} body=ping"), "{port}");
        } else {
            assert_eq!(answer, "no header body=ping");
        }
    }
}

/// A fast backend and a client that reads slowly: the copy is held back by the client
/// (backpressure), so the backend can only write a little ahead and tollgate's memory stays
/// flat, instead of buffering the backend's 256 MiB.
#[tokio::test]
async fn a_slow_reader_holds_back_a_fast_backend() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    // every connection gets the flood; `written` counts the latest one's (the readiness
    // probe's connection comes first and ends at once)
    type Counter = std::sync::Arc<std::sync::atomic::AtomicUsize>;
    let current: std::sync::Arc<std::sync::Mutex<Counter>> = Default::default();
    let cur = current.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let w = Counter::default();
            *cur.lock().unwrap() = w.clone();
            tokio::spawn(async move {
                let chunk = vec![b'x'; 64 * 1024];
                for _ in 0..4096 {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                    w.fetch_add(chunk.len(), std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    let port = addr();
    let s = site(
        &format!(
            "[[port]]\naddress = \"{port}\"\npool = \"b\"\n[pool.b]\nbackends = [\"{backend}\"]\n"
        ),
        &[port],
    )
    .await;
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", s.tg.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
    };
    let before = rss();
    let mut c = TcpStream::connect(port).await.unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    let mut read = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        read += c.read(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let written = current
        .lock()
        .unwrap()
        .load(std::sync::atomic::Ordering::SeqCst);
    let ahead = written.saturating_sub(read);
    assert!(read > 0);
    // socket buffers on both sides plus tollgate's 16 KiB per direction
    assert!(
        ahead < 32 << 20,
        "the backend got {ahead} bytes ahead of the reader"
    );
    let grew = rss().saturating_sub(before);
    assert!(grew < 16 * 1024, "tollgate grew by {grew} kB");
}

/// A real DNS server (dnsmasq) behind a UDP port, asked by a real client (dig); per client
/// a flow keeps one backend; `max_flows` caps the clients at once.
#[tokio::test]
async fn a_udp_port_carries_dns_and_keeps_flows() {
    let dns = addr();
    let mut dnsmasq = Command::new("dnsmasq")
        .args([
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
        ])
        .args([
            "--listen-address=127.0.0.1",
            &format!("--port={}", dns.port()),
        ])
        .args(["--address=/svc.test/10.9.8.7", "--user=root", "--pid-file"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq (scripts/install-deps test installs it)");
    // two UDP echo backends that answer with their name
    let mut echoes = Vec::new();
    for name in ["e1", "e2"] {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        echoes.push(s.local_addr().unwrap());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let mut answer = name.as_bytes().to_vec();
                answer.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&answer, from).await;
            }
        });
    }
    let (dns_port, echo_port) = (addr(), addr());
    let s = site(
        &format!(
            "[[port]]\nname = \"dns\"\naddress = \"{dns_port}\"\nprotocol = \"udp\"\npool = \"dns\"\n\
             [[port]]\nname = \"echo\"\naddress = \"{echo_port}\"\nprotocol = \"udp\"\npool = \"echo\"\nmax_flows = 2\nidle_timeout = \"1s\"\n\
             [pool.dns]\nbackends = [\"{dns}\"]\n[pool.echo]\nbackends = [\"{}\", \"{}\"]\n",
            echoes[0], echoes[1]
        ),
        &[],
    )
    .await;
    wait_for("dig through the port", Duration::from_secs(10), || async {
        let out = Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &dns_port.port().to_string(),
                "svc.test",
                "+short",
                "+time=1",
                "+tries=1",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "10.9.8.7"
    })
    .await;
    // affinity: one client, one backend, for as long as it keeps sending
    let ask = |sock: std::sync::Arc<UdpSocket>| async move {
        sock.send_to(b"hi", echo_port).await.unwrap();
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) => {
                assert_eq!(from, echo_port, "replies come from the port's address");
                Some(String::from_utf8_lossy(&buf[..n]).to_string())
            }
            _ => None,
        }
    };
    let c1 = std::sync::Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let c2 = std::sync::Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let c3 = std::sync::Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let first = ask(c1.clone()).await.unwrap();
    for _ in 0..5 {
        assert_eq!(
            ask(c1.clone()).await.unwrap(),
            first,
            "a flow keeps its backend"
        );
    }
    let second = ask(c2.clone()).await.unwrap();
    assert_ne!(
        first[..2],
        second[..2],
        "the next client's flow goes to the other backend"
    );
    // a third client is over max_flows = 2: dropped, and counted
    assert_eq!(ask(c3.clone()).await, None);
    let m = admin_text(&plain(), s.admin, "/metrics").await;
    assert!(
        metric(&m, "tollgate_port_refused_total{port=\"echo\"}") >= 1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "tollgate_port_open{port=\"echo\"}"), 2.0);
    // flows idle out after 1 s; then the third client gets one
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert!(ask(c3.clone()).await.is_some());
    // a reply over 16 KiB is dropped (and counted), never cut short
    let before = metric(
        &admin_text(&plain(), s.admin, "/metrics").await,
        "tollgate_port_refused_total{port=\"echo\"}",
    );
    c3.send_to(&vec![b'z'; 20_000], echo_port).await.unwrap();
    let mut big = vec![0u8; 32_768];
    let got = tokio::time::timeout(Duration::from_millis(500), c3.recv_from(&mut big)).await;
    assert!(got.is_err(), "no truncated reply");
    let m = admin_text(&plain(), s.admin, "/metrics").await;
    assert_eq!(
        metric(&m, "tollgate_port_refused_total{port=\"echo\"}"),
        before + 1.0
    );
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
}

/// TLS: a `tls` port terminates with tollgate's certificate and forwards the plain stream;
/// an `sni` port passes TLS through unopened, by the ClientHello's name, so the client
/// verifies the backend's own certificate; an unknown name is refused.
#[tokio::test]
async fn tls_ports_terminate_or_pass_through_by_sni() {
    let bdir = tempfile::tempdir().unwrap();
    let bca = TestCa::new();
    let (c, k) = bca.issue(bdir.path(), "db", &["db.test"], "db");
    let db = Upstream::start_with(
        "db",
        UpstreamMode {
            tls: Some((c, k)),
            ..Default::default()
        },
    )
    .await;
    let web = Upstream::start("web").await;
    let (term, pass) = (addr(), addr());
    let ca = TestCa::new();
    let dir_ca = tempfile::tempdir().unwrap();
    ca.issue(dir_ca.path(), "edge", &["edge.test"], "edge");
    let s = site(
        &format!(
            "[tls]\ncerts_dir = \"{}\"\n\
             [[port]]\nname = \"term\"\naddress = \"{term}\"\nprotocol = \"tls\"\npool = \"web\"\n\
             [[port]]\nname = \"pass\"\naddress = \"{pass}\"\nprotocol = \"sni\"\n\
             [[port.sni]]\nnames = [\"db.test\", \"*.db.test\"]\npool = \"db\"\n\
             [pool.web]\nbackends = [\"{}\"]\n[pool.db]\nbackends = [\"{}\"]\n",
            dir_ca.path().display(),
            web.addr,
            db.addr
        ),
        &[term, pass],
    )
    .await;
    let get = |host: &str| format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    // terminated: the client verifies tollgate's certificate; the backend gets plain HTTP
    let mut t = tls_connect(&ca, term, "edge.test", &[]).await;
    t.write_all(get("edge.test").as_bytes()).await.unwrap();
    let mut answer = String::new();
    t.read_to_string(&mut answer).await.ok();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"upstream\":\"web\""), "{answer}");
    // passed through: the client verifies the backend's certificate, from the backend's CA
    for name in ["db.test", "a.db.test"] {
        let tcp = TcpStream::connect(pass).await.unwrap();
        let r = tls_over(&bca, tcp, name, &[]).await;
        if name == "a.db.test" {
            // the backend's certificate does not name it: the client refuses, as it should
            assert!(r.is_err());
            continue;
        }
        let mut t = r.unwrap();
        t.write_all(get(name).as_bytes()).await.unwrap();
        let mut answer = String::new();
        t.read_to_string(&mut answer).await.ok();
        assert!(answer.contains("\"upstream\":\"db\""), "{answer}");
    }
    // an unknown name: closed before any TLS
    let tcp = TcpStream::connect(pass).await.unwrap();
    assert!(tls_over(&bca, tcp, "other.test", &[]).await.is_err());
    let m = admin_text(&plain(), s.admin, "/metrics").await;
    assert!(
        metric(&m, "tollgate_port_refused_total{port=\"pass\"}") >= 1.0,
        "{m}"
    );
}

/// An echo server that prefixes each answer with its name.
async fn named_echo(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let mut out = format!("{name}:").into_bytes();
                    out.extend_from_slice(&buf[..n]);
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    a
}

async fn say(c: &mut TcpStream, what: &str) -> String {
    c.write_all(what.as_bytes()).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).to_string()
}

/// A reload that moves the port's pool: the established connection keeps its backend, new
/// ones go to the new pool; `/status` and the dashboard list the port; on SIGTERM the
/// listener closes at once and the established connection may finish (drain), after which
/// tollgate exits.
#[tokio::test]
async fn established_connections_outlive_reloads_and_drain_on_sigterm() {
    let (a, b) = (named_echo("a").await, named_echo("b").await);
    let port = addr();
    let body = |up: SocketAddr| {
        format!("[[port]]\nname = \"echo\"\naddress = \"{port}\"\npool = \"e\"\n[pool.e]\nbackends = [\"{up}\"]\n")
    };
    let mut s = site(&body(a), &[port]).await;
    let mut c1 = TcpStream::connect(port).await.unwrap();
    assert_eq!(say(&mut c1, "x").await, "a:x");
    let cfg = s.tg.config.clone();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&a.to_string(), &b.to_string());
    write(&cfg, &text);
    wait_for("the reload", Duration::from_secs(10), || async {
        s.tg.log_text().contains("configuration reloaded")
    })
    .await;
    assert_eq!(
        say(&mut c1, "y").await,
        "a:y",
        "an established connection keeps its backend"
    );
    let mut c2 = TcpStream::connect(port).await.unwrap();
    assert_eq!(say(&mut c2, "z").await, "b:z", "a new one follows the pool");
    drop(c2);
    let status = admin_json(&plain(), s.admin, "/status").await;
    let p = &status["ports"][0];
    assert_eq!(
        (
            p["name"].as_str(),
            p["protocol"].as_str(),
            p["pool"].as_str()
        ),
        (Some("echo"), Some("tcp"), Some("e"))
    );
    assert!(p["total"].as_u64().unwrap() >= 2, "{p}");
    let dash = admin_text(&plain(), s.admin, "/").await;
    assert!(
        dash.contains("Service ports") && dash.contains(&port.to_string()),
        "{dash}"
    );

    s.tg.signal("TERM");
    wait_for("the listener to close", Duration::from_secs(5), || async {
        TcpStream::connect(port).await.is_err()
    })
    .await;
    assert_eq!(
        say(&mut c1, "w").await,
        "a:w",
        "the established connection drains"
    );
    drop(c1);
    // shutdown_timeout is 5 s: exiting well before it means the drain saw the last one go
    let drained = Instant::now();
    let mut exited = false;
    while drained.elapsed() < Duration::from_secs(4) && !exited {
        exited = matches!(s.tg.child.try_wait(), Ok(Some(_)));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        exited,
        "tollgate still running 4 s after its last connection ended"
    );
}

/// The connection limits hold on service ports: a client over its per-IP cap is closed at
/// once and counted; a PROXY header is taken only from trusted balancers.
#[tokio::test]
async fn connection_limits_apply_to_service_ports() {
    let a = named_echo("a").await;
    let (port, behind_lb) = (addr(), addr());
    let s = site(
        &format!(
            "[limits]\nmax_connections_per_ip = 2\ntrusted_proxies = [\"127.0.0.2/32\"]\n\
             [[port]]\nname = \"capped\"\naddress = \"{port}\"\npool = \"e\"\n\
             [[port]]\nname = \"lb\"\naddress = \"{behind_lb}\"\npool = \"e\"\nproxy_protocol = true\n\
             [pool.e]\nbackends = [\"{a}\"]\n"
        ),
        &[port, behind_lb],
    )
    .await;
    // the readiness probes' connections have ended (they count against the cap too)
    wait_for("no connection open", Duration::from_secs(5), || async {
        let m = admin_text(&plain(), s.admin, "/metrics").await;
        metric(&m, "tollgate_port_open{port=\"capped\"}") == 0.0
            && metric(&m, "tollgate_port_open{port=\"lb\"}") == 0.0
            && metric(&m, "tollgate_connections_open") == 0.0
    })
    .await;
    let mut c1 = TcpStream::connect(port).await.unwrap();
    let mut c2 = TcpStream::connect(port).await.unwrap();
    assert_eq!(say(&mut c1, "1").await, "a:1");
    assert_eq!(say(&mut c2, "2").await, "a:2");
    let mut c3 = TcpStream::connect(port).await.unwrap();
    c3.write_all(b"3").await.ok();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), c3.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "the third connection from one IP is closed"
    );
    // from an untrusted address, a PROXY header is refused outright
    let mut c = TcpStream::connect(behind_lb).await.unwrap();
    let hdr =
        tollgate::limits::proxy_protocol::v1_header("192.0.2.9:1".parse().unwrap(), behind_lb);
    c.write_all(&hdr).await.unwrap();
    c.write_all(b"x").await.ok();
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "an untrusted PROXY header is refused"
    );
    // from the trusted balancer, the header names the client (its own cap counts it)
    let mut c = connect_from([127, 0, 0, 2], behind_lb).await.unwrap();
    c.write_all(&hdr).await.unwrap();
    assert_eq!(say(&mut c, "y").await, "a:y");
    let m = admin_text(&plain(), s.admin, "/metrics").await;
    assert!(
        metric(&m, "tollgate_port_refused_total{port=\"capped\"}") >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "tollgate_port_refused_total{port=\"lb\"}") >= 1.0,
        "{m}"
    );
}

/// Passthrough beside terminated vhosts on one public address: the `sni` port passes
/// db.test through, and hands every other name to tollgate's own TLS listener on loopback
/// (PROXY v2, so the HTTP side still sees the real client), which terminates it.
#[tokio::test]
async fn passthrough_and_terminated_vhosts_share_one_address() {
    let bdir = tempfile::tempdir().unwrap();
    let bca = TestCa::new();
    let (c, k) = bca.issue(bdir.path(), "db", &["db.test"], "db");
    let db = Upstream::start_with(
        "db",
        UpstreamMode {
            tls: Some((c, k)),
            ..Default::default()
        },
    )
    .await;
    let web = Upstream::start("web").await;
    let ca = TestCa::new();
    let cdir = tempfile::tempdir().unwrap();
    ca.issue(cdir.path(), "a", &["a.test"], "a");
    let (public, inner) = (addr(), addr());
    let _s = site(
        &format!(
            "[limits]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
             [tls]\ncerts_dir = \"{}\"\n\
             [[listener]]\naddress = \"{inner}\"\ntls = true\nproxy_protocol = true\n\
             [[vhost]]\nnames = [\"a.test\"]\n[[vhost.route]]\npath = \"/\"\npool = \"web\"\n\
             [[port]]\nname = \"public\"\naddress = \"{public}\"\nprotocol = \"sni\"\npool = \"self\"\nsend_proxy = \"v2\"\n\
             [[port.sni]]\nnames = [\"db.test\"]\npool = \"db\"\n\
             [pool.self]\nbackends = [\"{inner}\"]\n[pool.web]\nbackends = [\"{}\"]\n[pool.db]\nbackends = [\"{}\"]\n",
            cdir.path().display(),
            web.addr,
            db.addr
        ),
        // the inner TLS listener too: the port forwards to it from the first connection
        &[public, inner],
    )
    .await;
    let get = |host: &str| format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    // a.test: terminated by tollgate, the client's own address in X-Forwarded-For
    let tcp = connect_from([127, 0, 0, 7], public).await.unwrap();
    let mut t = tls_over(&ca, tcp, "a.test", &[]).await.unwrap();
    t.write_all(get("a.test").as_bytes()).await.unwrap();
    let mut answer = String::new();
    t.read_to_string(&mut answer).await.ok();
    assert!(answer.contains("\"upstream\":\"web\""), "{answer}");
    assert!(
        answer.contains("\"x-forwarded-for\":\"127.0.0.7\""),
        "{answer}"
    );
    // db.test: passed through to the backend, which the client verifies
    let tcp = TcpStream::connect(public).await.unwrap();
    let mut t = tls_over(&bca, tcp, "db.test", &[]).await.unwrap();
    t.write_all(get("db.test").as_bytes()).await.unwrap();
    let mut answer = String::new();
    t.read_to_string(&mut answer).await.ok();
    assert!(answer.contains("\"upstream\":\"db\""), "{answer}");
}
