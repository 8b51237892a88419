use super::*;
use crate::config::Protocol;
use crate::discovery::DiscoveredRoute;
use crate::routing::Lookup;

fn config(extra: &str) -> Config {
    Config::parse(
        std::path::Path::new("t.toml"),
        &format!(
            "[consul]\ntag_routes = true\n[[listener]]\naddress = \"127.0.0.1:1\"\n{extra}\n\
             [[vhost]]\nnames = [\"a.test\"]\nconsul_routes = true\n\
             [[vhost.route]]\npath = \"/\"\npool = \"p\"\n\
             [pool.p]\nbackends = [\"127.0.0.1:2\"]\n"
        ),
    )
    .unwrap()
}

fn declared(host: &str, path: &str, service: &str) -> DiscoveredRoute {
    DiscoveredRoute {
        host: host.into(),
        path: path.into(),
        service: service.into(),
        tag: format!("tollgate.route={host}{path}"),
        index: 7,
        service_tags: Vec::new(),
        options: Default::default(),
        refused: None,
    }
}

fn view(routes: Vec<DiscoveredRoute>) -> View {
    View {
        routes,
        ..View::default()
    }
}

#[test]
fn every_route_has_one_record_that_the_route_table_finds() {
    let cfg = Config::parse(
        std::path::Path::new("t.toml"),
        "[consul]\ntag_routes = true\n[[listener]]\naddress = \"127.0.0.1:1\"\n             [[vhost]]\nnames = [\"a.test\"]\n             [[vhost.route]]\npath = \"/\"\npool = \"p\"\n             [[vhost.route]]\npath = \"/up\"\npool = \"q\"\nmax_body_size = \"1k\"\n             [[vhost]]\nnames = [\"b.test\"]\nconsul_routes = true\n             [[vhost.route]]\npath = \"/\"\npool = \"q\"\n             [pool.p]\nbackends = [\"127.0.0.1:2\"]\n[pool.q]\nbackends = [\"127.0.0.1:3\"]\n",
    )
    .unwrap();
    let snap = Snapshot::build(
        Arc::new(cfg),
        &Lasting::new(),
        1,
        &view(vec![declared("b.test", "/api", "api")]),
    )
    .unwrap();
    assert_eq!(snap.records.len(), 4);
    for (host, path, vhost, prefix, pool, cap, source) in [
        ("a.test", "/x", 0, "/", "p", None, "file t.toml:"),
        (
            "a.test",
            "/up/load",
            0,
            "/up",
            "q",
            Some(1024),
            "file t.toml:",
        ),
        ("b.test", "/", 1, "/", "q", None, "file t.toml:"),
        (
            "b.test",
            "/api/v1",
            1,
            "/api",
            "consul:api",
            None,
            "consul tag",
        ),
    ] {
        let Lookup::Route { target, .. } = snap.routes.lookup(host, path) else {
            panic!("{host}{path} is not routed");
        };
        let r = &snap.records[target];
        assert_eq!(r.vhost, vhost, "{host}{path}");
        assert_eq!(r.declared.path, prefix, "{host}{path}");
        assert_eq!(snap.pools[r.pool.unwrap()].name, pool, "{host}{path}");
        assert_eq!(r.declared.max_body_size, cap, "{host}{path}");
        assert!(
            r.declared.source.starts_with(source),
            "{host}{path}: {}",
            r.declared.source
        );
        assert!(r.plugins.is_empty());
        // the metrics handle is the route's, by its vhost label and prefix
        let before = r.metrics.duration.count();
        snap.request_metrics(Some(vhost), Some(target))
            .record(200, std::time::Duration::ZERO);
        assert_eq!(r.metrics.duration.count(), before + 1);
    }
}

