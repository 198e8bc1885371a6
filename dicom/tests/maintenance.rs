//! Spool maintenance: `check` finds each kind of disagreement between the index and the
//! files (and `repair` fixes it), and `purge` deletes what was received before a cutoff,
//! file then row, leaving no empty folders, and old quarantined objects too.
//!
//! The data sets are written by dicom-object here; what the tests expect (sizes, which
//! instances remain) follows from what the test stored and changed, not from the spool.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use nightingale_dicom::maintenance::{CheckOptions, MaintenanceError, Problem};
use nightingale_dicom::{Incoming, Spool, SpoolOptions};

mod support;

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

/// A small CT data set in Explicit VR Little Endian.
fn ct(study: &str, series: &str, sop: &str) -> Vec<u8> {
    support::explicit_le(&support::ct_object(
        study,
        series,
        Some(sop),
        Some(vec![1, 0, 2, 0]),
    ))
}

fn incoming() -> Incoming<'static> {
    Incoming {
        transfer_syntax: EXPLICIT_LE,
        calling_ae: "TESTSCU",
        expected_sop_class: None,
        expected_sop_instance: None,
    }
}

fn open(dir: &Path) -> Spool {
    Spool::open(
        dir,
        SpoolOptions {
            min_free_bytes: 0,
            ..Default::default()
        },
    )
    .unwrap()
    .0
}

/// Stores `n` instances of one series; returns their files.
fn store_some(spool: &Spool, study: &str, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let ds = ct(
                study,
                &format!("{study}.1"),
                &format!("{study}.1.{}", i + 1),
            );
            spool.store(&ds, &incoming()).unwrap().path
        })
        .collect()
}

fn now_check(repair: bool) -> CheckOptions {
    CheckOptions {
        repair,
        settle: Duration::ZERO,
    }
}

fn uids(spool: &Spool) -> Vec<String> {
    spool
        .instances()
        .unwrap()
        .into_iter()
        .map(|s| s.sop_instance_uid)
        .collect()
}

/// The spool's maintenance lock file, opened as another process would to take the lock.
fn maintenance_lock_file(spool: &Path) -> std::fs::File {
    std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(spool.join(".maintenance.lock"))
        .unwrap()
}

fn rel(spool: &Spool, path: &Path) -> PathBuf {
    path.strip_prefix(spool.root()).unwrap().to_owned()
}

#[test]
fn a_consistent_spool_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    store_some(&spool, "1.2.3.10", 3);
    drop(spool);
    let spool = Spool::open_for_maintenance(dir.path()).unwrap();
    let report = spool.check(&CheckOptions::default()).unwrap();
    assert_eq!((report.rows, report.files), (3, 3));
    assert!(
        report.is_consistent() && report.is_clean_now(),
        "{report:?}"
    );
}

#[test]
fn maintenance_needs_an_existing_spool() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Spool::open_for_maintenance(&dir.path().join("nothing-here")),
        Err(MaintenanceError::NoSpool { .. })
    ));
}

#[test]
fn missing_and_changed_files_are_found_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let files = store_some(&spool, "1.2.3.20", 4);
    drop(spool);
    // 0: deleted; 1: one byte of the data set flipped (same size); 2: cut short.
    std::fs::remove_file(&files[0]).unwrap();
    let mut bytes = std::fs::read(&files[1]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&files[1], &bytes).unwrap();
    let full = std::fs::read(&files[2]).unwrap();
    std::fs::write(&files[2], &full[..full.len() - 2]).unwrap();

    let spool = Spool::open_for_maintenance(dir.path()).unwrap();
    let report = spool.check(&now_check(false)).unwrap();
    let problems: Vec<(PathBuf, Problem)> = report
        .bad_rows
        .iter()
        .map(|b| (b.path.clone(), b.problem.clone()))
        .collect();
    let ds_len = ct("1.2.3.20", "1.2.3.20.1", "1.2.3.20.1.3").len() as u64;
    let mut expected = vec![
        (rel(&spool, &files[0]), Problem::Missing),
        (rel(&spool, &files[1]), Problem::Hash),
        (
            rel(&spool, &files[2]),
            Problem::Size {
                indexed: ds_len,
                actual: ds_len - 2,
            },
        ),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(problems, expected);
    assert!(!report.is_consistent());
    // A check without --repair changes nothing.
    assert!(!files[0].exists() && files[1].exists() && files[2].exists());
    assert_eq!(uids(&spool).len(), 4);

    let report = spool.check(&now_check(true)).unwrap();
    let repaired = report.repaired.clone().unwrap();
    assert_eq!(repaired.rows_dropped, 1);
    assert_eq!(repaired.files_quarantined, 2);
    assert!(report.is_clean_now());
    assert!(!files[1].exists() && !files[2].exists());
    assert_eq!(uids(&spool), vec!["1.2.3.20.1.4".to_owned()]);
    let after = spool.check(&now_check(false)).unwrap();
    assert!(after.is_consistent(), "{after:?}");
    // Each quarantined file has its reason beside it.
    let quarantined = std::fs::read_dir(spool.quarantine_dir()).unwrap().count();
    assert_eq!(quarantined, 4);
}

