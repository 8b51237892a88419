//! A lock on a Consul KV key held by a session: the failover peer's fencing
//! (`failover.consul_lock`: a node may be MASTER only while its Consul session holds the
//! lock key), ACME's issuer lock and the session ticket keys' rotation lock. The session
//! has a TTL (renewed every fifth of it), no lock delay and the `release` behaviour, so a
//! dead holder's lock frees itself after the TTL and a node that loses its session, or
//! cannot renew it for three quarters of the TTL, gives the address up (before Consul,
//! which never expires a session sooner than its TTL, can hand the lock to the peer). A
//! network split between the peers alone cannot make two masters while both still reach
//! Consul.

use super::Consul;
use crate::config::{ConsulLock, ConsulSettings};
use std::time::Duration;

/// Send, and read the whole answer: (status, body). Only a transport failure is an error
/// here; each caller decides what a status means.
async fn call(
    rb: reqwest::RequestBuilder,
    what: &str,
) -> Result<(reqwest::StatusCode, String), String> {
    let r = rb.send().await.map_err(|e| format!("Consul {what}: {e}"))?;
    let status = r.status();
    let text = r.text().await.map_err(|e| format!("Consul {what}: {e}"))?;
    Ok((status, text))
}

pub struct Lock {
    /// The agent (the token is read at every request: a rotated `token_file`).
    consul: Consul,
    dc: Option<String>,
    key: String,
    ttl: Duration,
    node: String,
    session: Option<String>,
    /// When Consul last confirmed the session (created, renewed): it cannot expire sooner
    /// than the TTL after that.
    confirmed: Option<std::time::Instant>,
}

impl Lock {
    pub fn new(consul: &ConsulSettings, l: &ConsulLock, node: &str) -> Result<Lock, String> {
        Ok(Lock {
            consul: Consul::new(consul)?,
            dc: consul.datacenter.clone(),
            key: l.key.clone(),
            ttl: l.ttl,
            node: node.to_string(),
            session: None,
            confirmed: None,
        })
    }

    /// How often the session must be renewed.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 5
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .consul
            .request(method, path, Duration::from_secs(3).min(self.ttl / 5));
        if let Some(dc) = &self.dc {
            r = r.query(&[("dc", dc)]);
        }
        r
    }

    async fn session(&mut self) -> Result<String, String> {
        if let Some(s) = &self.session {
            return Ok(s.clone());
        }
        let body = serde_json::json!({
            "Name": format!("tollgate-failover-{}", self.node),
            "TTL": format!("{}s", self.ttl.as_secs()),
            "LockDelay": "0s",
            "Behavior": "release",
        });
        let (status, text) = call(
            self.req(reqwest::Method::PUT, "/v1/session/create")
                .json(&body),
            "session create",
        )
        .await?;
        if !status.is_success() {
            return Err(format!("Consul session create: HTTP {status}: {text}"));
        }
        #[derive(serde::Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        let c: Created =
            serde_json::from_str(&text).map_err(|e| format!("Consul session create: {e}"))?;
        self.session = Some(c.id.clone());
        self.confirmed = Some(std::time::Instant::now());
        Ok(c.id)
    }

    /// Try to take the lock; Ok(false) when another session holds it.
    pub async fn acquire(&mut self) -> Result<bool, String> {
        let id = self.session().await?;
        let (status, text) = call(
            self.req(reqwest::Method::PUT, &format!("/v1/kv/{}", self.key))
                .query(&[("acquire", &id)])
                .body(self.node.clone()),
            "lock acquire",
        )
        .await?;
        if !status.is_success() {
            if text.contains("invalid session") || text.contains("Invalid session") {
                self.session = None;
            }
            return Err(format!(
                "Consul lock acquire: HTTP {status}: {}",
                text.trim()
            ));
        }
        Ok(text.trim() == "true")
    }

    /// Renew the session; Ok(false) when Consul no longer knows it (the lock is gone).
    pub async fn renew(&mut self) -> Result<bool, String> {
        let Some(id) = self.session.clone() else {
            return Ok(false);
        };
        let (status, _) = call(
            self.req(reqwest::Method::PUT, &format!("/v1/session/renew/{id}")),
            "session renew",
        )
        .await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            self.session = None;
            return Ok(false);
        }
        if !status.is_success() {
            return Err(format!("Consul session renew: HTTP {status}"));
        }
        self.confirmed = Some(std::time::Instant::now());
        Ok(true)
    }

    /// Whether Consul may have expired the session without our hearing of it: no renewal
    /// has been confirmed for three quarters of the TTL. A MASTER cut off from Consul must
    /// give the address up before its lock can pass to the peer.
    pub fn may_have_expired(&self) -> bool {
        self.confirmed
            .is_none_or(|t| t.elapsed() >= self.ttl.mul_f64(0.75))
    }

    /// Whether our session is the lock's holder now.
    pub async fn held(&self) -> Result<bool, String> {
        let Some(id) = &self.session else {
            return Ok(false);
        };
        let (status, text) = call(
            self.req(reqwest::Method::GET, &format!("/v1/kv/{}", self.key)),
            "lock check",
        )
        .await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(false);
        }
        if !status.is_success() {
            return Err(format!("Consul lock check: HTTP {status}"));
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            #[serde(rename = "Session", default)]
            session: Option<String>,
        }
        let e: Vec<Entry> =
            serde_json::from_str(&text).map_err(|e| format!("Consul lock check: {e}"))?;
        Ok(e.first().and_then(|e| e.session.as_deref()) == Some(id.as_str()))
    }

    /// Let the lock go (the session stays, for the next acquire).
    pub async fn release(&mut self) -> Result<(), String> {
        let Some(id) = self.session.clone() else {
            return Ok(());
        };
        let (status, _) = call(
            self.req(reqwest::Method::PUT, &format!("/v1/kv/{}", self.key))
                .query(&[("release", &id)]),
            "lock release",
        )
        .await?;
        if !status.is_success() {
            return Err(format!("Consul lock release: HTTP {status}"));
        }
        Ok(())
    }

    /// On shutdown: destroy the session, which frees the lock at once.
    pub async fn destroy(&mut self) {
        if let Some(id) = self.session.take() {
            let _ = self
                .req(reqwest::Method::PUT, &format!("/v1/session/destroy/{id}"))
                .send()
                .await;
        }
    }
}
