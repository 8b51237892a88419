//! The plugin phases: hand the request and response to the route's proxy-wasm chain
//! (`wasm::Chain`) at each pingora phase, write back what plugins changed, and answer with
//! what they decided (a local response, a 500 under `fail_closed`, a reset).

use super::RequestCtx;
use crate::wasm::{Chain, LocalResponse, RequestInfo, Verdict};
use bytes::Bytes;
use pingora::prelude::*;
use pingora::proxy::Session;
use std::borrow::Cow;

/// Start the route's chain and run `on_request_headers`. `Ok(true)`: answered already.
pub(super) async fn request_headers(session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
    let Some(r) = ctx.record else {
        return Ok(false);
    };
    let rec = &ctx.snap.records[r];
    if rec.plugins.is_empty() {
        return Ok(false);
    }
    // the chain holds a placeholder; the session lends it the real header in each phase
    let mut chain = Chain::lent(&rec.plugins, &ctx.snap.callout_pools);
    fill_info(&mut chain.data_mut().info, session, ctx, &rec.names);
    let eos = session.as_downstream_mut().is_body_empty();
    let verdict = chain.request_headers(session.req_header_mut(), eos).await;
    ctx.plugins = Some(chain);
    match verdict {
        Verdict::Continue => Ok(false),
        v => {
            answer(session, ctx, v).await?;
            Ok(true)
        }
    }
}

/// `on_request_body` for each chunk (the chain may hold chunks back while a plugin pauses).
pub(super) async fn request_body(
    session: &mut Session,
    body: &mut Option<Bytes>,
    end_of_stream: bool,
    ctx: &mut RequestCtx,
) -> Result<()> {
    let Some(chain) = ctx.plugins.as_mut() else {
        return Ok(());
    };
    match chain
        .request_body(session.req_header_mut(), body, end_of_stream)
        .await
    {
        Verdict::Continue => Ok(()),
        v => {
            // The request head may be upstream already: the answer goes out through
            // pingora's error path, which `response::error_answer` gives this response.
            let status = verdict_response(&v, ctx).status;
            ctx.plugin_answer = Some(verdict_response(&v, ctx));
            Error::e_explain(HTTPStatus(status), "answered by a plugin")
        }
    }
}

/// `on_response_headers` in reverse chain order; a local response replaces the upstream's.
pub(super) async fn response_headers(
    session: &mut Session,
    resp: &mut ResponseHeader,
    ctx: &mut RequestCtx,
) -> Result<()> {
    let Some(chain) = ctx.plugins.as_mut() else {
        return Ok(());
    };
    let eos = resp.status.as_u16() == 204
        || resp.status.as_u16() == 304
        || resp
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0");
    match chain
        .response_headers(session.req_header_mut(), resp, eos)
        .await
    {
        Verdict::Continue => Ok(()),
        Verdict::Reset { plugin } => {
            ctx.reason = Some(format!("plugin {plugin} reset the stream").into());
            Error::e_explain(ConnectionClosed, "a plugin reset the stream")
        }
        v => {
            let local = verdict_response(&v, ctx);
            let mut fresh = local_header(&local)?;
            fresh.insert_header(http::header::CONTENT_LENGTH, local.body.len())?;
            *resp = fresh;
            ctx.plugin_body = Some(local.body);
            Ok(())
        }
    }
}

/// `on_response_body`, or the body of a local response that replaced the upstream's.
pub(super) fn response_body(
    session: &mut Session,
    body: &mut Option<Bytes>,
    end_of_stream: bool,
    ctx: &mut RequestCtx,
) -> Result<()> {
    if let Some(replacement) = &ctx.plugin_body {
        *body = end_of_stream.then(|| replacement.clone());
        return Ok(());
    }
    let Some(chain) = ctx.plugins.as_mut() else {
        return Ok(());
    };
    match chain.response_body(session.req_header_mut(), body, end_of_stream) {
        Verdict::Continue => Ok(()),
        v => {
            // The response head is out: the only thing left to do is cut the response.
            let reason = match &v {
                Verdict::Fail { plugin, fault } => format!("plugin {plugin} {fault}"),
                Verdict::Reset { plugin } => format!("plugin {plugin} reset the stream"),
                Verdict::TooLarge { plugin } => format!("plugin {plugin} held back too much body"),
                Verdict::Respond(l) => {
                    format!("a plugin answered {} after the response began", l.status)
                }
                Verdict::Continue => String::new(),
            };
            tracing::warn!(request_id = %ctx.request_id, "{reason}; response cut");
            ctx.reason = Some(reason.into());
            Error::e_explain(InternalError, "a plugin stopped the response")
        }
    }
}

