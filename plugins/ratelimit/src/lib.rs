//! ratelimit: token buckets keyed by client IP, a request header or the route. The buckets
//! live in the host's shared data, updated with compare-and-swap, so every worker thread's
//! instance spends from one budget. Over budget: 429 with Retry-After and the IETF
//! RateLimit-Policy / RateLimit headers. Documentation: docs/plugins/ratelimit.md.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, Status};
use serde::Deserialize;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { cfg: None })
    });
}}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Tokens added per second.
    rate: f64,
    /// Bucket size: how many requests may come at once.
    burst: u32,
    /// "client_ip" (default), "route", or "header:NAME".
    #[serde(default)]
    key: Option<String>,
    /// Client networks never limited.
    #[serde(default)]
    allow: Vec<String>,
    /// The policy name in RateLimit-Policy (default "default").
    #[serde(default)]
    policy: Option<String>,
    /// Send RateLimit headers on answers that were let through too (default true).
    #[serde(default)]
    headers_on_success: Option<bool>,
}

enum Key {
    ClientIp,
    Route,
    Header(String),
}

struct Config {
    rate: f64,
    burst: f64,
    key: Key,
    allow: Vec<(IpAddr, u8)>,
    policy: String,
    /// The RateLimit-Policy value (the same on every answer).
    policy_header: String,
    /// `"POLICY";r=`: the start of every `RateLimit` header.
    state_prefix: String,
    headers_on_success: bool,
}

fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (ip, bits) = match s.split_once('/') {
        Some((ip, b)) => (ip, Some(b)),
        None => (s, None),
    };
    let ip: IpAddr = ip
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not an address or CIDR"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let bits = match bits {
        Some(b) => b
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|b| *b <= max)
            .ok_or(format!("`{s}` has a bad prefix length"))?,
        None => max,
    };
    Ok((ip, bits))
}

fn in_cidr(ip: IpAddr, (net, bits): (IpAddr, u8)) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits as u32)
            };
            (u32::from(a) & mask) == (u32::from(n) & mask)
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits as u32)
            };
            (u128::from(a) & mask) == (u128::from(n) & mask)
        }
        _ => false,
    }
}

impl Config {
    fn parse(bytes: &[u8]) -> Result<Config, String> {
        let raw: RawConfig =
            serde_json::from_slice(bytes).map_err(|e| format!("bad configuration: {e}"))?;
        if !(raw.rate > 0.0 && raw.rate.is_finite()) {
            return Err("rate must be a positive number of requests per second".into());
        }
        if raw.burst == 0 {
            return Err("burst must be at least 1".into());
        }
        let key = match raw.key.as_deref().unwrap_or("client_ip") {
            "client_ip" => Key::ClientIp,
            "route" => Key::Route,
            k => match k.strip_prefix("header:") {
                Some(h) if !h.is_empty() => Key::Header(h.to_ascii_lowercase()),
                _ => return Err(format!("key `{k}` is not client_ip, route or header:NAME")),
            },
        };
        let allow = raw
            .allow
            .iter()
            .map(|c| parse_cidr(c))
            .collect::<Result<Vec<_>, _>>()?;
        let policy = raw.policy.unwrap_or_else(|| "default".into());
        // w: the seconds an empty bucket takes to fill
        let window = (raw.burst as f64 / raw.rate).ceil().max(1.0) as u64;
        Ok(Config {
            rate: raw.rate,
            burst: raw.burst as f64,
            key,
            allow,
            policy_header: format!("\"{policy}\";q={};w={window}", raw.burst),
            state_prefix: format!("\"{policy}\";r="),
            policy,
            headers_on_success: raw.headers_on_success.unwrap_or(true),
        })
    }
}

