//! `echo-v2`: a changed `echo`, for hot-reload tests. Same manifest name (`echo`),
//! same rule for when to answer, but every answer starts with `v2: `, so a test can
//! tell which version answered a message, and it is in one more room (`lobby` and
//! `builders`).

use roost_guest::types::{Action, Manifest, Message, MessageFlags, Subscriptions};
use roost_guest::{Guest, config, mention_rest, say};

struct EchoV2;

impl Guest for EchoV2 {
    fn describe() -> Manifest {
        Manifest {
            name: "echo".into(),
            description: "Mention me and I repeat what you said (version 2).".into(),
            rooms: vec!["lobby".into(), "builders".into()],
            version: "2.0.0".into(),
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
        match mention_rest(&msg.text, &me) {
            Some(rest) if !rest.is_empty() => vec![say(msg.room.clone(), format!("v2: {rest}"))],
            _ => Vec::new(),
        }
    }
}

roost_guest::export!(EchoV2);
