//! The composition root: assembles the pingora server (listeners, plain and TLS with the SNI
//! resolver; the proxy service; the admin listener), the reload watcher, Consul discovery and
//! the failover peer, then runs until SIGTERM (graceful drain) or SIGINT. The only module that
//! wires the others together; `main.rs` stays the command line.

use crate::admin::Admin;
use crate::config::Config;
use crate::proxy::sni::SniResolver;
use crate::proxy::{ActiveRequests, Tollgate};
use crate::state::{watch::Reloader, Lasting, State};
use anyhow::{bail, Context};
use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::TlsAccept;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownSignal, ShutdownSignalWatch, UnixShutdownSignalWatch};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::sync::Arc;
use std::time::Duration;

/// Raise the soft limit on open files to the hard limit, as nginx's `worker_rlimit_nofile`
/// and Go's runtime do: every client connection, every pooled upstream connection and every
/// watch holds a descriptor, and service managers start processes with a soft limit of 1024
/// (systemd's default) that a proxy outgrows long before `limits.max_connections`. Says so
/// when even the hard limit is below what the configuration can hold open.
/// The descriptors a configuration may hold at its limits: a socket per connection
/// (`limits.max_connections`, HTTP and service ports alike), the upstream keep-alive pools,
/// a backend socket per TCP service-port connection (as many as connections, when the file
/// declares TCP ports), a socket per UDP flow (`max_flows` of each UDP port), and room for
/// listeners, files and Consul.
fn fds_wanted(cfg: &Config) -> u64 {
    use crate::config::PortProtocol;
    let tcp_ports = cfg.ports.iter().any(|p| p.protocol != PortProtocol::Udp);
    let flows: u64 = cfg
        .ports
        .iter()
        .filter(|p| p.protocol == PortProtocol::Udp)
        .map(|p| p.max_flows as u64)
        .sum();
    let conns = cfg.limits.max_connections as u64;
    conns
        + if tcp_ports { conns } else { 0 }
        + flows
        + (cfg.server.upstream_keepalive_pool_size * cfg.server.threads.max(1)) as u64
        + 256
}

fn raise_fd_limit(cfg: &Config) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            lim.rlim_cur = before;
        }
    }
    let wanted = fds_wanted(cfg);
    if lim.rlim_cur < wanted {
        tracing::warn!(
            open_files = lim.rlim_cur,
            wanted,
            "the open-file limit is below what limits.max_connections, the upstream keep-alive pools and \
             the service ports (a backend socket per TCP connection, one per UDP flow up to max_flows) \
             may hold; raise it (systemd: LimitNOFILE=) or lower those limits. Service ports stop taking \
             new connections and flows at 3/4 of the limit"
        );
    } else if lim.rlim_cur != before {
        tracing::info!(from = before, to = lim.rlim_cur, "open-file limit raised");
    }
}

/// Start Consul pools from the last applied view (if saved), so a restart while Consul is
/// down keeps serving; the watches replace it as soon as Consul answers.
fn restore_consul_view(state: &State) {
    let snap = state.snapshot();
    let Some(file) = snap.config.consul.state_file.clone() else {
        return;
    };
    let uses_consul =
        snap.config.consul.tag_routes || snap.config.pools.values().any(|p| p.consul.is_some());
    if !uses_consul || !file.exists() {
        return;
    }
    match crate::discovery::View::load(&file) {
        Ok(view) => {
            let age = std::fs::metadata(&file)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let services = view.services.len();
            match state.apply_view(view) {
                Ok(_) => tracing::warn!(
                    file = %file.display(),
                    age_seconds = age,
                    services,
                    "serving the last known Consul view until Consul answers"
                ),
                Err(e) => tracing::error!(
                    "the saved Consul view cannot be used: {}",
                    e.to_string().trim_end()
                ),
            }
        }
        Err(e) => tracing::error!(file = %file.display(), "ignoring the saved Consul view: {e}"),
    }
}

/// Counts a TLS listener's handshakes, full or resumed (pingora patch 25).
struct CountHandshakes(Arc<crate::metrics::Handshakes>);

#[async_trait]
impl TlsAccept for CountHandshakes {
    async fn handshake_complete_callback(
        &self,
        tls: &pingora::protocols::tls::TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let n = if tls.resumed() {
            &self.0.resumed
        } else {
            &self.0.full
        };
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let group = tls.key_exchange_group();
        self.0.key_exchange(group);
        // for the access log of the connection's requests
        Some(Arc::new(crate::tls::Negotiated {
            key_exchange: group.unwrap_or("-"),
        }))
    }
}

fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Fail early, naming the option, when a listener address cannot be bound.
fn check_listeners(cfg: &Config) -> anyhow::Result<()> {
    let mut wanted: Vec<(std::net::SocketAddr, String)> = Vec::new();
    for (i, l) in cfg.listeners.iter().enumerate() {
        for a in &l.addresses {
            wanted.push((*a, format!("listener[{i}].address")));
        }
    }
    if cfg.admin.enabled {
        wanted.push((cfg.admin.address, "admin.address".into()));
    }
    for (a, option) in wanted {
        if let Err(e) = std::net::TcpListener::bind(a) {
            let hint = match e.kind() {
                std::io::ErrorKind::AddrInUse => {
                    ": another process listens there; stop it or change the address"
                }
                std::io::ErrorKind::PermissionDenied => {
                    ": ports below 1024 need root or CAP_NET_BIND_SERVICE"
                }
                std::io::ErrorKind::AddrNotAvailable => {
                    ": no interface of this host has that address"
                }
                _ => "",
            };
            bail!(
                "cannot listen on {a} ({option} in {}): {e}{hint}",
                cfg.source.display()
            );
        }
    }
    Ok(())
}

/// Run tollgate with a validated configuration. Returns when the server has shut down.
/// With `upgrade`, the listening sockets are taken over from the running tollgate (which
/// is then sent SIGQUIT) instead of being bound: see docs/operations.md.
pub fn run(config: Config, upgrade: bool) -> anyhow::Result<()> {
    // aws-lc-rs for every TLS configuration, pingora's included: before any is built
    crate::tls::install_provider(config.post_quantum);
    // backend state, counters and the plugin host: made here, once, and handed in
    let lasting = Lasting::new();
    let state = Arc::new(State::new(config, lasting.clone()).map_err(|e| anyhow::anyhow!("{e}"))?);
    // plugin callouts resolve pools through the live Snapshot
    let live = state.handle();
    lasting.plugins.attach(Box::new(move |name| {
        live.load().pools.iter().find(|p| p.name == name).cloned()
    }));
    restore_consul_view(&state);
    let snap = state.snapshot();
    let cfg = &snap.config;
    if !upgrade {
        check_listeners(cfg)?;
    }
    raise_fd_limit(cfg);

    let mut conf = ServerConf {
        threads: cfg.server.threads,
        work_stealing: cfg.server.work_stealing,
        // pingora stops accepting on SIGTERM, then gives in-flight requests the grace period;
        // `DrainWatch` exits earlier as soon as none is left.
        grace_period_seconds: Some(whole_seconds(cfg.server.shutdown_timeout)),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: cfg.server.upstream_keepalive_pool_size,
        upgrade_sock: cfg.server.upgrade_sock.clone(),
        ..ServerConf::default()
    };
    conf.daemon = false;
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    if let Some(pid_file) = &cfg.server.pid_file {
        write_pid_file(pid_file).with_context(|| {
            format!(
                "cannot write server.pid_file {} (in {})",
                pid_file.display(),
                cfg.source.display()
            )
        })?;
        let _ = PID_FILE.set(pid_file.clone());
    }
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();

    // One ticketer for the process: a session from any TLS listener or `tls` port resumes
    // on any other. Without key files or Consul the process's own keys, rotated every
    // session_ticket_lifetime (the previous key still opens tickets for one more period);
    // with tickets off a listener remembers 256 sessions. With key files or Consul, the
    // fleet's keys (tls::tickets, tls::fleet_tickets), so an instance resumes what another
    // issued.
    let fleet_tickets = match &cfg.session_ticket_consul {
        Some((prefix, key_file)) if cfg.session_tickets => Some(Arc::new(
            crate::tls::fleet_tickets::FleetTickets::new(
                &cfg.consul,
                prefix,
                key_file,
                cfg.session_ticket_lifetime,
            )
            .map_err(|e| anyhow::anyhow!("session ticket keys in Consul: {e}"))?,
        )),
        _ => None,
    };
    // the process's own keys, rotated every lifetime by a service of their own
    let mut own_tickets = None;
    let ticketer: Option<Arc<crate::tls::tickets::Ticketer>> = if !cfg.session_tickets {
        None
    } else if let Some(f) = &fleet_tickets {
        Some(f.ticketer())
    } else if cfg.session_ticket_keys.is_empty() {
        let t = Arc::new(
            crate::tls::tickets::Ticketer::own(cfg.session_ticket_lifetime)
                .map_err(|e| anyhow::anyhow!("TLS session tickets: {e}"))?,
        );
        own_tickets = Some(t.clone());
        Some(t)
    } else {
        Some(Arc::new(
            crate::tls::tickets::Ticketer::from_files(
                &cfg.session_ticket_keys,
                cfg.session_ticket_lifetime,
            )
            .map_err(|e| anyhow::anyhow!(e))?,
        ))
    };
    // counters and tables that outlive Snapshots, handed to the services that keep or
    // show them (the admin API shows them all)
    let shown = crate::admin::Shown {
        tls: crate::admin::TlsAtStart {
            session_tickets: cfg.session_tickets,
            ticket_key_files: cfg.session_ticket_keys.len(),
            post_quantum: cfg.post_quantum,
            fleet: fleet_tickets.clone(),
        },
        ..Default::default()
    };
    let active = shown.active.clone();
    let conns = shown.conns.clone();
    // HTTP-01 answers: the issuer sets them, the proxy serves them
    let challenges = crate::tls::Challenges::default();
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Tollgate::new(
            state.handle(),
            cfg.log.access_log,
            active.clone(),
            challenges.clone(),
        ),
        "tollgate proxy",
    );
    let limits = &cfg.limits;
    pingora::listeners::set_handshake_timeout(limits.handshake_timeout);
    // Admission (connection caps, per-IP rate, PROXY headers) before any TLS handshake.
    let proxy_listeners: Vec<std::net::SocketAddr> = cfg
        .listeners
        .iter()
        .filter(|l| l.proxy_protocol)
        .flat_map(|l| l.addresses.iter().copied())
        .collect();
    proxy
        .endpoints()
        .set_pre_tls_callback(Arc::new(crate::proxy::admission::Admission::new(
            state.handle(),
            proxy_listeners,
            conns.clone(),
        )));
    if let Some(app) = proxy.app_logic_mut() {
        // HTTP/2 limits, rapid reset (CVE-2023-44487) included; these apply at start only.
        let mut h2 = pingora::protocols::http::v2::server::H2Options::default();
        h2.max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_header_list_size(limits.h2_max_header_list_size)
            .max_pending_accept_reset_streams(limits.h2_max_pending_resets)
            .max_local_error_reset_streams(Some(limits.h2_max_error_resets));
        app.h2_options = Some(h2);
        // An HTTP/2 connection with no open stream is closed after keepalive_timeout, as an
        // idle HTTP/1 one is; PING or SETTINGS frames alone do not keep it open.
        let mut opts = pingora::apps::HttpServerOptions::default();
        opts.h2_idle_timeout = Some(limits.keepalive_timeout);
        app.server_options = Some(opts);
    }
    for l in &cfg.listeners {
        for a in &l.addresses {
            let addr = a.to_string();
            if l.tls {
                let counted = CountHandshakes(lasting.metrics.handshakes(&addr));
                let mut tls =
                    TlsSettings::with_callbacks(Box::new(counted)).context("cannot set up TLS")?;
                tls.set_cert_resolver(Arc::new(SniResolver::new(
                    state.handle(),
                    Some(challenges.clone()),
                )));
                // HTTP first; `acme-tls/1` last, answered only for a CA's TLS-ALPN-01
                // validation of a pending order (pingora patch 15)
                let mut alpn = vec![b"http/1.1".to_vec(), crate::tls::ACME_TLS_ALPN.to_vec()];
                if l.http2 {
                    alpn.insert(0, b"h2".to_vec());
                }
                tls.set_alpn_protocols(alpn);
                // pingora patch 24
                let t = ticketer.clone();
                tls.set_config_hook(move |c| crate::tls::server_settings(c, t.as_ref()));
                proxy.add_tls_with_settings(&addr, None, tls);
            } else {
                proxy.add_tcp(&addr);
            }
            tracing::info!(address = %addr, tls = l.tls, http2 = l.http2, "listening");
        }
    }
    server.add_service(proxy);
    if cfg.admin.enabled {
        let mut admin = Service::new(
            "tollgate admin".to_string(),
            HttpServer::new_app(Admin::new(state.clone(), shown.clone())),
        );
        admin.threads = Some(1);
        admin.add_tcp(&cfg.admin.address.to_string());
        if cfg.admin.token.is_none() {
            tracing::warn!(address = %cfg.admin.address, "admin API without a token: anyone on this host can use it");
        }
        tracing::info!(address = %cfg.admin.address, "admin listening");
        server.add_service(admin);
    }
    for w in snap.warnings() {
        tracing::warn!("{w}");
    }
    server.add_service(background_service(
        "tollgate reloader",
        Reloader::new(state.clone()),
    ));
    // service ports: `tls` ones terminate with the same certificates, chosen by SNI
    let mut port_tls = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .context("TLS for service ports")?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver::new(state.handle(), None)));
    crate::tls::server_settings(&mut port_tls, ticketer.as_ref());
    server.add_service(background_service(
        "tollgate ports",
        crate::ports::Ports::new(
            state.handle(),
            conns.clone(),
            active.clone(),
            Arc::new(port_tls),
        ),
    ));
    if let Some(t) = own_tickets {
        server.add_service(background_service(
            "tollgate ticket key rotation",
            crate::tls::tickets::Rotation(t, cfg.session_ticket_lifetime),
        ));
    }
    if let Some(f) = fleet_tickets {
        server.add_service(background_service(
            "tollgate ticket keys",
            crate::tls::fleet_tickets::Service(f),
        ));
    }
    server.add_service(background_service(
        "tollgate acme",
        crate::acme::Issuer::new(state.clone(), challenges),
    ));
    server.add_service(background_service(
        "tollgate health checks",
        crate::probe::Prober::new(state.handle()),
    ));
    if let Some(f) = cfg.failover.clone() {
        let first = cfg
            .listeners
            .iter()
            .flat_map(|l| l.addresses.iter())
            .next()
            .copied();
        server.add_service(background_service(
            "tollgate failover",
            crate::failover::peer::Peer::new(f, cfg.consul.clone(), first, shown.failover.clone()),
        ));
    }
    server.add_service(background_service(
        "tollgate consul",
        crate::discovery::consul::Manager::new(
            state.clone(),
            shown.watches.clone(),
            lasting.metrics.clone(),
        ),
    ));
    tracing::info!(
        config = %cfg.source.display(),
        vhosts = cfg.vhosts.len(),
        pools = cfg.pools.len(),
        "tollgate started"
    );
    drop(snap);
    server.run(pingora::server::RunArgs {
        shutdown_signal: Box::new(DrainWatch(active)),
    });
    Ok(())
}

