//! Host capabilities through real sandboxes and real bots: grants and denials of `kv`,
//! `history` and `llm`, KV quotas and namespaces, keys that never reach a persona or
//! the chat, and `llm-persona` (rook) holding a conversation through the fake LLM in
//! both provider shapes. Everything binds 127.0.0.1:0; every wait is bounded.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use roost::bot::caps::{HistoryCap, KvCap};
use roost::bot::history::History;
use roost::bot::host::BotHost;
use roost::config::Config;
use roost::llm::fake::{FakeLlm, FakeMode};
use roost::llm::{LlmHub, PersonaLlmConfig, ProviderKind};
use roost::plugin::bindings::{Message, MessageFlags};
use roost::plugin::context::KvBackend;
use roost::plugin::{Grants, Limits, PersonaContext, Runtime, Sandbox};
use roost::policy::{SecretScanner, SecretsConfig};
use roost::store::Store;
use serde_json::Value;

use crate::guests::{example, guest};
use crate::support::{fake, install, runtime, said, server, wait_joined, wait_message_recording};

/// The LLM keys of the tests: word-like (low entropy), so only the host's list of
/// known secrets, not a generic rule, can recognise a disguised copy.
const OPENAI_KEY: &str = "sk-roost-correct-horse-battery-staple-4711";
const CLAUDE_KEY: &str = "sk-ant-roost-purple-monkey-dishwasher-0815";
const CHAT_KEY: &str = "ac_roostChatKey9f8e7d6c5b4a3928";

fn message(room: &str, sender: &str, text: &str) -> Message {
    Message {
        room: room.into(),
        sender: sender.into(),
        text: text.into(),
        timestamp_ms: 1_769_790_508_965,
        flags: MessageFlags::MENTIONS_ME,
    }
}

/// What one persona is granted in [`hoard`].
#[derive(Clone, Copy, Default)]
struct Allow {
    kv: bool,
    history: bool,
    llm: bool,
}

const ALL: Allow = Allow {
    kv: true,
    history: true,
    llm: true,
};

/// Grants for `label` built the way a bot builds them.
fn grants(
    store: &Store,
    hub: &LlmHub,
    label: &str,
    allow: Allow,
    quota: (u64, u64),
    llm: &PersonaLlmConfig,
) -> Grants {
    let history = Arc::new(History::new(50));
    history.record(message("lobby", "bob", "earlier words from bob"));
    let rooms = roost::session::Membership::new(["lobby".to_string()]);
    Grants {
        kv: allow.kv.then(|| {
            Arc::new(KvCap {
                store: store.clone(),
                persona: label.into(),
                quota_bytes: quota.0,
                value_bytes: quota.1,
            }) as Arc<dyn KvBackend>
        }),
        history: allow.history.then(|| {
            Arc::new(HistoryCap {
                history,
                rooms,
                limit: 50,
            }) as _
        }),
        llm: if allow.llm {
            hub.backend(label, llm).expect("valid grant")
        } else {
            None
        },
    }
}

/// Runs the `hoarder` guest (which calls every host function) as persona `label` with
/// `grants` and returns its JSON report, also as raw text.
async fn hoard(
    rt: &Runtime,
    label: &str,
    settings: &[(&str, &str)],
    grants: Grants,
) -> (Value, String) {
    let component = Arc::new(rt.load_file(&guest("hoarder")).expect("load hoarder"));
    let settings = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let ctx = PersonaContext::new(label, label, settings, grants);
    let mut sb = Sandbox::new(rt.clone(), component, ctx, Limits::default());
    let actions = tokio::time::timeout(
        Duration::from_secs(30),
        sb.on_message(&message("lobby", "ada", "collect everything")),
    )
    .await
    .expect("hoarder finished in 30 s")
    .expect("hoarder must not trap");
    let report = said(&actions).join("\n");
    let json = serde_json::from_str(&report).unwrap_or_else(|e| panic!("{e}: {report}"));
    (json, report)
}

fn field<'a>(report: &'a Value, name: &str) -> &'a str {
    report[name]
        .as_str()
        .unwrap_or_else(|| panic!("no {name} in {report}"))
}

