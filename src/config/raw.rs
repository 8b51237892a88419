//! The external TOML schema, exactly as written by the operator. Nothing here is trusted:
//! `validate` turns it into the internal model. Values that can be wrong keep their span so
//! a problem can name its line.

use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

type S<T> = Spanned<T>;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: RawServer,
    pub log: RawLog,
    pub tls: RawTls,
    pub admin: RawAdmin,
    pub consul: RawConsul,
    pub failover: Option<S<RawFailover>>,
    pub limits: RawLimits,
    #[serde(rename = "listener")]
    pub listeners: Vec<S<RawListener>>,
    #[serde(rename = "vhost")]
    pub vhosts: Vec<S<RawVhost>>,
    #[serde(rename = "pool")]
    pub pools: BTreeMap<String, S<RawPool>>,
    #[serde(rename = "plugin")]
    pub plugins: BTreeMap<String, S<RawPlugin>>,
    #[serde(rename = "port")]
    pub ports: Vec<S<RawPort>>,
    pub acme: Option<S<RawAcme>>,
}

/// `[acme]`: where certificates for `acme = true` vhosts come from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAcme {
    pub directory: S<String>,
    pub email: Option<S<String>>,
    pub storage: Option<S<String>>,
    pub ca_bundle: Option<S<String>>,
    pub challenge: Option<S<String>>,
    pub consul: Option<bool>,
    pub consul_prefix: Option<S<String>>,
    pub encryption_key_file: Option<S<String>>,
}

/// `[[port]]`: a service port (TCP, UDP, TLS-terminated TCP, or TLS passthrough by SNI).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPort {
    pub name: Option<S<String>>,
    pub address: S<String>,
    pub protocol: Option<S<String>>,
    pub pool: Option<S<String>>,
    pub connect_timeout: Option<S<String>>,
    pub idle_timeout: Option<S<String>>,
    pub send_proxy: Option<S<String>>,
    pub proxy_protocol: Option<bool>,
    pub max_flows: Option<S<i64>>,
    pub max_flows_per_ip: Option<S<i64>>,
    pub replies_per_datagram: Option<S<i64>>,
    #[serde(default)]
    pub sni: Vec<S<RawSniRoute>>,
}

/// `[[port.sni]]`: TLS passthrough of the names listed to a pool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSniRoute {
    pub names: Vec<S<String>>,
    pub pool: S<String>,
    pub send_proxy: Option<S<String>>,
}

/// `[plugin.NAME]`: a proxy-wasm module and its configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
    pub file: S<String>,
    /// Given to the plugin as JSON (proxy_on_configure).
    pub config: Option<toml::Value>,
    /// Given to the plugin as JSON (proxy_on_vm_start).
    pub vm_config: Option<toml::Value>,
    pub vm_id: Option<String>,
    pub root_id: Option<String>,
    pub on_error: Option<S<String>>,
    pub cpu_deadline: Option<S<String>>,
    pub max_memory: Option<S<RawSize>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub threads: Option<S<i64>>,
    pub work_stealing: Option<bool>,
    pub shutdown_timeout: Option<S<String>>,
    pub watch_config: Option<bool>,
    pub watch_interval: Option<S<String>>,
    pub upstream_keepalive_pool_size: Option<S<i64>>,
    pub https_redirect_port: Option<S<i64>>,
    pub forwarded_for: Option<S<String>>,
    pub pid_file: Option<String>,
    pub upgrade_sock: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_connections: Option<S<i64>>,
    pub max_connections_per_ip: Option<S<i64>>,
    pub connection_rate_per_ip: Option<S<f64>>,
    pub connection_burst_per_ip: Option<S<i64>>,
    pub allow: Vec<S<String>>,
    pub handshake_timeout: Option<S<String>>,
    pub header_timeout: Option<S<String>>,
    pub body_idle_timeout: Option<S<String>>,
    pub keepalive_timeout: Option<S<String>>,
    pub send_timeout: Option<S<String>>,
    pub encoded_slashes: Option<S<String>>,
    pub min_body_rate: Option<S<i64>>,
    pub min_body_rate_after: Option<S<String>>,
    pub max_request_line: Option<S<i64>>,
    pub max_header_bytes: Option<S<i64>>,
    pub max_headers: Option<S<i64>>,
    pub max_body_size: Option<S<RawSize>>,
    pub h2_max_concurrent_streams: Option<S<i64>>,
    pub h2_max_header_list_size: Option<S<i64>>,
    pub h2_max_pending_resets: Option<S<i64>>,
    pub h2_max_error_resets: Option<S<i64>>,
    pub trusted_proxies: Vec<S<String>>,
    pub x_forwarded_for: Option<bool>,
}

