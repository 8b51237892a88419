//! Sources of backends beyond the config file. Owns: the discovery `View` (the last
//! successful answer per Consul service) and the watchers that keep it current. Must not
//! build Snapshots itself: it hands a new View to `state`, which rebuilds and publishes.
//! Only a successful answer from a source changes the View; errors keep the last one.

pub mod consul;

use crate::config::{route_options, BackendSpec, PortProtocol, Protocol, RouteOptions, ServiceKey};
use std::collections::BTreeMap;
use std::path::Path;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_certificates_pair_in_fabios_layout_and_ours() {
        let e = |k: &str, v: &str| (k.to_string(), v.as_bytes().to_vec());
        let (pairs, problems) = pair_kv_certs(&[
            e("a.test-cert.pem", "A-CERT"),
            e("a.test-key.pem", "A-KEY"),
            e("b.test.pem", "B-BOTH"),
            e("sub/c.crt", "C-CERT"),
            e("sub/c.key", "C-KEY"),
            e("sub/", ""),
            e("README", "notes"),
            e("lonely-cert.pem", "X"),
            e("orphan-key.pem", "Y"),
            ("binary.pem".to_string(), vec![0xff, 0xfe]),
            ("huge.pem".to_string(), vec![b'a'; KV_CERT_MAX + 1]),
        ]);
        let got: Vec<(&str, &str, &str)> = pairs
            .iter()
            .map(|(k, p)| (k.as_str(), p.cert.as_str(), p.key.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a.test-cert.pem", "A-CERT", "A-KEY"),
                ("b.test.pem", "B-BOTH", "B-BOTH"),
                ("sub/c.crt", "C-CERT", "C-KEY"),
            ]
        );
        let said = problems.join("\n");
        for words in [
            "lonely-cert.pem: no key beside it (lonely-key.pem)",
            "orphan-key.pem: a key with no certificate",
            "binary.pem: not PEM text",
            "huge.pem: 262145 bytes",
        ] {
            assert!(said.contains(words), "{words} in {said}");
        }
        assert_eq!(problems.len(), 4, "{said}");
    }

    #[test]
    fn route_tags() {
        let p = |t: &str| {
            parse_route_tag(t, "tollgate.route=", true).map(|r| r.map(|r| (r.host, r.path)))
        };
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

    #[test]
    fn service_ports_from_tags() {
        let port = |t: &str| {
            let r = parse_route_tag(t, "tollgate.route=", true)
                .or_else(|| parse_port_tag(t, "tollgate.port="))
                .unwrap()
                .unwrap();
            (r.options.port.unwrap(), r.host)
        };
        assert_eq!(
            port("tollgate.port=tcp/3306"),
            ((PortProtocol::Tcp, 3306), "".into())
        );
        assert_eq!(
            port("tollgate.port=udp/53"),
            ((PortProtocol::Udp, 53), "".into())
        );
        assert_eq!(
            port("tollgate.port=sni/443/DB.example.com"),
            ((PortProtocol::Sni, 443), "db.example.com".into())
        );
        assert_eq!(
            port("urlprefix-:3306 proto=tcp"),
            ((PortProtocol::Tcp, 3306), "".into())
        );
        assert_eq!(
            port("urlprefix-db.test:443 proto=tcp+sni"),
            ((PortProtocol::Sni, 443), "db.test".into())
        );
        assert_eq!(parse_port_tag("tollgate.route=a/", "tollgate.port="), None);
        for (tag, why) in [
            ("tollgate.port=sctp/1", "not a port protocol"),
            ("tollgate.port=tcp", "name the port"),
            ("tollgate.port=tcp/0", "port 0"),
            ("tollgate.port=tcp/70000", "name the port"),
            ("tollgate.port=sni/443", "needs the server name"),
            ("tollgate.port=sni/443/bad name", ""),
            ("tollgate.port=tcp/1/x/y", "one port per tag"),
        ] {
            let e = parse_port_tag(tag, "tollgate.port=").unwrap().unwrap_err();
            assert!(e.contains(why), "{tag}: {e}");
        }
    }

    #[test]
    fn a_services_protocol_meta_applies_to_its_routes_or_refuses_them() {
        let route = |tag: &str| {
            let parsed = parse_route_tag(tag, "tollgate.route=", true).unwrap();
            DiscoveredRoute {
                host: String::new(),
                path: String::new(),
                service: "api".into(),
                tag: tag.into(),
                index: 1,
                service_tags: Vec::new(),
                options: parsed.map(|p| p.options).unwrap_or_default(),
                refused: None,
            }
        };
        let mut r = route("tollgate.route=a.test/");
        apply_protocol_meta(&mut r, &Ok("h2c".into()));
        assert_eq!((r.options.protocol, r.refused), (Some(Protocol::H2c), None));
        // http1 is the default: no protocol recorded
        let mut r = route("tollgate.route=a.test/");
        apply_protocol_meta(&mut r, &Ok("http1".into()));
        assert_eq!((r.options.protocol, r.refused), (None, None));
        // the tag and the meta agree, or the route is refused
        let mut r = route("urlprefix-a.test/ proto=grpc");
        apply_protocol_meta(&mut r, &Ok("h2c".into()));
        assert_eq!(r.refused, None);
        let mut r = route("urlprefix-a.test/ proto=https");
        apply_protocol_meta(&mut r, &Ok("h2c".into()));
        assert!(r.refused.unwrap().contains("they must agree"));
        let mut r = route("tollgate.route=a.test/");
        apply_protocol_meta(&mut r, &Ok("spdy".into()));
        assert!(r.refused.unwrap().contains("not a backend protocol"));
        let mut r = route("tollgate.route=a.test/");
        apply_protocol_meta(&mut r, &Err("its instances disagree".into()));
        assert_eq!(r.refused.as_deref(), Some("its instances disagree"));
    }

    #[test]
    fn fabio_options_are_honoured_or_refused_by_name() {
        let o = |t: &str| parse_route_tag(t, "tollgate.route=", true).unwrap();
        let r = o("urlprefix-a.test/cart strip=/cart prepend=/v2/ host=dst proto=http").unwrap();
        assert_eq!(
            (
                r.options.strip.as_deref(),
                r.options.prepend.as_deref(),
                r.options.host.as_deref()
            ),
            (Some("/cart"), Some("/v2"), Some("dst"))
        );
        let r = o("urlprefix-old.test/ redirect=301,https://new.test$path").unwrap();
        assert_eq!(
            r.options.redirect,
            Some((301, "https://new.test$path".into()))
        );
        let r = o("urlprefix-a.test/ allow=ip:10.0.0.0/8,ip:fe80::/10,192.0.2.7").unwrap();
        assert_eq!(r.options.allow, ["10.0.0.0/8", "fe80::/10", "192.0.2.7"]);
        for (proto, want) in [
            ("https", Protocol::Https),
            ("grpc", Protocol::H2c),
            ("grpcs", Protocol::H2),
        ] {
            let r = o(&format!(
                "urlprefix-a.test/ proto={proto} tlsskipverify=false"
            ))
            .unwrap();
            assert_eq!(r.options.protocol, Some(want), "{proto}");
        }
        assert_eq!(
            o("urlprefix-a.test/ proto=http").unwrap().options.protocol,
            None
        );
        let r = o("urlprefix-a.test/ host=Api.Example.com:8443").unwrap();
        assert_eq!(r.options.host.as_deref(), Some("api.example.com:8443"));
        for (tag, why) in [
            (
                "urlprefix-a.test/ proto=https tlsskipverify=true",
                "only the file may turn certificate verification off",
            ),
            (
                "urlprefix-a.test/ proto=tcp",
                "a TCP route is :port or host:port",
            ),
            ("urlprefix-:3306", "a TCP route needs proto=tcp"),
            ("urlprefix-:99999 proto=tcp", "a TCP route is :port"),
            ("urlprefix-:443 proto=tcp+sni", "needs the server name"),
            (
                "urlprefix-db.test:3306 proto=tcp",
                "only sni ports take a server name",
            ),
            (
                "urlprefix-a.test/ tlsskipverify=true",
                "`tlsskipverify=true` is not honoured from Consul",
            ),
            ("urlprefix-a.test/ proto=h3", "`proto=h3` is not supported"),
            (
                "urlprefix-a.test/ register=web",
                "`register=web` is not supported",
            ),
            (
                "urlprefix-a.test/ pxyproto=true",
                "`pxyproto=true` is not supported",
            ),
            (
                "urlprefix-a.test/ auth=basic",
                "`auth=basic` is not supported",
            ),
            ("urlprefix-a.test/ strip=api", "option `strip=api`"),
            ("urlprefix-a.test/ strip=/a/../b", "option `strip=/a/../b`"),
            (
                "urlprefix-a.test/ redirect=200,https://x.test",
                "option `redirect=200",
            ),
            ("urlprefix-a.test/ redirect=301", "option `redirect=301`"),
            (
                "urlprefix-a.test/ redirect=301,javascript:alert(1)",
                "option `redirect=",
            ),
            (
                "urlprefix-a.test/ allow=ip:10.0.0.0/33",
                "option `allow=ip:10.0.0.0/33`: `10.0.0.0/33` is not an IP network",
            ),
            (
                "urlprefix-a.test/ allow=ip:10.0.0.0/8 deny=ip:10.1.0.0/16",
                "cannot be used together",
            ),
            ("urlprefix-a.test/ host=bad/host", "option `host=bad/host`"),
        ] {
            let e = o(tag).unwrap_err();
            assert!(e.contains(why), "{tag}: {e}");
        }
    }
}