#[test]
fn unindexed_files_are_indexed_only_when_they_pass_the_checks() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let files = store_some(&spool, "1.2.3.30", 2);
    drop(spool);
    // Forget one row (a store interrupted between its rename and its row), and put a file
    // that is not DICOM where an instance would be.
    let db = rusqlite::Connection::open(dir.path().join("index.sqlite3")).unwrap();
    db.execute(
        "DELETE FROM instances WHERE sop_instance_uid = '1.2.3.30.1.2'",
        [],
    )
    .unwrap();
    drop(db);
    let junk = dir
        .path()
        .join("instances/1.2.3.99/1.2.3.99.1/1.2.3.99.1.1.dcm");
    std::fs::create_dir_all(junk.parent().unwrap()).unwrap();
    std::fs::write(&junk, b"not a DICOM file at all").unwrap();

    let spool = Spool::open_for_maintenance(dir.path()).unwrap();
    let report = spool.check(&now_check(false)).unwrap();
    let mut expected = vec![rel(&spool, &files[1]), rel(&spool, &junk)];
    expected.sort();
    assert_eq!(report.unindexed, expected);
    assert!(report.bad_rows.is_empty());

    let report = spool.check(&now_check(true)).unwrap();
    let repaired = report.repaired.unwrap();
    assert_eq!((repaired.files_indexed, repaired.files_quarantined), (1, 1));
    assert_eq!(
        uids(&spool),
        vec!["1.2.3.30.1.1".to_owned(), "1.2.3.30.1.2".to_owned()]
    );
    assert!(files[1].exists() && !junk.exists());
    assert!(spool.check(&now_check(false)).unwrap().is_consistent());
}

#[test]
fn temp_files_are_reported_and_only_settled_ones_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    store_some(&spool, "1.2.3.40", 1);
    drop(spool);
    let tmp = dir.path().join("tmp/12345-1-0.part");
    std::fs::write(&tmp, b"half an instance").unwrap();

    // Opening for maintenance leaves it (Spool::open would delete it).
    let spool = Spool::open_for_maintenance(dir.path()).unwrap();
    assert!(tmp.exists());
    // Fresh: a running server may be writing it; reported as under way (a check of a live
    // spool is not a failure), and repair leaves it.
    let report = spool
        .check(&CheckOptions {
            repair: true,
            settle: Duration::from_secs(3600),
        })
        .unwrap();
    assert!(report.temp_files.is_empty());
    assert_eq!(
        report.in_progress,
        vec![PathBuf::from("tmp/12345-1-0.part")]
    );
    assert!(report.is_consistent() && report.is_clean_now());
    assert!(tmp.exists());
    let report = spool.check(&now_check(false)).unwrap();
    assert_eq!(report.temp_files, vec![PathBuf::from("tmp/12345-1-0.part")]);
    assert!(!report.is_consistent());
    let report = spool.check(&now_check(true)).unwrap();
    assert_eq!(report.repaired.unwrap().temp_files_deleted, 1);
    assert!(!tmp.exists());

    // Dated a day ahead (planted, or restored from a host whose clock ran ahead): settled,
    // not "recent" for as long as its date lies ahead (the check passed, a review's finding).
    std::fs::write(&tmp, b"half an instance").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_modified(SystemTime::now() + Duration::from_secs(86_400))
        .unwrap();
    let report = spool
        .check(&CheckOptions {
            repair: false,
            settle: Duration::from_secs(3600),
        })
        .unwrap();
    assert_eq!(report.temp_files, vec![PathBuf::from("tmp/12345-1-0.part")]);
    assert!(!report.is_consistent());
}

