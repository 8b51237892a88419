//! A tollgate configuration written as data, with the tests' defaults in one place.
//!
//! ```ignore
//! let cfg = Config::new()
//!     .http()
//!     .consul(&agent, "")
//!     .vhost(Vhost::new(&["a.test"]).route("/", "api"))
//!     .pool("api", Pool::consul("api", &["prod"]).set("connect_timeout", "\"500ms\""));
//! let tg = cfg.start(dir.path()).await;
//! ```
//!
//! Defaults (the only place they are written): two worker threads, a 5 s shutdown, the admin
//! API on a free loopback port, and with Consul a 30 s blocking wait and no state file (a test
//! that wants one sets `state_file`). Anything the builder has no word for goes in verbatim
//! with [`Config::toml`]. `{dir}` anywhere in the text is replaced by the directory the config
//! is written to.

use super::{free_port, ConsulAgent, Tollgate};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// `key = value` lines of one table, in order; setting a key again replaces its value.
#[derive(Clone, Default, Debug)]
pub struct Table(Vec<(String, String)>);

impl Table {
    /// Set `key` to `value` (TOML, e.g. `"\"5s\""`, `"2"`, `"[\"a\"]"`).
    pub fn set(&mut self, key: &str, value: &str) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.to_string(),
            None => self.0.push((key.to_string(), value.to_string())),
        }
    }

    /// Set every `key = value` line of `lines` (blank lines and comments are skipped).
    pub fn set_lines(&mut self, lines: &str) {
        for line in lines.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not a `key = value` line: {line:?}"));
            self.set(k.trim(), v.trim());
        }
    }

    fn render(&self, out: &mut String) {
        for (k, v) in &self.0 {
            let _ = writeln!(out, "{k} = {v}");
        }
    }
}

/// A `[[listener]]`.
#[derive(Clone, Debug)]
pub struct Listener {
    pub address: SocketAddr,
    pub tls: bool,
    pub options: Table,
}

/// A `[[vhost]]` with its routes.
#[derive(Clone, Debug)]
pub struct Vhost {
    names: Vec<String>,
    options: Table,
    routes: Vec<Table>,
}

impl Vhost {
    /// A vhost for `names` (none: set `default = true` or take names from certificates).
    pub fn new(names: &[&str]) -> Vhost {
        let mut options = Table::default();
        if !names.is_empty() {
            options.set("names", &toml_strings(names));
        }
        Vhost {
            names: names.iter().map(|n| n.to_string()).collect(),
            options,
            routes: Vec::new(),
        }
    }

    /// `cert`/`key` from `{dir}/<stem>.crt` and `{dir}/<stem>.key` (as `TestCa::issue` writes them).
    pub fn cert(self, stem: &str) -> Vhost {
        self.set("cert", &format!("\"{{dir}}/{stem}.crt\""))
            .set("key", &format!("\"{{dir}}/{stem}.key\""))
    }

    /// Any vhost option, as TOML.
    pub fn set(mut self, key: &str, value: &str) -> Vhost {
        self.options.set(key, value);
        self
    }

    /// The vhost for hosts no other vhost names.
    pub fn default_vhost() -> Vhost {
        Vhost::new(&[]).set("default", "true")
    }

    /// Several vhost options at once (`key = value` lines).
    pub fn with(mut self, lines: &str) -> Vhost {
        self.options.set_lines(lines);
        self
    }

    /// A route for `path` to `pool`.
    pub fn route(self, path: &str, pool: &str) -> Vhost {
        self.route_with(path, pool, "")
    }

