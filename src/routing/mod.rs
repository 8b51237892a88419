//! Virtual-host and path routing. Owns: host normalisation, the vhost table (exact names,
//! `*.` wildcards, one default) and longest-prefix path matching. Pure: no I/O, no clocks, no
//! knowledge of what a route leads to beyond the index it is given; `state` builds it, `proxy` asks it.
//! `path` normalises request paths before they are routed (and forwarded).

pub mod path;

use std::collections::HashMap;

/// A route inside a vhost: a path prefix and the index of its target (the route's record in
/// the Snapshot, which holds everything else about it).
#[derive(Debug, Clone)]
pub struct RouteEntry {
    pub prefix: String,
    pub target: usize,
}

#[derive(Debug, Clone)]
pub struct VhostEntry {
    pub label: String,
    pub redirect_https: bool,
    /// Sorted longest prefix first.
    routes: Vec<RouteEntry>,
}

impl VhostEntry {
    pub fn new(
        label: impl Into<String>,
        redirect_https: bool,
        mut routes: Vec<RouteEntry>,
    ) -> Self {
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        VhostEntry {
            label: label.into(),
            redirect_https,
            routes,
        }
    }

    /// The route with the longest prefix matching `path`. A prefix matches at a segment
    /// boundary: `/api` matches `/api`, `/api/x` and `/api?q`, not `/apix`; a prefix ending in
    /// `/` matches everything below it. `;` parameters do not take part (`/api;v=1/x` matches
    /// `/api`); `path` is expected normalised (`path::normalize_path`).
    pub fn route(&self, path: &str) -> Option<(usize, &RouteEntry)> {
        let path = path.split(['?', '#']).next().unwrap_or("");
        let path = path::strip_params(path);
        let path = path.as_ref();
        self.routes
            .iter()
            .enumerate()
            .find(|(_, r)| prefix_matches(&r.prefix, path))
    }

    pub fn routes(&self) -> &[RouteEntry] {
        &self.routes
    }
}

/// Is `path` at or under route prefix `prefix`, at a segment boundary (`/api` covers `/api`
/// and `/api/x`, not `/apix`; a prefix ending in `/` covers everything after it)?
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Does wildcard suffix `suffix` (`.example.com`, from `*.example.com`) cover `host`: one
/// label or more before it?
fn under_suffix(host: &str, suffix: &str) -> bool {
    host.len() > suffix.len() && host.ends_with(suffix)
}

/// Does vhost name `pattern` cover `host`: the same name, or a `*.` wildcard with at least
/// one label before its suffix (`*` alone: any host, even none)?
pub fn name_covers(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) if suffix.starts_with('.') => under_suffix(host, suffix),
        _ => !host.is_empty() && pattern == host,
    }
}

/// The answer to "where does this request go".
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// No vhost has this name and there is no default vhost (421).
    NoVhost,
    /// The vhost matched but none of its routes did (404).
    NoRoute { vhost: usize },
    Route {
        vhost: usize,
        route: usize,
        target: usize,
    },
}

#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    vhosts: Vec<VhostEntry>,
    exact: HashMap<String, usize>,
    /// (suffix including the leading dot, vhost), longest suffix first.
    wildcards: Vec<(String, usize)>,
    default: Option<usize>,
}

impl RouteTable {
    /// Add a vhost answering to `names` (already validated, lower-case).
    pub fn add(&mut self, names: &[String], default: bool, entry: VhostEntry) -> usize {
        let idx = self.vhosts.len();
        self.vhosts.push(entry);
        for n in names {
            match n.strip_prefix('*') {
                Some(suffix) => self.wildcards.push((suffix.to_string(), idx)),
                None => {
                    self.exact.insert(n.clone(), idx);
                }
            }
        }
        self.wildcards.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        if default {
            self.default = Some(idx);
        }
        idx
    }

    pub fn vhost(&self, idx: usize) -> &VhostEntry {
        &self.vhosts[idx]
    }

    pub fn vhosts(&self) -> &[VhostEntry] {
        &self.vhosts
    }

    /// The vhost for a normalised host name: exact, then the longest wildcard, then default.
    pub fn find_vhost(&self, host: &str) -> Option<usize> {
        if let Some(i) = self.exact.get(host) {
            return Some(*i);
        }
        self.wildcards
            .iter()
            .find(|(suffix, _)| under_suffix(host, suffix))
            .map(|(_, i)| *i)
            .or(self.default)
    }

