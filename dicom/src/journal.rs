//! The spool's write-ahead journal: how a received instance becomes durable with one
//! device flush, shared by the stores of the moment.
//!
//! Without it a store makes its own file durable: the data, the new inode and its extent
//! map, and the directory entry, each written and flushed before the answer (two `fsync`s,
//! one per instance, however they are overlapped). With it a store writes its file through
//! the page cache and links it under its final name (no flush), then appends one record to
//! the journal — a 4 KiB header (the file's path, received time, lengths and hashes) and the
//! whole Part 10 file — and waits for one `fdatasync` of the journal file, which covers every
//! record written before it started (group commit: four associations storing at once share
//! one flush). The journal's blocks were written once before (zeros, when the segment grew),
//! so a record overwrites them in place: nothing but the data goes to the device, and the
//! `fdatasync` is a single cache flush. The answer goes out after it, so an acknowledged
//! instance is on disk, in the journal if not yet in its file.
//!
//! The journal is two segment files, `journal/0.wal` and `journal/1.wal`, used in turn.
//! When the one being appended to is full (or has held records for [`CHECKPOINT_AFTER`]),
//! appends move to the other and a checkpoint thread makes the first one's files durable in
//! their own right — one `syncfs(2)` of the spool's file system, then a second flush (on
//! ext4 without a journal `syncfs` flushes the device before it has written the last
//! metadata blocks) — and then empties it by writing a new generation number into its first
//! block: records carry their segment's generation, so older ones are dead. A record whose
//! store has not yet linked its file holds its segment back from the checkpoint.
//!
//! On open, the records still alive are read back ([`Journal::open`]); the spool rewrites any
//! file they name that is missing or differs (a power loss took it from the page cache),
//! then empties the journal. A record cut by a crash fails its checksums and ends the scan
//! of its segment: it was never acknowledged.
//!
//! Written by hand: the journal is the spool's own durability protocol (a record is a Part
//! 10 file plus the name the spool gives it); an embedded database (SQLite, redb) would copy
//! every data set through its own page cache and B-tree, for a log that is only ever
//! appended and read back after a crash.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Bytes of a record's header, and the alignment of records and segment blocks.
pub(crate) const BLOCK: usize = 4096;
/// A segment that has held records this long is checkpointed even when it is not full, so
/// that the files of a quiet spool do not wait in the page cache for long.
pub(crate) const CHECKPOINT_AFTER: Duration = Duration::from_secs(2);
/// Segments grow (written with zeros) in steps of this many bytes, as records reach them.
const GROW_STEP: u64 = 4 << 20;

const SEGMENT_MAGIC: &[u8; 8] = b"NGWALSEG";
const RECORD_MAGIC: &[u8; 8] = b"NGWALREC";
const VERSION: u32 = 1;
/// Where a record header's checksum starts (it covers everything before it).
const HEADER_SUM_AT: usize = BLOCK - 32;
/// Where a record header's relative path starts.
const PATH_AT: usize = 128;

/// What a record says about its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordMeta {
    /// The file's path under the spool folder.
    pub relative: String,
    /// When the instance was received (Unix ms).
    pub received_at_ms: i64,
    /// Bytes of the Part 10 file before the data set (preamble and file meta).
    pub head_len: usize,
    /// SHA-256 of the data set (the file after `head_len`).
    pub dataset_sha256: [u8; 32],
}

/// A record read back on open.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub meta: RecordMeta,
    /// The whole Part 10 file.
    pub image: Vec<u8>,
}

/// A record could not be appended; the caller stores the instance without the journal.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppendError {
    #[error("the record is larger than the journal takes")]
    TooLarge,
    #[error("the journal is out of service after an earlier failure")]
    Broken,
    #[error("journal: {0}")]
    Io(#[from] std::io::Error),
}

struct Segment {
    file: File,
    /// Bytes written (zeros or records) from the start: overwriting below this changes no
    /// file system metadata. Locked while the segment grows.
    grown: Mutex<u64>,
}

