//! Service ports through the real tollgate binary: TCP (a real Redis and its client), PROXY
//! headers seen by the backend, half-close, backpressure against a slow reader, UDP (a real
//! DNS server, dnsmasq, asked by dig), TLS termination and TLS passthrough by SNI.

use crate::common::*;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// tollgate with `cfg` (ports and pools, from [`Config::new`]) and an admin port.
struct Site {
    tg: Tollgate,
    _dir: tempfile::TempDir,
    admin: u16,
}

/// Start tollgate on `cfg`; returns once the admin port and the TCP ports in `ready` accept.
async fn site(cfg: Config, ready: &[SocketAddr]) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let admin = cfg.admin_port();
    let mut tg = cfg.start(dir.path()).await;
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
        Config::new()
            .port(Port::new("redis", port).pool("redis"))
            .pool(
                "redis",
                Pool::backends(&[r1.1, r2.1]).with("retries = 1\nconnect_timeout = \"500ms\""),
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
        Config::new()
            .port(Port::new("", v1).pool("b").set("send_proxy", "\"v1\""))
            .port(Port::new("", v2).pool("b").set("send_proxy", "\"v2\""))
            .port(Port::new("", none).pool("b"))
            .pool("b", Pool::backends(&[backend])),
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
        Config::new()
            .port(Port::new("", port).pool("b"))
            .pool("b", Pool::backends(&[backend])),
        &[port],
    )
    .await;
    let rss = || rss_kib(s.tg.child.id());
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
        Config::new()
            .port(
                Port::new("dns", dns_port)
                    .set("protocol", "\"udp\"")
                    .pool("dns"),
            )
            .port(
                Port::new("echo", echo_port)
                    .set("protocol", "\"udp\"")
                    .pool("echo")
                    .with("max_flows = 2\nidle_timeout = \"1s\""),
            )
            .pool("dns", Pool::backends(&[dns]))
            .pool("echo", Pool::backends(&[echoes[0], echoes[1]])),
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
    // flows idle out after 1 s (swept every 0.5 s); then the third client gets one
    wait_for("the flows to idle out", Duration::from_secs(5), || async {
        let m = admin_text(&plain(), s.admin, "/metrics").await;
        metric(&m, "tollgate_port_open{port=\"echo\"}") == 0.0
    })
    .await;
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
        Config::new()
            .table(
                "tls",
                &format!("certs_dir = \"{}\"", dir_ca.path().display()),
            )
            .port(
                Port::new("term", term)
                    .set("protocol", "\"tls\"")
                    .pool("web"),
            )
            .port(
                Port::new("pass", pass)
                    .set("protocol", "\"sni\"")
                    .sni(&["db.test", "*.db.test"], "db"),
            )
            .pool("web", Pool::backends(&[web.addr]))
            .pool("db", Pool::backends(&[db.addr])),
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
    let cfg = Config::new()
        .port(Port::new("echo", port).pool("e"))
        .pool("e", Pool::backends(&[a]));
    let mut s = site(cfg, &[port]).await;
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
        Config::new()
            .table(
                "limits",
                "max_connections_per_ip = 2\ntrusted_proxies = [\"127.0.0.2/32\"]",
            )
            .port(Port::new("capped", port).pool("e"))
            .port(
                Port::new("lb", behind_lb)
                    .pool("e")
                    .set("proxy_protocol", "true"),
            )
            .pool("e", Pool::backends(&[a])),
        &[port, behind_lb],
    )
    .await;
    // the readiness probes' connections were seen (one each: `capped` admitted, `lb`'s
    // refused, as it is not from a trusted balancer) and have ended: they count against the
    // cap too, and one accepted after a first look would still hold a slot
    wait_for("the probes to be done", Duration::from_secs(5), || async {
        let m = admin_text(&plain(), s.admin, "/metrics").await;
        metric(&m, "tollgate_port_connections_total{port=\"capped\"}") >= 1.0
            && metric(&m, "tollgate_port_refused_total{port=\"lb\"}") >= 1.0
            && metric(&m, "tollgate_port_open{port=\"capped\"}") == 0.0
            && metric(&m, "tollgate_port_open{port=\"lb\"}") == 0.0
            && metric(&m, "tollgate_connections_open") == 0.0
    })
    .await;
    let lb_refused = metric(
        &admin_text(&plain(), s.admin, "/metrics").await,
        "tollgate_port_refused_total{port=\"lb\"}",
    );
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
    drop(c);
    // a v2 header with 3 KiB of TLVs (listeners take up to 16 + 4096 bytes): taken too
    let mut v2 =
        tollgate::limits::proxy_protocol::v2_header("192.0.2.10:1".parse().unwrap(), behind_lb);
    let tlv_len: usize = 3 * 1024;
    let len = u16::from_be_bytes([v2[14], v2[15]]) as usize + 3 + tlv_len;
    v2[14..16].copy_from_slice(&(len as u16).to_be_bytes());
    v2.push(0xE0); // a custom TLV type
    v2.extend_from_slice(&(tlv_len as u16).to_be_bytes());
    v2.extend(std::iter::repeat_n(b'v', tlv_len));
    let mut c = connect_from([127, 0, 0, 2], behind_lb).await.unwrap();
    c.write_all(&v2).await.unwrap();
    assert_eq!(say(&mut c, "z").await, "a:z", "a large v2 header is taken");
    let m = admin_text(&plain(), s.admin, "/metrics").await;
    assert!(
        metric(&m, "tollgate_port_refused_total{port=\"capped\"}") >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "tollgate_port_refused_total{port=\"lb\"}") > lb_refused,
        "the untrusted header was counted: {m}"
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
        Config::new()
            .table("limits", "trusted_proxies = [\"127.0.0.1/32\"]")
            .table("tls", &format!("certs_dir = \"{}\"", cdir.path().display()))
            .listener(inner, true, "proxy_protocol = true")
            .vhost(Vhost::new(&["a.test"]).route("/", "web"))
            .port(
                Port::new("public", public)
                    .with("protocol = \"sni\"\nsend_proxy = \"v2\"")
                    .pool("self")
                    .sni(&["db.test"], "db"),
            )
            .pool("self", Pool::backends(&[inner]))
            .pool("web", Pool::backends(&[web.addr]))
            .pool("db", Pool::backends(&[db.addr])),
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

