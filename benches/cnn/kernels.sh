#!/usr/bin/env bash
# tract with Nightingale's kernels, tract with its own, and raw onnxruntime on the image
# bundles, one thread each, ROUNDS rounds interleaved (docs/performance.md §16.2).
#
#   ROUNDS=3 benches/cnn/kernels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}
cargo build --release --quiet -p nightingale-inference --example cnn_kernels
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round"
  for model in models/bundles/lesion-detection/1/model.onnx models/bundles/image-orientation/1/model.onnx; do
    for batch in 1 8; do
      target/release/examples/cnn_kernels "$model" "$batch"
      .venv/bin/python benches/cnn/ort_time.py "$model" "$batch"
    done
  done
done