#[derive(Default)]
struct State {
    /// The segment records are appended to.
    active: usize,
    /// Next free offset in the active segment.
    head: u64,
    generation: [u64; 2],
    /// Records appended to each segment since it was last emptied.
    records: [u64; 2],
    /// Records whose store has not finished (its file may not be linked yet).
    inflight: [u64; 2],
    /// When each segment got its first record since it was emptied.
    first_at: [Option<Instant>; 2],
    /// A segment that takes no more records until it is checkpointed.
    sealed: [bool; 2],
    /// Writes whose data reached each segment file since its last `fdatasync` began.
    dirty: [bool; 2],
    /// Records written (counted when their write returned).
    written: u64,
    /// Every record counted up to this one is durable.
    flushed: u64,
    flushing: bool,
    /// A failed write, flush or checkpoint: no record can be trusted to be durable.
    broken: bool,
    stopped: bool,
}

struct Shared {
    segments: [Segment; 2],
    segment_bytes: u64,
    /// Free space a segment's growth must leave on the file system.
    min_free_bytes: u64,
    /// The spool folder: `syncfs` of its file system makes the linked files durable.
    spool_root: File,
    /// `journal/lock`, locked (`flock`) while this journal is open.
    _lock: File,
    state: Mutex<State>,
    /// A flush finished, a segment was checkpointed, or a record's store finished.
    changed: Condvar,
}

/// The journal (see the module documentation). Dropping it checkpoints what it holds.
pub(crate) struct Journal {
    shared: Arc<Shared>,
    checkpointer: Option<std::thread::JoinHandle<()>>,
    /// [`Journal::clear`] ran: what the segments hold was appended by this process.
    cleared: bool,
}

/// Keeps a record's segment from being checkpointed (and reused) while the record is being
/// written and flushed.
struct Pin<'a> {
    shared: &'a Shared,
    segment: usize,
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.inflight[self.segment] -= 1;
        drop(state);
        self.shared.changed.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(state).unwrap_or_else(|p| p.into_inner())
    }

    /// Makes sure the segment's blocks up to `end` have been written once (zeros), so that
    /// a record there is an overwrite.
    fn grow(&self, segment: usize, end: u64) -> std::io::Result<()> {
        let seg = &self.segments[segment];
        let mut grown = seg.grown.lock().unwrap_or_else(|p| p.into_inner());
        if *grown >= end {
            return Ok(());
        }
        let target = end
            .div_ceil(GROW_STEP)
            .saturating_mul(GROW_STEP)
            .min(self.segment_bytes);
        let st = rustix::fs::fstatvfs(&seg.file)?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if free < (target - *grown).saturating_add(self.min_free_bytes) {
            return Err(std::io::ErrorKind::StorageFull.into());
        }
        let zeros = AlignedBuf::zeroed(1 << 20);
        let mut at = *grown;
        while at < target {
            let n = (target - at).min(zeros.len() as u64) as usize;
            seg.file.write_all_at(&zeros.as_slice()[..n], at)?;
            at += n as u64;
        }
        // The new blocks and the file's size and extents, durable before any record relies
        // on them being there.
        seg.file.sync_all()?;
        *grown = target;
        Ok(())
    }

    /// Makes everything written to the spool's file system durable (see the module
    /// documentation for why twice).
    fn sync_spool(&self) -> std::io::Result<()> {
        rustix::fs::syncfs(&self.spool_root)?;
        rustix::fs::syncfs(&self.spool_root)?;
        Ok(())
    }

    /// Empties `segment` on disk: a new generation in its first block.
    fn reset(&self, segment: usize, generation: u64) -> std::io::Result<()> {
        self.grow(segment, BLOCK as u64)?;
        let mut block = AlignedBuf::zeroed(BLOCK);
        let b = block.as_mut_slice();
        b[..8].copy_from_slice(SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&generation.to_le_bytes());
        let sum = Sha256::digest(&b[..64]);
        b[64..96].copy_from_slice(&sum);
        let file = &self.segments[segment].file;
        file.write_all_at(block.as_slice(), 0)?;
        rustix::fs::fdatasync(file)?;
        Ok(())
    }

    /// Waits until every record of `segment` has finished its store, makes their files
    /// durable and empties the segment.
    fn checkpoint(&self, segment: usize) -> std::io::Result<()> {
        let mut state = self.lock();
        while state.inflight[segment] > 0 {
            state = self.wait(state);
        }
        let generation = state.generation[0].max(state.generation[1]) + 1;
        let records = state.records[segment];
        drop(state);
        let started = Instant::now();
        let outcome = self
            .sync_spool()
            .and_then(|()| self.reset(segment, generation));
        let mut state = self.lock();
        match &outcome {
            Ok(()) => {
                state.generation[segment] = generation;
                state.records[segment] = 0;
                state.first_at[segment] = None;
                state.sealed[segment] = false;
                if state.active == segment {
                    // Sealed while the other was in use: appends start again at the top.
                    state.head = BLOCK as u64;
                }
                metrics::counter!("nightingale_dicom_spool_checkpoints_total").increment(1);
                tracing::debug!(
                    segment,
                    records,
                    ms = started.elapsed().as_millis() as u64,
                    "spool journal checkpointed"
                );
            }
            Err(e) => {
                state.broken = true;
                tracing::error!(error = %e, "spool journal checkpoint failed: journal out of service");
            }
        }
        drop(state);
        self.changed.notify_all();
        outcome
    }

    /// The checkpoint thread.
    fn run(&self) {
        let mut state = self.lock();
        loop {
            if state.stopped || state.broken {
                return;
            }
            let active = state.active;
            let other = 1 - active;
            let due = state.first_at[active].is_some_and(|t| t.elapsed() >= CHECKPOINT_AFTER);
            if due && !state.sealed[other] && state.records[other] == 0 {
                // Quiet or slow: move on so that this segment's files get synced.
                state.sealed[active] = true;
                state.active = other;
                state.head = BLOCK as u64;
            }
            let Some(segment) = (0..2).find(|&s| state.sealed[s]) else {
                state = self
                    .changed
                    .wait_timeout(state, Duration::from_millis(250))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            };
            drop(state);
            let _ = self.checkpoint(segment);
            state = self.lock();
        }
    }
}