/// Clients that send half a ClientHello to a passthrough port and wait cost no CPU while
/// they wait (tollgate waits for their bytes, it does not poll), and those that then close
/// are let go at once, not at the handshake timeout.
#[tokio::test]
async fn half_hellos_on_a_passthrough_port_cost_nothing_and_closed_ones_go_at_once() {
    let a = named_echo("a").await;
    let pass = addr();
    let s = site(
        Config::new()
            .table(
                "limits",
                "max_connections_per_ip = 2000\nconnection_burst_per_ip = 2000\nhandshake_timeout = \"30s\"",
            )
            .port(
                Port::new("pass", pass)
                    .set("protocol", "\"sni\"")
                    .sni(&["db.test"], "e"),
            )
            .pool("e", Pool::backends(&[a])),
        &[pass],
    )
    .await;
    let open = || async {
        let m = admin_text(&plain(), s.admin, "/metrics").await;
        metric(&m, "tollgate_port_open{port=\"pass\"}")
    };
    wait_for("no connection open", Duration::from_secs(5), || async {
        open().await == 0.0
    })
    .await;
    // the first bytes of a ClientHello record (handshake, TLS 1.0 record, 512 bytes long)
    const HALF: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
    const N: usize = 1000;
    let mut held = Vec::with_capacity(N);
    for _ in 0..N {
        let mut c = TcpStream::connect(pass).await.unwrap();
        c.write_all(HALF).await.unwrap();
        held.push(c);
    }
    wait_for(
        "every half hello to be held",
        Duration::from_secs(10),
        || async { open().await == N as f64 },
    )
    .await;
    let (cpu0, t0) = (s.tg.cpu_seconds(), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = s.tg.cpu_seconds() - cpu0;
    let over = t0.elapsed().as_secs_f64();
    eprintln!("{N} waiting half hellos: {used:.2} s of CPU in {over:.1} s");
    assert!(
        used < 0.1 * over,
        "{N} waiting half hellos used {used:.2} s of CPU in {over:.1} s"
    );
    // they close: let go well before the 30 s handshake timeout
    drop(held);
    wait_for(
        "closed half hellos to be let go",
        Duration::from_secs(3),
        || async { open().await == 0.0 },
    )
    .await;
}

/// A UDP backend that answers each datagram with `burst` replies (`stream`: one every 50 ms
/// for 5 s instead, whether the client sends or not).
async fn udp_amplifier(burst: usize) -> SocketAddr {
    let s = std::sync::Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let a = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            if &buf[..n] == b"stream" {
                let s = s.clone();
                tokio::spawn(async move {
                    for _ in 0..100 {
                        let _ = s.send_to(b"tick", from).await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                });
                continue;
            }
            for _ in 0..burst {
                let _ = s.send_to(&[b'r'; 100], from).await;
            }
        }
    });
    a
}

