#!/usr/bin/env bash
# Installs what the test suite needs, by name, where it is missing (scripts/test.sh runs this
# first; .ci/run starts it beside the lint so that the downloads overlap the compiler):
# - Python packages from PyPI into .venv (pinned in tests/peer/requirements.txt), including the
#   `onnxruntime` wheel whose library --features ort loads;
# - Debian packages: minisign (signature interop, tests/peer/test_signatures.py), dcmtk
#   (echoscu/storescu, tests/peer/test_dicom_*.py), dicom3tools (dciodvfy on every SR and SC,
#   dicom/tests/results.rs), postgresql (the scale-out audit store, tests/audit.rs), openssl
#   (the throwaway PKI of the TLS tests, scripts/test-pki.sh), and without their recommends
#   orthanc + orthanc-dicomweb (the real PACS and DICOMweb peer, tests/peer/test_dicom_orthanc.py,
#   test_dicomweb_orthanc.py) and chromium (the validation report rendered headless,
#   tests/peer/test_validation.py).
# Idempotent: a second run installs nothing and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${NIGHTINGALE_VENV:-.venv}

python_deps() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/peer/requirements.txt
}

have() { command -v "$1" >/dev/null 2>&1; }

# Debian packages, by the command (or file) that shows each is there.
apt_with=() apt_without=()
have minisign || apt_with+=(minisign)
have storescu || apt_with+=(dcmtk)
have dciodvfy || apt_with+=(dicom3tools)
have openssl || apt_with+=(openssl)
if [ -z "${NIGHTINGALE_TEST_POSTGRES_URL:-}" ] && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  apt_with+=(postgresql)
fi
if { ! have Orthanc && [ ! -x /usr/sbin/Orthanc ]; } \
  || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  apt_without+=(orthanc orthanc-dicomweb)
fi
have chromium || have chromium-headless-shell || apt_without+=(chromium)

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  # The package lists of a fresh machine may be missing or stale: update once, then retry.
  apt-get install -y -qq "$@" >/dev/null 2>&1 || {
    apt-get update -qq && apt-get install -y -qq "$@" >/dev/null
  }
}

debian_deps() {
  if [ ${#apt_with[@]} -gt 0 ]; then
    echo "== installing ${apt_with[*]} (Debian)"
    apt_install "${apt_with[@]}"
  fi
  if [ ${#apt_without[@]} -gt 0 ]; then
    echo "== installing ${apt_without[*]} (Debian, without recommends)"
    apt_install --no-install-recommends "${apt_without[@]}"
  fi
}

# PyPI and Debian downloads at once; each fails the script on its own.
python_deps &
pip_pid=$!
debian_status=0
debian_deps || debian_status=$?
pip_status=0
wait "$pip_pid" || pip_status=$?
if [ "$debian_status" -ne 0 ] || [ "$pip_status" -ne 0 ]; then
  echo "scripts/deps.sh: installing failed (Debian: exit $debian_status, PyPI: exit $pip_status)" >&2
  exit 1
fi