/// What Consul last said about one service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceView {
    pub backends: Vec<BackendSpec>,
    /// `X-Consul-Index` of the answer.
    pub index: u64,
    pub updated_unix: u64,
    /// The shrink guard (`consul.min_fraction`) is keeping backends Consul reports failing:
    /// a pool with failover datacenters moves to one that is well instead.
    #[serde(default)]
    pub guarded: bool,
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
    /// What the route does besides choosing its pool (Fabio's options).
    #[serde(default)]
    pub options: RouteOptions,
    /// Why a route tag cannot be honoured (then it is reported, never routed).
    #[serde(default)]
    pub refused: Option<String>,
}

/// The backends every discovered service has, and the routes services declare, as last applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub services: BTreeMap<ServiceKey, ServiceView>,
    pub routes: Vec<DiscoveredRoute>,
    /// For pools with failover datacenters: the watch that serves them now, and why
    /// (absent: their own), by the pool's whole group of watches (its own service key, then
    /// one per failover datacenter). Keyed by the group, not the own key: a pool on the
    /// same service without failover (or with other failover datacenters) is not affected.
    pub serving: BTreeMap<Vec<ServiceKey>, Serving>,
    /// The other datacenters, nearest first (Consul's order by round-trip time; the agent's
    /// own left out): where `nearest = N` pools fail over to. Read only when a pool wants it.
    pub datacenters: Vec<String>,
    /// Certificates from Consul KV (`tls.consul_kv_prefix`), each checked against its key
    /// when read, by the KV key of the certificate (relative to the prefix).
    pub certs: BTreeMap<String, KvCert>,
}

