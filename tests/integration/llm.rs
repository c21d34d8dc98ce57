//! The LLM capability's host side against the local fake server: both provider shapes
//! with their request formats checked, retries, timeouts, budgets, concurrency caps,
//! grants and keys. Everything binds 127.0.0.1:0; every wait is bounded.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use roost::llm::fake::{FakeLlm, FakeMode, reply_for};
use roost::llm::{
    ChatRequest, HttpSettings, LlmConfig, LlmHub, OpenAiProvider, PersonaLlmConfig, Provider,
    ProviderConfig, ProviderError, ProviderKind, Role as ChatRole,
};
use roost::plugin::bindings::llm::{Completion, Error, Request, Role, Turn};
use roost::plugin::context::LlmBackend;
use secrecy::ExposeSecret;

use crate::support::fake;

const KEY: &str = "sk-roost-test-9f8e7d6c5b4a39281706";

/// A key file holding [`KEY`] (with a trailing newline, as editors write it).
fn key_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    std::fs::write(&path, format!("{KEY}\n")).unwrap();
    (dir, path)
}

fn provider(fake: &FakeLlm, kind: ProviderKind, key: Option<&Path>) -> ProviderConfig {
    let mut p = fake.provider_config(kind, "base-model");
    p.api_key_file = key.map(Path::to_path_buf);
    p.timeout_ms = 10_000;
    p.max_retries = 2;
    p
}

fn hub_with(p: ProviderConfig) -> LlmHub {
    let mut cfg = LlmConfig::default();
    cfg.providers.insert("fake".into(), p);
    LlmHub::from_config(&cfg).expect("hub")
}

fn turn(role: Role, content: &str) -> Turn {
    Turn {
        role,
        content: content.into(),
    }
}

fn ask(text: &str) -> Request {
    Request {
        turns: vec![turn(Role::User, text)],
        max_tokens: None,
        temperature: None,
        model: None,
    }
}

fn backend(hub: &LlmHub, persona: &str, cfg: PersonaLlmConfig) -> Arc<dyn LlmBackend> {
    hub.backend(persona, &cfg)
        .expect("valid grant")
        .expect("granted")
}

/// Bounds every call so a broken test fails instead of hanging.
async fn complete(b: &dyn LlmBackend, req: Request) -> Result<Completion, Error> {
    tokio::time::timeout(Duration::from_secs(30), b.complete(req))
        .await
        .expect("call finished in 30 s")
}

#[tokio::test]
async fn openai_shape_request_and_answer() {
    let fake = fake().await;
    fake.set_required_key(Some(KEY));
    let (_dir, key) = key_file();
    let hub = hub_with(provider(&fake, ProviderKind::OpenAi, Some(&key)));
    let cfg = PersonaLlmConfig {
        models: vec!["big-model".into()],
        max_tokens: 200,
        ..PersonaLlmConfig::allowed()
    };
    let b = backend(&hub, "sage", cfg);

    let req = Request {
        turns: vec![
            turn(Role::System, "You are sage."),
            turn(Role::User, "hi sage"),
            turn(Role::Assistant, "hello"),
            turn(Role::System, "Keep it short."),
            turn(Role::User, "what is a roost?"),
        ],
        max_tokens: Some(1000),
        temperature: Some(0.25),
        model: Some("big-model".into()),
    };
    let answer = complete(b.as_ref(), req).await.expect("completion");
    assert_eq!(answer.text, reply_for("what is a roost?", 2));
    assert_eq!(answer.model, "big-model");
    // The fake counts a token per 4 characters: 29 (system) + 7 + 5 + 16 = 57 characters in.
    assert_eq!(
        (answer.usage.input_tokens, answer.usage.output_tokens),
        (15, answer.text.chars().count().div_ceil(4) as u32)
    );

    let seen = fake.requests();
    assert_eq!(seen.len(), 1);
    let r = &seen[0];
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-api-key"), None);
    assert_eq!(
        r.body["messages"],
        serde_json::json!([
            {"role": "system", "content": "You are sage.\n\nKeep it short."},
            {"role": "user", "content": "hi sage"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "what is a roost?"},
        ])
    );
    assert_eq!(r.body["model"], "big-model");
    assert_eq!(
        r.body["max_tokens"], 200,
        "capped at the persona's max_tokens"
    );
    assert_eq!(r.body["temperature"].as_f64(), Some(0.25));

    // A model hint the persona may not use is ignored: the default answers.
    let mut req = ask("again");
    req.model = Some("forbidden-model".into());
    let answer = complete(b.as_ref(), req).await.expect("completion");
    assert_eq!(answer.model, "base-model");
    let r = &fake.requests()[1];
    assert_eq!(r.body["model"], "base-model");
    assert_eq!(
        r.body["max_tokens"], 200,
        "unset max-tokens gets the persona's cap"
    );
    assert!(r.body.get("temperature").is_none());
}

