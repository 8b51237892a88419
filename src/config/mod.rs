//! Configuration: the external TOML schema (`raw`), its validation into the internal model
//! below, and errors that name file:line and the option. This module owns parsing and
//! validation only: it reads the config file and nothing else (certificates are read by
//! `tls`, sockets are opened by `proxy`), so `check` and reload share one pure path.

pub mod cidr;
pub mod defaults;
mod error;
mod raw;
pub mod route_options;
pub mod secret;
mod validate;

pub use error::{ConfigError, ConfigErrors, Origin};
pub use validate::{addresses_overlap, check_host_name};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The validated configuration. Every field has been checked; defaults are filled in.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from (reload re-reads it).
    pub source: PathBuf,
    pub server: ServerSettings,
    pub log: LogSettings,
    pub listeners: Vec<Listener>,
    /// Directory scanned for `*.crt`/`*.pem` certificates with a matching `.key`.
    pub certs_dir: Option<PathBuf>,
    /// Where `tls.certs_dir` is written (for errors about the directory and its files).
    pub certs_dir_origin: Origin,
    /// `tls.session_tickets`: TLS listeners and `tls` service ports issue stateless session
    /// tickets (keys per process, rotated), so a returning client resumes whatever the
    /// number of clients in between. Read at start.
    pub session_tickets: bool,
    /// `tls.session_ticket_keys`: key files a fleet shares (the first seals, all open);
    /// empty: keys of the process's own.
    pub session_ticket_keys: Vec<PathBuf>,
    /// How long a ticket sealed with those keys opens (`tls.session_ticket_lifetime`), and
    /// the period of the fleet's keys in Consul.
    pub session_ticket_lifetime: Duration,
    /// `tls.session_ticket_consul`: ticket keys kept and rotated in Consul KV: the prefix,
    /// and the file with the secret they are sealed with there (`tls.encryption_key_file`,
    /// else `[acme]`'s).
    pub session_ticket_consul: Option<(String, PathBuf)>,
    /// `tls.post_quantum`: offer the hybrid key exchange X25519MLKEM768 (first, to clients
    /// that send it). Read at start.
    pub post_quantum: bool,
    pub admin: AdminSettings,
    pub consul: ConsulSettings,
    /// `[[consul.allow]]`: who may claim which host and path through Consul tags.
    pub consul_allow: Vec<ClaimRule>,
    pub failover: Option<FailoverSettings>,
    pub limits: Limits,
    pub vhosts: Vec<Vhost>,
    pub pools: BTreeMap<String, PoolSpec>,
    /// `[plugin.NAME]`, by name.
    pub plugins: BTreeMap<String, PluginSpec>,
    /// `[[port]]`: service ports.
    pub ports: Vec<PortSpec>,
    /// `[acme]`: certificates issued for `acme = true` vhosts and for vhost names no
    /// other certificate covers.
    pub acme: Option<AcmeSettings>,
}

/// Where ACME certificates come from and where they are kept.
#[derive(Debug, Clone, PartialEq)]
pub struct AcmeSettings {
    /// The CA's directory URL (https).
    pub directory: String,
    /// The account's contact (`mailto:`); none: an account without contact.
    pub email: Option<String>,
    /// The account (`account.json`) and the issued certificates (`certs/`).
    pub storage: PathBuf,
    /// Roots for the CA's own HTTPS (a private or test CA); none: the system roots.
    pub ca_bundle: Option<PathBuf>,
    /// Shared through Consul KV (`consul = true`): the KV prefix, and the file holding the
    /// secret the account, certificates and keys are encrypted with there.
    pub consul: Option<(String, PathBuf)>,
    /// How the CA checks that tollgate serves a name.
    pub challenge: AcmeChallenge,
    pub origin: Origin,
}

/// The ACME challenge tollgate answers (RFC 8555 §8.3, RFC 8737).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AcmeChallenge {
    /// A token over plain HTTP on port 80 (`/.well-known/acme-challenge/`).
    #[default]
    Http01,
    /// A self-signed certificate in a TLS handshake on port 443 that negotiates
    /// `acme-tls/1`: for fleets with no plain listener.
    TlsAlpn01,
}

