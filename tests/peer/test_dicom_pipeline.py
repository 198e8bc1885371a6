"""The DICOM pipeline end to end with real peers: dcmtk's `storescu` sends real images to
`nightingale serve --dicom-port P --results-destination STORESCP@127.0.0.1:Q` (the shipped
image-orientation bundle declares the series it accepts, no other configuration), and dcmtk's
`storescp` is the PACS that receives the results.

What is checked, and against what:
- each series (a CR radiograph from pydicom-data, MONOCHROME1; a CT slice from pydicom) gets
  one Comprehensive SR and one Secondary Capture at the destination (storescp's files);
- `dciodvfy` (Debian dicom3tools) finds no error in either beyond those it finds in the source
  (the result copies the source's patient/study attributes as they are);
- pydicom reads the SR: VerificationFlag UNVERIFIED, the TID 1500 title, every source instance
  referenced, the IHE AIR equipment (Nightingale, the bundle's name and version), and the
  probability it reports equals onnxruntime's on the same image preprocessed by the numpy
  reference (`models/train/imaging.py`), within 1e-4;
- the SC says BurnedInAnnotation YES and references the source image;
- `GET /results/studies/{study}` says done, with both objects sent;
- a destination that is down: the job is done, the objects are retried and then given up
  (dead letter) with the reason, and the server keeps serving.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_support import binary, free_port, stop, tool

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "models" / "train"))
import imaging  # noqa: E402  (the numpy reference of the bundle's preprocessing)

START_TIMEOUT_S = 60.0
RESULT_TIMEOUT_S = 120.0
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}
BUNDLE = REPO / "models" / "bundles" / "image-orientation"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


class StoreScp:
    """dcmtk's storescp on a free port: the PACS the results go to."""

    def __init__(self, work: Path):
        self.port = free_port()
        self.out = work / "pacs"
        self.out.mkdir()
        self.log_path = work / "storescp.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [tool("storescp"), "-aet", "STORESCP", "-od", str(self.out), str(self.port)],
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
    def __init__(self, work: Path, destination: str):
        self.port = free_port()
        self.http = free_port()
        self.data = work / "data"
        repo = work / "models"
        repo.mkdir()
        shutil.copytree(BUNDLE, repo / BUNDLE.name)
        self.stderr = work / "server.log"
        cmd = [str(binary()), "serve", "--repository", str(repo),
               "--http-addr", f"127.0.0.1:{self.http}", "--data-dir", str(self.data),
               "--dicom-port", str(self.port), "--results-destination", destination,
               "--series-quiet-secs", "1"]
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


def store(port: int, files: list[Path]) -> None:
    subprocess.run([tool("storescu"), "-aec", "NIGHTINGALE", "127.0.0.1", str(port),
                    *map(str, files)], check=True, timeout=120, env=PEER_ENV,
                   capture_output=True)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout} s waiting for {what}", pytrace=False)


