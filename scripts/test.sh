#!/usr/bin/env bash
# The whole test suite: Rust tests on the default build (tract) and with --features ort,
# `models check` on the shipped bundles, and the real-peer tests (Triton's tritonclient
# against a running server, compared with onnxruntime) on both engines.
#
# Installs what it needs by name: Python packages from PyPI into .venv (pinned in
# tests/peer/requirements.txt); the ONNX Runtime library for --features ort comes from the
# pinned `onnxruntime` wheel there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${NIGHTINGALE_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/peer/requirements.txt

ORT_DYLIB_PATH=$("$VENV/bin/python" - <<'PY'
import glob, os, onnxruntime
libs = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))
print(libs[0])
PY
)
export ORT_DYLIB_PATH

echo "== Rust tests (default features: tract)"
cargo test --workspace --locked

echo "== models check on the shipped bundles and the benchmark model"
cargo run --quiet --locked -- models check models/bundles models/bench

echo "== Real peer: tritonclient against the server (tract)"
NIGHTINGALE_BIN=target/debug/nightingale NIGHTINGALE_BACKEND=tract \
  "$VENV/bin/python" -m pytest -q tests/peer

echo "== Rust tests with --features ort (ONNX Runtime from $ORT_DYLIB_PATH)"
cargo test --workspace --locked --features ort

echo "== Real peer: tritonclient against the server (ort)"
NIGHTINGALE_BIN=target/debug/nightingale NIGHTINGALE_BACKEND=ort \
  "$VENV/bin/python" -m pytest -q tests/peer
