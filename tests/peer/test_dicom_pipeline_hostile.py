"""Bad input through the DICOM pipeline, with real peers: dcmtk's `storescu` sends each bad
series to `nightingale serve --dicom-port P --results-destination ...` (the shipped
image-orientation bundle routes CR/DX/CT/MR, MONOCHROME1/2, one frame), and each must end
as a clear failed (or unmatched) state with its reason in `GET /results/studies/{study}`,
counted once in the metrics (`nightingale_pipeline_jobs_total{outcome="failed",reason=...}`,
or `nightingale_pipeline_series_total{outcome="unmatched"}`) and logged, while the pipeline
goes on: a good series (pydicom's CT_small) sent after each bad one is
processed and its SR and SC reach dcmtk's `storescp`.

The bad inputs are built here with pydicom from pydicom's own test files (dcmtk's
`dcmcjpeg` makes the JPEG that is then corrupted):
- a series whose two instances differ in Rows/Columns, and one whose two instances differ in
  photometric interpretation → failed, `mixed_series`;
- a series whose two instances share the Study/Series UIDs but differ in PatientID,
  IssuerOfPatientID, PatientName, Modality or SOP Class UID → failed, `mixed_series` naming
  the attribute and no value (it used to be done: the results filed under the first
  patient showed the second's image and score);
- a JPEG-LS image (pydicom's MR_small_jpeg_ls_lossless.dcm; this build has no JPEG-LS codec,
  see dicom/src/pixels.rs) → failed, `unsupported_transfer_syntax`;
- a JPEG baseline image whose compressed scan is cut off and overwritten → failed,
  `decode_failed`;
- a 60000 x 8 image is NOT refused (under 8 pixels on a side holds no picture: `blank_image`): the bundle pads it square and scales it to 224 x 224,
  which is well defined; the probability in the results API equals onnxruntime's on the
  numpy reference's tensor (computed without the 60000 x 60000 padded array), and its SC is
  widened so that the burned-in warning fits (Columns at least the label's width in the
  8-pixel font);
- an 8200 x 8200 image (67,240,000 pixels, over the 64 Mi-pixel limit) → failed,
  `too_many_pixels`; an 8192 x 8192 one (exactly 64 Mi pixels) is processed, and its
  probability equals onnxruntime's on the numpy reference's tensor (the server's peak RSS
  is printed, not asserted);
- a 1,000-frame enhanced MR object (the bundle takes one frame) → unmatched, the bundle
  refuses it for its frame count;
- a destination that refuses every association (`storescp --refuse`) and one that is down
  (nothing listens): the job is done, each result object ends `dead` after the configured
  attempts, with the reason, and a copy sits in the dead-letter folder;
- a destination that is down while the results are made and comes back (a dcmtk storescp
  on its port) after Nightingale was restarted: the pending objects are sent, none lost.
Every source carries a distinctive PatientName/PatientID, and neither is in the server's
log at the end.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_support import (BUNDLE, RESULT_TIMEOUT_S, SC_CLASS, Server, StoreScp,
                           dciodvfy_errors, expected_probability, free_port, imaging, stop,
                           store, tool, wait_for)

# Short waits: the failures come from the first look at the series.
CASE_TIMEOUT_S = 60.0
# A result object not delivered: retried after 0.2 s, 0.4 s, given up after 3 attempts.
RETRY_FLAGS = ("--results-retry-secs", "0.2", "--results-max-attempts", "3")
PATIENT_NAME = "Hostile^Pipeline^Peer"
PATIENT_ID = "HOSTILE-PID-73519"


def _fresh(ds: pydicom.Dataset, study: str, series: str) -> pydicom.Dataset:
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    return ds


def _ct(study: str, series: str) -> pydicom.Dataset:
    return _fresh(pydicom.dcmread(get_testdata_file("CT_small.dcm")), study, series)


def _uncompressed(ds: pydicom.Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _set_pixels(ds: pydicom.Dataset, pixels: np.ndarray, photometric: str = "MONOCHROME2",
                frames: int | None = None) -> None:
    """Uncompressed pixels (8 or 16 bit unsigned), with the header that says so."""
    _uncompressed(ds)
    bits = pixels.dtype.itemsize * 8
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "WindowCenter",
                    "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.astype(f"<u{pixels.dtype.itemsize}").tobytes()


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def mixed_sizes(d: Path, study: str, series: str) -> list[Path]:
    a = _ct(study, series)
    b = _ct(study, series)
    b.InstanceNumber = 2
    _set_pixels(b, b.pixel_array[:64, :96].astype(np.uint16))
    return [_save(a, d / "a.dcm"), _save(b, d / "b.dcm")]


def mixed_photometric(d: Path, study: str, series: str) -> list[Path]:
    a = _ct(study, series)
    b = _ct(study, series)
    b.InstanceNumber = 2
    _set_pixels(b, b.pixel_array.astype(np.uint16), photometric="MONOCHROME1")
    return [_save(a, d / "a.dcm"), _save(b, d / "b.dcm")]


# The other patient of a mixed series (red-team finding: one series UID, two patients).
OTHER_NAME = "Bravo^Other^Peer"
OTHER_ID = "OTHER-PID-26481"


def mixed_identity(attribute: str, value: str):
    """Two CT_small instances of one series; the second differs in `attribute` only."""
    def build(d: Path, study: str, series: str) -> list[Path]:
        a = _ct(study, series)
        a.IssuerOfPatientID = "HOSPITAL-A"
        b = _ct(study, series)
        b.InstanceNumber = 2
        b.IssuerOfPatientID = "HOSPITAL-A"
        setattr(b, attribute, value)
        if attribute == "SOPClassUID":
            b.file_meta.MediaStorageSOPClassUID = value
        return [_save(a, d / "a.dcm"), _save(b, d / "b.dcm")]
    return build


def jpeg_ls(d: Path, study: str, series: str) -> list[Path]:
    ds = _fresh(pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm")), study,
                series)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    return [_save(ds, d / "jls.dcm")]


def corrupt_jpeg(d: Path, study: str, series: str) -> list[Path]:
    """CT_small as 8-bit, JPEG baseline by dcmtk's dcmcjpeg, then the scan data after the
    start-of-scan header overwritten: the frame keeps its length and markers up to SOS."""
    ds = _ct(study, series)
    x = ds.pixel_array.astype(np.float64)
    _set_pixels(ds, np.round(255 * (x - x.min()) / (x.max() - x.min())).astype(np.uint8))
    plain = _save(ds, d / "plain.dcm")
    jpeg = d / "jpeg.dcm"
    subprocess.run([tool("dcmcjpeg"), "+eb", str(plain), str(jpeg)], check=True, timeout=60,
                   capture_output=True)
    plain.unlink()
    out = pydicom.dcmread(jpeg)
    assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    [frame] = list(pydicom.encaps.generate_frames(out.PixelData, number_of_frames=1))
    sos = frame.index(b"\xff\xda")
    header_end = sos + 2 + int.from_bytes(frame[sos + 2:sos + 4], "big")
    # A few scan bytes, then bytes that are no Huffman code and no marker, up to the end.
    broken = frame[:header_end + 4] + b"\xff\x01" * ((len(frame) - header_end - 4) // 2)
    broken = broken.ljust(len(frame), b"\x00")
    out.PixelData = pydicom.encaps.encapsulate([broken])
    jpeg.unlink()
    return [_save(out, d / "corrupt-jpeg.dcm")]


def sliver(d: Path, study: str, series: str) -> list[Path]:
    ds = _ct(study, series)
    # 8 columns: the fewest a frame may have to be read (fewer hold no picture, blank_image).
    _set_pixels(ds, (np.arange(480_000, dtype=np.uint32) % 251).astype(np.uint8).reshape(8, 60_000)
                .T.copy())
    return [_save(ds, d / "sliver.dcm")]


def huge(d: Path, study: str, series: str) -> list[Path]:
    ds = _ct(study, series)
    _set_pixels(ds, np.zeros((8200, 8200), dtype=np.uint8))
    return [_save(ds, d / "huge.dcm")]


def at_the_limit(d: Path, study: str, series: str) -> list[Path]:
    """8192 x 8192 = 64 Mi pixels, the most one frame may have: CT_small as 8-bit, each
    pixel a 64 x 64 block."""
    ds = _ct(study, series)
    x = ds.pixel_array.astype(np.float64)
    small = np.round(255 * (x - x.min()) / (x.max() - x.min())).astype(np.uint8)
    _set_pixels(ds, np.kron(small, np.ones((64, 64), dtype=np.uint8)))
    assert ds.Rows * ds.Columns == 64 << 20
    return [_save(ds, d / "limit.dcm")]


def blank(rows: int, cols: int):
    """A slice of one value (`rows` x `cols`): nothing to read (a model stretched over a
    constant or a 1 x 1 image made a confident finding of it: a review's finding)."""
    def build(d: Path, study: str, series: str) -> list[Path]:
        ds = _ct(study, series)
        _set_pixels(ds, np.full((rows, cols), 1024, dtype=np.uint16))
        return [_save(ds, d / "blank.dcm")]
    return build


def near_blank(d: Path, study: str, series: str) -> list[Path]:
    """A constant slice with a noise floor of one level and a 3 x 3 label burned in: a
    percentile window stretched it into a picture, and the model made a finding of it (a
    review's finding)."""
    ds = _ct(study, series)
    noise = np.random.default_rng(7).integers(-1, 2, size=(64, 64))
    x = (1024 + noise).astype(np.uint16)
    x[:3, :3] = 4095
    _set_pixels(ds, x)
    return [_save(ds, d / "near-blank.dcm")]


def noise(d: Path, study: str, series: str) -> list[Path]:
    """A slice of white noise: no picture (a model made a confident finding of it)."""
    ds = _ct(study, series)
    _set_pixels(ds, np.random.default_rng(3).integers(0, 4096, size=(128, 128)).astype(np.uint16))
    return [_save(ds, d / "noise.dcm")]


def two_pixels(d: Path, study: str, series: str) -> list[Path]:
    """A 1 x 2 slice of two values: under 8 pixels on a side, no picture."""
    ds = _ct(study, series)
    _set_pixels(ds, np.array([[0, 4095]], dtype=np.uint16))
    return [_save(ds, d / "two-pixels.dcm")]


def thousand_frames(d: Path, study: str, series: str) -> list[Path]:
    ds = _ct(study, series)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = "MR"
    frames = (np.arange(1000 * 16 * 16, dtype=np.uint32) % 4096).astype(np.uint16)
    _set_pixels(ds, frames.reshape(1000, 16, 16), frames=1000)
    return [_save(ds, d / "frames.dcm")]


# case → (builder, storescu's transfer syntax flags, series state, code that starts the
# reason, text also in the reason)
CASES = {
    "mixed-sizes": (mixed_sizes, (), "failed", "mixed_series", "Rows"),
    "mixed-photometric": (mixed_photometric, (), "failed", "mixed_series",
                          "PhotometricInterpretation"),
    "mixed-patient-id": (mixed_identity("PatientID", OTHER_ID), (), "failed", "mixed_series",
                         "PatientID"),
    "mixed-issuer": (mixed_identity("IssuerOfPatientID", "HOSPITAL-B"), (), "failed",
                     "mixed_series", "IssuerOfPatientID"),
    "mixed-patient-name": (mixed_identity("PatientName", OTHER_NAME), (), "failed",
                           "mixed_series", "PatientName"),
    # US of the same size in a CT series: the router looked at the first (CT) instance only.
    "mixed-modality": (mixed_identity("Modality", "US"), (), "failed", "mixed_series",
                       "Modality"),
    "mixed-sop-class": (mixed_identity("SOPClassUID", "1.2.840.10008.5.1.4.1.1.6.1"), (),
                        "failed", "mixed_series", "SOPClassUID"),
    "jpeg-ls": (jpeg_ls, ("-xt",), "failed", "unsupported_transfer_syntax",
                "1.2.840.10008.1.2.4.80"),
    "corrupt-jpeg": (corrupt_jpeg, ("-xy",), "failed", "decode_failed", "frame 0"),
    "8200x8200": (huge, (), "failed", "too_many_pixels", "8200 x 8200"),
    "1000-frames": (thousand_frames, (), "unmatched", "", "1000 frames"),
    "blank": (blank(64, 64), (), "failed", "blank_image", "one pixel value only"),
    "one-pixel": (blank(1, 1), (), "failed", "blank_image", "one pixel value only"),
    "two-pixels": (two_pixels, (), "failed", "blank_image", "under 8 pixels on a side"),
    "noise": (noise, (), "failed", "noise_image", "read as noise"),
    "near-blank": (near_blank, (), "failed", "blank_image", "one pixel value only, or nearly"),
}


def job_state(report: dict) -> tuple[str, str]:
    """(state, reason) of the study's one series: the job's when it has one, else the
    series' own (unmatched, or failed before routing)."""
    [series] = report["series"]
    if series["jobs"]:
        [job] = series["jobs"]
        return job["state"], job["reason"] or ""
    return series["state"], series["reason"] or ""


def settled(server: Server, study: str) -> dict | None:
    report = server.results(study)
    if not report or not report["series"]:
        return None
    state, _ = job_state(report)
    return report if state in ("done", "failed", "unmatched") else None


@pytest.fixture(scope="module")
def work():
    d = Path(tempfile.mkdtemp(prefix="nightingale-hostile-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def pipeline(work):
    """One server for every bad series (each followed by a good one), results to storescp."""
    pacs = StoreScp(work)
    server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}", RETRY_FLAGS)
    yield server, pacs
    stop(server.proc)
    stop(pacs.proc)
    log = server.log()
    assert PATIENT_NAME not in log and PATIENT_NAME.replace("^", " ") not in log
    assert PATIENT_ID not in log
    assert OTHER_ID not in log and "Bravo" not in log and "HOSPITAL-" not in log


def send_good_series(server: Server, pacs: StoreScp, d: Path) -> None:
    """CT_small in a new study: done, and its SR and SC acknowledged by storescp."""
    before = len(pacs.files())
    study = generate_uid()
    store(server.port, [_save(_ct(study, generate_uid()), d / "good.dcm")])
    report = wait_for(lambda: settled(server, study), RESULT_TIMEOUT_S,
                      "the good series to be processed")
    assert job_state(report) == ("done", ""), report
    wait_for(lambda: (r := server.results(study)) and all(
        o["delivery"] == "sent" for o in r["series"][0]["jobs"][0]["objects"]),
        RESULT_TIMEOUT_S, "the good series' results to be sent")
    assert len(pacs.files()) == before + 2


@pytest.mark.parametrize("case", list(CASES))
def test_bad_series_fails_with_a_reason_and_the_next_one_is_done(pipeline, work, case):
    server, pacs = pipeline
    build, flags, want_state, code, detail = CASES[case]
    d = work / case
    d.mkdir()
    study = generate_uid()
    counter = (("nightingale_pipeline_jobs_total", {"outcome": "failed", "reason": code})
               if want_state == "failed" else
               ("nightingale_pipeline_series_total", {"outcome": "unmatched"}))
    before = server.metric(counter[0], **counter[1])
    store(server.port, build(d, study, generate_uid()), flags)
    report = wait_for(lambda: settled(server, study), CASE_TIMEOUT_S,
                      f"{case}: a settled state in the results API")
    state, reason = job_state(report)
    print(f"{case}: {state}: {reason}")
    assert state == want_state, report
    assert reason, report
    assert reason.startswith(code), reason
    assert detail in reason, reason
    assert PATIENT_ID not in reason and "Hostile" not in reason
    assert OTHER_ID not in reason and "Bravo" not in reason and "HOSPITAL-" not in reason
    if state == "failed":
        assert not report["series"][0]["jobs"][0]["objects"]
        assert f'reason="{code}"' in server.log()
    else:
        assert "series not routed" in server.log()
    assert server.metric(counter[0], **counter[1]) == before + 1
    send_good_series(server, pacs, d)


def sliver_reference(path: Path) -> float:
    """P(misoriented) from onnxruntime on the numpy reference's tensor of a rows x 8 image.

    `imaging.preprocess` pads to rows x rows (60000^2 float64: 29 GB), then area-resizes the
    rows, then the columns. Resizing rows works column by column and the padding columns stay
    0, so the same tensor is: window, resize the 2 columns' rows to 224, place them at the
    padded image's columns, resize the columns to 224."""
    ds = pydicom.dcmread(path)
    spec = imaging.Preprocessing(height=224, width=224, window="percentile", low=0.5,
                                 high=99.5, aspect="pad", pad_value=0.0, mean=0.5, std=0.25)
    v = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1.0)) \
        + float(getattr(ds, "RescaleIntercept", 0.0))
    rows, cols = v.shape
    assert cols < spec.width
    x = imaging.area_resize_axis(imaging.window01(v, spec), spec.height, 0)
    padded = np.full((spec.height, rows), spec.pad_value)
    left = (rows - cols) // 2
    padded[:, left:left + cols] = x
    x = imaging.area_resize_axis(padded, spec.width, 1)
    y = ((x - spec.mean) / spec.std).astype(np.float32)[None, None, :, :]
    session = ort.InferenceSession(str(BUNDLE / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return float(session.run(None, {"image": y})[names.index("misoriented")][0][1])


def test_a_60000_by_8_image_is_processed_as_the_reference_and_its_sc_is_legible(pipeline, work):
    server, pacs = pipeline
    d = work / "sliver"
    d.mkdir()
    study = generate_uid()
    [source] = sliver(d, study, generate_uid())
    before = set(pacs.files())
    store(server.port, [source])
    report = wait_for(lambda: (r := settled(server, study)) and all(
        o["delivery"] == "sent" for j in r["series"][0]["jobs"] for o in j["objects"]) and r,
        RESULT_TIMEOUT_S, "the sliver's results to be sent")
    [job] = report["series"][0]["jobs"]
    assert job["state"] == "done", report
    expected = sliver_reference(source)
    print(f"60000x8: served {job['findings'][0]['probability']} onnxruntime {expected}")
    assert abs(job["findings"][0]["probability"] - expected) < 1e-4
    [sc_path] = [f for f in set(pacs.files()) - before
                 if pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID == SC_CLASS]
    new_errors = dciodvfy_errors(sc_path) - dciodvfy_errors(source)
    assert not new_errors, sorted(new_errors)
    sc = pydicom.dcmread(sc_path, stop_before_pixels=True)
    assert sc.BurnedInAnnotation == "YES"
    label = "AI RESULT - NOT FOR DIAGNOSIS WITHOUT REVIEW"
    assert sc.Columns >= 8 * (len(label) + 2), sc.Columns
    assert sc.Rows > 60_000
    send_good_series(server, pacs, d)


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM), for the log (not asserted)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_an_image_at_the_64_mi_pixel_limit_is_processed_as_the_reference(pipeline, work):
    server, pacs = pipeline
    d = work / "limit"
    d.mkdir()
    study = generate_uid()
    [source] = at_the_limit(d, study, generate_uid())
    store(server.port, [source])
    # A debug build takes tens of seconds on 64 Mi pixels: a longer (still bounded) wait.
    report = wait_for(lambda: (r := settled(server, study)) and all(
        o["delivery"] == "sent" for j in r["series"][0]["jobs"] for o in j["objects"]) and r,
        3 * RESULT_TIMEOUT_S, "the 64 Mi-pixel image's results to be sent")
    [job] = report["series"][0]["jobs"]
    assert job["state"] == "done", report
    expected = expected_probability(source)
    print(f"8192x8192: served {job['findings'][0]['probability']} onnxruntime {expected}; "
          f"server peak RSS {peak_rss_mib(server.proc.pid):.0f} MiB")
    assert abs(job["findings"][0]["probability"] - expected) < 1e-4
    send_good_series(server, pacs, d)


def refusing(work: Path):
    """storescp that refuses every association (A-ASSOCIATE-RJ)."""
    pacs = StoreScp(work, name="refusing", extra=("--refuse",))
    return f"STORESCP@127.0.0.1:{pacs.port}", pacs


def down(work: Path):
    """Nothing listens on the port."""
    return f"DOWN@127.0.0.1:{free_port()}", None


@pytest.mark.parametrize("destination,why", [(refusing, "association rejected"),
                                             (down, "cannot connect")],
                         ids=["refusing", "down"])
def test_an_unreachable_destination_ends_in_the_dead_letter_folder(destination, why):
    work = Path(tempfile.mkdtemp(prefix="nightingale-hostile-destination-"))
    address, pacs = destination(work)
    server = Server(work, address, RETRY_FLAGS)
    try:
        for n in range(2):  # the second series: the pipeline goes on after the first
            study = generate_uid()
            store(server.port, [_save(_ct(study, generate_uid()), work / f"ct{n}.dcm")])
            report = wait_for(
                lambda: (r := settled(server, study)) and all(
                    o["delivery"] == "dead" for o in r["series"][0]["jobs"][0]["objects"]) and r,
                RESULT_TIMEOUT_S, "every result object to be given up")
            [job] = report["series"][0]["jobs"]
            assert job["state"] == "done", report
            assert {o["kind"] for o in job["objects"]} == {"SR", "SC"}
            for o in job["objects"]:
                assert o["attempts"] == 3, o
                assert o["destination"] == address
                assert o["last_error"].startswith(f"association: {why}"), o
                print(f"{destination.__name__}: {o['kind']} dead: {o['last_error']}")
        dead = sorted((work / "data" / "results" / "dead-letter").iterdir())
        assert len(dead) == 4, dead
        assert server.metric("nightingale_pipeline_dead_letters_total") == 4
        for path in dead:
            assert pydicom.dcmread(path, stop_before_pixels=True).PatientID == PATIENT_ID
        # The originals went with their last destination: the dead-letter copies are what
        # retention purges (red-team: the originals were left, patient data and no row).
        left = [p for p in (work / "data" / "results" / "objects").rglob("*") if p.is_file()]
        assert left == [], left
        # Still serving: a C-ECHO gets through.
        subprocess.run([tool("echoscu"), "-aec", "NIGHTINGALE", "127.0.0.1", str(server.port)],
                       check=True, timeout=30, capture_output=True)
        log = server.log()
        assert "given up" in log
        assert PATIENT_ID not in log and PATIENT_NAME not in log
        assert PATIENT_NAME.replace("^", " ") not in log
    finally:
        stop(server.proc)
        if pacs is not None:
            stop(pacs.proc)
        shutil.rmtree(work, ignore_errors=True)


class TricklingPacs:
    """A hostile "PACS" (red-team finding): accepts the association and every context,
    reads a C-STORE, then answers with a command PDV that never ends, one empty not-last
    fragment every `every` seconds (each within Nightingale's 60 s DIMSE wait). Raw Upper
    Layer bytes as PS3.8 9.3 lays them out."""

    def __init__(self, every: float = 1.0):
        import socket
        import struct
        import threading
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.associations = 0

        def read_pdu(c):
            def exactly(n):
                b = b""
                while len(b) < n:
                    x = c.recv(n - len(b))
                    if not x:
                        raise EOFError
                    b += x
                return b
            h = exactly(6)
            return h[0], exactly(struct.unpack(">I", h[2:6])[0])

        def item(t, payload):
            return bytes([t, 0]) + struct.pack(">H", len(payload)) + payload

        def serve(c):
            try:
                t, body = read_pdu(c)
                called, calling, items, off, ac = body[4:20], body[20:36], body[68:], 0, b""
                while off < len(items):
                    it, ln = items[off], struct.unpack(">H", items[off + 2:off + 4])[0]
                    data = items[off + 4:off + 4 + ln]
                    if it == 0x10:
                        ac += item(0x10, data)
                    if it == 0x20:
                        sub, so, ts = data[4:], 0, None
                        while so < len(sub):
                            sl = struct.unpack(">H", sub[so + 2:so + 4])[0]
                            if sub[so] == 0x40 and ts is None:
                                ts = sub[so + 4:so + 4 + sl]
                            so += 4 + sl
                        ac += item(0x21, bytes([data[0], 0, 0, 0]) + item(0x40, ts))
                    off += 4 + ln
                ac += item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
                pdu = struct.pack(">HH", 1, 0) + called + calling + b"\0" * 32 + ac
                c.sendall(bytes([2, 0]) + struct.pack(">I", len(pdu)) + pdu)
                self.associations += 1
                while True:
                    t, body = read_pdu(c)
                    if body[5] & 3 == 2:
                        pc = body[4]
                        break
                while True:
                    pdv = struct.pack(">IBB", 2, pc, 0x01)
                    c.sendall(bytes([4, 0]) + struct.pack(">I", len(pdv)) + pdv)
                    time.sleep(every)
            except Exception:
                pass
            finally:
                c.close()

        def accept():
            while True:
                try:
                    c, _ = self.listener.accept()
                except OSError:
                    return
                threading.Thread(target=serve, args=(c,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def close(self):
        self.listener.close()


def test_a_pacs_that_trickles_its_response_holds_neither_the_other_destinations_nor_itself():
    """Red-team finding: a PACS answering a C-STORE with an empty not-last command PDV
    every second held the outbox for ever (each receive was bounded, not the response;
    destinations were sent to one after another), so no other destination got anything.
    Now the response may have at most a few empty fragments (the association is dropped
    and the attempt retried later) and each destination has its own delivery task."""
    work = Path(tempfile.mkdtemp(prefix="nightingale-hostile-trickle-"))
    trickle = TricklingPacs(every=1.0)
    good = StoreScp(work, name="good")
    # "AAA…" sorts first: destinations used to be served in that order, one at a time.
    trickling = f"AAA-TRICKLE@127.0.0.1:{trickle.port}"
    server = Server(work, trickling, ("--results-destination",
                                      f"STORESCP@127.0.0.1:{good.port}",
                                      "--results-retry-secs", "0.5",
                                      "--results-max-attempts", "50"))
    try:
        study = generate_uid()
        store(server.port, [_save(_ct(study, generate_uid()), work / "ct.dcm")])
        started = time.monotonic()
        report = wait_for(
            lambda: (r := settled(server, study)) and all(
                o["delivery"] == "sent" for o in r["series"][0]["jobs"][0]["objects"]
                if o["destination"].startswith("STORESCP")) and r,
            RESULT_TIMEOUT_S, "the good destination's objects to be sent")
        print(f"good destination served after {time.monotonic() - started:.1f} s")
        assert len(good.files()) == 2
        # The trickling one is tried, fails on its empty fragments, and is retried.
        report = wait_for(
            lambda: (r := server.results(study)) and all(
                o["attempts"] >= 2 and o["delivery"] == "pending"
                for o in r["series"][0]["jobs"][0]["objects"]
                if o["destination"].startswith("AAA")) and r,
            RESULT_TIMEOUT_S, "the trickling destination's objects to be retried")
        for o in report["series"][0]["jobs"][0]["objects"]:
            if o["destination"].startswith("AAA"):
                assert "empty fragments" in o["last_error"], o
        assert trickle.associations >= 2
    finally:
        stop(server.proc)
        stop(good.proc)
        trickle.close()
        shutil.rmtree(work, ignore_errors=True)


def test_results_pending_across_a_restart_reach_a_destination_that_comes_back():
    work = Path(tempfile.mkdtemp(prefix="nightingale-hostile-comeback-"))
    port = free_port()  # nothing listens there yet
    address = f"STORESCP@127.0.0.1:{port}"
    flags = ("--results-retry-secs", "0.5", "--results-max-attempts", "20")
    server = Server(work, address, flags)
    pacs = None
    try:
        study = generate_uid()
        store(server.port, [_save(_ct(study, generate_uid()), work / "ct.dcm")])
        wait_for(lambda: (r := settled(server, study)) and all(
            o["attempts"] >= 1 and o["delivery"] == "pending"
            for o in r["series"][0]["jobs"][0]["objects"]),
            RESULT_TIMEOUT_S, "a failed attempt for each result object")
        stop(server.proc)
        # The destination comes up on its port, then Nightingale again on the same data.
        pacs = StoreScp(work, port=port)
        server = Server(work, address, flags)
        report = wait_for(lambda: (r := server.results(study)) and all(
            o["delivery"] == "sent" for o in r["series"][0]["jobs"][0]["objects"]) and r,
            RESULT_TIMEOUT_S, "the pending objects to be sent after the restart")
        [job] = report["series"][0]["jobs"]
        assert job["state"] == "done"
        assert all(o["attempts"] >= 2 for o in job["objects"]), job
        received = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                    for f in pacs.files()}
        assert received == {o["sop_instance_uid"] for o in job["objects"]}
    finally:
        stop(server.proc)
        if pacs is not None:
            stop(pacs.proc)
        shutil.rmtree(work, ignore_errors=True)


def test_a_job_interrupted_between_its_result_objects_sends_one_whole_result_set():
    """Red-team finding: a job's result objects were queued one by one as they were written, so
    a kill -9 between the SR and the SC left the SR queued (it reached PACS) while the job ended
    failed, and a rerun made a second result set. Objects are now recorded with the job's end,
    in one transaction. The state a stop leaves, with the SR's row still pending as the old
    code left it, is made here from a finished job (results store edited while the server is
    down): after the restart the job runs again and PACS gets exactly one SR and one SC, both
    new, and the interrupted run's files are gone."""
    work = Path(tempfile.mkdtemp(prefix="nightingale-hostile-interrupted-"))
    port = free_port()  # PACS is down during the first run: the objects stay pending
    address = f"STORESCP@127.0.0.1:{port}"
    server = Server(work, address, ("--results-retry-secs", "600"))
    pacs = None
    try:
        study = generate_uid()
        store(server.port, [_save(_ct(study, generate_uid()), work / "ct.dcm")])
        report = wait_for(lambda: (r := settled(server, study)) and all(
            o["attempts"] >= 1 for o in r["series"][0]["jobs"][0]["objects"]) and r,
            RESULT_TIMEOUT_S, "the job to be done and each object tried once")
        [job] = report["series"][0]["jobs"]
        assert job["state"] == "done" and len(job["objects"]) == 2, job
        stop(server.proc)
        # As a stop between the two objects left it under the old code: the job still
        # processing, its SR queued, the SC's file written but not recorded.
        [old_sr] = [o["sop_instance_uid"] for o in job["objects"] if o["kind"] == "SR"]
        db = sqlite3.connect(work / "data" / "results" / "results.sqlite3", timeout=10)
        try:
            with db:
                db.execute("UPDATE jobs SET state = 'processing' WHERE id = ?", (job["job"],))
                db.execute("DELETE FROM objects WHERE job_id = ? AND kind = 'SC'", (job["job"],))
        finally:
            db.close()
        job_dir = work / "data" / "results" / "objects" / str(job["job"])
        old_files = {p.name for p in job_dir.iterdir()}
        assert len(old_files) == 2, old_files

        pacs = StoreScp(work, port=port)
        server = Server(work, address, ("--results-retry-secs", "0.5"))
        report = wait_for(lambda: (r := server.results(study)) and (j := r["series"][0]["jobs"])
                          and j[0]["state"] == "done" and len(j[0]["objects"]) == 2
                          and all(o["delivery"] == "sent" for o in j[0]["objects"]) and r,
                          RESULT_TIMEOUT_S, "the job to run again and its objects to be sent")
        [job] = report["series"][0]["jobs"]
        new_uids = {o["sop_instance_uid"] for o in job["objects"]}
        assert old_sr not in new_uids
        received = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                    for f in pacs.files()]
        assert sorted(received) == sorted(new_uids), (received, new_uids)
        assert not old_files & {p.name for p in job_dir.iterdir()}
        assert len(list(job_dir.iterdir())) == 2
    finally:
        stop(server.proc)
        if pacs is not None:
            stop(pacs.proc)
        shutil.rmtree(work, ignore_errors=True)


def test_two_routes_running_one_bundle_each_send_to_their_own_pacs():
    """Red-team finding: jobs were superseded per (series, bundle), whatever their route, so of
    two routes that run the same bundle on a series, one route's job was superseded and its
    PACS got nothing, without a warning. Each route now has its own job: both PACS get an SR
    and an SC."""
    work = Path(tempfile.mkdtemp(prefix="nightingale-hostile-routes-"))
    pacs_a, pacs_b = StoreScp(work, "pacs-a"), StoreScp(work, "pacs-b")
    config = work / "routes.toml"
    config.write_text(
        f'[[routes]]\nname = "ct-a"\nmodality = ["CT"]\nbundles = ["{BUNDLE.name}"]\n'
        f'destinations = ["STORESCP@127.0.0.1:{pacs_a.port}"]\n\n'
        f'[[routes]]\nname = "ct-b"\nmodality = ["CT"]\nbundles = ["{BUNDLE.name}"]\n'
        f'destinations = ["STORESCP@127.0.0.1:{pacs_b.port}"]\n')
    server = Server(work, f"STORESCP@127.0.0.1:{pacs_a.port}", ("--config", str(config)))
    try:
        study = generate_uid()
        store(server.port, [_save(_ct(study, generate_uid()), work / "ct.dcm")])
        report = wait_for(lambda: (r := server.results(study)) and len(r["series"][0]["jobs"]) == 2
                          and all(j["state"] == "done" and j["objects"]
                                  and all(o["delivery"] == "sent" for o in j["objects"])
                                  for j in r["series"][0]["jobs"]) and r,
                          RESULT_TIMEOUT_S, "both routes' results to be sent")
        jobs = report["series"][0]["jobs"]
        assert sorted(j["route"] for j in jobs) == ["ct-a", "ct-b"], jobs
        assert len(pacs_a.files()) == 2 and len(pacs_b.files()) == 2
        for pacs, route in [(pacs_a, "ct-a"), (pacs_b, "ct-b")]:
            [job] = [j for j in jobs if j["route"] == route]
            got = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in pacs.files()}
            assert got == {o["sop_instance_uid"] for o in job["objects"]}
    finally:
        stop(server.proc)
        stop(pacs_a.proc)
        stop(pacs_b.proc)
        shutil.rmtree(work, ignore_errors=True)


