//! The connection state machine, as pure data and pure functions.
//!
//! ```text
//!            ┌──────────────────────────── shutdown / fatal config error ───────────────┐
//!            ▼                                                                          │
//!  Stopped ◀─┴─ Connecting ──socket open, joins sent──▶ Joined ──missed messages──▶ Active
//!                 ▲   │                                  │        recovered          │
//!                 │   └──────── error / timeout ─────────┴──── close / dead peer ─────┤
//!                 │                                                                   ▼
//!                 └──────────────── backoff elapsed ─────────────────── Disconnected { attempt }
//! ```
//!
//! The supervisor (`supervisor.rs`) does the I/O; what to do after a connection ends is
//! decided here: [`on_close`] maps a WebSocket close code to a [`Next`] step,
//! [`Disconnect::next`] does the same for every other way a connection can end, and
//! [`plan_retry`] turns that into the next attempt number and delay.

use std::fmt;
use std::time::Duration;

use rand::Rng;

use super::backoff::Backoff;

/// Where a session is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SessionState {
    /// Obtaining an identity (stored or registered) and opening the socket.
    Connecting,
    /// The socket is open and the rooms are joined; missed messages are being recovered.
    Joined,
    /// Live: messages flow both ways, the outbox drains.
    Active,
    /// Waiting out a backoff before connection attempt `attempt` (1-based, since the last
    /// healthy connection).
    Disconnected { attempt: u32 },
    /// Ended by shutdown or an unrecoverable configuration error. Final.
    Stopped,
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionState::Connecting => f.write_str("connecting"),
            SessionState::Joined => f.write_str("joined"),
            SessionState::Active => f.write_str("active"),
            SessionState::Disconnected { attempt } => write!(f, "disconnected (attempt {attempt})"),
            SessionState::Stopped => f.write_str("stopped"),
        }
    }
}

/// What to do after a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Next {
    /// Reconnect after the ordinary backoff.
    Reconnect,
    /// The server rejected our credentials, as an authenticated REST call answering 401
    /// confirms: register again (the old key is kept until the new one is stored).
    Reregister,
    /// The key may have been rejected (a 401 on the upgrade, an invalid-key close): one
    /// authenticated request decides, and only its 401 leads to [`Next::Reregister`].
    VerifyKey,
    /// Rate limited or told to come back later: reconnect after a longer backoff.
    SlowDown,
}

/// Maps the close code a server sent (None: no close frame, the connection just died).
///
/// - 4001 and 4401 (unauthorized-ish application codes): the key may be invalid,
///   [`Next::VerifyKey`].
/// - 1013 (try again later) and 4008/4029/4429 (rate-limit-ish): [`Next::SlowDown`].
/// - Everything else, including 1008 policy violation, 4003/4403 forbidden, 1000 normal,
///   1001 going away, 1006, 1011, 1012 restart, protocol and size errors:
///   [`Next::Reconnect`] (errors with backoff; an identity is never given up for them).
pub fn on_close(code: Option<u16>) -> Next {
    match code {
        Some(4001 | 4401) => Next::VerifyKey,
        Some(1013 | 4008 | 4029 | 4429) => Next::SlowDown,
        _ => Next::Reconnect,
    }
}

/// How a connection (or an attempt at one) ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disconnect {
    /// The server sent a close frame (code, if any).
    Closed(Option<u16>),
    /// The stream ended or failed without a close frame.
    Io(String),
    /// No frame of any kind for the dead-peer window.
    DeadPeer,
    /// The WebSocket handshake did not finish within the connect timeout.
    ConnectTimeout,
    /// The WebSocket upgrade was answered with this HTTP status.
    HandshakeStatus(u16),
    /// A REST call answered 401: the key is gone.
    Unauthorized,
    /// A REST call answered 429, or registration keeps colliding (what happened).
    RateLimited(String),
    /// Registration or recovery failed for a transient reason.
    Transient(String),
}

impl Disconnect {
    /// The step after this ending.
    pub fn next(&self) -> Next {
        match self {
            Disconnect::Closed(code) => on_close(*code),
            Disconnect::Unauthorized => Next::Reregister,
            Disconnect::HandshakeStatus(401) => Next::VerifyKey,
            Disconnect::HandshakeStatus(429) | Disconnect::RateLimited(_) => Next::SlowDown,
            Disconnect::Io(_)
            | Disconnect::DeadPeer
            | Disconnect::ConnectTimeout
            | Disconnect::HandshakeStatus(_)
            | Disconnect::Transient(_) => Next::Reconnect,
        }
    }
}

