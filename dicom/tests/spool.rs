//! The spool's crash-consistency logic: what a store leaves on disk and in the index, what
//! opening the spool repairs (leftover temporary files, rows without files, files without
//! rows), duplicates, quarantine, and the disk high-water mark on a real (tiny) tmpfs.
//!
//! The data sets are built here with dicom-object from the values each test states; the
//! stored files are read back with dicom-object's own Part 10 reader.

use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_dictionary_std::tags;
use nightingale_dicom::{Incoming, Spool, SpoolOptions, StoreError, Stored};

mod support;

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const STUDY: &str = "1.2.826.0.1.3680043.10.1383.9.1";
const SERIES: &str = "1.2.826.0.1.3680043.10.1383.9.1.1";

fn options() -> SpoolOptions {
    SpoolOptions {
        min_free_bytes: 0,
        ..Default::default()
    }
}

/// A CT data set in Explicit VR Little Endian; `None` leaves an attribute out.
fn ct(sop: Option<&str>, pixels: Option<Vec<u8>>) -> Vec<u8> {
    support::explicit_le(&support::ct_object(STUDY, SERIES, sop, pixels))
}

fn incoming() -> Incoming<'static> {
    Incoming {
        transfer_syntax: EXPLICIT_LE,
        calling_ae: "TESTSCU",
        expected_sop_class: None,
        expected_sop_instance: None,
    }
}

fn dcm_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "dcm") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn quarantined(spool: &Spool) -> Vec<String> {
    let mut reasons: Vec<String> = std::fs::read_dir(spool.quarantine_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "reason"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    reasons.sort();
    reasons
}

#[test]
fn a_stored_instance_is_a_part10_file_with_the_data_set_as_received_and_a_row() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, recovery) = Spool::open(dir.path(), options()).unwrap();
    assert_eq!(recovery, Default::default());
    let data = ct(Some("1.2.3.4.1"), Some(vec![1, 0, 2, 0, 3, 0, 4, 0]));
    let stored = spool.store(&data, &incoming()).unwrap();
    assert!(!stored.duplicate);
    let expected = spool
        .root()
        .join("instances")
        .join(STUDY)
        .join(SERIES)
        .join(format!("1.2.3.4.1_{}.dcm", &stored.sha256[..16]));
    assert_eq!(stored.path, expected);
    let bytes = std::fs::read(&expected).unwrap();
    assert!(
        bytes.ends_with(&data),
        "the data set is stored byte for byte"
    );
    assert_eq!(&bytes[128..132], b"DICM");
    // Patient data: readable by the server's user only, whatever the umask (it was 0644).
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&expected).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    let file = dicom_object::open_file(&expected).unwrap();
    assert_eq!(
        file.meta().transfer_syntax().trim_end_matches('\0'),
        EXPLICIT_LE
    );
    assert_eq!(
        file.meta()
            .media_storage_sop_instance_uid()
            .trim_end_matches('\0'),
        "1.2.3.4.1"
    );
    assert_eq!(
        file.meta().source_application_entity_title().map(str::trim),
        Some("TESTSCU")
    );
    assert_eq!(
        file.element(tags::PIXEL_DATA)
            .unwrap()
            .to_bytes()
            .unwrap()
            .as_ref(),
        &[1, 0, 2, 0, 3, 0, 4, 0]
    );

    let rows = spool.instances().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].sop_instance_uid, "1.2.3.4.1");
    assert_eq!(rows[0].study_uid, STUDY);
    assert_eq!(rows[0].series_uid, SERIES);
    assert_eq!(rows[0].sop_class_uid, CT);
    assert_eq!(rows[0].transfer_syntax, EXPLICIT_LE);
    assert_eq!(rows[0].calling_ae, "TESTSCU");
    assert_eq!(rows[0].size, data.len() as u64);
    assert_eq!(rows[0].path, expected);
    assert!(
        std::fs::read_dir(spool.root().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    );

    // Reopening finds nothing to repair.
    drop(spool);
    let (spool, recovery) = Spool::open(dir.path(), options()).unwrap();
    assert_eq!(recovery, Default::default());
    assert_eq!(spool.instances().unwrap().len(), 1);
}

#[test]
fn duplicates_are_idempotent_and_conflicts_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), options()).unwrap();
    let data = ct(Some("1.2.3.4.2"), Some(vec![9, 0]));
    let first = spool.store(&data, &incoming()).unwrap();
    let again = spool.store(&data, &incoming()).unwrap();
    assert!(again.duplicate);
    assert_eq!(again.path, first.path);
    let other = ct(Some("1.2.3.4.2"), Some(vec![8, 0]));
    assert!(matches!(
        spool.store(&other, &incoming()),
        Err(StoreError::Conflict)
    ));
    let reasons = quarantined(&spool);
    assert_eq!(reasons.len(), 1);
    assert!(reasons[0].contains("kind: conflict"), "{}", reasons[0]);
    assert_eq!(dcm_files(spool.root()).len(), 1);
    assert_eq!(spool.instances().unwrap().len(), 1);
    assert!(
        std::fs::read(&first.path).unwrap().ends_with(&data),
        "the first stays"
    );
    assert!(
        std::fs::read_dir(spool.root().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    );
}

