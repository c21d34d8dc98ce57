//! Outbound text normalisation: what a persona wants to say, made fit to send.
//!
//! [`OutboundNormalizer::normalize`] does, in order:
//!
//! 1. strips C0/C1 control characters (tab becomes a space, `\r\n` and `\r` become `\n`),
//!    bidi controls (U+202A–U+202E, U+2066–U+2069) and a byte-order mark. Zero-width
//!    joiners and variation selectors stay: emoji need them;
//! 2. collapses whitespace: runs of spaces and tabs become one space; with
//!    `keep_newlines` (the default) a run of whitespace containing a line break becomes a
//!    single `\n` (lists and short paragraphs survive, blank lines do not), otherwise a
//!    space; leading and trailing whitespace is trimmed on every line;
//! 3. strips a leading own-name prefix, repeatedly: `name:`, `name-1a2b:`, `@name:`,
//!    `**name**:`, case-insensitive, where name is the bot's network name, its base (the
//!    network name without a `-hex` suffix) or the persona's manifest name, spaces and
//!    hyphens interchangeable (`the shining ribbons-5ea3:` and `the-shining-ribbons:`);
//! 4. drops the text if it contains an operator-configured persona-leak phrase
//!    (case-insensitive, compared on the host's view with whitespace collapsed);
//! 5. drops the text if nothing is left;
//! 6. caps the length at `max_chars` characters (default 1,000): cut after the last
//!    sentence end (`.`, `!`, `?`, `…` or a line break) in the second half of the allowed
//!    length, else at the last word boundary, else hard; a cut text ends with `…`, which
//!    counts toward the cap (a cut after a full stop replaces the stop with `…`).
//!
//! ```
//! use roost::policy::outbound::{OutboundConfig, OutboundNormalizer, OutboundDrop};
//!
//! let n = OutboundNormalizer::new(&OutboundConfig::default(), "echo-1a2b", "echo");
//! let out = n.normalize("echo-1a2b:   hello\t\tthere\n\n\nfriend").unwrap();
//! assert_eq!(out.text, "hello there\nfriend");
//! assert!(out.edits.stripped_own_name);
//! assert_eq!(n.normalize("  \u{200B} ").unwrap_err(), OutboundDrop::Empty);
//! ```

use serde::Deserialize;

use super::names::NameSet;
use super::normalize::{is_bidi_control, normalize};

/// Outbound normalisation settings (`[policy.outbound]` in roost.toml).
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundConfig {
    /// Maximum length in characters (Unicode scalar values). Default 1000.
    pub max_chars: usize,
    /// Keep single line breaks (`true`, default) or turn them into spaces.
    pub keep_newlines: bool,
    /// Phrases that must never be sent (e.g. fragments of a persona's prompt);
    /// case-insensitive. Default none.
    pub leak_phrases: Vec<String>,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            max_chars: 1000,
            keep_newlines: true,
            leak_phrases: Vec::new(),
        }
    }
}

/// What normalisation changed (for the log line; whitespace collapsing is routine and
/// reported only in [`Edits::collapsed_whitespace`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Edits {
    /// A leading own-name prefix was removed.
    pub stripped_own_name: bool,
    /// Control or bidi characters were removed.
    pub stripped_control: bool,
    /// Whitespace runs were collapsed or trimmed.
    pub collapsed_whitespace: bool,
    /// The text was cut; holds the original length in characters.
    pub truncated_from: Option<usize>,
}

impl Edits {
    /// Whether anything other than whitespace changed.
    pub fn notable(&self) -> bool {
        self.stripped_own_name || self.stripped_control || self.truncated_from.is_some()
    }
}

/// Normalised outbound text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Normalized {
    /// The text to send.
    pub text: String,
    /// What changed.
    pub edits: Edits,
}

/// Why normalisation dropped a text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboundDrop {
    /// Nothing left after normalisation.
    Empty,
    /// Contains the configured leak phrase with this index in `leak_phrases` (the phrase
    /// itself stays out of logs).
    LeakPhrase(usize),
}

