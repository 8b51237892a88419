//! `[[port]]`: service ports (TCP, UDP, TLS-terminated TCP, TLS passthrough by SNI).

use super::*;
use crate::config::raw::RawPort;

pub(super) fn ports(
    cx: &mut Ctx,
    raw: &[Spanned<RawPort>],
    pools: &BTreeMap<String, PoolSpec>,
    listeners: &[Listener],
) -> Vec<PortSpec> {
    let mut out: Vec<PortSpec> = Vec::new();
    for (i, sp) in raw.iter().enumerate() {
        let p = sp.get_ref();
        let opt = format!("port[{i}]");
        let address = match p.address.get_ref().parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                cx.err(
                    p.address.span(),
                    format!("{opt}.address"),
                    format!(
                        "`{}` is not an IP:port address such as 0.0.0.0:3306",
                        p.address.get_ref()
                    ),
                );
                continue;
            }
        };
        let protocol = match &p.protocol {
            None => PortProtocol::Tcp,
            Some(v) => match PortProtocol::NAMES
                .iter()
                .find(|(n, _)| *n == v.get_ref().trim())
            {
                Some((_, p)) => *p,
                None => {
                    cx.err(
                        v.span(),
                        format!("{opt}.protocol"),
                        format!(
                            "`{}` is not a port protocol: use tcp, udp, tls or sni",
                            v.get_ref()
                        ),
                    );
                    PortProtocol::Tcp
                }
            },
        };
        let name = match &p.name {
            Some(n) => {
                let v = n.get_ref().trim().to_string();
                if v.is_empty()
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    cx.err(
                        n.span(),
                        format!("{opt}.name"),
                        format!("`{v}` is not a name: use letters, digits, - _ ."),
                    );
                }
                v
            }
            None => format!("{}-{}", protocol.name(), address.port()),
        };
        if out.iter().any(|o| o.name == name) {
            cx.err(
                sp.span(),
                format!("{opt}.name"),
                format!("`{name}` names another port too: give each a name"),
            );
        }
        // one socket per address and transport: TCP kinds share the TCP namespace
        let udp = protocol == PortProtocol::Udp;
        let clash = out.iter().any(|o| {
            (o.protocol == PortProtocol::Udp) == udp && addresses_overlap(o.address, address)
        });
        let listener_clash = !udp
            && listeners
                .iter()
                .flat_map(|l| l.addresses.iter())
                .any(|a| addresses_overlap(*a, address));
        if clash || listener_clash {
            cx.err(
                p.address.span(),
                format!("{opt}.address"),
                format!("{address} is already taken by another port or listener"),
            );
        }
        let pool_of = |cx: &mut Ctx, v: &Spanned<String>, what: String| {
            let name = v.get_ref().trim().to_string();
            if !pools.contains_key(&name) {
                cx.err(v.span(), what, format!("no pool named `{name}`"));
            }
            name
        };
        let pool = p
            .pool
            .as_ref()
            .map(|v| pool_of(cx, v, format!("{opt}.pool")));
        let mut sni = Vec::new();
        for (k, r) in p.sni.iter().enumerate() {
            let ropt = format!("{opt}.sni[{k}]");
            let rr = r.get_ref();
            let mut names = Vec::new();
            for n in &rr.names {
                let v = n
                    .get_ref()
                    .trim()
                    .trim_end_matches('.')
                    .to_ascii_lowercase();
                let bare = v.strip_prefix("*.").unwrap_or(&v);
                if let Err(e) = check_host_name(bare) {
                    cx.err(n.span(), format!("{ropt}.names"), e);
                } else if sni.iter().any(|r: &SniRoute| r.names.contains(&v)) || names.contains(&v)
                {
                    cx.err(
                        n.span(),
                        format!("{ropt}.names"),
                        format!("`{v}` is routed twice"),
                    );
                } else {
                    names.push(v);
                }
            }
            if rr.names.is_empty() {
                cx.err(
                    r.span(),
                    format!("{ropt}.names"),
                    "name the SNI names this route takes",
                );
            }
            let pool = pool_of(cx, &rr.pool, format!("{ropt}.pool"));
            let send_proxy = cx.choice(&rr.send_proxy, &format!("{ropt}.send_proxy"), SEND_PROXY);
            sni.push(SniRoute {
                names,
                pool,
                send_proxy,
            });
        }
        match protocol {
            PortProtocol::Sni if sni.is_empty() && pool.is_none() => cx.err(
                sp.span(),
                format!("{opt}.sni"),
                "a passthrough port needs [[port.sni]] routes (names = [...], pool = ...) or a pool for every name",
            ),
            PortProtocol::Sni => {}
            _ if !p.sni.is_empty() => cx.err(
                p.sni[0].span(),
                format!("{opt}.sni"),
                "SNI routes are for protocol = \"sni\" (TLS passthrough)",
            ),
            _ if pool.is_none() => cx.err(
                sp.span(),
                format!("{opt}.pool"),
                "name the pool the port forwards to: pool = \"name\"",
            ),
            _ => {}
        }
        for n in pool.iter().chain(sni.iter().map(|r| &r.pool)) {
            if let Some(proto) = pools.get(n).map(|p| p.protocol) {
                if proto != Protocol::Http1 {
                    cx.err(
                        sp.span(),
                        format!("{opt}.pool"),
                        format!("pool `{n}` speaks {}: a port forwards bytes, give it a pool without protocol", proto.name()),
                    );
                }
            }
        }
        let hour = Duration::from_secs(3600);
        let idle_timeout = cx.duration_in(
            &p.idle_timeout,
            &format!("{opt}.idle_timeout"),
            if udp {
                defaults::port::IDLE_TIMEOUT_UDP
            } else {
                defaults::port::IDLE_TIMEOUT_TCP
            },
            Duration::from_secs(1),
            24 * hour,
        );
        let connect_timeout = p.connect_timeout.as_ref().map(|_| {
            cx.duration_in(
                &p.connect_timeout,
                &format!("{opt}.connect_timeout"),
                defaults::pool::CONNECT_TIMEOUT,
                Duration::from_millis(1),
                hour,
            )
        });
        let send_proxy = cx.choice(&p.send_proxy, &format!("{opt}.send_proxy"), SEND_PROXY);
        if udp && send_proxy != SendProxy::None {
            cx.err(
                p.send_proxy.as_ref().map_or(0..0, |s| s.span()),
                format!("{opt}.send_proxy"),
                "PROXY protocol headers are for TCP ports",
            );
        }
        if udp && p.proxy_protocol == Some(true) {
            cx.err(
                sp.span(),
                format!("{opt}.proxy_protocol"),
                "PROXY protocol headers are for TCP ports",
            );
        }
        let max_flows = cx.int(
            &p.max_flows,
            &format!("{opt}.max_flows"),
            defaults::port::MAX_FLOWS,
            1,
            10_000_000,
        ) as usize;
        let max_flows_per_ip = cx.int(
            &p.max_flows_per_ip,
            &format!("{opt}.max_flows_per_ip"),
            defaults::port::MAX_FLOWS_PER_IP,
            1,
            10_000_000,
        ) as usize;
        let replies_per_datagram = cx.int(
            &p.replies_per_datagram,
            &format!("{opt}.replies_per_datagram"),
            defaults::port::REPLIES_PER_DATAGRAM,
            0,
            1_000_000,
        ) as u32;
        if !udp {
            let given = [
                ("max_flows", p.max_flows.as_ref().map(|s| s.span())),
                (
                    "max_flows_per_ip",
                    p.max_flows_per_ip.as_ref().map(|s| s.span()),
                ),
                (
                    "replies_per_datagram",
                    p.replies_per_datagram.as_ref().map(|s| s.span()),
                ),
            ];
            for (o, span) in given {
                if let Some(span) = span {
                    cx.err(span, format!("{opt}.{o}"), "this option is for UDP ports");
                }
            }
        }
        out.push(PortSpec {
            name,
            address,
            protocol,
            pool,
            sni,
            connect_timeout,
            idle_timeout,
            send_proxy,
            proxy_protocol: p.proxy_protocol.unwrap_or(false),
            max_flows,
            max_flows_per_ip,
            replies_per_datagram,
            source: format!("file {}", cx.origin(sp.span())),
        });
    }
    out
}

/// The values `send_proxy` takes (a port's and an SNI route's).
const SEND_PROXY: &[(&str, SendProxy)] = &[
    ("none", SendProxy::None),
    ("v1", SendProxy::V1),
    ("v2", SendProxy::V2),
];
