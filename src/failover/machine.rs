//! The failover state machine (INIT, BACKUP, MASTER, FAULT), driven by events and an injected
//! clock (milliseconds). Rules:
//! - never start as MASTER: INIT first, and while the peer has never been heard, hold for
//!   `init_hold` before claiming;
//! - election by (priority, name), higher wins;
//! - every claim takes a term above any seen; a MASTER that hears a MASTER with a higher
//!   (term, priority, name) demotes at once, so a healed split brain resolves itself;
//! - claims are spaced by `claim_min_interval`, doubling for each claim soon after the last
//!   (up to `claim_backoff_max`), so the address does not ping-pong;
//! - a MASTER re-verifies it holds the address every `verify_every` and demotes if not;
//! - preemption is a handover, never an overlap: the preempting BACKUP asks (`preempting` in
//!   its adverts), the MASTER releases and goes on advertising MASTER until the release is
//!   done (`Event::Released`), and only then does the preempting node claim;
//! - local health failing means FAULT: release, stop advertising; recovery goes to BACKUP;
//! - fenced (`consul_lock`): a claim first needs the Consul lock (`AcquireLock`, retried no
//!   faster than `claim_min_interval`); losing it demotes a MASTER, and a node that holds it
//!   without being MASTER lets it go.

use std::cmp::Ordering;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Role {
    Init,
    Backup,
    Master,
    Fault,
}

#[derive(Debug, Clone)]
pub struct Params {
    pub name: String,
    pub priority: u8,
    /// The peer is dead when not heard from for this long (ms).
    pub dead_after: u64,
    /// Hold in INIT this long when the peer was never heard (ms).
    pub init_hold: u64,
    pub preempt: bool,
    pub claim_min_interval: u64,
    pub claim_backoff_max: u64,
    pub verify_every: u64,
    /// Be MASTER only while holding the Consul lock.
    pub fenced: bool,
}

/// What a heartbeat says about its sender (after authentication).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    pub name: String,
    pub priority: u8,
    pub term: u64,
    pub role: Role,
    /// A BACKUP that outranks the MASTER and preempts asks it to yield.
    pub preempting: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Time passed.
    Tick,
    /// An authenticated, fresh heartbeat from the peer.
    Heartbeat(Advert),
    /// The local listeners' health check.
    LocalHealth(bool),
    /// Whether the claim actions took (the address answers locally / the EIP is ours).
    ClaimResult(bool),
    /// The periodic re-verification of a MASTER.
    VerifyResult(bool),
    /// Fenced: whether the Consul lock is ours (an acquire's answer, or a lost session).
    Lock(bool),
    /// A `Release` finished (successfully or not): stop advertising MASTER.
    Released,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run the claim actions (vip, aws_eip, exec) for this term.
    Claim { term: u64 },
    /// Give the address up.
    Release,
    /// Check that we still hold the address.
    Verify,
    /// Fenced: try to take the Consul lock (answer with `Event::Lock`).
    AcquireLock,
    /// Fenced: let the Consul lock go (after any `Release` before it).
    ReleaseLock,
}

#[derive(Debug)]
pub struct Machine {
    p: Params,
    role: Role,
    term: u64,
    started: u64,
    peer: Option<(Advert, u64)>,
    healthy: bool,
    /// When the last claim was made and how many came in quick succession.
    last_claim: Option<u64>,
    quick_claims: u32,
    last_verify: u64,
    reason: String,
    since: u64,
    lock_held: bool,
    next_lock_try: u64,
    /// Demoted from MASTER, and the release is still running.
    releasing: bool,
    /// Asking the MASTER to yield.
    preempting: bool,
}

