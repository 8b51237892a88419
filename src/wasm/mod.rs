//! The proxy-wasm plugin host on wasmtime. Owns: compiling modules (once per distinct file
//! content), one instance per plugin per worker thread (`Plugin::slots`), the ABI's
//! hostcalls (`hostcalls`, `properties`, `abi`), state shared by every instance of a VM id
//! (`shared`), the per-request chain that drives callbacks through the proxy phases
//! (`chain`), and the sandbox: a CPU deadline on every call (epoch interruption), a memory
//! cap per instance, and a faulted instance discarded and rebuilt with crash-loop backoff.
//! Must not touch pingora sessions (the proxy hands it header structs and bytes) nor build
//! Snapshots (it hands `state` the loaded plugins).

mod abi;
mod background;
pub mod chain;
mod clock;
mod hostcalls;
mod metrics;
mod properties;
pub mod shared;
#[cfg(test)]
mod tests;
mod vm;

pub use chain::{Chain, Verdict};
pub use vm::{CalloutPools, Fault, LocalResponse, RequestInfo, RouteNames, StreamData};

/// A route's plugin chain, in order (shared by the route and its requests' chains).
pub type Plugins = Arc<[Arc<Plugin>]>;

use background::*;
pub use clock::deadline_ticks;
pub(crate) use clock::Running;
use clock::*;
pub use metrics::{PluginMetric, PluginMetrics};

use crate::config::{ConfigError, ConfigErrors, PluginSpec};
use crate::upstream::Pool;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU64, AtomicUsize,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use vm::{HostState, Vm, ROOT_ID};
use wasmtime::{Engine, InstancePre, Linker, Module};

/// Counters per plugin name (they survive reloads of the plugin).
#[derive(Debug, Default)]
pub struct PluginStats {
    pub calls: AtomicU64,
    pub faults_deadline: AtomicU64,
    pub faults_trap: AtomicU64,
    pub faults_lost: AtomicU64,
    pub faults_stuck: AtomicU64,
    pub instances_started: AtomicU64,
    pub local_responses: AtomicU64,
    pub callouts: AtomicU64,
    pub callout_failures: AtomicU64,
}

impl PluginStats {
    fn fault(&self, f: &Fault) {
        match f {
            Fault::Deadline => &self.faults_deadline,
            Fault::Trap(_) => &self.faults_trap,
            Fault::Lost(_) => &self.faults_lost,
            Fault::Stuck(_) => &self.faults_stuck,
        }
        .fetch_add(1, Relaxed);
    }
}

/// One instance slot: a worker thread's instance of a plugin.
pub(crate) struct Slot {
    vm: Option<Vm>,
    /// Bumped whenever the instance is discarded, so contexts of the old one are known lost.
    gen: u64,
    failures: u32,
    started: Option<Instant>,
    retry_at: Option<Instant>,
    next_tick: Option<Instant>,
    last_error: Option<String>,
}

/// A loaded plugin: its compiled module and one instance slot per worker thread.
pub struct Plugin {
    pub spec: Arc<PluginSpec>,
    /// The host that loaded it.
    host: &'static Host,
    fingerprint: [u8; 32],
    /// The module's content hash (its key in the compiled-module cache).
    code_hash: [u8; 32],
    /// The file's modification time and length when it was read.
    stamp: Option<(std::time::SystemTime, u64)>,
    pre: InstancePre<HostState>,
    slots: Vec<Mutex<Slot>>,
    pub stats: Arc<PluginStats>,
    pub loaded_unix: u64,
    /// The response-side callbacks the module exports: a chain skips a phase (and what it
    /// would prepare for it) when none of its plugins listens, as Envoy skips filters.
    pub listens: Listens,
}

/// Which response-side callbacks a module exports.
#[derive(Debug, Clone, Copy, Default)]
pub struct Listens {
    pub response_headers: bool,
    pub response_body: bool,
    pub log: bool,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.spec.name)
            .finish()
    }
}

