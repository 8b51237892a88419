use super::*;

const HB: u64 = 200; // heartbeat interval

fn params(name: &str, priority: u8, preempt: bool) -> Params {
    Params {
        name: name.into(),
        priority,
        dead_after: 3 * HB + 100,
        init_hold: 3 * HB + 100,
        preempt,
        claim_min_interval: 1_000,
        claim_backoff_max: 8_000,
        verify_every: 3_000,
        fenced: false,
    }
}

fn fenced(name: &str, priority: u8) -> Params {
    Params {
        fenced: true,
        ..params(name, priority, false)
    }
}

/// Two peers exchanging heartbeats every HB ms while `link` says so.
struct Pair {
    a: Machine,
    b: Machine,
    now: u64,
    a_up: bool,
    b_up: bool,
    link: bool,
    claims: Vec<(String, u64)>,
    /// The Consul lock's holder, for fenced machines (Consul stays reachable to both).
    lock: Option<String>,
    /// Every (time, masters) seen after each step.
    history: Vec<(u64, usize)>,
}

impl Pair {
    fn new(a: Params, b: Params) -> Pair {
        Pair {
            a: Machine::new(a, 0),
            b: Machine::new(b, 0),
            now: 0,
            a_up: true,
            b_up: true,
            link: true,
            claims: Vec::new(),
            lock: None,
            history: Vec::new(),
        }
    }

    /// Advance by `ms` in heartbeat steps; every claim takes.
    fn run(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.now += HB;
            let now = self.now;
            let (ad_a, ad_b) = (self.a.advert(), self.b.advert());
            for (m, up, peer_ad, peer_up) in [
                (&mut self.a, self.a_up, ad_b, self.b_up),
                (&mut self.b, self.b_up, ad_a, self.a_up),
            ] {
                if !up {
                    continue;
                }
                let mut actions = m.handle(now, Event::Tick);
                if let (true, true, Some(ad)) = (self.link, peer_up, peer_ad) {
                    actions.extend(m.handle(now, Event::Heartbeat(ad)));
                }
                let mut work = actions;
                while let Some(act) = (!work.is_empty()).then(|| work.remove(0)) {
                    let name = m.p.name.clone();
                    let more = match act {
                        Action::Claim { term } => {
                            assert!(
                                !m.p.fenced || self.lock.as_deref() == Some(name.as_str()),
                                "{name} claimed without the lock"
                            );
                            self.claims.push((name, term));
                            m.handle(now, Event::ClaimResult(true))
                        }
                        Action::Verify => m.handle(now, Event::VerifyResult(true)),
                        Action::Release => m.handle(now, Event::Released),
                        Action::AcquireLock => {
                            let ok = self.lock.get_or_insert_with(|| name.clone()) == &name;
                            m.handle(now, Event::Lock(ok))
                        }
                        Action::ReleaseLock => {
                            if self.lock.as_deref() == Some(name.as_str()) {
                                self.lock = None;
                            }
                            Vec::new()
                        }
                    };
                    work.extend(more);
                }
            }
            let masters = self.masters().len();
            self.history.push((now, masters));
        }
    }

    fn masters(&self) -> Vec<&str> {
        [(&self.a, self.a_up), (&self.b, self.b_up)]
            .into_iter()
            .filter(|(m, up)| *up && m.role() == Role::Master)
            .map(|(m, _)| m.p.name.as_str())
            .collect()
    }
}

#[test]
fn never_starts_as_master_and_holds_while_no_peer_was_heard() {
    let mut m = Machine::new(params("a", 100, false), 0);
    assert_eq!(m.role(), Role::Init);
    assert_eq!(m.handle(100, Event::Tick), vec![]);
    assert_eq!(m.handle(600, Event::Tick), vec![]);
    assert_eq!(m.role(), Role::Init, "still holding");
    assert_eq!(m.handle(800, Event::Tick), vec![Action::Claim { term: 1 }]);
    assert_eq!(m.role(), Role::Master);
    assert_eq!(m.last_transition().0, "no peer heard");
}

#[test]
fn election_by_priority_then_name_on_simultaneous_start() {
    for (pa, pb, winner) in [(200, 100, "a"), (100, 200, "b"), (100, 100, "b")] {
        let mut p = Pair::new(params("a", pa, false), params("b", pb, false));
        p.run(2_000);
        assert_eq!(p.masters(), vec![winner], "priorities {pa}/{pb}");
        assert_eq!(p.claims.len(), 1, "exactly one claim: {:?}", p.claims);
    }
}

