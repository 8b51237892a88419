//! The Snapshot and its publication. Owns: building an immutable `Snapshot` (routes, pools,
//! certificates) from a validated `Config`, publishing it through `ArcSwap`, and reloading
//! (SIGHUP or a changed config/certificate file). A bad change is rejected whole and the
//! previous Snapshot keeps serving. Must not touch request handling; state that outlives a
//! Snapshot (backend health, cursors) lives in `upstream::Registry`, beside it.

pub mod watch;

use crate::config::{Config, ConfigErrors};
use crate::routing::{RouteEntry, RouteTable, VhostEntry};
use crate::tls::CertStore;
use crate::upstream::{Pool, Registry};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

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
}

impl Snapshot {
    /// Build a Snapshot; certificates are loaded here, so a missing or bad one fails the build.
    pub fn build(
        config: Arc<Config>,
        registry: &Registry,
        generation: u64,
    ) -> Result<Snapshot, ConfigErrors> {
        let certs = CertStore::load(&config)?;
        let mut pools = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (name, spec) in &config.pools {
            index.insert(name, pools.len());
            pools.push(Arc::new(registry.pool(name, spec)));
        }
        let mut routes = RouteTable::default();
        for v in &config.vhosts {
            let entries = v
                .routes
                .iter()
                .map(|r| RouteEntry {
                    prefix: r.path.clone(),
                    // validation guarantees the pool exists
                    target: index.get(r.pool.as_str()).copied().unwrap_or(0),
                })
                .collect();
            routes.add(
                &v.names,
                v.default,
                VhostEntry::new(v.label(), v.redirect_https, entries),
            );
        }
        Ok(Snapshot {
            generation,
            config,
            routes,
            pools,
            certs,
            built_at_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
    }
}

/// The live Snapshot plus what survives rebuilds.
pub struct State {
    current: Arc<ArcSwap<Snapshot>>,
    pub registry: Registry,
    generation: AtomicU64,
    reload_lock: Mutex<()>,
}

impl State {
    /// Build the first Snapshot from `config`.
    pub fn new(config: Config) -> Result<State, ConfigErrors> {
        let registry = Registry::default();
        let snap = Snapshot::build(Arc::new(config), &registry, 1)?;
        Ok(State {
            current: Arc::new(ArcSwap::from_pointee(snap)),
            registry,
            generation: AtomicU64::new(1),
            reload_lock: Mutex::new(()),
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
        let old = self.snapshot();
        let config = Config::load(&old.config.source)?;
        if config.listeners != old.config.listeners {
            tracing::warn!(
                "listener changes take effect only after a restart; the old listeners keep running"
            );
        }
        let generation = self.generation.load(Ordering::SeqCst) + 1;
        let snap = Snapshot::build(Arc::new(config), &self.registry, generation)?;
        self.registry.retain(snap.pools.iter().map(|p| p.as_ref()));
        self.generation.store(generation, Ordering::SeqCst);
        self.current.store(Arc::new(snap));
        Ok(generation)
    }
}

/// The files whose change triggers a reload, with what we last saw of each
/// (modification time and length; `None` when missing).
pub fn watched_files(cfg: &Config) -> Vec<PathBuf> {
    let mut files = vec![cfg.source.clone()];
    for v in &cfg.vhosts {
        if let Some(c) = &v.cert {
            files.push(c.cert.clone());
            files.push(c.key.clone());
        }
    }
    if let Some(dir) = &cfg.certs_dir {
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
            let m = std::fs::metadata(&p)
                .ok()
                .map(|m| (m.modified().unwrap_or(UNIX_EPOCH), m.len()));
            (p, m)
        })
        .collect()
}
