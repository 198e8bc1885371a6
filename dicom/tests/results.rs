//! Result objects (issue 9, results as DICOM): the TID 1500 SR and the burned-in secondary
//! capture built from source series, read back and checked.
//!
//! Always: synthetic source series (built here with dicom-object, no pixel data, some with
//! patient attributes missing) → SR and SC → read back with dicom-object: classes, flags,
//! copied patient/study attributes, references; hostile inputs end as typed errors.
//!
//! With `NIGHTINGALE_PEERS=1` (scripts/test.sh sets it; then a missing peer fails the test):
//! real files from pydicom's test data (CT_small.dcm, the RG1_UNCR.dcm CR chest, its lossy
//! JPEG 2000 twin RG1_J2KI.dcm and the SC_rgb.dcm RGB image of pydicom-data, located by the
//! venv's pydicom) and the synthetic
//! series as well, each written to a temporary folder with its results, then
//! - `dciodvfy` (Debian dicom3tools) on every result object: its `Error` lines must all be
//!   errors dciodvfy also reports on the source instance it copies from (none, on these);
//! - `dsrdump -v` (dcmtk) reads each SR's document tree without an error;
//! - `tests/peer/check_result_objects.py` (pydicom) reads each SR's content tree and each
//!   SC against the sources and the inputs listed in a manifest: concept codes from pydicom's
//!   own code dictionary, the probability and threshold values, the device UID derived
//!   independently, every reference, the copied attributes, and the SC's image area
//!   re-rendered from the source by numpy.
//!
//! `NIGHTINGALE_RESULTS_OUT=DIR` keeps the objects there instead of in a temporary folder.
//! The venv is `$NIGHTINGALE_VENV` (absolute, or relative to the repository root; default
//! `.venv`), as in scripts/test.sh.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{InMemDicomObject, OpenFileOptions};
use nightingale_dicom::results::{
    AI_RESULT_LABEL, COMPREHENSIVE_SR, Code, Finding, MeasuredOn, RenderedImage, RenderedPixels,
    ResultContext, ResultError, ResultObject, SECONDARY_CAPTURE, SourceSeries, Uid, build_sc,
    build_sr,
};

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const CHECKSUM: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn ctx(intended_use: &str) -> ResultContext {
    ResultContext::new("chest-demo", "1.2.0", CHECKSUM, intended_use)
}

fn findings() -> Vec<Finding> {
    vec![
        Finding {
            label: Code::new("233604007", "SCT", "Pneumonia"),
            probability: 0.873,
            threshold: 0.5,
            positive: true,
            measured_on: None,
        },
        Finding {
            label: Code::local("pleural-effusion-demo", "Pleural effusion (demo)"),
            probability: 0.125,
            threshold: 0.4,
            positive: false,
            measured_on: None,
        },
    ]
}

fn s(obj: &mut InMemDicomObject, tag: dicom_core::Tag, vr: VR, v: &str) {
    obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
}

/// A synthetic CT instance without pixel data; `full` adds the patient/study attributes.
fn synthetic(sop: &str, full: bool) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    s(&mut o, tags::SOP_CLASS_UID, VR::UI, CT);
    s(&mut o, tags::SOP_INSTANCE_UID, VR::UI, sop);
    s(
        &mut o,
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        "1.2.826.0.1.3680043.10.1383.9.1",
    );
    s(
        &mut o,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        "1.2.826.0.1.3680043.10.1383.9.1.1",
    );
    s(&mut o, tags::MODALITY, VR::CS, "CT");
    if full {
        s(&mut o, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100");
        s(&mut o, tags::PATIENT_NAME, VR::PN, "Müller^Jürgen");
        s(&mut o, tags::PATIENT_ID, VR::LO, "SYN-0001");
        s(&mut o, tags::PATIENT_BIRTH_DATE, VR::DA, "19700101");
        s(&mut o, tags::PATIENT_SEX, VR::CS, "M");
        s(&mut o, tags::STUDY_DATE, VR::DA, "20260102");
        s(&mut o, tags::STUDY_TIME, VR::TM, "101500");
        s(&mut o, tags::ACCESSION_NUMBER, VR::SH, "ACC42");
        s(&mut o, tags::REFERRING_PHYSICIAN_NAME, VR::PN, "Who^Doctor");
        s(&mut o, tags::STUDY_ID, VR::SH, "S1");
        s(&mut o, tags::STUDY_DESCRIPTION, VR::LO, "CT chest");
        s(&mut o, tags::PATIENT_AGE, VR::AS, "056Y");
    }
    o
}

fn synthetic_series(n: usize, full: bool) -> Vec<InMemDicomObject> {
    (1..=n)
        .map(|i| synthetic(&format!("1.2.826.0.1.3680043.10.1383.9.1.1.{i}"), full))
        .collect()
}

fn read_back(obj: &ResultObject) -> InMemDicomObject {
    assert_eq!(&obj.bytes[128..132], b"DICM");
    let file = OpenFileOptions::new()
        .from_reader(&obj.bytes[128..])
        .expect("a result object reads back");
    assert_eq!(
        file.meta().transfer_syntax(),
        "1.2.840.10008.1.2.1",
        "Explicit VR Little Endian"
    );
    assert_eq!(file.meta().media_storage_sop_class_uid(), obj.sop_class_uid);
    file.into_inner()
}

