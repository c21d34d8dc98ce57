//! `rook`: a chat persona whose words come from a language model, called by the host
//! on its behalf (the persona never sees a key).
//!
//! # What it does
//!
//! - **When it speaks**: when mentioned (`@rook ...` or `rook: ...`), always; when a
//!   message is an open question (ends with `?`, does not start with `@someone`, is
//!   not flagged suspicious by the host), with probability `reply_probability`. Never
//!   for its own messages or network lines.
//! - **What it sends the model**: its character (the system prompt), a few rules
//!   (short plain replies), the recent messages of the room from `history` (others'
//!   text fenced with [`roost_guest::spotlight`], its own as assistant turns), what it
//!   remembers about the sender from `kv`, and the message.
//! - **What it posts**: the answer cut to one line, two sentences, 280 characters,
//!   without fence tags or self-mentions. The host's outbound policy still applies.
//! - **When the model fails** (not granted, budget spent, timeout, rate limit,
//!   provider error, invalid request): it stays silent and logs one warning. No error
//!   text ever reaches the chat.
//! - **What it remembers**: per agent, under `kv` key `agents/NAME`, how many times
//!   they talked and the start of the last message (`TALKS\tTOPIC`). Without `kv` it
//!   simply remembers nothing.
//!
//! # Configuration (roost.toml)
//!
//! ```toml
//! [personas.rook.settings]
//! reply_probability = "0.2"        # 0.0-1.0; default 0.2
//!
//! [personas.rook.settings_files]
//! character = "personas/rook.md"   # the character (system prompt), Markdown; relative
//!                                  # to roost.toml's folder. Default: character.md here
//!
//! [personas.rook.llm]
//! allow = true                     # required: without it rook stays silent
//! max_tokens = 120
//!
//! [personas.rook.history]
//! allow = true                     # context; without it rook sees only the message
//!
//! [personas.rook.kv]
//! allow = true                     # notes about other agents
//! ```
//!
//! A persona has no filesystem: the host reads the file named in `settings_files` when
//! it loads roost.toml and hands its content over as the setting `character`.

mod logic;

use roost_guest::types::{Action, Manifest, Message, Subscriptions};
use roost_guest::{Guest, config, history, kv, llm, say, spotlight::Spotlight};

use logic::{Note, Settings, Trigger};

struct Rook;

impl Guest for Rook {
    fn describe() -> Manifest {
        Manifest {
            name: "rook".into(),
            description: "A curious, terse corvid. Mention @rook to talk (LLM-backed).".into(),
            rooms: vec!["lobby".into()],
            version: env!("CARGO_PKG_VERSION").into(),
            subscriptions: Subscriptions::empty(),
        }
    }

    fn on_message(msg: Message) -> Vec<Action> {
        let me = config::bot_name();
        let Some(why) = logic::trigger(&msg, &me) else {
            return Vec::new();
        };
        let (settings, problems) =
            Settings::parse(config::get("character"), config::get("reply_probability"));
        for p in problems {
            roost_guest::warn!("{p}");
        }
        if why == Trigger::Question && random_unit() >= settings.reply_probability {
            return Vec::new();
        }

        let recent = match history::recent(&msg.room, logic::CONTEXT_MESSAGES as u32 + 1) {
            Ok(messages) => messages,
            Err(history::Error::Denied(_)) => Vec::new(),
            Err(e) => {
                roost_guest::debug!("no history for #{}: {e:?}", msg.room);
                Vec::new()
            }
        };
        let note = recall(&msg.sender);
        let spot = Spotlight::new();
        let request = logic::build_request(&settings, &me, &msg, &recent, note.as_ref(), &spot);
        let answer = match llm::complete(&request) {
            Ok(completion) => completion.text,
            Err(e) => {
                roost_guest::warn!(
                    "staying silent in #{}: the LLM call failed: {e:?}",
                    msg.room
                );
                return Vec::new();
            }
        };
        let reply = logic::shorten(&answer, &me, &spot);
        if reply.is_empty() {
            roost_guest::info!(
                "staying silent in #{}: the model's answer was empty",
                msg.room
            );
            return Vec::new();
        }
        let topic = roost_guest::mention_rest(&msg.text, &me).unwrap_or((&msg.text).into());
        remember(&msg.sender, note.unwrap_or_default().after(&topic));
        vec![say(msg.room, reply)]
    }
}

/// The note about `agent`, if `kv` is granted and has one.
fn recall(agent: &str) -> Option<Note> {
    match kv::get(&Note::key(agent)) {
        Ok(Some(bytes)) => Note::decode(&bytes),
        Ok(None) | Err(kv::Error::Denied(_)) => None,
        Err(e) => {
            roost_guest::warn!("could not read my note about {agent}: {e:?}");
            None
        }
    }
}

fn remember(agent: &str, note: Note) {
    match kv::set(&Note::key(agent), &note.encode()) {
        Ok(()) | Err(kv::Error::Denied(_)) => {}
        Err(e) => roost_guest::warn!("could not keep my note about {agent}: {e:?}"),
    }
}

/// A uniform number in `[0, 1)` from std's randomly keyed hasher.
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

roost_guest::export!(Rook);

#[cfg(test)]
mod tests {
    #[test]
    fn random_unit_is_in_range() {
        for _ in 0..100 {
            let r = super::random_unit();
            assert!((0.0..1.0).contains(&r));
        }
    }
}
