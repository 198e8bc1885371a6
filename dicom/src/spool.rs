//! The durable spool: every received instance as a DICOM Part 10 file, and an SQLite index.
//!
//! Layout under the spool folder:
//!
//! ```text
//! index.sqlite3                         the index (one row per stored instance)
//! tmp/                                  files being written, where the file system cannot
//!                                       create them without a name (deleted on open)
//! instances/<study>/<series>/<sop>_<h>.dcm  stored instances (file meta + the data set as
//!                                       received; <h>: the first 16 hex digits of the data
//!                                       set's SHA-256)
//! quarantine/<id>.quarantined           refused objects, as received, with <id>.reason beside
//! ```
//!
//! A store writes the file as an anonymous temporary file (`O_TMPFILE` in `tmp/`: it has no
//! name until it is linked, and a crash leaves nothing behind; a named file in `tmp/` where
//! the file system cannot), links it under its final name, then fsyncs the file
//! and its directory at the same time (one device flush covers both), and only then adds
//! the index row and returns: an instance reported stored is on disk, and an index row
//! always names a durable, complete file. Stores that run at the same time share the
//! directory fsyncs (one syncer thread) and one index transaction (group commit, see
//! [`Spool::store`]). The files are the truth; the index is rebuilt from them: on open,
//! leftover temporary files are deleted, rows whose file is gone are dropped, and files
//! without a row are indexed, or quarantined when they do not parse or do not match the
//! content hash in their name (a crash between the link and the end of the fsyncs can
//! leave a named file whose data did not all reach the disk: it was never acknowledged).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::meta::{FileMetaTable, FileMetaTableBuilder};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use crate::attributes::{self, Attributes};
use crate::sop;
use crate::structure;

/// Implementation Class UID written into the file meta of stored instances.
pub const IMPLEMENTATION_CLASS_UID: &str = "1.2.826.0.1.3680043.10.1383.1";
/// Implementation Version Name written into the file meta of stored instances.
pub const IMPLEMENTATION_VERSION_NAME: &str = "NIGHTINGALE";

pub(crate) const INDEX_FILE: &str = "index.sqlite3";
pub(crate) const TMP_DIR: &str = "tmp";
pub(crate) const INSTANCES_DIR: &str = "instances";
pub(crate) const QUARANTINE_DIR: &str = "quarantine";
/// The lock a purge batch holds exclusive and an instance answered from the index holds
/// shared, across processes (`nightingale spool purge` beside a running server).
pub(crate) const MAINTENANCE_LOCK: &str = ".maintenance.lock";
/// How long a store answered from the index waits for the maintenance lock.
pub(crate) const STORE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// Offset of the file meta group in a Part 10 file: the preamble and "DICM".
const META_OFFSET: usize = 132;

/// Settings of a spool.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// Free space (bytes) to keep on the spool's file system: a store that would leave less
    /// is refused as out of resources.
    pub min_free_bytes: u64,
    /// Write temporary files under a name in `tmp/` even where the file system can create
    /// them anonymously (`O_TMPFILE`, the default where it works).
    pub named_temp_files: bool,
    /// Write received data sets through the page cache even where the file system takes
    /// `O_DIRECT` writes (the default where it works).
    pub buffered_writes: bool,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            min_free_bytes: 1 << 30,
            named_temp_files: false,
            buffered_writes: false,
        }
    }
}

/// How an instance arrived: what the store checks the data set against.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    /// Transfer syntax UID the data set is encoded in (the negotiated one for DIMSE).
    pub transfer_syntax: &'a str,
    /// Calling AE title (DIMSE) or another short sender label (STOW-RS).
    pub calling_ae: &'a str,
    /// SOP Class UID the sender announced (C-STORE Affected SOP Class UID), if any.
    pub expected_sop_class: Option<&'a str>,
    /// SOP Instance UID the sender announced (C-STORE Affected SOP Instance UID), if any.
    pub expected_sop_instance: Option<&'a str>,
}

/// The sender label of the result objects this node made and keeps in its spool
/// ([`Spool::store_own_result`]): longer than an AE title may be (16), so no peer's calling AE
/// is ever taken for it.
pub const OWN_RESULTS_SENDER: &str = "nightingale-results";

/// The index columns [`Spool::stored_row`] reads, in its order.
pub(crate) const INSTANCE_COLUMNS: &str = "sop_instance_uid, sop_class_uid, study_uid, series_uid, \
     transfer_syntax, calling_ae, received_at_ms, size, sha256, path, modality, study_date, \
     study_time, series_number, instance_number, rows, columns, number_of_frames";

/// An instance in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub study_uid: String,
    pub series_uid: String,
    pub transfer_syntax: String,
    pub calling_ae: String,
    /// Unix time in milliseconds.
    pub received_at_ms: i64,
    /// Size of the data set as received, in bytes (the file adds its meta group).
    pub size: u64,
    /// SHA-256 of the data set as received, hex.
    pub sha256: String,
    /// The `.dcm` file, absolute.
    pub path: PathBuf,
    /// True when the same instance (same bytes) was already stored: nothing was written.
    pub duplicate: bool,
    /// What the index keeps of it beyond the UIDs (for QIDO-RS).
    pub attributes: Attributes,
}

/// Why an object was refused or could not be stored. No patient data in any message.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "out of resources: {free_bytes} bytes free, {needed_bytes} needed with the high-water mark"
    )]
    OutOfResources { free_bytes: u64, needed_bytes: u64 },
    #[error("the spool's file system is full ({op})")]
    DiskFull { op: &'static str },
    #[error("object of {size} bytes is larger than the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("unknown transfer syntax {uid}")]
    UnknownTransferSyntax { uid: String },
    #[error("cannot parse the data set ({transfer_syntax}): {detail}")]
    CannotParse {
        transfer_syntax: String,
        detail: String,
    },
    #[error("malformed data set: {0}")]
    Malformed(#[from] crate::structure::StructureError),
    #[error("missing required attribute {name}")]
    MissingAttribute { name: &'static str },
    #[error("{name} is not a valid UID")]
    InvalidUid { name: &'static str },
    #[error("{name} in the data set differs from the one announced in the command")]
    Mismatch { name: &'static str },
    #[error("image instance without pixel data")]
    MissingPixelData,
    #[error("an instance with this SOP Instance UID but other content is already stored")]
    Conflict,
    #[error("the file's content does not match the hash in its name (a store cut by a crash)")]
    Torn,
    #[error("spool I/O error ({op}): {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("spool index error: {0}")]
    Index(#[from] rusqlite::Error),
}

impl StoreError {
    /// Whether the object itself is at fault (and so is quarantined), as opposed to the
    /// spool being unable to take it now.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            StoreError::UnknownTransferSyntax { .. }
                | StoreError::CannotParse { .. }
                | StoreError::Malformed(_)
                | StoreError::MissingAttribute { .. }
                | StoreError::InvalidUid { .. }
                | StoreError::Mismatch { .. }
                | StoreError::MissingPixelData
        )
    }

    /// A short stable label of the reason (for metrics and the quarantine file).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::OutOfResources { .. } => "out_of_resources",
            StoreError::DiskFull { .. } => "disk_full",
            StoreError::TooLarge { .. } => "too_large",
            StoreError::UnknownTransferSyntax { .. } => "unknown_transfer_syntax",
            StoreError::CannotParse { .. } => "cannot_parse",
            StoreError::Malformed(_) => "malformed",
            StoreError::MissingAttribute { .. } => "missing_attribute",
            StoreError::InvalidUid { .. } => "invalid_uid",
            StoreError::Mismatch { .. } => "mismatch",
            StoreError::MissingPixelData => "missing_pixel_data",
            StoreError::Conflict => "conflict",
            StoreError::Torn => "torn",
            StoreError::Io { .. } => "io",
            StoreError::Index(_) => "index",
        }
    }
}

/// The spool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spool index: {0}")]
    Index(#[from] rusqlite::Error),
    /// One of the spool's own folders is a symbolic link: its purge would delete old files
    /// wherever it points (a quarantine linked to a shared folder lost that folder's files).
    #[error("spool folder {path} is a symbolic link: the spool's folders must be its own")]
    LinkedFolder { path: PathBuf },
}

/// What opening the spool found and repaired.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Temporary files of interrupted stores, deleted.
    pub temp_files_deleted: usize,
    /// Index rows whose file was missing, dropped.
    pub rows_dropped: usize,
    /// Files without an index row, now indexed.
    pub files_indexed: usize,
    /// Files that did not parse or duplicated an indexed instance, moved to quarantine.
    pub files_quarantined: usize,
    /// Rows indexed by an older version whose attributes were read from their files.
    pub rows_reindexed: usize,
}

/// The durable spool. Safe to share between threads; every call blocks on the file system.
pub struct Spool {
    pub(crate) root: PathBuf,
    pub(crate) options: SpoolOptions,
    pub(crate) index: Mutex<Connection>,
    /// A second connection to the index, for QIDO-RS searches only: a search (however
    /// long) never holds the connection every store waits for (a search of a 10,000-instance
    /// study held it for 50 s, and C-STOREs timed out: a review's finding). The index is in
    /// WAL mode, so readers and the writer do not block each other.
    reader: Mutex<Connection>,
    pub(crate) seq: AtomicU64,
    /// Stores waiting for the next group commit, and the outcomes not yet collected.
    commits: Mutex<CommitQueue>,
    /// Signalled after each group commit.
    committed: Condvar,
    /// Fsyncs the directories that got new entries.
    dirs: Arc<DirSyncer>,
    /// Temporary files are anonymous (`O_TMPFILE`, linked by `linkat`): probed at open.
    anonymous_temps: bool,
    /// Received data sets are written with `O_DIRECT`: probed at open.
    direct_writes: bool,
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.dirs.stop();
    }
}

/// Directory fsyncs requested by stores, done by one thread in batches: a store links its
/// file into place, asks for its directory, and fsyncs its file while the directory is
/// synced, so the two fsyncs share a device flush.
#[derive(Default)]
struct DirSyncer {
    state: Mutex<DirSyncState>,
    /// Work for the syncer thread.
    wake: Condvar,
    /// A batch synced.
    synced: Condvar,
}

#[derive(Default)]
struct DirSyncState {
    /// The last ticket handed out.
    next: u64,
    pending: Vec<(u64, PathBuf)>,
    /// Every ticket up to this one is settled.
    done: u64,
    failed: HashMap<u64, std::io::ErrorKind>,
    stopped: bool,
}

impl DirSyncer {
    fn lock(&self) -> std::sync::MutexGuard<'_, DirSyncState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for `dir` to be fsynced (after an entry was added to it); returns the ticket.
    fn request(&self, dir: PathBuf) -> u64 {
        let mut state = self.lock();
        state.next += 1;
        let ticket = state.next;
        state.pending.push((ticket, dir));
        drop(state);
        self.wake.notify_one();
        ticket
    }