impl AcmeChallenge {
    pub fn name(self) -> &'static str {
        match self {
            AcmeChallenge::Http01 => "http-01",
            AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

impl AcmeSettings {
    /// Where issued certificates are written (and read from, like `tls.certs_dir`).
    pub fn certs_dir(&self) -> PathBuf {
        self.storage.join("certs")
    }
}

/// What a service port carries.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// TCP, copied both ways.
    Tcp,
    /// UDP datagrams, one flow per client address.
    Udp,
    /// TLS terminated with tollgate's certificates, the plain stream forwarded over TCP.
    Tls,
    /// TLS passed through unopened, routed by the ClientHello's SNI.
    Sni,
}

impl PortProtocol {
    pub const NAMES: [(&'static str, PortProtocol); 4] = [
        ("tcp", PortProtocol::Tcp),
        ("udp", PortProtocol::Udp),
        ("tls", PortProtocol::Tls),
        ("sni", PortProtocol::Sni),
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, p)| *p == self)
            .map_or("tcp", |(n, _)| n)
    }
}

/// Which PROXY protocol header a port sends to its backends, so they see the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxy {
    #[default]
    None,
    V1,
    V2,
}

/// TLS passthrough of some server names to a pool (`[[port.sni]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SniRoute {
    /// Exact names, or `*.suffix` (one label).
    pub names: Vec<String>,
    pub pool: String,
    /// The PROXY header these connections' backends get (the port's `send_proxy` is for
    /// its `pool`).
    pub send_proxy: SendProxy,
}

/// A service port: a listen address, what it carries, and where it goes.
#[derive(Debug, Clone, PartialEq)]
pub struct PortSpec {
    /// Unique; labels metrics and `/status` (default: the protocol and the port number).
    pub name: String,
    pub address: SocketAddr,
    pub protocol: PortProtocol,
    /// The pool (for `sni`: where names no `sni` route lists go; `None`: refused).
    pub pool: Option<String>,
    /// `sni`: the names passed through to each pool.
    pub sni: Vec<SniRoute>,
    /// Connecting to a backend (default: the pool's `connect_timeout`).
    pub connect_timeout: Option<Duration>,
    /// A connection (or UDP flow) with no data either way this long is closed.
    pub idle_timeout: Duration,
    pub send_proxy: SendProxy,
    /// Clients arrive through balancers that send a PROXY header (`limits.trusted_proxies`).
    pub proxy_protocol: bool,
    /// UDP: flows (client addresses) at once; a new client beyond it is dropped.
    pub max_flows: usize,
    /// UDP: flows one client IP address may hold at once.
    pub max_flows_per_ip: usize,
    /// UDP: replies a backend may send after each client datagram (0: no limit); the
    /// rest are dropped, so a spoofed source cannot be flooded through tollgate.
    pub replies_per_datagram: u32,
    /// Where it came from: `file t.toml:12`, or the Consul tag that declared it.
    pub source: String,
}

/// A proxy-wasm plugin: the module, what it is given, and its sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginSpec {
    pub name: String,
    pub file: PathBuf,
    /// The plugin configuration (JSON), read by the plugin in proxy_on_configure.
    pub config: Vec<u8>,
    /// The VM configuration (JSON), read in proxy_on_vm_start.
    pub vm_config: Vec<u8>,
    /// Instances with the same vm_id share data and queues (default: the plugin's name).
    pub vm_id: String,
    /// Envoy's root_id: the `plugin_root_id` property, which some SDKs (AssemblyScript)
    /// use to pick the root context (default: empty, as in Envoy).
    pub root_id: String,
    pub on_error: OnError,
    /// The longest one callback may run.
    pub cpu_deadline: Duration,
    /// The most linear memory one instance may have.
    pub max_memory: u64,
    pub origin: Origin,
}

/// What a request gets when a plugin fails (trap, deadline, lost instance).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Answer 500 (the default: a failed auth plugin must not let requests through).
    FailClosed,
    /// Skip the plugin for this request.
    FailOpen,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub threads: usize,
    /// One work-stealing runtime for all threads (true) or one runtime per thread (false).
    pub work_stealing: bool,
    /// On SIGTERM: the longest in-flight requests may take to finish before exit.
    pub shutdown_timeout: Duration,
    pub watch_config: bool,
    pub watch_interval: Duration,
    pub upstream_keepalive_pool_size: usize,
    /// Port used in `Location` of HTTP→HTTPS redirects (omitted when 443).
    pub https_redirect_port: u16,
    pub forwarded_for: ForwardedFor,
    /// Written with the process id at start, removed at a clean exit (none: not written).
    pub pid_file: Option<PathBuf>,
    pub upgrade_sock: String,
}

