//! Spool maintenance: [`Spool::check`] (the index against the files) and [`Spool::purge`]
//! (retention: instances received before a cutoff are deleted).
//!
//! Both work on a spool opened with [`Spool::open_for_maintenance`], which, unlike
//! [`Spool::open`], changes nothing on disk: a check of a spool a running server writes
//! into reports what it finds and repairs only what is settled (files older than
//! [`CheckOptions::settle`]), so an instance being stored right now is never touched.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::params;
use sha2::{Digest, Sha256};

use crate::attributes::Attributes;
use crate::spool::{
    ATTRIBUTES_VERSION, INSTANCES_DIR, QUARANTINE_DIR, RowFacts, Spool, SpoolError, SpoolOptions,
    StoreError, TMP_DIR, collect_entries, facts_of, now_ms, sync_dir, write_durably,
};

/// A maintenance operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error(transparent)]
    Open(#[from] SpoolError),
    #[error("spool {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spool index: {0}")]
    Index(#[from] rusqlite::Error),
    #[error("no spool at {path} (no index.sqlite3 there)")]
    NoSpool { path: PathBuf },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MaintenanceError {
    let path = path.to_owned();
    move |source| MaintenanceError::Io { op, path, source }
}

/// How [`Spool::check`] runs.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Repair what was found: drop rows whose file is missing, index files without a row
    /// once they pass the same checks as a received instance (quarantine them otherwise),
    /// move files whose content differs from the index to quarantine, delete leftover
    /// temporary files.
    pub repair: bool,
    /// Files modified more recently than this are reported but never repaired: a running
    /// server may be storing them.
    pub settle: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            repair: false,
            settle: Duration::from_secs(60),
        }
    }
}

/// What is wrong with an indexed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The file is gone.
    Missing,
    /// The data set's size differs from the index.
    Size { indexed: u64, actual: u64 },
    /// Same size, other bytes (SHA-256 differs).
    Hash,
    /// The file is no longer a readable Part 10 file (or not a file: a folder, say).
    Unreadable,
    /// The file is there but this process could not read it (permission denied, an I/O
    /// error): nothing is known of its content, so `repair` leaves it and its row as they are.
    CannotRead { error: String },
    /// The row's path is not one the spool writes (outside `instances/`, a `..`, an absolute
    /// path, through a symbolic link): the file it names is never read, moved or deleted.
    ForeignPath,
    /// The file is what was stored (size and hash agree), but the row says something else
    /// of it (this column): QIDO-RS, WADO-RS and the pipeline read the row.
    RowDiffers { column: &'static str },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Missing => write!(f, "file missing"),
            Problem::Size { indexed, actual } => {
                write!(f, "data set is {actual} bytes, the index says {indexed}")
            }
            Problem::Hash => write!(f, "SHA-256 differs from the index"),
            Problem::Unreadable => write!(f, "not a readable Part 10 file"),
            Problem::CannotRead { error } => {
                write!(f, "cannot be read ({error}): left as it is")
            }
            Problem::ForeignPath => write!(f, "the index names a path the spool never writes"),
            Problem::RowDiffers { column } => {
                write!(f, "the index's {column} is not the file's")
            }
        }
    }
}

/// An index row whose file is not what was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// The file, relative to the spool.
    pub path: PathBuf,
    pub problem: Problem,
}

/// What [`Spool::check`] repaired.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Repaired {
    /// Rows whose file was missing, dropped.
    pub rows_dropped: usize,
    /// Files without a row that passed the checks, indexed.
    pub files_indexed: usize,
    /// Files moved to quarantine (unindexed ones that failed the checks, indexed ones whose
    /// content changed; their rows are dropped).
    pub files_quarantined: usize,
    /// Leftover temporary files, deleted.
    pub temp_files_deleted: usize,
    /// Rows that said something else of their (unchanged) file, made again from the file.
    pub rows_reindexed: usize,
    /// Symbolic links under `instances/`, deleted (not what they point to).
    pub links_deleted: usize,
    /// Problems left as they are because their files are too recent (a store in progress).
    pub skipped_recent: usize,
    /// Rows left as they are because their file could not be read ([`Problem::CannotRead`]).
    pub left_unreadable: usize,
}