/// A certificate chain and its private key from Consul KV, PEM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KvCert {
    pub cert: String,
    pub key: String,
}

/// The largest KV value read as a certificate or key (Consul's own cap is 512 KiB).
const KV_CERT_MAX: usize = 256 * 1024;

/// The KV key holding the private key of the certificate at `cert` (relative to the prefix):
/// `NAME-cert.pem` → `NAME-key.pem`, `NAME.crt` → `NAME.key`, `NAME.pem` → itself (both in
/// one value); `None` for what is not a certificate's key (a key, a note).
pub fn kv_key_of(cert: &str) -> Option<String> {
    if let Some(stem) = cert.strip_suffix("-cert.pem") {
        Some(format!("{stem}-key.pem"))
    } else if let Some(stem) = cert.strip_suffix(".crt") {
        Some(format!("{stem}.key"))
    } else if cert.ends_with("-key.pem") || cert.ends_with(".key") || !cert.ends_with(".pem") {
        None
    } else {
        Some(cert.to_string())
    }
}

/// Pair the entries under `tls.consul_kv_prefix` (key relative to the prefix, value) as
/// Fabio's Consul certificate source does: `NAME-cert.pem` with `NAME-key.pem`, or `NAME.pem`
/// holding both; and as `tls.certs_dir` does: `NAME.crt` with `NAME.key`. Other keys
/// (folders, notes) are ignored. Returns the pairs by the certificate's key, and what could
/// not be paired (a certificate without its key, a key without its certificate, a value
/// too large or not text), each said.
pub fn pair_kv_certs(entries: &[(String, Vec<u8>)]) -> (BTreeMap<String, KvCert>, Vec<String>) {
    let mut problems = Vec::new();
    let mut text: BTreeMap<&str, &str> = BTreeMap::new();
    for (k, v) in entries {
        if k.ends_with('/') || v.is_empty() {
            continue; // a folder
        }
        if v.len() > KV_CERT_MAX {
            problems.push(format!("{k}: {} bytes, more than {KV_CERT_MAX}", v.len()));
            continue;
        }
        match std::str::from_utf8(v) {
            Ok(t) => {
                text.insert(k, t);
            }
            Err(_) => problems.push(format!("{k}: not PEM text")),
        }
    }
    let mut pairs = BTreeMap::new();
    let mut used = std::collections::BTreeSet::new();
    for (&k, &v) in &text {
        let Some(key_of) = kv_key_of(k) else {
            continue;
        };
        match text.get(key_of.as_str()) {
            Some(&key) => {
                used.insert(key_of.clone());
                used.insert(k.to_string());
                pairs.insert(
                    k.to_string(),
                    KvCert {
                        cert: v.to_string(),
                        key: key.to_string(),
                    },
                );
            }
            None => problems.push(format!("{k}: no key beside it ({key_of})")),
        }
    }
    for &k in text.keys() {
        if (k.ends_with("-key.pem") || k.ends_with(".key")) && !used.contains(k) {
            problems.push(format!("{k}: a key with no certificate beside it"));
        }
    }
    (pairs, problems)
}