    /// A route for `path` to `pool` with more options (`key = value` lines); an empty `pool`
    /// is left out (a route that answers itself, e.g. with `redirect`).
    pub fn route_with(mut self, path: &str, pool: &str, options: &str) -> Vhost {
        let mut route = Table::default();
        route.set("path", &format!("{path:?}"));
        if !pool.is_empty() {
            route.set("pool", &format!("{pool:?}"));
        }
        route.set_lines(options);
        self.routes.push(route);
        self
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// A `[pool.NAME]`.
#[derive(Clone, Debug, Default)]
pub struct Pool(Table);

impl Pool {
    /// A static pool of `backends`.
    pub fn backends(backends: &[SocketAddr]) -> Pool {
        let list: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
        let refs: Vec<&str> = list.iter().map(String::as_str).collect();
        Pool::default().set("backends", &toml_strings(&refs))
    }

    /// A pool discovered from Consul's `service`, filtered by `tags`.
    pub fn consul(service: &str, tags: &[&str]) -> Pool {
        let value = if tags.is_empty() {
            format!("{{ service = {service:?} }}")
        } else {
            format!("{{ service = {service:?}, tags = {} }}", toml_strings(tags))
        };
        Pool::default().set("consul", &value)
    }

    /// Any pool option, as TOML.
    pub fn set(mut self, key: &str, value: &str) -> Pool {
        self.0.set(key, value);
        self
    }

    /// Several pool options at once (`key = value` lines).
    pub fn with(mut self, lines: &str) -> Pool {
        self.0.set_lines(lines);
        self
    }
}

/// A `[[port]]` (a service port), with its `[[port.sni]]` entries.
#[derive(Clone, Debug)]
pub struct Port {
    options: Table,
    sni: Vec<Table>,
}

impl Port {
    /// A port named `name` on `address`; set `pool` (or SNI entries) and the protocol with
    /// [`Port::set`]/[`Port::with`].
    pub fn new(name: &str, address: SocketAddr) -> Port {
        let mut options = Table::default();
        if !name.is_empty() {
            options.set("name", &format!("{name:?}"));
        }
        options.set("address", &format!("\"{address}\""));
        Port {
            options,
            sni: Vec::new(),
        }
    }

    pub fn set(mut self, key: &str, value: &str) -> Port {
        self.options.set(key, value);
        self
    }

    /// Several options at once (`key = value` lines).
    pub fn with(mut self, lines: &str) -> Port {
        self.options.set_lines(lines);
        self
    }

    /// The port's pool.
    pub fn pool(self, pool: &str) -> Port {
        self.set("pool", &format!("{pool:?}"))
    }

    /// A `[[port.sni]]` entry: `names` passed through to `pool`.
    pub fn sni(mut self, names: &[&str], pool: &str) -> Port {
        let mut entry = Table::default();
        entry.set("names", &toml_strings(names));
        entry.set("pool", &format!("{pool:?}"));
        self.sni.push(entry);
        self
    }
}

/// A whole tollgate config. Clone it to write a changed copy for a reload.
#[derive(Clone, Debug)]
pub struct Config {
    server: Table,
    admin: Option<Table>,
    admin_port: Option<u16>,
    consul: Option<Table>,
    tables: Vec<(String, Table)>,
    listeners: Vec<Listener>,
    vhosts: Vec<Vhost>,
    ports: Vec<Port>,
    pools: Vec<(String, Pool)>,
    extra: String,
}

impl Default for Config {
    fn default() -> Self {
        Config::new()
    }
}

impl Config {
    /// The defaults: `[server]` with two threads and a 5 s shutdown, the admin API on a free
    /// loopback port, no listener, no Consul.
    pub fn new() -> Config {
        let mut server = Table::default();
        server.set("threads", "2");
        server.set("shutdown_timeout", "\"5s\"");
        let port = free_port();
        let mut admin = Table::default();
        admin.set("address", &format!("\"127.0.0.1:{port}\""));
        Config {
            server,
            admin: Some(admin),
            admin_port: Some(port),
            consul: None,
            tables: Vec::new(),
            listeners: Vec::new(),
            vhosts: Vec::new(),
            ports: Vec::new(),
            pools: Vec::new(),
            extra: String::new(),
        }
    }

    /// Set `[server]` options (`key = value` lines).
    pub fn server(mut self, lines: &str) -> Config {
        self.server.set_lines(lines);
        self
    }

    /// Set `[admin]` options (`key = value` lines), e.g. a token.
    pub fn admin(mut self, lines: &str) -> Config {
        self.admin
            .get_or_insert_with(Table::default)
            .set_lines(lines);
        self
    }

    /// The admin API on `127.0.0.1:port` (a port kept across rewrites of one config).
    pub fn admin_at(mut self, port: u16) -> Config {
        self.admin
            .get_or_insert_with(Table::default)
            .set("address", &format!("\"127.0.0.1:{port}\""));
        self.admin_port = Some(port);
        self
    }

    /// No admin API (`enabled = false`).
    pub fn no_admin(mut self) -> Config {
        let mut admin = Table::default();
        admin.set("enabled", "false");
        self.admin = Some(admin);
        self.admin_port = None;
        self
    }

    /// Discovery through `agent` (its HTTP address), plus `lines` under `[consul]`.
    pub fn consul(self, agent: &ConsulAgent, lines: &str) -> Config {
        self.consul_at(&format!("http://{}", agent.http), lines)
    }

    /// Discovery through the agent at `address` (a URL), plus `lines` under `[consul]`.
    pub fn consul_at(mut self, address: &str, lines: &str) -> Config {
        let mut consul = Table::default();
        consul.set("address", &format!("{address:?}"));
        consul.set("wait", "\"30s\"");
        consul.set("state_file", "\"\"");
        consul.set_lines(lines);
        self.consul = Some(consul);
        self
    }

    /// Set options of the top-level table `[name]` (`tls`, `log`, `limits`…; `key = value` lines).
    pub fn table(mut self, name: &str, lines: &str) -> Config {
        let table = match self.tables.iter().position(|(n, _)| n == name) {
            Some(i) => &mut self.tables[i].1,
            None => {
                self.tables.push((name.to_string(), Table::default()));
                &mut self.tables.last_mut().unwrap().1
            }
        };
        table.set_lines(lines);
        self
    }

    /// `[failover]` for node `name` with `priority`: heartbeats from `listen` to `peer`, the
    /// tests' shared secret. `more` is further `[failover]` options (`key = value` lines) and
    /// then, from its first `[` line, tables that go in verbatim (claims, `[consul]`…).
    pub fn failover(
        self,
        name: &str,
        priority: u8,
        listen: SocketAddr,
        peer: SocketAddr,
        more: &str,
    ) -> Config {
        let (options, tables) = split_tables(more);
        self.table(
            "failover",
            &format!(
                "name = {name:?}\npriority = {priority}\nlisten = \"{listen}\"\npeer = \"{peer}\"\n\
                 secret = \"shared-secret-for-tests-0123\"\n{options}"
            ),
        )
        .toml(tables)
    }

    /// A plain HTTP listener on a free loopback port.
    pub fn http(self) -> Config {
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
        self.listener(address, false, "")
    }

    /// A TLS listener on a free loopback port.
    pub fn https(self) -> Config {
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
        self.listener(address, true, "")
    }

    /// A listener on `address`, with more options (`key = value` lines).
    pub fn listener(mut self, address: SocketAddr, tls: bool, lines: &str) -> Config {
        let mut options = Table::default();
        options.set_lines(lines);
        self.listeners.push(Listener {
            address,
            tls,
            options,
        });
        self
    }

    pub fn vhost(mut self, vhost: Vhost) -> Config {
        self.vhosts.push(vhost);
        self
    }

    pub fn port(mut self, port: Port) -> Config {
        self.ports.push(port);
        self
    }

    pub fn pool(mut self, name: &str, pool: Pool) -> Config {
        match self.pools.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = pool,
            None => self.pools.push((name.to_string(), pool)),
        }
        self
    }

    /// TOML the builder has no word for (plugins, service ports, failover, ACME…), verbatim,
    /// after everything else.
    pub fn toml(mut self, text: &str) -> Config {
        self.extra.push('\n');
        self.extra.push_str(text);
        self.extra.push('\n');
        self
    }

    /// The first plain listener's address.
    pub fn http_addr(&self) -> SocketAddr {
        self.listeners
            .iter()
            .find(|l| !l.tls)
            .expect("a plain listener (Config::http)")
            .address
    }

    /// The first TLS listener's address.
    pub fn https_addr(&self) -> SocketAddr {
        self.listeners
            .iter()
            .find(|l| l.tls)
            .expect("a TLS listener (Config::https)")
            .address
    }

    /// The admin API's port.
    pub fn admin_port(&self) -> u16 {
        self.admin_port.expect("the admin API is on")
    }

    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// The config as TOML, `{dir}` replaced by `dir`.
    pub fn render(&self, dir: &Path) -> String {
        let mut out = String::from("[server]\n");
        self.server.render(&mut out);
        if let Some(admin) = &self.admin {
            out.push_str("\n[admin]\n");
            admin.render(&mut out);
        }
        if let Some(consul) = &self.consul {
            out.push_str("\n[consul]\n");
            consul.render(&mut out);
        }
        for (name, table) in &self.tables {
            let _ = writeln!(out, "\n[{name}]");
            table.render(&mut out);
        }
        for l in &self.listeners {
            let _ = writeln!(out, "\n[[listener]]\naddress = \"{}\"", l.address);
            if l.tls {
                out.push_str("tls = true\n");
            }
            l.options.render(&mut out);
        }
        for v in &self.vhosts {
            out.push_str("\n[[vhost]]\n");
            v.options.render(&mut out);
            for r in &v.routes {
                out.push_str("[[vhost.route]]\n");
                r.render(&mut out);
            }
        }
        for p in &self.ports {
            out.push_str("\n[[port]]\n");
            p.options.render(&mut out);
            for sni in &p.sni {
                out.push_str("[[port.sni]]\n");
                sni.render(&mut out);
            }
        }
        for (name, pool) in &self.pools {
            let _ = writeln!(out, "\n[pool.{name}]");
            pool.0.render(&mut out);
        }
        out.push_str(&self.extra);
        out.replace("{dir}", &dir.display().to_string())
    }

    /// Write the config to `path` (`{dir}` is `path`'s directory).
    pub fn write(&self, path: &Path) {
        let dir = path.parent().expect("a config path in a directory");
        super::write(path, &self.render(dir));
    }

    /// Write `dir/tollgate.toml` and start tollgate on it; returns once every listener and the
    /// admin API accept connections.
    pub async fn start(&self, dir: &Path) -> Tollgate {
        self.start_as(&dir.join("tollgate.toml")).await
    }

    /// Like [`Config::start`] with the config at `path` (several tollgates in one directory).
    pub async fn start_as(&self, path: &Path) -> Tollgate {
        self.write(path);
        let mut tg = Tollgate::start(path);
        self.wait_ready(&mut tg).await;
        tg
    }

    /// Wait until `tg` (started on this config) listens on every listener and the admin port.
    pub async fn wait_ready(&self, tg: &mut Tollgate) {
        for l in &self.listeners {
            tg.ready(l.address).await;
        }
        if let Some(port) = self.admin_port {
            tg.ready(SocketAddr::from(([127, 0, 0, 1], port))).await;
        }
    }

    /// The path [`Config::start`] writes to in `dir`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join("tollgate.toml")
    }
}

