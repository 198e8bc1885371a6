//! Typed configuration: command-line flags, `NIGHTINGALE_*` environment variables and
//! `nightingale.toml`, in that order of precedence, over built-in defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use nightingale_inference::{BackendKind, ExecutionProvider, TractKernels};
use serde::Deserialize;

/// Flags of `nightingale serve`. Each is optional here so that the config file can fill
/// what the command line and environment leave out.
#[derive(Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// Config file (TOML). Default: ./nightingale.toml when it exists.
    #[arg(long, env = "NIGHTINGALE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Model repository folder. [default: models/bundles]
    #[arg(long, env = "NIGHTINGALE_REPOSITORY")]
    pub repository: Option<PathBuf>,
    /// Address of the HTTP server (KServe v2, metrics). [default: 127.0.0.1:8000]
    #[arg(long, env = "NIGHTINGALE_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Also serve KServe v2 over gRPC (`inference.GRPCInferenceService`) on this address, with
    /// the HTTP side's auth, audit, admission limits and TLS settings. [default: off]
    #[arg(long, env = "NIGHTINGALE_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// Engine for bundles that do not ask for one. [default: tract]
    #[arg(long, env = "NIGHTINGALE_BACKEND", value_enum)]
    pub backend: Option<BackendArg>,
    /// Threads one inference may use inside the engine, 0..=1024; 0 = engine default. [default: 1]
    #[arg(long, env = "NIGHTINGALE_INTRA_OP_THREADS")]
    pub intra_op_threads: Option<usize>,
    /// ONNX Runtime execution provider (ort backend). [default: cpu]
    #[arg(long, env = "NIGHTINGALE_EXECUTION_PROVIDER", value_enum)]
    pub execution_provider: Option<ProviderArg>,
    /// CUDA device for the cuda execution provider. [default: 0]
    #[arg(long, env = "NIGHTINGALE_CUDA_DEVICE")]
    pub cuda_device: Option<i32>,
    /// ONNX Runtime shared library for the ort backend (libonnxruntime.so, >= 1.31).
    /// Unset: ort's own lookup (ORT_DYLIB_PATH, then the library path).
    #[arg(long, env = "NIGHTINGALE_ORT_LIBRARY")]
    pub ort_library: Option<PathBuf>,
    /// Whose kernels run 2-D convolutions, max pooling and strided slices on the tract engine:
    /// Nightingale's (2-6x faster on the image bundles) or tract's own. [default: nightingale]
    #[arg(long, env = "NIGHTINGALE_TRACT_KERNELS", value_enum)]
    pub tract_kernels: Option<TractKernelsArg>,
    /// tract engine: the most bytes of tensors one run of a model may keep alive at once (a
    /// batch whose intermediate tensors would pass it is refused with 400 before the node that
    /// would, instead of an allocation that cannot be made aborting the server).
    /// [default: 4294967296]
    #[arg(long, env = "NIGHTINGALE_MAX_INFERENCE_BYTES")]
    pub max_inference_bytes: Option<u64>,
    /// The most engine threads all served models may run together (each served version
    /// runs its bundle's `instances`): a load that would pass it is refused with the reason
    /// in the repository index, and what served before serves on. [default: 256]
    #[arg(long, env = "NIGHTINGALE_MAX_ENGINE_THREADS")]
    pub max_engine_threads: Option<usize>,
    /// Largest request body in bytes. [default: 67108864]
    #[arg(long, env = "NIGHTINGALE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Memory budget of the inference requests in flight, in bytes (each is charged twice
    /// its body, for the body and its decoded tensors); beyond it: 503 with Retry-After.
    /// [default: 536870912]
    #[arg(long, env = "NIGHTINGALE_MAX_INFLIGHT_BYTES")]
    pub max_inflight_bytes: Option<usize>,
    /// Most inference requests in flight at once (1..=1000000); beyond: 503 with Retry-After.
    /// [default: 256]
    #[arg(long, env = "NIGHTINGALE_MAX_INFLIGHT_REQUESTS")]
    pub max_inflight_requests: Option<usize>,
    /// Most requests of any kind open at once, HTTP and gRPC together (1..=1000000), from
    /// their headers until their answer has been sent; health checks apart. Beyond: 503 with
    /// Retry-After. [default: 8192]
    #[arg(long, env = "NIGHTINGALE_MAX_OPEN_REQUESTS")]
    pub max_open_requests: Option<usize>,
    /// Of those, the most one client (an IPv4 address, an IPv6 /64; a reverse proxy is one)
    /// may hold, 1..=--max-open-requests. [default: an eighth of --max-open-requests]
    #[arg(long, env = "NIGHTINGALE_MAX_OPEN_REQUESTS_PER_CLIENT")]
    pub max_open_requests_per_client: Option<usize>,
    /// Most connections open at once on each listener (HTTP, gRPC); beyond, a plaintext
    /// listener leaves new connections in the backlog until one closes, a TLS listener closes
    /// them at once. [default: 4096]
    #[arg(long, env = "NIGHTINGALE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most connections one client (an IPv4 address, an IPv6 /64) may hold open at once on
    /// each listener; beyond, a new one is closed at once. A reverse proxy is one client.
    /// [default: 1024]
    #[arg(long, env = "NIGHTINGALE_MAX_CONNECTIONS_PER_CLIENT")]
    pub max_connections_per_client: Option<usize>,
    /// Bearer token for model control (repository load/unload). Unset: model control is off.
    #[arg(long, env = "NIGHTINGALE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Deadline for a whole HTTP request in seconds (408 after it). [default: 120]
    #[arg(long, env = "NIGHTINGALE_REQUEST_TIMEOUT_SECS")]
    pub request_timeout_secs: Option<u64>,
    /// Deadline for a whole HTTP request in milliseconds (408 after it); overrides
    /// --request-timeout-secs. [default: 120000]
    #[arg(long, env = "NIGHTINGALE_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// Folder of every embedded store (the audit trail, and the stores that follow).
    /// [default: nightingale-data]
    #[arg(long, env = "NIGHTINGALE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where audit records go: jsonl (hash-chained JSON lines, rotated), sqlite (in the data
    /// folder) or postgres (shared by replicas; needs --audit-postgres-url). [default: jsonl]
    #[arg(long, env = "NIGHTINGALE_AUDIT_STORE", value_enum)]
    pub audit_store: Option<AuditStoreKind>,
    /// The live JSON-lines audit file; rotated files sit beside it.
    /// [default: <data-dir>/audit/audit.jsonl]
    #[arg(long, env = "NIGHTINGALE_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Rotate the JSON-lines audit file at this size in bytes (at least 65536); 0 never
    /// rotates. [default: 67108864]
    #[arg(long, env = "NIGHTINGALE_AUDIT_ROTATE_BYTES")]
    pub audit_rotate_bytes: Option<u64>,
    /// PostgreSQL connection string for --audit-store postgres
    /// (postgres://user:password@host/db or "host=… user=… dbname=…").
    #[arg(long, env = "NIGHTINGALE_AUDIT_POSTGRES_URL", hide_env_values = true)]
    pub audit_postgres_url: Option<String>,
    /// fsync the audit trail after each group of records (slower; survives power loss).
    /// [default: false]
    #[arg(long, env = "NIGHTINGALE_AUDIT_FSYNC")]
    pub audit_fsync: Option<bool>,
    /// The secret key (64 hex digits) that seals the tensor digests of audit records
    /// (input_sha256, output_sha256 become HMAC-SHA256 under it: docs/security.md); made
    /// there, mode 0600, at the first start. Keep it apart from the trail's readers.
    /// [default: <data-dir>/audit-digest.key]
    #[arg(long, env = "NIGHTINGALE_AUDIT_DIGEST_KEY")]
    pub audit_digest_key: Option<PathBuf>,
    /// Log format. [default: text]
    #[arg(long, env = "NIGHTINGALE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Serve on an address other than loopback even though no credential is configured
    /// (anyone who can reach the port gets the anonymous roles: infer, metrics, pacs).
    /// Without it such a start is refused. API keys and JWT: [auth] in nightingale.toml.
    #[arg(long, env = "NIGHTINGALE_INSECURE", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: Option<bool>,
    /// A minisign public key file trusted to sign bundles (repeatable; the environment
    /// variable takes a comma-separated list). Bundles signed by a trusted key are verified
    /// at every load; a signature that does not verify is refused.
    #[arg(
        long = "trusted-key",
        env = "NIGHTINGALE_TRUSTED_KEYS",
        value_delimiter = ','
    )]
    pub trusted_keys: Vec<PathBuf>,
    /// Serve only bundles signed by a trusted key (unsigned or otherwise signed ones are
    /// refused, with the reason in the repository index). [default: false]
    #[arg(long, env = "NIGHTINGALE_REQUIRE_SIGNATURES", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub require_signatures: Option<bool>,
    /// Watch the repository every N seconds and reload bundles whose files changed (new
    /// versions swap in once they verify and pass their self-test; a broken one leaves the
    /// old serving); 0 turns the poller off, otherwise 0.05..=86400. [default: 0]
    #[arg(long, env = "NIGHTINGALE_REPOSITORY_POLL_SECS")]
    pub repository_poll_secs: Option<f64>,
    // --- TLS ---
    /// Serve HTTPS with this PEM certificate chain (leaf first); needs --tls-key. Re-read, with
    /// the key, on SIGHUP.
    #[arg(long, env = "NIGHTINGALE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "NIGHTINGALE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: PEM bundle of the CAs that client certificates must chain to.
    #[arg(long, env = "NIGHTINGALE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// With --tls-client-ca: must every client present a certificate (required), or may
    /// clients without one connect and authenticate otherwise (optional)? [default: optional]
    #[arg(long, env = "NIGHTINGALE_TLS_CLIENT_AUTH", value_enum)]
    pub tls_client_auth: Option<crate::tls::ClientAuth>,
    // ---- DICOM ingest (issue 8): the DIMSE SCP and its spool ----
    /// Turn the DICOM SCP (C-ECHO, C-STORE) on at 127.0.0.1:PORT. Off unless this or
    /// --dicom-addr is given.
    #[arg(long, env = "NIGHTINGALE_DICOM_PORT")]
    pub dicom_port: Option<u16>,
    /// Turn the DICOM SCP on at ADDR:PORT (wins over --dicom-port). A non-loopback address
    /// needs --dicom-allowed-ae, or --insecure.
    #[arg(long, env = "NIGHTINGALE_DICOM_ADDR")]
    pub dicom_addr: Option<SocketAddr>,
    /// AE title of the DICOM SCP. [default: NIGHTINGALE]
    #[arg(long, env = "NIGHTINGALE_DICOM_AE_TITLE")]
    pub dicom_ae_title: Option<String>,
    /// Folder of received instances (.dcm files) and their index. [default: <data-dir>/spool]
    #[arg(long, env = "NIGHTINGALE_DICOM_SPOOL")]
    pub dicom_spool: Option<PathBuf>,
    /// Calling AE allowed to associate, as AE or AE@IP (repeatable; the environment variable
    /// takes a comma-separated list). Unset: any calling AE (only on a loopback address
    /// unless --insecure).
    #[arg(
        long = "dicom-allowed-ae",
        env = "NIGHTINGALE_DICOM_ALLOWED_AES",
        value_delimiter = ','
    )]
    pub dicom_allowed_aes: Vec<String>,
    /// Reject associations whose called AE title is not --dicom-ae-title (A-ASSOCIATE-RJ,
    /// called-AE-title-not-recognized). Off: any called AE is accepted, as dcmtk's storescp
    /// and Orthanc do by default.
    #[arg(long, env = "NIGHTINGALE_DICOM_CHECK_CALLED_AE", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub dicom_check_called_ae: Option<bool>,
    /// Largest PDU the SCP receives, in bytes. [default: 65536]
    #[arg(long, env = "NIGHTINGALE_DICOM_MAX_PDU")]
    pub dicom_max_pdu: Option<u32>,
    /// Associations served at once; beyond: A-ASSOCIATE-RJ (transient). [default: 32]
    #[arg(long, env = "NIGHTINGALE_DICOM_MAX_ASSOCIATIONS")]
    pub dicom_max_associations: Option<usize>,
    /// Seconds a new connection has to request its association (ARTIM). [default: 30]
    #[arg(long, env = "NIGHTINGALE_DICOM_ASSOCIATION_TIMEOUT_SECS")]
    pub dicom_association_timeout_secs: Option<f64>,
    /// Seconds an association may stay silent before it is aborted. [default: 120]
    #[arg(long, env = "NIGHTINGALE_DICOM_IDLE_TIMEOUT_SECS")]
    pub dicom_idle_timeout_secs: Option<f64>,
    /// Largest data set of one C-STORE, in bytes. [default: 2147483648]
    #[arg(long, env = "NIGHTINGALE_DICOM_MAX_INSTANCE_BYTES")]
    pub dicom_max_instance_bytes: Option<u64>,
    /// Bytes of data sets being received at once over all associations (held in memory
    /// until stored); a C-STORE beyond is answered 0xA700. STOW-RS has a budget of the same
    /// size of its own (parts held in memory until staged); a request beyond is answered
    /// 503 with Retry-After. [default: 4294967296]
    #[arg(long, env = "NIGHTINGALE_DICOM_MAX_INFLIGHT_BYTES")]
    pub dicom_max_inflight_bytes: Option<u64>,
    /// Free space to keep on the spool's file system; a C-STORE that would leave less is
    /// answered 0xA700 (out of resources). [default: 1073741824]
    #[arg(long, env = "NIGHTINGALE_DICOM_SPOOL_MIN_FREE_BYTES")]
    pub dicom_spool_min_free_bytes: Option<u64>,
    /// A storage SOP class UID accepted besides the built-in ones (repeatable).
    #[arg(
        long = "dicom-sop-class",
        env = "NIGHTINGALE_DICOM_SOP_CLASSES",
        value_delimiter = ','
    )]
    pub dicom_sop_classes: Vec<String>,
    // -- DICOM retention and audit (issue 8, OPS slice) --
    /// Delete received instances (and quarantined objects) this many days after they
    /// arrived; checked at start-up and then hourly. 0 keeps them forever. Patient data is
    /// not kept forever by default. [default: 30]
    #[arg(long, env = "NIGHTINGALE_DICOM_RETENTION_DAYS")]
    pub dicom_retention_days: Option<f64>,
    /// How the audit trail records instance UIDs (SOP Instance, Study, Series): hash
    /// (SHA-256 of the UID) or omit. [default: hash]
    #[arg(long, env = "NIGHTINGALE_DICOM_AUDIT_UIDS", value_enum)]
    pub dicom_audit_uids: Option<crate::audit::dicom::UidAudit>,
    // ---- end DICOM ----
    // ---- DICOMweb (issue 8: STOW-RS, QIDO-RS): on whenever the DICOM spool is ----
    /// Largest STOW-RS part (one DICOM file) in bytes; it is held in memory while stored.
    /// [default: 1073741824]
    #[arg(long, env = "NIGHTINGALE_DICOMWEB_MAX_PART_BYTES")]
    pub dicomweb_max_part_bytes: Option<u64>,
    /// Largest STOW-RS request body in bytes (a larger declared Content-Length is refused
    /// with 413 before the body is read). [default: 4294967296]
    #[arg(long, env = "NIGHTINGALE_DICOMWEB_MAX_REQUEST_BYTES")]
    pub dicomweb_max_request_bytes: Option<u64>,
    /// Whole-request deadline of DICOMweb requests, in seconds (instead of
    /// --request-timeout-ms). [default: 600]
    #[arg(long, env = "NIGHTINGALE_DICOMWEB_TIMEOUT_SECS")]
    pub dicomweb_timeout_secs: Option<f64>,
    /// Most WADO-RS answers streamed at once (each holds up to ~512 KiB of send buffer until
    /// its client has read it; beyond, 503 with Retry-After), 1 to 65536. [default: 512]
    #[arg(long, env = "NIGHTINGALE_DICOMWEB_MAX_STREAMS")]
    pub dicomweb_max_streams: Option<usize>,
    // ---- end DICOMweb ----
    // ---- DICOM pipeline (issue 9): on whenever the DICOM spool is ----
    /// Send every result (SR and SC) to this PACS by C-STORE: AE@HOST:PORT (repeat for
    /// several). Without one, results are kept in <data-dir>/results and the results API.
    #[arg(
        long = "results-destination",
        env = "NIGHTINGALE_RESULTS_DESTINATION",
        value_delimiter = ','
    )]
    pub results_destinations: Vec<String>,
    /// A series is complete after this many seconds with no new instance. [default: 10]
    #[arg(long, env = "NIGHTINGALE_SERIES_QUIET_SECS")]
    pub series_quiet_secs: Option<f64>,
    /// ... or at once when it has this many instances.
    #[arg(long, env = "NIGHTINGALE_SERIES_COMPLETE_INSTANCES")]
    pub series_complete_instances: Option<u64>,
    /// Instances arriving for a series already processed: rerun (a new result series; the
    /// old one is kept, superseded) or ignore. [default: rerun]
    #[arg(long, env = "NIGHTINGALE_LATE_INSTANCES", value_enum)]
    pub late_instances: Option<LateArg>,
    // -- results delivery retries (issue 9, PEERS slice) --
    /// Delay before the first retry of a result object not delivered, in seconds (doubled
    /// after each failed attempt, up to 300 s). [default: 2]
    #[arg(long, env = "NIGHTINGALE_RESULTS_RETRY_SECS")]
    pub results_retry_secs: Option<f64>,
    /// Delivery attempts per result object before it goes to the dead-letter folder (with
    /// the default delays, 100 attempts span about 7.7 hours: a PACS restart or a night's
    /// maintenance; `nightingale results resend` sends dead letters again). [default: 100]
    #[arg(long, env = "NIGHTINGALE_RESULTS_MAX_ATTEMPTS")]
    pub results_max_attempts: Option<u32>,
    /// Bound on one whole C-STORE exchange of a result object with a destination (request,
    /// data set, response), in seconds: a PACS slower than this fails the attempt, which is
    /// retried. Raise it for very large objects on slow links. [default: 120]
    #[arg(long, env = "NIGHTINGALE_RESULTS_TIMEOUT_SECS")]
    pub results_timeout_secs: Option<f64>,
    // ---- end DICOM pipeline ----
    // ---- CDS Hooks (issue 10) ----
    /// Trust an EHR: ISSUER=JWKS_FILE or ISSUER=https://…/jwks.json (repeatable; a URL is
    /// fetched at start-up, every 10 minutes and when keys rotate). Its JWTs (ES384, RS384,
    /// …) open the CDS services; with none, every CDS call answers 401 (discovery stays open).
    #[arg(
        long = "cds-trust",
        env = "NIGHTINGALE_CDS_TRUST",
        value_delimiter = ','
    )]
    pub cds_trust: Vec<String>,
    /// Serve a version only when a validation report says it passed its bundle's gate for
    /// the exact manifest (SHA-256) being loaded: `report.json` files in the folders under
    /// --validation-reports (what `nightingale validate --out` and `POST /validation/runs`
    /// write). A version without one is refused like a bad signature, and with it the
    /// load: every version the bundle's version policy selects needs one.
    #[arg(long, env = "NIGHTINGALE_REQUIRE_VALIDATION", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub require_validation: Option<bool>,
    /// Offer every explanation method (`POST /v2/models/{m}/explain`) for every bundle,
    /// also those without an `[explain]` section (theirs still sets their own methods and
    /// budget).
    #[arg(long, env = "NIGHTINGALE_EXPLAIN", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub explain: Option<bool>,
    /// The forward-pass budget of one explanation for bundles without `[explain]`, under
    /// --explain. [default: 4096]
    #[arg(long, env = "NIGHTINGALE_EXPLAIN_MAX_FORWARD_PASSES")]
    pub explain_max_forward_passes: Option<usize>,
    /// Explanations computed at once across the server; more wait their turn (up to four
    /// each), beyond that 503 with Retry-After. [default: the machine's cores]
    #[arg(long, env = "NIGHTINGALE_EXPLAIN_MAX_CONCURRENT")]
    pub explain_max_concurrent: Option<usize>,
    /// Where --require-validation looks for reports (each in its own folder).
    /// [default: <data-dir>/validation/runs]
    #[arg(long, env = "NIGHTINGALE_VALIDATION_REPORTS")]
    pub validation_reports: Option<PathBuf>,
    /// A folder whose datasets researchers may name in `POST /validation/runs` (JSON
    /// requests); without it, datasets are uploaded in the request (text/csv).
    #[arg(long, env = "NIGHTINGALE_VALIDATION_ROOT")]
    pub validation_root: Option<PathBuf>,
    /// The largest dataset `POST /validation/runs` accepts as an upload, in bytes.
    /// [default: 268435456]
    #[arg(long, env = "NIGHTINGALE_VALIDATION_MAX_UPLOAD_BYTES")]
    pub validation_max_upload_bytes: Option<u64>,
    /// How long a validation run may take, in seconds (10 s to 7 days); a run still going
    /// then stops as a cancelled one does and is reported failed. [default: 14400]
    #[arg(long, env = "NIGHTINGALE_VALIDATION_MAX_RUN_SECS")]
    pub validation_max_run_secs: Option<u64>,
    /// What the CDS service URLs start with (the JWTs' `aud` is
    /// <base>/cds-services/{id}); default: http(s)://<Host header>.
    #[arg(long, env = "NIGHTINGALE_CDS_BASE_URL")]
    pub cds_base_url: Option<String>,
    /// A FHIR server (URL prefix) the CDS services may fetch missing prefetch from, with
    /// the EHR's token (repeatable; https://, or http:// on a loopback host or with
    /// --insecure); with none, they never fetch.
    #[arg(
        long = "cds-fhir-server",
        env = "NIGHTINGALE_CDS_FHIR_SERVER",
        value_delimiter = ','
    )]
    pub cds_fhir_servers: Vec<String>,
    /// Deadline of the fetch from fhirServer, in milliseconds. [default: 1500]
    #[arg(long, env = "NIGHTINGALE_CDS_FETCH_TIMEOUT_MS")]
    pub cds_fetch_timeout_ms: Option<u64>,
    /// The FHIR Patient identifier system whose value is the DICOM Patient ID (e.g.
    /// https://fhir.nhs.uk/Id/nhs-number): patient-view answers then carry a card per
    /// finding the DICOM pipeline made for the patient.
    #[arg(long, env = "NIGHTINGALE_CDS_IMAGING_IDENTIFIER_SYSTEM")]
    pub cds_imaging_identifier_system: Option<String>,
    /// An Issuer of Patient ID (0010,0021) whose Patient IDs are of that identifier system
    /// (e.g. `NHS`; repeat or separate with commas). Series whose Patient ID has no issuer
    /// always match; one with another issuer never does.
    #[arg(
        long = "cds-imaging-issuer",
        env = "NIGHTINGALE_CDS_IMAGING_ISSUER",
        value_delimiter = ','
    )]
    pub cds_imaging_issuers: Vec<String>,
    // ---- end CDS Hooks ----
}

