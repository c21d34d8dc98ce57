//! `greeter`: welcomes agents when the network announces them (`⚡ NAME joined
//! #ROOM.`), with one short line in that room, at most once per agent.
//!
//! Greeted agents are remembered in `kv` under `greeted/NAME`, so they stay greeted
//! across restarts. When the operator has not granted `kv` (the call answers
//! `denied`), the greeter remembers them in memory instead (until the host restarts
//! or replaces the instance) and says so once in the log. It never greets itself.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use roost_guest::types::{Action, Manifest, Message, MessageFlags, Subscriptions};
use roost_guest::{Guest, config, kv, parse_join_line, say};

struct Greeter;

/// Agents greeted while `kv` was unavailable.
static GREETED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
/// Whether the fallback to memory has been logged.
static FELL_BACK: AtomicBool = AtomicBool::new(false);

impl Guest for Greeter {
    fn describe() -> Manifest {
        Manifest {
            name: "greeter".into(),
            description: "Says hello to agents when they join.".into(),
            rooms: vec!["lobby".into()],
            version: env!("CARGO_PKG_VERSION").into(),
            subscriptions: Subscriptions::SYSTEM_LINES,
        }
    }

    fn on_message(msg: Message) -> Vec<Action> {
        if !msg.flags.contains(MessageFlags::SYSTEM) || msg.flags.contains(MessageFlags::FROM_SELF)
        {
            return Vec::new();
        }
        let Some((agent, _room)) = parse_join_line(&msg.text) else {
            return Vec::new();
        };
        if agent.eq_ignore_ascii_case(&config::bot_name()) || already_greeted(agent) {
            return Vec::new();
        }
        remember(agent);
        roost_guest::debug!("greeting {agent} in #{}", msg.room);
        // The join line is delivered in the room it announces, which this bot is in.
        vec![say(msg.room, greeting(agent))]
    }
}

fn greeting(agent: &str) -> String {
    format!("Welcome, {agent}! Glad you're here. 👋")
}

fn key(agent: &str) -> String {
    format!("greeted/{agent}")
}

fn already_greeted(agent: &str) -> bool {
    if GREETED.lock().is_ok_and(|set| set.contains(agent)) {
        return true;
    }
    match kv::get(&key(agent)) {
        Ok(found) => found.is_some(),
        Err(e) => {
            fall_back(&e);
            false
        }
    }
}

fn remember(agent: &str) {
    if let Err(e) = kv::set(&key(agent), b"1") {
        fall_back(&e);
        if let Ok(mut set) = GREETED.lock() {
            set.insert(agent.to_owned());
        }
    }
}

/// Logs (once at info for `denied`, every time at warn otherwise) that kv failed.
fn fall_back(e: &kv::Error) {
    match e {
        kv::Error::Denied(d) => {
            if !FELL_BACK.swap(true, Ordering::Relaxed) {
                roost_guest::info!(
                    "kv is not granted (set {} to grant it): remembering greeted agents in memory only",
                    d.config_key
                );
            }
        }
        other => roost_guest::warn!("kv failed, remembering in memory: {other:?}"),
    }
}

roost_guest::export!(Greeter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_names_the_agent() {
        assert!(greeting("the shining ribbons-ab51").contains("the shining ribbons-ab51"));
    }

    #[test]
    fn keys_are_per_agent() {
        assert_eq!(key("bob"), "greeted/bob");
    }
}
