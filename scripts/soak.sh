#!/usr/bin/env bash
# Soak test (issue 9): scripts/soak.sh [--minutes N] [--max-entries N] [--out DIR]
#
# Builds --release, starts the bench backend (benches/backend.rs) and the gateway on loopback,
# drives a moderate mixed load for N minutes (default 10) with scripts/soak_client.py (GET
# /metadata and deduplicated POST /$process-message with unique ids, BaRS-style retries and
# deliberate duplicates), and mixes in, every minute: a TLS reload (the server certificate
# re-issued and renamed into place, alternating with SIGHUP) and a fault (the backend stopped
# for 4 s, then restarted). Every 10 s it samples the gateway's RSS, open fds, threads and open
# connections into samples.csv. At the end it asserts (scripts/soak_report.py):
#   - RSS stays under the dedup store's bound and stops growing once the store is full
#     (dedup.max_entries is set low, default 20000, so the bound is reached within minutes);
#   - the fd count returns to its pre-load baseline after the load stops;
#   - no request was lost: every request got an HTTP answer, every POST its 200 (or 409 after a
#     lost answer), every deliberate duplicate (sent at once, or a quarter of the store's
#     capacity later) its 409; every reload succeeded.
# Exit 0 on PASS. Everything listens on 127.0.0.1; every process started here is stopped by its
# pid on exit; the client and the backend stop by themselves even if this script is killed -9.
#
# Knobs (environment): GET_RATE=150 POST_RATE=100 (req/s) BIN_DIR=dir (reuse built executables:
# bars-gateway, backend, dedup_memory) OUT=target/soak-results/<time>
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

MINUTES=10
MAX_ENTRIES=20000
OUT=${OUT:-$ROOT/target/soak-results/$(date +%Y%m%d-%H%M%S)}
while [ $# -gt 0 ]; do
    case $1 in
        --minutes) MINUTES=$2; shift 2 ;;
        --max-entries) MAX_ENTRIES=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
GET_RATE=${GET_RATE:-150}
POST_RATE=${POST_RATE:-100}
SECONDS_TOTAL=$(python3 -c "print(int(float('$MINUTES') * 60))")
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/bars-soak.XXXXXX)
FIXTURES=$ROOT/tests/fixtures/bars-examples
CN=bars-proxy.spineservices.nhs.uk

STARTED_PIDS=()
cleanup() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${STARTED_PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$OUT/soak.log" >&2; }

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "command: scripts/soak.sh --minutes $MINUTES --max-entries $MAX_ENTRIES (GET_RATE=$GET_RATE POST_RATE=$POST_RATE)"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "memory: $(free -m | awk '/^Mem:/ {print $2 " MiB"}')"
    echo "kernel: $(uname -r)"
    echo "rustc: $(rustc --version)"
    echo "python: $(python3 --version 2>&1)"
    echo "uptime at start: $(uptime)"
} | tee "$OUT/machine.txt" >&2

# ---------------------------------------------------------------------------------------------
# 1. Build (release profile) the gateway and the bench backend and dedup probe, as benches/run.sh
#    does; their paths come from cargo's JSON messages.
if [ -n "${BIN_DIR:-}" ]; then
    GATEWAY=$BIN_DIR/bars-gateway BACKEND=$BIN_DIR/backend DEDUP_MEMORY=$BIN_DIR/dedup_memory
else
    log "building (cargo bench --no-run: the release profile)"
    cargo bench --no-run --bench backend --bench dedup_memory \
        --message-format=json-render-diagnostics >"$OUT/build.json" 2>"$OUT/build.log" ||
        { tail -30 "$OUT/build.log"; exit 1; }
    exe_of() { # target name
        python3 -c 'import json, sys
paths = [m["executable"] for m in map(json.loads, open(sys.argv[1]))
         if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[2] and m.get("executable")]
print(paths[-1] if paths else "")' "$OUT/build.json" "$1"
    }
    GATEWAY=$(exe_of bars-gateway) BACKEND=$(exe_of backend) DEDUP_MEMORY=$(exe_of dedup_memory)
fi
for exe in "$GATEWAY" "$BACKEND" "$DEDUP_MEMORY"; do
    [ -n "$exe" ] && [ -x "$exe" ] || { log "missing executable: '$exe'"; exit 1; }
done

# ---------------------------------------------------------------------------------------------
# 2. PKI: one CA, RSA-2048 server and client keys (the NHS kind), as benches/run.sh makes them.
#    The server CSR and extensions are kept to re-issue the certificate during the run.
log "PKI: openssl, RSA-2048"
P=$WORK/pki
# shellcheck source=scripts/lib/pki.sh
. "$ROOT/scripts/lib/pki.sh"
make_pki "$P" "Soak NHS Root" "$CN" >"$OUT/pki.log" 2>&1
reissue_server_certificate() { # serial: write beside, then rename into place (what operators do)
    openssl x509 -req -sha256 -days 30 -in "$P/server.csr" -CA "$P/ca.pem" -CAkey "$P/ca.key" \
        -set_serial "$1" -extfile "$P/server.ext" -out "$P/.server.pem.new" 2>>"$OUT/pki.log"
    mv "$P/.server.pem.new" "$P/server.pem"
}

