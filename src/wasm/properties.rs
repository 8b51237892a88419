//! `proxy_get_property`: the attributes Envoy exposes, under the same paths. Strings are
//! raw bytes, integers 8-byte little-endian, header maps in the ABI's map encoding.

use super::abi::{lower, serialize_map};
use super::vm::{request_pseudo_value, HostState};
use std::net::SocketAddr;

/// Write the property at path `p` into `out` (empty on entry); false: there is none.
pub fn get(d: &HostState, p: &[&str], out: &mut Vec<u8>) -> bool {
    let mut put = |v: &[u8]| {
        out.extend_from_slice(v);
        true
    };
    // Plugin-level properties work from any context.
    match p {
        ["plugin_name"] => return put(d.spec.name.as_bytes()),
        ["plugin_root_id"] => return put(d.spec.root_id.as_bytes()),
        ["plugin_vm_id"] => return put(d.spec.vm_id.as_bytes()),
        ["node", "id"] => return put(b"tollgate"),
        _ => {}
    }
    let Some(s) = d.stream() else {
        return false;
    };
    // (joined only when some plugin set a property: most requests have none)
    if !s.props.is_empty() {
        if let Some(v) = s.props.get(&p.join(".")) {
            return put(v);
        }
    }
    let header = |name: &str| s.req.headers.get(name).map(|v| v.as_bytes());
    let int = |v: i64| v.to_le_bytes();
    let info = &s.info;
    let v: Option<&[u8]> = match p {
        ["request", "path"] => request_pseudo_value(&s.req, info, ":path"),
        ["request", "url_path"] => Some(s.req.uri.path().as_bytes()),
        ["request", "query"] => Some(s.req.uri.query().unwrap_or("").as_bytes()),
        ["request", "host"] => request_pseudo_value(&s.req, info, ":authority"),
        ["request", "scheme"] => request_pseudo_value(&s.req, info, ":scheme"),
        ["request", "method"] => Some(s.req.method.as_str().as_bytes()),
        ["request", "id"] => Some(info.request_id.as_bytes()),
        ["request", "protocol"] => Some(info.protocol.as_bytes()),
        ["request", "referer"] => header("referer"),
        ["request", "useragent"] => header("user-agent"),
        ["request", "time"] => return put(&int(info.start_unix_ns as i64)),
        ["request", "headers"] => return put(&serialized(&s.req.headers)),
        ["request", "headers", name] => header(&lower(name)),
        ["response", "code"] => match s.resp.as_ref() {
            Some(r) => return put(&int(r.status.as_u16() as i64)),
            None => None,
        },
        ["response", "headers"] => match s.resp.as_ref() {
            Some(r) => return put(&serialized(&r.headers)),
            None => None,
        },
        [side @ ("source" | "destination"), what @ ("address" | "port")] => {
            let addr = if *side == "source" {
                info.source
            } else {
                info.destination
            };
            match (addr, *what) {
                (Some(a), "address") => {
                    write_addr(out, &a);
                    return true;
                }
                (Some(a), _) => return put(&int(a.port() as i64)),
                (None, _) => None,
            }
        }
        ["connection", "tls_version"] => info.tls_version.as_deref().map(str::as_bytes),
        ["connection", "requested_server_name"] if info.sni.is_empty() => None,
        ["connection", "requested_server_name"] => Some(info.sni.as_bytes()),
        ["connection", "mtls"] => Some(&[0]),
        ["route_name"] => Some(info.route.route_name.as_bytes()),
        ["cluster_name"] | ["upstream", "cluster"] => Some(info.route.pool.as_bytes()),
        ["vhost"] => Some(info.route.vhost.as_bytes()),
        _ => None,
    };
    v.is_some_and(put)
}

/// A header map in the ABI's map encoding (the `request.headers` / `response.headers`
/// properties: values as sent).
fn serialized(h: &http::HeaderMap) -> Vec<u8> {
    let pairs: Vec<(&str, &[u8])> = h.iter().map(|(k, v)| (k.as_str(), v.as_bytes())).collect();
    serialize_map(&pairs)
}

/// `ip:port` (`[ip]:port` for IPv6), as `SocketAddr`'s `Display` writes it; IPv4 without
/// the formatting machinery (every rate-limited request reads its client's address).
pub fn write_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    fn num(out: &mut Vec<u8>, mut n: u32) {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(&digits[i..]);
    }
    match a {
        SocketAddr::V4(v4) => {
            for (i, o) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                num(out, o as u32);
            }
            out.push(b':');
            num(out, v4.port() as u32);
        }
        SocketAddr::V6(_) => {
            use std::io::Write;
            let _ = write!(out, "{a}");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for a in [
            "0.0.0.0:0",
            "192.0.2.7:51234",
            "255.255.255.255:65535",
            "10.0.0.1:80",
            "[2001:db8::1]:443",
            "[::ffff:192.0.2.1]:8080",
        ] {
            let a: std::net::SocketAddr = a.parse().unwrap();
            let mut out = b"x".to_vec();
            super::write_addr(&mut out, &a);
            assert_eq!(out, format!("x{a}").into_bytes());
        }
    }
}
