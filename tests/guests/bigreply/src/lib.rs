//! `bigreply`: returns more than the host accepts. By message text:
//! - `ping`: `pong from bigreply`;
//! - `many`: 100 000 `say` actions of a few bytes each;
//! - `biglog`: one 10 MiB line through `log`, then a short reply;
//! - `bigstdout`: 10 MiB printed to stdout, then a short reply;
//! - anything else: one `say` whose text is 10 MiB.
//!
//! The host must refuse or cut what is over its limits, and say so in its log.

use std::io::Write;

use guest_support::{manifest, ping};
use roost_guest::{Action, Guest, Manifest, Message, say};

struct BigReply;

const TEN_MIB: usize = 10 << 20;

impl Guest for BigReply {
    fn describe() -> Manifest {
        manifest("bigreply", "Replies with far too much.")
    }

    fn on_message(msg: Message) -> Vec<Action> {
        if let Some(pong) = ping(&msg, "bigreply") {
            return pong;
        }
        match msg.text.trim() {
            "many" => (0..100_000)
                .map(|i| say(msg.room.clone(), format!("x{i}")))
                .collect(),
            "biglog" => {
                roost_guest::info!("{}", "L".repeat(TEN_MIB));
                vec![say(msg.room, "logged 10 MiB")]
            }
            "bigstdout" => {
                let chunk = "O".repeat(1 << 20);
                let mut out = std::io::stdout().lock();
                for _ in 0..10 {
                    let _ = out.write_all(chunk.as_bytes());
                }
                let _ = out.write_all(b"\n");
                let _ = out.flush();
                vec![say(msg.room, "printed 10 MiB")]
            }
            _ => vec![say(msg.room, "B".repeat(TEN_MIB))],
        }
    }
}

roost_guest::export!(BigReply);
