//! Consul-driven pools against a real Consul agent (installed by scripts/install-consul):
//! registration, deregistration, health flips, Consul dying and coming back with its state
//! lost, while tollgate keeps serving.

use crate::common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Fixture {
    tg: Tollgate,
    consul: ConsulAgent,
    dir: tempfile::TempDir,
    http: SocketAddr,
    _path: PathBuf,
}

async fn start() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let consul = ConsulAgent::start(dir.path()).await;
    // the state file where tollgate keeps it by default, for the restart test
    let cfg = Config::new()
        .consul(&consul, "state_file = \"{dir}/tollgate-consul-state.json\"")
        .http()
        .vhost(Vhost::new(&["a.test"]).route("/", "api"))
        .pool(
            "api",
            Pool::consul("api", &["prod"]).set("connect_timeout", "\"500ms\""),
        );
    let http = cfg.http_addr();
    let path = Config::path_in(dir.path());
    let tg = cfg.start(dir.path()).await;
    Fixture {
        tg,
        consul,
        dir,
        http,
        _path: path,
    }
}

fn plain() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn who(c: &reqwest::Client, http: SocketAddr) -> Result<String, String> {
    let r = c
        .get(format!("http://{http}/"))
        .header("host", "a.test")
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let text = r.text().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {text}"));
    }
    let j: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    Ok(j["upstream"].as_str().unwrap_or_default().to_string())
}

/// Which upstreams answer over `n` requests.
async fn serving(c: &reqwest::Client, http: SocketAddr, n: usize) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for _ in 0..n {
        if let Ok(u) = who(c, http).await {
            set.insert(u);
        }
    }
    set
}

async fn wait_serving(f: &Fixture, want: &[&str]) -> Duration {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let c = plain();
    let started = Instant::now();
    wait_for(
        &format!("tollgate to route to exactly {want:?}"),
        Duration::from_secs(15),
        || {
            let (c, want) = (c.clone(), want.clone());
            let http = f.http;
            async move { serving(&c, http, 8).await == want }
        },
    )
    .await;
    started.elapsed()
}

#[tokio::test]
async fn registration_is_routed_and_deregistration_removes_it() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let other = Upstream::start("untagged").await;
    let f = start().await;
    let c = plain();
    // no instance yet: a clear 503
    let err = who(&c, f.http).await.unwrap_err();
    assert!(err.starts_with("503"), "{err}");
    assert!(
        err.contains("Consul reports no passing instance of api[prod]"),
        "{err}"
    );

    f.consul.register("api-a", "api", a.addr, &["prod"]).await;
    f.consul
        .register("api-x", "api", other.addr, &["canary"])
        .await; // wrong tag: never routed
    let took = wait_serving(&f, &["a"]).await;
    eprintln!("registration routed after {took:?}");
    f.consul.register("api-b", "api", b.addr, &["prod"]).await;
    wait_serving(&f, &["a", "b"]).await;
    f.consul.deregister("api-a").await;
    wait_serving(&f, &["b"]).await;
    assert_eq!(other.hits(), 0, "an instance without the tag got traffic");
    let log = f.tg.log_text();
    assert!(log.contains("pools rebuilt from Consul"), "{log}");
}

#[tokio::test]
async fn a_failing_health_check_removes_the_instance_and_passing_restores_it() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let f = start().await;
    f.consul.register("api-a", "api", a.addr, &["prod"]).await;
    f.consul.register("api-b", "api", b.addr, &["prod"]).await;
    wait_serving(&f, &["a", "b"]).await;
    f.consul.set_check("api-a", false).await;
    wait_serving(&f, &["b"]).await;
    f.consul.set_check("api-a", true).await;
    wait_serving(&f, &["a", "b"]).await;
}