/// What to do with instances that arrive for a series already processed.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LateArg {
    Rerun,
    Ignore,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendArg {
    Tract,
    Ort,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TractKernelsArg {
    Nightingale,
    Tract,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderArg {
    Cpu,
    Cuda,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuditStoreKind {
    #[default]
    Jsonl,
    Sqlite,
    Postgres,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `nightingale.toml`: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// Every path key is read from the file's folder when relative ([`FileConfig::paths_from`]).
    repository: Option<PathBuf>,
    http_addr: Option<SocketAddr>,
    grpc_addr: Option<SocketAddr>,
    backend: Option<BackendArg>,
    intra_op_threads: Option<usize>,
    execution_provider: Option<ProviderArg>,
    cuda_device: Option<i32>,
    ort_library: Option<PathBuf>,
    tract_kernels: Option<TractKernelsArg>,
    max_inference_bytes: Option<u64>,
    max_engine_threads: Option<usize>,
    max_body_bytes: Option<usize>,
    max_inflight_bytes: Option<usize>,
    max_inflight_requests: Option<usize>,
    max_open_requests: Option<usize>,
    max_open_requests_per_client: Option<usize>,
    max_connections: Option<usize>,
    max_connections_per_client: Option<usize>,
    admin_token: Option<String>,
    request_timeout_secs: Option<u64>,
    request_timeout_ms: Option<u64>,
    data_dir: Option<PathBuf>,
    audit_store: Option<AuditStoreKind>,
    audit_log: Option<PathBuf>,
    audit_rotate_bytes: Option<u64>,
    audit_postgres_url: Option<String>,
    audit_fsync: Option<bool>,
    audit_digest_key: Option<PathBuf>,
    log_format: Option<LogFormat>,
    insecure: Option<bool>,
    auth: Option<crate::http::auth::AuthSection>,
    trusted_keys: Option<Vec<PathBuf>>,
    require_signatures: Option<bool>,
    repository_poll_secs: Option<f64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    tls_client_auth: Option<crate::tls::ClientAuth>,
    // ---- DICOM ingest (issue 8) ----
    dicom_port: Option<u16>,
    dicom_addr: Option<SocketAddr>,
    dicom_ae_title: Option<String>,
    dicom_spool: Option<PathBuf>,
    dicom_allowed_aes: Option<Vec<String>>,
    dicom_check_called_ae: Option<bool>,
    dicom_max_pdu: Option<u32>,
    dicom_max_associations: Option<usize>,
    dicom_association_timeout_secs: Option<f64>,
    dicom_idle_timeout_secs: Option<f64>,
    dicom_max_instance_bytes: Option<u64>,
    dicom_max_inflight_bytes: Option<u64>,
    dicom_spool_min_free_bytes: Option<u64>,
    dicom_sop_classes: Option<Vec<String>>,
    // -- DICOM retention and audit (issue 8, OPS slice) --
    dicom_retention_days: Option<f64>,
    dicom_audit_uids: Option<crate::audit::dicom::UidAudit>,
    // ---- end DICOM ----
    // ---- DICOMweb (issue 8) ----
    dicomweb_max_part_bytes: Option<u64>,
    dicomweb_max_request_bytes: Option<u64>,
    dicomweb_timeout_secs: Option<f64>,
    dicomweb_max_streams: Option<usize>,
    // ---- end DICOMweb ----
    // ---- DICOM pipeline (issue 9) ----
    results_destinations: Option<Vec<String>>,
    series_quiet_secs: Option<f64>,
    series_complete_instances: Option<u64>,
    late_instances: Option<LateArg>,
    /// `[[routes]]`: routing rules (none: one route per bundle with a `[dicom]` section).
    routes: Option<Vec<crate::pipeline::route::RouteConfig>>,
    // -- results delivery retries (issue 9, PEERS slice) --
    results_retry_secs: Option<f64>,
    results_max_attempts: Option<u32>,
    results_timeout_secs: Option<f64>,
    // ---- end DICOM pipeline ----
    // ---- CDS Hooks (issue 10) ----
    /// `[cds]`: the services (`[[cds.services]]`).
    cds: Option<nightingale_decision_support::service::CdsSection>,
    cds_trust: Option<Vec<String>>,
    cds_base_url: Option<String>,
    validation_root: Option<PathBuf>,
    validation_max_upload_bytes: Option<u64>,
    validation_max_run_secs: Option<u64>,
    require_validation: Option<bool>,
    explain: Option<bool>,
    explain_max_forward_passes: Option<usize>,
    explain_max_concurrent: Option<usize>,
    validation_reports: Option<PathBuf>,
    cds_fhir_servers: Option<Vec<String>>,
    cds_fetch_timeout_ms: Option<u64>,
    cds_imaging_identifier_system: Option<String>,
    cds_imaging_issuers: Option<Vec<String>>,
    // ---- end CDS Hooks ----
}

/// The resolved server configuration.
#[derive(Clone)]
pub struct ServeConfig {
    pub repository: PathBuf,
    pub http_addr: SocketAddr,
    /// `--grpc-addr`: KServe v2 gRPC beside HTTP; `None`: off.
    pub grpc_addr: Option<SocketAddr>,
    pub backend: BackendKind,
    pub intra_op_threads: usize,
    pub execution_provider: ExecutionProvider,
    pub ort_library: Option<PathBuf>,
    pub tract_kernels: TractKernels,
    pub max_inference_bytes: u64,
    pub max_engine_threads: usize,
    pub max_body_bytes: usize,
    pub max_inflight_bytes: usize,
    pub max_inflight_requests: usize,
    /// `--max-open-requests`.
    pub max_open_requests: usize,
    /// `--max-open-requests-per-client`.
    pub max_open_requests_per_client: usize,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub admin_token: Option<String>,
    pub request_timeout: std::time::Duration,
    pub data_dir: PathBuf,
    /// Validation runs: the server-side datasets' folder, and the upload cap.
    pub validation_root: Option<PathBuf>,
    pub validation_max_upload_bytes: u64,
    /// `--validation-max-run-secs`.
    pub validation_max_run: std::time::Duration,
    /// `--require-validation`: the folder of reports a version needs a passing one in.
    pub require_validation: Option<PathBuf>,
    /// `--explain`, `--explain-max-forward-passes`.
    pub explain: crate::http::ExplainPolicy,
    pub audit: AuditConfig,
    /// The key that seals the audit records' tensor digests (`--audit-digest-key`).
    pub audit_digest_key: PathBuf,
    pub log_format: LogFormat,
    /// API keys, JWT, client-certificate and anonymous roles (`[auth]`).
    pub auth: crate::http::auth::AuthConfig,
    /// `--insecure`: a non-loopback address without credentials was accepted.
    pub insecure: bool,
    /// Trusted signing keys (loaded) and whether signatures are required.
    pub signatures: nightingale_models::SignaturePolicy,
    /// How often the repository poller looks for changes (`None`: it does not run).
    pub repository_poll: Option<std::time::Duration>,
    /// HTTPS instead of plain HTTP when set.
    pub tls: Option<crate::tls::TlsSettings>,
    /// The DICOM SCP and its spool (`None`: off).
    pub dicom: Option<DicomConfig>,
    /// DICOMweb over the DICOM spool (`None`: off; on with --dicom-spool or the SCP).
    pub dicomweb: Option<DicomWebSettings>,
    /// The DICOM pipeline over the spool (`None`: off; on whenever the spool is).
    pub pipeline: Option<PipelineSettings>,
    /// CDS Hooks (always on: discovery open, calls need a trusted EHR's JWT).
    pub cds: crate::cds::CdsSettings,
}

/// The DICOM pipeline's settings (issue 9).
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub destinations: Vec<crate::pipeline::route::Destination>,
    pub quiet: std::time::Duration,
    pub complete_at: Option<u64>,
    pub late: crate::pipeline::Late,
    /// The AE title results are sent from (the SCP's).
    pub calling_ae_title: String,
    /// Configured routes (empty: one per bundle with a `[dicom]` section).
    pub routes: Vec<crate::pipeline::route::Route>,
    // -- results delivery retries (issue 9, PEERS slice) --
    /// First retry delay (`None`: the pipeline's default).
    pub retry: Option<std::time::Duration>,
    /// Delivery attempts per object (`None`: the pipeline's default).
    pub max_attempts: Option<u32>,
    /// Bound on one C-STORE exchange of a result object (`None`: the pipeline's default).
    pub exchange_timeout: Option<std::time::Duration>,
}

/// DICOMweb (STOW-RS, QIDO-RS): its spool (the SCP's when both run) and limits.
#[derive(Debug, Clone)]
pub struct DicomWebSettings {
    pub spool: PathBuf,
    pub spool_options: nightingale_dicom::SpoolOptions,
    pub limits: crate::http::dicomweb::DicomWebConfig,
    /// How long received instances are kept (`None`: forever): the SCP's setting.
    pub retention: Option<std::time::Duration>,
    /// How instance UIDs appear in the audit records of STOW-RS parts.
    pub audit_uids: crate::audit::dicom::UidAudit,
}

/// The DICOM SCP's settings and where its spool is.
#[derive(Debug, Clone)]
pub struct DicomConfig {
    pub scp: nightingale_dicom::ScpConfig,
    pub spool: PathBuf,
    pub spool_options: nightingale_dicom::SpoolOptions,
    // -- DICOM retention and audit (issue 8, OPS slice) --
    /// How long received instances are kept (`None`: forever).
    pub retention: Option<std::time::Duration>,
    /// How instance UIDs appear in the audit trail.
    pub audit_uids: crate::audit::dicom::UidAudit,
}

/// Days of DICOM retention by default: patient data is not kept forever.
pub const DEFAULT_DICOM_RETENTION_DAYS: f64 = 30.0;

/// Where the audit trail goes.
#[derive(Clone)]
pub enum AuditConfig {
    Jsonl {
        path: PathBuf,
        rotate_bytes: u64,
        fsync: bool,
    },
    Sqlite {
        path: PathBuf,
        fsync: bool,
    },
    Postgres {
        url: String,
    },
}

impl std::fmt::Debug for AuditConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuditConfig::Jsonl {
                path,
                rotate_bytes,
                fsync,
            } => f
                .debug_struct("Jsonl")
                .field("path", path)
                .field("rotate_bytes", rotate_bytes)
                .field("fsync", fsync)
                .finish(),
            AuditConfig::Sqlite { path, fsync } => f
                .debug_struct("Sqlite")
                .field("path", path)
                .field("fsync", fsync)
                .finish(),
            AuditConfig::Postgres { url } => f
                .debug_struct("Postgres")
                .field("url", &crate::audit::postgres::redact(url))
                .finish(),
        }
    }
}

impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("repository", &self.repository)
            .field("http_addr", &self.http_addr)
            .field("grpc_addr", &self.grpc_addr)
            .field("backend", &self.backend)
            .field("intra_op_threads", &self.intra_op_threads)
            .field("execution_provider", &self.execution_provider)
            .field("ort_library", &self.ort_library)
            .field("tract_kernels", &self.tract_kernels)
            .field("max_inference_bytes", &self.max_inference_bytes)
            .field("max_engine_threads", &self.max_engine_threads)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_inflight_bytes", &self.max_inflight_bytes)
            .field("max_inflight_requests", &self.max_inflight_requests)
            .field("max_open_requests", &self.max_open_requests)
            .field(
                "max_open_requests_per_client",
                &self.max_open_requests_per_client,
            )
            .field("max_connections", &self.max_connections)
            .field(
                "max_connections_per_client",
                &self.max_connections_per_client,
            )
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("request_timeout", &self.request_timeout)
            .field("data_dir", &self.data_dir)
            .field("audit", &self.audit)
            .field("log_format", &self.log_format)
            .field("auth", &self.auth)
            .field("insecure", &self.insecure)
            .field("signatures", &self.signatures)
            .field("repository_poll", &self.repository_poll)
            .field("tls", &self.tls)
            .field("dicom", &self.dicom)
            .field("dicomweb", &self.dicomweb)
            .finish()
    }
}

/// The configuration could not be read or makes no sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `detail` is the parser's message and its place, never the line itself: the file
    /// holds secrets (an admin token, a database URL with its password) that an error about
    /// a neighbouring key, or a typo in theirs, would otherwise print.
    #[error("config file {path}: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Auth(#[from] crate::http::auth::AuthConfigError),
}

impl FileConfig {
    /// The file's relative paths read from its folder `dir`, as its TLS, `[auth]` and trust
    /// files are: the data folder, the repository, the audit trail and the spool were read
    /// from the working directory, so the same file started from another folder (systemd
    /// starts in `/`) began a new audit trail and digest key there (a review's finding). An
    /// empty path is refused with its key named (`data_dir = ""` wrote into the working
    /// directory).
    fn paths_from(&mut self, dir: &Path) -> Result<(), ConfigError> {
        for (key, path) in [
            ("repository", &mut self.repository),
            ("ort_library", &mut self.ort_library),
            ("data_dir", &mut self.data_dir),
            ("audit_log", &mut self.audit_log),
            ("audit_digest_key", &mut self.audit_digest_key),
            ("dicom_spool", &mut self.dicom_spool),
            ("validation_root", &mut self.validation_root),
            ("validation_reports", &mut self.validation_reports),
        ] {
            let Some(p) = path.as_mut() else {
                continue;
            };
            if p.as_os_str().is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "{key} is empty: name a path, or leave the key out"
                )));
            }
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(())
    }
}

impl ServeArgs {
    /// Merges flags/env over the config file over defaults, and checks the result.
    /// Flags win over the environment, also across a pair where one overrides the other
    /// (`--request-timeout-ms` over `--request-timeout-secs`, `--dicom-addr` over
    /// `--dicom-port`): the overriding one set in the environment does not beat the other
    /// given on the command line (clap's parse makes both look given: a red-team finding).
    pub fn prefer_flags_over_env(&mut self, matches: &clap::ArgMatches) {
        use clap::parser::ValueSource::{CommandLine, EnvVariable};
        let from = |id: &str| matches.value_source(id);
        if from("request_timeout_ms") == Some(EnvVariable)
            && from("request_timeout_secs") == Some(CommandLine)
        {
            self.request_timeout_ms = None;
        }
        if from("dicom_addr") == Some(EnvVariable) && from("dicom_port") == Some(CommandLine) {
            self.dicom_addr = None;
        }
    }

