//! One plugin instance (a "VM" in proxy-wasm terms): a wasmtime Store with the host state the
//! hostcalls read and write, its exported callbacks, and the call wrapper that applies the
//! CPU deadline and turns every trap into a `Fault`.

use super::abi::{self, MapType};
use super::{Host, PluginSpec};
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use wasmtime::{InstancePre, Memory, Store, StoreLimits, StoreLimitsBuilder, Trap, TypedFunc};

/// The root context of every instance. One plugin per instance, so one root.
pub const ROOT_ID: u32 = 1;

/// What a request exposes to plugins as properties. Kept with its chain between requests
/// (`Chain::lent`): the strings are refilled in place, without allocating.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    pub tls_version: Option<Cow<'static, str>>,
    /// The server name the client asked for (empty: none, or not TLS).
    pub sni: String,
    pub tls: bool,
    pub request_id: String,
    /// The route's names, made once per route when the Snapshot is built.
    pub route: Arc<RouteNames>,
    pub protocol: &'static str,
    pub start_unix_ns: u64,
}

/// The names of a route plugins can read (`route_name`, `vhost`, `cluster_name`).
#[derive(Debug, Clone, Default)]
pub struct RouteNames {
    pub route_name: String,
    pub vhost: String,
    pub pool: String,
}

/// A response a plugin asked tollgate to send instead of proxying.
#[derive(Debug, Clone)]
pub struct LocalResponse {
    pub status: u16,
    pub details: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
    /// The gRPC status a gRPC client sees (`proxy_send_local_response`'s `grpc_status`;
    /// `None`: mapped from `status`).
    pub grpc_status: Option<u32>,
}

/// Everything about one request that plugins can see or change. It moves into the Store of
/// whichever plugin is being called and back out afterwards.
pub struct StreamData {
    pub info: RequestInfo,
    /// The request header while a phase runs (lent by the session); a placeholder between
    /// phases (see `Chain`).
    pub req: RequestHeader,
    /// The response header during on_response_headers (lent), or a copy for on_log.
    pub resp: Option<ResponseHeader>,
    pub req_body: Vec<u8>,
    pub resp_body: Vec<u8>,
    pub local: Option<LocalResponse>,
    pub continue_request: bool,
    pub continue_response: bool,
    /// A plugin asked to reset the stream.
    pub reset: bool,
    /// Properties plugins set (filter-state style), visible to later plugins.
    pub props: HashMap<String, Vec<u8>>,
    /// What the session holds while its response header is lent (`lend_resp`), kept from
    /// request to request.
    spare_resp: Option<ResponseHeader>,
    /// on_done / on_log run: the request is over, header edits are accepted and dropped
    /// (nothing is sent any more, and the access log must show what was sent).
    pub done: bool,
}

impl StreamData {
    /// `req` is the request header the chain holds between phases: the real one is lent
    /// by the session for each phase (pass a placeholder), or, with no session (tests,
    /// benchmarks), the header itself.
    pub fn new(info: RequestInfo, req: RequestHeader) -> StreamData {
        StreamData {
            info,
            req,
            resp: None,
            req_body: Vec::new(),
            resp_body: Vec::new(),
            local: None,
            continue_request: false,
            continue_response: false,
            reset: false,
            props: HashMap::new(),
            spare_resp: None,
            done: false,
        }
    }

    /// Lend plugins the session's response header: it moves here (`resp`), and a
    /// placeholder kept from earlier requests takes its place until `return_resp`. No copy.
    pub fn lend_resp(&mut self, resp: &mut ResponseHeader) {
        let placeholder = match self.spare_resp.take() {
            Some(p) => p,
            None => ResponseHeader::build_no_case(200, Some(0)).expect("a constant status"),
        };
        self.resp = Some(std::mem::replace(resp, placeholder));
    }

    /// Give the lent response header back (with what plugins changed).
    pub fn return_resp(&mut self, resp: &mut ResponseHeader) {
        if let Some(r) = self.resp.take() {
            self.spare_resp = Some(std::mem::replace(resp, r));
        }
    }

