"""Fixtures holding the Rust pixel decode (dicom/src/pixels.rs) to pydicom + numpy.

For a set of real DICOM files shipped in the pydicom and pydicom-data wheels, decodes the
pixel data with pydicom (stored values as `pixel_array` gives them; YBR converted to RGB and
PALETTE COLOR looked up with `apply_color_lut`, as pydicom does) and, where asked, applies
pydicom's `apply_modality_lut` and `apply_voi_lut` (its output range normalised to 0-1).
Per checked frame it records the whole frame's sum, sum of squares, min and max, and a
strided sample of the values. Files this build does not decode get the error kind the Rust
side must report, derived here from the transfer syntax and header (the build table in
docs/dicom.md).

No image data is copied into the repository: each case names its file by package
(`pydicom` = the pydicom package directory, `data_store` = pydicom-data's) and a path
relative to it; the Rust test (dicom/tests/pixels.rs) finds the packages through the
environment variables NIGHTINGALE_PYDICOM_DIR / NIGHTINGALE_PYDICOM_DATA_DIR that
scripts/test.sh exports.

Needs, besides pydicom 3.0.2 / pydicom-data 1.0.0 / numpy, the JPEG plug-ins
(tests/peer/requirements-pixels.txt):
    python3 -m venv .venv-pixels
    .venv-pixels/bin/pip install -r tests/peer/requirements-pixels.txt
    .venv-pixels/bin/python tests/peer/make_pixel_fixtures.py
The output is deterministic (re-running it leaves the fixture byte for byte unchanged).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

import data_store  # pydicom-data

OUT = Path(__file__).resolve().parents[2] / "dicom" / "tests" / "fixtures" / "pixels" / "cases.json"
PACKAGES = {
    "pydicom": Path(pydicom.__file__).parent,
    "data_store": Path(data_store.__file__).parent,
}
T = "data/test_files/"
SAMPLES = 256

# (name, package, path, values): values is "stored", "modality" or "voi".
CASES = [
    # CT / MR in every transfer syntax of the ingest issue that the files cover
    ("ct-small", "pydicom", T + "CT_small.dcm", "stored"),
    ("ct-small-modality", "pydicom", T + "CT_small.dcm", "modality"),
    ("ct-small-voi", "pydicom", T + "CT_small.dcm", "voi"),
    ("mr-small", "pydicom", T + "MR_small.dcm", "stored"),
    ("mr-small-voi", "pydicom", T + "MR_small.dcm", "voi"),
    ("mr-small-implicit", "pydicom", T + "MR_small_implicit.dcm", "stored"),
    ("mr-small-big-endian", "pydicom", T + "MR_small_bigendian.dcm", "stored"),
    ("mr-small-expb", "pydicom", T + "MR_small_expb.dcm", "stored"),
    ("mr-small-rle", "pydicom", T + "MR_small_RLE.dcm", "stored"),
    ("mr-small-j2k-lossless", "pydicom", T + "MR_small_jp2klossless.dcm", "stored"),
    ("mr-small-jpeg-ls", "pydicom", T + "MR_small_jpeg_ls_lossless.dcm", "stored"),
    ("mr2-j2k-lossy", "data_store", "data/MR2_J2KI.dcm", "stored"),
    ("ct-693-j2k-lossless", "data_store", "data/693_J2KR.dcm", "modality"),
    ("ct-j2k-pixelrep-mismatch", "pydicom", T + "J2K_pixelrep_mismatch.dcm", "stored"),
    ("nm-jpeg-lossless", "data_store", "data/JPEG-LL.dcm", "stored"),
    ("us-jpeg-lossless-sv1-8bit", "data_store", "data/JPGLosslessP14SV1_1s_1f_8b.dcm", "stored"),
    ("nm-jpeg-2000", "pydicom", T + "JPEG2000.dcm", "stored"),
    ("nm-jpeg-extended-12bit", "pydicom", T + "JPGExtended.dcm", "stored"),
    ("nm-jpeg-lossy-12bit", "pydicom", T + "JPEG-lossy.dcm", "stored"),
    ("ot-deflate", "pydicom", T + "image_dfl.dcm", "stored"),
    # CR, MONOCHROME1
    ("cr-rg3-monochrome1", "data_store", "data/RG3_UNCI.dcm", "stored"),
    ("cr-rg3-voi", "data_store", "data/RG3_UNCI.dcm", "voi"),
    ("ct-693-j2k-voi", "data_store", "data/693_J2KR.dcm", "voi"),
    ("cr-rg1-j2k-lossless-monochrome1", "data_store", "data/RG1_J2KR.dcm", "modality"),
    # multi-frame
    ("mr-emri-10-frames", "pydicom", T + "emri_small.dcm", "stored"),
    ("mr-emri-rle-10-frames", "pydicom", T + "emri_small_RLE.dcm", "stored"),
    ("mr-emri-j2k-10-frames", "pydicom", T + "emri_small_jpeg_2k_lossless.dcm", "stored"),
    ("mr-emri-jpeg-ls", "pydicom", T + "emri_small_jpeg_ls_lossless.dcm", "stored"),
    ("us-ybr-422-jpeg-30-frames", "pydicom", T + "examples_ybr_color.dcm", "stored"),
    # colour
    ("sc-rgb", "pydicom", T + "SC_rgb.dcm", "stored"),
    ("sc-rgb-16bit-2-frames", "pydicom", T + "SC_rgb_16bit_2frame.dcm", "stored"),
    ("sc-rgb-rle", "pydicom", T + "SC_rgb_rle.dcm", "stored"),
    ("sc-rgb-rle-16bit", "pydicom", T + "SC_rgb_rle_16bit.dcm", "stored"),
    ("us-rgb-planar", "pydicom", T + "color-pl.dcm", "stored"),
    ("sc-ybr-full-native", "pydicom", T + "SC_ybr_full_uncompressed.dcm", "stored"),
    ("sc-ybr-full-422-native", "pydicom", T + "SC_ybr_full_422_uncompressed.dcm", "stored"),
    ("sc-ybr-full-jpeg", "pydicom", T + "SC_rgb_jpeg_dcmtk.dcm", "stored"),
    ("sc-ybr-full-jpeg-dcmtk-n1", "pydicom", T + "SC_rgb_dcmtk_+eb+cy+n1.dcm", "stored"),
    ("sc-ybr-full-422-jpeg-dcmtk-s2", "pydicom", T + "SC_rgb_dcmtk_+eb+cy+s2.dcm", "stored"),
    ("sc-rgb-jpeg-no-transform", "pydicom", T + "SC_jpeg_no_color_transform.dcm", "stored"),
    ("us-j2k-ybr-rct", "data_store", "data/US1_J2KR.dcm", "stored"),
    ("us-j2k-ybr-ict", "data_store", "data/US1_J2KI.dcm", "stored"),
    ("us-palette", "pydicom", T + "examples_palette.dcm", "stored"),
    ("us-palette-rle-2-frames", "data_store", "data/OBXXXX1A_rle_2frame.dcm", "stored"),
    # LUTs and depths
    ("ot-voi-lut-sequence", "pydicom", T + "vlut_04.dcm", "voi"),
    ("ot-modality-lut-sequence", "pydicom", T + "mlut_18.dcm", "modality"),
    ("seg-1bit", "pydicom", T + "liver_1frame.dcm", "stored"),
    ("rtdose-32bit", "pydicom", T + "rtdose_1frame.dcm", "stored"),
    ("sc-rgb-rle-32bit", "pydicom", T + "SC_rgb_rle_32bit.dcm", "stored"),
    ("mr-truncated", "pydicom", T + "MR_truncated.dcm", "stored"),
]

JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
# Lossy codecs: the Rust and C decoders may round differently (IDCT, upsampling).
LOSSY = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.91"}


def expected_error(ds: pydicom.Dataset, ts: str, values: str) -> str | None:
    """What this build refuses, and why (dicom/src/pixels.rs; the table in docs/dicom.md)."""
    raw = ds.get_item(0x7FE00010)
    if raw is not None and raw.length != 0xFFFFFFFF and raw.length > len(raw.value):
        return "unreadable"  # the file ends inside its pixel data element
    bits = int(ds.BitsAllocated)
    if bits not in (1, 8, 16):
        return "unsupported_bits_allocated"
    if ts in JPEG_LS:
        return "unsupported_transfer_syntax"
    if ts == JPEG_EXTENDED and int(ds.BitsStored) > 8:
        return "unsupported_transfer_syntax"
    if ts not in NATIVE and bits == 1:
        return "unsupported_bits_allocated"
    if ts in NATIVE:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        # native YBR_FULL_422: two samples per pixel (Y1 Y2 Cb Cr per pair of pixels)
        per_pixel = 2 if ds.PhotometricInterpretation == "YBR_FULL_422" else int(ds.SamplesPerPixel)
        n = int(ds.Rows) * int(ds.Columns) * per_pixel * frames
        need = math.ceil(n / 8) if bits == 1 else n * bits // 8
        if len(ds.PixelData) < need:
            return "pixel_data_too_short"
    if values != "stored" and "ModalityLUTSequence" in ds:
        return "unsupported_lut"
    if values == "voi" and "VOILUTSequence" not in ds and "WindowCenter" not in ds:
        return "bad_attribute"  # nothing to window with
    return None


def normalised_voi(ds: pydicom.Dataset, modality: np.ndarray) -> np.ndarray:
    y = apply_voi_lut(modality, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return y / (2**bits - 1)
    # apply_windowing's output range, as pydicom computes it
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation) == 0:
        y_min, y_max = 0.0, 2.0**bits - 1
    else:
        y_min, y_max = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        s, i = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        y_min, y_max = y_min * s + i, y_max * s + i
    return (y - y_min) / (y_max - y_min)


def frame_record(index: int, frame: np.ndarray) -> dict:
    flat = frame.astype(np.float64).reshape(-1)
    stride = max(1, math.ceil(flat.size / SAMPLES))
    return {
        "index": index,
        "sum": float(flat.sum()),
        "sum_sq": float((flat * flat).sum()),
        "min": float(flat.min()),
        "max": float(flat.max()),
        "stride": stride,
        "sample": [float(x) for x in flat[::stride]],
    }


def locate(package: str, rel: str) -> tuple[str, str]:
    """(package, path relative to it): pydicom's test files live in either wheel."""
    if package == "pydicom":
        from pydicom.data import get_testdata_file

        found = Path(get_testdata_file(Path(rel).name))
        for key, root in PACKAGES.items():
            if found.is_relative_to(root):
                return key, str(found.relative_to(root))
        raise FileNotFoundError(rel)
    return package, rel


