//! Model workers on the real wdbc-malignancy model (tract): dynamic batching gives exactly
//! the single-request results, a full queue is refused at once, abandoned requests are skipped.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nightingale_inference::{
    Backend, BackendKind, BatchingConfig, InferenceError, LoadOptions, ModelMetadata, ModelWorker,
    NamedTensor, Tensor, WorkerConfig,
};

fn model_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/bundles/wdbc-malignancy/1/model.onnx")
}

fn load() -> Box<dyn Backend> {
    nightingale_inference::load(
        &model_path(),
        &LoadOptions {
            backend: BackendKind::Tract,
            ..Default::default()
        },
    )
    .expect("the reference model loads")
}

/// Real rows from the bundle's test split.
fn rows() -> Vec<Vec<f32>> {
    let csv = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../models/bundles/wdbc-malignancy/testdata/test.csv"),
    )
    .unwrap();
    csv.lines()
        .skip(1)
        .map(|l| l.split(',').take(30).map(|v| v.parse().unwrap()).collect())
        .collect()
}

fn input(rows: &[Vec<f32>]) -> Vec<NamedTensor> {
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    vec![NamedTensor::new(
        "features",
        Tensor::from_vec(vec![rows.len(), 30], flat).unwrap(),
    )]
}

/// onnxruntime's P(malignant) for each row of the test split (column `expected_p_malignant`).
fn expected_p() -> Vec<f32> {
    let csv = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../models/bundles/wdbc-malignancy/testdata/test.csv"),
    )
    .unwrap();
    let mut lines = csv.lines();
    let col = lines
        .next()
        .unwrap()
        .split(',')
        .position(|h| h == "expected_p_malignant")
        .unwrap();
    lines
        .map(|l| l.split(',').nth(col).unwrap().parse().unwrap())
        .collect()
}

/// Longest any wait in these tests may take before it fails.
const WAIT: Duration = Duration::from_secs(30);

/// Blocks each `infer` of the gated instance until released, so tests can fill the queue
/// deterministically; forks (further instances) are not gated and say which instance ran.
struct Gated {
    inner: Box<dyn Backend>,
    entered: Arc<AtomicUsize>,
    gate: Arc<(Mutex<bool>, Condvar)>,
    calls: Arc<Mutex<Vec<usize>>>,
    /// This instance's number (0: the first, gated one).
    id: usize,
    forks: Arc<AtomicUsize>,
    /// Instance number of every execution, in order.
    ran_on: Arc<Mutex<Vec<usize>>>,
}

impl Backend for Gated {
    fn name(&self) -> &'static str {
        "gated"
    }
    fn metadata(&self) -> &ModelMetadata {
        self.inner.metadata()
    }
    fn infer(&mut self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, InferenceError> {
        if self.id == 0 {
            self.entered.fetch_add(1, Ordering::SeqCst);
            let (lock, cv) = &*self.gate;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
        }
        self.calls.lock().unwrap().push(inputs[0].tensor.shape()[0]);
        self.ran_on.lock().unwrap().push(self.id);
        self.inner.infer(inputs)
    }
    fn fits_working_memory(&self, shapes: &[Vec<usize>]) -> Option<bool> {
        self.inner.fits_working_memory(shapes)
    }
    fn fork(&self) -> Result<Box<dyn Backend>, InferenceError> {
        Ok(Box::new(Gated {
            inner: self.inner.fork()?,
            entered: self.entered.clone(),
            gate: self.gate.clone(),
            calls: self.calls.clone(),
            id: self.forks.fetch_add(1, Ordering::SeqCst) + 1,
            forks: self.forks.clone(),
            ran_on: self.ran_on.clone(),
        }))
    }
}

struct Harness {
    worker: Arc<ModelWorker>,
    entered: Arc<AtomicUsize>,
    gate: Arc<(Mutex<bool>, Condvar)>,
    calls: Arc<Mutex<Vec<usize>>>,
    ran_on: Arc<Mutex<Vec<usize>>>,
}

impl Harness {
    fn new(capacity: usize, max_batch_size: usize) -> Harness {
        Harness::with(WorkerConfig {
            queue_capacity: capacity,
            batching: Some(BatchingConfig {
                max_batch_size,
                max_queue_delay: Duration::from_millis(1),
                preferred_batch_sizes: vec![],
            }),
            ..WorkerConfig::default()
        })
    }

    fn with(config: WorkerConfig) -> Harness {
        Harness::with_backend(config, load())
    }

