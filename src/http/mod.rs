//! The HTTP layer: one router, built in [`app`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use metrics_exporter_prometheus::PrometheusHandle;
use nightingale_models::Repository;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::audit::AuditLog;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub mod auth;
// CDS Hooks 2.0 (issue 10)
pub mod cds;
pub mod clients;
pub(crate) mod codec;
pub mod dicomweb;
pub mod serve;
// ---- issue 9: the DICOM pipeline's results ----
pub(crate) mod error;
pub(crate) mod explain;
// KServe v2 gRPC (issue 13): `serve --grpc-addr`.
#[cfg(feature = "grpc")]
pub mod grpc;
mod grpc_wire;
pub mod identity;
pub mod idle;
mod metrics;
mod model_config;
mod repository;
pub mod results;
pub mod validation;
// WADO-RS retrieve (issue 9: result objects and received instances)
mod v2;
pub mod wado;

pub use codec::{decode_request_for_bench, parse_json_data_for_bench};
pub use error::{ApiPath, AppError};
pub use metrics::install_recorder;
pub(crate) use v2::{Op, count_call, outcome_of};

/// HTTP settings.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Largest request body accepted, in bytes (larger: 413).
    pub max_body_bytes: usize,
    /// `--admin-token`: one more API key, with the admin role (model control); `None` and no
    /// other admin credential disables model control.
    pub admin_token: Option<String>,
    /// API keys, JWT, client-certificate and anonymous roles ([`auth`]).
    pub auth: auth::AuthConfig,
    /// Whole-request deadline (reading the body, queueing, inference, answer): a client that
    /// trickles its body or a request stuck behind a slow model gets 408 instead of holding
    /// resources forever.
    pub request_timeout: std::time::Duration,
    /// Memory budget of the inference requests in flight, in bytes: each is charged its body
    /// plus an equal amount for the decoded tensors (more when decoding yields more) until its
    /// response has been sent. A request that does not fit gets 503 with `Retry-After`, before
    /// its body is read when Content-Length says so.
    pub max_inflight_bytes: usize,
    /// Most inference requests in flight at once (beyond: 503 with `Retry-After`).
    pub max_inflight_requests: usize,
    /// Most requests of any kind open at once, HTTP and gRPC together, from their headers
    /// until their answer has been sent (health checks apart; beyond: 503 with
    /// `Retry-After`): an HTTP/2 client may open hundreds of streams on each of its
    /// connections.
    pub max_open_requests: usize,
    /// Of them, the most one client (an IPv4 address, an IPv6 /64) may hold
    /// (`--max-open-requests-per-client`; `None`: an eighth, [`open_requests_per_client`]).
    pub max_open_requests_per_client: Option<usize>,
    /// `/explain` for bundles without an `[explain]` section (`serve --explain`).
    pub explain: ExplainPolicy,
}

/// What `/explain` offers bundles that do not declare `[explain]` themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExplainPolicy {
    /// `--explain`: every method for every bundle (a bundle's `[explain]` still sets its
    /// own methods and budget).
    pub all_methods: bool,
    /// The forward-pass budget of one explanation under `--explain`.
    pub max_forward_passes: usize,
    /// Explanations computed at once across the server (`--explain-max-concurrent`); more
    /// wait their turn, up to [`EXPLAIN_WAITING_PER_SLOT`] each, beyond that 503.
    pub max_concurrent: usize,
}

/// Explanations that may wait for a turn, per one computed at once: more are refused (503
/// with `Retry-After`) rather than held until their deadline.
pub const EXPLAIN_WAITING_PER_SLOT: usize = 4;

