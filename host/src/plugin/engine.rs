//! The one shared wasmtime [`Engine`] (async, epoch interruption driven by one
//! ticker thread, the pooling allocator where the machine allows it), the
//! [`Linker`] every persona is instantiated against, the process-wide
//! [`InstancePool`] and the registry of compiled code shared by identical
//! components.
//!
//! **Sizes.** `[runtime] pool_instances` bounds the live persona instances of the
//! process (see [`super::pool`]); by default it is what the machine can hold: its
//! memory (or its cgroup's limit) divided by the default per-persona memory limit,
//! between [`MIN_POOL_INSTANCES`] and [`MAX_POOL_INSTANCES`]. The pooling allocator's
//! slots follow it, plus [`POOLING_HEADROOM`] for instances made outside the pool.
//!
//! **Fallback.** When the pooling allocator refuses (all of its slots taken, or a
//! component beyond its per-component limits), the instance, or the component, is
//! made by a second engine with on-demand allocation, created on first need and
//! ticked by the same thread; identical settings make its code interchangeable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::Persona;
use super::cache::ContentHash;
use super::component::SharedCode;
use super::limits::Limits;
use super::pool::{InstancePool, PoolStats};
use super::sandbox::Instance;
use super::state::HostState;

/// The smallest default pool.
pub const MIN_POOL_INSTANCES: u32 = 16;
/// The largest default pool (each slot reserves address space for its memories).
pub const MAX_POOL_INSTANCES: u32 = 2048;
/// The default pool when the machine's memory is unknown.
pub const FALLBACK_POOL_INSTANCES: u32 = 128;
/// Pooling-allocator slots beyond `pool_instances`, for instances made outside the
/// instance pool (and for a Store dropped a moment after its slot was handed on).
pub const POOLING_HEADROOM: u32 = 8;
/// How long an idle instance stays warm by default.
pub const DEFAULT_INSTANCE_IDLE: Duration = Duration::from_secs(60);

/// Engine-wide settings. Per-persona limits live in [`super::Limits`].
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Try the pooling allocator (falls back to on-demand allocation, with a log
    /// line, if the machine refuses the reservation).
    pub pooling: bool,
    /// Live persona instances the process holds at once (in calls or idle and warm);
    /// the pooling allocator's slots follow it. Default: [`default_pool_instances`]
    /// of the default memory limit.
    pub pool_instances: u32,
    /// An instance idle this long is dropped (its bot instantiates again on its next
    /// message). Zero: dropped as soon as its call ends.
    pub instance_idle: Duration,
    /// The largest linear memory any persona may be granted; per-persona limits
    /// above it are refused.
    pub max_memory_bytes: u64,
    /// Epoch tick: the granularity of CPU-time enforcement.
    pub epoch_tick: Duration,
    /// WebAssembly stack limit (bytes); unbounded recursion traps with a stack overflow.
    pub max_wasm_stack: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            pooling: true,
            pool_instances: default_pool_instances(Limits::default().memory_bytes),
            instance_idle: DEFAULT_INSTANCE_IDLE,
            max_memory_bytes: 1 << 30,
            epoch_tick: Duration::from_millis(10),
            max_wasm_stack: 1 << 20,
        }
    }
}

/// An engine and its linker.
pub(crate) struct Backend {
    pub engine: Engine,
    pub linker: Linker<HostState>,
}

/// Compiled code by content hash, held weakly: the last user frees it.
pub(crate) type CodeMap = Mutex<HashMap<ContentHash, Weak<SharedCode>>>;
pub(crate) type CodeRegistry = Arc<CodeMap>;

struct Inner {
    primary: Backend,
    /// With pooling: the on-demand engine, made on first need.
    on_demand: OnceLock<Result<Backend, String>>,
    /// The ticker's view of the on-demand engine.
    ticked: Arc<OnceLock<Engine>>,
    config: RuntimeConfig,
    pooling: bool,
    stop_ticker: Arc<AtomicBool>,
    pool: InstancePool<Instance>,
    code: CodeRegistry,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// The shared runtime. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("pooling", &self.inner.pooling)
            .field("pool", &self.inner.pool)
            .finish()
    }
}

