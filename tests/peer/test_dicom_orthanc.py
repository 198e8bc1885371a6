"""Orthanc as the real PACS: Orthanc (Debian `orthanc`) sends a study to Nightingale by
C-STORE, Nightingale's pipeline runs the shipped image-orientation bundle on it and sends its
SR and SC back to Orthanc by C-STORE, and everything is read back through Orthanc's REST API.

Orthanc runs on free loopback ports with a generated configuration (remote access and
authentication off, so only loopback clients; storage in a temporary folder; no plugins;
Nightingale declared in `DicomModalities`; Orthanc stores from any AE). Its start is checked
the way Orthanc documents it: the `--verbose` log says the HTTP and DICOM servers listen on
their ports, and `GET /system` reports its AE title and ports.

The flow, all through Orthanc's REST API:
- `POST /instances`: pydicom-data's RG1_UNCR.dcm (a CR, fresh UIDs);
- `POST /modalities/nightingale/store` with the study's Orthanc ID: Orthanc is the SCU;
- `GET /studies/{id}/series` (bounded poll) until the SR and the SC series appear;
- `GET /instances/{id}/file` and pydicom: the SR references the source SOP Instance UID,
  says VerificationFlag UNVERIFIED, has the IHE AIR Contributing Equipment (Manufacturer
  Nightingale, model name image-orientation), reports the probability onnxruntime gives on
  the numpy reference's tensor; the SC says BurnedInAnnotation YES and references the
  source; both are in the source's study (Orthanc files them under the same study ID).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file

from dicom_support import (identifiers_in, RESULT_TIMEOUT_S, SC_CLASS, SR_CLASS, START_TIMEOUT_S, Server,
                           expected_probability, free_port, referenced_uids, sr_numbers, stop,
                           wait_for, with_new_uids)

ORTHANC_AET = "ORTHANC"


def orthanc_binary() -> str:
    for name in ("Orthanc", "/usr/sbin/Orthanc"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Orthanc not found: install Debian's orthanc (scripts/test.sh does)",
                pytrace=False)


class Orthanc:
    """Orthanc on free loopback ports, its configuration and storage in `work`; started
    when its `--verbose` log says "Orthanc has started"."""

    def __init__(self, work: Path, nightingale_port: int, extra: dict | None = None):
        self.http = free_port()
        self.dicom = free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        storage = work / "orthanc-storage"
        config = {
            "Name": "nightingale-peer-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http,
            "DicomPort": self.dicom,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomModalities": {"nightingale": ["NIGHTINGALE", "127.0.0.1", nightingale_port]},
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
        }
        config.update(extra or {})
        self.config_path = work / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = work / "orthanc.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([orthanc_binary(), "--verbose", str(self.config_path)],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=work)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"Orthanc exited ({self.proc.returncode}):\n{self.log()}",
                            pytrace=False)
            if "Orthanc has started" in self.log():
                break
            time.sleep(0.2)
        else:
            stop(self.proc)
            pytest.fail(f"Orthanc did not start:\n{self.log()}", pytrace=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str):
        r = requests.get(self.url + path, timeout=30)
        r.raise_for_status()
        return r

    def post(self, path: str, data, content_type: str = "application/octet-stream"):
        r = requests.post(self.url + path, data=data, timeout=120,
                          headers={"Content-Type": content_type})
        r.raise_for_status()
        return r


@pytest.fixture
def work():
    d = Path(tempfile.mkdtemp(prefix="nightingale-orthanc-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def result_series(orthanc: Orthanc, study_id: str) -> dict[str, dict] | None:
    """The study's series by modality, once both SR and OT (the SC) series hold an instance."""
    series = orthanc.get(f"/studies/{study_id}/series").json()
    by_modality = {s["MainDicomTags"].get("Modality"): s for s in series}
    if all(m in by_modality and by_modality[m]["Instances"] for m in ("SR", "OT")):
        return by_modality
    return None


def instance_file(orthanc: Orthanc, series: dict) -> pydicom.Dataset:
    [instance] = series["Instances"]
    return pydicom.dcmread(BytesIO(orthanc.get(f"/instances/{instance}/file").content))


