#!/usr/bin/env python3
"""Name the guest (wasm) code in a callgrind dump of tollgate.

Callgrind cannot name code wasmtime compiled at run time: it shows it as bare addresses
(`0x00000000053bae2f`). Started with TOLLGATE_WASM_PERFMAP=1, tollgate writes
/tmp/perf-PID.map (start, size, name of every compiled wasm function); this script adds the
dump's cost at those addresses up per wasm function, optionally minus a second dump (the
same run's route without the plugin), per request:

    TOLLGATE_WASM_PERFMAP=1 benches/plugins.py --callgrind --skip-wrk --requests 300 \\
        --tollgate target/profiling/tollgate --keep DIR
    benches/wasm_symbols.py DIR/cg.rl.out --requests 300 [--top 40]

(the perf map is found from the dump's PID; --map gives it explicitly).
"""
import argparse
import bisect
import re
import subprocess


def costs(dump):
    """Exclusive cost by function name, from callgrind_annotate."""
    out = subprocess.run(
        ["callgrind_annotate", "--auto=no", "--threshold=100", dump],
        capture_output=True, text=True, check=True).stdout
    d = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(.*)$", line)
        if m:
            d[m.group(2)] = d.get(m.group(2), 0) + int(m.group(1).replace(",", ""))
    total = d.pop("PROGRAM TOTALS", 0)
    # thread entry points carry the inclusive total: not a function's own cost
    return {k: v for k, v in d.items() if v < total / 2}, total


def perfmap(path):
    spans = []
    with open(path) as f:
        for line in f:
            start, size, name = line.rstrip("\n").split(" ", 2)
            spans.append((int(start, 16), int(size, 16), name))
    spans.sort()
    return spans


def name_of(addr, spans, starts):
    i = bisect.bisect_right(starts, addr) - 1
    if i >= 0 and addr < spans[i][0] + spans[i][1]:
        return spans[i][2]
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dump")
    ap.add_argument("--map", help="the perf map (default: /tmp/perf-PID.map of the dump's PID)")
    ap.add_argument("--requests", type=int, default=1, help="divide by this many requests")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    if args.map is None:
        with open(args.dump, errors="replace") as f:
            head = f.read(4096)
        pid = re.search(r"^pid: (\d+)", head, re.M) or re.search(r"PID (\d+)", head)
        if not pid:
            raise SystemExit("no PID in the dump: give --map")
        args.map = f"/tmp/perf-{pid.group(1)}.map"
    spans = perfmap(args.map)
    starts = [s for s, _, _ in spans]
    by_fn, total = costs(args.dump)
    wasm = {}
    unnamed = 0
    for k, v in by_fn.items():
        m = re.match(r"(?:\S*:)?0x([0-9a-f]+)", k)
        if not m:
            continue
        n = name_of(int(m.group(1), 16), spans, starts)
        if n is None:
            unnamed += v
            continue
        wasm[n] = wasm.get(n, 0) + v
    r = args.requests
    print(f"guest code: {sum(wasm.values()) / r:,.0f} instructions per request "
          f"(of {total / r:,.0f}); at addresses the map does not name: {unnamed / r:,.0f}")
    for n, v in sorted(wasm.items(), key=lambda x: -x[1])[: args.top]:
        print(f"{v / r:9,.0f}  {n[:160]}")


if __name__ == "__main__":
    main()