#[test]
fn peer_loss_makes_the_backup_master_within_the_dead_time() {
    let mut p = Pair::new(params("a", 200, false), params("b", 100, false));
    p.run(2_000);
    assert_eq!(p.masters(), vec!["a"]);
    p.a_up = false; // a dies
    let died = p.now;
    while p.masters() != vec!["b"] {
        p.run(HB);
        assert!(p.now - died <= 1_000, "takeover took too long");
    }
    assert_eq!(p.b.term(), 2, "the claim took a higher term");
}

#[test]
fn the_old_master_returns_without_preempt_and_stays_backup() {
    let mut p = Pair::new(params("a", 200, false), params("b", 100, false));
    p.run(2_000);
    p.a_up = false;
    p.run(2_000);
    assert_eq!(p.masters(), vec!["b"]);
    p.a = Machine::new(params("a", 200, false), p.now); // a restarts
    p.a_up = true;
    p.run(5_000);
    assert_eq!(p.masters(), vec!["b"]);
    assert_eq!(p.a.role(), Role::Backup);
}

#[test]
fn the_old_master_returns_with_preempt_and_takes_over_once() {
    let mut p = Pair::new(params("a", 200, true), params("b", 100, true));
    p.run(2_000);
    p.a_up = false;
    p.run(2_000);
    assert_eq!(p.masters(), vec!["b"]);
    p.a = Machine::new(params("a", 200, true), p.now);
    p.a_up = true;
    let claims_before = p.claims.len();
    p.run(5_000);
    assert_eq!(p.masters(), vec!["a"]);
    assert_eq!(p.b.role(), Role::Backup);
    assert_eq!(
        p.b.last_transition().0,
        "yielding to a higher-priority peer that preempts"
    );
    assert_eq!(p.claims.len(), claims_before + 1);
}

#[test]
fn a_healed_split_brain_resolves_to_one_master() {
    let mut p = Pair::new(params("a", 200, false), params("b", 100, false));
    p.run(2_000);
    p.link = false; // the link between the peers is cut: both become master
    p.run(3_000);
    assert_eq!(p.masters().len(), 2);
    p.link = true;
    p.run(HB * 2);
    assert_eq!(
        p.masters().len(),
        1,
        "one master as soon as they hear each other"
    );
}

#[test]
fn fault_releases_stops_advertising_and_recovers_as_backup() {
    let mut m = Machine::new(params("a", 200, false), 0);
    m.handle(800, Event::Tick);
    assert_eq!(m.role(), Role::Master);
    assert_eq!(
        m.handle(900, Event::LocalHealth(false)),
        vec![Action::Release]
    );
    assert_eq!(m.role(), Role::Fault);
    assert_eq!(m.advert(), None, "a FAULT node stops advertising");
    m.handle(950, Event::Released);
    assert_eq!(
        m.handle(5_000, Event::Tick),
        vec![],
        "no claim while unhealthy"
    );
    m.handle(6_000, Event::LocalHealth(true));
    assert_ne!(m.role(), Role::Fault);
    // with no peer it claims again, after the claim interval
    assert_eq!(m.role(), Role::Master);
    assert_eq!(m.term(), 2);
}

#[test]
fn failed_claims_back_off_instead_of_ping_ponging() {
    let mut m = Machine::new(params("a", 200, false), 0);
    let mut claim_times = Vec::new();
    let mut now = 0;
    while now < 30_000 {
        now += 100;
        for a in m.handle(now, Event::Tick) {
            if let Action::Claim { .. } = a {
                claim_times.push(now);
                assert_eq!(
                    m.handle(now, Event::ClaimResult(false)),
                    vec![Action::Release]
                );
                m.handle(now, Event::Released);
            }
        }
    }
    let gaps: Vec<u64> = claim_times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g >= 1_000),
        "claims closer than the minimum: {gaps:?}"
    );
    assert!(
        gaps.windows(2).all(|w| w[1] >= w[0]),
        "the backoff never shrinks: {gaps:?}"
    );
    assert!(
        gaps.iter().any(|g| *g >= 8_000),
        "the backoff reaches its cap: {gaps:?}"
    );
    assert!(
        claim_times.len() <= 8,
        "{} claims in 30 s",
        claim_times.len()
    );
}

#[test]
fn a_master_that_no_longer_holds_the_address_demotes() {
    let mut m = Machine::new(params("a", 200, false), 0);
    m.handle(800, Event::Tick);
    assert_eq!(m.handle(3_000, Event::Tick), vec![]);
    assert_eq!(m.handle(3_900, Event::Tick), vec![Action::Verify]);
    assert_eq!(
        m.handle(3_900, Event::VerifyResult(false)),
        vec![Action::Release]
    );
    assert_eq!(m.role(), Role::Backup);
    assert_eq!(m.last_transition().0, "no longer holds the address");
}

