#!/usr/bin/env bash
# TLS scan (issue 9): scripts/tls-scan.sh [--out DIR]
#
# Scans a running gateway with sslyze (the PyPI package) and asserts the TLS policy:
# only TLS 1.2/1.3; only forward-secret AEAD suites; no insecure or client-initiated
# renegotiation; no compression; a client certificate requested and required; not vulnerable to
# Heartbleed, ROBOT or CCS injection; TLS_FALLBACK_SCSV honoured; no TLS 1.2 session tickets; only
# strong curves; no 0-RTT early data; extended master secret; the configured chain served;
# Mozilla's "intermediate" profile met. Session resumption, cipher suite order and OCSP stapling
# are reported as INFO.
#
# It makes a throwaway RSA-2048 PKI with openssl (as benches/run.sh does), starts the gateway on
# a free loopback port (listen port 0, read back from the "bars-gateway listening" log line) with
# an upstream that is not listening (a handshake scan needs none), runs sslyze twice (with the
# client certificate, and without one) plus a few openssl s_client probes, and evaluates the
# JSON. Prints one PASS/FAIL/INFO line per check and a verdict; writes OUT/summary.md, the
# sslyze JSON and text, and the probes' output. Exit 0 PASS, 1 FAIL, 2 could not scan.
#
# Environment: BIN=path/to/bars-gateway (used as is, nothing is built; default
# target/release/bars-gateway, built with `cargo build --release` when missing, and not rebuilt
# when stale), OUT=dir (default target/tls-scan).
set -euo pipefail
CALLER=$(pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/target/tls-scan}
while [ $# -gt 0 ]; do
    case $1 in
        --out) OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
case $OUT in /*) ;; *) OUT=$CALLER/$OUT ;; esac
case ${BIN:-/} in /*) ;; *) BIN=$CALLER/$BIN ;; esac
for tool in sslyze openssl python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "tls-scan: $tool not on PATH (sslyze: pip install sslyze)" >&2; exit 2; }
done
if [ -z "${BIN:-}" ]; then
    BIN=$ROOT/target/release/bars-gateway
    [ -x "$BIN" ] || cargo build --release --bin bars-gateway
fi
[ -x "$BIN" ] || { echo "tls-scan: not an executable: $BIN" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/*.json "$OUT"/*.txt "$OUT"/*.log "$OUT"/summary.md
WORK=$(mktemp -d /tmp/bars-tls-scan.XXXXXX)
GW_PID=
cleanup() {
    if [ -n "$GW_PID" ]; then
        kill "$GW_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$GW_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$GW_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log() { printf 'tls-scan: %s\n' "$*" >&2; }
trap 'log "stopped: a command failed at line $LINENO (exit $?)"' ERR

# 1. PKI: one CA, RSA-2048 server and client (the BaRS proxy's CN) certificates.
P=$WORK/pki
CN=bars-proxy.spineservices.nhs.uk
# shellcheck source=scripts/lib/pki.sh
. "$ROOT/scripts/lib/pki.sh"
make_pki "$P" "Scan NHS Root" "$CN" >"$OUT/pki.log" 2>&1 || { cat "$OUT/pki.log" >&2; exit 2; }

# 2. The gateway: port 0, no admin listener, an upstream nothing listens on (port 9, discard).
cat >"$WORK/gateway.toml" <<EOF
[listen]
address = "127.0.0.1:0"

[tls]
certificate = "$P/server.pem"
private_key = "$P/server.key"
client_ca = ["$P/ca.pem"]
min_version = "1.2"

[client]
environment = "custom"
allowed_ips = ["127.0.0.1/32"]
allowed_subjects = ["$CN"]

[upstream]
url = "http://127.0.0.1:9"

[admin]
address = ""

[log]
level = "info"
format = "json"
audit = false
EOF
"$BIN" check --config "$WORK/gateway.toml" >"$OUT/check.txt" 2>&1 ||
    { cat "$OUT/check.txt" >&2; log "the scan config does not validate"; exit 2; }
"$BIN" run --config "$WORK/gateway.toml" >"$OUT/gateway.log" 2>&1 &
GW_PID=$!
PORT=
for _ in $(seq 100); do
    PORT=$(sed -n '/"bars-gateway listening"/s/.*"address":"127\.0\.0\.1:\([0-9]*\)".*/\1/p' "$OUT/gateway.log")
    [ -n "$PORT" ] && break
    kill -0 "$GW_PID" 2>/dev/null || break
    sleep 0.1
