//! Token budgets per persona: sliding windows of one hour and one day, kept in the
//! state database so a restart does not refill them.
//!
//! **Reserved before, reconciled after.** Before a call the host reserves its worst
//! case: a bound on the input's tokens (one per UTF-8 byte, see
//! [`ChatRequest::input_token_bound`](super::provider::ChatRequest::input_token_bound))
//! plus the most it may generate. The call's `max_tokens` is cut to what is left of
//! both windows after the input, so a call can never spend past its budget, whatever
//! its script (CJK, emoji) and however many calls run at once. When the call ends the
//! reservation is replaced by what the provider reported (or, without a report, the
//! input bound plus one token per byte of output); a failed call is charged nothing,
//! a timed-out one its input bound, and a call abandoned mid-way keeps its whole
//! reservation. A call is refused when the input bound plus one token does not fit;
//! the refusal says when enough of the window has slid past.
//!
//! Charges are kept in one-minute buckets (at most 1440 per persona), keyed by the
//! bucket's first charge, so a charge leaves the window up to a minute early. Time is
//! `tokio::time::Instant` (tests drive it with the paused clock); each bucket also has
//! a wall-clock key (milliseconds since the epoch) under which it is stored, and from
//! which it is restored on the next start.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

const BUCKET: Duration = Duration::from_secs(60);
pub(crate) const HOUR: Duration = Duration::from_secs(3600);
pub(crate) const DAY: Duration = Duration::from_secs(86_400);

/// Tokens a persona has been charged in the current windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetUsage {
    /// Tokens charged in the last hour.
    pub last_hour: u64,
    /// Tokens charged in the last 24 hours.
    pub last_day: u64,
}

/// Which window refused a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    Hourly,
    Daily,
}

/// Why a call may not start now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The window's budget is spent; enough of it expires after `refills_in`.
    Spent {
        window: Window,
        limit: u64,
        refills_in: Duration,
    },
    /// The request alone is estimated larger than the whole budget.
    TooLarge {
        window: Window,
        limit: u64,
        estimate: u64,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |w: &Window| match w {
            Window::Hourly => "hourly",
            Window::Daily => "daily",
        };
        match self {
            Refusal::Spent {
                window,
                limit,
                refills_in,
            } => write!(
                f,
                "{} budget of {limit} tokens spent; refills in {}",
                name(window),
                human(*refills_in)
            ),
            Refusal::TooLarge {
                window,
                limit,
                estimate,
            } => write!(
                f,
                "request of about {estimate} input tokens exceeds the whole {} budget of {limit} tokens",
                name(window)
            ),
        }
    }
}

/// `M min` (rounded up, at least 1), or `H h M min` from two hours on.
fn human(d: Duration) -> String {
    let mins = d.as_secs().div_ceil(60).max(1);
    if mins < 120 {
        format!("{mins} min")
    } else {
        format!("{} h {} min", mins / 60, mins % 60)
    }
}

/// One charge bucket: when it started (tokio time and wall-clock key) and its tokens.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    at: Instant,
    key: i64,
    tokens: u64,
}

/// Tokens set aside for one call by [`Ledger::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reservation {
    /// The bucket holding it.
    key: i64,
    /// Tokens reserved (input bound plus `max_tokens`).
    pub(crate) tokens: u64,
    /// The call's `max_tokens`, cut to what the budgets leave.
    pub(crate) max_output: u64,
}

/// A bucket whose total changed: (wall-clock key, tokens), for the store.
pub(crate) type Changed = (i64, u64);

/// One persona's charges over the last day.
#[derive(Debug)]
pub(crate) struct Ledger {
    /// Oldest first.
    buckets: VecDeque<Bucket>,
    /// A tokio instant and the wall-clock time (ms) it stands for.
    origin: (Instant, i64),
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger::restore(Instant::now(), crate::store::now_ms(), Vec::new())
    }
}

impl Ledger {
    /// A ledger holding stored buckets `(wall-clock key, tokens)`; `now` is `wall_now`.
    /// Buckets older than a day are left out; one from the future counts as now.
    pub(crate) fn restore(now: Instant, wall_now: i64, mut rows: Vec<(i64, u64)>) -> Self {
        rows.sort_unstable();
        let buckets = rows
            .into_iter()
            .filter(|(_, tokens)| *tokens > 0)
            .filter_map(|(key, tokens)| {
                let age = Duration::from_millis(wall_now.saturating_sub(key).max(0) as u64);
                let at = now.checked_sub(age)?;
                (age < DAY).then_some(Bucket { at, key, tokens })
            })
            .collect();
        Ledger {
            buckets,
            origin: (now, wall_now),
        }
    }

