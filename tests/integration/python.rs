//! Python personas end to end: the `plugins/py-persona` example (the quiz master)
//! built with componentize-py, checked, run in the sandbox with and without its
//! capabilities, replayed through `roost replay`; the pool and the limits against a
//! CPython component; and `roost new` + `roost build` + `roost check` for both
//! languages, through the binary.
//!
//! Needs componentize-py (`pip install componentize-py==0.25.1`, as `.ci/run` does).
//! The example is built once per test process and compiled once per runtime: a
//! CPython component takes seconds to build and to compile.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, OnceLock};

use roost::plugin::bindings::{Message, MessageFlags, history, kv};
use roost::plugin::context::{BoxFuture, HistoryBackend, KvBackend};
use roost::plugin::state::HostState;
use roost::plugin::{
    FailureKind, Grants, LimitHit, Limits, PersonaComponent, PersonaContext, Runtime,
    RuntimeConfig, Sandbox,
};
use serde_json::Value;
use wasmtime::component::Component;

use crate::guests::repo_root;
use crate::support::{runtime, said};

/// `plugins/py-persona`, built once per test process into the host's target folder.
fn quizmaster() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let out = repo_root().join("target").join("python-personas");
        std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        let opts = roost::build::BuildOptions {
            path: repo_root().join("plugins/py-persona"),
            output: Some(out),
        };
        let started = std::time::Instant::now();
        let wasm = roost::build::build_persona(&opts).map_err(|e| {
            format!("building plugins/py-persona failed: {e} (CI installs componentize-py; locally: pip install componentize-py=={})", roost::build::COMPONENTIZE_PY_VERSION)
        })?;
        eprintln!("built {} in {:.1?}", wasm.display(), started.elapsed());
        Ok(wasm)
    });
    match built {
        Ok(p) => p.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// One runtime with the quiz master compiled into it, shared by the in-process tests.
fn loaded() -> &'static (Runtime, Arc<PersonaComponent>) {
    static LOADED: OnceLock<(Runtime, Arc<PersonaComponent>)> = OnceLock::new();
    LOADED.get_or_init(|| {
        let rt = runtime();
        let component = rt
            .load_file(&quizmaster())
            .unwrap_or_else(|e| panic!("{e}"));
        (rt, Arc::new(component))
    })
}

fn roost(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_roost"))
        .args(args)
        .current_dir(dir)
        .env_remove("CARGO_TARGET_DIR")
        // Tests never reach the internet: cargo resolves a new crate's dependencies
        // from the local registry cache (see `roost_new_rust_builds_and_checks`).
        .env("CARGO_NET_OFFLINE", "true")
        .output()
        .expect("run roost")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn msg(sender: &str, text: &str, mentions: bool) -> Message {
    Message {
        room: "lobby".into(),
        sender: sender.into(),
        text: text.into(),
        timestamp_ms: 1_769_790_508_965,
        flags: if mentions {
            MessageFlags::MENTIONS_ME
        } else {
            MessageFlags::empty()
        },
    }
}

/// What the persona in `sb` says to `m`; `what` names the call if it fails.
async fn answer(sb: &mut Sandbox, m: Message, what: &str) -> Vec<String> {
    said(&sb.on_message(&m).await.expect(what))
}

/// `kv` in memory, shared between sandboxes like the host's store.
#[derive(Default)]
struct MemKv(Mutex<BTreeMap<String, Vec<u8>>>);

impl MemKv {
    fn text(&self, key: &str) -> Option<String> {
        let map = self.0.lock().unwrap();
        map.get(key)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

impl KvBackend for MemKv {
    fn get(&self, key: String) -> BoxFuture<'_, Result<Option<Vec<u8>>, kv::Error>> {
        Box::pin(async move { Ok(self.0.lock().unwrap().get(&key).cloned()) })
    }
    fn set(&self, key: String, value: Vec<u8>) -> BoxFuture<'_, Result<(), kv::Error>> {
        Box::pin(async move {
            self.0.lock().unwrap().insert(key, value);
            Ok(())
        })
    }
    fn delete(&self, key: String) -> BoxFuture<'_, Result<bool, kv::Error>> {
        Box::pin(async move { Ok(self.0.lock().unwrap().remove(&key).is_some()) })
    }
    fn list(&self, prefix: String) -> BoxFuture<'_, Result<Vec<String>, kv::Error>> {
        Box::pin(async move {
            let map = self.0.lock().unwrap();
            Ok(map
                .keys()
                .filter(|k| k.starts_with(&prefix))
                .cloned()
                .collect())
        })
    }
}