def dciodvfy_errors(path: Path) -> set[str]:
    """dciodvfy's error lines, with the element path only (values differ between objects)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy not found: install Debian's dicom3tools (scripts/test.sh does)",
                    pytrace=False)
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return {line.strip() for line in (out.stdout + out.stderr).splitlines()
            if line.startswith("Error")}


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


@pytest.fixture
def work():
    d = Path(tempfile.mkdtemp(prefix="nightingale-pipeline-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "CT_small.dcm"])
def test_a_stored_image_comes_back_as_sr_and_sc(work, name):
    pacs = StoreScp(work)
    server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}")
    try:
        source = work / "source.dcm"
        ds = with_new_uids(get_testdata_file(name), source)
        store(server.port, [source])
        files = wait_for(lambda: len(pacs.files()) >= 2 and pacs.files(), RESULT_TIMEOUT_S,
                         "the SR and the SC at storescp")
        objects = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID): f for f in files}
        assert set(objects) == {SR_CLASS, SC_CLASS}, objects

        source_errors = dciodvfy_errors(source)
        for path in objects.values():
            new = dciodvfy_errors(path) - source_errors
            assert not new, f"dciodvfy errors in {path.name}: {sorted(new)}"

        sr = pydicom.dcmread(objects[SR_CLASS])
        assert sr.StudyInstanceUID == ds.StudyInstanceUID
        assert sr.SeriesInstanceUID != ds.SeriesInstanceUID
        assert sr.PatientID == ds.PatientID
        assert sr.VerificationFlag == "UNVERIFIED"
        assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
        assert referenced_uids(sr) == {str(ds.SOPInstanceUID)}
        equipment = sr.ContributingEquipmentSequence[0]
        assert equipment.Manufacturer == "Nightingale"
        assert equipment.ManufacturerModelName == "image-orientation"
        numbers = sr_numbers(sr)
        expected = expected_probability(source)
        print(f"{name}: SR probability {numbers} onnxruntime {expected}")
        assert abs(numbers["Probability"] - expected) < 1e-4, numbers

        sc = pydicom.dcmread(objects[SC_CLASS])
        assert sc.BurnedInAnnotation == "YES"
        assert sc.StudyInstanceUID == ds.StudyInstanceUID
        assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) == str(ds.SOPInstanceUID)

        report = wait_for(
            lambda: (r := server.results(str(ds.StudyInstanceUID))) and all(
                o["delivery"] == "sent"
                for s in r["series"] for j in s["jobs"] for o in j["objects"]) and r,
            RESULT_TIMEOUT_S, "the results API to say sent")
        [series] = report["series"]
        [job] = series["jobs"]
        assert job["state"] == "done" and job["bundle"] == "image-orientation"
        assert {o["kind"] for o in job["objects"]} == {"SR", "SC"}
        assert abs(job["findings"][0]["probability"] - numbers["Probability"]) < 1e-6
        assert str(ds.PatientID) not in server.log()
    finally:
        stop(server.proc)
        stop(pacs.proc)


def test_a_destination_that_is_down_ends_in_the_dead_letter_folder(work):
    down = free_port()  # nothing listens there
    server = Server(work, f"DOWN@127.0.0.1:{down}")
    try:
        source = work / "source.dcm"
        ds = with_new_uids(get_testdata_file("CT_small.dcm"), source)
        store(server.port, [source])
        # Six attempts with 2, 4, 8, 16, 32 s between them would take a minute: the test only
        # waits for the first failed attempt to be on record, then checks the server serves.
        report = wait_for(
            lambda: (r := server.results(str(ds.StudyInstanceUID))) and any(
                o["attempts"] >= 1 and o["last_error"]
                for s in r["series"] for j in s["jobs"] for o in j["objects"]) and r,
            RESULT_TIMEOUT_S, "a failed delivery attempt on record")
        [series] = report["series"]
        [job] = series["jobs"]
        assert job["state"] == "done"
        for o in job["objects"]:
            assert o["delivery"] in ("pending", "dead")
        assert "association" in " ".join(o["last_error"] or "" for o in job["objects"])
        # Still serving: a C-ECHO gets through.
        subprocess.run([tool("echoscu"), "-aec", "NIGHTINGALE", "127.0.0.1", str(server.port)],
                       check=True, timeout=30, capture_output=True)
    finally:
        stop(server.proc)


def test_reprocess_makes_a_new_result_series_and_keeps_the_old(work):
    pacs = StoreScp(work)
    server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}")
    try:
        source = work / "source.dcm"
        ds = with_new_uids(get_testdata_file("CT_small.dcm"), source)
        study = str(ds.StudyInstanceUID)
        store(server.port, [source])
        wait_for(lambda: len(pacs.files()) >= 2, RESULT_TIMEOUT_S, "the first SR and SC")
        out = subprocess.run([str(binary()), "results", "reprocess", "--study", study,
                              "--data-dir", str(server.data)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "queued 1 job" in out.stdout
        files = wait_for(lambda: len(pacs.files()) >= 4 and pacs.files(), RESULT_TIMEOUT_S,
                         "the second SR and SC")
        series = {str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in files}
        assert len(series) == 4  # SR and SC series of each run: new series every time
        report = wait_for(
            lambda: (r := server.results(study)) and len(r["series"][0]["jobs"]) == 2
            and r["series"][0]["jobs"][1]["state"] == "done" and r,
            RESULT_TIMEOUT_S, "the reprocessed job done")
        states = [j["state"] for j in report["series"][0]["jobs"]]
        assert states == ["superseded", "done"]
        # An unknown study is a clear error, exit code 1.
        out = subprocess.run([str(binary()), "results", "reprocess", "--study", "1.2.3.4",
                              "--data-dir", str(server.data)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "nothing to reprocess" in out.stderr
    finally:
        stop(server.proc)
        stop(pacs.proc)
