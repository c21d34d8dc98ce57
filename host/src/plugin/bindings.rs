//! The one `bindgen!` of the host: Rust types and traits generated from `wit/`
//! (package `roost:persona@0.1.0`, world `persona`).
//!
//! Every import is async so host capabilities (LLM calls, the store) can wait
//! without blocking a thread; every export is called with `call_*_async`, which is
//! what lets epoch interruption and the wall-clock timeout bound a call.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "persona",
    imports: { default: async },
    exports: { default: async },
});

// `self::`: the generated module `roost` would otherwise be ambiguous with this
// crate's own name when rustdoc compiles the crate for doctests.
pub use self::roost::persona::types::{Denied, MessageFlags, Outgoing, Subscriptions};
pub use self::roost::persona::{config, history, kv, llm, log};

/// The WIT package this host serves (namespace and name, without the version).
pub const WIT_PACKAGE: &str = "roost:persona";
/// The WIT package version this host serves (semver; 0.1.x guests are accepted).
pub const WIT_VERSION: &str = "0.1.0";
/// The interfaces of the package a persona may import, with the capability they carry.
pub const CAPABILITIES: &[&str] = &["llm", "kv", "history", "log", "config"];
