//! Audit records of DICOM ingest: the SCP's events ([`nightingale_dicom::DicomEvent`]) as
//! records of the hash-chained trail.
//!
//! One record per association event (accepted, rejected, released, aborted) and one per
//! C-STORE (stored or refused). The actor is the calling AE title and the peer's address
//! (`AE@IP`: neither is patient data). UIDs (SOP Instance, Study, Series) are written as the
//! SHA-256 of the UID text (hex) with `--dicom-audit-uids hash` (the default), so an auditor
//! who holds an instance can find its record without the trail listing what was received,
//! or left out with `omit`. SOP class and transfer syntax UIDs name standard classes, not
//! instances, and are written as they are. No patient name or ID is ever read.
//!
//! `detail` holds the rest as `key=value` pairs separated by spaces, e.g.
//! `event=stored sop_class=1.2.840.10008.5.1.4.1.1.2 transfer_syntax=1.2.840.10008.1.2.1
//! size=1234 duplicate=false sop_instance_sha256=… study_sha256=… series_sha256=…`.

use std::fmt::Write as _;
use std::sync::Arc;

use nightingale_dicom::events::{AbortedBy, EventSink, SinkError, SinkFuture};
use nightingale_dicom::{DicomEvent, InstanceEvent};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{AuditEvent, AuditLog, EventKind, Outcome};

/// How UIDs of instances appear in the audit trail.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UidAudit {
    /// SHA-256 of the UID text, hex.
    #[default]
    Hash,
    /// Not written.
    Omit,
}

/// The SCP's event sink writing to the audit trail. Instance records are stored before the
/// C-STORE is answered (see [`EventSink`]).
pub struct DicomAuditSink {
    log: AuditLog,
    uids: UidAudit,
    /// Distinguishes this process's association numbers from an earlier run's.
    run: u64,
    refused: Arc<Refused>,
}

/// Associations refused or never established are recorded a burst one by one, then one a
/// second, the rest counted by reason and named in one record (as the unauthenticated HTTP
/// refusals are, [`super::throttle`]): anyone who reaches the DICOM port causes them, and
/// junk connections grew the trail by 2 MB a second until its disk was full and every
/// inference refused (a review's finding).
struct Refused {
    throttle: super::throttle::Throttle,
    /// Held back and not yet named by a record: reasons and their counts, the peers' hosts
    /// (at most [`HELD_HOSTS`]).
    held: std::sync::Mutex<HeldRefusals>,
}

#[derive(Default)]
struct HeldRefusals {
    reasons: std::collections::BTreeMap<&'static str, u64>,
    hosts: std::collections::HashSet<std::net::IpAddr>,
}

/// The distinct hosts a summary counts, at most.
const HELD_HOSTS: usize = 4096;

impl HeldRefusals {
    /// ` reasons=a:1,b:2 hosts=N` and forgets them.
    fn take(&mut self) -> String {
        let mut d = String::from(" reasons=");
        for (i, (reason, n)) in std::mem::take(&mut self.reasons).iter().enumerate() {
            let _ = write!(d, "{}{reason}:{n}", if i > 0 { "," } else { "" });
        }
        let hosts = std::mem::take(&mut self.hosts).len();
        let more = if hosts >= HELD_HOSTS { "+" } else { "" };
        let _ = write!(d, " hosts={hosts}{more}");
        d
    }
}

impl DicomAuditSink {
    pub fn new(log: AuditLog, uids: UidAudit) -> Arc<DicomAuditSink> {
        Arc::new(DicomAuditSink {
            log,
            uids,
            run: super::unix_ms(),
            refused: Arc::new(Refused {
                throttle: super::throttle::Throttle::new(
                    crate::http::UNAUTHENTICATED_AUDIT_BURST,
                    crate::http::UNAUTHENTICATED_AUDIT_PER_SECOND,
                ),
                held: Default::default(),
            }),
        })
    }

    /// Writes the record of the refused associations held back and not yet named (at
    /// shutdown, and a second after the first held back).
    pub async fn flush_refused(&self) {
        write_refused_summary(&self.log, &self.refused).await;
    }

