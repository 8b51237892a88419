//! Session ticket keys a fleet shares through Consul KV (`tls.session_ticket_consul`), as
//! Caddy shares its keys through its cluster storage: one value, `<prefix>/keys`, sealed
//! with the fleet's encryption key (AES-256-GCM, [`crate::consul::Sealer`]), holds the key
//! that seals new tickets and the one before it. One instance at a time, holding the lock
//! `<prefix>/lock` (a Consul session, 15 s TTL), puts a new key first every period (the
//! ticket lifetime) and drops the oldest, so a ticket opens for one more period after its
//! key stopped sealing and not after; every instance follows the value with a blocking
//! query and hands the keys to its [`Ticketer`]. Writes are check-and-set on the value's
//! index, so a rotation asked through the admin API and the holder's scheduled one never
//! overwrite each other.
//!
//! Until the fleet's keys are read (Consul down at start), an instance seals with a key of
//! its own: its tickets resume on it alone, and a full handshake elsewhere, nothing worse.
//! A value this fleet did not seal (another encryption key, or a stranger with KV write
//! access) is refused and logged; the holder replaces it at its next rotation. Each rotation
//! is numbered, and an instance never takes a set older than the one it holds: a sealed
//! value recorded earlier and written back cannot bring a retired key back.

use super::tickets::{random_key, Ticketer};
use crate::config::ConsulSettings;
use crate::consul::{Consul, Lock, Sealer};
use base64::Engine;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Keys kept: the one that seals and the one before it.
const KEPT: usize = 2;

/// What `<prefix>/keys` holds (sealed): the keys, newest first, and the rotation's number.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeySet {
    pub keys: Vec<SharedKey>,
    /// One more at each rotation: an instance never goes back to a set older than one it
    /// took (a sealed value replayed by someone with write access to the prefix, to bring
    /// back a key that leaked, is refused).
    #[serde(default)]
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedKey {
    /// 80 random bytes, base64.
    pub key: String,
    /// When it was made (Unix seconds): it seals until `created + period`.
    pub created: u64,
}

impl KeySet {
    /// Whether the sealing key has served its period (or there is none, or it claims a
    /// time more than a period ahead: a clock that was wrong).
    pub fn due(set: Option<&KeySet>, now: u64, period: u64) -> bool {
        set.and_then(|s| s.keys.first())
            .is_none_or(|k| now >= k.created.saturating_add(period) || k.created > now + period)
    }

    /// `key` first, made at `now`, and the newest of the keys before it; numbered after
    /// `set`.
    pub fn rotated(set: Option<&KeySet>, now: u64, key: &[u8]) -> KeySet {
        let mut keys = vec![SharedKey {
            key: base64::engine::general_purpose::STANDARD.encode(key),
            created: now,
        }];
        if let Some(s) = set {
            keys.extend(s.keys.iter().take(KEPT - 1).cloned());
        }
        let generation = set.map_or(0, |s| s.generation) + 1;
        KeySet { keys, generation }
    }

    /// The keys' bytes, each checked as a key file is.
    pub fn secrets(&self) -> Result<Vec<Vec<u8>>, String> {
        if self.keys.is_empty() || self.keys.len() > 8 {
            return Err(format!("{} keys", self.keys.len()));
        }
        self.keys
            .iter()
            .map(|k| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(&k.key)
                    .map_err(|e| format!("a key that is not base64: {e}"))?;
                match crate::config::ticket_key_problem(&bytes) {
                    Some(why) => Err(why),
                    None => Ok(bytes),
                }
            })
            .collect()
    }
}

/// What `/status` and `/metrics` show of the fleet's keys on this instance.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// When the fleet's keys were last taken from KV (Unix seconds); none: the process's
    /// own key seals.
    followed_at: Option<u64>,
    /// The key set in the ticketer (none: the process's own key).
    taken: Option<KeySet>,
    /// Whether this instance holds the rotation lock.
    rotating: bool,
    /// The last problem (reading, opening, rotating), cleared by success.
    problem: Option<String>,
}

impl Seen {
    /// When the key that seals now was made (from the set taken).
    fn sealing_since(&self) -> Option<u64> {
        self.taken.as_ref().map(|t| t.keys[0].created)
    }
}

