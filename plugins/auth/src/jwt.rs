//! JWT verification: JWS compact form, HS256 / RS256 / ES256 with configured keys (never
//! `alg: none`, never a key of another algorithm than the token names), then the registered
//! claims exp, nbf, iss and aud.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwtConfig {
    #[serde(default)]
    hs256_secret: Option<String>,
    #[serde(default)]
    rs256_keys: Vec<String>,
    #[serde(default)]
    es256_keys: Vec<String>,
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    audience: Option<String>,
    #[serde(default = "default_leeway")]
    leeway_s: u64,
    #[serde(default = "default_true")]
    require_exp: bool,
    #[serde(default)]
    claims_to_headers: BTreeMap<String, String>,
    #[serde(default = "default_header")]
    header: String,
    #[serde(default = "default_realm")]
    realm: String,
}

fn default_leeway() -> u64 {
    30
}
fn default_true() -> bool {
    true
}
fn default_header() -> String {
    "authorization".into()
}
fn default_realm() -> String {
    "tollgate".into()
}

pub type Claims = serde_json::Map<String, serde_json::Value>;

/// Tokens this instance verified: an exact match skips the signature check. Bounded; when
/// full it starts over. Found by the token's last 32 bytes (its signature's: hashing and
/// comparing a fixed-size key is cheap, where a whole token is a few hundred bytes hashed
/// and compared a byte at a time in wasm), then the whole token compared word by word: a
/// hit is always the exact token. Only verified tokens are kept, so a client cannot fill
/// a bucket with tokens that share a tail.
#[derive(Default)]
pub struct Cache {
    map: std::collections::HashMap<[u64; 4], Verified>,
}

/// The cache key of a token: its last 32 bytes (zero-padded in front) and its length.
fn tail(token: &[u8]) -> [u64; 4] {
    let mut buf = [0u8; 32];
    let n = token.len().min(32);
    buf[32 - n..].copy_from_slice(&token[token.len() - n..]);
    let word = |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    [word(0) ^ token.len() as u64, word(1), word(2), word(3)]
}

/// `a == b`, eight bytes at a time.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest = ac.remainder() == bc.remainder();
    rest && ac.zip(bc).all(|(x, y)| {
        u64::from_le_bytes(x.try_into().expect("8 bytes"))
            == u64::from_le_bytes(y.try_into().expect("8 bytes"))
    })
}

struct Verified {
    token: Box<[u8]>,
    claims: std::rc::Rc<Claims>,
    exp: Option<f64>,
    nbf: Option<f64>,
}

const CACHE_MAX: usize = 4096;

pub struct JwtConfig {
    hs256: Option<Vec<u8>>,
    rs256: Vec<rsa::pkcs1v15::VerifyingKey<Sha256>>,
    es256: Vec<p256::ecdsa::VerifyingKey>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
    require_exp: bool,
    pub claims_to_headers: BTreeMap<String, String>,
    pub header: String,
    pub realm: String,
}

