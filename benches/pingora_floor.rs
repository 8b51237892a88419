//! The smallest pingora proxy: one `upstream_peer`, nothing else, on the same vendored and
//! patched pingora, rustls and mimalloc as tollgate. benches/instructions.py measures it beside
//! tollgate, nginx and HAProxy, so "tollgate's own work" is tollgate minus this floor, and the
//! floor moves with every pingora patch.
//!
//!     cargo build --profile profiling --bench pingora_floor
//!     pingora_floor-<hash> LISTEN UPSTREAM CERT KEY
//!
//! Not a criterion benchmark (harness = false): `cargo bench` runs it with `--bench` and it
//! exits at once.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::HttpPeer;

#[global_allocator]
static GLOBAL: tollgate::alloc::MiMalloc = tollgate::alloc::MiMalloc;

struct Floor {
    upstream: std::net::SocketAddr,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--bench") || args.len() != 4 {
        eprintln!("usage: pingora_floor LISTEN UPSTREAM CERT KEY (see benches/instructions.py)");
        return;
    }
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = pingora::server::Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service(
        &server.configuration,
        Floor {
            upstream: args[1].parse().expect("UPSTREAM is IP:port"),
        },
    );
    let mut tls = pingora::listeners::tls::TlsSettings::intermediate(&args[2], &args[3])
        .expect("CERT and KEY load");
    tls.enable_h2();
    proxy.add_tls_with_settings(&args[0], None, tls);
    server.add_service(proxy);
    server.run_forever();
}
