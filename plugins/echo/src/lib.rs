//! `echo`: the smallest useful persona. When mentioned (`@NAME` anywhere, or `NAME`
//! at the start followed by `:`, `,` or a space, NAME being this bot's name on the
//! network), it replies in the same room with the rest of the text, verbatim.
//!
//! It never answers its own messages or system lines, and says nothing when the
//! mention comes with no text.

use roost_guest::types::{Action, Manifest, Message, MessageFlags, Subscriptions};
use roost_guest::{Guest, config, mention_rest, say};

struct Echo;

impl Guest for Echo {
    fn describe() -> Manifest {
        Manifest {
            name: "echo".into(),
            description: "Mention me and I repeat what you said.".into(),
            rooms: vec!["lobby".into()],
            version: env!("CARGO_PKG_VERSION").into(),
            subscriptions: Subscriptions::empty(),
        }
    }

    fn on_message(msg: Message) -> Vec<Action> {
        if !msg.flags.contains(MessageFlags::MENTIONS_ME)
            || msg
                .flags
                .intersects(MessageFlags::FROM_SELF | MessageFlags::SYSTEM)
        {
            return Vec::new();
        }
        let me = config::bot_name();
        if msg.sender.eq_ignore_ascii_case(&me) {
            return Vec::new();
        }
        reply(&msg, &me).into_iter().collect()
    }
}

/// The echo of `msg` for a bot called `me`, if any (pure, so it is testable natively).
fn reply(msg: &Message, me: &str) -> Option<Action> {
    let rest = mention_rest(&msg.text, me)?;
    (!rest.is_empty()).then(|| say(msg.room.clone(), rest))
}

roost_guest::export!(Echo);

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(text: &str) -> Message {
        Message {
            room: "lobby".into(),
            sender: "bob".into(),
            text: text.into(),
            timestamp_ms: 0,
            flags: MessageFlags::MENTIONS_ME,
        }
    }

    #[test]
    fn echoes_the_rest() {
        assert_eq!(
            reply(&msg("@echo-1a2b hi there"), "echo-1a2b"),
            Some(say("lobby", "hi there"))
        );
        assert_eq!(reply(&msg("echo: hi"), "echo"), Some(say("lobby", "hi")));
    }

    #[test]
    fn silent_without_text_or_mention() {
        assert_eq!(reply(&msg("@echo"), "echo"), None);
        assert_eq!(reply(&msg("@echo   "), "echo"), None);
        assert_eq!(reply(&msg("hello"), "echo"), None);
    }
}
