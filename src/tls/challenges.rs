//! The ACME challenge answers pending now, which the request path serves: HTTP-01 (token →
//! key authorization, for one name) and TLS-ALPN-01 (name → a self-signed certificate carrying
//! the key authorization's digest, RFC 8737). The issuer (`acme`) fills it for its own orders,
//! and, in a fleet, from the sealed shared state; the proxy and `proxy::sni` only read it.
//! Every answer is bound to the name its order is for and to the order's deadline: a request
//! for another host, or after the deadline, gets nothing.

use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Where HTTP-01 looks for the answer.
pub const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// The ALPN protocol of a TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

#[derive(Debug, Clone, Default)]
pub struct Challenges(Arc<Mutex<Answers>>);

#[derive(Debug, Default)]
struct Answers {
    /// token → (name, key authorization, deadline in Unix seconds)
    http: HashMap<String, (String, String, i64)>,
    /// name (lower case) → (certificate, deadline in Unix seconds)
    alpn: HashMap<String, (Arc<CertifiedKey>, i64)>,
}

impl Challenges {
    fn pending(&self) -> std::sync::MutexGuard<'_, Answers> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The key authorization for `token`, when the request is for the name its order
    /// validates (`host`, normalised: lower case, no port) and before its deadline.
    pub fn answer(&self, token: &str, host: &str, now_unix: i64) -> Option<String> {
        let pending = self.pending();
        let (name, key_auth, deadline) = pending.http.get(token)?;
        (name.eq_ignore_ascii_case(host) && now_unix < *deadline).then(|| key_auth.clone())
    }

    /// The TLS-ALPN-01 certificate for `name`, before its order's deadline.
    pub fn alpn_cert(&self, name: &str, now_unix: i64) -> Option<Arc<CertifiedKey>> {
        let pending = self.pending();
        let (cert, deadline) = pending.alpn.get(&name.to_ascii_lowercase())?;
        (now_unix < *deadline).then(|| cert.clone())
    }

    /// Answer HTTP-01 `token` for `name` with `key_auth` until `deadline` (Unix seconds).
    pub fn set(&self, token: &str, name: &str, key_auth: &str, deadline: i64) {
        self.pending().http.insert(
            token.to_string(),
            (name.to_ascii_lowercase(), key_auth.to_string(), deadline),
        );
    }

    pub fn remove(&self, token: &str) {
        self.pending().http.remove(token);
    }

    /// Answer TLS-ALPN-01 for `name` with a certificate carrying `digest` (the SHA-256 of the
    /// key authorization) until `deadline` (Unix seconds).
    pub fn set_alpn(&self, name: &str, digest: &[u8], deadline: i64) -> Result<(), String> {
        let cert = alpn_certificate(name, digest)?;
        self.pending()
            .alpn
            .insert(name.to_ascii_lowercase(), (Arc::new(cert), deadline));
        Ok(())
    }

    pub fn remove_alpn(&self, name: &str) {
        self.pending().alpn.remove(&name.to_ascii_lowercase());
    }
}

/// RFC 8737 §3: a self-signed certificate for `name` alone with the critical acmeIdentifier
/// extension holding `digest`. Any key does; a new one each time.
fn alpn_certificate(name: &str, digest: &[u8]) -> Result<CertifiedKey, String> {
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
    let signer = super::signing_key(&der).map_err(|e| e.to_string())?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_for_its_own_name_and_until_its_deadline() {
        let c = Challenges::default();
        c.set("tok", "A.test", "tok.thumb", 100);
        assert_eq!(c.answer("tok", "a.test", 99).as_deref(), Some("tok.thumb"));
        // another Host, an unknown token, the deadline passed
        assert_eq!(c.answer("tok", "evil.test", 99), None);
        assert_eq!(c.answer("other", "a.test", 99), None);
        assert_eq!(c.answer("tok", "a.test", 100), None);
        c.remove("tok");
        assert_eq!(c.answer("tok", "a.test", 0), None);

        c.set_alpn("a.test", &[7u8; 32], 100).unwrap();
        assert!(c.alpn_cert("A.TEST", 99).is_some());
        assert!(c.alpn_cert("a.test", 100).is_none());
        assert!(c.alpn_cert("b.test", 0).is_none());
        assert!(c.set_alpn("a.test", &[7u8; 31], 100).is_err());
    }
}
