//! A tollgate site for request-path tests: an HTTPS and a plain listener, an admin port,
//! a test CA, and the config body a test gives.

use super::*;
use serde_json::Value;

/// A running tollgate; fields drop in order: stop tollgate (and print its log) before the
/// directory goes.
pub struct Site {
    pub tg: Tollgate,
    pub _dir: tempfile::TempDir,
    pub https: SocketAddr,
    pub http: SocketAddr,
    pub admin: u16,
    pub ca: TestCa,
}

/// Start tollgate with `body` (vhosts and pools) plus an HTTPS and a plain listener.
/// `{dir}` in the body is replaced by the temp dir; `prepare` writes certificates first.
pub async fn site(body: &str, prepare: impl FnOnce(&TestCa, &Path)) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    prepare(&ca, dir.path());
    let https = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin_port = free_port();
    let cfg = format!(
        "[server]\nthreads = 2\nshutdown_timeout = \"5s\"\n\n\
         [admin]\naddress = \"127.0.0.1:{admin_port}\"\n\n\
         [[listener]]\naddress = \"{https}\"\ntls = true\n\n\
         [[listener]]\naddress = \"{http}\"\n\n{}",
        body.replace("{dir}", &dir.path().display().to_string())
    );
    let path = dir.path().join("tollgate.toml");
    write(&path, &cfg);
    let mut tg = Tollgate::start(&path);
    tg.ready(https).await;
    tg.ready(http).await;
    tg.ready(SocketAddr::from(([127, 0, 0, 1], admin_port)))
        .await;
    Site {
        _dir: dir,
        tg,
        https,
        http,
        admin: admin_port,
        ca,
    }
}

pub const ONE_VHOST: &str = r#"
[[vhost]]
names = ["a.test"]
cert = "{dir}/a.crt"
key = "{dir}/a.key"
"#;

/// `ONE_VHOST` plus `vhost_options`, one route `/` to pool `p`, and `pool_options` under `[pool.p]`.
pub fn single_pool(vhost_options: &str, pool_options: &str) -> String {
    format!(
        "{ONE_VHOST}{vhost_options}\n[[vhost.route]]\npath = \"/\"\npool = \"p\"\n[pool.p]\n{pool_options}\n"
    )
}

pub fn issue_a(ca: &TestCa, dir: &Path) {
    ca.issue(dir, "a", &["a.test"], "a");
}

/// The active-check state `/pools` shows for the first pool's backend at `addr`.
pub async fn backend_check(c: &reqwest::Client, admin: u16, addr: SocketAddr) -> Value {
    let pools = admin_json(c, admin, "/pools").await;
    pools[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["address"] == addr.to_string())
        .unwrap()["check"]
        .clone()
}
