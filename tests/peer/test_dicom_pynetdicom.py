"""The DIMSE SCP against pynetdicom (PyPI), a second, scriptable SCU beside dcmtk: what a
test expects comes from pynetdicom's own view of the association (its negotiated contexts,
its rejection fields, its statuses) and from pydicom reading the files sent, never from
Nightingale.

- C-ECHO and C-STORE of a large real radiograph (pydicom-data's CR, 1955 x 1841) in PDUs
  of 4 KiB, so one object arrives as ~1,800 fragments: stored equal to what was sent;
- presentation contexts rejected one by one with PS3.8's reasons (abstract syntax not
  supported, transfer syntaxes not supported) while the others are accepted;
- an unknown calling AE against an allowlist: A-ASSOCIATE-RJ permanent, service user,
  calling AE title not recognised;
- an A-ABORT in the middle of an object: nothing stored, nothing left in the spool's
  temporary folder, and the next association stores.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

# pynetdicom is in tests/peer/requirements.txt: a missing one fails the import, not a skip.
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.pdu import A_ASSOCIATE_RJ  # noqa: E402
from pynetdicom.sop_class import CTImageStorage, Verification  # noqa: E402

from test_dicom_scp import Server, _equal_datasets, _with_new_uid  # noqa: E402

TIMEOUT_S = 30
MPEG2 = "1.2.840.10008.1.2.4.100"


def _ae(max_pdu: int = 16384) -> AE:
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = TIMEOUT_S
    ae.dimse_timeout = TIMEOUT_S
    ae.network_timeout = TIMEOUT_S
    ae.maximum_pdu_size = max_pdu
    return ae


@pytest.fixture(scope="module")
def server():
    work = Path(tempfile.mkdtemp(prefix="nightingale-pynetdicom-"))
    s = Server(work, [])
    yield s
    s.stop()
    print(s.log()[-4000:])
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def guarded_server():
    work = Path(tempfile.mkdtemp(prefix="nightingale-pynetdicom-acl-"))
    s = Server(work, ["--dicom-allowed-ae", "GOODSCU"])
    yield s
    s.stop()
    shutil.rmtree(work, ignore_errors=True)


def _radiograph() -> Path:
    """pydicom-data's CR chest radiograph (uncompressed)."""
    data_store = Path(pydicom.__file__).resolve().parent.parent / "data_store" / "data"
    path = data_store / "RG1_UNCR.dcm"
    assert path.is_file(), "pydicom-data is not installed (tests/peer/requirements.txt)"
    return path


