#!/usr/bin/env bash
# Load test on a model whose compute dominates the HTTP cost: the benchmark-only bundle
# models/bench/resnet50-arch (ResNet-50 architecture, synthetic constant weights, NOT a
# clinical model; built by models/train/resnet50_bench.py).
#
# In one run: raw onnxruntime (Python, in-process, 1 intra-op thread) on the same model.onnx,
# then the server on each engine (--intra-op-threads 1; the bundle has instances = 1, so the
# server computes on one thread at any concurrency), driven with Triton's own client
# (benches/load/triton_load.py, binary tensor extension, a fixed number of requests per cell)
# at each batch size and concurrency. Prints one line per cell, then a markdown table with
# rows/s ÷ raw onnxruntime rows/s at the same batch. Concurrency 1 against 1-thread raw
# onnxruntime is the like-for-like pairing; at concurrency 2 the server can overlap one
# request's HTTP work with the other's compute, but still computes on one thread.
#
#   benches/load/run_resnet.sh
#
# Needs: target/release/nightingale built with both engines
# (cargo build --release --locked --features ort; this script does not build), and the .venv
# of scripts/test.sh (onnxruntime, tritonclient). About 8 minutes on a 2-core VM, where the
# client shares the two cores with the server.
#
# Environment (defaults in brackets):
#   REQUESTS [20]        measured requests per cell (split over the connections), and timed
#                        raw onnxruntime calls per batch size
#   BATCHES ["1 8 64"]   CONCURRENCY ["1 2"]   ENGINES ["ort tract"]
#   MAX_REQUEST_S [15]   a batch size is skipped on an engine when one request is predicted to
#                        take longer (from the smaller batch's p50, scaled by rows)
#   TIME_BUDGET_S [480]  a cell is skipped when its predicted time (warm-up + measured requests)
#                        would end the run after this many seconds; on the 2-core VM this skips
#                        tract at batch 64 (~12 s a request, ~9 minutes for its two cells)
#   NIGHTINGALE_BIN [target/release/nightingale]   NIGHTINGALE_VENV [.venv]   ORT_DYLIB_PATH
set -euo pipefail
cd "$(dirname "$0")/../.."
REQUESTS=${REQUESTS:-20}
BATCHES=${BATCHES:-"1 8 64"}
CONCURRENCY=${CONCURRENCY:-"1 2"}
ENGINES=${ENGINES:-"ort tract"}
MAX_REQUEST_S=${MAX_REQUEST_S:-15}
TIME_BUDGET_S=${TIME_BUDGET_S:-480}
VENV=${NIGHTINGALE_VENV:-.venv}
PY="$VENV/bin/python"
BIN=${NIGHTINGALE_BIN:-target/release/nightingale}
REPOSITORY=models/bench
MODEL=resnet50-arch
ONNX="$REPOSITORY/$MODEL/1/model.onnx"
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls "$VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -1)}

if [ ! -x "$BIN" ]; then
  echo "error: $BIN not found; build it with: cargo build --release --locked --features ort" >&2
  exit 1
fi
"$BIN" models check "$REPOSITORY"

work=$(mktemp -d)
pid=""
cleanup() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi; rm -rf "$work"; }
trap cleanup EXIT
port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
url="127.0.0.1:$port"
t_start=$(date +%s)
echo "RUN $(date -u +%FT%TZ) requests_per_cell=$REQUESTS batches=[$BATCHES] concurrency=[$CONCURRENCY] engines=[$ENGINES] max_request_s=$MAX_REQUEST_S time_budget_s=$TIME_BUDGET_S cpus=$(nproc) instances=1 intra_op_threads=1"

# 1. Raw onnxruntime, 1 intra-op thread, same model file, same batch sizes.
# shellcheck disable=SC2086
"$PY" benches/load/ort_baseline.py --model "$ONNX" --threads 1 --batch $BATCHES \
  --iterations "$REQUESTS" --warmup 2 >"$work/raw.json"
"$PY" - "$work/raw.json" <<'EOF'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    lat = r["latency_us"]
    print(f"RAW onnxruntime batch={r['batch']} calls={r['iterations']} requests/s={r['requests_per_s']:.3f} "
          f"rows/s={r['rows_per_s']:.2f} p50_ms={lat['p50'] / 1e3:.1f} p99_ms={lat['p99'] / 1e3:.1f}")
EOF

