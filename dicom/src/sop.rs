//! The storage SOP classes and transfer syntaxes the SCP accepts by default.

/// Verification SOP Class (C-ECHO).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";

/// A storage SOP class: its UID, a short name for logs, and whether its instances are
/// images (and so must carry pixel data to be stored).
#[derive(Debug, Clone, Copy)]
pub struct StorageClass {
    pub uid: &'static str,
    pub name: &'static str,
    pub image: bool,
}

const fn image(uid: &'static str, name: &'static str) -> StorageClass {
    StorageClass {
        uid,
        name,
        image: true,
    }
}

const fn other(uid: &'static str, name: &'static str) -> StorageClass {
    StorageClass {
        uid,
        name,
        image: false,
    }
}

/// The storage SOP classes PACS and modalities send (PS3.4 Annex B.5), accepted by default.
pub const STORAGE_CLASSES: &[StorageClass] = &[
    image("1.2.840.10008.5.1.4.1.1.1", "CR"),
    image("1.2.840.10008.5.1.4.1.1.1.1", "DX for presentation"),
    image("1.2.840.10008.5.1.4.1.1.1.1.1", "DX for processing"),
    image("1.2.840.10008.5.1.4.1.1.1.2", "MG for presentation"),
    image("1.2.840.10008.5.1.4.1.1.1.2.1", "MG for processing"),
    image(
        "1.2.840.10008.5.1.4.1.1.1.3",
        "intra-oral X-ray for presentation",
    ),
    image(
        "1.2.840.10008.5.1.4.1.1.1.3.1",
        "intra-oral X-ray for processing",
    ),
    image("1.2.840.10008.5.1.4.1.1.13.1.3", "breast tomosynthesis"),
    image("1.2.840.10008.5.1.4.1.1.2", "CT"),
    image("1.2.840.10008.5.1.4.1.1.2.1", "enhanced CT"),
    image(
        "1.2.840.10008.5.1.4.1.1.2.2",
        "legacy converted enhanced CT",
    ),
    image("1.2.840.10008.5.1.4.1.1.3.1", "US multi-frame"),
    image("1.2.840.10008.5.1.4.1.1.6.1", "US"),
    image("1.2.840.10008.5.1.4.1.1.6.2", "enhanced US volume"),
    image("1.2.840.10008.5.1.4.1.1.6", "US (retired)"),
    image("1.2.840.10008.5.1.4.1.1.3", "US multi-frame (retired)"),
    image("1.2.840.10008.5.1.4.1.1.4", "MR"),
    image("1.2.840.10008.5.1.4.1.1.4.1", "enhanced MR"),
    image("1.2.840.10008.5.1.4.1.1.4.3", "enhanced MR color"),
    other("1.2.840.10008.5.1.4.1.1.4.2", "MR spectroscopy"),
    image("1.2.840.10008.5.1.4.1.1.20", "NM"),
    image("1.2.840.10008.5.1.4.1.1.128", "PET"),
    image("1.2.840.10008.5.1.4.1.1.130", "enhanced PET"),
    image("1.2.840.10008.5.1.4.1.1.12.1", "XA"),
    image("1.2.840.10008.5.1.4.1.1.12.1.1", "enhanced XA"),
    image("1.2.840.10008.5.1.4.1.1.12.2", "XRF"),
    image("1.2.840.10008.5.1.4.1.1.13.1.1", "X-ray 3D angiographic"),
    image("1.2.840.10008.5.1.4.1.1.7", "secondary capture"),
    image("1.2.840.10008.5.1.4.1.1.7.1", "multi-frame single bit SC"),
    image(
        "1.2.840.10008.5.1.4.1.1.7.2",
        "multi-frame grayscale byte SC",
    ),
    image(
        "1.2.840.10008.5.1.4.1.1.7.3",
        "multi-frame grayscale word SC",
    ),
    image("1.2.840.10008.5.1.4.1.1.7.4", "multi-frame true color SC"),
    image("1.2.840.10008.5.1.4.1.1.77.1.4", "VL photographic"),
    image("1.2.840.10008.5.1.4.1.1.481.1", "RT image"),
    other("1.2.840.10008.5.1.4.1.1.481.2", "RT dose"),
    other("1.2.840.10008.5.1.4.1.1.481.3", "RT structure set"),
    other("1.2.840.10008.5.1.4.1.1.481.4", "RT beams treatment record"),
    other("1.2.840.10008.5.1.4.1.1.481.5", "RT plan"),
    other("1.2.840.10008.5.1.4.1.1.481.8", "RT ion plan"),
    other("1.2.840.10008.5.1.4.1.1.88.11", "basic text SR"),
    other("1.2.840.10008.5.1.4.1.1.88.22", "enhanced SR"),
    other("1.2.840.10008.5.1.4.1.1.88.33", "comprehensive SR"),
    other("1.2.840.10008.5.1.4.1.1.88.34", "comprehensive 3D SR"),
    other("1.2.840.10008.5.1.4.1.1.88.50", "mammography CAD SR"),
    other("1.2.840.10008.5.1.4.1.1.88.59", "key object selection"),
    other("1.2.840.10008.5.1.4.1.1.88.65", "chest CAD SR"),
    other("1.2.840.10008.5.1.4.1.1.88.67", "X-ray radiation dose SR"),
    other("1.2.840.10008.5.1.4.1.1.66.4", "segmentation"),
    other(
        "1.2.840.10008.5.1.4.1.1.11.1",
        "grayscale softcopy presentation state",
    ),
    other("1.2.840.10008.5.1.4.1.1.104.1", "encapsulated PDF"),
    other("1.2.840.10008.5.1.4.1.1.9.1.1", "12-lead ECG"),
    other("1.2.840.10008.5.1.4.1.1.9.1.2", "general ECG"),
];