    /// Waits until the fsync asked for with `ticket` is done.
    fn wait(&self, ticket: u64) -> std::io::Result<()> {
        let mut state = self.lock();
        while state.done < ticket && !state.stopped {
            state = self.synced.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if let Some(kind) = state.failed.remove(&ticket) {
            return Err(kind.into());
        }
        if state.done < ticket {
            return Err(std::io::Error::other("the spool is closing"));
        }
        Ok(())
    }

    fn stop(&self) {
        self.lock().stopped = true;
        self.wake.notify_all();
        self.synced.notify_all();
    }

    /// The syncer thread: each batch of requests, one fsync per distinct directory.
    fn run(&self) {
        loop {
            let mut state = self.lock();
            while state.pending.is_empty() && !state.stopped {
                state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            if state.pending.is_empty() {
                return;
            }
            let batch = std::mem::take(&mut state.pending);
            drop(state);
            let mut outcome: HashMap<&Path, Option<std::io::ErrorKind>> = HashMap::new();
            for (_, dir) in &batch {
                outcome
                    .entry(dir.as_path())
                    .or_insert_with(|| sync_dir(dir).err().map(|e| e.kind()));
            }
            let mut state = self.lock();
            for (ticket, dir) in &batch {
                if let Some(kind) = outcome[dir.as_path()] {
                    state.failed.insert(*ticket, kind);
                }
            }
            state.done = batch.last().map_or(state.done, |(t, _)| *t);
            drop(state);
            self.synced.notify_all();
        }
    }
}

/// A file linked under its final name and durable (file and directory), to be indexed.
struct Placed {
    relative: PathBuf,
    stored: Stored,
    /// False when the name already held the same bytes (another store's file): not ours
    /// to delete.
    linked: bool,
}

/// A complete temporary file (written, not yet fsynced), to be placed and indexed.
struct Placement {
    /// The temporary file, open: fsynced once it has its name.
    tmp: TempFile,
    relative: PathBuf,
    stored: Stored,
}

/// What the index holds for a SOP Instance UID.
#[derive(Clone)]
struct Existing {
    sha256: String,
    path: String,
    calling_ae: String,
    /// The data set's size: its file (file meta first) is at least that long.
    size: u64,
}

#[derive(Default)]
struct CommitQueue {
    next_ticket: u64,
    /// True while one caller commits a group.
    committing: bool,
    waiting: Vec<(u64, Placed)>,
    done: HashMap<u64, Result<Stored, StoreError>>,
}

/// Hands a group's outcomes to its waiters and lets the next group start, also when the
/// committing caller unwinds (its waiters then get an error instead of waiting forever).
struct CommitGuard<'a> {
    spool: &'a Spool,
    tickets: Vec<u64>,
    results: Vec<(u64, Result<Stored, StoreError>)>,
}

impl Drop for CommitGuard<'_> {
    fn drop(&mut self) {
        let mut queue = self.spool.commits.lock().unwrap_or_else(|p| p.into_inner());
        for (ticket, result) in self.results.drain(..) {
            queue.done.insert(ticket, result);
        }
        for ticket in &self.tickets {
            queue.done.entry(*ticket).or_insert_with(|| {
                Err(StoreError::Io {
                    op: "group commit",
                    source: std::io::Error::other("the committing thread failed"),
                })
            });
        }
        queue.committing = false;
        drop(queue);
        self.spool.committed.notify_all();
    }
}

/// What a data set says about itself.
struct Identity {
    sop_class_uid: String,
    sop_instance_uid: String,
    study_uid: String,
    series_uid: String,
    attributes: Attributes,
}

/// A data set being received ([`Spool::begin`]): kept in memory, as the Part 10 file it
/// will be (file meta, then the data set), in a buffer whose file image starts on a
/// [`DIRECT_ALIGN`] boundary, so that [`Spool::finish`] can write it with `O_DIRECT`.
/// Nothing is on disk until then; dropping it leaves nothing behind.
pub struct Upload {
    hasher: Sha256,
    /// Alignment padding, then the file image: the file meta, then the data set so far.
    buf: Vec<u8>,
    /// Where the file image starts in `buf`.
    start: usize,
    /// Where the data set starts in `buf`.
    data_start: usize,
    /// What the file meta says.
    sop_class_uid: String,
    sop_instance_uid: String,
}

impl Upload {
    /// Adds the next fragment of the data set (hashed as it arrives).
    pub fn append(&mut self, fragment: &[u8]) {
        self.hasher.update(fragment);
        self.buf.extend_from_slice(fragment);
    }

    /// Bytes of the data set received so far.
    pub fn len(&self) -> usize {
        self.buf.len() - self.data_start
    }

    /// True before the first fragment.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The memory that held the data set, emptied, for the next [`Spool::begin`] (a
    /// receiver that reuses it spares the allocator and the page faults of a fresh buffer).
    pub fn into_buffer(mut self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf
    }

    /// Moves the file image to an aligned address if a reallocation while growing moved it
    /// off one (one copy; a reused buffer with room to spare never moves).
    fn realign(&mut self) {
        if (self.buf.as_ptr() as usize + self.start).is_multiple_of(DIRECT_ALIGN) {
            return;
        }
        let len = self.buf.len() - self.start;
        self.buf.reserve(DIRECT_ALIGN);
        let to = self.buf.as_ptr().align_offset(DIRECT_ALIGN);
        if to > self.start {
            self.buf.resize(to + len, 0);
        }
        self.buf.copy_within(self.start..self.start + len, to);
        self.buf.truncate(to + len);
        self.data_start = self.data_start - self.start + to;
        self.start = to;
    }
}

/// Alignment (of memory, file offsets and lengths) for `O_DIRECT` writes: a multiple of
/// the logical block size of every common device.
const DIRECT_ALIGN: usize = 4096;

/// A temporary file being written: anonymous (`O_TMPFILE`: no directory entry until
/// [`TempFile::link`], nothing left behind by a crash) or, where the file system cannot do
/// that, named in `tmp/`.
struct TempFile {
    file: File,
    /// The name of a named temporary file.
    path: Option<PathBuf>,
}

impl TempFile {
    /// Creates a temporary file in `dir`: anonymous when `anonymous`, else at `named`;
    /// opened with `O_DIRECT` when `direct`.
    fn create(
        dir: &Path,
        anonymous: bool,
        direct: bool,
        named: impl FnOnce() -> PathBuf,
    ) -> std::io::Result<TempFile> {
        use rustix::fs::OFlags;
        let mut flags = OFlags::WRONLY | OFlags::CLOEXEC;
        if direct {
            flags |= OFlags::DIRECT;
        }
        // Patient data: readable by the server's user only (0644 under the usual umask let
        // every local user read received studies, while result files were 0600: a red-team
        // finding).
        let mode = rustix::fs::Mode::from_raw_mode(0o600);
        if anonymous {
            let fd = rustix::fs::openat(rustix::fs::CWD, dir, flags | OFlags::TMPFILE, mode)?;
            return Ok(TempFile {
                file: File::from(fd),
                path: None,
            });
        }
        let path = named();
        let fd = rustix::fs::openat(
            rustix::fs::CWD,
            &path,
            flags | OFlags::CREATE | OFlags::TRUNC,
            mode,
        )?;
        Ok(TempFile {
            file: File::from(fd),
            path: Some(path),
        })
    }

    /// Writes `image` (the whole file, at offset 0): with `O_DIRECT` when the file was
    /// opened so (`direct`) and `image` starts on a [`DIRECT_ALIGN`] boundary, the aligned
    /// part goes from memory to the device without the page cache (no copy into it, no
    /// write-back work left for the fsync) and the short tail after it buffered.
    fn write_image(&mut self, image: &[u8], direct: bool) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let aligned = if direct && (image.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
            image.len() / DIRECT_ALIGN * DIRECT_ALIGN
        } else {
            0
        };
        if aligned > 0 {
            match self.file.write_all_at(&image[..aligned], 0) {
                Ok(()) => {}
                // A device or file system that wants another alignment: all buffered.
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    self.buffered()?;
                    return self.file.write_all_at(image, 0);
                }
                Err(e) => return Err(e),
            }
        }
        if direct {
            self.buffered()?;
        }
        self.file.write_all_at(&image[aligned..], aligned as u64)
    }

    /// Turns `O_DIRECT` off (for the unaligned tail of a file).
    fn buffered(&self) -> std::io::Result<()> {
        let flags = rustix::fs::fcntl_getfl(&self.file)?;
        rustix::fs::fcntl_setfl(&self.file, flags - rustix::fs::OFlags::DIRECT)?;
        Ok(())
    }

    /// Gives the file the name `dest` without replacing anything there: `Ok(false)` when
    /// the name exists.
    fn link(&self, dest: &Path) -> std::io::Result<bool> {
        let linked = match &self.path {
            Some(path) => fs::hard_link(path, dest),
            None => {
                use std::os::fd::AsRawFd;
                // The file's `/proc` link, followed: how an `O_TMPFILE` file gets a name
                // without `CAP_DAC_READ_SEARCH` (open(2)).
                let fd = format!("/proc/self/fd/{}", self.file.as_raw_fd());
                rustix::fs::linkat(
                    rustix::fs::CWD,
                    fd.as_str(),
                    rustix::fs::CWD,
                    dest,
                    rustix::fs::AtFlags::SYMLINK_FOLLOW,
                )
                .map_err(std::io::Error::from)
            }
        };
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The file, its temporary name (if it has one) deleted: for a file linked under its
    /// final name.
    fn into_file(self) -> File {
        if let Some(path) = &self.path {
            let _ = fs::remove_file(path);
        }
        self.file
    }

    /// Closes the file and deletes its temporary name (an anonymous file is gone once
    /// closed, unless it was linked).
    fn remove(self) {
        drop(self.file);
        if let Some(path) = self.path {
            let _ = fs::remove_file(path);
        }
    }
}

/// Whether the file system of `dir` can create anonymous temporary files and link them
/// (Linux `O_TMPFILE` and a mounted `/proc`): tried once, with a probe file.
fn anonymous_temps_work(dir: &Path) -> bool {
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    let _ = fs::remove_file(&probe);
    let works = TempFile::create(dir, true, false, || unreachable!())
        .and_then(|tmp| tmp.link(&probe))
        .unwrap_or(false);
    let _ = fs::remove_file(&probe);
    works
}

/// Whether the file system of `dir` takes `O_DIRECT` writes of [`DIRECT_ALIGN`]-aligned
/// blocks (tmpfs before Linux 6.6 and some network file systems do not): tried once.
fn direct_writes_work(dir: &Path, anonymous: bool) -> bool {
    use std::os::unix::fs::FileExt;
    let probe = dir.join(format!(".probe-direct-{}", std::process::id()));
    let works = TempFile::create(dir, anonymous, true, || probe.clone()).and_then(|tmp| {
        let mut block = vec![0u8; 2 * DIRECT_ALIGN];
        let at = block.as_ptr().align_offset(DIRECT_ALIGN);
        block.truncate(at + DIRECT_ALIGN);
        let written = tmp.file.write_all_at(&block[at..], 0);
        tmp.remove();
        written
    });
    let _ = fs::remove_file(&probe);
    works.is_ok()
}

