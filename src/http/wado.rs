//! WADO-RS retrieve of a study, a series or one instance:
//! `GET /dicomweb/studies/{study}`, `GET /dicomweb/studies/{study}/series/{series}`,
//! `GET /dicomweb/studies/{study}/series/{series}/instances/{sop}` (roles `pacs`, `admin`,
//! `researcher`, like QIDO-RS).
//!
//! Instances are looked up in the DICOM spool (what PACS sent) and among the DICOM pipeline's
//! result objects (the SR and SC it made), and answered as PS3.18 asks:
//! `multipart/related; type="application/dicom"`, one part per instance, each the Part 10 file
//! as stored (no transcoding: a request for another transfer syntax gets 406). Files are
//! streamed from disk in 64 KiB chunks, one open at a time, never read whole into memory; an
//! instance purged between the lookup and its turn in the stream is left out.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::io::AsyncReadExt;

use super::auth::Caller;
use super::clients::ClientAddr;
use super::{AppError, AppState};
use crate::pipeline::uid_tag;

/// Chunk size of the streamed file.
const CHUNK: usize = 64 * 1024;

/// The place a streamed retrieval holds among the answers being sent
/// ([`super::dicomweb::DicomWebConfig::max_streams`]) until its body is done or its client
/// gone: each holds up to about 512 KiB (hyper's write buffer, a chunk read ahead), which a
/// client that asks and never reads kept without bound (a review: 2,000 such retrievals took
/// the server from 135 MB to 1.07 GB). 503 with Retry-After when every place is taken.
///
/// One client (an IPv4 address, an IPv6 /64) holds at most an eighth of the places
/// ([`streams_per_client`]): a place is held for as long as the client keeps reading, and
/// two retrievals read at 20 KB/s held the only two places for hours, every other client
/// answered 503 (a review's finding).
fn stream_slot(
    state: &AppState,
    client: Option<&Extension<ClientAddr>>,
) -> Result<Option<StreamSlot>, AppError> {
    let Some(web) = state.dicomweb() else {
        return Ok(None);
    };
    let mine = match client {
        Some(Extension(ClientAddr(ip))) => match web.streams_by_client.admit(*ip) {
            Some(slot) => Some(slot),
            None => {
                return Err(AppError::overloaded(format!(
                    "this client is being sent {} WADO-RS answers, its share of --dicomweb-max-streams: retry later",
                    web.streams_by_client.max()
                )));
            }
        },
        None => None,
    };
    let place = web.streams.clone().try_acquire_owned().map_err(|_| {
        AppError::overloaded(format!(
            "{} WADO-RS answers are being sent (each holds memory until its client has read it): retry later",
            web.config.max_streams
        ))
    })?;
    Ok(Some((place, mine)))
}

/// A stream place, and its client's share of them.
type StreamSlot = (
    tokio::sync::OwnedSemaphorePermit,
    Option<super::clients::ClientSlot>,
);

/// The stream places one client may hold: an eighth of `--dicomweb-max-streams`, at least 1.
pub(crate) fn streams_per_client(max_streams: usize) -> usize {
    (max_streams / 8).max(1)
}

/// `stream`, holding `held` until it is dropped (its last chunk sent, or its client gone).
fn holding<S: futures_util::Stream + Send, T: Send + 'static>(
    stream: S,
    held: T,
) -> impl futures_util::Stream<Item = S::Item> + Send {
    use futures_util::StreamExt as _;
    stream.map(move |item| {
        let _held = &held;
        item
    })
}

/// A UID a retrieve may name: what the spool keeps and a URL path holds as it is (a stored
/// UID with letters included, as senders write them).
fn valid_uid(uid: &str) -> bool {
    nightingale_dicom::sop::is_url_safe_uid(uid)
}

