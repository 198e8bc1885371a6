//! Model workers: OS threads that own backend instances, fed by one bounded queue, with
//! dynamic batching.
//!
//! ```text
//!  async callers ──try_send──▶ [bounded queue] ──▶ instance thread 0 ─▶ Backend::infer
//!      ▲  (full → Overloaded)                  └─▶ instance thread 1 ─▶ Backend::infer
//!      └──────────── oneshot answer per request ◀──────────┘
//! ```
//!
//! Each instance thread takes the oldest request, then (when batching is on) keeps taking
//! requests whose inputs have the same datatypes and the same shape beyond the batch axis,
//! until the batch reaches `max_batch_size` or a preferred size, or `max_queue_delay` has passed
//! since the first request arrived. The wait is adaptive: when the queue is empty and this
//! instance's previous batch held a single request (no sign of concurrent callers), the
//! batch runs at once instead of waiting for company that is not coming; once batches hold
//! several requests, an empty queue is waited on up to `max_queue_delay` again. Results do
//! not depend on it (each row's answer is the same whatever it is batched with). The batch is concatenated along axis 0, run once, and the
//! outputs are split back row-for-row. Requests whose caller has gone are dropped unrun.
//!
//! A lone request of a small model does not go through the queue at all: when no other
//! request of the model is in flight, the model's last execution took under
//! [`WorkerConfig::inline_max`] ([`INLINE_MAX`] by default),
//! and the engine's forks share the loaded model (tract, candle), it runs on the caller's
//! thread on a fork kept for that, with the same panic catching and statistics. That saves
//! the two thread wake-ups of the hand-off to an instance thread and back, most of a small
//! model's latency on an idle server; under load requests overlap and take the queue (and
//! its batching) as before.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::backend::{Backend, ModelMetadata};
use crate::error::InferenceError;
use crate::explain::{GradientRequest, GradientSaliency};
use crate::stats::ModelStats;
use crate::tensor::{DataType, NamedTensor, Tensor};

/// Dynamic batching settings of one model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchingConfig {
    /// Largest number of rows one execution may hold; also the largest batch one request may carry.
    pub max_batch_size: usize,
    /// How long the first request of a batch may wait for others.
    pub max_queue_delay: Duration,
    /// Batch sizes to run at once when reached, without waiting out the delay.
    pub preferred_batch_sizes: Vec<usize>,
}

/// How a model is served.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Model name and version, for thread names, metrics and logs.
    pub model: String,
    pub version: String,
    /// Backend instances, each on its own thread.
    pub instances: usize,
    /// Requests that may wait in the queue before new ones are refused.
    pub queue_capacity: usize,
    /// Bytes of input tensors that may wait in the queue at once before new requests are
    /// refused ([`InferenceError::QueueBytesFull`]): the queue's capacity in memory, not only
    /// in requests. A request larger than this on its own is refused the same way.
    pub queue_bytes: usize,
    /// Most rows (first dimension of the inputs) one request may carry, whether or not the
    /// model batches ([`InferenceError::TooManyRows`]); with batching on, `max_batch_size`
    /// also applies.
    pub max_rows_per_request: usize,
    /// `None`: every request runs on its own.
    pub batching: Option<BatchingConfig>,
    /// Declared inputs/outputs (from the bundle) replacing the backend's, in the backend's order;
    /// stricter shapes are allowed, other names or datatypes are not.
    pub metadata: Option<ModelMetadata>,
    /// Floating-point inputs that may hold NaN or infinities (missing-value aware models);
    /// every other FP16/FP32/FP64 input must be finite, or the request is refused. Engines
    /// differ on non-finite input (tract can turn NaN into a confident probability where ONNX
    /// Runtime returns NaN), so by default it never reaches them.
    pub allow_non_finite: Vec<String>,
    /// Longest execution (the model's last) for which a lone request runs on the caller's
    /// thread (an async runtime's worker, which must not be held for long); see the module
    /// documentation.
    pub inline_max: Duration,
    /// A `purpose` label on this worker's metrics, for a copy of a served model that serves
    /// something else (a validation run's copy: `validation`), so that its batches do not
    /// count as the served model's. Such a worker sets no `nightingale_queue_depth` gauge (a
    /// gauge is kept once set: the copy's would outlive it). `None`: the served model.
    pub purpose: Option<String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            model: "model".into(),
            version: "1".into(),
            instances: 1,
            queue_capacity: 1024,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            max_rows_per_request: DEFAULT_MAX_ROWS_PER_REQUEST,
            batching: None,
            metadata: None,
            allow_non_finite: vec![],
            inline_max: INLINE_MAX,
            purpose: None,
        }
    }
}

