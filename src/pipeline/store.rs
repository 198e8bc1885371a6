//! The pipeline's state: series being assembled, jobs (series × bundle), and the result
//! objects waiting to be sent, in one embedded SQLite database (`results.sqlite3` in the
//! results folder). Every state is derived from here after a restart: the spool cursor says
//! which index rows were already seen, a job found `processing` is queued again, and an
//! object found `pending` is sent again.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// What a job is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Processing,
    Done,
    Failed,
    /// A later job (late instances, a reprocess) replaced this one; its results are kept.
    Superseded,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Processing => "processing",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Superseded => "superseded",
        }
    }

    fn parse(s: &str) -> JobState {
        match s {
            "queued" => JobState::Queued,
            "processing" => JobState::Processing,
            "done" => JobState::Done,
            "superseded" => JobState::Superseded,
            _ => JobState::Failed,
        }
    }
}

/// One (series, bundle) job.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: i64,
    pub study_uid: String,
    pub series_uid: String,
    pub route: String,
    pub bundle: String,
    /// The version that ran (empty until it ran).
    pub bundle_version: String,
    pub state: JobState,
    /// Why it failed (no patient data).
    pub reason: Option<String>,
    /// Instances of the series when the job was made.
    pub instances: u64,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// The findings, as the results report them (JSON), once done.
    pub findings: Option<serde_json::Value>,
    /// Where results go (`AE@host:port`, comma-separated).
    pub destinations: String,
}

/// The `done` jobs of job `id`'s series, bundle and route made before it become superseded:
/// `id` has just ended done and is now the series' result.
fn supersede_done_before(db: &rusqlite::Connection, id: i64) -> rusqlite::Result<usize> {
    db.execute(
        "UPDATE jobs SET state = 'superseded', updated_ms = ?2
         WHERE state = 'done' AND id < ?1
           AND (study_uid, series_uid, bundle, route) =
               (SELECT study_uid, series_uid, bundle, route FROM jobs WHERE id = ?1)",
        params![id, now_ms()],
    )
}

/// A result object (SR or SC) and its delivery.
#[derive(Debug, Clone, Serialize)]
pub struct ResultObject {
    pub sop_instance_uid: String,
    pub job_id: i64,
    /// `SR` or `SC`.
    pub kind: String,
    pub series_uid: String,
    pub sop_class_uid: String,
    /// The Part 10 file, relative to the results folder.
    pub path: String,
    /// `AE@host:port`, or empty when kept locally only.
    pub destination: String,
    /// `pending`, `sent`, `dead` (given up: moved to the dead-letter folder) or `local`.
    pub delivery: String,
    pub attempts: u32,
    pub next_attempt_ms: i64,
    pub last_error: Option<String>,
}

/// A series the assembler knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesRow {
    pub study_uid: String,
    pub series_uid: String,
    pub instances: u64,
    pub last_received_ms: i64,
    /// The instance count when it was last routed (0: never).
    pub routed_instances: u64,
    /// `assembling`, `routed`, `unmatched` or `failed`.
    pub state: String,
    pub reason: Option<String>,
    /// The highest arrival number (spool `seq`) of its instances seen (0: not known).
    pub last_row: i64,
}

/// What a purge deleted.
#[derive(Debug, Default)]
pub struct PurgeCounts {
    pub jobs: usize,
    pub objects: usize,
    pub series: usize,
    /// Result files to delete (relative to the results folder).
    pub files: Vec<String>,
}

pub struct ResultsStore {
    db: Connection,
}

/// An I/O error met while opening a store, as SQLite's "cannot open".
pub(crate) fn io_error(e: std::io::Error) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
        Some(format!("cannot make the store its owner's alone: {e}")),
    )
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Refuses a damaged SQLite database (`PRAGMA quick_check`): one whose pages were damaged
/// opened, the server answered ready and acknowledged DICOM, and the pipeline then failed on
/// it four times a second for good (a red-team finding).
pub fn quick_check(db: &Connection) -> rusqlite::Result<()> {
    let verdict: String = db.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if verdict != "ok" {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(format!(
                "the database is damaged ({}); restore it from a backup or move it aside",
                verdict.chars().take(200).collect::<String>()
            )),
        ));
    }
    Ok(())
}

