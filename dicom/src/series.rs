//! Series over the spool, for the pipeline that assembles and routes them (issue 9).
//!
//! - [`Spool::series_touched_since`]: which series got new instances after an index row
//!   (the pipeline's cursor), with their instance count and last arrival;
//! - [`Spool::series_instances`]: the instances of one series, in instance order;
//! - [`SeriesHeader::read`]: the attributes routing looks at, read from a stored file up to
//!   its pixel data (never the pixels);
//! - [`SeriesIdentity`]: what every instance of one series must share (the patient, the
//!   modality, the SOP class), compared without ever showing the values.

use std::path::Path;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject};
use rusqlite::{OptionalExtension, params};

use crate::spool::{INSTANCE_COLUMNS, OWN_RESULTS_SENDER, Spool, StoreError, Stored};

/// A series that got instances after the cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesActivity {
    pub study_uid: String,
    pub series_uid: String,
    /// Instances of the series in the index now.
    pub instances: u64,
    /// When its last instance arrived (Unix ms).
    pub last_received_ms: i64,
    /// The highest arrival number (`seq`) of the series (the cursor to pass next time, at
    /// most).
    pub last_row: i64,
}

/// What a stored instance says about its series, for routing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeriesHeader {
    pub sop_class_uid: String,
    pub modality: String,
    pub body_part: String,
    pub series_description: String,
    pub photometric: String,
    pub rows: Option<u32>,
    pub columns: Option<u32>,
    /// Number of Frames (1 when absent).
    pub frames: u32,
    pub transfer_syntax: String,
    pub instance_number: Option<i64>,
    /// SOP Instance UID (its padding trimmed): one instance, however its file is encoded.
    pub sop_instance_uid: String,
    /// SHA-256 (hex) of the Patient ID, when there is one: enough to match a patient's
    /// results later (CDS imaging cards) without keeping the identifier itself.
    pub patient_id_sha256: Option<String>,
}

/// The attributes, in the order they are compared, that every instance of a series must
/// share: the patient (PatientID, IssuerOfPatientID, PatientName) and the kind of object
/// (Modality, SOP Class UID). A series whose instances differ in any of them (the same
/// Study/Series Instance UIDs reused for another patient or another modality) is refused
/// as a whole: its results would be filed under one patient but show another's images.
pub const IDENTITY_ATTRIBUTES: [(Tag, &str); 5] = [
    (tags::PATIENT_ID, "PatientID"),
    (tags::ISSUER_OF_PATIENT_ID, "IssuerOfPatientID"),
    (tags::PATIENT_NAME, "PatientName"),
    (tags::MODALITY, "Modality"),
    (tags::SOP_CLASS_UID, "SOPClassUID"),
];

/// One instance's [`IDENTITY_ATTRIBUTES`] (absent and empty are the same; padding spaces
/// and NULs are not significant). The values are patient data: `Debug` shows none of them,
/// and [`SeriesIdentity::differs`] names the attribute only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SeriesIdentity {
    values: [String; IDENTITY_ATTRIBUTES.len()],
}

impl SeriesIdentity {
    /// The identity attributes of a data set (a full object or one read up to the pixels).
    pub fn of(obj: &InMemDicomObject) -> SeriesIdentity {
        SeriesIdentity {
            values: IDENTITY_ATTRIBUTES.map(|(tag, _)| {
                if tag == tags::ISSUER_OF_PATIENT_ID {
                    // The issuer as the patient key reads it: the qualifiers' entity IDs
                    // name it too, and two instances that differ only there are two
                    // patients' (their results are keyed apart).
                    issuer_of_patient_id(obj)
                } else {
                    trimmed_text(obj, tag)
                }
            }),
        }
    }

    /// The keyword of the first identity attribute in which `other` differs from `self`.
    pub fn differs(&self, other: &SeriesIdentity) -> Option<&'static str> {
        self.values
            .iter()
            .zip(&other.values)
            .zip(IDENTITY_ATTRIBUTES)
            .find(|((a, b), _)| a != b)
            .map(|(_, (_, name))| name)
    }
}

/// An element's text without its padding (spaces, NULs); empty when absent or not text.
fn trimmed_text(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' ').to_owned())
        .unwrap_or_default()
}