    /// `Some(record)` to write for a refused association, `None` when it is held back
    /// (counted; its summary scheduled where it is the first).
    fn throttle_refused(
        &self,
        record: AuditEvent,
        peer: std::net::IpAddr,
        reason: &'static str,
    ) -> Option<AuditEvent> {
        use super::throttle::Decision;
        let mut held = self.refused.held.lock().unwrap_or_else(|p| p.into_inner());
        match self.refused.throttle.decide() {
            Decision::Record { held_before: 0 } => Some(record),
            Decision::Record { held_before } => {
                let named = held.take();
                let mut record = record;
                if let Some(d) = record.detail.as_mut() {
                    let _ = write!(d, " held_before={held_before}{named}");
                }
                Some(record)
            }
            Decision::Hold { schedule_summary } => {
                metrics::counter!("nightingale_audit_refusals_summarised_total").increment(1);
                *held.reasons.entry(reason).or_default() += 1;
                if held.hosts.len() < HELD_HOSTS {
                    held.hosts.insert(peer);
                }
                if schedule_summary && let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let (log, refused) = (self.log.clone(), self.refused.clone());
                    runtime.spawn(async move {
                        tokio::time::sleep(super::throttle::SUMMARY_AFTER).await;
                        write_refused_summary(&log, &refused).await;
                    });
                }
                None
            }
        }
    }

    /// The audit record of an event.
    pub fn record_of(&self, event: &DicomEvent) -> AuditEvent {
        let association_id = |n: u64| format!("dicom-{}-{n}", self.run);
        let actor = |ae: &str, peer: &std::net::SocketAddr| {
            Some(
                format!("{}@{}", clean(ae), peer.ip())
                    .chars()
                    .take(256)
                    .collect(),
            )
        };
        match event {
            DicomEvent::AssociationAccepted {
                association,
                peer,
                calling_ae,
                contexts_proposed,
                contexts_accepted,
            } => AuditEvent {
                detail: Some(format!(
                    "event=accepted contexts_proposed={contexts_proposed} contexts_accepted={contexts_accepted}"
                )),
                ..AuditEvent::blank(
                    EventKind::DicomAssociation,
                    association_id(*association),
                    actor(calling_ae, peer),
                )
            },
            DicomEvent::AssociationRejected { peer, reason } => AuditEvent {
                outcome: Outcome::Rejected,
                detail: Some(format!("event=rejected reason={reason}")),
                ..AuditEvent::blank(
                    EventKind::DicomAssociation,
                    "-".into(),
                    Some(format!("?@{}", peer.ip())),
                )
            },
            DicomEvent::AssociationReleased {
                association,
                peer,
                calling_ae,
                stored,
                failed,
            } => AuditEvent {
                detail: Some(format!("event=released stored={stored} failed={failed}")),
                ..AuditEvent::blank(
                    EventKind::DicomAssociation,
                    association_id(*association),
                    actor(calling_ae, peer),
                )
            },
            DicomEvent::AssociationAborted {
                association,
                peer,
                calling_ae,
                by,
                reason,
                stored,
                failed,
            } => {
                let by = match by {
                    AbortedBy::Peer => "peer",
                    AbortedBy::Local => "local",
                };
                let mut detail = format!("event=aborted by={by} stored={stored} failed={failed}");
                if let Some(reason) = reason {
                    let _ = write!(detail, " reason={}", reason.replace(' ', "_"));
                }
                AuditEvent {
                    outcome: Outcome::Failed,
                    detail: Some(detail),
                    ..AuditEvent::blank(
                        EventKind::DicomAssociation,
                        association_id(*association),
                        actor(calling_ae, peer),
                    )
                }
            }
            DicomEvent::InstanceStored(i) | DicomEvent::InstanceRefused(i) => {
                let stored = matches!(event, DicomEvent::InstanceStored(_));
                AuditEvent {
                    input_sha256: i.sha256.clone(),
                    status: i.status,
                    outcome: outcome_of(i.status),
                    detail: Some(self.instance_detail(stored, i)),
                    ..AuditEvent::blank(
                        EventKind::DicomInstance,
                        association_id(i.association),
                        actor(&i.calling_ae, &i.peer),
                    )
                }
            }
        }
    }

    fn instance_detail(&self, stored: bool, i: &InstanceEvent) -> String {
        let mut d = format!(
            "event={} sop_class={} transfer_syntax={} size={} duplicate={}",
            if stored { "stored" } else { "refused" },
            uid_text(&i.sop_class_uid),
            uid_text(&i.transfer_syntax),
            i.size,
            i.duplicate
        );
        if let Some(reason) = i.reason {
            let _ = write!(d, " reason={reason}");
        }
        if self.uids == UidAudit::Hash {
            for (name, uid) in [
                ("sop_instance_sha256", Some(&i.sop_instance_uid)),
                ("study_sha256", i.study_uid.as_ref()),
                ("series_sha256", i.series_uid.as_ref()),
            ] {
                if let Some(uid) = uid.filter(|u| !u.is_empty()) {
                    let _ = write!(d, " {name}={}", uid_sha256(uid));
                }
            }
        }
        d
    }
}