# ---------------------------------------------------------------------------------------------
# 3. The dedup store's cost per entry, measured by the bench probe at this store size.
log "dedup memory store: $MAX_ENTRIES entries (benches/dedup_memory.rs)"
"$DEDUP_MEMORY" "$MAX_ENTRIES" --variant store | tee "$OUT/dedup_memory.txt" >&2

# ---------------------------------------------------------------------------------------------
# 4. Ports (loopback, below the ephemeral range), the backend and the gateway.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
BASE=$((21000 + (RANDOM % 400) * 10))
for _ in $(seq 20); do
    if port_free $BASE && port_free $((BASE + 1)) && port_free $((BASE + 2)); then break; fi
    BASE=$((21000 + (RANDOM % 400) * 10))
done
BACKEND_PORT=$BASE GW_PORT=$((BASE + 1)) ADMIN_PORT=$((BASE + 2))
wait_port() { # port what
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    log "$2 did not start listening on $1"
    return 1
}
# The backend's lifetime bounds it even if this script dies.
BACKEND_LIFETIME=$((SECONDS_TOTAL + 900))
start_backend() {
    "$BACKEND" "127.0.0.1:$BACKEND_PORT" "$BACKEND_LIFETIME" >>"$OUT/backend.log" 2>&1 &
    BACKEND_PID=$!
    STARTED_PIDS+=("$BACKEND_PID")
    wait_port "$BACKEND_PORT" backend
}
start_backend

cat >"$WORK/gateway.toml" <<EOF
[listen]
address = "127.0.0.1:$GW_PORT"

[tls]
certificate = "$P/server.pem"
private_key = "$P/server.key"
client_ca = ["$P/ca.pem"]

[client]
environment = "custom"
allowed_ips = ["127.0.0.1/32"]
allowed_subjects = ["$CN"]

[upstream]
url = "http://127.0.0.1:$BACKEND_PORT"

[bars]
require_identity_headers = true
accepted_major_versions = [1]
allowed_paths = "bars"

[dedup]
store = "memory"
max_entries = $MAX_ENTRIES

[admin]
address = "127.0.0.1:$ADMIN_PORT"

