//! The audit trail: one JSON line per inference request that reached a model, with the model
//! name, version and file checksum, SHA-256 digests of the inputs and outputs (never the data),
//! the outcome, and a hash chain that makes any edit, deletion or reordering detectable
//! (`nightingale audit verify`).
//!
//! A dedicated thread appends records. Writers wait for their record to be written and flushed
//! (group commit: everything queued is written in one go, then all its writers are answered),
//! so a prediction is never returned before its audit record is in the file. With `fsync` the
//! group is also synced to disk. If the log cannot be written the request fails: the server
//! fails closed rather than serve unaudited predictions.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nightingale_inference::NamedTensor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What the server knows about one request; the log adds sequence, time and chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEvent {
    pub request_id: String,
    pub model: String,
    pub version: String,
    pub model_sha256: String,
    pub input_sha256: Option<String>,
    pub output_sha256: Option<String>,
    pub rows: Option<usize>,
    pub status: u16,
}

/// One line of the log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: u64,
    pub unix_ms: u64,
    /// Written inline: the line's keys are `request_id`, `model`, … as in [`AuditEvent`].
    #[serde(flatten)]
    pub event: AuditEvent,
    pub prev: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

impl AuditRecord {
    /// SHA-256 over the previous hash and this record without its own hash.
    fn chain_hash(&self) -> String {
        let mut unsealed = self.clone();
        unsealed.hash.clear();
        let body = serde_json::to_vec(&unsealed).expect("records serialise");
        let mut h = Sha256::new();
        h.update(self.prev.as_bytes());
        h.update(b"\n");
        h.update(&body);
        hex::encode(h.finalize())
    }
}

/// The audit log could not be opened, written or verified.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit log {path}, line {line}: {reason}")]
    Broken {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error(
        "audit log {path}: its last record {reason}; run `nightingale audit verify` and repair or archive the log before appending"
    )]
    BrokenTail { path: PathBuf, reason: String },
    #[error("the audit log writer has stopped")]
    Stopped,
}

/// Canonical digest of named tensors: by name, each with datatype, shape and raw little-endian
/// bytes, so the same tensors hash the same whichever wire encoding carried them.
pub fn tensors_sha256(tensors: &[NamedTensor]) -> String {
    let mut sorted: Vec<&NamedTensor> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = Sha256::new();
    for t in sorted {
        h.update((t.name.len() as u64).to_le_bytes());
        h.update(t.name.as_bytes());
        h.update(t.tensor.datatype().as_str().as_bytes());
        h.update((t.tensor.shape().len() as u64).to_le_bytes());
        for &d in t.tensor.shape() {
            h.update((d as u64).to_le_bytes());
        }
        h.update(t.tensor.to_raw());
    }
    hex::encode(h.finalize())
}

type Job = (AuditEvent, oneshot::Sender<Result<(), String>>);

/// Handle to the audit writer thread.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    path: PathBuf,
}

impl AuditLog {
    /// Opens (or creates) the log, continues its chain, and starts the writer thread.
    pub fn open(path: &Path, fsync: bool) -> Result<AuditLog, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        // Continue the chain from the last record. Only that record is checked here, so start-up
        // does not grow with the log; `nightingale audit verify` checks the whole chain.
        let (seq, prev) = match last_record(path) {
            Ok(Some(last)) => (last.seq + 1, last.hash),
            Ok(None) => (0, GENESIS.to_owned()),
            Err(AuditError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                (0, GENESIS.to_owned())
            }
            Err(e) => return Err(e),
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        let (tx, rx) = mpsc::channel::<Job>(4096);
        let writer = Writer {
            out: BufWriter::new(file),
            path: path.to_owned(),
            fsync,
            seq,
            prev,
        };
        std::thread::Builder::new()
            .name("ng-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(io)?;
        Ok(AuditLog {
            tx,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record and waits until it is written.
    pub async fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send((event, ack))
            .await
            .map_err(|_| AuditError::Stopped)?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(AuditError::Io {
                path: self.path.clone(),
                source: std::io::Error::other(reason),
            }),
            Err(_) => Err(AuditError::Stopped),
        }
    }
}

struct Writer {
    out: BufWriter<File>,
    path: PathBuf,
    fsync: bool,
    seq: u64,
    prev: String,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            while let Ok(job) = rx.try_recv() {
                group.push(job);
            }
            let (seq, prev) = (self.seq, self.prev.clone());
            let result = self.write_group(&group);
            if let Err(e) = &result {
                // Roll the chain back so the next group continues from what is on disk.
                self.seq = seq;
                self.prev = prev;
                tracing::error!(error = %e, path = %self.path.display(), "cannot write the audit log");
            }
            for (_, ack) in group {
                let _ = ack.send(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
            }
        }
    }

    fn write_group(&mut self, group: &[Job]) -> std::io::Result<()> {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        for (event, _) in group {
            let mut record = AuditRecord {
                seq: self.seq,
                unix_ms,
                event: event.clone(),
                prev: self.prev.clone(),
                hash: String::new(),
            };
            record.hash = record.chain_hash();
            serde_json::to_writer(&mut self.out, &record)?;
            self.out.write_all(b"\n")?;
            self.seq += 1;
            self.prev = record.hash;
        }
        self.out.flush()?;
        if self.fsync {
            self.out.get_ref().sync_data()?;
        }
        Ok(())
    }
}

/// The last record of a log, checked against its own hash (None for an empty log).
fn last_record(path: &Path) -> Result<Option<AuditRecord>, AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let len = file.seek(SeekFrom::End(0)).map_err(io)?;
    // Records are well under 4 KiB; read enough of the tail to hold the last one whole.
    let start = len.saturating_sub(64 << 10);
    file.seek(SeekFrom::Start(start)).map_err(io)?;
    let mut tail = String::new();
    std::io::Read::read_to_string(&mut file, &mut tail).map_err(io)?;
    let Some(line) = tail.lines().rev().find(|l| !l.trim().is_empty()) else {
        return Ok(None);
    };
    let broken = |reason: String| AuditError::BrokenTail {
        path: path.to_owned(),
        reason,
    };
    let record: AuditRecord =
        serde_json::from_str(line).map_err(|e| broken(format!("is unreadable ({e})")))?;
    if record.chain_hash() != record.hash {
        return Err(broken("does not match its hash".into()));
    }
    Ok(Some(record))
}

