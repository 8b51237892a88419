//! Limits on what one client, or all of them, may hold and send. Owns: connection admission
//! (the global and per-IP caps, the per-IP new-connection rate, the PROXY protocol), the
//! request checks (sizes, framing, Host) and the body limits. Admission (`proxy::admission`)
//! runs on every new connection before its TLS handshake (a pre-handshake callback pingora
//! calls on both listener kinds, see vendor/patches/0001-*) and takes a slot
//! in the `ConnTable`; the slot is given back when pingora drops the socket. The table (one,
//! made by `server` and handed to admission and the admin API) outlives Snapshots, so its
//! counters survive reloads; the limits themselves are handed in from the Snapshot on each
//! use.

pub mod http;
pub mod proxy_protocol;

use crate::config::cidr::{any_contains, canonical};
use crate::config::Limits;
use pingora::upstreams::peer::Tracing;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Why a connection was turned away (a label of `tollgate_connections_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    GlobalCap,
    IpCap,
    IpRate,
    UntrustedProxy,
    BadProxyHeader,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::GlobalCap,
        Refusal::IpCap,
        Refusal::IpRate,
        Refusal::UntrustedProxy,
        Refusal::BadProxyHeader,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::GlobalCap => "max_connections",
            Refusal::IpCap => "max_connections_per_ip",
            Refusal::IpRate => "connection_rate_per_ip",
            Refusal::UntrustedProxy => "untrusted_proxy",
            Refusal::BadProxyHeader => "bad_proxy_header",
        }
    }
}

/// The per-IP key: the address for IPv4, the /64 for IPv6 (one host usually holds a /64).
fn client_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        v4 => v4,
    }
}

#[derive(Debug)]
struct IpEntry {
    conns: usize,
    tokens: f64,
    last: Instant,
}

#[derive(Default)]
struct Shard {
    map: HashMap<IpAddr, IpEntry>,
    sweep_at: usize,
}

const SHARDS: usize = 32;
/// A shard holding more entries than this sweeps out the idle ones on its next admission.
const SWEEP_AT: usize = 1024;

/// Open connections, in all and per client IP, and the per-IP token buckets.
pub struct ConnTable {
    open: AtomicUsize,
    shards: Vec<Mutex<Shard>>,
    rejected: [AtomicU64; 5],
    accepted: AtomicU64,
}

impl Default for ConnTable {
    fn default() -> Self {
        ConnTable {
            open: AtomicUsize::new(0),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            rejected: Default::default(),
            accepted: AtomicU64::new(0),
        }
    }
}

impl ConnTable {
    fn shard(&self, key: &IpAddr) -> &Mutex<Shard> {
        use std::hash::{Hash, Hasher};
        // a fixed hash is enough: the shard only spreads lock traffic
        let mut h = FixedHasher(0xcbf29ce484222325);
        key.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// Take a slot for a new connection from `ip`, or say why not.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        l: &Limits,
        now: Instant,
    ) -> Result<ConnGuard, Refusal> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= l.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.count(Refusal::GlobalCap);
            return Err(Refusal::GlobalCap);
        }
        let key = client_key(ip);
        let exempt = any_contains(&l.allow, ip);
        let verdict = {
            let mut shard = self.shard(&key).lock().unwrap_or_else(|p| p.into_inner());
            if shard.map.len() > shard.sweep_at.max(SWEEP_AT) {
                sweep(&mut shard.map, l, now);
                // sweep again only once the shard has doubled: amortised O(1) per admission
                shard.sweep_at = shard.map.len() * 2;
            }
            let e = shard.map.entry(key).or_insert(IpEntry {
                conns: 0,
                tokens: l.connection_burst_per_ip as f64,
                last: now,
            });
            let verdict = if exempt {
                Ok(())
            } else if e.conns >= l.max_connections_per_ip {
                Err(Refusal::IpCap)
            } else if l.connection_rate_per_ip > 0.0 {
                let dt = now.saturating_duration_since(e.last).as_secs_f64();
                e.tokens = (e.tokens + dt * l.connection_rate_per_ip)
                    .min(l.connection_burst_per_ip as f64);
                e.last = now;
                if e.tokens < 1.0 {
                    Err(Refusal::IpRate)
                } else {
                    e.tokens -= 1.0;
                    Ok(())
                }
            } else {
                Ok(())
            };
            if verdict.is_ok() {
                e.conns += 1;
            }
            verdict
        };
        if let Err(r) = verdict {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.count(r);
            return Err(r);
        }
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(ConnGuard(Arc::new(GuardInner {
            table: self.clone(),
            key,
            released: AtomicBool::new(false),
        })))
    }

    fn release(&self, key: IpAddr) {
        let mut shard = self.shard(&key).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = shard.map.get_mut(&key) {
            e.conns = e.conns.saturating_sub(1);
        }
        drop(shard);
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn rejected(&self, r: Refusal) -> u64 {
        self.rejected[r as usize].load(Ordering::Relaxed)
    }

    pub fn count(&self, r: Refusal) {
        self.rejected[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Open connections from `ip` (its /64 for IPv6).
    pub fn open_from(&self, ip: IpAddr) -> usize {
        let key = client_key(ip);
        let shard = self.shard(&key).lock().unwrap_or_else(|p| p.into_inner());
        shard.map.get(&key).map(|e| e.conns).unwrap_or(0)
    }

    /// The connection families of `/metrics` (Prometheus text).
    pub fn render_metrics(&self, out: &mut String) {
        use crate::metrics::{family, single};
        use std::fmt::Write;
        single(
            out,
            "tollgate_connections_open",
            "gauge",
            "Client connections holding a slot now.",
            self.open(),
        );
        single(
            out,
            "tollgate_connections_accepted_total",
            "counter",
            "Client connections admitted.",
            self.accepted(),
        );
        family(
            out,
            "tollgate_connections_rejected_total",
            "counter",
            "Client connections closed at once, by the limit that refused them.",
        );
        for r in Refusal::ALL {
            let _ = writeln!(
                out,
                "tollgate_connections_rejected_total{{reason=\"{}\"}} {}",
                r.label(),
                self.rejected(r)
            );
        }
    }
}

/// Drop entries with no connection whose bucket has refilled: they hold no information.
fn sweep(shard: &mut HashMap<IpAddr, IpEntry>, l: &Limits, now: Instant) {
    shard.retain(|_, e| {
        let rate = l.connection_rate_per_ip;
        let full = rate <= 0.0
            || e.tokens + now.saturating_duration_since(e.last).as_secs_f64() * rate
                >= l.connection_burst_per_ip as f64;
        e.conns > 0 || !full
    });
}

/// FNV-1a: a fixed, fast hash for picking a shard.
struct FixedHasher(u64);

impl std::hash::Hasher for FixedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
}

struct GuardInner {
    table: Arc<ConnTable>,
    key: IpAddr,
    released: AtomicBool,
}

impl GuardInner {
    fn release(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            self.table.release(self.key);
        }
    }
}

impl Drop for GuardInner {
    fn drop(&mut self) {
        self.release();
    }
}

/// A connection's slot: given back when pingora drops the socket (through the stream's
/// tracer, which pingora calls on drop) or when the guard itself is dropped.
#[derive(Clone)]
pub struct ConnGuard(Arc<GuardInner>);

impl std::fmt::Debug for ConnGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConnGuard({})", self.0.key)
    }
}

impl Tracing for ConnGuard {
    fn on_connected(&self) {}
    fn on_disconnected(&self) {
        self.0.release();
    }
    fn boxed_clone(&self) -> Box<dyn Tracing> {
        Box::new(self.clone())
    }
}

/// The default limits, from a minimal valid configuration (tests).
#[cfg(test)]
pub(crate) fn test_limits() -> Limits {
    crate::config::Config::parse(
        std::path::Path::new("t.toml"),
        "[[listener]]\naddress = \"127.0.0.1:1\"\n[[vhost]]\ndefault = true\n\
         [[vhost.route]]\npath = \"/\"\npool = \"p\"\n[pool.p]\nbackends = [\"127.0.0.1:2\"]\n",
    )
    .unwrap()
    .limits
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(max: usize, per_ip: usize, rate: f64, burst: u32) -> Limits {
        Limits {
            max_connections: max,
            max_connections_per_ip: per_ip,
            connection_rate_per_ip: rate,
            connection_burst_per_ip: burst,
            allow: vec!["10.9.0.0/16".parse().unwrap()],
            ..test_limits()
        }
    }

    #[test]
    fn per_ip_cap_global_cap_and_release() {
        let t = Arc::new(ConnTable::default());
        let l = limits(3, 2, 0.0, 1);
        let now = Instant::now();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let g1 = t.admit(a, &l, now).unwrap();
        let _g2 = t.admit(a, &l, now).unwrap();
        assert_eq!(t.admit(a, &l, now).unwrap_err(), Refusal::IpCap);
        let g3 = t.admit(b, &l, now).unwrap();
        // the global cap (3) is reached now, whoever asks
        assert_eq!(
            t.admit("127.0.0.3".parse().unwrap(), &l, now).unwrap_err(),
            Refusal::GlobalCap
        );
        assert_eq!(t.open(), 3);
        // the tracer path and the drop path give the slot back once
        g1.on_disconnected();
        g1.on_disconnected();
        drop(g1);
        assert_eq!(t.open(), 2);
        assert_eq!(t.open_from(a), 1);
        let _g4 = t.admit(a, &l, now).unwrap();
        drop(g3);
        assert_eq!(t.open_from(b), 0);
        assert_eq!(t.rejected(Refusal::IpCap), 1);
        assert_eq!(t.rejected(Refusal::GlobalCap), 1);
    }

    #[test]
    fn rate_is_a_token_bucket_and_allow_list_bypasses() {
        let t = Arc::new(ConnTable::default());
        let l = limits(1000, 1000, 10.0, 3);
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(t.admit(a, &l, t0).unwrap());
        }
        assert_eq!(t.admit(a, &l, t0).unwrap_err(), Refusal::IpRate);
        // 10/s: one token back after 100 ms, not before
        assert!(t.admit(a, &l, t0 + Duration::from_millis(50)).is_err());
        assert!(t.admit(a, &l, t0 + Duration::from_millis(160)).is_ok());
        let allowed: IpAddr = "10.9.3.3".parse().unwrap();
        for _ in 0..50 {
            held.push(t.admit(allowed, &l, t0).unwrap());
        }
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let t = Arc::new(ConnTable::default());
        let l = limits(100, 1, 0.0, 1);
        let now = Instant::now();
        let _g = t
            .admit("2001:db8:0:1::1".parse().unwrap(), &l, now)
            .unwrap();
        assert_eq!(
            t.admit("2001:db8:0:1::2".parse().unwrap(), &l, now)
                .unwrap_err(),
            Refusal::IpCap
        );
        assert!(t.admit("2001:db8:0:2::1".parse().unwrap(), &l, now).is_ok());
    }

    #[test]
    fn idle_entries_are_swept_and_the_table_stays_bounded() {
        let l = limits(1_000_000, 10, 10.0, 2);
        let t0 = Instant::now();
        let entry = |conns, tokens| IpEntry {
            conns,
            tokens,
            last: t0,
        };
        let ip = |i: u32| IpAddr::from(i.to_be_bytes());
        let mut m = HashMap::new();
        m.insert(ip(1), entry(0, 2.0)); // idle, bucket full: no information
        m.insert(ip(2), entry(1, 0.0)); // a connection open
        m.insert(ip(3), entry(0, 0.0)); // idle, bucket still refilling
        sweep(&mut m, &l, t0);
        assert!(!m.contains_key(&ip(1)) && m.contains_key(&ip(2)) && m.contains_key(&ip(3)));
        sweep(&mut m, &l, t0 + Duration::from_secs(1)); // refilled by now
        assert!(!m.contains_key(&ip(3)) && m.contains_key(&ip(2)));

        // through the table: 100k one-shot clients leave a bounded table behind
        let t = Arc::new(ConnTable::default());
        let l = limits(1_000_000, 10, 1000.0, 1);
        for i in 0..100_000u32 {
            let now = t0 + Duration::from_millis(i as u64 / 50);
            drop(t.admit(ip(0x0a00_0000 + i), &l, now).unwrap());
        }
        let total: usize = t.shards.iter().map(|s| s.lock().unwrap().map.len()).sum();
        assert!(
            total <= SHARDS * SWEEP_AT * 2 + SHARDS,
            "{total} entries left"
        );
        assert_eq!(t.open(), 0);
    }
}
