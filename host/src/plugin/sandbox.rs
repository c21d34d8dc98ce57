//! One bot's sandbox: a `Store` and an instance of its persona, limits on every
//! call, a fresh instance after any failure, and quarantine for a persona that keeps
//! failing.
//!
//! A call that traps, hits a limit or times out fails alone: the error names the
//! persona, the message and the limit, the instance is discarded, and the next
//! message gets a fresh one. After [`QUARANTINE_AFTER`] consecutive failures the
//! persona is quarantined for 30 s, doubling on every relapse up to 30 min; while
//! quarantined its messages are skipped. A success ends the quarantine cycle.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use wasmtime::{Store, Trap, UpdateDeadline};

use super::bindings::{Action, Manifest, Message, Persona};
use super::component::{PersonaComponent, one_line};
use super::context::PersonaContext;
use super::engine::Runtime;
use super::limits::{LimitHit, Limits};
use super::state::HostState;

/// Consecutive failures that quarantine a persona.
pub const QUARANTINE_AFTER: u32 = 5;
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

#[derive(Debug, Default)]
struct Health {
    consecutive: u32,
    /// Quarantines entered in this cycle (sets the backoff).
    level: u32,
    until: Option<Instant>,
    /// Released from quarantine and not yet successful: one failure re-quarantines.
    probation: bool,
}

struct Live {
    store: Store<HostState>,
    persona: Persona,
}

/// One bot's persona instance and its failure bookkeeping.
pub struct Sandbox {
    runtime: Runtime,
    component: Arc<PersonaComponent>,
    ctx: Arc<PersonaContext>,
    limits: Limits,
    live: Option<Live>,
    health: Health,
    stats: SandboxStats,
}

