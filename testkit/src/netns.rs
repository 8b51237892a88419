//! A small lab of network namespaces the test creates itself: hosts `a`, `b` (the two
//! proxies) and `c` (client and upstream), each with `eth0` on 198.18.0.0/24 (RFC 2544
//! benchmarking space), joined by a bridge that lives in a namespace of its own, so nothing
//! touches the machine's own network. Dropping the lab deletes every namespace (and with
//! them the links), on failure too; namespaces left by a test process that was killed are
//! swept by the next lab.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const PREFIX: &str = "tglab";

pub struct Lab {
    tag: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2's ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces of labs whose test process is gone.
fn sweep() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: u32 = rest
            .split('-')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if pid != 0 && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

pub const HOSTS: [(&str, [u8; 4]); 3] = [
    ("a", [198, 18, 0, 1]),
    ("b", [198, 18, 0, 2]),
    ("c", [198, 18, 0, 3]),
];

pub fn host_ip(host: &str) -> Ipv4Addr {
    HOSTS
        .iter()
        .find(|(h, _)| *h == host)
        .map(|(_, a)| Ipv4Addr::from(*a))
        .expect("a lab host")
}

impl Lab {
    pub fn new() -> Lab {
        static N: AtomicU32 = AtomicU32::new(0);
        sweep();
        let tag = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let lab = Lab { tag };
        let br = lab.ns("br");
        ip(&["netns", "add", &br]);
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        for (h, addr) in HOSTS {
            let ns = lab.ns(h);
            ip(&["netns", "add", &ns]);
            let port = format!("v{h}");
            ip(&[
                "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip(&["-n", &br, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &br, "link", "set", &port, "up"]);
            let a = Ipv4Addr::from(addr);
            ip(&["-n", &ns, "addr", "add", &format!("{a}/24"), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    /// The namespace name of a host (`a`, `b`, `c`) or of the bridge (`br`).
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.tag)
    }

    /// A command run inside a host's namespace.
    pub fn command(&self, host: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host), program]);
        c
    }

    /// Run `f` on a thread that has entered the host's namespace: sockets it opens belong
    /// to that namespace and keep working when handed back.
    pub fn within<T: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let path = format!("/var/run/netns/{}", self.ns(host));
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .expect("lab thread")
    }

    /// Connect from a host to `to`.
    pub fn connect(
        &self,
        host: &str,
        to: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        self.within(host, move || TcpStream::connect_timeout(&to, timeout))
    }

    /// Addresses on a host's eth0.
    pub fn addresses(&self, host: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.ns(host), "-4", "addr", "show", "dev", "eth0"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Put the calling thread into the namespace at `path`.
pub fn enter(path: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: setns on a namespace file we hold open; affects only this thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in ["a", "b", "c", "br"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(h)])
                .status();
        }
    }
}
