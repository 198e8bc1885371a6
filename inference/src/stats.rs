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

    /// One backend execution of `requests` requests holding `rows` rows in all. Each request
    /// is charged the whole execution's durations, as Triton's statistics charge every
    /// request of a batch (`compute_infer.ns / count` is the time a request's batch took;
    /// charged once for the batch, the average was that time divided by the batch's
    /// requests: a red-team finding); `batch_stats` keeps one entry per execution.
    pub(crate) fn record_execution(
        &self,
        requests: u64,
        rows: usize,
        input: StdDuration,
        infer: StdDuration,
        output: StdDuration,
    ) {
        let each = u32::try_from(requests).unwrap_or(u32::MAX);
        self.compute_input.add(requests, input.saturating_mul(each));
        self.compute_infer.add(requests, infer.saturating_mul(each));
        self.compute_output
            .add(requests, output.saturating_mul(each));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Triton charges each request of a batch the batch's compute durations; `batch_stats`
    /// counts the execution once.
    #[test]
    fn every_request_of_a_batch_is_charged_the_batchs_compute_time() {
        let stats = ModelStats::default();
        let ms = StdDuration::from_millis;
        stats.record_execution(3, 5, ms(1), ms(2), ms(3));
        stats.record_execution(1, 1, ms(1), ms(1), ms(1));
        let s = stats.snapshot();
        let m = |n: u64| n * 1_000_000;
        assert_eq!(s.compute_input, Duration { count: 4, ns: m(4) });
        assert_eq!(s.compute_infer, Duration { count: 4, ns: m(7) });
        assert_eq!(
            s.compute_output,
            Duration {
                count: 4,
                ns: m(10)
            }
        );
        assert_eq!((s.inference_count, s.execution_count), (6, 2));
        let five = s.batch_stats.iter().find(|b| b.batch_size == 5).unwrap();
        assert_eq!(five.compute_infer, Duration { count: 1, ns: m(2) });
    }
}
