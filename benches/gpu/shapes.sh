#!/usr/bin/env bash
# ONNX Runtime's CUDA provider under changing batch sizes, on the device tool's GPU machine
# (docs/performance.md §22): in one call, with only ONNX Runtime's C library carried (no
# Python package; the machine's own CPU onnxruntime makes the reference outputs):
#   1. the CNN kernels' CUDA provider test, requiring the GPU (NIGHTINGALE_EXPECT_GPU=1);
#   2. inference/examples/gpu_shapes on ResNet-50 (benchmark bundle): per batch size, fixed
#      and taken in turn, for several CUDA provider settings, with ONNX Runtime's profile of
#      the heuristic session summarised per operator;
#   3. the server (release, --features ort, --execution-provider cuda) under 1 and 4
#      connections of one image, with the model's statistics per batch size after each.
#
#   cargo build --release --locked --features ort --bin nightingale
#   cargo build --release --locked --features ort -p nightingale-inference --example gpu_shapes
#   cargo test --release --locked --features ort -p nightingale-inference --test cnn_kernels --no-run
#   benches/gpu/pack.sh lib          # .gpu/lib1, .gpu/lib2: each under 64 MiB with the tree
#   run (carry .gpu/lib1):  benches/gpu/shapes.sh stage1     # then at once:
#   run (carry .gpu/lib2):  benches/gpu/shapes.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
STAGE=/tmp/ng-gpu
OUT=${OUT:-$STAGE/out}
mkdir -p "$STAGE/lib" "$OUT"
export PYTHONUNBUFFERED=1
if [ "${1:-}" = stage1 ]; then
  cp .gpu/lib1/* "$STAGE/" && ls -la "$STAGE"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  exit 0
fi
cp .gpu/lib2/* "$STAGE/"
chmod +x "$STAGE/zstd"
z() { LD_LIBRARY_PATH=$STAGE "$STAGE/zstd" "$@"; }
cat "$STAGE"/ort-lib.tar.zst.part-* | z -d -q | tar -C "$STAGE/lib" -xf -
for b in nightingale gpu_shapes cnn_kernels; do
  [ -f "$STAGE/$b.zst" ] && z -d -q -f "$STAGE/$b.zst" -o "$STAGE/$b" && chmod +x "$STAGE/$b"
done
libdirs=$(python3 benches/gpu/cuda_libdirs.py)
export LD_LIBRARY_PATH=$libdirs
export ORT_DYLIB_PATH=$(ls "$STAGE"/lib/libonnxruntime.so.1.*)
{
  echo "RUN $(date -u +%FT%TZ) cpus=$(nproc)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
} | tee "$OUT/machine.txt"

# 1. The test (its fixture path is compiled in: /work/main).
if [ -x "$STAGE/cnn_kernels" ]; then
  if [ ! -e /work/main ]; then mkdir -p /work && ln -s "$PWD" /work/main; fi
  NIGHTINGALE_EXPECT_GPU=1 timeout 120 "$STAGE/cnn_kernels" the_cuda_provider 2>&1 | tee "$OUT/test.log"
fi

# 2. Batch sizes in turn, raw ONNX Runtime and the server's backend.
model=models/bench/resnet50-arch/1/model.onnx
export REPEATS=8
VARIANTS=server timeout 90 "$STAGE/gpu_shapes" "$model" image 3,224,224 2>&1 | tee "$OUT/shapes.jsonl"
timeout 200 "$STAGE/gpu_shapes" "$model" image 3,224,224 "$STAGE/ortprof" 2>&1 | tee -a "$OUT/shapes.jsonl"
prof=$(ls -t "$STAGE"/ortprof*.json 2>/dev/null | head -1)
if [ -n "$prof" ]; then
  python3 - "$prof" <<'EOF' | tee "$OUT/profile.txt"
import json, sys, collections
ev = json.load(open(sys.argv[1]))
runs = [e for e in ev if e.get("cat") == "Session" and e.get("name") == "model_run"]
print("model_run events", len(runs), "ms:", [round(e["dur"] / 1e3, 2) for e in runs][:400])
by_op = collections.defaultdict(lambda: [0, 0.0, 0.0])
for e in ev:
    if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
        op = e.get("args", {}).get("op_name", "?")
        d = e["dur"] / 1e3
        s = by_op[op]; s[0] += 1; s[1] += d; s[2] = max(s[2], d)
for op, (n, tot, mx) in sorted(by_op.items(), key=lambda kv: -kv[1][1])[:12]:
    print(f"{op:24s} calls {n:6d} total_ms {tot:10.1f} max_ms {mx:8.2f}")
# The slowest nodes, with their input shapes.
nodes = sorted((e for e in ev if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
               key=lambda e: -e["dur"])[:15]
for e in nodes:
    a = e.get("args", {})
    print(round(e["dur"] / 1e3, 2), "ms", e["name"], a.get("op_name"), a.get("input_type_shape"))
EOF
fi

# 3. The server, CUDA provider, one image per request at 1 and 4 connections.
repo=$STAGE/repo
rm -rf "$repo" && mkdir -p "$repo" && cp -r models/bench/resnet50-arch "$repo/"
python3 - "$model" "$STAGE/ref.npz" <<'EOF'
import sys, numpy as np, onnxruntime as ort
x = np.random.default_rng(0).random((8, 3, 224, 224), dtype=np.float32)
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
np.savez(sys.argv[2], x=x, y=s.run(["probabilities"], {"image": x})[0], output="probabilities")
EOF
port=8011
"$STAGE/nightingale" serve --repository "$repo" --backend ort --execution-provider cuda \
  --http-addr "127.0.0.1:$port" --audit-log "$STAGE/audit.jsonl" --log-format json \
  --data-dir "$STAGE/data" 2>"$OUT/server.log" &
pid=$!
for _ in $(seq 300); do
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/v2/health/ready', timeout=1)" 2>/dev/null && break
  sleep 0.2
done
stats() { python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$port/v2/models/resnet50-arch/stats').read().decode())"; }
for c in 1 4 1 4; do
  timeout 60 python3 benches/gpu/kserve_load.py "127.0.0.1:$port" resnet50-arch "$STAGE/ref.npz" \
    --input image --output probabilities --batch 1 --concurrency $c --seconds 3 2>&1 | tail -1 | tee -a "$OUT/server.jsonl"
  stats | tee -a "$OUT/stats.jsonl" | cut -c1-1500
done
kill $pid; wait $pid 2>/dev/null
grep -c '"level":"WARN"' "$OUT/server.log"
grep '"level":"WARN"\|warmed' "$OUT/server.log" | cut -c1-400 | head
