#!/usr/bin/env bash
# Builds the Debian package from a built binary with dpkg-deb alone:
#
#   cargo build --release --locked
#   scripts/build-deb.sh                      # target/debian/bars-gateway_<version>-1_<arch>.deb
#   scripts/build-deb.sh --binary PATH --out DIR
#
# The same files, maintainer scripts (packaging/debian/) and conffile as `cargo deb` with
# [package.metadata.deb] in Cargo.toml; tests/deb.rs checks that the two lists agree. This script
# exists so that CI can build and inspect the package in seconds from the binary the tests
# already built, without installing cargo-deb (minutes of compiling on 2 cores) or making a
# second, release build.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=target/release/bars-gateway
out=target/debian
while (($#)); do
    case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: $0 [--binary PATH] [--out DIR]" >&2; exit 2 ;;
    esac
done
[ -x "$binary" ] || { echo "build-deb: no executable at $binary (cargo build --release --locked)" >&2; exit 1; }

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
arch="$(dpkg --print-architecture)"
stage="$(mktemp -d)"
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT

# path in the package <- file in the repository, mode (as the assets of [package.metadata.deb]).
put() { install -D -m "$3" "$2" "$stage/$1"; }
put usr/bin/bars-gateway "$binary" 0755
strip --strip-unneeded "$stage/usr/bin/bars-gateway"
put lib/systemd/system/bars-gateway.service packaging/systemd/bars-gateway.service 0644
put etc/bars-gateway/config.toml config.example.toml 0644
doc=usr/share/doc/bars-gateway
put "$doc/examples/config.example.toml" config.example.toml 0644
put "$doc/examples/alerts.yaml" packaging/prometheus/alerts.yaml 0644
put "$doc/examples/bars-gateway.json" packaging/grafana/bars-gateway.json 0644
put "$doc/README.md" README.md 0644
put "$doc/operations.md" docs/operations.md 0644
put "$doc/refusals.md" docs/refusals.md 0644
put "$doc/load-balancers.md" docs/load-balancers.md 0644
put "$doc/egress.md" docs/egress.md 0644

mkdir -p "$stage/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$script" "$stage/DEBIAN/$script"
done
echo /etc/bars-gateway/config.toml >"$stage/DEBIAN/conffiles"
installed_kib="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
# Depends: what the binary links (glibc 2.34 or later, libgcc), as docs/operations.md says;
# useradd (passwd) and deb-systemd-invoke (init-system-helpers) for the maintainer scripts.
cat >"$stage/DEBIAN/control" <<CONTROL
Package: bars-gateway
Version: ${version}-1
Architecture: ${arch}
Maintainer: bars-gateway developers
Section: net
Priority: optional
Installed-Size: ${installed_kib}
Depends: libc6 (>= 2.34), libgcc-s1, passwd, init-system-helpers
Description: TLS-MA reverse-proxy sidecar that makes a legacy NHS system a BaRS receiver
 Terminates TLS with mutual authentication (TLS-MA) for an NHS Booking and Referral Standard
 (BaRS) receiver, checks the client certificate, source address and BaRS headers, deduplicates
 retries and forwards clean requests to a legacy HTTP server. Runs as a systemd service
 (Type=notify, SIGHUP reloads the TLS material).
CONTROL
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum >DEBIAN/md5sums)

mkdir -p "$out"
deb="$out/bars-gateway_${version}-1_${arch}.deb"
dpkg-deb --root-owner-group -Zgzip --build "$stage" "$deb" >/dev/null
echo "$deb"
