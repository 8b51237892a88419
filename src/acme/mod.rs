//! ACME (RFC 8555) certificates, through instant-acme: the account kept in
//! `[acme].storage` (`account.json`, reused), an order (`ordered_names`) for each `acme = true`
//! vhost and for the names of other vhosts no certificate covers, when there is no
//! certificate yet or it has passed 2/3 of its lifetime; the challenge answered through
//! `tls::Challenges` (which the proxy and `proxy::sni` serve); the certificate and key written
//! to `storage/certs/` (which the certificate store reads like `tls.certs_dir`) and swapped in
//! live by a reload. A failed order leaves whatever certificate there is serving and is
//! retried with backoff (1 min doubling to 6 h), so a refusing CA never sees a retry storm.
//! With `consul = true` a fleet shares one issuer (a renewed Consul lock), one sealed state
//! (`kv`), one backoff, and every instance follows it (`follow`).
//! Must not touch requests beyond the challenge answers it hands the proxy.

mod follow;
mod kv;
mod order;

pub use kv::Kv;

use crate::config::AcmeSettings;
use crate::state::State;
use crate::tls::Challenges;
use async_trait::async_trait;
use follow::follow;
use instant_acme::Account;
use order::{issue, load_or_create_account};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// How long a challenge answer stays valid after its order set it up: the order's own
/// validation wait (90 s) with room to spare. An answer past it is not served, and a new
/// issuer deletes it.
pub const CHALLENGE_LIFETIME_SECS: i64 = 300;

/// Orders and renews the live configuration's ACME certificates.
pub struct Issuer {
    state: Arc<State>,
    challenges: Challenges,
}

impl Issuer {
    pub fn new(state: Arc<State>, challenges: Challenges) -> Self {
        Issuer { state, challenges }
    }
}

/// The name sets ACME orders for (one certificate each): every `acme = true` vhost's names,
/// and, of every other vhost without `cert`/`key`, the names no certificate from elsewhere
/// (files, Consul KV) covers, wildcards aside (HTTP-01 and TLS-ALPN-01 cannot prove them).
/// None without a TLS listener. Consul-declared hosts are not ordered: a service tag must
/// not be able to spend the CA's rate limit.
pub fn ordered_names(
    config: &crate::config::Config,
    certs: &crate::tls::CertStore,
    acme_dir: &Path,
) -> Vec<Vec<String>> {
    if !config.has_tls() {
        return Vec::new();
    }
    let elsewhere = |n: &str| {
        certs
            .infos
            .iter()
            .any(|i| !i.source.starts_with(acme_dir) && i.covers(n))
    };
    config
        .vhosts
        .iter()
        .filter_map(|v| {
            if v.acme {
                return Some(v.names.clone());
            }
            if v.cert.is_some() {
                return None;
            }
            let names: Vec<String> = v
                .names
                .iter()
                .filter(|n| !n.starts_with('*') && !elsewhere(n))
                .cloned()
                .collect();
            (!names.is_empty()).then_some(names)
        })
        .collect()
}

/// Whether `names` need a new certificate at `now_unix`: none issued that covers them all, or
/// the one there is past 2/3 of its lifetime.
pub fn renewal_due(
    certs: &crate::tls::CertStore,
    dir: &Path,
    names: &[String],
    now_unix: i64,
) -> bool {
    let issued = certs
        .infos
        .iter()
        .filter(|i| i.source.starts_with(dir))
        .find(|i| {
            names
                .iter()
                .all(|n| i.names.iter().any(|c| c.eq_ignore_ascii_case(n)))
        });
    issued.is_none_or(|i| now_unix >= renew_at(i))
}

/// When an issued certificate is renewed: at 2/3 of its lifetime (Let's Encrypt's advice:
/// 30 days before the end of a 90-day certificate).
pub fn renew_at(c: &crate::tls::CertInfo) -> i64 {
    c.not_before + (c.not_after - c.not_before) * 2 / 3
}

