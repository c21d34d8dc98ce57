//! Full-jitter exponential backoff (AWS architecture blog, "Exponential Backoff And
//! Jitter"): the delay before retry `attempt` (0-based) is uniform in
//! `[0, min(cap, base * 2^attempt)]`. Pure: the caller owns the attempt count and the RNG.
//!
//! ```
//! use rand::SeedableRng;
//! use roost::session::Backoff;
//! use std::time::Duration;
//!
//! let backoff = Backoff::default(); // base 250 ms, cap 30 s, unlimited attempts
//! let mut rng = rand::rngs::StdRng::seed_from_u64(7);
//! let d = backoff.delay(3, &mut rng).unwrap();
//! assert!(d <= Duration::from_millis(2_000));
//! ```

use std::time::Duration;

use rand::Rng;

/// Backoff parameters. `Default`: base 250 ms, cap 30 s, unlimited attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the first retry's delay.
    pub base: Duration,
    /// The largest delay ever returned.
    pub cap: Duration,
    /// `None`: retry forever. `Some(n)`: [`Backoff::delay`] returns `None` from attempt `n` on.
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(30),
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// The upper bound of the delay for `attempt` (0-based): `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// The delay before retry `attempt` (0-based), or `None` when attempts are exhausted.
    pub fn delay<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Option<Duration> {
        if self.max_attempts.is_some_and(|max| attempt >= max) {
            return None;
        }
        let ceiling = self.ceiling(attempt);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Some(Duration::ZERO);
        }
        Some(Duration::from_nanos(rng.random_range(0..=nanos)))
    }

    /// Like [`Backoff::delay`], with the ceiling lowered to `limit` where that is smaller
    /// (but never below `base`): uniform in `[0, min(ceiling(attempt), max(base, limit))]`.
    pub fn delay_within<R: Rng + ?Sized>(
        &self,
        attempt: u32,
        limit: Duration,
        rng: &mut R,
    ) -> Option<Duration> {
        let lowered = Backoff {
            cap: self.ceiling(attempt).min(limit.max(self.base)),
            ..*self
        };
        lowered.delay(attempt, rng)
    }

    /// Like [`Backoff::delay`] but never shorter than `floor` (used after rate limiting) and
    /// never longer than `max(cap, floor)`. Unlimited: ignores `max_attempts`.
    pub fn delay_at_least<R: Rng + ?Sized>(
        &self,
        attempt: u32,
        floor: Duration,
        rng: &mut R,
    ) -> Duration {
        let unlimited = Backoff {
            max_attempts: None,
            ..*self
        };
        unlimited.delay(attempt, rng).unwrap_or(self.cap).max(floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(0), Duration::from_millis(250));
        assert_eq!(b.ceiling(1), Duration::from_millis(500));
        assert_eq!(b.ceiling(4), Duration::from_millis(4_000));
        assert_eq!(b.ceiling(7), Duration::from_secs(30)); // 32 s capped
        assert_eq!(b.ceiling(1_000), Duration::from_secs(30));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn delays_are_within_bounds_and_jittered() {
        let b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(42);
        for attempt in 0..64 {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..50 {
                let d = b.delay(attempt, &mut rng).unwrap();
                assert!(d <= b.ceiling(attempt), "attempt {attempt}: {d:?}");
                seen.insert(d);
            }
            assert!(seen.len() > 40, "not jittered at attempt {attempt}");
        }
    }

    #[test]
    fn seeded_rng_is_reproducible() {
        let b = Backoff::default();
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..10)
                .map(|a| b.delay(a, &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn full_jitter_mean_is_about_half_the_ceiling() {
        let b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(9);
        let n = 4_000u32;
        let total: Duration = (0..n).map(|_| b.delay(10, &mut rng).unwrap()).sum();
        let mean = total / n;
        assert!(
            mean > Duration::from_millis(13_500) && mean < Duration::from_millis(16_500),
            "{mean:?}"
        );
    }

    #[test]
    fn bounded_attempts_end() {
        let b = Backoff {
            max_attempts: Some(3),
            ..Backoff::default()
        };
        let mut rng = StdRng::seed_from_u64(0);
        assert!(b.delay(2, &mut rng).is_some());
        assert!(b.delay(3, &mut rng).is_none());
        assert!(b.delay_at_least(5, Duration::ZERO, &mut rng) <= b.cap);
    }

    #[test]
    fn floor_is_respected() {
        let b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(3);
        for a in 0..20 {
            let d = b.delay_at_least(a, Duration::from_secs(5), &mut rng);
            assert!(d >= Duration::from_secs(5) && d <= Duration::from_secs(30));
        }
    }

    #[test]
    fn a_limit_lowers_the_ceiling_but_not_below_the_base() {
        let b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..200 {
            // Attempt 6 alone would allow 16 s.
            let d = b.delay_within(6, Duration::from_secs(1), &mut rng).unwrap();
            assert!(d <= Duration::from_secs(1), "{d:?}");
            let d = b.delay_within(6, Duration::ZERO, &mut rng).unwrap();
            assert!(d <= b.base, "{d:?}");
            // A limit above the attempt's ceiling changes nothing.
            let d = b
                .delay_within(1, Duration::from_secs(60), &mut rng)
                .unwrap();
            assert!(d <= b.ceiling(1), "{d:?}");
        }
        let bounded = Backoff {
            max_attempts: Some(2),
            ..b
        };
        assert!(
            bounded
                .delay_within(2, Duration::from_secs(1), &mut rng)
                .is_none()
        );
    }

    #[test]
    fn zero_base_is_zero_delay() {
        let b = Backoff {
            base: Duration::ZERO,
            ..Backoff::default()
        };
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(b.delay(5, &mut rng), Some(Duration::ZERO));
    }
}
