//! Raw schema → validated model. Pure: reads nothing but the text it is given. Collects every
//! problem it finds so `tollgate check` can print them all at once. One file per section
//! (`listeners`, `vhosts`, `pools`, `limits`, `consul`, `admin`, `failover`, `plugins`); this
//! one reads the schema and assembles the `Config`.

use super::raw::{RawBackend, RawConfig, RawConsulRoutes, RawLimits, RawPool, RawSize, RawVhost};
use super::*;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use toml::Spanned;

mod admin;
mod consul;
mod failover;
mod headers;
mod limits;
mod listeners;
mod plugins;
mod pools;
mod ports;
mod vhosts;

pub use vhosts::check_host_name;
use {
    admin::*, consul::*, failover::*, headers::*, limits::*, listeners::*, plugins::*, pools::*,
    ports::*, vhosts::*,
};

pub(super) struct Ctx<'a> {
    file: Arc<str>,
    src: &'a str,
    base: PathBuf,
    errors: Vec<ConfigError>,
}

impl Ctx<'_> {
    fn origin(&self, span: Range<usize>) -> Origin {
        Origin::at(&self.file, self.src, span.start)
    }

    fn err(&mut self, span: Range<usize>, option: impl Into<String>, message: impl Into<String>) {
        let origin = self.origin(span);
        self.errors.push(ConfigError {
            origin,
            option: option.into(),
            message: message.into(),
        });
    }

    fn duration(
        &mut self,
        v: &Option<Spanned<String>>,
        option: &str,
        default: Duration,
    ) -> Duration {
        self.duration_in(
            v,
            option,
            default,
            Duration::ZERO,
            Duration::from_secs(24 * 3600),
        )
    }

    fn duration_in(
        &mut self,
        v: &Option<Spanned<String>>,
        option: &str,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Duration {
        let Some(v) = v else { return default };
        match parse_duration(v.get_ref()) {
            Ok(d) if d < min || d > max => {
                self.err(
                    v.span(),
                    option,
                    format!("must be between {min:?} and {max:?}, got {d:?}"),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.err(v.span(), option, e);
                default
            }
        }
    }

    fn int(
        &mut self,
        v: &Option<Spanned<i64>>,
        option: &str,
        default: i64,
        min: i64,
        max: i64,
    ) -> i64 {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if n < min || n > max {
            self.err(
                v.span(),
                option,
                format!("must be between {min} and {max}, got {n}"),
            );
            return default;
        }
        n
    }

    /// One of a fixed set of words; the first is the default.
    fn choice<T: Copy>(
        &mut self,
        v: &Option<Spanned<String>>,
        option: &str,
        options: &[(&str, T)],
    ) -> T {
        let Some(v) = v else { return options[0].1 };
        match options.iter().find(|(word, _)| word == v.get_ref()) {
            Some((_, value)) => *value,
            None => {
                let words: Vec<&str> = options.iter().map(|(w, _)| *w).collect();
                self.err(
                    v.span(),
                    option,
                    format!("`{}` is not one of: {}", v.get_ref(), words.join(", ")),
                );
                options[0].1
            }
        }
    }

    fn size(&mut self, v: &Option<Spanned<RawSize>>, option: &str, default: u64) -> u64 {
        let Some(v) = v else { return default };
        let parsed = match v.get_ref() {
            RawSize::Bytes(n) if *n >= 0 => Ok(*n as u64),
            RawSize::Bytes(n) => Err(format!("must not be negative, got {n}")),
            RawSize::Text(t) => super::parse_size(t),
        };
        parsed.unwrap_or_else(|e| {
            self.err(v.span(), option, e);
            default
        })
    }

    fn cidrs(&mut self, v: &[Spanned<String>], option: &str) -> Vec<super::cidr::Cidr> {
        let mut out = Vec::new();
        for c in v {
            match c.get_ref().parse::<super::cidr::Cidr>() {
                Ok(n) => out.push(n),
                Err(e) => self.err(c.span(), option, e),
            }
        }
        out
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }
}

/// The option named by the line a TOML error points at: `table.key`.
pub(super) fn option_at(src: &str, offset: usize) -> String {
    let offset = offset.min(src.len());
    let line_start = src[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = src[offset..]
        .find('\n')
        .map(|i| offset + i)
        .unwrap_or(src.len());
    let line = &src[line_start..line_end];
    let table = src[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string());
    match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}"),
        (None, Some(k)) => k,
        (Some(t), None) => t,
        (None, None) => "(syntax)".to_string(),
    }
}

