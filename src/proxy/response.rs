//! Response phases: headers to the client, tollgate's own error answers (503, 504, 502) and
//! the access log line.

use super::RequestCtx;
use bytes::Bytes;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, Session};
use std::time::Instant;

const KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: http::HeaderName = http::HeaderName::from_static("proxy-connection");

/// Headers sent to the client: the request id, and no hop-by-hop headers from upstream.
pub(super) fn downstream_headers(resp: &mut ResponseHeader, ctx: &RequestCtx) -> Result<()> {
    // One look at the response's few names; the hash lookups and removals below run only
    // for names that are there (most answers carry `Connection: keep-alive` only).
    let (mut connection, mut keep_alive, mut proxy_connection, mut request_id) =
        (false, false, false, false);
    for k in resp.headers.keys() {
        if *k == http::header::CONNECTION {
            connection = true;
        } else if *k == KEEP_ALIVE {
            keep_alive = true;
        } else if *k == PROXY_CONNECTION {
            proxy_connection = true;
        } else if *k == super::request::REQUEST_ID {
            request_id = true;
        }
    }
    if resp.status.as_u16() != 101 {
        if connection {
            // the common case, `Connection: keep-alive` or `close`, nominates nothing and
            // allocates nothing
            let nominates = |v: &http::HeaderValue| {
                v.to_str().map_or(true, |v| {
                    v.split(',').any(|t| {
                        let t = t.trim();
                        !t.is_empty()
                            && !t.eq_ignore_ascii_case("close")
                            && !t.eq_ignore_ascii_case("keep-alive")
                    })
                })
            };
            let values = resp.headers.get_all(http::header::CONNECTION);
            if values.iter().any(nominates) {
                let nominated: Vec<String> = values
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive")
                    .collect();
                for h in nominated {
                    resp.remove_header(&h);
                }
            }
            resp.remove_header(&http::header::CONNECTION);
        }
        if keep_alive {
            resp.remove_header(&KEEP_ALIVE);
        }
        if proxy_connection {
            resp.remove_header(&PROXY_CONNECTION);
        }
    }
    if !response_ops(ctx).names_own {
        // on the wire after the upstream's fields, outside pingora's header maps (its
        // patch 0028: ~0.7k instructions less than an insert); its own X-Request-Id, if it
        // echoed one, replaced
        if request_id {
            resp.remove_header(&super::request::REQUEST_ID);
        }
        resp.append_on_wire(
            "X-Request-Id",
            super::request::REQUEST_ID,
            ctx.request_id_value(),
        );
    } else {
        // in the maps, where the operator's response rule on it removes or replaces it
        resp.insert_header(super::request::REQUEST_ID, ctx.request_id_value())?;
    }
    vhost_headers(resp, ctx)
}

/// The response header rules that apply to this request's answers: the route's (which
/// follow the vhost's), or the vhost's alone when no route matched.
fn response_ops(ctx: &RequestCtx) -> &crate::state::headers::HeaderOps {
    match ctx.record {
        Some(r) => &ctx.snap.records[r].response_ops,
        None => match ctx.vhost.and_then(|vi| ctx.snap.vhosts.get(vi)) {
            Some(v) => &v.answers.response,
            None => crate::state::headers::HeaderOps::none(),
        },
    }
}

/// The vhost's page for tollgate's own answer `status`, if it has one (`error_pages`).
pub(super) fn error_page(ctx: &RequestCtx, status: u16) -> Option<&crate::config::Page> {
    let v = ctx.snap.vhosts.get(ctx.vhost?)?;
    v.answers.error_pages.get(&status)
}