done
[ -n "$PORT" ] || { cat "$OUT/gateway.log" >&2; log "the gateway did not start listening"; exit 2; }
TARGET=127.0.0.1:$PORT
log "gateway $("$BIN" --version) on $TARGET ($BIN)"

# 3. sslyze: every scan command, with the client certificate (and Mozilla's intermediate profile,
#    checked against the scan's own CA), then without one.
SCANS=(--certinfo --certinfo_ca_file "$P/ca.pem" --sslv2 --sslv3 --tlsv1 --tlsv1_1 --tlsv1_2 --tlsv1_3
    --compression --reneg --resum --early_data --heartbleed --robot --openssl_ccs --fallback
    --elliptic_curves --ems --http_headers)
log "sslyze $(sslyze --help | sed -n 's/^SSLyze version //p') with a client certificate"
sslyze --json_out="$OUT/sslyze-client-cert.json" --cert "$P/client.pem" --key "$P/client.key" \
    "${SCANS[@]}" --mozilla_config intermediate "$TARGET" >"$OUT/sslyze-client-cert.txt" 2>&1 || true
log "sslyze without a client certificate"
sslyze --json_out="$OUT/sslyze-no-client-cert.json" "${SCANS[@]}" --mozilla_config disable "$TARGET" \
    >"$OUT/sslyze-no-client-cert.txt" 2>&1 || true

# 4. openssl probes: the alert a client without a certificate gets (-ign_eof: in TLS 1.3 the alert
#    comes after the client's Finished, so keep reading), and whose suite order wins.
probe() { # out-name s_client-args...
    local name=$1; shift
    timeout 30 openssl s_client -connect "$TARGET" -CAfile "$P/ca.pem" "$@" </dev/null \
        >"$OUT/openssl-$name.txt" 2>&1 || true
}
probe no-cert-tls1_2 -tls1_2 -ign_eof
probe no-cert-tls1_3 -tls1_3 -ign_eof
WITH_CERT=(-cert "$P/client.pem" -key "$P/client.key")
probe order-tls1_2-a "${WITH_CERT[@]}" -tls1_2 -cipher ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384
probe order-tls1_2-b "${WITH_CERT[@]}" -tls1_2 -cipher ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256
probe order-tls1_3-a "${WITH_CERT[@]}" -tls1_3 -ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384
probe order-tls1_3-b "${WITH_CERT[@]}" -tls1_3 -ciphersuites TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256

# 5. Evaluate (exit 1 on a FAIL is the verdict, not an error).
trap - ERR
BARS_GATEWAY_VERSION=$("$BIN" --version) OPENSSL_VERSION=$(openssl version) TARGET=$TARGET BIN=$BIN \
    python3 - "$OUT" <<'PY'
import json, os, re, sys

out = sys.argv[1]
rows, infos = [], []


def check(cid, requirement, ok, detail):
    rows.append((cid, requirement, "PASS" if ok else "FAIL", detail))
    print(f"{'PASS' if ok else 'FAIL'}  {cid}: {requirement}: {detail}")


def info(text):
    infos.append(text)
    print(f"INFO  {text}")


