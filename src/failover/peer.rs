//! The failover peer at run time: heartbeats over UDP both ways, the state machine driven by
//! them, by local health (a TCP connect to our own first listener) and by time, and the claim
//! actions run as spawned tasks whose results come back as events (a slow hook never stops
//! the heartbeats).

use super::heartbeat::{decode, encode, Heartbeat, ReplayGuard};
use super::machine::{Action, Event, Machine, Params, Role};
use crate::config::{ClaimAction, FailoverSettings};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
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
}

fn status_cell() -> &'static Mutex<Option<Status>> {
    static S: OnceLock<Mutex<Option<Status>>> = OnceLock::new();
    S.get_or_init(Default::default)
}

/// The failover status, when `[failover]` is configured and running.
pub fn status() -> Option<Status> {
    status_cell()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
    /// Where the local health check connects (our first traffic listener).
    health: Option<SocketAddr>,
}

impl Peer {
    pub fn new(s: FailoverSettings, first_listener: Option<SocketAddr>) -> Peer {
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
        Peer { s, health }
    }
}

/// Run every claim hook with `state`; Ok when all succeeded (each with its retries).
async fn run_hooks(claims: Vec<ClaimAction>, name: String, state: &'static str, term: u64) -> bool {
    let mut all = true;
    for c in claims {
        let ClaimAction::Exec {
            command,
            timeout,
            retries,
        } = c;
        let mut ok = false;
        for attempt in 0..=retries {
            let mut cmd = tokio::process::Command::new(&command[0]);
            cmd.args(&command[1..])
                .env("TOLLGATE_STATE", state)
                .env("TOLLGATE_TERM", term.to_string())
                .env("TOLLGATE_NAME", &name)
                .kill_on_drop(true);
            match tokio::time::timeout(timeout, cmd.status()).await {
                Ok(Ok(st)) if st.success() => {
                    ok = true;
                    break;
                }
                Ok(Ok(st)) => {
                    tracing::warn!(hook = ?command, state, attempt, status = %st, "failover hook failed")
                }
                Ok(Err(e)) => {
                    tracing::warn!(hook = ?command, state, attempt, error = %e, "failover hook could not run")
                }
                Err(_) => {
                    tracing::warn!(hook = ?command, state, attempt, timeout_ms = timeout.as_millis() as u64, "failover hook timed out")
                }
            }
        }
        all &= ok;
    }
    all
}

#[async_trait]
impl BackgroundService for Peer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let s = &self.s;
        let sock = match tokio::net::UdpSocket::bind(s.listen).await {
            Ok(sock) => sock,
            Err(e) => {
                tracing::error!(address = %s.listen, error = %e, "failover: cannot bind failover.listen; this node stays out of the election");
                return;
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
            },
            now(),
        );
        let mut guard = ReplayGuard::new(&s.name, 10_000);
        // sequence numbers start from the wall clock, so they keep rising across restarts
        let mut seq = unix_ms();
        let mut rejected = 0u64;
        let mut healthy = true;
        let mut peer_seen: Option<(Heartbeat, Instant)> = None;
        let (hook_tx, mut hook_rx) = mpsc::channel::<(bool, bool)>(16); // (was a claim, ok)
        let mut tick = tokio::time::interval(s.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = vec![0u8; 2048];
        tracing::info!(name = %s.name, priority = s.priority, listen = %s.listen, peer = %s.peer, "failover peer started (INIT)");

        loop {
            let mut actions = Vec::new();
            tokio::select! {
                _ = shutdown.changed() => {
                    if m.role() == Role::Master {
                        run_hooks(s.claims.clone(), s.name.clone(), "BACKUP", m.term()).await;
                    }
                    return;
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
                    if let Some(advert) = m.advert() {
                        seq += 1;
                        let hb = Heartbeat { advert, seq, sent_unix_ms: unix_ms() };
                        let _ = sock.send_to(&encode(&hb, &s.secret), s.peer).await;
                    }
                }
                r = sock.recv_from(&mut buf) => {
                    if let Ok((n, from)) = r {
                        match decode(&buf[..n], &s.secret).and_then(|hb| guard.check(&hb, unix_ms()).map(|_| hb)) {
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
                Some((was_claim, ok)) = hook_rx.recv() => {
                    if was_claim {
                        actions.extend(m.handle(now(), Event::ClaimResult(ok)));
                    }
                }
            }
            for a in actions {
                let (claims, name, tx, term) =
                    (s.claims.clone(), s.name.clone(), hook_tx.clone(), m.term());
                match a {
                    Action::Claim { term } => {
                        tokio::spawn(async move {
                            let ok = run_hooks(claims, name, "MASTER", term).await;
                            let _ = tx.send((true, ok)).await;
                        });
                    }
                    Action::Release => {
                        let state = state_name(m.role());
                        tokio::spawn(async move {
                            let ok = run_hooks(claims, name, state, term).await;
                            let _ = tx.send((false, ok)).await;
                        });
                    }
                    // exec claims cannot be verified generically: the hook owns the address
                    Action::Verify => {}
                }
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
                    last_transition_unix_ms: unix_ms().saturating_sub(now().saturating_sub(since)),
                    rejected_packets: rejected,
                };
                let changed = status()
                    .map(|o| o.state != st.state || o.term != st.term)
                    .unwrap_or(true);
                if changed {
                    tracing::warn!(state = %st.state, term = st.term, reason = %st.last_transition, "failover transition");
                }
                *status_cell().lock().unwrap_or_else(|e| e.into_inner()) = Some(st);
            }
        }
    }
}