/// What /plugins shows of one plugin.
#[derive(Debug, serde::Serialize)]
pub struct PluginStatus {
    pub name: String,
    pub file: String,
    pub vm_id: String,
    pub on_error: &'static str,
    pub cpu_deadline_ms: u64,
    pub max_memory: u64,
    pub instances: usize,
    pub instances_running: usize,
    pub last_error: Option<String>,
    pub calls: u64,
    pub faults: u64,
    pub instances_started: u64,
    pub shared_keys: usize,
}

impl Plugin {
    fn lock(&self, i: usize) -> MutexGuard<'_, Slot> {
        self.slots[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The slot of the calling worker thread.
    fn my_slot(&self) -> usize {
        thread_local! {
            static WORKER: usize = {
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                NEXT.fetch_add(1, Relaxed)
            };
        }
        WORKER.with(|w| *w) % self.slots.len()
    }

    /// Make sure `slot` has a running instance, starting one unless it is backing off.
    fn ensure(&self, slot: &mut Slot) -> Result<(), Fault> {
        if slot.vm.is_some() {
            return Ok(());
        }
        if let Some(at) = slot.retry_at {
            if Instant::now() < at {
                return Err(Fault::Lost(format!(
                    "restarting after a fault ({}); next try in {:?}",
                    slot.last_error.as_deref().unwrap_or("?"),
                    at - Instant::now()
                )));
            }
        }
        match Vm::start(self.host, self.spec.clone(), &self.pre) {
            Ok(vm) => {
                self.stats.instances_started.fetch_add(1, Relaxed);
                slot.vm = Some(vm);
                slot.started = Some(Instant::now());
                slot.retry_at = None;
                Ok(())
            }
            Err(e) => {
                tracing::error!(plugin = %self.spec.name, "cannot start an instance: {e}");
                self.fail(slot, &Fault::Trap(e.clone()));
                Err(Fault::Lost(e))
            }
        }
    }

    /// Discard the instance after a fault; the next start waits out a doubling backoff
    /// (the first restart is immediate; 100 ms, 200 ms, … up to 30 s after that).
    fn fail(&self, slot: &mut Slot, f: &Fault) {
        self.stats.fault(f);
        if matches!(f, Fault::Lost(_)) {
            return;
        }
        let lived_long = slot
            .started
            .is_some_and(|s| s.elapsed() > Duration::from_secs(10));
        slot.failures = if lived_long { 1 } else { slot.failures + 1 };
        slot.vm = None;
        slot.gen += 1;
        slot.next_tick = None;
        slot.started = None;
        slot.last_error = Some(f.to_string());
        let backoff = match slot.failures {
            0 | 1 => Duration::ZERO,
            n => Duration::from_millis(100u64 << (n - 2).min(9)).min(Duration::from_secs(30)),
        };
        slot.retry_at = Some(Instant::now() + backoff);
        tracing::error!(
            plugin = %self.spec.name,
            "plugin instance {f}; discarded (restart in {backoff:?})"
        );
    }

    /// Schedule or cancel the root context's tick after a call changed the period.
    fn update_tick(&self, slot: &mut Slot) {
        let period = slot.vm.as_ref().and_then(|v| v.store.data().tick_period);
        match (period, slot.next_tick) {
            (Some(p), None) => {
                slot.next_tick = Some(Instant::now() + p);
                // the timers thread sleeps until the next tick it knows of
                self.host.wake_timers.notify_one();
            }
            (None, Some(_)) => slot.next_tick = None,
            _ => {}
        }
    }

    pub fn status(&self) -> PluginStatus {
        let mut running = 0;
        let mut last_error = None;
        for i in 0..self.slots.len() {
            let s = self.lock(i);
            if s.vm.is_some() {
                running += 1;
            }
            if s.last_error.is_some() {
                last_error = s.last_error.clone();
            }
        }
        let st = &self.stats;
        PluginStatus {
            name: self.spec.name.clone(),
            file: self.spec.file.display().to_string(),
            vm_id: self.spec.vm_id.clone(),
            on_error: match self.spec.on_error {
                crate::config::OnError::FailClosed => "fail_closed",
                crate::config::OnError::FailOpen => "fail_open",
            },
            cpu_deadline_ms: self.spec.cpu_deadline.as_millis() as u64,
            max_memory: self.spec.max_memory,
            instances: self.slots.len(),
            instances_running: running,
            last_error,
            calls: st.calls.load(Relaxed),
            faults: st.faults_deadline.load(Relaxed)
                + st.faults_trap.load(Relaxed)
                + st.faults_lost.load(Relaxed)
                + st.faults_stuck.load(Relaxed),
            instances_started: st.instances_started.load(Relaxed),
            shared_keys: self.host.shared.len(&self.spec.vm_id),
        }
    }
}

/// The plugin host: engine, module cache, live plugins, shared state, and the epoch clock
/// and timers threads (started with the first plugin). One per tollgate, made by `server`
/// (tests make their own) and kept for the life of the process.
pub struct Host {
    engine: Engine,
    clock: Clock,
    modules: Mutex<HashMap<[u8; 32], Module>>,
    live: Mutex<BTreeMap<String, Arc<Plugin>>>,
    stats: Mutex<HashMap<String, Arc<PluginStats>>>,
    pub shared: shared::SharedData,
    pub queues: shared::SharedQueues,
    pub metrics: PluginMetrics,
    queue_ready: Mutex<Vec<(String, u32)>>,
    /// Wakes the timers thread: a queue notification, or a tick period newly set.
    wake_timers: tokio::sync::Notify,
    /// Callouts connect as requests do: pingora's connector, with its own connection pools.
    connector: pingora::connectors::http::Connector,
    pools: OnceLock<PoolLookup>,
    background: OnceLock<()>,
}

/// How root contexts' callouts find a pool by name in the live configuration (handed in by
/// the server); a request's callouts use its own Snapshot's pools.
pub type PoolLookup = Box<dyn Fn(&str) -> Option<Arc<Pool>> + Send + Sync>;

impl Host {
    /// A new host, for the life of the process (its threads hold it).
    pub fn new() -> &'static Host {
        let mut cfg = wasmtime::Config::new();
        cfg.epoch_interruption(true);
        // for profiling plugins: /tmp/perf-PID.map names the compiled wasm functions (perf
        // reads it; benches/README.md shows how to read callgrind's addresses with it)
        if std::env::var_os("TOLLGATE_WASM_PERFMAP").is_some_and(|v| v == "1") {
            cfg.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&cfg).expect("wasmtime engine with default settings");
        Box::leak(Box::new(Host {
            engine,
            clock: Clock::default(),
            modules: Mutex::default(),
            live: Mutex::default(),
            stats: Mutex::default(),
            shared: Default::default(),
            queues: Default::default(),
            metrics: Default::default(),
            queue_ready: Mutex::default(),
            wake_timers: tokio::sync::Notify::new(),
            connector: pingora::connectors::http::Connector::new(None),
            pools: OnceLock::new(),
            background: OnceLock::new(),
        }))
    }
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut c = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        c.update(&(p.len() as u64).to_le_bytes());
        c.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(c.finish().as_ref());
    out
}

