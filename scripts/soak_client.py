#!/usr/bin/env python3
"""The load of scripts/soak.sh: paced mTLS HTTP/1.1 keep-alive traffic that accounts for every
request and retries the way a BaRS sender does.

benches/loadgen.rs drives fixed concurrency as fast as the server allows and counts errors only
inside its measured window: right for throughput, wrong for a soak, which needs a moderate,
steady rate through faults and an answer for every request. Hence this client:

- GET /metadata at --get-rate req/s and POST /$process-message (the 35 KB example body) at
  --post-rate req/s, each with a fresh X-Request-Id, spread over --workers keep-alive
  connections per kind;
- a POST answered 408/425/429/5xx is retried with the same id and body (up to --max-attempts,
  0.25 s apart), as the BaRS sender does: after a transient failure the gateway forgets the id, so
  the retry must go through; every --duplicate-every-th POST answered 200 is sent again and must get
  409 (a duplicate the gateway absorbs), and so must, just as often, a late copy of a POST answered
  --late-duplicate-age seconds earlier (pick an age whose ids still fit in dedup.max_entries);
- a request whose connection fails (reset, close, timeout) is counted as a transport error and
  sent again on a new connection; a POST may then get 409, because the first copy was processed.

A request is lost when no attempt got an HTTP answer (or a POST never got its 200 or 409 within
--max-attempts). Writes progress (JSON, every second) to --progress and the summary to --summary;
exits 0 when nothing was lost and every answer was one the gateway may give, else 1.
Standard library only. Bounded: it stops after --seconds whatever happens.
"""

import argparse
import collections
import http.client
import json
import os
import socket
import ssl
import sys
import threading
import time
import uuid

TRANSIENT = {408, 425, 429, 500, 502, 503, 504}
REQUEST_TIMEOUT = 15.0


