//! Which store an embedded SQLite database is, and which version of its layout: SQLite's
//! own header fields `application_id` and `user_version` (PRAGMA), written when a store is
//! opened. A database of another program, another of Nightingale's stores, or a newer
//! layout than this binary knows is refused before anything in it is read or changed (each
//! was opened as it was, its tables made beside whatever it held: a README known issue).
//! Databases from before the mark are recognised by their main table and marked.
//!
//! Here rather than in the root package because the spool's index is this crate's; the root
//! package's stores (the pipeline's results, the CDS cards) use the same check.

use rusqlite::Connection;

/// One store's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schema {
    /// SQLite's `application_id`: four ASCII letters.
    pub application_id: i32,
    /// The layout this binary writes (`user_version`); it reads every earlier one.
    pub version: i32,
    /// What the store is, for messages.
    pub what: &'static str,
    /// A table every database of this store has had since its first version: an unmarked
    /// database holding it is one from before the mark.
    pub main_table: &'static str,
}

const fn tag(name: &[u8; 4]) -> i32 {
    i32::from_be_bytes(*name)
}

/// The DICOM spool's index (`index.sqlite3` in the spool).
pub const SPOOL_INDEX: Schema = Schema {
    application_id: tag(b"NGSP"),
    version: 1,
    what: "DICOM spool index",
    main_table: "instances",
};

/// The DICOM pipeline's results store (`results/results.sqlite3` in the data folder).
pub const RESULTS: Schema = Schema {
    application_id: tag(b"NGRS"),
    version: 1,
    what: "DICOM pipeline results store",
    main_table: "jobs",
};

/// The CDS Hooks cards and feedback store (`cds/feedback.sqlite3` in the data folder).
pub const CDS: Schema = Schema {
    application_id: tag(b"NGCD"),
    version: 1,
    what: "CDS cards and feedback store",
    main_table: "cards",
};

const STORES: [Schema; 3] = [SPOOL_INDEX, RESULTS, CDS];

fn refused(message: String) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_NOTADB),
        Some(message),
    )
}

impl Schema {
    /// Refuses a database that is not this store, or is of a newer layout; a new (empty)
    /// database, one of this store, and one from before the mark pass. Called before the
    /// store makes or changes any table; [`Schema::mark`] once it has.
    pub fn check(&self, db: &Connection) -> rusqlite::Result<()> {
        let application_id: i32 = db.query_row("PRAGMA application_id", [], |r| r.get(0))?;
        let version: i32 = db.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if application_id == self.application_id {
            if version > self.version {
                return Err(refused(format!(
                    "this {} was written by a newer Nightingale (layout {version}; this one knows up to {}): run that version on it, or move it aside",
                    self.what, self.version
                )));
            }
            return Ok(());
        }
        if let Some(other) = STORES.iter().find(|s| s.application_id == application_id) {
            return Err(refused(format!(
                "this database is Nightingale's {}, not its {}: name the right file",
                other.what, self.what
            )));
        }
        if application_id != 0 {
            return Err(refused(format!(
                "this database is another program's (application id {application_id:#010x}), not Nightingale's {}: move it aside",
                self.what
            )));
        }
        let tables: Vec<String> = db
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
            )?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if tables.is_empty() || tables.iter().any(|t| t == self.main_table) {
            return Ok(());
        }
        let mut shown: Vec<&str> = tables.iter().take(8).map(String::as_str).collect();
        if tables.len() > shown.len() {
            shown.push("…");
        }
        Err(refused(format!(
            "this database is not Nightingale's {} (its tables: {}): move it aside",
            self.what,
            shown.join(", ")
        )))
    }

    /// Writes this store's identity and layout into the database's header.
    pub fn mark(&self, db: &Connection) -> rusqlite::Result<()> {
        db.pragma_update(None, "application_id", self.application_id)?;
        db.pragma_update(None, "user_version", self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(r: rusqlite::Result<()>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn new_marked_older_foreign_and_newer_databases() {
        let dir = tempfile::tempdir().unwrap();
        // New: passes, then marked.
        let db = Connection::open(dir.path().join("new.sqlite3")).unwrap();
        SPOOL_INDEX.check(&db).unwrap();
        db.execute_batch("CREATE TABLE instances (x)").unwrap();
        SPOOL_INDEX.mark(&db).unwrap();
        SPOOL_INDEX.check(&db).unwrap();
        // Marked as another of Nightingale's stores: named.
        let e = refusal(RESULTS.check(&db));
        assert!(
            e.contains("DICOM spool index, not its DICOM pipeline results store"),
            "{e}"
        );
        // From before the mark: its main table says which store it is.
        let old = Connection::open(dir.path().join("old.sqlite3")).unwrap();
        old.execute_batch("CREATE TABLE jobs (x); CREATE TABLE series (y)")
            .unwrap();
        RESULTS.check(&old).unwrap();
        let e = refusal(CDS.check(&old));
        assert!(e.contains("its tables: jobs, series"), "{e}");
        // Another program's.
        let other = Connection::open(dir.path().join("other.sqlite3")).unwrap();
        other
            .pragma_update(None, "application_id", 0x0f055112)
            .unwrap();
        let e = refusal(CDS.check(&other));
        assert!(
            e.contains("another program's (application id 0x0f055112)"),
            "{e}"
        );
        // A newer layout of this store.
        db.pragma_update(None, "user_version", SPOOL_INDEX.version + 1)
            .unwrap();
        let e = refusal(SPOOL_INDEX.check(&db));
        assert!(e.contains("newer Nightingale"), "{e}");
        // The tags are four letters each, and distinct.
        assert_eq!(SPOOL_INDEX.application_id.to_be_bytes(), *b"NGSP");
        assert_ne!(RESULTS.application_id, CDS.application_id);
    }
}
