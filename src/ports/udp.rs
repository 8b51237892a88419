//! UDP service ports: per client address a flow to one backend (affinity), kept while
//! packets flow and dropped after the port's idle timeout; replies go back from the port's
//! own socket; at most `max_flows` at once (a new client beyond that is dropped and
//! counted). New flows follow the pool as it is now; a backend gone from the pool gets no
//! new flow. A datagram has no connection to admit, so `limits`' per-IP caps do not apply;
//! `max_flows` bounds what a flood of source addresses can hold.

use super::{find, Key, Shared};
use crate::clock::now_ms;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;

struct Flow {
    upstream: Arc<UdpSocket>,
    last: Arc<AtomicU64>,
    replies: tokio::task::JoinHandle<()>,
    _inflight: crate::upstream::InflightGuard,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

pub(super) async fn serve(shared: Shared, k: Key, socket: UdpSocket) {
    let socket = Arc::new(socket);
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    let mut sweep = tokio::time::interval(Duration::from_millis(500));
    loop {
        let (n, client) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // an ICMP error from an earlier send_to, and the like
                Err(_) => continue,
            },
            _ = sweep.tick() => {
                let snap = shared.live.load();
                let Some(port) = find(&snap, k) else { return };
                let idle = port.spec.idle_timeout.as_millis() as u64;
                let now = now_ms();
                let before = flows.len();
                flows.retain(|_, f| now.saturating_sub(f.last.load(Relaxed)) < idle);
                port.metrics.open.fetch_sub((before - flows.len()) as u64, Relaxed);
                continue;
            }
        };
        let snap = shared.live.load();
        let Some(port) = find(&snap, k) else { return };
        let m = &port.metrics;
        let flow = match flows.get(&client) {
            Some(f) => f,
            None => {
                if flows.len() >= port.spec.max_flows {
                    m.refused.fetch_add(1, Relaxed);
                    continue;
                }
                let Some(pool) = port.pool.map(|i| snap.pools[i].clone()) else {
                    continue;
                };
                let Some(i) = pool.select(now_ms(), &[]) else {
                    m.refused.fetch_add(1, Relaxed);
                    continue;
                };
                let backend = pool.backends[i].address;
                let local: SocketAddr = if backend.is_ipv4() {
                    "0.0.0.0:0".parse().unwrap_or(backend)
                } else {
                    "[::]:0".parse().unwrap_or(backend)
                };
                let upstream = match UdpSocket::bind(local).await {
                    Ok(u) if u.connect(backend).await.is_ok() => Arc::new(u),
                    _ => {
                        m.connect_failures.fetch_add(1, Relaxed);
                        continue;
                    }
                };
                let last = Arc::new(AtomicU64::new(now_ms()));
                let replies = tokio::spawn(replies(
                    upstream.clone(),
                    socket.clone(),
                    client,
                    last.clone(),
                    port.metrics.clone(),
                ));
                m.total.fetch_add(1, Relaxed);
                m.open.fetch_add(1, Relaxed);
                flows.insert(
                    client,
                    Flow {
                        upstream,
                        last,
                        replies,
                        _inflight: crate::upstream::InflightGuard::new(
                            pool.backends[i].state.clone(),
                        ),
                    },
                );
                &flows[&client]
            }
        };
        flow.last.store(now_ms(), Relaxed);
        if flow.upstream.send(&buf[..n]).await.is_ok() {
            m.bytes_in.fetch_add(n as u64, Relaxed);
        }
    }
}

/// The largest reply a flow passes back. Each flow holds a buffer this size, so `max_flows`
/// flows hold at most `max_flows` × 16 KiB (160 MiB at the default 10,000); a larger reply
/// is dropped and counted, never truncated.
const MAX_REPLY: usize = 16 * 1024;

/// A flow's replies, sent back to its client from the port's socket.
async fn replies(
    upstream: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    last: Arc<AtomicU64>,
    m: Arc<crate::metrics::PortMetrics>,
) {
    let mut buf = vec![0u8; MAX_REPLY + 1];
    loop {
        let n = match upstream.recv(&mut buf).await {
            Ok(n) => n,
            // ICMP port unreachable from a dead backend: keep the flow until it idles out
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        last.store(now_ms(), Relaxed);
        if n > MAX_REPLY {
            m.refused.fetch_add(1, Relaxed);
            continue;
        }
        if socket.send_to(&buf[..n], client).await.is_ok() {
            m.bytes_out.fetch_add(n as u64, Relaxed);
        }
    }
}
