//! The watch loops, each turning on one `Blocking` step (pace, query at the index, carry
//! the index on or start over, back off): one blocking watch per service, the catalog watch
//! for routes declared in tags and meta, and the fallback beyond `max_blocking` services (two
//! change watches, then a read of every watched service); the certificates under
//! `tls.consul_kv_prefix`; the per-watch health that `/status` shows.

use super::*;
use std::sync::atomic::Ordering::Relaxed;

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

/// The health of every running watch: written by the watches, read by the admin API (one
/// table, made by `server` and handed to both).
#[derive(Debug, Default, Clone)]
pub struct WatchTable(Arc<std::sync::Mutex<BTreeMap<ServiceKey, WatchHealth>>>);

impl WatchTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ServiceKey, WatchHealth>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The watch families of `/metrics` (Prometheus text).
    pub fn render_metrics(&self, out: &mut String) {
        use crate::metrics::{esc, family};
        use std::fmt::Write;
        family(
            out,
            "tollgate_consul_watch_staleness_seconds",
            "gauge",
            "Seconds since Consul last answered the watch successfully (how stale its pool may be).",
        );
        let now = crate::clock::unix_secs();
        for h in self.all() {
            if h.last_success_unix > 0 {
                let _ = writeln!(
                    out,
                    "tollgate_consul_watch_staleness_seconds{{service=\"{}\"}} {}",
                    esc(&h.service),
                    now.saturating_sub(h.last_success_unix)
                );
            }
        }
    }

    /// The index of the last successful answer of the watch for `key`.
    pub fn index(&self, key: &ServiceKey) -> Option<u64> {
        self.lock().get(key).map(|h| h.index)
    }

    /// The health of every running watch.
    pub fn all(&self) -> Vec<WatchHealth> {
        self.lock().values().cloned().collect()
    }

    pub(super) fn note(&self, key: &ServiceKey, f: impl FnOnce(&mut WatchHealth)) {
        let mut t = self.lock();
        let h = t.entry(key.clone()).or_insert_with(|| WatchHealth {
            service: key.to_string(),
            ..Default::default()
        });
        f(h);
    }

    pub(super) fn remove(&self, key: &ServiceKey) {
        self.lock().remove(key);
    }
}

/// Where a watch sends what it sees: the manager's channel, the health table, the counters.
#[derive(Clone)]
pub(super) struct Sink {
    pub tx: mpsc::Sender<Change>,
    pub health: WatchTable,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// One blocking query on the health of `key`: the next index to send and its backends.
pub(super) async fn query(
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
pub(super) async fn instances_exist(
    http: &reqwest::Client,
    s: &ConsulSettings,
    key: &ServiceKey,
) -> Result<bool, String> {
    let probe = ServiceKey {
        passing: false,
        ..key.clone()
    };
    // index 1 answers at once whenever the service's index is past 1
    let (_, all) = query(http, &quick(s), &probe, 1).await?;
    Ok(!all.is_empty())
}

/// What to do with a successful answer: note the watch's health, apply the guard, and
/// send the change (if any). `Err` when the manager has gone away.
pub(super) async fn on_answer(
    http: &reqwest::Client,
    settings: &ConsulSettings,
    key: &ServiceKey,
    index: u64,
    backends: Vec<BackendSpec>,
    last: &mut Option<(Vec<BackendSpec>, bool)>,
    sink: &Sink,
) -> Result<(), ()> {
    sink.health.note(key, |h| {
        h.last_success_unix = crate::clock::unix_secs();
        h.consecutive_failures = 0;
        h.last_error = None;
        h.index = index;
    });
    // The guard: a pool never goes from N > 0 to empty unless Consul confirms the service
    // exists and every instance is critical.
    let had = last.as_ref().map(|(b, _)| b.len()).unwrap_or(0);
    let mut guarded = false;
    let mut backends = backends;
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
            sink.metrics.consul_guarded.fetch_add(1, Relaxed);
            guarded = true;
            backends = last.as_ref().map(|(b, _)| b.clone()).unwrap_or_default();
        }
    }
    let backends = match (last.as_ref(), settings.min_fraction > 0.0, guarded) {
        (Some((old, _)), true, false) => {
            let (kept, shrink_guarded) = guard_shrink(old, backends, settings.min_fraction);
            guarded = shrink_guarded;
            if guarded {
                tracing::error!(
                    service = %key,
                    before = old.len(),
                    after = kept.len(),
                    min_fraction = settings.min_fraction,
                    "GUARD: the pool would shrink below consul.min_fraction in one answer; keeping some of the previous backends"
                );
                sink.metrics.consul_guarded.fetch_add(1, Relaxed);
            }
            kept
        }
        _ => backends,
    };
    // sent when the backends change, or whether the guard holds them does
    let applied = (backends, guarded);
    if last.as_ref() == Some(&applied) {
        return Ok(());
    }
    *last = Some(applied.clone());
    let (backends, guarded) = applied;
    let update = Update {
        key: key.clone(),
        view: ServiceView {
            backends,
            index,
            updated_unix: crate::clock::unix_secs(),
            guarded,
        },
        received: Instant::now(),
    };
    sink.tx.send(Change::Service(update)).await.map_err(|_| ())
}