impl std::fmt::Debug for SeriesIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SeriesIdentity(..)")
    }
}

/// A stored file's header could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the header of {path}: {detail}")]
pub struct HeaderError {
    pub path: std::path::PathBuf,
    pub detail: String,
}

impl SeriesHeader {
    /// Reads the attributes of a stored Part 10 file, stopping before its pixel data.
    pub fn read(path: &Path) -> Result<SeriesHeader, HeaderError> {
        let error = |detail: String| HeaderError {
            path: path.to_owned(),
            detail,
        };
        let obj = crate::meta::open_file(path, Some(tags::PIXEL_DATA))
            .map_err(|e| error(e.to_string()))?;
        Ok(SeriesHeader::of(&obj))
    }

    /// The attributes of an object already read.
    pub fn of(obj: &DefaultDicomObject) -> SeriesHeader {
        let text = |tag| trimmed_text(obj, tag);
        let int = |tag| -> Option<i64> {
            obj.element_opt(tag)
                .ok()
                .flatten()
                .and_then(|e| e.to_int::<i64>().ok())
        };
        SeriesHeader {
            sop_class_uid: crate::sop::trim_uid(&text(tags::SOP_CLASS_UID)).to_owned(),
            modality: text(tags::MODALITY),
            body_part: text(tags::BODY_PART_EXAMINED),
            series_description: text(tags::SERIES_DESCRIPTION),
            photometric: text(tags::PHOTOMETRIC_INTERPRETATION),
            rows: int(tags::ROWS).and_then(|v| u32::try_from(v).ok()),
            columns: int(tags::COLUMNS).and_then(|v| u32::try_from(v).ok()),
            frames: int(tags::NUMBER_OF_FRAMES)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|v| *v > 0)
                .unwrap_or(1),
            transfer_syntax: crate::sop::trim_uid(obj.meta().transfer_syntax()).to_owned(),
            instance_number: int(tags::INSTANCE_NUMBER),
            sop_instance_uid: crate::sop::trim_uid(&text(tags::SOP_INSTANCE_UID)).to_owned(),
            patient_id_sha256: Some(text(tags::PATIENT_ID))
                .filter(|id| !id.is_empty())
                .map(|id| patient_key(&id, Some(&issuer_of_patient_id(obj)))),
        }
    }
}

