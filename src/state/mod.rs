//! The Snapshot and its publication. Owns: building an immutable `Snapshot` (routes, pools,
//! certificates) from a validated `Config`, publishing it through `ArcSwap`, and reloading
//! (SIGHUP or a changed config/certificate file). A bad change is rejected whole and the
//! previous Snapshot keeps serving. Must not touch request handling; what outlives a
//! Snapshot (backend health and cursors, metric counters, the plugin host) is `Lasting`,
//! handed in and kept beside it.

pub mod headers;
mod merge;
mod policy;
pub mod watch;

use crate::config::cidr::Cidr;
use crate::config::{AdminToken, Config, ConfigErrors, HeaderRules, RouteOptions, ServiceKey};
use crate::discovery::View;
use crate::metrics::{Metrics, RouteMetrics};
use crate::routing::{RouteEntry, RouteTable, VhostEntry};
use crate::tls::CertStore;
use crate::upstream::{Pool, Registry};
use crate::wasm::{Host, Plugin};
use arc_swap::ArcSwap;
pub(crate) use merge::{merge_routes, Merged, MergedVhost};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Everything a request needs to be routed, immutable once published.
#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub config: Arc<Config>,
    pub routes: RouteTable,
    /// Indexed by the route targets in `routes`.
    pub pools: Vec<Arc<Pool>>,
    pub certs: CertStore,
    pub built_at_unix: u64,
    /// One record per route, indexed by the route table's targets (`Lookup::Route::target`).
    pub records: Vec<Route>,
    /// Per vhost: requests no route matched.
    pub vhost_metrics: Vec<Arc<RouteMetrics>>,
    /// Requests no vhost matched.
    pub unknown_metrics: Arc<RouteMetrics>,
    /// The admin bearer token in force (a token file is read at every build).
    pub admin_token: Option<String>,
    /// Every vhost, in the order of `routes`, with where each route came from.
    pub vhosts: Vec<VhostInfo>,
    /// Consul-declared routes that were not applied, and why.
    pub route_conflicts: Vec<String>,
    /// The loaded proxy-wasm plugins, by name.
    pub plugins: BTreeMap<String, Arc<Plugin>>,
    /// Every pool (HTTP callouts may name any of them; a request's go to these, not to the
    /// live Snapshot's).
    pub callout_pools: crate::wasm::CalloutPools,
    /// The service ports: the file's, then those Consul services declare.
    pub ports: Vec<Port>,
}

/// A service port as served: what was declared, and the pools it resolved to.
#[derive(Debug)]
pub struct Port {
    pub spec: crate::config::PortSpec,
    /// An index into `Snapshot::pools` (for `sni`: where unlisted names go).
    pub pool: Option<usize>,
    /// `sni` routes: (names, pool index, the PROXY header their backends get).
    pub sni: Vec<(Vec<String>, usize, crate::config::SendProxy)>,
    pub metrics: Arc<crate::metrics::PortMetrics>,
}

impl Port {
    /// The pool for a ClientHello's server name (`None`: no SNI), and the PROXY header its
    /// backends get; `None`: refused.
    pub fn pool_for_sni(&self, name: Option<&str>) -> Option<(usize, crate::config::SendProxy)> {
        let hit = name.and_then(|n| {
            let n = n.trim_end_matches('.').to_ascii_lowercase();
            let covers = |pat: &String| match pat.strip_prefix("*.") {
                Some(suffix) => n
                    .strip_suffix(suffix)
                    .and_then(|head| head.strip_suffix('.'))
                    .is_some_and(|label| !label.is_empty() && !label.contains('.')),
                None => *pat == n,
            };
            // an exact name wins over a wildcard
            self.sni
                .iter()
                .find(|(names, _, _)| names.iter().any(|p| !p.starts_with("*.") && covers(p)))
                .or_else(|| {
                    self.sni
                        .iter()
                        .find(|(names, _, _)| names.iter().any(covers))
                })
                .map(|(_, pool, proxy)| (*pool, *proxy))
        });
        hit.or(self.pool.map(|p| (p, self.spec.send_proxy)))
    }
}

