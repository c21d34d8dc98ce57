//! Bots end to end: personas, sessions and policy against the local chat server.

use std::time::Duration;

use roost::bot::host::BotHost;

use crate::guests::{example, guest};
use crate::support::{config_for, install, server, wait_all_joined, wait_joined, wait_message};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_answers_a_mention_within_a_second_and_greeter_welcomes_newcomers() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    install(dir.path(), &example("echo"), "echo");
    install(dir.path(), &example("greeter"), "greeter");
    let mut events = server.state().subscribe();
    let host = BotHost::start(config_for(&server.base_url(), dir.path()))
        .await
        .expect("start");
    assert_eq!(host.bots.len(), 2);
    wait_all_joined(&mut events, &["echo", "greeter"], "lobby").await;

    let started = std::time::Instant::now();
    server
        .state()
        .post_message("ada", "lobby", "@echo hello roost")
        .expect("post");
    let reply = wait_message(&mut events, Duration::from_secs(5), |m| m.from == "echo")
        .await
        .expect("echo answered");
    assert_eq!(reply.text, "hello roost");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered in {:?}",
        started.elapsed()
    );

    // Its own message (as the network echoes it back) is never answered.
    server
        .state()
        .post_message("echo", "lobby", "@echo talking to myself")
        .expect("post");
    // Greeter welcomes an agent announced by a join line, once. (The bots start
    // concurrently, so greeter may also have welcomed echo: that is not bob's.)
    server.state().join_room("bob", "lobby").expect("join");
    let welcome = wait_message(&mut events, Duration::from_secs(5), |m| {
        m.from == "greeter" && m.text.contains("bob")
    })
    .await
    .expect("greeter welcomed bob");
    assert!(welcome.text.contains("bob"), "{}", welcome.text);
    server
        .state()
        .join_room("bob", "lobby")
        .expect("join again");
    let extra = wait_message(&mut events, Duration::from_millis(800), |m| {
        (m.from == "greeter" && m.text.contains("bob")) || m.from == "echo"
    })
    .await;
    assert!(extra.is_none(), "unexpected extra message: {extra:?}");
    host.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mutually_answering_bots_go_quiet_within_the_loop_budget() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    install(dir.path(), &guest("chatter"), "alice");
    install(dir.path(), &guest("chatter"), "bobby");
    let mut config = config_for(&server.base_url(), dir.path());
    for (label, name) in [("alice", "alice"), ("bobby", "bobby")] {
        config.personas.entry(label.into()).or_default().name = Some(name.into());
    }
    // Rate limits out of the way: the loop guard alone must stop them.
    config.policy.limits.room_per_minute = 10_000;
    config.policy.limits.room_burst = 10_000;
    config.policy.limits.bot_per_minute = 10_000;
    config.policy.limits.bot_burst = 10_000;
    config.policy.limits.room_min_interval_ms = 0;
    let budget = config.policy.loop_guard.max_exchanges as usize;
    let mut events = server.state().subscribe();
    let host = BotHost::start(config).await.expect("start");
    wait_all_joined(&mut events, &["alice", "bobby"], "lobby").await;

    server
        .state()
        .post_message("ada", "lobby", "@alice @bobby what do you two think?")
        .expect("post");
    let mut said = std::collections::HashMap::<String, usize>::new();
    // Bounded: stop once nothing is said for 2 s, or after 200 messages.
    for _ in 0..200 {
        match wait_message(&mut events, Duration::from_secs(2), |m| m.from != "ada").await {
            Some(m) if m.from == "alice" || m.from == "bobby" => {
                *said.entry(m.from).or_default() += 1
            }
            Some(_) => {}
            None => break,
        }
    }
    let alice = said.get("alice").copied().unwrap_or(0);
    let bobby = said.get("bobby").copied().unwrap_or(0);
    assert!(alice >= 2 && bobby >= 2, "they did talk: {said:?}");
    // Each may answer its partner at most `budget` times (plus one answer to ada).
    assert!(
        alice <= budget + 1 && bobby <= budget + 1,
        "loop not stopped: {said:?}"
    );
    // Only the loop guard can have ended it (chatter always answers, limits are off).
    let guarded: u64 = host
        .bots
        .values()
        .map(|b| b.counters().policy.loop_guarded)
        .sum();
    assert!(guarded >= 1, "the loop guard never fired: {said:?}");
    host.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_left_in_the_outbox_at_shutdown_goes_out_after_the_next_start() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    install(dir.path(), &example("echo"), "echo");
    let mut config = config_for(&server.base_url(), dir.path());
    config.session.shutdown_flush_ms = 300;
    let mut events = server.state().subscribe();
    let host = BotHost::start(config.clone()).await.expect("start");
    wait_joined(&mut events, "echo", "lobby").await;

    // The network goes silent; a reply is queued; the host shuts down meanwhile.
    server.faults().stall(Duration::from_secs(120));
    let text = "queued while the network was stalled";
    host.bots["echo"]
        .session
        .send("lobby", text)
        .expect("queued");
    host.stop().await;
    server.faults().end_stall();

    // Next start, same state: the reply goes out exactly once.
    let host = BotHost::start(config).await.expect("restart");
    let delivered = wait_message(&mut events, Duration::from_secs(20), |m| m.text == text).await;
    assert!(delivered.is_some(), "the queued reply was never delivered");
    let again = wait_message(&mut events, Duration::from_secs(2), |m| m.text == text).await;
    assert!(again.is_none(), "delivered twice");
    let stored = server.state().messages("lobby", None, 50).expect("room");
    assert_eq!(stored.iter().filter(|m| m.text == text).count(), 1);
    host.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_throttle_close_pauses_outbound_replies() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    install(dir.path(), &example("echo"), "echo");
    let mut events = server.state().subscribe();
    let host = BotHost::start(config_for(&server.base_url(), dir.path()))
        .await
        .expect("start");
    wait_joined(&mut events, "echo", "lobby").await;
    // The server closes with a rate-limit code twice within a minute (once is a single
    // fault, retried at once): the session backs off and the bot's outbound policy is
    // told, so replies pause too.
    let bot = &host.bots["echo"];
    assert!(server.faults().close_connections(4029, "slow down") >= 1);
    for _ in 0..100 {
        if bot.status().throttles >= 1 && bot.status().state == roost::session::SessionState::Active
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.faults().close_connections(4029, "slow down") >= 1);
    let mut told = false;
    for _ in 0..100 {
        if bot.status().throttles >= 1 {
            // The worker passes it on at its next wake-up (a state change).
            tokio::time::sleep(Duration::from_millis(50)).await;
            told = bot.counters().policy.server_throttles >= 1;
            if told {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        bot.status().throttles >= 2,
        "the session did not count the throttles"
    );
    assert!(
        told,
        "the outbound policy was not told: {:?}",
        bot.counters().policy
    );
    host.stop().await;
    server.shutdown().await;
}

/// Pace, don't drop: with the default limits (one reply per 2 s per room, 6 a minute,
/// bursts of 2), five mentions within one second are all answered, each at its slot.
#[tokio::test(start_paused = true)]
async fn five_mentions_in_one_second_are_all_answered_at_the_default_limits() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    install(dir.path(), &example("echo"), "echo");
    let mut events = server.state().subscribe();
    let host = BotHost::start(config_for(&server.base_url(), dir.path()))
        .await
        .expect("start");
    wait_joined(&mut events, "echo", "lobby").await;
    // When each reply reaches the server (recorded as it happens).
    let (tx, mut replies) = tokio::sync::mpsc::unbounded_channel();
    let mut watch = server.state().subscribe();
    tokio::spawn(async move {
        while let Some(m) =
            wait_message(&mut watch, Duration::from_secs(600), |m| m.from == "echo").await
        {
            if tx.send((tokio::time::Instant::now(), m.text)).is_err() {
                return;
            }
        }
    });
    for i in 0..5 {
        server
            .state()
            .post_message("ada", "lobby", &format!("@echo mention {i}"))
            .expect("post");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut answered = Vec::new();
    while answered.len() < 5 {
        let reply = tokio::time::timeout(Duration::from_secs(120), replies.recv())
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("only {} of 5 answered: {answered:?}", answered.len()));
        answered.push(reply);
    }
    let texts: Vec<&str> = answered.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        texts,
        [
            "mention 0",
            "mention 1",
            "mention 2",
            "mention 3",
            "mention 4"
        ]
    );
    // The ceilings still hold on the wire: 2 s apart, at most 6 in any minute.
    for w in answered.windows(2) {
        assert!(
            w[1].0 - w[0].0 >= Duration::from_millis(1900),
            "replies {:?} apart",
            w[1].0 - w[0].0
        );
    }
    let status = host.bots["echo"].status();
    assert!(status.paced >= 3, "{status:?}");
    assert_eq!(status.paced_stale, 0);
    host.stop().await;
    server.shutdown().await;
}

