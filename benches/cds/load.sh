#!/usr/bin/env bash
# CDS Hooks load (issue 10): POST /cds-services/nightingale-news2 with a NEWS2 prefetch and a
# fresh JWT per request (ALG=ES384, the default, or RS384), at 32 connections, side by side in the same run with KServe
# infer of icu-mortality (JSON, one row) at 32 connections on the same server. Not a test.
#
#   benches/cds/load.sh      (needs: wrk, .venv from scripts/test.sh; DURATION, TOKENS)
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10}
TOKENS=${TOKENS:-60000}   # per round; a round that runs out shows non-2xx answers
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-2}
ALG=${ALG:-ES384}
VENV=${NIGHTINGALE_VENV:-.venv}
BIN=${NIGHTINGALE_BIN:-target/release/nightingale}
[ -x "$BIN" ] || cargo build --release --locked --quiet
work=$(mktemp -d)
port=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$VENV/bin/python" benches/cds/make_load.py "$work" "$port" $((2 * TOKENS + 1)) "$ALG"
"$BIN" serve --http-addr "127.0.0.1:$port" --data-dir "$work/data" --log-format json \
  --cds-trust "https://ehr.bench.example=$work/jwks.json" 2>"$work/server.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 150); do curl -sf "127.0.0.1:$port/v2/health/ready" >/dev/null && break; sleep 0.2; done
# One call by hand: the card it answers.
curl -sf -X POST "127.0.0.1:$port/cds-services/nightingale-news2" \
  -H "Authorization: Bearer $(tail -1 "$work/tokens.txt")" -H 'Content-Type: application/json' \
  --data-binary @"$work/hook.json" | "$VENV/bin/python" -c 'import json,sys; c=json.load(sys.stdin)["cards"][0]; print("card:", c["indicator"], c["summary"])'
head -n "$TOKENS" "$work/tokens.txt" > "$work/tokens-1.txt"
tail -n +"$((TOKENS + 1))" "$work/tokens.txt" | head -n "$TOKENS" > "$work/tokens-2.txt"
for round in 1 2; do
  line=$(BODY_FILE="$work/hook.json" TOKENS_FILE="$work/tokens-$round.txt" THREADS="$THREADS" \
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s benches/cds/hook.lua \
    "http://127.0.0.1:$port/cds-services/nightingale-news2" | grep WRK_JSON)
  echo "CDS alg=$ALG round=$round connections=$CONNECTIONS ${line#WRK_JSON }"
  line=$(BODY_FILE="$work/infer.json" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency \
    -s benches/load/post.lua "http://127.0.0.1:$port/v2/models/icu-mortality/infer" | grep WRK_JSON)
  echo "INFER round=$round connections=$CONNECTIONS ${line#WRK_JSON }"
done
echo "CPU: $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
# The signature check's own cost on this CPU (OpenSSL, one core), for the ratio.
openssl speed -seconds 2 ecdsap384 rsa2048 2>/dev/null | grep -E "^ *(rsa 2048|384 bits)" || true
