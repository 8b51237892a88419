//! Watching Consul with blocking queries, the way consul-template and Fabio do it politely:
//! one watch per service on `/v1/health/service/<name>`, `index` + `wait`, a token bucket per
//! watch (not a sleep per loop), a random start jitter, full-jitter backoff on errors with a
//! resync from index 0, and a quiescence window that turns a burst of changes into one
//! Snapshot rebuild. The index rules and the answer parsing are pure and unit-tested.

use super::{parse_route_tag, DiscoveredRoute, ServiceView, View};
use crate::config::{BackendSpec, ConsulSettings, ServiceKey};
use crate::state::State;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The index to send next, from the one we sent (`prev`) and the one Consul answered with.
/// Consul's rules: a missing index means no blocking is possible (start over); an index
/// that went backwards (agent restarted, state lost) resets to 0; and the index sent is never
/// below 1, so a reset turns into an immediate full read rather than a busy loop.
pub fn next_index(prev: u64, answered: Option<u64>) -> u64 {
    let next = match answered {
        None => 0,
        Some(i) if i < prev => 0,
        Some(i) => i,
    };
    next.max(1)
}

#[derive(Debug, Deserialize)]
struct HealthEntry {
    #[serde(rename = "Node")]
    node: NodeEntry,
    #[serde(rename = "Service")]
    service: ServiceEntry,
}

#[derive(Debug, Deserialize)]
struct NodeEntry {
    #[serde(rename = "Address", default)]
    address: String,
}

#[derive(Debug, Deserialize)]
struct ServiceEntry {
    #[serde(rename = "Address", default)]
    address: String,
    #[serde(rename = "Port", default)]
    port: u16,
    #[serde(rename = "Weights")]
    weights: Option<Weights>,
    #[serde(rename = "Meta")]
    meta: Option<HashMap<String, String>>,
}

#[derive(Debug, Deserialize)]
struct Weights {
    #[serde(rename = "Passing", default)]
    passing: u32,
}

/// Backends from a `/v1/health/service` answer: the service address (the node's when empty)
/// and port; weight from the `weight` meta key, else `Weights.Passing`, clamped to 1..=1000.
/// Sorted, so equal answers compare equal. Instances without an IP address are skipped.
pub fn parse_health(body: &[u8]) -> Result<(Vec<BackendSpec>, Vec<String>), String> {
    let entries: Vec<HealthEntry> = serde_json::from_slice(body)
        .map_err(|e| format!("not a /v1/health/service answer: {e}"))?;
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for e in entries {
        let host = if e.service.address.is_empty() {
            &e.node.address
        } else {
            &e.service.address
        };
        let Ok(ip) = host.parse::<IpAddr>() else {
            skipped.push(format!("{host}:{} (not an IP address)", e.service.port));
            continue;
        };
        if e.service.port == 0 {
            skipped.push(format!("{host} (no port)"));
            continue;
        }
        let weight = e
            .service
            .meta
            .as_ref()
            .and_then(|m| m.get("weight"))
            .and_then(|w| w.parse::<u32>().ok())
            .or(e.service.weights.map(|w| w.passing))
            .unwrap_or(1)
            .clamp(1, 1000);
        out.push(BackendSpec {
            address: SocketAddr::new(ip, e.service.port),
            weight,
        });
    }
    out.sort_by_key(|b| b.address);
    out.dedup_by_key(|b| b.address);
    Ok((out, skipped))
}

/// The shrink guard: when an answer would leave fewer than `min_fraction` of the previous
/// backends, keep enough of the previous ones (in address order) to stay at that fraction.
/// New backends are always taken. Returns the backends to apply and whether it intervened.
pub fn guard_shrink(
    old: &[BackendSpec],
    new: Vec<BackendSpec>,
    min_fraction: f64,
) -> (Vec<BackendSpec>, bool) {
    let min = (old.len() as f64 * min_fraction).ceil() as usize;
    if new.is_empty() || new.len() >= min {
        return (new, false);
    }
    let mut out = new;
    for b in old {
        if out.len() >= min {
            break;
        }
        if !out.iter().any(|n| n.address == b.address) {
            out.push(b.clone());
        }
    }
    out.sort_by_key(|b| b.address);
    (out, true)
}

/// Full-jitter exponential backoff: uniform in [0, min(cap, base·2^attempt)].
pub fn backoff(attempt: u32, base: Duration, cap: Duration, r: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    exp.mul_f64(r.clamp(0.0, 1.0))
}

/// Queries a second one watch may make, and its burst. The bucket stops a watch from looping
/// on answers that come back at once (a misbehaving agent); it must not slow real churn: at
/// 5/s a steady stream of changes waited 200 ms each (measured by benches/consul_convergence.py).
const WATCH_RATE: f64 = 20.0;
const WATCH_BURST: f64 = 40.0;

/// A token bucket: `rate` tokens a second, at most `burst`. Returns how long to wait.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Take a token at `now`; the delay before the caller may proceed.
    pub fn take(&mut self, now: Instant) -> Duration {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst) - 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// How one watch is doing, for `/status` and `/metrics`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WatchHealth {
    pub service: String,
    /// When Consul last answered this watch successfully (0: never).
    pub last_success_unix: u64,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    pub index: u64,
}

