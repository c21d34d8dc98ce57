//! One bot's sandbox: an instance of its persona when it needs one, limits on every
//! call, a fresh instance after any failure, and quarantine for a persona that keeps
//! failing.
//!
//! **Instances follow activity.** A sandbox owns no instance between calls. A call
//! takes the sandbox's warm instance back from the runtime's [`InstancePool`], or a
//! slot there and a fresh instance (each instance has its own `Store`). After a
//! successful call the instance goes back to the pool, warm but reclaimable: the pool
//! drops it when another bot needs its slot and it is the least recently used, or
//! when it has been idle for `[runtime] instance_idle_secs`. A full pool makes a call
//! wait for a slot, at most the call's wall-clock limit ([`FailureKind::PoolFull`]
//! after that, which does not count towards quarantine). So a persona's memory may
//! be reset between any two messages: what must last belongs in `kv`.
//!
//! A call that traps, hits a limit or times out fails alone: the error names the
//! persona, the message and the limit, the instance is discarded, and the next
//! message gets a fresh one. When at least `quarantine_failure_ratio` of the persona's
//! last `quarantine_window` calls failed (default 5 of 10, in any order: successes in
//! between do not reset the count), it is quarantined for 30 s, doubling on every
//! relapse up to 30 min; while quarantined its messages are skipped. Released, it is on
//! probation: its first failure quarantines it again. A whole window of successes ends
//! the quarantine cycle (the next quarantine is 30 s again).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use wasmtime::{Store, Trap, UpdateDeadline};

use super::bindings::{Action, Manifest, Message, Persona, PersonaPre};
use super::component::{PersonaComponent, one_line};
use super::context::PersonaContext;
use super::engine::{Runtime, pooling_refused};
use super::limits::{LimitHit, Limits};
use super::pool::{InstancePool, Lease, SeatId};
use super::state::HostState;

/// First quarantine.
pub const QUARANTINE_BASE: Duration = Duration::from_secs(30);
/// Longest quarantine.
pub const QUARANTINE_CAP: Duration = Duration::from_secs(30 * 60);

/// Why a call failed.
#[derive(Debug, Clone, PartialEq)]
pub enum FailureKind {
    /// A limit stopped it.
    Limit(LimitHit),
    /// The guest trapped (a panic, an abort, an out-of-bounds access, ...).
    Trap(String),
    /// The instance could not be created.
    Instantiate(String),
    /// The persona is quarantined; the call was not made.
    Quarantined { remaining: Duration },
    /// No instance slot became free within the call's wall-clock limit: every
    /// instance of the pool was in the middle of a call. Not the persona's fault: it
    /// does not count towards quarantine.
    PoolFull { capacity: usize, waited: Duration },
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureKind::Limit(hit) => hit.fmt(f),
            FailureKind::Trap(t) => write!(f, "trapped: {t}"),
            FailureKind::Instantiate(e) => write!(f, "could not be instantiated: {e}"),
            FailureKind::Quarantined { remaining } => {
                write!(
                    f,
                    "quarantined for another {} s",
                    remaining.as_secs().max(1)
                )
            }
            FailureKind::PoolFull { capacity, waited } => write!(
                f,
                "no instance slot became free within {} s: all {capacity} instances of the pool were in the middle of calls (raise [runtime] pool_instances)",
                waited.as_secs_f64()
            ),
        }
    }
}

/// A failed call: which persona, during what, and why. One line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("persona `{persona}` failed in {during}: {kind}")]
pub struct CallFailure {
    pub persona: String,
    pub during: String,
    pub kind: FailureKind,
}

/// Upper bounds (seconds) of the call-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0,
];

/// Counters for one sandbox.
#[derive(Debug, Clone, Default)]
pub struct SandboxStats {
    pub calls: u64,
    pub failures: u64,
    pub instances_created: u64,
    pub quarantines: u64,
    pub last_latency: Option<Duration>,
    /// Calls per latency bucket ([`LATENCY_BUCKETS`], plus one for +Inf); not cumulative.
    pub latency_buckets: [u64; LATENCY_BUCKETS.len() + 1],
    /// Sum of all call latencies, seconds.
    pub latency_sum: f64,
}