static PID_FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Write this process's id to `path` (through a temporary file and a rename, so a reader
/// never sees it half written).
fn write_pid_file(path: &std::path::Path) -> std::io::Result<()> {
    let tmp = path.with_extension("pid.tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(&tmp, path)
}

/// Remove the pid file at exit, unless another process (a binary upgrade's new tollgate) has
/// written its own id there since.
fn remove_pid_file() {
    if let Some(path) = PID_FILE.get() {
        let ours =
            std::fs::read_to_string(path).is_ok_and(|s| s.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// pingora's Unix signal handling, plus an early exit once a graceful shutdown has drained:
/// pingora itself would sleep the whole grace period even with nothing in flight.
struct DrainWatch(ActiveRequests);

#[async_trait]
impl ShutdownSignalWatch for DrainWatch {
    async fn recv(&self) -> ShutdownSignal {
        let signal = UnixShutdownSignalWatch.recv().await;
        // On an upgrade pingora hands the sockets over and keeps accepting beside the new
        // process for 5 s before it stops; the drain starts after that.
        let settle = match signal {
            ShutdownSignal::GracefulTerminate => Some(Duration::from_millis(250)),
            ShutdownSignal::GracefulUpgrade => Some(Duration::from_millis(5250)),
            ShutdownSignal::FastShutdown => None,
        };
        if let Some(settle) = settle {
            let active = self.0.clone();
            std::thread::spawn(move || {
                // let pingora stop the listeners and in-progress handshakes become requests
                std::thread::sleep(settle);
                loop {
                    let active = active.count();
                    if active == 0 {
                        tracing::info!("graceful shutdown: no request in flight, exiting");
                        remove_pid_file();
                        std::process::exit(0);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        if matches!(signal, ShutdownSignal::FastShutdown) {
            remove_pid_file();
        }
        signal
    }
}
