//! QIDO-RS queries over the spool's index: what was received, by study, series and
//! instance. The index holds UIDs, SOP class, transfer syntax, counts, receive times and
//! the [`Attributes`] (modality, study date and time, series and instance numbers, image
//! size), so only those are matched and answered: no patient attribute (name, ID, birth
//! date, sex) and no free text.

use rusqlite::types::Value;

use crate::attributes::Attributes;
use crate::spool::{Spool, StoreError};

/// Largest page a query returns.
pub const MAX_LIMIT: u32 = 10_000;

/// Most values one matching key may have, over all its occurrences in a request: each is a
/// term of one SQL expression, and SQLite refuses an expression tree deeper than 1,000
/// ("Expression tree is too large"), which a key repeated 1,000 times reached.
pub const MAX_VALUES: usize = 256;

/// Matching keys (each: any of the listed values; empty: no constraint) and the page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pub study_uids: Vec<String>,
    pub series_uids: Vec<String>,
    pub sop_instance_uids: Vec<String>,
    pub sop_class_uids: Vec<String>,
    /// Modality (0008,0060) of the series or instance: values or `*`/`?` wildcard patterns
    /// ([`is_code_pattern`]).
    pub modalities: Vec<String>,
    /// Modalities in Study (0008,0061): studies with a series of any of these (patterns).
    pub modalities_in_study: Vec<String>,
    /// Study Date (0008,0020) range, both ends included, `YYYYMMDD`: `None` for an open end.
    pub study_date: Option<(Option<String>, Option<String>)>,
    pub series_numbers: Vec<i64>,
    pub instance_numbers: Vec<i64>,
    /// At most [`MAX_LIMIT`]; `None`: [`MAX_LIMIT`].
    pub limit: Option<u32>,
    pub offset: u64,
}

impl Query {
    /// The keyword of the first matching key with more than [`MAX_VALUES`] values: such a
    /// query is refused (the HTTP layer answers 400) rather than sent to SQLite.
    pub fn too_many_values(&self) -> Option<&'static str> {
        [
            ("StudyInstanceUID", self.study_uids.len()),
            ("SeriesInstanceUID", self.series_uids.len()),
            ("SOPInstanceUID", self.sop_instance_uids.len()),
            ("SOPClassUID", self.sop_class_uids.len()),
            ("Modality", self.modalities.len()),
            ("ModalitiesInStudy", self.modalities_in_study.len()),
            ("SeriesNumber", self.series_numbers.len()),
            ("InstanceNumber", self.instance_numbers.len()),
        ]
        .into_iter()
        .find(|(_, n)| *n > MAX_VALUES)
        .map(|(key, _)| key)
    }
}

/// Whether `s` is a CS value or a pattern of one (`*` any run, `?` one character): the
/// characters of PS3.5's CS repertoire and the two wildcards, at most 64.
pub fn is_code_pattern(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| {
            b.is_ascii_uppercase() || b.is_ascii_digit() || matches!(b, b'_' | b' ' | b'*' | b'?')
        })
}

/// A study as the index knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyRow {
    pub study_uid: String,
    pub series: u64,
    pub instances: u64,
    /// Last instance received, Unix milliseconds.
    pub last_received_ms: i64,
    pub study_date: Option<String>,
    pub study_time: Option<String>,
    /// The distinct modalities of its instances, sorted.
    pub modalities: Vec<String>,
}

/// A series as the index knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesRow {
    pub study_uid: String,
    pub series_uid: String,
    pub instances: u64,
    pub last_received_ms: i64,
    pub modality: Option<String>,
    pub series_number: Option<i64>,
    pub study_date: Option<String>,
    pub study_time: Option<String>,
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
    pub attributes: Attributes,
}

/// The keys a level matches on besides the UIDs.
#[derive(Clone, Copy)]
struct Keys {
    modality: bool,
    series_number: bool,
    instance_number: bool,
}

/// `WHERE` and the clauses joined by `AND`; empty for none.
fn where_of(clauses: &[String]) -> String {
    if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    }
}

/// Whether the values of a code key match anything: none given, or a pattern of only `*`.
fn universal(values: &[String]) -> bool {
    values.is_empty() || values.iter().any(|p| p.bytes().all(|b| b == b'*'))
}

