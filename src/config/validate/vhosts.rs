//! `[[vhost]]` and `[[vhost.route]]`: names, certificates, route paths in normal form.

use super::*;

/// `None` when a route path is in the normal form requests are routed on; else a hint for
/// the error (`"; write `/b`"` when it has one).
pub(super) fn route_path_not_normal(p: &str) -> Option<String> {
    use crate::routing::path::{normalize_path, EncodedSlashes};
    match normalize_path(p, EncodedSlashes::Keep) {
        Ok(std::borrow::Cow::Borrowed(_)) if !p.contains(';') => None,
        Ok(n) if !p.contains(';') => Some(format!("; write `{n}`")),
        _ => Some(String::new()),
    }
}

/// Is `name` a valid vhost name: a DNS name, an IP literal, or `*.` followed by a DNS name.
pub fn check_host_name(name: &str) -> Result<(), String> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let (wild, rest) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    if rest.contains('*') {
        return Err(format!(
            "`{name}`: a wildcard is only allowed as the whole first label, e.g. *.example.com"
        ));
    }
    if rest.is_empty() || rest.len() > 253 {
        return Err(format!("`{name}` is not a host name"));
    }
    for label in rest.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "`{name}` is not a host name (label `{label}`): use letters, digits and hyphens"
            ));
        }
    }
    if wild && !rest.contains('.') && rest.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("`{name}`: a wildcard cannot cover an IP address"));
    }
    Ok(())
}

