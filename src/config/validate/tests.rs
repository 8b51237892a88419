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

#[test]
fn consul_claim_rules_and_vhost_consent_are_validated() {
    let good = format!(
        "{OK}\n[consul]\ntag_routes = true\n\
         [[consul.allow]]\nhosts = [\"*.Apps.example.com\", \"*\"]\npaths = [\"/api\"]\nservices = [\"web-*\"]\ntags = [\"team=web\"]\n"
    )
    .replace(
        "[[vhost.route]]\npath = \"/\"",
        "consul_routes = [\"web-*\", \"shop\"]\n[[vhost.route]]\npath = \"/\"",
    );
    let c = parse(Path::new("/etc/tollgate/t.toml"), &good).unwrap();
    let r = &c.consul_allow[0];
    assert_eq!(r.hosts, ["*.apps.example.com", "*"]);
    assert_eq!(
        (r.paths.clone(), r.services.clone()),
        (vec!["/api".to_string()], vec!["web-*".to_string()])
    );
    assert_eq!(r.tags, ["team=web"]);
    assert_eq!(
        c.vhosts[0].consul_routes,
        ConsulRoutes::Services(vec!["web-*".into(), "shop".into()])
    );
    // the default: no consent, no rules
    let plain = parse(Path::new("/etc/tollgate/t.toml"), OK).unwrap();
    assert_eq!(plain.vhosts[0].consul_routes, ConsulRoutes::Refused);
    assert!(plain.consul_allow.is_empty());

    let bad = format!(
        "{OK}\n[consul]\ntag_routes = true\n\
         [[consul.allow]]\nhosts = [\"a..b\"]\npaths = [\"api\"]\nservices = [\"web shop\"]\n\
         [[consul.allow]]\nhosts = []\n"
    )
    .replace(
        "[[vhost.route]]\npath = \"/\"",
        "consul_routes = []\n[[vhost.route]]\npath = \"/\"",
    );
    let e = errs(&bad);
    let said = |opt: &str, words: &str| {
        assert!(
            e.iter()
                .any(|e| e.option == opt && e.message.contains(words)),
            "{opt}: {words} in {e:#?}"
        )
    };
    said("consul.allow[0].hosts", "is not a host name");
    said("consul.allow[0].paths", "`api` is not a path prefix");
    said(
        "consul.allow[0].services",
        "`web shop` is not a service name pattern",
    );
    said("consul.allow[1].hosts", "name the hosts");
    said("consul.allow[1].services", "name the services");
    said("vhost[0].consul_routes", "an empty list allows no service");
    let e = errs(&OK.replace(
        "[[vhost.route]]\npath = \"/\"",
        "consul_routes = \"yes\"\n[[vhost.route]]\npath = \"/\"",
    ));
    assert!(
        e[0].message
            .contains("true, false, or a list of service name patterns"),
        "{e:?}"
    );
    // both need tag_routes
    let off = format!("{OK}\n[[consul.allow]]\nhosts = [\"*\"]\nservices = [\"*\"]\n").replace(
        "[[vhost.route]]\npath = \"/\"",
        "consul_routes = true\n[[vhost.route]]\npath = \"/\"",
    );
    let e = errs(&off);
    for opt in ["consul.allow[0]", "vhost[0].consul_routes"] {
        assert!(
            e.iter()
                .any(|e| e.option == opt
                    && e.message == "only applies with consul.tag_routes = true"),
            "{opt}: {e:#?}"
        );
    }
}

