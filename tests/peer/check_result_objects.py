"""Check Nightingale's DICOM result objects with pydicom (issue 9, results as DICOM).

Run by dicom/tests/results.rs (with NIGHTINGALE_PEERS=1) as

    .venv/bin/python tests/peer/check_result_objects.py MANIFEST.json

The manifest lists the inputs the Rust test gave (bundle, findings) and, per case, a result
object and its source files. Everything expected here comes from those inputs, the source
files read by pydicom, pydicom's own DICOM code dictionary (pydicom.sr.codedict) and this
file's own derivation of the device UID; nothing from the code under test. Each SR's content
tree is printed. Exits non-zero on the first failed check.
"""

import hashlib
import json
import sys

import numpy as np
import pydicom
from pydicom.sr.codedict import codes

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

# Patient, Clinical Trial Subject, General Study, Patient Study modules: copied exactly
# whenever the source has them (by keyword, from pydicom's dictionary).
COPIED = [
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime",
    "PatientSex", "OtherPatientIDsSequence", "PatientComments", "PatientIdentityRemoved",
    "DeidentificationMethod", "StudyInstanceUID", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "ReferencedStudySequence",
    "ProcedureCodeSequence", "PatientAge", "PatientSize", "PatientWeight",
    "AdditionalPatientHistory", "ClinicalTrialSponsorName", "ClinicalTrialProtocolID",
    "ClinicalTrialSubjectID",
]
TYPE2 = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
         "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"]


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def device_uid(checksum):
    """2.25 + a version 8 UUID (RFC 9562) from the first 128 bits of SHA-256 of the checksum."""
    n = int.from_bytes(hashlib.sha256(checksum.encode()).digest()[:16], "big")
    n = (n & ~(0xF << 76)) | (0x8 << 76)  # version 8
    n = (n & ~(0x3 << 62)) | (0x2 << 62)  # variant 10
    return f"2.25.{n}"


def code_of(item):
    value = item.get("CodeValue") or item.get("LongCodeValue")
    return (str(value), item.CodingSchemeDesignator, item.CodeMeaning)


def code_tuple(c):
    return (c.value, c.scheme_designator, c.meaning)


def concept(item):
    return code_of(item.ConceptNameCodeSequence[0]) if "ConceptNameCodeSequence" in item else None


def print_tree(item, depth=0):
    name = concept(item)
    rel = item.get("RelationshipType", "ROOT")
    value = ""
    vt = item.ValueType
    if vt == "TEXT":
        value = repr(item.TextValue)
    elif vt == "CODE":
        value = code_of(item.ConceptCodeSequence[0])
    elif vt == "NUM":
        mv = item.MeasuredValueSequence[0]
        value = f"{mv.NumericValue} {code_of(mv.MeasurementUnitsCodeSequence[0])[0]}"
    elif vt == "UIDREF":
        value = item.UID
    elif vt == "IMAGE":
        value = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    print(f"{'  ' * depth}{rel} {vt} {name[2] if name else ''} = {value}")
    for child in item.get("ContentSequence", []):
        print_tree(child, depth + 1)


def children(item, value_type=None, name=None):
    out = []
    for c in item.get("ContentSequence", []):
        if value_type and c.ValueType != value_type:
            continue
        if name and concept(c) != code_tuple(name):
            continue
        out.append(c)
    return out


def one(item, value_type, name):
    found = children(item, value_type, name)
    check(len(found) == 1, f"expected one {value_type} {name.meaning}, found {len(found)}")
    return found[0]


def check_copied(result, source, label):
    for kw in COPIED:
        if kw in source:
            check(kw in result, f"{label}: {kw} not copied")
            check(result[kw].value == source[kw].value,
                  f"{label}: {kw} differs: {result[kw].value!r} != {source[kw].value!r}")
        elif kw in TYPE2:
            check(kw in result and result[kw].value in (None, "", []),
                  f"{label}: {kw} missing in the source must be present and empty")


def check_equipment(result, m, label):
    check(result.Manufacturer == "Nightingale", f"{label}: Manufacturer")
    seq = result.ContributingEquipmentSequence
    check(len(seq) == 1, f"{label}: one contributing equipment")
    eq = seq[0]
    check(eq.Manufacturer == "Nightingale", f"{label}: contributing Manufacturer")
    check(eq.ManufacturerModelName == m["bundle_name"], f"{label}: model name")
    check(list(eq.SoftwareVersions) == [m["bundle_version"], f"Nightingale {m['nightingale_version']}"],
          f"{label}: software versions {eq.SoftwareVersions}")
    check(eq.DeviceUID == device_uid(m["bundle_checksum"]), f"{label}: device UID")
    check(code_of(eq.PurposeOfReferenceCodeSequence[0]) == code_tuple(codes.DCM.ProcessingEquipment),
          f"{label}: purpose of reference")


def float32(x):
    return np.float32(float(x))