pub(super) fn vhosts(
    cx: &mut Ctx,
    raw: &[Spanned<RawVhost>],
    pools: &BTreeMap<String, PoolSpec>,
    plugins: &BTreeMap<String, PluginSpec>,
) -> Vec<Vhost> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut default_line: Option<usize> = None;
    let mut out = Vec::new();
    for (i, sv) in raw.iter().enumerate() {
        let v = sv.get_ref();
        let origin = cx.origin(sv.span());
        let mut names = Vec::new();
        for n in &v.names {
            let name = n
                .get_ref()
                .trim()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            if let Err(e) = check_host_name(&name) {
                cx.err(n.span(), format!("vhost[{i}].names"), e);
                continue;
            }
            let line = cx.origin(n.span()).line;
            if let Some(prev) = seen.insert(name.clone(), line) {
                cx.err(
                    n.span(),
                    format!("vhost[{i}].names"),
                    format!("`{name}` is already a name of the vhost on line {prev}"),
                );
            }
            names.push(name);
        }
        if v.default {
            if let Some(prev) = default_line {
                cx.err(
                    sv.span(),
                    format!("vhost[{i}].default"),
                    format!(
                        "only one vhost can be the default; the vhost on line {prev} already is"
                    ),
                );
            }
            default_line = Some(origin.line);
        } else if v.names.is_empty() {
            cx.err(
                sv.span(),
                format!("vhost[{i}].names"),
                "a vhost needs names = [\"example.com\"] unless it is the default (default = true)",
            );
        }
        let cert = match (&v.cert, &v.key) {
            (Some(c), Some(k)) => Some(CertFiles {
                cert: cx.path(c.get_ref()),
                key: cx.path(k.get_ref()),
                origin: cx.origin(c.span()),
            }),
            (None, None) => None,
            (Some(c), None) => {
                cx.err(
                    c.span(),
                    format!("vhost[{i}].key"),
                    "cert is set but key is not: set both",
                );
                None
            }
            (None, Some(k)) => {
                cx.err(
                    k.span(),
                    format!("vhost[{i}].cert"),
                    "key is set but cert is not: set both",
                );
                None
            }
        };
        let acme = v.acme.as_ref().is_some_and(|a| *a.get_ref());
        if let Some(a) = v.acme.as_ref().filter(|a| *a.get_ref()) {
            let why = if cert.is_some() {
                Some(
                    "a vhost takes its certificate from cert/key or from ACME, not both"
                        .to_string(),
                )
            } else if let Some(w) = names.iter().find(|n| n.starts_with("*.")) {
                Some(format!(
                    "`{w}`: HTTP-01 cannot prove a wildcard name; list the names"
                ))
            } else if names.is_empty() {
                Some("an ACME vhost needs names to order a certificate for".to_string())
            } else {
                None
            };
            if let Some(why) = why {
                cx.err(a.span(), format!("vhost[{i}].acme"), why);
            }
        }
        if v.route.is_empty() {
            cx.err(
                sv.span(),
                format!("vhost[{i}].route"),
                "the vhost has no routes: add [[vhost.route]] with path = \"/\" and pool = \"…\"",
            );
        }
        let mut routes = Vec::new();
        let mut paths: HashMap<String, usize> = HashMap::new();
        for (j, sr) in v.route.iter().enumerate() {
            let r = sr.get_ref();
            let p = r.path.get_ref();
            let opt = format!("vhost[{i}].route[{j}]");
            if !p.starts_with('/') || p.contains(['?', '#', ' ']) {
                cx.err(
                    r.path.span(),
                    format!("{opt}.path"),
                    format!(
                        "`{p}` is not a path prefix: it must start with / and hold no ? # or space"
                    ),
                );
            } else if let Some(hint) = route_path_not_normal(p) {
                cx.err(
                    r.path.span(),
                    format!("{opt}.path"),
                    format!(
                        "`{p}` can never match: requests are routed on their normalised path (no //, . or .. segments, %XX only for reserved characters, no ;){hint}"
                    ),
                );
            }
            let matches = route_match_of(cx, r, &opt);
            // one prefix may have several routes, told apart by their matchers
            let line = cx.origin(r.path.span()).line;
            let key = format!("{p} {matches:?}");
            if let Some(prev) = paths.insert(key, line) {
                cx.err(
                    r.path.span(),
                    format!("{opt}.path"),
                    format!("`{p}` is already routed on line {prev} (with the same `match`)"),
                );
            }
            let options = route_options_of(cx, r, &opt);
            let respond = respond_of(cx, r, &opt);
            let answers_itself = r.redirect.is_some() || r.respond.is_some();
            if let (Some(_), Some(rs)) = (&r.redirect, &r.respond) {
                cx.err(
                    rs.span(),
                    format!("{opt}.respond"),
                    "a route answers with a `redirect` or a `respond`, not both",
                );
            }
            let pool = match (&r.pool, answers_itself) {
                (Some(pool), false) => {
                    check_pool_named(cx, pool, &format!("{opt}.pool"), pools);
                    pool.get_ref().clone()
                }
                (Some(pool), true) => {
                    cx.err(
                        pool.span(),
                        format!("{opt}.pool"),
                        "a route that answers itself (`redirect`, `respond`) sends nothing to a pool: remove `pool` or the answer",
                    );
                    String::new()
                }
                (None, true) => String::new(),
                (None, false) => {
                    cx.err(
                        r.path.span(),
                        format!("{opt}.pool"),
                        "missing: the pool the route sends to (or the `redirect` or `respond` it answers with)",
                    );
                    String::new()
                }
            };
            let max_body_size = r
                .max_body_size
                .as_ref()
                .map(|_| cx.size(&r.max_body_size, &format!("{opt}.max_body_size"), 0));
            let route_plugins = plugin_refs(cx, &r.plugins, &format!("{opt}.plugins"), plugins);
            let request_headers = header_rules(
                cx,
                &r.request_headers,
                &format!("{opt}.request_headers"),
                true,
            );
            let response_headers = header_rules(
                cx,
                &r.response_headers,
                &format!("{opt}.response_headers"),
                false,
            );
            if answers_itself && !request_headers.is_empty() {
                if let Some(h) = &r.request_headers {
                    cx.err(
                        h.span(),
                        format!("{opt}.request_headers"),
                        "a route that answers itself sends nothing upstream: `request_headers` would do nothing",
                    );
                }
            }
            routes.push(Route {
                path: p.clone(),
                pool,
                max_body_size,
                plugins: route_plugins,
                options,
                request_headers,
                response_headers,
                respond,
                matches,
                origin: cx.origin(r.path.span()),
            });
        }
        let vhost_plugins = plugin_refs(cx, &v.plugins, &format!("vhost[{i}].plugins"), plugins);
        let consul_routes = match v.consul_routes.as_ref().map(|c| (c.get_ref(), c.span())) {
            None | Some((RawConsulRoutes::On(false), _)) => ConsulRoutes::Refused,
            Some((RawConsulRoutes::On(true), _)) => ConsulRoutes::Any,
            Some((RawConsulRoutes::Services(list), span)) => {
                let opt = format!("vhost[{i}].consul_routes");
                if list.is_empty() {
                    cx.err(
                        span.clone(),
                        &opt,
                        "an empty list allows no service: write false, or name services",
                    );
                }
                let each = list.iter().map(|s| (s.as_str(), span.clone()));
                ConsulRoutes::Services(consul::service_patterns(cx, each, &opt))
            }
        };
        let headers = vhost_headers(cx, v, i);
        let error_pages = error_pages_of(cx, v, i);
        let request_headers = header_rules(
            cx,
            &v.request_headers,
            &format!("vhost[{i}].request_headers"),
            true,
        );
        let response_headers = header_rules(
            cx,
            &v.response_headers,
            &format!("vhost[{i}].response_headers"),
            false,
        );
        out.push(Vhost {
            names,
            default: v.default,
            cert,
            redirect_https: v.redirect_https.unwrap_or(true),
            plugins: vhost_plugins,
            routes,
            consul_routes,
            acme,
            headers,
            request_headers,
            response_headers,
            error_pages,
            origin,
        });
    }
    out
}