/// A name set's failures in a row and when it may be ordered again (Unix seconds). Kept in
/// KV (sealed) when a fleet shares issuance, so the backoff is the fleet's, not each
/// issuer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Backoff {
    pub failures: u32,
    pub retry_at: i64,
}

impl Backoff {
    /// After one more failure at `now`: 1 minute, doubling, at most 6 hours.
    pub fn after_failure(prev: Option<Backoff>, now: i64) -> Backoff {
        let failures = prev.map_or(0, |b| b.failures).saturating_add(1);
        let wait = (60i64 << (failures - 1).min(9)).min(6 * 3600);
        Backoff {
            failures,
            retry_at: now + wait,
        }
    }
}

/// The file name (and KV key) a name set's certificate is stored under: its first name.
fn stem(names: &[String]) -> String {
    names[0].replace(['/', '\\'], "_")
}

/// What a fleet shares through Consul, for the settings it was made with: the KV store, the
/// follower task and the issuer lock.
struct Shared {
    cfg: AcmeSettings,
    kv: Arc<Kv>,
    task: tokio::task::JoinHandle<()>,
    lock: crate::consul::Lock,
}

impl Shared {
    async fn stop(mut self) {
        self.task.abort();
        self.lock.destroy().await;
    }
}

#[async_trait]
impl BackgroundService for Issuer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut account: Option<(String, Account)> = None;
        let mut shared: Option<Shared> = None;
        let mut issuing = false;
        // per name set, this instance's view of the backoff (the fleet's is in KV)
        let mut backoff: HashMap<Vec<String>, Backoff> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    // the lock is freed at once, not after its TTL
                    if let Some(s) = shared.take() {
                        s.stop().await;
                    }
                    return;
                }
                _ = tick.tick() => {}
            }
            let snap = self.state.snapshot();
            let Some(cfg) = snap.config.acme.clone() else {
                if let Some(s) = shared.take() {
                    s.stop().await;
                }
                issuing = false;
                continue;
            };
            if shared.as_ref().map(|s| &s.cfg) != Some(&cfg) {
                if let Some(s) = shared.take() {
                    s.stop().await;
                    issuing = false;
                }
                if let Some((prefix, key_file)) = &cfg.consul {
                    let made = Kv::new(&snap.config.consul, prefix, key_file).and_then(|kv| {
                        let lock = crate::consul::Lock::new(
                            &snap.config.consul,
                            &crate::config::ConsulLock {
                                key: format!("{prefix}/lock"),
                                ttl: Duration::from_secs(15),
                            },
                            &format!("acme-{}", std::process::id()),
                        )?;
                        Ok((Arc::new(kv), lock))
                    });
                    match made {
                        Ok((kv, lock)) => {
                            let task = tokio::spawn(follow(
                                self.state.clone(),
                                cfg.clone(),
                                kv.clone(),
                                self.challenges.clone(),
                            ));
                            shared = Some(Shared {
                                cfg: cfg.clone(),
                                kv,
                                task,
                                lock,
                            });
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "ACME sharing through Consul cannot start");
                            continue;
                        }
                    }
                }
            }
            let kv = shared.as_ref().map(|s| s.kv.clone());
            if let Some(s) = shared.as_mut() {
                // one issuer at a time: the others load what it stores. The session is
                // renewed on every tick (its TTL is 15 s): a holder that stops renewing
                // loses the lock, and only then may another instance order.
                if issuing && !matches!(s.lock.renew().await, Ok(true)) {
                    tracing::warn!("the ACME issuer lock's session lapsed; taking the lock again");
                    issuing = false;
                }
                match s.lock.acquire().await {
                    Ok(true) if !issuing => {
                        issuing = true;
                        // the fleet's backoff is read afresh: another issuer may have
                        // failed (or succeeded) since this one last held the lock
                        backoff.clear();
                        tracing::info!("this instance issues ACME certificates for the fleet");
                        // what an earlier issuer left pending is deleted only once its
                        // order's deadline has passed (or if it is not this fleet's)
                        s.kv.delete_stale_challenges(crate::clock::unix_secs() as i64)
                            .await;
                    }
                    Ok(true) => {}
                    Ok(false) => {
                        issuing = false;
                        continue;
                    }
                    Err(e) => {
                        issuing = false;
                        tracing::warn!(error = %e, "the ACME issuer lock is unavailable");
                        continue;
                    }
                }
            }
            let now = crate::clock::unix_secs() as i64;
            self.state.lasting.metrics.acme_checks.fetch_add(1, Relaxed);
            for names in ordered_names(&snap.config, &snap.certs, &cfg.certs_dir()) {
                if !renewal_due(&snap.certs, &cfg.certs_dir(), &names, now) {
                    backoff.remove(&names);
                    continue;
                }
                // the fleet's backoff, when shared: whoever failed last, every issuer waits.
                // Read once per name set after taking the lock: while this instance holds
                // it, nobody else writes it, so its own copy stays true.
                if let (Some(kv), false) = (&kv, backoff.contains_key(&names)) {
                    match kv.backoff(&stem(&names)).await {
                        Ok(Some(b)) => {
                            if now < b.retry_at {
                                tracing::info!(names = ?names, failures = b.failures, retry_in_secs = b.retry_at - now, "ACME orders for these names wait for the fleet's backoff");
                            }
                            backoff.insert(names.clone(), b);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(names = ?names, error = %e, "the fleet's ACME backoff cannot be read; not ordering");
                            continue;
                        }
                    }
                }
                if backoff.get(&names).is_some_and(|b| now < b.retry_at) {
                    continue;
                }
                let acct = match &account {
                    Some((dir, a)) if *dir == cfg.directory => a.clone(),
                    _ => match load_or_create_account(&cfg, kv.as_deref()).await {
                        Ok(a) => {
                            account = Some((cfg.directory.clone(), a.clone()));
                            a
                        }
                        Err(e) => {
                            let wait = note_failure(&mut backoff, &names, kv.as_deref()).await;
                            tracing::error!(directory = %cfg.directory, error = %e, retry_in = ?wait, "ACME account unavailable; certificates keep serving as they are");
                            continue;
                        }
                    },
                };
                tracing::info!(names = ?names, "ordering an ACME certificate");
                let order = issue(&acct, &cfg, &names, &self.challenges, kv.as_deref());
                let outcome = match shared.as_mut() {
                    Some(s) => renewing(&mut s.lock, order).await,
                    None => Some(order.await),
                };
                match outcome {
                    None => {
                        // fenced: another instance may take the lock and order now
                        issuing = false;
                        tracing::error!(names = ?names, "the ACME issuer lock was lost during the order; abandoning it");
                        break;
                    }
                    Some(Ok(path)) => {
                        backoff.remove(&names);
                        if let Some(kv) = &kv {
                            kv.clear_backoff(&stem(&names)).await;
                        }
                        tracing::info!(names = ?names, file = %path.display(), "ACME certificate issued");
                        if let Err(e) = self.state.reload() {
                            tracing::error!("the issued certificate could not be loaded: {e}");
                        }
                    }
                    Some(Err(e)) => {
                        let wait = note_failure(&mut backoff, &names, kv.as_deref()).await;
                        tracing::error!(names = ?names, error = %e, retry_in = ?wait, "ACME order failed; the current certificate (if any) keeps serving");
                        let soon = snap.certs.infos.iter().find(|i| {
                            i.source.starts_with(cfg.certs_dir())
                                && names.iter().all(|n| i.names.contains(n))
                                && i.not_after - now < 14 * 86_400
                        });
                        if let Some(i) = soon {
                            tracing::warn!(names = ?names, days_left = (i.not_after - now) / 86_400, "certificate expires within 14 days and its renewal is failing");
                        }
                    }
                }
            }
        }
    }
}

