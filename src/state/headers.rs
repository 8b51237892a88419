//! Header rules made ready for requests: names and fixed values parsed once per
//! configuration, templates split into their text and variables. The proxy fills the
//! variables and applies the operations (`proxy::headers`).

use crate::config::HeaderRules;
use http::{HeaderName, HeaderValue};

/// A piece of a templated value.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    ClientIp,
    RequestId,
    Host,
    Scheme,
}

/// A rule's value: fixed (the common case, no work per request), or a template.
#[derive(Debug, Clone)]
pub enum Value {
    Fixed(HeaderValue),
    Template(Vec<Part>),
}

impl Value {
    /// `text`, validated by `config` (printable ASCII, known variables).
    fn of(text: &str) -> Option<Value> {
        if !text.contains('$') {
            return HeaderValue::from_str(text).ok().map(Value::Fixed);
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find('$') {
            if at > 0 {
                parts.push(Part::Text(rest[..at].to_string()));
            }
            let after = &rest[at + 1..];
            let len = after
                .bytes()
                .take_while(|b| b.is_ascii_lowercase() || *b == b'_')
                .count();
            parts.push(match &after[..len] {
                "client_ip" => Part::ClientIp,
                "request_id" => Part::RequestId,
                "host" => Part::Host,
                "scheme" => Part::Scheme,
                _ => return None,
            });
            rest = &after[len..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Some(Value::Template(parts))
    }
}

/// Fields the proxy itself reads or rewrites after the rules ran (framing, the connection,
/// dates and caching, the request's Host): a rule on one of them goes into the header
/// maps, where that code sees it. Every other rule's field goes on the wire after the
/// maps' fields, without entering them (pingora-http patches 0028 and 0031).
const IN_THE_MAPS: &[HeaderName] = &[
    http::header::CONTENT_LENGTH,
    http::header::TRANSFER_ENCODING,
    http::header::CONTENT_TYPE,
    http::header::CONTENT_ENCODING,
    http::header::CONTENT_RANGE,
    http::header::ACCEPT_RANGES,
    http::header::CONNECTION,
    http::header::UPGRADE,
    http::header::TE,
    http::header::TRAILER,
    http::header::DATE,
    http::header::HOST,
    http::header::EXPECT,
    http::header::VARY,
    http::header::ETAG,
    http::header::LAST_MODIFIED,
    http::header::CACHE_CONTROL,
    http::header::EXPIRES,
];

/// A field a rule sets or adds: its name, its value, and its name as the operator wrote it
/// (what goes on an HTTP/1 wire) when it may go on the wire outside the header maps.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: HeaderName,
    pub value: Value,
    pub wire: Option<bytes::Bytes>,
}

impl Field {
    fn of(written: &str, value: &str) -> Option<Field> {
        let name = HeaderName::from_bytes(written.as_bytes()).ok()?;
        let wire = (!IN_THE_MAPS.contains(&name)).then(|| bytes::Bytes::from(written.to_string()));
        Some(Field {
            name,
            value: Value::of(value)?,
            wire,
        })
    }
}

/// The operations of a vhost's rules followed by a route's: removals, then sets (replacing),
/// then adds (beside what is there).
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub remove: Vec<HeaderName>,
    pub set: Vec<Field>,
    pub add: Vec<Field>,
    /// A rule names one of the fields tollgate adds itself ([`OWN_FIELDS`]): those then go
    /// into the header maps, where the rules remove or replace them.
    pub names_own: bool,
    /// When every set and added field is fixed and goes on the wire (the common case:
    /// static security headers): all of them rendered once, in order, one shared block a
    /// message instead of a field each (pingora-http patch 0032).
    pub block: Option<std::sync::Arc<pingora::http::WireBlock>>,
}

/// The fields tollgate adds to requests (and X-Request-Id to answers).
pub const OWN_FIELDS: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
];

impl HeaderOps {
    /// `rules` in order (the vhost's, then the route's): a later set of a name replaces an
    /// earlier one.
    pub fn of(rules: &[&HeaderRules]) -> HeaderOps {
        let mut ops = HeaderOps::default();
        let name = |n: &str| HeaderName::from_bytes(n.as_bytes()).ok();
        for r in rules {
            for n in r.remove.iter().filter_map(|n| name(n)) {
                ops.set.retain(|f| f.name != n);
                ops.add.retain(|f| f.name != n);
                if !ops.remove.contains(&n) {
                    ops.remove.push(n);
                }
            }
            for (n, v) in &r.set {
                let Some(f) = Field::of(n, v) else {
                    continue;
                };
                ops.set.retain(|s| s.name != f.name);
                ops.add.retain(|s| s.name != f.name);
                ops.set.push(f);
            }
            for (n, v) in &r.add {
                if let Some(f) = Field::of(n, v) {
                    ops.add.push(f);
                }
            }
        }
        ops.names_own = OWN_FIELDS
            .iter()
            .any(|n| ops.names(&HeaderName::from_static(n)));
        ops.block = ops.wire_block();
        ops
    }