def test_a_route_by_calling_ae_takes_a_series_only_if_every_instance_came_from_a_listed_ae():
    """Red-team finding: the calling AE was judged by the series' first instance only: an
    unlisted AE's image sent second went into the listed AE's job (and its SR), and a listed
    AE's series whose first instance came from elsewhere was left unrouted."""
    work = Path(tempfile.mkdtemp(prefix="nightingale-hostile-ae-"))
    pacs = StoreScp(work)
    config = work / "routes.toml"
    config.write_text(
        f'[[routes]]\nname = "good"\ncalling_ae = ["GOODAE"]\nbundles = ["{BUNDLE.name}"]\n'
        f'destinations = ["STORESCP@127.0.0.1:{pacs.port}"]\n')
    server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}", ("--config", str(config)))
    try:
        study = generate_uid()
        mixed, clean = generate_uid(), generate_uid()
        for series, aes in [(mixed, ["GOODAE", "EVILAE"]), (clean, ["GOODAE", "GOODAE"])]:
            for i, ae in enumerate(aes):
                ds = _ct(study, series)
                ds.InstanceNumber = i + 1
                store(server.port, [_save(ds, work / f"{series}-{i}.dcm")], ("-aet", ae))
        report = wait_for(
            lambda: (r := server.results(study)) and len(r["series"]) == 2
            and all(s["state"] != "assembling" for s in r["series"])
            and any(s["jobs"] and s["jobs"][0]["state"] == "done" for s in r["series"]) and r,
            RESULT_TIMEOUT_S, "both series settled")
        by = {s["series_instance_uid"]: s for s in report["series"]}
        assert by[mixed]["state"] == "unmatched", by[mixed]
        assert "calling AE not routed" in by[mixed]["reason"], by[mixed]
        assert not by[mixed]["jobs"]
        [job] = by[clean]["jobs"]
        assert job["state"] == "done" and job["instances"] == 2, job
    finally:
        stop(server.proc)
        stop(pacs.proc)
        shutil.rmtree(work, ignore_errors=True)


