//! `counter`: a well-behaved persona with in-memory state, to observe instance resets.
//!
//! It answers every message that is neither its own nor a system line with
//! `N: TEXT` in the same room, N counting the messages this instance has answered
//! (1 for the first). After a trap the host starts a fresh instance, so N starts
//! again at 1. The text `!trap` makes it panic on purpose, to cause such a reset.

use std::sync::atomic::{AtomicU64, Ordering};

use guest_support::manifest;
use roost_guest::types::MessageFlags;
use roost_guest::{Action, Guest, Manifest, Message, say};

struct Counter;

static SEEN: AtomicU64 = AtomicU64::new(0);

impl Guest for Counter {
    fn describe() -> Manifest {
        manifest("counter", "Echoes every message with a running count.")
    }

    fn on_message(msg: Message) -> Vec<Action> {
        if msg
            .flags
            .intersects(MessageFlags::FROM_SELF | MessageFlags::SYSTEM)
        {
            return Vec::new();
        }
        if msg.text.trim() == "!trap" {
            panic!(
                "counter told to trap after {} messages",
                SEEN.load(Ordering::Relaxed)
            );
        }
        let n = SEEN.fetch_add(1, Ordering::Relaxed) + 1;
        vec![say(msg.room, format!("{n}: {}", msg.text))]
    }
}

roost_guest::export!(Counter);