/// What to do with a client's own `X-Forwarded-For`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedFor {
    /// Drop what the client sent and send only its socket address (safe at the edge).
    Replace,
    /// Append the socket address to what the client sent (behind a trusted balancer).
    Append,
}

/// The admin listener (API, dashboard, metrics). Separate from traffic listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    pub enabled: bool,
    pub address: SocketAddr,
    pub token: Option<AdminToken>,
}

/// How to reach Consul. Defaults follow Consul's own environment variables
/// (`CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`, `CONSUL_CACERT`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConsulSettings {
    /// `http://host:port` or `https://host:port`.
    pub address: String,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_cert: Option<PathBuf>,
    pub datacenter: Option<String>,
    /// Blocking-query wait (Consul caps it at 10m).
    pub wait: Duration,
    pub stale: bool,
    pub cached: bool,
    /// Quiet time after a change before rebuilding, and the longest a burst can delay it.
    pub quiescence_min: Duration,
    pub quiescence_max: Duration,
    /// Where the last applied view is kept, so a restart while Consul is down still serves.
    pub state_file: Option<PathBuf>,
    /// Above this many watched services, the per-service blocking queries give way to the
    /// fallback (two blocking queries in all); Consul allows 200 connections per client.
    pub max_blocking: usize,
    /// Create routes from service tags (`route_tag_prefix` + `host/path`).
    pub tag_routes: bool,
    pub route_tag_prefix: String,
    /// Also read Fabio's `urlprefix-host/path` tags.
    pub fabio_tags: bool,
    /// Service meta keys that declare routes (`tollgate-route`, `tollgate-route-2`, …);
    /// empty: meta is not read.
    pub route_meta_prefix: String,
    /// The shrink guard: an answer may not take a pool below this fraction of its backends.
    pub min_fraction: f64,
    /// How long a watch outlives the last pool that needs it (route flaps do not restart it).
    pub watch_grace: Duration,
    /// A pool served by a failover datacenter goes back to its own once that has had passing
    /// instances this long.
    pub failback_after: Duration,
    /// The port numbers services may declare service ports on (`ports`: ranges); empty:
    /// none (declared ports are reported, never opened).
    pub ports: Vec<(u16, u16)>,
    /// The address declared service ports listen on.
    pub port_address: std::net::IpAddr,
    /// The CA and client certificate of pools made for Consul-declared routes whose service
    /// asks for TLS (`None`: the system roots, no client certificate). Always verified,
    /// against the service's name.
    pub backend_tls: Option<BackendTls>,
    /// `tls.consul_kv_prefix`: the KV prefix certificates and keys are read from (watched
    /// with a blocking query), for operators who issue them elsewhere.
    pub cert_prefix: Option<String>,
}

/// A pool's backends from Consul: the passing instances of a service.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ServiceKey {
    pub service: String,
    pub tags: Vec<String>,
    pub datacenter: Option<String>,
    /// Only instances whose checks all pass (default); `false` also takes warning ones.
    pub passing: bool,
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.service)?;
        if !self.tags.is_empty() {
            write!(f, "[{}]", self.tags.join(","))?;
        }
        if let Some(dc) = &self.datacenter {
            write!(f, "@{dc}")?;
        }
        Ok(())
    }
}

/// The active/standby peer (`[failover]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverSettings {
    pub name: String,
    pub priority: u8,
    /// UDP address heartbeats are received on, and the peer's.
    pub listen: SocketAddr,
    pub peer: SocketAddr,
    pub secret: Vec<u8>,
    pub interval: Duration,
    pub dead_after: Duration,
    pub preempt: bool,
    pub claims: Vec<Claim>,
    /// Fencing: be MASTER only while holding this Consul lock (`[consul]` says where).
    pub consul_lock: Option<ConsulLock>,
}

