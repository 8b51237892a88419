//! `[consul]`, with Consul's environment variables as defaults.

use super::*;

/// `[consul]`, with Consul's environment variables as defaults.
pub(super) fn consul(cx: &mut Ctx, raw: &crate::config::raw::RawConsul) -> ConsulSettings {
    let addr_raw = raw
        .address
        .as_ref()
        .map(|a| (a.get_ref().clone(), a.span()))
        .or_else(|| env("CONSUL_HTTP_ADDR").map(|a| (a, 0..0)))
        .unwrap_or_else(|| (defaults::consul::ADDRESS.to_string(), 0..0));
    let address = if addr_raw.0.starts_with("http://") || addr_raw.0.starts_with("https://") {
        addr_raw.0.trim_end_matches('/').to_string()
    } else {
        format!("http://{}", addr_raw.0.trim_end_matches('/'))
    };
    if address
        .parse::<http::Uri>()
        .map(|u| u.host().is_none())
        .unwrap_or(true)
    {
        cx.err(
            addr_raw.1,
            "consul.address",
            format!(
                "`{}` is not an address: use http://127.0.0.1:8500 (or CONSUL_HTTP_ADDR)",
                addr_raw.0
            ),
        );
    }
    let token = raw
        .token
        .as_ref()
        .map(|t| t.get_ref().trim().to_string())
        .or_else(|| env("CONSUL_HTTP_TOKEN"));
    let token_file = raw.token_file.as_ref().map(|f| cx.path(f.get_ref()));
    if let (Some(_), Some(f)) = (&raw.token, &raw.token_file) {
        cx.err(
            f.span(),
            "consul.token_file",
            "set consul.token or consul.token_file, not both",
        );
    }
    let ca_cert = raw
        .ca_cert
        .as_ref()
        .map(|c| cx.path(c.get_ref()))
        .or_else(|| env("CONSUL_CACERT").map(PathBuf::from));
    use defaults::consul as def;
    let ms = Duration::from_millis;
    let wait = cx.duration_in(
        &raw.wait,
        "consul.wait",
        def::WAIT,
        Duration::from_secs(1),
        Duration::from_secs(600),
    );
    let quiescence_min = cx.duration_in(
        &raw.quiescence_min,
        "consul.quiescence_min",
        def::QUIESCENCE_MIN,
        ms(0),
        Duration::from_secs(60),
    );
    let quiescence_max = cx.duration_in(
        &raw.quiescence_max,
        "consul.quiescence_max",
        def::QUIESCENCE_MAX,
        ms(0),
        Duration::from_secs(300),
    );
    if quiescence_max < quiescence_min {
        let span = raw
            .quiescence_max
            .as_ref()
            .map(|s| s.span())
            .unwrap_or(0..0);
        cx.err(
            span,
            "consul.quiescence_max",
            "must not be shorter than consul.quiescence_min",
        );
    }
    ConsulSettings {
        address,
        token,
        token_file,
        ca_cert,
        datacenter: raw.datacenter.as_ref().map(|d| d.get_ref().clone()),
        wait,
        stale: raw.stale.unwrap_or(false),
        cached: raw.cached.unwrap_or(true),
        quiescence_min,
        quiescence_max,
        max_blocking: cx.int(
            &raw.max_blocking,
            "consul.max_blocking",
            def::MAX_BLOCKING,
            0,
            190,
        ) as usize,
        tag_routes: raw.tag_routes.unwrap_or(false),
        route_tag_prefix: raw
            .route_tag_prefix
            .clone()
            .unwrap_or_else(|| def::ROUTE_TAG_PREFIX.to_string()),
        fabio_tags: raw.fabio_tags.unwrap_or(true),
        route_meta_prefix: raw
            .route_meta_prefix
            .clone()
            .unwrap_or_else(|| def::ROUTE_META_PREFIX.to_string()),
        min_fraction: match &raw.min_fraction {
            None => def::MIN_FRACTION,
            Some(f) if (0.0..=1.0).contains(f.get_ref()) => *f.get_ref(),
            Some(f) => {
                cx.err(
                    f.span(),
                    "consul.min_fraction",
                    format!("must be between 0.0 and 1.0, got {}", f.get_ref()),
                );
                def::MIN_FRACTION
            }
        },
        ports: raw
            .ports
            .iter()
            .filter_map(|r| {
                let v = r.get_ref().trim();
                let (lo, hi) = v.split_once('-').unwrap_or((v, v));
                match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
                    (Ok(lo), Ok(hi)) if lo >= 1 && lo <= hi => Some((lo, hi)),
                    _ => {
                        cx.err(
                            r.span(),
                            "consul.ports",
                            format!("`{v}` is not a port or range such as 3306 or 3000-3999"),
                        );
                        None
                    }
                }
            })
            .collect(),
        port_address: match &raw.port_address {
            None => def::PORT_ADDRESS.parse().unwrap_or(std::net::IpAddr::from([0, 0, 0, 0])),
            Some(a) => a.get_ref().trim().parse().unwrap_or_else(|_| {
                cx.err(
                    a.span(),
                    "consul.port_address",
                    format!("`{}` is not an IP address such as 0.0.0.0", a.get_ref()),
                );
                std::net::IpAddr::from([0, 0, 0, 0])
            }),
        },
        cert_prefix: None,
        backend_tls: raw.backend_tls.as_ref().map(|t| {
            let r = t.get_ref();
            if let Some(n) = &r.server_name {
                cx.err(
                    n.span(),
                    "consul.backend_tls.server_name",
                    "a Consul-declared pool's certificate must name its service: there is no other name to set",
                );
            }
            if let Some(v) = r.verify.as_ref().filter(|v| !*v.get_ref()) {
                cx.err(
                    v.span(),
                    "consul.backend_tls.verify",
                    "verification of Consul-declared pools cannot be turned off: declare the pool in the file",
                );
            }
            super::pools::tls_settings(cx, "consul.backend_tls", t)
        }),
        failback_after: cx.duration_in(
            &raw.failback_after,
            "consul.failback_after",
            def::FAILBACK_AFTER,
            Duration::ZERO,
            Duration::from_secs(3600),
        ),
        watch_grace: cx.duration_in(
            &raw.watch_grace,
            "consul.watch_grace",
            def::WATCH_GRACE,
            Duration::ZERO,
            Duration::from_secs(3600),
        ),
        state_file: match raw.state_file.as_deref() {
            Some("") => None,
            Some(p) => Some(cx.path(p)),
            None => Some(cx.path("tollgate-consul-state.json")),
        },
    }
}

