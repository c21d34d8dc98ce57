//! roost: a host for chat bots whose behaviour lives in sandboxed WebAssembly
//! components ("personas").
//!
//! The native host owns everything that must be right every time (identity, the
//! socket, reconnection, keepalive, rate limits, security filters, secrets,
//! persistence); a persona owns only the decision "what, if anything, do I say to
//! this message". See README.md for the architecture.

pub mod bot;
pub mod build;
pub mod check;
pub mod config;
pub mod dev;
pub mod devserver;
pub mod lease;
pub mod llm;
pub mod names;
pub mod os;
pub mod plugin;
pub mod policy;
pub mod protocol;
pub mod scaffold;
pub mod session;
pub mod status;
pub mod store;
pub mod telemetry;
