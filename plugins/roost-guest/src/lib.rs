//! Guest-side bindings and helpers for roost personas written in Rust.
//!
//! roost runs each chat-bot persona as a WebAssembly component of the world
//! `roost:persona/persona@0.1.0` (the WIT files in the repository's `wit/` folder are
//! the contract). This crate runs `wit_bindgen::generate!` once against that WIT and
//! re-exports the result, so a persona needs no WIT files and no `generate!` of its own:
//!
//! - [`Guest`]: the trait a persona implements (`describe` and `on_message`), and
//!   [`export!`] to export it from the component;
//! - [`types`]: [`Message`], [`MessageFlags`](types::MessageFlags), [`Action`],
//!   [`Outgoing`](types::Outgoing), [`Manifest`],
//!   [`Subscriptions`](types::Subscriptions), [`Denied`](types::Denied);
//! - the host's capabilities: [`config`] and [`log`] (always granted), [`kv`],
//!   [`history`] and [`llm`] (granted by the operator; otherwise every call returns
//!   an ordinary `Err(Error::Denied(..))`, never a trap);
//! - helpers for chat text: [`mention_rest`], [`parse_join_line`], [`say`], and the
//!   logging macros [`trace!`], [`debug!`], [`info!`], [`warn!`], [`error!`];
//! - [`spotlight`]: fencing untrusted chat text before it goes into an LLM prompt.
//!
//! # A complete persona
//!
//! `Cargo.toml` (build with `roost build PATH`, or
//! `cargo build --release --target wasm32-wasip2`):
//!
//! ```toml
//! [package]
//! name = "shout"
//! version = "0.1.0"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! roost-guest = { path = "../roost-guest" }
//! ```
//!
//! `src/lib.rs`:
//!
//! ```
//! use roost_guest::types::{Action, Manifest, Message, MessageFlags, Subscriptions};
//! use roost_guest::{Guest, config, mention_rest, say};
//!
//! struct Shout;
//!
//! impl Guest for Shout {
//!     fn describe() -> Manifest {
//!         Manifest {
//!             name: "shout".into(),
//!             description: "Repeats what you tell it, louder.".into(),
//!             rooms: vec!["lobby".into()],
//!             version: env!("CARGO_PKG_VERSION").into(),
//!             subscriptions: Subscriptions::empty(),
//!         }
//!     }
//!
//!     fn on_message(msg: Message) -> Vec<Action> {
//!         if !msg.flags.contains(MessageFlags::MENTIONS_ME)
//!             || msg.flags.intersects(MessageFlags::FROM_SELF | MessageFlags::SYSTEM)
//!         {
//!             return vec![];
//!         }
//!         let me = config::bot_name();
//!         match mention_rest(&msg.text, &me) {
//!             Some(rest) if !rest.is_empty() => {
//!                 roost_guest::debug!("shouting at {}", msg.sender);
//!                 vec![say(msg.room, rest.to_uppercase())]
//!             }
//!             _ => vec![],
//!         }
//!     }
//! }
//!
//! roost_guest::export!(Shout);
//! # fn main() {}
//! ```
//!
//! # Native builds
//!
//! The bindings compile for any target, so a persona's pure logic can be unit-tested
//! with a plain `cargo test`. Only on `wasm32` are the host functions real: called
//! natively, an import panics (`unreachable`). Keep host calls out of the code under
//! test, as the helpers in this crate do.
//!
//! # Traps
//!
//! A panic (on `wasm32-wasip2` there is no unwinding) prints its message to stderr,
//! which the host logs under the persona's name, and traps. The host then fails that
//! one call, discards the instance and answers the next message with a fresh one, so
//! anything kept in memory (statics) is lost; keep what must survive in [`kv`].

pub mod spotlight;
mod text;

pub use text::{mention_rest, parse_join_line};

/// The generated bindings. Use the re-exports at the crate root instead; this module
/// is public only because the [`export!`] macro expands to paths inside it.
#[doc(hidden)]
#[allow(clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "persona",
        path: "../../wit",
        pub_export_macro: true,
        default_bindings_module: "roost_guest::bindings",
        // So personas can compare messages and actions in their unit tests.
        additional_derives: [PartialEq],
    });
}

pub use bindings::Guest;

/// Exports a type implementing [`Guest`] as this component's `describe` and
/// `on-message`: `roost_guest::export!(MyPersona);`, once, in the persona crate.
///
/// (A thin wrapper over the macro wit-bindgen generates, using `$crate` so it works
/// whatever name the persona gives this dependency.)
#[macro_export]
macro_rules! export {
    ($ty:ident) => {
        $crate::bindings::export!($ty with_types_in $crate::bindings);
    };
}
pub use bindings::roost::persona::{config, history, kv, llm, log, types};
pub use types::{Action, Manifest, Message};

/// The action "post `text` in `room`".
///
/// ```
/// use roost_guest::{say, types::{Action, Outgoing}};
/// assert_eq!(
///     say("lobby", "hi"),
///     Action::Say(Outgoing { room: "lobby".into(), text: "hi".into() }),
/// );
/// ```
pub fn say(room: impl Into<String>, text: impl Into<String>) -> Action {
    Action::Say(types::Outgoing {
        room: room.into(),
        text: text.into(),
    })
}

/// Writes a formatted line to the host's log at `level` ([`log::Level`]).
///
/// `roost_guest::log_at!(roost_guest::log::Level::Info, "hello {}", name)`; the
/// shorthands [`trace!`], [`debug!`], [`info!`], [`warn!`] and [`error!`] are usually
/// nicer. The host tags every line with the persona's name and rate-limits them.
#[macro_export]
macro_rules! log_at {
    ($level:expr, $($arg:tt)+) => {
        $crate::log::log($level, &::std::format!($($arg)+))
    };
}

/// Logs a formatted line at trace level: `roost_guest::trace!("x = {x}")`.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::log_at!($crate::log::Level::Trace, $($arg)+) };
}

/// Logs a formatted line at debug level: `roost_guest::debug!("x = {x}")`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log_at!($crate::log::Level::Debug, $($arg)+) };
}

/// Logs a formatted line at info level: `roost_guest::info!("greeted {name}")`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log_at!($crate::log::Level::Info, $($arg)+) };
}

/// Logs a formatted line at warn level: `roost_guest::warn!("kv failed: {e:?}")`.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log_at!($crate::log::Level::Warn, $($arg)+) };
}

/// Logs a formatted line at error level: `roost_guest::error!("giving up: {e:?}")`.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log_at!($crate::log::Level::Error, $($arg)+) };
}
