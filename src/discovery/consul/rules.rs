//! The pure rules of watching Consul: the blocking-query index rules, answer parsing, the
//! shrink guard, full-jitter backoff, the per-watch token bucket and the quiescence batcher.
//! Unit-tested without an agent.

use super::*;

pub use crate::consul::next_index;

#[derive(Debug, Deserialize)]
pub(super) struct HealthEntry {
    #[serde(rename = "Node")]
    node: NodeEntry,
    #[serde(rename = "Service")]
    service: ServiceEntry,
}

#[derive(Debug, Deserialize)]
pub(super) struct NodeEntry {
    #[serde(rename = "Address", default)]
    address: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct ServiceEntry {
    #[serde(rename = "Address", default)]
    address: String,
    #[serde(rename = "Port", default)]
    port: u16,
    #[serde(rename = "Weights")]
    weights: Option<Weights>,
    #[serde(rename = "Meta")]
    meta: Option<HashMap<String, String>>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Weights {
    #[serde(rename = "Passing", default)]
    passing: u32,
}

/// Backends from a `/v1/health/service` answer: the service address (the node's when empty)
/// and port; weight from the `weight` meta key, else `Weights.Passing`, clamped to 1..=1000.
/// Sorted, so equal answers compare equal. Instances without an IP address are skipped.
pub fn parse_health(body: &[u8]) -> Result<(Vec<BackendSpec>, Vec<String>), String> {
    let entries: Vec<HealthEntry> = serde_json::from_slice(body)
        .map_err(|e| format!("not a /v1/health/service answer: {e}"))?;
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for e in entries {
        let host = if e.service.address.is_empty() {
            &e.node.address
        } else {
            &e.service.address
        };
        let Ok(ip) = host.parse::<IpAddr>() else {
            skipped.push(format!("{host}:{} (not an IP address)", e.service.port));
            continue;
        };
        if e.service.port == 0 {
            skipped.push(format!("{host} (no port)"));
            continue;
        }
        let weight = e
            .service
            .meta
            .as_ref()
            .and_then(|m| m.get("weight"))
            .and_then(|w| w.parse::<u32>().ok())
            .or(e.service.weights.map(|w| w.passing))
            .unwrap_or(1)
            .clamp(1, 1000);
        out.push(BackendSpec {
            address: SocketAddr::new(ip, e.service.port),
            weight,
        });
    }
    out.sort_by_key(|b| b.address);
    out.dedup_by_key(|b| b.address);
    Ok((out, skipped))
}

/// The shrink guard: when an answer would leave fewer than `min_fraction` of the previous
/// backends, keep enough of the previous ones (in address order) to stay at that fraction.
/// New backends are always taken. Returns the backends to apply and whether it intervened.
pub fn guard_shrink(
    old: &[BackendSpec],
    new: Vec<BackendSpec>,
    min_fraction: f64,
) -> (Vec<BackendSpec>, bool) {
    let min = (old.len() as f64 * min_fraction).ceil() as usize;
    if new.is_empty() || new.len() >= min {
        return (new, false);
    }
    let mut out = new;
    for b in old {
        if out.len() >= min {
            break;
        }
        if !out.iter().any(|n| n.address == b.address) {
            out.push(b.clone());
        }
    }
    out.sort_by_key(|b| b.address);
    (out, true)
}

/// Full-jitter exponential backoff: uniform in [0, min(cap, base·2^attempt)].
pub fn backoff(attempt: u32, base: Duration, cap: Duration, r: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    exp.mul_f64(r.clamp(0.0, 1.0))
}

/// Queries a second one watch may make, and its burst. The bucket stops a watch from looping
/// on answers that come back at once (a misbehaving agent); it must not slow real churn: at
/// 5/s a steady stream of changes waited 200 ms each (measured by benches/consul_convergence.py).
pub(super) const WATCH_RATE: f64 = 20.0;
pub(super) const WATCH_BURST: f64 = 40.0;

/// A token bucket: `rate` tokens a second, at most `burst`. Returns how long to wait.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Take a token at `now`; the delay before the caller may proceed.
    pub fn take(&mut self, now: Instant) -> Duration {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst) - 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Quiescence: after `first`, take what arrives until the channel has been quiet for `min`,
/// but never wait longer than `max` in all: one Snapshot rebuild per burst. `quiet(d)` is
/// the wait ([`Quiet::wait`] in tollgate, tokio's clock in the tests).
pub(super) async fn burst<T, F: std::future::Future<Output = ()>>(
    first: T,
    rx: &mut tokio::sync::mpsc::Receiver<T>,
    min: Duration,
    max: Duration,
    mut quiet: impl FnMut(Duration) -> F,
) -> Vec<T> {
    let started = tokio::time::Instant::now();
    let mut batch = vec![first];
    loop {
        let left = max.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        tokio::select! {
            biased;
            u = rx.recv() => match u {
                Some(u) => batch.push(u),
                None => break,
            },
            _ = quiet(min.min(left)) => break,
        }
    }
    batch
}

/// Where a pool with failover datacenters is served from, and what keeps it from bouncing.
#[derive(Debug, Clone, Default)]
pub struct Failover {
    /// An index into the pool's watches: 0 its own datacenter, then its failover ones.
    pub serving: usize,
    /// Since when its own datacenter has had passing instances, without a break.
    pub own_ok_since: Option<Instant>,
}

/// Choose the datacenter that serves a pool. `counts` holds each watch's passing instances
/// (the pool's own datacenter first, then its failover ones in order; `None`: no answer yet)
/// and `names` their names. The own datacenter serves while it has passing instances; when
/// it has none, the first other one that has serves; the own one takes over again once it
/// has had passing instances for `hold`, so a flapping check does not bounce traffic. A
/// datacenter not heard from yet is never judged empty. Returns the new index and why, when
/// it changes.
pub fn choose_datacenter(
    counts: &[Option<usize>],
    names: &[String],
    st: &mut Failover,
    now: Instant,
    hold: Duration,
) -> Option<(usize, String)> {
    let has = |i: usize| counts.get(i).copied().flatten().is_some_and(|n| n > 0);
    let empty = |i: usize| counts.get(i).copied().flatten() == Some(0);
    if has(0) {
        st.own_ok_since.get_or_insert(now);
    } else {
        st.own_ok_since = None;
    }
    let first_other = || (1..counts.len()).find(|&i| has(i));
    let cur = st.serving.min(counts.len().saturating_sub(1));
    let (next, why) = if cur == 0 {
        match first_other() {
            Some(i) if empty(0) => (
                i,
                format!(
                    "{} has no passing instance; {} is the first failover datacenter that has",
                    names[0], names[i]
                ),
            ),
            _ => (0, String::new()),
        }
    } else if st
        .own_ok_since
        .is_some_and(|t| now.saturating_duration_since(t) >= hold)
    {
        (
            0,
            format!("{} has had passing instances for {hold:?}", names[0]),
        )
    } else if has(cur) || !empty(cur) {
        (cur, String::new())
    } else if has(0) {
        (0, format!("{} has no passing instance either", names[cur]))
    } else {
        match first_other() {
            Some(i) => (i, format!("{} has no passing instance either", names[cur])),
            None => (0, "no datacenter has a passing instance".to_string()),
        }
    };
    st.serving = next;
    (next != cur).then_some((next, why))
}

/// The checks of one `/v1/health/state/any` answer: (node, check id) → (service name, or
/// empty for a node's own check; its modify index).
pub type Checks = HashMap<(String, String), (String, u64)>;

pub fn parse_checks(body: &[u8]) -> Result<Checks, String> {
    #[derive(Deserialize)]
    struct Check {
        #[serde(rename = "Node", default)]
        node: String,
        #[serde(rename = "CheckID", default)]
        check_id: String,
        #[serde(rename = "ServiceName", default)]
        service: String,
        #[serde(rename = "ModifyIndex", default)]
        modify: u64,
    }
    let checks: Vec<Check> = serde_json::from_slice(body)
        .map_err(|e| format!("not a /v1/health/state/any answer: {e}"))?;
    Ok(checks
        .into_iter()
        .map(|c| ((c.node, c.check_id), (c.service, c.modify)))
        .collect())
}

/// The services whose checks changed between two answers (a check added, removed or
/// modified), or `None` when the answers cannot say which: a node's own check changed, so
/// every service on that node may have.
pub fn changed_services(
    before: &Checks,
    now: &Checks,
) -> Option<std::collections::BTreeSet<String>> {
    let mut out = std::collections::BTreeSet::new();
    let gone = before.iter().filter(|(k, _)| !now.contains_key(*k));
    let new = now.iter().filter(|(k, v)| before.get(*k) != Some(*v));
    for (_, (service, _)) in gone.chain(new) {
        if service.is_empty() {
            return None;
        }
        out.insert(service.clone());
    }
    Some(out)
}