/// The index row of a checked data set in the spool at `root`, and its path relative to it.
fn stored_of(
    root: &Path,
    identity: Identity,
    incoming: &Incoming<'_>,
    size: u64,
    sha256: String,
) -> (Stored, PathBuf) {
    let relative = instance_path(&identity, &sha256);
    let stored = Stored {
        path: root.join(&relative),
        sop_instance_uid: identity.sop_instance_uid,
        sop_class_uid: identity.sop_class_uid,
        study_uid: identity.study_uid,
        series_uid: identity.series_uid,
        transfer_syntax: sop::trim_uid(incoming.transfer_syntax).to_owned(),
        calling_ae: incoming.calling_ae.trim().to_owned(),
        received_at_ms: now_ms(),
        size,
        sha256,
        duplicate: false,
        attributes: identity.attributes,
    };
    (stored, relative)
}

/// The file meta group of a stored instance.
fn file_meta(
    sop_class_uid: &str,
    sop_instance_uid: &str,
    transfer_syntax: &str,
    calling_ae: &str,
) -> Result<FileMetaTable, StoreError> {
    let builder = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class_uid)
        .media_storage_sop_instance_uid(sop_instance_uid)
        .transfer_syntax(transfer_syntax)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME);
    // An AE title is at most 16 characters: a sender label that is not one (this node's own
    // results, [`OWN_RESULTS_SENDER`]) stays in the index and is left out of the file, whose
    // header would otherwise be refused by strict readers, dicom-rs's among them (the
    // spool's own check quarantined every result copy: a review's finding).
    let builder = if calling_ae.len() <= 16 {
        builder.source_application_entity_title(calling_ae)
    } else {
        builder
    };
    builder.build().map_err(|e| StoreError::CannotParse {
        transfer_syntax: transfer_syntax.to_owned(),
        detail: e.to_string(),
    })
}

impl Spool {
    /// Opens (creating if needed) the spool in `root` and reconciles the index with the files.
    pub fn open(root: &Path, options: SpoolOptions) -> Result<(Spool, Recovery), SpoolError> {
        let spool = Spool::open_unreconciled(root, options)?;
        let recovery = spool.reconcile()?;
        Ok((spool, recovery))
    }

