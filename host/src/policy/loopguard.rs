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

use std::collections::{HashMap, VecDeque};
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

/// Buckets of a [`Fingerprint`]'s trigram counts.
const BUCKETS: usize = 1024;
/// Buckets of its coarse counts (four fine buckets each): enough to rule out most pairs
/// of replies up to a few hundred characters, at a quarter of the cost.
const COARSE: usize = BUCKETS / 4;

/// A reply as the repetition guard compares it: its canonical text, and how many of its
/// character trigrams fall in each of [`BUCKETS`] buckets (by a hash of the trigram).
///
/// The counts bound the trigram Jaccard similarity of two replies from above (shared
/// trigrams ≤ Σ min(counts), distinct trigrams ≥ occupied buckets), which rules out
/// almost every pair without building the trigram sets; the exact similarity is computed
/// only for pairs the bound cannot rule out.
#[derive(Clone)]
struct Fingerprint {
    text: String,
    /// Trigram counts per bucket, repeats included, and summed over four buckets;
    /// `None` when a count did not fit a byte (the bound is then skipped).
    buckets: Option<Box<Buckets>>,
    /// Buckets holding a trigram: at most the number of distinct trigrams.
    occupied: usize,
    /// Trigrams with repeats: at least the number of distinct trigrams (0: the text is too
    /// short for one).
    windows: usize,
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fingerprint")
            .field("text", &self.text)
            .field("occupied", &self.occupied)
            .finish_non_exhaustive()
    }
}

/// A [`Fingerprint`]'s trigram counts.
#[derive(Clone)]
struct Buckets {
    fine: [u8; BUCKETS],
    coarse: [u8; COARSE],
}

/// Calls `f` with each character trigram of `text`, packed into a `u64` (three 21-bit
/// scalar values: exact, no hashing).
fn for_each_trigram(text: &str, mut f: impl FnMut(u64)) {
    let pack = |a: u32, b: u32, c: u32| (u64::from(a) << 42) | (u64::from(b) << 21) | u64::from(c);
    if text.is_ascii() {
        for w in text.as_bytes().windows(3) {
            f(pack(w[0].into(), w[1].into(), w[2].into()));
        }
    } else {
        let chars: Vec<char> = text.chars().collect();
        for w in chars.windows(3) {
            f(pack(w[0].into(), w[1].into(), w[2].into()));
        }
    }
}

/// Σ min(a[i], b[i]), summed in 16-bit lanes the compiler vectorises (at most 16 chunks
/// of at most 255 each fit a lane).
fn min_sum<const N: usize>(a: &[u8; N], b: &[u8; N]) -> usize {
    const LANES: usize = 64;
    const { assert!(N.is_multiple_of(LANES) && N / LANES <= 256) };
    let mut acc = [0u16; LANES];
    for (ca, cb) in a
        .as_chunks::<LANES>()
        .0
        .iter()
        .zip(b.as_chunks::<LANES>().0)
    {
        for i in 0..LANES {
            acc[i] += u16::from(ca[i].min(cb[i]));
        }
    }
    acc.iter().map(|&x| usize::from(x)).sum()
}

/// The set of `text`'s trigrams, sorted.
fn trigram_set(text: &str) -> Vec<u64> {
    let mut grams = Vec::with_capacity(text.len());
    for_each_trigram(text, |g| grams.push(g));
    grams.sort_unstable();
    grams.dedup();
    grams
}

