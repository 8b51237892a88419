//! Watching Consul with blocking queries, the way consul-template and Fabio do it politely:
//! one watch per service on `/v1/health/service/<name>`, `index` + `wait`, a token bucket per
//! watch (not a sleep per loop), a random start jitter, full-jitter backoff on errors with a
//! resync from index 0, and a quiescence window that turns a burst of changes into one
//! Snapshot rebuild. The index rules and the answer parsing are pure and unit-tested
//! (`rules`); `client` is the HTTP side, `watch` the loops, `quiet` the window's clock, and
//! this module the manager that starts and stops watches and applies what they see.

use super::{
    parse_port_tag, parse_route_tag, DiscoveredRoute, ServiceView, Serving, TagRoute, View,
};
use crate::config::{BackendSpec, ConsulSettings, ServiceKey};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

mod quiet;
mod rules;
mod watch;

pub use rules::{
    backoff, changed_services, choose_datacenter, guard_shrink, next_index, parse_checks,
    parse_health, Checks, Failover, TokenBucket,
};
pub use watch::{WatchHealth, WatchTable};
#[allow(clippy::wildcard_imports)]
use {crate::consul::client::*, quiet::*, rules::*, watch::*};

/// The other datacenters, nearest first: `/v1/catalog/datacenters` (Consul sorts it by the
/// estimated round-trip time from its servers) without the agent's own.
async fn nearest_datacenters(settings: &ConsulSettings) -> Result<Vec<String>, String> {
    let http = client(settings)?;
    let quick = quick(settings);
    let (_, own) = consul_get(&http, &quick, "/v1/agent/self", "the agent", None, &[], 0).await?;
    #[derive(Deserialize)]
    struct Agent {
        #[serde(rename = "Config")]
        config: AgentConfig,
    }
    #[derive(Deserialize)]
    struct AgentConfig {
        #[serde(rename = "Datacenter")]
        datacenter: String,
    }
    let own: Agent =
        serde_json::from_slice(&own).map_err(|e| format!("not a /v1/agent/self answer: {e}"))?;
    let (_, list) = consul_get(
        &http,
        &quick,
        "/v1/catalog/datacenters",
        "the datacenters",
        None,
        &[],
        0,
    )
    .await?;
    let list: Vec<String> = serde_json::from_slice(&list)
        .map_err(|e| format!("not a /v1/catalog/datacenters answer: {e}"))?;
    Ok(list
        .into_iter()
        .filter(|dc| *dc != own.config.datacenter)
        .collect())
}

/// The routes the services in Consul's catalog declare now, in tags and meta (one plain read,
/// not a watch): what `tollgate check --consul` judges against the file's policy.
pub async fn declared_routes(settings: &ConsulSettings) -> Result<Vec<DiscoveredRoute>, String> {
    let http = client(settings)?;
    catalog_routes(&http, &quick(settings), 0)
        .await
        .map(|(_, routes)| routes)
}

/// A change seen by a watch.
#[derive(Debug)]
enum Change {
    Service(Update),
    Routes {
        routes: Vec<DiscoveredRoute>,
        received: Instant,
    },
    /// What `tls.consul_kv_prefix` holds now (checked pairs).
    Certs {
        certs: BTreeMap<String, super::KvCert>,
        received: Instant,
    },
}

impl Change {
    fn received(&self) -> Instant {
        match self {
            Change::Service(u) => u.received,
            Change::Routes { received, .. } | Change::Certs { received, .. } => *received,
        }
    }
}

/// A service's new backends.
#[derive(Debug)]
struct Update {
    key: ServiceKey,
    view: ServiceView,
    received: Instant,
}

/// What the Consul manager reads from and applies to the live configuration (implemented by
/// `state::State`; handed in, so discovery does not depend on the state that depends on it).
pub trait Live: Send + Sync {
    /// The Consul settings in force and the services the live pools watch (the file's and
    /// those created for tag-declared routes), sorted, without repeats.
    fn wanted(&self) -> (ConsulSettings, Vec<ServiceKey>);
    /// The pools with failover datacenters: each one's watches, its own first.
    fn failover_groups(&self) -> Vec<Vec<ServiceKey>>;
    /// Does a pool fail over to the nearest datacenters (`View::datacenters` needed)?
    fn nearest_wanted(&self) -> bool;
    /// The Consul view the live configuration was built from.
    fn view(&self) -> Arc<View>;
    /// Build the configuration with `view` and put it live: its generation, or why not.
    fn apply_view(&self, view: View) -> Result<u64, crate::config::ConfigErrors>;
    /// The route conflicts of the live configuration, as they are logged.
    fn route_conflicts(&self) -> Vec<String>;
    /// Where the Consul view is kept across restarts (`consul.state_file`).
    fn state_file(&self) -> Option<std::path::PathBuf>;
}

