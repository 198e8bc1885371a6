#!/usr/bin/env bash
# A/B load test of two server builds in one run: the same wrk load (wdbc-malignancy v1 on
# tract, 1-row JSON and 64-row binary bodies, 16 connections) against binary A and binary B,
# alternated ROUNDS times so that machine noise hits both alike. Prints requests/s per round and
# the median ratio B/A. Used for the audit-path cost in docs/performance.md:
#
#   REPO_A=OLD/models/bundles benches/load/ab.sh OLD/target/release/nightingale target/release/nightingale
#
# REPO_A / REPO_B: each build's own model repository (an older build may not read newer
# bundle.toml keys); default models/bundles. Needs wrk (Debian) and .venv (scripts/test.sh).
# Extra flags for both servers: SERVE_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/../.."
A=$1; B=$2
DURATION=${DURATION:-10}; ROUNDS=${ROUNDS:-3}; CONNECTIONS=${CONNECTIONS:-16}
VENV=${NIGHTINGALE_VENV:-.venv}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$VENV/bin/python" benches/load/make_bodies.py "$work"
port=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

run() { # binary repository payload -> requests/s
  local bin=$1 repo=$2 payload=$3 body hl=""
  if [ "${payload%%-*}" = bin ]; then body="$work/$payload.bin"; hl=$(cat "$work/$payload.len"); else body="$work/$payload.json"; fi
  rm -rf "$work/data"
  # shellcheck disable=SC2086
  "$bin" serve --repository "$repo" --http-addr "127.0.0.1:$port" --audit-log "$work/data/audit.jsonl" ${SERVE_FLAGS:-} \
    --log-format json 2>"$work/server.log" &
  local pid=$!
  for _ in $(seq 150); do curl -sf "127.0.0.1:$port/v2/health/ready" >/dev/null && break; sleep 0.2; done
  local line
  line=$(BODY_FILE="$body" HEADER_LEN="$hl" wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" \
    -s benches/load/post.lua "http://127.0.0.1:$port/v2/models/wdbc-malignancy/versions/1/infer" | grep WRK_JSON)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  "$VENV/bin/python" -c 'import json,sys; d=json.loads(sys.argv[1]); assert d["non_2xx_or_errors"]==0, d; print(round(d["requests"]/d["duration_us"]*1e6))' "${line#WRK_JSON }"
}

for payload in json-1 bin-64; do
  ratios=()
  for r in $(seq "$ROUNDS"); do
    a=$(run "$A" "${REPO_A:-models/bundles}" "$payload"); b=$(run "$B" "${REPO_B:-models/bundles}" "$payload")
    ratio=$("$VENV/bin/python" -c "print(f'{$b/$a:.3f}')")
    ratios+=("$ratio")
    echo "payload=$payload round=$r A=$a req/s B=$b req/s B/A=$ratio"
  done
  echo "payload=$payload median B/A=$(printf '%s\n' "${ratios[@]}" | sort -n | sed -n "$(( (ROUNDS + 1) / 2 ))p")"
done
