#!/usr/bin/env python3
"""Turns benches/run.sh's results.txt into the Markdown tables of BENCHMARKS.md.

Usage: summarize.py results.txt [machine.txt]
Medians over rounds; every ratio is bars-gateway / a peer from the same run. The goals are
issue 18's: keep-alive GET at least haproxy's req/s, CPU per request and p99 at most nginx's
(one worker); POST 35 KB with dedup at least nginx's req/s and at most 1.2x its CPU per request;
handshakes/s ahead of every peer; per idle TLS connection at most nginx's memory; idle RSS at
most 13 MB.
"""
import statistics
import sys
from collections import defaultdict

MODES = ["Get", "Post", "Connect"]
TITLES = {
    "Get": "keep-alive GET /metadata, full header set",
    "Post": "keep-alive POST /$process-message 35 KB, dedup, unique ids",
    "Connect": "new TLS 1.3 connection per request (full handshake, RSA-2048)",
}
LABELS = ["gateway", "nginx-1w", "nginx-auto", "haproxy"]
NAMES = {"gateway": "bars-gateway", "nginx-1w": "nginx 1 worker", "nginx-auto": "nginx auto (2)",
         "haproxy": "haproxy (2 threads)", "direct": "backend directly (plain HTTP)"}
KEYS = ["rps", "p50_ms", "p99_ms", "server_cpu_us_per_req", "errors", "non2xx"]


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
        if r["kind"] == "RESULT" and r.get("mode") in MODES + ["Rate"]:
            runs[(r["mode"], r["label"])].append(r)
    labels = [l for l in LABELS if any((m, l) in runs for m in MODES)]

    def medians(mode, label):
        rs = runs.get((mode, label), [])
        return {k: statistics.median([num(r.get(k)) for r in rs]) if rs else 0.0 for k in KEYS}

    med = {(m, l): medians(m, l) for m in MODES for l in labels}
    print("### Throughput and latency (median of rounds)\n")
    print("| test | metric | " + " | ".join(NAMES[l] for l in labels) + " | gateway / nginx-1w | gateway / haproxy |")
    print("|---|---|" + "---:|" * (len(labels) + 2))
    rowfmt = {"rps": ("req/s", "{:.0f}"), "p50_ms": ("p50 ms", "{:.2f}"), "p99_ms": ("p99 ms", "{:.2f}"),
              "server_cpu_us_per_req": ("server CPU µs/req", "{:.0f}")}
    for mode in MODES:
        if not any((mode, l) in runs for l in labels):
            continue
        for i, (k, (name, f)) in enumerate(rowfmt.items()):
            cells = [f.format(med[(mode, l)][k]) for l in labels]
            g = med[(mode, "gateway")][k]
            r1 = fmt_ratio(g, med[(mode, "nginx-1w")][k]) if "nginx-1w" in labels else "-"
            rh = fmt_ratio(g, med[(mode, "haproxy")][k]) if "haproxy" in labels else "-"
            print(f"| {TITLES[mode] if i == 0 else ''} | {name} | " + " | ".join(cells) + f" | {r1} | {rh} |")
        bad = [l for l in labels if med[(mode, l)]["errors"] or med[(mode, l)]["non2xx"]]
        if bad:
            print("| | errors / non-2xx | " + " | ".join(
                f"{med[(mode, l)]['errors']:.0f} / {med[(mode, l)]['non2xx']:.0f}" for l in labels) + " | | |")

    rate = [r for r in rows if r["kind"] == "RESULT" and r.get("mode") == "Rate"]
    if rate:
        rate_labels = ["direct"] + [l for l in LABELS if ("Rate", l) in runs]
        target = rate[0].get("rate", "?")
        print(f"\n### Added latency at a fixed {target} req/s (open loop, GET /metadata, median of rounds)\n")
        print("Each proxy's latency minus the backend's when called directly, same rate, same run. The")
        print("latency counts from the time each request was due, so queueing behind a stall is included.\n")
        print("| | achieved req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | errors / non-2xx |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        base = medians("Rate", "direct")
        for l in rate_labels:
            m = medians("Rate", l)
            added = (f"{m['p50_ms'] - base['p50_ms']:.3f} | {m['p99_ms'] - base['p99_ms']:.3f}"
                     if l != "direct" else "- | -")
            print(f"| {NAMES[l]} | {m['rps']:.0f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | {added} | {m['errors']:.0f} / {m['non2xx']:.0f} |")

    print("\n### Every round, A/B side by side (req/s, p99 ms)\n")
    print("| round | test | bars-gateway | nginx 1 worker | ratio | nginx auto | ratio | haproxy | ratio |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    by_round = defaultdict(dict)
    for r in rows:
        if r["kind"] == "RESULT" and r.get("mode") in MODES:
            by_round[(int(num(r.get("round"))), r["mode"])][r["label"]] = r
    for (rnd, mode), d in sorted(by_round.items(), key=lambda kv: (kv[0][0], MODES.index(kv[0][1]))):
        cell = lambda l: f"{num(d[l]['rps']):.0f} ({num(d[l]['p99_ms']):.2f})" if l in d else "-"
        ratio = lambda l: fmt_ratio(num(d["gateway"]["rps"]), num(d[l]["rps"])) if l in d and "gateway" in d else "-"
        print(f"| {rnd} | {mode.lower()} | {cell('gateway')} | {cell('nginx-1w')} | {ratio('nginx-1w')} | {cell('nginx-auto')} | {ratio('nginx-auto')} | {cell('haproxy')} | {ratio('haproxy')} |")

    variants = sorted({r["label"] for r in rows if r["kind"] == "RESULT" and r.get("label", "").startswith("gateway-")})
    if variants:
        print("\n### Gateway variants, same run (medians; same config, another build or environment)\n")
        print("| test | server | req/s | p99 ms | server CPU µs/req | req/s vs gateway | CPU vs gateway | req/s vs nginx-1w |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for mode in MODES:
            base = runs.get((mode, "gateway"), [])
            n1 = runs.get((mode, "nginx-1w"), [])
            if not base:
                continue
            vmed = lambda rs, k: statistics.median([num(r.get(k)) for r in rs]) if rs else 0.0
            b_rps, b_cpu, n_rps = vmed(base, "rps"), vmed(base, "server_cpu_us_per_req"), vmed(n1, "rps")
            print(f"| {mode.lower()} | gateway | {b_rps:.0f} | {vmed(base, 'p99_ms'):.2f} | {b_cpu:.0f} | 1.00 | 1.00 | {fmt_ratio(b_rps, n_rps)} |")
            for v in variants:
                rs = runs.get((mode, v), [])
                if rs:
                    rps, cpu = vmed(rs, "rps"), vmed(rs, "server_cpu_us_per_req")
                    print(f"| | {v} | {rps:.0f} | {vmed(rs, 'p99_ms'):.2f} | {cpu:.0f} | {fmt_ratio(rps, b_rps)} | {fmt_ratio(cpu, b_cpu)} | {fmt_ratio(rps, n_rps)} |")

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
    print("| | " + " | ".join(NAMES[l] for l in LABELS) + " |")
    print("|---|" + "---:|" * len(LABELS))
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
            print(f"| idle, after start: {v} | {mb(idle[v])} | | | |")
        if v in hold:
            print(f"| {HOLD_CONNS_LABEL} held: {v} | {mb(num(hold[v].get('rss_held_kb')))} "
                  f"({num(hold[v].get('kb_per_conn')):.1f} kB/conn, {hold[v].get('alive')} alive) | | | |")
    # The verdict per goal of issue 18, from the medians above.
    print("\n### Goals (issue 18), this run\n")
    print("| goal | measured | verdict |")
    print("|---|---|---|")
    verdict = lambda ok: "met" if ok else "**NOT met**"
    if ("Get", "gateway") in med and "nginx-1w" in labels:
        G, N, H = med[("Get", "gateway")], med[("Get", "nginx-1w")], med.get(("Get", "haproxy"))
        if H:
            print(f"| GET req/s >= haproxy's | {G['rps']:.0f} vs {H['rps']:.0f}: {fmt_ratio(G['rps'], H['rps'])}x | {verdict(G['rps'] >= H['rps'])} |")
        print(f"| GET CPU/req <= nginx-1w's | {G['server_cpu_us_per_req']:.0f} vs {N['server_cpu_us_per_req']:.0f} µs: {fmt_ratio(G['server_cpu_us_per_req'], N['server_cpu_us_per_req'])}x | {verdict(G['server_cpu_us_per_req'] <= N['server_cpu_us_per_req'])} |")
        print(f"| GET p99 <= nginx-1w's | {G['p99_ms']:.2f} vs {N['p99_ms']:.2f} ms: {fmt_ratio(G['p99_ms'], N['p99_ms'])}x | {verdict(G['p99_ms'] <= N['p99_ms'])} |")
    if ("Post", "gateway") in med and "nginx-1w" in labels:
        G, N = med[("Post", "gateway")], med[("Post", "nginx-1w")]
        print(f"| POST 35 KB dedup req/s >= 1.0x nginx-1w | {G['rps']:.0f} vs {N['rps']:.0f}: {fmt_ratio(G['rps'], N['rps'])}x | {verdict(G['rps'] >= N['rps'])} |")
        print(f"| POST CPU/req <= 1.2x nginx-1w's | {G['server_cpu_us_per_req']:.0f} vs {N['server_cpu_us_per_req']:.0f} µs: {fmt_ratio(G['server_cpu_us_per_req'], N['server_cpu_us_per_req'])}x | {verdict(G['server_cpu_us_per_req'] <= 1.2 * N['server_cpu_us_per_req'])} |")
    if ("Connect", "gateway") in med:
        G = med[("Connect", "gateway")]
        peers = [l for l in labels if l != "gateway"]
        best = max(peers, key=lambda l: med[("Connect", l)]["rps"]) if peers else None
        if best:
            B = med[("Connect", best)]
            print(f"| handshakes/s ahead of every peer | {G['rps']:.0f} vs {best} {B['rps']:.0f}: {fmt_ratio(G['rps'], B['rps'])}x | {verdict(G['rps'] >= B['rps'])} |")
    if "gateway" in hold and "nginx-1w" in hold:
        gk, nk = num(hold["gateway"].get("kb_per_conn")), num(hold["nginx-1w"].get("kb_per_conn"))
        print(f"| memory per idle TLS connection <= nginx-1w's | {gk:.1f} vs {nk:.1f} kB: {fmt_ratio(gk, nk)}x | {verdict(gk <= nk)} |")
    g_idle = idle.get("gateway", 0) / 1024
    print(f"| idle RSS <= 13 MB | {g_idle:.1f} MB | {verdict(g_idle <= 13)} |")

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
        print("\nGateway counters after the run, the non-zero ones (a sanity check that dedup saw first sights only):\n")
        print("```")
        lines = metrics[0].strip().replace(" bars_", "\nbars_").splitlines()
        print("\n".join(l for l in lines if not l.endswith(" 0")))
        print("```")

if __name__ == "__main__":
    main()
