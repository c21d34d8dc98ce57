//! The instance pool and shared code, against real personas: a small pool serving
//! more sandboxes than it holds (in order and concurrently), an instance in the
//! middle of a call never reclaimed, idle instances dropped after the idle time, the
//! on-demand fallback when the pooling allocator is full, and identical bytes sharing
//! one compiled component.

use std::sync::Arc;
use std::time::Duration;

use roost::plugin::bindings::{Message, MessageFlags, llm};
use roost::plugin::context::{BoxFuture, LlmBackend};
use roost::plugin::state::HostState;
use roost::plugin::{
    CompileCache, FailureKind, Grants, Limits, PersonaComponent, PersonaContext, Runtime,
    RuntimeConfig, Sandbox,
};
use tokio::sync::Semaphore;

use crate::guests::{example, guest};
use crate::support::said;

fn runtime(pool: u32, idle: Duration) -> Runtime {
    Runtime::new(RuntimeConfig {
        pool_instances: pool,
        instance_idle: idle,
        ..RuntimeConfig::default()
    })
    .expect("runtime")
}

fn load(rt: &Runtime, path: &std::path::Path, label: &str) -> Arc<PersonaComponent> {
    let bytes = std::fs::read(path).expect("read");
    Arc::new(
        rt.load_bytes(label, &format!("{label}.wasm"), &bytes)
            .unwrap_or_else(|e| panic!("{e}")),
    )
}

