//! Active health checks: an HTTP GET of each backend's `health_check.path` (or a TCP
//! connect, or the gRPC health-checking protocol) every interval
//! (the first one at a random point of it, so probes spread), for the pools of the live
//! Snapshot only. Results go to the backend's state (`upstream::BackendState::record_probe`),
//! which survives reloads for backends that stay; a backend is used only when both its
//! passive and its active health allow it. Must not build Snapshots or touch requests.

use crate::config::{ActiveCheck, CheckKind};
use crate::state::Snapshot;
use crate::upstream::peer::http_peer;
use crate::upstream::Pool;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// Runs the probes the live Snapshot's pools ask for.
pub struct Prober {
    live: Arc<ArcSwap<Snapshot>>,
}

impl Prober {
    pub fn new(live: Arc<ArcSwap<Snapshot>>) -> Self {
        Prober { live }
    }
}

/// The connector probes use: pingora's, as requests use, but with its own connection pools.
type Connector = pingora::connectors::http::Connector;

/// One probe: passed or not, and what it found (`200`, `503`, `SERVING`, `timed out after
/// 1s`, …). HTTP and gRPC probes connect as requests do (`upstream::peer::http_peer`: the
/// pool's protocol, TLS, client certificate), so a backend that refuses tollgate's
/// certificate fails its check too.
async fn probe(conn: &Connector, pool: &Pool, i: usize, check: &ActiveCheck) -> (bool, String) {
    let addr = pool.backends[i].address;
    let fut = async {
        match &check.kind {
            CheckKind::Tcp => match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => (true, "connected".into()),
                Err(e) => (false, format!("connect: {e}")),
            },
            CheckKind::Http(path) => match http_probe(conn, pool, i, path, check).await {
                Ok(r) => r,
                Err(e) => (false, describe(&e)),
            },
            CheckKind::Grpc(service) => match grpc_probe(conn, pool, i, service).await {
                Ok(r) => r,
                Err(e) => (false, describe(&e)),
            },
        }
    };
    match tokio::time::timeout(check.timeout, fut).await {
        Ok(r) => r,
        Err(_) => (false, format!("timed out after {:?}", check.timeout)),
    }
}

fn describe(e: &pingora::Error) -> String {
    match e.etype() {
        pingora::ErrorType::ConnectRefused => "connection refused".into(),
        pingora::ErrorType::TLSHandshakeFailure
        | pingora::ErrorType::InvalidCert
        | pingora::ErrorType::HandshakeError => format!("TLS handshake failed: {e}"),
        _ => e.to_string(),
    }
}

/// The request head a probe sends: the Host is the name TLS verifies, else the address.
fn probe_request(peer: &HttpPeer, method: &str, path: &str) -> pingora::Result<RequestHeader> {
    let host = if peer.sni.is_empty() {
        peer._address.to_string()
    } else {
        peer.sni.clone()
    };
    let mut req = RequestHeader::build(method, path.as_bytes(), None)?;
    req.insert_header(http::header::HOST, host)?;
    req.insert_header(http::header::USER_AGENT, "tollgate-health-check")?;
    Ok(req)
}

async fn http_probe(
    conn: &Connector,
    pool: &Pool,
    i: usize,
    path: &str,
    check: &ActiveCheck,
) -> pingora::Result<(bool, String)> {
    let peer = http_peer(pool, i);
    let (mut session, _) = conn.get_http_session(&peer).await?;
    session
        .write_request_header(Box::new(probe_request(&peer, "GET", path)?))
        .await?;
    session.finish_request_body().await?;
    session.read_response_header().await?;
    let status = session.response_header().map_or(0, |r| r.status.as_u16());
    // drain a short body so the connection can carry the next probe
    let mut left = 64 * 1024;
    while let Some(b) = session.read_response_body().await? {
        left -= b.len().min(left);
        if left == 0 {
            break;
        }
    }
    if left > 0 && session.response_done() {
        conn.release_http_session(session, &peer, Some(pool.spec.idle_timeout))
            .await;
    }
    let passed = (check.status.0..=check.status.1).contains(&status);
    Ok((passed, status.to_string()))
}