/// A CT with a sequence (an item holding a UID and a US value), 16-bit values and pixel
/// data, for the re-encoding tests.
fn ct_with_sequence(sop: &str, series_number: i32) -> dicom_object::InMemDicomObject {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_object::InMemDicomObject;
    let mut obj = support::ct_object(STUDY, SERIES, Some(sop), None);
    obj.put(DataElement::new(
        tags::ROWS,
        VR::US,
        PrimitiveValue::from(2u16),
    ));
    obj.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(2u16),
    ));
    obj.put(DataElement::new(
        tags::SERIES_NUMBER,
        VR::IS,
        PrimitiveValue::from(series_number.to_string()),
    ));
    let item = InMemDicomObject::from_element_iter([
        DataElement::new(
            tags::REFERENCED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.3.4.77"),
        ),
        DataElement::new(
            tags::REFERENCED_FRAME_NUMBER,
            VR::IS,
            PrimitiveValue::from("1"),
        ),
    ]);
    obj.put(DataElement::new(
        tags::REFERENCED_IMAGE_SEQUENCE,
        VR::SQ,
        dicom_core::value::DataSetSequence::from(vec![item]),
    ));
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U16(vec![1, 258, 515, 65535].into()),
    ));
    obj
}

fn encoded(obj: &dicom_object::InMemDicomObject, ts: &str) -> Vec<u8> {
    use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
    let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(ts)
        .unwrap();
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts).unwrap();
    out
}

/// A PACS that re-sends an instance on an association that negotiated another transfer
/// syntax sends the same elements in other bytes: a duplicate (the first copy kept, nothing
/// quarantined), in Implicit VR Little Endian and in Explicit VR Big Endian alike. The same
/// UID with one value changed, in any encoding, stays a conflict.
#[test]
fn the_same_instance_re_encoded_is_a_duplicate_and_another_value_a_conflict() {
    const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
    const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), options()).unwrap();
    let obj = ct_with_sequence("1.2.3.4.50", 3);
    let first = spool
        .store(&encoded(&obj, EXPLICIT_LE), &incoming())
        .unwrap();
    assert!(!first.duplicate);
    let held = std::fs::read(&first.path).unwrap();
    for ts in [IMPLICIT_LE, EXPLICIT_BE] {
        let bytes = encoded(&obj, ts);
        assert!(!held.ends_with(&bytes), "{ts}: other bytes");
        let again = spool
            .store(
                &bytes,
                &Incoming {
                    transfer_syntax: ts,
                    ..incoming()
                },
            )
            .unwrap_or_else(|e| panic!("{ts}: {e}"));
        assert!(again.duplicate, "{ts}");
        assert_eq!(again.path, first.path);
    }
    assert!(quarantined(&spool).is_empty());
    assert_eq!(std::fs::read(&first.path).unwrap(), held, "the first stays");
    assert_eq!(spool.instances().unwrap().len(), 1);
    // One value changed (top level, inside the sequence, a pixel): a conflict each time.
    let mut in_item = obj.clone();
    let item = dicom_object::InMemDicomObject::from_element_iter([dicom_core::DataElement::new(
        tags::REFERENCED_SOP_INSTANCE_UID,
        dicom_core::VR::UI,
        dicom_core::PrimitiveValue::from("1.2.3.4.78"),
    )]);
    in_item.put(dicom_core::DataElement::new(
        tags::REFERENCED_IMAGE_SEQUENCE,
        dicom_core::VR::SQ,
        dicom_core::value::DataSetSequence::from(vec![item]),
    ));
    let mut pixel = obj.clone();
    pixel.put(dicom_core::DataElement::new(
        tags::PIXEL_DATA,
        dicom_core::VR::OW,
        dicom_core::PrimitiveValue::U16(vec![1, 258, 515, 65534].into()),
    ));
    for (what, changed) in [
        ("top level", ct_with_sequence("1.2.3.4.50", 4)),
        ("in an item", in_item),
        ("a pixel", pixel),
    ] {
        for ts in [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE] {
            let e = spool
                .store(
                    &encoded(&changed, ts),
                    &Incoming {
                        transfer_syntax: ts,
                        ..incoming()
                    },
                )
                .unwrap_err();
            assert!(matches!(e, StoreError::Conflict), "{what} {ts}: {e}");
        }
    }
    assert_eq!(quarantined(&spool).len(), 9);
    assert_eq!(std::fs::read(&first.path).unwrap(), held);
}

