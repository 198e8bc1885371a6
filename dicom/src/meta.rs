//! Reading the file meta group of a Part 10 file as senders write it.
//!
//! dicom-object's meta reader refuses a UID value holding anything but digits, dots, NUL and
//! white space. Some modalities and archives write letters in their UIDs (against PS3.5
//! §9.1); the spool stores such instances as dcmtk and Orthanc do ([`sop::is_acceptable_uid`]),
//! so everything that reads them back goes through here: the UID values of the meta group are
//! replaced, in a copy of the group's bytes of the same length, by digits for dicom-object's
//! reader, and the values as written are put back into the table it returns. Nothing changes
//! for a conformant file (read by dicom-object alone first).
//!
//! [`sop::is_acceptable_uid`]: crate::sop::is_acceptable_uid

use std::fs::File;
use std::io::{BufReader, Cursor, Read};
use std::path::Path;

use dicom_core::Tag;
use dicom_object::file::ReadPreamble;
use dicom_object::meta::FileMetaTable;
use dicom_object::{DefaultDicomObject, OpenFileOptions, ReadError};

/// Explicit VR Little Endian VRs whose length takes 4 bytes after 2 reserved ones.
const LONG_VRS: [&[u8; 2]; 13] = [
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV",
];

/// The largest meta group read (real ones are a few hundred bytes).
const MAX_GROUP_LEN: usize = 1 << 20;

/// What dicom-object's meta reader lets stand in a UID value.
fn uid_byte_ok(b: u8) -> bool {
    b.is_ascii_digit() || b == b'.' || b == 0 || b.is_ascii_whitespace()
}

/// A meta element whose UID value was replaced, and the value as written.
struct Replaced {
    element: u16,
    value: String,
}

/// Replaces, in `group` (the meta group's elements after (0002,0000), Explicit VR Little
/// Endian), each UI value with a character dicom-object refuses by one of the same length in
/// digits. Returns what was replaced; `None` when the group cannot be walked.
fn replace_uids(group: &mut [u8]) -> Option<Vec<Replaced>> {
    let mut replaced = Vec::new();
    let mut pos = 0usize;
    while pos + 8 <= group.len() {
        let g = u16::from_le_bytes([group[pos], group[pos + 1]]);
        if g != 0x0002 {
            break;
        }
        let element = u16::from_le_bytes([group[pos + 2], group[pos + 3]]);
        let vr = [group[pos + 4], group[pos + 5]];
        let (header, len) = if LONG_VRS.contains(&&vr) {
            let len = group.get(pos + 8..pos + 12)?;
            (12, u32::from_le_bytes(len.try_into().ok()?) as usize)
        } else {
            (
                8,
                u16::from_le_bytes([group[pos + 6], group[pos + 7]]) as usize,
            )
        };
        let start = pos.checked_add(header)?;
        let end = start.checked_add(len)?;
        let value = group.get_mut(start..end)?;
        // The transfer syntax is left as written: one with letters names no syntax anyway.
        if &vr == b"UI" && element != 0x0010 && !value.iter().all(|&b| uid_byte_ok(b)) {
            replaced.push(Replaced {
                element,
                value: String::from_utf8_lossy(value).into_owned(),
            });
            for b in value.iter_mut().filter(|b| !uid_byte_ok(**b)) {
                *b = b'9';
            }
        }
        pos = end;
    }
    Some(replaced)
}

/// Puts the values as written back into the table read from the replaced copy.
fn restore(meta: &mut FileMetaTable, replaced: Vec<Replaced>) {
    for r in replaced {
        match r.element {
            0x0002 => meta.media_storage_sop_class_uid = r.value,
            0x0003 => meta.media_storage_sop_instance_uid = r.value,
            0x0012 => meta.implementation_class_uid = r.value,
            0x0100 => meta.private_information_creator_uid = Some(r.value),
            _ => {}
        }
    }
}

/// The meta group at the start of `bytes` (from the `DICM` prefix on: (0002,0000) first),
/// with its UIDs replaced where needed; `None` when nothing needed replacing or the group
/// cannot be walked. The copy holds the prefix and the group only.
fn replaced_copy(bytes: &[u8]) -> Option<(Vec<u8>, Vec<Replaced>)> {
    if bytes.len() < 16 || &bytes[..4] != b"DICM" || bytes[4..8] != [2, 0, 0, 0] {
        return None;
    }
    let group_len = u32::from_le_bytes(bytes[12..16].try_into().ok()?) as usize;
    if group_len > MAX_GROUP_LEN {
        return None;
    }
    let mut copy = bytes.get(..16 + group_len)?.to_vec();
    let replaced = replace_uids(&mut copy[16..])?;
    (!replaced.is_empty()).then_some((copy, replaced))
}

/// Reads the file meta group at the start of `bytes` (from the `DICM` prefix on), as
/// [`FileMetaTable::from_reader`] does, but keeps a UID with letters as written. Returns the
/// table and the number of bytes the group took (prefix included).
pub fn read_file_meta(bytes: &[u8]) -> Result<(FileMetaTable, usize), dicom_object::meta::Error> {
    let mut rest = bytes;
    match FileMetaTable::from_reader(&mut rest) {
        Ok(meta) => Ok((meta, bytes.len() - rest.len())),
        Err(e) => {
            let Some((copy, replaced)) = replaced_copy(bytes) else {
                return Err(e);
            };
            let mut meta = FileMetaTable::from_reader(copy.as_slice())?;
            restore(&mut meta, replaced);
            Ok((meta, copy.len()))
        }
    }
}