/// Count a watch's `failures`-th failed query in a row and return how long it backs off.
pub(super) fn failure_backoff(sink: &Sink, failures: u32) -> Duration {
    sink.metrics.consul_errors.fetch_add(1, Relaxed);
    backoff(
        failures,
        Duration::from_millis(200),
        Duration::from_secs(30),
        fastrand::f64(),
    )
}

/// Wait until the watch's token bucket allows its next query.
pub(super) async fn pace(bucket: &mut TokenBucket) {
    let delay = bucket.take(Instant::now());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

/// Where one blocking watch stands: the index to send next, its failures in a row, and its
/// pace. Every watch loop turns on [`Blocking::next`].
pub(super) struct Blocking {
    pub index: u64,
    failures: u32,
    bucket: Option<TokenBucket>,
}

impl Blocking {
    /// A watch from `index` (1: a full read first), paced by a token bucket of `rate` queries
    /// a second and `burst`, or not paced.
    pub fn new(index: u64, pace: Option<(f64, f64)>) -> Blocking {
        Blocking {
            index,
            failures: 0,
            bucket: pace.map(|(rate, burst)| TokenBucket::new(rate, burst, Instant::now())),
        }
    }

    /// Run `query` once at the current index, when the pace allows. An answer moves the index
    /// on and is returned. An error starts the watch over from a full read (index 1), tells
    /// `failed` how many failures in a row this makes, waits as long as it says, and returns
    /// `None`. Cancel-safe: nothing changes until the query has finished.
    pub async fn next<T, Fut>(
        &mut self,
        what: &(dyn std::fmt::Display + Sync),
        query: impl FnOnce(u64) -> Fut,
        failed: impl FnOnce(u32, &str) -> Duration,
    ) -> Option<T>
    where
        Fut: std::future::Future<Output = Result<(u64, T), String>>,
    {
        if let Some(b) = &mut self.bucket {
            pace(b).await;
        }
        match query(self.index).await {
            Ok((next, answer)) => {
                if self.failures > 0 {
                    tracing::info!(watch = %what, "Consul answers again");
                }
                self.failures = 0;
                self.index = next;
                Some(answer)
            }
            Err(e) => {
                self.failures += 1;
                self.index = 1;
                tokio::time::sleep(failed(self.failures, &e)).await;
                None
            }
        }
    }
}

/// Note a failed query; the last known backends keep serving. Returns how long to back off.
pub(super) fn on_error(sink: &Sink, key: &ServiceKey, failures: u32, e: &str) -> Duration {
    sink.health.note(key, |h| {
        h.consecutive_failures = failures;
        h.last_error = Some(e.to_string());
    });
    let wait = failure_backoff(sink, failures);
    tracing::warn!(service = %key, error = %e, retry_in_ms = wait.as_millis() as u64, "Consul watch failed; serving the last known backends");
    wait
}

/// Watch one service until the task is aborted; send every change.
pub(super) async fn watch(settings: ConsulSettings, key: ServiceKey, sink: Sink) {
    let http = match client(&settings) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(service = %key, "{e}");
            return;
        }
    };
    // spread the first queries so watches do not wake together
    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..100))).await;
    let mut w = Blocking::new(1, Some((WATCH_RATE, WATCH_BURST)));
    let mut last: Option<(Vec<BackendSpec>, bool)> = None;
    loop {
        let answer = w
            .next(
                &key,
                |i| query(&http, &settings, &key, i),
                |f, e| on_error(&sink, &key, f, e),
            )
            .await;
        if let Some(backends) = answer {
            let sent = on_answer(&http, &settings, &key, w.index, backends, &mut last, &sink);
            if sent.await.is_err() {
                return;
            }
        }
    }
}

