//! TLS certificates for the customer-facing listeners. Owns: loading certificate/key pairs
//! (from vhost `cert`/`key` and from `tls.certs_dir`), the per-SNI certificate store that each
//! Snapshot carries, and `cert dev`. Must not touch routing or sockets; reload is driven by
//! `state`, and the listeners' certificate resolver (`proxy::sni`) reads the live Snapshot's
//! store. `backend`: the CA bundles and client certificates of TLS pools (to backends).
//! `challenges`: the ACME challenge answers pending now, which the listeners serve.
//! `tickets`: session tickets under keys a fleet shares (key files), `fleet_tickets`: those
//! keys kept, rotated and followed through Consul KV.

pub mod backend;
mod challenges;
pub mod fleet_tickets;
pub mod tickets;

pub use challenges::{Challenges, ACME_TLS_ALPN, CHALLENGE_PATH};

use crate::config::{Config, ConfigError, ConfigErrors, Origin};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The crypto provider of all of tollgate's TLS: aws-lc-rs, its cipher suites and key
/// exchange groups (X25519MLKEM768 first unless `tls.post_quantum = false`, then X25519,
/// P-256, P-384), with keys loaded by [`FastestSigner`]. [`install_provider`] chooses it once,
/// at start, and makes it the process default before any listener or connector is built,
/// so pingora's listeners and upstream connections use it too; before that (`check`,
/// `cert dev`) it is the one with post-quantum key exchange.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    PROVIDER.get_or_init(|| make_provider(true)).clone()
}

static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> =
    std::sync::OnceLock::new();

fn make_provider(post_quantum: bool) -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::CryptoProvider {
        key_provider: &FastestSigner,
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    p.cipher_suites.sort_by_key(|s| suite_rank(s.suite()));
    if !post_quantum {
        p.kx_groups
            .retain(|g| g.name() != rustls::NamedGroup::X25519MLKEM768);
    }
    Arc::new(p)
}

/// The order tollgate's listeners choose cipher suites in, whatever the client's order
/// (Go's and Caddy's): AES-128-GCM, then ChaCha20-Poly1305, then AES-256-GCM. AES-128-GCM is
/// TLS 1.3's mandatory suite, runs in hardware on every current client, and its SHA-256 key
/// schedule costs a fraction of AES-256-GCM's SHA-384 one (SHA-384 has no hardware
/// instructions on x86 CPUs: ~10% of a handshake's CPU, measured with perf on AMD EPYC);
/// ChaCha20 before AES-256 for clients without AES hardware.
fn suite_rank(s: rustls::CipherSuite) -> u8 {
    use rustls::CipherSuite as S;
    match s {
        S::TLS13_AES_128_GCM_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        S::TLS13_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => 1,
        _ => 2,
    }
}

/// What every TLS listener's and `tls` service port's configuration sets: the server's cipher
/// suite order ([`suite_rank`]) and, when tickets are on, the one ticketer of the process.
pub fn server_settings(c: &mut rustls::ServerConfig, ticketer: Option<&Arc<tickets::Ticketer>>) {
    c.ignore_client_order = true;
    if let Some(t) = ticketer {
        c.ticketer = t.clone();
    }
}

/// Choose the provider (`tls.post_quantum`) and make it the process-wide default. The
/// first call decides; later ones (a reload) change nothing, as the setting is read at start.
pub fn install_provider(post_quantum: bool) {
    let p = PROVIDER.get_or_init(|| make_provider(post_quantum));
    let _ = rustls::crypto::CryptoProvider::install_default((**p).clone());
}

/// What a TLS handshake settled, kept with the connection (pingora's TLS digest extension)
/// for the access log.
#[derive(Debug)]
pub struct Negotiated {
    /// The key exchange group's name (`X25519MLKEM768`, `X25519`, ...), `-` for none.
    pub key_exchange: &'static str,
}

