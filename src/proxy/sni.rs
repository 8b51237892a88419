//! The listeners' certificate resolver: rustls asks it on every handshake, and it answers
//! from the live Snapshot's certificate store (`tls::CertStore`), or, for a CA's TLS-ALPN-01
//! validation (ALPN `acme-tls/1` only), with the challenge certificate of a pending order.

use crate::state::Snapshot;
use crate::tls::{Challenges, ACME_TLS_ALPN};
use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::sync::Arc;

/// Reads the live Snapshot, so a reload (config or certificate files) changes the answer for
/// the next handshake.
#[derive(Debug)]
pub struct SniResolver {
    state: Arc<ArcSwap<Snapshot>>,
    /// The pending ACME challenges (the HTTP listeners'; none for service ports).
    acme: Option<Challenges>,
}

impl SniResolver {
    pub fn new(state: Arc<ArcSwap<Snapshot>>, acme: Option<Challenges>) -> Self {
        SniResolver { state, acme }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let snap = self.state.load();
        // RFC 8737 §3: a validation offers `acme-tls/1` and nothing else
        let acme_tls = hello
            .alpn()
            .is_some_and(|mut p| p.next() == Some(ACME_TLS_ALPN) && p.next().is_none());
        if acme_tls {
            // the challenge certificate or nothing, and only for a name a vhost of the file
            // may order for (what a KV writer shares cannot widen that)
            let name = hello.server_name()?;
            let ours = snap.config.acme_may_order(name);
            let now = crate::clock::unix_secs() as i64;
            return self.acme.as_ref().filter(|_| ours)?.alpn_cert(name, now);
        }
        snap.certs.resolve(hello.server_name())
    }
}
