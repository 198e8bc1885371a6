//! KServe v2 over gRPC: `inference.GRPCInferenceService` (proto/grpc_service.proto, Triton's
//! messages and field numbers), served by tonic inside an axum router, so it runs on the same
//! HTTP/2 stack as the HTTP API (plaintext h2c, or HTTPS with the same certificate, client CA
//! and reload as `--tls-cert`).
//!
//! Nothing here decides anything the HTTP side decides differently: every call is checked
//! against [`auth::GRPC_METHODS`] by the same [`auth::authorize`] as the HTTP routes (API key
//! or bearer token in the `authorization` / `x-api-key` metadata, or a verified client
//! certificate); an inference goes through the same [`ModelCall`] (audit record, metrics) and
//! [`v2::infer_decoded`] (digests, output checks, the model's worker, classification) under
//! the same admission budget; errors are the HTTP layer's [`AppError`]s, mapped to gRPC codes
//! in `super::error` with the same message. Only the wire codec is this file's.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use nightingale_inference::{DataType, Element, NamedTensor, Tensor};
use nightingale_inference::{StatDuration, StatsSnapshot};
use nightingale_models::{LoadTarget, LoadedModel, ModelState};
use prost::Message;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::auth::{self, Caller};
use super::codec::{self, DecodedRequest, OutputChoice, OutputTensor};
use super::grpc_wire;
use super::model_config;
use super::v2::{self, ModelCall, Op};
use super::{AppError, AppState, BODY_CHARGE_FACTOR, Ticket};
use crate::deploy;

/// The messages, service and client generated from proto/grpc_service.proto (package
/// `inference`) at build time.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use proto::model_infer_response::InferOutputTensor;
use proto::model_metadata_response::TensorMetadata;
use proto::{
    InferParameter, InferTensorContents, ModelConfigRequest, ModelConfigResponse,
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ModelStatisticsRequest, ModelStatisticsResponse,
    RepositoryIndexRequest, RepositoryIndexResponse, RepositoryModelLoadRequest,
    RepositoryModelLoadResponse, RepositoryModelUnloadRequest, RepositoryModelUnloadResponse,
    ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse,
    ServerReadyRequest, ServerReadyResponse, infer_parameter::ParameterChoice,
};

/// The gRPC service as an axum router: messages up to the HTTP body limit (`max_body_bytes`)
/// are accepted, larger ones get RESOURCE_EXHAUSTED before they reach a handler.
pub fn router(state: Arc<AppState>) -> axum::Router {
    let max = state.config.max_body_bytes;
    let state_for_layer = state.clone();
    // Compressed requests (tritonclient.grpc's `compression_algorithm`) are inflated by tonic,
    // and the size limit applies to the inflated message. Answers are not compressed: most
    // clients advertise gzip, and compressing every small answer would cost more than it
    // saves on a hospital network.
    let service = GrpcInferenceServiceServer::new(Service { state })
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .accept_compressed(tonic::codec::CompressionEncoding::Deflate)
        .max_decoding_message_size(max)
        .max_encoding_message_size(usize::MAX);
    tonic::service::Routes::new(service)
        .into_axum_router()
        .layer(axum::middleware::from_fn_with_state(
            state_for_layer.clone(),
            before_the_message,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state_for_layer,
            super::open_request,
        ))
}

/// Runs before tonic reads the message: a caller without the method's role is refused
/// before any of its message is read (as HTTP answers 401/403 before the body), and reading
/// the message is bounded by the request deadline (a stream that declares a message and
/// stalls gets an error instead of holding the stream for ever). The caller found here is
/// passed on in the request's extensions, so [`Service::serve`] does not authenticate twice.
async fn before_the_message(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    // The whole path names the method: `/other.Service/ModelInfer` (or `/x/y/ModelInfer`)
    // is no method of this service (matched on its last segment, it was read, charged and
    // audited as an inference before tonic refused it: a re-attack's finding).
    let path = request.uri().path();
    let method = path
        .strip_prefix(SERVICE_PREFIX)
        .filter(|m| !m.contains('/'))
        .unwrap_or_else(|| path.rsplit('/').find(|s| !s.is_empty()).unwrap_or_default());
    let rule = path
        .strip_prefix(SERVICE_PREFIX)
        .and_then(auth::grpc_rule_for);
    let request_id = request_id(request.headers());
    // Not a gRPC call at all (a health probe pointed at this port by mistake): 415, as the
    // gRPC over HTTP/2 spec asks, where tonic's answer was 200 with an empty body, which a
    // plain HTTP probe takes for healthy (a review's note).
    let grpc = request
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/grpc"));
    if !grpc {
        drain_briefly(request).await;
        return axum::response::IntoResponse::into_response((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "this is Nightingale's gRPC port (KServe v2 GRPCInferenceService): calls need content-type application/grpc; HTTP is on the HTTP port\n",
        ));
    }
    // A method this server does not serve (ModelStreamInfer, the shared-memory calls,
    // TraceSetting, LogSettings): UNIMPLEMENTED with the reason, where tonic's answer had an
    // empty message and tritonclient's stream callback could not say why it failed (a
    // red-team finding).
    if rule.is_none() {
        let shown: String = method
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(64)
            .collect();
        let shown = if shown.is_empty() {
            "this call".to_owned()
        } else {
            shown
        };
        drain_briefly(request).await;
        return tonic::Status::unimplemented(format!(
            "{shown} is not served by Nightingale: it serves health, metadata, ModelInfer, ModelConfig, ModelStatistics and the repository calls; no streaming, shared memory, trace or log settings (docs/grpc.md)"
        ))
        .into_http();
    }
    let mut request = request;
    if let Some(rule) = rule {
        match auth::authorize(
            &state.auth,
            rule.access,
            request.headers(),
            request.extensions(),
            rule.method,
        ) {
            Ok(caller) => {
                if let Some(refused) = auth::refuse_rebinding(
                    rule.access,
                    state.auth.loopback_grpc_listener(),
                    &caller,
                    &request,
                    rule.method,
                ) {
                    drain_briefly(request).await;
                    return to_status(refused, &request_id).into_http();
                }
                request.extensions_mut().insert(Authorized(caller));
            }
            Err(denied) => {
                denied
                    .audit_if_admin(&state, rule.access, request.uri().path(), &request_id)
                    .await;
                // What the client is still sending is read briefly first, as for an
                // unserved method: answered at once, the stream's reset raced the client's
                // upload and curl saw an HTTP/2 stream error instead of the status (a
                // re-attack: 1 of 6 anonymous RepositoryModelLoad calls).
                drain_briefly(request).await;
                return to_status(denied.error, &request_id).into_http();
            }
        }
    }
    let mut timeout = state.config.request_timeout;
    if let Some(asked) = grpc_timeout(request.headers()) {
        timeout = timeout.min(asked);
    }
    // One deadline for the whole call, reading its message included: the handler's was set
    // anew once the message was in, so a call could take twice the request timeout (a
    // review's finding; HTTP answered 408).
    request
        .extensions_mut()
        .insert(CallDeadline(Instant::now() + timeout));
    if rule.is_some_and(|r| r.method == "ModelInfer") {
        let actor = request
            .extensions()
            .get::<Authorized>()
            .map(|a| a.0.id.clone());
        let mut head = Vec::new();
        return match admit_infer_message(&state, request, timeout, &mut head).await {
            Ok(request) => hold_ticket_until_sent(next.run(request).await),
            Err(e) => {
                audit_refused_infer(&state, &head, &request_id, actor, &e).await;
                to_status(e, &request_id).into_http()
            }
        };
    }
    match one_message(
        request,
        rule.map_or("", |r| r.method),
        timeout,
        state.config.max_body_bytes.min(UNARY_LIMIT),
    )
    .await
    {
        Ok(request) => next.run(request).await,
        Err(e) => to_status(e, &request_id).into_http(),
    }
}

