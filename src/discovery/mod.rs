//! Sources of backends beyond the config file. Owns: the discovery `View` (the last
//! successful answer per Consul service) and the watchers that keep it current. Must not
//! build Snapshots itself: it hands a new View to `state`, which rebuilds and publishes.
//! Only a successful answer from a source changes the View; errors keep the last one.

pub mod consul;

use crate::config::{BackendSpec, ServiceKey};
use std::collections::BTreeMap;
use std::path::Path;

#[cfg(test)]
mod tests {
    use super::parse_route_tag;

    #[test]
    fn route_tags() {
        let p = |t: &str| parse_route_tag(t, "tollgate.route=", true);
        assert_eq!(
            p("tollgate.route=Example.com/api"),
            Some(Ok(("example.com".into(), "/api".into())))
        );
        assert_eq!(
            p("tollgate.route=example.com"),
            Some(Ok(("example.com".into(), "/".into())))
        );
        assert_eq!(
            p("tollgate.route=/api"),
            Some(Ok(("".into(), "/api".into())))
        );
        assert_eq!(
            p("urlprefix-shop.test/cart strip=/cart"),
            Some(Ok(("shop.test".into(), "/cart".into())))
        );
        assert_eq!(
            p("urlprefix-/static/"),
            Some(Ok(("".into(), "/static/".into())))
        );
        assert!(p("urlprefix-:3306").unwrap().is_err());
        assert!(p("tollgate.route=bad host/x").unwrap().is_err());
        assert_eq!(p("prod"), None);
        assert_eq!(
            parse_route_tag("urlprefix-a.test/", "tollgate.route=", false),
            None
        );
    }
}

/// What Consul last said about one service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceView {
    pub backends: Vec<BackendSpec>,
    /// `X-Consul-Index` of the answer.
    pub index: u64,
    pub updated_unix: u64,
}

/// A route declared in Consul (a service tag), to merge with the file's routes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct DiscoveredRoute {
    /// Lower-case host, or empty for "any host" (the default vhost).
    pub host: String,
    pub path: String,
    pub service: String,
    /// The tag it came from, for reports.
    pub tag: String,
    /// `X-Consul-Index` of the catalog answer.
    pub index: u64,
    /// Every tag the service carries (the `[[consul.allow]]` rules may require one).
    #[serde(default)]
    pub service_tags: Vec<String>,
}

/// The backends every discovered service has, and the routes services declare, as last applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub services: BTreeMap<ServiceKey, ServiceView>,
    pub routes: Vec<DiscoveredRoute>,
}

/// A route from a service tag: `<prefix>host/path` (tollgate) or `urlprefix-host/path`
/// (Fabio; options after a space are ignored). `None` when the tag is not a route tag.
pub fn parse_route_tag(
    tag: &str,
    prefix: &str,
    fabio: bool,
) -> Option<Result<(String, String), String>> {
    let spec = match tag.strip_prefix(prefix) {
        Some(rest) if rest.contains(char::is_whitespace) => {
            return Some(Err(format!("`{tag}`: a route tag cannot hold spaces")))
        }
        Some(rest) => rest,
        // Fabio puts options after a space (`strip=/x`); they are not supported and ignored
        None if fabio => tag
            .strip_prefix("urlprefix-")?
            .split_whitespace()
            .next()
            .unwrap_or(""),
        None => return None,
    };
    if spec.starts_with(':') {
        return Some(Err(format!("`{tag}`: TCP routes are not supported")));
    }
    let (host, path) = match spec.find('/') {
        Some(i) => (&spec[..i], &spec[i..]),
        None => (spec, "/"),
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if !host.is_empty() {
        if let Err(e) = crate::config::check_host_name(&host) {
            return Some(Err(format!("`{tag}`: {e}")));
        }
    }
    if path.contains(['?', '#']) {
        return Some(Err(format!("`{tag}`: a route path cannot hold ? or #")));
    }
    Some(Ok((host, path.to_string())))
}

impl View {
    pub fn backends(&self, key: &ServiceKey) -> Option<&[BackendSpec]> {
        self.services.get(key).map(|s| s.backends.as_slice())
    }

    /// Write the view to `path` atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let saved = Saved {
            services: self
                .services
                .iter()
                .map(|(k, v)| SavedService {
                    key: k.clone(),
                    view: v.clone(),
                })
                .collect(),
            routes: self.routes.clone(),
        };
        let text = serde_json::to_vec_pretty(&saved).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }

    pub fn load(path: &Path) -> Result<View, String> {
        let text = std::fs::read(path).map_err(|e| e.to_string())?;
        let saved: Saved = serde_json::from_slice(&text)
            .map_err(|e| format!("{} is not a saved view: {e}", path.display()))?;
        Ok(View {
            services: saved
                .services
                .into_iter()
                .map(|s| (s.key, s.view))
                .collect(),
            routes: saved.routes,
        })
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    services: Vec<SavedService>,
    #[serde(default)]
    routes: Vec<DiscoveredRoute>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedService {
    key: ServiceKey,
    view: ServiceView,
}
