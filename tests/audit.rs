//! The audit trail under faults, on every store: group appends, restarts, tampering, a
//! full file system during a burst of requests (a real tmpfs), rotation, torn tails, and
//! requests whose answer never leaves (deadline): each is recorded, and the chain verifies.
//!
//! PostgreSQL is required, not optional: `scripts/test.sh` installs Debian's `postgresql`,
//! starts a cluster and sets `NIGHTINGALE_TEST_POSTGRES_URL`; without it the PostgreSQL test
//! fails and says how to set one up.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use nightingale::audit::jsonl::{JsonLinesStore, Options};
use nightingale::audit::postgres::{self as pg, PostgresStore};
use nightingale::audit::sqlite::{self, SqliteStore};
use nightingale::audit::{
    self, AuditError, AuditEvent, AuditLog, AuditRecord, AuditStore, EventKind, Outcome,
};
use nightingale::http::{self, AppState, HttpConfig};
use nightingale_models::{Repository, RepositoryOptions};
use tower::ServiceExt;

mod support;
use support::copy_dir;

const MODEL: &str = "wdbc-malignancy";

fn event(i: usize) -> AuditEvent {
    AuditEvent {
        kind: EventKind::Inference,
        request_id: format!("req-{i}"),
        model: "m".into(),
        version: "1".into(),
        model_sha256: "ab".repeat(32),
        input_sha256: Some("cd".repeat(32)),
        output_sha256: None,
        rows: Some(1),
        status: 200,
        outcome: Outcome::Ok,
        actor: None,
        detail: None,
    }
}

fn append(store: &mut dyn AuditStore, range: std::ops::Range<usize>) {
    let events: Vec<AuditEvent> = range.map(event).collect();
    let refs: Vec<&AuditEvent> = events.iter().collect();
    store.append(&refs, 1_700_000_000_000).unwrap();
}

/// A JSON-lines trail at `path`: `groups` appends of `per` records each, rotated at
/// `rotate_bytes` (0: never), the store closed again.
fn write_trail(path: &Path, rotate_bytes: u64, groups: usize, per: usize) {
    let mut store = JsonLinesStore::open(
        path,
        Options {
            fsync: false,
            rotate_bytes,
        },
    )
    .unwrap();
    for g in 0..groups {
        append(&mut store, g * per..(g + 1) * per);
    }
}

// ---------------------------------------------------------------- JSON lines

#[test]
fn jsonl_groups_restarts_and_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit/audit.jsonl");
    {
        let mut store = JsonLinesStore::open(&path, Options::default()).unwrap();
        append(&mut store, 0..3);
        append(&mut store, 3..5);
    }
    let s = audit::verify(&path).unwrap();
    assert_eq!((s.records, s.last_seq()), (5, Some(4)));
    // Reopening continues the chain.
    let mut store = JsonLinesStore::open(&path, Options::default()).unwrap();
    append(&mut store, 5..7);
    drop(store);
    assert_eq!(audit::verify(&path).unwrap().last_seq(), Some(6));

    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut swapped = lines.clone();
    swapped.swap(2, 3);
    let added_key = lines[1].replacen("{\"seq\"", "{\"note\":1,\"seq\"", 1);
    let mut with_added_key = lines.clone();
    with_added_key[1] = &added_key;
    for (what, tampered, line) in [
        (
            "edit",
            text.replacen("\"status\":200", "\"status\":500", 1),
            1,
        ),
        ("delete", [&lines[..3], &lines[4..]].concat().join("\n"), 4),
        ("swap", swapped.join("\n"), 3),
        ("added key", with_added_key.join("\n"), 2),
        ("first line gone", lines[1..].join("\n"), 1),
    ] {
        let p = dir.path().join(format!("{what}.jsonl"));
        std::fs::write(&p, tampered).unwrap();
        match audit::verify(&p) {
            Err(AuditError::Broken { record, .. }) => assert_eq!(record, line, "{what}"),
            other => panic!("{what} not detected: {other:?}"),
        }
    }
    // A forged last record is not appended to.
    let p = dir.path().join("last-edited.jsonl");
    let mut edited = lines.clone();
    let last = edited
        .pop()
        .unwrap()
        .replacen("\"status\":200", "\"status\":201", 1);
    edited.push(&last);
    std::fs::write(&p, edited.join("\n") + "\n").unwrap();
    assert!(matches!(
        JsonLinesStore::open(&p, Options::default()),
        Err(AuditError::BrokenTail { .. })
    ));
    // Nor is a trail ending in blank lines (the server writes none: records were appended
    // after them, and the break stayed in the middle of the trail: a review's finding);
    // a trail with CRLF line ends is still one.
    for (what, end) in [
        ("blank", "\n\n"),
        ("spaces", "\n  \n"),
        ("crlf blank", "\r\n\r\n"),
    ] {
        let p = dir.path().join(format!("{what}.jsonl"));
        let ending = if what == "crlf blank" { "\r\n" } else { "\n" };
        std::fs::write(&p, lines.join(ending) + end).unwrap();
        match JsonLinesStore::open(&p, Options::default()) {
            Err(AuditError::BrokenTail { reason, .. }) => {
                assert!(reason.contains("blank"), "{what}: {reason}")
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    let p = dir.path().join("crlf.jsonl");
    std::fs::write(&p, lines.join("\r\n") + "\r\n").unwrap();
    assert!(JsonLinesStore::open(&p, Options::default()).is_ok());
}

/// Rotated files of the trail `audit.jsonl` in `dir`.
fn rotated_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.starts_with("audit.") && name != "audit.jsonl"
        })
        .count()
}

/// A JSON-lines store at `path` that rotates after every group.
fn rotating_at_every_group(path: &Path) -> JsonLinesStore {
    JsonLinesStore::open(
        path,
        Options {
            fsync: false,
            rotate_bytes: 1,
        },
    )
    .unwrap()
}