/// `--explain-max-concurrent`'s default: the machine's cores.
pub fn default_explain_concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Default for ExplainPolicy {
    fn default() -> Self {
        ExplainPolicy {
            all_methods: false,
            max_forward_passes: nightingale_models::manifest::DEFAULT_EXPLAIN_FORWARD_PASSES,
            max_concurrent: default_explain_concurrency(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 64 << 20,
            admin_token: None,
            auth: auth::AuthConfig::default(),
            request_timeout: std::time::Duration::from_secs(120),
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT_BYTES,
            max_inflight_requests: DEFAULT_MAX_INFLIGHT_REQUESTS,
            max_open_requests: DEFAULT_MAX_OPEN_REQUESTS,
            max_open_requests_per_client: None,
            explain: ExplainPolicy::default(),
        }
    }
}

/// When the whole-request deadline fires: handlers that must record what happened to a
/// request they may not finish (the audit trail) read it from the request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct RequestDeadline(pub std::time::Instant);

/// What every handler shares.
pub struct AppState {
    pub repository: Arc<Repository>,
    pub audit: AuditLog,
    pub config: HttpConfig,
    pub metrics: Option<PrometheusHandle>,
    pub(crate) admission: Admission,
    pub(crate) auth: auth::Authenticator,
    ready: AtomicBool,
    /// Start-up is opening the stores (`serve` listens meanwhile): every route but the
    /// health checks and the metrics answers 503 ([`AppState::set_starting`]).
    starting: AtomicBool,
    /// DICOMweb (STOW-RS, QIDO-RS) over the DICOM spool; unset: those routes answer 404.
    dicomweb: std::sync::OnceLock<dicomweb::DicomWeb>,
    /// The DICOM pipeline's results store; unset: `/results` answers 404.
    results: std::sync::OnceLock<results::Results>,
    /// CDS Hooks; unset until first used: the built-in services, no trusted issuer.
    cds: std::sync::OnceLock<crate::cds::Cds>,
    /// Validation runs (issue 11); unset: `/validation/runs` answers 404.
    validation: std::sync::OnceLock<validation::Validation>,
    /// Turns for `/explain` requests (each costs up to its budget of forward passes: a burst
    /// of them, unbounded, made every one miss its deadline and `/infer` wait seconds).
    pub(crate) explain_turns: explain::Turns,
    /// Places for requests open at once ([`HttpConfig::max_open_requests`]).
    open_requests: Arc<tokio::sync::Semaphore>,
    /// Requests open at once per client ([`open_requests_per_client`]).
    open_by_client: Arc<clients::ClientCounts>,
    /// Health checks open at once per client ([`HEALTH_CHECKS_PER_CLIENT`]).
    health_by_client: Arc<clients::ClientCounts>,
    /// Audit records of CDS Hooks refusals without credentials, calls and feedback each
    /// their own: a burst, then one a second, the rest counted and summarised
    /// ([`crate::audit::throttle`]).
    pub(crate) unauthenticated_audit: [Arc<crate::audit::throttle::Throttle>; 3],
}

/// [`AppState::unauthenticated_audit`]'s burst and steady rate.
pub(crate) const UNAUTHENTICATED_AUDIT_BURST: u32 = 20;
pub(crate) const UNAUTHENTICATED_AUDIT_PER_SECOND: f64 = 1.0;

impl AppState {
    pub fn new(
        repository: Arc<Repository>,
        audit: AuditLog,
        config: HttpConfig,
        metrics: Option<PrometheusHandle>,
    ) -> Arc<Self> {
        let explain_turns = explain::Turns::new(config.explain.max_concurrent);
        let open_requests = Arc::new(tokio::sync::Semaphore::new(
            config
                .max_open_requests
                .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
        ));
        let open_by_client = clients::ClientCounts::new(
            config
                .max_open_requests_per_client
                .unwrap_or_else(|| open_requests_per_client(config.max_open_requests))
                .min(config.max_open_requests),
        );
        let health_by_client = clients::ClientCounts::new(HEALTH_CHECKS_PER_CLIENT);
        Arc::new(AppState {
            explain_turns,
            open_requests,
            open_by_client,
            health_by_client,
            repository,
            audit,
            admission: Admission::new(&config),
            auth: auth::Authenticator::new(&config.auth, config.admin_token.as_deref()),
            config,
            metrics,
            ready: AtomicBool::new(false),
            starting: AtomicBool::new(false),
            dicomweb: std::sync::OnceLock::new(),
            results: std::sync::OnceLock::new(),
            cds: std::sync::OnceLock::new(),
            validation: std::sync::OnceLock::new(),
            unauthenticated_audit: std::array::from_fn(|_| {
                Arc::new(crate::audit::throttle::Throttle::new(
                    UNAUTHENTICATED_AUDIT_BURST,
                    UNAUTHENTICATED_AUDIT_PER_SECOND,
                ))
            }),
        })
    }

    /// Writes the summaries of the unauthenticated CDS refusals held back and not yet
    /// written (at shutdown: those of the last second were lost with the process, a
    /// re-attack's finding).
    pub async fn flush_held_audit(&self) {
        for kind in [
            crate::audit::EventKind::CdsHook,
            crate::audit::EventKind::CdsFeedback,
            crate::audit::EventKind::AccessRefused,
        ] {
            cds::write_held_summary(&self.audit, &self.held_audit_of(kind), kind).await;
        }
    }

    /// The throttle of one kind of unauthenticated refusal (CDS calls, CDS feedback, the
    /// admin endpoints).
    pub(crate) fn held_audit_of(
        &self,
        kind: crate::audit::EventKind,
    ) -> Arc<crate::audit::throttle::Throttle> {
        let i = match kind {
            crate::audit::EventKind::CdsFeedback => 1,
            crate::audit::EventKind::AccessRefused => 2,
            _ => 0,
        };
        self.unauthenticated_audit[i].clone()
    }

    /// Turns validation runs on (once).
    pub fn set_validation(&self, v: validation::Validation) -> bool {
        self.validation.set(v).is_ok()
    }

    /// Validation runs, when they are on.
    pub fn validation(&self) -> Option<&validation::Validation> {
        self.validation.get()
    }

    /// Turns DICOMweb on over `dicomweb`'s spool (once; a second call changes nothing and
    /// returns false).
    pub fn set_dicomweb(&self, dicomweb: dicomweb::DicomWeb) -> bool {
        self.dicomweb.set(dicomweb).is_ok()
    }

    /// Sets the CDS Hooks service (once, before the first request; later calls change
    /// nothing and return false).
    pub fn set_cds(&self, cds: crate::cds::Cds) -> bool {
        self.cds.set(cds).is_ok()
    }

    /// The CDS Hooks service (the built-in one, with no trusted issuer, unless set).
    pub fn cds(&self) -> &crate::cds::Cds {
        self.cds
            .get_or_init(|| crate::cds::Cds::builtin(&self.repository))
    }

    /// Turns the results API on (once).
    pub fn set_results(&self, results: results::Results) -> bool {
        self.results.set(results).is_ok()
    }

    /// The pipeline's results, when the pipeline runs.
    pub fn results(&self) -> Option<&results::Results> {
        self.results.get()
    }

    /// DICOMweb, when it is on.
    pub fn dicomweb(&self) -> Option<&dicomweb::DicomWeb> {
        self.dicomweb.get()
    }

    /// Marks the initial model load as done: `GET /v2/health/ready` answers 200 from now on.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// While `starting`, every route but the health checks and `/metrics` answers 503
    /// "starting" with Retry-After: `serve` listens (liveness probes are answered) while its
    /// stores open, and the routes that need them (CDS Hooks, DICOMweb, results, validation)
    /// must not answer as if they were not configured.
    pub fn set_starting(&self, starting: bool) {
        self.starting.store(starting, Ordering::Release);
    }

    pub fn is_starting(&self) -> bool {
        self.starting.load(Ordering::Acquire)
    }

    /// A served model (or version), as [`Repository::get`]; during the initial model load,
    /// one not loaded yet is 503 "still loading" with Retry-After, not 404 "unknown": KServe
    /// clients and integration engines take a 404 as final and do not retry (a review's
    /// finding: requests during a restart got 404 for models the server was loading).
    pub(crate) fn model(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<nightingale_models::LoadedModel>, error::AppError> {
        self.repository.get(name, version).map_err(|e| {
            let unknown = matches!(
                e,
                nightingale_models::RepositoryError::UnknownModel { .. }
                    | nightingale_models::RepositoryError::UnknownVersion { .. }
            );
            if unknown && !self.ready.load(Ordering::Acquire) {
                let mut refusal = error::AppError::overloaded(format!(
                    "{e}: the server is still loading its models; retry later"
                ));
                refusal.retry_after = Some(error::NOT_READY_RETRY_AFTER_SECS);
                refusal
            } else {
                e.into()
            }
        })
    }

    /// The initial load is done, and start-up too ([`AppState::set_starting`]).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.is_starting()
    }

    /// Bytes of the in-flight budget ([`HttpConfig::max_inflight_bytes`]) free now.
    pub fn inflight_bytes_free(&self) -> usize {
        self.admission.available_bytes()
    }
}

/// The whole router.
pub fn app(state: Arc<AppState>) -> axum::Router {
    let timeout = state.config.request_timeout;
    let open_slots = state.clone();
    // Every route has a row in `auth::ROUTES` (the role it needs); `auth::enforce` checks it.
    let v2 = auth::Routes::new()
        .route("/v2", get(v2::server_metadata))
        .route("/v2/health/live", get(v2::live))
        .route("/v2/health/ready", get(v2::ready))
        .route("/v2/models/stats", get(v2::all_stats))
        .route("/v2/models/{model}", get(v2::model_metadata))
        .route("/v2/models/{model}/config", get(v2::model_config))
        .route("/v2/models/{model}/ready", get(v2::model_ready))
        .route("/v2/models/{model}/infer", post(v2::infer))
        .route("/v2/models/{model}/explain", post(explain::explain))
        .route("/v2/models/{model}/stats", get(v2::model_stats))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(v2::model_metadata_version),
        )
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(v2::model_config_version),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(v2::model_ready_version),
        )
        .route(
            "/v2/models/{model}/versions/{version}/explain",
            post(explain::explain_version),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(v2::infer_version),
        )
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(v2::model_stats_version),
        )
        .route("/v2/repository/index", post(repository::index))
        .route("/v2/repository/models/{model}/load", post(repository::load))
        .route(
            "/v2/repository/models/{model}/unload",
            post(repository::unload),
        )
        .route("/metrics", get(metrics::render))
        // ---- DICOMweb (issue 8): STOW-RS and QIDO-RS ----
        .route(
            "/dicomweb/studies",
            post(dicomweb::stow).get(dicomweb::search_studies),
        )
        .route(
            "/dicomweb/studies/{study}",
            post(dicomweb::stow_study).get(wado::retrieve_study),
        )
        .route(
            "/dicomweb/studies/{study}/series/{series}",
            get(wado::retrieve_series),
        )
        .route(
            "/dicomweb/studies/{study}/series",
            get(dicomweb::search_study_series),
        )
        .route(
            "/dicomweb/studies/{study}/instances",
            get(dicomweb::search_study_instances),
        )
        .route(
            "/dicomweb/studies/{study}/series/{series}/instances",
            get(dicomweb::search_series_instances),
        )
        .route(
            "/dicomweb/studies/{study}/series/{series}/instances/{sop}",
            get(wado::retrieve_instance),
        )
        .route("/dicomweb/series", get(dicomweb::search_series))
        .route("/dicomweb/instances", get(dicomweb::search_instances))
        // ---- end DICOMweb ----
        .route("/results/studies/{study}", get(results::study))
        .route("/cds-services", get(cds::discovery))
        .route("/cds-services/{id}", post(cds::call))
        .route("/cds-services/{id}/feedback", post(cds::feedback))
        .route(
            "/validation/runs",
            post(validation::create).get(validation::list),
        )
        .route(
            "/validation/runs/{id}",
            get(validation::status).delete(validation::cancel),
        )
        .route(
            "/validation/runs/{id}/report.json",
            get(validation::report_json),
        )
        .route(
            "/validation/runs/{id}/report.html",
            get(validation::report_html),
        )
        .finish()
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::enforce,
        ));
    // STOW-RS has its own deadline (studies of hundreds of MB), instead of the API's.
    let deadlines = state.clone();
    v2.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::from_fn(
            move |mut req: Request, next: axum::middleware::Next| {
                let timeout =
                    dicomweb::deadline_for(&deadlines, req.uri().path()).unwrap_or(timeout);
                async move {
                    let deadline = tokio::time::Instant::now() + timeout;
                    req.extensions_mut()
                        .insert(RequestDeadline(deadline.into_std()));
                    match crate::audit::within_deadline(deadline, next.run(req)).await {
                        Some(response) => response,
                        None => AppError::new(
                            StatusCode::REQUEST_TIMEOUT,
                            format!(
                                "the request did not complete within {} ms",
                                timeout.as_millis()
                            ),
                        )
                        .into_response(),
                    }
                }
            },
        ))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn(close_if_body_unread))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            tracing::info_span!("http", method = %req.method(), path = %logged_path(req.uri().path()), request_id = %id)
        })
        .on_failure(log_failure))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(axum::middleware::map_request(usable_request_id))
        .layer(axum::middleware::from_fn_with_state(open_slots, open_request))
}

