//! Connection admission: the pre-handshake callback pingora runs on every new connection
//! (both listener kinds, see vendor/patches/0001-*). It reads a PROXY header
//! where the listener expects one and takes a slot in the connection table under the live
//! Snapshot's limits.

use crate::config::cidr::{any_contains, canonical};
use crate::limits::{proxy_protocol, ConnTable, Refusal};
use crate::state::Snapshot;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest};
use pingora::upstreams::peer::Tracer;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

/// Runs on every new connection before its TLS handshake (and on plain listeners before the
/// first request): reads a PROXY header where the listener expects one, then takes a slot.
pub struct Admission {
    state: Arc<ArcSwap<Snapshot>>,
    /// Listening addresses that expect a PROXY header.
    proxy_listeners: Vec<SocketAddr>,
    /// The connection table the slots are taken from.
    conns: Arc<ConnTable>,
}

impl Admission {
    pub fn new(
        state: Arc<ArcSwap<Snapshot>>,
        proxy_listeners: Vec<SocketAddr>,
        conns: Arc<ConnTable>,
    ) -> Self {
        Admission {
            state,
            proxy_listeners,
            conns,
        }
    }

    fn expects_proxy(&self, local: Option<SocketAddr>) -> bool {
        let Some(local) = local else { return false };
        self.proxy_listeners.iter().any(|l| {
            l.port() == local.port()
                && (l.ip().is_unspecified() || canonical(l.ip()) == canonical(local.ip()))
        })
    }
}

fn refused(r: Refusal, who: IpAddr) -> Box<pingora::Error> {
    pingora::Error::explain(
        pingora::ErrorType::Custom("admission"),
        format!("{who}: {}", r.label()),
    )
}

#[async_trait]
impl PreTlsProcess for Admission {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        let digest = stream.get_socket_digest();
        let inet = |a: Option<&pingora::protocols::l4::socket::SocketAddr>| {
            a.and_then(|a| a.as_inet()).copied()
        };
        let (peer, local) = match &digest {
            Some(d) => (inet(d.peer_addr()), inet(d.local_addr())),
            None => (None, None),
        };
        // Unix sockets and the like have no IP: nothing to count them by.
        let Some(peer) = peer else { return Ok(()) };
        let snap = self.state.load();
        let limits = &snap.config.limits;
        // follows reloads: the next connection's handshake gets the current deadline
        pingora::listeners::set_handshake_timeout(limits.handshake_timeout);
        let mut client = peer.ip();
        if self.expects_proxy(local) {
            if !any_contains(&limits.trusted_proxies, peer.ip()) {
                self.conns.count(Refusal::UntrustedProxy);
                return Err(refused(Refusal::UntrustedProxy, peer.ip()));
            }
            match proxy_protocol::read(stream, limits.header_timeout).await {
                Ok(Some(src)) => {
                    client = src.ip();
                    if let Some(d) = &digest {
                        use std::os::fd::AsRawFd;
                        let nd = SocketDigest::from_raw_fd(stream.as_raw_fd());
                        let _ = nd.peer_addr.set(Some(src.into()));
                        let _ = nd.local_addr.set(d.local_addr().cloned());
                        stream.set_socket_digest(nd);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.conns.count(Refusal::BadProxyHeader);
                    tracing::debug!(peer = %peer, error = %e, "bad PROXY protocol header");
                    return Err(refused(Refusal::BadProxyHeader, peer.ip()));
                }
            }
        }
        match self.conns.admit(client, limits, Instant::now()) {
            Ok(guard) => {
                stream.tracer = Some(Tracer(Box::new(guard)));
                Ok(())
            }
            Err(r) => Err(refused(r, client)),
        }
    }
}
