#!/usr/bin/env bash
# tract with Nightingale's kernels (and, for CNNs, its one-row plan), tract with its own
# kernels and symbolic batch, and raw onnxruntime, on the image bundles (batch 1 and 8) and the
# architecture-only ResNet-50 (batch 1), one thread each, ROUNDS rounds interleaved
# (docs/performance.md §16.2, §16.3).
#
#   ROUNDS=3 benches/cnn/kernels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}
cargo build --release --quiet -p nightingale-inference --example cnn_kernels
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round"
  for spec in lesion-detection:1,8 image-orientation:1,8 resnet50:1; do
    name=${spec%%:*}
    case $name in
      resnet50) model=models/bench/resnet50-arch/1/model.onnx ;;
      *) model=models/bundles/$name/1/model.onnx ;;
    esac
    for batch in $(echo "${spec#*:}" | tr , ' '); do
      target/release/examples/cnn_kernels "$model" "$batch"
      .venv/bin/python benches/cnn/ort_time.py "$model" "$batch"
    done
  done
done