impl Journal {
    /// Opens the journal in `dir` (creating it), for a spool whose folder is `spool_root`.
    /// Returns the records still alive: the caller makes their files whole and durable, then
    /// calls [`Journal::clear`]. `direct`: write records with `O_DIRECT` (the file system
    /// takes it).
    pub(crate) fn open(
        dir: &Path,
        spool_root: &Path,
        segment_bytes: u64,
        min_free_bytes: u64,
        direct: bool,
    ) -> std::io::Result<(Journal, Vec<Record>)> {
        let segment_bytes = segment_bytes.max(4 * BLOCK as u64) / BLOCK as u64 * BLOCK as u64;
        fs::create_dir_all(dir)?;
        // One owner at a time (another process, or another open spool in this one): the
        // others store without the journal.
        let lock = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("lock"))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |e| {
                if e == rustix::io::Errno::WOULDBLOCK {
                    std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        "the journal is in use by another open spool",
                    )
                } else {
                    e.into()
                }
            },
        )?;
        let mut records = Vec::new();
        let mut generation = [0u64; 2];
        let mut segments = Vec::with_capacity(2);
        let mut fresh = false;
        for (s, generation) in generation.iter_mut().enumerate() {
            let path = dir.join(format!("{s}.wal"));
            let existed = path.exists();
            if existed {
                let (g, found) = read_segment(&path)?;
                *generation = g.unwrap_or(0);
                records.extend(found);
            } else {
                fresh = true;
            }
            let mut options = fs::OpenOptions::new();
            options.read(true).write(true).create(true);
            if direct {
                use std::os::unix::fs::OpenOptionsExt;
                options.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
            }
            let file = options.open(&path)?;
            let len = file.metadata()?.len();
            // What is there is already written: a file cut short by a crash during growth,
            // or longer than the segments now are, is only ever overwritten below its size.
            let grown = len.min(segment_bytes) / BLOCK as u64 * BLOCK as u64;
            segments.push(Segment {
                file,
                grown: Mutex::new(grown),
            });
        }
        if fresh {
            crate::spool::sync_dir(dir)?;
            if let Some(parent) = dir.parent() {
                crate::spool::sync_dir(parent)?;
            }
        }
        let spool_root = File::open(spool_root)?;
        let segments: [Segment; 2] = match segments.try_into() {
            Ok(s) => s,
            Err(_) => unreachable!("two segments"),
        };
        let state = State {
            active: 0,
            head: BLOCK as u64,
            generation,
            ..State::default()
        };
        let shared = Arc::new(Shared {
            segments,
            segment_bytes,
            min_free_bytes,
            spool_root,
            _lock: lock,
            state: Mutex::new(state),
            changed: Condvar::new(),
        });
        Ok((
            Journal {
                shared,
                checkpointer: None,
                cleared: false,
            },
            records,
        ))
    }

    /// Empties both segments (after the records [`Journal::open`] returned were made
    /// durable in their files) and starts the checkpoint thread.
    pub(crate) fn clear(&mut self) -> std::io::Result<()> {
        let shared = &self.shared;
        let base = {
            let state = shared.lock();
            // Generations only grow, across restarts too (a time-based floor covers a
            // segment whose first block was lost).
            state.generation[0]
                .max(state.generation[1])
                .max(crate::spool::now_ms() as u64)
        };
        for s in 0..2 {
            shared.reset(s, base + 1 + s as u64)?;
        }
        {
            let mut state = shared.lock();
            state.generation = [base + 1, base + 2];
        }
        let worker = shared.clone();
        self.checkpointer = Some(
            std::thread::Builder::new()
                .name("ng-spool-journal".into())
                .spawn(move || worker.run())?,
        );
        self.cleared = true;
        Ok(())
    }

    /// The largest file a record may carry.
    pub(crate) fn max_image(&self) -> usize {
        ((self.shared.segment_bytes as usize - BLOCK) / 2).saturating_sub(BLOCK)
    }

    /// Appends a record of a Part 10 file and waits until it is durable. `padded` is the
    /// file's `len` bytes followed by zeros to a whole number of [`BLOCK`]s, at a
    /// [`BLOCK`]-aligned address (for `O_DIRECT`). Call it once the file is linked under its
    /// name: a checkpoint that begins after the record took its place then covers the file.
    pub(crate) fn append(
        &self,
        meta: &RecordMeta,
        padded: &[u8],
        len: usize,
    ) -> Result<(), AppendError> {
        let shared = &*self.shared;
        if len > self.max_image()
            || meta.relative.len() > HEADER_SUM_AT - PATH_AT
            || meta.head_len > len
        {
            return Err(AppendError::TooLarge);
        }
        debug_assert!(padded.len() == len.div_ceil(BLOCK) * BLOCK);
        debug_assert!((padded.as_ptr() as usize) % BLOCK == 0);
        let record_len = (BLOCK + padded.len()) as u64;

        // A place in the active segment (moving to the other one when it is full).
        let mut state = shared.lock();
        let (segment, offset, generation) = loop {
            if state.broken || state.stopped {
                return Err(AppendError::Broken);
            }
            let active = state.active;
            if state.records[active] == 0 && !state.sealed[active] {
                // Nothing reserved since it was emptied.
                state.head = BLOCK as u64;
            }
            if !state.sealed[active] && state.head + record_len <= shared.segment_bytes {
                let offset = state.head;
                state.head += record_len;
                state.records[active] += 1;
                state.inflight[active] += 1;
                state.first_at[active].get_or_insert_with(Instant::now);
                break (active, offset, state.generation[active]);
            }
            let other = 1 - active;
            if state.records[active] > 0 || state.sealed[active] {
                state.sealed[active] = true;
                if !state.sealed[other] && state.records[other] == 0 {
                    state.active = other;
                    state.head = BLOCK as u64;
                    shared.changed.notify_all();
                    continue;
                }
                // Both in use: wait for the checkpoint.
                shared.changed.notify_all();
                state = shared.wait(state);
                continue;
            }
            // An empty segment too small for the record (cannot happen below max_image).
            return Err(AppendError::TooLarge);
        };
        drop(state);
        let _pin = Pin { shared, segment };

        let written = (|| -> std::io::Result<()> {
            shared.grow(segment, offset + record_len)?;
            let mut header = AlignedBuf::zeroed(BLOCK);
            let head_sum: [u8; 32] = Sha256::digest(&padded[..meta.head_len]).into();
            write_header(
                header.as_mut_slice(),
                meta,
                generation,
                len as u64,
                &head_sum,
            );
            let file = &shared.segments[segment].file;
            let total = BLOCK + padded.len();
            let n = rustix::io::pwritev(
                file,
                &[
                    std::io::IoSlice::new(header.as_slice()),
                    std::io::IoSlice::new(padded),
                ],
                offset,
            )?;
            if n < total {
                // A short write (not expected of a regular file): the rest, block-aligned.
                let rest: Vec<u8> = [header.as_slice(), padded].concat();
                let mut aligned = AlignedBuf::zeroed(total);
                aligned.as_mut_slice().copy_from_slice(&rest);
                let from = n / BLOCK * BLOCK;
                file.write_all_at(&aligned.as_slice()[from..], offset + from as u64)?;
            }
            Ok(())
        })();

        // Group commit: one fdatasync covers every record written before it began.
        let mut state = shared.lock();
        if let Err(e) = written {
            state.broken = true;
            drop(state);
            shared.changed.notify_all();
            tracing::error!(error = %e, "spool journal write failed: journal out of service");
            return Err(AppendError::Io(e));
        }
        state.written += 1;
        state.dirty[segment] = true;
        let me = state.written;
        loop {
            if state.flushed >= me {
                return Ok(());
            }
            if state.broken {
                return Err(AppendError::Broken);
            }
            if state.flushing {
                state = shared.wait(state);
                continue;
            }
            state.flushing = true;
            let covers = state.written;
            let dirty = std::mem::take(&mut state.dirty);
            drop(state);
            let group = covers;
            let mut outcome = Ok(());
            for (s, d) in dirty.iter().enumerate() {
                if *d && outcome.is_ok() {
                    outcome = rustix::fs::fdatasync(&shared.segments[s].file);
                }
            }
            state = shared.lock();
            state.flushing = false;
            match outcome {
                Ok(()) => {
                    metrics::histogram!("nightingale_dicom_spool_journal_group_size")
                        .record((group - state.flushed) as f64);
                    state.flushed = state.flushed.max(covers);
                }
                Err(e) => {
                    state.broken = true;
                    tracing::error!(error = %e, "spool journal flush failed: journal out of service");
                }
            }
            shared.changed.notify_all();
        }
    }

    /// Stops the checkpoint thread and lets go of the journal without checkpointing: what
    /// it holds stays for the next open to read back, as after a crash (for tests).
    pub(crate) fn abandon(mut self) {
        // Dropped without its checkpoint (the thread stops; the lock goes with the file).
        self.cleared = false;
    }

    /// True once a failure took the journal out of service.
    pub(crate) fn is_broken(&self) -> bool {
        self.shared.lock().broken
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let shared = &self.shared;
        let checkpoint = {
            let mut state = shared.lock();
            state.stopped = true;
            !state.broken
        };
        shared.changed.notify_all();
        if let Some(t) = self.checkpointer.take() {
            let _ = t.join();
        }
        if checkpoint && self.cleared {
            // What the journal holds is made durable in its files, so that the next open
            // has nothing to read back.
            for s in 0..2 {
                let has = shared.lock().records[s] > 0;
                if has && shared.checkpoint(s).is_err() {
                    break;
                }
            }
        }
    }
}