#[tokio::test]
async fn instance_changes_under_load_lose_no_request() {
    let ups = [
        Upstream::start("u0").await,
        Upstream::start("u1").await,
        Upstream::start("u2").await,
    ];
    let f = start().await;
    f.consul
        .register("api-0", "api", ups[0].addr, &["prod"])
        .await;
    wait_serving(&f, &["u0"]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..3 {
        let (stop, ok, failed, http) = (stop.clone(), ok.clone(), failed.clone(), f.http);
        load.push(tokio::spawn(async move {
            let c = plain();
            let end = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                match who(&c, http).await {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        eprintln!("failed: {e}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }));
    }
    // instances come and go; one always stays registered
    for round in 0..3 {
        f.consul
            .register("api-1", "api", ups[1].addr, &["prod"])
            .await;
        f.consul
            .register("api-2", "api", ups[2].addr, &["prod"])
            .await;
        // re-registering keeps a check's state: pass it again explicitly
        f.consul.set_check("api-2", true).await;
        wait_serving(&f, &["u0", "u1", "u2"]).await;
        f.consul.deregister("api-1").await;
        f.consul.set_check("api-2", false).await;
        wait_serving(&f, &["u0"]).await;
        eprintln!("round {round} done");
    }
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!("instance changes under load: {ok} requests, {failed} failed");
    assert!(ok > 100);
    assert_eq!(failed, 0);
}

#[tokio::test]
async fn consul_dying_keeps_the_last_known_pools_and_a_fresh_consul_takes_over() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let mut f = start().await;
    f.consul.register("api-a", "api", a.addr, &["prod"]).await;
    wait_serving(&f, &["a"]).await;
    f.consul.kill().await;
    // Consul is gone: the watch fails and the pool keeps serving what it had.
    wait_for("the watch to notice", Duration::from_secs(10), || async {
        f.tg.log_text().contains("Consul watch failed")
    })
    .await;
    let c = plain();
    for _ in 0..50 {
        assert_eq!(
            who(&c, f.http).await.unwrap(),
            "a",
            "the last known pool must keep serving"
        );
    }
    // A fresh agent on the same address: its state (and index) start over.
    let dir: &Path = f.dir.path();
    let dir = dir.to_path_buf();
    f.consul.restart(&dir).await;
    f.consul.register("api-b", "api", b.addr, &["prod"]).await;
    wait_serving(&f, &["b"]).await;
    assert!(f.tg.log_text().contains("Consul answers again"));
}

#[tokio::test]
async fn the_guard_never_empties_a_pool_unless_every_instance_is_critical() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let f = start().await;
    f.consul.register("api-a", "api", a.addr, &["prod"]).await;
    wait_serving(&f, &["a"]).await;
    // The only instance disappears from Consul entirely: suspicious news, not applied.
    f.consul.deregister("api-a").await;
    wait_for(
        "the guard to refuse the empty answer",
        Duration::from_secs(10),
        || async {
            f.tg.log_text()
                .contains("GUARD: Consul answered with no instance at all")
        },
    )
    .await;
    let c = plain();
    for _ in 0..20 {
        assert_eq!(who(&c, f.http).await.unwrap(), "a");
    }
    // A real outage: the instance exists and its check is critical. The pool empties.
    f.consul.register("api-b", "api", b.addr, &["prod"]).await;
    wait_serving(&f, &["b"]).await;
    f.consul.set_check("api-b", false).await;
    wait_for(
        "the pool to empty on an all-critical service",
        Duration::from_secs(10),
        || {
            let c = c.clone();
            let http = f.http;
            async move { who(&c, http).await.is_err_and(|e| e.starts_with("503")) }
        },
    )
    .await;
    assert!(f.tg.log_text().contains("every instance is critical"));
}

#[tokio::test]
async fn a_restart_while_consul_is_down_serves_the_last_known_pools() {
    let a = Upstream::start("a").await;
    let mut f = start().await;
    f.consul.register("api-a", "api", a.addr, &["prod"]).await;
    wait_serving(&f, &["a"]).await;
    let state = f.dir.path().join("tollgate-consul-state.json");
    wait_for("the view to be saved", Duration::from_secs(5), || async {
        std::fs::read_to_string(&state).is_ok_and(|s| s.contains(&a.addr.port().to_string()))
    })
    .await;
    f.consul.kill().await;
    let _ = f.tg.child.kill();
    let _ = f.tg.child.wait();
    // tollgate comes back while Consul is still dead
    let mut tg = Tollgate::start(&f._path);
    tg.ready(f.http).await;
    let c = plain();
    for _ in 0..20 {
        assert_eq!(
            who(&c, f.http).await.unwrap(),
            "a",
            "the saved view must serve"
        );
    }
    assert!(tg
        .log_text()
        .contains("serving the last known Consul view until Consul answers"));
    f.tg = tg;
}

/// tollgate in front of `consul` with `token` in its [consul] section.
async fn start_with(consul: &ConsulAgent, dir: &Path, token: &str) -> (Tollgate, SocketAddr, u16) {
    let cfg = Config::new()
        .consul(consul, &format!("token = \"{token}\""))
        .http()
        .vhost(Vhost::new(&["a.test"]).route("/", "api"))
        .pool("api", Pool::consul("api", &[]));
    let http = cfg.http_addr();
    let path = dir.join(format!("tollgate-{}.toml", http.port()));
    let tg = cfg.start_as(&path).await;
    (tg, http, cfg.admin_port())
}

#[tokio::test]
async fn an_acl_agent_serves_with_the_right_token_and_a_wrong_token_is_a_clear_error() {
    let a = Upstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let consul = ConsulAgent::start_with_acl(dir.path(), "root-token-for-tests").await;
    consul.register("api-a", "api", a.addr, &[]).await;

    let (good, http, admin) = start_with(&consul, dir.path(), "root-token-for-tests").await;
    let c = plain();
    wait_for(
        "routing with the right token",
        Duration::from_secs(15),
        || {
            let c = c.clone();
            async move { who(&c, http).await.as_deref() == Ok("a") }
        },
    )
    .await;
    // /status shows the watch, healthy and fresh; /pools names the Consul index
    let status = admin_json(&c, admin, "/status").await;
    let w = &status["consul"]["watches"][0];
    assert_eq!(status["consul"]["configured"], true);
    assert_eq!(w["service"], "api");
    assert_eq!(w["healthy"], true);
    assert!(w["stale_seconds"].as_u64().unwrap() < 60);
    let pools = admin_json(&c, admin, "/pools").await;
    let src = pools[0]["source"].as_str().unwrap();
    assert!(src.starts_with("consul service api at index "), "{src}");
    let metrics = admin_text(&c, admin, "/metrics").await;
    assert!(metrics.contains("tollgate_consul_watch_staleness_seconds{service=\"api\"}"));
    drop(good);

    let (bad, http, admin) = start_with(&consul, dir.path(), "not-a-token").await;
    wait_for(
        "the wrong token to be reported",
        Duration::from_secs(15),
        || async {
            bad.log_text()
                .contains("403 Forbidden: the Consul token cannot read service `api`")
        },
    )
    .await;
    let err = who(&c, http).await.unwrap_err();
    assert!(
        err.starts_with("503") && err.contains("no passing instance"),
        "{err}"
    );
    let status = admin_json(&c, admin, "/status").await;
    let w = &status["consul"]["watches"][0];
    assert_eq!(w["healthy"], false);
    assert!(
        w["last_error"].as_str().unwrap().contains("403 Forbidden"),
        "{w}"
    );
}

#[tokio::test]
async fn five_hundred_services_of_four_instances_are_all_routed_and_tollgate_idles() {
    const SERVICES: usize = 500;
    let ups = [
        Upstream::start("u0").await,
        Upstream::start("u1").await,
        Upstream::start("u2").await,
        Upstream::start("u3").await,
    ];
    let dir = tempfile::tempdir().unwrap();
    let consul = ConsulAgent::start(dir.path()).await;
    // 2000 registrations, 32 at a time
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let consul_http = consul.http;
    let mut regs = tokio::task::JoinSet::new();
    let client = reqwest::Client::new();
    for s in 0..SERVICES {
        for (k, up) in ups.iter().enumerate() {
            let (sem, client, addr) = (sem.clone(), client.clone(), up.addr);
            regs.spawn(async move {
                let _p = sem.acquire_owned().await;
                let body = serde_json::json!({
                    "ID": format!("svc{s}-{k}"), "Name": format!("svc{s}"),
                    "Address": "127.0.0.1", "Port": addr.port(),
                    "Check": { "CheckID": format!("check-svc{s}-{k}"), "TTL": "10m", "Status": "passing" },
                });
                let r = client
                    .put(format!("http://{consul_http}/v1/agent/service/register"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
            });
        }
    }
    while let Some(r) = regs.join_next().await {
        r.unwrap();
    }
    // The agent copies its registrations into the catalog (which the health endpoints read)
    // by anti-entropy, in the background; on a slow machine that runs for seconds. Wait for
    // the catalog to hold all of them and for its health index to stop moving, so that "idle"
    // below really means nothing changes in Consul.
    let health = format!("http://{consul_http}/v1/health/state/passing");
    let end = Instant::now() + Duration::from_secs(60);
    let mut settled: Option<(String, Instant)> = None;
    loop {
        assert!(
            Instant::now() < end,
            "Consul's catalog never settled with all {} passing instances",
            SERVICES * 4
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(r) = client.get(&health).send().await else {
            continue;
        };
        let index = r
            .headers()
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let Ok(checks) = r.json::<Vec<Value>>().await else {
            continue;
        };
        let ours = checks
            .iter()
            .filter(|c| {
                c["ServiceName"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("svc"))
            })
            .count();
        if ours != SERVICES * 4 {
            settled = None;
            continue;
        }
        match &settled {
            Some((i, since)) if *i == index => {
                if since.elapsed() >= Duration::from_secs(1) {
                    break;
                }
            }
            _ => settled = Some((index, Instant::now())),
        }
    }

    let mut vhost = Vhost::new(&["a.test"]);
    let mut cfg = Config::new().no_admin().consul(&consul, "").http();
    for s in 0..SERVICES {
        vhost = vhost.route(&format!("/s{s}"), &format!("p{s}"));
        cfg = cfg.pool(&format!("p{s}"), Pool::consul(&format!("svc{s}"), &[]));
    }
    let cfg = cfg.vhost(vhost);
    let http = cfg.http_addr();
    let started = Instant::now();
    let mut tg = cfg.start(dir.path()).await;
    let c = plain();
    // every route answers from its pool
    let mut pending: Vec<usize> = (0..SERVICES).collect();
    let end = Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() {
        assert!(
            Instant::now() < end,
            "{} services never routed",
            pending.len()
        );
        let mut still = Vec::new();
        for s in pending {
            let r = c
                .get(format!("http://{http}/s{s}"))
                .header("host", "a.test")
                .send()
                .await;
            if !r.is_ok_and(|r| r.status() == 200) {
                still.push(s);
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!(
        "{SERVICES} services x 4 instances routed {:?} after start",
        started.elapsed()
    );
    assert!(tg
        .log_text()
        .contains("watching changes through /v1/health/state/any"));

    // idle between changes: no busy polling
    let pid = tg.child.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_seconds(pid) - cpu0;
    let share = used / t0.elapsed().as_secs_f64();
    eprintln!(
        "tollgate CPU while nothing changes: {used:.3}s over 3s ({:.1}% of a core)",
        share * 100.0
    );
    assert!(
        share < 0.05,
        "tollgate used {:.1}% of a core with nothing changing",
        share * 100.0
    );

    // a change still converges on the fallback path
    let r = client
        .put(format!(
            "http://{}/v1/agent/service/deregister/svc7-0",
            consul.http
        ))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    wait_for(
        "svc7 to lose its instance on u0",
        Duration::from_secs(15),
        || {
            let c = c.clone();
            async move {
                let mut set = BTreeSet::new();
                for _ in 0..12 {
                    if let Ok(r) = c
                        .get(format!("http://{http}/s7"))
                        .header("host", "a.test")
                        .send()
                        .await
                    {
                        if let Ok(j) = r.json::<Value>().await {
                            set.insert(j["upstream"].as_str().unwrap_or_default().to_string());
                        }
                    }
                }
                set == BTreeSet::from(["u1".to_string(), "u2".to_string(), "u3".to_string()])
            }
        },
    )
    .await;
    let _ = tg.child.kill();
}

#[tokio::test]
async fn a_removed_instance_drains_and_a_dead_one_is_retried_elsewhere() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let f = start().await;
    f.consul.register("api-a", "api", a.addr, &["prod"]).await;
    wait_serving(&f, &["a"]).await;
    // A slow request is in flight to a when a is deregistered: it completes.
    let http = f.http;
    let slow = tokio::spawn(async move {
        let r = plain()
            .get(format!("http://{http}/sleep/1500"))
            .header("host", "a.test")
            .send()
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.json::<Value>().await.unwrap()["upstream"].clone(),
        )
    });
    wait_for(
        "the slow request to reach a",
        Duration::from_secs(5),
        || async { a.hits() >= 1 },
    )
    .await;
    f.consul.register("api-b", "api", b.addr, &["prod"]).await;
    f.consul.deregister("api-a").await;
    wait_serving(&f, &["b"]).await;
    assert_eq!(
        slow.await.unwrap(),
        (200, Value::from("a")),
        "the in-flight request drains"
    );

    // a comes back; then b dies before Consul knows: GETs are retried on a, none fails.
    f.consul.register("api-a", "api", a.addr, &["prod"]).await;
    wait_serving(&f, &["a", "b"]).await;
    b.kill();
    let c = plain();
    for i in 0..40 {
        assert_eq!(
            who(&c, f.http).await.as_deref(),
            Ok("a"),
            "request {i} after b died"
        );
    }
}

#[tokio::test]
async fn services_declare_routes_in_tags_and_the_file_wins_conflicts() {
    let file_up = Upstream::start("file").await;
    let shop = Upstream::start("shop").await;
    let blog = Upstream::start("blog").await;
    let docs = Upstream::start("docs").await;
    let dir = tempfile::tempdir().unwrap();
    let consul = ConsulAgent::start(dir.path()).await;
    let (path, http, admin) = tag_routing(
        dir.path(),
        &consul,
        "",
        &[Vhost::new(&["a.test"])
            .set("consul_routes", "true")
            .route("/", "static")],
        file_up.addr,
    );
    let mut tg = Tollgate::start(&path);
    tg.ready(http).await;
    tg.ready(SocketAddr::from(([127, 0, 0, 1], admin))).await;
    consul
        .register(
            "shop-1",
            "shop",
            shop.addr,
            &[
                "tollgate.route=shop.test/",
                "urlprefix-a.test/cart strip=/cart",
            ],
        )
        .await;
    consul
        .register("blog-1", "blog", blog.addr, &["tollgate.route=a.test/"])
        .await;
    // an operator who keeps tags clean declares routes in service meta
    let meta =
        serde_json::json!({"tollgate-route": "docs.test/guide", "tollgate-route-2": "a.test/docs"});
    consul
        .register_with_meta("docs-1", "docs", docs.addr, meta)
        .await;

    let c = plain();
    let get = |host: &'static str, p: &'static str| answered_by(&c, http, host, p);
    wait_for(
        "the tag and meta routes to appear",
        Duration::from_secs(15),
        || async {
            get("shop.test", "/").await.as_deref() == Some("shop")
                && get("a.test", "/cart/x").await.as_deref() == Some("shop")
                && get("docs.test", "/guide/intro").await.as_deref() == Some("docs")
                && get("a.test", "/docs").await.as_deref() == Some("docs")
        },
    )
    .await;
    assert_eq!(
        get("a.test", "/").await.as_deref(),
        Some("file"),
        "the file's route wins the conflict"
    );
    let status = admin_json(&c, admin, "/status").await;
    let conflicts = status["consul"]["route_conflicts"].as_array().unwrap();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    let conflict = conflicts[0].as_str().unwrap();
    assert!(
        conflict.contains("service blog") && conflict.contains("already routed by file"),
        "{conflict}"
    );
    assert!(tg
        .log_text()
        .contains("route conflict: consul tag `tollgate.route=a.test/` of service blog"));
    let routes = admin_json(&c, admin, "/routes").await;
    let shop_vhost = routes
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vhost"] == "shop.test")
        .unwrap();
    assert_eq!(shop_vhost["routes"][0]["pool"], "consul:shop");
    assert!(shop_vhost["routes"][0]["source"]
        .as_str()
        .unwrap()
        .starts_with("consul tag `tollgate.route=shop.test/` of service shop at index "));

    // the service goes away: its routes go with it
    consul.deregister("shop-1").await;
    wait_for("the tag routes to go", Duration::from_secs(15), || async {
        get("shop.test", "/").await.as_deref() == Some("421")
            && get("a.test", "/cart/x").await.as_deref() == Some("file")
    })
    .await;
    let _ = tg.child.kill();
}

#[tokio::test]
async fn consul_over_https_is_trusted_through_its_ca_file_only() {
    let a = Upstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let consul = ConsulAgent::start_tls(dir.path(), &ca).await;
    let https = consul.https.expect("an HTTPS listener");
    let ca_file = dir.path().join("consul-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let start = |trust: &str| {
        let cfg = Config::new()
            .no_admin()
            .consul_at(&format!("https://{https}"), trust)
            .http()
            .vhost(Vhost::new(&["a.test"]).route("/", "api"))
            .pool("api", Pool::consul("api", &[]));
        let http = cfg.http_addr();
        let path = dir.path().join(format!("tollgate-{}.toml", http.port()));
        cfg.write(&path);
        (Tollgate::start(&path), http)
    };
    let (mut tg, http) = start(&format!("ca_cert = \"{}\"\n", ca_file.display()));
    tg.ready(http).await;
    // without the CA (no system roots are used either), the agent is not trusted
    let (mut untrusting, http2) = start("");
    untrusting.ready(http2).await;
    consul.register("api-a", "api", a.addr, &[]).await;
    let c = plain();
    wait_for(
        "the HTTPS watch to route api-a",
        Duration::from_secs(20),
        || {
            let c = c.clone();
            async move { who(&c, http).await.as_deref() == Ok("a") }
        },
    )
    .await;
    wait_for(
        "the untrusting tollgate to log why",
        Duration::from_secs(20),
        || {
            let log = untrusting.log_text();
            async move { log.contains("invalid peer certificate: UnknownIssuer") }
        },
    )
    .await;
    let err = who(&c, http2).await.unwrap_err();
    assert!(
        err.starts_with("503"),
        "never an instance it could not verify: {err}"
    );
}

/// Who may claim what: a rogue service cannot take a path under a file vhost that did not
/// opt in, nor a host no rule gives it; allowed claims say what allowed them; `check
/// --consul` predicts the same from the live catalog before tollgate runs it.
#[tokio::test]
async fn route_claims_follow_the_policy_and_check_consul_predicts_them() {
    let file_up = Upstream::start("file").await;
    let shop = Upstream::start("shop").await;
    let blog = Upstream::start("blog").await;
    let rogue = Upstream::start("rogue").await;
    let dir = tempfile::tempdir().unwrap();
    let consul = ConsulAgent::start(dir.path()).await;
    let (path, http, admin) = tag_routing(
        dir.path(),
        &consul,
        "[[consul.allow]]\nhosts = [\"*.apps.test\", \"b.test\"]\nservices = [\"web-*\"]\ntags = [\"team=web\"]\n",
        &[
            Vhost::new(&["a.test"]).route("/", "static"),
            Vhost::new(&["b.test"])
                .set("consul_routes", "[\"web-blog\"]")
                .route("/", "static"),
        ],
        file_up.addr,
    );
    // the catalog before tollgate runs
    consul
        .register(
            "shop-1",
            "web-shop",
            shop.addr,
            &["tollgate.route=shop.apps.test/", "team=web"],
        )
        .await;
    consul
        .register(
            "blog-1",
            "web-blog",
            blog.addr,
            &["tollgate.route=b.test/blog", "team=web"],
        )
        .await;
    for (id, tag) in [
        ("rogue-1", "tollgate.route=a.test/admin"), // a.test did not opt in
        ("rogue-2", "tollgate.route=pay.apps.test/"), // no rule for service rogue
        ("rogue-3", "tollgate.route=b.test/admin"), // not in b.test's consul_routes
    ] {
        consul
            .register(id, "rogue", rogue.addr, &[tag, "team=web"])
            .await;
    }
    // a web-* service without the team tag matches no rule
    consul
        .register(
            "notag-1",
            "web-notag",
            rogue.addr,
            &["tollgate.route=notag.apps.test/"],
        )
        .await;

    let expect_refused = [
        ("tollgate.route=a.test/admin", "vhost a.test"),
        (
            "tollgate.route=pay.apps.test/",
            "no consul.allow rule lets service rogue claim pay.apps.test/",
        ),
        (
            "tollgate.route=b.test/admin",
            "service rogue is not in the consul_routes of vhost b.test",
        ),
        (
            "tollgate.route=notag.apps.test/",
            "no consul.allow rule lets service web-notag",
        ),
    ];
    // check --consul says it before anything runs: exit 2, the applied and refused claims
    let out = std::process::Command::new(Tollgate::bin())
        .args(["check", "--consul", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("routes declared"), "{text}");
    assert!(
        text.lines().any(
            |l| l.starts_with("applied  shop.apps.test/ -> consul:web-shop")
                && l.contains("allowed by consul.allow[0]")
        ),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("applied  b.test/blog -> consul:web-blog")
                && l.contains("allowed by the consul_routes of vhost b.test")
                && l.contains("and consul.allow[0]")),
        "{text}"
    );
    for (tag, why) in expect_refused {
        assert!(
            text.lines()
                .any(|l| l.starts_with("conflict ") && l.contains(tag) && l.contains(why)),
            "{tag}: {why} in\n{text}"
        );
    }

    let mut tg = Tollgate::start(&path);
    tg.ready(http).await;
    tg.ready(SocketAddr::from(([127, 0, 0, 1], admin))).await;
    let c = plain();
    let get = |host: &'static str, p: &'static str| answered_by(&c, http, host, p);
    wait_for(
        "the allowed claims to route",
        Duration::from_secs(15),
        || async {
            get("shop.apps.test", "/").await.as_deref() == Some("shop")
                && get("b.test", "/blog/post").await.as_deref() == Some("blog")
        },
    )
    .await;
    // refused: the file keeps its paths, unclaimed hosts stay unknown
    assert_eq!(get("a.test", "/admin").await.as_deref(), Some("file"));
    assert_eq!(get("b.test", "/admin").await.as_deref(), Some("file"));
    assert_eq!(get("pay.apps.test", "/").await.as_deref(), Some("421"));
    assert_eq!(get("notag.apps.test", "/").await.as_deref(), Some("421"));

    let conflicts = route_conflicts(&c, admin).await;
    assert_eq!(conflicts.len(), 4, "{conflicts:#?}");
    for (tag, why) in expect_refused {
        assert!(
            conflicts
                .iter()
                .any(|c| c.contains(tag) && c.contains(why) && c.contains("refused")),
            "{tag}: {why} in {conflicts:#?}"
        );
    }
    let metrics = admin_text(&c, admin, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "tollgate_consul_route_conflicts 4"),
        "{metrics}"
    );
    assert!(tg
        .log_text()
        .contains("route conflict: consul tag `tollgate.route=a.test/admin` of service rogue"));
    let explain = admin_json(&c, admin, "/explain?host=shop.apps.test&path=/").await;
    assert!(
        explain["route"]["allowed_by"]
            .as_str()
            .unwrap_or_default()
            .starts_with("consul.allow[0] ("),
        "{explain}"
    );
    let explain = admin_json(&c, admin, "/explain?host=a.test&path=/admin").await;
    assert!(
        explain["route"]["allowed_by"].is_null(),
        "a file route: {explain}"
    );
    assert!(explain["route"]["source"]
        .as_str()
        .unwrap()
        .starts_with("file "));
    let _ = tg.child.kill();
}

/// Fabio's `urlprefix-` options: the ones with an HTTP meaning are honoured (strip,
/// prepend, host, redirect, allow/deny); any other makes the route a conflict naming the
/// option instead of a route served without what its owner asked for.
#[tokio::test]
async fn fabio_options_are_honoured_and_unsupported_ones_reported() {
    let up = Upstream::start("svc").await;
    let dir = tempfile::tempdir().unwrap();
    let consul = ConsulAgent::start(dir.path()).await;
    let (path, http, admin) = tag_routing(
        dir.path(),
        &consul,
        "",
        &[Vhost::new(&["file.test"]).route("/", "static")],
        up.addr,
    );
    let mut tg = Tollgate::start(&path);
    tg.ready(http).await;
    tg.ready(SocketAddr::from(([127, 0, 0, 1], admin))).await;
    for (id, tag) in [
        (
            "s",
            "urlprefix-s.test/cart strip=/cart prepend=/v2 host=dst",
        ),
        ("h", "urlprefix-h.test/ host=api.internal"),
        (
            "old",
            "urlprefix-old.test/ redirect=301,https://new.test$path",
        ),
        ("acl", "urlprefix-acl.test/ allow=ip:127.0.0.2"),
        ("deny", "urlprefix-deny.test/ deny=ip:127.0.0.3/32"),
        ("tls", "urlprefix-tls.test/ proto=https tlsskipverify=true"),
        ("reg", "urlprefix-reg.test/ register=web"),
    ] {
        consul.register(id, id, up.addr, &[tag]).await;
    }
    let c = from([127, 0, 0, 1]);
    let get = |c: reqwest::Client, host: &'static str, p: &'static str| async move {
        c.get(format!("http://{http}{p}"))
            .header("host", host)
            .send()
            .await
            .unwrap()
    };
    wait_for("every tag to be seen", Duration::from_secs(15), || async {
        let status = admin_json(&c, admin, "/status").await;
        let conflicts = status["consul"]["route_conflicts"]
            .as_array()
            .map_or(0, |a| a.len());
        let mut seen = conflicts == 2;
        // the routes, and their pools' first answers (a new pool is empty until then)
        for (from_ip, host, p, want) in [
            ([127, 0, 0, 1], "s.test", "/cart/x", 200),
            ([127, 0, 0, 1], "h.test", "/", 200),
            ([127, 0, 0, 1], "old.test", "/", 301),
            ([127, 0, 0, 2], "acl.test", "/", 200),
            ([127, 0, 0, 1], "deny.test", "/", 200),
        ] {
            seen &= get(from(from_ip), host, p).await.status() == want;
        }
        seen
    })
    .await;

    // strip, then prepend; Host is the backend's address; the stripped prefix is said
    let j: Value = get(c.clone(), "s.test", "/cart/x?q=1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(j["path"], "/v2/x");
    assert_eq!(j["query"], "q=1");
    assert_eq!(j["headers"]["host"], up.addr.to_string());
    assert_eq!(j["headers"]["x-forwarded-prefix"], "/cart");
    assert_eq!(j["headers"]["x-forwarded-host"], "s.test");
    let j: Value = get(c.clone(), "s.test", "/cart")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(j["path"], "/v2/");
    let j: Value = get(c.clone(), "h.test", "/a").await.json().await.unwrap();
    assert_eq!(
        (j["path"].as_str(), j["headers"]["host"].as_str()),
        (Some("/a"), Some("api.internal"))
    );

    // redirect: answered by tollgate, $path is the request's path and query
    let r = get(c.clone(), "old.test", "/a/b?x=1").await;
    assert_eq!(r.status(), 301);
    assert_eq!(r.headers()["location"], "https://new.test/a/b?x=1");

    // allow / deny by the client's address
    assert_eq!(get(c.clone(), "acl.test", "/").await.status(), 403);
    assert_eq!(
        get(from([127, 0, 0, 2]), "acl.test", "/").await.status(),
        200
    );
    assert_eq!(get(c.clone(), "deny.test", "/").await.status(), 200);
    assert_eq!(
        get(from([127, 0, 0, 3]), "deny.test", "/").await.status(),
        403
    );

    // unsupported options: not routed, reported naming the option
    assert_eq!(get(c.clone(), "tls.test", "/").await.status(), 421);
    assert_eq!(get(c.clone(), "reg.test", "/").await.status(), 421);
    let conflicts = route_conflicts(&c, admin).await;
    assert_eq!(conflicts.len(), 2, "{conflicts:#?}");
    for (service, option) in [
        ("tls", "`tlsskipverify=true` is not honoured from Consul"),
        ("reg", "`register=web` is not supported"),
    ] {
        assert!(
            conflicts
                .iter()
                .any(|c| c.contains(&format!("of service {service} "))
                    && c.contains("not applied")
                    && c.contains(option)),
            "{service}: {option} in {conflicts:#?}"
        );
    }
    // /routes shows a route's options
    let routes = admin_json(&c, admin, "/routes").await;
    let s = routes
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vhost"] == "s.test")
        .unwrap();
    assert_eq!(s["routes"][0]["options"]["strip"], "/cart");
    let _ = tg.child.kill();
}

/// A file route and a Consul tag route with the same options (strip, prepend, host,
/// redirect with `$path` and `$host`, allow) do the same thing to the same requests: one
/// table of route options, one implementation.
#[tokio::test]
async fn file_routes_and_tag_routes_apply_the_same_options() {
    let up = Upstream::start("svc").await;
    let dir = tempfile::tempdir().unwrap();
    let consul = ConsulAgent::start(dir.path()).await;
    let file = Vhost::new(&["file.test"])
        .route("/", "static")
        .route_with(
            "/cart",
            "static",
            "strip = \"/cart\"\nprepend = \"/v2\"\nhost = \"api.internal\"",
        )
        .route_with("/old", "", "redirect = { to = \"https://new.test$path\" }")
        .route_with(
            "/h",
            "",
            "redirect = { to = \"https://$host/new$path\", status = 308 }",
        )
        .route_with("/acl", "static", "allow = [\"127.0.0.2\"]");
    let (path, http, admin) = tag_routing(dir.path(), &consul, "", &[file], up.addr);
    let (code, out) = run_check(&path);
    assert_eq!(code, 0, "{out}");
    let mut tg = Tollgate::start(&path);
    tg.ready(http).await;
    tg.ready(SocketAddr::from(([127, 0, 0, 1], admin))).await;
    let tags = [
        "urlprefix-tag.test/",
        "urlprefix-tag.test/cart strip=/cart prepend=/v2 host=api.internal",
        "urlprefix-tag.test/old redirect=301,https://new.test$path",
        "urlprefix-tag.test/h redirect=308,https://$host/new$path",
        "urlprefix-tag.test/acl allow=ip:127.0.0.2",
    ];
    consul.register("svc-1", "svc", up.addr, &tags).await;
    // what a client sees: status, Location, and what the upstream read (path, Host,
    // X-Forwarded-Prefix)
    let seen = |ip: [u8; 4], host: &'static str, p: &'static str| {
        let c = from(ip);
        async move {
            let r = c
                .get(format!("http://{http}{p}"))
                .header("host", host)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let location = r
                .headers()
                .get("location")
                .map(|l| l.to_str().unwrap().to_string());
            let upstream = if status == 200 {
                let j: Value = r.json().await.unwrap();
                Some((
                    j["path"].as_str().unwrap().to_string(),
                    j["query"].as_str().map(str::to_string),
                    j["headers"]["host"].as_str().unwrap().to_string(),
                    j["headers"]["x-forwarded-prefix"]
                        .as_str()
                        .map(str::to_string),
                ))
            } else {
                None
            };
            (status, location, upstream)
        }
    };
    wait_for("the tag routes", Duration::from_secs(15), || async {
        seen([127, 0, 0, 2], "tag.test", "/acl").await.0 == 200
            && seen([127, 0, 0, 1], "tag.test", "/old").await.0 == 301
    })
    .await;
    let cases: [([u8; 4], &str, &str); 8] = [
        ([127, 0, 0, 1], "/cart/x?q=1", "strip, prepend, host"),
        ([127, 0, 0, 1], "/cart", "the prefix alone"),
        ([127, 0, 0, 1], "/old/a?b=1", "redirect with $path"),
        (
            [127, 0, 0, 1],
            "//old/a",
            "an attacker's //: the normalised path",
        ),
        ([127, 0, 0, 1], "/h/x", "redirect with $host"),
        ([127, 0, 0, 1], "/acl", "a client the route does not admit"),
        ([127, 0, 0, 2], "/acl", "a client it admits"),
        ([127, 0, 0, 1], "/other", "the plain route"),
    ];
    let mut answers = Vec::new();
    for (ip, p, what) in cases {
        let (by_file, by_tag) = (
            seen(ip, "file.test", p).await,
            seen(ip, "tag.test", p).await,
        );
        // the same, but for the host each was asked for
        let tag_as_file = (
            by_tag.0,
            by_tag
                .1
                .as_ref()
                .map(|l| l.replace("tag.test", "file.test")),
            by_tag.2.clone().map(|(path, query, host, prefix)| {
                (path, query, host.replace("tag.test", "file.test"), prefix)
            }),
        );
        assert_eq!(by_file, tag_as_file, "{what}: {p}");
        answers.push(by_file);
    }
    let upstream = |path: &str, query: Option<&str>, host: &str, prefix: Option<&str>| {
        Some((
            path.to_string(),
            query.map(str::to_string),
            host.to_string(),
            prefix.map(str::to_string),
        ))
    };
    assert_eq!(
        answers[0],
        (
            200,
            None,
            upstream("/v2/x", Some("q=1"), "api.internal", Some("/cart"))
        )
    );
    assert_eq!(
        answers[1].2,
        upstream("/v2/", None, "api.internal", Some("/cart"))
    );
    assert_eq!(
        (answers[2].0, answers[2].1.as_deref()),
        (301, Some("https://new.test/old/a?b=1"))
    );
    assert_eq!(
        (answers[3].0, answers[3].1.as_deref()),
        (301, Some("https://new.test/old/a"))
    );
    assert_eq!(
        (answers[4].0, answers[4].1.as_deref()),
        (308, Some("https://file.test/new/h/x"))
    );
    assert_eq!(answers[5].0, 403);
    assert_eq!(answers[6].0, 200);
    assert_eq!(answers[7].2, upstream("/other", None, "file.test", None));
    // /routes shows the file route's options as it shows the tag's
    let routes = admin_json(&plain(), admin, "/routes").await;
    let of = |vhost: &str, path: &str| {
        routes
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vhost"] == vhost)
            .and_then(|v| {
                v["routes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|r| r["path"] == path)
                    .cloned()
            })
            .unwrap_or_else(|| panic!("{vhost}{path} in {routes}"))
    };
    assert_eq!(
        of("file.test", "/cart")["options"],
        of("tag.test", "/cart")["options"]
    );
    assert_eq!(
        of("file.test", "/old")["options"],
        of("tag.test", "/old")["options"]
    );
    assert!(of("file.test", "/old").get("pool").is_none(), "no pool");
}

/// A client from local address `ip` that does not follow redirects.
fn from(ip: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(ip))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A config with tag routes on, an admin API and a plain listener: `policy` goes under
/// `[consul]`, then `vhosts`, whose routes may use pool `static` (at `file_up`). Returns the
/// file, the listener and the admin port.
fn tag_routing(
    dir: &std::path::Path,
    consul: &ConsulAgent,
    policy: &str,
    vhosts: &[Vhost],
    file_up: SocketAddr,
) -> (std::path::PathBuf, SocketAddr, u16) {
    // `[[consul.allow]]` rules are tables of their own: they go after everything else
    let (options, allow) = split_tables(policy);
    let mut cfg = Config::new()
        .consul(consul, &format!("tag_routes = true\n{options}"))
        .http()
        .pool("static", Pool::backends(&[file_up]))
        .toml(allow);
    for v in vhosts {
        cfg = cfg.vhost(v.clone());
    }
    let path = Config::path_in(dir);
    cfg.write(&path);
    (path, cfg.http_addr(), cfg.admin_port())
}

/// The route conflicts `/status` reports.
async fn route_conflicts(c: &reqwest::Client, admin: u16) -> Vec<String> {
    let status = admin_json(c, admin, "/status").await;
    status["consul"]["route_conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

/// GET `p` on `host` through `http`: the upstream that answered, or the status when not 200.
async fn answered_by(c: &reqwest::Client, http: SocketAddr, host: &str, p: &str) -> Option<String> {
    let r = c
        .get(format!("http://{http}{p}"))
        .header("host", host)
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return Some(format!("{}", r.status().as_u16()));
    }
    r.json::<Value>()
        .await
        .ok()
        .map(|j| j["upstream"].as_str().unwrap_or_default().to_string())
}

/// A pool with a failover datacenter: two real Consul datacenters federated over the WAN on
/// loopback. When dc1's instances fail their checks, traffic moves to dc2; when they pass
/// again, it comes back after `failback_after`; a client looping throughout sees no failure.
#[tokio::test]
async fn a_pool_fails_over_to_another_datacenter_and_back() {
    datacenter_failover("failover = [\"dc2\"]").await;
}

/// The same with `nearest = 1`: the failover datacenter is the nearest other one, from
/// Consul's own list.
#[tokio::test]
async fn a_pool_fails_over_to_the_nearest_datacenter() {
    datacenter_failover("nearest = 1").await;
}

/// With `min_fraction`: one of dc1's two instances failing leaves it under the fraction; the
/// guard would keep the failing one, so the pool moves to dc2 instead.
#[tokio::test]
async fn a_pool_fails_over_when_its_datacenter_is_under_min_fraction() {
    datacenter_failover_with("failover = [\"dc2\"]", "min_fraction = 0.6\n", 2).await;
}

async fn datacenter_failover(choice: &str) {
    datacenter_failover_with(choice, "", 1).await;
}

/// dc1 holds `dc1_instances` instances (the first one fails and heals), dc2 one.
async fn datacenter_failover_with(choice: &str, consul_extra: &str, dc1_instances: usize) {
    let dc1_up = Upstream::start("dc1").await;
    let dc2_up = Upstream::start("dc2").await;
    let dir = tempfile::tempdir().unwrap();
    let dc1 = ConsulAgent::start_in(dir.path(), "dc1").await;
    let dc2 = ConsulAgent::start_in(dir.path(), "dc2").await;
    dc1.join_wan(&dc2).await;
    // more dc1 instances answer as dc1 too
    let mut spare = Vec::new();
    for _ in 1..dc1_instances {
        spare.push(Upstream::start("dc1").await);
    }
    dc1.register("api-1", "api", dc1_up.addr, &[]).await;
    for (i, up) in spare.iter().enumerate() {
        dc1.register(&format!("api-1{i}"), "api", up.addr, &[])
            .await;
    }
    dc2.register("api-2", "api", dc2_up.addr, &[]).await;
    let cfg = Config::new()
        .consul(&dc1, &format!("failback_after = \"2s\"\n{consul_extra}"))
        .http()
        .vhost(
            Vhost::new(&["a.test"])
                .route("/", "api")
                .route("/local", "local"),
        )
        .pool(
            "api",
            Pool::default().set("consul", &format!("{{ service = \"api\", {choice} }}")),
        )
        .pool("local", Pool::consul("api", &[]));
    let (http, admin) = (cfg.http_addr(), cfg.admin_port());
    let mut tg = cfg.start(dir.path()).await;
    let c = plain();
    wait_for("dc1 to serve", Duration::from_secs(20), || async {
        answered_by(&c, http, "a.test", "/").await.as_deref() == Some("dc1")
    })
    .await;
    // the dc2 watch has answered too (a datacenter not heard from is never failed over to)
    wait_for(
        "the dc2 watch to answer",
        Duration::from_secs(20),
        || async {
            let status = admin_json(&c, admin, "/status").await;
            status["consul"]["watches"].as_array().is_some_and(|w| {
                w.iter()
                    .any(|w| w["service"] == "api@dc2" && w["healthy"] == true)
            })
        },
    )
    .await;

    // a client loop for the whole test: bounded in count and time
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers = Arc::new(std::sync::Mutex::new(Vec::<(Instant, String)>::new()));
    let client = {
        let (c, stop, answers) = (c.clone(), stop.clone(), answers.clone());
        tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(90);
            for _ in 0..20_000 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) || Instant::now() > end {
                    break;
                }
                let a = answered_by(&c, http, "a.test", "/")
                    .await
                    .unwrap_or_else(|| "connection failed".into());
                answers.lock().unwrap().push((Instant::now(), a));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let last = |answers: &Arc<std::sync::Mutex<Vec<(Instant, String)>>>| {
        answers.lock().unwrap().last().map(|(_, a)| a.clone())
    };

    dc1.set_check("api-1", false).await;
    wait_for("dc2 to serve", Duration::from_secs(20), || async {
        last(&answers).as_deref() == Some("dc2")
    })
    .await;
    let pools = admin_json(&c, admin, "/pools").await;
    let dc = &pools.as_array().unwrap()[0]["datacenter"];
    assert_eq!(dc["serving"], "dc2", "{pools}");
    // a pool on the same service that names no failover datacenter stays in its own
    let local = pools
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "local")
        .unwrap();
    assert!(local["datacenter"].is_null(), "{local}");
    assert_ne!(
        answered_by(&c, http, "a.test", "/local").await.as_deref(),
        Some("dc2"),
        "no failover for a pool that did not ask for it"
    );
    assert!(
        dc["reason"]
            .as_str()
            .unwrap()
            .contains(if consul_extra.contains("min_fraction") {
                "that Consul reports failing (consul.min_fraction); dc2 has passing instances"
            } else {
                "has no passing instance; dc2 is the first failover datacenter"
            }),
        "{dc}"
    );
    let metrics = admin_text(&c, admin, "/metrics").await;
    assert!(
        metrics.contains("tollgate_pool_datacenter{pool=\"api\",datacenter=\"dc2\"} 1"),
        "{metrics}"
    );

    // dc1 passes again: it serves again, but only after failback_after
    let healed = Instant::now();
    dc1.set_check("api-1", true).await;
    wait_for("dc1 to serve again", Duration::from_secs(20), || async {
        last(&answers).as_deref() == Some("dc1")
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    client.await.unwrap();
    let answers = answers.lock().unwrap().clone();
    let back = answers
        .iter()
        .find(|(t, a)| *t > healed && a == "dc1")
        .map(|(t, _)| t.duration_since(healed))
        .unwrap();
    assert!(
        back >= Duration::from_millis(1900),
        "back to dc1 after {back:?}, not the 2 s hold"
    );
    let failed: Vec<&String> = answers
        .iter()
        .map(|(_, a)| a)
        .filter(|a| *a != "dc1" && *a != "dc2")
        .collect();
    assert!(answers.len() > 100, "too little traffic: {}", answers.len());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        answers.len()
    );
    let log = tg.log_text();
    assert!(log.contains("pool failover"), "the switch is logged");
    let _ = tg.child.kill();
}

/// Beyond `max_blocking`, a check change re-reads the services whose checks changed, not
/// every watched one (the fallback mode's cost at thousands of services).
#[tokio::test]
async fn past_max_blocking_a_check_change_reads_only_its_service() {
    let ups = [Upstream::start("i0").await, Upstream::start("i1").await];
    let dir = tempfile::tempdir().unwrap();
    let consul = ConsulAgent::start(dir.path()).await;
    const SERVICES: usize = 12;
    for s in 0..SERVICES {
        for (i, up) in ups.iter().enumerate() {
            let tag = format!("tollgate.route=s{s}.test/");
            consul
                .register(&format!("s{s}-{i}"), &format!("s{s}"), up.addr, &[&tag])
                .await;
        }
    }
    let (path, http, admin) = tag_routing(
        dir.path(),
        &consul,
        "max_blocking = 4\n",
        &[Vhost::new(&["file.test"]).route("/", "static")],
        ups[0].addr,
    );
    let mut tg = Tollgate::start(&path);
    tg.ready(http).await;
    tg.ready(SocketAddr::from(([127, 0, 0, 1], admin))).await;
    let c = plain();
    let reads = || async {
        let m = admin_text(&c, admin, "/metrics").await;
        m.lines()
            .find_map(|l| l.strip_prefix("tollgate_consul_fallback_reads_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // every service routed with both instances, and the reads settled
    let both = |s: usize| {
        let c = c.clone();
        async move {
            let host = format!("s{s}.test");
            let mut seen = BTreeSet::new();
            for _ in 0..6 {
                if let Some(a) = answered_by(&c, http, &host, "/").await {
                    seen.insert(a);
                }
            }
            seen.len() == 2 && seen.iter().all(|a| a.starts_with('i'))
        }
    };
    wait_for(
        "every service routed to both instances",
        Duration::from_secs(60),
        || async {
            for s in 0..SERVICES {
                if !both(s).await {
                    return false;
                }
            }
            true
        },
    )
    .await;
    assert!(tg
        .log_text()
        .contains("more Consul services than blocking queries allowed"));
    // the reads settle (no read in a second), bounded
    let mut before = reads().await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = reads().await;
        if now == before {
            break;
        }
        before = now;
    }

    // one instance of s5 fails its check: s5 loses it, and only s5 is read again
    consul.set_check("s5-1", false).await;
    wait_for(
        "s5 to lose its failing instance",
        Duration::from_secs(30),
        || async {
            let mut seen = BTreeSet::new();
            for _ in 0..6 {
                if let Some(a) = answered_by(&c, http, "s5.test", "/").await {
                    seen.insert(a);
                }
            }
            seen.len() == 1 && seen.contains("i0")
        },
    )
    .await;
    let read = reads().await - before;
    assert!(
        (1..=2).contains(&read),
        "a check change read {read} services of {SERVICES} (want the one it names)"
    );
    assert!(
        both(4).await && both(6).await,
        "the others keep both instances"
    );
    let _ = tg.child.kill();
}

/// A service says how to reach it: Fabio's `proto=https` (verified against
/// `consul.backend_tls`'s CA and the service's name) or the meta `tollgate-protocol = h2c`;
/// a tag that turns verification off, an unknown protocol, or a tag and meta that disagree
/// are refused and reported, never routed.
#[tokio::test]
async fn services_declare_their_protocol_in_tags_and_meta() {
    let file_up = Upstream::start("file").await;
    let dir = tempfile::tempdir().unwrap();
    let bca = TestCa::new();
    let (cert, key) = bca.issue(dir.path(), "secure", &["secure"], "secure");
    std::fs::write(dir.path().join("backend-ca.pem"), &bca.pem).unwrap();
    let secure = Upstream::start_with(
        "secure",
        UpstreamMode {
            tls: Some((cert, key)),
            ..Default::default()
        },
    )
    .await;
    let fast = Upstream::start_with(
        "fast",
        UpstreamMode {
            h2: true,
            ..Default::default()
        },
    )
    .await;
    let consul = ConsulAgent::start(dir.path()).await;
    let (path, http, admin) = tag_routing(
        dir.path(),
        &consul,
        &format!(
            "backend_tls = {{ ca = \"{}/backend-ca.pem\" }}\n",
            dir.path().display()
        ),
        &[Vhost::new(&["a.test"])
            .set("consul_routes", "true")
            .route("/", "static")],
        file_up.addr,
    );
    let mut tg = Tollgate::start(&path);
    tg.ready(http).await;
    tg.ready(SocketAddr::from(([127, 0, 0, 1], admin))).await;
    consul
        .register(
            "secure-1",
            "secure",
            secure.addr,
            &["urlprefix-a.test/s proto=https"],
        )
        .await;
    let meta = serde_json::json!({"tollgate-route": "a.test/f", "tollgate-protocol": "h2c"});
    consul
        .register_with_meta("fast-1", "fast", fast.addr, meta)
        .await;
    consul
        .register(
            "lax-1",
            "lax",
            secure.addr,
            &["urlprefix-a.test/lax proto=https tlsskipverify=true"],
        )
        .await;
    let meta = serde_json::json!({"tollgate-route": "a.test/odd", "tollgate-protocol": "spdy"});
    consul
        .register_with_meta("odd-1", "odd", fast.addr, meta)
        .await;

    let c = plain();
    wait_for(
        "the declared protocols",
        Duration::from_secs(15),
        || async {
            answered_by(&c, http, "a.test", "/s").await.as_deref() == Some("secure")
                && answered_by(&c, http, "a.test", "/f").await.as_deref() == Some("fast")
        },
    )
    .await;
    let j: Value = c
        .get(format!("http://{http}/f/x"))
        .header("host", "a.test")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(j["version"], "HTTP/2.0", "{j}");
    let pools = admin_json(&c, admin, "/pools").await;
    let pool = |name: &str| {
        pools
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(pool("consul:secure")["protocol"], "https");
    assert_eq!(pool("consul:secure")["tls"]["server_name"], "secure");
    assert_eq!(pool("consul:secure")["tls"]["verify"], true);
    assert_eq!(pool("consul:fast")["protocol"], "h2c");
    // refused routes fall through to the file's "/" (the static pool), and are reported
    assert_eq!(
        answered_by(&c, http, "a.test", "/lax").await.as_deref(),
        Some("file")
    );
    assert_eq!(
        answered_by(&c, http, "a.test", "/odd").await.as_deref(),
        Some("file")
    );
    let conflicts = route_conflicts(&c, admin).await;
    for (service, why) in [
        ("lax", "only the file may turn certificate verification off"),
        ("odd", "tollgate-protocol=spdy is not a backend protocol"),
    ] {
        assert!(
            conflicts
                .iter()
                .any(|c| c.contains(&format!("service {service}")) && c.contains(why)),
            "{service}: {conflicts:?}"
        );
    }
}

/// A TCP server answering every connection with `name` and closing.
async fn name_server(name: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            use tokio::io::AsyncWriteExt;
            let _ = s.write_all(name.as_bytes()).await;
        }
    });
    a
}

/// What a connection to `port` is answered with ("" when refused or closed at once).
async fn port_answer(port: u16) -> String {
    use tokio::io::AsyncReadExt;
    let Ok(mut c) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    let mut s = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), c.read_to_string(&mut s)).await;
    s
}

/// Services declare service ports in tags and meta (`tollgate.port=tcp/N`, Fabio's
/// `urlprefix-:N proto=tcp`): a port opens when a service declares it within
/// `consul.ports`, follows the service's instances, and closes when the service goes; a
/// port outside the range, or on a socket the file uses, is refused and reported.
#[tokio::test]
async fn services_declare_service_ports() {
    let file_up = Upstream::start("file").await;
    let (a, b) = (name_server("a").await, name_server("b").await);
    let dir = tempfile::tempdir().unwrap();
    let consul = ConsulAgent::start(dir.path()).await;
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let (lo, hi) = (p1.min(p2), p1.max(p2));
    let outside = if p3 < lo || p3 > hi { p3 } else { 1 };
    let (path, http, admin) = tag_routing(
        dir.path(),
        &consul,
        &format!("ports = [\"{lo}-{hi}\"]\nport_address = \"127.0.0.1\"\n"),
        &[Vhost::new(&["a.test"]).route("/", "static")],
        file_up.addr,
    );
    let mut tg = Tollgate::start(&path);
    tg.ready(http).await;
    tg.ready(SocketAddr::from(([127, 0, 0, 1], admin))).await;
    consul
        .register("svc-a", "svc", a, &[&format!("tollgate.port=tcp/{p1}")])
        .await;
    let meta = serde_json::json!({ "tollgate-port": format!("tcp/{p2}") });
    consul.register_with_meta("other-b", "other", b, meta).await;
    consul
        .register(
            "far-1",
            "far",
            b,
            &[&format!("urlprefix-:{outside} proto=tcp")],
        )
        .await;
    wait_for(
        "the declared ports to open",
        Duration::from_secs(15),
        || async { port_answer(p1).await == "a" && port_answer(p2).await == "b" },
    )
    .await;
    // a second instance joins the pool behind the port
    consul
        .register("svc-b", "svc", b, &[&format!("tollgate.port=tcp/{p1}")])
        .await;
    wait_for(
        "both instances behind the port",
        Duration::from_secs(15),
        || async {
            let mut seen = BTreeSet::new();
            for _ in 0..4 {
                seen.insert(port_answer(p1).await);
            }
            seen.contains("a") && seen.contains("b")
        },
    )
    .await;
    let conflicts = route_conflicts(&plain(), admin).await;
    assert!(
        conflicts
            .iter()
            .any(|c| c.contains("service far") && c.contains("consul.ports does not allow")),
        "{conflicts:?}"
    );
    // the service goes: its port closes
    consul.deregister("svc-a").await;
    consul.deregister("svc-b").await;
    wait_for("the port to close", Duration::from_secs(15), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", p1))
            .await
            .is_err()
    })
    .await;
    assert_eq!(port_answer(p2).await, "b", "the other service's port stays");
    assert!(tg.log_text().contains("service port closed"));
}

/// A tollgate whose only ports are the ones Consul services declare (no `[[listener]]`, no
/// `[[port]]`: the proxymatic replacement) is a valid configuration: `check` passes with a
/// warning that nothing listens until Consul answers, and a declared port opens.
#[tokio::test]
async fn consul_declared_ports_alone_are_a_valid_configuration() {
    let a = name_server("a").await;
    let dir = tempfile::tempdir().unwrap();
    let consul = ConsulAgent::start(dir.path()).await;
    let port = free_port();
    let cfg = Config::new().consul(
        &consul,
        &format!("tag_routes = true\nports = [\"{port}\"]\nport_address = \"127.0.0.1\""),
    );
    let admin = cfg.admin_port();
    let path = Config::path_in(dir.path());
    cfg.write(&path);
    let (code, out) = run_check(&path);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("WARNING: no [[listener]] and no [[port]]"),
        "{out}"
    );
    let mut tg = Tollgate::start(&path);
    tg.ready(SocketAddr::from(([127, 0, 0, 1], admin))).await;
    consul
        .register("svc-a", "svc", a, &[&format!("tollgate.port=tcp/{port}")])
        .await;
    wait_for(
        "the declared port to open",
        Duration::from_secs(15),
        || async { port_answer(port).await == "a" },
    )
    .await;
}
