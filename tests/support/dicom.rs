//! DICOM Part 10 files and STOW-RS bodies for the HTTP tests, built with dicom-object (the
//! UIDs are the test's own inputs; nothing here comes from the code under test).
#![allow(dead_code)]

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_object::meta::FileMetaTableBuilder;

/// CT Image Storage.
pub const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
/// Explicit VR Little Endian.
pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
pub const BOUNDARY: &str = "nightingale-test-boundary";

/// A one-pixel CT instance as a Part 10 file; `marker` changes its content (not its UIDs).
pub fn part10(study: &str, series: &str, sop: &str, marker: u16) -> Vec<u8> {
    part10_in(study, series, sop, marker, EXPLICIT_LE)
}

/// [`part10`] written in transfer syntax `ts` (an uncompressed one).
pub fn part10_in(study: &str, series: &str, sop: &str, marker: u16, ts: &str) -> Vec<u8> {
    let mut obj = InMemDicomObject::new_empty();
    let ui = |v: &str| PrimitiveValue::from(v.to_owned());
    obj.put(DataElement::new(tags::SOP_CLASS_UID, VR::UI, ui(CT)));
    obj.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, ui(sop)));
    obj.put(DataElement::new(tags::MODALITY, VR::CS, ui("CT")));
    obj.put(DataElement::new(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        ui(study),
    ));
    obj.put(DataElement::new(
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        ui(series),
    ));
    obj.put(DataElement::new(
        tags::SAMPLES_PER_PIXEL,
        VR::US,
        PrimitiveValue::from(1u16),
    ));
    obj.put(DataElement::new(
        tags::ROWS,
        VR::US,
        PrimitiveValue::from(1u16),
    ));
    obj.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(1u16),
    ));
    obj.put(DataElement::new(
        tags::BITS_ALLOCATED,
        VR::US,
        PrimitiveValue::from(16u16),
    ));
    obj.put(DataElement::new(
        tags::BITS_STORED,
        VR::US,
        PrimitiveValue::from(16u16),
    ));
    obj.put(DataElement::new(
        tags::HIGH_BIT,
        VR::US,
        PrimitiveValue::from(15u16),
    ));
    obj.put(DataElement::new(
        tags::PIXEL_REPRESENTATION,
        VR::US,
        PrimitiveValue::from(0u16),
    ));
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        dicom_core::dicom_value!(U16, [marker]),
    ));
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(ts)
                .media_storage_sop_class_uid(CT)
                .media_storage_sop_instance_uid(sop),
        )
        .unwrap();
    let mut out = Vec::new();
    file.write_all(&mut out).unwrap();
    assert_eq!(&out[128..132], b"DICM");
    out
}

/// A STOW-RS body of whole Part 10 `files`, one `application/dicom` part each.
pub fn dicom_parts(files: &[Vec<u8>]) -> Vec<u8> {
    let parts: Vec<(&str, &[u8])> = files
        .iter()
        .map(|f| ("application/dicom", f.as_slice()))
        .collect();
    multipart(&parts)
}

/// A `multipart/related` body of `parts` (Content-Type, bytes), closed.
pub fn multipart(parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (content_type, bytes) in parts {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// The request Content-Type of [`multipart`] bodies.
pub fn content_type() -> String {
    format!("multipart/related; type=\"application/dicom\"; boundary={BOUNDARY}")
}
