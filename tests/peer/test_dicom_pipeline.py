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
  (dead letter) with the reason, and the server keeps serving;
- a bundle with `[dicom.heatmap]` (lesion-detection, occlusion): the SC is RGB with the
  heatmap where the numpy + onnxruntime occlusion of the same preprocessed image peaks and
  plain grey where it finds no evidence, and the SR refers to it as the illustration of its
  finding (and lists it as evidence); both pass dciodvfy.
"""

from __future__ import annotations

import json
import shutil
import sys
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_support import (BUNDLE, identifiers_in, REPO, RESULT_TIMEOUT_S, SC_CLASS, SR_CLASS, Server, StoreScp, binary,
                           dciodvfy_errors, expected_probability, free_port, imaging,
                           long_series, referenced_uids, spool_index, sr_numbers, stop, store,
                           tool, wait_for, with_new_uids)

sys.path.insert(0, str(REPO / "models" / "train"))
import lesion_detection as ld  # noqa: E402  (the reference occlusion of the lesion bundle)


@pytest.fixture
def work():
    d = Path(tempfile.mkdtemp(prefix="nightingale-pipeline-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def measured_on(sr: pydicom.Dataset) -> list[tuple[str, int | None]]:
    """(SOP Instance UID, frame) of every image the SR's Probability items are INFERRED FROM
    (TID 300 / TID 320, (121112, DCM, "Source of Measurement"))."""
    found = []

    def walk(items):
        for item in items:
            if item.get("ValueType") == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "122157":
                for c in item.get("ContentSequence", []):
                    if c.RelationshipType == "INFERRED FROM":
                        assert c.ValueType == "IMAGE"
                        name = c.ConceptNameCodeSequence[0]
                        assert (name.CodeValue, name.CodingSchemeDesignator) == (
                            codes.DCM.SourceOfMeasurement.value, "DCM")
                        r = c.ReferencedSOPSequence[0]
                        frame = r.get("ReferencedFrameNumber")
                        found.append((str(r.ReferencedSOPInstanceUID),
                                      None if frame is None else int(frame)))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


def finding_codes(sr: pydicom.Dataset) -> list[tuple[str, str, str]]:
    """Every (121071, DCM, "Finding") concept modifier's value in the SR."""
    found = []

    def walk(items):
        for item in items:
            if item.get("ValueType") == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "121071":
                c = item.ConceptCodeSequence[0]
                found.append((c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


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
        # Measured on the one image (single-frame: no frame number); the bundle declares no
        # standard code for its output, so the finding is in the local scheme.
        assert measured_on(sr) == [(str(ds.SOPInstanceUID), None)]
        [(_, scheme, meaning)] = finding_codes(sr)
        assert (scheme, meaning) == ("99NIGHTINGALE", "misoriented: misoriented")

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
        # Each answer of the results API is a read of received data, audited as DICOMweb
        # reads are (it was not: a red-team finding), the study's UID hashed.
        import hashlib
        study_sha = hashlib.sha256(str(ds.StudyInstanceUID).encode()).hexdigest()
        trail = [json.loads(line) for line in
                 (server.data / "audit" / "audit.jsonl").read_text().splitlines()]
        reads = [r for r in trail if r["kind"] == "dicomweb-read"
                 and "event=results level=study" in r.get("detail", "")]
        assert reads and all(f"study_sha256={study_sha}" in r["detail"] for r in reads), reads
        assert all(str(ds.StudyInstanceUID) not in json.dumps(r) for r in trail)

        # WADO-RS (dicomweb-client) retrieves the result objects and the source instance as
        # they were sent and received.
        client = DICOMwebClient(url=f"http://127.0.0.1:{server.http}/dicomweb")
        for o in job["objects"]:
            assert o["retrieve_url"] == (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/"
                                         f"{o['series_instance_uid']}/instances/{o['sop_instance_uid']}")
            got = client.retrieve_instance(str(ds.StudyInstanceUID), o["series_instance_uid"],
                                           o["sop_instance_uid"])
            sent = pydicom.dcmread(objects[o["sop_class_uid"]])
            assert got == sent, o["kind"]
        got = client.retrieve_instance(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                       str(ds.SOPInstanceUID))
        # As received (storescu drops the source's trailing padding, FFFC,FFFC).
        spool = server.data / "spool"
        stored = pydicom.dcmread(spool / spool_index(spool)[str(ds.SOPInstanceUID)]["path"])
        assert got == stored
        assert got.PixelData == ds.PixelData

        # QIDO-RS (dicomweb-client) lists the result objects with the study's instances: the
        # SR and SC series, with their modality and SOP class as pydicom reads them from the
        # files PACS received.
        study = str(ds.StudyInstanceUID)
        series = {s["0020000E"]["Value"][0]: s for s in client.search_for_series(study)}
        for o in job["objects"]:
            sent = pydicom.dcmread(objects[o["sop_class_uid"]], stop_before_pixels=True)
            found = series[o["series_instance_uid"]]
            assert found["00080060"]["Value"][0] == sent.Modality, found
            [instance] = client.search_for_instances(study, o["series_instance_uid"])
            assert instance["00080018"]["Value"][0] == o["sop_instance_uid"]
            assert instance["00080016"]["Value"][0] == o["sop_class_uid"]
        assert str(ds.SeriesInstanceUID) in series and len(series) == 3, series.keys()
        [found] = client.search_for_studies(search_filters={"StudyInstanceUID": study})
        modalities = set(found["00080061"]["Value"])
        assert modalities == {ds.Modality, "SR",
                              pydicom.dcmread(objects[SC_CLASS], stop_before_pixels=True).Modality}
        # The spool's copies are sound Part 10 files (a review's finding: their header named a
        # 19-character "AE title", which the spool's own check refused, and --repair
        # quarantined every result): `spool check` passes on the live spool, and pydicom reads
        # each copy with every header attribute a valid value.
        check = subprocess.run([str(binary()), "spool", "check", "--data-dir", str(server.data)],
                               capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
        index = spool_index(spool)
        for o in job["objects"]:
            copy = pydicom.dcmread(spool / index[o["sop_instance_uid"]]["path"])
            assert len(str(copy.file_meta.get("SourceApplicationEntityTitle", ""))) <= 16
            assert copy == pydicom.dcmread(objects[o["sop_class_uid"]])
        assert not identifiers_in(server.log(), ds.PatientID, ds.PatientName)
    finally:
        stop(server.proc)
        stop(pacs.proc)


def test_a_series_whose_uids_hold_letters_comes_back_as_sr_and_sc(work):
    """Some modalities write letters in their UIDs (against PS3.5); dcmtk and Orthanc store
    such instances, and so does Nightingale. Their series must be processed like any other:
    the results reference the source instances as they were sent, and the results API and
    WADO-RS find them by those UIDs."""
    pacs = StoreScp(work)
    server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}")
    try:
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        stem = generate_uid()[:40]
        ds.StudyInstanceUID = f"{stem}.1.STUDY"
        ds.SeriesInstanceUID = f"{stem}.2.SERIES"
        ds.SOPInstanceUID = f"{stem}.3.INSTANCE-A_1"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.ImplementationClassUID = f"{stem}.VENDOR"
        source = work / "letters.dcm"
        ds.save_as(source, enforce_file_format=True)
        store(server.port, [source])
        files = wait_for(lambda: len(pacs.files()) >= 2 and pacs.files(), RESULT_TIMEOUT_S,
                         "the SR and the SC at storescp")
        objects = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID): f for f in files}
        assert set(objects) == {SR_CLASS, SC_CLASS}, objects
        sr = pydicom.dcmread(objects[SR_CLASS])
        assert sr.StudyInstanceUID == ds.StudyInstanceUID
        assert referenced_uids(sr) == {ds.SOPInstanceUID}
        numbers = sr_numbers(sr)
        expected = expected_probability(source)
        assert abs(numbers["Probability"] - expected) < 1e-4, (numbers, expected)
        sc = pydicom.dcmread(objects[SC_CLASS])
        assert sc.StudyInstanceUID == ds.StudyInstanceUID
        assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) == ds.SOPInstanceUID

        report = wait_for(
            lambda: (r := server.results(ds.StudyInstanceUID)) and all(
                o["delivery"] == "sent"
                for s in r["series"] for j in s["jobs"] for o in j["objects"]) and r,
            RESULT_TIMEOUT_S, "the results API to say sent")
        [series] = report["series"]
        [job] = series["jobs"]
        assert job["state"] == "done", job
        # WADO-RS by those UIDs (dicomweb-client itself refuses a UID with letters).
        url = (f"http://127.0.0.1:{server.http}/dicomweb/studies/{ds.StudyInstanceUID}/series/"
               f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
        request = urllib.request.Request(
            url, headers={"Accept": 'multipart/related; type="application/dicom"'})
        with urllib.request.urlopen(request, timeout=30) as answer:
            body = answer.read()
        assert body.count(ds.SOPInstanceUID.encode()) >= 2  # meta group and data set
        assert ds.PixelData in body
    finally:
        stop(server.proc)
        stop(pacs.proc)


def test_standard_attributes_an_archive_wrote_as_un_are_read_by_the_dictionary(work):
    """An archive whose dictionary lacked an attribute writes it with VR UN (PS3.5 6.2.2):
    pydicom and dcmtk read it by their dictionaries, and so must the pipeline (it read
    Modality `CT` as the numbers `67\\84`, matched no bundle, and made no result: a review's
    finding). Here the routing, pixel and patient attributes of a CT slice are all UN: the
    series is routed, its probability is onnxruntime's on the image pydicom reads, and the
    SR copies the patient's name as a PN."""
    pacs = StoreScp(work)
    server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}")
    try:
        source = work / "un.dcm"
        ds = with_new_uids(get_testdata_file("CT_small.dcm"), source)
        ds.PatientName = "M\u00fcller^Zo\u00eb"
        ds.SpecificCharacterSet = "ISO_IR 100"
        text = {"Modality", "PatientName", "PatientID",
                "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept"}
        binary_us = {"Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                     "PixelRepresentation", "SamplesPerPixel"}
        pydicom.config.replace_un_with_known_vr = False  # write them as UN
        try:
            for keyword in text | binary_us:
                element = ds[keyword]
                if keyword in binary_us:
                    raw = int(element.value).to_bytes(2, "little")
                else:
                    raw = str(element.value).encode("latin-1")
                    raw += b" " * (len(raw) % 2)
                del ds[keyword]
                ds[element.tag] = pydicom.dataelem.DataElement(element.tag, "UN", raw)
            ds.save_as(source, enforce_file_format=True)
        finally:
            pydicom.config.replace_un_with_known_vr = True
        assert b"\x08\x00\x60\x00UN\x00\x00\x02\x00\x00\x00CT" in source.read_bytes()
        read_back = pydicom.dcmread(source)
        assert read_back["Modality"].VR == "CS" and read_back.Modality == "CT"  # pydicom: by
        assert read_back.Rows == 128  # its dictionary
        store(server.port, [source])
        files = wait_for(lambda: len(pacs.files()) >= 2 and pacs.files(), RESULT_TIMEOUT_S,
                         "the SR and the SC at storescp")
        objects = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID): f for f in files}
        assert set(objects) == {SR_CLASS, SC_CLASS}, objects
        sr = pydicom.dcmread(objects[SR_CLASS])
        assert sr["PatientName"].VR == "PN" and str(sr.PatientName) == "M\u00fcller^Zo\u00eb"
        assert sr.PatientID == read_back.PatientID
        numbers = sr_numbers(sr)
        expected = expected_probability(source)
        assert abs(numbers["Probability"] - expected) < 1e-4, (numbers, expected)
        source_errors = dciodvfy_errors(source)
        for path in objects.values():
            new = dciodvfy_errors(path) - source_errors
            assert not new, f"dciodvfy errors in {path.name}: {sorted(new)}"
    finally:
        stop(server.proc)
        stop(pacs.proc)


