//! Live changes through the real binary: config reload under load (file change and SIGHUP),
//! invalid reloads rejected whole, certificate hot reload, graceful SIGTERM drain.

use crate::common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One admin port per test directory, kept across rewrites of its config.
fn admin_port(dir: &Path) -> u16 {
    let f = dir.join("admin.port");
    if let Ok(p) = std::fs::read_to_string(&f) {
        return p.trim().parse().unwrap();
    }
    let p = free_port();
    std::fs::write(&f, p.to_string()).unwrap();
    p
}

fn config(dir: &Path, https: SocketAddr, pool: &[SocketAddr], extra_route: Option<&str>) -> String {
    let mut vhost = Vhost::new(&["a.test"]).route("/", "p");
    if let Some(path) = extra_route {
        vhost = vhost.route(path, "p");
    }
    Config::new()
        .server("watch_interval = \"100ms\"\nshutdown_timeout = \"10s\"")
        .admin_at(admin_port(dir))
        .listener(https, true, "")
        .table(
            "tls",
            &format!("certs_dir = \"{}\"", dir.join("certs").display()),
        )
        .vhost(vhost)
        .pool("p", Pool::backends(pool))
        .render(dir)
}

struct Fixture {
    // fields drop in order: stop tollgate (and print its log) before the directory goes
    tg: Tollgate,
    dir: tempfile::TempDir,
    ca: TestCa,
    https: SocketAddr,
    path: PathBuf,
}

async fn start(pool: &[SocketAddr]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    ca.issue(&dir.path().join("certs"), "a", &["a.test"], "first");
    let https = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let path = dir.path().join("tollgate.toml");
    write(&path, &config(dir.path(), https, pool, None));
    let mut tg = Tollgate::start(&path);
    tg.ready(https).await;
    Fixture {
        dir,
        ca,
        https,
        tg,
        path,
    }
}

async fn upstream_of(c: &reqwest::Client, url: &str) -> Option<String> {
    let r = c.get(url).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    let j: serde_json::Value = r.json().await.ok()?;
    j["upstream"].as_str().map(str::to_string)
}