    /// Clear what the last request left (keeping small buffers' allocations) for the next
    /// one: the info is refilled by the caller, the request header is the placeholder.
    pub(crate) fn reset(&mut self) {
        /// Body buffers larger than this are let go rather than kept.
        const KEEP: usize = 64 << 10;
        for b in [&mut self.req_body, &mut self.resp_body] {
            if b.capacity() > KEEP {
                *b = Vec::new();
            } else {
                b.clear();
            }
        }
        if self.props.capacity() > 64 {
            self.props = HashMap::new();
        } else {
            self.props.clear();
        }
        self.info.request_id.clear();
        self.info.sni.clear();
        self.resp = None;
        self.done = false;
        self.local = None;
        self.continue_request = false;
        self.continue_response = false;
        self.reset = false;
    }
}

/// The pools a request's callouts may go to: its Snapshot's.
pub type CalloutPools = Arc<Vec<Arc<crate::upstream::Pool>>>;

/// An HTTP callout a plugin dispatched; run by the host after the callback returns.
#[derive(Debug, Clone)]
pub struct Callout {
    pub token: u32,
    pub pool: String,
    /// The pool, from the request's Snapshot (`None` for a root context: looked up in the
    /// live one when the callout runs).
    pub resolved: Option<Arc<crate::upstream::Pool>>,
    pub method: String,
    pub path: String,
    pub authority: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

/// A callout's answer, readable through the call-response map and buffer types.
#[derive(Debug, Clone, Default)]
pub struct CalloutResponse {
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// The Store's data: what hostcalls act on.
pub struct HostState {
    pub spec: Arc<PluginSpec>,
    pub host: &'static Host,
    pub limits: StoreLimits,
    pub memory: Option<Memory>,
    /// In an Arc: `give` clones it for every value it hands over, and cloning a
    /// `TypedFunc` costs several reference counts in wasmtime's type registry.
    pub malloc: Option<Arc<TypedFunc<i32, i32>>>,
    /// The context hostcalls apply to (set_effective_context changes it).
    pub effective: u32,
    /// The HTTP context of the loaded stream (0: none loaded).
    pub stream_ctx: u32,
    pub stream: Option<Box<StreamData>>,
    pub callout_response: Option<CalloutResponse>,
    pub pending_callouts: Vec<Callout>,
    pub next_token: u32,
    pub tick_period: Option<Duration>,
    /// Pools callouts may name (from the Snapshot in force when the call was made).
    pub pools: CalloutPools,
    /// Bytes written to stdout/stderr not yet ending in a newline.
    pub stdout: Vec<u8>,
    /// A value on its way to the guest (a header, a property, shared data), kept between
    /// calls so that handing one over allocates nothing on the host.
    pub scratch: Vec<u8>,
    /// While the instance starts: what the plugin logged (info and above), so that a
    /// refused start can say why (`tollgate check` shows no log).
    pub startup_log: Option<Vec<String>>,
}

impl HostState {
    /// Keep a start-up log line (a few, each bounded) for the error a refused start gives.
    pub fn note_startup_log(&mut self, msg: &str) {
        if let Some(lines) = self.startup_log.as_mut() {
            if lines.len() < 8 {
                let mut m: String = msg.chars().take(400).collect();
                if m.len() < msg.len() {
                    m.push('…');
                }
                lines.push(m);
            }
        }
    }

    /// What the plugin logged while starting, for an error message: `": line; line"`.
    fn startup_reason(&mut self) -> String {
        match self.startup_log.take() {
            Some(lines) if !lines.is_empty() => format!(": {}", lines.join("; ")),
            _ => " (it logged nothing)".to_string(),
        }
    }
}

impl HostState {
    /// The stream the effective context refers to, if it is the loaded HTTP context.
    pub fn stream_mut(&mut self) -> Option<&mut StreamData> {
        if self.effective != 0 && self.effective == self.stream_ctx {
            self.stream.as_deref_mut()
        } else {
            None
        }
    }

    pub fn stream(&self) -> Option<&StreamData> {
        if self.effective != 0 && self.effective == self.stream_ctx {
            self.stream.as_deref()
        } else {
            None
        }
    }

    /// One value of a header map by (lower-case) name, as `map_pairs` would show it (the
    /// first of repeated headers; bytes that are not UTF-8 replaced), without building the
    /// map: `None` when the map or the name is not there.
    pub fn map_value(&self, t: MapType, name: &str) -> Option<Cow<'_, [u8]>> {
        match t {
            MapType::RequestHeaders => {
                let s = self.stream()?;
                if name.starts_with(':') {
                    return request_pseudo_value(&s.req, &s.info, name).map(Cow::Borrowed);
                }
                s.req.headers.get(name).map(|v| lossy(v.as_bytes()))
            }
            MapType::ResponseHeaders => {
                let r = self.stream()?.resp.as_ref()?;
                if name == ":status" {
                    return Some(Cow::Borrowed(r.status.as_str().as_bytes()));
                }
                r.headers.get(name).map(|v| lossy(v.as_bytes()))
            }
            _ => self
                .map_pairs(t)?
                .into_iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| Cow::Owned(v)),
        }
    }

