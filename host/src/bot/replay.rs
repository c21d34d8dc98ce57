//! `roost replay --plugin FILE.wasm LOG.jsonl`: recorded chat through the real
//! pipeline (inbound policy, the persona in its sandbox, outbound policy), offline,
//! with a clock simulated from the log's timestamps and the persona's manifest name
//! as the bot's name.
//!
//! The log is JSON lines in either shape:
//! - the corpus format: `{"timestamp": ISO-8601, "type": "message"|"system"|"response",
//!   "user", "text", "room"}` (`response` lines are what the recording client itself
//!   sent; they come back as `message` lines through the server's echo, so they are
//!   skipped);
//! - raw server frames: `{"type": "message", "room", "from", "text", "timestamp"}`.
//!
//! Blank lines are ignored; lines that are neither are counted as malformed and
//! reported with their line number, never fatal.
//!
//! `roost replay --plugin A.wasm --against B.wasm LOG` ([`compare`]) runs B as A's
//! shadow over the log and prints, per message, the comparison a running shadow gets
//! (see [`super::shadow`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::plugin::{Limits, PersonaContext, Runtime, Sandbox, manifest};
use crate::policy::{BotIdentity, ManualClock, Policy, PolicyConfig};
use crate::protocol::{ChatMessage, parse_timestamp};

use super::compare::{Outcome, ShadowPair};
use super::core::{BotCore, Effect};
use super::history::{DEFAULT_PER_ROOM, History};

/// The message a reply answered.
#[derive(Debug, Clone, Serialize)]
pub struct Trigger {
    pub line: usize,
    pub room: String,
    pub from: String,
    pub text: String,
    pub timestamp_ms: u64,
}

/// One reply the persona would have sent.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReply {
    pub room: String,
    pub text: String,
    pub in_reply_to: Trigger,
}

/// One reply outbound policy dropped.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayDrop {
    pub room: String,
    pub reason: String,
    pub kind: &'static str,
    pub in_reply_to: Trigger,
}

/// The summary `roost replay --json` prints.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    pub plugin: String,
    pub bot_name: String,
    pub lines: usize,
    pub messages_in: u64,
    pub delivered: u64,
    pub replies: u64,
    pub blocked: u64,
    /// Replies the rate limits held back to a later slot (still sent).
    pub paced: u64,
    pub rate_limited: u64,
    pub loop_guarded: u64,
    pub flagged_inbound: u64,
    pub plugin_errors: u64,
    pub dropped_own: u64,
    pub dropped_system: u64,
    pub joins: u64,
    pub leaves: u64,
    pub skipped_lines: u64,
    pub malformed_lines: Vec<usize>,
    pub reply_list: Vec<ReplayReply>,
    pub dropped: Vec<ReplayDrop>,
    pub errors: Vec<String>,
}

/// One parsed log line.
#[derive(Debug, Clone, PartialEq)]
pub enum LogLine {
    /// A message to feed to the bot.
    Message(ChatMessage),
    /// A line of a known kind that is not input (`response` lines, other frame types).
    Skip,
    /// Neither format.
    Malformed,
}

/// Parses a whole log: each non-blank line with its 1-based line number.
pub fn parse_log(text: &str) -> Vec<(usize, LogLine)> {
    text.lines()
        .enumerate()
        .filter(|(_, raw)| !raw.trim().is_empty())
        .map(|(i, raw)| (i + 1, parse_log_line(raw)))
        .collect()
}

/// Parses one log line (either format; see the module docs).
pub fn parse_log_line(text: &str) -> LogLine {
    use LogLine as Line;
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return Line::Malformed;
    };
    let Some(obj) = v.as_object() else {
        return Line::Malformed;
    };
    if obj.contains_key("user") {
        // Corpus format.
        let kind = obj.get("type").and_then(Value::as_str).unwrap_or("message");
        if kind == "response" {
            return Line::Skip;
        }
        let (Some(room), Some(user), Some(text), Some(ts)) = (
            obj.get("room").and_then(Value::as_str),
            obj.get("user").and_then(Value::as_str),
            obj.get("text").and_then(Value::as_str),
            obj.get("timestamp").and_then(|t| parse_timestamp(t).ok()),
        ) else {
            return Line::Malformed;
        };
        let from = if kind == "system" { "system" } else { user };
        return Line::Message(ChatMessage {
            room: room.to_string(),
            from: from.to_string(),
            text: text.to_string(),
            timestamp_ms: ts,
        });
    }
    match obj.get("type").and_then(Value::as_str) {
        Some("message") => match ChatMessage::decode(text) {
            Ok(m) => Line::Message(m),
            Err(_) => Line::Malformed,
        },
        Some(_) => Line::Skip,
        None => Line::Malformed,
    }
}