fn write_header(
    h: &mut [u8],
    meta: &RecordMeta,
    generation: u64,
    image_len: u64,
    head_sum: &[u8; 32],
) {
    h.fill(0);
    h[..8].copy_from_slice(RECORD_MAGIC);
    h[8..16].copy_from_slice(&generation.to_le_bytes());
    h[16..24].copy_from_slice(&image_len.to_le_bytes());
    h[24..32].copy_from_slice(&(meta.head_len as u64).to_le_bytes());
    h[32..40].copy_from_slice(&meta.received_at_ms.to_le_bytes());
    h[40..42].copy_from_slice(&(meta.relative.len() as u16).to_le_bytes());
    h[64..96].copy_from_slice(head_sum);
    h[96..128].copy_from_slice(&meta.dataset_sha256);
    h[PATH_AT..PATH_AT + meta.relative.len()].copy_from_slice(meta.relative.as_bytes());
    let sum = Sha256::digest(&h[..HEADER_SUM_AT]);
    h[HEADER_SUM_AT..].copy_from_slice(&sum);
}

/// A record header's fields, if its checksum holds.
fn read_header(h: &[u8], generation: u64) -> Option<(RecordMeta, u64, [u8; 32])> {
    if &h[..8] != RECORD_MAGIC || Sha256::digest(&h[..HEADER_SUM_AT])[..] != h[HEADER_SUM_AT..] {
        return None;
    }
    let u64_at = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().expect("8 bytes"));
    if u64_at(8) != generation {
        return None;
    }
    let path_len = u16::from_le_bytes([h[40], h[41]]) as usize;
    let relative = std::str::from_utf8(h.get(PATH_AT..PATH_AT + path_len)?).ok()?;
    let meta = RecordMeta {
        relative: relative.to_owned(),
        received_at_ms: u64_at(32) as i64,
        head_len: usize::try_from(u64_at(24)).ok()?,
        dataset_sha256: h[96..128].try_into().expect("32 bytes"),
    };
    Some((meta, u64_at(16), h[64..96].try_into().expect("32 bytes")))
}