/// Reads what a client sends on a call that is refused without its message: until the
/// client half-closes, [`DRAIN_BYTES`] are read or [`DRAIN_TIME`] passes. Answered before its
/// stream was read, such a call ended with RST_STREAM(NO_ERROR) while the client was still
/// sending, and grpc-core's asyncio client then reported `INTERNAL "Internal error from
/// Core"` for its failed send instead of the answer's reason (a review: 18 of 30
/// `stream_infer` calls). A client that keeps its stream open (tritonclient's `start_stream`)
/// gets the answer once the time is up.
async fn drain_briefly(request: axum::extract::Request) {
    use http_body_util::BodyExt as _;
    let mut body = request.into_body();
    let drain = async {
        let mut read = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                read = read.saturating_add(data.len());
                if read > DRAIN_BYTES {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
}

/// What [`drain_briefly`] reads at most.
const DRAIN_BYTES: usize = 1 << 20;
/// How long [`drain_briefly`] waits at most.
const DRAIN_TIME: Duration = Duration::from_millis(250);

/// The call's `grpc-encoding` (`None`: identity).
fn coding_of(headers: &axum::http::HeaderMap) -> Result<Option<super::Coding>, AppError> {
    match headers.get("grpc-encoding").map(|v| v.as_bytes()) {
        None | Some(b"identity") => Ok(None),
        Some(b"gzip") => Ok(Some(super::Coding::Gzip)),
        Some(b"deflate") => Ok(Some(super::Coding::Deflate)),
        Some(other) => Err(AppError::new(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "grpc-encoding {:?} is not supported (gzip, deflate or identity)",
                String::from_utf8_lossy(&other[..other.len().min(64)])
            ),
        )),
    }
}

/// `read`, unless the request deadline passes first (408: DEADLINE_EXCEEDED).
async fn within<T>(
    timeout: Duration,
    read: impl std::future::Future<Output = Result<T, AppError>>,
) -> Result<T, AppError> {
    tokio::time::timeout(timeout, read).await.map_err(|_| {
        AppError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request message did not arrive within {} ms",
                timeout.as_millis()
            ),
        )
    })?
}

/// The largest message of a call other than `ModelInfer` (health, metadata, repository and
/// statistics calls: a few names and parameters).
const UNARY_LIMIT: usize = 1 << 20;

/// The whole call of a method other than `ModelInfer`, read under the request deadline
/// (a stalled message ends in DEADLINE_EXCEEDED) and at most `limit` bytes, and checked to
/// be one message: a unary call that carries a second was answered for its first alone
/// (tonic reads one and leaves the rest), where gRPC makes it an error. A compressed message
/// is inflated here, at most `limit` bytes too, and goes on to tonic uncompressed (tonic
/// inflated it up to `max_body_bytes`: a 61 KB gzip `ServerLive` of 60 MB took seconds of
/// CPU before any credentials were read, a red-team finding).
async fn one_message(
    request: axum::extract::Request,
    method: &str,
    timeout: Duration,
    limit: usize,
) -> Result<axum::extract::Request, AppError> {
    use http_body_util::BodyExt as _;
    let (mut parts, body) = request.into_parts();
    let read = async {
        let mut body = body;
        let mut got: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                AppError::bad_request(format!("cannot read the request message: {e}"))
            })?;
            if let Ok(data) = frame.into_data() {
                if got.len().saturating_add(data.len()) > limit.saturating_add(5) {
                    return Err(AppError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("the request message is larger than the limit of {limit} bytes"),
                    ));
                }
                got.extend_from_slice(&data);
            }
        }
        Ok(got)
    };
    let mut got = within(timeout, read).await?;
    // As for ModelInfer: a call without a whole message, or with a compressed flag that is
    // neither 0 nor 1, is the client's error (INVALID_ARGUMENT), where tonic answered
    // INTERNAL, without the request id (a review's finding).
    if got.len() < 5 {
        return Err(AppError::bad_request("the call carries no request message"));
    }
    let declared = u32::from_be_bytes([got[1], got[2], got[3], got[4]]) as usize;
    if got.len() - 5 > declared {
        return Err(AppError::bad_request(
            "a unary call carries one request message; more followed it",
        ));
    }
    if got.len() - 5 < declared {
        return Err(AppError::bad_request("the request message is cut short"));
    }
    match got[0] {
        0 => {}
        1 => {
            let Some(coding) = coding_of(&parts.headers)? else {
                return Err(AppError::bad_request(
                    "the message is marked compressed but the call names no grpc-encoding (or identity)",
                ));
            };
            let message = inflate_small(&got[5..], coding, limit)?;
            got = Vec::with_capacity(5 + message.len());
            got.push(0);
            got.extend_from_slice(&(message.len() as u32).to_be_bytes());
            got.extend_from_slice(&message);
            parts.headers.remove("grpc-encoding");
        }
        _ => {
            return Err(AppError::bad_request(
                "the message's compressed flag is not 0 or 1",
            ));
        }
    }
    // The whole message, uncompressed (inflated above: checked once inflated, where an
    // inflated message was never checked and tonic answered INTERNAL: a re-attack's finding).
    decodes(method, &got[5..]).map_err(|e| {
        AppError::bad_request(format!("the {method} request message is malformed: {e}"))
    })?;
    Ok(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(got),
    ))
}

/// Whether `message` decodes as `method`'s request: one that does not is refused here
/// INVALID_ARGUMENT, where tonic answered INTERNAL (its answer to a decode error), which tells
/// a client the server failed rather than its message (a README known issue). At most
/// [`UNARY_LIMIT`] bytes, decoded again by tonic when sound.
fn decodes(method: &str, message: &[u8]) -> Result<(), prost::DecodeError> {
    match method {
        "ServerLive" => proto::ServerLiveRequest::decode(message).map(drop),
        "ServerReady" => proto::ServerReadyRequest::decode(message).map(drop),
        "ServerMetadata" => proto::ServerMetadataRequest::decode(message).map(drop),
        "ModelReady" => proto::ModelReadyRequest::decode(message).map(drop),
        "ModelMetadata" => proto::ModelMetadataRequest::decode(message).map(drop),
        "ModelConfig" => proto::ModelConfigRequest::decode(message).map(drop),
        "ModelStatistics" => proto::ModelStatisticsRequest::decode(message).map(drop),
        "RepositoryIndex" => proto::RepositoryIndexRequest::decode(message).map(drop),
        "RepositoryModelLoad" => proto::RepositoryModelLoadRequest::decode(message).map(drop),
        "RepositoryModelUnload" => proto::RepositoryModelUnloadRequest::decode(message).map(drop),
        _ => Ok(()),
    }
}

