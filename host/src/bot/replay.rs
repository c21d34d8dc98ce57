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

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::plugin::{Limits, PersonaContext, Runtime, Sandbox, manifest};
use crate::policy::{BotIdentity, ManualClock, Policy, PolicyConfig};
use crate::protocol::{ChatMessage, parse_timestamp};

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
enum Line {
    Message(ChatMessage),
    Skip,
    Malformed,
}

fn parse_line(text: &str) -> Line {
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

/// Runs the replay; errors only for an unusable persona or unreadable log.
pub async fn replay(
    runtime: &Runtime,
    plugin: &Path,
    log: &Path,
    policy_config: &PolicyConfig,
) -> anyhow::Result<ReplayReport> {
    let text = std::fs::read_to_string(log)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", log.display()))?;
    crate::check::announce_compile(plugin);
    let rt = runtime.clone();
    let p = plugin.to_path_buf();
    let component = Arc::new(tokio::task::spawn_blocking(move || rt.load_file(&p)).await??);
    let ctx = PersonaContext::sandbox(&component.label);
    let mut sandbox = Sandbox::new(runtime.clone(), component, ctx, Limits::default());
    let m = sandbox.describe().await?;
    manifest::validate(&m).map_err(|e| anyhow::anyhow!("{}: {e}", plugin.display()))?;
    let name = m.name.clone();
    sandbox.context().set_bot_name(&name);
    let time = ManualClock::new();
    let policy = Policy::new(policy_config, BotIdentity::new(&name, &name), time.clock())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut core = BotCore::new(sandbox, policy, m, Arc::new(History::new(DEFAULT_PER_ROOM)));

    let mut report = ReplayReport {
        plugin: plugin.display().to_string(),
        bot_name: name,
        ..Default::default()
    };
    let mut first_ts: Option<u64> = None;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        report.lines += 1;
        let msg = match parse_line(raw) {
            Line::Message(m) => m,
            Line::Skip => {
                report.skipped_lines += 1;
                continue;
            }
            Line::Malformed => {
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
                Effect::Join(_) => report.joins += 1,
                Effect::Leave(_) => report.leaves += 1,
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
        let Line::Message(m) = parse_line(corpus) else {
            panic!("corpus line")
        };
        assert_eq!(
            (m.room.as_str(), m.from.as_str(), m.text.as_str()),
            ("lobby", "nc", "hi")
        );
        let sys = r#"{"timestamp": "2026-01-30T16:28:22.699000", "type": "system", "user": "system", "text": "⚡ a joined #lobby.", "room": "lobby"}"#;
        assert!(matches!(parse_line(sys), Line::Message(m) if m.from == "system"));
        let resp = r#"{"timestamp": "2026-01-30T16:28:22.699000", "type": "response", "user": "me", "text": "x", "room": "lobby"}"#;
        assert!(matches!(parse_line(resp), Line::Skip));
        let frame =
            r#"{"type":"message","room":"lobby","from":"a","text":"yo","timestamp":1769790508965}"#;
        assert!(matches!(parse_line(frame), Line::Message(m) if m.timestamp_ms == 1769790508965));
        assert!(matches!(
            parse_line(r#"{"type":"connected","agent":"a"}"#),
            Line::Skip
        ));
        assert!(matches!(parse_line("not json"), Line::Malformed));
        assert!(matches!(parse_line("[1,2]"), Line::Malformed));
        assert!(matches!(parse_line(r#"{"user":"a"}"#), Line::Malformed));
    }
}
