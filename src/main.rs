//! The tollgate command line: parse arguments, load the configuration, start the server.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tollgate::config::{Config, LogFormat, LogSettings};

// A proxy allocates and frees per request; mimalloc measured faster than glibc malloc here
// (see benches/README.md).
#[global_allocator]
static GLOBAL: tollgate::alloc::MiMalloc = tollgate::alloc::MiMalloc;

#[derive(Parser)]
#[command(name = "tollgate", version, about = "HTTPS edge reverse proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// The configuration file (TOML); relative paths in it are relative to its directory.
        #[arg(long, short)]
        config: PathBuf,
        /// Take the listening sockets over from the running tollgate (zero-downtime binary
        /// upgrade): start this, then send SIGQUIT to the old process.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a configuration (and its certificates); print every problem. Exit 1 if any.
    Check {
        /// The configuration file (TOML) to validate.
        #[arg(long, short)]
        config: PathBuf,
        /// Also read the routes services declare in Consul now and say which the file's
        /// policy applies and which it refuses (exit 2 on any conflict).
        #[arg(long)]
        consul: bool,
    },
    /// Certificate helpers.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Write a self-signed certificate and key for local use: <dir>/<first host>.crt/.key
    Dev {
        /// Host names (and IP addresses) the certificate covers.
        #[arg(required = true)]
        hosts: Vec<String>,
        /// Directory to write <first host>.crt and .key into (created if missing).
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { config, upgrade } => run(config, upgrade),
        Command::Check { config, consul } => check(config, consul),
        Command::Cert {
            command: CertCommand::Dev { hosts, dir },
        } => match tollgate::tls::write_dev_cert(&hosts, &dir) {
            Ok((cert, key)) => {
                println!("wrote {} and {}", cert.display(), key.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
    }
}

fn run(path: PathBuf, upgrade: bool) -> ExitCode {
    // Until the reloader installs its handler, a SIGHUP must not kill the process.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprint!("tollgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&config.log);
    match tollgate::server::run(config, upgrade).context("could not start") {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn check(path: PathBuf, consul: bool) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let lasting = tollgate::state::Lasting::new();
    let mut view = tollgate::discovery::View::default();
    if consul {
        let settings = config.consul.clone();
        let read = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(tollgate::discovery::consul::declared_routes(&settings)));
        match read {
            Ok(routes) => view.routes = routes,
            Err(e) => {
                eprintln!(
                    "tollgate: cannot read the Consul catalog at {}: {e}",
                    settings.address
                );
                return ExitCode::FAILURE;
            }
        }
        if !settings.tag_routes {
            eprintln!("note: consul.tag_routes is off: tollgate would apply none of these routes");
        }
    }
    let declared = view.routes.len();
    let snap = match tollgate::state::Snapshot::build(config.into(), &lasting, 0, &view) {
        Ok(s) => s,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}: configuration is valid", path.display());
    for w in snap.warnings() {
        eprintln!("WARNING: {w}");
    }
    if !consul {
        return ExitCode::SUCCESS;
    }
    println!(
        "Consul at {}: {declared} routes declared",
        snap.config.consul.address
    );
    for (vi, v) in snap.vhosts.iter().enumerate() {
        for r in snap.routes_of(vi) {
            if let Some(by) = &r.allowed_by {
                println!(
                    "applied  {}{} -> {}: {}; allowed by {by}",
                    v.label, r.path, r.pool, r.source
                );
            }
        }
    }
    for c in &snap.route_conflicts {
        println!("conflict {c}");
    }
    if snap.route_conflicts.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

fn init_logging(log: &LogSettings) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("TOLLGATE_LOG").unwrap_or_else(|_| EnvFilter::new(&log.level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("tollgate: {e:#}");
    ExitCode::FAILURE
}
