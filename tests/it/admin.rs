//! The admin listener through the real binary: auth, every endpoint's shape, metrics that
//! parse and move with traffic, explain, reload, the dashboard in headless Chromium, startup
//! errors, and a zero-downtime binary upgrade under load.

use crate::common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "test-admin-token-0123456789";

struct Fixture {
    tg: Tollgate,
    dir: tempfile::TempDir,
    ca: TestCa,
    https: SocketAddr,
    admin: SocketAddr,
    path: PathBuf,
}

fn config(
    dir: &Path,
    https: SocketAddr,
    admin: SocketAddr,
    backends: &[SocketAddr],
    extra: &str,
) -> String {
    Config::new()
        .server(
            "watch_config = false\nshutdown_timeout = \"10s\"\nupgrade_sock = \"{dir}/upgrade.sock\"",
        )
        .admin_at(admin.port())
        .admin(&format!("token = \"{TOKEN}\""))
        .table("tls", "certs_dir = \"{dir}/certs\"")
        // the binary-upgrade test opens a new connection per request, faster than the
        // default per-IP connection rate allows one client
        .table("limits", "allow = [\"127.0.0.1\"]")
        .listener(https, true, "")
        .vhost(
            Vhost::new(&["a.test"])
                .route("/", "web")
                .route("/api", "api"),
        )
        .pool("web", Pool::backends(backends))
        .pool("api", Pool::backends(backends).set("balance", "\"p2c\""))
        .toml(extra)
        .render(dir)
}

async fn start(backends: &[SocketAddr]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    ca.issue(&dir.path().join("certs"), "a", &["a.test"], "a");
    let https = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let path = dir.path().join("tollgate.toml");
    write(&path, &config(dir.path(), https, admin, backends, ""));
    let mut tg = Tollgate::start(&path);
    tg.ready(https).await;
    tg.ready(admin).await;
    Fixture {
        tg,
        dir,
        ca,
        https,
        admin,
        path,
    }
}

fn admin_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn get_json(f: &Fixture, path: &str) -> Value {
    let r = admin_client()
        .get(format!("http://{}{path}", f.admin))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
    assert_eq!(r.headers()["content-type"], "application/json");
    r.json().await.unwrap()
}

