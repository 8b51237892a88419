//! Metrics without locks on the request path: counters and histograms are plain atomics,
//! and the handles a request needs are looked up once, when a Snapshot is built, from the
//! one `Metrics` registry (made by `server`), keyed by stable names (so they survive reloads). Rendering to the
//! Prometheus text format happens only when `/metrics` is scraped.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of histogram buckets, in seconds.
pub const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, n) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
    }
}

/// Requests of one route (or of one vhost with no matching route, or of no vhost).
#[derive(Debug, Default)]
pub struct RouteMetrics {
    /// By status class: 1xx … 5xx; index 0 counts requests that got no response.
    by_class: [AtomicU64; 6],
    pub duration: Histogram,
}

impl RouteMetrics {
    pub fn record(&self, status: u16, d: Duration) {
        let class = (status / 100) as usize;
        self.by_class[if (1..=5).contains(&class) { class } else { 0 }].fetch_add(1, Relaxed);
        self.duration.observe(d);
    }
}

#[derive(Debug, Default)]
pub struct PoolMetrics {
    pub connect: Histogram,
    /// From choosing the backend to its response header.
    pub response: Histogram,
    pub retries: AtomicU64,
    pub connect_failures: AtomicU64,
}

/// One service port's counters.
#[derive(Debug, Default)]
pub struct PortMetrics {
    /// TCP connections (or UDP flows) open now.
    pub open: AtomicU64,
    /// TCP connections accepted (or UDP flows started).
    pub total: AtomicU64,
    /// Bytes from clients to backends, and back.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Connects to a backend that failed (each retry counts).
    pub connect_failures: AtomicU64,
    /// Connections or datagrams turned away: no backend, over a cap, an unknown SNI name.
    pub refused: AtomicU64,
}

/// The metric counters of one tollgate: made once by `server` (or a test) and handed to
/// what counts and what shows them; they outlive every Snapshot.
#[derive(Debug, Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<(String, String), Arc<RouteMetrics>>>,
    pools: Mutex<BTreeMap<String, Arc<PoolMetrics>>>,
    ports: Mutex<BTreeMap<String, Arc<PortMetrics>>>,
    pub reloads_ok: AtomicU64,
    pub consul_errors: AtomicU64,
    /// Answers the guard refused to apply (a pool would have emptied).
    pub consul_guarded: AtomicU64,
    /// Services read in the fallback mode (beyond `consul.max_blocking`).
    pub consul_fallback_reads: AtomicU64,
    /// From a Consul answer to the Snapshot that uses it being live.
    pub convergence: Histogram,
    pub reloads_failed: AtomicU64,
    pub last_reload_success_unix: AtomicU64,
    /// The ACME issuer's looks at what needs a certificate (one per 2 s cycle in which it
    /// is the issuer): how an operator, or a test, sees that it is at work.
    pub acme_checks: AtomicU64,
    /// TLS handshakes per listener address: (full, resumed).
    handshakes: Mutex<BTreeMap<String, Arc<Handshakes>>>,
}

/// One TLS listener's handshakes.
#[derive(Debug, Default)]
pub struct Handshakes {
    pub full: AtomicU64,
    pub resumed: AtomicU64,
    /// By key exchange group: [`KEY_EXCHANGES`] in order, then any other.
    pub key_exchange: [AtomicU64; KEY_EXCHANGES.len() + 1],
}

/// The key exchange groups counted by name (rustls' names); others count as `other`.
pub const KEY_EXCHANGES: [&str; 4] = ["X25519MLKEM768", "X25519", "secp256r1", "secp384r1"];

impl Handshakes {
    /// Count one handshake's key exchange group (`None`: TLS 1.2 resumption has none).
    pub fn key_exchange(&self, group: Option<&str>) {
        let Some(group) = group else { return };
        let i = KEY_EXCHANGES
            .iter()
            .position(|g| *g == group)
            .unwrap_or(KEY_EXCHANGES.len());
        self.key_exchange[i].fetch_add(1, Relaxed);
    }
}

impl Metrics {
    /// The handle for `(vhost, route)`; `route` is a path prefix, or `-` for none.
    pub fn route(&self, vhost: &str, route: &str) -> Arc<RouteMetrics> {
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((vhost.to_string(), route.to_string()))
            .or_default()
            .clone()
    }

