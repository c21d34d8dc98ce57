//! Comparing what a shadow would say with what the live bot said, and the board
//! that metrics and the status page read the comparisons from.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::plugin::Sandbox;
use crate::plugin::bindings::Message;

use super::core::Effect;

/// What happened to one message, live against shadow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The same actions (both silent included).
    Same,
    /// Both replied, differently.
    Different,
    /// Only the live version replied.
    OnlyLive,
    /// Only the shadow would have replied.
    OnlyShadow,
    /// Outbound policy dropped a reply of the shadow.
    Blocked,
    /// The shadow's call failed (trap, limit, timeout, quarantine).
    Error,
    /// The shadow was behind: the message was not shown to it.
    Dropped,
}

impl Outcome {
    /// Every outcome, in the order metrics and status list them.
    pub const ALL: [Outcome; 7] = [
        Outcome::Same,
        Outcome::Different,
        Outcome::OnlyLive,
        Outcome::OnlyShadow,
        Outcome::Blocked,
        Outcome::Error,
        Outcome::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Same => "same",
            Outcome::Different => "different",
            Outcome::OnlyLive => "only-live",
            Outcome::OnlyShadow => "only-shadow",
            Outcome::Blocked => "blocked",
            Outcome::Error => "error",
            Outcome::Dropped => "dropped",
        }
    }

    fn index(self) -> usize {
        Outcome::ALL.iter().position(|o| *o == self).unwrap_or(0)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One action as compared: `say` (with its text), `join` or `leave`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Act {
    pub kind: String,
    pub room: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
}

impl std::fmt::Display for Act {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind.as_str() {
            "say" => write!(f, "#{}: {}", self.room, self.text),
            k => write!(f, "{k} #{}", self.room),
        }
    }
}

/// The actions that would reach the network among `effects` (replies after outbound
/// policy, joins, leaves).
pub fn acts(effects: &[Effect]) -> Vec<Act> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Say { room, text } => Some(Act {
                kind: "say".into(),
                room: room.clone(),
                text: text.clone(),
            }),
            Effect::Join(room) => Some(Act {
                kind: "join".into(),
                room: room.to_string(),
                text: String::new(),
            }),
            Effect::Leave(room) => Some(Act {
                kind: "leave".into(),
                room: room.to_string(),
                text: String::new(),
            }),
            _ => None,
        })
        .collect()
}

/// The verdict on one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub outcome: Outcome,
    /// For `different`: how alike the replies' texts are, 0 (nothing shared) to 1.
    pub similarity: Option<f64>,
    /// For `blocked`: the policy's reasons; for `error`: the failure.
    pub detail: Option<String>,
}

/// Compares what the live version did for a message with what the shadow would
/// have done (both after outbound policy).
pub fn compare(live: &[Effect], shadow: &[Effect]) -> Comparison {
    let plain = |outcome| Comparison {
        outcome,
        similarity: None,
        detail: None,
    };
    if let Some(e) = shadow.iter().find_map(|e| match e {
        Effect::PluginError(e) => Some(e.clone()),
        _ => None,
    }) {
        return Comparison {
            outcome: Outcome::Error,
            similarity: None,
            detail: Some(e),
        };
    }
    let blocked: Vec<String> = shadow
        .iter()
        .filter_map(|e| match e {
            Effect::Dropped { room, reason } => Some(format!("#{room}: {reason}")),
            Effect::Refused { what } => Some(what.clone()),
            _ => None,
        })
        .collect();
    if !blocked.is_empty() {
        return Comparison {
            outcome: Outcome::Blocked,
            similarity: None,
            detail: Some(blocked.join("; ")),
        };
    }
    let (l, s) = (acts(live), acts(shadow));
    if l == s {
        return plain(Outcome::Same);
    }
    match (l.is_empty(), s.is_empty()) {
        (true, _) => plain(Outcome::OnlyShadow),
        (_, true) => plain(Outcome::OnlyLive),
        _ => {
            let text = |a: &[Act]| {
                a.iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            Comparison {
                outcome: Outcome::Different,
                similarity: Some(similarity(&text(&l), &text(&s))),
                detail: None,
            }
        }
    }
}

/// How alike two texts are: the Sørensen–Dice coefficient of their character
/// bigrams (as multisets), 1 for equal texts, 0 for texts sharing no bigram. Linear
/// in the texts' length.
pub fn similarity(a: &str, b: &str) -> f64 {
    if a == b {
        return 1.0;
    }
    fn bigrams(s: &str) -> BTreeMap<(char, char), u32> {
        let chars: Vec<char> = s.chars().collect();
        let mut m = BTreeMap::new();
        for w in chars.windows(2) {
            *m.entry((w[0], w[1])).or_insert(0) += 1;
        }
        m
    }
    let (x, y) = (bigrams(a), bigrams(b));
    let total: u32 = x.values().sum::<u32>() + y.values().sum::<u32>();
    if total == 0 {
        return 0.0;
    }
    let shared: u32 = x
        .iter()
        .map(|(k, n)| (*n).min(y.get(k).copied().unwrap_or(0)))
        .sum();
    let score = 2.0 * f64::from(shared) / f64::from(total);
    (score * 1000.0).round() / 1000.0
}

/// One message on which the shadow did not do what the live version did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowPair {
    /// When it was compared, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The bot (the live persona's label).
    pub bot: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f64>,
    /// The message: room, sender, text and timestamp.
    pub room: String,
    pub from: String,
    pub text: String,
    pub timestamp_ms: u64,
    /// What the live version did.
    pub live: Vec<Act>,
    /// What the shadow would have done.
    pub shadow: Vec<Act>,
    /// Why the shadow was blocked, or how it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The shadow's version (its manifest's).
    #[serde(default)]
    pub shadow_version: String,
}