/// Paths answered whatever the number of requests open: health checks (a probe must not
/// read a busy server as a dead one; their answers are a few bytes).
fn always_answered(path: &str) -> bool {
    matches!(
        path,
        "/v2/health/live"
            | "/v2/health/ready"
            | "/inference.GRPCInferenceService/ServerLive"
            | "/inference.GRPCInferenceService/ServerReady"
    )
}

/// Health checks one client may hold open at once, apart from its requests: a probe needs
/// one (they were counted in the client's share: a busy proxy or sidecar, one client, had
/// its probes refused and the server read as dead, a re-attack's finding), and unread ones
/// still cannot pile up (80,000 held streams took 80 MB: a re-attack's finding).
pub const HEALTH_CHECKS_PER_CLIENT: usize = 64;

/// The requests one client (an IPv4 address, an IPv6 /64) may hold open at once: an eighth
/// of [`HttpConfig::max_open_requests`] (1,024 by default), so that one client alone cannot
/// take every place (a re-attack: 41 HTTP/2 connections of unread streams, without
/// credentials, had every other client answered 503 for two minutes at a time).
pub fn open_requests_per_client(max_open_requests: usize) -> usize {
    (max_open_requests / 8).max(1)
}

/// A place among the requests open at once, and among its client's, held by the answer's
/// body until it has been sent: beyond [`HttpConfig::max_open_requests`], or beyond its
/// client's share ([`open_requests_per_client`]), a request is refused at once (503 with
/// `Retry-After`), before anything else is done for it. One client's HTTP/2 connections
/// opened 200,000 streams of `/v2/models/stats` in 3.5 s without reading the answers: the
/// server took 1.5 GB and answered nobody else for 70 s (a red-team finding). Health checks
/// count apart, [`HEALTH_CHECKS_PER_CLIENT`] a client.
pub(crate) async fn open_request(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    // A gRPC call is refused as gRPC (a status in the trailers-only answer, `retry-after`
    // among them): an HTTP 503 with a JSON body reached tritonclient.grpc as "Received http2
    // header with status: 503", message and Retry-After lost (a review's finding).
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let answer = move |e: AppError| -> axum::response::Response {
        #[cfg(feature = "grpc")]
        if grpc {
            return tonic::Status::from(e).into_http();
        }
        let _ = grpc;
        e.into_response()
    };
    let refuse = |reason: &'static str, what: String| {
        ::metrics::counter!("nightingale_http_requests_refused_total", "reason" => reason)
            .increment(1);
        answer(AppError::overloaded(what))
    };
    let client = request.extensions().get::<clients::ClientAddr>().copied();
    let health = always_answered(request.uri().path());
    if !health && state.is_starting() && request.uri().path() != "/metrics" {
        ::metrics::counter!("nightingale_http_requests_refused_total", "reason" => "starting")
            .increment(1);
        let mut refusal =
            AppError::overloaded("the server is starting (opening its stores); retry later");
        refusal.retry_after = Some(error::NOT_READY_RETRY_AFTER_SECS);
        return answer(refusal);
    }
    let counts = if health {
        &state.health_by_client
    } else {
        &state.open_by_client
    };
    let mine = match client {
        Some(clients::ClientAddr(ip)) => match counts.admit(ip) {
            Some(slot) => Some(slot),
            None => {
                return refuse(
                    "open_requests_per_client",
                    format!(
                        "this client has its limit of {} {} open (max_open_requests_per_client); retry later",
                        counts.max(),
                        if health { "health checks" } else { "requests" }
                    ),
                );
            }
        },
        None => None,
    };
    let place = if health {
        None
    } else {
        match state.open_requests.clone().try_acquire_owned() {
            Ok(place) => Some(place),
            Err(_) => {
                return refuse(
                    "open_requests",
                    format!(
                        "the server has its limit of {} requests open (max_open_requests); retry later",
                        state.config.max_open_requests
                    ),
                );
            }
        }
    };
    let (parts, body) = next.run(request).await.into_parts();
    axum::response::Response::from_parts(parts, Body::new(Holding::new(body, (place, mine))))
}

