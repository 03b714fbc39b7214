#!/usr/bin/env bash
# bars-gateway vs nginx, one command: benches/run.sh
#
# Builds once (--release), makes an RSA-2048 PKI with openssl, starts one static backend, the
# gateway (full BaRS validation, memory dedup, audit off, log warn), nginx twice (one worker,
# the issue's reference, and `worker_processes auto`) and haproxy (`nbthread 2`, the best peer),
# then drives all four with the same mTLS load generator (benches/loadgen.rs) in alternating
# rounds and prints the ratio table (benches/summarize.py). Also: the added latency at a fixed
# rate (open loop, each proxy minus the backend called directly), idle RSS, RSS at N idle TLS
# connections, the dedup memory store at 1M entries, and the criterion microbenchmarks. Everything listens on 127.0.0.1, every
# loop is bounded, every process started here is stopped by its pid on exit.
#
# Knobs (environment): ROUNDS=3 ROUND_SECS=6 WARMUP=1 CONC_GET=64 CONC_POST=64 CONC_CONNECT=32
#   HOLD_CONNS=10000 MODES="get post connect" SKIP_MICRO=0 SKIP_HOLD=0 SKIP_DEDUP=0
#   RATE=500 RATE_CONNS=16 RATE_SECS=10 RATE_ROUNDS=3 (the open-loop added-latency test;
#   RATE_ROUNDS=0 skips it) SKIP_HAPROXY=0
#   BIN_DIR=dir (reuse saved executables instead of building; the microbenchmarks then run
#   $BIN_DIR/hot_paths)
#   GATEWAY_VARIANTS="name:VAR=value[,VAR=value] ..." extra gateways in the rounds, same binary
#   and config, other environment, e.g. "1worker:TOKIO_WORKER_THREADS=1
#   mimalloc:LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libmimalloc.so.2" (Debian libmimalloc2.0);
#   GATEWAY_BIN=path among the VARs runs another build instead (e.g. `--features mimalloc`)
#   AUDIT=0 (1: audit records on, written to /dev/null) PROFILE=0 (1: perf record the gateway
#   during one extra run of each mode; needs `perf`) PROFILE_MODES="get post connect"
#   PERF_ARGS="-F 999 -e cpu-clock" (e.g. add "--call-graph dwarf" to see who calls what)
#   OUT=target/bench-results/<time>
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

ROUNDS=${ROUNDS:-3}
ROUND_SECS=${ROUND_SECS:-6}
WARMUP=${WARMUP:-1}
CONC_GET=${CONC_GET:-64}
CONC_POST=${CONC_POST:-64}
CONC_CONNECT=${CONC_CONNECT:-32}
HOLD_CONNS=${HOLD_CONNS:-10000}
MODES=${MODES:-get post connect}
RATE=${RATE:-500}
RATE_CONNS=${RATE_CONNS:-16}
RATE_SECS=${RATE_SECS:-10}
RATE_ROUNDS=${RATE_ROUNDS:-3}
SKIP_HAPROXY=${SKIP_HAPROXY:-0}
AUDIT=${AUDIT:-0}
PROFILE=${PROFILE:-0}
GATEWAY_VARIANTS=${GATEWAY_VARIANTS:-}
OUT=${OUT:-$ROOT/target/bench-results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/bars-bench.XXXXXX)
chmod 755 "$WORK" # nginx workers run as nobody and need its temp directories
FIXTURES=$ROOT/tests/fixtures/bars-examples
CN=bars-proxy.spineservices.nhs.uk

STARTED_PIDS=()
cleanup() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED_PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$OUT/run.log" >&2; }

# 10,000 connections need more descriptors than the usual 1024 (loadgen, gateway and nginx).
ulimit -Hn 1048576 2>/dev/null || true
ulimit -Sn 1048576 2>/dev/null || ulimit -Sn "$(ulimit -Hn)"
log "fd limit: $(ulimit -n)"

