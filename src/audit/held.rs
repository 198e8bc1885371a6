//! DICOM audit records held while the trail cannot be written, and written to it once it can.
//!
//! Every C-STORE and STOW-RS part is recorded before it is acknowledged. When the trail
//! fails (a PostgreSQL audit store down, its disk full), a stored instance used to be
//! answered failed (0x0110) after it was committed to the spool: it stayed there unaudited,
//! the pipeline processed it, and the association's records were dropped. Now the record
//! goes to a second chain, `<data dir>/audit-held/dicom.jsonl` (JSON lines, hash-chained
//! like the trail, each record fsynced before the answer), and the instance is acknowledged:
//! its record is durable, only later. A background task ([`Held::replay_forever`]) writes the
//! held records to the trail, in their order, once the trail is writable again, each with
//! `held_at_ms=<when it was held>` added to its `detail`, and removes the file when every
//! record is in the trail. While records are held, new DICOM records are held behind them, so
//! that the trail keeps their order.
//!
//! A trail that does not answer within [`super::TRAIL_WAIT`] counts as failing. Records are
//! held as the trail would store them (tensor digests sealed with the deployment's key).
//!
//! Progress is kept in `dicom.jsonl.replayed` (the sequence number and hash of the last held
//! record written to the trail): a crash during the replay writes at most the record being
//! replayed twice (both copies carry the same `held_at_ms`). A record may also be in the
//! trail twice when the trail failed or hung in the middle of taking it (a PostgreSQL
//! connection broken during its COMMIT, which cannot tell whether it committed): once as
//! written, once held. A held file whose chain does not verify, or that holds anything but
//! DICOM association and instance records, stops the server at start-up (move it aside to
//! start; its records are then not in the trail). The chain is plain SHA-256, as the trail's:
//! it shows damage, not who wrote it, and a file cut at a line end looks whole — the folder
//! is the owner's only, like the trail's. Only when the held file cannot be written either
//! (the disk full) is an instance answered failed, as before.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::chain::{ChainChecker, Tail, check_line};
use super::jsonl::{JsonLinesStore, Options};
use super::{AuditError, AuditEvent, AuditLog, AuditRecord, AuditStore, EventKind};

/// The held records' file in `data_dir`.
pub fn path_in(data_dir: &Path) -> PathBuf {
    data_dir.join("audit-held").join("dicom.jsonl")
}

/// How many held records are read for the trail at a time.
const BATCH: usize = 64;
/// The longest wait between two tries of a trail that refuses the replay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A held file with a line longer than this is not one this server wrote.
const MAX_LINE: usize = 1 << 20;

/// The held records of DICOM events (see the module's docs).
#[derive(Debug)]
pub struct Held {
    path: PathBuf,
    marker: PathBuf,
    state: Mutex<State>,
    /// True while records are held and not all written to the trail (new records are held
    /// behind them).
    active: AtomicBool,
    wake: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Open while records are held.
    store: Option<JsonLinesStore>,
    /// The last record held.
    last: Option<Tail>,
    /// The last held record written to the trail.
    replayed: Option<Tail>,
    /// Where the first record not yet written to the trail begins in the file.
    offset: u64,
}

impl State {
    fn waiting(&self) -> u64 {
        match (&self.last, &self.replayed) {
            (None, _) => 0,
            (Some(l), None) => l.seq + 1,
            (Some(l), Some(r)) => l.seq.saturating_sub(r.seq),
        }
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_owned(),
        source,
    }
}

fn options() -> Options {
    Options {
        fsync: true,
        rotate_bytes: 0,
    }
}

