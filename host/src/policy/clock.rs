//! Injectable time for the policy layer (rate limits, server back-pressure, loop guard).
//!
//! A [`Clock`] reads "now" as the [`Duration`] since its origin. Two sources:
//!
//! - [`Clock::real`]: `tokio::time::Instant`, so it follows tokio's paused test clock
//!   (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`) when tokio's
//!   `test-util` feature is on, and the monotonic system clock otherwise;
//! - [`ManualClock`]: time moves only when told, for `roost replay` (advance to each
//!   log line's timestamp) and deterministic tests.
//!
//! ```
//! use std::time::Duration;
//! use roost::policy::clock::ManualClock;
//!
//! let manual = ManualClock::new();
//! let clock = manual.clock();
//! manual.advance(Duration::from_secs(3));
//! assert_eq!(clock.now(), Duration::from_secs(3));
//! manual.advance_to(Duration::from_secs(1)); // never goes backwards
//! assert_eq!(clock.now(), Duration::from_secs(3));
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A shared, cloneable time source. Clones read the same time.
#[derive(Clone, Debug)]
pub struct Clock(Source);

#[derive(Clone, Debug)]
enum Source {
    Real { origin: tokio::time::Instant },
    Manual(Arc<AtomicU64>),
}

impl Clock {
    /// Wall time via `tokio::time::Instant` (honours tokio's paused clock), origin = now.
    pub fn real() -> Self {
        Clock(Source::Real {
            origin: tokio::time::Instant::now(),
        })
    }

    /// Time since this clock's origin.
    pub fn now(&self) -> Duration {
        match &self.0 {
            Source::Real { origin } => {
                tokio::time::Instant::now().saturating_duration_since(*origin)
            }
            Source::Manual(nanos) => Duration::from_nanos(nanos.load(Ordering::Acquire)),
        }
    }

    /// Whether this clock is driven by a [`ManualClock`].
    pub fn is_manual(&self) -> bool {
        matches!(self.0, Source::Manual(_))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::real()
    }
}

/// The handle that moves a manual [`Clock`]. Starts at zero.
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A manual clock at time zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// A [`Clock`] reading this manual time (all such clocks share it).
    pub fn clock(&self) -> Clock {
        Clock(Source::Manual(self.nanos.clone()))
    }

    /// The current manual time.
    pub fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Acquire))
    }

    /// Moves time forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .nanos
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_add(by))
            });
    }

    /// Moves time to `t` if that is later than now; earlier times are ignored (log
    /// timestamps can be out of order, time never runs backwards).
    pub fn advance_to(&self, t: Duration) {
        let t = u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_max(t, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_is_shared_and_monotonic() {
        let m = ManualClock::new();
        let a = m.clock();
        let b = a.clone();
        assert!(a.is_manual());
        m.advance(Duration::from_millis(1500));
        assert_eq!(b.now(), Duration::from_millis(1500));
        m.advance_to(Duration::from_secs(1));
        assert_eq!(a.now(), Duration::from_millis(1500));
        m.advance_to(Duration::from_secs(10));
        assert_eq!(a.now(), Duration::from_secs(10));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn real_clock_moves_forward() {
        let c = Clock::real();
        let t0 = c.now();
        assert!(c.now() >= t0);
        assert!(!c.is_manual());
    }
}
