//! The store's clock: wall-clock milliseconds since the Unix epoch, or a clock that a
//! test sets and moves.
//!
//! Every time the state machine reads (lease expiry, delays, rates, pauses, deletion
//! schedules) comes from one [`Clock`] per store. The Redis backend hands a manual
//! clock's reading to each script (the scripts read the server's `TIME` otherwise), so
//! that a test can drive the Redis and the embedded store through the same steps at
//! the same instants and compare every answer (tests/store_differential.rs).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where a store reads the time. Cheap to clone; clones of a manual clock share it.
#[derive(Clone, Debug, Default)]
pub struct Clock(Option<Arc<AtomicU64>>);

impl Clock {
    /// The machine's wall clock (Redis: the server's `TIME`).
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock that stands at `start_ms` until [`Clock::advance`] or [`Clock::set`]
    /// moves it.
    pub fn manual(start_ms: u64) -> Clock {
        Clock(Some(Arc::new(AtomicU64::new(start_ms))))
    }

    /// Now, in ms since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match &self.0 {
            Some(t) => t.load(Ordering::SeqCst),
            None => wall_ms(),
        }
    }

    /// Moves a manual clock forward by `d` (no effect on the system clock).
    pub fn advance(&self, d: Duration) {
        if let Some(t) = &self.0 {
            t.fetch_add(super::millis(d), Ordering::SeqCst);
        }
    }

    /// Sets a manual clock (no effect on the system clock).
    pub fn set(&self, ms: u64) {
        if let Some(t) = &self.0 {
            t.store(ms, Ordering::SeqCst);
        }
    }

    /// The reading handed to a Redis script: empty for the system clock, so that the
    /// script asks the server (machines with skewed clocks then still agree).
    pub(crate) fn script_arg(&self) -> String {
        match &self.0 {
            Some(t) => t.load(Ordering::SeqCst).to_string(),
            None => String::new(),
        }
    }
}

/// The machine's wall clock in ms since the Unix epoch.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_is_shared_by_clones() {
        let c = Clock::manual(1_000);
        let d = c.clone();
        assert_eq!(c.now_ms(), 1_000);
        d.advance(Duration::from_millis(250));
        assert_eq!(c.now_ms(), 1_250);
        c.set(5);
        assert_eq!(d.now_ms(), 5);
        assert_eq!(c.script_arg(), "5");
        assert_eq!(Clock::system().script_arg(), "");
        assert!(Clock::system().now_ms() > 1_600_000_000_000);
    }
}
