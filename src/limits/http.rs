//! Request checks that run before routing: sizes (414/431), message framing (request
//! smuggling: 400 and close) and the Host header (400), plus the body limits (413, minimum
//! rate). Pure functions over the parsed header; `proxy` applies them.

use crate::config::Limits;
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::Version;
use pingora::http::{RequestHeader, ResponseHeader};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A request tollgate answers itself: the status, the logged reason, and whether the
/// connection must close (the request's framing cannot be trusted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub reason: &'static str,
    pub close: bool,
}

const fn reject(status: u16, reason: &'static str, close: bool) -> Reject {
    Reject {
        status,
        reason,
        close,
    }
}

/// Check sizes, framing and Host. `Ok` means the request may go on to routing.
pub fn check_request(req: &RequestHeader, l: &Limits) -> Result<(), Reject> {
    // method SP request-target SP HTTP/1.1
    let target_len = req
        .uri
        .path_and_query()
        .map(|p| p.as_str().len())
        .unwrap_or(1)
        + req.uri.authority().map(|a| a.as_str().len()).unwrap_or(0);
    if req.method.as_str().len() + target_len + 10 > l.max_request_line {
        return Err(reject(
            414,
            "request line over limits.max_request_line",
            true,
        ));
    }
    if req.headers.len() > l.max_headers {
        return Err(reject(
            431,
            "more header fields than limits.max_headers",
            true,
        ));
    }
    let bytes: usize = req
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if bytes > l.max_header_bytes {
        return Err(reject(
            431,
            "header fields over limits.max_header_bytes",
            true,
        ));
    }
    let is_h1 = matches!(
        req.version,
        Version::HTTP_10 | Version::HTTP_11 | Version::HTTP_09
    );
    if is_h1 {
        check_framing(req)?;
    } else if first_and_more(req, CONTENT_LENGTH).1 {
        return Err(reject(400, "duplicate Content-Length", false));
    }
    check_host(req, is_h1)
}

/// The first value of header `name`, and whether another follows it. Runs on every
/// request, so it looks at no more than two values and allocates nothing.
fn first_and_more(req: &RequestHeader, name: http::HeaderName) -> (Option<&[u8]>, bool) {
    let mut all = req.headers.get_all(name).into_iter();
    (all.next().map(|v| v.as_bytes()), all.next().is_some())
}

/// RFC 9112 §6: one unambiguous way to find the end of the body, or 400 and close.
fn check_framing(req: &RequestHeader) -> Result<(), Reject> {
    let (cl, more_cl) = first_and_more(req, CONTENT_LENGTH);
    let (te, more_te) = first_and_more(req, TRANSFER_ENCODING);
    if cl.is_some() && te.is_some() {
        return Err(reject(
            400,
            "both Content-Length and Transfer-Encoding",
            true,
        ));
    }
    if more_cl {
        return Err(reject(400, "duplicate Content-Length", true));
    }
    if let Some(cl) = cl {
        if cl.is_empty() || cl.len() > 19 || !cl.iter().all(u8::is_ascii_digit) {
            return Err(reject(400, "malformed Content-Length", true));
        }
    }
    if let Some(te) = te {
        if req.version != Version::HTTP_11 {
            return Err(reject(400, "Transfer-Encoding before HTTP/1.1", true));
        }
        if more_te || !te.eq_ignore_ascii_case(b"chunked") {
            return Err(reject(400, "Transfer-Encoding other than chunked", true));
        }
    }
    Ok(())
}

fn check_host(req: &RequestHeader, is_h1: bool) -> Result<(), Reject> {
    let (host, more) = first_and_more(req, HOST);
    if more {
        return Err(reject(400, "more than one Host header", true));
    }
    if is_h1 && req.version == Version::HTTP_11 && host.is_none() {
        return Err(reject(400, "HTTP/1.1 request without Host", false));
    }
    if let Some(h) = host {
        if h.is_empty()
            || !h
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(b))
        {
            return Err(reject(400, "invalid Host header", false));
        }
    }
    Ok(())
}

/// The body cap for a request: the route's, else the global one; 0 = none.
pub fn body_cap(route_cap: Option<u64>, l: &Limits) -> Option<u64> {
    match route_cap.unwrap_or(l.max_body_size) {
        0 => None,
        n => Some(n),
    }
}

