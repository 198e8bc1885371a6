"""STOW-RS throughput with a real client: dicomweb-client stores N copies of a pydicom test
file (each with fresh UIDs, pydicom-encoded as the original) into a running Nightingale, in
requests of B instances, and prints instances/s and MB/s (Part 10 bytes sent).

    nightingale serve --dicom-spool /tmp/spool --repository /tmp/empty &
    .venv/bin/python benches/stow_dicomweb.py --url http://127.0.0.1:8000/dicomweb \
        --file CT_small.dcm --count 500 --batch 50

Not a test: no assertion on time. Every instance must be referenced in the responses.
"""

from __future__ import annotations

import argparse
import io
import time

import pydicom
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--file", default="CT_small.dcm")
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("--batch", type=int, default=50)
    args = ap.parse_args()

    template = pydicom.dcmread(get_testdata_file(args.file))
    study = generate_uid()
    datasets = []
    for _ in range(args.count):
        ds = template.copy()
        ds.StudyInstanceUID = study
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        datasets.append(ds)
    size = 0
    for ds in datasets:
        b = io.BytesIO()
        pydicom.dcmwrite(b, ds)
        size += len(b.getvalue())

    client = DICOMwebClient(url=args.url)
    stored = 0
    start = time.perf_counter()
    for i in range(0, len(datasets), args.batch):
        response = client.store_instances(datasets=datasets[i:i + args.batch])
        stored += len(response.ReferencedSOPSequence)
        assert "FailedSOPSequence" not in response
    elapsed = time.perf_counter() - start
    assert stored == args.count, (stored, args.count)
    print(f"{args.count} x {args.file} ({size / args.count / 1024:.1f} KiB each) in requests of "
          f"{args.batch}: {elapsed:.2f} s, {args.count / elapsed:.1f} instances/s, "
          f"{size / elapsed / 1e6:.2f} MB/s (client encoding included)")


if __name__ == "__main__":
    main()
