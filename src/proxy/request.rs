//! Request phases: find the vhost and route, answer locally when there is none (421, 404,
//! 308 to HTTPS), and set the proxy headers sent upstream.

use super::RequestCtx;
use crate::config::ForwardedFor;
use crate::routing::path::{normalize_path, PathError};
use crate::routing::{normalize_host, Lookup};
use bytes::Bytes;
use pingora::prelude::*;
use pingora::proxy::Session;
use std::borrow::Cow;

use http::header::HeaderName;

// Header names as `HeaderName` constants: inserting by `HeaderName` skips parsing the name
// again (vendor/pingora-http patch 1), and a lookup by it skips the string's parse.
pub(super) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");

/// The checks before routing: sizes, framing and Host (`limits::http`). Also sets the
/// connection's keep-alive and body read timeouts and works out the client's address.
/// `Ok(true)` when tollgate already answered (and, for untrustworthy framing, will close).
pub(super) async fn check(session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
    let snap = ctx.snap.clone();
    let l = &snap.config.limits;
    session.set_keepalive(Some(l.keepalive_timeout.as_secs()));
    let down = session.as_downstream_mut();
    down.set_read_timeout(Some(l.body_idle_timeout));
    down.set_write_timeout(Some(l.send_timeout));
    // HTTP/1.1 requests sent before the previous answer are served in order (RFC 9112
    // §9.3.2), not dropped with the connection.
    down.set_pipelining_enabled(true);
    ctx.owes_body = if session.is_http2() {
        !session.as_downstream_mut().is_body_done()
    } else {
        has_body(session.req_header())
    };
    let peer = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    ctx.client_ip = peer.map(|p| {
        // the header is looked up only when it could be believed
        let xff = l
            .x_forwarded_for
            .then(|| {
                session
                    .req_header()
                    .headers
                    .get(&X_FORWARDED_FOR)
                    .and_then(|v| v.to_str().ok())
            })
            .flatten();
        crate::limits::http::client_ip(p, xff, l)
    });
    if let Err(r) = crate::limits::http::check_request(session.req_header(), l) {
        if r.close {
            session.set_keepalive(None);
        }
        return answer(session, ctx, r.status, r.reason, None).await;
    }
    if let Err(reason) = normalize_target(session.req_header_mut(), l) {
        return answer(session, ctx, 400, reason, None).await;
    }
    Ok(false)
}

/// The request target's form (RFC 9112 §3.2: origin-form, absolute-form with an http(s)
/// scheme, or `*` for OPTIONS; anything else is a 400) and its path normalised
/// (`routing::path`). The request is then routed, shown to plugins, logged and forwarded with
/// the normalised path, in origin-form.
fn normalize_target(
    req: &mut RequestHeader,
    l: &crate::config::Limits,
) -> Result<(), &'static str> {
    use pingora::protocols::http::authority::{raw_target_authority, RawTargetAuthority};
    if !req.raw_path_is_utf8() {
        return Err("request target is not valid UTF-8");
    }
    let raw = req.raw_path();
    let authority = match raw.first() {
        Some(b'/') => None,
        _ if raw == b"*" => {
            return if req.method == http::Method::OPTIONS {
                Ok(())
            } else {
                Err("request target * is for OPTIONS only")
            };
        }
        _ => match raw_target_authority(raw) {
            RawTargetAuthority::Absolute {
                scheme, authority, ..
            } if scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https") => {
                Some(authority.to_vec())
            }
            _ => return Err(PathError::NotOriginForm.reason()),
        },
    };
    let path = match normalize_path(req.uri.path(), l.encoded_slashes) {
        Ok(Cow::Borrowed(_)) if authority.is_none() => return Ok(()),
        Ok(p) => p.into_owned(),
        Err(e) => return Err(e.reason()),
    };
    let pq = match req.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = req.uri.scheme().cloned();
    parts.authority = req.uri.authority().cloned();
    parts.path_and_query = Some(pq.parse().map_err(|_| PathError::BadPercent.reason())?);
    let uri = http::Uri::from_parts(parts).map_err(|_| PathError::NotOriginForm.reason())?;
    if let Some(a) = authority {
        // absolute-form: pingora has checked that a Host, if any, equals the authority
        if !req.headers.contains_key(http::header::HOST) {
            req.insert_header(http::header::HOST, a)
                .map_err(|_| "invalid authority in the request target")?;
        }
    }
    req.set_uri(uri);
    Ok(())
}

