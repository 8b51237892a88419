//! Raw schema → validated model. Pure: reads nothing but the text it is given. Collects every
//! problem it finds so `tollgate check` can print them all at once.

use super::raw::{RawBackend, RawConfig, RawLimits, RawPool, RawSize, RawVhost};
use super::*;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use toml::Spanned;

struct Ctx<'a> {
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

    fn cidrs(&mut self, v: &[Spanned<String>], option: &str) -> Vec<crate::limits::Cidr> {
        let mut out = Vec::new();
        for c in v {
            match c.get_ref().parse::<crate::limits::Cidr>() {
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
fn option_at(src: &str, offset: usize) -> String {
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
fn type_hint(message: &str, option: &str) -> &'static str {
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
fn read_schema(file: &Arc<str>, src: &str) -> (Option<RawConfig>, Vec<ConfigError>) {
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

fn build(cx: &mut Ctx, raw: RawConfig, path: &Path) -> Config {
    let listeners = listeners(cx, &raw);
    let pools = pools(cx, &raw.pools);
    let plugins = plugins(cx, &raw.plugins);
    let vhosts = vhosts(cx, &raw.vhosts, &pools, &plugins);
    let has_tls = listeners.iter().any(|l| l.tls);

    let s = &raw.server;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as i64;
    let threads = cx.int(&s.threads, "server.threads", cores, 1, 1024) as usize;
    let shutdown_timeout = cx.duration(
        &s.shutdown_timeout,
        "server.shutdown_timeout",
        Duration::from_secs(30),
    );
    let watch_interval = cx.duration_in(
        &s.watch_interval,
        "server.watch_interval",
        Duration::from_secs(1),
        Duration::from_millis(50),
        Duration::from_secs(3600),
    );
    let pool_size = cx.int(
        &s.upstream_keepalive_pool_size,
        "server.upstream_keepalive_pool_size",
        128,
        0,
        65536,
    ) as usize;
    let first_tls_port = listeners
        .iter()
        .filter(|l| l.tls)
        .flat_map(|l| l.addresses.iter())
        .map(|a| a.port() as i64)
        .next()
        .unwrap_or(443);
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
    let admin = admin(cx, &raw.admin);
    let consul = consul(cx, &raw.consul);
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
    if has_tls && certs_dir.is_none() && vhosts.iter().all(|v| v.cert.is_none()) {
        let span = raw
            .listeners
            .iter()
            .find(|l| l.get_ref().tls)
            .map(|l| l.span())
            .unwrap_or(0..0);
        cx.err(
            span,
            "listener.tls",
            "a TLS listener needs certificates: set tls.certs_dir or cert/key on a vhost",
        );
    }

    Config {
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
        admin,
        consul,
        failover,
        limits,
        vhosts,
        pools,
        plugins,
    }
}

fn plugins(
    cx: &mut Ctx,
    raw: &BTreeMap<String, Spanned<super::raw::RawPlugin>>,
) -> BTreeMap<String, PluginSpec> {
    let mut out = BTreeMap::new();
    for (name, sp) in raw {
        let p = sp.get_ref();
        let opt = |o: &str| format!("plugin.{name}.{o}");
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            cx.err(
                sp.span(),
                format!("plugin.{name}"),
                "a plugin name may hold only letters, digits, - _ and .",
            );
        }
        let json = |cx: &mut Ctx, v: &Option<toml::Value>, o: &str| -> Vec<u8> {
            match v {
                None => Vec::new(),
                Some(toml::Value::String(s)) => s.clone().into_bytes(),
                Some(v) => serde_json::to_vec(v).unwrap_or_else(|e| {
                    cx.err(sp.span(), opt(o), format!("cannot be written as JSON: {e}"));
                    Vec::new()
                }),
            }
        };
        let config = json(cx, &p.config, "config");
        let vm_config = json(cx, &p.vm_config, "vm_config");
        let on_error = cx.choice(
            &p.on_error,
            &opt("on_error"),
            &[
                ("fail_closed", OnError::FailClosed),
                ("fail_open", OnError::FailOpen),
            ],
        );
        let cpu_deadline = cx.duration_in(
            &p.cpu_deadline,
            &opt("cpu_deadline"),
            Duration::from_millis(50),
            Duration::from_millis(1),
            Duration::from_secs(10),
        );
        let max_memory = cx.size(&p.max_memory, &opt("max_memory"), 64 << 20);
        if !(1 << 16..=4 << 30).contains(&max_memory) {
            let span = p.max_memory.as_ref().map(|m| m.span()).unwrap_or(0..0);
            cx.err(
                span,
                opt("max_memory"),
                "must be between 64k (one wasm page) and 4g",
            );
        }
        out.insert(
            name.clone(),
            PluginSpec {
                name: name.clone(),
                file: cx.path(p.file.get_ref()),
                config,
                vm_config,
                vm_id: p.vm_id.clone().unwrap_or_else(|| name.clone()),
                root_id: p.root_id.clone().unwrap_or_default(),
                on_error,
                cpu_deadline,
                max_memory,
                origin: cx.origin(sp.span()),
            },
        );
    }
    out
}

/// Names in a `plugins = [...]` list, each checked against `[plugin.NAME]`.
fn plugin_refs(
    cx: &mut Ctx,
    raw: &[Spanned<String>],
    option: &str,
    plugins: &BTreeMap<String, PluginSpec>,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in raw {
        let n = r.get_ref();
        if !plugins.contains_key(n) {
            let known: Vec<&str> = plugins.keys().map(String::as_str).collect();
            cx.err(
                r.span(),
                option,
                format!(
                    "no plugin named `{n}` (defined plugins: {})",
                    if known.is_empty() {
                        "none; add [plugin.NAME] with file = \"….wasm\"".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        } else if out.contains(n) {
            cx.err(r.span(), option, format!("`{n}` is listed twice"));
        } else {
            out.push(n.clone());
        }
    }
    out
}

fn limits(cx: &mut Ctx, r: &RawLimits) -> Limits {
    let d = |s| Duration::from_secs(s);
    let secs = |cx: &mut Ctx, v: &Option<Spanned<String>>, opt: &str, def: u64| {
        cx.duration_in(v, opt, d(def), Duration::from_millis(10), d(3600))
    };
    let rate = match &r.connection_rate_per_ip {
        None => 100.0,
        Some(v) if v.get_ref().is_finite() && (0.0..=1e6).contains(v.get_ref()) => *v.get_ref(),
        Some(v) => {
            cx.err(
                v.span(),
                "limits.connection_rate_per_ip",
                format!("must be between 0 and 1000000, got {}", v.get_ref()),
            );
            100.0
        }
    };
    let max_connections = cx.int(
        &r.max_connections,
        "limits.max_connections",
        10_000,
        1,
        10_000_000,
    );
    Limits {
        max_connections: max_connections as usize,
        max_connections_per_ip: cx.int(
            &r.max_connections_per_ip,
            "limits.max_connections_per_ip",
            256,
            1,
            10_000_000,
        ) as usize,
        connection_rate_per_ip: rate,
        connection_burst_per_ip: cx.int(
            &r.connection_burst_per_ip,
            "limits.connection_burst_per_ip",
            200,
            1,
            1_000_000,
        ) as u32,
        allow: cx.cidrs(&r.allow, "limits.allow"),
        handshake_timeout: secs(cx, &r.handshake_timeout, "limits.handshake_timeout", 10),
        header_timeout: secs(cx, &r.header_timeout, "limits.header_timeout", 10),
        body_idle_timeout: secs(cx, &r.body_idle_timeout, "limits.body_idle_timeout", 30),
        keepalive_timeout: cx.duration_in(
            &r.keepalive_timeout,
            "limits.keepalive_timeout",
            d(60),
            d(1),
            d(3600),
        ),
        send_timeout: secs(cx, &r.send_timeout, "limits.send_timeout", 60),
        encoded_slashes: cx.choice(
            &r.encoded_slashes,
            "limits.encoded_slashes",
            &[
                ("reject", crate::routing::path::EncodedSlashes::Reject),
                ("keep", crate::routing::path::EncodedSlashes::Keep),
            ],
        ),
        min_body_rate: cx.int(&r.min_body_rate, "limits.min_body_rate", 0, 0, 1 << 40) as u64,
        min_body_rate_after: secs(cx, &r.min_body_rate_after, "limits.min_body_rate_after", 10),
        max_request_line: cx.int(
            &r.max_request_line,
            "limits.max_request_line",
            8192,
            64,
            1 << 20,
        ) as usize,
        max_header_bytes: cx.int(
            &r.max_header_bytes,
            "limits.max_header_bytes",
            32 * 1024,
            256,
            1 << 20,
        ) as usize,
        max_headers: cx.int(&r.max_headers, "limits.max_headers", 100, 4, 256) as usize,
        max_body_size: cx.size(&r.max_body_size, "limits.max_body_size", 10 << 20),
        h2_max_concurrent_streams: cx.int(
            &r.h2_max_concurrent_streams,
            "limits.h2_max_concurrent_streams",
            100,
            1,
            10_000,
        ) as u32,
        h2_max_header_list_size: cx.int(
            &r.h2_max_header_list_size,
            "limits.h2_max_header_list_size",
            32 * 1024,
            1024,
            1 << 20,
        ) as u32,
        h2_max_pending_resets: cx.int(
            &r.h2_max_pending_resets,
            "limits.h2_max_pending_resets",
            20,
            1,
            100_000,
        ) as usize,
        h2_max_error_resets: cx.int(
            &r.h2_max_error_resets,
            "limits.h2_max_error_resets",
            100,
            1,
            100_000,
        ) as usize,
        trusted_proxies: cx.cidrs(&r.trusted_proxies, "limits.trusted_proxies"),
        x_forwarded_for: r.x_forwarded_for.unwrap_or(false),
    }
}

fn failover(cx: &mut Ctx, sf: &Spanned<super::raw::RawFailover>) -> Option<FailoverSettings> {
    let f = sf.get_ref();
    let addr =
        |cx: &mut Ctx, v: &Spanned<String>, opt: &str| match v.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                cx.err(
                    v.span(),
                    opt,
                    format!("`{}` is not an IP:port address", v.get_ref()),
                );
                None
            }
        };
    let listen = addr(cx, &f.listen, "failover.listen");
    let peer = addr(cx, &f.peer, "failover.peer");
    let secret = match (&f.secret, &f.secret_file) {
        (Some(s), None) => Some(s.get_ref().trim().as_bytes().to_vec()).filter(|s| s.len() >= 16),
        (None, Some(p)) => std::fs::read_to_string(cx.path(p.get_ref()))
            .ok()
            .map(|s| s.trim().as_bytes().to_vec())
            .filter(|s| s.len() >= 16),
        _ => None,
    };
    if secret.is_none() {
        cx.err(
            sf.span(),
            "failover.secret",
            "set failover.secret or failover.secret_file to a shared secret of 16 characters or more",
        );
    }
    let interval = cx.duration_in(
        &f.interval,
        "failover.interval",
        Duration::from_millis(200),
        Duration::from_millis(20),
        Duration::from_secs(10),
    );
    let dead_after = cx.duration_in(
        &f.dead_after,
        "failover.dead_after",
        interval * 3 + interval / 2,
        interval * 2,
        Duration::from_secs(60),
    );
    let priority = cx.int(&f.priority, "failover.priority", 100, 1, 255) as u8;
    let name = f.name.get_ref().trim().to_string();
    if name.is_empty() || name.len() > 64 {
        cx.err(f.name.span(), "failover.name", "must be 1 to 64 characters");
    }
    let mut claims = Vec::new();
    for (i, c) in f.claim.iter().enumerate() {
        if let Some(c) = claim(cx, c.get_ref(), &format!("failover.claim[{i}]")) {
            claims.push(c);
        }
    }
    let consul_lock = match f.consul_lock.as_ref().map(|b| *b.get_ref()) {
        Some(true) => {
            let key = f
                .consul_lock_key
                .as_ref()
                .map(|k| k.get_ref().trim().trim_matches('/').to_string())
                .unwrap_or_else(|| "tollgate/failover/leader".into());
            if key.is_empty() || key.contains(char::is_whitespace) {
                let span = f.consul_lock_key.as_ref().map(|k| k.span()).unwrap_or(0..0);
                cx.err(
                    span,
                    "failover.consul_lock_key",
                    "must be a Consul KV key such as `tollgate/failover/leader`",
                );
            }
            let ttl = cx.duration_in(
                &f.consul_lock_ttl,
                "failover.consul_lock_ttl",
                Duration::from_secs(10),
                Duration::from_secs(10),
                Duration::from_secs(3600),
            );
            Some(ConsulLock { key, ttl })
        }
        _ => {
            for (v, opt) in [
                (&f.consul_lock_key, "failover.consul_lock_key"),
                (&f.consul_lock_ttl, "failover.consul_lock_ttl"),
            ] {
                if let Some(v) = v {
                    cx.err(
                        v.span(),
                        opt,
                        "only applies with failover.consul_lock = true",
                    );
                }
            }
            None
        }
    };
    Some(FailoverSettings {
        name,
        priority,
        listen: listen?,
        peer: peer?,
        secret: secret?,
        interval,
        dead_after,
        preempt: f.preempt.unwrap_or(false),
        claims,
        consul_lock,
    })
}

/// One `[[failover.claim]]`: its type's options are required, other types' options refused.
fn claim(cx: &mut Ctx, c: &super::raw::RawClaim, opt: &str) -> Option<Claim> {
    let kind = c.kind.get_ref().as_str();
    let timeout_default = match kind {
        "vip" => Duration::from_secs(2),
        _ => Duration::from_secs(5),
    };
    let timeout = cx.duration_in(
        &c.timeout,
        &format!("{opt}.timeout"),
        timeout_default,
        Duration::from_millis(10),
        Duration::from_secs(120),
    );
    let retries = cx.int(&c.retries, &format!("{opt}.retries"), 2, 0, 10) as u32;
    let strings = [
        ("address", &c.address, &["vip"][..]),
        ("interface", &c.interface, &["vip"]),
        ("garp_repeat", &c.garp_repeat, &["vip"]),
        ("allocation_id", &c.allocation_id, &["aws_eip"]),
        ("instance_id", &c.instance_id, &["aws_eip"]),
        (
            "network_interface_id",
            &c.network_interface_id,
            &["aws_eip"],
        ),
        ("region", &c.region, &["aws_eip"]),
        ("endpoint", &c.endpoint, &["aws_eip"]),
        ("imds_endpoint", &c.imds_endpoint, &["aws_eip"]),
    ];
    for (name, v, types) in strings {
        if let Some(v) = v {
            if !types.contains(&kind) {
                cx.err(
                    v.span(),
                    format!("{opt}.{name}"),
                    format!("does not apply to type = \"{kind}\""),
                );
            }
        }
    }
    if let Some(v) = &c.garp_count {
        if kind != "vip" {
            cx.err(
                v.span(),
                format!("{opt}.garp_count"),
                format!("does not apply to type = \"{kind}\""),
            );
        }
    }
    if !c.command.is_empty() && kind != "exec" {
        cx.err(
            c.kind.span(),
            format!("{opt}.command"),
            format!("does not apply to type = \"{kind}\""),
        );
    }
    let required =
        |cx: &mut Ctx, v: &Option<Spanned<String>>, name: &str, hint: &str| -> Option<String> {
            match v.as_ref().map(|v| v.get_ref().trim().to_string()) {
                Some(s) if !s.is_empty() => Some(s),
                _ => {
                    cx.err(c.kind.span(), format!("{opt}.{name}"), hint.to_string());
                    None
                }
            }
        };
    let action = match kind {
        "exec" => {
            if c.command.is_empty() {
                cx.err(
                    c.kind.span(),
                    format!("{opt}.command"),
                    "an exec claim needs command = [\"/path/to/hook\"]",
                );
                return None;
            }
            Some(ClaimAction::Exec {
                command: c.command.clone(),
            })
        }
        "vip" => {
            let addr = required(cx, &c.address, "address", "a vip claim needs address = \"203.0.113.10/24\" (the floating address and its prefix)")?;
            let interface = required(
                cx,
                &c.interface,
                "interface",
                "a vip claim needs interface = \"eth0\"",
            )?;
            let (ip, prefix) = match addr.split_once('/') {
                Some((ip, p)) => (ip, p.parse::<u8>().ok()),
                None => (addr.as_str(), None),
            };
            let ip = ip.parse::<std::net::IpAddr>().ok();
            let span = c.address.as_ref().map(|a| a.span()).unwrap_or(0..0);
            let (ip, prefix) = match (ip, prefix) {
                (Some(ip), Some(p)) if p <= if ip.is_ipv4() { 32 } else { 128 } => (ip, p),
                _ => {
                    cx.err(span, format!("{opt}.address"), format!("`{addr}` is not ADDRESS/PREFIX, such as 203.0.113.10/24 or 2001:db8::10/64"));
                    return None;
                }
            };
            if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
                cx.err(
                    span,
                    format!("{opt}.address"),
                    format!("{ip} cannot float between hosts"),
                );
            }
            if interface.len() > 15 || interface.contains('/') {
                let span = c.interface.as_ref().map(|a| a.span()).unwrap_or(0..0);
                cx.err(
                    span,
                    format!("{opt}.interface"),
                    "an interface name is at most 15 characters, without `/`",
                );
            }
            Some(ClaimAction::Vip(Vip {
                address: ip,
                prefix,
                interface,
                garp_count: cx.int(&c.garp_count, &format!("{opt}.garp_count"), 3, 1, 100) as u32,
                garp_repeat: cx.duration_in(
                    &c.garp_repeat,
                    &format!("{opt}.garp_repeat"),
                    Duration::from_secs(2),
                    Duration::ZERO,
                    Duration::from_secs(60),
                ),
            }))
        }
        "aws_eip" => {
            let allocation_id = required(
                cx,
                &c.allocation_id,
                "allocation_id",
                "an aws_eip claim needs allocation_id = \"eipalloc-…\"",
            )?;
            let region = c
                .region
                .as_ref()
                .map(|r| r.get_ref().trim().to_string())
                .or_else(|| env("AWS_REGION"))
                .or_else(|| env("AWS_DEFAULT_REGION"));
            let Some(region) = region.filter(|r| !r.is_empty()) else {
                cx.err(
                    c.kind.span(),
                    format!("{opt}.region"),
                    "set region (or AWS_REGION / AWS_DEFAULT_REGION)",
                );
                return None;
            };
            let url = |cx: &mut Ctx,
                       v: &Option<Spanned<String>>,
                       name: &str,
                       default: String|
             -> String {
                match v {
                    None => default,
                    Some(v) => {
                        let s = v.get_ref().trim().trim_end_matches('/').to_string();
                        if !(s.starts_with("http://") || s.starts_with("https://")) {
                            cx.err(
                                v.span(),
                                format!("{opt}.{name}"),
                                format!("`{s}` is not an http:// or https:// URL"),
                            );
                        }
                        s
                    }
                }
            };
            let endpoint = url(
                cx,
                &c.endpoint,
                "endpoint",
                format!("https://ec2.{region}.amazonaws.com"),
            );
            let imds_endpoint = url(
                cx,
                &c.imds_endpoint,
                "imds_endpoint",
                "http://169.254.169.254".into(),
            );
            let trimmed = |v: &Option<Spanned<String>>| {
                v.as_ref()
                    .map(|v| v.get_ref().trim().to_string())
                    .filter(|v| !v.is_empty())
            };
            Some(ClaimAction::AwsEip(AwsEip {
                allocation_id,
                instance_id: trimmed(&c.instance_id),
                network_interface_id: trimmed(&c.network_interface_id),
                region,
                endpoint,
                imds_endpoint,
            }))
        }
        other => {
            cx.err(
                c.kind.span(),
                format!("{opt}.type"),
                format!("`{other}` is not one of: exec, vip, aws_eip"),
            );
            None
        }
    }?;
    Some(Claim {
        action,
        timeout,
        retries,
    })
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// `[consul]`, with Consul's environment variables as defaults.
fn consul(cx: &mut Ctx, raw: &super::raw::RawConsul) -> ConsulSettings {
    let addr_raw = raw
        .address
        .as_ref()
        .map(|a| (a.get_ref().clone(), a.span()))
        .or_else(|| env("CONSUL_HTTP_ADDR").map(|a| (a, 0..0)))
        .unwrap_or_else(|| ("127.0.0.1:8500".to_string(), 0..0));
    let address = if addr_raw.0.starts_with("http://") || addr_raw.0.starts_with("https://") {
        addr_raw.0.trim_end_matches('/').to_string()
    } else {
        format!("http://{}", addr_raw.0.trim_end_matches('/'))
    };
    if address
        .parse::<http::Uri>()
        .map(|u| u.host().is_none())
        .unwrap_or(true)
    {
        cx.err(
            addr_raw.1,
            "consul.address",
            format!(
                "`{}` is not an address: use http://127.0.0.1:8500 (or CONSUL_HTTP_ADDR)",
                addr_raw.0
            ),
        );
    }
    let token = raw
        .token
        .as_ref()
        .map(|t| t.get_ref().trim().to_string())
        .or_else(|| env("CONSUL_HTTP_TOKEN"));
    let token_file = raw.token_file.as_ref().map(|f| cx.path(f.get_ref()));
    if let (Some(_), Some(f)) = (&raw.token, &raw.token_file) {
        cx.err(
            f.span(),
            "consul.token_file",
            "set consul.token or consul.token_file, not both",
        );
    }
    let ca_cert = raw
        .ca_cert
        .as_ref()
        .map(|c| cx.path(c.get_ref()))
        .or_else(|| env("CONSUL_CACERT").map(PathBuf::from));
    let ms = Duration::from_millis;
    let wait = cx.duration_in(
        &raw.wait,
        "consul.wait",
        Duration::from_secs(300),
        Duration::from_secs(1),
        Duration::from_secs(600),
    );
    let quiescence_min = cx.duration_in(
        &raw.quiescence_min,
        "consul.quiescence_min",
        ms(2),
        ms(0),
        Duration::from_secs(60),
    );
    let quiescence_max = cx.duration_in(
        &raw.quiescence_max,
        "consul.quiescence_max",
        ms(150),
        ms(0),
        Duration::from_secs(300),
    );
    if quiescence_max < quiescence_min {
        let span = raw
            .quiescence_max
            .as_ref()
            .map(|s| s.span())
            .unwrap_or(0..0);
        cx.err(
            span,
            "consul.quiescence_max",
            "must not be shorter than consul.quiescence_min",
        );
    }
    ConsulSettings {
        address,
        token,
        token_file,
        ca_cert,
        datacenter: raw.datacenter.as_ref().map(|d| d.get_ref().clone()),
        wait,
        stale: raw.stale.unwrap_or(false),
        cached: raw.cached.unwrap_or(true),
        quiescence_min,
        quiescence_max,
        max_blocking: cx.int(&raw.max_blocking, "consul.max_blocking", 128, 0, 190) as usize,
        tag_routes: raw.tag_routes.unwrap_or(false),
        route_tag_prefix: raw
            .route_tag_prefix
            .clone()
            .unwrap_or_else(|| "tollgate.route=".to_string()),
        fabio_tags: raw.fabio_tags.unwrap_or(true),
        route_meta_prefix: raw
            .route_meta_prefix
            .clone()
            .unwrap_or_else(|| "tollgate-route".to_string()),
        min_fraction: match &raw.min_fraction {
            None => 0.0,
            Some(f) if (0.0..=1.0).contains(f.get_ref()) => *f.get_ref(),
            Some(f) => {
                cx.err(
                    f.span(),
                    "consul.min_fraction",
                    format!("must be between 0.0 and 1.0, got {}", f.get_ref()),
                );
                0.0
            }
        },
        watch_grace: cx.duration_in(
            &raw.watch_grace,
            "consul.watch_grace",
            Duration::from_secs(30),
            Duration::ZERO,
            Duration::from_secs(3600),
        ),
        state_file: match raw.state_file.as_deref() {
            Some("") => None,
            Some(p) => Some(cx.path(p)),
            None => Some(cx.path("tollgate-consul-state.json")),
        },
    }
}

fn admin(cx: &mut Ctx, raw: &super::raw::RawAdmin) -> AdminSettings {
    let default_addr = SocketAddr::from(([127, 0, 0, 1], 9901));
    let address = match &raw.address {
        None => default_addr,
        Some(a) => match a.get_ref().parse::<SocketAddr>() {
            Ok(sa) => sa,
            Err(_) => {
                cx.err(
                    a.span(),
                    "admin.address",
                    format!(
                        "`{}` is not an IP:port address (e.g. 127.0.0.1:9901)",
                        a.get_ref()
                    ),
                );
                default_addr
            }
        },
    };
    let token = match (&raw.token, &raw.token_file) {
        (Some(_), Some(f)) => {
            cx.err(
                f.span(),
                "admin.token_file",
                "set admin.token or admin.token_file, not both",
            );
            None
        }
        (Some(t), None) => {
            if t.get_ref().trim().len() < 16 {
                cx.err(
                    t.span(),
                    "admin.token",
                    "is too short to be a secret: use at least 16 characters (e.g. `openssl rand -hex 32`)",
                );
            }
            Some(AdminToken::Inline(t.get_ref().trim().to_string()))
        }
        (None, Some(f)) => Some(AdminToken::File {
            path: cx.path(f.get_ref()),
            origin: cx.origin(f.span()),
        }),
        (None, None) => None,
    };
    let enabled = raw.enabled.unwrap_or(true);
    if enabled && token.is_none() && !address.ip().is_loopback() {
        let span = raw.address.as_ref().map(|a| a.span()).unwrap_or(0..0);
        cx.err(
            span,
            "admin.address",
            format!(
                "{address} is reachable from other hosts, so the admin API needs a token: set admin.token or admin.token_file"
            ),
        );
    }
    AdminSettings {
        enabled,
        address,
        token,
    }
}

/// Whether two listening addresses would take the same connections: the same address, or the
/// same port where one is the wildcard (`0.0.0.0`, `[::]`) of the other's family.
fn addresses_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// `None` when a route path is in the normal form requests are routed on; else a hint for
/// the error (`"; write `/b`"` when it has one).
fn route_path_not_normal(p: &str) -> Option<String> {
    use crate::routing::path::{normalize_path, EncodedSlashes};
    match normalize_path(p, EncodedSlashes::Keep) {
        Ok(std::borrow::Cow::Borrowed(_)) if !p.contains(';') => None,
        Ok(n) if !p.contains(';') => Some(format!("; write `{n}`")),
        _ => Some(String::new()),
    }
}

fn listeners(cx: &mut Ctx, raw: &RawConfig) -> Vec<Listener> {
    if raw.listeners.is_empty() {
        cx.err(
            0..0,
            "listener",
            "no listeners: add [[listener]] with address = \"0.0.0.0:443\" and tls = true",
        );
    }
    let mut seen: Vec<(SocketAddr, usize)> = Vec::new();
    let mut out = Vec::new();
    for (i, l) in raw.listeners.iter().enumerate() {
        let span = l.get_ref().address.span();
        let addrs = l.get_ref().address.get_ref().to_vec();
        if addrs.is_empty() {
            cx.err(span.clone(), format!("listener[{i}].address"), "is empty");
        }
        let mut addresses = Vec::new();
        for a in addrs {
            match a.parse::<SocketAddr>() {
                Ok(sa) => {
                    let line = cx.origin(span.clone()).line;
                    if let Some((other, prev)) =
                        seen.iter().find(|(b, _)| addresses_overlap(sa, *b))
                    {
                        let what = if *other == sa {
                            String::new()
                        } else {
                            format!(" (as {other}: same port, and one is a wildcard address)")
                        };
                        cx.err(
                            span.clone(),
                            format!("listener[{i}].address"),
                            format!("{sa} is already used by the listener on line {prev}{what}"),
                        );
                    }
                    seen.push((sa, line));
                    addresses.push(sa);
                }
                Err(_) => cx.err(
                    span.clone(),
                    format!("listener[{i}].address"),
                    format!("`{a}` is not an IP:port address (e.g. 0.0.0.0:443 or [::]:443)"),
                ),
            }
        }
        let tls = l.get_ref().tls;
        out.push(Listener {
            addresses,
            tls,
            http2: l.get_ref().http2.unwrap_or(true) && tls,
            proxy_protocol: l.get_ref().proxy_protocol,
        });
    }
    out
}

/// Is `name` a valid vhost name: a DNS name, an IP literal, or `*.` followed by a DNS name.
pub fn check_host_name(name: &str) -> Result<(), String> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let (wild, rest) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    if rest.contains('*') {
        return Err(format!(
            "`{name}`: a wildcard is only allowed as the whole first label, e.g. *.example.com"
        ));
    }
    if rest.is_empty() || rest.len() > 253 {
        return Err(format!("`{name}` is not a host name"));
    }
    for label in rest.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "`{name}` is not a host name (label `{label}`): use letters, digits and hyphens"
            ));
        }
    }
    if wild && !rest.contains('.') && rest.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("`{name}`: a wildcard cannot cover an IP address"));
    }
    Ok(())
}

