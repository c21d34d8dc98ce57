//! Rate limits for one bot, on governor and the policy [`Clock`].
//!
//! Four gates, checked in this order for every reply; the first that says no drops the
//! reply (it is never queued) and names itself in [`RateLimited::which`]:
//!
//! 1. **server back-pressure** ([`LimitKind::Server`]): after
//!    [`RateLimits::on_server_throttle`] (a 429, a close frame asking to slow down) nothing
//!    is sent until the later of the server's `Retry-After` and an exponential backoff
//!    (`throttle_base_ms` × 2^(strikes − 1), capped at `throttle_max_ms`); strikes count
//!    throttles that arrive within `throttle_reset_secs` of the previous pause ending;
//! 2. **minimum interval per room** ([`LimitKind::RoomInterval`], default 2 s);
//! 3. **per room per minute** ([`LimitKind::Room`], default 6, bursts of 2);
//! 4. **per bot per minute** ([`LimitKind::Bot`], default 20, bursts of 5), across rooms.
//!
//! The per-minute numbers are hard ceilings over **any** 60-second window: governor's
//! GCRA with burst `b` and a replenish period of `60 s / (n − b + 1)` admits at most `n`
//! cells in any half-open 60 s window (a plain `Quota::per_minute(n)` would admit up to
//! `2n − 1`). Room gates come before the bot gate so a flooded room cannot use up the
//! bot's budget for quiet rooms; the price is that a reply refused by the bot gate has
//! used a room cell.
//!
//! ```
//! use std::time::Duration;
//! use roost::policy::clock::ManualClock;
//! use roost::policy::limits::{LimitKind, LimitsConfig, RateLimits};
//!
//! let time = ManualClock::new();
//! let mut limits = RateLimits::new(&LimitsConfig::default(), time.clock()).unwrap();
//! assert!(limits.check("lobby").is_ok());
//! assert_eq!(limits.check("lobby").unwrap_err().which, LimitKind::RoomInterval);
//! time.advance(Duration::from_secs(2));
//! assert!(limits.check("lobby").is_ok());
//! ```

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use serde::Deserialize;

use super::clock::Clock;

/// Rate-limit settings (`[policy.limits]` in roost.toml).
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most messages the bot sends in any 60 s, all rooms together. Default 20.
    pub bot_per_minute: u32,
    /// How many of those may go back to back. Default 5.
    pub bot_burst: u32,
    /// Most messages the bot sends to one room in any 60 s. Default 6.
    pub room_per_minute: u32,
    /// How many of those may go back to back. Default 2.
    pub room_burst: u32,
    /// Minimum time between two messages to one room, in ms. Default 2000.
    pub room_min_interval_ms: u64,
    /// First pause after a server throttle without `Retry-After`, in ms. Default 1000.
    pub throttle_base_ms: u64,
    /// Longest backoff pause, in ms (a longer server `Retry-After` is still honoured, up
    /// to one hour). Default 300000 (5 min).
    pub throttle_max_ms: u64,
    /// A throttle this long after the previous pause ended starts the backoff over, in s.
    /// Default 600.
    pub throttle_reset_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            bot_per_minute: 20,
            bot_burst: 5,
            room_per_minute: 6,
            room_burst: 2,
            room_min_interval_ms: 2000,
            throttle_base_ms: 1000,
            throttle_max_ms: 300_000,
            throttle_reset_secs: 600,
        }
    }
}

/// An invalid [`LimitsConfig`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitsConfigError {
    /// A per-minute limit of zero.
    #[error("policy.limits.{0} must be at least 1")]
    Zero(&'static str),
}

/// Which gate refused a send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// Per bot per minute.
    Bot,
    /// Per room per minute.
    Room,
    /// Minimum interval per room.
    RoomInterval,
    /// Server back-pressure.
    Server,
}

impl LimitKind {
    /// Short name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Bot => "bot-per-minute",
            LimitKind::Room => "room-per-minute",
            LimitKind::RoomInterval => "room-min-interval",
            LimitKind::Server => "server-throttle",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused send: which gate, and how long until it would open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimited {
    /// The gate that refused.
    pub which: LimitKind,
    /// Time until that gate lets one message through.
    pub retry_after: Duration,
}

type Direct = RateLimiter<NotKeyed, InMemoryState, Clock, NoOpMiddleware<Duration>>;
type Keyed = RateLimiter<String, HashMapStateStore<String>, Clock, NoOpMiddleware<Duration>>;

/// The rate limits of one bot.
pub struct RateLimits {
    clock: Clock,
    bot: Direct,
    rooms: Keyed,
    room_min_interval: Duration,
    last_sent: HashMap<String, Duration>,
    throttle_base: Duration,
    throttle_max: Duration,
    throttle_reset: Duration,
    paused_until: Option<Duration>,
    strikes: u32,
}

impl fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimits")
            .field("rooms", &self.last_sent.len())
            .field("paused_until", &self.paused_until)
            .field("strikes", &self.strikes)
            .finish_non_exhaustive()
    }
}