#[test]
fn consul_pool_failover_datacenters_are_validated() {
    let pool = |failover: &str| {
        OK.replace(
            "[pool.web]\nbackends = [\"127.0.0.1:9000\", { address = \"127.0.0.1:9001\", weight = 3 }]",
            &format!("[pool.web]\nconsul = {{ service = \"web\", datacenter = \"dc1\", failover = {failover} }}"),
        )
    };
    let c = parse(
        Path::new("/etc/tollgate/t.toml"),
        &pool("[\"dc2\", \"dc3\"]"),
    )
    .unwrap();
    let web = &c.pools["web"];
    assert_eq!(web.failover, ["dc2", "dc3"]);
    let dcs: Vec<Option<String>> = web
        .consul_keys()
        .into_iter()
        .map(|k| k.datacenter)
        .collect();
    assert_eq!(
        dcs,
        [Some("dc1".into()), Some("dc2".into()), Some("dc3".into())]
    );
    assert_eq!(c.consul.failback_after, Duration::from_secs(30));
    let near = OK.replace(
        "[pool.web]\nbackends = [\"127.0.0.1:9000\", { address = \"127.0.0.1:9001\", weight = 3 }]",
        "[pool.web]\nconsul = { service = \"web\", nearest = 2 }",
    );
    let c = parse(Path::new("/etc/tollgate/t.toml"), &near).unwrap();
    assert_eq!(
        (c.pools["web"].nearest, c.pools["web"].failover.len()),
        (2, 0)
    );
    let both = near.replace("nearest = 2", "nearest = 2, failover = [\"dc2\"]");
    assert!(errs(&both)
        .iter()
        .any(|e| e.option == "pool.web.consul.nearest" && e.message.contains("not both")));
    assert!(errs(&near.replace("nearest = 2", "nearest = 17"))
        .iter()
        .any(|e| e.option == "pool.web.consul.nearest"));
    let e = errs(&pool("[\"dc2\", \"dc2\", \"dc1\", \"d c\"]"));
    for words in [
        "`dc2` is listed twice",
        "`dc1` is the pool's own datacenter",
        "`d c` is not a datacenter name",
    ] {
        assert!(
            e.iter()
                .any(|e| e.option == "pool.web.consul.failover" && e.message == words),
            "{words}: {e:#?}"
        );
    }
}

#[test]
fn pool_health_checks_are_validated() {
    let with = |hc: &str| {
        OK.replace(
            "weight = 3 }]",
            &format!("weight = 3 }}]\nhealth_check = {{ {hc} }}"),
        )
    };
    let c = parse(
        Path::new("/etc/tollgate/t.toml"),
        &with("path = \"/healthz\""),
    )
    .unwrap();
    let hc = c.pools["web"].check.clone().unwrap();
    assert_eq!(
        (hc.interval, hc.timeout, hc.healthy, hc.unhealthy, hc.status),
        (
            Duration::from_secs(5),
            Duration::from_secs(2),
            2,
            3,
            (200, 399)
        )
    );
    assert!(
        parse(Path::new("/etc/tollgate/t.toml"), OK).unwrap().pools["web"]
            .check
            .is_none()
    );
    let tcp = parse(Path::new("/etc/tollgate/t.toml"), &with("tcp = true")).unwrap();
    assert_eq!(
        tcp.pools["web"].check.as_ref().unwrap().kind,
        CheckKind::Tcp
    );
    for (hc, words) in [
        ("tcp = true, path = \"/h\"", "set one of path"),
        ("grpc = true, path = \"/h\"", "set one of path"),
        ("interval = \"1s\"", "or set tcp = true"),
        ("grpc = true", "need an HTTP/2 pool"),
    ] {
        assert!(
            errs(&with(hc)).iter().any(|e| e.message.contains(words)),
            "{hc}"
        );
    }
    let e = errs(&with(
        "path = \"healthz\", interval = \"1s\", timeout = \"2s\", healthy = 0, status = \"500-200\"",
    ));
    for (opt, words) in [
        ("pool.web.health_check.path", "not a request path"),
        (
            "pool.web.health_check.timeout",
            "must not be longer than the interval",
        ),
        ("pool.web.health_check.healthy", ""),
        ("pool.web.health_check.status", "not a status range"),
    ] {
        assert!(
            e.iter()
                .any(|e| e.option == opt && e.message.contains(words)),
            "{opt}: {words} in {e:#?}"
        );
    }
}

