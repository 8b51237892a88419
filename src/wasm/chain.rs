//! A request's plugin chain: one HTTP context per plugin, created on the instance of the
//! worker thread the request started on, driven through the phases in config order
//! (responses in reverse order, as Envoy runs encoder filters). A pause is settled here:
//! the callouts it dispatched run, their answers go to the root context, and the request
//! resumes when the plugin continues it or answers it itself.

use super::vm::{Callout, LocalResponse, StreamData, Vm};
use super::{deliver_response, Fault, Plugin, Plugins};
use crate::config::OnError;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use std::cell::RefCell;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, LazyLock};

/// The most body a chain buffers while a plugin pauses body processing.
pub const MAX_BUFFER: usize = 8 << 20;

/// What the proxy must do after a phase.
#[derive(Debug)]
pub enum Verdict {
    Continue,
    /// A plugin answered the request itself.
    Respond(LocalResponse),
    /// A plugin failed and its policy is fail_closed: answer 500.
    Fail {
        plugin: String,
        fault: Fault,
    },
    /// A plugin reset the stream: close the connection without an answer.
    Reset {
        plugin: String,
    },
    /// The body a plugin holds back grew past `MAX_BUFFER`.
    TooLarge {
        plugin: String,
    },
}

/// Plugin `i`'s HTTP context (the plugin is `Chain::plugins[i]`).
struct Stream {
    slot: usize,
    gen: u64,
    ctx: u32,
    /// False once the plugin failed open (it is skipped for the rest of the request).
    active: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
}

pub struct Chain {
    streams: Vec<Stream>,
    plugins: Plugins,
    /// What any plugin of the chain listens to (phases nobody listens to are skipped).
    listens: super::Listens,
    data: Option<Box<StreamData>>,
    pools: super::vm::CalloutPools,
    finished: bool,
    /// The headers ended the request / response: there is no body to call plugins with
    /// (Envoy calls no body callback then either).
    req_ended: bool,
    resp_ended: bool,
    /// Made by `lent` (its stream data holds a placeholder between phases): may be kept
    /// for another request by `recycle`.
    spare: bool,
}

/// Chains kept per worker thread for the next requests (`Chain::lent`, `Chain::recycle`).
const SPARES: usize = 64;

thread_local! {
    // boxed: the box itself is what is reused (a request's chain lives in one)
    #[allow(clippy::vec_box)]
    static SPARE: RefCell<Vec<Box<Chain>>> = const { RefCell::new(Vec::new()) };
}

/// What a spare holds instead of its last request's plugins and pools (so that a plugin a
/// reload removed is not kept alive by an idle worker's spare).
static NONE: LazyLock<(Plugins, super::vm::CalloutPools)> =
    LazyLock::new(|| (Arc::from(Vec::new()), Arc::new(Vec::new())));

fn listens(plugins: &[Arc<Plugin>]) -> super::Listens {
    plugins
        .iter()
        .fold(super::Listens::default(), |a, p| super::Listens {
            response_headers: a.response_headers || p.listens.response_headers,
            response_body: a.response_body || p.listens.response_body,
            log: a.log || p.listens.log,
        })
}

impl Chain {
    /// A chain over `data` (which holds the request header itself, or a placeholder the
    /// session's header is swapped with in each phase).
    pub fn new(
        plugins: impl Into<Plugins>,
        data: impl Into<Box<StreamData>>,
        pools: super::vm::CalloutPools,
    ) -> Chain {
        let plugins = plugins.into();
        Chain {
            streams: Vec::with_capacity(plugins.len()),
            listens: listens(&plugins),
            plugins,
            data: Some(data.into()),
            pools,
            finished: false,
            req_ended: false,
            resp_ended: false,
            spare: false,
        }
    }