def test_echo_and_a_large_radiograph_in_small_pdus(server, tmp_path):
    ae = _ae(max_pdu=4096)
    ae.add_requested_context(Verification)
    sent_path = tmp_path / "cr.dcm"
    uid = _with_new_uid(_radiograph(), sent_path)
    sent = pydicom.dcmread(sent_path)
    ae.add_requested_context(sent.SOPClassUID, [sent.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", server.port, ae_title="NIGHTINGALE")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        # The server's maximum PDU (16 KiB by default) limits what pynetdicom sends; ask
        # for less so the object travels in many fragments.
        status = assoc.send_c_store(sent)
        assert status.Status == 0x0000, status
    finally:
        assoc.release()
    row = server.index()[uid]
    stored = pydicom.dcmread(server.spool / row["path"])
    assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert _equal_datasets(sent, stored) == []
    assert row["calling_ae"] == "PYNETDICOM"


def test_contexts_are_rejected_one_by_one_with_their_reason(server):
    ae = _ae()
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context("1.2.826.0.1.3680043.9.999.1", [ImplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [MPEG2])
    assoc = ae.associate("127.0.0.1", server.port, ae_title="NIGHTINGALE")
    assert assoc.is_established
    try:
        accepted = [(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts]
        assert accepted == [(CTImageStorage, ExplicitVRLittleEndian)]
        # By presentation context ID (1, 3, 5 in the order requested): the acceptor's answer
        # to a rejected context carries no meaningful transfer syntax. PS3.8 9.3.3.2: 0x03
        # abstract syntax not supported, 0x04 transfer syntaxes not supported.
        rejected = {cx.context_id: (cx.abstract_syntax, cx.result) for cx in assoc.rejected_contexts}
        assert rejected == {
            3: ("1.2.826.0.1.3680043.9.999.1", 0x03),
            5: (CTImageStorage, 0x04),
        }, rejected
        # The accepted context stores.
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = generate_uid()
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()


def test_the_preferred_transfer_syntax_is_taken_whatever_the_proposed_order(server):
    """A modality listing JPEG-LS (stored, not decoded by the pipeline) before Explicit VR
    Little Endian gets Explicit VR Little Endian, as from dcmtk's storescp; a context that
    lists only JPEG-LS gets it. pynetdicom's accepted contexts say what was negotiated, and
    pynetdicom sends CT_small in it (decompression is not needed: it is uncompressed)."""
    jpeg_ls, jpeg_baseline = "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.50"
    ae = _ae()
    ae.add_requested_context(CTImageStorage, [jpeg_ls, jpeg_baseline, ExplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [jpeg_ls])
    assoc = ae.associate("127.0.0.1", server.port, ae_title="NIGHTINGALE")
    assert assoc.is_established
    try:
        accepted = {cx.context_id: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        assert accepted == {1: ExplicitVRLittleEndian, 3: jpeg_ls}, accepted
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = generate_uid()
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert server.index()[ds.SOPInstanceUID]["transfer_syntax"] == ExplicitVRLittleEndian


def test_a_request_whose_every_context_must_be_rejected_is_rejected(server):
    """No association for a request none of whose contexts can be taken: A-ASSOCIATE-RJ,
    rejected-permanent, service user, no reason given (PS3.8 9.3.4 allows this or an
    A-ASSOCIATE-AC refusing every context, which dcmtk's storescp sends), and the node serves
    the next association."""
    ae = _ae()
    ae.add_requested_context("1.2.826.0.1.3680043.9.999.1", [ImplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [MPEG2])
    received = []
    handlers = [(evt.EVT_PDU_RECV, lambda event: received.append(event.pdu))]
    assoc = ae.associate("127.0.0.1", server.port, ae_title="NIGHTINGALE", evt_handlers=handlers)
    assert not assoc.is_established
    rejections = [p for p in received if isinstance(p, A_ASSOCIATE_RJ)]
    assert len(rejections) == 1, f"PDUs received: {received}\n{server.log()}"
    rj = rejections[0]
    assert (rj.result, rj.source, rj.reason_diagnostic) == (0x01, 0x01, 0x01)
    ae = _ae()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="NIGHTINGALE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_unknown_calling_ae_is_rejected(guarded_server):
    ae = _ae()
    ae.ae_title = "STRANGER"
    ae.add_requested_context(Verification)
    # The A-ASSOCIATE-RJ PDU as pynetdicom's reactor decodes it. `assoc.is_rejected` alone is
    # not reliable: when the rejection arrives before pynetdicom's requestor thread checks the
    # socket, that thread finds the transport already closed and reports an abort instead
    # (pynetdicom 3.0.4, ~1 in 50 against a bare socket server too).
    received = []
    handlers = [(evt.EVT_PDU_RECV, lambda event: received.append(event.pdu))]
    assoc = ae.associate(
        "127.0.0.1", guarded_server.port, ae_title="NIGHTINGALE", evt_handlers=handlers
    )
    assert not assoc.is_established
    rejections = [p for p in received if isinstance(p, A_ASSOCIATE_RJ)]
    assert len(rejections) == 1, f"PDUs received: {received}\n{guarded_server.log()}"
    rj = rejections[0]
    # PS3.8 9.3.4: result 1 rejected-permanent, source 1 service-user, reason 3 calling AE
    # title not recognised.
    assert (rj.result, rj.source, rj.reason_diagnostic) == (0x01, 0x01, 0x03)
    ae.ae_title = "GOODSCU"
    assoc = ae.associate("127.0.0.1", guarded_server.port, ae_title="NIGHTINGALE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def _p_data(context_id: int, command: bool, last: bool, data: bytes) -> bytes:
    """One P-DATA-TF PDU with one PDV (PS3.8 9.3.5), written here byte by byte."""
    header = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">IBB", len(data) + 2, context_id, header) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def _c_store_rq(sop_class: str, sop_instance: str) -> bytes:
    """A C-STORE-RQ command set, encoded by pydicom (Implicit VR Little Endian)."""
    from pydicom.filewriter import write_dataset
    from pydicom.filebase import DicomBytesIO

    cmd = pydicom.Dataset()
    cmd.AffectedSOPClassUID = sop_class
    cmd.CommandField = 0x0001
    cmd.MessageID = 1
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = sop_instance

    def encode(ds: pydicom.Dataset) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, True
        write_dataset(fp, ds)
        return fp.getvalue()

    body = encode(cmd)
    group = pydicom.Dataset()
    group.CommandGroupLength = len(body)
    return encode(group) + body


def test_an_abort_in_the_middle_of_an_object_stores_nothing(server, tmp_path):
    ae = _ae()
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    src = tmp_path / "ct.dcm"
    uid = _with_new_uid(Path(get_testdata_file("CT_small.dcm")), src)
    ds = pydicom.dcmread(src)
    # The data set as it travels (Explicit VR Little Endian, no file meta).
    from pydicom.filewriter import write_dataset
    from pydicom.filebase import DicomBytesIO

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    data = fp.getvalue()

    assoc = ae.associate("127.0.0.1", server.port, ae_title="NIGHTINGALE")
    assert assoc.is_established
    cx = assoc.accepted_contexts[0].context_id
    raw = assoc.dul.socket.socket
    # The command, then half of the data set (not the last fragment), then A-ABORT.
    raw.sendall(_p_data(cx, True, True, _c_store_rq(CTImageStorage, uid)))
    raw.sendall(_p_data(cx, False, False, data[: len(data) // 2]))
    time.sleep(0.2)  # let the server take the fragment in before the abort arrives
    assoc.abort()
    assert uid not in server.index()
    tmp = server.spool / "tmp"
    deadline = time.monotonic() + TIMEOUT_S
    while any(tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(tmp.iterdir()), "a temporary file was left behind"
    # The server goes on.
    assoc = ae.associate("127.0.0.1", server.port, ae_title="NIGHTINGALE")
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert uid in server.index()
    assert server.alive()


def test_sigterm_ends_open_associations_audited_and_a_second_signal_exits_at_once(tmp_path):
    """A review's finding: on SIGTERM the SCP went on accepting associations and storing
    instances through the HTTP drain, then dropped them unaudited. Now: the open association
    is aborted between requests, with an audit record whose reason says so; the server exits
    0 promptly; every acknowledged instance is in the spool. A second SIGTERM while a slow
    HTTP client holds the drain exits at once (1) instead of after the 30 s grace."""
    import json
    import signal
    import socket

    s = Server(tmp_path, [])
    try:
        ae = _ae()
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", s.port, ae_title="NIGHTINGALE")
        assert assoc.is_established
        first = _with_new_uid(Path(get_testdata_file("CT_small.dcm")), tmp_path / "1.dcm")
        status = assoc.send_c_store(pydicom.dcmread(tmp_path / "1.dcm"))
        assert status.Status == 0x0000
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + TIMEOUT_S
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted, "the open association is aborted"
        assert s.proc.wait(timeout=TIMEOUT_S) == 0, s.log()[-3000:]
        assert first in s.index()
        records = [json.loads(line) for line in
                   (s.data / "audit" / "audit.jsonl").read_text().splitlines() if line.strip()]
        ends = [r.get("detail", "") for r in records if r.get("kind") == "dicom-association"]
        assert any("event=aborted by=local" in d and "reason=the_server_is_shutting_down" in d
                   for d in ends), ends
    finally:
        s.stop()

    # A second signal: a STOW-RS request whose body never ends holds the drain.
    again = tmp_path / "again"
    again.mkdir()
    s = Server(again, [])
    try:
        slow = socket.create_connection(("127.0.0.1", s.http_port), timeout=TIMEOUT_S)
        slow.sendall(b"POST /dicomweb/studies HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: multipart/related; type=\"application/dicom\"; boundary=b\r\n"
                     b"Content-Length: 100000\r\n\r\n--b\r\nContent-Type: application/dicom\r\n\r\n")
        time.sleep(0.5)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert s.alive(), "the first signal waits for the drain"
        started = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=10) == 1
        assert time.monotonic() - started < 10
        assert "second stop signal" in s.log()
        slow.close()
    finally:
        s.stop()
