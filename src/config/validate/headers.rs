//! Header rules (`request_headers`, `response_headers` of a vhost or a route): names that
//! are headers and may be touched, values that are templates of known variables.

use super::raw::RawHeaderRules;
use super::*;

/// Headers no rule may set, add or remove: the hop-by-hop ones (RFC 9110 §7.6.1), which
/// describe one connection and are never forwarded, and the framing tollgate and pingora
/// write (a wrong `Content-Length` would desynchronise the connection: smuggling).
const NEVER: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "trailer",
    "content-length",
    "http2-settings",
];

/// Why `v` is not a header rule value, if it is not: printable ASCII (and tab) around
/// `$variables` tollgate knows.
pub(super) fn template_problem(v: &str) -> Option<String> {
    if v.len() > 4096 {
        return Some("longer than 4096 bytes".into());
    }
    if let Some(b) = v
        .bytes()
        .find(|b| !(b == &b'\t' || (0x20..0x7f).contains(b)))
    {
        return Some(format!(
            "byte 0x{b:02x} cannot be in a header value (printable ASCII only)"
        ));
    }
    let mut rest = v;
    while let Some(at) = rest.find('$') {
        let after = &rest[at + 1..];
        let name_len = after
            .bytes()
            .take_while(|b| b.is_ascii_lowercase() || *b == b'_')
            .count();
        let var = &rest[at..at + 1 + name_len];
        if !HEADER_VARIABLES.contains(&var) {
            return Some(format!(
                "`{var}` is not a variable (variables: {})",
                HEADER_VARIABLES.join(", ")
            ));
        }
        rest = &after[name_len..];
    }
    None
}

/// One `request_headers` / `response_headers` table at `opt`.
pub(super) fn header_rules(
    cx: &mut Ctx,
    raw: &Option<Spanned<RawHeaderRules>>,
    opt: &str,
    request: bool,
) -> HeaderRules {
    let Some(raw) = raw else {
        return HeaderRules::default();
    };
    let span = raw.span();
    let r = raw.get_ref();
    let mut out = HeaderRules::default();
    let name_ok = |cx: &mut Ctx, name: &str, key: &str| -> Option<String> {
        let lower = name.to_ascii_lowercase();
        let why = if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
            Some(format!("`{name}` is not a header name"))
        } else if NEVER.contains(&lower.as_str()) {
            Some(format!(
                "`{name}` describes the connection or its framing: no rule may touch it"
            ))
        } else if request && lower == "host" {
            Some("the Host sent upstream is the route's `host` option".to_string())
        } else {
            None
        };
        match why {
            Some(why) => {
                cx.err(span.clone(), format!("{opt}.{key}"), why);
                None
            }
            None => Some(lower),
        }
    };
    for (key, list, into_add) in [("set", &r.set, false), ("add", &r.add, true)] {
        for (name, value) in list {
            if name_ok(cx, name, key).is_none() {
                continue;
            }
            if let Some(why) = template_problem(value) {
                cx.err(span.clone(), format!("{opt}.{key}.{name}"), why);
                continue;
            }
            // as written: a field a rule sets goes on an HTTP/1 wire spelled so
            let pair = (name.clone(), value.clone());
            if into_add {
                out.add.push(pair);
            } else {
                out.set.push(pair);
            }
        }
    }
    for name in &r.remove {
        if let Some(lower) = name_ok(cx, name, "remove") {
            out.remove.push(lower);
        }
    }
    for (name, _) in &out.set {
        if out.remove.iter().any(|r| r.eq_ignore_ascii_case(name)) {
            cx.err(
                span.clone(),
                format!("{opt}.remove"),
                format!("`{name}` is both set and removed"),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_hold_printable_text_and_known_variables() {
        assert_eq!(template_problem("nosniff"), None);
        assert_eq!(
            template_problem("$scheme://$host (id $request_id, $client_ip)"),
            None
        );
        for bad in [
            "a\r\nSet-Cookie: x",
            "$path",
            "$",
            "cost: 5$",
            "\u{e9}t\u{e9}",
            "\0",
        ] {
            assert!(template_problem(bad).is_some(), "{bad:?}");
        }
    }
}