    /// Opens (creating if needed) the spool without touching its files (maintenance).
    pub(crate) fn open_unreconciled(
        root: &Path,
        options: SpoolOptions,
    ) -> Result<Spool, SpoolError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SpoolError::Io { path, source }
        };
        for dir in [TMP_DIR, INSTANCES_DIR, QUARANTINE_DIR] {
            let path = root.join(dir);
            // The spool deletes and moves files in these folders: one that is a link would
            // have it do so wherever the link points.
            if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(SpoolError::LinkedFolder { path });
            }
            private_dirs(&path).map_err(io(&path))?;
            narrow(&path, 0o700).map_err(io(&path))?;
        }
        let root = root.canonicalize().map_err(io(root))?;
        // A spool made before its folders were private (0755 under the usual umask) is
        // narrowed at open: what is inside is then out of others' reach, whatever the files'
        // own modes (a re-attack's finding: only new files were private).
        narrow(&root, 0o700).map_err(io(&root))?;
        // The index names studies, series and instances: its owner's alone, as the files are
        // (SQLite gives its WAL and shared-memory files the database file's mode).
        let index = root.join(INDEX_FILE);
        private_file(&index).map_err(io(&index))?;
        for file in [INDEX_FILE, "index.sqlite3-wal", "index.sqlite3-shm"] {
            let path = root.join(file);
            narrow(&path, 0o600).map_err(io(&path))?;
        }
        let db = Connection::open(&index)?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        // Another program's database, another store's, or a newer layout: refused before
        // anything in it is changed (the journal mode included).
        crate::sqlite_schema::SPOOL_INDEX.check(&db)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS instances (
                sop_instance_uid TEXT PRIMARY KEY,
                sop_class_uid TEXT NOT NULL,
                study_uid TEXT NOT NULL,
                series_uid TEXT NOT NULL,
                transfer_syntax TEXT NOT NULL,
                calling_ae TEXT NOT NULL,
                received_at_ms INTEGER NOT NULL,
                size INTEGER NOT NULL,
                sha256 TEXT NOT NULL,
                path TEXT NOT NULL UNIQUE
            );
            CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid, series_uid);",
        )?;
        add_attribute_columns(&db)?;
        add_arrival_sequence(&db)?;
        add_purge_log(&db)?;
        // What a purge deletes is overwritten in the index file, not left in its free pages
        // (a review read purged studies' UIDs back from the file with `grep -a`).
        db.pragma_update(None, "secure_delete", true)?;
        crate::sqlite_schema::SPOOL_INDEX.mark(&db)?;
        let anonymous_temps =
            !options.named_temp_files && anonymous_temps_work(&root.join(TMP_DIR));
        let direct_writes =
            !options.buffered_writes && direct_writes_work(&root.join(TMP_DIR), anonymous_temps);
        let dirs = Arc::new(DirSyncer::default());
        let syncer = dirs.clone();
        std::thread::Builder::new()
            .name("ng-spool-dirsync".into())
            .spawn(move || syncer.run())
            .map_err(io(&root))?;
        let reader = Connection::open(root.join(INDEX_FILE))?;
        reader.busy_timeout(std::time::Duration::from_secs(10))?;
        reader.pragma_update(None, "query_only", true)?;
        Ok(Spool {
            root,
            options,
            index: Mutex::new(db),
            reader: Mutex::new(reader),
            seq: AtomicU64::new(0),
            commits: Mutex::new(CommitQueue::default()),
            committed: Condvar::new(),
            dirs,
            anonymous_temps,
            direct_writes,
        })
    }

    /// The spool folder (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The index connection, for queries in sibling modules.
    pub(crate) fn index(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The index's read-only connection for searches (QIDO-RS: `qido.rs`), apart from the
    /// one stores use.
    pub(crate) fn searcher(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether temporary files are anonymous (`O_TMPFILE`) rather than named in `tmp/`.
    pub fn anonymous_temp_files(&self) -> bool {
        self.anonymous_temps
    }

    /// Whether received data sets are written with `O_DIRECT` (see [`Spool::finish`]).
    pub fn direct_writes(&self) -> bool {
        self.direct_writes
    }

    /// The free space the spool keeps (its high-water mark), in bytes.
    pub fn min_free_bytes(&self) -> u64 {
        self.options.min_free_bytes
    }

    /// The quarantine folder.
    pub fn quarantine_dir(&self) -> PathBuf {
        self.root.join(QUARANTINE_DIR)
    }

    /// Stores a Part 10 file this node made (the DICOM pipeline's result objects), as
    /// [`Spool::store`] stores a received one, under the calling AE [`OWN_RESULTS_SENDER`]:
    /// QIDO-RS then lists it and WADO-RS serves it like any instance, and the pipeline does
    /// not take it for an arrival ([`Spool::series_touched_since`] leaves such rows out).
    pub fn store_own_result(&self, file: &[u8]) -> Result<Stored, StoreError> {
        let (meta, dataset) = part10(file)?;
        let ts = sop::trim_uid(meta.transfer_syntax()).to_owned();
        let sop_class = sop::trim_uid(meta.media_storage_sop_class_uid()).to_owned();
        let sop_instance = sop::trim_uid(meta.media_storage_sop_instance_uid()).to_owned();
        self.store(
            dataset,
            &Incoming {
                transfer_syntax: &ts,
                calling_ae: OWN_RESULTS_SENDER,
                expected_sop_class: Some(&sop_class),
                expected_sop_instance: Some(&sop_instance),
            },
        )
    }

    /// Stores one data set (without file meta, encoded in `incoming.transfer_syntax`, as a
    /// C-STORE carries it). Returns once the file, its directory entry and its index row
    /// are durable. Refused objects are quarantined before the error is returned.
    ///
    /// Stores that run at the same time share their commits (group commit): each caller
    /// writes and fsyncs its own temporary file, then one of the waiting callers renames
    /// every file ready at that moment into place, fsyncs each directory once, adds all
    /// their rows in one transaction, and wakes the others. No call returns before its own
    /// data, rename and directory entry are on disk and its row is committed.
    pub fn store(&self, dataset: &[u8], incoming: &Incoming<'_>) -> Result<Stored, StoreError> {
        let identity = match validate(dataset, incoming) {
            Ok(identity) => identity,
            Err(e) => {
                if e.is_refusal() {
                    self.quarantine(dataset, incoming, &e);
                }
                return Err(e);
            }
        };
        self.check_space(dataset.len() as u64 + 1024)?;
        let sha256 = hex::encode(Sha256::digest(dataset));
        let (stored, relative) =
            stored_of(&self.root, identity, incoming, dataset.len() as u64, sha256);
        self.settle(dataset, incoming, stored, relative, |stored| {
            let meta = file_meta(
                &stored.sop_class_uid,
                &stored.sop_instance_uid,
                &stored.transfer_syntax,
                &stored.calling_ae,
            )?;
            let mut tmp = self.temp_file(false).map_err(|e| io_error("create", e))?;
            match write_part10(&mut tmp.file, &meta, dataset) {
                Ok(()) => Ok(tmp),
                Err(source) => {
                    tmp.remove();
                    Err(io_error("write", source))
                }
            }
        })
    }

    /// Starts receiving a data set (the DIMSE SCP's path): the file meta is made now, from
    /// what the C-STORE command announced, and each fragment is hashed and added to the
    /// file image in memory as it arrives ([`Upload::append`]); [`Spool::finish`] then
    /// checks, writes, fsyncs and commits it like [`Spool::store`]. Fails (and the caller
    /// falls back to [`Spool::store`]) when the announced values cannot make a file meta or
    /// the spool is below its high-water mark. `buffer` (emptied) is the memory to receive
    /// into: pass the one [`Upload::into_buffer`] gave back, or `Vec::new()`.
    pub fn begin(&self, announced: &Incoming<'_>, buffer: Vec<u8>) -> Result<Upload, StoreError> {
        let (Some(class), Some(instance)) = (
            announced.expected_sop_class,
            announced.expected_sop_instance,
        ) else {
            return Err(StoreError::MissingAttribute {
                name: "SOPInstanceUID",
            });
        };
        let (class, instance) = (sop::trim_uid(class), sop::trim_uid(instance));
        if !sop::is_acceptable_uid(class) || !sop::is_acceptable_uid(instance) {
            return Err(StoreError::InvalidUid {
                name: "SOPInstanceUID",
            });
        }
        self.check_space(1024)?;
        let transfer_syntax = sop::trim_uid(announced.transfer_syntax).to_owned();
        let calling_ae = announced.calling_ae.trim().to_owned();
        let meta = file_meta(class, instance, &transfer_syntax, &calling_ae)?;
        let mut buf = buffer;
        buf.clear();
        buf.reserve(DIRECT_ALIGN + 512);
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        buf.resize(start, 0);
        push_part10_head(&mut buf, &meta).map_err(|e| StoreError::CannotParse {
            transfer_syntax: transfer_syntax.clone(),
            detail: e.to_string(),
        })?;
        Ok(Upload {
            hasher: Sha256::new(),
            data_start: buf.len(),
            buf,
            start,
            sop_class_uid: class.to_owned(),
            sop_instance_uid: instance.to_owned(),
        })
    }

    /// Ends an [`Upload`] whose last fragment arrived: the same checks, answers and
    /// guarantees as [`Spool::store`] (`incoming` must be what [`Spool::begin`] got). The
    /// file is written in one go, with `O_DIRECT` where the file system takes it: from the
    /// upload's memory to the device, with no copy into the page cache, so that the fsync
    /// only has the last partial block and the metadata left to write. Returns once the
    /// file, its directory entry and its index row are durable. The upload's buffer is
    /// kept for [`Upload::into_buffer`].
    pub fn finish(
        &self,
        upload: &mut Upload,
        incoming: &Incoming<'_>,
    ) -> Result<Stored, StoreError> {
        upload.realign();
        let data = &upload.buf[upload.data_start..];
        let identity = match validate(data, incoming) {
            Ok(identity) => identity,
            Err(e) => {
                if e.is_refusal() {
                    self.quarantine(data, incoming, &e);
                }
                return Err(e);
            }
        };
        if identity.sop_class_uid != upload.sop_class_uid
            || identity.sop_instance_uid != upload.sop_instance_uid
        {
            // The file meta says otherwise (only when the caller announced nothing):
            // write the file from the data set.
            return self.store(data, incoming);
        }
        self.check_space(data.len() as u64 + 1024)?;
        let sha256 = hex::encode(std::mem::take(&mut upload.hasher).finalize());
        let (stored, relative) =
            stored_of(&self.root, identity, incoming, data.len() as u64, sha256);
        let image = &upload.buf[upload.start..];
        self.settle(data, incoming, stored, relative, |_| {
            let direct = self.direct_writes;
            let mut tmp = self.temp_file(direct).map_err(|e| io_error("create", e))?;
            match tmp.write_image(image, direct) {
                Ok(()) => Ok(tmp),
                Err(e) => {
                    tmp.remove();
                    Err(io_error("write", e))
                }
            }
        })
    }

    /// The end of a store whose data set was checked: a duplicate is answered from the
    /// index; otherwise `write` gives the complete (not yet fsynced) temporary file, which
    /// is placed, made durable and committed ([`Spool::commit`]).
    fn settle(
        &self,
        dataset: &[u8],
        incoming: &Incoming<'_>,
        stored: Stored,
        relative: PathBuf,
        write: impl FnOnce(&Stored) -> Result<TempFile, StoreError>,
    ) -> Result<Stored, StoreError> {
        // An instance already indexed needs no write at all.
        let mut existing = {
            let db = self.index.lock().unwrap_or_else(|p| p.into_inner());
            indexed(&db, &stored.sop_instance_uid)?
        };
        // Answered from the index: under the maintenance lock (shared), read again and
        // marked received now, so that a purge (this server's or `nightingale spool purge`
        // beside it, which takes the lock exclusive per batch) cannot delete what this
        // answer says is stored: a purge that ran first left no row (the instance is stored
        // afresh), one that runs after finds it received now (a red-team finding: re-sends
        // acknowledged while a purge ran were deleted by it).
        let mut same = false;
        let _maintenance = match &existing {
            Some(_) => {
                let lock = self.maintenance_lock(false, STORE_LOCK_WAIT)?;
                existing = {
                    let db = self.index.lock().unwrap_or_else(|p| p.into_inner());
                    indexed(&db, &stored.sop_instance_uid)?
                };
                // The same instance in other bytes (re-encoded in another transfer syntax, its
                // sequences delimited otherwise) is a duplicate too: compared on its content,
                // outside the index lock (the stored file is read).
                same = match existing.as_ref() {
                    Some(e) if e.sha256 == stored.sha256 => true,
                    Some(e) => self.same_content(e, dataset, incoming.transfer_syntax)?,
                    None => false,
                };
                if same {
                    let db = self.index.lock().unwrap_or_else(|p| p.into_inner());
                    db.prepare_cached(
                        "UPDATE instances SET received_at_ms = MAX(received_at_ms, ?2)
                         WHERE sop_instance_uid = ?1",
                    )?
                    .execute(params![stored.sop_instance_uid, now_ms()])?;
                }
                Some(lock)
            }
            None => None,
        };
        // The index names these very bytes, but their file is gone or cut (deleted behind
        // the index, a purge interrupted between file and row, a disk fault): a re-send is
        // how a PACS recovers a lost instance, and answering it as a duplicate left nothing
        // stored under a success (a red-team finding). It is written again under the
        // indexed name, the row kept.
        let lost = existing
            .as_ref()
            .filter(|e| e.sha256 == stored.sha256)
            .and_then(|e| self.lost(e));
        let result = match (existing, lost) {
            (Some(existing), Some(path)) => {
                tracing::warn!(
                    "an indexed instance's file was missing: stored again from a re-send"
                );
                let relative = PathBuf::from(&existing.path);
                let stored = Stored { path, ..stored };
                write(&stored).and_then(|tmp| {
                    self.commit(Placement {
                        tmp,
                        relative,
                        stored,
                    })
                })
            }
            (Some(existing), None) => self.as_duplicate(stored, existing, same),
            (None, _) => write(&stored).and_then(|tmp| {
                self.commit(Placement {
                    tmp,
                    relative,
                    stored,
                })
            }),
        };
        if let Err(StoreError::Conflict) = result {
            // Another version of a stored instance: the first stays; this one is kept in
            // quarantine for an operator to look at.
            self.quarantine(dataset, incoming, &StoreError::Conflict);
        }
        result
    }

    /// The spool's maintenance lock ([`MAINTENANCE_LOCK`]), held until the file is dropped:
    /// shared, or exclusive (a purge batch). Opened afresh each time: a lock belongs to an
    /// open file, and two threads of one process locking one open file would share it.
    ///
    /// Waited for at most `wait` (a store: [`STORE_LOCK_WAIT`]; a purge batch longer): a
    /// lock held for longer (another process's purge stuck, a hostile holder) fails this
    /// store with a processing failure the sender retries, instead of holding its
    /// association for as long (a re-attack's finding). Only a regular file is taken (a
    /// FIFO in its place blocked the open for ever).
    pub(crate) fn maintenance_lock(
        &self,
        exclusive: bool,
        wait: std::time::Duration,
    ) -> Result<fs::File, StoreError> {
        use rustix::fs::OFlags;
        let path = self.root.join(MAINTENANCE_LOCK);
        let mut options = fs::OpenOptions::new();
        options.create(true).truncate(false).write(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        std::os::unix::fs::OpenOptionsExt::custom_flags(
            &mut options,
            (OFlags::NOFOLLOW | OFlags::NONBLOCK).bits() as i32,
        );
        let failed = |op: &'static str| move |source: std::io::Error| StoreError::Io { op, source };
        let file = options
            .open(&path)
            .map_err(failed("open the spool's maintenance lock"))?;
        if !file
            .metadata()
            .map_err(failed("open the spool's maintenance lock"))?
            .is_file()
        {
            return Err(failed("open the spool's maintenance lock")(
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
            ));
        }
        let deadline = std::time::Instant::now() + wait;
        loop {
            let tried = if exclusive {
                file.try_lock()
            } else {
                file.try_lock_shared()
            };
            match tried {
                Ok(()) => return Ok(file),
                Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(failed("wait for the spool's maintenance lock (a purge)")(
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("held for more than {} s", wait.as_secs()),
                        ),
                    ));
                }
                Err(fs::TryLockError::Error(e)) => {
                    return Err(failed("lock the spool's maintenance lock")(e));
                }
            }
        }
    }

    /// The full path of an indexed instance whose file is gone, or shorter than its data set
    /// (cut by a disk fault: a re-send was acknowledged as a duplicate and the empty file
    /// kept, a re-attack's finding), which is first moved into quarantine as `.damaged`;
    /// `None` when the file is there whole, when something else is in its place (that is
    /// `spool check`'s to report), or when the indexed path is not one of the spool's.
    fn lost(&self, existing: &Existing) -> Option<PathBuf> {
        let path = indexed_path(&self.root, &existing.path, false)?;
        match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(path),
            Ok(m) if m.is_file() && m.len() < existing.size => {
                let n = self.seq.fetch_add(1, Ordering::Relaxed);
                let aside = self.quarantine_dir().join(format!(
                    "{}-{}-{n}.damaged",
                    now_ms(),
                    std::process::id()
                ));
                match fs::rename(&path, &aside) {
                    // Another re-send moved it first: the name is free all the same.
                    Ok(()) => {
                        tracing::warn!(
                            "an indexed instance's file was shorter than its data set: moved to quarantine"
                        );
                        Some(path)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(path),
                    Err(_) => None,
                }
            }
            _ => None,
        }
    }

    /// Whether the stored instance `existing` holds the same elements with the same values
    /// as `dataset` (encoded in `transfer_syntax`), however each is encoded
    /// ([`structure::content_digest`]): a PACS that re-sends an instance on an association
    /// that negotiated another transfer syntax (dcmtk's storescu converts between the
    /// uncompressed ones on the fly) sends other bytes of the same instance, and got a
    /// failure status for it. Files over [`MAX_COMPARED_BYTES`] are not compared (a
    /// conflict), and at most [`MAX_COMPARING`] comparisons run at once (each holds the
    /// stored file in memory); a store that waits [`STORE_LOCK_WAIT`] for a place fails with
    /// a processing failure its sender retries (crafted conflicts, each comparison taking
    /// seconds, held every re-send behind them: a red-team finding).
    fn same_content(
        &self,
        existing: &Existing,
        dataset: &[u8],
        transfer_syntax: &str,
    ) -> Result<bool, StoreError> {
        if existing.size > MAX_COMPARED_BYTES || dataset.len() as u64 > MAX_COMPARED_BYTES {
            return Ok(false);
        }
        let Some(path) = indexed_path(&self.root, &existing.path, true) else {
            return Ok(false);
        };
        let _place = ComparePlace::take(STORE_LOCK_WAIT).ok_or_else(|| StoreError::Io {
            op: "compare with the stored instance of this SOP Instance UID",
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "other comparisons held every place",
            ),
        })?;
        let Ok(file) = read_at_most(&path, MAX_COMPARED_BYTES + 64 * 1024) else {
            return Ok(false);
        };
        let Ok((meta, held)) = part10(&file) else {
            return Ok(false);
        };
        let digest = |bytes: &[u8], ts: &str| {
            structure::content_digest(bytes, structure::Encoding::of(sop::trim_uid(ts))).ok()
        };
        let same = match (
            digest(held, meta.transfer_syntax()),
            digest(dataset, transfer_syntax),
        ) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        };
        if same {
            tracing::info!(
                stored_transfer_syntax = sop::trim_uid(meta.transfer_syntax()),
                transfer_syntax = sop::trim_uid(transfer_syntax),
                "a stored instance was sent again in other bytes with the same content: a duplicate"
            );
        }
        Ok(same)
    }

    /// The answer for an instance whose SOP Instance UID is already stored: the stored one
    /// when its content is the same (`same`: the same bytes, or the same elements encoded
    /// otherwise), a conflict otherwise.
    fn as_duplicate(
        &self,
        stored: Stored,
        existing: Existing,
        same: bool,
    ) -> Result<Stored, StoreError> {
        // This node's own result object sent back in by a PACS that re-encodes what it
        // forwards (dcmtk rewrites sequences with explicit lengths): the same object in
        // other bytes, acknowledged as a duplicate, the node's copy kept (refused as a
        // conflict, every echoed result got a failure status and a quarantine file).
        if !same && existing.calling_ae != OWN_RESULTS_SENDER {
            return Err(StoreError::Conflict);
        }
        Ok(Stored {
            path: indexed_path(&self.root, &existing.path, false)
                .unwrap_or_else(|| nowhere(&self.root)),
            duplicate: true,
            ..stored
        })
    }

    /// Places a complete temporary file ([`Spool::place`]), queues it for the next group
    /// commit of index rows and waits for its outcome. The first caller that finds no
    /// commit running commits the whole queue.
    fn commit(&self, placement: Placement) -> Result<Stored, StoreError> {
        let placed = self.place(placement)?;
        let mut queue = self.commits.lock().unwrap_or_else(|p| p.into_inner());
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.waiting.push((ticket, placed));
        loop {
            if let Some(result) = queue.done.remove(&ticket) {
                return result;
            }
            if queue.committing {
                queue = self
                    .committed
                    .wait(queue)
                    .unwrap_or_else(|p| p.into_inner());
                continue;
            }
            queue.committing = true;
            let batch = std::mem::take(&mut queue.waiting);
            drop(queue);
            let mut guard = CommitGuard {
                spool: self,
                tickets: batch.iter().map(|(t, _)| *t).collect(),
                results: Vec::new(),
            };
            guard.results = self.commit_group(batch);
            drop(guard);
            queue = self.commits.lock().unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Gives a complete temporary file its final name and makes both durable: the file is
    /// linked under its name first, then its own fsync and its directory's (by the
    /// directory syncer, shared with the stores of the moment) run at the same time, so
    /// that one device flush covers both instead of one after the other. Until both are
    /// done nothing is indexed or answered; a crash in between can leave a named file whose
    /// data is not all on disk, which the next open recognises by the content hash in its
    /// name (see [`Spool::index_orphan`]).
    fn place(&self, placement: Placement) -> Result<Placed, StoreError> {
        let Placement {
            tmp,
            relative,
            stored,
        } = placement;
        let dir = stored
            .path
            .parent()
            .expect("instance paths have a parent")
            .to_owned();
        if let Err(e) = create_dirs_durably(&self.root.join(INSTANCES_DIR), &dir) {
            tmp.remove();
            return Err(io_error("create directory", e));
        }
        // A link, not a rename: it never replaces a file. The name holds the SOP Instance
        // UID and the content hash, so a name taken already holds these very bytes.
        let linked = match tmp.link(&stored.path) {
            Ok(linked) => linked,
            // A file system without hard links (FAT and the like; its temporary files are
            // named, see `anonymous_temps_work`): the old order, data durable before it
            // gets its name.
            Err(e)
                if tmp.path.is_some()
                    && (e.kind() == std::io::ErrorKind::PermissionDenied
                        || e.kind() == std::io::ErrorKind::Unsupported) =>
            {
                return self.place_serially(tmp, relative, stored, dir);
            }
            Err(e) => {
                tmp.remove();
                return Err(io_error("rename", e));
            }
        };
        let file = tmp.into_file();
        let ticket = self.dirs.request(dir);
        let file_synced = if linked {
            file.sync_all()
        } else {
            File::open(&stored.path).and_then(|f| f.sync_all())
        };
        drop(file);
        let dir_synced = self.dirs.wait(ticket);
        // On failure the file stays where it is, without a row (another store of the same
        // bytes may have found it there): the next open checks it against its name's hash.
        if let Err(e) = file_synced.and(dir_synced) {
            return Err(io_error("sync", e));
        }
        Ok(Placed {
            relative,
            stored,
            linked,
        })
    }

    /// [`Spool::place`] where the file system cannot link: fsync the file, rename it into
    /// place (replacing at worst a file with the same name, so the same bytes, already
    /// durable too), then fsync the folder: two flushes one after the other.
    fn place_serially(
        &self,
        tmp: TempFile,
        relative: PathBuf,
        stored: Stored,
        dir: PathBuf,
    ) -> Result<Placed, StoreError> {
        let TempFile { file, path } = tmp;
        let path = path.expect("only named temporary files are placed serially");
        let renamed = file
            .sync_all()
            .and_then(|()| fs::rename(&path, &stored.path));
        drop(file);
        if let Err(e) = renamed {
            let _ = fs::remove_file(&path);
            return Err(io_error("rename", e));
        }
        let ticket = self.dirs.request(dir);
        self.dirs.wait(ticket).map_err(|e| io_error("sync", e))?;
        Ok(Placed {
            relative,
            stored,
            linked: true,
        })
    }

    /// One group commit: one index transaction for the rows of the durable files.
    fn commit_group(&self, batch: Vec<(u64, Placed)>) -> Vec<(u64, Result<Stored, StoreError>)> {
        let mut results = Vec::with_capacity(batch.len());
        metrics::histogram!("nightingale_dicom_spool_group_size").record(batch.len() as f64);

        // What the index already holds, looked up once for the group.
        let mut known: HashMap<String, Existing> = HashMap::new();
        {
            let db = self.index.lock().unwrap_or_else(|p| p.into_inner());
            for (_, p) in &batch {
                let uid = &p.stored.sop_instance_uid;
                if known.contains_key(uid) {
                    continue;
                }
                match indexed(&db, uid) {
                    Ok(Some(existing)) => {
                        known.insert(uid.clone(), existing);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        drop(db);
                        // The files stay (complete and durable): the next open indexes them.
                        for (ticket, _) in batch {
                            results.push((ticket, Err(index_failure("lookup", &e))));
                        }
                        return results;
                    }
                }
            }
        }

        // The first of equal UIDs wins; a conflicting copy placed meanwhile is removed.
        let mut durable = Vec::with_capacity(batch.len());
        for (ticket, p) in batch {
            if let Some(existing) = known.get(&p.stored.sop_instance_uid) {
                if p.linked && Path::new(&existing.path) != p.relative {
                    let _ = fs::remove_file(&p.stored.path);
                }
                // Two copies of one instance in the same group: compared on their bytes only
                // (the index is held; the stored file is not read here). Another encoding of
                // the same instance is then a conflict, and the sender's retry a duplicate.
                let same = existing.sha256 == p.stored.sha256;
                results.push((ticket, self.as_duplicate(p.stored, existing.clone(), same)));
                continue;
            }
            known.insert(
                p.stored.sop_instance_uid.clone(),
                Existing {
                    sha256: p.stored.sha256.clone(),
                    path: p.relative.to_string_lossy().into_owned(),
                    calling_ae: p.stored.calling_ae.clone(),
                    size: p.stored.size,
                },
            );
            durable.push((ticket, p));
        }

        // One transaction for the group's rows.
        let mut db = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let committed = (|| -> Result<Vec<Option<StoreError>>, rusqlite::Error> {
            let tx = db.transaction()?;
            let mut row_errors = Vec::with_capacity(durable.len());
            for (_, p) in &durable {
                row_errors.push(insert_row(&tx, &p.stored, &p.relative).err());
            }
            tx.commit()?;
            Ok(row_errors)
        })();
        drop(db);
        match committed {
            Ok(row_errors) => {
                for ((ticket, p), error) in durable.into_iter().zip(row_errors) {
                    results.push((
                        ticket,
                        match error {
                            None => Ok(p.stored.clone()),
                            Some(e) => Err(e),
                        },
                    ));
                }
            }
            Err(e) => {
                for (ticket, _) in durable {
                    results.push((ticket, Err(index_failure("commit", &e))));
                }
            }
        }
        results
    }

    /// Every indexed instance, ordered by study, series and instance UID.
    pub fn instances(&self) -> Result<Vec<Stored>, StoreError> {
        let db = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = db.prepare(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances
             ORDER BY study_uid, series_uid, sop_instance_uid"
        ))?;
        let rows = stmt.query_map([], |r| self.stored_row(r))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// An index row selected with [`INSTANCE_COLUMNS`], as a [`Stored`].
    pub(crate) fn stored_row(&self, r: &rusqlite::Row<'_>) -> rusqlite::Result<Stored> {
        Ok(Stored {
            sop_instance_uid: r.get(0)?,
            sop_class_uid: r.get(1)?,
            study_uid: r.get(2)?,
            series_uid: r.get(3)?,
            transfer_syntax: r.get(4)?,
            calling_ae: r.get(5)?,
            received_at_ms: r.get(6)?,
            size: r.get::<_, i64>(7)?.max(0) as u64,
            sha256: r.get(8)?,
            path: {
                let relative: String = r.get(9)?;
                indexed_path(&self.root, &relative, false).unwrap_or_else(|| nowhere(&self.root))
            },
            duplicate: false,
            attributes: Attributes::from_row(r, 10)?,
        })
    }

    /// Free bytes on the spool's file system, for the caller's requirement check.
    pub fn free_bytes(&self) -> Result<u64, StoreError> {
        free_bytes(&self.root).map_err(|e| io_error("statvfs", e))
    }

    fn check_space(&self, size: u64) -> Result<(), StoreError> {
        let free = self.free_bytes()?;
        let needed = size.saturating_add(self.options.min_free_bytes);
        if free < needed {
            return Err(StoreError::OutOfResources {
                free_bytes: free,
                needed_bytes: needed,
            });
        }
        Ok(())
    }

    /// A new temporary file in `tmp/` (see [`TempFile`]).
    fn temp_file(&self, direct: bool) -> std::io::Result<TempFile> {
        let dir = self.root.join(TMP_DIR);
        TempFile::create(&dir, self.anonymous_temps, direct, || {
            let n = self.seq.fetch_add(1, Ordering::Relaxed);
            dir.join(format!("{}-{}-{n}.part", std::process::id(), now_ms()))
        })
    }

    /// Keeps a refused object with its reason, if space allows. Best effort: a failure to
    /// quarantine is logged and does not change the answer to the sender.
    fn quarantine(&self, bytes: &[u8], incoming: &Incoming<'_>, reason: &StoreError) {
        if self.check_space(bytes.len() as u64 + 1024).is_err() {
            tracing::warn!(
                reason = reason.kind(),
                "refused object not quarantined: spool below its high-water mark"
            );
            return;
        }
        let sha = hex::encode(Sha256::digest(bytes));
        // Unique even for the same bytes refused twice within a millisecond.
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{}-{}-{n}", now_ms(), &sha[..16], std::process::id());
        let dir = self.quarantine_dir();
        let note = format!(
            "reason: {}\nkind: {}\ntransfer_syntax: {}\ncalling_ae: {}\nreceived_at_ms: {}\nsize: {}\nsha256: {}\n",
            reason,
            reason.kind(),
            sop::trim_uid(incoming.transfer_syntax),
            incoming.calling_ae.trim(),
            now_ms(),
            bytes.len(),
            sha
        );
        let result = (|| -> std::io::Result<()> {
            write_durably(&dir.join(format!("{id}.reason")), note.as_bytes())?;
            write_durably(&dir.join(format!("{id}.quarantined")), bytes)?;
            sync_dir(&dir)
        })();
        match result {
            Ok(()) => tracing::warn!(reason = reason.kind(), id, "object quarantined"),
            Err(e) => {
                tracing::error!(reason = reason.kind(), error = %e, "cannot quarantine object")
            }
        }
    }

    /// Brings the index and the files into agreement (see the module documentation).
    fn reconcile(&self) -> Result<Recovery, SpoolError> {
        let mut recovery = Recovery::default();
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SpoolError::Io { path, source }
        };
        let tmp = self.root.join(TMP_DIR);
        for entry in fs::read_dir(&tmp).map_err(io(&tmp))? {
            let path = entry.map_err(io(&tmp))?.path();
            if path.is_file() {
                fs::remove_file(&path).map_err(io(&path))?;
                recovery.temp_files_deleted += 1;
            }
        }

        let db = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let rows: Vec<(String, String)> = {
            let mut stmt = db.prepare("SELECT sop_instance_uid, path FROM instances")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        let mut indexed = std::collections::HashSet::new();
        for (uid, relative) in rows {
            if self.root.join(&relative).is_file() {
                indexed.insert(relative);
            } else {
                db.execute("DELETE FROM instances WHERE sop_instance_uid = ?1", [&uid])?;
                recovery.rows_dropped += 1;
            }
        }

        let mut files = Vec::new();
        collect_dcm(&self.root.join(INSTANCES_DIR), &mut files).map_err(io(&self.root))?;
        for path in files {
            let relative = match path.strip_prefix(&self.root) {
                Ok(r) => r.to_string_lossy().into_owned(),
                Err(_) => continue,
            };
            if indexed.contains(&relative) {
                continue;
            }
            match self.index_orphan(&db, &path, &relative) {
                Ok(()) => recovery.files_indexed += 1,
                Err(reason) => {
                    tracing::warn!(
                        reason = reason.kind(),
                        "spool file without index row quarantined"
                    );
                    let name = format!(
                        "{}-recovered-{}",
                        now_ms(),
                        self.seq.fetch_add(1, Ordering::Relaxed)
                    );
                    let dir = self.quarantine_dir();
                    let to = dir.join(format!("{name}.quarantined"));
                    fs::rename(&path, &to).map_err(io(&path))?;
                    // A moved file keeps its mode: quarantined objects are the owner's alone.
                    narrow(&to, 0o600).map_err(io(&to))?;
                    let note = format!(
                        "reason: {reason}\nkind: {}\nrecovered_from: {relative}\n",
                        reason.kind()
                    );
                    write_durably(&dir.join(format!("{name}.reason")), note.as_bytes())
                        .map_err(io(&dir))?;
                    sync_dir(&dir).map_err(io(&dir))?;
                    recovery.files_quarantined += 1;
                }
            }
        }
        recovery.rows_reindexed = self.reindex_attributes(&db)?;
        if recovery != Recovery::default() {
            tracing::info!(?recovery, "spool reconciled");
        }
        Ok(recovery)
    }

    /// Fills the attribute columns of rows indexed by an older version from their files
    /// (once: a file that cannot be read keeps empty attributes and is not read again;
    /// `spool check` reports files that do not match their row).
    fn reindex_attributes(&self, db: &Connection) -> Result<usize, SpoolError> {
        let rows: Vec<(String, String)> = {
            let mut stmt = db.prepare(
                "SELECT sop_instance_uid, path FROM instances WHERE attributes_version < ?1",
            )?;
            stmt.query_map([ATTRIBUTES_VERSION], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        if rows.is_empty() {
            return Ok(0);
        }
        let started = std::time::Instant::now();
        tracing::info!(
            instances = rows.len(),
            "indexing the attributes of instances stored by an older version"
        );
        let mut unreadable = 0usize;
        for chunk in rows.chunks(1000) {
            let tx = db.unchecked_transaction()?;
            for (uid, relative) in chunk {
                let attributes = match read_attributes(&self.root.join(relative)) {
                    Ok(a) => a,
                    Err(e) => {
                        unreadable += 1;
                        tracing::warn!(
                            reason = e.kind(),
                            "spool file unreadable: its attributes stay empty"
                        );
                        Attributes::default()
                    }
                };
                tx.execute(
                    "UPDATE instances SET modality = ?2, study_date = ?3, study_time = ?4,
                        series_number = ?5, instance_number = ?6, rows = ?7, columns = ?8,
                        number_of_frames = ?9, attributes_version = ?10
                     WHERE sop_instance_uid = ?1",
                    params![
                        uid,
                        attributes.modality,
                        attributes.study_date,
                        attributes.study_time,
                        attributes.series_number,
                        attributes.instance_number,
                        attributes.rows,
                        attributes.columns,
                        attributes.number_of_frames,
                        ATTRIBUTES_VERSION,
                    ],
                )?;
            }
            tx.commit()?;
        }
        tracing::info!(
            instances = rows.len(),
            unreadable,
            ms = started.elapsed().as_millis() as u64,
            "attributes indexed"
        );
        Ok(rows.len())
    }

    /// Indexes a `.dcm` file found without a row (a store interrupted after its rename).
    pub(crate) fn index_orphan(
        &self,
        db: &Connection,
        path: &Path,
        relative: &str,
    ) -> Result<(), StoreError> {
        let bytes = fs::read(path).map_err(|e| io_error("read", e))?;
        let (meta, dataset) = part10(&bytes)?;
        // Named before its data was durable: a crash may have cut it (it was never
        // acknowledged). The hash in its name tells.
        let sha256 = hex::encode(Sha256::digest(dataset));
        if let Some(expected) = name_hash(path)
            && !sha256.starts_with(&expected.to_ascii_lowercase())
        {
            return Err(StoreError::Torn);
        }
        let ae = meta
            .source_application_entity_title()
            .unwrap_or("")
            .trim()
            .to_owned();
        let facts = facts_from(&meta, dataset)?;
        let taken: Option<String> = db
            .query_row(
                "SELECT path FROM instances WHERE sop_instance_uid = ?1",
                [&facts.sop_instance_uid],
                |r| r.get(0),
            )
            .optional()?;
        if taken.is_some() {
            return Err(StoreError::Conflict);
        }
        let received_at_ms = fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as i64)
            .unwrap_or_else(now_ms);
        let stored = Stored {
            sop_instance_uid: facts.sop_instance_uid,
            sop_class_uid: facts.sop_class_uid,
            study_uid: facts.study_uid,
            series_uid: facts.series_uid,
            transfer_syntax: facts.transfer_syntax,
            calling_ae: ae,
            received_at_ms,
            size: dataset.len() as u64,
            sha256,
            path: path.to_owned(),
            duplicate: false,
            attributes: facts.attributes,
        };
        insert_row(db, &stored, Path::new(relative))
    }
}

/// What the spool's index says of a stored file, derived from the file as a store derives
/// it: [`crate::maintenance`]'s check compares each row with its file's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowFacts {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub study_uid: String,
    pub series_uid: String,
    pub transfer_syntax: String,
    pub attributes: Attributes,
}

/// The [`RowFacts`] of a stored file's bytes.
pub(crate) fn facts_of(bytes: &[u8]) -> Result<RowFacts, StoreError> {
    let (meta, dataset) = part10(bytes)?;
    facts_from(&meta, dataset)
}

/// The [`RowFacts`] of a stored file's meta group and data set.
fn facts_from(meta: &FileMetaTable, dataset: &[u8]) -> Result<RowFacts, StoreError> {
    let ts = sop::trim_uid(meta.transfer_syntax()).to_owned();
    let identity = validate(
        dataset,
        &Incoming {
            transfer_syntax: &ts,
            calling_ae: "",
            expected_sop_class: None,
            expected_sop_instance: None,
        },
    )?;
    Ok(RowFacts {
        sop_instance_uid: identity.sop_instance_uid,
        sop_class_uid: identity.sop_class_uid,
        study_uid: identity.study_uid,
        series_uid: identity.series_uid,
        transfer_syntax: ts,
        attributes: identity.attributes,
    })
}

/// The largest stored instance (and re-send) [`Spool::same_content`] compares.
const MAX_COMPARED_BYTES: u64 = 256 << 20;

/// Content comparisons running at once ([`Spool::same_content`]).
const MAX_COMPARING: usize = 2;

static COMPARING: Mutex<usize> = Mutex::new(0);
static COMPARED: Condvar = Condvar::new();

/// A place among the [`MAX_COMPARING`] comparisons, given back when dropped.
struct ComparePlace;

impl ComparePlace {
    /// A place, waiting at most `wait` for one.
    fn take(wait: std::time::Duration) -> Option<ComparePlace> {
        let deadline = std::time::Instant::now() + wait;
        let mut running = COMPARING.lock().unwrap_or_else(|p| p.into_inner());
        while *running >= MAX_COMPARING {
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            running = COMPARED
                .wait_timeout(running, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *running += 1;
        Some(ComparePlace)
    }
}

impl Drop for ComparePlace {
    fn drop(&mut self) {
        let mut running = COMPARING.lock().unwrap_or_else(|p| p.into_inner());
        *running -= 1;
        COMPARED.notify_one();
    }
}

/// A regular file's bytes, at most `max` of them (an error past that).
fn read_at_most(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let file = fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "too large",
        ));
    }
    Ok(bytes)
}

