//! The failover peer at run time: heartbeats over UDP both ways, the state machine driven by
//! them, by local health (a TCP connect to our own first listener) and by time, and the claim
//! actions run as spawned tasks whose results come back as events (a slow hook never stops
//! the heartbeats).

use super::claim::Claims;
use super::heartbeat::{decode, encode, Heartbeat, ReplayGuard};
use super::machine::{Action, Advert, Event, Machine, Params, Role};
use crate::config::{ConsulSettings, FailoverSettings};
use crate::consul::Lock;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;

/// What `/status` and `/metrics` show.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub name: String,
    pub state: String,
    pub term: u64,
    pub peer: Option<String>,
    pub peer_state: Option<String>,
    pub peer_last_seen_ms_ago: Option<u64>,
    pub last_transition: String,
    pub last_transition_unix_ms: u64,
    pub rejected_packets: u64,
    /// The last claim / release / verification outcome.
    pub last_action: String,
    /// Fenced nodes: whether this node holds the Consul lock.
    pub consul_lock: Option<bool>,
}

impl Status {
    /// The failover families of `/metrics` (Prometheus text).
    pub fn render_metrics(&self, out: &mut String) {
        use crate::metrics::family;
        use std::fmt::Write;
        family(
            out,
            "tollgate_failover_state",
            "gauge",
            "1 for the failover state this node is in.",
        );
        for s in ["INIT", "BACKUP", "MASTER", "FAULT"] {
            let _ = writeln!(
                out,
                "tollgate_failover_state{{state=\"{s}\"}} {}",
                u8::from(self.state == s)
            );
        }
        family(
            out,
            "tollgate_failover_term",
            "gauge",
            "The failover term (every claim increments it).",
        );
        let _ = writeln!(out, "tollgate_failover_term {}", self.term);
        family(
            out,
            "tollgate_failover_rejected_heartbeats_total",
            "counter",
            "Heartbeats rejected (forged, replayed, stale).",
        );
        let _ = writeln!(
            out,
            "tollgate_failover_rejected_heartbeats_total {}",
            self.rejected_packets
        );
        if let Some(ms) = self.peer_last_seen_ms_ago {
            family(
                out,
                "tollgate_failover_peer_last_seen_seconds",
                "gauge",
                "Seconds since the last valid heartbeat from the peer.",
            );
            let _ = writeln!(
                out,
                "tollgate_failover_peer_last_seen_seconds {:.3}",
                ms as f64 / 1000.0
            );
        }
        family(
            out,
            "tollgate_failover_last_transition_timestamp_seconds",
            "gauge",
            "When this node last changed state (Unix time).",
        );
        let _ = writeln!(
            out,
            "tollgate_failover_last_transition_timestamp_seconds {:.3}",
            self.last_transition_unix_ms as f64 / 1000.0
        );
        if let Some(held) = self.consul_lock {
            family(
                out,
                "tollgate_failover_consul_lock_held",
                "gauge",
                "1 while this node holds the failover Consul lock.",
            );
            let _ = writeln!(out, "tollgate_failover_consul_lock_held {}", u8::from(held));
        }
    }
}

/// Where the peer publishes its status and the admin API reads it: made by `server`,
/// handed to both. `None` until `[failover]` runs.
#[derive(Debug, Default, Clone)]
pub struct StatusCell(Arc<Mutex<Option<Status>>>);

impl StatusCell {
    /// The failover status, when `[failover]` is configured and running.
    pub fn get(&self) -> Option<Status> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, st: Status) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(st);
    }
}

pub fn state_name(r: Role) -> &'static str {
    match r {
        Role::Init => "INIT",
        Role::Backup => "BACKUP",
        Role::Master => "MASTER",
        Role::Fault => "FAULT",
    }
}

pub struct Peer {
    s: FailoverSettings,
    consul: ConsulSettings,
    /// Where the local health check connects (our first traffic listener).
    health: Option<SocketAddr>,
    status: StatusCell,
}