/// Implicit VR Little Endian, the default transfer syntax (PS3.5 10.1).
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";

/// The transfer syntaxes accepted, stored as received (never decoded on the way in), in this
/// node's order of preference: where a requestor proposes several for one presentation
/// context, the first here is taken, whatever the requestor's order (dcmtk's storescp also
/// prefers uncompressed syntaxes). Uncompressed first (the pipeline reads them without a
/// codec), then the compressed syntaxes the pipeline decodes, lossless before lossy, then
/// JPEG-LS, stored but not decoded by this build (a series in it fails
/// `unsupported_transfer_syntax`).
pub const TRANSFER_SYNTAXES: &[&str] = &[
    "1.2.840.10008.1.2.1",    // Explicit VR Little Endian
    IMPLICIT_VR_LE,           // Implicit VR Little Endian
    "1.2.840.10008.1.2.2",    // Explicit VR Big Endian (retired, still sent)
    "1.2.840.10008.1.2.1.99", // Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.5",    // RLE Lossless
    "1.2.840.10008.1.2.4.70", // JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57", // JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.90", // JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.50", // JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51", // JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.91", // JPEG 2000
    "1.2.840.10008.1.2.4.80", // JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81", // JPEG-LS Near-Lossless
];

/// The storage class of a UID, when it is one of [`STORAGE_CLASSES`].
pub fn storage_class(uid: &str) -> Option<&'static StorageClass> {
    STORAGE_CLASSES.iter().find(|c| c.uid == uid)
}

/// Whether instances of this SOP class are images that must carry pixel data.
pub fn is_image_class(uid: &str) -> bool {
    storage_class(uid).is_some_and(|c| c.image)
}

/// A DICOM UID as the standard defines it: 1–64 characters of digits and dots.
pub fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && !uid.starts_with('.')
        && !uid.ends_with('.')
        && !uid.contains("..")
}

/// A UID the spool keeps even though it may break PS3.5's rules: one value (no backslash),
/// 1–64 printable ASCII characters.
pub fn is_acceptable_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b'\\')
}

/// A stored UID that can stand in a URL path as it is, so that DICOMweb can name and look it
/// up: 1–64 of the characters RFC 3986 leaves unreserved but `~` (digits and dots for every
/// conformant UID; letters, `-` and `_` as some senders write them).
pub fn is_url_safe_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        && uid.bytes().any(|b| b != b'.')
}

/// A UID value as read from a data element: without its padding.
pub fn trim_uid(uid: &str) -> &str {
    uid.trim_end_matches(['\0', ' ']).trim_start_matches(' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids() {
        assert!(is_valid_uid("1.2.840.10008.5.1.4.1.1.2"));
        assert!(!is_valid_uid(""));
        assert!(!is_valid_uid("../etc"));
        assert!(!is_valid_uid("1..2"));
        assert!(!is_valid_uid(&"1".repeat(65)));
        assert!(is_url_safe_uid("1.2.840.10008.1.2"));
        assert!(is_url_safe_uid("1.2.826.0.1.ABC-7_x"));
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "1/2",
            "1%2F",
            "1 2",
            "a~b",
            &"1".repeat(65),
        ] {
            assert!(!is_url_safe_uid(bad), "{bad}");
        }
        assert!(is_acceptable_uid("dccc9599087131742838cc1162a630fe"));
        assert!(!is_acceptable_uid("1.2\\1.3"));
        assert!(!is_acceptable_uid(&"1".repeat(65)));
        assert_eq!(trim_uid("1.2.3\0"), "1.2.3");
        assert!(is_image_class("1.2.840.10008.5.1.4.1.1.2"));
        assert!(!is_image_class("1.2.840.10008.5.1.4.1.1.481.2"));
    }
}
