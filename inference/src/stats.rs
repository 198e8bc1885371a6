//! Per-model counters in the shape of Triton's statistics extension.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration as StdDuration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// A count of events and the total time they took.
#[derive(Debug, Default)]
struct Counter {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Counter {
    fn add(&self, n: u64, elapsed: StdDuration) {
        self.count.fetch_add(n, Ordering::Relaxed);
        self.ns.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn snapshot(&self) -> Duration {
        Duration {
            count: self.count.load(Ordering::Relaxed),
            ns: self.ns.load(Ordering::Relaxed),
        }
    }
}

/// Counters one model version accumulates while it serves.
#[derive(Debug, Default)]
pub struct ModelStats {
    success: Counter,
    fail: Counter,
    queue: Counter,
    compute_input: Counter,
    compute_infer: Counter,
    compute_output: Counter,
    inference_count: AtomicU64,
    execution_count: AtomicU64,
    last_inference_ms: AtomicU64,
    batches: Mutex<BTreeMap<usize, BatchCounters>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct BatchCounters {
    count: u64,
    input_ns: u64,
    infer_ns: u64,
    output_ns: u64,
}

/// `{count, ns}` as Triton reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Duration {
    pub count: u64,
    pub ns: u64,
}

/// One executed batch size and its timings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BatchStat {
    pub batch_size: usize,
    pub compute_input: Duration,
    pub compute_infer: Duration,
    pub compute_output: Duration,
}

/// A consistent-enough copy of [`ModelStats`] for reporting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    pub success: Duration,
    pub fail: Duration,
    pub queue: Duration,
    pub compute_input: Duration,
    pub compute_infer: Duration,
    pub compute_output: Duration,
    pub inference_count: u64,
    pub execution_count: u64,
    /// Milliseconds since the Unix epoch of the last inference, 0 if none yet.
    pub last_inference: u64,
    pub batch_stats: Vec<BatchStat>,
}

impl ModelStats {
    /// A request finished, well or not, `total` after it arrived.
    pub fn record_request(&self, ok: bool, total: StdDuration) {
        if ok { &self.success } else { &self.fail }.add(1, total);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.last_inference_ms.store(
            u64::try_from(now.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub(crate) fn record_queue(&self, waited: StdDuration) {
        self.queue.add(1, waited);
    }

    /// One backend execution of `requests` requests holding `rows` rows in all.
    pub(crate) fn record_execution(
        &self,
        requests: u64,
        rows: usize,
        input: StdDuration,
        infer: StdDuration,
        output: StdDuration,
    ) {
        self.compute_input.add(requests, input);
        self.compute_infer.add(requests, infer);
        self.compute_output.add(requests, output);
        self.inference_count
            .fetch_add(rows as u64, Ordering::Relaxed);
        self.execution_count.fetch_add(1, Ordering::Relaxed);
        let ns = |d: StdDuration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let mut batches = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        let b = batches.entry(rows).or_default();
        b.count += 1;
        b.input_ns += ns(input);
        b.infer_ns += ns(infer);
        b.output_ns += ns(output);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let batches = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        StatsSnapshot {
            success: self.success.snapshot(),
            fail: self.fail.snapshot(),
            queue: self.queue.snapshot(),
            compute_input: self.compute_input.snapshot(),
            compute_infer: self.compute_infer.snapshot(),
            compute_output: self.compute_output.snapshot(),
            inference_count: self.inference_count.load(Ordering::Relaxed),
            execution_count: self.execution_count.load(Ordering::Relaxed),
            last_inference: self.last_inference_ms.load(Ordering::Relaxed),
            batch_stats: batches
                .iter()
                .map(|(&batch_size, b)| BatchStat {
                    batch_size,
                    compute_input: Duration {
                        count: b.count,
                        ns: b.input_ns,
                    },
                    compute_infer: Duration {
                        count: b.count,
                        ns: b.infer_ns,
                    },
                    compute_output: Duration {
                        count: b.count,
                        ns: b.output_ns,
                    },
                })
                .collect(),
        }
    }
}
