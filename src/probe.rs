//! Active health checks: an HTTP GET of each backend's `health_check.path` (or a TCP
//! connect) every interval
//! (the first one at a random point of it, so probes spread), for the pools of the live
//! Snapshot only. Results go to the backend's state (`upstream::BackendState::record_probe`),
//! which survives reloads for backends that stay; a backend is used only when both its
//! passive and its active health allow it. Must not build Snapshots or touch requests.

use crate::config::ActiveCheck;
use crate::state::Snapshot;
use crate::upstream::BackendState;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::net::SocketAddr;
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

/// One probe: passed or not, and what it found (`200`, `503`, `timed out after 1s`, …).
async fn probe(http: &reqwest::Client, addr: SocketAddr, check: &ActiveCheck) -> (bool, String) {
    let Some(path) = &check.path else {
        // a TCP check: the connection is the answer
        return match tokio::time::timeout(check.timeout, tokio::net::TcpStream::connect(addr)).await
        {
            Ok(Ok(_)) => (true, "connected".into()),
            Ok(Err(e)) => (false, format!("connect: {e}")),
            Err(_) => (false, format!("timed out after {:?}", check.timeout)),
        };
    };
    let url = format!("http://{addr}{path}");
    match http.get(&url).timeout(check.timeout).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let passed = (check.status.0..=check.status.1).contains(&status);
            (passed, status.to_string())
        }
        Err(e) if e.is_timeout() => (false, format!("timed out after {:?}", check.timeout)),
        Err(e) if e.is_connect() => (false, "connection refused or unreachable".into()),
        Err(e) => (false, e.to_string()),
    }
}

#[async_trait]
impl BackgroundService for Prober {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let http = match reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(1)
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("health checks cannot start: {e}");
                return;
            }
        };
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
                for b in &pool.backends {
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
                    let (http, check, state) = (http.clone(), check.clone(), b.state.clone());
                    let (pool, addr) = (pool.name.clone(), b.address);
                    tokio::spawn(async move { run(&http, &pool, addr, &check, &state).await });
                }
            }
        }
    }
}

async fn run(
    http: &reqwest::Client,
    pool: &str,
    addr: SocketAddr,
    check: &ActiveCheck,
    state: &BackendState,
) {
    let (passed, found) = probe(http, addr, check).await;
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