    /// Header pairs of a map, pseudo-headers first. Values that are not UTF-8 are given with
    /// the invalid bytes replaced: the SDKs' string getters panic on them otherwise, and a
    /// panic would poison the instance for every other client.
    pub fn map_pairs(&self, t: MapType) -> Option<Vec<(String, Vec<u8>)>> {
        match t {
            MapType::RequestHeaders => {
                let s = self.stream()?;
                let mut out = request_pseudo(&s.req, &s.info);
                out.extend(
                    s.req
                        .headers
                        .iter()
                        .map(|(k, v)| (k.as_str().to_string(), lossy(v.as_bytes()).into_owned())),
                );
                Some(out)
            }
            MapType::ResponseHeaders => {
                let s = self.stream()?;
                let r = s.resp.as_ref()?;
                let mut out = vec![(":status".to_string(), r.status.as_str().as_bytes().to_vec())];
                out.extend(
                    r.headers
                        .iter()
                        .map(|(k, v)| (k.as_str().to_string(), lossy(v.as_bytes()).into_owned())),
                );
                Some(out)
            }
            MapType::CallResponseHeaders => Some(self.callout_response.as_ref()?.headers.clone()),
            MapType::RequestTrailers | MapType::ResponseTrailers => {
                self.stream().map(|_| Vec::new())
            }
            MapType::CallResponseTrailers => self.callout_response.as_ref().map(|_| Vec::new()),
            MapType::GrpcInitialMetadata | MapType::GrpcTrailingMetadata => None,
        }
    }
}

/// A header value as plugins get it: invalid UTF-8 replaced (header values are ASCII but for
/// obs-text, so it is checked a word at a time first).
fn lossy(v: &[u8]) -> Cow<'_, [u8]> {
    if v.is_ascii() {
        return Cow::Borrowed(v);
    }
    match abi::lossy(v) {
        Cow::Borrowed(b) => Cow::Borrowed(b.as_bytes()),
        Cow::Owned(o) => Cow::Owned(o.into_bytes()),
    }
}

/// The pseudo-headers of a request, as Envoy shows them.
pub fn request_pseudo(req: &RequestHeader, info: &RequestInfo) -> Vec<(String, Vec<u8>)> {
    [":method", ":path", ":authority", ":scheme"]
        .into_iter()
        .map(|n| {
            let v = request_pseudo_value(req, info, n).unwrap_or_default();
            (n.to_string(), v.to_vec())
        })
        .collect()
}

/// One pseudo-header of a request (`request_pseudo`'s), without building the others.
pub fn request_pseudo_value<'a>(
    req: &'a RequestHeader,
    info: &RequestInfo,
    name: &str,
) -> Option<&'a [u8]> {
    Some(match name {
        ":method" => req.method.as_str().as_bytes(),
        ":path" => req
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
        ":authority" => req
            .uri
            .authority()
            .map(|a| a.as_str().as_bytes())
            .or_else(|| req.headers.get("host").map(|h| h.as_bytes()))
            .unwrap_or_default(),
        ":scheme" if info.tls => b"https",
        ":scheme" => b"http",
        _ => return None,
    })
}

/// Why a call into a plugin failed. Every fault discards the instance.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Ran past its CPU deadline.
    Deadline,
    /// A trap: a panic in the plugin, out of memory, a bad pointer given to a hostcall.
    Trap(String),
    /// The instance the request's context lived in is gone (it faulted for another request,
    /// or could not be created).
    Lost(String),
    /// The plugin did something tollgate cannot go on from (paused with nothing pending).
    Stuck(String),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Deadline => write!(f, "ran past its CPU deadline"),
            Fault::Trap(m) => write!(f, "trapped: {m}"),
            Fault::Lost(m) => write!(f, "instance unavailable: {m}"),
            Fault::Stuck(m) => write!(f, "{m}"),
        }
    }
}

/// Run guest code in `store` with a CPU deadline of `ticks` epochs, the epoch clock running.
fn guarded<R>(
    store: &mut Store<HostState>,
    ticks: u64,
    f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
) -> Result<R, Fault> {
    store.set_epoch_deadline(ticks);
    let _running = super::Running::enter(store.data().host);
    f(store).map_err(classify)
}

