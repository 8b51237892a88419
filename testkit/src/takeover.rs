//! A failover pair in a namespace lab (see `netns`): tollgate `a` and `b` share the floating
//! address 198.18.0.100 through the `vip` claim; host `c` runs the upstream (which answers
//! with the address the proxy connected from, so the client knows who served it) and a
//! client loop against the floating address. Shared by the takeover test and the takeover
//! benchmark (benches/failover.rs).

use super::netns::{enter, host_ip, Lab};
use super::{Config, Pool, Tollgate, Vhost};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const UPSTREAM_PORT: u16 = 8080;
const ADMIN_PORT: u16 = 9901;
const HB_PORT: u16 = 7946;

fn peer_of(host: &str) -> &'static str {
    if host == "a" {
        "b"
    } else {
        "a"
    }
}

pub fn node_config(host: &str, priority: u8, preempt: bool) -> String {
    let claim = format!(
        "[[failover.claim]]\ntype = \"vip\"\naddress = \"{VIP}/24\"\ninterface = \"eth0\"\n"
    );
    node_config_with(host, priority, preempt, &claim)
}

/// A node of the lab with its own claim blocks.
pub fn node_config_with(host: &str, priority: u8, preempt: bool, claims: &str) -> String {
    let me = host_ip(host);
    let peer = host_ip(peer_of(host));
    Config::new()
        .server("threads = 1")
        .admin_at(ADMIN_PORT)
        .listener(SocketAddr::from(([0, 0, 0, 0], 80)), false, "")
        .vhost(
            Vhost::default_vhost()
                .set("redirect_https", "false")
                .route("/", "p"),
        )
        .pool(
            "p",
            Pool::backends(&[SocketAddr::from((host_ip("c"), UPSTREAM_PORT))]),
        )
        .failover(
            &format!("edge-{host}"),
            priority,
            SocketAddr::from((me, HB_PORT)),
            SocketAddr::from((peer, HB_PORT)),
            &format!("preempt = {preempt}\n{claims}"),
        )
        .render(Path::new("/"))
}

/// One HTTP/1.0 exchange on a stream: (status, body).
pub fn exchange(mut s: TcpStream, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))?;
    Ok((status, body.to_string()))
}

/// The upstream on host c: answers every request with the peer address (keep-alive).
fn serve_upstream(lab: &Lab, stop: Arc<AtomicBool>) {
    let l: TcpListener = lab.within("c", || {
        TcpListener::bind((host_ip("c"), UPSTREAM_PORT)).expect("upstream bind in c")
    });
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, peer)) => {
                    std::thread::spawn(move || upstream_conn(s, peer));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
}

fn upstream_conn(mut s: TcpStream, peer: SocketAddr) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        buf.drain(..end);
        let body = peer.ip().to_string();
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{body}",
            body.len()
        );
        if s.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// One client request's outcome: when it started, and which proxy served it (or why not).
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub served_by: Result<String, String>,
}

pub struct Pair {
    pub lab: Lab,
    pub dir: tempfile::TempDir,
    pub nodes: [Option<Tollgate>; 2],
    stop: Arc<AtomicBool>,
    pub samples: Arc<Mutex<Vec<Sample>>>,
    client: Option<std::thread::JoinHandle<()>>,
}

fn index(host: &str) -> usize {
    usize::from(host != "a")
}

impl Pair {
    pub fn new() -> Pair {
        let lab = Lab::new();
        let stop = Arc::new(AtomicBool::new(false));
        serve_upstream(&lab, stop.clone());
        Pair {
            lab,
            dir: tempfile::tempdir().unwrap(),
            nodes: [None, None],
            stop,
            samples: Arc::new(Mutex::new(Vec::new())),
            client: None,
        }
    }

