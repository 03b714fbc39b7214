# shellcheck shell=bash
# The throwaway PKI of benches/run.sh, scripts/soak.sh and scripts/tls-scan.sh (source this file).
#
# make_pki DIR ROOT_NAME CLIENT_CN [wrong]
#   DIR/ca.{pem,key}          an RSA-2048 CA, subject O=nhs, OU=CA, CN=ROOT_NAME
#   DIR/server.{pem,key}      CN=localhost, SAN localhost and 127.0.0.1 (server.csr and server.ext
#                             are kept, so the certificate can be re-issued from them)
#   DIR/client.{pem,key}      O=nhs, OU=Devices, CN=CLIENT_CN: the BaRS proxy's form (no SAN)
#   DIR/wrong.{pem,key}       with "wrong": the same form with CN=someone-else.nhs.uk
# RSA-2048 throughout, the NHS key type, made with the openssl CLI as operators make theirs.
# Serial numbers are random, so re-issued certificates never repeat one. openssl's chatter goes
# to stdout/stderr: redirect it.
make_pki() {
    local dir=$1 root_name=$2 client_cn=$3 wrong=${4:-}
    mkdir -p "$dir"
    (
        set -e
        cd "$dir"
        openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 30 -keyout ca.key -out ca.pem \
            -subj "/O=nhs/OU=CA/CN=$root_name" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
        leaf() { # name subject extensions
            openssl req -newkey rsa:2048 -nodes -sha256 -keyout "$1.key" -out "$1.csr" -subj "$2"
            printf '%b' "$3" >"$1.ext"
            openssl x509 -req -sha256 -days 30 -in "$1.csr" -CA ca.pem -CAkey ca.key \
                -set_serial "0x$(openssl rand -hex 8)" -extfile "$1.ext" -out "$1.pem"
        }
        local client_ext="basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
        leaf server "/CN=localhost" \
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
        leaf client "/O=nhs/OU=Devices/CN=$client_cn" "$client_ext"
        if [ "$wrong" = wrong ]; then
            leaf wrong "/O=nhs/OU=Devices/CN=someone-else.nhs.uk" "$client_ext"
        fi
    )
}
