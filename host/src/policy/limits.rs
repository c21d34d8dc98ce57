//! Rate limits for one bot, on the policy [`Clock`].
//!
//! Four gates for every message; [`RateLimits::check`] lets one through now or names the
//! gate that holds it back longest in [`RateLimited::which`], and
//! [`RateLimits::reserve`] books the earliest slot all four allow (pacing: a reply waits
//! for its slot instead of being dropped, unless the wait passes a bound):
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
//! The per-minute numbers are hard ceilings over **any** 60-second window: a GCRA with
//! burst `b` and a period of `60 s / (n − b + 1)` admits at most `n` cells in any
//! half-open 60 s window (a plain per-minute rate would admit up to `2n − 1`). All gates
//! are consulted before any is charged, so a refused message uses no cell.
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
use std::time::Duration;

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
    /// Default 60: throttled again within a minute of resuming, the bot is still too
    /// fast and pauses twice as long; a throttle after a minute of sending is a new
    /// incident (with a longer memory, a few unrelated 429s over half an hour add up
    /// to minutes of silence, and paced replies are dropped as stale).
    pub throttle_reset_secs: u64,
    /// A reply the limits hold back waits for its slot (paced) unless the wait would be
    /// longer than this, in s; then it is dropped as stale. Default 120.
    pub max_wait_secs: u64,
    /// Most replies waiting for their slot in one room; more are dropped as stale.
    /// Default 20.
    pub max_queued_per_room: u32,
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
            throttle_reset_secs: 60,
            max_wait_secs: 120,
            max_queued_per_room: 20,
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

/// One GCRA gate (the generic cell rate algorithm, as in governor): cells are spaced
/// `interval` apart on average, `tolerance` lets `burst` of them go back to back.
/// Written here rather than taken from the governor crate because pacing needs
/// *reservations*:
/// the earliest time a future cell conforms, committed ahead of time.
#[derive(Clone, Copy, Debug)]
struct Gcra {
    interval: Duration,
    tolerance: Duration,
}

impl Gcra {
    /// At most `per_minute` cells in any 60 s window, `burst` at once: a period of
    /// `60 s / (n − b + 1)` with burst `b` admits at most `n` cells in any half-open
    /// 60 s window (a plain per-minute rate would admit up to `2n − 1`).
    fn window(per_minute: u32, burst: u32) -> Gcra {
        let n = per_minute.max(1);
        let b = burst.clamp(1, n);
        let steady = u64::from(n - b + 1);
        // Round the period up so rounding can never admit an extra cell.
        let interval = Duration::from_nanos(60_000_000_000u64.div_ceil(steady));
        Gcra {
            interval,
            tolerance: interval * (b - 1),
        }
    }

    /// The earliest time at or after `now` a cell conforms, given the theoretical
    /// arrival time `tat`.
    fn earliest(&self, tat: Duration, now: Duration) -> Duration {
        now.max(tat.saturating_sub(self.tolerance))
    }

    /// The new theoretical arrival time after a cell at `at`.
    fn commit(&self, tat: Duration, at: Duration) -> Duration {
        tat.max(at) + self.interval
    }
}

#[derive(Clone, Debug, Default)]
struct RoomGate {
    tat: Duration,
    last_sent: Option<Duration>,
    /// Slots reserved ahead of now, oldest first (pruned as time passes).
    ahead: std::collections::VecDeque<Duration>,
}

/// The rate limits of one bot.
pub struct RateLimits {
    clock: Clock,
    bot_gate: Gcra,
    bot_tat: Duration,
    room_gate: Gcra,
    rooms: HashMap<String, RoomGate>,
    room_min_interval: Duration,
    throttle_base: Duration,
    throttle_max: Duration,
    throttle_reset: Duration,
    paused_until: Option<Duration>,
    strikes: u32,
    max_wait: Duration,
    max_queued_per_room: usize,
}