/// A declared Content-Length over the cap is refused before any of the body is read.
pub fn check_declared_body(req: &RequestHeader, cap: Option<u64>) -> Result<(), Reject> {
    let (Some(cap), Some(cl)) = (cap, req.headers.get(CONTENT_LENGTH)) else {
        return Ok(());
    };
    match cl.to_str().ok().and_then(|s| s.parse::<u64>().ok()) {
        Some(n) if n > cap => Err(reject(413, "request body over max_body_size", true)),
        _ => Ok(()),
    }
}

/// What the body has done so far: its size against the cap, and its average rate.
#[derive(Debug, Default)]
pub struct BodyMeter {
    start: Option<Instant>,
    bytes: u64,
}

impl BodyMeter {
    /// Count `n` more body bytes at `now`.
    pub fn feed(
        &mut self,
        n: usize,
        now: Instant,
        cap: Option<u64>,
        min_rate: u64,
        after: Duration,
    ) -> Result<(), Reject> {
        let start = *self.start.get_or_insert(now);
        self.bytes += n as u64;
        if cap.is_some_and(|c| self.bytes > c) {
            return Err(reject(413, "request body over max_body_size", true));
        }
        let elapsed = now.saturating_duration_since(start);
        if min_rate > 0
            && elapsed > after
            && (self.bytes as f64) < min_rate as f64 * elapsed.as_secs_f64()
        {
            return Err(reject(
                408,
                "request body slower than limits.min_body_rate",
                true,
            ));
        }
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The client's address: the socket peer (already the PROXY header's source where one was
/// read), or, when `x_forwarded_for` is on and the peer is a trusted proxy, the nearest
/// address in X-Forwarded-For that is not a trusted proxy.
pub fn client_ip(peer: IpAddr, xff: Option<&str>, l: &Limits) -> IpAddr {
    if !l.x_forwarded_for || !crate::config::cidr::any_contains(&l.trusted_proxies, peer) {
        return peer;
    }
    let Some(xff) = xff else { return peer };
    let mut last = peer;
    for hop in xff.rsplit(',') {
        let Ok(ip) = hop.trim().parse::<IpAddr>() else {
            // a garbled entry: nothing left of it can be trusted
            return last;
        };
        last = ip;
        if !crate::config::cidr::any_contains(&l.trusted_proxies, ip) {
            return ip;
        }
    }
    last
}

/// The most header fields, and bytes of header, a backend's answer may carry: what
/// pingora's HTTP/1 parser takes (256 fields; 1 MiB with the status line), applied to
/// HTTP/2 backends too, whose frames have no such limit of their own.
pub const MAX_RESPONSE_FIELDS: usize = 256;
pub const MAX_RESPONSE_HEADER_BYTES: usize = 1_048_575;

/// An upstream answer's header within [`MAX_RESPONSE_FIELDS`] and
/// [`MAX_RESPONSE_HEADER_BYTES`] (each field counted as `name: value` and CRLF).
pub fn check_response_header(resp: &ResponseHeader) -> Result<(), &'static str> {
    if resp.headers.len() > MAX_RESPONSE_FIELDS {
        return Err("the upstream answered with more than 256 header fields");
    }
    let bytes: usize = resp
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if bytes > MAX_RESPONSE_HEADER_BYTES {
        return Err("the upstream answered with a header over 1 MiB");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::test_limits as limits;

    fn req(version: Version, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", b"/upload", None).unwrap();
        r.set_version(version);
        for (n, v) in headers {
            r.append_header(n.to_string(), *v).unwrap();
        }
        r
    }

    fn status(r: &RequestHeader) -> Option<(u16, bool)> {
        check_request(r, &limits())
            .err()
            .map(|e| (e.status, e.close))
    }

    #[test]
    fn smuggling_variants_are_400_and_close() {
        let h11 = Version::HTTP_11;
        let cases: &[&[(&str, &str)]] = &[
            &[
                ("host", "a"),
                ("content-length", "5"),
                ("transfer-encoding", "chunked"),
            ],
            &[
                ("host", "a"),
                ("content-length", "5"),
                ("content-length", "6"),
            ],
            &[
                ("host", "a"),
                ("content-length", "5"),
                ("content-length", "5"),
            ],
            &[("host", "a"), ("content-length", "5, 5")],
            &[("host", "a"), ("content-length", "+5")],
            &[("host", "a"), ("content-length", "0x10")],
            &[("host", "a"), ("content-length", "")],
            &[("host", "a"), ("transfer-encoding", "chunked, identity")],
            &[("host", "a"), ("transfer-encoding", "xchunked")],
            &[
                ("host", "a"),
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            &[("host", "a"), ("transfer-encoding", "identity")],
        ];
        for c in cases {
            assert_eq!(status(&req(h11, c)), Some((400, true)), "{c:?}");
        }
        let te10 = req(Version::HTTP_10, &[("transfer-encoding", "chunked")]);
        assert_eq!(status(&te10), Some((400, true)));
        // the plain, honest forms pass
        assert_eq!(
            status(&req(h11, &[("host", "a"), ("content-length", "5")])),
            None
        );
        assert_eq!(
            status(&req(
                h11,
                &[("host", "a"), ("transfer-encoding", "Chunked")]
            )),
            None
        );
    }

    #[test]
    fn host_rules() {
        let h11 = Version::HTTP_11;
        assert_eq!(status(&req(h11, &[])), Some((400, false)), "no Host in 1.1");
        assert_eq!(
            status(&req(Version::HTTP_10, &[])),
            None,
            "1.0 may omit Host"
        );
        assert_eq!(
            status(&req(h11, &[("host", "a"), ("host", "b")])),
            Some((400, true))
        );
        for bad in ["a b", "a/b", "a@b", "", "a\\b"] {
            assert_eq!(
                status(&req(h11, &[("host", bad)])),
                Some((400, false)),
                "{bad:?}"
            );
        }
        for good in [
            "a.test",
            "a.test:8443",
            "[::1]:443",
            "xn--bcher-kva.example",
        ] {
            assert_eq!(status(&req(h11, &[("host", good)])), None, "{good}");
        }
    }

    #[test]
    fn sizes_give_414_and_431() {
        let l = limits();
        let long = format!("/{}", "a".repeat(l.max_request_line));
        let mut r = RequestHeader::build("GET", long.as_bytes(), None).unwrap();
        r.append_header("host", "a").unwrap();
        assert_eq!(check_request(&r, &l).unwrap_err().status, 414);

        let mut many = req(Version::HTTP_11, &[("host", "a")]);
        for i in 0..l.max_headers {
            many.append_header(format!("x-h{i}"), "1").unwrap();
        }
        assert_eq!(check_request(&many, &l).unwrap_err().status, 431);

        let big = "b".repeat(l.max_header_bytes);
        let r = req(Version::HTTP_11, &[("host", "a"), ("x-big", big.as_str())]);
        assert_eq!(check_request(&r, &l).unwrap_err().status, 431);
    }

    #[test]
    fn body_cap_and_minimum_rate() {
        let l = limits();
        assert_eq!(body_cap(None, &l), Some(l.max_body_size));
        assert_eq!(body_cap(Some(0), &l), None);
        assert_eq!(body_cap(Some(10), &l), Some(10));
        let r = req(Version::HTTP_11, &[("content-length", "11")]);
        assert_eq!(check_declared_body(&r, Some(10)).unwrap_err().status, 413);
        assert!(check_declared_body(&r, Some(11)).is_ok());
        assert!(check_declared_body(&r, None).is_ok());

        let t0 = Instant::now();
        let after = Duration::from_secs(2);
        let mut m = BodyMeter::default();
        assert!(m.feed(6, t0, Some(10), 0, after).is_ok());
        assert_eq!(m.feed(5, t0, Some(10), 0, after).unwrap_err().status, 413);

        // 100 B/s asked for: 150 bytes in 3 s is too slow, but not before `after`
        let mut m = BodyMeter::default();
        assert!(m.feed(50, t0, None, 100, after).is_ok());
        assert!(m
            .feed(50, t0 + Duration::from_secs(1), None, 100, after)
            .is_ok());
        assert_eq!(
            m.feed(50, t0 + Duration::from_secs(3), None, 100, after)
                .unwrap_err()
                .status,
            408
        );
        let mut fast = BodyMeter::default();
        for s in 0..10 {
            assert!(fast
                .feed(200, t0 + Duration::from_secs(s), None, 100, after)
                .is_ok());
        }
    }

    #[test]
    fn client_ip_from_trusted_forwarders_only() {
        let mut l = limits();
        let peer: IpAddr = "10.0.0.5".parse().unwrap();
        let xff = Some("203.0.113.9, 198.51.100.2, 10.0.0.7");
        assert_eq!(client_ip(peer, xff, &l), peer, "off by default");
        l.x_forwarded_for = true;
        assert_eq!(client_ip(peer, xff, &l), peer, "peer not trusted");
        l.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
        assert_eq!(
            client_ip(peer, xff, &l),
            "198.51.100.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(peer, Some("garbage, 10.0.0.9"), &l),
            "10.0.0.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(peer, None, &l), peer);
    }
}
