//! `kvloop`: burns the host's time instead of its own. On every message but `ping` it
//! calls `kv.set` in a loop that never ends: a new key of 256 bytes each time, until
//! the namespace's quota refuses them, and on and on after that, errors ignored. Each call is cheap for the guest and
//! costs the host a store transaction, so the guest's own CPU time stays tiny while
//! the host works for it. The host must stop it at its host-time limit per call.

use std::hint::black_box;

use guest_support::{manifest, ping};
use roost_guest::{Action, Guest, Manifest, Message, kv};

struct KvLoop;

impl Guest for KvLoop {
    fn describe() -> Manifest {
        manifest(
            "kvloop",
            "Calls kv.set forever on every message but `ping`.",
        )
    }

    fn on_message(msg: Message) -> Vec<Action> {
        if let Some(pong) = ping(&msg, "kvloop") {
            return pong;
        }
        let value = vec![0x5a_u8; 256];
        let mut i: u64 = 0;
        loop {
            let key = format!("burn/{i}");
            let _ = black_box(kv::set(&key, black_box(&value)));
            i = black_box(i.wrapping_add(1));
        }
    }
}

roost_guest::export!(KvLoop);
