//! The HTTP side of Consul: the client (TLS roots, token), one blocking GET with Consul's
//! index rules, timeouts and error wording, query encoding.

use crate::config::ConsulSettings;
use std::time::Duration;

/// The index to send next, from the one we sent (`prev`) and the one Consul answered with.
/// Consul's rules: a missing index means no blocking is possible (start over); an index
/// that went backwards (agent restarted, state lost) resets to 0; and the index sent is never
/// below 1, so a reset turns into an immediate full read rather than a busy loop.
pub fn next_index(prev: u64, answered: Option<u64>) -> u64 {
    let next = match answered {
        None => 0,
        Some(i) if i < prev => 0,
        Some(i) => i,
    };
    next.max(1)
}

pub(crate) fn client(s: &ConsulSettings) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(256);
    if let Some(ca) = &s.ca_cert {
        let pem = std::fs::read(ca)
            .map_err(|e| format!("cannot read consul.ca_cert {}: {e}", ca.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
            format!(
                "consul.ca_cert {} is not a PEM certificate: {e}",
                ca.display()
            )
        })?;
        b = b.add_root_certificate(cert);
    }
    b.build()
        .map_err(|e| format!("cannot build the Consul client: {e}"))
}

/// The ACL token to send: `consul.token`, else the content of `consul.token_file`, read at
/// every query so a rotated token is used at once. A file that cannot be read is logged
/// (once until it reads again) and the query goes without a token.
pub(crate) fn token(s: &ConsulSettings) -> Option<String> {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Some(t) = &s.token {
        return Some(t.clone());
    }
    match crate::config::secret::read(s.token_file.as_ref()?, 1) {
        Ok(t) => {
            WARNED.store(false, Relaxed);
            Some(t)
        }
        Err(e) => {
            if !WARNED.swap(true, Relaxed) {
                tracing::warn!("consul.token_file: {e}; querying Consul without a token");
            }
            None
        }
    }
}

/// A reqwest error with its causes, and a timeout said as such.
pub(crate) fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!(
            "Consul did not answer within {timeout:?} (wait + wait/16 + 5s): timed out"
        );
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One blocking GET: `path` with `index`, `wait`, `dc`, `stale` and `params`; the settings'
/// token and timeout (wait + wait/16, Consul's own jitter, + a margin). Returns the next index
/// to send (Consul's index rules) and the body. A 403, any other error status and an answer
/// from servers without a leader (unless stale reads are allowed) are errors that say so.
pub(crate) async fn consul_get(
    http: &reqwest::Client,
    s: &ConsulSettings,
    path: &str,
    what: &str,
    dc: Option<&String>,
    params: &[(&str, String)],
    index: u64,
) -> Result<(u64, bytes::Bytes), String> {
    let mut url = format!(
        "{}{path}?index={index}&wait={}s",
        s.address,
        s.wait.as_secs()
    );
    let dc_param = dc.map(|d| ("dc", d.clone()));
    let stale = s.stale.then(|| ("stale", String::new()));
    for (k, v) in params.iter().cloned().chain(dc_param).chain(stale) {
        url.push('&');
        url.push_str(k);
        if !v.is_empty() {
            url.push('=');
            url.push_str(&urlencode(&v));
        }
    }
    let timeout = s.wait + s.wait / 16 + Duration::from_secs(5);
    let mut req = http.get(&url).timeout(timeout);
    if let Some(t) = token(s) {
        req = req.header("X-Consul-Token", t);
    }
    let resp = req.send().await.map_err(|e| describe(&e, timeout))?;
    let status = resp.status();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let answered = header("x-consul-index").and_then(|v| v.parse::<u64>().ok());
    let known_leader = header("x-consul-knownleader")
        .map(|v| v != "false")
        .unwrap_or(true);
    // read the body in every case, so the connection can be reused
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    if status.is_success() && !known_leader && !s.stale {
        return Err("the Consul servers have no leader (X-Consul-KnownLeader: false): not acting on a possibly stale answer".into());
    }
    if status == reqwest::StatusCode::FORBIDDEN {
        return Err(format!(
            "403 Forbidden: the Consul token cannot read {what} ({})",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    if status == reqwest::StatusCode::NOT_FOUND && path.starts_with("/v1/kv/") {
        // a KV prefix with no keys (yet): Consul says 404, with the index to block on
        return Ok((
            next_index(index, answered),
            bytes::Bytes::from_static(b"[]"),
        ));
    }
    if !status.is_success() {
        return Err(format!(
            "{path}: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    Ok((next_index(index, answered), body))
}

/// `s` for plain reads: a `wait` of 1 s, so an index that has not moved answers soon.
pub(crate) fn quick(s: &ConsulSettings) -> ConsulSettings {
    ConsulSettings {
        wait: Duration::from_secs(1),
        ..s.clone()
    }
}

/// One blocking GET on a catalog-wide endpoint (`path`).
pub(crate) async fn blocking_get(
    http: &reqwest::Client,
    s: &ConsulSettings,
    path: &str,
    index: u64,
) -> Result<(u64, bytes::Bytes), String> {
    consul_get(http, s, path, path, s.datacenter.as_ref(), &[], index).await
}

/// One blocking query on an endpoint whose index moves with any change of its kind.
pub(crate) async fn block_on(
    http: &reqwest::Client,
    s: &ConsulSettings,
    path: &str,
    index: u64,
) -> Result<u64, String> {
    blocking_get(http, s, path, index)
        .await
        .map(|(next, _)| next)
}