/// The routes services declare in their tags, from one `/v1/catalog/services` query.
pub(super) async fn catalog_routes(
    http: &reqwest::Client,
    s: &ConsulSettings,
    index: u64,
) -> Result<(u64, Vec<DiscoveredRoute>), String> {
    let (next, body) = blocking_get(http, s, "/v1/catalog/services", index).await?;
    let services: BTreeMap<String, Vec<String>> = serde_json::from_slice(&body)
        .map_err(|e| format!("not a /v1/catalog/services answer: {e}"))?;
    let mut routes = Vec::new();
    let mut protocols = BTreeMap::new();
    if !s.route_meta_prefix.is_empty() {
        let (meta, said) = meta_routes(http, s, services.keys().cloned().collect(), next).await;
        routes.extend(meta);
        protocols = said;
        for r in &mut routes {
            r.service_tags = services.get(&r.service).cloned().unwrap_or_default();
        }
    }
    for (service, tags) in &services {
        for tag in tags {
            let parsed = parse_route_tag(tag, &s.route_tag_prefix, s.fabio_tags)
                .or_else(|| parse_port_tag(tag, crate::config::defaults::consul::PORT_TAG_PREFIX));
            if let Some(parsed) = parsed {
                let mut r = declared(service, tag.clone(), next, parsed);
                r.service_tags = tags.clone();
                routes.push(r);
            }
        }
    }
    for r in &mut routes {
        if let Some(p) = protocols.get(&r.service) {
            crate::discovery::apply_protocol_meta(r, p);
        }
    }
    routes.sort();
    routes.dedup_by(|a, b| {
        a.host == b.host && a.path == b.path && a.service == b.service && a.refused == b.refused
    });
    Ok((next, routes))
}

/// The route `tag` of `service` declares, or the tag refused with why (it is reported as a
/// route conflict, never routed).
fn declared(
    service: &str,
    tag: String,
    index: u64,
    parsed: Result<TagRoute, String>,
) -> DiscoveredRoute {
    let (host, path, options, refused) = match parsed {
        Ok(r) => (r.host, r.path, r.options, None),
        Err(e) => {
            tracing::warn!(service = %service, "route tag not applied: {e}");
            (String::new(), String::new(), Default::default(), Some(e))
        }
    };
    DiscoveredRoute {
        host,
        path,
        service: service.to_string(),
        tag,
        index,
        service_tags: Vec::new(),
        options,
        refused,
    }
}

