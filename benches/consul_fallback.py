#!/usr/bin/env python3
"""Consul's fallback mode at scale: many services past consul.max_blocking, checks flipping.

A real Consul dev agent holds SERVICES services of 3 instances each, every one with a TTL
check and a `tollgate.route=sN.test/` tag, so tollgate (release build, tag routes on) has a
pool per service: far more than max_blocking (128), so it watches through the fallback (two
blocking queries on /v1/health/state/any and /v1/catalog/services, then reads). A relay
between tollgate and the agent counts every request tollgate sends. Then RATE check flips a
second for SECONDS (fail or pass one instance of a service not flipped in the last 10 s) and
each flip's convergence is timed: from the Consul write until tollgate's /explain for that
service's host shows the pool with (or without) the instance. Reported: the agent's request
rate by endpoint during the churn, and convergence p50 / p99 / max.

    scripts/install-consul && cargo build --release --bin tollgate
    benches/consul_fallback.py [--services 5000] [--rate 20] [--seconds 30]

Loopback only; the churn is bounded by --seconds, every probe by 10 s.
"""
import argparse
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
from consul_convergence import wait_port  # noqa: E402

ROOT = compare.ROOT
HTTP, LAN, WAN, SERVER, RELAY, ADMIN, LISTEN = 18860, 18861, 18862, 18863, 18864, 18865, 18866
INSTANCE_PORTS = [18867, 18868, 18869]  # nothing listens: only the pools are measured


class Relay:
    """A TCP relay to the agent that counts the HTTP requests passing through, by path."""

    def __init__(self, listen, target):
        self.counts, self.lock, self.target = {}, threading.Lock(), target
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", listen))
        self.sock.listen(256)
        threading.Thread(target=self.accept, daemon=True).start()

    def snapshot(self):
        with self.lock:
            return dict(self.counts)

    def accept(self):
        while True:
            client, _ = self.sock.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self.pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self.pipe, args=(upstream, client, False), daemon=True).start()

    def pipe(self, src, dst, count):
        pending = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if count:
                    pending = (pending + data)[-4096:]
                    while b"\r\n" in pending:
                        line, pending = pending.split(b"\r\n", 1)
                        if line[:4] in (b"GET ", b"PUT "):
                            path = line.split(b" ")[1].split(b"?")[0].decode()
                            kind = "/v1/health/service/*" if path.startswith("/v1/health/service/") else path
                            with self.lock:
                                self.counts[kind] = self.counts.get(kind, 0) + 1
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def agent(method, path, body=None, conn=None):
    c = conn or http.client.HTTPConnection("127.0.0.1", HTTP, timeout=30)
    c.request(method, path, body=json.dumps(body) if body is not None else None)
    r = c.getresponse()
    data = r.read()
    if r.status >= 300:
        sys.exit(f"{method} {path}: {r.status} {data[:200]!r}")
    return data


def register_all(services, threads=8):
    def work(part):
        conn = http.client.HTTPConnection("127.0.0.1", HTTP, timeout=30)
        for s in part:
            for i, port in enumerate(INSTANCE_PORTS):
                agent("PUT", "/v1/agent/service/register", {
                    "ID": f"s{s}-{i}", "Name": f"s{s}", "Address": "127.0.0.1", "Port": port,
                    "Tags": [f"tollgate.route=s{s}.test/"],
                    "Check": {"CheckID": f"check-s{s}-{i}", "TTL": "60m", "Status": "passing"}},
                    conn)
    parts = [list(range(services))[k::threads] for k in range(threads)]
    ts = [threading.Thread(target=work, args=(p,)) for p in parts]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def explain(service):
    c = http.client.HTTPConnection("127.0.0.1", ADMIN, timeout=5)
    c.request("GET", f"/explain?host=s{service}.test&path=/")
    j = json.loads(c.getresponse().read())
    return {b["address"] for b in j.get("pool", {}).get("backends", [])}


