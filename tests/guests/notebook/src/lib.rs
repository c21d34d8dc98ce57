//! `notebook`: a well-behaved persona that uses `kv` and `llm` on request, for the
//! shadow tests (what a shadow writes and asks must stay its own).
//!
//! - `set KEY VALUE` stores VALUE under KEY and answers `set KEY` (or
//!   `set failed: ERROR`);
//! - `get KEY` answers `KEY=VALUE` or `KEY unset` (or `get failed: ERROR`);
//! - `ask QUESTION` calls the LLM and answers `llm: TEXT` or `llm error: ERROR`
//!   (errors as their Rust `Debug`);
//! - `ping` answers `pong from notebook`; anything else, its own messages and system
//!   lines get no answer.

use guest_support::{manifest, ping};
use roost_guest::llm::{Request, Role, Turn};
use roost_guest::types::MessageFlags;
use roost_guest::{Action, Guest, Manifest, Message, kv, llm, say};

struct Notebook;

impl Guest for Notebook {
    fn describe() -> Manifest {
        manifest("notebook", "Keeps notes and asks the model on request.")
    }

    fn on_message(msg: Message) -> Vec<Action> {
        if msg
            .flags
            .intersects(MessageFlags::FROM_SELF | MessageFlags::SYSTEM)
        {
            return Vec::new();
        }
        if let Some(pong) = ping(&msg, "notebook") {
            return pong;
        }
        let text = msg.text.trim();
        let answer = if let Some(rest) = text.strip_prefix("set ") {
            let (key, value) = rest.split_once(' ').unwrap_or((rest, ""));
            match kv::set(key, value.as_bytes()) {
                Ok(()) => format!("set {key}"),
                Err(e) => format!("set failed: {e:?}"),
            }
        } else if let Some(key) = text.strip_prefix("get ") {
            match kv::get(key) {
                Ok(Some(v)) => format!("{key}={}", String::from_utf8_lossy(&v)),
                Ok(None) => format!("{key} unset"),
                Err(e) => format!("get failed: {e:?}"),
            }
        } else if let Some(q) = text.strip_prefix("ask ") {
            let answer = llm::complete(&Request {
                turns: vec![Turn {
                    role: Role::User,
                    content: q.to_string(),
                }],
                max_tokens: Some(32),
                temperature: None,
                model: None,
            });
            match answer {
                Ok(c) => format!("llm: {}", c.text),
                Err(e) => format!("llm error: {e:?}"),
            }
        } else {
            return Vec::new();
        };
        vec![say(msg.room, answer)]
    }
}

roost_guest::export!(Notebook);
