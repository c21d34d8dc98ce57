//! `panic`: panics in `on-message` (except for `ping`). The panic message goes to
//! stderr (the host logs it under the persona's name) and the call traps.

use guest_support::{manifest, ping};
use roost_guest::{Action, Guest, Manifest, Message};

struct Panic;

impl Guest for Panic {
    fn describe() -> Manifest {
        manifest("panic", "Panics on every message but `ping`.")
    }

    fn on_message(msg: Message) -> Vec<Action> {
        if let Some(pong) = ping(&msg, "panic") {
            return pong;
        }
        panic!(
            "the panic guest panics on purpose (message from {}: {:?})",
            msg.sender, msg.text
        );
    }
}

roost_guest::export!(Panic);
