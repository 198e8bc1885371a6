#!/usr/bin/env bash
# Load test: POST /infer on wdbc-malignancy with wrk, on both engines, at concurrency 1 and 16,
# JSON batch 1 and binary batch 64; then raw onnxruntime (Python) on the same model in the same
# run, for the ratios in docs/performance.md.
#
#   benches/load/run.sh            (needs: wrk, .venv from scripts/test.sh, ~3 minutes)
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10}
VENV=${NIGHTINGALE_VENV:-.venv}
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls "$VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -1)}
cargo build --release --locked --features ort --quiet
work=$(mktemp -d)
"$VENV/bin/python" benches/load/make_bodies.py "$work"
port=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

for backend in tract ort; do
  target/release/nightingale serve --backend "$backend" --http-addr "127.0.0.1:$port" \
    --log-format json 2>"$work/server-$backend.log" &
  pid=$!
  for _ in $(seq 100); do curl -sf "127.0.0.1:$port/v2/health/ready" >/dev/null && break; sleep 0.2; done
  for payload in json-1 bin-64; do
    if [ "${payload%%-*}" = bin ]; then body="$work/$payload.bin"; hl=$(cat "$work/$payload.len"); else body="$work/$payload.json"; hl=""; fi
    for c in 1 16; do
      threads=$(( c < 2 ? 1 : 2 ))
      line=$(BODY_FILE="$body" HEADER_LEN="$hl" wrk -t"$threads" -c"$c" -d"${DURATION}s" --latency \
        -s benches/load/post.lua "http://127.0.0.1:$port/v2/models/wdbc-malignancy/versions/1/infer" | grep WRK_JSON)
      echo "SERVER backend=$backend payload=$payload concurrency=$c ${line#WRK_JSON }"
    done
  done
  kill "$pid"; wait "$pid" || true
done
echo "ORT_BASELINE $("$VENV/bin/python" benches/load/ort_baseline.py --batch 1 64 --iterations 20000 | tr -d '\n')"
rm -rf "$work"
