#!/usr/bin/env python3
"""User-space instructions per proxied HTTPS request: tollgate, the bare pingora floor, nginx
and HAProxy, HTTP/1.1 and HTTP/2, in one run (callgrind; exact from run to run).

Each proxy runs one worker under valgrind's callgrind and proxies to one nginx upstream
answering 1 KiB (the upstream is not measured). After a warm-up the counters are zeroed, then
h2load sends N/4 requests and the counters are dumped, then N requests and dumped again: the
difference of the two totals over the difference of the request counts is the cost of one
request, with connection set-up (TCP and TLS handshakes) cancelled out.

    scripts/install-deps bench
    cargo build --profile profiling --bin tollgate --bench pingora_floor
    benches/instructions.py [--requests 4000] [--profile profiling]

The fat-LTO release build (--profile release) gives the numbers to record. Traffic goes to
127.0.0.1 only; every run is bounded by --requests.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

ROOT = compare.ROOT
UP = compare.UP
PORTS = {"tollgate": 18443, "pingora floor": 18446, "nginx": 18444, "haproxy": 18445}


def floor_binary(profile):
    """The newest pingora_floor executable built with `profile`."""
    return compare.newest_binary("pingora_floor",
                                 "release" if profile in ("release", "bench") else profile)


def dump_total(pid, d, before):
    """Dump callgrind's counters (which zeroes them) and return the dump's total."""
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
    end = time.time() + 60
    while time.time() < end:
        new = sorted(set(os.listdir(d)) - before)
        new = [f for f in new if f.startswith("cg.out.")]
        if new:
            path = f"{d}/{new[-1]}"
            time.sleep(0.3)
            for _ in range(50):
                totals = [line for line in open(path) if line.startswith("totals:")]
                if totals:
                    return int(totals[0].split()[1]), new[-1]
                time.sleep(0.2)
        time.sleep(0.2)
    sys.exit("callgrind did not write a dump")


def h2load(port, n, h2):
    args = ["h2load", "-n", str(n), "-c", "4"]
    args += ["-m", "8"] if h2 else ["--h1", "-m", "1"]
    out = subprocess.run(args + [f"https://127.0.0.1:{port}/"], capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0 or f"{n} succeeded" not in out.stdout:
        sys.exit(f"h2load to {port} failed:\n{out.stdout}\n{out.stderr}")


def measure(name, cmd, port, d, n):
    cgdir = f"{d}/cg-{port}"
    os.makedirs(cgdir)
    log = open(f"{cgdir}/log", "w")
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--smc-check=all-non-file",
                             f"--callgrind-out-file={cgdir}/cg.out"] + cmd, stdout=log, stderr=log)
    result = {}
    try:
        compare.wait_port(port, proc, f"{name} under callgrind", timeout=180)
        for proto, h2 in (("h1", False), ("h2", True)):
            h2load(port, max(n // 10, 50), h2)  # warm-up: TLS, upstream connections
            before = set(os.listdir(cgdir))
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True,
                           capture_output=True)
            h2load(port, n // 4, h2)
            t1, f1 = dump_total(proc.pid, cgdir, before)
            h2load(port, n, h2)
            t2, _ = dump_total(proc.pid, cgdir, before | {f1})
            result[proto] = (t2 - t1) / (n - n // 4)
            print(f"{name} {proto}: {result[proto]:.0f} instructions per request", file=sys.stderr)
    finally:
        compare.stop([proc])
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--profile", default="profiling", help="cargo profile of the binaries")
    ap.add_argument("--only", action="append", help="measure only these proxies")
    ap.add_argument("--route", default="",
                    help="TOML lines added to tollgate's one route (to measure what a route "
                         "feature costs: run once without and once with)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the callgrind dumps (for callgrind_annotate) and print where")
    args = ap.parse_args()
    for tool in ("nginx", "haproxy", "h2load", "valgrind", "callgrind_control"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run scripts/install-deps bench")
    tdir = "release" if args.profile in ("release", "bench") else args.profile
    tollgate = f"{ROOT}/target/{tdir}/tollgate"
    floor = floor_binary(args.profile)
    wants_floor = not args.only or "pingora floor" in args.only
    if not os.path.exists(tollgate) or (wants_floor and not floor):
        sys.exit(f"build first: cargo build --profile {args.profile} --bin tollgate --bench pingora_floor")

    d = tempfile.mkdtemp(prefix="tollgate-instr-")
    subprocess.run([tollgate, "cert", "dev", "bench.local", "127.0.0.1", "--dir", d],
                   check=True, capture_output=True)
    cert, key = f"{d}/bench.local.crt", f"{d}/bench.local.key"
    up_conf, ng_conf, ha_conf, tg_conf = compare.configs(d, cert, key)
    if args.route:
        tg = open(tg_conf).read()
        assert 'pool = "up"\n[pool.up]' in tg
        compare.write(tg_conf, tg.replace('pool = "up"\n[pool.up]',
                                          f'pool = "up"\n{args.route}\n[pool.up]'))
    # one process for nginx under valgrind
    ng = open(ng_conf).read().replace("daemon off;", "daemon off; master_process off;")
    compare.write(ng_conf, ng)
    log = open(f"{d}/upstream.log", "w")
    upstream = compare.start(["nginx", "-p", d, "-e", f"{d}/upstream.err", "-c", up_conf], 1,
                             "upstream nginx", UP, log)
    cmds = {
        "tollgate": [tollgate, "run", "--config", tg_conf],
        "pingora floor": [floor, f"127.0.0.1:{PORTS['pingora floor']}", f"127.0.0.1:{UP}", cert, key],
        "nginx": ["nginx", "-p", d, "-e", f"{d}/nginx.err", "-c", ng_conf],
        "haproxy": ["haproxy", "-db", "-f", ha_conf],
    }
    results = {}
    try:
        for name, cmd in cmds.items():
            if args.only and name not in args.only:
                continue
            results[name] = measure(name, cmd, PORTS[name], d, args.requests)
    finally:
        compare.stop([upstream])
    print(f"\nUser-space instructions per proxied HTTPS request (callgrind; 1 KiB responses; "
          f"{args.requests} requests; h2load 4 connections, HTTP/2 with 8 streams each; "
          f"{args.profile} profile)\n")
    print("| proxy | HTTP/1.1 | HTTP/2 |")
    print("|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['h1'] / 1000:.1f}k | {r['h2'] / 1000:.1f}k |")
    if "tollgate" in results and "pingora floor" in results:
        t, f = results["tollgate"], results["pingora floor"]
        print(f"\ntollgate over the pingora floor: HTTP/1.1 {100 * (t['h1'] / f['h1'] - 1):.0f}%, "
              f"HTTP/2 {100 * (t['h2'] / f['h2'] - 1):.0f}%")
    if "tollgate" in results and "nginx" in results:
        t, g = results["tollgate"], results["nginx"]
        print(f"tollgate / nginx: HTTP/1.1 {t['h1'] / g['h1']:.2f}x, HTTP/2 {t['h2'] / g['h2']:.2f}x")
    if args.keep:
        print(f"callgrind dumps kept in {d}/cg-*/ (the last dump of each is N requests)")
    else:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