#[test]
fn own_results_are_stored_without_an_ae_title_and_an_echo_in_other_bytes_is_a_duplicate() {
    use dicom_object::meta::FileMetaTableBuilder;
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), options()).unwrap();
    let obj = support::ct_object(STUDY, SERIES, Some("1.2.3.4.9"), Some(vec![7, 0]));
    let mut file = Vec::new();
    obj.clone()
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(EXPLICIT_LE))
        .unwrap()
        .write_all(&mut file)
        .unwrap();
    let kept = spool.store_own_result(&file).unwrap();
    assert!(!kept.duplicate);
    assert_eq!(
        kept.calling_ae,
        nightingale_dicom::spool::OWN_RESULTS_SENDER
    );
    // The file's header holds no 19-character "AE title" (strict readers refuse one).
    let read = dicom_object::OpenFileOptions::new()
        .open_file(&kept.path)
        .expect("dicom-rs reads the copy");
    assert!(read.meta().source_application_entity_title.is_none());
    // Sent back in by a PACS that re-encodes it (other bytes, same object): a duplicate, the
    // node's copy kept, nothing quarantined. Another sender's instance stays a conflict.
    let mut echoed = obj;
    echoed.put(dicom_core::DataElement::new(
        dicom_core::Tag(0x0009, 0x0010),
        dicom_core::VR::LO,
        dicom_core::PrimitiveValue::from("PACS"),
    ));
    let echo = spool
        .store(&support::explicit_le(&echoed), &incoming())
        .unwrap();
    assert!(echo.duplicate);
    assert_eq!(echo.path, kept.path);
    assert!(quarantined(&spool).is_empty());
    assert_eq!(spool.instances().unwrap().len(), 1);
}

#[test]
fn refused_objects_are_quarantined_with_their_reason_and_never_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), options()).unwrap();
    let good = ct(Some("1.2.3.4.3"), Some(vec![1, 0, 2, 0]));

    // Cut inside the pixel data element.
    let truncated = &good[..good.len() - 2];
    let e = spool.store(truncated, &incoming()).unwrap_err();
    assert!(matches!(e, StoreError::Malformed(_)), "{e}");

    let e = spool
        .store(&ct(None, Some(vec![1, 0])), &incoming())
        .unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::MissingAttribute {
                name: "SOPInstanceUID"
            }
        ),
        "{e}"
    );

    let e = spool
        .store(&ct(Some("1.2.3.4.4"), None), &incoming())
        .unwrap_err();
    assert!(matches!(e, StoreError::MissingPixelData), "{e}");

    let e = spool
        .store(&ct(Some("1.2\\1.3"), Some(vec![1, 0])), &incoming())
        .unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::InvalidUid {
                name: "SOPInstanceUID"
            }
        ),
        "{e}"
    );

    let announced = Incoming {
        expected_sop_instance: Some("1.2.3.4.999"),
        ..incoming()
    };
    let e = spool.store(&good, &announced).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::Mismatch {
                name: "SOPInstanceUID"
            }
        ),
        "{e}"
    );

    let unknown_ts = Incoming {
        transfer_syntax: "1.2.3.4.5.6",
        ..incoming()
    };
    let e = spool.store(&good, &unknown_ts).unwrap_err();
    assert!(matches!(e, StoreError::UnknownTransferSyntax { .. }), "{e}");

    assert!(dcm_files(spool.root()).is_empty());
    assert!(spool.instances().unwrap().is_empty());
    let reasons = quarantined(&spool);
    let kinds: Vec<&str> = reasons
        .iter()
        .map(|r| r.lines().find_map(|l| l.strip_prefix("kind: ")).unwrap())
        .collect();
    let mut kinds_sorted = kinds.clone();
    kinds_sorted.sort();
    assert_eq!(
        kinds_sorted,
        [
            "invalid_uid",
            "malformed",
            "mismatch",
            "missing_attribute",
            "missing_pixel_data",
            "unknown_transfer_syntax"
        ]
    );
    let objects = std::fs::read_dir(spool.quarantine_dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "quarantined")
        })
        .count();
    assert_eq!(objects, 6);
    // Quarantined objects are whole data sets (patient data), their reasons too are the
    // server user's alone, and so are the spool's folders and its index (they were 0644
    // and 0755 under the usual umask: a red-team finding).
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for entry in std::fs::read_dir(spool.quarantine_dir()).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    assert_eq!(mode(&spool.quarantine_dir()), 0o700);
    assert_eq!(mode(&spool.root().join("instances")), 0o700);
    assert_eq!(mode(&spool.root().join("index.sqlite3")), 0o600);
    // The good one still stores afterwards.
    spool.store(&good, &incoming()).unwrap();
}