impl Spool {
    /// The series with an index row whose arrival number (`seq`, never reused, unlike the
    /// rowid) is after `after_row`, each with its whole instance count and last arrival, and
    /// the cursor to pass next time (lower than `after_row` when that was above every number
    /// ever given). At most `limit` series and
    /// 10,000 rows are read per call; the rest come on the next one.
    pub fn series_touched_since(
        &self,
        after_row: i64,
        limit: usize,
    ) -> Result<(Vec<SeriesActivity>, i64), StoreError> {
        let db = self.index();
        // New rows, oldest first: their series, and how far this call reads.
        let mut touched: Vec<(String, String)> = Vec::new();
        // The highest arrival number ever given (it never goes down, see `spool.rs`): a
        // cursor above it (an index from before the numbers, whose rowids were reused, or
        // an index replaced) would skip every new row; it restarts from there.
        let high: i64 = db
            .prepare_cached("SELECT high FROM instance_seq WHERE id = 1")?
            .query_row([], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        let after_row = after_row.min(high);
        let mut cursor = after_row;
        {
            let mut stmt = db.prepare_cached(
                "SELECT seq, study_uid, series_uid FROM instances WHERE seq > ?1
                   AND calling_ae != ?2
                 ORDER BY seq LIMIT 10000",
            )?;
            // This node's own result objects are not arrivals.
            let rows = stmt.query_map(params![after_row, OWN_RESULTS_SENDER], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            for row in rows {
                let (rowid, study, series) = row?;
                let key = (study, series);
                if !touched.contains(&key) {
                    if touched.len() == limit {
                        break;
                    }
                    touched.push(key);
                }
                cursor = rowid;
            }
        }
        let mut out = Vec::with_capacity(touched.len());
        let mut stmt = db.prepare_cached(
            "SELECT count(*), max(received_at_ms), max(seq) FROM instances
             WHERE study_uid = ?1 AND series_uid = ?2",
        )?;
        for (study_uid, series_uid) in touched {
            let (instances, last_received_ms, last_row) =
                stmt.query_row([&study_uid, &series_uid], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Option<i64>>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                    ))
                })?;
            out.push(SeriesActivity {
                study_uid,
                series_uid,
                instances: instances.max(0) as u64,
                last_received_ms: last_received_ms.unwrap_or(0),
                last_row: last_row.unwrap_or(0),
            });
        }
        Ok((out, cursor))
    }

    /// The highest arrival number (`seq`) the index ever gave; it never goes down, even when
    /// rows are deleted. A pipeline cursor above it is stale (see `Pipeline::open`).
    pub fn arrival_high(&self) -> Result<i64, StoreError> {
        let db = self.index();
        Ok(db
            .prepare_cached("SELECT high FROM instance_seq WHERE id = 1")?
            .query_row([], |r| r.get(0))
            .optional()?
            .unwrap_or(0))
    }

    /// One instance, by its study, series and SOP Instance UIDs (WADO-RS retrieve).
    pub fn instance(
        &self,
        study_uid: &str,
        series_uid: &str,
        sop_instance_uid: &str,
    ) -> Result<Option<Stored>, StoreError> {
        let db = self.index();
        let mut stmt = db.prepare_cached(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances
             WHERE sop_instance_uid = ?3 AND study_uid = ?1 AND series_uid = ?2"
        ))?;
        let mut rows = stmt.query_map([study_uid, series_uid, sop_instance_uid], |r| {
            self.stored_row(r)
        })?;
        Ok(rows.next().transpose()?)
    }

    /// The instances of one study, by series, oldest arrival first (WADO-RS retrieve).
    pub fn study_instances(&self, study_uid: &str) -> Result<Vec<Stored>, StoreError> {
        let db = self.index();
        let mut stmt = db.prepare_cached(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE study_uid = ?1
             ORDER BY series_uid, received_at_ms, seq"
        ))?;
        let rows = stmt.query_map([study_uid], |r| self.stored_row(r))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// The instances of one series, oldest arrival first.
    pub fn series_instances(
        &self,
        study_uid: &str,
        series_uid: &str,
    ) -> Result<Vec<Stored>, StoreError> {
        let db = self.index();
        let mut stmt = db.prepare_cached(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE study_uid = ?1 AND series_uid = ?2
             ORDER BY received_at_ms, seq"
        ))?;
        let rows = stmt.query_map([study_uid, series_uid], |r| self.stored_row(r))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

/// The key a Patient ID is matched by: SHA-256 (hex) of the ID with surrounding spaces
/// removed (DICOM pads values with spaces; FHIR identifiers are compared the same way).
/// Who assigned the Patient ID, as far as the object says: its Issuer of Patient ID, and the
/// Universal or Local Namespace Entity IDs of its Issuer of Patient ID Qualifiers Sequence
/// (PS3.3 C.7.1.1: either may name the assigning authority; a local MRN named only by its
/// entity ID was keyed as issuer-less and matched the NHS patient of the same number: a
/// red-team finding). Several are joined by U+0001, so that an issuer beside a contradicting
/// entity ID matches no configured issuer.
fn issuer_of_patient_id(obj: &InMemDicomObject) -> String {
    let mut parts = vec![trimmed_text(obj, tags::ISSUER_OF_PATIENT_ID)];
    if let Some(items) = obj
        .element_opt(tags::ISSUER_OF_PATIENT_ID_QUALIFIERS_SEQUENCE)
        .ok()
        .flatten()
        .and_then(|e| e.items())
    {
        for item in items {
            for tag in [tags::UNIVERSAL_ENTITY_ID, tags::LOCAL_NAMESPACE_ENTITY_ID] {
                parts.push(trimmed_text(item, tag));
            }
        }
    }
    parts.retain(|p| !p.is_empty());
    parts.join("\u{1}")
}

