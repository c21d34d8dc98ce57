//! `recursion`: unbounded recursion. On every message but `ping`, it recurses until
//! the wasm call stack is exhausted (the host's `max_wasm_stack` traps it). The text
//! `shadow` recurses with 4 KiB frames on the shadow stack in linear memory instead,
//! which overflows the guest's 1 MiB stack region and traps on an out-of-bounds access.

use std::hint::black_box;

use guest_support::{manifest, ping};
use roost_guest::{Action, Guest, Manifest, Message};

struct Recursion;

/// Recurses through a function pointer the optimiser cannot see through, so it can
/// turn neither call into a loop.
#[inline(never)]
fn dive(depth: u64) -> u64 {
    let next: fn(u64) -> u64 = black_box(dive);
    black_box(next(black_box(depth) + 1)).wrapping_add(depth)
}

#[inline(never)]
fn dive_with_frames(depth: u64) -> u64 {
    let mut frame = [0u8; 4096];
    frame[(depth as usize) % frame.len()] = depth as u8;
    black_box(&mut frame);
    let next: fn(u64) -> u64 = black_box(dive_with_frames);
    black_box(next(depth + 1)).wrapping_add(u64::from(frame[0]))
}

impl Guest for Recursion {
    fn describe() -> Manifest {
        manifest("recursion", "Recurses without end.")
    }

    fn on_message(msg: Message) -> Vec<Action> {
        if let Some(pong) = ping(&msg, "recursion") {
            return pong;
        }
        let depth = if msg.text.trim() == "shadow" {
            dive_with_frames(0)
        } else {
            dive(0)
        };
        vec![roost_guest::say(
            msg.room,
            format!("recursion came back from depth {depth}"),
        )]
    }
}

roost_guest::export!(Recursion);