#[test]
fn preemption_hands_over_without_two_masters_at_any_step() {
    let mut p = Pair::new(params("a", 200, true), params("b", 100, false));
    p.a_up = false;
    p.run(3_000);
    assert_eq!(p.masters(), vec!["b"]);
    p.a = Machine::new(params("a", 200, true), p.now);
    p.a_up = true;
    p.history.clear();
    p.run(3_000);
    assert_eq!(p.masters(), vec!["a"]);
    assert!(p.history.iter().all(|(_, n)| *n <= 1), "{:?}", p.history);
    // b yielded (released) before a claimed: a's claim is the last one
    assert_eq!(p.claims.last().map(|c| c.0.as_str()), Some("a"));
    assert_eq!(
        p.b.last_transition().0,
        "yielding to a higher-priority peer that preempts"
    );
}

#[test]
fn a_master_keeps_advertising_master_until_its_release_is_done() {
    let mut m = Machine::new(params("b", 100, false), 0);
    m.handle(1_000, Event::Tick); // no peer heard: claims
    assert_eq!(m.role(), Role::Master);
    let asks = Advert {
        name: "a".into(),
        priority: 200,
        term: 0,
        role: Role::Backup,
        preempting: true,
    };
    assert_eq!(
        m.handle(1_100, Event::Heartbeat(asks)),
        vec![Action::Release]
    );
    assert_eq!(m.role(), Role::Backup);
    assert_eq!(m.advert().unwrap().role, Role::Master, "still releasing");
    m.handle(1_150, Event::Released);
    assert_eq!(m.advert().unwrap().role, Role::Backup);
}

#[test]
fn fenced_a_cut_peer_link_still_makes_one_master() {
    let mut p = Pair::new(fenced("a", 200), fenced("b", 100));
    p.run(2_000);
    assert_eq!(p.masters(), vec!["a"]);
    assert_eq!(p.lock.as_deref(), Some("a"));
    // the heartbeat link goes, Consul does not: b thinks a is dead, but cannot get the lock
    p.link = false;
    p.run(30_000);
    assert_eq!(p.masters(), vec!["a"]);
    assert!(
        p.history.iter().all(|(_, n)| *n <= 1),
        "two masters at once: {:?}",
        p.history
    );
    assert!(
        p.claims.iter().all(|(n, _)| n == "a"),
        "b claimed: {:?}",
        p.claims
    );
    assert_eq!(p.b.role(), Role::Backup);
    assert!(!p.b.lock_held());
}

#[test]
fn fenced_the_standby_waits_for_a_dead_masters_lock_then_claims() {
    let mut p = Pair::new(fenced("a", 200), fenced("b", 100));
    p.run(2_000);
    assert_eq!(p.masters(), vec!["a"]);
    p.a_up = false; // a dies; its session lives until the TTL runs out
    p.run(5_000);
    assert_eq!(
        p.b.role(),
        Role::Backup,
        "b must not claim while a's lock lives"
    );
    p.lock = None; // the TTL ran out: Consul released the lock
    p.run(2_000);
    assert_eq!(p.masters(), vec!["b"]);
    assert_eq!(p.lock.as_deref(), Some("b"));
}

#[test]
fn fenced_losing_the_lock_releases_the_address_then_the_lock() {
    let mut m = Machine::new(fenced("a", 200), 0);
    assert_eq!(m.handle(1_000, Event::Tick), vec![Action::AcquireLock]);
    // no second try before claim_min_interval
    assert_eq!(m.handle(1_200, Event::Tick), vec![]);
    assert!(matches!(
        m.handle(1_300, Event::Lock(true))[..],
        [Action::Claim { .. }]
    ));
    assert_eq!(m.role(), Role::Master);
    assert_eq!(
        m.handle(2_000, Event::Lock(false)),
        vec![Action::Release],
        "the session is gone: nothing left to release in Consul"
    );
    assert_eq!(m.role(), Role::Backup);
    // a local fault gives up the address first, then the lock
    let mut m = Machine::new(fenced("a", 200), 0);
    m.handle(1_000, Event::Tick);
    m.handle(1_100, Event::Lock(true));
    assert_eq!(
        m.handle(1_200, Event::LocalHealth(false)),
        vec![Action::Release, Action::ReleaseLock]
    );
    // a refused lock leaves the node BACKUP
    let mut m = Machine::new(fenced("b", 100), 0);
    m.handle(1_000, Event::Tick);
    assert_eq!(m.handle(1_100, Event::Lock(false)), vec![]);
    assert_eq!(m.role(), Role::Backup);
}
