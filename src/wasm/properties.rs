//! `proxy_get_property`: the attributes Envoy exposes, under the same paths. Strings are
//! raw bytes, integers 8-byte little-endian, header maps in the ABI's map encoding.

use super::abi::{int_property, serialize_map};
use super::vm::{request_pseudo_value, HostState};

pub fn get(d: &HostState, p: &[&str]) -> Option<Vec<u8>> {
    // Plugin-level properties work from any context.
    match p {
        ["plugin_name"] => return Some(d.spec.name.as_bytes().to_vec()),
        ["plugin_root_id"] => return Some(d.spec.root_id.as_bytes().to_vec()),
        ["plugin_vm_id"] => return Some(d.spec.vm_id.as_bytes().to_vec()),
        ["node", "id"] => return Some(b"tollgate".to_vec()),
        _ => {}
    }
    let s = d.stream()?;
    // (joined only when some plugin set a property: most requests have none)
    if !s.props.is_empty() {
        if let Some(v) = s.props.get(&p.join(".")) {
            return Some(v.clone());
        }
    }
    let pseudo = |name: &str| request_pseudo_value(&s.req, &s.info, name).map(<[u8]>::to_vec);
    let header = |name: &str| s.req.headers.get(name).map(|v| v.as_bytes().to_vec());
    let info = &s.info;
    Some(match p {
        ["request", "path"] => pseudo(":path")?,
        ["request", "url_path"] => s.req.uri.path().as_bytes().to_vec(),
        ["request", "query"] => s.req.uri.query().unwrap_or("").as_bytes().to_vec(),
        ["request", "host"] => pseudo(":authority")?,
        ["request", "scheme"] => pseudo(":scheme")?,
        ["request", "method"] => s.req.method.as_str().as_bytes().to_vec(),
        ["request", "id"] => info.request_id.as_bytes().to_vec(),
        ["request", "protocol"] => info.protocol.as_bytes().to_vec(),
        ["request", "referer"] => header("referer")?,
        ["request", "useragent"] => header("user-agent")?,
        ["request", "time"] => int_property(info.start_unix_ns as i64),
        ["request", "headers"] => {
            let pairs: Vec<(String, Vec<u8>)> = s
                .req
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
                .collect();
            serialize_map(&pairs)
        }
        ["request", "headers", name] => header(&name.to_ascii_lowercase())?,
        ["response", "code"] => int_property(s.resp.as_ref()?.status.as_u16() as i64),
        ["response", "headers"] => {
            let r = s.resp.as_ref()?;
            let pairs: Vec<(String, Vec<u8>)> = r
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
                .collect();
            serialize_map(&pairs)
        }
        ["source", "address"] => info.source?.to_string().into_bytes(),
        ["source", "port"] => int_property(info.source?.port() as i64),
        ["destination", "address"] => info.destination?.to_string().into_bytes(),
        ["destination", "port"] => int_property(info.destination?.port() as i64),
        ["connection", "tls_version"] => info.tls_version.clone()?.into_bytes(),
        ["connection", "requested_server_name"] => info.sni.clone()?.into_bytes(),
        ["connection", "mtls"] => vec![0],
        ["route_name"] => info.route_name.as_bytes().to_vec(),
        ["cluster_name"] | ["upstream", "cluster"] => info.pool.as_bytes().to_vec(),
        ["vhost"] => info.vhost.as_bytes().to_vec(),
        _ => return None,
    })
}
