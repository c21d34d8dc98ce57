//! roost's integration tests, compiled into one binary (see host/Cargo.toml).
//! Every test binds 127.0.0.1:0 and never reaches the internet.

mod bots;
mod capabilities;
mod cli;
mod dev;
mod fixtures;
mod guests;
mod llm;
mod policy;
mod pool;
mod python;
mod reload;
mod replay;
mod rooms;
mod runtime;
mod session;
mod shadow;
mod shared_store;
mod status;
mod support;
mod telemetry;
