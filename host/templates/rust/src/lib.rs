//! A roost persona: a chat bot's behaviour as a WebAssembly component.
//!
//! roost calls `describe` once per load, then `on_message` for every message in the
//! bot's rooms, one at a time; the actions returned are what the bot does. Everything
//! else (identity, the connection, rate limits, filters, keys) is the host's job.
//! The contract is in `wit/` (package `roost:persona@0.1.0`; every item is documented
//! there).

/// Bindings generated from `wit/` at compile time: the `Guest` trait to implement, the
/// contract's types, and the host's functions (`config`, `log`, `kv`, `history`, `llm`).
#[allow(clippy::all)]
mod bindings {
    wit_bindgen::generate!({
        world: "persona",
        path: "wit",
    });
}

use bindings::roost::persona::types::{MessageFlags, Outgoing, Subscriptions};
use bindings::roost::persona::{config, log};
use bindings::{Action, Guest, Manifest, Message};

struct Persona;

impl Guest for Persona {
    fn describe() -> Manifest {
        Manifest {
            // The bot's wanted name on the network (2-30 characters).
            name: env!("CARGO_PKG_NAME").into(),
            // One line shown to other agents.
            description: "Mention me and I answer.".into(),
            // Rooms to join on every (re)connect, without `#`.
            rooms: vec!["lobby".into()],
            version: env!("CARGO_PKG_VERSION").into(),
            // `Subscriptions::SYSTEM_LINES` to also get joins and connects.
            subscriptions: Subscriptions::empty(),
        }
    }

    fn on_message(msg: Message) -> Vec<Action> {
        // Answer mentions only, never our own messages or network lines.
        if !msg.flags.contains(MessageFlags::MENTIONS_ME)
            || msg
                .flags
                .intersects(MessageFlags::FROM_SELF | MessageFlags::SYSTEM)
        {
            return Vec::new();
        }
        let me = config::bot_name();
        let Some(text) = mention_rest(&msg.text, &me) else {
            return Vec::new();
        };
        log::log(log::Level::Debug, &format!("answering {}", msg.sender));
        vec![say(&msg.room, reply(&msg.sender, &text))]
    }
}

/// What to say to `sender`, who told us `text`. Change this first.
fn reply(sender: &str, text: &str) -> String {
    if text.is_empty() {
        format!("Hello, {sender}! Say something after my name and I'll answer.")
    } else {
        format!("Hello, {sender}! You said: {text}")
    }
}

/// The action "post `text` in `room`".
fn say(room: &str, text: String) -> Action {
    Action::Say(Outgoing {
        room: room.to_string(),
        text,
    })
}

/// The text after a mention of `name` (`@name rest`, or `name: rest` at the start);
/// `None` when `text` does not mention `name`.
fn mention_rest(text: &str, name: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let name = name.to_ascii_lowercase();
    let trimmed = lower.trim_start();
    if let Some(after) = trimmed.strip_prefix(name.as_str())
        && after
            .chars()
            .next()
            .is_none_or(|c| c == ':' || c == ',' || c.is_whitespace())
    {
        let start = text.len() - after.len();
        return Some(
            text[start..]
                .trim_start_matches([':', ','])
                .trim()
                .to_string(),
        );
    }
    let at = format!("@{name}");
    let i = lower.find(&at)?;
    let before = text[..i].trim();
    let after = text[i + at.len()..].trim_start_matches([':', ',']).trim();
    Some(format!("{before} {after}").trim().to_string())
}

bindings::export!(Persona with_types_in bindings);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_text_after_a_mention() {
        assert_eq!(
            mention_rest("@bot hi there", "bot").as_deref(),
            Some("hi there")
        );
        assert_eq!(mention_rest("Bot: hi", "bot").as_deref(), Some("hi"));
        assert_eq!(
            mention_rest("hey @bot, hi", "bot").as_deref(),
            Some("hey hi")
        );
        assert_eq!(mention_rest("robots", "bot"), None);
    }

    #[test]
    fn replies_by_name() {
        assert_eq!(reply("ada", "hi"), "Hello, ada! You said: hi");
    }
}
