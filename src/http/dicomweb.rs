//! DICOMweb on the HTTP port: STOW-RS (`POST /dicomweb/studies[/{study}]`) into the DICOM
//! spool, and QIDO-RS (`GET /dicomweb/studies`, `/series`, `/instances`) over its index.
//!
//! STOW-RS reads the `multipart/related` body as it arrives, one part at a time (at most
//! [`DicomWebConfig::max_part_bytes`] in memory), writing each part aside in the spool's
//! `tmp/` until the close delimiter has arrived; only then is each part stored through
//! [`nightingale_dicom::Spool::store`] (fsynced before the answer). A body that ends early
//! or breaks the multipart syntax stores nothing. A declared Content-Length over
//! [`DicomWebConfig::max_request_bytes`] is refused with 413 before the body is read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use nightingale_dicom::Spool;
use nightingale_dicom::multipart::{self, MultipartError, Parser};
use nightingale_dicom::qido;
use nightingale_dicom::scp::{Budget, Reservation};
use nightingale_dicom::stow::{self, PartOutcome, StagedPart};
use serde_json::{Map, Value, json};

use super::auth::Caller;
use super::{AppError, AppState};
use crate::audit::dicom::{DicomAuditSink, STOW_REFUSED_RECORDS, StowPart};
use axum::extract::Extension;
use nightingale_dicom::InstanceEvent;

/// STOW-RS limits.
#[derive(Debug, Clone)]
pub struct DicomWebConfig {
    /// Largest part (one DICOM file), in bytes: it is held in memory while stored.
    pub max_part_bytes: u64,
    /// Largest request body, in bytes.
    pub max_request_bytes: u64,
    /// Whole-request deadline of STOW-RS and QIDO-RS (instead of the API's).
    pub request_timeout: Duration,
    /// Bytes of STOW-RS parts held in memory at once over all requests (a part is read
    /// whole before it is staged): beyond, a request is answered 503 with Retry-After
    /// (`--dicom-max-inflight-bytes`, a budget of its own beside the DIMSE one).
    pub max_inflight_bytes: u64,
    /// The server speaks HTTPS: RetrieveURLs start `https://`.
    pub https: bool,
    /// SOP classes stored beside the standard storage classes (`--dicom-sop-class`, as
    /// the DIMSE SCP takes them).
    pub extra_sop_classes: Vec<String>,
    /// WADO-RS answers streamed at once, over all clients: each holds up to about 512 KiB
    /// until its client has read it (hyper's write buffer and a chunk read ahead); beyond,
    /// 503 with Retry-After. A bound of their own: charged to the inference budget, one
    /// client's unread retrievals starved every inference (a re-attack's finding).
    pub max_streams: usize,
}

impl Default for DicomWebConfig {
    fn default() -> Self {
        DicomWebConfig {
            max_part_bytes: 1 << 30,
            max_request_bytes: 4 << 30,
            request_timeout: Duration::from_secs(600),
            max_inflight_bytes: 4 << 30,
            https: false,
            extra_sop_classes: Vec::new(),
            max_streams: DEFAULT_MAX_STREAMS,
        }
    }
}

/// [`DicomWebConfig::max_streams`]'s default: 512 answers, 256 MiB held at most.
pub const DEFAULT_MAX_STREAMS: usize = 512;

/// DICOMweb over a spool.
pub struct DicomWeb {
    pub spool: Arc<Spool>,
    pub config: DicomWebConfig,
    /// How instance UIDs appear in the audit records of STOW-RS parts.
    pub audit_uids: crate::audit::dicom::UidAudit,
    /// The STOW-RS bytes in memory, over all requests ([`DicomWebConfig::max_inflight_bytes`]).
    budget: Arc<Budget>,
    /// QIDO-RS searches answered at once ([`MAX_CONCURRENT_SEARCHES`]); others wait their
    /// turn, within their deadline.
    searches: Arc<tokio::sync::Semaphore>,
    /// WADO-RS answers being streamed ([`DicomWebConfig::max_streams`]).
    pub(crate) streams: Arc<tokio::sync::Semaphore>,
    /// The stream places each client holds (at most an eighth of them,
    /// [`super::wado::streams_per_client`]).
    pub(crate) streams_by_client: Arc<super::clients::ClientCounts>,
}

/// QIDO-RS searches built at once. An answer of 10,000 instances is about 10 MB of JSON and
/// several times that while it is built: 60 concurrent searches of a large study took the
/// server from 2.2 to 5.3 GB (a re-attack's finding). With four at a time a search waits for
/// its turn (within the request's deadline) instead.
pub const MAX_CONCURRENT_SEARCHES: usize = 4;

/// How long a QIDO-RS search waits for its turn before it is answered 503 with Retry-After.
pub const SEARCH_WAIT: Duration = Duration::from_secs(5);

impl DicomWeb {
    /// Bytes of STOW-RS parts in memory now, over all requests.
    pub fn inflight_bytes(&self) -> u64 {
        self.budget.used()
    }

    pub fn new(
        spool: Arc<Spool>,
        config: DicomWebConfig,
        audit_uids: crate::audit::dicom::UidAudit,
    ) -> DicomWeb {
        DicomWeb {
            budget: Budget::new(config.max_inflight_bytes),
            searches: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_SEARCHES)),
            streams: Arc::new(tokio::sync::Semaphore::new(config.max_streams.max(1))),
            streams_by_client: super::clients::ClientCounts::new(super::wado::streams_per_client(
                config.max_streams,
            )),
            spool,
            config,
            audit_uids,
        }
    }
}

const DICOM_JSON: &str = "application/dicom+json";
const PLAIN_JSON: &str = "application/json";

/// `response` labelled `media` (one [`accepts_dicom_json`] chose) where it is DICOM JSON.
fn labelled(mut response: Response, media: &'static str) -> Response {
    if media != DICOM_JSON
        && response.headers().get(header::CONTENT_TYPE)
            == Some(&HeaderValue::from_static(DICOM_JSON))
    {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(media));
    }
    response
}

/// STOW-RS parts stored at once (within one part's memory limit together).
const STORE_CONCURRENCY: usize = 4;

/// How long a part waits for room in the STOW-RS memory budget before it is failed with
/// Out of Resources (its request's other parts go on).
const BUDGET_WAIT: Duration = Duration::from_secs(30);