/// A response body holding `T` (an admission ticket, a place among the open requests) until
/// the body has been sent or dropped. Its data is handed on in pieces of at most
/// [`HELD_CHUNK`] bytes: hyper takes a piece whenever the client's HTTP/2 window has room for
/// one byte and queues it whole, so a body that gave its answer in one frame (tonic's gRPC
/// answers) had the whole answer queued and `T` given back at once, while a client that set
/// a 1-byte window and read nothing kept it in memory out of the budget's count (a review's
/// finding: six stalled 64 MB answers, RSS 4× the budget).
pub(crate) struct Holding<T> {
    inner: Body,
    /// What is left of the last data frame taken from `inner`.
    pending: Bytes,
    _held: T,
}

impl<T> Holding<T> {
    pub(crate) fn new(inner: Body, held: T) -> Self {
        Holding {
            inner,
            pending: Bytes::new(),
            _held: held,
        }
    }
}

/// The most of a held answer handed to hyper at a time ([`Holding`], [`v2`]'s answers).
pub(crate) const HELD_CHUNK: usize = 256 << 10;

impl<T: Unpin> http_body::Body for Holding<T> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        if !self.pending.is_empty() {
            let n = self.pending.len().min(HELD_CHUNK);
            let piece = self.pending.split_to(n);
            return Poll::Ready(Some(Ok(http_body::Frame::data(piece))));
        }
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(mut data) if data.len() > HELD_CHUNK => {
                    let piece = data.split_to(HELD_CHUNK);
                    self.pending = data;
                    Poll::Ready(Some(Ok(http_body::Frame::data(piece))))
                }
                Ok(data) => Poll::Ready(Some(Ok(http_body::Frame::data(data)))),
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let inner = self.inner.size_hint();
        let pending = self.pending.len() as u64;
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(pending));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(pending));
        }
        hint
    }
}

/// A request path as logged: the study, series and instance UIDs of DICOMweb and results
/// paths replaced by their short tags ([`crate::pipeline::uid_tag`]), as the DICOM side logs
/// them (UIDs identify a patient's studies: PS3.15 Annex E treats them as identifiers).
/// At most [`LOGGED_PATH_CHARS`] characters of it, then its length and a digest of the whole:
/// every warning of a request repeats its span's path, and a refused request with a 60 KB
/// path wrote 60 KB per log line (a red-team finding: 13 MB/s of log from one client).
fn logged_path(path: &str) -> std::borrow::Cow<'_, str> {
    let tagged = tagged_path(path);
    match tagged.char_indices().nth(LOGGED_PATH_CHARS) {
        None => tagged,
        Some((cut, _)) => {
            use sha2::Digest;
            let digest = hex::encode(&sha2::Sha256::digest(path.as_bytes())[..8]);
            format!("{}…({} bytes, sha256:{digest})", &tagged[..cut], path.len()).into()
        }
    }
}

/// The longest request path logged whole, in characters.
const LOGGED_PATH_CHARS: usize = 256;

fn tagged_path(path: &str) -> std::borrow::Cow<'_, str> {
    if !(path.starts_with("/dicomweb/") || path.starts_with("/results/")) {
        return path.into();
    }
    let mut out = String::with_capacity(path.len());
    let mut after_key = false;
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if after_key && !segment.is_empty() {
            out.push_str("uid:");
            out.push_str(&crate::pipeline::uid_tag(segment));
        } else {
            out.push_str(segment);
        }
        after_key = matches!(segment, "studies" | "series" | "instances");
    }
    out.into()
}

/// tower-http's failure log, except that a refusal for load (503, which says so with
/// `Retry-After`) is a warning, not an error: under overload every refused request logged
/// an ERROR line.
fn log_failure(
    class: tower_http::classify::ServerErrorsFailureClass,
    latency: std::time::Duration,
    _span: &tracing::Span,
) {
    use tower_http::classify::ServerErrorsFailureClass as Class;
    let ms = latency.as_millis();
    match class {
        Class::StatusCode(code) if code == StatusCode::SERVICE_UNAVAILABLE => {
            tracing::warn!(status = code.as_u16(), latency_ms = ms, "request refused");
        }
        // Something this server does not do (a gradient method on a tract model): the
        // caller's choice, not a failure of the server (it logged ERROR on any caller's ask).
        Class::StatusCode(code) if code == StatusCode::NOT_IMPLEMENTED => {
            tracing::warn!(
                status = code.as_u16(),
                latency_ms = ms,
                "request not supported"
            );
        }
        Class::StatusCode(code) => {
            tracing::error!(status = code.as_u16(), latency_ms = ms, "request failed");
        }
        Class::Error(e) => tracing::error!(error = %e, latency_ms = ms, "request failed"),
    }
}

/// The request's id as the log and the response carry it (`x-request-id`, set by the
/// request-id layer where the client gave none usable), at most 128 characters; `-` where
/// there is none.
pub(crate) fn request_id_of(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .chars()
        .take(128)
        .collect()
}

/// A client's `X-Request-Id` is kept when it is 1 to 128 visible ASCII characters; any other
/// (empty, non-ASCII, longer) is dropped here so that `SetRequestIdLayer` gives the request a
/// UUID: the log, the audit record and the response then name the same id (a non-ASCII id
/// was echoed back but audited as "-").
async fn usable_request_id(mut request: Request) -> Request {
    let usable = request
        .headers()
        .get("x-request-id")
        .map(|v| is_usable_request_id(v.as_bytes()));
    if usable == Some(false) {
        request.headers_mut().remove("x-request-id");
    }
    host_from_authority(&mut request);
    request
}