/// An error unless `pool` names a defined pool (listing the defined ones).
fn check_pool_named(
    cx: &mut Ctx,
    pool: &Spanned<String>,
    option: &str,
    pools: &BTreeMap<String, PoolSpec>,
) {
    let name = pool.get_ref();
    if !pools.contains_key(name) {
        let known: Vec<&str> = pools.keys().map(String::as_str).collect();
        cx.err(
            pool.span(),
            option,
            format!(
                "no pool named `{name}` (defined pools: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
        );
    }
}

/// A file route's `strip`, `prepend`, `host`, `redirect`, `allow` and `deny`: checked as a
/// Consul tag's options are (`config::route_options`), plus what only a file route can say
/// wrong: options that mean nothing on a route that answers itself.
fn route_options_of(cx: &mut Ctx, r: &super::raw::RawRoute, opt: &str) -> RouteOptions {
    use super::route_options as ro;
    let mut o = RouteOptions::default();
    let one = |cx: &mut Ctx,
               v: &Option<Spanned<String>>,
               key: &str,
               check: fn(&str) -> Result<String, String>| {
        let v = v.as_ref()?;
        match check(v.get_ref()) {
            Ok(kept) => Some(kept),
            Err(why) => {
                cx.err(
                    v.span(),
                    format!("{opt}.{key}"),
                    format!("`{}`: {why}", v.get_ref()),
                );
                None
            }
        }
    };
    o.strip = one(cx, &r.strip, "strip", ro::prefix);
    o.prepend = one(cx, &r.prepend, "prepend", ro::prefix);
    o.host = one(cx, &r.host, "host", ro::host);
    if let Some(rd) = &r.redirect {
        let raw = rd.get_ref();
        match ro::redirect(raw.status, &raw.to) {
            Ok(kept) => o.redirect = Some(kept),
            Err(why) => cx.err(rd.span(), format!("{opt}.redirect"), why),
        }
    }
    for (key, nets) in [("allow", &r.allow), ("deny", &r.deny)] {
        let Some(nets) = nets else { continue };
        match ro::networks(nets.get_ref().iter().map(String::as_str)) {
            Ok(kept) if key == "allow" => o.allow = kept,
            Ok(kept) => o.deny = kept,
            Err(why) => cx.err(nets.span(), format!("{opt}.{key}"), why),
        }
    }
    if let (Some(_), Some(deny)) = (&r.allow, &r.deny) {
        cx.err(deny.span(), format!("{opt}.deny"), ro::ALLOW_AND_DENY);
    }
    if r.redirect.is_some() || r.respond.is_some() {
        let spans = [
            ("strip", r.strip.as_ref().map(|v| v.span())),
            ("prepend", r.prepend.as_ref().map(|v| v.span())),
            ("host", r.host.as_ref().map(|v| v.span())),
            ("max_body_size", r.max_body_size.as_ref().map(|v| v.span())),
            ("plugins", r.plugins.first().map(|v| v.span())),
        ];
        for (key, span) in spans {
            if let Some(span) = span {
                cx.err(
                    span,
                    format!("{opt}.{key}"),
                    format!(
                        "a route that answers itself (`redirect`, `respond`) sends nothing upstream: `{key}` would do nothing"
                    ),
                );
            }
        }
    }
    o
}

/// A vhost's `hsts` and `server_header`.
fn vhost_headers(cx: &mut Ctx, v: &RawVhost, i: usize) -> VhostHeaders {
    use super::raw::{RawHsts, RawServerHeader};
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    let hsts = match v.hsts.as_ref().map(|h| (h.get_ref(), h.span())) {
        None | Some((RawHsts::On(false), _)) => None,
        Some((RawHsts::On(true), _)) => Some(Hsts {
            max_age: YEAR,
            include_subdomains: false,
            preload: false,
        }),
        Some((RawHsts::Table(t), span)) => {
            let opt = format!("vhost[{i}].hsts");
            let max_age = match t.max_age.as_deref().map(super::parse_duration) {
                None => YEAR,
                Some(Ok(d)) if d <= 2 * YEAR => d,
                Some(Ok(_)) => {
                    cx.err(span.clone(), format!("{opt}.max_age"), "at most 730d");
                    YEAR
                }
                Some(Err(e)) => {
                    cx.err(span.clone(), format!("{opt}.max_age"), e);
                    YEAR
                }
            };
            if t.preload && (!t.include_subdomains || max_age < YEAR) {
                cx.err(
                    span,
                    format!("{opt}.preload"),
                    "browsers' preload lists take only include_subdomains = true and max_age of at least 365d",
                );
            }
            Some(Hsts {
                max_age,
                include_subdomains: t.include_subdomains,
                preload: t.preload,
            })
        }
    };
    let server = match v.server_header.as_ref().map(|h| (h.get_ref(), h.span())) {
        None => ServerHeader::Pass,
        Some((RawServerHeader::Word(w), span)) => match w.as_str() {
            "pass" => ServerHeader::Pass,
            "drop" => ServerHeader::Drop,
            other => {
                cx.err(
                    span,
                    format!("vhost[{i}].server_header"),
                    format!("`{other}`: \"pass\", \"drop\", or {{ replace = \"name\" }}"),
                );
                ServerHeader::Pass
            }
        },
        Some((RawServerHeader::Replace { replace }, span)) => {
            let printable = !replace.is_empty()
                && replace.len() <= 128
                && replace.bytes().all(|b| (0x20..0x7f).contains(&b));
            if !printable {
                cx.err(
                    span,
                    format!("vhost[{i}].server_header.replace"),
                    "1 to 128 printable ASCII characters",
                );
            }
            ServerHeader::Replace(replace.clone())
        }
    };
    VhostHeaders { hsts, server }
}

/// `text/plain` unless it says otherwise; printable ASCII.
fn content_type_ok(v: &str) -> bool {
    !v.is_empty() && v.len() <= 256 && v.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// A route's `respond`: a status, a body of at most 64 KiB, a content type.
fn respond_of(cx: &mut Ctx, r: &super::raw::RawRoute, opt: &str) -> Option<Page> {
    let rs = r.respond.as_ref()?;
    let raw = rs.get_ref();
    let opt = format!("{opt}.respond");
    let why = if !(200..=599).contains(&raw.status) {
        Some(format!("status {}: from 200 to 599", raw.status))
    } else if matches!(raw.status, 204 | 304) && !raw.body.is_empty() {
        Some(format!("a {} answer has no body", raw.status))
    } else if raw.body.len() > 64 * 1024 {
        Some("a body of at most 64 KiB (larger pages belong on a backend)".into())
    } else if !raw.content_type.as_deref().is_none_or(content_type_ok) {
        Some("content_type: printable ASCII, e.g. \"text/html; charset=utf-8\"".into())
    } else {
        None
    };
    if let Some(why) = why {
        cx.err(rs.span(), opt, why);
        return None;
    }
    Some(Page {
        status: raw.status,
        content_type: raw
            .content_type
            .clone()
            .unwrap_or_else(|| "text/plain; charset=utf-8".into()),
        body: bytes::Bytes::from(raw.body.clone()),
        file: None,
    })
}

/// A vhost's `error_pages`: a 4xx/5xx status each, a readable file of at most 1 MiB (its
/// content type from its extension).
fn error_pages_of(cx: &mut Ctx, v: &RawVhost, i: usize) -> BTreeMap<u16, Page> {
    let mut out = BTreeMap::new();
    let Some(pages) = &v.error_pages else {
        return out;
    };
    let span = pages.span();
    for (status, file) in pages.get_ref() {
        let opt = format!("vhost[{i}].error_pages.{status}");
        let Some(code) = status
            .parse::<u16>()
            .ok()
            .filter(|c| (400..=599).contains(c))
        else {
            cx.err(
                span.clone(),
                opt,
                format!("`{status}`: a 4xx or 5xx status"),
            );
            continue;
        };
        let path = cx.path(file);
        let body = match std::fs::read(&path) {
            Ok(b) if b.len() <= 1 << 20 => b,
            Ok(_) => {
                cx.err(
                    span.clone(),
                    opt,
                    format!("{} is over 1 MiB", path.display()),
                );
                continue;
            }
            Err(e) => {
                cx.err(
                    span.clone(),
                    opt,
                    format!("cannot read {}: {e}", path.display()),
                );
                continue;
            }
        };
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let content_type = match ext.to_ascii_lowercase().as_str() {
            "html" | "htm" => "text/html; charset=utf-8",
            "json" => "application/json",
            _ => "text/plain; charset=utf-8",
        };
        out.insert(
            code,
            Page {
                status: code,
                content_type: content_type.into(),
                body: bytes::Bytes::from(body),
                file: Some(path),
            },
        );
    }
    out
}

/// A route's `match`: methods (upper-cased tokens), header rules (header names) and query
/// rules, each with exactly one of `equals`, `regex` or `present = true`.
fn route_match_of(cx: &mut Ctx, r: &super::raw::RawRoute, opt: &str) -> RouteMatch {
    let mut out = RouteMatch::default();
    let Some(m) = &r.matches else {
        return out;
    };
    let span = m.span();
    let raw = m.get_ref();
    let opt = format!("{opt}.match");
    for method in &raw.methods {
        let upper = method.to_ascii_uppercase();
        if http::Method::from_bytes(upper.as_bytes()).is_err() || upper.is_empty() {
            cx.err(
                span.clone(),
                format!("{opt}.methods"),
                format!("`{method}` is not a method"),
            );
        } else if !out.methods.contains(&upper) {
            out.methods.push(upper);
        }
    }
    for (kind, rules) in [("headers", &raw.headers), ("query", &raw.query)] {
        for (k, rule) in rules.iter().enumerate() {
            let at = format!("{opt}.{kind}[{k}]");
            let name = if kind == "headers" {
                let lower = rule.name.to_ascii_lowercase();
                if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
                    cx.err(
                        span.clone(),
                        format!("{at}.name"),
                        format!("`{}` is not a header name", rule.name),
                    );
                    continue;
                }
                lower
            } else {
                if rule.name.is_empty() || rule.name.contains(['&', '=', '#', ' ']) {
                    cx.err(
                        span.clone(),
                        format!("{at}.name"),
                        format!("`{}` is not a query parameter name", rule.name),
                    );
                    continue;
                }
                rule.name.clone()
            };
            let tests = usize::from(rule.equals.is_some())
                + usize::from(rule.regex.is_some())
                + usize::from(rule.present.is_some());
            if tests != 1 || rule.present == Some(false) {
                cx.err(
                    span.clone(),
                    at,
                    "give exactly one of equals = \"…\", regex = \"…\" or present = true",
                );
                continue;
            }
            if let Some(re) = &rule.regex {
                if let Err(e) = super::match_regex(re) {
                    cx.err(span.clone(), format!("{at}.regex"), e);
                    continue;
                }
            }
            let rule = MatchRule {
                name,
                equals: rule.equals.clone(),
                regex: rule.regex.clone(),
            };
            if kind == "headers" {
                out.headers.push(rule);
            } else {
                out.query.push(rule);
            }
        }
    }
    out
}