/// Waits (polling, at most [`BUDGET_WAIT`]) until `reservation` can take `bytes` more.
async fn wait_for_budget(reservation: &mut Reservation, bytes: u64) -> bool {
    let until = Instant::now() + BUDGET_WAIT;
    let mut pause = Duration::from_millis(5);
    while Instant::now() < until {
        tokio::time::sleep(pause).await;
        if reservation.grow(bytes) {
            return true;
        }
        pause = (pause * 2).min(Duration::from_millis(200));
    }
    false
}

/// A part failed because the memory budget had no room for it in time.
fn out_of_memory_budget() -> stow::Failure {
    stow::Failure {
        sop_class_uid: None,
        sop_instance_uid: None,
        reason: stow::reason::OUT_OF_RESOURCES,
        kind: "memory_budget",
        detail: "too much STOW-RS data in memory at once (--dicom-max-inflight-bytes); retry later"
            .into(),
    }
}

/// The deadline of a request to `path` when DICOMweb is on and the path is one of its own.
pub(crate) fn deadline_for(state: &AppState, path: &str) -> Option<Duration> {
    if path.starts_with("/dicomweb/") {
        state.dicomweb().map(|d| d.config.request_timeout)
    } else {
        None
    }
}

fn dicomweb(state: &AppState) -> Result<&DicomWeb, AppError> {
    state.dicomweb().ok_or_else(|| {
        AppError::not_found(
            "DICOMweb is off: it runs over the DICOM spool, which --dicom-spool, --dicom-port or --dicom-addr turns on",
        )
    })
}

// ---------------------------------------------------------------------------------------
// STOW-RS

/// `POST /dicomweb/studies`.
pub(crate) async fn stow(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    store(&state, None, caller_id(&caller), &headers, body).await
}

/// `POST /dicomweb/studies/{study}`: every instance must belong to `study`.
pub(crate) async fn stow_study(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    Path(study): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    store(&state, Some(study), caller_id(&caller), &headers, body).await
}

fn caller_id(caller: &Option<Extension<Caller>>) -> &str {
    caller.as_ref().map_or("anonymous", |c| c.0.id.as_str())
}