/// `failover.consul_lock`: a Consul session (TTL, no lock delay) holding a KV key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsulLock {
    pub key: String,
    /// The session's TTL: how long a dead holder keeps the lock (Consul: 10s..24h).
    pub ttl: Duration,
}

/// One claim action, with how long each attempt may take and how often it is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub action: ClaimAction,
    pub timeout: Duration,
    pub retries: u32,
}

/// What to do on becoming MASTER (and on leaving it), in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimAction {
    /// Run a hook with the new state (keepalived-notify style).
    Exec { command: Vec<String> },
    /// A floating address on a local interface, announced by gratuitous ARP / unsolicited
    /// neighbour advertisement.
    Vip(Vip),
    /// An AWS elastic IP moved to this instance or ENI with EC2 `AssociateAddress`.
    AwsEip(AwsEip),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vip {
    pub address: std::net::IpAddr,
    pub prefix: u8,
    pub interface: String,
    /// Announcements per burst, and the delay before the second burst.
    pub garp_count: u32,
    pub garp_repeat: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsEip {
    pub allocation_id: String,
    /// When neither is set, the instance id comes from IMDSv2.
    pub instance_id: Option<String>,
    pub network_interface_id: Option<String>,
    pub region: String,
    /// The EC2 endpoint (`https://ec2.REGION.amazonaws.com` unless set).
    pub endpoint: String,
    /// The instance metadata service (IMDSv2).
    pub imds_endpoint: String,
}

impl ClaimAction {
    pub fn kind(&self) -> &'static str {
        match self {
            ClaimAction::Exec { .. } => "exec",
            ClaimAction::Vip(_) => "vip",
            ClaimAction::AwsEip(_) => "aws_eip",
        }
    }
}

/// Where the admin bearer token comes from. A file is re-read on every reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminToken {
    Inline(String),
    File { path: PathBuf, origin: Origin },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
    pub access_log: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub addresses: Vec<SocketAddr>,
    pub tls: bool,
    pub http2: bool,
    /// Connections start with a PROXY protocol v1/v2 header (from `limits.trusted_proxies`).
    pub proxy_protocol: bool,
}

/// `[limits]`: what one client, or all of them, may hold and send. Every value has a safe
/// default (docs/configuration.md); the `h2_*` values apply at start only, the rest on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// New connections per second per client IP (token bucket rate; 0 = off).
    pub connection_rate_per_ip: f64,
    pub connection_burst_per_ip: u32,
    /// Client networks the per-IP caps and rate do not apply to.
    pub allow: Vec<cidr::Cidr>,
    pub handshake_timeout: Duration,
    /// The whole request header must arrive within this.
    pub header_timeout: Duration,
    /// The longest wait for the next piece of a request body.
    pub body_idle_timeout: Duration,
    /// How long an idle keep-alive connection is kept.
    pub keepalive_timeout: Duration,
    /// The longest wait for a client to accept more of a response (nginx's `send_timeout`).
    pub send_timeout: Duration,
    /// `%2F` / `%5C` in request paths: refused (400) or kept encoded.
    pub encoded_slashes: crate::routing::path::EncodedSlashes,
    /// Bytes per second a request body must average once `min_body_rate_after` has passed
    /// (0 = off).
    pub min_body_rate: u64,
    pub min_body_rate_after: Duration,
    pub max_request_line: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// The default request body cap; a route's `max_body_size` overrides it. 0 = no cap.
    pub max_body_size: u64,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_header_list_size: u32,
    pub h2_max_pending_resets: usize,
    pub h2_max_error_resets: usize,
    /// Peers trusted to send PROXY headers and (with `x_forwarded_for`) X-Forwarded-For.
    pub trusted_proxies: Vec<cidr::Cidr>,
    pub x_forwarded_for: bool,
}

#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub origin: Origin,
}

