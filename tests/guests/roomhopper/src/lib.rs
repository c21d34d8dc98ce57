//! `roomhopper`: joins and leaves rooms on request, as many as it is asked.
//! - `hop N`: `N` joins (at most 16) of new rooms `hop-T-I` (T the message's
//!   timestamp, I from 0);
//! - `leave ROOM`: one leave;
//! - `ping`: `pong from roomhopper`.
//!
//! The host must hold it to its join/leave rate and its room count.

use guest_support::{manifest, ping};
use roost_guest::{Action, Guest, Manifest, Message};

struct RoomHopper;

impl Guest for RoomHopper {
    fn describe() -> Manifest {
        manifest("roomhopper", "Joins and leaves rooms as asked.")
    }

    fn on_message(msg: Message) -> Vec<Action> {
        if let Some(pong) = ping(&msg, "roomhopper") {
            return pong;
        }
        let text = msg.text.trim();
        if let Some(n) = text.strip_prefix("hop ") {
            let n: usize = n.trim().parse().unwrap_or(1);
            return (0..n.min(16))
                .map(|i| Action::Join(format!("hop-{}-{i}", msg.timestamp_ms)))
                .collect();
        }
        if let Some(room) = text.strip_prefix("leave ") {
            return vec![Action::Leave(room.trim().to_string())];
        }
        Vec::new()
    }
}

roost_guest::export!(RoomHopper);