impl Peer {
    pub fn new(
        s: FailoverSettings,
        consul: ConsulSettings,
        first_listener: Option<SocketAddr>,
        status: StatusCell,
    ) -> Peer {
        let health = first_listener.map(|mut a| {
            if a.ip().is_unspecified() {
                a.set_ip(if a.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            a
        });
        Peer {
            s,
            consul,
            health,
            status,
        }
    }
}

/// One heartbeat to the peer, with the next sequence number (a lost packet is the next
/// one's business).
async fn send_heartbeat(
    sock: &tokio::net::UdpSocket,
    s: &FailoverSettings,
    seq: &mut u64,
    advert: Advert,
) {
    *seq += 1;
    let hb = Heartbeat {
        advert,
        seq: *seq,
        sent_unix_ms: crate::clock::unix_ms(),
    };
    let _ = sock.send_to(&encode(&hb, &s.secret), s.peer).await;
}

/// Work for the effects task, which runs claims, releases, checks and the Consul lock one at
/// a time in the order the machine asked for them (a release never overtakes its claim).
enum Job {
    Act(Action, &'static str, u64),
    Renew,
}

/// What the effects task reports back.
enum Done {
    Claim(Result<(), String>, u64),
    Release(Result<(), String>),
    Verify(Result<(), String>),
    Lock(Result<bool, String>),
}

type SharedLock = Arc<tokio::sync::Mutex<Option<Lock>>>;

async fn effects(
    claims: Arc<Claims>,
    lock: SharedLock,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    done: mpsc::UnboundedSender<Done>,
) {
    while let Some(job) = jobs.recv().await {
        let out = match job {
            Job::Act(Action::Claim { term }, _, _) => {
                let t = Instant::now();
                let r = claims.claim(term).await;
                Done::Claim(r, t.elapsed().as_millis() as u64)
            }
            Job::Act(Action::Release, state, term) => {
                Done::Release(claims.release(state, term).await)
            }
            Job::Act(Action::Verify, _, _) => {
                let fenced = match lock.lock().await.as_ref() {
                    Some(l) => Some(l.held().await),
                    None => None,
                };
                match fenced {
                    Some(Ok(false)) => Done::Lock(Ok(false)),
                    // Consul unreachable: the session's TTL decides, not one failed read
                    _ => Done::Verify(claims.verify().await),
                }
            }
            Job::Act(Action::AcquireLock, _, _) => match lock.lock().await.as_mut() {
                Some(l) => Done::Lock(l.acquire().await),
                None => Done::Lock(Ok(true)),
            },
            Job::Act(Action::ReleaseLock, _, _) => {
                if let Some(l) = lock.lock().await.as_mut() {
                    if let Err(e) = l.release().await {
                        tracing::warn!(error = %e, "failover: cannot release the Consul lock (its TTL will)");
                    }
                }
                continue;
            }
            Job::Renew => match lock.lock().await.as_mut() {
                Some(l) => match l.renew().await {
                    Ok(true) => continue,
                    Ok(false) => Done::Lock(Ok(false)),
                    Err(e) if l.may_have_expired() => {
                        tracing::error!(error = %e, "failover: the Consul session could not be renewed for 3/4 of its TTL; giving the address up before the lock can move");
                        Done::Lock(Ok(false))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "failover: Consul session renewal failed");
                        continue;
                    }
                },
                None => continue,
            },
        };
        if done.send(out).is_err() {
            return;
        }
    }
}

#[async_trait]
impl BackgroundService for Peer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let s = &self.s;
        // During a binary upgrade the old process still holds the port: wait for it (out of
        // the election meanwhile) instead of giving up.
        let mut waited = false;
        let sock = loop {
            match tokio::net::UdpSocket::bind(s.listen).await {
                Ok(sock) => break sock,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    if !waited {
                        waited = true;
                        tracing::warn!(address = %s.listen, "failover: failover.listen is in use (by the process this one upgrades?); waiting for it, out of the election");
                        self.status.set(Status {
                            name: s.name.clone(),
                            state: "INIT".into(),
                            last_transition: format!(
                                "waiting for failover.listen {}: in use",
                                s.listen
                            ),
                            last_transition_unix_ms: crate::clock::unix_ms(),
                            ..Status::default()
                        });
                    }
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(s.interval) => {}
                    }
                }
                Err(e) => {
                    tracing::error!(address = %s.listen, error = %e, "failover: cannot bind failover.listen; this node stays out of the election");
                    return;
                }
            }
        };
        let origin = Instant::now();
        let now = || origin.elapsed().as_millis() as u64;
        let interval = s.interval.as_millis() as u64;
        let mut m = Machine::new(
            Params {
                name: s.name.clone(),
                priority: s.priority,
                dead_after: s.dead_after.as_millis() as u64,
                init_hold: s.dead_after.as_millis() as u64,
                preempt: s.preempt,
                claim_min_interval: (interval * 5).max(1_000),
                claim_backoff_max: (interval * 150).max(30_000),
                verify_every: (interval * 15).max(3_000),
                fenced: s.consul_lock.is_some(),
            },
            now(),
        );
        let mut guard = ReplayGuard::new(&s.name, 10_000);
        // sequence numbers start from the wall clock, so they keep rising across restarts
        let mut seq = crate::clock::unix_ms();
        let mut rejected = 0u64;
        let mut healthy = true;
        let mut peer_seen: Option<(Heartbeat, Instant)> = None;
        let claims = Claims::new(s);
        claims.clear_stale().await;
        let lock: SharedLock = Arc::new(tokio::sync::Mutex::new(match &s.consul_lock {
            None => None,
            Some(l) => match Lock::new(&self.consul, l, &s.name) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::error!(error = %e, "failover: cannot set up the Consul client for the lock; this node stays out of the election");
                    return;
                }
            },
        }));
        let renew_every = lock
            .lock()
            .await
            .as_ref()
            .map(|l| l.renew_every())
            .unwrap_or(std::time::Duration::from_secs(3600));
        let (job_tx, job_rx) = mpsc::unbounded_channel::<Job>();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        tokio::spawn(effects(claims.clone(), lock.clone(), job_rx, done_tx));
        let mut renew = tokio::time::interval(renew_every);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_action = String::new();
        let mut tick = tokio::time::interval(s.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = vec![0u8; 2048];
        tracing::info!(name = %s.name, priority = s.priority, listen = %s.listen, peer = %s.peer, "failover peer started (INIT)");

        let mut last_advert: Option<Advert> = None;
        loop {
            let mut actions = Vec::new();
            let mut send_now = false;
            tokio::select! {
                _ = shutdown.changed() => {
                    if m.role() == Role::Master {
                        if let Err(e) = claims.release("BACKUP", m.term()).await {
                            tracing::error!(error = %e, "failover: release at shutdown failed");
                        }
                    }
                    if let Some(l) = lock.lock().await.as_mut() {
                        l.destroy().await;
                    }
                    // say we are leaving (as FAULT), so the peer claims now rather than after
                    // the dead time; sent a few times against loss
                    for _ in 0..3 {
                        send_heartbeat(&sock, s, &mut seq, m.farewell()).await;
                    }
                    tracing::info!("failover: left the election (shutdown)");
                    return;
                }
                _ = renew.tick() => {
                    if m.lock_held() {
                        let _ = job_tx.send(Job::Renew);
                    }
                }
                _ = tick.tick() => {
                    if let Some(addr) = self.health {
                        let ok = matches!(
                            tokio::time::timeout(s.interval, tokio::net::TcpStream::connect(addr)).await,
                            Ok(Ok(_))
                        );
                        if ok != healthy {
                            healthy = ok;
                            actions.extend(m.handle(now(), Event::LocalHealth(ok)));
                        }
                    }
                    actions.extend(m.handle(now(), Event::Tick));
                    send_now = true;
                }
                r = sock.recv_from(&mut buf) => {
                    if let Ok((n, from)) = r {
                        match decode(&buf[..n], &s.secret).and_then(|hb| guard.check(&hb, crate::clock::unix_ms()).map(|_| hb)) {
                            Ok(hb) => {
                                actions.extend(m.handle(now(), Event::Heartbeat(hb.advert.clone())));
                                peer_seen = Some((hb, Instant::now()));
                            }
                            Err(e) => {
                                rejected += 1;
                                tracing::debug!(%from, error = %e, "failover: heartbeat rejected");
                            }
                        }
                    }
                }
                Some(d) = done_rx.recv() => {
                    let event = match d {
                        Done::Claim(Ok(()), ms) => {
                            last_action = format!("claimed term {} in {ms} ms", m.term());
                            tracing::info!(term = m.term(), ms, "failover: claim took and is verified");
                            Event::ClaimResult(true)
                        }
                        Done::Claim(Err(e), _) => {
                            last_action = format!("claim failed: {e}");
                            tracing::error!(error = %e, "failover: claim failed");
                            Event::ClaimResult(false)
                        }
                        Done::Release(r) => {
                            last_action = match &r {
                                Ok(()) => "released".into(),
                                Err(e) => format!("release failed: {e}"),
                            };
                            if let Err(e) = r {
                                tracing::error!(error = %e, "failover: release failed");
                            }
                            Event::Released
                        }
                        Done::Verify(Ok(())) => Event::VerifyResult(true),
                        Done::Verify(Err(e)) => {
                            last_action = format!("verification failed: {e}");
                            tracing::error!(error = %e, "failover: the address is no longer ours");
                            Event::VerifyResult(false)
                        }
                        Done::Lock(Ok(held)) => Event::Lock(held),
                        Done::Lock(Err(e)) => {
                            tracing::warn!(error = %e, "failover: Consul lock");
                            Event::Lock(false)
                        }
                    };
                    actions.extend(m.handle(now(), event));
                }
            }
            for a in actions {
                let _ = job_tx.send(Job::Act(a, state_name(m.role()), m.term()));
            }
            // heartbeats go every interval, and at once when what we advertise changed (a
            // preempting node asks, a yielding MASTER says it has released, a claim is
            // announced), so a handover takes a round trip, not an interval
            let advert = m.advert();
            if send_now || advert != last_advert {
                if let Some(a) = advert.clone() {
                    send_heartbeat(&sock, s, &mut seq, a).await;
                }
                last_advert = advert;
            }
            let (reason, since) = m.last_transition();
            {
                let st = Status {
                    name: s.name.clone(),
                    state: state_name(m.role()).into(),
                    term: m.term(),
                    peer: peer_seen.as_ref().map(|(h, _)| h.advert.name.clone()),
                    peer_state: peer_seen
                        .as_ref()
                        .map(|(h, _)| state_name(h.advert.role).into()),
                    peer_last_seen_ms_ago: peer_seen
                        .as_ref()
                        .map(|(_, t)| t.elapsed().as_millis() as u64),
                    last_transition: reason.to_string(),
                    last_transition_unix_ms: crate::clock::unix_ms()
                        .saturating_sub(now().saturating_sub(since)),
                    rejected_packets: rejected,
                    last_action: last_action.clone(),
                    consul_lock: s.consul_lock.as_ref().map(|_| m.lock_held()),
                };
                let changed = self
                    .status
                    .get()
                    .map(|o| o.state != st.state || o.term != st.term)
                    .unwrap_or(true);
                if changed {
                    tracing::warn!(state = %st.state, term = st.term, reason = %st.last_transition, "failover transition");
                }
                self.status.set(st);
            }
        }
    }
}