/// A file the spool wrote: its meta group and its data set.
fn part10(bytes: &[u8]) -> Result<(FileMetaTable, &[u8]), StoreError> {
    let not_part10 = || StoreError::CannotParse {
        transfer_syntax: String::new(),
        detail: "not a DICOM Part 10 file".into(),
    };
    // Our files start with (0002,0000) UL, the meta group's length.
    if bytes.len() < META_OFFSET + 12
        || &bytes[128..132] != b"DICM"
        || bytes[132..136] != [0x02, 0x00, 0x00, 0x00]
        || &bytes[136..138] != b"UL"
    {
        return Err(not_part10());
    }
    let (meta, _) =
        crate::meta::read_file_meta(&bytes[128..]).map_err(|e| StoreError::CannotParse {
            transfer_syntax: String::new(),
            detail: e.to_string(),
        })?;
    // (0002,0000) UL: tag 4 bytes, VR 2, length 2, value 4.
    let group_len = u32::from_le_bytes(bytes[140..144].try_into().expect("4 bytes")) as usize;
    let start = (META_OFFSET + 12).saturating_add(group_len);
    let dataset = bytes.get(start..).ok_or_else(not_part10)?;
    Ok((meta, dataset))
}

/// The [`Attributes`] of a stored file.
fn read_attributes(path: &Path) -> Result<Attributes, StoreError> {
    let bytes = fs::read(path).map_err(|e| io_error("read", e))?;
    let (meta, dataset) = part10(&bytes)?;
    let ts = sop::trim_uid(meta.transfer_syntax()).to_owned();
    let encoding = crate::structure::Encoding::of(&ts);
    let found = crate::structure::walk(dataset, encoding, &attributes::TAGS)?;
    Ok(Attributes::from_found(&found, encoding.big_endian))
}