/// Checks every line's chain; returns the last record (None for an empty log).
pub fn verify(path: &Path) -> Result<Option<AuditRecord>, AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let broken = |line: usize, reason: String| AuditError::Broken {
        path: path.to_owned(),
        line,
        reason,
    };
    let mut prev = GENESIS.to_owned();
    let mut last = None;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io)?;
        let record: AuditRecord =
            serde_json::from_str(&line).map_err(|e| broken(i + 1, format!("not a record: {e}")))?;
        if record.seq != i as u64 {
            return Err(broken(
                i + 1,
                format!("sequence {} where {i} was expected", record.seq),
            ));
        }
        if record.prev != prev {
            return Err(broken(
                i + 1,
                "prev does not match the previous record's hash".into(),
            ));
        }
        if record.chain_hash() != record.hash {
            return Err(broken(i + 1, "hash does not match the record".into()));
        }
        prev = record.hash.clone();
        last = Some(record);
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: usize) -> AuditEvent {
        AuditEvent {
            request_id: format!("req-{i}"),
            model: "m".into(),
            version: "1".into(),
            model_sha256: "ab".repeat(32),
            input_sha256: Some("cd".repeat(32)),
            output_sha256: None,
            rows: Some(1),
            status: 200,
        }
    }

    #[tokio::test]
    async fn chain_verifies_continues_and_detects_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit/log.jsonl");
        {
            let log = AuditLog::open(&path, true).unwrap();
            for i in 0..5 {
                log.record(event(i)).await.unwrap();
            }
        }
        assert_eq!(verify(&path).unwrap().unwrap().seq, 4);
        // Reopening continues the chain.
        let log = AuditLog::open(&path, false).unwrap();
        let tasks: Vec<_> = (5..20)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.record(event(i)).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(verify(&path).unwrap().unwrap().seq, 19);

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // An edited field, a deleted line and swapped lines are all detected.
        let edited = text.replacen("\"status\":200", "\"status\":500", 1);
        let deleted = [&lines[..3], &lines[4..]].concat().join("\n");
        let mut swapped = lines.clone();
        swapped.swap(2, 3);
        for (what, tampered) in [
            ("edit", edited),
            ("delete", deleted),
            ("swap", swapped.join("\n")),
        ] {
            let p = dir.path().join(format!("{what}.jsonl"));
            std::fs::write(&p, tampered).unwrap();
            assert!(
                matches!(verify(&p), Err(AuditError::Broken { .. })),
                "{what} not detected"
            );
        }
        // Opening checks the record the chain continues from.
        let p = dir.path().join("last-edited.jsonl");
        let mut edited_last = lines.clone();
        let last = edited_last
            .pop()
            .unwrap()
            .replacen("\"status\":200", "\"status\":201", 1);
        edited_last.push(&last);
        std::fs::write(&p, edited_last.join("\n")).unwrap();
        assert!(
            AuditLog::open(&p, false).is_err(),
            "a log with a forged last record is not appended to"
        );
    }

    #[test]
    fn tensor_digest_ignores_order_but_not_content() {
        use nightingale_inference::Tensor;
        let a = NamedTensor::new("a", Tensor::from_vec(vec![2], vec![1.0f32, 2.0]).unwrap());
        let b = NamedTensor::new("b", Tensor::from_vec(vec![1], vec![7i64]).unwrap());
        assert_eq!(
            tensors_sha256(&[a.clone(), b.clone()]),
            tensors_sha256(&[b.clone(), a.clone()])
        );
        let a2 = NamedTensor::new(
            "a",
            Tensor::from_vec(vec![1, 2], vec![1.0f32, 2.0]).unwrap(),
        );
        assert_ne!(tensors_sha256(&[a, b.clone()]), tensors_sha256(&[a2, b]));
    }
}