/// A check of the trail holds its rotation lock shared while it lists and reads the files:
/// the server's rotation waits for its next group (a rotation during a check made it read
/// the new empty live file, or miss a file rotated twice meanwhile, and call a sound trail
/// cut short or broken: a review's finding).
#[test]
fn a_rotation_waits_while_a_check_reads_the_trail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut store = rotating_at_every_group(&path);
    let rotated = || rotated_files(dir.path());
    append(&mut store, 0..2);
    assert_eq!(rotated(), 1);
    // A check (another process: its own open file) holds the lock shared.
    let lock = std::fs::File::open(dir.path().join(".audit.jsonl.rotation-lock")).unwrap();
    lock.lock_shared().unwrap();
    append(&mut store, 2..4);
    append(&mut store, 4..6);
    assert_eq!(rotated(), 1, "rotated during a check");
    lock.unlock().unwrap();
    append(&mut store, 6..8);
    assert_eq!(rotated(), 2);
    drop(store);
    let summary = audit::verify(&path).unwrap();
    assert_eq!((summary.records, summary.last_seq()), (8, Some(7)));
    // The check takes the lock itself: a rotation waits while it holds it.
    lock.lock().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let checked = path.clone();
    std::thread::spawn(move || {
        let _ = tx.send(audit::verify(&checked).map(|s| s.records));
    });
    assert!(
        rx.recv_timeout(std::time::Duration::from_millis(300))
            .is_err(),
        "the check did not wait for the rotation under way"
    );
    lock.unlock().unwrap();
    let records = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the check ends once the rotation is done");
    assert_eq!(records.unwrap(), 8);
    // A FIFO in the lock's place is no lock: the check reads as before, without waiting on it.
    let lock_path = dir.path().join(".audit.jsonl.rotation-lock");
    std::fs::remove_file(&lock_path).unwrap();
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&lock_path)
            .status()
            .unwrap()
            .success()
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(audit::verify(&path).map(|s| s.records));
    });
    let records = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the check does not wait on a FIFO");
    assert_eq!(records.unwrap(), 8);
    // Nor does the store, which opens and rotates as before.
    let live = dir.path().join("audit.jsonl");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let opened = JsonLinesStore::open(
            &live,
            Options {
                fsync: false,
                rotate_bytes: 1,
            },
        )
        .map(|mut store| append(&mut store, 8..10));
        let _ = tx.send(opened.is_ok());
    });
    assert!(
        rx.recv_timeout(std::time::Duration::from_secs(30))
            .expect("the store does not wait on a FIFO")
    );
}

/// The rotation lock removed while the server runs is made again at the next rotation, and
/// holds rotations off again (checks read without it until a restart: a re-attack's finding).
#[test]
fn a_removed_rotation_lock_is_made_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let lock_path = dir.path().join(".audit.jsonl.rotation-lock");
    let mut store = rotating_at_every_group(&path);
    let rotated = || rotated_files(dir.path());
    std::fs::remove_file(&lock_path).unwrap();
    append(&mut store, 0..2);
    assert_eq!(rotated(), 1);
    assert!(lock_path.is_file(), "made again");
    let lock = std::fs::File::open(&lock_path).unwrap();
    lock.lock_shared().unwrap();
    append(&mut store, 2..4);
    assert_eq!(rotated(), 1, "rotated during a check");
    lock.unlock().unwrap();
    append(&mut store, 4..6);
    assert_eq!(rotated(), 2);
    drop(store);
    assert_eq!(audit::verify(&path).unwrap().records, 6);
}

#[test]
fn a_file_that_is_not_a_trail_is_refused_and_left_as_it_was() {
    // A red-team finding: `validate --audit-log` pointed at a model file cut off everything
    // after its last line end as a "torn record", then refused it.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.onnx");
    let bytes: Vec<u8> = [&[0x08u8, 0x07, 0x12][..], b"\nbackend\x00\x01\x02"].concat();
    std::fs::write(&p, &bytes).unwrap();
    assert!(matches!(
        JsonLinesStore::open(&p, Options::default()),
        Err(AuditError::BrokenTail { .. })
    ));
    assert_eq!(std::fs::read(&p).unwrap(), bytes);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // A first record cut short by a crash is still a trail's torn tail, set aside.
    let torn = dir.path().join("audit.jsonl");
    std::fs::write(&torn, b"{\"seq\":0,\"unix_ms\":1").unwrap();
    let store = JsonLinesStore::open(&torn, Options::default()).unwrap();
    drop(store);
    assert_eq!(std::fs::read(&torn).unwrap(), b"");
}

#[test]
fn a_bare_file_name_verifies_with_its_rotated_files() {
    // A red-team finding: `audit verify audit.jsonl` (no folder part) found no rotated file:
    // a false alarm on a sound trail; a rotated file named alone was checked as 0 records.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_trail(&path, 2048, 10, 3);
    let files = audit::verify(&path).unwrap().files;
    assert!(files.len() > 2);
    let oldest = files[0].file_name().unwrap().to_owned();
    for name in [std::ffi::OsStr::new("audit.jsonl"), oldest.as_os_str()] {
        let out = Command::new(env!("CARGO_BIN_EXE_nightingale"))
            .args(["audit", "verify"])
            .arg(name)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name:?}: {text}");
        assert!(text.contains("30 records"), "{name:?}: {text}");
    }
}

#[test]
fn a_fifo_is_refused_not_waited_on() {
    // A red-team finding: `audit verify` of a FIFO blocked forever (opened to read its
    // header), and a folder whose live log was a FIFO verified as 0 records, intact.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.jsonl");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    for path in [fifo.as_path(), dir.path()] {
        let (tx, rx) = std::sync::mpsc::channel();
        let owned = path.to_owned();
        std::thread::spawn(move || tx.send(audit::verify(&owned).map(|s| s.records)));
        let outcome = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("verify returned");
        let e = outcome.expect_err("a FIFO is no audit trail").to_string();
        assert!(e.contains("not a regular file"), "{}: {e}", path.display());
    }
    // Nor is it opened as the trail to write (`serve` or `validate --audit-log FIFO` hung
    // for good: a review's finding).
    let (tx, rx) = std::sync::mpsc::channel();
    let owned = fifo.clone();
    std::thread::spawn(move || {
        tx.send(JsonLinesStore::open(&owned, Options::default()).map(|_| ()))
    });
    let outcome = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("open returned");
    let e = outcome.expect_err("a FIFO is no audit trail").to_string();
    assert!(e.contains("not a regular file"), "{e}");
    // Nor as an SQLite audit database (a re-attack's finding: `serve` hung on it).
    let (tx, rx) = std::sync::mpsc::channel();
    let owned = fifo.clone();
    std::thread::spawn(move || tx.send(SqliteStore::open(&owned, false).map(|_| ())));
    let outcome = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("open returned");
    let e = outcome
        .expect_err("a FIFO is no audit database")
        .to_string();
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn a_live_file_missing_for_a_moment_is_waited_for() {
    // Rotation renames the live file, then makes a new one: a check in between waits for it
    // (it failed "no such file" on a sound trail) but a missing one still fails.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_trail(&path, 0, 1, 3);
    let aside = dir.path().join("aside");
    std::fs::rename(&path, &aside).unwrap();
    let back = {
        let (aside, path) = (aside.clone(), path.clone());
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            std::fs::rename(aside, path).unwrap();
        })
    };
    assert_eq!(audit::verify(&path).unwrap().records, 3);
    back.join().unwrap();
    let e = audit::verify(&dir.path().join("other.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such file"), "{e}");
    // A server killed between a rotation's rename and its new live file leaves the rotated
    // files alone: the trail they hold verifies by the live file's name, as by the folder
    // (it failed "no such file": a red-team finding).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_trail(&path, 2048, 8, 4);
    // (The live file as a rotation leaves it: renamed with its records, or never made.)
    let text = std::fs::read_to_string(&path).unwrap();
    match text.lines().next() {
        Some(line) => {
            let first: serde_json::Value = serde_json::from_str(line).unwrap();
            let seq = first["seq"].as_u64().unwrap();
            std::fs::rename(&path, dir.path().join(format!("audit.{seq:020}.jsonl"))).unwrap();
        }
        None => std::fs::remove_file(&path).unwrap(),
    }
    let summary = audit::verify(&path).unwrap();
    assert_eq!(summary.records, 32);
    assert!(summary.files.len() >= 2, "{:?}", summary.files);
    assert_eq!(audit::verify(dir.path()).unwrap().records, 32);
    // The command line says the live file is absent (it was silent).
    let (ok, out) = cli_verify(&[path.as_os_str()]);
    assert!(ok, "{out}");
    assert!(out.contains("the live file is absent"), "{out}");
}

