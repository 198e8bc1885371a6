"""DICOM pipeline latency (a benchmark, not a test).

Starts a release `nightingale serve --dicom-port` with the image-orientation bundle and
dcmtk's `storescp` as the results destination, then, round after round:

- **CR study**: pydicom-data's RG1_UNCR (1955 × 1841 CR, MONOCHROME1) with fresh UIDs, sent
  by `storescu`;
- **CT series**: 100 slices made from pydicom-data's 693_UNCR (512 × 512 CT), one series,
  sent by one `storescu`.

End-to-end latency = when storescp wrote the SR (its file's mtime: storescp writes before it
acknowledges) minus (when the series' last instance was stored, from the spool index, plus
the configured quiet time): the quiet time is excluded, as the issue asks; the assembler's
poll interval (0–250 ms) is included. The table also shows the part after the job was made
(`created_ms` from `GET /results/studies/{study}`).

Then decode + preprocess per image, side by side in the same run: Nightingale's
`nightingale_pipeline_stage_seconds{stage="decode_preprocess"}` (sum over the CR jobs / their
images) against pydicom (`dcmread` + `pixel_array`) + the numpy reference
(`models/train/imaging.py`) on the same file, `--repeat` times.

    cargo build --release
    .venv/bin/python benches/pipeline/latency.py [--rounds 20] [--ct-rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "models" / "train"))
import imaging  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}
QUIET_MS = 500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")


def results(http: int, study: str):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/results/studies/{study}", timeout=5) as r:
            return json.load(r)
    except urllib.error.HTTPError:
        return None


def metric(http: int, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name) and want in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def make_series(src: str, out: Path, n: int) -> tuple[str, str]:
    study, series = generate_uid(), generate_uid()
    out.mkdir(parents=True)
    ds = pydicom.dcmread(src)
    for i in range(n):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.save_as(out / f"{i:04d}.dcm", enforce_file_format=True)
    return study, series


def start_pipeline(binary: str, work: Path, repo: Path, procs: list, ready_within: float):
    """dcmtk's storescp as the PACS (files in work/pacs), then `nightingale serve` over `repo`
    with the DICOM port and the pipeline sending results to it (log in work/server.log);
    returns (the PACS folder, the DICOM port, the HTTP port) once the server is ready. Both
    processes are appended to `procs`."""
    pacs_port, dicom_port, http = free_port(), free_port(), free_port()
    pacs = work / "pacs"
    pacs.mkdir()
    procs.append(subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(pacs), str(pacs_port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV))
    log = open(work / "server.log", "wb")
    procs.append(subprocess.Popen(
        [binary, "serve", "--repository", str(repo), "--http-addr", f"127.0.0.1:{http}",
         "--data-dir", str(work / "data"), "--dicom-port", str(dicom_port),
         "--results-destination", f"PACS@127.0.0.1:{pacs_port}", "--series-quiet-secs", str(QUIET_MS / 1000)],
        stdout=subprocess.DEVNULL, stderr=log))

    def ready():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=1).status == 200
        except OSError:
            return False

    wait(ready, ready_within, "the server")
    return pacs, dicom_port, http


def stop_all(procs: list, work: Path) -> None:
    """Stops the processes (SIGTERM, SIGKILL after 10 s) and deletes the work folder."""
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "nightingale"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--ct-rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nightingale-latency-"))
    procs = []
    try:
        repo = work / "models"
        repo.mkdir()
        shutil.copytree(REPO / "models" / "bundles" / "image-orientation", repo / "image-orientation")
        pacs, dicom_port, http = start_pipeline(args.bin, work, repo, procs, 60)

        def run(src: str, n: int, tag: str) -> float:
            study, _ = make_series(src, work / tag, n)
            before = set(pacs.iterdir())
            subprocess.run(["storescu", "-aec", "NIGHTINGALE", "127.0.0.1", str(dicom_port),
                            "+sd", str(work / tag)], check=True, env=ENV, capture_output=True)
            wait(lambda: len(set(pacs.iterdir()) - before) >= 2, 300, f"{tag} results")
            report = wait(lambda: (r := results(http, study)) and r["series"][0]["jobs"]
                          and r["series"][0]["jobs"][-1]["state"] == "done" and r, 60, "the job")
            job = report["series"][0]["jobs"][-1]
            sr_uid = next(o["sop_instance_uid"] for o in job["objects"] if o["kind"] == "SR")
            sr_file = next(p for p in set(pacs.iterdir()) - before
                           if str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) == sr_uid)
            shutil.rmtree(work / tag)
            db = sqlite3.connect(f"file:{work / 'data' / 'spool' / 'index.sqlite3'}?mode=ro", uri=True)
            last = db.execute("SELECT max(received_at_ms) FROM instances WHERE study_uid = ?",
                              (study,)).fetchone()[0]
            db.close()
            done = sr_file.stat().st_mtime * 1000.0
            return done - (last + QUIET_MS), done - job["created_ms"]

        cr = [run(get_testdata_file("RG1_UNCR.dcm"), 1, f"cr{i}") for i in range(args.rounds)]
        cr_decode = metric(http, "nightingale_pipeline_stage_seconds_sum", stage="decode_preprocess")
        cr_jobs = metric(http, "nightingale_pipeline_stage_seconds_count", stage="decode_preprocess")
        ct = [run(get_testdata_file("693_UNCR.dcm"), 100, f"ct{i}") for i in range(args.ct_rounds)]

        # pydicom + numpy on the same CR, same machine, same run.
        spec = imaging.Preprocessing(height=224, width=224, window="percentile", low=0.5, high=99.5,
                                     aspect="pad", pad_value=0.0, mean=0.5, std=0.25)
        path = get_testdata_file("RG1_UNCR.dcm")
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            ds = pydicom.dcmread(path)
            imaging.preprocess(ds.pixel_array, spec, float(ds.get("RescaleSlope", 1.0)),
                               float(ds.get("RescaleIntercept", 0.0)),
                               ds.PhotometricInterpretation == "MONOCHROME1")
            times.append(time.perf_counter() - t0)
        py_ms = statistics.median(times) * 1000
        ng_ms = cr_decode / cr_jobs * 1000 if cr_jobs else float("nan")

        def pct(v, q):
            s = sorted(v)
            return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]

        print("| series | rounds | p50 ms | p99 ms | max ms | of which after the job was made: p50 ms |")
        print("|---|---|---|---|---|---|")
        for name, runs in (("CR 1955×1841, 1 image", cr), ("CT 512×512, 100 slices", ct)):
            total = [t for t, _ in runs]
            job = [j for _, j in runs]
            print(f"| {name} | {len(runs)} | {pct(total, 50):.0f} | {pct(total, 99):.0f} | "
                  f"{max(total):.0f} | {pct(job, 50):.0f} |")
        print()
        print(f"decode + preprocess of the CR: Nightingale {ng_ms:.1f} ms (mean of {cr_jobs:.0f} jobs), "
              f"pydicom + numpy {py_ms:.1f} ms (median of {args.repeat}); ratio {py_ms / ng_ms:.2f}x")
        return 0
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    sys.exit(main())
