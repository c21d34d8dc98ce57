//! The data of one persona's `Store`: WASI with nothing granted, the resource
//! limiter, the persona's context and the per-call clock.

use std::sync::Arc;
use std::time::Duration;

use std::time::Instant;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::log::Level;
use super::context::PersonaContext;
use super::limits::{Limiter, Limits};

/// Per-call accounting used by the epoch callback to tell CPU time from host waits.
/// Real time (`std::time::Instant`), not tokio's clock: a paused test clock must not
/// stop the CPU limit.
#[derive(Debug, Clone, Copy)]
pub struct CallClock {
    pub started: Instant,
    /// Time spent inside async host functions (LLM, store) during this call.
    pub host_wait: Duration,
}

impl CallClock {
    /// Guest CPU time so far: wall time minus time spent waiting on the host.
    pub fn guest_time(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.host_wait)
    }
}

/// `T` of `Store<T>` for personas.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limiter: Limiter,
    pub ctx: Arc<PersonaContext>,
    pub clock: CallClock,
    pub limits: Limits,
}

impl HostState {
    /// WASI p2 with nothing granted: no preopened directories, no environment, no
    /// arguments, no sockets or name lookups; stdout/stderr become log lines tagged
    /// with the persona's name; stdin is empty.
    pub fn new(ctx: Arc<PersonaContext>, limits: Limits) -> Self {
        let wasi = WasiCtxBuilder::new()
            .stdout(ctx.log.stream(Level::Info))
            .stderr(ctx.log.stream(Level::Warn))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }))
            .build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter::new(limits.clone()),
            ctx,
            clock: CallClock {
                started: Instant::now(),
                host_wait: Duration::ZERO,
            },
            limits,
        }
    }

    /// Runs a host wait (LLM, store) and books its duration as host time, so it is
    /// not charged against the persona's CPU limit.
    pub async fn host_wait<F: Future>(&mut self, fut: F) -> F::Output {
        let start = Instant::now();
        let out = fut.await;
        self.clock.host_wait += start.elapsed();
        out
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}