impl Runtime {
    /// Builds the engine and the linker and starts the epoch ticker.
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Self> {
        let (engine, pooling) = if config.pooling {
            match Engine::new(&engine_config(&config, true)) {
                Ok(engine) => (engine, true),
                Err(e) => {
                    tracing::warn!(
                        "pooling allocator unavailable ({e}); using on-demand allocation"
                    );
                    (
                        Engine::new(&engine_config(&config, false)).map_err(anyhow::Error::from)?,
                        false,
                    )
                }
            }
        } else {
            (
                Engine::new(&engine_config(&config, false)).map_err(anyhow::Error::from)?,
                false,
            )
        };
        let linker = build_linker(&engine)?;
        let stop_ticker = Arc::new(AtomicBool::new(false));
        let ticked = Arc::new(OnceLock::new());
        spawn_ticker(
            engine.clone(),
            ticked.clone(),
            config.epoch_tick,
            stop_ticker.clone(),
        )?;
        let pool = InstancePool::new(config.pool_instances as usize, config.instance_idle);
        Ok(Runtime {
            inner: Arc::new(Inner {
                primary: Backend { engine, linker },
                on_demand: OnceLock::new(),
                ticked,
                config,
                pooling,
                stop_ticker,
                pool,
                code: CodeRegistry::default(),
            }),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.primary.engine
    }

    pub fn linker(&self) -> &Linker<HostState> {
        &self.inner.primary.linker
    }

    /// The process-wide pool of live persona instances.
    pub fn pool(&self) -> &InstancePool<Instance> {
        &self.inner.pool
    }

    /// Live instances, reclaims, waits and fallbacks of the instance pool.
    pub fn pool_stats(&self) -> PoolStats {
        self.inner.pool.stats()
    }

    /// Distinct compiled components alive (identical bytes share one).
    pub fn shared_components(&self) -> usize {
        let map = self.inner.code.lock().unwrap_or_else(|p| p.into_inner());
        map.values().filter(|w| w.strong_count() > 0).count()
    }

    pub(crate) fn code_registry(&self) -> &CodeRegistry {
        &self.inner.code
    }

    /// The engine with on-demand allocation: the primary one without pooling, a
    /// second one (made now if needed) with it.
    pub(crate) fn on_demand(&self) -> Result<&Backend, String> {
        if !self.inner.pooling {
            return Ok(&self.inner.primary);
        }
        let made = self.inner.on_demand.get_or_init(|| {
            let engine = Engine::new(&engine_config(&self.inner.config, false))
                .map_err(|e| format!("on-demand engine unavailable: {e}"))?;
            let linker = build_linker(&engine).map_err(|e| format!("{e:#}"))?;
            let _ = self.inner.ticked.set(engine.clone());
            tracing::info!(
                "the pooling allocator refused an instance or a component; a second engine with on-demand allocation takes those"
            );
            Ok(Backend { engine, linker })
        });
        made.as_ref().map_err(Clone::clone)
    }

    /// The linker for components of `engine` (the primary or the on-demand one).
    pub(crate) fn linker_for(&self, engine: &Engine) -> &Linker<HostState> {
        match self.inner.on_demand.get() {
            Some(Ok(b)) if Engine::same(&b.engine, engine) => &b.linker,
            _ => &self.inner.primary.linker,
        }
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// Whether the pooling allocator is in use.
    pub fn pooling(&self) -> bool {
        self.inner.pooling
    }
}

/// The memory this process may use: physical memory, or the lowest memory limit of
/// its cgroup and the cgroups above it (v2 `memory.max`, v1
/// `memory.limit_in_bytes`: a systemd unit's `MemoryMax`, a container's limit) if
/// lower.
pub fn machine_memory() -> Option<u64> {
    #[cfg(unix)]
    let physical = {
        // SAFETY: sysconf has no preconditions.
        let (pages, size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        (pages > 0 && size > 0).then(|| pages as u64 * size as u64)
    };
    #[cfg(not(unix))]
    let physical: Option<u64> = None;
    let groups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let cgroup = cgroup_limit_files(&groups)
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        // "max" (v2) and the huge v1 "unlimited" value are no limit.
        .filter_map(|s| s.trim().parse::<u64>().ok())
        .min();
    match (physical, cgroup) {
        (Some(p), Some(c)) => Some(p.min(c)),
        (p, c) => p.or(c),
    }
}

/// The files that may hold a memory limit for the cgroups named in
/// `/proc/self/cgroup` (`proc_self_cgroup`), from the process's own up to the root
/// of the mount.
fn cgroup_limit_files(proc_self_cgroup: &str) -> Vec<std::path::PathBuf> {
    use std::path::{Path, PathBuf};
    let mut files = Vec::new();
    let mut add = |mount: &str, group: &str, file: &str| {
        let mut dir: PathBuf = Path::new(mount).join(group.trim_start_matches('/'));
        loop {
            files.push(dir.join(file));
            if dir == Path::new(mount) || !dir.pop() {
                break;
            }
        }
    };
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(group)) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            add("/sys/fs/cgroup", group, "memory.max");
            add("/sys/fs/cgroup/unified", group, "memory.max");
        } else if controllers.split(',').any(|c| c == "memory") {
            add("/sys/fs/cgroup/memory", group, "memory.limit_in_bytes");
        }
    }
    files
}

/// The default `pool_instances`: what the machine can hold if every instance used
/// its whole `memory_limit`, between [`MIN_POOL_INSTANCES`] and
/// [`MAX_POOL_INSTANCES`] ([`FALLBACK_POOL_INSTANCES`] if the memory is unknown).
pub fn default_pool_instances(memory_limit: u64) -> u32 {
    static MEMORY: OnceLock<Option<u64>> = OnceLock::new();
    pool_instances_for(*MEMORY.get_or_init(machine_memory), memory_limit)
}

fn pool_instances_for(memory: Option<u64>, memory_limit: u64) -> u32 {
    match memory {
        Some(total) => (total / memory_limit.max(1))
            .clamp(MIN_POOL_INSTANCES as u64, MAX_POOL_INSTANCES as u64)
            as u32,
        None => FALLBACK_POOL_INSTANCES,
    }
}

/// Whether wasmtime's error says the pooling allocator refused (a slot limit
/// reached, or a component beyond its per-component limits).
pub fn pooling_refused(e: &wasmtime::Error) -> bool {
    e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
        || e.chain().any(|c| {
            let s = c.to_string();
            s.contains("pooling allocator") || s.contains("maximum concurrent limit of")
        })
}

/// Core instances the pool holds per persona instance: enough for a CPython persona
/// (14 with componentize-py 0.25; see `engine_config`).
pub const CORE_INSTANCES_PER_PERSONA: u32 = 16;

fn engine_config(rc: &RuntimeConfig, pooling: bool) -> Config {
    let mut c = Config::new();
    c.wasm_component_model(true);
    c.epoch_interruption(true);
    c.max_wasm_stack(rc.max_wasm_stack);
    c.async_stack_size(rc.max_wasm_stack + (1 << 20));
    if pooling {
        let mut p = PoolingAllocationConfig::new();
        // Slots follow the instance pool, which bounds live persona instances.
        let n = rc.pool_instances.saturating_add(POOLING_HEADROOM);
        p.total_component_instances(n);
        // Core instances per persona: a Rust persona has 3, a CPython one from
        // componentize-py 0.25 has 14 (libc, libpython, the runtime, WASI adapters and
        // shims; 1 memory, 2 tables of up to 5,680 elements). With `n * 8` a host full
        // of Python personas ran out at 73 of its 128 instances; `n * 16` fits a pool
        // of Python personas. The cost is a counter, not memory: core instance state is
        // allocated per instance, bounded by `max_core_instance_size`.
        p.total_core_instances(n * CORE_INSTANCES_PER_PERSONA);
        p.total_memories(n * 2);
        p.total_tables(n * 4);
        p.total_stacks(n);
        p.max_memory_size(rc.max_memory_bytes as usize);
        p.max_core_instances_per_component(32);
        p.max_memories_per_component(4);
        p.max_tables_per_component(16);
        p.max_memories_per_module(2);
        p.max_tables_per_module(4);
        p.table_elements(100_000);
        p.max_core_instance_size(8 << 20);
        p.max_component_instance_size(8 << 20);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(p));
    }
    c
}