/// Each kind of certificate key signed by the library that signs it fastest
/// (benches/handshakes.py, server CPU per full handshake): RSA by aws-lc-rs (AWS-LC's RSA
/// costs about half of ring's: 690 -> ~540 µs a connection with RSA-2048), ECDSA and
/// Ed25519 by ring (~230 µs a connection with ECDSA P-256, against ~330-370 µs with
/// aws-lc-rs signing).
#[derive(Debug)]
pub struct FastestSigner;

impl rustls::crypto::KeyProvider for FastestSigner {
    fn load_private_key(
        &self,
        key: PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
        if let Ok(k) = rustls::crypto::ring::sign::any_ecdsa_type(&key) {
            return Ok(k);
        }
        if let PrivateKeyDer::Pkcs8(der) = &key {
            if let Ok(k) = rustls::crypto::ring::sign::any_eddsa_type(der) {
                return Ok(k);
            }
        }
        rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
    }
}

/// A certificate's private key (RSA, ECDSA or Ed25519) as the provider's signing key.
pub fn signing_key(
    der: &PrivateKeyDer<'_>,
) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
    provider().key_provider.load_private_key(der.clone_key())
}

/// What an operator wants to know about a loaded certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub names: Vec<String>,
    /// Expiry as seconds since the Unix epoch.
    pub not_after: i64,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: i64,
    pub source: PathBuf,
}

impl CertInfo {
    /// Does this certificate serve `name` (exactly, or by a wildcard of one label)?
    pub fn covers(&self, name: &str) -> bool {
        self.names.iter().any(|c| {
            c.eq_ignore_ascii_case(name)
                || c.strip_prefix("*.").is_some_and(|suffix| {
                    name.split_once('.')
                        .is_some_and(|(_, parent)| parent.eq_ignore_ascii_case(suffix))
                })
        })
    }
}

impl CertInfo {
    /// Whether the certificate is valid at `now_unix` (else what is wrong).
    pub fn valid_at(&self, now_unix: i64) -> Result<(), String> {
        if now_unix >= self.not_after {
            return Err(format!(
                "expired {} days ago",
                (now_unix - self.not_after) / 86_400
            ));
        }
        if now_unix < self.not_before {
            return Err("not valid yet".into());
        }
        Ok(())
    }
}

/// Certificates by the name they serve. Wildcards cover exactly one label (RFC 6125).
#[derive(Debug, Default, Clone)]
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*`, e.g. `.example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    fallback: Option<Arc<CertifiedKey>>,
    pub infos: Vec<CertInfo>,
}

impl CertStore {
    /// The certificate for an SNI name; without SNI, or for a name no certificate covers, the
    /// default vhost's certificate (or the first loaded) so the client gets a clean answer.
    pub fn resolve(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        sni.and_then(|n| self.find(&n.to_ascii_lowercase()))
            .or_else(|| self.fallback.clone())
    }

