#!/usr/bin/env bash
# Adaptive batching (issue 13): two server binaries side by side in one run, wrk at
# concurrency 1 and 16, 1-row JSON infers on wdbc-malignancy@1 (tract), rounds interleaved.
#
#   BEFORE=/path/to/old/nightingale AFTER=target/release/nightingale benches/load/adaptive.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
VENV=${NIGHTINGALE_VENV:-.venv}
work=$(mktemp -d)
"$VENV/bin/python" benches/load/make_bodies.py "$work"
port=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
for round in $(seq "$ROUNDS"); do
  for which in BEFORE AFTER; do
    bin=${!which}
    "$bin" serve --http-addr "127.0.0.1:$port" --data-dir "$work/data-$which" \
      --audit-log "$work/audit-$which.jsonl" --log-format json 2>"$work/server-$which.log" &
    pid=$!
    for _ in $(seq 100); do curl -sf "127.0.0.1:$port/v2/health/ready" >/dev/null && break; sleep 0.2; done
    for c in 1 16; do
      threads=$(( c < 2 ? 1 : 2 ))
      line=$(BODY_FILE="$work/json-1.json" HEADER_LEN="" wrk -t"$threads" -c"$c" -d"${DURATION}s" --latency \
        -s benches/load/post.lua "http://127.0.0.1:$port/v2/models/wdbc-malignancy/versions/1/infer" | grep WRK_JSON)
      echo "round=$round binary=$which concurrency=$c ${line#WRK_JSON }"
    done
    kill "$pid"; wait "$pid" || true
  done
done
rm -rf "$work"
