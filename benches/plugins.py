#!/usr/bin/env python3
"""What proxy-wasm plugins cost on the request path, measured side by side in one run.

One tollgate (one worker pinned to CPU 0, HTTPS, access log off) with four routes to the
same upstream (an nginx answering a fixed 1 KiB body, CPU 1):

    /none       no plugin
    /noop       a no-op plugin in WAT (only `proxy_on_request_headers`): the host's own cost
    /rl         ratelimit (a budget so large nothing is refused: the cost of the check)
    /rl-hs256   ratelimit + auth (JWT, HS256)
    /rl-rs256   ratelimit + auth (JWT, RS256, 2048-bit key)

Each route is driven with wrk (HTTP/1.1 keep-alive, CPU 1) sending a valid bearer token, at
64 connections (throughput) and at 1 connection (the latency a request gains); rounds
alternate the order. Prints req/s, p50 and p99 per route and the ratios to /none.

    scripts/install-deps bench && cargo build --release && plugins/build && benches/plugins.py

Wall-clock numbers on a shared 2-core VM move by ±20% from run to run. `--callgrind` adds
the deterministic measure: tollgate under valgrind's callgrind, counters zeroed after a
warm-up, then the instructions tollgate executes for exactly `--requests` requests per
route (curl, HTTP/1.1 keep-alive), reported per request and as a ratio to /none.

Traffic goes to 127.0.0.1 only.
"""
import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (the upstream, process helpers)

ROOT = compare.ROOT
TG = 18460
ROUTES = ["/none", "/noop", "/rl", "/rl-hs256", "/rl-rs256"]
NOOP_WAT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "noop.wat")
HS_SECRET = "bench secret for hs256, at least 32 bytes long"


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def token(alg, key_file=None):
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    claims = {"sub": "bench", "exp": int(time.time()) + 86400, "iss": "bench", "aud": "api"}
    signed = f"{header}.{b64url(json.dumps(claims).encode())}"
    if alg == "HS256":
        sig = hmac.new(HS_SECRET.encode(), signed.encode(), hashlib.sha256).digest()
    else:
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key_file],
                             input=signed.encode(), capture_output=True, check=True).stdout
    return f"{signed}.{b64url(sig)}"


def tollgate_conf(d, cert, key, rs_pub):
    rl = f'"{ROOT}/plugins/dist/ratelimit.wasm"'
    noop = NOOP_WAT
    auth = f'"{ROOT}/plugins/dist/auth.wasm"'
    pem = json.dumps(open(rs_pub).read())
    routes = "".join(f'[[vhost.route]]\npath = "{p}"\npool = "up"\nplugins = {plugins}\n'
                     for p, plugins in [("/none", "[]"), ("/noop", '["noop"]'), ("/rl", '["rl"]'),
                                        ("/rl-hs256", '["rl", "jwt-hs"]'),
                                        ("/rl-rs256", '["rl", "jwt-rs"]')])
    return compare.write(f"{d}/plugins.toml", f"""
[server]
threads = 1
work_stealing = false
watch_config = false
[admin]
enabled = false
[log]
access_log = false
level = "warn"
[[listener]]
address = "127.0.0.1:{TG}"
tls = true
[plugin.noop]
file = "{noop}"
[plugin.rl]
file = {rl}
config = {{ rate = 1000000000, burst = 1000000000 }}
[plugin.jwt-hs]
file = {auth}
config = {{ jwt = {{ hs256_secret = "{HS_SECRET}", issuer = "bench", audience = "api", claims_to_headers = {{ sub = "x-user" }} }} }}
[plugin.jwt-rs]
file = {auth}
config = {{ jwt = {{ rs256_keys = [{pem}], issuer = "bench", audience = "api", claims_to_headers = {{ sub = "x-user" }} }} }}
[[vhost]]
default = true
cert = "{cert}"
key = "{key}"
redirect_https = false
{routes}
[pool.up]
backends = ["127.0.0.1:{compare.UP}"]
""")