struct Root {
    cfg: Option<Rc<Config>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match Config::parse(&bytes) {
            Ok(c) => {
                self.cfg = Some(Rc::new(c));
                true
            }
            Err(e) => {
                proxy_wasm::hostcalls::log(LogLevel::Error, &format!("ratelimit: {e}")).ok();
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Limiter {
            cfg: self.cfg.clone()?,
            remaining: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Limiter {
    cfg: Rc<Config>,
    /// (remaining tokens, seconds until full) for the RateLimit header.
    remaining: Option<(u64, u64)>,
}

impl Context for Limiter {}

/// A bucket as stored in shared data: tokens (f64) and the time they were counted (ns).
/// The address of an IPv4 `a.b.c.d:port` text (the `source.address` property), checked to
/// be one: four decimal octets of at most three digits, each at most 255.
fn ipv4_of(v: &[u8]) -> Option<&str> {
    // one pass over the bytes (no string searching: this runs on every request)
    let colon = v.iter().rposition(|b| *b == b':')?;
    let (ip, port) = (&v[..colon], &v[colon + 1..]);
    if port.is_empty() || !port.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let (mut parts, mut digits, mut n) = (1, 0, 0u32);
    for &b in ip {
        match b {
            b'0'..=b'9' if digits < 3 => {
                n = n * 10 + (b - b'0') as u32;
                digits += 1;
            }
            b'.' if digits > 0 && n <= 255 => {
                parts += 1;
                (digits, n) = (0, 0);
            }
            _ => return None,
        }
    }
    if parts != 4 || digits == 0 || n > 255 {
        return None;
    }
    std::str::from_utf8(ip).ok()
}

/// `n` in decimal, without the formatting machinery (a header on every response).
fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in &digits[i..] {
        out.push(*d as char);
    }
}

fn decode(v: &[u8]) -> Option<(f64, u64)> {
    if v.len() != 16 {
        return None;
    }
    let t = f64::from_le_bytes(v[0..8].try_into().ok()?);
    let at = u64::from_le_bytes(v[8..16].try_into().ok()?);
    Some((t, at))
}

fn encode(tokens: f64, at: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..8].copy_from_slice(&tokens.to_le_bytes());
    out[8..16].copy_from_slice(&at.to_le_bytes());
    out
}

impl Limiter {
    fn client_ip(&self) -> Option<IpAddr> {
        let v = self.get_property(vec!["source", "address"])?;
        let s = String::from_utf8(v).ok()?;
        s.parse::<std::net::SocketAddr>()
            .map(|a| a.ip())
            .ok()
            .or_else(|| s.parse().ok())
    }

    fn key(&self) -> String {
        match &self.cfg.key {
            Key::ClientIp => {
                // IPv4 (`a.b.c.d:port`, what every request on an IPv4 listener has): the
                // key is the address text, neither parsed nor formatted
                let v = self
                    .get_property(vec!["source", "address"])
                    .unwrap_or_default();
                if let Some(ip) = ipv4_of(&v) {
                    let mut key = String::with_capacity(6 + ip.len());
                    key.push_str("rl:ip:");
                    key.push_str(ip);
                    return key;
                }
                match self.client_ip() {
                    Some(IpAddr::V6(v6)) => {
                        // One bucket per /64: an IPv6 client usually holds the whole prefix.
                        let s = v6.segments();
                        format!("rl:ip:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
                    }
                    Some(ip) => format!("rl:ip:{ip}"),
                    None => "rl:ip:unknown".into(),
                }
            }
            Key::Route => {
                let r = self.get_property(vec!["route_name"]).unwrap_or_default();
                format!("rl:route:{}", String::from_utf8_lossy(&r))
            }
            Key::Header(h) => format!(
                "rl:hdr:{h}:{}",
                self.get_http_request_header(h).unwrap_or_default()
            ),
        }
    }

    /// Take one token; Ok(remaining) or Err(seconds until one is back).
    fn take(&mut self, key: &str) -> Result<f64, f64> {
        let now = self
            .get_current_time()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let cfg = self.cfg.clone();
        // Compare-and-swap: another worker's instance may update the bucket between our
        // read and write; then read again. Bounded, so contention cannot spin forever.
        for _ in 0..16 {
            let (value, cas) = match self.get_shared_data(key) {
                (Some(v), cas) => (decode(&v), cas),
                (None, cas) => (None, cas),
            };
            let (tokens, at) = value.unwrap_or((cfg.burst, now));
            let elapsed = now.saturating_sub(at) as f64 / 1e9;
            let tokens = (tokens + elapsed * cfg.rate).min(cfg.burst);
            let (left, verdict) = if tokens >= 1.0 {
                (tokens - 1.0, Ok(tokens - 1.0))
            } else {
                (tokens, Err((1.0 - tokens) / cfg.rate))
            };
            match self.set_shared_data(key, Some(&encode(left, now.max(at))), cas) {
                Ok(()) => return verdict,
                Err(Status::CasMismatch) => continue,
                Err(_) => return verdict,
            }
        }
        // Heavy contention on one key: refuse rather than let the budget leak.
        Err(1.0 / cfg.rate)
    }
}

impl HttpContext for Limiter {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if !self.cfg.allow.is_empty() {
            if let Some(ip) = self.client_ip() {
                if self.cfg.allow.iter().any(|c| in_cidr(ip, *c)) {
                    return Action::Continue;
                }
            }
        }
        let key = self.key();
        match self.take(&key) {
            Ok(left) => {
                let full_in = ((self.cfg.burst - left) / self.cfg.rate).ceil() as u64;
                self.remaining = Some((left.floor() as u64, full_in));
                Action::Continue
            }
            Err(wait) => {
                let retry = wait.ceil().max(1.0) as u64;
                let policy = self.cfg.policy_header.as_str();
                let state = format!("\"{}\";r=0;t={retry}", self.cfg.policy);
                let retry_s = retry.to_string();
                self.send_http_response(
                    429,
                    vec![
                        ("retry-after", retry_s.as_str()),
                        ("ratelimit-policy", policy),
                        ("ratelimit", state.as_str()),
                        ("content-type", "text/plain; charset=utf-8"),
                    ],
                    Some(b"429 too many requests\n"),
                );
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if let (true, Some((left, t))) = (self.cfg.headers_on_success, self.remaining) {
            let cfg = self.cfg.clone();
            self.set_http_response_header("ratelimit-policy", Some(&cfg.policy_header));
            let mut state = String::with_capacity(cfg.state_prefix.len() + 24);
            state.push_str(&cfg.state_prefix);
            push_u64(&mut state, left);
            state.push_str(";t=");
            push_u64(&mut state, t);
            self.set_http_response_header("ratelimit", Some(&state));
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_addresses_are_taken_as_text_and_anything_else_is_not() {
        assert_eq!(ipv4_of(b"192.0.2.7:51234"), Some("192.0.2.7"));
        assert_eq!(ipv4_of(b"0.0.0.0:0"), Some("0.0.0.0"));
        for bad in [
            &b"[2001:db8::1]:443"[..],
            b"192.0.2.256:1",
            b"192.0.2:1",
            b"192.0.2.7.1:1",
            b"1.2.3.4",
            b"1.2.3.4:",
            b"1.2.3.0004:1",
            b"1.2.3.a:1",
            b"\xff.1.1.1:1",
            b"",
        ] {
            assert_eq!(ipv4_of(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        for n in [0u64, 7, 10, 4096, u64::MAX] {
            let mut s = String::from("r=");
            push_u64(&mut s, n);
            assert_eq!(s, format!("r={n}"));
        }
    }
}