/// A small compressed message inflated, at most `limit` bytes (a MiB: this runs on the async
/// worker, as tonic's own inflation did).
fn inflate_small(
    compressed: &[u8],
    coding: super::Coding,
    limit: usize,
) -> Result<Vec<u8>, AppError> {
    use std::io::Read as _;
    let mut message = Vec::new();
    super::decoder(compressed, coding)
        .take(limit as u64 + 1)
        .read_to_end(&mut message)
        .map_err(|e| {
            AppError::bad_request(format!(
                "the request message does not decompress ({coding:?}): {e}"
            ))
        })?;
    if message.len() > limit {
        return Err(AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request message decompresses to more than the limit of {limit} bytes"),
        ));
    }
    Ok(message)
}

/// The path of every method of the KServe v2 service, before the method's name.
const SERVICE_PREFIX: &str = "/inference.GRPCInferenceService/";

/// The first bytes of a `ModelInfer` call kept to name the model of a call refused before its
/// message is decoded.
const HEAD_BYTES: usize = 4096;

/// The audit record of a `ModelInfer` call refused before its message was decoded (too large,
/// malformed, over the admission budget, too slow), as HTTP records the same refusals: when
/// the call's first bytes name a served model (a compressed message's do not: it is not
/// inflated for this). A call that names none reached no model and is not audited, as an
/// HTTP request to an unknown model is not.
async fn audit_refused_infer(
    state: &AppState,
    head: &[u8],
    request_id: &str,
    actor: Option<String>,
    refusal: &AppError,
) {
    if head.first() != Some(&0) {
        return;
    }
    let (Some(name), version) = grpc_wire::model_of(head.get(5..).unwrap_or_default()) else {
        return;
    };
    let Ok(call) = ModelCall::begin(
        state,
        Op::Infer,
        &name,
        version.as_deref().and_then(version_of),
        request_id.to_owned(),
        actor,
        None,
    ) else {
        return;
    };
    let refused: Result<(), AppError> = Err(AppError::new(refusal.status, refusal.message.clone()));
    // Its status is the refusal's; an audit failure changes nothing more here.
    let _ = call.finish(refused).await;
}

/// A `ModelInfer` message read and charged to the admission budget before tonic decodes it
/// (a message's decoded size can be ~150 times its size on the wire, and a gzip one's far
/// more): the whole call is read here under the request deadline, charged as it arrives as an
/// HTTP body is ([`super::read_body_admitted`]: a message still arriving holds its share, a
/// stalled one ends at the deadline), inflated here when compressed, and charged for what
/// decoding it will allocate ([`grpc_wire::infer_request_bound`]) before it takes its place
/// among the requests in flight. The ticket goes to [`Service::model_infer`] in the request's
/// extensions; the message goes on to tonic uncompressed.
async fn admit_infer_message(
    state: &AppState,
    request: axum::extract::Request,
    timeout: Duration,
    head: &mut Vec<u8>,
) -> Result<axum::extract::Request, AppError> {
    let (mut parts, body) = request.into_parts();
    let coding = coding_of(&parts.headers)?;
    let limit = state.config.max_body_bytes;
    let too_large = |n: usize| {
        AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request message is larger than the limit of {limit} bytes (max_body_bytes; {n} received)"
            ),
        )
    };
    let mut ticket = state.admission.receiving()?;
    // One message: a compressed flag, a 4-byte length, the message. A length over the limit
    // is refused from the prefix, before the message is read.
    let read = async {
        use http_body_util::BodyExt as _;
        let mut body = body;
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut got = 0usize;
        // The call's length once its prefix is in.
        let mut whole: Option<usize> = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                AppError::bad_request(format!("cannot read the request message: {e}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            got = got.saturating_add(data.len());
            if got > limit.saturating_add(5) {
                return Err(too_large(got));
            }
            // Charged as it arrives, as an HTTP body is (a message still arriving holds
            // its share; one the budget has no room for is refused as it comes).
            if head.len() < HEAD_BYTES {
                head.extend_from_slice(&data[..data.len().min(HEAD_BYTES - head.len())]);
            }
            ticket.charge(data.len().saturating_mul(BODY_CHARGE_FACTOR))?;
            chunks.push(data);
            if whole.is_none() && got >= 5 {
                let mut prefix = [0u8; 5];
                for (slot, b) in prefix.iter_mut().zip(chunks.iter().flat_map(|c| c.iter())) {
                    *slot = *b;
                }
                let declared = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
                if declared as usize > limit {
                    return Err(AppError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "the request message declares {declared} bytes, more than the limit of {limit} (max_body_bytes)"
                        ),
                    ));
                }
                whole = Some(5 + declared as usize);
            }
            // The message is in: its call is answered without waiting for the stream's end
            // (a client may end it in a frame of its own, one more wake-up away), as tonic
            // does; data already there after it is a second message, refused below.
            if whole.is_some_and(|w| got >= w) {
                use futures_util::FutureExt as _;
                if let Some(Some(Ok(more))) = body.frame().now_or_never()
                    && more.data_ref().is_some_and(|d| !d.is_empty())
                {
                    return Err(AppError::bad_request(
                        "a unary call carries one request message; more followed it",
                    ));
                }
                break;
            }
        }
        Ok(match chunks.len() {
            1 => chunks.pop().unwrap_or_default(),
            _ => Bytes::from(chunks.concat()),
        })
    };
    let body = within(timeout, read).await?;
    if body.len() < 5 {
        return Err(AppError::bad_request("the call carries no request message"));
    }
    let declared = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if body.len() - 5 != declared {
        return Err(AppError::bad_request(if body.len() - 5 < declared {
            "the request message is cut short"
        } else {
            "a unary call carries one request message; more followed it"
        }));
    }
    let message = match (body[0], coding) {
        (0, _) => body.slice(5..),
        (1, Some(coding)) => super::inflate(&body[5..], coding, limit, &mut ticket).await?,
        (1, None) => {
            return Err(AppError::bad_request(
                "the message is marked compressed but the call names no grpc-encoding (or identity)",
            ));
        }
        _ => {
            return Err(AppError::bad_request(
                "the message's compressed flag is not 0 or 1",
            ));
        }
    };
    let bound = grpc_wire::infer_request_bound(&message).map_err(|why| {
        AppError::bad_request(format!("the ModelInferRequest message is refused: {why}"))
    })?;
    ticket.charge(bound)?;
    ticket.take_place(&state.admission)?;
    parts.headers.remove("grpc-encoding");
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts
        .extensions
        .insert(Admitted(Arc::new(std::sync::Mutex::new(Some(ticket)))));
    // On to tonic as one uncompressed message: the bytes as they came when they were not
    // compressed (no copy), else the inflated message behind a new prefix.
    let framed = if body[0] == 0 {
        body
    } else {
        let mut framed = Vec::with_capacity(5 + message.len());
        framed.push(0);
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        Bytes::from(framed)
    };
    Ok(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(framed),
    ))
}