#[tokio::test]
async fn anthropic_shape_request_and_answer() {
    let fake = fake().await;
    fake.set_required_key(Some(KEY));
    let (_dir, key) = key_file();
    let hub = hub_with(provider(&fake, ProviderKind::Anthropic, Some(&key)));
    let b = backend(&hub, "sage", PersonaLlmConfig::allowed());

    // Starts with the assistant, repeats a role, carries an empty turn and a system turn
    // in the middle: all things the messages API refuses unless reshaped.
    let req = Request {
        turns: vec![
            turn(Role::Assistant, "I am sage."),
            turn(Role::User, "ada: hi"),
            turn(Role::User, "bob: hello"),
            turn(Role::System, "Be kind."),
            turn(Role::Assistant, ""),
            turn(Role::User, "ada: what now?"),
        ],
        max_tokens: None,
        temperature: Some(1.8),
        model: None,
    };
    let answer = complete(b.as_ref(), req).await.expect("completion");
    assert_eq!(
        answer.text,
        reply_for("ada: hi\n\nbob: hello\n\nada: what now?", 2)
    );
    assert_eq!(answer.model, "base-model");

    let seen = fake.requests();
    assert_eq!(seen.len(), 1);
    let r = &seen[0];
    assert_eq!(r.path, "/v1/messages");
    assert_eq!(r.header("x-api-key"), Some(KEY));
    assert_eq!(r.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("authorization"), None);
    assert_eq!(r.body["system"], "Be kind.");
    assert_eq!(
        r.body["messages"],
        serde_json::json!([
            {"role": "user", "content": "(conversation start)"},
            {"role": "assistant", "content": "I am sage."},
            {"role": "user", "content": "ada: hi\n\nbob: hello\n\nada: what now?"},
        ])
    );
    assert_eq!(
        r.body["max_tokens"], 1024,
        "the persona's default cap; the API requires one"
    );
    assert_eq!(
        r.body["temperature"].as_f64(),
        Some(1.0),
        "clamped to Anthropic's range"
    );
    assert_eq!(r.body["model"], "base-model");
}

#[tokio::test]
async fn a_429_with_retry_after_is_retried_and_succeeds() {
    let fake = fake().await;
    let hub = hub_with(provider(&fake, ProviderKind::OpenAi, None));
    let b = backend(&hub, "p", PersonaLlmConfig::allowed());
    fake.set_mode(FakeMode {
        rate_limit: 1,
        retry_after: Some("1".into()),
        ..FakeMode::default()
    });
    let start = Instant::now();
    let answer = complete(b.as_ref(), ask("hello")).await.expect("retried");
    assert_eq!(answer.text, reply_for("hello", 1));
    assert_eq!(fake.requests().len(), 2);
    // Backoff alone would have waited at most 500 ms: the server's 1 s was honoured.
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    // The same through a magic word, in the Anthropic shape.
    let fake = self::fake().await;
    let hub = hub_with(provider(&fake, ProviderKind::Anthropic, None));
    let b = backend(&hub, "p", PersonaLlmConfig::allowed());
    let answer = complete(b.as_ref(), ask("fake:429x1 hello"))
        .await
        .expect("retried");
    assert_eq!(answer.text, reply_for("fake:429x1 hello", 1));
    let seen = fake.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body, seen[1].body, "the retry repeats the request");
}

