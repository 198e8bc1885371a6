"""DICOMweb against a real peer: `dicomweb-client` (the PyPI package) stores pydicom's test
files over STOW-RS and searches them over QIDO-RS; pydicom is the judge.

The server runs with `--dicom-spool DIR` and no DIMSE port: DICOMweb is on whenever the
spool is. What a test expects comes from the files sent (read by pydicom), never from
Nightingale:

- every instance dicomweb-client stores is referenced in the Store Instances Response, listed
  in the spool's index with the transfer syntax it was sent in, and stored as a `.dcm` file
  whose data set equals (element by element, pydicom) the one sent;
- QIDO-RS (search_for_studies / series / instances) lists exactly the studies, series and
  instances pydicom reads from the files, with their counts;
- a wrong media type is 415, a body that ends early 400 with nothing stored, and the server
  keeps serving.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_support import free_port as _free_port, spool_index, stop  # noqa: E402
from test_dicom_scp import SENT, _binary, _equal_datasets, _test_sets, _with_new_uid

START_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 120


class Server:
    def __init__(self, workdir: Path):
        self.http_port = _free_port()
        self.spool = workdir / "spool"
        repo = workdir / "models"
        repo.mkdir()
        self.stderr = workdir / "stderr.log"
        cmd = [str(_binary()), "serve", "--repository", str(repo),
               "--http-addr", f"127.0.0.1:{self.http_port}", "--data-dir", str(workdir / "data"),
               "--dicom-spool", str(self.spool)]
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited ({self.proc.returncode}):\n{self.log()}", pytrace=False)
            if "DICOMweb on" in self.log() and "listening (KServe v2 HTTP)" in self.log():
                return
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"DICOMweb not up within {START_TIMEOUT_S} s:\n{self.log()}", pytrace=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicomweb"

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def stop(self) -> None:
        stop(self.proc)

    def index(self) -> dict[str, dict]:
        return spool_index(self.spool)


@pytest.fixture(scope="module")
def server():
    work = Path(tempfile.mkdtemp(prefix="nightingale-dicomweb-"))
    s = Server(work)
    yield s
    s.stop()
    print(s.log()[-4000:])
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def sent(server, tmp_path_factory) -> list[pydicom.Dataset]:
    """pydicom's test files (every transfer syntax of test_dicom_scp's list), each with a
    fresh SOP Instance UID, stored by dicomweb-client in one STOW-RS request."""
    out = tmp_path_factory.mktemp("sent")
    datasets = []
    for name, _ts, _opt in SENT:
        dst = out / name
        _with_new_uid(Path(get_testdata_file(name)), dst)
        datasets.append(pydicom.dcmread(dst))
    client = DICOMwebClient(url=server.url)
    response = client.store_instances(datasets=datasets)
    referenced = [item.ReferencedSOPInstanceUID for item in response.ReferencedSOPSequence]
    assert referenced == [ds.SOPInstanceUID for ds in datasets]
    assert "FailedSOPSequence" not in response
    return datasets


def test_stored_instances_are_indexed_and_equal_to_what_was_sent(server, sent):
    index = server.index()
    for ds in sent:
        row = index[ds.SOPInstanceUID]
        assert row["study_uid"] == ds.StudyInstanceUID
        assert row["series_uid"] == ds.SeriesInstanceUID
        assert row["sop_class_uid"] == ds.SOPClassUID
        assert row["transfer_syntax"] == ds.file_meta.TransferSyntaxUID
        assert row["calling_ae"] == "STOW-RS"
        stored = pydicom.dcmread(server.spool / row["path"])
        assert stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert _equal_datasets(ds, stored) == [], ds.SOPInstanceUID


def test_qido_lists_what_pydicom_reads(server, sent):
    client = DICOMwebClient(url=server.url)
    per_study = Counter(ds.StudyInstanceUID for ds in sent)
    series_of = {}
    for ds in sent:
        series_of.setdefault(ds.StudyInstanceUID, Counter())[ds.SeriesInstanceUID] += 1

    studies = client.search_for_studies()
    found = {s["0020000D"]["Value"][0]: s for s in studies}
    assert set(found) == set(per_study)
    for uid, study in found.items():
        assert study["00201208"]["Value"][0] == per_study[uid]
        assert study["00201206"]["Value"][0] == len(series_of[uid])

    for study_uid, series_counts in series_of.items():
        series = client.search_for_series(study_instance_uid=study_uid)
        assert {s["0020000E"]["Value"][0]: s["00201209"]["Value"][0] for s in series} == dict(series_counts)
        for series_uid in series_counts:
            instances = client.search_for_instances(
                study_instance_uid=study_uid, series_instance_uid=series_uid)
            expected = {ds.SOPInstanceUID: ds for ds in sent
                        if ds.StudyInstanceUID == study_uid and ds.SeriesInstanceUID == series_uid}
            got = {i["00080018"]["Value"][0]: i for i in instances}
            assert set(got) == set(expected)
            for uid, item in got.items():
                assert item["00080016"]["Value"][0] == expected[uid].SOPClassUID
                assert item["00083002"]["Value"][0] == expected[uid].file_meta.TransferSyntaxUID

    one = sent[0]
    hits = client.search_for_instances(search_filters={"SOPInstanceUID": one.SOPInstanceUID})
    assert [i["00080018"]["Value"][0] for i in hits] == [one.SOPInstanceUID]


def _secondary_capture(study: str, series: str) -> pydicom.Dataset:
    """A 2 x 2 Secondary Capture built in code (a new SOP Instance UID), with its file meta
    as pydicom 3 makes it (no group length)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = "OT"
    ds.Rows, ds.Columns = 2, 2
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes([0, 64, 128, 255])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _value(item: dict, tag: str):
    values = item.get(tag, {}).get("Value")
    return values[0] if values else None


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    """The first value of a text attribute as the file has it, padding removed."""
    if keyword not in ds or ds[keyword].value in (None, ""):
        return None
    raw = ds[keyword].value
    first = raw[0] if isinstance(raw, pydicom.multival.MultiValue) else raw
    text = str(getattr(first, "original_string", first) or "")
    if isinstance(text, bytes):
        text = text.decode("ascii")
    return text.strip(" \0") or None