#[test]
fn the_file_wins_a_conflict_and_the_conflict_is_reported() {
    let m = merge_routes(
        &config(""),
        &view(vec![declared("a.test", "/", "rogue")]),
        |_| true,
    );
    assert_eq!(m.vhosts.len(), 1);
    let routes = &m.vhosts[0].routes;
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].pool, "p", "the file's route is kept");
    assert!(
        routes[0].source.starts_with("file t.toml:"),
        "{}",
        routes[0].source
    );
    assert_eq!(m.route_conflicts.len(), 1, "{:?}", m.route_conflicts);
    assert!(
        m.route_conflicts[0].contains("service rogue")
            && m.route_conflicts[0].contains("a.test/ is already routed by file t.toml:"),
        "{:?}",
        m.route_conflicts
    );
    assert!(!m.pool_specs.contains_key("consul:rogue"));
}

#[test]
fn declared_routes_join_a_file_vhost_or_make_their_own() {
    let m = merge_routes(
        &config(""),
        &view(vec![
            declared("a.test", "/api", "api"),
            declared("b.test", "/", "web"),
        ]),
        |_| true,
    );
    assert!(m.route_conflicts.is_empty(), "{:?}", m.route_conflicts);
    let a = &m.vhosts[0];
    assert_eq!(a.routes.len(), 2);
    let api = a.routes.iter().find(|r| r.path == "/api").unwrap();
    assert_eq!(api.pool, "consul:api");
    assert!(
        api.source.contains("service api at index 7"),
        "{}",
        api.source
    );
    let b = &m.vhosts[1];
    assert_eq!(
        (b.label.as_str(), b.names.clone()),
        ("b.test", vec!["b.test".to_string()])
    );
    assert!(b.redirect_https && !b.default);
    assert_eq!(b.routes[0].pool, "consul:web");
    for (pool, service) in [("consul:api", "api"), ("consul:web", "web")] {
        let key = m.pool_specs[pool].consul.as_ref().expect("a Consul pool");
        assert_eq!(key.service, service);
        assert!(key.passing && key.tags.is_empty() && key.datacenter.is_none());
    }
    assert!(m.pool_specs.contains_key("p"), "the file's pools stay");
}

#[test]
fn any_host_routes_need_a_default_vhost() {
    let any = view(vec![declared("", "/x", "svc")]);
    let m = merge_routes(&config(""), &any, |_| true);
    assert_eq!(m.vhosts[0].routes.len(), 1);
    assert!(
        m.route_conflicts[0].contains("routes any host/x but there is no default vhost"),
        "{:?}",
        m.route_conflicts
    );
    let with_default = Config::parse(
        std::path::Path::new("t.toml"),
        "[consul]\ntag_routes = true\n[[listener]]\naddress = \"127.0.0.1:1\"\n[[vhost]]\ndefault = true\nconsul_routes = true\n\
         [[vhost.route]]\npath = \"/\"\npool = \"p\"\n[pool.p]\nbackends = [\"127.0.0.1:2\"]\n",
    )
    .unwrap();
    let m = merge_routes(&with_default, &any, |_| true);
    assert!(m.route_conflicts.is_empty(), "{:?}", m.route_conflicts);
    assert_eq!(m.vhosts[0].routes.len(), 2);
    assert_eq!(m.vhosts[0].routes[1].pool, "consul:svc");
}

#[test]
fn a_declared_host_without_a_certificate_is_reported_when_tls_is_on() {
    let routes = view(vec![declared("c.test", "/", "web")]);
    // plain listeners only: nothing to warn about
    let m = merge_routes(&config(""), &routes, |_| false);
    assert!(m.route_conflicts.is_empty(), "{:?}", m.route_conflicts);
    let tls = config("tls = true\n[tls]\ncerts_dir = \"/nonexistent\"\n");
    let m = merge_routes(&tls, &routes, |h| h != "c.test");
    assert_eq!(m.vhosts.len(), 2, "the route is still served");
    assert!(
        m.route_conflicts[0].contains("no certificate covers c.test"),
        "{:?}",
        m.route_conflicts
    );
    let m = merge_routes(&tls, &routes, |_| true);
    assert!(m.route_conflicts.is_empty(), "{:?}", m.route_conflicts);
}

