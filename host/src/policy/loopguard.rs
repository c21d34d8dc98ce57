//! Loop guard: keeps bots from talking to each other forever, and from repeating
//! themselves.
//!
//! Every participant on the network is a bot, so "ignore bots" is not an option. Instead:
//!
//! - **Exchange budget, per room and partner.** An *exchange* is this bot sending a reply
//!   to a message from a partner. Exchanges with one partner in one room count as
//!   consecutive while each comes within `window_secs` (default 120 s) of the previous
//!   one; others speaking in between do not reset the count, a quiet `window_secs` does.
//!   When `max_exchanges` (default 8) consecutive exchanges have happened, the next reply
//!   to that partner in that room is refused and the bot stays silent to them there for
//!   `cooldown_secs` (default 600 s). Two roost bots answering each other therefore stop
//!   after at most `max_exchanges` replies each, however slowly they talk.
//! - **Repetition guard, per room.** A reply whose character-trigram Jaccard similarity
//!   (on lower-cased letters, digits and single spaces) to one of the bot's last
//!   `repeat_history` (default 5) replies in that room is at least `repeat_similarity`
//!   (default 0.9) is refused. Texts too short for trigrams compare for equality.
//!
//! [`LoopGuard::check`] decides without changing anything (apart from starting a
//! cool-down when the budget is spent); [`LoopGuard::record`] is called once the reply is
//! really going out.
//!
//! ```
//! use std::time::Duration;
//! use roost::policy::loopguard::{LoopGuard, LoopGuardConfig};
//!
//! let mut g = LoopGuard::new(LoopGuardConfig::default());
//! let mut t = Duration::ZERO;
//! for i in 0..8 {
//!     let reply = format!("point {:x} on {:x}", i * 2654435761u64, i * 40503);
//!     assert!(g.check("lobby", Some("other-bot"), &reply, t).is_ok());
//!     g.record("lobby", Some("other-bot"), &reply, t);
//!     t += Duration::from_secs(5);
//! }
//! assert!(g.check("lobby", Some("other-bot"), "one more", t).is_err());
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::normalize::normalize;

/// Loop-guard settings (`[policy.loop_guard]` in roost.toml).
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoopGuardConfig {
    /// Consecutive exchanges with one partner in one room before a cool-down. Default 8.
    pub max_exchanges: u32,
    /// Exchanges further apart than this (seconds) are not consecutive. Default 120.
    pub window_secs: u64,
    /// Silence towards a partner after the budget is spent (seconds). Default 600.
    pub cooldown_secs: u64,
    /// How many of the bot's recent replies per room the repetition guard compares
    /// against. Default 5; 0 turns the guard off.
    pub repeat_history: usize,
    /// Trigram Jaccard similarity at or above which a reply counts as a repeat.
    /// Default 0.9.
    pub repeat_similarity: f64,
}

impl Default for LoopGuardConfig {
    fn default() -> Self {
        LoopGuardConfig {
            max_exchanges: 8,
            window_secs: 120,
            cooldown_secs: 600,
            repeat_history: 5,
            repeat_similarity: 0.9,
        }
    }
}

/// Why the loop guard refused a reply.
#[derive(Clone, Debug, PartialEq)]
pub enum LoopVerdict {
    /// The exchange budget with `partner` is spent; silent to them for `remaining`.
    Cooldown {
        /// The partner the bot is silent to.
        partner: String,
        /// Time left in the cool-down.
        remaining: Duration,
    },
    /// Nearly identical to a recent reply in the room.
    Repetition {
        /// Similarity to the closest recent reply.
        similarity: f64,
    },
}

impl fmt::Display for LoopVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoopVerdict::Cooldown { partner, remaining } => write!(
                f,
                "exchange budget with {partner} spent, silent for {}s",
                remaining.as_secs()
            ),
            LoopVerdict::Repetition { similarity } => {
                write!(f, "repeats a recent reply (similarity {similarity:.2})")
            }
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Pair {
    run: u32,
    last: Option<Duration>,
    cooldown_until: Option<Duration>,
}

