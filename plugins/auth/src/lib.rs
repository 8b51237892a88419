//! auth: one authentication mode per plugin instance (attach the instance you need to each
//! route): HTTP basic auth against salted SHA-256 hashes, API keys in a header or query
//! parameter, JWT bearer tokens (HS256, RS256, ES256; exp/nbf/iss/aud checked; claims
//! forwarded as headers), or external auth through an HTTP callout to an auth service
//! (forward-auth style). Identity headers a client sends itself are removed before the
//! plugin sets its own. Documentation: docs/plugins/auth.md.

mod jwt;

use base64::Engine as _;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root {
        cfg: None,
        jwt_cache: Rc::default(),
    }) });
}}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    basic: Option<BasicConfig>,
    api_key: Option<ApiKeyConfig>,
    jwt: Option<jwt::RawJwtConfig>,
    external: Option<ExternalConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BasicConfig {
    #[serde(default = "default_realm")]
    realm: String,
    /// user → "sha256:SALT:HEX" where HEX = sha256(SALT + password).
    users: BTreeMap<String, String>,
    /// The header the authenticated user name is forwarded in.
    #[serde(default = "default_user_header")]
    user_header: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyConfig {
    /// Header the key is read from (default x-api-key).
    #[serde(default)]
    header: Option<String>,
    /// Query parameter the key may be read from instead (off unless set).
    #[serde(default)]
    query: Option<String>,
    /// key name → "sha256:HEX" of the key (or the key itself).
    keys: BTreeMap<String, String>,
    /// The header the key's name is forwarded in.
    #[serde(default = "default_key_header")]
    name_header: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExternalConfig {
    /// The tollgate pool the auth service is in.
    pool: String,
    #[serde(default = "default_check_path")]
    path: String,
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
    /// Request headers passed to the auth service.
    #[serde(default = "default_forward")]
    request_headers: Vec<String>,
    /// Headers of the service's 2xx answer copied onto the request sent upstream.
    #[serde(default)]
    response_headers: Vec<String>,
}

fn default_realm() -> String {
    "tollgate".into()
}
fn default_user_header() -> String {
    "x-auth-user".into()
}
fn default_key_header() -> String {
    "x-auth-key".into()
}
fn default_check_path() -> String {
    "/".into()
}
fn default_timeout() -> u64 {
    1000
}
fn default_forward() -> Vec<String> {
    vec!["authorization".into(), "cookie".into()]
}

/// A configuration as checked, with what every request needs of it computed once.
struct Checked {
    mode: Mode,
    identity: Vec<String>,
}

enum Mode {
    Basic(BasicConfig),
    ApiKey(ApiKeyConfig),
    Jwt(jwt::JwtConfig),
    External(ExternalConfig),
}

impl Mode {
    fn parse(bytes: &[u8]) -> Result<Mode, String> {
        let raw: RawConfig =
            serde_json::from_slice(bytes).map_err(|e| format!("bad configuration: {e}"))?;
        let n = raw.basic.is_some() as u8
            + raw.api_key.is_some() as u8
            + raw.jwt.is_some() as u8
            + raw.external.is_some() as u8;
        if n != 1 {
            return Err(
                "set exactly one of basic, api_key, jwt, external (one plugin instance per mode)"
                    .into(),
            );
        }
        if let Some(b) = raw.basic {
            for (u, h) in &b.users {
                parse_hash(h).ok_or(format!("user `{u}`: the hash must be sha256:SALT:HEX"))?;
            }
            return Ok(Mode::Basic(b));
        }
        if let Some(k) = raw.api_key {
            if k.keys.is_empty() {
                return Err("api_key.keys is empty".into());
            }
            return Ok(Mode::ApiKey(k));
        }
        if let Some(j) = raw.jwt {
            return Ok(Mode::Jwt(jwt::JwtConfig::build(j)?));
        }
        let e = raw.external.expect("counted above");
        if !e.path.starts_with('/') {
            return Err("external.path must start with /".into());
        }
        Ok(Mode::External(e))
    }

    /// Headers that carry identity to the upstream: never taken from the client.
    /// The headers this mode sets from what it verified (lower-case), computed once.
    fn identity_headers(&self) -> Vec<String> {
        match self {
            Mode::Basic(b) => vec![b.user_header.to_ascii_lowercase()],
            Mode::ApiKey(k) => vec![k.name_header.to_ascii_lowercase()],
            Mode::Jwt(j) => j
                .claims_to_headers
                .values()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            Mode::External(e) => e
                .response_headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
        }
    }
}

/// "sha256:SALT:HEX" → (salt, digest)
fn parse_hash(h: &str) -> Option<(&str, Vec<u8>)> {
    let rest = h.strip_prefix("sha256:")?;
    let (salt, hex) = rest.rsplit_once(':')?;
    let digest = from_hex(hex)?;
    (digest.len() == 32).then_some((salt, digest))
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Compare without leaking where the first difference is.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

struct Root {
    cfg: Option<Rc<Checked>>,
    /// Verified JWTs, shared by this instance's requests.
    jwt_cache: Rc<RefCell<jwt::Cache>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match Mode::parse(&bytes) {
            Ok(m) => {
                self.cfg = Some(Rc::new(Checked {
                    identity: m.identity_headers(),
                    mode: m,
                }));
                true
            }
            Err(e) => {
                proxy_wasm::hostcalls::log(LogLevel::Error, &format!("auth: {e}")).ok();
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Auth {
            cfg: self.cfg.clone()?,
            jwt_cache: self.jwt_cache.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Auth {
    cfg: Rc<Checked>,
    jwt_cache: Rc<RefCell<jwt::Cache>>,
}

impl Context for Auth {
    fn on_http_call_response(&mut self, _token: u32, _nh: usize, body_size: usize, _nt: usize) {
        let Mode::External(e) = &self.cfg.clone().mode else {
            return;
        };
        let status = self
            .get_http_call_response_header(":status")
            .and_then(|s| s.parse::<u16>().ok());
        match status {
            Some(s) if (200..300).contains(&s) => {
                for h in &e.response_headers {
                    if let Some(v) = self.get_http_call_response_header(h) {
                        self.set_http_request_header(h, Some(&v));
                    }
                }
                self.resume_http_request();
            }
            Some(s) => {
                let code = if s == 401 || s == 403 { s } else { 403 };
                let body = self
                    .get_http_call_response_body(0, body_size.min(4096))
                    .unwrap_or_default();
                let www = self.get_http_call_response_header("www-authenticate");
                let mut headers = vec![];
                if let Some(w) = www.as_deref() {
                    headers.push(("www-authenticate", w));
                }
                let body = if body.is_empty() {
                    format!("{code} denied by the auth service\n").into_bytes()
                } else {
                    body
                };
                self.send_http_response(code as u32, headers, Some(&body));
            }
            None => self.deny(503, "the auth service did not answer", None),
        }
    }
}

impl Auth {
    fn deny(&self, status: u32, why: &str, www: Option<String>) {
        let body = format!("{status} {why}\n");
        let mut headers = vec![("content-type", "text/plain; charset=utf-8")];
        if let Some(w) = www.as_deref() {
            headers.push(("www-authenticate", w));
        }
        self.send_http_response(status, headers, Some(body.as_bytes()));
    }

    fn now(&self) -> u64 {
        self.get_current_time()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    fn basic(&self, b: &BasicConfig) -> Action {
        let www = format!("Basic realm=\"{}\"", b.realm);
        let Some(h) = self.get_http_request_header("authorization") else {
            self.deny(401, "authentication required", Some(www));
            return Action::Pause;
        };
        let creds = h
            .strip_prefix("Basic ")
            .or_else(|| h.strip_prefix("basic "))
            .and_then(|c| {
                base64::engine::general_purpose::STANDARD
                    .decode(c.trim())
                    .ok()
            })
            .and_then(|c| String::from_utf8(c).ok());
        let ok_user = creds.as_deref().and_then(|c| {
            let (user, pass) = c.split_once(':')?;
            let (salt, want) = parse_hash(b.users.get(user)?)?;
            let got = Sha256::new()
                .chain_update(salt)
                .chain_update(pass)
                .finalize();
            ct_eq(&got, &want).then(|| user.to_string())
        });
        match ok_user {
            Some(user) => {
                self.set_http_request_header(&b.user_header, Some(&user));
                self.set_http_request_header("authorization", None);
                Action::Continue
            }
            None => {
                self.deny(401, "wrong user name or password", Some(www));
                Action::Pause
            }
        }
    }

    fn api_key(&self, k: &ApiKeyConfig) -> Action {
        let header = k.header.as_deref().unwrap_or("x-api-key");
        let mut key = self.get_http_request_header(header);
        if key.is_none() {
            if let Some(q) = &k.query {
                let path = self.get_http_request_header(":path").unwrap_or_default();
                key = path.split_once('?').and_then(|(_, qs)| {
                    qs.split('&').find_map(|kv| {
                        let (n, v) = kv.split_once('=')?;
                        (n == q).then(|| v.to_string())
                    })
                });
            }
        }
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            self.deny(401, "API key required", None);
            return Action::Pause;
        };
        let hashed = Sha256::digest(key.as_bytes());
        let found = k
            .keys
            .iter()
            .find(|(_, want)| match want.strip_prefix("sha256:") {
                Some(hex) => from_hex(hex).is_some_and(|w| ct_eq(&hashed, &w)),
                None => ct_eq(key.as_bytes(), want.as_bytes()),
            });
        match found {
            Some((name, _)) => {
                self.set_http_request_header(&k.name_header, Some(name));
                self.set_http_request_header(header, None);
                Action::Continue
            }
            None => {
                self.deny(401, "invalid API key", None);
                Action::Pause
            }
        }
    }

    fn jwt(&self, j: &jwt::JwtConfig) -> Action {
        let www = || format!("Bearer realm=\"{}\"", j.realm);
        // bytes: a cached token is compared as sent, not checked for UTF-8 on every request
        let header = self.get_http_request_header_bytes(&j.header);
        let token = header.as_deref().and_then(|h| {
            let h = h.trim_ascii();
            h.strip_prefix(b"Bearer ")
                .or_else(|| h.strip_prefix(b"bearer "))
                .map(<[u8]>::trim_ascii)
        });
        let Some(token) = token else {
            self.deny(401, "bearer token required", Some(www()));
            return Action::Pause;
        };
        let verdict = j.verify(token, self.now(), &mut self.jwt_cache.borrow_mut());
        match verdict {
            Ok(claims) => {
                // (the client's identity headers are gone already)
                for (claim, header) in &j.claims_to_headers {
                    match claims.get(claim) {
                        Some(serde_json::Value::String(s)) => {
                            self.set_http_request_header(header, Some(s))
                        }
                        Some(other) => {
                            self.set_http_request_header(header, Some(&other.to_string()))
                        }
                        None => {}
                    }
                }
                Action::Continue
            }
            Err(why) => {
                let www = www();
                let www = format!("{www}, error=\"invalid_token\", error_description=\"{why}\"");
                self.deny(401, &format!("invalid token: {why}"), Some(www));
                Action::Pause
            }
        }
    }

    fn external(&self, e: &ExternalConfig) -> Action {
        let method = self.get_http_request_header(":method").unwrap_or_default();
        let uri = self.get_http_request_header(":path").unwrap_or_default();
        let host = self
            .get_http_request_header(":authority")
            .unwrap_or_default();
        let mut forwarded: Vec<(String, String)> = e
            .request_headers
            .iter()
            .filter_map(|h| Some((h.to_ascii_lowercase(), self.get_http_request_header(h)?)))
            .collect();
        forwarded.push(("x-forwarded-method".into(), method));
        forwarded.push(("x-forwarded-uri".into(), uri));
        forwarded.push(("x-forwarded-host".into(), host));
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", "GET"),
            (":path", e.path.as_str()),
            (":authority", e.pool.as_str()),
        ];
        headers.extend(forwarded.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        match self.dispatch_http_call(
            &e.pool,
            headers,
            None,
            vec![],
            Duration::from_millis(e.timeout_ms),
        ) {
            Ok(_) => Action::Pause,
            Err(s) => {
                proxy_wasm::hostcalls::log(
                    LogLevel::Error,
                    &format!("auth: callout to pool {} failed: {s:?}", e.pool),
                )
                .ok();
                self.deny(503, "the auth service cannot be called", None);
                Action::Pause
            }
        }
    }
}

impl HttpContext for Auth {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let cfg = self.cfg.clone();
        // the identity headers a client may not send: removed before anything can fail, so
        // even a plugin fault under fail_open never forwards a forged one
        for h in &cfg.identity {
            self.set_http_request_header(h, None);
        }
        match &cfg.mode {
            Mode::Basic(b) => self.basic(b),
            Mode::ApiKey(k) => self.api_key(k),
            Mode::Jwt(j) => self.jwt(j),
            Mode::External(e) => self.external(e),
        }
    }
}