/// One route as served: everything the request path needs once the route table has found
/// it, in one place: what was declared (prefix, pool name, body cap, source) and what it
/// resolved to (the pool, the plugin chain, the metrics handle).
#[derive(Debug)]
pub struct Route {
    /// Its vhost (an index into `Snapshot::vhosts` and the route table's vhosts).
    pub vhost: usize,
    pub declared: RouteInfo,
    /// Its pool, an index into `Snapshot::pools` (`None`: it answers itself, with a
    /// redirect or a `respond`).
    pub pool: Option<usize>,
    /// The plugin chain: the vhost's plugins, then the route's.
    pub plugins: crate::wasm::Plugins,
    /// The names plugins read as properties (`route_name`, `vhost`, `cluster_name`).
    pub names: Arc<crate::wasm::RouteNames>,
    pub metrics: Arc<RouteMetrics>,
    /// The client networks the route's `allow` / `deny` option names, parsed.
    pub access: Option<Access>,
    /// The vhost's header rules, then the route's, ready.
    pub request_ops: headers::HeaderOps,
    pub response_ops: headers::HeaderOps,
}

/// Who may use a route, by client address.
#[derive(Debug)]
pub enum Access {
    Allow(Vec<Cidr>),
    Deny(Vec<Cidr>),
}

impl Access {
    fn of(o: &RouteOptions) -> Option<Access> {
        // validated when the tag was read
        let nets = |v: &[String]| v.iter().filter_map(|n| n.parse().ok()).collect();
        match (o.allow.is_empty(), o.deny.is_empty()) {
            (false, _) => Some(Access::Allow(nets(&o.allow))),
            (true, false) => Some(Access::Deny(nets(&o.deny))),
            (true, true) => None,
        }
    }

    /// May a client at `ip` (unknown: no) use the route?
    pub fn admits(&self, ip: Option<std::net::IpAddr>) -> bool {
        match (self, ip) {
            (Access::Allow(nets), Some(ip)) => crate::config::cidr::any_contains(nets, ip),
            (Access::Deny(nets), Some(ip)) => !crate::config::cidr::any_contains(nets, ip),
            (_, None) => false,
        }
    }
}

/// A vhost as served: from the file, or created for a route a Consul service declared.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VhostInfo {
    pub label: String,
    pub names: Vec<String>,
    pub default: bool,
    pub redirect_https: bool,
    pub source: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<String>,
    /// HSTS and the `Server` header, as the answers carry them.
    #[serde(skip_serializing_if = "VhostAnswers::is_empty")]
    pub answers: VhostAnswers,
}

/// What a vhost adds to or removes from every answer, ready to insert (`config::VhostHeaders`
/// turned into header values once per configuration, not per request).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VhostAnswers {
    /// `Strict-Transport-Security`, for answers over HTTPS.
    #[serde(
        rename = "strict_transport_security",
        skip_serializing_if = "Option::is_none",
        serialize_with = "header_text"
    )]
    pub hsts: Option<http::HeaderValue>,
    /// `None`: pass the upstream's `Server`; `Some(None)`: drop it; `Some(Some(v))`: send `v`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "server_text"
    )]
    pub server: Option<Option<http::HeaderValue>>,
    /// The vhost's header rules (its routes' follow them).
    #[serde(skip_serializing_if = "HeaderRules::is_empty")]
    pub request_headers: HeaderRules,
    #[serde(skip_serializing_if = "HeaderRules::is_empty")]
    pub response_headers: HeaderRules,
    /// `response_headers` ready, for answers no route made (404 under the vhost).
    #[serde(skip)]
    pub response: headers::HeaderOps,
    /// Pages for tollgate's own 4xx/5xx answers, by status.
    #[serde(skip_serializing_if = "no_pages", serialize_with = "pages")]
    pub error_pages: Arc<BTreeMap<u16, crate::config::Page>>,
}

impl VhostAnswers {
    pub fn of(h: &crate::config::VhostHeaders) -> VhostAnswers {
        use crate::config::ServerHeader;
        VhostAnswers {
            // validated: digits and fixed words, printable ASCII
            hsts: h
                .hsts
                .as_ref()
                .and_then(|h| http::HeaderValue::from_str(&h.value()).ok()),
            server: match &h.server {
                ServerHeader::Pass => None,
                ServerHeader::Drop => Some(None),
                ServerHeader::Replace(v) => Some(http::HeaderValue::from_str(v).ok()),
            },
            ..VhostAnswers::default()
        }
    }

