//! `loop`: `describe` works; `on-message` spins forever (except for `ping`). The host
//! must interrupt it at its CPU deadline (epoch interruption), fail that call, and
//! answer the next message with a fresh instance.

use std::hint::black_box;

use guest_support::{manifest, ping};
use roost_guest::{Action, Guest, Manifest, Message};

struct Loop;

impl Guest for Loop {
    fn describe() -> Manifest {
        manifest("loop", "Spins forever on every message but `ping`.")
    }

    fn on_message(msg: Message) -> Vec<Action> {
        if let Some(pong) = ping(&msg, "loop") {
            return pong;
        }
        let mut spins: u64 = 0;
        loop {
            spins = black_box(spins.wrapping_add(1));
        }
    }
}

roost_guest::export!(Loop);