/// A red-team finding: a data set that repeated its Study Instance UID (or Patient ID, or
/// SOP Instance UID) with another value before its pixel data was stored; the index took
/// the first value, the pipeline's reader (dicom-rs, as pydicom) the last, and the SR went
/// to PACS under a study and patient the index did not list. Refused now, stored or
/// streamed; a repeat of the same bytes (pydicom's `winter.dcm`) is still stored.
#[test]
fn a_data_set_repeating_an_element_with_another_value_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), options()).unwrap();
    let with_repeat = |sop: &str, element: (u16, u16), value: &[u8]| {
        let mut data = ct(Some(sop), Some(vec![1, 0, 2, 0]));
        let pixel = data
            .windows(4)
            .rposition(|w| w == [0xE0, 0x7F, 0x10, 0x00])
            .unwrap();
        let mut repeated = Vec::new();
        repeated.extend_from_slice(&element.0.to_le_bytes());
        repeated.extend_from_slice(&element.1.to_le_bytes());
        repeated.extend_from_slice(b"UI");
        repeated.extend_from_slice(&(value.len() as u16).to_le_bytes());
        repeated.extend_from_slice(value);
        data.splice(pixel..pixel, repeated);
        data
    };
    let other_study = with_repeat("1.2.3.4.70", (0x0020, 0x000D), b"1.2.3.999\0");
    let e = spool.store(&other_study, &incoming()).unwrap_err();
    assert!(e.to_string().contains("(0020,000D) repeated"), "{e}");
    let e = upload(
        &spool,
        "1.2.3.4.71",
        &with_repeat("1.2.3.4.71", (0x0008, 0x0018), b"1.2.3.4.72\0"),
        100,
    )
    .unwrap_err();
    assert!(matches!(e, StoreError::Malformed(_)), "{e}");
    assert!(spool.instances().unwrap().is_empty());
    assert!(dcm_files(spool.root()).is_empty());
    // The same Study Instance UID again, byte for byte: stored.
    let mut study = STUDY.as_bytes().to_vec();
    if study.len() % 2 == 1 {
        study.push(0);
    }
    spool
        .store(
            &with_repeat("1.2.3.4.73", (0x0020, 0x000D), &study),
            &incoming(),
        )
        .unwrap();
    assert_eq!(spool.instances().unwrap().len(), 1);
}

/// A spool made before its folders and index were private (0755 and 0644 under the usual
/// umask) is narrowed when it opens: the files inside are then out of others' reach.
#[test]
fn an_older_spool_is_made_private_when_it_opens() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    drop(Spool::open(&root, options()).unwrap());
    let set = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for sub in ["", "instances", "quarantine"] {
        set(&root.join(sub), 0o755);
    }
    set(&root.join("index.sqlite3"), 0o644);
    let (spool, _) = Spool::open(&root, options()).unwrap();
    for sub in ["", "instances", "quarantine"] {
        assert_eq!(mode(&root.join(sub)), 0o700, "{sub:?}");
    }
    assert_eq!(mode(&root.join("index.sqlite3")), 0o600);
    drop(spool);
}

#[test]
fn opening_deletes_temp_files_drops_rows_without_files_and_indexes_files_without_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), options()).unwrap();
    let a = spool
        .store(&ct(Some("1.2.3.5.1"), Some(vec![1, 0])), &incoming())
        .unwrap();
    let b = spool
        .store(&ct(Some("1.2.3.5.2"), Some(vec![2, 0])), &incoming())
        .unwrap();
    let c = spool
        .store(&ct(Some("1.2.3.5.3"), Some(vec![3, 0])), &incoming())
        .unwrap();
    let root = spool.root().to_owned();
    drop(spool);

    // A store interrupted before its rename: a temp file.
    std::fs::write(root.join("tmp").join("123-456-0.part"), b"half written").unwrap();
    // A file lost after its row was written.
    std::fs::remove_file(&a.path).unwrap();
    // A store interrupted after its rename, before its row: the file is kept, the row is not.
    let db = rusqlite::Connection::open(root.join("index.sqlite3")).unwrap();
    db.execute(
        "DELETE FROM instances WHERE sop_instance_uid = ?1",
        [&b.sop_instance_uid],
    )
    .unwrap();
    drop(db);
    // A file without a row that does not parse.
    let junk = root
        .join("instances")
        .join(STUDY)
        .join(SERIES)
        .join("1.2.3.5.9.dcm");
    std::fs::write(&junk, b"not dicom at all").unwrap();

    let (spool, recovery) = Spool::open(dir.path(), options()).unwrap();
    assert_eq!(recovery.temp_files_deleted, 1);
    assert_eq!(recovery.rows_dropped, 1);
    assert_eq!(recovery.files_indexed, 1);
    assert_eq!(recovery.files_quarantined, 1);
    let uids: Vec<String> = spool
        .instances()
        .unwrap()
        .into_iter()
        .map(|s| s.sop_instance_uid)
        .collect();
    assert_eq!(uids, ["1.2.3.5.2", "1.2.3.5.3"]);
    let recovered = spool
        .instances()
        .unwrap()
        .into_iter()
        .find(|s| s.sop_instance_uid == "1.2.3.5.2")
        .unwrap();
    assert_eq!(recovered.sha256, b.sha256);
    assert_eq!(recovered.size, b.size);
    assert_eq!(recovered.calling_ae, "TESTSCU");
    assert_eq!(recovered.transfer_syntax, EXPLICIT_LE);
    assert!(!junk.exists());
    assert_eq!(dcm_files(&root), vec![b.path.clone(), c.path.clone()]);
    assert!(
        std::fs::read_dir(root.join("tmp"))
            .unwrap()
            .next()
            .is_none()
    );
    assert_eq!(quarantined(&spool).len(), 1);

    // And again: nothing left to repair.
    drop(spool);
    let (_, recovery) = Spool::open(dir.path(), options()).unwrap();
    assert_eq!(recovery, Default::default());
}