def _expected_attributes(ds: pydicom.Dataset) -> dict:
    """What QIDO-RS should answer for one instance, read by pydicom and checked against
    PS3.5's rules for each VR here (a value the standard does not allow is expected absent)."""
    import datetime
    import re

    modality = _text(ds, "Modality")
    if modality is not None and not re.fullmatch(r"[A-Z0-9_ ]{1,16}", modality):
        modality = None
    date = _text(ds, "StudyDate")
    if date is not None:
        date = date.replace(".", "") if re.fullmatch(r"\d{4}\.\d{2}\.\d{2}", date) else date
        try:
            datetime.datetime.strptime(date, "%Y%m%d")
            assert len(date) == 8
        except (ValueError, AssertionError):
            date = None
    time_ = _text(ds, "StudyTime")
    if time_ is not None:
        time_ = time_.replace(":", "")
        m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?", time_)
        ok = bool(m) and int(m.group(1)) < 24 and (m.group(2) is None or int(m.group(2)) < 60) \
            and (m.group(3) is None or int(m.group(3)) < 61) \
            and (m.group(4) is None or m.group(3) is not None)
        time_ = time_ if ok else None

    def integer(keyword):
        v = _text(ds, keyword)
        return int(v) if v is not None and re.fullmatch(r"[+-]?\d{1,11}", v) else None

    frames = integer("NumberOfFrames")
    return {
        "00080060": modality,
        "00080020": date,
        "00080030": time_,
        "00200011": integer("SeriesNumber"),
        "00200013": integer("InstanceNumber"),
        "00280010": int(ds.Rows) if "Rows" in ds else None,
        "00280011": int(ds.Columns) if "Columns" in ds else None,
        "00280008": frames if frames is not None and frames >= 0 else None,
    }


