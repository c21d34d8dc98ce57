//! `future-version`: a persona built against `roost:persona@0.2.0` (wit/ here is a copy
//! of the contract with only the version bumped). It is otherwise well-formed and calls
//! `config` and `log`, so the component imports `roost:persona/...@0.2.0`; a host that
//! serves only 0.1.x must refuse it at load, naming the version.

// The generated bindings lower an 8-argument `on-message` export.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({
    world: "persona",
    path: "wit",
});

use roost::persona::types::{Outgoing, Subscriptions};
use roost::persona::{config, log};

struct Future;

impl Guest for Future {
    fn describe() -> Manifest {
        log::log(log::Level::Info, "future-version describing itself");
        let _ = config::bot_name();
        Manifest {
            name: "future-version".into(),
            description: "Built against roost:persona@0.2.0.".into(),
            rooms: vec!["lobby".into()],
            version: env!("CARGO_PKG_VERSION").into(),
            subscriptions: Subscriptions::empty(),
        }
    }

    fn on_message(msg: Message) -> Vec<Action> {
        vec![Action::Say(Outgoing {
            room: msg.room,
            text: format!("future-version {} heard: {}", config::bot_name(), msg.text),
        })]
    }
}

export!(Future);
