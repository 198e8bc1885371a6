//! A bound on the audit records a stranger can make the server write.
//!
//! A refused call without credentials is audited (who knocked matters), but each record is
//! kept forever in the hash-chained trail, and audit writes fail closed: a client that sent
//! thousands of empty CDS Hooks calls a second grew the trail by 0.5 MB/s and could fill
//! the disk that inference and C-STORE need (a red-team finding). A [`Throttle`] lets a
//! burst through one record each, then a steady rate; what it holds back is counted,
//! named in the next record it lets through, and written as one summary record a second
//! after the first one held back, so that no refusal goes unaccounted.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket of audit records.
pub struct Throttle {
    burst: f64,
    per_second: f64,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
    /// Held back since the last record that named them.
    held: u64,
    /// A summary is due (one is scheduled while this is set).
    summary_due: bool,
}

/// What to do with one event.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Write its record; `held_before` events were held back since the last one written.
    Record { held_before: u64 },
    /// Count it only. With `schedule_summary`, the caller arranges for
    /// [`Throttle::take_held`] to be written as one record after [`SUMMARY_AFTER`].
    Hold { schedule_summary: bool },
}

/// How long after the first event held back its summary is written.
pub const SUMMARY_AFTER: Duration = Duration::from_secs(1);

impl Throttle {
    /// `burst` records at once, then `per_second`.
    pub fn new(burst: u32, per_second: f64) -> Throttle {
        Throttle {
            burst: f64::from(burst.max(1)),
            per_second,
            bucket: Mutex::new(Bucket {
                tokens: f64::from(burst.max(1)),
                at: Instant::now(),
                held: 0,
                summary_due: false,
            }),
        }
    }

    pub fn decide(&self) -> Decision {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_second).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Decision::Record {
                held_before: std::mem::take(&mut b.held),
            }
        } else {
            b.held += 1;
            let schedule_summary = !b.summary_due;
            b.summary_due = true;
            Decision::Hold { schedule_summary }
        }
    }

    /// The events held back and not yet named by a record (the summary's count); 0 when a
    /// record written meanwhile named them.
    pub fn take_held(&self) -> u64 {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        b.summary_due = false;
        std::mem::take(&mut b.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_events_are_held_and_counted_once() {
        let t = Throttle::new(3, 1e-9);
        for _ in 0..3 {
            assert_eq!(t.decide(), Decision::Record { held_before: 0 });
        }
        assert_eq!(
            t.decide(),
            Decision::Hold {
                schedule_summary: true
            }
        );
        for _ in 0..4 {
            assert_eq!(
                t.decide(),
                Decision::Hold {
                    schedule_summary: false
                }
            );
        }
        assert_eq!(t.take_held(), 5);
        assert_eq!(t.take_held(), 0);
        // The next one held schedules the next summary.
        assert_eq!(
            t.decide(),
            Decision::Hold {
                schedule_summary: true
            }
        );
    }

    #[test]
    fn a_record_let_through_names_what_was_held_before_it() {
        let t = Throttle::new(1, 100.0);
        assert_eq!(t.decide(), Decision::Record { held_before: 0 });
        // Hold one (a slow machine may have refilled the bucket meanwhile: bounded tries).
        let mut held = 0;
        for _ in 0..1000 {
            if let Decision::Hold { .. } = t.decide() {
                held = 1;
                break;
            }
        }
        assert_eq!(held, 1, "nothing was held at 100 a second");
        // 20 ms refills a record at 100 a second: it names the one held.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(t.decide(), Decision::Record { held_before: 1 });
        assert_eq!(t.take_held(), 0);
    }
}
