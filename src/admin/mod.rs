//! The admin listener: a JSON API (`/status`, `/routes`, `/pools`, `/plugins`, `/certs`,
//! `/explain`, `POST /reload`, `POST /tls/rotate-ticket-keys`), Prometheus `/metrics`, and a
//! read-only HTML dashboard at `/`.
//! Separate from traffic listeners; every endpoint but `/healthz` needs the bearer token when
//! one is configured (a non-loopback address without a token is refused by config
//! validation). Owns: presenting state. Must not change routing state except through
//! `State::reload`.

mod api;
mod dashboard;

use crate::discovery::consul::WatchTable;
use crate::failover::peer::StatusCell;
use crate::limits::ConnTable;
use crate::proxy::ActiveRequests;
use crate::state::State;
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::Arc;

const COOKIE: &str = "tollgate_admin";

pub struct Admin {
    state: Arc<State>,
    shown: Shown,
}

/// What the admin API shows besides the Snapshot: counters and tables other services keep,
/// made by `server` and handed to them and to the admin API.
#[derive(Clone, Default)]
pub struct Shown {
    /// The proxy's requests in flight.
    pub active: ActiveRequests,
    /// The connection limits' table.
    pub conns: Arc<ConnTable>,
    /// How each Consul watch is doing.
    pub watches: WatchTable,
    /// The failover peer's status (empty without `[failover]`).
    pub failover: StatusCell,
    /// The TLS settings read at start (a reload does not change them).
    pub tls: TlsAtStart,
}

/// The TLS settings in effect since start: whose keys seal the session tickets, and whether
/// the post-quantum hybrid is offered.
#[derive(Clone, Default, Debug)]
pub struct TlsAtStart {
    pub session_tickets: bool,
    /// `tls.session_ticket_keys` files (0: the process's own keys).
    pub ticket_key_files: usize,
    pub post_quantum: bool,
    /// The fleet's keys in Consul (`tls.session_ticket_consul`).
    pub fleet: Option<Arc<crate::tls::fleet_tickets::FleetTickets>>,
}

impl Admin {
    pub fn new(state: Arc<State>, shown: Shown) -> Self {
        Admin { state, shown }
    }
}

/// Compare secrets in time independent of where they differ (and of their lengths): both
/// are hashed to 32 bytes and every byte is compared.
pub fn token_matches(given: &str, expected: &str) -> bool {
    use ring::digest::{digest, SHA256};
    let a = digest(&SHA256, given.as_bytes());
    let b = digest(&SHA256, expected.as_bytes());
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The dashboard cookie's value: derived from the token (HMAC-SHA256), so the cookie jar
/// never holds the token itself and a leaked cookie cannot be used as a bearer token.
fn cookie_value(token: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes());
    let tag = ring::hmac::sign(&key, b"tollgate admin dashboard cookie v1");
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The bearer token of an `Authorization` header; the scheme is case-insensitive (RFC 9110
/// §11.1).
fn bearer(v: &str) -> Option<&str> {
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Whether `Host` names this host as only a local client or an operator would: an IP address
/// or `localhost`, with an optional port. Without a token, that is what stops DNS rebinding
/// (a page on a name the attacker controls, resolved to 127.0.0.1) from reading the API.
fn local_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) => {
                return v6.parse::<std::net::Ipv6Addr>().is_ok()
                    && (port.is_empty()
                        || port
                            .strip_prefix(':')
                            .is_some_and(|p| p.parse::<u16>().is_ok()))
            }
            None => return false,
        },
        None => match host.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => h,
            Some(_) => return false,
            None => host,
        },
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

/// Whether a request comes from a page of another origin: `Origin` (sent by browsers on
/// every POST) names another host than `Host`, or `Sec-Fetch-Site` says cross-site.
fn cross_origin(req: &pingora::http::RequestHeader) -> bool {
    let h = |n: &str| req.headers.get(n).and_then(|v| v.to_str().ok());
    if h("sec-fetch-site").is_some_and(|s| s == "cross-site" || s == "same-site") {
        return true;
    }
    match h("origin") {
        None => false,
        Some(origin) => {
            let authority = origin.split_once("://").map(|(_, a)| a).unwrap_or("null");
            h("host").is_none_or(|host| !authority.eq_ignore_ascii_case(host))
        }
    }
}

pub(crate) fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .unwrap_or_default()
}

pub(crate) fn json(status: StatusCode, v: &serde_json::Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    respond(status, "application/json", body)
}

fn text(status: StatusCode, s: &str) -> Response<Vec<u8>> {
    respond(
        status,
        "text/plain; charset=utf-8",
        format!("{s}\n").into_bytes(),
    )
}