/// A hint for the common type mistakes, from serde's message and the option's name.
pub(super) fn type_hint(message: &str, option: &str) -> &'static str {
    let timed = [
        "timeout",
        "interval",
        "_time",
        "_after",
        "deadline",
        "ttl",
        "quiescence",
    ]
    .iter()
    .any(|w| option.contains(w));
    let sized = option.contains("size") || option.contains("memory");
    if message.starts_with("invalid type: integer") && message.contains("expected a string") {
        if timed {
            return " (durations are strings with a unit: write \"30s\", \"250ms\", \"5m\")";
        }
        if sized {
            return " (sizes are a number of bytes or a string with a unit: \"64k\", \"10m\")";
        }
        return " (write it in quotes)";
    }
    if message.starts_with("invalid type: string") {
        if message.contains("expected a boolean") {
            return " (write true or false, without quotes)";
        }
        if message.contains("expected i64") || message.contains("expected f64") {
            return " (write the number without quotes)";
        }
    }
    if message.starts_with("unknown field") {
        return " (check the spelling; docs/configuration.md lists every option)";
    }
    ""
}

/// Deserialise the schema, collecting every schema problem rather than the first: after
/// each, the statement at fault is blanked out (same byte offsets, so later lines keep their
/// numbers) and the file read again, at most 50 times. A TOML syntax error, or a required
/// option that is missing, ends the collection (`None`: nothing more can be checked).
pub(super) fn read_schema(file: &Arc<str>, src: &str) -> (Option<RawConfig>, Vec<ConfigError>) {
    let mut text = src.to_string();
    let mut errors: Vec<ConfigError> = Vec::new();
    for _ in 0..50 {
        let e = match toml::from_str::<RawConfig>(&text) {
            Ok(raw) => return (Some(raw), errors),
            Err(e) => e,
        };
        let syntax = text.parse::<toml::Table>().is_err();
        let span = e.span().unwrap_or(0..0);
        let option = option_at(&text, span.start);
        let message = e.message().trim().to_string();
        if message.starts_with("missing field") && !errors.is_empty() {
            // most likely the option blanked out above: already reported
            return (None, errors);
        }
        let hint = type_hint(&message, &option);
        errors.push(ConfigError {
            origin: Origin::at(file, src, span.start),
            option,
            message: format!("{message}{hint}"),
        });
        if syntax || message.starts_with("missing field") || span.is_empty() {
            return (None, errors);
        }
        // blank the lines the span covers
        let start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
        let end = text[span.end.min(text.len())..]
            .find('\n')
            .map_or(text.len(), |i| span.end + i);
        if text[start..end].trim_start().starts_with('[') {
            // a whole table is at fault: dropping it would only make up other problems
            return (None, errors);
        }
        let blank: String = text[start..end]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        if blank.len() != end - start {
            return (None, errors); // non-ASCII: offsets would shift
        }
        text.replace_range(start..end, &blank);
        if text.parse::<toml::Table>().is_err() {
            return (None, errors);
        }
    }
    (None, errors)
}

pub(super) fn parse(path: &Path, src: &str) -> Result<Config, ConfigErrors> {
    let file: Arc<str> = Arc::from(path.display().to_string());
    let (raw, schema_errors) = read_schema(&file, src);
    let Some(raw) = raw else {
        return Err(ConfigErrors(schema_errors));
    };
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let mut cx = Ctx {
        file,
        src,
        base,
        errors: schema_errors,
    };
    let cfg = build(&mut cx, raw, path);
    if cx.errors.is_empty() {
        Ok(cfg)
    } else {
        cx.errors.sort_by_key(|e| e.origin.line);
        Err(ConfigErrors(cx.errors))
    }
}

