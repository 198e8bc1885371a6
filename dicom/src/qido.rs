//! QIDO-RS queries over the spool's index: what was received, by study, series and
//! instance. Only UIDs, SOP class, transfer syntax, counts and receive times are indexed,
//! so only those are answered: no patient or study attributes (names, IDs, dates).

use rusqlite::types::Value;

use crate::spool::{Spool, StoreError};

/// Largest page a query returns.
pub const MAX_LIMIT: u32 = 10_000;

/// Matching keys (each: any of the listed values; empty: no constraint) and the page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pub study_uids: Vec<String>,
    pub series_uids: Vec<String>,
    pub sop_instance_uids: Vec<String>,
    pub sop_class_uids: Vec<String>,
    /// At most [`MAX_LIMIT`]; `None`: [`MAX_LIMIT`].
    pub limit: Option<u32>,
    pub offset: u64,
}

/// A study as the index knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyRow {
    pub study_uid: String,
    pub series: u64,
    pub instances: u64,
    /// Last instance received, Unix milliseconds.
    pub last_received_ms: i64,
}

/// A series as the index knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesRow {
    pub study_uid: String,
    pub series_uid: String,
    pub instances: u64,
    pub last_received_ms: i64,
}

/// An instance as the index knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRow {
    pub study_uid: String,
    pub series_uid: String,
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub transfer_syntax: String,
    pub received_at_ms: i64,
    pub size: u64,
}

impl Query {
    /// `WHERE ...` over the given columns and its parameters.
    fn filter(&self, columns: &[(&str, &[String])]) -> (String, Vec<Value>) {
        let mut clauses = vec![];
        let mut params = vec![];
        for (column, values) in columns {
            if values.is_empty() {
                continue;
            }
            let marks = vec!["?"; values.len()].join(", ");
            clauses.push(format!("{column} IN ({marks})"));
            params.extend(values.iter().map(|v| Value::Text(v.clone())));
        }
        let sql = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        (sql, params)
    }

    fn page(&self, params: &mut Vec<Value>) -> &'static str {
        let limit = self.limit.unwrap_or(MAX_LIMIT).min(MAX_LIMIT);
        params.push(Value::Integer(i64::from(limit)));
        params.push(Value::Integer(
            i64::try_from(self.offset).unwrap_or(i64::MAX),
        ));
        "LIMIT ? OFFSET ?"
    }
}

impl Spool {
    /// Studies matching `StudyInstanceUID` (the other keys are not study-level).
    pub fn query_studies(&self, q: &Query) -> Result<Vec<StudyRow>, StoreError> {
        let (filter, mut params) = q.filter(&[("study_uid", &q.study_uids)]);
        let page = q.page(&mut params);
        let sql = format!(
            "SELECT study_uid, COUNT(DISTINCT series_uid), COUNT(*), MAX(received_at_ms)
             FROM instances {filter} GROUP BY study_uid ORDER BY study_uid {page}"
        );
        let db = self.index();
        let mut stmt = db.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(params), |r| {
            Ok(StudyRow {
                study_uid: r.get(0)?,
                series: r.get::<_, i64>(1)? as u64,
                instances: r.get::<_, i64>(2)? as u64,
                last_received_ms: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Series matching `StudyInstanceUID` and `SeriesInstanceUID`.
    pub fn query_series(&self, q: &Query) -> Result<Vec<SeriesRow>, StoreError> {
        let (filter, mut params) =
            q.filter(&[("study_uid", &q.study_uids), ("series_uid", &q.series_uids)]);
        let page = q.page(&mut params);
        let sql = format!(
            "SELECT study_uid, series_uid, COUNT(*), MAX(received_at_ms)
             FROM instances {filter} GROUP BY study_uid, series_uid
             ORDER BY study_uid, series_uid {page}"
        );
        let db = self.index();
        let mut stmt = db.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(params), |r| {
            Ok(SeriesRow {
                study_uid: r.get(0)?,
                series_uid: r.get(1)?,
                instances: r.get::<_, i64>(2)? as u64,
                last_received_ms: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Instances matching every key of `q`.
    pub fn query_instances(&self, q: &Query) -> Result<Vec<InstanceRow>, StoreError> {
        let (filter, mut params) = q.filter(&[
            ("study_uid", &q.study_uids),
            ("series_uid", &q.series_uids),
            ("sop_instance_uid", &q.sop_instance_uids),
            ("sop_class_uid", &q.sop_class_uids),
        ]);
        let page = q.page(&mut params);
        let sql = format!(
            "SELECT study_uid, series_uid, sop_instance_uid, sop_class_uid, transfer_syntax,
                    received_at_ms, size
             FROM instances {filter} ORDER BY study_uid, series_uid, sop_instance_uid {page}"
        );
        let db = self.index();
        let mut stmt = db.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(params), |r| {
            Ok(InstanceRow {
                study_uid: r.get(0)?,
                series_uid: r.get(1)?,
                sop_instance_uid: r.get(2)?,
                sop_class_uid: r.get(3)?,
                transfer_syntax: r.get(4)?,
                received_at_ms: r.get(5)?,
                size: r.get::<_, i64>(6)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