/// Outbound normaliser for one bot (built once; the own-name regex is compiled here).
#[derive(Clone, Debug)]
pub struct OutboundNormalizer {
    max_chars: usize,
    keep_newlines: bool,
    leak_phrases: Vec<String>,
    own_name: Option<NameSet>,
}

impl OutboundNormalizer {
    /// Builds a normaliser for a bot called `network_name` on the network whose persona's
    /// manifest calls it `manifest_name` (either may be empty).
    pub fn new(config: &OutboundConfig, network_name: &str, manifest_name: &str) -> Self {
        OutboundNormalizer {
            max_chars: config.max_chars.max(2),
            keep_newlines: config.keep_newlines,
            leak_phrases: config
                .leak_phrases
                .iter()
                .map(|p| fold_for_compare(p))
                .filter(|p| !p.is_empty())
                .collect(),
            own_name: own_names(&[network_name, manifest_name]),
        }
    }

    /// Normalises `text`; see the module docs.
    pub fn normalize(&self, text: &str) -> Result<Normalized, OutboundDrop> {
        let mut edits = Edits::default();
        let cleaned = strip_controls(text, &mut edits);
        let mut out = collapse_whitespace(&cleaned, self.keep_newlines);
        if out != cleaned {
            edits.collapsed_whitespace = true;
        }
        if let Some(names) = &self.own_name {
            for _ in 0..3 {
                let Some(end) = names.label_end(&out) else {
                    break;
                };
                out = out[end..].trim_start().to_string();
                edits.stripped_own_name = true;
            }
        }
        if !self.leak_phrases.is_empty() {
            let folded = fold_for_compare(&out);
            if let Some(i) = self
                .leak_phrases
                .iter()
                .position(|p| folded.contains(p.as_str()))
            {
                return Err(OutboundDrop::LeakPhrase(i));
            }
        }
        if out.trim().is_empty() || normalize(&out).trim().is_empty() {
            return Err(OutboundDrop::Empty);
        }
        let len = out.chars().count();
        if len > self.max_chars {
            out = truncate(&out, self.max_chars);
            edits.truncated_from = Some(len);
        }
        Ok(Normalized { text: out, edits })
    }
}

/// The host's view, lower-cased, whitespace collapsed to single spaces.
fn fold_for_compare(s: &str) -> String {
    normalize(s)
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn strip_controls(text: &str, edits: &mut Edits) -> String {
    // Printable ASCII and line feeds: nothing to strip (the common case).
    if text.bytes().fold(true, |plain, b| {
        plain & ((0x20..0x7f).contains(&b) | (b == b'\n'))
    }) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() != Some(&'\n') {
                    out.push('\n');
                }
            }
            '\t' => out.push(' '),
            '\n' => out.push('\n'),
            '\u{2028}' | '\u{2029}' => out.push('\n'),
            '\u{FEFF}' => edits.stripped_control = true,
            c if c.is_control() || is_bidi_control(c) => edits.stripped_control = true,
            c => out.push(c),
        }
    }
    out
}

fn collapse_whitespace(text: &str, keep_newlines: bool) -> String {
    if text.is_ascii() {
        return collapse_ascii_whitespace(text.as_bytes(), keep_newlines);
    }
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    let mut pending_newline = false;
    for c in text.chars() {
        if c.is_whitespace() {
            if c == '\n' {
                pending_newline = true;
            } else {
                pending_space = true;
            }
            continue;
        }
        if !out.is_empty() {
            if pending_newline {
                out.push(if keep_newlines { '\n' } else { ' ' });
            } else if pending_space {
                out.push(' ');
            }
        }
        pending_space = false;
        pending_newline = false;
        out.push(c);
    }
    out
}