def run_wrk(path, secs, conns, bearer):
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--latency",
         "-H", f"Authorization: Bearer {bearer}", f"https://127.0.0.1:{TG}{path}"],
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {p: compare.to_ms(v, u) for p, v, u in re.findall(r"\s(50|99)%\s+([\d.]+)(us|ms|s)\b", out)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": lat["50"], "p99": lat["99"], "errors": int(errors.group(1)) if errors else 0}


def callgrind_counts(tollgate, conf, tokens, d, n, keep=None):
    """Instructions per request per route, tollgate under callgrind."""
    log = open(f"{d}/callgrind.log", "w")
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--smc-check=all-non-file",
                             f"--callgrind-out-file={d}/cg.out", tollgate, "run", "--config", conf],
                            stdout=log, stderr=log)
    try:
        compare.wait_port(TG, proc, "tollgate under callgrind", timeout=120)
        counts = {}

        def curl(path, spec):
            subprocess.run(["curl", "-sk", "--http1.1", "-o", "/dev/null", "-H",
                            f"Authorization: Bearer {tokens[path]}",
                            f"https://127.0.0.1:{TG}{path}?{spec}"], check=True)
        # warm-up of every route before any is measured (instances, caches, and the
        # process's own first-use costs, which would otherwise land on the first route)
        for path in ROUTES:
            curl(path, "w=[1-30]")
        for path in ROUTES:
            curl(path, "w=[1-5]")
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
            curl(path, f"i=[1-{n}]")
            before = set(os.listdir(d))
            subprocess.run(["callgrind_control", "--dump=x", str(proc.pid)], check=True, capture_output=True)
            end = time.time() + 30
            dump = None
            while dump is None and time.time() < end:
                new = [f for f in set(os.listdir(d)) - before if f.startswith("cg.out.")]
                dump = new[0] if new else None
                time.sleep(0.2)
            time.sleep(0.5)  # let the dump finish writing
            totals = [line for line in open(f"{d}/{dump}") if line.startswith("totals:")]
            counts[path] = int(totals[0].split()[1]) / n
            if keep:
                os.makedirs(keep, exist_ok=True)
                shutil.copy(f"{d}/{dump}", f"{keep}/cg{path.replace('/', '.')}.out")
            print(f"callgrind: {path} done", file=sys.stderr)
        return counts
    finally:
        compare.stop([proc])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--tollgate", default=f"{ROOT}/target/release/tollgate")
    ap.add_argument("--callgrind", action="store_true", help="also count instructions per request")
    ap.add_argument("--requests", type=int, default=500, help="requests per route under callgrind")
    ap.add_argument("--skip-wrk", action="store_true", help="only the callgrind counts")
    ap.add_argument("--keep", help="copy each route's callgrind dump here (cg.<route>.out), for callgrind_annotate")
    args = ap.parse_args()
    for tool in ("nginx", "wrk", "taskset", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run scripts/install-deps bench")
    for f in (args.tollgate, f"{ROOT}/plugins/dist/ratelimit.wasm", f"{ROOT}/plugins/dist/auth.wasm"):
        if not os.path.exists(f):
            sys.exit(f"{f} is missing: run cargo build --release and plugins/build")

    d = tempfile.mkdtemp(prefix="tollgate-plugin-bench-")
    subprocess.run([args.tollgate, "cert", "dev", "bench.local", "127.0.0.1", "--dir", d],
                   check=True, capture_output=True)
    cert, key = f"{d}/bench.local.crt", f"{d}/bench.local.key"
    up_conf = compare.configs(d, cert, key)[0]
    fixtures = f"{ROOT}/tests/fixtures"
    conf = tollgate_conf(d, cert, key, f"{fixtures}/jwt-rs256-test-only.pub")
    tokens = {"/none": token("HS256"), "/noop": token("HS256"), "/rl": token("HS256"), "/rl-hs256": token("HS256"),
              "/rl-rs256": token("RS256", f"{fixtures}/jwt-rs256-test-only.key")}
    log = open(f"{d}/servers.log", "w")
    procs = [compare.start(["nginx", "-p", d, "-e", f"{d}/upstream.err", "-c", up_conf], 1,
                           "upstream nginx", compare.UP, log)]
    results = {r: [] for r in ROUTES}
    # one connection: the added latency per request, without queueing behind other requests
    lat = {r: [] for r in ROUTES}
    counts = None
    if args.callgrind:
        for tool in ("valgrind", "callgrind_control", "curl"):
            if not shutil.which(tool):
                sys.exit(f"{tool} is missing (apt-get install valgrind curl)")
        try:
            counts = callgrind_counts(args.tollgate, conf, tokens, d, args.requests, args.keep)
        except BaseException:
            compare.stop(procs)
            raise
    if args.skip_wrk:
        compare.stop(procs)
        print_counts(counts, args.requests)
        return
    try:
        procs.append(compare.start([args.tollgate, "run", "--config", conf], 0, "tollgate", TG, log))
        for r in range(args.rounds):
            for path in (ROUTES if r % 2 == 0 else ROUTES[::-1]):
                run_wrk(path, 2, args.connections, tokens[path])  # warm-up
                results[path].append(run_wrk(path, args.seconds, args.connections, tokens[path]))
                lat[path].append(run_wrk(path, max(2, args.seconds // 2), 1, tokens[path]))
                print(f"round {r + 1}: {path} done", file=sys.stderr)
    finally:
        compare.stop(procs)

    def mean(path, k):
        return statistics.mean(x[k] for x in results[path])

    base = {k: mean("/none", k) for k in ("rps", "p50", "p99")}
    print(f"\ntollgate, 1 worker on CPU 0, HTTPS + HTTP/1.1 keep-alive (wrk, {args.connections} conns, "
          f"CPU 1); {args.rounds} rounds x {args.seconds}s; 1 KiB responses\n")
    print("| route | plugins | req/s | p50 ms | p99 ms | non-2xx | req/s vs none | p50 added µs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    names = {"/none": "none", "/noop": "no-op (WAT)", "/rl": "ratelimit", "/rl-hs256": "ratelimit + auth JWT HS256",
             "/rl-rs256": "ratelimit + auth JWT RS256"}
    for path in ROUTES:
        fails = sum(x["errors"] for x in results[path])
        print(f"| `{path}` | {names[path]} | {mean(path, 'rps'):.0f} | {mean(path, 'p50'):.3f} | "
              f"{mean(path, 'p99'):.3f} | {fails} | {mean(path, 'rps') / base['rps']:.3f} | "
              f"{(mean(path, 'p50') - base['p50']) * 1000:.0f} |")
    lat_base = statistics.mean(x["p50"] for x in lat["/none"])
    print("\nOne connection (latency):\n")
    print("| route | p50 ms | p99 ms | p50 added µs |")
    print("|---|---:|---:|---:|")
    for path in ROUTES:
        p50 = statistics.mean(x["p50"] for x in lat[path])
        p99 = statistics.mean(x["p99"] for x in lat[path])
        print(f"| `{path}` | {p50:.3f} | {p99:.3f} | {(p50 - lat_base) * 1000:.0f} |")
    print_counts(counts, args.requests)
    shutil.rmtree(d, ignore_errors=True)


def print_counts(counts, n):
    if not counts:
        return
    base = counts["/none"]
    print(f"\nInstructions per request (callgrind, {n} requests per route, HTTP/1.1 keep-alive):\n")
    print("| route | instructions / request | added | vs /none | req/s if CPU-bound, vs /none |")
    print("|---|---:|---:|---:|---:|")
    for path in ROUTES:
        c = counts[path]
        print(f"| `{path}` | {c:,.0f} | {c - base:,.0f} | {c / base:.3f} | {base / c:.3f} |")


if __name__ == "__main__":
    main()