async fn store(
    state: &AppState,
    study: Option<String>,
    caller: &str,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let response = match store_inner(state, study, caller, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    metrics::counter!(
        "nightingale_dicom_stow_requests_total",
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    metrics::histogram!("nightingale_dicom_stow_request_seconds")
        .record(started.elapsed().as_secs_f64());
    response
}

/// How often (in bytes received) a STOW-RS request being staged looks at the spool's free
/// space again.
const STAGING_SPACE_CHECK: u64 = 16 << 20;

/// 503 with `refusal` unless the spool's file system has `bytes` free above its high-water
/// mark (statvfs on a blocking thread).
async fn ensure_room(
    spool: &Arc<Spool>,
    bytes: u64,
    refusal: &'static str,
) -> Result<(), AppError> {
    let free = {
        let spool = spool.clone();
        tokio::task::spawn_blocking(move || spool.free_bytes())
            .await
            .map_err(|e| AppError::internal(e.to_string()))?
            .map_err(|e| AppError::internal(e.to_string()))?
    };
    if free < spool.min_free_bytes().saturating_add(bytes) {
        metrics::gauge!("nightingale_dicom_spool_free_bytes").set(free as f64);
        return Err(AppError::overloaded(refusal));
    }
    Ok(())
}

async fn store_inner(
    state: &AppState,
    study: Option<String>,
    caller: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    let web = dicomweb(state)?;
    let media = accepts_dicom_json(headers)?;
    // Every part is audited before the response reports it (a stored part whose record cannot
    // be written is reported as failed, 0x0110, like a C-STORE).
    let audit = DicomAuditSink::new(state.audit.clone(), web.audit_uids);
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let limits = &web.config;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let related = multipart::parse_content_type(content_type).map_err(|e| match e {
        MultipartError::NotMultipartRelated(_) | MultipartError::UnsupportedType(_) => {
            AppError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("{e}: send multipart/related; type=\"application/dicom\""),
            )
        }
        other => AppError::bad_request(other.to_string()),
    })?;
    // The body is parsed as sent: a compressed one is refused as such (415, RFC 9110
    // 15.5.16), not as a multipart body with no boundary (a red-team finding).
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let codings = value.to_str().unwrap_or("?");
        if codings
            .split(',')
            .map(str::trim)
            .any(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
        {
            return Err(AppError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "Content-Encoding {:?} is not supported on STOW-RS: send the body uncompressed",
                    codings.chars().take(64).collect::<String>()
                ),
            ));
        }
    }
    let too_large = || {
        AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than the STOW-RS limit of {} bytes (--dicomweb-max-request-bytes)",
                limits.max_request_bytes
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limits.max_request_bytes) {
        return Err(too_large());
    }
    // The body is written aside, then stored: both need room above the high-water mark.
    let spool = web.spool.clone();
    ensure_room(
        &spool,
        declared.unwrap_or(0).saturating_mul(2),
        "the DICOM spool is at its high-water mark (--dicom-spool-min-free-bytes); retry later",
    )
    .await?;

    // Read and stage, part by part.
    let mut parser = Parser::new(
        &related.boundary,
        multipart::Limits {
            max_part_bytes: limits.max_part_bytes,
            ..multipart::Limits::default()
        },
    );
    let malformed = |e: MultipartError| match e {
        MultipartError::PartTooLarge { limit } => AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "a part is larger than the STOW-RS limit of {limit} bytes (--dicomweb-max-part-bytes)"
            ),
        ),
        other => AppError::bad_request(format!("malformed multipart body: {other}")),
    };
    let mut staged: Vec<StagedPart> = vec![];
    let staging = {
        let spool = spool.clone();
        tokio::task::spawn_blocking(move || stow::Staging::new(&spool))
            .await
            .map_err(|e| AppError::internal(e.to_string()))?
            .map_err(|e| staging_error(&e))?
    };
    let mut received = 0u64;
    // Free space is looked at again every STAGING_SPACE_CHECK bytes: a chunked body declares
    // no length, and one checked only at its start staged hundreds of MB past the mark.
    let mut next_space_check = STAGING_SPACE_CHECK;
    // What the parser holds of the part being read (bytes fed, less the parts staged).
    let mut in_parser = Reservation::new(&web.budget);
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| AppError::bad_request(format!("cannot read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received = received.saturating_add(data.len() as u64);
        if received > limits.max_request_bytes {
            return Err(too_large());
        }
        if !in_parser.grow(data.len() as u64) {
            metrics::counter!("nightingale_dicom_stow_busy_total").increment(1);
            return Err(AppError::overloaded(
                "busy: too much STOW-RS data in memory at once (--dicom-max-inflight-bytes); retry later",
            ));
        }
        let parts = parser.feed(&data).map_err(malformed)?;
        for part in parts {
            if staged.len() >= stow::MAX_PARTS {
                return Err(AppError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "more than {} parts in one STOW-RS request: send the study in several",
                        stow::MAX_PARTS
                    ),
                ));
            }
            let staging = staging.clone();
            let part = tokio::task::spawn_blocking(move || staging.stage(part))
                .await
                .map_err(|e| AppError::internal(e.to_string()))?
                .map_err(|e| staging_error(&e))?;
            staged.push(part);
        }
        // The reservation becomes what the parser holds now: the start of the next part at
        // most (complete parts are on disk; a preamble and an epilogue are thrown away as
        // they come, and held a valid request's place in the budget before).
        in_parser.release();
        let _ = in_parser.grow(parser.buffered() as u64);
        if received >= next_space_check {
            next_space_check = received.saturating_add(STAGING_SPACE_CHECK);
            // What is staged is written again when stored: room for it above the mark.
            ensure_room(
                &spool,
                received,
                "the DICOM spool reached its high-water mark while the request was read (--dicom-spool-min-free-bytes); retry later",
            )
            .await?;
        }
    }
    drop(in_parser);
    parser.finish().map_err(malformed)?;
    if staged.is_empty() {
        return Err(AppError::bad_request(
            "the multipart body holds no part: nothing to store",
        ));
    }
    metrics::counter!("nightingale_dicom_stow_received_bytes_total").increment(received);

    // Store, in order. Small parts are stored several at a time (their fsyncs overlap),
    // as long as the parts in memory together stay within one part's limit.
    let mut stored = vec![];
    let mut failed = vec![];
    // Refused parts past the first few are counted, not audited and logged one by one.
    let mut refused_records = 0u64;
    let mut refused_rest: std::collections::BTreeMap<&'static str, u64> = Default::default();
    let mut refused_rest_bytes = 0u64;
    let mut parts = staged.into_iter().peekable();
    /// A part being stored: its task, size, start, budget and SOP Instance UID.
    struct Pending<T, R> {
        task: T,
        len: usize,
        started: Instant,
        reservation: R,
        sop: Option<String>,
    }
    let mut pending = std::collections::VecDeque::new();
    let mut in_memory = 0usize;
    let extra_sop_classes = Arc::new(limits.extra_sop_classes.clone());
    loop {
        while let Some(next) = parts.peek() {
            let len = next.len();
            // Parts of one SOP Instance UID are stored one after the other, in their order:
            // stored at once, whichever finished first was kept and the other refused, so a
            // corrected object sent after its original was kept or not by chance (a
            // red-team finding). The first stays, as for any other version.
            let same_uid_in_flight = next.sop_instance_uid().is_some_and(|uid| {
                pending
                    .iter()
                    .any(|p: &Pending<_, _>| p.sop.as_deref() == Some(uid))
            });
            if !pending.is_empty()
                && (pending.len() >= STORE_CONCURRENCY
                    || (in_memory + len) as u64 > limits.max_part_bytes
                    || same_uid_in_flight)
            {
                break;
            }
            // The part is read back whole: its bytes are charged to the STOW-RS memory
            // budget until it is stored (a red-team finding: only the parser's bytes were,
            // and 16 requests holding back their last delimiter, then sent together, loaded
            // 16 parts at once past any budget). With stores under way, wait for them first;
            // with none, wait for other requests' parts, then give up on this one.
            let mut reservation = Reservation::new(&web.budget);
            let charged = if reservation.grow(len as u64) {
                true
            } else if !pending.is_empty() {
                break;
            } else {
                wait_for_budget(&mut reservation, len as u64).await
            };
            let part = parts.next().expect("peeked");
            let sop = part.sop_instance_uid().map(str::to_owned);
            let spool = spool.clone();
            let study = study.clone();
            let extra = extra_sop_classes.clone();
            in_memory += len;
            let (audit, request_id, caller) =
                (audit.clone(), request_id.clone(), caller.to_owned());
            let task = tokio::task::spawn_blocking(move || {
                if !charged {
                    metrics::counter!("nightingale_dicom_stow_busy_total").increment(1);
                    return Ok((PartOutcome::Failed(out_of_memory_budget()), len, None));
                }
                let part = part.load()?;
                let size = part.body.len();
                let outcome = stow::store_part(&spool, &part, study.as_deref(), &extra);
                // A stored part's record is written here, in the task that stored it: this
                // task runs to its end even when the request is cut short (its deadline, the
                // end of the shutdown grace), which dropped the handler between the store
                // and its record (a review's finding: a 408 left instances unaudited).
                let unrecorded = match &outcome {
                    PartOutcome::Stored(s) => audit
                        .record_stow_blocking(&StowPart {
                            request_id: &request_id,
                            caller: &caller,
                            instance: stored_event(s, size),
                        })
                        .err()
                        .map(|e| e.to_string()),
                    PartOutcome::Failed(_) => None,
                };
                Ok::<_, std::io::Error>((outcome, size, unrecorded))
            });
            pending.push_back(Pending {
                task,
                len,
                started: Instant::now(),
                reservation,
                sop,
            });
        }
        let Some(Pending {
            task,
            len,
            started,
            reservation,
            ..
        }) = pending.pop_front()
        else {
            break;
        };
        let outcome = task.await.map_err(|e| AppError::internal(e.to_string()))?;
        drop(reservation);
        in_memory -= len;
        match outcome {
            Ok((PartOutcome::Stored(s), size, unrecorded)) => {
                if let Some(e) = unrecorded {
                    tracing::error!(error = %e, "STOW-RS: the audit record of a stored part cannot be written; reported as failed");
                    failed.push(stow::Failure {
                        sop_class_uid: Some(s.sop_class_uid.clone()),
                        sop_instance_uid: Some(s.sop_instance_uid.clone()),
                        reason: stow::reason::PROCESSING_FAILURE,
                        kind: "audit",
                        detail: "the audit record cannot be written".into(),
                    });
                    continue;
                }
                metrics::counter!(
                    "nightingale_dicom_stow_instances_stored_total",
                    "duplicate" => if s.duplicate { "true" } else { "false" }
                )
                .increment(1);
                metrics::histogram!("nightingale_dicom_stow_store_seconds")
                    .record(started.elapsed().as_secs_f64());
                tracing::info!(
                    transfer_syntax = %s.transfer_syntax,
                    size,
                    duplicate = s.duplicate,
                    "STOW-RS stored"
                );
                stored.push(s);
            }
            Ok((PartOutcome::Failed(f), size, _)) => {
                metrics::counter!("nightingale_dicom_stow_instances_failed_total", "reason" => f.kind)
                    .increment(1);
                if refused_records < STOW_REFUSED_RECORDS {
                    refused_records += 1;
                    tracing::warn!(reason = f.kind, failure = f.reason, size, detail = %f.detail, "STOW-RS part refused");
                    let record = StowPart {
                        request_id: &request_id,
                        caller,
                        instance: failed_event(&f, size),
                    };
                    if let Err(e) = audit.record_stow(&record).await {
                        tracing::error!(error = %e, "STOW-RS: the audit record of a refused part cannot be written");
                    }
                } else {
                    *refused_rest.entry(f.kind).or_default() += 1;
                    refused_rest_bytes += size as u64;
                }
                failed.push(f);
            }
            Err(e) => {
                metrics::counter!("nightingale_dicom_stow_instances_failed_total", "reason" => "io")
                    .increment(1);
                tracing::error!(error = %e, "STOW-RS: cannot read a staged part back");
                failed.push(stow::Failure {
                    sop_class_uid: None,
                    sop_instance_uid: None,
                    reason: stow::reason::PROCESSING_FAILURE,
                    kind: "io",
                    detail: "cannot read the staged part back".into(),
                });
            }
        }
    }
    if !refused_rest.is_empty() {
        let count: u64 = refused_rest.values().sum();
        tracing::warn!(count, size = refused_rest_bytes, reasons = ?refused_rest, "STOW-RS: more parts refused (counted in one audit record)");
        let record =
            audit.stow_refused_summary(&request_id, caller, refused_rest_bytes, &refused_rest);
        if let Err(e) = state.audit.record_or_hold(record).await {
            tracing::error!(error = %e, "STOW-RS: the audit record of refused parts cannot be written");
        }
    }
    if let Ok(free) = spool.free_bytes() {
        metrics::gauge!("nightingale_dicom_spool_free_bytes").set(free as f64);
    }
    let status = match (stored.is_empty(), failed.is_empty()) {
        (false, true) => StatusCode::OK,
        (false, false) => StatusCode::ACCEPTED,
        (true, _) => StatusCode::CONFLICT,
    };
    let mut response = Map::new();
    if !failed.is_empty() {
        let items: Vec<Value> = failed
            .iter()
            .map(|f| {
                let mut item = Map::new();
                if let Some(c) = &f.sop_class_uid {
                    item.insert("00081150".into(), ui(c));
                }
                if let Some(i) = &f.sop_instance_uid {
                    item.insert("00081155".into(), ui(i));
                }
                item.insert("00081197".into(), json!({"vr": "US", "Value": [f.reason]}));
                Value::Object(item)
            })
            .collect();
        response.insert("00081198".into(), json!({"vr": "SQ", "Value": items}));
    }
    if !stored.is_empty() {
        let base = retrieve_base(headers, limits.https);
        let items: Vec<Value> = stored
            .iter()
            .map(|s| {
                let mut item = Map::new();
                item.insert("00081150".into(), ui(&s.sop_class_uid));
                item.insert("00081155".into(), ui(&s.sop_instance_uid));
                if let Some(url) = instance_url(
                    base.as_deref(),
                    &s.study_uid,
                    &s.series_uid,
                    &s.sop_instance_uid,
                ) {
                    item.insert("00081190".into(), url);
                }
                Value::Object(item)
            })
            .collect();
        response.insert("00081199".into(), json!({"vr": "SQ", "Value": items}));
        // The study's URL, when everything stored belongs to one study.
        if stored.iter().all(|s| s.study_uid == stored[0].study_uid)
            && let Some(url) = study_url(base.as_deref(), &stored[0].study_uid)
        {
            response.insert("00081190".into(), url);
        }
    }
    Ok(labelled(
        dicom_json(status, Value::Object(response), None),
        media,
    ))
}

