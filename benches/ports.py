#!/usr/bin/env python3
"""Service ports side by side: tollgate `[[port]]` vs HAProxy `mode tcp` vs nginx `stream`,
one worker each pinned to CPU 0, in one run; load generators and backends on CPU 1.

  TCP throughput   iperf3 (one stream, --seconds) through each proxy to one iperf3 server:
                   bytes/s the receiver counted.
  new conns/s      wrk with `Connection: close` (every request a new TCP connection through
                   the proxy) to an nginx answering 16 bytes: connections/s.
  UDP packets/s    iperf3 -u (64-byte datagrams, unlimited rate) through tollgate and nginx
                   stream (HAProxy has no UDP): datagrams/s the receiver counted, and loss.

    scripts/install-deps bench     # + iperf3 and nginx's stream module
    cargo build --release --bin tollgate
    benches/ports.py [--seconds 5] [--rounds 2]

Target (issue #23): tollgate >= 0.9x the better of HAProxy and nginx. Traffic goes to
127.0.0.1 only; every run is bounded by --seconds.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

ROOT = compare.ROOT
IPERF, WEB = 18290, 18291
# per proxy: (tcp port to iperf3, tcp port to the web backend)
PORTS = {"tollgate": (18301, 18302), "haproxy": (18311, 18312), "nginx": (18321, 18322)}
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def configs(d):
    tg, ha, ng = PORTS["tollgate"], PORTS["haproxy"], PORTS["nginx"]
    web = compare.write(f"{d}/web.conf", f"""
worker_processes 1; daemon off; pid {d}/web.pid; error_log {d}/web.err warn;
events {{ worker_connections 8192; }}
http {{ access_log off; client_body_temp_path {d}/cb; proxy_temp_path {d}/px;
  fastcgi_temp_path {d}/fc; uwsgi_temp_path {d}/uw; scgi_temp_path {d}/sc;
  server {{ listen 127.0.0.1:{WEB} backlog=4096;
    location / {{ default_type text/plain; return 200 "0123456789abcde\\n"; }} }} }}
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
[limits]
max_connections = 100000
max_connections_per_ip = 100000
connection_rate_per_ip = 0.0
[[port]]
name = "iperf"
address = "127.0.0.1:{tg[0]}"
pool = "iperf"
[[port]]
name = "iperf-udp"
address = "127.0.0.1:{tg[0]}"
protocol = "udp"
pool = "iperf"
[[port]]
name = "web"
address = "127.0.0.1:{tg[1]}"
pool = "web"
[pool.iperf]
backends = ["127.0.0.1:{IPERF}"]
[pool.web]
backends = ["127.0.0.1:{WEB}"]
""")
    haproxy = compare.write(f"{d}/haproxy.cfg", f"""
global
  nbthread 1
  maxconn 9000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen iperf
  bind 127.0.0.1:{ha[0]}
  server s1 127.0.0.1:{IPERF}
listen web
  bind 127.0.0.1:{ha[1]}
  server s1 127.0.0.1:{WEB}
""")
    nginx = compare.write(f"{d}/nginx.conf", f"""
