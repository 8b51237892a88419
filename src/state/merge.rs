//! Merging the file's vhosts and routes with the routes Consul services declare: the file
//! wins every conflict, every claim is judged by `policy`, conflicts are reported, never
//! fatal. Pure (unit-tested in `state::tests`).

use super::{policy, RouteInfo, VhostInfo};
use crate::config::{Config, PoolSpec, PortProtocol, PortSpec, ServiceKey, SniRoute};
use crate::discovery::View;
use std::collections::BTreeMap;

/// The vhosts and pools a Snapshot serves: the file's, then the routes services declare in
/// Consul (`view.routes`), merged. The file wins every conflict; a conflict is reported in
/// `route_conflicts`, never fatal. Pure: `covers` says whether a loaded certificate covers a
/// host (for the warning about Consul-declared hosts without one).
pub(crate) struct Merged {
    pub vhosts: Vec<MergedVhost>,
    pub pool_specs: BTreeMap<String, PoolSpec>,
    pub route_conflicts: Vec<String>,
    /// The file's service ports, then those services declare (where `consul.ports` allows).
    pub ports: Vec<PortSpec>,
}

/// A vhost of the merge, with its routes.
pub(crate) struct MergedVhost {
    pub info: VhostInfo,
    pub routes: Vec<RouteInfo>,
    /// For a vhost made for a host a file vhost's wildcard covers: that file vhost (its
    /// `consul_routes` judges every claim on the host).
    pub under: Option<usize>,
}

impl std::ops::Deref for MergedVhost {
    type Target = VhostInfo;
    fn deref(&self) -> &VhostInfo {
        &self.info
    }
}

pub(crate) fn merge_routes(config: &Config, view: &View, covers: impl Fn(&str) -> bool) -> Merged {
    // Vhosts and routes: the file's first, then the routes services declare in Consul.
    // The file wins every conflict; conflicts are reported, never fatal.
    let mut vhosts: Vec<MergedVhost> = config
        .vhosts
        .iter()
        .map(|v| MergedVhost {
            info: VhostInfo {
                label: v.label().to_string(),
                names: v.names.clone(),
                default: v.default,
                redirect_https: v.redirect_https,
                source: format!("file {}", v.origin),
                plugins: v.plugins.clone(),
                answers: super::VhostAnswers::of(&v.headers).with_file(v),
            },
            under: None,
            routes: v
                .routes
                .iter()
                .map(|r| RouteInfo {
                    path: r.path.clone(),
                    pool: r.pool.clone(),
                    source: format!("file {}", r.origin),
                    max_body_size: r.max_body_size,
                    plugins: r.plugins.clone(),
                    allowed_by: None,
                    options: r.options.clone(),
                    request_headers: r.request_headers.clone(),
                    response_headers: r.response_headers.clone(),
                    respond: r.respond.clone(),
                    matches: r.matches.clone(),
                })
                .collect(),
        })
        .collect();
    let mut pool_specs: BTreeMap<String, PoolSpec> = config.pools.clone();
    let mut route_conflicts = Vec::new();
    let mut declared_ports = Vec::new();
    for dr in &view.routes {
        let source = format!(
            "consul tag `{}` of service {} at index {}",
            dr.tag, dr.service, dr.index
        );
        if let Some(why) = &dr.refused {
            route_conflicts.push(format!("{source}: not applied: {why}"));
            continue;
        }
        if dr.options.port.is_some() {
            declared_ports.push((dr, source));
            continue;
        }
        let shown_host = if dr.host.is_empty() {
            "any host"
        } else {
            dr.host.as_str()
        };
        let target = if dr.host.is_empty() {
            vhosts.iter().position(|v| v.default)
        } else {
            vhosts.iter().position(|v| v.names.contains(&dr.host))
        };
        // the file vhost that serves the claimed host: by name, as the default, or by a
        // wildcard (then the host gets a vhost of its own with that vhost's routes)
        let wildcard = || {
            config.vhosts.iter().position(|v| {
                v.names
                    .iter()
                    .any(|n| n.starts_with("*.") && policy::host_matches(n, &dr.host))
            })
        };
        let (file_vhost, wild) = match target {
            Some(i) if i < config.vhosts.len() => (Some(&config.vhosts[i]), None),
            Some(i) => (vhosts[i].under.map(|w| &config.vhosts[w]), None),
            None if dr.host.is_empty() => (None, None),
            None => match wildcard() {
                Some(w) => (Some(&config.vhosts[w]), Some(w)),
                None => (None, None),
            },
        };
        if target.is_none() && dr.host.is_empty() {
            route_conflicts.push(format!(
                "{source}: routes {shown_host}{} but there is no default vhost",
                dr.path
            ));
            continue;
        }
        let allowed_by = match policy::judge(&config.consul_allow, dr, file_vhost) {
            Ok(by) => by,
            Err(why) => {
                route_conflicts.push(format!("{source}: {shown_host}{} refused: {why}", dr.path));
                continue;
            }
        };
        let vi = match (target, wild) {
            (Some(i), _) => i,
            (None, Some(w)) => {
                // the wildcard vhost's routes and plugins keep serving this host
                let mut info = vhosts[w].info.clone();
                info.label = dr.host.clone();
                info.names = vec![dr.host.clone()];
                info.source = format!("{source} (under vhost {})", vhosts[w].label);
                let routes = vhosts[w].routes.clone();
                vhosts.push(MergedVhost {
                    info,
                    routes,
                    under: Some(w),
                });
                vhosts.len() - 1
            }
            (None, None) => {
                if config.has_tls() && !covers(&dr.host) {
                    route_conflicts.push(format!(
                        "{source}: no certificate covers {}; HTTPS clients get the default certificate",
                        dr.host
                    ));
                }
                vhosts.push(MergedVhost {
                    info: VhostInfo {
                        label: dr.host.clone(),
                        names: vec![dr.host.clone()],
                        default: false,
                        redirect_https: true,
                        source: source.clone(),
                        plugins: Vec::new(),
                        answers: Default::default(),
                    },
                    routes: Vec::new(),
                    under: None,
                });
                vhosts.len() - 1
            }
        };
        if let Some(existing) = vhosts[vi].routes.iter().find(|r| r.path == dr.path) {
            route_conflicts.push(format!(
                "{source}: {shown_host}{} is already routed by {} (kept)",
                dr.path, existing.source
            ));
            continue;
        }
        let pool = format!("consul:{}", dr.service);
        let protocol = dr.options.protocol.unwrap_or_default();
        let spec = pool_specs.entry(pool.clone()).or_insert_with(|| {
            let mut spec = PoolSpec::for_consul(ServiceKey {
                service: dr.service.clone(),
                tags: Vec::new(),
                datacenter: None,
                passing: true,
            });
            spec.set_protocol(protocol, config.consul.backend_tls.as_ref());
            spec
        });
        if spec.protocol != protocol {
            // one pool per service: its routes must agree on how to reach it
            route_conflicts.push(format!(
                "{source}: {shown_host}{} asks for protocol {} but another route of {} set {} (not applied)",
                dr.path,
                protocol.name(),
                dr.service,
                spec.protocol.name()
            ));
            continue;
        }
        vhosts[vi].routes.push(RouteInfo {
            path: dr.path.clone(),
            pool,
            source,
            max_body_size: None,
            plugins: Vec::new(),
            allowed_by: Some(allowed_by),
            options: dr.options.clone(),
            request_headers: Default::default(),
            response_headers: Default::default(),
            respond: None,
            matches: Default::default(),
        });
    }
    let ports = merge_ports(
        config,
        declared_ports,
        &mut pool_specs,
        &mut route_conflicts,
    );
    Merged {
        vhosts,
        pool_specs,
        route_conflicts,
        ports,
    }
}

