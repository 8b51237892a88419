//! UDP service ports: per client address a flow to one backend (affinity), kept while the
//! client sends and dropped after the port's idle timeout (replies alone do not keep it);
//! replies go back from the port's own socket, at most `replies_per_datagram` after each
//! client datagram (so a spoofed source address cannot be flooded through tollgate). At most
//! `max_flows` flows at once and `max_flows_per_ip` per client address (a new client beyond
//! either is dropped and counted); each flow's socket is taken from the ports' share of the
//! open-file limit (`FdBudget`). New flows follow the pool as it is now; a backend gone from
//! the pool gets no new flow, and one that answers with ICMP port unreachable counts a
//! failure (passive ejection), as a refused TCP connect does. A datagram has no connection
//! to admit, so `limits`' per-IP caps do not apply.

use super::{find, FdGuard, Key, Shared};
use crate::clock::now_ms;
use crate::config::HealthPolicy;
use crate::upstream::BackendState;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;

struct Flow {
    upstream: Arc<UdpSocket>,
    /// When the client last sent (`clock::now_ms`): what the idle timeout counts from.
    last: u64,
    /// Replies the backend may still send before the client's next datagram (`None`: no
    /// limit).
    budget: Option<Arc<AtomicI64>>,
    replies: tokio::task::JoinHandle<()>,
    _inflight: crate::upstream::InflightGuard,
    _fd: FdGuard,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

/// Flows per client IP address.
#[derive(Default)]
struct PerIp(HashMap<IpAddr, usize>);

impl PerIp {
    fn count(&self, ip: IpAddr) -> usize {
        self.0.get(&ip).copied().unwrap_or(0)
    }
    fn add(&mut self, ip: IpAddr) {
        *self.0.entry(ip).or_default() += 1;
    }
    fn remove(&mut self, ip: IpAddr) {
        if let Some(n) = self.0.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&ip);
            }
        }
    }
}

pub(super) async fn serve(shared: Shared, k: Key, socket: UdpSocket) {
    let socket = Arc::new(socket);
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut per_ip = PerIp::default();
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
                flows.retain(|c, f| {
                    let keep = now.saturating_sub(f.last) < idle;
                    if !keep {
                        per_ip.remove(c.ip());
                    }
                    keep
                });
                port.metrics.open.fetch_sub((before - flows.len()) as u64, Relaxed);
                continue;
            }
        };
        let snap = shared.live.load();
        let Some(port) = find(&snap, k) else { return };
        let m = &port.metrics;
        let flow = match flows.get_mut(&client) {
            Some(f) => f,
            None => {
                if flows.len() >= port.spec.max_flows
                    || per_ip.count(client.ip()) >= port.spec.max_flows_per_ip
                {
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
                let Some(fd) = shared.fds.take(1, &port.spec.name) else {
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
                    // out of descriptors or local ports: tollgate's shortage, not the
                    // backend's (it is not counted against it)
                    _ => {
                        m.connect_failures.fetch_add(1, Relaxed);
                        continue;
                    }
                };
                let n_replies = port.spec.replies_per_datagram;
                let budget = (n_replies > 0).then(|| Arc::new(AtomicI64::new(0)));
                let replies = tokio::spawn(replies(Replies {
                    upstream: upstream.clone(),
                    socket: socket.clone(),
                    client,
                    budget: budget.clone(),
                    m: port.metrics.clone(),
                    backend: pool.backends[i].state.clone(),
                    health: pool.spec.health.clone(),
                    pool: pool.name.clone(),
                    address: backend,
                }));
                m.total.fetch_add(1, Relaxed);
                m.open.fetch_add(1, Relaxed);
                per_ip.add(client.ip());
                flows.insert(
                    client,
                    Flow {
                        upstream,
                        last: now_ms(),
                        budget,
                        replies,
                        _inflight: crate::upstream::InflightGuard::new(
                            pool.backends[i].state.clone(),
                        ),
                        _fd: fd,
                    },
                );
                flows.get_mut(&client).expect("just inserted")
            }
        };
        flow.last = now_ms();
        if let Some(b) = &flow.budget {
            // the backend may answer this datagram with up to `replies_per_datagram`
            b.store(i64::from(port.spec.replies_per_datagram), Relaxed);
        }
        if flow.upstream.send(&buf[..n]).await.is_ok() {
            m.bytes_in.fetch_add(n as u64, Relaxed);
        }
    }
}

/// The largest reply a flow passes back. Each flow holds a buffer this size, so `max_flows`
/// flows hold at most `max_flows` × 16 KiB (160 MiB at the default 10,000); a larger reply
/// is dropped and counted, never truncated.
const MAX_REPLY: usize = 16 * 1024;

/// What a flow's reply task needs.
struct Replies {
    upstream: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    budget: Option<Arc<AtomicI64>>,
    m: Arc<crate::metrics::PortMetrics>,
    backend: Arc<BackendState>,
    health: HealthPolicy,
    pool: String,
    address: SocketAddr,
}

/// A flow's replies, sent back to its client from the port's socket while its budget lasts.
/// A backend that answers with ICMP port unreachable (the socket's ECONNREFUSED) counts a
/// failure, one that replies a success.
async fn replies(r: Replies) {
    let mut buf = vec![0u8; MAX_REPLY + 1];
    loop {
        let n = match r.upstream.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    r.m.connect_failures.fetch_add(1, Relaxed);
                    if let Some(ms) = r.backend.record_failure(now_ms(), &r.health) {
                        tracing::warn!(pool = %r.pool, backend = %r.address, eject_ms = ms, error = %e, "backend ejected after consecutive failures");
                    }
                }
                // keep the flow until it idles out
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        r.backend.record_success();
        if n > MAX_REPLY {
            r.m.refused.fetch_add(1, Relaxed);
            continue;
        }
        if let Some(b) = &r.budget {
            if b.fetch_sub(1, Relaxed) <= 0 {
                b.fetch_add(1, Relaxed);
                r.m.refused.fetch_add(1, Relaxed);
                continue;
            }
        }
        if r.socket.send_to(&buf[..n], r.client).await.is_ok() {
            r.m.bytes_out.fetch_add(n as u64, Relaxed);
        }
    }
}
