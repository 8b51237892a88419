//! `[failover]` and its claims (`vip`, `aws_eip`, `exec`).

use super::*;
use crate::config::defaults::failover as def;

pub(super) fn failover(
    cx: &mut Ctx,
    sf: &Spanned<crate::config::raw::RawFailover>,
) -> Option<FailoverSettings> {
    let f = sf.get_ref();
    let addr =
        |cx: &mut Ctx, v: &Spanned<String>, opt: &str| match v.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                cx.err(
                    v.span(),
                    opt,
                    format!("`{}` is not an IP:port address", v.get_ref()),
                );
                None
            }
        };
    let listen = addr(cx, &f.listen, "failover.listen");
    let peer = addr(cx, &f.peer, "failover.peer");
    let mut reported = false;
    let secret = match (&f.secret, &f.secret_file) {
        (Some(s), None) => Some(s.get_ref().trim().as_bytes().to_vec()).filter(|s| s.len() >= 16),
        (None, Some(p)) => match crate::config::secret::read(&cx.path(p.get_ref()), 16) {
            Ok(s) => Some(s.into_bytes()),
            Err(m) => {
                cx.err(p.span(), "failover.secret_file", m);
                reported = true;
                None
            }
        },
        _ => None,
    };
    if secret.is_none() && !reported {
        cx.err(
            sf.span(),
            "failover.secret",
            "set failover.secret or failover.secret_file to a shared secret of 16 characters or more",
        );
    }
    let interval = cx.duration_in(
        &f.interval,
        "failover.interval",
        def::INTERVAL,
        Duration::from_millis(20),
        Duration::from_secs(10),
    );
    let dead_after = cx.duration_in(
        &f.dead_after,
        "failover.dead_after",
        interval * 3 + interval / 2,
        interval * 2,
        Duration::from_secs(60),
    );
    let priority = cx.int(&f.priority, "failover.priority", def::PRIORITY, 1, 255) as u8;
    let name = f.name.get_ref().trim().to_string();
    if name.is_empty() || name.len() > 64 {
        cx.err(f.name.span(), "failover.name", "must be 1 to 64 characters");
    }
    let mut claims = Vec::new();
    for (i, c) in f.claim.iter().enumerate() {
        if let Some(c) = claim(cx, c.get_ref(), &format!("failover.claim[{i}]")) {
            claims.push(c);
        }
    }
    let consul_lock = match f.consul_lock.as_ref().map(|b| *b.get_ref()) {
        Some(true) => {
            let key = f
                .consul_lock_key
                .as_ref()
                .map(|k| k.get_ref().trim().trim_matches('/').to_string())
                .unwrap_or_else(|| def::CONSUL_LOCK_KEY.into());
            if key.is_empty() || key.contains(char::is_whitespace) {
                let span = f.consul_lock_key.as_ref().map(|k| k.span()).unwrap_or(0..0);
                cx.err(
                    span,
                    "failover.consul_lock_key",
                    "must be a Consul KV key such as `tollgate/failover/leader`",
                );
            }
            let ttl = cx.duration_in(
                &f.consul_lock_ttl,
                "failover.consul_lock_ttl",
                def::CONSUL_LOCK_TTL,
                Duration::from_secs(10),
                Duration::from_secs(3600),
            );
            Some(ConsulLock { key, ttl })
        }
        _ => {
            for (v, opt) in [
                (&f.consul_lock_key, "failover.consul_lock_key"),
                (&f.consul_lock_ttl, "failover.consul_lock_ttl"),
            ] {
                if let Some(v) = v {
                    cx.err(
                        v.span(),
                        opt,
                        "only applies with failover.consul_lock = true",
                    );
                }
            }
            None
        }
    };
    Some(FailoverSettings {
        name,
        priority,
        listen: listen?,
        peer: peer?,
        secret: secret?,
        interval,
        dead_after,
        preempt: f.preempt.unwrap_or(false),
        claims,
        consul_lock,
    })
}