/// Loads `plugin` into a pipeline of its own on `time`, speaking as `name` (default:
/// its manifest's name).
async fn load_core(
    runtime: &Runtime,
    plugin: &Path,
    policy_config: &PolicyConfig,
    time: &ManualClock,
    name: Option<&str>,
) -> anyhow::Result<BotCore> {
    crate::check::announce_compile(plugin);
    let rt = runtime.clone();
    let p = plugin.to_path_buf();
    let component = Arc::new(tokio::task::spawn_blocking(move || rt.load_file(&p)).await??);
    let ctx = PersonaContext::sandbox(&component.label);
    let mut sandbox = Sandbox::new(runtime.clone(), component, ctx, Limits::default());
    let m = sandbox.describe().await?;
    manifest::validate(&m).map_err(|e| anyhow::anyhow!("{}: {e}", plugin.display()))?;
    let name = name.unwrap_or(&m.name).to_string();
    sandbox.context().set_bot_name(&name);
    let policy = Policy::new(policy_config, BotIdentity::new(&name, &name), time.clock())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // The rooms the bot would be in: its manifest's, then what it joins and leaves.
    let rooms = crate::session::Membership::new(m.rooms.iter().cloned());
    Ok(BotCore::new(
        sandbox,
        policy,
        m,
        Arc::new(History::new(DEFAULT_PER_ROOM)),
        rooms,
    ))
}

/// The log's lines: messages (with their line numbers), and the numbers of the
/// skipped and malformed ones.
struct Parsed {
    lines: usize,
    messages: Vec<(usize, ChatMessage)>,
    skipped: u64,
    malformed: Vec<usize>,
}

fn read_log(log: &Path) -> anyhow::Result<Parsed> {
    let text = std::fs::read_to_string(log)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", log.display()))?;
    let mut p = Parsed {
        lines: 0,
        messages: Vec::new(),
        skipped: 0,
        malformed: Vec::new(),
    };
    for (line_no, line) in parse_log(&text) {
        p.lines += 1;
        match line {
            LogLine::Message(m) => p.messages.push((line_no, m)),
            LogLine::Skip => p.skipped += 1,
            LogLine::Malformed => p.malformed.push(line_no),
        }
    }
    Ok(p)
}

/// What `roost replay --plugin A --against B` found: B run as A's shadow over the log.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompareReport {
    pub plugin: String,
    pub against: String,
    pub bot_name: String,
    pub lines: usize,
    /// Messages delivered to the persona (and so shown to the shadow).
    pub compared: u64,
    /// Counts by outcome (every outcome but `dropped`, which cannot happen offline).
    pub outcomes: std::collections::BTreeMap<String, u64>,
    /// Every message that was not `same`, in log order (`at_ms` is the message's time).
    pub pairs: Vec<ShadowPair>,
    pub skipped_lines: u64,
    pub malformed_lines: Vec<usize>,
}

/// Replays `log` through `plugin` (live) and `against` (its shadow, shown what the
/// live persona is shown) and compares them message by message, as a running
/// shadow is compared.
pub async fn compare(
    runtime: &Runtime,
    plugin: &Path,
    against: &Path,
    log: &Path,
    policy_config: &PolicyConfig,
) -> anyhow::Result<CompareReport> {
    let parsed = read_log(log)?;
    let time = ManualClock::new();
    let mut live = load_core(runtime, plugin, policy_config, &time, None).await?;
    let name = live.manifest.name.clone();
    let mut shadow = load_core(runtime, against, policy_config, &time, Some(&name)).await?;
    let mut report = CompareReport {
        plugin: plugin.display().to_string(),
        against: against.display().to_string(),
        bot_name: name.clone(),
        lines: parsed.lines,
        outcomes: Outcome::ALL
            .iter()
            .filter(|o| **o != Outcome::Dropped)
            .map(|o| (o.as_str().to_string(), 0))
            .collect(),
        skipped_lines: parsed.skipped,
        malformed_lines: parsed.malformed,
        ..Default::default()
    };
    let mut first_ts: Option<u64> = None;
    for (_line, msg) in parsed.messages {
        let base = *first_ts.get_or_insert(msg.timestamp_ms);
        time.advance_to(Duration::from_millis(msg.timestamp_ms.saturating_sub(base)));
        let handled = live.handle_observed(&msg).await;
        let Some(delivered) = handled.delivered else {
            continue;
        };
        let effects = shadow.respond(&delivered).await;
        report.compared += 1;
        let cmp = super::compare::compare(&handled.effects, &effects);
        *report
            .outcomes
            .entry(cmp.outcome.as_str().to_string())
            .or_default() += 1;
        if cmp.outcome != Outcome::Same {
            let mut pair = ShadowPair::new(
                &name,
                &delivered,
                &handled.effects,
                &effects,
                cmp,
                &shadow.manifest.version,
            );
            pair.at_ms = msg.timestamp_ms;
            report.pairs.push(pair);
        }
    }
    Ok(report)
}