fn parse(text: &str) -> Config {
    Config::parse(std::path::Path::new("t.toml"), text).unwrap()
}

#[test]
fn claims_under_a_file_vhost_need_its_consent() {
    // a.test does not take Consul routes: a rogue service cannot take /admin from its `/`
    let cfg = parse(
        "[consul]\ntag_routes = true\n[[listener]]\naddress = \"127.0.0.1:1\"\n\
         [[vhost]]\nnames = [\"a.test\"]\n[[vhost.route]]\npath = \"/\"\npool = \"p\"\n\
         [pool.p]\nbackends = [\"127.0.0.1:2\"]\n",
    );
    let m = merge_routes(
        &cfg,
        &view(vec![
            declared("a.test", "/admin", "rogue"),
            declared("new.test", "/", "web"),
        ]),
        |_| true,
    );
    assert_eq!(
        m.vhosts[0].routes.len(),
        1,
        "a.test keeps the file's route only"
    );
    assert!(!m.pool_specs.contains_key("consul:rogue"));
    assert_eq!(m.route_conflicts.len(), 1, "{:?}", m.route_conflicts);
    assert!(
        m.route_conflicts[0].contains("service rogue")
            && m.route_conflicts[0].contains(
                "a.test/admin refused: vhost a.test (t.toml:5) does not take Consul routes"
            ),
        "{:?}",
        m.route_conflicts
    );
    // a host no file vhost serves is open without rules, and says so
    assert_eq!(m.vhosts[1].label, "new.test");
    assert_eq!(
        m.vhosts[1].routes[0].allowed_by.as_deref(),
        Some("a host no file vhost serves (no consul.allow rules)")
    );
}

#[test]
fn a_host_under_a_wildcard_vhost_keeps_its_routes_and_its_consent() {
    let cfg = parse(
        "[consul]\ntag_routes = true\n[[listener]]\naddress = \"127.0.0.1:1\"\n\
         [plugin.auth]\nfile = \"/nonexistent.wasm\"\n\
         [[vhost]]\nnames = [\"*.apps.test\"]\nplugins = [\"auth\"]\nconsul_routes = [\"web-*\"]\n\
         [[vhost.route]]\npath = \"/\"\npool = \"p\"\n\
         [pool.p]\nbackends = [\"127.0.0.1:2\"]\n",
    );
    let m = merge_routes(
        &cfg,
        &view(vec![
            declared("shop.apps.test", "/cart", "web-shop"),
            declared("shop.apps.test", "/admin", "rogue"),
            declared("pay.apps.test", "/", "rogue"),
        ]),
        |_| true,
    );
    assert_eq!(m.vhosts.len(), 2, "{:?}", m.route_conflicts);
    let shop = &m.vhosts[1];
    assert_eq!(shop.names, vec!["shop.apps.test".to_string()]);
    assert_eq!(
        shop.plugins,
        vec!["auth".to_string()],
        "the vhost's plugins still run"
    );
    let paths: Vec<&str> = shop.routes.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        ["/", "/cart"],
        "the wildcard vhost's routes still serve the host"
    );
    assert_eq!(m.route_conflicts.len(), 2, "{:?}", m.route_conflicts);
    for c in &m.route_conflicts {
        assert!(
            c.contains("service rogue is not in the consul_routes of vhost *.apps.test"),
            "{c}"
        );
    }
}

