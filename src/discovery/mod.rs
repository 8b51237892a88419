//! Sources of backends beyond the config file. Owns: the discovery `View` (the last
//! successful answer per Consul service) and the watchers that keep it current. Must not
//! build Snapshots itself: it hands a new View to `state`, which rebuilds and publishes.
//! Only a successful answer from a source changes the View; errors keep the last one.

pub mod consul;

use crate::config::{BackendSpec, ServiceKey};
use std::collections::BTreeMap;

/// What Consul last said about one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    pub backends: Vec<BackendSpec>,
    /// `X-Consul-Index` of the answer.
    pub index: u64,
    pub updated_unix: u64,
}

/// The backends every discovered service has, as last applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub services: BTreeMap<ServiceKey, ServiceView>,
}

impl View {
    pub fn backends(&self, key: &ServiceKey) -> Option<&[BackendSpec]> {
        self.services.get(key).map(|s| s.backends.as_slice())
    }
}
