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
    /// The names in the maps, each once per value.
    fn names(&self) -> impl Iterator<Item = &HeaderName>;
    /// After the maps' fields on the wire, outside the maps (pingora-http patch 0031).
    fn on_wire(&mut self, case: bytes::Bytes, name: HeaderName, value: HeaderValue);
    /// Fields prepared together, after those (pingora-http patch 0032).
    fn block(&mut self, block: std::sync::Arc<pingora::http::WireBlock>);
}

/// The same for both of pingora's header types, which share no trait.
macro_rules! headers {
    ($t:ty) => {
        impl Headers for $t {
            fn set(&mut self, name: HeaderName, value: HeaderValue) -> Result<()> {
                self.insert_header(name, value)
            }
            fn add(&mut self, name: HeaderName, value: HeaderValue) -> Result<()> {
                self.append_header(name, value).map(|_| ())
            }
            fn remove(&mut self, name: &HeaderName) {
                self.remove_header(name);
            }
            fn names(&self) -> impl Iterator<Item = &HeaderName> {
                self.headers.keys()
            }
            fn on_wire(&mut self, case: bytes::Bytes, name: HeaderName, value: HeaderValue) {
                self.append_on_wire(case, name, value);
            }
            fn block(&mut self, block: std::sync::Arc<pingora::http::WireBlock>) {
                self.set_wire_block(block);
            }
        }
    };
}
headers!(RequestHeader);
headers!(ResponseHeader);

/// Apply `ops` to `h` for the request of `ctx`. A set or added field whose name no later
/// code reads goes on the wire (a set one replacing the peer's copy in the maps); the others
/// into the maps.
pub(super) fn apply(h: &mut impl Headers, ops: &HeaderOps, ctx: &RequestCtx) -> Result<()> {
    for name in &ops.remove {
        h.remove(name);
    }
    // the fields set on the wire that the peer sent too, found in one pass over the names
    // (a comparison each, where a removal would hash the name; most answers have none)
    let mut sent = 0u64;
    for n in h.names() {
        for (i, f) in ops.set.iter().enumerate().take(64) {
            if f.wire.is_some() && f.name == n {
                sent |= 1 << i;
            }
        }
    }
    // past 64 set rules, removed unconditionally
    let peer_sent = |i: usize| i >= 64 || sent & (1 << i) != 0;
    if let Some(block) = &ops.block {
        // every field fixed and on the wire: the peer's copies of the set ones removed, the
        // fields as one shared block
        for (i, f) in ops.set.iter().enumerate() {
            if peer_sent(i) {
                h.remove(&f.name);
            }
        }
        h.block(block.clone());
        return Ok(());
    }
    for (i, f) in ops.set.iter().enumerate() {
        let Some(v) = value(&f.value, ctx) else {
            continue;
        };
        match &f.wire {
            Some(case) => {
                if peer_sent(i) {
                    h.remove(&f.name);
                }
                h.on_wire(case.clone(), f.name.clone(), v);
            }
            None => h.set(f.name.clone(), v)?,
        }
    }
    for f in &ops.add {
        let Some(v) = value(&f.value, ctx) else {
            continue;
        };
        match &f.wire {
            Some(case) => h.on_wire(case.clone(), f.name.clone(), v),
            None => h.add(f.name.clone(), v)?,
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