    /// With a file vhost's header rules and error pages.
    pub fn with_file(mut self, v: &crate::config::Vhost) -> VhostAnswers {
        self.request_headers = v.request_headers.clone();
        self.response_headers = v.response_headers.clone();
        self.response = headers::HeaderOps::of(&[&v.response_headers]);
        self.error_pages = Arc::new(v.error_pages.clone());
        self
    }

    pub fn is_empty(&self) -> bool {
        self.hsts.is_none()
            && self.server.is_none()
            && self.request_headers.is_empty()
            && self.response_headers.is_empty()
            && self.error_pages.is_empty()
    }
}

fn no_pages(p: &Arc<BTreeMap<u16, crate::config::Page>>) -> bool {
    p.is_empty()
}

fn pages<S: serde::Serializer>(
    p: &Arc<BTreeMap<u16, crate::config::Page>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(p.as_ref(), s)
}

fn header_text<S: serde::Serializer>(
    v: &Option<http::HeaderValue>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""))
}

fn server_text<S: serde::Serializer>(
    v: &Option<Option<http::HeaderValue>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(Some(v)) => s.serialize_str(&format!("replace: {}", v.to_str().unwrap_or(""))),
        _ => s.serialize_str("drop"),
    }
}

/// A route as declared (in the file or by a Consul service), by names.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RouteInfo {
    pub path: String,
    /// Empty for a route that answers itself (a redirect).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub pool: String,
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_size: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<String>,
    /// For a route a Consul service declared: what let it claim the host and path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_by: Option<String>,
    /// What it does besides choosing its pool (path rewrites, Host, redirect, allow/deny).
    #[serde(skip_serializing_if = "RouteOptions::is_empty")]
    pub options: RouteOptions,
    /// Its own header rules (after its vhost's).
    #[serde(skip_serializing_if = "HeaderRules::is_empty")]
    pub request_headers: HeaderRules,
    #[serde(skip_serializing_if = "HeaderRules::is_empty")]
    pub response_headers: HeaderRules,
    /// What it answers with instead of proxying (`respond`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub respond: Option<crate::config::Page>,
    /// What a request must also have (`match`).
    #[serde(
        rename = "match",
        skip_serializing_if = "crate::config::RouteMatch::is_empty"
    )]
    pub matches: crate::config::RouteMatch,
}

/// A route's `match` as the route table tests it (`None`: the path alone decides).
fn matchers_of(m: &crate::config::RouteMatch) -> Option<Arc<crate::routing::Matchers>> {
    use crate::routing::{Matchers, Test};
    if m.is_empty() {
        return None;
    }
    // validated: methods, names and regexes parse
    let test = |r: &crate::config::MatchRule| match (&r.equals, &r.regex) {
        (Some(v), _) => Some(Test::Equals(v.clone())),
        (None, Some(re)) => crate::config::match_regex(re).ok().map(Test::Regex),
        (None, None) => Some(Test::Present),
    };
    Some(Arc::new(Matchers {
        methods: m
            .methods
            .iter()
            .filter_map(|x| http::Method::from_bytes(x.as_bytes()).ok())
            .collect(),
        headers: m
            .headers
            .iter()
            .filter_map(|r| {
                Some((
                    http::HeaderName::from_bytes(r.name.as_bytes()).ok()?,
                    test(r)?,
                ))
            })
            .collect(),
        query: m
            .query
            .iter()
            .filter_map(|r| Some((r.name.clone(), test(r)?)))
            .collect(),
    }))
}