/// The fleet's ticket keys on this instance: the ticketer its listeners use, and the Consul
/// side that feeds it.
pub struct FleetTickets {
    /// The agent, with the 60 s wait the blocking reads use.
    consul: Consul,
    settings: ConsulSettings,
    prefix: String,
    sealer: Sealer,
    period: Duration,
    ticketer: Arc<Ticketer>,
    seen: Mutex<Seen>,
    rotations: AtomicU64,
}

impl std::fmt::Debug for FleetTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetTickets")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl FleetTickets {
    /// For `prefix` on the agent of `settings`, sealed with the secret in `key_file`; keys
    /// rotated every `period` (the tickets' lifetime). Seals with a key of its own until
    /// the fleet's are read.
    pub fn new(
        settings: &ConsulSettings,
        prefix: &str,
        key_file: &std::path::Path,
        period: Duration,
    ) -> Result<FleetTickets, String> {
        Ok(FleetTickets {
            consul: Consul::new(settings)?.with_wait(Duration::from_secs(60)),
            settings: settings.clone(),
            prefix: prefix.to_string(),
            sealer: Sealer::new(key_file, &format!("{prefix}/keys"))?,
            period,
            ticketer: Arc::new(Ticketer::own(period)?),
            seen: Mutex::new(Seen::default()),
            rotations: AtomicU64::new(0),
        })
    }

    /// The ticketer the listeners use (its keys change as the fleet's do).
    pub fn ticketer(&self) -> Arc<Ticketer> {
        self.ticketer.clone()
    }

    fn key(&self) -> String {
        format!("{}/keys", self.prefix)
    }

    fn note<T>(&self, f: impl FnOnce(&mut Seen) -> T) -> T {
        f(&mut self.seen.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The key set in a value read from KV, if this fleet sealed it.
    fn open(&self, sealed: &[u8]) -> Result<KeySet, String> {
        let plain = self.sealer.open(sealed)?;
        let set: KeySet =
            serde_json::from_slice(&plain).map_err(|e| format!("not a ticket key set: {e}"))?;
        set.secrets()?;
        Ok(set)
    }

    /// Take a key set read from KV into the ticketer.
    fn take(&self, set: &KeySet) -> Result<(), String> {
        let taken = self.note(|s| s.taken.as_ref().map_or(0, |t| t.generation));
        if set.generation < taken {
            return Err(format!(
                "an older key set (rotation {}; this instance has taken rotation {taken}): a replayed value?",
                set.generation
            ));
        }
        self.ticketer.replace_keys(&set.secrets()?)?;
        self.note(|s| {
            s.followed_at = Some(crate::clock::unix_secs());
            s.taken = Some(set.clone());
            s.problem = None;
        });
        Ok(())
    }

    /// Every instance: follow `<prefix>/keys` with blocking reads for the process's life.
    pub async fn follow(self: Arc<Self>) {
        let mut index = 0;
        // a value refused already (logged once)
        let mut refused: Option<Vec<u8>> = None;
        loop {
            let (next, entries) = match self.consul.kv_list(&self.prefix, index).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the fleet's session ticket keys; retrying");
                    self.note(|s| s.problem = Some(e));
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            };
            index = if next < index { 0 } else { next };
            let Some((_, value)) = entries.into_iter().find(|(k, _)| k == "keys") else {
                continue;
            };
            if refused.as_ref() == Some(&value) {
                continue;
            }
            match self.open(&value).and_then(|set| self.take(&set)) {
                Ok(()) => refused = None,
                Err(e) => {
                    tracing::warn!(key = %self.key(), error = %e, "session ticket keys in Consul not used (not sealed by this fleet, or older than those in use)");
                    self.note(|s| s.problem = Some(format!("{}: {e}", self.key())));
                    refused = Some(value);
                }
            }
        }
    }

    /// Rotate the fleet's keys if the sealing key has served its period (`force`: now).
    /// Check-and-set: a concurrent writer makes this read again (3 times at most).
    /// Ok(true) when this call wrote a new key set.
    pub async fn rotate(&self, force: bool) -> Result<bool, String> {
        for _ in 0..3 {
            let current = self.consul.kv_get_indexed(&self.key()).await?;
            let (index, set) = match &current {
                None => (0, None),
                Some((i, v)) => match self.open(v) {
                    Ok(set) => (*i, Some(set)),
                    Err(e) => {
                        tracing::warn!(key = %self.key(), error = %e, "replacing session ticket keys this fleet did not seal");
                        (*i, None)
                    }
                },
            };
            // rotate from the newer of what KV holds and what this instance took: a set
            // written back from earlier must not bring its keys back as the previous ones
            // (and such a value, or one not sealed by the fleet, is replaced at once)
            let taken = self.note(|s| s.taken.clone());
            let (base, stale) = match (set, taken) {
                (Some(read), Some(t)) if read.generation < t.generation => (Some(t), true),
                (None, Some(t)) => (Some(t), index != 0),
                (read, _) => (read, false),
            };
            let now = crate::clock::unix_secs();
            if !force && !stale && !KeySet::due(base.as_ref(), now, self.period.as_secs()) {
                return Ok(false);
            }
            let next = KeySet::rotated(base.as_ref(), now, &random_key()?);
            let plain = serde_json::to_vec(&next).map_err(|e| e.to_string())?;
            if self
                .consul
                .kv_cas(&self.key(), self.sealer.seal(&plain)?, index)
                .await?
            {
                self.rotations.fetch_add(1, Relaxed);
                tracing::info!(key = %self.key(), "session ticket keys rotated for the fleet");
                return Ok(true);
            }
        }
        Err(format!(
            "{}: written by others three times in a row",
            self.key()
        ))
    }

    /// The holder's loop: take the lock `<prefix>/lock` (renewed every 3 s), and while
    /// holding it rotate the keys when due. Returns when `shutdown` says so, the lock freed.
    pub async fn rotate_on_schedule(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let lock = Lock::new(
            &self.settings,
            &crate::config::ConsulLock {
                key: format!("{}/lock", self.prefix),
                ttl: Duration::from_secs(15),
            },
            &format!("tickets-{}", std::process::id()),
        );
        let mut lock = match lock {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "session ticket key rotation cannot start");
                return;
            }
        };
        let mut tick = tokio::time::interval(lock.renew_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut holding = false;
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    // freed at once, not after its TTL
                    lock.destroy().await;
                    return;
                }
                _ = tick.tick() => {}
            }
            // renewed whether holding or waiting, so a waiting session does not lapse
            let renewed = lock.renew().await;
            if holding && !matches!(renewed, Ok(true)) {
                tracing::warn!(
                    "the session ticket rotation lock's session lapsed; taking the lock again"
                );
            }
            holding = match lock.acquire().await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "the session ticket rotation lock is unavailable");
                    false
                }
            };
            self.note(|s| s.rotating = holding);
            if holding {
                if let Err(e) = self.rotate(false).await {
                    tracing::warn!(error = %e, "cannot rotate the fleet's session ticket keys");
                    self.note(|s| s.problem = Some(e));
                }
            }
        }
    }

    /// `/status`'s view.
    pub fn status(&self) -> serde_json::Value {
        self.note(|s| {
            serde_json::json!({
                "prefix": self.prefix,
                "keys_from_consul": s.followed_at.is_some(),
                "followed_at_unix": s.followed_at,
                "sealing_key": self.ticketer.sealing_key_name(),
                "sealing_since_unix": s.sealing_since(),
                "rotation_period_seconds": self.period.as_secs(),
                "rotating_here": s.rotating,
                "rotations_here": self.rotations.load(Relaxed),
                "problem": s.problem,
            })
        })
    }

    /// Its `/metrics` families.
    pub fn render_metrics(&self, out: &mut String) {
        use crate::metrics::single;
        let age = self
            .note(|s| s.sealing_since())
            .map_or(-1.0, |c| crate::clock::unix_secs().saturating_sub(c) as f64);
        single(
            out,
            "tollgate_tls_ticket_key_age_seconds",
            "gauge",
            "Age of the fleet's session ticket key that seals new tickets (-1: the fleet's keys not read yet, this process's own key seals).",
            age,
        );
        single(
            out,
            "tollgate_tls_ticket_key_rotations_total",
            "counter",
            "Rotations of the fleet's session ticket keys this instance wrote to Consul.",
            self.rotations.load(Relaxed) as f64,
        );
    }
}

