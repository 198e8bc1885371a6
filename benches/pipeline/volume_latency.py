"""Per-volume DICOM pipeline latency (a benchmark, not a test).

Builds the `lesion-detection-mip` reference volume bundle (models/train/lesion_detection_mip.py,
any depth) into a temporary repository, starts `nightingale serve --dicom-port` on it with
dcmtk's `storescp` as the results destination, and, round after round, sends with `storescu` a
CT series of `--slices` single-frame slices made from pydicom-data's 693_UNCR (512 x 512; the
same real slice each time, at positions 1.25 mm apart along z, so the series is a valid
volume: the pixel data repeats, which changes nothing in the work done).

End-to-end latency = when storescp wrote the SR (its file's mtime) minus (when the series' last
instance was stored, from the spool index, plus the configured quiet time), as in
benches/pipeline/latency.py. The per-stage times are the server's own
`nightingale_pipeline_stage_seconds` (mean per job): `decode_preprocess` (every header, two
decode passes for the percentile window, the slice-axis resampling), `inference` (one call),
`results` (SR referencing every slice + SC). Beside them, once: pydicom + numpy
(`imaging.preprocess_volume`) building the same model input from the same files.

    cargo build --release
    .venv/bin/python benches/pipeline/volume_latency.py [--bin target/release/nightingale] [--rounds 3] [--slices 100]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import ENV, QUIET_MS, results, start_pipeline, stop_all, wait  # noqa: E402  (the CR-study bench's helpers)

BUNDLE = "lesion-detection-mip"


def stages(http: int) -> dict[str, tuple[float, float]]:
    """stage -> (sum of seconds, count) of nightingale_pipeline_stage_seconds."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5).read().decode()
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        for kind, i in (("_sum{", 0), ("_count{", 1)):
            if line.startswith("nightingale_pipeline_stage_seconds" + kind):
                stage = line.split('stage="', 1)[1].split('"', 1)[0]
                out.setdefault(stage, [0.0, 0.0])[i] = float(line.rsplit(" ", 1)[1])
    return {k: (v[0], v[1]) for k, v in out.items()}


def make_volume(out: Path, n: int) -> str:
    study, series = generate_uid(), generate_uid()
    out.mkdir(parents=True)
    ds = pydicom.dcmread(get_testdata_file("693_UNCR.dcm"))
    x, y, _ = (float(v) for v in ds.ImagePositionPatient)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    for i in range(n):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [x, y, -100.0 + 1.25 * i]
        ds.save_as(out / f"{i:04d}.dcm", enforce_file_format=True)
    return study


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "nightingale"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slices", type=int, default=100)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nightingale-volume-latency-"))
    procs = []
    try:
        repo = work / "models"
        subprocess.run([sys.executable, str(REPO / "models/train/lesion_detection_mip.py"), "--out", str(repo),
                        "--no-sign"], check=True, cwd=REPO, capture_output=True, timeout=600)
        pacs, dicom_port, http = start_pipeline(args.bin, work, repo, procs, 120)
        runs = []
        for r in range(args.rounds):
            tag = f"ct{r}"
            study = make_volume(work / tag, args.slices)
            before = set(pacs.iterdir())
            subprocess.run(["storescu", "-aec", "NIGHTINGALE", "127.0.0.1", str(dicom_port), "+sd",
                            str(work / tag)], check=True, env=ENV, capture_output=True, timeout=600)
            wait(lambda: len(set(pacs.iterdir()) - before) >= 2, 600, f"{tag} results")
            report = wait(lambda: (x := results(http, study)) and x["series"][0]["jobs"]
                          and x["series"][0]["jobs"][-1]["state"] in ("done", "failed") and x, 60, "the job")
            job = report["series"][0]["jobs"][-1]
            assert job["state"] == "done", job
            sr_uid = next(o["sop_instance_uid"] for o in job["objects"] if o["kind"] == "SR")
            sr_file = next(p for p in set(pacs.iterdir()) - before
                           if str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) == sr_uid)
            shutil.rmtree(work / tag)
            db = sqlite3.connect(f"file:{work / 'data' / 'spool' / 'index.sqlite3'}?mode=ro", uri=True)
            last = db.execute("SELECT max(received_at_ms) FROM instances WHERE study_uid = ?", (study,)).fetchone()[0]
            db.close()
            done = sr_file.stat().st_mtime * 1000.0
            runs.append((done - (last + QUIET_MS), done - job["created_ms"], job["findings"][0]["volume"]))
        per_stage = stages(http)
        # pydicom + numpy building the same volume (read every slice, sort, one window,
        # preprocess each slice): imaging.preprocess_volume, same machine, same run.
        sys.path.insert(0, str(REPO / "models" / "train"))
        import imaging

        spec = imaging.Preprocessing(height=128, width=128, window="percentile", low=0.5, high=99.5,
                                     aspect="pad", pad_value=0.0, mean=0.5, std=0.25)
        make_volume(work / "reference", args.slices)
        t0 = time.perf_counter()
        datasets = sorted((pydicom.dcmread(p) for p in (work / "reference").iterdir()),
                          key=lambda d: float(d.ImagePositionPatient[2]))
        imaging.preprocess_volume([d.pixel_array for d in datasets], spec, None,
                                  [float(d.RescaleSlope) for d in datasets],
                                  [float(d.RescaleIntercept) for d in datasets])
        reference_ms = (time.perf_counter() - t0) * 1000
        print("| round | end to end ms (quiet time excluded) | after the job was made ms | volume |")
        print("|---|---|---|---|")
        for i, (total, after, volume) in enumerate(runs):
            print(f"| {i + 1} | {total:.0f} | {after:.0f} | {volume} |")
        print()
        for stage in ("decode_preprocess", "inference", "results"):
            s, c = per_stage.get(stage, (0.0, 0.0))
            if c:
                print(f"stage {stage}: {s / c * 1000:.0f} ms per job (mean of {c:.0f})")
        print(f"pydicom + numpy, the same volume (read, sort, window, preprocess): {reference_ms:.0f} ms (one run)")
        return 0
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    sys.exit(main())