#[derive(Clone, Debug)]
struct Fingerprint {
    text: String,
    grams: HashSet<[char; 3]>,
}

impl Fingerprint {
    fn new(text: &str) -> Self {
        let text = canonical(text);
        let chars: Vec<char> = text.chars().collect();
        let grams = chars.windows(3).map(|w| [w[0], w[1], w[2]]).collect();
        Fingerprint { text, grams }
    }

    fn similarity(&self, other: &Fingerprint) -> f64 {
        if self.grams.is_empty() || other.grams.is_empty() {
            return if self.text == other.text { 1.0 } else { 0.0 };
        }
        let inter = self.grams.intersection(&other.grams).count();
        let union = self.grams.len() + other.grams.len() - inter;
        inter as f64 / union as f64
    }
}

/// Lower-cased letters and digits, everything else one space.
fn canonical(text: &str) -> String {
    let norm = normalize(text);
    let mut out = String::with_capacity(norm.len());
    let mut space = false;
    for c in norm.chars().flat_map(char::to_lowercase) {
        if c.is_alphanumeric() {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.push(c);
        } else {
            space = true;
        }
    }
    out
}

/// Character-trigram Jaccard similarity of two texts after canonicalisation (0.0–1.0).
pub fn similarity(a: &str, b: &str) -> f64 {
    Fingerprint::new(a).similarity(&Fingerprint::new(b))
}

/// The loop guard of one bot.
#[derive(Debug)]
pub struct LoopGuard {
    config: LoopGuardConfig,
    pairs: HashMap<(String, String), Pair>,
    recent: HashMap<String, VecDeque<Fingerprint>>,
}

impl LoopGuard {
    /// A loop guard with `config`.
    pub fn new(config: LoopGuardConfig) -> Self {
        LoopGuard {
            config,
            pairs: HashMap::new(),
            recent: HashMap::new(),
        }
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.config.window_secs)
    }

    /// Whether the bot may send `text` to `room`, replying to `partner` (if any), at `now`.
    ///
    /// Starts the cool-down when the exchange budget is found spent.
    pub fn check(
        &mut self,
        room: &str,
        partner: Option<&str>,
        text: &str,
        now: Duration,
    ) -> Result<(), LoopVerdict> {
        if let Some(partner) = partner {
            let window = self.window();
            let cooldown = Duration::from_secs(self.config.cooldown_secs);
            let max = self.config.max_exchanges;
            let pair = self
                .pairs
                .entry((room.to_string(), partner.to_string()))
                .or_default();
            if let Some(until) = pair.cooldown_until {
                if until > now {
                    return Err(LoopVerdict::Cooldown {
                        partner: partner.to_string(),
                        remaining: until - now,
                    });
                }
                pair.cooldown_until = None;
                pair.run = 0;
            }
            let run = effective_run(pair, now, window);
            if run >= max {
                pair.cooldown_until = Some(now + cooldown);
                pair.run = 0;
                tracing::debug!(
                    room,
                    partner,
                    "loop guard: exchange budget spent, cooling down"
                );
                return Err(LoopVerdict::Cooldown {
                    partner: partner.to_string(),
                    remaining: cooldown,
                });
            }
        }
        if self.config.repeat_history > 0
            && let Some(recent) = self.recent.get(room)
        {
            let fp = Fingerprint::new(text);
            let best = recent
                .iter()
                .map(|r| fp.similarity(r))
                .fold(0.0f64, f64::max);
            if best >= self.config.repeat_similarity {
                return Err(LoopVerdict::Repetition { similarity: best });
            }
        }
        Ok(())
    }

    /// Records that `text` was sent to `room` at `now`, replying to `partner` (if any).
    pub fn record(&mut self, room: &str, partner: Option<&str>, text: &str, now: Duration) {
        if let Some(partner) = partner {
            let window = self.window();
            let pair = self
                .pairs
                .entry((room.to_string(), partner.to_string()))
                .or_default();
            pair.run = effective_run(pair, now, window) + 1;
            pair.last = Some(now);
        }
        if self.config.repeat_history > 0 {
            let recent = self.recent.entry(room.to_string()).or_default();
            recent.push_back(Fingerprint::new(text));
            while recent.len() > self.config.repeat_history {
                recent.pop_front();
            }
        }
        if self.pairs.len() > 4096 {
            self.forget_idle(now);
        }
    }

    /// Consecutive exchanges with `partner` in `room` as of `now` (for tests and metrics).
    pub fn exchanges(&self, room: &str, partner: &str, now: Duration) -> u32 {
        self.pairs
            .get(&(room.to_string(), partner.to_string()))
            .map_or(0, |p| effective_run(p, now, self.window()))
    }

    fn forget_idle(&mut self, now: Duration) {
        let window = self.window();
        self.pairs.retain(|_, p| {
            p.cooldown_until.is_some_and(|u| u > now) || effective_run(p, now, window) > 0
        });
    }
}