/// A quota admitting at most `per_minute` cells in any 60 s window, `burst` at once.
fn window_quota(per_minute: u32, burst: u32) -> Quota {
    let n = per_minute.max(1);
    let b = burst.clamp(1, n);
    let steady = u64::from(n - b + 1);
    // Round the period up so rounding can never admit an extra cell.
    let period_ns = 60_000_000_000u64.div_ceil(steady);
    Quota::with_period(Duration::from_nanos(period_ns))
        .expect("non-zero period")
        .allow_burst(NonZeroU32::new(b).expect("burst >= 1"))
}

impl RateLimits {
    /// Limits on `clock` (share the clock with the rest of the policy).
    pub fn new(config: &LimitsConfig, clock: Clock) -> Result<Self, LimitsConfigError> {
        if config.bot_per_minute == 0 {
            return Err(LimitsConfigError::Zero("bot_per_minute"));
        }
        if config.room_per_minute == 0 {
            return Err(LimitsConfigError::Zero("room_per_minute"));
        }
        Ok(RateLimits {
            bot: RateLimiter::direct_with_clock(
                window_quota(config.bot_per_minute, config.bot_burst),
                clock.clone(),
            ),
            rooms: RateLimiter::new(
                window_quota(config.room_per_minute, config.room_burst),
                HashMapStateStore::default(),
                clock.clone(),
            ),
            clock,
            room_min_interval: Duration::from_millis(config.room_min_interval_ms),
            last_sent: HashMap::new(),
            throttle_base: Duration::from_millis(config.throttle_base_ms.max(1)),
            throttle_max: Duration::from_millis(
                config.throttle_max_ms.max(config.throttle_base_ms).max(1),
            ),
            throttle_reset: Duration::from_secs(config.throttle_reset_secs),
            paused_until: None,
            strikes: 0,
        })
    }

    /// Checks every gate for one message to `room`; on success the message is counted
    /// as sent (call this only for a message that will be sent if allowed).
    pub fn check(&mut self, room: &str) -> Result<(), RateLimited> {
        let now = self.clock.now();
        if let Some(until) = self.paused_until.filter(|u| *u > now) {
            return Err(RateLimited {
                which: LimitKind::Server,
                retry_after: until - now,
            });
        }
        if let Some(last) = self.last_sent.get(room) {
            let since = now.saturating_sub(*last);
            if since < self.room_min_interval {
                return Err(RateLimited {
                    which: LimitKind::RoomInterval,
                    retry_after: self.room_min_interval - since,
                });
            }
        }
        let key = room.to_string();
        if let Err(not_until) = self.rooms.check_key(&key) {
            return Err(RateLimited {
                which: LimitKind::Room,
                retry_after: not_until.wait_time_from(now),
            });
        }
        if let Err(not_until) = self.bot.check() {
            return Err(RateLimited {
                which: LimitKind::Bot,
                retry_after: not_until.wait_time_from(now),
            });
        }
        self.last_sent.insert(key, now);
        if self.last_sent.len() > 1024 {
            self.forget_idle(now);
        }
        Ok(())
    }

    /// The server asked to slow down (HTTP 429, a close frame, …), optionally saying for
    /// how long. Every send is refused until the returned pause has passed; repeated
    /// throttles back off exponentially. Returns the pause.
    pub fn on_server_throttle(&mut self, retry_after: Option<Duration>) -> Duration {
        let now = self.clock.now();
        let recent = self
            .paused_until
            .is_some_and(|until| now.saturating_sub(until) < self.throttle_reset);
        self.strikes = if recent {
            self.strikes.saturating_add(1)
        } else {
            1
        };
        let exp = self.strikes.saturating_sub(1).min(20);
        let backoff = self
            .throttle_base
            .saturating_mul(1u32 << exp)
            .min(self.throttle_max);
        let pause = retry_after
            .unwrap_or_default()
            .min(Duration::from_secs(3600))
            .max(backoff);
        let until = now + pause;
        self.paused_until = Some(self.paused_until.map_or(until, |u| u.max(until)));
        tracing::warn!(
            pause_ms = pause.as_millis() as u64,
            strikes = self.strikes,
            "server throttle: pausing sends"
        );
        pause
    }