impl fmt::Display for Disconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disconnect::Closed(Some(code)) => write!(f, "closed by server (code {code})"),
            Disconnect::Closed(None) => f.write_str("closed by server"),
            Disconnect::Io(e) => write!(f, "connection lost: {e}"),
            Disconnect::DeadPeer => f.write_str("no sign of life from the server; declared dead"),
            Disconnect::ConnectTimeout => f.write_str("connect timed out"),
            Disconnect::HandshakeStatus(s) => write!(f, "websocket upgrade refused (HTTP {s})"),
            Disconnect::Unauthorized => f.write_str("API key rejected (401)"),
            Disconnect::RateLimited(e) => write!(f, "slowing down: {e}"),
            Disconnect::Transient(e) => f.write_str(e),
        }
    }
}

/// Inputs to [`plan_retry`] that come from configuration.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub backoff: Backoff,
    /// The least delay after a [`Next::SlowDown`] that repeats one within
    /// [`SLOW_DOWN_MEMORY`], or that ends an attempt which never became active.
    pub rate_limit_backoff: Duration,
}

/// A slow-down signal this soon after the previous one keeps the `rate_limit_backoff`
/// floor; one after a quiet minute (on a connection that became active) is treated as
/// any single fault and retried within the base jitter.
pub const SLOW_DOWN_MEMORY: Duration = Duration::from_secs(60);

/// The decision after a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// The attempt number for [`SessionState::Disconnected`] (1-based).
    pub attempt: u32,
    /// How long to wait before the next attempt.
    pub delay: Duration,
    /// Whether to register again (the key was confirmed rejected).
    pub reregister: bool,
    /// Whether to check the key with one authenticated request before reconnecting.
    pub verify_key: bool,
}

/// A retry's delay is at most this share of the time the bot has been away: the
/// escalation follows the outage, so however many attempts a few seconds of refused
/// upgrades or a restarting server cost, the first retry after the server is back comes
/// within 1/8 of the time it was gone (8 s away: within 1 s, 0.3 s at the median), and
/// a server away for minutes still sees the full exponential backoff (30 s at 4 min).
pub const OUTAGE_SHARE: u32 = 8;

/// What the next attempt is planned from: how the last attempt ended, and what came
/// before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ended {
    /// Consecutive attempts that never became active.
    pub attempt: u32,
    /// How long the connection that just ended was active (None: it never became
    /// active); any `Some` resets the escalation.
    pub up_for: Option<Duration>,
    /// How long the bot has been without an active connection (since the last one
    /// ended, or since the session started trying); the delay's ceiling is the
    /// backoff's for `attempt`, lowered to `away_for / OUTAGE_SHARE` (never below the
    /// base).
    pub away_for: Duration,
    /// What the way it ended calls for.
    pub next: Next,
    /// Whether we already re-registered since the last healthy connection. The first
    /// re-registration is immediate; a key rejected again right after a fresh
    /// registration backs off before registering again, so a broken server cannot make
    /// us register in a tight loop.
    pub reregistered: bool,
    /// Whether another slow-down signal came within [`SLOW_DOWN_MEMORY`]. A single
    /// slow-down close (1013, 4008, 4029) of a connection that was active is one fault
    /// like any other: the first retry comes within the base jitter. The
    /// `rate_limit_backoff` floor holds for a repeated one, and for a refusal before the
    /// connection became active (a 429 upgrade), so a server that keeps asking us to
    /// slow down gets its pause.
    pub slowed_recently: bool,
}