/// An HTTP/2 request names its host in the `:authority` pseudo-header (the URI's authority
/// here), not in `Host`: it is copied into `Host` when there is none, so that what reads
/// the Host (DICOMweb RetrieveURLs, the CDS Hooks audience) treats both versions alike.
/// An authority with user information is not copied (HTTP/2 forbids it).
///
/// Marks a request that came with more than one Host field (removed by
/// [`host_from_authority`]): it names no host, not even this machine's.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SeveralHosts;

/// HTTP/1 (RFC 9112 §3.2): a request target in absolute form names the host, and its Host
/// field is ignored (replaced by the target's authority); a request with more than one Host
/// field names no host it can be taken at (they are removed: what reads the Host then finds
/// none). Both were taken at the first Host field, which a proxy routing on the other value
/// would not agree with (a red-team finding).
fn host_from_authority(request: &mut Request) {
    use axum::http::header::HOST;
    if request.version() < axum::http::Version::HTTP_2 {
        if request.headers().get_all(HOST).iter().nth(1).is_some() {
            request.headers_mut().remove(HOST);
            request.extensions_mut().insert(SeveralHosts);
            return;
        }
        if request.uri().authority().is_none() {
            return;
        }
    } else if request.headers().contains_key(HOST) {
        return;
    }
    let Some(authority) = request.uri().authority() else {
        return;
    };
    if authority.as_str().contains('@') {
        request.headers_mut().remove(HOST);
        return;
    }
    if let Ok(value) = axum::http::HeaderValue::from_str(authority.as_str()) {
        request
            .headers_mut()
            .insert(axum::http::header::HOST, value);
    }
}

/// A client's request id kept as given: 1 to 128 visible ASCII characters (HTTP and gRPC alike;
/// anything else is replaced by a UUID, never cut or stored as sent).
pub(crate) fn is_usable_request_id(b: &[u8]) -> bool {
    !b.is_empty() && b.len() <= 128 && b.iter().all(u8::is_ascii_graphic)
}

async fn not_found(uri: axum::http::Uri) -> AppError {
    match triton_extension(uri.path()) {
        Some(extension) => AppError::new(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "{extension} is not served by Nightingale: it serves health, metadata, infer, model config, statistics and the repository calls of the KServe v2 / Triton protocol; no shared memory, trace or log settings, or generate (docs/grpc.md lists the same over gRPC)"
            ),
        ),
        None => AppError::not_found("no such endpoint"),
    }
}

/// The Triton HTTP extension a path belongs to, where Nightingale does not serve it: a Triton
/// user's `register_system_shared_memory` got `404 no such endpoint`, which reads like a
/// wrong URL, where gRPC said the call is not served (a review's finding).
fn triton_extension(path: &str) -> Option<&'static str> {
    let rest = path.strip_prefix("/v2/")?;
    let first = rest.split('/').next().unwrap_or_default();
    match first {
        "systemsharedmemory" => return Some("system shared memory"),
        "cudasharedmemory" => return Some("CUDA shared memory"),
        "logging" => return Some("the logging extension"),
        "trace" => return Some("the trace extension"),
        _ => {}
    }
    if first == "models" {
        let last = rest
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or_default();
        let before_last = rest.trim_end_matches('/').rsplit('/').nth(1);
        if before_last == Some("trace") && last == "setting" {
            return Some("the trace extension");
        }
        if matches!(last, "generate" | "generate_stream") {
            return Some("the generate extension");
        }
    }
    None
}

async fn method_not_allowed() -> AppError {
    AppError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint",
    )
}

/// Puts error answers that did not come from [`AppError`] (axum's extractor rejections, say)
/// in the same `{"error": "<message>"}` shape.
/// HTTP/1.1: a response sent before its request's body was read to its end (a 404 for an
/// unknown model, a 401, a 503 refusal, all answered without reading the body) says
/// `Connection: close`, and the connection closes after it. Otherwise hyper closes it anyway
/// (it cannot find the next request's start) without having said so, and a client that
/// reuses the connection loses its next request (a red-team pass lost 2-6 of 100 valid
/// requests alternated with 404s on one kept-alive session). HTTP/2 streams are independent.
async fn close_if_body_unread(
    req: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let declares_body = req.version() <= axum::http::Version::HTTP_11
        && (req.headers().contains_key(header::TRANSFER_ENCODING)
            || req
                .headers()
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0"));
    if !declares_body {
        return next.run(req).await;
    }
    // RFC 9112 §6.1: a transfer coding other than chunked is not understood here (hyper
    // decodes chunked only), and a body in one was read as if plain (a red-team finding):
    // 501, before the body is read (the connection then closes, below).
    if let Some(coding) = req
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .find(|c| !c.eq_ignore_ascii_case("chunked"))
    {
        let mut response = AppError::new(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "Transfer-Encoding {:?} is not supported (chunked only; compress a body with Content-Encoding)",
                coding.chars().take(32).collect::<String>()
            ),
        )
        .into_response();
        response.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        return response;
    }
    let read = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let req = req.map(|body| {
        Body::new(ReadToEnd {
            body,
            read: read.clone(),
        })
    });
    let mut response = next.run(req).await;
    if !read.load(std::sync::atomic::Ordering::Relaxed) {
        response.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// A request body that notes when it has been read to its end.
struct ReadToEnd {
    body: Body,
    read: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for ReadToEnd {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) || self.body.is_end_stream() {
            self.read.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

async fn json_errors(req: Request, next: axum::middleware::Next) -> axum::response::Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.starts_with("application/json") || ct.starts_with("application/dicom+json")
        });
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut out = AppError::new(status, message).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// Whether a Host header value is a plain host name or address with an optional port (at
/// most 255 characters of letters, digits, `.-:[]_`): what may be written into a URL this
/// server builds from it (a CDS token's audience, a DICOMweb RetrieveURL).
pub(crate) fn is_plain_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
}

/// Reads an inference body up to `limit` bytes (413 beyond it), charging `ticket`
/// [`BODY_CHARGE_FACTOR`] bytes per body byte: all at once before reading when
/// Content-Length is given, else as the bytes arrive. Refused mid-body, the rest is read and
/// thrown away (up to the limit) so that the client receives the answer.
pub(crate) async fn read_body_admitted(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    ticket: &mut Ticket,
) -> Result<Bytes, AppError> {
    let coding = content_coding(headers)?;
    let body = read_body_charged(headers, body, limit, ticket).await?;
    match coding {
        None => Ok(body),
        Some(coding) => inflate(&body, coding, limit, ticket).await,
    }
}

/// A body's compression (`Content-Encoding`), as tritonclient sends with
/// `request_compression_algorithm`: gzip or deflate (zlib, RFC 9110 8.4.1.2). Any other
/// coding is 415 before the body is read (it was ignored before, and the compressed bytes
/// reported as malformed JSON).
#[derive(Debug, Clone, Copy)]
enum Coding {
    Gzip,
    Deflate,
}

fn content_coding(headers: &HeaderMap) -> Result<Option<Coding>, AppError> {
    let mut coding = None;
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let text = value.to_str().unwrap_or("?");
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let this = match token.to_ascii_lowercase().as_str() {
                "identity" => continue,
                "gzip" | "x-gzip" => Coding::Gzip,
                "deflate" => Coding::Deflate,
                _ => {
                    return Err(AppError::new(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        format!(
                            "Content-Encoding {token:?} is not supported (gzip, deflate or identity)"
                        ),
                    ));
                }
            };
            if coding.replace(this).is_some() {
                return Err(AppError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "a body compressed more than once is not supported",
                ));
            }
        }
    }
    Ok(coding)
}