/// The answer of a `ModelInfer` call, its admission ticket (put in the response's extensions
/// by [`Service::model_infer`]) held by its body until the body has been sent or dropped, as
/// an HTTP answer's body holds its own: dropped with the extensions, the ticket gave the
/// answer's budget back when hyper took the response head, while the encoded message still
/// waited for a client that read nothing (red-team finding, as over HTTP).
fn hold_ticket_until_sent(response: axum::response::Response) -> axum::response::Response {
    let (mut parts, body) = response.into_parts();
    let Some(ticket) = parts.extensions.remove::<Arc<Ticket>>() else {
        return axum::response::Response::from_parts(parts, body);
    };
    axum::response::Response::from_parts(
        parts,
        axum::body::Body::new(super::Holding::new(body, ticket)),
    )
}

/// The admission ticket [`admit_infer_message`] charged for a `ModelInfer` message.
#[derive(Clone)]
struct Admitted(Arc<std::sync::Mutex<Option<Ticket>>>);

/// The caller [`before_the_message`] authorised.
#[derive(Clone)]
struct Authorized(Caller);

/// When the call must be answered by, set as it arrived ([`before_the_message`]).
#[derive(Clone, Copy)]
struct CallDeadline(Instant);

struct Service {
    state: Arc<AppState>,
}

/// A call that passed the role check.
struct Call<T> {
    caller: Caller,
    request_id: String,
    deadline: Instant,
    message: T,
}

impl Service {
    /// Checks the caller against the method's row, then runs `handler` under the request
    /// deadline (the HTTP `--request-timeout`, or the client's `grpc-timeout` if sooner) in a
    /// span with the request id, which the answer carries back as `x-request-id`.
    async fn serve<T, R, F, Fut>(
        &self,
        method: &'static str,
        request: Request<T>,
        handler: F,
    ) -> Result<Response<R>, Status>
    where
        F: FnOnce(Arc<AppState>, Call<T>) -> Fut,
        Fut: Future<Output = Result<R, AppError>>,
    {
        let (metadata, extensions, message) = request.into_parts();
        let headers = metadata.into_headers();
        let request_id = request_id(&headers);
        let Some(rule) = auth::grpc_rule_for(method) else {
            tracing::error!(
                method,
                "gRPC method without a row in the role table: refused"
            );
            return Err(to_status(
                AppError::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "{method} declares no role, so it is refused (a server bug: please report it)"
                    ),
                ),
                &request_id,
            ));
        };
        let caller = match extensions.get::<Authorized>() {
            Some(Authorized(caller)) => caller.clone(),
            None => auth::authorize(&self.state.auth, rule.access, &headers, &extensions, method)
                .map_err(|denied| to_status(denied.error, &request_id))?,
        };
        let mut timeout = self.state.config.request_timeout;
        if let Some(asked) = grpc_timeout(&headers) {
            timeout = timeout.min(asked);
        }
        let deadline = match extensions.get::<CallDeadline>() {
            Some(CallDeadline(at)) => (*at).min(Instant::now() + timeout),
            None => Instant::now() + timeout,
        };
        let call = Call {
            caller,
            request_id: request_id.clone(),
            deadline,
            message,
        };
        let span = tracing::info_span!("grpc", method, request_id = %request_id);
        let result = crate::audit::within_deadline(
            deadline.into(),
            handler(self.state.clone(), call).instrument(span),
        )
        .await
        .unwrap_or_else(|| {
            Err(AppError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request did not complete within {} ms",
                    timeout.as_millis()
                ),
            ))
        });
        match result {
            Ok(message) => {
                let mut response = Response::new(message);
                if let Ok(v) = request_id.parse() {
                    response.metadata_mut().insert("x-request-id", v);
                }
                Ok(response)
            }
            Err(e) => Err(to_status(e, &request_id)),
        }
    }
}

/// The client's `x-request-id` when usable as HTTP takes it (1 to 128 visible ASCII
/// characters: [`super::is_usable_request_id`]), else a new UUID.
fn request_id(headers: &HeaderMap) -> String {
    match headers.get("x-request-id") {
        Some(id) if super::is_usable_request_id(id.as_bytes()) => {
            String::from_utf8_lossy(id.as_bytes()).into_owned()
        }
        _ => uuid::Uuid::new_v4().to_string(),
    }
}

/// The `grpc-timeout` header: an integer of up to 8 digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn to_status(e: AppError, request_id: &str) -> Status {
    let mut status = Status::from(e);
    if let Ok(v) = request_id.parse() {
        status.metadata_mut().insert("x-request-id", v);
    }
    status
}