/// End every context: on_done, on_log, on_delete (the ABI's order).
pub(super) fn log(session: &mut Session, ctx: &mut RequestCtx) {
    if let Some(chain) = ctx.plugins.as_mut() {
        // on_log may read the response headers (only a chain with a plugin that exports
        // on_log): they are lent, swapped out of the session and back, not copied
        let mut lent = false;
        if chain.listens_to_log() {
            match session.as_downstream_mut().response_written_mut() {
                Some(resp) => {
                    chain.data_mut().lend_resp(resp);
                    lent = true;
                }
                // (a custom session does not lend it)
                None => chain.data_mut().resp = session.response_written().cloned(),
            }
        }
        chain.finish(Some(session.req_header_mut()));
        if lent {
            if let Some(resp) = session.as_downstream_mut().response_written_mut() {
                chain.data_mut().return_resp(resp);
            }
        }
    }
    // kept for this worker's next request with plugins (nothing of this one is kept)
    if let Some(chain) = ctx.plugins.take() {
        chain.recycle();
    }
}

/// What plugins read of the request as properties, written into the chain's (reused)
/// request info: no allocation once the strings have grown to size.
fn fill_info(
    info: &mut RequestInfo,
    session: &Session,
    ctx: &RequestCtx,
    names: &std::sync::Arc<crate::wasm::RouteNames>,
) {
    let ssl = session.digest().and_then(|d| d.ssl_digest.as_ref());
    let source = session.client_addr().and_then(|a| a.as_inet()).copied();
    info.source = match (source, ctx.client_ip) {
        (Some(s), Some(ip)) if s.ip() != ip => Some(std::net::SocketAddr::new(ip, 0)),
        (s, _) => s,
    };
    info.destination = session.server_addr().and_then(|a| a.as_inet()).copied();
    info.tls_version = ssl.map(|s| s.version.clone());
    info.sni.clear();
    if ssl.is_some() {
        info.sni.push_str(&ctx.host);
    }
    info.tls = ctx.tls;
    info.request_id.clear();
    info.request_id.push_str(&ctx.request_id);
    if !std::sync::Arc::ptr_eq(&info.route, names) {
        info.route = names.clone();
    }
    info.protocol = if session.is_http2() {
        "HTTP/2"
    } else {
        "HTTP/1.1"
    };
    info.start_unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
}

/// The response a verdict stands for, and the reason logged with it.
fn verdict_response(v: &Verdict, ctx: &mut RequestCtx) -> LocalResponse {
    let text = |status: u16, msg: &str| LocalResponse {
        status,
        details: msg.to_string(),
        headers: vec![("content-type".into(), b"text/plain; charset=utf-8".to_vec())],
        body: Bytes::from(format!("{status} {msg}\n")),
        grpc_status: None,
    };
    let (resp, reason): (LocalResponse, Cow<'static, str>) = match v {
        Verdict::Respond(l) => {
            let why = if l.details.is_empty() {
                format!("answered {} by a plugin", l.status)
            } else {
                format!("answered {} by a plugin: {}", l.status, l.details)
            };
            (l.clone(), why.into())
        }
        Verdict::Fail { plugin, fault } => (
            text(500, "a plugin failed"),
            format!("plugin {plugin} {fault} (on_error = fail_closed)").into(),
        ),
        Verdict::TooLarge { plugin } => (
            text(413, "request body too large to buffer for a plugin"),
            format!("plugin {plugin} held back more than 8 MiB of body").into(),
        ),
        Verdict::Reset { plugin } => (
            text(400, "stream reset by a plugin"),
            format!("plugin {plugin} reset the stream").into(),
        ),
        Verdict::Continue => (text(500, "internal error"), "".into()),
    };
    ctx.reason = Some(reason);
    resp
}

fn skip_header(k: &str) -> bool {
    matches!(
        k,
        "content-length" | "transfer-encoding" | "connection" | "keep-alive"
    ) || k.starts_with(':')
}

/// Answer the request from the plugins' verdict (request phase: nothing sent yet).
async fn answer(session: &mut Session, ctx: &mut RequestCtx, v: Verdict) -> Result<()> {
    if let Verdict::Reset { .. } = v {
        // No answer: the connection is closed once the request is done.
        verdict_response(&v, ctx);
        session.set_keepalive(None);
        return Ok(());
    }
    let local = verdict_response(&v, ctx);
    write_local(session, ctx, &local).await
}

/// Write a plugin's local response to the client.
pub(super) async fn write_local(
    session: &mut Session,
    ctx: &RequestCtx,
    local: &LocalResponse,
) -> Result<()> {
    let resp = local_header(local)?;
    super::request::send(session, ctx, resp, local.body.clone()).await
}

/// The status and headers of a plugin's local response (framing headers are tollgate's).
fn local_header(local: &LocalResponse) -> Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(local.status, Some(local.headers.len() + 3))?;
    if let Some(code) = local.grpc_status {
        // what proxy_send_local_response's grpc_status asks a gRPC client to see
        resp.insert_header("grpc-status", code.to_string())?;
    }
    for (k, v) in &local.headers {
        if !skip_header(k) {
            resp.append_header(k.clone(), v.as_slice())?;
        }
    }
    Ok(resp)
}
