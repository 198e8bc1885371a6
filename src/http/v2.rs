//! KServe v2 / Open Inference Protocol: health, metadata, inference, statistics.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use nightingale_inference::{NamedTensor, StatsSnapshot};
use nightingale_models::LoadedModel;
use serde_json::json;

use super::codec::{self, InferResponse, JsonData, OutputTensor};
use super::model_config;
use super::{ApiPath as Path, AppError, AppState, RequestDeadline, read_body_admitted};
use crate::audit::{AuditEvent, EventKind, Outcome, tensors_sha256};

pub(super) const HEADER_LENGTH: &str = "inference-header-content-length";

pub async fn live() -> StatusCode {
    StatusCode::OK
}

/// Ready: the initial load is done and the audit trail can be written (every inference is
/// refused while it cannot: a balancer reading readiness went on sending requests to a
/// server that refused them all, a red-team finding).
pub async fn ready(State(state): State<Arc<AppState>>) -> StatusCode {
    if state.is_ready() && state.audit.is_writable() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

pub async fn server_metadata() -> Json<serde_json::Value> {
    Json(json!({
        "name": "nightingale",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": EXTENSIONS,
    }))
}

/// The versions model metadata lists: every served version of the model when none was named,
/// else the one named.
pub(super) fn served_versions(
    state: &AppState,
    model: &LoadedModel,
    all_versions: bool,
) -> Vec<String> {
    if all_versions {
        state
            .repository
            .loaded()
            .iter()
            .filter(|m| m.name == model.name)
            .map(|m| m.version.to_string())
            .collect()
    } else {
        vec![model.version.to_string()]
    }
}

/// Server metadata's extensions.
pub(super) const EXTENSIONS: [&str; 6] = [
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "model_repository",
    "statistics",
    "nightingale_explain",
];

fn metadata_body(state: &AppState, model: &LoadedModel, all_versions: bool) -> serde_json::Value {
    let versions = served_versions(state, model, all_versions);
    let meta = model.worker.metadata();
    let spec = |s: &nightingale_inference::TensorSpec| json!({"name": s.name, "datatype": s.datatype, "shape": s.shape});
    json!({
        "name": model.name,
        "versions": versions,
        "platform": model.manifest.platform,
        "inputs": meta.inputs.iter().map(spec).collect::<Vec<_>>(),
        "outputs": meta.outputs.iter().map(spec).collect::<Vec<_>>(),
        "parameters": {
            "task": model.manifest.task,
            "backend": model.worker.backend(),
            "max_batch_size": model.worker.config().batching.as_ref().map_or(0, |b| b.max_batch_size),
            "labels": model.manifest.outputs.iter().filter(|o| !o.labels.is_empty()).map(|o| (o.name.clone(), o.labels.clone())).collect::<std::collections::BTreeMap<_, _>>(),
            "preprocessing": model.manifest.preprocessing,
            "explain": super::explain::offer(state, model),
        },
    })
}

pub async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<Json<serde_json::Value>, AppError> {
    let m = state.model(&model, None)?;
    Ok(Json(metadata_body(&state, &m, true)))
}

pub async fn model_metadata_version(
    State(state): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, AppError> {
    let m = state.model(&model, Some(&version))?;
    Ok(Json(metadata_body(&state, &m, false)))
}

pub async fn model_config(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<Json<model_config::ModelConfig>, AppError> {
    let m = state.model(&model, None)?;
    Ok(Json(model_config::of(&state, &m)))
}

pub async fn model_config_version(
    State(state): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<model_config::ModelConfig>, AppError> {
    let m = state.model(&model, Some(&version))?;
    Ok(Json(model_config::of(&state, &m)))
}

pub async fn model_ready(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<StatusCode, AppError> {
    state.model(&model, None)?;
    audit_writable(&state)
}

pub async fn model_ready_version(
    State(state): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> Result<StatusCode, AppError> {
    state.model(&model, Some(&version))?;
    audit_writable(&state)
}

/// A served model is ready while its inferences can be audited (see [`ready`]).
fn audit_writable(state: &AppState) -> Result<StatusCode, AppError> {
    if state.audit.is_writable() {
        Ok(StatusCode::OK)
    } else {
        Err(AppError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the audit trail cannot be written: every inference is refused until it can",
        ))
    }
}

pub async fn infer(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    deadline: Option<Extension<RequestDeadline>>,
    caller: Option<Extension<super::auth::Caller>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_infer(
        state,
        model,
        None,
        deadline.map(|d| d.0),
        caller.map(|c| c.0.id),
        headers,
        body,
    )
    .await
}

pub async fn infer_version(
    State(state): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
    deadline: Option<Extension<RequestDeadline>>,
    caller: Option<Extension<super::auth::Caller>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_infer(
        state,
        model,
        Some(version),
        deadline.map(|d| d.0),
        caller.map(|c| c.0.id),
        headers,
        body,
    )
    .await
}

/// What a model request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Infer,
    Explain,
}

pub(super) async fn run_infer(
    state: Arc<AppState>,
    model: String,
    version: Option<String>,
    deadline: Option<RequestDeadline>,
    caller: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_model_request(
        Op::Infer,
        state,
        (model, version),
        deadline,
        caller,
        headers,
        body,
    )
    .await
}

pub(super) async fn run_model_request(
    op: Op,
    state: Arc<AppState>,
    (model, version): (String, Option<String>),
    deadline: Option<RequestDeadline>,
    caller: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request_id: String = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .chars()
        .take(128)
        .collect();
    let mut call = match ModelCall::begin(
        &state,
        op,
        &model,
        version.as_deref(),
        request_id,
        caller,
        deadline.map(|d| d.0),
    ) {
        Ok(call) => call,
        Err(e) => return e.into_response(),
    };
    let loaded = call.model.clone();
    let result = match op {
        Op::Infer => infer_loaded(&state, &loaded, &headers, body, call.audit()).await,
        Op::Explain => {
            super::explain::explain_loaded(&state, &loaded, &headers, body, call.audit()).await
        }
    };
    match call.finish(result).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// One request to a model, from the moment it reaches the model to its answer, whatever the
/// protocol (HTTP here, gRPC in `super::grpc`): the audit record is pending from
/// [`ModelCall::begin`] (and written even if the request's future is dropped), and
/// [`ModelCall::finish`] commits it, refuses an answer whose record cannot be written, and
/// counts the request in the metrics.
pub(crate) struct ModelCall {
    op: Op,
    start: Instant,
    pub(crate) model: Arc<LoadedModel>,
    /// Taken by [`ModelCall::finish`]; still here when the call is dropped before it.
    audit: Option<crate::audit::PendingRecord>,
    /// How the call is counted once its record is written (set by [`ModelCall::finish`]
    /// before it waits for the record): a call dropped during that wait is counted so.
    committing: Option<(bool, &'static str)>,
}

/// A call dropped before [`ModelCall::finish`] (its deadline fired, the client went away
/// while the model ran) is counted as failed in the metrics and the statistics extension, as
/// its audit record says (408 or 499): such calls were counted nowhere (a red-team finding).
impl Drop for ModelCall {
    fn drop(&mut self) {
        if let Some(record) = &self.audit {
            // As its record will say: its deadline passed (408), or its client left (499).
            let timed_out = record.deadline().is_some_and(|d| Instant::now() >= d);
            self.count(false, if timed_out { "timeout" } else { "client_gone" });
        } else if let Some((ok, outcome)) = self.committing.take() {
            // Dropped while its record was being written (a red-team finding: such calls
            // were counted nowhere).
            self.count(ok, outcome);
        }
    }
}

impl ModelCall {
    /// Finds the model (404 when unknown: such a request reached no model and is not audited)
    /// and opens its audit record.
    pub(crate) fn begin(
        state: &AppState,
        op: Op,
        model: &str,
        version: Option<&str>,
        request_id: String,
        actor: Option<String>,
        deadline: Option<Instant>,
    ) -> Result<ModelCall, AppError> {
        let start = Instant::now();
        let loaded = state.model(model, version)?;
        let audit = state.audit.pending(
            AuditEvent {
                kind: match op {
                    Op::Infer => EventKind::Inference,
                    Op::Explain => EventKind::Explain,
                },
                request_id,
                model: loaded.name.clone(),
                version: loaded.version.to_string(),
                model_sha256: loaded.model_sha256.clone(),
                input_sha256: None,
                output_sha256: None,
                rows: None,
                status: 0,
                outcome: Outcome::Failed,
                // Who asked: the caller's non-secret id (`api-key:<name>`, `jwt:<iss>#<sub>`,
                // `tls:<subject>`, `anonymous`).
                actor,
                detail: None,
            },
            deadline,
        );
        Ok(ModelCall {
            op,
            start,
            model: loaded,
            audit: Some(audit),
            committing: None,
        })
    }

    /// The pending audit record, for the digests and row count.
    pub(crate) fn audit(&mut self) -> &mut AuditEvent {
        self.audit
            .as_mut()
            .expect("the record is pending until finish")
            .event_mut()
    }

    /// Counts the call in the metrics and the statistics extension.
    fn count(&self, ok: bool, outcome: &str) {
        count_call(&self.model, self.op, ok, outcome, self.start.elapsed());
    }
}

/// Counts one call of `op` on `model` in the metrics and the statistics extension: KServe
/// calls ([`ModelCall`]) and the DICOM pipeline's explanations alike.
pub(crate) fn count_call(
    model: &LoadedModel,
    op: Op,
    ok: bool,
    outcome: &str,
    elapsed: std::time::Duration,
) {
    let labels = [
        ("model", model.name.clone()),
        ("version", model.version.to_string()),
        ("outcome", outcome.to_owned()),
    ];
    let (requests, duration) = match op {
        Op::Infer => (
            "nightingale_inference_requests_total",
            "nightingale_request_duration_seconds",
        ),
        Op::Explain => (
            "nightingale_explain_requests_total",
            "nightingale_explain_duration_seconds",
        ),
    };
    metrics::counter!(requests, &labels).increment(1);
    metrics::histogram!(duration, &labels[..2]).record(elapsed.as_secs_f64());
    // The statistics extension counts every request to the model version, failed ones
    // whatever the stage (as the metrics and the audit trail do). An explanation is one
    // request, whatever forward passes it ran (each pass was counted a successful request,
    // a 422 explanation included: a red-team finding); its passes still count in the
    // inference and execution counts.
    model.worker.stats().record_request(ok, elapsed);
}

impl ModelCall {
    /// Writes the audit record with the answer's status (HTTP's, whatever the protocol) and
    /// counts the request; without its record, the answer becomes a 503.
    pub(crate) async fn finish<T>(
        mut self,
        mut result: Result<T, AppError>,
    ) -> Result<T, AppError> {
        let audit = self.audit.take().expect("finished once");
        // An answer ready after the request's deadline is not given (nor recorded as given):
        // the client has stopped waiting for it (gRPC clients cancel at their deadline; a
        // red-team finding: records said 200 for calls answered DEADLINE_EXCEEDED).
        if result.is_ok() && audit.deadline().is_some_and(|d| Instant::now() >= d) {
            result = Err(AppError::new(
                StatusCode::REQUEST_TIMEOUT,
                "the request did not complete within its deadline",
            ));
        }
        let status = match &result {
            Ok(_) => StatusCode::OK.as_u16(),
            Err(e) => e.status.as_u16(),
        };
        self.committing = Some((result.is_ok(), outcome_of(&result)));
        // Without its audit record there is no answer.
        if let Err(e) = audit.commit(status).await {
            tracing::error!(error = %e, "audit record not written; refusing the response");
            result = Err(AppError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the audit log cannot be written; no prediction is returned without its audit record",
            ));
        }
        self.committing = None;
        self.count(result.is_ok(), outcome_of(&result));
        result
    }
}

/// The `outcome` label of a call's metrics, as the audit trail's outcome: `success`,
/// `overloaded` (429, 503: refused by the server's limits, as it should under load),
/// `timeout` (408), `client_gone` (499), `client_error` (other 4xx, 501) or `server_error`
/// (a review found shed load counted as server errors, which dashboards alert on).
pub(crate) fn outcome_of<T>(result: &Result<T, AppError>) -> &'static str {
    match result {
        Ok(_) => "success",
        Err(e) if matches!(e.status.as_u16(), 429 | 503) => "overloaded",
        Err(e) if e.status == StatusCode::REQUEST_TIMEOUT => "timeout",
        Err(e) if e.status.as_u16() == 499 => "client_gone",
        // 501: something this server does not do, asked for by the caller.
        Err(e) if e.status.is_client_error() || e.status == StatusCode::NOT_IMPLEMENTED => {
            "client_error"
        }
        Err(_) => "server_error",
    }
}

async fn infer_loaded(
    state: &AppState,
    model: &LoadedModel,
    headers: &HeaderMap,
    body: Body,
    audit: &mut AuditEvent,
) -> Result<Response, AppError> {
    let header_len = header_length(headers)?;
    // Admission: the body's bytes as they arrive (a declared length that cannot fit is refused
    // before reading), then a place among the requests in flight, then what the decoded
    // tensors take beyond the body.
    let mut ticket = state.admission.receiving()?;
    let body = read_body_admitted(headers, body, state.config.max_body_bytes, &mut ticket).await?;
    ticket.take_place(&state.admission)?;
    let specs = &model.worker.metadata().inputs;
    let request = match header_len {
        Some(0) => codec::decode_raw(&body, specs)?,
        _ => codec::decode_request(&body, header_len, specs, &mut |n| ticket.charge(n))?,
    };
    // What the request holds from here: the body (until dropped below) and its tensors.
    let decoded: usize = request.inputs.iter().map(|t| t.tensor.memory_len()).sum();
    ticket.charge_at_least(body.len().saturating_add(decoded))?;
    drop(body);
    // The outputs the model will make, as far as its declared shapes tell, before it runs.
    ticket.charge_answer_more(declared_outputs_len(model, &request))?;
    let id = request.id.clone();
    let (tensors, flags) = infer_decoded(model, request, audit).await?;
    let response = InferResponse {
        model_name: model.name.clone(),
        model_version: model.version.to_string(),
        id,
        outputs: tensors,
    };
    respond(response, &flags, ticket).await
}

/// The protocol-neutral middle of an inference, shared by HTTP and gRPC: records the inputs'
/// digest and row count, checks the requested outputs, runs the model through its worker
/// (batcher, back-pressure), records the outputs' digest, and picks the outputs to return
/// (with the classification extension), each with its binary flag.
/// Whether the manifest declares `output` as one value per row (`[-1]`): its only axis is the
/// batch, not classes, so ranking it would mix the rows (patients).
fn one_value_per_row(model: &LoadedModel, output: &str) -> bool {
    model
        .manifest
        .outputs
        .iter()
        .find(|o| o.name == output)
        .is_some_and(|o| o.shape.len() == 1 && o.shape[0] < 0)
}

fn no_class_axis(output: &str) -> AppError {
    AppError::bad_request(format!(
        "classification needs a class axis: output {output:?} has one value per row (shape [-1]); ask for it without classification"
    ))
}

/// The bytes the model's outputs take at least for `request`, from its declared output
/// shapes: a dynamic first dimension of a model that batches counts the request's rows,
/// other dynamic dimensions count 1 (a lower bound where sizes depend on the request), a
/// BYTES element 16 bytes. Charged before the model runs: a 1.3 KB request of 64 rows had a
/// model allocate its 1 GiB output, over a 200 MiB budget, before the answer was refused (a
/// re-attack's finding).
pub(crate) fn declared_outputs_len(model: &LoadedModel, request: &codec::DecodedRequest) -> usize {
    let meta = model.worker.metadata();
    let rows = if meta.supports_batching() {
        request
            .inputs
            .first()
            .and_then(|t| t.tensor.shape().first().copied())
            .unwrap_or(1)
    } else {
        1
    };
    meta.outputs
        .iter()
        .map(|o| {
            let elements = o.shape.iter().enumerate().fold(1usize, |n, (axis, &d)| {
                let d = match usize::try_from(d) {
                    Ok(d) => d,
                    Err(_) if axis == 0 => rows,
                    Err(_) => 1,
                };
                n.saturating_mul(d)
            });
            elements.saturating_mul(o.datatype.element_size().unwrap_or(16))
        })
        .fold(0usize, usize::saturating_add)
}

pub(crate) async fn infer_decoded(
    model: &LoadedModel,
    request: codec::DecodedRequest,
    audit: &mut AuditEvent,
) -> Result<(Vec<OutputTensor>, Vec<bool>), AppError> {
    audit.input_sha256 = Some(tensors_sha256(&request.inputs));
    audit.rows = request
        .inputs
        .first()
        .and_then(|t| t.tensor.shape().first().copied());
    let meta = model.worker.metadata();
    // Check the requested outputs before running anything.
    if let Some(wanted) = &request.outputs {
        for o in wanted {
            if meta.output(&o.name).is_none() {
                return Err(AppError::bad_request(format!(
                    "unknown output {:?}; the model's outputs are {:?}",
                    o.name,
                    meta.outputs.iter().map(|s| &s.name).collect::<Vec<_>>()
                )));
            }
            // Classification of an output of one value per row is refused before the model
            // runs (it was refused after: a model execution, a failed one in the statistics,
            // for a request that could not be answered, a review's finding).
            if o.classification.is_some_and(|k| k > 0) && one_value_per_row(model, &o.name) {
                return Err(no_class_axis(&o.name));
            }
        }
    }
    // Counted in the model's statistics by `ModelCall::finish`, with the failures before it.
    let outputs = model.worker.infer_uncounted(request.inputs).await?;
    audit.output_sha256 = Some(tensors_sha256(&outputs));
    select_outputs(
        model,
        outputs,
        request.outputs.as_deref(),
        request.binary_default,
    )
}

/// `Inference-Header-Content-Length`, if given.
pub(super) fn header_length(headers: &HeaderMap) -> Result<Option<usize>, AppError> {
    // Two values that may disagree: which one frames the body is ambiguous, so neither is.
    if headers.get_all(HEADER_LENGTH).iter().nth(1).is_some() {
        return Err(AppError::bad_request(
            "Inference-Header-Content-Length is given more than once",
        ));
    }
    match headers.get(HEADER_LENGTH) {
        None => Ok(None),
        Some(v) => Ok(Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    AppError::bad_request(
                        "Inference-Header-Content-Length must be a non-negative integer",
                    )
                })?,
        )),
    }
}

/// Encodes an answer (JSON or binary) holding the request's admission ticket until sent.
pub(super) async fn respond(
    response: InferResponse,
    flags: &[bool],
    mut ticket: super::Ticket,
) -> Result<Response, AppError> {
    // The answer is held in memory until the client has taken it: it is charged to the
    // in-flight budget like the request was (an 11 KB gzipped explain request answered
    // with 10 MB of JSON parked that much per unread connection, outside the budget: a
    // red-team finding), and before it is made, with the outputs it is made from (a
    // 659-byte request's 369 MB of JSON was built first: a review's finding). The model
    // has run; an answer the budget has no room for now is refused with 503, as the
    // request would have been (its audit record stands).
    let refused = |bytes: usize| {
        move |_: &AppError| {
            tracing::warn!(
                bytes,
                "an answer was refused: no room for it in the in-flight memory budget"
            );
        }
    };
    let outputs: usize = response
        .outputs
        .iter()
        .filter_map(|o| o.data.as_ref())
        .map(|d| d.0.memory_len())
        .fold(0, usize::saturating_add);
    // What the answer takes at least, asked first: one that cannot fit is refused without
    // a pass over its values.
    let least = outputs.saturating_add(codec::answer_len_at_least(&response, flags));
    ticket.charge_answer(least).inspect_err(refused(least))?;
    let (encoded, mut ticket) = if codec::is_large(&response) {
        // Counted and written on a blocking thread: a 1 GiB answer held the runtime's
        // worker for seconds, health checks waited 17 s (a re-attack's finding).
        let flags = flags.to_vec();
        tokio::task::spawn_blocking(move || {
            let encoded = codec::encode_response(response, &flags, |len| {
                let total = outputs.saturating_add(len);
                ticket.charge_answer(total).inspect_err(refused(total))
            });
            (encoded, ticket)
        })
        .await
        .map_err(|e| AppError::internal(format!("the answer could not be made: {e}")))?
    } else {
        (codec::encode_response(response, flags, |_| Ok(())), ticket)
    };
    let encoded = encoded?;
    ticket
        .hold(encoded.body.len())
        .inspect_err(refused(encoded.body.len()))?;
    ticket.release_place();
    let mut builder = Response::builder().status(StatusCode::OK);
    builder = match encoded.header_len {
        Some(n) => builder
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(HEADER_LENGTH, HeaderValue::from(n)),
        None => builder.header(header::CONTENT_TYPE, "application/json"),
    };
    // The ticket goes with the body, handed to hyper in pieces ([`super::Holding`]): its
    // budget is released once the answer's last piece has been taken, where a body given
    // whole released it at once while hyper still held every byte for a client that did
    // not read.
    builder
        .body(Body::new(super::Holding::new(
            Body::from(encoded.body),
            ticket,
        )))
        .map_err(|e| AppError::internal(e.to_string()))
}

/// The outputs to return, in the order asked (or the model's), each with its binary flag.
pub(super) fn select_outputs(
    model: &LoadedModel,
    outputs: Vec<NamedTensor>,
    wanted: Option<&[codec::OutputChoice]>,
    binary_default: bool,
) -> Result<(Vec<OutputTensor>, Vec<bool>), AppError> {
    let mut tensors = vec![];
    let mut flags = vec![];
    let mut push = |t: nightingale_inference::Tensor, name: String, binary: bool| {
        tensors.push(OutputTensor {
            name,
            datatype: t.datatype(),
            shape: t.shape().to_vec(),
            parameters: None,
            data: Some(JsonData(t)),
        });
        flags.push(binary);
    };
    match wanted {
        None => {
            for o in outputs {
                push(o.tensor, o.name, binary_default);
            }
        }
        Some(wanted) => {
            for choice in wanted {
                let found = outputs
                    .iter()
                    .find(|o| o.name == choice.name)
                    .ok_or_else(|| {
                        AppError::bad_request(format!("unknown output {:?}", choice.name))
                    })?;
                let tensor = match choice.classification {
                    Some(k) if k > 0 => {
                        let spec = model
                            .manifest
                            .outputs
                            .iter()
                            .find(|o| o.name == choice.name);
                        // An output of one value per row (`[-1]`): its only axis is the
                        // batch, not classes; ranking it would mix the rows (patients).
                        if found.tensor.shape().len() == 1 && one_value_per_row(model, &choice.name)
                        {
                            return Err(no_class_axis(&choice.name));
                        }
                        let labels = spec.map(|o| o.labels.clone()).unwrap_or_default();
                        // Ranked per row where the output has rows: on a model that batches
                        // (as Triton), and on any whose output's first dimension is the
                        // request's rows (`-1`): a bundle without `[batching]` still takes
                        // many rows, and ranking its whole output ranked patients against
                        // each other (a re-attack's finding).
                        let batched = model
                            .worker
                            .config()
                            .batching
                            .as_ref()
                            .is_some_and(|b| b.max_batch_size > 0)
                            || spec.is_some_and(|o| o.shape.first().is_some_and(|d| *d < 0));
                        codec::classify(&found.tensor, k, &labels, batched)?
                    }
                    _ => found.tensor.clone(),
                };
                push(
                    tensor,
                    choice.name.clone(),
                    choice.binary.unwrap_or(binary_default),
                );
            }
        }
    }
    Ok((tensors, flags))
}

fn stats_json(model: &LoadedModel) -> serde_json::Value {
    let s: StatsSnapshot = model.worker.stats().snapshot();
    let zero = json!({"count": 0, "ns": 0});
    json!({
        "name": model.name,
        "version": model.version.to_string(),
        "last_inference": s.last_inference,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": s.success,
            "fail": s.fail,
            "queue": s.queue,
            "compute_input": s.compute_input,
            "compute_infer": s.compute_infer,
            "compute_output": s.compute_output,
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "batch_stats": s.batch_stats,
        "memory_usage": [],
    })
}

pub async fn all_stats(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let stats: Vec<_> = state
        .repository
        .loaded()
        .iter()
        .map(|m| stats_json(m))
        .collect();
    Json(json!({ "model_stats": stats }))
}

pub async fn model_stats(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<Json<serde_json::Value>, AppError> {
    // Every served version, as Triton does when no version is named.
    state.model(&model, None)?;
    let stats: Vec<_> = state
        .repository
        .loaded()
        .iter()
        .filter(|m| m.name == model)
        .map(|m| stats_json(m))
        .collect();
    Ok(Json(json!({ "model_stats": stats })))
}

pub async fn model_stats_version(
    State(state): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, AppError> {
    let m = state.model(&model, Some(&version))?;
    Ok(Json(json!({ "model_stats": [stats_json(&m)] })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::codec::{InferResponse, JsonData, OutputTensor};
    use crate::http::{HELD_CHUNK, HttpConfig};
    use http_body::Body as _;

    /// The metrics' outcome is the audit's: shed load is not a server error (dashboards
    /// alert on those), a deadline not the caller's error (a review's finding).
    #[test]
    fn outcomes_follow_the_audit() {
        let of = |status: u16| {
            outcome_of::<()>(&Err(AppError::new(
                StatusCode::from_u16(status).unwrap(),
                "x",
            )))
        };
        assert_eq!(outcome_of::<()>(&Ok(())), "success");
        assert_eq!(of(503), "overloaded");
        assert_eq!(of(429), "overloaded");
        assert_eq!(of(408), "timeout");
        assert_eq!(of(499), "client_gone");
        assert_eq!(of(400), "client_error");
        assert_eq!(of(413), "client_error");
        assert_eq!(of(501), "client_error");
        assert_eq!(of(500), "server_error");
        assert_eq!(of(422), "client_error");
        for status in [503, 429, 408, 499, 400, 501, 500] {
            let audited = crate::audit::Outcome::from_status(status);
            let label = of(status);
            assert_eq!(
                label == "server_error",
                audited == crate::audit::Outcome::Failed,
                "{status}"
            );
        }
    }
    use http_body_util::BodyExt;
    use nightingale_inference::Tensor;

    /// A response of `n` FP32 zeros (about 2 bytes of JSON each).
    fn zeros(n: usize) -> InferResponse {
        let t = Tensor::Fp32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[1, n])));
        InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: None,
            outputs: vec![OutputTensor {
                name: "out".into(),
                datatype: t.datatype(),
                shape: t.shape().to_vec(),
                parameters: None,
                data: Some(JsonData(t)),
            }],
        }
    }

    /// Red-team finding: an answer was held by hyper for a client that read nothing while
    /// its request's budget had been given back (10 MB per connection from an 11 KB gzipped
    /// explain request). The answer is charged, held until its last piece is taken, and
    /// handed over in pieces; one the budget cannot hold is refused.
    #[tokio::test]
    async fn an_answer_is_charged_until_its_last_piece_is_taken() {
        let config = HttpConfig {
            max_inflight_bytes: 4 << 20,
            ..HttpConfig::default()
        };
        let admission = crate::http::Admission::new(&config);
        let free = || admission.bytes.available_permits();
        let all = free();
        let response = respond(zeros(400_000), &[false], admission.admit().unwrap())
            .await
            .unwrap();
        let len = response.body().size_hint().exact().unwrap() as usize;
        assert!(len > 1 << 20, "{len}");
        // Charged for the whole answer while it is held, and no more (what its outputs held
        // while it was made is given back).
        assert!(all - free() >= len / 1024, "{} of {all}", free());
        assert!(all - free() <= len.div_ceil(1024), "{} of {all}", free());
        let mut body = response.into_body();
        let mut pieces = 0;
        let mut got = 0;
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            assert!(data.len() <= HELD_CHUNK);
            got += data.len();
            pieces += 1;
            if got < len {
                assert!(all - free() >= len / 1024, "released before the end");
            }
        }
        assert_eq!(got, len);
        assert!(pieces > 1);
        drop(body);
        assert_eq!(free(), all);
        // An answer larger than the whole budget: refused (before it is made: a review's
        // finding), naming the answer, nothing kept.
        let e = respond(zeros(3_000_000), &[false], admission.admit().unwrap())
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", e.message);
        assert!(e.message.contains("the answer needs"), "{}", e.message);
        assert_eq!(free(), all);
        // One that would fit an idle server while others hold the budget: 503, before it is
        // made.
        let mut other = admission.admit().unwrap();
        other.charge_at_least(3 << 20).unwrap();
        let e = respond(zeros(300_000), &[true], admission.admit().unwrap())
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE, "{}", e.message);
        drop(other);
        assert_eq!(free(), all);
    }
}