/// `text` split before its first line that opens a table (`[name]` or `[[name]]`): the
/// `key = value` lines of the current table, then the tables.
pub fn split_tables(text: &str) -> (&str, &str) {
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with('[') {
            return text.split_at(at);
        }
        at += line.len();
    }
    (text, "")
}

/// The 1-based line of `path` holding `needle` first (what tollgate cites as `file:line`).
pub fn line_of(path: &Path, needle: &str) -> usize {
    let text = std::fs::read_to_string(path).unwrap();
    1 + text
        .lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no {needle:?} in {}:\n{text}", path.display()))
}

/// `["a", "b"]` as TOML.
fn toml_strings(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_site_that_tollgate_parses_as_written() {
        let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let cfg = Config::new()
            .server("threads = 1")
            .http()
            .vhost(
                Vhost::new(&["a.test", "b.test"])
                    .cert("a")
                    .route("/", "p")
                    .route_with("/api", "p", "strip_prefix = true"),
            )
            .pool("p", Pool::backends(&[up]).set("connect_timeout", "\"1s\""))
            .toml("[[plugin]]\nname = \"x\"");
        let text = cfg.render(Path::new("/d"));
        let parsed: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(parsed["server"]["threads"].as_integer(), Some(1), "{text}");
        assert_eq!(parsed["vhost"][0]["names"][1].as_str(), Some("b.test"));
        assert_eq!(parsed["vhost"][0]["cert"].as_str(), Some("/d/a.crt"));
        assert_eq!(
            parsed["vhost"][0]["route"][1]["strip_prefix"].as_bool(),
            Some(true)
        );
        assert_eq!(
            parsed["pool"]["p"]["backends"][0].as_str(),
            Some("127.0.0.1:9")
        );
        assert_eq!(
            parsed["listener"][0]["address"].as_str(),
            Some(cfg.http_addr().to_string().as_str())
        );
        assert_eq!(parsed["plugin"][0]["name"].as_str(), Some("x"));
    }

    #[test]
    fn split_tables_keeps_the_options_before_the_first_table() {
        assert_eq!(
            split_tables("a = 1\nb = \"[x]\"\n[[t]]\nc = 2\n"),
            ("a = 1\nb = \"[x]\"\n", "[[t]]\nc = 2\n")
        );
        assert_eq!(split_tables("a = 1"), ("a = 1", ""));
        assert_eq!(split_tables("[consul]\nx = 1"), ("", "[consul]\nx = 1"));
    }
}
