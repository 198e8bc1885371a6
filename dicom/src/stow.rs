//! STOW-RS, one part at a time: a part of a `multipart/related` body (a DICOM Part 10 file)
//! into the spool, with the PS3.18 failure reason when it cannot be stored.
//!
//! The HTTP side (src/http/dicomweb.rs in the root package) streams the body through
//! [`crate::multipart::Parser`] and calls [`store_part`] for each part on a blocking thread.

use dicom_object::meta::FileMetaTable;

use crate::multipart::Part;
use crate::sop;
use crate::spool::{Incoming, Spool, StoreError, Stored};

/// The sender label recorded as the calling AE of instances received over STOW-RS.
pub const STOW_SENDER: &str = "STOW-RS";

/// Failure reasons of the Store Instances Response (PS3.18 §10.5.3, PS3.4 Annex B).
pub mod reason {
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    pub const DUPLICATE_CONFLICT: u16 = 0x0111;
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    pub const DATA_SET_DOES_NOT_MATCH: u16 = 0xA900;
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    pub const TRANSFER_SYNTAX_NOT_SUPPORTED: u16 = 0xC122;
}

/// What became of one part.
#[derive(Debug)]
pub enum PartOutcome {
    Stored(Box<Stored>),
    Failed(Failure),
}

/// A part that was not stored. UIDs come from the part's file meta when it had one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub sop_class_uid: Option<String>,
    pub sop_instance_uid: Option<String>,
    /// PS3.18 Failure Reason.
    pub reason: u16,
    /// A short stable label (metrics).
    pub kind: &'static str,
    /// What went wrong, without patient data.
    pub detail: String,
}

/// The failure reason of a spool error.
pub fn reason_of(e: &StoreError) -> u16 {
    match e {
        StoreError::UnknownTransferSyntax { .. } => reason::TRANSFER_SYNTAX_NOT_SUPPORTED,
        StoreError::Conflict => reason::DUPLICATE_CONFLICT,
        other => crate::scp::status_of(other),
    }
}

/// Splits a Part 10 file into its file meta and the data set after it.
pub fn split_part10(bytes: &[u8]) -> Result<(FileMetaTable, &[u8]), String> {
    // Where the file meta group starts: after the preamble and "DICM", or at the first byte
    // of a file written without them (pydicom 3 writes a data set built in code so unless
    // told otherwise, and dicomweb-client sends what it writes: every such part was refused,
    // a red-team finding; dcmtk reads both).
    let start = if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        132
    } else if bytes.len() >= 8
        && bytes[..2] == [0x02, 0x00]
        && bytes[4..6].iter().all(u8::is_ascii_uppercase)
    {
        0
    } else {
        return Err("not a DICOM Part 10 file (no preamble and DICM prefix, nor a file meta group at its start)".into());
    };
    let meta_len = check_meta_lengths(&bytes[start..])?;
    if meta_len == 0 {
        return Err("not a DICOM Part 10 file (no file meta information)".into());
    }
    let meta_bytes = &bytes[start..start + meta_len];
    // The group as walked above, whatever its own (0002,0000) says: that is set aside and
    // the measured length given instead, and the data set starts where group 0002 ends, as
    // dcmtk and pydicom read it (a group length too long made the meta reader take the data
    // set's first elements, (0008,0005) among them, and the instance was stored without
    // them as good: a re-attack's finding).
    let elements = if meta_bytes[..4] == [0x02, 0x00, 0x00, 0x00] {
        if meta_bytes.len() < 12 || &meta_bytes[4..6] != b"UL" || meta_bytes[6..8] != [0x04, 0x00] {
            return Err(
                "the File Meta Information Group Length (0002,0000) is not a UL of 4 bytes".into(),
            );
        }
        &meta_bytes[12..]
    } else {
        meta_bytes
    };
    if elements.is_empty() {
        return Err("not a DICOM Part 10 file (no file meta information)".into());
    }
    let mut head = Vec::with_capacity(16 + elements.len());
    head.extend_from_slice(b"DICM");
    head.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 0x04, 0x00]);
    head.extend_from_slice(&(elements.len() as u32).to_le_bytes());
    head.extend_from_slice(elements);
    let (meta, _) = crate::meta::read_file_meta(&head)
        .map_err(|e| format!("cannot read the file meta information: {e}"))?;
    // A meta group without the instance's UIDs names nothing to store (an 8-byte group of
    // an empty Transfer Syntax UID was answered "SOP class not supported" with empty UIDs).
    if sop::trim_uid(meta.media_storage_sop_class_uid()).is_empty()
        || sop::trim_uid(meta.media_storage_sop_instance_uid()).is_empty()
    {
        return Err(
            "the file meta information names no Media Storage SOP Class or Instance UID".into(),
        );
    }
    Ok((meta, &bytes[start + meta_len..]))
}

