#!/usr/bin/env python3
"""Convergence: tollgate's Consul watch vs the consul-template + nginx reload loop, same run.

A real Consul dev agent, four upstream instances (one nginx answering with the instance's
name on four ports), tollgate with a pool `consul = { service = "web" }`, and nginx whose
upstream file is rendered by a faithful consul-template stand-in (consul-template is not
packaged here): a blocking query on the same /v1/health/service/web?passing endpoint, render
the upstream block, `nginx -s reload`, repeat (consul-template's default: no quiescence).

Then CHANGES registration / deregistration / health-check flips (instance u0 always stays, so
no pool ever empties). The clock starts when the Consul write is sent. Each proxy then has
its own prober process, which sends rounds of 12 simultaneous requests until one round is
answered by exactly the expected set of instances; that time is the convergence. wrk load
runs against both proxies throughout and its failures are counted. Each side has its own
CPU, as it would have its own machine (tollgate, its load and prober on one; nginx, its
reloads, the template loop, its load and prober on the other; `--no-pin` to share both).
tollgate's config exempts loopback from its per-IP connection rate (`limits.allow`): the
probe opens thousands of connections a second from 127.0.0.1.

    scripts/install-deps bench && scripts/install-consul && cargo build --release
    benches/consul_convergence.py [--changes 200] [--quiescence-min 10ms] [--no-pin]

CONV_TRACE=FILE appends each change's send time and both convergence times to FILE and keeps
the run's directory (servers.log has tollgate's own timestamps; run with TOLLGATE_LOG=info).

Loopback only.
"""
import argparse
import json
import multiprocessing
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSUL, TG, NG, UPS, ADMIN = 18700, 18780, 18781, [18790, 18791, 18792, 18793], 18799