/// Replies to `sock` that arrive within `wait` of each other.
async fn replies_within(sock: &UdpSocket, wait: Duration) -> usize {
    let mut buf = [0u8; 256];
    let mut n = 0;
    while let Ok(Ok(_)) = tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
        n += 1;
    }
    n
}

/// UDP ports bound what a client can make tollgate do: replies per client datagram (a
/// spoofed source gets no flood), flows per client address (one address cannot fill the
/// table), a flow kept only while its client sends (a backend's replies alone do not hold
/// it), and a backend that answers with ICMP port unreachable is ejected like a refused
/// TCP connect.
#[tokio::test]
async fn udp_ports_bound_replies_flows_per_address_and_eject_dead_backends() {
    let amp = udp_amplifier(50).await;
    // a port nothing listens on: the kernel answers with ICMP port unreachable
    let dead = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let (port, deadp) = (addr(), addr());
    let s = site(
        Config::new()
            .port(
                Port::new("u", port).pool("amp").with(
                    "protocol = \"udp\"\nmax_flows_per_ip = 3\nreplies_per_datagram = 4\nidle_timeout = \"2s\"",
                ),
            )
            .port(
                Port::new("d", deadp)
                    .set("protocol", "\"udp\"")
                    .pool("dead"),
            )
            .pool("amp", Pool::backends(&[amp]))
            .pool("dead", Pool::backends(&[dead]).set("max_fails", "3")),
        &[],
    )
    .await;
    let client = || async { UdpSocket::bind("127.0.0.1:0").await.unwrap() };
    // the port is open (ports open on the service's next tick; a datagram sent before is
    // lost): asked from an address of its own, so 127.0.0.1's flows stay uncounted
    let probe = UdpSocket::bind("127.0.0.3:0").await.unwrap();
    wait_for(
        "the UDP port to answer",
        Duration::from_secs(10),
        || async {
            probe.send_to(b"x", port).await.unwrap();
            replies_within(&probe, Duration::from_millis(200)).await > 0
        },
    )
    .await;
    // one datagram: 4 of the backend's 50 replies come back
    let c = client().await;
    c.send_to(b"x", port).await.unwrap();
    assert_eq!(replies_within(&c, Duration::from_millis(300)).await, 4);
    // the next datagram renews the budget
    c.send_to(b"x", port).await.unwrap();
    assert_eq!(replies_within(&c, Duration::from_millis(300)).await, 4);
    // three flows from one address; a fourth from it gets nothing, another address does
    let (c2, c3, c4) = (client().await, client().await, client().await);
    for x in [&c2, &c3] {
        x.send_to(b"x", port).await.unwrap();
        assert_eq!(replies_within(x, Duration::from_millis(300)).await, 4);
    }
    c4.send_to(b"x", port).await.unwrap();
    assert_eq!(replies_within(&c4, Duration::from_millis(300)).await, 0);
    let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    other.send_to(b"x", port).await.unwrap();
    assert_eq!(replies_within(&other, Duration::from_millis(300)).await, 4);
    let m = admin_text(&plain(), s.admin, "/metrics").await;
    assert!(metric(&m, "tollgate_port_refused_total{port=\"u\"}") >= 1.0);
    // the clients fall silent: their flows go after the idle timeout, even the one whose
    // backend keeps streaming (its ticks are not let through past the budget either)
    let streaming = client().await;
    streaming.send_to(b"stream", port).await.unwrap();
    wait_for("every flow to idle out", Duration::from_secs(6), || async {
        let m = admin_text(&plain(), s.admin, "/metrics").await;
        metric(&m, "tollgate_port_open{port=\"u\"}") == 0.0
    })
    .await;
    // the dead backend: ICMP port unreachable counts as failures until it is ejected
    let d = client().await;
    wait_for(
        "the dead backend to be ejected",
        Duration::from_secs(10),
        || async {
            let _ = d.send_to(b"x", deadp).await;
            let pools = admin_json(&plain(), s.admin, "/pools").await;
            pools
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == "dead")
                .is_some_and(|p| p["backends"][0]["ejections_total"].as_u64() >= Some(1))
        },
    )
    .await;
}