#[test]
fn backend_protocols_and_tls_are_validated() {
    let with = |opts: &str| OK.replace("weight = 3 }]", &format!("weight = 3 }}]\n{opts}"));
    let path = Path::new("/etc/tollgate/t.toml");
    let web = |opts: &str| parse(path, &with(opts)).unwrap().pools["web"].clone();
    // the default: HTTP/1.1 in the clear, no TLS
    let p = web("");
    assert_eq!(
        (p.protocol, p.tls.is_none(), p.max_connections),
        (Protocol::Http1, true, 0)
    );
    // a TLS protocol without `tls`: verified against the system roots
    let p = web("protocol = \"https\"");
    let t = p.tls.unwrap();
    assert_eq!(
        (t.ca.is_none(), t.verify, t.client_cert.is_none()),
        (true, true, true)
    );
    let p = web(
        "protocol = \"h2\"\nmax_streams = 50\nmax_connections = 2\n\
         tls = { ca = \"ca.pem\", server_name = \"API.internal\", client_cert = \"c.pem\", client_key = \"/k/c.key\" }\n\
         health_check = { grpc = \"pkg.Svc\" }",
    );
    let t = p.tls.unwrap();
    assert_eq!(t.ca.as_deref(), Some(Path::new("/etc/tollgate/ca.pem")));
    assert_eq!(t.server_name.as_deref(), Some("api.internal"));
    assert_eq!(
        t.client_cert,
        Some(("/etc/tollgate/c.pem".into(), "/k/c.key".into()))
    );
    assert_eq!((p.max_streams, p.max_connections), (50, 2));
    assert_eq!(
        p.check.unwrap().kind,
        CheckKind::Grpc("pkg.Svc".to_string())
    );
    assert_eq!(web("protocol = \"h2c\"").max_streams, 100);
    assert!(
        !web("protocol = \"https\"\ntls = { verify = false }")
            .tls
            .unwrap()
            .verify
    );
    for (opts, opt, words) in [
        (
            "protocol = \"http3\"",
            "pool.web.protocol",
            "not a backend protocol",
        ),
        (
            "tls = { ca = \"ca.pem\" }",
            "pool.web.tls",
            "does not use TLS",
        ),
        (
            "protocol = \"h2c\"\ntls = { verify = false }",
            "pool.web.tls",
            "does not use TLS",
        ),
        ("max_streams = 10", "pool.web.max_streams", "HTTP/2 setting"),
        (
            "protocol = \"h2\"\nmax_streams = 0",
            "pool.web.max_streams",
            "",
        ),
        (
            "protocol = \"https\"\ntls = { client_cert = \"c.pem\" }",
            "pool.web.tls.client_key",
            "set both",
        ),
        (
            "protocol = \"https\"\ntls = { server_name = \"bad name!\" }",
            "pool.web.tls.server_name",
            "not a DNS name",
        ),
        (
            "protocol = \"https\"\ntls = { cert = \"x\" }",
            "",
            "unknown field",
        ),
    ] {
        assert!(
            errs(&with(opts))
                .iter()
                .any(|e| e.option.starts_with(opt) && e.message.contains(words)),
            "{opts}: {:#?}",
            errs(&with(opts))
        );
    }
}

#[test]
fn acme_settings_and_vhosts_are_validated() {
    let path = Path::new("/etc/tollgate/t.toml");
    let base = "[[listener]]\naddress = \"0.0.0.0:80\"\n\
                [[listener]]\naddress = \"0.0.0.0:443\"\ntls = true\n\
                [[vhost]]\nnames = [\"a.test\"]\nacme = true\n[[vhost.route]]\npath = \"/\"\npool = \"p\"\n\
                [pool.p]\nbackends = [\"127.0.0.1:1\"]\n";
    let ok =
        format!("[acme]\ndirectory = \"https://ca.test/dir\"\nemail = \"ops@example.org\"\n{base}");
    let c = parse(path, &ok).unwrap();
    let a = c.acme.unwrap();
    assert_eq!(a.storage, Path::new("/etc/tollgate/acme"));
    assert_eq!(a.certs_dir(), Path::new("/etc/tollgate/acme/certs"));
    assert!(c.vhosts[0].acme);
    assert_eq!(a.challenge, AcmeChallenge::Http01);
    let alpn = ok.replace("email = ", "challenge = \"tls-alpn-01\"\nemail = ");
    let tls_only = |t: &str| t.replace("[[listener]]\naddress = \"0.0.0.0:80\"\n", "");
    let c = parse(path, &tls_only(&alpn)).unwrap();
    assert_eq!(c.acme.unwrap().challenge, AcmeChallenge::TlsAlpn01);
    for (text, opt, words) in [
        (base.to_string(), "vhost[0].acme", "needs an [acme] section"),
        (
            ok.replace("https://ca.test/dir", "http://ca.test/dir"),
            "acme.directory",
            "not an https://",
        ),
        (
            ok.replace("ops@example.org", "not an email"),
            "acme.email",
            "not an email address",
        ),
        (
            ok.replace("a.test\"]\nacme", "*.a.test\"]\nacme"),
            "vhost[0].acme",
            "cannot prove a wildcard",
        ),
        (
            ok.replace(
                "acme = true",
                "acme = true\ncert = \"a.crt\"\nkey = \"a.key\"",
            ),
            "vhost[0].acme",
            "not both",
        ),
        (
            ok.replace("email = ", "challenge = \"dns-01\"\nemail = "),
            "acme.challenge",
            "use http-01 (a plain listener on port 80) or tls-alpn-01",
        ),
        (
            tls_only(&ok),
            "acme.challenge",
            "http-01 is answered on a plain (port 80) listener and there is none",
        ),
        (
            alpn.replace("tls = true\n", ""),
            "acme.challenge",
            "tls-alpn-01 is answered on a TLS (port 443) listener",
        ),
    ] {
        let e = errs(&text);
        assert!(
            e.iter()
                .any(|e| e.option == opt && e.message.contains(words)),
            "{opt}: {words} in {e:#?}"
        );
    }
}