/// A real, small tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            // A spool's own folder: a tmpfs root is 1777 by default, a shared folder.
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs ({}): this test needs root, as on the project's machines",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn below_the_high_water_mark_a_store_is_refused_as_out_of_resources() {
    let fs = Tmpfs::mount("2m");
    // Keep 1 MiB free on a 2 MiB file system: the first 600 KiB instance fits, the second not.
    let (spool, _) = Spool::open(
        fs.dir.path(),
        SpoolOptions {
            min_free_bytes: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let big = |uid: &str| ct(Some(uid), Some(vec![7u8; 600 << 10]));
    spool.store(&big("1.2.3.6.1"), &incoming()).unwrap();
    let e = spool.store(&big("1.2.3.6.2"), &incoming()).unwrap_err();
    assert!(matches!(e, StoreError::OutOfResources { .. }), "{e}");
    assert_eq!(spool.instances().unwrap().len(), 1);
    assert_eq!(dcm_files(spool.root()).len(), 1);
    assert!(
        std::fs::read_dir(spool.root().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    );

    // With no high-water mark the file system itself fills: a typed error, no half file.
    drop(spool);
    let (spool, _) = Spool::open(fs.dir.path(), options()).unwrap();
    let e = spool
        .store(
            &ct(Some("1.2.3.6.3"), Some(vec![7u8; 3 << 20])),
            &incoming(),
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::OutOfResources { .. } | StoreError::DiskFull { .. }
        ),
        "{e}"
    );
    assert_eq!(spool.instances().unwrap().len(), 1);
    assert!(
        std::fs::read_dir(spool.root().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn a_non_conformant_uid_is_kept_under_a_hashed_name_inside_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), options()).unwrap();
    let stored = spool
        .store(&ct(Some("../../escape"), Some(vec![1, 0])), &incoming())
        .unwrap();
    assert!(stored.path.starts_with(spool.root().join("instances")));
    let name = stored
        .path
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(name.starts_with('x') && name.ends_with(".dcm"), "{name}");
    assert_eq!(dcm_files(spool.root()), vec![stored.path.clone()]);
    assert_eq!(
        spool.instances().unwrap()[0].sop_instance_uid,
        "../../escape"
    );
    // It survives a reopen (found by its row, not re-indexed).
    drop(spool);
    let (_, recovery) = Spool::open(dir.path(), options()).unwrap();
    assert_eq!(recovery, Default::default());
}

// Concurrent stores (group commit): many threads store at once, and each result must hold
// on its own: durable, indexed, byte for byte what that thread sent.

const THREADS: usize = 8;

/// Runs `f(thread)` on `THREADS` threads released together; returns their results in order.
fn together<T: Send>(f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let start = std::sync::Barrier::new(THREADS);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (f, start) = (&f, &start);
                s.spawn(move || {
                    start.wait();
                    f(t)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn tmp_is_empty(spool: &Spool) -> bool {
    std::fs::read_dir(spool.root().join("tmp"))
        .unwrap()
        .next()
        .is_none()
}

#[test]
fn concurrent_stores_are_each_durable_indexed_and_byte_identical() {
    const PER_THREAD: usize = 25;
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), options()).unwrap();
    let data = |t: usize, i: usize| {
        ct(
            Some(&format!("1.2.3.5.{t}.{i}")),
            Some(vec![t as u8, i as u8, 7, 0]),
        )
    };
    let results = together(|t| {
        (0..PER_THREAD)
            .map(|i| spool.store(&data(t, i), &incoming()).unwrap())
            .collect::<Vec<_>>()
    });
    for (t, stored) in results.iter().enumerate() {
        for (i, s) in stored.iter().enumerate() {
            assert!(!s.duplicate);
            assert_eq!(s.sop_instance_uid, format!("1.2.3.5.{t}.{i}"));
            let bytes = std::fs::read(&s.path).unwrap();
            assert!(bytes.ends_with(&data(t, i)), "{}", s.sop_instance_uid);
            let file = dicom_object::open_file(&s.path).unwrap();
            assert_eq!(
                file.meta()
                    .media_storage_sop_instance_uid()
                    .trim_end_matches('\0'),
                s.sop_instance_uid
            );
        }
    }
    let rows = spool.instances().unwrap();
    assert_eq!(rows.len(), THREADS * PER_THREAD);
    let mut expected: Vec<String> = (0..THREADS)
        .flat_map(|t| (0..PER_THREAD).map(move |i| format!("1.2.3.5.{t}.{i}")))
        .collect();
    expected.sort();
    let mut indexed: Vec<String> = rows.iter().map(|r| r.sop_instance_uid.clone()).collect();
    indexed.sort();
    assert_eq!(indexed, expected);
    assert_eq!(dcm_files(spool.root()).len(), THREADS * PER_THREAD);
    assert!(tmp_is_empty(&spool));
    assert!(quarantined(&spool).is_empty());

    // Every row has its file and every file its row: reopening repairs nothing.
    drop(spool);
    let (spool, recovery) = Spool::open(dir.path(), options()).unwrap();
    assert_eq!(recovery, Default::default());
    assert_eq!(spool.instances().unwrap().len(), THREADS * PER_THREAD);
}

#[test]
fn concurrent_duplicates_are_idempotent() {
    const UIDS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), options()).unwrap();
    let data = |i: usize| ct(Some(&format!("1.2.3.6.{i}")), Some(vec![i as u8, 1]));
    // Every thread stores the same 20 instances, all at once.
    let results = together(|_| {
        (0..UIDS)
            .map(|i| spool.store(&data(i), &incoming()).unwrap())
            .collect::<Vec<_>>()
    });
    for i in 0..UIDS {
        let firsts = results.iter().filter(|r| !r[i].duplicate).count();
        assert_eq!(firsts, 1, "instance {i} written exactly once");
        let path = &results[0][i].path;
        assert!(results.iter().all(|r| &r[i].path == path));
        assert!(std::fs::read(path).unwrap().ends_with(&data(i)));
    }
    assert_eq!(spool.instances().unwrap().len(), UIDS);
    assert_eq!(dcm_files(spool.root()).len(), UIDS);
    assert!(quarantined(&spool).is_empty());
    assert!(tmp_is_empty(&spool));
}

