//! The data of one persona's `Store`: WASI with nothing granted, the resource
//! limiter, the persona's context and the per-call clock.

use std::sync::Arc;
use std::time::Duration;

use std::time::Instant;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::log::Level;
use super::context::PersonaContext;
use super::limits::{LimitHit, Limiter, Limits};

/// Per-call accounting used by the epoch callback to tell the guest's CPU time from
/// the host's work for it and from network waits. Real time (`std::time::Instant`),
/// not tokio's clock: a paused test clock must not stop the limits.
#[derive(Debug, Clone, Copy)]
pub struct CallClock {
    pub started: Instant,
    /// Time spent inside host functions that work for the persona (`kv`, `history`,
    /// `log`, `config`) during this call: charged against `host_per_call`.
    pub host_time: Duration,
    /// Time spent waiting on the network for the persona (`llm`): charged against
    /// neither the CPU nor the host limit (tokens, timeouts and concurrency budget it;
    /// the wall-time limit still bounds it).
    pub io_wait: Duration,
}

impl CallClock {
    pub fn new() -> Self {
        CallClock {
            started: Instant::now(),
            host_time: Duration::ZERO,
            io_wait: Duration::ZERO,
        }
    }

    /// Guest CPU time so far: wall time minus time spent in the host.
    pub fn guest_time(&self) -> Duration {
        self.started
            .elapsed()
            .saturating_sub(self.host_time)
            .saturating_sub(self.io_wait)
    }
}

impl Default for CallClock {
    fn default() -> Self {
        CallClock::new()
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
            clock: CallClock::new(),
            limits,
        }
    }

    /// Runs host work for the persona (`kv`, `history`, ...) and charges its time
    /// against the call's host budget. Once the budget is spent the limit is recorded
    /// and the epoch callback stops the guest at its next tick.
    pub async fn host_work<F: Future>(&mut self, fut: F) -> F::Output {
        let start = Instant::now();
        let out = fut.await;
        self.charge_host(start.elapsed());
        out
    }

    /// Books `spent` as host time of this call (see [`HostState::host_work`]).
    pub fn charge_host(&mut self, spent: Duration) {
        self.clock.host_time += spent;
        if self.host_budget_spent() && self.limiter.hit.is_none() {
            self.limiter.hit = Some(LimitHit::Host {
                limit: self.limits.host_per_call,
            });
        }
    }

    /// Whether this call has used up its host budget: further host work is refused
    /// and the guest is stopped at its next epoch tick.
    pub fn host_budget_spent(&self) -> bool {
        self.clock.host_time > self.limits.host_per_call
    }

    /// Runs a network wait (`llm`) and books it as I/O: charged against neither the
    /// CPU nor the host limit.
    pub async fn io_wait<F: Future>(&mut self, fut: F) -> F::Output {
        let start = Instant::now();
        let out = fut.await;
        self.clock.io_wait += start.elapsed();
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