/// A reader of `body` inflated as `coding` says (gzip members one after another, or zlib).
fn decoder(body: &[u8], coding: Coding) -> Box<dyn std::io::Read + Send + '_> {
    match coding {
        Coding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(body)),
        Coding::Deflate => Box::new(flate2::read::ZlibDecoder::new(body)),
    }
}

/// Inflates a compressed body, at most `limit` bytes (413 beyond), charging `ticket` as it
/// grows (a small body that inflates to a lot is refused when the budget has no room, not
/// after it was allocated), a MiB at a time with a yield between, so that a large body does
/// not hold an async worker for long.
async fn inflate(
    body: &[u8],
    coding: Coding,
    limit: usize,
    ticket: &mut Ticket,
) -> Result<Bytes, AppError> {
    use std::io::Read;
    const STEP: usize = 1 << 20;
    let mut reader = decoder(body, coding);
    let mut out: Vec<u8> = Vec::new();
    loop {
        let start = out.len();
        let step = STEP.min(limit + 1 - start);
        ticket.charge(step.saturating_mul(BODY_CHARGE_FACTOR))?;
        out.resize(start + step, 0);
        let mut filled = start;
        while filled < out.len() {
            match reader.read(&mut out[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => {
                    return Err(AppError::bad_request(format!(
                        "the request body does not decompress ({coding:?}): {e}"
                    )));
                }
            }
        }
        out.truncate(filled);
        if filled > limit {
            return Err(AppError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body decompresses to more than the limit of {limit} bytes"),
            ));
        }
        if filled < start + step {
            return Ok(Bytes::from(out));
        }
        tokio::task::yield_now().await;
    }
}

/// Reads a body as sent, charging `ticket` (see [`read_body_admitted`]).
async fn read_body_charged(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    ticket: &mut Ticket,
) -> Result<Bytes, AppError> {
    let too_large = || {
        AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    let declared = declared.map(|len| len as usize);
    if let Some(len) = declared {
        // Refused now when it cannot fit (413) or does not fit now (503), but charged only
        // as it arrives (see [`Admission::receiving`]).
        ticket.would_fit(len.saturating_mul(BODY_CHARGE_FACTOR))?;
    }
    // With a declared length, one buffer growing towards it (doubling, never past it, so that
    // a client declaring 64 MiB and sending a byte holds a small buffer); without, the chunks
    // as they came (joined once at the end: growing one buffer by doubling would hold up to
    // three times the bytes received at each reallocation).
    let mut buf: Vec<u8> = Vec::new();
    let mut parts: Vec<Bytes> = vec![];
    let mut body = body;
    let mut received = 0usize;
    let mut refused: Option<AppError> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| body_error(&e))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received = received.saturating_add(data.len());
        if refused.is_some() {
            // Throwing the rest away, up to the limit.
            if received > limit {
                break;
            }
            continue;
        }
        if received > limit {
            return Err(too_large());
        }
        if let Err(e) = ticket.charge(data.len().saturating_mul(BODY_CHARGE_FACTOR)) {
            // Refused: what it holds goes back at once, not when the rest of its body has
            // been read and thrown away (bodies arriving together would otherwise all hold
            // their share until every one of them is refused).
            refused = Some(e);
            buf = Vec::new();
            parts = vec![];
            ticket.release_bytes();
            continue;
        }
        match declared {
            Some(len) => {
                if buf.capacity() - buf.len() < data.len() {
                    // The declared length at once, once the body has started to arrive: pages
                    // become resident only as they are written (a client that declares 64 MiB
                    // and sends a byte holds one page), and the buffer is never copied while
                    // it grows (doubling held the old and the new buffer together, half as
                    // much again as the bytes charged).
                    // Fallible: where the kernel does not overcommit, reserving the
                    // declared length may fail; then the buffer grows as bytes come.
                    let whole = len.max(buf.len() + data.len()) - buf.len();
                    if buf.try_reserve_exact(whole).is_err() {
                        buf.try_reserve(data.len()).map_err(|_| {
                            AppError::overloaded(
                                "the server cannot allocate memory for the request body; retry later",
                            )
                        })?;
                    }
                }
                buf.extend_from_slice(&data);
            }
            None => parts.push(data),
        }
    }
    if let Some(e) = refused {
        return Err(e);
    }
    match parts.len() {
        0 => Ok(Bytes::from(buf)),
        1 => Ok(parts.pop().expect("one part")),
        _ => {
            let mut joined = BytesMut::with_capacity(received);
            for part in parts.drain(..) {
                joined.extend_from_slice(&part);
            }
            Ok(joined.freeze())
        }
    }
}

/// The answer to a body that could not be read: 499 (audited `client-gone`) where the
/// client closed or reset the connection before its body ended, else 400. A client gone
/// mid-upload was audited and counted as a bad request (a review's finding).
fn body_error(e: &axum::Error) -> AppError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    let mut gone = false;
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            gone |= h.is_incomplete_message() || h.is_canceled() || h.is_closed();
        }
        // HTTP/2: the client reset the stream or sent GOAWAY before its body ended (a
        // re-attack's finding: audited 400).
        if let Some(h) = c.downcast_ref::<h2::Error>() {
            gone |= h.is_io() || (h.is_remote() && (h.is_reset() || h.is_go_away()));
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            gone |= matches!(
                io.kind(),
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
            );
        }
        cause = c.source();
    }
    if gone {
        AppError::new(
            StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "the client closed the connection before its request body ended",
        )
    } else {
        AppError::bad_request(format!("cannot read the request body: {e}"))
    }
}