impl Snapshot {
    /// What is valid but unsafe (the configuration's, and private keys other users of the
    /// host can read), for `check` to print and the server to log at start and each reload.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = self.config.warnings();
        w.extend(crate::tls::exposed_keys(&self.config));
        w
    }

    /// The routes of vhost `vhost`, in the order they were declared.
    pub fn routes_of(&self, vhost: usize) -> impl Iterator<Item = &RouteInfo> {
        self.records
            .iter()
            .filter(move |r| r.vhost == vhost)
            .map(|r| &r.declared)
    }

    /// The metrics handle for a request that reached `vhost` and the route whose record is
    /// `record` (either may be unknown).
    pub fn request_metrics(&self, vhost: Option<usize>, record: Option<usize>) -> &RouteMetrics {
        match (vhost, record) {
            (_, Some(r)) => &self.records[r].metrics,
            (Some(v), None) => &self.vhost_metrics[v],
            _ => &self.unknown_metrics,
        }
    }
}

fn read_token(token: &Option<AdminToken>) -> Result<Option<String>, ConfigErrors> {
    match token {
        None => Ok(None),
        Some(AdminToken::Inline(t)) => Ok(Some(t.clone())),
        Some(AdminToken::File { path, origin }) => crate::config::secret::read(path, 16)
            .map(Some)
            .map_err(|m| ConfigErrors::single(origin.clone(), "admin.token_file", m)),
    }
}

/// What outlives every Snapshot and each build draws on: the state of backends (health,
/// cursors), the metric counters and the plugin host. Made once, by `server` or a test, and
/// handed in.
#[derive(Clone)]
pub struct Lasting {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub plugins: &'static Host,
}

impl Lasting {
    /// Fresh ones, with a plugin host of their own.
    pub fn new() -> Lasting {
        Lasting {
            registry: Arc::default(),
            metrics: Arc::default(),
            plugins: Host::new(),
        }
    }
}

impl Default for Lasting {
    fn default() -> Self {
        Lasting::new()
    }
}