/// Service ports keep to their share of the open-file limit: with a limit of 400, a flood of
/// UDP flows from ever-new source ports stops at the ports' share (3/4), tollgate says at
/// start that the limit is below what its ports may hold, and HTTP keeps serving.
#[tokio::test]
async fn a_udp_flood_stops_at_the_ports_share_of_descriptors_and_http_serves_on() {
    let up = Upstream::start("up").await;
    let echo = udp_amplifier(1).await;
    let dir = tempfile::tempdir().unwrap();
    let port = addr();
    let config = Config::new()
        .http()
        .vhost(
            Vhost::new(&["a.test"])
                .set("redirect_https", "false")
                .route("/", "up"),
        )
        .pool("up", Pool::backends(&[up.addr]))
        .port(Port::new("u", port).pool("echo").with(
            "protocol = \"udp\"\nmax_flows = 2000\nmax_flows_per_ip = 2000\nidle_timeout = \"30s\"",
        ))
        .pool("echo", Pool::backends(&[echo]));
    let (admin, http) = (config.admin_port(), config.http_addr());
    let cfg = dir.path().join("tollgate.toml");
    config.write(&cfg);
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=400:400", "--", Tollgate::bin()]);
    let mut tg = Tollgate::start_cmd(cmd, &cfg);
    tg.ready(http).await;
    assert!(
        tg.log_text().contains("open-file limit is below"),
        "{}",
        tg.log_text()
    );
    // 500 clients, one datagram each (the test's own sockets, closed as it goes), paced so
    // the port's receive buffer rarely overflows (a lost datagram is no flow, and 500 are
    // well over the 300 flows the share allows)
    for i in 0..500 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.send_to(b"x", port).await.unwrap();
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
    let m = || async { admin_text(&plain(), admin, "/metrics").await };
    wait_for(
        "flows at the share and new ones refused",
        Duration::from_secs(20),
        || async {
            let m = m().await;
            metric(&m, "tollgate_port_open{port=\"u\"}") >= 250.0
                && metric(&m, "tollgate_port_refused_total{port=\"u\"}") >= 1.0
        },
    )
    .await;
    let m = m().await;
    let open = metric(&m, "tollgate_port_open{port=\"u\"}");
    assert!(
        (250.0..=300.0).contains(&open),
        "flows at the 300 share: {open}"
    );
    assert!(tg
        .log_text()
        .contains("service ports hold their share of the open-file limit"));
    // HTTP is untouched: new connections, answered
    for _ in 0..20 {
        let r = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{http}/"))
            .header("host", "a.test")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}
