#!/usr/bin/env bash
# Makes a CA and two node certificates for Ferry's TLS migration (docs/migration-tls.md):
#   DIR/ca.crt ca.key               the CA both sides trust
#   DIR/source.crt source.key       for `ferry migrate --tls-*` (client authentication)
#   DIR/destination.crt .key        for `ferry receive --tls-*` (server authentication)
# Each node certificate carries the subject alternative names given (default: localhost and
# 127.0.0.1) and both TLS usages, so either host can later be a source or a destination.
# Usage: scripts/migration-tls-certs.sh DIR [SAN ...]    e.g.  DNS:hostb.example IP:10.0.0.2
set -euo pipefail
dir=${1:?usage: $0 DIR [SAN ...]}
shift
sans=("$@")
[ ${#sans[@]} -gt 0 ] || sans=(DNS:localhost IP:127.0.0.1)
san=$(IFS=,; echo "${sans[*]}")
mkdir -p "$dir"
cd "$dir"
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
    -keyout ca.key -out ca.crt -subj "/CN=Ferry migration CA" 2>/dev/null
for node in source destination; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$node.key" -out "$node.csr" -subj "/CN=ferry-$node" 2>/dev/null
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n' \
        "$san" > "$node.ext"
    openssl x509 -req -in "$node.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
        -extfile "$node.ext" -out "$node.crt" 2>/dev/null
    rm -f "$node.csr" "$node.ext"
done
rm -f ca.srl
echo "certificates in $dir: ca.crt, source.crt/.key, destination.crt/.key ($san)"
