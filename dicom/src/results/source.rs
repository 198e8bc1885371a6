//! The source series, read once: the attributes a result copies and the instances it
//! references.

use dicom_core::{PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_object::mem::InMemElement;

use super::{Code, ResultError, Uid};

/// The patient and study attributes a result copies exactly (PS3.3 Patient, Clinical Trial
/// Subject, General Study, Patient Study and Clinical Trial Study modules): every one the
/// source has is copied with its value untouched.
pub(crate) const COPIED: &[Tag] = &[
    // Patient
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::ISSUER_OF_PATIENT_ID,
    tags::ISSUER_OF_PATIENT_ID_QUALIFIERS_SEQUENCE,
    tags::TYPE_OF_PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_BIRTH_TIME,
    tags::PATIENT_SEX,
    tags::OTHER_PATIENT_I_DS_SEQUENCE,
    tags::PATIENT_COMMENTS,
    tags::PATIENT_SPECIES_DESCRIPTION,
    tags::PATIENT_SPECIES_CODE_SEQUENCE,
    tags::PATIENT_BREED_DESCRIPTION,
    tags::PATIENT_BREED_CODE_SEQUENCE,
    tags::RESPONSIBLE_PERSON,
    tags::RESPONSIBLE_PERSON_ROLE,
    tags::RESPONSIBLE_ORGANIZATION,
    tags::PATIENT_IDENTITY_REMOVED,
    tags::DEIDENTIFICATION_METHOD,
    tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE,
    // Clinical Trial Subject
    tags::CLINICAL_TRIAL_SPONSOR_NAME,
    tags::CLINICAL_TRIAL_PROTOCOL_ID,
    tags::CLINICAL_TRIAL_PROTOCOL_NAME,
    tags::CLINICAL_TRIAL_SITE_ID,
    tags::CLINICAL_TRIAL_SITE_NAME,
    tags::CLINICAL_TRIAL_SUBJECT_ID,
    tags::CLINICAL_TRIAL_SUBJECT_READING_ID,
    // General Study
    tags::STUDY_INSTANCE_UID,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::STUDY_ID,
    tags::ACCESSION_NUMBER,
    tags::ISSUER_OF_ACCESSION_NUMBER_SEQUENCE,
    tags::STUDY_DESCRIPTION,
    tags::PHYSICIANS_OF_RECORD,
    tags::NAME_OF_PHYSICIANS_READING_STUDY,
    tags::REFERENCED_STUDY_SEQUENCE,
    tags::PROCEDURE_CODE_SEQUENCE,
    // Patient Study
    tags::ADMITTING_DIAGNOSES_DESCRIPTION,
    tags::PATIENT_AGE,
    tags::PATIENT_SIZE,
    tags::PATIENT_WEIGHT,
    tags::OCCUPATION,
    tags::ADDITIONAL_PATIENT_HISTORY,
    tags::PATIENT_SEX_NEUTERED,
    // Clinical Trial Study
    tags::CLINICAL_TRIAL_TIME_POINT_ID,
    tags::CLINICAL_TRIAL_TIME_POINT_DESCRIPTION,
];

/// One instance of the source series, as a result references it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInstance {
    pub sop_class_uid: Uid,
    pub sop_instance_uid: Uid,
}

/// The source series of a result: the patient/study attributes of its first instance (copied
/// exactly), its UIDs, and every instance (referenced from the SR's evidence and image
/// library).
#[derive(Debug, Clone)]
pub struct SourceSeries {
    pub(crate) study_instance_uid: Uid,
    pub(crate) series_instance_uid: Uid,
    pub(crate) instances: Vec<SourceInstance>,
    /// The [`COPIED`] elements the first instance has, in tag order.
    pub(crate) copied: Vec<InMemElement>,
    /// The source's Specific Character Set, when it has one.
    pub(crate) charset: Option<String>,
    /// The procedure codes of the source (Procedure Code Sequence), for "Procedure reported".
    pub(crate) procedures: Vec<Code>,
    /// Laterality and Body Part Examined of the first instance, for the secondary capture's
    /// General Series.
    pub(crate) series_attributes: Vec<InMemElement>,
    /// Patient Orientation of each instance, for the secondary capture.
    pub(crate) orientations: Vec<Option<InMemElement>>,
    /// Lossy Image Compression (and its ratio and method) of each instance, when "01".
    pub(crate) lossy: Vec<Vec<InMemElement>>,
    /// The first instance's Timezone Offset From UTC, when it has a valid one (`±HHMM`).
    pub(crate) timezone: Option<chrono::FixedOffset>,
}