impl Machine {
    pub fn new(p: Params, now: u64) -> Machine {
        Machine {
            p,
            role: Role::Init,
            term: 0,
            started: now,
            peer: None,
            healthy: true,
            last_claim: None,
            quick_claims: 0,
            last_verify: now,
            reason: "starting".into(),
            since: now,
            lock_held: false,
            next_lock_try: 0,
            releasing: false,
            preempting: false,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn term(&self) -> u64 {
        self.term
    }

    /// Why the last transition happened, and when (ms).
    pub fn last_transition(&self) -> (&str, u64) {
        (&self.reason, self.since)
    }

    /// What our heartbeats say; `None` in FAULT (we stop advertising).
    pub fn advert(&self) -> Option<Advert> {
        // while the address is being given up, peers must not take it yet
        let role = if self.releasing {
            Role::Master
        } else {
            self.role
        };
        (self.role != Role::Fault).then(|| Advert {
            name: self.p.name.clone(),
            priority: self.p.priority,
            term: self.term,
            role,
            preempting: self.preempting && self.role == Role::Backup,
        })
    }

    /// The last word of a node leaving the election (clean shutdown): FAULT, so the peer
    /// claims at once instead of waiting out the dead time.
    pub fn farewell(&self) -> Advert {
        Advert {
            name: self.p.name.clone(),
            priority: self.p.priority,
            term: self.term,
            role: Role::Fault,
            preempting: false,
        }
    }

    fn set(&mut self, role: Role, now: u64, reason: impl Into<String>) {
        self.role = role;
        self.reason = reason.into();
        self.since = now;
    }

    fn peer_alive(&self, now: u64) -> Option<&Advert> {
        self.peer
            .as_ref()
            .filter(|(_, seen)| now.saturating_sub(*seen) <= self.p.dead_after)
            .map(|(a, _)| a)
    }

    /// Do we outrank `other` in an election: (priority, name), higher wins.
    fn outranks(&self, other: &Advert) -> bool {
        (self.p.priority, self.p.name.as_str()).cmp(&(other.priority, other.name.as_str()))
            == Ordering::Greater
    }

    /// The earliest time the next claim may be made.
    fn next_claim_at(&self) -> u64 {
        match self.last_claim {
            None => 0,
            Some(t) => {
                let wait = self
                    .p
                    .claim_min_interval
                    .saturating_mul(1 << self.quick_claims.min(16))
                    .min(self.p.claim_backoff_max);
                t + wait
            }
        }
    }

    fn claim(&mut self, now: u64, reason: &str) -> Vec<Action> {
        if now < self.next_claim_at() {
            return Vec::new();
        }
        if self.p.fenced && !self.lock_held {
            if now < self.next_lock_try {
                return Vec::new();
            }
            self.next_lock_try = now + self.p.claim_min_interval;
            return vec![Action::AcquireLock];
        }
        let peer_term = self.peer.as_ref().map(|(a, _)| a.term).unwrap_or(0);
        self.term = self.term.max(peer_term) + 1;
        // a claim soon after the last one counts towards the backoff; a quiet spell resets it
        match self.last_claim {
            Some(t) if now - t < self.p.claim_backoff_max.saturating_mul(2) => {
                self.quick_claims += 1
            }
            _ => self.quick_claims = 0,
        }
        self.last_claim = Some(now);
        self.last_verify = now;
        self.preempting = false;
        self.set(Role::Master, now, reason);
        vec![Action::Claim { term: self.term }]
    }

    fn demote(&mut self, now: u64, role: Role, reason: &str) -> Vec<Action> {
        let was_master = self.role == Role::Master;
        self.set(role, now, reason);
        let mut out = Vec::new();
        if was_master {
            self.releasing = true;
            out.push(Action::Release);
        }
        if self.lock_held {
            self.lock_held = false;
            out.push(Action::ReleaseLock);
        }
        out
    }

    /// Whether this node holds (or believes it holds) the Consul lock.
    pub fn lock_held(&self) -> bool {
        self.lock_held
    }

    pub fn handle(&mut self, now: u64, event: Event) -> Vec<Action> {
        match event {
            Event::LocalHealth(false) => {
                self.healthy = false;
                if self.role != Role::Fault {
                    return self.demote(now, Role::Fault, "local health check failed");
                }
                return Vec::new();
            }
            Event::LocalHealth(true) => {
                self.healthy = true;
                if self.role == Role::Fault {
                    self.set(Role::Backup, now, "local health check passes again");
                }
                return self.step(now);
            }
            Event::Heartbeat(a) => {
                let higher = (a.term, a.priority, a.name.as_str())
                    > (self.term, self.p.priority, self.p.name.as_str());
                self.peer = Some((a.clone(), now));
                if self.role == Role::Master && a.role == Role::Master && higher {
                    return self.demote(
                        now,
                        Role::Backup,
                        "the peer is MASTER with a higher (term, priority, name)",
                    );
                }
                if self.role == Role::Master
                    && a.role == Role::Backup
                    && a.preempting
                    && !self.outranks(&a)
                {
                    return self.demote(
                        now,
                        Role::Backup,
                        "yielding to a higher-priority peer that preempts",
                    );
                }
                if self.role == Role::Init && a.role == Role::Master {
                    self.set(Role::Backup, now, "the peer is MASTER");
                }
            }
            Event::ClaimResult(ok) => {
                if !ok && self.role == Role::Master {
                    return self.demote(now, Role::Backup, "the claim did not take");
                }
                return Vec::new();
            }
            Event::VerifyResult(ok) => {
                if !ok && self.role == Role::Master {
                    return self.demote(now, Role::Backup, "no longer holds the address");
                }
                return Vec::new();
            }
            Event::Released => {
                self.releasing = false;
            }
            Event::Lock(held) => {
                if !held {
                    self.lock_held = false;
                    if self.role == Role::Master {
                        return self.demote(now, Role::Backup, "lost the Consul lock");
                    }
                    if self.role == Role::Init {
                        self.set(Role::Backup, now, "the Consul lock is held elsewhere");
                    }
                    return Vec::new();
                }
                self.lock_held = true;
            }
            Event::Tick => {}
        }
        self.step(now)
    }

    /// What time and the peer's state call for; a lock held without being MASTER goes back.
    fn step(&mut self, now: u64) -> Vec<Action> {
        let mut out = self.step_role(now);
        if self.lock_held && self.role != Role::Master {
            self.lock_held = false;
            out.push(Action::ReleaseLock);
        }
        out
    }

    fn step_role(&mut self, now: u64) -> Vec<Action> {
        if !self.healthy {
            return Vec::new();
        }
        let peer = self.peer_alive(now).cloned();
        match self.role {
            Role::Fault => Vec::new(),
            Role::Init => match peer {
                Some(p) if p.role == Role::Master => {
                    self.set(Role::Backup, now, "the peer is MASTER");
                    Vec::new()
                }
                Some(p) if p.role == Role::Fault || self.outranks(&p) => {
                    self.claim(now, "elected: the peer ranks lower")
                }
                Some(_) => {
                    self.set(Role::Backup, now, "the peer ranks higher");
                    Vec::new()
                }
                None if self.peer.is_none() && now - self.started < self.p.init_hold => Vec::new(),
                None => self.claim(now, "no peer heard"),
            },
            Role::Backup if self.releasing => Vec::new(),
            Role::Backup => match peer {
                None => self.claim(now, "the peer is dead"),
                Some(p) if p.role == Role::Fault => self.claim(now, "the peer is in FAULT"),
                Some(p) if p.role == Role::Master && self.p.preempt && self.outranks(&p) => {
                    // ask; the claim follows once the MASTER has released
                    self.preempting = true;
                    Vec::new()
                }
                Some(p) if p.role != Role::Master && self.outranks(&p) => {
                    self.claim(now, "elected: no MASTER and the peer ranks lower")
                }
                Some(_) => Vec::new(),
            },
            Role::Master => {
                if now - self.last_verify >= self.p.verify_every {
                    self.last_verify = now;
                    return vec![Action::Verify];
                }
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests;
