//! The sandboxed runtime against hostile and well-behaved guests (built from
//! tests/guests and plugins/ by the test build).

use std::sync::Arc;
use std::time::{Duration, Instant};

use roost::bot::caps::KvCap;
use roost::plugin::bindings::{Message, MessageFlags};
use roost::plugin::context::KvBackend;
use roost::plugin::{
    FailureKind, Grants, LimitHit, Limits, LoadError, PersonaContext, Runtime, Sandbox,
};
use roost::store::Store;

use crate::guests::{example, guest};
use crate::support::{runtime, said};

fn sandbox(rt: &Runtime, path: &std::path::Path) -> Sandbox {
    let component = Arc::new(rt.load_file(path).expect("load"));
    let ctx = PersonaContext::sandbox(&component.label.clone());
    Sandbox::new(rt.clone(), component, ctx, Limits::default())
}

fn msg(text: &str) -> Message {
    Message {
        room: "lobby".into(),
        sender: "ada".into(),
        text: text.into(),
        timestamp_ms: 1_769_790_508_965,
        flags: MessageFlags::MENTIONS_ME,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_describes_itself_and_echoes_a_mention() {
    let rt = runtime();
    let mut sb = sandbox(&rt, &example("echo"));
    let m = sb.describe().await.expect("describe");
    assert_eq!(m.name, "echo");
    assert!(m.rooms.contains(&"lobby".to_string()));
    let actions = sb
        .on_message(&msg("@echo hello there"))
        .await
        .expect("call");
    assert_eq!(said(&actions), vec!["hello there".to_string()]);
    let actions = sb.on_message(&msg("echo: second")).await.expect("call");
    assert_eq!(said(&actions), vec!["second".to_string()]);
    let mut quiet = msg("nobody mentioned here");
    quiet.flags = MessageFlags::empty();
    assert!(sb.on_message(&quiet).await.expect("call").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_is_interrupted_and_named() {
    let rt = runtime();
    let mut sb = sandbox(&rt, &guest("loop"));
    let started = Instant::now();
    let err = sb
        .on_message(&msg("spin"))
        .await
        .expect_err("must be interrupted");
    let took = started.elapsed();
    assert!(
        matches!(err.kind, FailureKind::Limit(LimitHit::Cpu { .. })),
        "unexpected failure: {err}"
    );
    let line = err.to_string();
    assert!(
        line.contains("`loop`") && line.contains("CPU time limit of 200 ms"),
        "{line}"
    );
    assert!(line.contains("message from `ada` in #lobby"), "{line}");
    // Generous: 5 × the 200 ms deadline on a noisy machine.
    assert!(took < Duration::from_millis(1_000), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_hits_the_memory_limit() {
    let rt = runtime();
    // Only the memory limit may stop it: the CPU limit counts wall time the guest's
    // thread spends descheduled, and filling 64 MiB on a loaded machine has taken
    // longer than 200 ms of it.
    let component = Arc::new(rt.load_file(&guest("membomb")).expect("load"));
    let ctx = PersonaContext::sandbox(&component.label.clone());
    let limits = Limits {
        cpu_per_call: Duration::from_secs(60),
        wall_per_call: Duration::from_secs(120),
        ..Limits::default()
    };
    let mut sb = Sandbox::new(rt.clone(), component, ctx, limits);
    let err = sb.on_message(&msg("eat")).await.expect_err("must fail");
    assert!(
        matches!(err.kind, FailureKind::Limit(LimitHit::Memory { limit, .. }) if limit == 64 << 20),
        "unexpected failure: {err}"
    );
    assert!(err.to_string().contains("memory limit of 64 MiB"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_recursion_hits_the_stack_limit() {
    let rt = runtime();
    let mut sb = sandbox(&rt, &guest("recursion"));
    let err = sb.on_message(&msg("dive")).await.expect_err("must fail");
    assert!(
        matches!(err.kind, FailureKind::Limit(LimitHit::Stack { .. })),
        "unexpected failure: {err}"
    );
    assert!(err.to_string().contains("`recursion`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_fails_one_call_and_the_next_gets_a_fresh_instance() {
    let rt = runtime();
    let mut sb = sandbox(&rt, &guest("panic"));
    let err = sb.on_message(&msg("boom")).await.expect_err("must trap");
    assert!(
        matches!(err.kind, FailureKind::Trap(_)),
        "unexpected failure: {err}"
    );
    assert!(err.to_string().contains("panicked"), "{err}");
    let before = sb.stats().instances_created;
    let _ = sb.on_message(&msg("boom")).await;
    assert_eq!(
        sb.stats().instances_created,
        before + 1,
        "a fresh instance per call after a trap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_reply_is_refused() {
    let rt = runtime();
    let mut sb = sandbox(&rt, &guest("bigreply"));
    let err = sb.on_message(&msg("big")).await.expect_err("must fail");
    // 10 MiB is stopped while being copied: the hostcall fuel is tied to the reply
    // limit (4 × 64 KiB and the actions), so the host never holds the whole reply.
    assert!(
        matches!(
            err.kind,
            FailureKind::Limit(LimitHit::Transfer {
                reply_limit: 65536,
                fuel
            }) if fuel < 300 << 10
        ),
        "unexpected failure: {err}"
    );
    assert!(
        err.to_string().contains("reply size limit of 64 KiB"),
        "{err}"
    );
    // 100,000 tiny actions: the list alone is over the fuel.
    let err = sb.on_message(&msg("many")).await.expect_err("must fail");
    assert!(
        matches!(err.kind, FailureKind::Limit(LimitHit::Transfer { .. })),
        "unexpected failure: {err}"
    );
    // Just over the limit but within the fuel: copied, measured, refused by size.
    let limits = Limits {
        reply_bytes: 4 << 20,
        ..Limits::default()
    };
    let component = Arc::new(rt.load_file(&guest("bigreply")).expect("load"));
    let ctx = PersonaContext::sandbox("bigreply");
    let mut roomy = Sandbox::new(rt.clone(), component, ctx, limits);
    let err = roomy.on_message(&msg("big")).await.expect_err("must fail");
    assert!(
        matches!(err.kind, FailureKind::Limit(LimitHit::ReplyBytes { .. })),
        "unexpected failure: {err}"
    );
    assert!(
        err.to_string().contains("reply size limit of 4 MiB"),
        "{err}"
    );
    assert_eq!(
        said(&roomy.on_message(&msg("ping")).await.expect("pong")),
        ["pong from bigreply"]
    );
}

#[tokio::test(start_paused = true)]
async fn five_failures_quarantine_with_doubling_backoff() {
    let rt = runtime();
    let mut sb = sandbox(&rt, &guest("panic"));
    for _ in 0..5 {
        let err = sb.on_message(&msg("boom")).await.expect_err("trap");
        assert!(matches!(err.kind, FailureKind::Trap(_)));
    }
    let q = sb.quarantined_for().expect("quarantined after 5 failures");
    assert!(q <= Duration::from_secs(30) && q > Duration::from_secs(29));
    let err = sb.on_message(&msg("boom")).await.expect_err("skipped");
    assert!(matches!(err.kind, FailureKind::Quarantined { .. }), "{err}");
    let calls = sb.stats().calls;
    tokio::time::advance(Duration::from_secs(31)).await;
    // Released on probation: one more failure re-quarantines for twice as long.
    let _ = sb.on_message(&msg("boom")).await.expect_err("trap");
    assert_eq!(sb.stats().calls, calls + 1);
    let q = sb.quarantined_for().expect("re-quarantined");
    assert!(
        q > Duration::from_secs(59) && q <= Duration::from_secs(60),
        "{q:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn quarantine_goes_by_failure_ratio_so_a_success_in_five_does_not_escape_it() {
    let rt = runtime();
    let mut sb = sandbox(&rt, &guest("panic"));
    // Four failures and a success, again and again: never five in a row, but 5 of
    // the last 10 calls (the default) fail by the sixth call.
    let mut quarantined_at = None;
    for i in 0..15 {
        let text = if i % 5 == 4 { "ping" } else { "boom" };
        let out = sb.on_message(&msg(text)).await;
        if sb.quarantined_for().is_some() {
            quarantined_at = Some(i);
            break;
        }
        assert_eq!(out.is_ok(), text == "ping", "call {i}");
    }
    assert_eq!(quarantined_at, Some(5), "5 failures in the last 6 calls");
    assert_eq!(sb.stats().quarantines, 1);

    // Configurable: 3 of the last 4 calls.
    let component = Arc::new(rt.load_file(&guest("panic")).expect("load"));
    let limits = Limits {
        quarantine_window: 4,
        quarantine_failure_ratio: 0.75,
        ..Limits::default()
    };
    let mut strict = Sandbox::new(
        rt.clone(),
        component,
        PersonaContext::sandbox("panic"),
        limits,
    );
    for text in ["boom", "ping", "boom"] {
        let _ = strict.on_message(&msg(text)).await;
        assert!(strict.quarantined_for().is_none());
    }
    let _ = strict.on_message(&msg("boom")).await;
    assert!(strict.quarantined_for().is_some(), "3 of the last 4 failed");
    // One failure in a healthy window does not quarantine.
    let component = Arc::new(rt.load_file(&guest("panic")).expect("load"));
    let mut healthy = Sandbox::new(
        rt.clone(),
        component,
        PersonaContext::sandbox("panic"),
        Limits::default(),
    );
    for i in 0..30 {
        let text = if i % 3 == 0 { "boom" } else { "ping" };
        let _ = healthy.on_message(&msg(text)).await;
    }
    assert!(
        healthy.quarantined_for().is_none(),
        "a third failing is below half"
    );
    assert_eq!(healthy.stats().quarantines, 0);
}

/// A sandbox of the `kvloop` guest with `kv` granted over an on-disk store.
fn kvloop(rt: &Runtime, store: &Store, limits: Limits) -> Sandbox {
    let component = Arc::new(rt.load_file(&guest("kvloop")).expect("load"));
    let grants = Grants {
        kv: Some(Arc::new(KvCap {
            store: store.clone(),
            persona: "kvloop".into(),
            quota_bytes: 1 << 20,
            value_bytes: 64 << 10,
        }) as Arc<dyn KvBackend>),
        ..Grants::default()
    };
    let ctx = PersonaContext::new("kvloop", "kvloop", Default::default(), grants);
    Sandbox::new(rt.clone(), component, ctx, limits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persona_looping_over_kv_set_is_stopped_at_its_host_time_limit() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let limits = Limits {
        host_per_call: Duration::from_millis(300),
        ..Limits::default()
    };
    let mut sb = kvloop(&rt, &store, limits);
    for i in 0..5 {
        let err = sb
            .on_message(&msg("burn"))
            .await
            .expect_err("must be stopped");
        // Without the host limit the loop would run to the 60 s wall limit (and its
        // own CPU time would never reach 200 ms): only the host limit names this.
        assert!(
            matches!(err.kind, FailureKind::Limit(LimitHit::Host { .. })),
            "call {i}: unexpected failure: {err}"
        );
        assert!(
            err.to_string().contains("host time limit of 300 ms"),
            "{err}"
        );
    }
    // Counted like any limit: five failures quarantine it.
    assert_eq!(sb.stats().failures, 5);
    assert_eq!(sb.stats().quarantines, 1);
    assert!(sb.quarantined_for().is_some());
    // It did write, and the store still answers with its running size.
    let used = store.kv_usage("kvloop").expect("usage");
    let keys = store.kv_list("kvloop", "burn/").expect("list");
    assert!(!keys.is_empty());
    let counted: u64 = keys.iter().map(|k| k.len() as u64 + 256).sum();
    assert_eq!(used, counted, "the running size is the namespace's size");
    assert!(used <= 1 << 20, "within its quota");
    // Its own namespace only, and the next persona is unaffected.
    assert_eq!(store.kv_usage("other").expect("usage"), 0);
}

/// Process CPU time (user + system) so far.
fn cpu_time() -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid out-pointer for getrusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// What one message of `kvloop` costs the host, in CPU seconds, with the default host
/// limit (1 s) and with the host limit out of the way (25 s, what issue 13 measured).
/// A measurement, not a check: `cargo test -p roost --test integration -- --ignored
/// --nocapture kvloop_host_cpu`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: prints the host CPU cost of one kvloop message"]
async fn kvloop_host_cpu() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut out = Vec::new();
    for (name, host) in [("default_1s", 1_000), ("unlimited_25s", 25_000)] {
        let limits = Limits {
            host_per_call: Duration::from_millis(host),
            wall_per_call: Duration::from_millis(25_000),
            ..Limits::default()
        };
        let mut sb = kvloop(&rt, &store, limits);
        let (cpu, wall) = (cpu_time(), Instant::now());
        let err = sb.on_message(&msg("burn")).await.expect_err("stopped");
        let (cpu, wall) = (cpu_time() - cpu, wall.elapsed());
        out.push(format!(
            "\"{name}\": {{\"cpu_s\": {:.2}, \"wall_s\": {:.2}, \"stopped_by\": \"{}\"}}",
            cpu.as_secs_f64(),
            wall.as_secs_f64(),
            err.kind
        ));
    }
    println!("{{{}}}", out.join(", "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_persona_keeps_answering_while_a_hostile_one_spins() {
    let rt = runtime();
    let mut hostile = sandbox(&rt, &guest("loop"));
    let mut good = sandbox(&rt, &example("echo"));
    good.describe().await.expect("describe");
    let spinner = tokio::spawn(async move {
        let mut failures = 0;
        for _ in 0..5 {
            if hostile.on_message(&msg("spin")).await.is_err() {
                failures += 1;
            }
        }
        failures
    });
    let mut answered = 0;
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let started = Instant::now();
        let actions = good
            .on_message(&msg(&format!("@echo ping {i}")))
            .await
            .expect("echo");
        slowest = slowest.max(started.elapsed());
        assert_eq!(said(&actions), vec![format!("ping {i}")]);
        answered += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(answered, 20);
    // Generous on a noisy 2-core machine: well under the hostile guest's 200 ms slice.
    assert!(
        slowest < Duration::from_millis(500),
        "slowest echo call {slowest:?}"
    );
    assert_eq!(spinner.await.expect("join"), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ungranted_capabilities_answer_denied_and_log_and_config_work() {
    let rt = runtime();
    let component = Arc::new(rt.load_file(&guest("hoarder")).expect("load"));
    let mut settings = std::collections::BTreeMap::new();
    settings.insert("greeting".to_string(), "hi".to_string());
    let ctx = PersonaContext::new("hoarder", "hoarder-1a2b", settings, Default::default());
    let mut sb = Sandbox::new(rt.clone(), component, ctx, Limits::default());
    let actions = sb
        .on_message(&msg("collect"))
        .await
        .expect("hoarder must not trap");
    let report = said(&actions).join("\n");
    for cap in ["llm", "kv", "history"] {
        assert!(
            report.contains(&format!("personas.hoarder.{cap}.allow")),
            "{cap} should be denied with its config key: {report}"
        );
    }
    assert!(
        report.contains("hoarder-1a2b"),
        "bot-name visible: {report}"
    );
    assert!(report.contains("hi"), "settings visible: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_grants_no_files_environment_or_network() {
    // A real listener the guest is told about: it must not be able to reach it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    // SAFETY: tests in this binary don't read this variable concurrently in ways
    // that matter; it only has to exist in the host's environment.
    unsafe { std::env::set_var("ROOST_TEST_CANARY", "canary-3f9c2a1b") };
    let rt = runtime();
    let mut sb = sandbox(&rt, &guest("escape"));
    let actions = sb
        .on_message(&msg(&port.to_string()))
        .await
        .expect("escape must not trap");
    let report = said(&actions).join("\n");
    assert!(
        !report.contains("canary-3f9c2a1b"),
        "environment leaked: {report}"
    );
    assert!(
        !report.contains("root:x:0:0"),
        "/etc/passwd leaked: {report}"
    );
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "the guest reached a host socket");
    let v: serde_json::Value = serde_json::from_str(&report).expect("escape reports JSON");
    assert_eq!(v["leaked"], serde_json::json!([]), "{report}");
}

#[test]
fn incompatible_files_are_refused_with_one_line() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"this is not wasm at all").expect("write");
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").expect("write");
    let echo = std::fs::read(example("echo")).expect("echo");
    let truncated = dir.path().join("truncated.wasm");
    std::fs::write(&truncated, &echo[..echo.len() / 2]).expect("write");

    let cases: Vec<(std::path::PathBuf, &str)> = vec![
        (garbage, "is not a WebAssembly file"),
        (core, "is a core WebAssembly module, not a component"),
        (truncated, "is not a valid component"),
        (dir.path().join("missing.wasm"), "no such file"),
        (
            guest("wrong-world"),
            "is not a roost persona: it does not export",
        ),
        (guest("future-version"), "was built for roost:persona@0.2.0"),
    ];
    for (path, want) in cases {
        let err = rt.load_file(&path).expect_err("must be refused");
        let line = err.to_string();
        assert!(line.contains(want), "{}: {line}", path.display());
        assert!(!line.contains('\n'), "one line: {line}");
        if matches!(err, LoadError::Read { .. }) {
            continue;
        }
    }
}

#[test]
fn roost_check_prints_the_manifest_or_one_line_and_fails() {
    let bin = env!("CARGO_BIN_EXE_roost");
    let out = std::process::Command::new(bin)
        .args(["check"])
        .arg(example("echo"))
        .output()
        .expect("run roost");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("name:         echo"), "{stdout}");
    assert!(stdout.contains("roost:persona@0.1.0"), "{stdout}");

    let out = std::process::Command::new(bin)
        .args(["check", "--json"])
        .arg(example("echo"))
        .output()
        .expect("run roost");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["name"], "echo");

    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, [0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9]).expect("write");
    for path in [
        garbage,
        dir.path().join("missing.wasm"),
        guest("wrong-world"),
    ] {
        let out = std::process::Command::new(bin)
            .arg("check")
            .arg(&path)
            .output()
            .expect("run roost");
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
