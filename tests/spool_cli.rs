//! `nightingale spool check|purge` as an operator runs them, and the retention of `serve`
//! (`--dicom-retention-days`): exit codes, what is printed, and what is left on disk.
//! Instances are stored with the spool's own API from data sets written byte by byte here;
//! which ones must remain follows from what the test aged or deleted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use nightingale_dicom::{Incoming, Spool, SpoolOptions};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nightingale"))
}

fn element(out: &mut Vec<u8>, group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) {
    let mut value = value.to_vec();
    if value.len() % 2 == 1 {
        value.push(0);
    }
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(vr);
    if vr == b"OW" {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(&value);
}

/// A CT data set in Explicit VR Little Endian.
fn ct(study: &str, sop: &str) -> Vec<u8> {
    let mut d = Vec::new();
    element(&mut d, 0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2");
    element(&mut d, 0x0008, 0x0018, b"UI", sop.as_bytes());
    element(&mut d, 0x0020, 0x000D, b"UI", study.as_bytes());
    element(
        &mut d,
        0x0020,
        0x000E,
        b"UI",
        format!("{study}.1").as_bytes(),
    );
    element(&mut d, 0x0028, 0x0010, b"US", &1u16.to_le_bytes());
    element(&mut d, 0x0028, 0x0011, b"US", &2u16.to_le_bytes());
    element(&mut d, 0x7FE0, 0x0010, b"OW", &[1, 0, 2, 0]);
    d
}

/// A spool at `dir` with instances `<study>.1.<n>` of studies 1.2.3.1 and 1.2.3.2; returns
/// their files.
fn seed(dir: &Path) -> Vec<PathBuf> {
    let (spool, _) = Spool::open(
        dir,
        SpoolOptions {
            min_free_bytes: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let incoming = Incoming {
        transfer_syntax: "1.2.840.10008.1.2.1",
        calling_ae: "SEED",
        expected_sop_class: None,
        expected_sop_instance: None,
    };
    ["1.2.3.1", "1.2.3.2"]
        .iter()
        .map(|study| {
            spool
                .store(&ct(study, &format!("{study}.1.1")), &incoming)
                .unwrap()
                .path
        })
        .collect()
}

/// Sets the received time of a study's instances to `days` ago.
fn age(dir: &Path, study: &str, days: u64) {
    let then = SystemTime::now() - Duration::from_secs(days * 86_400);
    let ms = then
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let db = rusqlite::Connection::open(dir.join("index.sqlite3")).unwrap();
    db.execute(
        "UPDATE instances SET received_at_ms = ?1 WHERE study_uid = ?2",
        rusqlite::params![ms, study],
    )
    .unwrap();
}

fn indexed(dir: &Path) -> Vec<String> {
    let db = rusqlite::Connection::open(dir.join("index.sqlite3")).unwrap();
    let mut stmt = db
        .prepare("SELECT sop_instance_uid FROM instances ORDER BY sop_instance_uid")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn run(args: &[&str]) -> (i32, String) {
    let out = bin().args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn check_reports_a_missing_file_and_repair_fixes_it() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let files = seed(&spool);
    let s = spool.to_str().unwrap();

    let (code, out) = run(&["spool", "check", "--spool", s]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 index rows, 2 files; 0 bad rows"), "{out}");

    std::fs::remove_file(&files[0]).unwrap();
    let (code, out) = run(&["spool", "check", "--spool", s]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "bad-row   instances/1.2.3.1/1.2.3.1.1/{}: file missing",
            files[0].file_name().unwrap().to_str().unwrap()
        )),
        "{out}"
    );
    assert_eq!(indexed(&spool).len(), 2, "check alone changes nothing");

    let (code, out) = run(&["spool", "check", "--spool", s, "--repair"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("repaired: 1 rows dropped"), "{out}");
    assert_eq!(indexed(&spool), vec!["1.2.3.2.1.1".to_owned()]);
    let (code, out) = run(&["spool", "check", "--spool", s]);
    assert_eq!(code, 0, "{out}");

    // A file the spool never writes (an editor's backup beside an instance) is named, not
    // checked, not repaired away, and not an inconsistency (it was not mentioned at all).
    let backup = files[1].with_extension("dcm~");
    std::fs::copy(&files[1], &backup).unwrap();
    let (code, out) = run(&["spool", "check", "--spool", s, "--repair"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "other     instances/1.2.3.2/1.2.3.2.1/{} (not a spool file",
            backup.file_name().unwrap().to_str().unwrap()
        )),
        "{out}"
    );
    assert!(out.contains("; 1 other files"), "{out}");
    assert!(backup.exists());
}

/// `run` as a user other than root where this test runs as root (root reads any file): the
/// spool given to that user first.
fn run_unprivileged(spool: &Path, args: &[&str]) -> (i32, String) {
    if rustix::process::geteuid().is_root() {
        for entry in walk(spool) {
            std::os::unix::fs::lchown(&entry, Some(65534), Some(65534)).unwrap();
        }
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_nightingale"))
            .args(args)
            .output()
            .expect("setpriv (util-linux) runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    } else {
        run(args)
    }
}

/// Every path under `dir`, `dir` included.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// A review's finding: `--repair` run by a user who could not read one instance's file (a
/// restore by root with mode 0600) quarantined that acknowledged instance as "changed",
/// dropped its row and exited 0. A file that cannot be read is reported and left as it is,
/// with its row, and the check fails.
#[test]
fn repair_leaves_a_file_it_cannot_read_and_fails() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let files = seed(&spool);
    let s = spool.to_str().unwrap();
    std::fs::set_permissions(&files[0], std::fs::Permissions::from_mode(0o000)).unwrap();
    // Settled (older than a store under way), as the finding's file was.
    let touched = Command::new("touch")
        .args(["-d", "2 hours ago"])
        .arg(&files[0])
        .status()
        .unwrap();
    assert!(touched.success());
    let (code, out) = run_unprivileged(&spool, &["spool", "check", "--spool", s, "--repair"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cannot be read (Permission denied"), "{out}");
    assert!(out.contains("0 files quarantined"), "{out}");
    assert!(out.contains("1 files left that could not be read"), "{out}");
    assert!(files[0].exists());
    assert_eq!(indexed(&spool).len(), 2);
}

/// A review's finding: names of files were printed as they are, so a file named with a line
/// break and `ok   ...` printed a forged line. Control characters are escaped.
#[test]
fn file_names_are_printed_with_control_characters_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let files = seed(&spool);
    let forged = files[0]
        .parent()
        .unwrap()
        .join("x\nok   spool: 0 bad rows\u{1b}[32m.dcm");
    std::fs::copy(&files[0], &forged).unwrap();
    let touched = Command::new("touch")
        .args(["-d", "2 hours ago"])
        .arg(&forged)
        .status()
        .unwrap();
    assert!(touched.success());
    let (code, out) = run(&["spool", "check", "--spool", spool.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(!out.contains('\u{1b}'), "{out}");
    assert!(!out.lines().any(|l| l.starts_with("ok   spool")), "{out}");
    assert!(out.contains("unindexed"), "{out}");
}

#[test]
fn purge_deletes_instances_older_than_asked() {
    let dir = tempfile::tempdir().unwrap();
    // --data-dir finds the spool in its `spool` folder, as `serve` puts it.
    let spool = dir.path().join("spool");
    let files = seed(&spool);
    age(&spool, "1.2.3.1", 40);
    let data = dir.path().to_str().unwrap();

    let (code, out) = run(&[
        "spool",
        "purge",
        "--data-dir",
        data,
        "--older-than",
        "30d",
        "--dry-run",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("would purge") && out.contains(": 1 instances"),
        "{out}"
    );
    assert!(files[0].exists());

    let (code, out) = run(&["spool", "purge", "--data-dir", data, "--older-than", "30d"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("purged") && out.contains(": 1 instances"),
        "{out}"
    );
    assert!(!files[0].exists() && files[1].exists());
    assert_eq!(indexed(&spool), vec!["1.2.3.2.1.1".to_owned()]);
}

#[test]
fn a_purge_of_the_last_day_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let files = seed(&spool);
    let s = spool.to_str().unwrap();
    // `--older-than 0` deleted series acknowledged seconds before, whose results were never
    // made (red-team): under a day, it is asked for by name.
    for age in ["0s", "1ns", "23h"] {
        let (code, out) = run(&["spool", "purge", "--spool", s, "--older-than", age]);
        assert_eq!(code, 1, "{age}: {out}");
        assert!(out.contains("--force"), "{out}");
    }
    assert!(files.iter().all(|f| f.exists()));
    let (code, out) = run(&[
        "spool",
        "purge",
        "--spool",
        s,
        "--older-than",
        "0s",
        "--dry-run",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("would purge") && out.contains(": 2 instances"),
        "{out}"
    );
    // --spool alone says that the pipeline's results were not looked for.
    assert!(out.contains("results were not looked for"), "{out}");
    let (code, out) = run(&[
        "spool",
        "purge",
        "--spool",
        s,
        "--older-than",
        "0s",
        "--force",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(files.iter().all(|f| !f.exists()));
}

#[test]
fn a_spool_folder_that_is_a_link_is_refused_and_nothing_it_points_to_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    seed(&spool);
    // An operator links quarantine to a shared folder: the purge deleted its old files.
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let report = shared.join("old-report.pdf");
    std::fs::write(&report, b"not the spool's").unwrap();
    let old = SystemTime::now() - Duration::from_secs(90 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(&report)
        .unwrap()
        .set_modified(old)
        .unwrap();
    std::fs::remove_dir_all(spool.join("quarantine")).unwrap();
    std::os::unix::fs::symlink(&shared, spool.join("quarantine")).unwrap();
    let s = spool.to_str().unwrap();
    let (code, out) = run(&["spool", "purge", "--spool", s, "--older-than", "30d"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is a symbolic link"), "{out}");
    assert!(report.exists());
    let (code, out) = run(&["spool", "check", "--spool", s]);
    assert_ne!(code, 0, "{out}");
    assert!(report.exists());
    // The server refuses it too.
    assert!(matches!(
        Spool::open(&spool, SpoolOptions::default()),
        Err(nightingale_dicom::SpoolError::LinkedFolder { .. })
    ));
}

#[test]
fn bad_arguments_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let nothing = dir.path().join("nothing");
    let (code, out) = run(&["spool", "check", "--spool", nothing.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(out.contains("no spool at"), "{out}");
    let (code, out) = run(&["spool", "purge", "--older-than", "thirty days"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--older-than"), "{out}");
    let (code, out) = run(&[
        "dicom",
        "echo",
        "--addr",
        "127.0.0.1:1",
        "--calling-ae",
        "A\\B",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("invalid AE title"), "{out}");
}

/// `serve --dicom-retention-days`: what is older is purged at start-up (and then
/// periodically); 0 keeps everything.
#[test]
fn serve_purges_what_is_past_its_retention() {
    for (days, kept) in [("0", 2usize), ("30", 1)] {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        seed(&spool);
        age(&spool, "1.2.3.1", 40);
        let models = dir.path().join("models");
        std::fs::create_dir(&models).unwrap();
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let mut child = bin()
            .args(["serve", "--http-addr", "127.0.0.1:0", "--dicom-port", "0"])
            .arg("--repository")
            .arg(&models)
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--dicom-retention-days", days])
            .stderr(stderr)
            .spawn()
            .unwrap();
        let log = || std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(30);
        let outcome = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Err(format!("server exited: {status}\n{}", log()));
            }
            let ready = log().contains("listening (DICOM)");
            // With retention, the start-up purge logs when it removed something.
            if ready && (kept == 2 || log().contains("spool purged")) {
                break Ok(());
            }
            if Instant::now() > deadline {
                break Err(format!("not ready within 30 s:\n{}", log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = child.kill();
        let _ = child.wait();
        outcome.unwrap();
        assert_eq!(indexed(&spool).len(), kept, "retention {days}: {}", log());
        if kept == 1 {
            assert_eq!(indexed(&spool), vec!["1.2.3.2.1.1".to_owned()]);
        } else {
            // The retention task announces itself before `listening (DICOM)`: 0 starts none.
            assert!(!log().contains("DICOM retention"), "{}", log());
        }
    }
}
