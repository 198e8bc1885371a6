"""Orthanc's DICOMweb plugin (Debian `orthanc-dicomweb`) as the DICOMweb client of
Nightingale: Orthanc stores a study into Nightingale by STOW-RS, searches it by QIDO-RS with
the keys a PACS user types (modality, study date) and retrieves an instance Orthanc does not
have by WADO-RS. pydicom, reading the files sent, is the judge:

- Orthanc's `POST /dicom-web/servers/nightingale/stow` of a study: every instance is in
  Nightingale's spool, equal element by element to what Orthanc was given;
- Orthanc's `POST /dicom-web/servers/nightingale/qido` on /studies, /series and /instances:
  the UIDs, modalities, study dates and counts pydicom reads from the files, and matching on
  ModalitiesInStudy, Modality and a StudyDate range selects what pydicom's values select;
- Orthanc's `POST /dicom-web/servers/nightingale/retrieve` of an instance stored in
  Nightingale by dicomweb-client: Orthanc then holds it, equal element by element.

Orthanc runs on free loopback ports, remote access and authentication off (only loopback
clients), with only the DICOMweb plugin; Nightingale with `--dicom-spool` and no DIMSE port.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file

from dicom_support import free_port, spool_index, stop, with_new_uids
from test_dicom_orthanc import Orthanc
from test_dicom_scp import _equal_datasets
from test_dicomweb import Server, _expected_attributes

HTTP_TIMEOUT_S = 120
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

# Two studies Orthanc sends (a CT and an MR of different dates) and one Orthanc retrieves.
SENT = ["CT_small.dcm", "MR_small.dcm"]
RETRIEVED = "JPEG2000.dcm"


@pytest.fixture
def peers():
    if not Path(PLUGIN).exists():
        pytest.fail(f"{PLUGIN} not found: install Debian's orthanc-dicomweb "
                    "(scripts/test.sh does)", pytrace=False)
    work = Path(tempfile.mkdtemp(prefix="nightingale-orthanc-dicomweb-"))
    nightingale = Server(work)
    orthanc = None
    try:
        orthanc = Orthanc(work, free_port(), extra={
            "Plugins": [PLUGIN],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "Servers": {"nightingale": [nightingale.url + "/"]},
            },
        })
        yield nightingale, orthanc, work
    finally:
        if orthanc is not None:
            stop(orthanc.proc)
            print(orthanc.log()[-3000:])
        nightingale.stop()
        print(nightingale.log()[-3000:])
        shutil.rmtree(work, ignore_errors=True)


def post_json(orthanc: Orthanc, path: str, body: dict):
    r = requests.post(orthanc.url + path, json=body, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, (path, r.status_code, r.text)
    return r.json() if r.content else None


def test_orthanc_stores_searches_and_retrieves_over_dicomweb(peers):
    nightingale, orthanc, work = peers
    sent: list[pydicom.Dataset] = []
    for i, name in enumerate(SENT):
        path = work / f"sent{i}.dcm"
        ds = with_new_uids(get_testdata_file(name), path)
        orthanc.post("/instances", path.read_bytes())
        sent.append(ds)
    studies = orthanc.get("/studies").json()
    assert len(studies) == len(SENT)

    # STOW-RS, Orthanc the client.
    post_json(orthanc, "/dicom-web/servers/nightingale/stow",
              {"Resources": studies, "Synchronous": True})
    index = spool_index(nightingale.spool)
    for ds in sent:
        row = index[ds.SOPInstanceUID]
        stored = pydicom.dcmread(nightingale.spool / row["path"])
        assert _equal_datasets(ds, stored) == [], ds.SOPInstanceUID

    # QIDO-RS through Orthanc. Orthanc's proxy answers each attribute with its first value
    # as a string ("Value": "CT"), and drops the values of IS attributes (it reads strings
    # only; Nightingale sends IS as JSON numbers, as PS3.18 F.2.3 maps them).
    def qido(uri: str, arguments: dict | None = None) -> list[dict]:
        return post_json(orthanc, "/dicom-web/servers/nightingale/qido",
                         {"Uri": uri, "Arguments": arguments or {}})

    def _value(item: dict, tag: str):
        return item.get(tag, {}).get("Value")

    expected = {ds.StudyInstanceUID: _expected_attributes(ds) for ds in sent}
    found = qido("/studies")
    assert {_value(s, "0020000D") for s in found} == set(expected)
    for study in found:
        want = expected[_value(study, "0020000D")]
        assert _value(study, "00080061") == want["00080060"]
        assert _value(study, "00080020") == want["00080020"]
    for modality in {e["00080060"] for e in expected.values()}:
        got = qido("/studies", {"ModalitiesInStudy": modality})
        assert {_value(s, "0020000D") for s in got} == {
            uid for uid, e in expected.items() if e["00080060"] == modality}
        got = qido("/series", {"Modality": modality})
        assert {_value(s, "0020000E") for s in got} == {
            ds.SeriesInstanceUID for ds in sent if expected[ds.StudyInstanceUID]["00080060"] == modality}
    dates = sorted(e["00080020"] for e in expected.values())
    got = qido("/studies", {"StudyDate": f"{dates[0]}-{dates[0]}"})
    assert {_value(s, "0020000D") for s in got} == {
        uid for uid, e in expected.items() if e["00080020"] == dates[0]}
    one = sent[0]
    got = qido(f"/studies/{one.StudyInstanceUID}/series/{one.SeriesInstanceUID}/instances")
    assert [_value(i, "00080018") for i in got] == [one.SOPInstanceUID]
    assert _value(got[0], "00080060") == one.Modality

    # WADO-RS: an instance only Nightingale has, retrieved by Orthanc.
    path = work / "retrieved.dcm"
    other = with_new_uids(get_testdata_file(RETRIEVED), path)
    DICOMwebClient(url=nightingale.url).store_instances(datasets=[pydicom.dcmread(path)])
    post_json(orthanc, "/dicom-web/servers/nightingale/retrieve", {
        "Resources": [{"Study": other.StudyInstanceUID, "Series": other.SeriesInstanceUID,
                       "Instance": other.SOPInstanceUID}],
        "Synchronous": True,
    })
    hits = post_json(orthanc, "/tools/find", {
        "Level": "Instance", "Query": {"SOPInstanceUID": other.SOPInstanceUID}})
    assert len(hits) == 1, hits
    got = pydicom.dcmread(BytesIO(orthanc.get(f"/instances/{hits[0]}/file").content))
    assert _equal_datasets(other, got) == []

    # WADO-RS of a whole study and of a series (Orthanc's retrieve by Study, then by Series),
    # after Orthanc forgot the instance: it comes back equal each time.
    for resource in ({"Study": other.StudyInstanceUID},
                     {"Study": other.StudyInstanceUID, "Series": other.SeriesInstanceUID}):
        r = requests.delete(f"{orthanc.url}/instances/{hits[0]}", timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 200, r.text
        post_json(orthanc, "/dicom-web/servers/nightingale/retrieve",
                  {"Resources": [resource], "Synchronous": True})
        hits = post_json(orthanc, "/tools/find", {
            "Level": "Instance", "Query": {"SOPInstanceUID": other.SOPInstanceUID}})
        assert len(hits) == 1, (resource, hits)
        got = pydicom.dcmread(BytesIO(orthanc.get(f"/instances/{hits[0]}/file").content))
        assert _equal_datasets(other, got) == [], resource