/// The audit view of a stored part.
fn stored_event(s: &nightingale_dicom::Stored, size: usize) -> InstanceEvent {
    InstanceEvent {
        association: 0,
        peer: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        calling_ae: stow::STOW_SENDER.into(),
        sop_class_uid: s.sop_class_uid.clone(),
        sop_instance_uid: s.sop_instance_uid.clone(),
        study_uid: Some(s.study_uid.clone()),
        series_uid: Some(s.series_uid.clone()),
        transfer_syntax: s.transfer_syntax.clone(),
        size: size as u64,
        status: 0,
        sha256: Some(s.sha256.clone()),
        duplicate: s.duplicate,
        reason: None,
    }
}

/// The audit view of a refused part (status: its PS3.18 failure reason).
fn failed_event(f: &stow::Failure, size: usize) -> InstanceEvent {
    InstanceEvent {
        association: 0,
        peer: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        calling_ae: stow::STOW_SENDER.into(),
        sop_class_uid: f.sop_class_uid.clone().unwrap_or_default(),
        sop_instance_uid: f.sop_instance_uid.clone().unwrap_or_default(),
        study_uid: None,
        series_uid: None,
        transfer_syntax: String::new(),
        size: size as u64,
        status: f.reason,
        sha256: None,
        duplicate: false,
        reason: Some(f.kind),
    }
}

// ---------------------------------------------------------------------------------------
// QIDO-RS

type Params = Query<Vec<(String, String)>>;

/// `GET /dicomweb/studies`.
pub(crate) async fn search_studies(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    search(&state, caller, &headers, Level::Studies, None, None, params).await
}