/// The version of [`Attributes`] a row was indexed with: a row below it (indexed before
/// the attribute columns, or with fewer of them) is read again from its file at open.
pub(crate) const ATTRIBUTES_VERSION: i64 = 1;

/// The attribute columns (added after the first release: an older index gets them, empty,
/// with `attributes_version` 0 so that [`Spool::open`] fills them from the files).
const ATTRIBUTE_COLUMNS: [(&str, &str); 9] = [
    ("modality", "TEXT"),
    ("study_date", "TEXT"),
    ("study_time", "TEXT"),
    ("series_number", "INTEGER"),
    ("instance_number", "INTEGER"),
    ("rows", "INTEGER"),
    ("columns", "INTEGER"),
    ("number_of_frames", "INTEGER"),
    ("attributes_version", "INTEGER NOT NULL DEFAULT 0"),
];

fn add_attribute_columns(db: &Connection) -> rusqlite::Result<()> {
    let existing: std::collections::HashSet<String> = db
        .prepare("SELECT name FROM pragma_table_info('instances')")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for (name, kind) in ATTRIBUTE_COLUMNS {
        if !existing.contains(name) {
            db.execute_batch(&format!("ALTER TABLE instances ADD COLUMN {name} {kind}"))?;
        }
    }
    Ok(())
}

