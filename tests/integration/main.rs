//! roost's integration tests, compiled into one binary (see host/Cargo.toml).
//! Every test binds 127.0.0.1:0 and never reaches the internet.

mod guests;
mod llm;
mod runtime;
mod session;
mod policy;
mod bots;
mod replay;
mod telemetry;
mod dev;
mod reload;
mod capabilities;
mod python;