TABULAR = BUNDLE.parent / "pima-diabetes"


def test_with_late_instances_ignored_an_unmatched_series_keeps_its_reason():
    """Red-team finding: with `--late-instances ignore`, a late instance of a series that no
    route took turned it into "routed, late instances ignored", hiding why it was never
    processed. It is looked at again, and keeps its own outcome."""
    work = Path(tempfile.mkdtemp(prefix="nightingale-hostile-late-"))
    config = work / "routes.toml"
    # Two routes with mistakes a start-up warning names (red-team: nothing was said, and
    # every matching series ended unmatched or failed).
    config.write_text(
        f'[[routes]]\nname = "mr"\nmodality = ["MR"]\nbundles = ["{BUNDLE.name}"]\n\n'
        f'[[routes]]\nname = "ghost"\nmodality = ["XA"]\nbundles = ["no-such-bundle"]\n\n'
        f'[[routes]]\nname = "typo"\nmodality = ["XA"]\nbundles = ["{BUNDLE.name}"]\n'
        f'report = ["nonexistent-output"]\n\n'
        f'[[routes]]\nname = "tabular"\nmodality = ["XA"]\nbundles = ["{TABULAR.name}"]\n')
    server = Server(work, "NOWHERE@127.0.0.1:1",
                    ("--config", str(config), "--late-instances", "ignore"),
                    bundles=(BUNDLE, TABULAR))
    try:
        wait_for(lambda: "route reports an output its bundle does not have" in server.log(),
                 RESULT_TIMEOUT_S, "the route warnings")
        assert "route names a bundle that is not being served" in server.log()
        assert "declares no [dicom] section" in server.log()
        # "mr" and "typo" both run the bundle to the default destination (a red-team pass:
        # a series both matched reached the PACS twice, with nothing said).
        assert "two routes run this bundle to this destination" in server.log()
        study, series = generate_uid(), generate_uid()
        store(server.port, [_save(_ct(study, series), work / "a.dcm")])
        first = wait_for(lambda: (r := server.results(study)) and r["series"][0]["state"] == "unmatched"
                         and r, RESULT_TIMEOUT_S, "the series unmatched")
        reason = first["series"][0]["reason"]
        assert "modality" in reason, first
        late = _ct(study, series)
        late.InstanceNumber = 2
        store(server.port, [_save(late, work / "b.dcm")])
        again = wait_for(lambda: (r := server.results(study)) and r["series"][0]["instances"] == 2
                         and r["series"][0]["state"] != "assembling" and r,
                         RESULT_TIMEOUT_S, "the late instance looked at")
        assert again["series"][0]["state"] == "unmatched", again
        assert again["series"][0]["reason"] == reason, again
    finally:
        stop(server.proc)
        shutil.rmtree(work, ignore_errors=True)