/// Every element of the file meta group (group 0002, Explicit VR Little Endian) must fit in
/// what follows it: dicom-object's meta reader reserves and zero-fills an element's declared
/// length before reading it, so a crafted 0xFFFFFFF0 would cost gigabytes. Returns the
/// group's length in bytes.
fn check_meta_lengths(bytes: &[u8]) -> Result<usize, String> {
    let mut rest = bytes;
    while rest.len() >= 2 && rest[..2] == [0x02, 0x00] {
        if rest.len() < 8 {
            return Err("the file meta information ends inside an element header".into());
        }
        let vr = [rest[4], rest[5]];
        let long = matches!(
            &vr,
            b"OB" | b"OW" | b"OF" | b"OD" | b"OL" | b"OV" | b"SQ" | b"UC" | b"UR" | b"UT" | b"UN"
        );
        let (header, len) = if long {
            if rest.len() < 12 {
                return Err("the file meta information ends inside an element header".into());
            }
            (
                12,
                u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]) as usize,
            )
        } else {
            (8, u16::from_le_bytes([rest[6], rest[7]]) as usize)
        };
        if len > rest.len() - header {
            return Err(format!(
                "a file meta element claims {len} bytes, more than the part holds"
            ));
        }
        rest = &rest[header + len..];
    }
    Ok(bytes.len() - rest.len())
}

/// Stores one part (blocking: call it off the async runtime). `expected_study` is the study
/// of a `POST /studies/{study}` request: an instance of another study is refused (0xA900).
/// The SOP classes stored are those the DIMSE SCP takes: the standard storage classes and
/// `extra_sop_classes`; another is refused 0x0122 (PS3.18 10.5.3).
pub fn store_part(
    spool: &Spool,
    part: &Part,
    expected_study: Option<&str>,
    extra_sop_classes: &[String],
) -> PartOutcome {
    let fail = |meta: Option<&FileMetaTable>, reason, kind, detail: String| {
        PartOutcome::Failed(Failure {
            sop_class_uid: meta.map(|m| sop::trim_uid(m.media_storage_sop_class_uid()).to_owned()),
            sop_instance_uid: meta
                .map(|m| sop::trim_uid(m.media_storage_sop_instance_uid()).to_owned()),
            reason,
            kind,
            detail,
        })
    };
    match part.media_type().as_deref() {
        Some("application/dicom") => {}
        other => {
            return fail(
                None,
                reason::CANNOT_UNDERSTAND,
                "content_type",
                format!(
                    "part Content-Type is {}, not application/dicom",
                    other.unwrap_or("missing")
                ),
            );
        }
    }
    let (meta, dataset) = match split_part10(&part.body) {
        Ok(split) => split,
        Err(detail) => return fail(None, reason::CANNOT_UNDERSTAND, "not_part10", detail),
    };
    let class = sop::trim_uid(meta.media_storage_sop_class_uid());
    if !(sop::STORAGE_CLASSES.iter().any(|c| c.uid == class)
        || extra_sop_classes.iter().any(|c| c == class))
    {
        return fail(
            Some(&meta),
            reason::SOP_CLASS_NOT_SUPPORTED,
            "sop_class",
            "the SOP class is not one this node stores (--dicom-sop-class adds others)".into(),
        );
    }
    let ts = sop::trim_uid(meta.transfer_syntax()).to_owned();
    if let Some(param) = part.transfer_syntax_param()
        && sop::trim_uid(&param) != ts
    {
        return fail(
            Some(&meta),
            reason::CANNOT_UNDERSTAND,
            "transfer_syntax_mismatch",
            "the part's transfer-syntax parameter differs from its file meta".into(),
        );
    }
    if let Some(study) = expected_study {
        // PS3.18 10.5: every instance must belong to the study of the URL. Read by the strict
        // walk (no parse of the whole data set), and failing closed: a data set whose
        // structure is broken, or without a Study Instance UID, is not taken on trust.
        let found = crate::structure::walk(
            dataset,
            crate::structure::Encoding::of(&ts),
            &[STUDY_INSTANCE_UID],
        );
        let matches = match found.as_deref() {
            Ok([Some(crate::structure::Found::Value(value))]) => {
                sop::trim_uid(&String::from_utf8_lossy(value)) == sop::trim_uid(study)
            }
            Ok(_) => false,
            // Refused by the spool with its reason (and quarantined) below.
            Err(_) => true,
        };
        if !matches {
            return fail(
                Some(&meta),
                reason::DATA_SET_DOES_NOT_MATCH,
                "study_mismatch",
                "the instance's Study Instance UID is missing or differs from the study in the request URL"
                    .into(),
            );
        }
    }
    let sop_class = sop::trim_uid(meta.media_storage_sop_class_uid()).to_owned();
    let sop_instance = sop::trim_uid(meta.media_storage_sop_instance_uid()).to_owned();
    let incoming = Incoming {
        transfer_syntax: &ts,
        calling_ae: STOW_SENDER,
        expected_sop_class: Some(&sop_class),
        expected_sop_instance: Some(&sop_instance),
    };
    match spool.store(dataset, &incoming) {
        Ok(stored) => PartOutcome::Stored(Box::new(stored)),
        Err(e) => fail(Some(&meta), reason_of(&e), e.kind(), e.to_string()),
    }
}