impl Snapshot {
    /// Build a Snapshot; certificates are loaded here, so a missing or bad one fails the build.
    pub fn build(
        config: Arc<Config>,
        lasting: &Lasting,
        generation: u64,
        view: &View,
    ) -> Result<Snapshot, ConfigErrors> {
        let Gathered {
            certs,
            admin_token,
            plugins,
        } = gather(&config, view, lasting.plugins)?;
        let (registry, m) = (&lasting.registry, &lasting.metrics);
        let Merged {
            vhosts,
            pool_specs,
            route_conflicts,
            ports: port_specs,
        } = merge_routes(&config, view, |host| certs.covers(host));
        let mut pools = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut tls_errors = Vec::new();
        // the CA and client certificate of Consul-declared TLS pools: read even when no
        // pool uses them yet, so `check` and a reload report a bad file at once
        let consul_tls = config.consul.backend_tls.as_ref().and_then(|t| {
            crate::tls::backend::load_backend(t)
                .map_err(|e| {
                    tls_errors.push(crate::config::ConfigError {
                        origin: t.origin.clone(),
                        option: "consul.backend_tls".into(),
                        message: e,
                    })
                })
                .ok()
                .map(Arc::new)
        });
        for (name, spec) in &pool_specs {
            index.insert(name, pools.len());
            let mut pool = match &spec.consul {
                // Consul pools take the backends of the last successful answer (none yet:
                // empty), from the datacenter that serves the pool now
                Some(key) => {
                    let mut spec = spec.clone();
                    if spec.nearest > 0 {
                        spec.failover = view
                            .datacenters
                            .iter()
                            .filter(|dc| key.datacenter.as_ref() != Some(*dc))
                            .take(spec.nearest)
                            .cloned()
                            .collect();
                    }
                    // the datacenter serving this pool's own group of watches (a pool
                    // without failover datacenters is always served by its own)
                    let serving = (!spec.failover.is_empty())
                        .then(|| view.serving.get(&spec.consul_keys()))
                        .flatten();
                    let from = serving.map(|s| &s.key).unwrap_or(key);
                    spec.backends = view.backends(from).map(<[_]>::to_vec).unwrap_or_default();
                    spec.serving = serving.map(|s| {
                        let dc = s.key.datacenter.clone().unwrap_or_default();
                        (dc, s.reason.clone())
                    });
                    registry.pool(name, &spec, m)
                }
                None => registry.pool(name, spec, m),
            };
            if let Some(t) = &spec.tls {
                if spec.consul.is_some() && Some(t) == config.consul.backend_tls.as_ref() {
                    // read once per build, below, for every pool it serves
                    pool.tls = consul_tls.clone();
                    pools.push(Arc::new(pool));
                    continue;
                }
                match crate::tls::backend::load_backend(t) {
                    Ok(material) => pool.tls = Some(Arc::new(material)),
                    Err(e) => tls_errors.push(crate::config::ConfigError {
                        origin: t.origin.clone(),
                        option: format!("pool.{name}.tls"),
                        message: e,
                    }),
                }
            }
            pools.push(Arc::new(pool));
        }
        if !tls_errors.is_empty() {
            return Err(ConfigErrors(tls_errors));
        }
        // One record per route, found by the index the route table gives for it.
        let mut records = Vec::new();
        let mut routes = RouteTable::default();
        let mut served = Vec::with_capacity(vhosts.len());
        for (
            vi,
            MergedVhost {
                info: v,
                routes: declared,
                ..
            },
        ) in vhosts.into_iter().enumerate()
        {
            let mut entries = Vec::with_capacity(declared.len());
            for r in declared {
                entries.push(RouteEntry {
                    prefix: r.path.clone(),
                    matchers: matchers_of(&r.matches),
                    target: records.len(),
                });
                // the chain: the vhost's plugins, then the route's own (each once)
                let chain: crate::wasm::Plugins = v
                    .plugins
                    .iter()
                    .chain(r.plugins.iter().filter(|n| !v.plugins.contains(n)))
                    .filter_map(|n| plugins.get(n).cloned())
                    .collect();
                records.push(Route {
                    names: Arc::new(crate::wasm::RouteNames {
                        route_name: format!("{}{}", v.label, r.path),
                        vhost: v.label.clone(),
                        pool: r.pool.clone(),
                    }),
                    vhost: vi,
                    // validation (and the merge above) guarantee a named pool exists
                    pool: index.get(r.pool.as_str()).copied(),
                    plugins: chain,
                    metrics: m.route(&v.label, &r.path),
                    access: Access::of(&r.options),
                    request_ops: headers::HeaderOps::of(&[
                        &v.answers.request_headers,
                        &r.request_headers,
                    ]),
                    response_ops: headers::HeaderOps::of(&[
                        &v.answers.response_headers,
                        &r.response_headers,
                    ]),
                    declared: r,
                });
            }
            routes.add(
                &v.names,
                v.default,
                VhostEntry::new(&v.label, v.redirect_https, entries),
            );
            served.push(v);
        }
        let pool_at = |name: &String| index.get(name.as_str()).copied();
        let ports = port_specs
            .iter()
            .map(|spec| Port {
                pool: spec.pool.as_ref().and_then(pool_at),
                sni: spec
                    .sni
                    .iter()
                    .filter_map(|r| Some((r.names.clone(), pool_at(&r.pool)?, r.send_proxy)))
                    .collect(),
                metrics: m.port(&spec.name),
                spec: spec.clone(),
            })
            .collect();
        let callout_pools = Arc::new(pools.clone());
        let vhost_metrics = routes
            .vhosts()
            .iter()
            .map(|v| m.route(&v.label, "-"))
            .collect();
        Ok(Snapshot {
            generation,
            config,
            routes,
            pools,
            certs,
            records,
            vhost_metrics,
            unknown_metrics: m.route("-", "-"),
            admin_token,
            built_at_unix: crate::clock::unix_secs(),
            vhosts: served,
            route_conflicts,
            plugins,
            callout_pools,
            ports,
        })
    }
}

/// What a Snapshot build reads besides the config: certificates (files, and Consul KV's from
/// the view), the admin token (a token
/// file is read at every build) and the plugins (compiled, or reused when unchanged).
struct Gathered {
    certs: CertStore,
    admin_token: Option<String>,
    plugins: BTreeMap<String, Arc<Plugin>>,
}

