//! Per-persona resource limits and the `ResourceLimiter` that enforces them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What one persona may use. Defaults are the documented ones; roost.toml overrides
/// them per persona.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Linear memory, in bytes, summed over the instance's memories (default 64 MiB).
    /// A CPython persona (componentize-py 0.25) starts at 12.3 MiB and, in the
    /// quiz-master example, stays there: the default leaves it 51 MiB of headroom, so
    /// Python does not get a default of its own (see README.md, "Python personas").
    pub memory_bytes: u64,
    /// The guest's own CPU time per call: wall time minus the time spent in host
    /// functions (default 200 ms).
    #[serde(
        rename = "cpu_per_call_ms",
        with = "crate::plugin::limits::duration_ms"
    )]
    pub cpu_per_call: Duration,
    /// Time per call the host spends working for the persona inside host functions
    /// (`kv`, `history`, `log`, `config`; default 1 s). An `llm` call is not counted:
    /// it waits on the network, and tokens, timeouts and concurrency budget it.
    #[serde(
        rename = "host_per_call_ms",
        with = "crate::plugin::limits::duration_ms"
    )]
    pub host_per_call: Duration,
    /// Wall time per call including host waits (default 60 s).
    #[serde(
        rename = "wall_per_call_ms",
        with = "crate::plugin::limits::duration_ms"
    )]
    pub wall_per_call: Duration,
    /// Elements per table (default 20,000).
    pub table_elements: usize,
    /// Core instances per component instance (default 32).
    pub instances: usize,
    /// Tables per component instance (default 16).
    pub tables: usize,
    /// Memories per component instance (default 4).
    pub memories: usize,
    /// Bytes of text a call may return, summed over all actions (default 64 KiB).
    pub reply_bytes: usize,
    /// Actions a call may return (default 16).
    pub actions: usize,
    /// `join` and `leave` actions together a bot may take in any minute (default 4);
    /// more are refused (see [`crate::bot::rooms`]).
    pub joins_per_minute: u32,
    /// Rooms a bot may be in, its manifest's included (default 16); a `join` beyond
    /// is refused.
    pub max_rooms: usize,
    /// Quarantine looks at this many of the persona's latest calls (default 10).
    pub quarantine_window: u32,
    /// ...and quarantines it when at least this share of them failed (default 0.5:
    /// 5 of the last 10), whatever the order of failures and successes.
    pub quarantine_failure_ratio: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            cpu_per_call: Duration::from_millis(200),
            host_per_call: Duration::from_secs(1),
            wall_per_call: Duration::from_secs(60),
            table_elements: 20_000,
            instances: 32,
            tables: 16,
            memories: 4,
            reply_bytes: 64 << 10,
            actions: 16,
            joins_per_minute: 4,
            max_rooms: 16,
            quarantine_window: 10,
            quarantine_failure_ratio: 0.5,
        }
    }
}

impl Limits {
    /// Failures among the last [`quarantine_window`](Self::quarantine_window) calls
    /// that quarantine a persona: the ratio of the window, rounded up, at least 1.
    pub fn quarantine_failures(&self) -> u32 {
        let n = (f64::from(self.quarantine_window) * self.quarantine_failure_ratio).ceil();
        (n as u32).clamp(1, self.quarantine_window.max(1))
    }