    /// Start tollgate on `host` and wait for its admin API.
    pub fn start(&mut self, host: &str, priority: u8, preempt: bool) {
        let path = self.dir.path().join(format!("{host}.toml"));
        std::fs::write(&path, node_config(host, priority, preempt)).unwrap();
        let mut cmd = self.lab.command(host, Tollgate::bin());
        cmd.env("TOLLGATE_LOG", "info");
        let mut tg = Tollgate::start_cmd(cmd, &path);
        let end = Instant::now() + Duration::from_secs(20);
        while self.state(host).is_none() {
            if let Ok(Some(st)) = tg.child.try_wait() {
                panic!("tollgate {host} exited with {st}:\n{}", tg.log_text());
            }
            assert!(
                Instant::now() < end,
                "tollgate {host} did not start:\n{}",
                tg.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.nodes[index(host)] = Some(tg);
    }

    /// SIGKILL: the process dies without releasing anything.
    pub fn kill(&mut self, host: &str) -> Instant {
        let tg = self.nodes[index(host)].take().expect("running");
        let t = Instant::now();
        drop(tg); // Tollgate's drop: SIGKILL, then reap
        t
    }

    pub fn signal(&self, host: &str, sig: &str) {
        self.nodes[index(host)]
            .as_ref()
            .expect("running")
            .signal(sig);
    }

    /// The failover state a node's admin API reports (None: not answering).
    pub fn state(&self, host: &str) -> Option<String> {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, ADMIN_PORT)); // the host's own loopback
        let s = self
            .lab
            .connect(host, admin, Duration::from_millis(200))
            .ok()?;
        let (status, body) = exchange(s, "/status", Duration::from_millis(500)).ok()?;
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["failover"]["status"]["state"]
            .as_str()
            .map(str::to_string)
    }

    pub fn states(&self) -> (Option<String>, Option<String>) {
        (self.state("a"), self.state("b"))
    }

    /// Wait until `host` is MASTER and the other is BACKUP (or not running).
    pub fn wait_master(&self, host: &str, within: Duration) {
        let end = Instant::now() + within;
        loop {
            let (a, b) = self.states();
            let (me, other) = if host == "a" { (&a, &b) } else { (&b, &a) };
            assert!(
                !(a.as_deref() == Some("MASTER") && b.as_deref() == Some("MASTER")),
                "two masters"
            );
            if me.as_deref() == Some("MASTER")
                && (other.is_none() || other.as_deref() == Some("BACKUP"))
            {
                return;
            }
            assert!(
                Instant::now() < end,
                "{host} is not MASTER: a={a:?} b={b:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until the floating address is (or is not) on a host's eth0: the state says
    /// MASTER as the claim starts, the address follows a moment later.
    pub fn wait_vip(&self, host: &str, present: bool, within: Duration) {
        let end = Instant::now() + within;
        while self.has_vip(host) != present {
            assert!(Instant::now() < end, "vip on {host}: wanted {present}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the floating address is on a host's eth0.
    pub fn has_vip(&self, host: &str) -> bool {
        self.lab.addresses(host).contains(&format!("{VIP}/24"))
    }

    /// Start the client loop on host c: a new connection per request to the floating
    /// address, every `gap`, until `stop_client` or `max` elapses.
    pub fn start_client(&mut self, gap: Duration, max: Duration) {
        let samples = self.samples.clone();
        let stop = self.stop.clone();
        let path = format!("/var/run/netns/{}", self.lab.ns("c"));
        self.client = Some(std::thread::spawn(move || {
            enter(&path);
            let end = Instant::now() + max;
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                let at = Instant::now();
                let served_by = TcpStream::connect_timeout(
                    &SocketAddr::from((VIP, 80)),
                    Duration::from_millis(250),
                )
                .and_then(|s| exchange(s, "/", Duration::from_secs(1)))
                .map_err(|e| e.kind().to_string())
                .and_then(|(status, body)| match status {
                    200 => Ok(body),
                    s => Err(format!("HTTP {s}")),
                });
                samples.lock().unwrap().push(Sample { at, served_by });
                std::thread::sleep(gap);
            }
        }));
    }

    pub fn stop_client(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(c) = self.client.take() {
            let _ = c.join();
        }
    }

    /// The samples taken since `t`.
    pub fn since(&self, t: Instant) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.at >= t)
            .cloned()
            .collect()
    }

    /// Wait until the client is served by `host` after `t`: the time that took and the
    /// failed requests in between.
    pub fn served_by_after(&self, host: &str, t: Instant, within: Duration) -> (Duration, usize) {
        let ip = host_ip(host).to_string();
        let end = Instant::now() + within;
        loop {
            let s = self.since(t);
            if let Some(first) = s
                .iter()
                .position(|s| s.served_by.as_deref() == Ok(ip.as_str()))
            {
                let failed = s[..first].iter().filter(|s| s.served_by.is_err()).count();
                return (s[first].at - t, failed);
            }
            assert!(
                Instant::now() < end,
                "the client was not served by {host} within {within:?}; last: {:?}",
                s.last()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self, host: &str) -> String {
        let p = self.dir.path().join(format!("{host}.log"));
        std::fs::read_to_string(p).unwrap_or_default()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.stop_client();
        for n in self.nodes.iter_mut() {
            n.take();
        }
        if std::thread::panicking() {
            eprintln!("--- a ---\n{}\n--- b ---\n{}", self.log("a"), self.log("b"));
        }
    }
}
