//! Virtual-host and path routing. Owns: host normalisation, the vhost table (exact names,
//! `*.` wildcards, one default) and longest-prefix path matching. Pure: no I/O, no clocks, no
//! knowledge of what a route leads to beyond the index it is given; `state` builds it, `proxy` asks it.
//! `path` normalises request paths before they are routed (and forwarded).

pub mod path;

use std::collections::HashMap;

/// A route inside a vhost: a path prefix, what else a request must have (`None`: nothing),
/// and the index of its target (the route's record in the Snapshot, which holds everything
/// else about it).
#[derive(Debug, Clone)]
pub struct RouteEntry {
    pub prefix: String,
    pub matchers: Option<std::sync::Arc<Matchers>>,
    pub target: usize,
}

/// What a request must also have for a route to take it: one of the methods (if any are
/// named), and every header and query condition.
#[derive(Debug, Clone, Default)]
pub struct Matchers {
    pub methods: Vec<http::Method>,
    pub headers: Vec<(http::HeaderName, Test)>,
    /// Query parameters by name, as sent (percent-encoding is not decoded).
    pub query: Vec<(String, Test)>,
}

/// One condition on a header's or a query parameter's values (any value may satisfy it).
#[derive(Debug, Clone)]
pub enum Test {
    Present,
    Equals(String),
    /// Searched for in the value (anchor it with `^…$` for the whole value); linear time.
    Regex(regex::Regex),
}

impl Test {
    fn accepts(&self, value: &str) -> bool {
        match self {
            Test::Present => true,
            Test::Equals(v) => v == value,
            Test::Regex(r) => r.is_match(value),
        }
    }

    fn describe(&self) -> String {
        match self {
            Test::Present => "present".into(),
            Test::Equals(v) => format!("= {v:?}"),
            Test::Regex(r) => format!("~ /{}/", r.as_str()),
        }
    }
}

/// The parts of a request matchers look at.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a http::Method,
    pub headers: &'a http::HeaderMap,
    pub query: Option<&'a str>,
}

impl Matchers {
    /// How many conditions: routes with more are tried first among those with one prefix.
    pub fn weight(&self) -> usize {
        usize::from(!self.methods.is_empty()) + self.headers.len() + self.query.len()
    }

    /// The first condition `req` fails, described; `None` when it meets them all.
    pub fn fails(&self, req: &RequestView) -> Option<String> {
        if !self.methods.is_empty() && !self.methods.contains(req.method) {
            return Some(format!(
                "method {} is not one of {}",
                req.method,
                self.method_list()
            ));
        }
        for (name, test) in &self.headers {
            let ok = req
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| test.accepts(v));
            if !ok {
                return Some(format!("header {name} {} does not hold", test.describe()));
            }
        }
        for (name, test) in &self.query {
            let ok = req
                .query
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == name).then_some(v)
                })
                .any(|v| test.accepts(v));
            if !ok {
                return Some(format!("query {name} {} does not hold", test.describe()));
            }
        }
        None
    }

    fn method_list(&self) -> String {
        let m: Vec<&str> = self.methods.iter().map(|m| m.as_str()).collect();
        m.join(", ")
    }

    /// Every condition, described (what `/explain` shows a route matched by).
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.methods.is_empty() {
            out.push(format!("method in {}", self.method_list()));
        }
        for (n, t) in &self.headers {
            out.push(format!("header {n} {}", t.describe()));
        }
        for (n, t) in &self.query {
            out.push(format!("query {n} {}", t.describe()));
        }
        out
    }
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
        // longest prefix first; for one prefix, more conditions first; then as declared
        routes.sort_by_key(|r| {
            let weight = r.matchers.as_ref().map_or(0, |m| m.weight());
            (std::cmp::Reverse(r.prefix.len()), std::cmp::Reverse(weight))
        });
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
        self.route_for(path, None)
    }

    /// The first route, in the order above, whose prefix matches `path` and whose matchers
    /// `req` meets (without `req`, routes with matchers are passed over).
    pub fn route_for(&self, path: &str, req: Option<&RequestView>) -> Option<(usize, &RouteEntry)> {
        let path = path.split(['?', '#']).next().unwrap_or("");
        let path = path::strip_params(path);
        let path = path.as_ref();
        self.routes.iter().enumerate().find(|(_, r)| {
            prefix_matches(&r.prefix, path)
                && match (&r.matchers, req) {
                    (None, _) => true,
                    (Some(m), Some(req)) => m.fails(req).is_none(),
                    (Some(_), None) => false,
                }
        })
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
        self.lookup_request(host, path, None)
    }

    /// Where a request goes, its matchers considered.
    pub fn lookup_request(&self, host: &str, path: &str, req: Option<&RequestView>) -> Lookup {
        let Some(vhost) = self.find_vhost(host) else {
            return Lookup::NoVhost;
        };
        match self.vhosts[vhost].route_for(path, req) {
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
            matchers: None,
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

    #[test]
    fn matchers_choose_among_routes_of_one_prefix_and_fall_through() {
        use std::sync::Arc;
        let post = Matchers {
            methods: vec![http::Method::POST],
            ..Matchers::default()
        };
        let canary = Matchers {
            headers: vec![(
                http::HeaderName::from_static("x-canary"),
                Test::Equals("1".into()),
            )],
            query: vec![("v".into(), Test::Regex(regex::Regex::new("^2$").unwrap()))],
            ..Matchers::default()
        };
        let e = |p: &str, m: Option<Matchers>, t: usize| RouteEntry {
            prefix: p.into(),
            matchers: m.map(Arc::new),
            target: t,
        };
        let mut t = RouteTable::default();
        // declared: plain /api first, then the POST route, then the canary
        t.add(
            &["a.test".into()],
            false,
            VhostEntry::new(
                "a.test",
                true,
                vec![
                    e("/", None, 0),
                    e("/api", None, 1),
                    e("/api", Some(post), 2),
                    e("/api", Some(canary), 3),
                    e(
                        "/admin",
                        Some(Matchers {
                            methods: vec![http::Method::GET],
                            ..Matchers::default()
                        }),
                        4,
                    ),
                ],
            ),
        );
        let mut headers = http::HeaderMap::new();
        let target = |method: http::Method, headers: &http::HeaderMap, path: &str| {
            let view = RequestView {
                method: &method,
                headers,
                query: path.split_once('?').map(|(_, q)| q),
            };
            match t.lookup_request("a.test", path, Some(&view)) {
                Lookup::Route { target, .. } => target,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(target(http::Method::GET, &headers, "/api/x"), 1);
        assert_eq!(target(http::Method::POST, &headers, "/api/x"), 2);
        headers.insert("x-canary", http::HeaderValue::from_static("1"));
        assert_eq!(
            target(http::Method::GET, &headers, "/api/x?v=2"),
            3,
            "two conditions first"
        );
        assert_eq!(target(http::Method::GET, &headers, "/api/x?v=3"), 1);
        // a route whose matchers fail is passed over for the next, here a shorter prefix
        assert_eq!(target(http::Method::DELETE, &headers, "/admin"), 0);
        assert_eq!(target(http::Method::GET, &headers, "/admin"), 4);
        // without a request (no method, no headers) routes with matchers never match
        assert_eq!(
            t.lookup("a.test", "/admin"),
            Lookup::Route {
                vhost: 0,
                route: 4,
                target: 0
            }
        );
    }
}
