//! Python persona benchmark: the CPython-based `quizmaster` (plugins/py-persona, built
//! with componentize-py) next to the Rust `echo`, in one run. Prints one JSON object
//! with, for each:
//!
//! - `component_bytes`, and `core_instances` / `largest_table` / `initial_memory_bytes`
//!   read from the component (what the pooling allocator and the limits must fit);
//! - `load_cold_ms`: compiling the component, checking it against the contract and
//!   pre-instantiating it (`Runtime::load_file`, no cache);
//! - `load_precompiled_ms`: the same from precompiled bytes
//!   (`Engine::precompile_component` + `Component::deserialize`, what the compile cache
//!   does); `precompiled_bytes` is their size;
//! - `instantiate_us`: a fresh Store + instance from the pre-instantiated component;
//! - `first_call_us`: `describe` on a fresh instance (what a bot pays after a trap);
//! - `call_ignored_ns` / `call_reply_ns`: one `on-message` through the sandbox for a
//!   message the persona ignores and for one it answers;
//! - `memory_after_instantiate_bytes` / `memory_after_calls_bytes`: linear memory of
//!   one instance (what counts against `Limits::memory_bytes`), fresh and after the
//!   calls above;
//! - `rss_per_instance_bytes`: what one more live instance (after `describe` and two
//!   calls) adds to the process's resident memory, averaged over 32 (Linux only; the
//!   linear memory is mapped copy-on-write from the compiled image, so this is the
//!   memory actually touched).
//!
//! Run with `cargo bench --bench python` (needs componentize-py: `pip install
//! componentize-py==0.25.1`; builds both personas first).

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use roost::plugin::bindings::{Message, MessageFlags};
use roost::plugin::state::HostState;
use roost::plugin::{Limits, PersonaComponent, PersonaContext, Runtime, RuntimeConfig, Sandbox};
use serde_json::{Value, json};

fn build(project: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::env::temp_dir().join("roost-bench-python");
    std::fs::create_dir_all(&out).expect("bench output folder");
    let opts = roost::build::BuildOptions {
        path: root.join(project),
        output: Some(out),
    };
    roost::build::build_persona(&opts).unwrap_or_else(|e| panic!("build {project}: {e}"))
}

fn per_iter(total: Duration, n: u32) -> f64 {
    total.as_nanos() as f64 / f64::from(n)
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Static facts of a component: core instances, the largest table, initial memory.
fn shape(bytes: &[u8]) -> (u32, u64, u64) {
    use wasmparser::{Instance, Parser, Payload};
    let (mut instances, mut largest_table, mut memory_pages) = (0u32, 0u64, 0u64);
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.expect("valid component") {
            Payload::InstanceSection(s) => {
                for i in s {
                    if matches!(i.expect("instance"), Instance::Instantiate { .. }) {
                        instances += 1;
                    }
                }
            }
            Payload::TableSection(s) => {
                for t in s {
                    largest_table = largest_table.max(t.expect("table").ty.initial);
                }
            }
            Payload::MemorySection(s) => {
                for m in s {
                    memory_pages += m.expect("memory").initial;
                }
            }
            _ => {}
        }
    }
    (instances, largest_table, memory_pages * 65536)
}

/// The process's resident memory, from `/proc/self/statm` (Linux).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

struct Case {
    label: &'static str,
    path: PathBuf,
    cold_loads: u32,
    instances: u32,
    calls: u32,
    ignored: &'static str,
    reply: &'static str,
}

fn msg(text: &str, mention: bool) -> Message {
    Message {
        room: "lobby".into(),
        sender: "ada".into(),
        text: text.into(),
        timestamp_ms: 1_769_790_508_965,
        flags: if mention {
            MessageFlags::MENTIONS_ME
        } else {
            MessageFlags::empty()
        },
    }
}

async fn fresh_store(
    rt: &Runtime,
    component: &PersonaComponent,
    label: &str,
) -> (wasmtime::Store<HostState>, roost::plugin::bindings::Persona) {
    let ctx = PersonaContext::sandbox(label);
    let mut store = wasmtime::Store::new(rt.engine(), HostState::new(ctx, Limits::default()));
    store.limiter(|s| &mut s.limiter);
    store.set_epoch_deadline(u64::MAX / 2);
    let persona = component
        .pre
        .instantiate_async(&mut store)
        .await
        .expect("instantiate");
    (store, persona)
}