/// Run an order while renewing the issuer lock's session; `None` when the session is lost
/// (the order is dropped: another instance may hold the lock by now).
async fn renewing<T>(
    lock: &mut crate::consul::Lock,
    order: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(order);
    let mut renew = tokio::time::interval(lock.renew_every());
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            done = &mut order => return Some(done),
            _ = renew.tick() => match lock.renew().await {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) if lock.may_have_expired() => {
                    tracing::warn!(error = %e, "the ACME issuer lock cannot be renewed");
                    return None;
                }
                Err(e) => tracing::warn!(error = %e, "ACME issuer lock renewal failed; retrying"),
            },
        }
    }
}

/// Note a failure for `names`: the next backoff, kept here and (shared) in KV for the fleet.
async fn note_failure(
    backoff: &mut HashMap<Vec<String>, Backoff>,
    names: &[String],
    kv: Option<&Kv>,
) -> Duration {
    let now = crate::clock::unix_secs() as i64;
    let next = Backoff::after_failure(backoff.get(names).copied(), now);
    backoff.insert(names.to_vec(), next);
    if let Some(kv) = kv {
        if let Err(e) = kv.set_backoff(&stem(names), next).await {
            tracing::warn!(names = ?names, error = %e, "the fleet's ACME backoff could not be saved");
        }
    }
    Duration::from_secs((next.retry_at - now).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{CertInfo, CertStore};

    #[test]
    fn renewal_at_two_thirds_of_the_lifetime() {
        let dir = Path::new("/var/lib/tollgate/acme/certs");
        let mut store = CertStore::default();
        let names = vec!["a.test".to_string(), "www.a.test".to_string()];
        // nothing issued yet
        assert!(renewal_due(&store, dir, &names, 1_000));
        store.infos.push(CertInfo {
            names: names.clone(),
            not_before: 0,
            not_after: 90 * 86_400,
            source: dir.join("a.test.crt"),
        });
        assert!(!renewal_due(&store, dir, &names, 59 * 86_400));
        assert!(renewal_due(&store, dir, &names, 60 * 86_400));
        // a certificate that covers only some of the names does not count
        assert!(renewal_due(
            &store,
            dir,
            &["a.test".into(), "b.test".into()],
            0
        ));
        // nor one from a file elsewhere (the operator's, not ACME's)
        store.infos[0].source = "/etc/certs/a.test.crt".into();
        assert!(renewal_due(&store, dir, &names, 0));
    }

    #[test]
    fn names_no_certificate_covers_are_ordered_wildcards_and_own_certificates_aside() {
        let text = "[acme]\ndirectory = \"https://ca.test/dir\"\n\
            [[listener]]\naddress = \"127.0.0.1:80\"\n\
            [[listener]]\naddress = \"127.0.0.1:443\"\ntls = true\n\
            [[vhost]]\nnames = [\"opt.test\"]\nacme = true\n[[vhost.route]]\npath = \"/\"\npool = \"p\"\n\
            [[vhost]]\nnames = [\"auto.test\", \"filed.test\", \"x.wild.test\"]\n[[vhost.route]]\npath = \"/\"\npool = \"p\"\n\
            [[vhost]]\nnames = [\"own.test\"]\ncert = \"o.crt\"\nkey = \"o.key\"\n[[vhost.route]]\npath = \"/\"\npool = \"p\"\n\
            [[vhost]]\nnames = [\"*.star.test\"]\n[[vhost.route]]\npath = \"/\"\npool = \"p\"\n\
            [pool.p]\nbackends = [\"127.0.0.1:1\"]\n";
        let cfg = crate::config::Config::parse(Path::new("/etc/tollgate/t.toml"), text).unwrap();
        let dir = cfg.acme.as_ref().unwrap().certs_dir();
        let mut store = CertStore::default();
        store.infos.push(CertInfo {
            names: vec!["filed.test".into(), "*.wild.test".into()],
            not_before: 0,
            not_after: 1,
            source: "/etc/certs/filed.crt".into(),
        });
        // an ACME certificate for auto.test does not take it off the list (it is renewed)
        store.infos.push(CertInfo {
            names: vec!["auto.test".into()],
            not_before: 0,
            not_after: 1,
            source: dir.join("auto.test.crt"),
        });
        assert_eq!(
            ordered_names(&cfg, &store, &dir),
            vec![vec!["opt.test".to_string()], vec!["auto.test".to_string()]]
        );
    }
}