/// What [`Spool::check`] found. Paths are relative to the spool.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Index rows checked.
    pub rows: usize,
    /// `.dcm` files found under `instances/`.
    pub files: usize,
    /// Rows whose file is missing or differs.
    pub bad_rows: Vec<BadRow>,
    /// `.dcm` files without an index row (settled: older than [`CheckOptions::settle`]).
    pub unindexed: Vec<PathBuf>,
    /// Files in `tmp/` left by an interrupted store (settled).
    pub temp_files: Vec<PathBuf>,
    /// Symbolic links under `instances/`: the spool never makes one (a row naming a path
    /// through one is [`Problem::ForeignPath`]); `repair` deletes the link, never what it
    /// points to.
    pub links: Vec<PathBuf>,
    /// Entries under `instances/` that are neither folders, `.dcm` files nor links (an
    /// editor's backup, a manual copy under another name, a FIFO): the spool never writes
    /// one, and neither the check nor the purge reads or deletes them. Reported so that an
    /// operator sees them; not an inconsistency of the index.
    pub other_files: Vec<PathBuf>,
    /// Unindexed and temporary files younger than [`CheckOptions::settle`]: stores a running
    /// server may have under way. Reported, not counted as inconsistent (a check of a live
    /// spool failed while instances arrived), never repaired.
    pub in_progress: Vec<PathBuf>,
    /// What was repaired (with `repair`).
    pub repaired: Option<Repaired>,
}

impl CheckReport {
    /// True when the index and the files agreed (before any repair).
    pub fn is_consistent(&self) -> bool {
        self.bad_rows.is_empty()
            && self.unindexed.is_empty()
            && self.temp_files.is_empty()
            && self.links.is_empty()
    }

    /// True when nothing is left to repair: consistent, or everything found was repaired.
    pub fn is_clean_now(&self) -> bool {
        match &self.repaired {
            None => self.is_consistent(),
            Some(r) => r.skipped_recent == 0 && r.left_unreadable == 0,
        }
    }
}

/// What [`Spool::purge`] deleted (or, in a dry run, would delete).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PurgeReport {
    /// Instances deleted (file and index row).
    pub instances: usize,
    /// Bytes of their data sets.
    pub bytes: u64,
    /// Files deleted from quarantine (objects and their reason notes).
    pub quarantine_files: usize,
    /// Rows dropped whose path the spool never writes (nothing deleted for them).
    pub foreign_rows: usize,
    /// Instances kept because their file could not be deleted (row and file left as they
    /// are, the reason logged); the purge goes on with the others.
    pub kept: usize,
    pub dry_run: bool,
    /// The studies instances were deleted from: SHA-256 of the Study Instance UID (as the
    /// audit trail names them) → instances deleted (the record of a purge; a dry run
    /// leaves it empty).
    pub studies: std::collections::BTreeMap<String, u64>,
}

/// A purge that deleted something, as [`Spool::record_purge`] kept it in the spool's index
/// until the server has written it to the audit trail ([`Spool::purges_to_audit`]): a
/// purge run beside a running server (`nightingale spool purge`) cannot write to the
/// trail, which the server holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeLogEntry {
    pub id: i64,
    /// When it ended (ms since the epoch).
    pub at_ms: i64,
    /// What was older than this was deleted.
    pub cutoff_ms: i64,
    /// Who ran it: `retention`, or the operator's command.
    pub by: String,
    pub instances: u64,
    pub bytes: u64,
    pub quarantine_files: u64,
    /// Further `name=value` words for its record: the operator's options, what else the
    /// same purge deleted (the pipeline's results).
    pub also: String,
    /// Study UIDs' SHA-256 → instances deleted.
    pub studies: Vec<(String, u64)>,
}