def test_a_series_waiting_across_a_restart_is_processed_once_the_models_are_loaded():
    """Red-team finding: at start-up the pipeline routed series before the initial model load,
    so a series whose quiet time ended while the server was down was settled `unmatched` (no
    route) for good, and jobs interrupted by the stop failed `bundle_unavailable` (with the
    whole reference repository, whose loads take seconds). `Pipeline::run` now waits for the
    initial load. This checks the restart path end to end with one quick bundle (whose load
    wins the race even without the wait, so it does not reproduce the ordering itself): the
    series is received, the server stopped before its quiet time ends and started again, and
    the restarted server makes one job, done, its SR and SC at the PACS."""
    work = Path(tempfile.mkdtemp(prefix="nightingale-hostile-restart-"))
    pacs = StoreScp(work)
    address = f"STORESCP@127.0.0.1:{pacs.port}"
    server = Server(work, address)
    try:
        study = generate_uid()
        store(server.port, [_save(_ct(study, generate_uid()), work / "ct.dcm")])
        # Noted by the pipeline (it reads new arrivals every few tens of ms), then stopped
        # within the 1 s quiet time: the series waits, and its quiet time ends while the
        # server is down.
        time.sleep(0.5)
        stop(server.proc)
        restarted_ms = time.time() * 1000
        server = Server(work, address)
        report = wait_for(lambda: settled(server, study), RESULT_TIMEOUT_S,
                          "the waiting series to be settled after the restart")
        [series] = report["series"]
        assert series["jobs"], series  # before the fix: unmatched, "no route configured"
        report = wait_for(lambda: (r := server.results(study)) and all(
            o["delivery"] == "sent" for o in r["series"][0]["jobs"][0]["objects"]) and r,
            RESULT_TIMEOUT_S, "the results to be sent")
        [series] = report["series"]
        [job] = series["jobs"]
        assert job["state"] == "done", job
        # Made by the restarted server (the first one stopped before the quiet time ended).
        assert job["created_ms"] >= restarted_ms, (job["created_ms"], restarted_ms)
        assert len(pacs.files()) == 2
    finally:
        stop(server.proc)
        stop(pacs.proc)
        shutil.rmtree(work, ignore_errors=True)


