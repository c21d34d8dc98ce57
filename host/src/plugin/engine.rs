//! The one shared wasmtime [`Engine`] (async, epoch interruption driven by one
//! ticker thread, the pooling allocator where the machine allows it) and the
//! [`Linker`] every persona is instantiated against.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::Persona;
use super::state::HostState;

/// Engine-wide settings. Per-persona limits live in [`super::Limits`].
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Try the pooling allocator (falls back to on-demand allocation, with a log
    /// line, if the machine refuses the reservation).
    pub pooling: bool,
    /// Concurrent component instances the pool holds (bots × 2 for reloads, plus checks).
    pub pool_instances: u32,
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
            pool_instances: 128,
            max_memory_bytes: 1 << 30,
            epoch_tick: Duration::from_millis(10),
            max_wasm_stack: 1 << 20,
        }
    }
}

struct Inner {
    engine: Engine,
    linker: Linker<HostState>,
    config: RuntimeConfig,
    pooling: bool,
    stop_ticker: Arc<AtomicBool>,
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
        spawn_ticker(engine.clone(), config.epoch_tick, stop_ticker.clone())?;
        Ok(Runtime {
            inner: Arc::new(Inner {
                engine,
                linker,
                config,
                pooling,
                stop_ticker,
            }),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub fn linker(&self) -> &Linker<HostState> {
        &self.inner.linker
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// Whether the pooling allocator is in use.
    pub fn pooling(&self) -> bool {
        self.inner.pooling
    }

    /// Epoch ticks that cover `d` (at least one).
    pub fn ticks_for(&self, d: Duration) -> u64 {
        let tick = self.inner.config.epoch_tick.as_nanos().max(1);
        (d.as_nanos().div_ceil(tick) as u64).max(1)
    }
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
        let n = rc.pool_instances;
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

/// One thread for the whole process bumps the epoch every tick; it ends when the
/// runtime is dropped.
fn spawn_ticker(engine: Engine, tick: Duration, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("roost-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                engine.increment_epoch();
            }
        })?;
    Ok(())
}