[log]
level = "warn"
format = "json"
audit = false
EOF
cp "$WORK/gateway.toml" "$OUT/gateway.toml"
"$GATEWAY" run --config "$WORK/gateway.toml" >"$OUT/gateway.log" 2>&1 &
GW_PID=$!
STARTED_PIDS+=("$GW_PID")
admin() { curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT$1" || true; }
metric() { # name with labels, e.g. 'bars_gateway_reloads_total{result="success"}' -> value or 0
    admin /metrics | awk -v m="$1" '$1 == m {print $2; found=1} END {if (!found) print 0}'
}
for _ in $(seq 100); do
    [ "$(admin /readyz)" = ready ] && break
    sleep 0.1
done
[ "$(admin /readyz)" = ready ] || { log "the gateway did not become ready"; tail -20 "$OUT/gateway.log"; exit 1; }
log "ports: backend $BACKEND_PORT, gateway $GW_PORT (pid $GW_PID), admin $ADMIN_PORT"

# ---------------------------------------------------------------------------------------------
# 5. Sampling: every 10 s, one CSV row.
CSV=$OUT/samples.csv
EVENTS=$OUT/events.csv
echo "t_s,phase,rss_kb,fds,threads,connections_open,attempts,answers,transport_errors,post_ids,loadavg1" >"$CSV"
echo "t_s,event,detail" >"$EVENTS"
T0=$(date +%s.%N)
now_s() { python3 -c "import time; print(round(time.time() - $T0, 1))"; }
event() { echo "$(now_s),$1,$2" >>"$EVENTS"; log "$1 $2"; }
sample() { # phase
    local rss fds threads conns progress
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$GW_PID/status" 2>/dev/null || echo 0)
    threads=$(awk '/^Threads:/ {print $2}' "/proc/$GW_PID/status" 2>/dev/null || echo 0)
    fds=$(find "/proc/$GW_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    conns=$(metric bars_gateway_connections_open)
    progress=$(python3 -c 'import json, sys
try:
    c = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    c = {}
print(",".join(str(c.get(k, 0)) for k in ("attempts", "answers", "transport_errors", "post_ids")))' "$WORK/progress.json")
    echo "$(now_s),$1,$rss,$fds,$threads,$conns,$progress,$(cut -d' ' -f1 /proc/loadavg)" >>"$CSV"
}
# What each open fd is (sockets with their TCP ends and state), for finding a leak.
list_fds() { # file
    python3 - "$GW_PID" >"$1" <<'PY'
import os, sys
pid = sys.argv[1]
tcp = {}
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        lines = open(table).read().splitlines()[1:]
    except OSError:
        continue
    for line in lines:
        f = line.split()
        port = lambda hexaddr: int(hexaddr.rsplit(":", 1)[1], 16)
        tcp[f[9]] = f"tcp :{port(f[1])} -> :{port(f[2])} state {f[3]}"
for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        continue
    inode = target[len("socket:["):-1] if target.startswith("socket:[") else None
    print(fd, target, tcp.get(inode, "") if inode else "")
PY
}
sample baseline
BASELINE_FDS=$(find "/proc/$GW_PID/fd" -mindepth 1 -maxdepth 1 | wc -l)
list_fds "$OUT/fds-baseline.txt"

# ---------------------------------------------------------------------------------------------
# 6. The load, with reloads and faults on a one-minute cycle.
# Late duplicates are ids a quarter of the store's capacity old: still remembered, unless the
# store drops entries it should keep.
LATE_AGE=$(python3 -c "print(round(0.25 * $MAX_ENTRIES / $POST_RATE, 1))")
log "load: ${MINUTES} min, GET $GET_RATE/s + POST $POST_RATE/s, late duplicates ${LATE_AGE} s old"
python3 "$ROOT/scripts/soak_client.py" --addr "127.0.0.1:$GW_PORT" \
    --ca "$P/ca.pem" --cert "$P/client.pem" --key "$P/client.key" \
    --headers "$FIXTURES/headers-examples.json" \
    --body "$FIXTURES/process-message-validation-request.json" \
    --seconds "$SECONDS_TOTAL" --get-rate "$GET_RATE" --post-rate "$POST_RATE" \
    --late-duplicate-age "$LATE_AGE" \
    --progress "$WORK/progress.json" --summary "$OUT/client.json" >"$OUT/client.log" 2>&1 &
CLIENT_PID=$!
STARTED_PIDS+=("$CLIENT_PID")

(
    while kill -0 "$CLIENT_PID" 2>/dev/null; do
        sleep 10
        sample load
    done
) &
SAMPLER_PID=$!
STARTED_PIDS+=("$SAMPLER_PID")

RELOAD_FAILURES=0
reloads_ok() { metric 'bars_gateway_reloads_total{result="success"}'; }
wait_for_reload() { # count before: poll the counter (the reload's own signal) for up to 10 s
    for _ in $(seq 100); do
        [ "$(reloads_ok)" -gt "$1" ] && return 0
        sleep 0.1
    done
    RELOAD_FAILURES=$((RELOAD_FAILURES + 1))
    event reload_not_seen "success counter stayed at $1"
}
cycle=0
serial=1000
load_start=$(date +%s)
left() { echo $((SECONDS_TOTAL - ($(date +%s) - load_start))); }
# The last fault ends at least 30 s before the load does, so the upstream pool holds live
# connections when the load stops: they must then be closed by its idle timeout.
while kill -0 "$CLIENT_PID" 2>/dev/null; do
    sleep 15
    [ "$(left)" -gt 20 ] || break
    before=$(reloads_ok)
    if [ $((cycle % 2)) = 0 ]; then
        serial=$((serial + 1))
        reissue_server_certificate "$serial"
        event reload "server certificate re-issued (serial $serial) and renamed into place"
    else
        kill -HUP "$GW_PID"
        event reload SIGHUP
    fi
    wait_for_reload "$before"
    sleep 15
    [ "$(left)" -gt 40 ] || break
    kill "$BACKEND_PID"
    wait "$BACKEND_PID" 2>/dev/null || true
    event fault "backend stopped"
    sleep 4
    start_backend
    event fault "backend restarted"
    cycle=$((cycle + 1))
    sleep 26
done
wait "$CLIENT_PID" && CLIENT_RC=0 || CLIENT_RC=$?
event load_end "client exit $CLIENT_RC"
kill "$SAMPLER_PID" 2>/dev/null || true
wait "$SAMPLER_PID" 2>/dev/null || true

# ---------------------------------------------------------------------------------------------
# 7. After the load: the fd count must come back to its baseline (client connections close at
#    once; the upstream pool's idle connections after its 60 s idle timeout), within 3 minutes.
FD_RECOVERED=no
for i in $(seq 36); do
    sample drain
    fds=$(tail -1 "$CSV" | cut -d, -f4)
    if [ "$fds" -le "$BASELINE_FDS" ]; then FD_RECOVERED=yes; break; fi
    sleep 5
done
event drain "fds $fds (baseline $BASELINE_FDS) recovered=$FD_RECOVERED"
list_fds "$OUT/fds-after.txt"
admin /metrics >"$OUT/gateway-metrics.txt"
kill -0 "$GW_PID" 2>/dev/null && GW_ALIVE=yes || GW_ALIVE=no
echo "uptime at end: $(uptime)" | tee -a "$OUT/machine.txt" >&2

python3 "$ROOT/scripts/soak_report.py" --out "$OUT" --max-entries "$MAX_ENTRIES" \
    --baseline-fds "$BASELINE_FDS" --fd-recovered "$FD_RECOVERED" --gateway-alive "$GW_ALIVE" \
    --reload-failures "$RELOAD_FAILURES" --client-rc "$CLIENT_RC" | tee "$OUT/summary.md"
log "results in $OUT"
grep -q '^Verdict: PASS' "$OUT/summary.md"