/// A segment's generation (`None`: its first block is not a segment header) and the
/// records in it that carry that generation and pass their checksums, up to the first that
/// does not.
fn read_segment(path: &Path) -> std::io::Result<(Option<u64>, Vec<Record>)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut block = vec![0u8; BLOCK];
    if len < BLOCK as u64 {
        return Ok((None, Vec::new()));
    }
    file.read_exact_at(&mut block, 0)?;
    if &block[..8] != SEGMENT_MAGIC || Sha256::digest(&block[..64])[..] != block[64..96] {
        return Ok((None, Vec::new()));
    }
    let generation = u64::from_le_bytes(block[16..24].try_into().expect("8 bytes"));
    let mut records = Vec::new();
    let mut at = BLOCK as u64;
    while at + BLOCK as u64 <= len {
        file.read_exact_at(&mut block, at)?;
        let Some((meta, image_len, head_sum)) = read_header(&block, generation) else {
            break;
        };
        let padded = image_len.div_ceil(BLOCK as u64) * BLOCK as u64;
        if at + BLOCK as u64 + padded > len || meta.head_len as u64 > image_len {
            break;
        }
        let mut image = vec![0u8; image_len as usize];
        file.read_exact_at(&mut image, at + BLOCK as u64)?;
        let (head, dataset) = image.split_at(meta.head_len);
        if Sha256::digest(head)[..] != head_sum
            || Sha256::digest(dataset)[..] != meta.dataset_sha256
        {
            break;
        }
        records.push(Record { meta, image });
        at += BLOCK as u64 + padded;
    }
    Ok((Some(generation), records))
}