#[tokio::test]
async fn reload_under_load_ten_changes_zero_failed_requests() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let f = start(&[a.addr]).await;
    let url = format!("https://a.test:{}/load", f.https.port());
    let c = client(&f.ca, f.https, &["a.test"]);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (c, url, stop, ok, failed) = (
            c.clone(),
            url.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
        );
        load.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                let good = match c.get(&url).send().await {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if good {
                    ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    // Ten changes: the pool flips between a and b; each must take effect before the next.
    for i in 0..10 {
        let (want, pool) = if i % 2 == 0 {
            ("b", [b.addr])
        } else {
            ("a", [a.addr])
        };
        let extra = format!("/extra{i}");
        write(&f.path, &config(f.dir.path(), f.https, &pool, Some(&extra)));
        let probe = format!("https://a.test:{}{extra}", f.https.port());
        wait_for(
            &format!("change {i} to route to {want}"),
            Duration::from_secs(10),
            || {
                let (c, probe) = (c.clone(), probe.clone());
                async move { upstream_of(&c, &probe).await.as_deref() == Some(want) }
            },
        )
        .await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!("reload under load: {ok} requests across 10 reloads, {failed} failed");
    assert!(ok > 100, "too little load to prove anything: {ok}");
    assert_eq!(
        failed, 0,
        "{failed} requests failed during reloads ({ok} succeeded)"
    );
    assert!(f.tg.log_text().matches("configuration reloaded").count() >= 10);
}

#[tokio::test]
async fn invalid_reload_is_rejected_whole_and_sighup_applies_a_good_one() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let f = start(&[a.addr]).await;
    let url = format!("https://a.test:{}/", f.https.port());
    let c = client(&f.ca, f.https, &["a.test"]);
    assert_eq!(upstream_of(&c, &url).await.as_deref(), Some("a"));

    // Invalid: the pool now points at b, but a route names a pool that does not exist.
    let bad = config(f.dir.path(), f.https, &[b.addr], None).replace(
        "pool = \"p\"\n\n[pool.p]",
        "pool = \"p\"\n[[vhost.route]]\npath = \"/x\"\npool = \"missing\"\n\n[pool.p]",
    );
    assert!(bad.contains("missing"));
    write(&f.path, &bad);
    wait_for(
        "the rejection to be logged",
        Duration::from_secs(10),
        || async { f.tg.log_text().contains("reload rejected") },
    )
    .await;
    let log = f.tg.log_text();
    assert!(log.contains("no pool named `missing`"), "{log}");
    for _ in 0..20 {
        assert_eq!(
            upstream_of(&c, &url).await.as_deref(),
            Some("a"),
            "old config must keep serving"
        );
    }

    // With file watching off, only SIGHUP applies a change.
    let good = config(f.dir.path(), f.https, &[b.addr], None)
        .replace("[server]\n", "[server]\nwatch_config = false\n");
    let written = Instant::now();
    write(&f.path, &good);
    wait_for(
        "the watched change to apply",
        Duration::from_secs(10),
        || {
            let (c, url) = (c.clone(), url.clone());
            async move { upstream_of(&c, &url).await.as_deref() == Some("b") }
        },
    )
    .await;
    let seen_in = written.elapsed();
    write(
        &f.path,
        &good.replace(&b.addr.to_string(), &a.addr.to_string()),
    );
    // the watcher applied the last change within `seen_in`: three times that (and several
    // watch intervals) passes with nothing applied
    tokio::time::sleep((3 * seen_in).max(Duration::from_millis(500))).await;
    assert_eq!(
        upstream_of(&c, &url).await.as_deref(),
        Some("b"),
        "watching is off"
    );
    f.tg.signal("HUP");
    wait_for(
        "SIGHUP to apply the change",
        Duration::from_secs(10),
        || {
            let (c, url) = (c.clone(), url.clone());
            async move { upstream_of(&c, &url).await.as_deref() == Some("a") }
        },
    )
    .await;
    assert!(f.tg.log_text().contains("trigger=\"SIGHUP\""));
}

#[tokio::test]
async fn a_request_in_flight_finishes_on_the_configuration_it_started_with() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let f = start(&[a.addr]).await;
    let c = client(&f.ca, f.https, &["a.test"]);
    let port = f.https.port();
    let slow_url = format!("https://a.test:{port}/sleep/1500");
    let c2 = c.clone();
    let slow = tokio::spawn(async move { upstream_of(&c2, &slow_url).await });
    wait_for(
        "the slow request to start",
        Duration::from_secs(10),
        || async { a.hits() == 1 },
    )
    .await;
    write(&f.path, &config(f.dir.path(), f.https, &[b.addr], None));
    let url = format!("https://a.test:{port}/");
    wait_for("new requests to go to b", Duration::from_secs(10), || {
        let (c, url) = (c.clone(), url.clone());
        async move { upstream_of(&c, &url).await.as_deref() == Some("b") }
    })
    .await;
    assert_eq!(slow.await.unwrap().as_deref(), Some("a"));
}

#[tokio::test]
async fn certificate_change_on_disk_is_served_without_restart() {
    let a = Upstream::start("a").await;
    let f = start(&[a.addr]).await;
    let url = format!("https://a.test:{}/", f.https.port());
    let c = client(&f.ca, f.https, &["a.test"]);
    assert_eq!(upstream_of(&c, &url).await.as_deref(), Some("a"));
    assert_eq!(served_cn(&f).await, "first");
    f.ca.issue(&f.dir.path().join("certs"), "a", &["a.test"], "second");
    wait_for(
        "the new certificate to be served",
        Duration::from_secs(10),
        || async { served_cn(&f).await == "second" },
    )
    .await;
    assert_eq!(upstream_of(&c, &url).await.as_deref(), Some("a"));
}

async fn served_cn(f: &Fixture) -> String {
    peer_cert_cn(&f.ca, f.https, "a.test", &[]).await.0
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests() {
    let a = Upstream::start("a").await;
    let mut f = start(&[a.addr]).await;
    let c = client(&f.ca, f.https, &["a.test"]);
    let url = format!("https://a.test:{}/sleep/1500", f.https.port());
    let slow = tokio::spawn(async move { c.get(&url).send().await.map(|r| r.status().as_u16()) });
    wait_for(
        "the slow request to reach the upstream",
        Duration::from_secs(10),
        || async { a.hits() == 1 },
    )
    .await;
    f.tg.signal("TERM");
    assert_eq!(
        slow.await.unwrap().unwrap(),
        200,
        "the in-flight request must complete"
    );
    // shutdown_timeout is 10s; with nothing left in flight tollgate exits well before it
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(status) = f.tg.child.try_wait().unwrap() {
            assert!(status.success() || status.code().is_none(), "{status}");
            break;
        }
        assert!(
            Instant::now() < end,
            "tollgate did not exit promptly once drained"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(f.tg.log_text().contains("SIGTERM received"));
}
