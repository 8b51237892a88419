//! Heartbeat packets: what a peer says about itself, authenticated with HMAC-SHA256 over the
//! shared secret, with a sequence number and a timestamp against replay. Pure: encoding,
//! verification and the replay window take the clock as an argument.
//!
//! Layout (big endian): `TGHB` | version 1 | priority u8 | role u8 | term u64 | seq u64 |
//! unix ms u64 | name length u8 | name | HMAC-SHA256 of everything before it (32 bytes).
//! The role byte's top bit says the sender is a BACKUP asking the MASTER to yield (preempt).

use super::machine::{Advert, Role};
use ring::hmac;

const MAGIC: &[u8; 4] = b"TGHB";
const VERSION: u8 = 1;
const MAC_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub advert: Advert,
    pub seq: u64,
    pub sent_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("not a tollgate heartbeat")]
    Malformed,
    #[error("bad signature (wrong secret or tampered)")]
    BadMac,
    #[error("replayed or out of order (sequence {seq} not after {last})")]
    Replay { seq: u64, last: u64 },
    #[error("timestamp {skew_ms} ms away from the local clock")]
    Stale { skew_ms: i64 },
    #[error("from ourselves (`{0}`): check the peer address")]
    OwnName(String),
}

fn role_byte(r: Role) -> u8 {
    match r {
        Role::Init => 0,
        Role::Backup => 1,
        Role::Master => 2,
        Role::Fault => 3,
    }
}

fn byte_role(b: u8) -> Option<Role> {
    Some(match b {
        0 => Role::Init,
        1 => Role::Backup,
        2 => Role::Master,
        3 => Role::Fault,
        _ => return None,
    })
}

pub fn encode(hb: &Heartbeat, secret: &[u8]) -> Vec<u8> {
    let name = hb.advert.name.as_bytes();
    let name = &name[..name.len().min(255)];
    let mut out = Vec::with_capacity(4 + 3 + 24 + 1 + name.len() + MAC_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(hb.advert.priority);
    out.push(role_byte(hb.advert.role) | if hb.advert.preempting { 0x80 } else { 0 });
    out.extend_from_slice(&hb.advert.term.to_be_bytes());
    out.extend_from_slice(&hb.seq.to_be_bytes());
    out.extend_from_slice(&hb.sent_unix_ms.to_be_bytes());
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    out.extend_from_slice(hmac::sign(&key, &out).as_ref());
    out
}

/// Check the signature and decode. (Replay and freshness are `ReplayGuard`'s business.)
pub fn decode(packet: &[u8], secret: &[u8]) -> Result<Heartbeat, Rejected> {
    if packet.len() < 4 + 3 + 24 + 1 + MAC_LEN || &packet[..4] != MAGIC || packet[4] != VERSION {
        return Err(Rejected::Malformed);
    }
    let (body, mac) = packet.split_at(packet.len() - MAC_LEN);
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, body, mac).map_err(|_| Rejected::BadMac)?;
    let u64_at = |i: usize| u64::from_be_bytes(body[i..i + 8].try_into().unwrap_or_default());
    let name_len = body[31] as usize;
    if body.len() != 32 + name_len {
        return Err(Rejected::Malformed);
    }
    let name = std::str::from_utf8(&body[32..]).map_err(|_| Rejected::Malformed)?;
    Ok(Heartbeat {
        advert: Advert {
            name: name.to_string(),
            priority: body[5],
            role: byte_role(body[6] & 0x7f).ok_or(Rejected::Malformed)?,
            preempting: body[6] & 0x80 != 0,
            term: u64_at(7),
        },
        seq: u64_at(15),
        sent_unix_ms: u64_at(23),
    })
}

/// Accepts each sender's heartbeats only in increasing sequence and within `max_skew_ms` of
/// the local clock, so a captured packet cannot be played back.
#[derive(Debug)]
pub struct ReplayGuard {
    own_name: String,
    max_skew_ms: u64,
    last_seq: std::collections::HashMap<String, u64>,
}

impl ReplayGuard {
    pub fn new(own_name: &str, max_skew_ms: u64) -> Self {
        ReplayGuard {
            own_name: own_name.to_string(),
            max_skew_ms,
            last_seq: Default::default(),
        }
    }

    pub fn check(&mut self, hb: &Heartbeat, now_unix_ms: u64) -> Result<(), Rejected> {
        if hb.advert.name == self.own_name {
            return Err(Rejected::OwnName(hb.advert.name.clone()));
        }
        let skew = hb.sent_unix_ms as i64 - now_unix_ms as i64;
        if skew.unsigned_abs() > self.max_skew_ms {
            return Err(Rejected::Stale { skew_ms: skew });
        }
        let last = self.last_seq.get(&hb.advert.name).copied().unwrap_or(0);
        if hb.seq <= last {
            return Err(Rejected::Replay { seq: hb.seq, last });
        }
        self.last_seq.insert(hb.advert.name.clone(), hb.seq);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(seq: u64, at: u64) -> Heartbeat {
        Heartbeat {
            advert: Advert {
                name: "edge-b".into(),
                priority: 100,
                term: 7,
                role: Role::Backup,
                preempting: true,
            },
            seq,
            sent_unix_ms: at,
        }
    }

    const SECRET: &[u8] = b"correct horse battery staple";

    #[test]
    fn round_trip() {
        let p = encode(&hb(5, 1_000_000), SECRET);
        assert_eq!(decode(&p, SECRET).unwrap(), hb(5, 1_000_000));
    }

    #[test]
    fn forged_and_tampered_packets_are_rejected() {
        let p = encode(&hb(5, 1_000_000), SECRET);
        assert_eq!(decode(&p, b"another secret"), Err(Rejected::BadMac));
        for i in [5, 6, 10, 20, 30, 33] {
            let mut t = p.clone();
            t[i] ^= 1;
            assert_eq!(
                decode(&t, SECRET),
                Err(Rejected::BadMac),
                "byte {i} flipped"
            );
        }
        assert_eq!(decode(&p[..20], SECRET), Err(Rejected::Malformed));
        assert_eq!(
            decode(
                b"GET / HTTP/1.1\r\n\r\n________________________________________",
                SECRET
            ),
            Err(Rejected::Malformed)
        );
    }

    #[test]
    fn replays_and_stale_packets_are_rejected() {
        let mut g = ReplayGuard::new("edge-a", 10_000);
        let now = 5_000_000;
        assert_eq!(g.check(&hb(1, now), now), Ok(()));
        assert_eq!(g.check(&hb(2, now + 200), now + 200), Ok(()));
        assert_eq!(
            g.check(&hb(2, now + 200), now + 400),
            Err(Rejected::Replay { seq: 2, last: 2 })
        );
        assert_eq!(
            g.check(&hb(1, now), now + 400),
            Err(Rejected::Replay { seq: 1, last: 2 })
        );
        assert!(matches!(
            g.check(&hb(9, now - 60_000), now),
            Err(Rejected::Stale { .. })
        ));
        let mut own = hb(3, now);
        own.advert.name = "edge-a".into();
        assert!(matches!(g.check(&own, now), Err(Rejected::OwnName(_))));
    }
}
