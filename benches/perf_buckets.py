#!/usr/bin/env python3
"""Groups a flat `perf report --no-children --sort dso,symbol --stdio` profile of the gateway into
cost buckets (crypto, allocator, copies, kernel, hyper, ...), so that runs can be compared.

Usage: perf_buckets.py MODE perf-report.txt  -> `PROFILE mode=MODE bucket=NAME pct=X` lines.
The first matching rule wins; the order matters (ring's AES-GCM before "rustls", etc.).
"""
import re
import sys
from collections import OrderedDict

RULES = [
    ("RSA (ring bignum)", lambda d, s: re.search(r"bn_|mulx4x|sqrx8x|LIMBS_|_mont|bn_mul|rsa", s, re.I)),
    ("X25519 key exchange", lambda d, s: re.search(r"curve25519|x25519|\bfe4?_|_ge_|fiat_", s)),
    ("AES-GCM records", lambda d, s: re.search(r"aes|gcm|ghash|gfmul|clmul|chacha|poly1305", s, re.I)),
    ("SHA-2 (dedup fingerprint, TLS transcript)", lambda d, s: re.search(r"sha2::|sha256|sha512|sha1", s, re.I)),
    ("kernel: TCP loopback, syscalls, scheduling", lambda d, s: d.startswith("[kernel")),
    ("malloc/free (glibc)", lambda d, s: d.startswith("libc") and re.search(r"malloc|free|_int_|consolidate|unlink_chunk|realloc|calloc|tcache|arena|sysmalloc|brk", s)),
    ("memcpy/memmove/memcmp", lambda d, s: re.search(r"mem(move|cpy|set|cmp)", s)),
    ("other allocator", lambda d, s: re.search(r"jemalloc|mimalloc|^je_|^mi_|_mi_", d + " " + s)),
    ("hyper + hyper-util (HTTP/1 server and client)", lambda d, s: re.search(r"hyper|httparse", s)),
    ("http::HeaderMap", lambda d, s: re.search(r"\bhttp::", s)),
    ("BaRS checks (identity, base64, JSON, ids, accept, routes)", lambda d, s: re.search(r"bars_gateway::bars::|base64|serde_json|serde::|serde_core", s)),
    ("dedup store (moka)", lambda d, s: re.search(r"moka|crossbeam|quanta", s)),
    ("rustls (state machine, verifier), webpki, x509", lambda d, s: re.search(r"rustls|webpki|x509|der_parser|asn1", s)),
    ("tokio runtime, timers, I/O driver", lambda d, s: re.search(r"tokio|mio::|clock_gettime", s)),
    ("tracing, metrics", lambda d, s: re.search(r"tracing|prometheus", s)),
    ("bars_gateway (pipeline, upstream, audit)", lambda d, s: re.search(r"bars_gateway", s)),
    ("other libc", lambda d, s: d.startswith("libc")),
]
LINE = re.compile(r"^\s*([0-9.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*)$")


def main():
    mode, path = sys.argv[1], sys.argv[2]
    buckets = OrderedDict((name, 0.0) for name, _ in RULES)
    buckets["other"] = 0.0
    total = 0.0
    with open(path, errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue
            pct, dso, sym = float(m.group(1)), m.group(2), m.group(3).strip()
            total += pct
            for name, rule in RULES:
                if rule(dso, sym):
                    buckets[name] += pct
                    break
            else:
                buckets["other"] += pct
    for name, pct in buckets.items():
        if pct >= 0.05:
            print(f"PROFILE mode={mode} pct={pct:.1f} bucket={name.replace(' ', '_')}")
    print(f"PROFILE mode={mode} pct={total:.1f} bucket=total_sampled")


if __name__ == "__main__":
    main()
