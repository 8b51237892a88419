#!/usr/bin/env python3
"""Backend protocols side by side: tollgate and nginx proxying HTTPS clients to an upstream
over plain HTTP/1.1, over TLS (`https` pool / nginx `proxy_pass https://`) and over h2c
(`h2c` pool / nginx `grpc_pass grpc://`), in one run. For each: user-space instructions per
request (callgrind; exact from run to run) and req/s (h2load, not under valgrind).

One upstream nginx serves the same 1 KiB answer on three ports: plain HTTP/1.1, HTTP/1.1
over TLS (the bench certificate, which both proxies verify), and h2c. Each proxy runs one
worker, access logs off, upstream keep-alive on (nginx: `keepalive 128`; tollgate: its
pool). Clients are h2load over HTTPS: HTTP/1.1 (4 connections) for the http1 and https
pools, HTTP/2 (4 connections x 8 streams) for the h2c pool, since gRPC clients speak HTTP/2.

    scripts/install-deps bench
    cargo build --release --bin tollgate
    benches/backends.py [--requests 4000] [--seconds 8] [--profile release]

Traffic goes to 127.0.0.1 only; every run is bounded by --requests and --seconds.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
import instructions  # noqa: E402

ROOT = compare.ROOT
BODY = compare.BODY
UP_H1, UP_TLS, UP_H2C = 18180, 18181, 18182
PORTS = {"tollgate": 18443, "nginx": 18444}
# (what the client sends, the path that selects the upstream protocol, HTTP/2 client)
CASES = [("http1", "/h1", False), ("https", "/tls", False), ("h2c", "/h2c", True)]


def configs(d, cert, key):
    temps = "".join(f"{s}_temp_path {d}/{s};\n" for s in
                    ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    for s in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        os.makedirs(f"{d}/{s}", exist_ok=True)
    answer = f'location / {{ default_type text/plain; return 200 "{BODY.strip()}\\n"; }}'
    upstream = compare.write(f"{d}/upstream.conf", f"""
worker_processes 1; daemon off; pid {d}/upstream.pid; error_log {d}/upstream.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; {temps}
  http2_max_requests 1000000; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{UP_H1}; {answer} }}
  server {{ listen 127.0.0.1:{UP_TLS} ssl; ssl_certificate {cert}; ssl_certificate_key {key};
    {answer} }}
  server {{ listen 127.0.0.1:{UP_H2C} http2; {answer} }} }}
""")
    nginx = compare.write(f"{d}/nginx.conf", f"""