/// Read what the config names; every problem at once, in line order.
fn gather(config: &Config, view: &View, host: &'static Host) -> Result<Gathered, ConfigErrors> {
    // Consul KV's certificates, only while `tls.consul_kv_prefix` is set
    let kv: Vec<_> = match &config.consul.cert_prefix {
        Some(prefix) => view
            .certs
            .iter()
            .map(|(k, c)| {
                let source = std::path::PathBuf::from(format!("consul:{prefix}/{k}"));
                (source, c.cert.as_str(), c.key.as_str())
            })
            .collect(),
        None => Vec::new(),
    };
    let certs = CertStore::load(config, &kv);
    let admin_token = read_token(&config.admin.token);
    let plugins = host.load(&config.plugins, config.server.threads);
    match (certs, admin_token, plugins) {
        (Ok(certs), Ok(admin_token), Ok(plugins)) => Ok(Gathered {
            certs,
            admin_token,
            plugins,
        }),
        (c, t, p) => {
            let mut all: Vec<_> = [c.err(), t.err(), p.err()]
                .into_iter()
                .flatten()
                .flat_map(|e| e.0)
                .collect();
            all.sort_by_key(|e| e.origin.line);
            Err(ConfigErrors(all))
        }
    }
}

/// The live Snapshot plus what survives rebuilds.
pub struct State {
    current: Arc<ArcSwap<Snapshot>>,
    pub lasting: Lasting,
    /// The watched files' stamps when the first configuration was built: the reload watcher
    /// starts from these, so a change made before it runs is not taken as seen.
    pub first_seen: Fingerprint,
    generation: AtomicU64,
    reload_lock: Mutex<()>,
    pub started: std::time::Instant,
    pub started_unix: u64,
    last_reload: Mutex<Option<ReloadOutcome>>,
    view: ArcSwap<View>,
}

/// What the last reload attempt did (for `/status`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadOutcome {
    pub at_unix: u64,
    pub ok: bool,
    pub generation: u64,
    pub errors: Vec<String>,
}

impl State {
    /// Build the first Snapshot from `config`, drawing on `lasting`.
    pub fn new(config: Config, lasting: Lasting) -> Result<State, ConfigErrors> {
        let first_seen = fingerprint(&config);
        let snap = Snapshot::build(Arc::new(config), &lasting, 1, &View::default())?;
        Ok(State {
            current: Arc::new(ArcSwap::from_pointee(snap)),
            lasting,
            first_seen,
            generation: AtomicU64::new(1),
            reload_lock: Mutex::new(()),
            started: std::time::Instant::now(),
            started_unix: crate::clock::unix_secs(),
            last_reload: Mutex::new(None),
            view: ArcSwap::from_pointee(View::default()),
        })
    }

