//! ACME (RFC 8555) certificates for `acme = true` vhosts, through instant-acme: the account
//! kept in `[acme].storage` (`account.json`, reused), an order for each such vhost's names
//! that has no certificate yet or whose certificate has passed 2/3 of its lifetime, HTTP-01
//! answered by the proxy from `Challenges`, the certificate and key written to
//! `storage/certs/` (which the certificate store reads like `tls.certs_dir`) and swapped in
//! live by a reload. A failed order leaves whatever certificate there is serving and is
//! retried with backoff (1 min doubling to 6 h), so a refusing CA never sees a retry storm.
//! Must not touch requests beyond the challenge answers it hands the proxy.

use crate::config::AcmeSettings;
use crate::state::State;
use async_trait::async_trait;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The HTTP-01 answers pending now: token → key authorization.
#[derive(Debug, Clone, Default)]
pub struct Challenges(Arc<Mutex<HashMap<String, String>>>);

/// Where HTTP-01 looks for the answer.
pub const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

impl Challenges {
    /// The key authorization for `token`, while its order is under way.
    pub fn answer(&self, token: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned()
    }

    fn set(&self, token: &str, key_auth: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.to_string(), key_auth.to_string());
    }

    fn remove(&self, token: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token);
    }
}

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

#[async_trait]
impl BackgroundService for Issuer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut account: Option<(String, Account)> = None;
        // per name set: failures in a row, and when to try again
        let mut backoff: HashMap<Vec<String>, (u32, Instant)> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            let snap = self.state.snapshot();
            let Some(cfg) = snap.config.acme.clone() else {
                continue;
            };
            let now = crate::clock::unix_secs() as i64;
            for v in snap.config.vhosts.iter().filter(|v| v.acme) {
                let names = v.names.clone();
                if !renewal_due(&snap.certs, &cfg.certs_dir(), &names, now) {
                    backoff.remove(&names);
                    continue;
                }
                if backoff
                    .get(&names)
                    .is_some_and(|(_, at)| Instant::now() < *at)
                {
                    continue;
                }
                let acct = match &account {
                    Some((dir, a)) if *dir == cfg.directory => a.clone(),
                    _ => match load_or_create_account(&cfg).await {
                        Ok(a) => {
                            account = Some((cfg.directory.clone(), a.clone()));
                            a
                        }
                        Err(e) => {
                            let wait = note_failure(&mut backoff, &names);
                            tracing::error!(directory = %cfg.directory, error = %e, retry_in = ?wait, "ACME account unavailable; certificates keep serving as they are");
                            continue;
                        }
                    },
                };
                tracing::info!(names = ?names, "ordering an ACME certificate");
                match issue(&acct, &cfg, &names, &self.challenges).await {
                    Ok(path) => {
                        backoff.remove(&names);
                        tracing::info!(names = ?names, file = %path.display(), "ACME certificate issued");
                        if let Err(e) = self.state.reload() {
                            tracing::error!("the issued certificate could not be loaded: {e}");
                        }
                    }
                    Err(e) => {
                        let wait = note_failure(&mut backoff, &names);
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

fn note_failure(backoff: &mut HashMap<Vec<String>, (u32, Instant)>, names: &[String]) -> Duration {
    let e = backoff.entry(names.to_vec()).or_insert((0, Instant::now()));
    e.0 += 1;
    let wait =
        Duration::from_secs(60 * (1u64 << (e.0 - 1).min(9))).min(Duration::from_secs(6 * 3600));
    e.1 = Instant::now() + wait;
    wait
}

fn builder(cfg: &AcmeSettings) -> Result<instant_acme::AccountBuilder, String> {
    match &cfg.ca_bundle {
        Some(pem) => Account::builder_with_root(pem)
            .map_err(|e| format!("acme.ca_bundle {}: {e}", pem.display())),
        None => Account::builder().map_err(|e| e.to_string()),
    }
}

/// The account in `storage/account.json` for this directory, or a new one (saved, 0600).
async fn load_or_create_account(cfg: &AcmeSettings) -> Result<Account, String> {
    let path = cfg.storage.join("account.json");
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Saved {
        directory: String,
        credentials: AccountCredentials,
    }
    if let Ok(text) = std::fs::read_to_string(&path) {
        match serde_json::from_str::<Saved>(&text) {
            Ok(saved) if saved.directory == cfg.directory => {
                return builder(cfg)?
                    .from_credentials(saved.credentials)
                    .await
                    .map_err(|e| format!("the saved account {}: {e}", path.display()));
            }
            Ok(_) => {
                tracing::info!(file = %path.display(), "the saved ACME account is for another directory: creating one")
            }
            Err(e) => return Err(format!("{} is not an account file: {e}", path.display())),
        }
    }
    let contact = cfg.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder(cfg)?
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            cfg.directory.clone(),
            None,
        )
        .await
        .map_err(|e| format!("creating an account at {}: {e}", cfg.directory))?;
    let saved = serde_json::to_vec_pretty(&Saved {
        directory: cfg.directory.clone(),
        credentials,
    })
    .map_err(|e| e.to_string())?;
    write_private(&path, &saved).map_err(|e| format!("cannot save {}: {e}", path.display()))?;
    tracing::info!(file = %path.display(), "ACME account created and saved");
    Ok(account)
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // written beside, then renamed: a reader never sees half a file
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

/// One order for `names`, HTTP-01 for each; the certificate and its key written to
/// `storage/certs/<first name>.crt` and `.key` (the key first).
async fn issue(
    account: &Account,
    cfg: &AcmeSettings,
    names: &[String],
    challenges: &Challenges,
) -> Result<std::path::PathBuf, String> {
    let ids: Vec<Identifier> = names.iter().map(|n| Identifier::Dns(n.clone())).collect();
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(|e| format!("new order: {e}"))?;
    let mut tokens = Vec::new();
    let result = async {
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let mut a = a.map_err(|e| format!("authorization: {e}"))?;
            match a.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                s => return Err(format!("authorization is {s:?}")),
            }
            let mut ch = a
                .challenge(ChallengeType::Http01)
                .ok_or("the CA offers no http-01 challenge")?;
            let key_auth = ch.key_authorization();
            challenges.set(&ch.token, key_auth.as_str());
            tokens.push(ch.token.clone());
            ch.set_ready()
                .await
                .map_err(|e| format!("challenge: {e}"))?;
        }
        let retry = RetryPolicy::default().timeout(Duration::from_secs(90));
        let status = order
            .poll_ready(&retry)
            .await
            .map_err(|e| format!("waiting for validation: {e}"))?;
        if status != OrderStatus::Ready {
            return Err(format!(
                "the order is {status:?} (the CA could not validate the names)"
            ));
        }
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let csr = rcgen::CertificateParams::new(names.to_vec())
            .and_then(|p| p.serialize_request(&key))
            .map_err(|e| format!("CSR: {e}"))?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(|e| format!("finalize: {e}"))?;
        let chain = order
            .poll_certificate(&retry)
            .await
            .map_err(|e| format!("certificate: {e}"))?;
        Ok((key.serialize_pem(), chain))
    }
    .await;
    for t in &tokens {
        challenges.remove(t);
    }
    let (key, chain) = result?;
    let dir = cfg.certs_dir();
    let stem = names[0].replace(['/', '\\'], "_");
    let (crt, keyf) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    write_private(&keyf, key.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", keyf.display()))?;
    write_private(&crt, chain.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", crt.display()))?;
    Ok(crt)
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
}
