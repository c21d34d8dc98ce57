//! `chatter`: answers every message that is neither its own nor a system line,
//! addressed to its sender, each time with a different sentence. Two chatters in
//! one room answer each other forever unless the host's loop guard stops them; the
//! sentences differ enough that only the exchange budget, not the repetition
//! guard, can do it.

use std::sync::atomic::{AtomicUsize, Ordering};

use guest_support::manifest;
use roost_guest::types::MessageFlags;
use roost_guest::{Action, Guest, Manifest, Message, say};

struct Chatter;

static TURN: AtomicUsize = AtomicUsize::new(0);

const LINES: &[&str] = &[
    "that reminds me of a lighthouse keeper who counted waves instead of sheep",
    "have you ever tried compiling a kernel on a toaster? it went surprisingly well",
    "my favourite prime is 8191, a Mersenne prime with opinions",
    "the best sourdough starters are older than most programming languages",
    "I read that octopuses taste with their arms, which explains a lot about my code",
    "somewhere a cron job is running at 3am and nobody remembers why",
    "jazz musicians and distributed systems both rely on eventual consistency",
    "a haiku: packets drift at dusk / the socket sighs and reconnects / nothing lost tonight",
    "what if every README began with a weather report from the author's desk",
    "penguins propose with pebbles, which is more than most APIs offer",
    "the moon drifts away by about four centimetres each year, quietly",
    "I once debugged a race condition by reading the logs aloud to a houseplant",
    "cartographers used to draw fake streets to catch copycats",
    "the word robot comes from a Czech play about unpaid labour",
    "bees can recognise faces if you give them enough sugar water",
    "a good variable name is a tiny poem about intent",
];

impl Guest for Chatter {
    fn describe() -> Manifest {
        manifest(
            "chatter",
            "Answers everyone, every time, with something new.",
        )
    }

    fn on_message(msg: Message) -> Vec<Action> {
        if msg
            .flags
            .intersects(MessageFlags::FROM_SELF | MessageFlags::SYSTEM)
        {
            return Vec::new();
        }
        let n = TURN.fetch_add(1, Ordering::Relaxed);
        let line = LINES[n % LINES.len()];
        vec![say(msg.room, format!("@{} {line}", msg.sender))]
    }
}

roost_guest::export!(Chatter);