fn measure(rt: &Runtime, tokio: &tokio::runtime::Runtime, case: &Case) -> Value {
    let bytes = std::fs::read(&case.path).expect("read component");
    let (core_instances, largest_table, initial_memory) = shape(&bytes);

    let start = Instant::now();
    for _ in 0..case.cold_loads {
        black_box(rt.load_file(&case.path).expect("load"));
    }
    let load_cold_ms = per_iter(start.elapsed(), case.cold_loads) / 1e6;

    let precompiled = rt
        .engine()
        .precompile_component(&bytes)
        .expect("precompile");
    let loads = 10;
    let start = Instant::now();
    for _ in 0..loads {
        // SAFETY: the bytes were produced by this engine just above.
        let c = unsafe { wasmtime::component::Component::deserialize(rt.engine(), &precompiled) }
            .expect("deserialize");
        black_box(
            rt.prepare(case.label, "bench", c, bytes.len())
                .expect("prepare"),
        );
    }
    let load_precompiled_ms = per_iter(start.elapsed(), loads) / 1e6;

    let component = Arc::new(rt.load_file(&case.path).expect("load"));

    let (instantiate, memory_fresh, first_call) = tokio.block_on(async {
        let start = Instant::now();
        for _ in 0..case.instances {
            black_box(fresh_store(rt, &component, case.label).await);
        }
        let instantiate = start.elapsed();
        let (mut store, persona) = fresh_store(rt, &component, case.label).await;
        let memory = store.data().limiter.memory_in_use();
        let start = Instant::now();
        black_box(persona.call_describe(&mut store).await.expect("describe"));
        (instantiate, memory, start.elapsed())
    });

    let (ignored, reply, memory_after) = tokio.block_on(async {
        let ctx = PersonaContext::sandbox(case.label);
        let mut sb = Sandbox::new(rt.clone(), component.clone(), ctx, Limits::default());
        sb.describe().await.expect("describe");
        let quiet = msg(case.ignored, false);
        let asked = msg(case.reply, true);
        for _ in 0..case.calls / 10 {
            black_box(sb.on_message(&quiet).await.expect("warm-up"));
            black_box(sb.on_message(&asked).await.expect("warm-up"));
        }
        assert!(
            sb.on_message(&quiet).await.expect("call").is_empty(),
            "ignored message answered"
        );
        assert!(
            !sb.on_message(&asked).await.expect("call").is_empty(),
            "no answer"
        );
        let start = Instant::now();
        for _ in 0..case.calls {
            black_box(sb.on_message(black_box(&quiet)).await.expect("call"));
        }
        let ignored = start.elapsed();
        let start = Instant::now();
        for _ in 0..case.calls {
            black_box(sb.on_message(black_box(&asked)).await.expect("call"));
        }
        let reply = start.elapsed();
        assert_eq!(
            sb.stats().instances_created,
            1,
            "one instance served every call"
        );
        // The sandbox keeps its store private: a fresh store, the same calls.
        let (mut store, persona) = fresh_store(rt, &component, case.label).await;
        persona.call_describe(&mut store).await.expect("describe");
        for _ in 0..case.calls {
            store.set_epoch_deadline(u64::MAX / 2);
            black_box(
                persona
                    .call_on_message(&mut store, &quiet)
                    .await
                    .expect("call"),
            );
            black_box(
                persona
                    .call_on_message(&mut store, &asked)
                    .await
                    .expect("call"),
            );
        }
        (ignored, reply, store.data().limiter.memory_in_use())
    });

    let rss_per_instance = tokio.block_on(async {
        let n = 32u32;
        let quiet = msg(case.ignored, false);
        let asked = msg(case.reply, true);
        let before = rss_bytes();
        let mut live = Vec::new();
        for _ in 0..n {
            let (mut store, persona) = fresh_store(rt, &component, case.label).await;
            persona.call_describe(&mut store).await.expect("describe");
            persona
                .call_on_message(&mut store, &quiet)
                .await
                .expect("call");
            persona
                .call_on_message(&mut store, &asked)
                .await
                .expect("call");
            live.push((store, persona));
        }
        let after = rss_bytes();
        drop(live);
        match (before, after) {
            (Some(b), Some(a)) => Some(a.saturating_sub(b) / u64::from(n)),
            _ => None,
        }
    });

    json!({
        "component_bytes": bytes.len(),
        "core_instances": core_instances,
        "largest_table": largest_table,
        "initial_memory_bytes": initial_memory,
        "load_cold_ms": round(load_cold_ms, 1),
        "precompiled_bytes": precompiled.len(),
        "load_precompiled_ms": round(load_precompiled_ms, 2),
        "cold_over_precompiled": round(load_cold_ms / load_precompiled_ms, 1),
        "instantiate_us": round(per_iter(instantiate, case.instances) / 1e3, 1),
        "first_call_us": round(first_call.as_nanos() as f64 / 1e3, 1),
        "call_ignored_ns": per_iter(ignored, case.calls).round(),
        "call_reply_ns": per_iter(reply, case.calls).round(),
        "memory_after_instantiate_bytes": memory_fresh,
        "memory_after_calls_bytes": memory_after,
        "rss_per_instance_bytes": rss_per_instance,
    })
}

fn main() {
    let python = Case {
        label: "quizmaster",
        path: build("plugins/py-persona"),
        cold_loads: 2,
        instances: 200,
        calls: 2_000,
        ignored: "just chatting about the weather",
        reply: "@quizmaster scores",
    };
    let rust = Case {
        label: "echo",
        path: build("plugins/echo"),
        cold_loads: 10,
        instances: 2_000,
        calls: 20_000,
        ignored: "just chatting about the weather",
        reply: "@echo the quick brown fox jumps over the lazy dog",
    };
    let rt = Runtime::new(RuntimeConfig::default()).expect("runtime");
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let py = measure(&rt, &tokio, &python);
    let rs = measure(&rt, &tokio, &rust);
    let ratio = |key: &str| {
        let (p, r) = (
            py[key].as_f64().unwrap_or(0.0),
            rs[key].as_f64().unwrap_or(1.0),
        );
        round(p / r.max(f64::MIN_POSITIVE), 1)
    };
    let report = json!({
        "bench": "python",
        "pooling_allocator": rt.pooling(),
        "componentize_py": roost::build::COMPONENTIZE_PY_VERSION,
        "python_quizmaster": py,
        "rust_echo": rs,
        "python_over_rust": {
            "component_bytes": ratio("component_bytes"),
            "load_cold_ms": ratio("load_cold_ms"),
            "load_precompiled_ms": ratio("load_precompiled_ms"),
            "instantiate_us": ratio("instantiate_us"),
            "call_reply_ns": ratio("call_reply_ns"),
            "memory_after_calls_bytes": ratio("memory_after_calls_bytes"),
            "rss_per_instance_bytes": ratio("rss_per_instance_bytes"),
        },
        "limits_default_memory_bytes": Limits::default().memory_bytes,
    });
    println!("{report}");
}