/// The audit record of a DICOMweb read ([`EventKind::DicomwebRead`]): `detail` is `event=`
/// (`retrieve` or `search`), `level=`, then `fields` (counts, key names), then the UIDs'
/// SHA-256 as `{name}_sha256=` where `uids` is [`UidAudit::Hash`].
pub fn read_record(
    request_id: &str,
    actor: &str,
    event: &str,
    level: &str,
    uids: UidAudit,
    named_uids: &[(&str, &str)],
    fields: &[(&str, String)],
) -> AuditEvent {
    let mut d = format!("event={event} level={level}");
    for (name, value) in fields {
        let _ = write!(d, " {name}={value}");
    }
    if uids == UidAudit::Hash {
        for (name, uid) in named_uids {
            let _ = write!(d, " {name}_sha256={}", uid_sha256(uid));
        }
    }
    AuditEvent {
        detail: Some(d),
        status: 200,
        ..AuditEvent::blank(
            EventKind::DicomwebRead,
            stow_request_id(request_id),
            Some(actor.chars().take(256).collect()),
        )
    }
}

/// A STOW-RS record's request id: the HTTP request's, at most 128 characters.
fn stow_request_id(request_id: &str) -> String {
    request_id.chars().take(128).collect()
}

/// A STOW-RS record's actor: `STOW-RS:<caller id>`, printable ASCII.
fn stow_actor(caller: &str) -> Option<String> {
    Some(format!(
        "STOW-RS:{}",
        caller
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(200)
            .collect::<String>()
    ))
}

/// How many refused parts of one STOW-RS request are audited (and logged) one by one; the
/// rest are counted in one record ([`DicomAuditSink::stow_refused_summary`]).
pub const STOW_REFUSED_RECORDS: u64 = 64;

/// One STOW-RS part, as the audit sees it.
pub struct StowPart<'a> {
    /// The HTTP request's id (`x-request-id`): shared by the records of its parts.
    pub request_id: &'a str,
    /// The authenticated caller (`Caller::id`).
    pub caller: &'a str,
    /// What the part became: the instance's fields, `status` 0 when stored, else the
    /// PS3.18 failure reason.
    pub instance: InstanceEvent,
}

impl DicomAuditSink {
    /// The audit record of a STOW-RS part: kind `dicom-instance` like a C-STORE, actor
    /// `STOW-RS:<caller id>`, the HTTP request id, the same `detail` keys.
    pub fn stow_record(&self, part: &StowPart<'_>) -> AuditEvent {
        let event = if part.instance.status == 0 {
            DicomEvent::InstanceStored(part.instance.clone())
        } else {
            DicomEvent::InstanceRefused(part.instance.clone())
        };
        let mut record = self.record_of(&event);
        record.request_id = stow_request_id(part.request_id);
        record.actor = stow_actor(part.caller);
        record
    }

    /// One record for the refused parts of a STOW-RS request past the first
    /// [`STOW_REFUSED_RECORDS`] (each of those has its own): how many, their bytes, and how
    /// many for each reason. A request of 100 000 parts of a few bytes each was 100 000
    /// records and log lines.
    pub fn stow_refused_summary(
        &self,
        request_id: &str,
        caller: &str,
        bytes: u64,
        reasons: &std::collections::BTreeMap<&'static str, u64>,
    ) -> AuditEvent {
        let count: u64 = reasons.values().sum();
        let mut detail = format!("event=refused-parts count={count} size={bytes} reasons=");
        for (i, (kind, n)) in reasons.iter().enumerate() {
            let _ = write!(detail, "{}{kind}:{n}", if i > 0 { "," } else { "" });
        }
        AuditEvent {
            outcome: Outcome::Rejected,
            detail: Some(detail),
            ..AuditEvent::blank(
                EventKind::DicomInstance,
                stow_request_id(request_id),
                stow_actor(caller),
            )
        }
    }

    /// Stores the record of a STOW-RS part (before the part is reported as stored).
    pub async fn record_stow(&self, part: &StowPart<'_>) -> Result<(), super::AuditError> {
        self.log.record_or_hold(self.stow_record(part)).await
    }

    /// [`DicomAuditSink::record_stow`] on a thread that may block: in the task that stored
    /// the part ([`super::AuditLog::record_or_hold_blocking`]).
    pub fn record_stow_blocking(&self, part: &StowPart<'_>) -> Result<(), super::AuditError> {
        self.log.record_or_hold_blocking(self.stow_record(part))
    }
}

