//! `[limits]`: connection and request limits, timeouts, trusted proxies.

use super::*;

pub(super) fn limits(cx: &mut Ctx, r: &RawLimits) -> Limits {
    use defaults::limits as def;
    let d = |s| Duration::from_secs(s);
    let secs = |cx: &mut Ctx, v: &Option<Spanned<String>>, opt: &str, def: Duration| {
        cx.duration_in(v, opt, def, Duration::from_millis(10), d(3600))
    };
    let rate = match &r.connection_rate_per_ip {
        None => def::CONNECTION_RATE_PER_IP,
        Some(v) if v.get_ref().is_finite() && (0.0..=1e6).contains(v.get_ref()) => *v.get_ref(),
        Some(v) => {
            cx.err(
                v.span(),
                "limits.connection_rate_per_ip",
                format!("must be between 0 and 1000000, got {}", v.get_ref()),
            );
            def::CONNECTION_RATE_PER_IP
        }
    };
    let max_connections = cx.int(
        &r.max_connections,
        "limits.max_connections",
        def::MAX_CONNECTIONS,
        1,
        10_000_000,
    );
    Limits {
        max_connections: max_connections as usize,
        max_connections_per_ip: cx.int(
            &r.max_connections_per_ip,
            "limits.max_connections_per_ip",
            def::MAX_CONNECTIONS_PER_IP,
            1,
            10_000_000,
        ) as usize,
        connection_rate_per_ip: rate,
        connection_burst_per_ip: cx.int(
            &r.connection_burst_per_ip,
            "limits.connection_burst_per_ip",
            def::CONNECTION_BURST_PER_IP,
            1,
            1_000_000,
        ) as u32,
        allow: cx.cidrs(&r.allow, "limits.allow"),
        handshake_timeout: secs(
            cx,
            &r.handshake_timeout,
            "limits.handshake_timeout",
            def::HANDSHAKE_TIMEOUT,
        ),
        header_timeout: secs(
            cx,
            &r.header_timeout,
            "limits.header_timeout",
            def::HEADER_TIMEOUT,
        ),
        body_idle_timeout: secs(
            cx,
            &r.body_idle_timeout,
            "limits.body_idle_timeout",
            def::BODY_IDLE_TIMEOUT,
        ),
        keepalive_timeout: cx.duration_in(
            &r.keepalive_timeout,
            "limits.keepalive_timeout",
            def::KEEPALIVE_TIMEOUT,
            d(1),
            d(3600),
        ),
        send_timeout: secs(
            cx,
            &r.send_timeout,
            "limits.send_timeout",
            def::SEND_TIMEOUT,
        ),
        encoded_slashes: cx.choice(
            &r.encoded_slashes,
            "limits.encoded_slashes",
            &[
                ("reject", crate::routing::path::EncodedSlashes::Reject),
                ("keep", crate::routing::path::EncodedSlashes::Keep),
            ],
        ),
        min_body_rate: cx.int(
            &r.min_body_rate,
            "limits.min_body_rate",
            def::MIN_BODY_RATE,
            0,
            1 << 40,
        ) as u64,
        min_body_rate_after: secs(
            cx,
            &r.min_body_rate_after,
            "limits.min_body_rate_after",
            def::MIN_BODY_RATE_AFTER,
        ),
        max_request_line: cx.int(
            &r.max_request_line,
            "limits.max_request_line",
            def::MAX_REQUEST_LINE,
            64,
            1 << 20,
        ) as usize,
        max_header_bytes: cx.int(
            &r.max_header_bytes,
            "limits.max_header_bytes",
            def::MAX_HEADER_BYTES,
            256,
            1 << 20,
        ) as usize,
        max_headers: cx.int(
            &r.max_headers,
            "limits.max_headers",
            def::MAX_HEADERS,
            4,
            256,
        ) as usize,
        max_body_size: cx.size(&r.max_body_size, "limits.max_body_size", def::MAX_BODY_SIZE),
        h2_max_concurrent_streams: cx.int(
            &r.h2_max_concurrent_streams,
            "limits.h2_max_concurrent_streams",
            def::H2_MAX_CONCURRENT_STREAMS,
            1,
            10_000,
        ) as u32,
        h2_max_header_list_size: cx.int(
            &r.h2_max_header_list_size,
            "limits.h2_max_header_list_size",
            def::H2_MAX_HEADER_LIST_SIZE,
            1024,
            1 << 20,
        ) as u32,
        h2_max_pending_resets: cx.int(
            &r.h2_max_pending_resets,
            "limits.h2_max_pending_resets",
            def::H2_MAX_PENDING_RESETS,
            1,
            100_000,
        ) as usize,
        h2_max_error_resets: cx.int(
            &r.h2_max_error_resets,
            "limits.h2_max_error_resets",
            def::H2_MAX_ERROR_RESETS,
            1,
            100_000,
        ) as usize,
        trusted_proxies: cx.cidrs(&r.trusted_proxies, "limits.trusted_proxies"),
        x_forwarded_for: r.x_forwarded_for.unwrap_or(false),
    }
}