def test_a_series_whose_uids_the_results_api_cannot_name_is_not_processed(pipeline, work):
    """A review's finding: a CT whose Study Instance UID holds `/` and `..` (stored under a
    hashed path) was processed and its SR and SC sent to PACS with the UID copied, while
    the results API could not name the study. Such a series is stored, not processed, and
    the log says why; the next good series is done."""
    server, pacs = pipeline
    d = work / "slash-uid"
    d.mkdir()
    before_files = len(pacs.files())
    before = server.metric("nightingale_pipeline_series_total", outcome="unmatched")
    ds = _ct(generate_uid(), generate_uid())
    ds.StudyInstanceUID = "1.2.826.0.1/../../evil"
    store(server.port, [_save(ds, d / "slash.dcm")])
    wait_for(lambda: server.metric("nightingale_pipeline_series_total", outcome="unmatched") > before,
             RESULT_TIMEOUT_S, "the series settled, not processed")
    assert "its results could not be named" in server.log()
    assert "evil" not in server.log()
    assert len(pacs.files()) == before_files
    send_good_series(server, pacs, d)


def test_results_sent_back_in_are_not_processed_again():
    """Red-team finding: a PACS that forwards new objects back to the AI node (here: the results
    destination is Nightingale's own port) and a bundle that takes OT made every result
    Secondary Capture a new series to process, whose results were sent back in, without end
    (31 series in one study after 20 s). Now a series of this node's own result objects is
    stored and settled `unmatched` with the reason, never processed."""
    work = Path(tempfile.mkdtemp(prefix="nightingale-hostile-loop-"))
    repo = work / "models"
    repo.mkdir()
    bundle = repo / BUNDLE.name
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("testdata"))
    toml = (bundle / "bundle.toml").read_text()
    line = 'modalities = ["CR", "DX", "CT", "MR"]'
    assert line in toml
    (bundle / "bundle.toml").write_text(toml.replace(line, 'modalities = ["CR", "DX", "CT", "MR", "OT"]'))
    (bundle / "bundle.toml.minisig").unlink()  # edited: unsigned (signatures are optional here)
    port = free_port()
    server = Server(work, f"NIGHTINGALE@127.0.0.1:{port}", port=port)
    try:
        study = generate_uid()
        store(server.port, [_save(_ct(study, generate_uid()), work / "ct.dcm")])
        # The CT's SR and SC come back in: this node keeps its results in its spool (QIDO-RS
        # lists them), so they arrive as duplicates of what it holds, and are not routed.
        report = wait_for(lambda: (r := server.results(study)) and r["series"][0]["jobs"] and all(
            o["delivery"] == "sent" for o in r["series"][0]["jobs"][0]["objects"]) and r,
            RESULT_TIMEOUT_S, "the results to be sent back in")
        # Longer than the quiet time: nothing more arrives, nothing is processed again.
        time.sleep(3)
        report = server.results(study)
        jobs = [j for s in report["series"] for j in s["jobs"]]
        assert len(jobs) == 1 and jobs[0]["state"] == "done", report
        assert len(report["series"]) == 1, report
        assert server.metric("nightingale_pipeline_series_total", outcome="routed") == 1
    finally:
        stop(server.proc)
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def pynetdicom_pacs(ae_title: str, on_store, max_pdu: int | None = None):
    """A PACS made with pynetdicom, taking every storage class, `on_store` answering each
    C-STORE; yields its port."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    ae = AE(ae_title=ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    if max_pdu is not None:
        ae.maximum_pdu_size = max_pdu
    port = free_port()
    pacs = ae.start_server(("127.0.0.1", port), block=False,
                           evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield port
    finally:
        pacs.shutdown()


def deliver_one_study(destination: str, tag: str) -> tuple[list[dict], Path]:
    """Stores one CT series into a fresh server sending its results to `destination` (0.5 s
    between attempts, at most 3), and returns the job's result objects once each is sent or
    given up, with the server's results folder (removed with its work folder at the end of
    the session's temporary folders)."""
    work = Path(tempfile.mkdtemp(prefix=f"nightingale-hostile-{tag}-"))
    server = Server(work, destination,
                    ("--results-retry-secs", "0.5", "--results-max-attempts", "3"))
    try:
        study = generate_uid()
        store(server.port, [_save(_ct(study, generate_uid()), work / "ct.dcm")])
        report = wait_for(
            lambda: (r := settled(server, study)) and all(
                o["delivery"] in ("sent", "dead") for o in r["series"][0]["jobs"][0]["objects"])
            and r, RESULT_TIMEOUT_S, "every result object sent or given up")
        return report["series"][0]["jobs"][0]["objects"], work / "data" / "results"
    finally:
        stop(server.proc)