    fn with_backend(config: WorkerConfig, inner: Box<dyn Backend>) -> Harness {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let calls = Arc::new(Mutex::new(vec![]));
        let entered = Arc::new(AtomicUsize::new(0));
        let ran_on = Arc::new(Mutex::new(vec![]));
        let backend = Gated {
            inner,
            entered: entered.clone(),
            gate: gate.clone(),
            calls: calls.clone(),
            id: 0,
            forks: Arc::new(AtomicUsize::new(0)),
            ran_on: ran_on.clone(),
        };
        let worker = ModelWorker::spawn(Box::new(backend), config).unwrap();
        Harness {
            worker: Arc::new(worker),
            entered,
            gate,
            calls,
            ran_on,
        }
    }

    fn open(&self) {
        *self.gate.0.lock().unwrap() = true;
        self.gate.1.notify_all();
    }

    /// Waits until the worker thread is blocked in the gate with its first batch.
    async fn until_blocked(&self) {
        until("the gated instance starts a batch", || {
            self.entered.load(Ordering::SeqCst) > 0
        })
        .await;
    }

    async fn until_queued(&self, n: usize) {
        until("requests are queued", || self.worker.queue_depth() >= n).await;
    }
}

/// Polls `done` until it holds; fails the test after [`WAIT`].
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Awaits `f`, failing the test after [`WAIT`].
async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .expect("finished within the bound")
}

impl Harness {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_results_equal_single_results_exactly() {
    let rows = rows();
    let n = 40;
    // Reference: each row run alone, straight on a backend.
    let mut single = load();
    let expected: Vec<Vec<NamedTensor>> = rows[..n]
        .iter()
        .map(|r| single.infer(input(std::slice::from_ref(r))).unwrap())
        .collect();

    let h = Harness::new(1024, 64);
    let first = {
        let w = h.worker.clone();
        let x = input(&rows[..1]);
        tokio::spawn(async move { w.infer(x).await })
    };
    h.until_blocked().await; // the first request is inside the (closed) gate
    let mut tasks = vec![];
    for row in &rows[1..n] {
        let w = h.worker.clone();
        let x = input(std::slice::from_ref(row));
        tasks.push(tokio::spawn(async move { w.infer(x).await }));
    }
    h.until_queued(n - 1).await;
    h.open();
    let mut answers = vec![first.await.unwrap().unwrap()];
    for t in tasks {
        answers.push(t.await.unwrap().unwrap());
    }
    for (i, (got, want)) in answers.iter().zip(&expected).enumerate() {
        assert_eq!(
            got, want,
            "row {i}: the batched answer differs from the single-request answer"
        );
    }
    // The 39 queued requests ran as one batch after the first.
    assert_eq!(*h.calls.lock().unwrap(), vec![1, n - 1]);
    let stats = h.worker.stats().snapshot();
    assert_eq!(stats.execution_count, 2);
    assert_eq!(stats.inference_count, n as u64);
    assert_eq!(stats.success.count, n as u64);
}

/// Panics (as tract's kernels do on some inputs) on a batch holding a row whose first
/// feature is -999.
struct PanicsOnSentinel(Box<dyn Backend>);

impl Backend for PanicsOnSentinel {
    fn name(&self) -> &'static str {
        "panics-on-sentinel"
    }
    fn metadata(&self) -> &ModelMetadata {
        self.0.metadata()
    }
    fn infer(&mut self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, InferenceError> {
        if let Tensor::Fp32(a) = &inputs[0].tensor
            && a.rows().into_iter().any(|r| r[0] == -999.0)
        {
            panic!("index out of range");
        }
        self.0.infer(inputs)
    }
    fn fork(&self) -> Result<Box<dyn Backend>, InferenceError> {
        Ok(Box::new(PanicsOnSentinel(self.0.fork()?)))
    }
}

/// One caller's request that makes the engine panic fails alone: the requests batched with
/// it run again one by one and get their answers (they got the panic: a re-attack's
/// finding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_batch_fails_only_the_request_that_caused_it() {
    let rows = rows();
    let mut single = load();
    let h = Harness::with_backend(
        WorkerConfig {
            queue_capacity: 64,
            batching: Some(BatchingConfig {
                max_batch_size: 8,
                max_queue_delay: Duration::from_millis(1),
                preferred_batch_sizes: vec![],
            }),
            ..WorkerConfig::default()
        },
        Box::new(PanicsOnSentinel(load())),
    );
    let spawn = |x: Vec<NamedTensor>| {
        let w = h.worker.clone();
        tokio::spawn(async move { w.infer(x).await })
    };
    let first = spawn(input(&rows[..1]));
    h.until_blocked().await;
    let mut bad_row = rows[1].clone();
    bad_row[0] = -999.0;
    let bad = spawn(input(std::slice::from_ref(&bad_row)));
    h.until_queued(1).await;
    let good: Vec<_> = (2..5)
        .map(|i| spawn(input(std::slice::from_ref(&rows[i]))))
        .collect();
    h.until_queued(4).await;
    h.open();
    bounded(first).await.unwrap().unwrap();
    assert!(matches!(
        bounded(bad).await.unwrap(),
        Err(InferenceError::Panicked)
    ));
    for (i, task) in (2..5).zip(good) {
        let want = single.infer(input(std::slice::from_ref(&rows[i]))).unwrap();
        assert_eq!(bounded(task).await.unwrap().unwrap(), want, "row {i}");
    }
    // The first alone, the batch of four (which panicked), then each of the four alone.
    assert_eq!(*h.calls.lock().unwrap(), vec![1, 4, 1, 1, 1, 1]);
}

