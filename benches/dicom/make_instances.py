#!/usr/bin/env python3
"""Writes COUNT real DICOM instances for the ingest benchmark into OUT, split into PARTS
sub-folders (one per storescu process): copies of pydicom's and pydicom-data's CT and MR
files (Explicit VR Little Endian: a 512x512 CT and a 256x256 MR of ~0.5 MB each, a small CT
and a small MR), round robin, each copy with a fresh SOP Instance UID (and one fresh study
and series per source file), so no copy is a duplicate of another.

    python3 benches/dicom/make_instances.py OUT [--count 1000] [--parts 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

SOURCES = [
    "693_UNCI.dcm",  # pydicom-data: CT 512x512, 16 bit
    "MR-SIEMENS-DICOM-WithOverlays.dcm",  # pydicom-data: MR with overlays
    "CT_small.dcm",  # pydicom: CT 128x128
    "MR_small.dcm",  # pydicom: MR 64x64
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--parts", type=int, default=4)
    args = ap.parse_args()
    out = Path(args.out)
    sources = []
    for name in SOURCES:
        path = get_testdata_file(name)
        if path is None:
            raise SystemExit(f"{name} not found: install pydicom and pydicom-data")
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        sources.append(ds)
    for part in range(args.parts):
        (out / f"part{part}").mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(args.count):
        ds = sources[(i // args.parts) % len(sources)]
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        path = out / f"part{i % args.parts}" / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    print(f"{args.count} instances, {total} bytes, in {out}")


if __name__ == "__main__":
    main()