    fn find(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(k) = self.exact.get(name) {
            return Some(k.clone());
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(&format!(".{parent}")).cloned()
    }

    /// The certificate serving vhost name `name` (which may itself be `*.x`).
    fn for_vhost_name(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        match name.strip_prefix('*') {
            Some(suffix) => self.wildcard.get(suffix).cloned(),
            None => self.find(name),
        }
    }

    /// Does a certificate cover vhost name `name` (which may itself be `*.x`)?
    pub fn covers(&self, name: &str) -> bool {
        match name.strip_prefix('*') {
            Some(suffix) => self.wildcard.contains_key(suffix),
            None => self.find(name).is_some(),
        }
    }

    fn insert(&mut self, names: &[String], key: &Arc<CertifiedKey>) {
        for n in names {
            match n.strip_prefix('*') {
                Some(suffix) => self.wildcard.insert(suffix.to_string(), key.clone()),
                None => self.exact.insert(n.clone(), key.clone()),
            };
        }
    }

    pub fn is_empty(&self) -> bool {
        self.fallback.is_none()
    }

    /// The certificate families of `/metrics` (Prometheus text).
    pub fn render_metrics(&self, out: &mut String) {
        use crate::metrics::{esc, family};
        use std::fmt::Write;
        family(
            out,
            "tollgate_certificate_expiry_timestamp_seconds",
            "gauge",
            "When the certificate expires, seconds since the Unix epoch.",
        );
        for c in &self.infos {
            let _ = writeln!(
                out,
                "tollgate_certificate_expiry_timestamp_seconds{{names=\"{}\",source=\"{}\"}} {}",
                esc(&c.names.join(",")),
                esc(&c.source.display().to_string()),
                c.not_after
            );
        }
    }

    /// Load every certificate the configuration names, and `kv` (those read from Consul KV:
    /// source, certificate PEM, key PEM), and check that each vhost name served over TLS has
    /// one. Vhost `cert`/`key` take precedence over `certs_dir` and the ACME storage, which
    /// take precedence over Consul KV's: a KV certificate serves only the names none of those
    /// covers (exactly or by a wildcard), and only while it is valid. The default vhost's
    /// certificate answers clients without SNI and names nothing covers.
    pub fn load(cfg: &Config, kv: &[(PathBuf, &str, &str)]) -> Result<CertStore, ConfigErrors> {
        let mut store = CertStore::default();
        let mut errors = Vec::new();
        if !cfg.has_tls() {
            return Ok(store);
        }
        // the ACME storage's certificates load like tls.certs_dir's (a missing directory is
        // just nothing issued yet)
        let acme_dir = cfg
            .acme
            .as_ref()
            .map(|a| (a.certs_dir(), a.origin.clone()))
            .filter(|(d, _)| d.is_dir());
        let dirs = cfg
            .certs_dir
            .iter()
            .map(|d| (d.clone(), cfg.certs_dir_origin.clone()))
            .chain(acme_dir);
        for (dir, at) in dirs {
            let at = &at;
            for (cert, key) in scan_dir(&dir, at, &mut errors) {
                match load_pair(&cert, &key) {
                    Ok((ck, info)) => {
                        store.insert(&info.names, &ck);
                        store.fallback.get_or_insert(ck);
                        store.infos.push(info);
                    }
                    Err(e) => errors.push(ConfigError {
                        origin: at.clone(),
                        option: "tls.certs_dir".into(),
                        message: format!("{}: {e}", cert.display()),
                    }),
                }
            }
        }
        for v in &cfg.vhosts {
            let Some(files) = &v.cert else { continue };
            match load_pair(&files.cert, &files.key) {
                Ok((ck, info)) => {
                    store.insert(&v.names, &ck);
                    if v.default || store.fallback.is_none() {
                        store.fallback = Some(ck.clone());
                    }
                    store.infos.push(info);
                }
                Err(e) => errors.push(ConfigError {
                    origin: files.origin.clone(),
                    option: "vhost.cert".into(),
                    message: e,
                }),
            }
        }
        // Consul KV's last: they serve only names nothing above covers (a vhost's own
        // wildcard wins over a KV certificate for one of its names), and only while valid
        let now = crate::clock::unix_secs() as i64;
        for (source, cert, key) in kv {
            let name = source.display().to_string();
            match pair_from_pem(cert.as_bytes(), key.as_bytes(), source, &name, &name) {
                Ok((ck, info)) => {
                    if let Err(e) = info.valid_at(now) {
                        // said by the KV watch when it reads it; a build only skips it
                        tracing::debug!("{name}: {e}");
                        continue;
                    }
                    let free: Vec<String> = info
                        .names
                        .iter()
                        .filter(|n| !store.covers(n))
                        .cloned()
                        .collect();
                    store.insert(&free, &ck);
                    store.fallback.get_or_insert(ck);
                    store.infos.push(info);
                }
                // checked when read from Consul (and refused there, said once)
                Err(e) => tracing::debug!("{e}"),
            }
        }
        // clients without SNI, or for a name nothing covers, get the default vhost's
        // certificate wherever it came from (its own, certs_dir, ACME, KV)
        if let Some(v) = cfg.vhosts.iter().find(|v| v.default) {
            if let Some(ck) = v.names.iter().find_map(|n| store.for_vhost_name(n)) {
                store.fallback = Some(ck);
            }
        }
        if errors.is_empty() {
            // an ACME vhost without its certificate yet is not an error: it is being issued
            // (with `[acme]`, so is every name no certificate covers, wildcards aside); nor,
            // with `tls.consul_kv_prefix`, one KV does not hold yet: it may come there
            let kv_source = cfg.consul.cert_prefix.is_some();
            let ordered = |n: &str| cfg.acme.is_some() && !n.starts_with('*');
            for v in cfg.vhosts.iter().filter(|v| !v.acme && !kv_source) {
                for n in &v.names {
                    if !store.covers(n) && !ordered(n) {
                        errors.push(ConfigError {
                            origin: v.origin.clone(),
                            option: "vhost.cert".into(),
                            message: format!(
                                "no certificate covers `{n}`: set cert/key on this vhost or put one in tls.certs_dir ({})",
                                cfg.certs_dir
                                    .as_deref()
                                    .map(|d| d.display().to_string())
                                    .unwrap_or_else(|| "not set".into())
                            ),
                        });
                    }
                }
            }
            if store.is_empty() && !kv_source && cfg.acme.is_none() {
                errors.push(ConfigError {
                    origin: cfg.certs_dir_origin.clone(),
                    option: "tls.certs_dir".into(),
                    message: "TLS listeners are configured but no certificate was found".into(),
                });
            }
        }
        if errors.is_empty() {
            Ok(store)
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

/// Private keys the configuration names that anyone on the host may read (or others may
/// write): vhost `key`s, the keys in `tls.certs_dir`, pools' client keys. Valid, but a key
/// readable by every local user is a key to give away; `check` and `run` say so.
pub fn exposed_keys(cfg: &Config) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut keys: Vec<(PathBuf, String)> = Vec::new();
    for v in &cfg.vhosts {
        if let Some(f) = &v.cert {
            keys.push((f.key.clone(), "vhost.key".into()));
        }
    }
    if let Some(dir) = &cfg.certs_dir {
        let mut ignored = Vec::new();
        for (_, key) in scan_dir(dir, &cfg.certs_dir_origin, &mut ignored) {
            keys.push((key, "tls.certs_dir".into()));
        }
    }
    for (name, p) in &cfg.pools {
        if let Some((_, key)) = p.tls.as_ref().and_then(|t| t.client_cert.as_ref()) {
            keys.push((key.clone(), format!("pool.{name}.tls.client_key")));
        }
    }
    keys.sort();
    keys.dedup_by(|a, b| a.0 == b.0);
    keys.into_iter()
        .filter_map(|(path, option)| {
            let mode = std::fs::metadata(&path).ok()?.permissions().mode() & 0o777;
            (mode & 0o026 != 0).then(|| {
                format!(
                    "{option}: the private key {} has mode {mode:04o}: other users of this host \
                     can read or change it; chmod 600 (or 640 with a group for the key)",
                    path.display()
                )
            })
        })
        .collect()
}

/// `*.crt` / `*.pem` files in `dir` that have a `.key` beside them (same stem).
fn scan_dir(dir: &Path, at: &Origin, errors: &mut Vec<ConfigError>) -> Vec<(PathBuf, PathBuf)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(ConfigError {
                origin: at.clone(),
                option: "tls.certs_dir".into(),
                message: format!("cannot read the directory {}: {e}", dir.display()),
            });
            return Vec::new();
        }
    };
    let mut pairs: Vec<(PathBuf, PathBuf)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("crt" | "pem")))
        .filter_map(|cert| {
            let key = cert.with_extension("key");
            key.is_file().then_some((cert, key))
        })
        .collect();
    pairs.sort();
    pairs
}

