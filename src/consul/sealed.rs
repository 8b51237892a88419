//! Values a fleet keeps in Consul KV sealed with a secret every instance holds
//! (AES-256-GCM; the key is the SHA-256 of the secret file's content, the associated data
//! names what the value is, so a value sealed for one purpose cannot be passed off as
//! another). Whoever can write the KV prefix but lacks the file can neither read what is
//! there nor put anything an instance accepts. ACME's shared state and the session ticket
//! keys are kept so.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::path::Path;

pub struct Sealer {
    key: LessSafeKey,
    /// What the values are (authenticated with each).
    aad: String,
}

impl Sealer {
    /// The key from the secret in `key_file` (16 characters at least); `aad` names what
    /// the values are.
    pub fn new(key_file: &Path, aad: &str) -> Result<Sealer, String> {
        let secret = crate::config::secret::read(key_file, 16)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
        let unbound = UnboundKey::new(&AES_256_GCM, digest.as_ref())
            .map_err(|_| "cannot make an AES key".to_string())?;
        Ok(Sealer {
            key: LessSafeKey::new(unbound),
            aad: aad.to_string(),
        })
    }

    /// `nonce(12) ‖ ciphertext ‖ tag(16)`.
    pub fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| "no randomness".to_string())?;
        let mut data = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.aad.as_bytes()),
                &mut data,
            )
            .map_err(|_| "encryption failed".to_string())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// What [`Sealer::seal`] sealed, with the same secret and for the same purpose; an
    /// error for anything else.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, String> {
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err("too short to be sealed".into());
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let mut data = rest.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce")?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(self.aad.as_bytes()), &mut data)
            .map_err(|_| "cannot decrypt: another encryption_key_file?".to_string())?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_secret_and_purpose_open_a_value() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "0123456789abcdef0123\n").unwrap();
        std::fs::write(&b, "fedcba9876543210fedc").unwrap();
        let ours = Sealer::new(&a, "tollgate/x").unwrap();
        let sealed = ours.seal(b"value").unwrap();
        assert_eq!(ours.open(&sealed).unwrap(), b"value");
        assert_ne!(
            ours.seal(b"value").unwrap(),
            sealed,
            "a fresh nonce each time"
        );
        let other_secret = Sealer::new(&b, "tollgate/x").unwrap();
        let other_purpose = Sealer::new(&a, "tollgate/y").unwrap();
        assert!(other_secret.open(&sealed).is_err());
        assert!(other_purpose.open(&sealed).is_err());
        for i in [0, 12, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(ours.open(&bad).is_err(), "byte {i} altered");
        }
        assert!(ours.open(&sealed[..20]).is_err());
        assert!(ours.open(b"value in the clear").is_err());
        assert!(Sealer::new(&dir.path().join("missing"), "x").is_err());
    }
}