    /// The most bytes the guest may hand the host in one transfer: the lifted result
    /// of a call (all its actions and their text) and the arguments of one host call
    /// (wasmtime's "hostcall fuel"). Tied to the reply limit, so an oversized reply
    /// traps while it is being copied instead of being copied in full and refused
    /// afterwards: four times `reply_bytes` plus the actions' own size, and at least
    /// what one `kv.set` of the largest value (`kv_value_bytes`) needs.
    pub fn hostcall_fuel(&self, kv_value_bytes: u64) -> usize {
        const ACTION: usize = 64; // size_of the lifted action (a string pair), rounded up
        const SLACK: usize = 4 << 10;
        let reply = self
            .reply_bytes
            .saturating_mul(4)
            .saturating_add(self.actions.saturating_mul(ACTION))
            .saturating_add(SLACK);
        let kv = usize::try_from(kv_value_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(crate::bot::caps::KV_MAX_KEY_BYTES + SLACK);
        reply.max(kv)
    }
}

/// Which limit stopped a call; named in every error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitHit {
    Memory {
        limit: u64,
        wanted: u64,
    },
    TableElements {
        limit: usize,
        wanted: usize,
    },
    Instances {
        limit: usize,
    },
    Tables {
        limit: usize,
    },
    Memories {
        limit: usize,
    },
    Cpu {
        limit: Duration,
    },
    Host {
        limit: Duration,
    },
    Wall {
        limit: Duration,
    },
    ReplyBytes {
        limit: usize,
        got: usize,
    },
    Actions {
        limit: usize,
        got: usize,
    },
    Stack {
        limit: usize,
    },
    /// More data than the hostcall fuel allows crossed from the guest in one transfer
    /// (a reply, or the arguments of one host call): stopped while being copied.
    Transfer {
        reply_limit: usize,
        fuel: usize,
    },
}

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitHit::Memory { limit, wanted } => write!(
                f,
                "memory limit of {} exceeded (wanted {})",
                human_bytes(*limit),
                human_bytes(*wanted)
            ),
            LimitHit::TableElements { limit, wanted } => {
                write!(
                    f,
                    "table limit of {limit} elements exceeded (wanted {wanted})"
                )
            }
            LimitHit::Instances { limit } => write!(f, "instance limit of {limit} exceeded"),
            LimitHit::Tables { limit } => write!(f, "table count limit of {limit} exceeded"),
            LimitHit::Memories { limit } => write!(f, "memory count limit of {limit} exceeded"),
            LimitHit::Cpu { limit } => {
                write!(
                    f,
                    "CPU time limit of {} ms per call exceeded",
                    limit.as_millis()
                )
            }
            LimitHit::Host { limit } => {
                write!(
                    f,
                    "host time limit of {} ms per call exceeded (time spent in kv, history, log and config calls)",
                    limit.as_millis()
                )
            }
            LimitHit::Wall { limit } => {
                write!(
                    f,
                    "wall time limit of {} s per call exceeded",
                    limit.as_secs_f64()
                )
            }
            LimitHit::ReplyBytes { limit, got } => write!(
                f,
                "reply size limit of {} exceeded ({} returned)",
                human_bytes(*limit as u64),
                human_bytes(*got as u64)
            ),
            LimitHit::Actions { limit, got } => {
                write!(
                    f,
                    "action limit of {limit} per call exceeded ({got} returned)"
                )
            }
            LimitHit::Transfer { reply_limit, fuel } => write!(
                f,
                "reply size limit of {} exceeded: over {} crossed from the persona in one transfer (a reply or host-call arguments), stopped while being copied",
                human_bytes(*reply_limit as u64),
                human_bytes(*fuel as u64)
            ),
            LimitHit::Stack { limit } => write!(
                f,
                "stack limit of {} exceeded (unbounded recursion?)",
                human_bytes(*limit as u64)
            ),
        }
    }
}

/// `1.5 MiB`, `64 KiB`, `12 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v.fract() == 0.0 {
        format!("{} {}", v as u64, UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Enforces [`Limits`] for one store and remembers which limit was hit, so a trap
/// that follows (a guest aborting on a failed allocation) can be explained.
#[derive(Debug)]
pub struct Limiter {
    limits: Limits,
    /// The first limit hit during the current call.
    pub hit: Option<LimitHit>,
    memory_in_use: u64,
}

impl Limiter {
    pub fn new(limits: Limits) -> Self {
        Limiter {
            limits,
            hit: None,
            memory_in_use: 0,
        }
    }

    /// Linear memory granted so far, summed over the instance's memories (initial
    /// sizes included): what counts against `memory_bytes`. A CPython persona starts
    /// at about 12 MiB (see README.md, "Python personas").
    pub fn memory_in_use(&self) -> u64 {
        self.memory_in_use
    }

    fn record(&mut self, hit: LimitHit) {
        if self.hit.is_none() {
            self.hit = Some(hit);
        }
    }
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let growth = (desired - current) as u64;
        let total = self.memory_in_use + growth;
        if total > self.limits.memory_bytes {
            self.record(LimitHit::Memory {
                limit: self.limits.memory_bytes,
                wanted: total,
            });
            return Ok(false);
        }
        self.memory_in_use = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limits.table_elements {
            self.record(LimitHit::TableElements {
                limit: self.limits.table_elements,
                wanted: desired,
            });
            return Ok(false);
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.limits.instances
    }

    fn tables(&self) -> usize {
        self.limits.tables
    }

    fn memories(&self) -> usize {
        self.limits.memories
    }
}

/// Serde helper: durations as integer milliseconds.
pub mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use wasmtime::ResourceLimiter;

    use super::*;

    #[test]
    fn memory_growth_is_summed_and_the_hit_is_remembered() {
        let mut l = Limiter::new(Limits {
            memory_bytes: 1 << 20,
            ..Limits::default()
        });
        assert!(l.memory_growing(0, 512 << 10, None).unwrap());
        assert!(l.memory_growing(512 << 10, 1 << 20, None).unwrap());
        assert!(!l.memory_growing(1 << 20, (1 << 20) + 65536, None).unwrap());
        let hit = l.hit.clone().unwrap();
        assert_eq!(
            hit.to_string(),
            "memory limit of 1 MiB exceeded (wanted 1.1 MiB)"
        );
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(64 << 10), "64 KiB");
        assert_eq!(human_bytes(10 << 20), "10 MiB");
    }
}