/// One record for the refused associations held back and not yet named (none when there
/// are none): `event=rejected-summary count=N reasons=… hosts=…`.
async fn write_refused_summary(log: &AuditLog, refused: &Refused) {
    let detail = {
        let mut held = refused.held.lock().unwrap_or_else(|p| p.into_inner());
        let count = refused.throttle.take_held();
        if count == 0 {
            return;
        }
        format!(
            "event=rejected-summary count={count}{} (more than one a second: not recorded one by one)",
            held.take()
        )
    };
    let record = AuditEvent {
        outcome: Outcome::Rejected,
        detail: Some(detail),
        ..AuditEvent::blank(EventKind::DicomAssociation, "-".into(), Some("?".into()))
    };
    if let Err(e) = log.record_or_hold(record).await {
        tracing::error!(error = %e, "audit summary of refused DICOM associations not written");
    }
}

impl EventSink for DicomAuditSink {
    fn event(&self, event: DicomEvent) -> SinkFuture<'_> {
        let record = self.record_of(&event);
        let record = match &event {
            DicomEvent::AssociationRejected { peer, reason } => {
                self.throttle_refused(record, peer.ip(), reason)
            }
            _ => Some(record),
        };
        let Some(record) = record else {
            return Box::pin(async { Ok(()) });
        };
        Box::pin(async move {
            self.log
                .record_or_hold(record)
                .await
                .map_err(|e| SinkError {
                    reason: e.to_string(),
                })
        })
    }
}

/// The records of a purge the spool kept ([`nightingale_dicom::maintenance::PurgeLogEntry`]):
/// the purge's (`event=purged`: when, the cutoff, counts, the words it was kept with),
/// then, where UIDs are hashed, one per study (`event=study-deleted instances=N
/// study_sha256=…`).
pub fn purge_records(
    entry: &nightingale_dicom::maintenance::PurgeLogEntry,
    uids: UidAudit,
) -> Vec<AuditEvent> {
    // The index is the spool owner's, but a record quotes nothing it did not make: `by` as
    // printable ASCII, `also` as `name=value` words, studies as 64 hex digits (a review
    // planted newlines, bidi controls and a forged `event=` in them).
    let id = format!("purge-{}-{}", entry.at_ms, entry.id);
    let actor = Some(
        entry
            .by
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(256)
            .collect::<String>(),
    );
    let word = |w: &&str| {
        w.split_once('=').is_some_and(|(name, value)| {
            !name.is_empty()
                && name != "event"
                && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._*:-".contains(&b))
        })
    };
    let also: Vec<&str> = entry.also.split(' ').filter(word).collect();
    let mut detail = format!(
        "event=purged at_ms={} cutoff_ms={} instances={} bytes={} quarantine_files={} studies={}",
        entry.at_ms,
        entry.cutoff_ms,
        entry.instances,
        entry.bytes,
        entry.quarantine_files,
        entry.studies.len()
    );
    if !also.is_empty() {
        let _ = write!(detail, " {}", also.join(" "));
    }
    let mut records = vec![AuditEvent {
        detail: Some(detail),
        ..AuditEvent::blank(EventKind::SpoolPurge, id.clone(), actor.clone())
    }];
    if uids == UidAudit::Hash {
        for (study, n) in &entry.studies {
            if study.len() != 64 || !study.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            records.push(AuditEvent {
                detail: Some(format!(
                    "event=study-deleted instances={n} study_sha256={study}"
                )),
                ..AuditEvent::blank(EventKind::SpoolPurge, id.clone(), actor.clone())
            });
        }
    }
    records
}

/// SHA-256 (hex) of a UID's text, trailing padding removed.
pub fn uid_sha256(uid: &str) -> String {
    let uid = uid.trim_end_matches(['\0', ' ']);
    hex::encode(Sha256::digest(uid.as_bytes()))
}

/// A DIMSE status as an outcome: success and warnings are `ok`, out of resources is
/// `overloaded`, processing failures are `failed`, the rest (the object refused) `rejected`.
pub(crate) fn outcome_of(status: u16) -> Outcome {
    match status {
        0x0000 | 0x0001 => Outcome::Ok,
        s if s & 0xF000 == 0xB000 => Outcome::Ok,
        s if s & 0xFF00 == 0xA700 => Outcome::Overloaded,
        0x0110 => Outcome::Failed,
        _ => Outcome::Rejected,
    }
}

/// An AE title as it may appear in a record: printable ASCII, no spaces at the ends.
fn clean(ae: &str) -> String {
    ae.trim()
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(16)
        .collect()
}