/// Which datacenter's instances serve a pool, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Serving {
    pub key: ServiceKey,
    pub reason: String,
}

/// A route a tag declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRoute {
    /// Lower-case host, or empty for "any host".
    pub host: String,
    pub path: String,
    pub options: RouteOptions,
}

/// A route from a service tag: `<prefix>host/path` (tollgate) or `urlprefix-host/path
/// [options]` (Fabio). `None` when the tag is not a route tag; `Err` (with why) when it is one
/// tollgate cannot honour, so it is reported instead of routed wrongly.
pub fn parse_route_tag(tag: &str, prefix: &str, fabio: bool) -> Option<Result<TagRoute, String>> {
    let (spec, options) = match tag.strip_prefix(prefix) {
        Some(rest) if rest.contains(char::is_whitespace) => {
            return Some(Err(format!("`{tag}`: a route tag cannot hold spaces")))
        }
        Some(rest) => (rest, RouteOptions::default()),
        None if fabio => {
            let rest = tag.strip_prefix("urlprefix-")?;
            let (spec, opts) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            match fabio_options(opts) {
                Ok(o) => (spec, o),
                Err(e) => return Some(Err(format!("`{tag}`: {e}"))),
            }
        }
        None => return None,
    };
    if let Some((proto, _)) = options.port {
        // Fabio's TCP routes: `urlprefix-:3306 proto=tcp`, `urlprefix-db.test:443 proto=tcp+sni`
        let (host, port) = spec.rsplit_once(':').unwrap_or((spec, ""));
        let Ok(port) = port.parse::<u16>() else {
            return Some(Err(format!("`{tag}`: a TCP route is :port or host:port")));
        };
        return Some(port_route(tag, proto, port, host));
    }
    if spec.starts_with(':') {
        return Some(Err(format!(
            "`{tag}`: a TCP route needs proto=tcp (or proto=tcp+sni with a host)"
        )));
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
    Some(Ok(TagRoute {
        host,
        path: path.to_string(),
        options,
    }))
}

/// A service port a tag or meta value declares: `tcp/3306`, `udp/53`, `tls/8443` (TLS
/// terminated, plain TCP to the service) or `sni/443/db.example.com` (TLS passed through
/// for that name). `None` when `tag` does not start with `prefix`.
pub fn parse_port_tag(tag: &str, prefix: &str) -> Option<Result<TagRoute, String>> {
    let spec = tag.strip_prefix(prefix)?;
    let mut parts = spec.split('/');
    let proto = match parts.next().unwrap_or_default() {
        "tcp" => PortProtocol::Tcp,
        "udp" => PortProtocol::Udp,
        "tls" => PortProtocol::Tls,
        "sni" => PortProtocol::Sni,
        other => {
            return Some(Err(format!(
                "`{tag}`: `{other}` is not a port protocol (tcp, udp, tls or sni)"
            )))
        }
    };
    let Some(port) = parts.next().and_then(|p| p.parse::<u16>().ok()) else {
        return Some(Err(format!("`{tag}`: name the port, e.g. tcp/3306")));
    };
    let host = parts.next().unwrap_or_default();
    if parts.next().is_some() {
        return Some(Err(format!("`{tag}`: one port per tag, e.g. tcp/3306")));
    }
    Some(port_route(tag, proto, port, host))
}

/// A declared service port as a route: the host is the SNI name (passthrough only).
fn port_route(tag: &str, proto: PortProtocol, port: u16, host: &str) -> Result<TagRoute, String> {
    if port == 0 {
        return Err(format!("`{tag}`: port 0 cannot be listened on"));
    }
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match (proto, host.is_empty()) {
        (PortProtocol::Sni, true) => {
            return Err(format!(
                "`{tag}`: TLS passthrough needs the server name, e.g. sni/443/db.example.com"
            ))
        }
        (PortProtocol::Sni, false) => {
            let bare = host.strip_prefix("*.").unwrap_or(&host);
            crate::config::check_host_name(bare).map_err(|e| format!("`{tag}`: {e}"))?;
        }
        (_, false) => return Err(format!("`{tag}`: only sni ports take a server name")),
        (_, true) => {}
    }
    Ok(TagRoute {
        host,
        path: String::new(),
        options: RouteOptions {
            port: Some((proto, port)),
            ..RouteOptions::default()
        },
    })
}

/// Fabio's route options: the ones with an HTTP meaning tollgate honours, and a refusal
/// naming any other (so a route is never served without what its owner asked for).
fn fabio_options(opts: &str) -> Result<RouteOptions, String> {
    let mut o = RouteOptions::default();
    for kv in opts.split_whitespace() {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "strip" | "prepend" | "host" | "allow" | "deny" | "redirect" => {
                let bad = |why: String| format!("option `{k}={v}`: {why}");
                match k {
                    "strip" => o.strip = Some(route_options::prefix(v).map_err(bad)?),
                    "prepend" => o.prepend = Some(route_options::prefix(v).map_err(bad)?),
                    "host" => o.host = Some(route_options::host(v).map_err(bad)?),
                    "allow" | "deny" => {
                        let nets = v.split(',').filter(|n| !n.is_empty());
                        let nets = route_options::networks(nets).map_err(bad)?;
                        if k == "allow" {
                            o.allow = nets;
                        } else {
                            o.deny = nets;
                        }
                    }
                    _ => {
                        // `redirect=301,https://example.com$path`
                        let (code, to) = v.split_once(',').unwrap_or((v, ""));
                        let code = code.parse::<u16>().map_err(|_| {
                            bad("a 3xx status and a URL, e.g. redirect=301,https://example.com$path"
                                .into())
                        })?;
                        o.redirect = Some(route_options::redirect(code, to).map_err(bad)?);
                    }
                }
            }
            "proto" if v == "http" => {}
            // Fabio's names: https is HTTP/1.1 over TLS, grpc is h2c, grpcs is h2 over TLS;
            // the certificate is verified against the system roots and the service's name
            "proto" if v == "https" => o.protocol = Some(Protocol::Https),
            "proto" if v == "grpc" => o.protocol = Some(Protocol::H2c),
            "proto" if v == "grpcs" => o.protocol = Some(Protocol::H2),
            "tlsskipverify" if v == "false" => {}
            "tlsskipverify" => {
                return Err(format!(
                    "option `{kv}` is not honoured from Consul: only the file may turn certificate verification off (a pool's tls.verify)"
                ))
            }
            "proto" if v == "tcp" => o.port = Some((PortProtocol::Tcp, 0)),
            "proto" if v == "tcp+sni" => o.port = Some((PortProtocol::Sni, 0)),
            _ => return Err(format!("option `{kv}` is not supported")),
        }
    }
    if !o.allow.is_empty() && !o.deny.is_empty() {
        return Err(route_options::ALLOW_AND_DENY.into());
    }
    Ok(o)
}