fn vhosts(
    cx: &mut Ctx,
    raw: &[Spanned<RawVhost>],
    pools: &BTreeMap<String, PoolSpec>,
    plugins: &BTreeMap<String, PluginSpec>,
) -> Vec<Vhost> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut default_line: Option<usize> = None;
    let mut out = Vec::new();
    for (i, sv) in raw.iter().enumerate() {
        let v = sv.get_ref();
        let origin = cx.origin(sv.span());
        let mut names = Vec::new();
        for n in &v.names {
            let name = n
                .get_ref()
                .trim()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            if let Err(e) = check_host_name(&name) {
                cx.err(n.span(), format!("vhost[{i}].names"), e);
                continue;
            }
            let line = cx.origin(n.span()).line;
            if let Some(prev) = seen.insert(name.clone(), line) {
                cx.err(
                    n.span(),
                    format!("vhost[{i}].names"),
                    format!("`{name}` is already a name of the vhost on line {prev}"),
                );
            }
            names.push(name);
        }
        if v.default {
            if let Some(prev) = default_line {
                cx.err(
                    sv.span(),
                    format!("vhost[{i}].default"),
                    format!(
                        "only one vhost can be the default; the vhost on line {prev} already is"
                    ),
                );
            }
            default_line = Some(origin.line);
        } else if v.names.is_empty() {
            cx.err(
                sv.span(),
                format!("vhost[{i}].names"),
                "a vhost needs names = [\"example.com\"] unless it is the default (default = true)",
            );
        }
        let cert = match (&v.cert, &v.key) {
            (Some(c), Some(k)) => Some(CertFiles {
                cert: cx.path(c.get_ref()),
                key: cx.path(k.get_ref()),
                origin: cx.origin(c.span()),
            }),
            (None, None) => None,
            (Some(c), None) => {
                cx.err(
                    c.span(),
                    format!("vhost[{i}].key"),
                    "cert is set but key is not: set both",
                );
                None
            }
            (None, Some(k)) => {
                cx.err(
                    k.span(),
                    format!("vhost[{i}].cert"),
                    "key is set but cert is not: set both",
                );
                None
            }
        };
        if v.route.is_empty() {
            cx.err(
                sv.span(),
                format!("vhost[{i}].route"),
                "the vhost has no routes: add [[vhost.route]] with path = \"/\" and pool = \"…\"",
            );
        }
        let mut routes = Vec::new();
        let mut paths: HashMap<String, usize> = HashMap::new();
        for (j, sr) in v.route.iter().enumerate() {
            let r = sr.get_ref();
            let p = r.path.get_ref();
            let opt = format!("vhost[{i}].route[{j}]");
            if !p.starts_with('/') || p.contains(['?', '#', ' ']) {
                cx.err(
                    r.path.span(),
                    format!("{opt}.path"),
                    format!(
                        "`{p}` is not a path prefix: it must start with / and hold no ? # or space"
                    ),
                );
            } else if let Some(hint) = route_path_not_normal(p) {
                cx.err(
                    r.path.span(),
                    format!("{opt}.path"),
                    format!(
                        "`{p}` can never match: requests are routed on their normalised path (no //, . or .. segments, %XX only for reserved characters, no ;){hint}"
                    ),
                );
            }
            let line = cx.origin(r.path.span()).line;
            if let Some(prev) = paths.insert(p.clone(), line) {
                cx.err(
                    r.path.span(),
                    format!("{opt}.path"),
                    format!("`{p}` is already routed on line {prev}"),
                );
            }
            let pool = r.pool.get_ref();
            if !pools.contains_key(pool) {
                let known: Vec<&str> = pools.keys().map(String::as_str).collect();
                cx.err(
                    r.pool.span(),
                    format!("{opt}.pool"),
                    format!(
                        "no pool named `{pool}` (defined pools: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
            let max_body_size = r
                .max_body_size
                .as_ref()
                .map(|_| cx.size(&r.max_body_size, &format!("{opt}.max_body_size"), 0));
            let route_plugins = plugin_refs(cx, &r.plugins, &format!("{opt}.plugins"), plugins);
            routes.push(Route {
                path: p.clone(),
                pool: pool.clone(),
                max_body_size,
                plugins: route_plugins,
                origin: cx.origin(r.path.span()),
            });
        }
        let vhost_plugins = plugin_refs(cx, &v.plugins, &format!("vhost[{i}].plugins"), plugins);
        out.push(Vhost {
            names,
            default: v.default,
            cert,
            redirect_https: v.redirect_https.unwrap_or(true),
            plugins: vhost_plugins,
            routes,
            origin,
        });
    }
    out
}

fn pools(cx: &mut Ctx, raw: &BTreeMap<String, Spanned<RawPool>>) -> BTreeMap<String, PoolSpec> {
    let mut out = BTreeMap::new();
    for (name, sp) in raw {
        let p = sp.get_ref();
        let opt = format!("pool.{name}");
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            cx.err(
                sp.span(),
                opt.clone(),
                format!("`{name}` is not a pool name: use letters, digits, - _ ."),
            );
        }
        let consul = p.consul.as_ref().map(|c| {
            let c_ref = c.get_ref();
            if c_ref.service.get_ref().trim().is_empty() {
                cx.err(
                    c_ref.service.span(),
                    format!("{opt}.consul.service"),
                    "is empty",
                );
            }
            if !p.backends.is_empty() {
                cx.err(
                    c.span(),
                    format!("{opt}.consul"),
                    "a pool takes its backends from Consul or from `backends`, not both",
                );
            }
            ServiceKey {
                service: c_ref.service.get_ref().trim().to_string(),
                tags: c_ref.tags.clone(),
                datacenter: c_ref.datacenter.clone(),
                passing: c_ref.passing.unwrap_or(true),
            }
        });
        if p.backends.is_empty() && consul.is_none() {
            cx.err(
                sp.span(),
                format!("{opt}.backends"),
                "a pool needs backends = [\"127.0.0.1:8080\"] or consul = { service = \"name\" }",
            );
        }
        let mut backends = Vec::new();
        for (k, sb) in p.backends.iter().enumerate() {
            let (addr, weight) = match sb.get_ref() {
                RawBackend::Address(a) => (a.clone(), None),
                RawBackend::Full(f) => (f.address.clone(), f.weight),
            };
            let bopt = format!("{opt}.backends[{k}]");
            let weight = match weight {
                None => 1,
                Some(w) if (1..=1000).contains(&w) => w as u32,
                Some(w) => {
                    cx.err(
                        sb.span(),
                        format!("{bopt}.weight"),
                        format!("must be between 1 and 1000, got {w}"),
                    );
                    1
                }
            };
            match addr.parse::<SocketAddr>() {
                Ok(address) => {
                    if backends.iter().any(|b: &BackendSpec| b.address == address) {
                        cx.err(sb.span(), bopt, format!("{address} is listed twice in this pool"));
                    } else {
                        backends.push(BackendSpec { address, weight });
                    }
                }
                Err(_) => cx.err(
                    sb.span(),
                    bopt,
                    format!("`{addr}` is not an IP:port address (static backends are not resolved by DNS)"),
                ),
            }
        }
        let balance = cx.choice(
            &p.balance,
            &format!("{opt}.balance"),
            &[
                ("round_robin", Balance::RoundRobin),
                ("p2c", Balance::PowerOfTwo),
            ],
        );
        let ms = Duration::from_millis;
        let hour = Duration::from_secs(3600);
        let connect_timeout = cx.duration_in(
            &p.connect_timeout,
            &format!("{opt}.connect_timeout"),
            pool_defaults::CONNECT_TIMEOUT,
            ms(1),
            hour,
        );
        let read_timeout = cx.duration_in(
            &p.read_timeout,
            &format!("{opt}.read_timeout"),
            pool_defaults::READ_TIMEOUT,
            ms(1),
            hour,
        );
        let write_timeout = cx.duration_in(
            &p.write_timeout,
            &format!("{opt}.write_timeout"),
            pool_defaults::WRITE_TIMEOUT,
            ms(1),
            hour,
        );
        let idle_timeout = cx.duration_in(
            &p.idle_timeout,
            &format!("{opt}.idle_timeout"),
            pool_defaults::IDLE_TIMEOUT,
            ms(1),
            hour,
        );
        let retries = cx.int(
            &p.retries,
            &format!("{opt}.retries"),
            pool_defaults::RETRIES as i64,
            0,
            10,
        ) as u32;
        let max_fails = cx.int(
            &p.max_fails,
            &format!("{opt}.max_fails"),
            pool_defaults::MAX_FAILS as i64,
            1,
            1000,
        ) as u32;
        let eject_time = cx.duration_in(
            &p.eject_time,
            &format!("{opt}.eject_time"),
            pool_defaults::EJECT_TIME,
            ms(1),
            hour,
        );
        let eject_max_time = cx.duration_in(
            &p.eject_max_time,
            &format!("{opt}.eject_max_time"),
            pool_defaults::EJECT_MAX_TIME,
            ms(1),
            24 * hour,
        );
        if eject_max_time < eject_time {
            cx.err(
                sp.span(),
                format!("{opt}.eject_max_time"),
                format!("must not be shorter than eject_time ({eject_time:?})"),
            );
        }
        out.insert(
            name.clone(),
            PoolSpec {
                backends,
                consul,
                balance,
                connect_timeout,
                read_timeout,
                write_timeout,
                idle_timeout,
                retries,
                health: HealthPolicy {
                    max_fails,
                    eject_time,
                    eject_max_time,
                },
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(src: &str) -> Vec<ConfigError> {
        parse(Path::new("/etc/tollgate/t.toml"), src).unwrap_err().0
    }

    const OK: &str = r#"
[[listener]]
address = "127.0.0.1:8080"

[[vhost]]
names = ["example.com", "*.example.com"]
[[vhost.route]]
path = "/"
pool = "web"

[pool.web]
backends = ["127.0.0.1:9000", { address = "127.0.0.1:9001", weight = 3 }]
"#;

    #[test]
    fn valid_config_fills_safe_defaults() {
        let c = parse(Path::new("/etc/tollgate/t.toml"), OK).unwrap();
        assert_eq!(c.vhosts[0].names, vec!["example.com", "*.example.com"]);
        assert!(c.vhosts[0].redirect_https);
        let web = &c.pools["web"];
        assert_eq!(web.backends[1].weight, 3);
        assert_eq!(web.retries, 2);
        assert_eq!(web.health.max_fails, 3);
        assert_eq!(c.server.forwarded_for, ForwardedFor::Replace);
        assert!(!c.has_tls());
    }

    #[test]
    fn syntax_error_names_line_and_option() {
        let e = errs("[server]\nthreads = 2\nwork_stealing = [\n");
        assert_eq!(e.len(), 1, "nothing more can be read: {e:?}");
        assert_eq!(e[0].origin.line, 4);
    }

    #[test]
    fn type_errors_have_a_hint_and_do_not_hide_other_problems() {
        let src = OK
            .replacen("[pool.web]\n", "[pool.web]\nconnect_timeout = 5\n", 1)
            .replace("pool = \"web\"", "pool = \"nope\"");
        let e = errs(&format!("[server]\nthreads = \"two\"\n{src}"));
        let t = e.iter().find(|e| e.option == "server.threads").unwrap();
        assert_eq!(t.origin.line, 2);
        assert!(t.message.contains("without quotes"), "{}", t.message);
        let c = e
            .iter()
            .find(|e| e.option == "pool.web.connect_timeout")
            .unwrap_or_else(|| panic!("{e:?}"));
        assert!(c.message.contains("write \"30s\""), "{}", c.message);
        assert!(
            e.iter().any(|e| e.message.contains("no pool named `nope`")),
            "the semantic problem is reported with the schema ones: {e:?}"
        );
        let lines: Vec<usize> = e.iter().map(|e| e.origin.line).collect();
        assert!(
            lines.windows(2).all(|w| w[0] <= w[1]),
            "in line order: {lines:?}"
        );
    }

    #[test]
    fn unknown_option_is_an_error() {
        let e = errs("[server]\nthreadz = 2\nthreadx = 3\n");
        let unknown: Vec<_> = e
            .iter()
            .filter(|e| e.option.starts_with("server."))
            .collect();
        assert_eq!(unknown.len(), 2, "both unknown options at once: {e:?}");
        assert_eq!(unknown[0].origin.line, 2);
        assert!(
            unknown[0].message.contains("unknown field `threadz`"),
            "{}",
            unknown[0].message
        );
        assert!(unknown[1].message.contains("unknown field `threadx`"));
    }

    #[test]
    fn every_semantic_problem_is_reported() {
        let src = OK
            .replace("pool = \"web\"", "pool = \"nope\"")
            .replace("127.0.0.1:8080", "localhost:http")
            .replace("*.example.com", "foo.*.com");
        let e = errs(&src);
        let opts: Vec<&str> = e.iter().map(|e| e.option.as_str()).collect();
        assert!(opts.contains(&"listener[0].address"), "{opts:?}");
        assert!(opts.contains(&"vhost[0].names"), "{opts:?}");
        assert!(opts.contains(&"vhost[0].route[0].pool"), "{opts:?}");
        let pool_err = e.iter().find(|e| e.option.ends_with(".pool")).unwrap();
        assert_eq!(pool_err.origin.line, 9);
        assert!(pool_err.message.contains("defined pools: web"));
    }

    #[test]
    fn host_names() {
        assert!(check_host_name("example.com").is_ok());
        assert!(check_host_name("*.example.com").is_ok());
        assert!(check_host_name("127.0.0.1").is_ok());
        assert!(check_host_name("*").is_err());
        assert!(check_host_name("a.*.com").is_err());
        assert!(check_host_name("*foo.com").is_err());
        assert!(check_host_name("-a.com").is_err());
        assert!(check_host_name("a..com").is_err());
    }

    #[test]
    fn option_at_finds_table_and_key() {
        let src = "[pool.web]\nretries = x\n";
        assert_eq!(option_at(src, src.find('x').unwrap()), "pool.web.retries");
    }

    const FAILOVER: &str = "[failover]\nname = \"a\"\nlisten = \"10.0.0.1:7946\"\npeer = \"10.0.0.2:7946\"\nsecret = \"0123456789abcdef\"\n";

    #[test]
    fn failover_claims_are_validated_per_type() {
        let ok = format!(
            "{OK}{FAILOVER}consul_lock = true\n\
             [[failover.claim]]\ntype = \"vip\"\naddress = \"203.0.113.10/24\"\ninterface = \"eth0\"\n\
             [[failover.claim]]\ntype = \"aws_eip\"\nallocation_id = \"eipalloc-1\"\nregion = \"eu-west-1\"\n\
             [[failover.claim]]\ntype = \"exec\"\ncommand = [\"/bin/true\"]\n"
        );
        let c = parse(Path::new("/etc/tollgate/t.toml"), &ok).unwrap();
        let f = c.failover.unwrap();
        assert_eq!(
            f.claims.iter().map(|c| c.action.kind()).collect::<Vec<_>>(),
            ["vip", "aws_eip", "exec"]
        );
        assert_eq!(
            f.consul_lock.as_ref().unwrap().key,
            "tollgate/failover/leader"
        );
        assert_eq!(f.consul_lock.unwrap().ttl, Duration::from_secs(10));
        match &f.claims[1].action {
            ClaimAction::AwsEip(e) => {
                assert_eq!(e.endpoint, "https://ec2.eu-west-1.amazonaws.com");
                assert_eq!(e.imds_endpoint, "http://169.254.169.254");
                assert_eq!(e.instance_id, None);
            }
            other => panic!("{other:?}"),
        }

        let bad = format!(
            "{OK}{FAILOVER}consul_lock_ttl = \"5s\"\n\
             [[failover.claim]]\ntype = \"vip\"\naddress = \"203.0.113.10\"\ninterface = \"eth0\"\n\
             [[failover.claim]]\ntype = \"vip\"\ninterface = \"eth0\"\n\
             [[failover.claim]]\ntype = \"vip\"\naddress = \"127.0.0.5/8\"\ninterface = \"eth0\"\n\
             [[failover.claim]]\ntype = \"aws_eip\"\nallocation_id = \"eipalloc-1\"\nregion = \"x\"\nendpoint = \"ec2.example\"\n\
             [[failover.claim]]\ntype = \"exec\"\ncommand = [\"/bin/true\"]\ninterface = \"eth0\"\n\
             [[failover.claim]]\ntype = \"carrier-pigeon\"\n"
        );
        let e = errs(&bad);
        let got: Vec<(String, String)> = e
            .iter()
            .map(|e| (e.option.clone(), e.message.clone()))
            .collect();
        let has = |opt: &str, msg: &str| {
            assert!(
                got.iter().any(|(o, m)| o == opt && m.contains(msg)),
                "no `{opt}: …{msg}…` in {got:#?}"
            )
        };
        has(
            "failover.consul_lock_ttl",
            "only applies with failover.consul_lock = true",
        );
        has("failover.claim[0].address", "is not ADDRESS/PREFIX");
        has("failover.claim[1].address", "a vip claim needs address");
        has("failover.claim[2].address", "cannot float between hosts");
        has(
            "failover.claim[3].endpoint",
            "is not an http:// or https:// URL",
        );
        has(
            "failover.claim[4].interface",
            "does not apply to type = \"exec\"",
        );
        has(
            "failover.claim[5].type",
            "is not one of: exec, vip, aws_eip",
        );
        // each problem names its line
        assert!(e.iter().all(|e| e.to_string().contains("t.toml:")), "{e:?}");
    }
}