/// The key a patient's results are found by: [`patient_id_sha256`] of the Patient ID when no
/// Issuer of Patient ID is given, else the SHA-256 of the issuer and the ID together: an ID
/// from another assigning authority (a local MRN that happens to equal an NHS number) is
/// another patient's (a red-team finding: its finding was shown on the NHS patient's card).
pub fn patient_key(id: &str, issuer: Option<&str>) -> String {
    use sha2::Digest;
    match issuer.map(str::trim).filter(|i| !i.is_empty()) {
        None => patient_id_sha256(id),
        Some(issuer) => hex::encode(sha2::Sha256::digest(
            format!("{issuer}\u{0}{}", id.trim()).as_bytes(),
        )),
    }
}

pub fn patient_id_sha256(id: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(id.trim().as_bytes()))
}

#[cfg(test)]
mod key_tests {
    use super::*;

    /// Red-team finding: a Patient ID from another assigning authority (a local MRN equal
    /// to an NHS number) matched the NHS patient. With an issuer, the key is the pair's.
    #[test]
    fn a_patient_id_of_another_issuer_is_another_key() {
        let bare = patient_id_sha256("9434765919");
        assert_eq!(patient_key(" 9434765919 ", None), bare);
        assert_eq!(patient_key("9434765919", Some("  ")), bare);
        let nhs = patient_key("9434765919", Some("NHS"));
        assert_ne!(nhs, bare);
        assert_eq!(patient_key("9434765919 ", Some(" NHS ")), nhs);
        assert_ne!(patient_key("9434765919", Some("HOSPITAL_B_LOCAL_MRN")), nhs);
    }
}

#[cfg(test)]
mod issuer_tests {
    use dicom_core::{DataElement, PrimitiveValue, VR};

    use super::*;

    fn with(issuer: Option<&str>, entity: Option<&str>) -> InMemDicomObject {
        let mut o = InMemDicomObject::new_empty();
        if let Some(i) = issuer {
            o.put(DataElement::new(
                tags::ISSUER_OF_PATIENT_ID,
                VR::LO,
                PrimitiveValue::from(i),
            ));
        }
        if let Some(e) = entity {
            let mut item = InMemDicomObject::new_empty();
            item.put(DataElement::new(
                tags::UNIVERSAL_ENTITY_ID,
                VR::UT,
                PrimitiveValue::from(e),
            ));
            o.put(DataElement::new(
                tags::ISSUER_OF_PATIENT_ID_QUALIFIERS_SEQUENCE,
                VR::SQ,
                dicom_core::value::DataSetSequence::from(vec![item]),
            ));
        }
        o
    }

    /// Red-team finding: an issuer named only by the qualifiers' Universal Entity ID was
    /// read as no issuer, and the local MRN matched the NHS patient of the same number.
    #[test]
    fn the_qualifiers_name_an_issuer_too() {
        assert_eq!(issuer_of_patient_id(&with(None, None)), "");
        assert_eq!(issuer_of_patient_id(&with(Some("NHS "), None)), "NHS");
        let hospital = issuer_of_patient_id(&with(None, Some("1.2.826.0.1.999.HOSPB")));
        assert_eq!(hospital, "1.2.826.0.1.999.HOSPB");
        assert_ne!(
            patient_key("1000000001", Some(&hospital)),
            patient_id_sha256("1000000001")
        );
        // An issuer beside an entity ID that may contradict it is neither alone.
        let both = issuer_of_patient_id(&with(Some("NHS"), Some("1.2.826.0.1.999.HOSPB")));
        assert_ne!(
            patient_key("1000000001", Some(&both)),
            patient_key("1000000001", Some("NHS"))
        );
    }

    /// Two instances of one series whose Patient IDs' issuers differ only in the qualifiers
    /// sequence are two patients' (keyed apart), so the series' identity check tells them
    /// apart and names the attribute.
    #[test]
    fn the_series_identity_reads_the_qualifiers() {
        let local = with(None, Some("1.2.826.0.1.999.HOSPB"));
        let other = with(None, Some("1.2.826.0.1.999.HOSPC"));
        let none = with(None, None);
        assert_eq!(
            SeriesIdentity::of(&local).differs(&SeriesIdentity::of(&other)),
            Some("IssuerOfPatientID")
        );
        assert_eq!(
            SeriesIdentity::of(&local).differs(&SeriesIdentity::of(&none)),
            Some("IssuerOfPatientID")
        );
        assert_eq!(
            SeriesIdentity::of(&local).differs(&SeriesIdentity::of(&local.clone())),
            None
        );
    }
}
