//! The host's background work: the epoch clock's thread and the timers thread (root-context
//! ticks, queue notifications), and HTTP callouts to pools (from requests and root
//! contexts) with their answers delivered back to the plugin.

use super::*;

impl Host {
    /// The epoch clock (its own thread, so nothing can hold deadlines back; it sleeps while
    /// no guest code runs, see [`Running`]) and a thread with a small runtime for
    /// root-context work: ticks, queue notifications, and the callouts they make.
    pub(super) fn start_background(&'static self) {
        self.background.get_or_init(|| {
            let clock = std::thread::Builder::new()
                .name("tollgate-wasm-epoch".into())
                .spawn(move || loop {
                    let c = &self.clock;
                    if c.in_guest.load(SeqCst) == 0 {
                        c.parked.store(true, SeqCst);
                        // a call that starts after this check sees the flag and unparks us
                        if c.in_guest.load(SeqCst) == 0 {
                            std::thread::park();
                        }
                        c.parked.store(false, SeqCst);
                    }
                    std::thread::sleep(EPOCH_TICK);
                    self.engine.increment_epoch();
                });
            if let Ok(h) = clock {
                let _ = self.clock.thread.set(h.thread().clone());
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
    pub(super) async fn timers(&'static self) {
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
    pub(super) fn root_call(&'static self, p: &Arc<Plugin>, i: usize, what: RootCall) {
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
            p.update_tick(&mut slot);
            callouts.into_iter().map(|c| (gen, c)).collect::<Vec<_>>()
        };
        for (gen, c) in callouts {
            let p = p.clone();
            tokio::spawn(async move {
                let token = c.token;
                let resp = self.run_callout(&p, c).await;
                if p.lock(i).gen == gen {
                    self.root_call(&p, i, RootCall::Response(token, resp));
                }
            });
        }
    }

    /// Run one HTTP callout against a backend of the named pool. A failure is answered
    /// as Envoy does: no headers and no body (the plugin sees no `:status`).
    pub(super) async fn run_callout(&self, p: &Plugin, c: vm::Callout) -> vm::CalloutResponse {
        p.stats.callouts.fetch_add(1, Relaxed);
        let failed = |why: String| {
            p.stats.callout_failures.fetch_add(1, Relaxed);
            tracing::warn!(plugin = %p.spec.name, pool = %c.pool, "HTTP callout failed: {why}");
            vm::CalloutResponse::default()
        };
        let Some(lookup) = self.pools.get() else {
            return failed("the server is not running".into());
        };
        let Some(pool) = lookup(&c.pool) else {
            return failed("the pool no longer exists".into());
        };
        let Some(b) = pool.select(crate::clock::now_ms(), &[]) else {
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

pub(super) enum RootCall {
    Tick,
    QueueReady(u32),
    Response(u32, vm::CalloutResponse),
}

/// Hand a callout's answer to the root context (the SDKs route it to the context that
/// dispatched it, switching with proxy_set_effective_context).
pub(super) fn deliver_response(
    vm: &mut Vm,
    token: u32,
    resp: vm::CalloutResponse,
) -> Result<(), Fault> {
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
