//! Two real tollgate processes as an active/standby pair on loopback: UDP heartbeats, an
//! `exec` claim hook, election, takeover when the master is killed, the old master coming back
//! without preempt, and forged heartbeats ignored.

mod common;
use common::*;
use serde_json::Value;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

fn udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Node {
    tg: Tollgate,
    admin: u16,
}

/// `ports`: admin, http, own UDP, peer UDP.
fn config(dir: &Path, name: &str, prio: u8, ports: [u16; 4], up: SocketAddr) -> String {
    format!(
        r#"[server]
threads = 1
[admin]
address = "127.0.0.1:{admin}"
[[listener]]
address = "127.0.0.1:{http}"
[[vhost]]
default = true
[[vhost.route]]
path = "/"
pool = "p"
[pool.p]
backends = ["{up}"]
[failover]
name = "{name}"
priority = {prio}
listen = "127.0.0.1:{udp}"
peer = "127.0.0.1:{peer_udp}"
secret = "shared-secret-for-tests-0123"
interval = "200ms"
[[failover.claim]]
type = "exec"
command = ["/bin/sh", "-c", "echo \"$TOLLGATE_NAME $TOLLGATE_STATE $TOLLGATE_TERM\" >> {log}"]
"#,
        log = dir.join("claims.log").display(),
        admin = ports[0],
        http = ports[1],
        udp = ports[2],
        peer_udp = ports[3],
    )
}