/// A class or transfer syntax UID: only digits and dots are kept (the value of a sender
/// that put something else there is not written).
fn uid_text(uid: &str) -> String {
    let uid = uid.trim_end_matches(['\0', ' ']);
    if !uid.is_empty() && uid.len() <= 64 && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        uid.to_owned()
    } else if uid.is_empty() {
        "-".into()
    } else {
        "invalid".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nightingale_dicom::maintenance::PurgeLogEntry;

    /// A purge's records quote only what the spool made: `by` printable, `also` as
    /// `name=value` words (no `event=`), studies as 64 hex digits; with UIDs omitted, no
    /// study records (a review planted newlines, bidi controls and a forged `event=`).
    #[test]
    fn purge_records_quote_only_well_formed_words() {
        let study = "ab".repeat(32);
        let entry = PurgeLogEntry {
            id: 3,
            at_ms: 1_000,
            cutoff_ms: 500,
            by: "operator:ev\nil\u{202e}".into(),
            instances: 2,
            bytes: 10,
            quarantine_files: 0,
            also: "command=spool-purge older_than=1ns\nevent=study-deleted patient=John^Doe force=true"
                .into(),
            studies: vec![(study.clone(), 2), ("1.2.840.113619".into(), 1), (String::new(), 1)],
        };
        let records = purge_records(&entry, UidAudit::Hash);
        assert_eq!(records.len(), 2, "{records:?}");
        assert_eq!(records[0].actor.as_deref(), Some("operator:evil"));
        assert_eq!(
            records[0].detail.as_deref(),
            Some(
                "event=purged at_ms=1000 cutoff_ms=500 instances=2 bytes=10 quarantine_files=0 studies=3 command=spool-purge force=true"
            )
        );
        assert_eq!(
            records[1].detail.as_deref(),
            Some(format!("event=study-deleted instances=2 study_sha256={study}").as_str())
        );
        assert_eq!(records[1].request_id, "purge-1000-3");
        assert_eq!(purge_records(&entry, UidAudit::Omit).len(), 1);
    }

    fn details(path: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["kind"] == "dicom-association")
            .map(|r| r["detail"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Refused associations: a burst one by one, then held back and counted by reason and
    /// host in one record a second later (5,000 junk connections were 5,000 records); the
    /// next one let through names those held since; shutdown writes what is still held.
    #[tokio::test]
    async fn refused_associations_past_a_burst_are_counted_in_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = DicomAuditSink::new(AuditLog::open(&path, false).unwrap(), UidAudit::Hash);
        let burst = crate::http::UNAUTHENTICATED_AUDIT_BURST as usize;
        let peer = |i: u8| std::net::SocketAddr::from(([127, 0, 0, i], 4000));
        for i in 0..burst + 30 {
            let reason = if i % 3 == 0 {
                "calling_ae"
            } else {
                "not_established"
            };
            let event = DicomEvent::AssociationRejected {
                peer: peer((i % 7) as u8 + 1),
                reason,
            };
            sink.event(event).await.unwrap();
        }
        let written = details(&path);
        assert_eq!(written.len(), burst, "{written:?}");
        assert!(
            written
                .iter()
                .all(|d| d.starts_with("event=rejected reason="))
        );
        // The summary, a second after the first held back (bounded wait).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while details(&path).len() == burst && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let written = details(&path);
        assert_eq!(written.len(), burst + 1, "{written:?}");
        // Of i in burst..burst+30: i % 3 == 0 ten times.
        assert!(
            written[burst].starts_with(
                "event=rejected-summary count=30 reasons=calling_ae:10,not_established:20 hosts=7 "
            ),
            "{}",
            written[burst]
        );
        // Nothing held: a flush writes nothing.
        sink.flush_refused().await;
        assert_eq!(details(&path).len(), burst + 1);
        // Held again (the bucket refills at one a second: at most a burst's worth pass),
        // then written at shutdown; every refusal is accounted for.
        for _ in 0..2 * burst {
            let event = DicomEvent::AssociationRejected {
                peer: peer(9),
                reason: "timeout",
            };
            sink.event(event).await.unwrap();
        }
        sink.flush_refused().await;
        let written = details(&path);
        let (last, one_by_one) = written[burst + 1..].split_last().unwrap();
        assert!(
            one_by_one
                .iter()
                .all(|d| d.starts_with("event=rejected reason=timeout")),
            "{one_by_one:?}"
        );
        let held: usize = last
            .strip_prefix("event=rejected-summary count=")
            .and_then(|r| r.split_once(' '))
            .and_then(|(n, rest)| rest.starts_with("reasons=timeout:").then_some(n))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{last}"));
        assert!(last.contains(" hosts=1 "), "{last}");
        assert_eq!(one_by_one.len() + held, 2 * burst, "{written:?}");
        assert!(held >= burst, "{written:?}");
    }
}