/// Requests that would pass the engine's working-memory limit once joined run one by one,
/// each with its exact single answer (joined, the batch would have been refused whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_batch_over_the_working_memory_limit_runs_request_by_request() {
    let limited = || {
        nightingale_inference::load(
            &model_path(),
            &LoadOptions {
                backend: BackendKind::Tract,
                max_working_bytes: 10 << 10,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let rows = rows();
    let n = 40;
    let probe = limited();
    assert_eq!(probe.fits_working_memory(&[vec![1, 30]]), Some(true));
    assert_eq!(probe.fits_working_memory(&[vec![n - 1, 30]]), Some(false));
    // Alone, the 39 rows are refused: the limit is the engine's.
    let mut alone = limited();
    let refused = alone.infer(input(&rows[1..n])).unwrap_err();
    assert!(
        matches!(refused, InferenceError::WorkingMemory { limit, .. } if limit == 10 << 10),
        "{refused}"
    );
    assert!(refused.is_client_error());
    let mut single = load();
    let expected: Vec<Vec<NamedTensor>> = rows[..n]
        .iter()
        .map(|r| single.infer(input(std::slice::from_ref(r))).unwrap())
        .collect();
    let h = Harness::with_backend(
        WorkerConfig {
            queue_capacity: 1024,
            batching: Some(BatchingConfig {
                max_batch_size: 64,
                max_queue_delay: Duration::from_millis(1),
                preferred_batch_sizes: vec![],
            }),
            ..WorkerConfig::default()
        },
        limited(),
    );
    let first = {
        let w = h.worker.clone();
        let x = input(&rows[..1]);
        tokio::spawn(async move { w.infer(x).await })
    };
    h.until_blocked().await;
    let mut tasks = vec![];
    for row in &rows[1..n] {
        let w = h.worker.clone();
        let x = input(std::slice::from_ref(row));
        tasks.push(tokio::spawn(async move { w.infer(x).await }));
    }
    h.until_queued(n - 1).await;
    h.open();
    let mut answers = vec![bounded(first).await.unwrap().unwrap()];
    for t in tasks {
        answers.push(bounded(t).await.unwrap().unwrap());
    }
    assert_eq!(answers, expected);
    assert_eq!(*h.calls.lock().unwrap(), vec![1; n]);
    let stats = h.worker.stats().snapshot();
    assert_eq!(stats.execution_count, n as u64);
    assert_eq!(stats.inference_count, n as u64);
}

/// A model whose working memory grows with the batch and with a value of the request
/// (x [N, 4] times Range(0, max(x) + 1); y = x, by onnxruntime in make_load_fixtures.py):
/// the shapes cannot tell whether joined requests fit, so the batch is tried and, refused,
/// its requests run one by one (a red-team finding: all of them were refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_batch_sized_by_values_is_retried_request_by_request() {
    let load = || {
        nightingale_inference::load(
            &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../models/tests/fixtures/batch-range.onnx"),
            &LoadOptions {
                backend: BackendKind::Tract,
                max_working_bytes: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let request = |i: usize| {
        vec![NamedTensor::new(
            "x",
            Tensor::from_vec(vec![1, 4], vec![10_000.0f32 + i as f32, 1., 2., 3.]).unwrap(),
        )]
    };
    let n = 8;
    // One alone fits (4 × 10,001 × 4 bytes); the eight joined do not.
    assert_eq!(load().fits_working_memory(&[vec![n, 4]]), None);
    assert!(matches!(
        load().infer(vec![NamedTensor::new(
            "x",
            Tensor::from_vec(vec![n, 4], [10_000.0f32, 1., 2., 3.].repeat(n)).unwrap()
        )]),
        Err(InferenceError::WorkingMemory { .. })
    ));
    let h = Harness::with_backend(
        WorkerConfig {
            queue_capacity: 64,
            batching: Some(BatchingConfig {
                max_batch_size: 64,
                max_queue_delay: Duration::from_millis(1),
                preferred_batch_sizes: vec![],
            }),
            ..WorkerConfig::default()
        },
        load(),
    );
    let first = {
        let w = h.worker.clone();
        let x = request(0);
        tokio::spawn(async move { w.infer(x).await })
    };
    h.until_blocked().await;
    let mut tasks = vec![];
    for i in 1..=n {
        let w = h.worker.clone();
        let x = request(i);
        tasks.push((i, tokio::spawn(async move { w.infer(x).await })));
    }
    h.until_queued(n).await;
    h.open();
    bounded(first).await.unwrap().unwrap();
    for (i, task) in tasks {
        let answer = bounded(task).await.unwrap().unwrap();
        assert_eq!(answer[0].tensor, request(i)[0].tensor, "request {i}");
    }
    // The first alone, the eight joined (refused), then each of them alone.
    let calls = h.calls.lock().unwrap().clone();
    assert_eq!(calls, [vec![1, n], vec![1; n]].concat());
    let stats = h.worker.stats().snapshot();
    assert_eq!(stats.inference_count, n as u64 + 1);
    assert_eq!(stats.success.count, n as u64 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_respect_max_batch_size_and_mixed_request_sizes() {
    let rows = rows();
    let h = Harness::new(1024, 8);
    let w = h.worker.clone();
    let x = input(&rows[..1]);
    let first = tokio::spawn(async move { w.infer(x).await });
    h.until_blocked().await;
    // Requests of 3, 3, 3 and 5 rows: 3+3 fits in 8, the third 3 would make 9.
    let sizes = [3usize, 3, 3, 5];
    let mut start = 1;
    let mut tasks = vec![];
    for &s in &sizes {
        let w = h.worker.clone();
        let x = input(&rows[start..start + s]);
        start += s;
        tasks.push((x.clone(), tokio::spawn(async move { w.infer(x).await })));
        h.until_queued(tasks.len()).await;
    }
    h.open();
    first.await.unwrap().unwrap();
    let mut reference = load();
    for (x, t) in tasks {
        let got = t.await.unwrap().unwrap();
        assert_eq!(got, reference.infer(x).unwrap());
    }
    let calls = h.calls.lock().unwrap().clone();
    assert_eq!(calls.iter().sum::<usize>(), 15);
    assert!(calls.iter().all(|&c| c <= 8), "{calls:?}");
    assert_eq!(calls, vec![1, 6, 8], "3+3 then 3+5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_overloaded_at_once() {
    let rows = rows();
    let h = Harness::new(2, 1);
    let spawn = |r: usize| {
        let w = h.worker.clone();
        let x = input(&rows[r..r + 1]);
        tokio::spawn(async move { w.infer(x).await })
    };
    let first = spawn(0);
    h.until_blocked().await;
    let queued = [spawn(1), spawn(2)];
    h.until_queued(2).await;
    let refused = h.worker.infer(input(&rows[3..4])).await;
    assert!(
        matches!(refused, Err(InferenceError::Overloaded { capacity: 2 })),
        "{refused:?}"
    );
    h.open();
    first.await.unwrap().unwrap();
    for q in queued {
        q.await.unwrap().unwrap();
    }
    assert_eq!(h.worker.stats().snapshot().fail.count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_are_not_run() {
    let rows = rows();
    let h = Harness::new(16, 1);
    let w = h.worker.clone();
    let x = input(&rows[..1]);
    let first = tokio::spawn(async move { w.infer(x).await });
    h.until_blocked().await;
    let w = h.worker.clone();
    let x = input(&rows[1..2]);
    let abandoned = tokio::spawn(async move { w.infer(x).await });
    h.until_queued(1).await;
    abandoned.abort(); // the caller hangs up while queued
    let _ = abandoned.await;
    let w = h.worker.clone();
    let x = input(&rows[2..3]);
    let last = tokio::spawn(async move { w.infer(x).await });
    h.until_queued(2).await;
    h.open();
    first.await.unwrap().unwrap();
    last.await.unwrap().unwrap();
    assert_eq!(
        *h.calls.lock().unwrap(),
        vec![1, 1],
        "the abandoned request was skipped"
    );
}

#[tokio::test]
async fn inputs_are_checked_before_queueing() {
    let worker = ModelWorker::spawn(
        load(),
        WorkerConfig {
            batching: Some(BatchingConfig {
                max_batch_size: 4,
                max_queue_delay: Duration::from_micros(100),
                preferred_batch_sizes: vec![],
            }),
            ..WorkerConfig::default()
        },
    )
    .unwrap();
    let rows = rows();
    let cases: Vec<(Vec<NamedTensor>, &str)> = vec![
        (
            vec![NamedTensor::new(
                "x",
                Tensor::from_vec(vec![1, 30], vec![0f32; 30]).unwrap(),
            )],
            "unknown input \"x\"",
        ),
        (
            vec![NamedTensor::new(
                "features",
                Tensor::from_vec(vec![1, 30], vec![0f64; 30]).unwrap(),
            )],
            "datatype FP64",
        ),
        (
            vec![NamedTensor::new(
                "features",
                Tensor::from_vec(vec![1, 29], vec![0f32; 29]).unwrap(),
            )],
            "shape [1, 29]",
        ),
        (
            input(&rows[..5]),
            "batch size 5 is larger than this model's max_batch_size 4",
        ),
        (vec![], "missing input \"features\""),
        (
            [input(&rows[..1]), input(&rows[..1])].concat(),
            "given more than once",
        ),
        (
            vec![NamedTensor::new(
                "features",
                Tensor::from_vec(vec![0, 30], Vec::<f32>::new()).unwrap(),
            )],
            "batch size 0",
        ),
    ];
    for (inputs, needle) in cases {
        let err = worker.infer(inputs).await.unwrap_err();
        assert!(err.is_client_error(), "{err}");
        assert!(
            err.to_string().contains(needle),
            "expected {needle:?} in {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_instances_share_one_queue() {
    let rows = rows();
    let want = expected_p();
    // Instance 0 blocks on its first request; the others must serve everything after it.
    let h = Harness::with(WorkerConfig {
        instances: 3,
        ..WorkerConfig::default()
    });
    // Whichever instance takes a request is free to: send one at a time until instance 0 holds one.
    let mut warm = 0;
    let first = loop {
        let w = h.worker.clone();
        let x = input(&rows[..1]);
        let t = tokio::spawn(async move { w.infer(x).await });
        until("a request is taken", || {
            h.entered.load(Ordering::SeqCst) > 0 || t.is_finished()
        })
        .await;
        if h.entered.load(Ordering::SeqCst) > 0 {
            break t;
        }
        bounded(t).await.unwrap().unwrap();
        warm += 1;
    };
    let tasks: Vec<_> = (1..41)
        .map(|i| {
            let w = h.worker.clone();
            let x = input(&rows[i..i + 1]);
            tokio::spawn(async move { w.infer(x).await })
        })
        .collect();
    for (i, t) in (1..41).zip(tasks) {
        let out = bounded(t).await.unwrap().unwrap();
        let p = out[1].tensor.view::<f32>().unwrap();
        assert!(
            (p[[0, 0]] - want[i]).abs() <= 1e-5,
            "row {i}: {} vs onnxruntime {}",
            p[[0, 0]],
            want[i]
        );
    }
    {
        let ran_on = h.ran_on.lock().unwrap();
        assert_eq!(ran_on.len(), 40 + warm, "instance 0 is still blocked");
        assert!(ran_on.iter().all(|&id| id == 1 || id == 2), "{ran_on:?}");
    }
    h.open();
    let out = bounded(first).await.unwrap().unwrap();
    let p = out[1].tensor.view::<f32>().unwrap();
    assert!((p[[0, 0]] - want[0]).abs() <= 1e-5);
    assert_eq!(h.ran_on.lock().unwrap().last(), Some(&0));
    assert_eq!(
        h.worker.stats().snapshot().inference_count,
        41 + warm as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_capacity_counts_bytes_too() {
    let rows = rows();
    // Room for two one-row requests (30 FP32 = 120 bytes each) in the queue.
    let h = Harness::with(WorkerConfig {
        queue_capacity: 16,
        queue_bytes: 240,
        ..WorkerConfig::default()
    });
    let spawn = |r: usize| {
        let w = h.worker.clone();
        let x = input(&rows[r..r + 1]);
        tokio::spawn(async move { w.infer(x).await })
    };
    let first = spawn(0);
    h.until_blocked().await;
    let queued = [spawn(1), spawn(2)];
    h.until_queued(2).await;
    assert_eq!(h.worker.queued_bytes(), 240);
    let refused = h.worker.infer(input(&rows[3..4])).await;
    assert!(
        matches!(refused, Err(InferenceError::QueueBytesFull { limit: 240 })),
        "{refused:?}"
    );
    // A request larger than the whole limit is refused the same way, even when idle.
    h.open();
    bounded(first).await.unwrap().unwrap();
    for q in queued {
        bounded(q).await.unwrap().unwrap();
    }
    assert_eq!(h.worker.queued_bytes(), 0);
    let too_big = h.worker.infer(input(&rows[..3])).await;
    assert!(
        matches!(too_big, Err(InferenceError::QueueBytesFull { limit: 240 })),
        "{too_big:?}"
    );
    assert_eq!(h.worker.queued_bytes(), 0);
}

#[tokio::test]
async fn rows_per_request_are_limited_without_batching() {
    let rows = rows();
    let want = expected_p();
    let worker = ModelWorker::spawn(
        load(),
        WorkerConfig {
            max_rows_per_request: 3,
            ..WorkerConfig::default()
        },
    )
    .unwrap();
    assert!(worker.config().batching.is_none());
    let err = worker.infer(input(&rows[..4])).await.unwrap_err();
    assert!(
        matches!(err, InferenceError::TooManyRows { got: 4, max: 3 }),
        "{err}"
    );
    assert!(err.is_client_error());
    assert!(err.to_string().contains("max_rows_per_request"), "{err}");
    let out = worker.infer(input(&rows[..3])).await.unwrap();
    let p = out[1].tensor.view::<f32>().unwrap();
    for i in 0..3 {
        assert!((p[[i, 0]] - want[i]).abs() <= 1e-5, "row {i}");
    }
}

/// Adaptive batching (issue 13): a lone request is not held for company that is not coming.
/// With a queue delay of ten minutes, the old behaviour would answer after ten minutes; the
/// bound here is [`WAIT`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_request_runs_at_once_whatever_the_queue_delay() {
    let rows = rows();
    let h = Harness::with(WorkerConfig {
        batching: Some(BatchingConfig {
            max_batch_size: 8,
            max_queue_delay: Duration::from_secs(600),
            preferred_batch_sizes: vec![],
        }),
        ..WorkerConfig::default()
    });
    h.open();
    let mut reference = load();
    for i in 0..3 {
        let x = input(&rows[i..i + 1]);
        let got = bounded(h.worker.infer(x.clone())).await.unwrap();
        assert_eq!(got, reference.infer(x).unwrap());
    }
    assert_eq!(h.calls.lock().unwrap().clone(), vec![1, 1, 1]);
}

/// Records the name of the thread each execution ran on; executions on an instance thread
/// (named `ng-…`) wait for the gate. Its forks share the model, as tract's do.
struct OnThread {
    inner: Box<dyn Backend>,
    threads: Arc<Mutex<Vec<String>>>,
    gate: Arc<(Mutex<bool>, Condvar)>,
    entered: Arc<AtomicUsize>,
}

impl Backend for OnThread {
    fn name(&self) -> &'static str {
        "on-thread"
    }
    fn metadata(&self) -> &ModelMetadata {
        self.inner.metadata()
    }
    fn infer(&mut self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, InferenceError> {
        let name = std::thread::current().name().unwrap_or("").to_owned();
        if name.starts_with("ng-") {
            self.entered.fetch_add(1, Ordering::SeqCst);
            let (lock, cv) = &*self.gate;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait_timeout(open, WAIT).unwrap().0;
            }
        }
        self.threads.lock().unwrap().push(name);
        self.inner.infer(inputs)
    }
    fn fork(&self) -> Result<Box<dyn Backend>, InferenceError> {
        Ok(Box::new(OnThread {
            inner: self.inner.fork()?,
            threads: self.threads.clone(),
            gate: self.gate.clone(),
            entered: self.entered.clone(),
        }))
    }
    fn forks_share_the_model(&self) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_request_of_a_small_model_runs_on_the_callers_thread_and_overlapping_ones_queue() {
    let threads = Arc::new(Mutex::new(vec![]));
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let entered = Arc::new(AtomicUsize::new(0));
    let backend = OnThread {
        inner: load(),
        threads: threads.clone(),
        gate: gate.clone(),
        entered: entered.clone(),
    };
    let worker = Arc::new(
        ModelWorker::spawn(
            Box::new(backend),
            WorkerConfig {
                batching: Some(BatchingConfig {
                    max_batch_size: 8,
                    max_queue_delay: Duration::from_millis(1),
                    preferred_batch_sizes: vec![],
                }),
                // wdbc runs in microseconds, but a debug build on a busy machine must not
                // decide this test: any execution counts as small here.
                inline_max: WAIT,
                ..WorkerConfig::default()
            },
        )
        .unwrap(),
    );
    let rows = rows();
    let p = |out: &[NamedTensor]| out[1].tensor.view::<f32>().unwrap()[[0, 0]];
    // The first request: the model's cost is unknown, so it goes to an instance thread (held
    // at the gate); a second one overlapping it is not alone and queues too.
    let first = tokio::spawn({
        let (worker, row) = (worker.clone(), rows[0].clone());
        async move { worker.infer(input(&[row])).await }
    });
    until("the first request is on an instance thread", || {
        entered.load(Ordering::SeqCst) > 0
    })
    .await;
    let second = tokio::spawn({
        let (worker, row) = (worker.clone(), rows[1].clone());
        async move { worker.infer(input(&[row])).await }
    });
    // The second waits in the queue (the only instance thread holds the first).
    until("the second request is queued", || worker.queue_depth() > 0).await;
    {
        let (lock, cv) = &*gate;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }
    let first = bounded(first).await.unwrap().unwrap();
    let second = bounded(second).await.unwrap().unwrap();
    {
        let ran = threads.lock().unwrap();
        assert_eq!(ran.len(), 2, "{ran:?}");
        assert!(ran.iter().all(|t| t.starts_with("ng-")), "{ran:?}");
    }
    // Now alone and known to be small: on the caller's thread, with the very same answers.
    let again = bounded(worker.infer(input(&rows[..1]))).await.unwrap();
    let again2 = bounded(worker.infer(input(&rows[1..2]))).await.unwrap();
    let ran = threads.lock().unwrap().clone();
    assert_eq!(ran.len(), 4, "{ran:?}");
    assert!(ran[2..].iter().all(|t| !t.starts_with("ng-")), "{ran:?}");
    assert_eq!(p(&again).to_bits(), p(&first).to_bits());
    assert_eq!(p(&again2).to_bits(), p(&second).to_bits());
    let expected = expected_p();
    assert!((p(&again) - expected[0]).abs() < 1e-5);
    // Statistics count both paths.
    let stats = worker.stats().snapshot();
    assert_eq!(stats.inference_count, 4, "{stats:?}");
}

/// The lesion CNN on candle (the lesion-detection-candle bundle), counting the passes of its
/// gradient jobs: the backend asks `cancelled` once before each.
#[cfg(feature = "candle")]
struct CountingPasses {
    inner: Box<dyn Backend>,
    passes: Arc<AtomicUsize>,
}

#[cfg(feature = "candle")]
impl Backend for CountingPasses {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn metadata(&self) -> &ModelMetadata {
        self.inner.metadata()
    }
    fn infer(&mut self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, InferenceError> {
        self.inner.infer(inputs)
    }
    fn supports_gradients(&self) -> bool {
        true
    }
    fn gradients(
        &mut self,
        request: &nightingale_inference::explain::GradientRequest,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<nightingale_inference::explain::GradientSaliency, InferenceError> {
        let passes = &self.passes;
        self.inner.gradients(request, &|| {
            passes.fetch_add(1, Ordering::SeqCst);
            cancelled()
        })
    }
    fn fork(&self) -> Result<Box<dyn Backend>, InferenceError> {
        Ok(Box::new(CountingPasses {
            inner: self.inner.fork()?,
            passes: self.passes.clone(),
        }))
    }
}

/// The reviewer's case (finding 3): integrated gradients with a huge step count on the
/// model's only instance, whose caller gives up (the HTTP layer drops the request at its
/// deadline). The job must stop at its next pass and free the instance for the requests
/// queued behind it, instead of running all its steps.
#[cfg(feature = "candle")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_gradient_job_stops_and_frees_the_instance() {
    use nightingale_inference::explain::{GradientMethod, GradientRequest};
    const STEPS: usize = 1_000_000;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/bundles/lesion-detection-candle/1");
    let read = |f: &str| std::fs::read(dir.join(f)).expect("the candle bundle's file");
    let candle = nightingale_inference::load_candle(
        "conv-classifier",
        &read("architecture.json"),
        &dir.join("architecture.json"),
        &read("model.safetensors"),
        &dir,
        &LoadOptions {
            backend: BackendKind::Candle,
            ..Default::default()
        },
    )
    .expect("the candle bundle loads");
    let name = candle.metadata().inputs[0].name.clone();
    let image = move || {
        NamedTensor::new(
            name.clone(),
            Tensor::from_vec(vec![1, 1, 128, 128], vec![0.5f32; 128 * 128]).unwrap(),
        )
    };
    let passes = Arc::new(AtomicUsize::new(0));
    let backend = CountingPasses {
        inner: candle,
        passes: passes.clone(),
    };
    let worker = Arc::new(ModelWorker::spawn(Box::new(backend), WorkerConfig::default()).unwrap());
    assert!(worker.supports_gradients());

    let w = worker.clone();
    let request = GradientRequest {
        input: image(),
        output: 0,
        targets: vec![1],
        method: GradientMethod::IntegratedGradients {
            baseline: 0.0,
            steps: STEPS,
        },
        max_batch: 1,
    };
    let job = tokio::spawn(async move { w.gradients(request).await });
    until("the gradient job is running", || {
        passes.load(Ordering::SeqCst) >= 2
    })
    .await;
    job.abort(); // the caller gives up
    let _ = job.await;

    // A plain request queued behind it is answered: the instance is free again.
    bounded(worker.infer(vec![image()]))
        .await
        .expect("the plain request is served");
    // One instance runs one job at a time, so the gradient job has returned by now.
    let ran = passes.load(Ordering::SeqCst);
    assert!(
        ran < STEPS / 1000,
        "the abandoned job ran {ran} of its {STEPS} passes"
    );
}

/// A model of one BYTES input that hands its input back (as ONNX `Identity` on a string
/// tensor does): the bytes a request would reach the engine with.
struct EchoText {
    metadata: ModelMetadata,
    ran: Arc<AtomicUsize>,
}

impl Backend for EchoText {
    fn name(&self) -> &'static str {
        "echo-text"
    }
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }
    fn infer(&mut self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, InferenceError> {
        self.ran.fetch_add(1, Ordering::SeqCst);
        Ok(inputs
            .into_iter()
            .map(|t| NamedTensor::new("out", t.tensor))
            .collect())
    }
    fn fork(&self) -> Result<Box<dyn Backend>, InferenceError> {
        Ok(Box::new(EchoText {
            metadata: self.metadata.clone(),
            ran: self.ran.clone(),
        }))
    }
}

/// Red-team finding: both engines take BYTES as text and turned bytes that are not UTF-8
/// into U+FFFD on the way in, answering 200 for what the model never saw (and the audit's
/// input digest was of the bytes sent). Now such an input is a client error naming the
/// element, and the model does not run; text passes unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_inputs_that_are_not_utf8_are_refused_before_the_model() {
    use nightingale_inference::{DataType, TensorSpec};
    let spec = |name: &str| TensorSpec {
        name: name.into(),
        datatype: DataType::Bytes,
        shape: vec![-1],
    };
    let ran = Arc::new(AtomicUsize::new(0));
    let worker = ModelWorker::spawn(
        Box::new(EchoText {
            metadata: ModelMetadata {
                inputs: vec![spec("text")],
                outputs: vec![spec("out")],
            },
            ran: ran.clone(),
        }),
        WorkerConfig::default(),
    )
    .unwrap();
    let text = |items: Vec<Vec<u8>>| {
        vec![NamedTensor::new(
            "text",
            Tensor::from_vec(vec![items.len()], items).unwrap(),
        )]
    };
    let err = bounded(worker.infer(text(vec![b"ok".to_vec(), vec![0xff, 0xfe, 0x00, 0x80]])))
        .await
        .unwrap_err();
    assert!(err.is_client_error(), "{err}");
    assert!(err.to_string().contains("element 1 is not UTF-8"), "{err}");
    assert_eq!(ran.load(Ordering::SeqCst), 0, "the model ran");
    let out = bounded(worker.infer(text(vec!["é\u{0}".as_bytes().to_vec()])))
        .await
        .unwrap();
    let Tensor::Bytes(a) = &out[0].tensor else {
        panic!("BYTES out");
    };
    assert_eq!(a.iter().next().unwrap(), &"é\u{0}".as_bytes().to_vec());
}
