//! The key/value store: one blocking recursive read of a prefix (`kv_entries`), and single
//! keys read, written and deleted through [`Consul`].

use super::client::{client, consul_get, token};
use crate::config::ConsulSettings;
use serde::Deserialize;
use std::time::Duration;

/// The entries under KV `prefix` (keys relative to it, values decoded), from one blocking
/// recursive read.
pub(crate) async fn kv_entries(
    http: &reqwest::Client,
    s: &ConsulSettings,
    prefix: &str,
    index: u64,
) -> Result<(u64, Vec<(String, Vec<u8>)>), String> {
    #[derive(Deserialize)]
    struct Entry {
        #[serde(rename = "Key")]
        key: String,
        #[serde(rename = "Value")]
        value: Option<String>,
    }
    let path = format!("/v1/kv/{prefix}/");
    let what = format!("the KV prefix {prefix}/");
    let params = [("recurse", String::new())];
    let (next, body) = consul_get(http, s, &path, &what, None, &params, index).await?;
    let entries: Vec<Entry> =
        serde_json::from_slice(&body).map_err(|e| format!("{path}: not a KV answer: {e}"))?;
    let skip = prefix.len() + 1;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        use base64::Engine;
        let value = base64::engine::general_purpose::STANDARD
            .decode(e.value.unwrap_or_default())
            .map_err(|err| format!("{}: not base64: {err}", e.key))?;
        if let Some(k) = e.key.get(skip..).filter(|k| !k.is_empty()) {
            out.push((k.to_string(), value));
        }
    }
    Ok((next, out))
}

/// One Consul agent: the HTTP client and the settings it was made with. Every request
/// carries the token read from the settings at that moment (`consul.token`, or the file
/// `consul.token_file`, re-read each time).
#[derive(Clone)]
pub struct Consul {
    http: reqwest::Client,
    settings: ConsulSettings,
}

impl Consul {
    pub fn new(settings: &ConsulSettings) -> Result<Consul, String> {
        Ok(Consul {
            http: client(settings)?,
            settings: settings.clone(),
        })
    }

    /// The same agent with another blocking-query `wait`.
    pub fn with_wait(&self, wait: Duration) -> Consul {
        Consul {
            http: self.http.clone(),
            settings: ConsulSettings {
                wait,
                ..self.settings.clone()
            },
        }
    }

    pub fn settings(&self) -> &ConsulSettings {
        &self.settings
    }

    /// A request to `path` (`/v1/…`) on the agent, with the token and `timeout`.
    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        timeout: Duration,
    ) -> reqwest::RequestBuilder {
        let base = self.settings.address.trim_end_matches('/');
        let mut r = self
            .http
            .request(method, format!("{base}{path}"))
            .timeout(timeout);
        if let Some(t) = token(&self.settings) {
            r = r.header("X-Consul-Token", t);
        }
        r
    }

    /// Every key under `prefix` (relative to it) with its value, from one blocking read at
    /// `index` (the settings' `wait`).
    pub async fn kv_list(
        &self,
        prefix: &str,
        index: u64,
    ) -> Result<(u64, Vec<(String, Vec<u8>)>), String> {
        kv_entries(&self.http, &self.settings, prefix, index).await
    }

    /// The value at `key` (`None`: not there).
    pub async fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        let r = self
            .request(reqwest::Method::GET, &format!("/v1/kv/{key}"), KV_TIMEOUT)
            .query(&[("raw", "true")])
            .send()
            .await
            .map_err(|e| format!("Consul KV get {key}: {e}"))?;
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !r.status().is_success() {
            return Err(format!("Consul KV get {key}: HTTP {}", r.status()));
        }
        let body = r
            .bytes()
            .await
            .map_err(|e| format!("Consul KV get {key}: {e}"))?;
        Ok(Some(body.to_vec()))
    }

    pub async fn kv_put(&self, key: &str, value: Vec<u8>) -> Result<(), String> {
        let r = self
            .request(reqwest::Method::PUT, &format!("/v1/kv/{key}"), KV_TIMEOUT)
            .body(value)
            .send()
            .await
            .map_err(|e| format!("Consul KV put {key}: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("Consul KV put {key}: HTTP {}", r.status()));
        }
        Ok(())
    }

    /// Delete `key` (best effort: a failure leaves it for the next attempt).
    pub async fn kv_delete(&self, key: &str) {
        let _ = self
            .request(
                reqwest::Method::DELETE,
                &format!("/v1/kv/{key}"),
                KV_TIMEOUT,
            )
            .send()
            .await;
    }
}

/// How long a single-key request may take.
const KV_TIMEOUT: Duration = Duration::from_secs(10);