def test_the_sr_names_the_image_that_gave_the_series_probability(work):
    """A series of two images, one of them rotated: the SR reports the higher of the two
    probabilities onnxruntime gives, and its Probability is INFERRED FROM that image (TID 300's
    Source of Measurement); the SC shows the same image."""
    pacs = StoreScp(work)
    server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}")
    try:
        upright = work / "upright.dcm"
        ds = with_new_uids(get_testdata_file("CT_small.dcm"), upright)
        turned = pydicom.dcmread(upright)
        turned.SOPInstanceUID = generate_uid()
        turned.file_meta.MediaStorageSOPInstanceUID = turned.SOPInstanceUID
        turned.InstanceNumber = int(ds.get("InstanceNumber", 1)) + 1
        turned.PixelData = np.ascontiguousarray(np.rot90(ds.pixel_array)).tobytes()
        rotated = work / "rotated.dcm"
        turned.save_as(rotated, enforce_file_format=True)
        expected = {str(ds.SOPInstanceUID): expected_probability(upright),
                    str(turned.SOPInstanceUID): expected_probability(rotated)}
        best = max(expected, key=expected.get)
        assert abs(expected[str(ds.SOPInstanceUID)] - expected[str(turned.SOPInstanceUID)]) > 1e-3, expected
        store(server.port, [upright, rotated])
        files = wait_for(lambda: len(pacs.files()) >= 2 and pacs.files(), RESULT_TIMEOUT_S,
                         "the SR and the SC at storescp")
        objects = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID): f for f in files}
        sr = pydicom.dcmread(objects[SR_CLASS])
        assert referenced_uids(sr) == set(expected)
        assert abs(sr_numbers(sr)["Probability"] - expected[best]) < 1e-4, (sr_numbers(sr), expected)
        assert measured_on(sr) == [(best, None)], (measured_on(sr), expected)
        sc = pydicom.dcmread(objects[SC_CLASS])
        assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) == best
        new = dciodvfy_errors(objects[SR_CLASS]) - dciodvfy_errors(upright)
        assert not new, sorted(new)
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


