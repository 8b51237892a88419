#!/usr/bin/env python3
"""Server CPU per new TLS connection carrying one request: tollgate vs nginx vs HAProxy, with
a full TLS 1.3 handshake and with a resumed one (session tickets), for an ECDSA P-256 and an
RSA-2048 certificate.

Each proxy runs one worker pinned to CPU 0 and proxies to the same upstream nginx; a Python
client pinned to CPU 1 opens N connections one after another, each sending one request with
`Connection: close` and reading the answer. "resumed" hands every connection the session of
the previous one (the server's ticket), and the run fails if a server did not resume. The
figure is the server process's own user+system CPU (/proc/PID/stat) over the N connections,
divided by N: callgrind is not used here because valgrind hides ADX/BMI2 from the CPU, so
crypto libraries run slower generic code under it.

    scripts/install-deps bench && cargo build --release && benches/handshakes.py [--connections 3000]

Traffic goes to 127.0.0.1 only; every run is bounded by --connections.
"""
import argparse
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

ROOT = compare.ROOT
PORTS = {"tollgate": compare.TG, "nginx": compare.NG, "haproxy": compare.HA}
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def certificate(d, kind):
    """A self-signed certificate for 127.0.0.1 with an ECDSA P-256 or RSA-2048 key."""
    key_opts = (["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if kind == "ecdsa"
                else ["-newkey", "rsa:2048"])
    cert, key = f"{d}/{kind}.crt", f"{d}/{kind}.key"
    subprocess.run(["openssl", "req", "-x509", "-nodes", "-days", "2", "-subj", "/CN=bench.local",
                    "-addext", "subjectAltName=DNS:bench.local,IP:127.0.0.1", "-keyout", key,
                    "-out", cert] + key_opts, check=True, capture_output=True)
    return cert, key


def visit(ctx, port, session):
    """One connection, one request; returns the session to resume next and whether this one
    was resumed."""
    raw = socket.create_connection(("127.0.0.1", port), 5)
    s = ctx.wrap_socket(raw, server_hostname="bench.local", session=session)
    s.sendall(b"GET / HTTP/1.1\r\nHost: bench.local\r\nConnection: close\r\n\r\n")
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    if not got.startswith(b"HTTP/1.1 200"):
        sys.exit(f"port {port}: unexpected answer {got[:80]!r}")
    reused = s.session_reused
    # TLS 1.3 tickets arrive after the handshake: the session is read once the answer is in
    new = s.session
    s.close()
    return new, reused


def run(port, pid, n, resumed):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["http/1.1"])
    session, _ = visit(ctx, port, None)
    for _ in range(20):  # warm-up
        session, _ = visit(ctx, port, session if resumed else None)
    before = cpu_seconds(pid)
    start = time.time()
    reused = 0
    for _ in range(n):
        new, was = visit(ctx, port, session if resumed else None)
        reused += was
        if resumed:
            session = new
    cpu = cpu_seconds(pid) - before
    if resumed and reused < n * 0.99:
        sys.exit(f"port {port}: only {reused} of {n} connections resumed")
    if not resumed and reused:
        sys.exit(f"port {port}: {reused} connections resumed in the full-handshake run")
    return cpu / n * 1e6, n / (time.time() - start)


def rust_client():
    """The newest benches/tls_client.rs executable of any profile, or None."""
    return compare.newest_binary("tls_client")


def run_rust(client, port, pid, n, group, resumed):
    """Server CPU per connection with the Rust client offering only `group`."""
    mode = "resumed" if resumed else "full"
    subprocess.run([client, str(port), "20", group, mode], check=True, capture_output=True)
    before = cpu_seconds(pid)
    out = subprocess.run(["taskset", "-c", "1", client, str(port), str(n), group, mode],
                         check=True, capture_output=True, text=True).stdout
    cpu = cpu_seconds(pid) - before
    if group not in out:
        sys.exit(f"the client negotiated something else than {group}: {out}")
    return cpu / n * 1e6, out.strip()