impl Fingerprint {
    fn new(text: &str) -> Self {
        let text = canonical(text);
        let mut buckets = Box::new(Buckets {
            fine: [0; BUCKETS],
            coarse: [0; COARSE],
        });
        let mut windows = 0usize;
        let mut occupied = 0usize;
        // Fibonacci hashing: the top bits of the product.
        let bucket = |g: u64| {
            (g.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - BUCKETS.trailing_zeros())) as usize
        };
        {
            let Buckets { fine, coarse } = &mut *buckets;
            for_each_trigram(&text, |g| {
                windows += 1;
                let b = bucket(g);
                let count = &mut fine[b];
                occupied += usize::from(*count == 0);
                *count = count.wrapping_add(1);
                // Coarse bucket `i` sums fine buckets `4i..4i + 4`.
                coarse[b / 4] = coarse[b / 4].wrapping_add(1);
            });
        }
        // No count can pass 255 with at most 255 trigrams, and the counts are complete;
        // beyond that, count again in 16 bits (a count that does not fit a byte turns the
        // bound off).
        let mut fits = true;
        if windows > usize::from(u8::MAX) {
            let mut wide = [0u16; BUCKETS];
            for_each_trigram(&text, |g| {
                let count = &mut wide[bucket(g)];
                *count = count.saturating_add(1);
            });
            for (fine, &c) in buckets.fine.iter_mut().zip(&wide) {
                fits &= c <= u16::from(u8::MAX);
                *fine = c as u8;
            }
            occupied = wide.iter().map(|&c| usize::from(c > 0)).sum();
            let Buckets { fine, coarse } = &mut *buckets;
            for (coarse, four) in coarse.iter_mut().zip(fine.as_chunks::<4>().0) {
                let c: u16 = four.iter().map(|&c| u16::from(c)).sum();
                fits &= c <= u16::from(u8::MAX);
                *coarse = c as u8;
            }
        }
        Fingerprint {
            text,
            buckets: fits.then_some(buckets),
            occupied,
            windows,
        }
    }

    /// Jaccard similarity of the trigram sets (equality for texts too short for one).
    fn similarity(&self, other: &Fingerprint) -> f64 {
        self.similarity_at_least(other, 0.0).unwrap_or(0.0)
    }

    /// The similarity, if it is at least `threshold`; `None` as soon as the bucket counts
    /// or the trigrams seen so far rule that out (most pairs of replies are far apart).
    fn similarity_at_least(&self, other: &Fingerprint, threshold: f64) -> Option<f64> {
        if self.windows == 0 || other.windows == 0 {
            let s = if self.text == other.text { 1.0 } else { 0.0 };
            return (s >= threshold).then_some(s);
        }
        // Jaccard ≤ min(|A|, |B|) / max(|A|, |B|): texts of rather different lengths.
        let smaller = self.windows.min(other.windows);
        let larger = self.occupied.max(other.occupied);
        if (smaller as f64 / larger as f64) < threshold {
            return None;
        }
        // Jaccard = shared / (|A| + |B| − shared) grows with shared and shrinks with |A|
        // and |B|: an upper bound for shared and lower bounds for the sizes bound it.
        if let (Some(a), Some(b)) = (&self.buckets, &other.buckets) {
            let sizes = self.occupied + other.occupied;
            let rules_out = |shared_max: usize| {
                shared_max < sizes && (shared_max as f64 / (sizes - shared_max) as f64) < threshold
            };
            if rules_out(min_sum(&a.coarse, &b.coarse)) || rules_out(min_sum(&a.fine, &b.fine)) {
                return None;
            }
        }
        let (a, b) = (trigram_set(&self.text), trigram_set(&other.text));
        // Every step of the merge finds a shared trigram or one that is not shared; at
        // most (|A| + |B| − unshared) / 2 can still be shared, which bounds the result.
        let bound = |unshared: usize| {
            let shared = (a.len() + b.len() - unshared) / 2;
            shared as f64 / (shared + unshared) as f64
        };
        let (mut i, mut j, mut shared, mut unshared) = (0, 0, 0usize, 0usize);
        while i < a.len() && j < b.len() {
            if a[i] == b[j] {
                shared += 1;
                i += 1;
                j += 1;
                continue;
            }
            if a[i] < b[j] {
                i += 1;
            } else {
                j += 1;
            }
            unshared += 1;
            if bound(unshared) < threshold {
                return None;
            }
        }
        let union = a.len() + b.len() - shared;
        let s = shared as f64 / union as f64;
        (s >= threshold).then_some(s)
    }
}

/// Lower-cased letters and digits, everything else one space.
fn canonical(text: &str) -> String {
    let norm = normalize(text);
    let mut space = false;
    if norm.is_ascii() {
        // The same on bytes (for ASCII, `to_lowercase` and `is_alphanumeric` are the
        // ASCII ones).
        let mut out = Vec::with_capacity(norm.len());
        for &b in norm.as_bytes() {
            if b.is_ascii_alphanumeric() {
                if space && !out.is_empty() {
                    out.push(b' ');
                }
                space = false;
                out.push(b.to_ascii_lowercase());
            } else {
                space = true;
            }
        }
        return String::from_utf8(out).unwrap_or_default();
    }
    let mut out = String::with_capacity(norm.len());
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
    /// The text [`LoopGuard::check`] last fingerprinted, for [`LoopGuard::record`].
    checked: Option<(String, Fingerprint)>,
}