#[test]
fn a_live_file_moved_or_replaced_under_the_server_fails_closed_until_put_back() {
    // A red-team finding: after `mv` or `rm` of the live file the server went on answering,
    // its records written to a file the trail no longer held (or to none).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut store = JsonLinesStore::open(&path, Options::default()).unwrap();
    append(&mut store, 0..2);
    let aside = dir.path().join("moved.jsonl");
    std::fs::rename(&path, &aside).unwrap();
    let one = event(2);
    let err = store.append(&[&one], 1).unwrap_err();
    assert!(matches!(err, AuditError::Write { .. }), "{err}");
    assert!(err.to_string().contains("moved away or deleted"), "{err}");
    // Nothing went into the file moved away, nor into a new one at the path.
    assert!(!path.exists());
    assert_eq!(audit::verify(&aside).unwrap().records, 2);
    // Another file in its place is not the live file either.
    std::fs::write(&path, b"").unwrap();
    let err = store.append(&[&one], 1).unwrap_err();
    assert!(
        err.to_string().contains("replaced by another file"),
        "{err}"
    );
    // Put back, the trail goes on where it was.
    std::fs::rename(&aside, &path).unwrap();
    append(&mut store, 2..4);
    let summary = audit::verify(&path).unwrap();
    assert_eq!((summary.records, summary.last_seq()), (4, Some(3)));
    // Cut short or written to in place (a re-attack: records went on after a truncation, or
    // after another hand's line, and the trail no longer verified): refused until it is as
    // the server wrote it.
    let whole = std::fs::read(&path).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    let err = store.append(&[&one], 1).unwrap_err();
    assert!(err.to_string().contains("cut short"), "{err}");
    std::fs::write(&path, [whole.as_slice(), b"{\"seq\":1}\n"].concat()).unwrap();
    let err = store.append(&[&one], 1).unwrap_err();
    assert!(err.to_string().contains("another process"), "{err}");
    std::fs::write(&path, &whole).unwrap();
    append(&mut store, 4..5);
    assert_eq!(audit::verify(&path).unwrap().last_seq(), Some(4));
}

#[test]
fn jsonl_rotates_and_the_chain_continues_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let options = Options {
        fsync: true,
        rotate_bytes: 2048,
    };
    let mut store = JsonLinesStore::open(&path, options.clone()).unwrap();
    for g in 0..20 {
        append(&mut store, g * 3..g * 3 + 3);
    }
    drop(store);
    let s = audit::verify(&path).unwrap();
    assert_eq!(s.records, 60);
    assert!(s.files.len() > 3, "rotated into {} files", s.files.len());
    assert_eq!(s.first_seq, Some(0));
    // The folder verifies the same; a reopened store continues from the newest file.
    assert_eq!(audit::verify(dir.path()).unwrap().records, 60);
    let mut store = JsonLinesStore::open(&path, options).unwrap();
    append(&mut store, 60..61);
    drop(store);
    assert_eq!(audit::verify(&path).unwrap().last_seq(), Some(60));
    // Records cut from the start of the oldest file: its name says where it starts.
    let files = audit::verify(&path).unwrap().files;
    let oldest = std::fs::read_to_string(&files[0]).unwrap();
    let cut: String = oldest.lines().skip(1).map(|l| format!("{l}\n")).collect();
    std::fs::write(&files[0], &cut).unwrap();
    let e = audit::verify(&path).unwrap_err();
    assert!(
        e.to_string()
            .contains("records were removed from its start"),
        "{e}"
    );
    std::fs::write(&files[0], &oldest).unwrap();
    // The whole oldest file archived away: what is left verifies, from where it starts.
    let moved = dir.path().join("archived");
    std::fs::rename(&files[0], &moved).unwrap();
    let s = audit::verify(&path).unwrap();
    assert!(s.first_seq > Some(0), "{:?}", s.first_seq);
    std::fs::rename(&moved, &files[0]).unwrap();
    // A missing middle file breaks the chain.
    std::fs::remove_file(&files[1]).unwrap();
    assert!(matches!(
        audit::verify(&path),
        Err(AuditError::Broken { .. })
    ));
}

#[test]
fn jsonl_a_torn_last_line_is_moved_aside_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut store = JsonLinesStore::open(&path, Options::default()).unwrap();
    append(&mut store, 0..4);
    drop(store);
    let mut bytes = std::fs::read(&path).unwrap();
    let full = bytes.len();
    bytes.extend_from_slice(b"{\"seq\":4,\"unix_ms\":1,\"kind\":\"infer");
    std::fs::write(&path, &bytes).unwrap();
    let mut store = JsonLinesStore::open(&path, Options::default()).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, full);
    append(&mut store, 4..5);
    drop(store);
    assert_eq!(audit::verify(&path).unwrap().last_seq(), Some(4));
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".torn-"))
        .collect();
    assert_eq!(aside.len(), 1);
}

// ---------------------------------------------------------------- SQLite

