#!/usr/bin/env bash
# Make TLS certificates for a fedsec SuperLink and SuperNode authentication keys (Flower 1.41).
#
# Usage: fedsec/make_certs.sh [-n NUM_NODES] [-f] OUT_DIR [HOST ...]
#
#   OUT_DIR/ca.crt, ca.key          a self-signed CA (kept if it exists, unless -f)
#   OUT_DIR/server.pem, server.key  the SuperLink's certificate, signed by the CA, with
#                                   subjectAltName IP:127.0.0.1, DNS:localhost and every HOST
#                                   (an IPv4/IPv6 address becomes IP:, anything else DNS:);
#                                   always re-made, so new HOSTs can be added later
#   OUT_DIR/node_<i>, node_<i>.pub  SuperNode i's ECDSA P-384 key pair in OpenSSH format
#                                   (i = 0 .. NUM_NODES-1; kept if they exist, unless -f):
#                                   flower-supernode --auth-supernode-private-key node_<i>,
#                                   flwr supernode register node_<i>.pub <connection>
#
# NUM_NODES defaults to $NUM_NODES or 3. -f re-makes the CA and the node keys too.
# SuperLink:  flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key
# SuperNode:  flower-supernode --root-certificates ca.crt ...
# flwr CLI:   root-certificates = "/abs/OUT_DIR/ca.crt" in the config.toml connection.
set -euo pipefail

num_nodes="${NUM_NODES:-3}"
force=0
while getopts "n:fh" opt; do
  case "$opt" in
    n) num_nodes="$OPTARG" ;;
    f) force=1 ;;
    h) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "usage: $0 [-n NUM_NODES] [-f] OUT_DIR [HOST ...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [ $# -lt 1 ]; then
  echo "usage: $0 [-n NUM_NODES] [-f] OUT_DIR [HOST ...]" >&2
  exit 2
fi
out="$1"; shift
case "$num_nodes" in ''|*[!0-9]*) echo "NUM_NODES must be a non-negative integer, got '$num_nodes'" >&2; exit 2 ;; esac
command -v openssl >/dev/null || { echo "openssl not found" >&2; exit 1; }
command -v ssh-keygen >/dev/null || { echo "ssh-keygen not found (openssh-client)" >&2; exit 1; }

mkdir -p "$out"
umask 077
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# --- CA ---------------------------------------------------------------------------------
if [ "$force" = 1 ] || [ ! -s "$out/ca.crt" ] || [ ! -s "$out/ca.key" ]; then
  openssl genrsa -out "$out/ca.key" 3072 2>/dev/null
  openssl req -new -x509 -sha256 -days 3650 -key "$out/ca.key" -out "$out/ca.crt" \
    -subj "/O=fedsec/CN=fedsec deployment CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash"
  rm -f "$out/ca.srl"
fi

# --- SuperLink server certificate -------------------------------------------------------
san="IP:127.0.0.1,DNS:localhost"
for h in "$@"; do
  if [[ "$h" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || [[ "$h" == *:* ]]; then
    san="$san,IP:$h"
  else
    san="$san,DNS:$h"
  fi
done
cat > "$tmp/server.ext" <<EXT
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
subjectAltName = $san
EXT
openssl genrsa -out "$out/server.key" 3072 2>/dev/null
openssl req -new -key "$out/server.key" -out "$tmp/server.csr" -subj "/O=fedsec/CN=fedsec-superlink"
openssl x509 -req -sha256 -days 825 -in "$tmp/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -CAserial "$out/ca.srl" -extfile "$tmp/server.ext" -out "$out/server.pem" 2>/dev/null
openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null

# --- SuperNode authentication keys (ECDSA P-384, OpenSSH format) ------------------------
for ((i = 0; i < num_nodes; i++)); do
  key="$out/node_$i"
  if [ "$force" = 1 ] || [ ! -s "$key" ] || [ ! -s "$key.pub" ]; then
    rm -f "$key" "$key.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedsec-node-$i" -f "$key"
  fi
done

chmod 600 "$out"/*.key "$out"/node_* 2>/dev/null || true
chmod 644 "$out/ca.crt" "$out/server.pem" "$out"/node_*.pub 2>/dev/null || true
echo "certificates in $out: ca.crt server.pem server.key (SAN $san); $num_nodes node key pair(s) node_<i>[.pub]"