    /// The handle request paths and the SNI resolver read.
    pub fn handle(&self) -> Arc<ArcSwap<Snapshot>> {
        self.current.clone()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Re-read the config file, rebuild and publish. On any problem nothing changes and the
    /// problems are returned. Requests already running keep the Snapshot they started with.
    pub fn reload(&self) -> Result<u64, ConfigErrors> {
        let _serial = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.rebuild();
        let m = &self.lasting.metrics;
        let outcome = match &result {
            Ok(generation) => {
                m.reloads_ok.fetch_add(1, Ordering::Relaxed);
                m.last_reload_success_unix
                    .store(crate::clock::unix_secs(), Ordering::Relaxed);
                ReloadOutcome {
                    at_unix: crate::clock::unix_secs(),
                    ok: true,
                    generation: *generation,
                    errors: Vec::new(),
                }
            }
            Err(e) => {
                m.reloads_failed.fetch_add(1, Ordering::Relaxed);
                ReloadOutcome {
                    at_unix: crate::clock::unix_secs(),
                    ok: false,
                    generation: self.generation.load(Ordering::SeqCst),
                    errors: e.0.iter().map(|e| e.to_string()).collect(),
                }
            }
        };
        *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        result
    }

    /// The discovery view in force.
    pub fn view(&self) -> Arc<View> {
        self.view.load_full()
    }

    /// Rebuild with the same configuration and a new discovery view (a Consul change).
    pub fn apply_view(&self, view: View) -> Result<u64, ConfigErrors> {
        let _serial = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.snapshot();
        let generation = self.generation.load(Ordering::SeqCst) + 1;
        let snap = Snapshot::build(old.config.clone(), &self.lasting, generation, &view)?;
        self.lasting
            .registry
            .retain(snap.pools.iter().map(|p| p.as_ref()));
        self.view.store(Arc::new(view));
        self.generation.store(generation, Ordering::SeqCst);
        self.current.store(Arc::new(snap));
        Ok(generation)
    }

    pub fn last_reload(&self) -> Option<ReloadOutcome> {
        self.last_reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn rebuild(&self) -> Result<u64, ConfigErrors> {
        let old = self.snapshot();
        let config = Config::load(&old.config.source)?;
        if config.listeners != old.config.listeners {
            tracing::warn!(
                "listener changes take effect only after a restart; the old listeners keep running"
            );
        }
        let generation = self.generation.load(Ordering::SeqCst) + 1;
        let snap = Snapshot::build(Arc::new(config), &self.lasting, generation, &self.view())?;
        self.lasting
            .registry
            .retain(snap.pools.iter().map(|p| p.as_ref()));
        self.generation.store(generation, Ordering::SeqCst);
        self.current.store(Arc::new(snap));
        Ok(generation)
    }
}

/// The files whose change triggers a reload, with what we last saw of each
/// (modification time and length; `None` when missing).
pub fn watched_files(cfg: &Config) -> Vec<PathBuf> {
    let mut files = vec![cfg.source.clone()];
    // a rebuilt plugin is picked up like a changed certificate
    files.extend(cfg.plugins.values().map(|p| p.file.clone()));
    // a renewed client certificate or CA bundle of a TLS pool, likewise
    let tls = cfg.pools.values().filter_map(|p| p.tls.as_ref());
    for t in tls.chain(cfg.consul.backend_tls.as_ref()) {
        files.extend(t.ca.clone());
        if let Some((c, k)) = &t.client_cert {
            files.push(c.clone());
            files.push(k.clone());
        }
    }
    for v in &cfg.vhosts {
        if let Some(c) = &v.cert {
            files.push(c.cert.clone());
            files.push(c.key.clone());
        }
    }
    for dir in cfg
        .certs_dir
        .iter()
        .cloned()
        .chain(cfg.acme.as_ref().map(|a| a.certs_dir()))
    {
        let dir = &dir;
        files.push(dir.clone());
        if let Ok(rd) = std::fs::read_dir(dir) {
            let mut inner: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            inner.sort();
            files.extend(inner);
        }
    }
    files
}

pub type Fingerprint = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

pub fn fingerprint(cfg: &Config) -> Fingerprint {
    watched_files(cfg)
        .into_iter()
        .map(|p| {
            let m = crate::config::stamp(&p);
            (p, m)
        })
        .collect()
}

impl crate::discovery::consul::Live for State {
    fn wanted(&self) -> (crate::config::ConsulSettings, Vec<ServiceKey>) {
        let snap = self.snapshot();
        // pools of the live Snapshot: the file's and those created for tag-declared routes
        // (with a watch per failover datacenter)
        let mut keys: Vec<ServiceKey> = snap
            .pools
            .iter()
            .flat_map(|p| p.spec.consul_keys())
            .collect();
        keys.sort();
        keys.dedup();
        (snap.config.consul.clone(), keys)
    }

    fn nearest_wanted(&self) -> bool {
        self.snapshot().pools.iter().any(|p| p.spec.nearest > 0)
    }

    fn failover_groups(&self) -> Vec<Vec<ServiceKey>> {
        let snap = self.snapshot();
        let mut groups: Vec<Vec<ServiceKey>> = snap
            .pools
            .iter()
            .filter(|p| !p.spec.failover.is_empty())
            .map(|p| p.spec.consul_keys())
            .collect();
        groups.sort();
        groups.dedup();
        groups
    }

    fn view(&self) -> Arc<View> {
        State::view(self)
    }

    fn apply_view(&self, view: View) -> Result<u64, ConfigErrors> {
        State::apply_view(self, view)
    }

    fn route_conflicts(&self) -> Vec<String> {
        self.snapshot().route_conflicts.clone()
    }

    fn state_file(&self) -> Option<PathBuf> {
        self.snapshot().config.consul.state_file.clone()
    }
}

#[cfg(test)]
mod tests;