fn classify(e: wasmtime::Error) -> Fault {
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Fault::Deadline,
        Some(t) => Fault::Trap(t.to_string()),
        None => Fault::Trap(format!("{e:#}")),
    }
}

type F1 = TypedFunc<i32, ()>;
type F2 = TypedFunc<(i32, i32), ()>;
type F2R = TypedFunc<(i32, i32), i32>;
type F3R = TypedFunc<(i32, i32, i32), i32>;
type F5 = TypedFunc<(i32, i32, i32, i32, i32), ()>;

/// The callbacks a module exports. Only `proxy_on_context_create` is required.
pub struct Exports {
    pub on_context_create: F2,
    pub on_vm_start: Option<F2R>,
    pub on_configure: Option<F2R>,
    pub on_request_headers: Option<F3R>,
    pub on_request_body: Option<F3R>,
    pub on_response_headers: Option<F3R>,
    pub on_response_body: Option<F3R>,
    pub on_log: Option<F1>,
    pub on_done: Option<TypedFunc<i32, i32>>,
    pub on_delete: Option<F1>,
    pub on_tick: Option<F1>,
    pub on_queue_ready: Option<F2>,
    pub on_http_call_response: Option<F5>,
}

pub struct Vm {
    pub store: Store<HostState>,
    pub exports: Exports,
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) instance: wasmtime::Instance,
    next_ctx: u32,
    deadline_ticks: u64,
}

impl Vm {
    /// Instantiate and start: `_initialize`, the root context, `proxy_on_vm_start` and
    /// `proxy_on_configure` with the plugin's configuration. Start-up gets a longer deadline
    /// (ten times the per-call one) since modules build their state there.
    pub fn start(
        host: &'static Host,
        spec: Arc<PluginSpec>,
        pre: &InstancePre<HostState>,
    ) -> Result<Vm, String> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(spec.max_memory as usize)
            .instances(1)
            .tables(4)
            .memories(1)
            .build();
        let deadline_ticks = super::deadline_ticks(spec.cpu_deadline);
        let mut store = Store::new(
            host.engine(),
            HostState {
                spec: spec.clone(),
                host,
                limits,
                memory: None,
                malloc: None,
                effective: ROOT_ID,
                stream_ctx: 0,
                stream: None,
                callout_response: None,
                pending_callouts: Vec::new(),
                next_token: 1,
                tick_period: None,
                pools: Arc::new(Vec::new()),
                stdout: Vec::new(),
                scratch: Vec::new(),
                startup_log: Some(Vec::new()),
            },
        );
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(deadline_ticks.saturating_mul(10));
        let instance = {
            // a start function is guest code too
            let _running = super::Running::enter(host);
            pre.instantiate(&mut store)
        }
        .map_err(|e| format!("cannot instantiate: {}", classify(e)))?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or("the module exports no memory named `memory`")?;
        let malloc = instance
            .get_typed_func::<i32, i32>(&mut store, "proxy_on_memory_allocate")
            .or_else(|_| instance.get_typed_func::<i32, i32>(&mut store, "malloc"))
            .map_err(|_| {
                "the module exports neither proxy_on_memory_allocate nor malloc (i32) -> i32"
            })?;
        store.data_mut().memory = Some(memory);
        store.data_mut().malloc = Some(Arc::new(malloc));

