#!/usr/bin/env python3
"""Turns benches/run.sh's results.txt into the Markdown tables of BENCHMARKS.md.

Usage: summarize.py results.txt [machine.txt]
Medians over rounds; every ratio is bars-gateway / nginx from the same run.
"""
import statistics
import sys
from collections import defaultdict

GOALS = {  # mode: (minimum req/s ratio vs nginx with one worker, p99 must not exceed nginx's)
    "Get": (1.25, True),
    "Post": (1.0, False),
    "Connect": (1.1, False),
}
TITLES = {
    "Get": "keep-alive GET /metadata, full header set",
    "Post": "keep-alive POST /$process-message 35 KB, dedup, unique ids",
    "Connect": "new TLS 1.3 connection per request (full handshake, RSA-2048)",
}
LABELS = ["gateway", "nginx-1w", "nginx-auto"]


def parse(path):
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            row = {"kind": parts[0]}
            for p in parts[1:]:
                if "=" in p:
                    k, v = p.split("=", 1)
                    row[k] = v
            rows.append(row)
    return rows


def num(v, default=0.0):
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def fmt_ratio(a, b):
    return f"{a / b:.2f}" if b else "n/a"


def main():
    rows = parse(sys.argv[1])
    if len(sys.argv) > 2:
        with open(sys.argv[2]) as f:
            print("```")
            print(f.read().rstrip())
            print("```\n")

    runs = defaultdict(list)  # (mode, label) -> rows
    for r in rows:
        if r["kind"] == "RESULT" and r.get("mode") in GOALS:
            runs[(r["mode"], r["label"])].append(r)

    print("### Throughput and latency (median of rounds)\n")
    print("| test | metric | bars-gateway | nginx 1 worker | gateway / nginx-1w | goal | nginx auto (2) | gateway / nginx-auto |")
    print("|---|---|---:|---:|---:|---|---:|---:|")
    verdicts = []
    for mode, (goal, p99_rule) in GOALS.items():
        if not any((mode, l) in runs for l in LABELS):
            continue
        med = {}
        for l in LABELS:
            rs = runs.get((mode, l), [])
            med[l] = {
                k: statistics.median([num(r.get(k)) for r in rs]) if rs else 0.0
                for k in ["rps", "p50_ms", "p99_ms", "server_cpu_us_per_req", "errors", "non2xx"]
            }
        g, n1, na = med["gateway"], med["nginx-1w"], med["nginx-auto"]
        ratio = g["rps"] / n1["rps"] if n1["rps"] else 0.0
        met = ratio >= goal and (not p99_rule or g["p99_ms"] <= n1["p99_ms"])
        goal_text = f">= {goal}x" + (", p99 <= nginx" if p99_rule else "")
        verdicts.append((mode, met, ratio, goal, g, n1))
        title = TITLES[mode]
        print(f"| {title} | req/s | {g['rps']:.0f} | {n1['rps']:.0f} | **{ratio:.2f}** | {goal_text}: {'met' if met else 'NOT met'} | {na['rps']:.0f} | {fmt_ratio(g['rps'], na['rps'])} |")
        print(f"| | p50 ms | {g['p50_ms']:.2f} | {n1['p50_ms']:.2f} | {fmt_ratio(g['p50_ms'], n1['p50_ms'])} | | {na['p50_ms']:.2f} | {fmt_ratio(g['p50_ms'], na['p50_ms'])} |")
        print(f"| | p99 ms | {g['p99_ms']:.2f} | {n1['p99_ms']:.2f} | {fmt_ratio(g['p99_ms'], n1['p99_ms'])} | | {na['p99_ms']:.2f} | {fmt_ratio(g['p99_ms'], na['p99_ms'])} |")
        print(f"| | server CPU µs/req | {g['server_cpu_us_per_req']:.0f} | {n1['server_cpu_us_per_req']:.0f} | {fmt_ratio(g['server_cpu_us_per_req'], n1['server_cpu_us_per_req'])} | | {na['server_cpu_us_per_req']:.0f} | {fmt_ratio(g['server_cpu_us_per_req'], na['server_cpu_us_per_req'])} |")
        bad = [l for l in LABELS if med[l]["errors"] or med[l]["non2xx"]]
        if bad:
            print(f"| | errors / non-2xx | {g['errors']:.0f} / {g['non2xx']:.0f} | {n1['errors']:.0f} / {n1['non2xx']:.0f} | | | {na['errors']:.0f} / {na['non2xx']:.0f} | |")

    print("\n### Every round, A/B side by side (req/s, p99 ms)\n")
    print("| round | test | bars-gateway | nginx 1 worker | ratio | nginx auto | ratio |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    by_round = defaultdict(dict)
    for r in rows:
        if r["kind"] == "RESULT" and r.get("mode") in GOALS:
            by_round[(int(num(r.get("round"))), r["mode"])][r["label"]] = r
    for (rnd, mode), d in sorted(by_round.items(), key=lambda kv: (kv[0][0], list(GOALS).index(kv[0][1]))):
        cell = lambda l: f"{num(d[l]['rps']):.0f} ({num(d[l]['p99_ms']):.2f})" if l in d else "-"
        ratio = lambda l: fmt_ratio(num(d["gateway"]["rps"]), num(d[l]["rps"])) if l in d and "gateway" in d else "-"
        print(f"| {rnd} | {mode.lower()} | {cell('gateway')} | {cell('nginx-1w')} | {ratio('nginx-1w')} | {cell('nginx-auto')} | {ratio('nginx-auto')} |")

    variants = sorted({r["label"] for r in rows if r["kind"] == "RESULT" and r.get("label", "").startswith("gateway-")})
    if variants:
        print("\n### Gateway variants, same run (medians; same config, another build or environment)\n")
        print("| test | server | req/s | p99 ms | server CPU µs/req | req/s vs gateway | CPU vs gateway | req/s vs nginx-1w |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for mode in GOALS:
            base = runs.get((mode, "gateway"), [])
            n1 = runs.get((mode, "nginx-1w"), [])
            if not base:
                continue
            med = lambda rs, k: statistics.median([num(r.get(k)) for r in rs]) if rs else 0.0
            b_rps, b_cpu, n_rps = med(base, "rps"), med(base, "server_cpu_us_per_req"), med(n1, "rps")
            print(f"| {mode.lower()} | gateway | {b_rps:.0f} | {med(base, 'p99_ms'):.2f} | {b_cpu:.0f} | 1.00 | 1.00 | {fmt_ratio(b_rps, n_rps)} |")
            for v in variants:
                rs = runs.get((mode, v), [])
                if rs:
                    rps, cpu = med(rs, "rps"), med(rs, "server_cpu_us_per_req")
                    print(f"| | {v} | {rps:.0f} | {med(rs, 'p99_ms'):.2f} | {cpu:.0f} | {fmt_ratio(rps, b_rps)} | {fmt_ratio(cpu, b_cpu)} | {fmt_ratio(rps, n_rps)} |")

    busy = [num(r.get("machine_busy_pct")) for r in rows if r["kind"] == "RESULT" and "machine_busy_pct" in r]
    steal = [num(r.get("machine_steal_pct")) for r in rows if r["kind"] == "RESULT" and "machine_steal_pct" in r]
    client = [num(r.get("client_cpu_s")) / num(r.get("window_s"), 1.0) for r in rows if r["kind"] == "RESULT" and "client_cpu_s" in r]
    if busy:
        print(f"\nWhole machine during the measured windows: busy {min(busy):.0f}–{max(busy):.0f} % of both cores"
              f" (steal up to {max(steal):.1f} %); the load generator itself used {min(client):.2f}–{max(client):.2f} cores.")

    prof = [r for r in rows if r["kind"] == "PROFILE"]
    if prof:
        modes = []
        for r in prof:
            if r["mode"] not in modes:
                modes.append(r["mode"])
        buckets = []
        for r in prof:
            if r["bucket"] not in buckets and r["bucket"] != "total_sampled":
                buckets.append(r["bucket"])
        cell = {(r["mode"], r["bucket"]): num(r["pct"]) for r in prof}
        print("\n### Where the gateway's CPU goes (perf, % of its samples)\n")
        print("| bucket | " + " | ".join(modes) + " |")
        print("|---|" + "---:|" * len(modes))
        for b in buckets:
            print(f"| {b.replace('_', ' ')} | " + " | ".join(f"{cell.get((m, b), 0.0):.1f}" for m in modes) + " |")

    HOLD_CONNS_LABEL = "idle TLS connections"
    print("\n### Memory (VmRSS; nginx = master + workers)\n")
    print("| | bars-gateway | nginx 1 worker | nginx auto (2) |")
    print("|---|---:|---:|---:|")
    idle = {r["label"]: num(r["rss_kb"]) for r in rows if r["kind"] == "IDLE"}
    after = {r["label"]: num(r["rss_kb"]) for r in rows if r["kind"] == "AFTER"}
    hold = {r["label"]: r for r in rows if r["kind"] == "RESULT" and r.get("mode") == "Hold"}
    mb = lambda kb: f"{kb / 1024:.1f} MB"
    print("| idle, after start | " + " | ".join(mb(idle.get(l, 0)) for l in LABELS) + " |")
    if hold:
        print("| idle TLS connections held (alive / opened) | " + " | ".join(
            f"{hold[l].get('alive')} / {hold[l].get('opened')}" if l in hold else "-" for l in LABELS) + " |")
        print("| RSS with them held | " + " | ".join(
            mb(num(hold[l].get('rss_held_kb'))) if l in hold else "-" for l in LABELS) + " |")
        print("| per connection | " + " | ".join(
            f"{num(hold[l].get('kb_per_conn')):.1f} kB" if l in hold else "-" for l in LABELS) + " |")
    if after:
        print("| after the load rounds (gateway: incl. its dedup entries) | " + " | ".join(mb(after.get(l, 0)) for l in LABELS) + " |")
    for v in variants:
        if v in idle:
            print(f"| idle, after start: {v} | {mb(idle[v])} | | |")
        if v in hold:
            print(f"| {HOLD_CONNS_LABEL} held: {v} | {mb(num(hold[v].get('rss_held_kb')))} "
                  f"({num(hold[v].get('kb_per_conn')):.1f} kB/conn, {hold[v].get('alive')} alive) | | |")
    g_idle = idle.get("gateway", 0) / 1024
    print(f"\nIdle RSS goal (<= 13 MB): bars-gateway {g_idle:.1f} MB: {'met' if g_idle <= 13 else 'NOT met'}.")

    dm = [r for r in rows if r["kind"] == "RESULT" and "bytes_per_entry" in r]
    if dm:
        print("\n### Dedup memory store, 1M unique ids claimed then completed (RSS growth of the process)\n")
        print("| store | Location reference stored | entries held | RSS growth | bytes/entry | claim+complete ops/s | goal < 300 MB |")
        print("|---|---|---:|---:|---:|---:|---|")
        names = {"store": "MemoryStore (sharded map, FIFO eviction)",
                 "hashmap-fifo": "yardstick: one HashMap + FIFO queue, no expiry"}
        for r in dm:
            g = num(r["growth_mb"])
            v = r.get("variant", "store")
            verdict = ("met" if g < 300 else "NOT met") if v == "store" else ("would meet" if g < 300 else "would not meet")
            print(f"| {names.get(v, v)} | {r['reference']} | {r['held']} | {g:.0f} MB | {r['bytes_per_entry']} | {r['ops_per_s']} | {verdict} |")

    pol = [r for r in rows if r["kind"] == "POLICY"]
    if pol:
        print("\n### Policy check (HTTP status; 000 = refused in the TLS handshake)\n")
        print("| | proxy CN | other CN |")
        print("|---|---:|---:|")
        for r in pol:
            print(f"| {r['label']} | {r['proxy_cn']} | {r['wrong_cn']} |")

    with open(sys.argv[1]) as f:
        metrics = [l.split(None, 1)[1] for l in f if l.startswith("METRICS ") and len(l.split(None, 1)) > 1]
    if metrics:
        print("\nGateway counters after the run (a sanity check that dedup saw first sights only):\n")
        print("```")
        print(metrics[0].strip().replace(" bars_", "\nbars_"))
        print("```")

if __name__ == "__main__":
    main()
