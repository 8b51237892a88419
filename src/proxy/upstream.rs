//! Upstream phases: pick a backend, retry a failed connect on another backend (idempotent
//! requests, bounded by the pool's `retries`), and feed passive health.

use super::RequestCtx;
use crate::clock::now_ms;
use crate::upstream::InflightGuard;
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use std::sync::atomic::Ordering::Relaxed;

pub(super) fn select_peer(ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
    let Some(pool) = ctx.pool.clone() else {
        return Error::e_explain(InternalError, "no pool chosen for the request");
    };
    let now = now_ms();
    if std::mem::take(&mut ctx.again) {
        // the keep-alive race (`on_proxy_error`): the same backend, on another connection
        if let Some(&i) = ctx.tried.last() {
            if pool.backends[i].state.is_available(now) {
                return Ok(chosen(ctx, &pool, i));
            }
        }
    }
    let Some(i) = pool.select(now, &ctx.tried) else {
        let reason = match &pool.spec.consul {
            Some(key) if pool.backends.is_empty() => format!(
                "pool {} is empty: Consul reports no passing instance of {key}",
                pool.name
            ),
            _ if pool.inflight_cap() > 0
                && pool.backends.iter().any(|b| b.state.is_available(now)) =>
            {
                format!(
                    "pool {}: every live backend is at its max_connections ({} requests)",
                    pool.name,
                    pool.inflight_cap()
                )
            }
            _ => format!("no live backend in pool {}", pool.name),
        };
        ctx.reason = Some(reason.clone().into());
        return Error::e_explain(HTTPStatus(503), reason);
    };
    ctx.tried.push(i);
    Ok(chosen(ctx, &pool, i))
}

fn chosen(ctx: &mut RequestCtx, pool: &crate::upstream::Pool, i: usize) -> Box<HttpPeer> {
    ctx.backend = Some(i);
    ctx.inflight = Some(InflightGuard::new(pool.backends[i].state.clone()));
    ctx.upstream_start = Some(std::time::Instant::now());
    Box::new(crate::upstream::peer::http_peer(pool, i))
}

/// An error on an upstream connection after it was handed over. pingora's rule stays: an
/// idempotent request is tried again only when the connection came from the pool (a
/// connection the backend closed just as the request went out: the keep-alive race no
/// check at reuse can close, since the close may cross the request on the wire). Such a
/// retry may go to the same backend, on another connection, and does not count against it
/// or against the pool's `retries`: with one backend it was a 503 ("no live backend"),
/// where nginx and HAProxy retry the request.
pub(super) fn on_proxy_error(
    peer: &HttpPeer,
    session: &mut Session,
    ctx: &mut RequestCtx,
    e: Box<Error>,
    client_reused: bool,
) -> Box<Error> {
    let mut e = e.more_context(format!("Peer: {peer}"));
    let idempotent = session.req_header().method.is_idempotent();
    if !idempotent || session.as_ref().retry_buffer_truncated() {
        e.set_retry(false);
    } else {
        e.retry.decide_reuse(client_reused);
    }
    if e.retry() && client_reused && ctx.upstream_status.is_none() {
        ctx.again = true;
        if let Some(pool) = &ctx.pool {
            pool.metrics.retries.fetch_add(1, Relaxed);
        }
    }
    e
}

/// A connect failure counts against the backend; the request moves to another backend when
/// it is idempotent, retries remain and another backend is available.
pub(super) fn on_connect_failure(
    session: &mut Session,
    ctx: &mut RequestCtx,
    mut e: Box<Error>,
) -> Box<Error> {
    let Some(pool) = ctx.pool.clone() else {
        return e;
    };
    let now = now_ms();
    pool.metrics.connect_failures.fetch_add(1, Relaxed);
    // tollgate's own shortage (descriptors, local ports) is not the backend's failure
    let local = e
        .root_cause()
        .downcast_ref::<std::io::Error>()
        .is_some_and(crate::upstream::local_shortage);
    if let Some(i) = ctx.backend.take() {
        ctx.inflight = None;
        let b = &pool.backends[i];
        if local {
            tracing::warn!(pool = %pool.name, backend = %b.address, error = %e, "cannot open a connection to a backend here");
        } else if let Some(ms) = b.state.record_failure(now, &pool.spec.health) {
            tracing::warn!(pool = %pool.name, backend = %b.address, eject_ms = ms, error = %e, "backend ejected after consecutive failures");
        }
    }
    let retries_used = ctx.tried.len().saturating_sub(1) as u32;
    let idempotent = session.req_header().method.is_idempotent();
    if idempotent && retries_used < pool.spec.retries && pool.has_available(now, &ctx.tried) {
        pool.metrics.retries.fetch_add(1, Relaxed);
        e.set_retry(true);
    } else {
        e.set_retry(false);
    }
    e
}

/// After the request: an upstream error counts against the backend, a response for it.
pub(super) fn record_outcome(e: Option<&Error>, ctx: &mut RequestCtx) {
    let (Some(pool), Some(i)) = (ctx.pool.as_ref(), ctx.backend) else {
        return;
    };
    let b = &pool.backends[i];
    match e {
        // The backend was waiting for a body the client never finished: not its failure.
        Some(err) if super::response::client_stalled(err, ctx) => {}
        Some(err) if *err.esource() == ErrorSource::Upstream && ctx.upstream_status.is_none() => {
            if let Some(ms) = b.state.record_failure(now_ms(), &pool.spec.health) {
                tracing::warn!(pool = %pool.name, backend = %b.address, eject_ms = ms, error = %err, "backend ejected after consecutive failures");
            }
        }
        _ if ctx.upstream_status.is_some() => b.state.record_success(),
        _ => {}
    }
    ctx.inflight = None;
}