        macro_rules! opt {
            ($name:literal) => {
                match instance.get_func(&mut store, $name) {
                    None => None,
                    Some(f) => {
                        Some(f.typed(&store).map_err(|e| {
                            format!("export {} has the wrong signature: {e}", $name)
                        })?)
                    }
                }
            };
        }
        let on_context_create = opt!("proxy_on_context_create")
            .ok_or("the module exports no proxy_on_context_create")?;
        let exports = Exports {
            on_context_create,
            on_vm_start: opt!("proxy_on_vm_start"),
            on_configure: opt!("proxy_on_configure"),
            on_request_headers: opt!("proxy_on_request_headers"),
            on_request_body: opt!("proxy_on_request_body"),
            on_response_headers: opt!("proxy_on_response_headers"),
            on_response_body: opt!("proxy_on_response_body"),
            on_log: opt!("proxy_on_log"),
            on_done: opt!("proxy_on_done"),
            on_delete: opt!("proxy_on_delete"),
            on_tick: opt!("proxy_on_tick"),
            on_queue_ready: opt!("proxy_on_queue_ready"),
            on_http_call_response: opt!("proxy_on_http_call_response"),
        };
        for init in ["_initialize", "_start"] {
            if let Ok(f) = instance.get_typed_func::<(), ()>(&mut store, init) {
                f.call(&mut store, ())
                    .map_err(|e| format!("{init} failed: {}", classify(e)))?;
                break;
            }
        }
        let mut vm = Vm {
            store,
            exports,
            instance,
            next_ctx: ROOT_ID + 1,
            deadline_ticks,
        };
        let create = vm.exports.on_context_create.clone();
        vm.call_long(|s| create.call(s, (ROOT_ID as i32, 0)))
            .map_err(|f| format!("root context creation {f}"))?;
        if let Some(f) = vm.exports.on_vm_start.clone() {
            let n = spec.vm_config.len() as i32;
            let ok = vm
                .call_long(|s| f.call(s, (ROOT_ID as i32, n)))
                .map_err(|f| format!("proxy_on_vm_start {f}"))?;
            if ok == 0 {
                let why = vm.store.data_mut().startup_reason();
                return Err(format!("proxy_on_vm_start returned false{why}"));
            }
        }
        if let Some(f) = vm.exports.on_configure.clone() {
            let n = spec.config.len() as i32;
            let ok = vm
                .call_long(|s| f.call(s, (ROOT_ID as i32, n)))
                .map_err(|f| format!("proxy_on_configure {f}"))?;
            if ok == 0 {
                let why = vm.store.data_mut().startup_reason();
                return Err(format!(
                    "the plugin rejected its configuration (proxy_on_configure returned false){why}"
                ));
            }
        }
        vm.store.data_mut().startup_log = None;
        Ok(vm)
    }

    fn call_long<R>(
        &mut self,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, Fault> {
        guarded(&mut self.store, self.deadline_ticks.saturating_mul(10), f)
    }

    /// Call the export `pick` chooses, with the per-call CPU deadline; `None` if the module
    /// does not export it. Borrows the export instead of cloning it: a `TypedFunc` clone
    /// (and its drop) costs a handful of atomic reference counts in wasmtime's type
    /// registry, and a request makes a dozen such calls.
    pub fn call_export<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
        &mut self,
        pick: impl FnOnce(&Exports) -> Option<&TypedFunc<P, R>>,
        params: P,
    ) -> Result<Option<R>, Fault> {
        let Some(f) = pick(&self.exports) else {
            return Ok(None);
        };
        guarded(&mut self.store, self.deadline_ticks, |s| f.call(s, params)).map(Some)
    }

    /// A new HTTP context id (never 0 or the root's).
    pub fn new_context(&mut self) -> Result<u32, Fault> {
        let id = self.next_ctx;
        self.next_ctx = self.next_ctx.wrapping_add(1).max(ROOT_ID + 1);
        self.store.data_mut().effective = id;
        self.call_export(|e| Some(&e.on_context_create), (id as i32, ROOT_ID as i32))?;
        Ok(id)
    }

    /// Load a stream for the HTTP context `ctx`; hostcalls act on it until `unload`.
    pub fn load(&mut self, ctx: u32, data: &mut Option<Box<StreamData>>, pools: &CalloutPools) {
        let st = self.store.data_mut();
        st.stream = data.take();
        st.stream_ctx = ctx;
        st.effective = ctx;
        if !Arc::ptr_eq(&st.pools, pools) {
            st.pools = pools.clone();
        }
    }

    pub fn unload(&mut self, data: &mut Option<Box<StreamData>>) {
        let st = self.store.data_mut();
        *data = st.stream.take();
        st.stream_ctx = 0;
        st.effective = ROOT_ID;
        st.callout_response = None;
    }

    pub fn take_callouts(&mut self) -> Vec<Callout> {
        std::mem::take(&mut self.store.data_mut().pending_callouts)
    }
}