/// A byte size: a number of bytes, or a string like "10m" / "64k".
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub format: Option<S<String>>,
    pub level: Option<S<String>>,
    pub access_log: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawTls {
    pub certs_dir: Option<S<String>>,
    pub consul_kv_prefix: Option<S<String>>,
    pub session_tickets: Option<bool>,
    pub post_quantum: Option<bool>,
    #[serde(default)]
    pub session_ticket_keys: Vec<S<String>>,
    pub session_ticket_lifetime: Option<S<String>>,
    pub session_ticket_consul: Option<S<bool>>,
    pub session_ticket_consul_prefix: Option<S<String>>,
    pub encryption_key_file: Option<S<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub enabled: Option<bool>,
    pub address: Option<S<String>>,
    pub token: Option<S<String>>,
    pub token_file: Option<S<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawConsul {
    pub address: Option<S<String>>,
    pub token: Option<S<String>>,
    pub token_file: Option<S<String>>,
    pub ca_cert: Option<S<String>>,
    pub datacenter: Option<S<String>>,
    pub wait: Option<S<String>>,
    pub stale: Option<bool>,
    pub cached: Option<bool>,
    pub quiescence_min: Option<S<String>>,
    pub quiescence_max: Option<S<String>>,
    pub state_file: Option<String>,
    pub max_blocking: Option<S<i64>>,
    pub tag_routes: Option<bool>,
    pub route_tag_prefix: Option<String>,
    pub fabio_tags: Option<bool>,
    pub route_meta_prefix: Option<String>,
    pub min_fraction: Option<S<f64>>,
    pub watch_grace: Option<S<String>>,
    pub failback_after: Option<S<String>>,
    pub backend_tls: Option<S<RawBackendTls>>,
    #[serde(default)]
    pub ports: Vec<S<String>>,
    pub port_address: Option<S<String>>,
    #[serde(default)]
    pub allow: Vec<S<RawAllow>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAllow {
    #[serde(default)]
    pub hosts: Vec<S<String>>,
    pub paths: Option<Vec<S<String>>>,
    #[serde(default)]
    pub services: Vec<S<String>>,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// `consul_routes = true` or `consul_routes = ["web-*", "shop"]`.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "true, false, or a list of service name patterns such as [\"web-*\"]"
)]
pub enum RawConsulRoutes {
    On(bool),
    Services(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFailover {
    pub name: S<String>,
    pub priority: Option<S<i64>>,
    pub listen: S<String>,
    pub peer: S<String>,
    pub secret: Option<S<String>>,
    pub secret_file: Option<S<String>>,
    pub interval: Option<S<String>>,
    pub dead_after: Option<S<String>>,
    pub preempt: Option<bool>,
    #[serde(default)]
    pub claim: Vec<S<RawClaim>>,
    pub consul_lock: Option<S<bool>>,
    pub consul_lock_key: Option<S<String>>,
    pub consul_lock_ttl: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClaim {
    #[serde(rename = "type")]
    pub kind: S<String>,
    #[serde(default)]
    pub command: Vec<String>,
    pub timeout: Option<S<String>>,
    pub retries: Option<S<i64>>,
    // vip
    pub address: Option<S<String>>,
    pub interface: Option<S<String>>,
    pub garp_count: Option<S<i64>>,
    pub garp_repeat: Option<S<String>>,
    // aws_eip
    pub allocation_id: Option<S<String>>,
    pub instance_id: Option<S<String>>,
    pub network_interface_id: Option<S<String>>,
    pub region: Option<S<String>>,
    pub endpoint: Option<S<String>>,
    pub imds_endpoint: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsulPool {
    pub service: S<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub datacenter: Option<String>,
    pub passing: Option<bool>,
    #[serde(default)]
    pub failover: Vec<S<String>>,
    pub nearest: Option<S<i64>>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub address: S<OneOrMany>,
    #[serde(default)]
    pub tls: bool,
    /// Offer HTTP/2 by ALPN on TLS listeners (default true).
    pub http2: Option<bool>,
    /// Every connection starts with a PROXY protocol v1 or v2 header.
    #[serde(default)]
    pub proxy_protocol: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVhost {
    #[serde(default)]
    pub names: Vec<S<String>>,
    #[serde(default)]
    pub default: bool,
    pub cert: Option<S<String>>,
    pub key: Option<S<String>>,
    pub redirect_https: Option<bool>,
    pub acme: Option<S<bool>>,
    #[serde(default)]
    pub plugins: Vec<S<String>>,
    #[serde(default)]
    pub route: Vec<S<RawRoute>>,
    pub consul_routes: Option<S<RawConsulRoutes>>,
    pub hsts: Option<S<RawHsts>>,
    pub server_header: Option<S<RawServerHeader>>,
    pub request_headers: Option<S<RawHeaderRules>>,
    pub response_headers: Option<S<RawHeaderRules>>,
    /// `{ "404" = "errors/404.html", "503" = "errors/down.html" }`
    pub error_pages: Option<S<BTreeMap<String, String>>>,
}

/// `request_headers` / `response_headers`: `{ set = { "X-Env" = "prod" }, add = { … },
/// remove = ["X-Powered-By"] }`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderRules {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `hsts = true`, or `hsts = { max_age = "365d", include_subdomains = true, preload = true }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawHsts {
    On(bool),
    Table(RawHstsTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHstsTable {
    pub max_age: Option<String>,
    #[serde(default)]
    pub include_subdomains: bool,
    #[serde(default)]
    pub preload: bool,
}

/// `server_header = "pass" | "drop"`, or `server_header = { replace = "edge" }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawServerHeader {
    Word(String),
    Replace { replace: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub path: S<String>,
    /// None only for a route that answers itself (`redirect`).
    pub pool: Option<S<String>>,
    pub max_body_size: Option<S<RawSize>>,
    #[serde(default)]
    pub plugins: Vec<S<String>>,
    // the options Consul tags give a route, by the same names
    pub strip: Option<S<String>>,
    pub prepend: Option<S<String>>,
    pub host: Option<S<String>>,
    pub redirect: Option<S<RawRedirect>>,
    pub allow: Option<S<Vec<String>>>,
    pub deny: Option<S<Vec<String>>>,
    pub request_headers: Option<S<RawHeaderRules>>,
    pub response_headers: Option<S<RawHeaderRules>>,
    pub respond: Option<S<RawRespond>>,
    /// `match = { methods = ["POST"], headers = [{ name = "x-canary", equals = "1" }] }`
    #[serde(rename = "match")]
    pub matches: Option<S<RawRouteMatch>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteMatch {
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: Vec<RawMatchRule>,
    #[serde(default)]
    pub query: Vec<RawMatchRule>,
}

/// `{ name = "x-canary", equals = "1" }`, `{ name = "…", regex = "^v[0-9]+$" }`, or
/// `{ name = "…", present = true }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatchRule {
    pub name: String,
    pub equals: Option<String>,
    pub regex: Option<String>,
    pub present: Option<bool>,
}

/// `respond = { status = 503, body = "down for maintenance", content_type = "text/plain" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRespond {
    #[serde(default = "ok_status")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    pub content_type: Option<String>,
}

fn ok_status() -> u16 {
    200
}

/// `redirect = { to = "https://example.com$path", status = 301 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedirect {
    pub to: String,
    #[serde(default = "moved_permanently")]
    pub status: u16,
}

fn moved_permanently() -> u16 {
    301
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    #[serde(default)]
    pub backends: Vec<S<RawBackend>>,
    pub consul: Option<S<RawConsulPool>>,
    pub balance: Option<S<String>>,
    pub connect_timeout: Option<S<String>>,
    pub read_timeout: Option<S<String>>,
    pub write_timeout: Option<S<String>>,
    pub idle_timeout: Option<S<String>>,
    pub retries: Option<S<i64>>,
    pub max_fails: Option<S<i64>>,
    pub eject_time: Option<S<String>>,
    pub eject_max_time: Option<S<String>>,
    pub health_check: Option<S<RawHealthCheck>>,
    pub protocol: Option<S<String>>,
    pub tls: Option<S<RawBackendTls>>,
    pub max_streams: Option<S<i64>>,
    pub max_connections: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackendTls {
    pub ca: Option<S<String>>,
    pub server_name: Option<S<String>>,
    pub client_cert: Option<S<String>>,
    pub client_key: Option<S<String>>,
    pub verify: Option<S<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub path: Option<S<String>>,
    pub tcp: Option<bool>,
    pub grpc: Option<S<RawGrpcCheck>>,
    pub interval: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub healthy: Option<S<i64>>,
    pub unhealthy: Option<S<i64>>,
    pub status: Option<S<String>>,
}

/// `grpc = true` (the server as a whole) or `grpc = "service.Name"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawGrpcCheck {
    Whole(bool),
    Service(String),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawBackend {
    Address(String),
    Full(RawBackendFull),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackendFull {
    pub address: String,
    pub weight: Option<i64>,
}