def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            d = json.load(f)
        return d, d["server_scan_results"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        sys.exit(f"tls-scan: cannot read {name}: {e}")


def text(name):
    with open(os.path.join(out, name), errors="replace") as f:
        return f.read()


doc, cert_run = load("sslyze-client-cert.json")
_, bare_run = load("sslyze-no-client-cert.json")
ok_conn = all(r["connectivity_status"] == "COMPLETED" for r in (cert_run, bare_run))
if not ok_conn:
    sys.exit("tls-scan: sslyze could not connect: "
             + (cert_run.get("connectivity_error_trace") or bare_run.get("connectivity_error_trace") or "?"))
S = cert_run["scan_result"]
N = bare_run["scan_result"]


def res(run, key):
    return run[key]["result"] if run[key]["status"] == "COMPLETED" else None


errors = sorted(k for k, v in S.items() if v["status"] == "ERROR")
check("scan-complete", "every sslyze scan command completed with the client certificate",
      not errors, "all completed" if not errors else "errors: " + ", ".join(
          f"{k} ({S[k]['error_reason']})" for k in errors))

# Protocols, in both runs (the ServerHello comes before the certificate request).
VERSIONS = [("ssl_2_0", "SSL 2.0"), ("ssl_3_0", "SSL 3.0"), ("tls_1_0", "TLS 1.0"),
            ("tls_1_1", "TLS 1.1"), ("tls_1_2", "TLS 1.2"), ("tls_1_3", "TLS 1.3")]


def versions(run):
    r = {}
    for key, name in VERSIONS:
        v = res(run, key + "_cipher_suites")
        r[name] = None if v is None else v["is_tls_version_supported"]
    return r


cv, nv = versions(S), versions(N)
want = {name: name in ("TLS 1.2", "TLS 1.3") for _, name in VERSIONS}
check("protocols", "only TLS 1.2 and TLS 1.3", cv == want and nv == want,
      "accepted: " + ", ".join(n for n, s in cv.items() if s) + "; refused: "
      + ", ".join(n for n, s in cv.items() if s is False)
      + ("" if nv == cv else f"; without a client certificate: {nv}"))


# Cipher suites, every version: AEAD (GCM, CCM, ChaCha20-Poly1305) and forward secret (TLS 1.3, or
# ECDHE/DHE in TLS 1.2 with an ephemeral key of at least 2048-bit DH or a 253-bit curve).
def accepted(run):
    r = {}
    for key, name in VERSIONS:
        v = res(run, key + "_cipher_suites")
        r[name] = [] if v is None else [(s["cipher_suite"]["name"], s["ephemeral_key"])
                                        for s in v["accepted_cipher_suites"]]
    return r


def suite_ok(version, name, eph):
    aead = re.search(r"_(AES_(128|256)_GCM|AES_(128|256)_CCM|CHACHA20_POLY1305)_", name + "_")
    if not aead or "_CCM_8" in name or "anon" in name.lower():
        return False
    if version == "TLS 1.3":
        return True
    if version != "TLS 1.2" or not re.match(r"TLS_(ECDHE|DHE)_(RSA|ECDSA)_WITH_", name) or not eph:
        return False
    return eph["size"] >= (2048 if eph["type_name"] == "DH" else 253)


ca, na = accepted(S), accepted(N)
bad = [f"{n} ({v})" for v, ss in ca.items() for n, e in ss if not suite_ok(v, n, e)]
names = {v: [n for n, _ in ss] for v, ss in ca.items()}
same = names == {v: [n for n, _ in ss] for v, ss in na.items()}
check("cipher-suites", "only forward-secret AEAD cipher suites",
      any(names.values()) and not bad and same,
      "; ".join(f"{v}: {', '.join(ns)}" for v, ns in reversed(names.items()) if ns)
      + (f"; NOT forward-secret AEAD: {', '.join(bad)}" if bad else "")
      + ("" if same else "; the run without a client certificate saw other suites"))

reneg = res(S, "session_renegotiation")
check("insecure-renegotiation", "no insecure renegotiation (RFC 5746 secure renegotiation indicated)",
      bool(reneg) and reneg["supports_secure_renegotiation"],
      "renegotiation_info acknowledged" if reneg and reneg["supports_secure_renegotiation"]
      else f"result: {reneg}")
check("client-renegotiation", "no client-initiated renegotiation",
      bool(reneg) and not reneg["is_vulnerable_to_client_renegotiation_dos"],
      f"{reneg['client_renegotiations_success_count']} client renegotiations accepted" if reneg
      else "not scanned")

comp = res(S, "tls_compression")
check("compression", "no TLS compression (CRIME)", comp is not None and not comp["supports_compression"],
      "deflate refused" if comp and not comp["supports_compression"] else f"result: {comp}")

# Client certificate: sslyze's connectivity test without one, the scans that need a finished
# handshake, openssl's view, and the run with one.
auth = bare_run["connectivity_result"]["client_auth_requirement"]
needed = sorted(k for k, v in N.items() if v["status"] == "ERROR"
                and v["error_reason"] == "CLIENT_CERTIFICATE_NEEDED")
alerts = {}
for v in ("tls1_2", "tls1_3"):
    m = re.search(r"alert ([a-z ]+):.*SSL alert number (\d+)", text(f"openssl-no-cert-{v}.txt"))
    alerts[v] = f"{m.group(1)} ({m.group(2)})" if m else None
requested = "Acceptable client certificate CA names" in text("openssl-no-cert-tls1_2.txt")
check("client-certificate", "a client certificate is requested and required",
      auth == "REQUIRED" and requested and all(alerts.values()) and not errors
      and all("certificate required" in a for a in alerts.values()),
      f"sslyze without a certificate: client_auth_requirement={auth}, "
      f"{len(needed)} scans stopped with CLIENT_CERTIFICATE_NEEDED ({', '.join(needed)}); "
      f"openssl without a certificate gets alert {alerts['tls1_2']} over TLS 1.2 and "
      f"{alerts['tls1_3']} over TLS 1.3; with the proxy's certificate every scan completes")

hb = res(S, "heartbleed")
check("heartbleed", "not vulnerable to Heartbleed", hb is not None and not hb["is_vulnerable_to_heartbleed"],
      "not vulnerable" if hb and not hb["is_vulnerable_to_heartbleed"] else f"result: {hb}")
robot = res(S, "robot")
robot_ok = robot is not None and robot["robot_result"] in (
    "NOT_VULNERABLE_NO_ORACLE", "NOT_VULNERABLE_RSA_NOT_SUPPORTED")
check("robot", "not vulnerable to ROBOT", robot_ok, robot["robot_result"] if robot else "not scanned")
ccs = res(S, "openssl_ccs_injection")
check("ccs-injection", "not vulnerable to OpenSSL CCS injection (CVE-2014-0224)",
      ccs is not None and not ccs["is_vulnerable_to_ccs_injection"],
      "not vulnerable" if ccs and not ccs["is_vulnerable_to_ccs_injection"] else f"result: {ccs}")
fb = res(S, "tls_fallback_scsv")
check("fallback-scsv", "TLS_FALLBACK_SCSV honoured (downgrade protection)",
      fb is not None and fb["supports_fallback_scsv"],
      "supported" if fb and fb["supports_fallback_scsv"] else f"result: {fb}")

resum = res(S, "session_resumption")
check("session-resumption", "no TLS 1.2 session tickets (resumption state stays in the server's cache)",
      resum is not None and resum["tls_ticket_resumption_result"] == "NOT_SUPPORTED",
      (f"tickets: {resum['tls_ticket_resumption_result']} "
       f"({resum['tls_ticket_successful_resumptions_count']}/{resum['tls_ticket_attempted_resumptions_count']}); "
       f"session IDs: {resum['session_id_resumption_result']} "
       f"({resum['session_id_successful_resumptions_count']}/{resum['session_id_attempted_resumptions_count']})")
      if resum else "not scanned")

curves = res(S, "elliptic_curves")
STRONG = {"X25519", "X448", "secp256r1", "secp384r1", "secp521r1"}
names = [c["name"] for c in curves["supported_curves"]] if curves else []
check("elliptic-curves", "only strong named groups (X25519, X448, P-256, P-384, P-521)",
      bool(names) and set(names) <= STRONG,
      "supported: " + ", ".join(names) + (f"; weak: {sorted(set(names) - STRONG)}" if set(names) - STRONG else ""))

ed = res(S, "tls_1_3_early_data")
check("early-data", "no TLS 1.3 early data (0-RTT is replayable)", ed is not None and not ed["supports_early_data"],
      "not accepted" if ed and not ed["supports_early_data"] else f"result: {ed}")
ems = res(S, "tls_extended_master_secret")
check("extended-master-secret", "TLS 1.2 extended master secret (RFC 7627)",
      ems is not None and ems["supports_ems_extension"],
      "supported" if ems and ems["supports_ems_extension"] else f"result: {ems}")

ci = res(S, "certificate_info")
if ci:
    dep = ci["certificate_deployments"][0]
    leaf = dep["received_certificate_chain"][0]
    pk = leaf["public_key"]
    supplied = [p for p in dep["path_validation_results"] if p["trust_store"]["name"].startswith("Supplied")]
    verified = bool(supplied and supplied[0]["verified_certificate_chain"])
    strong_key = (pk["algorithm"] == "RSAPublicKey" and pk["key_size"] >= 2048) or \
                 (pk["algorithm"] == "EllipticCurvePublicKey" and pk["key_size"] >= 256)
    cert_ok = (verified and dep["received_chain_has_valid_order"] is not False
               and not dep["verified_chain_has_sha1_signature"] and strong_key)
    check("certificate", "the configured chain is served: verifies, leaf first, no SHA-1, strong key",
          cert_ok,
          f"{leaf['subject']['rfc4514_string']} issued by {leaf['issuer']['rfc4514_string']}, "
          f"{pk['algorithm'].replace('PublicKey', '')} {pk['key_size']} bits, "
          f"{leaf['signature_hash_algorithm']['name']}, verified against the scan CA: {verified}, "
          f"order valid: {dep['received_chain_has_valid_order']}, SHA-1 in chain: "
          f"{dep['verified_chain_has_sha1_signature']}")
    info(f"OCSP stapling: {'yes' if dep['ocsp_response'] else 'not supported (no OCSP response stapled)'}; "
         f"OCSP must-staple extension: {dep['leaf_certificate_has_must_staple_extension']}")
else:
    check("certificate", "the configured chain is served", False, "certificate_info did not complete")

moz = re.search(r"Checking results against Mozilla's \"intermediate\".*?\n\s*\n\s*\S+: (.*?)(?:\n\s*\n|\Z)",
                text("sslyze-client-cert.txt"), re.S)
moz_line = " ".join(moz.group(1).split()) if moz else "no compliance result in sslyze's output"
check("mozilla-intermediate", "compliant with Mozilla's \"intermediate\" TLS configuration",
      moz_line.startswith("OK - Compliant"), moz_line)


# Informational.
def chosen(name):
    m = re.search(r"Cipher is (\S+)", text(f"openssl-{name}.txt"))
    return m.group(1) if m else "?"


for v in ("tls1_2", "tls1_3"):
    a, b = chosen(f"order-{v}-a"), chosen(f"order-{v}-b")
    if a != b:
        who = "the client's order (the server imposes none)"
    else:
        who = f"the server's order ({a})"
    info(f"suite selection, {v.replace('tls1_', 'TLS 1.')}: offered AES-128-GCM first -> {a}, "
         f"AES-256-GCM first -> {b}: {who}")
if resum:
    info(f"TLS 1.2 session-ID resumption: {resum['session_id_resumption_result']}; "
         "TLS 1.3 resumption is not scanned by sslyze")
hh = res(S, "http_headers")
if hh:
    info("HTTP response to sslyze's GET /: " + (hh.get("http_error_trace") or "answered")
         + f"; HSTS header: {'present' if hh['strict_transport_security_header'] else 'absent'}")
info(f"connectivity: highest version {cert_run['connectivity_result']['highest_tls_version_supported']}, "
     f"default suite {cert_run['connectivity_result']['cipher_suite_supported']}")

failed = [r for r in rows if r[2] == "FAIL"]
verdict = "FAIL" if failed else "PASS"
print(f"VERDICT {verdict}: {len(rows) - len(failed)}/{len(rows)} checks passed")

env = os.environ
lines = [
    "# TLS scan of bars-gateway", "",
    f"- date: {doc['date_scans_started'][:19].replace('T', ' ')} UTC",
    f"- sslyze {doc['sslyze_version']}, {env['OPENSSL_VERSION']}, {env['BARS_GATEWAY_VERSION']} ({env['BIN']})",
    f"- target: {env['TARGET']} (throwaway RSA-2048 PKI, `min_version = \"1.2\"`, upstream not listening)",
    "- command: `scripts/tls-scan.sh`: sslyze with `--cert/--key` and `--mozilla_config intermediate`, "
    "sslyze without a client certificate, openssl s_client probes (files beside this one)",
    "", "| check | requirement | result | detail |", "|---|---|---|---|",
]
lines += [f"| {c} | {r} | **{res_}** | {d.replace('|', '/')} |" for c, r, res_, d in rows]
lines += ["", "Notes:", ""] + [f"- {i}" for i in infos]
lines += ["", f"**Verdict: {verdict}** ({len(rows) - len(failed)}/{len(rows)} checks passed)", ""]
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines))
sys.exit(1 if failed else 0)
PY
