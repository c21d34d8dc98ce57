//! `roost run`: one bot per `DIR/*.wasm`, run until a shutdown signal, then
//! stopped gracefully.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::plugin::Runtime;
use crate::store::Store;

use super::runner::{Bot, HostContext};

/// The persona files of a folder (`NAME.wasm`, not hidden, not a shadow's
/// `NAME.shadow.wasm`), sorted by name.
pub fn persona_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot read the plugins folder {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file() && super::reload::is_persona_file(p) && !super::reload::is_shadow_file(p)
        })
        .collect();
    files.sort();
    Ok(files)
}

/// A set of running bots.
pub struct BotHost {
    pub context: HostContext,
    pub bots: BTreeMap<String, Bot>,
    /// The compile cache, load/reload counters and what is known of each file.
    pub reload: super::reload::ReloadState,
}

impl BotHost {
    /// Opens the state store, builds the runtime and starts one bot per persona
    /// file. A persona that fails to load or start is logged (one line) and
    /// skipped; the others run.
    pub async fn start(config: Config) -> anyhow::Result<BotHost> {
        config
            .check_server_transport()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let config = Arc::new(config);
        let runtime = Runtime::new(config.runtime_config())?;
        let store = Store::open_with(&config.paths.state, config.store.synchronous)?;
        // Reads every provider key once (environment or file); a missing key stops here.
        // Token budgets persist in the store: a restart does not refill them.
        let llm = Arc::new(crate::llm::LlmHub::from_config(&config.llm)?.with_store(store.clone()));
        let known = HostContext::known_secrets_of(&config, &llm);
        let context = HostContext {
            runtime,
            store,
            config: config.clone(),
            probes: crate::telemetry::Probes::default(),
            llm,
            names: Default::default(),
            known,
        };
        let reload = super::reload::ReloadState::new(&context);
        let mut host = BotHost {
            context,
            bots: BTreeMap::new(),
            reload,
        };
        let mut files = persona_files(&config.paths.plugins)?;
        // A file `[personas.NAME] shadow` names is a shadow, not a persona.
        files.retain(|f| config.shadow_owner(f).is_none());
        host.add_files(&files).await;
        Ok(host)
    }

    /// Stops every bot concurrently (each finishes its message in flight and
    /// flushes its outbox, bounded).
    pub async fn stop(self) {
        let stops = self.bots.into_values().map(|b| tokio::spawn(b.stop()));
        for s in stops {
            let _ = s.await;
        }
    }
}

/// `roost run`: start (through the compile cache), hot-reload the plugins folder
/// (unless `[reload] enabled = false`) until `shutdown`, stop.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let plugins = config.paths.plugins.clone();
    let reload = config.reload.enabled;
    let mut host = BotHost::start(config).await?;
    if host.bots.is_empty() && reload {
        tracing::warn!(
            dir = %plugins.display(),
            "no persona is running yet: waiting for a NAME.wasm to appear (build one with `roost build plugins/echo`)"
        );
    } else if host.bots.is_empty() {
        host.stop().await;
        anyhow::bail!(
            "no persona is running: {} holds no loadable NAME.wasm (build one with `roost build plugins/echo`)",
            plugins.display()
        );
    }
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = host.context.config.telemetry.metrics {
        host.context.probes.set_reload_stats(host.reload_stats());
        let stopped = async {
            let _ = metrics_stopped.await;
        };
        crate::telemetry::serve(addr, host.context.probes.clone(), stopped).await?;
    }
    tracing::info!(bots = host.bots.len(), "roost is running; Ctrl-C to stop");
    if reload {
        host.serve_reloads(shutdown).await;
    } else {
        shutdown.await;
    }
    let _ = metrics_stop.send(());
    tracing::info!("shutting down: finishing messages in flight and flushing outboxes");
    host.stop().await;
    Ok(())
}
