"""Fixtures holding the Rust image preprocessing (models/src/preprocess.rs) to the numpy
reference the imaging bundles are trained with (models/train/imaging.py).

Writes models/tests/fixtures/preprocess/cases.json: synthetic images (seeded) covering
every option: grey and RGB, MONOCHROME1, rescale slope/intercept, percentile and fixed
windows, padding of tall and wide images, stretching, up- and downsampling, a flat image;
and volume_cases.json: synthetic volumes (one window over the volume, resampling along the
slice axis) for `[dicom] inference = "volume"`.
    .venv/bin/python models/train/make_preprocess_fixtures.py
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imaging import Preprocessing, preprocess, preprocess_volume  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "models" / "tests" / "fixtures" / "preprocess" / "cases.json"


def main() -> None:
    rng = np.random.default_rng(7)
    base = Preprocessing(height=12, width=16, window="percentile", low=0.5, high=99.5,
                         aspect="pad", pad_value=0.0, mean=0.5, std=0.25)
    ramp = np.add.outer(np.arange(37) * 40.0, np.arange(53) * 3.0) + rng.integers(0, 50, (37, 53))
    cases = [
        ("wide grey, percentile, pad", ramp, base, 1.0, 0.0, False),
        ("tall grey, monochrome1, rescale", ramp.T.copy(), base, 2.5, -1024.0, True),
        ("fixed CT window, stretch", ramp * 2 - 1000, replace(base, window="fixed", window_center=40.0,
                                                             window_width=400.0, aspect="stretch"), 1.0, -1024.0, False),
        ("upsampling a tiny image, pad value", rng.integers(0, 4096, (5, 3)).astype(float),
         replace(base, pad_value=0.3, height=9, width=11), 1.0, 0.0, False),
        ("RGB", rng.integers(0, 256, (20, 30, 3)).astype(float), replace(base, low=2.0, high=98.0), 1.0, 0.0, False),
        ("flat image", np.full((6, 9), 123.0), base, 1.0, 0.0, False),
        ("bimodal, larger output", np.where(rng.random((120, 90)) < 0.3, 0.0, rng.normal(1000, 200, (120, 90))).round(),
         replace(base, height=48, width=40), 1.0, 0.0, False),
    ]
    out = []
    for name, img, spec, slope, intercept, mono1 in cases:
        y = preprocess(img, spec, slope, intercept, mono1)
        window = ({"method": "percentile", "low": spec.low, "high": spec.high} if spec.window == "percentile"
                  else {"method": "fixed", "center": spec.window_center, "width": spec.window_width})
        out.append({
            "name": name,
            "preprocessing": {"kind": "image", "input": "image", "size": [spec.height, spec.width],
                              "aspect": spec.aspect, "pad_value": spec.pad_value, "resize": "area",
                              "window": window, "mean": spec.mean, "std": spec.std},
            "rows": img.shape[0], "cols": img.shape[1], "samples": 3 if img.ndim == 3 else 1,
            "slope": slope, "intercept": intercept, "monochrome1": mono1,
            "pixels": [float(v) for v in img.astype(np.float32).ravel()],
            "expected": [float(f"{v:.8g}") for v in y.ravel()],
        })
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"generator": "models/train/make_preprocess_fixtures.py", "cases": out}) + "\n")
    print(f"wrote {len(out)} cases to {OUT}")
    volumes(rng)


def _section(spec: Preprocessing) -> dict:
    window = ({"method": "percentile", "low": spec.low, "high": spec.high} if spec.window == "percentile"
              else {"method": "fixed", "center": spec.window_center, "width": spec.window_width})
    return {"kind": "image", "input": "volume", "size": [spec.height, spec.width], "aspect": spec.aspect,
            "pad_value": spec.pad_value, "resize": "area", "window": window, "mean": spec.mean, "std": spec.std}


def volumes(rng: np.random.Generator) -> None:
    """Volume cases (volume_cases.json): one window over all slices (percentiles of every
    voxel, with slices of different rescales), then the slices resampled along the slice axis
    by the area rule: down (averaging, overlapping bins), up (replication), kept."""
    base = Preprocessing(height=10, width=12, window="percentile", low=0.5, high=99.5,
                         aspect="pad", pad_value=0.0, mean=0.5, std=0.25)

    def stack(n, rows, cols, scale):
        ramp = np.add.outer(np.arange(rows) * 7.0, np.arange(cols) * 3.0)
        return [(ramp + k * scale + rng.integers(0, 40, (rows, cols))).astype(float) for k in range(n)]

    cases = [
        ("7 slices to 3, percentile, two rescales", stack(7, 13, 17, 25.0), base, 3,
         [1.0] * 4 + [2.0] * 3, [0.0] * 4 + [-100.0] * 3, False),
        ("3 slices to 7 (replication), fixed window, monochrome1", stack(3, 9, 6, 300.0),
         replace(base, window="fixed", window_center=200.0, window_width=500.0), 7,
         [1.0] * 3, [-50.0] * 3, True),
        ("10 slices kept (any depth), percentile, stretch", stack(10, 8, 8, 11.0),
         replace(base, aspect="stretch", low=2.0, high=98.0), None, [1.0] * 10, [-1024.0] * 10, False),
        ("10 slices to 4, one rescale", stack(10, 16, 16, 9.0), base, 4, [1.0] * 10, [0.0] * 10, False),
    ]
    out = []
    for name, slices, spec, depth, slopes, intercepts, mono1 in cases:
        y = preprocess_volume(slices, spec, depth, slopes, intercepts, mono1)
        out.append({
            "name": name,
            "preprocessing": _section(spec),
            "depth": depth,
            "rows": slices[0].shape[0], "cols": slices[0].shape[1],
            "slices": [[float(v) for v in s.astype(np.float32).ravel()] for s in slices],
            "slopes": slopes, "intercepts": intercepts, "monochrome1": mono1,
            "expected_shape": list(y.shape),
            "expected": [float(f"{v:.8g}") for v in y.ravel()],
        })
    path = OUT.parent / "volume_cases.json"
    path.write_text(json.dumps({"generator": "models/train/make_preprocess_fixtures.py", "cases": out}) + "\n")
    print(f"wrote {len(out)} volume cases to {path}")


if __name__ == "__main__":
    main()