# Debian packages the harness needs (nginx and haproxy are the comparison; openssl makes the PKI).
missing=()
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
[ "$SKIP_HAPROXY" = 1 ] || command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if ((${#missing[@]})); then
    log "installing ${missing[*]} (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# ---------------------------------------------------------------------------------------------
# 0. The machine, for BENCHMARKS.md.
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "memory: $(free -m | awk '/^Mem:/ {print $2 " MiB"}')"
    echo "kernel: $(uname -r)"
    echo "nginx: $(nginx -v 2>&1 | sed 's/.*: //')"
    [ "$SKIP_HAPROXY" = 1 ] || echo "haproxy: $(haproxy -v | head -1)"
    echo "openssl: $(openssl version)"
    echo "rustc: $(rustc --version)"
    echo "uptime at start: $(uptime)"
} | tee "$OUT/machine.txt" >&2


# ---------------------------------------------------------------------------------------------
# 1. Build once (a no-op when nothing changed). Building the benches also builds the gateway
#    binary, with the same features; the executables' paths come from cargo's JSON messages.
if [ -n "${BIN_DIR:-}" ]; then
    # Reuse executables saved from an earlier build (bars-gateway, loadgen, backend, dedup_memory).
    log "using the executables in $BIN_DIR (no build)"
    GATEWAY=$BIN_DIR/bars-gateway LOADGEN=$BIN_DIR/loadgen BACKEND=$BIN_DIR/backend DEDUP_MEMORY=$BIN_DIR/dedup_memory
else
    log "building (cargo bench --no-run: the release profile)"
    cargo bench --no-run --bench loadgen --bench backend --bench dedup_memory --bench hot_paths \
        --message-format=json-render-diagnostics >"$OUT/build.json" 2>"$OUT/build.log" ||
        { tail -30 "$OUT/build.log"; exit 1; }
    exe_of() { # target name
        python3 -c 'import json, sys
paths = [m["executable"] for m in map(json.loads, open(sys.argv[1]))
         if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[2] and m.get("executable")]
print(paths[-1] if paths else "")' "$OUT/build.json" "$1"
    }
    GATEWAY=$(exe_of bars-gateway)
    LOADGEN=$(exe_of loadgen)
    BACKEND=$(exe_of backend)
    DEDUP_MEMORY=$(exe_of dedup_memory)
fi
for exe in "$GATEWAY" "$LOADGEN" "$BACKEND" "$DEDUP_MEMORY"; do
    [ -n "$exe" ] && [ -x "$exe" ] || { log "missing executable for the bench: '$exe' (see $OUT/build.json)"; exit 1; }
done

# ---------------------------------------------------------------------------------------------
# 2. PKI: one CA, RSA-2048 server and client keys, made the way operators make them.
log "PKI: openssl, RSA-2048"
P=$WORK/pki
# shellcheck source=scripts/lib/pki.sh
. "$ROOT/scripts/lib/pki.sh"
make_pki "$P" "Bench NHS Root" "$CN" wrong >"$OUT/pki.log" 2>&1

# ---------------------------------------------------------------------------------------------
# 3. Ports (loopback, below the ephemeral range) and the servers.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
BASE=${BENCH_PORT_BASE:-$((20000 + (RANDOM % 400) * 20))}
for _ in $(seq 20); do
    if port_free $BASE && port_free $((BASE + 1)) && port_free $((BASE + 2)) && port_free $((BASE + 3)) && port_free $((BASE + 4)) && port_free $((BASE + 5)); then break; fi
    BASE=$((20000 + (RANDOM % 400) * 20))
done
BACKEND_PORT=$BASE GW_PORT=$((BASE + 1)) NGX1_PORT=$((BASE + 2)) NGXA_PORT=$((BASE + 3)) ADMIN_PORT=$((BASE + 4)) HAP_PORT=$((BASE + 5))

wait_port() { # port what
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    log "$2 did not start listening on $1"
    return 1
}

# Lifetime bound: the backend exits by itself after an hour even if this script is killed -9.
"$BACKEND" "127.0.0.1:$BACKEND_PORT" 3600 >"$OUT/backend.log" 2>&1 &
BACKEND_PID=$!
STARTED_PIDS+=("$BACKEND_PID")
wait_port "$BACKEND_PORT" backend

if [ "$AUDIT" = 1 ]; then LOG_LEVEL='warn,audit=info' AUDIT_FLAG=true; else LOG_LEVEL=warn AUDIT_FLAG=false; fi
cat >"$WORK/gateway.toml" <<EOF
[listen]
address = "127.0.0.1:$GW_PORT"
max_connections = 20000
# hyper's header_read_timeout also runs while a keep-alive connection waits for its next request,
# so with the 10 s default every idle connection closes after 10 s (idle_timeout is 60 s): the
# 10,000-connection test takes longer than that to open them all. 60 s = idle_timeout.
header_read_timeout = "60s"

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
strip_headers = ["Authorization"]

[bars]
require_identity_headers = true
accepted_major_versions = [1]
allowed_paths = "bars"

[dedup]
store = "memory"
max_entries = 1000000

[admin]
address = "127.0.0.1:$ADMIN_PORT"

[log]
level = "$LOG_LEVEL"
format = "json"
audit = $AUDIT_FLAG
EOF
cp "$WORK/gateway.toml" "$OUT/gateway.toml"
if [ "$AUDIT" = 1 ]; then GW_LOG=/dev/null; else GW_LOG=$OUT/gateway.log; fi
"$GATEWAY" run --config "$WORK/gateway.toml" >"$GW_LOG" 2>&1 &
GW_PID=$!
STARTED_PIDS+=("$GW_PID")
wait_port "$GW_PORT" bars-gateway

# nginx with the equivalent policy: verified client certificate from the same CA, CN check,
# loopback allow-list, Authorization stripped, X-Forwarded-For, HTTP/1.1 keep-alive upstream.
nginx_conf() { # dir port workers
    mkdir -p "$1/logs"
    cat >"$1/nginx.conf" <<EOF
worker_processes $3;
worker_rlimit_nofile 65536;
pid $1/nginx.pid;
error_log $1/logs/error.log warn;
events { worker_connections 20000; }
http {
    access_log off;
    client_body_temp_path $1/client_body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    # the CN of the verified client certificate (RFC 2253 subject, CN first)
    map \$ssl_client_s_dn \$client_allowed {
        default 0;
        "~^CN=bars-proxy\\.spineservices\\.nhs\\.uk(,|\$)" 1;
    }
    upstream legacy {
        server 127.0.0.1:$BACKEND_PORT;
        keepalive 256;
    }
    server {
        listen 127.0.0.1:$2 ssl backlog=4096;
        ssl_certificate $P/server.pem;
        ssl_certificate_key $P/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_client_certificate $P/ca.pem;
        ssl_verify_client on;
        # the 35 KB body stays in memory (the gateway buffers it for dedup too)
        client_body_buffer_size 64k;
        client_max_body_size 10m;
        # the default (1000) closes a keep-alive connection every 1000 requests: a new handshake
        # the gateway never asks for
        keepalive_requests 1000000;
        allow 127.0.0.1;
        deny all;
        location / {
            if (\$client_allowed = 0) { return 403; }
            proxy_pass http://legacy;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Client-Cert-Subject \$ssl_client_s_dn;
        }
    }
}
EOF
}
start_nginx() { # dir port workers -> pid in NGINX_PID
    nginx_conf "$1" "$2" "$3"
    nginx -t -p "$1" -c "$1/nginx.conf" >"$1/logs/test.log" 2>&1 || { cat "$1/logs/test.log"; exit 1; }
    nginx -p "$1" -c "$1/nginx.conf" -g 'daemon off;' >"$1/logs/stdout.log" 2>&1 &
    NGINX_PID=$!
    STARTED_PIDS+=("$NGINX_PID")
    wait_port "$2" "nginx ($3 workers)"
}
start_nginx "$WORK/nginx1" "$NGX1_PORT" 1
NGX1_PID=$NGINX_PID
start_nginx "$WORK/nginxa" "$NGXA_PORT" auto
NGXA_PID=$NGINX_PID
cp "$WORK/nginx1/nginx.conf" "$OUT/nginx-1worker.conf"

# haproxy, the best peer measured so far, with the same policy: TLS-MA against the same CA,
# the CN check, the loopback allow-list (before TLS), Authorization stripped, X-Forwarded-For,
# keep-alive upstream connections shared between clients (`http-reuse always`), two threads.
HAP_PIDS=""
if [ "$SKIP_HAPROXY" != 1 ]; then
    H=$WORK/haproxy
    mkdir -p "$H"
    cat "$P/server.pem" "$P/server.key" >"$H/server-with-key.pem"
    cat >"$H/haproxy.cfg" <<HAPEOF
global
    nbthread 2
    maxconn 20000
    # the container's hard descriptor limit may be below the 2 x maxconn haproxy asks for; the
    # idle-connection test needs one descriptor per client connection (plus a few upstream)
    no strict-limits
    pidfile $H/haproxy.pid
    log stderr format raw local0 warning
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode http
    log global
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 60s
    timeout http-keep-alive 60s
frontend bars
    bind 127.0.0.1:$HAP_PORT ssl crt $H/server-with-key.pem ca-file $P/ca.pem verify required alpn http/1.1 backlog 4096
    maxconn 20000
    tcp-request connection reject unless { src 127.0.0.1 }
    http-request deny deny_status 403 unless { ssl_c_s_dn(CN) -m str $CN }
    http-request del-header Authorization
    http-request set-header X-Forwarded-Proto https
    http-request set-header X-Client-Cert-Subject %[ssl_c_s_dn]
    option forwardfor
    default_backend legacy
backend legacy
    http-reuse always
    server legacy 127.0.0.1:$BACKEND_PORT
HAPEOF
    cp "$H/haproxy.cfg" "$OUT/haproxy.cfg"
    haproxy -c -f "$H/haproxy.cfg" >"$OUT/haproxy-check.log" 2>&1 || { cat "$OUT/haproxy-check.log"; exit 1; }
    haproxy -db -f "$H/haproxy.cfg" >"$OUT/haproxy.log" 2>&1 &
    HAP_PID=$!
    STARTED_PIDS+=("$HAP_PID")
    wait_port "$HAP_PORT" haproxy
fi

# Gateway variants: the same binary and config on other ports, another environment.
VARIANT_SERVERS=()
i=0
for variant in $GATEWAY_VARIANTS; do
    name=${variant%%:*}
    envs=${variant#*:}
    port=$((BASE + 6 + i))
    i=$((i + 1))
    sed -e "s/^address = \"127.0.0.1:$GW_PORT\"/address = \"127.0.0.1:$port\"/" \
        -e "s/^address = \"127.0.0.1:$ADMIN_PORT\"/address = \"\"/" "$WORK/gateway.toml" >"$WORK/gateway-$name.toml"
    # GATEWAY_BIN=path in a variant runs another build of the gateway (e.g. other features).
    exe=$GATEWAY
    for kv in ${envs//,/ }; do
        case $kv in GATEWAY_BIN=*) exe=${kv#GATEWAY_BIN=} ;; esac
    done
    # shellcheck disable=SC2086 # VAR=value words for env
    env ${envs//,/ } "$exe" run --config "$WORK/gateway-$name.toml" >"$OUT/gateway-$name.log" 2>&1 &
    STARTED_PIDS+=("$!")
    VARIANT_SERVERS+=("gateway-$name $port $!")
    wait_port "$port" "gateway-$name"
done
sleep 1

# A server's processes: the gateway is one; nginx is its master and workers.
pids_of() { # master pid -> comma list
    local kids
    kids=$(pgrep -P "$1" | paste -sd, -)
    if [ -n "$kids" ]; then echo "$1,$kids"; else echo "$1"; fi
}
rss_kb() { # comma list of pids -> summed VmRSS kB
    local total=0 pid kb
    for pid in ${1//,/ }; do
        kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$((total + ${kb:-0}))
    done
    echo "$total"
}
GW_PIDS=$GW_PID
NGX1_PIDS=$(pids_of "$NGX1_PID")
NGXA_PIDS=$(pids_of "$NGXA_PID")
[ "$SKIP_HAPROXY" = 1 ] || HAP_PIDS=$(pids_of "$HAP_PID")
log "ports: backend $BACKEND_PORT, gateway $GW_PORT, nginx-1w $NGX1_PORT ($NGX1_PIDS), nginx-auto $NGXA_PORT ($NGXA_PIDS), haproxy $HAP_PORT (${HAP_PIDS:-skipped})"

# ---------------------------------------------------------------------------------------------
# 4. Idle RSS, before any traffic.
RESULTS=$OUT/results.txt
: >"$RESULTS"
echo "IDLE label=gateway rss_kb=$(rss_kb "$GW_PIDS") pids=$GW_PIDS" >>"$RESULTS"
echo "IDLE label=nginx-1w rss_kb=$(rss_kb "$NGX1_PIDS") pids=$NGX1_PIDS" >>"$RESULTS"
echo "IDLE label=nginx-auto rss_kb=$(rss_kb "$NGXA_PIDS") pids=$NGXA_PIDS" >>"$RESULTS"
[ -z "$HAP_PIDS" ] || echo "IDLE label=haproxy rss_kb=$(rss_kb "$HAP_PIDS") pids=$HAP_PIDS" >>"$RESULTS"
for s in "${VARIANT_SERVERS[@]}"; do
    set -- $s
    echo "IDLE label=$1 rss_kb=$(rss_kb "$3") pids=$3" >>"$RESULTS"
done
cat "$RESULTS" >&2

# ---------------------------------------------------------------------------------------------
# 5. Same policy? The right client gets 200 from both; a wrong CN is refused by both (the
#    gateway in the handshake, nginx with 403 after it).
policy() { # port cert
    curl -s -o /dev/null -w '%{http_code}' --max-time 5 --cacert "$P/ca.pem" --cert "$P/$2.pem" --key "$P/$2.key" \
        -H "X-Request-Id: $(cat /proc/sys/kernel/random/uuid)" -H "X-Correlation-Id: $(cat /proc/sys/kernel/random/uuid)" \
        -H "Accept: application/fhir+json; version=1.0.0" "https://localhost:$1/metadata" || true
}
POLICY_SERVERS=("gateway $GW_PORT" "nginx-1w $NGX1_PORT" "nginx-auto $NGXA_PORT")
[ -z "$HAP_PIDS" ] || POLICY_SERVERS+=("haproxy $HAP_PORT")
for s in "${POLICY_SERVERS[@]}"; do
    set -- $s
    echo "POLICY label=$1 proxy_cn=$(policy "$2" client) wrong_cn=$(policy "$2" wrong)" >>"$RESULTS"
done
grep POLICY "$RESULTS" >&2

loadgen() { # label port pids mode conc [extra args]
    local label=$1 port=$2 pids=$3 mode=$4 conc=$5
    shift 5
    "$LOADGEN" --addr "127.0.0.1:$port" --mode "$mode" --concurrency "$conc" \
        --ca "$P/ca.pem" --cert "$P/client.pem" --key "$P/client.key" \
        --headers "$FIXTURES/headers-examples.json" \
        --body "$FIXTURES/process-message-validation-request.json" \
        --label "$label" --server-pids "$pids" "$@" 2>>"$OUT/loadgen.log"
}
SERVERS=("gateway $GW_PORT $GW_PIDS" "nginx-1w $NGX1_PORT $NGX1_PIDS" "nginx-auto $NGXA_PORT $NGXA_PIDS")
[ -z "$HAP_PIDS" ] || SERVERS+=("haproxy $HAP_PORT $HAP_PIDS")

# ---------------------------------------------------------------------------------------------
# 6. RSS at N idle TLS connections (one request each, then idle), servers one at a time. The
#    variants too: every gateway then enters the rounds with the same history (opening and
#    closing 10,000 connections leaves an allocator's heap fragmented).
if [ "${SKIP_HOLD:-0}" != 1 ]; then
    for s in "${SERVERS[@]}" "${VARIANT_SERVERS[@]}"; do
        set -- $s
        log "hold: $HOLD_CONNS idle TLS connections to $1"
        loadgen "$1" "$2" "$3" hold 64 --connections "$HOLD_CONNS" --duration 90 --hold 3 \
            | tee -a "$RESULTS" >&2 || log "hold run against $1 failed"
        sleep 3
    done
fi

# ---------------------------------------------------------------------------------------------
# 7. Throughput: alternating rounds, the server order reversed every other round.
conc_of() { case $1 in get) echo "$CONC_GET" ;; post) echo "$CONC_POST" ;; connect) echo "$CONC_CONNECT" ;; esac; }
# The servers of a round, in `order`: as given in odd rounds, reversed in even ones.
round_order() { # round servers...
    local round=$1 k
    shift
    order=("$@")
    if [ $((round % 2)) = 0 ]; then
        order=()
        for ((k = $#; k >= 1; k--)); do order+=("${!k}"); done
    fi
}
for round in $(seq "$ROUNDS"); do
    round_order "$round" "${SERVERS[@]}" "${VARIANT_SERVERS[@]}"
    for mode in $MODES; do
        for s in "${order[@]}"; do
            set -- $s
            log "round $round: $mode -> $1"
            line=$(loadgen "$1" "$2" "$3" "$mode" "$(conc_of "$mode")" --duration "$ROUND_SECS" --warmup "$WARMUP") || line=""
            if [ -z "$line" ]; then log "loadgen failed against $1 ($mode)"; continue; fi
            echo "$line round=$round" | tee -a "$RESULTS" >&2
        done
    done
done
echo "AFTER label=gateway rss_kb=$(rss_kb "$GW_PIDS")" >>"$RESULTS"
echo "AFTER label=nginx-1w rss_kb=$(rss_kb "$NGX1_PIDS")" >>"$RESULTS"
echo "AFTER label=nginx-auto rss_kb=$(rss_kb "$NGXA_PIDS")" >>"$RESULTS"
[ -z "$HAP_PIDS" ] || echo "AFTER label=haproxy rss_kb=$(rss_kb "$HAP_PIDS")" >>"$RESULTS"

# ---------------------------------------------------------------------------------------------
# 7b. The added latency a user feels: a fixed moderate rate, open loop, through each proxy and
#     to the backend directly (plain HTTP, the baseline), alternating; summarize.py subtracts.
for round in $(seq "$RATE_ROUNDS"); do
    round_order "$round" "direct $BACKEND_PORT $BACKEND_PID" "${SERVERS[@]}"
    for s in "${order[@]}"; do
        set -- $s
        log "round $round: $RATE req/s open loop -> $1"
        extra=()
        [ "$1" = direct ] && extra=(--plain)
        line=$(loadgen "$1" "$2" "$3" rate "$RATE_CONNS" --rate "$RATE" --duration "$RATE_SECS" --warmup "$WARMUP" "${extra[@]}") || line=""
        if [ -z "$line" ]; then log "loadgen failed against $1 (rate)"; continue; fi
        echo "$line round=$round" | tee -a "$RESULTS" >&2
    done
done
curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$OUT/gateway-metrics.txt" || true
echo "METRICS $(grep -E '^bars_gateway_(dedup_total|requests_total|rejections_total)' "$OUT/gateway-metrics.txt" | tr '\n' ' ')" >>"$RESULTS"

# ---------------------------------------------------------------------------------------------
# 8. Optional: where the gateway's CPU goes (flat profile, symbols from the release binary).
if [ "$PROFILE" = 1 ] && command -v perf >/dev/null 2>&1; then
    for mode in ${PROFILE_MODES:-get post connect}; do
        log "profile: perf record the gateway during $mode"
        # shellcheck disable=SC2086 # PERF_ARGS is a list of options
        perf record ${PERF_ARGS:--F 999 -e cpu-clock} -p "$GW_PID" -o "$OUT/perf-$mode.data" -- sleep "$((ROUND_SECS + WARMUP))" \
            >"$OUT/perf-$mode.log" 2>&1 &
        PERF_PID=$!
        loadgen gateway "$GW_PORT" "$GW_PIDS" "$mode" "$(conc_of "$mode")" --duration "$ROUND_SECS" --warmup "$WARMUP" \
            >"$OUT/perf-$mode.result" || true
        wait "$PERF_PID" || true
        perf report -i "$OUT/perf-$mode.data" --no-children --sort dso,symbol --stdio 2>/dev/null |
            cut -c1-220 >"$OUT/perf-$mode.txt" || true
        python3 "$ROOT/benches/perf_buckets.py" "$mode" "$OUT/perf-$mode.txt" >>"$RESULTS" || true
    done
fi

# ---------------------------------------------------------------------------------------------
# 9. Dedup memory store at 1M entries, and the microbenchmarks (servers stopped: less noise).
cleanup_servers() {
    local pid
    for pid in "$GW_PID" "$NGX1_PID" "$NGXA_PID" "${HAP_PID:-}" "$BACKEND_PID"; do [ -z "$pid" ] || kill "$pid" 2>/dev/null || true; done
    for pid in "$GW_PID" "$NGX1_PID" "$NGXA_PID" "${HAP_PID:-}" "$BACKEND_PID"; do
        [ -n "$pid" ] || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
}
cleanup_servers
if [ "${SKIP_DEDUP:-0}" != 1 ]; then
    log "dedup memory store: 1,000,000 entries"
    for variant in "store" "store --reference" "hashmap-fifo"; do
        # shellcheck disable=SC2086 # the variant carries its own flags
        "$DEDUP_MEMORY" 1000000 --variant $variant | tee -a "$RESULTS" >&2
    done
fi
if [ "${SKIP_MICRO:-0}" != 1 ]; then
    log "criterion microbenchmarks (short)"
    if [ -n "${BIN_DIR:-}" ]; then HOT_PATHS=("$BIN_DIR/hot_paths" --bench); else HOT_PATHS=(cargo bench --bench hot_paths --); fi
    "${HOT_PATHS[@]}" --warm-up-time 1 --measurement-time 3 --noplot 2>/dev/null |
        tee "$OUT/hot_paths.txt" | grep -E '^[a-z].*|time:|thrpt:' >&2 || true
fi
echo "uptime at end: $(uptime)" | tee -a "$OUT/machine.txt" >&2

python3 "$ROOT/benches/summarize.py" "$RESULTS" "$OUT/machine.txt" | tee "$OUT/summary.md"
log "results in $OUT"
