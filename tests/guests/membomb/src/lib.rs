//! `membomb`: allocates until it dies. On every message but `ping`, it keeps 1 MiB
//! blocks (filled, so the pages are really touched) until an allocation fails, which
//! aborts (traps). The text `huge` asks for one 1 GiB block at once instead. The host's
//! memory limit (StoreLimits) must stop it without hurting anyone else.

use std::hint::black_box;
use std::sync::Mutex;

use guest_support::{manifest, ping};
use roost_guest::{Action, Guest, Manifest, Message};

struct MemBomb;

/// Kept forever, so nothing is freed and the optimiser cannot drop the allocations.
static HOARD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

const MIB: usize = 1 << 20;

impl Guest for MemBomb {
    fn describe() -> Manifest {
        manifest("membomb", "Allocates memory until it dies.")
    }

    fn on_message(msg: Message) -> Vec<Action> {
        if let Some(pong) = ping(&msg, "membomb") {
            return pong;
        }
        if msg.text.trim() == "huge" {
            let block = black_box(vec![0xA5u8; 1024 * MIB]);
            roost_guest::error!(
                "allocated 1 GiB ({} bytes): the limit did not hold",
                block.len()
            );
            HOARD.lock().unwrap().push(block);
            return vec![roost_guest::say(
                msg.room,
                "membomb survived a 1 GiB allocation",
            )];
        }
        let mut hoard = HOARD.lock().unwrap();
        loop {
            hoard.push(black_box(vec![0xA5u8; MIB]));
            if hoard.len().is_multiple_of(16) {
                roost_guest::debug!("membomb holds {} MiB", hoard.len());
            }
        }
    }
}

roost_guest::export!(MemBomb);