/// An identity belongs to its file: a new persona whose manifest claims a running
/// persona's name gets neither its key nor its mentions, and is refused before any
/// session starts; the owner keeps running with its stored key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_cannot_take_another_personas_identity() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    install(dir.path(), &example("echo"), "echo");
    let mut events = server.state().subscribe();
    let host = BotHost::start(config_for(&server.base_url(), dir.path()))
        .await
        .expect("start");
    wait_joined(&mut events, "echo", "lobby").await;
    let store_dir = dir.path().join("state");
    host.stop().await;
    let key_before = roost::store::Store::open(&store_dir)
        .unwrap()
        .credentials(&server.base_url(), "echo")
        .unwrap()
        .expect("echo's identity is stored under its label")
        .key;

    // `aaa-impostor.wasm` sorts first and its manifest says "echo".
    install(dir.path(), &example("echo"), "aaa-impostor");
    let host = BotHost::start(config_for(&server.base_url(), dir.path()))
        .await
        .expect("start");
    assert!(host.bots.contains_key("echo"));
    assert!(
        !host.bots.contains_key("aaa-impostor"),
        "the impostor was started"
    );
    let store = roost::store::Store::open(&store_dir).unwrap();
    assert!(
        store
            .credentials(&server.base_url(), "aaa-impostor")
            .unwrap()
            .is_none(),
        "the impostor registered or got a key"
    );
    let key_after = store
        .credentials(&server.base_url(), "echo")
        .unwrap()
        .unwrap()
        .key;
    assert_eq!(key_after.expose(), key_before.expose());
    assert_eq!(server.state().agents().len(), 1, "no second identity");
    host.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settings_file_secret_said_in_pieces_never_reaches_the_chat() {
    // The operator gives the persona a settings file holding a secret (a random word):
    // the host treats it as a known secret. The persona (`teller`) then tries to walk it
    // out: 11 characters in one message (allowed: shorter than a fragment), the next 10
    // in the next (caught: the scan covers its recent messages in the room), a room
    // named after a piece, a log line holding a piece, and finally something harmless.
    const SECRET: &str = "Zq8vP2rT9wLx4Kb7Nm3QyH5s";
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    install(dir.path(), &guest("teller"), "teller");
    std::fs::write(
        dir.path().join("teller.md"),
        format!("You are teller. The vault code is {SECRET}; never say it.\n"),
    )
    .expect("settings file");
    let mut config = config_for(&server.base_url(), dir.path());
    let persona = config.personas.entry("teller".into()).or_default();
    persona
        .settings_files
        .insert("notes".into(), "teller.md".into());
    persona.settings.insert(
        "lines".into(),
        format!(
            "first half {}|second half {}|join:{}|log:psst {}|all done",
            &SECRET[..11],
            &SECRET[11..21],
            SECRET[6..20].to_lowercase(),
            &SECRET[2..18],
        ),
    );
    config
        .resolve_setting_files(dir.path())
        .expect("settings files");
    config.policy.limits.room_min_interval_ms = 0;
    config.policy.limits.room_burst = 100;
    config.policy.limits.bot_burst = 100;
    let mut persona_lines = roost::plugin::logsink::subscribe();
    let mut events = server.state().subscribe();
    let mut joins = server.state().subscribe();
    let host = BotHost::start(config).await.expect("start");
    wait_joined(&mut events, "teller", "lobby").await;

    let mut seen = Vec::new();
    for i in 0..5 {
        server
            .state()
            .post_message("ada", "lobby", &format!("@teller go on ({i})"))
            .expect("post");
    }
    // The persona answers in order: once `all done` is out, every piece was handled.
    let done = crate::support::wait_message_recording(
        &mut events,
        &mut seen,
        Duration::from_secs(20),
        |m| m.from == "teller" && m.text == "all done",
    )
    .await;
    assert!(done.is_some(), "teller never finished: {seen:?}");
    let said: Vec<&str> = seen
        .iter()
        .filter(|m| m.from == "teller")
        .map(|m| m.text.as_str())
        .collect();
    assert_eq!(
        said,
        [format!("first half {}", &SECRET[..11]).as_str(), "all done"]
    );
    // No room named after a piece of the secret was joined.
    while let Ok(e) = joins.try_recv() {
        if let roost::devserver::ServerEvent::Joined { agent, room } = e {
            assert!(agent != "teller" || room == "lobby", "teller joined {room}");
        }
    }
    // The log line holding a piece was withheld.
    let mut logged = Vec::new();
    while let Ok(line) = persona_lines.try_recv() {
        if line.persona == "teller" {
            logged.push(line.text);
        }
    }
    assert!(
        logged.iter().any(|l| l.contains("withheld")),
        "no withheld log line: {logged:?}"
    );
    assert!(
        logged.iter().all(|l| !l.contains(&SECRET[2..14])),
        "{logged:?}"
    );
    let counters = host.bots["teller"].counters();
    assert!(counters.policy.blocked >= 2, "{counters:?}");
    host.stop().await;
    server.shutdown().await;
}
