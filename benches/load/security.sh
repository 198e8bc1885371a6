#!/usr/bin/env bash
# What TLS and API-key auth cost, in one run on one binary: the same wrk load (wdbc-malignancy
# v1 on tract, a 1-row JSON body, 16 connections) against four configurations of the server,
# alternated ROUNDS times so that machine noise hits all alike:
#
#   plain      http, no credentials configured (loopback: infer open)
#   plain+key  http, an [[auth.api_keys]] infer key configured, every request carries it
#   tls        https (rustls), no credentials
#   tls+key    https and the key
#
# Prints requests/s per round and the median ratios to `plain`. Used in docs/performance.md:
#   cargo build --release && benches/load/security.sh target/release/nightingale
# Needs wrk and openssl (Debian) and .venv (scripts/test.sh) for the request body.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/nightingale}
DURATION=${DURATION:-10}; ROUNDS=${ROUNDS:-3}; CONNECTIONS=${CONNECTIONS:-16}
VENV=${NIGHTINGALE_VENV:-.venv}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$VENV/bin/python" benches/load/make_bodies.py "$work"
port=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

# A throwaway self-signed certificate for 127.0.0.1 (wrk does not check it).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -keyout "$work/key.pem" -out "$work/cert.pem" -subj /CN=localhost \
  -addext subjectAltName=IP:127.0.0.1,DNS:localhost 2>/dev/null
KEY=bench-infer-key-0123456789abcdef
cat > "$work/keys.toml" <<EOF
[[auth.api_keys]]
name = "bench"
role = "infer"
sha256 = "$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)"
EOF
: > "$work/none.toml"

run() { # config tls(0/1) key(0/1) -> requests/s
  local config=$1 tls=$2 key=$3 scheme=http flags=() hdr=()
  if [ "$tls" = 1 ]; then scheme=https; flags+=(--tls-cert "$work/cert.pem" --tls-key "$work/key.pem"); fi
  if [ "$key" = 1 ]; then hdr=(-H "Authorization: Bearer $KEY"); fi
  rm -rf "$work/data"
  "$BIN" serve --config "$config" --repository models/bundles --http-addr "127.0.0.1:$port" \
    --data-dir "$work/data" "${flags[@]}" --log-format json 2>"$work/server.log" &
  local pid=$!
  for _ in $(seq 150); do curl -skf "$scheme://127.0.0.1:$port/v2/health/live" >/dev/null && break; sleep 0.2; done
  for _ in $(seq 150); do curl -skf "${hdr[@]}" "$scheme://127.0.0.1:$port/v2/models/wdbc-malignancy/ready" >/dev/null && break; sleep 0.2; done
  local line
  line=$(BODY_FILE="$work/json-1.json" wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" "${hdr[@]}" \
    -s benches/load/post.lua "$scheme://127.0.0.1:$port/v2/models/wdbc-malignancy/versions/1/infer" | grep WRK_JSON)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  "$VENV/bin/python" -c 'import json,sys; d=json.loads(sys.argv[1]); assert d["non_2xx_or_errors"]==0, d; print(round(d["requests"]/d["duration_us"]*1e6))' "${line#WRK_JSON }"
}

declare -A ratios
for r in $(seq "$ROUNDS"); do
  plain=$(run "$work/none.toml" 0 0)
  pkey=$(run "$work/keys.toml" 0 1)
  tls=$(run "$work/none.toml" 1 0)
  tkey=$(run "$work/keys.toml" 1 1)
  line="round=$r plain=$plain req/s"
  for v in pkey tls tkey; do
    ratio=$("$VENV/bin/python" -c "print(f'{${!v}/$plain:.3f}')")
    ratios[$v]="${ratios[$v]:-} $ratio"
    line="$line $v=${!v} ($ratio)"
  done
  echo "$line"
done
for v in pkey tls tkey; do
  # shellcheck disable=SC2086
  echo "median $v/plain = $(printf '%s\n' ${ratios[$v]} | sort -n | sed -n "$(( (ROUNDS + 1) / 2 ))p")"
done