fn text(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<String> {
    obj.element_opt(tag)
        .unwrap()
        .map(|e| e.to_str().unwrap().trim_end_matches(['\0', ' ']).to_owned())
}

fn grey_image(sop: &str, rows: usize, columns: usize) -> RenderedImage {
    RenderedImage {
        rows,
        columns,
        pixels: RenderedPixels::Grey((0..rows * columns).map(|i| (i % 251) as u8).collect()),
        source_sop_instance_uid: Uid::parse(sop).unwrap(),
        frame: None,
        heatmap: None,
    }
}

#[test]
fn synthetic_series_sr_and_sc_read_back() {
    let series = synthetic_series(3, true);
    let source = SourceSeries::from_instances(&series).unwrap();
    let ctx = ctx("Research use only: flags chest radiographs for review.");
    let sr = build_sr(&source, &ctx, &findings()).unwrap();
    let sc = build_sc(
        &source,
        &ctx,
        &findings(),
        grey_image("1.2.826.0.1.3680043.10.1383.9.1.1.2", 64, 64),
    )
    .unwrap();

    for (obj, class) in [(&sr, COMPREHENSIVE_SR), (&sc, SECONDARY_CAPTURE)] {
        let o = read_back(obj);
        assert_eq!(text(&o, tags::SOP_CLASS_UID).as_deref(), Some(class));
        assert_eq!(
            text(&o, tags::SOP_INSTANCE_UID).unwrap(),
            obj.sop_instance_uid.as_str()
        );
        // Same study, a new series.
        assert_eq!(
            text(&o, tags::STUDY_INSTANCE_UID).unwrap(),
            "1.2.826.0.1.3680043.10.1383.9.1"
        );
        assert_eq!(
            text(&o, tags::SERIES_INSTANCE_UID).unwrap(),
            obj.series_instance_uid.as_str()
        );
        assert_ne!(
            obj.series_instance_uid.as_str(),
            "1.2.826.0.1.3680043.10.1383.9.1.1"
        );
        // Copied exactly, in the source's character set (the context is ASCII).
        for tag in [
            tags::SPECIFIC_CHARACTER_SET,
            tags::PATIENT_NAME,
            tags::PATIENT_ID,
            tags::PATIENT_BIRTH_DATE,
            tags::PATIENT_SEX,
            tags::STUDY_DATE,
            tags::STUDY_TIME,
            tags::ACCESSION_NUMBER,
            tags::REFERRING_PHYSICIAN_NAME,
            tags::STUDY_ID,
            tags::STUDY_DESCRIPTION,
            tags::PATIENT_AGE,
        ] {
            assert_eq!(text(&o, tag), text(&series[0], tag), "{tag}");
        }
        let eq = o
            .element(tags::CONTRIBUTING_EQUIPMENT_SEQUENCE)
            .unwrap()
            .items()
            .unwrap();
        assert_eq!(eq.len(), 1);
        assert_eq!(
            text(&eq[0], tags::MANUFACTURER).as_deref(),
            Some("Nightingale")
        );
        assert_eq!(
            text(&eq[0], tags::MANUFACTURER_MODEL_NAME).as_deref(),
            Some("chest-demo")
        );
        assert_eq!(
            text(&eq[0], tags::DEVICE_UID).unwrap(),
            Uid::for_bundle(CHECKSUM).as_str()
        );
    }

    // The results SCU sends Part 10 files as scu::Part10File reads them.
    let dir = tempfile::tempdir().unwrap();
    for (obj, name) in [(&sr, "sr.dcm"), (&sc, "sc.dcm")] {
        let path = dir.path().join(name);
        std::fs::write(&path, &obj.bytes).unwrap();
        let file = nightingale_dicom::scu::Part10File::open(&path).unwrap();
        assert_eq!(file.sop_class_uid, obj.sop_class_uid);
        assert_eq!(file.sop_instance_uid, obj.sop_instance_uid.as_str());
        assert_eq!(file.transfer_syntax, "1.2.840.10008.1.2.1");
        assert_eq!(
            file.dataset_offset + file.dataset_len,
            obj.bytes.len() as u64
        );
    }

    // A finding measured on frame 3 of the series' second instance: its Probability is
    // INFERRED FROM that image and frame; the threshold from nothing.
    let mut measured = findings();
    measured[0].measured_on = Some(MeasuredOn {
        instance: 1,
        frame: Some(3),
    });
    let o = read_back(&build_sr(&source, &ctx, &measured).unwrap());
    let mut inferred = Vec::new();
    fn walk(items: &[InMemDicomObject], out: &mut Vec<(String, String, Option<String>)>) {
        for item in items {
            if text(item, tags::RELATIONSHIP_TYPE).as_deref() == Some("INFERRED FROM") {
                let name = &item
                    .element(tags::CONCEPT_NAME_CODE_SEQUENCE)
                    .unwrap()
                    .items()
                    .unwrap()[0];
                let r = &item
                    .element(tags::REFERENCED_SOP_SEQUENCE)
                    .unwrap()
                    .items()
                    .unwrap()[0];
                out.push((
                    text(name, tags::CODE_VALUE).unwrap(),
                    text(r, tags::REFERENCED_SOP_INSTANCE_UID).unwrap(),
                    text(r, tags::REFERENCED_FRAME_NUMBER),
                ));
            }
            if let Ok(e) = item.element(tags::CONTENT_SEQUENCE) {
                walk(e.items().unwrap(), out);
            }
        }
    }
    walk(std::slice::from_ref(&o), &mut inferred);
    assert_eq!(
        inferred,
        vec![(
            "121112".to_owned(),
            "1.2.826.0.1.3680043.10.1383.9.1.1.2".to_owned(),
            Some("3".to_owned())
        )]
    );

    let o = read_back(&sr);
    assert_eq!(text(&o, tags::MODALITY).as_deref(), Some("SR"));
    assert_eq!(
        text(&o, tags::VERIFICATION_FLAG).as_deref(),
        Some("UNVERIFIED")
    );
    assert_eq!(text(&o, tags::COMPLETION_FLAG).as_deref(), Some("COMPLETE"));
    let evidence = o
        .element(tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE)
        .unwrap()
        .items()
        .unwrap();
    let refs: BTreeSet<String> = evidence[0]
        .element(tags::REFERENCED_SERIES_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()[0]
        .element(tags::REFERENCED_SOP_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()
        .iter()
        .map(|i| text(i, tags::REFERENCED_SOP_INSTANCE_UID).unwrap())
        .collect();
    let expected: BTreeSet<String> = series
        .iter()
        .map(|i| text(i, tags::SOP_INSTANCE_UID).unwrap())
        .collect();
    assert_eq!(refs, expected);

    let o = read_back(&sc);
    assert_eq!(text(&o, tags::BURNED_IN_ANNOTATION).as_deref(), Some("YES"));
    assert_eq!(text(&o, tags::CONVERSION_TYPE).as_deref(), Some("WSD"));
    assert_eq!(
        text(&o, tags::PHOTOMETRIC_INTERPRETATION).as_deref(),
        Some("MONOCHROME2")
    );
    let src = o
        .element(tags::SOURCE_IMAGE_SEQUENCE)
        .unwrap()
        .items()
        .unwrap();
    assert_eq!(
        text(&src[0], tags::REFERENCED_SOP_INSTANCE_UID).as_deref(),
        Some("1.2.826.0.1.3680043.10.1383.9.1.1.2")
    );
    let rows = o.element(tags::ROWS).unwrap().to_int::<usize>().unwrap();
    assert!(rows > 64, "the band is added below the image");
    let px = o.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
    // The image area is the rendered input, untouched.
    let input: Vec<u8> = (0..64 * 64).map(|i| (i % 251) as u8).collect();
    assert_eq!(&px[..64 * 64], &input[..]);
}

#[test]
fn non_ascii_context_writes_utf8() {
    let series = synthetic_series(1, true);
    let source = SourceSeries::from_instances(&series).unwrap();
    let sr = build_sr(&source, &ctx("Usage prévu: recherche."), &findings()).unwrap();
    let o = read_back(&sr);
    assert_eq!(
        text(&o, tags::SPECIFIC_CHARACTER_SET).as_deref(),
        Some("ISO_IR 192")
    );
    assert_eq!(
        text(&o, tags::PATIENT_NAME).as_deref(),
        Some("Müller^Jürgen")
    );
}

#[test]
fn missing_patient_attributes_become_empty_type2_values() {
    let series = synthetic_series(1, false);
    let source = SourceSeries::from_instances(&series).unwrap();
    let sr = build_sr(&source, &ctx("Research use."), &findings()).unwrap();
    let o = read_back(&sr);
    for tag in [
        tags::PATIENT_NAME,
        tags::PATIENT_ID,
        tags::STUDY_DATE,
        tags::ACCESSION_NUMBER,
    ] {
        assert_eq!(text(&o, tag).as_deref(), Some(""), "{tag}");
    }
    assert!(
        o.element_opt(tags::SPECIFIC_CHARACTER_SET)
            .unwrap()
            .is_none()
    );
    assert!(o.element_opt(tags::STUDY_DESCRIPTION).unwrap().is_none());
}

#[test]
fn rgb_tiny_and_many_findings() {
    let series = synthetic_series(1, true);
    let source = SourceSeries::from_instances(&series).unwrap();
    let sop = "1.2.826.0.1.3680043.10.1383.9.1.1.1";
    let many: Vec<Finding> = (0..40)
        .map(|i| Finding {
            label: Code::local(&format!("o{i}"), &"very long label ".repeat(20)),
            probability: 1.0,
            threshold: 0.0,
            positive: true,
            measured_on: None,
        })
        .collect();
    for (rows, columns) in [(1, 1), (3, 2), (2, 7000), (65535, 2)] {
        let rgb = RenderedImage {
            rows,
            columns,
            pixels: RenderedPixels::Rgb(vec![128; rows * columns * 3]),
            source_sop_instance_uid: Uid::parse(sop).unwrap(),
            frame: Some(1),
            heatmap: None,
        };
        let sc = build_sc(&source, &ctx("Research use."), &many, rgb).unwrap();
        let o = read_back(&sc);
        assert_eq!(
            text(&o, tags::PHOTOMETRIC_INTERPRETATION).as_deref(),
            Some("RGB")
        );
        let out_rows = o.element(tags::ROWS).unwrap().to_int::<usize>().unwrap();
        assert!(out_rows >= rows && out_rows <= 65535);
        let px = o.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
        assert_eq!(px.len(), (out_rows * columns * 3).next_multiple_of(2));
    }
}

#[test]
fn sc_keeps_the_source_images_lossy_history_and_orientation() {
    let mut series = synthetic_series(2, true);
    s(&mut series[1], tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "01");
    s(
        &mut series[1],
        tags::LOSSY_IMAGE_COMPRESSION_RATIO,
        VR::DS,
        "10",
    );
    s(
        &mut series[1],
        tags::LOSSY_IMAGE_COMPRESSION_METHOD,
        VR::CS,
        "ISO_15444_1",
    );
    s(&mut series[1], tags::PATIENT_ORIENTATION, VR::CS, "L\\F");
    let source = SourceSeries::from_instances(&series).unwrap();
    let ctx = ctx("Research use.");
    let lossy = build_sc(
        &source,
        &ctx,
        &findings(),
        grey_image("1.2.826.0.1.3680043.10.1383.9.1.1.2", 8, 8),
    )
    .unwrap();
    let o = read_back(&lossy);
    for tag in [
        tags::LOSSY_IMAGE_COMPRESSION,
        tags::LOSSY_IMAGE_COMPRESSION_RATIO,
        tags::LOSSY_IMAGE_COMPRESSION_METHOD,
        tags::PATIENT_ORIENTATION,
    ] {
        assert_eq!(text(&o, tag), text(&series[1], tag), "{tag}");
    }
    // The other instance was never lossy: nothing is claimed; its orientation is unknown.
    let plain = build_sc(
        &source,
        &ctx,
        &findings(),
        grey_image("1.2.826.0.1.3680043.10.1383.9.1.1.1", 8, 8),
    )
    .unwrap();
    let o = read_back(&plain);
    assert!(
        o.element_opt(tags::LOSSY_IMAGE_COMPRESSION)
            .unwrap()
            .is_none()
    );
    assert_eq!(text(&o, tags::PATIENT_ORIENTATION).as_deref(), Some(""));
}

#[test]
fn an_instance_stored_in_a_lossy_transfer_syntax_makes_a_lossy_sc() {
    // A review's finding: only a header that said "01" was copied; JPEG baseline without the
    // flag gave an SC that did not say it derives from a lossy image (PS3.3 C.7.6.1.1.5).
    let series = synthetic_series(2, true);
    let mut source = SourceSeries::from_instances(&series).unwrap();
    source.note_transfer_syntax(0, "1.2.840.10008.1.2.4.50\0");
    source.note_transfer_syntax(1, "1.2.840.10008.1.2.4.70");
    let ctx = ctx("Research use.");
    let sc = |sop: &str| {
        read_back(&build_sc(&source, &ctx, &findings(), grey_image(sop, 8, 8)).unwrap())
    };
    let o = sc("1.2.826.0.1.3680043.10.1383.9.1.1.1");
    assert_eq!(
        text(&o, tags::LOSSY_IMAGE_COMPRESSION).as_deref(),
        Some("01")
    );
    assert_eq!(
        text(&o, tags::LOSSY_IMAGE_COMPRESSION_METHOD).as_deref(),
        Some("ISO_10918_1")
    );
    // JPEG lossless: nothing claimed.
    let o = sc("1.2.826.0.1.3680043.10.1383.9.1.1.2");
    assert!(
        o.element_opt(tags::LOSSY_IMAGE_COMPRESSION)
            .unwrap()
            .is_none()
    );
}

#[test]
fn the_results_keep_the_sources_time_zone() {
    // A review's finding: "+0000" whatever the source, so a study at 08:30 +0100 read as
    // 08:30 UTC. Now the source's offset is copied and the result's own times are in it.
    let mut series = synthetic_series(1, true);
    s(
        &mut series[0],
        tags::TIMEZONE_OFFSET_FROM_UTC,
        VR::SH,
        "-0530",
    );
    let source = SourceSeries::from_instances(&series).unwrap();
    let ctx = ctx("Research use.");
    let sr = read_back(&build_sr(&source, &ctx, &findings()).unwrap());
    assert_eq!(
        text(&sr, tags::TIMEZONE_OFFSET_FROM_UTC).as_deref(),
        Some("-0530")
    );
    let created: chrono::DateTime<chrono::Utc> = ctx.created.into();
    let local = created.with_timezone(&chrono::FixedOffset::west_opt(5 * 3600 + 1800).unwrap());
    assert_eq!(
        text(&sr, tags::INSTANCE_CREATION_DATE).unwrap(),
        local.format("%Y%m%d").to_string()
    );
    assert!(
        text(&sr, tags::INSTANCE_CREATION_TIME)
            .unwrap()
            .starts_with(&local.format("%H%M%S").to_string())
    );
    let equipment = sr
        .element(tags::CONTRIBUTING_EQUIPMENT_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()[0]
        .clone();
    assert!(
        text(&equipment, tags::CONTRIBUTION_DATE_TIME)
            .unwrap()
            .ends_with("-0530")
    );
    // A source without one (or with a malformed one): none written, times in local time.
    for offset in [None, Some("+2500"), Some("0100")] {
        let mut series = synthetic_series(1, true);
        if let Some(o) = offset {
            s(&mut series[0], tags::TIMEZONE_OFFSET_FROM_UTC, VR::SH, o);
        }
        let source = SourceSeries::from_instances(&series).unwrap();
        let sr = read_back(&build_sr(&source, &ctx, &findings()).unwrap());
        assert!(
            sr.element_opt(tags::TIMEZONE_OFFSET_FROM_UTC)
                .unwrap()
                .is_none(),
            "{offset:?}"
        );
    }
}

/// `obj` (Latin-1, `ISO_IR 100`) written in Explicit VR Little Endian and read back, its
/// Specific Character Set relabelled `relabel` in the bytes (the same length), if given.
fn read_back_as(obj: &InMemDicomObject, relabel: Option<&[u8; 10]>) -> InMemDicomObject {
    let ts = dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased();
    let mut bytes = Vec::new();
    obj.write_dataset_with_ts(&mut bytes, &ts).unwrap();
    if let Some(label) = relabel {
        let at = bytes
            .windows(10)
            .position(|w| w == b"ISO_IR 100")
            .expect("the character set is written");
        bytes[at..at + 10].copy_from_slice(label);
    }
    InMemDicomObject::read_dataset_with_ts(&bytes[..], &ts).unwrap()
}

#[test]
fn hostile_inputs_are_typed_errors() {
    let ctx = ctx("Research use.");
    assert!(matches!(
        SourceSeries::from_instances(&[]),
        Err(ResultError::EmptySeries)
    ));
    let mut two = synthetic_series(2, true);
    s(&mut two[1], tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3.4");
    assert!(matches!(
        SourceSeries::from_instances(&two),
        Err(ResultError::MixedStudies { index: 1 })
    ));
    let mut two = synthetic_series(2, true);
    s(&mut two[1], tags::SERIES_INSTANCE_UID, VR::UI, "1.2.3.4");
    assert!(matches!(
        SourceSeries::from_instances(&two),
        Err(ResultError::MixedSeries { index: 1 })
    ));
    // Red-team finding: one series, two patients (or two modalities / SOP classes). The
    // result would be filed under instance #0's patient while listing the other's images.
    for (tag, vr, value, attribute) in [
        (tags::PATIENT_ID, VR::LO, "PID-BRAVO-222", "PatientID"),
        (
            tags::ISSUER_OF_PATIENT_ID,
            VR::LO,
            "HOSP-B",
            "IssuerOfPatientID",
        ),
        (tags::PATIENT_NAME, VR::PN, "Bravo^Patient", "PatientName"),
        (tags::MODALITY, VR::CS, "US", "Modality"),
        (
            tags::SOP_CLASS_UID,
            VR::UI,
            "1.2.840.10008.5.1.4.1.1.6.1",
            "SOPClassUID",
        ),
    ] {
        let mut two = synthetic_series(2, true);
        s(&mut two[1], tag, vr, value);
        let err = SourceSeries::from_instances(&two).unwrap_err();
        assert!(
            matches!(err, ResultError::MixedIdentity { index: 1, attribute: a } if a == attribute),
            "{attribute}: {err:?}"
        );
        assert!(!err.to_string().contains(value), "{err}");
    }
    // Red-team finding: ISO 2022 code extensions (Japanese, Korean) were copied undecoded and
    // relabelled UTF-8. A single character set is kept (decoded by dicom-rs).
    // So is a single set dicom-rs does not know (Latin-5, Latin-9: read as the default
    // repertoire, the names reached PACS garbled; a later red-team finding).
    for charset in [
        "ISO 2022 IR 6\\ISO 2022 IR 87",
        "\\ISO 2022 IR 149",
        "ISO 2022 IR 13\\ISO 2022 IR 87",
        "ISO_IR 148",
        "ISO_IR 203",
    ] {
        let mut one = synthetic_series(1, true);
        s(&mut one[0], tags::SPECIFIC_CHARACTER_SET, VR::CS, charset);
        assert!(
            matches!(
                SourceSeries::from_instances(&one),
                Err(ResultError::UnsupportedCharset)
            ),
            "{charset}"
        );
    }
    for charset in [
        "ISO_IR 100",
        "ISO_IR 192",
        "GB18030",
        "ISO_IR 13",
        "ISO_IR 144",
    ] {
        let mut one = synthetic_series(1, true);
        s(&mut one[0], tags::SPECIFIC_CHARACTER_SET, VR::CS, charset);
        assert!(SourceSeries::from_instances(&one).is_ok(), "{charset}");
    }
    // Red-team finding: text whose bytes are not valid in the declared set (Latin-1 bytes
    // labelled UTF-8, the most common mislabelling) was read by dicom-rs as `\ooo`
    // escapes, whose backslashes reached PACS as value separators (one name became three).
    let mut latin1 = synthetic_series(1, true).remove(0);
    s(
        &mut latin1,
        tags::SPECIFIC_CHARACTER_SET,
        VR::CS,
        "ISO_IR 100",
    );
    s(&mut latin1, tags::PATIENT_NAME, VR::PN, "Müller^Jürgen");
    let mislabelled = read_back_as(&latin1, Some(b"ISO_IR 192"));
    assert!(matches!(
        SourceSeries::from_instances([&mislabelled]),
        Err(ResultError::UnsupportedCharset)
    ));
    // The same name labelled as what it is: kept.
    let labelled = read_back_as(&latin1, None);
    assert!(SourceSeries::from_instances([&labelled]).is_ok());
    // Red-team finding: JIS X 0208 (ISO 2022 IR 87) was written back without the return to
    // the default repertoire at the end of the name; the same characters go in UTF-8.
    let mut jis = synthetic_series(1, true);
    s(
        &mut jis[0],
        tags::SPECIFIC_CHARACTER_SET,
        VR::CS,
        "ISO 2022 IR 87",
    );
    s(
        &mut jis[0],
        tags::PATIENT_NAME,
        VR::PN,
        "Yamada^Tarou=山田^太郎",
    );
    let source = SourceSeries::from_instances(&jis).unwrap();
    let sr = read_back(&build_sr(&source, &ctx, &findings()).unwrap());
    let text_of = |tag| sr.element(tag).unwrap().to_str().unwrap().trim().to_owned();
    assert_eq!(text_of(tags::SPECIFIC_CHARACTER_SET), "ISO_IR 192");
    assert_eq!(text_of(tags::PATIENT_NAME), "Yamada^Tarou=山田^太郎");
    // A backslash in free text (Patient Comments, LT) is text, whatever follows it (a later
    // red-team finding: `\\pacs\201` and a yen sign before "100" were refused).
    let mut comments = synthetic_series(1, true);
    for text in [
        "C:\\scans\\a",
        "old scans under \\\\pacs\\201\\x",
        "M\\374ller",
    ] {
        s(&mut comments[0], tags::PATIENT_COMMENTS, VR::LT, text);
        assert!(SourceSeries::from_instances(&comments).is_ok(), "{text}");
    }
    // Text that could not be decoded inside a sequence's item (Other Patient IDs): refused
    // like at the top level (its issuer reached PACS as two values: a later red-team finding).
    let mut latin1_item = synthetic_series(1, true).remove(0);
    s(
        &mut latin1_item,
        tags::SPECIFIC_CHARACTER_SET,
        VR::CS,
        "ISO_IR 100",
    );
    let mut item = InMemDicomObject::new_empty();
    s(&mut item, tags::PATIENT_ID, VR::LO, "X1");
    s(
        &mut item,
        tags::ISSUER_OF_PATIENT_ID,
        VR::LO,
        "Hôpital Central",
    );
    latin1_item.put(DataElement::new(
        tags::OTHER_PATIENT_I_DS_SEQUENCE,
        VR::SQ,
        dicom_core::value::DataSetSequence::from(vec![item]),
    ));
    let mislabelled = read_back_as(&latin1_item, Some(b"ISO_IR 192"));
    assert!(matches!(
        SourceSeries::from_instances([&mislabelled]),
        Err(ResultError::UnsupportedCharset)
    ));
    let mut one = synthetic_series(1, true);
    one[0].remove_element(tags::SOP_INSTANCE_UID);
    assert!(matches!(
        SourceSeries::from_instances(&one),
        Err(ResultError::MissingAttribute {
            index: 0,
            attribute: "SOP Instance UID"
        })
    ));
    let mut one = synthetic_series(1, true);
    s(&mut one[0], tags::STUDY_INSTANCE_UID, VR::UI, "not a uid");
    assert!(matches!(
        SourceSeries::from_instances(&one),
        Err(ResultError::MissingAttribute {
            attribute: "Study Instance UID",
            ..
        })
    ));

    let series = synthetic_series(1, true);
    let source = SourceSeries::from_instances(&series).unwrap();
    assert!(matches!(
        build_sc(&source, &ctx, &findings(), grey_image("1.2.3.999", 4, 4)),
        Err(ResultError::UnknownSourceInstance)
    ));
    let mut bad = findings();
    bad[1].probability = f32::NAN;
    assert!(matches!(
        build_sr(&source, &ctx, &bad),
        Err(ResultError::OutOfRange {
            index: 1,
            what: "probability",
            ..
        })
    ));
    assert!(matches!(
        build_sr(&source, &ctx, &[]),
        Err(ResultError::NoFindings)
    ));
    // A measurement on an instance the series does not have, or on frame 0 (frames count
    // from 1), is refused rather than written as a dangling reference.
    for on in [
        MeasuredOn {
            instance: 1,
            frame: None,
        },
        MeasuredOn {
            instance: 0,
            frame: Some(0),
        },
    ] {
        let mut bad = findings();
        bad[0].measured_on = Some(on);
        assert!(
            matches!(
                build_sr(&source, &ctx, &bad),
                Err(ResultError::UnknownSourceInstance)
            ),
            "{on:?}"
        );
    }
}

// ---------------------------------------------------------------- real peers

fn peers() -> bool {
    std::env::var("NIGHTINGALE_PEERS").is_ok_and(|v| v == "1")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn python() -> PathBuf {
    let venv = std::env::var("NIGHTINGALE_VENV").unwrap_or_else(|_| ".venv".into());
    let python = repo_root().join(venv).join("bin/python");
    assert!(
        python.exists(),
        "NIGHTINGALE_PEERS=1 needs the venv's python at {} (set NIGHTINGALE_VENV)",
        python.display()
    );
    python
}

fn testdata(name: &str) -> PathBuf {
    pydicom_file(&format!("get_testdata_file({name:?})"), name)
}

/// A file of pydicom's character-set test set (`pydicom/data/charset_files`).
fn charset_file(name: &str) -> PathBuf {
    pydicom_file(&format!("get_charset_files({name:?})[0]"), name)
}

/// The path `pydicom.data.<lookup>` gives for one of its files.
fn pydicom_file(lookup: &str, name: &str) -> PathBuf {
    let out = Command::new(python())
        .args([
            "-c",
            &format!("import pydicom.data as d; print(d.{lookup})"),
        ])
        .output()
        .expect("the venv's python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(
        path.is_file(),
        "pydicom test file {name} not found at {}",
        path.display()
    );
    path
}

/// The `Error` lines dciodvfy reports on a file.
fn dciodvfy_errors(path: &Path) -> (BTreeSet<String>, String) {
    let out = Command::new("dciodvfy")
        .arg(path)
        .output()
        .expect("dciodvfy (Debian dicom3tools) is installed");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let errors = all
        .lines()
        .filter(|l| l.starts_with("Error"))
        .map(str::to_owned)
        .collect();
    (errors, all)
}

/// An 8-bit rendering of a real source for the SC: the stored values (masked to Bits Stored,
/// sign-extended when signed) stretched min..max to 0..255; 8-bit data as it is.
fn render(obj: &InMemDicomObject) -> RenderedImage {
    let int = |t| obj.element(t).unwrap().to_int::<usize>().unwrap();
    let (rows, columns, samples) = (
        int(tags::ROWS),
        int(tags::COLUMNS),
        int(tags::SAMPLES_PER_PIXEL),
    );
    let (allocated, stored, signed) = (
        int(tags::BITS_ALLOCATED),
        int(tags::BITS_STORED),
        int(tags::PIXEL_REPRESENTATION) == 1,
    );
    let raw = obj.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
    let n = rows * columns * samples;
    let sop = Uid::parse(&text(obj, tags::SOP_INSTANCE_UID).unwrap()).unwrap();
    if allocated == 8 {
        let pixels = raw[..n].to_vec();
        let pixels = if samples == 3 {
            RenderedPixels::Rgb(pixels)
        } else {
            RenderedPixels::Grey(pixels)
        };
        return RenderedImage {
            rows,
            columns,
            pixels,
            source_sop_instance_uid: sop,
            frame: None,
            heatmap: None,
        };
    }
    assert_eq!((allocated, samples), (16, 1));
    let values: Vec<i64> = raw[..2 * n]
        .chunks_exact(2)
        .map(|b| {
            let v = i64::from(u16::from_le_bytes([b[0], b[1]])) & ((1 << stored) - 1);
            if signed && v >> (stored - 1) == 1 {
                v - (1 << stored)
            } else {
                v
            }
        })
        .collect();
    let (lo, hi) = (*values.iter().min().unwrap(), *values.iter().max().unwrap());
    let pixels = values
        .iter()
        .map(|v| {
            if hi == lo {
                0
            } else {
                ((v - lo) * 255 / (hi - lo)) as u8
            }
        })
        .collect();
    RenderedImage {
        rows,
        columns,
        pixels: RenderedPixels::Grey(pixels),
        source_sop_instance_uid: sop,
        frame: None,
        heatmap: None,
    }
}

fn write_part10(obj: &InMemDicomObject, path: &Path) {
    let file = obj
        .clone()
        .with_meta(
            dicom_object::meta::FileMetaTableBuilder::new().transfer_syntax("1.2.840.10008.1.2.1"),
        )
        .unwrap();
    file.write_to_file(path).unwrap();
}

#[test]
fn real_files_pass_dciodvfy_and_pydicom() {
    if !peers() {
        eprintln!("NIGHTINGALE_PEERS is not 1: dciodvfy and pydicom checks skipped");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // NIGHTINGALE_RESULTS_OUT keeps the objects (and the manifest) for a look.
    let kept = std::env::var_os("NIGHTINGALE_RESULTS_OUT").map(PathBuf::from);
    let dir = kept.as_deref().unwrap_or(tmp.path());
    std::fs::create_dir_all(dir).unwrap();
    let ctx = ctx("Research use only: flags chest radiographs for review. Not for diagnosis.");
    let findings = findings();
    let mut cases = Vec::new();
    let mut verified = Vec::new();

    // (name, source files, rendering used for the SC)
    let mut sets: Vec<(String, Vec<PathBuf>, &str)> = vec![
        ("ct_small".into(), vec![testdata("CT_small.dcm")], "minmax"),
        ("cr_rg1".into(), vec![testdata("RG1_UNCR.dcm")], "minmax"),
        ("sc_rgb".into(), vec![testdata("SC_rgb.dcm")], "raw"),
        // Lossy JPEG 2000, not decoded here: a synthetic rendering, the lossy history copied.
        ("cr_rg1_j2ki".into(), vec![testdata("RG1_J2KI.dcm")], "none"),
    ];
    for (name, full) in [("synthetic_full", true), ("synthetic_bare", false)] {
        let paths = synthetic_series(3, full)
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let p = dir.join(format!("{name}_src{i}.dcm"));
                write_part10(o, &p);
                p
            })
            .collect();
        sets.push((name.into(), paths, "none"));
    }

    for (name, paths, rendering) in &sets {
        let objects: Vec<_> = paths
            .iter()
            .map(|p| OpenFileOptions::new().open_file(p).unwrap().into_inner())
            .collect();
        let source = SourceSeries::from_instances(&objects).unwrap();
        // The first finding was measured on the series' last instance, the second on the
        // whole series. (No frame: these are single-frame classes, where dciodvfy refuses a
        // Referenced Frame Number.)
        let mut findings = findings.clone();
        findings[0].measured_on = Some(MeasuredOn {
            instance: objects.len() - 1,
            frame: None,
        });
        let measured_on: Vec<_> = findings
            .iter()
            .map(|f| {
                f.measured_on
                    .map(|m| serde_json::json!({"instance": m.instance, "frame": m.frame}))
            })
            .collect();
        let sr = build_sr(&source, &ctx, &findings).unwrap();
        let image = if *rendering == "none" {
            grey_image(&text(&objects[0], tags::SOP_INSTANCE_UID).unwrap(), 32, 48)
        } else {
            render(&objects[0])
        };
        let (rows, columns) = (image.rows, image.columns);
        let sc = build_sc(&source, &ctx, &findings, image).unwrap();
        for (kind, obj) in [("sr", &sr), ("sc", &sc)] {
            let path = dir.join(format!("{name}_{kind}.dcm"));
            std::fs::write(&path, &obj.bytes).unwrap();
            let (errors, output) = dciodvfy_errors(&path);
            let (source_errors, _) = dciodvfy_errors(&paths[0]);
            eprintln!("== dciodvfy {name} {kind}\n{output}");
            let extra: Vec<_> = errors.difference(&source_errors).collect();
            assert!(
                extra.is_empty(),
                "{name} {kind}: dciodvfy errors not in the source: {extra:#?}"
            );
            if kind == "sr" {
                // dcmtk reads the document tree and checks its relationship constraints.
                let out = Command::new("dsrdump")
                    .arg("-v")
                    .arg(&path)
                    .output()
                    .expect("dsrdump (Debian dcmtk) is installed");
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(
                    out.status.success() && !err.lines().any(|l| l.starts_with("E:")),
                    "{name} sr: dsrdump: {err}"
                );
            }
            verified.push(format!("{name} {kind}"));
            cases.push(serde_json::json!({
                "name": name,
                "kind": kind,
                "result": path,
                "sources": paths,
                "rendering": rendering,
                "rendered_rows": rows,
                "rendered_columns": columns,
                "measured_on": measured_on,
            }));
        }
    }

    let manifest = serde_json::json!({
        "bundle_name": ctx.bundle_name,
        "bundle_version": ctx.bundle_version,
        "nightingale_version": ctx.nightingale_version,
        "bundle_checksum": CHECKSUM,
        "intended_use": ctx.intended_use,
        "warning": AI_RESULT_LABEL,
        "findings": findings.iter().map(|f| serde_json::json!({
            "value": f.label.value,
            "scheme": f.label.scheme,
            "meaning": f.label.meaning,
            "probability": f.probability,
            "threshold": f.threshold,
            "positive": f.positive,
        })).collect::<Vec<_>>(),
        "cases": cases,
    });
    let manifest_path = dir.join("manifest.json");
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    let out = Command::new(python())
        .arg(repo_root().join("tests/peer/check_result_objects.py"))
        .arg(&manifest_path)
        .output()
        .expect("the venv's python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "== check_result_objects.py\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pydicom check failed");
    assert!(
        stdout.contains(&format!("checked {} result objects", verified.len())),
        "the pydicom check must cover every object"
    );
}

/// pydicom's character-set files: those with ISO 2022 code extensions (several values) get
/// no result (their names would be copied undecoded); the single character sets do.
#[test]
fn real_files_with_code_extensions_get_no_result_and_single_charsets_do() {
    if !peers() {
        eprintln!("skipped: NIGHTINGALE_PEERS is not 1");
        return;
    }
    let mut refused = vec![];
    let mut kept = vec![];
    for name in [
        "chrH31.dcm",
        "chrH32.dcm",
        "chrI2.dcm",
        "chrJapMulti.dcm",
        "chrJapMultiExplicitIR6.dcm",
        "chrKoreanMulti.dcm",
        "chrArab.dcm",
        "chrFren.dcm",
        "chrGreek.dcm",
        "chrRuss.dcm",
        "chrX1.dcm",
        "chrX2.dcm",
    ] {
        let path = charset_file(name);
        let obj = OpenFileOptions::new()
            .open_file(&path)
            .unwrap()
            .into_inner();
        match SourceSeries::from_instances([&obj]) {
            Err(ResultError::UnsupportedCharset) => refused.push(name),
            Ok(_) => kept.push(name),
            Err(e) => panic!("{name}: {e}"),
        }
    }
    assert_eq!(
        refused,
        [
            "chrH31.dcm",
            "chrH32.dcm",
            "chrI2.dcm",
            "chrJapMulti.dcm",
            "chrJapMultiExplicitIR6.dcm",
            "chrKoreanMulti.dcm"
        ]
    );
    assert_eq!(kept.len(), 6, "{kept:?}");
}