#[test]
fn rows_that_contradict_their_files_are_found_and_made_again_from_the_files() {
    // A red-team finding: check compared only the size and hash, so a row whose UIDs or
    // attributes had been edited (what QIDO-RS, WADO-RS and the pipeline read) passed.
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let files = store_some(&spool, "1.2.3.60", 3);
    drop(spool);
    let db = rusqlite::Connection::open(dir.path().join("index.sqlite3")).unwrap();
    db.execute(
        "UPDATE instances SET sop_instance_uid = '1.2.3.4.5' WHERE sop_instance_uid = '1.2.3.60.1.1'",
        [],
    )
    .unwrap();
    db.execute(
        "UPDATE instances SET modality = 'MR' WHERE sop_instance_uid = '1.2.3.60.1.2'",
        [],
    )
    .unwrap();
    drop(db);
    let spool = Spool::open_for_maintenance(dir.path()).unwrap();
    let report = spool.check(&now_check(false)).unwrap();
    let mut found: Vec<(PathBuf, Problem)> = report
        .bad_rows
        .iter()
        .map(|b| (b.path.clone(), b.problem.clone()))
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let mut want = vec![
        (
            rel(&spool, &files[0]),
            Problem::RowDiffers {
                column: "sop_instance_uid",
            },
        ),
        (
            rel(&spool, &files[1]),
            Problem::RowDiffers { column: "modality" },
        ),
    ];
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(found, want);
    assert!(!report.is_consistent());
    let report = spool.check(&now_check(true)).unwrap();
    assert_eq!(report.repaired.unwrap().rows_reindexed, 2);
    let report = spool.check(&now_check(false)).unwrap();
    assert!(report.is_consistent(), "{report:?}");
    let mut got = uids(&spool);
    got.sort();
    assert_eq!(got, vec!["1.2.3.60.1.1", "1.2.3.60.1.2", "1.2.3.60.1.3"]);
}

#[cfg(unix)]
#[test]
fn links_under_instances_are_reported_and_only_the_link_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let files = store_some(&spool, "1.2.3.70", 1);
    drop(spool);
    let outside = dir.path().join("outside.dcm");
    std::fs::write(&outside, b"not the spool's").unwrap();
    let link = files[0].with_file_name("extra.dcm");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let spool = Spool::open_for_maintenance(dir.path()).unwrap();
    let report = spool.check(&now_check(false)).unwrap();
    assert_eq!(report.links, vec![rel(&spool, &link)]);
    assert!(!report.is_consistent());
    let report = spool.check(&now_check(true)).unwrap();
    assert_eq!(report.repaired.unwrap().links_deleted, 1);
    assert!(std::fs::symlink_metadata(&link).is_err() && outside.exists());
    assert!(spool.check(&now_check(false)).unwrap().is_consistent());
}