/// The background service: every instance follows the fleet's keys, and rotates them while
/// it holds the lock.
pub struct Service(pub Arc<FleetTickets>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Service {
    async fn start(&self, shutdown: pingora::server::ShutdownWatch) {
        let follower = tokio::spawn(self.0.clone().follow());
        self.0.rotate_on_schedule(shutdown).await;
        follower.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_rotate_each_period_and_the_previous_one_is_kept_one_more() {
        let hour = 3600;
        assert!(KeySet::due(None, 1000, hour), "no keys yet");
        let first = KeySet::rotated(None, 1000, &[1; 80]);
        assert_eq!(first.keys.len(), 1);
        assert!(!KeySet::due(Some(&first), 1000 + hour - 1, hour));
        assert!(KeySet::due(Some(&first), 1000 + hour, hour));
        let second = KeySet::rotated(Some(&first), 1000 + hour, &[2; 80]);
        let third = KeySet::rotated(Some(&second), 1000 + 2 * hour, &[3; 80]);
        let bytes = |s: &KeySet| -> Vec<u8> { s.secrets().unwrap().iter().map(|k| k[0]).collect() };
        assert_eq!(bytes(&second), [2, 1], "the previous key still opens");
        assert_eq!(bytes(&third), [3, 2], "and not after one more period");
        assert_eq!(
            (first.generation, second.generation, third.generation),
            (1, 2, 3)
        );
        // a key from a clock far ahead is replaced, not kept for ever
        let ahead = KeySet::rotated(None, 1000 + 10 * hour, &[4; 80]);
        assert!(KeySet::due(Some(&ahead), 1000, hour));
        assert!(!KeySet::due(Some(&ahead), 1000 + 9 * hour + 1, hour));
    }

    #[test]
    fn key_sets_must_hold_keys_of_a_key_files_size() {
        let ok = KeySet::rotated(None, 1, &[7; 48]);
        assert!(ok.secrets().is_ok());
        for bad in [
            KeySet {
                keys: vec![],
                generation: 1,
            },
            KeySet::rotated(None, 1, &[7; 10]),
            KeySet {
                keys: vec![SharedKey {
                    key: "not base64!".into(),
                    created: 1,
                }],
                generation: 1,
            },
        ] {
            assert!(bad.secrets().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_key_sets_this_fleet_sealed_are_taken() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
        std::fs::write(&ours, "0123456789abcdef0123").unwrap();
        std::fs::write(&theirs, "fedcba9876543210fedc").unwrap();
        let cfg = crate::config::Config::parse(
            std::path::Path::new("t.toml"),
            "[[listener]]\naddress = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let hour = Duration::from_secs(3600);
        let a = FleetTickets::new(&cfg.consul, "tollgate/tickets", &ours, hour).unwrap();
        let b = FleetTickets::new(&cfg.consul, "tollgate/tickets", &theirs, hour).unwrap();
        let elsewhere = FleetTickets::new(&cfg.consul, "other/tickets", &ours, hour).unwrap();
        let set = KeySet::rotated(None, crate::clock::unix_secs(), &[9; 80]);
        let sealed = a.sealer.seal(&serde_json::to_vec(&set).unwrap()).unwrap();
        assert_eq!(a.open(&sealed), Ok(set.clone()));
        assert!(b.open(&sealed).is_err(), "another fleet's encryption key");
        assert!(
            elsewhere.open(&sealed).is_err(),
            "sealed for another prefix"
        );
        assert!(
            a.open(&serde_json::to_vec(&set).unwrap()).is_err(),
            "in the clear"
        );
        // taken: the ticketer seals with it, and /status says so
        let before = a.ticketer().sealing_key_name();
        a.take(&set).unwrap();
        assert_eq!(a.ticketer().sealing_key_name(), "09090909");
        assert_ne!(before, "09090909");
        assert_eq!(a.status()["keys_from_consul"], true);
        assert_eq!(b.status()["keys_from_consul"], false);
        // a newer set is taken; the older one, replayed, is not
        let newer = KeySet::rotated(Some(&set), crate::clock::unix_secs(), &[10; 80]);
        a.take(&newer).unwrap();
        let e = a.take(&set).unwrap_err();
        assert!(e.contains("replayed"), "{e}");
        assert_eq!(a.ticketer().sealing_key_name(), "0a0a0a0a");
    }
}