/// A zeroed buffer aligned to [`BLOCK`] (for `O_DIRECT` writes).
struct AlignedBuf {
    buf: Vec<u8>,
    at: usize,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> AlignedBuf {
        let buf = vec![0u8; len + BLOCK];
        let at = buf.as_ptr().align_offset(BLOCK);
        AlignedBuf { buf, at, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.buf[self.at..self.at + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[self.at..self.at + self.len]
    }

    fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Part 10-like image of `len` bytes whose first `head` are its head, in aligned
    /// memory padded to whole blocks, and the record's meta.
    fn record(n: usize, len: usize, head: usize) -> (AlignedBuf, RecordMeta) {
        let padded = len.div_ceil(BLOCK) * BLOCK;
        let mut image = AlignedBuf::zeroed(padded);
        for (i, b) in image.as_mut_slice()[..len].iter_mut().enumerate() {
            *b = (i * 31 + n * 7) as u8;
        }
        let meta = RecordMeta {
            relative: format!("instances/1.2/3.4/{n}_abc.dcm"),
            received_at_ms: 1_000 + n as i64,
            head_len: head,
            dataset_sha256: Sha256::digest(&image.as_slice()[head..len]).into(),
        };
        (image, meta)
    }

    fn open(dir: &Path, segment: u64) -> (Journal, Vec<Record>) {
        Journal::open(&dir.join("journal"), dir, segment, 0, true)
            .or_else(|_| Journal::open(&dir.join("journal"), dir, segment, 0, false))
            .unwrap()
    }

    #[test]
    fn records_not_checkpointed_are_read_back_exactly_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, found) = open(dir.path(), 1 << 20);
        assert!(found.is_empty());
        journal.clear().unwrap();
        // Lengths around the block size, and heads of different lengths.
        let lens = [1, 300, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17, 70_000];
        let mut appended = Vec::new();
        for (n, &len) in lens.iter().enumerate() {
            let (image, meta) = record(n, len, len.min(132 + n));
            journal.append(&meta, image.as_slice(), len).unwrap();
            appended.push((meta, image.as_slice()[..len].to_vec()));
        }
        journal.abandon();

        let (mut journal, found) = open(dir.path(), 1 << 20);
        assert_eq!(found.len(), appended.len());
        for (record, (meta, image)) in found.iter().zip(&appended) {
            assert_eq!(&record.meta, meta);
            assert_eq!(&record.image, image);
        }
        // Emptied: nothing comes back a second time.
        journal.clear().unwrap();
        journal.abandon();
        let (_, found) = open(dir.path(), 1 << 20);
        assert!(found.is_empty());
    }