impl SandboxStats {
    fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency_buckets[i] += 1;
        self.latency_sum += secs;
        self.last_latency = Some(d);
    }
}

/// The persona's recent record: the outcome of its latest calls (`true`: failed),
/// and its quarantine.
#[derive(Debug, Default)]
struct Health {
    /// The latest calls, oldest first, at most `quarantine_window` of them.
    recent: VecDeque<bool>,
    /// Quarantines entered in this cycle (sets the backoff).
    level: u32,
    until: Option<Instant>,
    /// Released from quarantine and not yet successful: one failure re-quarantines.
    probation: bool,
}

impl Health {
    fn failures(&self) -> u32 {
        self.recent.iter().filter(|f| **f).count() as u32
    }

    /// Books one call; `true` when the persona is to be quarantined now.
    fn note(&mut self, failed: bool, limits: &Limits) -> bool {
        let window = limits.quarantine_window.max(1) as usize;
        self.recent.push_back(failed);
        while self.recent.len() > window {
            self.recent.pop_front();
        }
        if !failed {
            self.probation = false;
            // A whole window without a failure ends the quarantine cycle.
            if self.recent.len() == window && self.failures() == 0 {
                self.level = 0;
            }
            return false;
        }
        self.probation || self.failures() >= limits.quarantine_failures()
    }
}

/// One live instance of a persona: its own `Store` and the instance in it. Held by
/// the runtime's [`InstancePool`] between calls.
pub struct Instance {
    store: Store<HostState>,
    persona: Persona,
}

/// One bot's persona (instantiated while it needs it) and its failure bookkeeping.
pub struct Sandbox {
    runtime: Runtime,
    component: Arc<PersonaComponent>,
    ctx: Arc<PersonaContext>,
    limits: Limits,
    /// This sandbox's place in the instance pool.
    seat: SeatId,
    health: Health,
    stats: SandboxStats,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.runtime.pool().discard(self.seat);
    }
}

impl Sandbox {
    pub fn new(
        runtime: Runtime,
        component: Arc<PersonaComponent>,
        ctx: Arc<PersonaContext>,
        limits: Limits,
    ) -> Self {
        let seat = runtime.pool().seat();
        Sandbox {
            runtime,
            component,
            ctx,
            limits,
            seat,
            health: Health::default(),
            stats: SandboxStats::default(),
        }
    }

    pub fn label(&self) -> &str {
        &self.ctx.label
    }

    pub fn context(&self) -> &Arc<PersonaContext> {
        &self.ctx
    }

    pub fn component(&self) -> &Arc<PersonaComponent> {
        &self.component
    }

