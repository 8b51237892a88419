//! ACME (RFC 8555) certificates for `acme = true` vhosts, through instant-acme: the account
//! kept in `[acme].storage` (`account.json`, reused), an order for each such vhost's names
//! that has no certificate yet or whose certificate has passed 2/3 of its lifetime, HTTP-01
//! answered by the proxy from `Challenges`, the certificate and key written to
//! `storage/certs/` (which the certificate store reads like `tls.certs_dir`) and swapped in
//! live by a reload. A failed order leaves whatever certificate there is serving and is
//! retried with backoff (1 min doubling to 6 h), so a refusing CA never sees a retry storm.
//! Must not touch requests beyond the challenge answers it hands the proxy.

use crate::config::{AcmeChallenge, AcmeSettings};
use crate::state::State;
use crate::tls::write_private;
use async_trait::async_trait;
use base64::Engine;
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

/// The challenge answers pending now: HTTP-01 (token → key authorization) and TLS-ALPN-01
/// (name → the self-signed certificate carrying the key authorization's digest).
#[derive(Debug, Clone, Default)]
pub struct Challenges(Arc<Mutex<Answers>>);

#[derive(Debug, Default)]
struct Answers {
    http: HashMap<String, String>,
    alpn: HashMap<String, Arc<rustls::sign::CertifiedKey>>,
}

/// Where HTTP-01 looks for the answer.
pub const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// The ALPN protocol of a TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

impl Challenges {
    fn pending(&self) -> std::sync::MutexGuard<'_, Answers> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The key authorization for `token`, while its order is under way.
    pub fn answer(&self, token: &str) -> Option<String> {
        self.pending().http.get(token).cloned()
    }

    /// The TLS-ALPN-01 certificate for `name`, while its order is under way.
    pub fn alpn_cert(&self, name: &str) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.pending().alpn.get(&name.to_ascii_lowercase()).cloned()
    }

    fn set(&self, token: &str, key_auth: &str) {
        self.pending()
            .http
            .insert(token.to_string(), key_auth.to_string());
    }

    fn remove(&self, token: &str) {
        self.pending().http.remove(token);
    }

    /// Answer TLS-ALPN-01 for `name` with a certificate carrying `digest` (the SHA-256 of the
    /// key authorization).
    fn set_alpn(&self, name: &str, digest: &[u8]) -> Result<(), String> {
        let cert = alpn_certificate(name, digest)?;
        self.pending()
            .alpn
            .insert(name.to_ascii_lowercase(), Arc::new(cert));
        Ok(())
    }

    fn remove_alpn(&self, name: &str) {
        self.pending().alpn.remove(&name.to_ascii_lowercase());
    }
}

/// RFC 8737 §3: a self-signed certificate for `name` alone with the critical acmeIdentifier
/// extension holding `digest`. Any key does; a new one each time.
fn alpn_certificate(name: &str, digest: &[u8]) -> Result<rustls::sign::CertifiedKey, String> {
    if digest.len() != 32 {
        return Err(format!(
            "a key authorization digest of {} bytes",
            digest.len()
        ));
    }
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| e.to_string())?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| e.to_string())?;
    Ok(rustls::sign::CertifiedKey::new(
        vec![cert.der().clone()],
        signer,
    ))
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