/// `GET /dicomweb/studies/{study}/series`.
pub(crate) async fn search_study_series(
    State(state): State<Arc<AppState>>,
    Path(study): Path<String>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    search(
        &state,
        caller,
        &headers,
        Level::Series,
        Some(study),
        None,
        params,
    )
    .await
}

/// `GET /dicomweb/studies/{study}/instances`.
pub(crate) async fn search_study_instances(
    State(state): State<Arc<AppState>>,
    Path(study): Path<String>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    search(
        &state,
        caller,
        &headers,
        Level::Instances,
        Some(study),
        None,
        params,
    )
    .await
}

/// `GET /dicomweb/studies/{study}/series/{series}/instances`.
pub(crate) async fn search_series_instances(
    State(state): State<Arc<AppState>>,
    Path((study, series)): Path<(String, String)>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    search(
        &state,
        caller,
        &headers,
        Level::Instances,
        Some(study),
        Some(series),
        params,
    )
    .await
}

/// `GET /dicomweb/series`.
pub(crate) async fn search_series(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    search(&state, caller, &headers, Level::Series, None, None, params).await
}

/// `GET /dicomweb/instances`.
pub(crate) async fn search_instances(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    search(
        &state,
        caller,
        &headers,
        Level::Instances,
        None,
        None,
        params,
    )
    .await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Studies,
    Series,
    Instances,
}

/// The query of `params` (keyword or tag), with the attributes it cannot match on.
fn query_of(
    level: Level,
    params: Vec<(String, String)>,
) -> Result<(qido::Query, Vec<String>), AppError> {
    let mut q = qido::Query::default();
    let mut ignored = vec![];
    let list = |key: &str, v: &str| -> Result<Vec<String>, AppError> {
        Ok(key_values(key, v)?.into_iter().map(str::to_owned).collect())
    };
    for (key, value) in params {
        // A tag is 8HEXDIG, which ABNF matches without regard to case: `0020000d` names
        // Study Instance UID as `0020000D` does (a red-team finding: it was ignored, and the
        // query listed every study).
        let key = if key.len() == 8 && key.bytes().all(|b| b.is_ascii_hexdigit()) {
            key.to_ascii_uppercase()
        } else {
            key
        };
        match (key.as_str(), level) {
            ("StudyInstanceUID" | "0020000D", _) => q.study_uids.extend(list(&key, &value)?),
            ("SeriesInstanceUID" | "0020000E", Level::Series | Level::Instances) => {
                q.series_uids.extend(list(&key, &value)?)
            }
            ("SOPInstanceUID" | "00080018", Level::Instances) => {
                q.sop_instance_uids.extend(list(&key, &value)?)
            }
            ("SOPClassUID" | "00080016", Level::Instances) => {
                q.sop_class_uids.extend(list(&key, &value)?)
            }
            ("Modality" | "00080060", Level::Series | Level::Instances) => {
                q.modalities.extend(codes(&key, &value)?)
            }
            ("ModalitiesInStudy" | "00080061", _) => {
                q.modalities_in_study.extend(codes(&key, &value)?)
            }
            // A zero-length value matches every study (universal matching, PS3.4
            // C.2.2.2.3), as an empty UID or Modality key does.
            ("StudyDate" | "00080020", _) if value.trim().is_empty() => {}
            ("StudyDate" | "00080020", _) => {
                if q.study_date.is_some() {
                    return Err(AppError::bad_request(format!(
                        "{key} is given twice: give one date or range"
                    )));
                }
                q.study_date = Some(date_range(&key, &value)?);
            }
            ("SeriesNumber" | "00200011", Level::Series | Level::Instances) => {
                q.series_numbers.extend(numbers(&key, &value)?)
            }
            ("InstanceNumber" | "00200013", Level::Instances) => {
                q.instance_numbers.extend(numbers(&key, &value)?)
            }
            ("limit", _) => {
                // Any count: one over the server's maximum gets the maximum and a warning
                // (PS3.18 8.3.4; one over u32 was a 400: a red-team finding).
                let asked: u64 = value.parse().map_err(|_| {
                    AppError::bad_request(format!("limit={value:?} is not a count"))
                })?;
                q.limit = Some(u32::try_from(asked).unwrap_or(u32::MAX))
            }
            ("offset", _) => {
                q.offset = value.parse().map_err(|_| {
                    AppError::bad_request(format!("offset={value:?} is not a count"))
                })?
            }
            ("includefield" | "fuzzymatching", _) => {}
            _ => ignored.push(key),
        }
    }
    // Over all occurrences of a key (`Modality=CT&Modality=MR&...`), not each alone.
    if let Some(key) = q.too_many_values() {
        return Err(AppError::bad_request(format!(
            "{key}: more than {MAX_KEY_VALUES} values (over all its occurrences)"
        )));
    }
    Ok((q, ignored))
}

/// The ignored keys as a QIDO-RS Warning names them: each once, as sent (a byte other than
/// a letter, digit, `.`, `-` or `_` percent-encoded, so `StudyInstanceUID%00` is not shown as
/// the supported `StudyInstanceUID`), at most [`SHOWN_KEYS`] of at most 64 bytes each, then
/// how many more. A key repeated 4,000 times made a 52 KB header, which proxies refuse
/// (nginx's default buffer is 4-8 KB): a review's finding.
fn ignored_keys_shown(ignored: &[String]) -> String {
    let mut shown: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for key in ignored {
        let mut name = String::new();
        for b in key.bytes() {
            if name.len() >= 64 {
                name.push_str("...");
                break;
            }
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_') {
                name.push(char::from(b));
            } else {
                name.push_str(&format!("%{b:02X}"));
            }
        }
        if name.is_empty() {
            name = "(empty key)".to_owned();
        }
        if !seen.insert(name.clone()) {
            continue;
        }
        if shown.len() < SHOWN_KEYS {
            shown.push(name);
        }
    }
    let more = seen.len() - shown.len();
    let mut text = shown.join(", ");
    if more > 0 {
        text.push_str(&format!(" and {more} more"));
    }
    text
}

/// Most ignored keys a QIDO-RS Warning names.
const SHOWN_KEYS: usize = 16;

/// The answer when a STOW-RS part cannot be written aside.
fn staging_error(e: &std::io::Error) -> AppError {
    if e.kind() == std::io::ErrorKind::StorageFull {
        AppError::overloaded("the DICOM spool's file system is full; retry later")
    } else {
        AppError::internal(format!("cannot stage a STOW-RS part: {e}"))
    }
}