def free(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT from a previous run is fine
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_port(port, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


def consul(method, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{CONSUL}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read(), r.headers.get("X-Consul-Index")


def register(i):
    consul("PUT", "/v1/agent/service/register", {
        "ID": f"web-{i}", "Name": "web", "Address": "127.0.0.1", "Port": UPS[i],
        "Check": {"CheckID": f"check-web-{i}", "TTL": "30m", "Status": "passing"}})


def ask(port):
    """One request through the proxy: the instance that answered, or None."""
    try:
        s = socket.create_connection(("127.0.0.1", port), 1)
        s.sendall(b"GET / HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        if data.startswith(b"HTTP/1.1 200"):
            return data.split(b"\r\n\r\n", 1)[-1].strip().decode()
    except OSError:
        pass
    return None


def probe(port, n=12):
    """The set of instances answering n requests through the proxy."""
    return {r for r in (ask(port) for _ in range(n)) if r is not None}


def ask_many(port, n):
    """n requests through the proxy at once (n connections, sent together): the instances
    that answered, None for each failure."""
    sel = selectors.DefaultSelector()
    out = []
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), 1)
            s.sendall(b"GET / HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, bytearray())
        except OSError:
            out.append(None)
    end = time.time() + 2
    while sel.get_map() and time.time() < end:
        for key, _ in sel.select(timeout=0.5):
            try:
                chunk = key.fileobj.recv(4096)
            except OSError:
                chunk = b""
                key.data.clear()
            if chunk:
                key.data.extend(chunk)
                continue
            sel.unregister(key.fileobj)
            key.fileobj.close()
            data = bytes(key.data)
            ok = data.startswith(b"HTTP/1.1 200")
            out.append(data.split(b"\r\n\r\n", 1)[-1].strip().decode() if ok else None)
    for key in list(sel.get_map().values()):
        key.fileobj.close()
        out.append(None)
    return out


def converge_time(port, expected, t0, n=12, limit=15):
    """Seconds from t0 until a round of n simultaneous requests, all sent after t0, is
    answered by exactly the expected instances (None if that never happens), and each round's
    duration in ms. Simultaneous requests keep the probe's own lag small (one round trip under
    load, not twelve) and cannot fall into step with the load's requests the way
    one-at-a-time requests can under round robin."""
    rounds = []
    while time.time() - t0 < limit:
        start = time.time()
        answers = ask_many(port, n)
        end = time.time()
        rounds.append((end - start) * 1000)
        if set(answers) == expected:
            return end - t0, rounds
    return None, rounds


def prober(port, conn, cpu):
    """One proxy's prober, in its own process (a daemon: it ends with the benchmark): two
    probers in one Python process would share its interpreter lock, and each one's rounds
    would wait for the other's."""
    pin(cpu)
    while True:
        expected, t0 = conn.recv()
        conn.send(converge_time(port, set(expected), t0))


def pin(cpu):
    """Keep this process (and the threads and processes it starts) on one CPU; None: anywhere."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def on(cpu, argv):
    return argv if cpu is None else ["taskset", "-c", str(cpu)] + argv


def template_loop(d, stop, reloads):
    """consul-template's loop, faithfully: block, render, reload."""
    index = 1
    last = None
    while not stop.is_set():
        try:
            body, idx = consul("GET", f"/v1/health/service/web?passing=1&index={index}&wait=5s")
        except Exception:
            time.sleep(0.2)
            index = 1
            continue
        new = int(idx or 0)
        index = 1 if new < index else max(new, 1)
        servers = sorted(f"{e['Service']['Address'] or e['Node']['Address']}:{e['Service']['Port']}"
                         for e in json.loads(body))
        if servers == last:
            continue
        last = servers
        lines = "".join(f"  server {s};\n" for s in servers) or "  server 127.0.0.1:1 down;\n"
        with open(f"{d}/upstream.conf.tmp", "w") as f:
            f.write(f"upstream web {{\n{lines}  keepalive 32;\n}}\n")
        os.replace(f"{d}/upstream.conf.tmp", f"{d}/upstream.conf")
        subprocess.run(["nginx", "-p", d, "-e", f"{d}/nginx.err", "-c", f"{d}/nginx.conf", "-s", "reload"],
                       check=False, capture_output=True)
        reloads.append(time.time())


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--tollgate", default=f"{ROOT}/target/release/tollgate")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--quiescence-min", default=None,
                    help="tollgate's consul.quiescence_min (default: tollgate's own default)")
    ap.add_argument("--cached", choices=["true", "false"], default="true",
                    help="tollgate's consul.cached (the agent cache)")
    ap.add_argument("--no-pin", action="store_true",
                    help="let both sides share both CPUs (default: each side on its own CPU)")
    args = ap.parse_args()
    # Each side on its own CPU, as each would be on its own machine: tollgate, its load and
    # its prober on CPU 0; nginx (master, workers, the reloads), the template loop, its load
    # and its prober on CPU 1. Unpinned, each reload's fork, exec and config parse land on
    # the CPU tollgate is converging on. Consul and the upstreams are shared.
    pins = (None, None) if args.no_pin or len(os.sched_getaffinity(0)) < 2 else tuple(sorted(os.sched_getaffinity(0))[:2])
    tg_cpu, ng_cpu = pins
    for tool in ("nginx", "wrk", "consul"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: scripts/install-deps bench && scripts/install-consul")
    for p in [CONSUL, TG, NG, ADMIN] + UPS:
        if not free(p):
            sys.exit(f"port {p} is busy")
    random.seed(args.seed)
    d = tempfile.mkdtemp(prefix="tollgate-conv-")
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        os.makedirs(f"{d}/{sub}", exist_ok=True)
    temps = "".join(f"{s}_temp_path {d}/{s};\n" for s in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    servers = "".join(f"server {{ listen 127.0.0.1:{p}; location / {{ return 200 \"u{i}\\n\"; }} }}\n"
                      for i, p in enumerate(UPS))
    with open(f"{d}/ups.conf", "w") as f:
        f.write(f"worker_processes 1; daemon off; pid {d}/ups.pid; error_log {d}/ups.err warn;\n"
                f"events {{ worker_connections 2048; }}\nhttp {{ access_log off; {temps} {servers} }}\n")
    with open(f"{d}/upstream.conf", "w") as f:
        f.write("upstream web {\n  server 127.0.0.1:1 down;\n}\n")
    with open(f"{d}/nginx.conf", "w") as f:
        f.write(f"worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/nginx.err warn;\n"
                f"events {{ worker_connections 2048; }}\nhttp {{ access_log off; {temps}\n"
                f"include {d}/upstream.conf;\n"
                f"server {{ listen 127.0.0.1:{NG}; location / {{ proxy_pass http://web; proxy_http_version 1.1;"
                f" proxy_set_header Connection \"\"; }} }} }}\n")
    with open(f"{d}/tollgate.toml", "w") as f:
        f.write(f"[server]\nthreads = 1\n[log]\naccess_log = false\nlevel = \"warn\"\n"
                f"[admin]\naddress = \"127.0.0.1:{ADMIN}\"\n"
                # the probe opens a few thousand connections a second from loopback: exempt it
                # from the per-IP connection rate, which would otherwise refuse most of them
                f"[limits]\nallow = [\"127.0.0.1\"]\n"
                f"[consul]\naddress = \"http://127.0.0.1:{CONSUL}\"\nstate_file = \"\"\ncached = {args.cached}\n"
                + (f"quiescence_min = \"{args.quiescence_min}\"\n" if args.quiescence_min else "")
                + f"[[listener]]\naddress = \"127.0.0.1:{TG}\"\n"
                f"[[vhost]]\ndefault = true\n[[vhost.route]]\npath = \"/\"\npool = \"web\"\n"
                f"[pool.web]\nconsul = {{ service = \"web\" }}\n")
    log = open(f"{d}/servers.log", "w")
    procs = []
    wrk = []
    stop = threading.Event()
    try:
        procs.append(subprocess.Popen(
            ["consul", "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1", "-http-port", str(CONSUL),
             "-dns-port", "-1", "-grpc-port", "-1", "-serf-lan-port", "18711", "-serf-wan-port", "18712",
             "-server-port", "18710", "-log-level=warn"], stdout=log, stderr=log))
        wait_port(CONSUL)
        while True:
            try:
                if len(consul("GET", "/v1/status/leader")[0]) > 4:
                    break
            except Exception:
                pass
            time.sleep(0.1)
        procs.append(subprocess.Popen(["nginx", "-p", d, "-e", f"{d}/ups.err", "-c", f"{d}/ups.conf"], stdout=log, stderr=log))
        for p in UPS:
            wait_port(p)
        procs.append(subprocess.Popen(on(ng_cpu, ["nginx", "-p", d, "-e", f"{d}/nginx.err", "-c", f"{d}/nginx.conf"]),
                                      stdout=log, stderr=log))
        wait_port(NG)
        procs.append(subprocess.Popen(on(tg_cpu, [args.tollgate, "run", "--config", f"{d}/tollgate.toml"]),
                                      stdout=log, stderr=log))
        wait_port(TG)
        # the probers are forked before this process starts any thread
        fork = multiprocessing.get_context("fork")
        probers = {}
        for name, port, cpu in (("tollgate", TG, tg_cpu), ("nginx", NG, ng_cpu)):
            probers[name], there = fork.Pipe()
            fork.Process(target=prober, args=(port, there, cpu), daemon=True).start()
        pin(ng_cpu)  # the template loop's thread, and the reloads it runs
        reloads = []
        threading.Thread(target=template_loop, args=(d, stop, reloads), daemon=True).start()

        register(0)
        expected = {"u0"}
        for port in (TG, NG):
            end = time.time() + 20
            while probe(port) != expected:
                if time.time() > end:
                    sys.exit(f"the proxy on {port} never routed to u0")
                time.sleep(0.05)

        # load on both during all changes
        wrk += [subprocess.Popen(on(cpu, ["wrk", "-t1", "-c4", "-d600s", f"http://127.0.0.1:{port}/", "-H", "Host: web.test"]),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for port, cpu in ((TG, tg_cpu), (NG, ng_cpu))]
        state = {1: "absent", 2: "absent", 3: "absent"}
        conv = {"tollgate": [], "nginx": []}
        round_ms = {"tollgate": [], "nginx": []}
        for n in range(args.changes):
            i = random.choice([1, 2, 3])
            s = state[i]
            t0 = time.time()  # from the moment the write is sent
            if s == "absent":
                register(i); state[i] = "passing"; op = "register"
            elif s == "passing":
                if random.random() < 0.5:
                    consul("PUT", f"/v1/agent/check/fail/check-web-{i}"); state[i] = "critical"; op = "fail"
                else:
                    consul("PUT", f"/v1/agent/service/deregister/web-{i}"); state[i] = "absent"; op = "deregister"
            else:
                consul("PUT", f"/v1/agent/check/pass/check-web-{i}"); state[i] = "passing"; op = "pass"
            expected = {"u0"} | {f"u{k}" for k, v in state.items() if v == "passing"}
            for conn in probers.values():
                conn.send((sorted(expected), t0))
            done = {}
            for name, conn in probers.items():
                t, rounds = conn.recv()
                if t is None:
                    port = TG if name == "tollgate" else NG
                    if name == "tollgate":
                        print(urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/pools").read().decode())
                    sys.exit(f"change {n} ({op} u{i}): {name} did not converge in 15 s: "
                             f"expected {sorted(expected)}, it routes to {sorted(probe(port))}")
                conv[name].append(t)
                round_ms[name].extend(rounds)
                done[name] = t
            if os.environ.get("CONV_TRACE"):
                with open(os.environ["CONV_TRACE"], "a") as tf:
                    tf.write(f"{t0:.6f} {op} {done['tollgate'] * 1000:.2f} {done['nginx'] * 1000:.2f}\n")
        for w in wrk:
            w.send_signal(signal.SIGINT)  # wrk prints its summary on SIGINT
        outs = [w.communicate()[0] for w in wrk]
    finally:
        stop.set()
        for p in procs + [w for w in wrk if w.poll() is None]:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for pidf in ("nginx.pid", "ups.pid"):
            try:
                os.kill(int(open(f"{d}/{pidf}").read()), 15)
            except Exception:
                pass

    def failures(out):
        import re
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        reqs = re.search(r"(\d+) requests in", out)
        return (int(reqs.group(1)) if reqs else 0,
                (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0))

    print(f"\nConsul convergence, {args.changes} changes (register / deregister / check fail / check pass), "
          f"probe = rounds of 12 simultaneous requests, load = wrk 4 connections on each proxy\n")
    print("| proxy | p50 ms | p99 ms | max ms | requests under load | failed |")
    print("|---|---:|---:|---:|---:|---:|")
    for (name, label), out in zip((("tollgate", "tollgate (Consul watch)"), ("nginx", "nginx + consul-template loop")), outs):
        c = [x * 1000 for x in conv[name]]
        reqs, failed = failures(out)
        print(f"| {label} | {pct(c, .5):.1f} | {pct(c, .99):.1f} | {max(c):.1f} | {reqs} | {failed} |")
    t50, n50 = pct(conv["tollgate"], .5), pct(conv["nginx"], .5)
    t99, n99 = pct(conv["tollgate"], .99), pct(conv["nginx"], .99)
    print(f"\nnginx/tollgate convergence: p50 {n50 / t50:.1f}x, p99 {n99 / t99:.1f}x; nginx reloads: {len(reloads)}")
    print("(times include the probe's own resolution, one round of 12 simultaneous requests: "
          f"round p50 tollgate {pct(round_ms['tollgate'], .5):.1f} ms, nginx {pct(round_ms['nginx'], .5):.1f} ms; "
          "each proxy is probed by its own process)")
    if not os.environ.get("CONV_TRACE"):
        shutil.rmtree(d, ignore_errors=True)
    else:
        print(f"kept {d}")


if __name__ == "__main__":
    main()
