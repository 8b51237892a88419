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

    /// Run one HTTP callout against a backend of its pool: the pool of the request's
    /// Snapshot (a root context's: the live one), reached exactly as proxied requests reach
    /// it (`upstream::peer`: protocol, TLS with the pool's CA and server name, client
    /// certificate, HTTP/2), through pingora's connector. A failure is answered as Envoy
    /// does: no headers and no body (the plugin sees no `:status`).
    pub(super) async fn run_callout(&self, p: &Plugin, c: vm::Callout) -> vm::CalloutResponse {
        p.stats.callouts.fetch_add(1, Relaxed);
        let failed = |why: String| {
            p.stats.callout_failures.fetch_add(1, Relaxed);
            tracing::warn!(plugin = %p.spec.name, pool = %c.pool, "HTTP callout failed: {why}");
            vm::CalloutResponse::default()
        };
        let pool = match &c.resolved {
            Some(pool) => pool.clone(),
            None => {
                let Some(lookup) = self.pools.get() else {
                    return failed("the server is not running".into());
                };
                let Some(pool) = lookup(&c.pool) else {
                    return failed("the pool no longer exists".into());
                };
                pool
            }
        };
        let Some(b) = pool.select(crate::clock::now_ms(), &[]) else {
            return failed("the pool has no available backend".into());
        };
        let peer = crate::upstream::peer::http_peer(&pool, b);
        match tokio::time::timeout(c.timeout, callout(&self.connector, &pool, &peer, &c)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => failed(e),
            Err(_) => failed(format!("no answer within {:?}", c.timeout)),
        }
    }
}

/// The most of a callout's answer body a plugin is handed.
const CALLOUT_MAX_BODY: usize = 4 << 20;

/// One callout over a pingora session to `peer` (HTTP/1.1 or HTTP/2 as the pool speaks);
/// the connection goes back to the pool when the answer was read whole.
async fn callout(
    conn: &pingora::connectors::http::Connector,
    pool: &crate::upstream::Pool,
    peer: &pingora::upstreams::peer::HttpPeer,
    c: &vm::Callout,
) -> Result<vm::CalloutResponse, String> {
    let e = |e: Box<pingora::Error>| e.to_string();
    let (mut session, _) = conn.get_http_session(peer).await.map_err(e)?;
    let mut req = pingora::http::RequestHeader::build(c.method.as_str(), c.path.as_bytes(), None)
        .map_err(e)?;
    if session.as_http2().is_some() {
        // HTTP/2 carries the authority in the request target, not in a Host header
        let scheme = if peer.is_tls() { "https" } else { "http" };
        let uri = http::Uri::builder()
            .scheme(scheme)
            .authority(c.authority.as_str())
            .path_and_query(c.path.as_str())
            .build()
            .map_err(|err| format!("bad :authority or :path: {err}"))?;
        req.set_uri(uri);
    } else {
        req.insert_header(http::header::HOST, c.authority.as_str())
            .map_err(e)?;
    }
    for (k, v) in &c.headers {
        if k == "host" || k == "content-length" || k == "transfer-encoding" {
            continue;
        }
        req.append_header(k.clone(), v.as_slice()).map_err(e)?;
    }
    if !c.body.is_empty() || !matches!(c.method.as_str(), "GET" | "HEAD" | "DELETE" | "OPTIONS") {
        req.insert_header(http::header::CONTENT_LENGTH, c.body.len())
            .map_err(e)?;
    }
    session
        .write_request_header(Box::new(req))
        .await
        .map_err(e)?;
    if !c.body.is_empty() {
        session
            .write_request_body(bytes::Bytes::from(c.body.clone()), true)
            .await
            .map_err(e)?;
    }
    session.finish_request_body().await.map_err(e)?;
    session.read_response_header().await.map_err(e)?;
    let head = session.response_header().ok_or("no answer header")?.clone();
    let mut headers = vec![(
        ":status".to_string(),
        head.status.as_str().as_bytes().to_vec(),
    )];
    headers.extend(
        head.headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec())),
    );
    let mut body = Vec::new();
    while let Some(chunk) = session.read_response_body().await.map_err(e)? {
        if body.len() + chunk.len() > CALLOUT_MAX_BODY {
            return Err("answer body over 4 MiB".into());
        }
        body.extend_from_slice(&chunk);
    }
    if session.response_done() {
        conn.release_http_session(session, peer, Some(pool.spec.idle_timeout))
            .await;
    }
    Ok(vm::CalloutResponse { headers, body })
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