worker_processes 1; daemon off; master_process off; pid {d}/nginx.pid;
error_log {d}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; {temps}
  upstream h1 {{ server 127.0.0.1:{UP_H1}; keepalive 128; keepalive_requests 1000000; }}
  upstream tls {{ server 127.0.0.1:{UP_TLS}; keepalive 128; keepalive_requests 1000000; }}
  upstream h2c {{ server 127.0.0.1:{UP_H2C}; keepalive 128; keepalive_requests 1000000; }}
  server {{ listen 127.0.0.1:{PORTS['nginx']} ssl http2; keepalive_requests 1000000;
    http2_max_requests 1000000;
    ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.2 TLSv1.3;
    proxy_http_version 1.1; proxy_set_header Connection "";
    proxy_set_header Host $host; proxy_set_header X-Forwarded-For $remote_addr;
    location /h1 {{ proxy_pass http://h1; }}
    location /tls {{ proxy_pass https://tls; proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {cert}; proxy_ssl_name bench.local;
      proxy_ssl_server_name on; proxy_ssl_session_reuse on; }}
    location /h2c {{ grpc_pass grpc://h2c; grpc_set_header X-Forwarded-For $remote_addr; }}
  }} }}
""")
    tollgate = compare.write(f"{d}/tollgate.toml", f"""
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
address = "127.0.0.1:{PORTS['tollgate']}"
tls = true
[[vhost]]
default = true
cert = "{cert}"
key = "{key}"
redirect_https = false
[[vhost.route]]
path = "/h1"
pool = "h1"
[[vhost.route]]
path = "/tls"
pool = "tls"
[[vhost.route]]
path = "/h2c"
pool = "h2c"
[pool.h1]
backends = ["127.0.0.1:{UP_H1}"]
[pool.tls]
backends = ["127.0.0.1:{UP_TLS}"]
protocol = "https"
tls = {{ ca = "{cert}", server_name = "bench.local" }}
[pool.h2c]
backends = ["127.0.0.1:{UP_H2C}"]
protocol = "h2c"
""")
    return upstream, nginx, tollgate


def h2load(port, path, n=None, secs=None, h2=False):
    """Run h2load against `path`; the req/s it reports. Fails on any failed request."""
    args = ["taskset", "-c", "1", "h2load", "-c", "4"]
    args += ["-m", "8"] if h2 else ["--h1", "-m", "1"]
    args += ["-n", str(n)] if n else ["-D", str(secs)]
    out = subprocess.run(args + [f"https://127.0.0.1:{port}{path}"], capture_output=True,
                         text=True, timeout=600)
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed",
                  out.stdout)
    if out.returncode != 0 or not m or int(m.group(2)) != 0 or int(m.group(1)) == 0:
        sys.exit(f"h2load to {port}{path} failed:\n{out.stdout}\n{out.stderr}")
    codes = re.search(r"status codes: (\d+) 2xx", out.stdout)
    if not codes or int(codes.group(1)) != int(m.group(1)):
        sys.exit(f"h2load to {port}{path}: not every answer was 2xx:\n{out.stdout}")
    return float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out.stdout).group(1))


def instructions_per_request(name, cmd, port, d, n):
    """callgrind: (total after n/4 requests) and (after n more), per case."""
    cgdir = f"{d}/cg-{name}"
    os.makedirs(cgdir)
    log = open(f"{cgdir}/log", "w")
    proc = subprocess.Popen(["taskset", "-c", "0", "valgrind", "--tool=callgrind",
                             "--smc-check=all-non-file", f"--callgrind-out-file={cgdir}/cg.out"]
                            + cmd, stdout=log, stderr=log)
    result = {}
    try:
        compare.wait_port(port, proc, f"{name} under callgrind", timeout=180)
        for case, path, h2 in CASES:
            h2load(port, path, n=max(n // 10, 50), h2=h2)  # warm-up: TLS, upstream conns
            before = set(os.listdir(cgdir))
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True,
                           capture_output=True)
            h2load(port, path, n=n // 4, h2=h2)
            t1, f1 = instructions.dump_total(proc.pid, cgdir, before)
            h2load(port, path, n=n, h2=h2)
            t2, _ = instructions.dump_total(proc.pid, cgdir, before | {f1})
            result[case] = (t2 - t1) / (n - n // 4)
            print(f"{name} {case}: {result[case]:.0f} instructions per request", file=sys.stderr)
    finally:
        compare.stop([proc])
    return result


def throughput(name, cmd, port, secs):
    log = open(os.devnull, "w")
    proc = compare.start(cmd, 0, name, port, log)
    result = {}
    try:
        for case, path, h2 in CASES:
            h2load(port, path, secs=2, h2=h2)  # warm-up
            result[case] = h2load(port, path, secs=secs, h2=h2)
            print(f"{name} {case}: {result[case]:.0f} req/s", file=sys.stderr)
    finally:
        compare.stop([proc])
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--profile", default="release", help="cargo profile of tollgate")
    args = ap.parse_args()
    for tool in ("nginx", "h2load", "valgrind", "callgrind_control", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run scripts/install-deps bench")
    tdir = "release" if args.profile in ("release", "bench") else args.profile
    tollgate = f"{ROOT}/target/{tdir}/tollgate"
    if not os.path.exists(tollgate):
        sys.exit(f"build first: cargo build --profile {args.profile} --bin tollgate")
    d = tempfile.mkdtemp(prefix="tollgate-backends-")
    subprocess.run([tollgate, "cert", "dev", "bench.local", "127.0.0.1", "--dir", d],
                   check=True, capture_output=True)
    cert, key = f"{d}/bench.local.crt", f"{d}/bench.local.key"
    up_conf, ng_conf, tg_conf = configs(d, cert, key)
    check = subprocess.run([tollgate, "check", "--config", tg_conf], capture_output=True,
                           text=True)
    if check.returncode != 0:
        sys.exit(f"tollgate check failed:\n{check.stdout}{check.stderr}")
    upstream = compare.start(["nginx", "-p", d, "-e", f"{d}/upstream.err", "-c", up_conf], 1,
                             "upstream nginx", UP_TLS, open(f"{d}/upstream.log", "w"))
    cmds = {
        "tollgate": [tollgate, "run", "--config", tg_conf],
        "nginx": ["nginx", "-p", d, "-e", f"{d}/nginx.err", "-c", ng_conf],
    }
    instr, rps = {}, {}
    try:
        for name, cmd in cmds.items():
            rps[name] = throughput(name, cmd, PORTS[name], args.seconds)
        for name, cmd in cmds.items():
            instr[name] = instructions_per_request(name, cmd, PORTS[name], d, args.requests)
    finally:
        compare.stop([upstream])
    print(f"\nBackend protocols: HTTPS clients (h2load; HTTP/1.1 4 conns for http1/https, "
          f"HTTP/2 4x8 streams for h2c), 1 KiB answers, one worker each; instructions per "
          f"request from callgrind over {args.requests} requests, req/s over {args.seconds} s\n")
    print("| upstream | tollgate instr/req | nginx instr/req | ratio | tollgate req/s | "
          "nginx req/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    label = {"http1": "HTTP/1.1 (proxy_pass http://)", "https": "TLS (proxy_pass https://)",
             "h2c": "h2c (grpc_pass grpc://)"}
    for case, _, _ in CASES:
        t, g = instr["tollgate"][case], instr["nginx"][case]
        tr, gr = rps["tollgate"][case], rps["nginx"][case]
        print(f"| {label[case]} | {t / 1000:.1f}k | {g / 1000:.1f}k | {t / g:.2f} | "
              f"{tr:.0f} | {gr:.0f} | {tr / gr:.2f} |")
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
