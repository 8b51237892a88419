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
        Command::Check { config } => check(config),
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

fn check(path: PathBuf) -> ExitCode {
    let result = Config::load(&path).and_then(|c| {
        tollgate::state::Snapshot::build(c.into(), &Default::default(), 0, &Default::default())
            .map(|_| ())
    });
    match result {
        Ok(()) => {
            println!("{}: configuration is valid", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprint!("{e}");
            ExitCode::FAILURE
        }
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