/// Runs the watches the live configuration needs and applies what they see.
pub struct Manager {
    state: Arc<dyn Live>,
    health: WatchTable,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Manager {
    /// The manager for `state`; its watches note how they are doing in `health` and count
    /// errors, guarded answers and convergence in `metrics`.
    pub fn new(
        state: Arc<dyn Live>,
        health: WatchTable,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Manager {
            state,
            health,
            metrics,
        }
    }

    pub async fn run(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let (tx, mut rx) = mpsc::channel::<Change>(1024);
        let sink = Sink {
            tx: tx.clone(),
            health: self.health.clone(),
            metrics: self.metrics.clone(),
        };
        let mut catalog: Option<tokio::task::JoinHandle<()>> = None;
        let mut certs: Option<tokio::task::JoinHandle<()>> = None;
        let mut watches: BTreeMap<ServiceKey, tokio::task::JoinHandle<()>> = BTreeMap::new();
        let mut settings_in_force: Option<ConsulSettings> = None;
        let mut fallback: Option<(Vec<ServiceKey>, tokio::task::JoinHandle<()>)> = None;
        let mut leaving: BTreeMap<ServiceKey, Instant> = BTreeMap::new();
        let quiet = Quiet::new();
        // which datacenter serves each pool with failover ones (by its group of watches)
        let mut failovers: BTreeMap<Vec<ServiceKey>, Failover> = BTreeMap::new();
        let mut datacenters_read: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            // start and stop watches as pools come and go (checked every second)
            let (settings, keys) = self.state.wanted();
            if settings_in_force.as_ref() != Some(&settings) {
                for (_, h) in std::mem::take(&mut watches) {
                    h.abort();
                }
                if let Some((_, h)) = fallback.take() {
                    h.abort();
                }
                if let Some(h) = catalog.take() {
                    h.abort();
                }
                if let Some(h) = certs.take() {
                    h.abort();
                }
                settings_in_force = Some(settings.clone());
            }
            if settings.tag_routes && catalog.is_none() {
                catalog = Some(tokio::spawn(watch_catalog(settings.clone(), sink.clone())));
            }
            if let (Some(prefix), None) = (&settings.cert_prefix, &certs) {
                certs = Some(tokio::spawn(watch_certs(
                    settings.clone(),
                    prefix.clone(),
                    sink.clone(),
                )));
            }
            if keys.len() > settings.max_blocking {
                // the fallback: one task for all services (restarted when the set changes)
                for (_, h) in std::mem::take(&mut watches) {
                    h.abort();
                }
                if fallback.as_ref().map(|(k, _)| k) != Some(&keys) {
                    if let Some((_, h)) = fallback.take() {
                        h.abort();
                    }
                    let h = tokio::spawn(watch_all(settings.clone(), keys.clone(), sink.clone()));
                    fallback = Some((keys.clone(), h));
                }
            } else {
                if let Some((_, h)) = fallback.take() {
                    h.abort();
                }
                // a watch no pool needs any more is stopped after the grace period, so a
                // route that flaps does not restart it
                let now = Instant::now();
                watches.retain(|k, h| {
                    if keys.contains(k) {
                        leaving.remove(k);
                        return true;
                    }
                    let since = *leaving.entry(k.clone()).or_insert(now);
                    if now.duration_since(since) < settings.watch_grace {
                        return true;
                    }
                    leaving.remove(k);
                    h.abort();
                    self.health.remove(k);
                    false
                });
                for k in keys {
                    watches
                        .entry(k.clone())
                        .or_insert_with(|| tokio::spawn(watch(settings.clone(), k, sink.clone())));
                }
            }

            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {
                    // a failover datacenter hands back once the own one has been well for
                    // `failback_after`: checked every second, rebuilt only on a switch; the
                    // nearest datacenters are read again every 30 s while a pool wants them
                    let groups = self.state.failover_groups();
                    let nearest = self.state.nearest_wanted();
                    if groups.is_empty() && !nearest && failovers.is_empty() {
                        // no pool fails over: nothing to copy the view for
                        continue;
                    }
                    let mut view: View = (*self.state.view()).clone();
                    let mut changed = false;
                    if nearest
                        && datacenters_read.is_none_or(|t| t.elapsed() >= Duration::from_secs(30))
                    {
                        datacenters_read = Some(Instant::now());
                        match nearest_datacenters(&settings).await {
                            Ok(dcs) if dcs != view.datacenters => {
                                tracing::info!(datacenters = ?dcs, "other datacenters, nearest first");
                                view.datacenters = dcs;
                                changed = true;
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "cannot read Consul's datacenters"),
                        }
                    }
                    if self.choose_datacenters(groups, &mut view, &mut failovers, settings.failback_after) || changed {
                        self.publish(view, 0, Instant::now());
                    }
                }
                Some(first) = rx.recv() => {
                    let batch =
                        burst(first, &mut rx, settings.quiescence_min, settings.quiescence_max, |d| quiet.wait(d)).await;
                    self.apply(batch, &mut failovers, settings.failback_after);
                }
            }
        }
        for (_, h) in watches {
            h.abort();
        }
        if let Some((_, h)) = fallback {
            h.abort();
        }
        if let Some(h) = catalog {
            h.abort();
        }
        if let Some(h) = certs {
            h.abort();
        }
    }

    /// For every pool with failover datacenters, choose the one that serves it now
    /// (`choose_datacenter`) and note it in `view.serving`. True when any pool switched.
    fn choose_datacenters(
        &self,
        groups: Vec<Vec<ServiceKey>>,
        view: &mut View,
        failovers: &mut BTreeMap<Vec<ServiceKey>, Failover>,
        hold: Duration,
    ) -> bool {
        failovers.retain(|k, _| groups.contains(k));
        view.serving.retain(|k, _| groups.contains(k));
        let now = Instant::now();
        let mut switched = false;
        for keys in groups {
            // a datacenter whose backends the shrink guard is holding counts as having none
            let counts: Vec<Option<usize>> = keys
                .iter()
                .map(|k| {
                    view.services
                        .get(k)
                        .map(|s| if s.guarded { 0 } else { s.backends.len() })
                })
                .collect();
            let names: Vec<String> = keys
                .iter()
                .map(|k| match &k.datacenter {
                    Some(dc) => dc.clone(),
                    None => "the local datacenter".to_string(),
                })
                .collect();
            let st = failovers.entry(keys.clone()).or_default();
            let before = st.serving;
            if let Some((i, mut reason)) = choose_datacenter(&counts, &names, st, now, hold) {
                let own_guarded = view.services.get(&keys[0]).is_some_and(|s| s.guarded);
                if i > 0 && before == 0 && own_guarded {
                    reason = format!(
                        "the guard holds backends of {} that Consul reports failing (consul.min_fraction); {} has passing instances",
                        names[0], names[i]
                    );
                }
                tracing::warn!(
                    service = %keys[0],
                    from = %names[before],
                    to = %names[i],
                    "pool failover: {reason}"
                );
                switched = true;
                if i == 0 {
                    view.serving.remove(&keys);
                } else {
                    let key = keys[i].clone();
                    view.serving.insert(keys.clone(), Serving { key, reason });
                }
            }
        }
        switched
    }

    fn apply(
        &self,
        batch: Vec<Change>,
        failovers: &mut BTreeMap<Vec<ServiceKey>, Failover>,
        hold: Duration,
    ) {
        let oldest = batch
            .iter()
            .map(Change::received)
            .min()
            .unwrap_or_else(Instant::now);
        let mut view: View = (*self.state.view()).clone();
        for c in &batch {
            match c {
                Change::Service(u) => {
                    tracing::info!(service = %u.key, backends = u.view.backends.len(), index = u.view.index, "Consul change");
                    view.services.insert(u.key.clone(), u.view.clone());
                }
                Change::Routes { routes, .. } => {
                    tracing::info!(routes = routes.len(), "Consul route tags changed");
                    view.routes = routes.clone();
                }
                Change::Certs { certs, .. } => {
                    tracing::info!(
                        certificates = certs.len(),
                        "certificates from Consul KV changed"
                    );
                    view.certs = certs.clone();
                }
            }
        }
        self.choose_datacenters(self.state.failover_groups(), &mut view, failovers, hold);
        self.publish(view, batch.len(), oldest);
    }

    /// Put `view` live (it carries `changes` Consul changes, the oldest received at
    /// `oldest`), save it, and say what changed.
    fn publish(&self, view: View, changes: usize, oldest: Instant) {
        let before = self.state.route_conflicts();
        let file = self.state.state_file();
        match self.state.apply_view(view) {
            Ok(generation) => {
                if let Some(f) = file {
                    if let Err(e) = self.state.view().save(&f) {
                        tracing::warn!(file = %f.display(), error = %e, "cannot save the Consul view; a restart while Consul is down would start with empty Consul pools");
                    }
                }
                let took = oldest.elapsed();
                if changes > 0 {
                    self.metrics.convergence.observe(took);
                }
                tracing::info!(
                    generation,
                    changes,
                    convergence_ms = took.as_secs_f64() * 1000.0,
                    "pools rebuilt from Consul"
                );
                let conflicts = self.state.route_conflicts();
                if conflicts != before {
                    for c in conflicts {
                        tracing::warn!("route conflict: {c}");
                    }
                }
            }
            Err(e) => tracing::error!(
                "Consul change could not be applied: {}",
                e.to_string().trim_end()
            ),
        }
    }
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Manager {
    async fn start(&self, shutdown: pingora::server::ShutdownWatch) {
        self.run(shutdown).await
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn changed_checks_name_their_services_and_node_checks_name_none() {
        let body = |checks: &[(&str, &str, &str, u64)]| {
            let v: Vec<serde_json::Value> = checks
                .iter()
                .map(|(node, id, service, modify)| {
                    serde_json::json!({"Node": node, "CheckID": id, "ServiceName": service,
                        "ModifyIndex": modify, "Status": "passing"})
                })
                .collect();
            parse_checks(serde_json::to_vec(&v).unwrap().as_slice()).unwrap()
        };
        let before = body(&[
            ("n1", "serfHealth", "", 5),
            ("n1", "service:a-1", "a", 10),
            ("n1", "service:b-1", "b", 11),
            ("n1", "service:c-1", "c", 12),
        ]);
        // b's check modified, c's gone, d's new: exactly those services
        let now = body(&[
            ("n1", "serfHealth", "", 5),
            ("n1", "service:a-1", "a", 10),
            ("n1", "service:b-1", "b", 20),
            ("n1", "service:d-1", "d", 21),
        ]);
        let named: Vec<String> = changed_services(&before, &now)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(named, ["b", "c", "d"]);
        assert_eq!(changed_services(&before, &before).unwrap().len(), 0);
        // the node's own check changed: every service on it may have
        let node = body(&[
            ("n1", "serfHealth", "", 30),
            ("n1", "service:a-1", "a", 10),
            ("n1", "service:b-1", "b", 11),
            ("n1", "service:c-1", "c", 12),
        ]);
        assert_eq!(changed_services(&before, &node), None);
        assert!(parse_checks(b"{}").is_err());
    }

    #[test]
    fn datacenter_failover_moves_on_empty_and_comes_back_after_the_hold() {
        use std::time::{Duration, Instant};
        let names: Vec<String> = ["dc1", "dc2", "dc3"].map(String::from).to_vec();
        let hold = Duration::from_secs(30);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut st = Failover::default();
        // the own datacenter not heard from yet: nothing moves, even when another answered
        assert_eq!(
            choose_datacenter(&[None, Some(2), None], &names, &mut st, at(0), hold),
            None
        );
        assert_eq!(
            choose_datacenter(&[Some(3), Some(2), Some(1)], &names, &mut st, at(1), hold),
            None
        );
        // dc1 empties: the first failover datacenter that has instances serves
        let (i, why) =
            choose_datacenter(&[Some(0), Some(0), Some(1)], &names, &mut st, at(2), hold).unwrap();
        assert_eq!(i, 2);
        assert!(
            why.contains("dc1 has no passing instance; dc3 is the first"),
            "{why}"
        );
        // dc2 comes back: no bounce to it (dc3 still serves)
        assert_eq!(
            choose_datacenter(&[Some(0), Some(2), Some(1)], &names, &mut st, at(3), hold),
            None
        );
        // dc1 flaps: back, gone, back; it serves again only after the hold, counted from
        // the last time it came back
        assert_eq!(
            choose_datacenter(&[Some(1), Some(2), Some(1)], &names, &mut st, at(4), hold),
            None
        );
        assert_eq!(
            choose_datacenter(&[Some(0), Some(2), Some(1)], &names, &mut st, at(10), hold),
            None
        );
        assert_eq!(
            choose_datacenter(&[Some(1), Some(2), Some(1)], &names, &mut st, at(11), hold),
            None
        );
        assert_eq!(
            choose_datacenter(&[Some(1), Some(2), Some(1)], &names, &mut st, at(40), hold),
            None
        );
        let (i, why) =
            choose_datacenter(&[Some(1), Some(2), Some(1)], &names, &mut st, at(41), hold).unwrap();
        assert_eq!(i, 0);
        assert!(
            why.contains("dc1 has had passing instances for 30s"),
            "{why}"
        );
        // the serving failover datacenter empties while dc1 is still held off: dc1 at once
        let mut st = Failover {
            serving: 1,
            own_ok_since: Some(at(50)),
        };
        let (i, _) =
            choose_datacenter(&[Some(1), Some(0), Some(1)], &names, &mut st, at(51), hold).unwrap();
        assert_eq!(i, 0);
        // nothing anywhere: the own datacenter (its pool answers 503, saying so)
        let mut st = Failover {
            serving: 2,
            own_ok_since: None,
        };
        let (i, why) =
            choose_datacenter(&[Some(0), Some(0), Some(0)], &names, &mut st, at(60), hold).unwrap();
        assert_eq!(
            (i, why.as_str()),
            (0, "no datacenter has a passing instance")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_becomes_one_batch_and_a_quiet_gap_ends_it() {
        let ms = Duration::from_millis;
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        // watches woken by one Consul index answer within a millisecond of each other
        let sender = tokio::spawn(async move {
            for i in 1..=5 {
                tokio::time::sleep(ms(1)).await;
                tx.send(i).await.unwrap();
            }
            tokio::time::sleep(ms(50)).await; // quiet: the next change is a new burst
            tx.send(6).await.unwrap();
            // a steady stream faster than the window: cut off by the max
            for i in 7..200 {
                tokio::time::sleep(ms(1)).await;
                if tx.send(i).await.is_err() {
                    break;
                }
            }
        });
        let t = tokio::time::Instant::now();
        assert_eq!(
            burst(0, &mut rx, ms(2), ms(150), tokio::time::sleep).await,
            vec![0, 1, 2, 3, 4, 5]
        );
        assert_eq!(t.elapsed(), ms(7), "5 ms of burst, then 2 ms of quiet");
        let first = rx.recv().await.unwrap();
        assert_eq!(first, 6);
        let t = tokio::time::Instant::now();
        let b = burst(first, &mut rx, ms(2), ms(30), tokio::time::sleep).await;
        assert_eq!(t.elapsed(), ms(30), "never longer than max");
        assert!(b.len() >= 25 && b.len() <= 32, "{}", b.len());
        sender.abort();
    }

    use super::*;

    #[tokio::test]
    async fn the_quiet_clock_waits_its_time_again_after_a_cancelled_wait() {
        let quiet = Quiet::new();
        assert!(quiet.0.is_some(), "timerfd is available on Linux");
        let ms = Duration::from_millis;
        // a wait that loses a race leaves the timer armed: the next wait re-arms it
        tokio::select! {
            _ = quiet.wait(ms(50)) => panic!("50 ms cannot pass before 1 ms"),
            _ = tokio::time::sleep(ms(1)) => {}
        }
        for d in [ms(2), ms(5), ms(20)] {
            let t = Instant::now();
            quiet.wait(d).await;
            let took = t.elapsed();
            // at least d; the upper bound only catches a wait that hangs on or fires late by
            // a whole tick of tokio's clock many times over (a loaded CI machine)
            assert!(took >= d && took < d + ms(200), "{d:?} took {took:?}");
        }
        // zero: no wait at all (a zero timerfd setting would disarm, not fire)
        let t = Instant::now();
        quiet.wait(Duration::ZERO).await;
        assert!(t.elapsed() < ms(100));
        // the burst collector with it: a quiet channel ends the burst after min
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        tx.send(1).await.unwrap();
        let t = Instant::now();
        assert_eq!(
            burst(0, &mut rx, ms(3), ms(100), |d| quiet.wait(d)).await,
            vec![0, 1]
        );
        assert!(t.elapsed() >= ms(3), "{:?}", t.elapsed());
    }

    #[test]
    fn index_rules() {
        assert_eq!(next_index(1, Some(10)), 10, "moves forward");
        assert_eq!(next_index(10, Some(10)), 10, "unchanged");
        assert_eq!(
            next_index(10, Some(4)),
            1,
            "backwards resets (and is sent as 1)"
        );
        assert_eq!(next_index(10, Some(0)), 1, "never below 1");
        assert_eq!(next_index(10, None), 1, "no header: start over");
        assert_eq!(next_index(0, Some(0)), 1);
    }

    #[test]
    fn health_answers_become_sorted_backends() {
        let body = br#"[
          {"Node":{"Address":"10.0.0.9"},"Service":{"Address":"","Port":8080,"Weights":{"Passing":3,"Warning":1}}},
          {"Node":{"Address":"10.0.0.2"},"Service":{"Address":"10.1.0.2","Port":9000,"Meta":{"weight":"7"},"Weights":{"Passing":1}}},
          {"Node":{"Address":"10.0.0.3"},"Service":{"Address":"api.internal","Port":9000}},
          {"Node":{"Address":"10.0.0.4"},"Service":{"Address":"10.1.0.4","Port":0}},
          {"Node":{"Address":"10.0.0.5"},"Service":{"Address":"10.1.0.5","Port":1,"Weights":{"Passing":0}}}
        ]"#;
        let (b, skipped) = parse_health(body).unwrap();
        let got: Vec<(String, u32)> = b
            .iter()
            .map(|b| (b.address.to_string(), b.weight))
            .collect();
        assert_eq!(
            got,
            vec![
                ("10.0.0.9:8080".to_string(), 3),
                ("10.1.0.2:9000".to_string(), 7),
                ("10.1.0.5:1".to_string(), 1),
            ]
        );
        assert_eq!(skipped.len(), 2);
        assert!(parse_health(b"{\"not\":\"a list\"}").is_err());
        assert_eq!(parse_health(b"[]").unwrap().0, vec![]);
    }

    fn b(port: u16) -> BackendSpec {
        BackendSpec {
            address: SocketAddr::from(([10, 0, 0, 1], port)),
            weight: 1,
        }
    }

    #[test]
    fn the_shrink_guard_keeps_a_fraction() {
        let old: Vec<BackendSpec> = (1..=10).map(b).collect();
        // 10 -> 2 with min 0.5: three old ones come back to make 5
        let (out, guarded) = guard_shrink(&old, vec![b(9), b(10)], 0.5);
        assert!(guarded);
        assert_eq!(
            out.iter().map(|b| b.address.port()).collect::<Vec<_>>(),
            vec![1, 2, 3, 9, 10]
        );
        // within the fraction: applied as is
        let (out, guarded) = guard_shrink(&old, (1..=6).map(b).collect(), 0.5);
        assert!(!guarded);
        assert_eq!(out.len(), 6);
        // growth and new backends are always taken
        let (out, guarded) = guard_shrink(&old[..2], vec![b(1), b(2), b(50)], 0.9);
        assert!(!guarded);
        assert_eq!(out.len(), 3);
        // empty answers are the other guard's business (instances_exist)
        assert_eq!(guard_shrink(&old, vec![], 0.5), (vec![], false));
    }

    #[test]
    fn backoff_is_full_jitter_and_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        assert_eq!(backoff(0, base, cap, 1.0), base);
        assert_eq!(backoff(3, base, cap, 1.0), Duration::from_millis(800));
        assert_eq!(backoff(30, base, cap, 1.0), cap);
        assert_eq!(backoff(3, base, cap, 0.0), Duration::ZERO);
        assert_eq!(backoff(3, base, cap, 0.5), Duration::from_millis(400));
    }

    #[test]
    fn token_bucket_limits_a_hot_loop() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(5.0, 2.0, t0);
        assert_eq!(b.take(t0), Duration::ZERO);
        assert_eq!(b.take(t0), Duration::ZERO);
        let d = b.take(t0);
        assert!((d.as_secs_f64() - 0.2).abs() < 1e-9, "{d:?}");
        // after a second the bucket is full again (2 tokens)
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.take(t1), Duration::ZERO);
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(urlencode("a b/c&d"), "a%20b%2Fc%26d");
        assert_eq!(urlencode("prod-1.x_~"), "prod-1.x_~");
    }
}