/// Routes declared in service meta (`tollgate-route`, `tollgate-route-2`, … = `host/path`),
/// and the protocol a service declares (`tollgate-protocol`: the value its instances agree
/// on, or why they do not): every service's instances are read once (16 at a time) per
/// catalog change. A service that cannot be read keeps no meta routes this round (and the
/// error is logged).
pub(super) async fn meta_routes(
    http: &reqwest::Client,
    s: &ConsulSettings,
    services: Vec<String>,
    index: u64,
) -> (
    Vec<DiscoveredRoute>,
    BTreeMap<String, Result<String, String>>,
) {
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
    let mut protocols = BTreeMap::new();
    while let Some(Ok((service, r))) = reads.join_next().await {
        let instances = match r {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(service = %service, error = %e, "cannot read the service's meta for routes");
                continue;
            }
        };
        let said: std::collections::BTreeSet<String> = instances
            .iter()
            .filter_map(|i| i.meta.as_ref()?.get(PROTOCOL_META))
            .map(|v| v.trim().to_ascii_lowercase())
            .collect();
        let mut said = said.into_iter();
        match (said.next(), said.next()) {
            (None, _) => {}
            (Some(one), None) => {
                protocols.insert(service.clone(), Ok(one));
            }
            (Some(a), Some(b)) => {
                protocols.insert(
                    service.clone(),
                    Err(format!(
                        "its instances disagree on meta {PROTOCOL_META} ({a}, {b}): routes wait until they agree"
                    )),
                );
            }
        }
        let keyed = |k: &str, prefix: &str| {
            k == prefix
                || k.strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('-'))
        };
        for meta in instances.into_iter().filter_map(|i| i.meta) {
            for (k, v) in meta {
                let parsed = if keyed(&k, &s.route_meta_prefix) {
                    parse_route_tag(&v, "", false)
                } else if keyed(&k, crate::config::defaults::consul::PORT_META_PREFIX) {
                    parse_port_tag(&v, "")
                } else {
                    continue;
                };
                if let Some(parsed) = parsed {
                    routes.push(declared(&service, format!("meta {k}={v}"), index, parsed));
                }
            }
        }
    }
    (routes, protocols)
}

/// The service meta key that says how to reach a service's instances.
pub const PROTOCOL_META: &str = "tollgate-protocol";