fn version_of(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

#[tonic::async_trait]
impl GrpcInferenceService for Service {
    async fn server_live(
        &self,
        request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        self.serve("ServerLive", request, |_, _| async {
            Ok(ServerLiveResponse { live: true })
        })
        .await
    }

    async fn server_ready(
        &self,
        request: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        self.serve("ServerReady", request, |state, _| async move {
            Ok(ServerReadyResponse {
                ready: state.is_ready() && state.audit.is_writable(),
            })
        })
        .await
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        self.serve("ModelReady", request, |state, call| async move {
            let m = call.message;
            // As over HTTP, where an unknown or unready model answers 404/503 and clients
            // read "not ready": the answer is false, not an error.
            Ok(ModelReadyResponse {
                ready: state
                    .repository
                    .get(&m.name, version_of(&m.version))
                    .is_ok()
                    && state.audit.is_writable(),
            })
        })
        .await
    }

    async fn server_metadata(
        &self,
        request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        self.serve("ServerMetadata", request, |_, _| async {
            Ok(ServerMetadataResponse {
                name: "nightingale".to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                // Explanations are served over HTTP only: a gRPC client shown the
                // extension found nothing to call (a red-team finding).
                extensions: v2::EXTENSIONS
                    .iter()
                    .filter(|e| **e != "nightingale_explain")
                    .map(|e| (*e).to_owned())
                    .collect(),
            })
        })
        .await
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        self.serve("ModelMetadata", request, |state, call| async move {
            let m = call.message;
            let version = version_of(&m.version);
            let model = state.model(&m.name, version)?;
            let meta = model.worker.metadata();
            let spec = |s: &nightingale_inference::TensorSpec| TensorMetadata {
                name: s.name.clone(),
                datatype: s.datatype.as_str().to_owned(),
                shape: s.shape.clone(),
            };
            Ok(ModelMetadataResponse {
                name: model.name.clone(),
                versions: v2::served_versions(&state, &model, version.is_none()),
                platform: model.manifest.platform.clone(),
                inputs: meta.inputs.iter().map(spec).collect(),
                outputs: meta.outputs.iter().map(spec).collect(),
            })
        })
        .await
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        self.serve("ModelConfig", request, |state, call| async move {
            let m = call.message;
            let model = state.model(&m.name, version_of(&m.version))?;
            Ok(ModelConfigResponse {
                config: Some(model_config_message(model_config::of(&state, &model))),
            })
        })
        .await
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let ticket = request
            .extensions()
            .get::<Admitted>()
            .and_then(|a| a.0.lock().unwrap_or_else(|p| p.into_inner()).take());
        let response = self
            .serve("ModelInfer", request, |state, call| async move {
                let message = call.message;
                let mut model_call = ModelCall::begin(
                    &state,
                    Op::Infer,
                    &message.model_name,
                    version_of(&message.model_version),
                    call.request_id,
                    Some(call.caller.id.clone()),
                    Some(call.deadline),
                )?;
                let model = model_call.model.clone();
                let result = infer(&state, &model, message, ticket, model_call.audit()).await;
                model_call.finish(result).await
            })
            .await?;
        // The admission ticket goes with the answer (in its extensions, dropped once the
        // HTTP/2 layer has taken the response), as an HTTP body holds it until sent.
        let (metadata, (message, ticket), mut extensions) = response.into_parts();
        extensions.insert(Arc::new(ticket));
        Ok(Response::from_parts(metadata, message, extensions))
    }

    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        self.serve("ModelStatistics", request, |state, call| async move {
            let m = call.message;
            let models: Vec<Arc<LoadedModel>> = if m.name.is_empty() {
                state.repository.loaded()
            } else if let Some(version) = version_of(&m.version) {
                vec![state.model(&m.name, Some(version))?]
            } else {
                // Every served version, as Triton does when no version is named.
                state.model(&m.name, None)?;
                state
                    .repository
                    .loaded()
                    .into_iter()
                    .filter(|l| l.name == m.name)
                    .collect()
            };
            Ok(ModelStatisticsResponse {
                model_stats: models.iter().map(|l| statistics(l)).collect(),
            })
        })
        .await
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        self.serve("RepositoryIndex", request, |state, call| async move {
            one_repository(&call.message.repository_name)?;
            let ready_only = call.message.ready;
            let repository = state.repository.clone();
            let entries = tokio::task::spawn_blocking(move || repository.index())
                .await
                .map_err(|e| AppError::internal(e.to_string()))?;
            Ok(RepositoryIndexResponse {
                models: entries
                    .into_iter()
                    .filter(|e| !ready_only || e.state == ModelState::Ready)
                    .map(|e| proto::repository_index_response::ModelIndex {
                        reason: match &e.state {
                            ModelState::Unavailable { reason } => reason.clone(),
                            _ => String::new(),
                        },
                        state: e.state.as_str().to_owned(),
                        version: e.version.map(|v| v.to_string()).unwrap_or_default(),
                        name: e.name,
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        self.serve("RepositoryModelLoad", request, |state, call| async move {
            let m = call.message;
            one_repository(&m.repository_name)?;
            let (target, release) = load_target(&m.parameters)?;
            deploy::load_release(
                &state,
                &m.model_name,
                target,
                release,
                &call.caller.id,
                &call.request_id,
            )
            .await?;
            Ok(RepositoryModelLoadResponse {})
        })
        .await
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.serve("RepositoryModelUnload", request, |state, call| async move {
            one_repository(&call.message.repository_name)?;
            // As over HTTP: an unload takes every version; a parameter other than Triton's
            // `unload_dependents` is refused rather than ignored.
            if let Some(key) = call
                .message
                .parameters
                .keys()
                .find(|k| *k != "unload_dependents")
            {
                return Err(AppError::bad_request(format!(
                    "unload parameter {:?} is not supported: an unload takes every version of the model (to serve one version alone, load with the parameter \"version\")",
                    key.chars().take(64).collect::<String>()
                )));
            }
            deploy::unload(
                &state,
                &call.message.model_name,
                &call.caller.id,
                &call.request_id,
            )
            .await?;
            Ok(RepositoryModelUnloadResponse {})
        })
        .await
    }
}

/// A repository call names no repository, or the one this server serves: Triton refuses a
/// `repository_name` it cannot honour rather than act on another repository (a call naming
/// one was answered from, and loaded and unloaded in, the only one).
fn one_repository(name: &str) -> Result<(), AppError> {
    if name.is_empty() {
        return Ok(());
    }
    Err(AppError::bad_request(format!(
        "repository_name {:?} is not supported: this server serves one model repository (leave it empty)",
        name.chars().take(64).collect::<String>()
    )))
}

/// A load's target from its parameters: the version policy, or `version` to roll back to
/// (as over HTTP; Triton's `config`/`file:` parameters are not supported).
fn load_target(
    parameters: &HashMap<String, proto::ModelRepositoryParameter>,
) -> Result<(LoadTarget, Option<u64>), AppError> {
    use proto::model_repository_parameter::ParameterChoice as P;
    let mut target = LoadTarget::Policy;
    let mut release = None;
    for (key, value) in parameters {
        if key != "version" && key != "release" {
            return Err(AppError::bad_request(format!(
                "load parameter {:?} is not supported (only \"version\", to roll back, and \"release\", to serve an older release of the manifest)",
                key.chars().take(64).collect::<String>()
            )));
        }
        let n = match &value.parameter_choice {
            Some(P::StringParam(s)) => nightingale_models::manifest::parse_version(s),
            Some(P::Int64Param(n)) => u64::try_from(*n).ok().filter(|&v| v > 0),
            _ => None,
        }
        .ok_or_else(|| {
            AppError::bad_request(format!(
                "parameter {key:?} must be a positive integer of at most 19 digits, e.g. \"1\""
            ))
        })?;
        if key == "version" {
            target = LoadTarget::Version(n);
        } else {
            release = Some(n);
        }
    }
    Ok((target, release))
}

/// Statistics as over HTTP (`GET /v2/models/{m}/stats`), in the proto's messages.
fn statistics(model: &LoadedModel) -> proto::ModelStatistics {
    let s: StatsSnapshot = model.worker.stats().snapshot();
    let d = |d: StatDuration| {
        Some(proto::StatisticDuration {
            count: d.count,
            ns: d.ns,
        })
    };
    proto::ModelStatistics {
        name: model.name.clone(),
        version: model.version.to_string(),
        last_inference: s.last_inference,
        inference_count: s.inference_count,
        execution_count: s.execution_count,
        inference_stats: Some(proto::InferStatistics {
            success: d(s.success),
            fail: d(s.fail),
            queue: d(s.queue),
            compute_input: d(s.compute_input),
            compute_infer: d(s.compute_infer),
            compute_output: d(s.compute_output),
            cache_hit: d(Default::default()),
            cache_miss: d(Default::default()),
        }),
        batch_stats: s
            .batch_stats
            .iter()
            .map(|b| proto::InferBatchStatistics {
                batch_size: b.batch_size as u64,
                compute_input: d(b.compute_input),
                compute_infer: d(b.compute_infer),
                compute_output: d(b.compute_output),
            })
            .collect(),
        memory_usage: vec![],
        response_stats: HashMap::new(),
    }
}

/// One inference: admission (the message's bytes, then what its decoded tensors take beyond
/// them), decode, the shared middle ([`v2::infer_decoded`]), encode. `admitted`: the ticket
/// [`admit_infer_message`] charged before the message was decoded.
async fn infer(
    state: &AppState,
    model: &LoadedModel,
    message: ModelInferRequest,
    admitted: Option<Ticket>,
    audit: &mut crate::audit::AuditEvent,
) -> Result<(ModelInferResponse, Ticket), AppError> {
    let mut ticket = match admitted {
        Some(t) => t,
        None => state.admission.admit()?,
    };
    // The message as an HTTP body of its length is charged (already, when it was admitted
    // before decoding).
    let wire = message.encoded_len();
    ticket.charge_at_least(wire.saturating_mul(BODY_CHARGE_FACTOR))?;
    let (request, _) = decode_request(message, &model.worker.metadata().inputs, &mut |n| {
        ticket.charge(n)
    })?;
    let decoded: usize = request.inputs.iter().map(|t| t.tensor.memory_len()).sum();
    ticket.charge_at_least(wire.saturating_add(decoded))?;
    // The outputs the model will make, as far as its declared shapes tell, before it runs.
    ticket.charge_answer_more(v2::declared_outputs_len(model, &request))?;
    let id = request.id.clone();
    let (outputs, _) = v2::infer_decoded(model, request, audit).await?;
    // The answer is held until the client has taken it: charged like an HTTP answer
    // ([`v2::respond`]), before it is made (the outputs and their encoding); one the budget
    // has no room for now is refused after the model ran (its audit record stands), as
    // over HTTP.
    let bound = outputs
        .iter()
        .map(|o| {
            let t = o
                .data
                .as_ref()
                .map_or(0, |d| d.0.memory_len() + d.0.raw_len());
            t.saturating_add(256 + o.name.len())
        })
        .fold(4096usize, usize::saturating_add);
    ticket.charge_answer(bound).inspect_err(|_| {
        tracing::warn!(
            bytes = bound,
            "an answer was refused: no room for it in the in-flight memory budget"
        );
    })?;
    let answer = encode_response(model, id, outputs);
    ticket.hold(answer.encoded_len()).inspect_err(|_| {
        tracing::warn!(
            bytes = answer.encoded_len(),
            "an answer was refused: no room for it in the in-flight memory budget"
        );
    })?;
    ticket.release_place();
    Ok((answer, ticket))
}

/// A `ModelInferRequest` as the codec-neutral [`DecodedRequest`], and whether the outputs go
/// back as `raw_output_contents` (the inputs came raw, as tritonclient sends them) or as typed
/// `contents` (the inputs came typed).
fn decode_request(
    message: ModelInferRequest,
    specs: &[nightingale_inference::TensorSpec],
    reserve: &mut dyn FnMut(usize) -> Result<(), AppError>,
) -> Result<(DecodedRequest, bool), AppError> {
    let ModelInferRequest {
        id,
        parameters,
        inputs: wire_inputs,
        outputs: wire_outputs,
        raw_input_contents: raw,
        ..
    } = message;
    if wire_inputs.is_empty() {
        return Err(AppError::bad_request("the request has no inputs"));
    }
    if id.len() > codec::MAX_REQUEST_ID_BYTES {
        return Err(AppError::bad_request(format!(
            "an id of {} bytes where at most {} are taken",
            id.len(),
            codec::MAX_REQUEST_ID_BYTES
        )));
    }
    // As over HTTP: at most MAX_PARAMETERS in one parameters map (the request's, an input's,
    // an output's).
    let too_many = parameters.len() > codec::MAX_PARAMETERS
        || wire_inputs
            .iter()
            .any(|i| i.parameters.len() > codec::MAX_PARAMETERS)
        || wire_outputs
            .iter()
            .any(|o| o.parameters.len() > codec::MAX_PARAMETERS);
    if too_many {
        return Err(AppError::bad_request(format!(
            "more than {} parameters",
            codec::MAX_PARAMETERS
        )));
    }
    if !raw.is_empty() && raw.len() != wire_inputs.len() {
        return Err(AppError::bad_request(format!(
            "raw_input_contents has {} entries for {} inputs: when it is used, it holds every input's data, in the order of the inputs",
            raw.len(),
            wire_inputs.len()
        )));
    }
    let mut check = codec::InputCheck::new(specs);
    let mut inputs: Vec<NamedTensor> = Vec::with_capacity(wire_inputs.len().min(specs.len()));
    for (i, input) in wire_inputs.into_iter().enumerate() {
        let InferInputTensor {
            name,
            datatype,
            shape,
            contents,
            parameters,
        } = input;
        if let Some(key) = parameters.keys().find(|k| k.starts_with("shared_memory_")) {
            return Err(AppError::bad_request(format!(
                "input {name:?}: parameter {key:?}: shared memory is not supported by this server; send the input inline"
            )));
        }
        let (datatype, shape, count) = codec::input_header(&name, &datatype, &shape)?;
        check.admit(&name, datatype)?;
        if datatype == DataType::Bytes {
            reserve(count.saturating_mul(codec::BYTES_ELEMENT_MIN))?;
        }
        let tensor = match (raw.get(i), contents) {
            (Some(_), Some(_)) => {
                return Err(AppError::bad_request(format!(
                    "input {name:?} has both contents and raw_input_contents"
                )));
            }
            (Some(bytes), None) => Tensor::from_raw(datatype, shape, bytes)
                .map_err(|e| AppError::bad_request(format!("input {name:?}: {e}")))?,
            (None, Some(contents)) => typed_tensor(datatype, shape, count, contents)
                .map_err(|e| AppError::bad_request(format!("input {name:?}: {e}")))?,
            (None, None) => {
                return Err(AppError::bad_request(format!(
                    "input {name:?} has neither contents nor raw_input_contents"
                )));
            }
        };
        inputs.push(NamedTensor::new(name, tensor));
    }
    codec::check_unique_outputs(wire_outputs.iter().map(|o| o.name.as_str()))?;
    let mut outputs: Vec<OutputChoice> = Vec::with_capacity(wire_outputs.len());
    for InferRequestedOutputTensor { name, parameters } in wire_outputs {
        // As over HTTP: no shared-memory extension, so an output asked into a region is
        // refused rather than answered inline.
        if let Some(key) = parameters.keys().find(|k| k.starts_with("shared_memory_")) {
            return Err(AppError::bad_request(format!(
                "output {name:?}: parameter {key:?}: shared memory is not supported by this server; ask for the output inline"
            )));
        }
        let classification = match parameters
            .get("classification")
            .and_then(|p| p.parameter_choice.as_ref())
        {
            None => None,
            Some(ParameterChoice::Int64Param(n)) => Some(usize::try_from(*n).map_err(|_| {
                AppError::bad_request("parameter \"classification\" must be a non-negative integer")
            })?),
            Some(ParameterChoice::Uint64Param(n)) => Some(usize::try_from(*n).map_err(|_| {
                AppError::bad_request("parameter \"classification\" must be a non-negative integer")
            })?),
            Some(_) => {
                return Err(AppError::bad_request(
                    "parameter \"classification\" must be a non-negative integer",
                ));
            }
        };
        outputs.push(OutputChoice {
            name,
            binary: None,
            classification,
        });
    }
    let raw_out = !raw.is_empty();
    Ok((
        DecodedRequest {
            id: (!id.is_empty()).then_some(id),
            inputs,
            outputs: (!outputs.is_empty()).then_some(outputs),
            binary_default: raw_out,
            parameters: parameters
                .into_iter()
                .map(|(k, v)| (k, parameter_json(v)))
                .collect(),
        },
        raw_out,
    ))
}

fn parameter_json(p: InferParameter) -> serde_json::Value {
    match p.parameter_choice {
        None => serde_json::Value::Null,
        Some(ParameterChoice::BoolParam(b)) => b.into(),
        Some(ParameterChoice::Int64Param(n)) => n.into(),
        Some(ParameterChoice::Uint64Param(n)) => n.into(),
        Some(ParameterChoice::DoubleParam(x)) => x.into(),
        Some(ParameterChoice::StringParam(s)) => s.into(),
    }
}

/// A tensor from typed `contents`: the field of the datatype (INT8-INT32 in `int_contents`,
/// UINT8-UINT32 in `uint_contents`, ...) must hold exactly the shape's element count, each in
/// the datatype's range. FP16 has no typed field: it goes raw.
fn typed_tensor(
    datatype: DataType,
    shape: Vec<usize>,
    count: usize,
    c: InferTensorContents,
) -> Result<Tensor, String> {
    fn take<S, T: Element>(
        datatype: DataType,
        shape: Vec<usize>,
        count: usize,
        values: Vec<S>,
        convert: impl Fn(S) -> Option<T>,
    ) -> Result<Tensor, String> {
        if values.len() != count {
            return Err(codec::element_count_mismatch(
                &shape,
                count,
                datatype,
                values.len(),
            ));
        }
        let values = values
            .into_iter()
            .map(convert)
            .collect::<Option<Vec<T>>>()
            .ok_or_else(|| format!("contents hold a value out of range for {datatype}"))?;
        Tensor::from_vec(shape, values).map_err(|e| e.to_string())
    }
    use DataType as D;
    // Values in another field than the datatype's own are refused, not dropped unseen (and
    // undigested): a red-team finding.
    let filled: Vec<&str> = [
        ("bool_contents", !c.bool_contents.is_empty()),
        ("int_contents", !c.int_contents.is_empty()),
        ("int64_contents", !c.int64_contents.is_empty()),
        ("uint_contents", !c.uint_contents.is_empty()),
        ("uint64_contents", !c.uint64_contents.is_empty()),
        ("fp32_contents", !c.fp32_contents.is_empty()),
        ("fp64_contents", !c.fp64_contents.is_empty()),
        ("bytes_contents", !c.bytes_contents.is_empty()),
    ]
    .into_iter()
    .filter_map(|(name, filled)| filled.then_some(name))
    .collect();
    let own = match datatype {
        D::Bool => "bool_contents",
        D::Int8 | D::Int16 | D::Int32 => "int_contents",
        D::Int64 => "int64_contents",
        D::Uint8 | D::Uint16 | D::Uint32 => "uint_contents",
        D::Uint64 => "uint64_contents",
        D::Fp32 => "fp32_contents",
        D::Fp64 => "fp64_contents",
        D::Bytes => "bytes_contents",
        D::Fp16 => "",
    };
    if let Some(other) = filled.iter().find(|f| **f != own) {
        return Err(format!(
            "contents hold {other}, which is not {datatype}'s field{}",
            if own.is_empty() {
                String::new()
            } else {
                format!(" ({own})")
            }
        ));
    }
    let (d, s, n) = (datatype, shape, count);
    match datatype {
        D::Bool => take(d, s, n, c.bool_contents, Some),
        D::Int8 => take(d, s, n, c.int_contents, |x| i8::try_from(x).ok()),
        D::Int16 => take(d, s, n, c.int_contents, |x| i16::try_from(x).ok()),
        D::Int32 => take(d, s, n, c.int_contents, Some),
        D::Int64 => take(d, s, n, c.int64_contents, Some),
        D::Uint8 => take(d, s, n, c.uint_contents, |x| u8::try_from(x).ok()),
        D::Uint16 => take(d, s, n, c.uint_contents, |x| u16::try_from(x).ok()),
        D::Uint32 => take(d, s, n, c.uint_contents, Some),
        D::Uint64 => take(d, s, n, c.uint64_contents, Some),
        D::Fp32 => take(d, s, n, c.fp32_contents, Some),
        D::Fp64 => take(d, s, n, c.fp64_contents, Some),
        D::Bytes => take(d, s, n, c.bytes_contents, Some),
        D::Fp16 => Err("FP16 has no typed contents field: send it in raw_input_contents".into()),
    }
}

/// The answer: outputs in `raw_output_contents` whatever the request's inputs came in, as
/// Triton answers (typed requests got typed `contents` back, which tritonclient.grpc's
/// `InferResult.as_numpy`, and any client built against Triton, cannot read: a review's
/// finding).
fn encode_response(
    model: &LoadedModel,
    id: Option<String>,
    outputs: Vec<OutputTensor>,
) -> ModelInferResponse {
    let mut tensors = Vec::with_capacity(outputs.len());
    let mut raw_output_contents = Vec::with_capacity(outputs.len());
    for o in outputs {
        let Some(codec::JsonData(tensor)) = o.data else {
            continue;
        };
        let mut bytes = Vec::with_capacity(tensor.raw_len());
        tensor.write_raw(&mut bytes);
        raw_output_contents.push(Bytes::from(bytes));
        tensors.push(InferOutputTensor {
            name: o.name,
            datatype: o.datatype.as_str().to_owned(),
            shape: tensor.shape().iter().map(|&d| d as i64).collect(),
            parameters: HashMap::new(),
            contents: None,
        });
    }
    ModelInferResponse {
        model_name: model.name.clone(),
        model_version: model.version.to_string(),
        id: id.unwrap_or_default(),
        parameters: HashMap::new(),
        outputs: tensors,
        raw_output_contents,
    }
}

/// Triton's `ModelConfig` message from the configuration the HTTP route answers in JSON.
fn model_config_message(c: model_config::ModelConfig) -> proto::ModelConfig {
    use proto::model_version_policy::{All, Latest, PolicyChoice, Specific};
    let data_type = |name: &str| proto::DataType::from_str_name(name).unwrap_or_default() as i32;
    proto::ModelConfig {
        name: c.name,
        platform: c.platform,
        backend: c.backend,
        version_policy: Some(proto::ModelVersionPolicy {
            policy_choice: Some(match c.version_policy {
                model_config::VersionPolicy::Latest { num_versions } => {
                    PolicyChoice::Latest(Latest { num_versions })
                }
                model_config::VersionPolicy::All {} => PolicyChoice::All(All {}),
                model_config::VersionPolicy::Specific { versions } => {
                    PolicyChoice::Specific(Specific { versions })
                }
            }),
        }),
        max_batch_size: c.max_batch_size,
        input: c
            .input
            .into_iter()
            .map(|t| proto::ModelInput {
                data_type: data_type(t.data_type),
                format: t
                    .format
                    .and_then(proto::model_input::Format::from_str_name)
                    .unwrap_or_default() as i32,
                name: t.name,
                dims: t.dims,
            })
            .collect(),
        output: c
            .output
            .into_iter()
            .map(|t| proto::ModelOutput {
                data_type: data_type(t.data_type),
                name: t.name,
                dims: t.dims,
            })
            .collect(),
        scheduling_choice: c.dynamic_batching.map(|b| {
            proto::model_config::SchedulingChoice::DynamicBatching(proto::ModelDynamicBatching {
                preferred_batch_size: b.preferred_batch_size,
                max_queue_delay_microseconds: b.max_queue_delay_microseconds,
            })
        }),
        instance_group: c
            .instance_group
            .into_iter()
            .map(|g| proto::ModelInstanceGroup {
                kind: proto::model_instance_group::Kind::from_str_name(g.kind).unwrap_or_default()
                    as i32,
                name: g.name,
                count: g.count,
                gpus: g.gpus,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same rule as HTTP's: a usable id is kept whole, anything else becomes a UUID (an id
    /// with a space was stored as sent; a 200-character one was cut to 128, so two clients'
    /// ids could collide in the audit trail).
    #[test]
    fn request_ids_follow_the_http_rule() {
        let with = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert(
                "x-request-id",
                axum::http::HeaderValue::from_bytes(v).unwrap(),
            );
            request_id(&h)
        };
        assert_eq!(with(b"req-1"), "req-1");
        assert_eq!(with(&[b'a'; 128]), "a".repeat(128));
        for bad in [&b"has space"[..], &[b'a'; 129], b"\xc3\xa9t\xc3\xa9"] {
            let id = with(bad);
            assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
        }
        assert!(uuid::Uuid::parse_str(&request_id(&HeaderMap::new())).is_ok());
    }

    /// As over HTTP, a parameters map holds at most 256 entries (gRPC took 30,000: a
    /// red-team finding).
    #[test]
    fn parameters_are_bounded_as_over_http() {
        let spec = nightingale_inference::TensorSpec {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![-1, 1],
        };
        let request = |n: usize| ModelInferRequest {
            inputs: vec![proto::model_infer_request::InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![1, 1],
                parameters: Default::default(),
                contents: Some(InferTensorContents {
                    fp32_contents: vec![1.0],
                    ..Default::default()
                }),
            }],
            parameters: (0..n)
                .map(|i| (i.to_string(), proto::InferParameter::default()))
                .collect(),
            ..Default::default()
        };
        let mut reserve = |_| Ok(());
        let e = decode_request(request(257), std::slice::from_ref(&spec), &mut reserve)
            .err()
            .unwrap();
        assert!(
            e.message.contains("more than 256 parameters"),
            "{}",
            e.message
        );
        assert!(decode_request(request(256), std::slice::from_ref(&spec), &mut reserve).is_ok());
    }

    /// Every RPC of the proto has a row in the role table, and every row an RPC: a method
    /// added to the proto without its role is caught here (and refused at run time).
    #[test]
    fn every_rpc_has_one_role_row() {
        let proto = include_str!("../../proto/grpc_service.proto");
        let mut rpcs: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| l.split('(').next().unwrap_or_default())
            .collect();
        let mut rows: Vec<&str> = auth::GRPC_METHODS.iter().map(|r| r.method).collect();
        rpcs.sort_unstable();
        rows.sort_unstable();
        assert_eq!(rpcs, rows);
    }

    #[test]
    fn http_statuses_become_grpc_codes_with_the_same_message() {
        use tonic::Code;
        for (status, code) in [
            (StatusCode::BAD_REQUEST, Code::InvalidArgument),
            (StatusCode::UNAUTHORIZED, Code::Unauthenticated),
            (StatusCode::FORBIDDEN, Code::PermissionDenied),
            (StatusCode::NOT_FOUND, Code::NotFound),
            (StatusCode::REQUEST_TIMEOUT, Code::DeadlineExceeded),
            (StatusCode::PAYLOAD_TOO_LARGE, Code::ResourceExhausted),
            (StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable),
            (StatusCode::INTERNAL_SERVER_ERROR, Code::Internal),
        ] {
            let s = Status::from(AppError::new(status, "why"));
            assert_eq!((s.code(), s.message()), (code, "why"), "{status}");
        }
        let s = Status::from(AppError::overloaded("full"));
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.metadata().get("retry-after").unwrap(), "1");
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit() {
        let mut h = HeaderMap::new();
        for (text, want) in [
            ("5S", Some(Duration::from_secs(5))),
            ("250m", Some(Duration::from_millis(250))),
            ("1H", Some(Duration::from_secs(3600))),
            ("7u", Some(Duration::from_micros(7))),
            ("x", None),
            ("5", None),
            ("123456789S", None),
        ] {
            h.insert("grpc-timeout", text.parse().unwrap());
            assert_eq!(grpc_timeout(&h), want, "{text}");
        }
    }

    #[test]
    fn typed_contents_check_count_and_range() {
        let c = InferTensorContents {
            int_contents: vec![1, 300],
            ..Default::default()
        };
        let e = typed_tensor(DataType::Int8, vec![2], 2, c).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let c = InferTensorContents {
            fp32_contents: vec![1.0; 3],
            ..Default::default()
        };
        let e = typed_tensor(DataType::Fp32, vec![1, 2], 2, c).unwrap_err();
        assert_eq!(e, "shape [1, 2] needs 2 FP32 elements but data has 3");
        let t = InferTensorContents {
            bytes_contents: vec![b"a".to_vec()],
            ..Default::default()
        };
        let t = typed_tensor(DataType::Bytes, vec![1], 1, t).unwrap();
        let mut raw = vec![];
        t.write_raw(&mut raw);
        assert_eq!(
            raw,
            [1, 0, 0, 0, b'a'],
            "a BYTES element: its u32 length, its bytes"
        );
        // Values in another datatype's field beside the right one: refused, not dropped.
        let c = InferTensorContents {
            fp32_contents: vec![1.0; 2],
            fp64_contents: vec![2.0; 2],
            ..Default::default()
        };
        let e = typed_tensor(DataType::Fp32, vec![2], 2, c).unwrap_err();
        assert!(
            e.contains("fp64_contents") && e.contains("fp32_contents"),
            "{e}"
        );
        let c = InferTensorContents {
            int_contents: vec![1],
            ..Default::default()
        };
        assert!(typed_tensor(DataType::Fp16, vec![1], 1, c).is_err());
    }
}