#[test]
fn sqlite_groups_restarts_and_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.sqlite3");
    {
        let mut store = SqliteStore::open(&path, true).unwrap();
        append(&mut store, 0..3);
        append(&mut store, 3..5);
    }
    assert!(sqlite::is_sqlite(&path));
    let s = audit::verify(&path).unwrap();
    assert_eq!((s.records, s.last_seq()), (5, Some(4)));
    let mut store = SqliteStore::open(&path, false).unwrap();
    append(&mut store, 5..7);
    drop(store);
    assert_eq!(audit::verify(&path).unwrap().last_seq(), Some(6));

    let conn = rusqlite_free_edit(&path);
    for (what, sql, seq) in [
        (
            "edit",
            "UPDATE audit_log SET record = replace(record, '\"status\":200', '\"status\":500') WHERE seq = 2",
            2,
        ),
        ("delete", "DELETE FROM audit_log WHERE seq = 3", 4),
    ] {
        let copy = dir.path().join(format!("{what}.sqlite3"));
        std::fs::copy(&conn, &copy).unwrap();
        sqlite_exec(&copy, sql);
        match audit::verify(&copy) {
            Err(AuditError::Broken { record, .. }) => assert_eq!(record, seq, "{what}"),
            other => panic!("{what} not detected: {other:?}"),
        }
    }
    let copy = dir.path().join("last.sqlite3");
    std::fs::copy(&path, &copy).unwrap();
    sqlite_exec(
        &copy,
        "UPDATE audit_log SET record = replace(record, '\"rows\":1', '\"rows\":2') WHERE seq = 6",
    );
    assert!(matches!(
        SqliteStore::open(&copy, false),
        Err(AuditError::BrokenTail { .. })
    ));
}

/// A review's finding: a `BEFORE INSERT ... RAISE(IGNORE)` trigger planted in a live SQLite
/// trail made inserts store nothing while the server answered, and the server carried on
/// from the real last row, so `audit verify` (with an anchor too) passed. Now an append that
/// stores no row, or a trail whose end moved under the server (rows deleted or added by
/// another writer), is an error: requests fail closed.
#[test]
fn a_sqlite_trail_changed_under_the_server_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.sqlite3");
    let mut store = SqliteStore::open(&path, false).unwrap();
    append(&mut store, 0..3);
    sqlite_exec(
        &path,
        "CREATE TRIGGER drop_them BEFORE INSERT ON audit_log BEGIN SELECT RAISE(IGNORE); END;",
    );
    let one = event(3);
    assert!(matches!(
        store.append(&[&one], 1),
        Err(AuditError::Write { .. })
    ));
    sqlite_exec(&path, "DROP TRIGGER drop_them");
    // The last row deleted by another client: the end is not the one the server wrote.
    // (One writer at a time: the store is closed before the next opens.)
    drop(store);
    let mut store = SqliteStore::open(&path, false).unwrap();
    append(&mut store, 3..4);
    sqlite_exec(&path, "DELETE FROM audit_log WHERE seq = 3");
    let two = event(4);
    let err = store.append(&[&two], 1).unwrap_err();
    assert!(
        err.to_string().contains("changed under the server"),
        "{err}"
    );
    // The database moved away (with its WAL and shared memory) while the server writes it:
    // refused, as the JSON-lines store refuses a live file moved away (its records went to a
    // file the trail no longer held, answered 200: a re-attack's finding); put back, it goes
    // on.
    drop(store);
    let mut store = SqliteStore::open(&path, false).unwrap();
    append(&mut store, 4..5);
    let aside = dir.path().join("aside");
    std::fs::create_dir(&aside).unwrap();
    let files = ["audit.sqlite3", "audit.sqlite3-wal", "audit.sqlite3-shm"];
    for f in files {
        let _ = std::fs::rename(dir.path().join(f), aside.join(f));
    }
    let three = event(5);
    let err = store.append(&[&three], 1).unwrap_err();
    assert!(err.to_string().contains("moved away"), "{err}");
    for f in files {
        let _ = std::fs::rename(aside.join(f), dir.path().join(f));
    }
    append(&mut store, 5..6);
    assert_eq!(audit::verify(&path).unwrap().last_seq(), Some(4));
    // A trail left as it was written goes on.
    drop(store);
    let mut store = SqliteStore::open(&path, false).unwrap();
    append(&mut store, 6..8);
    assert_eq!(audit::verify(&path).unwrap().last_seq(), Some(6));
}

/// The database with its WAL folded in, so a plain file copy holds every record.
fn rusqlite_free_edit(path: &Path) -> PathBuf {
    sqlite_exec(path, "PRAGMA wal_checkpoint(TRUNCATE)");
    path.to_owned()
}

fn sqlite_exec(path: &Path, sql: &str) {
    // The edit an intruder with file access would make, by a separate SQLite client.
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(sql).unwrap();
}

// ---------------------------------------------------------------- PostgreSQL

fn postgres_url() -> String {
    std::env::var("NIGHTINGALE_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "NIGHTINGALE_TEST_POSTGRES_URL is not set: the PostgreSQL audit store's tests are \
             required. scripts/test.sh installs Debian's postgresql, starts a cluster and sets it \
             (e.g. \"host=/var/run/postgresql user=postgres dbname=nightingale_test\")."
        )
    })
}

#[test]
fn postgres_groups_restarts_replicas_and_tampering() {
    let url = postgres_url();
    let mut admin = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    admin
        .batch_execute("DROP TABLE IF EXISTS nightingale_audit")
        .unwrap();
    {
        let mut store = PostgresStore::open(&url).unwrap();
        append(&mut store, 0..3);
        append(&mut store, 3..5);
    }
    let s = pg::verify(&url).unwrap();
    assert_eq!((s.records, s.last_seq()), (5, Some(4)));
    // Two replicas append to one chain in turn.
    let mut a = PostgresStore::open(&url).unwrap();
    let mut b = PostgresStore::open(&url).unwrap();
    let threads: Vec<_> = [(0usize, &mut a), (1, &mut b)]
        .into_iter()
        .map(|(r, store)| {
            let mut store = std::mem::replace(store, PostgresStore::open(&url).unwrap());
            std::thread::spawn(move || {
                for g in 0..10 {
                    let base = 100 + r * 1000 + g * 2;
                    append(&mut store, base..base + 2);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = pg::verify(&url).unwrap();
    assert_eq!((s.records, s.last_seq()), (45, Some(44)));
    // A dropped connection is re-opened before the next group.
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND datname = current_database()",
        )
        .unwrap();
    // The first group after the server dropped the connection may fail (and is not stored);
    // the next one goes through on a new connection.
    let events: Vec<AuditEvent> = (50..51).map(event).collect();
    let refs: Vec<&AuditEvent> = events.iter().collect();
    if a.append(&refs, 1).is_err() {
        a.append(&refs, 1).unwrap();
    }
    assert_eq!(pg::verify(&url).unwrap().last_seq(), Some(45));

    admin
        .batch_execute(
            "UPDATE nightingale_audit SET record = replace(record, '\"status\":200', '\"status\":500') WHERE seq = 7",
        )
        .unwrap();
    match pg::verify(&url) {
        Err(AuditError::Broken { record, .. }) => assert_eq!(record, 7),
        other => panic!("edit not detected: {other:?}"),
    }
    admin
        .batch_execute(
            "UPDATE nightingale_audit SET record = replace(record, '\"rows\":1', '\"rows\":9') WHERE seq = 45",
        )
        .unwrap();
    assert!(matches!(
        PostgresStore::open(&url),
        Err(AuditError::BrokenTail { .. })
    ));
    admin.batch_execute("DROP TABLE nightingale_audit").unwrap();
}

// ---------------------------------------------------------------- full disk

/// A real, small tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (with the reason printed) where this machine refuses to mount one.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs here ({}): the full-disk test needs root",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount ({e}): the full-disk test needs root");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system with `filler` until it refuses more.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0x5au8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(28), "expected ENOSPC, got {e}");
                    break;
                }
            }
        }
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: the audit writer thread may still hold its file for a moment.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn wdbc_repository(dir: &Path) -> Arc<Repository> {
    let bundles = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/bundles");
    copy_dir(&bundles.join(MODEL), &dir.join(MODEL));
    let repository = Arc::new(Repository::new(dir, RepositoryOptions::default()));
    for (name, result) in repository.load_all().unwrap() {
        result.unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    repository
}

fn one_row() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": vec![1.0f32; 30]}]
    }))
    .unwrap()
}