/// Opens a stored Part 10 file (preamble, meta group, data set) as
/// [`OpenFileOptions::open_file`] does, stopping before `read_until` when given, but keeps a
/// meta group UID with letters as written, and reads standard attributes written as UN with
/// their dictionary's VR ([`crate::unknown_vr`]).
pub fn open_file(path: &Path, read_until: Option<Tag>) -> Result<DefaultDicomObject, ReadError> {
    let options = || {
        let options = OpenFileOptions::new();
        match read_until {
            Some(tag) => options.read_until(tag),
            None => options,
        }
    };
    let error = match options().open_file(path) {
        Ok(obj) => return Ok(with_standard_vrs(obj)),
        Err(e) => e,
    };
    let Some((file, head, replaced)) = replaced_head(path) else {
        return Err(error);
    };
    let mut obj = options()
        .read_preamble(ReadPreamble::Always)
        .from_reader(Cursor::new(head).chain(file))
        .map_err(|_| error)?;
    restore(obj.meta_mut(), replaced);
    Ok(with_standard_vrs(obj))
}

/// `obj` with the standard attributes an archive wrote as UN read with their dictionary's VR
/// ([`crate::unknown_vr`]).
fn with_standard_vrs(mut obj: DefaultDicomObject) -> DefaultDicomObject {
    let big_endian =
        obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']) == "1.2.840.10008.1.2.2";
    crate::unknown_vr::restore_standard_vrs(&mut obj, big_endian);
    obj
}

/// The preamble and meta group of the file at `path` with its UIDs replaced, and the file
/// positioned after them; `None` when nothing needed replacing.
fn replaced_head(path: &Path) -> Option<(BufReader<File>, Vec<u8>, Vec<Replaced>)> {
    let mut file = BufReader::new(File::open(path).ok()?);
    let mut head = vec![0u8; 128 + 16];
    file.read_exact(&mut head).ok()?;
    let group_len = u32::from_le_bytes(head[140..144].try_into().ok()?) as usize;
    if group_len > MAX_GROUP_LEN {
        return None;
    }
    let mut group = vec![0u8; group_len];
    file.read_exact(&mut group).ok()?;
    head.extend_from_slice(&group);
    let (copy, replaced) = replaced_copy(&head[128..])?;
    head.truncate(128);
    head.extend_from_slice(&copy);
    Some((file, head, replaced))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::InMemDicomObject;
    use dicom_object::meta::FileMetaTableBuilder;

    const LETTERS: &str = "1.2.826.0.1.ABC.7";

    fn write(dir: &Path, instance: &str, class: &str) -> std::path::PathBuf {
        let mut obj = InMemDicomObject::new_empty();
        obj.put(DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(instance),
        ));
        obj.put(DataElement::new(
            tags::PATIENT_ID,
            VR::LO,
            PrimitiveValue::from("P1"),
        ));
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PrimitiveValue::from(vec![1u8, 2, 3, 4]),
        ));
        let file = obj.with_exact_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax("1.2.840.10008.1.2.1")
                .media_storage_sop_class_uid(class)
                .media_storage_sop_instance_uid(instance)
                .implementation_class_uid(if instance == LETTERS {
                    "1.2.3.VENDOR"
                } else {
                    "1.2.3.4.5"
                })
                .build()
                .unwrap(),
        );
        let path = dir.join(format!("{}.dcm", instance.len()));
        file.write_to_file(&path).unwrap();
        path
    }

    #[test]
    fn a_uid_with_letters_is_read_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), LETTERS, "1.2.840.10008.5.1.4.1.1.7");
        // dicom-object alone refuses it: the case this module is for.
        assert!(OpenFileOptions::new().open_file(&path).is_err());

        for until in [None, Some(tags::PIXEL_DATA)] {
            let obj = open_file(&path, until).unwrap();
            assert_eq!(
                obj.meta()
                    .media_storage_sop_instance_uid()
                    .trim_end_matches('\0'),
                LETTERS
            );
            assert_eq!(
                obj.meta().implementation_class_uid().trim_end_matches('\0'),
                "1.2.3.VENDOR"
            );
            assert_eq!(
                obj.element(tags::PATIENT_ID).unwrap().to_str().unwrap(),
                "P1"
            );
            assert_eq!(obj.get(tags::PIXEL_DATA).is_some(), until.is_none());
        }

        let bytes = std::fs::read(&path).unwrap();
        let (meta, used) = read_file_meta(&bytes[128..]).unwrap();
        assert_eq!(
            meta.media_storage_sop_instance_uid().trim_end_matches('\0'),
            LETTERS
        );
        // What follows the group is the data set: its first element is (0008,0018).
        assert_eq!(&bytes[128 + used..128 + used + 4], &[0x08, 0, 0x18, 0]);
    }

    #[test]
    fn a_conformant_file_reads_as_dicom_object_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "1.2.3.4", "1.2.840.10008.5.1.4.1.1.7");
        let ours = open_file(&path, None).unwrap();
        let theirs = OpenFileOptions::new().open_file(&path).unwrap();
        assert_eq!(ours.meta(), theirs.meta());
        let bytes = std::fs::read(&path).unwrap();
        let (meta, used) = read_file_meta(&bytes[128..]).unwrap();
        assert_eq!(&meta, theirs.meta());
        assert_eq!(&bytes[128 + used..128 + used + 4], &[0x08, 0, 0x18, 0]);
    }

    #[test]
    fn a_group_that_cannot_be_walked_keeps_dicom_objects_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), LETTERS, "1.2.840.10008.5.1.4.1.1.7");
        let mut bytes = std::fs::read(&path).unwrap();
        // The group length says more than the file holds.
        bytes[140..144].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_file_meta(&bytes[128..]).is_err());
        std::fs::write(&path, &bytes).unwrap();
        assert!(open_file(&path, None).is_err());
    }
}