    /// Time left in a server-requested pause, if one is running.
    pub fn throttled_for(&self) -> Option<Duration> {
        let now = self.clock.now();
        self.paused_until.filter(|u| *u > now).map(|u| u - now)
    }

    fn forget_idle(&mut self, now: Duration) {
        let keep = Duration::from_secs(120).max(self.room_min_interval);
        self.last_sent.retain(|_, t| now.saturating_sub(*t) < keep);
        self.rooms.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::clock::ManualClock;

    fn limits(cfg: LimitsConfig) -> (ManualClock, RateLimits) {
        let t = ManualClock::new();
        let l = RateLimits::new(&cfg, t.clock()).unwrap();
        (t, l)
    }

    /// Max number of timestamps in any half-open window of `w`.
    fn max_in_window(ts: &[Duration], w: Duration) -> usize {
        let mut best = 0;
        let mut j = 0;
        for i in 0..ts.len() {
            while ts[i] - ts[j] >= w {
                j += 1;
            }
            best = best.max(i - j + 1);
        }
        best
    }

    #[test]
    fn per_room_ceiling_holds_any_window() {
        let (t, mut l) = limits(LimitsConfig::default());
        let mut sent = Vec::new();
        for _ in 0..2000 {
            if l.check("lobby").is_ok() {
                sent.push(t.now());
            }
            t.advance(Duration::from_millis(137));
        }
        assert!(!sent.is_empty());
        assert!(
            max_in_window(&sent, Duration::from_secs(60)) <= 6,
            "{}",
            max_in_window(&sent, Duration::from_secs(60))
        );
        for w in sent.windows(2) {
            assert!(w[1] - w[0] >= Duration::from_secs(2));
        }
    }

    #[test]
    fn per_bot_ceiling_holds_across_rooms() {
        let (t, mut l) = limits(LimitsConfig {
            room_min_interval_ms: 0,
            ..Default::default()
        });
        let mut sent = Vec::new();
        for i in 0..3000 {
            let room = format!("room{}", i % 50);
            if l.check(&room).is_ok() {
                sent.push(t.now());
            }
            t.advance(Duration::from_millis(50));
        }
        assert!(max_in_window(&sent, Duration::from_secs(60)) <= 20);
        assert!(sent.len() >= 40, "{}", sent.len());
    }

    #[test]
    fn denial_says_which_and_when() {
        let (t, mut l) = limits(LimitsConfig {
            room_min_interval_ms: 0,
            ..Default::default()
        });
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_ok());
        let e = l.check("a").unwrap_err();
        assert_eq!(e.which, LimitKind::Room);
        assert!(e.retry_after > Duration::ZERO && e.retry_after <= Duration::from_secs(12));
        t.advance(e.retry_after);
        assert!(l.check("a").is_ok());
    }

    #[test]
    fn server_throttle_backs_off() {
        let (t, mut l) = limits(LimitsConfig::default());
        assert_eq!(
            l.on_server_throttle(Some(Duration::from_millis(500))),
            Duration::from_secs(1)
        );
        assert_eq!(l.check("a").unwrap_err().which, LimitKind::Server);
        t.advance(Duration::from_secs(1));
        assert!(l.check("a").is_ok());
        assert_eq!(l.on_server_throttle(None), Duration::from_secs(2));
        t.advance(Duration::from_secs(2));
        assert_eq!(l.on_server_throttle(None), Duration::from_secs(4));
        assert_eq!(
            l.on_server_throttle(Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert!(l.throttled_for().unwrap() >= Duration::from_secs(29));
        // A long quiet period resets the backoff.
        t.advance(Duration::from_secs(30 + 601));
        assert_eq!(l.on_server_throttle(None), Duration::from_secs(1));
        // The cap.
        for _ in 0..30 {
            l.on_server_throttle(None);
        }
        assert_eq!(l.on_server_throttle(None), Duration::from_secs(300));
    }

    #[test]
    fn zero_limits_are_rejected() {
        let t = ManualClock::new();
        let e = RateLimits::new(
            &LimitsConfig {
                bot_per_minute: 0,
                ..Default::default()
            },
            t.clock(),
        )
        .unwrap_err();
        assert_eq!(e, LimitsConfigError::Zero("bot_per_minute"));
    }

    #[test]
    fn quota_math() {
        let q = window_quota(20, 5);
        assert_eq!(q.burst_size().get(), 5);
        assert_eq!(q.replenish_interval(), Duration::from_millis(3750));
        let q = window_quota(6, 10);
        assert_eq!(q.burst_size().get(), 6);
        assert_eq!(q.replenish_interval(), Duration::from_secs(60));
    }
}