def first(v) -> float:
    return float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v)


def render8(ds: pydicom.Dataset, stored: np.ndarray, window: str) -> dict:
    """The 8-bit display of a grey frame (the Secondary Capture's source), in numpy: modality
    values windowed to 0-255 (the header's first window for "auto" when it has one, else the
    0.5th-99.5th percentiles), MONOCHROME1 inverted, rounded half up."""
    v = apply_modality_lut(stored, ds).astype(np.float64)
    if window == "auto" and "WindowCenter" in ds and "WindowWidth" in ds:
        c, w = first(ds.WindowCenter), first(ds.WindowWidth)
        lo, hi = c - w / 2, c + w / 2
    else:
        lo, hi = np.percentile(v, 0.5), np.percentile(v, 99.5)
    y = np.clip((v - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(v)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        y = 1.0 - y
    out = np.floor(y * 255.0 + 0.5)
    rec = frame_record(0, out)
    rec["window"] = window
    return rec


RENDERED = {"ct-small": "auto", "cr-rg3-monochrome1": "percentiles", "mr-small": "auto"}


def case(name: str, package: str, rel: str, values: str) -> dict:
    package, rel = locate(package, rel)
    path = PACKAGES[package] / rel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
    ts = str(ds.file_meta.TransferSyntaxUID)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    out = {
        "name": name,
        "package": package,
        "path": rel,
        "transfer_syntax": ts,
        "values": values,
        "photometric": str(ds.PhotometricInterpretation),
        "rows": int(ds.Rows),
        "cols": int(ds.Columns),
        "frames": frames,
        "lossy": ts in LOSSY,
    }
    err = expected_error(ds, ts, values)
    if err is not None:
        out["error"] = err
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = ds.pixel_array
    if str(ds.PhotometricInterpretation) == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if frames == 1:
        arr = arr[None]
    samples = 3 if arr.ndim == 4 else 1
    out["samples"] = samples
    picks = sorted({0, frames // 2, frames - 1})
    records = []
    for f in picks:
        px = arr[f]
        if values in ("modality", "voi"):
            px = apply_modality_lut(px, ds)
        if values == "voi":
            px = normalised_voi(ds, px)
        records.append(frame_record(f, px))
    out["checked"] = records
    if name in RENDERED:
        out["render"] = render8(ds, arr[0], RENDERED[name])
    return out


def main() -> None:
    out = {
        "generator": "tests/peer/make_pixel_fixtures.py",
        "pydicom": pydicom.__version__,
        "numpy": np.__version__,
        "cases": [case(*c) for c in CASES],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    for c in out["cases"]:
        print(f"{c['name']:36} {c['transfer_syntax']:24} {c.get('error', 'ok')}")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
