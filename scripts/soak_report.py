#!/usr/bin/env python3
"""The verdict of scripts/soak.sh: reads its output folder (samples.csv, events.csv, client.json,
dedup_memory.txt, gateway-metrics.txt, machine.txt) and prints a Markdown summary ending in
'Verdict: PASS' or 'Verdict: FAIL'.

The checks, with their limits fixed before any run:
- memory bound: peak RSS under load <= baseline RSS + 2 x (dedup.max_entries x bytes per entry,
  as benches/dedup_memory.rs measures it) + 64 MiB for connections, buffers and the allocator;
- memory flattens: once 1.5 x max_entries unique ids were sent (the store is full and evicting),
  RSS never rises more than 8 MiB above its value at that point;
- no fd leak: after the load stops, the open fd count returns to its pre-load baseline (within
  3 minutes: the upstream pool's idle connections close after 60 s);
- nothing lost: the client's own verdict (every request answered, every POST 200 or 409 after a
  lost answer, every duplicate and late duplicate 409), every reload seen to succeed, the
  gateway still running.
"""

import argparse
import csv
import json
import re
import sys

MIB = 1024


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--max-entries", type=int, required=True)
    p.add_argument("--baseline-fds", type=int, required=True)
    p.add_argument("--fd-recovered", required=True)
    p.add_argument("--gateway-alive", required=True)
    p.add_argument("--reload-failures", type=int, required=True)
    p.add_argument("--client-rc", type=int, required=True)
    a = p.parse_args()
    out = a.out

    rows = list(csv.DictReader(open(f"{out}/samples.csv")))
    for r in rows:
        for k in ("t_s", "rss_kb", "fds", "threads", "connections_open", "attempts", "answers",
                  "transport_errors", "post_ids", "loadavg1"):
            r[k] = float(r[k] or 0)
    events = list(csv.DictReader(open(f"{out}/events.csv")))
    client = json.load(open(f"{out}/client.json"))
    dedup_line = open(f"{out}/dedup_memory.txt").read()
    bytes_per_entry = float(re.search(r"bytes_per_entry=(\d+)", dedup_line).group(1))
    metrics = open(f"{out}/gateway-metrics.txt").read()
    machine = open(f"{out}/machine.txt").read()

    baseline = next(r for r in rows if r["phase"] == "baseline")
    load = [r for r in rows if r["phase"] == "load"]
    drain = [r for r in rows if r["phase"] == "drain"]
    dedup_kb = a.max_entries * bytes_per_entry / 1024
    bound_kb = baseline["rss_kb"] + 2 * dedup_kb + 64 * MIB
    peak = max(load, key=lambda r: r["rss_kb"]) if load else baseline
    full = next((r for r in load if r["post_ids"] >= 1.5 * a.max_entries), None)
    after_full = [r for r in load if full is not None and r["t_s"] >= full["t_s"]]
    rise_kb = (max(r["rss_kb"] for r in after_full) - full["rss_kb"]) if after_full else None
    slope = None
    if len(after_full) >= 3:
        n = len(after_full)
        mt = sum(r["t_s"] for r in after_full) / n
        mr = sum(r["rss_kb"] for r in after_full) / n
        den = sum((r["t_s"] - mt) ** 2 for r in after_full)
        slope = sum((r["t_s"] - mt) * (r["rss_kb"] - mr) for r in after_full) / den if den else 0.0

    checks = []
    checks.append((
        "RSS under the dedup store's bound",
        peak["rss_kb"] <= bound_kb,
        f"peak {peak['rss_kb'] / MIB:.1f} MiB at {peak['t_s']:.0f} s <= bound {bound_kb / MIB:.1f} MiB "
        f"(baseline {baseline['rss_kb'] / MIB:.1f} + 2 x {a.max_entries} x {bytes_per_entry:.0f} B "
        f"+ 64 MiB)",
    ))
    if full is None:
        checks.append(("RSS flat once the store is full", False,
                       f"the store never filled: {load[-1]['post_ids'] if load else 0:.0f} unique ids "
                       f"sent, {1.5 * a.max_entries:.0f} needed (run longer or lower --max-entries)"))
    else:
        checks.append((
            "RSS flat once the store is full",
            rise_kb <= 8 * MIB,
            f"full at {full['t_s']:.0f} s ({full['rss_kb'] / MIB:.1f} MiB); highest rise after it "
            f"{rise_kb / MIB:+.1f} MiB (limit +8 MiB) over {after_full[-1]['t_s'] - full['t_s']:.0f} s; "
            f"least-squares slope {slope * 60 / MIB if slope is not None else 0:+.2f} MiB/min",
        ))
    last_fds = drain[-1]["fds"] if drain else -1
    checks.append((
        "fd count back to baseline after the load",
        a.fd_recovered == "yes",
        f"baseline {a.baseline_fds}, peak under load {max((r['fds'] for r in load), default=0):.0f}, "
        f"after the load {last_fds:.0f} ({drain[-1]['t_s'] - load[-1]['t_s'] if drain and load else 0:.0f} s after the last load sample)",
    ))
    checks.append((
        "no request lost, every answer expected",
        client.get("verdict") == "PASS" and a.client_rc == 0,
        f"lost {client.get('lost')}, unexpected {client.get('unexpected')}, transport errors "
        f"{client.get('transport_errors')} (each retried and answered)",
    ))
    reload_lines = [l for l in metrics.splitlines() if l.startswith("bars_gateway_reloads_total")]
    reload_fail = sum(float(l.split()[-1]) for l in reload_lines if 'result="success"' not in l)
    checks.append((
        "every reload succeeded, gateway still running",
        a.reload_failures == 0 and reload_fail == 0 and a.gateway_alive == "yes",
        f"{sum(1 for e in events if e['event'] == 'reload')} reloads triggered; metrics: "
        f"{'; '.join(reload_lines) or 'none'}; alive: {a.gateway_alive}",
    ))

    print("# Soak result\n")
    print("```")
    print(machine.strip())
    print("```\n")
    print("## Samples (every 60 s; all 10 s samples in samples.csv)\n")
    print("| t (s) | phase | RSS (MiB) | fds | threads | conns | requests sent | unique POST ids | load avg |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    shown, next_t = [], 0.0
    for r in rows:
        if r["phase"] != "load" or r["t_s"] >= next_t or r is rows[-1]:
            shown.append(r)
            if r["phase"] == "load":
                next_t = r["t_s"] + 59
    for r in shown:
        print(f"| {r['t_s']:.0f} | {r['phase']} | {r['rss_kb'] / MIB:.1f} | {r['fds']:.0f} | "
              f"{r['threads']:.0f} | {r['connections_open']:.0f} | {r['attempts']:.0f} | "
              f"{r['post_ids']:.0f} | {r['loadavg1']:.2f} |")
    print("\n## Load and faults\n")
    kinds = {}
    for e in events:
        kinds[e["event"]] = kinds.get(e["event"], 0) + 1
    print(f"- events: {', '.join(f'{k} x{v}' for k, v in kinds.items())}")
    print(f"- requests (attempts): {client.get('attempts')} in {client.get('seconds')} s "
          f"({client.get('rate_per_s')}/s), answers {client.get('answers')}")
    print(f"- statuses: {json.dumps(client.get('statuses'), sort_keys=True)}")
    print(f"- GET sent {client.get('get_sent')}, 200 {client.get('get_ok')}, non-2xx "
          f"{client.get('get_non2xx')}; POST ids {client.get('post_ids')}, 200 {client.get('post_ok')}, "
          f"409 after a lost answer {client.get('post_409_after_error')}, retries "
          f"{client.get('post_retries')}; duplicates sent {client.get('duplicates_sent')}, 409 "
          f"{client.get('duplicates_409')}; late duplicates sent "
          f"{client.get('late_duplicates_sent')}, 409 {client.get('late_duplicates_409')}")
    print(f"- latency: p50 {client.get('p50_ms')} ms, p99 {client.get('p99_ms')} ms, max "
          f"{client.get('max_ms')} ms")
    if client.get("first_problems"):
        print(f"- first problems: {client['first_problems']}")
    print("\n## Checks\n")
    for name, ok, detail in checks:
        print(f"- {'PASS' if ok else 'FAIL'}: {name}: {detail}")
    verdict = all(ok for _, ok, _ in checks)
    print(f"\nVerdict: {'PASS' if verdict else 'FAIL'}")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