impl Held {
    /// Opens the held records at `path` (see [`path_in`]): those a previous run left are
    /// checked (their whole chain) and written to the trail by [`Held::replay_forever`].
    pub fn open(path: &Path) -> Result<Held, AuditError> {
        let mut name = path.file_name().unwrap_or_default().to_owned();
        name.push(".replayed");
        let held = Held {
            path: path.to_owned(),
            marker: path.with_file_name(name),
            state: Mutex::new(State::default()),
            active: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        };
        if fs::symlink_metadata(path).is_err() {
            held.remove_marker();
            return Ok(held);
        }
        // Repairs a torn last line (a crash while holding: that record was never
        // acknowledged) and takes the file's lock.
        let store = JsonLinesStore::open(path, options())?;
        let marked = held.read_marker();
        let (last, replayed, offset) = scan(path, marked.as_ref())?;
        let mut state = held.lock();
        state.last = last;
        state.replayed = replayed;
        state.offset = offset;
        let waiting = state.waiting();
        if waiting == 0 {
            drop(store);
            held.remove_files(&mut state);
        } else {
            tracing::warn!(
                records = waiting,
                path = %path.display(),
                "DICOM audit records held by an earlier run: written to the audit trail once it can take them"
            );
            state.store = Some(store);
            held.active.store(true, Ordering::SeqCst);
        }
        metrics::gauge!("nightingale_audit_held_records").set(waiting as f64);
        drop(state);
        Ok(held)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the held records are.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True while records are held that the trail does not have yet.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// How many held records the trail does not have yet.
    pub fn waiting(&self) -> u64 {
        self.lock().waiting()
    }

    /// Holds a record (appended and fsynced) until the trail can take it: `after_failure`,
    /// because the trail refused it; otherwise only behind records held already (`false`
    /// when there are none any more: the trail takes it).
    pub async fn hold(
        self: &Arc<Self>,
        event: AuditEvent,
        after_failure: bool,
    ) -> Result<bool, AuditError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.hold_now(&event, after_failure))
            .await
            .map_err(|e| AuditError::Write {
                location: self.path.display().to_string(),
                reason: format!("the held-record task failed: {e}"),
            })?
    }

    /// [`Held::hold`] on this thread (one that may block).
    pub(crate) fn hold_now(
        &self,
        event: &AuditEvent,
        after_failure: bool,
    ) -> Result<bool, AuditError> {
        let mut state = self.lock();
        if !after_failure && !self.is_active() {
            return Ok(false);
        }
        if !self.active.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                path = %self.path.display(),
                "the audit trail cannot be written: DICOM records are held here, and written to it once it can"
            );
        }
        let held = (|| {
            if state.store.is_none() {
                state.store = Some(JsonLinesStore::open(&self.path, options())?);
            }
            let store = state.store.as_mut().expect("opened above");
            let mut event = event.clone();
            event.bound();
            store.append(&[&event], super::unix_ms())?;
            Ok::<_, AuditError>(store.tail().cloned())
        })();
        match held {
            Ok(tail) => {
                state.last = tail;
                metrics::gauge!("nightingale_audit_held_records").set(state.waiting() as f64);
                drop(state);
                self.wake.notify_one();
                Ok(true)
            }
            Err(e) => {
                if state.waiting() == 0 {
                    self.active.store(false, Ordering::SeqCst);
                }
                Err(e)
            }
        }
    }

    /// Writes the held records to `log`'s trail whenever there are some and it is writable,
    /// for the process's life.
    pub async fn replay_forever(self: Arc<Self>, log: AuditLog) {
        let mut backoff = Duration::from_secs(1);
        loop {
            if !self.is_active() {
                let _ = tokio::time::timeout(Duration::from_secs(5), self.wake.notified()).await;
                continue;
            }
            if !log.is_writable() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            match self.replay_some(&log).await {
                Ok(()) => backoff = Duration::from_secs(1),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_s = backoff.as_secs(), "held DICOM audit records not written to the trail yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Writes the next held records to the trail, in order; removes the file once the trail
    /// has them all.
    pub async fn replay_some(self: &Arc<Self>, log: &AuditLog) -> Result<(), AuditError> {
        let me = self.clone();
        let batch = tokio::task::spawn_blocking(move || me.next_batch())
            .await
            .map_err(|e| AuditError::Write {
                location: self.path.display().to_string(),
                reason: format!("the held-record task failed: {e}"),
            })??;
        if batch.is_empty() {
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.finish()).await;
            return Ok(());
        }
        for (record, tail, next) in batch {
            let mut event = record.event;
            let detail = event.detail.take().unwrap_or_default();
            event.detail = Some(format!("{detail} held_at_ms={}", record.unix_ms));
            log.record_held(event).await?;
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.replayed(tail, next)).await;
        }
        Ok(())
    }

    /// The next held records the trail does not have, with each one's chain link and where
    /// the one after it begins.
    fn next_batch(&self) -> Result<Vec<(AuditRecord, Tail, u64)>, AuditError> {
        let state = self.lock();
        if state.waiting() == 0 {
            return Ok(Vec::new());
        }
        let mut file = File::open(&self.path).map_err(io(&self.path))?;
        file.seek(SeekFrom::Start(state.offset))
            .map_err(io(&self.path))?;
        let mut reader = BufReader::new(file);
        let mut out = Vec::new();
        let mut offset = state.offset;
        let mut line = String::new();
        while out.len() < BATCH {
            line.clear();
            let n = (&mut reader)
                .take(MAX_LINE as u64)
                .read_line(&mut line)
                .map_err(io(&self.path))?;
            if n == 0 || !line.ends_with('\n') {
                break;
            }
            offset += n as u64;
            let text = line.trim_end_matches('\n');
            let broken = |reason: String| AuditError::Broken {
                location: self.path.display().to_string(),
                record: out.len() as u64,
                reason,
            };
            let (seq, _, hash) = check_line(text).map_err(broken)?;
            let record: AuditRecord =
                serde_json::from_str(text).map_err(|e| broken(e.to_string()))?;
            if !is_dicom(record.event.kind) {
                return Err(broken(NOT_DICOM.into()));
            }
            out.push((record, Tail { seq, hash }, offset));
        }
        Ok(out)
    }

    /// Notes that the trail has the held record `tail` (the next begins at `next`).
    fn replayed(&self, tail: Tail, next: u64) {
        let mut state = self.lock();
        if let Err(e) = self.write_marker(&tail) {
            // Kept in memory: only a crash before the next mark writes records twice.
            tracing::error!(error = %e, "cannot note the held DICOM audit records written to the trail");
        }
        state.replayed = Some(tail);
        state.offset = next;
        metrics::gauge!("nightingale_audit_held_records").set(state.waiting() as f64);
    }

    /// Removes the held records once the trail has them all (none held meanwhile).
    fn finish(&self) {
        let mut state = self.lock();
        if state.waiting() > 0 {
            return;
        }
        let written = state.replayed.as_ref().map_or(0, |t| t.seq + 1);
        state.store = None;
        self.remove_files(&mut state);
        self.active.store(false, Ordering::SeqCst);
        tracing::info!(
            records = written,
            "held DICOM audit records written to the audit trail"
        );
    }

    fn remove_files(&self, state: &mut State) {
        // The file first: a marker without its file is removed at the next start, while a
        // file without its marker would be written to the trail again.
        if let Err(e) = fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::error!(error = %e, path = %self.path.display(), "cannot remove the held DICOM audit records the trail has");
        }
        self.remove_marker();
        *state = State::default();
        metrics::gauge!("nightingale_audit_held_records").set(0.0);
    }

    fn remove_marker(&self) {
        let _ = fs::remove_file(&self.marker);
        // The store's rotation lock, made beside the file when it was opened.
        let mut lock = std::ffi::OsString::from(".");
        lock.push(self.path.file_name().unwrap_or_default());
        lock.push(".rotation-lock");
        let _ = fs::remove_file(self.path.with_file_name(lock));
    }

    /// `<seq> <hash>` of the last held record the trail has, fsynced, then renamed over the
    /// marker.
    fn write_marker(&self, tail: &Tail) -> std::io::Result<()> {
        let mut name = self.marker.file_name().unwrap_or_default().to_owned();
        name.push(".tmp");
        let tmp = self.marker.with_file_name(name);
        let mut f = std::os::unix::fs::OpenOptionsExt::mode(
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true),
            0o600,
        )
        .open(&tmp)?;
        writeln!(f, "{} {}", tail.seq, tail.hash)?;
        f.sync_data()?;
        fs::rename(&tmp, &self.marker)
    }

    fn read_marker(&self) -> Option<Tail> {
        let text = fs::read_to_string(&self.marker).ok()?;
        let (seq, hash) = text.trim().split_once(' ')?;
        Some(Tail {
            seq: seq.parse().ok()?,
            hash: hash.to_owned(),
        })
    }
}

