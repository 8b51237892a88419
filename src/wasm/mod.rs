//! The proxy-wasm plugin host on wasmtime. Owns: compiling modules (once per distinct file
//! content), one instance per plugin per worker thread (`Plugin::slots`), the ABI's
//! hostcalls (`hostcalls`, `properties`, `abi`), state shared by every instance of a VM id
//! (`shared`), the per-request chain that drives callbacks through the proxy phases
//! (`chain`), and the sandbox: a CPU deadline on every call (epoch interruption), a memory
//! cap per instance, and a faulted instance discarded and rebuilt with crash-loop backoff.
//! Must not touch pingora sessions (the proxy hands it header structs and bytes) nor build
//! Snapshots (it hands `state` the loaded plugins).

mod abi;
pub mod chain;
mod hostcalls;
mod properties;
pub mod shared;
#[cfg(test)]
mod tests;
mod vm;

pub use chain::{Chain, Verdict};
pub use vm::{Fault, LocalResponse, RequestInfo, StreamData};

use crate::config::{ConfigError, ConfigErrors, PluginSpec};
use crate::state::Snapshot;
use arc_swap::ArcSwap;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU64, AtomicUsize,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use vm::{HostState, Vm, ROOT_ID};
use wasmtime::{Engine, InstancePre, Linker, Module};

/// How often the epoch advances: the resolution of CPU deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(2);

/// Guest calls running now, on any thread: the epoch clock only ticks while there are any,
/// so an idle tollgate with plugins loaded does not wake 500 times a second.
static IN_GUEST: AtomicUsize = AtomicUsize::new(0);
/// The epoch clock is parked (or about to park) and must be woken by the next call.
static CLOCK_PARKED: AtomicBool = AtomicBool::new(false);
static CLOCK: OnceLock<std::thread::Thread> = OnceLock::new();

/// Held while guest code runs (every call into a store of the host's engine): keeps the
/// epoch clock, and with it the CPU deadline, ticking.
pub(crate) struct Running(());

impl Running {
    pub(crate) fn enter() -> Running {
        IN_GUEST.fetch_add(1, SeqCst);
        if CLOCK_PARKED.load(SeqCst) {
            if let Some(t) = CLOCK.get() {
                t.unpark();
            }
        }
        Running(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        IN_GUEST.fetch_sub(1, SeqCst);
    }
}

pub fn deadline_ticks(d: Duration) -> u64 {
    (d.as_millis() as u64)
        .div_ceil(EPOCH_TICK.as_millis() as u64)
        .max(1)
        + 1
}

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

/// Metrics plugins define (proxy_define_metric), rendered in /metrics.
#[derive(Default)]
pub struct PluginMetrics {
    inner: Mutex<MetricsInner>,
}

#[derive(Default)]
struct MetricsInner {
    by_name: HashMap<(String, String), u32>,
    list: Vec<Arc<PluginMetric>>,
}

pub struct PluginMetric {
    pub plugin: String,
    pub name: String,
    pub kind: i32,
    pub value: AtomicI64,
    pub count: AtomicU64,
}

impl PluginMetrics {
    fn define(&self, plugin: &str, name: &str, kind: i32) -> u32 {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (plugin.to_string(), name.to_string());
        if let Some(id) = g.by_name.get(&key) {
            return *id;
        }
        g.list.push(Arc::new(PluginMetric {
            plugin: plugin.to_string(),
            name: name.to_string(),
            kind,
            value: AtomicI64::new(0),
            count: AtomicU64::new(0),
        }));
        let id = g.list.len() as u32;
        g.by_name.insert(key, id);
        id
    }

    fn metric(&self, id: u32) -> Option<Arc<PluginMetric>> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.list.get((id as usize).checked_sub(1)?).cloned()
    }

    fn increment(&self, id: u32, by: i64) -> abi::Status {
        match self.metric(id) {
            Some(m) if m.kind != abi::METRIC_HISTOGRAM => {
                m.value.fetch_add(by, Relaxed);
                abi::Status::Ok
            }
            Some(_) => abi::Status::BadArgument,
            None => abi::Status::NotFound,
        }
    }

    fn record(&self, id: u32, v: u64) -> abi::Status {
        match self.metric(id) {
            Some(m) if m.kind == abi::METRIC_HISTOGRAM => {
                m.value.fetch_add(v as i64, Relaxed);
                m.count.fetch_add(1, Relaxed);
                abi::Status::Ok
            }
            Some(m) => {
                m.value.store(v as i64, Relaxed);
                abi::Status::Ok
            }
            None => abi::Status::NotFound,
        }
    }

    fn get(&self, id: u32) -> Option<u64> {
        self.metric(id).map(|m| m.value.load(Relaxed) as u64)
    }