fn sandbox(rt: &Runtime, component: &Arc<PersonaComponent>) -> Sandbox {
    let ctx = PersonaContext::sandbox(&component.label);
    Sandbox::new(rt.clone(), component.clone(), ctx, Limits::default())
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

/// Five echo bots (five file names, one compiled component) on a pool of two.
fn five_echoes(rt: &Runtime) -> Vec<Sandbox> {
    (0..5)
        .map(|i| sandbox(rt, &load(rt, &example("echo"), &format!("echo{i}"))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_two_serves_five_bots_in_turn() {
    let rt = runtime(2, Duration::from_secs(60));
    let mut bots = five_echoes(&rt);
    for round in 0..3 {
        for (i, sb) in bots.iter_mut().enumerate() {
            if round == 0 {
                assert_eq!(sb.describe().await.expect("describe").name, "echo");
            }
            let text = format!("round {round} bot {i}");
            let actions = sb
                .on_message(&msg(&format!("@{} {text}", sb.label())))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(said(&actions), vec![text]);
            let s = rt.pool_stats();
            assert!(s.live <= 2, "{s:?}");
        }
    }
    let s = rt.pool_stats();
    assert!(s.peak_live <= 2, "{s:?}");
    assert_eq!(s.live, 2, "the last two stay warm: {s:?}");
    // Every bot but the two warm ones lost its instance to another bot, each round.
    assert!(s.reclaimed >= 13, "{s:?}");
    assert_eq!((s.waits, s.wait_timeouts, s.on_demand), (0, 0, 0), "{s:?}");
    assert!(bots[4].is_warm() && bots[3].is_warm() && !bots[0].is_warm());
    drop(bots);
    assert_eq!(
        rt.pool_stats().live,
        0,
        "dropped sandboxes free their instances"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_two_serves_five_bots_at_once() {
    let rt = runtime(2, Duration::from_secs(60));
    let tasks: Vec<_> = five_echoes(&rt)
        .into_iter()
        .enumerate()
        .map(|(i, mut sb)| {
            tokio::spawn(async move {
                sb.describe().await.expect("describe");
                for n in 0..20 {
                    let text = format!("bot {i} message {n}");
                    let actions = sb
                        .on_message(&msg(&format!("@{} {text}", sb.label())))
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                    assert_eq!(said(&actions), vec![text]);
                    tokio::task::yield_now().await;
                }
                sb
            })
        })
        .collect();
    let mut bots = Vec::new();
    for t in tasks {
        bots.push(t.await.expect("task"));
    }
    let s = rt.pool_stats();
    assert!(s.peak_live <= 2, "{s:?}");
    assert!(s.reclaimed >= 3, "{s:?}");
    assert_eq!((s.wait_timeouts, s.on_demand), (0, 0), "{s:?}");
    assert!(bots.iter().all(|b| b.stats().failures == 0));
}

/// An LLM that answers only when the test lets it: holds a call in flight.
struct GatedLlm(Arc<Semaphore>);

impl LlmBackend for GatedLlm {
    fn complete(&self, _req: llm::Request) -> BoxFuture<'_, Result<llm::Completion, llm::Error>> {
        Box::pin(async move {
            let _permit = self.0.acquire().await.expect("gate");
            Ok(llm::Completion {
                text: "fine".into(),
                model: "gated".into(),
                usage: llm::Usage {
                    input_tokens: 1,
                    output_tokens: 1,
                },
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_in_the_middle_of_a_call_is_never_reclaimed() {
    let rt = runtime(1, Duration::from_secs(60));
    let gate = Arc::new(Semaphore::new(0));
    let grants = Grants {
        llm: Some(Arc::new(GatedLlm(gate.clone()))),
        ..Grants::default()
    };
    let hoarder = load(&rt, &guest("hoarder"), "hoarder");
    let ctx = PersonaContext::new("hoarder", "hoarder", Default::default(), grants);
    let mut waiting = Sandbox::new(rt.clone(), hoarder, ctx, Limits::default());
    // The hoarder's call waits on the LLM, holding the pool's only instance.
    let in_flight = tokio::spawn(async move {
        let r = waiting.on_message(&msg("tell me")).await;
        (waiting, r)
    });
    while rt.pool_stats().in_use == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let echo = load(&rt, &example("echo"), "echo");
    let ctx = PersonaContext::sandbox("echo");
    let short = Limits {
        wall_per_call: Duration::from_millis(300),
        ..Limits::default()
    };
    let mut impatient = Sandbox::new(rt.clone(), echo.clone(), ctx, short);
    let err = impatient
        .on_message(&msg("@echo hi"))
        .await
        .expect_err("no slot while the only instance is in a call");
    assert!(
        matches!(err.kind, FailureKind::PoolFull { capacity: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("pool_instances"), "{err}");
    assert!(impatient.quarantined_for().is_none());
    let s = rt.pool_stats();
    assert_eq!((s.live, s.in_use, s.reclaimed), (1, 1, 0), "{s:?}");
    assert_eq!((s.waits, s.wait_timeouts), (1, 1), "{s:?}");

    // A patient caller waits; the hoarder's call completes on its own instance,
    // then the waiter gets the slot.
    let mut patient = sandbox(&rt, &echo);
    let later = tokio::spawn(async move {
        let r = patient.on_message(&msg("@echo at last")).await;
        (patient, r)
    });
    while rt.pool_stats().waiting == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gate.add_permits(1);
    let (_waiting, r) = in_flight.await.expect("task");
    let actions = r.unwrap_or_else(|e| panic!("{e}"));
    let reply = said(&actions).join("");
    assert!(reply.contains(r#""llm":"Ok("#), "{reply}");
    let (_patient, r) = later.await.expect("task");
    assert_eq!(said(&r.expect("call")), vec!["at last".to_string()]);
    let s = rt.pool_stats();
    assert!(s.peak_live <= 1, "{s:?}");
    assert_eq!(s.reclaimed, 1, "{s:?}");
}

async fn said_one(sb: &mut Sandbox, text: &str) -> Vec<String> {
    said(&sb.on_message(&msg(text)).await.expect("call"))
}

#[tokio::test(start_paused = true)]
async fn idle_instances_are_dropped_after_the_idle_time() {
    let rt = runtime(4, Duration::from_secs(60));
    let counter = load(&rt, &guest("counter"), "counter");
    let mut a = sandbox(&rt, &counter);
    let mut b = sandbox(&rt, &counter);
    assert_eq!(said_one(&mut a, "x").await, ["1: x"]);
    assert_eq!(said_one(&mut a, "y").await, ["2: y"], "warm: memory kept");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(said_one(&mut b, "z").await, ["1: z"]);
    assert_eq!(rt.pool_stats().live, 2);

    tokio::time::sleep(Duration::from_secs(31)).await;
    let s = rt.pool_stats();
    assert_eq!((s.expired, s.live), (1, 1), "a idle 61 s, b 31 s: {s:?}");
    assert!(!a.is_warm() && b.is_warm());
    tokio::time::sleep(Duration::from_secs(30)).await;
    let s = rt.pool_stats();
    assert_eq!((s.expired, s.live), (2, 0), "{s:?}");
    // A fresh instance: the persona's memory started over (what lasts is in kv).
    assert_eq!(said_one(&mut a, "again").await, ["1: again"]);
    assert_eq!(a.stats().instances_created, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pooling_allocator_falls_back_to_on_demand_allocation() {
    let rt = runtime(1, Duration::from_secs(60));
    if !rt.pooling() {
        eprintln!("pooling allocator unavailable here; nothing to check");
        return;
    }
    let echo = load(&rt, &example("echo"), "echo");
    // Instances made outside the instance pool take every slot of the allocator.
    let mut outside = Vec::new();
    loop {
        let ctx = PersonaContext::sandbox("outside");
        let mut store = wasmtime::Store::new(rt.engine(), HostState::new(ctx, Limits::default()));
        store.set_epoch_deadline(u64::MAX / 2);
        match echo.pre.instantiate_async(&mut store).await {
            Ok(p) => outside.push((store, p)),
            Err(e) => {
                assert!(format!("{e:#}").contains("maximum concurrent"), "{e:#}");
                break;
            }
        }
        assert!(outside.len() < 100, "the pooling allocator never refused");
    }
    let mut sb = sandbox(&rt, &echo);
    let actions = sb
        .on_message(&msg("@echo still here"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(said(&actions), vec!["still here".to_string()]);
    assert_eq!(rt.pool_stats().on_demand, 1);
    // Warm on-demand instances work like any other.
    let actions = sb.on_message(&msg("@echo again")).await.expect("call");
    assert_eq!(said(&actions), vec!["again".to_string()]);
    assert_eq!(rt.pool_stats().on_demand, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_bytes_share_one_compiled_component() {
    let rt = runtime(8, Duration::from_secs(60));
    let bytes = std::fs::read(example("echo")).expect("read");
    let a = rt
        .load_bytes("echo-a", "echo-a.wasm", &bytes)
        .expect("load");
    let b = rt
        .load_bytes("echo-b", "echo-b.wasm", &bytes)
        .expect("load");
    assert!(Arc::ptr_eq(a.code(), b.code()));
    assert!(a.shares_code_with(&b));
    assert_eq!((a.label.as_str(), b.label.as_str()), ("echo-a", "echo-b"));
    assert_eq!(rt.shared_components(), 1);

    // Through the compile cache, under other file names: the same code again.
    let dir = tempfile::tempdir().expect("tempdir");
    let cache =
        CompileCache::open(&dir.path().join("cache"), 64 << 20, rt.engine()).expect("cache");
    let copy = dir.path().join("echo-c.wasm");
    std::fs::write(&copy, &bytes).expect("write");
    let (c, outcome) = rt.load_file_cached(&copy, &cache).expect("load");
    assert!(c.shares_code_with(&a));
    assert_eq!(
        outcome,
        roost::plugin::CacheOutcome::Hit,
        "not compiled again"
    );
    assert_eq!(
        (c.label.as_str(), c.path.as_deref()),
        ("echo-c", Some(copy.as_path()))
    );

    // Other bytes, other code.
    let greeter = rt.load_file(&example("greeter")).expect("load greeter");
    assert!(!greeter.shares_code_with(&a));
    assert_eq!(rt.shared_components(), 2);

    // Sandboxes of both labels run the shared code, each under its own name.
    for component in [a, b] {
        let component = Arc::new(component);
        let mut sb = sandbox(&rt, &component);
        assert_eq!(sb.describe().await.expect("describe").name, "echo");
    }
    drop((c, greeter));
    assert_eq!(
        rt.shared_components(),
        0,
        "unloading the last user frees the code"
    );
    let again = rt
        .load_bytes("echo-d", "echo-d.wasm", &bytes)
        .expect("load");
    assert_eq!(rt.shared_components(), 1);
    drop(again);
}