/// Rows deleted per lock: a live server's stores wait at most this many file deletions.
const PURGE_BATCH: i64 = 256;

impl Spool {
    /// Opens an existing spool without reconciling it: no instance is indexed, moved or
    /// deleted. It is opened as the server opens it, though: missing folders are made and the
    /// spool's folders and index narrowed to their owner (so it is run as the spool's owner).
    /// Fails if `root` holds no spool index.
    pub fn open_for_maintenance(root: &Path) -> Result<Spool, MaintenanceError> {
        if !root.join(crate::spool::INDEX_FILE).is_file() {
            return Err(MaintenanceError::NoSpool {
                path: root.to_owned(),
            });
        }
        Ok(Spool::open_unreconciled(root, SpoolOptions::default())?)
    }

    /// Compares the index with the files (every indexed file is read and hashed) and, with
    /// `options.repair`, repairs what it found (see [`CheckOptions::repair`]).
    pub fn check(&self, options: &CheckOptions) -> Result<CheckReport, MaintenanceError> {
        let mut report = CheckReport::default();
        // A file dated further in the future than the settle window (planted, or restored
        // from a host whose clock ran ahead) is settled: it was listed as "recent, not
        // checked" for as long as its date lay ahead, and the check passed (a review's
        // finding). One dated just ahead (a clock stepped back) is still recent.
        let settled = |path: &Path| -> bool {
            let Some(modified) = fs::symlink_metadata(path).and_then(|m| m.modified()).ok() else {
                return false;
            };
            match SystemTime::now().duration_since(modified) {
                Ok(age) => age >= options.settle,
                Err(ahead) => ahead.duration() > options.settle.max(Duration::from_secs(60)),
            }
        };
        let db = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let rows: Vec<(String, String, i64, String, RowFacts, bool)> = {
            let mut stmt = db.prepare(
                "SELECT sop_instance_uid, path, size, sha256, sop_class_uid, study_uid,
                        series_uid, transfer_syntax, modality, study_date, study_time,
                        series_number, instance_number, rows, columns, number_of_frames,
                        attributes_version
                 FROM instances",
            )?;
            stmt.query_map([], |r| {
                let facts = RowFacts {
                    sop_instance_uid: r.get(0)?,
                    sop_class_uid: r.get(4)?,
                    study_uid: r.get(5)?,
                    series_uid: r.get(6)?,
                    transfer_syntax: r.get(7)?,
                    attributes: Attributes {
                        modality: r.get(8)?,
                        study_date: r.get(9)?,
                        study_time: r.get(10)?,
                        series_number: r.get(11)?,
                        instance_number: r.get(12)?,
                        rows: r.get(13)?,
                        columns: r.get(14)?,
                        number_of_frames: r.get(15)?,
                    },
                };
                // Rows of an index from before these columns are filled at the server's
                // start: their attributes are not compared until then.
                let current = r.get::<_, Option<i64>>(16)? == Some(ATTRIBUTES_VERSION);
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, facts, current))
            })?
            .collect::<Result<_, _>>()?
        };
        report.rows = rows.len();
        let mut bad_uids = Vec::new();
        let mut indexed = std::collections::HashSet::new();
        for (uid, relative, size, sha256, row, current) in rows {
            indexed.insert(PathBuf::from(&relative));
            let read = match crate::spool::indexed_path(&self.root, &relative, true) {
                None => Err(Problem::ForeignPath),
                Some(path) => match fs::read(&path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Problem::Missing),
                    // A file it may not read (permission denied, an I/O error): reported and
                    // left alone, since nothing is known of its content (`--repair` run as
                    // another user quarantined acknowledged instances: a review's finding).
                    Err(e) if fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) => {
                        Err(Problem::CannotRead {
                            error: e.to_string(),
                        })
                    }
                    // A folder where the file should be: reported, the check goes on.
                    Err(_) => Err(Problem::Unreadable),
                    Ok(bytes) => Ok(bytes),
                },
            };
            let problem = match read {
                Err(problem) => Some(problem),
                Ok(bytes) => match dataset_of(&bytes) {
                    None => Some(Problem::Unreadable),
                    Some(ds) if ds.len() as u64 != size as u64 => Some(Problem::Size {
                        indexed: size as u64,
                        actual: ds.len() as u64,
                    }),
                    Some(ds) if hex::encode(Sha256::digest(ds)) != sha256 => Some(Problem::Hash),
                    Some(_) => match facts_of(&bytes) {
                        Err(_) => Some(Problem::Unreadable),
                        Ok(file) => differing_column(&row, &file, current)
                            .map(|column| Problem::RowDiffers { column }),
                    },
                },
            };
            if let Some(problem) = problem {
                bad_uids.push(uid);
                report.bad_rows.push(BadRow {
                    path: PathBuf::from(relative),
                    problem,
                });
            }
        }
        let mut files = Vec::new();
        let mut links = Vec::new();
        let instances = self.root.join(INSTANCES_DIR);
        let mut other = Vec::new();
        collect_entries(&instances, &mut files, &mut links, &mut other)
            .map_err(io("list", &instances))?;
        report.other_files = other
            .iter()
            .filter_map(|p| p.strip_prefix(&self.root).ok().map(Path::to_owned))
            .collect();
        report.files = files.len();
        let mut unindexed_abs = Vec::new();
        for path in files {
            let Ok(relative) = path.strip_prefix(&self.root) else {
                continue;
            };
            if indexed.contains(relative) {
                continue;
            }
            if settled(&path) {
                report.unindexed.push(relative.to_owned());
                unindexed_abs.push(path.clone());
            } else {
                report.in_progress.push(relative.to_owned());
            }
        }
        for path in links {
            if let Ok(relative) = path.strip_prefix(&self.root) {
                report.links.push(relative.to_owned());
            }
        }
        let tmp = self.root.join(TMP_DIR);
        for entry in fs::read_dir(&tmp).map_err(io("list", &tmp))? {
            let path = entry.map_err(io("list", &tmp))?.path();
            if path.is_file()
                && let Ok(relative) = path.strip_prefix(&self.root)
            {
                if settled(&path) {
                    report.temp_files.push(relative.to_owned());
                } else {
                    report.in_progress.push(relative.to_owned());
                }
            }
        }
        report.bad_rows.sort_by(|a, b| a.path.cmp(&b.path));
        report.unindexed.sort();
        report.temp_files.sort();
        report.links.sort();
        report.in_progress.sort();
        if !options.repair {
            return Ok(report);
        }
        // The repairs take the index per step, after the maintenance lock where they take
        // that too (the order a store answered from the index takes them in).
        drop(db);

        let mut repaired = Repaired::default();
        for (bad, uid) in report.bad_rows.iter().zip(&bad_uids) {
            let path = self.root.join(&bad.path);
            // A row naming no file of the spool's (a foreign path, or not a regular file) is
            // dropped and whatever it names left alone.
            let not_a_file = !fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
            if matches!(bad.problem, Problem::CannotRead { .. }) && !not_a_file {
                repaired.left_unreadable += 1;
            } else if matches!(bad.problem, Problem::Missing | Problem::ForeignPath) || not_a_file {
                // Under the maintenance lock, exclusive, and the file looked at again: a
                // server beside this answers the re-send of a lost instance under that lock
                // (shared) by writing its file again under the indexed name, and acknowledges
                // it; the row of a file that came back is kept (it was dropped, and the
                // acknowledged instance was on disk but in no index: a review's finding).
                let _maintenance = self.exclusive_maintenance()?;
                let came_back = matches!(bad.problem, Problem::Missing)
                    && fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
                if came_back {
                    repaired.skipped_recent += 1;
                    continue;
                }
                let db = self.index.lock().unwrap_or_else(|p| p.into_inner());
                db.execute("DELETE FROM instances WHERE sop_instance_uid = ?1", [uid])?;
                repaired.rows_dropped += 1;
            } else if let Problem::RowDiffers { .. } = bad.problem {
                let db = self.index.lock().unwrap_or_else(|p| p.into_inner());
                // The file is what was stored: its row is made again from it, as for a file
                // found without one (a file another row already claims goes to quarantine).
                db.execute("DELETE FROM instances WHERE sop_instance_uid = ?1", [uid])?;
                if self.index_or_quarantine(&db, &path, &bad.path.to_string_lossy())? {
                    repaired.rows_reindexed += 1;
                } else {
                    repaired.files_quarantined += 1;
                }
            } else if settled(&path) {
                let reason = format!("content differs from the index: {}", bad.problem);
                self.quarantine_file(&path, &reason, "changed")?;
                let db = self.index.lock().unwrap_or_else(|p| p.into_inner());
                db.execute("DELETE FROM instances WHERE sop_instance_uid = ?1", [uid])?;
                repaired.files_quarantined += 1;
            } else {
                repaired.skipped_recent += 1;
            }
        }
        for path in unindexed_abs {
            if !settled(&path) {
                repaired.skipped_recent += 1;
                continue;
            }
            let relative = path
                .strip_prefix(&self.root)
                .map(|r| r.to_string_lossy().into_owned())
                .unwrap_or_default();
            let db = self.index.lock().unwrap_or_else(|p| p.into_inner());
            if self.index_or_quarantine(&db, &path, &relative)? {
                repaired.files_indexed += 1;
            } else {
                repaired.files_quarantined += 1;
            }
        }
        for relative in &report.links {
            // The link itself, never what it points to.
            let path = self.root.join(relative);
            match fs::remove_file(&path) {
                Ok(()) => repaired.links_deleted += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("delete", &path)(e)),
            }
        }
        for relative in &report.temp_files {
            let path = self.root.join(relative);
            if !settled(&path) {
                repaired.skipped_recent += 1;
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => repaired.temp_files_deleted += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("delete", &path)(e)),
            }
        }
        report.repaired = Some(repaired);
        Ok(report)
    }

    /// Indexes a file without a row, as a received instance is (true), or moves it to
    /// quarantine with the reason it fails the checks (false).
    /// The maintenance lock, exclusive, waited for at most a minute (a purge batch, a row
    /// dropped by a repair).
    fn exclusive_maintenance(&self) -> Result<fs::File, MaintenanceError> {
        self.maintenance_lock(true, std::time::Duration::from_secs(60))
            .map_err(|e| MaintenanceError::Io {
                op: "lock",
                path: self.root.join(crate::spool::MAINTENANCE_LOCK),
                source: std::io::Error::other(e.to_string()),
            })
    }

    fn index_or_quarantine(
        &self,
        db: &rusqlite::Connection,
        path: &Path,
        relative: &str,
    ) -> Result<bool, MaintenanceError> {
        match self.index_orphan(db, path, relative) {
            Ok(()) => Ok(true),
            Err(StoreError::Io { source, .. }) => Err(io("read", path)(source)),
            Err(StoreError::Index(e)) => Err(e.into()),
            Err(reason) => {
                let note = format!("{reason} ({})", reason.kind());
                self.quarantine_file(path, &note, "orphan")?;
                Ok(false)
            }
        }
    }

    /// Deletes every instance received before `cutoff` (its file, then its index row, then
    /// the study and series folders left empty) and every quarantined file older than
    /// `cutoff`. With `dry_run`, counts what would go and deletes nothing.
    pub fn purge(
        &self,
        cutoff: SystemTime,
        dry_run: bool,
    ) -> Result<PurgeReport, MaintenanceError> {
        let cutoff_ms = cutoff
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut report = PurgeReport {
            dry_run,
            ..PurgeReport::default()
        };
        if dry_run {
            // Each row as the purge would take it: one naming a path the spool never writes
            // is dropped, not purged (the dry run counted it among the instances to go).
            let db = self.index.lock().unwrap_or_else(|p| p.into_inner());
            let mut stmt =
                db.prepare("SELECT path, size FROM instances WHERE received_at_ms < ?1")?;
            let mut rows = stmt.query([cutoff_ms])?;
            while let Some(row) = rows.next()? {
                let relative: String = row.get(0)?;
                let size: i64 = row.get(1)?;
                if crate::spool::indexed_path(&self.root, &relative, true).is_some() {
                    report.instances += 1;
                    report.bytes += size as u64;
                } else {
                    report.foreign_rows += 1;
                }
            }
        } else {
            let instances = self.root.join(INSTANCES_DIR);
            // Where the last batch ended (arrival time, UID): a row kept (its file could not
            // be deleted) is not selected again.
            let mut after: (i64, String) = (i64::MIN, String::new());
            loop {
                // The locks are held per batch: a store cannot place a file in a folder this
                // is removing, or answer "duplicate" for an instance being deleted; the
                // maintenance lock, exclusive, also keeps out a server beside this process
                // (`nightingale spool purge` while it runs), which answers a re-sent
                // instance under it, shared, marking it received anew.
                let _maintenance = self.exclusive_maintenance()?;
                let db = self.index.lock().unwrap_or_else(|p| p.into_inner());
                let batch: Vec<(String, String, i64, i64, String)> = {
                    let mut stmt = db.prepare(
                        "SELECT sop_instance_uid, path, size, received_at_ms, study_uid FROM instances
                         WHERE received_at_ms < ?1
                           AND (received_at_ms > ?2
                                OR (received_at_ms = ?2 AND sop_instance_uid > ?3))
                         ORDER BY received_at_ms, sop_instance_uid LIMIT ?4",
                    )?;
                    stmt.query_map(params![cutoff_ms, after.0, after.1, PURGE_BATCH], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })?
                    .collect::<Result<_, _>>()?
                };
                if batch.is_empty() {
                    break;
                }
                for (uid, relative, size, received, study) in batch {
                    after = (received, uid.clone());
                    let Some(path) = crate::spool::indexed_path(&self.root, &relative, true) else {
                        tracing::warn!(
                            "spool purge: an index row names a path the spool never writes: row dropped, nothing deleted"
                        );
                        db.execute("DELETE FROM instances WHERE sop_instance_uid = ?1", [&uid])?;
                        report.foreign_rows += 1;
                        continue;
                    };
                    // The file first: a crash between the two leaves a row without a file,
                    // which the next open drops; never a file the index forgot.
                    match fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e,
                                "spool purge: cannot delete an instance's file: kept, with its row");
                            report.kept += 1;
                            continue;
                        }
                    }
                    db.execute("DELETE FROM instances WHERE sop_instance_uid = ?1", [&uid])?;
                    remove_empty_parents(&path, &instances);
                    report.instances += 1;
                    report.bytes += size as u64;
                    *report
                        .studies
                        .entry(hex::encode(Sha256::digest(
                            study.trim_end_matches(['\0', ' ']).as_bytes(),
                        )))
                        .or_default() += 1;
                }
            }
        }
        let quarantine = self.root.join(QUARANTINE_DIR);
        for entry in fs::read_dir(&quarantine).map_err(io("list", &quarantine))? {
            let entry = entry.map_err(io("list", &quarantine))?;
            let path = entry.path();
            // The entry itself, not what a link in quarantine points to.
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < cutoff);
            if !(old && entry.file_type().is_ok_and(|t| t.is_file())) {
                continue;
            }
            if !dry_run {
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io("delete", &path)(e)),
                }
            }
            report.quarantine_files += 1;
        }
        if !dry_run && (report.instances > 0 || report.quarantine_files > 0) {
            tracing::info!(
                instances = report.instances,
                bytes = report.bytes,
                quarantine_files = report.quarantine_files,
                foreign_rows = report.foreign_rows,
                kept = report.kept,
                "spool purged"
            );
        }
        Ok(report)
    }

    /// Keeps the record of a purge that deleted something (`also`: what else it deleted,
    /// as `name=value` words) until the server writes it to the audit trail. A purge that
    /// deleted nothing, or a dry run, is not recorded.
    pub fn record_purge(
        &self,
        by: &str,
        cutoff: SystemTime,
        report: &PurgeReport,
        also: &str,
    ) -> Result<(), MaintenanceError> {
        if report.dry_run
            || (report.instances == 0 && report.quarantine_files == 0 && also.is_empty())
        {
            return Ok(());
        }
        let cutoff_ms = cutoff
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut db = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let tx = db.transaction()?;
        tx.execute(
            "INSERT INTO purge_log (at_ms, cutoff_ms, by, instances, bytes, quarantine_files, also)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                now_ms(),
                cutoff_ms,
                by,
                report.instances as i64,
                report.bytes as i64,
                report.quarantine_files as i64,
                also
            ],
        )?;
        let id = tx.last_insert_rowid();
        for (study, n) in &report.studies {
            tx.execute(
                "INSERT INTO purge_log_studies (purge_id, study_sha256, instances) VALUES (?1, ?2, ?3)",
                params![id, study, *n as i64],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The purges recorded and not yet written to the audit trail, oldest first (at most
    /// `limit`).
    pub fn purges_to_audit(&self, limit: usize) -> Result<Vec<PurgeLogEntry>, MaintenanceError> {
        let db = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let mut entries: Vec<PurgeLogEntry> = db
            .prepare(
                "SELECT id, at_ms, cutoff_ms, by, instances, bytes, quarantine_files, also
                 FROM purge_log WHERE audited = 0 ORDER BY id LIMIT ?1",
            )?
            .query_map([limit as i64], |r| {
                Ok(PurgeLogEntry {
                    id: r.get(0)?,
                    at_ms: r.get(1)?,
                    cutoff_ms: r.get(2)?,
                    by: r.get(3)?,
                    instances: r.get::<_, i64>(4)?.max(0) as u64,
                    bytes: r.get::<_, i64>(5)?.max(0) as u64,
                    quarantine_files: r.get::<_, i64>(6)?.max(0) as u64,
                    also: r.get(7)?,
                    studies: Vec::new(),
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut stmt = db.prepare(
            "SELECT study_sha256, instances FROM purge_log_studies WHERE purge_id = ?1
             ORDER BY study_sha256",
        )?;
        for entry in &mut entries {
            entry.studies = stmt
                .query_map([entry.id], |r| {
                    Ok((r.get(0)?, r.get::<_, i64>(1)?.max(0) as u64))
                })?
                .collect::<Result<_, _>>()?;
        }
        Ok(entries)
    }

    /// Marks a purge written to the audit trail: its studies are forgotten, and its entry
    /// too unless it is the one with the latest cutoff ([`Spool::purged_before_ms`]).
    pub fn purge_audited(&self, id: i64) -> Result<(), MaintenanceError> {
        let mut db = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let tx = db.transaction()?;
        tx.execute("UPDATE purge_log SET audited = 1 WHERE id = ?1", [id])?;
        tx.execute("DELETE FROM purge_log_studies WHERE purge_id = ?1", [id])?;
        tx.execute(
            "DELETE FROM purge_log WHERE audited = 1 AND id != (
                 SELECT id FROM purge_log ORDER BY cutoff_ms DESC, id DESC LIMIT 1)",
            [],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The latest cutoff of a purge that deleted something: what was received before it
    /// was deleted on purpose, and is not to be stored again (the pipeline's result objects
    /// at start-up).
    pub fn purged_before_ms(&self) -> Result<Option<i64>, MaintenanceError> {
        let db = self.index.lock().unwrap_or_else(|p| p.into_inner());
        Ok(db.query_row("SELECT max(cutoff_ms) FROM purge_log", [], |r| r.get(0))?)
    }

    /// Moves a file of the spool into quarantine with a note of why.
    fn quarantine_file(
        &self,
        path: &Path,
        reason: &str,
        what: &str,
    ) -> Result<(), MaintenanceError> {
        let dir = self.root.join(QUARANTINE_DIR);
        let name = format!(
            "{}-{what}-{}",
            now_ms(),
            self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let relative = path.strip_prefix(&self.root).unwrap_or(path);
        let note = format!(
            "reason: {reason}\nkind: {what}\nrecovered_from: {}\n",
            relative.display()
        );
        write_durably(&dir.join(format!("{name}.reason")), note.as_bytes())
            .map_err(io("write", &dir))?;
        let to = dir.join(format!("{name}.quarantined"));
        fs::rename(path, &to).map_err(io("move", path))?;
        // A moved file keeps its mode (a 0666 orphan stayed 0666 in quarantine: a re-attack's
        // finding); quarantined objects are the owner's alone.
        crate::spool::narrow(&to, 0o600).map_err(io("narrow", &to))?;
        sync_dir(&dir).map_err(io("sync", &dir))?;
        tracing::warn!(kind = what, "spool file moved to quarantine");
        Ok(())
    }
}

/// The first column in which an index row differs from its file's facts (`attributes`:
/// whether the row's attribute columns are filled by this version).
fn differing_column(row: &RowFacts, file: &RowFacts, attributes: bool) -> Option<&'static str> {
    let (r, f) = (&row.attributes, &file.attributes);
    [
        (
            "sop_instance_uid",
            row.sop_instance_uid == file.sop_instance_uid,
        ),
        ("sop_class_uid", row.sop_class_uid == file.sop_class_uid),
        ("study_uid", row.study_uid == file.study_uid),
        ("series_uid", row.series_uid == file.series_uid),
        (
            "transfer_syntax",
            row.transfer_syntax == file.transfer_syntax,
        ),
        ("modality", !attributes || r.modality == f.modality),
        ("study_date", !attributes || r.study_date == f.study_date),
        ("study_time", !attributes || r.study_time == f.study_time),
        (
            "series_number",
            !attributes || r.series_number == f.series_number,
        ),
        (
            "instance_number",
            !attributes || r.instance_number == f.instance_number,
        ),
        ("rows", !attributes || r.rows == f.rows),
        ("columns", !attributes || r.columns == f.columns),
        (
            "number_of_frames",
            !attributes || r.number_of_frames == f.number_of_frames,
        ),
    ]
    .into_iter()
    .find(|(_, same)| !same)
    .map(|(column, _)| column)
}

/// Removes the folders above `file` that are now empty, up to (not including) `base`.
fn remove_empty_parents(file: &Path, base: &Path) {
    let mut at = file.parent();
    while let Some(dir) = at {
        if dir == base || !dir.starts_with(base) || fs::remove_dir(dir).is_err() {
            break;
        }
        at = dir.parent();
    }
}

/// The data set of a Part 10 file as the spool writes it (the meta group starts with its
/// group length), or `None`.
fn dataset_of(bytes: &[u8]) -> Option<&[u8]> {
    if bytes.len() < 144
        || &bytes[128..132] != b"DICM"
        || bytes[132..136] != [0x02, 0x00, 0x00, 0x00]
        || &bytes[136..138] != b"UL"
    {
        return None;
    }
    let group_len = u32::from_le_bytes(bytes[140..144].try_into().ok()?) as usize;
    bytes.get(144usize.checked_add(group_len)?..)
}
