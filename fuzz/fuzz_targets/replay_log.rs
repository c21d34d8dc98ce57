//! The replay log parser (host/src/bot/replay.rs): one JSON line per message, in the
//! recorded-corpus format or the wire `message` frame format.
//!
//! Oracles: no panic; every line is classified; the report renders.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost::bot::replay::{LogLine, parse_log};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let lines = parse_log(&text);
    let non_blank = text.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(lines.len(), non_blank);
    let mut last = 0;
    for (line_no, line) in &lines {
        assert!(*line_no > last, "line numbers ascend");
        last = *line_no;
        if let LogLine::Message(m) = line {
            // A parsed message is one the wire decoder or the corpus format accepts.
            let _ = m.to_frame_json();
        }
    }
});
