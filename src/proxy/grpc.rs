//! tollgate's own answers to gRPC clients: a gRPC status in trailers-only form (one HEADERS
//! frame that ends the stream: `:status 200`, `content-type: application/grpc`,
//! `grpc-status`, `grpc-message`), not a text body a gRPC client cannot read. The HTTP
//! status tollgate would have sent maps to a gRPC code as gRPC's own HTTP mapping does
//! (doc/http-grpc-status-mapping.md), except that tollgate's timeouts are DEADLINE_EXCEEDED.

use pingora::http::{RequestHeader, ResponseHeader};
use pingora::Result;

/// Whether the request is a gRPC call (`application/grpc`, `application/grpc+proto`, …,
/// and gRPC-Web's `application/grpc-web*`, which reads trailers-only answers the same way).
pub(super) fn is_grpc(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| {
            let v = v.as_bytes();
            v.len() >= 16 && v[..16].eq_ignore_ascii_case(b"application/grpc")
        })
}

/// The most request body read (and dropped) before an early answer: a small call's whole
/// body, not a stream's.
const DRAIN_MAX: usize = 64 * 1024;
/// How long an early answer waits for the rest of a small request body.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Send a trailers-only answer: the head ends the stream (one HEADERS frame with
/// END_STREAM on HTTP/2; pingora's `Session::write_response_header` does not pass
/// end-of-stream down, the session's task list does). A request body still unread is read
/// and dropped first, up to 64 KiB and 100 ms: an answer that ends the stream while the
/// client is still sending makes the server reset the stream (NO_ERROR, which is legal),
/// and common clients (curl) report that as a failure instead of the status. A larger or
/// endless body is not waited for: the answer goes and the reset follows.
pub(super) async fn write(
    session: &mut pingora::proxy::Session,
    head: ResponseHeader,
) -> Result<()> {
    use pingora::protocols::http::HttpTask;
    if session.is_http2() {
        let drain = async {
            let mut read = 0;
            while !session.as_downstream_mut().is_body_done() && read <= DRAIN_MAX {
                match session.as_downstream_mut().read_request_body().await {
                    Ok(Some(b)) => read += b.len(),
                    _ => break,
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_WAIT, drain).await;
    }
    session
        .as_downstream_mut()
        .response_duplex_vec(vec![HttpTask::Header(Box::new(head), true)])
        .await
        .map(|_| ())
}

/// The gRPC code for an HTTP status tollgate answers with.
pub(super) fn code_for(status: u16) -> u32 {
    match status {
        400 | 500 => 13,       // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 | 421 => 12,       // UNIMPLEMENTED: no route for this method
        408 | 504 => 4,        // DEADLINE_EXCEEDED
        413 | 414 | 431 => 8,  // RESOURCE_EXHAUSTED
        429 | 502 | 503 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

/// `grpc-message` is percent-encoded: bytes outside printable ASCII, and `%` itself.
fn encode_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for &b in msg.trim_end().as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Turn an answer tollgate (or a plugin) would have sent as `resp` + a text `body` into a
/// trailers-only gRPC answer. A `grpc-status` the answer already carries (a plugin's) is
/// kept; otherwise the HTTP status maps to one. The message is the body's text (or the
/// plugin's), cut to 512 bytes.
pub(super) fn trailers_only(resp: &ResponseHeader, message: &str) -> Result<ResponseHeader> {
    let own = resp
        .headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
        .filter(|c| *c <= 16);
    let code = own.unwrap_or_else(|| code_for(resp.status.as_u16()));
    let mut out = ResponseHeader::build(200, Some(resp.headers.len() + 4))?;
    for (k, v) in resp.headers.iter() {
        // framing and the content type are the gRPC answer's own
        if !matches!(
            k.as_str(),
            "content-type"
                | "content-length"
                | "transfer-encoding"
                | "grpc-status"
                | "grpc-message"
        ) {
            out.append_header(k.clone(), v.clone())?;
        }
    }
    out.insert_header(http::header::CONTENT_TYPE, "application/grpc")?;
    out.insert_header("grpc-status", code.to_string())?;
    let mut msg = message.trim();
    if msg.len() > 512 {
        let mut cut = 512;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg = &msg[..cut];
    }
    if !msg.is_empty() {
        out.insert_header("grpc-message", encode_message(msg))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_requests_are_told_apart() {
        let req = |ct: &str| {
            let mut r = RequestHeader::build("POST", b"/pkg.Svc/M", None).unwrap();
            r.insert_header("content-type", ct).unwrap();
            r
        };
        assert!(is_grpc(&req("application/grpc")));
        assert!(is_grpc(&req("application/grpc+proto")));
        assert!(is_grpc(&req("Application/GRPC-web+proto")));
        assert!(!is_grpc(&req("application/json")));
        assert!(!is_grpc(&req("application/gr")));
        let none = RequestHeader::build("GET", b"/", None).unwrap();
        assert!(!is_grpc(&none));
    }

    #[test]
    fn answers_become_trailers_only() {
        let mut resp = ResponseHeader::build(503, None).unwrap();
        resp.insert_header("content-type", "text/plain").unwrap();
        resp.insert_header("x-request-id", "abc").unwrap();
        let g = trailers_only(&resp, "503 no live backend 100% \u{e9}\n").unwrap();
        assert_eq!(g.status.as_u16(), 200);
        assert_eq!(g.headers["content-type"], "application/grpc");
        assert_eq!(g.headers["grpc-status"], "14");
        assert_eq!(
            g.headers["grpc-message"],
            "503 no live backend 100%25 %C3%A9"
        );
        assert_eq!(g.headers["x-request-id"], "abc");
        // a plugin's own grpc-status wins
        let mut resp = ResponseHeader::build(403, None).unwrap();
        resp.insert_header("grpc-status", "8").unwrap();
        let g = trailers_only(&resp, "").unwrap();
        assert_eq!(g.headers["grpc-status"], "8");
        assert!(g.headers.get("grpc-message").is_none());
        assert_eq!(code_for(504), 4);
        assert_eq!(code_for(404), 12);
        assert_eq!(code_for(302), 2);
    }
}
