"""The DIMSE SCP against real peers: dcmtk's echoscu and storescu (Debian `dcmtk`), with
pydicom's test files (the `pydicom` wheel) as the instances and pydicom as the judge.

Each test module starts its own Nightingale servers (an empty model repository, a fresh
data folder): `serve --dicom-port P` (loopback, any calling AE) and, for the allowlist,
`serve --dicom-port Q --dicom-allowed-ae GOODSCU`. What a test expects comes from the files
sent and from dcmtk's own report, never from Nightingale:

- every file storescu sends is acknowledged, stored as a `.dcm` file whose data set equals
  (element by element, pydicom) the one sent, in the transfer syntax it was sent in, and
  listed in the spool's index;
- a truncated object and one without Study Instance UID get a failure status (storescu says
  so), are quarantined, never indexed, and the server keeps serving;
- an unknown calling AE against an allowlist gets A-ASSOCIATE-RJ.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from dicom_support import binary as _binary, free_port as _free_port, spool_index, stop, tool as _tool  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
PEER_TIMEOUT_S = 120
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}

# pydicom test files in the transfer syntaxes the SCP accepts: (file, its transfer syntax UID,
# the storescu option that proposes that transfer syntax, so the file travels as encoded).
SENT = [
    ("CT_small.dcm", "1.2.840.10008.1.2.1", "-xe"),
    ("MR_small.dcm", "1.2.840.10008.1.2.1", "-xe"),
    ("MR_small_implicit.dcm", "1.2.840.10008.1.2", "-xi"),
    ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2", "-xb"),
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5", "-xr"),
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90", "-xv"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80", "-xt"),
    ("JPEGLSNearLossless_08.dcm", "1.2.840.10008.1.2.4.81", "-xu"),
    ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50", "-xy"),
    ("JPEG-lossy.dcm", "1.2.840.10008.1.2.4.51", "-xx"),
    ("SC_rgb_jpeg_gdcm.dcm", "1.2.840.10008.1.2.4.70", "-xs"),
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91", "-xw"),
    ("image_dfl.dcm", "1.2.840.10008.1.2.1.99", "-xd"),
    ("SC_rgb_rle_2frame.dcm", "1.2.840.10008.1.2.5", "-xr"),  # multi-frame
    ("examples_ybr_color.dcm", "1.2.840.10008.1.2.4.50", "-xy"),  # US multi-frame, 30 frames
    ("rtdose.dcm", "1.2.840.10008.1.2", "-xi"),  # RT dose, 15 frames
    ("test-SR.dcm", "1.2.840.10008.1.2.1", "-xe"),
]


class Server:
    def __init__(self, workdir: Path, extra: list[str]):
        self.port = _free_port()
        self.http_port = _free_port()
        self.data = workdir / "data"
        self.spool = self.data / "spool"
        repo = workdir / "models"
        repo.mkdir()
        self.stderr = workdir / "stderr.log"
        cmd = [str(_binary()), "serve", "--repository", str(repo),
               "--http-addr", f"127.0.0.1:{self.http_port}", "--data-dir", str(self.data),
               "--dicom-port", str(self.port), *extra]
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited ({self.proc.returncode}):\n{self.log()}", pytrace=False)
            if "listening (DICOM)" in self.log():
                return
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"no `listening (DICOM)` within {START_TIMEOUT_S} s:\n{self.log()}", pytrace=False)

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop(self.proc)

    def index(self) -> dict[str, dict]:
        return spool_index(self.spool)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus counter's samples with these labels (0 when absent)."""
        text = requests.get(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def quarantine_reasons(self) -> list[str]:
        return sorted(p.read_text() for p in (self.spool / "quarantine").glob("*.reason"))


@pytest.fixture(scope="module")
def server():
    work = Path(tempfile.mkdtemp(prefix="nightingale-dicom-"))
    s = Server(work, [])
    yield s
    s.stop()
    print(s.log()[-4000:])
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def guarded_server():
    work = Path(tempfile.mkdtemp(prefix="nightingale-dicom-acl-"))
    s = Server(work, ["--dicom-allowed-ae", "GOODSCU"])
    yield s
    s.stop()
    shutil.rmtree(work, ignore_errors=True)


def echoscu(port: int, aet: str = "PEERSCU", aec: str = "NIGHTINGALE") -> subprocess.CompletedProcess:
    return subprocess.run([_tool("echoscu"), "-v", "-aet", aet, "-aec", aec,
                           "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=PEER_TIMEOUT_S, env=PEER_ENV)


def storescu(port: int, files: list[Path], *extra: str) -> subprocess.CompletedProcess:
    # -R: propose only the presentation contexts the files need (with the transfer syntaxes
    # the -x… option in `extra` names). -nh: keep going after a failure.
    return subprocess.run([_tool("storescu"), "-v", "-R", "-nh", "-aet", "PEERSCU",
                           "-aec", "NIGHTINGALE", *extra, "127.0.0.1", str(port),
                           *[str(f) for f in files]],
                          capture_output=True, text=True, timeout=PEER_TIMEOUT_S, env=PEER_ENV)


def _with_new_uid(src: Path, dst: Path) -> str:
    """A copy of `src` with a fresh SOP Instance UID (pydicom's test files share some UIDs
    across their transfer-syntax variants), encoded as the original. pydicom's JPEG-LS
    near-lossless files carry no Study/Series Instance UID (which every instance needs, and
    the SCP refuses an instance without): those get fresh ones."""
    ds = pydicom.dcmread(src)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if keyword not in ds:
            setattr(ds, keyword, generate_uid())
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.save_as(dst, enforce_file_format=True)
    return uid


def _equal_datasets(sent: pydicom.Dataset, stored: pydicom.Dataset) -> list[str]:
    """Tags whose values differ (pydicom's element comparison), both ways. Data Set Trailing
    Padding (FFFC,FFFC), meaningless by definition (PS3.10 7.2), is dropped by storescu before
    sending, so it is not compared."""
    diffs = []
    for elem in sent:
        if elem.tag == 0xFFFCFFFC:
            continue
        if elem.tag not in stored or stored[elem.tag].value != elem.value:
            diffs.append(str(elem.tag))
    for elem in stored:
        if elem.tag not in sent:
            diffs.append(f"extra {elem.tag}")
    return diffs


def test_echoscu_succeeds(server):
    r = echoscu(server.port)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Received Echo Response (Success)" in r.stdout + r.stderr


def test_storescu_files_are_stored_as_sent_and_indexed(server, tmp_path):
    uids, expected_ts, groups = {}, {}, {}
    for name, ts, option in SENT:
        src = Path(get_testdata_file(name))
        assert pydicom.dcmread(src, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
        dst = tmp_path / name
        uid = _with_new_uid(src, dst)
        uids[uid] = dst
        expected_ts[uid] = ts
        groups.setdefault(option, []).append(dst)
    # One storescu run (one association) per transfer syntax proposal.
    for option, files in groups.items():
        r = storescu(server.port, files, option)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        assert out.count("Received Store Response (Success)") == len(files), out

    index = server.index()
    for uid, sent_path in uids.items():
        assert uid in index, f"{sent_path.name} not in the index"
        row = index[uid]
        stored_path = server.spool / row["path"]
        assert stored_path.suffix == ".dcm" and stored_path.is_file()
        sent = pydicom.dcmread(sent_path)
        stored = pydicom.dcmread(stored_path)
        assert row["transfer_syntax"] == expected_ts[uid], sent_path.name
        assert stored.file_meta.TransferSyntaxUID == expected_ts[uid], sent_path.name
        assert stored.file_meta.MediaStorageSOPInstanceUID == uid
        assert row["study_uid"] == sent.StudyInstanceUID
        assert row["series_uid"] == sent.SeriesInstanceUID
        assert row["sop_class_uid"] == sent.SOPClassUID
        assert row["calling_ae"] == "PEERSCU"
        assert _equal_datasets(sent, stored) == [], sent_path.name
    assert server.alive()


# The storescu option that proposes each transfer syntax (storescu proposes one kind per run).
PROPOSE = {
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
}


def _test_sets() -> list[Path]:
    """Every file of pydicom's test set and of pydicom-data (its `data_store` folder)."""
    pydicom_dir = Path(get_testdata_file("CT_small.dcm")).parent
    data_store = Path(pydicom.__file__).resolve().parent.parent / "data_store" / "data"
    assert data_store.is_dir(), "pydicom-data is not installed (tests/peer/requirements.txt)"
    return sorted(p for d in (pydicom_dir, data_store) for p in d.iterdir() if p.is_file())


def test_every_instance_of_pydicoms_test_sets_is_stored_as_sent(server, tmp_path):
    """Each file of pydicom's and pydicom-data's test sets that is a storable instance (a
    Part 10 file with SOP Class/Instance, Study and Series UIDs, in a transfer syntax
    storescu can propose) is sent in its own transfer syntax and comes back equal."""
    sent, groups = {}, {}
    for src in _test_sets():
        try:
            ds = pydicom.dcmread(src, stop_before_pixels=True)
        except Exception:
            continue  # not a DICOM file (README, JSON, ICC profile, DICOMDIR trees…)
        ts = ds.file_meta.get("TransferSyntaxUID") if "file_meta" in dir(ds) else None
        needed = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        if ts not in PROPOSE or not all(k in ds for k in needed) or ds.SOPClassUID == "1.2.840.10008.1.3.10":
            continue
        dst = tmp_path / f"{src.parent.name}-{src.name}"
        try:
            uid = _with_new_uid(src, dst)
        except Exception:
            continue  # pydicom cannot re-encode it: storescu could not send it as is either
        sent[uid] = (dst, ts)
        groups.setdefault(PROPOSE[ts], []).append(dst)
    assert len(sent) >= 80, len(sent)
    unreadable = set()
    for option, files in sorted(groups.items()):
        r = storescu(server.port, files, option)
        out = r.stdout + r.stderr
        # storescu refuses to read the deliberately truncated files (rtplan_truncated, and
        # emri_small_jpeg_2k_lossless_too_short, whose pixel data has no end): it names each
        # one it skips, and never sends it.
        skipped = {Path(line.split("in file: ", 1)[1].rsplit(", ignoring file", 1)[0])
                   for line in out.splitlines() if line.endswith(", ignoring file")}
        unreadable |= skipped
        assert out.count("Received Store Response (Success)") == len(files) - len(skipped), out
        assert "Store Failed" not in out and "Error:" not in out, out
    assert {p.name for p in unreadable} <= {
        "test_files-rtplan_truncated.dcm",
        "data-emri_small_jpeg_2k_lossless_too_short.dcm",
    }, unreadable
    index = server.index()
    for uid, (path, ts) in sent.items():
        if path in unreadable:
            assert uid not in index
            continue
        assert uid in index, path.name
        stored = pydicom.dcmread(server.spool / index[uid]["path"])
        assert stored.file_meta.TransferSyntaxUID == ts, path.name
        assert _equal_datasets(pydicom.dcmread(path), stored) == [], path.name
    assert server.alive()


def test_the_same_instance_twice_is_stored_once(server, tmp_path):
    f = tmp_path / "ct.dcm"
    uid = _with_new_uid(Path(get_testdata_file("CT_small.dcm")), f)
    for _ in range(2):
        r = storescu(server.port, [f])
        assert r.returncode == 0 and "Store Response (Success)" in r.stdout + r.stderr, r.stdout + r.stderr
    assert uid in server.index()
    # One file, named by the SOP Instance UID and the content hash.
    assert len(list(server.spool.rglob(f"{uid}_*.dcm"))) == 1


def test_an_instance_sent_again_in_another_transfer_syntax_is_a_duplicate(server, tmp_path):
    """A PACS re-sends an instance on an association that negotiated another uncompressed
    transfer syntax (storescu converts on the fly): the same elements in other bytes are
    acknowledged as a duplicate, the first copy kept and nothing quarantined. An instance
    with the same UID and another value stays a failure."""
    f = tmp_path / "ct.dcm"
    uid = _with_new_uid(Path(get_testdata_file("CT_small.dcm")), f)
    before = server.quarantine_reasons()
    for option in ("-xe", "-xi", "-xb", "-xe"):
        r = storescu(server.port, [f], option)
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "Store Response (Success)" in out, (option, out)
    stored = list(server.spool.rglob(f"{uid}_*.dcm"))
    assert len(stored) == 1, stored
    kept = pydicom.dcmread(stored[0])
    assert kept.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert _equal_datasets(pydicom.dcmread(f), kept) == []
    assert server.quarantine_reasons() == before
    # The file sent as it is by another SCU (Nightingale's own): CT_small.dcm ends with 126
    # bytes of Data Set Trailing Padding (FFFC,FFFC), which storescu drops and this SCU
    # sends; padding is no content (a docs walk-through got a conflict here).
    assert (0xFFFC, 0xFFFC) in pydicom.dcmread(f)
    r = subprocess.run([str(_binary()), "dicom", "store", "--addr", f"127.0.0.1:{server.port}",
                        "--called-ae", "NIGHTINGALE", str(f)],
                       capture_output=True, text=True, timeout=PEER_TIMEOUT_S, env=PEER_ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list(server.spool.rglob(f"{uid}_*.dcm"))) == 1
    assert server.quarantine_reasons() == before
    # The same UID with another value: a conflict (failure status), quarantined.
    changed = tmp_path / "changed.dcm"
    ds = pydicom.dcmread(f)
    ds.SeriesNumber = int(ds.get("SeriesNumber", 0)) + 1
    ds.save_as(changed, enforce_file_format=True)
    r = storescu(server.port, [changed], "-xi")
    out = r.stdout + r.stderr
    assert "Store Response (Success)" not in out, out
    assert len(server.quarantine_reasons()) == len(before) + 1
    assert len(list(server.spool.rglob(f"{uid}_*.dcm"))) == 1


def test_corrupt_objects_fail_are_quarantined_and_the_server_keeps_serving(server, tmp_path):
    before = len(server.quarantine_reasons())
    # A CT cut before its pixel data (at an element boundary, so storescu can still read
    # and send it): a CT image without pixel data.
    ct = Path(get_testdata_file("CT_small.dcm"))
    truncated = tmp_path / "ct_truncated.dcm"
    uid_truncated = _with_new_uid(ct, truncated)
    raw = truncated.read_bytes()
    ds = pydicom.dcmread(truncated)
    cut = raw.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data, little endian
    assert cut > 0 and "PixelData" in ds
    truncated.write_bytes(raw[:cut])
    assert "PixelData" not in pydicom.dcmread(truncated)

    # A CT without Study Instance UID. (storescu will not send a file without SOP Instance
    # UID at all; that case is sent by dicom-ul's client in dicom/tests/scp.rs.)
    missing = tmp_path / "ct_no_study.dcm"
    uid_missing = _with_new_uid(ct, missing)
    ds = pydicom.dcmread(missing)
    del ds.StudyInstanceUID
    ds.save_as(missing, enforce_file_format=True)
    assert "StudyInstanceUID" not in pydicom.dcmread(missing)

    good = tmp_path / "ct_good.dcm"
    uid_good = _with_new_uid(ct, good)
    r = storescu(server.port, [truncated, missing, good])
    out = r.stdout + r.stderr
    # storescu reports each failure; the good one after them still succeeds.
    assert out.count("Received Store Response (Success)") == 1, out
    # dcmtk names status 0xA900 "DataSetDoesNotMatchSOPClass".
    assert out.count("Received Store Response (Error: DataSetDoesNotMatchSOPClass)") == 2, out
    index = server.index()
    assert uid_good in index
    assert uid_truncated not in index and uid_missing not in index
    assert not list(server.spool.rglob(f"{uid_truncated}*.dcm"))
    reasons = server.quarantine_reasons()
    assert len(reasons) == before + 2, reasons
    assert any("kind: missing_pixel_data" in r for r in reasons)
    assert any("kind: missing_attribute" in r for r in reasons)
    # No patient data in the reasons.
    patient = str(pydicom.dcmread(ct).PatientName)
    assert all(patient not in r for r in reasons)
    assert server.alive()
    assert echoscu(server.port).returncode == 0


def test_unknown_calling_ae_is_rejected(guarded_server):
    r = echoscu(guarded_server.port, aet="STRANGER")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "Association Rejected" in out, out
    assert "Calling AE Title Not Recognized" in out, out
    r = echoscu(guarded_server.port, aet="GOODSCU")
    assert r.returncode == 0, r.stdout + r.stderr
    assert guarded_server.alive()


def test_a_wrong_called_ae_is_rejected_only_when_checked(server, tmp_path):
    # By default (as dcmtk's storescp and Orthanc) any called AE is accepted.
    assert echoscu(server.port, aec="SOMEONE_ELSE").returncode == 0
    work = tmp_path / "strict"
    work.mkdir()
    strict = Server(work, ["--dicom-check-called-ae"])
    try:
        r = echoscu(strict.port, aec="SOMEONE_ELSE")
        out = r.stdout + r.stderr
        assert r.returncode != 0, out
        assert "Association Rejected" in out, out
        assert "Called AE Title Not Recognized" in out, out
        assert echoscu(strict.port).returncode == 0
        assert strict.alive()
    finally:
        strict.stop()


def test_a_non_loopback_address_needs_an_allowlist_or_insecure(tmp_path):
    port = _free_port()
    base = [str(_binary()), "serve", "--repository", str(tmp_path), "--http-addr",
            f"127.0.0.1:{_free_port()}", "--data-dir", str(tmp_path / "data"),
            "--dicom-addr", f"0.0.0.0:{port}"]
    r = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "allowlist" in r.stderr and "--insecure" in r.stderr, r.stderr
    assert not (tmp_path / "data" / "spool").exists()
    # With an allowlist it starts (--dicom-addr wins over the fixture's --dicom-port).
    work = tmp_path / "with-allowlist"
    work.mkdir()
    s = Server(work, ["--dicom-addr", f"0.0.0.0:{port}", "--dicom-allowed-ae", "PACS@127.0.0.1"])
    try:
        assert f"listening (DICOM) addr=0.0.0.0:{port}" in s.log()
        assert echoscu(port, aet="PACS").returncode == 0
    finally:
        s.stop()


def test_metrics_count_what_storescu_saw(server, tmp_path):
    before_ok = server.metric("nightingale_dicom_instances_stored_total", duplicate="false")
    before_bad = server.metric("nightingale_dicom_instances_failed_total",
                               reason="missing_pixel_data")
    before_assoc = server.metric("nightingale_dicom_associations_total", outcome="accepted")
    ct = Path(get_testdata_file("CT_small.dcm"))
    files = []
    for i in range(3):
        f = tmp_path / f"ct{i}.dcm"
        _with_new_uid(ct, f)
        files.append(f)
    cut = tmp_path / "cut.dcm"
    _with_new_uid(ct, cut)
    raw = cut.read_bytes()
    cut.write_bytes(raw[:raw.rfind(b"\xe0\x7f\x10\x00")])
    r = storescu(server.port, [*files, cut])
    out = r.stdout + r.stderr
    assert out.count("Received Store Response (Success)") == 3, out
    assert out.count("Received Store Response (Error") == 1, out
    assert server.metric("nightingale_dicom_instances_stored_total", duplicate="false") == before_ok + 3
    assert server.metric("nightingale_dicom_instances_failed_total",
                         reason="missing_pixel_data") == before_bad + 1
    assert server.metric("nightingale_dicom_associations_total", outcome="accepted") == before_assoc + 1
    assert server.metric("nightingale_dicom_spool_free_bytes") > 0


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _detail(record: dict) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in (record.get("detail") or "").split() if "=" in kv)


def test_instances_stored_while_the_audit_trail_is_down_are_acknowledged_and_audited_once_it_is_back(tmp_path):
    # The trail fails: its live file is moved away under the server (which refuses to write
    # a file that is not the one it opened). storescu's instances are acknowledged with their
    # records held (fsynced) beside the trail, and written to it, in order, once it is back.
    # They were answered 0x0110 after being committed to the spool, and stayed there
    # unaudited; the association's records were dropped.
    s = Server(tmp_path, [])
    try:
        trail = s.data / "audit" / "audit.jsonl"
        held = s.data / "audit-held" / "dicom.jsonl"
        wait_for_records = time.monotonic() + 20
        while not _records(trail) and time.monotonic() < wait_for_records:
            time.sleep(0.1)
        before = len(_records(trail))
        assert before > 0, "the server's start is recorded"
        away = trail.with_name("audit.jsonl.away")
        trail.rename(away)

        ct = Path(get_testdata_file("CT_small.dcm"))
        files, uids = [], []
        for i in range(3):
            f = tmp_path / f"ct{i}.dcm"
            uids.append(_with_new_uid(ct, f))
            files.append(f)
        r = storescu(s.port, files)
        out = r.stdout + r.stderr
        assert out.count("Received Store Response (Success)") == 3, out
        assert set(s.index()) >= set(uids)
        # The association's end is recorded once it is released, after storescu has its answer.
        deadline = time.monotonic() + 20
        while len(_records(held)) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        held_records = _records(held)
        kinds = [(rec["kind"], _detail(rec)["event"]) for rec in held_records]
        assert kinds == [("dicom-association", "accepted"), *[("dicom-instance", "stored")] * 3,
                         ("dicom-association", "released")], kinds
        verified = subprocess.run([str(_binary()), "audit", "verify", str(held)],
                                  capture_output=True, text=True, timeout=60)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        # The gauge is set just after a record is written to the held file (bounded wait: a
        # run read it between the two once).
        deadline = time.monotonic() + 10
        while s.metric("nightingale_audit_held_records") != 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.metric("nightingale_audit_held_records") == 5
        assert len(_records(away)) == before, "nothing reached the trail while it was down"

        away.rename(trail)
        deadline = time.monotonic() + 30
        while held.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not held.exists(), s.log()[-4000:]
        records = _records(trail)[before:]
        dicom = [rec for rec in records if rec["kind"].startswith("dicom-")]
        assert [(rec["kind"], _detail(rec)["event"]) for rec in dicom] == kinds
        for rec, was in zip(dicom, held_records):
            d = _detail(rec)
            assert int(d["held_at_ms"]) == was["unix_ms"] <= rec["unix_ms"], rec
            assert {k: v for k, v in d.items() if k != "held_at_ms"} == _detail(was)
        sent = {hashlib.sha256(uid.encode()).hexdigest() for uid in uids}
        assert {_detail(rec)["sop_instance_sha256"] for rec in dicom[1:4]} == sent
        verified = subprocess.run([str(_binary()), "audit", "verify", str(trail)],
                                  capture_output=True, text=True, timeout=60)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert s.metric("nightingale_audit_held_records") == 0

        # Back to normal: the next instance's record goes straight to the trail.
        f = tmp_path / "ct-after.dcm"
        uid = _with_new_uid(ct, f)
        r = storescu(s.port, [f])
        assert "Received Store Response (Success)" in r.stdout + r.stderr
        deadline = time.monotonic() + 20
        want = hashlib.sha256(uid.encode()).hexdigest()
        while time.monotonic() < deadline:
            last = [rec for rec in _records(trail) if _detail(rec).get("sop_instance_sha256") == want]
            if last:
                break
            time.sleep(0.1)
        assert last and "held_at_ms" not in _detail(last[0]), last
        assert not held.exists()
        assert s.alive()
    finally:
        s.stop()