/// The vhost's answer headers on any answer, the upstream's or tollgate's own: HSTS over
/// HTTPS only (it replaces an upstream's, and removes one over plain HTTP), its `Server`
/// policy, then the response header
/// rules (the route's, which follow the vhost's; the vhost's alone when no route matched).
pub(super) fn vhost_headers(resp: &mut ResponseHeader, ctx: &RequestCtx) -> Result<()> {
    let Some(v) = ctx.vhost.and_then(|vi| ctx.snap.vhosts.get(vi)) else {
        return Ok(());
    };
    let a = &v.answers;
    // with `hsts` set the vhost owns the header: its value over HTTPS, none over plain HTTP
    match (ctx.tls, &a.hsts) {
        (true, Some(h)) => {
            resp.insert_header(http::header::STRICT_TRANSPORT_SECURITY, h.clone())?;
        }
        (false, Some(_)) => {
            resp.remove_header(&http::header::STRICT_TRANSPORT_SECURITY);
        }
        (_, None) => {}
    }
    match &a.server {
        None => {}
        Some(None) => {
            resp.remove_header(&http::header::SERVER);
        }
        Some(Some(v)) => {
            resp.insert_header(http::header::SERVER, v.clone())?;
        }
    }
    let ops = response_ops(ctx);
    if !ops.is_empty() {
        super::headers::apply(resp, ops, ctx)?;
    }
    Ok(())
}

/// Whether the request failed because the client stopped sending a body it announced: the
/// client's body idle timeout, or an upstream timeout while the backend still waited for the
/// body. Either is a 408, and never counts against the backend.
pub(super) fn client_stalled(e: &Error, ctx: &RequestCtx) -> bool {
    match (e.etype(), e.esource()) {
        (ReadTimedout, ErrorSource::Downstream) => true,
        (ReadTimedout, ErrorSource::Upstream) => ctx.owes_body && ctx.upstream_status.is_none(),
        _ => false,
    }
}

/// The status tollgate answers with when proxying failed.
fn status_for(e: &Error, ctx: &RequestCtx) -> u16 {
    if client_stalled(e, ctx) {
        return 408;
    }
    match e.etype() {
        HTTPStatus(code) => *code,
        ConnectTimedout | ReadTimedout | WriteTimedout if *e.esource() == ErrorSource::Upstream => {
            504
        }
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => match e.etype() {
                // gone, or (HTTP/2) its stream reset: nobody to answer
                WriteError | ReadError | ConnectionClosed | H2Error => 0,
                _ => 400,
            },
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    }
}

/// The words rustls used for a failed handshake, out of pingora's error chain (which
/// carries them as a context string, followed by the local address).
fn tls_cause(e: &Error) -> String {
    let text = e.to_string();
    text.split(" cause: ")
        .flat_map(|part| part.split(" context: "))
        .map(|part| part.trim().trim_end_matches(','))
        .filter(|part| !part.is_empty() && !part.starts_with("local address"))
        .last()
        .unwrap_or("handshake failed")
        .to_string()
}

fn reason_for(code: u16, e: &Error) -> String {
    match code {
        408 => "the client did not send the request body within limits.body_idle_timeout".into(),
        504 => format!("upstream timed out ({})", e.etype().as_str()),
        502 if matches!(
            e.etype(),
            TLSHandshakeFailure | InvalidCert | HandshakeError
        ) =>
        {
            // what rustls found wrong (an unknown issuer, a name the certificate lacks, no
            // client certificate), not just "handshake failed"
            format!("TLS with the backend failed: {}", tls_cause(e))
        }
        502 => format!("upstream failed ({})", e.etype().as_str()),
        503 => "no live backend".to_string(),
        // nothing could be answered: the client closed or broke its connection first (nginx
        // logs these as 499); the upstream request, if one was sent, was abandoned
        0 if *e.esource() == ErrorSource::Downstream => format!(
            "the client went away before the answer was complete ({})",
            e.etype().as_str()
        ),
        _ => e.etype().as_str().to_string(),
    }
}

