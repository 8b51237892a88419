//! Raw schema → validated model. Pure: reads nothing but the text it is given. Collects every
//! problem it finds so `tollgate check` can print them all at once. One file per section
//! (`listeners`, `vhosts`, `pools`, `limits`, `consul`, `admin`, `failover`, `plugins`); this
//! one reads the schema and assembles the `Config`.

use super::raw::{RawBackend, RawConfig, RawLimits, RawPool, RawSize, RawVhost};
use super::*;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use toml::Spanned;

mod admin;
mod consul;
mod failover;
mod limits;
mod listeners;
mod plugins;
mod pools;
mod vhosts;

pub use vhosts::check_host_name;
use {admin::*, consul::*, failover::*, limits::*, listeners::*, plugins::*, pools::*, vhosts::*};

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
    // Idle upstream connections kept per worker. It must cover the requests in flight: a
    // connection released when the pool is full is closed, and the next request pays a new
    // connect (at 128, HTTP/2 load with 256 streams in flight opened a connection for one
    // request in three; benches/compare.py counts them). Idle connections cost a socket each.
    let pool_size = cx.int(
        &s.upstream_keepalive_pool_size,
        "server.upstream_keepalive_pool_size",
        1024,
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

pub(super) fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether two listening addresses would take the same connections: the same address, or the
/// same port where one is the wildcard (`0.0.0.0`, `[::]`) of the other's family.
pub(super) fn addresses_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
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
    fn a_failover_secret_file_that_cannot_be_used_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let ok = dir.path().join("ok");
        std::fs::write(&ok, "0123456789abcdef\n").unwrap();
        let with = |p: &Path| {
            FAILOVER.replace(
                "secret = \"0123456789abcdef\"",
                &format!("secret_file = \"{}\"", p.display()),
            )
        };
        let c = parse(
            Path::new("/etc/tollgate/t.toml"),
            &format!("{OK}{}", with(&ok)),
        )
        .unwrap();
        assert_eq!(c.failover.unwrap().secret, b"0123456789abcdef".to_vec());
        for (p, says) in [
            (short.clone(), "holds fewer than 16 characters".to_string()),
            (dir.path().join("none"), "cannot read ".to_string()),
        ] {
            let e = errs(&format!("{OK}{}", with(&p)));
            assert_eq!(e.len(), 1, "one problem, said once: {e:?}");
            assert_eq!(e[0].option, "failover.secret_file");
            assert!(e[0].message.contains(&says), "{e:?}");
        }
    }

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