async fn infer(state: &Arc<AppState>) -> StatusCode {
    let req = Request::post(format!("/v2/models/{MODEL}/infer"))
        .body(Body::from(one_row()))
        .unwrap();
    let res = http::app(state.clone()).oneshot(req).await.unwrap();
    let status = res.status();
    let _ = res.into_body().collect().await;
    status
}

async fn burst(state: &Arc<AppState>, n: usize) -> Vec<StatusCode> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let state = state.clone();
            tokio::spawn(async move { infer(&state).await })
        })
        .collect();
    let mut out = vec![];
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn get_status(state: &Arc<AppState>, uri: &str) -> StatusCode {
    let req = Request::get(uri).body(Body::empty()).unwrap();
    http::app(state.clone())
        .oneshot(req)
        .await
        .unwrap()
        .status()
}

/// While the trail cannot be written, every inference is refused, and readiness says so (a
/// balancer went on sending requests to a server that refused them all: a red-team
/// finding); it comes back by itself when the trail does, with no request to try it, on the
/// JSON-lines and the SQLite store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_whether_the_audit_trail_can_be_written() {
    for sqlite in [false, true] {
        let models = tempfile::tempdir().unwrap();
        let repository = wdbc_repository(models.path());
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(if sqlite {
            "audit.sqlite3"
        } else {
            "audit.jsonl"
        });
        let audit = if sqlite {
            AuditLog::start(Box::new(SqliteStore::open(&log, false).unwrap())).unwrap()
        } else {
            AuditLog::open(&log, false).unwrap()
        };
        let state = AppState::new(repository, audit, HttpConfig::default(), None);
        state.set_ready(true);
        let ready = format!("/v2/models/{MODEL}/ready");
        assert_eq!(infer(&state).await, StatusCode::OK);
        assert_eq!(get_status(&state, "/v2/health/ready").await, StatusCode::OK);
        assert_eq!(get_status(&state, &ready).await, StatusCode::OK);
        // The live file moved away; the database's last record deleted by another hand.
        let aside = dir.path().join("aside");
        if sqlite {
            sqlite_exec(
                &log,
                "DELETE FROM audit_log WHERE seq = (SELECT MAX(seq) FROM audit_log)",
            );
        } else {
            std::fs::rename(&log, &aside).unwrap();
        }
        assert_eq!(infer(&state).await, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            get_status(&state, "/v2/health/ready").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            get_status(&state, &ready).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        if sqlite {
            // A database changed under the server stays failed until a restart.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            assert_eq!(
                get_status(&state, "/v2/health/ready").await,
                StatusCode::SERVICE_UNAVAILABLE
            );
            continue;
        }
        // Put back: ready again within a few checks, no request needed.
        std::fs::rename(&aside, &log).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while get_status(&state, "/v2/health/ready").await != StatusCode::OK {
            assert!(Instant::now() < deadline, "readiness never came back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(get_status(&state, &ready).await, StatusCode::OK);
        assert_eq!(infer(&state).await, StatusCode::OK);
        assert_eq!(audit::verify(&log).unwrap().records, 2);
    }
    // SQLite's write lock held by another client (not a Nightingale server: no flock): the
    // append fails after its busy wait, and readiness stays 503 while the lock is held (a
    // read of the last row said all was well: a re-attack's finding), then comes back.
    let models = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.sqlite3");
    let audit = AuditLog::start(Box::new(SqliteStore::open(&log, false).unwrap())).unwrap();
    let state = AppState::new(
        wdbc_repository(models.path()),
        audit,
        HttpConfig::default(),
        None,
    );
    state.set_ready(true);
    assert_eq!(infer(&state).await, StatusCode::OK);
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (locked, is_locked) = std::sync::mpsc::channel::<()>();
    let holder = {
        let log = log.clone();
        std::thread::spawn(move || {
            let conn = rusqlite::Connection::open(&log).unwrap();
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            locked.send(()).unwrap();
            let _ = released.recv_timeout(Duration::from_secs(60));
            conn.execute_batch("ROLLBACK").unwrap();
        })
    };
    is_locked.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(infer(&state).await, StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        get_status(&state, "/v2/health/ready").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    release.send(()).unwrap();
    holder.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while get_status(&state, "/v2/health/ready").await != StatusCode::OK {
        assert!(Instant::now() < deadline, "readiness never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(infer(&state).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_during_a_burst_answers_503_recovers_and_the_chain_verifies() {
    let Some(fs) = Tmpfs::mount("512k") else {
        return;
    };
    let models = tempfile::tempdir().unwrap();
    let repository = wdbc_repository(models.path());
    let log = fs.path().join("audit/audit.jsonl");
    let audit = AuditLog::open(&log, false).unwrap();
    let state = AppState::new(repository, audit, HttpConfig::default(), None);
    state.set_ready(true);

    assert_eq!(infer(&state).await, StatusCode::OK);
    let filler = fs.fill();
    // Full: bursts of requests, each group failing part-way through the log's last page.
    let mut ok = 1;
    let mut refused = 0;
    for _ in 0..4 {
        for s in burst(&state, 48).await {
            match s {
                StatusCode::OK => ok += 1,
                StatusCode::SERVICE_UNAVAILABLE => refused += 1,
                other => panic!("unexpected status {other}"),
            }
        }
    }
    assert!(refused > 0, "the disk never filled up");
    // Still full: still refused, and the log still verifies (no half-written records).
    assert_eq!(audit::verify(&log).unwrap().records, ok);
    // Not ready while full, though the file is in place (readiness came back after a
    // second while every record still failed: a re-attack's finding).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let ready = Request::get("/v2/health/ready")
        .body(Body::empty())
        .unwrap();
    let status = http::app(state.clone())
        .oneshot(ready)
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // Space returns: the server recovers by itself.
    std::fs::remove_file(&filler).unwrap();
    for s in burst(&state, 32).await {
        assert_eq!(s, StatusCode::OK);
        ok += 1;
    }
    let summary = audit::verify(&log).unwrap();
    assert_eq!(summary.records, ok);
    assert_eq!(summary.last_seq(), Some(ok - 1));
    // The CLI agrees.
    let out = Command::new(env!("CARGO_BIN_EXE_nightingale"))
        .args(["audit", "verify"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Model control on a full audit disk: a rollback, a load and an unload are refused with 503
/// and change nothing (each version's record is written before it serves, an unload's
/// before the model stops: an action without its record never happens); once space
/// returns, each is carried out and recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_control_on_a_full_audit_disk_changes_nothing_until_it_can_be_recorded() {
    let Some(fs) = Tmpfs::mount("512k") else {
        return;
    };
    let models = tempfile::tempdir().unwrap();
    let repository = wdbc_repository(models.path());
    let log = fs.path().join("audit/audit.jsonl");
    let audit = AuditLog::open(&log, false).unwrap();
    let state = AppState::new(
        repository.clone(),
        audit,
        HttpConfig {
            admin_token: Some("admin-token-0123456789".into()),
            ..HttpConfig::default()
        },
        None,
    );
    state.set_ready(true);
    let control = |path: &str, body: &'static str| {
        Request::post(format!("/v2/repository/models/{MODEL}/{path}"))
            .header("authorization", "Bearer admin-token-0123456789")
            .body(Body::from(body))
            .unwrap()
    };
    let send = |req: Request<Body>| {
        let state = state.clone();
        async move {
            let res = http::app(state).oneshot(req).await.unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let served = || {
        let mut v: Vec<u64> = repository.loaded().iter().map(|m| m.version).collect();
        v.sort_unstable();
        v
    };
    assert_eq!(served(), vec![1, 2]);
    let filler = fs.fill();
    let rollback = r#"{"parameters": {"version": "1"}}"#;
    for (path, body) in [("load", rollback), ("load", ""), ("unload", "")] {
        let (s, text) = send(control(path, body)).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{path} {body}: {text}");
        assert!(text.contains("audit trail cannot be written"), "{text}");
        assert_eq!(served(), vec![1, 2], "{path} {body} changed what serves");
        assert_eq!(repository.pinned(MODEL), None);
    }
    let before = audit::verify(&log).unwrap().records as usize;
    std::fs::remove_file(&filler).unwrap();
    let (s, text) = send(control("load", rollback)).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(served(), vec![1]);
    let (s, text) = send(control("unload", "")).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert!(served().is_empty());
    let records = records(&log);
    let kinds: Vec<(EventKind, &str)> = records[before..]
        .iter()
        .map(|r| (r.event.kind, r.event.version.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (EventKind::ModelRollback, "1"),
            (EventKind::ModelUnload, "2"),
            (EventKind::ModelUnload, "1")
        ]
    );
    assert_eq!(audit::verify(&log).unwrap().records as usize, records.len());
}

#[test]
fn sqlite_on_a_full_disk_fails_whole_groups_and_recovers() {
    let Some(fs) = Tmpfs::mount("1m") else {
        return;
    };
    let path = fs.path().join("audit.sqlite3");
    let mut store = SqliteStore::open(&path, true).unwrap();
    append(&mut store, 0..2);
    let filler = fs.fill();
    let mut next = 2;
    let mut failures = 0;
    for _ in 0..200 {
        let events: Vec<AuditEvent> = (next..next + 8).map(event).collect();
        let refs: Vec<&AuditEvent> = events.iter().collect();
        match store.append(&refs, 1) {
            Ok(()) => next += 8,
            Err(_) => failures += 1,
        }
    }
    assert!(failures > 0, "the disk never filled up");
    std::fs::remove_file(&filler).unwrap();
    append(&mut store, next..next + 3);
    drop(store);
    let s = audit::verify(&path).unwrap();
    assert_eq!(s.records as usize, next + 3);
}

// ---------------------------------------------------------------- deadlines

fn records(log: &Path) -> Vec<AuditRecord> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits (at most 30 s) until the log holds `n` records.
fn wait_for_records(log: &Path, n: usize) -> Vec<AuditRecord> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let r = records(log);
        if r.len() >= n || Instant::now() > until {
            return r;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_model_past_its_deadline_answers_408_and_is_audited_as_is_a_client_that_leaves() {
    let models = tempfile::tempdir().unwrap();
    let bench = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/bench/resnet50-arch");
    copy_dir(&bench, &models.path().join("resnet50-arch"));
    let repository = Arc::new(Repository::new(models.path(), RepositoryOptions::default()));
    for (name, result) in repository.load_all().unwrap() {
        result.unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let state = AppState::new(
        repository,
        AuditLog::open(&log, false).unwrap(),
        HttpConfig {
            request_timeout: Duration::from_millis(500),
            ..HttpConfig::default()
        },
        None,
    );
    state.set_ready(true);
    // Eight images in Triton's binary framing (quick to decode): seconds of ResNet-50 on
    // any CPU, far past the 500 ms deadline.
    let n = 8 * 3 * 224 * 224;
    let header = serde_json::to_vec(&serde_json::json!({
        "inputs": [{"name": "image", "shape": [8, 3, 224, 224], "datatype": "FP32",
                    "parameters": {"binary_data_size": n * 4}}]
    }))
    .unwrap();
    let mut body = header.clone();
    for _ in 0..n {
        body.extend_from_slice(&0.5f32.to_le_bytes());
    }
    let req = Request::post("/v2/models/resnet50-arch/infer")
        .header("x-request-id", "slow-1")
        .header("inference-header-content-length", header.len())
        .body(Body::from(body.clone()))
        .unwrap();
    let res = http::app(state.clone()).oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
    let got = wait_for_records(&log, 1);
    assert_eq!(got.len(), 1, "the timed-out request was not audited");
    let r = &got[0].event;
    assert_eq!(r.request_id, "slow-1");
    assert_eq!(r.model, "resnet50-arch");
    assert_eq!((r.status, r.outcome), (408, Outcome::Timeout));
    assert!(r.input_sha256.is_some(), "the input reached the model");
    assert_eq!(audit::verify(&log).unwrap().records, 1);

    // A client that goes away before the answer (its request future dropped well before the
    // deadline) is recorded as client-gone.
    let log2 = dir.path().join("audit-2.jsonl");
    let patient = AppState::new(
        state.repository.clone(),
        AuditLog::open(&log2, false).unwrap(),
        HttpConfig {
            request_timeout: Duration::from_secs(600),
            ..HttpConfig::default()
        },
        None,
    );
    patient.set_ready(true);
    let req = Request::post("/v2/models/resnet50-arch/infer")
        .header("x-request-id", "gone-1")
        .header("inference-header-content-length", header.len())
        .body(Body::from(body))
        .unwrap();
    let call = tokio::spawn(http::app(patient.clone()).oneshot(req));
    tokio::time::sleep(Duration::from_millis(300)).await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    let got = wait_for_records(&log2, 1);
    assert_eq!(got.len(), 1, "the abandoned request was not audited");
    let r = &got[0].event;
    assert_eq!(r.request_id, "gone-1");
    assert_eq!((r.status, r.outcome), (499, Outcome::ClientGone));
}

// ---------------------------------------------------------------- the CLI

fn cli_verify(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nightingale"))
        .args(["audit", "verify"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn audit_verify_takes_a_file_its_folder_or_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    write_trail(&log, 1500, 10, 2);
    let files = audit::verify(&log).unwrap().files.len();
    assert!(files > 2);
    for target in [log.as_os_str(), dir.path().as_os_str()] {
        let (ok, out) = cli_verify(&[target]);
        assert!(ok, "{out}");
        assert!(
            out.contains(&format!("20 records in {files} files")),
            "{out}"
        );
    }
    let db = dir.path().join("audit.sqlite3");
    let mut store = SqliteStore::open(&db, false).unwrap();
    append(&mut store, 0..3);
    drop(store);
    let (ok, out) = cli_verify(&[db.as_os_str()]);
    assert!(ok && out.contains("3 records"), "{out}");
    sqlite_exec(
        &db,
        "UPDATE audit_log SET record = replace(record, '\"rows\":1', '\"rows\":3') WHERE seq = 1",
    );
    let (ok, out) = cli_verify(&[db.as_os_str()]);
    assert!(
        !ok && out.starts_with("FAIL") && out.contains("record 1"),
        "{out}"
    );
}

/// `audit verify --anchor FILE`: the first check writes the last record's sequence number and
/// hash; later checks find it still there and move it on, and fail when records were cut
/// from the end (a chain cut short is still a valid chain), when the anchored record was
/// rewritten, or when the anchor file is not one.
#[test]
fn audit_verify_with_an_anchor_finds_records_cut_from_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let anchor = dir.path().join("elsewhere/anchor.json");
    std::fs::create_dir_all(anchor.parent().unwrap()).unwrap();
    let args = [log.as_os_str(), "--anchor".as_ref(), anchor.as_os_str()];
    // An empty trail: nothing to anchor, no file written.
    drop(JsonLinesStore::open(&log, Options::default()).unwrap());
    let (ok, out) = cli_verify(&args);
    assert!(ok && out.contains("no record to anchor yet"), "{out}");
    assert!(!anchor.exists());
    let mut store = JsonLinesStore::open(&log, Options::default()).unwrap();
    append(&mut store, 0..5);
    drop(store);
    let (ok, out) = cli_verify(&args);
    assert!(ok && out.contains("anchor written"), "{out}");
    let tail = audit::verify(&log).unwrap().tail.unwrap();
    let kept: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&anchor).unwrap()).unwrap();
    assert_eq!(
        kept,
        serde_json::json!({"seq": 4, "hash": tail.hash, "first": 0, "starts": [0]})
    );

    // More records: the anchored one is still there; the anchor moves on to the new end.
    let mut store = JsonLinesStore::open(&log, Options::default()).unwrap();
    append(&mut store, 5..8);
    drop(store);
    let (ok, out) = cli_verify(&args);
    assert!(ok && out.contains("anchored record 4 still there"), "{out}");
    let kept: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&anchor).unwrap()).unwrap();
    assert_eq!(kept["seq"], 7);

    // Named through a link: read and written where the link points, the link kept (it was
    // replaced by a file, the target never moved on: a re-attack's finding).
    let link = dir.path().join("anchor-link.json");
    std::os::unix::fs::symlink(&anchor, &link).unwrap();
    let mut store = JsonLinesStore::open(&log, Options::default()).unwrap();
    append(&mut store, 8..9);
    drop(store);
    let (ok, out) = cli_verify(&[log.as_os_str(), "--anchor".as_ref(), link.as_os_str()]);
    assert!(ok && out.contains("anchored record 7 still there"), "{out}");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let kept: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&anchor).unwrap()).unwrap();
    assert_eq!(kept["seq"], 8);
    std::fs::remove_file(&link).unwrap();
    // Back to 8 records for what follows (the cut below keeps 6 of them).
    let text = std::fs::read_to_string(&log).unwrap();
    let eight: String = text.lines().take(8).map(|l| format!("{l}\n")).collect();
    std::fs::write(&log, &eight).unwrap();
    std::fs::write(&anchor, serde_json::to_string(&serde_json::json!({"seq": 7, "hash": audit::verify(&log).unwrap().tail.unwrap().hash, "first": 0, "starts": [0]})).unwrap()).unwrap();

    // The last two records cut away: the plain check passes, the anchored one fails.
    let text = std::fs::read_to_string(&log).unwrap();
    let cut: String = text.lines().take(6).map(|l| format!("{l}\n")).collect();
    std::fs::write(&log, &cut).unwrap();
    assert_eq!(audit::verify(&log).unwrap().last_seq(), Some(5));
    let (ok, out) = cli_verify(&args);
    assert!(
        !ok && out.starts_with("FAIL") && out.contains("records were removed from its end"),
        "{out}"
    );
    // A failed check leaves the anchor where it was.
    let kept: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&anchor).unwrap()).unwrap();
    assert_eq!(kept["seq"], 7);

    // The trail rebuilt to the same length with other records: the anchored one differs.
    std::fs::remove_file(&log).unwrap();
    let mut store = JsonLinesStore::open(&log, Options::default()).unwrap();
    append(&mut store, 10..18);
    drop(store);
    let (ok, out) = cli_verify(&args);
    assert!(!ok && out.contains("record 7 differs"), "{out}");

    // Not an anchor: refused before anything is checked.
    std::fs::write(&anchor, "{\"seq\": 1}").unwrap();
    let (ok, out) = cli_verify(&args);
    assert!(!ok && out.contains("not an audit anchor"), "{out}");
}

/// Re-attack finding: with `--archived`, any later start that still held the anchored record
/// passed, records cut from inside the live file included, and was recorded as the trail's
/// start. Archiving removes whole files: the new start must be where a file began when the
/// anchor was taken.
#[test]
fn archived_accepts_only_a_start_where_a_file_began() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let anchor = dir.path().join("elsewhere/anchor.json");
    std::fs::create_dir_all(anchor.parent().unwrap()).unwrap();
    write_trail(&log, 2048, 20, 3);
    let mut store = JsonLinesStore::open(&log, Options::default()).unwrap();
    append(&mut store, 100..103);
    drop(store);
    let args = [log.as_os_str(), "--anchor".as_ref(), anchor.as_os_str()];
    let mut archived = args.to_vec();
    archived.push("--archived".as_ref());
    let (ok, out) = cli_verify(&args);
    assert!(ok, "{out}");
    let summary = audit::verify(&log).unwrap();
    assert!(summary.file_starts.len() > 2, "{:?}", summary.file_starts);
    let kept = std::fs::read_to_string(&anchor).unwrap();
    // Every rotated file archived (moved away), and the live file's first record cut.
    let archive = dir.path().join("archive");
    std::fs::create_dir_all(&archive).unwrap();
    for f in &summary.files {
        if *f != log {
            std::fs::rename(f, archive.join(f.file_name().unwrap())).unwrap();
        }
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.lines().count() >= 2);
    let cut: String = text.lines().skip(1).map(|l| format!("{l}\n")).collect();
    std::fs::write(&log, &cut).unwrap();
    let (ok, out) = cli_verify(&archived);
    assert!(!ok && out.contains("where no file began"), "{out}");
    assert_eq!(std::fs::read_to_string(&anchor).unwrap(), kept);
    // The live file whole: archiving is what happened, and it is accepted.
    std::fs::write(&log, &text).unwrap();
    let (ok, out) = cli_verify(&archived);
    assert!(ok, "{out}");
}

/// Red-team finding: a folder holding several logs was reported as one, with the first
/// log's last record (an operator copying it as a checkpoint kept the wrong one) and
/// without the note that another log's oldest file was missing. Each log has its line.
#[test]
fn audit_verify_reports_each_log_of_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.jsonl");
    let mut store = JsonLinesStore::open(&a, Options::default()).unwrap();
    append(&mut store, 0..3);
    drop(store);
    let b = dir.path().join("b.jsonl");
    let mut store = JsonLinesStore::open(&b, Options::default()).unwrap();
    append(&mut store, 0..9);
    drop(store);
    // b's records 0..=4 in a rotated file that is then archived away.
    let text = std::fs::read_to_string(&b).unwrap();
    let rest: String = text.lines().skip(5).map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.path().join("b.00000000000000000005.jsonl"), &rest).unwrap();
    std::fs::write(&b, "").unwrap();
    let (ok, out) = cli_verify(&[dir.path().as_os_str()]);
    assert!(ok, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains("a.jsonl: 3 records") && lines[0].contains("last record 2 "),
        "{out}"
    );
    assert!(
        lines[1].contains("b.jsonl: 4 records")
            && lines[1].contains("from sequence 5")
            && lines[1].contains("last record 8 "),
        "{out}"
    );
    // The library's summary of such a folder claims no single start or end.
    let s = audit::verify(dir.path()).unwrap();
    assert_eq!((s.records, s.first_seq, s.tail.is_none()), (7, None, true));
}

