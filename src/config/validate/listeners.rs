//! `[[listener]]`: addresses, TLS, PROXY protocol; no two listeners on one address.

use super::*;

pub(super) fn listeners(cx: &mut Ctx, raw: &RawConfig) -> Vec<Listener> {
    // a tollgate whose only ports come from Consul tags (`consul.ports`) listens on nothing
    // until Consul answers: valid (the proxymatic replacement), and `warnings` says so
    if raw.listeners.is_empty() && raw.ports.is_empty() && raw.consul.ports.is_empty() {
        cx.err(
            0..0,
            "listener",
            "no listeners: add [[listener]] with address = \"0.0.0.0:443\" and tls = true (or a [[port]], or consul.ports for ports services declare)",
        );
    }
    let mut seen: Vec<(SocketAddr, usize)> = Vec::new();
    let mut out = Vec::new();
    for (i, l) in raw.listeners.iter().enumerate() {
        let span = l.get_ref().address.span();
        let addrs = l.get_ref().address.get_ref().to_vec();
        if addrs.is_empty() {
            cx.err(span.clone(), format!("listener[{i}].address"), "is empty");
        }
        let mut addresses = Vec::new();
        for a in addrs {
            match a.parse::<SocketAddr>() {
                Ok(sa) => {
                    let line = cx.origin(span.clone()).line;
                    if let Some((other, prev)) =
                        seen.iter().find(|(b, _)| addresses_overlap(sa, *b))
                    {
                        let what = if *other == sa {
                            String::new()
                        } else {
                            format!(" (as {other}: same port, and one is a wildcard address)")
                        };
                        cx.err(
                            span.clone(),
                            format!("listener[{i}].address"),
                            format!("{sa} is already used by the listener on line {prev}{what}"),
                        );
                    }
                    seen.push((sa, line));
                    addresses.push(sa);
                }
                Err(_) => cx.err(
                    span.clone(),
                    format!("listener[{i}].address"),
                    format!("`{a}` is not an IP:port address (e.g. 0.0.0.0:443 or [::]:443)"),
                ),
            }
        }
        let tls = l.get_ref().tls;
        out.push(Listener {
            addresses,
            tls,
            http2: l.get_ref().http2.unwrap_or(true) && tls,
            proxy_protocol: l.get_ref().proxy_protocol,
        });
    }
    out
}