#[derive(Debug, Clone)]
pub struct Vhost {
    /// Lower-case names: exact (`example.com`) or wildcard (`*.example.com`).
    pub names: Vec<String>,
    pub default: bool,
    pub cert: Option<CertFiles>,
    pub redirect_https: bool,
    /// Plugins every route of this vhost runs first, in order.
    pub plugins: Vec<String>,
    pub routes: Vec<Route>,
    /// Whether Consul-declared routes may be added under this vhost.
    pub consul_routes: ConsulRoutes,
    /// Its certificate is issued and renewed by ACME (`[acme]`).
    pub acme: bool,
    /// What its answers carry: HSTS, the `Server` header.
    pub headers: VhostHeaders,
    /// Header rules for every route's requests and answers (a route's own follow).
    pub request_headers: HeaderRules,
    pub response_headers: HeaderRules,
    /// Pages for tollgate's own 4xx/5xx answers under this vhost, by status (read when the
    /// configuration is, so a reload reads them again).
    pub error_pages: BTreeMap<u16, Page>,
    pub origin: Origin,
}

/// A fixed answer body: a route's `respond`, or an error page.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Page {
    pub status: u16,
    pub content_type: String,
    #[serde(skip)]
    pub body: bytes::Bytes,
    /// Where an error page was read from (`None`: written in the configuration).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

/// Header rules (`request_headers`, `response_headers`): names lower-case, values templates
/// whose `$client_ip`, `$request_id`, `$host` and `$scheme` are filled per request. Applied
/// in order: remove, then set (replacing any value), then add (beside any value).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct HeaderRules {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderRules {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// Why `bytes` (a session ticket key file's content) cannot be a key, if it cannot: 80 (or
/// 48) random bytes, as nginx and HAProxy take them.
pub fn ticket_key_problem(bytes: &[u8]) -> Option<String> {
    (!matches!(bytes.len(), 48 | 80)).then(|| {
        format!(
            "holds {} bytes: a ticket key file holds 80 (or 48) random bytes, e.g. `openssl rand 80 > ticket.key`",
            bytes.len()
        )
    })
}

/// The variables a header rule's value may hold.
pub const HEADER_VARIABLES: [&str; 4] = ["$client_ip", "$request_id", "$host", "$scheme"];

/// What a vhost does to the headers of every answer (the upstream's and tollgate's own).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VhostHeaders {
    /// `Strict-Transport-Security`, on answers over HTTPS only (never over plain HTTP, where
    /// browsers ignore it and a man in the middle could strip or forge it).
    pub hsts: Option<Hsts>,
    pub server: ServerHeader,
}

/// A vhost's HSTS policy (RFC 6797).
#[derive(Debug, Clone, PartialEq)]
pub struct Hsts {
    pub max_age: Duration,
    pub include_subdomains: bool,
    pub preload: bool,
}

impl Hsts {
    /// The header's value: `max-age=31536000; includeSubDomains; preload`.
    pub fn value(&self) -> String {
        let mut v = format!("max-age={}", self.max_age.as_secs());
        if self.include_subdomains {
            v.push_str("; includeSubDomains");
        }
        if self.preload {
            v.push_str("; preload");
        }
        v
    }
}

/// What happens to the upstream's `Server` header (`server_header`).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum ServerHeader {
    /// Passed to the client as the upstream sent it (the default).
    #[default]
    Pass,
    /// Removed: the client learns nothing of the upstream's software.
    Drop,
    /// Replaced by this value, on the upstream's answers and tollgate's own.
    Replace(String),
}

/// What a route does besides choosing its pool: the options of Fabio's `urlprefix-` tags.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(default)]
pub struct RouteOptions {
    /// Forward the path without this prefix (`/cart/x` → `/x`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strip: Option<String>,
    /// Then forward it under this prefix (`/x` → `/v2/x`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prepend: Option<String>,
    /// The Host sent upstream: a name, or `dst` for the backend's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Answer with this status and Location instead of proxying (`$path` in it is the
    /// request's path and query, `$host` its host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<(u16, String)>,
    /// Only these client networks may use the route (Fabio's `allow=`)...
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// ...or these may not (`deny=`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// How to reach the service's instances (Fabio's `proto=`, or the service's
    /// `tollgate-protocol` meta); `None`: HTTP/1.1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Not an HTTP route but a service port the tag declares (`tollgate.port=tcp/3306`,
    /// Fabio's `urlprefix-:3306 proto=tcp`): its protocol and port number; for `sni`, the
    /// route's host is the server name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<(PortProtocol, u16)>,
}