#[test]
fn purge_deletes_what_is_older_than_the_cutoff() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let old = store_some(&spool, "1.2.3.50", 2);
    let new = store_some(&spool, "1.2.3.51", 1);
    // A refused object (no pixel data in a CT) goes to quarantine.
    let mut obj = InMemDicomObject::new_empty();
    for (tag, v) in [
        (tags::SOP_CLASS_UID, CT),
        (tags::SOP_INSTANCE_UID, "1.2.3.52.1.1"),
        (tags::STUDY_INSTANCE_UID, "1.2.3.52"),
        (tags::SERIES_INSTANCE_UID, "1.2.3.52.1"),
    ] {
        obj.put(DataElement::new(tag, VR::UI, PrimitiveValue::from(v)));
    }
    let ts = dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased();
    let mut refused = Vec::new();
    obj.write_dataset_with_ts(&mut refused, &ts).unwrap();
    assert!(spool.store(&refused, &incoming()).is_err());
    drop(spool);

    // Make study 1.2.3.50 and the quarantined object 40 days old.
    let forty_days = Duration::from_secs(40 * 86_400);
    let then = SystemTime::now() - forty_days;
    let then_ms = then
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let db = rusqlite::Connection::open(dir.path().join("index.sqlite3")).unwrap();
    db.execute(
        "UPDATE instances SET received_at_ms = ?1 WHERE study_uid = '1.2.3.50'",
        [then_ms],
    )
    .unwrap();
    drop(db);
    let quarantine: Vec<PathBuf> = std::fs::read_dir(dir.path().join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(quarantine.len(), 2, "the object and its reason");
    for q in &quarantine {
        std::fs::File::options()
            .write(true)
            .open(q)
            .unwrap()
            .set_modified(then)
            .unwrap();
    }

    let spool = Spool::open_for_maintenance(dir.path()).unwrap();
    let cutoff = SystemTime::now() - Duration::from_secs(30 * 86_400);
    let size = ct("1.2.3.50", "1.2.3.50.1", "1.2.3.50.1.1").len() as u64;

    let dry = spool.purge(cutoff, true).unwrap();
    assert_eq!(
        (dry.instances, dry.bytes, dry.quarantine_files),
        (2, 2 * size, 2)
    );
    assert!(old.iter().all(|p| p.exists()) && quarantine.iter().all(|q| q.exists()));
    assert_eq!(uids(&spool).len(), 3);

    let done = spool.purge(cutoff, false).unwrap();
    assert_eq!(
        (done.instances, done.bytes, done.quarantine_files),
        (2, 2 * size, 2)
    );
    assert!(old.iter().all(|p| !p.exists()) && quarantine.iter().all(|q| !q.exists()));
    // The study's folders went with its last instance; the other study stays whole.
    assert!(!dir.path().join("instances/1.2.3.50").exists());
    assert!(dir.path().join("instances").is_dir());
    assert!(new[0].exists());
    assert_eq!(uids(&spool), vec!["1.2.3.51.1.1".to_owned()]);
    assert!(spool.check(&now_check(false)).unwrap().is_consistent());
    // Nothing is left to purge.
    assert_eq!(spool.purge(cutoff, false).unwrap().instances, 0);
}

/// The series after `cursor` (the pipeline's view of new arrivals) and the next cursor.
fn touched(spool: &Spool, cursor: i64) -> (Vec<(String, u64)>, i64) {
    let (series, next) = spool.series_touched_since(cursor, 100).unwrap();
    (
        series
            .into_iter()
            .map(|s| (s.series_uid, s.instances))
            .collect(),
        next,
    )
}

/// Red-team finding: `instances` has a TEXT primary key without AUTOINCREMENT, so SQLite
/// gives a new row max(rowid) + 1 (SQLite's "ROWIDs and the INTEGER PRIMARY KEY": the
/// largest rowid in use plus one), reusing the numbers of deleted newest rows. A purge that
/// emptied the spool (or took its newest rows) made the pipeline's cursor skip the next
/// instances for ever. Arrival numbers are never reused.
#[test]
fn instances_stored_after_a_purge_are_seen_after_the_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    store_some(&spool, "1.2.3.60", 3);
    let (series, cursor) = touched(&spool, 0);
    assert_eq!(series, vec![("1.2.3.60.1".to_owned(), 3)]);
    // Everything purged: the spool is empty.
    let all = spool
        .purge(SystemTime::now() + Duration::from_secs(60), false)
        .unwrap();
    assert_eq!(all.instances, 3);
    assert!(uids(&spool).is_empty());
    store_some(&spool, "1.2.3.61", 2);
    let (series, cursor) = touched(&spool, cursor);
    assert_eq!(series, vec![("1.2.3.61.1".to_owned(), 2)]);
    // Only the newest row purged (made old first), then one more arrival.
    let db = rusqlite::Connection::open(dir.path().join("index.sqlite3")).unwrap();
    db.execute(
        "UPDATE instances SET received_at_ms = 0 WHERE sop_instance_uid = '1.2.3.61.1.2'",
        [],
    )
    .unwrap();
    drop(db);
    let cutoff = SystemTime::now() - Duration::from_secs(86_400);
    assert_eq!(spool.purge(cutoff, false).unwrap().instances, 1);
    store_some(&spool, "1.2.3.62", 1);
    let (series, _) = touched(&spool, cursor);
    assert_eq!(series, vec![("1.2.3.62.1".to_owned(), 1)]);
}