/// Watch the catalog for route tags; send the route set whenever it changes.
pub(super) async fn watch_catalog(settings: ConsulSettings, sink: Sink) {
    let http = match client(&settings) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return;
        }
    };
    let mut w = Blocking::new(1, Some((WATCH_RATE, WATCH_BURST)));
    // compared without the index: a registration elsewhere moves it without changing routes
    let strip = |r: &[DiscoveredRoute]| -> Vec<DiscoveredRoute> {
        r.iter()
            .map(|r| DiscoveredRoute {
                index: 0,
                ..r.clone()
            })
            .collect()
    };
    let mut last: Option<Vec<DiscoveredRoute>> = None;
    let failed = |failures, e: &str| {
        let wait = failure_backoff(&sink, failures);
        tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "Consul catalog watch failed; keeping the routes it had");
        wait
    };
    loop {
        let answer = w
            .next(
                &"the catalog",
                |i| catalog_routes(&http, &settings, i),
                failed,
            )
            .await;
        let Some(routes) = answer else { continue };
        let now = strip(&routes);
        if last.as_ref() == Some(&now) {
            continue;
        }
        if routes.is_empty() && last.as_ref().is_some_and(|l| !l.is_empty()) {
            tracing::error!(
                "GUARD: the Consul catalog has no route tags any more; keeping the routes it had"
            );
            sink.metrics.consul_guarded.fetch_add(1, Relaxed);
            continue;
        }
        last = Some(now);
        let received = Instant::now();
        if sink
            .tx
            .send(Change::Routes { routes, received })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Watch `tls.consul_kv_prefix` until the task is aborted: pair what it holds, check every
/// pair (the key belongs to the certificate), and send a change when the checked set moves.
/// A pair that fails its check is said once per change; the version read before it keeps
/// serving. A prefix that empties at once is the guard's case, as for the catalog: the
/// certificates it had keep serving until one is there again.
pub(super) async fn watch_certs(settings: ConsulSettings, prefix: String, sink: Sink) {
    let http = match client(&settings) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return;
        }
    };
    let mut w = Blocking::new(1, Some((WATCH_RATE, WATCH_BURST)));
    let mut last: Option<BTreeMap<String, crate::discovery::KvCert>> = None;
    let mut said: Vec<String> = Vec::new();
    let failed = |failures, e: &str| {
        let wait = failure_backoff(&sink, failures);
        tracing::warn!(prefix = %prefix, error = %e, retry_in_ms = wait.as_millis() as u64, "Consul KV certificate watch failed; keeping the certificates it had");
        wait
    };
    loop {
        let what = format!("KV {prefix}/");
        let answer = w
            .next(
                &what,
                |i| crate::consul::kv_entries(&http, &settings, &prefix, i),
                failed,
            )
            .await;
        let Some(entries) = answer else { continue };
        let (pairs, mut problems) = crate::discovery::pair_kv_certs(&entries);
        let mut certs = BTreeMap::new();
        for (k, pair) in pairs {
            let source = std::path::PathBuf::from(format!("consul:{prefix}/{k}"));
            let name = source.display().to_string();
            let key_name = format!(
                "consul:{prefix}/{}",
                crate::discovery::kv_key_of(&k).unwrap_or_else(|| k.clone())
            );
            match crate::tls::pair_from_pem(
                pair.cert.as_bytes(),
                pair.key.as_bytes(),
                &source,
                &name,
                &key_name,
            ) {
                Ok((_, info)) => {
                    // an expired or not-yet-valid certificate is never served from KV
                    match info.valid_at(crate::clock::unix_secs() as i64) {
                        Ok(()) => {
                            certs.insert(k, pair);
                        }
                        Err(e) => problems.push(format!("{name}: {e}")),
                    }
                }
                Err(e) => {
                    let before = last.as_ref().and_then(|l| l.get(&k));
                    problems.push(format!(
                        "{e}{}",
                        if before.is_some() {
                            "; the version read before keeps serving"
                        } else {
                            ""
                        }
                    ));
                    if let Some(b) = before {
                        certs.insert(k, b.clone());
                    }
                }
            }
        }
        // a certificate whose entry is still there but no longer pairs (its value replaced
        // by something that is not PEM text, its key's entry gone bad): the version read
        // before keeps serving, as for a pair that fails its check
        if let Some(l) = &last {
            for (k, before) in l {
                let still_there = entries.iter().any(|(e, _)| e == k);
                if still_there && !certs.contains_key(k) {
                    problems.push(format!(
                        "{k}: unusable now; the version read before keeps serving"
                    ));
                    certs.insert(k.clone(), before.clone());
                }
            }
        }
        if problems != said {
            for p in &problems {
                tracing::error!(prefix = %prefix, "certificate in Consul KV not used: {p}");
            }
            said = problems;
        }
        if last.as_ref() == Some(&certs) {
            continue;
        }
        if certs.is_empty() && last.as_ref().is_some_and(|l| !l.is_empty()) {
            tracing::error!(prefix = %prefix, "GUARD: the KV prefix holds no usable certificate any more; keeping the ones it had");
            sink.metrics.consul_guarded.fetch_add(1, Relaxed);
            continue;
        }
        last = Some(certs.clone());
        let received = Instant::now();
        if sink
            .tx
            .send(Change::Certs { certs, received })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The fallback beyond `max_blocking` services: two blocking watches in all, on
/// `/v1/health/state/any` (any check changes) and `/v1/catalog/services` (any registration
/// or tag change). When checks change, the services they name are read again (16 at a
/// time); when the catalog moves, a node's own check changes or a watch failed, every
/// watched service is, since the answers cannot say which changed. Services watched in
/// another datacenter are read on every change (the change watches see the default one).
pub(super) async fn watch_all(settings: ConsulSettings, keys: Vec<ServiceKey>, sink: Sink) {
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
    let mut last: BTreeMap<ServiceKey, Option<(Vec<BackendSpec>, bool)>> =
        keys.iter().map(|k| (k.clone(), None)).collect();
    let mut failures: BTreeMap<ServiceKey, u32> = BTreeMap::new();
    // Where both change watches stand now, taken before the first full read: a change after
    // this point moves an index and causes another read, so none is missed; and the first
    // blocking queries wait instead of answering at once and causing two redundant reads.
    let (health, catalog) = tokio::join!(
        blocking_get(&http, &settings, "/v1/health/state/any", 0),
        block_on(&http, &settings, "/v1/catalog/services", 0),
    );
    let mut checks: Option<Checks> = None;
    let health_index = match health {
        Ok((index, body)) => {
            checks = parse_checks(&body).ok();
            index
        }
        Err(_) => 1,
    };
    let mut health = Blocking::new(health_index, None);
    let mut catalog = Blocking::new(catalog.unwrap_or(1), None);
    let mut bucket = TokenBucket::new(10.0, 20.0, Instant::now());
    let limit = Arc::new(tokio::sync::Semaphore::new(16));
    // which services to read: all (None), or those named
    let mut read: Option<Option<std::collections::BTreeSet<String>>> = Some(None);
    let default_dc = settings.datacenter.clone();
    loop {
        if let Some(named) = read.take() {
            pace(&mut bucket).await;
            let wanted = |k: &ServiceKey| match &named {
                None => true,
                Some(names) => {
                    names.contains(&k.service)
                        || failures.contains_key(k)
                        || (k.datacenter.is_some() && k.datacenter != default_dc)
                }
            };
            let mut reads = tokio::task::JoinSet::new();
            for k in keys.iter().filter(|k| wanted(k)) {
                sink.metrics.consul_fallback_reads.fetch_add(1, Relaxed);
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
                        if on_answer(&http, &settings, &k, index, backends, slot, &sink)
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        let f = failures.entry(k.clone()).or_default();
                        *f += 1;
                        on_error(&sink, &k, *f, &e);
                    }
                }
            }
        }
        // then wait for the next change anywhere; a blocking query that ran out its `wait`
        // answers with the index it was given: nothing changed, nothing to read
        if !failures.is_empty() {
            read = Some(Some(Default::default()));
        }
        let (h, c) = (health.index, catalog.index);
        let all = Some(None);
        tokio::select! {
            r = change_watch(&http, &settings, "/v1/health/state/any", &mut health) => match r {
                Some((i, _)) if i == h => {}
                Some((_, body)) => {
                    let now = parse_checks(&body).ok();
                    let named = match (&checks, &now) {
                        (Some(before), Some(now)) => changed_services(before, now),
                        _ => None,
                    };
                    checks = now;
                    read = match (read.take(), named) {
                        (Some(Some(mut a)), Some(b)) => { a.extend(b); Some(Some(a)) }
                        (None, Some(b)) => Some(Some(b)),
                        _ => all,
                    };
                }
                // a failed change watch may have missed a change: read everything
                None => { checks = None; read = all; }
            },
            r = change_watch(&http, &settings, "/v1/catalog/services", &mut catalog) => match r {
                Some((i, _)) if i == c => {}
                _ => read = all,
            },
        }
    }
}

/// The next answer of one change watch of the fallback mode (its index and body), or `None`
/// when it failed (after backing off).
async fn change_watch(
    http: &reqwest::Client,
    settings: &ConsulSettings,
    path: &'static str,
    w: &mut Blocking,
) -> Option<(u64, bytes::Bytes)> {
    let failed = |failures, e: &str| {
        tracing::warn!(watch = path, error = %e, "Consul change watch failed");
        backoff(
            failures,
            Duration::from_millis(500),
            Duration::from_secs(30),
            fastrand::f64(),
        )
    };
    let query = |i| async move {
        blocking_get(http, settings, path, i)
            .await
            .map(|(n, body)| (n, (n, body)))
    };
    w.next(&path, query, failed).await
}
