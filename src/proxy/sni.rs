//! The listeners' certificate resolver: rustls asks it on every handshake, and it answers
//! from the live Snapshot's certificate store (`tls::CertStore`).

use crate::state::Snapshot;
use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::sync::Arc;

/// Reads the live Snapshot, so a reload (config or certificate files) changes the answer for
/// the next handshake.
#[derive(Debug)]
pub struct SniResolver {
    state: Arc<ArcSwap<Snapshot>>,
}

impl SniResolver {
    pub fn new(state: Arc<ArcSwap<Snapshot>>) -> Self {
        SniResolver { state }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.state.load().certs.resolve(hello.server_name())
    }
}
