//! TLS to backends: the CA bundle and client certificate a TLS pool's connections are made
//! with, read at every Snapshot build (so a renewed client certificate or CA file is used by
//! the connections opened after the reload; open ones finish on the old one).

use crate::config::BackendTls;
use pingora::protocols::tls::CaType;
use pingora::utils::tls::{parse_x509, CertKey, WrappedX509};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

/// What a pool's TLS connections are made with.
pub struct BackendMaterial {
    /// The CAs that may sign a backend's certificate (`None`: the system roots).
    pub ca: Option<Arc<CaType>>,
    /// The client certificate chain and key, for mTLS.
    pub client: Option<Arc<CertKey>>,
    /// Tells this material's connections apart in the upstream connection pools: two pools
    /// on one address with other CAs or client certificates never share a connection.
    pub group: u64,
    /// Expiry of the client certificate (seconds since the Unix epoch), for `/pools`.
    pub client_not_after: Option<i64>,
}

impl std::fmt::Debug for BackendMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendMaterial")
            .field("ca", &self.ca.as_ref().map(|c| c.len()))
            .field("client", &self.client.is_some())
            .field("group", &self.group)
            .finish()
    }
}

fn read_chain(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    for c in &chain {
        x509_parser::parse_x509_certificate(c.as_ref()).map_err(|e| {
            format!(
                "{} holds a certificate that does not parse: {e}",
                path.display()
            )
        })?;
    }
    Ok(chain)
}

/// Read the files a pool's `tls` names; every problem is a message naming the file.
pub fn load_backend(t: &BackendTls) -> Result<BackendMaterial, String> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    t.server_name.hash(&mut h);
    t.verify.hash(&mut h);
    let ca = match &t.ca {
        None => None,
        Some(path) => {
            let chain = read_chain(path, "CA bundle")?;
            let mut roots = rustls::RootCertStore::empty();
            for c in &chain {
                roots.add(c.clone()).map_err(|e| {
                    format!(
                        "{} holds a certificate that is not a usable CA: {e}",
                        path.display()
                    )
                })?;
                c.as_ref().hash(&mut h);
            }
            let certs: Vec<WrappedX509> = chain
                .into_iter()
                .map(|c| WrappedX509::new(c.as_ref().to_vec(), parse_x509))
                .collect();
            Some(Arc::from(certs.into_boxed_slice()))
        }
    };
    let mut client_not_after = None;
    let client = match &t.client_cert {
        None => None,
        Some((cert, key)) => {
            let chain = read_chain(cert, "client certificate")?;
            let der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
            let signer = super::signing_key(&der)
                .map_err(|e| format!("unsupported private key in {}: {e}", key.display()))?;
            rustls::sign::CertifiedKey::new(chain.clone(), signer)
                .keys_match()
                .map_err(|e| {
                    format!(
                        "the key {} does not belong to the client certificate {}: {e}",
                        key.display(),
                        cert.display()
                    )
                })?;
            if let Ok((_, x)) = x509_parser::parse_x509_certificate(chain[0].as_ref()) {
                client_not_after = Some(x.validity().not_after.timestamp());
            }
            for c in &chain {
                c.as_ref().hash(&mut h);
            }
            Some(Arc::new(CertKey::new(
                chain.into_iter().map(|c| c.as_ref().to_vec()).collect(),
                der.secret_der().to_vec(),
            )))
        }
    };
    Ok(BackendMaterial {
        ca,
        client,
        group: h.finish(),
        client_not_after,
    })
}
