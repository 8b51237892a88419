//! The description of a connection to one backend (pingora's `HttpPeer`): address, timeouts,
//! and for TLS and HTTP/2 pools the protocol, SNI, CA, client certificate and stream cap.
//! Requests and health probes connect with the same description, so a probe tests what
//! traffic will use. Opens nothing itself.

use super::Pool;
use crate::config::Protocol;
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;

/// How to reach backend `i` of `pool`.
pub fn http_peer(pool: &Pool, i: usize) -> HttpPeer {
    let b = &pool.backends[i];
    let s = &pool.spec;
    let mut peer = match (&s.tls, &pool.tls) {
        (Some(t), Some(m)) => {
            // SNI and the name verified: as configured, else the Consul service's name,
            // else the backend's address (an IP SAN)
            let name = match (&t.server_name, &s.consul) {
                (Some(n), _) => n.clone(),
                (None, Some(k)) => k.service.to_ascii_lowercase(),
                (None, None) => b.address.ip().to_string(),
            };
            let mut peer = HttpPeer::new(b.address, true, name);
            peer.options.ca = m.ca.clone();
            peer.client_cert_key = m.client.clone();
            peer.options.verify_cert = t.verify;
            peer.options.verify_hostname = t.verify;
            peer.group_key = m.group;
            peer
        }
        _ => HttpPeer::new(b.address, false, String::new()),
    };
    match s.protocol {
        Protocol::Http1 => {}
        Protocol::Https => peer.options.alpn = ALPN::H1,
        Protocol::H2 | Protocol::H2c => {
            peer.options.alpn = ALPN::H2;
            peer.options.max_h2_streams = s.max_streams as usize;
            // an h2c pool never shares a connection with an HTTP/1 pool on the same address
            peer.group_key ^= 0x6832_6332;
        }
    }
    peer.options.connection_timeout = Some(s.connect_timeout);
    peer.options.total_connection_timeout = Some(s.connect_timeout);
    peer.options.read_timeout = Some(s.read_timeout);
    peer.options.write_timeout = Some(s.write_timeout);
    peer.options.idle_timeout = Some(s.idle_timeout);
    peer
}
