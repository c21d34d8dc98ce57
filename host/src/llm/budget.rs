//! Token budgets per persona: sliding windows of one hour and one day.
//!
//! Every completed call charges its tokens (the provider's usage, or an estimate of
//! about four characters per token) at the time it finished. A call is refused when the
//! tokens charged within the last hour (or day), plus the request's estimated input,
//! would exceed the budget; the refusal says when enough of the window has slid past.
//! Charges are kept in one-minute buckets (at most 1440 per persona), keyed by the
//! bucket's first charge, so a charge leaves the window up to a minute early. Time is
//! `tokio::time::Instant`: tests drive it with the paused clock. Budgets live in memory
//! and start empty when the host restarts.
//!
//! A check happens before the call and the charge after it, so concurrent calls may
//! together overshoot by at most `max_concurrency × (max_tokens + input)`.

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

/// One persona's charges over the last day.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// (bucket start, tokens), oldest first.
    buckets: VecDeque<(Instant, u64)>,
}

impl Ledger {
    fn prune(&mut self, now: Instant) {
        while let Some((at, _)) = self.buckets.front() {
            if now.saturating_duration_since(*at) >= DAY {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }

    fn in_window(&self, now: Instant, window: Duration) -> impl Iterator<Item = &(Instant, u64)> {
        self.buckets
            .iter()
            .filter(move |(at, _)| now.saturating_duration_since(*at) < window)
    }

    pub(crate) fn spent(&self, now: Instant, window: Duration) -> u64 {
        self.in_window(now, window).map(|(_, t)| t).sum()
    }

    pub(crate) fn usage(&mut self, now: Instant) -> BudgetUsage {
        self.prune(now);
        BudgetUsage {
            last_hour: self.spent(now, HOUR),
            last_day: self.spent(now, DAY),
        }
    }

    pub(crate) fn charge(&mut self, now: Instant, tokens: u64) {
        if tokens == 0 {
            return;
        }
        self.prune(now);
        match self.buckets.back_mut() {
            Some((at, t)) if now.saturating_duration_since(*at) < BUCKET => *t += tokens,
            _ => self.buckets.push_back((now, tokens)),
        }
    }

    /// Whether a call estimated at `need` input tokens may start now.
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
                for (at, tokens) in self.in_window(now, span) {
                    freed += tokens;
                    if freed >= excess {
                        refills_in = (*at + span).saturating_duration_since(now);
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
}