impl JwtConfig {
    pub fn build(raw: RawJwtConfig) -> Result<JwtConfig, String> {
        use p256::pkcs8::DecodePublicKey as _;
        use rsa::pkcs1::DecodeRsaPublicKey as _;
        let mut rs256 = Vec::new();
        for (i, pem) in raw.rs256_keys.iter().enumerate() {
            let key = rsa::RsaPublicKey::from_public_key_pem(pem)
                .or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(pem))
                .map_err(|e| format!("jwt.rs256_keys[{i}] is not an RSA public key in PEM: {e}"))?;
            rs256.push(rsa::pkcs1v15::VerifyingKey::<Sha256>::new(key));
        }
        let mut es256 = Vec::new();
        for (i, pem) in raw.es256_keys.iter().enumerate() {
            let key = p256::ecdsa::VerifyingKey::from_public_key_pem(pem).map_err(|e| {
                format!("jwt.es256_keys[{i}] is not a P-256 public key in PEM: {e}")
            })?;
            es256.push(key);
        }
        let hs256 = raw.hs256_secret.map(String::into_bytes);
        if hs256.as_ref().is_some_and(|s| s.len() < 32) {
            return Err("jwt.hs256_secret must be at least 32 bytes".into());
        }
        if hs256.is_none() && rs256.is_empty() && es256.is_empty() {
            return Err("jwt needs a key: hs256_secret, rs256_keys or es256_keys".into());
        }
        Ok(JwtConfig {
            hs256,
            rs256,
            es256,
            issuer: raw.issuer,
            audience: raw.audience,
            leeway: raw.leeway_s,
            require_exp: raw.require_exp,
            claims_to_headers: raw.claims_to_headers,
            header: raw.header.to_ascii_lowercase(),
            realm: raw.realm,
        })
    }

    /// Verify `token` at `now` (Unix seconds); the claims, or why not. A token this
    /// instance verified before skips the signature and the static claims (an exact match
    /// in `cache`); its times are checked again on every request.
    /// The token's claims, shared with the cache (a hit copies nothing).
    /// `token` as sent (bytes: a cached token is not checked for UTF-8 again).
    pub fn verify(
        &self,
        token: &[u8],
        now: u64,
        cache: &mut Cache,
    ) -> Result<std::rc::Rc<Claims>, &'static str> {
        let key = tail(token);
        if let Some(v) = cache.map.get(&key).filter(|v| same(&v.token, token)) {
            self.check_time(v.exp, v.nbf, now)?;
            return Ok(v.claims.clone());
        }
        let text = std::str::from_utf8(token).map_err(|_| "not a JWS compact token")?;
        let claims = std::rc::Rc::new(self.verify_uncached(text)?);
        let num = |k: &str| claims.get(k).and_then(|v| v.as_f64());
        let (exp, nbf) = (num("exp"), num("nbf"));
        self.check_time(exp, nbf, now)?;
        if cache.map.len() >= CACHE_MAX {
            cache.map.clear();
        }
        cache.map.insert(
            key,
            Verified {
                token: token.into(),
                claims: claims.clone(),
                exp,
                nbf,
            },
        );
        Ok(claims)
    }

    fn check_time(&self, exp: Option<f64>, nbf: Option<f64>, now: u64) -> Result<(), &'static str> {
        match exp {
            Some(exp) if (now as f64) > exp + self.leeway as f64 => return Err("token expired"),
            None if self.require_exp => return Err("token has no exp"),
            _ => {}
        }
        if let Some(nbf) = nbf {
            if (now as f64) + (self.leeway as f64) < nbf {
                return Err("token not valid yet");
            }
        }
        Ok(())
    }

    /// The signature, and the claims that do not change with time (iss, aud).
    fn verify_uncached(&self, token: &str) -> Result<Claims, &'static str> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a JWS compact token");
        };
        let header: serde_json::Value = b64
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("bad header")?;
        let sig = b64.decode(s).map_err(|_| "bad signature encoding")?;
        let signed = &token[..h.len() + 1 + p.len()];
        let ok = match header.get("alg").and_then(|a| a.as_str()) {
            Some("HS256") => {
                let key = self.hs256.as_ref().ok_or("HS256 is not accepted")?;
                let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| "bad key")?;
                mac.update(signed.as_bytes());
                mac.verify_slice(&sig).is_ok()
            }
            Some("RS256") => {
                use rsa::signature::Verifier as _;
                if self.rs256.is_empty() {
                    return Err("RS256 is not accepted");
                }
                let sig = rsa::pkcs1v15::Signature::try_from(sig.as_slice())
                    .map_err(|_| "bad signature")?;
                self.rs256
                    .iter()
                    .any(|k| k.verify(signed.as_bytes(), &sig).is_ok())
            }
            Some("ES256") => {
                use p256::ecdsa::signature::Verifier as _;
                if self.es256.is_empty() {
                    return Err("ES256 is not accepted");
                }
                let sig = p256::ecdsa::Signature::from_slice(&sig).map_err(|_| "bad signature")?;
                self.es256
                    .iter()
                    .any(|k| k.verify(signed.as_bytes(), &sig).is_ok())
            }
            _ => return Err("unsupported alg"),
        };
        if !ok {
            return Err("signature does not verify");
        }
        let claims: Claims = b64
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("bad payload")?;
        if let Some(iss) = &self.issuer {
            if claims.get("iss").and_then(|v| v.as_str()) != Some(iss.as_str()) {
                return Err("wrong issuer");
            }
        }
        if let Some(aud) = &self.audience {
            let ok = match claims.get("aud") {
                Some(serde_json::Value::String(a)) => a == aud,
                Some(serde_json::Value::Array(v)) => v.iter().any(|a| a.as_str() == Some(aud)),
                _ => false,
            };
            if !ok {
                return Err("wrong audience");
            }
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_key_is_the_tail_and_length_and_a_hit_is_the_exact_token() {
        let a = b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";
        let mut b = a.to_vec();
        b[3] ^= 1; // same tail, another token
        assert_eq!(tail(a), tail(&b));
        assert!(same(a, a) && !same(a, &b));
        assert!(!same(a, &a[..a.len() - 1]));
        // the last byte, the length, short tokens
        let mut c = a.to_vec();
        *c.last_mut().unwrap() ^= 1;
        assert_ne!(tail(a), tail(&c));
        assert_ne!(tail(b"abc"), tail(b"\0abc"));
        assert_eq!(tail(b"abc"), tail(b"abc"));
        assert!(
            same(b"", b"") && same(b"abcdefghi", b"abcdefghi") && !same(b"abcdefghi", b"abcdefghj")
        );
    }

    #[test]
    fn a_token_with_the_tail_of_a_cached_one_is_verified_not_served_from_the_cache() {
        use base64::Engine as _;
        let secret = "0123456789abcdef0123456789abcdef";
        let raw: RawJwtConfig = serde_json::from_str(&format!(
            r#"{{"hs256_secret":"{secret}","require_exp":false}}"#
        ))
        .unwrap();
        let cfg = JwtConfig::build(raw).unwrap();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let signed = format!(
            "{}.{}",
            b64.encode(r#"{"alg":"HS256"}"#),
            b64.encode(r#"{"sub":"alice"}"#)
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(signed.as_bytes());
        let good = format!("{signed}.{}", b64.encode(mac.finalize().into_bytes()));
        let mut cache = Cache::default();
        let claims = cfg.verify(good.as_bytes(), 0, &mut cache).unwrap();
        assert_eq!(claims["sub"], "alice");
        // a forged payload under the same signature: same cache key, not the same token
        let forged = good.replacen(
            &b64.encode(r#"{"sub":"alice"}"#),
            &b64.encode(r#"{"sub":"admin"}"#),
            1,
        );
        assert_eq!(tail(forged.as_bytes()), tail(good.as_bytes()));
        assert_eq!(
            cfg.verify(forged.as_bytes(), 0, &mut cache).unwrap_err(),
            "signature does not verify"
        );
        // the genuine token is still a hit
        assert!(std::rc::Rc::ptr_eq(
            &cfg.verify(good.as_bytes(), 0, &mut cache).unwrap(),
            &claims
        ));
    }
}