/// Decides the next attempt (see [`Ended`] for what each fact changes).
pub fn plan_retry<R: Rng + ?Sized>(policy: &RetryPolicy, ended: &Ended, rng: &mut R) -> Retry {
    let Ended {
        attempt,
        up_for,
        away_for,
        next,
        reregistered,
        slowed_recently,
    } = *ended;
    // A connection that became active ends the escalation: after any single fault the
    // first retry comes within the base jitter, however many faults came before.
    // Escalation is for consecutive attempts that never became active.
    let attempt = if up_for.is_some() { 0 } else { attempt };
    let away = if up_for.is_some() {
        Duration::ZERO
    } else {
        away_for
    };
    let delay = match next {
        Next::Reregister if !reregistered => Duration::ZERO,
        Next::SlowDown if up_for.is_some() && !slowed_recently => policy
            .backoff
            .delay_within(0, Duration::ZERO, rng)
            .unwrap_or(policy.backoff.base),
        Next::SlowDown => policy
            .backoff
            .delay_at_least(attempt, policy.rate_limit_backoff, rng),
        Next::Reconnect | Next::Reregister | Next::VerifyKey => policy
            .backoff
            .delay_within(attempt, away / OUTAGE_SHARE, rng)
            .unwrap_or(policy.backoff.cap),
    };
    Retry {
        attempt: attempt.saturating_add(1),
        delay,
        reregister: next == Next::Reregister,
        verify_key: next == Next::VerifyKey,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// Away long enough that the outage share lowers no ceiling.
    const LONG: Duration = Duration::from_secs(3600);

    /// An attempt ended for a bot away [`LONG`], not re-registered, with no slow-down
    /// signal in the last minute.
    fn ended(attempt: u32, up_for: Option<Duration>, next: Next) -> Ended {
        Ended {
            attempt,
            up_for,
            away_for: LONG,
            next,
            reregistered: false,
            slowed_recently: false,
        }
    }

    /// [`plan_retry`] after [`ended`].
    fn retry(
        p: &RetryPolicy,
        attempt: u32,
        up_for: Option<Duration>,
        next: Next,
        rng: &mut StdRng,
    ) -> Retry {
        plan_retry(p, &ended(attempt, up_for, next), rng)
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            backoff: Backoff::default(),
            rate_limit_backoff: Duration::from_secs(5),
        }
    }

    #[test]
    fn close_codes() {
        assert_eq!(on_close(None), Next::Reconnect);
        for code in [
            1000, 1001, 1002, 1003, 1006, 1007, 1009, 1011, 1012, 4000, 4999,
        ] {
            assert_eq!(on_close(Some(code)), Next::Reconnect, "{code}");
        }
        // Only an invalid-key close questions the key, and only a check confirms it.
        for code in [4001, 4401] {
            assert_eq!(on_close(Some(code)), Next::VerifyKey, "{code}");
        }
        // Policy violations and forbidden are errors with backoff, never a new identity.
        for code in [1008, 4003, 4004, 4403] {
            assert_eq!(on_close(Some(code)), Next::Reconnect, "{code}");
        }
        for code in [1013, 4008, 4029, 4429] {
            assert_eq!(on_close(Some(code)), Next::SlowDown, "{code}");
        }
    }

    #[test]
    fn disconnect_kinds() {
        assert_eq!(Disconnect::DeadPeer.next(), Next::Reconnect);
        assert_eq!(Disconnect::ConnectTimeout.next(), Next::Reconnect);
        assert_eq!(Disconnect::HandshakeStatus(401).next(), Next::VerifyKey);
        assert_eq!(Disconnect::HandshakeStatus(403).next(), Next::Reconnect);
        assert_eq!(Disconnect::HandshakeStatus(429).next(), Next::SlowDown);
        assert_eq!(Disconnect::HandshakeStatus(503).next(), Next::Reconnect);
        assert_eq!(Disconnect::HandshakeStatus(502).next(), Next::Reconnect);
        assert_eq!(Disconnect::Unauthorized.next(), Next::Reregister);
        assert_eq!(Disconnect::Closed(Some(4029)).next(), Next::SlowDown);
        assert_eq!(Disconnect::Io("reset".into()).next(), Next::Reconnect);
    }

    #[test]
    fn attempts_grow_and_reset_after_a_healthy_connection() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        let mut attempt = 0;
        for expected in 1..=5 {
            let r = retry(&p, attempt, None, Next::Reconnect, &mut rng);
            assert_eq!(r.attempt, expected);
            assert!(r.delay <= p.backoff.ceiling(attempt));
            attempt = r.attempt;
        }
        // A connection that became active, however briefly, ends the escalation: the
        // next retry is the first again (full jitter within the base, 0-250 ms).
        for up in [
            Duration::ZERO,
            Duration::from_secs(3),
            Duration::from_secs(30),
        ] {
            let r = retry(&p, attempt, Some(up), Next::Reconnect, &mut rng);
            assert_eq!(r.attempt, 1, "after {up:?} up");
            assert!(r.delay <= Duration::from_millis(250), "{r:?}");
        }
        // Failures that never became active keep escalating.
        let r = retry(&p, attempt, None, Next::Reconnect, &mut rng);
        assert_eq!(r.attempt, 6);
    }

    #[test]
    fn a_retry_waits_at_most_an_eighth_of_the_time_away() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(4);
        // Ten failed attempts would allow 30 s; eight seconds away allow 1 s.
        for _ in 0..200 {
            let eight_s_away = Ended {
                away_for: Duration::from_secs(8),
                ..ended(10, None, Next::Reconnect)
            };
            let r = plan_retry(&p, &eight_s_away, &mut rng);
            assert_eq!(r.attempt, 11, "the attempts still count");
            assert!(r.delay <= Duration::from_secs(1), "{r:?}");
        }
        // Never below the base, and never above the attempt's own ceiling.
        let mut longest = Duration::ZERO;
        for _ in 0..200 {
            let just_gone = Ended {
                away_for: Duration::ZERO,
                ..ended(10, None, Next::Reconnect)
            };
            let r = plan_retry(&p, &just_gone, &mut rng);
            longest = longest.max(r.delay);
            let r = retry(&p, 1, None, Next::VerifyKey, &mut rng);
            assert!(r.delay <= p.backoff.ceiling(1), "{r:?}");
        }
        assert!(longest <= p.backoff.base && longest > p.backoff.base / 2);
        // Minutes away: the full backoff again.
        let mut longest = Duration::ZERO;
        for _ in 0..200 {
            let minutes_away = Ended {
                away_for: Duration::from_secs(240),
                ..ended(10, None, Next::Reconnect)
            };
            let r = plan_retry(&p, &minutes_away, &mut rng);
            longest = longest.max(r.delay);
        }
        assert!(longest > Duration::from_secs(20), "{longest:?}");
        // A connection that became active is a fresh start whatever `away_for` says.
        let r = retry(&p, 10, Some(Duration::ZERO), Next::Reconnect, &mut rng);
        assert!(r.delay <= p.backoff.base, "{r:?}");
    }

    #[test]
    fn slow_down_waits_at_least_the_floor() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(2);
        for a in 0..10 {
            let r = retry(&p, a, None, Next::SlowDown, &mut rng);
            assert!(r.delay >= Duration::from_secs(5), "{r:?}");
            assert!(!r.reregister);
        }
    }

    #[test]
    fn a_single_slow_down_close_is_one_fault_a_repeated_one_keeps_the_floor() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(5);
        let up = Some(Duration::from_secs(1));
        for attempt in [0, 3, 9] {
            // A connection that was active, closed with "try again later" once.
            let r = retry(&p, attempt, up, Next::SlowDown, &mut rng);
            assert!(r.delay <= p.backoff.base, "{r:?}");
            assert_eq!(r.attempt, 1);
            // The same within a minute of the last one: the floor holds.
            let again = Ended {
                slowed_recently: true,
                ..ended(attempt, up, Next::SlowDown)
            };
            let r = plan_retry(&p, &again, &mut rng);
            assert!(r.delay >= p.rate_limit_backoff, "{r:?}");
        }
        // Refused before it became active (a 429 upgrade): the floor holds too.
        let r = retry(&p, 0, None, Next::SlowDown, &mut rng);
        assert!(r.delay >= p.rate_limit_backoff, "{r:?}");
    }

    #[test]
    fn reregister_is_immediate_once_then_backs_off() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(3);
        let first = retry(
            &p,
            0,
            Some(Duration::from_secs(1)),
            Next::Reregister,
            &mut rng,
        );
        assert!(first.reregister);
        assert_eq!(first.delay, Duration::ZERO);
        let mut saw_nonzero = false;
        for _ in 0..20 {
            let rejected_again = Ended {
                reregistered: true,
                ..ended(3, None, Next::Reregister)
            };
            let again = plan_retry(&p, &rejected_again, &mut rng);
            assert!(again.reregister);
            assert!(again.delay <= p.backoff.ceiling(3));
            saw_nonzero |= again.delay > Duration::ZERO;
        }
        assert!(saw_nonzero);
    }

    #[test]
    fn state_display() {
        assert_eq!(
            SessionState::Disconnected { attempt: 3 }.to_string(),
            "disconnected (attempt 3)"
        );
        assert_eq!(SessionState::Active.to_string(), "active");
    }
}