pub(super) fn build(cx: &mut Ctx, raw: RawConfig, path: &Path) -> Config {
    let listeners = listeners(cx, &raw);
    let pools = pools(cx, &raw.pools);
    let plugins = plugins(cx, &raw.plugins);
    let vhosts = vhosts(cx, &raw.vhosts, &pools, &plugins);
    let ports = ports(cx, &raw.ports, &pools, &listeners);
    let has_tls =
        listeners.iter().any(|l| l.tls) || ports.iter().any(|p| p.protocol == PortProtocol::Tls);

    let s = &raw.server;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as i64;
    let threads = cx.int(&s.threads, "server.threads", cores, 1, 1024) as usize;
    let shutdown_timeout = cx.duration(
        &s.shutdown_timeout,
        "server.shutdown_timeout",
        defaults::server::SHUTDOWN_TIMEOUT,
    );
    let watch_interval = cx.duration_in(
        &s.watch_interval,
        "server.watch_interval",
        defaults::server::WATCH_INTERVAL,
        Duration::from_millis(50),
        Duration::from_secs(3600),
    );
    let pool_size = cx.int(
        &s.upstream_keepalive_pool_size,
        "server.upstream_keepalive_pool_size",
        defaults::server::UPSTREAM_KEEPALIVE_POOL_SIZE,
        0,
        65536,
    ) as usize;
    let first_tls_port = listeners
        .iter()
        .filter(|l| l.tls)
        .flat_map(|l| l.addresses.iter())
        .map(|a| a.port() as i64)
        .next()
        .unwrap_or(defaults::server::HTTPS_REDIRECT_PORT);
    let https_redirect_port = cx.int(
        &s.https_redirect_port,
        "server.https_redirect_port",
        first_tls_port,
        1,
        65535,
    ) as u16;
    let forwarded_for = cx.choice(
        &s.forwarded_for,
        "server.forwarded_for",
        &[
            ("replace", ForwardedFor::Replace),
            ("append", ForwardedFor::Append),
        ],
    );

    let format = cx.choice(
        &raw.log.format,
        "log.format",
        &[("text", LogFormat::Text), ("json", LogFormat::Json)],
    );
    let level = match &raw.log.level {
        None => "info".to_string(),
        Some(v) => {
            let l = v.get_ref().to_string();
            if tracing_subscriber::EnvFilter::try_new(&l).is_err() {
                cx.err(
                    v.span(),
                    "log.level",
                    format!("`{l}` is not a log filter: use error, warn, info, debug or trace"),
                );
            }
            l
        }
    };

    let certs_dir = raw.tls.certs_dir.as_ref().map(|d| cx.path(d.get_ref()));
    let certs_dir_origin = match &raw.tls.certs_dir {
        Some(d) => cx.origin(d.span()),
        None => cx.origin(0..0),
    };
    let (ticket_keys, session_ticket_lifetime) = ticket_keys(cx, &raw.tls);
    let admin = admin(cx, &raw.admin);
    let mut consul = consul(cx, &raw.consul);
    consul.cert_prefix = raw
        .tls
        .consul_kv_prefix
        .as_ref()
        .map(|p| kv_prefix(cx, p, "tls.consul_kv_prefix"));
    let session_ticket_consul = ticket_consul(cx, &raw);
    let consul_allow = claim_rules(cx, &raw.consul);
    if !consul.tag_routes {
        for (i, v) in raw.vhosts.iter().enumerate() {
            if let Some(c) = &v.get_ref().consul_routes {
                cx.err(
                    c.span(),
                    format!("vhost[{i}].consul_routes"),
                    "only applies with consul.tag_routes = true",
                );
            }
        }
    }
    let failover = raw.failover.as_ref().and_then(|f| failover(cx, f));
    let limits = limits(cx, &raw.limits);
    if limits.trusted_proxies.is_empty() {
        if let Some(l) = raw.listeners.iter().find(|l| l.get_ref().proxy_protocol) {
            cx.err(
                l.span(),
                "listener.proxy_protocol",
                "needs limits.trusted_proxies: the load balancers allowed to send PROXY headers",
            );
        }
    }
    let clash = listeners
        .iter()
        .flat_map(|l| l.addresses.iter())
        .find(|a| addresses_overlap(**a, admin.address));
    if let (true, Some(traffic)) = (admin.enabled, clash) {
        let span = raw.admin.address.as_ref().map(|a| a.span()).unwrap_or(0..0);
        let why = if *traffic == admin.address {
            "is also a traffic listener".to_string()
        } else {
            format!("shares its port with the traffic listener {traffic}, so requests could land on either")
        };
        cx.err(
            span,
            "admin.address",
            format!("{} {why}: the admin API needs its own port", admin.address),
        );
    }
    if has_tls
        && certs_dir.is_none()
        && consul.cert_prefix.is_none()
        && raw.acme.is_none()
        && vhosts.iter().all(|v| v.cert.is_none() && !v.acme)
    {
        let span = raw
            .listeners
            .iter()
            .find(|l| l.get_ref().tls)
            .map(|l| l.span())
            .unwrap_or(0..0);
        cx.err(
            span,
            "listener.tls",
            "a TLS listener needs certificates: set tls.certs_dir, tls.consul_kv_prefix, [acme], or cert/key on a vhost",
        );
    }

    let acme = raw.acme.as_ref().map(|a| {
        let r = a.get_ref();
        let dir = r.directory.get_ref().trim().to_string();
        if !dir.starts_with("https://") || dir.parse::<http::Uri>().is_err() {
            cx.err(
                r.directory.span(),
                "acme.directory",
                format!("`{dir}` is not an https:// directory URL (Let's Encrypt staging: https://acme-staging-v02.api.letsencrypt.org/directory)"),
            );
        }
        let email = r.email.as_ref().map(|e| {
            let v = e.get_ref().trim().to_string();
            let ok = v.split_once('@').is_some_and(|(u, d)| !u.is_empty() && d.contains('.'))
                && !v.contains(|c: char| c.is_whitespace() || c == ',' || c.is_control());
            if !ok {
                cx.err(e.span(), "acme.email", format!("`{v}` is not an email address"));
            }
            v
        });
        let challenge = match r.challenge.as_ref().map(|c| (c, c.get_ref().trim())) {
            None | Some((_, "http-01")) => AcmeChallenge::Http01,
            Some((_, "tls-alpn-01")) => AcmeChallenge::TlsAlpn01,
            Some((c, other)) => {
                cx.err(
                    c.span(),
                    "acme.challenge",
                    format!("`{other}` is not a challenge tollgate answers: use http-01 (a plain listener on port 80) or tls-alpn-01 (a TLS listener on port 443)"),
                );
                AcmeChallenge::Http01
            }
        };
        let needs_tls = challenge == AcmeChallenge::TlsAlpn01;
        let wanted = has_tls || vhosts.iter().any(|v| v.acme);
        if wanted && !listeners.iter().any(|l| l.tls == needs_tls) {
            cx.err(
                r.challenge.as_ref().map_or(a.span(), |c| c.span()),
                "acme.challenge",
                format!(
                    "{} is answered on a {} listener and there is none",
                    challenge.name(),
                    if needs_tls { "TLS (port 443)" } else { "plain (port 80)" }
                ),
            );
        }
        let consul = match (r.consul.unwrap_or(false), &r.encryption_key_file) {
            (false, _) => None,
            (true, None) => {
                cx.err(
                    a.span(),
                    "acme.encryption_key_file",
                    "sharing through Consul needs encryption_key_file: a file with a random secret (e.g. openssl rand -hex 32), the same on every instance",
                );
                None
            }
            (true, Some(f)) => {
                let prefix = r
                    .consul_prefix
                    .as_ref()
                    .map_or("tollgate/acme", |p| p.get_ref().as_str())
                    .trim_matches('/')
                    .to_string();
                if prefix.is_empty() || prefix.contains(|c: char| c.is_whitespace() || c == '?' || c == '#') {
                    let span = r.consul_prefix.as_ref().map_or(0..0, |p| p.span());
                    cx.err(span, "acme.consul_prefix", format!("`{prefix}` is not a KV prefix"));
                }
                Some((prefix, cx.path(f.get_ref())))
            }
        };
        AcmeSettings {
            consul,
            challenge,
            directory: dir,
            email,
            storage: cx.path(r.storage.as_ref().map_or("acme", |s| s.get_ref().as_str())),
            ca_bundle: r.ca_bundle.as_ref().map(|c| cx.path(c.get_ref())),
            origin: cx.origin(a.span()),
        }
    });
    if acme.is_none() {
        if let Some((i, _)) = vhosts.iter().enumerate().find(|(_, v)| v.acme) {
            let span = raw.vhosts[i].span();
            cx.err(
                span,
                format!("vhost[{i}].acme"),
                "acme = true needs an [acme] section (directory, email)",
            );
        }
    }
    Config {
        acme,
        ports,
        source: path.to_path_buf(),
        server: ServerSettings {
            threads,
            // measured: with one thread the per-thread runtime is ~20% faster; with more,
            // work-stealing reuses upstream connections across threads (benches/README.md)
            work_stealing: s.work_stealing.unwrap_or(threads > 1),
            shutdown_timeout,
            watch_config: s.watch_config.unwrap_or(true),
            watch_interval,
            upstream_keepalive_pool_size: pool_size,
            https_redirect_port,
            forwarded_for,
            pid_file: s.pid_file.as_deref().map(|p| cx.path(p)),
            upgrade_sock: s
                .upgrade_sock
                .clone()
                .unwrap_or_else(|| "/tmp/tollgate-upgrade.sock".to_string()),
        },
        log: LogSettings {
            format,
            level,
            access_log: raw.log.access_log.unwrap_or(true),
        },
        listeners,
        certs_dir,
        certs_dir_origin,
        session_tickets: raw.tls.session_tickets.unwrap_or(true),
        session_ticket_keys: ticket_keys,
        session_ticket_lifetime,
        session_ticket_consul,
        post_quantum: raw.tls.post_quantum.unwrap_or(true),
        admin,
        consul,
        consul_allow,
        failover,
        limits,
        vhosts,
        pools,
        plugins,
    }
}

