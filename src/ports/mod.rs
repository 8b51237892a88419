//! Service ports: TCP, UDP, TLS-terminated TCP and TLS passthrough by SNI, to the pools of
//! the live Snapshot (`[[port]]`). One background service keeps a listener per port the live
//! Snapshot declares: it opens the new ones and closes the ones gone after each reload or
//! Consul change; established connections stay on the backend they have, new ones follow
//! the pool as it is now. Connections take a slot in `limits`' table (global and per-IP caps,
//! per-IP rate) and count as in flight for the drain-aware shutdown. Must not build
//! Snapshots.
//!
//! `hello` (the ClientHello's server name; pure), `tcp` (accept, connect with retries,
//! the byte copy with half-close and an idle timeout), `udp` (flows per client address).

pub mod hello;
mod tcp;
mod udp;

use crate::config::{PortProtocol, PortSpec};
use crate::limits::ConnTable;
use crate::proxy::ActiveRequests;
use crate::state::{Port, Snapshot};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Keeps the live Snapshot's ports listening.
pub struct Ports {
    live: Arc<ArcSwap<Snapshot>>,
    conns: Arc<ConnTable>,
    active: ActiveRequests,
    tls: Arc<rustls::ServerConfig>,
}

/// What the accept loops share: where to find the port in the Snapshot, and the tables.
#[derive(Clone)]
struct Shared {
    live: Arc<ArcSwap<Snapshot>>,
    conns: Arc<ConnTable>,
    active: ActiveRequests,
    tls: Arc<rustls::ServerConfig>,
    fds: Arc<FdBudget>,
}

/// The file descriptors service ports may hold: a TCP port connection holds two (client and
/// backend), a UDP flow one (its socket to the backend). Ports may take at most three
/// quarters of the open-file limit, so a flood on a port leaves the listeners, the HTTP
/// connections and their upstreams the rest, instead of failing them with EMFILE.
#[derive(Debug)]
pub struct FdBudget {
    held: AtomicU64,
    cap: u64,
    /// Whether a refusal has been logged since the budget last had room.
    said: AtomicBool,
}

impl FdBudget {
    /// The budget under the process's open-file limit now.
    pub fn from_rlimit() -> FdBudget {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct passed to it.
        let limit = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur
        } else {
            1024
        };
        FdBudget::with_cap(limit / 4 * 3)
    }

    pub fn with_cap(cap: u64) -> FdBudget {
        FdBudget {
            held: AtomicU64::new(0),
            cap,
            said: AtomicBool::new(false),
        }
    }

    /// Take `n` descriptors, or `None` (logged once until there is room again) when that
    /// would go over the budget.
    pub fn take(self: &Arc<Self>, n: u64, port: &str) -> Option<FdGuard> {
        let taken = self
            .held
            .fetch_update(Relaxed, Relaxed, |h| (h + n <= self.cap).then_some(h + n));
        if taken.is_err() {
            if !self.said.swap(true, Relaxed) {
                tracing::warn!(port, budget = self.cap, "service ports hold their share of the open-file limit (3/4); refusing new connections and flows until some close");
            }
            return None;
        }
        self.said.store(false, Relaxed);
        Some(FdGuard(self.clone(), n))
    }

    pub fn held(&self) -> u64 {
        self.held.load(Relaxed)
    }
}

/// Descriptors taken from the [`FdBudget`], given back when dropped.
#[derive(Debug)]
pub struct FdGuard(Arc<FdBudget>, u64);

impl Drop for FdGuard {
    fn drop(&mut self) {
        self.0.held.fetch_sub(self.1, Relaxed);
    }
}

/// A socket is one per (address, TCP or UDP); a port keeps it while its spec's kind stays.
type Key = (SocketAddr, bool);

fn key(spec: &PortSpec) -> Key {
    (spec.address, spec.protocol == PortProtocol::Udp)
}

impl Ports {
    /// `tls`: the server config `tls` ports terminate with (tollgate's certificates, by SNI).
    pub fn new(
        live: Arc<ArcSwap<Snapshot>>,
        conns: Arc<ConnTable>,
        active: ActiveRequests,
        tls: Arc<rustls::ServerConfig>,
    ) -> Self {
        Ports {
            live,
            conns,
            active,
            tls,
        }
    }
}

/// The port of the live Snapshot at `key`, if it still has one.
fn find(snap: &Snapshot, k: Key) -> Option<&Port> {
    snap.ports.iter().find(|p| key(&p.spec) == k)
}

#[async_trait]
impl BackgroundService for Ports {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let shared = Shared {
            live: self.live.clone(),
            conns: self.conns.clone(),
            active: self.active.clone(),
            tls: self.tls.clone(),
            fds: Arc::new(FdBudget::from_rlimit()),
        };
        let mut running: HashMap<Key, tokio::task::JoinHandle<()>> = HashMap::new();
        // a port whose address cannot be bound is retried, but logged once per failure kind
        let mut failed: HashMap<Key, String> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
            }
            let snap = self.live.load_full();
            let wanted: Vec<Key> = snap.ports.iter().map(|p| key(&p.spec)).collect();
            running.retain(|k, task| {
                let keep = wanted.contains(k) && !task.is_finished();
                if !keep {
                    // the listener closes; its connections (their own tasks) go on
                    task.abort();
                    tracing::info!(address = %k.0, udp = k.1, "service port closed");
                }
                keep
            });
            for p in &snap.ports {
                let k = key(&p.spec);
                if running.contains_key(&k) {
                    continue;
                }
                match bind(&p.spec).await {
                    Ok(socket) => {
                        failed.remove(&k);
                        tracing::info!(
                            port = %p.spec.name,
                            address = %p.spec.address,
                            protocol = p.spec.protocol.name(),
                            source = %p.spec.source,
                            "service port listening"
                        );
                        let shared = shared.clone();
                        running.insert(
                            k,
                            tokio::spawn(async move {
                                match socket {
                                    Socket::Tcp(l) => tcp::accept_loop(shared, k, l).await,
                                    Socket::Udp(s) => udp::serve(shared, k, s).await,
                                }
                            }),
                        );
                    }
                    Err(e) => {
                        let e = e.to_string();
                        if failed.get(&k) != Some(&e) {
                            tracing::error!(port = %p.spec.name, address = %p.spec.address, error = %e, "service port cannot listen; retrying");
                            failed.insert(k, e);
                        }
                    }
                }
            }
        }
        // SIGTERM: stop accepting; established connections have the grace period, counted
        // as in flight by the drain-aware shutdown
        for (_, task) in running.drain() {
            task.abort();
        }
    }
}

enum Socket {
    Tcp(tokio::net::TcpListener),
    Udp(tokio::net::UdpSocket),
}

async fn bind(spec: &PortSpec) -> std::io::Result<Socket> {
    if spec.protocol == PortProtocol::Udp {
        return Ok(Socket::Udp(
            tokio::net::UdpSocket::bind(spec.address).await?,
        ));
    }
    let s = if spec.address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.set_nodelay(true)?;
    s.bind(spec.address)?;
    Ok(Socket::Tcp(s.listen(1024)?))
}