def test_a_pacs_that_aborts_on_one_object_does_not_sink_the_others():
    """Red-team finding: a PACS that aborts the association on an SR (one that does not take
    SRs, say) made every object behind it in the batch count an attempt without being sent,
    so after max attempts the SC went to the dead-letter folder never tried. Now the objects
    behind a broken association go on over a new one: the SC reaches the PACS on the first
    round, and only the SR is charged (pynetdicom as the PACS)."""
    import threading

    from dicom_support import SR_CLASS

    stored: list[str] = []
    aborted: list[str] = []

    def on_store(event):
        if event.request.AffectedSOPClassUID == SR_CLASS:
            aborted.append(event.request.AffectedSOPInstanceUID)
            threading.Thread(target=event.assoc.abort, daemon=True).start()
            time.sleep(1.0)
            return 0xA700
        stored.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    with pynetdicom_pacs("POISON", on_store) as port:
        objects, _ = deliver_one_study(f"POISON@127.0.0.1:{port}", "poison")
    by_kind = {o["kind"]: o for o in objects}
    assert by_kind["SC"]["delivery"] == "sent", by_kind
    assert by_kind["SC"]["attempts"] == 1, by_kind
    assert by_kind["SR"]["delivery"] == "dead" and by_kind["SR"]["attempts"] == 3, by_kind
    assert stored == [by_kind["SC"]["sop_instance_uid"]], (stored, by_kind)
    assert len(aborted) == 3, aborted


