//! Every instance of a fleet follows the shared ACME state.

use super::kv::{Kv, SharedChallenge};
use super::order::store_pair;
use crate::config::AcmeSettings;
use crate::state::State;
use crate::tls::Challenges;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// Every instance: follow the shared prefix (a blocking query), keep the local certificate
/// files equal to what the issuer stored (reloading when they change) and answer the
/// challenges the issuer has pending.
pub(super) async fn follow(
    state: Arc<State>,
    cfg: AcmeSettings,
    kv: Arc<Kv>,
    challenges: Challenges,
) {
    let mut index = 0;
    // the shared challenges this instance answers: KV key → challenge
    let mut mirrored: HashMap<String, SharedChallenge> = HashMap::new();
    // entries refused already (logged once each)
    let mut refused: HashSet<(String, Vec<u8>)> = HashSet::new();
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
        let seen_keys: HashSet<String> = entries.iter().map(|(k, _)| k.clone()).collect();
        let mut seen = HashMap::new();
        let mut changed = false;
        for (key, value) in entries {
            if key.starts_with("challenges/") || key.starts_with("alpn/") {
                // only what this fleet's issuer sealed is answered; anything else a KV
                // writer put there is logged (once per value) and ignored
                let c = match kv.open_challenge(&key, &value) {
                    Ok(c) => c,
                    Err(e) => {
                        if refused.insert((key.clone(), value.clone())) {
                            tracing::warn!(key = %key, error = %e, "a shared ACME challenge not sealed by this fleet: not answered");
                        }
                        continue;
                    }
                };
                if mirrored.get(&key) != Some(&c) {
                    if let Err(e) = c.answer_with(&challenges) {
                        tracing::warn!(key = %key, error = %e, "a shared ACME challenge that cannot be answered");
                        continue;
                    }
                }
                seen.insert(key, c);
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
        for (_, gone) in mirrored.iter().filter(|(k, _)| !seen.contains_key(*k)) {
            gone.withdraw(&challenges);
        }
        refused.retain(|(k, _)| seen_keys.contains(k));
        mirrored = seen;
        if changed {
            tracing::info!("certificates from the shared ACME state");
            if let Err(e) = state.reload() {
                tracing::error!("a shared certificate could not be loaded: {e}");
            }
        }
    }
}