async fn state(admin: u16) -> Option<String> {
    let v: Value = reqwest::get(format!("http://127.0.0.1:{admin}/status"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["failover"]["status"]["state"]
        .as_str()
        .map(str::to_string)
}

async fn start(dir: &Path, name: &str, prio: u8, udp: u16, peer_udp: u16, up: SocketAddr) -> Node {
    let (admin, http) = (free_port(), free_port());
    let path = dir.join(format!("{name}.toml"));
    write(
        &path,
        &config(dir, name, prio, [admin, http, udp, peer_udp], up),
    );
    let mut tg = Tollgate::start(&path);
    tg.ready(SocketAddr::from(([127, 0, 0, 1], admin))).await;
    Node { tg, admin }
}

#[tokio::test]
async fn the_standby_takes_over_when_the_master_dies_and_a_returning_node_does_not_preempt() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let (ua, ub) = (udp_port(), udp_port());
    let a = start(dir.path(), "edge-a", 200, ua, ub, up.addr).await;
    let b = start(dir.path(), "edge-b", 100, ub, ua, up.addr).await;

    // election: a (higher priority) becomes MASTER; never two masters at once
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (sa, sb) = (state(a.admin).await, state(b.admin).await);
        assert!(
            !(sa.as_deref() == Some("MASTER") && sb.as_deref() == Some("MASTER")),
            "two masters"
        );
        if sa.as_deref() == Some("MASTER") && sb.as_deref() == Some("BACKUP") {
            break;
        }
        assert!(Instant::now() < end, "no election: a={sa:?} b={sb:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let claims = std::fs::read_to_string(dir.path().join("claims.log")).unwrap_or_default();
    assert!(claims.contains("edge-a MASTER 1"), "{claims}");

    // forged heartbeats (wrong secret, garbage) change nothing
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..20 {
        s.send_to(
            b"TGHB\x01\xff\x02 forged heartbeat claiming to be a master",
            ("127.0.0.1", ub),
        )
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(state(b.admin).await.as_deref(), Some("BACKUP"));
    let st: Value = reqwest::get(format!("http://127.0.0.1:{}/status", b.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        st["failover"]["status"]["rejected_packets"]
            .as_u64()
            .unwrap()
            >= 20
    );

    // the master dies: the standby takes over within about a second
    let mut a = a;
    let _ = a.tg.child.kill();
    let _ = a.tg.child.wait();
    let died = Instant::now();
    while state(b.admin).await.as_deref() != Some("MASTER") {
        assert!(died.elapsed() < Duration::from_secs(3), "no takeover");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = died.elapsed();
    eprintln!("takeover after {took:?}");
    assert!(took < Duration::from_secs(2), "takeover took {took:?}");
    wait_for("the claim hook to run", Duration::from_secs(5), || async {
        std::fs::read_to_string(dir.path().join("claims.log"))
            .unwrap_or_default()
            .contains("edge-b MASTER 2")
    })
    .await;

    // the old master comes back: without preempt it stays BACKUP
    let a2 = start(dir.path(), "edge-a", 200, ua, ub, up.addr).await;
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        let (sa, sb) = (state(a2.admin).await, state(b.admin).await);
        assert_eq!(
            sb.as_deref(),
            Some("MASTER"),
            "the standby keeps the address (a={sa:?})"
        );
        assert_ne!(sa.as_deref(), Some("MASTER"), "no preempt");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state(a2.admin).await.as_deref(), Some("BACKUP"));
}

/// The `vip` claim for real: two tollgates in their own network namespaces share 198.18.0.100;
/// a client in a third namespace loops against it. The master is killed (SIGKILL: nothing is
/// released), the standby adds the address and sends gratuitous ARP, and the client is served
/// by it within the takeover target. The old master then returns without preempt (it clears
/// the stale address it left and stays BACKUP) and, restarted with preempt, takes back over.
#[test]
fn vip_takeover_in_network_namespaces() {
    use common::takeover::Pair;
    let mut p = Pair::new();
    p.start("a", 200, false);
    p.start("b", 100, false);
    p.wait_master("a", Duration::from_secs(10));
    assert!(p.has_vip("a") && !p.has_vip("b"));
    p.start_client(Duration::from_millis(10), Duration::from_secs(60));
    let t0 = Instant::now();
    let (t, failed) = p.served_by_after("a", t0, Duration::from_secs(5));
    assert!(t < Duration::from_secs(1) && failed == 0, "{t:?} {failed}");

    // the master dies: the standby claims, announces, and serves
    let killed = p.kill("a");
    let (takeover, failed) = p.served_by_after("b", killed, Duration::from_secs(5));
    eprintln!("takeover after SIGKILL: {takeover:?}, {failed} failed requests");
    assert!(
        takeover < Duration::from_secs(2),
        "takeover took {takeover:?}"
    );
    p.wait_master("b", Duration::from_secs(2));
    assert!(p.has_vip("b"));

    // the old master returns without preempt: it clears the address it left behind, stays
    // BACKUP, and the client keeps being served by b with no failure
    let back = Instant::now();
    p.start("a", 200, false);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(p.states(), (Some("BACKUP".into()), Some("MASTER".into())));
    assert!(
        !p.has_vip("a"),
        "stale address left on a:\n{}",
        p.lab.addresses("a")
    );
    let s = p.since(back);
    assert!(
        s.len() > 50,
        "the client loop stalled: {} requests",
        s.len()
    );
    assert!(
        s.iter().all(|s| s.served_by.as_deref() == Ok("198.18.0.2")),
        "{:?}",
        s.iter()
            .filter(|s| s.served_by.as_deref() != Ok("198.18.0.2"))
            .collect::<Vec<_>>()
    );

    // restarted with preempt, the higher-priority node takes the address back once
    p.kill("a");
    std::thread::sleep(Duration::from_millis(300));
    let pre = Instant::now();
    p.start("a", 200, true);
    let (t, failed) = p.served_by_after("a", pre, Duration::from_secs(10));
    p.wait_master("a", Duration::from_secs(3));
    eprintln!("preempt: served by a {t:?} after its start, {failed} failed requests");
    assert!(
        failed <= 2,
        "{failed} requests failed during the preempt handover"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        p.has_vip("a") && !p.has_vip("b"),
        "a: {}\nb: {}",
        p.lab.addresses("a"),
        p.lab.addresses("b")
    );
    let settled = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let s = p.since(settled);
    assert!(
        s.iter().all(|s| s.served_by.as_deref() == Ok("198.18.0.1")),
        "{s:?}"
    );
    p.stop_client();
}
