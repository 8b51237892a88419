//! Every default of the configuration, by section, in one place: what an option is when
//! the file leaves it out. `validate` applies them; `PoolSpec::for_consul` builds the pools
//! Consul-declared routes get from them; docs/configuration.md states them.

use std::time::Duration;

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

const fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// `[server]` (threads default to the number of cores; `https_redirect_port` to the first
/// TLS listener's port, else 443).
pub mod server {
    use super::*;
    pub const SHUTDOWN_TIMEOUT: Duration = secs(30);
    pub const WATCH_INTERVAL: Duration = secs(1);
    /// Idle upstream connections kept per worker. It must cover the requests in flight: a
    /// connection released when the pool is full is closed, and the next request pays a new
    /// connect (at 128, HTTP/2 load with 256 streams in flight opened a connection for one
    /// request in three; benches/compare.py counts them). Idle connections cost a socket each.
    pub const UPSTREAM_KEEPALIVE_POOL_SIZE: i64 = 1024;
    pub const HTTPS_REDIRECT_PORT: i64 = 443;
}

/// `[admin]`.
pub mod admin {
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
    pub const ADDRESS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9901));
}

/// `[limits]`.
pub mod limits {
    use super::*;
    pub const MAX_CONNECTIONS: i64 = 10_000;
    pub const MAX_CONNECTIONS_PER_IP: i64 = 256;
    pub const CONNECTION_RATE_PER_IP: f64 = 100.0;
    pub const CONNECTION_BURST_PER_IP: i64 = 200;
    pub const HANDSHAKE_TIMEOUT: Duration = secs(10);
    pub const HEADER_TIMEOUT: Duration = secs(10);
    pub const BODY_IDLE_TIMEOUT: Duration = secs(30);
    pub const KEEPALIVE_TIMEOUT: Duration = secs(60);
    pub const SEND_TIMEOUT: Duration = secs(60);
    /// Bytes a second; 0: no minimum.
    pub const MIN_BODY_RATE: i64 = 0;
    pub const MIN_BODY_RATE_AFTER: Duration = secs(10);
    pub const MAX_REQUEST_LINE: i64 = 8192;
    pub const MAX_HEADER_BYTES: i64 = 32 * 1024;
    pub const MAX_HEADERS: i64 = 100;
    pub const MAX_BODY_SIZE: u64 = 10 << 20;
    pub const H2_MAX_CONCURRENT_STREAMS: i64 = 100;
    pub const H2_MAX_HEADER_LIST_SIZE: i64 = 32 * 1024;
    pub const H2_MAX_PENDING_RESETS: i64 = 20;
    pub const H2_MAX_ERROR_RESETS: i64 = 100;
}

/// `[pool.NAME]`, and the pools created for Consul-declared routes.
pub mod pool {
    use super::*;
    pub const CONNECT_TIMEOUT: Duration = secs(3);
    pub const READ_TIMEOUT: Duration = secs(60);
    pub const WRITE_TIMEOUT: Duration = secs(60);
    pub const IDLE_TIMEOUT: Duration = secs(60);
    pub const RETRIES: u32 = 2;
    pub const MAX_FAILS: u32 = 3;
    pub const EJECT_TIME: Duration = secs(10);
    pub const EJECT_MAX_TIME: Duration = secs(300);
    pub const CHECK_INTERVAL: Duration = secs(5);
    pub const CHECK_TIMEOUT: Duration = secs(2);
    pub const CHECK_HEALTHY: i64 = 2;
    pub const CHECK_UNHEALTHY: i64 = 3;
    pub const CHECK_STATUS: (u16, u16) = (200, 399);
    /// HTTP/2 streams per upstream connection.
    pub const MAX_STREAMS: u32 = 100;
}

/// `[[port]]`.
pub mod port {
    use super::*;
    /// TCP (and TLS, SNI) connections: nginx stream's `proxy_timeout` default.
    pub const IDLE_TIMEOUT_TCP: Duration = secs(600);
    /// UDP flows.
    pub const IDLE_TIMEOUT_UDP: Duration = secs(30);
    pub const MAX_FLOWS: i64 = 10_000;
    /// UDP flows one client address may hold (as `limits.max_connections_per_ip` for TCP).
    pub const MAX_FLOWS_PER_IP: i64 = 256;
    /// UDP: the replies a backend may send after each client datagram (0: no limit).
    pub const REPLIES_PER_DATAGRAM: i64 = 10;
}