def check_sr(result, sources, case, m, label):
    check(result.SOPClassUID == COMPREHENSIVE_SR, f"{label}: SOP class")
    check(result.Modality == "SR", f"{label}: modality")
    check(result.VerificationFlag == "UNVERIFIED", f"{label}: verification flag")
    check(result.CompletionFlag == "COMPLETE", f"{label}: completion flag")
    expected_refs = {(s.SOPClassUID, s.SOPInstanceUID) for s in sources}
    ev = result.CurrentRequestedProcedureEvidenceSequence
    check(len(ev) == 1 and ev[0].StudyInstanceUID == sources[0].StudyInstanceUID, f"{label}: evidence study")
    series = ev[0].ReferencedSeriesSequence
    check(len(series) == 1 and series[0].SeriesInstanceUID == sources[0].SeriesInstanceUID,
          f"{label}: evidence series")
    refs = {(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in series[0].ReferencedSOPSequence}
    check(refs == expected_refs, f"{label}: evidence references {refs} != {expected_refs}")

    private = {f["scheme"] for f in m["findings"] if f["scheme"].startswith("99")}
    declared = {i.CodingSchemeDesignator for i in result.get("CodingSchemeIdentificationSequence", [])}
    check(private <= declared, f"{label}: private coding schemes {private} not identified")

    print(f"-- {label} content tree")
    print_tree(result)
    check(concept(result) == code_tuple(codes.DCM.ImagingMeasurementReport), f"{label}: document title")
    t = result.ContentTemplateSequence[0]
    check((t.MappingResource, t.TemplateIdentifier) == ("DCMR", "1500"), f"{label}: template")
    lang = one(result, "CODE", codes.DCM.LanguageOfContentItemAndDescendants)
    check(lang.RelationshipType == "HAS CONCEPT MOD", f"{label}: language relationship")
    observer = one(result, "CODE", codes.DCM.ObserverType)
    check(code_of(observer.ConceptCodeSequence[0]) == code_tuple(codes.DCM.Device), f"{label}: observer type")
    check(one(result, "UIDREF", codes.DCM.DeviceObserverUID).UID == device_uid(m["bundle_checksum"]),
          f"{label}: device observer UID")
    check(one(result, "TEXT", codes.DCM.DeviceObserverManufacturer).TextValue == "Nightingale",
          f"{label}: observer manufacturer")
    check(one(result, "TEXT", codes.DCM.DeviceObserverModelName).TextValue == m["bundle_name"],
          f"{label}: observer model name")
    procedures = children(result, "CODE", codes.DCM.ProcedureReported)
    check(len(procedures) >= 1, f"{label}: procedure reported")
    src_procs = [code_of(c) for c in sources[0].get("ProcedureCodeSequence", [])]
    got_procs = [code_of(p.ConceptCodeSequence[0]) for p in procedures]
    check(got_procs == (src_procs or [code_tuple(codes.SCT.ImagingProcedure)]), f"{label}: procedures {got_procs}")

    library = one(result, "CONTAINER", codes.DCM.ImageLibrary)
    group = one(library, "CONTAINER", codes.DCM.ImageLibraryGroup)
    images = {(i.ReferencedSOPSequence[0].ReferencedSOPClassUID, i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
              for i in children(group, "IMAGE")}
    check(images == expected_refs, f"{label}: image library")

    measurements = one(result, "CONTAINER", codes.DCM.ImagingMeasurements)
    groups = children(measurements, "CONTAINER", codes.DCM.MeasurementGroup)
    check(len(groups) == len(m["findings"]), f"{label}: {len(groups)} measurement groups")
    for g, f in zip(groups, m["findings"]):
        want = (f["value"], f["scheme"], f["meaning"])
        check(code_of(one(g, "CODE", codes.DCM.Finding).ConceptCodeSequence[0]) == want, f"{label}: finding code")
        check(one(g, "TEXT", codes.DCM.TrackingIdentifier).TextValue, f"{label}: tracking id")
        check(one(g, "UIDREF", codes.DCM.TrackingUniqueIdentifier).UID.startswith("2.25."), f"{label}: tracking uid")
        for name, key in [(codes.DCM.Probability, "probability"), (codes.DCM.ThresholdValue, "threshold")]:
            n = one(g, "NUM", name)
            check(one(n, "TEXT", codes.DCM.AlgorithmName).TextValue == m["bundle_name"], f"{label}: algorithm name")
            check(one(n, "TEXT", codes.DCM.AlgorithmVersion).TextValue == m["bundle_version"],
                  f"{label}: algorithm version")
            mv = n.MeasuredValueSequence[0]
            check(code_of(mv.MeasurementUnitsCodeSequence[0])[:2] == ("1", "UCUM"), f"{label}: {key} unit")
            check(float32(mv.NumericValue) == float32(f[key]), f"{label}: {key} {mv.NumericValue} != {f[key]}")
            check(float32(mv.FloatingPointValue) == float32(f[key]), f"{label}: {key} floating point value")
            # The probability is inferred from the image it was measured on (TID 300 / TID 320,
            # Source of Measurement), with its frame for a multi-frame instance; the threshold
            # from none.
            inferred = [c for c in n.get("ContentSequence", []) if c.RelationshipType == "INFERRED FROM"]
            on = case["measured_on"][m["findings"].index(f)] if key == "probability" else None
            if on is None:
                check(not inferred, f"{label}: {key} inferred from {len(inferred)} items, none expected")
            else:
                check(len(inferred) == 1, f"{label}: {key} inferred from {len(inferred)} items")
                image = inferred[0]
                check(image.ValueType == "IMAGE" and concept(image) == code_tuple(codes.DCM.SourceOfMeasurement),
                      f"{label}: source of measurement item")
                r = image.ReferencedSOPSequence[0]
                src = sources[on["instance"]]
                check((r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) == (src.SOPClassUID, src.SOPInstanceUID),
                      f"{label}: source of measurement is not instance {on['instance']}")
                frame = r.get("ReferencedFrameNumber")
                check((None if frame is None else int(frame)) == on["frame"],
                      f"{label}: referenced frame {frame} != {on['frame']}")
        presence = [c for c in children(g, "CODE") if concept(c) == want and c.RelationshipType == "CONTAINS"]
        check(len(presence) == 1, f"{label}: presence item")
        expected = codes.SCT.Present if f["positive"] else codes.SCT.Absent
        check(code_of(presence[0].ConceptCodeSequence[0]) == code_tuple(expected), f"{label}: presence value")
        comment = one(g, "TEXT", codes.DCM.Comment).TextValue
        check(m["intended_use"] in comment, f"{label}: intended use")


def minmax(a):
    a = a.astype(np.int64)
    lo, hi = a.min(), a.max()
    if hi == lo:
        return np.zeros(a.shape, np.uint8)
    return ((a - lo) * 255 // (hi - lo)).astype(np.uint8)


def check_sc(result, sources, case, m, label):
    src = sources[0]
    check(result.SOPClassUID == SECONDARY_CAPTURE, f"{label}: SOP class")
    check(result.BurnedInAnnotation == "YES", f"{label}: burned in annotation")
    check(result.ConversionType == "WSD", f"{label}: conversion type")
    check(result.Modality == "OT", f"{label}: modality")
    check(list(result.ImageType)[:2] == ["DERIVED", "SECONDARY"], f"{label}: image type")
    ref = result.SourceImageSequence[0]
    check((ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (src.SOPClassUID, src.SOPInstanceUID),
          f"{label}: source image reference")
    check(code_of(ref.PurposeOfReferenceCodeSequence[0]) == code_tuple(codes.DCM.SourceImageForImageProcessingOperation),
          f"{label}: source image purpose")
    rel = result.RelatedSeriesSequence[0]
    check((rel.StudyInstanceUID, rel.SeriesInstanceUID) == (src.StudyInstanceUID, src.SeriesInstanceUID),
          f"{label}: related series")
    check(result.BitsAllocated == 8 and result.BitsStored == 8 and result.PixelRepresentation == 0, f"{label}: 8-bit")
    rows, cols = case["rendered_rows"], case["rendered_columns"]
    check(result.Columns == cols and result.Rows > rows, f"{label}: band added below ({result.Rows}x{result.Columns})")
    px = result.pixel_array
    rgb = result.PhotometricInterpretation == "RGB"
    check(result.PhotometricInterpretation in ("RGB", "MONOCHROME2"), f"{label}: photometric")
    if case["rendering"] == "minmax":
        expected = minmax(src.pixel_array)
    elif case["rendering"] == "raw":
        expected = src.pixel_array
    else:
        expected = None
    if expected is not None:
        check(np.array_equal(px[:rows], expected), f"{label}: the image area is not the source's rendering")
    for kw in ["LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"]:
        if src.get("LossyImageCompression") == "01" and kw in src:
            check(result.get(kw) == src[kw].value, f"{label}: {kw} not kept")
        elif kw in result:
            fail(f"{label}: {kw} claimed for a source that was not lossy")
    band = px[rows:]
    check(set(np.unique(band)) <= {0, 255} and (band == 255).any(), f"{label}: band is black with white text")
    check(rgb == (src.get("SamplesPerPixel", 1) == 3 and case["rendering"] == "raw"), f"{label}: colour kept")


def main():
    m = json.load(open(sys.argv[1]))
    n = 0
    for case in m["cases"]:
        label = f"{case['name']} {case['kind']}"
        result = pydicom.dcmread(case["result"])
        sources = [pydicom.dcmread(p) for p in case["sources"]]
        check(result.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1", f"{label}: transfer syntax")
        check(result.StudyInstanceUID == sources[0].StudyInstanceUID, f"{label}: same study")
        check(result.SeriesInstanceUID != sources[0].SeriesInstanceUID, f"{label}: new series")
        check(result.SOPInstanceUID.startswith("2.25."), f"{label}: new instance UID")
        check_copied(result, sources[0], label)
        check_equipment(result, m, label)
        if case["kind"] == "sr":
            check_sr(result, sources, case, m, label)
        else:
            check_sc(result, sources, case, m, label)
        print(f"ok {label}")
        n += 1
    print(f"checked {n} result objects")


if __name__ == "__main__":
    main()