    /// The limits this sandbox enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn stats(&self) -> &SandboxStats {
        &self.stats
    }

    /// Whether the persona is quarantined right now, and for how long.
    pub fn quarantined_for(&self) -> Option<Duration> {
        let until = self.health.until?;
        let now = Instant::now();
        (until > now).then(|| until - now)
    }

    /// Whether the pool holds a warm instance of this persona for this sandbox now.
    pub fn is_warm(&self) -> bool {
        self.pool().is_idle(self.seat)
    }

    /// Replaces the component (hot reload): the next call instantiates the new one.
    /// Quarantine state is cleared: the new version gets a clean start.
    pub fn replace_component(&mut self, component: Arc<PersonaComponent>) {
        self.component = component;
        self.pool().discard(self.seat);
        self.health = Health::default();
    }

    /// Calls `describe` and returns the manifest.
    pub async fn describe(&mut self) -> Result<Manifest, CallFailure> {
        let during = "describe".to_string();
        self.gate(&during)?;
        let wall = self.limits.wall_per_call;
        let started = std::time::Instant::now();
        let mut lease = match self.checkout().await {
            Ok(lease) => lease,
            Err(kind) => {
                let out = self.fail_early(kind, started);
                return self.record(out, during);
            }
        };
        let Instance { store, persona } = &mut *lease;
        let result = tokio::time::timeout(wall, persona.call_describe(store)).await;
        let out = self.settle(lease, result, started, |limits, m: &Manifest| {
            let size = m.name.len()
                + m.description.len()
                + m.version.len()
                + m.rooms.iter().map(String::len).sum::<usize>();
            check_reply_size(limits, size, m.rooms.len())
        });
        self.record(out, during)
    }

    /// Calls `on-message` and returns the actions.
    pub async fn on_message(&mut self, msg: &Message) -> Result<Vec<Action>, CallFailure> {
        let during = format!(
            "on-message (message from `{}` in #{} at {})",
            msg.sender, msg.room, msg.timestamp_ms
        );
        self.gate(&during)?;
        let wall = self.limits.wall_per_call;
        let started = std::time::Instant::now();
        let mut lease = match self.checkout().await {
            Ok(lease) => lease,
            Err(kind) => {
                let out = self.fail_early(kind, started);
                return self.record(out, during);
            }
        };
        let Instance { store, persona } = &mut *lease;
        let result = tokio::time::timeout(wall, persona.call_on_message(store, msg)).await;
        let out = self.settle(lease, result, started, |limits, actions: &Vec<Action>| {
            let size: usize = actions.iter().map(action_bytes).sum();
            check_reply_size(limits, size, actions.len())
        });
        self.record(out, during)
    }

    /// Refuses the call while quarantined; logs the release when it ends.
    fn gate(&mut self, during: &str) -> Result<(), CallFailure> {
        if let Some(until) = self.health.until {
            let now = Instant::now();
            if until > now {
                return Err(self.failure(
                    during.to_string(),
                    FailureKind::Quarantined {
                        remaining: until - now,
                    },
                ));
            }
            self.health.until = None;
            self.health.probation = true;
            tracing::info!(
                persona = self.label(),
                "persona released from quarantine (on probation)"
            );
        }
        Ok(())
    }

    fn pool(&self) -> &InstancePool<Instance> {
        self.runtime.pool()
    }

    /// This sandbox's warm instance, or a slot in the pool and a fresh instance.
    /// Either way it is this call's alone until it goes back to the pool.
    async fn checkout(&mut self) -> Result<Lease<Instance>, FailureKind> {
        if let Some(mut lease) = self.pool().take_idle(self.seat) {
            begin_call(&mut lease.store);
            return Ok(lease);
        }
        let slot = self
            .pool()
            .acquire(self.limits.wall_per_call)
            .await
            .map_err(|e| FailureKind::PoolFull {
                capacity: e.capacity,
                waited: e.waited,
            })?;
        let pre = self.component.pre.clone();
        let instance = match self.instantiate(&pre).await {
            Err(Refused::Pooling(e)) => {
                // The pooling allocator is out of slots: allocate this one on demand.
                let pre = self
                    .component
                    .on_demand_pre(&self.runtime)
                    .map_err(|reason| FailureKind::Instantiate(format!("{e}; {reason}")))?;
                self.pool().note_on_demand();
                tracing::debug!(
                    persona = self.label(),
                    "pooling allocator refused an instance ({e}); allocated on demand"
                );
                self.instantiate(&pre).await.map_err(Refused::into_kind)?
            }
            other => other.map_err(Refused::into_kind)?,
        };
        let mut lease = Lease::new(slot, instance);
        begin_call(&mut lease.store);
        Ok(lease)
    }

    /// A new `Store` (of `pre`'s engine) and an instance of `pre` in it.
    async fn instantiate(&mut self, pre: &PersonaPre<HostState>) -> Result<Instance, Refused> {
        let mut store = Store::new(
            pre.engine(),
            HostState::new(self.ctx.clone(), self.limits.clone()),
        );
        store.limiter(|s| &mut s.limiter);
        let kv_value = self
            .ctx
            .grants
            .kv
            .as_ref()
            .map_or(0, |kv| kv.max_value_bytes());
        store.set_hostcall_fuel(self.limits.hostcall_fuel(kv_value));
        store.epoch_deadline_callback(|mut ctx| {
            let state = ctx.data_mut();
            if state.host_budget_spent() {
                if state.limiter.hit.is_none() {
                    state.limiter.hit = Some(LimitHit::Host {
                        limit: state.limits.host_per_call,
                    });
                }
                return Err(Trap::Interrupt.into());
            }
            if state.clock.guest_time() > state.limits.cpu_per_call {
                if state.limiter.hit.is_none() {
                    state.limiter.hit = Some(LimitHit::Cpu {
                        limit: state.limits.cpu_per_call,
                    });
                }
                return Err(Trap::Interrupt.into());
            }
            Ok(UpdateDeadline::Yield(1))
        });
        begin_call(&mut store);
        let wall = self.limits.wall_per_call;
        let inst = tokio::time::timeout(wall, pre.instantiate_async(&mut store)).await;
        self.stats.instances_created += 1;
        match inst {
            Err(_) => Err(Refused::Failed(FailureKind::Limit(LimitHit::Wall {
                limit: wall,
            }))),
            Ok(Err(e)) => Err(match store.data_mut().limiter.hit.take() {
                Some(hit) => Refused::Failed(FailureKind::Limit(hit)),
                None if self.runtime.pooling() && pooling_refused(&e) => {
                    Refused::Pooling(one_line(&e))
                }
                None => Refused::Failed(FailureKind::Instantiate(one_line(&e))),
            }),
            Ok(Ok(persona)) => Ok(Instance { store, persona }),
        }
    }

    /// A call that never reached the persona (no slot or no instance), booked as a
    /// call.
    fn fail_early<R>(
        &mut self,
        kind: FailureKind,
        started: std::time::Instant,
    ) -> Result<R, FailureKind> {
        self.stats.calls += 1;
        self.stats.observe(started.elapsed());
        Err(kind)
    }

    /// Turns the raw outcome of a call into a result. On success (with a reply
    /// within limits) the instance goes back to the pool, warm; on any failure it is
    /// dropped and its slot freed, so the next call gets a fresh one.
    fn settle<R>(
        &mut self,
        mut lease: Lease<Instance>,
        result: Result<wasmtime::Result<R>, tokio::time::error::Elapsed>,
        started: std::time::Instant,
        check: impl FnOnce(&Limits, &R) -> Result<(), FailureKind>,
    ) -> Result<R, FailureKind> {
        self.stats.calls += 1;
        self.stats.observe(started.elapsed());
        let wall = self.limits.wall_per_call;
        let stack = self.runtime.config().max_wasm_stack;
        let hit = lease.store.data_mut().limiter.hit.take();
        let out = match result {
            Err(_elapsed) => Err(FailureKind::Limit(LimitHit::Wall { limit: wall })),
            Ok(Err(e)) => Err(match hit {
                Some(hit) => FailureKind::Limit(hit),
                None => match e.downcast_ref::<Trap>() {
                    Some(Trap::StackOverflow) => {
                        FailureKind::Limit(LimitHit::Stack { limit: stack })
                    }
                    Some(Trap::UnreachableCodeReached) => FailureKind::Trap(
                        "wasm `unreachable` executed (the persona panicked or aborted)".into(),
                    ),
                    _ if is_fuel_exhausted(&e) => FailureKind::Limit(LimitHit::Transfer {
                        reply_limit: self.limits.reply_bytes,
                        fuel: lease.store.hostcall_fuel(),
                    }),
                    _ => FailureKind::Trap(one_line(&e)),
                },
            }),
            Ok(Ok(r)) => check(&self.limits, &r).map(|()| r),
        };
        if out.is_ok() {
            self.pool().put_idle(self.seat, lease);
        } else {
            drop(lease);
        }
        out
    }

    fn failure(&self, during: String, kind: FailureKind) -> CallFailure {
        CallFailure {
            persona: self.label().to_string(),
            during,
            kind,
        }
    }

    /// Books the outcome: logs failures, counts them, quarantines repeat offenders.
    fn record<R>(&mut self, out: Result<R, FailureKind>, during: String) -> Result<R, CallFailure> {
        match out {
            Ok(r) => {
                self.health.note(false, &self.limits);
                Ok(r)
            }
            Err(kind @ FailureKind::PoolFull { .. }) => {
                let failure = self.failure(during, kind);
                self.stats.failures += 1;
                tracing::warn!(persona = self.label(), "{failure}");
                Err(failure)
            }
            Err(kind) => {
                let failure = self.failure(during, kind);
                self.stats.failures += 1;
                tracing::warn!(persona = self.label(), "{failure}; instance discarded");
                if self.health.note(true, &self.limits) {
                    let backoff = quarantine_backoff(self.health.level);
                    self.health.level += 1;
                    self.health.recent.clear();
                    self.health.probation = false;
                    self.health.until = Some(Instant::now() + backoff);
                    self.stats.quarantines += 1;
                    tracing::warn!(
                        persona = self.label(),
                        seconds = backoff.as_secs(),
                        "persona quarantined for {} s: {} of its last {} calls failed",
                        backoff.as_secs(),
                        self.limits.quarantine_failures(),
                        self.limits.quarantine_window
                    );
                }
                Err(failure)
            }
        }
    }
}

