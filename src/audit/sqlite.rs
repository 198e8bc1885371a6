//! SQLite store (embedded, `rusqlite` with SQLite compiled in): one row per record, the
//! record's line kept verbatim so it verifies byte for byte like the JSON-lines store. Each
//! group is one `IMMEDIATE` transaction that reads the chain's tail, checks it, and inserts:
//! a failed write (a full disk, say) rolls the whole group back.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::chain::{ChainChecker, seal};
use super::{AuditError, AuditEvent, AuditStore, ChainSummary, checked_tail};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    record TEXT NOT NULL
)";

/// An SQLite audit database.
#[derive(Debug)]
pub struct SqliteStore {
    // Dropped before `lock`: closing another descriptor of the database file while SQLite
    // holds its POSIX locks on it would release them.
    conn: Connection,
    /// The database file, held open with an exclusive `flock` (as the JSON-lines store holds
    /// its live file): a second server on the same database was not refused, and the first
    /// then failed every request closed while answering ready (a red-team finding).
    _lock: std::fs::File,
    /// The database's path, and the (device, inode) it named at open: the file moved away or
    /// deleted took every record to a file the trail no longer holds, answered 200 (a
    /// re-attack's finding; the JSON-lines store fails closed so).
    path: std::path::PathBuf,
    identity: (u64, u64),
    location: String,
    /// The chain's end as this server last saw it (read at open, then written): the
    /// database's end must still be it before each group is appended, and must be the group's
    /// last record after it is. Rows deleted, edited, re-chained or held back by a planted
    /// trigger (`RAISE(IGNORE)` stored nothing while requests were answered, and `audit
    /// verify` passed: a review's finding) make the append fail, so requests fail closed,
    /// as with the JSON-lines store, whose chain end is held in memory.
    last: Option<(u64, String)>,
}

impl SqliteStore {
    pub fn open(path: &Path, fsync: bool) -> Result<Self, AuditError> {
        let location = path.display().to_string();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            super::jsonl::private_dir(dir).map_err(|source| AuditError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        // A FIFO, a device or a folder is no database: opening a FIFO to append blocked
        // `serve` for good, silently (a re-attack's finding, as for the JSON-lines trail).
        let beside = |suffix: &str| {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            std::path::PathBuf::from(name)
        };
        // Its write-ahead log and shared-memory files too (SQLite opens them by name).
        if let Some(odd) = [path.to_owned(), beside("-wal"), beside("-shm")]
            .into_iter()
            .find(|p| std::fs::metadata(p).is_ok_and(|m| !m.is_file()))
        {
            return Err(AuditError::Write {
                location: odd.display().to_string(),
                reason: "is not a regular file (a FIFO, a device, a folder?): an audit database is a file".into(),
            });
        }
        // Created readable by its owner only (SQLite creates it under the umask); an
        // existing file keeps its mode. One writer at a time.
        let lock = {
            let mut options = std::fs::OpenOptions::new();
            options.create(true).append(true);
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            options.open(path).map_err(|source| AuditError::Io {
                path: path.to_owned(),
                source,
            })?
        };
        super::jsonl::take_lock(path, &lock)?;
        let identity = {
            use std::os::unix::fs::MetadataExt as _;
            let meta = lock.metadata().map_err(|source| AuditError::Io {
                path: path.to_owned(),
                source,
            })?;
            (meta.dev(), meta.ino())
        };
        let err = |source| AuditError::Sqlite {
            location: location.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", if fsync { "FULL" } else { "NORMAL" })
            .map_err(err)?;
        conn.execute(SCHEMA, []).map_err(err)?;
        let mut store = SqliteStore {
            conn,
            _lock: lock,
            path: path.to_owned(),
            identity,
            location,
            last: None,
        };
        // Refuse to continue from a forged or unreadable last record, as the file store does.
        store.last = store.tail_row(&store.conn)?.map(|t| (t.seq, t.hash));
        Ok(store)
    }

    /// Fails unless the path still names the database this store opened.
    fn in_place(&self) -> Result<(), AuditError> {
        use std::os::unix::fs::MetadataExt as _;
        let here = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if here != Some(self.identity) {
            return Err(AuditError::Write {
                location: self.location.clone(),
                reason: "the database file was moved away, deleted or replaced while the server wrote it (records must not go to a file the trail no longer holds): put it back, or restart the server".into(),
            });
        }
        Ok(())
    }

    fn tail_row(&self, conn: &Connection) -> Result<Option<super::Tail>, AuditError> {
        let row: Option<(i64, String)> = conn
            .query_row(
                "SELECT seq, record FROM audit_log ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|source| AuditError::Sqlite {
                location: self.location.clone(),
                source,
            })?;
        checked_tail(&self.location, row)
    }
}

impl AuditStore for SqliteStore {
    fn check(&mut self) -> Result<(), AuditError> {
        let tail = self.tail_row(&self.conn)?.map(|t| (t.seq, t.hash));
        if tail != self.last {
            return Err(AuditError::Write {
                location: self.location.clone(),
                reason: "its last record is not the one this server wrote last".into(),
            });
        }
        // The write lock an append takes (another client holding it made every append
        // wait 5 s and fail while a read said all was well: a re-attack's finding), and
        // room on the disk.
        let err = |source| AuditError::Sqlite {
            location: self.location.clone(),
            source,
        };
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .and_then(|tx| tx.rollback())
            .map_err(err)?;
        self.in_place()?;
        super::jsonl::has_room(&self.path, &self.location)
    }