/// Gives every index row an arrival number, `seq`, that is never used twice: the pipeline
/// reads new rows after a cursor (`WHERE seq > ?`). The table's rowid cannot be that number:
/// `instances` has a TEXT primary key without AUTOINCREMENT, so SQLite gives a new row
/// max(rowid) + 1 and, once the newest rows are deleted (a purge, a repair), hands their
/// rowids out again, to rows a cursor already passed (they were never processed).
///
/// `instance_seq.high` is the highest number ever given; a trigger gives each inserted row
/// the next one, whatever inserts it. An index from before the column (migrated here, in
/// one transaction) numbers its rows by their rowids, so a cursor kept as a rowid stays
/// valid; one above `high` (rowids reused before the migration, or an index replaced) is
/// brought back to `high` by [`Spool::series_touched_since`].
/// The purges kept until the server audits them ([`Spool::record_purge`]): tables a binary
/// from before them ignores.
fn add_purge_log(db: &Connection) -> rusqlite::Result<()> {
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS purge_log (
             id INTEGER PRIMARY KEY,
             at_ms INTEGER NOT NULL,
             cutoff_ms INTEGER NOT NULL,
             by TEXT NOT NULL,
             instances INTEGER NOT NULL,
             bytes INTEGER NOT NULL,
             quarantine_files INTEGER NOT NULL,
             also TEXT NOT NULL,
             audited INTEGER NOT NULL DEFAULT 0
         );
         CREATE TABLE IF NOT EXISTS purge_log_studies (
             purge_id INTEGER NOT NULL,
             study_sha256 TEXT NOT NULL,
             instances INTEGER NOT NULL
         );
         CREATE INDEX IF NOT EXISTS purge_log_studies_purge ON purge_log_studies (purge_id);",
    )
}

fn add_arrival_sequence(db: &Connection) -> rusqlite::Result<()> {
    // Under the write lock: a second process opening the same index (`spool purge` beside
    // a running server) sees the column or adds it, never both.
    let tx = rusqlite::Transaction::new_unchecked(db, rusqlite::TransactionBehavior::Immediate)?;
    let has_seq = tx
        .prepare("SELECT 1 FROM pragma_table_info('instances') WHERE name = 'seq'")?
        .exists([])?;
    if !has_seq {
        tx.execute_batch(
            "ALTER TABLE instances ADD COLUMN seq INTEGER;
             UPDATE instances SET seq = rowid;",
        )?;
    }
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS instance_seq (
             id INTEGER PRIMARY KEY CHECK (id = 1),
             high INTEGER NOT NULL
         );
         INSERT OR IGNORE INTO instance_seq (id, high)
             SELECT 1, coalesce(max(seq), 0) FROM instances;
         CREATE UNIQUE INDEX IF NOT EXISTS instances_seq ON instances (seq);
         CREATE TRIGGER IF NOT EXISTS instances_next_seq AFTER INSERT ON instances
         BEGIN
             UPDATE instance_seq SET high = high + 1 WHERE id = 1;
             UPDATE instances SET seq = (SELECT high FROM instance_seq WHERE id = 1)
                 WHERE rowid = NEW.rowid;
         END;",
    )?;
    tx.commit()
}

/// The index's sha256 and path for a SOP Instance UID, if it is stored.
fn indexed(db: &Connection, sop_instance_uid: &str) -> Result<Option<Existing>, StoreError> {
    Ok(db
        .prepare_cached(
            "SELECT sha256, path, calling_ae, size FROM instances WHERE sop_instance_uid = ?1",
        )?
        .query_row([sop_instance_uid], |r| {
            Ok(Existing {
                sha256: r.get(0)?,
                path: r.get(1)?,
                calling_ae: r.get(2)?,
                size: r.get::<_, i64>(3)?.max(0) as u64,
            })
        })
        .optional()?)
}

/// An index error repeated for each store of a group (the library error is not `Clone`).
fn index_failure(op: &'static str, e: &dyn std::fmt::Display) -> StoreError {
    StoreError::Io {
        op,
        source: std::io::Error::other(format!("spool index: {e}")),
    }
}

fn insert_row(db: &Connection, s: &Stored, relative: &Path) -> Result<(), StoreError> {
    db.prepare_cached(
        "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid,
            transfer_syntax, calling_ae, received_at_ms, size, sha256, path, modality,
            study_date, study_time, series_number, instance_number, rows, columns,
            number_of_frames, attributes_version)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
            ?18, ?19)",
    )?
    .execute(params![
        s.sop_instance_uid,
        s.sop_class_uid,
        s.study_uid,
        s.series_uid,
        s.transfer_syntax,
        s.calling_ae,
        s.received_at_ms,
        s.size as i64,
        s.sha256,
        relative.to_string_lossy(),
        s.attributes.modality,
        s.attributes.study_date,
        s.attributes.study_time,
        s.attributes.series_number,
        s.attributes.instance_number,
        s.attributes.rows,
        s.attributes.columns,
        s.attributes.number_of_frames,
        ATTRIBUTES_VERSION,
    ])?;
    Ok(())
}

/// The top-level elements [`validate`] reads: the four UIDs, the pixel data tags, then the
/// indexed [`attributes::TAGS`].
const IDENTITY_TAGS: [(u16, u16); 7 + attributes::TAGS.len()] = {
    let mut tags = [(0, 0); 7 + attributes::TAGS.len()];
    let head = [
        (0x0008, 0x0016), // SOP Class UID
        (0x0008, 0x0018), // SOP Instance UID
        (0x0020, 0x000D), // Study Instance UID
        (0x0020, 0x000E), // Series Instance UID
        (0x7FE0, 0x0010), // Pixel Data
        (0x7FE0, 0x0008), // Float Pixel Data
        (0x7FE0, 0x0009), // Double Float Pixel Data
    ];
    let mut i = 0;
    while i < tags.len() {
        tags[i] = if i < 7 {
            head[i]
        } else {
            attributes::TAGS[i - 7]
        };
        i += 1;
    }
    tags
};

/// Checks the data set's structure and takes what the spool needs from it. One walk over
/// the element headers does both: the data set is not parsed into an object (which would
/// copy its pixel data), since the spool stores it as received.
fn validate(dataset: &[u8], incoming: &Incoming<'_>) -> Result<Identity, StoreError> {
    let ts_uid = sop::trim_uid(incoming.transfer_syntax);
    TransferSyntaxRegistry
        .get(ts_uid)
        .filter(|ts| !ts.is_unsupported())
        .ok_or_else(|| StoreError::UnknownTransferSyntax {
            uid: ts_uid.to_owned(),
        })?;
    // dicom-parser takes a data set cut inside a header as ended: the strict walk does not.
    let encoding = crate::structure::Encoding::of(ts_uid);
    let found = crate::structure::walk(dataset, encoding, &IDENTITY_TAGS)?;
    let uid = |i: usize, name: &'static str| -> Result<String, StoreError> {
        let value = match &found[i] {
            // A UID is text whatever its VR (some converters send UIDs as UN).
            Some(crate::structure::Found::Value(bytes)) => {
                let text =
                    std::str::from_utf8(bytes).map_err(|_| StoreError::InvalidUid { name })?;
                sop::trim_uid(text).to_owned()
            }
            Some(crate::structure::Found::Long) => return Err(StoreError::InvalidUid { name }),
            None => String::new(),
        };
        if value.is_empty() {
            return Err(StoreError::MissingAttribute { name });
        }
        // Real senders sometimes use UIDs that break PS3.5's rules (letters, leading zeros):
        // those are kept (their path is hashed); only what cannot be one value is refused.
        if !sop::is_acceptable_uid(&value) {
            return Err(StoreError::InvalidUid { name });
        }
        Ok(value)
    };
    let identity = Identity {
        sop_class_uid: uid(0, "SOPClassUID")?,
        sop_instance_uid: uid(1, "SOPInstanceUID")?,
        study_uid: uid(2, "StudyInstanceUID")?,
        series_uid: uid(3, "SeriesInstanceUID")?,
        attributes: Attributes::from_found(&found[7..], encoding.big_endian),
    };
    if let Some(expected) = incoming.expected_sop_class
        && sop::trim_uid(expected) != identity.sop_class_uid
    {
        return Err(StoreError::Mismatch {
            name: "SOPClassUID",
        });
    }
    if let Some(expected) = incoming.expected_sop_instance
        && sop::trim_uid(expected) != identity.sop_instance_uid
    {
        return Err(StoreError::Mismatch {
            name: "SOPInstanceUID",
        });
    }
    if sop::is_image_class(&identity.sop_class_uid) && found[4..7].iter().all(Option::is_none) {
        return Err(StoreError::MissingPixelData);
    }
    Ok(identity)
}

