//! Takeover benchmark (issue #7): a failover pair in network namespaces sharing a floating
//! address through the `vip` claim, with default timings (200 ms heartbeats, dead after
//! 700 ms). The current MASTER is killed (SIGKILL) 20 times; each time we measure, from the
//! kill, the time until the client loop (a new connection every 10 ms to the floating
//! address) is served by the other node, the requests that failed in between, and whether
//! two nodes ever reported MASTER at once. The killed node is restarted (no preempt) and
//! becomes the standby for the next round.
//!
//! `cargo bench --bench failover` (root: it creates network namespaces). Under
//! `cargo test --benches` it runs one round as a smoke test.

use std::time::{Duration, Instant};
use tollgate_testkit::takeover::Pair;

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let rounds = if bench { 20 } else { 1 };
    let mut p = Pair::new();
    p.start("a", 200, false);
    p.start("b", 100, false);
    p.wait_master("a", Duration::from_secs(10));
    p.start_client(Duration::from_millis(10), Duration::from_secs(600));
    let _ = p.served_by_after("a", Instant::now(), Duration::from_secs(5));

    let mut master = "a";
    let mut takeovers = Vec::new();
    let mut failed = Vec::new();
    let mut two_masters = 0;
    for round in 0..rounds {
        let standby = if master == "a" { "b" } else { "a" };
        let prio = |h: &str| if h == "a" { 200 } else { 100 };
        let killed = p.kill(master);
        let (t, f) = p.served_by_after(standby, killed, Duration::from_secs(10));
        // the standby must be the one MASTER; sample while it settles
        let end = Instant::now() + Duration::from_millis(300);
        while Instant::now() < end {
            let (a, b) = p.states();
            if a.as_deref() == Some("MASTER") && b.as_deref() == Some("MASTER") {
                two_masters += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "round {:2}: {master} killed, served by {standby} after {:4} ms, {f} failed requests",
            round + 1,
            t.as_millis()
        );
        takeovers.push(t.as_secs_f64() * 1000.0);
        failed.push(f as f64);
        // the killed node returns as the standby (and clears the address it left)
        p.start(master, prio(master), false);
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let (a, b) = p.states();
            if a.as_deref() == Some("MASTER") && b.as_deref() == Some("MASTER") {
                two_masters += 1;
            }
            let back = if master == "a" { a } else { b };
            if back.as_deref() == Some("BACKUP") && !p.has_vip(master) {
                break;
            }
            assert!(Instant::now() < end, "{master} did not come back as BACKUP");
            std::thread::sleep(Duration::from_millis(20));
        }
        master = standby;
    }
    p.stop_client();
    let total = p.samples.lock().unwrap().len();
    let total_failed = p
        .samples
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.served_by.is_err())
        .count();
    takeovers.sort_by(|a, b| a.total_cmp(b));
    failed.sort_by(|a, b| a.total_cmp(b));
    println!("failover takeover, vip claim, default timings, {rounds} kills");
    println!(
        "takeover ms: p50 {:.0}  p90 {:.0}  max {:.0}  (min {:.0})",
        pct(&takeovers, 0.5),
        pct(&takeovers, 0.9),
        takeovers.last().unwrap(),
        takeovers[0]
    );
    println!(
        "failed requests per kill (client every 10 ms): p50 {:.0}  max {:.0}",
        pct(&failed, 0.5),
        failed.last().unwrap()
    );
    println!("client requests in all: {total}, failed: {total_failed}");
    println!("samples with two MASTERs: {two_masters}");
    assert_eq!(two_masters, 0, "two masters seen");
}
