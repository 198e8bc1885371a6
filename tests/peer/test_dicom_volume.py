"""Per-volume inference (`[dicom] inference = "volume"`) end to end with real peers: dcmtk's
`storescu` sends real CT and MR volumes to `nightingale serve`, dcmtk's `storescp` receives
the results.

The bundles: `lesion-detection-mip` (any number of slices: the MIP over the series' own
slices) and `lesion-detection-mip-d4` (every volume resampled to 4 slices along the slice
axis), both built here by `models/train/lesion_detection_mip.py` (onnx helper, onnxruntime
check, self-test, signed with the demonstration key by the binary under test).

The volumes are real pixel data from the pydicom wheel: the Enhanced CT `eCT_Supplemental.dcm`
(2 frames of a head CT, per-frame positions and a shared orientation and rescale in its
functional groups) and the Enhanced MR `emri_small.dcm` (10 frames, no functional groups:
frame order), each sent as it is (one multi-frame object) AND split here (pydicom) into
single-frame CT / MR instances with the frame's position, orientation and rescale (CT), or its
Instance Number only (MR), sent in a shuffled order.

Checked against references computed here, never by the server:
- each (series, bundle) is ONE job with ONE inference; the SR's probability equals onnxruntime
  running the lesion-detection model on numpy's maximum over the slices of the volume built
  here (slices ordered by position along the slice normal, else frame order / Instance
  Number; one window over the volume; `imaging.preprocess_volume`, the numpy reference; for
  -d4 resampled to 4 slices) within 1e-4; the multi-frame and the split form of a volume give
  the same answer;
- the SR references every source instance; the SC shows the middle slice of the volume (its
  Source Image Sequence, and the frame number for a multi-frame source); dciodvfy finds no
  error in either beyond those in the source;
- series that cannot be a volume end as failed jobs with their reason in
  `GET /results/studies/{study}` (duplicated position, mixed orientation), or are not routed at
  all when the header already says so (one slice), and the series after them is processed;
  no patient identifier in the server's log.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_support import (identifiers_in, REPO, RESULT_TIMEOUT_S, SC_CLASS, SR_CLASS, Server, StoreScp, binary,
                           dciodvfy_errors, imaging, referenced_uids, sr_numbers, stop, store,
                           wait_for)

LESION = REPO / "models" / "bundles" / "lesion-detection"
MIP = "lesion-detection-mip"
MIP4 = "lesion-detection-mip-d4"
DEPTHS = {MIP: None, MIP4: 4}
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SPEC = imaging.Preprocessing(height=128, width=128, window="percentile", low=0.5, high=99.5,
                             aspect="pad", pad_value=0.0, mean=0.5, std=0.25)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[Path, Path]:
    """The two reference volume bundles, built by the script (signed by the binary under test)."""
    out = tmp_path_factory.mktemp("volume-bundles")
    env = {**os.environ, "NIGHTINGALE_BIN": str(binary())}
    for extra in ([], ["--depth", "4", "--name", MIP4]):
        done = subprocess.run([sys.executable, str(REPO / "models/train/lesion_detection_mip.py"),
                               "--out", str(out), *extra], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    for name in (MIP, MIP4):
        assert (out / name / "bundle.toml.minisig").exists()
    return out / MIP, out / MIP4


@pytest.fixture
def work():
    d = Path(tempfile.mkdtemp(prefix="nightingale-volume-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --- the series, from real files ---------------------------------------------------------

def _new_ids(ds: pydicom.Dataset, study: str, series: str) -> None:
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def multi_frame(name: str, folder: Path) -> list[Path]:
    """The real multi-frame object, with new UIDs."""
    folder.mkdir()
    ds = pydicom.dcmread(get_testdata_file(name))
    _new_ids(ds, generate_uid(), generate_uid())
    path = folder / "volume.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [path]


def _group(ds: pydicom.Dataset, frame: int, sequence: str):
    """A functional group macro of one frame: per-frame, else shared, else None."""
    for fg in (ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")):
        if not fg:
            continue
        item = fg[frame] if fg is ds.get("PerFrameFunctionalGroupsSequence") else fg[0]
        if sequence in item:
            return item[sequence][0]
    return None


def split(name: str, folder: Path, order: list[int], edit=None) -> list[Path]:
    """The frames of a real multi-frame object as single-frame CT / MR instances of one new
    series (position, orientation and rescale from the functional groups where it has them;
    Instance Number = frame + 1), written in `order`; `edit(frame, ds)` may change one."""
    folder.mkdir()
    src = pydicom.dcmread(get_testdata_file(name))
    frames = src.pixel_array
    study, series = generate_uid(), generate_uid()
    paths = []
    for k in order:
        ds = copy.deepcopy(src)
        for kw in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
                   "NumberOfFrames", "FrameIncrementPointer"):
            if kw in ds:
                delattr(ds, kw)
        ds.SOPClassUID = CT_IMAGE if src.Modality == "CT" else MR_IMAGE
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        _new_ids(ds, study, series)
        ds.InstanceNumber = k + 1
        position = _group(src, k, "PlanePositionSequence")
        orientation = _group(src, k, "PlaneOrientationSequence")
        rescale = _group(src, k, "PixelValueTransformationSequence")
        if position is not None:
            ds.ImagePositionPatient = position.ImagePositionPatient
        if orientation is not None:
            ds.ImageOrientationPatient = orientation.ImageOrientationPatient
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = rescale.RescaleSlope, rescale.RescaleIntercept
        ds.PixelData = np.ascontiguousarray(frames[k]).astype(frames.dtype).tobytes()
        if edit is not None:
            edit(k, ds)
        path = folder / f"slice-{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --- the reference: the volume built here, and onnxruntime --------------------------------

def reference_slices(paths: list[Path]):
    """(stored slices, slopes, intercepts, SOP UID and frame of each) in volume order, as
    docs/bundle-format.md says: by position along the normal (row x column cosines), else a
    multi-frame object's frame order, else Instance Number."""
    datasets = [pydicom.dcmread(p) for p in paths]
    rows = []  # (position or None, orientation or None, instance number, pixels, slope, intercept, uid, frame)
    if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1)) > 1:
        ds = datasets[0]
        for f, pixels in enumerate(ds.pixel_array):
            pos = _group(ds, f, "PlanePositionSequence")
            ori = _group(ds, f, "PlaneOrientationSequence")
            pvt = _group(ds, f, "PixelValueTransformationSequence")
            rows.append((pos.ImagePositionPatient if pos else None,
                         ori.ImageOrientationPatient if ori else None, None, pixels,
                         float(pvt.RescaleSlope) if pvt else float(ds.get("RescaleSlope", 1.0)),
                         float(pvt.RescaleIntercept) if pvt else float(ds.get("RescaleIntercept", 0.0)),
                         str(ds.SOPInstanceUID), f))
    else:
        for ds in datasets:
            rows.append((ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"),
                         int(ds.InstanceNumber), ds.pixel_array, float(ds.get("RescaleSlope", 1.0)),
                         float(ds.get("RescaleIntercept", 0.0)), str(ds.SOPInstanceUID), 0))
    if all(r[0] is not None and r[1] is not None for r in rows):
        o = np.array([float(v) for v in rows[0][1]])
        normal = np.cross(o[:3], o[3:])
        rows.sort(key=lambda r: float(np.dot(np.array([float(v) for v in r[0]]), normal)))
        order = "position"
    elif len(datasets) == 1:
        order = "frame-order"
    else:
        rows.sort(key=lambda r: r[2])
        order = "instance-number"
    return rows, order