#[test]
fn file_routes_take_the_tag_route_options() {
    let src = OK.replace(
        "path = \"/\"\npool = \"web\"\n",
        "path = \"/\"\npool = \"web\"\n\
         [[vhost.route]]\npath = \"/cart\"\npool = \"web\"\nstrip = \"/cart/\"\nprepend = \"/v2\"\nhost = \"API.internal:8080\"\nallow = [\"10.0.0.0/8\", \"192.0.2.1\"]\n\
         [[vhost.route]]\npath = \"/old\"\nredirect = { to = \"https://$host/new$path\", status = 308 }\n\
         [[vhost.route]]\npath = \"/gone\"\nredirect = { to = \"/\" }\n",
    );
    let c = parse(Path::new("/etc/tollgate/t.toml"), &src).unwrap();
    let r = &c.vhosts[0].routes;
    assert_eq!(
        r[1].options,
        RouteOptions {
            strip: Some("/cart".into()),
            prepend: Some("/v2".into()),
            host: Some("api.internal:8080".into()),
            allow: vec!["10.0.0.0/8".into(), "192.0.2.1".into()],
            ..RouteOptions::default()
        }
    );
    assert_eq!(
        r[2].options.redirect,
        Some((308, "https://$host/new$path".into()))
    );
    assert_eq!(r[2].pool, "", "a redirect route has no pool");
    assert_eq!(
        r[3].options.redirect,
        Some((301, "/".into())),
        "301 by default"
    );
}

#[test]
fn route_option_contradictions_are_errors_with_their_lines() {
    let route = |body: &str| {
        OK.replace(
            "path = \"/\"\npool = \"web\"\n",
            &format!("path = \"/\"\npool = \"web\"\n[[vhost.route]]\npath = \"/x\"\n{body}"),
        )
    };
    let one = |body: &str, option: &str, says: &str| {
        let e = errs(&route(body));
        let hit = e
            .iter()
            .find(|e| e.option == option)
            .unwrap_or_else(|| panic!("{option} in {e:?}"));
        assert!(hit.message.contains(says), "{option}: {}", hit.message);
        // the line of the key that is wrong (a missing pool: the route's path)
        let key = option.rsplit('.').next().unwrap();
        let key = if says == "missing" { "path" } else { key };
        let text = route(body);
        let lines: Vec<&str> = text.lines().collect();
        let line = lines
            .iter()
            .rposition(|l| l.starts_with(&format!("{key} =")))
            .unwrap()
            + 1;
        assert_eq!(hit.origin.line, line, "{option}");
    };
    one(
        "pool = \"web\"\nredirect = { to = \"https://a.test/\" }",
        "vhost[0].route[1].pool",
        "answers itself",
    );
    one(
        "redirect = { to = \"https://a.test/\" }\nstrip = \"/x\"",
        "vhost[0].route[1].strip",
        "sends nothing upstream",
    );
    one(
        "redirect = { to = \"https://a.test/\" }\nplugins = [\"p\"]",
        "vhost[0].route[1].plugins",
        "sends nothing upstream",
    );
    one("strip = \"/x\"", "vhost[0].route[1].pool", "missing");
    one(
        "pool = \"web\"\nstrip = \"x/\"",
        "vhost[0].route[1].strip",
        "path prefix",
    );
    one(
        "pool = \"web\"\nhost = \"a b\"",
        "vhost[0].route[1].host",
        "host name",
    );
    one(
        "redirect = { to = \"//evil.test/\" }",
        "vhost[0].route[1].redirect",
        "a URL",
    );
    one(
        "redirect = { to = \"https://a.test/\", status = 200 }",
        "vhost[0].route[1].redirect",
        "not a redirect status",
    );
    one(
        "pool = \"web\"\nallow = [\"10.0.0.0/8\"]\ndeny = [\"10.1.0.0/16\"]",
        "vhost[0].route[1].deny",
        "cannot be used together",
    );
    one(
        "pool = \"web\"\nallow = []",
        "vhost[0].route[1].allow",
        "name networks",
    );
}