    /// A chain for a request whose header the session lends in each phase: one this worker
    /// thread kept from an earlier request (`recycle`), or a new one. Its request info is
    /// the caller's to fill (the strings keep their allocations from request to request).
    pub fn lent(plugins: &Plugins, pools: &super::vm::CalloutPools) -> Box<Chain> {
        if let Some(mut c) = SPARE.with(|s| s.borrow_mut().pop()) {
            c.listens = listens(plugins);
            c.plugins = plugins.clone();
            c.pools = pools.clone();
            return c;
        }
        let placeholder =
            RequestHeader::build_no_case("GET", b"/", Some(0)).expect("a constant request line");
        let mut c = Box::new(Chain::new(
            plugins.clone(),
            StreamData::new(Default::default(), placeholder),
            pools.clone(),
        ));
        c.spare = true;
        c
    }

    /// End the request (if `finish` has not) and keep the chain for this thread's next
    /// request: its allocations (the chain, the stream data, the request info's strings,
    /// small body buffers) are reused; anything of this request a plugin could read is
    /// cleared, and the plugins and pools are let go.
    pub fn recycle(mut self: Box<Self>) {
        self.finish(None);
        if !self.spare || self.data.is_none() {
            return;
        }
        self.streams.clear();
        self.finished = false;
        self.req_ended = false;
        self.resp_ended = false;
        (self.plugins, self.pools) = (NONE.0.clone(), NONE.1.clone());
        let d = self.data_mut();
        d.reset();
        SPARE.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARES {
                s.push(self);
            }
        });
    }

    /// Swap the live request header (`req`, the session's) with the chain's placeholder:
    /// before a phase the plugins get the real one, after it the session gets it back, with
    /// whatever plugins changed. No copy either way.
    fn swap_req(&mut self, req: &mut RequestHeader) {
        std::mem::swap(&mut self.data_mut().req, req);
    }

    pub fn data(&self) -> &StreamData {
        self.data
            .as_deref()
            .expect("stream data is always returned after a call")
    }

    /// Does a plugin of the chain export `proxy_on_log` (and so may read the response
    /// headers there)?
    pub fn listens_to_log(&self) -> bool {
        self.listens.log
    }

    pub fn data_mut(&mut self) -> &mut StreamData {
        self.data
            .as_deref_mut()
            .expect("stream data is always returned after a call")
    }

    /// Run a callback of plugin `i` with the stream loaded; returns its result and the
    /// callouts it dispatched. A fault discards the instance.
    fn call(
        &mut self,
        i: usize,
        f: impl FnOnce(&mut Vm, u32) -> Result<i32, Fault>,
    ) -> Result<(i32, Vec<Callout>), Fault> {
        let s = &self.streams[i];
        let p = &self.plugins[i];
        p.stats.calls.fetch_add(1, Relaxed);
        let mut slot = p.lock(s.slot);
        if slot.gen != s.gen || slot.vm.is_none() {
            let f = Fault::Lost("the instance this request started on was discarded".into());
            p.stats.fault(&f);
            return Err(f);
        }
        let vm = slot.vm.as_mut().expect("checked above");
        vm.load(s.ctx, &mut self.data, &self.pools);
        let r = f(vm, s.ctx);
        let callouts = vm.take_callouts();
        vm.unload(&mut self.data);
        match r {
            Ok(v) => {
                p.update_tick(&mut slot);
                Ok((v, callouts))
            }
            Err(fault) => {
                p.fail(&mut slot, &fault);
                Err(fault)
            }
        }
    }

    /// Create the HTTP context of every plugin (lazily, on the first phase).
    fn open(&mut self, i: usize) -> Result<(), Fault> {
        let p = &self.plugins[i];
        let slot_i = p.my_slot();
        let mut slot = p.lock(slot_i);
        if let Err(f) = p.ensure(&mut slot) {
            p.stats.fault(&f);
            return Err(f);
        }
        let vm = slot.vm.as_mut().expect("ensured above");
        match vm.new_context() {
            Ok(ctx) => {
                let gen = slot.gen;
                self.streams.push(Stream {
                    slot: slot_i,
                    gen,
                    ctx,
                    active: true,
                });
                Ok(())
            }
            Err(f) => {
                p.fail(&mut slot, &f);
                Err(f)
            }
        }
    }

    /// Apply the plugin's `on_error` policy to a fault.
    fn policy(&mut self, i: usize, fault: Fault) -> Option<Verdict> {
        let name = self.plugins[i].spec.name.clone();
        if let Fault::Stuck(_) = fault {
            // (traps and deadlines were counted when the instance was discarded)
            self.plugins[i].stats.fault(&fault);
        }
        match self.plugins[i].spec.on_error {
            OnError::FailClosed => Some(Verdict::Fail {
                plugin: name,
                fault,
            }),
            OnError::FailOpen => {
                tracing::warn!(plugin = %name, "plugin {fault}; skipped for this request (on_error = fail_open)");
                if let Some(s) = self.streams.get_mut(i) {
                    s.active = false;
                }
                None
            }
        }
    }

    /// Settle what a callback asked for: a local answer, a reset, or a pause that waits on
    /// callouts. `Ok(true)`: the plugin let the phase go on.
    async fn settle(
        &mut self,
        i: usize,
        phase: Phase,
        action: i32,
        mut callouts: Vec<Callout>,
    ) -> Result<Option<Verdict>, Fault> {
        let mut paused = action != super::abi::ACTION_CONTINUE;
        loop {
            if let Some(v) = self.answer(i) {
                return Ok(Some(v));
            }
            let resumed = match phase {
                Phase::RequestHeaders | Phase::RequestBody => self.data().continue_request,
                _ => self.data().continue_response,
            };
            if resumed {
                paused = false;
            }
            if callouts.is_empty() {
                if paused && matches!(phase, Phase::RequestHeaders | Phase::ResponseHeaders) {
                    return Err(Fault::Stuck(
                        "paused the request with nothing pending that can resume it".into(),
                    ));
                }
                return Ok(None);
            }
            let plugin = self.plugins[i].clone();
            let runs = callouts.drain(..).map(|c| {
                let plugin = plugin.clone();
                async move {
                    let token = c.token;
                    (token, plugin.host.run_callout(&plugin, c).await)
                }
            });
            // callouts of one pause run together: their latencies do not add up
            let answers = futures_util::future::join_all(runs).await;
            for (token, resp) in answers {
                let (_, more) =
                    self.call(i, |vm, _ctx| deliver_response(vm, token, resp).map(|_| 0))?;
                callouts.extend(more);
                if self.data().local.is_some() || self.data().reset {
                    break;
                }
            }
        }
    }

    fn answer(&mut self, i: usize) -> Option<Verdict> {
        let name = self.plugins[i].spec.name.clone();
        let d = self.data_mut();
        if d.reset {
            return Some(Verdict::Reset { plugin: name });
        }
        let local = d.local.take()?;
        self.plugins[i].stats.local_responses.fetch_add(1, Relaxed);
        Some(Verdict::Respond(local))
    }

    /// on_request_headers for every plugin, in order.
    pub async fn request_headers(
        &mut self,
        req: &mut RequestHeader,
        end_of_stream: bool,
    ) -> Verdict {
        self.req_ended = end_of_stream;
        self.swap_req(req);
        let v = self.request_headers_inner(end_of_stream).await;
        self.swap_req(req);
        v
    }

    async fn request_headers_inner(&mut self, end_of_stream: bool) -> Verdict {
        for i in 0..self.plugins.len() {
            if let Err(f) = self.open(i) {
                // No context: the plugin cannot see this request at all.
                self.streams.push(Stream {
                    slot: 0,
                    gen: u64::MAX,
                    ctx: 0,
                    active: false,
                });
                match self.policy(i, f) {
                    Some(v) => return v,
                    None => continue,
                }
            }
            let n = self.data().req.headers.len() + 4;
            if let Some(v) = self
                .headers(i, Phase::RequestHeaders, n, end_of_stream)
                .await
            {
                return v;
            }
        }
        Verdict::Continue
    }

    /// One plugin's on_request_headers / on_response_headers (`n` headers), its pause
    /// settled; `Some` when the phase must stop with that verdict.
    async fn headers(&mut self, i: usize, phase: Phase, n: usize, eos: bool) -> Option<Verdict> {
        let request = phase == Phase::RequestHeaders;
        if request {
            self.data_mut().continue_request = false;
        } else {
            self.data_mut().continue_response = false;
        }
        let (n, eos) = (n as i32, eos as i32);
        let r = self.call(i, |vm, ctx| {
            let args = (ctx as i32, n, eos);
            let r = if request {
                vm.call_export(|e| e.on_request_headers.as_ref(), args)
            } else {
                vm.call_export(|e| e.on_response_headers.as_ref(), args)
            };
            r.map(|a| a.unwrap_or(super::abi::ACTION_CONTINUE))
        });
        let r = match r {
            Ok((a, c)) => self.settle(i, phase, a, c).await,
            Err(f) => Err(f),
        };
        match r {
            Ok(v) => v,
            Err(f) => self.policy(i, f),
        }
    }

    /// on_request_body: `chunk` is appended to the chain's buffer; a plugin that pauses
    /// before the end of the body makes the chain hold the buffer back (Envoy's
    /// StopIterationAndBuffer) and see it again, grown, with the next chunk.
    pub async fn request_body(
        &mut self,
        req: &mut RequestHeader,
        chunk: &mut Option<Bytes>,
        end_of_stream: bool,
    ) -> Verdict {
        if self.req_ended || (chunk.is_none() && !end_of_stream) {
            return Verdict::Continue;
        }
        self.swap_req(req);
        let v = self.body(chunk, end_of_stream, Phase::RequestBody).await;
        self.swap_req(req);
        v
    }

    async fn body(&mut self, chunk: &mut Option<Bytes>, eos: bool, phase: Phase) -> Verdict {
        let request = phase == Phase::RequestBody;
        {
            let d = self.data_mut();
            let buf = if request {
                &mut d.req_body
            } else {
                &mut d.resp_body
            };
            if let Some(c) = chunk.take() {
                buf.extend_from_slice(&c);
            }
        }
        let n = self.streams.len();
        for k in 0..n {
            // requests in chain order, responses in reverse
            let i = if request { k } else { n - 1 - k };
            if !self.streams[i].active {
                continue;
            }
            let size = if request {
                self.data().req_body.len()
            } else {
                self.data().resp_body.len()
            };
            if size > MAX_BUFFER {
                return Verdict::TooLarge {
                    plugin: self.plugins[i].spec.name.clone(),
                };
            }
            let (size, eos_i) = (size as i32, eos as i32);
            let r = self.call(i, |vm, ctx| {
                let args = (ctx as i32, size, eos_i);
                let r = if request {
                    vm.call_export(|e| e.on_request_body.as_ref(), args)
                } else {
                    vm.call_export(|e| e.on_response_body.as_ref(), args)
                };
                r.map(|a| a.unwrap_or(super::abi::ACTION_CONTINUE))
            });
            let r = match r {
                Ok((a, c)) if request => self.settle(i, phase, a, c).await.map(|v| (a, v)),
                Ok((a, c)) => {
                    if !c.is_empty() {
                        Err(Fault::Stuck("dispatched an HTTP callout from on_response_body, which tollgate does not support".into()))
                    } else {
                        Ok((a, self.answer(i)))
                    }
                }
                Err(f) => Err(f),
            };
            match r {
                Ok((_, Some(v))) => return v,
                Ok((a, None)) => {
                    let resumed = if request {
                        self.data().continue_request
                    } else {
                        self.data().continue_response
                    };
                    if a != super::abi::ACTION_CONTINUE && !eos && !resumed {
                        // hold the body back (in the buffer) until the plugin lets it through
                        return Verdict::Continue;
                    }
                }
                Err(f) => {
                    if let Some(v) = self.policy(i, f) {
                        return v;
                    }
                }
            }
        }
        let d = self.data_mut();
        let buf = if request {
            &mut d.req_body
        } else {
            &mut d.resp_body
        };
        if !buf.is_empty() {
            *chunk = Some(Bytes::from(std::mem::take(buf)));
        }
        Verdict::Continue
    }

    /// on_response_headers, in reverse order. `resp` is the upstream's answer (or
    /// tollgate's own); plugin changes are written back into it.
    pub async fn response_headers(
        &mut self,
        req: &mut RequestHeader,
        resp: &mut ResponseHeader,
        end_of_stream: bool,
    ) -> Verdict {
        self.resp_ended = end_of_stream;
        if !self.listens.response_headers {
            return Verdict::Continue;
        }
        // the upstream's header is lent like the request's: swapped in, then back
        self.data_mut().lend_resp(resp);
        self.swap_req(req);
        let v = self.response_headers_inner().await;
        self.swap_req(req);
        self.data_mut().return_resp(resp);
        v
    }

    async fn response_headers_inner(&mut self) -> Verdict {
        let end_of_stream = self.resp_ended;
        for i in (0..self.streams.len()).rev() {
            if !self.streams[i].active {
                continue;
            }
            let n = self
                .data()
                .resp
                .as_ref()
                .map(|r| r.headers.len())
                .unwrap_or(0)
                + 1;
            if let Some(v) = self
                .headers(i, Phase::ResponseHeaders, n, end_of_stream)
                .await
            {
                return v;
            }
        }
        Verdict::Continue
    }

    /// on_response_body, in reverse order. Synchronous (pingora's body filter is), so a
    /// callout here is a fault.
    pub fn response_body(
        &mut self,
        req: &mut RequestHeader,
        chunk: &mut Option<Bytes>,
        end_of_stream: bool,
    ) -> Verdict {
        if self.resp_ended || !self.listens.response_body || (chunk.is_none() && !end_of_stream) {
            return Verdict::Continue;
        }
        self.swap_req(req);
        // The body phase never awaits for responses: no callouts are run there.
        let v = poll_ready(self.body(chunk, end_of_stream, Phase::ResponseBody))
            .unwrap_or(Verdict::Continue);
        self.swap_req(req);
        v
    }

    /// on_done, on_log, then on_delete: the end of every context.
    pub fn finish(&mut self, req: Option<&mut RequestHeader>) {
        match req {
            Some(req) => {
                self.swap_req(req);
                self.finish_inner();
                self.swap_req(req);
            }
            None => self.finish_inner(),
        }
    }

    fn finish_inner(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        if let Some(d) = self.data.as_deref_mut() {
            d.done = true;
        }
        for i in 0..self.streams.len() {
            if self.streams[i].ctx == 0 {
                continue;
            }
            let active = self.streams[i].active;
            // the ABI's order: done, then log ("proxy_on_log occurs after
            // proxy_on_done", the C++ SDK's header), then delete
            let _ = self.call(i, |vm, ctx| {
                vm.call_export(|e| e.on_done.as_ref(), ctx as i32)?;
                if active {
                    vm.call_export(|e| e.on_log.as_ref(), ctx as i32)?;
                }
                vm.call_export(|e| e.on_delete.as_ref(), ctx as i32)?;
                Ok(0)
            });
        }
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        // A request that ended before logging (a dropped connection) still frees its
        // contexts, or the plugin's per-context state would grow without end.
        if !self.finished {
            self.finish(None);
        }
    }
}

/// Poll a future that never waits (the response body path runs no callouts).
fn poll_ready<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}