impl fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimits")
            .field("rooms", &self.rooms.len())
            .field("paused_until", &self.paused_until)
            .field("strikes", &self.strikes)
            .finish_non_exhaustive()
    }
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
            clock,
            bot_gate: Gcra::window(config.bot_per_minute, config.bot_burst),
            bot_tat: Duration::ZERO,
            room_gate: Gcra::window(config.room_per_minute, config.room_burst),
            rooms: HashMap::new(),
            room_min_interval: Duration::from_millis(config.room_min_interval_ms),
            throttle_base: Duration::from_millis(config.throttle_base_ms.max(1)),
            throttle_max: Duration::from_millis(
                config.throttle_max_ms.max(config.throttle_base_ms).max(1),
            ),
            throttle_reset: Duration::from_secs(config.throttle_reset_secs),
            paused_until: None,
            strikes: 0,
            max_wait: Duration::from_secs(config.max_wait_secs),
            max_queued_per_room: config.max_queued_per_room as usize,
        })
    }

    /// The longest a paced reply may wait for its slot.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// The earliest time (on the policy clock) a message to `room` may go, and the
    /// gate that holds it back longest (`None`: it may go now). Changes nothing.
    pub fn earliest(&self, room: &str) -> (Duration, Option<LimitKind>) {
        self.earliest_at(room, self.clock.now())
    }

    fn earliest_at(&self, room: &str, now: Duration) -> (Duration, Option<LimitKind>) {
        let (tat, last_sent) = self
            .rooms
            .get(room)
            .map_or((Duration::ZERO, None), |g| (g.tat, g.last_sent));
        let mut at = now;
        let mut which = None;
        let mut later = |t: Duration, kind: LimitKind| {
            if t > at {
                at = t;
                which = Some(kind);
            }
        };
        if let Some(until) = self.paused_until {
            later(until, LimitKind::Server);
        }
        if let Some(last) = last_sent {
            later(last + self.room_min_interval, LimitKind::RoomInterval);
        }
        later(self.room_gate.earliest(tat, now), LimitKind::Room);
        later(self.bot_gate.earliest(self.bot_tat, now), LimitKind::Bot);
        (at, which)
    }

    /// Counts a message to `room` as sent at `at` (now, or a reserved time ahead).
    fn commit(&mut self, room: &str, at: Duration) {
        let now = self.clock.now();
        if self.rooms.len() > 1024 && !self.rooms.contains_key(room) {
            self.forget_idle(now);
        }
        let gate = self.rooms.entry(room.to_string()).or_default();
        gate.tat = self.room_gate.commit(gate.tat, at);
        gate.last_sent = Some(gate.last_sent.map_or(at, |l| l.max(at)));
        while gate.ahead.front().is_some_and(|t| *t <= now) {
            gate.ahead.pop_front();
        }
        if at > now {
            gate.ahead.push_back(at);
        }
        self.bot_tat = self.bot_gate.commit(self.bot_tat, at);
    }

    /// Replies waiting for a reserved slot in `room`.
    pub fn queued(&self, room: &str) -> usize {
        let now = self.clock.now();
        self.rooms
            .get(room)
            .map_or(0, |g| g.ahead.iter().filter(|t| **t > now).count())
    }

    /// Pacing: reserves the earliest slot for a reply to `room` if it is at most
    /// `max_wait_secs` away and fewer than `max_queued_per_room` replies wait in the
    /// room; returns the wait (zero: at once). Otherwise nothing is reserved and the
    /// reply is to be dropped as stale.
    pub fn pace(&mut self, room: &str) -> Result<Duration, RateLimited> {
        if self.queued(room) >= self.max_queued_per_room {
            let now = self.clock.now();
            let (at, which) = self.earliest_at(room, now);
            return Err(RateLimited {
                which: which.unwrap_or(LimitKind::Room),
                retry_after: at.saturating_sub(now),
            });
        }
        self.reserve(room, self.max_wait)
    }

    /// Checks every gate for one message to `room` now; on success the message is
    /// counted as sent (call this only for a message that will be sent if allowed).
    pub fn check(&mut self, room: &str) -> Result<(), RateLimited> {
        self.reserve(room, Duration::ZERO).map(drop)
    }

    /// Reserves the earliest slot for one message to `room` and returns how long from
    /// now it is (zero: at once), unless that is more than `max_wait` away: then
    /// nothing is reserved and the gate that holds it back longest is named. Slots are
    /// handed out in call order, so replies reserved one after another go in order,
    /// and every ceiling holds over the reserved times exactly.
    pub fn reserve(&mut self, room: &str, max_wait: Duration) -> Result<Duration, RateLimited> {
        // One reading of the clock for the whole decision.
        let now = self.clock.now();
        let (at, which) = self.earliest_at(room, now);
        let wait = at.saturating_sub(now);
        if wait > max_wait {
            return Err(RateLimited {
                which: which.unwrap_or(LimitKind::Bot),
                retry_after: wait,
            });
        }
        self.commit(room, at);
        Ok(wait)
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
        // A gate whose cells have all drained and whose last message is long past
        // says nothing a fresh one wouldn't.
        self.rooms.retain(|_, g| {
            g.tat > now || g.last_sent.is_some_and(|t| now.saturating_sub(t) < keep)
        });
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
    fn unrelated_throttles_minutes_apart_do_not_add_up() {
        let (t, mut l) = limits(LimitsConfig::default());
        // One 429 every 90 s for half an hour: each is a first strike.
        for _ in 0..20 {
            assert_eq!(l.on_server_throttle(None), Duration::from_secs(1));
            t.advance(Duration::from_secs(90));
            assert!(l.check("a").is_ok());
        }
        // Throttled again within the minute after resuming: the backoff doubles.
        l.on_server_throttle(None);
        t.advance(Duration::from_secs(1 + 59));
        assert_eq!(l.on_server_throttle(None), Duration::from_secs(2));
        t.advance(Duration::from_secs(2 + 30));
        assert_eq!(l.on_server_throttle(None), Duration::from_secs(4));
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
        let q = Gcra::window(20, 5);
        assert_eq!(q.interval, Duration::from_millis(3750));
        assert_eq!(q.tolerance, Duration::from_millis(3750 * 4)); // burst of 5
        let q = Gcra::window(6, 10);
        assert_eq!(q.interval, Duration::from_secs(60));
        assert_eq!(q.tolerance, Duration::from_secs(60 * 5)); // burst of 6
    }

    #[test]
    fn reservations_pace_replies_in_order_within_every_ceiling() {
        let (t, mut l) = limits(LimitsConfig::default());
        let max_wait = Duration::from_secs(120);
        // 20 replies asked for at once: each gets the next slot, none is refused until
        // the wait would pass two minutes.
        let mut at = Vec::new();
        let mut refused = None;
        for i in 0..20 {
            match l.reserve("lobby", max_wait) {
                Ok(wait) => at.push(t.now() + wait),
                Err(e) => {
                    refused = Some((i, e));
                    break;
                }
            }
        }
        let (i, e) = refused.expect("a two-minute bound refuses some of 20");
        assert!(i >= 12, "only {i} paced");
        assert!(e.retry_after > max_wait);
        assert!(at.windows(2).all(|w| w[1] - w[0] >= Duration::from_secs(2)));
        assert!(max_in_window(&at, Duration::from_secs(60)) <= 6);
        assert_eq!(at[0], t.now(), "the first goes at once");
        // Nothing was reserved for the refused one: the next check sees the same wait.
        let (next, _) = l.earliest("lobby");
        assert!(next > *at.last().unwrap());
        assert_eq!(next - t.now(), e.retry_after);
    }

    #[test]
    fn earliest_names_the_gate_holding_longest() {
        let (_t, mut l) = limits(LimitsConfig::default());
        assert_eq!(l.earliest("a").1, None);
        l.check("a").unwrap();
        assert_eq!(l.earliest("a").1, Some(LimitKind::RoomInterval));
        l.on_server_throttle(Some(Duration::from_secs(30)));
        assert_eq!(l.earliest("a").1, Some(LimitKind::Server));
    }
}