/// Hex digits of the data set's SHA-256 in a stored file's name.
const NAME_HASH_LEN: usize = 16;

/// `instances/<study>/<series>/<sop>_<h>.dcm`, `<h>` the first [`NAME_HASH_LEN`] hex digits
/// of the data set's SHA-256 (`sha256`, hex). A UID that follows PS3.5 (digits and dots) is
/// a safe path component as it is; any other is replaced by `x` and a hash of it.
fn instance_path(identity: &Identity, sha256: &str) -> PathBuf {
    fn component(uid: &str) -> String {
        if sop::is_valid_uid(uid) {
            uid.to_owned()
        } else {
            format!("x{}", &hex::encode(Sha256::digest(uid.as_bytes()))[..32])
        }
    }
    Path::new(INSTANCES_DIR)
        .join(component(&identity.study_uid))
        .join(component(&identity.series_uid))
        .join(format!(
            "{}_{}.dcm",
            component(&identity.sop_instance_uid),
            &sha256[..NAME_HASH_LEN]
        ))
}

/// An index row's path as a path to read or delete: only one the spool could have written
/// ([`instance_path`]'s shape: relative, under `instances/`, plain names, a `.dcm` file),
/// reached through no symbolic link below `root` when `no_links`; `None` for any other (an
/// index edited by hand or by another program). `spool purge` deleted, `spool check --repair`
/// moved and WADO-RS served files outside the spool named by such rows.
pub(crate) fn indexed_path(root: &Path, relative: &str, no_links: bool) -> Option<PathBuf> {
    use std::path::Component;
    let rel = Path::new(relative);
    let mut components = rel.components();
    if components.next() != Some(Component::Normal(INSTANCES_DIR.as_ref())) {
        return None;
    }
    let plain = rel.components().all(|c| match c {
        Component::Normal(name) => name.to_str().is_some_and(|n| !n.contains('\0')),
        _ => false,
    });
    if !plain || rel.components().count() < 2 || rel.extension() != Some("dcm".as_ref()) {
        return None;
    }
    let path = root.join(rel);
    if no_links {
        let mut at = root.to_path_buf();
        for c in rel.components() {
            at.push(c);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() => return None,
                Ok(_) => {}
                // What is not there is not a link: the caller finds the file missing.
                Err(_) => break,
            }
        }
    }
    Some(path)
}

/// Where a row with a path the spool never writes points: a name under `instances/` that
/// no store makes, so that reading it finds nothing.
pub(crate) fn nowhere(root: &Path) -> PathBuf {
    root.join(INSTANCES_DIR).join("invalid-index-path")
}

/// The content hash a stored file's name carries (see [`instance_path`]), if it has one
/// (files stored before the name carried it do not).
fn name_hash(path: &Path) -> Option<&str> {
    let stem = path.file_stem()?.to_str()?;
    let (_, hash) = stem.rsplit_once('_')?;
    (hash.len() == NAME_HASH_LEN && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hash)
}

/// Appends what precedes the data set in a Part 10 file: the preamble, "DICM", the file meta
/// group.
fn push_part10_head(
    out: &mut Vec<u8>,
    meta: &FileMetaTable,
) -> Result<(), dicom_object::meta::Error> {
    out.extend_from_slice(&[0u8; 128]);
    out.extend_from_slice(b"DICM");
    meta.write(out)
}

/// Writes a Part 10 file into `file` (not fsynced: the commit does that).
fn write_part10(file: &mut File, meta: &FileMetaTable, dataset: &[u8]) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    push_part10_head(&mut head, meta).map_err(std::io::Error::other)?;
    file.write_all(&head)?;
    file.write_all(dataset)
}

/// Writes `bytes` to a new (or truncated) file at `path`, readable by its owner alone (a
/// quarantined object is a whole data set: it was created 0644, a red-team finding), and
/// fsyncs it.
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // A file that was there keeps its mode through `open`: narrowed here too.
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Creates `dir` and the folders above it that are missing, each its owner's alone (0700);
/// folders already there keep their mode.
fn private_dirs(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Takes every permission of group and others from `path` (a folder or a regular file, not
/// a link; one not there is left alone) beyond `mode`.
///
/// A folder shared by design is refused, not changed: one with the sticky bit, or that
/// every user may write (`/tmp` given as the data folder was made 0700 for everyone: a
/// review's finding). A folder's set-group-ID bit is kept, and one the server may not
/// change (another user's, e.g. root's and group-writable for the server's group) is left
/// as it is, with a warning.
pub fn narrow(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let now = meta.permissions().mode() & 0o7777;
    if meta.is_dir() {
        if now & 0o1002 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} is a shared folder (mode {now:04o}: sticky, or writable by every user): patient data needs a folder of the server's own",
                    path.display()
                ),
            ));
        }
        if now & 0o777 & !mode != 0 {
            let narrowed = (now & mode) | (now & 0o2000);
            match fs::set_permissions(path, fs::Permissions::from_mode(narrowed)) {
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    tracing::warn!(
                        folder = %path.display(),
                        mode = %format!("{now:04o}"),
                        "a folder holding patient data is open to others and not the server's to narrow: left as it is"
                    );
                }
                r => r?,
            }
        }
    } else if meta.is_file() && now & !mode != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(now & mode))?;
    }
    Ok(())
}

/// An SQLite database at `path` (made if missing) and its WAL and shared-memory files,
/// their owner's alone (0600): the stores beside the spool (the pipeline's results, CDS
/// feedback) name studies and patients' digests too.
pub fn private_database(path: &Path) -> std::io::Result<()> {
    private_file(path)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    narrow(path, 0o600)?;
    for suffix in ["-wal", "-shm"] {
        narrow(&path.with_file_name(format!("{name}{suffix}")), 0o600)?;
    }
    Ok(())
}

/// Creates `path` empty, its owner's alone (0600), unless it is there.
fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` (under `base`, which exists) and fsyncs the parent of each folder created.
fn create_dirs_durably(base: &Path, dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.is_dir() && at != base {
        missing.push(at.to_owned());
        at = match at.parent() {
            Some(p) => p,
            None => break,
        };
    }
    for d in missing.iter().rev() {
        let created = {
            use std::os::unix::fs::DirBuilderExt as _;
            fs::DirBuilder::new().mode(0o700).create(d)
        };
        match created {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if let Some(parent) = d.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// The `.dcm` regular files under `dir`, at any depth (links are not followed).
pub(crate) fn collect_dcm(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    collect_entries(dir, out, &mut Vec::new(), &mut Vec::new())
}

/// The `.dcm` regular files and the symbolic links (of any name) under `dir`, at any depth
/// (links to folders are not followed), and in `other` everything else that is not a folder
/// (a file not named `.dcm`, a FIFO, a socket).
pub(crate) fn collect_entries(
    dir: &Path,
    files: &mut Vec<PathBuf>,
    links: &mut Vec<PathBuf>,
    other: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_symlink() {
            links.push(path);
        } else if kind.is_dir() {
            collect_entries(&path, files, links, other)?;
        } else if kind.is_file() && path.extension().is_some_and(|e| e == "dcm") {
            files.push(path);
        } else {
            other.push(path);
        }
    }
    Ok(())
}

fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

fn io_error(op: &'static str, source: std::io::Error) -> StoreError {
    if source.kind() == std::io::ErrorKind::StorageFull {
        return StoreError::DiskFull { op };
    }
    StoreError::Io { op, source }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder is narrowed to its owner with its set-group-ID bit kept; a shared one
    /// (sticky, or writable by all: `/tmp` given as the data folder) is refused unchanged;
    /// a file is narrowed.
    #[test]
    fn folders_are_narrowed_and_shared_ones_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let set = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
        let own = dir.path().join("own");
        fs::create_dir(&own).unwrap();
        set(&own, 0o2775);
        narrow(&own, 0o700).unwrap();
        assert_eq!(mode(&own), 0o2700);
        for shared in [0o1777, 0o0777, 0o1700] {
            let d = dir.path().join(format!("shared{shared:o}"));
            fs::create_dir(&d).unwrap();
            set(&d, shared);
            let e = narrow(&d, 0o700).unwrap_err();
            assert!(e.to_string().contains("shared folder"), "{e}");
            assert_eq!(mode(&d), shared);
        }
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        set(&file, 0o644);
        narrow(&file, 0o600).unwrap();
        assert_eq!(mode(&file), 0o600);
    }

    /// `write_image` writes exactly the image, whatever its length and alignment, with
    /// `O_DIRECT` (where the file system takes it) or without.
    #[test]
    fn a_file_image_is_written_exactly_with_or_without_o_direct() {
        let dir = tempfile::tempdir().unwrap();
        let direct_works = direct_writes_work(dir.path(), false);
        for direct in [false, true] {
            if direct && !direct_works {
                continue;
            }
            for len in [0, 1, 132, 4095, 4096, 4097, 8192, 100_003] {
                for misaligned in [false, true] {
                    let mut buf = vec![0u8; len + 2 * DIRECT_ALIGN];
                    let at = buf.as_ptr().align_offset(DIRECT_ALIGN) + usize::from(misaligned);
                    for (i, b) in buf[at..at + len].iter_mut().enumerate() {
                        *b = (i % 251) as u8;
                    }
                    let image = &buf[at..at + len];
                    let path = dir.path().join(format!("{direct}-{len}-{misaligned}"));
                    let mut tmp =
                        TempFile::create(dir.path(), false, direct, || path.clone()).unwrap();
                    tmp.write_image(image, direct).unwrap();
                    drop(tmp);
                    assert_eq!(
                        fs::read(&path).unwrap(),
                        image,
                        "{direct} {len} {misaligned}"
                    );
                }
            }
        }
    }

    /// An upload whose buffer moved while it grew is realigned before the write.
    #[test]
    fn an_upload_moved_by_a_reallocation_is_realigned() {
        let mut upload = Upload {
            hasher: Sha256::new(),
            buf: Vec::new(),
            start: 0,
            data_start: 0,
            sop_class_uid: String::new(),
            sop_instance_uid: String::new(),
        };
        upload.buf.reserve(DIRECT_ALIGN + 10);
        upload.start = upload.buf.as_ptr().align_offset(DIRECT_ALIGN);
        upload.buf.resize(upload.start, 0);
        upload.buf.extend_from_slice(b"head");
        upload.data_start = upload.buf.len();
        let mut expected = b"head".to_vec();
        for i in 0..2000u32 {
            let fragment = i.to_le_bytes().repeat(7);
            upload.append(&fragment);
            expected.extend_from_slice(&fragment);
        }
        upload.realign();
        let image = &upload.buf[upload.start..];
        assert!((image.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN));
        assert_eq!(image, expected);
        assert_eq!(&upload.buf[upload.data_start..], &expected[4..]);
    }
}