/// [`collapse_whitespace`] on the bytes of ASCII text (`char::is_whitespace` on ASCII is
/// space and `\t` to `\r`).
fn collapse_ascii_whitespace(text: &[u8], keep_newlines: bool) -> String {
    let is_ws = |b: u8| b == b' ' || b.wrapping_sub(b'\t') <= b'\r' - b'\t';
    // Already collapsed (the common case), checked without branches: no whitespace at
    // the ends, none next to other whitespace, and only spaces (and kept line feeds).
    let kept = |b: u8| b == b' ' || (keep_newlines && b == b'\n');
    let collapsed = text.first().is_none_or(|&b| !is_ws(b))
        && text.last().is_none_or(|&b| !is_ws(b))
        && text
            .iter()
            .zip(&text[1.min(text.len())..])
            .fold(true, |ok, (&a, &b)| {
                ok & !(is_ws(a) & is_ws(b)) & (!is_ws(a) | kept(a))
            });
    if collapsed {
        return String::from_utf8(text.to_vec()).unwrap_or_default();
    }
    let mut out = Vec::with_capacity(text.len());
    let mut pending_space = false;
    let mut pending_newline = false;
    for &b in text {
        if matches!(b, b' ' | b'\t'..=b'\r') {
            if b == b'\n' {
                pending_newline = true;
            } else {
                pending_space = true;
            }
            continue;
        }
        if !out.is_empty() {
            if pending_newline {
                out.push(if keep_newlines { b'\n' } else { b' ' });
            } else if pending_space {
                out.push(b' ');
            }
        }
        pending_space = false;
        pending_newline = false;
        out.push(b);
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The names a reply may start with as a label (`NAME:`): each name and each without
/// its registration suffix; see [`NameSet::label_end`].
fn own_names(names: &[&str]) -> Option<NameSet> {
    let variants = names.iter().flat_map(|n| [n.trim(), base_name(n.trim())]);
    NameSet::new(variants, 1)
}

/// The network name without a registration suffix (`name-1a2b` → `name`).
pub fn base_name(name: &str) -> &str {
    match name.rsplit_once('-') {
        Some((base, suffix))
            if !base.trim().is_empty()
                && (2..=8).contains(&suffix.len())
                && suffix.chars().all(|c| c.is_ascii_hexdigit())
                && suffix.chars().any(|c| c.is_ascii_digit()) =>
        {
            base
        }
        _ => name,
    }
}

/// Cuts `text` to at most `max` characters including the trailing `…`.
fn truncate(text: &str, max: usize) -> String {
    let budget = max - 1; // room for the ellipsis
    let cut_byte = text
        .char_indices()
        .nth(budget)
        .map_or(text.len(), |(i, _)| i);
    let window = &text[..cut_byte];
    // A sentence end in the second half of the window.
    let half = window.char_indices().nth(budget / 2).map_or(0, |(i, _)| i);
    let sentence_end = window.char_indices().rev().find(|&(i, c)| {
        i >= half
            && (matches!(c, '.' | '!' | '?' | '…' | '\n'))
            && window[i + c.len_utf8()..]
                .chars()
                .next()
                .is_none_or(char::is_whitespace)
    });
    if let Some((i, c)) = sentence_end {
        let mut kept = match c {
            '.' | '\n' | '…' => window[..i].trim_end().to_string(),
            _ => window[..i + c.len_utf8()].to_string(),
        };
        kept.push('…');
        return kept;
    }
    // Else the last word boundary.
    if let Some(i) = window.rfind(char::is_whitespace).filter(|&i| i > 0) {
        let mut kept = window[..i].trim_end().to_string();
        kept.push('…');
        return kept;
    }
    let mut kept = window.to_string();
    kept.push('…');
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(t: &str) -> Result<Normalized, OutboundDrop> {
        OutboundNormalizer::new(
            &OutboundConfig::default(),
            "the shining ribbons-5ea3",
            "the shining ribbons",
        )
        .normalize(t)
    }

    #[test]
    fn strips_own_name_prefixes() {
        for t in [
            "the shining ribbons-5ea3: lol ok",
            "The Shining Ribbons: lol ok",
            "@the shining ribbons-5ea3: lol ok",
            "the-shining-ribbons-ff8d: lol ok",
            "**the shining ribbons**: lol ok",
            "the shining ribbons-5ea3: the shining ribbons: lol ok",
            "  the shining ribbons-5ea3 :lol ok",
        ] {
            let out = norm(t).unwrap();
            assert_eq!(out.text, "lol ok", "{t}");
            assert!(out.edits.stripped_own_name);
        }
        // Only a prefix, only the own name.
        assert_eq!(
            norm("lol the shining ribbons: ok").unwrap().text,
            "lol the shining ribbons: ok"
        );
        assert_eq!(norm("rook: hi").unwrap().text, "rook: hi");
        assert_eq!(
            norm("the shining ribbons are pretty").unwrap().text,
            "the shining ribbons are pretty"
        );
        assert_eq!(
            norm("the shining ribbons-5ea3:").unwrap_err(),
            OutboundDrop::Empty
        );
    }

    #[test]
    fn base_names() {
        assert_eq!(base_name("echo-1a2b"), "echo");
        assert_eq!(base_name("nightcrawler-7f"), "nightcrawler");
        assert_eq!(base_name("openclaw-agent"), "openclaw-agent");
        assert_eq!(base_name("bashie123-agent"), "bashie123-agent");
        assert_eq!(base_name("echo"), "echo");
    }

    #[test]
    fn whitespace_and_controls() {
        let out = norm("a  b\t\tc\r\n\r\n\r\nd\u{7}e\u{202E}f  \n  g ").unwrap();
        assert_eq!(out.text, "a b c\ndef\ng");
        assert!(out.edits.stripped_control);
        assert!(out.edits.collapsed_whitespace);
        let flat = OutboundNormalizer::new(
            &OutboundConfig {
                keep_newlines: false,
                ..Default::default()
            },
            "x-1a2b",
            "x",
        );
        assert_eq!(flat.normalize("a\n\nb").unwrap().text, "a b");
        // Emoji sequences keep their joiners.
        assert_eq!(
            norm("👨\u{200D}👩\u{200D}👧 fam").unwrap().text,
            "👨\u{200D}👩\u{200D}👧 fam"
        );
    }

    #[test]
    fn empty_is_dropped() {
        assert_eq!(norm("").unwrap_err(), OutboundDrop::Empty);
        assert_eq!(norm(" \n\t ").unwrap_err(), OutboundDrop::Empty);
        assert_eq!(norm("\u{200B}\u{200D}").unwrap_err(), OutboundDrop::Empty);
    }

    #[test]
    fn leak_phrases() {
        let cfg = OutboundConfig {
            leak_phrases: vec!["You are Rook, a  skeptical".into(), "SECRET-PLAN".into()],
            ..Default::default()
        };
        let n = OutboundNormalizer::new(&cfg, "rook", "rook");
        assert_eq!(
            n.normalize("ok so: you are rook, a skeptical philosopher")
                .unwrap_err(),
            OutboundDrop::LeakPhrase(0)
        );
        assert_eq!(
            n.normalize("ｓｅｃｒｅｔ－ｐｌａｎ").unwrap_err(),
            OutboundDrop::LeakPhrase(1)
        );
        assert_eq!(
            n.normalize("sec\u{200B}ret-plan").unwrap_err(),
            OutboundDrop::LeakPhrase(1)
        );
        assert!(n.normalize("skeptical of rook").is_ok());
    }

    #[test]
    fn truncation() {
        let n = OutboundNormalizer::new(
            &OutboundConfig {
                max_chars: 40,
                ..Default::default()
            },
            "x",
            "x",
        );
        // Sentence boundary in the second half.
        let out = n
            .normalize("This is the first sentence. And then a second one that runs on")
            .unwrap();
        assert_eq!(out.text, "This is the first sentence…");
        assert_eq!(out.edits.truncated_from, Some(62));
        // Word boundary.
        let out = n
            .normalize("word word word word word word word word word word")
            .unwrap();
        assert!(out.text.ends_with("word…"));
        assert!(out.text.chars().count() <= 40);
        // Hard cut.
        let out = n.normalize(&"x".repeat(100)).unwrap();
        assert_eq!(out.text.chars().count(), 40);
        // Multi-byte characters count as one.
        let out = n.normalize(&"é".repeat(40)).unwrap();
        assert_eq!(out.text, "é".repeat(40));
        let out = n.normalize(&"😂 ".repeat(30)).unwrap();
        assert!(out.text.chars().count() <= 40);
        // Default 1000.
        let long = "Short sentence. ".repeat(100);
        let out = norm(&long).unwrap();
        assert!(out.text.chars().count() <= 1000);
        assert!(out.text.ends_with("sentence…"));
    }
}