fn build_linker(engine: &Engine) -> anyhow::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(anyhow::Error::from)?;
    Persona::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(anyhow::Error::from)?;
    Ok(linker)
}

/// One thread for the whole process bumps the epoch every tick (of the on-demand
/// engine too, once there is one); it ends when the runtime is dropped.
fn spawn_ticker(
    engine: Engine,
    on_demand: Arc<OnceLock<Engine>>,
    tick: Duration,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("roost-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                engine.increment_epoch();
                if let Some(e) = on_demand.get() {
                    e.increment_epoch();
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_pool_follows_memory_within_bounds() {
        let limit = 64 << 20;
        assert_eq!(pool_instances_for(Some(8 << 30), limit), 128);
        assert_eq!(pool_instances_for(Some(24 << 30), limit), 384);
        assert_eq!(
            pool_instances_for(Some(512 << 20), limit),
            MIN_POOL_INSTANCES
        );
        assert_eq!(pool_instances_for(Some(1 << 40), limit), MAX_POOL_INSTANCES);
        assert_eq!(pool_instances_for(None, limit), FALLBACK_POOL_INSTANCES);
        assert_eq!(pool_instances_for(Some(8 << 30), 0), MAX_POOL_INSTANCES);
        let d = default_pool_instances(limit);
        assert!((MIN_POOL_INSTANCES..=MAX_POOL_INSTANCES).contains(&d));
    }

    #[test]
    fn cgroup_limits_are_looked_for_up_the_hierarchy() {
        let v2 = cgroup_limit_files("0::/system.slice/roost.service\n");
        let v2: Vec<String> = v2.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            &v2[..3],
            [
                "/sys/fs/cgroup/system.slice/roost.service/memory.max",
                "/sys/fs/cgroup/system.slice/memory.max",
                "/sys/fs/cgroup/memory.max",
            ]
        );
        let v1 = cgroup_limit_files("4:memory:/docker/abc\n3:cpuset:/\n");
        let v1: Vec<String> = v1.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            v1,
            [
                "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes",
                "/sys/fs/cgroup/memory/docker/memory.limit_in_bytes",
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            ]
        );
        // A container with its own cgroup namespace sees itself as the root.
        let ns = cgroup_limit_files("0::/\n");
        assert_eq!(ns[0], std::path::Path::new("/sys/fs/cgroup/memory.max"));
    }
}