/// What the `Accept` header allows: `Ok(None)` for anything, `Ok(Some(ts))` for one
/// transfer syntax, `Err` when no `application/dicom` answer is acceptable.
fn accepted_syntaxes(headers: &HeaderMap) -> Result<Vec<Option<String>>, String> {
    let Some(accept) = headers.get(header::ACCEPT) else {
        return Ok(vec![None]);
    };
    let accept = accept
        .to_str()
        .map_err(|_| "the Accept header is not ASCII".to_owned())?;
    if accept.len() > 4096 {
        return Err("the Accept header is longer than 4096 bytes".into());
    }
    // (quality, syntax) in the header's order; sorted by quality below (stable: equal
    // qualities keep the client's order), RFC 9110 12.4.2.
    let mut out: Vec<(f32, Option<String>)> = Vec::new();
    for range in accept.split(',') {
        let mut params = range.split(';').map(str::trim);
        let media = params.next().unwrap_or("").to_ascii_lowercase();
        let mut kind: Option<String> = None;
        let mut syntax: Option<String> = None;
        let mut quality = 1.0f32;
        for p in params {
            let Some((k, v)) = p.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            match k.trim().to_ascii_lowercase().as_str() {
                "type" => kind = Some(v.to_ascii_lowercase()),
                "transfer-syntax" => syntax = Some(v.to_owned()),
                "q" => {
                    quality = v
                        .parse::<f32>()
                        .ok()
                        .filter(|q| q.is_finite())
                        .unwrap_or(0.0)
                }
                _ => {}
            }
        }
        if quality <= 0.0 {
            continue;
        }
        let wants_dicom = match media.as_str() {
            "*/*" | "multipart/*" => kind.as_deref().is_none_or(|k| k == "application/dicom"),
            "multipart/related" => kind.as_deref().is_none_or(|k| k == "application/dicom"),
            _ => false,
        };
        if wants_dicom {
            out.push((quality, syntax.filter(|s| s != "*")));
        }
    }
    out.sort_by(|a, b| b.0.total_cmp(&a.0));
    let out: Vec<Option<String>> = out.into_iter().map(|(_, syntax)| syntax).collect();
    if out.is_empty() {
        Err(format!(
            "cannot answer {accept:?}: an instance is sent as multipart/related; type=\"application/dicom\""
        ))
    } else {
        Ok(out)
    }
}

/// Where an instance's file is, and its transfer syntax.
struct Found {
    path: PathBuf,
    transfer_syntax: String,
    size: u64,
    source: &'static str,
    /// Stored in Implicit VR Little Endian and sent re-encoded in Explicit VR Little
    /// Endian ([`serve_as`]).
    transcode: bool,
    /// The client takes the syntax the instance is stored in too: where re-encoding fails
    /// (a data set not well formed), the instance is sent as stored.
    as_stored_taken: bool,
}

use nightingale_dicom::reencode::{EXPLICIT_VR_LE, IMPLICIT_VR_LE};

/// The largest Implicit VR file re-encoded for DICOMweb (it is held in memory, twice,
/// while it is): a larger one is sent as stored where the client takes any syntax.
const MAX_TRANSCODE_BYTES: u64 = 256 << 20;

/// Re-encodings under way at once (each holds its file twice in memory).
static TRANSCODES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// The transfer syntax an instance stored as `stored` (of `size` bytes) is sent in, and
/// whether it is re-encoded, for what the client accepts (`wanted`, in its order):
/// `None` where nothing it accepts can be sent. Implicit VR Little Endian is not used on
/// the web (PS3.18 8.7.3.5.2): where the client names no syntax (or `*`), such an instance
/// is re-encoded in Explicit VR Little Endian, as it is when Explicit is asked for; it is
/// sent as stored only when the client asks for Implicit by name. Other syntaxes are sent as
/// stored (no other transcoding).
fn serve_as(stored: &str, size: u64, wanted: &[Option<String>]) -> Option<(String, bool)> {
    let can_transcode = stored == IMPLICIT_VR_LE && size <= MAX_TRANSCODE_BYTES;
    wanted.iter().find_map(|w| match w.as_deref() {
        None if can_transcode => Some((EXPLICIT_VR_LE.to_owned(), true)),
        None => Some((stored.to_owned(), false)),
        Some(ts) if ts == stored => Some((stored.to_owned(), false)),
        Some(ts) if ts == EXPLICIT_VR_LE && can_transcode => Some((ts.to_owned(), true)),
        Some(_) => None,
    })
}