/// Apply what a service's `tollgate-protocol` meta says (`declared`: the value its
/// instances agree on, or why they do not) to one of its routes: the route's own `proto=`
/// must agree, and an unknown protocol refuses the route (reported, never routed wrongly).
pub fn apply_protocol_meta(r: &mut DiscoveredRoute, declared: &Result<String, String>) {
    if r.refused.is_some() {
        return;
    }
    let why = match declared {
        Err(why) => Some(why.clone()),
        Ok(v) => match Protocol::parse(v) {
            None => Some(format!(
                "meta tollgate-protocol={v} is not a backend protocol: use http1, https, h2 or h2c"
            )),
            Some(p) if r.options.protocol.is_some_and(|q| q != p) => Some(format!(
                "the tag asks for {} but meta tollgate-protocol={v}: they must agree",
                r.options.protocol.map_or("http1", Protocol::name)
            )),
            Some(p) => {
                r.options.protocol = (p != Protocol::Http1).then_some(p);
                None
            }
        },
    };
    if let Some(why) = why {
        tracing::warn!(service = %r.service, "route not applied: {why}");
        r.refused = Some(why);
    }
}

impl View {
    pub fn backends(&self, key: &ServiceKey) -> Option<&[BackendSpec]> {
        self.services.get(key).map(|s| s.backends.as_slice())
    }

    /// Write the view to `path` atomically (temporary file, then rename), readable by its
    /// owner only.
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
            serving_groups: self
                .serving
                .iter()
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect(),
            datacenters: self.datacenters.clone(),
            certs: self.certs.clone(),
        };
        let text = serde_json::to_vec_pretty(&saved).map_err(std::io::Error::other)?;
        // private to its owner: it may hold the keys of `tls.consul_kv_prefix`
        crate::tls::write_private(path, &text)
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
            serving: saved.serving_groups.into_iter().collect(),
            datacenters: saved.datacenters,
            certs: saved.certs,
        })
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    services: Vec<SavedService>,
    #[serde(default)]
    routes: Vec<DiscoveredRoute>,
    /// (`serving_groups`: files written before failover was decided per group had a
    /// `serving` by own key, which is ignored; the manager decides again at once)
    #[serde(default)]
    serving_groups: Vec<(Vec<ServiceKey>, Serving)>,
    #[serde(default)]
    datacenters: Vec<String>,
    #[serde(default)]
    certs: BTreeMap<String, KvCert>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedService {
    key: ServiceKey,
    view: ServiceView,
}