/// Red-team finding: with an anchor, every record before the anchored one could be removed
/// (the rest put in a file named for the sequence it now starts at) and the check passed.
/// The anchor keeps where the trail started; a later start fails unless the operator says
/// older files were archived on purpose (`--archived`), and an anchor from before it (no
/// `first`) is taken as it is.
#[test]
fn audit_verify_with_an_anchor_finds_records_cut_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let anchor = dir.path().join("elsewhere/anchor.json");
    std::fs::create_dir_all(anchor.parent().unwrap()).unwrap();
    let args = [log.as_os_str(), "--anchor".as_ref(), anchor.as_os_str()];
    let mut store = JsonLinesStore::open(&log, Options::default()).unwrap();
    append(&mut store, 0..8);
    drop(store);
    // Two rotated files, 0..=4 and 5..=7, as rotation would leave them, then the anchor.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines_of = |r: std::ops::Range<usize>| -> String {
        text.lines()
            .skip(r.start)
            .take(r.len())
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let oldest = dir.path().join("audit.00000000000000000000.jsonl");
    std::fs::write(&oldest, lines_of(0..5)).unwrap();
    let rest = lines_of(5..8);
    std::fs::write(dir.path().join("audit.00000000000000000005.jsonl"), &rest).unwrap();
    std::fs::write(&log, "").unwrap();
    let (ok, out) = cli_verify(&args);
    assert!(ok && out.contains("anchor written"), "{out}");
    let kept = std::fs::read_to_string(&anchor).unwrap();

    // The oldest file, records 0..=4, gone.
    std::fs::remove_file(&oldest).unwrap();
    assert_eq!(audit::verify(&log).unwrap().first_seq, Some(5));
    let (ok, out) = cli_verify(&args);
    assert!(
        !ok && out.contains("records were removed from its start"),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&anchor).unwrap(), kept);
    // Archived on purpose: accepted, and the anchor starts where the trail does now.
    let mut archived = args.to_vec();
    archived.push("--archived".as_ref());
    let (ok, out) = cli_verify(&archived);
    assert!(ok, "{out}");
    let now: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&anchor).unwrap()).unwrap();
    assert_eq!(
        (now["seq"].as_u64(), now["first"].as_u64()),
        (Some(7), Some(5))
    );
    let (ok, out) = cli_verify(&args);
    assert!(ok, "{out}");
    // An anchor written before `first` existed is read as taken on a trail starting at its
    // genesis (a re-attack's finding: read as "unknown", the cut start passed and was then
    // recorded as the trail's): this one fails until the archiving is declared once.
    let tail = audit::verify(&log).unwrap().tail.unwrap();
    std::fs::write(
        &anchor,
        serde_json::json!({"seq": tail.seq, "hash": tail.hash}).to_string(),
    )
    .unwrap();
    let (ok, out) = cli_verify(&args);
    assert!(
        !ok && out.contains("records were removed from its start"),
        "{out}"
    );
    let (ok, out) = cli_verify(&archived);
    assert!(ok, "{out}");
    let (ok, out) = cli_verify(&args);
    assert!(ok, "{out}");

    // Every rotated file archived, the live file alone starting later: refused as a cut
    // without the declaration, accepted with it (a re-attack's finding: --archived could
    // not accept it).
    let mut store = JsonLinesStore::open(&log, Options::default()).unwrap();
    append(&mut store, 8..12);
    drop(store);
    let (ok, out) = cli_verify(&args);
    assert!(ok, "{out}");
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(dir.path().join("audit.00000000000000000005.jsonl")).unwrap();
    std::fs::write(&log, &text).unwrap();
    assert!(
        audit::verify(&log)
            .unwrap_err()
            .to_string()
            .contains("where 0 was expected")
    );
    let (ok, out) = cli_verify(&args);
    assert!(!ok, "{out}");
    let (ok, out) = cli_verify(&archived);
    assert!(ok && out.contains("from sequence 8"), "{out}");
}