/// Reads a body up to the configured limit (413 beyond it).
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, AppError> {
    let too_large = || {
        AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let length_limit = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if length_limit || e.to_string().contains("length limit") {
            too_large()
        } else {
            body_error(&e)
        }
    })
}

/// Default [`HttpConfig::max_inflight_bytes`]: 512 MiB.
pub const DEFAULT_MAX_INFLIGHT_BYTES: usize = 512 << 20;
/// Default [`HttpConfig::max_inflight_requests`].
pub const DEFAULT_MAX_INFLIGHT_REQUESTS: usize = 256;

/// Default [`HttpConfig::max_open_requests`]: twice the default connection cap.
pub const DEFAULT_MAX_OPEN_REQUESTS: usize = 8192;

/// How many bytes one request is charged per body byte before decoding: the body itself and
/// the tensors decoded from it (a JSON FP32 tensor takes about half its text, a binary one
/// as much as its bytes; decoding that yields more is charged the difference afterwards).
pub(crate) const BODY_CHARGE_FACTOR: usize = 2;

/// The budget counts in KiB: semaphores take at most `u32::MAX` permits at once.
const UNIT: usize = 1024;

/// Admission control: a semaphore of in-flight requests and one of in-flight KiB.
pub(crate) struct Admission {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_requests: usize,
    budget: usize,
}

impl Admission {
    fn new(config: &HttpConfig) -> Self {
        let budget = config.max_inflight_bytes.max(UNIT);
        let max_requests = config.max_inflight_requests.max(1);
        Admission {
            requests: Arc::new(Semaphore::new(max_requests)),
            bytes: Arc::new(Semaphore::new(budget / UNIT)),
            max_requests,
            budget,
        }
    }

    /// A place among the requests in flight (503 when all are taken); bytes are charged to it.
    pub(crate) fn admit(&self) -> Result<Ticket, AppError> {
        let mut ticket = self.receiving()?;
        ticket.take_place(self)?;
        Ok(ticket)
    }

    /// A ticket for a request whose body is still to be received: it is charged the bytes as
    /// they arrive and takes its place among the requests in flight
    /// ([`Ticket::take_place`]) only once the body is in. A client that declares a large body
    /// and sends it slowly, or never, then holds neither a place nor the budget it declared
    /// (four such connections held the whole budget for the request deadline before). When no
    /// place is free now it is 503 at once, without reading the body.
    pub(crate) fn receiving(&self) -> Result<Ticket, AppError> {
        if self.requests.available_permits() == 0 {
            return Err(self.no_place());
        }
        Ok(Ticket {
            request: None,
            bytes: None,
            charged: 0,
            semaphore: self.bytes.clone(),
            budget: self.budget,
        })
    }

    fn no_place(&self) -> AppError {
        AppError::overloaded(format!(
            "the server is handling its limit of {} inference requests (max_inflight_requests); retry later",
            self.max_requests
        ))
    }

    /// Bytes of the budget free now.
    pub fn available_bytes(&self) -> usize {
        self.bytes.available_permits() * UNIT
    }
}

/// One request's hold on the admission budget, released when dropped (after its response
/// body has gone out).
pub(crate) struct Ticket {
    request: Option<OwnedSemaphorePermit>,
    bytes: Option<OwnedSemaphorePermit>,
    charged: usize,
    semaphore: Arc<Semaphore>,
    budget: usize,
}

impl Ticket {
    /// Gives back the place among the requests in flight and keeps the bytes charged: an
    /// answer that is ready holds its memory until it has been sent, not a place of the
    /// work the places bound (unread answers held every place for the 120 s send-stall
    /// limit: one client with the infer role had everyone else answered 503, a red-team
    /// finding).
    pub(crate) fn release_place(&mut self) {
        self.request = None;
    }

    /// Takes a place among the requests in flight (503 when all are taken).
    pub(crate) fn take_place(&mut self, admission: &Admission) -> Result<(), AppError> {
        if self.request.is_none() {
            let place = admission
                .requests
                .clone()
                .try_acquire_owned()
                .map_err(|_| admission.no_place())?;
            self.request = Some(place);
        }
        Ok(())
    }

    /// Whether `more` bytes fit the budget free now, without charging them: a body whose
    /// declared length does not is refused (503) before it is read.
    pub(crate) fn would_fit(&self, more: usize) -> Result<(), AppError> {
        let total = self.charged.saturating_add(more);
        if total > self.budget {
            return Err(self.whole_budget(total));
        }
        let need = total.div_ceil(UNIT) - self.charged.div_ceil(UNIT);
        if need > self.semaphore.available_permits() {
            return Err(self.budget_taken());
        }
        Ok(())
    }

    fn whole_budget(&self, total: usize) -> AppError {
        AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request needs {total} bytes in flight (body and decoded tensors), more than the server's whole budget of {} bytes (max_inflight_bytes)",
                self.budget
            ),
        )
    }

    fn budget_taken(&self) -> AppError {
        AppError::overloaded(format!(
            "the server's in-flight memory budget of {} bytes (max_inflight_bytes) is taken by other requests; retry later",
            self.budget
        ))
    }

    /// Charges an answer's `total` bytes (its outputs and their encoding) before it is
    /// encoded: 503 when the budget has no room now, 413 naming the answer when it would not
    /// fit even in an idle server (it is not the request's body that is too large).
    pub(crate) fn charge_answer(&mut self, total: usize) -> Result<(), AppError> {
        self.charge_at_least(total)
            .map_err(|e| self.answer_refusal(e, total))
    }

    /// [`Ticket::charge_answer`] of `more` bytes beyond what is charged (a model's declared
    /// outputs, before it runs, beside its inputs).
    pub(crate) fn charge_answer_more(&mut self, more: usize) -> Result<(), AppError> {
        let total = self.charged.saturating_add(more);
        self.charge(more).map_err(|e| self.answer_refusal(e, total))
    }

    /// A 413 for an answer of `total` bytes names the answer, not the request's body.
    fn answer_refusal(&self, e: AppError, total: usize) -> AppError {
        if e.status != StatusCode::PAYLOAD_TOO_LARGE {
            return e;
        }
        AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the answer needs {total} bytes in flight (the model's outputs and their encoding), more than the server's whole budget of {} bytes (max_inflight_bytes): ask for fewer rows or outputs (over HTTP, binary outputs take less than JSON)",
                self.budget
            ),
        )
    }

    /// Holds exactly `total` bytes from now (an encoded answer, once the outputs it was
    /// made from are freed): more is charged (503 when there is no room), the excess of an
    /// upper bound charged before is given back.
    pub(crate) fn hold(&mut self, total: usize) -> Result<(), AppError> {
        self.charge_at_least(total)?;
        let keep = total.div_ceil(UNIT);
        if let Some(held) = &mut self.bytes {
            let excess = held.num_permits().saturating_sub(keep);
            if excess > 0 {
                drop(held.split(excess));
            }
        }
        self.charged = total;
        Ok(())
    }

    /// Gives back every byte charged so far (a request refused while its body is still
    /// arriving).
    pub(crate) fn release_bytes(&mut self) {
        self.bytes = None;
        self.charged = 0;
    }

    /// Raises what this ticket holds to at least `total` bytes (nothing when it holds that
    /// much already: a body charged at [`BODY_CHARGE_FACTOR`] bytes per byte as it arrived,
    /// BYTES elements reserved before decoding).
    pub(crate) fn charge_at_least(&mut self, total: usize) -> Result<(), AppError> {
        self.charge(total.saturating_sub(self.charged))
    }

    /// Charges `more` bytes: 503 with `Retry-After` when the budget has no room now, 413 when
    /// the request would not fit even in an idle server.
    pub(crate) fn charge(&mut self, more: usize) -> Result<(), AppError> {
        let total = self.charged.saturating_add(more);
        if total > self.budget {
            return Err(self.whole_budget(total));
        }
        let need = total.div_ceil(UNIT) - self.charged.div_ceil(UNIT);
        if need > 0 {
            let need = u32::try_from(need).expect("the budget fits u32 KiB");
            let permit = self
                .semaphore
                .clone()
                .try_acquire_many_owned(need)
                .map_err(|_| self.budget_taken())?;
            match &mut self.bytes {
                Some(held) => held.merge(permit),
                None => self.bytes = Some(permit),
            }
        }
        self.charged = total;
        Ok(())
    }
}