impl RouteOptions {
    pub fn is_empty(&self) -> bool {
        *self == RouteOptions::default()
    }
}

/// Whether a file vhost takes routes Consul services declare (`consul_routes`).
#[derive(Debug, Clone, PartialEq)]
pub enum ConsulRoutes {
    /// The default: the file's routes only.
    Refused,
    /// From any service the `[[consul.allow]]` rules (if any) allow.
    Any,
    /// Only from services whose names match one of these patterns (`*` matches any run).
    Services(Vec<String>),
}

/// One `[[consul.allow]]` rule: services matching `services` (and carrying one of `tags`,
/// when given) may claim hosts matching `hosts` at paths under `paths`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimRule {
    /// Lower-case: `*` (any host, and routes without a host), `*.example.com` (any depth of
    /// subdomain), or an exact name.
    pub hosts: Vec<String>,
    /// Path prefixes, matched at segment boundaries (`/` allows every path).
    pub paths: Vec<String>,
    /// Service-name patterns (`*` matches any run of characters).
    pub services: Vec<String>,
    /// The service must carry one of these tags (none: no condition).
    pub tags: Vec<String>,
    pub origin: Origin,
}

impl Vhost {
    /// A name for logs and metrics: the first name, or `default`.
    pub fn label(&self) -> &str {
        self.names.first().map(String::as_str).unwrap_or("default")
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    pub path: String,
    /// Empty for a route that answers itself (`options.redirect`).
    pub pool: String,
    /// Overrides `limits.max_body_size` for this route (0 = no cap).
    pub max_body_size: Option<u64>,
    /// Plugins this route runs after its vhost's.
    pub plugins: Vec<String>,
    /// Path rewrites, the Host sent upstream, a redirect, who may use it: the options Consul
    /// tags give a route, by the same names and meaning.
    pub options: RouteOptions,
    /// Header rules applied after the vhost's.
    pub request_headers: HeaderRules,
    pub response_headers: HeaderRules,
    /// Answer with this instead of proxying (`respond`).
    pub respond: Option<Page>,
    /// What a request must also have for this route to take it (`match`).
    pub matches: RouteMatch,
    pub origin: Origin,
}

/// A route's matchers besides its path: one of `methods` (if any), and every header and
/// query rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RouteMatch {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<MatchRule>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<MatchRule>,
}

impl RouteMatch {
    pub fn is_empty(&self) -> bool {
        self.methods.is_empty() && self.headers.is_empty() && self.query.is_empty()
    }
}

/// One header or query condition: `equals` a value, matches a `regex`, or (neither) present.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MatchRule {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub equals: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A matcher's regex, compiled with a size cap (a configuration cannot make a huge program;
/// Rust's regex runs in linear time, so no input makes it slow).
pub fn match_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(pattern)
        .size_limit(1 << 16)
        .build()
        .map_err(|e| format!("`{pattern}` is not a regex tollgate takes: {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    PowerOfTwo,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackendSpec {
    pub address: SocketAddr,
    pub weight: u32,
}

/// How tollgate speaks to a pool's backends (`protocol`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 in the clear.
    #[default]
    Http1,
    /// HTTP/1.1 over TLS.
    Https,
    /// HTTP/2 over TLS (ALPN `h2`).
    H2,
    /// HTTP/2 in the clear, with prior knowledge.
    H2c,
}

impl Protocol {
    pub const NAMES: [(&'static str, Protocol); 4] = [
        ("http1", Protocol::Http1),
        ("https", Protocol::Https),
        ("h2", Protocol::H2),
        ("h2c", Protocol::H2c),
    ];

    pub fn parse(s: &str) -> Option<Protocol> {
        Self::NAMES.iter().find(|(n, _)| *n == s).map(|(_, p)| *p)
    }

    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, p)| *p == self)
            .map_or("http1", |(n, _)| n)
    }

    /// Whether connections to the backends are TLS.
    pub fn tls(self) -> bool {
        matches!(self, Protocol::Https | Protocol::H2)
    }

    /// Whether requests travel as HTTP/2 streams.
    pub fn h2(self) -> bool {
        matches!(self, Protocol::H2 | Protocol::H2c)
    }
}