# 2. The server on each engine.
stats() { curl -sf "http://$url/v2/models/$MODEL/stats" >"$1"; }
for engine in $ENGINES; do
  "$BIN" serve --repository "$REPOSITORY" --backend "$engine" --intra-op-threads 1 \
    --http-addr "$url" --audit-log "$work/audit-$engine.jsonl" --log-format json \
    2>"$work/server-$engine.log" &
  pid=$!
  for _ in $(seq 300); do curl -sf "http://$url/v2/health/ready" >/dev/null && break; sleep 0.2; done
  if ! curl -sf "http://$url/v2/models/$MODEL/ready" >/dev/null; then
    echo "error: $MODEL did not become ready on $engine; server log:" >&2
    tail -20 "$work/server-$engine.log" >&2
    exit 1
  fi
  prev_batch=""; prev_p50_ms=""
  for batch in $BATCHES; do
    if [ -n "$prev_p50_ms" ]; then
      predicted=$("$PY" -c "print(f'{$prev_p50_ms / 1000 * $batch / $prev_batch:.1f}')")
      if "$PY" -c "import sys; sys.exit(0 if $predicted > $MAX_REQUEST_S else 1)"; then
        for c in $CONCURRENCY; do
          echo "SKIP engine=$engine batch=$batch concurrency=$c: one request predicted ${predicted} s > MAX_REQUEST_S=$MAX_REQUEST_S"
        done
        continue
      fi
    fi
    for c in $CONCURRENCY; do
      per_conn=$(( (REQUESTS + c - 1) / c ))
      if [ -n "$prev_p50_ms" ]; then
        # Closed loop, one engine thread: the cell lasts about (per_conn + 1) * c requests' compute.
        cell_s=$("$PY" -c "print(round($prev_p50_ms / 1000 * $batch / $prev_batch * ($per_conn + 1) * $c))")
        elapsed=$(( $(date +%s) - t_start ))
        if [ $(( elapsed + cell_s )) -gt "$TIME_BUDGET_S" ]; then
          echo "SKIP engine=$engine batch=$batch concurrency=$c: predicted ${cell_s} s would end the run at $(( elapsed + cell_s )) s > TIME_BUDGET_S=$TIME_BUDGET_S"
          continue
        fi
      fi
      cell="$engine-b$batch-c$c"
      stats "$work/$cell.before"
      "$PY" benches/load/triton_load.py "$url" "$MODEL" --binary --batch "$batch" --concurrency "$c" \
        --requests "$per_conn" --warmup-requests 1 >"$work/$cell.json"
      stats "$work/$cell.after"
      line=$("$PY" - "$work/$cell" "$engine" "$work/raw.json" <<'EOF'
import json, sys
cell, engine = sys.argv[1], sys.argv[2]
raw = {x["batch"]: x for x in json.load(open(sys.argv[3]))["results"]}
r = json.load(open(cell + ".json"))
b = json.load(open(cell + ".before"))["model_stats"][0]
a = json.load(open(cell + ".after"))["model_stats"][0]
# Server-side, this cell only (the warm-up requests included): executions by batch size and
# mean engine time per execution.
before = {s["batch_size"]: s["compute_infer"] for s in b["batch_stats"]}
execs = []
for s in a["batch_stats"]:
    n = s["compute_infer"]["count"] - before.get(s["batch_size"], {"count": 0})["count"]
    ns = s["compute_infer"]["ns"] - before.get(s["batch_size"], {"ns": 0})["ns"]
    if n:
        execs.append(f"{s['batch_size']}x{n}@{ns / n / 1e6:.0f}ms")
lat = r["latency_ms"]
print(f"SERVER engine={engine} batch={r['batch']} concurrency={r['concurrency']} requests={r['requests']} "
      f"errors={r['errors']} seconds={r['duration_s']:.1f} requests/s={r['requests_per_s']:.3f} "
      f"rows/s={r['rows_per_s']:.2f} p50_ms={lat['p50']:.1f} p99_ms={lat['p99']:.1f} "
      f"ratio_vs_raw={r['rows_per_s'] / raw[r['batch']]['rows_per_s']:.3f} "
      f"server_executions={','.join(execs)}"
      + (f" first_error={r['first_errors'][0]!r}" if r["first_errors"] else ""))
EOF
)
      echo "$line"
      echo "$line" >>"$work/cells.txt"
      if [ "$c" = "$(echo "$CONCURRENCY" | awk '{print $1}')" ]; then
        prev_batch=$batch
        prev_p50_ms=$(echo "$line" | sed -n 's/.* p50_ms=\([0-9.]*\) .*/\1/p')
      fi
    done
  done
  kill "$pid"; wait "$pid" || true; pid=""
  echo "AUDIT engine=$engine $("$BIN" audit verify "$work/audit-$engine.jsonl" 2>&1 | tail -1)"
done

# 3. The table, with ratios to raw onnxruntime at the same batch size.
"$PY" - "$work/raw.json" "$work/cells.txt" "$(( $(date +%s) - t_start ))" <<'EOF'
import json, re, sys
raw = {r["batch"]: r for r in json.load(open(sys.argv[1]))["results"]}
cells = [dict(re.findall(r"(\S+?)=(\S+)", l)) for l in open(sys.argv[2]) if l.startswith("SERVER")]
print()
print("| engine | batch | concurrency | requests | requests/s | rows/s | p50 ms | p99 ms | rows/s ÷ raw onnxruntime rows/s (same batch) |")
print("|---|---|---|---|---|---|---|---|---|")
for c in cells:
    ratio = float(c["ratio_vs_raw"])
    print(f"| {c['engine']} | {c['batch']} | {c['concurrency']} | {c['requests']} | {float(c['requests/s']):.3f} | "
          f"{float(c['rows/s']):.2f} | {float(c['p50_ms']):.1f} | {float(c['p99_ms']):.1f} | {ratio:.3f}× |")
for b, r in raw.items():
    lat = r["latency_us"]
    print(f"| raw onnxruntime (Python, 1 thread) | {b} | 1 | {r['iterations']} | {r['requests_per_s']:.3f} | "
          f"{r['rows_per_s']:.2f} | {lat['p50'] / 1e3:.1f} | {lat['p99'] / 1e3:.1f} | 1 |")
print(f"\n(total {sys.argv[3]} s; with ~20 samples a cell's p99 is close to its maximum)")
EOF