    #[test]
    fn a_cut_record_ends_the_scan_and_records_after_it_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = open(dir.path(), 1 << 20);
        journal.clear().unwrap();
        for n in 0..3 {
            let (image, meta) = record(n, 10_000, 200);
            journal.append(&meta, image.as_slice(), 10_000).unwrap();
        }
        journal.abandon();
        // The second record's data changed on disk (a write the crash cut short).
        let path = dir.path().join("journal").join("0.wal");
        let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
        let second = (BLOCK + BLOCK + 3 * BLOCK) as u64;
        file.write_all_at(&[0xEE; 16], second + BLOCK as u64 + 5_000)
            .unwrap();
        drop(file);
        let (_, found) = open(dir.path(), 1 << 20);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].meta.relative, "instances/1.2/3.4/0_abc.dcm");
    }

    #[test]
    fn a_dropped_journal_is_checkpointed_and_leaves_nothing_to_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = open(dir.path(), 1 << 20);
        journal.clear().unwrap();
        let (image, meta) = record(1, 5_000, 132);
        journal.append(&meta, image.as_slice(), 5_000).unwrap();
        drop(journal);
        let (_, found) = open(dir.path(), 1 << 20);
        assert!(found.is_empty());
    }

    #[test]
    fn concurrent_appends_through_many_checkpoints_all_complete_and_read_back_whole() {
        // Segments of 64 KiB: records of 10 KiB fill one every five, so the four threads
        // go through rotations, waits for checkpoints and shared flushes.
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = open(dir.path(), 64 << 10);
        journal.clear().unwrap();
        assert!(journal.max_image() >= 10_000);
        let journal = Arc::new(journal);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let journal = journal.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        let (image, meta) = record(t * 100 + i, 10_000, 140);
                        journal.append(&meta, image.as_slice(), 10_000).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let journal = Arc::into_inner(journal).unwrap();
        assert!(!journal.is_broken());
        journal.abandon();
        let (_, found) = open(dir.path(), 64 << 10);
        // What was not checkpointed comes back whole and as appended; at most what two
        // segments hold.
        assert!(found.len() <= 2 * 5, "{} records read back", found.len());
        let mut seen = std::collections::HashSet::new();
        for r in &found {
            let n: usize = r.meta.relative[18..]
                .split('_')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let (image, meta) = record(n, 10_000, 140);
            assert_eq!(r.meta, meta);
            assert_eq!(r.image, image.as_slice()[..10_000]);
            assert!(seen.insert(n), "record {n} read back twice");
        }
    }

    #[test]
    fn a_journal_has_one_owner_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = open(dir.path(), 1 << 20);
        let second = Journal::open(&dir.path().join("journal"), dir.path(), 1 << 20, 0, false);
        assert_eq!(
            second.err().map(|e| e.kind()),
            Some(std::io::ErrorKind::WouldBlock)
        );
        drop(journal);
        assert!(Journal::open(&dir.path().join("journal"), dir.path(), 1 << 20, 0, false).is_ok());
    }

    #[test]
    fn a_record_larger_than_the_journal_takes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = open(dir.path(), 64 << 10);
        journal.clear().unwrap();
        let len = journal.max_image() + 1;
        let (image, meta) = record(1, len, 132);
        assert!(matches!(
            journal.append(&meta, image.as_slice(), len),
            Err(AppendError::TooLarge)
        ));
    }
}