#[tokio::test]
async fn a_429_that_outlasts_the_retries_is_rate_limited() {
    let fake = fake().await;
    let hub = hub_with(provider(&fake, ProviderKind::OpenAi, None));
    let b = backend(&hub, "p", PersonaLlmConfig::allowed());

    fake.set_mode(FakeMode {
        rate_limit: 10,
        retry_after: Some("0".into()),
        ..FakeMode::default()
    });
    assert!(matches!(
        complete(b.as_ref(), ask("hi")).await,
        Err(Error::RateLimited)
    ));
    assert_eq!(
        fake.requests().len(),
        3,
        "one attempt and max_retries = 2 retries"
    );

    // A server that asks for an hour is not waited for.
    fake.clear_requests();
    fake.set_mode(FakeMode {
        rate_limit: 10,
        retry_after: Some("3600".into()),
        ..FakeMode::default()
    });
    let start = Instant::now();
    assert!(matches!(
        complete(b.as_ref(), ask("hi")).await,
        Err(Error::RateLimited)
    ));
    assert_eq!(fake.requests().len(), 1);
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn server_errors_exhaust_the_retries_into_a_typed_error() {
    let fake = fake().await;
    let hub = hub_with(provider(&fake, ProviderKind::Anthropic, None));
    let b = backend(&hub, "p", PersonaLlmConfig::allowed());
    fake.set_mode(FakeMode {
        server_errors: u32::MAX,
        ..FakeMode::default()
    });
    let err = complete(b.as_ref(), ask("hi")).await.unwrap_err();
    assert!(
        matches!(&err, Error::Provider(r) if r == "the provider failed (HTTP 500)"),
        "{err:?}"
    );
    assert_eq!(fake.requests().len(), 3);

    // Underneath, the provider's error carries a short excerpt of the answer.
    let mut settings = HttpSettings::new(fake.base_url().parse().unwrap(), "m");
    settings.retry.max_retries = 0;
    let p = OpenAiProvider::new(settings).unwrap();
    let err = p
        .chat(ChatRequest::new(vec![(ChatRole::User, "hi".into())]))
        .await
        .unwrap_err();
    let ProviderError::Server {
        status: 500,
        excerpt,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert!(
        excerpt.contains("the fake failed on purpose") && excerpt.chars().count() <= 200,
        "{excerpt}"
    );

    // Two 500s then success, asked for by a magic word.
    fake.set_mode(FakeMode::default());
    let answer = complete(b.as_ref(), ask("fake:500x2 still there?"))
        .await
        .expect("third attempt");
    assert!(answer.text.contains("still there?"));
}

#[tokio::test]
async fn a_timeout_does_not_stall_another_personas_call() {
    let fake = fake().await;
    let hub = hub_with(provider(&fake, ProviderKind::OpenAi, None));
    let slow = backend(
        &hub,
        "slow",
        PersonaLlmConfig {
            timeout_ms: Some(3000),
            ..PersonaLlmConfig::allowed()
        },
    );
    let quick = backend(&hub, "quick", PersonaLlmConfig::allowed());

    let start = Instant::now();
    let waiting =
        tokio::spawn(async move { slow.complete(ask("fake:slow=20000 take your time")).await });
    // Wait until the slow request is at the server.
    while fake.requests().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "slow request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let answer = complete(quick.as_ref(), ask("quick one"))
        .await
        .expect("quick persona answered");
    assert_eq!(answer.text, reply_for("quick one", 1));
    assert!(
        !waiting.is_finished(),
        "the slow call is still waiting while the other persona got its answer"
    );

    let slow_result = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("bounded")
        .unwrap();
    assert!(
        matches!(slow_result, Err(Error::Timeout)),
        "{slow_result:?}"
    );
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(3000) && elapsed < Duration::from_secs(8),
        "{elapsed:?}"
    );
    // The timed-out call was charged its estimated input.
    assert!(hub.budget_usage("slow").unwrap().last_hour > 0);
}

#[tokio::test]
async fn hourly_budget_is_exhausted_then_refills() {
    let fake = fake().await;
    let hub = hub_with(provider(&fake, ProviderKind::OpenAi, None));
    let cfg = PersonaLlmConfig {
        tokens_per_hour: 60,
        ..PersonaLlmConfig::allowed()
    };
    let b = backend(&hub, "chatty", cfg);

    let mut answered = 0;
    let refusal = loop {
        match complete(b.as_ref(), ask("tell me something about budgets")).await {
            Ok(_) => answered += 1,
            Err(e) => break e,
        }
        assert!(answered < 10, "the budget never ran out");
    };
    let Error::BudgetExhausted(why) = &refusal else {
        panic!("{refusal:?}")
    };
    assert!(
        why.starts_with("hourly budget of 60 tokens spent; refills in "),
        "{why}"
    );
    assert!(why.ends_with(" min"), "{why}");
    assert_eq!(
        fake.requests().len(),
        answered,
        "a refused call never reaches the provider"
    );
    // Refused once the next call's reservation (its input bound: a token per byte, 4
    // per turn and 3 per request, plus one output token) no longer fits.
    let bound = ("tell me something about budgets".len() + 4 + 3) as u64;
    assert!(hub.budget_usage("chatty").unwrap().last_hour + bound + 1 > 60);
    // The other windows, and other personas, are unaffected.
    let other = backend(&hub, "other", PersonaLlmConfig::allowed());
    complete(other.as_ref(), ask("hi"))
        .await
        .expect("another persona's budget");

    // An hour later (on tokio's clock) the budget has refilled.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(3601)).await;
    tokio::time::resume();
    complete(b.as_ref(), ask("tell me something about budgets"))
        .await
        .expect("refilled");
    let usage = hub.budget_usage("chatty").unwrap();
    assert!(
        usage.last_hour < 60 && usage.last_day > usage.last_hour,
        "{usage:?}"
    );
}

#[tokio::test]
async fn the_concurrency_cap_is_honoured() {
    let fake = fake().await;
    fake.set_mode(FakeMode {
        delay: Duration::from_millis(300),
        ..FakeMode::default()
    });
    let hub = hub_with(provider(&fake, ProviderKind::Anthropic, None));
    let b = backend(
        &hub,
        "p",
        PersonaLlmConfig {
            max_concurrency: 2,
            ..PersonaLlmConfig::allowed()
        },
    );
    let start = Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|i| complete(b.as_ref(), ask(&format!("call {i}"))))
        .collect();
    let results = futures_util::future::join_all(calls).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(fake.max_in_flight(), 2);
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "three rounds of two: {:?}",
        start.elapsed()
    );

    // Another persona has its own slots.
    fake.set_mode(FakeMode {
        delay: Duration::from_millis(300),
        ..FakeMode::default()
    });
    let c = backend(
        &hub,
        "q",
        PersonaLlmConfig {
            max_concurrency: 3,
            ..PersonaLlmConfig::allowed()
        },
    );
    let calls: Vec<_> = (0..3)
        .map(|i| complete(c.as_ref(), ask(&format!("q {i}"))))
        .collect();
    assert!(
        futures_util::future::join_all(calls)
            .await
            .iter()
            .all(Result::is_ok)
    );
    assert_eq!(fake.max_in_flight(), 3);
}