#[test]
fn concurrent_conflicting_duplicates_keep_one_and_quarantine_the_others() {
    const UIDS: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), options()).unwrap();
    // Thread t sends its own content under each shared SOP Instance UID.
    let data = |t: usize, i: usize| ct(Some(&format!("1.2.3.7.{i}")), Some(vec![t as u8, 2]));
    let results = together(|t| {
        (0..UIDS)
            .map(|i| spool.store(&data(t, i), &incoming()))
            .collect::<Vec<_>>()
    });
    for i in 0..UIDS {
        let winners: Vec<usize> = (0..THREADS).filter(|&t| results[t][i].is_ok()).collect();
        assert_eq!(winners.len(), 1, "instance {i}: one version is stored");
        let winner = winners[0];
        let stored = results[winner][i].as_ref().unwrap();
        assert!(!stored.duplicate);
        for (t, r) in results.iter().enumerate() {
            if t != winner {
                assert!(matches!(r[i], Err(StoreError::Conflict)), "thread {t}");
            }
        }
        assert!(
            std::fs::read(&stored.path)
                .unwrap()
                .ends_with(&data(winner, i)),
            "the stored file is the winner's"
        );
    }
    let reasons = quarantined(&spool);
    assert_eq!(reasons.len(), UIDS * (THREADS - 1));
    assert!(reasons.iter().all(|r| r.contains("kind: conflict")));
    assert_eq!(spool.instances().unwrap().len(), UIDS);
    assert_eq!(dcm_files(spool.root()).len(), UIDS);
    assert!(tmp_is_empty(&spool));
}

// ---- data sets received straight into their temporary file (Spool::begin / finish) ----

fn announced<'a>(sop: &'a str) -> Incoming<'a> {
    Incoming {
        transfer_syntax: EXPLICIT_LE,
        calling_ae: "TESTSCU",
        expected_sop_class: Some(CT),
        expected_sop_instance: Some(sop),
    }
}

/// Sends `data` through an upload in fragments of `chunk` bytes.
fn upload(spool: &Spool, sop: &str, data: &[u8], chunk: usize) -> Result<Stored, StoreError> {
    let mut upload = spool.begin(&announced(sop), Vec::new()).unwrap();
    for fragment in data.chunks(chunk) {
        upload.append(fragment);
    }
    let result = spool.finish(&mut upload, &announced(sop));
    // The buffer comes back empty, for the next data set.
    let buffer = upload.into_buffer();
    assert!(buffer.is_empty() && buffer.capacity() >= data.len());
    result
}

