#!/usr/bin/env bash
# Issue 13's targets side by side in one run (a benchmark, not a test), written as one table:
#
#   1. HTTP: wrk, 1-row JSON infers of wdbc-malignancy@1 asking for `probabilities`, at 1 and
#      16 connections, against (a) `nightingale serve` (release, tract, audit on, defaults),
#      (b) real Triton (the `tritonserver` bundled in PyPI nvidia-pytriton: Python backend
#      running onnxruntime, dynamic batching with the bundle's settings; benches/load/triton_wdbc)
#      and (c) the machine's HTTP ceiling (benches/http_ceiling.rs: a minimal axum server that
#      reads the POST and answers a fixed JSON). All three are up for the whole run; the cells
#      are interleaved, ROUNDS rounds of DURATION seconds, the order rotating each round;
#      medians reported.
#   2. gRPC vs HTTP on the same Nightingale: benches/grpc_http_load.rs (Rust clients: http-json,
#      http-binary, grpc with raw_input_contents as tritonclient.grpc sends them), then Triton's
#      own Python clients (tritonclient.http JSON vs tritonclient.grpc, benches/load/triton_load.py).
#   3. The pure-Rust engine vs onnxruntime on the image bundles and ResNet-50 (one thread each:
#      benches/cnn/kernels.sh).
#
#   benches/load/targets.sh                       # ROUNDS=3 DURATION=10; ~10 minutes
#   WRITE_DOCS=1 benches/load/targets.sh          # and replace the table in docs/performance.md
#   SKIP_TRITON=1 / SKIP_GRPC=1 / SKIP_CNN=1      # leave a part out
#   (the raw cells are kept in OUT=target/targets: targets_table.py can rewrite the table)
#
# Needs: wrk, curl, the test venv (.venv: onnxruntime, numpy) and, for Triton, a venv with
# nvidia-pytriton made with /usr/bin/python3.11 (created in target/pytriton on first use,
# from PyPI by name: ~450 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
VENV=${NIGHTINGALE_VENV:-.venv}
TRITON_VENV=${TRITON_VENV:-target/pytriton/venv}
for tool in wrk curl; do
  command -v "$tool" >/dev/null || { echo "$tool not found (apt-get install $tool)" >&2; exit 1; }
done
cargo build --release --locked --quiet --bin nightingale --bench grpc_http_load --bench http_ceiling
bin=${NIGHTINGALE_BIN:-target/release/nightingale}
newest() { ls -t target/release/deps/"$1"-* | grep -v '\.d$' | head -1; }
ceiling_bin=$(newest http_ceiling)
load_bin=$(newest grpc_http_load)

work=$(mktemp -d)
# The raw cells stay after the run (the table can be written again from them).
out=${OUT:-target/targets}
mkdir -p "$out"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  pkill -f "triton_python_backend_stub.*$work" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { # url pid log
  for _ in $(seq 300); do
    curl -sf "$1" >/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { echo "server died:" >&2; tail -20 "$3" >&2; exit 1; }
    sleep 0.2
  done
  echo "not ready: $1" >&2; tail -20 "$3" >&2; exit 1
}
"$VENV/bin/python" benches/load/make_bodies.py "$work" >/dev/null
body="$work/json-1-probabilities.json"
path=/v2/models/wdbc-malignancy/versions/1/infer

servers=(nightingale ceiling)
ng_http=$(free_port); ng_grpc=$(free_port)
"$bin" serve --http-addr "127.0.0.1:$ng_http" --grpc-addr "127.0.0.1:$ng_grpc" \
  --data-dir "$work/data" --audit-log "$work/audit.jsonl" --log-format json 2>"$work/nightingale.log" &
pids+=($!)
wait_ready "127.0.0.1:$ng_http/v2/health/ready" "${pids[-1]}" "$work/nightingale.log"
ceiling_port=$(free_port)
"$ceiling_bin" --serve "127.0.0.1:$ceiling_port" 2>"$work/ceiling.log" &
pids+=($!)
wait_ready "127.0.0.1:$ceiling_port/v2/health/ready" "${pids[-1]}" "$work/ceiling.log"
declare -A port=([nightingale]=$ng_http [ceiling]=$ceiling_port)

