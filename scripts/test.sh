#!/usr/bin/env bash
# The whole test suite: Rust tests on the default build (tract) and with --features ort,
# `models check` on the shipped bundles, and the real-peer tests (Triton's tritonclient
# against a running server, compared with onnxruntime) on both engines.
#
# Installs what it needs by name first (scripts/deps.sh: Python packages from PyPI into .venv,
# pinned in tests/peer/requirements.txt, and Debian packages); the ONNX Runtime library for
# --features ort comes from the pinned `onnxruntime` wheel there.
set -euo pipefail
cd "$(dirname "$0")/.."

# Python packages (.venv) and Debian packages, where missing: scripts/deps.sh says which and why.
scripts/deps.sh
VENV=${NIGHTINGALE_VENV:-.venv}

ORT_DYLIB_PATH=$("$VENV/bin/python" - <<'PY'
import glob, os, onnxruntime
libs = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))
print(libs[0])
PY
)
export ORT_DYLIB_PATH
# NIGHTINGALE_PEERS=1: the tests that need a peer (dciodvfy, pydicom, Orthanc, ...) fail
# without it instead of skipping.
export NIGHTINGALE_PEERS=1 NIGHTINGALE_VENV="$VENV"

# PostgreSQL for the scale-out audit store's tests (required, not skipped): Debian's
# postgresql, a cluster started with pg_ctlcluster, a role and a database for the tests.
# Set NIGHTINGALE_TEST_POSTGRES_URL yourself to use another server.
if [ -z "${NIGHTINGALE_TEST_POSTGRES_URL:-}" ]; then
  PG_VERSION=$(ls /usr/lib/postgresql | sort -V | tail -1)
  if ! pg_lsclusters -h | grep -q "^$PG_VERSION main"; then
    pg_createcluster "$PG_VERSION" main >/dev/null
  fi
  if ! pg_lsclusters -h | grep -q "^$PG_VERSION main .* online"; then
    pg_ctlcluster "$PG_VERSION" main start
  fi
  PG_PORT=$(pg_lsclusters -h | awk -v v="$PG_VERSION" '$1==v && $2=="main" {print $3}')
  runuser -u postgres -- psql -q -p "$PG_PORT" -v ON_ERROR_STOP=1 <<'SQL'
SELECT 'CREATE ROLE nightingale LOGIN PASSWORD ''nightingale-test'''
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'nightingale') \gexec
SELECT 'CREATE DATABASE nightingale_test OWNER nightingale'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'nightingale_test') \gexec
SQL
  export NIGHTINGALE_TEST_POSTGRES_URL="host=127.0.0.1 port=$PG_PORT user=nightingale password=nightingale-test dbname=nightingale_test"
fi

# Pixel decode tests (issue 9, PIXELS slice): dicom/tests/pixels.rs reads real DICOM files
# from the installed pydicom and pydicom-data wheels (nothing copied into the repository);
# with NIGHTINGALE_PEERS=1 a missing package fails the test instead of skipping it.
NIGHTINGALE_PYDICOM_DIR=$("$VENV/bin/python" -c 'import os, pydicom; print(os.path.dirname(pydicom.__file__))')
NIGHTINGALE_PYDICOM_DATA_DIR=$("$VENV/bin/python" -c 'import os, data_store; print(os.path.dirname(data_store.__file__))')
export NIGHTINGALE_PYDICOM_DIR NIGHTINGALE_PYDICOM_DATA_DIR

echo "== Rust tests (default features: tract)"
cargo test --workspace --locked

echo "== models check on the shipped bundles and the benchmark model"
cargo run --quiet --locked -- models check --require-signatures --trusted-key keys/demo/nightingale-demo.pub models/bundles models/bench

echo "== Real peer: tritonclient against the server (tract)"
NIGHTINGALE_BIN=target/debug/nightingale NIGHTINGALE_BACKEND=tract \
  "$VENV/bin/python" -m pytest -q tests/peer

echo "== Rust tests with --features ort (ONNX Runtime from $ORT_DYLIB_PATH)"
# The tests that run ONNX Runtime: the unit tests and the engine's own test targets
# (cnn_kernels, onnx_ml: nightingale-inference; load: nightingale-models), then the binary the
# ort peers below run. nightingale-dicom, nightingale-decision-support and
# nightingale-validation have no engine in them, and the root package's integration tests
# serve on tract whatever the features (BackendKind's default): they ran above and are not
# built and run twice (clippy --features ort checks that they compile).
cargo test --workspace --locked --features ort --exclude nightingale-dicom \
  --exclude nightingale-decision-support --exclude nightingale-validation \
  --lib --test cnn_kernels --test onnx_ml --test load
# `cargo test` built the server binary for the integration tests above, on tract: the ort
# peers need it with ONNX Runtime.
cargo build --locked --features ort --bin nightingale

echo "== Real peer: tritonclient against the server (ort)"
# The DICOM ingest peers (test_dicom_*.py, test_dicomweb.py) do not touch an engine, and the
# candle peers (test_candle.py) run candle bundles on candle whatever --backend says (their
# ONNX bundle's 501 for gradient methods is the same answer on tract and ort): run once.
NIGHTINGALE_BIN=target/debug/nightingale NIGHTINGALE_BACKEND=ort \
  "$VENV/bin/python" -m pytest -q tests/peer --ignore-glob="*/test_dicom*" \
  --ignore=tests/peer/test_candle.py