/// Values of a query key, at most this many, in one occurrence and over all of them (a
/// list longer than any real query is refused).
const MAX_KEY_VALUES: usize = qido::MAX_VALUES;

/// The values of a CS key (`Modality=CT,MR`, wildcards `*` and `?`).
fn codes(key: &str, value: &str) -> Result<Vec<String>, AppError> {
    let values = key_values(key, value)?;
    if let Some(bad) = values.iter().find(|v| !qido::is_code_pattern(v)) {
        return Err(AppError::bad_request(format!(
            "{}={:?} is not a code string (upper-case letters, digits, _ and the wildcards * ?)",
            printable(key),
            printable(bad)
        )));
    }
    Ok(values.into_iter().map(str::to_owned).collect())
}

/// The values of a key (`Key=a,b` or `Key=a\b`), at most [`MAX_KEY_VALUES`].
fn key_values<'v>(key: &str, value: &'v str) -> Result<Vec<&'v str>, AppError> {
    let values: Vec<&str> = value
        .split([',', '\\'])
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    if values.len() > MAX_KEY_VALUES {
        return Err(AppError::bad_request(format!(
            "{}: more than {MAX_KEY_VALUES} values",
            printable(key)
        )));
    }
    Ok(values)
}

/// A DA key: `YYYYMMDD`, `YYYYMMDD-YYYYMMDD`, `-YYYYMMDD` or `YYYYMMDD-` (PS3.4 C.2.2.2.5).
fn date_range(key: &str, value: &str) -> Result<(Option<String>, Option<String>), AppError> {
    let bad = || {
        AppError::bad_request(format!(
            "{}={:?} is not a date (YYYYMMDD) or a date range (YYYYMMDD-YYYYMMDD, -YYYYMMDD, YYYYMMDD-)",
            printable(key),
            printable(value)
        ))
    };
    let end = |d: &str| -> Result<Option<String>, AppError> {
        if d.is_empty() {
            Ok(None)
        } else if nightingale_dicom::attributes::valid_date(d) {
            Ok(Some(d.to_owned()))
        } else {
            Err(bad())
        }
    };
    let value = value.trim();
    let range = match value.split_once('-') {
        Some((from, to)) => (end(from)?, end(to)?),
        None => {
            let day = end(value)?;
            (day.clone(), day)
        }
    };
    match &range {
        (None, None) => Err(bad()),
        (Some(from), Some(to)) if from > to => Err(AppError::bad_request(format!(
            "{}={:?}: the range ends before it starts",
            printable(key),
            printable(value)
        ))),
        _ => Ok(range),
    }
}

/// The values of an IS key (`SeriesNumber=1,2`).
fn numbers(key: &str, value: &str) -> Result<Vec<i64>, AppError> {
    key_values(key, value)?
        .iter()
        .map(|v| {
            v.parse::<i64>()
                .ok()
                .filter(|_| v.len() <= 12)
                .ok_or_else(|| {
                    AppError::bad_request(format!(
                        "{}={:?} is not an integer",
                        printable(key),
                        printable(v)
                    ))
                })
        })
        .collect()
}

/// PS3.18 8.3.4: the server returned its maximum where the client asked for no limit or a
/// larger one, so more results may exist (a Warning says so).
fn results_cut(limit: Option<u32>, returned: usize) -> bool {
    let max = nightingale_dicom::qido::MAX_LIMIT;
    returned == max as usize && limit.is_none_or(|l| l > max)
}

/// QIDO-RS and STOW-RS answer `application/dicom+json` only (PS3.18 8.3.3): a request whose
/// `Accept` allows none of it is 406, not answered in a type it did not ask for.
fn accepts_dicom_json(headers: &HeaderMap) -> Result<&'static str, AppError> {
    let Some(accept) = headers.get(header::ACCEPT) else {
        return Ok(DICOM_JSON);
    };
    let accept = accept.to_str().unwrap_or("");
    if accept.trim().is_empty() {
        // Says nothing: as if absent.
        return Ok(DICOM_JSON);
    }
    // Each range with its q-value (1 when absent; unreadable is 0).
    let ranges: Vec<(String, f32)> = accept
        .split(',')
        .map(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
            (media, q)
        })
        .collect();
    // RFC 9110 12.5.1: a type's q-value is that of the most specific range matching it, so
    // `application/dicom+json;q=0, */*` refuses it (a red-team finding: it was answered).
    let q_of = |media: &str| {
        [media, "application/*", "*/*"].iter().find_map(|m| {
            ranges
                .iter()
                .filter(|(r, _)| r == m)
                .map(|(_, q)| *q)
                .reduce(f32::min)
        })
    };
    // Plain JSON asked for by name is answered too (its body is JSON); a wildcard does not
    // stand for it where the client refused application/dicom+json.
    let plain_json = ranges
        .iter()
        .any(|(r, q)| r == "application/json" && *q > 0.0);
    if accept.len() <= 4096 && q_of("application/dicom+json").is_some_and(|q| q > 0.0) {
        Ok(DICOM_JSON)
    } else if accept.len() <= 4096 && plain_json {
        // Refused by name or not asked, plain JSON asked: the same body under that type (a
        // re-attack's finding: it was labelled application/dicom+json all the same).
        Ok(PLAIN_JSON)
    } else {
        Err(AppError::new(
            StatusCode::NOT_ACCEPTABLE,
            "this server answers QIDO-RS and STOW-RS in application/dicom+json only",
        ))
    }
}

/// `s` cut to 64 printable ASCII characters, for an error message.
fn printable(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(64)
        .collect()
}

