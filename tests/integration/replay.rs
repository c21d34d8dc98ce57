//! `roost replay`: recorded chat through the real pipeline, offline (the fixtures, and
//! the recorded corpus when `ROOST_CORPUS` names it).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::fixtures::{fixtures, over_data, room, rooms};
use crate::guests::example;

/// `data`'s lobby.jsonl with every 4th message from another agent turned into a mention
/// of `echo` (some with an `echo:` prefix the reply must not repeat), plus lines from
/// `echo` itself that mention it (its own messages must never be answered), written
/// to `dir`.
fn derived_lobby(data: &Path, dir: &Path) -> (PathBuf, usize) {
    let text = std::fs::read_to_string(room(data, "lobby")).expect("read chat log");
    let mut out = String::new();
    let mut mentions = 0;
    let mut n = 0;
    for line in text.lines() {
        let mut v: Value = serde_json::from_str(line).expect("corpus line");
        if v["type"] == "message" {
            n += 1;
            if n % 4 == 0 {
                let original = v["text"].as_str().unwrap_or_default().to_string();
                let text = if n % 8 == 0 {
                    format!("@echo echo: {original}")
                } else {
                    format!("@echo {original}")
                };
                v["text"] = Value::String(text);
                mentions += 1;
            }
        }
        out.push_str(&v.to_string());
        out.push('\n');
        if n % 10 == 0 && v["type"] == "message" {
            let mut own = v.clone();
            own["user"] = Value::String("echo".into());
            own["text"] = Value::String("@echo I should never answer myself".into());
            out.push_str(&own.to_string());
            out.push('\n');
        }
    }
    out.push_str("this line is not json\n");
    let path = dir.join("lobby-mentions.jsonl");
    std::fs::write(&path, out).expect("write fixture");
    (path, mentions)
}

fn roost(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_roost"))
        .args(args)
        .output()
        .expect("run roost")
}

over_data!(lobby_through_echo:
    replaying_lobby_through_echo_gives_no_duplicates_and_no_own_name_prefixes,
    recorded_corpus_lobby_through_echo_gives_no_duplicates_and_no_own_name_prefixes);

fn lobby_through_echo(data: &Path) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, mentions) = derived_lobby(data, dir.path());
    let echo = example("echo");
    let out = roost(&[
        "replay",
        "--json",
        "--plugin",
        echo.to_str().unwrap(),
        log.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in [
        "messages_in",
        "replies",
        "blocked",
        "rate_limited",
        "loop_guarded",
        "flagged_inbound",
        "plugin_errors",
    ] {
        assert!(v[key].is_u64(), "summary lacks {key}: {v}");
    }
    assert_eq!(v["plugin_errors"], 0);
    assert_eq!(v["blocked"], 0);
    assert_eq!(v["malformed_lines"].as_array().map(Vec::len), Some(1));
    let replies = v["reply_list"].as_array().expect("reply_list");
    let dropped = v["dropped"].as_array().expect("dropped").len();
    // Every mention from another agent is answered or dropped by policy (rate limit,
    // loop guard), never silently lost.
    assert_eq!(replies.len() + dropped, mentions, "{v}");
    assert!(
        replies.len() >= mentions / 2,
        "most mentions answered: {} of {mentions}",
        replies.len()
    );
    let mut seen = std::collections::HashSet::new();
    for r in replies {
        let line = r["in_reply_to"]["line"].as_u64().expect("line");
        assert!(seen.insert(line), "two replies to line {line}");
        let text = r["text"].as_str().expect("text");
        assert!(
            !text.to_lowercase().starts_with("echo"),
            "own-name prefix: {text}"
        );
        assert_ne!(r["in_reply_to"]["from"], "echo", "answered itself: {r}");
    }
    assert!(
        v["dropped_own"].as_u64().unwrap_or(0) > 0,
        "own lines were in the log"
    );
}

#[test]
fn replay_prints_a_transcript_and_a_summary() {
    let echo = example("echo");
    let out = roost(&[
        "replay",
        "--plugin",
        echo.to_str().unwrap(),
        room(&fixtures(), "lobby").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("messages in"), "{stdout}");
    // Bad input: one line, non-zero exit.
    let out = roost(&[
        "replay",
        "--plugin",
        echo.to_str().unwrap(),
        "/nonexistent/log.jsonl",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

over_data!(every_room_through_greeter:
    every_room_replays_through_greeter_without_errors,
    recorded_corpus_replays_through_greeter_without_errors);

fn every_room_through_greeter(data: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(greet_every_room(data));
}

async fn greet_every_room(data: &Path) {
    let rt = roost::plugin::Runtime::new(Default::default()).expect("runtime");
    let mut greetings = 0;
    for name in rooms(data) {
        let report = roost::bot::replay::replay(
            &rt,
            &example("greeter"),
            &room(data, &name),
            &Default::default(),
        )
        .await
        .expect("replay");
        assert_eq!(report.plugin_errors, 0, "{name}: {:?}", report.errors);
        assert_eq!(report.blocked, 0, "{name}");
        assert!(
            report.malformed_lines.is_empty(),
            "{name}: {:?}",
            report.malformed_lines
        );
        // Greeter greets each joining agent at most once.
        greetings += report.reply_list.len();
        let mut greeted = std::collections::HashSet::new();
        for r in &report.reply_list {
            assert!(
                greeted.insert(r.text.clone()),
                "{name}: greeted twice: {}",
                r.text
            );
        }
    }
    assert!(greetings > 0, "agents joined, and nobody was greeted");
}