    /// The handshake counters of the TLS listener on `address`.
    pub fn handshakes(&self, address: &str) -> Arc<Handshakes> {
        self.handshakes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(address.to_string())
            .or_default()
            .clone()
    }

    /// Each TLS listener's (address, full, resumed) handshakes.
    pub fn handshake_counts(&self) -> Vec<(String, u64, u64)> {
        self.handshakes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(a, h)| (a.clone(), h.full.load(Relaxed), h.resumed.load(Relaxed)))
            .collect()
    }

    /// `tollgate_tls_handshakes_total{listener,kind}`: full and resumed, per TLS listener.
    pub fn render_handshakes(&self, out: &mut String) {
        let all = self
            .handshakes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if all.is_empty() {
            return;
        }
        family(
            out,
            "tollgate_tls_handshakes_total",
            "counter",
            "TLS handshakes completed on each listener: full, or resuming a session (a ticket or a cached session).",
        );
        for (listener, h) in &all {
            for (kind, n) in [("full", &h.full), ("resumed", &h.resumed)] {
                let _ = writeln!(
                    out,
                    "tollgate_tls_handshakes_total{{listener=\"{listener}\",kind=\"{kind}\"}} {}",
                    n.load(Relaxed)
                );
            }
        }
        family(
            out,
            "tollgate_tls_key_exchange_total",
            "counter",
            "TLS handshakes on each listener by key exchange group: X25519MLKEM768 is the hybrid post-quantum one.",
        );
        for (listener, h) in &all {
            let names = KEY_EXCHANGES.iter().copied().chain(["other"]);
            for (group, n) in names.zip(&h.key_exchange) {
                let _ = writeln!(
                    out,
                    "tollgate_tls_key_exchange_total{{listener=\"{listener}\",group=\"{group}\"}} {}",
                    n.load(Relaxed)
                );
            }
        }
    }

    pub fn pool(&self, name: &str) -> Arc<PoolMetrics> {
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    pub fn port(&self, name: &str) -> Arc<PortMetrics> {
        self.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Render the service ports' counters.
    /// The reload families of `/metrics`.
    pub fn render_reloads(&self, out: &mut String) {
        family(
            out,
            "tollgate_config_reloads_total",
            "counter",
            "Reload attempts by result.",
        );
        let _ = writeln!(
            out,
            "tollgate_config_reloads_total{{result=\"success\"}} {}",
            self.reloads_ok.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "tollgate_config_reloads_total{{result=\"failure\"}} {}",
            self.reloads_failed.load(Relaxed)
        );
        single(
            out,
            "tollgate_config_last_reload_success_timestamp_seconds",
            "gauge",
            "When the configuration last reloaded successfully (0: never since start).",
            self.last_reload_success_unix.load(Relaxed),
        );
        single(
            out,
            "tollgate_acme_checks_total",
            "counter",
            "Times the ACME issuer looked at which certificates to order or renew.",
            self.acme_checks.load(Relaxed),
        );
    }

    pub fn render_ports(&self, out: &mut String) {
        let ports = self.ports.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if ports.is_empty() {
            return;
        }
        type Pick = fn(&PortMetrics) -> &AtomicU64;
        let families: [(&str, &str, &str, Pick); 6] = [
            (
                "tollgate_port_open",
                "gauge",
                "TCP connections (UDP flows) open now.",
                |m| &m.open,
            ),
            (
                "tollgate_port_connections_total",
                "counter",
                "TCP connections accepted (UDP flows started).",
                |m| &m.total,
            ),
            (
                "tollgate_port_received_bytes_total",
                "counter",
                "Bytes from clients to backends.",
                |m| &m.bytes_in,
            ),
            (
                "tollgate_port_sent_bytes_total",
                "counter",
                "Bytes from backends to clients.",
                |m| &m.bytes_out,
            ),
            (
                "tollgate_port_connect_failures_total",
                "counter",
                "Connects to a backend that failed.",
                |m| &m.connect_failures,
            ),
            (
                "tollgate_port_refused_total",
                "counter",
                "Connections or datagrams turned away (no backend, a cap, an unknown SNI name).",
                |m| &m.refused,
            ),
        ];
        for (name, kind, help, pick) in families {
            family(out, name, kind, help);
            for (port, m) in &ports {
                let _ = writeln!(out, "{name}{{port=\"{port}\"}} {}", pick(m).load(Relaxed));
            }
        }
    }

    /// Render the request metrics (the rest is rendered by the admin API from the Snapshot).
    pub fn render_requests(&self, out: &mut String) {
        let routes = self
            .routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        family(
            out,
            "tollgate_requests_total",
            "counter",
            "Requests by vhost, route and status class.",
        );
        for ((v, r), m) in &routes {
            for (i, class) in ["none", "1xx", "2xx", "3xx", "4xx", "5xx"]
                .iter()
                .enumerate()
            {
                let n = m.by_class[i].load(Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "tollgate_requests_total{{vhost=\"{}\",route=\"{}\",code=\"{class}\"}} {n}",
                        esc(v),
                        esc(r)
                    );
                }
            }
        }
        family(
            out,
            "tollgate_request_duration_seconds",
            "histogram",
            "Time from request start to the end of the response, by vhost and route.",
        );
        for ((v, r), m) in &routes {
            m.duration.render(
                out,
                "tollgate_request_duration_seconds",
                &format!("vhost=\"{}\",route=\"{}\"", esc(v), esc(r)),
            );
        }
        single(
            out,
            "tollgate_consul_errors_total",
            "counter",
            "Failed Consul queries (the last known pools keep serving).",
            self.consul_errors.load(Relaxed),
        );
        single(
            out,
            "tollgate_consul_fallback_reads_total",
            "counter",
            "Services read in the fallback mode beyond consul.max_blocking (re-read when their checks change, all when the catalog moves).",
            self.consul_fallback_reads.load(Relaxed),
        );
        single(
            out,
            "tollgate_consul_guarded_total",
            "counter",
            "Consul answers the guard refused (a pool would have emptied).",
            self.consul_guarded.load(Relaxed),
        );
        family(
            out,
            "tollgate_consul_convergence_seconds",
            "histogram",
            "From a Consul answer to the Snapshot that uses it being live.",
        );
        self.convergence
            .render(out, "tollgate_consul_convergence_seconds", "");
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner()).clone();
        family(
            out,
            "tollgate_upstream_connect_duration_seconds",
            "histogram",
            "Time to open a new connection to a backend, by pool.",
        );
        for (p, m) in &pools {
            m.connect.render(
                out,
                "tollgate_upstream_connect_duration_seconds",
                &format!("pool=\"{}\"", esc(p)),
            );
        }
        family(
            out,
            "tollgate_upstream_response_duration_seconds",
            "histogram",
            "Time from choosing a backend to its response header, by pool.",
        );
        for (p, m) in &pools {
            m.response.render(
                out,
                "tollgate_upstream_response_duration_seconds",
                &format!("pool=\"{}\"", esc(p)),
            );
        }
        let per_pool =
            |out: &mut String, name: &str, help: &str, value: fn(&PoolMetrics) -> u64| {
                family(out, name, "counter", help);
                for (p, m) in &pools {
                    let _ = writeln!(out, "{name}{{pool=\"{}\"}} {}", esc(p), value(m));
                }
            };
        per_pool(
            out,
            "tollgate_upstream_retries_total",
            "Requests moved to another backend after a connect failure.",
            |m| m.retries.load(Relaxed),
        );
        per_pool(
            out,
            "tollgate_upstream_connect_failures_total",
            "Failed connects to backends.",
            |m| m.connect_failures.load(Relaxed),
        );
    }
}

/// `# HELP` and `# TYPE` lines of a metric family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A family with one sample and no labels.
pub fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// Escape a label value for the Prometheus text format.
pub fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(100));
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0005\"} 1\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.005\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"60\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_count{a=\"b\"} 3\n"));
    }

    #[test]
    fn status_classes_and_escaping() {
        let m = RouteMetrics::default();
        m.record(204, Duration::ZERO);
        m.record(503, Duration::ZERO);
        m.record(0, Duration::ZERO);
        assert_eq!(m.by_class[2].load(Relaxed), 1);
        assert_eq!(m.by_class[5].load(Relaxed), 1);
        assert_eq!(m.by_class[0].load(Relaxed), 1);
        assert_eq!(esc("a\"b\\c\n"), "a\\\"b\\\\c\\n");
    }
}