#[cfg(test)]
mod admission_tests {
    use super::{Admission, HttpConfig};

    /// A ticket holds its place among the requests in flight until its answer is ready, and
    /// its bytes until the answer has been sent (`Ticket::release_place`).
    #[test]
    fn a_ticket_holds_its_place_until_its_answer_is_ready_and_its_bytes_until_sent() {
        let admission = Admission::new(&HttpConfig {
            max_inflight_requests: 1,
            ..HttpConfig::default()
        });
        let whole = admission.available_bytes();
        let mut first = admission.admit().unwrap();
        first.charge_at_least(1 << 20).unwrap();
        let Err(e) = admission.admit() else {
            panic!("a second place was given")
        };
        assert_eq!(e.status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.message.contains("max_inflight_requests"), "{}", e.message);
        first.release_place();
        let second = admission.admit().unwrap();
        assert!(admission.available_bytes() <= whole - (1 << 20));
        drop(first);
        drop(second);
        assert_eq!(admission.available_bytes(), whole);
    }
}

#[cfg(test)]
mod holding_tests {
    use std::sync::Arc;

    use http_body_util::BodyExt;

    use super::{HELD_CHUNK, Holding};

    /// An answer given in one frame (as tonic gives a gRPC answer, trailers after it) is
    /// handed on in pieces of at most HELD_CHUNK bytes, what it holds kept until the last
    /// piece and the trailers have been taken (a review's finding: hyper queued the whole
    /// answer for a client with a 1-byte window, and the answer's budget was given back).
    #[tokio::test]
    async fn one_big_frame_is_handed_on_in_pieces_holding_to_the_end() {
        let data = bytes::Bytes::from((0..(1 << 20) + 7).map(|i| i as u8).collect::<Vec<_>>());
        let mut trailers = axum::http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames = vec![
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(data.clone())),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let inner = axum::body::Body::new(http_body_util::StreamBody::new(
            futures_util::stream::iter(frames),
        ));
        let held = Arc::new(());
        let mut body = Holding::new(inner, held.clone());
        let mut got = Vec::new();
        let mut pieces = 0;
        let mut saw_trailers = false;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            assert!(!saw_trailers, "nothing after the trailers");
            match frame.into_data() {
                Ok(piece) => {
                    assert!(piece.len() <= HELD_CHUNK, "{}", piece.len());
                    got.extend_from_slice(&piece);
                    pieces += 1;
                }
                Err(frame) => {
                    assert_eq!(frame.trailers_ref().unwrap()["grpc-status"], "0");
                    saw_trailers = true;
                }
            }
            assert_eq!(Arc::strong_count(&held), 2, "held while the body is");
        }
        assert!(saw_trailers);
        assert_eq!(got, data);
        assert_eq!(pieces, 5);
        drop(body);
        assert_eq!(Arc::strong_count(&held), 1);
    }
}

#[cfg(test)]
mod tests {
    use super::logged_path;

    /// Red-team finding: the HTTP span logged DICOMweb paths with their full UIDs, where the
    /// DICOM side logs short tags only.
    #[test]
    fn dicomweb_and_results_paths_are_logged_with_uid_tags() {
        let tag = crate::pipeline::uid_tag;
        assert_eq!(
            logged_path("/dicomweb/studies/1.2.3/series/4.5/instances/6.7"),
            format!(
                "/dicomweb/studies/uid:{}/series/uid:{}/instances/uid:{}",
                tag("1.2.3"),
                tag("4.5"),
                tag("6.7")
            )
        );
        assert_eq!(
            logged_path("/results/studies/1.2.3"),
            format!("/results/studies/uid:{}", tag("1.2.3"))
        );
        for plain in [
            "/dicomweb/studies",
            "/dicomweb/studies/",
            "/dicomweb/series",
            "/v2/models/wdbc/infer",
            "/cds-services/nightingale-news2",
        ] {
            assert_eq!(logged_path(plain), plain);
        }
        assert!(!logged_path("/dicomweb/studies/1.2.840.99/series").contains("1.2.840.99"));
    }

    /// Red-team finding: a refused request's 60 KB path was written whole into every log
    /// line of its span. Long paths are cut, with their length and a digest.
    #[test]
    fn a_long_path_is_logged_cut_with_its_length_and_digest() {
        let long = format!("/v2/models/{}", "é".repeat(30_000));
        let logged = logged_path(&long);
        assert!(logged.chars().count() < 400, "{}", logged.len());
        assert!(logged.starts_with("/v2/models/éé"), "{logged}");
        assert!(logged.contains("60011 bytes, sha256:"), "{logged}");
        let other = format!("/v2/models/{}x", "é".repeat(30_000));
        assert_ne!(logged_path(&other), logged);
        let exact = format!("/{}", "a".repeat(255));
        assert_eq!(logged_path(&exact), exact);
    }
}