#[tokio::test]
async fn every_endpoint_but_healthz_needs_the_token() {
    let up = Upstream::start("up").await;
    let f = start(&[up.addr]).await;
    let c = admin_client();
    let base = format!("http://{}", f.admin);
    let r = c.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    for path in [
        "/status",
        "/routes",
        "/pools",
        "/plugins",
        "/certs",
        "/metrics",
        "/explain?host=a.test",
    ] {
        let r = c.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without a token");
        assert!(r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
        let r = c
            .get(format!("{base}{path}"))
            .bearer_auth("test-admin-token-0123456788")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            401,
            "{path} with a token differing in the last character"
        );
        let r = c
            .get(format!("{base}{path}"))
            .bearer_auth("test")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path} with a prefix of the token");
        let r = c
            .get(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path} with the token");
    }
    let r = c.post(format!("{base}/reload")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // The dashboard: /?token= once, then a SameSite cookie; the cookie is not enough to POST.
    let r = c.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("<form"), "a login form");
    let r = c.get(format!("{base}/?token=wrong")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(format!("{base}/?token={TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    assert!(
        !pair.contains(TOKEN),
        "the cookie is derived from the token, not the token: {pair}"
    );
    let r = c
        .get(format!("{base}/status"))
        .bearer_auth(pair.split_once('=').unwrap().1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the cookie value is not a bearer token");
    let r = c
        .get(format!("{base}/"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    assert!(page.contains("<table id=routes>"));
    // each TLS listener's handshakes and resumption rate
    assert!(page.contains("<table id=tls>"), "{page}");
    assert!(
        page.contains(&format!("<tr><td><code>{}</code></td><td>", f.https)),
        "{page}"
    );
    let r = c
        .head(format!("{base}/"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "HEAD with the cookie");
    // the bearer scheme is case-insensitive (RFC 9110 §11.1)
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let r = c
            .get(format!("{base}/status"))
            .header("authorization", format!("{scheme} {TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
    let r = c
        .post(format!("{base}/reload"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a cookie must not authorise a POST");
    let r = c
        .delete(format!("{base}/status"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = c
        .get(format!("{base}/nope"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(f.tg.log_text().contains("admin request with a wrong token"));
}

#[test]
fn a_public_admin_address_without_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    // never started: `run` refuses the config before it binds anything
    Config::new()
        .admin("address = \"0.0.0.0:19901\"")
        .listener("127.0.0.1:19080".parse().unwrap(), false, "")
        .vhost(Vhost::new(&["a.test"]).route("/", "p"))
        .pool("p", Pool::backends(&[dead_addr()]))
        .write(&path);
    for cmd in ["check", "run"] {
        let out = Command::new(Tollgate::bin())
            .args([cmd, "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        let at = format!("t.toml:{}: admin.address", line_of(&path, "0.0.0.0:19901"));
        assert!(err.contains(&at), "{cmd}: {err}");
        assert!(err.contains("needs a token"), "{cmd}: {err}");
    }
}

#[tokio::test]
async fn endpoints_have_their_documented_shapes() {
    let up = Upstream::start("up").await;
    let dead = dead_addr();
    let f = start(&[up.addr, dead]).await;
    let status = get_json(&f, "/status").await;
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["uptime_seconds"].is_u64());
    assert_eq!(status["snapshot"]["generation"], 1);
    assert_eq!(status["config"]["source"], f.path.display().to_string());
    assert_eq!(status["consul"]["configured"], false);
    assert_eq!(status["failover"]["state"], "standalone");

    let routes = get_json(&f, "/routes").await;
    assert_eq!(routes[0]["vhost"], "a.test");
    assert_eq!(routes[0]["routes"][1]["path"], "/api");
    assert_eq!(routes[0]["routes"][1]["pool"], "api");
    let src = routes[0]["routes"][1]["source"].as_str().unwrap();
    assert!(
        src.starts_with("file ")
            && src.ends_with(&format!(
                "tollgate.toml:{}",
                line_of(&f.path, "path = \"/api\"")
            )),
        "{src}"
    );

    // make the dead backend fail so /pools has something to say
    let c = client(&f.ca, f.https, &["a.test"]);
    for _ in 0..6 {
        let r = c
            .get(format!("https://a.test:{}/", f.https.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // the client has its answer a moment before tollgate has logged the request and let
    // go of the backend: wait for the count, do not race it
    let live_idle = |pools: &Value| {
        pools.as_array().is_some_and(|ps| {
            ps.iter().any(|p| {
                p["name"] == "web"
                    && p["backends"].as_array().is_some_and(|b| {
                        b.iter()
                            .any(|x| x["address"] == up.addr.to_string() && x["inflight"] == 0)
                    })
            })
        })
    };
    wait_for(
        "the live backend to have no request in flight",
        Duration::from_secs(5),
        || async { live_idle(&get_json(&f, "/pools").await) },
    )
    .await;
    let pools = get_json(&f, "/pools").await;
    let web = pools
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "web")
        .unwrap();
    assert_eq!(web["balance"], "round_robin");
    assert_eq!(web["source"], "file");
    let b = web["backends"].as_array().unwrap();
    assert_eq!(b.len(), 2);
    let dead_b = b.iter().find(|x| x["address"] == dead.to_string()).unwrap();
    assert_eq!(dead_b["available"], false);
    assert_eq!(dead_b["ejections_total"], 1);
    assert!(dead_b["ejected_for_ms"].as_u64().unwrap() > 0);
    let live = b
        .iter()
        .find(|x| x["address"] == up.addr.to_string())
        .unwrap();
    assert_eq!(live["available"], true);
    assert_eq!(live["inflight"], 0);

    assert_eq!(get_json(&f, "/plugins").await, Value::Array(vec![]));
    let certs = get_json(&f, "/certs").await;
    assert_eq!(certs[0]["names"][0], "a.test");
    let days = certs[0]["days_left"].as_i64().unwrap();
    assert!(days > 300, "{days}");
}

#[tokio::test]
async fn explain_answers_vhost_route_pool_and_source() {
    let up = Upstream::start("up").await;
    let f = start(&[up.addr]).await;
    let e = get_json(&f, "/explain?host=A.TEST:443&path=%2Fapi%2Fusers").await;
    assert_eq!(e["answer"], "proxy");
    assert_eq!(e["normalized_host"], "a.test");
    assert_eq!(e["vhost"]["vhost"], "a.test");
    assert_eq!(e["route"]["path"], "/api");
    let line = line_of(&f.path, "path = \"/api\"");
    assert!(e["route"]["source"]
        .as_str()
        .unwrap()
        .ends_with(&format!("tollgate.toml:{line}")));
    assert_eq!(e["pool"]["name"], "api");
    assert_eq!(e["pool"]["balance"], "p2c");
    assert_eq!(e["pool"]["backends"][0]["address"], up.addr.to_string());
    assert_eq!(e["plugins"], Value::Array(vec![]));
    let e = get_json(&f, "/explain?host=a.test&path=/x").await;
    assert_eq!(e["route"]["path"], "/");
    let e = get_json(&f, "/explain?host=nope.test&path=/").await;
    assert_eq!(e["answer"], 421);
    let r = admin_client()
        .get(format!("http://{}/explain", f.admin))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn post_reload_applies_or_reports_every_problem() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let f = start(&[a.addr]).await;
    let c = admin_client();
    write(
        &f.path,
        &config(f.dir.path(), f.https, f.admin, &[b.addr], ""),
    );
    let r = c
        .post(format!("http://{}/reload", f.admin))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["generation"], 2);
    let tls = client(&f.ca, f.https, &["a.test"]);
    let j: Value = tls
        .get(format!("https://a.test:{}/", f.https.port()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(j["upstream"], "b");

    write(
        &f.path,
        &config(
            f.dir.path(),
            f.https,
            f.admin,
            &[b.addr],
            "[pool.x]\nretries = 99\nbackends = []\n",
        ),
    );
    let r = c
        .post(format!("http://{}/reload", f.admin))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    let errors: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("pool.x.retries")));
    assert!(errors.iter().any(|e| e.contains("pool.x.backends")));
    let status = get_json(&f, "/status").await;
    assert_eq!(
        status["snapshot"]["generation"], 2,
        "the bad config changed nothing"
    );
    assert_eq!(status["config"]["last_reload"]["ok"], false);
    assert_eq!(status["config"]["reloads_failed"], 1);
}

fn scrape_samples(text: &str) -> Vec<prometheus_parse::Sample> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines)
        .expect("metrics parse")
        .samples
}

fn value_of(
    samples: &[prometheus_parse::Sample],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|c| c.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}

#[tokio::test]
async fn metrics_parse_and_move_as_traffic_flows() {
    let up = Upstream::start("up").await;
    let f = start(&[up.addr]).await;
    let scrape = || async {
        let r = admin_client()
            .get(format!("http://{}/metrics", f.admin))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        scrape_samples(&r.text().await.unwrap())
    };
    let before = scrape().await;
    let route = [("vhost", "a.test"), ("route", "/api"), ("code", "2xx")];
    let n0 = value_of(&before, "tollgate_requests_total", &route).unwrap_or(0.0);
    let c = client(&f.ca, f.https, &["a.test"]);
    for i in 0..7 {
        let r = c
            .get(format!("https://a.test:{}/api/{i}", f.https.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // an unknown Host over HTTP/1.1 (over HTTP/2 it would contradict :authority)
    let h1 = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(f.ca.reqwest_cert())
        .resolve("a.test", f.https)
        .http1_only()
        .build()
        .unwrap();
    let r = h1
        .get(format!("https://a.test:{}/", f.https.port()))
        .header("host", "zzz.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 421);
    // the counters are bumped in the logging phase, after the answer: wait for them
    let mut after = scrape().await;
    let end = Instant::now() + Duration::from_secs(5);
    let unknown = [("vhost", "-"), ("route", "-"), ("code", "4xx")];
    while (value_of(&after, "tollgate_requests_total", &route).unwrap_or(0.0) < n0 + 7.0
        || value_of(&after, "tollgate_requests_total", &unknown).is_none())
        && Instant::now() < end
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = scrape().await;
    }
    assert_eq!(
        value_of(&after, "tollgate_requests_total", &route),
        Some(n0 + 7.0)
    );
    assert_eq!(
        value_of(
            &after,
            "tollgate_requests_total",
            &[("vhost", "-"), ("route", "-"), ("code", "4xx")]
        ),
        Some(1.0)
    );
    let hist = value_of(
        &after,
        "tollgate_request_duration_seconds_count",
        &[("vhost", "a.test"), ("route", "/api")],
    )
    .or_else(|| {
        value_of(
            &after,
            "tollgate_request_duration_seconds",
            &[("vhost", "a.test"), ("route", "/api")],
        )
    });
    assert!(hist.unwrap() >= 7.0, "{hist:?}");
    let resp = value_of(
        &after,
        "tollgate_upstream_response_duration_seconds_count",
        &[("pool", "api")],
    )
    .or_else(|| {
        value_of(
            &after,
            "tollgate_upstream_response_duration_seconds",
            &[("pool", "api")],
        )
    });
    assert!(resp.unwrap() >= 7.0);
    let addr = up.addr.to_string();
    assert_eq!(
        value_of(
            &after,
            "tollgate_backend_up",
            &[("pool", "api"), ("backend", &addr)]
        ),
        Some(1.0)
    );
    assert_eq!(
        value_of(&after, "tollgate_snapshot_generation", &[]),
        Some(1.0)
    );
    let expiry = value_of(
        &after,
        "tollgate_certificate_expiry_timestamp_seconds",
        &[("names", "a.test")],
    )
    .unwrap();
    assert!(expiry > 1.7e9);
    assert_eq!(
        value_of(
            &after,
            "tollgate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn dashboard_renders_the_routes_table_in_headless_chromium() {
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("no Chromium: run scripts/install-deps test");
    let up = Upstream::start("up").await;
    let f = start(&[up.addr]).await;
    let url = format!("http://{}/?token={TOKEN}", f.admin);
    let profile = f.dir.path().join("chromium-profile");
    let shot = f.dir.path().join("dashboard.png");
    let flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1200,800",
    ];
    let run = move |extra: Vec<String>| {
        let out = Command::new(chromium)
            .args(flags)
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(&url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dom = tokio::task::spawn_blocking({
        let run = run.clone();
        move || run(vec!["--dump-dom".into()])
    })
    .await
    .unwrap();
    assert!(dom.contains("<table id=\"routes\">"), "{dom}");
    for cell in [
        "<td>a.test</td>",
        "<code>/api</code>",
        "<td>api</td>",
        "<td>web</td>",
    ] {
        assert!(
            dom.contains(cell),
            "{cell} missing from the rendered routes table:\n{dom}"
        );
    }
    let shot2 = shot.clone();
    tokio::task::spawn_blocking(move || run(vec![format!("--screenshot={}", shot2.display())]))
        .await
        .unwrap();
    // The screenshot is a real rendering: right size, and mostly page background with a
    // good share of darker pixels (text and table borders).
    let decoder = png::Decoder::new(std::fs::File::open(&shot).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (1200, 800));
    let bpp = info.color_type.samples();
    let px = &buf[..info.buffer_size()];
    let dark = px
        .chunks(bpp)
        .filter(|p| (p[0] as u32 + p[1] as u32 + p[2] as u32) < 300)
        .count();
    let total = px.len() / bpp;
    assert!(
        dark > total / 500,
        "only {dark} dark pixels of {total}: the page looks blank"
    );
    assert!(
        dark < total / 2,
        "{dark} dark pixels of {total}: not the dashboard"
    );
    std::fs::copy(&shot, std::env::temp_dir().join("tollgate-dashboard.png")).ok();
}

#[tokio::test]
async fn startup_errors_name_the_option_to_fix() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    ca.issue(&dir.path().join("certs"), "a", &["a.test"], "a");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let https = busy.local_addr().unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let path = dir.path().join("tollgate.toml");
    let run = |cfg: &str| {
        write(&path, cfg);
        let out = Command::new(Tollgate::bin())
            .args(["run", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&config(dir.path(), https, admin, &[up.addr], ""));
    assert!(
        err.contains(&format!("cannot listen on {https} (listener[0].address")),
        "{err}"
    );
    assert!(err.contains("another process listens there"), "{err}");
    assert!(
        err.starts_with("tollgate: could not start: "),
        "the name once: {err}"
    );
    drop(busy);
    std::fs::write(dir.path().join("certs/a.key"), "not a key").unwrap();
    let err = run(&config(dir.path(), https, admin, &[up.addr], ""));
    assert!(err.contains("tls.certs_dir"), "{err}");
    assert!(err.contains("a.key"), "{err}");
}

#[tokio::test]
async fn binary_upgrade_hands_over_the_sockets_without_refusing_a_connection() {
    let a = Upstream::start("old").await;
    let b = Upstream::start("new").await;
    let mut f = start(&[a.addr]).await;
    let url = format!("https://a.test:{}/", f.https.port());
    // a new connection for every request: a refused connection shows up as a failure
    let c = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(f.ca.reqwest_cert())
        .resolve("a.test", f.https)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, from_new) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let mut load = Vec::new();
    for _ in 0..3 {
        let (c, url, stop, ok, failed, from_new) = (
            c.clone(),
            url.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            from_new.clone(),
        );
        load.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                let res = async { c.get(&url).send().await?.json::<Value>().await }.await;
                match res {
                    Ok(j) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                        if j["upstream"] == "new" {
                            from_new.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(e) => {
                        eprintln!("request failed during the upgrade: {e:?}");
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    wait_for(
        "load on the old process",
        Duration::from_secs(10),
        || async { ok.load(Ordering::SeqCst) > 50 },
    )
    .await;

    // The new binary (same build, new config) waits for the sockets; then the old one is told.
    let new_cfg = f.dir.path().join("new.toml");
    write(
        &new_cfg,
        &config(f.dir.path(), f.https, f.admin, &[b.addr], ""),
    );
    let new_log = f.dir.path().join("new.log");
    let mut new = Command::new(Tollgate::bin())
        .args(["run", "--upgrade", "--config"])
        .arg(&new_cfg)
        .stderr(std::fs::File::create(&new_log).unwrap())
        .spawn()
        .unwrap();
    let sock = f.dir.path().join("upgrade.sock");
    wait_for(
        "the new process to wait on the upgrade socket",
        Duration::from_secs(20),
        || async { sock.exists() },
    )
    .await;
    f.tg.signal("QUIT");
    wait_for(
        "the new process to serve",
        Duration::from_secs(20),
        || async { from_new.load(Ordering::SeqCst) > 50 },
    )
    .await;
    let end = Instant::now() + Duration::from_secs(20);
    while f.tg.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < end,
            "the old process did not exit after handing over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let served_after_old_exit = ok.load(Ordering::SeqCst);
    wait_for(
        "traffic after the old process exited",
        Duration::from_secs(10),
        || async { ok.load(Ordering::SeqCst) > served_after_old_exit + 50 },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    let _ = new.kill();
    let _ = new.wait();
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!("upgrade under load: {ok} requests, {failed} failed");
    assert_eq!(
        failed,
        0,
        "{failed} requests failed across the upgrade ({ok} succeeded)\nnew log:\n{}",
        std::fs::read_to_string(&new_log).unwrap_or_default()
    );
    assert!(
        f.tg.log_text().contains("listener sockets sent"),
        "{}",
        f.tg.log_text()
    );
}

/// Without a token: a Host that is not an IP address or localhost (DNS rebinding) and
/// cross-origin POSTs (CSRF) are refused; local tools still work.
#[tokio::test]
async fn tokenless_admin_refuses_rebinding_and_cross_origin_posts() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::new()
        .http()
        .vhost(Vhost::new(&["a.test"]).route("/", "p"))
        .pool("p", Pool::backends(&[up.addr]));
    let admin = SocketAddr::from(([127, 0, 0, 1], cfg.admin_port()));
    let tg = cfg.start(dir.path()).await;
    let c = reqwest::Client::new();
    let base = format!("http://{admin}");
    let get = |host: &str| c.get(format!("{base}/status")).header("host", host).send();
    for host in [
        admin.to_string(),
        format!("localhost:{}", admin.port()),
        "127.0.0.1".into(),
        "[::1]:9901".into(),
    ] {
        assert_eq!(get(&host).await.unwrap().status(), 200, "Host: {host}");
    }
    for host in [
        "rebind.attacker.example",
        "rebind.attacker.example:9901",
        "localhost.evil:1",
    ] {
        assert_eq!(get(host).await.unwrap().status(), 421, "Host: {host}");
    }
    let post = |origin: Option<&str>, site: Option<&str>| {
        let mut r = c.post(format!("{base}/reload"));
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        if let Some(s) = site {
            r = r.header("sec-fetch-site", s);
        }
        r.send()
    };
    assert_eq!(
        post(Some("http://evil.example"), None)
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(post(Some("null"), None).await.unwrap().status(), 403);
    assert_eq!(post(None, Some("cross-site")).await.unwrap().status(), 403);
    assert_eq!(
        post(Some(&format!("http://{admin}")), Some("same-origin"))
            .await
            .unwrap()
            .status(),
        200,
        "the dashboard's own page may POST"
    );
    assert_eq!(
        post(None, None).await.unwrap().status(),
        200,
        "curl -X POST"
    );
    assert!(tg.log_text().contains("cross-origin admin request refused"));
}

/// `server.pid_file` holds the process id while tollgate runs and is removed at a clean exit.
#[tokio::test]
async fn pid_file_holds_the_pid_while_running() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::new()
        .server("pid_file = \"run/tollgate.pid\"")
        .no_admin()
        .http()
        .vhost(Vhost::new(&["a.test"]).route("/", "p"))
        .pool("p", Pool::backends(&[up.addr]));
    let http = cfg.http_addr();
    let path = Config::path_in(dir.path());
    cfg.write(&path);
    std::fs::create_dir(dir.path().join("run")).unwrap();
    let pid_file = dir.path().join("run/tollgate.pid");
    let mut tg = Tollgate::start(&path);
    tg.ready(http).await;
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(pid.trim(), tg.child.id().to_string());
    tg.signal("TERM");
    let end = Instant::now() + Duration::from_secs(10);
    while tg.child.try_wait().unwrap().is_none() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(tg.child.try_wait().unwrap().is_some(), "exited");
    assert!(!pid_file.exists(), "removed at a clean exit");
}