async fn search(
    state: &AppState,
    caller: Option<Extension<Caller>>,
    headers: &HeaderMap,
    level: Level,
    study: Option<String>,
    series: Option<String>,
    params: Vec<(String, String)>,
) -> Response {
    let media = match accepts_dicom_json(headers) {
        Ok(media) => media,
        Err(e) => return e.into_response(),
    };
    // What the access record names: the path's UIDs and the query's keys (never values).
    let path_uids: Vec<(&'static str, String)> = [("study", &study), ("series", &series)]
        .into_iter()
        .filter_map(|(name, uid)| uid.clone().map(|u| (name, u)))
        .collect();
    let mut keys: Vec<String> = params
        .iter()
        .map(|(k, _)| {
            k.chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .take(64)
                .collect()
        })
        .filter(|k: &String| !k.is_empty())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys.truncate(32);
    let result = async {
        let web = dicomweb(state)?;
        // PS3.18 8.3.4.1: an origin server without fuzzy matching says that only literal
        // matching was done.
        let fuzzy = params
            .iter()
            .any(|(k, v)| k == "fuzzymatching" && v.eq_ignore_ascii_case("true"));
        // Only the attributes returned by default are returned: a client asking for more
        // is told (it could not tell "empty" from "not returned": a review's finding).
        let include = params
            .iter()
            .any(|(k, v)| k == "includefield" && !v.trim().is_empty());
        let (mut q, ignored) = query_of(level, params)?;
        let limit = q.limit;
        // A path key narrows the query: a query key for the same attribute must agree.
        if let Some(study) = study {
            narrow(&mut q.study_uids, study);
        }
        if let Some(series) = series {
            narrow(&mut q.series_uids, series);
        }
        let spool = web.spool.clone();
        let base = retrieve_base(headers, web.config.https);
        // Held until the answer is written out below (the JSON is the memory). A search waits
        // at most SEARCH_WAIT for its turn, then is answered 503: searches whose clients had
        // left (HTTP/1.1 does not say) queued without end and a one-row search waited 46 s
        // behind them (a re-attack's finding).
        let _turn = match tokio::time::timeout(
            SEARCH_WAIT,
            web.searches.clone().acquire_owned(),
        )
        .await
        {
            Ok(turn) => turn.map_err(|e| AppError::internal(e.to_string()))?,
            Err(_) => {
                let mut busy = AppError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "{MAX_CONCURRENT_SEARCHES} QIDO-RS searches are being answered; try again"
                    ),
                );
                busy.retry_after = Some(1);
                return Err(busy);
            }
        };
        // The turn goes with the blocking task, which a client that leaves cannot stop: an
        // HTTP/2 client resetting its streams got the turn back at once while the searches
        // went on building, hundreds at a time (a re-attack's finding).
        let body = tokio::task::spawn_blocking(move || -> Result<Value, nightingale_dicom::StoreError> {
            let _turn = _turn;
            let base = base.as_deref();
            Ok(match level {
                Level::Studies => spool
                    .query_studies(&q)?
                    .iter()
                    .map(|r| study_json(r, base))
                    .collect(),
                Level::Series => spool
                    .query_series(&q)?
                    .iter()
                    .map(|r| series_json(r, base))
                    .collect(),
                Level::Instances => spool
                    .query_instances(&q)?
                    .iter()
                    .map(|r| instance_json(r, base))
                    .collect(),
            })
        })
        .await
        .map_err(|e| AppError::internal(e.to_string()))?
        .map_err(|e| AppError::internal(e.to_string()))?;
        let mut warnings = Vec::new();
        if !ignored.is_empty() {
            warnings.push(format!(
                "299 nightingale \"The following attributes are not supported for matching at this level and were ignored: {}\"",
                ignored_keys_shown(&ignored)
            ));
        }
        if fuzzy {
            warnings.push(
                "299 nightingale \"The fuzzymatching parameter is not supported. Only literal matching has been performed.\""
                    .to_owned(),
            );
        }
        if include {
            warnings.push(
                "299 nightingale \"The includefield parameter is not supported. Only the attributes returned by default are included.\""
                    .to_owned(),
            );
        }
        if results_cut(limit, body.as_array().map_or(0, Vec::len)) {
            warnings.push(
                "299 nightingale \"The number of results exceeded the maximum supported by the server. Additional results can be requested.\""
                    .to_owned(),
            );
        }
        let warning = (!warnings.is_empty()).then(|| warnings.join(", "));
        let matches = body.as_array().map_or(0, Vec::len);
        let level_name = match level {
            Level::Studies => "studies",
            Level::Series => "series",
            Level::Instances => "instances",
        };
        let uids: Vec<(&str, &str)> = path_uids.iter().map(|(n, u)| (*n, u.as_str())).collect();
        super::wado::audit_read(
            state,
            caller.as_ref().map(|c| &c.0),
            headers,
            "search",
            level_name,
            &uids,
            &[("matches", matches.to_string()), ("keys", keys.join(","))],
        )
        .await?;
        Ok::<_, AppError>(dicom_json(StatusCode::OK, body, warning))
    }
    .await;
    labelled(result.unwrap_or_else(|e| e.into_response()), media)
}

/// `values` AND `key`: only `key` when the query did not name it, nothing matches when the
/// query named other values.
fn narrow(values: &mut Vec<String>, key: String) {
    if values.is_empty() || values.contains(&key) {
        *values = vec![key];
    } else {
        // No UID is empty: this matches nothing.
        *values = vec![String::new()];
    }
}

fn ui(v: &str) -> Value {
    json!({"vr": "UI", "Value": [v]})
}

fn is(n: u64) -> Value {
    json!({"vr": "IS", "Value": [n]})
}

/// `{"vr": vr, "Value": values}`, or the attribute without a value when there is none (a
/// QIDO-RS response lists its return keys either way).
fn attribute<T: serde::Serialize>(vr: &str, values: &[T]) -> Value {
    if values.is_empty() {
        json!({ "vr": vr })
    } else {
        json!({"vr": vr, "Value": values})
    }
}

fn text(vr: &str, v: Option<&str>) -> Value {
    attribute(vr, v.as_slice())
}

fn number(vr: &str, v: Option<i64>) -> Value {
    attribute(vr, v.as_slice())
}

/// The base of this server's DICOMweb URLs as the client addressed it
/// (`http(s)://<Host>/dicomweb`), for RetrieveURL (0008,1190): `None` when the request has no
/// Host header that is a plain host name and port (an HTTP/2 request's `:authority` is its
/// Host: `super::host_from_authority`).
fn retrieve_base(headers: &HeaderMap, https: bool) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    super::is_plain_host(host)
        .then(|| format!("{}://{host}/dicomweb", if https { "https" } else { "http" }))
}

/// A UID that can stand in a URL path as it is (what a retrieve accepts). Stored values that
/// are not get no RetrieveURL rather than an escaped one.
fn url_safe(uid: &str) -> bool {
    nightingale_dicom::sop::is_url_safe_uid(uid)
}