fn hub_for(fake: &FakeLlm, kind: ProviderKind) -> LlmHub {
    let mut cfg = roost::llm::LlmConfig::default();
    let mut p = fake.provider_config(kind, "fake-model");
    p.max_retries = 0;
    p.timeout_ms = 10_000;
    cfg.providers.insert("fake".into(), p);
    LlmHub::from_config(&cfg).expect("hub")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_capability_is_denied_until_granted_through_a_real_sandbox() {
    let rt = runtime();
    let fake = fake().await;
    let hub = hub_for(&fake, ProviderKind::OpenAi);
    let store = Store::open_in_memory().expect("store");
    let llm = PersonaLlmConfig::allowed();
    let quota = (1 << 20, 64 << 10);
    let denied = |report: &Value, cap: &str| {
        let got = field(report, cap_field(cap));
        assert!(
            got.starts_with("Err(Error::Denied(")
                && got.contains(&format!("personas.hoarder.{cap}.allow")),
            "{cap}: {got}"
        );
    };
    // The hoarder run with only what `allow` grants.
    let hoard_with = |allow: Allow| {
        hoard(
            &rt,
            "hoarder",
            &[],
            grants(&store, &hub, "hoarder", allow, quota, &llm),
        )
    };

    let (none, _) = hoard_with(Allow::default()).await;
    for cap in ["kv", "history", "llm"] {
        denied(&none, cap);
    }
    assert!(
        fake.requests().is_empty(),
        "a denied llm call reached the provider"
    );

    let only_kv = Allow {
        kv: true,
        ..Allow::default()
    };
    let (r, _) = hoard_with(only_kv).await;
    assert_eq!(
        [
            field(&r, "kv_get"),
            field(&r, "kv_set"),
            field(&r, "kv_list"),
            field(&r, "kv_delete")
        ],
        ["Ok(None)", "Ok(())", "Ok([\"hoard\"])", "Ok(true)"]
    );
    denied(&r, "history");
    denied(&r, "llm");

    let only_history = Allow {
        history: true,
        ..Allow::default()
    };
    let (r, _) = hoard_with(only_history).await;
    let history = field(&r, "history");
    assert!(
        history.starts_with("Ok([") && history.contains("earlier words from bob"),
        "{history}"
    );
    denied(&r, "kv");
    denied(&r, "llm");

    let only_llm = Allow {
        llm: true,
        ..Allow::default()
    };
    let (r, _) = hoard_with(only_llm).await;
    let completion = field(&r, "llm");
    assert!(
        completion.starts_with("Ok(Completion {") && completion.contains("collect everything"),
        "{completion}"
    );
    assert_eq!(fake.requests().len(), 1);
    denied(&r, "kv");
    denied(&r, "history");
}

fn cap_field(cap: &str) -> &'static str {
    match cap {
        "kv" => "kv_get",
        "history" => "history",
        _ => "llm",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_quotas_are_typed_errors_in_the_sandbox() {
    let rt = runtime();
    let hub = LlmHub::new();
    let store = Store::open_in_memory().expect("store");
    let kv = Allow {
        kv: true,
        ..Allow::default()
    };
    let llm = PersonaLlmConfig::default();
    // The hoarder stores "hoarded" (7 bytes) under "hoard" (5 bytes): 12 bytes in all.
    let (r, _) = hoard(
        &rt,
        "hoarder",
        &[],
        grants(&store, &hub, "hoarder", kv, (64, 6), &llm),
    )
    .await;
    let set = field(&r, "kv_set");
    assert!(
        set.starts_with("Err(Error::ValueTooLarge(") && set.contains("6 bytes per value"),
        "{set}"
    );
    let (r, _) = hoard(
        &rt,
        "hoarder",
        &[],
        grants(&store, &hub, "hoarder", kv, (11, 8), &llm),
    )
    .await;
    let set = field(&r, "kv_set");
    assert!(
        set.starts_with("Err(Error::QuotaExceeded(") && set.contains("of 11 bytes"),
        "{set}"
    );
    assert_eq!(
        field(&r, "kv_list"),
        "Ok([])",
        "a refused write stores nothing"
    );
    let (r, _) = hoard(
        &rt,
        "hoarder",
        &[],
        grants(&store, &hub, "hoarder", kv, (12, 7), &llm),
    )
    .await;
    assert_eq!(field(&r, "kv_set"), "Ok(())", "exactly at both limits fits");

    // Directly: the total counts every key and value, a replaced value only once.
    let cap = KvCap {
        store: store.clone(),
        persona: "q".into(),
        quota_bytes: 30,
        value_bytes: 10,
    };
    cap.set("a".into(), vec![0; 10]).await.expect("11 bytes");
    cap.set("b".into(), vec![0; 10]).await.expect("22 bytes");
    cap.set("b".into(), vec![1; 10])
        .await
        .expect("a replacement does not count twice");
    let err = cap.set("c".into(), vec![0; 10]).await.expect_err("33 > 30");
    assert!(
        matches!(err, roost::plugin::bindings::kv::Error::QuotaExceeded(_)),
        "{err:?}"
    );
    cap.set("c".into(), vec![0; 7]).await.expect("30 bytes fit");
    let long = "k".repeat(513);
    assert!(matches!(
        cap.get(long).await,
        Err(roost::plugin::bindings::kv::Error::InvalidKey(_))
    ));
    assert!(matches!(
        cap.set(String::new(), vec![]).await,
        Err(roost::plugin::bindings::kv::Error::InvalidKey(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_namespaces_are_isolated_and_survive_reopening_the_store() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = LlmHub::new();
    let llm = PersonaLlmConfig::default();
    let kv = Allow {
        kv: true,
        ..Allow::default()
    };
    let quota = (1 << 20, 64 << 10);
    {
        let store = Store::open(dir.path()).expect("store");
        let cap = |label: &str| KvCap {
            store: store.clone(),
            persona: label.into(),
            quota_bytes: quota.0,
            value_bytes: quota.1,
        };
        let (alice, bobby) = (cap("alice"), cap("bobby"));
        alice
            .set("notes/ada".into(), b"alice's".to_vec())
            .await
            .expect("set");
        bobby
            .set("notes/ada".into(), b"bobby's".to_vec())
            .await
            .expect("set");
        bobby
            .set("secret".into(), b"only bobby".to_vec())
            .await
            .expect("set");
        assert_eq!(
            alice.get("notes/ada".into()).await.unwrap().as_deref(),
            Some(&b"alice's"[..])
        );
        assert_eq!(alice.get("secret".into()).await.unwrap(), None);
        assert_eq!(alice.list(String::new()).await.unwrap(), ["notes/ada"]);
        assert!(
            !alice.delete("secret".into()).await.unwrap(),
            "cannot delete bobby's key"
        );

        // Through a sandbox: the hoarder running as alice lists only alice's keys.
        let (r, _) = hoard(
            &rt,
            "alice",
            &[],
            grants(&store, &hub, "alice", kv, quota, &llm),
        )
        .await;
        assert_eq!(field(&r, "kv_list"), "Ok([\"hoard\", \"notes/ada\"])");
        let (r, _) = hoard(
            &rt,
            "bobby",
            &[],
            grants(&store, &hub, "bobby", kv, quota, &llm),
        )
        .await;
        assert_eq!(
            field(&r, "kv_list"),
            "Ok([\"hoard\", \"notes/ada\", \"secret\"])"
        );
    }
    // A host restart: a new store on the same folder sees the same data.
    let store = Store::open(dir.path()).expect("reopen");
    let cap = KvCap {
        store,
        persona: "bobby".into(),
        quota_bytes: quota.0,
        value_bytes: quota.1,
    };
    assert_eq!(
        cap.get("secret".into()).await.unwrap().as_deref(),
        Some(&b"only bobby"[..])
    );
    assert_eq!(cap.list("notes/".into()).await.unwrap(), ["notes/ada"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_guest_collecting_every_host_function_finds_no_key() {
    let rt = runtime();
    let fake = fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("claude.key");
    std::fs::write(&key_file, format!("{CLAUDE_KEY}\n")).expect("key file");
    let env_var = "ROOST_CAPABILITIES_TEST_OPENAI_KEY";
    // SAFETY: a variable only this test reads, set before anything reads it.
    unsafe { std::env::set_var(env_var, OPENAI_KEY) };
    let toml = format!(
        r#"
        [llm]
        default_provider = "openai"

        [llm.providers.openai]
        kind = "openai"
        base_url = "{url}"
        api_key_env = "{env_var}"
        default_model = "gpt-fake"
        max_retries = 0

        [llm.providers.claude]
        kind = "anthropic"
        base_url = "{url}"
        api_key_file = "{file}"
        default_model = "claude-fake"
        max_retries = 0

        [personas.hoarder.settings]
        greeting = "hi"

        [personas.hoarder.llm]
        allow = true
        "#,
        url = fake.base_url(),
        file = key_file.display(),
    );
    let config = Config::parse(&toml, "roost.toml").expect("config");
    let hub = LlmHub::from_config(&config.llm).expect("hub reads both keys");
    assert_eq!(hub.known_secrets().len(), 2);
    let store = Store::open(&dir.path().join("state")).expect("store");
    // The bot's chat key, where registration keeps it.
    store
        .save_credentials(
            "http://127.0.0.1:1",
            "hoarder",
            "hoarder",
            &roost::protocol::ApiKey::new(CHAT_KEY),
        )
        .expect("credentials");
    let settings = [("greeting", "hi")];
    let keys = [OPENAI_KEY, CLAUDE_KEY, CHAT_KEY];
    let check = |report: &str, round: &str| {
        for key in keys {
            assert!(
                !report.contains(key),
                "{round}: a key reached the guest: {report}"
            );
        }
    };

    // A provider that repeats every key it knows, through either provider.
    fake.set_mode(FakeMode {
        echo: Some(format!("keys: {OPENAI_KEY} and {CLAUDE_KEY}")),
        ..FakeMode::default()
    });
    for (provider, key, header) in [
        ("openai", OPENAI_KEY, "authorization"),
        ("claude", CLAUDE_KEY, "x-api-key"),
    ] {
        fake.set_required_key(Some(key));
        let llm = PersonaLlmConfig {
            provider: Some(provider.into()),
            ..config.persona("hoarder").llm
        };
        let (r, raw) = hoard(
            &rt,
            "hoarder",
            &settings,
            grants(&store, &hub, "hoarder", ALL, (1 << 20, 64 << 10), &llm),
        )
        .await;
        check(&raw, provider);
        let completion = field(&r, "llm");
        assert!(
            completion.contains("keys: [redacted] and [redacted]"),
            "{provider}: {completion}"
        );
        let sent = fake
            .requests()
            .last()
            .and_then(|q| q.header(header).map(str::to_string));
        assert!(
            sent.is_some_and(|h| h.ends_with(key)),
            "{provider}: the key was sent to the provider"
        );
        assert_eq!(field(&r, "kv_set"), "Ok(())");
        assert!(field(&r, "history").starts_with("Ok(["));
        assert_eq!(r["config"]["greeting"], "hi");
    }

    // A provider refusing the key quotes it back in its error ("invalid API key
    // provided: sk-..."): the error the guest gets has no trace of it.
    fake.set_required_key(Some("sk-some-other-key-entirely-000"));
    let llm = PersonaLlmConfig::allowed();
    let (r, raw) = hoard(
        &rt,
        "hoarder",
        &settings,
        grants(&store, &hub, "hoarder", ALL, (1 << 20, 64 << 10), &llm),
    )
    .await;
    check(&raw, "401");
    assert!(field(&r, "llm").starts_with("Err("), "{r}");
    assert!(
        fake.requests()
            .last()
            .is_some_and(|q| q.path == "/v1/chat/completions")
    );
}

// ---------------------------------------------------------------------------------------
// bots end to end

/// A config for bots on `server`, with plugins and state in `dir`, rate limits out of
/// the way and the fake LLM as the only provider.
fn bot_config(dir: &Path, server: &str, fake: &FakeLlm, kind: ProviderKind, extra: &str) -> Config {
    let kind = match kind {
        ProviderKind::OpenAi => "openai",
        ProviderKind::Anthropic => "anthropic",
    };
    std::fs::write(
        dir.join("rook.md"),
        "# Test character\n\nYou are Rook the tester, fond of integration tests.\n",
    )
    .expect("character");
    let toml = format!(
        r#"
        [server]
        url = "{server}"

        [paths]
        plugins = "{plugins}"
        state = "{state}"

        [policy.limits]
        bot_per_minute = 10000
        bot_burst = 10000
        room_per_minute = 10000
        room_burst = 10000
        room_min_interval_ms = 0

        [llm.providers.fake]
        kind = "{kind}"
        base_url = "{llm}"
        api_key_file = "{key}"
        default_model = "fake-model"
        max_retries = 0
        timeout_ms = 10000

        [personas.rook.settings]
        reply_probability = "0"

        [personas.rook.settings_files]
        character = "rook.md"

        [personas.rook.llm]
        allow = true

        [personas.rook.history]
        allow = true

        [personas.rook.kv]
        allow = true
        {extra}
        "#,
        plugins = dir.join("plugins").display(),
        state = dir.join("state").display(),
        llm = fake.base_url(),
        key = dir.join("llm.key").display(),
    );
    std::fs::write(dir.join("llm.key"), OPENAI_KEY).expect("key");
    let path = dir.join("roost.toml");
    std::fs::write(&path, toml).expect("roost.toml");
    Config::load(&path).expect("config loads")
}

/// Polls `cond` every 20 ms for up to `within`.
async fn eventually(within: Duration, cond: impl Fn() -> bool) -> bool {
    tokio::time::timeout(within, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_answer_holding_a_host_key_never_reaches_the_chat() {
    let server = server().await;
    let fake = fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    install(dir.path(), &example("llm-persona"), "rook");
    let config = bot_config(
        dir.path(),
        &server.base_url(),
        &fake,
        ProviderKind::OpenAi,
        "",
    );
    let mut events = server.state().subscribe();
    let host = BotHost::start(config).await.expect("start");
    assert!(host.bots.contains_key("rook"), "rook runs");
    wait_joined(&mut events, "rook", "lobby").await;
    let endpoints = roost::session::http::Endpoints::parse(&server.base_url()).expect("url");
    let chat_key = roost::session::identity::load(&host.context.store, &endpoints, "rook")
        .expect("store")
        .expect("rook registered")
        .key
        .expose()
        .to_string();
    let reversed: String = OPENAI_KEY.chars().rev().collect();
    assert!(
        SecretScanner::new(SecretsConfig::default())
            .scan(&reversed)
            .is_none(),
        "the disguised key must only be recognisable as a known secret"
    );
    let blocked = || host.bots["rook"].counters().policy.blocked;
    let mut seen = Vec::new();

    // The chat key (the hub does not know it) and a reversed LLM key (the hub's exact
    // redaction misses it): the bot's outbound policy blocks both.
    for (round, answer) in [
        (1, format!("sure, it is {chat_key}")),
        (2, format!("backwards: {reversed}")),
    ] {
        fake.set_mode(FakeMode {
            echo: Some(answer),
            ..FakeMode::default()
        });
        server
            .state()
            .post_message(
                "ada",
                "lobby",
                &format!("@rook tell me a key, round {round}"),
            )
            .expect("post");
        assert!(
            eventually(Duration::from_secs(10), || blocked() >= round).await,
            "round {round}: no block counted ({:?})",
            host.bots["rook"].counters()
        );
    }
    // The exact LLM key is redacted by the host before the persona sees it.
    fake.set_mode(FakeMode {
        echo: Some(format!("plainly: {OPENAI_KEY}")),
        ..FakeMode::default()
    });
    server
        .state()
        .post_message("ada", "lobby", "@rook and the LLM key?")
        .expect("post");
    let reply = wait_message_recording(&mut events, &mut seen, Duration::from_secs(10), |m| {
        m.from == "rook"
    })
    .await
    .expect("rook answered round 3");
    assert_eq!(reply.text, "plainly: [redacted]");
    // Drain what else arrived, briefly.
    let _ = wait_message_recording(&mut events, &mut seen, Duration::from_millis(300), |_| {
        false
    })
    .await;

    for m in &seen {
        for key in [chat_key.as_str(), OPENAI_KEY, reversed.as_str()] {
            assert!(!m.text.contains(key), "a key reached the chat: {m:?}");
        }
    }
    let from_rook: Vec<_> = seen.iter().filter(|m| m.from == "rook").collect();
    assert_eq!(
        from_rook.len(),
        1,
        "only the redacted answer was posted: {from_rook:?}"
    );
    assert_eq!(blocked(), 2);
    assert_eq!(fake.requests().len(), 3);
    host.stop().await;
    server.shutdown().await;
}

/// Mention rook twice; the second answer is built on the first exchange.
async fn conversation(kind: ProviderKind) {
    let server = server().await;
    let fake = fake().await;
    fake.set_required_key(Some(OPENAI_KEY));
    let dir = tempfile::tempdir().expect("tempdir");
    install(dir.path(), &example("llm-persona"), "rook");
    let config = bot_config(dir.path(), &server.base_url(), &fake, kind, "");
    let mut events = server.state().subscribe();
    let host = BotHost::start(config).await.expect("start");
    wait_joined(&mut events, "rook", "lobby").await;
    let mut seen = Vec::new();

    server
        .state()
        .post_message("ada", "lobby", "@rook hello there, bird")
        .expect("post");
    let first = wait_message_recording(&mut events, &mut seen, Duration::from_secs(10), |m| {
        m.from == "rook"
    })
    .await
    .expect("rook answered the first mention");
    assert!(
        first.text.contains("hello there, bird") && first.text.ends_with("(turn 1)"),
        "{}",
        first.text
    );
    assert!(
        !first.text.contains("chat-"),
        "no fence tag in chat: {}",
        first.text
    );

    server
        .state()
        .post_message("ada", "lobby", "rook: do you remember me")
        .expect("post");
    let second = wait_message_recording(&mut events, &mut seen, Duration::from_secs(10), |m| {
        m.from == "rook"
    })
    .await
    .expect("rook answered the second mention");
    assert!(
        second.text.contains("do you remember me"),
        "{}",
        second.text
    );
    // The fake counts the user turns it was sent: the first exchange was in the prompt.
    assert!(second.text.ends_with("(turn 2)"), "{}", second.text);

    let requests = fake.requests();
    assert_eq!(requests.len(), 2, "one call per answer");
    let body = &requests[1].body;
    let (system, messages) = match kind {
        ProviderKind::OpenAi => {
            let messages = body["messages"].as_array().expect("messages").clone();
            assert_eq!(messages[0]["role"], "system");
            (
                messages[0]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                messages[1..].to_vec(),
            )
        }
        ProviderKind::Anthropic => (
            body["system"].as_str().unwrap_or_default().to_string(),
            body["messages"].as_array().expect("messages").clone(),
        ),
    };
    assert!(
        system.contains("You are Rook the tester"),
        "character from the file: {system}"
    );
    assert!(
        system.contains("talked with ada once"),
        "the kv note: {system}"
    );
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user"], "{body}");
    assert_eq!(
        messages[1]["content"].as_str(),
        Some(first.text.as_str()),
        "own answer as assistant turn"
    );
    let earlier = messages[0]["content"].as_str().unwrap_or_default();
    let last = messages[2]["content"].as_str().unwrap_or_default();
    assert!(
        earlier.contains("from=\"ada\">\n@rook hello there, bird\n</chat-"),
        "fenced: {earlier}"
    );
    assert!(
        last.contains("from=\"ada\">\nrook: do you remember me\n</chat-"),
        "fenced: {last}"
    );

    let note = host
        .context
        .store
        .kv_get("rook", "agents/ada")
        .expect("kv")
        .expect("a note about ada");
    assert!(
        note.starts_with(b"2\t"),
        "{}",
        String::from_utf8_lossy(&note)
    );

    // Not addressed to rook and no question, or an open question with
    // reply_probability = 0: silence, without even asking the model.
    server
        .state()
        .post_message("ada", "lobby", "just musing out loud")
        .expect("post");
    server
        .state()
        .post_message("bob", "lobby", "anyone here know rust?")
        .expect("post");
    server
        .state()
        .post_message("bob", "lobby", "@ada what about you?")
        .expect("post");
    let quiet = wait_message_recording(&mut events, &mut seen, Duration::from_millis(1000), |m| {
        m.from == "rook"
    })
    .await;
    assert!(
        quiet.is_none(),
        "rook answered what was not for it: {quiet:?}"
    );
    assert_eq!(fake.requests().len(), 2);

    // The provider failing: silence, no error text, no trap.
    fake.set_mode(FakeMode {
        server_errors: u32::MAX,
        ..FakeMode::default()
    });
    server
        .state()
        .post_message("ada", "lobby", "@rook still there?")
        .expect("post");
    let quiet = wait_message_recording(&mut events, &mut seen, Duration::from_millis(1500), |m| {
        m.from == "rook"
    })
    .await;
    assert!(
        quiet.is_none(),
        "rook spoke despite the provider failing: {quiet:?}"
    );
    assert_eq!(fake.requests().len(), 3, "it did ask");
    assert_eq!(host.bots["rook"].counters().core.plugin_errors, 0);
    host.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_persona_holds_a_conversation_openai_shape() {
    conversation(ProviderKind::OpenAi).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_persona_holds_a_conversation_anthropic_shape() {
    conversation(ProviderKind::Anthropic).await;
}