#[tokio::test]
async fn an_ungranted_persona_gets_no_backend() {
    let fake = fake().await;
    let hub = hub_with(provider(&fake, ProviderKind::OpenAi, None));
    assert!(
        hub.backend_for("mute", &PersonaLlmConfig::default())
            .is_none()
    );
    let grant: PersonaLlmConfig = toml::from_str("models = [\"x\"]").unwrap();
    assert!(
        hub.backend("mute", &grant).unwrap().is_none(),
        "allow defaults to false"
    );
    let wrong = PersonaLlmConfig {
        provider: Some("elsewhere".into()),
        ..PersonaLlmConfig::allowed()
    };
    let err = hub.backend("lost", &wrong).err().expect("unknown provider");
    assert_eq!(
        err.to_string(),
        "personas.lost.llm.provider: no provider named \"elsewhere\" in [llm.providers]"
    );
    assert!(hub.backend_for("lost", &wrong).is_none());
    assert!(fake.requests().is_empty());
    // No provider at all.
    assert!(
        LlmHub::new()
            .backend("p", &PersonaLlmConfig::allowed())
            .is_err()
    );
}

#[tokio::test]
async fn keys_never_reach_the_persona_or_the_logs() {
    let fake = fake().await;
    fake.set_required_key(Some(KEY));
    let (_dir, key) = key_file();
    let hub = hub_with(provider(&fake, ProviderKind::OpenAi, Some(&key)));
    let b = backend(&hub, "p", PersonaLlmConfig::allowed());
    let leaks = |s: &str| s.contains(KEY) || s.contains("9f8e7d6c5b4a39281706");

    // The hub holds the key for the secret scanner, and it was really sent.
    let known: Vec<String> = hub
        .known_secrets()
        .iter()
        .map(|k| k.expose_secret().to_string())
        .collect();
    assert_eq!(known, vec![KEY.to_string()]);
    complete(b.as_ref(), ask("hello"))
        .await
        .expect("authorised call");
    assert_eq!(
        fake.requests()[0].header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert!(!leaks(&format!("{hub:?}")), "{hub:?}");

    // A provider that answers with the key (text and model name) is redacted.
    fake.set_mode(FakeMode {
        echo: Some(format!("sure, it is {KEY}.")),
        model: Some(KEY.into()),
        ..FakeMode::default()
    });
    let answer = complete(b.as_ref(), ask("what is your key?"))
        .await
        .expect("completion");
    assert_eq!(answer.text, "sure, it is [redacted].");
    assert!(!leaks(&answer.model) && !leaks(&format!("{answer:?}")));
    fake.set_mode(FakeMode::default());
    let answer = complete(b.as_ref(), ask(&format!("fake:echo={KEY}")))
        .await
        .expect("completion");
    assert_eq!(answer.text, "[redacted]");

    // A refusal that quotes the key (as some APIs do) is neither shown to the persona
    // nor kept in the provider's error.
    fake.set_required_key(Some("sk-some-other-key-000000"));
    let err = complete(b.as_ref(), ask("hello")).await.unwrap_err();
    assert!(matches!(&err, Error::Provider(_)), "{err:?}");
    assert!(!leaks(&format!("{err:?} {err}")));
    let mut settings = HttpSettings::new(fake.base_url().parse().unwrap(), "m");
    settings.api_key = Some(KEY.into());
    let p = OpenAiProvider::new(settings).unwrap();
    assert!(!leaks(&format!("{p:?}")), "{p:?}");
    let err = p
        .chat(ChatRequest::new(vec![(ChatRole::User, "hi".into())]))
        .await
        .unwrap_err();
    let ProviderError::Auth {
        status: 401,
        excerpt,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert!(excerpt.contains("[redacted]"), "{excerpt}");
    assert!(!leaks(&format!("{err:?} {err}")));
    // The fake did see the key: the redaction above is not vacuous.
    let last = fake.requests().pop().unwrap();
    assert_eq!(
        last.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );

    // Start-up errors name the source, not the value.
    let mut missing = provider(&fake, ProviderKind::OpenAi, None);
    missing.api_key_env = Some("ROOST_TEST_SURELY_UNSET_VARIABLE".into());
    let mut cfg = LlmConfig::default();
    cfg.providers.insert("x".into(), missing);
    let err = LlmHub::from_config(&cfg).expect_err("missing variable");
    assert_eq!(
        format!("{:#}", anyhow::Error::from(err)),
        "llm.providers.x: cannot load the API key: environment variable ROOST_TEST_SURELY_UNSET_VARIABLE is not set"
    );
}

#[tokio::test]
async fn usage_is_estimated_when_the_provider_sends_none() {
    for kind in [ProviderKind::OpenAi, ProviderKind::Anthropic] {
        let fake = fake().await;
        fake.set_mode(FakeMode {
            omit_usage: true,
            ..FakeMode::default()
        });
        let hub = hub_with(provider(&fake, kind, None));
        let b = backend(&hub, "p", PersonaLlmConfig::allowed());
        let req = Request {
            turns: vec![
                turn(Role::System, "Be brief."),
                turn(Role::User, "how many tokens is this?"),
            ],
            ..ask("")
        };
        let answer = complete(b.as_ref(), req).await.expect("completion");
        assert!(fake.requests()[0].raw.contains("how many tokens"));
        // Estimated by their bounds: a token per byte, 4 per turn, 3 per request.
        let input = ("Be brief.".len() + "how many tokens is this?".len() + 2 * 4 + 3) as u32;
        let output = answer.text.len().min(1024) as u32;
        assert_eq!(
            (answer.usage.input_tokens, answer.usage.output_tokens),
            (input, output),
            "{kind:?}"
        );
        assert_eq!(
            hub.budget_usage("p").unwrap().last_hour,
            u64::from(input + output)
        );

        // The magic word does the same, for trying it by hand.
        fake.set_mode(FakeMode::default());
        let answer = complete(b.as_ref(), ask("fake:no-usage hi"))
            .await
            .expect("completion");
        assert_eq!(
            answer.usage.input_tokens,
            ("fake:no-usage hi".len() + 4 + 3) as u32
        );
    }
}

#[tokio::test]
async fn the_fake_refuses_what_the_real_apis_refuse() {
    let fake = fake().await;
    let client = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value, version: bool| {
        let mut r = client
            .post(format!("{}{path}", fake.base_url()))
            .json(&body);
        if version {
            r = r.header("anthropic-version", "2023-06-01");
        }
        r.send()
    };
    let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
    let no_version = post(
        "/v1/messages",
        serde_json::json!({"model": "m", "max_tokens": 5, "messages": msgs}),
        false,
    )
    .await
    .unwrap();
    assert_eq!(no_version.status(), 400);
    let no_max = post(
        "/v1/messages",
        serde_json::json!({"model": "m", "messages": msgs}),
        true,
    )
    .await
    .unwrap();
    assert_eq!(no_max.status(), 400);
    let body: serde_json::Value = no_max.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let ok = post(
        "/v1/messages",
        serde_json::json!({"model": "m", "max_tokens": 5, "messages": msgs}),
        true,
    )
    .await
    .unwrap();
    assert_eq!(ok.status(), 200);
    let no_model = post(
        "/v1/chat/completions",
        serde_json::json!({"messages": msgs}),
        false,
    )
    .await
    .unwrap();
    assert_eq!(no_model.status(), 400);
    let body: serde_json::Value = no_model.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("model")
    );
    assert_eq!(fake.requests().len(), 4);
}