#[test]
fn hsts_server_header_and_header_rules_are_validated() {
    let vhost = |body: &str| OK.replace("[[vhost.route]]", &format!("{body}\n[[vhost.route]]"));
    let c = parse(
        Path::new("/etc/tollgate/t.toml"),
        &vhost(
            "hsts = { max_age = \"730d\", include_subdomains = true, preload = true }\n\
             server_header = { replace = \"edge\" }\n\
             response_headers = { set = { \"X-Frame-Options\" = \"DENY\" }, remove = [\"X-Powered-By\"] }\n\
             request_headers = { add = { \"X-Via\" = \"$scheme://$host\" } }",
        ),
    )
    .unwrap();
    let v = &c.vhosts[0];
    assert_eq!(
        v.headers.hsts.as_ref().unwrap().value(),
        "max-age=63072000; includeSubDomains; preload"
    );
    assert_eq!(v.headers.server, ServerHeader::Replace("edge".into()));
    // set and added names kept as written (their HTTP/1 spelling); removals lower case
    assert_eq!(
        v.response_headers.set,
        [("X-Frame-Options".to_string(), "DENY".to_string())]
    );
    assert_eq!(v.response_headers.remove, ["x-powered-by"]);
    assert_eq!(
        v.request_headers.add,
        [("X-Via".to_string(), "$scheme://$host".to_string())]
    );
    let c = parse(Path::new("/etc/tollgate/t.toml"), &vhost("hsts = true")).unwrap();
    assert_eq!(
        c.vhosts[0].headers.hsts.as_ref().unwrap().value(),
        "max-age=31536000"
    );

    for (body, option, says) in [
        (
            "hsts = { max_age = \"30d\", preload = true }",
            "vhost[0].hsts.preload",
            "preload lists",
        ),
        (
            "hsts = { max_age = \"1000d\" }",
            "vhost[0].hsts.max_age",
            "730d",
        ),
        (
            "server_header = \"hide\"",
            "vhost[0].server_header",
            "\"drop\"",
        ),
        (
            "server_header = { replace = \"a\\u0001b\" }",
            "vhost[0].server_header.replace",
            "printable",
        ),
        (
            "response_headers = { set = { \"Transfer-Encoding\" = \"chunked\" } }",
            "vhost[0].response_headers.set",
            "framing",
        ),
        (
            "request_headers = { remove = [\"Connection\"] }",
            "vhost[0].request_headers.remove",
            "framing",
        ),
        (
            "request_headers = { set = { \"Host\" = \"x\" } }",
            "vhost[0].request_headers.set",
            "`host` option",
        ),
        (
            "request_headers = { set = { \"X-A\" = \"$path\" } }",
            "vhost[0].request_headers.set.X-A",
            "not a variable",
        ),
        (
            "response_headers = { set = { \"X A\" = \"1\" } }",
            "vhost[0].response_headers.set",
            "not a header name",
        ),
        (
            "response_headers = { set = { \"X-A\" = \"1\" }, remove = [\"x-a\"] }",
            "vhost[0].response_headers.remove",
            "both set and removed",
        ),
    ] {
        let src = vhost(body);
        let e = errs(&src);
        let hit = e
            .iter()
            .find(|e| e.option == option)
            .unwrap_or_else(|| panic!("{option} in {e:?}"));
        assert!(hit.message.contains(says), "{option}: {}", hit.message);
        let key = body.split(' ').next().unwrap();
        let line = src.lines().position(|l| l.starts_with(key)).unwrap() + 1;
        assert_eq!(hit.origin.line, line, "{option}");
    }
    // a redirect route sends no request: request rules on it are a contradiction
    let e = errs(&OK.replace(
        "path = \"/\"\npool = \"web\"\n",
        "path = \"/\"\npool = \"web\"\n[[vhost.route]]\npath = \"/r\"\nredirect = { to = \"/\" }\n\
         request_headers = { set = { \"X-A\" = \"1\" } }\n",
    ));
    assert!(
        e.iter()
            .any(|e| e.option == "vhost[0].route[1].request_headers"
                && e.message.contains("sends nothing upstream")),
        "{e:?}"
    );
}

