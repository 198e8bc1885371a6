"""Helpers shared by the DICOM peer tests (test_dicom_*.py): a free loopback port, the
server binary under test, and a dcmtk tool by name; for the pipeline tests
(test_dicom_pipeline*.py, test_dicom_orthanc.py) `Server` (serve with the DICOM port and the
pipeline on), `StoreScp` (dcmtk's storescp as the results' PACS), `store` (storescu),
`with_new_uids`, the bounded `wait_for`, and the result checks (`dciodvfy_errors`, `expected_probability` from
onnxruntime on the numpy reference's tensor, `sr_numbers`, `referenced_uids`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "models" / "train"))
import imaging  # noqa: E402  (the numpy reference of the image bundles' preprocessing)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary() -> Path:
    """The Nightingale binary (NIGHTINGALE_BIN, default target/debug/nightingale)."""
    path = Path(os.environ.get("NIGHTINGALE_BIN", "target/debug/nightingale"))
    if not path.is_absolute():
        path = REPO / path
    if not path.exists():
        pytest.fail(f"Nightingale binary not found at {path} (cargo build)", pytrace=False)
    return path


def tool(name: str) -> str:
    """A dcmtk command-line tool."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's dcmtk (scripts/test.sh does)", pytrace=False)
    return path


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s (each wait bounded)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def spool_index(spool: Path) -> dict[str, dict]:
    """The spool's SQLite index, read-only, by SOP Instance UID."""
    db = sqlite3.connect(f"file:{spool / 'index.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM instances").fetchall()
    finally:
        db.close()
    return {r["sop_instance_uid"]: dict(r) for r in rows}


# --- the pipeline's peers (test_dicom_pipeline*.py, test_dicom_orthanc.py) ---

START_TIMEOUT_S = 60.0
RESULT_TIMEOUT_S = 120.0
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}
BUNDLE = REPO / "models" / "bundles" / "image-orientation"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


class StoreScp:
    """dcmtk's storescp on a free port: the PACS the results go to."""

    def __init__(self, work: Path, name: str = "pacs", extra: tuple[str, ...] = (),
                 port: int | None = None):
        self.port = port or free_port()
        self.out = work / name
        self.out.mkdir()
        self.log_path = work / f"storescp-{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [tool("storescp"), "-aet", "STORESCP", "-od", str(self.out), *extra,
                 str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=PEER_ENV)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        stop(self.proc)
        pytest.fail("storescp did not listen", pytrace=False)

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())


class Server:
    def __init__(self, work: Path, destination: str, extra: tuple[str, ...] = (),
                 port: int | None = None, bundles: tuple[Path, ...] = (BUNDLE,)):
        self.port = port or free_port()
        self.http = free_port()
        self.data = work / "data"
        repo = work / "models"
        if not repo.exists():  # a restart in the same folder keeps the first copy
            repo.mkdir()
            for bundle in bundles:
                shutil.copytree(bundle, repo / bundle.name, ignore=shutil.ignore_patterns("testdata"))
        self.stderr = work / "server.log"
        cmd = [str(binary()), "serve", "--repository", str(repo),
               "--http-addr", f"127.0.0.1:{self.http}", "--data-dir", str(self.data),
               "--dicom-port", str(self.port), "--results-destination", destination,
               "--series-quiet-secs", "1", *extra]
        env = {**os.environ, "NIGHTINGALE_LOG": "info"}
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=err, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited:\n{self.log()}", pytrace=False)
            if "listening (DICOM)" in self.log() and self.ready():
                return
            time.sleep(0.2)
        stop(self.proc)
        pytest.fail(f"server not ready:\n{self.log()}", pytrace=False)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus counter's samples with these labels (0 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics", timeout=10) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def results(self, study: str) -> dict | None:
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.http}/results/studies/{study}", timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise


def with_new_uids(src: str, dst: Path) -> pydicom.Dataset:
    """A copy of a test file with fresh Study/Series/SOP Instance UIDs (tests do not collide)."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dst, enforce_file_format=True)
    return ds


def long_series(work: Path, slices: int) -> tuple[str, list[Path]]:
    """A series of `slices` instances (CT_small, each its own instance, one job): its Study
    Instance UID and its files."""
    study, series = generate_uid(), generate_uid()
    files = []
    for k in range(slices):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        path = work / f"slice{k:03}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study, files


def store(port: int, files: list[Path], extra: tuple[str, ...] = ()) -> None:
    """storescu to Nightingale (`extra`: e.g. "-R", to propose the files' own compressed
    transfer syntaxes); fails with storescu's output."""
    done = subprocess.run([tool("storescu"), "-aec", "NIGHTINGALE", *extra, "127.0.0.1",
                           str(port), *map(str, files)], timeout=120, env=PEER_ENV,
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"storescu failed ({done.returncode}):\n{done.stdout}{done.stderr}",
                    pytrace=False)


def identifiers_in(log: str, *identifiers: str) -> list[str]:
    """The patient identifiers that occur in `log` as whole tokens (not inside a longer run of
    letters and digits: PatientID "0010" is no leak in a timestamp's "...720010Z"). Empty
    identifiers are ignored; a person name is also looked for with its carets as spaces."""
    found = []
    for identifier in identifiers:
        identifier = str(identifier)
        if not identifier:
            continue
        for form in {identifier, identifier.replace("^", " ")}:
            if re.search(rf"(?<![0-9A-Za-z]){re.escape(form)}(?![0-9A-Za-z])", log):
                found.append(form)
    return found


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout} s waiting for {what}", pytrace=False)


def expected_probability(source: Path) -> float:
    """P(misoriented) from onnxruntime on the image preprocessed by the numpy reference."""
    ds = pydicom.dcmread(source)
    spec = imaging.Preprocessing(height=224, width=224, window="percentile", low=0.5,
                                 high=99.5, aspect="pad", pad_value=0.0, mean=0.5, std=0.25)
    x = imaging.preprocess(ds.pixel_array, spec,
                           slope=float(getattr(ds, "RescaleSlope", 1.0)),
                           intercept=float(getattr(ds, "RescaleIntercept", 0.0)),
                           monochrome1=ds.PhotometricInterpretation == "MONOCHROME1")
    session = ort.InferenceSession(str(BUNDLE / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    out = session.run(None, {"image": x[None, :, :, :].astype(np.float32)})
    return float(out[names.index("misoriented")][0][1])


def sr_numbers(ds: pydicom.Dataset) -> dict[str, float]:
    """Every NUM content item of the SR tree: concept meaning → value."""
    found: dict[str, float] = {}

    def walk(items):
        for item in items:
            if item.get("ValueType") == "NUM":
                name = item.ConceptNameCodeSequence[0].CodeMeaning
                found[name] = float(item.MeasuredValueSequence[0].NumericValue)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return found


def referenced_uids(ds: pydicom.Dataset) -> set[str]:
    out = set()
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.ReferencedSeriesSequence:
            for sop in series.ReferencedSOPSequence:
                out.add(str(sop.ReferencedSOPInstanceUID))
    return out


def dciodvfy_errors(path: Path) -> set[str]:
    """dciodvfy's error lines, with the element path only (values differ between objects)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy not found: install Debian's dicom3tools (scripts/test.sh does)",
                    pytrace=False)
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return {line.strip() for line in (out.stdout + out.stderr).splitlines()
            if line.startswith("Error")}
