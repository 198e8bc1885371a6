//! The outbox: result objects sent to their destination by C-STORE (the SCU of
//! `nightingale_dicom::scu`), with bounded retries and back-off; after the last failed
//! attempt an object is copied to the dead-letter folder and counted
//! (`nightingale_pipeline_dead_letters_total`), never retried in a loop. Objects are files
//! in the results folder and rows in the results store, so a restart resumes sending.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nightingale_dicom::scu::{Part10File, ScuOptions, StoreAssociation};

use super::Pipeline;
use super::route::Destination;
use super::store::{ResultObject, now_ms};

/// Result files waiting to be sent (and kept after), under the results folder.
pub const OBJECTS_DIR: &str = "objects";
/// Objects given up on, under the results folder.
pub const DEAD_LETTER_DIR: &str = "dead-letter";

/// Default bound on one whole C-STORE of a result object (request, data set, response;
/// `--results-timeout-secs`): a PACS that trickles its response holds its destination's
/// objects at most this long per attempt, and never another destination's.
pub const SEND_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a delivery waits for the destination's answer to its A-RELEASE, every object's
/// outcome recorded already.
const RELEASE_WAIT: Duration = Duration::from_secs(10);
/// How long an object waits when its `sending` record could not be written.
const AUDIT_RETRY: Duration = Duration::from_secs(5);

/// Removes a destination from the ones being sent to when its task ends, and wakes the
/// sender for what came due meanwhile.
struct Idle(Arc<Pipeline>, String);

impl Drop for Idle {
    fn drop(&mut self) {
        self.0
            .sending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
        self.0.outbox.notify_one();
    }
}

/// What went wrong with a result file, without its path (the file name holds a UID).
fn file_error(e: &nightingale_dicom::scu::FileError) -> String {
    use nightingale_dicom::scu::FileError;
    match e {
        FileError::Io { source, .. } => source.kind().to_string(),
        FileError::NotPart10 { .. } => "not a DICOM Part 10 file".into(),
        FileError::Meta { .. } => "unreadable file meta information".into(),
    }
}

/// The delay before attempt `attempts + 1`.
pub fn backoff(base: Duration, max: Duration, attempts: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(20));
    base.saturating_mul(factor).min(max)
}

impl Pipeline {
    /// Starts sending every object that is due, one association per destination, each
    /// destination in its own task (a destination already being sent to is left to its
    /// task): a PACS that stalls holds only its own objects, and only for the C-STORE
    /// exchange bound. Returns when the next pending object of an idle destination is due.
    pub(crate) async fn send_due(
        self: Arc<Self>,
    ) -> Result<Option<i64>, Box<dyn std::error::Error + Send + Sync>> {
        let busy = self.busy_destinations();
        let due = {
            let me = self.clone();
            tokio::task::spawn_blocking(move || me.store().objects_due(now_ms(), 200, &busy))
                .await??
        };
        let mut by_destination: BTreeMap<String, Vec<ResultObject>> = BTreeMap::new();
        // An object queued for a destination the configuration no longer names is not sent
        // there (it went, after a restart, to a PACS the operator had removed: a review's
        // finding): given up, kept in the dead-letter folder, said in the log and the trail.
        let configured = self.configured_destinations();
        for o in due {
            if !configured.contains(&o.destination) {
                self.give_up(
                    &o,
                    "the destination is no longer configured (--results-destination, [[dicom.routes]]): not sent",
                    None,
                )
                .await;
                continue;
            }
            by_destination
                .entry(o.destination.clone())
                .or_default()
                .push(o);
        }
        for (destination, objects) in by_destination {
            let sending = self
                .sending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(destination.clone());
            if !sending {
                continue;
            }
            let me = self.clone();
            tokio::spawn(async move {
                // Marks the destination idle again however the task ends.
                let _idle = Idle(me.clone(), destination.clone());
                let started = std::time::Instant::now();
                me.send_to(&destination, objects).await;
                super::process::stage("send", started.elapsed());
            });
        }
        let busy = self.busy_destinations();
        let me = self.clone();
        Ok(tokio::task::spawn_blocking(move || me.store().next_due(&busy)).await??)
    }

