//! The pingora `ProxyHttp` implementation: the request path. Shaped after pingora's phase
//! chart, one file per phase group: `request` (routing, redirects, local answers, proxy
//! headers), `upstream` (peer selection, retries, passive health), `response` (response
//! headers, error answers, access log), plus what the listeners run before a request:
//! `admission` (connection limits, PROXY protocol) and `sni` (the certificate resolver); `grpc`
//! turns tollgate's own answers to gRPC clients into gRPC statuses. Reads the
//! Snapshot once per request and never takes a lock to do so; must not build Snapshots.

pub mod admission;
mod grpc;
mod headers;
mod plugins;
mod request;
mod response;
pub mod sni;
mod upstream;

#[cfg(test)]
mod tests;

use crate::state::Snapshot;
use crate::upstream::{InflightGuard, Pool};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Requests being handled right now (from request start to the end of logging): one
/// counter shared by the proxy, the admin API and the drain-aware shutdown.
#[derive(Debug, Default, Clone)]
pub struct ActiveRequests(Arc<AtomicUsize>);

impl ActiveRequests {
    /// The in-flight family of `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        crate::metrics::single(
            out,
            "tollgate_active_requests",
            "gauge",
            "Requests being handled now.",
            self.count(),
        );
    }

    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Count one request (or service-port connection) until the returned guard is dropped.
    pub fn enter(&self) -> Counted {
        self.0.fetch_add(1, Ordering::SeqCst);
        Counted(self.0.clone())
    }
}

/// One request counted in `ActiveRequests` for as long as its context lives.
pub struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Tollgate {
    state: Arc<ArcSwap<Snapshot>>,
    access_log: bool,
    active: ActiveRequests,
    challenges: crate::tls::Challenges,
    /// Error lines clients can cause at request rate, held to one per pool every 10 s.
    errors: response::ErrorLines,
}

impl Tollgate {
    pub fn new(
        state: Arc<ArcSwap<Snapshot>>,
        access_log: bool,
        active: ActiveRequests,
        challenges: crate::tls::Challenges,
    ) -> Self {
        Tollgate {
            state,
            access_log,
            active,
            challenges,
            errors: Default::default(),
        }
    }
}

/// Per-request state. The Snapshot is pinned when the request starts, so a reload never
/// changes routing under a request in flight.
pub struct RequestCtx {
    _counted: Counted,
    snap: Arc<Snapshot>,
    start: Instant,
    request_id: String,
    request_id_hv: std::sync::OnceLock<http::HeaderValue>,
    host: String,
    tls: bool,
    vhost: Option<usize>,
    /// The matched route's record in the Snapshot (`Snapshot::records`).
    record: Option<usize>,
    pool: Option<Arc<Pool>>,
    /// Backends tried for this request (indexes into the pool).
    tried: Vec<usize>,
    /// The last backend may be chosen again: its pooled connection was closed under the
    /// request before any answer (the keep-alive race), not a failure of the backend.
    again: bool,
    backend: Option<usize>,
    inflight: Option<InflightGuard>,
    /// When the current backend was chosen (connect and response times count from here).
    upstream_start: Option<Instant>,
    upstream_status: Option<u16>,
    /// Why tollgate answered itself (logged).
    reason: Option<Cow<'static, str>>,
    /// The client: the socket peer, the PROXY header's source, or (from trusted proxies
    /// only) X-Forwarded-For.
    client_ip: Option<IpAddr>,
    /// The request body cap for the matched route (None: no cap).
    body_cap: Option<u64>,
    body: crate::limits::http::BodyMeter,
    /// The client has announced a request body it has not finished sending: an upstream
    /// timeout now is the client's doing, not the backend's.
    owes_body: bool,
    /// The route's proxy-wasm chain, once the request reached it.
    plugins: Option<Box<crate::wasm::Chain>>,
    /// A plugin's answer decided after the request head went upstream (sent by the
    /// error path).
    plugin_answer: Option<crate::wasm::LocalResponse>,
    /// A plugin's local response body replacing the upstream's.
    plugin_body: Option<bytes::Bytes>,
}

impl RequestCtx {
    /// The request id as a header value, made once and shared by the request sent upstream
    /// and the response (a `HeaderValue` clone is a reference count).
    fn request_id_value(&self) -> http::HeaderValue {
        self.request_id_hv
            .get_or_init(|| {
                http::HeaderValue::from_str(&self.request_id)
                    .unwrap_or_else(|_| http::HeaderValue::from_static("-"))
            })
            .clone()
    }
}

