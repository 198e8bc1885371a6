#!/usr/bin/env bash
# The GPU measurement, on the device tool's machine (one NVIDIA GPU, CUDA 13 libraries in its
# Python packages, no registry): ONNX Runtime's CUDA execution provider through Nightingale
# (`serve --backend ort --execution-provider cuda`) against raw onnxruntime-gpu in-process,
# on the benchmark bundle (ResNet-50) and the reference bundles, and the same server on the
# CPU provider of the same machine. benches/gpu/pack.sh prepares the two parts it needs.
#
#   run (carry .gpu/p1):  benches/gpu/run.sh stage1     # unpacks part 1, prints the machine
#   run (carry .gpu/p2):  benches/gpu/run.sh            # everything else; results under $OUT
#
# Environment: SECONDS_PER_CELL [3], RAW_SECONDS [2]. DRY_RUN=1 rehearses it on a machine
# without a GPU (the .venv's onnxruntime and target/release/nightingale; CUDA not required).
set -euo pipefail
cd "$(dirname "$0")/../.."
STAGE=/tmp/ng-gpu
OUT=${OUT:-$STAGE/out}
mkdir -p "$STAGE" "$OUT"
if [ "${1:-}" = stage1 ]; then
  cp .gpu/p1/* "$STAGE/"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import sys, numpy; print(sys.version.split()[0], numpy.__version__)'
  nproc
  exit 0
fi
CELL_S=${SECONDS_PER_CELL:-3}
RAW_S=${RAW_SECONDS:-2}
if [ "${DRY_RUN:-}" = 1 ]; then
  export PATH="$PWD/.venv/bin:$PATH" NG_GPU_DRY_RUN=1
  ln -sf "$PWD/target/release/nightingale" "$STAGE/nightingale"
  ORT_DYLIB_PATH=$(ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -1)
  export ORT_DYLIB_PATH
  nvidia-smi() { echo "no GPU (dry run)"; }
else
  cp .gpu/p2/* "$STAGE/"
  # zstd, with its libraries, travels in part 2 where the machine has none.
  if ! command -v zstd >/dev/null; then
    chmod +x "$STAGE/zstd"
    zstd() { LD_LIBRARY_PATH=$STAGE "$STAGE/zstd" "$@"; }
  fi
  mkdir -p "$STAGE/site"
  cat "$STAGE"/ort-site.tar.zst.part-* | zstd -d -q | tar -C "$STAGE/site" -xf -
  zstd -d -q -f "$STAGE/nightingale.zst" -o "$STAGE/nightingale" && chmod +x "$STAGE/nightingale"
  export PYTHONPATH=$STAGE/site
  # The CUDA 13 libraries onnxruntime-gpu needs, from the image's nvidia-* Python packages.
  libdirs=$(python3 benches/gpu/cuda_libdirs.py)
  export LD_LIBRARY_PATH=$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export ORT_DYLIB_PATH=$STAGE/site/onnxruntime/capi/libonnxruntime.so.1.31.1
fi
{
  echo "RUN $(date -u +%FT%TZ) cpus=$(nproc) cell_s=$CELL_S raw_s=$RAW_S"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
} | tee "$OUT/machine.txt"

# 1. The ort backend's own test, requiring the GPU (its fixture path is compiled in).
if [ -f "$STAGE/cnn_kernels.zst" ] && [ "${DRY_RUN:-}" != 1 ]; then
  zstd -d -q -f "$STAGE/cnn_kernels.zst" -o "$STAGE/cnn_kernels" && chmod +x "$STAGE/cnn_kernels"
  if [ ! -e /work/main ]; then mkdir -p /work && ln -s "$PWD" /work/main; fi
  NIGHTINGALE_EXPECT_GPU=1 "$STAGE/cnn_kernels" the_cuda_provider --nocapture 2>&1 | tee "$OUT/test.log" || echo "TEST FAILED" | tee -a "$OUT/test.log"
fi

# 2. Raw onnxruntime-gpu, in-process.
repo=$STAGE/repo
rm -rf "$repo" && mkdir -p "$repo"
cp -r models/bench/resnet50-arch models/bundles/image-orientation models/bundles/lesion-detection \
  models/bundles/wdbc-malignancy "$repo/"
SPECS="$repo/resnet50-arch:1,8,64 $repo/image-orientation:1,16 $repo/lesion-detection:1,32 $repo/wdbc-malignancy:1,64"
# shellcheck disable=SC2086
python3 benches/gpu/ort_raw.py --out "$STAGE/ref" --seconds "$RAW_S" $SPECS 2>&1 | tee "$OUT/raw.jsonl" || echo "RAW FAILED"

# 3. The server, on the CUDA provider, then on the CPU provider (one intra-op thread per CPU).
cells="resnet50-arch:image:probabilities:1:1 resnet50-arch:image:probabilities:1:4
resnet50-arch:image:probabilities:8:1 resnet50-arch:image:probabilities:8:4
resnet50-arch:image:probabilities:64:1 resnet50-arch:image:probabilities:64:2
image-orientation:image:orientation:1:1 image-orientation:image:orientation:1:4
image-orientation:image:orientation:16:1 image-orientation:image:orientation:16:4
lesion-detection:image:lesion:1:1 lesion-detection:image:lesion:1:4
lesion-detection:image:lesion:32:1 lesion-detection:image:lesion:32:4
wdbc-malignancy:features:probabilities:1:1 wdbc-malignancy:features:probabilities:1:16"
port=8000
for ep in cuda cpu; do
  port=$((port + 1))
  "$STAGE/nightingale" serve --repository "$repo" --backend ort --execution-provider "$ep" \
    --intra-op-threads "$(nproc)" \
    --http-addr "127.0.0.1:$port" --audit-log "$STAGE/audit-$ep.jsonl" --log-format json \
    --data-dir "$STAGE/data-$ep" 2>"$OUT/server-$ep.log" &
  pid=$!
  ready=""
  for _ in $(seq 600); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/v2/health/ready', timeout=1)" 2>/dev/null; then ready=1; break; fi
    sleep 0.2
  done
  if [ -z "$ready" ]; then echo "server ($ep) not ready" | tee -a "$OUT/results.jsonl"; tail -20 "$OUT/server-$ep.log"; kill $pid || true; continue; fi
  for m in resnet50-arch image-orientation lesion-detection wdbc-malignancy; do
    python3 -c "
import json, urllib.request
c = json.load(urllib.request.urlopen('http://127.0.0.1:$port/v2/models/$m/config'))
print(json.dumps({'provider': '$ep', 'model': '$m', 'instance_group': c['instance_group']}))" | tee -a "$OUT/results.jsonl" || true
  done
  for cell in $cells; do
    IFS=: read -r m inp outp b c <<<"$cell"
    line=$(python3 benches/gpu/kserve_load.py "127.0.0.1:$port" "$m" "$STAGE/ref/$m.npz" \
      --input "$inp" --output "$outp" --batch "$b" --concurrency "$c" --seconds "$CELL_S" 2>&1 | tail -1 || true)
    echo "{\"provider\": \"$ep\", \"engine\": \"nightingale\", \"cell\": ${line:-null}}" | tee -a "$OUT/results.jsonl"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
done
grep -c '"level":"WARN"' "$OUT"/server-*.log || true