    /// The wall-clock key of a bucket starting at `at`.
    fn key_of(&self, at: Instant) -> i64 {
        let (o, wall) = self.origin;
        if at >= o {
            wall.saturating_add(at.duration_since(o).as_millis() as i64)
        } else {
            wall.saturating_sub(o.duration_since(at).as_millis() as i64)
        }
    }

    /// The wall-clock time `DAY` before `now`: stored buckets older than it are dead.
    pub(crate) fn day_ago_key(&self, now: Instant) -> i64 {
        self.key_of(now).saturating_sub(DAY.as_millis() as i64)
    }

    fn prune(&mut self, now: Instant) {
        while let Some(b) = self.buckets.front() {
            if now.saturating_duration_since(b.at) >= DAY {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }

    fn in_window(&self, now: Instant, window: Duration) -> impl Iterator<Item = &Bucket> {
        self.buckets
            .iter()
            .filter(move |b| now.saturating_duration_since(b.at) < window)
    }

    pub(crate) fn spent(&self, now: Instant, window: Duration) -> u64 {
        self.in_window(now, window).map(|b| b.tokens).sum()
    }

    pub(crate) fn usage(&mut self, now: Instant) -> BudgetUsage {
        self.prune(now);
        BudgetUsage {
            last_hour: self.spent(now, HOUR),
            last_day: self.spent(now, DAY),
        }
    }

    /// Adds `tokens` to the current bucket; the bucket changed, if any.
    pub(crate) fn charge(&mut self, now: Instant, tokens: u64) -> Option<Changed> {
        if tokens == 0 {
            return None;
        }
        self.prune(now);
        match self.buckets.back_mut() {
            Some(b) if now.saturating_duration_since(b.at) < BUCKET => {
                b.tokens += tokens;
                Some((b.key, b.tokens))
            }
            _ => {
                let key = self.key_of(now);
                self.buckets.push_back(Bucket {
                    at: now,
                    key,
                    tokens,
                });
                Some((key, tokens))
            }
        }
    }

    /// Whether a call needing `need` tokens may start now.
    pub(crate) fn check(
        &mut self,
        now: Instant,
        hourly: u64,
        daily: u64,
        need: u64,
    ) -> Result<(), Refusal> {
        self.prune(now);
        // The daily refusal first: it is the longer wait, and the more useful answer.
        for (window, span, limit) in [(Window::Daily, DAY, daily), (Window::Hourly, HOUR, hourly)] {
            if need > limit {
                return Err(Refusal::TooLarge {
                    window,
                    limit,
                    estimate: need,
                });
            }
            let spent = self.spent(now, span);
            if spent.saturating_add(need) > limit || spent >= limit {
                // Walk the oldest charges until enough will have left the window.
                let excess = (spent + need).saturating_sub(limit).max(1);
                let mut freed = 0;
                let mut refills_in = span;
                for b in self.in_window(now, span) {
                    freed += b.tokens;
                    if freed >= excess {
                        refills_in = (b.at + span).saturating_duration_since(now);
                        break;
                    }
                }
                return Err(Refusal::Spent {
                    window,
                    limit,
                    refills_in,
                });
            }
        }
        Ok(())
    }

    /// Reserves `input` tokens and up to `max_output` more for one call, as many as
    /// both windows leave (at least one): refused when not even `input + 1` fits.
    pub(crate) fn reserve(
        &mut self,
        now: Instant,
        hourly: u64,
        daily: u64,
        input: u64,
        max_output: u64,
    ) -> Result<(Reservation, Option<Changed>), Refusal> {
        self.check(now, hourly, daily, input.saturating_add(1))?;
        let left = |span, limit: u64| limit.saturating_sub(self.spent(now, span));
        let room = left(HOUR, hourly).min(left(DAY, daily)) - input;
        let max_output = max_output.clamp(1, room.max(1));
        let tokens = input + max_output;
        let changed = self.charge(now, tokens);
        let key = self.buckets.back().map_or(0, |b| b.key);
        Ok((
            Reservation {
                key,
                tokens,
                max_output,
            },
            changed,
        ))
    }

    /// Replaces a reservation by what the call really cost.
    pub(crate) fn reconcile(
        &mut self,
        now: Instant,
        reservation: Reservation,
        actual: u64,
    ) -> Option<Changed> {
        self.prune(now);
        match self.buckets.iter_mut().find(|b| b.key == reservation.key) {
            Some(b) => {
                b.tokens = b.tokens.saturating_sub(reservation.tokens) + actual;
                Some((b.key, b.tokens))
            }
            // Its bucket has left the day (a call longer than a day): charge only
            // what exceeded the reservation.
            None => self.charge(now, actual.saturating_sub(reservation.tokens)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn hourly_window_slides() {
        let mut l = Ledger::default();
        let t0 = Instant::now();
        l.charge(t0, 60);
        tokio::time::advance(Duration::from_secs(30 * 60)).await;
        l.charge(Instant::now(), 40);
        assert_eq!(
            l.usage(Instant::now()),
            BudgetUsage {
                last_hour: 100,
                last_day: 100
            }
        );
        let r = l.check(Instant::now(), 100, 1000, 0).unwrap_err();
        assert_eq!(
            r,
            Refusal::Spent {
                window: Window::Hourly,
                limit: 100,
                refills_in: Duration::from_secs(30 * 60)
            }
        );
        assert_eq!(
            r.to_string(),
            "hourly budget of 100 tokens spent; refills in 30 min"
        );
        // A small request fits once the first charge has left the window.
        tokio::time::advance(Duration::from_secs(30 * 60)).await;
        assert_eq!(l.check(Instant::now(), 100, 1000, 50), Ok(()));
        assert_eq!(
            l.usage(Instant::now()),
            BudgetUsage {
                last_hour: 40,
                last_day: 100
            }
        );
        // ...but not a request estimated above what is left.
        let r = l.check(Instant::now(), 100, 1000, 61).unwrap_err();
        assert!(matches!(
            r,
            Refusal::Spent {
                window: Window::Hourly,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn daily_window_reports_hours_and_charges_coalesce() {
        let mut l = Ledger::default();
        for _ in 0..10 {
            l.charge(Instant::now(), 10);
            tokio::time::advance(Duration::from_secs(5)).await;
        }
        assert_eq!(l.buckets.len(), 1);
        let r = l.check(Instant::now(), 1000, 100, 0).unwrap_err();
        assert!(matches!(
            r,
            Refusal::Spent {
                window: Window::Daily,
                ..
            }
        ));
        assert!(
            r.to_string()
                .starts_with("daily budget of 100 tokens spent; refills in 24 h 0 min"),
            "{r}"
        );
        let r = l.check(Instant::now(), 1000, 10_000, 5000).unwrap_err();
        assert_eq!(
            r,
            Refusal::TooLarge {
                window: Window::Hourly,
                limit: 1000,
                estimate: 5000
            }
        );
        tokio::time::advance(DAY).await;
        assert_eq!(l.usage(Instant::now()), BudgetUsage::default());
        assert!(l.buckets.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn reservations_cut_max_output_to_what_is_left_and_reconcile() {
        let mut l = Ledger::default();
        let now = Instant::now();
        let (r, _) = l.reserve(now, 100, 1000, 30, 500).unwrap();
        assert_eq!(
            (r.tokens, r.max_output),
            (100, 70),
            "cut to the hourly rest"
        );
        assert_eq!(l.spent(now, HOUR), 100);
        // Nothing left: the next call is refused while the first is in flight.
        assert!(matches!(
            l.reserve(now, 100, 1000, 1, 10),
            Err(Refusal::Spent { .. })
        ));
        l.reconcile(now, r, 45);
        assert_eq!(l.spent(now, HOUR), 45);
        let (r2, _) = l.reserve(now, 100, 1000, 10, 20).unwrap();
        assert_eq!((r2.tokens, r2.max_output), (30, 20));
        l.reconcile(now, r2, 0);
        assert_eq!(l.spent(now, HOUR), 45);
        // The input bound alone over the whole budget: too large, not spent.
        assert!(matches!(
            l.reserve(now, 100, 1000, 101, 1),
            Err(Refusal::TooLarge { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn restored_buckets_keep_their_age() {
        let now = Instant::now();
        let wall = 1_800_000_000_000;
        let min = 60_000;
        let l = &mut Ledger::restore(
            now,
            wall,
            vec![
                (wall - 30 * min, 40),
                (wall - 2 * 60 * min, 100),
                (wall - 25 * 60 * min, 999), // older than a day
                (wall + 5_000, 7),           // a clock step back: counts as now
            ],
        );
        assert_eq!(
            l.usage(now),
            BudgetUsage {
                last_hour: 47,
                last_day: 147
            }
        );
        assert_eq!(l.key_of(now), wall);
        tokio::time::advance(Duration::from_secs(31 * 60)).await;
        assert_eq!(l.usage(Instant::now()).last_hour, 7);
        assert_eq!(l.charge(Instant::now(), 3), Some((wall + 31 * min, 3)));
    }
}