    pub fn resolve(self) -> Result<ServeConfig, ConfigError> {
        let mut file = match &self.config {
            Some(path) => read_file(path)?,
            None if Path::new("nightingale.toml").is_file() => {
                read_file(Path::new("nightingale.toml"))?
            }
            None => FileConfig::default(),
        };
        file.paths_from(
            self.config
                .as_deref()
                .and_then(Path::parent)
                .unwrap_or(Path::new("")),
        )?;
        let backend = match self.backend.or(file.backend).unwrap_or(BackendArg::Tract) {
            BackendArg::Tract => BackendKind::Tract,
            BackendArg::Ort => BackendKind::Ort,
        };
        if !backend.is_compiled() {
            return Err(ConfigError::Invalid(format!(
                "backend {backend} is not compiled into this build (rebuild with --features {backend})"
            )));
        }
        let execution_provider = match self
            .execution_provider
            .or(file.execution_provider)
            .unwrap_or(ProviderArg::Cpu)
        {
            ProviderArg::Cpu => ExecutionProvider::Cpu,
            ProviderArg::Cuda => ExecutionProvider::Cuda {
                device_id: self.cuda_device.or(file.cuda_device).unwrap_or(0),
            },
        };
        let max_body_bytes = self
            .max_body_bytes
            .or(file.max_body_bytes)
            .unwrap_or(64 << 20);
        // At most the largest budget (`max_inflight_bytes` ≤ 1 TiB holds two bodies): a
        // value near u64::MAX overflowed the check below (a panic; wrapped to 0 in a
        // release build: a red-team finding).
        if !(1024..=1 << 39).contains(&max_body_bytes) {
            return Err(ConfigError::Invalid(
                "max_body_bytes must be between 1024 and 512 GiB".into(),
            ));
        }
        let max_inference_bytes = self
            .max_inference_bytes
            .or(file.max_inference_bytes)
            .unwrap_or(nightingale_inference::DEFAULT_MAX_WORKING_BYTES);
        if max_inference_bytes < 1 << 20 {
            return Err(ConfigError::Invalid(
                "max_inference_bytes must be at least 1 MiB".into(),
            ));
        }
        let max_engine_threads = self
            .max_engine_threads
            .or(file.max_engine_threads)
            .unwrap_or(nightingale_models::DEFAULT_MAX_ENGINE_THREADS);
        if max_engine_threads == 0 {
            return Err(ConfigError::Invalid(
                "max_engine_threads must be at least 1".into(),
            ));
        }
        let max_inflight_bytes = self
            .max_inflight_bytes
            .or(file.max_inflight_bytes)
            .unwrap_or(crate::http::DEFAULT_MAX_INFLIGHT_BYTES);
        // Counted in KiB by a semaphore that takes at most u32::MAX at once.
        if !(1 << 20..=1 << 40).contains(&max_inflight_bytes) {
            return Err(ConfigError::Invalid(
                "max_inflight_bytes must be between 1 MiB and 1 TiB".into(),
            ));
        }
        if max_inflight_bytes < 2 * max_body_bytes {
            return Err(ConfigError::Invalid(format!(
                "max_inflight_bytes ({max_inflight_bytes}) must be at least twice max_body_bytes ({max_body_bytes}): a body is charged twice its size"
            )));
        }
        let max_inflight_requests = self
            .max_inflight_requests
            .or(file.max_inflight_requests)
            .unwrap_or(crate::http::DEFAULT_MAX_INFLIGHT_REQUESTS);
        if !(1..=MAX_INFLIGHT_REQUESTS).contains(&max_inflight_requests) {
            return Err(ConfigError::Invalid(format!(
                "max_inflight_requests must be between 1 and {MAX_INFLIGHT_REQUESTS} (got {max_inflight_requests})"
            )));
        }
        let max_open_requests = self
            .max_open_requests
            .or(file.max_open_requests)
            .unwrap_or(crate::http::DEFAULT_MAX_OPEN_REQUESTS);
        if !(1..=MAX_INFLIGHT_REQUESTS).contains(&max_open_requests) {
            return Err(ConfigError::Invalid(format!(
                "max_open_requests must be between 1 and {MAX_INFLIGHT_REQUESTS} (got {max_open_requests})"
            )));
        }
        let max_open_requests_per_client = self
            .max_open_requests_per_client
            .or(file.max_open_requests_per_client)
            .unwrap_or_else(|| crate::http::open_requests_per_client(max_open_requests));
        if !(1..=max_open_requests).contains(&max_open_requests_per_client) {
            return Err(ConfigError::Invalid(format!(
                "max_open_requests_per_client must be between 1 and max_open_requests ({max_open_requests}; got {max_open_requests_per_client})"
            )));
        }
        let intra_op_threads = self.intra_op_threads.or(file.intra_op_threads).unwrap_or(1);
        if intra_op_threads > MAX_INTRA_OP_THREADS {
            return Err(ConfigError::Invalid(format!(
                "intra_op_threads must be between 0 (the engine's default) and {MAX_INTRA_OP_THREADS} (got {intra_op_threads})"
            )));
        }
        if let Some(device) = self.cuda_device.or(file.cuda_device)
            && !(0..=MAX_CUDA_DEVICE).contains(&device)
        {
            return Err(ConfigError::Invalid(format!(
                "cuda_device must be between 0 and {MAX_CUDA_DEVICE} (got {device})"
            )));
        }
        let max_connections = self
            .max_connections
            .or(file.max_connections)
            .unwrap_or(crate::http::serve::ConnectionLimits::default().max_connections);
        if !(1..=1 << 20).contains(&max_connections) {
            return Err(ConfigError::Invalid(
                "max_connections must be between 1 and 1048576".into(),
            ));
        }
        let max_connections_per_client = self
            .max_connections_per_client
            .or(file.max_connections_per_client)
            .unwrap_or(crate::http::clients::DEFAULT_MAX_PER_CLIENT);
        if !(1..=1 << 20).contains(&max_connections_per_client) {
            return Err(ConfigError::Invalid(
                "max_connections_per_client must be between 1 and 1048576".into(),
            ));
        }
        let admin_token = self
            .admin_token
            .or(file.admin_token)
            .filter(|t| !t.is_empty());
        // Milliseconds win over seconds at each level (flags/env, then file).
        let request_timeout_ms = match (self.request_timeout_ms, self.request_timeout_secs) {
            (Some(ms), _) => Some(ms),
            (None, Some(s)) => Some(s.saturating_mul(1000)),
            (None, None) => file
                .request_timeout_ms
                .or(file.request_timeout_secs.map(|s| s.saturating_mul(1000))),
        }
        .unwrap_or(120_000);
        if !(1..=MAX_REQUEST_TIMEOUT_MS).contains(&request_timeout_ms) {
            // Named as given (a value of seconds times 1000 saturated: the message showed a
            // number nobody gave).
            let got = match (self.request_timeout_ms, self.request_timeout_secs) {
                (Some(ms), _) => format!("{ms} ms"),
                (None, Some(s)) => format!("{s} s"),
                (None, None) => match (file.request_timeout_ms, file.request_timeout_secs) {
                    (Some(ms), _) => format!("{ms} ms"),
                    (None, Some(s)) => format!("{s} s"),
                    (None, None) => format!("{request_timeout_ms} ms"),
                },
            };
            return Err(ConfigError::Invalid(format!(
                "the request timeout (request_timeout_ms / request_timeout_secs) must be between 1 ms and {} s (got {got})",
                MAX_REQUEST_TIMEOUT_MS / 1000
            )));
        }
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("nightingale-data"));
        let audit_fsync = self.audit_fsync.or(file.audit_fsync).unwrap_or(false);
        let audit_digest_key = self
            .audit_digest_key
            .or(file.audit_digest_key)
            .unwrap_or_else(|| data_dir.join("audit-digest.key"));
        let audit_log = self.audit_log.or(file.audit_log);
        let store_kind = self.audit_store.or(file.audit_store).unwrap_or_default();
        // Settings of another store than the one chosen are refused, not ignored: an
        // operator who names a trail file and gets the SQLite database instead audits
        // somewhere they are not looking (a review's finding).
        let rotate_given = self.audit_rotate_bytes.is_some() || file.audit_rotate_bytes.is_some();
        let postgres_given = self.audit_postgres_url.is_some() || file.audit_postgres_url.is_some();
        let stray: Vec<&str> = [
            (
                audit_log.is_some() && store_kind != AuditStoreKind::Jsonl,
                "audit_log",
            ),
            (
                rotate_given && store_kind != AuditStoreKind::Jsonl,
                "audit_rotate_bytes",
            ),
            (
                postgres_given && store_kind != AuditStoreKind::Postgres,
                "audit_postgres_url",
            ),
        ]
        .into_iter()
        .filter_map(|(given, name)| given.then_some(name))
        .collect();
        if !stray.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "{} set, but the audit store is {}: those settings belong to another store",
                stray.join(", "),
                format!("{store_kind:?}").to_lowercase()
            )));
        }
        let audit = match store_kind {
            AuditStoreKind::Jsonl => AuditConfig::Jsonl {
                path: audit_log.unwrap_or_else(|| data_dir.join("audit").join("audit.jsonl")),
                rotate_bytes: audit_rotate_bytes(
                    self.audit_rotate_bytes
                        .or(file.audit_rotate_bytes)
                        .unwrap_or(64 << 20),
                )?,
                fsync: audit_fsync,
            },
            AuditStoreKind::Sqlite => AuditConfig::Sqlite {
                path: data_dir.join("audit.sqlite3"),
                fsync: audit_fsync,
            },
            AuditStoreKind::Postgres => AuditConfig::Postgres {
                url: self
                    .audit_postgres_url
                    .or(file.audit_postgres_url)
                    .filter(|u| !u.is_empty())
                    .ok_or_else(|| {
                        ConfigError::Invalid(
                            "audit_store = postgres needs audit_postgres_url".into(),
                        )
                    })?,
            },
        };
        if admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(ConfigError::Invalid(
                "admin_token must be at least 16 characters".into(),
            ));
        }
        // A client presents it in a header, whose value is trimmed and visible ASCII: a
        // token with a space or another character was accepted here and matched no request
        // ever (a red-team finding).
        if admin_token
            .as_ref()
            .is_some_and(|t| !t.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(ConfigError::Invalid(
                "admin_token must be visible ASCII characters without spaces (it is sent in an HTTP header)".into(),
            ));
        }
        // Relative paths in the file are read from its folder (the TLS files, `[auth]`'s, the
        // trusted keys, the CDS issuers' JWKS files); on the command line, from the working
        // directory. A relative `tls_client_ca` read from wherever the service was started
        // could be another CA (a review's finding); so could a trusted key (a red-team's).
        let config_dir = match &self.config {
            Some(path) => path.parent().map(Path::to_path_buf).unwrap_or_default(),
            None => PathBuf::new(),
        };
        let trusted_keys = if !self.trusted_keys.is_empty() {
            self.trusted_keys
        } else {
            file.trusted_keys
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(|p| config_dir.join(p))
                .collect()
        };
        // On/off settings: the flag or its environment variable (`false` too) wins over
        // the file (an explicit false in the environment could not turn off the file's
        // `insecure = true`: a red-team finding).
        let require_signatures = self
            .require_signatures
            .or(file.require_signatures)
            .unwrap_or(false);
        if require_signatures && trusted_keys.is_empty() {
            return Err(ConfigError::Invalid(
                "require_signatures needs at least one trusted key (--trusted-key FILE)".into(),
            ));
        }
        let signatures =
            nightingale_models::SignaturePolicy::load(&trusted_keys, require_signatures)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let poll_secs = self
            .repository_poll_secs
            .or(file.repository_poll_secs)
            .unwrap_or(0.0);
        // Refused below the floor rather than silently raised to it.
        if !(poll_secs == 0.0 || (MIN_POLL_SECS..=86_400.0).contains(&poll_secs)) {
            return Err(ConfigError::Invalid(format!(
                "repository_poll_secs must be 0 (off) or between {MIN_POLL_SECS} and 86400 seconds (got {poll_secs})"
            )));
        }
        let repository_poll =
            (poll_secs > 0.0).then(|| std::time::Duration::from_secs_f64(poll_secs));
        let from_file = |p: Option<PathBuf>| p.map(|p| config_dir.join(p));
        let tls = resolve_tls(
            self.tls_cert.or(from_file(file.tls_cert)),
            self.tls_key.or(from_file(file.tls_key)),
            self.tls_client_ca.or(from_file(file.tls_client_ca)),
            self.tls_client_auth.or(file.tls_client_auth),
        )?;
        // Roles and credentials: `[auth]` (relative paths from the config file's folder), and
        // the start-up rule for addresses other than loopback.
        let mut auth = file.auth.unwrap_or_default().resolve(&config_dir)?;
        // `--admin-token` is one more key: one of `[[auth.api_keys]]` with its secret was
        // shadowed by it, silently (a review's finding).
        if let Some(token) = &admin_token {
            use sha2::Digest as _;
            let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
            if let Some(k) = auth.api_keys.iter().find(|k| k.sha256 == digest) {
                return Err(ConfigError::Invalid(format!(
                    "admin_token is the key of auth.api_keys {:?}: give each its own secret",
                    k.name
                )));
            }
        }
        // Verified TLS client certificates are a credential (mutual TLS).
        auth.client_certificates_verified = tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        let insecure = self.insecure.or(file.insecure).unwrap_or(false);
        let http_addr = self
            .http_addr
            .or(file.http_addr)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8000)));
        auth.check_bind(http_addr, insecure)?;
        // As the bind rule judges it: `[::ffff:127.0.0.1]` is loopback too (judged by
        // `Ipv6Addr::is_loopback`, it passed the bind rule as loopback and then had no Host
        // check: a red-team finding).
        auth.loopback_listener = crate::http::auth::is_loopback(http_addr);
        let grpc_addr = self.grpc_addr.or(file.grpc_addr);
        if let Some(addr) = grpc_addr {
            auth.check_bind(addr, insecure)?;
            auth.loopback_grpc_listener = crate::http::auth::is_loopback(addr);
            // Found here, naming both (it failed after HTTP was listening: a review's
            // finding). Port 0 is a free port each.
            if addr.port() != 0
                && addr.port() == http_addr.port()
                && (addr.ip() == http_addr.ip()
                    || addr.ip().is_unspecified()
                    || http_addr.ip().is_unspecified())
            {
                return Err(ConfigError::Invalid(format!(
                    "grpc_addr (--grpc-addr) {addr} takes the port of http_addr (--http-addr) {http_addr}: give each its own port"
                )));
            }
        }

        // DICOMweb (issue 8): read before the DICOM block takes the spool path.
        let dicomweb_spool = self.dicom_spool.clone().or(file.dicom_spool.clone());
        // ---- DICOM ingest (issue 8) ----
        let dicom_addr = self
            .dicom_addr
            .or(self
                .dicom_port
                .map(|p| SocketAddr::from(([127, 0, 0, 1], p))))
            .or(file.dicom_addr)
            .or(file
                .dicom_port
                .map(|p| SocketAddr::from(([127, 0, 0, 1], p))));
        let dicom = match dicom_addr {
            None => None,
            Some(addr) => {
                // One port per listener: found here, naming both, where the SCP's bind failed
                // late with only the address (a review's finding). Port 0 is a free port each.
                for (other, what) in [
                    (Some(http_addr), "http_addr (--http-addr)"),
                    (grpc_addr, "grpc_addr (--grpc-addr)"),
                ] {
                    if let Some(other) = other.filter(|o| o.port() != 0 && o.port() == addr.port())
                        && (other.ip() == addr.ip()
                            || other.ip().is_unspecified()
                            || addr.ip().is_unspecified())
                    {
                        return Err(ConfigError::Invalid(format!(
                            "the DICOM SCP's address {addr} (dicom_addr, --dicom-addr, --dicom-port) \
                             takes the port of {what} {other}: give each its own port"
                        )));
                    }
                }
                // At least a second: a DICOM peer's round trip is not sub-second by contract
                // (an idle timeout of 1e-9 s was taken, and every association aborted: a
                // review's finding).
                let secs = |v: Option<f64>, default: f64, what: &str| {
                    let v = v.unwrap_or(default);
                    if v.is_finite() && (1.0..=86_400.0).contains(&v) {
                        Ok(std::time::Duration::from_secs_f64(v))
                    } else {
                        Err(ConfigError::Invalid(format!(
                            "{what} must be between 1 and 86400 seconds"
                        )))
                    }
                };
                let allowed = if !self.dicom_allowed_aes.is_empty() {
                    Some(self.dicom_allowed_aes)
                } else {
                    file.dicom_allowed_aes
                };
                let allowed = allowed
                    .map(|list| {
                        list.iter()
                            .map(|a| a.parse::<nightingale_dicom::AllowedAe>())
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .transpose()
                    .map_err(|e| ConfigError::Invalid(e.to_string()))?;
                let mut scp = nightingale_dicom::ScpConfig::new(addr);
                scp.ae_title = self
                    .dicom_ae_title
                    .or(file.dicom_ae_title)
                    .unwrap_or_else(|| scp.ae_title.clone());
                scp.allowed = allowed;
                scp.insecure = insecure;
                scp.check_called_ae = self
                    .dicom_check_called_ae
                    .or(file.dicom_check_called_ae)
                    .unwrap_or(false);
                scp.max_pdu_length = self
                    .dicom_max_pdu
                    .or(file.dicom_max_pdu)
                    .unwrap_or(scp.max_pdu_length);
                scp.max_associations = self
                    .dicom_max_associations
                    .or(file.dicom_max_associations)
                    .unwrap_or(scp.max_associations);
                scp.association_timeout = secs(
                    self.dicom_association_timeout_secs
                        .or(file.dicom_association_timeout_secs),
                    30.0,
                    "dicom_association_timeout_secs",
                )?;
                scp.idle_timeout = secs(
                    self.dicom_idle_timeout_secs
                        .or(file.dicom_idle_timeout_secs),
                    120.0,
                    "dicom_idle_timeout_secs",
                )?;
                scp.max_instance_bytes = self
                    .dicom_max_instance_bytes
                    .or(file.dicom_max_instance_bytes)
                    .unwrap_or(scp.max_instance_bytes);
                scp.max_inflight_bytes = self
                    .dicom_max_inflight_bytes
                    .or(file.dicom_max_inflight_bytes)
                    .unwrap_or(scp.max_inflight_bytes);
                scp.extra_sop_classes = if !self.dicom_sop_classes.is_empty() {
                    self.dicom_sop_classes.clone()
                } else {
                    file.dicom_sop_classes.clone().unwrap_or_default()
                };
                // No DICOM instance is smaller (file meta and the attributes every store
                // needs): 0 refused every C-STORE (a review's finding).
                if scp.max_instance_bytes < 1024 {
                    return Err(ConfigError::Invalid(
                        "dicom_max_instance_bytes (--dicom-max-instance-bytes) must be at least 1024 \
                         (there is no unlimited)"
                            .into(),
                    ));
                }
                // The SCP's other limits: its check names each by its setting.
                scp.check()
                    .map_err(|e| ConfigError::Invalid(e.to_string()))?;
                Some(DicomConfig {
                    scp,
                    spool: self
                        .dicom_spool
                        .or(file.dicom_spool)
                        .unwrap_or_else(|| data_dir.join("spool")),
                    spool_options: nightingale_dicom::SpoolOptions {
                        min_free_bytes: self
                            .dicom_spool_min_free_bytes
                            .or(file.dicom_spool_min_free_bytes)
                            .unwrap_or(nightingale_dicom::SpoolOptions::default().min_free_bytes),
                        ..Default::default()
                    },
                    // -- DICOM retention and audit (issue 8, OPS slice) --
                    retention: retention_of(
                        self.dicom_retention_days
                            .or(file.dicom_retention_days)
                            .unwrap_or(DEFAULT_DICOM_RETENTION_DAYS),
                    )?,
                    audit_uids: self
                        .dicom_audit_uids
                        .or(file.dicom_audit_uids)
                        .unwrap_or_default(),
                })
            }
        };
        // ---- end DICOM ----
        // ---- DICOMweb (issue 8): on whenever the DICOM spool is (--dicom-spool or the SCP) ----
        let dicomweb = match (&dicom, dicomweb_spool) {
            (None, None) => None,
            (dicom, spool) => {
                let defaults = crate::http::dicomweb::DicomWebConfig::default();
                let timeout = self
                    .dicomweb_timeout_secs
                    .or(file.dicomweb_timeout_secs)
                    .unwrap_or(defaults.request_timeout.as_secs_f64());
                // At least a millisecond, as the request timeout (1e-12 started, and its
                // requests timed out at random: a red-team finding).
                if !(timeout.is_finite() && (0.001..=86_400.0).contains(&timeout)) {
                    return Err(ConfigError::Invalid(
                        "dicomweb_timeout_secs must be between 0.001 and 86400 seconds".into(),
                    ));
                }
                let max_request_bytes = self
                    .dicomweb_max_request_bytes
                    .or(file.dicomweb_max_request_bytes)
                    .unwrap_or(defaults.max_request_bytes);
                let limits = crate::http::dicomweb::DicomWebConfig {
                    // A request limit set below the default part limit lowers that default
                    // with it (alone, it refused to start: a README walk-through's finding).
                    max_part_bytes: self
                        .dicomweb_max_part_bytes
                        .or(file.dicomweb_max_part_bytes)
                        .unwrap_or(defaults.max_part_bytes.min(max_request_bytes)),
                    max_request_bytes,
                    request_timeout: std::time::Duration::from_secs_f64(timeout),
                    max_inflight_bytes: self
                        .dicom_max_inflight_bytes
                        .or(file.dicom_max_inflight_bytes)
                        .unwrap_or(defaults.max_inflight_bytes),
                    https: tls.is_some(),
                    max_streams: self
                        .dicomweb_max_streams
                        .or(file.dicomweb_max_streams)
                        .unwrap_or(defaults.max_streams),
                    extra_sop_classes: if !self.dicom_sop_classes.is_empty() {
                        self.dicom_sop_classes.clone()
                    } else {
                        file.dicom_sop_classes.clone().unwrap_or_default()
                    },
                };
                if !(1..=65_536).contains(&limits.max_streams) {
                    return Err(ConfigError::Invalid(
                        "dicomweb_max_streams must be between 1 and 65536".into(),
                    ));
                }
                if limits.max_inflight_bytes < limits.max_part_bytes {
                    return Err(ConfigError::Invalid(
                        "dicom_max_inflight_bytes must be at least dicomweb_max_part_bytes: a STOW-RS part is held in memory whole".into(),
                    ));
                }
                if limits.max_part_bytes == 0 || limits.max_part_bytes > limits.max_request_bytes {
                    return Err(ConfigError::Invalid(
                        "dicomweb_max_part_bytes must be between 1 and dicomweb_max_request_bytes"
                            .into(),
                    ));
                }
                Some(match dicom {
                    Some(d) => DicomWebSettings {
                        spool: d.spool.clone(),
                        spool_options: d.spool_options.clone(),
                        limits,
                        retention: d.retention,
                        audit_uids: d.audit_uids,
                    },
                    None => DicomWebSettings {
                        spool: spool.expect("one of the two is set"),
                        spool_options: nightingale_dicom::SpoolOptions {
                            min_free_bytes: self
                                .dicom_spool_min_free_bytes
                                .or(file.dicom_spool_min_free_bytes)
                                .unwrap_or(
                                    nightingale_dicom::SpoolOptions::default().min_free_bytes,
                                ),
                            ..Default::default()
                        },
                        limits,
                        retention: retention_of(
                            self.dicom_retention_days
                                .or(file.dicom_retention_days)
                                .unwrap_or(DEFAULT_DICOM_RETENTION_DAYS),
                        )?,
                        audit_uids: self
                            .dicom_audit_uids
                            .or(file.dicom_audit_uids)
                            .unwrap_or_default(),
                    },
                })
            }
        };
        // ---- end DICOMweb ----
        // ---- DICOM pipeline (issue 9): on whenever the spool is ----
        let pipeline = match &dicomweb {
            None => None,
            Some(_) => {
                let raw = if !self.results_destinations.is_empty() {
                    self.results_destinations.clone()
                } else {
                    file.results_destinations.clone().unwrap_or_default()
                };
                let destinations = raw
                    .iter()
                    .map(|d| d.parse().map_err(ConfigError::Invalid))
                    .collect::<Result<Vec<crate::pipeline::route::Destination>, _>>()?;
                let quiet = self
                    .series_quiet_secs
                    .or(file.series_quiet_secs)
                    .unwrap_or(10.0);
                if !(quiet.is_finite() && (0.0..=86_400.0).contains(&quiet)) {
                    return Err(ConfigError::Invalid(
                        "series_quiet_secs must be between 0 and 86400 seconds".into(),
                    ));
                }
                let complete_at = self
                    .series_complete_instances
                    .or(file.series_complete_instances);
                if complete_at == Some(0) {
                    return Err(ConfigError::Invalid(
                        "series_complete_instances must be at least 1".into(),
                    ));
                }
                let routes = file
                    .routes
                    .iter()
                    .flatten()
                    .map(|r| r.compile(&destinations).map_err(ConfigError::Invalid))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
                names.sort_unstable();
                if names.windows(2).any(|w| w[0] == w[1]) {
                    return Err(ConfigError::Invalid("two routes have the same name".into()));
                }
                // -- results delivery retries (issue 9, PEERS slice) --
                let retry = seconds_within(
                    "results_retry_secs",
                    self.results_retry_secs.or(file.results_retry_secs),
                    0.01..=3_600.0,
                )?;
                let max_attempts = self.results_max_attempts.or(file.results_max_attempts);
                if matches!(max_attempts, Some(n) if !(1..=1000).contains(&n)) {
                    return Err(ConfigError::Invalid(
                        "results_max_attempts must be between 1 and 1000".into(),
                    ));
                }
                let exchange_timeout = seconds_within(
                    "results_timeout_secs",
                    self.results_timeout_secs.or(file.results_timeout_secs),
                    1.0..=3_600.0,
                )?;
                Some(PipelineSettings {
                    routes,
                    retry,
                    max_attempts,
                    exchange_timeout,
                    destinations,
                    quiet: std::time::Duration::from_secs_f64(quiet),
                    complete_at,
                    late: match self.late_instances.or(file.late_instances) {
                        Some(LateArg::Ignore) => crate::pipeline::Late::Ignore,
                        _ => crate::pipeline::Late::Rerun,
                    },
                    calling_ae_title: dicom
                        .as_ref()
                        .map(|d| d.scp.ae_title.clone())
                        .unwrap_or_else(|| "NIGHTINGALE".into()),
                })
            }
        };
        // ---- end DICOM pipeline ----
        // ---- CDS Hooks (issue 10) ----
        let (cds_trust, trust_dir) = if self.cds_trust.is_empty() {
            (
                file.cds_trust.clone().unwrap_or_default(),
                config_dir.clone(),
            )
        } else {
            (self.cds_trust.clone(), PathBuf::new())
        };
        let trust = cds_trust
            .iter()
            .map(|t| {
                t.parse::<crate::cds::TrustedIssuer>()
                    .map_err(ConfigError::Invalid)
                    .map(|mut issuer| {
                        if let crate::cds::JwksSource::File(path) = &mut issuer.jwks {
                            *path = trust_dir.join(&*path);
                        }
                        issuer
                    })
            })
            .collect::<Result<Vec<crate::cds::TrustedIssuer>, _>>()?;
        let cds_base_url = self.cds_base_url.clone().or(file.cds_base_url.clone());
        if let Some(base) = &cds_base_url
            && !(base.starts_with("http://") || base.starts_with("https://"))
        {
            return Err(ConfigError::Invalid(
                "cds_base_url must be an http(s) URL".into(),
            ));
        }
        // The audience of a CDS token is this service's URL. Without --cds-base-url it comes
        // from the Host header, which is only trusted on a loopback address.
        let any_host = !trust.is_empty() && cds_base_url.is_none() && !http_addr.ip().is_loopback();
        if any_host && !insecure {
            return Err(ConfigError::Invalid(
                "--cds-trust on a non-loopback address needs --cds-base-url (the URL EHRs call, which tokens' aud must name): taken from the Host header, a token an EHR minted for another service could be replayed here; or --insecure".into(),
            ));
        }
        let fhir_servers = if self.cds_fhir_servers.is_empty() {
            file.cds_fhir_servers.clone().unwrap_or_default()
        } else {
            self.cds_fhir_servers.clone()
        };
        if let Some(bad) = fhir_servers
            .iter()
            .find(|u| !(u.starts_with("http://") || u.starts_with("https://")))
        {
            return Err(ConfigError::Invalid(format!(
                "cds_fhir_servers: {:?} is not an http(s) URL",
                crate::cds::without_userinfo(bad)
            )));
        }
        // The EHR's bearer token goes with every fetch: in clear text only to this machine.
        if let Some(bad) = fhir_servers
            .iter()
            .find(|u| u.starts_with("http://") && !url_is_loopback(u))
            && !insecure
        {
            return Err(ConfigError::Invalid(format!(
                "cds_fhir_servers: {:?}: the EHR's access token would be sent in clear text; use https:// (http:// only on a loopback host), or --insecure",
                crate::cds::without_userinfo(bad)
            )));
        }
        let fetch_ms = self
            .cds_fetch_timeout_ms
            .or(file.cds_fetch_timeout_ms)
            .unwrap_or(1500);
        if !(1..=60_000).contains(&fetch_ms) {
            return Err(ConfigError::Invalid(
                "cds_fetch_timeout_ms must be between 1 and 60000".into(),
            ));
        }
        let cds = crate::cds::CdsSettings {
            section: file.cds.clone().unwrap_or_default(),
            builtin_risk: file.cds.is_none(),
            trust,
            base_url: cds_base_url,
            any_host,
            fhir_servers,
            fetch_timeout: std::time::Duration::from_millis(fetch_ms),
            https: tls.is_some(),
            imaging_identifier_system: self
                .cds_imaging_identifier_system
                .clone()
                .or(file.cds_imaging_identifier_system.clone())
                .filter(|s| !s.trim().is_empty()),
            imaging_issuers: if self.cds_imaging_issuers.is_empty() {
                file.cds_imaging_issuers.clone().unwrap_or_default()
            } else {
                self.cds_imaging_issuers.clone()
            }
            .into_iter()
            .map(|i| i.trim().to_owned())
            .filter(|i| !i.is_empty())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
            ..crate::cds::CdsSettings::default()
        };
        // ---- end CDS Hooks ----
        let explain = crate::http::ExplainPolicy {
            all_methods: self.explain.or(file.explain).unwrap_or(false),
            max_forward_passes: self
                .explain_max_forward_passes
                .or(file.explain_max_forward_passes)
                .unwrap_or(nightingale_models::manifest::DEFAULT_EXPLAIN_FORWARD_PASSES),
            max_concurrent: self
                .explain_max_concurrent
                .or(file.explain_max_concurrent)
                .unwrap_or_else(crate::http::default_explain_concurrency),
        };
        if !(1..=65_536).contains(&explain.max_concurrent) {
            return Err(ConfigError::Invalid(
                "explain_max_concurrent must be 1..=65536".into(),
            ));
        }
        if explain.max_forward_passes == 0
            || explain.max_forward_passes > nightingale_models::manifest::MAX_EXPLAIN_FORWARD_PASSES
        {
            return Err(ConfigError::Invalid(format!(
                "explain_max_forward_passes must be 1..={}",
                nightingale_models::manifest::MAX_EXPLAIN_FORWARD_PASSES
            )));
        }
        let validation_max_upload_bytes = self
            .validation_max_upload_bytes
            .or(file.validation_max_upload_bytes)
            .unwrap_or(256 << 20);
        if !(MIN_VALIDATION_UPLOAD_BYTES..=MAX_VALIDATION_UPLOAD_BYTES)
            .contains(&validation_max_upload_bytes)
        {
            return Err(ConfigError::Invalid(format!(
                "validation_max_upload_bytes must be between {MIN_VALIDATION_UPLOAD_BYTES} (1 KiB) and {MAX_VALIDATION_UPLOAD_BYTES} (1 TiB) (got {validation_max_upload_bytes})"
            )));
        }
        let validation_max_run_secs = self
            .validation_max_run_secs
            .or(file.validation_max_run_secs)
            .unwrap_or(crate::http::validation::DEFAULT_MAX_RUN.as_secs());
        if !(10..=7 * 24 * 3600).contains(&validation_max_run_secs) {
            return Err(ConfigError::Invalid(format!(
                "validation_max_run_secs must be between 10 and 604800 (7 days) (got {validation_max_run_secs})"
            )));
        }
        let require_validation =
            (self.require_validation.or(file.require_validation) == Some(true)).then(|| {
                self.validation_reports
                    .clone()
                    .or(file.validation_reports.clone())
                    .unwrap_or_else(|| data_dir.join("validation").join("runs"))
            });
        Ok(ServeConfig {
            repository: self
                .repository
                .or(file.repository)
                .unwrap_or_else(|| PathBuf::from("models/bundles")),
            http_addr,
            grpc_addr,
            backend,
            intra_op_threads,
            execution_provider,
            ort_library: self.ort_library.or(file.ort_library),
            tract_kernels: match self
                .tract_kernels
                .or(file.tract_kernels)
                .unwrap_or(TractKernelsArg::Nightingale)
            {
                TractKernelsArg::Nightingale => TractKernels::Nightingale,
                TractKernelsArg::Tract => TractKernels::Tract,
            },
            max_inference_bytes,
            max_engine_threads,
            max_body_bytes,
            max_inflight_bytes,
            max_inflight_requests,
            max_open_requests,
            max_open_requests_per_client,
            max_connections,
            max_connections_per_client,
            admin_token,
            request_timeout: std::time::Duration::from_millis(request_timeout_ms),
            data_dir,
            validation_root: self
                .validation_root
                .clone()
                .or(file.validation_root.clone()),
            validation_max_upload_bytes,
            validation_max_run: std::time::Duration::from_secs(validation_max_run_secs),
            require_validation,
            explain,
            audit,
            audit_digest_key,
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            auth,
            insecure,
            signatures,
            repository_poll,
            tls,
            dicom,
            dicomweb,
            pipeline,
            cds,
        })
    }
}

