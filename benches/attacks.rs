//! What attacks cost, in the release build (the limits tests check the behaviour; the
//! timings are judged here, where a debug build and a busy test run do not decide them):
//!
//! - slowloris: 500 connections trickle a header byte by byte against one tollgate while a
//!   normal client alternates keep-alive requests between it and an identical twin nobody
//!   attacks. Reported: the p99 per round of both, the attacked one's ratio to its twin,
//!   and the CPU tollgate spends holding the attack.
//! - HTTP/2 rapid reset: one connection opens and cancels streams as fast as it can until
//!   the server ends it. Reported: the streams sent and tollgate's CPU for them.
//!
//! `cargo bench --bench attacks` (loopback only; 127.0.1.x sources). Under
//! `cargo test --benches` it runs a small round of each as a smoke test, with no timing
//! judged.

use std::net::SocketAddr;
use std::time::Duration;
use tollgate_testkit::attack::{ms, p99_paired, rapid_reset, slowloris};
use tollgate_testkit::{client, issue_a, one_vhost, site, site_config, Pool, Site, Upstream};

struct Size {
    attackers: u32,
    header_timeout: u64,
    rounds: usize,
    requests: usize,
    streams: usize,
}

const BENCH: Size = Size {
    attackers: 500,
    header_timeout: 10,
    rounds: 5,
    requests: 200,
    streams: 20_000,
};

const SMOKE: Size = Size {
    attackers: 50,
    header_timeout: 2,
    rounds: 1,
    requests: 20,
    streams: 500,
};

async fn edge(up: SocketAddr, limits: &str) -> Site {
    site(
        site_config()
            .table("limits", limits)
            .vhost(one_vhost().set("redirect_https", "false").route("/", "p"))
            .pool("p", Pool::backends(&[up])),
        issue_a,
    )
    .await
}

/// The attacked site's p99 within 2x of its twin's (a 1 ms floor for timer noise) in how
/// many rounds.
fn within_2x(loaded: &[f64], twin: &[f64]) -> usize {
    loaded
        .iter()
        .zip(twin)
        .filter(|(a, t)| **a <= (2.0 * **t).max(**t + 0.001))
        .count()
}

async fn slowloris_bench(size: &Size, judge: bool) {
    let up = Upstream::start("up").await;
    let limits = format!(
        "header_timeout = \"{}s\"\nmax_connections_per_ip = 1000\nconnection_rate_per_ip = 0",
        size.header_timeout
    );
    let (s, twin) = (edge(up.addr, &limits).await, edge(up.addr, &limits).await);
    let c = client(&s.ca, s.https, &["a.test"]);
    let url = format!("https://a.test:{}/", s.https.port());
    let tc = client(&twin.ca, twin.https, &["a.test"]);
    let turl = format!("https://a.test:{}/", twin.https.port());
    p99_paired((&c, &url), (&tc, &turl), 1, 50).await; // warm up
    let (calm, calm_twin) = p99_paired((&c, &url), (&tc, &turl), 3, size.requests).await;

    let timeout = Duration::from_secs(size.header_timeout);
    let (ready, attack) = slowloris(
        s.ca.pem.clone(),
        s.https,
        "a.test",
        size.attackers,
        timeout + Duration::from_secs(6),
    );
    let began = ready.await.expect("the attackers connected");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (loaded, loaded_twin) =
        p99_paired((&c, &url), (&tc, &turl), size.rounds, size.requests).await;
    let cpu0 = s.tg.cpu_seconds();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let attack_cpu = s.tg.cpu_seconds() - cpu0;
    let measured_within = began.elapsed();
    let cut = tokio::task::spawn_blocking(move || attack.join().unwrap())
        .await
        .unwrap()
        .into_iter()
        .flatten()
        .count();
    let within = within_2x(&loaded, &loaded_twin);
    println!(
        "slowloris, {} connections: p99 per round, ms: calm {:?} (twin {:?}); attacked {:?} \
         (twin {:?}), within 2x of the twin in {within} of {} rounds, measured within \
         {measured_within:?}; holding the attack: {attack_cpu:.3} CPU-s/s; {cut} cut",
        size.attackers,
        ms(&calm),
        ms(&calm_twin),
        ms(&loaded),
        ms(&loaded_twin),
        loaded.len(),
    );
    assert_eq!(cut, size.attackers as usize, "every attacker is cut");
    if judge {
        assert!(
            measured_within < timeout,
            "the loaded rounds ran while every attacker held its connection"
        );
        assert!(
            within * 2 > loaded.len(),
            "p99 within 2x of the twin's in {within} of {} rounds",
            loaded.len()
        );
        assert!(
            attack_cpu < 0.3,
            "{} trickling connections cost {attack_cpu} CPU-seconds a second",
            size.attackers
        );
    }
}

async fn rapid_reset_bench(size: &Size, judge: bool) {
    let up = Upstream::start("up").await;
    let s = edge(up.addr, "").await;
    let cpu_before = s.tg.cpu_seconds();
    let r = rapid_reset(&s.ca, s.https, "a.test", size.streams).await;
    let cpu = s.tg.cpu_seconds() - cpu_before;
    println!(
        "rapid reset: {} streams sent before the server ended the connection ({}); \
         {cpu:.3} s of tollgate CPU (counted in 10 ms ticks)",
        r.sent,
        if r.goaway { "GOAWAY" } else { "not ended" }
    );
    if judge {
        assert!(
            r.sent < size.streams,
            "the server ends a rapid-reset connection"
        );
        assert!(cpu < 1.0, "tollgate used {cpu:.2} s of CPU");
    }
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let size = if bench { &BENCH } else { &SMOKE };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        slowloris_bench(size, bench).await;
        rapid_reset_bench(size, bench).await;
    });
}
