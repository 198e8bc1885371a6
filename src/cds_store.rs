//! CDS Hooks cards and feedback kept across restarts (`<data-dir>/cds/feedback.sqlite3`).
//!
//! Every issued card's uuid, service, model and version (nothing about the patient) goes to
//! the store from a background writer, so a CDS call never waits for the disk; feedback is
//! written before `POST …/feedback` answers. At start-up the most recent cards refill the
//! in-memory [`CardLedger`] (so feedback on a card issued before a restart is still joined to
//! its model version) and the stored feedback refills the override counts. A card issued in
//! the last moments before a crash may not have reached the store: feedback on it is then
//! refused as an unknown card, as it would be once the ledger had forgotten it.
//!
//! What is stored of feedback is what the audit record holds: outcome, the number of accepted
//! suggestions, the override reason's coding, whether there was a comment (never the comment),
//! the outcome timestamp.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use chrono::{DateTime, Duration, Utc};
use nightingale_decision_support::feedback::{
    CardLedger, FeedbackEvent, IssuedCard, OverrideStats,
};
use nightingale_decision_support::hooks::Outcome;
use rusqlite::{Connection, params};

/// How long cards are kept for feedback to be joined to them.
pub const CARD_RETENTION_DAYS: i64 = 30;
/// Cards waiting for the writer; beyond, new cards are not stored (counted, logged).
const QUEUE: usize = 8192;

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("CDS store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("CDS store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The CDS feedback store.
pub struct CdsStore {
    path: PathBuf,
    db: Mutex<Connection>,
    /// `None` once dropping: the writer then drains what was queued and stops.
    cards: Option<SyncSender<(String, IssuedCard)>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for CdsStore {
    /// Stores what was queued before letting go (a graceful shutdown loses no card).
    fn drop(&mut self) {
        self.cards = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn open(path: &Path) -> rusqlite::Result<Connection> {
    // Its owner's alone, what is deleted overwritten (as the results store).
    nightingale_dicom::spool::private_database(path).map_err(crate::pipeline::store::io_error)?;
    let db = Connection::open(path)?;
    db.pragma_update(None, "secure_delete", true)?;
    db.busy_timeout(std::time::Duration::from_secs(10))?;
    // Another program's database, another store's, or a newer layout: refused before
    // anything in it is changed.
    nightingale_dicom::sqlite_schema::CDS.check(&db)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    Ok(db)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cards (
    uuid TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    model TEXT,
    version TEXT,
    issued_at TEXT NOT NULL,
    client TEXT
);
CREATE INDEX IF NOT EXISTS cards_issued ON cards(issued_at);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY,
    card TEXT NOT NULL,
    service TEXT NOT NULL,
    model TEXT,
    version TEXT,
    outcome TEXT NOT NULL,
    accepted_suggestions INTEGER NOT NULL,
    override_system TEXT,
    override_code TEXT,
    has_comment INTEGER NOT NULL,
    outcome_timestamp TEXT NOT NULL,
    received_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_card ON feedback(card);
CREATE INDEX IF NOT EXISTS feedback_received ON feedback(received_at);
";

impl CdsStore {
    /// Opens (creating) the store in `dir`, forgets cards older than the retention, and
    /// starts its writer.
    pub fn open(dir: &Path) -> Result<CdsStore, StoreError> {
        let path = dir.join("feedback.sqlite3");
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir)
            .and_then(|()| nightingale_dicom::spool::narrow(dir, 0o700))
            .map_err(|source| StoreError::Io {
                path: dir.to_owned(),
                source,
            })?;
        let db = open(&path).map_err(sql)?;
        crate::pipeline::store::quick_check(&db).map_err(sql)?;
        // A store from before cards kept their client (feedback from another EHR replaced
        // a card's outcome: a red-team finding) gets the column, its cards none: any client.
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS cards (uuid TEXT PRIMARY KEY, service TEXT NOT NULL,
             model TEXT, version TEXT, issued_at TEXT NOT NULL)",
        )
        .map_err(sql)?;
        let has_client: bool = db
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('cards') WHERE name = 'client'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(sql)?
            > 0;
        if !has_client {
            db.execute_batch("ALTER TABLE cards ADD COLUMN client TEXT")
                .map_err(sql)?;
        }
        // Indexes: a feedback item replaces its card's earlier one (a scan of every row per
        // item took 10 s a post at a million rows: a red-team finding).
        db.execute_batch(SCHEMA).map_err(sql)?;
        nightingale_dicom::sqlite_schema::CDS
            .mark(&db)
            .map_err(sql)?;
        let cutoff = (Utc::now() - Duration::days(CARD_RETENTION_DAYS)).to_rfc3339();
        db.execute("DELETE FROM cards WHERE issued_at < ?1", [&cutoff])
            .map_err(sql)?;
        // Feedback goes with its cards: kept as long, then forgotten (and no longer counted).
        db.execute("DELETE FROM feedback WHERE received_at < ?1", [&cutoff])
            .map_err(sql)?;
        let writer = open(&path).map_err(sql)?;
        let (tx, rx) = sync_channel(QUEUE);
        let writer_path = path.clone();
        let writer = std::thread::Builder::new()
            .name("cds-store".into())
            .spawn(move || write_cards(writer, rx, &writer_path))
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(CdsStore {
            path,
            db: Mutex::new(db),
            cards: Some(tx),
            writer: Some(writer),
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues cards for the writer (never blocks).
    pub fn record_cards(&self, cards: impl IntoIterator<Item = (String, IssuedCard)>) {
        let Some(queue) = &self.cards else {
            return;
        };
        for card in cards {
            match queue.try_send(card) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    metrics::counter!("nightingale_cds_store_dropped_cards_total").increment(1);
                    tracing::warn!("the CDS store's writer is behind: a card was not stored");
                }
                Err(TrySendError::Disconnected(_)) => {
                    metrics::counter!("nightingale_cds_store_dropped_cards_total").increment(1);
                }
            }
        }
    }

    /// Stores feedback (one transaction) before it is acknowledged.
    pub fn record_feedback(&self, events: &[FeedbackEvent]) -> Result<(), StoreError> {
        let sql = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let tx = db.transaction().map_err(sql)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO feedback (card, service, model, version, outcome, accepted_suggestions,
                     override_system, override_code, has_comment, outcome_timestamp, received_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )
                .map_err(sql)?;
            // Each card keeps its latest feedback only (it counts once, as that says).
            let mut forget = tx
                .prepare_cached("DELETE FROM feedback WHERE card = ?1")
                .map_err(sql)?;
            let now = Utc::now().to_rfc3339();
            for e in events {
                forget.execute([&e.card]).map_err(sql)?;
                insert
                    .execute(params![
                        e.card,
                        e.service,
                        e.model.as_ref().map(|m| &m.0),
                        e.model.as_ref().map(|m| &m.1),
                        outcome_name(e.outcome),
                        e.accepted_suggestions.len() as i64,
                        e.override_reason.as_ref().and_then(|c| c.system.clone()),
                        e.override_reason.as_ref().and_then(|c| c.code.clone()),
                        e.has_comment,
                        e.outcome_timestamp.to_rfc3339(),
                        now,
                    ])
                    .map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)
    }

    /// Refills a ledger with the most recent stored cards (at most its capacity) and the
    /// override counts with every stored feedback item. Returns (cards, feedback items).
    pub fn restore(
        &self,
        ledger: &mut CardLedger,
        stats: &mut OverrideStats,
    ) -> Result<(usize, u64), StoreError> {
        let sql = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let mut cards = db
            .prepare(
                "SELECT uuid, service, model, version, issued_at, client FROM
                 (SELECT rowid AS n, * FROM cards ORDER BY issued_at DESC, n DESC LIMIT ?1)
                 ORDER BY issued_at, n",
            )
            .map_err(sql)?;
        let rows = cards
            .query_map([ledger.capacity() as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })
            .map_err(sql)?;
        let mut n_cards = 0;
        for row in rows {
            let (uuid, service, model, version, issued_at, client) = row.map_err(sql)?;
            let Ok(issued_at) = DateTime::parse_from_rfc3339(&issued_at) else {
                continue;
            };
            ledger.remember(
                uuid,
                IssuedCard {
                    service,
                    model: model.zip(version),
                    client,
                    issued_at: issued_at.with_timezone(&Utc),
                    suggestions: vec![],
                },
            );
            n_cards += 1;
        }
        let mut counts = db
            .prepare(
                "SELECT service, model, version, outcome, COUNT(*) FROM feedback
                 WHERE id IN (SELECT max(id) FROM feedback GROUP BY card)
                 GROUP BY service, model, version, outcome",
            )
            .map_err(sql)?;
        let rows = counts
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(sql)?;
        let mut n_feedback = 0;
        for row in rows {
            let (service, model, version, outcome, n) = row.map_err(sql)?;
            let outcome = match outcome.as_str() {
                "accepted" => Outcome::Accepted,
                "overridden" => Outcome::Overridden,
                _ => continue,
            };
            stats.count(&service, model.zip(version), outcome, n.max(0) as u64);
            n_feedback += n.max(0) as u64;
        }
        // The remembered cards' latest outcomes, so that feedback sent again after a restart
        // replaces its card's outcome instead of counting it twice.
        let mut latest = db
            .prepare(
                "SELECT card, outcome FROM feedback
                 WHERE id IN (SELECT max(id) FROM feedback GROUP BY card)",
            )
            .map_err(sql)?;
        let rows = latest
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(sql)?;
        for row in rows {
            let (card, outcome) = row.map_err(sql)?;
            match outcome.as_str() {
                "accepted" => ledger.restore_outcome(&card, Outcome::Accepted),
                "overridden" => ledger.restore_outcome(&card, Outcome::Overridden),
                _ => {}
            }
        }
        Ok((n_cards, n_feedback))
    }
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Accepted => "accepted",
        Outcome::Overridden => "overridden",
    }
}

/// The writer: whatever is queued, in one transaction at a time.
fn write_cards(mut db: Connection, rx: Receiver<(String, IssuedCard)>, path: &Path) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 1024
            && let Ok(more) = rx.try_recv()
        {
            batch.push(more);
        }
        let result = (|| -> rusqlite::Result<()> {
            let tx = db.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT OR REPLACE INTO cards (uuid, service, model, version, issued_at, client)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                for (uuid, card) in &batch {
                    insert.execute(params![
                        uuid,
                        card.service,
                        card.model.as_ref().map(|m| &m.0),
                        card.model.as_ref().map(|m| &m.1),
                        card.issued_at.to_rfc3339(),
                        card.client,
                    ])?;
                }
            }
            tx.commit()
        })();
        if let Err(e) = result {
            metrics::counter!("nightingale_cds_store_dropped_cards_total")
                .increment(batch.len() as u64);
            tracing::error!(store = %path.display(), error = %e, cards = batch.len(), "CDS cards not stored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(service: &str, model: Option<(&str, &str)>, at: DateTime<Utc>) -> IssuedCard {
        IssuedCard {
            service: service.into(),
            model: model.map(|(m, v)| (m.into(), v.into())),
            client: Some("cds:https://ehr.example#a".into()),
            issued_at: at,
            suggestions: vec![],
        }
    }

    #[test]
    fn cards_and_feedback_come_back_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let now = Utc::now();
        {
            let store = CdsStore::open(dir.path()).unwrap();
            store.record_cards((0..5).map(|i| {
                (
                    format!("00000000-0000-0000-0000-00000000000{i}"),
                    card(
                        "risk",
                        Some(("icu-mortality", "1")),
                        now + Duration::seconds(i),
                    ),
                )
            }));
            store.record_cards([(
                "old".to_owned(),
                card("news2", None, now - Duration::days(CARD_RETENTION_DAYS + 1)),
            )]);
            let event = |card: &str, outcome| FeedbackEvent {
                card: card.into(),
                service: "risk".into(),
                model: Some(("icu-mortality".into(), "1".into())),
                outcome,
                accepted_suggestions: vec![],
                override_reason: None,
                has_comment: true,
                outcome_timestamp: now,
            };
            store
                .record_feedback(&[
                    event("a", Outcome::Overridden),
                    event("b", Outcome::Overridden),
                    event("c", Outcome::Accepted),
                ])
                .unwrap();
            // Card b's later feedback replaces its earlier outcome (one row per card).
            store
                .record_feedback(&[event("b", Outcome::Accepted)])
                .unwrap();
            // Dropping the store waits for its writer: every queued card is stored.
        }
        // Feedback received longer ago than the retention is forgotten at open, as cards are.
        let db = open(&dir.path().join("feedback.sqlite3")).unwrap();
        let old = (now - Duration::days(CARD_RETENTION_DAYS + 1)).to_rfc3339();
        db.execute(
            "UPDATE feedback SET received_at = ?1 WHERE card = 'a'",
            [old],
        )
        .unwrap();
        drop(db);
        let store = CdsStore::open(dir.path()).unwrap();
        // Capacity 3: the 3 most recent cards; the expired one was forgotten at open.
        let mut ledger = CardLedger::new(3);
        let mut stats = OverrideStats::default();
        let (cards, feedback) = store.restore(&mut ledger, &mut stats).unwrap();
        assert_eq!((cards, feedback), (3, 2));
        assert!(ledger.get("00000000-0000-0000-0000-000000000001").is_none());
        let c = ledger.get("00000000-0000-0000-0000-000000000004").unwrap();
        assert_eq!(c.model, Some(("icu-mortality".into(), "1".into())));
        // The client it was issued to comes back with it.
        assert_eq!(c.client.as_deref(), Some("cds:https://ehr.example#a"));
        assert!(ledger.get("old").is_none());
        assert_eq!(stats.counts("risk", Some(("icu-mortality", "1"))), (2, 0));
        // No comment text is stored anywhere.
        let text = std::fs::read(store.path()).unwrap();
        assert!(!String::from_utf8_lossy(&text).contains("free text"));
    }

    /// A store whose pages were damaged is refused at open (it opened, and every use then
    /// failed: a red-team finding on the results store, which shares the check).
    #[test]
    fn a_damaged_store_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = CdsStore::open(dir.path()).unwrap();
            store.record_cards((0..2000).map(|i| {
                (
                    format!("00000000-0000-0000-0000-{i:012}"),
                    card("risk", Some(("icu-mortality", "1")), Utc::now()),
                )
            }));
        }
        let path = dir.path().join("feedback.sqlite3");
        let db = open(&path).unwrap();
        db.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        drop(db);
        let mut bytes = std::fs::read(&path).unwrap();
        let page = 4096;
        assert!(bytes.len() > 6 * page, "{} bytes", bytes.len());
        for b in &mut bytes[3 * page + 8..4 * page] {
            *b = 0x5a;
        }
        std::fs::write(&path, bytes).unwrap();
        let Err(e) = CdsStore::open(dir.path()) else {
            panic!("a damaged store opened")
        };
        assert!(e.to_string().contains("damaged"), "{e}");
    }

    /// A store made before cards kept their client opens with the column added; its cards
    /// come back with none (feedback from any client counts for them).
    #[test]
    fn a_store_from_before_clients_were_kept_opens_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("feedback.sqlite3")).unwrap();
        db.execute_batch(
            "CREATE TABLE cards (uuid TEXT PRIMARY KEY, service TEXT NOT NULL, model TEXT,
             version TEXT, issued_at TEXT NOT NULL);",
        )
        .unwrap();
        db.execute(
            "INSERT INTO cards VALUES ('00000000-0000-0000-0000-000000000001', 'risk', NULL, NULL, ?1)",
            [Utc::now().to_rfc3339()],
        )
        .unwrap();
        drop(db);
        let store = CdsStore::open(dir.path()).unwrap();
        let mut ledger = CardLedger::new(3);
        let (cards, _) = store
            .restore(&mut ledger, &mut OverrideStats::default())
            .unwrap();
        assert_eq!(cards, 1);
        let c = ledger.get("00000000-0000-0000-0000-000000000001").unwrap();
        assert_eq!(c.client, None);
        // Opened again (the column there now): nothing to add.
        drop(store);
        CdsStore::open(dir.path()).unwrap();
    }
}