/// A service-name pattern: Consul's name characters, with `*` for any run of them.
fn check_service_pattern(p: &str) -> Result<(), String> {
    if p.is_empty()
        || !p
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'*'))
    {
        return Err(format!(
            "`{p}` is not a service name pattern: use letters, digits, `-`, `_`, `.` and `*`"
        ));
    }
    Ok(())
}

/// Service-name patterns given in `opt`; every bad one is an error (at `span`, or at each
/// pattern's own place when it has one).
pub(super) fn service_patterns<'a>(
    cx: &mut Ctx,
    raw: impl IntoIterator<Item = (&'a str, Range<usize>)>,
    opt: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    for (s, span) in raw {
        match check_service_pattern(s) {
            Ok(()) => out.push(s.to_string()),
            Err(m) => cx.err(span, opt, m),
        }
    }
    out
}

/// `[[consul.allow]]`: who may claim which host and path through Consul tags.
pub(super) fn claim_rules(cx: &mut Ctx, raw: &crate::config::raw::RawConsul) -> Vec<ClaimRule> {
    let mut rules = Vec::new();
    for (i, r) in raw.allow.iter().enumerate() {
        let opt = format!("consul.allow[{i}]");
        if !raw.tag_routes.unwrap_or(false) {
            cx.err(r.span(), &opt, "only applies with consul.tag_routes = true");
        }
        let a = r.get_ref();
        if a.hosts.is_empty() {
            cx.err(
                r.span(),
                format!("{opt}.hosts"),
                "name the hosts this rule lets services claim: `[\"*.apps.example.com\"]`, or `[\"*\"]` for any",
            );
        }
        let mut hosts = Vec::new();
        for h in &a.hosts {
            let name = h.get_ref().trim().to_ascii_lowercase();
            if name == "*" {
                hosts.push(name);
                continue;
            }
            match vhosts::check_host_name(&name) {
                Ok(()) => hosts.push(name),
                Err(m) => cx.err(h.span(), format!("{opt}.hosts"), m),
            }
        }
        let paths = match &a.paths {
            None => vec!["/".to_string()],
            Some(ps) => {
                let mut out = Vec::new();
                for p in ps {
                    let v = p.get_ref();
                    match vhosts::route_path_not_normal(v) {
                        None if v.starts_with('/') => out.push(v.clone()),
                        hint => cx.err(
                            p.span(),
                            format!("{opt}.paths"),
                            format!(
                                "`{v}` is not a path prefix in normal form{}",
                                hint.unwrap_or_default()
                            ),
                        ),
                    }
                }
                out
            }
        };
        if a.services.is_empty() {
            cx.err(
                r.span(),
                format!("{opt}.services"),
                "name the services this rule allows: `[\"web-*\"]`, or `[\"*\"]` for any",
            );
        }
        let services = service_patterns(
            cx,
            a.services.iter().map(|s| (s.get_ref().as_str(), s.span())),
            &format!("{opt}.services"),
        );
        rules.push(ClaimRule {
            hosts,
            paths,
            services,
            tags: a.tags.clone(),
            origin: cx.origin(r.span()),
        });
    }
    rules
}