/// A Timezone Offset From UTC (`+HHMM` or `-HHMM`, PS3.3 C.12.1.1.8), if valid.
fn parse_offset(text: &str) -> Option<chrono::FixedOffset> {
    let b = text.as_bytes();
    if b.len() != 5 || !b[1..].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let hours = i32::from(b[1] - b'0') * 10 + i32::from(b[2] - b'0');
    let minutes = i32::from(b[3] - b'0') * 10 + i32::from(b[4] - b'0');
    if hours > 14 || minutes > 59 {
        return None;
    }
    let seconds = (hours * 60 + minutes) * 60;
    match b[0] {
        b'+' => chrono::FixedOffset::east_opt(seconds),
        b'-' => chrono::FixedOffset::west_opt(seconds),
        _ => None,
    }
}

/// The method (0028,2114) of a lossy transfer syntax, `None` for a lossless one (JPEG 2000
/// Part 1, `.91`, may be either: taken as lossy, the cautious reading).
fn lossy_method(transfer_syntax: &str) -> Option<&'static str> {
    match transfer_syntax.trim_end_matches(['\0', ' ']) {
        "1.2.840.10008.1.2.4.50" | "1.2.840.10008.1.2.4.51" => Some("ISO_10918_1"),
        "1.2.840.10008.1.2.4.81" => Some("ISO_14495_1"),
        "1.2.840.10008.1.2.4.91" | "1.2.840.10008.1.2.4.93" => Some("ISO_15444_1"),
        "1.2.840.10008.1.2.4.203" => Some("ISO_15444_15"),
        "1.2.840.10008.1.2.4.100" | "1.2.840.10008.1.2.4.101" => Some("ISO_13818_2"),
        "1.2.840.10008.1.2.4.102"
        | "1.2.840.10008.1.2.4.103"
        | "1.2.840.10008.1.2.4.104"
        | "1.2.840.10008.1.2.4.105"
        | "1.2.840.10008.1.2.4.106" => Some("ISO_14496_10"),
        "1.2.840.10008.1.2.4.107" | "1.2.840.10008.1.2.4.108" => Some("ISO_23008_2"),
        _ => None,
    }
}

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let e = obj.element_opt(tag).ok().flatten()?;
    let s = e.to_str().ok()?;
    Some(s.trim_end_matches(['\0', ' ']).trim_start().to_owned())
}

fn uid(
    obj: &InMemDicomObject,
    tag: Tag,
    index: usize,
    attribute: &'static str,
) -> Result<Uid, ResultError> {
    text(obj, tag)
        .and_then(|t| Uid::parse(&t))
        .ok_or(ResultError::MissingAttribute { index, attribute })
}

fn codes(obj: &InMemDicomObject, tag: Tag) -> Vec<Code> {
    let Some(items) = obj.element_opt(tag).ok().flatten().and_then(|e| e.items()) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let value = text(item, tags::CODE_VALUE).filter(|v| !v.is_empty())?;
            let scheme = text(item, tags::CODING_SCHEME_DESIGNATOR).filter(|v| !v.is_empty())?;
            let meaning = text(item, tags::CODE_MEANING).filter(|v| !v.is_empty())?;
            Some(Code {
                value,
                scheme,
                meaning,
            })
        })
        .collect()
}

/// Whether a text element (or one in its items) holds bytes its character set could not
/// decode: dicom-rs writes each such byte as `\` and three octal digits, and a backslash is
/// never part of a decoded value of a multi-valued VR (it separates values). In LT, ST and
/// UT a backslash is text (PS3.5 6.2), so they are not judged: an undecodable byte there
/// stays in its one value, shown as its escape.
fn undecoded(e: &InMemElement) -> bool {
    if let dicom_core::DicomValue::Sequence(seq) = e.value() {
        return seq.items().iter().any(|item| item.iter().any(undecoded));
    }
    if matches!(e.vr(), VR::LT | VR::ST | VR::UT) {
        return false;
    }
    // The values as read (`to_multi_str` joins and splits again at backslashes).
    match e.value() {
        dicom_core::DicomValue::Primitive(PrimitiveValue::Str(s)) => s.contains('\\'),
        dicom_core::DicomValue::Primitive(PrimitiveValue::Strs(v)) => {
            v.iter().any(|s| s.contains('\\'))
        }
        _ => false,
    }
}

