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

# minisign (Debian) for the signature interop tests (tests/peer/test_signatures.py).
if ! command -v minisign >/dev/null 2>&1; then
  echo "== installing minisign (Debian)"
  apt-get install -y -qq minisign >/dev/null 2>&1 || {
    apt-get update -qq && apt-get install -y -qq minisign >/dev/null
  }
fi

# dcmtk (Debian) for the DICOM SCP's real-peer tests (tests/peer/test_dicom_scp.py):
# echoscu and storescu.
if ! command -v storescu >/dev/null 2>&1; then
  echo "== installing dcmtk (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq dcmtk >/dev/null 2>&1 || {
    apt-get update -qq && apt-get install -y -qq dcmtk >/dev/null
  }
fi

# dicom3tools (Debian) for the DICOM result objects' checks (dicom/tests/results.rs, issue 9
# RESULTS slice): dciodvfy on every SR and SC. NIGHTINGALE_PEERS=1 makes that test run dciodvfy
# and tests/peer/check_result_objects.py (pydicom, from $NIGHTINGALE_VENV) and fail without them.
if ! command -v dciodvfy >/dev/null 2>&1; then
  echo "== installing dicom3tools (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq dicom3tools >/dev/null 2>&1 || {
    apt-get update -qq && apt-get install -y -qq dicom3tools >/dev/null
  }
fi
export NIGHTINGALE_PEERS=1 NIGHTINGALE_VENV="$VENV"

# Orthanc (Debian) as the real PACS of the DICOM pipeline's peer test
# (tests/peer/test_dicom_orthanc.py, issue 9 PEERS slice), and with its DICOMweb plugin as a
# STOW/QIDO/WADO client (tests/peer/test_dicomweb_orthanc.py): the tests start their own
# Orthanc on free loopback ports with a generated configuration (the packaged service is not
# used).
if { ! command -v Orthanc >/dev/null 2>&1 && [ ! -x /usr/sbin/Orthanc ]; } \
  || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  echo "== installing orthanc and orthanc-dicomweb (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb >/dev/null 2>&1 || {
    apt-get update -qq && apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb >/dev/null
  }
fi

# Chromium (Debian) renders the validation report headless in tests/peer/test_validation.py
# (no console errors; a screenshot in target/test-artifacts/validation).
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-headless-shell >/dev/null 2>&1; then
  echo "== installing chromium (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || {
    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null
  }
fi

# PostgreSQL for the scale-out audit store's tests (required, not skipped): Debian's
# postgresql, a cluster started with pg_ctlcluster, a role and a database for the tests.
# Set NIGHTINGALE_TEST_POSTGRES_URL yourself to use another server.
if [ -z "${NIGHTINGALE_TEST_POSTGRES_URL:-}" ]; then
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    echo "== installing PostgreSQL (Debian postgresql)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq postgresql >/dev/null 2>&1 || {
      apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
    }
  fi
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

# The TLS tests make a throwaway PKI with the openssl command-line tool (scripts/test-pki.sh).
if ! command -v openssl >/dev/null 2>&1; then
  echo "== installing openssl (Debian openssl)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq openssl >/dev/null 2>&1 || {
    apt-get update -qq && apt-get install -y -qq openssl >/dev/null
  }
fi

# Pixel decode tests (issue 9, PIXELS slice): dicom/tests/pixels.rs reads real DICOM files
# from the installed pydicom and pydicom-data wheels (nothing copied into the repository);
# with NIGHTINGALE_PEERS=1 a missing package fails the test instead of skipping it.
NIGHTINGALE_PYDICOM_DIR=$("$VENV/bin/python" -c 'import os, pydicom; print(os.path.dirname(pydicom.__file__))')
NIGHTINGALE_PYDICOM_DATA_DIR=$("$VENV/bin/python" -c 'import os, data_store; print(os.path.dirname(data_store.__file__))')
export NIGHTINGALE_PYDICOM_DIR NIGHTINGALE_PYDICOM_DATA_DIR
export NIGHTINGALE_PEERS=1

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