def expected(paths: list[Path], depth: int | None) -> tuple[float, str, str, int, int]:
    """P(present) from onnxruntime (lesion-detection on numpy's MIP of the volume built here),
    the slice order, and the middle slice's SOP Instance UID and frame, and the slice count."""
    rows, order = reference_slices(paths)
    monochrome1 = pydicom.dcmread(paths[0], stop_before_pixels=True).PhotometricInterpretation == "MONOCHROME1"
    volume = imaging.preprocess_volume([r[3] for r in rows], SPEC, depth, [r[4] for r in rows],
                                       [r[5] for r in rows], monochrome1)
    assert volume.shape == (depth or len(rows), 128, 128)
    mip = volume.max(axis=0)
    session = ort.InferenceSession(str(LESION / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    p = float(session.run(None, {"image": mip[None, None, :, :].astype(np.float32)})[0][0][1])
    middle = rows[(len(rows) - 1) // 2]
    return p, order, middle[6], middle[7], len(rows)


# --- the tests -----------------------------------------------------------------------------

def _study(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def _jobs_finished(server: Server, study: str, jobs: int):
    def done():
        r = server.results(study)
        if not r:
            return None
        found = [j for s in r["series"] for j in s["jobs"]]
        if len(found) == jobs and all(j["state"] in ("done", "failed") for j in found):
            return found
        return None
    return wait_for(done, RESULT_TIMEOUT_S, f"{jobs} finished job(s) of study {study}")


def test_a_volume_is_one_input_and_its_result_equals_the_reference(work, bundles):
    pacs = StoreScp(work)
    server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}", bundles=bundles)
    try:
        series = {
            "ct-multi-frame": multi_frame("eCT_Supplemental.dcm", work / "a"),
            "ct-single-frames": split("eCT_Supplemental.dcm", work / "b", order=[1, 0]),
            "mr-multi-frame": multi_frame("emri_small.dcm", work / "c"),
            "mr-single-frames": split("emri_small.dcm", work / "d", order=[7, 2, 9, 0, 5, 1, 8, 3, 6, 4]),
        }
        for paths in series.values():
            store(server.port, paths)
        answers: dict[tuple[str, str], float] = {}
        for label, paths in series.items():
            study = _study(paths)
            jobs = _jobs_finished(server, study, 2)
            source_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
            for job in jobs:
                assert job["state"] == "done", (label, job)
                depth = DEPTHS[job["bundle"]]
                p, order, middle_uid, middle_frame, slices = expected(paths, depth)
                [finding] = job["findings"]
                volume = finding["volume"]
                assert volume["slices"] == slices and volume["depth"] == (depth or slices), (label, volume)
                assert volume["order"] == order, (label, volume)
                print(f"{label} {job['bundle']}: served {finding['probability']:.6f} reference {p:.6f} "
                      f"({slices} slices, {order})")
                assert abs(finding["probability"] - p) < 1e-4, (label, job["bundle"], finding, p)
                answers[(label, job["bundle"])] = finding["probability"]
                assert {o["kind"] for o in job["objects"]} == {"SR", "SC"}
            # The result objects at the PACS: per bundle one SR referencing every source
            # instance and one SC showing the middle slice.
            files = wait_for(lambda: (f := [x for x in pacs.files()
                                            if str(pydicom.dcmread(x, stop_before_pixels=True).StudyInstanceUID) == study])
                             and len(f) == 4 and f, RESULT_TIMEOUT_S, f"4 result objects of {label}")
            by_class: dict[str, list[Path]] = {}
            for f in files:
                by_class.setdefault(str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID), []).append(f)
            assert sorted(by_class) == sorted([SR_CLASS, SC_CLASS]) and all(len(v) == 2 for v in by_class.values())
            _, _, middle_uid, middle_frame, _ = expected(paths, None)
            for f in by_class[SR_CLASS]:
                sr = pydicom.dcmread(f)
                assert referenced_uids(sr) == source_uids, label
                name = sr.ContributingEquipmentSequence[0].ManufacturerModelName
                assert abs(sr_numbers(sr)["Probability"] - answers[(label, name)]) < 1e-6
                assert sr.VerificationFlag == "UNVERIFIED"
            for f in by_class[SC_CLASS]:
                sc = pydicom.dcmread(f, stop_before_pixels=True)
                ref = sc.SourceImageSequence[0]
                assert str(ref.ReferencedSOPInstanceUID) == middle_uid, label
                if len(paths) == 1:
                    assert int(ref.ReferencedFrameNumber) == middle_frame + 1, label
            if label in ("ct-multi-frame", "ct-single-frames"):
                source_errors = set().union(*(dciodvfy_errors(p) for p in paths))
                for f in files:
                    new = dciodvfy_errors(f) - source_errors
                    assert not new, f"{label}: dciodvfy errors in {f.name}: {sorted(new)}"
        # One volume, two encodings: the same answer.
        for bundle in (MIP, MIP4):
            assert abs(answers[("ct-multi-frame", bundle)] - answers[("ct-single-frames", bundle)]) < 1e-6
            assert abs(answers[("mr-multi-frame", bundle)] - answers[("mr-single-frames", bundle)]) < 1e-6
        # Resampling 10 slices to 4 changes the MIP (averaged slices): the two bundles differ.
        assert abs(answers[("mr-multi-frame", MIP)] - answers[("mr-multi-frame", MIP4)]) > 1e-6
        assert server.metric("nightingale_pipeline_jobs_total", outcome="done") == 8
    finally:
        stop(server.proc)
        stop(pacs.proc)


def test_series_that_cannot_be_a_volume_fail_with_their_reason(work, bundles):
    pacs = StoreScp(work)
    server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}", bundles=bundles)
    try:
        def same_position(frame, ds):
            ds.ImagePositionPatient = [99.5, -301.5, -159.0]

        def coronal(frame, ds):
            if frame == 1:
                ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

        duplicate = split("eCT_Supplemental.dcm", work / "dup", order=[0, 1], edit=same_position)
        mixed = split("eCT_Supplemental.dcm", work / "mixed", order=[0, 1], edit=coronal)
        (work / "one").mkdir()
        one = work / "one" / "slice.dcm"
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        _new_ids(ds, generate_uid(), generate_uid())
        ds.save_as(one, enforce_file_format=True)
        good = split("eCT_Supplemental.dcm", work / "good", order=[0, 1])
        for paths in (duplicate, mixed, [one], good):
            store(server.port, paths)

        for paths, reason in ((duplicate, "duplicate_position"), (mixed, "mixed_orientation")):
            jobs = _jobs_finished(server, _study(paths), 2)
            for job in jobs:
                assert job["state"] == "failed", job
                assert job["reason"].startswith(reason + ": "), job
                assert not job["objects"], job
            assert server.metric("nightingale_pipeline_jobs_total", outcome="failed", reason=reason) == 2
        # One slice: the router already knows it is no volume; stored, not processed.
        report = wait_for(lambda: (r := server.results(_study([one]))) and r["series"][0]["state"] == "unmatched" and r,
                          RESULT_TIMEOUT_S, "the one-slice series unmatched")
        [series] = report["series"]
        assert not series["jobs"]
        assert "at least 2" in series["reason"], series
        # The next series is processed.
        for job in _jobs_finished(server, _study(good), 2):
            assert job["state"] == "done", job
        log = server.log()
        for source in (get_testdata_file("eCT_Supplemental.dcm"), get_testdata_file("CT_small.dcm")):
            header = pydicom.dcmread(source, stop_before_pixels=True)
            assert not identifiers_in(log, header.get("PatientID", ""), header.get("PatientName", ""))
    finally:
        stop(server.proc)
        stop(pacs.proc)