/// The spool options with temporary files named in `tmp/` (`named`) or anonymous where
/// the file system allows (the default), and received data sets written through the page
/// cache (`buffered`) or with `O_DIRECT` where the file system allows (the default).
fn temp_options(named: bool, buffered: bool) -> SpoolOptions {
    SpoolOptions {
        named_temp_files: named,
        buffered_writes: buffered,
        ..options()
    }
}

#[test]
fn a_streamed_instance_is_the_same_file_and_row_as_a_stored_one() {
    for (named, buffered) in [(false, false), (true, false), (false, true), (true, true)] {
        // Data sets whose files end at every kind of tail after the last 4 KiB block.
        for extra in [0usize, 2, 1000, 4094] {
            let pixels: Vec<u8> = (0..=255u8).cycle().take(64 * 1024 + extra).collect();
            let streamed_dir = tempfile::tempdir().unwrap();
            let (streamed, _) =
                Spool::open(streamed_dir.path(), temp_options(named, buffered)).unwrap();
            let data = ct(Some("1.2.3.9.1"), Some(pixels));
            let a = upload(&streamed, "1.2.3.9.1", &data, 1000).unwrap();
            let buffered_dir = tempfile::tempdir().unwrap();
            let (plain, _) =
                Spool::open(buffered_dir.path(), temp_options(!named, !buffered)).unwrap();
            let b = plain.store(&data, &announced("1.2.3.9.1")).unwrap();
            let file = std::fs::read(&a.path).unwrap();
            assert_eq!(file, std::fs::read(&b.path).unwrap());
            assert!(file.ends_with(&data));
            assert_eq!((a.sha256.as_str(), a.size), (b.sha256.as_str(), b.size));
            assert_eq!(streamed.instances().unwrap().len(), 1);
            assert!(tmp_is_empty(&streamed));
            // The same again: an idempotent duplicate, nothing left in tmp/.
            let again = upload(&streamed, "1.2.3.9.1", &data, 4096).unwrap();
            assert!(again.duplicate);
            assert!(tmp_is_empty(&streamed));
        }
    }
}

#[test]
fn temporary_files_are_anonymous_where_the_file_system_allows() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), options()).unwrap();
    let (named, _) = Spool::open(&dir.path().join("named"), temp_options(true, true)).unwrap();
    assert!(!named.anonymous_temp_files() && !named.direct_writes());
    #[cfg(target_os = "linux")]
    {
        // ext4, xfs, btrfs and tmpfs have O_TMPFILE; the probe's file is gone.
        let fs = rustix::fs::statfs(dir.path()).unwrap();
        if [0xEF53, 0x5846_5342, 0x9123_683E, 0x0102_1994].contains(&(fs.f_type as i64)) {
            assert!(spool.anonymous_temp_files());
        }
        // ext4, xfs and btrfs take O_DIRECT writes.
        if [0xEF53, 0x5846_5342, 0x9123_683E].contains(&(fs.f_type as i64)) {
            assert!(spool.direct_writes());
        }
    }
    assert!(tmp_is_empty(&spool));
}

#[test]
fn an_upload_dropped_or_refused_leaves_no_file_and_no_row() {
    for named in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path(), temp_options(named, false)).unwrap();
        let data = ct(Some("1.2.3.9.2"), Some(vec![0; 512]));
        let mut dropped = spool.begin(&announced("1.2.3.9.2"), Vec::new()).unwrap();
        dropped.append(&data[..100]);
        // Receiving: in memory only, no file yet.
        assert!(tmp_is_empty(&spool));
        drop(dropped); // the association ended mid-object
        assert!(tmp_is_empty(&spool));
        // Cut inside the data set: refused, quarantined, not indexed.
        let e = upload(&spool, "1.2.3.9.2", &data[..data.len() - 3], 64).unwrap_err();
        assert!(e.is_refusal(), "{e}");
        // Another instance than announced: refused as a mismatch.
        let e = upload(&spool, "1.2.3.9.3", &data, 64).unwrap_err();
        assert!(matches!(e, StoreError::Mismatch { .. }), "{e}");
        assert!(spool.instances().unwrap().is_empty());
        assert!(tmp_is_empty(&spool));
        assert_eq!(quarantined(&spool).len(), 2);
        assert!(dcm_files(spool.root()).is_empty());
    }
}

