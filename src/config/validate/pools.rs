//! `[pool.*]`: backends or a Consul service, balancing, health, timeouts.

use super::*;
use crate::config::raw::{RawBackendTls, RawGrpcCheck};

pub(super) fn pools(
    cx: &mut Ctx,
    raw: &BTreeMap<String, Spanned<RawPool>>,
) -> BTreeMap<String, PoolSpec> {
    let mut out = BTreeMap::new();
    for (name, sp) in raw {
        let p = sp.get_ref();
        let opt = format!("pool.{name}");
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            cx.err(
                sp.span(),
                opt.clone(),
                format!("`{name}` is not a pool name: use letters, digits, - _ ."),
            );
        }
        let consul = p.consul.as_ref().map(|c| {
            let c_ref = c.get_ref();
            if c_ref.service.get_ref().trim().is_empty() {
                cx.err(
                    c_ref.service.span(),
                    format!("{opt}.consul.service"),
                    "is empty",
                );
            }
            if !p.backends.is_empty() {
                cx.err(
                    c.span(),
                    format!("{opt}.consul"),
                    "a pool takes its backends from Consul or from `backends`, not both",
                );
            }
            ServiceKey {
                service: c_ref.service.get_ref().trim().to_string(),
                tags: c_ref.tags.clone(),
                datacenter: c_ref.datacenter.clone(),
                passing: c_ref.passing.unwrap_or(true),
            }
        });
        // other datacenters, in order: names Consul accepts, each once, not the pool's own
        let mut failover: Vec<String> = Vec::new();
        if let Some(c) = &p.consul {
            let own = c.get_ref().datacenter.as_deref();
            for dc in &c.get_ref().failover {
                let name = dc.get_ref().trim();
                let ok = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                let why = if !ok {
                    Some(format!("`{name}` is not a datacenter name"))
                } else if failover.iter().any(|d| d == name) {
                    Some(format!("`{name}` is listed twice"))
                } else if own == Some(name) {
                    Some(format!("`{name}` is the pool's own datacenter"))
                } else {
                    None
                };
                match why {
                    Some(m) => cx.err(dc.span(), format!("{opt}.consul.failover"), m),
                    None => failover.push(name.to_string()),
                }
            }
        }
        let nearest = match p.consul.as_ref().and_then(|c| c.get_ref().nearest.as_ref()) {
            None => 0,
            Some(n) if !failover.is_empty() => {
                cx.err(
                    n.span(),
                    format!("{opt}.consul.nearest"),
                    "set failover (a list) or nearest (how many of the nearest), not both",
                );
                0
            }
            Some(_) => cx.int(
                &p.consul.as_ref().and_then(|c| c.get_ref().nearest.clone()),
                &format!("{opt}.consul.nearest"),
                0,
                1,
                16,
            ) as usize,
        };
        if p.backends.is_empty() && consul.is_none() {
            cx.err(
                sp.span(),
                format!("{opt}.backends"),
                "a pool needs backends = [\"127.0.0.1:8080\"] or consul = { service = \"name\" }",
            );
        }
        let mut backends = Vec::new();
        for (k, sb) in p.backends.iter().enumerate() {
            let (addr, weight) = match sb.get_ref() {
                RawBackend::Address(a) => (a.clone(), None),
                RawBackend::Full(f) => (f.address.clone(), f.weight),
            };
            let bopt = format!("{opt}.backends[{k}]");
            let weight = match weight {
                None => 1,
                Some(w) if (1..=1000).contains(&w) => w as u32,
                Some(w) => {
                    cx.err(
                        sb.span(),
                        format!("{bopt}.weight"),
                        format!("must be between 1 and 1000, got {w}"),
                    );
                    1
                }
            };
            match addr.parse::<SocketAddr>() {
                Ok(address) => {
                    if backends.iter().any(|b: &BackendSpec| b.address == address) {
                        cx.err(sb.span(), bopt, format!("{address} is listed twice in this pool"));
                    } else {
                        backends.push(BackendSpec { address, weight });
                    }
                }
                Err(_) => cx.err(
                    sb.span(),
                    bopt,
                    format!("`{addr}` is not an IP:port address (static backends are not resolved by DNS)"),
                ),
            }
        }
        let balance = cx.choice(
            &p.balance,
            &format!("{opt}.balance"),
            &[
                ("round_robin", Balance::RoundRobin),
                ("p2c", Balance::PowerOfTwo),
            ],
        );
        let ms = Duration::from_millis;
        let hour = Duration::from_secs(3600);
        let connect_timeout = cx.duration_in(
            &p.connect_timeout,
            &format!("{opt}.connect_timeout"),
            defaults::pool::CONNECT_TIMEOUT,
            ms(1),
            hour,
        );
        let read_timeout = cx.duration_in(
            &p.read_timeout,
            &format!("{opt}.read_timeout"),
            defaults::pool::READ_TIMEOUT,
            ms(1),
            hour,
        );
        let write_timeout = cx.duration_in(
            &p.write_timeout,
            &format!("{opt}.write_timeout"),
            defaults::pool::WRITE_TIMEOUT,
            ms(1),
            hour,
        );
        let idle_timeout = cx.duration_in(
            &p.idle_timeout,
            &format!("{opt}.idle_timeout"),
            defaults::pool::IDLE_TIMEOUT,
            ms(1),
            hour,
        );
        let retries = cx.int(
            &p.retries,
            &format!("{opt}.retries"),
            defaults::pool::RETRIES as i64,
            0,
            10,
        ) as u32;
        let max_fails = cx.int(
            &p.max_fails,
            &format!("{opt}.max_fails"),
            defaults::pool::MAX_FAILS as i64,
            1,
            1000,
        ) as u32;
        let eject_time = cx.duration_in(
            &p.eject_time,
            &format!("{opt}.eject_time"),
            defaults::pool::EJECT_TIME,
            ms(1),
            hour,
        );
        let eject_max_time = cx.duration_in(
            &p.eject_max_time,
            &format!("{opt}.eject_max_time"),
            defaults::pool::EJECT_MAX_TIME,
            ms(1),
            24 * hour,
        );
        let protocol = match &p.protocol {
            None => Protocol::Http1,
            Some(v) => Protocol::parse(v.get_ref().trim()).unwrap_or_else(|| {
                cx.err(
                    v.span(),
                    format!("{opt}.protocol"),
                    format!(
                        "`{}` is not a backend protocol: use http1, https, h2 or h2c",
                        v.get_ref()
                    ),
                );
                Protocol::Http1
            }),
        };
        let tls = backend_tls(cx, &opt, p, protocol);
        let max_streams = match &p.max_streams {
            Some(v) if !protocol.h2() => {
                cx.err(
                    v.span(),
                    format!("{opt}.max_streams"),
                    "streams per connection are an HTTP/2 setting: set protocol = \"h2\" or \"h2c\"",
                );
                defaults::pool::MAX_STREAMS
            }
            _ => cx.int(
                &p.max_streams,
                &format!("{opt}.max_streams"),
                defaults::pool::MAX_STREAMS as i64,
                1,
                10_000,
            ) as u32,
        };
        let max_connections = cx.int(
            &p.max_connections,
            &format!("{opt}.max_connections"),
            0,
            0,
            1_000_000,
        ) as u32;
        let check = p.health_check.as_ref().map(|hc| {
            let h = hc.get_ref();
            let copt = format!("{opt}.health_check");
            let grpc = h.grpc.as_ref().and_then(|g| match g.get_ref() {
                RawGrpcCheck::Whole(false) => None,
                RawGrpcCheck::Whole(true) => Some((String::new(), g.span())),
                RawGrpcCheck::Service(n) => Some((n.trim().to_string(), g.span())),
            });
            let tcp = h.tcp.unwrap_or(false);
            let chosen = usize::from(h.path.is_some()) + usize::from(tcp) + usize::from(grpc.is_some());
            let kind = match (&h.path, grpc) {
                _ if chosen > 1 => {
                    cx.err(
                        hc.span(),
                        &copt,
                        "set one of path (an HTTP check), tcp = true (a connect) or grpc (the gRPC health protocol)",
                    );
                    CheckKind::Tcp
                }
                (Some(p), None) => {
                    let v = p.get_ref().clone();
                    if !v.starts_with('/') || v.contains(|c: char| c.is_whitespace() || c.is_control()) {
                        cx.err(
                            p.span(),
                            format!("{copt}.path"),
                            format!("`{v}` is not a request path such as /healthz"),
                        );
                    }
                    CheckKind::Http(v)
                }
                (None, Some((name, span))) => {
                    if !protocol.h2() {
                        cx.err(
                            span.clone(),
                            format!("{copt}.grpc"),
                            "gRPC health checks need an HTTP/2 pool: set protocol = \"h2\" or \"h2c\"",
                        );
                    }
                    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b)) {
                        cx.err(
                            span,
                            format!("{copt}.grpc"),
                            format!("`{name}` is not a gRPC service name such as pkg.Service"),
                        );
                    }
                    CheckKind::Grpc(name)
                }
                _ if tcp => CheckKind::Tcp,
                _ => {
                    cx.err(
                        hc.span(),
                        format!("{copt}.path"),
                        "name the path to GET (path = \"/healthz\"), or set tcp = true or grpc = true",
                    );
                    CheckKind::Tcp
                }
            };
            let interval = cx.duration_in(
                &h.interval,
                &format!("{copt}.interval"),
                defaults::pool::CHECK_INTERVAL,
                ms(100),
                hour,
            );
            let timeout = cx.duration_in(
                &h.timeout,
                &format!("{copt}.timeout"),
                defaults::pool::CHECK_TIMEOUT.min(interval),
                ms(10),
                hour,
            );
            if timeout > interval {
                let span = h.timeout.as_ref().map(|t| t.span()).unwrap_or(hc.span());
                cx.err(
                    span,
                    format!("{copt}.timeout"),
                    format!("must not be longer than the interval ({interval:?})"),
                );
            }
            let healthy = cx.int(
                &h.healthy,
                &format!("{copt}.healthy"),
                defaults::pool::CHECK_HEALTHY,
                1,
                100,
            ) as u32;
            let unhealthy = cx.int(
                &h.unhealthy,
                &format!("{copt}.unhealthy"),
                defaults::pool::CHECK_UNHEALTHY,
                1,
                100,
            ) as u32;
            let status = match &h.status {
                None => defaults::pool::CHECK_STATUS,
                Some(s) => {
                    let v = s.get_ref();
                    let (lo, hi) = v.split_once('-').unwrap_or((v, v));
                    match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
                        (Ok(lo), Ok(hi)) if (100..=599).contains(&lo) && lo <= hi && hi <= 599 => {
                            (lo, hi)
                        }
                        _ => {
                            cx.err(
                                s.span(),
                                format!("{copt}.status"),
                                format!("`{v}` is not a status range such as 200-399"),
                            );
                            defaults::pool::CHECK_STATUS
                        }
                    }
                }
            };
            ActiveCheck {
                kind,
                interval,
                timeout,
                healthy,
                unhealthy,
                status,
            }
        });
        if eject_max_time < eject_time {
            cx.err(
                sp.span(),
                format!("{opt}.eject_max_time"),
                format!("must not be shorter than eject_time ({eject_time:?})"),
            );
        }
        out.insert(
            name.clone(),
            PoolSpec {
                backends,
                consul,
                failover,
                nearest,
                serving: None,
                check,
                protocol,
                tls,
                max_streams,
                max_connections,
                balance,
                connect_timeout,
                read_timeout,
                write_timeout,
                idle_timeout,
                retries,
                health: HealthPolicy {
                    max_fails,
                    eject_time,
                    eject_max_time,
                },
            },
        );
    }
    out
}