    pub fn lookup(&self, host: &str, path: &str) -> Lookup {
        let Some(vhost) = self.find_vhost(host) else {
            return Lookup::NoVhost;
        };
        match self.vhosts[vhost].route(path) {
            Some((route, r)) => Lookup::Route {
                vhost,
                route,
                target: r.target,
            },
            None => Lookup::NoRoute { vhost },
        }
    }
}

/// Normalise a `Host` header or `:authority`: lower-case, port and trailing dot removed.
/// `None` when it is not a plausible host (empty, bad characters, bad port).
pub fn normalize_host(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if raw.is_empty() || raw.len() > 261 {
        return None;
    }
    let (host, port) = if let Some(rest) = raw.strip_prefix('[') {
        // [v6]:port
        let end = rest.find(']')?;
        let host = &rest[..end];
        host.parse::<std::net::Ipv6Addr>().ok()?;
        let after = &rest[end + 1..];
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (host, port)
    } else {
        match raw.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (raw, None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
    {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let mut t = RouteTable::default();
        let r = |p: &str, t: usize| RouteEntry {
            prefix: p.into(),
            target: t,
        };
        t.add(
            &["example.com".into()],
            false,
            VhostEntry::new(
                "example.com",
                true,
                vec![r("/", 0), r("/api", 1), r("/api/v2", 2)],
            ),
        );
        t.add(
            &["*.example.com".into()],
            false,
            VhostEntry::new("*.example.com", true, vec![r("/", 3)]),
        );
        t.add(
            &["*.eu.example.com".into()],
            false,
            VhostEntry::new("*.eu.example.com", true, vec![r("/static/", 4)]),
        );
        t.add(&[], true, VhostEntry::new("default", true, vec![r("/", 5)]));
        t
    }

    #[test]
    fn longest_prefix_wins_at_segment_boundaries() {
        let t = table();
        let target = |p: &str| match t.lookup("example.com", p) {
            Lookup::Route { target, .. } => target,
            other => panic!("{other:?}"),
        };
        assert_eq!(target("/"), 0);
        assert_eq!(target("/index.html"), 0);
        assert_eq!(target("/api"), 1);
        assert_eq!(target("/api/users"), 1);
        assert_eq!(target("/api?x=1"), 1);
        assert_eq!(target("/apix"), 0);
        assert_eq!(target("/api/v2/x"), 2);
        assert_eq!(target("/api/v23"), 1);
        assert_eq!(target("/api;v=1"), 1);
        assert_eq!(target("/api;v=1/v2/x"), 2);
        assert_eq!(target("/apix;y"), 0);
    }

    #[test]
    fn exact_then_longest_wildcard_then_default() {
        let t = table();
        assert_eq!(t.find_vhost("example.com"), Some(0));
        assert_eq!(t.find_vhost("www.example.com"), Some(1));
        assert_eq!(t.find_vhost("a.b.example.com"), Some(1));
        assert_eq!(t.find_vhost("x.eu.example.com"), Some(2));
        assert_eq!(t.find_vhost("other.org"), Some(3));
        assert_eq!(
            t.lookup("x.eu.example.com", "/nope"),
            Lookup::NoRoute { vhost: 2 }
        );
    }

    #[test]
    fn no_default_means_no_vhost() {
        let mut t = RouteTable::default();
        t.add(
            &["a.com".into()],
            false,
            VhostEntry::new("a.com", true, vec![]),
        );
        assert_eq!(t.lookup("b.com", "/"), Lookup::NoVhost);
        assert_eq!(t.lookup("a.com", "/"), Lookup::NoRoute { vhost: 0 });
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(
            normalize_host("Example.COM:8443").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            normalize_host("example.com.").as_deref(),
            Some("example.com")
        );
        assert_eq!(normalize_host("[::1]:443").as_deref(), Some("::1"));
        assert_eq!(normalize_host("127.0.0.1").as_deref(), Some("127.0.0.1"));
        assert_eq!(normalize_host(""), None);
        assert_eq!(normalize_host("a.com:x"), None);
        assert_eq!(normalize_host("a b.com"), None);
        assert_eq!(normalize_host("a.com/evil"), None);
        assert_eq!(normalize_host("[zz]:1"), None);
    }
}