/// Write a header map change back. Pseudo-headers change the request line or status.
pub fn set_header(
    data: &mut HostState,
    t: MapType,
    name: &str,
    value: &[u8],
    mode: Mode,
) -> abi::Status {
    use abi::Status;
    let name = &*abi::lower(name);
    let Some(s) = data.stream_mut() else {
        return Status::NotFound;
    };
    if s.done {
        return Status::Ok;
    }
    match t {
        MapType::RequestHeaders => match set_on_request(&mut s.req, name, value, mode) {
            Ok(()) => Status::Ok,
            Err(()) => Status::BadArgument,
        },
        MapType::ResponseHeaders => {
            let Some(r) = s.resp.as_mut() else {
                return Status::NotFound;
            };
            match set_on_response(r, name, value, mode) {
                Ok(()) => Status::Ok,
                Err(()) => Status::BadArgument,
            }
        }
        // Trailers are not passed to plugins; changes to them are accepted and dropped.
        MapType::RequestTrailers | MapType::ResponseTrailers => Status::Ok,
        _ => Status::NotFound,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Add,
    Replace,
    Remove,
}

fn set_on_request(req: &mut RequestHeader, name: &str, value: &[u8], mode: Mode) -> Result<(), ()> {
    match name {
        ":method" => {
            if mode == Mode::Remove {
                return Err(());
            }
            let m = http::Method::from_bytes(value).map_err(|_| ())?;
            req.set_method(m);
            Ok(())
        }
        ":path" => {
            if mode == Mode::Remove {
                return Err(());
            }
            let pq = http::uri::PathAndQuery::try_from(value).map_err(|_| ())?;
            let mut parts = req.uri.clone().into_parts();
            parts.path_and_query = Some(pq);
            let uri = http::Uri::from_parts(parts).map_err(|_| ())?;
            req.set_uri(uri);
            Ok(())
        }
        ":authority" => {
            if mode == Mode::Remove {
                return Err(());
            }
            let auth = http::uri::Authority::try_from(value).map_err(|_| ())?;
            if req.uri.authority().is_some() {
                let mut parts = req.uri.clone().into_parts();
                parts.authority = Some(auth);
                let uri = http::Uri::from_parts(parts).map_err(|_| ())?;
                req.set_uri(uri);
            }
            req.insert_header("host", value).map_err(|_| ())
        }
        ":scheme" => Ok(()),
        n if n.starts_with(':') => Err(()),
        n => {
            let v = value.to_vec();
            match mode {
                Mode::Add => req
                    .append_header(n.to_string(), v)
                    .map(|_| ())
                    .map_err(|_| ()),
                Mode::Replace => req.insert_header(n.to_string(), v).map_err(|_| ()),
                Mode::Remove => {
                    req.remove_header(n);
                    Ok(())
                }
            }
        }
    }
}

fn set_on_response(r: &mut ResponseHeader, name: &str, value: &[u8], mode: Mode) -> Result<(), ()> {
    match name {
        ":status" => {
            if mode == Mode::Remove {
                return Err(());
            }
            let code: u16 = std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or(())?;
            r.set_status(code).map_err(|_| ())
        }
        n if n.starts_with(':') => Err(()),
        n => {
            let v = value.to_vec();
            match mode {
                Mode::Add => r
                    .append_header(n.to_string(), v)
                    .map(|_| ())
                    .map_err(|_| ()),
                Mode::Replace => r.insert_header(n.to_string(), v).map_err(|_| ()),
                Mode::Remove => {
                    r.remove_header(n);
                    Ok(())
                }
            }
        }
    }
}

/// Replace a whole header map (proxy_set_header_map_pairs).
pub fn set_all_headers(
    data: &mut HostState,
    t: MapType,
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
) -> abi::Status {
    use abi::Status;
    {
        let Some(s) = data.stream_mut() else {
            return Status::NotFound;
        };
        if s.done {
            return Status::Ok;
        }
        match t {
            MapType::RequestHeaders => {
                let names: Vec<String> = s.req.headers.keys().map(|k| k.to_string()).collect();
                for n in names {
                    s.req.remove_header(&n);
                }
            }
            MapType::ResponseHeaders => {
                let Some(r) = s.resp.as_mut() else {
                    return Status::NotFound;
                };
                let names: Vec<String> = r.headers.keys().map(|k| k.to_string()).collect();
                for n in names {
                    r.remove_header(&n);
                }
            }
            MapType::RequestTrailers | MapType::ResponseTrailers => return Status::Ok,
            _ => return Status::NotFound,
        }
    }
    for (k, v) in pairs {
        let Ok(k) = String::from_utf8(k) else {
            return Status::BadArgument;
        };
        let st = set_header(data, t, &k, &v, Mode::Add);
        if st != Status::Ok {
            return st;
        }
    }
    Status::Ok
}