/// `[plugin.NAME]`.
pub mod plugin {
    use super::*;
    pub const CPU_DEADLINE: Duration = ms(50);
    pub const MAX_MEMORY: u64 = 64 << 20;
}

/// `[consul]`.
pub mod consul {
    use super::*;
    /// When neither the file nor `CONSUL_HTTP_ADDR` says.
    pub const ADDRESS: &str = "127.0.0.1:8500";
    pub const WAIT: Duration = secs(300);
    pub const QUIESCENCE_MIN: Duration = ms(2);
    pub const QUIESCENCE_MAX: Duration = ms(150);
    pub const MAX_BLOCKING: i64 = 128;
    pub const ROUTE_TAG_PREFIX: &str = "tollgate.route=";
    pub const ROUTE_META_PREFIX: &str = "tollgate-route";
    /// 0: the shrink guard is off.
    pub const MIN_FRACTION: f64 = 0.0;
    pub const WATCH_GRACE: Duration = secs(30);
    pub const FAILBACK_AFTER: Duration = secs(30);
    /// Service-port tags: `tollgate.port=tcp/3306`; and meta keys `tollgate-port`, `-2`, ….
    pub const PORT_TAG_PREFIX: &str = "tollgate.port=";
    pub const PORT_META_PREFIX: &str = "tollgate-port";
    pub const PORT_ADDRESS: &str = "0.0.0.0";
}

/// `[failover]` and its claims (`dead_after` defaults to 3.5 intervals).
pub mod failover {
    use super::*;
    pub const INTERVAL: Duration = ms(200);
    pub const PRIORITY: i64 = 100;
    pub const CONSUL_LOCK_KEY: &str = "tollgate/failover/leader";
    pub const CONSUL_LOCK_TTL: Duration = secs(10);
    pub const VIP_TIMEOUT: Duration = secs(2);
    /// Claims other than `vip` (AWS calls, hooks).
    pub const CLAIM_TIMEOUT: Duration = secs(5);
    pub const CLAIM_RETRIES: i64 = 2;
    pub const GARP_COUNT: i64 = 3;
    pub const GARP_REPEAT: Duration = secs(2);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default column of `option`'s row in the table under `## `[section]`` of
    /// docs/configuration.md, without backticks and quotes.
    fn documented(doc: &str, section: &str, option: &str) -> String {
        let head = format!("## `[{section}]`");
        let start = doc
            .find(&head)
            .unwrap_or_else(|| panic!("no {head} in docs"));
        let body = &doc[start + head.len()..];
        let body = &body[..body.find("\n## ").unwrap_or(body.len())];
        let row = format!("| `{option}` |");
        let line = body
            .lines()
            .find(|l| l.starts_with(&row))
            .unwrap_or_else(|| panic!("no row for {option} under {head}"));
        line[row.len()..]
            .split('|')
            .next()
            .unwrap()
            .trim()
            .replace(['`', '"'], "")
    }

    fn dur(d: Duration) -> String {
        let ms = d.as_millis();
        match ms {
            _ if ms.is_multiple_of(60_000) && ms > 60_000 => format!("{}m", ms / 60_000),
            _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
            _ => format!("{ms}ms"),
        }
    }

    fn size(b: u64) -> String {
        match b {
            _ if b.is_multiple_of(1 << 20) => format!("{}m", b >> 20),
            _ if b.is_multiple_of(1 << 10) => format!("{}k", b >> 10),
            _ => b.to_string(),
        }
    }