impl Sandbox {
    pub fn new(
        runtime: Runtime,
        component: Arc<PersonaComponent>,
        ctx: Arc<PersonaContext>,
        limits: Limits,
    ) -> Self {
        Sandbox {
            runtime,
            component,
            ctx,
            limits,
            live: None,
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

    pub fn stats(&self) -> &SandboxStats {
        &self.stats
    }

    /// Whether the persona is quarantined right now, and for how long.
    pub fn quarantined_for(&self) -> Option<Duration> {
        let until = self.health.until?;
        let now = Instant::now();
        (until > now).then(|| until - now)
    }

    /// Replaces the component (hot reload): the next call instantiates the new one.
    /// Quarantine state is cleared: the new version gets a clean start.
    pub fn replace_component(&mut self, component: Arc<PersonaComponent>) {
        self.component = component;
        self.live = None;
        self.health = Health::default();
    }

    /// Calls `describe` and returns the manifest.
    pub async fn describe(&mut self) -> Result<Manifest, CallFailure> {
        let during = "describe".to_string();
        self.gate(&during)?;
        let wall = self.limits.wall_per_call;
        let started = std::time::Instant::now();
        let result = async {
            let live = self.ensure_live().await?;
            let fut = live.persona.call_describe(&mut live.store);
            Ok::<_, FailureKind>(tokio::time::timeout(wall, fut).await)
        }
        .await;
        let out = self.settle(result, started).and_then(|m: Manifest| {
            let size = m.name.len()
                + m.description.len()
                + m.version.len()
                + m.rooms.iter().map(String::len).sum::<usize>();
            self.check_reply_size(size, m.rooms.len())?;
            Ok(m)
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
        let result = async {
            let live = self.ensure_live().await?;
            let fut = live.persona.call_on_message(&mut live.store, msg);
            Ok::<_, FailureKind>(tokio::time::timeout(wall, fut).await)
        }
        .await;
        let out = self
            .settle(result, started)
            .and_then(|actions: Vec<Action>| {
                let size: usize = actions.iter().map(action_bytes).sum();
                self.check_reply_size(size, actions.len())?;
                Ok(actions)
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

    async fn ensure_live(&mut self) -> Result<&mut Live, FailureKind> {
        if self.live.is_none() {
            let mut store = Store::new(
                self.runtime.engine(),
                HostState::new(self.ctx.clone(), self.limits.clone()),
            );
            store.limiter(|s| &mut s.limiter);
            store.epoch_deadline_callback(|mut ctx| {
                let state = ctx.data_mut();
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
            let inst =
                tokio::time::timeout(wall, self.component.pre.instantiate_async(&mut store)).await;
            self.stats.instances_created += 1;
            let persona = match inst {
                Err(_) => return Err(FailureKind::Limit(LimitHit::Wall { limit: wall })),
                Ok(Err(e)) => {
                    return Err(match store.data_mut().limiter.hit.take() {
                        Some(hit) => FailureKind::Limit(hit),
                        None => FailureKind::Instantiate(one_line(&e)),
                    });
                }
                Ok(Ok(p)) => p,
            };
            self.live = Some(Live { store, persona });
        }
        let live = self
            .live
            .as_mut()
            .ok_or_else(|| FailureKind::Instantiate("no instance".into()))?;
        begin_call(&mut live.store);
        Ok(live)
    }

    /// Turns the raw outcome of a call into a result, discarding the instance on any
    /// failure.
    fn settle<R>(
        &mut self,
        result: Result<Result<wasmtime::Result<R>, tokio::time::error::Elapsed>, FailureKind>,
        started: std::time::Instant,
    ) -> Result<R, FailureKind> {
        self.stats.calls += 1;
        self.stats.observe(started.elapsed());
        let wall = self.limits.wall_per_call;
        let stack = self.runtime.config().max_wasm_stack;
        let hit = self
            .live
            .as_mut()
            .and_then(|l| l.store.data_mut().limiter.hit.take());
        let out = match result {
            Err(kind) => Err(kind),
            Ok(Err(_elapsed)) => Err(FailureKind::Limit(LimitHit::Wall { limit: wall })),
            Ok(Ok(Err(e))) => Err(match hit {
                Some(hit) => FailureKind::Limit(hit),
                None => match e.downcast_ref::<Trap>() {
                    Some(Trap::StackOverflow) => {
                        FailureKind::Limit(LimitHit::Stack { limit: stack })
                    }
                    Some(Trap::UnreachableCodeReached) => FailureKind::Trap(
                        "wasm `unreachable` executed (the persona panicked or aborted)".into(),
                    ),
                    _ => FailureKind::Trap(one_line(&e)),
                },
            }),
            Ok(Ok(Ok(r))) => Ok(r),
        };
        if out.is_err() {
            self.live = None;
        }
        out
    }

    fn check_reply_size(&mut self, bytes: usize, actions: usize) -> Result<(), FailureKind> {
        let hit = if actions > self.limits.actions {
            Some(LimitHit::Actions {
                limit: self.limits.actions,
                got: actions,
            })
        } else if bytes > self.limits.reply_bytes {
            Some(LimitHit::ReplyBytes {
                limit: self.limits.reply_bytes,
                got: bytes,
            })
        } else {
            None
        };
        match hit {
            Some(hit) => {
                self.live = None;
                Err(FailureKind::Limit(hit))
            }
            None => Ok(()),
        }
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
                self.health = Health::default();
                Ok(r)
            }
            Err(kind) => {
                let failure = self.failure(during, kind);
                self.stats.failures += 1;
                self.health.consecutive += 1;
                tracing::warn!(persona = self.label(), "{failure}; instance discarded");
                if self.health.consecutive >= QUARANTINE_AFTER || self.health.probation {
                    let backoff = quarantine_backoff(self.health.level);
                    self.health.level += 1;
                    self.health.consecutive = 0;
                    self.health.probation = false;
                    self.health.until = Some(Instant::now() + backoff);
                    self.stats.quarantines += 1;
                    tracing::warn!(
                        persona = self.label(),
                        seconds = backoff.as_secs(),
                        "persona quarantined for {} s after repeated failures",
                        backoff.as_secs()
                    );
                }
                Err(failure)
            }
        }
    }
}

fn begin_call(store: &mut Store<HostState>) {
    let state = store.data_mut();
    state.clock.started = std::time::Instant::now();
    state.clock.host_wait = Duration::ZERO;
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