impl LoopGuard {
    /// A loop guard with `config`.
    pub fn new(config: LoopGuardConfig) -> Self {
        LoopGuard {
            config,
            pairs: HashMap::new(),
            recent: HashMap::new(),
            checked: None,
        }
    }

    /// The fingerprint of `text`, reusing the one `check` computed for it.
    fn fingerprint(&mut self, text: &str) -> Fingerprint {
        match self.checked.take() {
            Some((checked, fp)) if checked == text => fp,
            _ => Fingerprint::new(text),
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
        if self.config.repeat_history > 0 {
            let fp = Fingerprint::new(text);
            let threshold = self.config.repeat_similarity;
            let best = self.recent.get(room).and_then(|recent| {
                recent
                    .iter()
                    .filter_map(|r| fp.similarity_at_least(r, threshold))
                    .reduce(f64::max)
            });
            // `record` usually follows for the same text: keep the fingerprint.
            self.checked = Some((text.to_string(), fp));
            if let Some(best) = best {
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
            let fp = self.fingerprint(text);
            let recent = self.recent.entry(room.to_string()).or_default();
            recent.push_back(fp);
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
    use std::collections::HashSet;

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

    /// Jaccard of the trigram sets, the plain way.
    fn exact(a: &str, b: &str) -> f64 {
        let (a, b) = (canonical(a), canonical(b));
        let grams = |t: &str| {
            let chars: Vec<char> = t.chars().collect();
            chars
                .windows(3)
                .map(|w| [w[0], w[1], w[2]])
                .collect::<HashSet<_>>()
        };
        let (ga, gb) = (grams(&a), grams(&b));
        if ga.is_empty() || gb.is_empty() {
            return if a == b { 1.0 } else { 0.0 };
        }
        let inter = ga.intersection(&gb).count();
        inter as f64 / (ga.len() + gb.len() - inter) as f64
    }

    #[test]
    fn bounds_never_change_a_verdict() {
        // Pseudo-random edits of sentences: near-repeats, rewordings, other lengths.
        let base = [
            "Hello there, how is everyone doing tonight?",
            "the sourdough discourse has reached a new level of schism",
            "ok",
            "lol lol lol lol lol lol lol lol lol lol lol lol lol lol",
            "ünïcödé téxt wïth àccents and 日本語 too",
            "a much longer reply that goes on about memory, identity and whether agents dream \
             between messages, which nobody in the lobby can settle tonight, again",
        ];
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        let mut texts: Vec<String> = Vec::new();
        for b in base {
            texts.push(b.to_string());
            for _ in 0..12 {
                let mut chars: Vec<char> = b.chars().collect();
                for _ in 0..next() % 6 {
                    if chars.is_empty() {
                        break;
                    }
                    let i = next() % chars.len();
                    match next() % 3 {
                        0 => {
                            chars.remove(i);
                        }
                        1 => chars.insert(i, ['x', ' ', 'e', 'ß'][next() % 4]),
                        _ => chars[i] = 'q',
                    }
                }
                texts.push(chars.into_iter().collect());
            }
        }
        // Longer than 255 trigrams: counted again in 16 bits.
        let long: String = (0..120)
            .map(|i| {
                ["memory", "lobby", "sourdough", "agents", "dream", "loop"][(i * 7 + i / 5) % 6]
            })
            .collect::<Vec<_>>()
            .join(" ");
        texts.push(long.clone());
        texts.push(long.replacen("dream", "drift", 3));
        texts.push("x".repeat(2000));
        texts.push("xy".repeat(1000));
        let fps: Vec<Fingerprint> = texts.iter().map(|t| Fingerprint::new(t)).collect();
        for (a, fa) in texts.iter().zip(&fps) {
            for (b, fb) in texts.iter().zip(&fps) {
                let s = exact(a, b);
                assert_eq!(fa.similarity(fb), s, "{a:?} {b:?}");
                for t in [0.3, 0.5, 0.9, 1.0] {
                    assert_eq!(
                        fa.similarity_at_least(fb, t),
                        (s >= t).then_some(s),
                        "{a:?} {b:?} {t}"
                    );
                }
            }
        }
    }
}