#[test]
fn respond_routes_and_error_pages_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("404.html"), "<h1>not here</h1>").unwrap();
    let src = OK.replace(
        "path = \"/\"\npool = \"web\"\n",
        "path = \"/\"\npool = \"web\"\n[[vhost.route]]\npath = \"/robots.txt\"\n\
         respond = { body = \"User-agent: *\\nDisallow: /\\n\" }\n\
         [[vhost.route]]\npath = \"/maintenance\"\n\
         respond = { status = 503, body = \"<p>back soon</p>\", content_type = \"text/html\" }\n",
    );
    let src = src.replace(
        "[[vhost.route]]\npath = \"/\"",
        "error_pages = { \"404\" = \"404.html\" }\n[[vhost.route]]\npath = \"/\"",
    );
    let path = dir.path().join("t.toml");
    let c = parse(&path, &src).unwrap();
    let v = &c.vhosts[0];
    let robots = v.routes[1].respond.as_ref().unwrap();
    assert_eq!(
        (robots.status, robots.content_type.as_str()),
        (200, "text/plain; charset=utf-8")
    );
    assert_eq!(&robots.body[..], b"User-agent: *\nDisallow: /\n");
    assert_eq!(v.routes[2].respond.as_ref().unwrap().status, 503);
    assert_eq!(v.routes[2].pool, "");
    let page = &v.error_pages[&404];
    assert_eq!(page.content_type, "text/html; charset=utf-8");
    assert_eq!(&page.body[..], b"<h1>not here</h1>");

    let route = |body: &str| {
        OK.replace(
            "path = \"/\"\npool = \"web\"\n",
            &format!("path = \"/\"\npool = \"web\"\n[[vhost.route]]\npath = \"/x\"\n{body}\n"),
        )
    };
    for (body, option, says) in [
        (
            "pool = \"web\"\nrespond = { body = \"x\" }",
            "vhost[0].route[1].pool",
            "answers itself",
        ),
        (
            "respond = { body = \"x\" }\nredirect = { to = \"/\" }",
            "vhost[0].route[1].respond",
            "not both",
        ),
        (
            "respond = { status = 204, body = \"x\" }",
            "vhost[0].route[1].respond",
            "no body",
        ),
        (
            "respond = { status = 99 }",
            "vhost[0].route[1].respond",
            "from 200 to 599",
        ),
        (
            "respond = { body = \"x\" }\nstrip = \"/x\"",
            "vhost[0].route[1].strip",
            "sends nothing upstream",
        ),
    ] {
        let e = errs(&route(body));
        assert!(
            e.iter()
                .any(|e| e.option == option && e.message.contains(says)),
            "{option} {says}: {e:?}"
        );
    }
    let big = format!("respond = {{ body = \"{}\" }}", "x".repeat(70_000));
    assert!(errs(&route(&big))
        .iter()
        .any(|e| e.message.contains("64 KiB")));

    // error pages: the status must be 4xx/5xx, the file readable, said with its line
    for (pages, option, says) in [
        (
            "{ \"404\" = \"missing.html\" }",
            "vhost[0].error_pages.404",
            "cannot read",
        ),
        (
            "{ \"200\" = \"404.html\" }",
            "vhost[0].error_pages.200",
            "4xx or 5xx",
        ),
    ] {
        let src = OK.replace(
            "[[vhost.route]]\npath = \"/\"",
            &format!("error_pages = {pages}\n[[vhost.route]]\npath = \"/\""),
        );
        let e = parse(&path, &src).unwrap_err().0;
        let hit = e
            .iter()
            .find(|e| e.option == option)
            .unwrap_or_else(|| panic!("{option}: {e:?}"));
        assert!(hit.message.contains(says), "{}", hit.message);
        let line = src
            .lines()
            .position(|l| l.starts_with("error_pages"))
            .unwrap()
            + 1;
        assert_eq!(hit.origin.line, line);
    }
}