/// `history` that answers with a fixed transcript of `lobby`.
struct FixedHistory(Vec<Message>);

impl HistoryBackend for FixedHistory {
    fn recent(
        &self,
        room: String,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<Message>, history::Error>> {
        Box::pin(async move {
            if room != "lobby" {
                return Err(history::Error::NotInRoom(room));
            }
            let skip = self.0.len().saturating_sub(limit as usize);
            Ok(self.0[skip..].to_vec())
        })
    }
}

fn sandbox_with(grants: Grants) -> Sandbox {
    let (rt, component) = loaded();
    let ctx = PersonaContext::new("quizmaster", "quizmaster", BTreeMap::new(), grants);
    Sandbox::new(rt.clone(), component.clone(), ctx, Limits::default())
}

#[test]
fn the_example_checks() {
    let wasm = quizmaster();
    let out = roost(&repo_root(), &["check", "--json", wasm.to_str().unwrap()]);
    let report: Value = serde_json::from_str(&ok(&out, "roost check")).expect("JSON report");
    assert_eq!(report["name"], "quizmaster");
    assert_eq!(report["rooms"], serde_json::json!(["lobby"]));
    assert_eq!(report["wit"], "roost:persona@0.1.0");
    let caps = report["contract"]["capabilities"]
        .as_array()
        .expect("capabilities");
    for cap in ["kv", "history", "log", "config"] {
        assert!(caps.iter().any(|c| c == cap), "{cap} missing: {caps:?}");
    }
    let size = report["contract"]["size_bytes"].as_u64().unwrap();
    assert!(size > 10 << 20, "a CPython component is big: {size}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_with_kv_and_history_granted() {
    let kv = Arc::new(MemKv::default());
    // What the room's history shows: a question this bot asked earlier (number 3)
    // and an attempt at it. The persona's own state knows nothing of it.
    let transcript = vec![
        msg("ada", "@quizmaster quiz", true),
        Message {
            flags: MessageFlags::FROM_SELF,
            ..msg(
                "quizmaster",
                "❓ Question 3/12: Which planet is known as the Red Planet? (answer with @quizmaster ANSWER)",
                false,
            )
        },
        msg("bob", "@quizmaster venus", true),
    ];
    let grants = Grants {
        kv: Some(kv.clone()),
        history: Some(Arc::new(FixedHistory(transcript))),
        ..Grants::default()
    };
    let mut sb = sandbox_with(grants);
    let m = sb.describe().await.expect("describe");
    assert_eq!(m.name, "quizmaster");

    let recap = answer(&mut sb, msg("cy", "@quizmaster recap", true), "recap").await;
    assert_eq!(
        recap,
        [
            "Last question: Which planet is known as the Red Planet? Answers: bob: venus. Still open."
        ],
        "the recap comes from history"
    );

    let asked = answer(&mut sb, msg("ada", "@quizmaster quiz", true), "quiz").await;
    assert!(
        asked[0].starts_with("❓ Question 1/12: What is the capital of France?"),
        "{asked:?}"
    );
    assert!(kv.text("open/lobby").is_some(), "the open round is in kv");
    let wrong = answer(&mut sb, msg("bob", "@quizmaster lyon", true), "answer").await;
    assert_eq!(wrong, ["Not quite, bob. (1 try so far)"]);
    // Plain chat is ignored; a correct answer counts without the mention.
    assert!(
        sb.on_message(&msg("cy", "nice weather", false))
            .await
            .expect("chat")
            .is_empty()
    );
    let right = answer(&mut sb, msg("ada", "Paris!", false), "answer").await;
    assert_eq!(right, ["✅ ada got it: paris! ada has 1 point."]);
    assert_eq!(kv.text("score/ada").as_deref(), Some("1"));
    assert_eq!(kv.text("open/lobby"), None, "the round is closed");

    // Scores live in kv: a fresh instance (after a reload or a trap) still has them.
    let mut again = sandbox_with(Grants {
        kv: Some(kv.clone()),
        ..Grants::default()
    });
    again.describe().await.expect("describe");
    let scores = answer(&mut again, msg("bob", "@quizmaster scores", true), "scores").await;
    assert_eq!(scores, ["🏆 Scores: ada 1"]);
    let next = answer(&mut again, msg("bob", "@quizmaster quiz", true), "quiz").await;
    assert!(
        next[0].starts_with("❓ Question 2/12:"),
        "rotation kept in kv: {next:?}"
    );
    assert_eq!(sb.stats().failures + again.stats().failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_grants_it_falls_back_to_memory() {
    let mut sb = sandbox_with(Grants::default());
    sb.describe().await.expect("describe");
    let help = answer(&mut sb, msg("ada", "@quizmaster", true), "help").await;
    assert!(help[0].starts_with("I'm the quiz master."), "{help:?}");
    let asked = answer(&mut sb, msg("ada", "@quizmaster quiz", true), "quiz").await;
    assert!(asked[0].starts_with("❓ Question 1/12:"), "{asked:?}");
    let right = answer(
        &mut sb,
        msg("bob", "@quizmaster I think it's Paris", true),
        "answer",
    )
    .await;
    assert_eq!(right, ["✅ bob got it: paris! bob has 1 point."]);
    let scores = answer(&mut sb, msg("ada", "@quizmaster scores", true), "scores").await;
    assert_eq!(scores, ["🏆 Scores: bob 1"]);
    let recap = answer(&mut sb, msg("ada", "@quizmaster recap", true), "recap").await;
    assert_eq!(
        recap,
        [
            "Last question: What is the capital of France? Answers: bob: I think it's Paris. bob won."
        ]
    );
    assert_eq!(sb.stats().failures, 0);
    assert_eq!(sb.stats().instances_created, 1, "denials never trap");
}

#[test]
fn replay_asks_a_question_and_scores_it() {
    let wasm = quizmaster();
    let log = repo_root().join("plugins/py-persona/replay.jsonl");
    let out = roost(
        &repo_root(),
        &[
            "replay",
            "--json",
            "--plugin",
            wasm.to_str().unwrap(),
            log.to_str().unwrap(),
        ],
    );
    let v: Value = serde_json::from_str(&ok(&out, "roost replay")).expect("JSON summary");
    assert_eq!(v["bot_name"], "quizmaster");
    assert_eq!(v["plugin_errors"], 0, "{v}");
    assert_eq!(v["blocked"], 0, "{v}");
    let replies: Vec<&str> = v["reply_list"]
        .as_array()
        .expect("reply_list")
        .iter()
        .map(|r| r["text"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(replies.len(), 7, "{replies:#?}");
    assert!(
        replies[0].starts_with("❓ Question 1/12: What is the capital of France?"),
        "{replies:#?}"
    );
    assert_eq!(replies[1], "Not quite, bob. (1 try so far)");
    assert_eq!(replies[2], "✅ ada got it: paris! ada has 1 point.");
    assert_eq!(replies[3], "🏆 Scores: ada 1");
    assert!(
        replies[4].starts_with("Last question: What is the capital of France?"),
        "{replies:#?}"
    );
    assert!(replies[6].starts_with("✅ bob got it: 8!"), "{replies:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_fits_the_default_limit_and_a_smaller_one_is_named() {
    let (rt, component) = loaded();
    let ctx = PersonaContext::sandbox("quizmaster");
    let mut store = wasmtime::Store::new(rt.engine(), HostState::new(ctx, Limits::default()));
    store.limiter(|s| &mut s.limiter);
    store.set_epoch_deadline(u64::MAX / 2);
    let persona = component
        .pre
        .instantiate_async(&mut store)
        .await
        .expect("instantiate");
    let fresh = store.data().limiter.memory_in_use();
    persona.call_describe(&mut store).await.expect("describe");
    for i in 0..300 {
        let m = msg(&format!("agent{i}"), "@quizmaster quiz", true);
        persona.call_on_message(&mut store, &m).await.expect("call");
        let m = msg(&format!("agent{i}"), "@quizmaster paris", true);
        persona.call_on_message(&mut store, &m).await.expect("call");
    }
    let used = store.data().limiter.memory_in_use();
    eprintln!("quizmaster linear memory: {fresh} bytes fresh, {used} after 600 calls");
    assert!(fresh >= 8 << 20, "CPython starts with its heap: {fresh}");
    assert!(
        used < Limits::default().memory_bytes / 2,
        "headroom under the default: {used}"
    );

    // Below the CPython baseline the instance cannot start, and the error says why.
    let limits = Limits {
        memory_bytes: 8 << 20,
        ..Limits::default()
    };
    let mut sb = Sandbox::new(
        rt.clone(),
        component.clone(),
        PersonaContext::sandbox("quizmaster"),
        limits,
    );
    let err = sb
        .describe()
        .await
        .expect_err("8 MiB is too little for CPython");
    assert!(
        matches!(err.kind, FailureKind::Limit(LimitHit::Memory { .. })),
        "unexpected failure: {err}"
    );
    assert!(
        err.to_string().contains("memory limit of 8 MiB exceeded"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_full_of_python_personas_fits() {
    let pool = 4;
    let rt = Runtime::new(RuntimeConfig {
        pool_instances: pool,
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    if !rt.pooling() {
        eprintln!("pooling allocator unavailable here; nothing to check");
        return;
    }
    // Compiled once already: reuse the machine code when the engines agree (the
    // compile cache's trick), compile again otherwise.
    let (_, shared) = loaded();
    let code = shared.component.serialize().expect("serialize");
    // SAFETY: the bytes come from `Component::serialize` in this process; wasmtime
    // checks that the two engines are compatible.
    let component = match unsafe { Component::deserialize(rt.engine(), &code) } {
        Ok(c) => rt.prepare("quizmaster", "quizmaster.wasm", c, shared.info.size_bytes),
        Err(_) => rt.load_file(&quizmaster()),
    }
    .unwrap_or_else(|e| panic!("{e}"));
    let mut live = Vec::new();
    for i in 0..pool {
        let ctx = PersonaContext::sandbox("quizmaster");
        let mut store = wasmtime::Store::new(rt.engine(), HostState::new(ctx, Limits::default()));
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(u64::MAX / 2);
        let persona = component
            .pre
            .instantiate_async(&mut store)
            .await
            .unwrap_or_else(|e| panic!("instance {} of {pool}: {e:#}", i + 1));
        live.push((store, persona));
    }
    for (store, persona) in &mut live {
        let m = persona.call_describe(&mut *store).await.expect("describe");
        assert_eq!(m.name, "quizmaster");
    }
}

#[test]
fn roost_new_python_builds_and_checks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let made = ok(
        &roost(tmp.path(), &["new", "pybot", "--lang", "python"]),
        "roost new",
    );
    assert!(made.contains("created Python persona `pybot`"), "{made}");
    assert!(
        tmp.path()
            .join("pybot/typings/wit_world/__init__.py")
            .is_file(),
        "type hints"
    );
    for file in ["app.py", "persona.toml", "README.md"] {
        assert!(tmp.path().join("pybot").join(file).is_file(), "{file}");
    }
    let again = roost(tmp.path(), &["new", "pybot", "--lang", "python"]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(
        err.trim(),
        "error: pybot already exists: choose another name or remove it first"
    );

    let built = ok(&roost(tmp.path(), &["build", "pybot"]), "roost build");
    assert_eq!(built.trim(), "built pybot.wasm");
    let report = ok(
        &roost(tmp.path(), &["check", "--json", "pybot.wasm"]),
        "roost check",
    );
    let v: Value = serde_json::from_str(&report).expect("JSON report");
    assert_eq!(v["name"], "pybot");

    // It answers as its README says.
    let log = tmp.path().join("chat.jsonl");
    std::fs::write(
        &log,
        "{\"type\":\"message\",\"room\":\"lobby\",\"from\":\"ada\",\"text\":\"@pybot hi there\",\"timestamp\":1769790508965}\n",
    )
    .unwrap();
    let out = ok(
        &roost(
            tmp.path(),
            &["replay", "--json", "--plugin", "pybot.wasm", "chat.jsonl"],
        ),
        "roost replay",
    );
    let v: Value = serde_json::from_str(&out).expect("JSON summary");
    assert_eq!(
        v["reply_list"][0]["text"], "Hello, ada! You said: hi there",
        "{v}"
    );
}

#[test]
fn roost_new_rust_builds_and_checks() {
    // Building the examples first puts wit-bindgen and its dependencies in cargo's
    // cache, so the new crate builds offline.
    let _ = crate::guests::example("echo");
    let tmp = tempfile::tempdir().expect("tempdir");
    let made = ok(&roost(tmp.path(), &["new", "rustbot"]), "roost new");
    assert!(made.contains("created Rust persona `rustbot`"), "{made}");
    for file in ["Cargo.toml", "src/lib.rs", "README.md", "wit/world.wit"] {
        assert!(tmp.path().join("rustbot").join(file).is_file(), "{file}");
    }
    let built = ok(&roost(tmp.path(), &["build", "rustbot"]), "roost build");
    assert_eq!(built.trim(), "built rustbot.wasm");
    let report = ok(
        &roost(tmp.path(), &["check", "--json", "rustbot.wasm"]),
        "roost check",
    );
    let v: Value = serde_json::from_str(&report).expect("JSON report");
    assert_eq!(v["name"], "rustbot");
    assert_eq!(v["wit"], "roost:persona@0.1.0");

    let bad = roost(tmp.path(), &["new", "x"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("invalid persona name \"x\""), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
