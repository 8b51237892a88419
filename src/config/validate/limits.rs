//! `[limits]`: connection and request limits, timeouts, trusted proxies.

use super::*;

pub(super) fn limits(cx: &mut Ctx, r: &RawLimits) -> Limits {
    let d = |s| Duration::from_secs(s);
    let secs = |cx: &mut Ctx, v: &Option<Spanned<String>>, opt: &str, def: u64| {
        cx.duration_in(v, opt, d(def), Duration::from_millis(10), d(3600))
    };
    let rate = match &r.connection_rate_per_ip {
        None => 100.0,
        Some(v) if v.get_ref().is_finite() && (0.0..=1e6).contains(v.get_ref()) => *v.get_ref(),
        Some(v) => {
            cx.err(
                v.span(),
                "limits.connection_rate_per_ip",
                format!("must be between 0 and 1000000, got {}", v.get_ref()),
            );
            100.0
        }
    };
    let max_connections = cx.int(
        &r.max_connections,
        "limits.max_connections",
        10_000,
        1,
        10_000_000,
    );
    Limits {
        max_connections: max_connections as usize,
        max_connections_per_ip: cx.int(
            &r.max_connections_per_ip,
            "limits.max_connections_per_ip",
            256,
            1,
            10_000_000,
        ) as usize,
        connection_rate_per_ip: rate,
        connection_burst_per_ip: cx.int(
            &r.connection_burst_per_ip,
            "limits.connection_burst_per_ip",
            200,
            1,
            1_000_000,
        ) as u32,
        allow: cx.cidrs(&r.allow, "limits.allow"),
        handshake_timeout: secs(cx, &r.handshake_timeout, "limits.handshake_timeout", 10),
        header_timeout: secs(cx, &r.header_timeout, "limits.header_timeout", 10),
        body_idle_timeout: secs(cx, &r.body_idle_timeout, "limits.body_idle_timeout", 30),
        keepalive_timeout: cx.duration_in(
            &r.keepalive_timeout,
            "limits.keepalive_timeout",
            d(60),
            d(1),
            d(3600),
        ),
        send_timeout: secs(cx, &r.send_timeout, "limits.send_timeout", 60),
        encoded_slashes: cx.choice(
            &r.encoded_slashes,
            "limits.encoded_slashes",
            &[
                ("reject", crate::routing::path::EncodedSlashes::Reject),
                ("keep", crate::routing::path::EncodedSlashes::Keep),
            ],
        ),
        min_body_rate: cx.int(&r.min_body_rate, "limits.min_body_rate", 0, 0, 1 << 40) as u64,
        min_body_rate_after: secs(cx, &r.min_body_rate_after, "limits.min_body_rate_after", 10),
        max_request_line: cx.int(
            &r.max_request_line,
            "limits.max_request_line",
            8192,
            64,
            1 << 20,
        ) as usize,
        max_header_bytes: cx.int(
            &r.max_header_bytes,
            "limits.max_header_bytes",
            32 * 1024,
            256,
            1 << 20,
        ) as usize,
        max_headers: cx.int(&r.max_headers, "limits.max_headers", 100, 4, 256) as usize,
        max_body_size: cx.size(&r.max_body_size, "limits.max_body_size", 10 << 20),
        h2_max_concurrent_streams: cx.int(
            &r.h2_max_concurrent_streams,
            "limits.h2_max_concurrent_streams",
            100,
            1,
            10_000,
        ) as u32,
        h2_max_header_list_size: cx.int(
            &r.h2_max_header_list_size,
            "limits.h2_max_header_list_size",
            32 * 1024,
            1024,
            1 << 20,
        ) as u32,
        h2_max_pending_resets: cx.int(
            &r.h2_max_pending_resets,
            "limits.h2_max_pending_resets",
            20,
            1,
            100_000,
        ) as usize,
        h2_max_error_resets: cx.int(
            &r.h2_max_error_resets,
            "limits.h2_max_error_resets",
            100,
            1,
            100_000,
        ) as usize,
        trusted_proxies: cx.cidrs(&r.trusted_proxies, "limits.trusted_proxies"),
        x_forwarded_for: r.x_forwarded_for.unwrap_or(false),
    }
}
