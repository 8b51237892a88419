//! The fleet's shared ACME state in Consul KV (`[acme] consul = true`).

use super::Backoff;
use crate::tls::Challenges;
use base64::Engine;
use std::path::Path;
use std::time::Duration;

/// The fleet's shared ACME state in Consul KV: everything sealed (AES-256-GCM, key from
/// `encryption_key_file`, the prefix as associated data): the account, certificates and
/// keys, the fleet's backoff per name set, and the pending challenge answers (HTTP-01 key
/// authorizations, TLS-ALPN-01 digests), so that only an instance holding the key can make
/// the fleet answer a CA: a value another KV writer puts there is refused. Beside them, the
/// issuer lock.
pub struct Kv {
    /// The agent, with the 60 s wait the follower's blocking reads use.
    consul: crate::consul::Consul,
    prefix: String,
    sealer: crate::consul::Sealer,
}

impl Kv {
    pub fn new(
        consul: &crate::config::ConsulSettings,
        prefix: &str,
        key_file: &Path,
    ) -> Result<Kv, String> {
        Ok(Kv {
            consul: crate::consul::Consul::new(consul)?.with_wait(Duration::from_secs(60)),
            prefix: prefix.to_string(),
            // the prefix as associated data, as ever (values already in KV stay readable)
            sealer: crate::consul::Sealer::new(key_file, prefix)?,
        })
    }

    fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, String> {
        self.sealer.seal(plain)
    }

    pub(super) fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, String> {
        self.sealer.open(sealed)
    }

    fn path(&self, key: &str) -> String {
        format!("{}/{key}", self.prefix)
    }

    pub async fn put_sealed(&self, key: &str, plain: &[u8]) -> Result<(), String> {
        self.consul.kv_put(&self.path(key), self.seal(plain)?).await
    }

    /// One sealed value, opened (`None`: not there).
    pub async fn get_sealed(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        match self.consul.kv_get(&self.path(key)).await? {
            Some(sealed) => self.open(&sealed).map(Some),
            None => Ok(None),
        }
    }

    pub(super) async fn delete(&self, key: &str) {
        self.consul.kv_delete(&self.path(key)).await;
    }

    /// Share a pending challenge with the fleet (sealed).
    pub async fn put_challenge(&self, c: &SharedChallenge) -> Result<(), String> {
        let plain = serde_json::to_vec(c).map_err(|e| e.to_string())?;
        self.put_sealed(&c.kv_key(), &plain).await
    }

    /// A shared challenge as read from `key`: opened, and only if it was sealed with this
    /// fleet's key for that very key (an entry copied under another token or name is
    /// refused).
    pub fn open_challenge(&self, key: &str, value: &[u8]) -> Result<SharedChallenge, String> {
        let plain = self.open(value)?;
        let c: SharedChallenge =
            serde_json::from_slice(&plain).map_err(|e| format!("not a shared challenge: {e}"))?;
        if c.kv_key() != key {
            return Err(format!("sealed for {}, found under {key}", c.kv_key()));
        }
        Ok(c)
    }

    /// A new issuer's clean-up: delete the shared challenges whose order's deadline has
    /// passed, and any this fleet did not seal. Those of an order still under way stay.
    pub async fn delete_stale_challenges(&self, now_unix: i64) {
        let Ok((_, entries)) = self.list(0).await else {
            return;
        };
        for (key, value) in entries {
            if !(key.starts_with("challenges/") || key.starts_with("alpn/")) {
                continue;
            }
            let live = self
                .open_challenge(&key, &value)
                .is_ok_and(|c| now_unix < c.deadline);
            if !live {
                self.delete(&key).await;
            }
        }
    }