impl Host {
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Give the host the way to find a pool of the live configuration by name (callouts go
    /// to its backends). Called once when the server starts. The background threads start
    /// with the first plugin (`load`): a tollgate without plugins runs none.
    pub fn attach(&'static self, pools: PoolLookup) {
        let _ = self.pools.set(pools);
    }

    /// Load the configured plugins: compile (or reuse) each module, and start one instance
    /// per plugin now so a module that does not load or rejects its configuration fails
    /// this configuration whole. A plugin whose file and settings are unchanged is reused
    /// with its running instances.
    pub fn load(
        &'static self,
        specs: &BTreeMap<String, PluginSpec>,
        threads: usize,
    ) -> Result<BTreeMap<String, Arc<Plugin>>, ConfigErrors> {
        if specs.is_empty() {
            // every plugin was removed: nothing to keep (no background threads started)
            self.live.lock().unwrap_or_else(|e| e.into_inner()).clear();
            self.modules
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            return Ok(BTreeMap::new());
        }
        self.start_background();
        let threads = threads.max(1);
        let mut errors = Vec::new();
        let mut out = BTreeMap::new();
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (name, spec) in specs {
            let err = |m: String| ConfigError {
                origin: spec.origin.clone(),
                option: format!("plugin.{name}"),
                message: m,
            };
            let settings = format!(
                "{}|{}|{:?}|{:?}|{}|{}",
                spec.vm_id,
                spec.root_id,
                spec.on_error,
                spec.cpu_deadline,
                spec.max_memory,
                threads
            );
            let fingerprint = |code: &[u8; 32]| {
                sha256(&[code, &spec.config, &spec.vm_config, settings.as_bytes()])
            };
            // Every Snapshot build comes here, Consul-driven ones too: a file unchanged since
            // the live plugin read it (judged as the config watcher judges files) is not read
            // again.
            let stamp = crate::config::stamp(&spec.file);
            let unchanged = live.get(name).filter(|p| {
                stamp.is_some() && p.stamp == stamp && p.fingerprint == fingerprint(&p.code_hash)
            });
            if let Some(p) = unchanged {
                out.insert(name.clone(), p.clone());
                continue;
            }
            let bytes = match std::fs::read(&spec.file) {
                Ok(b) => b,
                Err(e) => {
                    // the shipped plugins are built, not committed: say how
                    let shipped = spec
                        .file
                        .parent()
                        .is_some_and(|d| d.ends_with("plugins/dist"));
                    let hint = if shipped && e.kind() == std::io::ErrorKind::NotFound {
                        " (build the shipped plugins with plugins/build)"
                    } else {
                        ""
                    };
                    errors.push(err(format!(
                        "cannot read {}: {e}{hint}",
                        spec.file.display()
                    )));
                    continue;
                }
            };
            let code_hash = sha256(&[&bytes]);
            let fp = fingerprint(&code_hash);
            if let Some(p) = live.get(name).filter(|p| p.fingerprint == fp) {
                out.insert(name.clone(), p.clone());
                continue;
            }
            match self.build_plugin(spec, &bytes, code_hash, fp, stamp, threads) {
                Ok(p) => {
                    out.insert(name.clone(), Arc::new(p));
                }
                Err(m) => errors.push(err(m)),
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        *self.live.lock().unwrap_or_else(|e| e.into_inner()) = out.clone();
        // Forget compiled modules no live plugin uses (plugins of older Snapshots keep
        // their own reference until those Snapshots go).
        self.modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|hash, _| out.values().any(|p| p.code_hash == *hash));
        Ok(out)
    }

    fn build_plugin(
        &'static self,
        spec: &PluginSpec,
        bytes: &[u8],
        code_hash: [u8; 32],
        fingerprint: [u8; 32],
        stamp: Option<(std::time::SystemTime, u64)>,
        threads: usize,
    ) -> Result<Plugin, String> {
        let file = spec.file.display();
        let module = {
            let cached = self
                .modules
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&code_hash)
                .cloned();
            match cached {
                Some(m) => m,
                None => {
                    let m = Module::new(&self.engine, bytes)
                        .map_err(|e| format!("{file} is not a loadable wasm module: {e:#}"))?;
                    self.modules
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(code_hash, m.clone());
                    m
                }
            }
        };
        let exports: Vec<&str> = module.exports().map(|e| e.name()).collect();
        if !exports
            .iter()
            .any(|e| *e == "proxy_abi_version_0_2_1" || *e == "proxy_abi_version_0_2_0")
        {
            return Err(
                if exports.iter().any(|e| e.starts_with("proxy_abi_version_")) {
                    format!("{file} is built for a proxy-wasm ABI tollgate does not host (it hosts 0.2.0 and 0.2.1)")
                } else {
                    format!(
                        "{file} is not a proxy-wasm module: it exports no proxy_abi_version_0_2_x"
                    )
                },
            );
        }
        let listens = Listens {
            response_headers: exports.contains(&"proxy_on_response_headers"),
            response_body: exports.contains(&"proxy_on_response_body"),
            log: exports.contains(&"proxy_on_log"),
        };
        let mut linker: Linker<HostState> = Linker::new(&self.engine);
        hostcalls::link(&mut linker, &module, &spec.name)
            .map_err(|e| format!("{file}: cannot link: {e:#}"))?;
        let pre = linker
            .instantiate_pre(&module)
            .map_err(|e| format!("{file}: cannot link: {e:#}"))?;
        let stats = self
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(spec.name.clone())
            .or_default()
            .clone();
        let plugin = Plugin {
            spec: Arc::new(spec.clone()),
            host: self,
            fingerprint,
            code_hash,
            stamp,
            pre,
            slots: (0..threads)
                .map(|_| {
                    Mutex::new(Slot {
                        vm: None,
                        gen: 0,
                        failures: 0,
                        started: None,
                        retry_at: None,
                        next_tick: None,
                        last_error: None,
                    })
                })
                .collect(),
            stats,
            listens,
            loaded_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        // Start the first instance now: its start-up errors are configuration errors.
        let vm = Vm::start(self, plugin.spec.clone(), &plugin.pre)?;
        plugin.stats.instances_started.fetch_add(1, Relaxed);
        {
            let mut s = plugin.lock(0);
            s.vm = Some(vm);
            s.started = Some(Instant::now());
            plugin.update_tick(&mut s);
        }
        Ok(plugin)
    }

    /// The plugins loaded now, by name.
    pub fn live(&self) -> BTreeMap<String, Arc<Plugin>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn notify_queue(&self, owner: &str, id: u32) {
        let mut ready = self.queue_ready.lock().unwrap_or_else(|e| e.into_inner());
        if ready.is_empty() {
            self.wake_timers.notify_one();
        }
        ready.push((owner.to_string(), id));
    }
}

impl Host {
    /// The plugin families of `/metrics` (Prometheus text) for `plugins` (the live
    /// Snapshot's): counters per plugin, faults by kind, the metrics plugins define.
    pub fn render_metrics(&self, out: &mut String, plugins: &BTreeMap<String, Arc<Plugin>>) {
        use crate::metrics::{esc, family};
        use std::fmt::Write;
        if plugins.is_empty() {
            return;
        }
        type Pick = fn(&PluginStats) -> &std::sync::atomic::AtomicU64;
        let families: [(&str, &str, Pick); 5] = [
            (
                "tollgate_plugin_calls_total",
                "Callbacks called into each plugin.",
                |s| &s.calls,
            ),
            (
                "tollgate_plugin_instances_started_total",
                "Plugin instances started (a fault discards one; the next start replaces it).",
                |s| &s.instances_started,
            ),
            (
                "tollgate_plugin_local_responses_total",
                "Requests a plugin answered itself.",
                |s| &s.local_responses,
            ),
            (
                "tollgate_plugin_callouts_total",
                "HTTP callouts plugins made.",
                |s| &s.callouts,
            ),
            (
                "tollgate_plugin_callout_failures_total",
                "HTTP callouts that failed (no answer given to the plugin).",
                |s| &s.callout_failures,
            ),
        ];
        for (name, help, pick) in families {
            family(out, name, "counter", help);
            for p in plugins.values() {
                let _ = writeln!(
                    out,
                    "{name}{{plugin=\"{}\"}} {}",
                    esc(&p.spec.name),
                    pick(&p.stats).load(Relaxed)
                );
            }
        }
        family(
            out,
            "tollgate_plugin_faults_total",
            "counter",
            "Plugin failures by kind: deadline (CPU), trap (panic, out of memory, bad pointer), lost (instance gone or restarting), stuck (paused with nothing pending).",
        );
        for p in plugins.values() {
            let s = &p.stats;
            for (kind, c) in [
                ("deadline", &s.faults_deadline),
                ("trap", &s.faults_trap),
                ("lost", &s.faults_lost),
                ("stuck", &s.faults_stuck),
            ] {
                let _ = writeln!(
                    out,
                    "tollgate_plugin_faults_total{{plugin=\"{}\",kind=\"{kind}\"}} {}",
                    esc(&p.spec.name),
                    c.load(Relaxed)
                );
            }
        }
        let defined = self.metrics.all();
        if !defined.is_empty() {
            family(
                out,
                "tollgate_plugin_metric",
                "untyped",
                "Metrics plugins define (proxy_define_metric): counters and gauges as values, histograms as sums.",
            );
            for m in defined {
                let _ = writeln!(
                    out,
                    "tollgate_plugin_metric{{plugin=\"{}\",name=\"{}\"}} {}",
                    esc(&m.plugin),
                    esc(&m.name),
                    m.value.load(Relaxed)
                );
            }
        }
    }
}
