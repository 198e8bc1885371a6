//! AI results as DICOM: one structured report and one secondary capture per (series, bundle).
//!
//! Both are new series in the source study, carry the IHE AI Results (AIR) essentials and are
//! returned as Part 10 bytes (Explicit VR Little Endian), ready for C-STORE:
//!
//! - [`build_sr`]: a Comprehensive SR (1.2.840.10008.5.1.4.1.1.88.33) following TID 1500
//!   *Imaging Measurement Report*: observer context (the bundle as a device), procedure
//!   reported, an image library of every source instance, and one measurement group per
//!   finding with its probability, operating threshold, presence and the bundle's intended
//!   use; `VerificationFlag = UNVERIFIED`.
//! - [`build_sc`]: a Secondary Capture image (1.2.840.10008.5.1.4.1.1.7) of an already
//!   rendered 8-bit image of one source instance with the result burned in
//!   (`BurnedInAnnotation = YES`).
//!
//! Inputs: a [`SourceSeries`] (read once from the series' instances: the patient and study
//! attributes copied exactly, and the references), a [`ResultContext`] (who made the result)
//! and the [`Finding`]s. Nothing here logs: the values are patient data.
//!
//! The Comprehensive SR class is used rather than Comprehensive 3D SR: the report has no 3D
//! coordinates, and more PACS and viewers display 88.33.

mod burn;
mod common;
mod sc;
mod source;
mod sr;

use std::time::SystemTime;

use sha2::{Digest, Sha256};

pub use burn::{band_height, burn_band};
pub use sc::{Heatmap, RenderedImage, RenderedPixels, build_sc};
pub use source::{SourceInstance, SourceSeries};
pub use sr::{Predecessor, build_sr, build_sr_illustrated, build_sr_with};

/// Comprehensive SR Storage.
pub const COMPREHENSIVE_SR: &str = "1.2.840.10008.5.1.4.1.1.88.33";
/// Secondary Capture Image Storage.
pub const SECONDARY_CAPTURE: &str = "1.2.840.10008.5.1.4.1.1.7";
/// Explicit VR Little Endian: the transfer syntax of every result object.
pub const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";
/// Series Number of the SR series (high, so it sorts after the acquired series).
pub const SR_SERIES_NUMBER: i32 = 9901;
/// Series Number of the SC series.
pub const SC_SERIES_NUMBER: i32 = 9902;
/// The text burned into every secondary capture, and the SR's series description prefix.
pub const AI_RESULT_LABEL: &str = "AI RESULT - NOT FOR DIAGNOSIS WITHOUT REVIEW";
/// Manufacturer in the equipment modules and the observer context.
pub const MANUFACTURER: &str = "Nightingale";

/// A DICOM UID: the ones Nightingale makes are digits and dots; one read from a source object
/// is kept as the spool stored it (at most 64 printable characters, letters included as some
/// senders write them), so that the results reference the source as it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Uid(String);

impl Uid {
    /// A new UID under the `2.25` root: the decimal value of a random (version 4) UUID, as
    /// PS3.5 B.2 allows without registration.
    pub fn generate() -> Self {
        Self::from_uuid(uuid::Uuid::new_v4())
    }

