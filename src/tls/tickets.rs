//! Session tickets whose keys a fleet shares, from key files as nginx
//! (`ssl_session_ticket_key`) and HAProxy (`tls-ticket-keys`) take them: 80 (or 48) random
//! bytes each (`openssl rand 80 > ticket.key`), the first file's key seals new tickets and
//! every file's key opens them, so keys roll by putting a new file first and keeping the
//! last one for a period. A session sealed by one instance resumes on any other holding the
//! same files.
//!
//! Without files or Consul (`tls::fleet_tickets`) the keys are the process's own, made at
//! start and rotated every lifetime ([`Rotation`]).
//!
//! A ticket is `name(16) ‖ issued_at(8, seconds) ‖ nonce(12) ‖ AES-256-GCM(session, tag)`,
//! the name and time authenticated with it. The key is HKDF-SHA256 of the whole file (so no
//! byte of it is used raw, and a 48-byte file works as well as an 80-byte one); the name is
//! the file's first 16 bytes, as in nginx. A ticket older than the lifetime, from the future,
//! under an unknown name, or altered is refused: the client makes a full handshake, nothing
//! worse.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const NAME_LEN: usize = 16;
const HEADER: usize = NAME_LEN + 8 + NONCE_LEN;
/// Seconds a ticket may claim to be from the future (clocks of a fleet differ a little).
const SKEW: u64 = 60;

struct TicketKey {
    name: [u8; NAME_LEN],
    key: LessSafeKey,
}

/// rustls' `ProducesTickets` over keys a fleet shares: from key files (fixed), or from
/// Consul KV (`tls::fleet_tickets` replaces them as the fleet rotates them).
pub struct Ticketer {
    keys: arc_swap::ArcSwap<Vec<std::sync::Arc<TicketKey>>>,
    lifetime: u32,
    rng: SystemRandom,
}

impl std::fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticketer")
            .field("keys", &self.keys.load().len())
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