impl ShadowPair {
    /// The pair for message `msg`.
    pub fn new(
        bot: &str,
        msg: &Message,
        live: &[Effect],
        shadow: &[Effect],
        cmp: Comparison,
        shadow_version: &str,
    ) -> ShadowPair {
        ShadowPair {
            at_ms: unix_ms(SystemTime::now()),
            bot: bot.to_string(),
            outcome: cmp.outcome,
            similarity: cmp.similarity,
            room: msg.room.clone(),
            from: msg.sender.clone(),
            text: msg.text.clone(),
            timestamp_ms: msg.timestamp_ms,
            live: acts(live),
            shadow: acts(shadow),
            detail: cmp.detail,
            shadow_version: shadow_version.to_string(),
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// -- the board: what status and metrics read ------------------------------------

/// Which shadow runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowVersion {
    /// The shadow's manifest version.
    pub version: String,
    /// SHA-256 of its component, hex.
    pub hash: Option<String>,
    /// Its file.
    pub file: String,
}

#[derive(Debug, Default)]
struct BoardState {
    running: Option<ShadowVersion>,
    /// Whether the bot ever had a shadow (its counters are reported from then on).
    ever: bool,
    outcomes: [u64; Outcome::ALL.len()],
    recent: VecDeque<ShadowPair>,
    keep: usize,
    calls: u64,
    errors: u64,
    quarantined: bool,
}

/// A bot's shadow outcomes and last differing pairs, kept across shadow versions
/// (counters only grow). Read by `/metrics` and the status page.
#[derive(Debug, Default)]
pub struct ShadowBoard {
    state: Mutex<BoardState>,
}

/// A copy of a [`ShadowBoard`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BoardSnapshot {
    pub running: Option<ShadowVersion>,
    pub ever: bool,
    /// Counts by outcome, in [`Outcome::ALL`] order.
    pub outcomes: Vec<(Outcome, u64)>,
    /// The last pairs that were not `same`, newest first.
    pub recent: Vec<ShadowPair>,
    /// The shadow's calls, failed calls, and whether it is quarantined now.
    pub calls: u64,
    pub errors: u64,
    pub quarantined: bool,
}

impl BoardSnapshot {
    /// The count of one outcome.
    pub fn count(&self, o: Outcome) -> u64 {
        self.outcomes
            .iter()
            .find(|(k, _)| *k == o)
            .map_or(0, |(_, n)| *n)
    }
}

impl ShadowBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, BoardState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> BoardSnapshot {
        let s = self.lock();
        BoardSnapshot {
            running: s.running.clone(),
            ever: s.ever,
            outcomes: Outcome::ALL
                .iter()
                .map(|o| (*o, s.outcomes[o.index()]))
                .collect(),
            recent: s.recent.iter().rev().cloned().collect(),
            calls: s.calls,
            errors: s.errors,
            quarantined: s.quarantined,
        }
    }

    /// A shadow started (or was replaced).
    pub(crate) fn started(&self, version: ShadowVersion, keep: usize) {
        let mut s = self.lock();
        s.running = Some(version);
        s.ever = true;
        s.keep = keep.max(1);
        while s.recent.len() > s.keep {
            s.recent.pop_front();
        }
    }

    /// The bot has no shadow any more.
    pub fn stopped(&self) {
        self.lock().running = None;
    }

    pub(crate) fn count(&self, o: Outcome) {
        self.lock().outcomes[o.index()] += 1;
    }

    pub(crate) fn record(&self, pair: ShadowPair) {
        let mut s = self.lock();
        if s.recent.len() >= s.keep.max(1) {
            s.recent.pop_front();
        }
        s.recent.push_back(pair);
    }

    pub(crate) fn sandbox(&self, sandbox: &Sandbox) {
        let mut s = self.lock();
        s.calls = sandbox.stats().calls;
        s.errors = sandbox.stats().failures;
        s.quarantined = sandbox.quarantined_for().is_some();
    }
}