def test_qido_answers_and_matches_the_attributes_pydicom_reads(server, sent):
    """Modality, study date and time, series and instance numbers and the image size, as
    pydicom reads them from the files sent; and matching on them (Modality,
    ModalitiesInStudy, StudyDate single and range, SeriesNumber, InstanceNumber)."""
    client = DICOMwebClient(url=server.url)
    expected = {ds.SOPInstanceUID: _expected_attributes(ds) for ds in sent}
    assert any(e["00080060"] for e in expected.values()), "no modality in the test set"
    instances = client.search_for_instances()
    assert {_value(i, "00080018") for i in instances} == set(expected)
    for item in instances:
        want = expected[_value(item, "00080018")]
        got = {tag: _value(item, tag) for tag in want}
        assert got == want, _value(item, "00080018")

    by_study: dict[str, list[dict]] = {}
    for ds in sent:
        by_study.setdefault(ds.StudyInstanceUID, []).append(expected[ds.SOPInstanceUID])
    for study in client.search_for_studies():
        rows = by_study[_value(study, "0020000D")]
        modalities = sorted({r["00080060"] for r in rows if r["00080060"]})
        assert study.get("00080061", {}).get("Value", []) == modalities
        dates = sorted(r["00080020"] for r in rows if r["00080020"])
        assert _value(study, "00080020") == (dates[0] if dates else None)

    # Matching: each answer equals the selection pydicom's values give.
    def series_where(pred):
        return {(ds.StudyInstanceUID, ds.SeriesInstanceUID) for ds in sent
                if pred(expected[ds.SOPInstanceUID])}

    def series_keys(found):
        return {(_value(s, "0020000D"), _value(s, "0020000E")) for s in found}

    modality = sorted({e["00080060"] for e in expected.values() if e["00080060"]})[0]
    got = client.search_for_series(search_filters={"Modality": modality})
    assert series_keys(got) == series_where(lambda e: e["00080060"] == modality)
    assert all(_value(s, "00080060") == modality for s in got)
    pattern = modality[0] + "*"
    got = client.search_for_series(search_filters={"Modality": pattern})
    assert series_keys(got) == series_where(
        lambda e: (e["00080060"] or "").startswith(modality[0]))

    got = client.search_for_studies(search_filters={"ModalitiesInStudy": modality})
    assert {_value(s, "0020000D") for s in got} == {
        uid for uid, rows in by_study.items() if any(r["00080060"] == modality for r in rows)}

    dates = sorted({e["00080020"] for e in expected.values() if e["00080020"]})
    assert len(dates) >= 2, "the test set needs two study dates"
    for query, keep in [
        (dates[0], lambda d: d == dates[0]),
        (f"-{dates[1]}", lambda d: d <= dates[1]),
        (f"{dates[1]}-", lambda d: d >= dates[1]),
        (f"{dates[0]}-{dates[-1]}", lambda d: dates[0] <= d <= dates[-1]),
    ]:
        got = client.search_for_studies(search_filters={"StudyDate": query})
        want = {uid for uid, rows in by_study.items()
                if any(r["00080020"] and keep(r["00080020"]) for r in rows)}
        assert {_value(s, "0020000D") for s in got} == want, query

    number = next(e["00200011"] for e in expected.values() if e["00200011"] is not None)
    got = client.search_for_series(search_filters={"SeriesNumber": str(number)})
    assert series_keys(got) == series_where(lambda e: e["00200011"] == number)
    number = next(e["00200013"] for e in expected.values() if e["00200013"] is not None)
    got = client.search_for_instances(search_filters={"InstanceNumber": str(number)})
    assert {_value(i, "00080018") for i in got} == {
        uid for uid, e in expected.items() if e["00200013"] == number}

    # Malformed keys are refused with the reason; nothing about them is matched.
    for params in [{"StudyDate": "2020-01-01"}, {"StudyDate": "20201301"},
                   {"StudyDate": "20200102-20200101"}, {"Modality": "ct"},
                   {"Modality": "C[T]"}, {"SeriesNumber": "one"}]:
        r = requests.get(f"{server.url}/series", params=params, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 400, (params, r.status_code, r.text)
        assert next(iter(params)) in r.text


def test_bad_requests_are_refused_and_the_server_keeps_serving(server, sent, tmp_path):
    before = server.index()
    src = tmp_path / "ct.dcm"
    _with_new_uid(Path(get_testdata_file("CT_small.dcm")), src)
    data = src.read_bytes()
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
            + f"\r\n--{boundary}--\r\n".encode())
    url = f"{server.url}/studies"
    r = requests.post(url, data=body, headers={"Content-Type": "application/octet-stream"},
                      timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 415, r.text
    related = f'multipart/related; type="application/dicom"; boundary={boundary}'
    r = requests.post(url, data=body[:-10], headers={"Content-Type": related}, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 400, r.text
    r = requests.post(url, data=body, headers={"Content-Type": "multipart/related"},
                      timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 400, r.text
    assert server.index() == before

    # A truncated instance is refused with a failure reason; the server keeps serving.
    cut = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data[:-100]
           + f"\r\n--{boundary}--\r\n".encode())
    r = requests.post(url, data=cut, headers={"Content-Type": related}, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 409, r.text
    assert r.headers["Content-Type"] == "application/dicom+json"
    failed = r.json()["00081198"]["Value"]
    assert failed[0]["00081197"]["Value"][0] == 0xC000
    assert server.index() == before

    r = requests.post(url, data=body, headers={"Content-Type": related}, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert pydicom.dcmread(src).SOPInstanceUID in server.index()


def test_a_study_url_refuses_instances_of_another_study(server, sent, tmp_path):
    src = tmp_path / "mr.dcm"
    _with_new_uid(Path(get_testdata_file("MR_small.dcm")), src)
    ds = pydicom.dcmread(src)
    client = DICOMwebClient(url=server.url)
    other_study = generate_uid()
    with pytest.raises(requests.HTTPError) as refused:
        client.store_instances(datasets=[ds], study_instance_uid=other_study)
    assert refused.value.response.status_code == 409
    failed = refused.value.response.json()["00081198"]["Value"][0]
    assert failed["00081155"]["Value"][0] == ds.SOPInstanceUID
    assert failed["00081197"]["Value"][0] == 0xA900
    assert ds.SOPInstanceUID not in server.index()
    response = client.store_instances(datasets=[ds], study_instance_uid=ds.StudyInstanceUID)
    assert response.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID


def test_a_study_date_match_answers_the_whole_study(server):
    """StudyDate is a study attribute (PS3.4 C.6.1.1.4): a study that matches is answered
    with all its series and instances, and its modalities, whatever each instance's own
    (Type 2, possibly empty) StudyDate; the series and instance levels list every one of a
    matching study's. Orthanc answers the same. (Red-team finding: the counts, and
    ModalitiesInStudy, were of the instances that carried the date only.)"""
    client = DICOMwebClient(url=server.url)
    study = generate_uid()
    for date, modality in [("20200101", "CT"), ("", "OT")]:
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = date
        ds.Modality = modality
        client.store_instances(datasets=[ds])
    for query in [{}, {"StudyDate": "20200101"}, {"StudyDate": "20191231-20200102"}]:
        [row] = requests.get(f"{server.url}/studies", timeout=30,
                             params={"StudyInstanceUID": study, **query}).json()
        assert row["00080061"]["Value"] == ["CT", "OT"], (query, row)
        assert row["00201206"]["Value"] == [2] and row["00201208"]["Value"] == [2], (query, row)
        assert row["00080020"]["Value"] == ["20200101"], row
        series = client.search_for_series(study_instance_uid=study, search_filters=query)
        assert len(series) == 2, (query, series)
        instances = client.search_for_instances(study_instance_uid=study, search_filters=query)
        assert len(instances) == 2, (query, instances)
        # Every level answers the study's date, the one it matched on (not each row's own).
        for item in series + instances:
            assert item["00080020"]["Value"] == ["20200101"], item
    for other in ["20200102", "-20191231"]:
        assert requests.get(f"{server.url}/studies", timeout=30,
                            params={"StudyInstanceUID": study, "StudyDate": other}).json() == []


ANY_SYNTAX = (("application/dicom", "*"),)


def test_wado_rs_retrieves_every_study_and_series_as_sent(server, sent):
    """dicomweb-client's retrieve_study and retrieve_series get back every instance it stored,
    each in the transfer syntax it was sent in (Implicit VR Little Endian, not used on the web
    by PS3.18 8.7.3.5.2, re-encoded in Explicit VR Little Endian) and equal to it element by
    element (pydicom); nothing of another study or series comes with them."""
    client = DICOMwebClient(url=server.url)
    by_study: dict[str, dict[str, pydicom.Dataset]] = {}
    for ds in sent:
        by_study.setdefault(ds.StudyInstanceUID, {})[ds.SOPInstanceUID] = ds
    for study, expected in by_study.items():
        got = {ds.SOPInstanceUID: ds for ds in client.retrieve_study(study, media_types=ANY_SYNTAX)}
        assert set(expected) <= set(got), study
        assert {ds.StudyInstanceUID for ds in got.values()} == {study}
        # Other tests of this module may store more instances of the same study; the server
        # lists exactly what it sends.
        assert len(got) == len(client.search_for_instances(study_instance_uid=study))
        for uid, ds in expected.items():
            want = ds.file_meta.TransferSyntaxUID
            if want == "1.2.840.10008.1.2":
                want = "1.2.840.10008.1.2.1"
            assert got[uid].file_meta.TransferSyntaxUID == want, uid
            assert _equal_datasets(ds, got[uid]) == [], uid
        for series in {ds.SeriesInstanceUID for ds in expected.values()}:
            part = client.retrieve_series(study, series, media_types=ANY_SYNTAX)
            assert {ds.SeriesInstanceUID for ds in part} == {series}
            want = {u for u, ds in expected.items() if ds.SeriesInstanceUID == series}
            assert want <= {ds.SOPInstanceUID for ds in part}


def test_an_implicit_vr_instance_is_re_encoded_value_for_value(server, tmp_path):
    """An instance stored in Implicit VR Little Endian comes back from WADO-RS in Explicit VR
    Little Endian (PS3.18 8.7.3.5.2) with every value pydicom reads equal to the file sent,
    including what a decode/encode pass got wrong: Latin-1 text (ISO_IR 100), a private block,
    nested sequences, and a 70,000-character LT, over Explicit VR's 16-bit length for LT: sent
    as UN (PS3.5 6.2.2), which pydicom reads as the same bytes. Asked for Implicit by name, it
    comes back as stored."""
    long_text = 0x00204000
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for attr in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, attr, generate_uid())
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "M\u00fcller^J\u00f6rg"
    ds.ImageComments = "x" * 70_000
    block = ds.private_block(0x0029, "NIGHTINGALE TEST", create=True)
    block.add_new(0x01, "LO", "private value")
    code = pydicom.Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "121311", "DCM", "Localizer"
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = generate_uid()
    ref.PurposeOfReferenceCodeSequence = [code]
    ds.ReferencedImageSequence = [ref]
    path = tmp_path / "implicit.dcm"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    ds.save_as(path, enforce_file_format=True)
    sent = pydicom.dcmread(path)
    assert sent.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    client = DICOMwebClient(url=server.url)
    client.store_instances(datasets=[sent])
    uids = (sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID)
    for media_types in (None, ANY_SYNTAX, (("application/dicom", "1.2.840.10008.1.2.1"),)):
        got = client.retrieve_instance(*uids, media_types=media_types)
        assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1", media_types
        assert _equal_datasets(sent, got) == [str(pydicom.tag.Tag(long_text))], media_types
        assert got.PatientName == "M\u00fcller^J\u00f6rg"
        assert (got[long_text].VR, got[long_text].value) == ("UN", b"x" * 70_000)
        study = client.retrieve_study(sent.StudyInstanceUID, media_types=media_types)
        assert [d.file_meta.TransferSyntaxUID for d in study] == ["1.2.840.10008.1.2.1"]
        assert _equal_datasets(sent, study[0]) == [str(pydicom.tag.Tag(long_text))]
        assert study[0][long_text].value == b"x" * 70_000
    # dicomweb-client will not ask for Implicit VR (not a web syntax): asked by hand.
    r = requests.get(
        f"{server.url}/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}",
        headers={"Accept": 'multipart/related; type="application/dicom"; '
                           "transfer-syntax=1.2.840.10008.1.2"},
        timeout=HTTP_TIMEOUT_S,
    )
    assert r.status_code == 200, r.text
    boundary = r.headers["Content-Type"].split("boundary=")[1].strip('"').encode()
    part = r.content.split(b"--" + boundary)[1]
    headers, body = part.split(b"\r\n\r\n", 1)
    assert b"transfer-syntax=1.2.840.10008.1.2\r\n" in headers + b"\r\n", headers
    as_stored = pydicom.dcmread(io.BytesIO(body[: -len(b"\r\n")]))
    assert as_stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert _equal_datasets(sent, as_stored) == []


def test_every_implicit_vr_instance_of_pydicoms_test_sets_comes_back_equal(server, tmp_path):
    """Each file of pydicom's and pydicom-data's test sets in an uncompressed syntax (with the
    UIDs a spool needs), written in Implicit VR Little Endian by pydicom where it is in
    another, is stored over STOW-RS, retrieved over WADO-RS re-encoded in Explicit VR Little
    Endian, and read by pydicom equal to the file sent, element by element."""
    uncompressed = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
    client = DICOMwebClient(url=server.url)
    checked, as_stored = 0, []
    for src in _test_sets():
        try:
            ds = pydicom.dcmread(src)
        except Exception:
            continue  # not a DICOM file, or one pydicom cannot read
        meta = getattr(ds, "file_meta", None)
        needed = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        if meta is None or meta.get("TransferSyntaxUID") not in uncompressed:
            continue
        if not all(k in ds for k in needed) or ds.SOPClassUID == "1.2.840.10008.1.3.10":
            continue
        dst = tmp_path / f"{src.parent.name}-{src.name}"
        try:
            _with_new_uid(src, dst)
            sent = pydicom.dcmread(dst)
            if sent.file_meta.TransferSyntaxUID != "1.2.840.10008.1.2":
                sent.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
                sent.save_as(dst, enforce_file_format=True)
                sent = pydicom.dcmread(dst)
            client.store_instances(datasets=[sent])
        except requests.HTTPError:
            continue  # refused by the spool (a file the test sets keep broken on purpose)
        except Exception:
            continue  # pydicom cannot write it back
        got = client.retrieve_instance(
            sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID)
        if got.file_meta.TransferSyntaxUID != "1.2.840.10008.1.2.1":
            as_stored.append(src.name)
        assert _equal_datasets(sent, got) == [], src
        checked += 1
    assert checked >= 50, checked  # 56 with pydicom 3.0 and pydicom-data
    # Every one comes back re-encoded. (rtplan_truncated.dcm, which ends inside a sequence
    # item whose length runs past the file, is refused at STOW since the ingest check walks
    # Implicit VR sequences of defined length: it was stored, then sent as stored.)
    assert as_stored == [], as_stored


def test_wado_rs_refuses_what_it_cannot_send(server, sent):
    study = sent[0].StudyInstanceUID
    base = f"{server.url}/studies"
    r = requests.get(f"{base}/{generate_uid()}", timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 404, r.text
    # Letters, digits, dots, '-' and '_' name a stored UID (some senders write letters);
    # anything else, or more than 64 characters, is no UID.
    for bad in ["not%20a%20uid", "1.2%2F3", "1" * 65]:
        r = requests.get(f"{base}/{bad}", timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 400, (bad, r.text)
    r = requests.get(f"{base}/1.2.ABC-9", timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 404, r.text
    # A transfer syntax some of the study's instances are not stored in: no transcoding.
    syntaxes = {ds.file_meta.TransferSyntaxUID for ds in sent if ds.StudyInstanceUID == study}
    other = "1.2.840.10008.1.2.4.50" if "1.2.840.10008.1.2.4.50" not in syntaxes else "1.2.840.10008.1.2"
    r = requests.get(
        f"{base}/{study}",
        headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={other}'},
        timeout=HTTP_TIMEOUT_S,
    )
    assert r.status_code == 406, r.text
    assert requests.get(f"{server.url}/studies", timeout=HTTP_TIMEOUT_S).status_code == 200


def test_a_data_set_built_in_code_is_stored_as_dicomweb_client_sends_it(server):
    """pydicom 3 writes a data set built in code without its preamble and without (0002,0000)
    unless told otherwise, and dicomweb-client's store_instances sends what it writes: every
    such instance was refused 0xC000 (a red-team finding; dcmtk reads both). Stored, found,
    and retrieved equal to what was built."""
    ds = _secondary_capture(generate_uid(), generate_uid())
    assert "FileMetaInformationGroupLength" not in ds.file_meta
    client = DICOMwebClient(url=server.url)
    answer = client.store_instances([ds])
    stored = [str(item.ReferencedSOPInstanceUID) for item in answer.ReferencedSOPSequence]
    assert stored == [ds.SOPInstanceUID], answer
    got = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                   media_types=ANY_SYNTAX)
    assert got.PixelData == ds.PixelData
    assert _equal_datasets(ds, got) == []


# Files in the spool without their index rows: indexed again at the next start.
UNINDEXED_FILES = 300


def test_listening_while_start_up_is_slow(tmp_path):
    """Start-up's slow steps (here a JWKS URL whose server accepts and never answers, within
    a 60 s fetch deadline; a spool found without its index is another) run while the server
    listens: live 200, ready 503, every other route 503 "starting" with Retry-After; a
    SIGHUP is logged and ignored, and a SIGTERM stops it at once (it answered nothing until
    start-up was done, a SIGHUP ended it with status 129, and a SIGTERM waited: a review's
    finding). The next start indexes the spool's files, and QIDO-RS finds each instance, UIDs
    as pydicom wrote them."""
    import signal
    import socket
    import threading

    spool = tmp_path / "spool"
    folder = spool / "instances" / "unindexed"
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    uids = set()
    for i in range(UNINDEXED_FILES):
        ds = _secondary_capture(study, series)
        ds.InstanceNumber = i + 1
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
        uids.add(ds.SOPInstanceUID)
    (tmp_path / "models").mkdir()

    # The JWKS server: accepts, reads nothing, answers nothing.
    stall = socket.socket()
    stall.bind(("127.0.0.1", 0))
    stall.listen(8)
    held = []
    done = threading.Event()

    def hold():
        stall.settimeout(0.2)
        while not done.is_set():
            try:
                held.append(stall.accept()[0])
            except OSError:
                pass

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [str(_binary()), "serve", "--repository", str(tmp_path / "models"),
           "--http-addr", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data"),
           "--dicom-spool", str(spool)]
    stalled = ["--cds-trust", f"https://ehr.example.org=http://127.0.0.1:{stall.getsockname()[1]}/jwks.json",
               "--cds-fetch-timeout-ms", "60000"]
    log_path = tmp_path / "first.log"

    def log() -> str:
        return log_path.read_text(errors="replace")

    def live() -> bool:
        try:
            return requests.get(f"{base}/v2/health/live", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    with open(log_path, "wb") as err:
        proc = subprocess.Popen(cmd + stalled, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (live() and held):
            assert proc.poll() is None, log()
            assert time.monotonic() < deadline, f"not live within {START_TIMEOUT_S} s:\n{log()}"
            time.sleep(0.05)
        assert requests.get(f"{base}/v2/health/ready", timeout=5).status_code == 503
        assert requests.get(f"{base}/metrics", timeout=5).status_code == 200
        for path in ["/dicomweb/studies", "/cds-services", "/v2"]:
            r = requests.get(f"{base}{path}", timeout=5)
            assert r.status_code == 503 and "starting" in r.json()["error"], (path, r.text)
            assert r.headers["Retry-After"] == "5"
        proc.send_signal(signal.SIGHUP)
        wait_deadline = time.monotonic() + 10
        while "SIGHUP" not in log():
            assert proc.poll() is None, f"SIGHUP ended the server ({proc.returncode}):\n{log()}"
            assert time.monotonic() < wait_deadline, f"SIGHUP not logged:\n{log()}"
            time.sleep(0.05)
        assert proc.poll() is None and live(), log()
        proc.send_signal(signal.SIGTERM)
        # Well within the JWKS fetch's 60 s deadline.
        assert proc.wait(timeout=20) == 0, log()
        assert "stopped during start-up" in log(), log()
        assert "DICOM spool open" not in log(), log()
    finally:
        stop(proc)
        done.set()
        holder.join(timeout=5)
        for s in held:
            s.close()
        stall.close()

    # Started again (without the stalling JWKS server): every file is indexed and found.
    log_path = tmp_path / "second.log"
    with open(log_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, log()
            assert time.monotonic() < deadline, f"not ready:\n{log()}"
            try:
                if requests.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        found = DICOMwebClient(url=f"{base}/dicomweb").search_for_instances(
            study_instance_uid=study, get_remaining=True)
        assert {item["00080018"]["Value"][0] for item in found} == uids
        assert f"files_indexed: {UNINDEXED_FILES}," in log(), log()
        assert not any((spool / "quarantine").iterdir())
    finally:
        stop(proc)