#[async_trait]
impl ProxyHttp for Tollgate {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            _counted: self.active.enter(),
            snap: self.state.load_full(),
            start: Instant::now(),
            request_id: String::new(),
            request_id_hv: std::sync::OnceLock::new(),
            host: String::new(),
            tls: false,
            vhost: None,
            record: None,
            pool: None,
            tried: Vec::new(),
            again: false,
            backend: None,
            inflight: None,
            upstream_start: None,
            upstream_status: None,
            reason: None,
            client_ip: None,
            body_cap: None,
            body: Default::default(),
            owes_body: false,
            plugins: None,
            plugin_answer: None,
            plugin_body: None,
        }
    }

    fn request_header_timeout(&self) -> Option<Duration> {
        Some(self.state.load().config.limits.header_timeout)
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if request::check(session, ctx).await? {
            return Ok(true);
        }
        if request::acme_challenge(session, ctx, &self.challenges).await? {
            return Ok(true);
        }
        if request::route(session, ctx).await? {
            return Ok(true);
        }
        plugins::request_headers(session, ctx).await
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let n = body.as_ref().map(|b| b.len()).unwrap_or(0);
        if end_of_stream {
            ctx.owes_body = false;
        }
        let l = &ctx.snap.config.limits;
        if let Err(r) = ctx.body.feed(
            n,
            Instant::now(),
            ctx.body_cap,
            l.min_body_rate,
            l.min_body_rate_after,
        ) {
            ctx.reason = Some(r.reason.into());
            return Error::e_explain(HTTPStatus(r.status), r.reason);
        }
        plugins::request_body(session, body, end_of_stream, ctx).await
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        upstream::select_peer(ctx)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        upstream::on_proxy_error(peer, session, ctx, e, client_reused)
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        e: Box<Error>,
    ) -> Box<Error> {
        upstream::on_connect_failure(session, ctx, e)
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        request::proxy_headers(req, ctx)
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (false, Some(pool), Some(start)) = (reused, &ctx.pool, ctx.upstream_start) {
            pool.metrics.connect.observe(start.elapsed());
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_status = Some(resp.status.as_u16());
        if let (Some(pool), Some(start)) = (&ctx.pool, ctx.upstream_start) {
            pool.metrics.response.observe(start.elapsed());
            // HTTP/2 backends are held to the header limits HTTP/1 backends meet in
            // pingora's parser (fields, bytes): one ceiling whatever the protocol
            if pool.spec.protocol.h2() {
                if let Err(why) = crate::limits::http::check_response_header(resp) {
                    ctx.reason = Some(why.into());
                    return Error::e_explain(HTTPStatus(502), why);
                }
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        plugins::response_headers(session, resp, ctx).await?;
        response::downstream_headers(resp, ctx)
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        plugins::response_body(session, body, end_of_stream, ctx)?;
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        response::error_answer(session, e, ctx).await
    }

    fn request_refused(
        &self,
        session: &pingora::protocols::http::ServerSession,
        e: &Error,
        status: u16,
    ) {
        if self.access_log {
            response::refused_log(session, e, status);
        }
    }

    /// Client-caused failures (resets, stalls, bad frames) are in the access log with their
    /// reason; an ERROR line each would let any client flood the log.
    fn suppress_error_log(&self, session: &Session, ctx: &RequestCtx, e: &Error) -> bool {
        if *e.esource() == ErrorSource::Downstream || response::client_stalled(e, ctx) {
            return true;
        }
        // a pool with no live backend, or a failing one, fails every request sent to it:
        // one line per pool every 10 s (each request still has its access-log line)
        self.errors.log(ctx, e, session, false);
        true
    }

    fn suppress_proxy_warn_log(
        &self,
        session: &Session,
        ctx: &RequestCtx,
        e: &Error,
        _context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        // retried failures: as above, one line per pool every 10 s
        self.errors.log(ctx, e, session, true);
        true
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        upstream::record_outcome(e, ctx);
        plugins::log(session, ctx);
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        ctx.snap
            .request_metrics(ctx.vhost, ctx.record)
            .record(status, ctx.start.elapsed());
        if self.access_log {
            response::access_log(session, e, ctx);
        }
    }
}
