//! Upstream pools: backends, selection (`selection`, pure), passive health (`health`) and the
//! description of a connection to a backend (`peer`).
//! Owns: choosing a backend for a request and remembering how backends behave. Must not touch
//! sockets (the proxy connects) or config files. Per-backend state lives in the `Registry`,
//! keyed by (pool, address), so it survives Snapshot rebuilds.

pub mod health;
pub mod peer;
pub mod selection;

pub use health::BackendState;

use crate::config::{Balance, PoolSpec};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct Backend {
    pub address: SocketAddr,
    pub weight: u32,
    pub state: Arc<BackendState>,
}

#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub metrics: Arc<crate::metrics::PoolMetrics>,
    pub backends: Vec<Backend>,
    pub spec: PoolSpec,
    /// For a TLS pool: the CA bundle and client certificate its connections use.
    pub tls: Option<Arc<crate::tls::backend::BackendMaterial>>,
    schedule: Vec<usize>,
    cursor: Arc<AtomicUsize>,
}

/// Whether a failure to reach a backend is tollgate's own shortage (out of descriptors, of
/// local ports, of buffers or memory) rather than the backend's: such a failure must never
/// count against a backend (passive ejection).
pub fn local_shortage(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::EADDRNOTAVAIL | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Holds a backend's in-flight count up while a request uses it.
#[derive(Debug)]
pub struct InflightGuard(Arc<BackendState>);

impl InflightGuard {
    pub fn new(state: Arc<BackendState>) -> Self {
        state.inflight.fetch_add(1, Relaxed);
        InflightGuard(state)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Relaxed);
    }
}

impl Pool {
    /// Choose a backend that is not ejected and not in `exclude` (already tried).
    pub fn select(&self, now_ms: u64, exclude: &[usize]) -> Option<usize> {
        let available = |i: usize| !exclude.contains(&i) && self.usable(i, now_ms);
        match self.spec.balance {
            Balance::RoundRobin => {
                let c = self.cursor.fetch_add(1, Relaxed);
                selection::pick_round_robin(&self.schedule, c, available)
            }
            Balance::PowerOfTwo => {
                let weights: Vec<u32> = self.backends.iter().map(|b| b.weight).collect();
                selection::pick_p2c(
                    &weights,
                    |i| self.backends[i].state.inflight.load(Relaxed),
                    available,
                    fastrand::u64(..),
                    fastrand::u64(..),
                )
            }
        }
    }

    /// The datacenter serving a Consul pool now: the failover one it was moved to, else its
    /// own (`local` for the agent's).
    pub fn serving_datacenter(&self) -> String {
        match &self.spec.serving {
            Some((dc, _)) => dc.clone(),
            None => self
                .spec
                .consul
                .as_ref()
                .and_then(|k| k.datacenter.clone())
                .unwrap_or_else(|| "local".to_string()),
        }
    }

    /// Whether some backend outside `exclude` could still be chosen.
    pub fn has_available(&self, now_ms: u64, exclude: &[usize]) -> bool {
        self.backends
            .iter()
            .enumerate()
            .any(|(i, _)| !exclude.contains(&i) && self.usable(i, now_ms))
    }

    /// Requests one backend may carry at once (`max_connections`, times `max_streams` for
    /// HTTP/2; 0: no cap).
    pub fn inflight_cap(&self) -> u64 {
        let per_conn = if self.spec.protocol.h2() {
            u64::from(self.spec.max_streams)
        } else {
            1
        };
        u64::from(self.spec.max_connections) * per_conn
    }

    /// Healthy (passively and actively) and below its in-flight cap.
    fn usable(&self, i: usize, now_ms: u64) -> bool {
        let st = &self.backends[i].state;
        let cap = self.inflight_cap();
        st.is_available(now_ms) && (cap == 0 || st.inflight.load(Relaxed) < cap)
    }
}