/// Bounds of numeric settings that had only a lower one (or none): beyond these a value is a
/// mistake, refused at start with the setting named, rather than a panic (a semaphore over
/// its maximum), a file per audit record, or a silent change.
pub const MAX_INFLIGHT_REQUESTS: usize = 1_000_000;
/// Threads one inference may use inside the engine.
pub const MAX_INTRA_OP_THREADS: usize = 1024;
/// The smallest JSON-lines audit file rotated (0 still means never).
pub const MIN_AUDIT_ROTATE_BYTES: u64 = 64 << 10;
/// The shortest repository poll interval (0 still means off).
pub const MIN_POLL_SECS: f64 = 0.05;
/// The longest whole-request deadline: one day.
pub const MAX_REQUEST_TIMEOUT_MS: u64 = 86_400_000;
/// An optional number of seconds (`None`: the default applies) as a duration, refused with
/// `key` and `range` named when it is outside `range` or not a finite number.
fn seconds_within(
    key: &str,
    seconds: Option<f64>,
    range: std::ops::RangeInclusive<f64>,
) -> Result<Option<std::time::Duration>, ConfigError> {
    match seconds {
        None => Ok(None),
        Some(s) if s.is_finite() && range.contains(&s) => {
            Ok(Some(std::time::Duration::from_secs_f64(s)))
        }
        Some(_) => Err(ConfigError::Invalid(format!(
            "{key} must be between {} and {} seconds",
            range.start(),
            range.end()
        ))),
    }
}

