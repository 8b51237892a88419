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

/// The operations of a vhost's rules followed by a route's: removals, then sets (replacing),
/// then adds (beside what is there).
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub remove: Vec<HeaderName>,
    pub set: Vec<(HeaderName, Value)>,
    pub add: Vec<(HeaderName, Value)>,
}

impl HeaderOps {
    /// `rules` in order (the vhost's, then the route's): a later set of a name replaces an
    /// earlier one.
    pub fn of(rules: &[&HeaderRules]) -> HeaderOps {
        let mut ops = HeaderOps::default();
        let name = |n: &str| HeaderName::from_bytes(n.as_bytes()).ok();
        for r in rules {
            for n in r.remove.iter().filter_map(|n| name(n)) {
                ops.set.retain(|(s, _)| *s != n);
                ops.add.retain(|(s, _)| *s != n);
                if !ops.remove.contains(&n) {
                    ops.remove.push(n);
                }
            }
            for (n, v) in &r.set {
                let (Some(n), Some(v)) = (name(n), Value::of(v)) else {
                    continue;
                };
                ops.set.retain(|(s, _)| *s != n);
                ops.add.retain(|(s, _)| *s != n);
                ops.set.push((n, v));
            }
            for (n, v) in &r.add {
                if let (Some(n), Some(v)) = (name(n), Value::of(v)) {
                    ops.add.push((n, v));
                }
            }
        }
        ops
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
            .map(|(n, v)| match v {
                Value::Fixed(v) => (n.to_string(), v.to_str().unwrap().to_string()),
                Value::Template(_) => unreachable!(),
            })
            .collect();
        assert_eq!(
            set,
            [("x-b".into(), "1".into()), ("x-a".into(), "2".into())]
        );
        assert!(ops.add.is_empty(), "the route removed x-c");
        assert_eq!(ops.remove, ["server", "x-c"]);
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