/// State that outlives a Snapshot: backend health/in-flight and round-robin cursors.
#[derive(Debug, Default)]
pub struct Registry {
    backends: Mutex<HashMap<(String, SocketAddr), Arc<BackendState>>>,
    cursors: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

impl Registry {
    /// Build a pool, reusing the state of backends it already had.
    pub fn pool(&self, name: &str, spec: &PoolSpec, metrics: &crate::metrics::Metrics) -> Pool {
        let mut states = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        let backends = spec
            .backends
            .iter()
            .map(|b| Backend {
                address: b.address,
                weight: b.weight,
                state: states
                    .entry((name.to_string(), b.address))
                    .or_default()
                    .clone(),
            })
            .collect::<Vec<_>>();
        drop(states);
        let cursor = self
            .cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        Pool {
            name: name.to_string(),
            metrics: metrics.pool(name),
            schedule: selection::wrr_schedule(&weights),
            backends,
            spec: spec.clone(),
            tls: None,
            cursor,
        }
    }

    /// Forget state of pools and backends no longer configured.
    pub fn retain<'a>(&self, live: impl Iterator<Item = &'a Pool>) {
        let mut keep_b = HashSet::new();
        let mut keep_p = HashSet::new();
        for p in live {
            keep_p.insert(p.name.clone());
            for b in &p.backends {
                keep_b.insert((p.name.clone(), b.address));
            }
        }
        self.backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| keep_b.contains(k));
        self.cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| keep_p.contains(k));
    }
}

/// The backend and pool families of `/metrics` (Prometheus text) for `pools` (the live
/// Snapshot's), at `now_ms`.
pub fn render_metrics(out: &mut String, pools: &[Arc<Pool>], now_ms: u64) {
    use crate::metrics::{esc, family};
    use std::fmt::Write;
    // `only`: the pools the family is about (a check's state only where there is a check)
    let per_backend_of = |out: &mut String,
                          name: &str,
                          kind: &str,
                          help: &str,
                          only: &dyn Fn(&Pool) -> bool,
                          value: &dyn Fn(&Backend) -> u64| {
        family(out, name, kind, help);
        for p in pools.iter().filter(|p| only(p)) {
            for b in &p.backends {
                let _ = writeln!(
                    out,
                    "{name}{{pool=\"{}\",backend=\"{}\"}} {}",
                    esc(&p.name),
                    b.address,
                    value(b)
                );
            }
        }
    };
    let per_backend =
        |out: &mut String, name: &str, kind: &str, help: &str, value: &dyn Fn(&Backend) -> u64| {
            per_backend_of(out, name, kind, help, &|_| true, value)
        };
    per_backend(
        out,
        "tollgate_backend_up",
        "gauge",
        "1 when the backend may get traffic, 0 while ejected or taken out by its health check.",
        &|b| u64::from(b.state.is_available(now_ms)),
    );
    per_backend_of(
        out,
        "tollgate_backend_check_up",
        "gauge",
        "1 when the backend's active health check lets it serve; only pools with a health_check have it.",
        &|p| p.spec.check.is_some(),
        &|b| u64::from(b.state.check_up()),
    );
    per_backend(
        out,
        "tollgate_backend_inflight_requests",
        "gauge",
        "Requests in flight to the backend.",
        &|b| b.state.inflight.load(Relaxed),
    );
    per_backend(
        out,
        "tollgate_backend_ejections_total",
        "counter",
        "Times the backend was ejected by passive health.",
        &|b| b.state.ejections_total.load(Relaxed),
    );
    family(
        out,
        "tollgate_pool_datacenter",
        "gauge",
        "1 for the datacenter serving each Consul pool that has failover datacenters.",
    );
    for p in pools.iter().filter(|p| !p.spec.failover.is_empty()) {
        let _ = writeln!(
            out,
            "tollgate_pool_datacenter{{pool=\"{}\",datacenter=\"{}\"}} 1",
            esc(&p.name),
            esc(&p.serving_datacenter())
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tollgates_own_shortages_are_not_a_backends_failure() {
        let os = std::io::Error::from_raw_os_error;
        for local in [
            libc::EMFILE,
            libc::ENFILE,
            libc::EADDRNOTAVAIL,
            libc::ENOBUFS,
        ] {
            assert!(super::local_shortage(&os(local)), "{local}");
        }
        for backend in [libc::ECONNREFUSED, libc::ETIMEDOUT, libc::EHOSTUNREACH] {
            assert!(!super::local_shortage(&os(backend)), "{backend}");
        }
    }
}
