//! At most one log line a second for events a stranger can cause at will (connections
//! refused at accept, TLS handshakes refused, credentials refused, DICOM connections that
//! never become an association): a client connecting and closing in a loop
//! wrote a line per attempt, megabytes of log in seconds (a red-team finding). What is not
//! logged is counted and named in the next line; the metrics count every event.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A log line at most every [`LogLimit::EVERY`].
pub struct LogLimit {
    state: Mutex<State>,
}

struct State {
    last: Option<Instant>,
    held: u64,
}

impl LogLimit {
    /// The least time between two lines.
    pub const EVERY: Duration = Duration::from_secs(1);

    pub const fn new() -> LogLimit {
        LogLimit {
            state: Mutex::new(State {
                last: None,
                held: 0,
            }),
        }
    }

    /// `Some(n)`: write the line now (`n` events were not logged since the last one);
    /// `None`: count this one only.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if s.last
            .is_some_and(|at| now.duration_since(at) < Self::EVERY)
        {
            s.held += 1;
            return None;
        }
        s.last = Some(now);
        Some(std::mem::take(&mut s.held))
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_and_the_rest_counted() {
        let limit = LogLimit::new();
        assert_eq!(limit.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(limit.allow(), None);
        }
        std::thread::sleep(LogLimit::EVERY + Duration::from_millis(20));
        assert_eq!(limit.allow(), Some(5));
        assert_eq!(limit.allow(), None);
    }
}