/// (0020,000D) Study Instance UID.
const STUDY_INSTANCE_UID: (u16, u16) = (0x0020, 0x000D);

/// The most parts one STOW-RS request may hold (each staged part is a few words of
/// bookkeeping; a study of a few thousand instances is the usual upper end).
pub const MAX_PARTS: usize = 100_000;

/// Where a request's parts wait until the whole body has arrived (a body that ends early or
/// breaks the multipart syntax stores nothing): one unnamed file in the spool's `tmp/` per
/// request, the parts appended to it. One file, not one per part: a body of 20,000 tiny
/// parts held open would otherwise hold 20,000 file descriptors and starve the process.
#[derive(Debug, Clone)]
pub struct Staging {
    file: std::sync::Arc<std::fs::File>,
    end: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Staging {
    /// A new staging file (blocking). It has no name: it disappears when the last part
    /// staged in it is dropped, or with the process.
    pub fn new(spool: &Spool) -> std::io::Result<Staging> {
        Ok(Staging {
            file: std::sync::Arc::new(tempfile::tempfile_in(spool.root().join("tmp"))?),
            end: Default::default(),
        })
    }

    /// Writes `part` aside (blocking), after the parts staged before it.
    pub fn stage(&self, part: Part) -> std::io::Result<StagedPart> {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::Ordering;
        let len = part.body.len();
        let offset = self.end.fetch_add(len as u64, Ordering::SeqCst);
        self.file.write_all_at(&part.body, offset)?;
        let sop_instance_uid = split_part10(&part.body)
            .ok()
            .map(|(meta, _)| sop::trim_uid(meta.media_storage_sop_instance_uid()).to_owned());
        Ok(StagedPart {
            content_type: part.content_type,
            file: self.file.clone(),
            offset,
            len,
            sop_instance_uid,
        })
    }
}

/// A part written aside in a [`Staging`] file.
#[derive(Debug)]
pub struct StagedPart {
    content_type: Option<String>,
    file: std::sync::Arc<std::fs::File>,
    offset: u64,
    len: usize,
    /// The SOP Instance UID its file meta names (`None`: none can be read; the store says
    /// why), for storing parts of one UID in their order.
    sop_instance_uid: Option<String>,
}

impl StagedPart {
    /// The part, read back (blocking).
    pub fn load(self) -> std::io::Result<Part> {
        use std::os::unix::fs::FileExt;
        let mut body = vec![0; self.len];
        self.file.read_exact_at(&mut body, self.offset)?;
        Ok(Part {
            content_type: self.content_type,
            body,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The SOP Instance UID its file meta names, if it can be read.
    pub fn sop_instance_uid(&self) -> Option<&str> {
        self.sop_instance_uid.as_deref()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
