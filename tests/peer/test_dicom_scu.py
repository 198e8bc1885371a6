"""`nightingale dicom echo|store` (the SCU) against a real peer: dcmtk's `storescp` (Debian
`dcmtk`), with pydicom's test files as the instances and pydicom as the judge.

storescp runs bit-preserving (`+B`: it writes each data set exactly as it received it), so
what it wrote must equal what was sent: the same transfer syntax, the same elements
(pydicom), and the same data set bytes (the bytes after each file's meta group). What a test
expects comes from the files sent and from storescp's output, never from Nightingale.

- every file of a folder (recursively; a non-DICOM file in it is skipped) goes over one
  association, each in its own transfer syntax, and arrives as sent;
- `dicom echo` against storescp succeeds;
- a transfer syntax storescp does not accept (its default: uncompressed only) fails that
  file alone, with the context named, and the exit code says so;
- a refused association and an unreachable host are clear errors, exit code 1;
- `serve --dicom-port` audits what storescu and `dicom store` send: UIDs as SHA-256
  (hashlib computes the expected ones), none in clear, and `audit verify` passes.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from dicom_support import binary as _binary, free_port as _free_port, tool as _tool  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 120
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}

# pydicom test files and their transfer syntaxes (checked before sending).
SENT = [
    ("CT_small.dcm", "1.2.840.10008.1.2.1"),
    ("MR_small_implicit.dcm", "1.2.840.10008.1.2"),
    ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
    ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50"),
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),
    ("SC_rgb_rle_2frame.dcm", "1.2.840.10008.1.2.5"),
    ("examples_ybr_color.dcm", "1.2.840.10008.1.2.4.50"),
    ("rtdose.dcm", "1.2.840.10008.1.2"),
    ("test-SR.dcm", "1.2.840.10008.1.2.1"),
]


class StoreScp:
    """dcmtk's storescp on a free loopback port, writing into `out`."""

    def __init__(self, work: Path, *options: str):
        self.port = _free_port()
        self.out = work / "received"
        self.out.mkdir(parents=True)
        self.log_path = work / "storescp.log"
        cmd = [_tool("storescp"), "-v", "-aet", "STORESCP", "-od", str(self.out), *options,
               str(self.port)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=PEER_ENV)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"storescp exited ({self.proc.returncode}):\n{self.log()}", pytrace=False)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        pytest.fail(f"storescp did not listen within {START_TIMEOUT_S} s", pytrace=False)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def received(self) -> dict[str, Path]:
        """SOP Instance UID → file storescp wrote."""
        out = {}
        for p in self.out.iterdir():
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            out[str(ds.SOPInstanceUID)] = p
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def work():
    d = Path(tempfile.mkdtemp(prefix="nightingale-scu-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def nightingale(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(_binary()), *args], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, env=PEER_ENV)


def _with_new_uid(src: Path, dst: Path) -> str:
    """A copy of `src` with a fresh SOP Instance UID (pydicom's test files share UIDs across
    their transfer-syntax variants, and storescp names files by it), encoded as the original."""
    ds = pydicom.dcmread(src)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.save_as(dst, enforce_file_format=True)
    return uid


def _dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta group (whose length is its first element's value)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00", path
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_length:]


def _differences(sent: pydicom.Dataset, got: pydicom.Dataset) -> list[str]:
    diffs = [str(e.tag) for e in sent if e.tag not in got or got[e.tag].value != e.value]
    diffs += [f"extra {e.tag}" for e in got if e.tag not in sent]
    return diffs


def test_echo_against_storescp(work):
    scp = StoreScp(work)
    try:
        r = nightingale("dicom", "echo", "--addr", scp.addr, "--called-ae", "STORESCP",
                        "--calling-ae", "OPSSCU")
    finally:
        scp.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok   C-ECHO"), r.stdout
    assert "status 0x0000" in r.stdout
    assert "Received Echo Request" in scp.log(), scp.log()


def test_store_a_folder_arrives_as_sent(work):
    folder = work / "send"
    (folder / "nested").mkdir(parents=True)
    sent: dict[str, tuple[Path, str]] = {}
    for i, (name, ts) in enumerate(SENT):
        src = Path(get_testdata_file(name))
        assert pydicom.dcmread(src, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
        dst = (folder / "nested" if i % 2 else folder) / name
        sent[_with_new_uid(src, dst)] = (dst, ts)
    (folder / "README.txt").write_text("not DICOM\n")

    scp = StoreScp(work, "+xa", "+B")
    try:
        r = nightingale("dicom", "store", "--addr", scp.addr, "--called-ae", "STORESCP",
                        "--calling-ae", "OPSSCU", str(folder))
    finally:
        scp.stop()
    out = r.stdout + r.stderr
    assert r.returncode == 0, out + scp.log()
    assert out.count("\nok   ") + out.startswith("ok   ") == len(SENT), out
    assert f"stored {len(SENT)} of {len(SENT)} files" in out, out
    assert "skip " in out and "README.txt" in out, out
    # One association for all of them (the readiness probe's bare connection is never
    # acknowledged).
    assert scp.log().count("Association Acknowledged") == 1, scp.log()

    received = scp.received()
    assert set(received) == set(sent), (sorted(received), sorted(sent))
    for uid, (path, ts) in sent.items():
        got = received[uid]
        meta = pydicom.dcmread(got, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == ts, path.name
        assert _differences(pydicom.dcmread(path), pydicom.dcmread(got)) == [], path.name
        assert _dataset_bytes(got) == _dataset_bytes(path), path.name


def test_a_rejected_context_fails_that_file_alone(work):
    ct = work / "ct.dcm"
    jpeg = work / "jpeg.dcm"
    ct_uid = _with_new_uid(Path(get_testdata_file("CT_small.dcm")), ct)
    _with_new_uid(Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")), jpeg)
    scp = StoreScp(work)  # default: uncompressed transfer syntaxes only
    try:
        r = nightingale("dicom", "store", "--addr", scp.addr, "--called-ae", "STORESCP",
                        str(ct), str(jpeg))
    finally:
        scp.stop()
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    assert f"ok   {ct}: status 0x0000" in out, out
    assert (f"FAIL {jpeg}: the peer rejected the presentation context "
            f"1.2.840.10008.5.1.4.1.1.7 / 1.2.840.10008.1.2.4.50") in out, out
    assert "stored 1 of 2 files" in out, out
    assert set(scp.received()) == {ct_uid}


def test_a_peer_taking_only_implicit_vr_gets_the_data_set_re_encoded(work):
    """Red-team finding: results (Explicit VR Little Endian) were offered in that syntax alone,
    so an SCP taking only DICOM's default, Implicit VR Little Endian (`storescp +xi`), got
    nothing. Now Implicit is offered beside it and the data set re-encoded when chosen."""
    ct = work / "ct.dcm"
    uid = _with_new_uid(Path(get_testdata_file("CT_small.dcm")), ct)
    assert pydicom.dcmread(ct, stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    scp = StoreScp(work, "+xi")
    try:
        r = nightingale("dicom", "store", "--addr", scp.addr, "--called-ae", "STORESCP", str(ct))
    finally:
        scp.stop()
    assert r.returncode == 0, r.stdout + r.stderr + scp.log()
    got = scp.received()[uid]
    assert pydicom.dcmread(got, stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    # Data Set Trailing Padding (FFFC,FFFC) has no meaning and may be dropped (PS3.10 7.2).
    assert [d for d in _differences(pydicom.dcmread(ct), pydicom.dcmread(got))
            if "FFFC" not in d] == [], got


def test_an_odd_deflated_stream_is_padded_and_the_data_sets_uids_are_named(work):
    """A review's findings, with pydicom's own files: image_dfl.dcm's deflated stream is 4,303
    bytes, sent without the NUL PS3.5 A.5 asks for (storescp aborted: "Odd Fragment Length");
    rtplan.dcm's meta names another SOP Instance UID than its data set, and the command named
    the meta's (storescp refused 0xA900; storescu names the data set's)."""
    deflated = Path(get_testdata_file("image_dfl.dcm"))
    rtplan = Path(get_testdata_file("rtplan.dcm"))
    assert len(_dataset_bytes(deflated)) % 2 == 1
    plan = pydicom.dcmread(rtplan, stop_before_pixels=True)
    assert plan.file_meta.MediaStorageSOPInstanceUID != plan.SOPInstanceUID
    scp = StoreScp(work, "+xa", "+B")
    try:
        r = nightingale("dicom", "store", "--addr", scp.addr, "--called-ae", "STORESCP",
                        str(deflated), str(rtplan))
    finally:
        scp.stop()
    assert r.returncode == 0, r.stdout + r.stderr + scp.log()
    received = scp.received()
    got = received[str(pydicom.dcmread(deflated, stop_before_pixels=True).SOPInstanceUID)]
    assert _dataset_bytes(got) == _dataset_bytes(deflated) + b"\0"
    assert _differences(pydicom.dcmread(deflated), pydicom.dcmread(got)) == []
    got = received[str(plan.SOPInstanceUID)]
    assert _dataset_bytes(got) == _dataset_bytes(rtplan)


def test_a_malformed_file_re_encoded_for_an_implicit_peer_fails_alone(work):
    """A re-attack's finding: re-encoded for a peer taking Implicit VR only (`storescp +xi`),
    a 108 KB file of 3,000 nested sequences overflowed the SCU's stack (the whole run
    aborted, later files never sent). Its structure is checked first: it fails alone."""
    ct = work / "ct.dcm"
    uid = _with_new_uid(Path(get_testdata_file("CT_small.dcm")), ct)
    raw = ct.read_bytes()
    group_length = int.from_bytes(raw[140:144], "little")
    deep_set = bytearray(b"\x08\x00\x06\x00SQ\x00\x00\xff\xff\xff\xff")
    for _ in range(3000):
        deep_set += b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
        deep_set += b"\x08\x00\x06\x00SQ\x00\x00\xff\xff\xff\xff"
    deep = work / "deep.dcm"
    deep.write_bytes(raw[:144 + group_length] + bytes(deep_set))
    # A valid file with a private UN of undefined length (Implicit VR inside, PS3.5 6.2.2):
    # the re-encoder read it as Explicit VR, took 1.1 GB and failed, or sent other content.
    un_item = (b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + b"\x08\x00\x00\x01\x06\x00\x00\x00CODE01"
               + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00")
    un_set = (b"\x15\x00\x10\x00LO\x04\x00ACME" + b"\x15\x00\x10\x10UN\x00\x00\xff\xff\xff\xff"
              + un_item + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    private = work / "private-un.dcm"
    private.write_bytes(raw + un_set)
    scp = StoreScp(work, "+xi")
    try:
        r = nightingale("dicom", "store", "--addr", scp.addr, "--called-ae", "STORESCP",
                        str(deep), str(private), str(ct))
    finally:
        scp.stop()
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "overflow" not in out, out
    assert f"FAIL {deep}" in out and "malformed" in out, out
    assert f"FAIL {private}" in out and "UN element of undefined length" in out, out
    assert f"ok   {ct}" in out, out
    assert set(scp.received()) == {uid}


def test_refused_association_and_unreachable_host_are_clear_errors(work):
    scp = StoreScp(work, "--refuse")
    try:
        r = nightingale("dicom", "echo", "--addr", scp.addr, "--called-ae", "STORESCP")
    finally:
        scp.stop()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "association rejected" in r.stdout, r.stdout

    port = _free_port()
    r = nightingale("dicom", "echo", "--addr", f"127.0.0.1:{port}", "--connect-timeout-secs", "5")
    assert r.returncode == 1
    assert f"cannot connect to 127.0.0.1:{port}" in r.stdout, r.stdout

    ct = work / "ct.dcm"
    _with_new_uid(Path(get_testdata_file("CT_small.dcm")), ct)
    r = nightingale("dicom", "store", "--addr", f"127.0.0.1:{port}", str(ct))
    assert r.returncode == 1
    assert f"FAIL {ct}: cannot connect" in r.stdout, r.stdout


def test_serve_audits_what_dcmtk_and_the_scu_store(work):
    """`serve --dicom-port`: an instance from dcmtk's storescu and one from `dicom store`
    each leave a `dicom-instance` record whose UIDs are SHA-256 hashes (computed here with
    hashlib from the UIDs sent), no UID in clear, and `audit verify` passes."""
    import hashlib
    import json

    port, http_port = _free_port(), _free_port()
    data = work / "data"
    models = work / "models"
    models.mkdir()
    err_path = work / "serve.log"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([str(_binary()), "serve", "--repository", str(models),
                                 "--http-addr", f"127.0.0.1:{http_port}", "--data-dir", str(data),
                                 "--dicom-port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "listening (DICOM)" not in err_path.read_text(errors="replace"):
            assert proc.poll() is None, err_path.read_text(errors="replace")
            assert time.monotonic() < deadline, err_path.read_text(errors="replace")
            time.sleep(0.1)
        a, b = work / "a.dcm", work / "b.dcm"
        uid_a = _with_new_uid(Path(get_testdata_file("CT_small.dcm")), a)
        uid_b = _with_new_uid(Path(get_testdata_file("MR_small.dcm")), b)
        r = subprocess.run([_tool("storescu"), "-aet", "PEERSCU", "-aec", "NIGHTINGALE",
                            "127.0.0.1", str(port), str(a)],
                           capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=PEER_ENV)
        assert r.returncode == 0, r.stdout + r.stderr
        r = nightingale("dicom", "store", "--addr", f"127.0.0.1:{port}", "--called-ae",
                        "NIGHTINGALE", "--calling-ae", "OPSSCU", str(b))
        assert r.returncode == 0, r.stdout + r.stderr
        audit = data / "audit" / "audit.jsonl"
        # Instance records are written before the C-STORE is answered; the release records
        # follow the release: wait (bounded) for both.
        deadline = time.monotonic() + 30
        while True:
            records = [json.loads(l) for l in audit.read_text().splitlines()]
            released = [r for r in records if r["kind"] == "dicom-association"
                        and "event=released" in r.get("detail", "")]
            if len(released) == 2:
                break
            assert time.monotonic() < deadline, records
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    instances = [r for r in records if r["kind"] == "dicom-instance"]
    assert len(instances) == 2, instances
    for record, uid, path, actor in [(instances[0], uid_a, a, "PEERSCU@127.0.0.1"),
                                     (instances[1], uid_b, b, "OPSSCU@127.0.0.1")]:
        sent = pydicom.dcmread(path)
        fields = dict(kv.split("=", 1) for kv in record["detail"].split(" "))
        assert record["actor"] == actor
        assert record["status"] == 0 and record["outcome"] == "ok"
        assert fields["event"] == "stored"
        assert fields["sop_class"] == sent.SOPClassUID
        assert fields["sop_instance_sha256"] == hashlib.sha256(uid.encode()).hexdigest()
        assert fields["study_sha256"] == hashlib.sha256(sent.StudyInstanceUID.encode()).hexdigest()
        assert fields["series_sha256"] == hashlib.sha256(sent.SeriesInstanceUID.encode()).hexdigest()
        assert fields["transfer_syntax"] == sent.file_meta.TransferSyntaxUID
    text = audit.read_text()
    for path in (a, b):
        sent = pydicom.dcmread(path)
        for uid in (sent.SOPInstanceUID, sent.StudyInstanceUID, sent.SeriesInstanceUID):
            assert str(uid) not in text, uid
    r = nightingale("audit", "verify", str(audit))
    assert r.returncode == 0 and "hash chain intact" in r.stdout, r.stdout + r.stderr


def test_a_file_the_peer_aborts_on_does_not_stop_the_rest(work):
    """pydicom's SC_rgb_jpeg.dcm (Implicit VR data under an Explicit VR transfer syntax)
    makes storescp abort the association; the files after it go on a new association, as
    storescu goes on past a bad file (a red-team finding: every later file was not sent)."""
    first, bad, last = work / "1-ct.dcm", work / "2-bad.dcm", work / "3-mr.dcm"
    ct_uid = _with_new_uid(Path(get_testdata_file("CT_small.dcm")), first)
    shutil.copyfile(get_testdata_file("SC_rgb_jpeg.dcm"), bad)
    mr_uid = _with_new_uid(Path(get_testdata_file("MR_small.dcm")), last)
    scp = StoreScp(work, "+xa")
    try:
        r = nightingale("dicom", "store", "--addr", scp.addr, "--called-ae", "STORESCP",
                        str(first), str(bad), str(last))
    finally:
        scp.stop()
    out = r.stdout + r.stderr
    assert r.returncode == 1, out + scp.log()
    assert f"ok   {first}: status 0x0000" in out, out
    assert f"ok   {last}: status 0x0000" in out, out
    assert f"FAIL {bad}" in out, out
    assert "stored 2 of 3 files" in out, out
    assert set(scp.received()) == {ct_uid, mr_uid}