/// The request's host, normalised (`routing::normalize_host`): the target's authority, else
/// the Host header.
fn request_host(req: &RequestHeader) -> Option<String> {
    let raw = match req.uri.authority() {
        Some(a) => Some(a.as_str()),
        None => req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok()),
    };
    raw.and_then(normalize_host)
}

/// Route the request; `Ok(true)` when tollgate already answered it.
pub(super) async fn route(session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
    ctx.tls = session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .is_some();
    ctx.request_id = incoming_request_id(session.req_header()).unwrap_or_else(new_request_id);

    let Some(host) = request_host(session.req_header()) else {
        return answer(session, ctx, 400, "missing or invalid Host header", None).await;
    };
    ctx.host = host;

    let snap = ctx.snap.clone();
    let req = session.req_header();
    let view = crate::routing::RequestView {
        method: &req.method,
        headers: &req.headers,
        query: req.uri.query(),
    };
    let lookup = snap
        .routes
        .lookup_request(&ctx.host, req.uri.path(), Some(&view));
    match lookup {
        Lookup::NoVhost => {
            answer(
                session,
                ctx,
                421,
                "no virtual host for this host name",
                None,
            )
            .await
        }
        Lookup::NoRoute { vhost } => {
            ctx.vhost = Some(vhost);
            if let Some(resp) = redirect(session, ctx, vhost) {
                return resp.await;
            }
            answer(session, ctx, 404, "no route for this path", None).await
        }
        Lookup::Route { vhost, target, .. } => {
            ctx.vhost = Some(vhost);
            ctx.record = Some(target);
            if let Some(resp) = redirect(session, ctx, vhost) {
                return resp.await;
            }
            let record = &snap.records[target];
            if let Some(access) = &record.access {
                if !access.admits(ctx.client_ip) {
                    let why = "the route does not admit this client address";
                    return answer(session, ctx, 403, why, None).await;
                }
            }
            if let Some(page) = &record.declared.respond {
                ctx.reason = Some("answered by the route".into());
                let mut resp = ResponseHeader::build(page.status, Some(4))?;
                resp.insert_header(http::header::CONTENT_TYPE, page.content_type.as_str())?;
                send(session, ctx, resp, page.body.clone()).await?;
                return Ok(true);
            }
            if let Some((status, to)) = &record.declared.options.redirect {
                // the path was normalised before routing: `$path` is never `//host`
                let pq = session.req_header().uri.path_and_query();
                let location = crate::config::route_options::redirect_location(
                    to,
                    pq.map(|p| p.as_str()).unwrap_or("/"),
                    &ctx.host,
                );
                return answer(
                    session,
                    ctx,
                    *status,
                    "redirected by the route",
                    Some(location),
                )
                .await;
            }
            ctx.body_cap =
                crate::limits::http::body_cap(record.declared.max_body_size, &snap.config.limits);
            if let Err(r) =
                crate::limits::http::check_declared_body(session.req_header(), ctx.body_cap)
            {
                session.set_keepalive(None);
                return answer(session, ctx, r.status, r.reason, None).await;
            }
            ctx.pool = record.pool.and_then(|i| snap.pools.get(i)).cloned();
            Ok(false)
        }
    }
}

/// A 308 to HTTPS for plain-HTTP requests to a vhost that wants it (the default).
fn redirect<'a>(
    session: &'a mut Session,
    ctx: &'a mut RequestCtx,
    vhost: usize,
) -> Option<impl std::future::Future<Output = Result<bool>> + 'a> {
    let cfg = &ctx.snap.config;
    if ctx.tls || !ctx.snap.routes.vhost(vhost).redirect_https || !cfg.has_tls() {
        return None;
    }
    let port = cfg.server.https_redirect_port;
    let host = if ctx.host.contains(':') {
        format!("[{}]", ctx.host)
    } else {
        ctx.host.clone()
    };
    let authority = if port == 443 {
        host
    } else {
        format!("{host}:{port}")
    };
    let pq = session
        .req_header()
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let location = format!("https://{authority}{pq}");
    Some(answer(
        session,
        ctx,
        308,
        "redirect to https",
        Some(location),
    ))
}