/// Load a PEM certificate chain and private key and check that they belong together.
pub fn load_pair(cert: &Path, key: &Path) -> Result<(Arc<CertifiedKey>, CertInfo), String> {
    let chain_pem = std::fs::read(cert)
        .map_err(|e| format!("cannot read certificate {}: {e}", cert.display()))?;
    let key_pem = std::fs::read(key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
    pair_from_pem(
        &chain_pem,
        &key_pem,
        cert,
        &cert.display().to_string(),
        &key.display().to_string(),
    )
}

/// A certificate chain and its private key from PEM text (`cert_name`, `key_name`: what
/// errors call them; `source`: what `CertInfo` says it came from).
pub fn pair_from_pem(
    chain_pem: &[u8],
    key_pem: &[u8],
    source: &Path,
    cert_name: &str,
    key_name: &str,
) -> Result<(Arc<CertifiedKey>, CertInfo), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{cert_name} is not a PEM certificate: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{cert_name} holds no certificate"));
    }
    let der = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("cannot read a private key from {key_name}: {e}"))?;
    let signer =
        signing_key(&der).map_err(|e| format!("unsupported private key in {key_name}: {e}"))?;
    let info = cert_info(&chain[0], source)?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| {
        format!("the key {key_name} does not belong to the certificate {cert_name}: {e}")
    })?;
    Ok((Arc::new(ck), info))
}