    /// The set and added fields as one block, if all are fixed and go on the wire.
    fn wire_block(&self) -> Option<std::sync::Arc<pingora::http::WireBlock>> {
        let fields: Option<Vec<(&str, HeaderName, HeaderValue)>> = self
            .set
            .iter()
            .chain(&self.add)
            .map(|f| match (&f.wire, &f.value) {
                (Some(case), Value::Fixed(v)) => {
                    Some((std::str::from_utf8(case).ok()?, f.name.clone(), v.clone()))
                }
                _ => None,
            })
            .collect();
        let fields = fields.filter(|f| !f.is_empty())?;
        Some(std::sync::Arc::new(pingora::http::WireBlock::new(&fields)))
    }

    /// Whether a rule removes, sets or adds `name`.
    pub fn names(&self, name: &HeaderName) -> bool {
        self.remove.contains(name)
            || self.set.iter().any(|f| f.name == name)
            || self.add.iter().any(|f| f.name == name)
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// No rules, for an answer nothing configured any for.
    pub fn none() -> &'static HeaderOps {
        static NONE: HeaderOps = HeaderOps {
            remove: Vec::new(),
            set: Vec::new(),
            add: Vec::new(),
            names_own: false,
            block: None,
        };
        &NONE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]) -> HeaderRules {
        let pairs = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        HeaderRules {
            set: pairs(set),
            add: pairs(add),
            remove: remove.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn the_route_follows_the_vhost() {
        let vhost = rules(&[("x-a", "1"), ("x-b", "1")], &[("x-c", "1")], &["server"]);
        let route = rules(&[("x-a", "2")], &[], &["x-c"]);
        let ops = HeaderOps::of(&[&vhost, &route]);
        let set: Vec<(String, String)> = ops
            .set
            .iter()
            .map(|f| match &f.value {
                Value::Fixed(v) => (f.name.to_string(), v.to_str().unwrap().to_string()),
                Value::Template(_) => unreachable!(),
            })
            .collect();
        assert_eq!(
            set,
            [("x-b".into(), "1".into()), ("x-a".into(), "2".into())]
        );
        assert!(ops.add.is_empty(), "the route removed x-c");
        assert_eq!(ops.remove, ["server", "x-c"]);
        assert!(ops.names(&HeaderName::from_static("x-a")) && ops.names(&http::header::SERVER));
        assert!(!ops.names(&HeaderName::from_static("x-request-id")));
        assert!(!ops.names_own);
        let own = rules(&[], &[], &["X-Forwarded-Host"]);
        assert!(HeaderOps::of(&[&vhost, &own]).names_own);
    }

    #[test]
    fn fields_go_on_the_wire_as_written_unless_the_proxy_reads_them() {
        let r = rules(
            &[("X-Frame-Options", "DENY"), ("Cache-Control", "no-store")],
            &[("Link", "</a.css>; rel=preload")],
            &[],
        );
        let ops = HeaderOps::of(&[&r]);
        let wire = |f: &Field| {
            f.wire
                .as_ref()
                .map(|w| String::from_utf8_lossy(w).to_string())
        };
        assert_eq!(wire(&ops.set[0]).as_deref(), Some("X-Frame-Options"));
        assert_eq!(ops.set[0].name, "x-frame-options");
        assert_eq!(wire(&ops.set[1]), None, "caching fields stay in the maps");
        assert_eq!(wire(&ops.add[0]).as_deref(), Some("Link"));
        assert!(
            ops.block.is_none(),
            "Cache-Control goes into the maps: no block"
        );
        // all fixed and on the wire: one block, sets then adds, spelled as written
        let r = rules(
            &[("X-Frame-Options", "DENY")],
            &[("Link", "</a.css>; rel=preload")],
            &["Server"],
        );
        let ops = HeaderOps::of(&[&r]);
        let block = ops.block.as_ref().expect("a block");
        let names: Vec<&str> = block.fields().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x-frame-options", "link"]);
        // a template leaves every field to be filled per request
        let r = rules(
            &[("X-Frame-Options", "DENY"), ("X-Id", "$request_id")],
            &[],
            &[],
        );
        assert!(HeaderOps::of(&[&r]).block.is_none());
    }

    #[test]
    fn templates_split_into_text_and_variables() {
        let Some(Value::Template(parts)) = Value::of("$scheme://$host/x?id=$request_id;$client_ip")
        else {
            panic!("a template");
        };
        assert_eq!(
            parts,
            [
                Part::Scheme,
                Part::Text("://".into()),
                Part::Host,
                Part::Text("/x?id=".into()),
                Part::RequestId,
                Part::Text(";".into()),
                Part::ClientIp,
            ]
        );
    }
}