    #[test]
    fn the_configuration_reference_states_these_defaults() {
        let doc = include_str!("../../docs/configuration.md");
        let rows: Vec<(&str, &str, String)> = vec![
            ("server", "shutdown_timeout", dur(server::SHUTDOWN_TIMEOUT)),
            ("server", "watch_interval", dur(server::WATCH_INTERVAL)),
            (
                "server",
                "upstream_keepalive_pool_size",
                server::UPSTREAM_KEEPALIVE_POOL_SIZE.to_string(),
            ),
            ("admin", "address", admin::ADDRESS.to_string()),
            ("consul", "wait", dur(consul::WAIT)),
            ("consul", "quiescence_min", dur(consul::QUIESCENCE_MIN)),
            ("consul", "quiescence_max", dur(consul::QUIESCENCE_MAX)),
            ("consul", "max_blocking", consul::MAX_BLOCKING.to_string()),
            (
                "consul",
                "route_tag_prefix",
                consul::ROUTE_TAG_PREFIX.into(),
            ),
            (
                "consul",
                "route_meta_prefix",
                consul::ROUTE_META_PREFIX.into(),
            ),
            ("consul", "min_fraction", consul::MIN_FRACTION.to_string()),
            ("consul", "watch_grace", dur(consul::WATCH_GRACE)),
            ("consul", "failback_after", dur(consul::FAILBACK_AFTER)),
            ("failover", "priority", failover::PRIORITY.to_string()),
            ("failover", "interval", dur(failover::INTERVAL)),
            (
                "failover",
                "consul_lock_key",
                failover::CONSUL_LOCK_KEY.into(),
            ),
            (
                "failover",
                "consul_lock_ttl",
                dur(failover::CONSUL_LOCK_TTL),
            ),
            (
                "limits",
                "max_connections",
                limits::MAX_CONNECTIONS.to_string(),
            ),
            (
                "limits",
                "max_connections_per_ip",
                limits::MAX_CONNECTIONS_PER_IP.to_string(),
            ),
            (
                "limits",
                "connection_rate_per_ip",
                limits::CONNECTION_RATE_PER_IP.to_string(),
            ),
            (
                "limits",
                "connection_burst_per_ip",
                limits::CONNECTION_BURST_PER_IP.to_string(),
            ),
            (
                "limits",
                "handshake_timeout",
                dur(limits::HANDSHAKE_TIMEOUT),
            ),
            ("limits", "header_timeout", dur(limits::HEADER_TIMEOUT)),
            (
                "limits",
                "body_idle_timeout",
                dur(limits::BODY_IDLE_TIMEOUT),
            ),
            (
                "limits",
                "keepalive_timeout",
                dur(limits::KEEPALIVE_TIMEOUT),
            ),
            ("limits", "send_timeout", dur(limits::SEND_TIMEOUT)),
            (
                "limits",
                "min_body_rate",
                format!("{} (off)", limits::MIN_BODY_RATE),
            ),
            (
                "limits",
                "min_body_rate_after",
                dur(limits::MIN_BODY_RATE_AFTER),
            ),
            (
                "limits",
                "max_request_line",
                limits::MAX_REQUEST_LINE.to_string(),
            ),
            (
                "limits",
                "max_header_bytes",
                limits::MAX_HEADER_BYTES.to_string(),
            ),
            ("limits", "max_headers", limits::MAX_HEADERS.to_string()),
            ("limits", "max_body_size", size(limits::MAX_BODY_SIZE)),
            (
                "limits",
                "h2_max_concurrent_streams",
                limits::H2_MAX_CONCURRENT_STREAMS.to_string(),
            ),
            (
                "limits",
                "h2_max_header_list_size",
                limits::H2_MAX_HEADER_LIST_SIZE.to_string(),
            ),
            (
                "limits",
                "h2_max_pending_resets",
                limits::H2_MAX_PENDING_RESETS.to_string(),
            ),
            (
                "limits",
                "h2_max_error_resets",
                limits::H2_MAX_ERROR_RESETS.to_string(),
            ),
            ("pool.NAME", "connect_timeout", dur(pool::CONNECT_TIMEOUT)),
            ("pool.NAME", "read_timeout", dur(pool::READ_TIMEOUT)),
            ("pool.NAME", "write_timeout", dur(pool::WRITE_TIMEOUT)),
            ("pool.NAME", "idle_timeout", dur(pool::IDLE_TIMEOUT)),
            ("pool.NAME", "retries", pool::RETRIES.to_string()),
            ("pool.NAME", "max_fails", pool::MAX_FAILS.to_string()),
            ("pool.NAME", "eject_time", dur(pool::EJECT_TIME)),
            ("pool.NAME", "eject_max_time", dur(pool::EJECT_MAX_TIME)),
            ("pool.NAME", "max_streams", pool::MAX_STREAMS.to_string()),
        ];
        let wrong: Vec<String> = rows
            .iter()
            .filter(|(section, option, want)| &documented(doc, section, option) != want)
            .map(|(section, option, want)| {
                format!(
                    "[{section}] {option}: docs say {:?}, the code {want:?}",
                    documented(doc, section, option)
                )
            })
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
        // and the prose of `[plugin.NAME]`
        for (what, d) in [
            ("cpu_deadline` (default `", dur(plugin::CPU_DEADLINE)),
            ("max_memory` (default `", size(plugin::MAX_MEMORY)),
        ] {
            assert!(doc.contains(&format!("{what}{d}")), "{what}{d}");
        }
    }
}