#[test]
fn a_named_file_whose_data_does_not_match_its_name_is_quarantined_not_indexed() {
    // What a crash between the link and the end of the fsyncs can leave: a file under its
    // final name (no row) whose data did not all reach the disk. Simulated by changing one
    // pixel byte of a stored file and forgetting its row: it still parses, but its data no
    // longer matches the hash in its name.
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), options()).unwrap();
    let data = ct(Some("1.2.3.9.7"), Some(vec![7; 64]));
    let kept = ct(Some("1.2.3.9.8"), Some(vec![8; 64]));
    let a = spool.store(&data, &incoming()).unwrap();
    let b = spool.store(&kept, &incoming()).unwrap();
    drop(spool);
    let db = rusqlite::Connection::open(dir.path().join("index.sqlite3")).unwrap();
    db.execute("DELETE FROM instances", []).unwrap();
    drop(db);
    let mut bytes = std::fs::read(&a.path).unwrap();
    *bytes.last_mut().unwrap() ^= 0xFF;
    std::fs::write(&a.path, &bytes).unwrap();

    let (spool, recovery) = Spool::open(dir.path(), options()).unwrap();
    assert_eq!((recovery.files_indexed, recovery.files_quarantined), (1, 1));
    let uids: Vec<String> = spool
        .instances()
        .unwrap()
        .into_iter()
        .map(|s| s.sop_instance_uid)
        .collect();
    assert_eq!(uids, ["1.2.3.9.8"]);
    assert_eq!(spool.instances().unwrap()[0].path, b.path);
    assert!(!a.path.exists());
    assert!(quarantined(&spool).iter().any(|r| r.contains("kind: torn")));
}

#[test]
fn an_index_from_before_the_attribute_columns_gets_them_from_the_files_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), options()).unwrap();
    // Explicit VR Little Endian: Modality CT, Rows 1, Columns 3 (ct_object's values).
    let a = spool
        .store(
            &ct(Some("1.2.3.9.1"), Some(vec![1, 0, 2, 0, 3, 0])),
            &incoming(),
        )
        .unwrap();
    assert_eq!(a.attributes.modality.as_deref(), Some("CT"));
    assert_eq!(
        (a.attributes.rows, a.attributes.columns),
        (Some(1), Some(3))
    );
    let root = spool.root().to_owned();
    drop(spool);

    // The index as the previous version made it: no attribute columns at all.
    let db = rusqlite::Connection::open(root.join("index.sqlite3")).unwrap();
    for column in [
        "modality",
        "study_date",
        "study_time",
        "series_number",
        "instance_number",
        "rows",
        "columns",
        "number_of_frames",
        "attributes_version",
    ] {
        db.execute_batch(&format!("ALTER TABLE instances DROP COLUMN {column}"))
            .unwrap();
    }
    drop(db);

    let (spool, recovery) = Spool::open(&root, options()).unwrap();
    assert_eq!(recovery.rows_reindexed, 1);
    let rows = spool.instances().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].attributes, a.attributes);
    drop(spool);
    // Once: the next open reads nothing again.
    let (_, recovery) = Spool::open(&root, options()).unwrap();
    assert_eq!(recovery.rows_reindexed, 0);
}

/// Red-team finding: an indexed instance whose file was gone (deleted behind the index, a
/// purge interrupted between file and row) was answered as a duplicate when a PACS sent it
/// again, and nothing was stored under that success. The re-send is stored again under
/// the indexed name; the row is kept.
#[test]
fn a_resend_of_an_instance_whose_file_is_gone_is_stored_again() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), options()).unwrap();
    let data = ct(Some("1.2.3.4.7"), Some(vec![7, 0]));
    let first = spool.store(&data, &incoming()).unwrap();
    std::fs::remove_file(&first.path).unwrap();
    let again = spool.store(&data, &incoming()).unwrap();
    assert_eq!(again.path, first.path);
    assert!(std::fs::read(&first.path).unwrap().ends_with(&data));
    assert_eq!(spool.instances().unwrap().len(), 1);
    assert_eq!(dcm_files(spool.root()).len(), 1);
    // A file cut short (a disk fault) is replaced the same way, the damaged one kept in
    // quarantine (a re-attack's finding: it was acknowledged as a duplicate, 0 bytes kept).
    std::fs::write(&first.path, b"").unwrap();
    let again = spool.store(&data, &incoming()).unwrap();
    assert_eq!(again.path, first.path);
    assert!(std::fs::read(&first.path).unwrap().ends_with(&data));
    let damaged: Vec<_> = std::fs::read_dir(spool.quarantine_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".damaged"))
        .collect();
    assert_eq!(damaged.len(), 1);
    // Other bytes under the same UID are still a conflict, the file gone or not.
    std::fs::remove_file(&first.path).unwrap();
    let other = ct(Some("1.2.3.4.7"), Some(vec![6, 0]));
    assert!(matches!(
        spool.store(&other, &incoming()),
        Err(StoreError::Conflict)
    ));
    assert!(dcm_files(spool.root()).is_empty());
    // The upload path of the DIMSE SCP (begin/finish) stores it again too.
    let announced = Incoming {
        expected_sop_class: Some(CT),
        expected_sop_instance: Some("1.2.3.4.7"),
        ..incoming()
    };
    let mut upload = spool.begin(&announced, Vec::new()).unwrap();
    upload.append(&data);
    let stored = spool.finish(&mut upload, &announced).unwrap();
    assert_eq!(stored.path, first.path);
    assert!(std::fs::read(&first.path).unwrap().ends_with(&data));
    assert!(
        std::fs::read_dir(spool.root().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    );
}