/// TLS to a pool's backends (`tls`, for `https` and `h2` pools).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTls {
    /// PEM bundle of the CAs that sign the backends' certificates (`None`: the system roots).
    pub ca: Option<PathBuf>,
    /// SNI and the name the certificate must carry (`None`: the Consul service's name, or
    /// the backend's IP address for a static pool).
    pub server_name: Option<String>,
    /// A client certificate and key for mTLS (PEM), reloaded when the files change.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// `false`: any certificate is accepted (`check` warns).
    pub verify: bool,
    /// Where the pool's `tls` is declared (errors about its files point here).
    pub origin: Origin,
}

/// What an active health check asks a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// An HTTP GET of this path; the status must be in the pool's range.
    Http(String),
    /// A TCP connect.
    Tcp,
    /// The gRPC health-checking protocol (`grpc.health.v1.Health/Check`) for this service
    /// name (empty: the server as a whole); the answer must be SERVING.
    Grpc(String),
}

/// Active health checks of a pool's backends (`health_check`): an HTTP GET of `path` on each
/// backend every `interval`, a TCP connect, or a gRPC health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveCheck {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Passing probes in a row that put a failing backend back.
    pub healthy: u32,
    /// Failing probes in a row that take a backend out.
    pub unhealthy: u32,
    /// The statuses that pass (inclusive).
    pub status: (u16, u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Consecutive failures that eject a backend.
    pub max_fails: u32,
    /// First ejection; doubles on each ejection in a row, up to `eject_max_time`.
    pub eject_time: Duration,
    pub eject_max_time: Duration,
}

#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// Static backends; for a Consul pool, filled from the discovery view at build time.
    pub backends: Vec<BackendSpec>,
    /// `Some` when the backends come from Consul.
    pub consul: Option<ServiceKey>,
    /// Datacenters that serve, in order, when the pool's own has no passing instance.
    pub failover: Vec<String>,
    /// Instead of a list: the failover datacenters are this many of the nearest (Consul's
    /// order by network round-trip time), filled in from the discovery view (0: off).
    pub nearest: usize,
    /// For a Consul pool: the datacenter serving now and why (`None`: its own).
    pub serving: Option<(String, String)>,
    pub balance: Balance,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    /// Extra attempts on another backend after a connect failure (idempotent requests).
    pub retries: u32,
    pub health: HealthPolicy,
    /// Active health checks (off: `None`).
    pub check: Option<ActiveCheck>,
    /// How tollgate speaks to the backends.
    pub protocol: Protocol,
    /// TLS settings (`Some` exactly when `protocol.tls()`).
    pub tls: Option<BackendTls>,
    /// HTTP/2: streams one upstream connection carries at most.
    pub max_streams: u32,
    /// Connections (HTTP/2: connections' worth of streams) in use to one backend at most;
    /// a backend at its cap is skipped, as if busy (0: no cap).
    pub max_connections: u32,
}

impl PoolSpec {
    /// The watches a Consul pool needs: its own service key, then one per failover
    /// datacenter, in order (empty for a static pool).
    pub fn consul_keys(&self) -> Vec<ServiceKey> {
        let Some(k) = &self.consul else {
            return Vec::new();
        };
        let mut keys = vec![k.clone()];
        keys.extend(self.failover.iter().map(|dc| ServiceKey {
            datacenter: Some(dc.clone()),
            ..k.clone()
        }));
        keys
    }

    /// Speak `protocol` to the backends; a TLS protocol verifies them against the Consul
    /// service's name and `tls`' CA (`consul.backend_tls`), else the system roots. What a
    /// Consul-declared protocol gets: only the file can turn verification off.
    pub fn set_protocol(&mut self, protocol: Protocol, tls: Option<&BackendTls>) {
        self.protocol = protocol;
        self.tls = protocol.tls().then(|| {
            tls.cloned().unwrap_or_else(|| BackendTls {
                ca: None,
                server_name: None,
                client_cert: None,
                verify: true,
                origin: Origin {
                    file: Arc::from("consul"),
                    line: 0,
                },
            })
        });
    }

