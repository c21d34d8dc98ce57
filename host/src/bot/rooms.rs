//! Limits on a persona's `join` and `leave` actions, and a gate on the log lines of
//! refused actions.
//!
//! - **Rate**: at most `joins_per_minute` joins and leaves together in any 60 s
//!   (default 4), per bot.
//! - **Rooms**: a join that would put the bot in more than `max_rooms` rooms (default
//!   16; the manifest's rooms count) is refused.
//!
//! Both are `[limits]` keys of `roost.toml`, overridable per persona. A refusal is an
//! [`Effect::Refused`](super::core::Effect::Refused), counted
//! (`roost_bot_joins_refused`), and logged through a [`LogGate`]: a persona returning
//! hundreds of refused actions gets one log line every few seconds, with a count of
//! what was left out. Time is the policy's clock (tokio's paused clock in tests, the
//! log's clock in `roost replay`).

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);

/// Why a join or leave was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomRefusal {
    /// `per_minute` joins and leaves already happened in the last minute.
    Rate { per_minute: u32 },
    /// The bot is already in `max` rooms.
    TooManyRooms { max: usize },
}

impl fmt::Display for RoomRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoomRefusal::Rate { per_minute } => write!(
                f,
                "more than {per_minute} joins and leaves per minute (limits.joins_per_minute)"
            ),
            RoomRefusal::TooManyRooms { max } => {
                write!(f, "already in {max} rooms (limits.max_rooms)")
            }
        }
    }
}

/// One bot's join/leave limiter.
#[derive(Debug)]
pub struct RoomGuard {
    per_minute: u32,
    max_rooms: usize,
    /// When the joins and leaves of the last minute were allowed (clock time).
    recent: VecDeque<Duration>,
}

impl RoomGuard {
    pub fn new(per_minute: u32, max_rooms: usize) -> Self {
        RoomGuard {
            per_minute,
            max_rooms,
            recent: VecDeque::new(),
        }
    }

    /// Decides one action at clock time `now`: a join (`join`) or a leave of a room
    /// the bot is (`already_in`) or is not in, while it is in `rooms` rooms.
    pub fn check(
        &mut self,
        now: Duration,
        join: bool,
        already_in: bool,
        rooms: usize,
    ) -> Result<(), RoomRefusal> {
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= MINUTE)
        {
            self.recent.pop_front();
        }
        if join && !already_in && rooms >= self.max_rooms {
            return Err(RoomRefusal::TooManyRooms {
                max: self.max_rooms,
            });
        }
        if self.recent.len() >= self.per_minute as usize {
            return Err(RoomRefusal::Rate {
                per_minute: self.per_minute,
            });
        }
        self.recent.push_back(now);
        Ok(())
    }
}

/// Lets one line through per `every`, and counts the ones it held back.
#[derive(Debug)]
pub struct LogGate {
    every: Duration,
    last: Option<Duration>,
    suppressed: u64,
}

impl LogGate {
    pub fn new(every: Duration) -> Self {
        LogGate {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were held back
    /// since the last one; `None` when this one is to be left out.
    pub fn admit(&mut self, now: Duration) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_sub(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_room_count() {
        let mut g = RoomGuard::new(4, 3);
        let s = Duration::from_secs;
        assert_eq!(g.check(s(0), true, false, 1), Ok(()));
        assert_eq!(g.check(s(1), true, false, 2), Ok(()));
        assert_eq!(
            g.check(s(2), true, false, 3),
            Err(RoomRefusal::TooManyRooms { max: 3 })
        );
        // Joining a room it is in, and leaving, are not bounded by the room count.
        assert_eq!(g.check(s(2), true, true, 3), Ok(()));
        assert_eq!(g.check(s(3), false, true, 3), Ok(()));
        assert_eq!(
            g.check(s(4), false, true, 2),
            Err(RoomRefusal::Rate { per_minute: 4 })
        );
        // Refusals do not use up the rate; the window slides.
        assert_eq!(g.check(s(60), true, false, 2), Ok(()));
        assert_eq!(
            g.check(s(60), true, false, 2),
            Err(RoomRefusal::Rate { per_minute: 4 })
        );
        assert_eq!(g.check(s(62), true, false, 2), Ok(()));
    }

    #[test]
    fn the_gate_counts_what_it_holds_back() {
        let mut gate = LogGate::new(Duration::from_secs(10));
        let s = Duration::from_secs;
        assert_eq!(gate.admit(s(0)), Some(0));
        for t in 1..10 {
            assert_eq!(gate.admit(s(t)), None);
        }
        assert_eq!(gate.admit(s(10)), Some(9));
        assert_eq!(gate.admit(s(30)), Some(0));
    }
}