def test_orthanc_sends_a_study_and_gets_the_sr_and_sc_back(work):
    # Each side needs the other's DICOM port: Nightingale's is chosen first and given to
    # Orthanc's configuration, then Nightingale starts with Orthanc's as its destination.
    nightingale_port = free_port()
    orthanc = Orthanc(work, nightingale_port)
    server = None
    try:
        log = orthanc.log()
        assert re.search(rf"HTTP server listening on port: {orthanc.http}\b", log), log
        assert re.search(
            rf"DICOM server listening with AET {ORTHANC_AET} on port: {orthanc.dicom}\b", log), log
        system = orthanc.get("/system").json()
        assert system["DicomAet"] == ORTHANC_AET
        assert system["DicomPort"] == orthanc.dicom and system["HttpPort"] == orthanc.http

        nightingale = work / "nightingale"
        nightingale.mkdir()
        server = Server(nightingale, f"{ORTHANC_AET}@127.0.0.1:{orthanc.dicom}",
                        port=nightingale_port)

        source = work / "source.dcm"
        ds = with_new_uids(get_testdata_file("RG1_UNCR.dcm"), source)
        uploaded = orthanc.post("/instances", source.read_bytes(), "application/dicom").json()
        assert uploaded["Status"] == "Success", uploaded
        study_id = uploaded["ParentStudy"]
        assert orthanc.get(f"/studies/{study_id}").json()["MainDicomTags"][
            "StudyInstanceUID"] == ds.StudyInstanceUID

        # Orthanc is the SCU: a C-ECHO, then the study by C-STORE (synchronous job).
        orthanc.post("/modalities/nightingale/echo", "{}", "application/json")
        sent = orthanc.post("/modalities/nightingale/store", study_id, "text/plain").json()
        print("Orthanc store job:", sent)
        assert sent.get("FailedInstancesCount", 0) == 0, sent

        series = wait_for(lambda: result_series(orthanc, study_id), RESULT_TIMEOUT_S,
                          "the SR and SC series in Orthanc")
        sr = instance_file(orthanc, series["SR"])
        sc = instance_file(orthanc, series["OT"])
        for obj in (sr, sc):
            assert obj.StudyInstanceUID == ds.StudyInstanceUID
            assert obj.SeriesInstanceUID != ds.SeriesInstanceUID
            assert obj.PatientID == ds.PatientID
            equipment = obj.ContributingEquipmentSequence[0]
            assert equipment.Manufacturer == "Nightingale"
            assert equipment.ManufacturerModelName == "image-orientation"

        assert sr.SOPClassUID == SR_CLASS
        assert sr.VerificationFlag == "UNVERIFIED"
        assert referenced_uids(sr) == {str(ds.SOPInstanceUID)}
        numbers = sr_numbers(sr)
        expected = expected_probability(source)
        print(f"Orthanc: SR probability {numbers} onnxruntime {expected}")
        assert abs(numbers["Probability"] - expected) < 1e-4, numbers

        assert sc.SOPClassUID == SC_CLASS
        assert sc.BurnedInAnnotation == "YES"
        assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) == str(ds.SOPInstanceUID)

        # Orthanc's own view of the SR's tags agrees with the file it serves.
        [sr_id] = series["SR"]["Instances"]
        tags = orthanc.get(f"/instances/{sr_id}/simplified-tags").json()
        assert tags["VerificationFlag"] == "UNVERIFIED"
        assert tags["StudyInstanceUID"] == ds.StudyInstanceUID

        # Nightingale's side: the job is done and both objects acknowledged by Orthanc.
        report = wait_for(
            lambda: (r := server.results(str(ds.StudyInstanceUID))) and all(
                o["delivery"] == "sent"
                for s in r["series"] for j in s["jobs"] for o in j["objects"]) and r,
            RESULT_TIMEOUT_S, "the results API to say sent")
        [job] = report["series"][0]["jobs"]
        assert job["state"] == "done"
        assert {o["destination"] for o in job["objects"]} == {
            f"{ORTHANC_AET}@127.0.0.1:{orthanc.dicom}"}
        log = server.log()
        assert not identifiers_in(log, ds.PatientID, ds.PatientName)
    finally:
        if server is not None:
            stop(server.proc)
        stop(orthanc.proc)