/// An ACME HTTP-01 challenge tollgate is answering now (on any listener, before routing and
/// the HTTPS redirect, as the CA asks over plain HTTP): the key authorization, only when the
/// request's Host is the name the pending order validates and one a vhost of the file may
/// order for.
pub(super) async fn acme_challenge(
    session: &mut Session,
    ctx: &mut RequestCtx,
    challenges: &crate::tls::Challenges,
) -> Result<bool> {
    let req = session.req_header();
    let Some(token) = req.uri.path().strip_prefix(crate::tls::CHALLENGE_PATH) else {
        return Ok(false);
    };
    let Some(host) = request_host(req) else {
        return Ok(false);
    };
    if !ctx.snap.config.acme_may_order(&host) {
        return Ok(false);
    }
    let now = crate::clock::unix_secs() as i64;
    let Some(key_auth) = challenges.answer(token, &host, now) else {
        return Ok(false);
    };
    ctx.reason = Some("ACME http-01 challenge".into());
    let mut resp = ResponseHeader::build(200, Some(3))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/octet-stream")?;
    send(session, ctx, resp, Bytes::from(key_auth)).await?;
    Ok(true)
}

/// Answer the request from tollgate itself with a short text body.
pub(super) async fn answer(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    reason: &'static str,
    location: Option<String>,
) -> Result<bool> {
    ctx.reason = Some(reason.into());
    let mut resp = ResponseHeader::build(status, Some(4))?;
    let body = match super::response::error_page(ctx, status) {
        Some(page) => {
            resp.insert_header(http::header::CONTENT_TYPE, page.content_type.as_str())?;
            page.body.clone()
        }
        None => {
            resp.insert_header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
            Bytes::from(format!("{status} {reason}\n"))
        }
    };
    if let Some(l) = location {
        resp.insert_header(http::header::LOCATION, l)?;
    }
    send(session, ctx, resp, body).await?;
    Ok(true)
}

/// Send an answer tollgate makes itself (its own or a plugin's): `resp` with Content-Length
/// and the request id added, then `body`.
pub(super) async fn send(
    session: &mut Session,
    ctx: &RequestCtx,
    mut resp: ResponseHeader,
    body: Bytes,
) -> Result<()> {
    let request_id = ctx.request_id.as_str();
    if super::grpc::is_grpc(session.req_header()) {
        let text = String::from_utf8_lossy(&body);
        let mut g = super::grpc::trailers_only(&resp, &text)?;
        g.insert_header(REQUEST_ID, request_id)?;
        super::response::vhost_headers(&mut g, ctx)?;
        g.insert_header(http::header::CONTENT_LENGTH, 0)?;
        if has_body(session.req_header()) {
            session.set_keepalive(None);
        }
        return super::grpc::write(session, g).await;
    }
    resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    resp.insert_header(REQUEST_ID, request_id)?;
    super::response::vhost_headers(&mut resp, ctx)?;
    if has_body(session.req_header()) {
        // The body was not read: the connection cannot be reused safely.
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

fn has_body(req: &RequestHeader) -> bool {
    req.headers.contains_key(http::header::TRANSFER_ENCODING)
        || req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

fn incoming_request_id(req: &RequestHeader) -> Option<String> {
    let v = req.headers.get(&REQUEST_ID)?.to_str().ok()?;
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then(|| v.to_string())
}

fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = fastrand::u128(..);
    let id: Vec<u8> = (0..32)
        .map(|i| HEX[((n >> (124 - 4 * i)) & 0xf) as usize])
        .collect();
    String::from_utf8(id).unwrap_or_default()
}

/// An address as text; IPv4 without the formatting machinery (`Display` for an `IpAddr` was
/// ~1.3k instructions of every request, measured with callgrind).
pub(super) fn ip_text(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                if o >= 100 {
                    s.push(char::from(b'0' + o / 100));
                }
                if o >= 10 {
                    s.push(char::from(b'0' + o / 10 % 10));
                }
                s.push(char::from(b'0' + o % 10));
            }
            s
        }
        v6 => v6.to_string(),
    }
}

