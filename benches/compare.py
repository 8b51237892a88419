#!/usr/bin/env python3
"""Side-by-side HTTPS reverse-proxy benchmark: tollgate vs nginx vs HAProxy.

All three terminate TLS with the same certificate, run one worker pinned to CPU 0, and proxy
to the same upstream (an nginx answering a fixed 1 KiB body) over HTTP/1.1 keep-alive.
The upstream and the load generators run pinned to CPU 1. Each proxy is driven with
wrk (HTTP/1.1 keep-alive) and h2load (HTTP/2) in the same run; rounds alternate the order.

    scripts/install-deps bench && cargo build --release && benches/compare.py

Prints a Markdown table of req/s, p50 and p99, and the ratios tollgate/nginx and
tollgate/HAProxy. Traffic goes to 127.0.0.1 only.
"""
import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UP, TG, NG, HA = 18080, 18443, 18444, 18445
TG_ADMIN = 18449
BODY = "x" * 1023 + "\n"


def newest_binary(name, profile_dir="*"):
    """The newest executable of the cargo target `name` (a bench) under target/PROFILE_DIR."""
    import glob
    found = [p for p in glob.glob(f"{ROOT}/target/{profile_dir}/deps/{name}-*")
             if os.access(p, os.X_OK) and not p.endswith(".d")]
    return max(found, key=os.path.getmtime) if found else None


def wait_port(port, proc, name, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            sys.exit(f"{name} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{name} did not listen on {port}")


def start(cmd, cpu, name, port, log):
    proc = subprocess.Popen(["taskset", "-c", str(cpu)] + cmd, stdout=log, stderr=log)
    wait_port(port, proc, name)
    return proc


def stop(procs):
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def configs(d, cert, key):
    pem = write(f"{d}/bench.pem", open(cert).read() + open(key).read())
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        os.makedirs(f"{d}/{sub}", exist_ok=True)
    temps = "".join(f"{s}_temp_path {d}/{s2};\n" for s, s2 in
                    [("client_body", "client_body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"),
                     ("uwsgi", "uwsgi"), ("scgi", "scgi")])
    upstream = write(f"{d}/upstream.conf", f"""
worker_processes 1; daemon off; pid {d}/upstream.pid; error_log {d}/upstream.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; {temps}
  server {{ listen 127.0.0.1:{UP}; keepalive_requests 1000000;
    location / {{ default_type text/plain; return 200 "{BODY.strip()}\\n"; }} }} }}
""")
    nginx = write(f"{d}/nginx.conf", f"""
worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; {temps}
  upstream up {{ server 127.0.0.1:{UP}; keepalive 128; keepalive_requests 1000000; }}
  server {{ listen 127.0.0.1:{NG} ssl http2; keepalive_requests 1000000;
    ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $host; proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto https; }} }} }}
""")
    haproxy = write(f"{d}/haproxy.cfg", f"""
global
  nbthread 1
  maxconn 4000
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:{HA} ssl crt {pem} alpn h2,http/1.1
  option forwardfor
  default_backend be
backend be
  http-reuse always
  server s1 127.0.0.1:{UP}
""")
    tollgate = write(f"{d}/tollgate.toml", f"""
[server]
threads = 1
# the default for threads = 1, written out: one single-threaded runtime
work_stealing = false
watch_config = false
[admin]
# loopback, no token: read once after each run for the upstream connections opened
address = "127.0.0.1:{TG_ADMIN}"
[log]
access_log = false
level = "warn"
[[listener]]
address = "127.0.0.1:{TG}"
tls = true
[[vhost]]
default = true
cert = "{cert}"
key = "{key}"
redirect_https = false
[[vhost.route]]
path = "/"
pool = "up"
[pool.up]
backends = ["127.0.0.1:{UP}"]
""")
    return upstream, nginx, haproxy, tollgate


def to_ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(port, secs, conns):
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--latency",
         f"https://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {p: to_ms(v, u) for p, v, u in re.findall(r"\s(50|99)%\s+([\d.]+)(us|ms|s)\b", out)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50": lat["50"], "p99": lat["99"],
            "errors": (int(errors.group(1)) if errors else 0), "socket": sock.group(1) if sock else ""}