/// An index from before the arrival numbers is migrated at open: its rows are numbered by
/// their rowids (a pipeline cursor kept as a rowid stays valid), and a cursor above every
/// row (rowids already reused before the upgrade) restarts from the highest number, so the
/// next arrival is seen.
#[test]
fn an_index_from_before_arrival_numbers_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let files = store_some(&spool, "1.2.3.70", 3);
    drop(spool);
    // The old schema: no seq column, no sequence table or trigger; the newest row deleted
    // (with its file), as a purge did.
    let db = rusqlite::Connection::open(dir.path().join("index.sqlite3")).unwrap();
    db.execute_batch(
        "DROP TRIGGER instances_next_seq; DROP INDEX instances_seq; DROP TABLE instance_seq;
         ALTER TABLE instances DROP COLUMN seq;
         DELETE FROM instances WHERE sop_instance_uid = '1.2.3.70.1.3';",
    )
    .unwrap();
    let rowids: Vec<i64> = db
        .prepare("SELECT rowid FROM instances ORDER BY rowid")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rowids, vec![1, 2]);
    drop(db);
    std::fs::remove_file(&files[2]).unwrap();

    let spool = open(dir.path());
    // Rows numbered by rowid: a cursor at 1 sees the series (its last row is 2).
    let (series, next) = touched(&spool, 1);
    assert_eq!(series, vec![("1.2.3.70.1".to_owned(), 2)]);
    assert_eq!(next, 2);
    // The pipeline had passed rowid 3 (now gone): the spool's highest number is 2 (what
    // `Pipeline::open` brings such a cursor back to before anything is received), and
    // reading after 3 brings the cursor back to 2 as well ...
    assert_eq!(spool.arrival_high().unwrap(), 2);
    assert_eq!(touched(&spool, 3), (vec![], 2));
    // ... and the next arrival (number 3, never given before in this index) is seen.
    store_some(&spool, "1.2.3.71", 1);
    assert_eq!(spool.arrival_high().unwrap(), 3);
    let (series, next) = touched(&spool, 2);
    assert_eq!(series, vec![("1.2.3.71.1".to_owned(), 1)]);
    assert_eq!(next, 3);
    // Opening again migrates nothing twice.
    drop(spool);
    let spool = open(dir.path());
    assert_eq!(touched(&spool, 3), (vec![], 3));
}