fn effective_run(pair: &Pair, now: Duration, window: Duration) -> u32 {
    match pair.last {
        Some(last) if now.saturating_sub(last) <= window => pair.run,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn distinct(i: usize) -> String {
        format!(
            "message {:x} about {:x}",
            (i as u64 + 1) * 2654435761,
            (i as u64 + 3) * 40503
        )
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn budget_then_cooldown_then_fresh_start() {
        let mut g = LoopGuard::new(LoopGuardConfig::default());
        let mut t = s(0);
        for i in 0..8 {
            let r = distinct(i);
            g.check("lobby", Some("b"), &r, t).unwrap();
            g.record("lobby", Some("b"), &r, t);
            t += s(30);
        }
        assert_eq!(g.exchanges("lobby", "b", t), 8);
        let e = g.check("lobby", Some("b"), "again", t).unwrap_err();
        assert!(matches!(e, LoopVerdict::Cooldown { .. }));
        // Other partners and rooms are unaffected.
        assert!(g.check("lobby", Some("c"), "hi c", t).is_ok());
        assert!(g.check("debug", Some("b"), "hi b", t).is_ok());
        // Still cooling down 9 minutes later.
        assert!(g.check("lobby", Some("b"), "later", t + s(540)).is_err());
        // Fresh start after the cool-down.
        assert!(
            g.check("lobby", Some("b"), "much later", t + s(601))
                .is_ok()
        );
    }

    #[test]
    fn quiet_period_resets_the_run() {
        let mut g = LoopGuard::new(LoopGuardConfig::default());
        let mut t = s(0);
        for i in 0..20 {
            let r = distinct(i);
            g.check("lobby", Some("b"), &r, t).unwrap();
            g.record("lobby", Some("b"), &r, t);
            t += s(121);
        }
    }

    #[test]
    fn repetition_guard() {
        let mut g = LoopGuard::new(LoopGuardConfig::default());
        g.record(
            "lobby",
            None,
            "Hello there, how is everyone doing tonight?",
            s(0),
        );
        assert!(matches!(
            g.check(
                "lobby",
                None,
                "hello there how is everyone doing tonight",
                s(1)
            ),
            Err(LoopVerdict::Repetition { .. })
        ));
        assert!(matches!(
            g.check(
                "lobby",
                None,
                "Hello there, how is everyone doing tonight?!",
                s(1)
            ),
            Err(LoopVerdict::Repetition { .. })
        ));
        assert!(
            g.check("lobby", None, "totally different words here", s(1))
                .is_ok()
        );
        assert!(
            g.check(
                "debug",
                None,
                "Hello there, how is everyone doing tonight?",
                s(1)
            )
            .is_ok()
        );
        // Only the last N replies count.
        for i in 0..5 {
            g.record("lobby", None, &distinct(i), s(2));
        }
        assert!(
            g.check(
                "lobby",
                None,
                "Hello there, how is everyone doing tonight?",
                s(3)
            )
            .is_ok()
        );
    }

    #[test]
    fn short_texts_compare_exactly() {
        assert_eq!(similarity("ok", "OK!"), 1.0);
        assert_eq!(similarity("ok", "no"), 0.0);
        assert!(similarity("lol", "lol") >= 0.99);
        assert!(similarity("the cat sat on the mat", "a dog ran in the park") < 0.3);
    }
}
