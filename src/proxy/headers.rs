//! Header rules applied per request (`state::headers` made them ready): removals, sets,
//! adds, with `$client_ip`, `$request_id`, `$host` and `$scheme` filled from the request.

use super::RequestCtx;
use crate::state::headers::{HeaderOps, Part, Value};
use http::{HeaderName, HeaderValue};
use pingora::prelude::*;

/// What a rule can change: the request sent upstream or the answer to the client.
pub(super) trait Headers {
    fn set(&mut self, name: HeaderName, value: HeaderValue) -> Result<()>;
    fn add(&mut self, name: HeaderName, value: HeaderValue) -> Result<()>;
    fn remove(&mut self, name: &HeaderName);
}

impl Headers for RequestHeader {
    fn set(&mut self, name: HeaderName, value: HeaderValue) -> Result<()> {
        self.insert_header(name, value)
    }
    fn add(&mut self, name: HeaderName, value: HeaderValue) -> Result<()> {
        self.append_header(name, value).map(|_| ())
    }
    fn remove(&mut self, name: &HeaderName) {
        self.remove_header(name);
    }
}

impl Headers for ResponseHeader {
    fn set(&mut self, name: HeaderName, value: HeaderValue) -> Result<()> {
        self.insert_header(name, value)
    }
    fn add(&mut self, name: HeaderName, value: HeaderValue) -> Result<()> {
        self.append_header(name, value).map(|_| ())
    }
    fn remove(&mut self, name: &HeaderName) {
        self.remove_header(name);
    }
}

/// Apply `ops` to `h` for the request of `ctx`.
pub(super) fn apply(h: &mut impl Headers, ops: &HeaderOps, ctx: &RequestCtx) -> Result<()> {
    for name in &ops.remove {
        h.remove(name);
    }
    for (name, v) in &ops.set {
        if let Some(v) = value(v, ctx) {
            h.set(name.clone(), v)?;
        }
    }
    for (name, v) in &ops.add {
        if let Some(v) = value(v, ctx) {
            h.add(name.clone(), v)?;
        }
    }
    Ok(())
}

/// A rule's value for this request (`None`: a variable made it invalid, which the variables
/// tollgate fills cannot do: addresses, hex or `[A-Za-z0-9._-]` ids, normalised hosts).
fn value(v: &Value, ctx: &RequestCtx) -> Option<HeaderValue> {
    match v {
        Value::Fixed(v) => Some(v.clone()),
        Value::Template(parts) => {
            let mut out = String::with_capacity(64);
            for p in parts {
                match p {
                    Part::Text(t) => out.push_str(t),
                    Part::ClientIp => {
                        if let Some(ip) = ctx.client_ip {
                            out.push_str(&super::request::ip_text(ip));
                        }
                    }
                    Part::RequestId => out.push_str(&ctx.request_id),
                    Part::Host => out.push_str(&ctx.host),
                    Part::Scheme => out.push_str(if ctx.tls { "https" } else { "http" }),
                }
            }
            HeaderValue::try_from(out).ok()
        }
    }
}