/// Red-team finding: `spool purge` deleted, `spool check --repair` moved (and WADO-RS served)
/// files outside the spool named by index rows the spool never writes (`../`, an absolute
/// path, the index itself, through a symbolic link); and one row whose file is a folder
/// stopped check, repair and every purge. Now such rows name nothing to touch: check reports
/// them, repair and purge drop the rows and leave what they name alone; a file that cannot be
/// deleted is kept and the purge goes on with the others.
#[test]
fn rows_naming_paths_outside_the_spool_touch_nothing_and_stop_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let victims = dir.path().join("victim");
    std::fs::create_dir_all(&victims).unwrap();
    let spool = open(&root);
    let files = store_some(&spool, "1.2.3.70", 6);
    drop(spool);
    let victim = |name: &str| {
        let p = victims.join(name);
        std::fs::write(&p, b"not the spool's").unwrap();
        p
    };
    let (rel_victim, abs_victim, link_victim) =
        (victim("rel.dcm"), victim("abs.dcm"), victim("link.dcm"));
    // A series folder replaced by a link to the victims' folder, holding a file of its name.
    let linked_series = root.join("instances/1.2.3.71/1.2.3.71.1");
    std::fs::create_dir_all(linked_series.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&victims, &linked_series).unwrap();
    // A row whose file is a folder.
    let folder = root.join("instances/1.2.3.70/1.2.3.70.1/folder.dcm");
    std::fs::create_dir_all(&folder).unwrap();
    let db = rusqlite::Connection::open(root.join("index.sqlite3")).unwrap();
    let set_path = |uid: &str, path: &str| {
        db.execute(
            "UPDATE instances SET path = ?1 WHERE sop_instance_uid = ?2",
            [path, uid],
        )
        .unwrap();
    };
    set_path("1.2.3.70.1.1", "../victim/rel.dcm");
    set_path("1.2.3.70.1.2", abs_victim.to_str().unwrap());
    set_path("1.2.3.70.1.3", "index.sqlite3");
    set_path("1.2.3.70.1.4", "instances/1.2.3.71/1.2.3.71.1/link.dcm");
    set_path("1.2.3.70.1.5", "instances/1.2.3.70/1.2.3.70.1/folder.dcm");
    // Everything is old.
    db.execute("UPDATE instances SET received_at_ms = 1", [])
        .unwrap();
    drop(db);

    let spool = Spool::open_for_maintenance(&root).unwrap();
    let report = spool.check(&now_check(false)).unwrap();
    let problems: Vec<(String, Problem)> = report
        .bad_rows
        .iter()
        .map(|b| (b.path.display().to_string(), b.problem.clone()))
        .collect();
    for foreign in ["../victim/rel.dcm", "index.sqlite3"] {
        assert!(
            problems.contains(&(foreign.to_owned(), Problem::ForeignPath)),
            "{problems:?}"
        );
    }
    assert!(
        problems
            .iter()
            .any(|(p, k)| p.ends_with("link.dcm") && *k == Problem::ForeignPath)
    );
    assert!(
        problems
            .iter()
            .any(|(p, k)| p.ends_with("abs.dcm") && *k == Problem::ForeignPath)
    );
    assert!(
        problems
            .iter()
            .any(|(p, k)| p.ends_with("folder.dcm") && *k == Problem::Unreadable)
    );

    let repaired = spool.check(&now_check(true)).unwrap().repaired.unwrap();
    assert_eq!(repaired.rows_dropped, 5, "{problems:?}");
    // The five instances' own files, no longer named by a row, are indexed again.
    assert_eq!(repaired.files_indexed, 5, "{repaired:?}");
    // The linked series folder: the link deleted, not the folder it points to.
    assert_eq!(repaired.links_deleted, 1, "{repaired:?}");
    assert!(std::fs::symlink_metadata(&linked_series).is_err());
    for v in [&rel_victim, &abs_victim, &link_victim] {
        assert!(v.exists(), "{v:?} was touched");
    }
    assert!(folder.is_dir());
    assert!(root.join("index.sqlite3").exists());

    // The same rows again, and purge: nothing outside is deleted, the good instance goes
    // (the row through the deleted link now names a plain path with no file: an instance
    // whose file is gone, its row dropped).
    drop(spool);
    let db = rusqlite::Connection::open(root.join("index.sqlite3")).unwrap();
    let good: Vec<String> = db
        .prepare("SELECT path FROM instances")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(good.len(), 6, "{good:?}");
    for (uid, path) in [
        ("9.9.1", "../victim/rel.dcm"),
        ("9.9.2", abs_victim.to_str().unwrap()),
        ("9.9.3", "index.sqlite3"),
        ("9.9.4", "instances/1.2.3.71/1.2.3.71.1/link.dcm"),
        ("9.9.5", "instances/1.2.3.70/1.2.3.70.1/folder.dcm"),
    ] {
        db.execute(
            "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid,
                 transfer_syntax, calling_ae, received_at_ms, size, sha256, path)
             VALUES (?1, '1.2', '9.9', '9.9.0', '1.2.840.10008.1.2.1', 'X', 1, 4, 'aa', ?2)",
            [uid, path],
        )
        .unwrap();
    }
    db.execute("UPDATE instances SET received_at_ms = 1", [])
        .unwrap();
    drop(db);
    let spool = Spool::open_for_maintenance(&root).unwrap();
    // The dry run counts the rows as the purge takes them: the three foreign rows are not
    // among the instances to go (it counted 11; the one whose file is a folder it cannot
    // foresee), and deletes nothing.
    let dry = spool.purge(SystemTime::now(), true).unwrap();
    assert_eq!((dry.instances, dry.foreign_rows), (8, 3), "{dry:?}");
    assert!(files.iter().all(|f| f.exists()));
    let purged = spool.purge(SystemTime::now(), false).unwrap();
    assert_eq!(
        (purged.instances, purged.foreign_rows, purged.kept),
        (7, 3, 1),
        "{purged:?}"
    );
    for v in [&rel_victim, &abs_victim, &link_victim] {
        assert!(v.exists(), "{v:?} was deleted");
    }
    assert!(root.join("index.sqlite3").exists());
    assert!(
        files.iter().all(|f| !f.exists()),
        "the spool's instances were not purged"
    );
    // The kept row (its file is a folder) is still there for an operator to look at.
    assert_eq!(uids(&spool), vec!["9.9.5".to_owned()]);
}