pub(super) async fn error_answer(
    session: &mut Session,
    e: &Error,
    ctx: &mut RequestCtx,
) -> FailToProxy {
    if let Some(local) = ctx.plugin_answer.take() {
        // A plugin answered after the request head went upstream.
        let code = local.status;
        if let Err(err) = super::plugins::write_local(session, ctx, &local).await {
            tracing::debug!(error = %err, "could not send a plugin's answer to the client");
        }
        return FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        };
    }
    let code = status_for(e, ctx);
    if ctx.reason.is_none() {
        ctx.reason = Some(reason_for(code, e).into());
    }
    if code > 0 {
        let text = match code {
            // the pool's own words (empty, at its cap); a TLS failure's details stay in the
            // log: they describe the backend's certificates to whoever asks
            503 if ctx
                .reason
                .as_deref()
                .is_some_and(|r| r.starts_with("pool ")) =>
            {
                ctx.reason.as_deref().unwrap_or_default()
            }
            503 => "no live backend for this route",
            504 => "the upstream server did not answer in time",
            502 => "the upstream server could not be reached or failed",
            400 => "bad request",
            408 => ctx.reason.as_deref().unwrap_or("request timeout"),
            413 => "request body over max_body_size",
            _ => "internal error",
        };
        let body = Bytes::from(format!("{code} {text}\n"));
        if super::grpc::is_grpc(session.req_header()) && session.response_written().is_none() {
            let resp = pingora::protocols::http::ServerSession::generate_error(code);
            let sent = async {
                let mut g = super::grpc::trailers_only(&resp, &format!("{code} {text}"))?;
                g.insert_header(super::request::REQUEST_ID, ctx.request_id_value())?;
                vhost_headers(&mut g, ctx)?;
                g.insert_header(http::header::CONTENT_LENGTH, 0)?;
                session.set_keepalive(None);
                super::grpc::write(session, g).await
            };
            if let Err(err) = sent.await {
                tracing::debug!(error = %err, "could not send the error answer to the client");
            }
            return FailToProxy {
                error_code: code,
                can_reuse_downstream: false,
            };
        }
        let mut resp = pingora::protocols::http::ServerSession::generate_error(code);
        let (content_type, body) = match error_page(ctx, code) {
            Some(page) => (page.content_type.as_str(), page.body.clone()),
            None => ("text/plain; charset=utf-8", body),
        };
        let _ = resp.insert_header(http::header::CONTENT_TYPE, content_type);
        let _ = resp.set_content_length(body.len());
        let _ = resp.insert_header(super::request::REQUEST_ID, ctx.request_id_value());
        let _ = vhost_headers(&mut resp, ctx);
        if let Err(err) = session
            .as_downstream_mut()
            .write_error_response(resp, body)
            .await
        {
            tracing::debug!(error = %err, "could not send the error answer to the client");
        }
    }
    FailToProxy {
        error_code: code,
        can_reuse_downstream: false,
    }
}

/// One structured line per request (target `access`; JSON when `log.format = "json"`).
pub(super) fn access_log(session: &Session, e: Option<&Error>, ctx: &RequestCtx) {
    let req = session.req_header();
    let status = session
        .response_written()
        .map(|r| r.status.as_u16())
        .unwrap_or(0);
    let vhost = ctx
        .vhost
        .map(|v| ctx.snap.routes.vhost(v).label.as_str())
        .unwrap_or("-");
    let route = match ctx.record {
        Some(r) => ctx.snap.records[r].declared.path.as_str(),
        None => "-",
    };
    let backend = match (&ctx.pool, ctx.tried.last()) {
        (Some(p), Some(&i)) => p.backends[i].address.to_string(),
        _ => "-".to_string(),
    };
    tracing::info!(
        target: "access",
        request_id = %ctx.request_id,
        client = %client(session, ctx),
        proto = if session.is_http2() { "h2" } else { "http/1.1" },
        tls = ctx.tls,
        tls_group = tls_group(session.digest()),
        method = %req.method,
        host = %ctx.host,
        path = %req.uri.path(),
        status,
        vhost,
        route,
        pool = ctx.pool.as_ref().map(|p| p.name.as_str()).unwrap_or("-"),
        backend = %backend,
        attempts = ctx.tried.len(),
        upstream_status = ctx.upstream_status.unwrap_or(0),
        bytes_sent = session.body_bytes_sent(),
        // microsecond precision, without float noise in the log
        duration_ms = (ctx.start.elapsed().as_micros() as f64 / 1000.0),
        reason = ctx.reason.as_deref().unwrap_or("-"),
        error = %e.map(|e| e.to_string()).unwrap_or_default(),
    );
}