def hybrid_price(args, d, log):
    """tollgate alone, ECDSA: X25519 vs X25519MLKEM768 from a rustls client."""
    client = rust_client()
    if not client:
        print("\n(no tls_client: cargo build --profile profiling --bench tls_client "
              "to price the post-quantum hybrid)")
        return
    cert, key = certificate(d, "ecdsa")
    up_conf, _, _, tg_conf = compare.configs(d, cert, key)
    compare.write(tg_conf, open(tg_conf).read() + '[limits]\nallow = ["127.0.0.1"]\n')
    upstream = compare.start(["nginx", "-p", d, "-e", f"{d}/upstream.err", "-c", up_conf], 1,
                             "upstream nginx", compare.UP, log)
    proc = compare.start([args.tollgate, "run", "--config", tg_conf], 0, "tollgate",
                         PORTS["tollgate"], log)
    rows = []
    try:
        for mode in ("full", "resumed"):
            got = {g: run_rust(client, PORTS["tollgate"], proc.pid, args.connections, g,
                               mode == "resumed")[0]
                   for g in ("X25519", "X25519MLKEM768")}
            rows.append((mode, got["X25519"], got["X25519MLKEM768"]))
    finally:
        compare.stop([proc, upstream])
    print("\ntollgate, ECDSA P-256, a rustls client offering one group (server CPU per "
          "connection, microseconds)\n")
    print("| handshake | X25519 | X25519MLKEM768 | the hybrid's price |")
    print("|---|---:|---:|---:|")
    for mode, x, pq in rows:
        print(f"| {mode} | {x:.0f} | {pq:.0f} | {pq - x:+.0f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=3000)
    ap.add_argument("--tollgate", default=f"{ROOT}/target/release/tollgate")
    ap.add_argument("--only", action="append", help="measure only these proxies")
    args = ap.parse_args()
    for tool in ("nginx", "haproxy", "openssl", "taskset"):
        if not subprocess.run(["which", tool], capture_output=True).returncode == 0:
            sys.exit(f"{tool} is missing: run scripts/install-deps bench")
    if not os.path.exists(args.tollgate):
        sys.exit("build first: cargo build --release --bin tollgate")
    d = tempfile.mkdtemp(prefix="tollgate-hs-")
    log = open(f"{d}/servers.log", "w")
    results = {}
    for kind in ("ecdsa", "rsa"):
        cert, key = certificate(d, kind)
        up_conf, ng_conf, ha_conf, tg_conf = compare.configs(d, cert, key)
        # one client opening thousands of connections a second: tollgate's per-IP connection
        # rate (100/s by default, a DoS defence nginx and HAProxy do not have on) is lifted
        # for loopback, or it would refuse most of them
        compare.write(tg_conf, open(tg_conf).read() + '[limits]\nallow = ["127.0.0.1"]\n')
        # one nginx process, like the other two
        compare.write(ng_conf, open(ng_conf).read().replace("daemon off;",
                                                            "daemon off; master_process off;"))
        upstream = compare.start(["nginx", "-p", d, "-e", f"{d}/upstream.err", "-c", up_conf], 1,
                                 "upstream nginx", compare.UP, log)
        cmds = {
            "tollgate": [args.tollgate, "run", "--config", tg_conf],
            "nginx": ["nginx", "-p", d, "-e", f"{d}/nginx.err", "-c", ng_conf],
            "haproxy": ["haproxy", "-db", "-f", ha_conf],
        }
        try:
            for name, cmd in cmds.items():
                if args.only and name not in args.only:
                    continue
                proc = compare.start(cmd, 0, name, PORTS[name], log)
                try:
                    for mode in ("full", "resumed"):
                        us, cps = run(PORTS[name], proc.pid, args.connections, mode == "resumed")
                        results[(kind, mode, name)] = us
                        print(f"{kind} {mode:8} {name:9} {us:7.1f} us/connection  ({cps:.0f} conn/s)",
                              flush=True)
                finally:
                    compare.stop([proc])
        finally:
            compare.stop([upstream])
    names = [n for n in cmds if not args.only or n in args.only]
    print(f"\nServer CPU per new TLS 1.3 connection + one request ({args.connections} connections "
          f"each; one worker; microseconds)\n")
    print("| per connection | " + " | ".join(names) + (" | tollgate / nginx |" if
                                                         {"tollgate", "nginx"} <= set(names) else " |"))
    print("|---|" + "---:|" * (len(names) + ({"tollgate", "nginx"} <= set(names))))
    for kind in ("ecdsa", "rsa"):
        for mode in ("full", "resumed"):
            row = [f"{results[(kind, mode, n)]:.0f}" for n in names]
            if {"tollgate", "nginx"} <= set(names):
                row.append(f"{results[(kind, mode, 'tollgate')] / results[(kind, mode, 'nginx')]:.2f}")
            label = {"ecdsa": "ECDSA P-256", "rsa": "RSA-2048"}[kind]
            print(f"| {label}, {mode} | " + " | ".join(row) + " |")
    if not args.only or "tollgate" in args.only:
        hybrid_price(args, d, log)
    subprocess.run(["rm", "-rf", d])


if __name__ == "__main__":
    main()