#[test]
fn route_matchers_are_validated_and_tell_routes_of_one_prefix_apart() {
    let routes = |extra: &str| {
        OK.replace(
            "path = \"/\"\npool = \"web\"\n",
            &format!("path = \"/\"\npool = \"web\"\n{extra}"),
        )
    };
    let c = parse(
        Path::new("/etc/tollgate/t.toml"),
        &routes(
            "[[vhost.route]]\npath = \"/\"\npool = \"web\"\n\
             match = { methods = [\"post\", \"PUT\"], headers = [{ name = \"X-Canary\", equals = \"1\" }, { name = \"authorization\", present = true }], query = [{ name = \"v\", regex = \"^2$\" }] }\n",
        ),
    )
    .unwrap();
    let m = &c.vhosts[0].routes[1].matches;
    assert_eq!(m.methods, ["POST", "PUT"]);
    assert_eq!(m.headers[0].name, "x-canary");
    assert_eq!(m.headers[0].equals.as_deref(), Some("1"));
    assert_eq!(
        (m.headers[1].equals.as_ref(), m.headers[1].regex.as_ref()),
        (None, None)
    );
    assert_eq!(m.query[0].regex.as_deref(), Some("^2$"));

    for (extra, option, says) in [
        (
            "[[vhost.route]]\npath = \"/\"\npool = \"web\"\n",
            "vhost[0].route[1].path",
            "already routed on line 8",
        ),
        (
            "[[vhost.route]]\npath = \"/x\"\npool = \"web\"\nmatch = { methods = [\"G T\"] }\n",
            "vhost[0].route[1].match.methods",
            "not a method",
        ),
        (
            "[[vhost.route]]\npath = \"/x\"\npool = \"web\"\nmatch = { headers = [{ name = \"x a\", present = true }] }\n",
            "vhost[0].route[1].match.headers[0].name",
            "not a header name",
        ),
        (
            "[[vhost.route]]\npath = \"/x\"\npool = \"web\"\nmatch = { headers = [{ name = \"x\", equals = \"1\", regex = \"1\" }] }\n",
            "vhost[0].route[1].match.headers[0]",
            "exactly one of",
        ),
        (
            "[[vhost.route]]\npath = \"/x\"\npool = \"web\"\nmatch = { query = [{ name = \"v\", regex = \"(\" }] }\n",
            "vhost[0].route[1].match.query[0].regex",
            "not a regex",
        ),
        (
            "[[vhost.route]]\npath = \"/x\"\npool = \"web\"\nmatch = { query = [{ name = \"a=b\", present = true }] }\n",
            "vhost[0].route[1].match.query[0].name",
            "not a query parameter name",
        ),
    ] {
        let src = routes(extra);
        let e = errs(&src);
        let hit = e
            .iter()
            .find(|e| e.option == option)
            .unwrap_or_else(|| panic!("{option}: {e:?}"));
        assert!(hit.message.contains(says), "{option}: {}", hit.message);
    }
    // a regex too big to compile within the cap is refused, not built
    let big = format!("a{{1000}}{}", "b{1000}".repeat(20));
    assert!(crate::config::match_regex(&big).is_err());
}