@pytest.mark.parametrize("mode", ["warning", "refused", "small-pdus"])
def test_a_pacs_status_or_pdu_size_is_taken_as_it_means(mode):
    """Red-team findings, with pynetdicom as the PACS: a warning status (0xB006: elements
    discarded) was shown as a plain "sent"; a failure that sending again cannot change
    (0xA900) was retried to the maximum; a PACS accepting PDUs of at most 256 bytes got
    1,024-byte fragments, which were never sent, so every C-STORE to it failed."""
    received: list = []
    status = {"warning": 0xB006, "refused": 0xA900, "small-pdus": 0x0000}[mode]

    def on_store(event):
        received.append(event.dataset)
        return status

    max_pdu = 256 if mode == "small-pdus" else None
    with pynetdicom_pacs("PACS", on_store, max_pdu) as port:
        objects, results = deliver_one_study(f"PACS@127.0.0.1:{port}", mode)
    assert len(objects) == 2
    for o in objects:
        assert o["attempts"] == 1, o
        if mode == "warning":
            assert o["delivery"] == "sent" and "0xB006" in o["last_error"], o
        elif mode == "refused":
            assert o["delivery"] == "dead" and "0xA900" in o["last_error"], o
        else:
            assert o["delivery"] == "sent" and o["last_error"] is None, o
    if mode == "small-pdus":
        # Every element arrived as sent, through 250-byte fragments.
        sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p)
                for p in (results / "objects").rglob("*.dcm")}
        assert {str(d.SOPInstanceUID) for d in received} == set(sent)
        for d in received:
            ref = sent[d.SOPInstanceUID]
            diff = [e.tag for e in ref if e.tag not in d or d[e.tag].value != e.value]
            diff += [e.tag for e in d if e.tag not in ref]
            assert not diff, diff