/// CUDA device ordinals.
pub const MAX_CUDA_DEVICE: i32 = 1023;
/// The validation upload cap's range.
pub const MIN_VALIDATION_UPLOAD_BYTES: u64 = 1 << 10;
pub const MAX_VALIDATION_UPLOAD_BYTES: u64 = 1 << 40;

/// `audit_rotate_bytes`: 0 (never rotate) or at least [`MIN_AUDIT_ROTATE_BYTES`].
fn audit_rotate_bytes(bytes: u64) -> Result<u64, ConfigError> {
    if bytes != 0 && bytes < MIN_AUDIT_ROTATE_BYTES {
        return Err(ConfigError::Invalid(format!(
            "audit_rotate_bytes must be 0 (never rotate) or at least {MIN_AUDIT_ROTATE_BYTES} (64 KiB) (got {bytes})"
        )));
    }
    Ok(bytes)
}

/// `dicom_retention_days` as a duration; 0 (keep forever) is `None`. (Issue 8, OPS slice.)
/// Below one day is refused, as `spool purge` refuses it without `--force`: a typo such
/// as `0.00001` deleted studies a second after they were acknowledged, before their series
/// was processed (a red-team finding).
fn retention_of(days: f64) -> Result<Option<std::time::Duration>, ConfigError> {
    if !days.is_finite() || !(days == 0.0 || (1.0..=36_500.0).contains(&days)) {
        return Err(ConfigError::Invalid(
            "dicom_retention_days must be 0 (keep forever) or between 1 and 36500 days (to delete sooner, run `nightingale spool purge --older-than ... --force`)".into(),
        ));
    }
    Ok((days > 0.0).then(|| std::time::Duration::from_secs_f64(days * 86_400.0)))
}

/// TLS settings: certificate and key both or neither; client authentication only with a client
/// CA. The files themselves are read when the server starts ([`crate::tls::load_server_config`]).
fn resolve_tls(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    client_auth: Option<crate::tls::ClientAuth>,
) -> Result<Option<crate::tls::TlsSettings>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => {
            if client_auth.is_some() && client_ca.is_none() {
                return Err(ConfigError::Invalid(
                    "--tls-client-auth (tls_client_auth) needs --tls-client-ca (tls_client_ca): the CAs client certificates chain to"
                        .into(),
                ));
            }
            Ok(Some(crate::tls::TlsSettings {
                cert,
                key,
                client_ca,
                client_auth: client_auth.unwrap_or_default(),
            }))
        }
        (None, None) if client_ca.is_none() && client_auth.is_none() => Ok(None),
        (None, None) => Err(ConfigError::Invalid(
            "--tls-client-ca and --tls-client-auth need --tls-cert and --tls-key (mutual TLS is TLS)"
                .into(),
        )),
        (Some(_), None) => Err(ConfigError::Invalid(
            "--tls-cert (tls_cert) is set but --tls-key (tls_key) is not: give both or neither".into(),
        )),
        (None, Some(_)) => Err(ConfigError::Invalid(
            "--tls-key (tls_key) is set but --tls-cert (tls_cert) is not: give both or neither".into(),
        )),
    }
}

/// Whether an http(s) URL names this machine (`localhost` or a loopback address).
pub fn url_is_loopback(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|url| host_is_loopback(&url))
}

/// Whether a parsed URL's host is this machine (`localhost` or a loopback address), as a
/// CDS call's Host header is judged.
pub(crate) fn host_is_loopback(url: &reqwest::Url) -> bool {
    url.host_str()
        .is_some_and(crate::http::cds::is_loopback_host)
}

/// The most a config file may hold.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    // A regular file of bounded size: a FIFO hung the start for ever and `/dev/zero` was
    // read until memory ran out (a red-team finding).
    let read = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let bytes = crate::files::read_regular(path, MAX_CONFIG_BYTES).map_err(read)?;
    let text = String::from_utf8(bytes).map_err(|_| {
        read(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8 text",
        ))
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        detail: toml_error_place(&text, &e),
    })
}

/// A TOML error as `line L, column C: message`, without the quoted source line and caret of
/// `toml`'s own text.
fn toml_error_place(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!(
                "line {line}, column {column}: {}",
                without_values(e.message())
            )
        }
        None => without_values(e.message()),
    }
}