/// Default [`WorkerConfig::queue_bytes`]: 256 MiB.
pub const DEFAULT_QUEUE_BYTES: usize = 256 << 20;
/// Default [`WorkerConfig::max_rows_per_request`].
pub const DEFAULT_MAX_ROWS_PER_REQUEST: usize = 4096;

type Reply = oneshot::Sender<Result<Vec<NamedTensor>, InferenceError>>;

/// The datatypes and non-batch dimensions of a request's inputs: requests with equal
/// signatures can share an execution.
type Signature = Vec<(DataType, Vec<usize>)>;

/// Input bytes a job holds against [`WorkerConfig::queue_bytes`], given back when the job is
/// dropped (taken for a run, refused, or abandoned by its caller).
struct QueuedBytes {
    counter: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for QueuedBytes {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

struct Job {
    inputs: Vec<NamedTensor>,
    _bytes: QueuedBytes,
    rows: usize,
    signature: Signature,
    reply: Reply,
    enqueued: Instant,
    span: tracing::Span,
}

type GradientReply = oneshot::Sender<Result<GradientSaliency, InferenceError>>;

/// A gradient explanation waiting for an instance thread (its own queue: it runs alone, never
/// batched with inference requests, and holds its input bytes against `queue_bytes` too).
struct GradientJob {
    request: GradientRequest,
    _bytes: QueuedBytes,
    reply: GradientReply,
    enqueued: Instant,
    span: tracing::Span,
}

/// A served model version: its queue and the threads that drain it.
///
/// Dropping the last handle closes the queue; the threads finish what was queued and exit.
pub struct ModelWorker {
    metadata: Arc<ModelMetadata>,
    backend: &'static str,
    /// Every instance runs on a GPU.
    on_gpu: bool,
    tx: Sender<Box<Job>>,
    gradient_tx: Sender<Box<GradientJob>>,
    /// Whether the backend can differentiate the model ([`Backend::supports_gradients`]).
    gradients: bool,
    stats: Arc<ModelStats>,
    config: WorkerConfig,
    /// Input bytes of the requests waiting in the queue.
    queued_bytes: Arc<AtomicUsize>,
    /// Largest rows per request (None: unlimited, the model does not batch).
    max_rows: Option<usize>,
    batches: bool,
    /// The fork that runs lone requests on the caller's thread (engines whose forks share
    /// the model only).
    inline: Option<std::sync::Mutex<Box<dyn Backend>>>,
    /// Requests of this model submitted and not yet answered (queued, running, or inline).
    in_flight: AtomicUsize,
    /// How long the model's last execution took (ns); `u64::MAX` before the first.
    last_compute_ns: Arc<AtomicU64>,
    /// Metric labels: model and version (and purpose, for a copy: [`WorkerConfig::purpose`]).
    labels: Labels,
}

type Labels = Vec<(&'static str, String)>;

/// Default [`WorkerConfig::inline_max`].
pub const INLINE_MAX: Duration = Duration::from_micros(200);

/// One request counted in [`ModelWorker`]'s `in_flight` while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for ModelWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelWorker")
            .field("model", &self.config.model)
            .field("version", &self.config.version)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl ModelWorker {
    /// Starts `config.instances` threads, the first owning `backend`, the others forks of it.
    pub fn spawn(backend: Box<dyn Backend>, config: WorkerConfig) -> Result<Self, InferenceError> {
        let metadata = match &config.metadata {
            Some(declared) => {
                check_declared(declared, backend.metadata())?;
                declared.clone()
            }
            None => backend.metadata().clone(),
        };
        let batches = metadata.supports_batching() && backend.max_batch_size() > 1;
        let batching = config
            .batching
            .clone()
            .filter(|b| batches && b.max_batch_size > 1);
        let max_rows = batching.as_ref().map(|b| b.max_batch_size);
        let instances = config.instances.max(1);
        let inline = if backend.forks_share_the_model() {
            Some(std::sync::Mutex::new(backend.fork()?))
        } else {
            None
        };
        let last_compute_ns = Arc::new(AtomicU64::new(u64::MAX));
        let mut labels: Labels = vec![
            ("model", config.model.clone()),
            ("version", config.version.clone()),
        ];
        if let Some(purpose) = &config.purpose {
            labels.push(("purpose", purpose.clone()));
        }
        let gradients = backend.supports_gradients();
        // Gradient jobs (an integrated-gradients map can take minutes) run on an instance of
        // their own where a fork shares the model: inference goes on beside them instead of
        // waiting behind one for its whole deadline (a red-team finding: /infer of the candle
        // model took 10 s, the explanation's deadline, behind one).
        let gradient_backend = if gradients && backend.forks_share_the_model() {
            Some(backend.fork()?)
        } else {
            None
        };
        let mut backends = Vec::with_capacity(instances);
        for _ in 1..instances {
            backends.push(backend.fork()?);
        }
        backends.insert(0, backend);
        let name = backends[0].name();
        // Instances load with the same options but each registers its own execution provider:
        // one that fell back to the CPU makes the model's answer "not on a GPU".
        let on_gpu = backends.iter().all(|b| b.on_gpu());
        // Boxed: a bounded channel allocates its slots at once (`queue_capacity` of them, up
        // to 2^20), a pointer each rather than a whole request (440 MB a version at the cap).
        let (tx, rx) = crossbeam_channel::bounded::<Box<Job>>(config.queue_capacity.max(1));
        let (gradient_tx, gradient_rx) =
            crossbeam_channel::bounded::<Box<GradientJob>>(config.queue_capacity.max(1));
        let stats = Arc::new(ModelStats::default());
        if let Some(backend) = gradient_backend {
            let instance = Instance {
                backend,
                rx: crossbeam_channel::never(),
                gradient_rx: gradient_rx.clone(),
                batching: None,
                stats: stats.clone(),
                labels: labels.clone(),
                last_batch: 0,
                last_compute_ns: Arc::new(AtomicU64::new(u64::MAX)),
            };
            std::thread::Builder::new()
                .name(format!("ng-{}-{}-grad", config.model, config.version))
                .spawn(move || instance.run_gradients())
                .map_err(|e| InferenceError::backend(name, e))?;
        }
        let instance_gradients = if gradients && backends[0].forks_share_the_model() {
            crossbeam_channel::never()
        } else {
            gradient_rx
        };
        for (i, backend) in backends.into_iter().enumerate() {
            let instance = Instance {
                backend,
                rx: rx.clone(),
                gradient_rx: instance_gradients.clone(),
                batching: batching.clone(),
                stats: stats.clone(),
                labels: labels.clone(),
                last_batch: 0,
                last_compute_ns: last_compute_ns.clone(),
            };
            std::thread::Builder::new()
                .name(format!("ng-{}-{}-{i}", config.model, config.version))
                .spawn(move || instance.run())
                .map_err(|e| InferenceError::backend(name, e))?;
        }
        Ok(ModelWorker {
            metadata: Arc::new(metadata),
            backend: name,
            on_gpu,
            tx,
            gradient_tx,
            gradients,
            stats,
            config: WorkerConfig { batching, ..config },
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            max_rows,
            batches,
            inline,
            in_flight: AtomicUsize::new(0),
            last_compute_ns,
            labels,
        })
    }

    pub fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    /// The engine's name (`"tract"`, `"ort"`).
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Whether every instance runs on a GPU ([`crate::backend::Backend::on_gpu`]).
    pub fn on_gpu(&self) -> bool {
        self.on_gpu
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    pub fn stats(&self) -> &ModelStats {
        &self.stats
    }

    /// Requests waiting for a thread.
    pub fn queue_depth(&self) -> usize {
        self.tx.len()
    }

    /// Bytes of input tensors waiting in the queue.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Acquire)
    }

    /// Whether requests may stack rows along the first dimension (and so how the batch size
    /// is counted in statistics).
    pub fn batches(&self) -> bool {
        self.batches
    }

    /// Runs one request: checks its inputs, queues it, waits for the answer. Outputs come in
    /// the order of [`ModelWorker::metadata`]'s outputs.
    pub async fn infer(
        &self,
        inputs: Vec<NamedTensor>,
    ) -> Result<Vec<NamedTensor>, InferenceError> {
        let start = Instant::now();
        let result = self.submit(inputs).await;
        self.stats.record_request(result.is_ok(), start.elapsed());
        result
    }

    /// [`ModelWorker::infer`] without counting the request in [`ModelWorker::stats`], for a
    /// caller that counts it itself over the whole request: its decoding and encoding, and
    /// its failures before the model is reached (an unknown input, a malformed body), which
    /// the statistics extension counts as failed requests too.
    pub async fn infer_uncounted(
        &self,
        inputs: Vec<NamedTensor>,
    ) -> Result<Vec<NamedTensor>, InferenceError> {
        self.submit(inputs).await
    }

    async fn submit(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, InferenceError> {
        let (inputs, rows, signature) = self.check(inputs)?;
        let alone = self.in_flight.fetch_add(1, Ordering::AcqRel) == 0;
        let _in_flight = InFlight(&self.in_flight);
        if alone
            && self.last_compute_ns.load(Ordering::Relaxed)
                <= u64::try_from(self.config.inline_max.as_nanos()).unwrap_or(u64::MAX)
            && let Some(inline) = &self.inline
            && let Ok(mut backend) = inline.try_lock()
        {
            return self.run_inline(&mut **backend, inputs, rows);
        }
        let bytes: usize = inputs.iter().map(|t| t.tensor.raw_len()).sum();
        let limit = self.config.queue_bytes;
        let before = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        let held = QueuedBytes {
            counter: self.queued_bytes.clone(),
            bytes,
        };
        if before.saturating_add(bytes) > limit {
            drop(held);
            return Err(InferenceError::QueueBytesFull { limit });
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            inputs,
            _bytes: held,
            rows,
            signature,
            reply,
            enqueued: Instant::now(),
            span: tracing::Span::current(),
        };
        self.tx.try_send(Box::new(job)).map_err(|e| match e {
            TrySendError::Full(_) => InferenceError::Overloaded {
                capacity: self.config.queue_capacity,
            },
            TrySendError::Disconnected(_) => InferenceError::Unavailable,
        })?;
        set_queue_depth(&self.labels, self.tx.len());
        answer
            .instrument(tracing::trace_span!("wait"))
            .await
            .map_err(|_| InferenceError::Unavailable)?
    }

    /// Runs a lone request on the caller's thread (see the module documentation).
    fn run_inline(
        &self,
        backend: &mut dyn Backend,
        inputs: Vec<NamedTensor>,
        rows: usize,
    ) -> Result<Vec<NamedTensor>, InferenceError> {
        let _entered = tracing::debug_span!("execute", requests = 1, rows, inline = true).entered();
        self.stats.record_queue(Duration::ZERO);
        metrics::histogram!("nightingale_queue_duration_seconds", &self.labels).record(0.0);
        let started = Instant::now();
        let outcome = infer_caught(backend, inputs, &self.last_compute_ns);
        let phases = [Duration::ZERO, started.elapsed(), Duration::ZERO];
        record_execution(&self.stats, &self.labels, 1, rows, phases);
        if let Err(e) = &outcome {
            tracing::warn!(error = %e, "inference failed");
        }
        outcome
    }

    /// Whether [`ModelWorker::gradients`] can answer: the backend differentiates the model.
    pub fn supports_gradients(&self) -> bool {
        self.gradients
    }

    /// Computes gradient saliency maps (Grad-CAM, integrated gradients) on an instance of
    /// their own (where the backend's forks share the model; else on one of the model's
    /// instance threads, alone). The input is checked like an inference request's; the job
    /// waits in its own bounded queue (full: [`InferenceError::Overloaded`]) and runs one at
    /// a time, its rows in chunks of at most `request.max_batch`. A backend without gradients answers
    /// [`InferenceError::GradientsUnsupported`] at once.
    pub async fn gradients(
        &self,
        mut request: GradientRequest,
    ) -> Result<GradientSaliency, InferenceError> {
        if !self.gradients {
            return Err(InferenceError::GradientsUnsupported {
                backend: self.backend,
            });
        }
        // The request is counted by its caller (an explanation is one request, as
        // `infer_uncounted`'s are: counted here too, each gradient explanation was two
        // successes, and a failed one a success and a failure: a red-team finding); the job
        // is counted as one execution of its rows, with its wait in the queue.
        async {
            let (mut inputs, _, _) = self.check(vec![request.input.clone()])?;
            request.input = inputs.pop().ok_or(InferenceError::EmptyBatch)?;
            let bytes = request.input.tensor.raw_len();
            let limit = self.config.queue_bytes;
            let before = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
            let held = QueuedBytes {
                counter: self.queued_bytes.clone(),
                bytes,
            };
            if before.saturating_add(bytes) > limit {
                return Err(InferenceError::QueueBytesFull { limit });
            }
            let (reply, answer) = oneshot::channel();
            let job = GradientJob {
                request,
                _bytes: held,
                reply,
                enqueued: Instant::now(),
                span: tracing::Span::current(),
            };
            self.gradient_tx
                .try_send(Box::new(job))
                .map_err(|e| match e {
                    TrySendError::Full(_) => InferenceError::Overloaded {
                        capacity: self.config.queue_capacity,
                    },
                    TrySendError::Disconnected(_) => InferenceError::Unavailable,
                })?;
            answer
                .instrument(tracing::trace_span!("wait"))
                .await
                .map_err(|_| InferenceError::Unavailable)?
        }
        .await
    }

    /// Validates inputs against the metadata and puts them in the model's input order.
    fn check(
        &self,
        inputs: Vec<NamedTensor>,
    ) -> Result<(Vec<NamedTensor>, usize, Signature), InferenceError> {
        let specs = &self.metadata.inputs;
        let names = || specs.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        let mut slots: Vec<Option<NamedTensor>> = (0..specs.len()).map(|_| None).collect();
        for input in inputs {
            let Some(ix) = specs.iter().position(|s| s.name == input.name) else {
                return Err(InferenceError::UnknownInput {
                    name: input.name,
                    expected: names(),
                });
            };
            let spec = &specs[ix];
            if slots[ix].is_some() {
                return Err(InferenceError::DuplicateInput { name: input.name });
            }
            if input.tensor.datatype() != spec.datatype {
                return Err(InferenceError::DataTypeMismatch {
                    name: input.name,
                    expected: spec.datatype,
                    got: input.tensor.datatype(),
                });
            }
            if !spec.accepts_shape(input.tensor.shape()) {
                return Err(InferenceError::ShapeMismatch {
                    name: input.name,
                    expected: spec.shape.clone(),
                    got: input.tensor.shape().to_vec(),
                });
            }
            // The batch's own dimension is checked below (EmptyBatch).
            let skip = usize::from(self.batches);
            if input.tensor.shape().iter().skip(skip).any(|&d| d == 0) {
                return Err(InferenceError::EmptyDimension {
                    shape: input.tensor.shape().to_vec(),
                    name: input.name,
                });
            }
            if !self.config.allow_non_finite.contains(&input.name) && !all_finite(&input.tensor) {
                return Err(InferenceError::NonFinite { name: input.name });
            }
            if let Tensor::Bytes(a) = &input.tensor
                && let Some(index) = a.iter().position(|b| std::str::from_utf8(b).is_err())
            {
                return Err(InferenceError::NotText {
                    name: input.name,
                    index,
                });
            }
            slots[ix] = Some(input);
        }
        let inputs = slots
            .into_iter()
            .zip(specs)
            .map(|(slot, spec)| {
                slot.ok_or_else(|| InferenceError::MissingInput {
                    name: spec.name.clone(),
                    expected: names(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let request_rows = inputs
            .first()
            .and_then(|t| t.tensor.shape().first().copied())
            .unwrap_or(1);
        if request_rows > self.config.max_rows_per_request {
            return Err(InferenceError::TooManyRows {
                got: request_rows,
                max: self.config.max_rows_per_request,
            });
        }
        let rows = if self.batches {
            let sizes: Vec<usize> = inputs.iter().map(|t| t.tensor.shape()[0]).collect();
            if sizes.iter().any(|&s| s != sizes[0]) {
                return Err(InferenceError::InconsistentBatch { sizes });
            }
            if sizes[0] == 0 {
                return Err(InferenceError::EmptyBatch);
            }
            if let Some(max) = self.max_rows.filter(|&max| sizes[0] > max) {
                return Err(InferenceError::BatchTooLarge { got: sizes[0], max });
            }
            sizes[0]
        } else {
            1
        };
        let signature = inputs
            .iter()
            .map(|t| {
                let shape = t.tensor.shape();
                (
                    t.tensor.datatype(),
                    shape.get(1..).unwrap_or_default().to_vec(),
                )
            })
            .collect();
        Ok((inputs, rows, signature))
    }
}

fn all_finite(tensor: &Tensor) -> bool {
    match tensor {
        Tensor::Fp16(a) => a.iter().all(|x| x.is_finite()),
        Tensor::Fp32(a) => a.iter().all(|x| x.is_finite()),
        Tensor::Fp64(a) => a.iter().all(|x| x.is_finite()),
        _ => true,
    }
}

/// Declared specs may pin dimensions the model leaves open, nothing else.
fn check_declared(declared: &ModelMetadata, actual: &ModelMetadata) -> Result<(), InferenceError> {
    let compare = |what: &str,
                   d: &[crate::TensorSpec],
                   a: &[crate::TensorSpec]|
     -> Result<(), InferenceError> {
        let mismatch = |reason: String| Err(InferenceError::MetadataMismatch { reason });
        if d.len() != a.len() {
            return mismatch(format!(
                "{} {what}s declared, the model has {}",
                d.len(),
                a.len()
            ));
        }
        for (d, a) in d.iter().zip(a) {
            if d.name != a.name {
                return mismatch(format!(
                    "{what} {:?} declared where the model has {:?}",
                    d.name, a.name
                ));
            }
            if d.datatype != a.datatype {
                return mismatch(format!(
                    "{what} {:?} declared {} but the model has {}",
                    d.name, d.datatype, a.datatype
                ));
            }
            let fits = d.shape.len() == a.shape.len()
                && d.shape.iter().zip(&a.shape).all(|(&d, &a)| a < 0 || d == a);
            if !fits {
                return mismatch(format!(
                    "{what} {:?} declared with shape {:?} but the model has {:?}",
                    d.name, d.shape, a.shape
                ));
            }
        }
        Ok(())
    };
    compare("input", &declared.inputs, &actual.inputs)?;
    compare("output", &declared.outputs, &actual.outputs)
}

/// One backend instance and the loop that feeds it.
struct Instance {
    backend: Box<dyn Backend>,
    rx: Receiver<Box<Job>>,
    gradient_rx: Receiver<Box<GradientJob>>,
    batching: Option<BatchingConfig>,
    stats: Arc<ModelStats>,
    labels: Labels,
    /// Requests in this instance's previous batch: above one, callers are arriving together
    /// and an empty queue is worth waiting on.
    last_batch: usize,
    /// Shared with the worker: how long the last execution took (ns).
    last_compute_ns: Arc<AtomicU64>,
}

impl Instance {
    fn run(mut self) {
        let mut carried: Option<Job> = None;
        loop {
            let first = match carried.take() {
                Some(job) => job,
                None => crossbeam_channel::select! {
                    recv(self.rx) -> job => match job {
                        Ok(job) => *job,
                        Err(_) => return, // every sender is gone: the model was unloaded
                    },
                    recv(self.gradient_rx) -> job => {
                        match job {
                            Ok(job) => self.gradients(*job),
                            // Unloaded: finish the inference queue, then stop.
                            Err(_) => match self.rx.recv() {
                                Ok(job) => carried = Some(*job),
                                Err(_) => return,
                            },
                        }
                        continue;
                    },
                },
            };
            if first.reply.is_closed() {
                continue;
            }
            let mut batch = vec![first];
            if let Some(cfg) = &self.batching {
                carried = self.gather(cfg, &mut batch);
            }
            set_queue_depth(&self.labels, self.rx.len());
            self.last_batch = batch.len();
            self.execute(batch);
        }
    }

    /// The loop of the instance that runs gradient jobs only, one at a time, until the model
    /// is unloaded (every sender gone).
    fn run_gradients(mut self) {
        while let Ok(job) = self.gradient_rx.recv() {
            self.gradients(*job);
        }
    }

    /// Runs one gradient job alone, the backend's panics caught.
    fn gradients(&mut self, job: GradientJob) {
        if job.reply.is_closed() {
            return;
        }
        let rows = job
            .request
            .input
            .tensor
            .shape()
            .first()
            .copied()
            .unwrap_or(0);
        let span = tracing::debug_span!(parent: &job.span, "gradients", rows);
        let _entered = span.enter();
        let started = Instant::now();
        let waited = started - job.enqueued;
        self.stats.record_queue(waited);
        metrics::histogram!("nightingale_queue_duration_seconds", &self.labels)
            .record(waited.as_secs_f64());
        // Asked between passes: a caller that has gone (timed out, disconnected) closes its
        // answer, and the job stops there instead of holding this instance to its end.
        let cancelled = || job.reply.is_closed();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.backend.gradients(&job.request, &cancelled)
        }))
        .unwrap_or(Err(InferenceError::Panicked));
        // One execution of the job's rows (its passes run inside it), in the statistics and
        // the metrics alike: it was in the compute histogram only, whose count then exceeded
        // the statistics' execution count.
        let zero = Duration::ZERO;
        record_execution(
            &self.stats,
            &self.labels,
            1,
            rows,
            [zero, started.elapsed(), zero],
        );
        match &outcome {
            Err(InferenceError::Cancelled) => {
                tracing::info!("gradient explanation stopped: its caller has gone");
            }
            Err(e) => tracing::warn!(error = %e, "gradient explanation failed"),
            Ok(_) => {}
        }
        let _ = job.reply.send(outcome);
    }

    /// Adds compatible requests to `batch`; returns a request that did not fit, to start the next.
    fn gather(&self, cfg: &BatchingConfig, batch: &mut Vec<Job>) -> Option<Job> {
        let deadline = batch[0].enqueued + cfg.max_queue_delay;
        let mut rows = batch[0].rows;
        while rows < cfg.max_batch_size && !cfg.preferred_batch_sizes.contains(&rows) {
            let job = match self.rx.try_recv() {
                Ok(job) => *job,
                Err(TryRecvError::Disconnected) => return None,
                // Nothing queued and no sign of concurrent callers: run now.
                Err(TryRecvError::Empty) if self.last_batch <= 1 => return None,
                Err(TryRecvError::Empty) => match self.rx.recv_deadline(deadline) {
                    Ok(job) => *job,
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
                },
            };
            if job.reply.is_closed() {
                continue;
            }
            if job.signature != batch[0].signature || rows + job.rows > cfg.max_batch_size {
                return Some(job);
            }
            rows += job.rows;
            batch.push(job);
        }
        None
    }

    fn execute(&mut self, jobs: Vec<Job>) {
        self.execute_counted(jobs, true);
    }

    /// Runs `jobs` as one batch (`record_queue`: their wait in the queue is recorded here;
    /// not when they run again one by one).
    fn execute_counted(&mut self, jobs: Vec<Job>, record_queue: bool) {
        let fits = if jobs.len() > 1 {
            let rows = jobs.iter().map(|j| j.rows).sum();
            self.backend
                .fits_working_memory(&joined_shapes(&jobs, rows))
        } else {
            Some(true)
        };
        if fits == Some(false) {
            // Joined, the requests would pass the engine's working-memory limit: each alone.
            if record_queue {
                self.record_queue(&jobs);
            }
            for job in jobs {
                self.execute_counted(vec![job], false);
            }
            return;
        }
        let started = Instant::now();
        if record_queue {
            self.record_queue(&jobs);
        }
        let sizes: Vec<usize> = jobs.iter().map(|j| j.rows).collect();
        let rows: usize = sizes.iter().sum();
        let span =
            tracing::debug_span!(parent: &jobs[0].span, "execute", requests = jobs.len(), rows);
        let _entered = span.enter();
        // Where the shapes cannot tell whether the joined batch fits (its sizes depend on
        // values), the requests are kept, to run one by one if the engine refuses it; so are
        // those of any batch of several, to run one by one if the engine panics on it: one
        // caller's input that panicked tract failed the requests batched with it (a
        // re-attack's finding), and alone, only its own fails.
        let (inputs, replies, kept) = if jobs.len() > 1 {
            match concat_inputs(&jobs) {
                Ok(inputs) => (inputs, Vec::new(), Some(jobs)),
                Err(e) => {
                    for job in jobs {
                        let _ = job.reply.send(Err(e.clone()));
                    }
                    return;
                }
            }
        } else {
            // One request: its inputs as they are.
            let Some(job) = jobs.into_iter().next() else {
                return;
            };
            (job.inputs, vec![job.reply], None)
        };
        let joined = Instant::now();
        let outcome = infer_caught(&mut *self.backend, inputs, &self.last_compute_ns);
        let inferred = Instant::now();
        let replies = match kept {
            // Kept: several requests.
            Some(jobs)
                if matches!(
                    outcome,
                    Err(InferenceError::WorkingMemory { .. } | InferenceError::Panicked)
                ) =>
            {
                for job in jobs {
                    self.execute_counted(vec![job], false);
                }
                return;
            }
            Some(jobs) => jobs.into_iter().map(|j| j.reply).collect(),
            None => replies,
        };
        let answers = outcome.and_then(|outputs| split(outputs, &sizes));
        let done = Instant::now();
        let phases = [joined - started, inferred - joined, done - inferred];
        record_execution(&self.stats, &self.labels, replies.len(), rows, phases);
        match answers {
            Ok(answers) => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "inference failed");
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn record_queue(&self, jobs: &[Job]) {
        let now = Instant::now();
        for job in jobs {
            let waited = now - job.enqueued;
            self.stats.record_queue(waited);
            metrics::histogram!("nightingale_queue_duration_seconds", &self.labels)
                .record(waited.as_secs_f64());
        }
    }
}

/// Runs `backend` with its panics caught, and keeps how long it took as the model's last
/// execution time.
fn infer_caught(
    backend: &mut dyn Backend,
    inputs: Vec<NamedTensor>,
    last_compute_ns: &AtomicU64,
) -> Result<Vec<NamedTensor>, InferenceError> {
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| backend.infer(inputs)))
        .unwrap_or(Err(InferenceError::Panicked));
    let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    last_compute_ns.store(took, Ordering::Relaxed);
    outcome
}

/// The served model's `nightingale_queue_depth` (none for a copy with a purpose of its own:
/// [`WorkerConfig::purpose`]).
fn set_queue_depth(labels: &Labels, depth: usize) {
    if labels.iter().all(|(key, _)| *key != "purpose") {
        metrics::gauge!("nightingale_queue_depth", labels).set(depth as f64);
    }
}

/// Statistics and metrics of one execution of `requests` requests holding `rows` rows;
/// `phases`: joining the inputs, the engine, splitting the outputs.
fn record_execution(
    stats: &ModelStats,
    labels: &Labels,
    requests: usize,
    rows: usize,
    phases: [Duration; 3],
) {
    let [input, infer, output] = phases;
    stats.record_execution(requests as u64, rows, input, infer, output);
    metrics::histogram!("nightingale_compute_duration_seconds", labels)
        .record((input + infer + output).as_secs_f64());
    metrics::histogram!("nightingale_batch_rows", labels).record(rows as f64);
}

/// The shapes of the requests' inputs once joined (`rows` rows in all).
fn joined_shapes(jobs: &[Job], rows: usize) -> Vec<Vec<usize>> {
    jobs[0]
        .inputs
        .iter()
        .map(|input| {
            let mut shape = input.tensor.shape().to_vec();
            if let Some(first) = shape.first_mut() {
                *first = rows;
            }
            shape
        })
        .collect()
}

/// The requests' inputs concatenated along axis 0, the requests kept.
fn concat_inputs(jobs: &[Job]) -> Result<Vec<NamedTensor>, InferenceError> {
    (0..jobs[0].inputs.len())
        .map(|i| {
            let parts: Vec<&Tensor> = jobs.iter().map(|j| &j.inputs[i].tensor).collect();
            Ok(NamedTensor::new(
                jobs[0].inputs[i].name.clone(),
                Tensor::concat(&parts)?,
            ))
        })
        .collect()
}

/// Splits each output along axis 0 into the requests' row counts.
fn split(
    outputs: Vec<NamedTensor>,
    sizes: &[usize],
) -> Result<Vec<Vec<NamedTensor>>, InferenceError> {
    if sizes.len() == 1 {
        return Ok(vec![outputs]);
    }
    let expected: usize = sizes.iter().sum();
    let mut answers: Vec<Vec<NamedTensor>> = sizes
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for output in outputs {
        let rows = output.tensor.shape().first().copied().unwrap_or(0);
        if rows != expected {
            return Err(InferenceError::OutputNotBatched {
                name: output.name,
                rows,
                expected,
            });
        }
        for (answer, part) in answers.iter_mut().zip(output.tensor.split(sizes)?) {
            answer.push(NamedTensor::new(output.name.clone(), part));
        }
    }
    Ok(answers)
}
