//! Runtime benchmark: prints one JSON object.
//!
//! - `on_message_ns`: one `on-message` call into the `echo` persona through the
//!   sandbox (limits, epoch deadline, lifting and lowering included);
//! - `native_ns`: a native Rust function doing the same work (find the mention, build
//!   the reply), the baseline measured in the same run; `sandbox_over_native` is the ratio;
//! - `instantiate_us`: a fresh Store + instance from the pre-instantiated component;
//! - `load_file_ms`: reading and compiling `echo.wasm`, checking it against the
//!   contract and pre-instantiating it; `load_precompiled_ms`: the same from
//!   precompiled bytes (what a compile cache gives).
//!
//! Run with `cargo bench --bench runtime` (builds plugins/echo first).

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use roost::plugin::bindings::{Action, Message, MessageFlags, Outgoing};
use roost::plugin::state::HostState;
use roost::plugin::{Limits, PersonaContext, Runtime, RuntimeConfig, Sandbox};

fn echo_wasm() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let opts = roost::build::BuildOptions {
        path: root.join("plugins/echo"),
        output: None,
    };
    roost::build::build_persona(&opts).expect("build plugins/echo")
}

/// What echo does, natively.
fn native_echo(name: &str, msg: &Message) -> Vec<Action> {
    let text = msg.text.trim();
    let at = format!("@{name}");
    let rest = if let Some(i) = text.to_lowercase().find(&at.to_lowercase()) {
        let mut s = String::with_capacity(text.len());
        s.push_str(&text[..i]);
        s.push_str(&text[i + at.len()..]);
        s.trim().to_string()
    } else if text.to_lowercase().starts_with(&name.to_lowercase()) {
        text[name.len()..]
            .trim_start_matches([':', ','])
            .trim()
            .to_string()
    } else {
        return Vec::new();
    };
    if rest.is_empty() {
        return Vec::new();
    }
    vec![Action::Say(Outgoing {
        room: msg.room.clone(),
        text: rest,
    })]
}

fn per_iter(total: Duration, n: u32) -> f64 {
    total.as_nanos() as f64 / n as f64
}

fn main() {
    let path = echo_wasm();
    let rt = Runtime::new(RuntimeConfig::default()).expect("runtime");
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");

    // Loading from a file (compile + contract check + pre-instantiation).
    let loads = 10;
    let start = Instant::now();
    for _ in 0..loads {
        black_box(rt.load_file(&path).expect("load"));
    }
    let load_file_ms = per_iter(start.elapsed(), loads) / 1e6;

    let bytes = std::fs::read(&path).expect("read");
    let precompiled = rt
        .engine()
        .precompile_component(&bytes)
        .expect("precompile");
    let start = Instant::now();
    for _ in 0..loads {
        // SAFETY: the bytes were produced by this engine just above.
        let c = unsafe { wasmtime::component::Component::deserialize(rt.engine(), &precompiled) }
            .expect("deserialize");
        black_box(
            rt.prepare("echo", "echo.wasm", c, bytes.len())
                .expect("prepare"),
        );
    }
    let load_precompiled_ms = per_iter(start.elapsed(), loads) / 1e6;

    let component = Arc::new(rt.load_file(&path).expect("load"));

    // Fresh instances.
    let n_inst = 2_000;
    let inst_total = tokio.block_on(async {
        let ctx = PersonaContext::sandbox("echo");
        let start = Instant::now();
        for _ in 0..n_inst {
            let mut store =
                wasmtime::Store::new(rt.engine(), HostState::new(ctx.clone(), Limits::default()));
            store.limiter(|s| &mut s.limiter);
            store.set_epoch_deadline(u64::MAX / 2);
            black_box(
                component
                    .pre
                    .instantiate_async(&mut store)
                    .await
                    .expect("instantiate"),
            );
        }
        start.elapsed()
    });
    let instantiate_us = per_iter(inst_total, n_inst) / 1e3;

    // on-message through the sandbox against the native baseline.
    let msg = Message {
        room: "lobby".into(),
        sender: "ada".into(),
        text: "@echo the quick brown fox jumps over the lazy dog".into(),
        timestamp_ms: 1_769_790_508_965,
        flags: MessageFlags::MENTIONS_ME,
    };
    let n_calls = 20_000;
    let call_total = tokio.block_on(async {
        let ctx = PersonaContext::sandbox("echo");
        let mut sb = Sandbox::new(rt.clone(), component.clone(), ctx, Limits::default());
        sb.describe().await.expect("describe");
        for _ in 0..1_000 {
            black_box(sb.on_message(&msg).await.expect("warm-up"));
        }
        let start = Instant::now();
        for _ in 0..n_calls {
            black_box(sb.on_message(black_box(&msg)).await.expect("call"));
        }
        start.elapsed()
    });
    let on_message_ns = per_iter(call_total, n_calls);

    let n_native = 200_000;
    let start = Instant::now();
    for _ in 0..n_native {
        black_box(native_echo(black_box("echo"), black_box(&msg)));
    }
    let native_ns = per_iter(start.elapsed(), n_native);

    let report = serde_json::json!({
        "bench": "runtime",
        "pooling_allocator": rt.pooling(),
        "component_bytes": bytes.len(),
        "on_message_ns": on_message_ns.round(),
        "native_ns": native_ns.round(),
        "sandbox_over_native": (on_message_ns / native_ns * 10.0).round() / 10.0,
        "instantiate_us": (instantiate_us * 10.0).round() / 10.0,
        "load_file_ms": (load_file_ms * 100.0).round() / 100.0,
        "load_precompiled_ms": (load_precompiled_ms * 100.0).round() / 100.0,
        "compile_over_precompiled": (load_file_ms / load_precompiled_ms * 10.0).round() / 10.0,
    });
    println!("{report}");
}