fn key_of(bytes: &[u8]) -> Result<TicketKey, String> {
    if let Some(why) = crate::config::ticket_key_problem(bytes) {
        return Err(why);
    }
    let mut name = [0u8; NAME_LEN];
    name.copy_from_slice(&bytes[..NAME_LEN]);
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"tollgate session ticket key");
    let prk = salt.extract(bytes);
    let okm = prk
        .expand(&[b"aes-256-gcm"], &AES_256_GCM)
        .map_err(|_| "cannot derive a ticket key".to_string())?;
    Ok(TicketKey {
        name,
        key: LessSafeKey::new(UnboundKey::from(okm)),
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn keys_of(keys: &[Vec<u8>]) -> Result<Vec<std::sync::Arc<TicketKey>>, String> {
    if keys.is_empty() {
        return Err("no ticket key".into());
    }
    keys.iter()
        .map(|k| key_of(k).map(std::sync::Arc::new))
        .collect()
}

/// A new random key (80 bytes, as `openssl rand 80` makes them).
pub fn random_key() -> Result<Vec<u8>, String> {
    let mut k = vec![0u8; 80];
    SystemRandom::new()
        .fill(&mut k)
        .map_err(|_| "no randomness".to_string())?;
    Ok(k)
}

impl Ticketer {
    /// From key files' contents, the sealing key first.
    pub fn from_keys(keys: &[Vec<u8>], lifetime: Duration) -> Result<Ticketer, String> {
        Ok(Ticketer {
            keys: arc_swap::ArcSwap::from_pointee(keys_of(keys)?),
            lifetime: lifetime.as_secs().clamp(1, u64::from(u32::MAX)) as u32,
            rng: SystemRandom::new(),
        })
    }

    /// With one new random key of the process's own.
    pub fn own(lifetime: Duration) -> Result<Ticketer, String> {
        Ticketer::from_keys(&[random_key()?], lifetime)
    }

    /// Seal with `keys[0]` and open with any of `keys` from now on (a handshake under way
    /// finishes with the keys it started with).
    pub fn replace_keys(&self, keys: &[Vec<u8>]) -> Result<(), String> {
        self.keys.store(std::sync::Arc::new(keys_of(keys)?));
        Ok(())
    }

    /// Seal with `new` from now on; the key that sealed until now still opens, the one
    /// before it no longer does (a process's own keys, rotated every lifetime).
    pub fn rotate(&self, new: &[u8]) -> Result<(), String> {
        let new = std::sync::Arc::new(key_of(new)?);
        let current = self.keys.load()[0].clone();
        self.keys.store(std::sync::Arc::new(vec![new, current]));
        Ok(())
    }

    /// The name (first 16 bytes, hex) of the key that seals new tickets: what /status
    /// shows, so an operator can tell which key a fleet's instances use without seeing it.
    pub fn sealing_key_name(&self) -> String {
        self.keys.load()[0].name[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// From key files, the sealing key first (read once: a new key means a restart or a
    /// binary upgrade, as with nginx).
    pub fn from_files(paths: &[impl AsRef<Path>], lifetime: Duration) -> Result<Ticketer, String> {
        let mut keys = Vec::with_capacity(paths.len());
        for p in paths {
            let p = p.as_ref();
            keys.push(std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?);
        }
        Ticketer::from_keys(&keys, lifetime).map_err(|e| format!("ticket keys: {e}"))
    }

    fn seal(&self, plain: &[u8], issued_at: u64) -> Option<Vec<u8>> {
        let keys = self.keys.load();
        let k = &keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(HEADER + plain.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&k.name);
        out.extend_from_slice(&issued_at.to_be_bytes());
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        k.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&out[..NAME_LEN + 8]),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn open(&self, ticket: &[u8], now: u64) -> Option<Vec<u8>> {
        if ticket.len() < HEADER + AES_256_GCM.tag_len() {
            return None;
        }
        let (header, sealed) = ticket.split_at(HEADER);
        let keys = self.keys.load();
        let k = keys.iter().find(|k| k.name[..] == header[..NAME_LEN])?;
        let issued_at = u64::from_be_bytes(header[NAME_LEN..NAME_LEN + 8].try_into().ok()?);
        if issued_at > now + SKEW || now.saturating_sub(issued_at) > u64::from(self.lifetime) {
            return None;
        }
        let nonce = Nonce::try_assume_unique_for_key(&header[NAME_LEN + 8..]).ok()?;
        let mut body = sealed.to_vec();
        let plain = k
            .key
            .open_in_place(nonce, Aad::from(&header[..NAME_LEN + 8]), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(plain, now_secs())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open(cipher, now_secs())
    }
}

/// A process's own keys: one made at start, a new one every lifetime (the previous one
/// opens for one more), as rustls' own ticketer does every 6 hours, but with
/// `tls.session_ticket_lifetime`.
pub struct Rotation(pub std::sync::Arc<Ticketer>, pub Duration);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Rotation {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(self.1) => {}
            }
            match random_key().and_then(|k| self.0.rotate(&k)) {
                Ok(()) => tracing::debug!("session ticket key rotated"),
                Err(e) => tracing::error!(error = %e, "cannot rotate the session ticket key"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> Vec<u8> {
        (0..80u8)
            .map(|i| i.wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn tickets_open_under_any_listed_key_and_nothing_else() {
        let hour = Duration::from_secs(3600);
        let old = Ticketer::from_keys(&[key(1)], hour).unwrap();
        let rolled = Ticketer::from_keys(&[key(2), key(1)], hour).unwrap();
        let other = Ticketer::from_keys(&[key(3)], hour).unwrap();
        let t = old.seal(b"session", 1_000_000).unwrap();
        assert_eq!(
            rolled.open(&t, 1_000_100).as_deref(),
            Some(&b"session"[..]),
            "the previous key still opens"
        );
        assert_eq!(
            other.open(&t, 1_000_100),
            None,
            "another fleet's key does not"
        );
        let t2 = rolled.seal(b"new", 1_000_000).unwrap();
        assert_eq!(
            old.open(&t2, 1_000_000),
            None,
            "the old instance lacks the new key"
        );
        assert_eq!(rolled.open(&t2, 1_000_000).as_deref(), Some(&b"new"[..]));
        // the lifetime and the clock
        assert_eq!(rolled.open(&t, 1_000_000 + 3601), None, "expired");
        assert_eq!(
            rolled.open(&t, 1_000_000 - SKEW - 1),
            None,
            "from the future"
        );
        // altered anywhere, truncated, empty: refused
        for i in [0, NAME_LEN, NAME_LEN + 8, HEADER, t.len() - 1] {
            let mut bad = t.clone();
            bad[i] ^= 1;
            assert_eq!(rolled.open(&bad, 1_000_100), None, "byte {i} altered");
        }
        for n in [0, 10, HEADER, t.len() - 1] {
            assert_eq!(rolled.open(&t[..n], 1_000_100), None, "{n} bytes");
        }
        // two tickets for one session differ (fresh nonces)
        assert_ne!(old.seal(b"s", 1).unwrap(), old.seal(b"s", 1).unwrap());
    }

    #[test]
    fn a_rotated_key_opens_for_one_more_period_and_not_after() {
        let own = Ticketer::from_keys(&[key(1)], Duration::from_secs(3600)).unwrap();
        let t = own.seal(b"session", 1_000_000).unwrap();
        own.rotate(&key(2)).unwrap();
        assert_eq!(own.open(&t, 1_000_100).as_deref(), Some(&b"session"[..]));
        let t2 = own.seal(b"next", 1_000_100).unwrap();
        own.rotate(&key(3)).unwrap();
        assert_eq!(own.open(&t, 1_000_100), None, "two keys ago");
        assert_eq!(own.open(&t2, 1_000_100).as_deref(), Some(&b"next"[..]));
        assert!(own.rotate(&[0; 3]).is_err(), "not a key");
    }

    #[test]
    fn key_files_must_hold_48_or_80_bytes() {
        use crate::config::ticket_key_problem;
        assert!(ticket_key_problem(&[0; 80]).is_none());
        assert!(ticket_key_problem(&[0; 48]).is_none());
        assert!(ticket_key_problem(b"secret\n")
            .unwrap()
            .contains("openssl rand 80"));
        assert!(Ticketer::from_keys(&[], Duration::from_secs(1)).is_err());
        assert!(Ticketer::from_keys(&[vec![0; 10]], Duration::from_secs(1)).is_err());
    }
}
