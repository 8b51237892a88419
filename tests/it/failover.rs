//! Two real tollgate processes as an active/standby pair on loopback: UDP heartbeats, an
//! `exec` claim hook, election, takeover when the master is killed, the old master coming back
//! without preempt, and forged heartbeats ignored.

use crate::common::*;
use serde_json::Value;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

fn udp_port() -> u16 {
    free_port() // free for UDP and TCP, outside the ephemeral range
}

struct Node {
    tg: Tollgate,
    admin: u16,
}

/// Wait (up to 5 s) for the exec hook's log to hold `line`: a node's state changes as its
/// claim or release starts, and the hook runs right after.
async fn wait_hook(dir: &Path, line: &str) {
    let log = dir.join("claims.log");
    wait_for(
        &format!("the hook to log `{line}`"),
        Duration::from_secs(5),
        || async {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(line)
        },
    )
    .await;
}

fn exec_claim(dir: &Path) -> String {
    format!(
        r#"[[failover.claim]]
type = "exec"
command = ["/bin/sh", "-c", "echo \"$TOLLGATE_NAME $TOLLGATE_STATE $TOLLGATE_TERM\" >> {log}"]
"#,
        log = dir.join("claims.log").display()
    )
}

/// `ports`: admin, http, own UDP, peer UDP; `extra`: more `[failover]` settings, then the
/// claim blocks and any other table.
fn config(name: &str, prio: u8, ports: [u16; 4], up: SocketAddr, extra: &str) -> Config {
    let on = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    Config::new()
        .server("threads = 1")
        .admin_at(ports[0])
        .listener(on(ports[1]), false, "")
        .vhost(Vhost::default_vhost().route("/", "p"))
        .pool("p", Pool::backends(&[up]))
        .failover(
            name,
            prio,
            on(ports[2]),
            on(ports[3]),
            &format!("interval = \"200ms\"\n{extra}"),
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
    start_with(dir, name, prio, [udp, peer_udp], up, &exec_claim(dir), &[]).await
}

async fn start_with(
    dir: &Path,
    name: &str,
    prio: u8,
    udp: [u16; 2],
    up: SocketAddr,
    extra: &str,
    env: &[(&str, &str)],
) -> Node {
    let (admin, http) = (free_port(), free_port());
    let path = dir.join(format!("{name}.toml"));
    config(name, prio, [admin, http, udp[0], udp[1]], up, extra).write(&path);
    let mut cmd = std::process::Command::new(Tollgate::bin());
    cmd.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN");
    cmd.envs(env.iter().copied());
    let mut tg = Tollgate::start_cmd(cmd, &path);
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
    // the state says MASTER as the claim starts; the hook runs right after
    wait_hook(dir.path(), "edge-a MASTER 1").await;

    // forged heartbeats (wrong secret, garbage) change nothing
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..20 {
        s.send_to(
            b"TGHB\x01\xff\x02 forged heartbeat claiming to be a master",
            ("127.0.0.1", ub),
        )
        .unwrap();
    }
    // b has read and refused every one of them (so it was looking), and is still BACKUP
    wait_for(
        "b to refuse the forged heartbeats",
        Duration::from_secs(5),
        || async {
            let st: Value = reqwest::get(format!("http://127.0.0.1:{}/status", b.admin))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            st["failover"]["status"]["rejected_packets"]
                .as_u64()
                .unwrap()
                >= 20
        },
    )
    .await;
    assert_eq!(state(b.admin).await.as_deref(), Some("BACKUP"));

    // the master dies: the standby takes over within about a second
    drop(a); // Tollgate's drop: SIGKILL, then reap
    let died = Instant::now();
    while state(b.admin).await.as_deref() != Some("MASTER") {
        assert!(died.elapsed() < Duration::from_secs(3), "no takeover");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = died.elapsed();
    eprintln!("takeover after {took:?}");
    assert!(took < Duration::from_secs(2), "takeover took {took:?}");
    wait_hook(dir.path(), "edge-b MASTER 2").await;

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
    use crate::common::takeover::Pair;
    let mut p = Pair::new();
    p.start("a", 200, false);
    p.start("b", 100, false);
    p.wait_master("a", Duration::from_secs(10));
    p.wait_vip("a", true, Duration::from_secs(2));
    assert!(!p.has_vip("b"));
    p.start_client(Duration::from_millis(10), Duration::from_secs(60));
    let t0 = Instant::now();
    let (t, failed) = p.served_by_after("a", t0, Duration::from_secs(5));
    assert!(t < Duration::from_secs(1) && failed == 0, "{t:?} {failed}");

    // the master dies: the standby claims, announces, and serves
    let killed = p.kill("a");
    let (takeover, failed) = p.served_by_after("b", killed, Duration::from_secs(5));
    // expected, not an error: the client sends a request every 10 ms, and those sent while
    // no node held the address fail until the standby claims it
    eprintln!(
        "takeover after SIGKILL: {takeover:?}; {failed} client requests failed in that window (expected)"
    );
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
    eprintln!(
        "preempt: served by a {t:?} after its start; {failed} client requests failed during the handover"
    );
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

async fn wait_state(admin: u16, want: &str, within: Duration) {
    let end = Instant::now() + within;
    loop {
        let s = state(admin).await;
        if s.as_deref() == Some(want) {
            return;
        }
        assert!(Instant::now() < end, "state {s:?}, waited for {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `aws_eip` claim against moto's EC2 server: the elastic IP follows the master. Node a
/// has its instance id configured and credentials in the environment; node b has neither and
/// gets both from an IMDSv2 service (token required). After a kill, and after a SIGSTOP /
/// SIGCONT of the master (which must come back as BACKUP and leave the address alone),
/// DescribeAddresses shows the instance of the node that should hold it.
#[tokio::test]
async fn aws_eip_follows_the_master_and_a_resumed_master_does_not_take_it_back() {
    use crate::common::aws::{Imds, Moto};
    let moto = Moto::start().await;
    let ids = moto.run_instances(2).await;
    let (ia, ib) = (ids[0].clone(), ids[1].clone());
    let alloc = moto.allocate_address().await;
    let imds_b = Imds::start(
        &ib,
        Some(("tollgate-edge", "AKIDFROMROLE", "secret-from-role")),
    )
    .await;
    let claim = |instance: Option<&str>, imds: &str| {
        format!(
            r#"[[failover.claim]]
type = "aws_eip"
allocation_id = "{alloc}"
region = "us-east-1"
endpoint = "{ep}"
imds_endpoint = "{imds}"
timeout = "2s"
{inst}
"#,
            ep = moto.endpoint(),
            inst = instance
                .map(|i| format!("instance_id = \"{i}\""))
                .unwrap_or_default()
        )
    };
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let (ua, ub) = (udp_port(), udp_port());
    let env_a = [
        ("AWS_ACCESS_KEY_ID", "AKIDFROMENV"),
        ("AWS_SECRET_ACCESS_KEY", "secret-from-env"),
    ];
    // node a has no metadata service: its instance id is configured
    let claim_a = claim(Some(&ia), "http://127.0.0.1:9");
    let start_a = || {
        start_with(
            dir.path(),
            "edge-a",
            200,
            [ua, ub],
            up.addr,
            &claim_a,
            &env_a,
        )
    };
    let a = start_a().await;
    let claim_b = claim(None, &imds_b.endpoint());
    let b = start_with(dir.path(), "edge-b", 100, [ub, ua], up.addr, &claim_b, &[]).await;

    wait_state(a.admin, "MASTER", Duration::from_secs(10)).await;
    wait_state(b.admin, "BACKUP", Duration::from_secs(5)).await;
    let m = &moto;
    m.wait_holder(&alloc, &ia).await;

    // the master dies: the standby moves the address to its own instance (from IMDS)
    drop(a); // Tollgate's drop: SIGKILL, then reap
    let died = Instant::now();
    m.wait_holder(&alloc, &ib).await;
    eprintln!("aws_eip takeover after kill: {:?}", died.elapsed());
    wait_state(b.admin, "MASTER", Duration::from_secs(1)).await;
    assert!(
        imds_b.served.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "b read its instance id and role credentials from IMDS"
    );
    assert_eq!(imds_b.refused.load(std::sync::atomic::Ordering::SeqCst), 0);

    // a returns as BACKUP; then the master (b) is frozen: a takes the address over
    let a = start_a().await;
    wait_state(a.admin, "BACKUP", Duration::from_secs(5)).await;
    assert_eq!(m.holder(&alloc).await.as_deref(), Some(ib.as_str()));
    b.tg.signal("STOP");
    wait_state(a.admin, "MASTER", Duration::from_secs(5)).await;
    m.wait_holder(&alloc, &ia).await;

    // b resumes: it hears a MASTER of a higher term (or finds the address gone when it
    // verifies) and demotes, without associating the address again
    b.tg.signal("CONT");
    wait_state(b.admin, "BACKUP", Duration::from_secs(5)).await;
    let end = Instant::now() + Duration::from_secs(5); // longer than the verify interval
    while Instant::now() < end {
        assert_eq!(
            m.holder(&alloc).await.as_deref(),
            Some(ia.as_str()),
            "b took it back"
        );
        assert_eq!(state(a.admin).await.as_deref(), Some("MASTER"));
        assert_eq!(state(b.admin).await.as_deref(), Some("BACKUP"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = b.tg.log_text();
    assert!(!log.contains("claim failed"), "{log}");
}

/// A UDP relay for heartbeats: what arrives on `port` goes on to `to` unless the link is cut.
async fn relay(
    to: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (u16, tokio::task::JoinHandle<()>) {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = s.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, _)) = s.recv_from(&mut buf).await {
            if !cut.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = s.send_to(&buf[..n], ("127.0.0.1", to)).await;
            }
        }
    });
    (port, task)
}

async fn status(admin: u16) -> Value {
    reqwest::get(format!("http://127.0.0.1:{admin}/status"))
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["failover"]["status"]
        .clone()
}

/// Fencing with a real Consul agent: with `consul_lock = true`, cutting the heartbeat link
/// between the peers (Consul still reachable by both) leaves exactly one MASTER, because the
/// standby cannot take the lock. When the master dies, the standby takes over once Consul
/// has expired the dead master's session.
#[tokio::test]
async fn consul_lock_keeps_one_master_when_the_peer_link_is_cut() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let consul = ConsulAgent::start(dir.path()).await;
    let up = Upstream::start("up").await;
    let (ua, ub) = (udp_port(), udp_port());
    let cut = Arc::new(AtomicBool::new(false));
    let (to_b, _r1) = relay(ub, cut.clone()).await;
    let (to_a, _r2) = relay(ua, cut.clone()).await;
    let extra = format!(
        "consul_lock = true\nconsul_lock_key = \"tollgate/test/leader\"\n{}\n[consul]\naddress = \"http://{}\"\n",
        exec_claim(dir.path()),
        consul.http
    );
    let a = start_with(dir.path(), "edge-a", 200, [ua, to_b], up.addr, &extra, &[]).await;
    let b = start_with(dir.path(), "edge-b", 100, [ub, to_a], up.addr, &extra, &[]).await;
    wait_state(a.admin, "MASTER", Duration::from_secs(10)).await;
    wait_state(b.admin, "BACKUP", Duration::from_secs(5)).await;
    assert_eq!(status(a.admin).await["consul_lock"], true);
    assert_eq!(status(b.admin).await["consul_lock"], false);
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", a.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "tollgate_failover_state{state=\"MASTER\"} 1",
        "tollgate_failover_consul_lock_held 1",
        "tollgate_failover_peer_last_seen_seconds 0.",
        "tollgate_failover_last_transition_timestamp_seconds 1",
    ] {
        assert!(metrics.contains(line), "no `{line}` in\n{metrics}");
    }

    // cut the peer link only: b no longer hears a, but cannot get the lock
    cut.store(true, Ordering::SeqCst);
    let end = Instant::now() + Duration::from_secs(6);
    let mut samples = 0;
    while Instant::now() < end {
        let (sa, sb) = (state(a.admin).await, state(b.admin).await);
        assert_eq!(sa.as_deref(), Some("MASTER"));
        assert_ne!(
            sb.as_deref(),
            Some("MASTER"),
            "two masters with the link cut"
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(samples > 50);
    let sb = status(b.admin).await;
    assert!(
        sb["peer_last_seen_ms_ago"].as_u64().unwrap() > 3_000,
        "{sb}"
    );
    let claims = std::fs::read_to_string(dir.path().join("claims.log")).unwrap();
    assert!(
        !claims.contains("edge-b MASTER"),
        "b ran its claim: {claims}"
    );

    // heal; then the master dies without a word: its session must expire before b may claim
    cut.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(a); // Tollgate's drop: SIGKILL, then reap
    let died = Instant::now();
    wait_state(b.admin, "MASTER", Duration::from_secs(40)).await;
    let took = died.elapsed();
    eprintln!("fenced takeover after kill: {took:?} (the session TTL is 10s)");
    assert!(
        took >= Duration::from_secs(5),
        "b claimed before a's session expired: {took:?}"
    );
    assert_eq!(status(b.admin).await["consul_lock"], true);

    // Consul goes away: b cannot renew its session, so before Consul could hand the lock to
    // anyone (no sooner than the TTL), b gives the address up
    let mut consul = consul;
    consul.kill().await;
    let lost = Instant::now();
    wait_state(b.admin, "BACKUP", Duration::from_secs(12)).await;
    let took = lost.elapsed();
    eprintln!("fenced MASTER gave up {took:?} after Consul went away (TTL 10s)");
    assert!(
        took < Duration::from_secs(10),
        "{took:?}: not before the TTL"
    );
    assert_eq!(
        status(b.admin).await["last_transition"],
        "lost the Consul lock"
    );
    // the state changes as the release starts; the hook runs right after
    let log = dir.path().join("claims.log");
    wait_for("b's release hook", Duration::from_secs(5), || async {
        let claims = std::fs::read_to_string(&log).unwrap_or_default();
        let b_claimed = claims.rfind("edge-b MASTER").unwrap_or(usize::MAX);
        b_claimed != usize::MAX && claims[b_claimed..].contains("edge-b BACKUP")
    })
    .await;
}

/// Parse a captured Ethernet frame into what the `vip` claim announces: gratuitous ARP
/// (op, sender MAC, sender IP, target IP) or an IPv6 neighbour advertisement (hop limit,
/// flags byte, target, target link-layer option).
#[derive(Debug, PartialEq)]
enum Announcement {
    Arp {
        op: u16,
        sha: [u8; 6],
        spa: [u8; 4],
        tpa: [u8; 4],
    },
    Na {
        hop_limit: u8,
        flags: u8,
        target: std::net::Ipv6Addr,
        mac: Option<[u8; 6]>,
    },
}

fn parse_frame(f: &[u8]) -> Option<Announcement> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let p = &f[14..];
    match ethertype {
        0x0806 if p.len() >= 28 => Some(Announcement::Arp {
            op: u16::from_be_bytes([p[6], p[7]]),
            sha: p[8..14].try_into().ok()?,
            spa: p[14..18].try_into().ok()?,
            tpa: p[24..28].try_into().ok()?,
        }),
        0x86dd if p.len() >= 40 + 24 && p[6] == 58 && p[40] == 136 => {
            let icmp = &p[40..];
            let target: [u8; 16] = icmp[8..24].try_into().ok()?;
            let mac = (icmp.len() >= 32 && icmp[24] == 2).then(|| icmp[26..32].try_into().unwrap());
            Some(Announcement::Na {
                hop_limit: p[7],
                flags: icmp[4],
                target: target.into(),
                mac,
            })
        }
        _ => None,
    }
}

/// What the `vip` claim puts on the wire, captured by a packet socket on the client host:
/// gratuitous ARP in both forms and an unsolicited neighbour advertisement (hop limit 255,
/// override flag, our MAC), each in two bursts `garp_repeat` apart. A clean shutdown
/// removes both addresses.
#[test]
fn vip_announcements_on_the_wire_ipv4_and_ipv6() {
    use crate::common::netns::{enter, Lab};
    let lab = Lab::new();
    // capture on c first
    let path = format!("/var/run/netns/{}", lab.ns("c"));
    let capture = std::thread::spawn(move || {
        enter(&path);
        // SAFETY: a packet socket for ETH_P_ALL; frames read into a buffer we own.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                (libc::ETH_P_ALL as u16).to_be() as i32,
            )
        };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let mut seen = Vec::new();
        let end = Instant::now() + Duration::from_secs(6);
        let mut buf = [0u8; 2048];
        while Instant::now() < end {
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                if let Some(a) = parse_frame(&buf[..n as usize]) {
                    seen.push((Instant::now(), a));
                }
            }
        }
        unsafe { libc::close(fd) };
        seen
    });
    std::thread::sleep(Duration::from_millis(200));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("a.toml");
    let claims = r#"[[failover.claim]]
type = "vip"
address = "198.18.0.100/24"
interface = "eth0"
garp_count = 2
garp_repeat = "1s"
[[failover.claim]]
type = "vip"
address = "2001:db8::100/64"
interface = "eth0"
garp_count = 2
garp_repeat = "1s"
"#;
    std::fs::write(
        &cfg,
        crate::common::takeover::node_config_with("a", 100, false, claims),
    )
    .unwrap();
    let tg = Tollgate::start_cmd(lab.command("a", Tollgate::bin()), &cfg);
    let seen = capture.join().unwrap();
    let link = std::process::Command::new("ip")
        .args(["-n", &lab.ns("a"), "-6", "addr", "show", "dev", "eth0"])
        .output()
        .unwrap();
    let v6 = String::from_utf8_lossy(&link.stdout).to_string();
    assert!(v6.contains("2001:db8::100/64"), "{v6}\n{}", tg.log_text());
    let link = std::process::Command::new("ip")
        .args(["-n", &lab.ns("a"), "-o", "link", "show", "dev", "eth0"])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout).to_string();
    let mac: Vec<u8> = link
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default()
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    let vip4 = [198, 18, 0, 100];
    let vip6: std::net::Ipv6Addr = "2001:db8::100".parse().unwrap();
    let arp = |op: u16| {
        seen.iter()
            .filter(|(_, a)| matches!(a, Announcement::Arp { op: o, spa, tpa, .. } if *o == op && *spa == vip4 && *tpa == vip4))
            .map(|(t, a)| (*t, a))
            .collect::<Vec<_>>()
    };
    let (requests, replies) = (arp(1), arp(2));
    let nas: Vec<_> = seen
        .iter()
        .filter(|(_, a)| matches!(a, Announcement::Na { target, .. } if *target == vip6))
        .collect();
    assert!(
        requests.len() >= 4 && replies.len() >= 4,
        "two bursts of 2 of each form: {seen:?}"
    );
    assert!(nas.len() >= 4, "{seen:?}");
    for (_, a) in requests.iter().chain(&replies) {
        if let Announcement::Arp { sha, .. } = a {
            assert_eq!(&sha[..], &mac[..], "sender MAC is a's eth0 ({link})");
        }
    }
    for (_, a) in &nas {
        let Announcement::Na {
            hop_limit,
            flags,
            mac: m,
            ..
        } = a
        else {
            unreachable!()
        };
        assert_eq!(*hop_limit, 255);
        assert_eq!(flags & 0xe0, 0x20, "override only");
        assert_eq!(m.map(|m| m.to_vec()), Some(mac.clone()));
    }
    let span = requests.last().unwrap().0 - requests[0].0;
    assert!(
        span >= Duration::from_millis(800),
        "a second burst about 1s later: {span:?}"
    );

    // a clean shutdown gives both addresses up
    tg.signal("TERM");
    let mut tg = tg;
    let _ = tg.child.wait();
    let v4 = lab.addresses("a");
    assert!(!v4.contains("198.18.0.100"), "{v4}");
    let link = std::process::Command::new("ip")
        .args(["-n", &lab.ns("a"), "-6", "addr", "show", "dev", "eth0"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&link.stdout).contains("2001:db8::100"));
}

/// A MASTER that shuts down cleanly (SIGTERM, or the old process of a binary upgrade)
/// releases, then says it is leaving: the standby claims at once instead of waiting out
/// the dead time. A node whose heartbeat port is still held (the process it upgrades) waits
/// for it instead of leaving the election for good.
#[tokio::test]
async fn a_clean_shutdown_hands_over_at_once_and_a_busy_heartbeat_port_is_waited_for() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let (ua, ub) = (udp_port(), udp_port());
    // b's port is taken, as by the old process during an upgrade
    let squatter = UdpSocket::bind(("127.0.0.1", ub)).unwrap();
    let a = start(dir.path(), "edge-a", 200, ua, ub, up.addr).await;
    let b = start(dir.path(), "edge-b", 100, ub, ua, up.addr).await;
    wait_state(a.admin, "MASTER", Duration::from_secs(10)).await;
    let sb = status(b.admin).await;
    assert_eq!(sb["state"], "INIT", "{sb}");
    assert!(
        sb["last_transition"]
            .as_str()
            .unwrap()
            .contains("waiting for failover.listen"),
        "{sb}"
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        state(b.admin).await.as_deref(),
        Some("INIT"),
        "out of the election while waiting"
    );
    drop(squatter);
    wait_state(b.admin, "BACKUP", Duration::from_secs(5)).await;

    // a clean stop of the MASTER: b takes over on a's leaving heartbeat
    a.tg.signal("TERM");
    let stopped = Instant::now();
    wait_state(b.admin, "MASTER", Duration::from_secs(5)).await;
    let took = stopped.elapsed();
    let sb = status(b.admin).await;
    assert_eq!(sb["last_transition"], "the peer is in FAULT", "{sb}");
    eprintln!("takeover after a clean stop: {took:?}");
    wait_hook(dir.path(), "edge-b MASTER").await;
    let claims = std::fs::read_to_string(dir.path().join("claims.log")).unwrap();
    let a_released = claims
        .find("edge-a BACKUP")
        .expect("a ran its release hook");
    let b_claimed = claims.rfind("edge-b MASTER").expect("b claimed");
    assert!(
        a_released < b_claimed,
        "a released before b claimed:\n{claims}"
    );
}