impl Found {
    /// Settles what this instance is sent as for `wanted`: `false` when it cannot be.
    fn settle(&mut self, wanted: &[Option<String>]) -> bool {
        let stored = self.transfer_syntax.as_str();
        self.as_stored_taken = wanted
            .iter()
            .any(|w| w.as_deref().is_none_or(|ts| ts == stored));
        match serve_as(stored, self.size, wanted) {
            Some((ts, transcode)) => {
                self.transfer_syntax = ts;
                self.transcode = transcode;
                true
            }
            None => false,
        }
    }

    /// Gives up re-encoding: the instance goes as stored.
    fn as_stored(&mut self) {
        self.transcode = false;
        self.transfer_syntax = IMPLICIT_VR_LE.to_owned();
    }
}

/// A multipart boundary no stored value can contain on purpose: random per response (one
/// derived from the UIDs and the size could be computed by whoever sent the instance, who
/// could then write it, and a forged part after it, into a value; RFC 2046 5.1.1).
fn boundary() -> String {
    format!("nightingale-{}", uuid::Uuid::new_v4().simple())
}

/// Why an instance was not re-encoded.
enum TranscodeError {
    /// Reading its file failed (`NotFound`: purged meanwhile).
    Io(std::io::Error),
    /// Its data set is not well formed enough to be re-encoded.
    Data(String),
    /// The in-flight memory budget has no room for it now (503), or ever (413).
    Budget(AppError),
}

/// A re-encoded part and the admission ticket charged for it: both go when the last
/// reference to the bytes does, once they have been written to the client.
struct HeldPart {
    bytes: Vec<u8>,
    _ticket: super::Ticket,
}