pub(super) fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether two listening addresses would take the same connections: the same address, or the
/// same port where one is the wildcard (`0.0.0.0`, `[::]`) of the other's family.
pub fn addresses_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests;

/// A Consul KV prefix as written at `p` (`option` names it in the error), trimmed of `/`.
fn kv_prefix(cx: &mut Ctx, p: &Spanned<String>, option: &str) -> String {
    let prefix = p.get_ref().trim().trim_matches('/').to_string();
    let ok = !prefix.is_empty()
        && prefix
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if !ok {
        cx.err(
            p.span(),
            option,
            format!(
                "`{prefix}` is not a KV prefix: letters, digits, `-_./`, e.g. \"tollgate/certs\""
            ),
        );
    }
    prefix
}

/// `tls.session_ticket_consul`: the prefix and the encryption key file (`tls`'s, else
/// `[acme]`'s), which must hold a secret now.
fn ticket_consul(cx: &mut Ctx, raw: &RawConfig) -> Option<(String, PathBuf)> {
    let tls = &raw.tls;
    let on = tls.session_ticket_consul.as_ref().filter(|c| *c.get_ref());
    let Some(on) = on else {
        for (set, option) in [
            (
                tls.session_ticket_consul_prefix.as_ref().map(|p| p.span()),
                "tls.session_ticket_consul_prefix",
            ),
            (
                tls.encryption_key_file.as_ref().map(|p| p.span()),
                "tls.encryption_key_file",
            ),
        ] {
            if let Some(span) = set {
                cx.err(
                    span,
                    option,
                    "only applies with session_ticket_consul = true",
                );
            }
        }
        return None;
    };
    if tls.session_tickets == Some(false) || !tls.session_ticket_keys.is_empty() {
        cx.err(
            on.span(),
            "tls.session_ticket_consul",
            "ticket keys come from Consul or from session_ticket_keys files, with session_tickets on: choose one",
        );
    }
    let prefix = match &tls.session_ticket_consul_prefix {
        Some(p) => kv_prefix(cx, p, "tls.session_ticket_consul_prefix"),
        None => "tollgate/tickets".to_string(),
    };
    let acme_key = raw
        .acme
        .as_ref()
        .and_then(|a| a.get_ref().encryption_key_file.as_ref());
    let Some(file) = tls.encryption_key_file.as_ref().or(acme_key) else {
        cx.err(
            on.span(),
            "tls.encryption_key_file",
            "session_ticket_consul seals the keys in Consul with encryption_key_file: a file with a random secret (e.g. openssl rand -hex 32), the same on every instance ([acme]'s is used when it has one)",
        );
        return None;
    };
    let path = cx.path(file.get_ref());
    if let Err(e) = super::secret::read(&path, 16) {
        cx.err(file.span(), "tls.encryption_key_file", e);
    }
    Some((prefix, path))
}