/// One `[[failover.claim]]`: its type's options are required, other types' options refused.
pub(super) fn claim(cx: &mut Ctx, c: &crate::config::raw::RawClaim, opt: &str) -> Option<Claim> {
    let kind = c.kind.get_ref().as_str();
    let timeout_default = match kind {
        "vip" => def::VIP_TIMEOUT,
        _ => def::CLAIM_TIMEOUT,
    };
    let timeout = cx.duration_in(
        &c.timeout,
        &format!("{opt}.timeout"),
        timeout_default,
        Duration::from_millis(10),
        Duration::from_secs(120),
    );
    let retries = cx.int(
        &c.retries,
        &format!("{opt}.retries"),
        def::CLAIM_RETRIES,
        0,
        10,
    ) as u32;
    let strings = [
        ("address", &c.address, &["vip"][..]),
        ("interface", &c.interface, &["vip"]),
        ("garp_repeat", &c.garp_repeat, &["vip"]),
        ("allocation_id", &c.allocation_id, &["aws_eip"]),
        ("instance_id", &c.instance_id, &["aws_eip"]),
        (
            "network_interface_id",
            &c.network_interface_id,
            &["aws_eip"],
        ),
        ("region", &c.region, &["aws_eip"]),
        ("endpoint", &c.endpoint, &["aws_eip"]),
        ("imds_endpoint", &c.imds_endpoint, &["aws_eip"]),
    ];
    for (name, v, types) in strings {
        if let Some(v) = v {
            if !types.contains(&kind) {
                cx.err(
                    v.span(),
                    format!("{opt}.{name}"),
                    format!("does not apply to type = \"{kind}\""),
                );
            }
        }
    }
    if let Some(v) = &c.garp_count {
        if kind != "vip" {
            cx.err(
                v.span(),
                format!("{opt}.garp_count"),
                format!("does not apply to type = \"{kind}\""),
            );
        }
    }
    if !c.command.is_empty() && kind != "exec" {
        cx.err(
            c.kind.span(),
            format!("{opt}.command"),
            format!("does not apply to type = \"{kind}\""),
        );
    }
    let required =
        |cx: &mut Ctx, v: &Option<Spanned<String>>, name: &str, hint: &str| -> Option<String> {
            match v.as_ref().map(|v| v.get_ref().trim().to_string()) {
                Some(s) if !s.is_empty() => Some(s),
                _ => {
                    cx.err(c.kind.span(), format!("{opt}.{name}"), hint.to_string());
                    None
                }
            }
        };
    let action = match kind {
        "exec" => {
            if c.command.is_empty() {
                cx.err(
                    c.kind.span(),
                    format!("{opt}.command"),
                    "an exec claim needs command = [\"/path/to/hook\"]",
                );
                return None;
            }
            Some(ClaimAction::Exec {
                command: c.command.clone(),
            })
        }
        "vip" => {
            let addr = required(cx, &c.address, "address", "a vip claim needs address = \"203.0.113.10/24\" (the floating address and its prefix)")?;
            let interface = required(
                cx,
                &c.interface,
                "interface",
                "a vip claim needs interface = \"eth0\"",
            )?;
            let (ip, prefix) = match addr.split_once('/') {
                Some((ip, p)) => (ip, p.parse::<u8>().ok()),
                None => (addr.as_str(), None),
            };
            let ip = ip.parse::<std::net::IpAddr>().ok();
            let span = c.address.as_ref().map(|a| a.span()).unwrap_or(0..0);
            let (ip, prefix) = match (ip, prefix) {
                (Some(ip), Some(p)) if p <= if ip.is_ipv4() { 32 } else { 128 } => (ip, p),
                _ => {
                    cx.err(span, format!("{opt}.address"), format!("`{addr}` is not ADDRESS/PREFIX, such as 203.0.113.10/24 or 2001:db8::10/64"));
                    return None;
                }
            };
            if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
                cx.err(
                    span,
                    format!("{opt}.address"),
                    format!("{ip} cannot float between hosts"),
                );
            }
            if interface.len() > 15 || interface.contains('/') {
                let span = c.interface.as_ref().map(|a| a.span()).unwrap_or(0..0);
                cx.err(
                    span,
                    format!("{opt}.interface"),
                    "an interface name is at most 15 characters, without `/`",
                );
            }
            Some(ClaimAction::Vip(Vip {
                address: ip,
                prefix,
                interface,
                garp_count: cx.int(
                    &c.garp_count,
                    &format!("{opt}.garp_count"),
                    def::GARP_COUNT,
                    1,
                    100,
                ) as u32,
                garp_repeat: cx.duration_in(
                    &c.garp_repeat,
                    &format!("{opt}.garp_repeat"),
                    def::GARP_REPEAT,
                    Duration::ZERO,
                    Duration::from_secs(60),
                ),
            }))
        }
        "aws_eip" => {
            let allocation_id = required(
                cx,
                &c.allocation_id,
                "allocation_id",
                "an aws_eip claim needs allocation_id = \"eipalloc-…\"",
            )?;
            let region = c
                .region
                .as_ref()
                .map(|r| r.get_ref().trim().to_string())
                .or_else(|| env("AWS_REGION"))
                .or_else(|| env("AWS_DEFAULT_REGION"));
            let Some(region) = region.filter(|r| !r.is_empty()) else {
                cx.err(
                    c.kind.span(),
                    format!("{opt}.region"),
                    "set region (or AWS_REGION / AWS_DEFAULT_REGION)",
                );
                return None;
            };
            let url = |cx: &mut Ctx,
                       v: &Option<Spanned<String>>,
                       name: &str,
                       default: String|
             -> String {
                match v {
                    None => default,
                    Some(v) => {
                        let s = v.get_ref().trim().trim_end_matches('/').to_string();
                        if !(s.starts_with("http://") || s.starts_with("https://")) {
                            cx.err(
                                v.span(),
                                format!("{opt}.{name}"),
                                format!("`{s}` is not an http:// or https:// URL"),
                            );
                        }
                        s
                    }
                }
            };
            let endpoint = url(
                cx,
                &c.endpoint,
                "endpoint",
                format!("https://ec2.{region}.amazonaws.com"),
            );
            let imds_endpoint = url(
                cx,
                &c.imds_endpoint,
                "imds_endpoint",
                "http://169.254.169.254".into(),
            );
            let trimmed = |v: &Option<Spanned<String>>| {
                v.as_ref()
                    .map(|v| v.get_ref().trim().to_string())
                    .filter(|v| !v.is_empty())
            };
            Some(ClaimAction::AwsEip(AwsEip {
                allocation_id,
                instance_id: trimmed(&c.instance_id),
                network_interface_id: trimmed(&c.network_interface_id),
                region,
                endpoint,
                imds_endpoint,
            }))
        }
        other => {
            cx.err(
                c.kind.span(),
                format!("{opt}.type"),
                format!("`{other}` is not one of: exec, vip, aws_eip"),
            );
            None
        }
    }?;
    Some(Claim {
        action,
        timeout,
        retries,
    })
}