/// `n` SQL parameter marks: `?, ?, ?`.
fn marks(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// `column IN (...)` or, for values with wildcards, `(column GLOB ? OR ...)`.
fn any_of(column: &str, values: &[String], clauses: &mut Vec<String>, params: &mut Vec<Value>) {
    let (patterns, exact): (Vec<&String>, Vec<&String>) =
        values.iter().partition(|v| v.contains(['*', '?']));
    let mut alternatives = vec![];
    if !exact.is_empty() {
        alternatives.push(format!("{column} IN ({})", marks(exact.len())));
        params.extend(exact.iter().map(|v| Value::Text((*v).clone())));
    }
    for p in patterns {
        // GLOB's `*` and `?` are DICOM's; `[` (its only other special) is not in the
        // CS repertoire, which the caller checked.
        alternatives.push(format!("{column} GLOB ?"));
        params.push(Value::Text(p.clone()));
    }
    clauses.push(format!("({})", alternatives.join(" OR ")));
}

impl Query {
    /// `WHERE ...` over the given UID columns, the study's keys and the attribute keys of
    /// `keys`, and its parameters.
    fn filter(&self, columns: &[(&str, &[String])], keys: Keys) -> (String, Vec<Value>) {
        let mut clauses = vec![];
        let mut params = vec![];
        self.uid_and_study_clauses(columns, &mut clauses, &mut params);
        self.attribute_clauses(keys, &mut clauses, &mut params);
        (where_of(&clauses), params)
    }

    /// The clauses of the given UID columns and of the study's own keys
    /// (ModalitiesInStudy, StudyDate), which select whole studies.
    fn uid_and_study_clauses(
        &self,
        columns: &[(&str, &[String])],
        clauses: &mut Vec<String>,
        params: &mut Vec<Value>,
    ) {
        for (column, values) in columns {
            if values.is_empty() {
                continue;
            }
            clauses.push(format!("{column} IN ({})", marks(values.len())));
            params.extend(values.iter().map(|v| Value::Text(v.clone())));
        }
        if !universal(&self.modalities_in_study) {
            let mut inner = vec![];
            any_of("modality", &self.modalities_in_study, &mut inner, params);
            clauses.push(format!(
                "study_uid IN (SELECT study_uid FROM instances WHERE {})",
                inner.join(" AND ")
            ));
        }
        // StudyDate is the study's (PS3.4 C.6.1.1.4): a study matches by the date it is
        // answered with (its instances' earliest), and every level below answers all of a
        // matching study's rows, whatever their own date. Matched per instance, a study
        // answered with counts and modalities of the instances that carried the date only,
        // and one whose instances disagreed matched two dates (a red-team finding). A study
        // without a date compares as NULL: no range matches it.
        if let Some((from, to)) = &self.study_date {
            let mut having = vec![];
            if let Some(from) = from {
                having.push("MIN(study_date) >= ?");
                params.push(Value::Text(from.clone()));
            }
            if let Some(to) = to {
                having.push("MIN(study_date) <= ?");
                params.push(Value::Text(to.clone()));
            }
            if !having.is_empty() {
                clauses.push(format!(
                    "study_uid IN (SELECT study_uid FROM instances GROUP BY study_uid HAVING {})",
                    having.join(" AND ")
                ));
            }
        }
    }

    /// The clauses of the series' and instances' own keys that `keys` names (Modality,
    /// SeriesNumber, InstanceNumber), on columns of those names.
    fn attribute_clauses(&self, keys: Keys, clauses: &mut Vec<String>, params: &mut Vec<Value>) {
        if keys.modality && !universal(&self.modalities) {
            any_of("modality", &self.modalities, clauses, params);
        }
        for (on, column, values) in [
            (keys.series_number, "series_number", &self.series_numbers),
            (
                keys.instance_number,
                "instance_number",
                &self.instance_numbers,
            ),
        ] {
            if on && !values.is_empty() {
                clauses.push(format!("{column} IN ({})", marks(values.len())));
                params.extend(values.iter().map(|n| Value::Integer(*n)));
            }
        }
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

/// The rows a search matches (`matched`), and the date and time of each of their studies
/// (`dates`: `date_of`, `date`, `time`): its instances' earliest date, and the earliest time
/// among the instances of that date, as every level answers them and the study level matches
/// on: not each row's own (a series of a study matched on 20231231 was answered with its own
/// 20240102: a red-team finding), and a time from the same instances as the date (the
/// earliest date and the earliest time taken apart answered 20240101 000100 for instances of
/// 20240102 000100 and 20240101 235900: a review's finding). Each study's are computed once
/// (a subquery per answered row made a search of a 10,000-instance study take 50 s).
fn with_study_dates(filter: &str) -> String {
    format!(
        "WITH matched AS (SELECT * FROM instances {filter}),
              firsts AS (SELECT study_uid AS first_of, MIN(study_date) AS first_date
                         FROM instances WHERE study_uid IN (SELECT study_uid FROM matched)
                         GROUP BY study_uid),
              dates AS (SELECT first_of AS date_of, first_date AS date, MIN(study_time) AS time
                        FROM firsts JOIN instances
                             ON study_uid = first_of AND study_date IS first_date
                        GROUP BY first_of)"
    )
}

impl Spool {
    /// Studies matching `StudyInstanceUID`, `ModalitiesInStudy` and `StudyDate`.
    pub fn query_studies(&self, q: &Query) -> Result<Vec<StudyRow>, StoreError> {
        let keys = Keys {
            modality: false,
            series_number: false,
            instance_number: false,
        };
        let (filter, mut params) = q.filter(&[("study_uid", &q.study_uids)], keys);
        let page = q.page(&mut params);
        let sql = format!(
            "{}
             SELECT study_uid, COUNT(DISTINCT series_uid), COUNT(*), MAX(received_at_ms),
                    MIN(date), MIN(time), GROUP_CONCAT(DISTINCT modality)
             FROM matched JOIN dates ON date_of = study_uid GROUP BY study_uid
             ORDER BY study_uid {page}",
            with_study_dates(&filter)
        );
        let db = self.searcher();
        let mut stmt = db.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(params), |r| {
            let mut modalities: Vec<String> = r
                .get::<_, Option<String>>(6)?
                .map(|m| m.split(',').map(str::to_owned).collect())
                .unwrap_or_default();
            modalities.sort();
            Ok(StudyRow {
                study_uid: r.get(0)?,
                series: r.get::<_, i64>(1)? as u64,
                instances: r.get::<_, i64>(2)? as u64,
                last_received_ms: r.get(3)?,
                study_date: r.get(4)?,
                study_time: r.get(5)?,
                modalities,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Series matching `StudyInstanceUID`, `SeriesInstanceUID`, `Modality`,
    /// `ModalitiesInStudy`, `SeriesNumber` and `StudyDate`.
    ///
    /// A series is answered with its own attributes over all its instances (its count, its
    /// least Modality and SeriesNumber where its instances disagree), and `Modality` and
    /// `SeriesNumber` match those: matched per instance, one series of instances 1/CT, 2/MR,
    /// 1/CT was answered as 1/CT with 2 instances, or as 2/MR with 1, by the filter asked
    /// (a review's finding).
    pub fn query_series(&self, q: &Query) -> Result<Vec<SeriesRow>, StoreError> {
        let mut clauses = vec![];
        let mut params = vec![];
        q.uid_and_study_clauses(
            &[("study_uid", &q.study_uids), ("series_uid", &q.series_uids)],
            &mut clauses,
            &mut params,
        );
        let filter = where_of(&clauses);
        let mut own = vec![];
        let keys = Keys {
            modality: true,
            series_number: true,
            instance_number: false,
        };
        q.attribute_clauses(keys, &mut own, &mut params);
        let own = where_of(&own);
        let page = q.page(&mut params);
        let sql = format!(
            "{},
              answered AS (SELECT study_uid, series_uid, COUNT(*) AS instances,
                                MAX(received_at_ms) AS received, MIN(modality) AS modality,
                                MIN(series_number) AS series_number, MIN(date) AS date,
                                MIN(time) AS time
                         FROM matched JOIN dates ON date_of = study_uid
                         GROUP BY study_uid, series_uid)
             SELECT study_uid, series_uid, instances, received, modality, series_number, date,
                    time
             FROM answered {own}
             ORDER BY study_uid, series_uid {page}",
            with_study_dates(&filter)
        );
        let db = self.searcher();
        let mut stmt = db.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(params), |r| {
            Ok(SeriesRow {
                study_uid: r.get(0)?,
                series_uid: r.get(1)?,
                instances: r.get::<_, i64>(2)? as u64,
                last_received_ms: r.get(3)?,
                modality: r.get(4)?,
                series_number: r.get(5)?,
                study_date: r.get(6)?,
                study_time: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Instances matching every key of `q`.
    pub fn query_instances(&self, q: &Query) -> Result<Vec<InstanceRow>, StoreError> {
        let keys = Keys {
            modality: true,
            series_number: true,
            instance_number: true,
        };
        let (filter, mut params) = q.filter(
            &[
                ("study_uid", &q.study_uids),
                ("series_uid", &q.series_uids),
                ("sop_instance_uid", &q.sop_instance_uids),
                ("sop_class_uid", &q.sop_class_uids),
            ],
            keys,
        );
        let page = q.page(&mut params);
        let sql = format!(
            "{}
             SELECT study_uid, series_uid, sop_instance_uid, sop_class_uid, transfer_syntax,
                    received_at_ms, size, modality, date, time, series_number,
                    instance_number, rows, columns, number_of_frames
             FROM matched JOIN dates ON date_of = study_uid
             ORDER BY study_uid, series_uid, sop_instance_uid {page}",
            with_study_dates(&filter)
        );
        let db = self.searcher();
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
                attributes: Attributes::from_row(r, 7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Incoming, SpoolOptions};

    fn element(out: &mut Vec<u8>, group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) {
        let mut value = value.to_vec();
        if value.len() % 2 == 1 {
            value.push(if vr == b"UI" { 0 } else { b' ' });
        }
        out.extend_from_slice(&group.to_le_bytes());
        out.extend_from_slice(&elem.to_le_bytes());
        out.extend_from_slice(vr);
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        out.extend_from_slice(&value);
    }

    /// A secondary capture data set (Explicit VR Little Endian) of `series` in study
    /// 1.2.3.9, dated `date`.
    fn instance(series: &str, sop: &str, date: &str) -> Vec<u8> {
        instance_of(series, sop, date, "", "OT", "")
    }

    /// [`instance`] with a study time, a modality and a series number.
    fn instance_of(
        series: &str,
        sop: &str,
        date: &str,
        time: &str,
        modality: &str,
        number: &str,
    ) -> Vec<u8> {
        let mut d = Vec::new();
        element(&mut d, 0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.7");
        element(&mut d, 0x0008, 0x0018, b"UI", sop.as_bytes());
        element(&mut d, 0x0008, 0x0020, b"DA", date.as_bytes());
        if !time.is_empty() {
            element(&mut d, 0x0008, 0x0030, b"TM", time.as_bytes());
        }
        element(&mut d, 0x0008, 0x0060, b"CS", modality.as_bytes());
        element(&mut d, 0x0020, 0x000D, b"UI", b"1.2.3.9");
        element(&mut d, 0x0020, 0x000E, b"UI", series.as_bytes());
        if !number.is_empty() {
            element(&mut d, 0x0020, 0x0011, b"IS", number.as_bytes());
        }
        element(&mut d, 0x0028, 0x0010, b"US", &1u16.to_le_bytes());
        element(&mut d, 0x0028, 0x0011, b"US", &2u16.to_le_bytes());
        // Pixel Data, OW: a 4-byte length after two reserved bytes.
        d.extend_from_slice(&[
            0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0, 4, 0, 0, 0, 1, 0, 2, 0,
        ]);
        d
    }

    fn incoming() -> Incoming<'static> {
        Incoming {
            transfer_syntax: "1.2.840.10008.1.2.1",
            calling_ae: "TEST",
            expected_sop_class: None,
            expected_sop_instance: None,
        }
    }

    /// A review's finding: a search of a 10,000-instance study took 50 s (a subquery of the
    /// study's date per answered row) while it held the index connection every store waits
    /// for, so C-STOREs timed out. A search has a connection of its own (a store completes
    /// while one is under way), and each study's date is computed once, still the study's.
    #[test]
    fn a_search_never_holds_the_connection_stores_wait_for() {
        let dir = tempfile::tempdir().unwrap();
        let options = SpoolOptions {
            min_free_bytes: 0,
            ..Default::default()
        };
        let spool = std::sync::Arc::new(Spool::open(dir.path(), options).unwrap().0);
        spool
            .store(
                &instance("1.2.3.9.1", "1.2.3.9.1.1", "20240102"),
                &incoming(),
            )
            .unwrap();
        let search = spool.searcher();
        let (tx, rx) = std::sync::mpsc::channel();
        let storing = spool.clone();
        std::thread::spawn(move || {
            let stored = storing.store(
                &instance("1.2.3.9.2", "1.2.3.9.2.1", "20231231"),
                &incoming(),
            );
            tx.send(stored.map(|_| ()))
        });
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .expect("a store completes while a search holds its connection")
            .unwrap();
        drop(search);
        // Both series answer the study's date (its earliest), each its own row.
        let series = spool.query_series(&Query::default()).unwrap();
        assert_eq!(series.len(), 2);
        for s in &series {
            assert_eq!(s.study_date.as_deref(), Some("20231231"), "{s:?}");
        }
        let instances = spool
            .query_instances(&Query {
                series_uids: vec!["1.2.3.9.1".into()],
                ..Query::default()
            })
            .unwrap();
        assert_eq!(instances.len(), 1);
        assert_eq!(
            instances[0].attributes.study_date.as_deref(),
            Some("20231231")
        );
        // A study date range matches the study by that date.
        let matched = spool
            .query_series(&Query {
                study_date: Some((Some("20240101".into()), None)),
                ..Query::default()
            })
            .unwrap();
        assert!(matched.is_empty(), "{matched:?}");
    }

    /// A review's findings: a series whose instances disagree (1/CT, 2/MR, 1/CT) was
    /// answered with the attributes and count of the instances the filter kept, and a study
    /// with the earliest date and the earliest time of different instances.
    #[test]
    fn a_series_and_a_study_are_answered_whole_whatever_the_filter() {
        let dir = tempfile::tempdir().unwrap();
        let options = SpoolOptions {
            min_free_bytes: 0,
            ..Default::default()
        };
        let spool = Spool::open(dir.path(), options).unwrap().0;
        for (sop, date, time, modality, number) in [
            ("1.2.3.9.1.1", "20240102", "000100", "CT", "1"),
            ("1.2.3.9.1.2", "20240101", "235900", "MR", "2"),
            ("1.2.3.9.1.3", "20240101", "235930", "CT", "1"),
        ] {
            let data = instance_of("1.2.3.9.1", sop, date, time, modality, number);
            spool.store(&data, &incoming()).unwrap();
        }
        let whole = |q: Query| spool.query_series(&q).unwrap();
        let all = whole(Query::default());
        assert_eq!(all.len(), 1);
        let series = &all[0];
        assert_eq!(series.instances, 3);
        assert_eq!(series.modality.as_deref(), Some("CT"));
        assert_eq!(series.series_number, Some(1));
        assert_eq!(series.study_date.as_deref(), Some("20240101"));
        assert_eq!(series.study_time.as_deref(), Some("235900"));
        for q in [
            Query {
                series_numbers: vec![1],
                ..Query::default()
            },
            Query {
                modalities: vec!["C?".into()],
                ..Query::default()
            },
        ] {
            assert_eq!(whole(q.clone()), all, "{q:?}");
        }
        // Keys that only some of its instances carry do not match the series.
        for q in [
            Query {
                series_numbers: vec![2],
                ..Query::default()
            },
            Query {
                modalities: vec!["MR".into()],
                ..Query::default()
            },
        ] {
            assert_eq!(whole(q.clone()), vec![], "{q:?}");
        }
        // The study: the date and time of the same instances, at every level.
        let studies = spool.query_studies(&Query::default()).unwrap();
        assert_eq!(studies.len(), 1);
        assert_eq!(studies[0].study_date.as_deref(), Some("20240101"));
        assert_eq!(studies[0].study_time.as_deref(), Some("235900"));
        let instances = spool.query_instances(&Query::default()).unwrap();
        assert_eq!(instances.len(), 3);
        for i in &instances {
            assert_eq!(i.attributes.study_date.as_deref(), Some("20240101"));
            assert_eq!(i.attributes.study_time.as_deref(), Some("235900"));
        }
        // An instance search still matches each instance's own keys.
        let mr = spool
            .query_instances(&Query {
                modalities: vec!["MR".into()],
                ..Query::default()
            })
            .unwrap();
        assert_eq!(mr.len(), 1);
        assert_eq!(mr[0].sop_instance_uid, "1.2.3.9.1.2");
    }
}