fn health_table() -> &'static std::sync::Mutex<BTreeMap<ServiceKey, WatchHealth>> {
    static T: std::sync::OnceLock<std::sync::Mutex<BTreeMap<ServiceKey, WatchHealth>>> =
        std::sync::OnceLock::new();
    T.get_or_init(Default::default)
}

/// The index of the last successful answer of the watch for `key`.
pub fn watch_index(key: &ServiceKey) -> Option<u64> {
    health_table()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(key)
        .map(|h| h.index)
}

/// The health of every running watch.
pub fn watch_health() -> Vec<WatchHealth> {
    health_table()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect()
}

fn note_health(key: &ServiceKey, f: impl FnOnce(&mut WatchHealth)) {
    let mut t = health_table().lock().unwrap_or_else(|e| e.into_inner());
    let h = t.entry(key.clone()).or_insert_with(|| WatchHealth {
        service: key.to_string(),
        ..Default::default()
    });
    f(h);
}

/// A change seen by a watch.
#[derive(Debug)]
enum Change {
    Service(Update),
    Routes {
        routes: Vec<DiscoveredRoute>,
        received: Instant,
    },
}

impl Change {
    fn received(&self) -> Instant {
        match self {
            Change::Service(u) => u.received,
            Change::Routes { received, .. } => *received,
        }
    }
}

/// Quiescence: after `first`, take what arrives until the channel has been quiet for `min`,
/// but never wait longer than `max` in all: one Snapshot rebuild per burst. `quiet(d)` is
/// the wait ([`Quiet::wait`] in tollgate, tokio's clock in the tests).
async fn burst<T, F: std::future::Future<Output = ()>>(
    first: T,
    rx: &mut tokio::sync::mpsc::Receiver<T>,
    min: Duration,
    max: Duration,
    mut quiet: impl FnMut(Duration) -> F,
) -> Vec<T> {
    let started = tokio::time::Instant::now();
    let mut batch = vec![first];
    loop {
        let left = max.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        tokio::select! {
            biased;
            u = rx.recv() => match u {
                Some(u) => batch.push(u),
                None => break,
            },
            _ = quiet(min.min(left)) => break,
        }
    }
    batch
}

/// The quiescence window's clock: a timerfd, good to tens of microseconds. tokio's timers
/// fire on whole milliseconds, rounded up, so the default 2 ms window was 3.2 ms on average
/// (measured in benches/consul_convergence.py), a third of tollgate's convergence time.
/// Without a timerfd (it cannot be created), tokio's clock.
struct Quiet(Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>);