impl ResultsStore {
    pub fn open(path: &Path) -> rusqlite::Result<ResultsStore> {
        // Its owner's alone, and what is deleted overwritten (it names studies, series and
        // patients' digests; a review found it 0644 and purged UIDs in its free pages).
        nightingale_dicom::spool::private_database(path).map_err(io_error)?;
        let db = Connection::open(path)?;
        db.pragma_update(None, "secure_delete", true)?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        // Another program's database, another store's, or a newer layout: refused before
        // anything in it is changed.
        nightingale_dicom::sqlite_schema::RESULTS.check(&db)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        quick_check(&db)?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS cursor (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                spool_row INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS series (
                study_uid TEXT NOT NULL,
                series_uid TEXT NOT NULL,
                instances INTEGER NOT NULL,
                last_received_ms INTEGER NOT NULL,
                routed_instances INTEGER NOT NULL DEFAULT 0,
                state TEXT NOT NULL,
                reason TEXT,
                updated_ms INTEGER NOT NULL,
                not_before_ms INTEGER NOT NULL DEFAULT 0,
                patient_sha256 TEXT,
                PRIMARY KEY (study_uid, series_uid)
            );
            CREATE INDEX IF NOT EXISTS series_patient ON series (patient_sha256);
            CREATE INDEX IF NOT EXISTS series_state ON series (state, last_received_ms);
            CREATE TABLE IF NOT EXISTS jobs (
                id INTEGER PRIMARY KEY,
                study_uid TEXT NOT NULL,
                series_uid TEXT NOT NULL,
                route TEXT NOT NULL,
                bundle TEXT NOT NULL,
                bundle_version TEXT NOT NULL DEFAULT '',
                state TEXT NOT NULL,
                reason TEXT,
                instances INTEGER NOT NULL,
                created_ms INTEGER NOT NULL,
                updated_ms INTEGER NOT NULL,
                findings TEXT,
                destinations TEXT NOT NULL DEFAULT ''
            );
            CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_uid, series_uid);
            CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
            CREATE TABLE IF NOT EXISTS objects (
                sop_instance_uid TEXT NOT NULL,
                job_id INTEGER NOT NULL,
                kind TEXT NOT NULL,
                series_uid TEXT NOT NULL,
                sop_class_uid TEXT NOT NULL,
                path TEXT NOT NULL,
                destination TEXT NOT NULL,
                delivery TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt_ms INTEGER NOT NULL DEFAULT 0,
                last_error TEXT,
                PRIMARY KEY (sop_instance_uid, destination)
            );
            CREATE INDEX IF NOT EXISTS objects_delivery ON objects (delivery, next_attempt_ms);
            CREATE INDEX IF NOT EXISTS objects_job ON objects (job_id);
            CREATE INDEX IF NOT EXISTS objects_series ON objects (series_uid);",
        )?;
        // The patient of the instances a job processed (SHA-256 of the Patient ID), recorded
        // when it ends done: stores made before it have none (their series' hash is read).
        if db.prepare("SELECT last_row FROM series LIMIT 0").is_err() {
            db.execute_batch(
                "ALTER TABLE series ADD COLUMN last_row INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE series ADD COLUMN routed_row INTEGER NOT NULL DEFAULT 0;",
            )?;
        }
        if db
            .prepare("SELECT patient_sha256 FROM jobs LIMIT 0")
            .is_err()
        {
            db.execute_batch("ALTER TABLE jobs ADD COLUMN patient_sha256 TEXT")?;
        }
        db.execute_batch("CREATE INDEX IF NOT EXISTS jobs_patient ON jobs (patient_sha256)")?;
        // The highest job id ever given: a job's id names it in the audit trail
        // (`pipeline-job-N`) and its result folder, and SQLite gives a deleted highest id
        // again (after retention purged every job, ids restarted at 1), so ids come from
        // this counter, never lowered by a purge.
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS job_seq (
                 id INTEGER PRIMARY KEY CHECK (id = 1),
                 high INTEGER NOT NULL
             );
             INSERT OR IGNORE INTO job_seq (id, high) SELECT 1, coalesce(max(id), 0) FROM jobs;",
        )?;
        // Operators' commands on the store (`results reprocess`, `results resend`), kept
        // until the server writes them to the audit trail, which it holds (they were in no
        // record: a review's finding). A table a binary from before it ignores.
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS operator_log (
                 id INTEGER PRIMARY KEY,
                 at_ms INTEGER NOT NULL,
                 by TEXT NOT NULL,
                 detail TEXT NOT NULL
             );",
        )?;
        nightingale_dicom::sqlite_schema::RESULTS.mark(&db)?;
        Ok(ResultsStore { db })
    }

    /// Keeps an operator's command (`by`: who; `detail`: `name=value` words, no patient
    /// data) until the server audits it ([`ResultsStore::operator_commands`]).
    pub fn log_operator(&self, by: &str, detail: &str) -> rusqlite::Result<()> {
        self.db.execute(
            "INSERT INTO operator_log (at_ms, by, detail) VALUES (?1, ?2, ?3)",
            params![now_ms(), by, detail],
        )?;
        Ok(())
    }

    /// Operators' commands not yet audited, oldest first: (id, when, who, detail).
    pub fn operator_commands(
        &self,
        limit: usize,
    ) -> rusqlite::Result<Vec<(i64, i64, String, String)>> {
        let mut stmt = self
            .db
            .prepare("SELECT id, at_ms, by, detail FROM operator_log ORDER BY id LIMIT ?1")?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
        rows.collect()
    }

    /// Forgets an operator's command once it is in the audit trail.
    pub fn operator_audited(&self, id: i64) -> rusqlite::Result<()> {
        self.db
            .execute("DELETE FROM operator_log WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Jobs that were running when the server stopped run again: for the server, as its
    /// pipeline starts, and for nobody else (a CLI or the retention task opening the store
    /// of a live server re-queued the job it was running, which then ran twice and sent two
    /// result sets: a review's finding). Returns how many.
    ///
    /// A job's objects are recorded with its end ([`ResultsStore::complete_job`]), so an
    /// interrupted job has none queued; rows still pending for one (left by a version that
    /// recorded each object as it was written) are dropped with it: the job's results are
    /// made again, whole, and a half set is not sent.
    pub fn requeue_interrupted(&self) -> rusqlite::Result<usize> {
        let tx = self.db.unchecked_transaction()?;
        tx.execute(
            "DELETE FROM objects WHERE delivery = 'pending'
               AND job_id IN (SELECT id FROM jobs WHERE state = 'processing')",
            [],
        )?;
        let requeued = tx.execute(
            "UPDATE jobs SET state = 'queued', updated_ms = ?1 WHERE state = 'processing'",
            [now_ms()],
        )?;
        tx.commit()?;
        Ok(requeued)
    }

    pub fn cursor(&self) -> rusqlite::Result<i64> {
        Ok(self
            .db
            .query_row("SELECT spool_row FROM cursor WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(0))
    }

    pub fn set_cursor(&self, row: i64) -> rusqlite::Result<()> {
        self.db.execute(
            "INSERT INTO cursor (id, spool_row) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET spool_row = excluded.spool_row",
            [row],
        )?;
        Ok(())
    }

    /// Records what the spool says about a series (new instances re-open a routed one).
    pub fn note_series(
        &self,
        study_uid: &str,
        series_uid: &str,
        instances: u64,
        last_received_ms: i64,
    ) -> rusqlite::Result<()> {
        self.note_series_at(study_uid, series_uid, instances, last_received_ms, 0)
    }

    /// [`ResultsStore::note_series`] with the highest arrival number (`seq`) of the series'
    /// instances: an instance that arrived after the series was routed re-opens it even when
    /// the count is the one routed (retention purged older ones: a late instance was never
    /// processed, a red-team finding).
    pub fn note_series_at(
        &self,
        study_uid: &str,
        series_uid: &str,
        instances: u64,
        last_received_ms: i64,
        last_row: i64,
    ) -> rusqlite::Result<()> {
        self.db.execute(
            "INSERT INTO series (study_uid, series_uid, instances, last_received_ms, state,
                                 updated_ms, last_row)
             VALUES (?1, ?2, ?3, ?4, 'assembling', ?5, ?6)
             ON CONFLICT (study_uid, series_uid) DO UPDATE SET
                instances = excluded.instances,
                last_received_ms = excluded.last_received_ms,
                state = CASE WHEN excluded.instances != series.routed_instances
                                  OR excluded.last_row > series.routed_row
                             THEN 'assembling' ELSE series.state END,
                not_before_ms = CASE WHEN excluded.instances != series.instances
                                          OR excluded.last_row > series.last_row
                                     THEN 0 ELSE series.not_before_ms END,
                last_row = max(series.last_row, excluded.last_row),
                updated_ms = excluded.updated_ms",
            params![
                study_uid,
                series_uid,
                instances as i64,
                last_received_ms,
                now_ms(),
                last_row
            ],
        )?;
        Ok(())
    }

    /// Series still assembling whose last instance arrived at or before `quiet_before_ms`,
    /// or that have at least `complete_at` instances.
    pub fn series_ready(
        &self,
        quiet_before_ms: i64,
        complete_at: Option<u64>,
        limit: usize,
    ) -> rusqlite::Result<Vec<SeriesRow>> {
        let mut stmt = self.db.prepare_cached(
            "SELECT study_uid, series_uid, instances, last_received_ms, routed_instances,
                    state, reason, last_row
             FROM series WHERE state = 'assembling' AND not_before_ms <= ?4
               AND (last_received_ms <= ?1 OR (?2 IS NOT NULL AND instances >= ?2))
             ORDER BY last_received_ms LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![
                quiet_before_ms,
                complete_at.map(|c| c as i64),
                limit as i64,
                now_ms()
            ],
            series_row,
        )?;
        rows.collect()
    }

    /// Records the SHA-256 of the series' Patient ID (CDS imaging cards find a patient's
    /// results by it).
    pub fn set_patient(
        &self,
        row: &SeriesRow,
        patient_sha256: Option<&str>,
    ) -> rusqlite::Result<()> {
        self.db.execute(
            "UPDATE series SET patient_sha256 = ?3 WHERE study_uid = ?1 AND series_uid = ?2",
            params![row.study_uid, row.series_uid, patient_sha256],
        )?;
        Ok(())
    }

    /// The latest finished (`done`) jobs of a patient's series, newest first.
    pub fn done_jobs_of_patient(
        &self,
        patient_sha256: &str,
        limit: usize,
    ) -> rusqlite::Result<Vec<Job>> {
        let mut stmt = self.db.prepare_cached(
            "SELECT j.id, j.study_uid, j.series_uid, j.route, j.bundle, j.bundle_version,
                    j.state, j.reason, j.instances, j.created_ms, j.updated_ms, j.findings,
                    j.destinations
             FROM jobs j LEFT JOIN series s
               ON s.study_uid = j.study_uid AND s.series_uid = j.series_uid
             WHERE j.patient_sha256 = ?1
               AND j.state = 'done'
               AND j.id = (SELECT max(k.id) FROM jobs k WHERE k.state = 'done'
                           AND k.study_uid = j.study_uid AND k.series_uid = j.series_uid
                           AND k.bundle = j.bundle)
             ORDER BY j.updated_ms DESC, j.id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![patient_sha256, limit as i64], job_row)?;
        rows.collect()
    }

    /// Records whose instances job `id` processed: the SHA-256 of their Patient ID (the
    /// imaging cards find a patient's results by it). The series' own hash follows its first
    /// instance now, which after a purge may be another patient's under the same Series
    /// Instance UID: read through it, patient X's finding was shown on patient Y's card (a
    /// red-team finding).
    pub fn set_job_patient(&self, id: i64, patient_sha256: Option<&str>) -> rusqlite::Result<()> {
        self.db.execute(
            "UPDATE jobs SET patient_sha256 = ?2 WHERE id = ?1",
            params![id, patient_sha256],
        )?;
        Ok(())
    }

    /// A series some of whose routes want a longer quiet time: not looked at again before
    /// `until_ms` (or a new instance).
    pub fn defer_series(&self, row: &SeriesRow, until_ms: i64) -> rusqlite::Result<()> {
        self.db.execute(
            "UPDATE series SET not_before_ms = ?3, updated_ms = ?4
             WHERE study_uid = ?1 AND series_uid = ?2",
            params![row.study_uid, row.series_uid, until_ms, now_ms()],
        )?;
        Ok(())
    }

    /// Sets a job's reason (a queued job waiting for its bundle), or clears it.
    pub fn set_job_reason(&self, id: i64, reason: Option<&str>) -> rusqlite::Result<()> {
        self.db.execute(
            "UPDATE jobs SET reason = ?2 WHERE id = ?1",
            params![id, reason],
        )?;
        Ok(())
    }

    /// Series in `state`, or in every state but `routed` (waiting, unmatched, failed) and
    /// those routed without a bundle, the latest first (a route naming a bundle gone for good
    /// lists every series it matches: newer failures were pushed out of the first page, a
    /// re-attack's finding), at most `limit`: `nightingale results list`, for an operator
    /// to find the studies to look at (the log names series by a hash only).
    pub fn series_in_state(
        &self,
        state: Option<&str>,
        limit: usize,
    ) -> rusqlite::Result<Vec<SeriesRow>> {
        let mut stmt = self.db.prepare(
            "SELECT study_uid, series_uid, instances, last_received_ms, routed_instances,
                    state, reason, last_row
             FROM series
             WHERE (?1 IS NULL AND (state != 'routed'
                                    OR substr(reason, 1, length(?3)) = ?3))
                OR state = ?1
             ORDER BY updated_ms DESC, study_uid, series_uid LIMIT ?2",
        )?;
        let rows = stmt.query_map(
            params![state, limit as i64, super::ROUTED_WITHOUT],
            series_row,
        )?;
        rows.collect()
    }

    /// Jobs in `state`, or queued, processing and failed ones (a failed job stays failed
    /// until a rerun supersedes it), the oldest first, at most `limit`.
    pub fn jobs_in_state(&self, state: Option<&str>, limit: usize) -> rusqlite::Result<Vec<Job>> {
        let mut stmt = self.db.prepare(&format!(
            "{JOB_SELECT} WHERE (?1 IS NULL AND state IN ('queued', 'processing', 'failed'))
                OR state = ?1
             ORDER BY id LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![state, limit as i64], job_row)?;
        rows.collect()
    }

    /// Puts the study's series that no route took (`unmatched`, and no job), and those
    /// routed without a bundle their routes name ([`super::ROUTED_WITHOUT`]; with `bundle`,
    /// only those that have no job of it), back to be routed again, as if they had just
    /// arrived (every route that takes them runs), when `keep` accepts them (by Series
    /// Instance UID): `nightingale results reprocess` of a series that arrived while its
    /// bundle was not in the repository, or before its route was configured. Returns their
    /// UIDs.
    pub fn reroute_unmatched(
        &self,
        study_uid: &str,
        bundle: Option<&str>,
        keep: impl Fn(&str) -> bool,
    ) -> rusqlite::Result<Vec<String>> {
        let unmatched: Vec<String> = {
            let mut stmt = self.db.prepare(
                "SELECT series_uid, state, coalesce(reason, '') FROM series s
                 WHERE study_uid = ?1
                   AND ((state = 'unmatched'
                         AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_uid = s.study_uid
                                         AND j.series_uid = s.series_uid))
                        OR (state = 'routed' AND substr(reason, 1, length(?2)) = ?2))
                 ORDER BY series_uid",
            )?;
            let rows = stmt.query_map(params![study_uid, super::ROUTED_WITHOUT], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            let rows = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            // A series routed without bundles is routed again for one of them only (`bundle`
            // another, or unknown, re-ran and resent every other bundle's results: a
            // re-attack's finding).
            rows.into_iter()
                .filter(|(_, state, reason)| {
                    state == "unmatched"
                        || bundle.is_none_or(|b| super::routed_without(reason).contains(&b))
                })
                .map(|(series, _, _)| series)
                .collect()
        };
        let mut out = Vec::new();
        for series in unmatched {
            if !keep(&series) {
                continue;
            }
            self.db.execute(
                "UPDATE series SET state = 'assembling', reason = NULL, not_before_ms = 0,
                                   updated_ms = ?3
                 WHERE study_uid = ?1 AND series_uid = ?2",
                params![study_uid, series, now_ms()],
            )?;
            out.push(series);
        }
        Ok(out)
    }

    pub fn series(&self, study_uid: &str) -> rusqlite::Result<Vec<SeriesRow>> {
        let mut stmt = self.db.prepare_cached(
            "SELECT study_uid, series_uid, instances, last_received_ms, routed_instances,
                    state, reason, last_row
             FROM series WHERE study_uid = ?1 ORDER BY series_uid",
        )?;
        let rows = stmt.query_map([study_uid], series_row)?;
        rows.collect()
    }

    /// Marks a series routed (`routed`), unmatched or failed, at its current count.
    pub fn settle_series(
        &self,
        row: &SeriesRow,
        state: &str,
        reason: Option<&str>,
    ) -> rusqlite::Result<()> {
        self.db.execute(
            "UPDATE series SET state = ?3, reason = ?4, routed_instances = ?5, updated_ms = ?6,
                               routed_row = max(routed_row, ?7)
             WHERE study_uid = ?1 AND series_uid = ?2",
            params![
                row.study_uid,
                row.series_uid,
                state,
                reason,
                row.instances as i64,
                now_ms(),
                row.last_row
            ],
        )?;
        Ok(())
    }

    /// A new queued job; earlier jobs of the same series, bundle and route that are queued,
    /// processing or failed become superseded, a job still processing included (its end
    /// then records nothing: its results are not sent; two jobs of one series and bundle
    /// ended `done` when a rerun was queued while the first ran, a red-team finding). A
    /// `done` one stays the series' result until the new job ends done
    /// ([`ResultsStore::complete_job`]): a rerun that fails (a late instance of another
    /// patient) left the series with no result while its SR stood at the PACS (a red-team
    /// finding). Each route has its own jobs: two
    /// routes that run one bundle on a series each send to their own destinations (keyed by
    /// series and bundle alone, the second route's job superseded the first's, whose PACS
    /// got nothing).
    pub fn add_job(
        &self,
        study_uid: &str,
        series_uid: &str,
        route: &str,
        bundle: &str,
        instances: u64,
        destinations: &str,
    ) -> rusqlite::Result<i64> {
        let now = now_ms();
        // One transaction under the write lock: the earlier jobs are superseded only with
        // their successor queued, and two processes (the server, `results reprocess`) never
        // take one id.
        let tx = rusqlite::Transaction::new_unchecked(
            &self.db,
            rusqlite::TransactionBehavior::Immediate,
        )?;
        tx.execute(
            "UPDATE jobs SET state = 'superseded', updated_ms = ?4
             WHERE study_uid = ?1 AND series_uid = ?2 AND bundle = ?3 AND route = ?5
               AND state IN ('queued', 'processing', 'failed')",
            params![study_uid, series_uid, bundle, now, route],
        )?;
        let id: i64 = tx.query_row(
            "UPDATE job_seq SET high = max(high, (SELECT coalesce(max(id), 0) FROM jobs)) + 1
             WHERE id = 1 RETURNING high",
            [],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO jobs (id, study_uid, series_uid, route, bundle, state, instances,
                               created_ms, updated_ms, destinations)
             VALUES (?8, ?1, ?2, ?3, ?4, 'queued', ?5, ?6, ?6, ?7)",
            params![
                study_uid,
                series_uid,
                route,
                bundle,
                instances as i64,
                now,
                destinations,
                id
            ],
        )?;
        tx.commit()?;
        Ok(id)
    }

    /// Queues the study again (`nightingale results reprocess`): a new job for the latest
    /// job of each (series, bundle, route) of the study, or of `bundle` only, with the same
    /// route and destinations. The earlier jobs are kept, superseded. Returns the new jobs' ids.
    pub fn reprocess(&self, study_uid: &str, bundle: Option<&str>) -> rusqlite::Result<Vec<i64>> {
        self.reprocess_series(study_uid, bundle, |_| true)
    }

    /// [`ResultsStore::reprocess`] of the series `keep` accepts (by Series Instance UID)
    /// only: the others' jobs are left as they are.
    pub fn reprocess_series(
        &self,
        study_uid: &str,
        bundle: Option<&str>,
        keep: impl Fn(&str) -> bool,
    ) -> rusqlite::Result<Vec<i64>> {
        let latest: Vec<(String, String, String, u64, String)> = {
            let mut stmt = self.db.prepare(
                // The series' instances now (a job processes the first `instances` of
                // its series): those that came since the last job, kept out of it by
                // `--late-instances ignore`, are the operator's reason to reprocess.
                "SELECT series_uid, route, bundle,
                        max(instances, coalesce((SELECT s.instances FROM series s
                            WHERE s.study_uid = jobs.study_uid
                              AND s.series_uid = jobs.series_uid), 0)),
                        destinations FROM jobs
                 WHERE id IN (SELECT max(id) FROM jobs WHERE study_uid = ?1
                              AND (?2 IS NULL OR bundle = ?2)
                              GROUP BY series_uid, bundle, route)
                 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![study_uid, bundle], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get::<_, i64>(3)?.max(0) as u64,
                    r.get(4)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut ids = Vec::with_capacity(latest.len());
        for (series, route, bundle, instances, destinations) in latest {
            if !keep(&series) {
                continue;
            }
            ids.push(self.add_job(
                study_uid,
                &series,
                &route,
                &bundle,
                instances,
                &destinations,
            )?);
        }
        Ok(ids)
    }

    /// Deletes what finished before `cutoff_ms` (retention): jobs done, failed or superseded
    /// and their objects not waiting to be sent, and series no longer assembling. Returns
    /// the result files (relative to the results folder) that no row references any more:
    /// one file is shared by the rows of every destination of an object, and a row still
    /// pending (another destination that has not had it yet) keeps it. With `dry_run`,
    /// nothing is deleted (the counts say what would be).
    pub fn purge(&mut self, cutoff_ms: i64, dry_run: bool) -> rusqlite::Result<PurgeCounts> {
        // Immediate: it reads, then writes; a deferred transaction whose read snapshot a
        // writer (the server's pipeline re-queueing jobs at start-up) had moved past failed
        // at once with "database is locked", the busy timeout not applying (a review saw
        // retention fail so after a kill -9).
        let tx = self
            .db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let candidates: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT DISTINCT o.path FROM objects o JOIN jobs j ON j.id = o.job_id
                 WHERE j.updated_ms < ?1 AND j.state IN ('done', 'failed', 'superseded')
                   AND o.delivery != 'pending'",
            )?;
            let rows = stmt.query_map([cutoff_ms], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let objects = tx.execute(
            "DELETE FROM objects WHERE delivery != 'pending' AND job_id IN
                (SELECT id FROM jobs WHERE updated_ms < ?1
                 AND state IN ('done', 'failed', 'superseded'))",
            [cutoff_ms],
        )?;
        let jobs = tx.execute(
            "DELETE FROM jobs WHERE updated_ms < ?1 AND state IN ('done', 'failed', 'superseded')
               AND id NOT IN (SELECT job_id FROM objects)",
            [cutoff_ms],
        )?;
        let series = tx.execute(
            "DELETE FROM series WHERE updated_ms < ?1 AND state != 'assembling'
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_uid = series.study_uid
                               AND j.series_uid = series.series_uid)",
            [cutoff_ms],
        )?;
        // After the deletes: only the files no remaining row (pending or kept) refers to.
        let files = {
            let mut still = tx.prepare("SELECT 1 FROM objects WHERE path = ?1")?;
            let mut files = Vec::with_capacity(candidates.len());
            for path in candidates {
                if !still.exists([&path])? {
                    files.push(path);
                }
            }
            files
        };
        if !dry_run {
            tx.commit()?;
        }
        Ok(PurgeCounts {
            jobs,
            objects,
            series,
            files,
        })
    }

    /// The oldest queued job of a bundle in `serving`, or made before `waited_out_ms` (it
    /// has waited long enough for its bundle: it runs, and fails if the bundle is still not
    /// serving), marked processing. A job of a bundle that is not serving (unloaded by an
    /// operator, moved away for a deployment) waits in the queue for it: such jobs failed
    /// `bundle_unavailable` for good, a review's finding.
    pub fn take_job(
        &self,
        serving: &[String],
        waited_out_ms: i64,
    ) -> rusqlite::Result<Option<Job>> {
        let serving = serde_json::to_string(serving).unwrap_or_else(|_| "[]".to_owned());
        let job = self
            .db
            .query_row(
                &format!(
                    "{JOB_SELECT} WHERE state = 'queued'
                       AND (bundle IN (SELECT value FROM json_each(?1)) OR created_ms < ?2)
                     ORDER BY id LIMIT 1"
                ),
                params![serving, waited_out_ms],
                job_row,
            )
            .optional()?;
        if let Some(job) = &job {
            self.db.execute(
                "UPDATE jobs SET state = 'processing', updated_ms = ?2 WHERE id = ?1",
                params![job.id, now_ms()],
            )?;
        }
        Ok(job.map(|j| Job {
            state: JobState::Processing,
            ..j
        }))
    }

    /// Puts a processing job back in the queue (its run could not be recorded: the audit
    /// trail failing). Returns whether it was processing.
    pub fn requeue_job(&self, id: i64) -> rusqlite::Result<bool> {
        let updated = self.db.execute(
            "UPDATE jobs SET state = 'queued', updated_ms = ?2 WHERE id = ?1 AND state = 'processing'",
            params![id, now_ms()],
        )?;
        Ok(updated > 0)
    }

    /// Ends a job (done or failed).
    pub fn finish_job(
        &self,
        id: i64,
        state: JobState,
        bundle_version: &str,
        reason: Option<&str>,
        findings: Option<&serde_json::Value>,
    ) -> rusqlite::Result<()> {
        let tx = self.db.unchecked_transaction()?;
        let updated = tx.execute(
            "UPDATE jobs SET state = ?2, bundle_version = ?3, reason = ?4, findings = ?5,
                             updated_ms = ?6
             WHERE id = ?1 AND state = 'processing'",
            params![
                id,
                state.as_str(),
                bundle_version,
                reason,
                findings.map(|f| f.to_string()),
                now_ms()
            ],
        )?;
        if updated > 0 && state == JobState::Done {
            supersede_done_before(&tx, id)?;
        }
        tx.commit()
    }

    /// Ends a job done together with its result objects, in one transaction: the outbox
    /// (and WADO-RS, and `/results`) see a job's objects only once every one of them is
    /// written and the job is done, so a stop in between leaves nothing queued and the job
    /// runs again from nothing at the next start (a kill between the SR and the SC sent the
    /// SR alone, then a second result set: a review's finding). Returns false, recording
    /// nothing, when the job is no longer processing.
    pub fn complete_job(
        &self,
        id: i64,
        bundle_version: &str,
        findings: Option<&serde_json::Value>,
        objects: &[ResultObject],
    ) -> rusqlite::Result<bool> {
        let tx = self.db.unchecked_transaction()?;
        let updated = tx.execute(
            "UPDATE jobs SET state = 'done', bundle_version = ?2, reason = NULL, findings = ?3,
                             updated_ms = ?4
             WHERE id = ?1 AND state = 'processing'",
            params![
                id,
                bundle_version,
                findings.map(|f| f.to_string()),
                now_ms()
            ],
        )?;
        if updated == 0 {
            return Ok(false);
        }
        supersede_done_before(&tx, id)?;
        for o in objects {
            insert_object(&tx, o)?;
        }
        tx.commit()?;
        Ok(true)
    }

    pub fn jobs_of_study(&self, study_uid: &str) -> rusqlite::Result<Vec<Job>> {
        let mut stmt = self
            .db
            .prepare_cached(&format!("{JOB_SELECT} WHERE study_uid = ?1 ORDER BY id"))?;
        let rows = stmt.query_map([study_uid], job_row)?;
        rows.collect()
    }

    /// The newest `limit` jobs of a study (oldest first) and how many older ones there are
    /// besides, with their result objects (one query each, not one per job: a study of
    /// 60,000 jobs held the store for 17 s, and every CDS call and the pipeline with it: a
    /// review's finding).
    /// Also the series that have any job.
    #[allow(clippy::type_complexity)]
    pub fn study_results(
        &self,
        study_uid: &str,
        limit: usize,
    ) -> rusqlite::Result<(
        Vec<Job>,
        usize,
        Vec<ResultObject>,
        std::collections::HashSet<String>,
    )> {
        let total: i64 = self.db.query_row(
            "SELECT count(*) FROM jobs WHERE study_uid = ?1",
            [study_uid],
            |r| r.get(0),
        )?;
        let mut jobs: Vec<Job> = {
            let mut stmt = self.db.prepare_cached(&format!(
                "{JOB_SELECT} WHERE study_uid = ?1 ORDER BY id DESC LIMIT ?2"
            ))?;
            stmt.query_map(params![study_uid, limit as i64], job_row)?
                .collect::<rusqlite::Result<_>>()?
        };
        jobs.reverse();
        let first = jobs.first().map_or(i64::MAX, |j| j.id);
        let objects = {
            let mut stmt = self.db.prepare_cached(
                "SELECT o.sop_instance_uid, o.job_id, o.kind, o.series_uid, o.sop_class_uid,
                        o.path, o.destination, o.delivery, o.attempts, o.next_attempt_ms,
                        o.last_error
                 FROM objects o JOIN jobs j ON j.id = o.job_id
                 WHERE j.study_uid = ?1 AND j.id >= ?2
                 ORDER BY o.job_id, o.kind DESC, o.sop_instance_uid",
            )?;
            stmt.query_map(params![study_uid, first], object_row)?
                .collect::<rusqlite::Result<_>>()?
        };
        let left_out = (total.max(0) as usize).saturating_sub(jobs.len());
        let with_jobs = {
            let mut stmt = self
                .db
                .prepare_cached("SELECT DISTINCT series_uid FROM jobs WHERE study_uid = ?1")?;
            stmt.query_map([study_uid], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        Ok((jobs, left_out, objects, with_jobs))
    }

    /// Adds a result object of a job, with its delivery state.
    pub fn add_object(&self, o: &ResultObject) -> rusqlite::Result<()> {
        insert_object(&self.db, o)
    }

    /// Whether `series_uid` is the series of a result object this node made: such a
    /// series, sent back in (a PACS that forwards new objects to the AI node), is not
    /// processed again.
    pub fn is_result_series(&self, series_uid: &str) -> rusqlite::Result<bool> {
        let mut stmt = self
            .db
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM objects WHERE series_uid = ?1)")?;
        stmt.query_row([series_uid], |r| r.get(0))
    }

    /// The result objects of jobs done since `since_ms`, once each whatever their
    /// destinations: (study, series, SOP Instance UID, path relative to the results folder).
    pub fn done_objects_since(
        &self,
        since_ms: i64,
    ) -> rusqlite::Result<Vec<(String, String, String, String)>> {
        let mut stmt = self.db.prepare(
            "SELECT DISTINCT j.study_uid, o.series_uid, o.sop_instance_uid, o.path
             FROM objects o JOIN jobs j ON j.id = o.job_id
             WHERE j.state = 'done' AND j.updated_ms >= ?1 AND o.delivery != 'dead'",
        )?;
        let rows = stmt.query_map([since_ms], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
        rows.collect()
    }

    /// The SR an earlier job of the same series, bundle and route recorded (the newest; not
    /// one that no destination took): (series UID, SOP Class UID, SOP Instance UID). A job
    /// that replaces it names it as its SR's predecessor.
    pub fn predecessor_sr(&self, job: &Job) -> rusqlite::Result<Option<(String, String, String)>> {
        use rusqlite::OptionalExtension as _;
        let mut stmt = self.db.prepare_cached(
            "SELECT o.series_uid, o.sop_class_uid, o.sop_instance_uid
             FROM objects o JOIN jobs j ON j.id = o.job_id
             WHERE j.study_uid = ?1 AND j.series_uid = ?2 AND j.bundle = ?3 AND j.route = ?4
               AND j.id < ?5 AND o.kind = 'SR' AND o.delivery != 'dead'
             ORDER BY j.id DESC LIMIT 1",
        )?;
        stmt.query_row(
            rusqlite::params![job.study_uid, job.series_uid, job.bundle, job.route, job.id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
    }

    pub fn objects_of_job(&self, job_id: i64) -> rusqlite::Result<Vec<ResultObject>> {
        let mut stmt = self.db.prepare_cached(&format!(
            "{OBJECT_SELECT} WHERE job_id = ?1 ORDER BY kind DESC, sop_instance_uid"
        ))?;
        let rows = stmt.query_map([job_id], object_row)?;
        rows.collect()
    }

    /// Result objects not delivered, with their job's Study Instance UID, latest job first:
    /// given up (`dead`: in the dead-letter folder) and, unless `which` is `dead`, still
    /// tried after a failed attempt (`pending` with attempts made; `which` = `pending`
    /// lists only those).
    pub fn undelivered(
        &self,
        which: Option<&str>,
        limit: usize,
    ) -> rusqlite::Result<Vec<(String, ResultObject)>> {
        let mut stmt = self.db.prepare(
            "SELECT j.study_uid, o.sop_instance_uid, o.job_id, o.kind, o.series_uid,
                    o.sop_class_uid, o.path, o.destination, o.delivery, o.attempts,
                    o.next_attempt_ms, o.last_error
             FROM objects o JOIN jobs j ON j.id = o.job_id
             WHERE (o.delivery = 'dead' AND coalesce(?1, 'dead') = 'dead')
                OR (o.delivery = 'pending' AND o.attempts > 0
                    AND coalesce(?1, 'pending') = 'pending')
             ORDER BY o.job_id DESC, o.kind DESC, o.destination LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![which, limit as i64], |r| {
            Ok((
                r.get(0)?,
                ResultObject {
                    sop_instance_uid: r.get(1)?,
                    job_id: r.get(2)?,
                    kind: r.get(3)?,
                    series_uid: r.get(4)?,
                    sop_class_uid: r.get(5)?,
                    path: r.get(6)?,
                    destination: r.get(7)?,
                    delivery: r.get(8)?,
                    attempts: r.get(9)?,
                    next_attempt_ms: r.get(10)?,
                    last_error: r.get(11)?,
                },
            ))
        })?;
        rows.collect()
    }

    /// Puts result objects given up (`dead`) back to be sent, as new, from their file (the
    /// dead-letter copy): those of done jobs (not superseded, nor about to be: no later job
    /// of the same series, bundle and route, a `reprocess` queued) of `study` and to
    /// `destination` where given, whose file `has_file` finds (given the path relative to
    /// the results folder). `nightingale results resend`, once a destination is back: they
    /// were given up after a minute's outage and nothing sent them again (a review's
    /// finding). Returns (put back, left for want of their file).
    pub fn resend_dead(
        &mut self,
        study: Option<&str>,
        destination: Option<&str>,
        has_file: impl Fn(&str) -> bool,
    ) -> rusqlite::Result<(usize, usize)> {
        let tx = self.db.transaction()?;
        let dead: Vec<(String, String, String)> = {
            let mut stmt = tx.prepare(
                "SELECT o.sop_instance_uid, o.destination, o.path
                 FROM objects o JOIN jobs j ON j.id = o.job_id
                 WHERE o.delivery = 'dead' AND j.state = 'done'
                   AND (?1 IS NULL OR j.study_uid = ?1)
                   AND (?2 IS NULL OR o.destination = ?2)
                   AND NOT EXISTS (SELECT 1 FROM jobs k
                       WHERE k.study_uid = j.study_uid AND k.series_uid = j.series_uid
                         AND k.bundle = j.bundle AND k.route = j.route AND k.id > j.id)",
            )?;
            stmt.query_map(params![study, destination], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?
        };
        let (mut queued, mut missing) = (0, 0);
        for (sop, dest, path) in dead {
            if dest.is_empty() || !has_file(&path) {
                missing += usize::from(!dest.is_empty());
                continue;
            }
            tx.execute(
                "UPDATE objects SET delivery = 'pending', attempts = 0, next_attempt_ms = ?3,
                        last_error = 'sent again (nightingale results resend)'
                 WHERE sop_instance_uid = ?1 AND destination = ?2 AND delivery = 'dead'",
                params![sop, dest, now_ms()],
            )?;
            queued += 1;
        }
        tx.commit()?;
        Ok((queued, missing))
    }

    /// The file of a result object (relative to the results folder), by its study, series
    /// and SOP Instance UIDs: the copy waiting in or sent from the objects folder first,
    /// else a dead letter's copy.
    /// Whether any object row names `path` (a result file shared by the rows of an object's
    /// destinations).
    pub fn path_referenced(&self, path: &str) -> rusqlite::Result<bool> {
        self.db
            .prepare_cached("SELECT 1 FROM objects WHERE path = ?1 LIMIT 1")?
            .exists([path])
    }

    pub fn object_path(
        &self,
        study_uid: &str,
        series_uid: &str,
        sop_instance_uid: &str,
    ) -> rusqlite::Result<Option<String>> {
        let mut stmt = self.db.prepare_cached(
            "SELECT o.path FROM objects o JOIN jobs j ON j.id = o.job_id
             WHERE o.sop_instance_uid = ?3 AND o.series_uid = ?2 AND j.study_uid = ?1
             ORDER BY o.delivery = 'dead' LIMIT 1",
        )?;
        let mut rows = stmt.query_map(params![study_uid, series_uid, sop_instance_uid], |r| {
            r.get::<_, String>(0)
        })?;
        rows.next().transpose()
    }

    /// Pending objects due by `now`, for destinations other than `busy` (those with a
    /// delivery under way), by job, oldest first. An object of an earlier job of the same
    /// series and destination goes with a due one even before its own back-off ends: each
    /// object kept its own back-off, so after an outage a superseded job's results (more
    /// attempts, a longer back-off) reached PACS after those that replace them, and a PACS
    /// showing the latest result showed the stale one (a review's finding).
    /// Objects due for a delivery attempt.
    pub fn objects_due(
        &self,
        now: i64,
        limit: usize,
        busy: &[String],
    ) -> rusqlite::Result<Vec<ResultObject>> {
        let mut stmt = self.db.prepare_cached(&format!(
            "{OBJECT_SELECT} o WHERE o.delivery = 'pending'
                AND o.destination NOT IN (SELECT value FROM json_each(?3))
                AND (o.next_attempt_ms <= ?1 OR EXISTS (
                    SELECT 1 FROM objects n WHERE n.delivery = 'pending'
                        AND n.next_attempt_ms <= ?1 AND n.destination = o.destination
                        AND n.series_uid = o.series_uid AND n.job_id > o.job_id))
             ORDER BY o.job_id, o.next_attempt_ms LIMIT ?2"
        ))?;
        let busy = serde_json::to_string(busy).unwrap_or_else(|_| "[]".into());
        let rows = stmt.query_map(params![now, limit as i64, busy], object_row)?;
        rows.collect()
    }

    /// The next time an object is due for a destination other than `busy` (`None`:
    /// nothing pending).
    pub fn next_due(&self, busy: &[String]) -> rusqlite::Result<Option<i64>> {
        let busy = serde_json::to_string(busy).unwrap_or_else(|_| "[]".into());
        self.db.query_row(
            "SELECT min(next_attempt_ms) FROM objects WHERE delivery = 'pending'
                AND destination NOT IN (SELECT value FROM json_each(?1))",
            [busy],
            |r| r.get(0),
        )
    }

    /// Records a delivery attempt's outcome: `o`'s delivery, attempts, next attempt, last
    /// error and path, for its (SOP Instance UID, destination).
    pub fn delivery(&self, o: &ResultObject) -> rusqlite::Result<()> {
        self.db.execute(
            "UPDATE objects SET delivery = ?3, attempts = ?4, next_attempt_ms = ?5,
                                last_error = ?6, path = ?7
             WHERE sop_instance_uid = ?1 AND destination = ?2",
            params![
                o.sop_instance_uid,
                o.destination,
                o.delivery,
                o.attempts,
                o.next_attempt_ms,
                o.last_error,
                o.path
            ],
        )?;
        Ok(())
    }
}

fn insert_object(db: &Connection, o: &ResultObject) -> rusqlite::Result<()> {
    db.execute(
        "INSERT OR REPLACE INTO objects (sop_instance_uid, job_id, kind, series_uid,
                sop_class_uid, path, destination, delivery, attempts, next_attempt_ms,
                last_error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            o.sop_instance_uid,
            o.job_id,
            o.kind,
            o.series_uid,
            o.sop_class_uid,
            o.path,
            o.destination,
            o.delivery,
            o.attempts,
            o.next_attempt_ms,
            o.last_error
        ],
    )?;
    Ok(())
}

const JOB_SELECT: &str = "SELECT id, study_uid, series_uid, route, bundle, bundle_version, state,
    reason, instances, created_ms, updated_ms, findings, destinations FROM jobs";

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    Ok(Job {
        id: r.get(0)?,
        study_uid: r.get(1)?,
        series_uid: r.get(2)?,
        route: r.get(3)?,
        bundle: r.get(4)?,
        bundle_version: r.get(5)?,
        state: JobState::parse(&r.get::<_, String>(6)?),
        reason: r.get(7)?,
        instances: r.get::<_, i64>(8)?.max(0) as u64,
        created_ms: r.get(9)?,
        updated_ms: r.get(10)?,
        findings: r
            .get::<_, Option<String>>(11)?
            .and_then(|s| serde_json::from_str(&s).ok()),
        destinations: r.get(12)?,
    })
}

const OBJECT_SELECT: &str = "SELECT sop_instance_uid, job_id, kind, series_uid, sop_class_uid,
    path, destination, delivery, attempts, next_attempt_ms, last_error FROM objects";

fn object_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ResultObject> {
    Ok(ResultObject {
        sop_instance_uid: r.get(0)?,
        job_id: r.get(1)?,
        kind: r.get(2)?,
        series_uid: r.get(3)?,
        sop_class_uid: r.get(4)?,
        path: r.get(5)?,
        destination: r.get(6)?,
        delivery: r.get(7)?,
        attempts: r.get(8)?,
        next_attempt_ms: r.get(9)?,
        last_error: r.get(10)?,
    })
}

fn series_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SeriesRow> {
    Ok(SeriesRow {
        study_uid: r.get(0)?,
        series_uid: r.get(1)?,
        instances: r.get::<_, i64>(2)?.max(0) as u64,
        last_received_ms: r.get(3)?,
        routed_instances: r.get::<_, i64>(4)?.max(0) as u64,
        state: r.get(5)?,
        reason: r.get(6)?,
        last_row: r.get(7)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A study's results: the newest jobs up to the limit, the others counted, and only
    /// the objects of the jobs listed (read in one query, not one per job).
    #[test]
    fn a_studys_results_are_its_newest_jobs_and_their_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultsStore::open(&dir.path().join("r.sqlite3")).unwrap();
        let ids: Vec<i64> = (0..3)
            .map(|k| {
                store
                    .add_job("1.2", &format!("1.2.{k}"), "r", "b", 1, "")
                    .unwrap()
            })
            .collect();
        store.add_job("9.9", "9.9.1", "r", "b", 1, "").unwrap();
        for &id in &ids {
            store
                .add_object(&ResultObject {
                    sop_instance_uid: format!("2.25.{id}"),
                    job_id: id,
                    kind: "SR".into(),
                    series_uid: "2.25.1".into(),
                    sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.33".into(),
                    path: format!("objects/{id}/SR.dcm"),
                    destination: String::new(),
                    delivery: "local".into(),
                    attempts: 0,
                    next_attempt_ms: 0,
                    last_error: None,
                })
                .unwrap();
        }
        let (jobs, left_out, objects, with_jobs) = store.study_results("1.2", 2).unwrap();
        assert_eq!(with_jobs.len(), 3);
        assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), &ids[1..]);
        assert_eq!(left_out, 1);
        assert_eq!(
            objects.iter().map(|o| o.job_id).collect::<Vec<_>>(),
            &ids[1..]
        );
        let (jobs, left_out, _, _) = store.study_results("1.2", 1000).unwrap();
        assert_eq!((jobs.len(), left_out), (3, 0));
        assert_eq!(store.study_results("7.7", 10).unwrap().0.len(), 0);
    }

    #[test]
    fn series_reopen_on_new_instances_and_jobs_supersede() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultsStore::open(&dir.path().join("r.sqlite3")).unwrap();
        store.note_series("1.2", "1.2.3", 2, 1_000).unwrap();
        let ready = store.series_ready(1_000, None, 10).unwrap();
        assert_eq!(ready.len(), 1);
        assert!(store.series_ready(999, None, 10).unwrap().is_empty());
        assert_eq!(store.series_ready(999, Some(2), 10).unwrap().len(), 1);
        store.settle_series(&ready[0], "routed", None).unwrap();
        assert!(store.series_ready(i64::MAX, None, 10).unwrap().is_empty());
        // The same count again changes nothing; a late instance re-opens it.
        store.note_series("1.2", "1.2.3", 2, 1_000).unwrap();
        assert!(store.series_ready(i64::MAX, None, 10).unwrap().is_empty());
        store.note_series("1.2", "1.2.3", 3, 2_000).unwrap();
        let ready = store.series_ready(i64::MAX, None, 10).unwrap();
        assert_eq!(ready.len(), 1);
        // Deferred (a route wants a longer quiet time): not ready until then, unless a new
        // instance arrives.
        store.defer_series(&ready[0], i64::MAX).unwrap();
        assert!(store.series_ready(i64::MAX, None, 10).unwrap().is_empty());
        store.note_series("1.2", "1.2.3", 3, 2_000).unwrap();
        assert!(store.series_ready(i64::MAX, None, 10).unwrap().is_empty());
        store.note_series("1.2", "1.2.3", 4, 3_000).unwrap();
        assert_eq!(store.series_ready(i64::MAX, None, 10).unwrap().len(), 1);
        store.defer_series(&ready[0], now_ms() - 1).unwrap();
        assert_eq!(store.series_ready(i64::MAX, None, 10).unwrap().len(), 1);

        let first = store.add_job("1.2", "1.2.3", "r", "m", 2, "").unwrap();
        let job = store.take_job(&[], i64::MAX).unwrap().unwrap();
        assert_eq!(job.id, first);
        store
            .finish_job(first, JobState::Done, "1", None, None)
            .unwrap();
        let second = store.add_job("1.2", "1.2.3", "r", "m", 3, "").unwrap();
        let states = |store: &ResultsStore| {
            store
                .jobs_of_study("1.2")
                .unwrap()
                .iter()
                .map(|j| (j.id, j.state))
                .collect::<Vec<_>>()
        };
        // The done job stays the series' result until the rerun ends done (red-team: a
        // rerun that failed left the series with none while its SR stood at the PACS).
        assert_eq!(
            states(&store),
            vec![(first, JobState::Done), (second, JobState::Queued)]
        );
        store.take_job(&[], i64::MAX).unwrap().unwrap();
        store
            .finish_job(second, JobState::Failed, "1", Some("mixed_series"), None)
            .unwrap();
        assert_eq!(
            states(&store),
            vec![(first, JobState::Done), (second, JobState::Failed)]
        );
        // A rerun after the failed one: the failed is superseded at once, the done when the
        // rerun ends done.
        let third = store.add_job("1.2", "1.2.3", "r", "m", 4, "").unwrap();
        assert_eq!(
            states(&store),
            vec![
                (first, JobState::Done),
                (second, JobState::Superseded),
                (third, JobState::Queued)
            ]
        );
        store.take_job(&[], i64::MAX).unwrap().unwrap();
        assert!(store.complete_job(third, "1", None, &[]).unwrap());
        assert_eq!(
            states(&store),
            vec![
                (first, JobState::Superseded),
                (second, JobState::Superseded),
                (third, JobState::Done)
            ]
        );
    }

    /// The store marks its database, and refuses one that is not it (another store of
    /// Nightingale's, a newer layout) without changing it (it was opened as it was, its
    /// tables made beside whatever it held).
    #[test]
    fn the_store_is_marked_and_refuses_other_databases() {
        use nightingale_dicom::sqlite_schema::{RESULTS, SPOOL_INDEX};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite3");
        drop(ResultsStore::open(&path).unwrap());
        let db = Connection::open(&path).unwrap();
        let id: i32 = db
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .unwrap();
        assert_eq!(id, RESULTS.application_id);
        // From the spool's index in its place: refused, named, nothing made in it.
        let spool = dir.path().join("index.sqlite3");
        let other = Connection::open(&spool).unwrap();
        other.execute_batch("CREATE TABLE instances (x)").unwrap();
        SPOOL_INDEX.mark(&other).unwrap();
        drop(other);
        let e = ResultsStore::open(&spool).err().unwrap().to_string();
        assert!(
            e.contains("DICOM spool index, not its DICOM pipeline results store"),
            "{e}"
        );
        let tables: i64 = Connection::open(&spool)
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 1);
        // A newer layout of the store itself.
        db.pragma_update(None, "user_version", RESULTS.version + 1)
            .unwrap();
        drop(db);
        let e = ResultsStore::open(&path).err().unwrap().to_string();
        assert!(e.contains("newer Nightingale"), "{e}");
    }

    /// Red-team finding: retention purged a routed series' oldest instance, and a late one
    /// brought the count back to the routed count: the series stayed routed and the late
    /// instance was never processed. An arrival after routing re-opens it whatever the count.
    #[test]
    fn an_arrival_after_routing_reopens_the_series_whatever_the_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultsStore::open(&dir.path().join("r.sqlite3")).unwrap();
        store.note_series_at("1.2", "1.2.3", 2, 1_000, 5).unwrap();
        let row = store.series_ready(i64::MAX, None, 10).unwrap().remove(0);
        assert_eq!(row.last_row, 5);
        store.settle_series(&row, "routed", None).unwrap();
        assert!(store.series_ready(i64::MAX, None, 10).unwrap().is_empty());
        // The same rows seen again (a restart before the cursor moved): stays routed.
        store.note_series_at("1.2", "1.2.3", 2, 1_000, 5).unwrap();
        assert!(store.series_ready(i64::MAX, None, 10).unwrap().is_empty());
        // One purged, one arrived: two again, but a new arrival.
        store.note_series_at("1.2", "1.2.3", 2, 9_000, 8).unwrap();
        let again = store.series_ready(i64::MAX, None, 10).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].last_row, 8);
    }

    /// A job processes the first `instances` of its series; a reprocess counts those the
    /// series has now (instances kept out by `--late-instances ignore` included).
    #[test]
    fn reprocess_takes_the_series_as_it_is_now() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultsStore::open(&dir.path().join("r.sqlite3")).unwrap();
        store.note_series("1.2", "1.2.3", 1, 1_000).unwrap();
        let first = store.add_job("1.2", "1.2.3", "r", "m", 1, "").unwrap();
        store.take_job(&[], i64::MAX).unwrap();
        assert!(store.complete_job(first, "1", None, &[]).unwrap());
        store.note_series("1.2", "1.2.3", 3, 2_000).unwrap();
        let again = store.reprocess("1.2", None).unwrap();
        let jobs = store.jobs_of_study("1.2").unwrap();
        assert_eq!(jobs.iter().find(|j| j.id == again[0]).unwrap().instances, 3);
    }

    /// A review's finding: jobs queued while their bundle was unloaded failed for good. A
    /// queued job waits for its bundle to serve (others' jobs run meanwhile), or until it
    /// has waited its time out.
    #[test]
    fn a_job_waits_in_the_queue_for_its_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultsStore::open(&dir.path().join("r.sqlite3")).unwrap();
        let a = store
            .add_job("1.2", "1.2.3", "r", "recalled", 1, "")
            .unwrap();
        let b = store
            .add_job("1.2", "1.2.4", "r", "serving", 1, "")
            .unwrap();
        let serving = ["serving".to_owned()];
        let taken = |waited_out| store.take_job(&serving, waited_out).unwrap().map(|j| j.id);
        // The older job's bundle is not serving: the other runs first, then nothing.
        assert_eq!(taken(0), Some(b));
        assert_eq!(taken(0), None);
        // Once its bundle serves, it runs.
        let both = ["recalled".to_owned(), "serving".to_owned()];
        assert_eq!(store.take_job(&both, 0).unwrap().map(|j| j.id), Some(a));
        // Back in the queue (its bundle unloaded while it ran), it waits again; made before
        // the waiting time's start, it runs anyway (and fails there).
        assert!(store.requeue_job(a).unwrap());
        assert_eq!(taken(0), None);
        assert_eq!(taken(now_ms() + 1), Some(a));
        let jobs = store.jobs_of_study("1.2").unwrap();
        assert!(jobs.iter().all(|j| j.state == JobState::Processing));
    }

    /// A review's finding: a series that arrived while its bundle was unloaded stayed
    /// unmatched, and `results reprocess` had no job to repeat. Such a series is routed
    /// again; one with a job, or not unmatched, is not.
    #[test]
    fn reprocess_routes_unmatched_series_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultsStore::open(&dir.path().join("r.sqlite3")).unwrap();
        for series in ["1.2.3", "1.2.4", "1.2.5", "1.2.6"] {
            store.note_series("1.2", series, 1, 1_000).unwrap();
        }
        let rows = store.series("1.2").unwrap();
        let row = |uid: &str| rows.iter().find(|r| r.series_uid == uid).unwrap();
        store
            .settle_series(row("1.2.3"), "unmatched", Some("bundle m is not serving"))
            .unwrap();
        store
            .settle_series(row("1.2.4"), "unmatched", Some("own"))
            .unwrap();
        store
            .settle_series(row("1.2.5"), "failed", Some("header"))
            .unwrap();
        store
            .settle_series(row("1.2.6"), "unmatched", Some("x"))
            .unwrap();
        store.add_job("1.2", "1.2.6", "r", "m", 1, "").unwrap();
        // 1.2.4 is not kept (e.g. no longer in the spool).
        let again = store
            .reroute_unmatched("1.2", None, |s| s != "1.2.4")
            .unwrap();
        assert_eq!(again, ["1.2.3"]);
        let rows = store.series("1.2").unwrap();
        let state = |uid: &str| {
            let r = rows.iter().find(|r| r.series_uid == uid).unwrap();
            (r.state.clone(), r.reason.clone())
        };
        assert_eq!(state("1.2.3"), ("assembling".to_owned(), None));
        assert_eq!(state("1.2.4").0, "unmatched");
        assert_eq!(state("1.2.5").0, "failed");
        assert_eq!(state("1.2.6").0, "unmatched");
        // Ready to be routed at once.
        let ready = store.series_ready(i64::MAX, None, 10).unwrap();
        assert_eq!(
            ready
                .iter()
                .map(|r| r.series_uid.as_str())
                .collect::<Vec<_>>(),
            ["1.2.3"]
        );
        // What an operator lists: every series not routed, or those of one state; the jobs
        // not done.
        let uids =
            |rows: Vec<SeriesRow>| rows.into_iter().map(|r| r.series_uid).collect::<Vec<_>>();
        let mut listed = uids(store.series_in_state(None, 10).unwrap());
        listed.sort();
        assert_eq!(listed, ["1.2.3", "1.2.4", "1.2.5", "1.2.6"]);
        assert_eq!(
            uids(store.series_in_state(Some("failed"), 10).unwrap()),
            ["1.2.5"]
        );
        assert_eq!(store.series_in_state(None, 1).unwrap().len(), 1);
        let jobs = store.jobs_in_state(None, 10).unwrap();
        assert_eq!(jobs.len(), 1);
        assert!(store.jobs_in_state(Some("done"), 10).unwrap().is_empty());
        // A series routed without bundles is routed again for one of them only (a re-attack:
        // `--model` of another bundle, or a typo, re-ran every other bundle).
        store.note_series("1.3", "1.3.1", 1, 1_000).unwrap();
        let rows = store.series("1.3").unwrap();
        let reason = format!(
            "{}bundle m, n: not in the repository",
            crate::pipeline::ROUTED_WITHOUT
        );
        store
            .settle_series(&rows[0], "routed", Some(&reason))
            .unwrap();
        assert_eq!(crate::pipeline::routed_without(&reason), ["m", "n"]);
        assert!(
            store
                .series_in_state(None, 10)
                .unwrap()
                .iter()
                .any(|r| r.series_uid == "1.3.1")
        );
        assert!(
            store
                .reroute_unmatched("1.3", Some("x"), |_| true)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store.reroute_unmatched("1.3", Some("n"), |_| true).unwrap(),
            ["1.3.1"]
        );
    }

    #[test]
    fn reprocess_supersedes_and_purge_keeps_what_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ResultsStore::open(&dir.path().join("r.sqlite3")).unwrap();
        store.note_series("1.2", "1.2.3", 1, 1_000).unwrap();
        let first = store.add_job("1.2", "1.2.3", "r", "m", 1, "P@h:1").unwrap();
        store.take_job(&[], i64::MAX).unwrap();
        store
            .finish_job(first, JobState::Done, "1", None, None)
            .unwrap();
        let object = |uid: &str, job_id, delivery: &str| result_row(uid, job_id, "P@h:1", delivery);
        store.add_object(&object("5.1", first, "sent")).unwrap();
        assert!(store.reprocess("1.2", Some("other")).unwrap().is_empty());
        let again = store.reprocess("1.2", None).unwrap();
        assert_eq!(again.len(), 1);
        let jobs = store.jobs_of_study("1.2").unwrap();
        assert_eq!(jobs[0].state, JobState::Done);
        assert_eq!(jobs[1].state, JobState::Queued);
        assert_eq!(jobs[1].destinations, "P@h:1");
        store.take_job(&[], i64::MAX).unwrap();
        store
            .finish_job(again[0], JobState::Done, "2", None, None)
            .unwrap();
        let jobs = store.jobs_of_study("1.2").unwrap();
        assert_eq!(jobs[0].state, JobState::Superseded);
        store
            .add_object(&object("5.2", again[0], "pending"))
            .unwrap();

        let dry = store.purge(i64::MAX, true).unwrap();
        assert_eq!((dry.jobs, dry.objects), (1, 1));
        let purged = store.purge(i64::MAX, false).unwrap();
        // The superseded job and its sent object go; the job with a pending object stays.
        assert_eq!((purged.jobs, purged.objects), (1, 1));
        assert_eq!(purged.files, vec![format!("objects/{first}/5.1.dcm")]);
        assert_eq!(store.jobs_of_study("1.2").unwrap().len(), 1);
        assert_eq!(store.series("1.2").unwrap().len(), 1);
    }

    /// Red-team finding: one result file serves every destination of the object (one row
    /// each). A purge deleted the file once one destination's row was sent, while another
    /// destination's row still waited to send it (and its give-up then claimed a dead-letter
    /// copy of a file that was gone). The file goes only with the last row that uses it.
    #[test]
    fn purge_keeps_a_file_that_another_destination_still_has_to_send() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ResultsStore::open(&dir.path().join("r.sqlite3")).unwrap();
        store.note_series("1.2", "1.2.3", 1, 1_000).unwrap();
        let job = store
            .add_job("1.2", "1.2.3", "r", "m", 1, "A@h:1,B@h:2")
            .unwrap();
        store.take_job(&[], i64::MAX).unwrap();
        store
            .finish_job(job, JobState::Done, "1", None, None)
            .unwrap();
        let row = |destination: &str, delivery: &str| ResultObject {
            sop_instance_uid: "5.1".into(),
            job_id: job,
            kind: "SR".into(),
            series_uid: "9".into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.33".into(),
            path: format!("objects/{job}/SR.dcm"),
            destination: destination.into(),
            delivery: delivery.into(),
            attempts: 1,
            next_attempt_ms: 0,
            last_error: None,
        };
        store.add_object(&row("A@h:1", "sent")).unwrap();
        store.add_object(&row("B@h:2", "pending")).unwrap();
        let purged = store.purge(i64::MAX, false).unwrap();
        // A's row goes; B's keeps the job and the file.
        assert_eq!((purged.jobs, purged.objects), (0, 1));
        assert!(purged.files.is_empty(), "{:?}", purged.files);
        // B delivered: the file goes with the last row.
        store.delivery(&row("B@h:2", "sent")).unwrap();
        let purged = store.purge(i64::MAX, false).unwrap();
        assert_eq!((purged.jobs, purged.objects), (1, 1));
        assert_eq!(purged.files, vec![format!("objects/{job}/SR.dcm")]);
        // Every job purged: the next is not given the purged one's id (SQLite gives a
        // deleted highest rowid again), which names it in the audit trail and its folder.
        assert!(store.jobs_of_study("1.2").unwrap().is_empty());
        let next = store.add_job("1.2", "9", "r", "m", 1, "").unwrap();
        assert!(next > job, "{next} after {job}");
        drop(store);
        let store = ResultsStore::open(&dir.path().join("r.sqlite3")).unwrap();
        assert_eq!(
            store.take_job(&[], i64::MAX).unwrap().map(|j| j.id),
            Some(next)
        );
        store
            .finish_job(next, JobState::Failed, "1", Some("why"), None)
            .unwrap();
        let mut store = store;
        assert_eq!(store.purge(i64::MAX, false).unwrap().jobs, 1);
        let after_restart = store.add_job("1.2", "9", "r", "m", 1, "").unwrap();
        assert!(after_restart > next, "{after_restart} after {next}");
    }

    /// Red-team finding: purging the last dead letter removed the dead-letter folder itself
    /// (the "empty job folder" clean-up took its parent), and later dead letters were not
    /// kept until a restart made it again. Job folders go when empty; the pipeline's own
    /// folders stay.
    #[test]
    fn a_results_purge_keeps_the_pipelines_folders() {
        let dir = tempfile::tempdir().unwrap();
        let results = dir.path();
        for d in [
            super::super::outbox::OBJECTS_DIR,
            super::super::outbox::DEAD_LETTER_DIR,
        ] {
            std::fs::create_dir_all(results.join(d)).unwrap();
        }
        let store = ResultsStore::open(&results.join(super::super::STORE_FILE)).unwrap();
        store.note_series("1.2", "1.2.3", 1, 1_000).unwrap();
        let job = store.add_job("1.2", "1.2.3", "r", "m", 1, "A@h:1").unwrap();
        store.take_job(&[], i64::MAX).unwrap();
        store
            .finish_job(job, JobState::Done, "1", None, None)
            .unwrap();
        let files = [
            format!("objects/{job}/SR.dcm"),
            "dead-letter/SR-a-b.dcm".to_owned(),
        ];
        std::fs::create_dir_all(results.join(format!("objects/{job}"))).unwrap();
        for (i, path) in files.iter().enumerate() {
            std::fs::write(results.join(path), b"x").unwrap();
            store
                .add_object(&ResultObject {
                    sop_instance_uid: format!("5.{i}"),
                    job_id: job,
                    kind: "SR".into(),
                    series_uid: "9".into(),
                    sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.33".into(),
                    path: path.clone(),
                    destination: "A@h:1".into(),
                    delivery: if i == 0 { "sent" } else { "dead" }.into(),
                    attempts: 1,
                    next_attempt_ms: 0,
                    last_error: None,
                })
                .unwrap();
        }
        drop(store);
        let counts =
            super::super::purge_results(results, std::time::SystemTime::now(), false).unwrap();
        assert_eq!(counts.files.len(), 2, "{:?}", counts.files);
        assert!(!results.join(&files[0]).exists() && !results.join(&files[1]).exists());
        assert!(!results.join(format!("objects/{job}")).exists());
        assert!(results.join(super::super::outbox::OBJECTS_DIR).is_dir());
        assert!(results.join(super::super::outbox::DEAD_LETTER_DIR).is_dir());
    }

    #[test]
    fn a_patients_done_jobs_are_found_by_the_hash_of_the_patient_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultsStore::open(&dir.path().join("r.sqlite3")).unwrap();
        let key = nightingale_dicom::series::patient_id_sha256("9434765919 ");
        assert_eq!(
            key,
            nightingale_dicom::series::patient_id_sha256("9434765919")
        );
        for (series, patient) in [("1.2.1", Some(key.as_str())), ("1.2.2", None)] {
            store.note_series("1.2", series, 1, 1_000).unwrap();
            let row = store.series_ready(i64::MAX, None, 10).unwrap().remove(0);
            store.set_patient(&row, patient).unwrap();
            store.settle_series(&row, "routed", None).unwrap();
            let job = store.add_job("1.2", series, "r", "m", 1, "").unwrap();
            store.take_job(&[], i64::MAX).unwrap();
            store.set_job_patient(job, patient).unwrap();
            store
                .finish_job(job, JobState::Done, "3", None, None)
                .unwrap();
        }
        let failed = store.add_job("1.2", "1.2.1", "r", "other", 1, "").unwrap();
        store
            .finish_job(failed, JobState::Failed, "1", Some("why"), None)
            .unwrap();
        let jobs = store.done_jobs_of_patient(&key, 10).unwrap();
        assert_eq!(
            jobs.iter()
                .map(|j| (j.series_uid.as_str(), j.bundle.as_str(), j.state))
                .collect::<Vec<_>>(),
            vec![("1.2.1", "m", JobState::Done)]
        );
        assert!(store.done_jobs_of_patient("00", 10).unwrap().is_empty());
        // Red-team finding: after a purge, another patient's instances under the same
        // Series Instance UID re-stamped the series, and patient X's done job was shown as
        // Y's. The job keeps the patient of the instances it processed.
        // A done job whose patient is not recorded (no Patient ID, a store from before
        // jobs kept it) is no one's: the series' hash is not read in its place (a later
        // red-team finding: through it an unnamed patient's finding showed on Y's card).
        let unnamed = store.add_job("1.2", "1.2.2", "r", "m2", 1, "").unwrap();
        while let Some(j) = store.take_job(&[], i64::MAX).unwrap() {
            if j.id == unnamed {
                break;
            }
        }
        store
            .finish_job(unnamed, JobState::Done, "3", None, None)
            .unwrap();
        let row = store
            .jobs_of_study("1.2")
            .unwrap()
            .into_iter()
            .find(|j| j.id == unnamed)
            .unwrap();
        assert_eq!(row.state, JobState::Done);
        let series_row = SeriesRow {
            study_uid: "1.2".into(),
            series_uid: "1.2.2".into(),
            instances: 1,
            last_received_ms: 0,
            routed_instances: 1,
            state: "routed".into(),
            reason: None,
            last_row: 0,
        };
        store.set_patient(&series_row, Some(&key)).unwrap();
        assert!(
            store
                .done_jobs_of_patient(&key, 10)
                .unwrap()
                .iter()
                .all(|j| j.id != unnamed)
        );
        let other = nightingale_dicom::series::patient_id_sha256("9999999999");
        let x_job = jobs[0].id;
        store.set_job_patient(x_job, Some(&key)).unwrap();
        let row = SeriesRow {
            study_uid: "1.2".into(),
            series_uid: "1.2.1".into(),
            ..store
                .series_ready(i64::MAX, None, 10)
                .unwrap()
                .pop()
                .unwrap_or_else(|| {
                    store.note_series("1.2", "1.2.1", 5, 9_000).unwrap();
                    store.series_ready(i64::MAX, None, 10).unwrap().remove(0)
                })
        };
        store.set_patient(&row, Some(&other)).unwrap();
        assert!(store.done_jobs_of_patient(&other, 10).unwrap().is_empty());
        assert_eq!(
            store
                .done_jobs_of_patient(&key, 10)
                .unwrap()
                .iter()
                .map(|j| j.id)
                .collect::<Vec<_>>(),
            vec![x_job]
        );
    }

    #[test]
    fn a_job_processing_at_a_restart_is_queued_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite3");
        {
            let store = ResultsStore::open(&path).unwrap();
            store.add_job("1.2", "1.2.3", "r", "m", 1, "").unwrap();
            assert!(store.take_job(&[], i64::MAX).unwrap().is_some());
            assert!(store.take_job(&[], i64::MAX).unwrap().is_none());
        }
        // Opening the store (as `results reprocess`, `spool purge` or the retention task
        // do) leaves a running job alone; the server's start re-queues it.
        let store = ResultsStore::open(&path).unwrap();
        assert!(store.take_job(&[], i64::MAX).unwrap().is_none());
        assert_eq!(store.requeue_interrupted().unwrap(), 1);
        assert!(store.take_job(&[], i64::MAX).unwrap().is_some());
    }

    /// A job whose run could not be recorded (the audit trail failing) is queued again, and
    /// taken again; one no longer processing is left as it is.
    #[test]
    fn a_job_not_recorded_is_queued_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultsStore::open(&dir.path().join("r.sqlite3")).unwrap();
        store.add_job("1.2", "1.2.3", "r", "m", 1, "").unwrap();
        let job = store.take_job(&[], i64::MAX).unwrap().unwrap();
        assert!(store.requeue_job(job.id).unwrap());
        let again = store.take_job(&[], i64::MAX).unwrap().unwrap();
        assert_eq!(again.id, job.id);
        store
            .finish_job(job.id, JobState::Failed, "1", Some("x"), None)
            .unwrap();
        assert!(!store.requeue_job(job.id).unwrap());
        assert!(store.take_job(&[], i64::MAX).unwrap().is_none());
    }

    fn result_row(uid: &str, job_id: i64, destination: &str, delivery: &str) -> ResultObject {
        ResultObject {
            sop_instance_uid: uid.into(),
            job_id,
            kind: "SR".into(),
            series_uid: "9".into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.33".into(),
            path: format!("objects/{job_id}/{uid}.dcm"),
            destination: destination.into(),
            delivery: delivery.into(),
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
        }
    }

    #[test]
    fn a_jobs_objects_are_queued_with_its_end_and_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultsStore::open(&dir.path().join("r.sqlite3")).unwrap();
        let job = store.add_job("1.2", "1.2.3", "r", "m", 1, "P@h:1").unwrap();
        store.take_job(&[], i64::MAX).unwrap().unwrap();
        let rows = [
            result_row("5.1", job, "P@h:1", "pending"),
            result_row("5.2", job, "P@h:1", "pending"),
        ];
        assert!(store.complete_job(job, "1", None, &rows).unwrap());
        assert_eq!(store.objects_due(i64::MAX, 10, &[]).unwrap().len(), 2);
        let jobs = store.jobs_of_study("1.2").unwrap();
        assert_eq!(
            (jobs[0].state, jobs[0].bundle_version.as_str()),
            (JobState::Done, "1")
        );
        // A job no longer processing (ended elsewhere): nothing is recorded, nothing queued.
        let again = store.add_job("1.2", "1.2.3", "r", "m", 1, "P@h:1").unwrap();
        assert!(
            !store
                .complete_job(
                    again,
                    "1",
                    None,
                    &[result_row("5.3", again, "P@h:1", "pending")]
                )
                .unwrap()
        );
        assert!(store.objects_of_job(again).unwrap().is_empty());
        assert_eq!(
            store.jobs_of_study("1.2").unwrap()[1].state,
            JobState::Queued
        );
    }

    #[test]
    fn each_route_has_its_own_jobs_and_a_rerun_supersedes_a_running_job() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultsStore::open(&dir.path().join("r.sqlite3")).unwrap();
        // Two routes running one bundle on a series: two jobs, each to its destinations.
        let a = store
            .add_job("1.2", "1.2.3", "ct-a", "m", 1, "A@h:1")
            .unwrap();
        let b = store
            .add_job("1.2", "1.2.3", "ct-b", "m", 1, "B@h:2")
            .unwrap();
        let jobs = store.jobs_of_study("1.2").unwrap();
        assert_eq!(
            jobs.iter().map(|j| (j.id, j.state)).collect::<Vec<_>>(),
            vec![(a, JobState::Queued), (b, JobState::Queued)]
        );
        // A rerun of ct-a queued while its job runs: the running one is superseded, and its
        // end records nothing (one current result per series, bundle and route).
        assert_eq!(store.take_job(&[], i64::MAX).unwrap().unwrap().id, a);
        let again = store
            .add_job("1.2", "1.2.3", "ct-a", "m", 2, "A@h:1")
            .unwrap();
        assert!(
            !store
                .complete_job(a, "1", None, &[result_row("5.1", a, "A@h:1", "pending")])
                .unwrap()
        );
        assert!(store.objects_of_job(a).unwrap().is_empty());
        let states: Vec<(i64, JobState)> = store
            .jobs_of_study("1.2")
            .unwrap()
            .iter()
            .map(|j| (j.id, j.state))
            .collect();
        assert_eq!(
            states,
            vec![
                (a, JobState::Superseded),
                (b, JobState::Queued),
                (again, JobState::Queued)
            ]
        );
        // Reprocessing the study makes one job per (series, bundle, route).
        assert_eq!(store.reprocess("1.2", None).unwrap().len(), 2);
    }

    #[test]
    fn an_earlier_jobs_pending_objects_go_first_with_a_due_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultsStore::open(&dir.path().join("r.sqlite3")).unwrap();
        let old = store.add_job("1.2", "9", "r", "m", 1, "P@h:1").unwrap();
        let new = store.add_job("1.2", "9", "r", "m", 1, "P@h:1").unwrap();
        let at = |uid: &str, job: i64, next: i64, destination: &str| ResultObject {
            next_attempt_ms: next,
            attempts: 3,
            ..result_row(uid, job, destination, "pending")
        };
        // The earlier job's object backs off longer (more attempts); the later one is due.
        store.add_object(&at("5.1", old, 10_000, "P@h:1")).unwrap();
        store.add_object(&at("5.2", new, 100, "P@h:1")).unwrap();
        // Another destination's and another series' are not pulled forward.
        store.add_object(&at("5.3", old, 10_000, "Q@h:2")).unwrap();
        let mut other = at("5.4", old, 10_000, "P@h:1");
        other.series_uid = "8".into();
        store.add_object(&other).unwrap();
        let due: Vec<String> = store
            .objects_due(1_000, 10, &[])
            .unwrap()
            .into_iter()
            .map(|o| o.sop_instance_uid)
            .collect();
        assert_eq!(due, ["5.1", "5.2"]);
        // Nothing due: nothing pulled.
        assert!(store.objects_due(50, 10, &[]).unwrap().is_empty());
    }

    #[test]
    fn an_interrupted_jobs_pending_objects_are_dropped_when_it_is_queued_again() {
        // Rows left pending for a job that was still processing (recorded object by object
        // by an earlier version) are not sent: the job makes its whole result set again.
        let dir = tempfile::tempdir().unwrap();
        let store = ResultsStore::open(&dir.path().join("r.sqlite3")).unwrap();
        let done = store.add_job("1.2", "1.2.3", "r", "m", 1, "P@h:1").unwrap();
        store.take_job(&[], i64::MAX).unwrap().unwrap();
        assert!(
            store
                .complete_job(
                    done,
                    "1",
                    None,
                    &[result_row("5.1", done, "P@h:1", "pending")]
                )
                .unwrap()
        );
        let running = store.add_job("1.2", "1.2.4", "r", "m", 1, "P@h:1").unwrap();
        store.take_job(&[], i64::MAX).unwrap().unwrap();
        store
            .add_object(&result_row("5.2", running, "P@h:1", "pending"))
            .unwrap();
        assert_eq!(store.requeue_interrupted().unwrap(), 1);
        assert!(store.objects_of_job(running).unwrap().is_empty());
        let due = store.objects_due(i64::MAX, 10, &[]).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].sop_instance_uid, "5.1");
    }
}
