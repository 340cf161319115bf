//! The CM's notion of time: every retry, response timeout, MRA extension and time-wait is
//! measured on a [`Clock`]. Endpoints use the real monotonic clock ([`MonotonicClock`]); tests
//! use a [`ManualClock`] they advance themselves, so timer behaviour is checked without waiting
//! for it and holds on any machine however loaded.
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A source of the current time for CM timers.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> Instant;

    /// Whether the endpoint runs its own timer thread on this clock. A clock that only moves
    /// when told to (a manual clock) answers false: whoever advances it runs the timers
    /// ([`super::CmEndpoint::run_timers`]).
    fn drives_timers(&self) -> bool {
        true
    }
}

/// The real monotonic clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that stands still until [`ManualClock::advance`] moves it.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    elapsed: Mutex<Duration>,
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock {
            start: Instant::now(),
            elapsed: Mutex::new(Duration::ZERO),
        }
    }
}

impl ManualClock {
    /// A clock at an arbitrary start.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        *self.elapsed.lock() += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + *self.elapsed.lock()
    }

    fn drives_timers(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let c = ManualClock::new();
        let t = c.now();
        assert_eq!(c.now(), t);
        c.advance(Duration::from_secs(3));
        assert_eq!(c.now() - t, Duration::from_secs(3));
        assert!(!c.drives_timers() && MonotonicClock.drives_timers());
    }
}