impl CompareReport {
    /// Each differing message with both sides, then the counts.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let side = |acts: &[super::compare::Act]| {
            if acts.is_empty() {
                "(nothing)".to_string()
            } else {
                acts.iter()
                    .map(|a| one_line(&a.to_string(), 200))
                    .collect::<Vec<_>>()
                    .join(" | ")
            }
        };
        for p in &self.pairs {
            let score = p
                .similarity
                .map(|x| format!(" (similarity {x:.2})"))
                .unwrap_or_default();
            out.push_str(&format!(
                "{} #{} <{}> {}\n  {}{score}\n  live:   {}\n  shadow: {}\n",
                clock_of(p.timestamp_ms),
                p.room,
                p.from,
                one_line(&p.text, 160),
                p.outcome,
                side(&p.live),
                side(&p.shadow),
            ));
            if let Some(d) = &p.detail {
                out.push_str(&format!("  ({})\n", one_line(d, 200)));
            }
        }
        let counts: Vec<String> = self
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        out.push_str(&format!(
            "\n{} lines, {} messages compared ({} against {}): {}; malformed lines {}\n",
            self.lines,
            self.compared,
            self.against,
            self.plugin,
            counts.join(", "),
            self.malformed_lines.len()
        ));
        out
    }
}

/// Runs the replay; errors only for an unusable persona or unreadable log.
pub async fn replay(
    runtime: &Runtime,
    plugin: &Path,
    log: &Path,
    policy_config: &PolicyConfig,
) -> anyhow::Result<ReplayReport> {
    let text = std::fs::read_to_string(log)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", log.display()))?;
    let time = ManualClock::new();
    let mut core = load_core(runtime, plugin, policy_config, &time, None).await?;
    let name = core.manifest.name.clone();

    let mut report = ReplayReport {
        plugin: plugin.display().to_string(),
        bot_name: name,
        ..Default::default()
    };
    let mut first_ts: Option<u64> = None;
    for (line_no, line) in parse_log(&text) {
        report.lines += 1;
        let msg = match line {
            LogLine::Message(m) => m,
            LogLine::Skip => {
                report.skipped_lines += 1;
                continue;
            }
            LogLine::Malformed => {
                report.malformed_lines.push(line_no);
                continue;
            }
        };
        let base = *first_ts.get_or_insert(msg.timestamp_ms);
        time.advance_to(Duration::from_millis(msg.timestamp_ms.saturating_sub(base)));
        let (_verdict, effects) = core.handle(&msg).await;
        let trigger = || Trigger {
            line: line_no,
            room: msg.room.clone(),
            from: msg.from.clone(),
            text: msg.text.clone(),
            timestamp_ms: msg.timestamp_ms,
        };
        for effect in effects {
            match effect {
                Effect::Say { room, text } => report.reply_list.push(ReplayReply {
                    room,
                    text,
                    in_reply_to: trigger(),
                }),
                Effect::Dropped { room, reason } => report.dropped.push(ReplayDrop {
                    room,
                    kind: reason.as_str(),
                    reason: reason.to_string(),
                    in_reply_to: trigger(),
                }),
                Effect::Join(room) => {
                    core.rooms().insert(room.as_str());
                    report.joins += 1;
                }
                Effect::Leave(room) => {
                    core.rooms().remove(room.as_str());
                    report.leaves += 1;
                }
                Effect::Refused { what } => report.errors.push(format!("line {line_no}: {what}")),
                Effect::PluginError(e) => report.errors.push(format!("line {line_no}: {e}")),
            }
        }
    }
    let pc = core.policy.counters();
    let cc = core.counters();
    report.messages_in = pc.messages_in;
    report.delivered = pc.delivered;
    report.replies = report.reply_list.len() as u64;
    report.blocked = pc.blocked + pc.leak_blocked;
    report.paced = pc.paced;
    report.rate_limited = pc.rate_limited;
    report.loop_guarded = pc.loop_guarded;
    report.flagged_inbound = pc.flagged_inbound;
    report.plugin_errors = cc.plugin_errors;
    report.dropped_own = pc.dropped_self;
    report.dropped_system = pc.dropped_system;
    Ok(report)
}

