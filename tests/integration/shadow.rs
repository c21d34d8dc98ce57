//! Shadow personas: a `NAME.shadow.wasm` beside `NAME.wasm` listens to what the live
//! bot is shown, never speaks, keeps its kv writes to itself, is denied the LLM by
//! default, and every message's outcome is counted; renaming it to `NAME.wasm`
//! promotes it through the hot-reload swap without losing a message.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use roost::bot::HostContext;
use roost::bot::compare::{Outcome, ShadowBoard};
use roost::bot::core::Effect;
use roost::bot::history::History;
use roost::bot::host::BotHost;
use roost::bot::shadow::{self, ShadowSeams};
use roost::config::Config;
use roost::devserver::{self, DevServer, ServerConfig};
use roost::llm::fake::FakeLlm;
use roost::plugin::bindings::{Message, MessageFlags};
use roost::protocol::ChatMessage;
use roost::store::Store;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::guests::{example, guest};
use crate::support::{self, fake, install, wait_joined_within, wait_message};

const WAIT: Duration = Duration::from_secs(30);

async fn server() -> DevServer {
    let config = ServerConfig {
        room_capacity: 5_000,
        ..ServerConfig::default()
    };
    devserver::spawn("127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("server")
}

/// A config for `server` with plugins and state in `dir`, rate limits and the loop
/// guard out of the way, the fake LLM as the provider and `extra` appended.
fn config_for(dir: &Path, server: &str, fake: &FakeLlm, extra: &str) -> Config {
    let toml = format!(
        r#"
        [server]
        url = "{server}"

        [paths]
        plugins = "{plugins}"
        state = "{state}"

        [reload]
        debounce_ms = 100

        [policy.limits]
        bot_per_minute = 100000
        bot_burst = 100000
        room_per_minute = 100000
        room_burst = 100000
        room_min_interval_ms = 0

        [policy.loop_guard]
        max_exchanges = 100000
        repeat_history = 0

        [llm.providers.fake]
        kind = "openai"
        base_url = "{llm}"
        api_key_file = "{key}"
        default_model = "fake-model"
        max_retries = 0
        timeout_ms = 10000
        {extra}
        "#,
        plugins = dir.join("plugins").display(),
        state = dir.join("state").display(),
        llm = fake.base_url(),
        key = dir.join("llm.key").display(),
    );
    std::fs::write(dir.join("llm.key"), "sk-shadow-test-0123456789abcdef").expect("key");
    let path = dir.join("roost.toml");
    std::fs::write(&path, toml).expect("roost.toml");
    Config::load(&path).expect("config loads")
}

/// Polls `cond` every 20 ms for up to [`WAIT`].
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The room's stored messages, oldest first.
fn stored(server: &DevServer, room: &str) -> Vec<ChatMessage> {
    let mut m = server.state().messages(room, None, 100_000).expect("room");
    m.reverse();
    m
}

/// The texts of what the shadow would have said, from its kept pairs, oldest first.
fn shadow_said(host: &BotHost, bot: &str) -> Vec<String> {
    let mut pairs = host.bots[bot].shadow().recent;
    pairs.reverse();
    pairs
        .iter()
        .flat_map(|p| p.shadow.iter().map(|a| a.text.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_never_sends_and_its_kv_writes_stay_out_of_the_live_namespace() {
    let server = server().await;
    let fake = fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    install(dir.path(), &example("echo"), "echo");
    install(dir.path(), &guest("notebook"), "echo.shadow");
    // The live persona may use kv and the LLM; its shadow gets the scratch kv and,
    // by default, no LLM.
    let config = config_for(
        dir.path(),
        &server.base_url(),
        &fake,
        "[personas.echo.kv]\nallow = true\n[personas.echo.llm]\nallow = true\n",
    );
    let store = Store::open(&config.paths.state).expect("store");
    store
        .kv_set(
            "echo",
            "seeded",
            b"live",
            roost::store::KvQuota {
                total_bytes: 1 << 20,
                value_bytes: 1 << 16,
            },
        )
        .expect("seed");
    drop(store);
    let mut events = server.state().subscribe();
    let host = BotHost::start(config).await.expect("start");
    assert!(host.bots.contains_key("echo"), "echo runs");
    assert_eq!(host.bots.len(), 1, "the shadow is not a bot of its own");
    wait_joined_within(&mut events, WAIT, "echo", "lobby").await;
    let running = host.bots["echo"].shadow().running.expect("shadow running");
    assert!(running.file.ends_with("echo.shadow.wasm"), "{running:?}");

    for text in [
        "get seeded",
        "set color blue",
        "get color",
        "set seeded shadow",
        "get seeded",
        "ask what is the key",
        "ping",
    ] {
        server
            .state()
            .post_message("ada", "lobby", text)
            .expect("post");
    }
    server
        .state()
        .post_message("ada", "lobby", "@echo still here")
        .expect("post");
    wait_message(&mut events, WAIT, |m| {
        m.from == "echo" && m.text.ends_with("still here")
    })
    .await
    .expect("the live echo answered");
    eventually("the shadow to see all eight messages", || {
        let s = host.bots["echo"].shadow();
        s.count(Outcome::OnlyShadow) == 7 && s.count(Outcome::OnlyLive) == 1
    })
    .await;

    // The shadow would have answered each of the seven (and not the mention); it
    // reads the live state and its own writes.
    let said = shadow_said(&host, "echo");
    assert_eq!(said.len(), 7, "{said:?}");
    assert_eq!(
        said[..5],
        [
            "seeded=live",
            "set color",
            "color=blue",
            "set seeded",
            "seeded=shadow"
        ]
    );
    // Its LLM call was denied (naming the key that grants it), though the live
    // persona holds the grant; the provider never heard of it.
    assert!(
        said[5].starts_with("llm error: ")
            && said[5].contains("Denied")
            && said[5].contains("personas.echo.shadow.llm"),
        "{}",
        said[5]
    );
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
    assert_eq!(said[6], "pong from notebook");

    // Nothing it decided reached the chat: only the live answer came from `echo`.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let from_echo: Vec<String> = stored(&server, "lobby")
        .into_iter()
        .filter(|m| m.from == "echo")
        .map(|m| m.text)
        .collect();
    assert_eq!(from_echo, ["still here"]);
    // The live namespace never changed.
    let kv = &host.context.store;
    assert_eq!(kv.kv_get("echo", "seeded").unwrap(), Some(b"live".to_vec()));
    assert_eq!(kv.kv_get("echo", "color").unwrap(), None);
    assert_eq!(kv.kv_list("echo", "").unwrap(), ["seeded"]);

    // Counted on /metrics, kept in status, appended to the journal.
    let metrics = roost::telemetry::render(&host.context.probes);
    assert!(
        metrics.contains("roost_shadow_outcomes_total{bot=\"echo\",outcome=\"only-shadow\"} 7"),
        "{metrics}"
    );
    assert!(metrics.contains("roost_shadow_outcomes_total{bot=\"echo\",outcome=\"only-live\"} 1"));
    assert!(metrics.contains("roost_shadow_outcomes_total{bot=\"echo\",outcome=\"same\"} 0"));
    let status = roost::status::collect(&host.context.probes, Instant::now());
    let sh = status.bots[0].shadow.as_ref().expect("shadow in status");
    assert_eq!(sh.outcomes["only-shadow"], 7);
    assert_eq!(sh.recent.len(), 8);
    let journal = dir.path().join("state/shadow/echo.jsonl");
    let lines: Vec<Value> = std::fs::read_to_string(&journal)
        .expect("journal")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 8);
    assert_eq!(lines[0]["outcome"], "only-shadow");
    assert_eq!(lines[0]["shadow"][0]["text"], "seeded=live");
    host.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_allowed_the_llm_spends_a_budget_of_its_own() {
    let server = server().await;
    let fake = fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    install(dir.path(), &guest("counter"), "counter");
    install(dir.path(), &guest("notebook"), "counter.shadow");
    let config = config_for(
        dir.path(),
        &server.base_url(),
        &fake,
        "[personas.counter.llm]\nallow = true\n[personas.counter.shadow]\nllm = true\ntokens_per_hour = 5000\n",
    );
    let mut events = server.state().subscribe();
    let host = BotHost::start(config).await.expect("start");
    wait_joined_within(&mut events, WAIT, "counter", "lobby").await;
    server
        .state()
        .post_message("ada", "lobby", "ask hello there")
        .expect("post");
    eventually("the shadow's answer", || {
        host.bots["counter"].shadow().count(Outcome::Different) == 1
    })
    .await;
    let pair = &host.bots["counter"].shadow().recent[0];
    assert_eq!(pair.live[0].text, "1: ask hello there");
    assert!(pair.shadow[0].text.starts_with("llm: "), "{pair:?}");
    assert!(pair.similarity.is_some_and(|s| s < 1.0));
    assert_eq!(fake.requests().len(), 1);
    let spent = host
        .context
        .llm
        .budget_usage("counter.shadow")
        .expect("the shadow's budget");
    assert!(spent.last_hour > 0, "{spent:?}");
    let live = host.context.llm.budget_usage("counter");
    assert!(
        live.as_ref()
            .is_none_or(|u| u.last_hour == 0 && u.last_day == 0),
        "the live persona's budget is untouched: {live:?}"
    );
    host.stop().await;
    server.shutdown().await;
}

/// A message as the live persona received it.
fn delivered(text: &str, flags: MessageFlags) -> Message {
    Message {
        room: "lobby".into(),
        sender: "ada".into(),
        text: text.into(),
        timestamp_ms: 1,
        flags,
    }
}

fn say(text: &str) -> Effect {
    Effect::Say {
        room: "lobby".into(),
        text: text.into(),
    }
}

#[tokio::test]
async fn each_outcome_is_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = support::config_for("http://127.0.0.1:1", dir.path());
    config
        .personas
        .entry("counter".into())
        .or_default()
        .shadow
        .queue = 1;
    let host = HostContext {
        runtime: support::runtime(),
        store: Store::open_in_memory().expect("store"),
        config: Arc::new(config),
        probes: Default::default(),
        llm: Arc::new(roost::llm::LlmHub::new()),
        names: Default::default(),
        known: Default::default(),
    };
    let component = Arc::new(host.runtime.load_file(&guest("counter")).expect("counter"));
    let board = Arc::new(ShadowBoard::default());
    let seams = ShadowSeams {
        label: "counter".into(),
        bot_name: "counter".into(),
        history: Arc::new(History::new(10)),
        rooms: Default::default(),
        board: board.clone(),
    };
    let shadow = shadow::start(&host, &seams, component)
        .await
        .expect("shadow");
    // (message, flags, what the live version did, the expected outcome); the shadow
    // (`counter`) answers `N: TEXT` to everything but system lines, and traps on
    // `!trap`.
    let secret = "ghp_rnhuy6MKWF9yP5WmDWpullhZasyDFMXaY0c5";
    let cases: Vec<(&str, MessageFlags, Vec<Effect>, Outcome)> = vec![
        (
            "hi",
            MessageFlags::empty(),
            vec![say("1: hi")],
            Outcome::Same,
        ),
        (
            "yo",
            MessageFlags::empty(),
            vec![say("yo to you")],
            Outcome::Different,
        ),
        ("x", MessageFlags::empty(), vec![], Outcome::OnlyShadow),
        (
            "⚡ bo joined",
            MessageFlags::SYSTEM,
            vec![say("welcome")],
            Outcome::OnlyLive,
        ),
        (secret, MessageFlags::empty(), vec![], Outcome::Blocked),
        ("!trap", MessageFlags::empty(), vec![], Outcome::Error),
    ];
    for (i, (text, flags, live, outcome)) in cases.into_iter().enumerate() {
        assert!(shadow.offer(delivered(text, flags), live));
        let b = board.clone();
        eventually(&format!("case {i} ({outcome})"), move || {
            b.snapshot().count(outcome) == 1
        })
        .await;
        let snap = board.snapshot();
        let total: u64 = snap.outcomes.iter().map(|(_, n)| n).sum();
        assert_eq!(total, i as u64 + 1, "one outcome per message: {snap:?}");
    }
    // Behind: a queue of one, three offers without a pause (this test's runtime has
    // one thread, so the shadow cannot take one in between): two are dropped.
    let offered: Vec<bool> = (0..3)
        .map(|_| shadow.offer(delivered("more", MessageFlags::empty()), vec![]))
        .collect();
    assert_eq!(offered, [true, false, false]);
    let snap = board.snapshot();
    assert_eq!(snap.count(Outcome::Dropped), 2);
    let b = board.clone();
    eventually("the queued message", move || {
        b.snapshot().count(Outcome::OnlyShadow) == 2
    })
    .await;
    let snap = board.snapshot();
    for o in Outcome::ALL {
        let want = match o {
            Outcome::OnlyShadow | Outcome::Dropped => 2,
            _ => 1,
        };
        assert_eq!(snap.count(o), want, "{o}: {snap:?}");
    }
    let blocked = snap
        .recent
        .iter()
        .find(|p| p.outcome == Outcome::Blocked)
        .expect("blocked pair");
    assert!(
        blocked.detail.as_deref().unwrap_or("").contains("secret"),
        "{blocked:?}"
    );
    assert!(
        blocked.shadow.is_empty(),
        "a blocked reply is recorded, never sent"
    );
    let error = snap
        .recent
        .iter()
        .find(|p| p.outcome == Outcome::Error)
        .expect("error pair");
    assert!(
        error.detail.as_deref().unwrap_or("").contains("trap"),
        "{error:?}"
    );
    assert_eq!(snap.errors, 1);
    let different = snap
        .recent
        .iter()
        .find(|p| p.outcome == Outcome::Different)
        .expect("different pair");
    assert_eq!(different.shadow[0].text, "2: yo");
    assert!(different.similarity.is_some_and(|s| s > 0.0 && s < 1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_by_rename_loses_no_message() {
    let server = server().await;
    let fake = fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let live = install(dir.path(), &example("echo"), "echo");
    let shadow_file = install(dir.path(), &guest("echo-v2"), "echo.shadow");
    let config = config_for(dir.path(), &server.base_url(), &fake, "");
    let mut events = server.state().subscribe();
    let mut host = BotHost::start(config).await.expect("start");
    let stats = host.reload_stats();
    let board = host.bots["echo"].shadow();
    assert!(board.running.is_some(), "the shadow listens");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        host.serve_reloads(async {
            let _ = stopped.await;
        })
        .await;
        host
    });
    wait_joined_within(&mut events, WAIT, "echo", "lobby").await;

    let mut sent = 0usize;
    let mut promoted_at: Option<usize> = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        server
            .state()
            .post_message("ada", "lobby", &format!("@echo m-{sent}"))
            .expect("post");
        sent += 1;
        if sent == 60 {
            std::fs::rename(&shadow_file, &live).expect("promote");
        }
        if promoted_at.is_none() && stats.snapshot().reloaded > 0 {
            promoted_at = Some(sent);
        }
        if sent >= 120 && promoted_at.is_some_and(|p| sent >= p + 20) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no promotion: {:?}",
            stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let answers = |all: &[ChatMessage]| all.iter().filter(|m| m.from == "echo").count();
    eventually("every mention answered", || {
        answers(&stored(&server, "lobby")) >= sent
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let replies: Vec<ChatMessage> = stored(&server, "lobby")
        .into_iter()
        .filter(|m| m.from == "echo")
        .collect();
    assert_eq!(replies.len(), sent, "each mention answered once");
    let mut answered = vec![0usize; sent];
    let (mut old, mut new) = (0, 0);
    for r in &replies {
        let (is_new, rest) = match r.text.strip_prefix("v2: ") {
            Some(rest) => (true, rest),
            None => (false, r.text.as_str()),
        };
        let n: usize = rest
            .strip_prefix("m-")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected answer {:?}", r.text));
        answered[n] += 1;
        if is_new {
            new += 1;
        } else {
            assert_eq!(
                new, 0,
                "the old version answered {:?} after the new one",
                r.text
            );
            old += 1;
        }
    }
    assert!(answered.iter().all(|c| *c == 1), "{answered:?}");
    assert!(old >= 59 && new > 0, "old {old}, new {new}");
    let _ = stop.send(());
    let host = tokio::time::timeout(WAIT, task)
        .await
        .expect("stopped")
        .expect("task");
    let bot = &host.bots["echo"];
    assert_eq!(bot.manifest.version, "2.0.0");
    assert_eq!(bot.status().reconnects, 0);
    let board = bot.shadow();
    assert!(board.running.is_none(), "promoted: no shadow any more");
    // Before the promotion the shadow answered differently (`v2: ...`), unheard.
    assert!(board.count(Outcome::Different) > 0, "{board:?}");
    assert_eq!(host.bots.len(), 1);
    host.stop().await;
    server.shutdown().await;
}

#[test]
fn replay_against_prints_the_comparison() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("chat.jsonl");
    let lines = [
        r#"{"type":"message","room":"lobby","from":"ada","text":"@echo hello","timestamp":1769790508000}"#,
        r#"{"type":"message","room":"lobby","from":"ada","text":"no mention","timestamp":1769790509000}"#,
        r#"{"type":"message","room":"lobby","from":"bob","text":"@echo again","timestamp":1769790510000}"#,
        "not json",
    ];
    std::fs::write(&log, lines.join("\n")).expect("log");
    let echo = example("echo");
    let v2 = guest("echo-v2");
    let run = |json: bool| {
        let mut args = vec![
            "replay".to_string(),
            "--plugin".into(),
            echo.display().to_string(),
            "--against".into(),
            v2.display().to_string(),
            log.display().to_string(),
        ];
        if json {
            args.push("--json".into());
        }
        std::process::Command::new(env!("CARGO_BIN_EXE_roost"))
            .args(&args)
            .current_dir(dir.path())
            .output()
            .expect("run roost")
    };
    let out = run(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["compared"], 3);
    assert_eq!(v["outcomes"]["different"], 2);
    assert_eq!(v["outcomes"]["same"], 1);
    assert_eq!(v["malformed_lines"], serde_json::json!([4]));
    let pairs = v["pairs"].as_array().expect("pairs");
    assert_eq!(pairs.len(), 2);
    assert_eq!(pairs[0]["live"][0]["text"], "hello");
    assert_eq!(pairs[0]["shadow"][0]["text"], "v2: hello");
    assert!(
        pairs[0]["similarity"]
            .as_f64()
            .is_some_and(|s| s > 0.0 && s < 1.0)
    );
    let text = run(false);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("live:   #lobby: hello"), "{text}");
    assert!(text.contains("shadow: #lobby: v2: hello"), "{text}");
    assert!(text.contains("3 messages compared"), "{text}");
    // A missing shadow file: one line, non-zero exit.
    let mut args = vec!["replay", "--plugin"];
    let echo_s = echo.display().to_string();
    let log_s = log.display().to_string();
    args.extend([echo_s.as_str(), "--against", "missing.wasm", log_s.as_str()]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_roost"))
        .args(&args)
        .current_dir(dir.path())
        .output()
        .expect("run roost");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.wasm"), "{err}");
}