    /// The fleet's backoff for the name set stored as `stem`.
    pub async fn backoff(&self, stem: &str) -> Result<Option<Backoff>, String> {
        match self.get_sealed(&format!("backoff/{stem}")).await {
            Ok(Some(plain)) => serde_json::from_slice(&plain)
                .map(Some)
                .map_err(|e| format!("backoff/{stem}: {e}")),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn set_backoff(&self, stem: &str, b: Backoff) -> Result<(), String> {
        let plain = serde_json::to_vec(&b).map_err(|e| e.to_string())?;
        self.put_sealed(&format!("backoff/{stem}"), &plain).await
    }

    pub async fn clear_backoff(&self, stem: &str) {
        self.delete(&format!("backoff/{stem}")).await;
    }

    /// Everything under the prefix (keys relative to it), from one blocking read at `index`.
    pub async fn list(&self, index: u64) -> Result<(u64, Vec<(String, Vec<u8>)>), String> {
        self.consul.kv_list(&self.prefix, index).await
    }
}

/// A pending challenge as the fleet shares it, sealed: the name its order validates, the
/// HTTP-01 token (none for TLS-ALPN-01), the answer (the key authorization, or the base64
/// SHA-256 of it from which every instance makes its own TLS-ALPN-01 certificate) and the
/// deadline after which nobody answers it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedChallenge {
    pub name: String,
    pub token: Option<String>,
    pub answer: String,
    pub deadline: i64,
}

impl SharedChallenge {
    /// `challenges/<token>` for HTTP-01, `alpn/<name>` for TLS-ALPN-01.
    pub fn kv_key(&self) -> String {
        match &self.token {
            Some(t) => format!("challenges/{t}"),
            None => format!("alpn/{}", self.name.to_ascii_lowercase()),
        }
    }

    /// Answer it from this instance.
    pub fn answer_with(&self, challenges: &Challenges) -> Result<(), String> {
        match &self.token {
            Some(t) => {
                challenges.set(t, &self.name, &self.answer, self.deadline);
                Ok(())
            }
            None => {
                let digest = super::order::b64()
                    .decode(self.answer.trim())
                    .map_err(|e| e.to_string())?;
                challenges.set_alpn(&self.name, &digest, self.deadline)
            }
        }
    }

    pub fn withdraw(&self, challenges: &Challenges) {
        match &self.token {
            Some(t) => challenges.remove(t),
            None => challenges.remove_alpn(&self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(dir: &Path, secret: &str) -> Kv {
        let key = dir.join(format!("{secret}.key"));
        std::fs::write(&key, secret).unwrap();
        let cfg = crate::config::Config::parse(
            Path::new("t.toml"),
            "[[listener]]\naddress = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        Kv::new(&cfg.consul, "tollgate/acme", &key).unwrap()
    }

    #[test]
    fn only_challenges_sealed_by_the_fleet_for_their_key_are_opened() {
        let dir = tempfile::tempdir().unwrap();
        let ours = kv(dir.path(), "0123456789abcdef0123");
        let theirs = kv(dir.path(), "fedcba9876543210fedc");
        let c = SharedChallenge {
            name: "a.test".into(),
            token: Some("tok".into()),
            answer: "tok.thumb".into(),
            deadline: 100,
        };
        let sealed = ours.seal(&serde_json::to_vec(&c).unwrap()).unwrap();
        assert_eq!(ours.open_challenge("challenges/tok", &sealed), Ok(c));
        // moved to another token's key, sealed with another key, or not sealed at all
        assert!(ours.open_challenge("challenges/other", &sealed).is_err());
        assert!(theirs.open_challenge("challenges/tok", &sealed).is_err());
        assert!(ours
            .open_challenge("challenges/tok", b"tok.thumbprint-in-the-clear")
            .is_err());
    }

    #[test]
    fn the_backoff_doubles_from_a_minute_to_six_hours() {
        let b = Backoff::after_failure(None, 1000);
        assert_eq!(
            b,
            Backoff {
                failures: 1,
                retry_at: 1060
            }
        );
        let b = Backoff::after_failure(Some(b), 2000);
        assert_eq!(b.retry_at, 2120);
        let mut b = b;
        for _ in 0..20 {
            b = Backoff::after_failure(Some(b), 0);
        }
        assert_eq!(b.retry_at, 6 * 3600);
    }
}
