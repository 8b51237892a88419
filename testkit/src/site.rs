//! A tollgate site for request-path tests: an HTTPS and a plain listener, an admin port,
//! a test CA, and the vhosts and pools a test gives (a [`Config`]).

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

/// The site's config before vhosts: the defaults of [`Config::new`] plus an HTTPS and a
/// plain listener.
pub fn site_config() -> Config {
    Config::new().https().http()
}

/// Start tollgate on `cfg` (from [`site_config`] or [`single_pool`]); `prepare` writes
/// certificates into the directory first.
pub async fn site(cfg: Config, prepare: impl FnOnce(&TestCa, &Path)) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    prepare(&ca, dir.path());
    let tg = cfg.start(dir.path()).await;
    Site {
        _dir: dir,
        tg,
        https: cfg.https_addr(),
        http: cfg.http_addr(),
        admin: cfg.admin_port(),
        ca,
    }
}

/// `a.test` with the certificate [`issue_a`] writes.
pub fn one_vhost() -> Vhost {
    Vhost::new(&["a.test"]).cert("a")
}

/// [`site_config`] with [`one_vhost`] plus `vhost_options`, one route `/` to pool `p`, and
/// `pool_options` for `p` (both `key = value` lines).
pub fn single_pool(vhost_options: &str, pool_options: &str) -> Config {
    site_config()
        .vhost(one_vhost().with(vhost_options).route("/", "p"))
        .pool("p", Pool::default().with(pool_options))
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