    /// A pool with every default, whose backends are the passing instances of `key`.
    pub fn for_consul(key: ServiceKey) -> PoolSpec {
        use defaults::pool::*;
        PoolSpec {
            backends: Vec::new(),
            consul: Some(key),
            failover: Vec::new(),
            nearest: 0,
            serving: None,
            balance: Balance::RoundRobin,
            connect_timeout: CONNECT_TIMEOUT,
            read_timeout: READ_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            retries: RETRIES,
            check: None,
            protocol: Protocol::Http1,
            tls: None,
            max_streams: MAX_STREAMS,
            max_connections: 0,
            health: HealthPolicy {
                max_fails: MAX_FAILS,
                eject_time: EJECT_TIME,
                eject_max_time: EJECT_MAX_TIME,
            },
        }
    }
}

impl Config {
    /// Read and validate `path`. Every problem found is returned, not just the first.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let file: Arc<str> = Arc::from(path.display().to_string());
        let bytes = std::fs::read(path).map_err(|e| {
            ConfigErrors::single(
                Origin {
                    file: file.clone(),
                    line: 0,
                },
                "--config",
                format!("cannot read the configuration file: {e}"),
            )
        })?;
        let src = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let good = String::from_utf8_lossy(&e.as_bytes()[..at]).into_owned();
            let bad = e.as_bytes()[at];
            ConfigErrors::single(
                Origin::at(&file, &good, at),
                "--config",
                format!("byte 0x{bad:02x} is not UTF-8: save the file as UTF-8"),
            )
        })?;
        Self::parse(path, &src)
    }

    /// Validate `src` as if read from `path` (relative paths resolve against its directory).
    /// Whether ACME may be asked to prove `name`: ACME is configured and a vhost of the file
    /// (not a Consul tag) names it and has no certificate of its own. The challenge answers
    /// are served for these names only, whatever the shared state holds.
    pub fn acme_may_order(&self, name: &str) -> bool {
        self.acme.is_some()
            && self.vhosts.iter().any(|v| {
                (v.acme || v.cert.is_none()) && v.names.iter().any(|n| n.eq_ignore_ascii_case(name))
            })
    }

    pub fn parse(path: &Path, src: &str) -> Result<Config, ConfigErrors> {
        validate::parse(path, src)
    }

    /// What is valid but unsafe, for `check` to print and the server to log at start and
    /// at each reload.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.listeners.is_empty() && self.ports.is_empty() {
            out.push(
                "no [[listener]] and no [[port]]: nothing listens until Consul services declare \
                 ports (consul.ports); until then tollgate serves only its admin API"
                    .to_string(),
            );
        }
        for (name, p) in &self.pools {
            if p.tls.as_ref().is_some_and(|t| !t.verify) {
                out.push(format!(
                    "pool.{name}.tls.verify = false: any certificate is accepted, so anyone \
                     who can intercept the connection reads and changes this pool's traffic"
                ));
            }
        }
        out
    }

    /// Whether any listener (or service port) terminates TLS.
    pub fn has_tls(&self) -> bool {
        self.listeners.iter().any(|l| l.tls)
            || self.ports.iter().any(|p| p.protocol == PortProtocol::Tls)
    }
}

/// Parse a duration written with a unit: `250ms`, `2s`, `5m`, `1h`.
/// A byte size: digits with an optional k, m or g suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mul) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| {
            format!("`{s}` is not a size: use bytes or a number with k, m or g (e.g. \"10m\")")
        })
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "`{s}` is not a duration: write a number and a unit, e.g. 500ms, 2s, 1m"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is too large for a duration"))?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        "" => {
            return Err(format!(
                "`{s}` has no unit: write e.g. {s}ms or {s}s (units: ms, s, m, h, d)"
            ))
        }
        other => {
            return Err(format!(
                "`{other}` is not a duration unit in `{s}`: use ms, s, m, h or d"
            ))
        }
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("`{s}` is too large for a duration"))
}

/// What a file change is judged by: its modification time and length (`None`: missing).
pub fn stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert_eq!(
            parse_duration("2d").unwrap(),
            Duration::from_secs(2 * 86400)
        );
        assert!(parse_duration("10w")
            .unwrap_err()
            .contains("not a duration unit"));
        assert!(parse_duration("s").unwrap_err().contains("not a duration"));
        assert!(parse_duration("99999999999999999999h").is_err());
    }
}