/// `tls.session_ticket_keys` (each file readable and a key) and `tls.session_ticket_lifetime`.
fn ticket_keys(cx: &mut Ctx, tls: &super::raw::RawTls) -> (Vec<PathBuf>, Duration) {
    let lifetime = cx.duration_in(
        &tls.session_ticket_lifetime,
        "tls.session_ticket_lifetime",
        Duration::from_secs(6 * 3600),
        Duration::from_secs(60),
        Duration::from_secs(7 * 24 * 3600),
    );
    if tls.session_tickets == Some(false) {
        if let Some(k) = tls.session_ticket_keys.first() {
            cx.err(
                k.span(),
                "tls.session_ticket_keys",
                "session_tickets = false issues no tickets: remove the keys or the switch",
            );
        }
    }
    if tls.session_ticket_keys.len() > 8 {
        cx.err(
            tls.session_ticket_keys[8].span(),
            "tls.session_ticket_keys",
            "at most 8 keys: the one that seals and those still to be opened",
        );
    }
    let mut out = Vec::new();
    for (i, k) in tls.session_ticket_keys.iter().enumerate() {
        let path = cx.path(k.get_ref());
        let why = match std::fs::read(&path) {
            Ok(bytes) => {
                super::ticket_key_problem(&bytes).map(|w| format!("{}: {w}", path.display()))
            }
            Err(e) => Some(format!("cannot read {}: {e}", path.display())),
        };
        match why {
            Some(why) => cx.err(k.span(), format!("tls.session_ticket_keys[{i}]"), why),
            None => out.push(path),
        }
    }
    (out, lifetime)
}
