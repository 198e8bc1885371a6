"""Neighbouring-pixel correlation of every grey frame in the DICOM test files that ship in
the pydicom, pydicom-data and deid-data packages: the evidence behind the DICOM pipeline's
noise rule (src/pipeline/process.rs, NOISE_CORRELATION = 0.2: a frame whose row and column
neighbours are both correlated below it holds no picture). Prints the lowest frames, by the
larger of the two directions (what the rule reads) and by the smaller, and white noise's.

    .venv/bin/python scripts/picture_stats.py
"""

from __future__ import annotations

import glob
import os
import sysconfig
import warnings

import numpy as np
import pydicom


def corr(u: np.ndarray, v: np.ndarray) -> float:
    u = u - u.mean()
    v = v - v.mean()
    d = np.sqrt((u * u).sum() * (v * v).sum())
    return float((u * v).sum() / d) if d > 0 else float("nan")


def directions(x: np.ndarray) -> tuple[float, float]:
    """(row neighbours, column neighbours) correlation of a 2-D frame."""
    return (corr(x[:, :-1].ravel(), x[:, 1:].ravel()), corr(x[:-1].ravel(), x[1:].ravel()))


def main() -> None:
    warnings.filterwarnings("ignore")
    site = sysconfig.get_paths()["purelib"]
    files = sorted({f for d in ("data_store", "deid_data", "pydicom/data")
                    for f in glob.glob(f"{site}/{d}/**/*", recursive=True) if os.path.isfile(f)})
    rows = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
            a = ds.pixel_array
        except Exception:  # not DICOM, or pixels pydicom cannot decode here
            continue
        if getattr(ds, "SamplesPerPixel", 1) == 3:
            a = a.mean(axis=-1)
        frames = a if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 else a[None]
        for i, frame in enumerate(frames[:10]):
            x = frame.astype(np.float64)
            if x.ndim != 2 or min(x.shape) < 8:
                continue
            if x.size > 4_000_000:
                x = x[::2, ::2]
            h, v = directions(x)
            rows.append((max(h, v), min(h, v), os.path.relpath(f, site), i, x.shape))
    rows = [r for r in rows if not np.isnan(r[0])]
    print(f"{len(rows)} grey frames")
    print("lowest by the larger direction (the rule):")
    for r in sorted(rows)[:5]:
        print(f"  {r[0]:.2f}  {r[2]} frame {r[3]} {r[4]}")
    print("lowest by the smaller direction:")
    for r in sorted(rows, key=lambda r: r[1])[:5]:
        print(f"  {r[1]:.2f}  {r[2]} frame {r[3]} {r[4]}")
    noise = np.random.default_rng(1).integers(0, 4096, (256, 256)).astype(np.float64)
    print("white noise: %.3f / %.3f" % directions(noise))


if __name__ == "__main__":
    main()
