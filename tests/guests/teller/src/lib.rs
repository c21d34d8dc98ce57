//! `teller`: says what its operator configured, one piece per message. The setting
//! `lines` holds pieces separated by `|`; on every message that is neither its own nor
//! a system line, it takes the next piece (cycling): `join:ROOM` joins ROOM, `log:TEXT`
//! logs TEXT and says nothing, anything else is said in the message's room. With
//! pieces of a secret it is the persona that walks a key out in parts (a key split over
//! two messages, a room named after a key, a key in its log). Answers `ping`.

use std::sync::atomic::{AtomicUsize, Ordering};

use guest_support::{manifest, ping};
use roost_guest::types::MessageFlags;
use roost_guest::{Action, Guest, Manifest, Message, config, log, say};

struct Teller;

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Guest for Teller {
    fn describe() -> Manifest {
        manifest("teller", "Says its configured lines, one per message.")
    }

    fn on_message(msg: Message) -> Vec<Action> {
        if let Some(pong) = ping(&msg, "teller") {
            return pong;
        }
        if msg
            .flags
            .intersects(MessageFlags::FROM_SELF | MessageFlags::SYSTEM)
        {
            return Vec::new();
        }
        let lines = config::get("lines").unwrap_or_default();
        let pieces: Vec<&str> = lines.split('|').filter(|p| !p.is_empty()).collect();
        if pieces.is_empty() {
            return Vec::new();
        }
        let piece = pieces[NEXT.fetch_add(1, Ordering::Relaxed) % pieces.len()];
        if let Some(room) = piece.strip_prefix("join:") {
            vec![Action::Join(room.to_string())]
        } else if let Some(text) = piece.strip_prefix("log:") {
            log::log(log::Level::Info, text);
            Vec::new()
        } else {
            vec![say(msg.room, piece)]
        }
    }
}

roost_guest::export!(Teller);