impl AsRef<[u8]> for HeldPart {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// The file of `found` re-encoded in Explicit VR Little Endian between `head` and `tail`
/// (its multipart framing), on a blocking thread. The file and its re-encoding are held in
/// memory until the client has taken them: twice the file's size is charged to the
/// in-flight budget (`--max-inflight-bytes`) first, so that clients that ask and do not read
/// cannot pile up copies (a review held 1.6 GB with 8 of them on a 200 MiB instance).
async fn transcoded(
    state: &AppState,
    found: &Found,
    head: String,
    tail: String,
) -> Result<Bytes, TranscodeError> {
    let mut ticket = state
        .admission
        .receiving()
        .map_err(TranscodeError::Budget)?;
    let size = usize::try_from(found.size).unwrap_or(usize::MAX);
    ticket
        .charge(
            size.saturating_mul(2)
                .saturating_add(head.len() + tail.len()),
        )
        .map_err(TranscodeError::Budget)?;
    let path = found.path.clone();
    let _permit = TRANSCODES
        .acquire()
        .await
        .map_err(|e| TranscodeError::Io(std::io::Error::other(e)))?;
    tokio::task::spawn_blocking(move || {
        let raw = std::fs::read(&path).map_err(TranscodeError::Io)?;
        let mut bytes = Vec::with_capacity(head.len() + raw.len() + raw.len() / 16 + 512);
        bytes.extend_from_slice(head.as_bytes());
        nightingale_dicom::reencode::implicit_to_explicit_into(&raw, &mut bytes)
            .map_err(|e| TranscodeError::Data(e.to_string()))?;
        bytes.extend_from_slice(tail.as_bytes());
        Ok(Bytes::from_owner(HeldPart {
            bytes,
            _ticket: ticket,
        }))
    })
    .await
    .map_err(|e| TranscodeError::Io(std::io::Error::other(e)))?
}

impl Found {
    /// A result object of the DICOM pipeline (written in Explicit VR Little Endian).
    fn result(path: PathBuf) -> Found {
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Found {
            path,
            transfer_syntax: nightingale_dicom::results::EXPLICIT_VR_LITTLE_ENDIAN.into(),
            size,
            source: "results",
            transcode: false,
            as_stored_taken: true,
        }
    }
}

fn find(state: &AppState, study: &str, series: &str, sop: &str) -> Result<Option<Found>, AppError> {
    if let Some(web) = state.dicomweb()
        && let Some(s) = web
            .spool
            .instance(study, series, sop)
            .map_err(|e| AppError::internal(format!("spool index: {e}")))?
    {
        return Ok(Some(Found {
            path: s.path,
            transfer_syntax: s.transfer_syntax,
            size: s.size,
            source: "spool",
            transcode: false,
            as_stored_taken: true,
        }));
    }
    if let Some(results) = state.results() {
        let path = results
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .object_path(study, series, sop)
            .map_err(|e| AppError::internal(format!("results store: {e}")))?;
        if let Some(relative) = path {
            return Ok(Some(Found::result(results.dir.join(relative))));
        }
    }
    Ok(None)
}

/// Every instance of `study` (of `series` in it, when given): the spool's, then the pipeline's
/// result objects, each SOP instance once.
fn find_all(state: &AppState, study: &str, series: Option<&str>) -> Result<Vec<Found>, AppError> {
    let mut found = Vec::new();
    let mut seen = std::collections::HashSet::new();
    if let Some(web) = state.dicomweb() {
        let stored = match series {
            Some(series) => web.spool.series_instances(study, series),
            None => web.spool.study_instances(study),
        }
        .map_err(|e| AppError::internal(format!("spool index: {e}")))?;
        for s in stored {
            if seen.insert(s.sop_instance_uid) {
                found.push(Found {
                    path: s.path,
                    transfer_syntax: s.transfer_syntax,
                    size: s.size,
                    source: "spool",
                    transcode: false,
                    as_stored_taken: true,
                });
            }
        }
    }
    if let Some(results) = state.results() {
        let store = results.store.lock().unwrap_or_else(|p| p.into_inner());
        let jobs = store
            .jobs_of_study(study)
            .map_err(|e| AppError::internal(format!("results store: {e}")))?;
        for job in jobs {
            let objects = store
                .objects_of_job(job.id)
                .map_err(|e| AppError::internal(format!("results store: {e}")))?;
            for o in objects {
                if series.is_some_and(|s| s != o.series_uid) || !seen.insert(o.sop_instance_uid) {
                    continue;
                }
                found.push(Found::result(results.dir.join(&o.path)));
            }
        }
    }
    Ok(found)
}

/// `GET /dicomweb/studies/{study}`.
pub(crate) async fn retrieve_study(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    client: Option<Extension<ClientAddr>>,
    Path(study): Path<String>,
    headers: HeaderMap,
) -> Response {
    retrieve_many(state, caller, client, study, None, headers).await
}

/// `GET /dicomweb/studies/{study}/series/{series}`.
pub(crate) async fn retrieve_series(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    client: Option<Extension<ClientAddr>>,
    Path((study, series)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    retrieve_many(state, caller, client, study, Some(series), headers).await
}

/// Records a read of received DICOM in the audit trail before it is answered
/// ([`crate::audit::EventKind::DicomwebRead`]): `Err` (500) when the record cannot be
/// written, and then nothing is sent. UIDs as `--dicom-audit-uids` says (hashed by default).
pub(crate) async fn audit_read(
    state: &AppState,
    caller: Option<&Caller>,
    headers: &HeaderMap,
    event: &str,
    level: &str,
    uids: &[(&str, &str)],
    fields: &[(&str, String)],
) -> Result<(), AppError> {
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let record = crate::audit::dicom::read_record(
        request_id,
        caller.map_or("anonymous", |c| c.id.as_str()),
        event,
        level,
        state.dicomweb().map(|w| w.audit_uids).unwrap_or_default(),
        uids,
        fields,
    );
    // A trail that does not answer within TRAIL_WAIT is failing, as for DICOM ingest: the
    // read is refused (it hung for as long as the trail did: a re-attack's finding). The
    // record may still reach the trail once it answers: a read recorded, not sent.
    let written = tokio::time::timeout(crate::audit::TRAIL_WAIT, state.audit.record(record))
        .await
        .unwrap_or_else(|_| {
            Err(crate::audit::AuditError::Write {
                location: state.audit.location().to_owned(),
                reason: format!("no answer within {} s", crate::audit::TRAIL_WAIT.as_secs()),
            })
        });
    written.map_err(|e| {
        tracing::error!(error = %e, "DICOMweb: the access record of a read cannot be written; nothing sent");
        // 503 as for an inference: the trail comes back, the read can be tried again (it
        // was a 500 "internal server error", which says nothing and invites no retry).
        AppError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the audit trail cannot be written: no received data is sent without its access record",
        )
    })
}

fn caller_of(caller: &Option<Extension<Caller>>) -> Option<&Caller> {
    caller.as_ref().map(|c| &c.0)
}

/// [`audit_read`] of one instance sent.
async fn audit_instance(
    state: &AppState,
    caller: &Option<Extension<Caller>>,
    headers: &HeaderMap,
    (study, series, sop): (&str, &str, &str),
    bytes: usize,
) -> Result<(), AppError> {
    let named = [("study", study), ("series", series), ("sop_instance", sop)];
    let fields = [("instances", "1".to_owned()), ("bytes", bytes.to_string())];
    audit_read(
        state,
        caller_of(caller),
        headers,
        "retrieve",
        "instance",
        &named,
        &fields,
    )
    .await
}

/// The checks every retrieve makes first: DICOMweb on, the UIDs well formed, an acceptable
/// media type. `Err` is the answer.
fn precheck(
    state: &AppState,
    uids: &[(&str, &str)],
    headers: &HeaderMap,
) -> Result<Vec<Option<String>>, AppError> {
    if state.dicomweb().is_none() && state.results().is_none() {
        return Err(AppError::not_found(
            "DICOMweb is off: it runs over the DICOM spool, which --dicom-spool, --dicom-port or --dicom-addr turns on",
        ));
    }
    for (what, uid) in uids {
        if !valid_uid(uid) {
            return Err(AppError::bad_request(format!(
                "the {what} UID is not a UID (1-64 letters, digits, dots, '-' or '_')"
            )));
        }
    }
    accepted_syntaxes(headers).map_err(|why| AppError::new(StatusCode::NOT_ACCEPTABLE, why))
}

async fn retrieve_many(
    state: Arc<AppState>,
    caller: Option<Extension<Caller>>,
    client: Option<Extension<ClientAddr>>,
    study: String,
    series: Option<String>,
    headers: HeaderMap,
) -> Response {
    let mut uids = vec![("study", study.as_str())];
    if let Some(s) = &series {
        uids.push(("series", s.as_str()));
    }
    let wanted = match precheck(&state, &uids, &headers) {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    let lookup = {
        let state = state.clone();
        let (study, series) = (study.clone(), series.clone());
        tokio::task::spawn_blocking(move || find_all(&state, &study, series.as_deref())).await
    };
    let found = match lookup {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => return e.into_response(),
        Err(e) => return AppError::internal(e.to_string()).into_response(),
    };
    if found.is_empty() {
        let what = if series.is_some() { "series" } else { "study" };
        return AppError::not_found(format!("no such {what}")).into_response();
    }
    let mut found = found;
    let mut refused: Vec<String> = Vec::new();
    for f in &mut found {
        if !f.settle(&wanted) {
            refused.push(f.transfer_syntax.clone());
        }
    }
    if !refused.is_empty() {
        refused.sort_unstable();
        refused.dedup();
        return AppError::new(
            StatusCode::NOT_ACCEPTABLE,
            format!(
                "instances are stored as {} and are not transcoded",
                refused.join(", ")
            ),
        )
        .into_response();
    }
    let caller_name = caller.as_ref().map_or("anonymous", |c| c.0.id.as_str());
    let bytes: u64 = found.iter().map(|f| f.size).sum();
    tracing::info!(
        caller = caller_name,
        study = %uid_tag(&study),
        series = series.as_deref().map(uid_tag).unwrap_or_default(),
        instances = found.len(),
        bytes,
        "WADO-RS: {} retrieved",
        if series.is_some() { "series" } else { "study" }
    );
    let mut named = vec![("study", study.as_str())];
    if let Some(s) = &series {
        named.push(("series", s.as_str()));
    }
    let fields = [
        ("instances", found.len().to_string()),
        ("bytes", bytes.to_string()),
    ];
    let level = if series.is_some() { "series" } else { "study" };
    // Before the read is audited: a retrieval the budget has no room for is not one.
    let ticket = match stream_slot(&state, client.as_ref()) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let who = caller_of(&caller);
    if let Err(e) = audit_read(&state, who, &headers, "retrieve", level, &named, &fields).await {
        return e.into_response();
    }
    for f in &found {
        metrics::counter!("nightingale_dicomweb_retrieved_total", "source" => f.source)
            .increment(1);
    }
    let boundary = boundary();
    let content_type =
        format!("multipart/related; type=\"application/dicom\"; boundary={boundary}");
    let body = Body::from_stream(holding(
        stream_files(state.clone(), boundary, found),
        ticket,
    ));
    let mut response = (StatusCode::OK, body).into_response();
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    response
}

/// Where a multi-part body is.
struct Parts {
    state: Arc<AppState>,
    boundary: String,
    files: std::vec::IntoIter<Found>,
    current: Option<tokio::fs::File>,
    done: bool,
}

/// The multipart body of several files: per file its part headers, the file in chunks and
/// the CRLF before the next delimiter; then the close delimiter. A file gone since the
/// lookup (purged) is left out; any other read error ends the body early (the client sees
/// a body without its close delimiter). An instance that should go re-encoded and cannot
/// (a data set too malformed, no room in the memory budget now) goes as stored where the
/// client takes that, and is otherwise left out with a warning: the answer has begun, and
/// the other instances still reach the client.
fn stream_files(
    state: Arc<AppState>,
    boundary: String,
    files: Vec<Found>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send {
    let parts = Parts {
        state,
        boundary,
        files: files.into_iter(),
        current: None,
        done: false,
    };
    futures_util::stream::unfold(parts, |mut st| async move {
        loop {
            if let Some(file) = &mut st.current {
                let mut buf = vec![0u8; CHUNK];
                return match file.read(&mut buf).await {
                    Ok(0) => {
                        st.current = None;
                        Some((Ok(Bytes::from_static(b"\r\n")), st))
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(Bytes::from(buf)), st))
                    }
                    Err(e) => {
                        st.current = None;
                        st.done = true;
                        Some((Err(e), st))
                    }
                };
            }
            if st.done {
                return None;
            }
            let Some(next) = st.files.next() else {
                st.done = true;
                let close = Bytes::from(format!("--{}--\r\n", st.boundary));
                return Some((Ok(close), st));
            };
            let mut next = next;
            if next.transcode {
                let head = format!(
                    "--{}\r\nContent-Type: application/dicom; transfer-syntax={}\r\n\r\n",
                    st.boundary, next.transfer_syntax
                );
                let reason = match transcoded(&st.state, &next, head, "\r\n".to_owned()).await {
                    Ok(part) => return Some((Ok(part), st)),
                    Err(TranscodeError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                        tracing::warn!("WADO-RS: an instance was purged while its study was sent");
                        continue;
                    }
                    Err(TranscodeError::Io(e)) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                    Err(TranscodeError::Data(reason)) => reason,
                    Err(TranscodeError::Budget(e)) => e.message,
                };
                if !next.as_stored_taken {
                    tracing::warn!(
                        reason,
                        "WADO-RS: an Implicit VR instance left out of the answer: not re-encoded, and the client takes no other syntax"
                    );
                    continue;
                }
                tracing::warn!(
                    reason,
                    "WADO-RS: an Implicit VR instance not re-encoded, sent as stored"
                );
                next.as_stored();
            }
            match tokio::fs::File::open(&next.path).await {
                Ok(file) => {
                    st.current = Some(file);
                    let head = Bytes::from(format!(
                        "--{}\r\nContent-Type: application/dicom; transfer-syntax={}\r\n\r\n",
                        st.boundary, next.transfer_syntax
                    ));
                    return Some((Ok(head), st));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!("WADO-RS: an instance was purged while its study was sent");
                    continue;
                }
                Err(e) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
            }
        }
    })
}

/// `GET /dicomweb/studies/{study}/series/{series}/instances/{sop}`.
pub(crate) async fn retrieve_instance(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    client: Option<Extension<ClientAddr>>,
    Path((study, series, sop)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let uids = [
        ("study", study.as_str()),
        ("series", series.as_str()),
        ("SOP instance", sop.as_str()),
    ];
    let wanted = match precheck(&state, &uids, &headers) {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    let lookup = {
        let state = state.clone();
        let (study, series, sop) = (study.clone(), series.clone(), sop.clone());
        tokio::task::spawn_blocking(move || find(&state, &study, &series, &sop)).await
    };
    let found = match lookup {
        Ok(Ok(Some(f))) => f,
        Ok(Ok(None)) => {
            return AppError::not_found("no such instance").into_response();
        }
        Ok(Err(e)) => return e.into_response(),
        Err(e) => return AppError::internal(e.to_string()).into_response(),
    };
    let mut found = found;
    if !found.settle(&wanted) {
        return AppError::new(
            StatusCode::NOT_ACCEPTABLE,
            format!(
                "the instance is stored as {} and is not transcoded",
                found.transfer_syntax
            ),
        )
        .into_response();
    }
    if found.transcode {
        let boundary = boundary();
        let head = format!(
            "--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={EXPLICIT_VR_LE}\r\n\r\n"
        );
        let tail = format!("\r\n--{boundary}--\r\n");
        let why = match transcoded(&state, &found, head, tail).await {
            Ok(body) => {
                if let Err(e) = audit_instance(
                    &state,
                    &caller,
                    &headers,
                    (&study, &series, &sop),
                    body.len(),
                )
                .await
                {
                    return e.into_response();
                }
                let caller = caller.as_ref().map_or("anonymous", |c| c.0.id.as_str());
                tracing::info!(
                    caller,
                    source = found.source,
                    sop = %uid_tag(&sop),
                    bytes = body.len(),
                    "WADO-RS: instance retrieved (Implicit VR re-encoded as Explicit)"
                );
                metrics::counter!("nightingale_dicomweb_retrieved_total", "source" => found.source)
                    .increment(1);
                let content_type = format!(
                    "multipart/related; type=\"application/dicom\"; transfer-syntax={EXPLICIT_VR_LE}; boundary={boundary}"
                );
                // The body's bytes hold their admission ticket until they have been sent.
                let mut response = (StatusCode::OK, body).into_response();
                if let Ok(v) = HeaderValue::from_str(&content_type) {
                    response.headers_mut().insert(header::CONTENT_TYPE, v);
                }
                return response;
            }
            Err(TranscodeError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return AppError::not_found("no such instance").into_response();
            }
            Err(TranscodeError::Io(e)) => {
                return AppError::internal(format!("reading the instance: {e}")).into_response();
            }
            Err(TranscodeError::Data(reason)) if !found.as_stored_taken => {
                return AppError::new(
                    StatusCode::NOT_ACCEPTABLE,
                    format!(
                        "the instance cannot be re-encoded in Explicit VR Little Endian: {reason}"
                    ),
                )
                .into_response();
            }
            Err(TranscodeError::Budget(e)) if !found.as_stored_taken => {
                return e.into_response();
            }
            Err(TranscodeError::Data(reason)) => reason,
            Err(TranscodeError::Budget(e)) => e.message,
        };
        tracing::warn!(
            reason = why,
            "WADO-RS: an Implicit VR instance not re-encoded, sent as stored"
        );
        found.as_stored();
    }
    let ticket = match stream_slot(&state, client.as_ref()) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let file = match tokio::fs::File::open(&found.path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Indexed but gone (purged meanwhile).
            return AppError::not_found("no such instance").into_response();
        }
        Err(e) => {
            return AppError::internal(format!("{}: {e}", found.path.display())).into_response();
        }
    };
    if let Err(e) = audit_instance(
        &state,
        &caller,
        &headers,
        (&study, &series, &sop),
        found.size as usize,
    )
    .await
    {
        return e.into_response();
    }
    let caller = caller.as_ref().map_or("anonymous", |c| c.0.id.as_str());
    tracing::info!(
        caller,
        source = found.source,
        sop = %uid_tag(&sop),
        bytes = found.size,
        "WADO-RS: instance retrieved"
    );
    metrics::counter!("nightingale_dicomweb_retrieved_total", "source" => found.source)
        .increment(1);

    let boundary = boundary();
    let head = Bytes::from(format!(
        "--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={}\r\n\r\n",
        found.transfer_syntax
    ));
    let tail = Bytes::from(format!("\r\n--{boundary}--\r\n"));
    let body = Body::from_stream(holding(stream_file(head, file, tail), ticket));
    let content_type = format!(
        "multipart/related; type=\"application/dicom\"; transfer-syntax={}; boundary={boundary}",
        found.transfer_syntax
    );
    let mut response = (StatusCode::OK, body).into_response();
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    response
}

enum Part {
    Head(Bytes, tokio::fs::File, Bytes),
    File(tokio::fs::File, Bytes),
    Done,
}

/// The multipart body: head, the file in chunks, tail.
fn stream_file(
    head: Bytes,
    file: tokio::fs::File,
    tail: Bytes,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send {
    futures_util::stream::unfold(Part::Head(head, file, tail), |part| async move {
        match part {
            Part::Head(head, file, tail) => Some((Ok(head), Part::File(file, tail))),
            Part::File(mut file, tail) => {
                let mut buf = vec![0u8; CHUNK];
                match file.read(&mut buf).await {
                    Ok(0) => Some((Ok(tail), Part::Done)),
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(Bytes::from(buf)), Part::File(file, tail)))
                    }
                    Err(e) => Some((Err(e), Part::Done)),
                }
            }
            Part::Done => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> Result<Vec<Option<String>>, String> {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
        accepted_syntaxes(&h)
    }

    #[test]
    fn accept_headers_are_read_as_ps3_18_writes_them() {
        assert_eq!(accepted_syntaxes(&HeaderMap::new()), Ok(vec![None]));
        assert_eq!(accept("*/*"), Ok(vec![None]));
        assert_eq!(
            accept("multipart/related; type=\"application/dicom\"; transfer-syntax=*"),
            Ok(vec![None])
        );
        assert_eq!(
            accept(
                "multipart/related; type=\"application/dicom\"; transfer-syntax=1.2.840.10008.1.2.1"
            ),
            Ok(vec![Some("1.2.840.10008.1.2.1".into())])
        );
        assert_eq!(
            accept("multipart/related; type=application/dicom, */*;q=0.5"),
            Ok(vec![None, None])
        );
        // Ranked by quality (1 when not given), the header's order among equals.
        assert_eq!(
            accept(
                "multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2; q=0.3, \
                 multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2.1; q=0.8, \
                 multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2.5"
            ),
            Ok(vec![
                Some("1.2.840.10008.1.2.5".into()),
                Some("1.2.840.10008.1.2.1".into()),
                Some("1.2.840.10008.1.2".into()),
            ])
        );
        for bad in [
            "application/json",
            "multipart/related; type=\"application/octet-stream\"",
            "image/jpeg",
            "*/*;q=0",
        ] {
            assert!(accept(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn uids_are_checked() {
        assert!(valid_uid("1.2.840.10008.1.2"));
        assert!(valid_uid("1.2.826.0.1.ABC.7"));
        for bad in ["", "..", "../x", "1/2", &"1".repeat(65)] {
            assert!(!valid_uid(bad), "{bad}");
        }
    }
}