impl Quiet {
    fn new() -> Quiet {
        use std::os::fd::FromRawFd;
        // SAFETY: timerfd_create has no preconditions; a non-negative result is a new fd
        // that nothing else owns.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "no timerfd: the quiescence window uses tokio's clock");
            return Quiet(None);
        }
        // SAFETY: see above
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: an OwnedFd's descriptor stays open, and the same, until it is dropped,
        // which is when the AsyncFd is
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        };
        Quiet(fd.ok())
    }

    async fn wait(&self, d: Duration) {
        use std::os::fd::AsRawFd;
        let Some(fd) = &self.0 else {
            return tokio::time::sleep(d).await;
        };
        if d.is_zero() {
            return; // a zero it_value would disarm the timer, not fire it
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: a valid timerfd and itimerspec; the old value is not asked for. Arming
        // anew also clears an expiry left unread by a wait that was cancelled.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } != 0 {
            return tokio::time::sleep(d).await;
        }
        loop {
            let Ok(mut ready) = fd.readable().await else {
                return tokio::time::sleep(d).await;
            };
            let mut expiries = [0u8; 8];
            // SAFETY: reads 8 bytes into an 8-byte buffer
            let read = ready.try_io(|fd| {
                let n = unsafe { libc::read(fd.as_raw_fd(), expiries.as_mut_ptr().cast(), 8) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match read {
                Ok(Ok(())) => return,
                Ok(Err(_)) => return tokio::time::sleep(d).await,
                Err(_would_block) => continue, // a stale readiness: wait again
            }
        }
    }
}

/// A service's new backends.
#[derive(Debug)]
struct Update {
    key: ServiceKey,
    view: ServiceView,
    received: Instant,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn client(s: &ConsulSettings) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(256);
    if let Some(ca) = &s.ca_cert {
        let pem = std::fs::read(ca)
            .map_err(|e| format!("cannot read consul.ca_cert {}: {e}", ca.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
            format!(
                "consul.ca_cert {} is not a PEM certificate: {e}",
                ca.display()
            )
        })?;
        b = b.add_root_certificate(cert);
    }
    b.build()
        .map_err(|e| format!("cannot build the Consul client: {e}"))
}

pub(crate) fn token(s: &ConsulSettings) -> Option<String> {
    s.token.clone().or_else(|| {
        s.token_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map(|t| t.trim().to_string())
    })
}

/// One blocking query on the health of `key`: the next index to send and its backends.
async fn query(
    http: &reqwest::Client,
    s: &ConsulSettings,
    key: &ServiceKey,
    index: u64,
) -> Result<(u64, Vec<BackendSpec>), String> {
    let mut params: Vec<(&str, String)> = Vec::new();
    if key.passing {
        params.push(("passing", "1".into()));
    }
    for t in &key.tags {
        params.push(("tag", t.clone()));
    }
    if s.cached {
        params.push(("cached", String::new()));
    }
    let path = format!("/v1/health/service/{}", urlencode(&key.service));
    let what = format!("service `{}`", key.service);
    let dc = key.datacenter.as_ref().or(s.datacenter.as_ref());
    let (next, body) = consul_get(http, s, &path, &what, dc, &params, index).await?;
    let (backends, skipped) = parse_health(&body)?;
    if !skipped.is_empty() {
        tracing::warn!(service = %key, skipped = ?skipped, "Consul instances without a usable address were skipped");
    }
    Ok((next, backends))
}

/// Does Consul know any instance of the service, whatever its health? (A plain read.)
async fn instances_exist(
    http: &reqwest::Client,
    s: &ConsulSettings,
    key: &ServiceKey,
) -> Result<bool, String> {
    let probe = ServiceKey {
        passing: false,
        ..key.clone()
    };
    let quick = ConsulSettings {
        wait: Duration::from_secs(1),
        ..s.clone()
    };
    // index 1 answers at once whenever the service's index is past 1
    let (_, all) = query(http, &quick, &probe, 1).await?;
    Ok(!all.is_empty())
}

/// A reqwest error with its causes, and a timeout said as such.
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!(
            "Consul did not answer within {timeout:?} (wait + wait/16 + 5s): timed out"
        );
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What to do with a successful answer: note the watch's health, apply the guard, and
/// send the change (if any). `Err` when the manager has gone away.
async fn on_answer(
    http: &reqwest::Client,
    settings: &ConsulSettings,
    key: &ServiceKey,
    index: u64,
    backends: Vec<BackendSpec>,
    last: &mut Option<Vec<BackendSpec>>,
    tx: &mpsc::Sender<Change>,
) -> Result<(), ()> {
    note_health(key, |h| {
        h.last_success_unix = unix_now();
        h.consecutive_failures = 0;
        h.last_error = None;
        h.index = index;
    });
    // The guard: a pool never goes from N > 0 to empty unless Consul confirms the service
    // exists and every instance is critical.
    let had = last.as_ref().map(Vec::len).unwrap_or(0);
    if backends.is_empty() && had > 0 {
        let critical =
            key.passing && matches!(instances_exist(http, settings, key).await, Ok(true));
        if critical {
            tracing::warn!(service = %key, "every instance is critical: the pool is now empty and answers 503");
        } else {
            tracing::error!(
                service = %key,
                kept = had,
                "GUARD: Consul answered with no instance at all; keeping the last known backends rather than emptying the pool"
            );
            crate::admin::metrics::metrics()
                .consul_guarded
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(());
        }
    }
    let backends = match (last.as_ref(), settings.min_fraction > 0.0) {
        (Some(old), true) => {
            let (kept, guarded) = guard_shrink(old, backends, settings.min_fraction);
            if guarded {
                tracing::error!(
                    service = %key,
                    before = old.len(),
                    after = kept.len(),
                    min_fraction = settings.min_fraction,
                    "GUARD: the pool would shrink below consul.min_fraction in one answer; keeping some of the previous backends"
                );
                crate::admin::metrics::metrics()
                    .consul_guarded
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            kept
        }
        _ => backends,
    };
    if last.as_ref() == Some(&backends) {
        return Ok(());
    }
    *last = Some(backends.clone());
    let update = Update {
        key: key.clone(),
        view: ServiceView {
            backends,
            index,
            updated_unix: unix_now(),
        },
        received: Instant::now(),
    };
    tx.send(Change::Service(update)).await.map_err(|_| ())
}

/// Count a watch's `failures`-th failed query in a row and return how long it backs off.
fn failure_backoff(failures: u32) -> Duration {
    crate::admin::metrics::metrics()
        .consul_errors
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    backoff(
        failures,
        Duration::from_millis(200),
        Duration::from_secs(30),
        fastrand::f64(),
    )
}

/// Wait until the watch's token bucket allows its next query.
async fn pace(bucket: &mut TokenBucket) {
    let delay = bucket.take(Instant::now());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

/// Note a failed query; the last known backends keep serving. Returns how long to back off.
fn on_error(key: &ServiceKey, failures: u32, e: &str) -> Duration {
    note_health(key, |h| {
        h.consecutive_failures = failures;
        h.last_error = Some(e.to_string());
    });
    let wait = failure_backoff(failures);
    tracing::warn!(service = %key, error = %e, retry_in_ms = wait.as_millis() as u64, "Consul watch failed; serving the last known backends");
    wait
}

/// Watch one service until the task is aborted; send every change.
async fn watch(settings: ConsulSettings, key: ServiceKey, tx: mpsc::Sender<Change>) {
    let http = match client(&settings) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(service = %key, "{e}");
            return;
        }
    };
    // spread the first queries so watches do not wake together
    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..100))).await;
    let mut bucket = TokenBucket::new(WATCH_RATE, WATCH_BURST, Instant::now());
    let mut index = 1u64;
    let mut last: Option<Vec<BackendSpec>> = None;
    let mut failures = 0u32;
    loop {
        pace(&mut bucket).await;
        match query(&http, &settings, &key, index).await {
            Ok((next, backends)) => {
                if failures > 0 {
                    tracing::info!(service = %key, "Consul answers again");
                }
                failures = 0;
                index = next;
                if on_answer(&http, &settings, &key, index, backends, &mut last, &tx)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                failures += 1;
                // start over from a full read
                index = 1;
                tokio::time::sleep(on_error(&key, failures, &e)).await;
            }
        }
    }
}