/// A pool's `tls`: only for TLS protocols; the client certificate and key come together.
fn backend_tls(cx: &mut Ctx, opt: &str, p: &RawPool, protocol: Protocol) -> Option<BackendTls> {
    let Some(t) = &p.tls else {
        return protocol.tls().then(|| BackendTls {
            ca: None,
            server_name: None,
            client_cert: None,
            verify: true,
            origin: cx.origin(p.protocol.as_ref().map_or(0..0, |v| v.span())),
        });
    };
    let topt = format!("{opt}.tls");
    if !protocol.tls() {
        cx.err(
            t.span(),
            &topt,
            format!(
                "protocol {} does not use TLS: set protocol = \"https\" or \"h2\"",
                protocol.name()
            ),
        );
        return None;
    }
    Some(tls_settings(cx, &topt, t))
}

/// A `tls` table (a pool's, or `consul.backend_tls`) into the model.
pub(super) fn tls_settings(cx: &mut Ctx, topt: &str, t: &Spanned<RawBackendTls>) -> BackendTls {
    let r = t.get_ref();
    let server_name = r.server_name.as_ref().map(|n| {
        let v = n.get_ref().trim().to_ascii_lowercase();
        let ok = !v.is_empty()
            && (v.parse::<std::net::IpAddr>().is_ok()
                || rustls::pki_types::ServerName::try_from(v.as_str()).is_ok());
        if !ok {
            cx.err(
                n.span(),
                format!("{topt}.server_name"),
                format!("`{}` is not a DNS name or IP address", n.get_ref()),
            );
        }
        v
    });
    let client_cert = match (&r.client_cert, &r.client_key) {
        (Some(c), Some(k)) => Some((cx.path(c.get_ref()), cx.path(k.get_ref()))),
        (None, None) => None,
        (Some(c), None) => {
            cx.err(
                c.span(),
                format!("{topt}.client_key"),
                "client_cert is set but client_key is not: set both",
            );
            None
        }
        (None, Some(k)) => {
            cx.err(
                k.span(),
                format!("{topt}.client_cert"),
                "client_key is set but client_cert is not: set both",
            );
            None
        }
    };
    BackendTls {
        ca: r.ca.as_ref().map(|c| cx.path(c.get_ref())),
        server_name,
        client_cert,
        verify: r.verify.as_ref().is_none_or(|v| *v.get_ref()),
        origin: cx.origin(t.span()),
    }
}
