//! Sources of backends beyond the config file. Owns: the discovery `View` (the last
//! successful answer per Consul service) and the watchers that keep it current. Must not
//! build Snapshots itself: it hands a new View to `state`, which rebuilds and publishes.
//! Only a successful answer from a source changes the View; errors keep the last one.

pub mod consul;

use crate::config::{BackendSpec, ServiceKey};
use std::collections::BTreeMap;
use std::path::Path;

/// What Consul last said about one service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

    /// Write the view to `path` atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let entries: Vec<SavedService> = self
            .services
            .iter()
            .map(|(k, v)| SavedService {
                key: k.clone(),
                view: v.clone(),
            })
            .collect();
        let text = serde_json::to_vec_pretty(&entries).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }

    pub fn load(path: &Path) -> Result<View, String> {
        let text = std::fs::read(path).map_err(|e| e.to_string())?;
        let entries: Vec<SavedService> = serde_json::from_slice(&text)
            .map_err(|e| format!("{} is not a saved view: {e}", path.display()))?;
        Ok(View {
            services: entries.into_iter().map(|s| (s.key, s.view)).collect(),
        })
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedService {
    key: ServiceKey,
    view: ServiceView,
}