/// The access log line for a request pingora refused before tollgate's filters saw it (a
/// header it could not parse, a smuggling shape, CONNECT): the same fields, `-` for what is
/// not known.
pub(super) fn refused_log(
    session: &pingora::protocols::http::ServerSession,
    e: &Error,
    status: u16,
) {
    let reason = e
        .context
        .as_ref()
        .map(|c| c.as_str().to_string())
        .unwrap_or_else(|| e.etype().as_str().to_string());
    let tls = session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .is_some();
    tracing::info!(
        target: "access",
        request_id = "-",
        client = %session.client_addr().map(|a| a.to_string()).unwrap_or_default(),
        proto = if session.is_http2() { "h2" } else { "http/1.1" },
        tls,
        tls_group = tls_group(session.digest()),
        method = "-",
        host = "-",
        path = "-",
        status,
        vhost = "-",
        route = "-",
        pool = "-",
        backend = "-",
        attempts = 0,
        upstream_status = 0,
        bytes_sent = 0,
        duration_ms = 0.0,
        reason = %reason,
        error = %e,
    );
}

/// The key exchange group of the connection's TLS handshake, as the handshake callback noted
/// it (`-` for plain HTTP).
fn tls_group(digest: Option<&pingora::protocols::Digest>) -> &'static str {
    digest
        .and_then(|d| d.ssl_digest.as_ref())
        .and_then(|s| s.extension.get::<crate::tls::Negotiated>())
        .map_or("-", |n| n.key_exchange)
}

/// The client as logged: the socket peer (or PROXY source) with its port, or the address
/// X-Forwarded-For gave when that is trusted and differs.
fn client(session: &Session, ctx: &RequestCtx) -> String {
    let peer = session.client_addr().and_then(|a| a.as_inet()).copied();
    match (peer, ctx.client_ip) {
        (Some(p), Some(ip)) if p.ip() != ip => ip.to_string(),
        (Some(p), _) => p.to_string(),
        (None, _) => String::new(),
    }
}

/// Log lines clients can cause at request rate (a pool with no live backend, a backend that
/// fails every request): at most one per key (a pool) every [`ErrorLines::EVERY`], each
/// saying how many like it were held back. Keys are pool names, so the map stays small; it
/// is emptied should it ever pass 1024 keys.
#[derive(Debug, Default)]
pub struct ErrorLines(std::sync::Mutex<std::collections::HashMap<(String, bool), (Instant, u64)>>);

impl ErrorLines {
    pub const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    /// Log the failure `e` of a request to its pool (`retried`: one pingora will try again,
    /// at warn; else the final one, at error) if that pool's line of this kind is due.
    pub fn log(&self, ctx: &RequestCtx, e: &Error, session: &Session, retried: bool) {
        let pool = ctx.pool.as_ref().map_or("-", |p| p.name.as_str());
        let Some(held) = self.admit(pool, retried, Instant::now()) else {
            return;
        };
        let summary = session.as_ref().request_summary();
        if retried {
            tracing::warn!(
                pool,
                similar_lines_held_back = held,
                "Fail to proxy (retrying): {e}, {summary}"
            );
        } else {
            tracing::error!(
                pool,
                similar_lines_held_back = held,
                "Fail to proxy: {e}, {summary}"
            );
        }
    }

    /// `Some(held back since the last line)` when a line for `pool` (of this kind) may be
    /// written now.
    pub fn admit(&self, pool: &str, retried: bool, now: Instant) -> Option<u64> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let key = (pool.to_string(), retried);
        match m.get_mut(&key) {
            Some((at, held)) if now.saturating_duration_since(*at) < Self::EVERY => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let n = std::mem::take(held);
                *at = now;
                Some(n)
            }
            None => {
                if m.len() >= 1024 {
                    m.clear();
                }
                m.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod error_lines_tests {
    use super::*;

    #[test]
    fn one_line_per_key_every_ten_seconds_saying_how_many_were_held_back() {
        let l = ErrorLines::default();
        let t0 = Instant::now();
        assert_eq!(l.admit("a", false, t0), Some(0));
        for _ in 0..5 {
            assert_eq!(
                l.admit("a", false, t0 + std::time::Duration::from_secs(1)),
                None
            );
        }
        assert_eq!(
            l.admit("b", false, t0),
            Some(0),
            "another pool has its own line"
        );
        assert_eq!(
            l.admit("a", true, t0),
            Some(0),
            "retries have their own line"
        );
        assert_eq!(l.admit("a", false, t0 + ErrorLines::EVERY), Some(5));
        assert_eq!(l.admit("a", false, t0 + ErrorLines::EVERY), None);
    }
}
