//! Host implementations of the persona's imports, one file per WIT interface.
//!
//! `log` and `config` are always granted. `llm`, `kv` and `history` are served by
//! backends in [`Grants`](super::context::Grants); a persona without a grant gets a
//! typed `denied` error naming the config key that grants it — never a trap and
//! never an instantiation failure.

mod config;
mod history;
mod kv;
mod llm;
mod log;
mod types;