/// `grpc.health.v1.Health/Check`: SERVING with grpc-status 0 passes.
async fn grpc_probe(
    conn: &Connector,
    pool: &Pool,
    i: usize,
    service: &str,
) -> pingora::Result<(bool, String)> {
    let peer = http_peer(pool, i);
    let (mut session, _) = conn.get_http_session(&peer).await?;
    let mut req = probe_request(&peer, "POST", "/grpc.health.v1.Health/Check")?;
    req.insert_header(http::header::CONTENT_TYPE, "application/grpc")?;
    req.insert_header(http::header::TE, "trailers")?;
    session.write_request_header(Box::new(req)).await?;
    session
        .write_request_body(grpc_health_request(service), true)
        .await?;
    session.finish_request_body().await?;
    session.read_response_header().await?;
    let head = session.response_header().cloned();
    let mut body = Vec::new();
    while let Some(b) = session.read_response_body().await? {
        if body.len() + b.len() > 4096 {
            return Ok((false, "health answer over 4 KiB".into()));
        }
        body.extend_from_slice(&b);
    }
    let trailers = match &mut session {
        pingora::protocols::http::client::HttpSession::H2(h2) => h2.read_trailers().await?,
        _ => None,
    };
    // grpc-status in the trailers, or in the head of a trailers-only answer
    let grpc_status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| head.as_ref().and_then(|h| h.headers.get("grpc-status")))
        .and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
    let http_status = head.as_ref().map_or(0, |h| h.status.as_u16());
    Ok(match grpc_status {
        Some(0) => match grpc_serving_status(&body) {
            Some(1) => (true, "SERVING".into()),
            Some(2) => (false, "NOT_SERVING".into()),
            Some(3) => (false, "SERVICE_UNKNOWN".into()),
            Some(n) => (false, format!("serving status {n}")),
            None => (false, "no health answer in the body".into()),
        },
        Some(n) => (false, format!("grpc-status {n}")),
        None => (false, format!("HTTP {http_status} without grpc-status")),
    })
}

/// One gRPC message: `HealthCheckRequest { service }` (field 1, a string) in the
/// length-prefixed framing.
fn grpc_health_request(service: &str) -> bytes::Bytes {
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a);
        let mut n = service.len();
        while n >= 0x80 {
            msg.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    framed.into()
}

/// `HealthCheckResponse.status` (field 1, an enum) from a framed, uncompressed answer.
fn grpc_serving_status(body: &[u8]) -> Option<u64> {
    let (&compressed, rest) = body.split_first()?;
    if compressed != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
    let mut msg = rest.get(4..4 + len)?;
    // an absent field is the default: UNKNOWN (0)
    let mut status = 0;
    while let Some((&tag, tail)) = msg.split_first() {
        let (value, used) = varint(tail)?;
        match tag {
            0x08 => status = value,
            // another varint field: skip it; anything else is not this message
            t if t & 0x07 == 0 => {}
            _ => return None,
        }
        msg = &tail[used..];
    }
    Some(status)
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (k, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * k);
        if byte & 0x80 == 0 {
            return Some((v, k + 1));
        }
    }
    None
}

#[async_trait]
impl BackgroundService for Prober {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let conn = Arc::new(Connector::new(None));
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            let snap = self.live.load_full();
            let now = crate::clock::now_ms();
            for pool in snap.pools.iter() {
                let Some(check) = &pool.spec.check else {
                    continue;
                };
                let every = check.interval.as_millis() as u64;
                for (i, b) in pool.backends.iter().enumerate() {
                    let next = b.state.next_probe_ms.load(Relaxed);
                    if next == 0 {
                        // spread the first probes over one interval
                        let first = now + fastrand::u64(0..every.max(1));
                        b.state.next_probe_ms.store(first, Relaxed);
                        continue;
                    }
                    if now < next {
                        continue;
                    }
                    b.state.next_probe_ms.store(now + every, Relaxed);
                    let (conn, pool, check) = (conn.clone(), pool.clone(), check.clone());
                    tokio::spawn(async move { run(&conn, &pool, i, &check).await });
                }
            }
        }
    }
}

async fn run(conn: &Connector, pool: &Pool, i: usize, check: &ActiveCheck) {
    let (passed, found) = probe(conn, pool, i, check).await;
    let (state, addr, pool) = (
        &pool.backends[i].state,
        pool.backends[i].address,
        &pool.name,
    );
    match state.record_probe(passed, check.healthy, check.unhealthy) {
        Some(false) => tracing::warn!(
            pool,
            backend = %addr,
            found = %found,
            "backend taken out: it failed its health check {} times in a row",
            check.unhealthy
        ),
        Some(true) => tracing::info!(
            pool,
            backend = %addr,
            "backend back in rotation: it passed its health check {} times in a row",
            check.healthy
        ),
        None => {}
    }
    *state.last_probe.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((crate::clock::unix_ms(), found));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_health_messages() {
        // the whole server: an empty message
        assert_eq!(&grpc_health_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &grpc_health_request("a.B")[..],
            &[0, 0, 0, 0, 5, 0x0a, 3, b'a', b'.', b'B']
        );
        let long = "s".repeat(200);
        let framed = grpc_health_request(&long);
        assert_eq!(&framed[5..8], &[0x0a, 0xc8, 0x01]);
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(1));
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
        // an empty message is UNKNOWN; a compressed or cut one is not read
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 0]), Some(0));
        assert_eq!(grpc_serving_status(&[1, 0, 0, 0, 2, 0x08, 1]), None);
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 9, 0x08, 1]), None);
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 2, 0x0a, 1]), None);
    }
}