/// Only DICOM records are ever held: a held file with another kind of record was not written
/// by this server (the trail would take a forged inference record as its own).
fn is_dicom(kind: EventKind) -> bool {
    matches!(kind, EventKind::DicomAssociation | EventKind::DicomInstance)
}

const NOT_DICOM: &str = "a record that is not a DICOM association or instance record";

#[derive(serde::Deserialize)]
struct Kind {
    kind: EventKind,
}

/// Checks the held file's whole chain: its last record, the marked record if it is in the
/// file (a marker of another file is ignored), and where the record after it begins.
fn scan(
    path: &Path,
    marked: Option<&Tail>,
) -> Result<(Option<Tail>, Option<Tail>, u64), AuditError> {
    let file = File::open(path).map_err(io(path))?;
    let mut reader = BufReader::new(file);
    let mut checker = ChainChecker::from_genesis();
    let (mut replayed, mut offset, mut at) = (None, 0u64, 0u64);
    let mut line = String::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .map_err(io(path))?;
        if n == 0 {
            break;
        }
        number += 1;
        let broken = |reason: String| AuditError::Broken {
            location: path.display().to_string(),
            record: number,
            reason: format!(
                "{reason}: the held DICOM audit records do not verify; move the file aside to start (its records are then not in the trail)"
            ),
        };
        if !line.ends_with('\n') {
            return Err(broken("a line longer than any record".into()));
        }
        let text = line.trim_end_matches('\n');
        checker.push(text).map_err(broken)?;
        let kind = serde_json::from_str::<Kind>(text).map_err(|e| broken(e.to_string()))?;
        if !is_dicom(kind.kind) {
            return Err(broken(NOT_DICOM.into()));
        }
        at += n as u64;
        if checker.tail.as_ref() == marked {
            replayed = checker.tail.clone();
            offset = at;
        }
    }
    Ok((checker.tail, replayed, offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{EventKind, Outcome};
    use std::sync::atomic::AtomicBool;

    /// A JSON-lines trail that fails while `down` is set, as a PostgreSQL store whose server
    /// is down would.
    struct Outage {
        inner: JsonLinesStore,
        down: Arc<AtomicBool>,
    }

    impl AuditStore for Outage {
        fn append(&mut self, events: &[&AuditEvent], unix_ms: u64) -> Result<(), AuditError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(AuditError::Write {
                    location: "outage".into(),
                    reason: "the audit store is down".into(),
                });
            }
            self.inner.append(events, unix_ms)
        }
        fn check(&mut self) -> Result<(), AuditError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(AuditError::Write {
                    location: "outage".into(),
                    reason: "the audit store is down".into(),
                });
            }
            Ok(())
        }
        fn describe(&self) -> String {
            "outage".into()
        }
    }

    fn event(n: u32) -> AuditEvent {
        AuditEvent {
            detail: Some(format!("event=stored n={n}")),
            outcome: Outcome::Ok,
            ..AuditEvent::blank(EventKind::DicomInstance, format!("dicom-1-{n}"), None)
        }
    }

    fn trail(dir: &Path, down: &Arc<AtomicBool>) -> AuditLog {
        let inner = JsonLinesStore::open(&dir.join("audit.jsonl"), Options::default()).unwrap();
        AuditLog::start(Box::new(Outage {
            inner,
            down: down.clone(),
        }))
        .unwrap()
    }

    fn trail_records(dir: &Path) -> Vec<AuditRecord> {
        crate::audit::verify(&dir.join("audit.jsonl")).unwrap();
        fs::read_to_string(dir.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn detail(r: &AuditRecord) -> &str {
        r.event.detail.as_deref().unwrap_or_default()
    }

    /// Waits (at most 20 s) for `done`.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "not within 20 s: {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_the_trail_refuses_are_held_then_written_to_it_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let path = path_in(dir.path());
        let held = Arc::new(Held::open(&path).unwrap());
        let log = trail(dir.path(), &down).with_held(held.clone());
        log.record_or_hold(event(0)).await.unwrap();
        assert!(!held.is_active() && !path.exists(), "written to the trail");

        down.store(true, Ordering::SeqCst);
        for n in 1..=3 {
            log.record_or_hold(event(n)).await.unwrap();
        }
        assert!(held.is_active());
        assert_eq!(held.waiting(), 3);
        assert_eq!(trail_records(dir.path()).len(), 1);
        // Held records verify as a chain of their own, fsynced before the answer.
        let summary = crate::audit::verify(&path).unwrap();
        assert_eq!(summary.records, 3);

        // The trail is back, but records held come first: a new one is held behind them.
        down.store(false, Ordering::SeqCst);
        log.record_or_hold(event(4)).await.unwrap();
        assert_eq!(held.waiting(), 4);
        assert_eq!(trail_records(dir.path()).len(), 1);
        let replay = tokio::spawn(held.clone().replay_forever(log.clone()));
        until("the held records written", || !held.is_active()).await;
        replay.abort();
        assert!(
            !path.exists(),
            "the held file is removed once the trail has it all"
        );
        assert!(!held.marker.exists());

        let all = trail_records(dir.path());
        let numbers: Vec<&str> = all
            .iter()
            .map(|r| {
                detail(r)
                    .split(" n=")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
            })
            .collect();
        assert_eq!(numbers, ["0", "1", "2", "3", "4"], "{all:#?}");
        assert!(!detail(&all[0]).contains("held_at_ms="));
        for r in &all[1..] {
            let at: u64 = detail(r)
                .rsplit("held_at_ms=")
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert!(at > 0 && at <= r.unix_ms, "{r:?}");
        }

        // Back to the trail directly.
        log.record_or_hold(event(5)).await.unwrap();
        assert!(!held.is_active() && !path.exists());
        let all = trail_records(dir.path());
        assert_eq!(detail(&all[5]), "event=stored n=5");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replay_cut_short_goes_on_at_the_next_start_without_writing_a_record_twice() {
        let dir = tempfile::tempdir().unwrap();
        let down = Arc::new(AtomicBool::new(true));
        let path = path_in(dir.path());
        let base = trail(dir.path(), &down);
        {
            let held = Arc::new(Held::open(&path).unwrap());
            let log = base.clone().with_held(held.clone());
            for n in 0..5 {
                log.record_or_hold(event(n)).await.unwrap();
            }
            // Two of them reach the trail, then the process ends (the held file's lock goes
            // with it).
            down.store(false, Ordering::SeqCst);
            let batch = held.next_batch().unwrap();
            assert_eq!(batch.len(), 5);
            for (record, tail, next) in batch.into_iter().take(2) {
                log.record(record.event).await.unwrap();
                held.replayed(tail, next);
            }
        }
        // A torn line the crash left after them (never acknowledged) is set aside.
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":5,\"unix_").unwrap();
        drop(f);

        let held = Arc::new(Held::open(&path).unwrap());
        assert_eq!(held.waiting(), 3);
        assert!(held.is_active());
        let log = base.clone().with_held(held.clone());
        held.replay_some(&log).await.unwrap();
        held.replay_some(&log).await.unwrap();
        assert!(!held.is_active() && !path.exists());
        let all = trail_records(dir.path());
        let numbers: Vec<String> = all.iter().map(|r| detail(r).to_owned()).collect();
        assert_eq!(all.len(), 5, "{numbers:#?}");
        for (n, r) in all.iter().enumerate() {
            assert!(
                detail(r).starts_with(&format!("event=stored n={n}")),
                "{numbers:#?}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn held_records_that_do_not_verify_stop_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let down = Arc::new(AtomicBool::new(true));
        let path = path_in(dir.path());
        {
            let held = Arc::new(Held::open(&path).unwrap());
            let log = trail(dir.path(), &down).with_held(held.clone());
            for n in 0..3 {
                log.record_or_hold(event(n)).await.unwrap();
            }
        }
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replacen("n=1", "n=7", 1)).unwrap();
        let err = Held::open(&path).unwrap_err().to_string();
        assert!(err.contains("do not verify"), "{err}");
        // A chain made whole again but holding another kind of record (an inference record
        // forged to be laundered into the trail).
        let forged = crate::audit::chain::seal(
            None,
            &[&AuditEvent::blank(
                EventKind::Inference,
                "x".into(),
                Some("dr-nobody".into()),
            )],
            1,
        );
        fs::write(&path, format!("{}\n", forged[0].line)).unwrap();
        let err = Held::open(&path).unwrap_err().to_string();
        assert!(err.contains("not a DICOM"), "{err}");
        // A record taken out breaks it too.
        let lines: Vec<&str> = text.lines().collect();
        fs::write(&path, format!("{}\n{}\n", lines[0], lines[2])).unwrap();
        let err = Held::open(&path).unwrap_err().to_string();
        assert!(err.contains("do not verify"), "{err}");
    }

    /// A store whose appends hang while `hung` is set (a PostgreSQL server that stopped
    /// answering), then go through.
    struct Hung {
        inner: JsonLinesStore,
        hung: Arc<AtomicBool>,
    }

    impl AuditStore for Hung {
        fn append(&mut self, events: &[&AuditEvent], unix_ms: u64) -> Result<(), AuditError> {
            while self.hung.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            self.inner.append(events, unix_ms)
        }
        fn describe(&self) -> String {
            "hung".into()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_trail_that_does_not_answer_is_failing_and_records_are_held_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let hung = Arc::new(AtomicBool::new(true));
        let inner =
            JsonLinesStore::open(&dir.path().join("audit.jsonl"), Options::default()).unwrap();
        let key = crate::audit::DigestKey::from_bytes([7; 32]);
        let held = Arc::new(Held::open(&path_in(dir.path())).unwrap());
        let log = AuditLog::start(Box::new(Hung {
            inner,
            hung: hung.clone(),
        }))
        .unwrap()
        .with_digest_key(crate::audit::DigestKey::from_bytes([7; 32]))
        .with_held(held.clone());
        let digest = "ab".repeat(32);
        let mut e = event(0);
        e.input_sha256 = Some(digest.clone());
        let started = std::time::Instant::now();
        log.record_or_hold(e).await.unwrap();
        assert!(started.elapsed() >= crate::audit::TRAIL_WAIT);
        until("a trail that does not answer is not writable", || {
            !log.is_writable()
        })
        .await;
        assert_eq!(held.waiting(), 1);
        // Held as the trail stores it: the digest sealed with the deployment's key.
        let kept: AuditRecord =
            serde_json::from_str(fs::read_to_string(held.path()).unwrap().trim()).unwrap();
        assert_eq!(kept.event.input_sha256, Some(key.seal(&digest)));
        // The next record does not wait: it is held behind the first.
        let started = std::time::Instant::now();
        log.record_or_hold(event(1)).await.unwrap();
        assert!(started.elapsed() < crate::audit::TRAIL_WAIT);
        assert_eq!(held.waiting(), 2);

        // The trail answers again: it took the first record late (once as written, once
        // held: documented), and the held ones follow, sealed once.
        hung.store(false, Ordering::SeqCst);
        until("the trail writable", || log.is_writable()).await;
        held.replay_some(&log).await.unwrap();
        held.replay_some(&log).await.unwrap();
        assert!(!held.is_active());
        let all = trail_records(dir.path());
        let details: Vec<&str> = all.iter().map(detail).collect();
        assert_eq!(all.len(), 3, "{details:#?}");
        assert_eq!(details[0], "event=stored n=0");
        assert!(details[1].starts_with("event=stored n=0 held_at_ms="));
        assert!(details[2].starts_with("event=stored n=1 held_at_ms="));
        for r in &all[..2] {
            assert_eq!(r.event.input_sha256, Some(key.seal(&digest)));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_marker_of_other_records_is_not_taken_for_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let down = Arc::new(AtomicBool::new(true));
        let path = path_in(dir.path());
        let held = Arc::new(Held::open(&path).unwrap());
        let log = trail(dir.path(), &down).with_held(held.clone());
        for n in 0..2 {
            log.record_or_hold(event(n)).await.unwrap();
        }
        drop((log, held));
        // A marker left by an earlier file of held records (same sequence numbers).
        fs::write(
            path.with_file_name("dicom.jsonl.replayed"),
            format!("1 {}\n", "ab".repeat(32)),
        )
        .unwrap();
        let held = Held::open(&path).unwrap();
        assert_eq!(held.waiting(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_neither_the_trail_nor_the_held_file_takes_fails() {
        let dir = tempfile::tempdir().unwrap();
        let down = Arc::new(AtomicBool::new(true));
        // Where the held records' folder should be, a file.
        fs::write(dir.path().join("audit-held"), b"x").unwrap();
        let held = Arc::new(Held::open(&path_in(dir.path())).unwrap());
        let log = trail(dir.path(), &down).with_held(held.clone());
        assert!(log.record_or_hold(event(0)).await.is_err());
        assert!(!held.is_active(), "nothing is held");
        down.store(false, Ordering::SeqCst);
        until("the trail writable", || log.is_writable()).await;
        log.record_or_hold(event(1)).await.unwrap();
        assert_eq!(trail_records(dir.path()).len(), 1);
    }
}
