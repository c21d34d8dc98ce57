//! The sandboxed persona runtime.
//!
//! One shared [`Runtime`] (a wasmtime engine with async support, epoch
//! interruption and, where the machine allows it, the pooling allocator) compiles
//! each persona once into a pre-instantiated [`PersonaComponent`] (identical bytes
//! share one compiled component); each bot gets a [`Sandbox`]: an instance (in its
//! own `Store`) only while it needs one, from the runtime's bounded
//! [`InstancePool`], limits on every call, a fresh instance after any failure, and
//! quarantine for a persona that keeps failing.
//!
//! ```no_run
//! use std::sync::Arc;
//! use roost::plugin::{Limits, PersonaContext, Runtime, RuntimeConfig, Sandbox};
//! use roost::plugin::bindings::{Message, MessageFlags};
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let runtime = Runtime::new(RuntimeConfig::default())?;
//! let component = Arc::new(runtime.load_file("plugins/echo.wasm".as_ref())?);
//! let ctx = PersonaContext::sandbox("echo");
//! let mut sandbox = Sandbox::new(runtime, component, ctx, Limits::default());
//! let manifest = sandbox.describe().await?;
//! let msg = Message {
//!     room: "lobby".into(),
//!     sender: "ada".into(),
//!     text: format!("@{} hello", manifest.name),
//!     timestamp_ms: 1,
//!     flags: MessageFlags::MENTIONS_ME,
//! };
//! let actions = sandbox.on_message(&msg).await?;
//! # Ok(()) }
//! ```

pub mod bindings;
pub mod cache;
pub mod component;
pub mod context;
pub mod engine;
mod host;
pub mod limits;
pub mod logsink;
pub mod manifest;
pub mod pool;
pub mod sandbox;
pub mod state;

pub use cache::{CacheOutcome, CompileCache};
pub use component::{ContractInfo, LoadError, PersonaComponent, SharedCode};
pub use context::{Grants, PersonaContext};
pub use engine::{Runtime, RuntimeConfig};
pub use limits::{LimitHit, Limits};
pub use pool::{InstancePool, PoolStats};
pub use sandbox::{CallFailure, FailureKind, Instance, Sandbox};