fn ur(url: String) -> Value {
    json!({"vr": "UR", "Value": [url]})
}

fn study_url(base: Option<&str>, study: &str) -> Option<Value> {
    let base = base?;
    url_safe(study).then(|| ur(format!("{base}/studies/{study}")))
}

fn series_url(base: Option<&str>, study: &str, series: &str) -> Option<Value> {
    let base = base?;
    (url_safe(study) && url_safe(series))
        .then(|| ur(format!("{base}/studies/{study}/series/{series}")))
}

fn instance_url(base: Option<&str>, study: &str, series: &str, sop: &str) -> Option<Value> {
    let base = base?;
    (url_safe(study) && url_safe(series) && url_safe(sop)).then(|| {
        ur(format!(
            "{base}/studies/{study}/series/{series}/instances/{sop}"
        ))
    })
}

/// `object` with RetrieveURL (0008,1190) set to `url`, where there is one.
fn with_url(mut object: Value, url: Option<Value>) -> Value {
    if let (Some(url), Some(map)) = (url, object.as_object_mut()) {
        map.insert("00081190".into(), url);
    }
    object
}

/// Instance Availability (0008,0056), returned by default at every level (PS3.18 tables
/// 10.6.3-3 to -5): what the spool lists, it holds.
static ONLINE: std::sync::LazyLock<Value> =
    std::sync::LazyLock::new(|| json!({"vr": "CS", "Value": ["ONLINE"]}));

fn study_json(r: &qido::StudyRow, base: Option<&str>) -> Value {
    let modalities = attribute("CS", &r.modalities);
    let object = json!({
        "00080020": text("DA", r.study_date.as_deref()),
        "00080030": text("TM", r.study_time.as_deref()),
        "00080061": modalities,
        "0020000D": ui(&r.study_uid),
        "00201206": is(r.series),
        "00201208": is(r.instances),
        "00080056": ONLINE.clone(),
    });
    with_url(object, study_url(base, &r.study_uid))
}

fn series_json(r: &qido::SeriesRow, base: Option<&str>) -> Value {
    let object = json!({
        "00080020": text("DA", r.study_date.as_deref()),
        "00080030": text("TM", r.study_time.as_deref()),
        "00080060": text("CS", r.modality.as_deref()),
        "0020000D": ui(&r.study_uid),
        "0020000E": ui(&r.series_uid),
        "00200011": number("IS", r.series_number),
        "00201209": is(r.instances),
        "00080056": ONLINE.clone(),
    });
    with_url(object, series_url(base, &r.study_uid, &r.series_uid))
}

fn instance_json(r: &qido::InstanceRow, base: Option<&str>) -> Value {
    let a = &r.attributes;
    let object = json!({
        "00080016": ui(&r.sop_class_uid),
        "00080018": ui(&r.sop_instance_uid),
        "00080020": text("DA", a.study_date.as_deref()),
        "00080030": text("TM", a.study_time.as_deref()),
        "00080060": text("CS", a.modality.as_deref()),
        "0020000D": ui(&r.study_uid),
        "0020000E": ui(&r.series_uid),
        "00200011": number("IS", a.series_number),
        "00200013": number("IS", a.instance_number),
        "00280008": number("IS", a.number_of_frames.map(i64::from)),
        "00280010": number("US", a.rows.map(i64::from)),
        "00280011": number("US", a.columns.map(i64::from)),
        "00083002": ui(&r.transfer_syntax),
        "00080056": ONLINE.clone(),
    });
    with_url(
        object,
        instance_url(base, &r.study_uid, &r.series_uid, &r.sop_instance_uid),
    )
}

fn dicom_json(status: StatusCode, body: Value, warning: Option<String>) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(DICOM_JSON));
    if let Some(w) = warning.and_then(|w| HeaderValue::from_str(&w).ok()) {
        response.headers_mut().insert(header::WARNING, w);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Red-team finding: `Modality=C%3F` repeated 1,000 times (each occurrence under the
    /// per-occurrence cap) made one SQL expression too deep for SQLite: 500, logged at
    /// ERROR. UID lists had no cap at all. The cap counts every occurrence: 400.
    #[test]
    fn values_are_capped_over_every_occurrence_of_a_key() {
        let repeat = |key: &str, value: &str, n: usize| -> Vec<(String, String)> {
            vec![(key.to_owned(), value.to_owned()); n]
        };
        for (level, key, value) in [
            (Level::Series, "Modality", "C?"),
            (Level::Studies, "ModalitiesInStudy", "CT"),
            (Level::Studies, "StudyInstanceUID", "1.2.3"),
            (Level::Series, "0020000E", "1.2.3.4"),
            (Level::Instances, "SOPInstanceUID", "1.2.3.4.5"),
            (Level::Instances, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.2"),
            (Level::Series, "SeriesNumber", "7"),
            (Level::Instances, "InstanceNumber", "7"),
        ] {
            let ok = query_of(level, repeat(key, value, MAX_KEY_VALUES));
            assert!(ok.is_ok(), "{key}: {MAX_KEY_VALUES} values are allowed");
            for params in [
                repeat(key, value, 1000),
                repeat(key, value, MAX_KEY_VALUES + 1),
                // One occurrence with many values, then more occurrences.
                [
                    repeat(key, &vec![value; 200].join(","), 1),
                    repeat(key, value, 57),
                ]
                .concat(),
            ] {
                let err = query_of(level, params).expect_err(key);
                assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST, "{key}");
                assert!(
                    err.message.contains("more than 256 values"),
                    "{}",
                    err.message
                );
            }
        }
        // A single UID occurrence over the cap is refused too.
        let many = vec!["1.2.3"; 300].join("\\");
        let err = query_of(Level::Studies, vec![("StudyInstanceUID".into(), many)]).unwrap_err();
        assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn a_warning_says_results_were_cut_only_when_the_maximum_came_back_short_of_the_ask() {
        let max = nightingale_dicom::qido::MAX_LIMIT;
        assert!(results_cut(None, max as usize));
        assert!(results_cut(Some(max + 1), max as usize));
        // Asked for exactly the maximum, or fewer results than it: nothing was cut.
        assert!(!results_cut(Some(max), max as usize));
        assert!(!results_cut(Some(20_000), 4));
        assert!(!results_cut(None, 4));
    }
}