/// `name=value` pairs of a query string, percent-decoded.
pub(crate) fn query_params(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

enum Auth {
    Ok,
    Missing,
    Wrong,
}

impl Admin {
    fn auth(&self, session: &ServerSession, expected: Option<&str>, allow_cookie: bool) -> Auth {
        let Some(expected) = expected else {
            return Auth::Ok;
        };
        let req = session.req_header();
        let bearer = req
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        if let Some(t) = bearer {
            return if token_matches(t, expected) {
                Auth::Ok
            } else {
                Auth::Wrong
            };
        }
        let cookie = allow_cookie
            .then(|| {
                req.headers
                    .get_all(http::header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(';'))
                    .filter_map(|c| {
                        c.trim()
                            .strip_prefix(&format!("{COOKIE}="))
                            .map(str::to_string)
                    })
                    .next()
            })
            .flatten();
        match cookie {
            None => Auth::Missing,
            Some(c) if token_matches(c.trim(), &cookie_value(expected)) => Auth::Ok,
            Some(_) => Auth::Wrong,
        }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let uri = session.req_header().uri.clone();
        let path = uri.path();
        if path == "/healthz" {
            return text(StatusCode::OK, "ok");
        }
        let snap = self.state.snapshot();
        let token = snap.admin_token.as_deref();
        let req = session.req_header();
        if token.is_none() {
            let host = req
                .headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok());
            if !host.is_some_and(local_host) {
                return text(
                    StatusCode::MISDIRECTED_REQUEST,
                    "without admin.token the admin API answers only to Host: an IP address or localhost",
                );
            }
        }
        if method != Method::GET && method != Method::HEAD && cross_origin(req) {
            tracing::warn!(client = ?session.client_addr().map(|a| a.to_string()), path, "cross-origin admin request refused");
            return text(StatusCode::FORBIDDEN, "cross-origin request refused");
        }
        let head = method == Method::HEAD;
        let method = if head { Method::GET } else { method };

        // The dashboard accepts `/?token=…` once and answers with a cookie (SameSite=Strict,
        // HttpOnly), so a browser can be pointed at it; the cookie is honoured for GET only.
        if method == Method::GET && path == "/" {
            if let (Some(expected), Some((_, given))) = (
                token,
                query_params(uri.query())
                    .into_iter()
                    .find(|(k, _)| k == "token"),
            ) {
                if token_matches(&given, expected) {
                    return Response::builder()
                        .status(StatusCode::SEE_OTHER)
                        .header(http::header::LOCATION, "/")
                        .header(
                            http::header::SET_COOKIE,
                            format!(
                                "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
                                cookie_value(expected)
                            ),
                        )
                        .header(http::header::CONTENT_LENGTH, 0)
                        .body(Vec::new())
                        .unwrap_or_default();
                }
            }
        }
        match self.auth(session, token, method == Method::GET) {
            Auth::Ok => {}
            Auth::Missing | Auth::Wrong if method == Method::GET && path == "/" => {
                return respond(
                    StatusCode::UNAUTHORIZED,
                    "text/html; charset=utf-8",
                    dashboard::login_page().into_bytes(),
                )
            }
            Auth::Missing => {
                let mut r = text(
                    StatusCode::UNAUTHORIZED,
                    "admin token required: Authorization: Bearer <token>",
                );
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer realm=\"tollgate\""),
                );
                return r;
            }
            Auth::Wrong => {
                tracing::warn!(client = ?session.client_addr().map(|a| a.to_string()), path, "admin request with a wrong token");
                let mut r = text(StatusCode::UNAUTHORIZED, "wrong admin token");
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static(
                        "Bearer realm=\"tollgate\", error=\"invalid_token\"",
                    ),
                );
                return r;
            }
        }
        match (method.clone(), path) {
            (Method::GET, "/") => respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                dashboard::page(&self.state, &snap, self.shown.active.count()).into_bytes(),
            ),
            (Method::GET, "/status") => json(
                StatusCode::OK,
                &api::status(&self.state, &snap, &self.shown),
            ),
            (Method::GET, "/routes") => json(StatusCode::OK, &api::routes(&snap)),
            (Method::GET, "/pools") => {
                json(StatusCode::OK, &api::pools(&snap, &self.shown.watches))
            }
            (Method::GET, "/plugins") => json(StatusCode::OK, &api::plugins(&snap)),
            (Method::GET, "/certs") => json(StatusCode::OK, &api::certs(&snap)),
            (Method::GET, "/explain") => api::explain(&snap, uri.query(), &self.shown.watches),
            (Method::GET, "/metrics") => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                api::metrics_text(&self.state, &snap, &self.shown).into_bytes(),
            ),
            (Method::POST, "/reload") => match self.state.reload() {
                Ok(generation) => json(
                    StatusCode::OK,
                    &serde_json::json!({"ok": true, "generation": generation}),
                ),
                Err(e) => json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &serde_json::json!({
                        "ok": false,
                        "errors": e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                    }),
                ),
            },
            (Method::POST, "/tls/rotate-ticket-keys") => match &self.shown.tls.fleet {
                Some(fleet) => match fleet.rotate(true).await {
                    Ok(_) => json(StatusCode::OK, &serde_json::json!({"ok": true})),
                    Err(e) => json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &serde_json::json!({"ok": false, "error": e}),
                    ),
                },
                None => json(
                    StatusCode::CONFLICT,
                    &serde_json::json!({
                        "ok": false,
                        "error": "session ticket keys are not kept in Consul here (tls.session_ticket_consul): key files roll by editing the list, a process's own keys by a restart",
                    }),
                ),
            },
            (
                _,
                "/"
                | "/status"
                | "/routes"
                | "/pools"
                | "/plugins"
                | "/certs"
                | "/explain"
                | "/metrics"
                | "/reload"
                | "/tls/rotate-ticket-keys",
            ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            _ => text(StatusCode::NOT_FOUND, "no such admin endpoint"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches("s3cret-token-0123", "s3cret-token-0123"));
        assert!(!token_matches("s3cret-token-0124", "s3cret-token-0123"));
        assert!(!token_matches("s3cret", "s3cret-token-0123"));
        assert!(!token_matches("", "s3cret-token-0123"));
    }

    #[test]
    fn query_strings_are_decoded() {
        let q = query_params(Some(
            "host=a.example.com&path=%2Fapi%2Fv1%3Fx&flag&t=a+b&bad=%zz",
        ));
        assert_eq!(q[0], ("host".into(), "a.example.com".into()));
        assert_eq!(q[1], ("path".into(), "/api/v1?x".into()));
        assert_eq!(q[2], ("flag".into(), "".into()));
        assert_eq!(q[3], ("t".into(), "a b".into()));
        assert_eq!(q[4], ("bad".into(), "%zz".into()));
    }
}