/// Red-team finding: `nightingale spool purge` run beside a server deleted re-sent instances
/// the server had just acknowledged as stored (duplicates, answered from the index). A
/// re-send is answered under the spool's maintenance lock (shared), which a purge batch
/// takes exclusive (across processes), and marks the instance received anew: a purge that
/// runs after it keeps it.
#[test]
fn a_re_sent_instance_is_received_anew_and_waits_for_a_purge_batch() {
    let dir = tempfile::tempdir().unwrap();
    let spool = std::sync::Arc::new(open(dir.path()));
    let file = ct("1.2.3.60", "1.2.3.60.1", "1.2.3.60.1.1");
    spool.store(&file, &incoming()).unwrap();
    // 40 days old, as a study a PACS sends again.
    let then = SystemTime::now() - Duration::from_secs(40 * 86_400);
    let then_ms = then
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let db = rusqlite::Connection::open(dir.path().join("index.sqlite3")).unwrap();
    db.execute("UPDATE instances SET received_at_ms = ?1", [then_ms])
        .unwrap();
    // Another process's purge batch holds the lock: the re-send waits for it.
    let lock = maintenance_lock_file(dir.path());
    lock.lock().unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    let resend = {
        let spool = spool.clone();
        let file = file.clone();
        std::thread::spawn(move || {
            let stored = spool.store(&file, &incoming());
            let _ = done.send(());
            stored
        })
    };
    assert!(
        finished.recv_timeout(Duration::from_millis(300)).is_err(),
        "answered while a purge batch held the lock"
    );
    lock.unlock().unwrap();
    finished
        .recv_timeout(Duration::from_secs(30))
        .expect("answered once the lock is free");
    let stored = resend.join().unwrap().unwrap();
    assert!(stored.duplicate);
    // Received now: a purge of what is older than a day keeps it, file and row.
    let report = spool
        .purge(SystemTime::now() - Duration::from_secs(86_400), false)
        .unwrap();
    assert_eq!(report.instances, 0);
    assert!(stored.path.is_file());
    let rows: i64 = db
        .query_row("SELECT COUNT(*) FROM instances", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 1);
    // A FIFO in the lock's place: the re-send fails at once (a processing failure the
    // sender retries), where the open blocked for ever (a re-attack's finding).
    let lock_path = dir.path().join(".maintenance.lock");
    std::fs::remove_file(&lock_path).unwrap();
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&lock_path)
            .status()
            .unwrap()
            .success()
    );
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(spool.store(&file, &incoming()).map(|_| ()));
    });
    let outcome = finished
        .recv_timeout(Duration::from_secs(30))
        .expect("answered without waiting on the FIFO");
    assert!(outcome.is_err());
}

#[test]
fn a_repair_keeps_the_row_of_a_file_a_re_send_wrote_again() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let files = store_some(&spool, "1.2.3.70", 1);
    drop(spool);
    let bytes = std::fs::read(&files[0]).unwrap();
    std::fs::remove_file(&files[0]).unwrap();
    // A server beside the repair answers the re-send of the lost instance under the
    // maintenance lock, shared, writing its file again under the indexed name.
    let lock = maintenance_lock_file(dir.path());
    lock.lock_shared().unwrap();
    let spool = std::sync::Arc::new(Spool::open_for_maintenance(dir.path()).unwrap());
    let repair = {
        let spool = spool.clone();
        std::thread::spawn(move || spool.check(&now_check(true)))
    };
    // The check reads a one-row index and finds the file missing in well under this; its
    // repair then waits for the lock.
    std::thread::sleep(Duration::from_secs(1));
    std::fs::write(&files[0], &bytes).unwrap();
    lock.unlock().unwrap();
    let report = repair.join().unwrap().unwrap();
    assert_eq!(
        report
            .bad_rows
            .iter()
            .map(|b| b.problem.clone())
            .collect::<Vec<_>>(),
        vec![Problem::Missing],
        "the check saw the file missing"
    );
    let repaired = report.repaired.clone().unwrap();
    assert_eq!((repaired.rows_dropped, repaired.skipped_recent), (0, 1));
    assert!(
        !report.is_clean_now(),
        "a repair that skipped a row says so"
    );
    assert_eq!(uids(&spool), vec!["1.2.3.70.1.1".to_owned()]);
    assert!(spool.check(&now_check(false)).unwrap().is_consistent());
}