load_module {STREAM_MODULE};
worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/nginx.err warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 9000; }}
stream {{
  server {{ listen 127.0.0.1:{ng[0]}; proxy_pass 127.0.0.1:{IPERF}; }}
  server {{ listen 127.0.0.1:{ng[0]} udp; proxy_pass 127.0.0.1:{IPERF}; proxy_timeout 30s; }}
  server {{ listen 127.0.0.1:{ng[1]} backlog=4096; proxy_pass 127.0.0.1:{WEB}; }}
}}
""")
    return web, tollgate, haproxy, nginx


def iperf(port, secs, udp=False):
    args = ["taskset", "-c", "1", "iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(secs),
            "-J"]
    if udp:
        args += ["-u", "-b", "0", "-l", "64"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=secs + 30)
    try:
        j = json.loads(out.stdout)
    except json.JSONDecodeError:
        sys.exit(f"iperf3 to {port} failed:\n{out.stdout}\n{out.stderr}")
    if "error" in j:
        sys.exit(f"iperf3 to {port}: {j['error']}")
    if udp:
        s = j["end"]["sum"]
        # datagrams the server received per second
        received = s["packets"] - s["lost_packets"]
        return received / s["seconds"], s["lost_percent"]
    return j["end"]["sum_received"]["bits_per_second"] / 8, 0.0


def new_conns(port, secs):
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", "-c32", f"-d{secs}s", "-H", "Connection: close",
         f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=secs + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Socket errors: (.*)", out)
    return rps, errors.group(1) if errors else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    for tool in ("nginx", "haproxy", "iperf3", "wrk", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run scripts/install-deps bench")
    if not os.path.exists(STREAM_MODULE):
        sys.exit("nginx's stream module is missing: run scripts/install-deps bench")
    tollgate = f"{ROOT}/target/release/tollgate"
    if not os.path.exists(tollgate):
        sys.exit("build first: cargo build --release --bin tollgate")
    d = tempfile.mkdtemp(prefix="tollgate-ports-")
    for sub in ("cb", "px", "fc", "uw", "sc"):
        os.makedirs(f"{d}/{sub}")
    web_conf, tg_conf, ha_conf, ng_conf = configs(d)
    log = open(f"{d}/backends.log", "w")
    backends = [
        compare.start(["iperf3", "-s", "-p", str(IPERF)], 1, "iperf3 server", IPERF, log),
        compare.start(["nginx", "-p", d, "-e", f"{d}/web.err", "-c", web_conf], 1, "web", WEB,
                      log),
    ]
    cmds = {
        "tollgate": [tollgate, "run", "--config", tg_conf],
        "haproxy": ["haproxy", "-db", "-f", ha_conf],
        "nginx": ["nginx", "-p", d, "-e", f"{d}/nginx.err", "-c", ng_conf],
    }
    results = {n: {"tcp": [], "conns": [], "udp": [], "loss": []} for n in cmds}
    try:
        for r in range(args.rounds):
            order = list(cmds) if r % 2 == 0 else list(reversed(cmds))
            for name in order:
                proc = compare.start(cmds[name], 0, name, PORTS[name][1], open(f"{d}/{name}.log", "a"))
                try:
                    time.sleep(0.5)
                    iperf(PORTS[name][0], 1)  # warm-up
                    bps, _ = iperf(PORTS[name][0], args.seconds)
                    results[name]["tcp"].append(bps)
                    time.sleep(1)  # iperf3's server takes one test at a time
                    cps, errs = new_conns(PORTS[name][1], args.seconds)
                    results[name]["conns"].append(cps)
                    if name != "haproxy":
                        time.sleep(1)
                        pps, loss = iperf(PORTS[name][0], args.seconds, udp=True)
                        results[name]["udp"].append(pps)
                        results[name]["loss"].append(loss)
                    else:
                        pps, loss = None, None
                    print(f"round {r + 1} {name}: {bps / 1e9:.2f} GB/s, {cps:.0f} conns/s"
                          + (f", {pps:.0f} datagrams/s ({loss:.1f}% lost)" if pps else "")
                          + (f" [socket errors: {errs}]" if errs else ""), file=sys.stderr)
                finally:
                    compare.stop([proc])
                    time.sleep(1)
    finally:
        compare.stop(backends)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    m = {n: {k: mean(v) for k, v in r.items()} for n, r in results.items()}
    print(f"\nService ports, one worker each, {args.rounds} rounds x {args.seconds} s (means)\n")
    print("| proxy | TCP GB/s (iperf3) | new conns/s (wrk, close) | UDP datagrams/s (64 B) | UDP lost |")
    print("|---|---:|---:|---:|---:|")
    for n in cmds:
        udp = f"{m[n]['udp']:.0f} | {m[n]['loss']:.1f}%" if results[n]["udp"] else "— | —"
        print(f"| {n} | {m[n]['tcp'] / 1e9:.2f} | {m[n]['conns']:.0f} | {udp} |")
    best_tcp = max(m["haproxy"]["tcp"], m["nginx"]["tcp"])
    best_conns = max(m["haproxy"]["conns"], m["nginx"]["conns"])
    print(f"\ntollgate / the better of HAProxy and nginx: TCP throughput "
          f"{m['tollgate']['tcp'] / best_tcp:.2f}, new conns/s {m['tollgate']['conns'] / best_conns:.2f}, "
          f"UDP datagrams/s (vs nginx) {m['tollgate']['udp'] / max(m['nginx']['udp'], 1):.2f}")
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