/// The file's ports, then the ports services declare: only numbers `consul.ports` allows,
/// never on a socket the file uses (listener or port), one service per socket except that
/// `sni` ports gather every service's server names; every refusal is reported.
fn merge_ports(
    config: &Config,
    declared: Vec<(&crate::discovery::DiscoveredRoute, String)>,
    pool_specs: &mut BTreeMap<String, PoolSpec>,
    conflicts: &mut Vec<String>,
) -> Vec<PortSpec> {
    use crate::config::addresses_overlap;
    let mut ports = config.ports.clone();
    for (dr, source) in declared {
        let Some((proto, number)) = dr.options.port else {
            continue;
        };
        let what = match proto {
            PortProtocol::Sni => format!("{} port {number} for {}", proto.name(), dr.host),
            _ => format!("{} port {number}", proto.name()),
        };
        if !config
            .consul
            .ports
            .iter()
            .any(|(lo, hi)| (*lo..=*hi).contains(&number))
        {
            conflicts.push(format!(
                "{source}: {what} refused: consul.ports does not allow {number}"
            ));
            continue;
        }
        let address = std::net::SocketAddr::new(config.consul.port_address, number);
        let udp = proto == PortProtocol::Udp;
        let on_listener = !udp
            && config
                .listeners
                .iter()
                .flat_map(|l| &l.addresses)
                .any(|a| addresses_overlap(*a, address));
        if on_listener {
            conflicts.push(format!(
                "{source}: {what} refused: a listener of the file has {address}"
            ));
            continue;
        }
        let pool = format!("consul:{}", dr.service);
        let same = ports.iter().position(|p| {
            (p.protocol == PortProtocol::Udp) == udp && addresses_overlap(p.address, address)
        });
        match same {
            Some(i) => {
                let p = &mut ports[i];
                let routed = p.sni.iter().any(|r| r.names.contains(&dr.host));
                if proto == PortProtocol::Sni
                    && p.protocol == PortProtocol::Sni
                    && !p.source.starts_with("file")
                    && !routed
                {
                    p.sni.push(SniRoute {
                        names: vec![dr.host.clone()],
                        pool: pool.clone(),
                        send_proxy: Default::default(),
                    });
                } else {
                    conflicts.push(format!(
                        "{source}: {what} refused: {address} is taken by {} (kept)",
                        p.source
                    ));
                    continue;
                }
            }
            None => ports.push(PortSpec {
                name: format!("consul-{}-{number}", proto.name()),
                address,
                protocol: proto,
                pool: (proto != PortProtocol::Sni).then(|| pool.clone()),
                sni: match proto {
                    PortProtocol::Sni => vec![SniRoute {
                        names: vec![dr.host.clone()],
                        pool: pool.clone(),
                        send_proxy: Default::default(),
                    }],
                    _ => Vec::new(),
                },
                connect_timeout: None,
                idle_timeout: if udp {
                    crate::config::defaults::port::IDLE_TIMEOUT_UDP
                } else {
                    crate::config::defaults::port::IDLE_TIMEOUT_TCP
                },
                send_proxy: Default::default(),
                proxy_protocol: false,
                max_flows: crate::config::defaults::port::MAX_FLOWS as usize,
                max_flows_per_ip: crate::config::defaults::port::MAX_FLOWS_PER_IP as usize,
                replies_per_datagram: crate::config::defaults::port::REPLIES_PER_DATAGRAM as u32,
                source,
            }),
        }
        pool_specs.entry(pool).or_insert_with(|| {
            PoolSpec::for_consul(ServiceKey {
                service: dr.service.clone(),
                tags: Vec::new(),
                datacenter: None,
                passing: true,
            })
        });
    }
    ports
}
