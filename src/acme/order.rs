//! One order (`issue`) and the ACME account it is placed with.

use super::kv::{Kv, SharedChallenge};
use crate::config::{AcmeChallenge, AcmeSettings};
use crate::tls::{write_private, Challenges};
use base64::Engine;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use std::time::Duration;

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
pub(super) async fn load_or_create_account(
    cfg: &AcmeSettings,
    kv: Option<&Kv>,
) -> Result<Account, String> {
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
pub(super) async fn issue(
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
            let Identifier::Dns(name) = ch.identifier().identifier.clone() else {
                return Err("a challenge for an identifier that is not a DNS name".into());
            };
            let deadline = crate::clock::unix_secs() as i64 + super::CHALLENGE_LIFETIME_SECS;
            let pending = if tls_alpn {
                let digest = key_auth.digest();
                SharedChallenge {
                    name,
                    token: None,
                    answer: b64().encode(digest.as_ref()),
                    deadline,
                }
            } else {
                SharedChallenge {
                    name,
                    token: Some(ch.token.clone()),
                    answer: key_auth.as_str().to_string(),
                    deadline,
                }
            };
            pending.answer_with(challenges)?;
            if let Some(kv) = kv {
                // every instance answers it: the CA may ask any of them
                kv.put_challenge(&pending).await?;
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
        t.withdraw(challenges);
        if let Some(kv) = kv {
            kv.delete(&t.kv_key()).await;
        }
    }
    let (key, chain) = result?;
    let stem = super::stem(names);
    if let Some(kv) = kv {
        let pair = serde_json::json!({ "cert": chain, "key": key }).to_string();
        kv.put_sealed(&format!("certs/{stem}"), pair.as_bytes())
            .await?;
    }
    store_pair(cfg, &stem, &chain, &key)
}

pub(super) fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Write a certificate and its key where the certificate store reads them (the key first).
pub(super) fn store_pair(
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