    pub(super) fn busy_destinations(&self) -> Vec<String> {
        self.sending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    async fn send_to(&self, destination: &str, objects: Vec<ResultObject>) {
        let target: Destination = match destination.parse() {
            Ok(d) => d,
            Err(e) => {
                for o in &objects {
                    self.give_up(o, &format!("bad destination: {e}"), None)
                        .await;
                }
                return;
            }
        };
        // A trail known to be failing: nothing is tried (no association opened every 5 s
        // for nothing); each object waits for it as below.
        if !self.state.audit.is_writable() {
            for o in &objects {
                self.postpone_for_audit(o);
            }
            return;
        }
        let mut files = Vec::new();
        for o in objects {
            let trim = |uid: &str| uid.trim_end_matches(['\0', ' ']).to_owned();
            match Part10File::open(&self.config.results_dir.join(&o.path)) {
                // The file must hold the object its row names: a dead-letter file replaced
                // by another (another patient's) went out under the row's name, and its
                // audit record named the row's object (a review's finding).
                Ok(f)
                    if trim(&f.sop_instance_uid) != trim(&o.sop_instance_uid)
                        || trim(&f.sop_class_uid) != trim(&o.sop_class_uid) =>
                {
                    let why = "result file holds another object than its row names (SOP Instance or Class UID differs): not sent";
                    self.give_up(&o, why, None).await;
                }
                Ok(f) => files.push((o, f)),
                // Not the error's text: it holds the path, whose name holds a UID.
                Err(e) => {
                    let why = format!("result file unreadable: {}", file_error(&e));
                    self.give_up(&o, &why, None).await;
                }
            }
        }
        if files.is_empty() {
            return;
        }
        let options = ScuOptions {
            calling_ae_title: self.config.calling_ae_title.clone(),
            called_ae_title: target.ae_title.clone(),
            connect_timeout: Duration::from_secs(10),
            dimse_timeout: Duration::from_secs(60),
            exchange_timeout: self.config.exchange_timeout,
            ..ScuOptions::default()
        };
        let mut contexts: Vec<(String, String)> = files
            .iter()
            .map(|(_, f)| (f.sop_class_uid.clone(), f.transfer_syntax.clone()))
            .collect();
        contexts.sort();
        contexts.dedup();
        let mut association = match StoreAssociation::open(&target.addr, &options, &contexts).await
        {
            Ok(a) => a,
            Err(e) => {
                for (o, _) in &files {
                    self.failed_attempt(o, &format!("association: {e}"), None)
                        .await;
                }
                return;
            }
        };
        // An object whose C-STORE broke the association is charged the attempt; the objects
        // behind it go on over a new association (they were charged too, untried, and a PACS
        // that aborts on one object, say an SR it does not take, sent every object behind
        // it to the dead-letter folder without one being sent: a red-team finding).
        let mut broken: Option<String> = None;
        for (i, (o, file)) in files.iter().enumerate() {
            // The server is stopping: the objects not yet tried wait for the next start,
            // untouched (no attempt charged).
            if self.stopping() {
                break;
            }
            if let Some(why) = broken.take() {
                match StoreAssociation::open(&target.addr, &options, &contexts).await {
                    Ok(a) => association = a,
                    Err(e) => {
                        let why = format!("association (opened again after: {why}): {e}");
                        for (o, _) in &files[i..] {
                            self.failed_attempt(o, &why, None).await;
                        }
                        return;
                    }
                }
            }
            // The data set goes to the destination now: its record first, and the attempt
            // charged. A crash between the destination's answer and its record left a
            // delivery of patient data in no record, and its resend said `attempt=1` (a
            // review's finding: 14 of 32 kill -9s under load).
            //
            // No record, no delivery: while the trail cannot be written, this object and
            // those behind it wait (not charged an attempt: the destination is not at
            // fault) and go once it can (they went unrecorded: a re-attack's finding).
            if !self.audit_sent(o, None, "sending").await {
                for (o, _) in &files[i..] {
                    self.postpone_for_audit(o);
                }
                break;
            }
            let charged = ResultObject {
                attempts: o.attempts + 1,
                ..o.clone()
            };
            if let Err(e) = self.store().delivery(&charged) {
                tracing::error!(error = %e, "results store: attempt not recorded");
            }
            let stored = association.store(file).await;
            if let Ok(status) = &stored {
                let event = if status.is_success() || status.is_warning() {
                    "delivered"
                } else {
                    "refused"
                };
                self.audit_sent(o, Some(status.status), event).await;
            }
            match stored {
                Ok(status) if status.is_success() => self.delivered(o, None),
                // Stored, but not as sent (coerced, elements discarded): kept with the
                // object (it was shown as plainly sent: a red-team finding).
                Ok(status) if status.is_warning() => {
                    metrics::counter!("nightingale_pipeline_objects_sent_with_warning_total")
                        .increment(1);
                    // The status only: a peer's Error Comment may name the patient.
                    self.delivered(
                        o,
                        Some(format!(
                            "stored with warning status 0x{:04X}",
                            status.status
                        )),
                    );
                }
                // Sending the same object again cannot change these: given up at once
                // (they were retried to the maximum).
                Ok(status) if status.is_permanent_failure() => {
                    let why = format!(
                        "the destination refused it for good: status 0x{:04X}",
                        status.status
                    );
                    self.give_up(o, &why, Some(status.status)).await;
                }
                Ok(status) => {
                    let why = format!("the destination answered status 0x{:04X}", status.status);
                    self.failed_attempt(o, &why, Some(status.status)).await;
                }
                Err(e) => {
                    let why = match &e {
                        nightingale_dicom::scu::StoreFailure::File(f) => {
                            format!("C-STORE: result file unreadable: {}", file_error(f))
                        }
                        e => format!("C-STORE: {e}"),
                    };
                    if matches!(e, nightingale_dicom::scu::StoreFailure::Association(_)) {
                        broken = Some(why.clone());
                    }
                    self.failed_attempt(o, &why, None).await;
                }
            }
        }
        // Every object's delivery is recorded: a PACS that never answers the A-RELEASE
        // holds this destination's next objects for at most RELEASE_WAIT (it held them
        // for the 60 s DIMSE timeout per association: a review's observation), then the
        // connection is closed.
        if broken.is_none() {
            let _ = tokio::time::timeout(RELEASE_WAIT, association.release()).await;
        }
    }

    fn delivered(&self, o: &ResultObject, warning: Option<String>) {
        metrics::counter!("nightingale_pipeline_objects_sent_total", "kind" => o.kind.clone())
            .increment(1);
        match &warning {
            None => {
                tracing::info!(kind = %o.kind, attempts = o.attempts + 1, "result object delivered")
            }
            Some(w) => {
                tracing::warn!(kind = %o.kind, attempts = o.attempts + 1, warning = %w, "result object delivered with a warning")
            }
        }
        let sent = ResultObject {
            delivery: "sent".into(),
            attempts: o.attempts + 1,
            last_error: warning,
            ..o.clone()
        };
        if let Err(e) = self.store().delivery(&sent) {
            tracing::error!(error = %e, "results store: delivery not recorded");
        }
    }

    /// Records a failed attempt (`status`: the destination's answer, if it gave one), or
    /// gives the object up after the last one.
    async fn failed_attempt(&self, o: &ResultObject, why: &str, status: Option<u16>) {
        let attempts = o.attempts + 1;
        if attempts >= self.config.max_attempts {
            self.give_up(o, why, status).await;
            return;
        }
        let delay = backoff(self.config.backoff, self.config.max_backoff, attempts);
        tracing::warn!(
            kind = %o.kind,
            attempts,
            retry_in_ms = delay.as_millis() as u64,
            error = why,
            "result object not delivered; will retry"
        );
        metrics::counter!("nightingale_pipeline_send_failures_total").increment(1);
        let retry = ResultObject {
            delivery: "pending".into(),
            attempts,
            next_attempt_ms: now_ms() + delay.as_millis() as i64,
            last_error: Some(why.to_owned()),
            ..o.clone()
        };
        if let Err(e) = self.store().delivery(&retry) {
            tracing::error!(error = %e, "results store: attempt not recorded");
        }
    }

    /// Audits an object's C-STORE: `sending` (before the data set goes), then `delivered`
    /// or `refused` with the destination's DIMSE status; or `given-up` (dead-lettered). The
    /// destination (as configured, an address and AE title) is the record's actor; the
    /// object by its hashed UIDs.
    async fn audit_sent(&self, o: &ResultObject, status: Option<u16>, event: &str) -> bool {
        let record = crate::audit::AuditEvent {
            status: status.unwrap_or(0),
            outcome: match status {
                Some(s) => crate::audit::dicom::outcome_of(s),
                None if event == "sending" => crate::audit::Outcome::Ok,
                None => crate::audit::Outcome::Failed,
            },
            detail: Some(
                format!(
                    "event={event} kind={} attempt={} {}",
                    o.kind,
                    o.attempts + 1,
                    super::audit_uids(
                        self.config.audit_uids,
                        &[
                            ("sop_instance", &o.sop_instance_uid),
                            ("series", &o.series_uid)
                        ],
                    )
                )
                .trim_end()
                .to_owned(),
            ),
            ..crate::audit::AuditEvent::blank(
                crate::audit::EventKind::DicomResultSent,
                format!("pipeline-job-{}", o.job_id),
                Some(o.destination.chars().take(256).collect()),
            )
        };
        match self.state.audit.record(record).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "audit record of a result delivery not written");
                false
            }
        }
    }

    /// An object not sent for want of its `sending` record: due again in a few seconds,
    /// its attempts unchanged.
    fn postpone_for_audit(&self, o: &ResultObject) {
        let later = ResultObject {
            next_attempt_ms: now_ms() + AUDIT_RETRY.as_millis() as i64,
            last_error: Some(
                "not sent: the audit trail cannot be written; sent once it can".into(),
            ),
            ..o.clone()
        };
        if let Err(e) = self.store().delivery(&later) {
            tracing::error!(error = %e, "results store: postponed delivery not recorded");
        }
    }

    /// Copies the object to the dead-letter folder (other destinations may still send the
    /// file); it is not sent to this destination again. Audited (`given-up`, with the
    /// destination's `status` when it answered one).
    async fn give_up(&self, o: &ResultObject, why: &str, status: Option<u16>) {
        // Given up all the same: its record may be missing while the trail fails (the
        // log says so); the object stays in the dead-letter folder.
        self.audit_sent(o, status, "given-up").await;
        let from = self.config.results_dir.join(&o.path);
        let relative = std::path::Path::new(DEAD_LETTER_DIR).join(format!(
            "{}-{}-{}.dcm",
            o.kind,
            super::uid_tag(&o.sop_instance_uid),
            super::uid_tag(&o.destination)
        ));
        // The folder is made again if it went (an operator's clean-up).
        let _ = std::fs::create_dir_all(self.config.results_dir.join(DEAD_LETTER_DIR));
        // An object sent again from its dead-letter copy (`results resend`) and given up
        // again is there already: copying a file onto itself truncated it to nothing, and
        // the object was lost (a review's finding). Otherwise copied beside and renamed
        // over, so that a link planted at the name is replaced, not written through.
        let copied = if std::path::Path::new(&o.path) == relative {
            Ok(0)
        } else {
            let to = self.config.results_dir.join(&relative);
            let beside = to.with_extension(format!("dcm.tmp-{}", std::process::id()));
            std::fs::copy(&from, &beside)
                .and_then(|n| std::fs::rename(&beside, &to).map(|()| n))
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(&beside);
                })
        };
        let moved = copied.is_ok();
        metrics::counter!("nightingale_pipeline_dead_letters_total").increment(1);
        match &copied {
            Ok(_) => tracing::error!(
                kind = %o.kind,
                attempts = o.attempts + 1,
                error = why,
                "result object given up: copied to the dead-letter folder"
            ),
            // The io error's kind only: its text may name the path (a UID in the name).
            Err(e) => tracing::error!(
                kind = %o.kind,
                attempts = o.attempts + 1,
                error = why,
                copy_error = %e.kind(),
                "result object given up: NOT copied to the dead-letter folder"
            ),
        }
        let dead = ResultObject {
            delivery: "dead".into(),
            attempts: o.attempts + 1,
            last_error: Some(why.to_owned()),
            path: if moved {
                relative.to_string_lossy().into_owned()
            } else {
                o.path.clone()
            },
            ..o.clone()
        };
        if let Err(e) = self.store().delivery(&dead) {
            tracing::error!(error = %e, "results store: dead letter not recorded");
            return;
        }
        // The original, once no row names it (this was its last destination), goes: its
        // copy in the dead-letter folder is what retention purges, and the original, left
        // with no row, held patient data past retention (a red-team finding).
        if moved
            && std::path::Path::new(&o.path) != relative
            && matches!(self.store().path_referenced(&o.path), Ok(false))
        {
            let original = self.config.results_dir.join(&o.path);
            if std::fs::remove_file(&original).is_ok()
                && let Some(dir) = original.parent()
                && dir != self.config.results_dir.join(OBJECTS_DIR)
            {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A result file's name holds its SOP Instance UID: why an object was not sent (logged,
    /// stored, shown by the results API) names the failure, not the path.
    #[test]
    fn file_errors_are_described_without_their_path() {
        use nightingale_dicom::scu::FileError;
        let path = std::path::PathBuf::from("objects/7/SR-2.25.1234567890.dcm");
        for e in [
            FileError::Io {
                path: path.clone(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            },
            FileError::NotPart10 { path: path.clone() },
            FileError::Meta {
                path: path.clone(),
                detail: "bad".into(),
            },
        ] {
            assert!(e.to_string().contains("2.25.1234567890"));
            let text = file_error(&e);
            assert!(
                !text.contains("2.25") && !text.contains("objects/"),
                "{text}"
            );
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (b, m) = (Duration::from_secs(2), Duration::from_secs(60));
        let got: Vec<u64> = (1..=7).map(|a| backoff(b, m, a).as_secs()).collect();
        assert_eq!(got, vec![2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff(b, m, 10_000), m);
    }
}