    pub fn all(&self) -> Vec<Arc<PluginMetric>> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .list
            .clone()
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
    fingerprint: [u8; 32],
    /// The module's content hash (its key in the compiled-module cache).
    code_hash: [u8; 32],
    /// The file's modification time and length when it was read.
    stamp: Option<(std::time::SystemTime, u64)>,
    pre: InstancePre<HostState>,
    slots: Vec<Mutex<Slot>>,
    pub stats: Arc<PluginStats>,
    pub loaded_unix: u64,
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
        match Vm::start(host(), self.spec.clone(), &self.pre) {
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
    fn update_tick(slot: &mut Slot) {
        let period = slot.vm.as_ref().and_then(|v| v.store.data().tick_period);
        match (period, slot.next_tick) {
            (Some(p), None) => {
                slot.next_tick = Some(Instant::now() + p);
                // the timers thread sleeps until the next tick it knows of
                host().wake_timers.notify_one();
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
            shared_keys: host().shared.len(&self.spec.vm_id),
        }
    }
}

/// The process-wide plugin host: engine, module cache, live plugins, shared state.
pub struct Host {
    engine: Engine,
    modules: Mutex<HashMap<[u8; 32], Module>>,
    live: Mutex<BTreeMap<String, Arc<Plugin>>>,
    stats: Mutex<HashMap<String, Arc<PluginStats>>>,
    pub shared: shared::SharedData,
    pub queues: shared::SharedQueues,
    pub metrics: PluginMetrics,
    queue_ready: Mutex<Vec<(String, u32)>>,
    /// Wakes the timers thread: a queue notification, or a tick period newly set.
    wake_timers: tokio::sync::Notify,
    http: reqwest::Client,
    state: OnceLock<Arc<ArcSwap<Snapshot>>>,
    background: OnceLock<()>,
}

pub fn host() -> &'static Host {
    static H: OnceLock<Host> = OnceLock::new();
    H.get_or_init(|| {
        let mut cfg = wasmtime::Config::new();
        cfg.epoch_interruption(true);
        let engine = Engine::new(&cfg).expect("wasmtime engine with default settings");
        Host {
            engine,
            modules: Mutex::default(),
            live: Mutex::default(),
            stats: Mutex::default(),
            shared: Default::default(),
            queues: Default::default(),
            metrics: Default::default(),
            queue_ready: Mutex::default(),
            wake_timers: tokio::sync::Notify::new(),
            http: reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(16)
                .build()
                .unwrap_or_default(),
            state: OnceLock::new(),
            background: OnceLock::new(),
        }
    })
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

    /// Give the host the live Snapshot handle (callouts resolve pools through it). Called
    /// once when the server starts. The background threads start with the first plugin
    /// (`load`): a tollgate without plugins runs none.
    pub fn attach(&'static self, state: Arc<ArcSwap<Snapshot>>) {
        let _ = self.state.set(state);
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
            let stamp = crate::state::stamp(&spec.file);
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
            Plugin::update_tick(&mut s);
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

    /// The epoch clock (its own thread, so nothing can hold deadlines back; it sleeps while
    /// no guest code runs, see [`Running`]) and a thread with a small runtime for
    /// root-context work: ticks, queue notifications, and the callouts they make.
    fn start_background(&'static self) {
        self.background.get_or_init(|| {
            let clock = std::thread::Builder::new()
                .name("tollgate-wasm-epoch".into())
                .spawn(move || loop {
                    if IN_GUEST.load(SeqCst) == 0 {
                        CLOCK_PARKED.store(true, SeqCst);
                        // a call that starts after this check sees the flag and unparks us
                        if IN_GUEST.load(SeqCst) == 0 {
                            std::thread::park();
                        }
                        CLOCK_PARKED.store(false, SeqCst);
                    }
                    std::thread::sleep(EPOCH_TICK);
                    self.engine.increment_epoch();
                });
            if let Ok(h) = clock {
                let _ = CLOCK.set(h.thread().clone());
            }
            let _ = std::thread::Builder::new()
                .name("tollgate-wasm-timers".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!("plugin timers cannot start: {e}");
                            return;
                        }
                    };
                    rt.block_on(self.timers());
                });
        });
    }

    /// Root-context rounds: due ticks and queue notifications. The thread sleeps until the
    /// next tick is due or something wakes it (a queue notification, a tick period newly
    /// set), and runs at most one round per 10 ms, so notifications come in batches.
    async fn timers(&'static self) {
        const ROUND: Duration = Duration::from_millis(10);
        loop {
            let round = tokio::time::Instant::now();
            let live = self.live();
            let ready: Vec<(String, u32)> =
                std::mem::take(&mut *self.queue_ready.lock().unwrap_or_else(|e| e.into_inner()));
            for (owner, id) in ready {
                if let Some(p) = live.get(&owner) {
                    // the first running instance hears it (any can dequeue)
                    if let Some(i) = (0..p.slots.len()).find(|i| p.lock(*i).vm.is_some()) {
                        self.root_call(p, i, RootCall::QueueReady(id));
                    }
                }
            }
            let now = Instant::now();
            for p in live.values() {
                for i in 0..p.slots.len() {
                    let due = p.lock(i).next_tick.is_some_and(|t| t <= now);
                    if due {
                        self.root_call(p, i, RootCall::Tick);
                    }
                }
            }
            // sleep until the next tick due (the ticks just run have set theirs)
            let next_tick = live
                .values()
                .flat_map(|p| (0..p.slots.len()).filter_map(|i| p.lock(i).next_tick))
                .min();
            let idle = next_tick.map_or(Duration::from_secs(60), |t| {
                t.saturating_duration_since(Instant::now())
            });
            tokio::select! {
                _ = self.wake_timers.notified() => {}
                _ = tokio::time::sleep(idle) => {}
            }
            tokio::time::sleep_until(round + ROUND).await;
        }
    }

    /// Call a root-context callback on slot `i` (from the timers thread); callouts it makes
    /// run on that thread's runtime and are answered to the root context.
    fn root_call(&'static self, p: &Arc<Plugin>, i: usize, what: RootCall) {
        let callouts = {
            let mut slot = p.lock(i);
            if slot.vm.is_none() {
                return;
            }
            let gen = slot.gen;
            let vm = slot.vm.as_mut().expect("checked above");
            vm.store.data_mut().effective = ROOT_ID;
            let r = match &what {
                RootCall::Tick => vm
                    .call_export(|e| e.on_tick.as_ref(), ROOT_ID as i32)
                    .map(drop),
                RootCall::QueueReady(id) => vm
                    .call_export(|e| e.on_queue_ready.as_ref(), (ROOT_ID as i32, *id as i32))
                    .map(drop),
                RootCall::Response(token, resp) => deliver_response(vm, *token, resp.clone()),
            };
            let callouts = vm.take_callouts();
            vm.store.data_mut().callout_response = None;
            if let RootCall::Tick = what {
                let period = vm.store.data().tick_period;
                slot.next_tick = period.map(|p| Instant::now() + p);
            }
            if let Err(f) = r {
                p.fail(&mut slot, &f);
                return;
            }
            Plugin::update_tick(&mut slot);
            callouts.into_iter().map(|c| (gen, c)).collect::<Vec<_>>()
        };
        for (gen, c) in callouts {
            let p = p.clone();
            tokio::spawn(async move {
                let token = c.token;
                let resp = host().run_callout(&p, c).await;
                if p.lock(i).gen == gen {
                    host().root_call(&p, i, RootCall::Response(token, resp));
                }
            });
        }
    }

    /// Run one HTTP callout against a backend of the named pool. A failure is answered
    /// as Envoy does: no headers and no body (the plugin sees no `:status`).
    async fn run_callout(&self, p: &Plugin, c: vm::Callout) -> vm::CalloutResponse {
        p.stats.callouts.fetch_add(1, Relaxed);
        let failed = |why: String| {
            p.stats.callout_failures.fetch_add(1, Relaxed);
            tracing::warn!(plugin = %p.spec.name, pool = %c.pool, "HTTP callout failed: {why}");
            vm::CalloutResponse::default()
        };
        let Some(state) = self.state.get() else {
            return failed("the server is not running".into());
        };
        let snap = state.load_full();
        let Some(pool) = snap.pools.iter().find(|x| x.name == c.pool) else {
            return failed("the pool no longer exists".into());
        };
        let Some(b) = pool.select(crate::upstream::now_ms(), &[]) else {
            return failed("the pool has no available backend".into());
        };
        let addr = pool.backends[b].address;
        let Ok(method) = reqwest::Method::from_bytes(c.method.as_bytes()) else {
            return failed(format!("bad method {}", c.method));
        };
        let mut req = self
            .http
            .request(method, format!("http://{addr}{}", c.path))
            .timeout(c.timeout)
            .header("host", c.authority.as_str());
        for (k, v) in &c.headers {
            req = req.header(k.as_str(), v.as_slice());
        }
        if !c.body.is_empty() {
            req = req.body(c.body.clone());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return failed(format!("{e}")),
        };
        let mut headers = vec![(
            ":status".to_string(),
            resp.status().as_str().as_bytes().to_vec(),
        )];
        headers.extend(
            resp.headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec())),
        );
        const MAX_BODY: usize = 4 << 20;
        let mut body = Vec::new();
        let mut resp = resp;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_BODY {
                        return failed("answer body over 4 MiB".into());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return failed(format!("{e}")),
            }
        }
        vm::CalloutResponse { headers, body }
    }
}

enum RootCall {
    Tick,
    QueueReady(u32),
    Response(u32, vm::CalloutResponse),
}

/// Hand a callout's answer to the root context (the SDKs route it to the context that
/// dispatched it, switching with proxy_set_effective_context).
fn deliver_response(vm: &mut Vm, token: u32, resp: vm::CalloutResponse) -> Result<(), Fault> {
    if vm.exports.on_http_call_response.is_none() {
        return Ok(());
    }
    let nh = resp.headers.len() as i32;
    let nb = resp.body.len() as i32;
    let st = vm.store.data_mut();
    st.callout_response = Some(resp);
    st.effective = ROOT_ID;
    let r = vm
        .call_export(
            |e| e.on_http_call_response.as_ref(),
            (ROOT_ID as i32, token as i32, nh, nb, 0),
        )
        .map(drop);
    vm.store.data_mut().callout_response = None;
    r
}