    fn append(&mut self, events: &[&AuditEvent], unix_ms: u64) -> Result<(), AuditError> {
        self.in_place()?;
        let location = self.location.clone();
        let err = |source| AuditError::Sqlite {
            location: location.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let tail = {
            let row: Option<(i64, String)> = tx
                .query_row(
                    "SELECT seq, record FROM audit_log ORDER BY seq DESC LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(err)?;
            checked_tail(&location, row)?
        };
        let changed = |what: &str| AuditError::Write {
            location: location.clone(),
            reason: format!(
                "the audit database changed under the server ({what}): rows deleted, edited or \
                 added by another writer, or a trigger; nothing more is recorded until it is \
                 checked (nightingale audit verify) and the server restarted"
            ),
        };
        if tail.as_ref().map(|t| (t.seq, t.hash.as_str()))
            != self.last.as_ref().map(|(seq, hash)| (*seq, hash.as_str()))
        {
            return Err(changed(
                "its last record is not the one this server wrote last",
            ));
        }
        let mut end = None;
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO audit_log (seq, hash, record) VALUES (?1, ?2, ?3)")
                .map_err(err)?;
            for s in seal(tail.as_ref(), events, unix_ms) {
                let seq = i64::try_from(s.seq).map_err(|_| AuditError::Write {
                    location: location.clone(),
                    reason: "sequence number overflow".into(),
                })?;
                if insert.execute(params![seq, s.hash, s.line]).map_err(err)? != 1 {
                    return Err(changed("a record was not stored"));
                }
                end = Some((s.seq, s.hash));
            }
        }
        let stored: Option<(i64, String)> = tx
            .query_row(
                "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(err)?;
        let stored = stored.and_then(|(seq, hash)| u64::try_from(seq).ok().map(|s| (s, hash)));
        if end.is_some() && stored != end {
            return Err(changed("the records written are not the database's last"));
        }
        tx.commit().map_err(err)?;
        if end.is_some() {
            self.last = end;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("SQLite {}", self.location)
    }
}

/// Whether a file is an SQLite database (by its 16-byte header).
pub fn is_sqlite(path: &Path) -> bool {
    use std::io::Read;
    let mut header = [0u8; 16];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .is_ok()
        && &header == b"SQLite format 3\0"
}

/// Checks every record of an SQLite audit database in sequence order.
pub fn verify(path: &Path) -> Result<ChainSummary, AuditError> {
    verify_watching(path, None)
}

/// [`verify`], also keeping the record at sequence number `watch`.
pub fn verify_watching(path: &Path, watch: Option<u64>) -> Result<ChainSummary, AuditError> {
    let location = path.display().to_string();
    let err = |source| AuditError::Sqlite {
        location: location.clone(),
        source,
    };
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(err)?;
    let mut stmt = conn
        .prepare("SELECT seq, hash, record FROM audit_log ORDER BY seq")
        .map_err(err)?;
    let mut rows = stmt.query([]).map_err(err)?;
    let mut checker = ChainChecker::from_genesis();
    checker.watch = watch;
    while let Some(row) = rows.next().map_err(err)? {
        let seq: i64 = row.get(0).map_err(err)?;
        let hash: String = row.get(1).map_err(err)?;
        let record: String = row.get(2).map_err(err)?;
        super::check_row(&location, &mut checker, seq, &hash, &record)?;
    }
    Ok(ChainSummary {
        files: vec![],
        first_seq: checker.first_seq,
        records: checker.records,
        tail: checker.tail,
        watched: checker.watched,
        file_starts: Vec::new(),
    })
}