def test_results_go_only_to_the_destinations_configured_now_and_each_delivery_is_audited(work):
    """A review's finding: objects queued for a destination that was then removed from the
    configuration (a typo'd second PACS, down at first) went to it after the restart, and a
    reprocess copied the old job's destinations. Now a queued object for a destination no
    longer configured is given up unsent, a reprocess sends to the route's destinations as
    configured now, and every delivery's end is in the audit trail with the destination."""
    pacs = StoreScp(work)
    wrong = free_port()  # nothing listens there yet
    server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}",
                    extra=("--results-destination", f"WRONG@127.0.0.1:{wrong}"))
    late = None
    try:
        source = work / "source.dcm"
        ds = with_new_uids(get_testdata_file("CT_small.dcm"), source)
        study = str(ds.StudyInstanceUID)
        store(server.port, [source])
        wait_for(lambda: len(pacs.files()) >= 2, RESULT_TIMEOUT_S, "the SR and SC at the PACS")
        wait_for(
            lambda: (r := server.results(study)) and any(
                o["destination"].startswith("WRONG@") and o["attempts"] >= 1
                for s in r["series"] for j in s["jobs"] for o in j["objects"]),
            RESULT_TIMEOUT_S, "a failed attempt to the wrong destination")
        stop(server.proc)
        # The operator removes it; then something answers at its address.
        server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}", port=server.port)
        late = StoreScp(work, name="wrong", port=wrong)
        report = wait_for(
            lambda: (r := server.results(study)) and all(
                o["delivery"] == "dead" for s in r["series"] for j in s["jobs"] for o in j["objects"]
                if o["destination"].startswith("WRONG@")) and r,
            RESULT_TIMEOUT_S, "the removed destination's objects given up")
        for o in (o for s in report["series"] for j in s["jobs"] for o in j["objects"]
                  if o["destination"].startswith("WRONG@")):
            assert "no longer configured" in o["last_error"], o
        # A reprocess sends to the PACS configured now only.
        out = subprocess.run([str(binary()), "results", "reprocess", "--study", study,
                              "--data-dir", str(server.data)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        wait_for(lambda: len(pacs.files()) >= 4, RESULT_TIMEOUT_S, "the reprocessed SR and SC")
        report = wait_for(
            lambda: (r := server.results(study)) and len(r["series"][0]["jobs"]) == 2
            and all(o["delivery"] == "sent" for o in r["series"][0]["jobs"][1]["objects"]) and r,
            RESULT_TIMEOUT_S, "the reprocessed job's objects sent")
        assert {o["destination"] for o in report["series"][0]["jobs"][1]["objects"]} == {
            f"STORESCP@127.0.0.1:{pacs.port}"}
        assert late.files() == [], "nothing reached the removed destination"
        # Each delivery's end is audited, with the destination and no UID in clear.
        records = [json.loads(line) for line in
                   (server.data / "audit" / "audit.jsonl").read_text().splitlines()]
        sent = [r for r in records if r["kind"] == "dicom-result-sent"]
        delivered = [r for r in sent if "event=delivered" in r["detail"]]
        given_up = [r for r in sent if "event=given-up" in r["detail"]]
        assert len(delivered) == 4 and {r["actor"] for r in delivered} == {f"STORESCP@127.0.0.1:{pacs.port}"}
        assert all(r["status"] == 0 and r["outcome"] == "ok" for r in delivered)
        assert len(given_up) == 2 and {r["actor"] for r in given_up} == {f"WRONG@127.0.0.1:{wrong}"}
        assert not any(study in json.dumps(r) for r in sent)
        # Each C-STORE is on record before its data set goes (a crash between the PACS's
        # answer and the record left it in none), the object by its UID's full SHA-256.
        sending = [r for r in sent if "event=sending" in r["detail"]]
        assert len(sending) == 4, sending
        sha = lambda r: r["detail"].split("sop_instance_sha256=")[1].split()[0]  # noqa: E731
        assert sorted(map(sha, sending)) == sorted(map(sha, delivered))
        assert all(len(sha(r)) == 64 for r in sent)
    finally:
        stop(server.proc)
        stop(pacs.proc)
        if late is not None:
            stop(late.proc)


def test_reprocess_makes_a_new_result_series_and_keeps_the_old(work):
    pacs = StoreScp(work)
    server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}")
    try:
        source = work / "source.dcm"
        ds = with_new_uids(get_testdata_file("CT_small.dcm"), source)
        study = str(ds.StudyInstanceUID)
        store(server.port, [source])
        first = wait_for(lambda: len(pacs.files()) >= 2 and pacs.files(), RESULT_TIMEOUT_S,
                         "the first SR and SC")
        [first_sr] = [pydicom.dcmread(f) for f in first
                      if pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID == SR_CLASS]
        assert "PredecessorDocumentsSequence" not in first_sr
        out = subprocess.run([str(binary()), "results", "reprocess", "--study", study,
                              "--data-dir", str(server.data)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "queued 1 job" in out.stdout
        files = wait_for(lambda: len(pacs.files()) >= 4 and pacs.files(), RESULT_TIMEOUT_S,
                         "the second SR and SC")
        series = {str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in files}
        assert len(series) == 4  # SR and SC series of each run: new series every time
        # The second SR names the first as its predecessor (PS3.3 C.17.2.3): PACS holds both,
        # and can tell which is current. dciodvfy finds no error in it.
        [second_sr] = [d for d in (pydicom.dcmread(f) for f in files)
                       if d.SOPClassUID == SR_CLASS and d.SOPInstanceUID != first_sr.SOPInstanceUID]
        [p] = second_sr.PredecessorDocumentsSequence
        assert p.StudyInstanceUID == ds.StudyInstanceUID
        [ps] = p.ReferencedSeriesSequence
        assert ps.SeriesInstanceUID == first_sr.SeriesInstanceUID
        [pi] = ps.ReferencedSOPSequence
        assert (pi.ReferencedSOPClassUID, pi.ReferencedSOPInstanceUID) == (SR_CLASS, first_sr.SOPInstanceUID)
        second_path = next(f for f in files if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
                           == second_sr.SOPInstanceUID)
        assert not dciodvfy_errors(second_path) - dciodvfy_errors(source)
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
        # Once the spool no longer holds the series (purged: its results kept), reprocessing
        # it is refused and its results stay current (the new job failed and hid them).
        out = subprocess.run([str(binary()), "spool", "purge", "--spool",
                              str(server.data / "spool"), "--older-than", "1ns", "--force"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "results were not looked for" in out.stdout
        out = subprocess.run([str(binary()), "results", "reprocess", "--study", study,
                              "--data-dir", str(server.data)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, out.stdout
        assert "no longer in the spool" in out.stdout and "none of its series" in out.stderr
        report = server.results(study)
        assert [j["state"] for j in report["series"][0]["jobs"]] == ["superseded", "done"]
    finally:
        stop(server.proc)
        stop(pacs.proc)


def _model_control(server: Server, action: str, token: str, model: str = "image-orientation") -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.http}/v2/repository/models/{model}/{action}",
        data=b"{}", method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status


def test_a_series_sent_while_its_bundle_is_unloaded_is_processed_once_it_serves(work, monkeypatch):
    """A review's finding: a series that arrived while its bundle was unloaded (an operator's
    unload and load, a folder moved aside by a deployment) was left unmatched for good, and
    `results reprocess` had no job to repeat. Its job waits in the queue for the bundle, and
    runs once the bundle serves again; a series the bundle's last `[dicom]` refuses is not
    held for it (a re-attack's finding)."""
    token = "pipeline-admin-token-0123456789"
    monkeypatch.setenv("NIGHTINGALE_ADMIN_TOKEN", token)
    pacs = StoreScp(work)
    server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}")
    try:
        assert _model_control(server, "unload", token) == 200
        source = work / "source.dcm"
        ds = with_new_uids(get_testdata_file("CT_small.dcm"), source)
        study = str(ds.StudyInstanceUID)
        store(server.port, [source])
        # Routed; its job waits for the bundle, said in the results API.
        report = wait_for(
            lambda: (r := server.results(study)) and r["series"] and r["series"][0]["jobs"] and r,
            RESULT_TIMEOUT_S, "the series to be routed")
        [series] = report["series"]
        [job] = series["jobs"]
        assert series["state"] == "routed" and job["state"] == "queued", report
        assert "waiting for bundle image-orientation" in job["reason"], job
        time.sleep(2)
        assert server.results(study)["series"][0]["jobs"][0]["state"] == "queued"
        assert not pacs.files()
        # An operator finds it by `results list` (the log names series by a hash only).
        out = subprocess.run([str(binary()), "results", "list", "--data-dir", str(server.data)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        [line] = [l for l in out.stdout.splitlines() if study in l]
        assert line.split("\t")[1:5] == [study, str(ds.SeriesInstanceUID), "image-orientation",
                                          "queued"], line
        assert "waiting for bundle image-orientation" in line
        out = subprocess.run([str(binary()), "results", "list", "--state", "waiting",
                              "--data-dir", str(server.data)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "assembling" in out.stderr, out
        # A series the unloaded bundle's [dicom] refuses (ultrasound) is not held for it.
        us = work / "us.dcm"
        us_ds = with_new_uids(get_testdata_file("US1_UNCR.dcm"), us)
        store(server.port, [us])
        report = wait_for(
            lambda: (r := server.results(str(us_ds.StudyInstanceUID))) and r["series"]
            and r["series"][0]["state"] == "unmatched" and r,
            RESULT_TIMEOUT_S, "the ultrasound series unmatched")
        assert "refuses" in report["series"][0]["reason"], report
        # The bundle back: the series is processed, once.
        assert _model_control(server, "load", token) == 200
        files = wait_for(lambda: len(pacs.files()) >= 2 and pacs.files(), RESULT_TIMEOUT_S,
                         "the SR and SC once the bundle serves")
        report = wait_for(
            lambda: (r := server.results(study)) and r["series"][0]["jobs"]
            and r["series"][0]["jobs"][0]["state"] == "done" and r,
            RESULT_TIMEOUT_S, "the job done")
        [job] = report["series"][0]["jobs"]
        assert job["bundle"] == "image-orientation"
        assert len(files) == 2
    finally:
        stop(server.proc)
        stop(pacs.proc)


def test_a_series_routed_without_a_bundle_aside_is_listed_and_reprocess_routes_it_again(work, monkeypatch):
    """A re-attack's finding: a series that came while one of its route's bundles was out of
    the repository (unloaded, its folder moved aside by a deployment) got no job for it and
    no record of that, and `results reprocess` could not bring it back. It is routed to what
    is there, says which bundle it went without, is listed, and is routed again by
    `reprocess` once the bundle is back."""
    token = "pipeline-admin-token-0123456789"
    monkeypatch.setenv("NIGHTINGALE_ADMIN_TOKEN", token)
    lesion = REPO / "models" / "bundles" / "lesion-detection"
    config = work / "routes.toml"
    config.write_text('[[routes]]\nname = "ct"\nmodality = ["CT"]\n'
                      'bundles = ["image-orientation", "lesion-detection"]\n')
    pacs = StoreScp(work)
    server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}", ("--config", str(config)),
                    bundles=(BUNDLE, lesion))
    aside = work / "aside"
    try:
        assert _model_control(server, "unload", token, "lesion-detection") == 200
        shutil.move(work / "models" / "lesion-detection", aside)
        source = work / "source.dcm"
        ds = with_new_uids(get_testdata_file("CT_small.dcm"), source)
        study = str(ds.StudyInstanceUID)
        store(server.port, [source])
        report = wait_for(
            lambda: (r := server.results(study)) and r["series"] and r["series"][0]["jobs"]
            and r["series"][0]["jobs"][0]["state"] == "done" and r,
            RESULT_TIMEOUT_S, "image-orientation's job done")
        [series] = report["series"]
        assert [j["bundle"] for j in series["jobs"]] == ["image-orientation"], report
        assert series["state"] == "routed"
        assert "routed without bundle lesion-detection" in series["reason"], series
        out = subprocess.run([str(binary()), "results", "list", "--data-dir", str(server.data)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert any(study in l and "routed without bundle lesion-detection" in l
                   for l in out.stdout.splitlines()), out.stdout
        # `--model` of a bundle it did not go without (a typo) routes nothing again (it re-ran
        # and resent the other bundle's results: a re-attack's finding).
        out = subprocess.run([str(binary()), "results", "reprocess", "--study", study,
                              "--model", "no-such-model", "--data-dir", str(server.data)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "routed again" not in out.stdout, (out.stdout, out.stderr)
        # The bundle back: `reprocess` routes the series again, lesion-detection included.
        shutil.move(aside, work / "models" / "lesion-detection")
        assert _model_control(server, "load", token, "lesion-detection") == 200
        out = subprocess.run([str(binary()), "results", "reprocess", "--study", study,
                              "--model", "lesion-detection", "--data-dir", str(server.data)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (out.stdout, out.stderr)
        assert "routed again: 1 series" in out.stdout, out.stdout
        report = wait_for(
            lambda: (r := server.results(study)) and any(
                j["bundle"] == "lesion-detection" and j["state"] == "done"
                for j in r["series"][0]["jobs"]) and r,
            3 * RESULT_TIMEOUT_S, "lesion-detection's job done")
        assert report["series"][0]["reason"] is None, report
    finally:
        stop(server.proc)
        stop(pacs.proc)


def test_an_unload_stops_a_running_job_and_it_runs_again_once_the_bundle_serves(work, monkeypatch):
    """A review's finding: an operator's unload (a recall) did not stop a job running: it
    went on inferring with the recalled version for seconds and sent its SR afterwards. The
    job stops before its next inference, goes back to the queue, and runs whole again on
    the version that serves once the bundle is loaded."""
    token = "pipeline-admin-token-0123456789"
    monkeypatch.setenv("NIGHTINGALE_ADMIN_TOKEN", token)
    pacs = StoreScp(work)
    server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}")
    try:
        # A long series: 300 slices (CT_small, each its own instance), one job.
        study, files = long_series(work, 300)
        store(server.port, files)
        wait_for(lambda: (r := server.results(study)) and r["series"][0]["jobs"]
                 and r["series"][0]["jobs"][0]["state"] == "processing",
                 RESULT_TIMEOUT_S, "the job to run")
        # The same files loaded again (a plain load of what serves) are the same version:
        # the job goes on (it started over at every such load: a re-attack's finding).
        assert _model_control(server, "load", token) == 200
        assert server.results(study)["series"][0]["jobs"][0]["state"] == "processing"
        assert server.metric("nightingale_pipeline_jobs_requeued_total") == 0
        assert _model_control(server, "unload", token) == 200
        report = wait_for(
            lambda: (r := server.results(study)) and r["series"][0]["jobs"][0]["state"] == "queued"
            and r, RESULT_TIMEOUT_S, "the job back in the queue")
        assert not pacs.files(), "results sent after the unload"
        # At most the one inference under way when the unload came is after its record.
        audit = [json.loads(line) for line in
                 (server.data / "audit" / "audit.jsonl").read_text().splitlines()]
        unload = max(r["seq"] for r in audit if r["kind"] == "model-unload")
        late = [r for r in audit if r["kind"] == "inference" and r["seq"] > unload]
        assert len(late) <= 1, late
        time.sleep(2)  # still queued: it waits for its bundle
        assert server.results(study)["series"][0]["jobs"][0]["state"] == "queued"
        assert _model_control(server, "load", token) == 200
        report = wait_for(
            lambda: (r := server.results(study)) and r["series"][0]["jobs"][0]["state"] == "done"
            and r, 3 * RESULT_TIMEOUT_S, "the job done once the bundle serves")
        [job] = report["series"][0]["jobs"]
        assert job["instances"] == 300 and job["reason"] is None, job
        sent = wait_for(lambda: len(pacs.files()) >= 2 and pacs.files(), RESULT_TIMEOUT_S,
                        "the SR and SC")
        assert len(sent) == 2
    finally:
        stop(server.proc)
        stop(pacs.proc)


def test_the_result_comes_to_the_ehr_as_a_cds_card(work):
    """Imaging results as CDS cards: a CR image stored by storescu is processed, then an EHR's
    patient-view call for the patient whose NHS number is the image's Patient ID gets a card
    with the finding, the bundle and version, and a link to the study's results."""
    from cds_support import Ehr, patient_view

    ehr = Ehr(work)
    system = "https://fhir.nhs.uk/Id/nhs-number"
    server = Server(work, "NOWHERE@127.0.0.1:1",
                    extra=("--cds-trust", f"{ehr.issuer}={ehr.jwks_path}",
                           "--cds-imaging-identifier-system", system))
    try:
        source = work / "source.dcm"
        ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
        ds.PatientID = "9434765919"
        ds.save_as(work / "nhs.dcm", enforce_file_format=True)
        ds = with_new_uids(str(work / "nhs.dcm"), source)
        store(server.port, [source])
        report = wait_for(
            lambda: (r := server.results(str(ds.StudyInstanceUID))) and any(
                j["state"] == "done" for s in r["series"] for j in s["jobs"]) and r,
            RESULT_TIMEOUT_S, "the job done")
        [job] = report["series"][0]["jobs"]
        # The NHS number is the patient's second identifier (every one in use is matched).
        patient = {"resourceType": "Patient", "id": "p-1", "birthDate": "1950-01-01",
                   "identifier": [{"system": system, "value": "1111111111", "use": "old"},
                                  {"system": system, "value": "9434765919"}]}

        def call(service: str, prefetch: dict) -> list[dict]:
            aud = f"http://127.0.0.1:{server.http}/cds-services/{service}"
            body = json.dumps(patient_view("p-1", prefetch)).encode()
            req = urllib.request.Request(aud, data=body, method="POST", headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {ehr.token(aud)}"})
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.load(r)["cards"]

        # The imaging results are a service of their own, discovered; NEWS2 no longer
        # repeats them (every patient-view service did: an EHR calling each showed each
        # finding several times).
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http}/cds-services", timeout=30) as r:
            services = {s["id"]: s for s in json.load(r)["services"]}
        assert services["nightingale-imaging-results"]["prefetch"] == {
            "patient": "Patient/{{context.patientId}}"}
        assert not [c for c in call("nightingale-news2", {"patient": patient})
                    if c["summary"].startswith("AI imaging result")]
        cards = call("nightingale-imaging-results", {"patient": patient})
        imaging = [c for c in cards if c["summary"].startswith("AI imaging result")]
        assert len(imaging) == 1, cards
        card = imaging[0]
        # Its delivery is said as it is (the destination is down), and the trail names the
        # job whose result was shown.
        assert "not in PACS yet" in card["detail"], card["detail"]
        records = [json.loads(line) for line in
                   (server.data / "audit" / "audit.jsonl").read_text().splitlines()]
        [hook] = [r for r in records if r["kind"] == "cds-hook"
                  and "service=nightingale-imaging-results" in r["detail"]]
        assert hook["detail"].endswith(f" results=pipeline-job-{job['job']}"), hook
        finding = job["findings"][0]
        assert f"(image-orientation v{job['version']})" in card["summary"]
        assert f"{finding['probability']:.2f}" in card["summary"]
        assert card["indicator"] == ("warning" if finding["positive"] else "info")
        assert card["links"][0]["url"].endswith(f"/results/studies/{ds.StudyInstanceUID}")
        # Another patient gets no imaging card; the ID is not in the log.
        other = {**patient, "identifier": [{"system": system, "value": "9999999999"}]}
        assert not call("nightingale-imaging-results", {"patient": other})
        # Under a key the service does not declare, the Patient is not read.
        assert not call("nightingale-imaging-results", {"someone": patient})
        assert "9434765919" not in server.log()
    finally:
        stop(server.proc)


def test_a_heatmap_bundle_sends_its_saliency_in_the_sc(work):
    lesion = REPO / "models" / "bundles" / "lesion-detection"
    pacs = StoreScp(work)
    server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}", bundles=(lesion,))
    try:
        source = work / "source.dcm"
        ds = with_new_uids(get_testdata_file("CT_small.dcm"), source)
        store(server.port, [source])
        files = wait_for(lambda: len(pacs.files()) >= 2 and pacs.files(), RESULT_TIMEOUT_S,
                         "the SR and the SC at storescp")
        objects = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID): f for f in files}
        assert set(objects) == {SR_CLASS, SC_CLASS}, objects
        source_errors = dciodvfy_errors(source)
        for path in objects.values():
            new = dciodvfy_errors(path) - source_errors
            assert not new, f"dciodvfy errors in {path.name}: {sorted(new)}"

        sc = pydicom.dcmread(objects[SC_CLASS])
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
        assert "heatmap" in sc.DerivationDescription
        sr = pydicom.dcmread(objects[SR_CLASS])
        illustrations = []

        def walk(items):
            for item in items:
                if item.get("ValueType") == "IMAGE" and "ConceptNameCodeSequence" in item:
                    code = item.ConceptNameCodeSequence[0]
                    illustrations.append((code.CodeValue, code.CodingSchemeDesignator,
                                          str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)))
                if "ContentSequence" in item:
                    walk(item.ContentSequence)

        walk(sr.ContentSequence)
        # The image the probability was measured on (the source) and the illustration (the
        # SC), in that order.
        assert illustrations == [("121112", "DCM", str(ds.SOPInstanceUID)),
                                 ("121200", "DCM", str(sc.SOPInstanceUID))], illustrations
        # The bundle declares its output's concept: SNOMED CT "Nodule", as pydicom's code
        # dictionary has it.
        nodule = codes.SCT.Nodule
        assert finding_codes(sr) == [(nodule.value, nodule.scheme_designator, nodule.meaning)]
        assert measured_on(sr) == [(str(ds.SOPInstanceUID), None)]
        evidence = sr.PertinentOtherEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert str(evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) == str(sc.SOPInstanceUID)

        # Where the heatmap is: the reference occlusion map of the same preprocessed image,
        # mapped from the 128 x 128 model input back onto the source's pixels (centred pad,
        # area resize), coloured at its peak and grey where it is below the drawing floor.
        spec = imaging.Preprocessing(height=128, width=128, window="percentile", low=0.5,
                                     high=99.5, aspect="pad", pad_value=0.0, mean=0.5, std=0.25)
        x = imaging.preprocess(ds.pixel_array, spec,
                               slope=float(getattr(ds, "RescaleSlope", 1.0)),
                               intercept=float(getattr(ds, "RescaleIntercept", 0.0)),
                               monochrome1=ds.PhotometricInterpretation == "MONOCHROME1")
        sess = ort.InferenceSession(str(lesion / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        ref, _ = ld.occlusion_saliency(sess, x.astype(np.float32))
        rows, cols = int(ds.Rows), int(ds.Columns)
        side = max(rows, cols)
        top, left, scale = (side - rows) // 2, (side - cols) // 2, 128 / side
        # A narrow image is centred on black columns, so the warning fits on one line.
        widened = (int(sc.Columns) - cols) // 2
        pixels = sc.pixel_array[:rows, widened:widened + cols].astype(int)

        def at(py, px):
            r = int(round((py + 0.5) / scale - 0.5 - top))
            c = int(round((px + 0.5) / scale - 0.5 - left))
            return pixels[min(max(r, 0), rows - 1), min(max(c, 0), cols - 1)]

        assert ref.max() > 0, "the reference finds evidence somewhere"
        py, px = ld.saliency_peak(ref)
        peak = at(py, px)
        assert not (peak[0] == peak[1] == peak[2]), f"grey at the saliency peak: {peak}"
        ys, xs = np.nonzero(ref <= 0.0)
        assert len(ys) > 0
        # A point of no evidence well away from the evidence (the heatmap is bilinear).
        far = np.argmax((ys - py) ** 2 + (xs - px) ** 2)
        quiet = at(ys[far], xs[far])
        assert quiet[0] == quiet[1] == quiet[2], f"colour where there is no evidence: {quiet}"
        job = wait_for(lambda: (r := server.results(str(ds.StudyInstanceUID))) and r["series"][0]["jobs"][0],
                       RESULT_TIMEOUT_S, "the job in the results API")
        assert job["bundle"] == "lesion-detection"
        # The heatmap's explanation is one request, as over /explain, in the statistics and
        # the metrics (a red-team finding: audited, its passes counted, the request not).
        assert server.metric("nightingale_explain_requests_total", model="lesion-detection",
                             outcome="success") == 1
        with urllib.request.urlopen(
                f"http://127.0.0.1:{server.http}/v2/models/lesion-detection/stats", timeout=10) as r:
            stats = json.load(r)["model_stats"][0]["inference_stats"]
        assert stats["success"]["count"] == 2, stats  # the inference and the explanation
    finally:
        stop(server.proc)
        stop(pacs.proc)


def test_a_stop_during_a_delivery_waits_for_its_answer_and_sends_nothing_twice(work):
    """A review's finding: on SIGTERM the pipeline was dropped in the middle of a C-STORE the
    PACS then completed, and the object was sent again at the next start (at every routine
    restart, not only after a crash). Now the C-STORE under way is answered and recorded
    before the server exits, no further object is started, and after a restart every object
    reaches the destination exactly once."""
    import signal
    import threading
    import time

    from pynetdicom import AE, AllStoragePresentationContexts, evt

    received: list[str] = []
    entered = threading.Event()
    slow = {"first": True}

    def on_store(event):
        if slow["first"]:
            slow["first"] = False
            entered.set()
            time.sleep(3)  # the stop comes while this C-STORE waits for its answer
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="SLOWPACS")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    pacs = ae.start_server(("127.0.0.1", port), block=False,
                           evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        server = Server(work, f"SLOWPACS@127.0.0.1:{port}")
        try:
            source = work / "source.dcm"
            ds = with_new_uids(get_testdata_file("CT_small.dcm"), source)
            store(server.port, [source])
            assert entered.wait(RESULT_TIMEOUT_S), "a delivery started"
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(timeout=60) == 0, server.log()[-3000:]
            assert received, "the C-STORE under way was answered before the exit"
            assert len(received) == 1, f"no new object started while stopping: {received}"
        finally:
            stop(server.proc)
        server = Server(work, f"SLOWPACS@127.0.0.1:{port}")
        try:
            report = wait_for(
                lambda: (r := server.results(str(ds.StudyInstanceUID))) and all(
                    o["delivery"] == "sent"
                    for s in r["series"] for j in s["jobs"] for o in j["objects"]) and r,
                RESULT_TIMEOUT_S, "every object sent after the restart")
            objects = [o for s in report["series"] for j in s["jobs"] for o in j["objects"]]
            assert len(objects) == 2, objects
            assert all(o["attempts"] == 1 for o in objects), objects
            assert sorted(received) == sorted(set(received)) and len(received) == 2, received
        finally:
            stop(server.proc)
    finally:
        pacs.shutdown()