/// Why an instantiation failed: a failure of the call, or the pooling allocator's
/// refusal (then on-demand allocation is tried).
enum Refused {
    Failed(FailureKind),
    Pooling(String),
}

impl Refused {
    fn into_kind(self) -> FailureKind {
        match self {
            Refused::Failed(kind) => kind,
            Refused::Pooling(e) => FailureKind::Instantiate(e),
        }
    }
}

fn check_reply_size(limits: &Limits, bytes: usize, actions: usize) -> Result<(), FailureKind> {
    if actions > limits.actions {
        return Err(FailureKind::Limit(LimitHit::Actions {
            limit: limits.actions,
            got: actions,
        }));
    }
    if bytes > limits.reply_bytes {
        return Err(FailureKind::Limit(LimitHit::ReplyBytes {
            limit: limits.reply_bytes,
            got: bytes,
        }));
    }
    Ok(())
}

/// wasmtime's error when a transfer from the guest ran out of hostcall fuel (its type
/// is private; its message is stable).
fn is_fuel_exhausted(e: &wasmtime::Error) -> bool {
    e.chain().any(|c| {
        c.to_string()
            .contains("fuel allocated for hostcalls has been exhausted")
    })
}

fn begin_call(store: &mut Store<HostState>) {
    let state = store.data_mut();
    state.clock = super::state::CallClock::new();
    state.limiter.hit = None;
    store.set_epoch_deadline(1);
}

/// 30 s, 60 s, 120 s, ... capped at 30 min.
pub fn quarantine_backoff(level: u32) -> Duration {
    QUARANTINE_BASE
        .saturating_mul(1u32 << level.min(16))
        .min(QUARANTINE_CAP)
}

fn action_bytes(a: &Action) -> usize {
    match a {
        Action::Say(o) => o.room.len() + o.text.len(),
        Action::Join(r) | Action::Leave(r) => r.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantine_doubles_up_to_the_cap() {
        assert_eq!(quarantine_backoff(0), Duration::from_secs(30));
        assert_eq!(quarantine_backoff(1), Duration::from_secs(60));
        assert_eq!(quarantine_backoff(5), Duration::from_secs(960));
        assert_eq!(quarantine_backoff(6), QUARANTINE_CAP);
        assert_eq!(quarantine_backoff(40), QUARANTINE_CAP);
    }
}