#[test]
fn session_ticket_keys_are_read_and_checked_with_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.key");
    std::fs::write(&good, [7u8; 80]).unwrap();
    let short = dir.path().join("short.key");
    std::fs::write(&short, b"a password\n").unwrap();
    let with = |tls: &str| format!("[tls]\n{tls}\n{OK}");
    let c = parse(
        &dir.path().join("t.toml"),
        &with("session_ticket_keys = [\"good.key\"]\nsession_ticket_lifetime = \"12h\""),
    )
    .unwrap();
    assert_eq!(c.session_ticket_keys, [good]);
    assert_eq!(c.session_ticket_lifetime, Duration::from_secs(12 * 3600));
    assert!(c.session_tickets);
    for (tls, option, says) in [
        (
            "session_ticket_keys = [\"good.key\", \"missing.key\"]",
            "tls.session_ticket_keys[1]",
            "cannot read",
        ),
        (
            "session_ticket_keys = [\"short.key\"]",
            "tls.session_ticket_keys[0]",
            "holds 11 bytes",
        ),
        (
            "session_tickets = false\nsession_ticket_keys = [\"good.key\"]",
            "tls.session_ticket_keys",
            "issues no tickets",
        ),
        (
            "session_ticket_lifetime = \"30d\"",
            "tls.session_ticket_lifetime",
            "",
        ),
    ] {
        let e = parse(&dir.path().join("t.toml"), &with(tls)).unwrap_err().0;
        let hit = e
            .iter()
            .find(|e| e.option == option)
            .unwrap_or_else(|| panic!("{option}: {e:?}"));
        assert!(hit.message.contains(says), "{}", hit.message);
        let key = option.trim_start_matches("tls.").split('[').next().unwrap();
        let line = with(tls).lines().position(|l| l.starts_with(key)).unwrap() + 1;
        assert_eq!(hit.origin.line, line, "{option}");
    }
}

#[test]
fn ticket_keys_in_consul_need_a_readable_encryption_key_and_no_other_source() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("fleet.secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::write(dir.path().join("short.secret"), "abc\n").unwrap();
    std::fs::write(dir.path().join("good.key"), [7u8; 80]).unwrap();
    let t = dir.path().join("t.toml");
    let with = |tls: &str| format!("[tls]\n{tls}\n{OK}");
    let c = parse(
        &t,
        &with("session_ticket_consul = true\nencryption_key_file = \"fleet.secret\""),
    )
    .unwrap();
    assert_eq!(
        c.session_ticket_consul,
        Some(("tollgate/tickets".to_string(), secret.clone()))
    );
    // [acme]'s key when tls has none; the prefix trimmed
    let c = parse(
        &t,
        &format!(
            "[tls]\nsession_ticket_consul = true\nsession_ticket_consul_prefix = \"/fleet/tickets/\"\n\
             [acme]\ndirectory = \"https://ca.test/dir\"\nconsul = true\nencryption_key_file = \"fleet.secret\"\n{OK}"
        ),
    )
    .unwrap();
    assert_eq!(
        c.session_ticket_consul,
        Some(("fleet/tickets".to_string(), secret))
    );
    assert_eq!(
        parse(&t, &with("session_ticket_consul = false"))
            .unwrap()
            .session_ticket_consul,
        None
    );
    for (tls, option, says) in [
        ("session_ticket_consul = true", "tls.encryption_key_file", "openssl rand"),
        (
            "session_ticket_consul = true\nencryption_key_file = \"short.secret\"",
            "tls.encryption_key_file",
            "too short",
        ),
        (
            "session_ticket_consul = true\nencryption_key_file = \"missing.secret\"",
            "tls.encryption_key_file",
            "cannot read",
        ),
        (
            "session_ticket_consul = true\nencryption_key_file = \"fleet.secret\"\nsession_ticket_keys = [\"good.key\"]",
            "tls.session_ticket_consul",
            "choose one",
        ),
        (
            "session_ticket_consul = true\nencryption_key_file = \"fleet.secret\"\nsession_tickets = false",
            "tls.session_ticket_consul",
            "choose one",
        ),
        (
            "session_ticket_consul = true\nencryption_key_file = \"fleet.secret\"\nsession_ticket_consul_prefix = \"a/../b\"",
            "tls.session_ticket_consul_prefix",
            "not a KV prefix",
        ),
        (
            "encryption_key_file = \"fleet.secret\"",
            "tls.encryption_key_file",
            "only applies with session_ticket_consul",
        ),
    ] {
        let e = parse(&t, &with(tls)).unwrap_err().0;
        let hit = e
            .iter()
            .find(|e| e.option == option)
            .unwrap_or_else(|| panic!("{option}: {e:?}"));
        assert!(hit.message.contains(says), "{tls}: {}", hit.message);
        let key = option.trim_start_matches("tls.");
        let line = with(tls).lines().position(|l| l.starts_with(key)).unwrap_or(1) + 1;
        assert_eq!(hit.origin.line, line, "{tls}");
    }
}