impl SourceSeries {
    /// Read a series from its instances (parsed objects, pixel data not needed: files opened
    /// with `read_until(PIXEL_DATA)` do; pass `FileDicomObject`s as `files.iter().map(|f|
    /// &**f)`). All must share the Study and Series Instance UIDs, the patient (PatientID,
    /// IssuerOfPatientID, PatientName), Modality and SOP Class UID
    /// ([`crate::series::IDENTITY_ATTRIBUTES`]) and have SOP Class and Instance UIDs; the
    /// patient/study attributes come from the first one.
    pub fn from_instances<'a, I>(instances: I) -> Result<Self, ResultError>
    where
        I: IntoIterator<Item = &'a InMemDicomObject>,
    {
        let mut iter = instances.into_iter().enumerate().peekable();
        let Some((_, first)) = iter.peek() else {
            return Err(ResultError::EmptySeries);
        };
        let study_instance_uid = uid(first, tags::STUDY_INSTANCE_UID, 0, "Study Instance UID")?;
        let series_instance_uid = uid(first, tags::SERIES_INSTANCE_UID, 0, "Series Instance UID")?;
        let identity = crate::series::SeriesIdentity::of(first);
        let copied: Vec<InMemElement> = COPIED
            .iter()
            .filter_map(|t| first.element_opt(*t).ok().flatten().cloned())
            .collect();
        let charset = text(first, tags::SPECIFIC_CHARACTER_SET).filter(|c| !c.is_empty());
        // Code extensions (several values), or one term dicom-rs does not know (ISO_IR 148,
        // Latin-5, say: it would read the text as the default repertoire and the result would
        // carry it re-encoded, garbled; a review's finding).
        if charset.as_deref().is_some_and(|c| {
            c.contains('\\')
                || dicom_encoding::text::SpecificCharacterSet::from_code(c.trim()).is_none()
        }) {
            return Err(ResultError::UnsupportedCharset);
        }
        let series_attributes: Vec<InMemElement> = [tags::LATERALITY, tags::BODY_PART_EXAMINED]
            .iter()
            .filter_map(|t| first.element_opt(*t).ok().flatten().cloned())
            .collect();
        if copied.iter().chain(&series_attributes).any(undecoded) {
            return Err(ResultError::UnsupportedCharset);
        }
        let timezone = text(first, tags::TIMEZONE_OFFSET_FROM_UTC).and_then(|t| parse_offset(&t));
        let procedures = codes(first, tags::PROCEDURE_CODE_SEQUENCE);

        let mut out = Vec::new();
        let mut orientations = Vec::new();
        let mut lossy = Vec::new();
        for (index, obj) in iter {
            if uid(obj, tags::STUDY_INSTANCE_UID, index, "Study Instance UID")?
                != study_instance_uid
            {
                return Err(ResultError::MixedStudies { index });
            }
            if uid(obj, tags::SERIES_INSTANCE_UID, index, "Series Instance UID")?
                != series_instance_uid
            {
                return Err(ResultError::MixedSeries { index });
            }
            if let Some(attribute) = identity.differs(&crate::series::SeriesIdentity::of(obj)) {
                return Err(ResultError::MixedIdentity { index, attribute });
            }
            out.push(SourceInstance {
                sop_class_uid: uid(obj, tags::SOP_CLASS_UID, index, "SOP Class UID")?,
                sop_instance_uid: uid(obj, tags::SOP_INSTANCE_UID, index, "SOP Instance UID")?,
            });
            orientations.push(
                obj.element_opt(tags::PATIENT_ORIENTATION)
                    .ok()
                    .flatten()
                    .cloned(),
            );
            lossy.push(
                if text(obj, tags::LOSSY_IMAGE_COMPRESSION).as_deref() == Some("01") {
                    [
                        tags::LOSSY_IMAGE_COMPRESSION,
                        tags::LOSSY_IMAGE_COMPRESSION_RATIO,
                        tags::LOSSY_IMAGE_COMPRESSION_METHOD,
                    ]
                    .iter()
                    .filter_map(|t| obj.element_opt(*t).ok().flatten().cloned())
                    .collect()
                } else {
                    Vec::new()
                },
            );
        }
        Ok(SourceSeries {
            study_instance_uid,
            series_instance_uid,
            instances: out,
            copied,
            charset,
            procedures,
            series_attributes,
            orientations,
            lossy,
            timezone,
        })
    }

    /// Notes the transfer syntax instance `index` was stored in: a lossy one makes its
    /// derived image "lossy compressed" (PS3.3 C.7.6.1.1.5) even when the instance's header
    /// does not say so (only a header that said "01" was copied: a review's finding).
    pub fn note_transfer_syntax(&mut self, index: usize, transfer_syntax: &str) {
        let Some(method) = lossy_method(transfer_syntax) else {
            return;
        };
        let Some(lossy) = self.lossy.get_mut(index) else {
            return;
        };
        if lossy.is_empty() {
            lossy.push(InMemElement::new(
                tags::LOSSY_IMAGE_COMPRESSION,
                dicom_core::VR::CS,
                dicom_core::PrimitiveValue::from("01"),
            ));
            lossy.push(InMemElement::new(
                tags::LOSSY_IMAGE_COMPRESSION_METHOD,
                dicom_core::VR::CS,
                dicom_core::PrimitiveValue::from(method),
            ));
        }
    }

    pub fn study_instance_uid(&self) -> &Uid {
        &self.study_instance_uid
    }

    pub fn series_instance_uid(&self) -> &Uid {
        &self.series_instance_uid
    }

    pub fn instances(&self) -> &[SourceInstance] {
        &self.instances
    }

    pub(crate) fn position(&self, sop_instance_uid: &Uid) -> Option<usize> {
        self.instances
            .iter()
            .position(|i| &i.sop_instance_uid == sop_instance_uid)
    }
}