/// The routes services declare in their tags, from one `/v1/catalog/services` query.
async fn catalog_routes(
    http: &reqwest::Client,
    s: &ConsulSettings,
    index: u64,
) -> Result<(u64, Vec<DiscoveredRoute>), String> {
    let (next, body) = blocking_get(http, s, "/v1/catalog/services", index).await?;
    let services: BTreeMap<String, Vec<String>> = serde_json::from_slice(&body)
        .map_err(|e| format!("not a /v1/catalog/services answer: {e}"))?;
    let mut routes = Vec::new();
    if !s.route_meta_prefix.is_empty() {
        routes.extend(meta_routes(http, s, services.keys().cloned().collect(), next).await);
    }
    for (service, tags) in services {
        for tag in tags {
            match parse_route_tag(&tag, &s.route_tag_prefix, s.fabio_tags) {
                Some(Ok((host, path))) => routes.push(DiscoveredRoute {
                    host,
                    path,
                    service: service.clone(),
                    tag,
                    index: next,
                }),
                Some(Err(e)) => tracing::warn!(service = %service, "ignoring a route tag: {e}"),
                None => {}
            }
        }
    }
    routes.sort();
    routes.dedup_by(|a, b| a.host == b.host && a.path == b.path && a.service == b.service);
    Ok((next, routes))
}

/// Routes declared in service meta (`tollgate-route`, `tollgate-route-2`, … = `host/path`):
/// every service's instances are read once (16 at a time) per catalog change. A service that
/// cannot be read keeps no meta routes this round (and the error is logged).
async fn meta_routes(
    http: &reqwest::Client,
    s: &ConsulSettings,
    services: Vec<String>,
    index: u64,
) -> Vec<DiscoveredRoute> {
    #[derive(Deserialize)]
    struct Instance {
        #[serde(rename = "ServiceMeta", default)]
        meta: Option<HashMap<String, String>>,
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(16));
    let mut reads = tokio::task::JoinSet::new();
    for service in services {
        let (http, s, limit) = (http.clone(), s.clone(), limit.clone());
        reads.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let mut url = format!("{}/v1/catalog/service/{}", s.address, urlencode(&service));
            if let Some(dc) = &s.datacenter {
                url.push_str(&format!("?dc={}", urlencode(dc)));
            }
            let mut req = http.get(&url).timeout(Duration::from_secs(10));
            if let Some(t) = token(&s) {
                req = req.header("X-Consul-Token", t);
            }
            let r: Result<Vec<Instance>, String> = async {
                let resp = req
                    .send()
                    .await
                    .map_err(|e| describe(&e, Duration::from_secs(10)))?;
                if !resp.status().is_success() {
                    return Err(format!("{}", resp.status()));
                }
                resp.json().await.map_err(|e| e.to_string())
            }
            .await;
            (service, r)
        });
    }
    let mut routes = Vec::new();
    while let Some(Ok((service, r))) = reads.join_next().await {
        let instances = match r {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(service = %service, error = %e, "cannot read the service's meta for routes");
                continue;
            }
        };
        for meta in instances.into_iter().filter_map(|i| i.meta) {
            for (k, v) in meta {
                let is_route = k == s.route_meta_prefix
                    || k.strip_prefix(&s.route_meta_prefix)
                        .is_some_and(|rest| rest.starts_with('-'));
                if !is_route {
                    continue;
                }
                match parse_route_tag(&v, "", false) {
                    Some(Ok((host, path))) => routes.push(DiscoveredRoute {
                        host,
                        path,
                        service: service.clone(),
                        tag: format!("meta {k}={v}"),
                        index,
                    }),
                    Some(Err(e)) => {
                        tracing::warn!(service = %service, "ignoring route meta {k}: {e}")
                    }
                    None => {}
                }
            }
        }
    }
    routes
}