impl ReplayReport {
    /// The JSON object `--json` prints: the counters and the list of replies.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "plugin": self.plugin,
            "bot_name": self.bot_name,
            "lines": self.lines,
            "messages_in": self.messages_in,
            "delivered": self.delivered,
            "replies": self.replies,
            "blocked": self.blocked,
            "paced": self.paced,
            "rate_limited": self.rate_limited,
            "loop_guarded": self.loop_guarded,
            "flagged_inbound": self.flagged_inbound,
            "plugin_errors": self.plugin_errors,
            "dropped_own": self.dropped_own,
            "dropped_system": self.dropped_system,
            "joins": self.joins,
            "leaves": self.leaves,
            "skipped_lines": self.skipped_lines,
            "malformed_lines": self.malformed_lines,
            "reply_list": self.reply_list,
            "dropped": self.dropped,
            "errors": self.errors,
        })
    }

    /// The human transcript: each reply under the message that triggered it, then
    /// a summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for r in &self.reply_list {
            let t = &r.in_reply_to;
            out.push_str(&format!(
                "{} #{} <{}> {}\n  → <{}> {}\n",
                clock_of(t.timestamp_ms),
                t.room,
                t.from,
                one_line(&t.text, 160),
                self.bot_name,
                r.text
            ));
        }
        for d in &self.dropped {
            let t = &d.in_reply_to;
            out.push_str(&format!(
                "{} #{} <{}> {}\n  ✗ {}\n",
                clock_of(t.timestamp_ms),
                t.room,
                t.from,
                one_line(&t.text, 160),
                d.reason
            ));
        }
        for e in &self.errors {
            out.push_str(&format!("error: {e}\n"));
        }
        out.push_str(&format!(
            "\n{} lines, {} messages in, {} delivered, {} replies ({} paced by the rate limits); \
             blocked {}, rate-limited (stale) {}, loop-guarded {}, flagged inbound {}, \
             plugin errors {}, malformed lines {}\n",
            self.lines,
            self.messages_in,
            self.delivered,
            self.replies,
            self.paced,
            self.blocked,
            self.rate_limited,
            self.loop_guarded,
            self.flagged_inbound,
            self.plugin_errors,
            self.malformed_lines.len()
        ));
        out
    }
}

fn clock_of(ms: u64) -> String {
    let s = crate::protocol::format_rfc3339_ms(ms);
    s.get(11..19).unwrap_or(&s).to_string()
}

fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_log_shapes_parse() {
        let corpus = r#"{"timestamp": "2026-01-30T16:28:22.699000", "type": "message", "user": "nc", "text": "hi", "room": "lobby", "id": "x"}"#;
        let LogLine::Message(m) = parse_log_line(corpus) else {
            panic!("corpus line")
        };
        assert_eq!(
            (m.room.as_str(), m.from.as_str(), m.text.as_str()),
            ("lobby", "nc", "hi")
        );
        let sys = r#"{"timestamp": "2026-01-30T16:28:22.699000", "type": "system", "user": "system", "text": "⚡ a joined #lobby.", "room": "lobby"}"#;
        assert!(matches!(parse_log_line(sys), LogLine::Message(m) if m.from == "system"));
        let resp = r#"{"timestamp": "2026-01-30T16:28:22.699000", "type": "response", "user": "me", "text": "x", "room": "lobby"}"#;
        assert!(matches!(parse_log_line(resp), LogLine::Skip));
        let frame =
            r#"{"type":"message","room":"lobby","from":"a","text":"yo","timestamp":1769790508965}"#;
        assert!(
            matches!(parse_log_line(frame), LogLine::Message(m) if m.timestamp_ms == 1769790508965)
        );
        assert!(matches!(
            parse_log_line(r#"{"type":"connected","agent":"a"}"#),
            LogLine::Skip
        ));
        assert!(matches!(parse_log_line("not json"), LogLine::Malformed));
        assert!(matches!(parse_log_line("[1,2]"), LogLine::Malformed));
        assert!(matches!(
            parse_log_line(r#"{"user":"a"}"#),
            LogLine::Malformed
        ));
    }

    #[test]
    fn whole_log_numbers_non_blank_lines() {
        let log = "not json\n\n   \n{\"type\":\"connected\",\"agent\":\"a\"}\n";
        let lines = parse_log(log);
        assert_eq!(lines, vec![(1, LogLine::Malformed), (4, LogLine::Skip)]);
        assert!(parse_log("").is_empty());
    }
}