    /// The device UID of a model bundle: `2.25.` and a version 8 UUID made from the first 128
    /// bits of SHA-256 over the bundle's checksum. The same bundle always gets the same UID; a
    /// new model version (a new checksum) gets a new one.
    pub fn for_bundle(checksum: &str) -> Self {
        let digest = Sha256::digest(checksum.as_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        Self::from_uuid(uuid::Builder::from_custom_bytes(bytes).into_uuid())
    }

    fn from_uuid(id: uuid::Uuid) -> Self {
        Uid(format!("2.25.{}", id.as_u128()))
    }

    /// Parse a UID read from a source object: trailing NUL/space padding dropped, then what
    /// the spool accepts ([`sop::is_acceptable_uid`]: 1–64 printable characters, one value).
    ///
    /// [`sop::is_acceptable_uid`]: crate::sop::is_acceptable_uid
    pub fn parse(text: &str) -> Option<Self> {
        let t = text.trim_end_matches(['\0', ' ']).trim_start();
        crate::sop::is_acceptable_uid(t).then(|| Uid(t.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A coded concept (PS3.3 Code Sequence Macro): value, coding scheme designator, meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    pub value: String,
    pub scheme: String,
    pub meaning: String,
}

impl Code {
    pub fn new(value: &str, scheme: &str, meaning: &str) -> Self {
        Code {
            value: value.to_owned(),
            scheme: scheme.to_owned(),
            meaning: meaning.to_owned(),
        }
    }

    /// A local code for an output with no DCM/SCT code: scheme `99NIGHTINGALE` (a private
    /// coding scheme: the `99` prefix, PS3.16 8.2), value = the output's name.
    pub fn local(value: &str, meaning: &str) -> Self {
        Code::new(value, LOCAL_SCHEME, meaning)
    }
}

/// The coding scheme of [`Code::local`].
pub const LOCAL_SCHEME: &str = "99NIGHTINGALE";

/// Who made the result: the bundle (as a device) and the server.
#[derive(Debug, Clone)]
pub struct ResultContext {
    /// The bundle's name: Manufacturer's Model Name and the SR's device observer model name.
    pub bundle_name: String,
    /// The bundle's version (first value of Software Versions).
    pub bundle_version: String,
    /// Nightingale's version (second value of Software Versions, as `Nightingale <v>`).
    pub nightingale_version: String,
    /// Changes with the model version: see [`Uid::for_bundle`].
    pub device_uid: Uid,
    /// The bundle's intended-use text, written into the SR (free of institution names).
    pub intended_use: String,
    /// Creation time of the result objects (content, series and instance creation dates).
    pub created: SystemTime,
}

impl ResultContext {
    /// A context for a bundle, this server's version and the current time; the device UID is
    /// derived from `bundle_checksum` (e.g. the model file's SHA-256).
    pub fn new(
        bundle_name: &str,
        bundle_version: &str,
        bundle_checksum: &str,
        intended_use: &str,
    ) -> Self {
        ResultContext {
            bundle_name: bundle_name.to_owned(),
            bundle_version: bundle_version.to_owned(),
            nightingale_version: env!("CARGO_PKG_VERSION").to_owned(),
            device_uid: Uid::for_bundle(bundle_checksum),
            intended_use: intended_use.to_owned(),
            created: SystemTime::now(),
        }
    }
}

/// One reported output of a bundle.
#[derive(Debug, Clone)]
pub struct Finding {
    /// What was looked for (e.g. SCT 233604007 "Pneumonia"), or a [`Code::local`].
    pub label: Code,
    /// The model's probability for it, in [0, 1].
    pub probability: f32,
    /// The operating threshold, in [0, 1].
    pub threshold: f32,
    /// Whether the finding is reported as present (the caller decides, usually
    /// `probability >= threshold`; written as SCT Present/Absent and POSITIVE/NEGATIVE).
    pub positive: bool,
    /// The image the probability was measured on (the series' highest, for a per-frame
    /// model): the SR's probability is `INFERRED FROM` it, as TID 300 / TID 320's
    /// `(121112, DCM, "Source of Measurement")`. None: measured on the whole series (a
    /// volume), which the image library lists.
    pub measured_on: Option<MeasuredOn>,
}

/// One source image a measurement was made on: an instance of the series (its position in
/// [`SourceSeries::instances`]) and, for a multi-frame instance, the frame (1-based, as
/// Referenced Frame Number counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeasuredOn {
    pub instance: usize,
    pub frame: Option<u32>,
}

/// A finished result object.
#[derive(Debug, Clone)]
pub struct ResultObject {
    pub sop_class_uid: &'static str,
    pub sop_instance_uid: Uid,
    pub series_instance_uid: Uid,
    pub study_instance_uid: Uid,
    /// Part 10 bytes: preamble, `DICM`, file meta group, Explicit VR Little Endian data set.
    pub bytes: Vec<u8>,
}

/// Why a result object could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error("the source series has no instances")]
    EmptySeries,
    #[error("source instance #{index} has no usable {attribute}")]
    MissingAttribute {
        index: usize,
        attribute: &'static str,
    },
    #[error("source instance #{index} belongs to another study than instance #0")]
    MixedStudies { index: usize },
    #[error("source instance #{index} belongs to another series than instance #0")]
    MixedSeries { index: usize },
    /// Another patient, modality or SOP class than instance #0 (named; values not shown).
    #[error("source instance #{index} differs from instance #0 in {attribute}")]
    MixedIdentity {
        index: usize,
        attribute: &'static str,
    },
    /// A Specific Character Set with code extensions (several values, e.g.
    /// `ISO 2022 IR 6\ISO 2022 IR 87`), or a single term dicom-rs does not know (e.g.
    /// `ISO_IR 148`, Latin-5): dicom-rs does not switch character sets at ISO 2022 escape
    /// sequences and reads an unknown set as the default repertoire, so the patient's name
    /// and other text would reach the result garbled. Likewise text whose bytes are not
    /// valid in the declared set (Latin-1 bytes under `ISO_IR 192`, a JIS character whose
    /// second byte is 0x5C split as if a value separator): dicom-rs reads each bad byte as
    /// `\ooo`, and its backslash would reach PACS as a value separator. No result is made
    /// instead.
    #[error(
        "the source's Specific Character Set uses ISO 2022 code extensions or a character \
         set this build does not decode, or its text is not valid in it: no result object is \
         made (its patient name would reach PACS garbled)"
    )]
    UnsupportedCharset,
    #[error("no findings to report")]
    NoFindings,
    #[error("finding #{index}: {what} {value} is not a number in [0, 1]")]
    OutOfRange {
        index: usize,
        what: &'static str,
        value: f32,
    },
    #[error("finding #{index}: the label code has an empty {part}")]
    EmptyCode { index: usize, part: &'static str },
    #[error("the rendered image is {rows}×{columns}: both must be 1–65535")]
    ImageSize { rows: usize, columns: usize },
    #[error("the rendered image has {actual} bytes, {rows}×{columns}×{samples} needs {expected}")]
    PixelCount {
        rows: usize,
        columns: usize,
        samples: usize,
        expected: usize,
        actual: usize,
    },
    #[error(
        "the rendered image's or a measurement's source instance is not one of the series' instances"
    )]
    UnknownSourceInstance,
    #[error("building the file meta group")]
    Meta(#[source] Box<dicom_object::WithMetaError>),
    #[error("writing the Part 10 object")]
    Write(#[source] Box<dicom_object::WriteError>),
}

fn check_findings(source: &SourceSeries, findings: &[Finding]) -> Result<(), ResultError> {
    check_values(findings)?;
    for f in findings {
        if let Some(m) = f.measured_on
            && (m.instance >= source.instances.len() || m.frame == Some(0))
        {
            return Err(ResultError::UnknownSourceInstance);
        }
    }
    Ok(())
}

fn check_values(findings: &[Finding]) -> Result<(), ResultError> {
    if findings.is_empty() {
        return Err(ResultError::NoFindings);
    }
    for (index, f) in findings.iter().enumerate() {
        for (what, value) in [("probability", f.probability), ("threshold", f.threshold)] {
            if !(value.is_finite() && (0.0..=1.0).contains(&value)) {
                return Err(ResultError::OutOfRange { index, what, value });
            }
        }
        for (part, text) in [
            ("value", &f.label.value),
            ("scheme", &f.label.scheme),
            ("meaning", &f.label.meaning),
        ] {
            if text.trim().is_empty() {
                return Err(ResultError::EmptyCode { index, part });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_uids_are_valid_and_distinct() {
        let a = Uid::generate();
        let b = Uid::generate();
        assert_ne!(a, b);
        for u in [&a, &b] {
            assert!(u.as_str().starts_with("2.25."));
            assert!(u.as_str().len() <= 64);
            assert_eq!(Uid::parse(u.as_str()).as_ref(), Some(u));
            // No leading zero in the decimal component (PS3.5 9.1).
            let tail = &u.as_str()[5..];
            assert!(!tail.starts_with('0') || tail == "0");
        }
    }

    #[test]
    fn device_uid_is_deterministic_per_checksum() {
        let a = Uid::for_bundle("aa11");
        assert_eq!(a, Uid::for_bundle("aa11"));
        assert_ne!(a, Uid::for_bundle("aa12"));
        // A version 8 UUID: the version nibble of the 128-bit value is 8.
        let n: u128 = a.as_str()[5..].parse().unwrap();
        assert_eq!((n >> 76) & 0xf, 8);
    }

    #[test]
    fn uid_parse_rejects_bad_text() {
        for bad in ["", "1\\2", "1 2", "1.2\u{e9}", &"1".repeat(65)] {
            assert_eq!(Uid::parse(bad), None, "{bad:?}");
        }
        // As some senders write them: kept, so that a result references its source.
        assert_eq!(
            Uid::parse("1.2.826.ABC.7 ").unwrap().as_str(),
            "1.2.826.ABC.7"
        );
        assert_eq!(Uid::parse("1.2.3\0").unwrap().as_str(), "1.2.3");
    }

    fn finding(p: f32, t: f32) -> Finding {
        Finding {
            label: Code::local("x", "X"),
            probability: p,
            threshold: t,
            positive: p >= t,
            measured_on: None,
        }
    }

    #[test]
    fn findings_are_checked() {
        assert!(matches!(check_values(&[]), Err(ResultError::NoFindings)));
        for (p, t) in [
            (f32::NAN, 0.5),
            (1.5, 0.5),
            (0.5, -0.1),
            (0.5, f32::INFINITY),
        ] {
            assert!(matches!(
                check_values(&[finding(p, t)]),
                Err(ResultError::OutOfRange { index: 0, .. })
            ));
        }
        let mut f = finding(0.2, 0.5);
        f.label.meaning = " ".into();
        assert!(matches!(
            check_values(&[finding(0.1, 0.2), f]),
            Err(ResultError::EmptyCode {
                index: 1,
                part: "meaning"
            })
        ));
        assert!(check_values(&[finding(0.0, 1.0)]).is_ok());
    }
}