/// Headers on the request sent upstream: X-Forwarded-For (from `ctx.client_ip`), -Proto,
/// -Host, X-Request-Id, Host.
/// Hop-by-hop headers are stripped by pingora's upstream request policy (WebSocket upgrade
/// headers are re-added for valid WebSocket requests only).
pub(super) fn proxy_headers(req: &mut RequestHeader, ctx: &RequestCtx) -> Result<()> {
    use http::HeaderValue;
    let record = ctx.record.map(|r| &ctx.snap.records[r]);
    // tollgate's fields go on the wire after the client's (pingora-http patch: no hashed
    // insert into the value and case maps, ~0.8k instructions each), unless a request rule
    // of the route names one: it runs after them and removes or replaces what tollgate set.
    let on_wire = record.is_none_or(|r| !r.request_ops.names_own);
    // the client's own copies of the fields tollgate sets are replaced: one pass over the
    // names finds them (most requests have none)
    let mut theirs = Theirs::default();
    for name in req.headers.keys() {
        theirs.note(name);
    }
    let put = |req: &mut RequestHeader,
               case: &'static str,
               name: HeaderName,
               value: HeaderValue,
               sent: bool|
     -> Result<()> {
        if on_wire {
            if sent {
                req.remove_header(&name);
            }
            req.append_on_wire(case, name, value);
            Ok(())
        } else {
            req.insert_header(name, value).map(|_| ())
        }
    };
    if let Some(ip) = ctx.client_ip {
        let ip = ip_text(ip);
        let xff = match ctx.snap.config.server.forwarded_for {
            ForwardedFor::Replace => ip,
            ForwardedFor::Append => match req
                .headers
                .get(&X_FORWARDED_FOR)
                .and_then(|v| v.to_str().ok())
            {
                Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
                _ => ip,
            },
        };
        let xff =
            HeaderValue::try_from(xff).or_err(InvalidHTTPHeader, "invalid X-Forwarded-For")?;
        put(req, "X-Forwarded-For", X_FORWARDED_FOR, xff, theirs.xff)?;
    }
    put(
        req,
        "X-Forwarded-Proto",
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if ctx.tls { "https" } else { "http" }),
        theirs.proto,
    )?;
    let original_host = match req.headers.get(http::header::HOST) {
        Some(h) => Some((h.clone(), true)),
        None => req
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .map(|h| (h, false)),
    };
    if let Some((h, had_host)) = original_host {
        if !had_host {
            req.insert_header(http::header::HOST, h.clone())?;
        }
        put(req, "X-Forwarded-Host", X_FORWARDED_HOST, h, theirs.host)?;
    }
    put(
        req,
        "X-Request-Id",
        REQUEST_ID,
        ctx.request_id_value(),
        theirs.request_id,
    )?;
    // apps build URLs from it: only tollgate says it (when a route strips a prefix)
    if theirs.prefix {
        req.remove_header(&X_FORWARDED_PREFIX);
    }
    if let Some(record) = record {
        let o = &record.declared.options;
        if o.strip.is_some() || o.prepend.is_some() || o.host.is_some() {
            route_rewrites(req, ctx, o)?;
        }
        // the operator's rules last: they may replace what tollgate set
        if !record.request_ops.is_empty() {
            super::headers::apply(req, &record.request_ops, ctx)?;
        }
    }
    Ok(())
}

/// Which of the fields tollgate sets the client sent itself.
#[derive(Default)]
struct Theirs {
    xff: bool,
    proto: bool,
    host: bool,
    request_id: bool,
    prefix: bool,
}

impl Theirs {
    fn note(&mut self, name: &HeaderName) {
        let n = name.as_str();
        if !n.starts_with("x-") {
            return;
        }
        if *name == X_FORWARDED_FOR {
            self.xff = true;
        } else if *name == X_FORWARDED_PROTO {
            self.proto = true;
        } else if *name == X_FORWARDED_HOST {
            self.host = true;
        } else if *name == REQUEST_ID {
            self.request_id = true;
        } else if *name == X_FORWARDED_PREFIX {
            self.prefix = true;
        }
    }
}

/// A route's path and Host options, applied to the request sent upstream.
fn route_rewrites(
    req: &mut RequestHeader,
    ctx: &RequestCtx,
    o: &crate::config::RouteOptions,
) -> Result<()> {
    let path = req.uri.path();
    if let Some(new) = crate::routing::path::rewrite(path, o.strip.as_deref(), o.prepend.as_deref())
    {
        if let Some(s) = o
            .strip
            .as_deref()
            .filter(|s| crate::routing::path::strips(path, s))
        {
            req.insert_header(X_FORWARDED_PREFIX, s)?;
        }
        let pq = match req.uri.query() {
            Some(q) => format!("{new}?{q}"),
            None => new,
        };
        let uri = pq
            .parse::<http::Uri>()
            .or_err(InvalidHTTPHeader, "route rewrite made an invalid path")?;
        req.set_uri(uri);
    }
    match o.host.as_deref() {
        Some("dst") => {
            let backend = ctx
                .pool
                .as_ref()
                .zip(ctx.backend)
                .and_then(|(p, i)| p.backends.get(i));
            if let Some(b) = backend {
                req.insert_header(http::header::HOST, b.address.to_string())?;
            }
        }
        Some(name) => req.insert_header(http::header::HOST, name)?,
        None => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_as_text() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.100.9.99",
            "::1",
            "2001:db8::7",
        ] {
            let parsed: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(parsed), parsed.to_string(), "{ip}");
        }
    }
}