/// Watch the catalog for route tags; send the route set whenever it changes.
async fn watch_catalog(settings: ConsulSettings, tx: mpsc::Sender<Change>) {
    let http = match client(&settings) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return;
        }
    };
    let mut bucket = TokenBucket::new(WATCH_RATE, WATCH_BURST, Instant::now());
    let (mut index, mut failures) = (1u64, 0u32);
    // compared without the index: a registration elsewhere moves it without changing routes
    let strip = |r: &[DiscoveredRoute]| -> Vec<(String, String, String, String)> {
        r.iter()
            .map(|r| {
                (
                    r.host.clone(),
                    r.path.clone(),
                    r.service.clone(),
                    r.tag.clone(),
                )
            })
            .collect()
    };
    let mut last: Option<Vec<(String, String, String, String)>> = None;
    loop {
        pace(&mut bucket).await;
        match catalog_routes(&http, &settings, index).await {
            Ok((next, routes)) => {
                failures = 0;
                index = next;
                let now = strip(&routes);
                if last.as_ref() == Some(&now) {
                    continue;
                }
                if routes.is_empty() && last.as_ref().is_some_and(|l| !l.is_empty()) {
                    tracing::error!("GUARD: the Consul catalog has no route tags any more; keeping the routes it had");
                    crate::admin::metrics::metrics()
                        .consul_guarded
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                last = Some(now);
                if tx
                    .send(Change::Routes {
                        routes,
                        received: Instant::now(),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                failures += 1;
                index = 1;
                let wait = failure_backoff(failures);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "Consul catalog watch failed; keeping the routes it had");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// One blocking GET: `path` with `index`, `wait`, `dc`, `stale` and `params`; the settings'
/// token and timeout (wait + wait/16, Consul's own jitter, + a margin). Returns the next index
/// to send (Consul's index rules) and the body. A 403, any other error status and an answer
/// from servers without a leader (unless stale reads are allowed) are errors that say so.
async fn consul_get(
    http: &reqwest::Client,
    s: &ConsulSettings,
    path: &str,
    what: &str,
    dc: Option<&String>,
    params: &[(&str, String)],
    index: u64,
) -> Result<(u64, bytes::Bytes), String> {
    let mut url = format!(
        "{}{path}?index={index}&wait={}s",
        s.address,
        s.wait.as_secs()
    );
    let dc_param = dc.map(|d| ("dc", d.clone()));
    let stale = s.stale.then(|| ("stale", String::new()));
    for (k, v) in params.iter().cloned().chain(dc_param).chain(stale) {
        url.push('&');
        url.push_str(k);
        if !v.is_empty() {
            url.push('=');
            url.push_str(&urlencode(&v));
        }
    }
    let timeout = s.wait + s.wait / 16 + Duration::from_secs(5);
    let mut req = http.get(&url).timeout(timeout);
    if let Some(t) = token(s) {
        req = req.header("X-Consul-Token", t);
    }
    let resp = req.send().await.map_err(|e| describe(&e, timeout))?;
    let status = resp.status();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let answered = header("x-consul-index").and_then(|v| v.parse::<u64>().ok());
    let known_leader = header("x-consul-knownleader")
        .map(|v| v != "false")
        .unwrap_or(true);
    // read the body in every case, so the connection can be reused
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    if status.is_success() && !known_leader && !s.stale {
        return Err("the Consul servers have no leader (X-Consul-KnownLeader: false): not acting on a possibly stale answer".into());
    }
    if status == reqwest::StatusCode::FORBIDDEN {
        return Err(format!(
            "403 Forbidden: the Consul token cannot read {what} ({})",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    if !status.is_success() {
        return Err(format!(
            "{path}: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    Ok((next_index(index, answered), body))
}

/// One blocking GET on a catalog-wide endpoint (`path`).
async fn blocking_get(
    http: &reqwest::Client,
    s: &ConsulSettings,
    path: &str,
    index: u64,
) -> Result<(u64, bytes::Bytes), String> {
    consul_get(http, s, path, path, s.datacenter.as_ref(), &[], index).await
}

/// One blocking query on an endpoint whose index moves with any change of its kind.
async fn block_on(
    http: &reqwest::Client,
    s: &ConsulSettings,
    path: &str,
    index: u64,
) -> Result<u64, String> {
    blocking_get(http, s, path, index)
        .await
        .map(|(next, _)| next)
}

/// The fallback beyond `max_blocking` services: two blocking watches in all, on
/// `/v1/health/state/any` (any check changes) and `/v1/catalog/services` (any registration
/// or tag change); when either moves, every watched service is read once (16 at a time).
async fn watch_all(settings: ConsulSettings, keys: Vec<ServiceKey>, tx: mpsc::Sender<Change>) {
    let http = match client(&settings) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return;
        }
    };
    tracing::info!(
        services = keys.len(),
        max_blocking = settings.max_blocking,
        "more Consul services than blocking queries allowed: watching changes through /v1/health/state/any and /v1/catalog/services"
    );
    let mut last: BTreeMap<ServiceKey, Option<Vec<BackendSpec>>> =
        keys.iter().map(|k| (k.clone(), None)).collect();
    let mut failures: BTreeMap<ServiceKey, u32> = BTreeMap::new();
    // Where both change watches stand now, taken before the first full read: a change after
    // this point moves an index and causes another read, so none is missed; and the first
    // blocking queries wait instead of answering at once and causing two redundant reads.
    let (health, catalog) = tokio::join!(
        block_on(&http, &settings, "/v1/health/state/any", 0),
        block_on(&http, &settings, "/v1/catalog/services", 0),
    );
    let (mut health_index, mut catalog_index) = (health.unwrap_or(1), catalog.unwrap_or(1));
    let mut bucket = TokenBucket::new(10.0, 20.0, Instant::now());
    let limit = Arc::new(tokio::sync::Semaphore::new(16));
    let mut read = true;
    loop {
        if read {
            pace(&mut bucket).await;
            // read every service once
            let mut reads = tokio::task::JoinSet::new();
            for k in &keys {
                let (http, s, k, limit) =
                    (http.clone(), settings.clone(), k.clone(), limit.clone());
                reads.spawn(async move {
                    let _permit = limit.acquire_owned().await;
                    let r = query(&http, &s, &k, 0).await;
                    (k, r)
                });
            }
            while let Some(Ok((k, r))) = reads.join_next().await {
                match r {
                    Ok((index, backends)) => {
                        failures.remove(&k);
                        let slot = last.entry(k.clone()).or_default();
                        if on_answer(&http, &settings, &k, index, backends, slot, &tx)
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        let f = failures.entry(k.clone()).or_default();
                        *f += 1;
                        on_error(&k, *f, &e);
                    }
                }
            }
        }
        // then wait for the next change anywhere; a blocking query that ran out its `wait`
        // answers with the index it was given: nothing changed, nothing to read
        read = !failures.is_empty();
        tokio::select! {
            r = block_on(&http, &settings, "/v1/health/state/any", health_index) => match r {
                Ok(i) => { read |= i != health_index; health_index = i; }
                Err(e) => { health_index = 1; read = true; change_watch_failed(&e).await; }
            },
            r = block_on(&http, &settings, "/v1/catalog/services", catalog_index) => match r {
                Ok(i) => { read |= i != catalog_index; catalog_index = i; }
                Err(e) => { catalog_index = 1; read = true; change_watch_failed(&e).await; }
            },
        }
    }
}

/// A change watch of the fallback mode failed: back off, then say so.
async fn change_watch_failed(e: &str) {
    tokio::time::sleep(backoff(
        1,
        Duration::from_millis(500),
        Duration::from_secs(30),
        fastrand::f64(),
    ))
    .await;
    tracing::warn!(error = %e, "Consul change watch failed");
}

/// Runs the watches the live configuration needs and applies what they see.
pub struct Manager {
    state: Arc<State>,
}

impl Manager {
    pub fn new(state: Arc<State>) -> Self {
        Manager { state }
    }

    fn wanted(&self) -> (ConsulSettings, Vec<ServiceKey>) {
        let snap = self.state.snapshot();
        // pools of the live Snapshot: the file's and those created for tag-declared routes
        let mut keys: Vec<ServiceKey> = snap
            .pools
            .iter()
            .filter_map(|p| p.spec.consul.clone())
            .collect();
        keys.sort();
        keys.dedup();
        (snap.config.consul.clone(), keys)
    }

    pub async fn run(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let (tx, mut rx) = mpsc::channel::<Change>(1024);
        let mut catalog: Option<tokio::task::JoinHandle<()>> = None;
        let mut watches: BTreeMap<ServiceKey, tokio::task::JoinHandle<()>> = BTreeMap::new();
        let mut settings_in_force: Option<ConsulSettings> = None;
        let mut fallback: Option<(Vec<ServiceKey>, tokio::task::JoinHandle<()>)> = None;
        let mut leaving: BTreeMap<ServiceKey, Instant> = BTreeMap::new();
        let quiet = Quiet::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            // start and stop watches as pools come and go (checked every second)
            let (settings, keys) = self.wanted();
            if settings_in_force.as_ref() != Some(&settings) {
                for (_, h) in std::mem::take(&mut watches) {
                    h.abort();
                }
                if let Some((_, h)) = fallback.take() {
                    h.abort();
                }
                if let Some(h) = catalog.take() {
                    h.abort();
                }
                settings_in_force = Some(settings.clone());
            }
            if settings.tag_routes && catalog.is_none() {
                catalog = Some(tokio::spawn(watch_catalog(settings.clone(), tx.clone())));
            }
            if keys.len() > settings.max_blocking {
                // the fallback: one task for all services (restarted when the set changes)
                for (_, h) in std::mem::take(&mut watches) {
                    h.abort();
                }
                if fallback.as_ref().map(|(k, _)| k) != Some(&keys) {
                    if let Some((_, h)) = fallback.take() {
                        h.abort();
                    }
                    let h = tokio::spawn(watch_all(settings.clone(), keys.clone(), tx.clone()));
                    fallback = Some((keys.clone(), h));
                }
            } else {
                if let Some((_, h)) = fallback.take() {
                    h.abort();
                }
                // a watch no pool needs any more is stopped after the grace period, so a
                // route that flaps does not restart it
                let now = Instant::now();
                watches.retain(|k, h| {
                    if keys.contains(k) {
                        leaving.remove(k);
                        return true;
                    }
                    let since = *leaving.entry(k.clone()).or_insert(now);
                    if now.duration_since(since) < settings.watch_grace {
                        return true;
                    }
                    leaving.remove(k);
                    h.abort();
                    health_table()
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(k);
                    false
                });
                for k in keys {
                    watches
                        .entry(k.clone())
                        .or_insert_with(|| tokio::spawn(watch(settings.clone(), k, tx.clone())));
                }
            }

            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
                Some(first) = rx.recv() => {
                    let batch =
                        burst(first, &mut rx, settings.quiescence_min, settings.quiescence_max, |d| quiet.wait(d)).await;
                    self.apply(batch);
                }
            }
        }
        for (_, h) in watches {
            h.abort();
        }
        if let Some((_, h)) = fallback {
            h.abort();
        }
        if let Some(h) = catalog {
            h.abort();
        }
    }

    fn apply(&self, batch: Vec<Change>) {
        let oldest = batch
            .iter()
            .map(Change::received)
            .min()
            .unwrap_or_else(Instant::now);
        let mut view: View = (*self.state.view()).clone();
        for c in &batch {
            match c {
                Change::Service(u) => {
                    tracing::info!(service = %u.key, backends = u.view.backends.len(), index = u.view.index, "Consul change");
                    view.services.insert(u.key.clone(), u.view.clone());
                }
                Change::Routes { routes, .. } => {
                    tracing::info!(routes = routes.len(), "Consul route tags changed");
                    view.routes = routes.clone();
                }
            }
        }
        let before = self.state.snapshot().route_conflicts.clone();
        let file = self.state.snapshot().config.consul.state_file.clone();
        match self.state.apply_view(view) {
            Ok(generation) => {
                if let Some(f) = file {
                    if let Err(e) = self.state.view().save(&f) {
                        tracing::warn!(file = %f.display(), error = %e, "cannot save the Consul view; a restart while Consul is down would start with empty Consul pools");
                    }
                }
                let took = oldest.elapsed();
                crate::admin::metrics::metrics().convergence.observe(took);
                tracing::info!(
                    generation,
                    changes = batch.len(),
                    convergence_ms = took.as_secs_f64() * 1000.0,
                    "pools rebuilt from Consul"
                );
                let conflicts = &self.state.snapshot().route_conflicts;
                if *conflicts != before {
                    for c in conflicts {
                        tracing::warn!("route conflict: {c}");
                    }
                }
            }
            Err(e) => tracing::error!(
                "Consul change could not be applied: {}",
                e.to_string().trim_end()
            ),
        }
    }
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Manager {
    async fn start(&self, shutdown: pingora::server::ShutdownWatch) {
        self.run(shutdown).await
    }
}

#[cfg(test)]
mod tests {

    #[tokio::test(start_paused = true)]
    async fn a_burst_becomes_one_batch_and_a_quiet_gap_ends_it() {
        let ms = Duration::from_millis;
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        // watches woken by one Consul index answer within a millisecond of each other
        let sender = tokio::spawn(async move {
            for i in 1..=5 {
                tokio::time::sleep(ms(1)).await;
                tx.send(i).await.unwrap();
            }
            tokio::time::sleep(ms(50)).await; // quiet: the next change is a new burst
            tx.send(6).await.unwrap();
            // a steady stream faster than the window: cut off by the max
            for i in 7..200 {
                tokio::time::sleep(ms(1)).await;
                if tx.send(i).await.is_err() {
                    break;
                }
            }
        });
        let t = tokio::time::Instant::now();
        assert_eq!(
            burst(0, &mut rx, ms(2), ms(150), tokio::time::sleep).await,
            vec![0, 1, 2, 3, 4, 5]
        );
        assert_eq!(t.elapsed(), ms(7), "5 ms of burst, then 2 ms of quiet");
        let first = rx.recv().await.unwrap();
        assert_eq!(first, 6);
        let t = tokio::time::Instant::now();
        let b = burst(first, &mut rx, ms(2), ms(30), tokio::time::sleep).await;
        assert_eq!(t.elapsed(), ms(30), "never longer than max");
        assert!(b.len() >= 25 && b.len() <= 32, "{}", b.len());
        sender.abort();
    }

    use super::*;

    #[tokio::test]
    async fn the_quiet_clock_waits_its_time_again_after_a_cancelled_wait() {
        let quiet = Quiet::new();
        assert!(quiet.0.is_some(), "timerfd is available on Linux");
        let ms = Duration::from_millis;
        // a wait that loses a race leaves the timer armed: the next wait re-arms it
        tokio::select! {
            _ = quiet.wait(ms(50)) => panic!("50 ms cannot pass before 1 ms"),
            _ = tokio::time::sleep(ms(1)) => {}
        }
        for d in [ms(2), ms(5), ms(20)] {
            let t = Instant::now();
            quiet.wait(d).await;
            let took = t.elapsed();
            // at least d; the upper bound only catches a wait that hangs on or fires late by
            // a whole tick of tokio's clock many times over (a loaded CI machine)
            assert!(took >= d && took < d + ms(200), "{d:?} took {took:?}");
        }
        // zero: no wait at all (a zero timerfd setting would disarm, not fire)
        let t = Instant::now();
        quiet.wait(Duration::ZERO).await;
        assert!(t.elapsed() < ms(100));
        // the burst collector with it: a quiet channel ends the burst after min
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        tx.send(1).await.unwrap();
        let t = Instant::now();
        assert_eq!(
            burst(0, &mut rx, ms(3), ms(100), |d| quiet.wait(d)).await,
            vec![0, 1]
        );
        assert!(t.elapsed() >= ms(3), "{:?}", t.elapsed());
    }

    #[test]
    fn index_rules() {
        assert_eq!(next_index(1, Some(10)), 10, "moves forward");
        assert_eq!(next_index(10, Some(10)), 10, "unchanged");
        assert_eq!(
            next_index(10, Some(4)),
            1,
            "backwards resets (and is sent as 1)"
        );
        assert_eq!(next_index(10, Some(0)), 1, "never below 1");
        assert_eq!(next_index(10, None), 1, "no header: start over");
        assert_eq!(next_index(0, Some(0)), 1);
    }

    #[test]
    fn health_answers_become_sorted_backends() {
        let body = br#"[
          {"Node":{"Address":"10.0.0.9"},"Service":{"Address":"","Port":8080,"Weights":{"Passing":3,"Warning":1}}},
          {"Node":{"Address":"10.0.0.2"},"Service":{"Address":"10.1.0.2","Port":9000,"Meta":{"weight":"7"},"Weights":{"Passing":1}}},
          {"Node":{"Address":"10.0.0.3"},"Service":{"Address":"api.internal","Port":9000}},
          {"Node":{"Address":"10.0.0.4"},"Service":{"Address":"10.1.0.4","Port":0}},
          {"Node":{"Address":"10.0.0.5"},"Service":{"Address":"10.1.0.5","Port":1,"Weights":{"Passing":0}}}
        ]"#;
        let (b, skipped) = parse_health(body).unwrap();
        let got: Vec<(String, u32)> = b
            .iter()
            .map(|b| (b.address.to_string(), b.weight))
            .collect();
        assert_eq!(
            got,
            vec![
                ("10.0.0.9:8080".to_string(), 3),
                ("10.1.0.2:9000".to_string(), 7),
                ("10.1.0.5:1".to_string(), 1),
            ]
        );
        assert_eq!(skipped.len(), 2);
        assert!(parse_health(b"{\"not\":\"a list\"}").is_err());
        assert_eq!(parse_health(b"[]").unwrap().0, vec![]);
    }

    fn b(port: u16) -> BackendSpec {
        BackendSpec {
            address: SocketAddr::from(([10, 0, 0, 1], port)),
            weight: 1,
        }
    }

    #[test]
    fn the_shrink_guard_keeps_a_fraction() {
        let old: Vec<BackendSpec> = (1..=10).map(b).collect();
        // 10 -> 2 with min 0.5: three old ones come back to make 5
        let (out, guarded) = guard_shrink(&old, vec![b(9), b(10)], 0.5);
        assert!(guarded);
        assert_eq!(
            out.iter().map(|b| b.address.port()).collect::<Vec<_>>(),
            vec![1, 2, 3, 9, 10]
        );
        // within the fraction: applied as is
        let (out, guarded) = guard_shrink(&old, (1..=6).map(b).collect(), 0.5);
        assert!(!guarded);
        assert_eq!(out.len(), 6);
        // growth and new backends are always taken
        let (out, guarded) = guard_shrink(&old[..2], vec![b(1), b(2), b(50)], 0.9);
        assert!(!guarded);
        assert_eq!(out.len(), 3);
        // empty answers are the other guard's business (instances_exist)
        assert_eq!(guard_shrink(&old, vec![], 0.5), (vec![], false));
    }

    #[test]
    fn backoff_is_full_jitter_and_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        assert_eq!(backoff(0, base, cap, 1.0), base);
        assert_eq!(backoff(3, base, cap, 1.0), Duration::from_millis(800));
        assert_eq!(backoff(30, base, cap, 1.0), cap);
        assert_eq!(backoff(3, base, cap, 0.0), Duration::ZERO);
        assert_eq!(backoff(3, base, cap, 0.5), Duration::from_millis(400));
    }

    #[test]
    fn token_bucket_limits_a_hot_loop() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(5.0, 2.0, t0);
        assert_eq!(b.take(t0), Duration::ZERO);
        assert_eq!(b.take(t0), Duration::ZERO);
        let d = b.take(t0);
        assert!((d.as_secs_f64() - 0.2).abs() < 1e-9, "{d:?}");
        // after a second the bucket is full again (2 tokens)
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.take(t1), Duration::ZERO);
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(urlencode("a b/c&d"), "a%20b%2Fc%26d");
        assert_eq!(urlencode("prod-1.x_~"), "prod-1.x_~");
    }
}