#[async_trait]
impl BackgroundService for Issuer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut account: Option<(String, Account)> = None;
        // shared through Consul: the KV store, the follower task and the issuer lock, for
        // the settings they were made with
        type Shared = (
            AcmeSettings,
            Arc<Kv>,
            tokio::task::JoinHandle<()>,
            crate::failover::lock::Lock,
        );
        let mut shared: Option<Shared> = None;
        let mut issuing = false;
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
            if shared.as_ref().map(|s| &s.0) != Some(&cfg) {
                if let Some((_, _, task, mut lock)) = shared.take() {
                    task.abort();
                    lock.destroy().await;
                }
                if let Some((prefix, key_file)) = &cfg.consul {
                    let made = Kv::new(&snap.config.consul, prefix, key_file).and_then(|kv| {
                        let lock = crate::failover::lock::Lock::new(
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
                            shared = Some((cfg.clone(), kv, task, lock));
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "ACME sharing through Consul cannot start");
                            continue;
                        }
                    }
                }
            }
            let kv = shared.as_ref().map(|s| s.1.clone());
            if let Some((_, _, _, lock)) = shared.as_mut() {
                // one issuer at a time: the others load what it stores
                match lock.acquire().await {
                    Ok(true) if !issuing => {
                        // a new issuer: what an earlier one left pending is stale
                        issuing = true;
                        tracing::info!("this instance issues ACME certificates for the fleet");
                        if let Some(kv) = &kv {
                            kv.delete_tree("challenges").await;
                            kv.delete_tree("alpn").await;
                        }
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
            for names in ordered_names(&snap.config, &snap.certs, &cfg.certs_dir()) {
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
                    _ => match load_or_create_account(&cfg, kv.as_deref()).await {
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
                match issue(&acct, &cfg, &names, &self.challenges, kv.as_deref()).await {
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

#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    directory: String,
    credentials: AccountCredentials,
}

/// The account in `storage/account.json` (or, shared, in Consul KV) for this directory, or a
/// new one (saved, 0600, and in KV).
async fn load_or_create_account(cfg: &AcmeSettings, kv: Option<&Kv>) -> Result<Account, String> {
    let path = cfg.storage.join("account.json");
    let shared = match kv {
        Some(kv) => kv.get_sealed("account").await?,
        None => None,
    };
    let text = match shared {
        Some(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        None => std::fs::read_to_string(&path).ok(),
    };
    if let Some(text) = text {
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
    if let Some(kv) = kv {
        kv.put_sealed("account", &saved).await?;
    }
    tracing::info!(file = %path.display(), shared = kv.is_some(), "ACME account created and saved");
    Ok(account)
}

/// One order for `names`, HTTP-01 for each; the certificate and its key written to
/// `storage/certs/<first name>.crt` and `.key` (the key first).
async fn issue(
    account: &Account,
    cfg: &AcmeSettings,
    names: &[String],
    challenges: &Challenges,
    kv: Option<&Kv>,
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
            let tls_alpn = cfg.challenge == AcmeChallenge::TlsAlpn01;
            let kind = if tls_alpn {
                ChallengeType::TlsAlpn01
            } else {
                ChallengeType::Http01
            };
            let mut ch = a
                .challenge(kind.clone())
                .ok_or_else(|| format!("the CA offers no {} challenge", cfg.challenge.name()))?;
            let key_auth = ch.key_authorization();
            let pending = if tls_alpn {
                let Identifier::Dns(name) = ch.identifier().identifier.clone() else {
                    return Err("tls-alpn-01 for an identifier that is not a DNS name".into());
                };
                let digest = key_auth.digest();
                challenges.set_alpn(&name, digest.as_ref())?;
                Pending::Alpn(name, b64().encode(digest.as_ref()))
            } else {
                challenges.set(&ch.token, key_auth.as_str());
                Pending::Http(ch.token.clone(), key_auth.as_str().to_string())
            };
            if let Some(kv) = kv {
                // every instance answers it: the CA may ask any of them
                let (key, value) = pending.kv_entry();
                kv.put(&key, value.into_bytes()).await?;
                // give the others' watches a moment to see it
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            tokens.push(pending);
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
        match t {
            Pending::Http(token, _) => challenges.remove(token),
            Pending::Alpn(name, _) => challenges.remove_alpn(name),
        }
        if let Some(kv) = kv {
            kv.delete(&t.kv_entry().0).await;
        }
    }
    let (key, chain) = result?;
    let stem = names[0].replace(['/', '\\'], "_");
    if let Some(kv) = kv {
        let pair = serde_json::json!({ "cert": chain, "key": key }).to_string();
        kv.put_sealed(&format!("certs/{stem}"), pair.as_bytes())
            .await?;
    }
    store_pair(cfg, &stem, &chain, &key)
}

/// A challenge this instance set up for an order, and how it is shared in KV:
/// `challenges/<token>` (the key authorization) for HTTP-01, `alpn/<name>` (the base64 SHA-256
/// of the key authorization, from which every instance makes its own certificate) for
/// TLS-ALPN-01.
enum Pending {
    Http(String, String),
    Alpn(String, String),
}

impl Pending {
    fn kv_entry(&self) -> (String, String) {
        match self {
            Pending::Http(token, key_auth) => (format!("challenges/{token}"), key_auth.clone()),
            Pending::Alpn(name, digest) => (format!("alpn/{name}"), digest.clone()),
        }
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Write a certificate and its key where the certificate store reads them (the key first).
fn store_pair(
    cfg: &AcmeSettings,
    stem: &str,
    chain: &str,
    key: &str,
) -> Result<std::path::PathBuf, String> {
    let dir = cfg.certs_dir();
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

/// Every instance: follow the shared prefix (a blocking query), keep the local certificate
/// files equal to what the issuer stored (reloading when they change) and answer the
/// challenges the issuer has pending.
async fn follow(state: Arc<State>, cfg: AcmeSettings, kv: Arc<Kv>, challenges: Challenges) {
    let mut index = 0;
    // the shared challenges this instance answers: KV key → value
    let mut mirrored: HashMap<String, String> = HashMap::new();
    loop {
        let (next, entries) = match kv.list(index).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the shared ACME state; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        index = if next < index { 0 } else { next };
        let mut seen = HashMap::new();
        let mut changed = false;
        for (key, value) in entries {
            if key.starts_with("challenges/") || key.starts_with("alpn/") {
                let value = String::from_utf8_lossy(&value).into_owned();
                if mirrored.get(&key) != Some(&value) {
                    if let Some(token) = key.strip_prefix("challenges/") {
                        challenges.set(token, &value);
                    } else if let Some(name) = key.strip_prefix("alpn/") {
                        let made = b64()
                            .decode(value.trim())
                            .map_err(|e| e.to_string())
                            .and_then(|d| challenges.set_alpn(name, &d));
                        if let Err(e) = made {
                            tracing::warn!(key = %key, error = %e, "a shared tls-alpn-01 challenge that cannot be answered");
                            continue;
                        }
                    }
                }
                seen.insert(key, value);
            } else if let Some(stem) = key.strip_prefix("certs/") {
                let pair = kv.open(&value).and_then(|p| {
                    serde_json::from_slice::<serde_json::Value>(&p).map_err(|e| e.to_string())
                });
                let (Some(cert), Some(pkey)) = (
                    pair.as_ref().ok().and_then(|p| p["cert"].as_str()),
                    pair.as_ref().ok().and_then(|p| p["key"].as_str()),
                ) else {
                    tracing::warn!(key = %key, "a shared certificate that cannot be read (another encryption_key_file?)");
                    continue;
                };
                let local = cfg.certs_dir().join(format!("{stem}.crt"));
                if std::fs::read_to_string(&local).ok().as_deref() != Some(cert) {
                    match store_pair(&cfg, stem, cert, pkey) {
                        Ok(_) => changed = true,
                        Err(e) => tracing::error!(error = %e, "cannot store a shared certificate"),
                    }
                }
            }
        }
        for gone in mirrored.keys().filter(|k| !seen.contains_key(*k)) {
            if let Some(token) = gone.strip_prefix("challenges/") {
                challenges.remove(token);
            } else if let Some(name) = gone.strip_prefix("alpn/") {
                challenges.remove_alpn(name);
            }
        }
        mirrored = seen;
        if changed {
            tracing::info!("certificates from the shared ACME state");
            if let Err(e) = state.reload() {
                tracing::error!("a shared certificate could not be loaded: {e}");
            }
        }
    }
}

/// The fleet's shared ACME state in Consul KV (`[acme] consul = true`): the account,
/// certificates and keys encrypted (AES-256-GCM, key from `encryption_key_file`), the
/// pending challenge answers in the clear (HTTP-01 key authorizations and TLS-ALPN-01
/// digests: the CA publishes them anyway), and the issuer lock.
pub struct Kv {
    http: reqwest::Client,
    /// `[consul]`, with the 60 s wait the follower's blocking reads use.
    settings: crate::config::ConsulSettings,
    base: String,
    token: Option<String>,
    prefix: String,
    key: ring::aead::LessSafeKey,
}

impl Kv {
    pub fn new(
        consul: &crate::config::ConsulSettings,
        prefix: &str,
        key_file: &Path,
    ) -> Result<Kv, String> {
        let secret = crate::config::secret::read(key_file, 16)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
        let unbound = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, digest.as_ref())
            .map_err(|_| "cannot make an AES key".to_string())?;
        Ok(Kv {
            http: crate::discovery::consul::client(consul)?,
            settings: crate::config::ConsulSettings {
                wait: Duration::from_secs(60),
                ..consul.clone()
            },
            base: consul.address.trim_end_matches('/').to_string(),
            token: crate::discovery::consul::token(consul),
            prefix: prefix.to_string(),
            key: ring::aead::LessSafeKey::new(unbound),
        })
    }

    fn req(&self, method: reqwest::Method, key: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{}/v1/kv/{}/{key}", self.base, self.prefix));
        if let Some(t) = &self.token {
            r = r.header("X-Consul-Token", t);
        }
        r
    }

    fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, String> {
        use ring::rand::SecureRandom;
        let mut nonce = [0u8; 12];
        ring::rand::SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| "no randomness".to_string())?;
        let mut data = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(self.prefix.as_bytes()),
                &mut data,
            )
            .map_err(|_| "encryption failed".to_string())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(out)
    }

    fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, String> {
        if sealed.len() < 12 + 16 {
            return Err("too short to be sealed".into());
        }
        let (nonce, rest) = sealed.split_at(12);
        let mut data = rest.to_vec();
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce")?;
        let plain = self
            .key
            .open_in_place(
                nonce,
                ring::aead::Aad::from(self.prefix.as_bytes()),
                &mut data,
            )
            .map_err(|_| "cannot decrypt: another encryption_key_file?".to_string())?;
        Ok(plain.to_vec())
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), String> {
        let r = self
            .req(reqwest::Method::PUT, key)
            .body(value)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| format!("Consul KV put {key}: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("Consul KV put {key}: HTTP {}", r.status()));
        }
        Ok(())
    }

    pub async fn put_sealed(&self, key: &str, plain: &[u8]) -> Result<(), String> {
        self.put(key, self.seal(plain)?).await
    }

    /// One sealed value, opened (`None`: not there).
    pub async fn get_sealed(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        let r = self
            .req(reqwest::Method::GET, key)
            .query(&[("raw", "true")])
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| format!("Consul KV get {key}: {e}"))?;
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !r.status().is_success() {
            return Err(format!("Consul KV get {key}: HTTP {}", r.status()));
        }
        let sealed = r
            .bytes()
            .await
            .map_err(|e| format!("Consul KV get {key}: {e}"))?;
        self.open(&sealed).map(Some)
    }

    async fn delete(&self, key: &str) {
        let _ = self
            .req(reqwest::Method::DELETE, key)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
    }

    /// Everything below `key/` (the challenges a dead issuer left pending).
    async fn delete_tree(&self, key: &str) {
        let _ = self
            .req(reqwest::Method::DELETE, &format!("{key}/"))
            .query(&[("recurse", "true")])
            .timeout(Duration::from_secs(10))
            .send()
            .await;
    }

    /// Everything under the prefix, after `index` changes (a blocking query of up to
    /// `wait`): (new index, key below the prefix → raw value).
    /// Everything under the prefix (keys relative to it), from one blocking read at `index`
    /// (discovery's KV read: Consul's index rules, token, TLS and error wording).
    pub async fn list(&self, index: u64) -> Result<(u64, Vec<(String, Vec<u8>)>), String> {
        crate::discovery::consul::kv_entries(&self.http, &self.settings, &self.prefix, index).await
    }
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