/// A parser message without the value it quotes: serde says "invalid type: integer
/// `12345678901234567890`, expected a string" or "unknown variant `<pasted key>`", and the
/// value may be a secret written in the wrong place or form (a red-team finding: a bare
/// number as `admin_token` was printed at start-up). Everything from the first quote
/// (backtick or double quote) to the last ", expected" is left out, whatever the value holds
/// (escaped quotes, backticks, ", expected" itself: a re-attack's findings); the expectation
/// is kept.
fn without_values(message: &str) -> String {
    let (head, tail) = match message.rfind(", expected") {
        Some(at) => message.split_at(at),
        None => (message, ""),
    };
    // An unknown key is named when it looks like one (letters, digits, `_`, `-`): the value
    // hidden was the misspelt key itself, so the message said which of 80 names it expected
    // but not which one was wrong (a review's finding).
    if let Some(name) = head
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.strip_suffix('`'))
        && (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return format!("unknown field `{name}`{tail}");
    }
    match head.find(['`', '"']) {
        Some(q) => format!("{}…{tail}", &head[..q]),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The EHR's access token goes with every FHIR fetch: a plain-http FHIR server is
    /// refused unless it is this machine or --insecure is given (red team: it was accepted).
    #[test]
    fn a_plain_http_fhir_server_elsewhere_needs_insecure() {
        let args = |url: &str, insecure: bool| ServeArgs {
            cds_fhir_servers: vec![url.into()],
            insecure: Some(insecure),
            ..ServeArgs::default()
        };
        let e = args("http://fhir.example.org/r4", false)
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("clear text"), "{e}");
        for ok in [
            "https://fhir.example.org/r4",
            "http://127.0.0.1:8080/fhir",
            "http://localhost/fhir",
            "http://[::1]:9/fhir",
        ] {
            assert!(args(ok, false).resolve().is_ok(), "{ok}");
        }
        assert!(args("http://fhir.example.org/r4", true).resolve().is_ok());
    }

    /// gRPC on the HTTP port is refused before anything listens, naming both.
    #[test]
    fn grpc_on_the_http_port_is_refused() {
        let args = |grpc: &str| ServeArgs {
            http_addr: Some("127.0.0.1:18000".parse().unwrap()),
            grpc_addr: Some(grpc.parse().unwrap()),
            ..ServeArgs::default()
        };
        let e = args("127.0.0.1:18000").resolve().unwrap_err().to_string();
        assert!(e.contains("takes the port of http_addr"), "{e}");
        assert!(args("127.0.0.1:18001").resolve().is_ok());
        assert!(args("127.0.0.1:0").resolve().is_ok());
    }

    /// Relative paths in the file are the file's folder's, wherever the server is started
    /// (they were the working directory's: the same file started elsewhere began a new
    /// audit trail there); an empty one is refused, naming its key (a review's findings).
    #[test]
    fn relative_paths_in_the_file_are_read_from_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let path = etc.join("n.toml");
        std::fs::write(
            &path,
            "data_dir = \"data\"\nrepository = \"bundles\"\naudit_log = \"/var/log/a.jsonl\"\n",
        )
        .unwrap();
        let args = || ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        };
        let config = args().resolve().unwrap();
        assert_eq!(config.data_dir, etc.join("data"));
        assert_eq!(config.repository, etc.join("bundles"));
        // The command line's stay the working directory's.
        let flagged = ServeArgs {
            data_dir: Some("here".into()),
            ..args()
        }
        .resolve()
        .unwrap();
        assert_eq!(flagged.data_dir, PathBuf::from("here"));
        for key in ["data_dir", "dicom_spool", "audit_log"] {
            std::fs::write(&path, format!("{key} = \"\"\n")).unwrap();
            let e = args().resolve().unwrap_err().to_string();
            assert!(e.contains(&format!("{key} is empty")), "{e}");
        }
    }

    /// Red-team finding: a TOML error printed the offending line, so a typo next to (or in)
    /// a secret's key showed the secret (`admin_tokn = "..."`, a duplicate
    /// `audit_postgres_url` with its password). Now only the place and the parser's message.
    #[test]
    fn a_malformed_config_file_does_not_print_its_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        for text in [
            "admin_tokn = \"ADMINSECRET-1\"\n",
            "audit_postgres_url = \"postgres://ng:PGSECRET@db/audit\"\naudit_postgres_url = \"postgres://ng:PGSECRET@db/audit\"\n",
            "admin_token = \"ADMINSECRET-2\nmax_connections = 4\n",
        ] {
            std::fs::write(&path, text).unwrap();
            let args = ServeArgs {
                config: Some(path.clone()),
                ..ServeArgs::default()
            };
            let e = args.resolve().unwrap_err().to_string();
            assert!(!e.contains("SECRET"), "{e}");
            assert!(e.contains("line "), "{e}");
        }
    }

    /// A red-team finding: `trusted_keys` and `cds_trust` JWKS files named in the config file
    /// were read from the working directory, where the TLS and `[auth]` files are read from
    /// the file's folder (a trust anchor read from wherever the service starts could be
    /// another).
    #[test]
    fn trusted_keys_and_jwks_files_in_the_config_file_are_read_from_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let key = Path::new(env!("CARGO_MANIFEST_DIR")).join("keys/demo/nightingale-demo.pub");
        std::fs::copy(&key, dir.path().join("k.pub")).unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(
            &path,
            "trusted_keys = [\"k.pub\"]\nrequire_signatures = true\ncds_trust = [\"https://ehr.example=jwks.json\"]\n",
        )
        .unwrap();
        let config = ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        assert!(config.signatures.require && config.signatures.trusted.len() == 1);
        assert_eq!(
            config.cds.trust[0].jwks,
            crate::cds::JwksSource::File(dir.path().join("jwks.json"))
        );
    }

    #[test]
    fn tract_kernels_come_from_the_file_and_the_flag_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(&path, "tract_kernels = \"tract\"\n").unwrap();
        let from_file = ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        };
        assert_eq!(
            from_file.resolve().unwrap().tract_kernels,
            TractKernels::Tract
        );
        let flag = ServeArgs {
            config: Some(path.clone()),
            tract_kernels: Some(TractKernelsArg::Nightingale),
            ..ServeArgs::default()
        };
        assert_eq!(
            flag.resolve().unwrap().tract_kernels,
            TractKernels::Nightingale
        );
        std::fs::write(&path, "tract_kernels = \"fastest\"\n").unwrap();
        let bad = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        assert!(bad.resolve().is_err());
    }

    #[test]
    fn an_ipv4_mapped_loopback_address_is_a_loopback_listener() {
        // Red-team finding: `[::ffff:127.0.0.1]` passed the bind rule as loopback (no keys,
        // no --insecure) and then had no DNS-rebinding check (`Ipv6Addr::is_loopback`).
        for (addr, loopback) in [
            ("[::ffff:127.0.0.1]:8000", true),
            ("127.0.0.1:8000", true),
            ("[::1]:8000", true),
        ] {
            let c = ServeArgs {
                http_addr: Some(addr.parse().unwrap()),
                grpc_addr: Some(addr.replace("8000", "8001").parse().unwrap()),
                ..ServeArgs::default()
            }
            .resolve()
            .unwrap();
            assert_eq!(c.auth.loopback_listener, loopback, "{addr}");
            assert_eq!(c.auth.loopback_grpc_listener, loopback, "{addr}");
        }
        let c = ServeArgs::default().resolve().unwrap();
        assert!(!c.auth.loopback_grpc_listener, "no gRPC listener");
    }

    #[test]
    fn max_engine_threads_comes_from_the_file_or_the_flag_and_is_at_least_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nightingale.toml");
        std::fs::write(&path, "max_engine_threads = 32\n").unwrap();
        let from_file = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        assert_eq!(from_file.resolve().unwrap().max_engine_threads, 32);
        assert_eq!(
            ServeArgs::default().resolve().unwrap().max_engine_threads,
            256
        );
        let zero = ServeArgs {
            max_engine_threads: Some(0),
            ..ServeArgs::default()
        };
        let err = zero.resolve().unwrap_err();
        assert!(err.to_string().contains("max_engine_threads"), "{err}");
    }

    #[test]
    fn max_inference_bytes_comes_from_the_file_or_the_flag_and_is_at_least_a_mebibyte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(&path, "max_inference_bytes = 8589934592\n").unwrap();
        let from_file = ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        };
        assert_eq!(from_file.resolve().unwrap().max_inference_bytes, 8 << 30);
        let flag = ServeArgs {
            config: Some(path),
            max_inference_bytes: Some(1 << 20),
            ..ServeArgs::default()
        };
        assert_eq!(flag.resolve().unwrap().max_inference_bytes, 1 << 20);
        let small = ServeArgs {
            max_inference_bytes: Some(1000),
            ..ServeArgs::default()
        };
        let err = small.resolve().unwrap_err();
        assert!(err.to_string().contains("max_inference_bytes"), "{err}");
    }

    #[test]
    fn flags_override_file_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(
            &path,
            "repository = \"/from/file\"\nhttp_addr = \"127.0.0.1:9000\"\nintra_op_threads = 3\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            http_addr: Some("127.0.0.1:7000".parse().unwrap()),
            ..ServeArgs::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.repository, PathBuf::from("/from/file"));
        assert_eq!(c.http_addr.port(), 7000);
        assert_eq!(c.intra_op_threads, 3);
        assert_eq!(c.tract_kernels, TractKernels::Nightingale);
        assert_eq!(c.max_body_bytes, 64 << 20);
        assert_eq!(c.max_inflight_bytes, 512 << 20);
        assert_eq!(c.max_inflight_requests, 256);
        assert_eq!(c.max_inference_bytes, 4 << 30);

        std::fs::write(&path, "repositry = \"typo\"\n").unwrap();
        let err = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn request_timeout_in_ms_or_secs_and_audit_under_the_data_dir() {
        let c = ServeArgs::default().resolve().unwrap();
        assert_eq!(c.request_timeout, std::time::Duration::from_secs(120));
        match &c.audit {
            AuditConfig::Jsonl { path, .. } => {
                assert_eq!(path, &PathBuf::from("nightingale-data/audit/audit.jsonl"))
            }
            other => panic!("{other:?}"),
        }
        let c = ServeArgs {
            request_timeout_secs: Some(3),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.request_timeout, std::time::Duration::from_secs(3));
        let c = ServeArgs {
            request_timeout_secs: Some(3),
            request_timeout_ms: Some(250),
            data_dir: Some("/srv/ng".into()),
            audit_store: Some(AuditStoreKind::Sqlite),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.request_timeout, std::time::Duration::from_millis(250));
        match &c.audit {
            AuditConfig::Sqlite { path, .. } => {
                assert_eq!(path, &PathBuf::from("/srv/ng/audit.sqlite3"))
            }
            other => panic!("{other:?}"),
        }
        let err = ServeArgs {
            request_timeout_ms: Some(0),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)));
        // Another store's settings are refused, not ignored (a review's finding: a named
        // trail file was never created, the records going to the SQLite database).
        let err = ServeArgs {
            audit_store: Some(AuditStoreKind::Sqlite),
            audit_log: Some("/secure/audit.jsonl".into()),
            audit_rotate_bytes: Some(65536),
            audit_postgres_url: Some("host=db".into()),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            err.to_string().contains(
                "audit_log, audit_rotate_bytes, audit_postgres_url set, but the audit store is sqlite"
            ),
            "{err}"
        );
        assert!(
            ServeArgs {
                audit_postgres_url: Some("host=db".into()),
                ..ServeArgs::default()
            }
            .resolve()
            .is_err()
        );
        // PostgreSQL needs its URL, and the password never reaches the log.
        assert!(
            ServeArgs {
                audit_store: Some(AuditStoreKind::Postgres),
                ..ServeArgs::default()
            }
            .resolve()
            .is_err()
        );
        let c = ServeArgs {
            audit_store: Some(AuditStoreKind::Postgres),
            audit_postgres_url: Some("postgres://ng:hunter2secret@db/audit".into()),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2secret")
                && shown.contains("host=db port=5432 user=ng dbname=audit"),
            "{shown}"
        );
    }

    #[test]
    fn tls_needs_cert_and_key_together() {
        use crate::tls::ClientAuth;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(
            &path,
            "tls_cert = \"/etc/ng/cert.pem\"\ntls_key = \"/etc/ng/key.pem\"\ntls_client_ca = \"/etc/ng/ca.pem\"\n",
        )
        .unwrap();
        let c = ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.cert, PathBuf::from("/etc/ng/cert.pem"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("/etc/ng/ca.pem")));
        assert_eq!(tls.client_auth, ClientAuth::Optional);
        // A flag overrides the file; one of the pair from the file, one from a flag is fine.
        std::fs::write(&path, "tls_key = \"/etc/ng/key.pem\"\ntls_client_auth = \"required\"\ntls_client_ca = \"/ca.pem\"\n").unwrap();
        let c = ServeArgs {
            config: Some(path.clone()),
            tls_cert: Some("/flag/cert.pem".into()),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(
            (tls.cert, tls.key, tls.client_auth),
            (
                PathBuf::from("/flag/cert.pem"),
                PathBuf::from("/etc/ng/key.pem"),
                ClientAuth::Required
            )
        );
        assert_eq!(ServeArgs::default().resolve().unwrap().tls, None);
        for args in [
            ServeArgs {
                tls_cert: Some("/c.pem".into()),
                ..ServeArgs::default()
            },
            ServeArgs {
                tls_key: Some("/k.pem".into()),
                ..ServeArgs::default()
            },
            ServeArgs {
                tls_client_ca: Some("/ca.pem".into()),
                ..ServeArgs::default()
            },
            ServeArgs {
                tls_cert: Some("/c.pem".into()),
                tls_key: Some("/k.pem".into()),
                tls_client_auth: Some(ClientAuth::Required),
                ..ServeArgs::default()
            },
        ] {
            let err = args.resolve().unwrap_err();
            assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
        }
    }

    #[test]
    fn absurd_numeric_settings_are_refused_naming_the_setting_and_its_range() {
        let refused = |args: ServeArgs, name: &str, range: &str| {
            let err = args.resolve().unwrap_err();
            assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
            let message = err.to_string();
            assert!(message.contains(name), "{message}");
            assert!(message.contains(range), "{message}");
        };
        // Over tokio's semaphore maximum: was a panic at start.
        refused(
            ServeArgs {
                max_inflight_requests: Some(2_305_843_009_213_693_952),
                ..ServeArgs::default()
            },
            "max_inflight_requests",
            "between 1 and 1000000",
        );
        refused(
            ServeArgs {
                max_inflight_requests: Some(1_000_001),
                ..ServeArgs::default()
            },
            "max_inflight_requests",
            "1000000",
        );
        // A file per audit record.
        for bytes in [1, 65_535] {
            refused(
                ServeArgs {
                    audit_rotate_bytes: Some(bytes),
                    ..ServeArgs::default()
                },
                "audit_rotate_bytes",
                "at least 65536",
            );
        }
        // Was silently raised to 50 ms.
        for secs in [0.000_001, 0.049, -1.0, f64::NAN, 86_401.0] {
            refused(
                ServeArgs {
                    repository_poll_secs: Some(secs),
                    ..ServeArgs::default()
                },
                "repository_poll_secs",
                "between 0.05 and 86400",
            );
        }
        refused(
            ServeArgs {
                intra_op_threads: Some(100_000_000),
                ..ServeArgs::default()
            },
            "intra_op_threads",
            "1024",
        );
        refused(
            ServeArgs {
                request_timeout_secs: Some(u64::MAX),
                ..ServeArgs::default()
            },
            "request timeout",
            "86400 s",
        );
        refused(
            ServeArgs {
                cuda_device: Some(-1),
                ..ServeArgs::default()
            },
            "cuda_device",
            "between 0 and 1023",
        );
        // The DICOM SCP's settings (a review's findings): a sub-second idle timeout aborted
        // every association, 0 bytes refused every C-STORE, and the errors did not name them.
        let dicom = |f: &dyn Fn(&mut ServeArgs)| {
            let mut args = ServeArgs {
                dicom_port: Some(11112),
                data_dir: Some(PathBuf::from("/tmp/nightingale-config-test")),
                ..ServeArgs::default()
            };
            f(&mut args);
            args
        };
        for secs in [1e-9, 0.5, 0.0, -1.0, f64::NAN, 86_401.0] {
            refused(
                dicom(&|a| a.dicom_idle_timeout_secs = Some(secs)),
                "dicom_idle_timeout_secs",
                "between 1 and 86400",
            );
            refused(
                dicom(&|a| a.dicom_association_timeout_secs = Some(secs)),
                "dicom_association_timeout_secs",
                "between 1 and 86400",
            );
        }
        for bytes in [0, 1023] {
            refused(
                dicom(&|a| a.dicom_max_instance_bytes = Some(bytes)),
                "--dicom-max-instance-bytes",
                "at least 1024",
            );
        }
        refused(
            dicom(&|a| {
                a.dicom_max_instance_bytes = Some(1 << 30);
                a.dicom_max_inflight_bytes = Some(1 << 20);
            }),
            "--dicom-max-inflight-bytes",
            "at least",
        );
        refused(
            dicom(&|a| a.dicom_max_pdu = Some(100)),
            "--dicom-max-pdu",
            "between 4096 and 16777216",
        );
        refused(
            dicom(&|a| a.dicom_max_associations = Some(0)),
            "--dicom-max-associations",
            "between 1 and 65536",
        );
        // The HTTP or gRPC listener's port: named at start, before anything listens.
        refused(
            dicom(&|a| a.http_addr = Some("127.0.0.1:11112".parse().unwrap())),
            "takes the port of http_addr",
            "127.0.0.1:11112",
        );
        refused(
            dicom(&|a| {
                a.grpc_addr = Some("0.0.0.0:11112".parse().unwrap());
                a.insecure = Some(true);
            }),
            "takes the port of grpc_addr",
            "0.0.0.0:11112",
        );
        assert!(
            dicom(&|a| a.http_addr = Some("127.0.0.1:0".parse().unwrap()))
                .resolve()
                .is_ok()
        );
        refused(
            ServeArgs {
                validation_max_upload_bytes: Some(0),
                ..ServeArgs::default()
            },
            "validation_max_upload_bytes",
            "1 KiB",
        );
        for secs in [0, 9, 604_801, u64::MAX] {
            refused(
                ServeArgs {
                    validation_max_run_secs: Some(secs),
                    ..ServeArgs::default()
                },
                "validation_max_run_secs",
                "7 days",
            );
        }
        // The edges themselves, and the defaults, are accepted; 0 keeps meaning off / never /
        // the engine's default.
        let c = ServeArgs {
            max_inflight_requests: Some(1_000_000),
            audit_rotate_bytes: Some(64 << 10),
            repository_poll_secs: Some(0.05),
            intra_op_threads: Some(1024),
            request_timeout_ms: Some(86_400_000),
            validation_max_upload_bytes: Some(1024),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.max_inflight_requests, 1_000_000);
        assert_eq!(c.intra_op_threads, 1024);
        assert_eq!(
            c.repository_poll,
            Some(std::time::Duration::from_secs_f64(0.05))
        );
        assert!(matches!(
            c.audit,
            AuditConfig::Jsonl {
                rotate_bytes: 65_536,
                ..
            }
        ));
        let c = ServeArgs {
            audit_rotate_bytes: Some(0),
            repository_poll_secs: Some(0.0),
            intra_op_threads: Some(0),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.repository_poll, None);
        assert_eq!(c.intra_op_threads, 0);
        assert!(matches!(
            c.audit,
            AuditConfig::Jsonl {
                rotate_bytes: 0,
                ..
            }
        ));
        // From the file too.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(&path, "audit_rotate_bytes = 1\n").unwrap();
        refused(
            ServeArgs {
                config: Some(path),
                ..ServeArgs::default()
            },
            "audit_rotate_bytes",
            "65536",
        );
    }

    #[test]
    fn secrets_are_redacted_and_checked() {
        let c = ServeArgs {
            admin_token: Some("0123456789abcdef-secret".into()),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        assert!(!format!("{c:?}").contains("secret"));
        for bad in [
            "short",
            "  padded-admin-token-123  ",
            "admin token with spaces",
            "tökentökentökentöken",
        ] {
            assert!(
                ServeArgs {
                    admin_token: Some(bad.into()),
                    ..ServeArgs::default()
                }
                .resolve()
                .is_err(),
                "{bad}"
            );
        }
        // The admin token may not be an API key's secret too (it shadowed the key).
        let token = "0123456789abcdef-secret";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(
            &path,
            format!(
                "[[auth.api_keys]]\nname = \"dup\"\nrole = \"researcher\"\nsha256 = \"{}\"\n",
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()))
            ),
        )
        .unwrap();
        let e = ServeArgs {
            admin_token: Some(token.into()),
            config: Some(path),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("admin_token is the key of auth.api_keys \"dup\""),
            "{e}"
        );
    }

    /// Red-team finding: a secret written as a bare number, or pasted where a role name
    /// goes, was printed by the parser's message at start-up.
    #[test]
    fn a_parse_error_does_not_show_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        for (text, secret, kept) in [
            (
                "admin_token = 12345678901234567890\n",
                "12345678901234567890",
                "expected a string",
            ),
            (
                "[auth]\nanonymous_roles = [\"sk-live-0123456789\"]\n",
                "sk-live-0123456789",
                "expected one of",
            ),
            (
                "max_connections = \"hunter2-secret\"\n",
                "hunter2-secret",
                "line 1",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = ServeArgs {
                config: Some(path.clone()),
                ..ServeArgs::default()
            }
            .resolve()
            .unwrap_err()
            .to_string();
            assert!(!e.contains(secret), "{e}");
            assert!(e.contains(kept), "{e}");
        }
        assert_eq!(without_values("unknown field `x"), "unknown field …");
        // A misspelt key is named; anything that does not look like a key is not.
        assert_eq!(
            without_values("unknown field `results_destination`, expected one of `a`"),
            "unknown field `results_destination`, expected one of `a`"
        );
        assert_eq!(
            without_values("unknown field `sk live 123`, expected one of `a`"),
            "unknown field …, expected one of `a`"
        );
        assert_eq!(
            without_values("invalid type: integer `1`, expected `a` or `b`"),
            "invalid type: integer …, expected `a` or `b`"
        );
        // A re-attack's findings: an escaped quote, a backtick or ", expected" in the value.
        for (message, secret) in [
            (
                "invalid type: string \"hunter2\\\"SECRETPART\", expected usize",
                "SECRETPART",
            ),
            (
                "invalid type: string \"x, expected SECRETPART\", expected usize",
                "SECRETPART",
            ),
            (
                "unknown variant `sk`SECRETPART`, expected one of `infer`, `metrics`",
                "SECRETPART",
            ),
        ] {
            let shown = without_values(message);
            assert!(!shown.contains(secret), "{shown}");
            assert!(shown.contains(", expected"), "{shown}");
        }
    }

    /// An on/off flag is on bare (`--insecure`, as documented) and takes an explicit value
    /// (`--insecure=false`); a value does not swallow the next argument.
    #[test]
    fn on_off_flags_take_a_bare_flag_or_an_explicit_value() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
                .unwrap()
                .serve
        };
        assert_eq!(parse(&["--insecure"]).insecure, Some(true));
        assert_eq!(parse(&["--insecure=false"]).insecure, Some(false));
        let both = parse(&["--explain", "--require-signatures", "--data-dir", "d"]);
        assert_eq!(
            (both.explain, both.require_signatures),
            (Some(true), Some(true))
        );
        assert_eq!(both.data_dir, Some(PathBuf::from("d")));
        assert_eq!(
            parse(&["--require-validation=no"]).require_validation,
            Some(false)
        );
    }

    #[test]
    fn auth_from_the_file_and_the_non_loopback_rule() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(&path, "http_addr = \"0.0.0.0:8000\"\n").unwrap();
        let args = || ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        };
        let err = args().resolve().unwrap_err();
        assert!(matches!(err, ConfigError::Auth(_)), "{err}");
        assert!(err.to_string().contains("--insecure"), "{err}");
        // The flag (or NIGHTINGALE_INSECURE) or the file key accepts the risk.
        let c = ServeArgs {
            insecure: Some(true),
            ..args()
        }
        .resolve()
        .unwrap();
        assert!(c.insecure);
        std::fs::write(&path, "http_addr = \"0.0.0.0:8000\"\ninsecure = true\n").unwrap();
        assert!(args().resolve().unwrap().insecure);
        // An explicit false (the flag's `=false`, or NIGHTINGALE_INSECURE=false) wins over
        // the file's true, as every setting's flag or variable does.
        let err = ServeArgs {
            insecure: Some(false),
            ..args()
        }
        .resolve()
        .unwrap_err();
        assert!(matches!(err, ConfigError::Auth(_)), "{err}");
        // A key for a role other than admin is access control: no flag needed. Relative
        // paths (the JWKS file) are read from the config file's folder.
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/auth/jwks.json"),
            dir.path().join("keys.json"),
        )
        .unwrap();
        std::fs::write(
            &path,
            format!(
                "http_addr = \"0.0.0.0:8000\"\n[[auth.api_keys]]\nname = \"ci\"\nrole = \"infer\"\nsha256 = \"{}\"\n[auth.jwt]\nissuer = \"i\"\naudience = [\"a\", \"b\"]\njwks_file = \"keys.json\"\n",
                "0".repeat(64)
            ),
        )
        .unwrap();
        let c = args().resolve().unwrap();
        assert!(!c.insecure);
        assert_eq!(c.auth.api_keys.len(), 1);
        let jwt = c.auth.jwt.as_ref().unwrap();
        assert_eq!(jwt.audience, ["a", "b"]);
        assert_eq!(jwt.key_ids(), ["rsa-1", "ec-1", "ed-1"]);
        assert!(!format!("{c:?}").contains(&"0".repeat(64)));
        // CDS Hooks on that address: a token's audience cannot come from the Host header, so
        // --cds-trust needs --cds-base-url (or --insecure).
        let with_trust = |base: Option<&str>, insecure: bool| ServeArgs {
            cds_trust: vec!["https://ehr.example=keys.json".into()],
            cds_base_url: base.map(Into::into),
            insecure: Some(insecure),
            ..args()
        };
        let err = with_trust(None, false).resolve().unwrap_err();
        assert!(err.to_string().contains("--cds-base-url"), "{err}");
        assert!(
            !with_trust(Some("https://cds.example.org"), false)
                .resolve()
                .unwrap()
                .cds
                .any_host
        );
        assert!(with_trust(None, true).resolve().unwrap().cds.any_host);

        // The TLS files named in the file are read from its folder too (they were read from
        // the working directory: a review's finding); on the command line, as given.
        std::fs::write(
            &path,
            "tls_cert = \"pki/server.pem\"\ntls_key = \"/etc/nightingale/server.key\"\ntls_client_ca = \"../ca.pem\"\n",
        )
        .unwrap();
        let tls = args().resolve().unwrap().tls.unwrap();
        assert_eq!(tls.cert, dir.path().join("pki/server.pem"));
        assert_eq!(tls.key, Path::new("/etc/nightingale/server.key"));
        assert_eq!(tls.client_ca, Some(dir.path().join("../ca.pem")));
        let tls = ServeArgs {
            tls_cert: Some("given.pem".into()),
            ..args()
        }
        .resolve()
        .unwrap()
        .tls
        .unwrap();
        assert_eq!(tls.cert, Path::new("given.pem"));
    }

    // ---- DICOM ingest (issue 8) ----
    #[test]
    fn dicom_is_off_by_default_and_turned_on_by_a_port_or_an_address() {
        let c = ServeArgs::default().resolve().unwrap();
        assert!(c.dicom.is_none());
        let c = ServeArgs {
            dicom_port: Some(11112),
            data_dir: Some("/srv/ng".into()),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        let d = c.dicom.unwrap();
        assert_eq!(d.scp.addr, "127.0.0.1:11112".parse().unwrap());
        assert_eq!(d.scp.ae_title, "NIGHTINGALE");
        assert_eq!(d.spool, PathBuf::from("/srv/ng/spool"));
        assert!(d.scp.allowed.is_none());

        // A non-loopback address needs an allowlist, or --insecure.
        let open = ServeArgs {
            dicom_addr: Some("0.0.0.0:11112".parse().unwrap()),
            ..ServeArgs::default()
        };
        assert!(matches!(
            open.clone().resolve(),
            Err(ConfigError::Invalid(_))
        ));
        let c = ServeArgs {
            insecure: Some(true),
            ..open.clone()
        }
        .resolve()
        .unwrap();
        assert!(c.insecure && c.dicom.is_some());
        let c = ServeArgs {
            dicom_allowed_aes: vec!["PACS@10.1.2.3".into(), "CT1".into()],
            dicom_ae_title: Some("AI_NODE".into()),
            dicom_spool: Some("/spool".into()),
            ..open
        }
        .resolve()
        .unwrap();
        let d = c.dicom.unwrap();
        assert_eq!(d.scp.allowed.as_ref().map(Vec::len), Some(2));
        assert_eq!(d.scp.ae_title, "AI_NODE");
        assert_eq!(d.spool, PathBuf::from("/spool"));

        // The same keys in the file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(
            &path,
            "dicom_port = 4242\ndicom_ae_title = \"FROMFILE\"\ndicom_idle_timeout_secs = 5\n",
        )
        .unwrap();
        let c = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        let d = c.dicom.unwrap();
        assert_eq!(d.scp.addr.port(), 4242);
        assert_eq!(d.scp.ae_title, "FROMFILE");
        assert_eq!(d.scp.idle_timeout, std::time::Duration::from_secs(5));
        assert!(
            ServeArgs {
                dicom_port: Some(1),
                dicom_ae_title: Some("FAR_TOO_LONG_AE_TITLE".into()),
                ..ServeArgs::default()
            }
            .resolve()
            .is_err()
        );
    }
    // ---- end DICOM ----

    // ---- DICOM retention and audit (issue 8, OPS slice) ----
    #[test]
    fn dicom_retention_defaults_to_30_days_and_0_keeps_forever() {
        use crate::audit::dicom::UidAudit;
        let on = ServeArgs {
            dicom_port: Some(11112),
            ..ServeArgs::default()
        };
        let d = on.clone().resolve().unwrap().dicom.unwrap();
        assert_eq!(
            d.retention,
            Some(std::time::Duration::from_secs(30 * 86_400))
        );
        assert_eq!(d.audit_uids, UidAudit::Hash);
        let d = ServeArgs {
            dicom_retention_days: Some(0.0),
            dicom_audit_uids: Some(UidAudit::Omit),
            ..on.clone()
        }
        .resolve()
        .unwrap()
        .dicom
        .unwrap();
        assert_eq!((d.retention, d.audit_uids), (None, UidAudit::Omit));
        for bad in [-1.0, f64::NAN, 1e9, 0.00001, 0.999] {
            assert!(
                ServeArgs {
                    dicom_retention_days: Some(bad),
                    ..on.clone()
                }
                .resolve()
                .is_err()
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(
            &path,
            "dicom_port = 4242\ndicom_retention_days = 7\ndicom_audit_uids = \"omit\"\n",
        )
        .unwrap();
        let d = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap()
        .dicom
        .unwrap();
        assert_eq!(
            d.retention,
            Some(std::time::Duration::from_secs(7 * 86_400))
        );
        assert_eq!(d.audit_uids, UidAudit::Omit);
    }

    // ---- DICOM pipeline (issue 9) ----
    #[test]
    fn the_pipeline_runs_with_the_spool_and_checks_its_destinations() {
        assert!(ServeArgs::default().resolve().unwrap().pipeline.is_none());
        let c = ServeArgs {
            dicom_port: Some(11112),
            results_destinations: vec!["PACS@127.0.0.1:4242".into()],
            series_quiet_secs: Some(2.5),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        let p = c.pipeline.unwrap();
        assert_eq!(p.destinations[0].to_string(), "PACS@127.0.0.1:4242");
        assert_eq!(p.quiet, std::time::Duration::from_millis(2500));
        assert_eq!(p.calling_ae_title, "NIGHTINGALE");
        for bad in ["PACS", "PACS@host", "PACS@host:0"] {
            assert!(
                ServeArgs {
                    dicom_port: Some(11112),
                    results_destinations: vec![bad.into()],
                    ..ServeArgs::default()
                }
                .resolve()
                .is_err(),
                "{bad} accepted"
            );
        }
    }

    // -- results delivery retries (issue 9, PEERS slice) --
    #[test]
    fn results_retries_are_configurable_and_bounded() {
        let with = |retry: Option<f64>, attempts: Option<u32>, timeout: Option<f64>| {
            ServeArgs {
                dicom_port: Some(11112),
                results_retry_secs: retry,
                results_max_attempts: attempts,
                results_timeout_secs: timeout,
                ..ServeArgs::default()
            }
            .resolve()
        };
        let p = with(None, None, None).unwrap().pipeline.unwrap();
        assert_eq!(
            (p.retry, p.max_attempts, p.exchange_timeout),
            (None, None, None)
        );
        let p = with(Some(0.2), Some(2), Some(600.0))
            .unwrap()
            .pipeline
            .unwrap();
        assert_eq!(p.retry, Some(std::time::Duration::from_millis(200)));
        assert_eq!(p.max_attempts, Some(2));
        assert_eq!(
            p.exchange_timeout,
            Some(std::time::Duration::from_secs(600))
        );
        for (retry, attempts, timeout) in [
            (Some(0.0), None, None),
            (Some(f64::NAN), None, None),
            (None, Some(0), None),
            (None, None, Some(0.5)),
            (None, None, Some(f64::INFINITY)),
            (None, None, Some(3601.0)),
        ] {
            assert!(
                with(retry, attempts, timeout).is_err(),
                "{retry:?} {attempts:?} {timeout:?} accepted"
            );
        }
    }

    // ---- DICOMweb (issue 8) ----
    #[test]
    fn dicomweb_is_on_with_the_spool_and_off_without() {
        assert!(ServeArgs::default().resolve().unwrap().dicomweb.is_none());
        // --dicom-spool alone: DICOMweb without the SCP.
        let c = ServeArgs {
            dicom_spool: Some("/spool".into()),
            dicomweb_max_part_bytes: Some(1000),
            dicomweb_max_request_bytes: Some(5000),
            dicomweb_timeout_secs: Some(30.0),
            dicomweb_max_streams: Some(64),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        assert!(c.dicom.is_none());
        let w = c.dicomweb.unwrap();
        assert_eq!(w.spool, PathBuf::from("/spool"));
        assert_eq!(w.limits.max_streams, 64);
        for streams in [0, 65_537] {
            let refused = ServeArgs {
                dicom_spool: Some("/spool".into()),
                dicomweb_max_streams: Some(streams),
                ..ServeArgs::default()
            }
            .resolve();
            assert!(refused.is_err(), "{streams}");
        }
        assert_eq!(w.limits.max_part_bytes, 1000);
        assert_eq!(w.limits.max_request_bytes, 5000);
        assert_eq!(w.limits.request_timeout, std::time::Duration::from_secs(30));
        // A request limit alone below the default part limit lowers the part limit too.
        let w = ServeArgs {
            dicom_spool: Some("/spool".into()),
            dicomweb_max_request_bytes: Some(100_000),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap()
        .dicomweb
        .unwrap();
        assert_eq!(
            (w.limits.max_part_bytes, w.limits.max_request_bytes),
            (100_000, 100_000)
        );
        // With the SCP: the SCP's spool, the defaults.
        let c = ServeArgs {
            dicom_port: Some(11112),
            data_dir: Some("/srv/ng".into()),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        let w = c.dicomweb.unwrap();
        assert_eq!(w.spool, PathBuf::from("/srv/ng/spool"));
        assert_eq!(w.limits.max_request_bytes, 4 << 30);
        // A part larger than the request cannot be.
        assert!(
            ServeArgs {
                dicom_spool: Some("/spool".into()),
                dicomweb_max_part_bytes: Some(10),
                dicomweb_max_request_bytes: Some(5),
                ..ServeArgs::default()
            }
            .resolve()
            .is_err()
        );
    }
    // ---- end DICOMweb ----
}