def pools_ready(services):
    c = http.client.HTTPConnection("127.0.0.1", ADMIN, timeout=30)
    c.request("GET", "/pools")
    pools = json.loads(c.getresponse().read())
    full = sum(1 for p in pools if p["name"].startswith("consul:s") and len(p["backends"]) == 3)
    return full >= services, full


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/tollgate"),
                    help="the tollgate to measure (default: the release build)")
    args = ap.parse_args()
    consul_bin = os.environ.get("CONSUL_BIN") or shutil.which("consul")
    tollgate = args.binary
    if not consul_bin or not os.access(tollgate, os.X_OK):
        sys.exit("needs consul (scripts/install-consul) and target/release/tollgate")
    work = tempfile.mkdtemp(prefix="tollgate-fallback-")
    procs = []
    try:
        procs.append(subprocess.Popen(
            [consul_bin, "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
             "-http-port", str(HTTP), "-serf-lan-port", str(LAN), "-serf-wan-port", str(WAN),
             "-server-port", str(SERVER), "-dns-port", "-1", "-grpc-port", "-1", "-log-level=warn"],
            stdout=open(os.path.join(work, "consul.log"), "w"), stderr=subprocess.STDOUT))
        wait_port(HTTP, 60)
        while len(agent("GET", "/v1/status/leader")) <= 4:
            time.sleep(0.2)
        t = time.time()
        register_all(args.services)
        print(f"registered {args.services} services x 3 instances in {time.time() - t:.1f} s",
              flush=True)
        relay = Relay(RELAY, HTTP)
        cfg = os.path.join(work, "tollgate.toml")
        with open(cfg, "w") as f:
            f.write(f"""[admin]
address = "127.0.0.1:{ADMIN}"
[log]
access_log = false
[consul]
address = "http://127.0.0.1:{RELAY}"
wait = "60s"
tag_routes = true
route_meta_prefix = ""
state_file = ""
[[listener]]
address = "127.0.0.1:{LISTEN}"
[[vhost]]
names = ["file.test"]
[[vhost.route]]
path = "/"
pool = "static"
[pool.static]
backends = ["127.0.0.1:{INSTANCE_PORTS[0]}"]
""")
        t = time.time()
        procs.append(subprocess.Popen([tollgate, "run", "--config", cfg],
                                      stdout=open(os.path.join(work, "tollgate.log"), "w"),
                                      stderr=subprocess.STDOUT))
        wait_port(ADMIN, 60)
        end = time.time() + 300
        while True:
            ok, full = pools_ready(args.services)
            if ok:
                break
            if time.time() > end:
                sys.exit(f"only {full} of {args.services} pools were full after 300 s")
            time.sleep(1)
        print(f"all {args.services} pools routed with 3 backends {time.time() - t:.1f} s after start",
              flush=True)
        time.sleep(3)  # the start-up reads settle

        # the churn
        results, lock = [], threading.Lock()
        failing, recent = set(), {}

        def probe(service, addr, present, written):
            end = written + 10
            while time.time() < end:
                if (addr in explain(service)) == present:
                    with lock:
                        results.append(time.time() - written)
                    return
                time.sleep(0.005)
            with lock:
                results.append(float("inf"))

        before = relay.snapshot()
        start = time.time()
        n = 0
        probes = []
        conn = http.client.HTTPConnection("127.0.0.1", HTTP, timeout=30)
        while time.time() - start < args.seconds:
            due = start + n / args.rate
            if due > time.time():
                time.sleep(due - time.time())
            service = random.randrange(args.services)
            if time.time() - recent.get(service, -100) < 10:
                continue
            recent[service] = time.time()
            i = random.randrange(3)
            key = (service, i)
            present = key in failing  # a failing instance passes again, a passing one fails
            written = time.time()
            agent("PUT", f"/v1/agent/check/{'pass' if present else 'fail'}/check-s{service}-{i}",
                  conn=conn)
            (failing.discard if present else failing.add)(key)
            th = threading.Thread(target=probe, daemon=True,
                                  args=(service, f"127.0.0.1:{INSTANCE_PORTS[i]}", present, written))
            th.start()
            probes.append(th)
            n += 1
        for th in probes:
            th.join(12)
        took = time.time() - start
        after = relay.snapshot()
        print(f"\n{n} check flips in {took:.1f} s ({n / took:.1f}/s) over {args.services} services "
              f"x 3 instances ({'fallback mode' if args.services > 128 else 'one watch each'}: "
              f"max_blocking 128)\n")
        print("| tollgate -> agent | requests | per second |")
        print("|---|---:|---:|")
        for k in sorted(set(before) | set(after)):
            d = after.get(k, 0) - before.get(k, 0)
            if d:
                print(f"| `{k}` | {d} | {d / took:.1f} |")
        total = sum(after.values()) - sum(before.values())
        print(f"| all | {total} | {total / took:.1f} |")
        ok = [r for r in results if r != float("inf")]
        print(f"\nconvergence (Consul write -> /explain shows it): p50 {pct(ok, 0.5) * 1000:.0f} ms, "
              f"p99 {pct(ok, 0.99) * 1000:.0f} ms, max {max(ok) * 1000:.0f} ms; "
              f"{len(results) - len(ok)} of {len(results)} not seen within 10 s")
    finally:
        compare.stop(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
