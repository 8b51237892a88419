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

    /// GET `/v1/kv/<key>` with `query`: the answer (`None`: not there), or why not.
    async fn get_key(
        &self,
        key: &str,
        query: &[(&str, &str)],
    ) -> Result<Option<reqwest::Response>, String> {
        let r = self
            .request(reqwest::Method::GET, &format!("/v1/kv/{key}"), KV_TIMEOUT)
            .query(query)
            .send()
            .await
            .map_err(|e| format!("Consul KV get {key}: {e}"))?;
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !r.status().is_success() {
            return Err(format!("Consul KV get {key}: HTTP {}", r.status()));
        }
        Ok(Some(r))
    }

    /// The value at `key` (`None`: not there).
    pub async fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        let Some(r) = self.get_key(key, &[("raw", "true")]).await? else {
            return Ok(None);
        };
        let body = r
            .bytes()
            .await
            .map_err(|e| format!("Consul KV get {key}: {e}"))?;
        Ok(Some(body.to_vec()))
    }

    /// PUT `value` at `key` with `query`: Consul's answer, `true` or `false`.
    async fn put_key(
        &self,
        key: &str,
        value: Vec<u8>,
        query: &[(&str, String)],
    ) -> Result<bool, String> {
        let r = self
            .request(reqwest::Method::PUT, &format!("/v1/kv/{key}"), KV_TIMEOUT)
            .query(query)
            .body(value)
            .send()
            .await
            .map_err(|e| format!("Consul KV put {key}: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("Consul KV put {key}: HTTP {}", r.status()));
        }
        let text = r
            .text()
            .await
            .map_err(|e| format!("Consul KV put {key}: {e}"))?;
        Ok(text.trim() == "true")
    }

    pub async fn kv_put(&self, key: &str, value: Vec<u8>) -> Result<(), String> {
        self.put_key(key, value, &[]).await.map(|_| ())
    }

    /// The value at `key` with its `ModifyIndex` (`None`: not there), for a
    /// check-and-set write ([`Consul::kv_cas`]).
    pub async fn kv_get_indexed(&self, key: &str) -> Result<Option<(u64, Vec<u8>)>, String> {
        #[derive(Deserialize)]
        struct Entry {
            #[serde(rename = "ModifyIndex")]
            index: u64,
            #[serde(rename = "Value")]
            value: Option<String>,
        }
        let Some(r) = self.get_key(key, &[]).await? else {
            return Ok(None);
        };
        let entries: Vec<Entry> = r
            .json()
            .await
            .map_err(|e| format!("Consul KV get {key}: not a KV answer: {e}"))?;
        let Some(e) = entries.into_iter().next() else {
            return Ok(None);
        };
        use base64::Engine;
        let value = base64::engine::general_purpose::STANDARD
            .decode(e.value.unwrap_or_default())
            .map_err(|err| format!("{key}: not base64: {err}"))?;
        Ok(Some((e.index, value)))
    }

    /// Write `key` only if it is still at `index` (its `ModifyIndex`; 0: only if it does
    /// not exist). Ok(false): someone wrote it in between.
    pub async fn kv_cas(&self, key: &str, value: Vec<u8>, index: u64) -> Result<bool, String> {
        self.put_key(key, value, &[("cas", index.to_string())])
            .await
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
