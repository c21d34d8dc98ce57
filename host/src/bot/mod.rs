//! Bots: a persona, a session and a policy, wired together.
//!
//! - [`core`]: the decision pipeline (inbound policy → persona → outbound policy),
//!   shared by live bots and `roost replay`;
//! - [`runner`]: a live bot — its session, its bounded inbound queue (the oldest
//!   message dropped on overflow, logged and counted), and a worker handling its
//!   messages in order; bots run concurrently, so a slow persona delays only itself;
//! - [`host`]: `roost run` — one bot per `DIR/*.wasm`;
//! - [`reload`]: hot reload of `DIR` and the compile cache at start-up;
//! - [`replay`]: `roost replay` — recorded chat through the pipeline, offline;
//! - [`shadow`]: shadow personas — a new version that listens beside the live one,
//!   never speaks, and is compared with it;
//! - [`rooms`]: limits on a persona's joins and leaves;
//! - [`context`]: what every bot of a host shares;
//! - [`stats`]: what bots and the reloader count, for metrics and the status page;
//! - [`compare`]: live and shadow actions compared, and the board status reads.

pub mod caps;
pub mod compare;
pub mod context;
pub mod core;
pub mod history;
pub mod host;
pub mod reload;
pub mod replay;
pub mod rooms;
pub mod runner;
pub mod shadow;
pub mod stats;

pub use context::HostContext;
pub use runner::Bot;