def run_h2load(port, secs, conns, streams, d):
    log = f"{d}/h2load-{port}.log"
    out = subprocess.run(
        ["taskset", "-c", "1", "h2load", f"-c{conns}", f"-m{streams}", "-D", str(secs),
         "--log-file", log, f"https://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
    durs = sorted(int(line.split("\t")[2]) for line in open(log) if line.count("\t") >= 2)
    pct = lambda q: durs[min(len(durs) - 1, int(q * len(durs)))] / 1000.0
    return {"rps": rps, "p50": pct(0.50), "p99": pct(0.99), "errors": int(m.group(2)) if m else -1}


def upstream_connects():
    """New connections tollgate has opened to the upstream (its connect-time histogram's count)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{TG_ADMIN}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r'^tollgate_upstream_connect_duration_seconds_count\{pool="up"\} (\d+)$', text, re.M)
    return int(m.group(1)) if m else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10, help="duration of each measurement")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; each alternates the order")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections")
    ap.add_argument("--h2-connections", type=int, default=16)
    ap.add_argument("--h2-streams", type=int, default=16, help="concurrent streams per h2 connection")
    ap.add_argument("--tollgate", default=f"{ROOT}/target/release/tollgate")
    args = ap.parse_args()
    for tool in ("nginx", "haproxy", "wrk", "h2load", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run scripts/install-deps bench")
    if not os.path.exists(args.tollgate):
        sys.exit(f"{args.tollgate} is missing: run cargo build --release")

    d = tempfile.mkdtemp(prefix="tollgate-bench-")
    subprocess.run([args.tollgate, "cert", "dev", "bench.local", "127.0.0.1", "--dir", d],
                   check=True, capture_output=True)
    cert, key = f"{d}/bench.local.crt", f"{d}/bench.local.key"
    up_conf, ng_conf, ha_conf, tg_conf = configs(d, cert, key)
    log = open(f"{d}/servers.log", "w")
    procs = [start(["nginx", "-p", d, "-e", f"{d}/upstream.err", "-c", up_conf], 1, "upstream nginx", UP, log)]
    proxies = {
        "tollgate": (TG, lambda: start([args.tollgate, "run", "--config", tg_conf], 0, "tollgate", TG, log)),
        "nginx": (NG, lambda: start(["nginx", "-p", d, "-e", f"{d}/nginx.err", "-c", ng_conf], 0, "nginx", NG, log)),
        "haproxy": (HA, lambda: start(["haproxy", "-db", "-f", ha_conf], 0, "haproxy", HA, log)),
    }
    results = {(p, proto): [] for p in proxies for proto in ("h1", "h2")}
    # the keep-alive pool must not be the limit: new upstream connections per measured run
    opened = {"h1": [], "h2": []}
    try:
        for name, (port, launch) in proxies.items():
            procs.append(launch())
        order = list(proxies)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                port = proxies[name][0]
                run_wrk(port, 2, args.connections)  # warm-up: TLS sessions, upstream pools
                c0 = upstream_connects() if name == "tollgate" else 0
                results[(name, "h1")].append(run_wrk(port, args.seconds, args.connections))
                c1 = upstream_connects() if name == "tollgate" else 0
                results[(name, "h2")].append(
                    run_h2load(port, args.seconds, args.h2_connections, args.h2_streams, d))
                if name == "tollgate":
                    opened["h1"].append(c1 - c0)
                    opened["h2"].append(upstream_connects() - c1)
                print(f"round {r + 1}: {name} done", file=sys.stderr)
    finally:
        stop(procs)

    def mean(name, proto, key):
        return statistics.mean(x[key] for x in results[(name, proto)])

    print(f"\nHTTPS reverse proxy, 1 worker each on CPU 0; upstream and load on CPU 1; "
          f"{args.rounds} rounds x {args.seconds}s; 1 KiB responses\n")
    print("| protocol | proxy | req/s | p50 ms | p99 ms | failed |")
    print("|---|---|---:|---:|---:|---:|")
    for proto, label in (("h1", f"HTTP/1.1 keep-alive (wrk, {args.connections} conns)"),
                         ("h2", f"HTTP/2 (h2load, {args.h2_connections} conns x {args.h2_streams} streams)")):
        for name in proxies:
            fails = sum(x["errors"] for x in results[(name, proto)])
            print(f"| {label} | {name} | {mean(name, proto, 'rps'):.0f} | {mean(name, proto, 'p50'):.2f} "
                  f"| {mean(name, proto, 'p99'):.2f} | {fails} |")
    print("\n| protocol | tollgate/nginx req/s | tollgate/HAProxy req/s | tollgate/nginx p99 | tollgate/HAProxy p99 |")
    print("|---|---:|---:|---:|---:|")
    for proto in ("h1", "h2"):
        t = mean("tollgate", proto, "rps")
        print(f"| {proto} | {t / mean('nginx', proto, 'rps'):.2f} | {t / mean('haproxy', proto, 'rps'):.2f} "
              f"| {mean('tollgate', proto, 'p99') / mean('nginx', proto, 'p99'):.2f} "
              f"| {mean('tollgate', proto, 'p99') / mean('haproxy', proto, 'p99'):.2f} |")
    for proto in ("h1", "h2"):
        reqs = sum(x["rps"] * args.seconds for x in results[("tollgate", proto)])
        print(f"\ntollgate {proto}: {sum(opened[proto])} new upstream connections for "
              f"~{reqs:.0f} requests (keep-alive reuse; the pool is not the limit when this "
              f"stays near the number of requests in flight)", end="")
    print()
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
