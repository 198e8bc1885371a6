#!/usr/bin/env bash
# Rebuild every generated model bundle (models/bundles, the benchmark-only models/bench, and
# the not-shipped volume reference models/volume) and the ONNX-ML conformance fixtures.
# (icu-mortality and pima-diabetes also write their test splits into git-ignored
# testdata/ folders: that data is GPL-licensed and is not committed.)
#   models/train/build_all.sh            (uses .venv/bin/python at the repo root)
#   PYTHON=/path/to/python models/train/build_all.sh
# Set up the venv first:
#   python3 -m venv .venv && .venv/bin/pip install -r models/train/requirements.txt
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
if [[ ! -x "$py" ]]; then
    echo "error: $py not found; create the venv:" >&2
    echo "  python3 -m venv $repo/.venv && $repo/.venv/bin/pip install -r $repo/models/train/requirements.txt" >&2
    exit 1
fi
cd "$repo"

"$py" models/train/wdbc.py
"$py" models/train/icu_mortality.py
"$py" models/train/pima_diabetes.py
"$py" models/train/make_op_fixtures.py
# Benchmark-only model (synthetic weights, not clinical), in its own repository models/bench:
"$py" models/train/resnet50_bench.py
"$py" models/train/make_preprocess_fixtures.py

# The image bundles train with torch, kept out of .venv in its own venv (SKIP_IMAGING=1 skips it):
#   python3 -m venv .venv-train
#   .venv-train/bin/pip install -r models/train/requirements.txt -r models/train/requirements-imaging.txt
if [[ "${SKIP_IMAGING:-0}" != 1 ]]; then
    torch_py="${PYTHON_TORCH:-$repo/.venv-train/bin/python}"
    if [[ ! -x "$torch_py" ]]; then
        echo "error: $torch_py not found (set SKIP_IMAGING=1 to skip image-orientation and lesion-detection); create it with:" >&2
        echo "  python3 -m venv $repo/.venv-train && $repo/.venv-train/bin/pip install -r $repo/models/train/requirements.txt -r $repo/models/train/requirements-imaging.txt" >&2
        exit 1
    fi
    "$torch_py" models/train/image_orientation.py
    "$torch_py" models/train/lesion_detection.py
fi
# The reference VOLUME bundle (not shipped: models/volume, git-ignored), built from
# lesion-detection's committed model with the onnx helper (no torch):
"$py" models/train/lesion_detection_mip.py --out models/volume

sha256sum models/bundles/*/[0-9]*/model.onnx models/bench/*/[0-9]*/model.onnx