fn cert_info(der: &CertificateDer<'_>, source: &Path) -> Result<CertInfo, String> {
    use x509_parser::prelude::*;
    let (_, x509) = parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("{} is not an X.509 certificate: {e}", source.display()))?;
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_ascii_lowercase()),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => Some(std::net::IpAddr::from(
                            <[u8; 4]>::try_from(*b).unwrap_or_default(),
                        )),
                        16 => Some(std::net::IpAddr::from(
                            <[u8; 16]>::try_from(*b).unwrap_or_default(),
                        )),
                        _ => None,
                    };
                    names.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    if names.is_empty() {
        names.extend(
            x509.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    Ok(CertInfo {
        names,
        not_after: x509.validity().not_after.timestamp(),
        not_before: x509.validity().not_before.timestamp(),
        source: source.to_path_buf(),
    })
}

/// Write a self-signed certificate for `hosts` to `<dir>/<first host>.crt` and `.key`.
pub fn write_dev_cert(hosts: &[String], dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    use anyhow::Context;
    anyhow::ensure!(
        !hosts.is_empty(),
        "name at least one host, e.g. `tollgate cert dev localhost`"
    );
    // valid from yesterday (clock skew) for 90 days: long enough for local use, short
    // enough that a dev certificate left in production shows up
    let mut params = rcgen::CertificateParams::new(hosts.to_vec())
        .context("cannot generate a certificate for these names")?;
    let (y, m, d) = civil_from_unix(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
            - 86_400,
    );
    params.not_before = rcgen::date_time_ymd(y, m, d);
    params.not_after = params.not_before + std::time::Duration::from_secs(91 * 86_400);
    let key_pair = rcgen::KeyPair::generate().context("cannot generate a key")?;
    let cert = params
        .self_signed(&key_pair)
        .context("cannot generate a certificate for these names")?;
    let ck = rcgen::CertifiedKey { cert, key_pair };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let stem = hosts[0].replace('*', "_wildcard");
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    std::fs::write(&cert, ck.cert.pem())
        .with_context(|| format!("cannot write {}", cert.display()))?;
    write_private(&key, ck.key_pair.serialize_pem().as_bytes())
        .with_context(|| format!("cannot write {}", key.display()))?;
    Ok((cert, key))
}

/// The UTC calendar date of a Unix time (Howard Hinnant's `civil_from_days`).
fn civil_from_unix(secs: i64) -> (i32, u8, u8) {
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = (yoe + era * 400 + i64::from(m <= 2)) as i32;
    (y, m, d)
}

/// Write a secret (a key, an account) readable by its owner only: written beside, synced,
/// then renamed over `path`, so a reader (the certificate watcher) never sees half a file.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_unix(0), (1970, 1, 1));
        assert_eq!(civil_from_unix(951_782_400), (2000, 2, 29));
        assert_eq!(civil_from_unix(1_798_761_599), (2026, 12, 31));
    }

    #[test]
    fn dev_cert_loads_and_names_its_hosts() {
        let dir = std::env::temp_dir().join(format!("tollgate-tls-{}", std::process::id()));
        let (c, k) = write_dev_cert(&["localhost".into(), "*.local.test".into()], &dir).unwrap();
        let (ck, info) = load_pair(&c, &k).unwrap();
        assert_eq!(info.names, vec!["localhost", "*.local.test"]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let days_left = (info.not_after - now) / 86_400;
        assert!(
            (88..=90).contains(&days_left),
            "valid ~90 days: {days_left}"
        );
        let mut store = CertStore::default();
        store.insert(&info.names, &ck);
        assert!(store.resolve(Some("LOCALHOST")).is_some());
        assert!(store.resolve(Some("a.local.test")).is_some());
        assert!(
            store.resolve(Some("a.b.local.test")).is_none(),
            "one label only"
        );
        assert!(store.covers("*.local.test"));
        // a key that does not belong to the certificate is refused
        let (_, k2) = write_dev_cert(&["other".into()], &dir).unwrap();
        assert!(load_pair(&c, &k2).unwrap_err().contains("does not belong"));
        std::fs::remove_dir_all(dir).ok();
    }

    /// A certificate and key as PEM for `names`, valid from `from` to `until` (Unix days).
    fn pem_pair(names: &[&str], from: i64, until: i64) -> (String, String) {
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let day = |d: i64| {
            let (y, m, dd) = civil_from_unix(d * 86_400);
            rcgen::date_time_ymd(y, m, dd)
        };
        p.not_before = day(from);
        p.not_after = day(until);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn kv_certificates_serve_only_what_nothing_else_covers_and_only_while_valid() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        write_dev_cert(&["*.example.test".into()], &certs).unwrap();
        let cfg_text = format!(
            "[tls]\ncerts_dir = \"{}\"\nconsul_kv_prefix = \"edge/certs\"\n\
             [[listener]]\naddress = \"127.0.0.1:1\"\ntls = true\n\
             [[vhost]]\nnames = [\"*.example.test\"]\ndefault = true\n[[vhost.route]]\npath = \"/\"\npool = \"p\"\n\
             [[vhost]]\nnames = [\"kv.test\", \"old.test\"]\n[[vhost.route]]\npath = \"/\"\npool = \"p\"\n\
             [pool.p]\nbackends = [\"127.0.0.1:2\"]\n",
            certs.display()
        );
        let cfg = Config::parse(&dir.path().join("t.toml"), &cfg_text).unwrap();
        let today = crate::clock::unix_secs() as i64 / 86_400;
        // KV: one for a name the vhost's wildcard covers, one of its own, one expired
        let shadowed = pem_pair(&["foo.example.test"], today - 1, today + 30);
        let own = pem_pair(&["kv.test"], today - 1, today + 30);
        let expired = pem_pair(&["old.test"], today - 60, today - 11);
        let kv: Vec<(PathBuf, &str, &str)> = vec![
            ("consul:edge/certs/a.pem".into(), &shadowed.0, &shadowed.1),
            ("consul:edge/certs/b.pem".into(), &own.0, &own.1),
            ("consul:edge/certs/c.pem".into(), &expired.0, &expired.1),
        ];
        let store = CertStore::load(&cfg, &kv).unwrap();
        let der = |k: Option<Arc<CertifiedKey>>| k.map(|k| k.cert[0].as_ref().to_vec());
        let wildcard = der(store.wildcard.get(".example.test").cloned());
        assert!(wildcard.is_some());
        // the vhost's wildcard wins over a KV certificate for one of its names
        assert_eq!(der(store.resolve(Some("foo.example.test"))), wildcard);
        // clients without SNI and unknown names get the default vhost's certificate
        assert_eq!(der(store.resolve(None)), wildcard);
        assert_eq!(der(store.resolve(Some("unknown.test"))), wildcard);
        // a KV certificate serves its own name; an expired one never
        let kv_der = der(store.resolve(Some("kv.test")));
        assert_ne!(kv_der, wildcard);
        assert!(kv_der.is_some());
        assert!(!store.infos.iter().any(|i| i.names == ["old.test"]));
        assert_eq!(der(store.resolve(Some("old.test"))), wildcard);
    }
}