if [ "${SKIP_TRITON:-0}" != 1 ]; then
  if [ ! -x "$TRITON_VENV/bin/python" ]; then
    /usr/bin/python3.11 -m venv "$TRITON_VENV"
    "$TRITON_VENV/bin/pip" install -q nvidia-pytriton onnxruntime numpy
  fi
  site=$(cd "$TRITON_VENV" && pwd)/lib/python3.11/site-packages
  server="$site/pytriton/tritonserver"
  repo="$work/triton/repo/wdbc-malignancy"
  mkdir -p "$repo/1" "$work/triton/backends/python"
  cp benches/load/triton_wdbc/config.pbtxt "$repo/"
  cp benches/load/triton_wdbc/model.py models/bundles/wdbc-malignancy/1/model.onnx "$repo/1/"
  echo "$site" >"$repo/1/site_packages.txt"
  cp "$server"/backends/python/{libtriton_python.so,triton_python_backend_utils.py} \
    "$server/python_backend_stubs/3.11/triton_python_backend_stub" "$work/triton/backends/python/"
  triton_port=$(free_port)
  LD_LIBRARY_PATH="$site/nvidia_pytriton.libs" "$server/bin/tritonserver" \
    --model-repository "$work/triton/repo" --backend-directory "$work/triton/backends" \
    --http-port "$triton_port" --grpc-port "$(free_port)" --metrics-port "$(free_port)" \
    --allow-gpu-metrics false >"$work/triton.log" 2>&1 &
  pids+=($!)
  wait_ready "127.0.0.1:$triton_port/v2/health/ready" "${pids[-1]}" "$work/triton.log"
  port[triton]=$triton_port
  servers+=(triton)
fi

# Same answer from each (the ceiling's is fixed): the load is the same request everywhere.
for s in "${servers[@]}"; do
  echo "$s: $(curl -sf -XPOST --data-binary @"$body" "127.0.0.1:${port[$s]}$path")"
done
results="$work/results.txt"
n=${#servers[@]}
for round in $(seq "$ROUNDS"); do
  for c in 1 16; do
    threads=$(( c < 2 ? 1 : 2 ))
    for i in $(seq 0 $((n - 1))); do
      s=${servers[$(( (i + round) % n ))]}
      line=$(BODY_FILE="$body" HEADER_LEN="" wrk -t"$threads" -c"$c" -d"${DURATION}s" --latency \
        -s benches/load/post.lua "http://127.0.0.1:${port[$s]}$path" | grep WRK_JSON)
      echo "http server=$s concurrency=$c round=$round ${line#WRK_JSON }" | tee -a "$results"
    done
  done
done

if [ "${SKIP_GRPC:-0}" != 1 ]; then
  "$load_bin" --http "127.0.0.1:$ng_http" --grpc "127.0.0.1:$ng_grpc" --seconds 5 \
    --rounds "$ROUNDS" --clients 1,16 --kinds http-json,http-binary,grpc | tee "$work/grpc.md"
  # The same comparison the way Triton's users load a server: Triton's own Python clients,
  # tritonclient.http (JSON) against tritonclient.grpc (raw contents), one thread per
  # connection (benches/load/triton_load.py; the client's own CPU is part of what it measures).
  for round in $(seq "$ROUNDS"); do
    for c in 1 16; do
      if [ $((round % 2)) = 1 ]; then protocols="http grpc"; else protocols="grpc http"; fi
      for proto in $protocols; do
        line=$("$VENV/bin/python" benches/load/triton_load.py "127.0.0.1:$ng_http" wdbc-malignancy \
          --outputs probabilities --concurrency "$c" --duration "$DURATION" --warmup 1 \
          $( [ "$proto" = grpc ] && echo --grpc "127.0.0.1:$ng_grpc" ) |
          "$VENV/bin/python" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))')
        echo "tritonclient protocol=$proto concurrency=$c round=$round $line" | tee -a "$results"
      done
    done
  done
fi
# Every request Nightingale answered was audited: the chain must verify.
"$bin" audit verify "$work/audit.jsonl"
for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done

if [ "${SKIP_CNN:-0}" != 1 ]; then
  ROUNDS=$ROUNDS benches/cnn/kernels.sh | tee "$work/cnn.txt"
fi

cp "$results" "$out/results.txt"
rm -f "$out/grpc.md" "$out/cnn.txt"
[ -f "$work/grpc.md" ] && cp "$work/grpc.md" "$out/"
[ -f "$work/cnn.txt" ] && cp "$work/cnn.txt" "$out/"
"$VENV/bin/python" benches/load/targets_table.py --results "$out/results.txt" \
  $( [ -f "$out/grpc.md" ] && echo --grpc "$out/grpc.md" ) \
  $( [ -f "$out/cnn.txt" ] && echo --cnn "$out/cnn.txt" ) \
  --commit "$(git rev-parse --short HEAD)" --rounds "$ROUNDS" --duration "$DURATION" \
  $( [ "${WRITE_DOCS:-0}" = 1 ] && echo --write docs/performance.md )