class Stats:
    """Counters shared by the workers (one lock: a few hundred updates a second)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.c = {
            "get_sent": 0, "get_ok": 0, "get_non2xx": 0, "get_lost": 0,
            "post_ids": 0, "post_ok": 0, "post_409_after_error": 0, "post_lost": 0,
            "post_retries": 0, "duplicates_sent": 0, "duplicates_409": 0,
            "late_duplicates_sent": 0, "late_duplicates_409": 0,
            "attempts": 0, "answers": 0, "transport_errors": 0, "unexpected": 0,
        }
        self.statuses = {}
        self.latencies = []
        self.first_problems = []

    def add(self, key, n=1):
        with self.lock:
            self.c[key] += n

    def answer(self, kind, status, seconds):
        with self.lock:
            self.c["answers"] += 1
            key = f"{kind} {status}"
            self.statuses[key] = self.statuses.get(key, 0) + 1
            self.latencies.append(seconds)

    def problem(self, text):
        with self.lock:
            self.c["unexpected"] += 1
            if len(self.first_problems) < 20:
                self.first_problems.append(text)

    def snapshot(self):
        with self.lock:
            return dict(self.c), dict(self.statuses)


class Connection:
    """One keep-alive mTLS connection, reopened after any transport error."""

    def __init__(self, args, context):
        self.args = args
        self.context = context
        self.conn = None

    def send(self, method, path, headers, body):
        """(status, body bytes) or None on a transport error (the connection is then dropped)."""
        if self.conn is None:
            self.conn = http.client.HTTPSConnection(
                self.args.host, self.args.port, context=self.context, timeout=REQUEST_TIMEOUT
            )
        try:
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
            if response.will_close:
                self.close()
            return response.status, data
        except (OSError, http.client.HTTPException, ssl.SSLError, socket.timeout):
            self.close()
            return None

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
            self.conn = None


def paced(rate, deadline, stop):
    """Yields at `rate` per second until the deadline, never bursting to catch up."""
    interval = 1.0 / rate
    next_at = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if now >= deadline:
            return
        if next_at > now:
            time.sleep(next_at - now)
        elif now - next_at > 1.0:
            next_at = now
        next_at += interval
        yield


def get_worker(args, context, headers, stats, rate, deadline, stop):
    conn = Connection(args, context)
    for _ in paced(rate, deadline, stop):
        stats.add("get_sent")
        answered = False
        for _attempt in range(3):
            h = dict(headers, **{"X-Request-Id": str(uuid.uuid4())})
            stats.add("attempts")
            started = time.monotonic()
            result = conn.send("GET", "/metadata", h, None)
            if result is None:
                stats.add("transport_errors")
                continue
            status, _ = result
            stats.answer("GET", status, time.monotonic() - started)
            answered = True
            if status == 200:
                stats.add("get_ok")
            else:
                stats.add("get_non2xx")
                if status not in TRANSIENT:
                    stats.problem(f"GET /metadata got {status}")
            break
        if not answered:
            stats.add("get_lost")
    conn.close()


def post_worker(args, context, headers, body, stats, rate, deadline, stop):
    conn = Connection(args, context)
    ok_here = 0
    processed = collections.deque()  # (answered at, headers) of POSTs answered 200
    for _ in paced(rate, deadline, stop):
        request_id = str(uuid.uuid4())
        h = dict(headers, **{"X-Request-Id": request_id})
        stats.add("post_ids")
        final = None
        had_error = False
        for attempt in range(args.max_attempts):
            if attempt:
                stats.add("post_retries")
                time.sleep(0.25)
            stats.add("attempts")
            started = time.monotonic()
            result = conn.send("POST", "/$process-message", h, body)
            if result is None:
                stats.add("transport_errors")
                had_error = True
                continue
            status, data = result
            stats.answer("POST", status, time.monotonic() - started)
            if status == 200:
                final = 200
                break
            if status == 409 and had_error:
                # An earlier attempt was processed but its answer was lost: the gateway remembers.
                final = 409
                stats.add("post_409_after_error")
                break
            if status in TRANSIENT:
                had_error = True
                continue
            stats.problem(f"POST {request_id} attempt {attempt + 1} got {status}: {data[:200]!r}")
            final = status
            break
        if final is None:
            stats.add("post_lost")
            continue
        if final == 200:
            stats.add("post_ok")
            ok_here += 1
            if args.duplicate_every and ok_here % args.duplicate_every == 0:
                stats.add("duplicates_sent")
                stats.add("attempts")
                started = time.monotonic()
                result = conn.send("POST", "/$process-message", h, body)
                if result is None:
                    stats.add("transport_errors")
                else:
                    stats.answer("POST-dup", result[0], time.monotonic() - started)
                    if result[0] == 409:
                        stats.add("duplicates_409")
                    elif result[0] not in TRANSIENT:
                        stats.problem(f"duplicate of {request_id} got {result[0]}, not 409")
            processed.append((time.monotonic(), h))
            if args.duplicate_every and ok_here % args.duplicate_every == 0:
                late_duplicate(args, conn, body, stats, processed)
    conn.close()


def late_duplicate(args, conn, body, stats, processed):
    """Resends the newest POST answered at least --late-duplicate-age seconds ago: still within
    the store's capacity, so it must get 409 however many ids came after it."""
    cutoff = time.monotonic() - args.late_duplicate_age
    old = None
    while processed and processed[0][0] <= cutoff:
        old = processed.popleft()
    if old is None:
        return
    answered_at, h = old
    stats.add("late_duplicates_sent")
    stats.add("attempts")
    started = time.monotonic()
    result = conn.send("POST", "/$process-message", h, body)
    if result is None:
        stats.add("transport_errors")
        return
    stats.answer("POST-late-dup", result[0], time.monotonic() - started)
    if result[0] == 409:
        stats.add("late_duplicates_409")
    elif result[0] not in TRANSIENT:
        stats.problem(f"late duplicate of {h['X-Request-Id']} ({started - answered_at:.0f} s "
                      f"after its 200) got {result[0]}, not 409")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--addr", required=True, help="host:port of the gateway")
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--headers", required=True, help="tests/fixtures/bars-examples/headers-examples.json")
    p.add_argument("--body", required=True, help="the POST body file")
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--get-rate", type=float, default=150)
    p.add_argument("--post-rate", type=float, default=100)
    p.add_argument("--workers", type=int, default=2, help="connections per kind")
    p.add_argument("--max-attempts", type=int, default=60)
    p.add_argument("--duplicate-every", type=int, default=20)
    p.add_argument("--late-duplicate-age", type=float, default=30,
                   help="seconds; ids sent in that time must fit in dedup.max_entries")
    p.add_argument("--progress", required=True)
    p.add_argument("--summary", required=True)
    args = p.parse_args()
    args.host, port = args.addr.rsplit(":", 1)
    args.port = int(port)

    context = ssl.create_default_context(cafile=args.ca)
    context.load_cert_chain(args.cert, args.key)
    context.check_hostname = False  # the server certificate names localhost, we dial 127.0.0.1
    example = json.load(open(args.headers))["valid_process_message_request"]["headers"]
    base = {k: v for k, v in example.items() if k.lower() != "x-request-id"}
    base["Host"] = "localhost"
    get_headers = {k: v for k, v in base.items() if k.lower() != "content-type"}
    body = open(args.body, "rb").read()

    stats = Stats()
    stop = threading.Event()
    started = time.monotonic()
    deadline = started + args.seconds
    threads = []
    for _ in range(args.workers):
        threads.append(threading.Thread(target=get_worker, daemon=True, args=(
            args, context, get_headers, stats, args.get_rate / args.workers, deadline, stop)))
        threads.append(threading.Thread(target=post_worker, daemon=True, args=(
            args, context, base, body, stats, args.post_rate / args.workers, deadline, stop)))
    for t in threads:
        t.start()
    # Workers stop at the deadline; one more request (its retries included) may be under way.
    hard_stop = deadline + args.max_attempts * 0.25 + 2 * REQUEST_TIMEOUT
    while any(t.is_alive() for t in threads) and time.monotonic() < hard_stop:
        counters, statuses = stats.snapshot()
        counters["elapsed_s"] = round(time.monotonic() - started, 1)
        with open(args.progress + ".tmp", "w") as f:
            json.dump(counters, f)
        os.replace(args.progress + ".tmp", args.progress)
        time.sleep(1)
    stop.set()
    stuck = sum(t.is_alive() for t in threads)

    counters, statuses = stats.snapshot()
    lat = sorted(stats.latencies)
    pct = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else 0
    summary = dict(counters)
    summary.update({
        "seconds": round(time.monotonic() - started, 1),
        "stuck_workers": stuck,
        "statuses": statuses,
        "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": round(lat[-1] * 1000, 1) if lat else 0,
        "rate_per_s": round(counters["attempts"] / max(args.seconds, 1), 1),
        "first_problems": stats.first_problems,
    })
    lost = counters["get_lost"] + counters["post_lost"] + stuck
    summary["lost"] = lost
    summary["verdict"] = "PASS" if lost == 0 and counters["unexpected"] == 0 else "FAIL"
    with open(args.summary, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    return 0 if summary["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