/// A Consul-declared protocol makes the service's pool speak it (TLS: `consul.backend_tls`,
/// verified, against the service's name); routes of one service that ask for two protocols
/// keep the first and report the other.
#[test]
fn a_declared_protocol_shapes_the_services_pool() {
    let with = |r: &str, p: Option<Protocol>| {
        let mut d = declared("a.test", r, "api");
        d.options.protocol = p;
        d
    };
    let cfg = config("[consul.backend_tls]\nca = \"/etc/ca.pem\"\n");
    let m = merge_routes(
        &cfg,
        &view(vec![
            with("/a", Some(Protocol::H2)),
            with("/b", Some(Protocol::H2)),
            with("/c", None),
        ]),
        |_| true,
    );
    let spec = &m.pool_specs["consul:api"];
    assert_eq!(spec.protocol, Protocol::H2);
    let tls = spec.tls.as_ref().unwrap();
    assert_eq!(
        (tls.ca.as_deref(), tls.server_name.as_deref(), tls.verify),
        (Some(std::path::Path::new("/etc/ca.pem")), None, true)
    );
    assert_eq!(m.vhosts[0].routes.len(), 3, "/, /a and /b");
    assert_eq!(m.route_conflicts.len(), 1, "{:?}", m.route_conflicts);
    assert!(
        m.route_conflicts[0].contains("asks for protocol http1 but another route of api set h2")
    );
    // h2c: no TLS
    let m = merge_routes(&cfg, &view(vec![with("/a", Some(Protocol::H2c))]), |_| true);
    assert!(m.pool_specs["consul:api"].tls.is_none());
}

/// Declared service ports: opened only within `consul.ports`, never on a socket the file
/// uses; `sni` ports gather every service's names; one service per other socket.
#[test]
fn declared_ports_are_judged_and_merged() {
    let port = |service: &str, proto: crate::config::PortProtocol, n: u16, host: &str| {
        let mut d = declared(host, "", service);
        d.tag = format!("tollgate.port={}/{n}", proto.name());
        d.options.port = Some((proto, n));
        d
    };
    use crate::config::PortProtocol::*;
    let cfg = Config::parse(
        std::path::Path::new("t.toml"),
        "[consul]\ntag_routes = true\nports = [\"4000-4010\", \"5353\"]\n\
         [[listener]]\naddress = \"0.0.0.0:4001\"\n\
         [[port]]\naddress = \"0.0.0.0:4000\"\npool = \"p\"\n\
         [[vhost]]\nnames = [\"a.test\"]\n[[vhost.route]]\npath = \"/\"\npool = \"p\"\n\
         [pool.p]\nbackends = [\"127.0.0.1:2\"]\n",
    )
    .unwrap();
    let m = merge_routes(
        &cfg,
        &view(vec![
            port("db", Tcp, 4002, ""),
            port("db2", Tcp, 4002, ""),
            port("dns", Udp, 5353, ""),
            port("pg", Sni, 4003, "pg.test"),
            port("my", Sni, 4003, "my.test"),
            port("x", Tcp, 4000, ""),
            port("y", Tcp, 4001, ""),
            port("z", Tcp, 6000, ""),
            port("u", Udp, 4000, ""),
        ]),
        |_| true,
    );
    let names: Vec<(&str, crate::config::PortProtocol)> = m
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.protocol))
        .collect();
    assert_eq!(
        names,
        [
            ("tcp-4000", Tcp),
            ("consul-tcp-4002", Tcp),
            ("consul-udp-5353", Udp),
            ("consul-sni-4003", Sni),
            ("consul-udp-4000", Udp),
        ]
    );
    let sni = &m.ports[3];
    let routes: Vec<(Vec<String>, &str)> = sni
        .sni
        .iter()
        .map(|r| (r.names.clone(), r.pool.as_str()))
        .collect();
    assert_eq!(
        routes,
        [
            (vec!["pg.test".to_string()], "consul:pg"),
            (vec!["my.test".to_string()], "consul:my")
        ]
    );
    assert_eq!(m.ports[1].pool.as_deref(), Some("consul:db"));
    assert!(m.pool_specs.contains_key("consul:dns"));
    for (service, why) in [
        ("db2", "is taken by consul tag"),
        ("x", "is taken by file"),
        ("y", "a listener of the file has"),
        ("z", "consul.ports does not allow 6000"),
    ] {
        assert!(
            m.route_conflicts
                .iter()
                .any(|c| c.contains(&format!("service {service} ")) && c.contains(why)),
            "{service}: {:?}",
            m.route_conflicts
        );
    }
}
