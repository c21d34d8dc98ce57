//! `roost run`: one bot per `DIR/*.wasm`, run until a shutdown signal, then
//! stopped gracefully.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::plugin::bindings::Manifest;
use crate::plugin::cache::{ContentHash, content_hash};
use crate::plugin::component::{LoadError, label_for};
use crate::plugin::{Grants, PersonaComponent, PersonaContext, Sandbox, manifest};

use super::core::Swap;
use super::reload::*;
use super::stats::{LoadRecord, ReloadStats};
use crate::plugin::Runtime;
use crate::store::Store;

use super::context::HostContext;
use super::runner::Bot;

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
    /// With a shared store: the leases this host holds (a bot runs only for those).
    pub leases: Option<crate::lease::Leases>,
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
        let url = config
            .store
            .store_url()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut store = {
            let (url, state, sync) = (
                url.clone(),
                config.paths.state.clone(),
                config.store.synchronous,
            );
            let options = crate::store::PgOptions {
                schema: config.store.schema.clone(),
            };
            tokio::task::spawn_blocking(move || Store::open_url(&url, &state, sync, options))
                .await??
        };
        let leases = if store.is_shared() {
            let host = crate::lease::host_id();
            store.enable_leases(&host)?;
            tracing::info!(store = %store.location(), %host, "shared store: personas are spread over the hosts by leases");
            Some(crate::lease::Leases::new(config.store.leases(), host))
        } else {
            None
        };
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
        context.probes.set_store(context.store.clone());
        if let Some(l) = &leases {
            context.probes.set_leases(l.snapshot.clone());
        }
        let mut host = BotHost {
            context,
            bots: BTreeMap::new(),
            reload,
            leases,
        };
        // With leases, the first round takes this host's share (after one renewal,
        // so hosts starting together see each other); none is held yet.
        host.lease_round().await;
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
        // Every bot is stopped and flushed: hand the leases back so other hosts take
        // the personas at once instead of waiting for the leases to expire.
        if let Some(mut leases) = self.leases {
            let store = self.context.store.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let held: Vec<String> = leases.held.keys().cloned().collect();
                for p in held {
                    leases.release(&store, &p);
                }
            })
            .await;
        }
    }

    /// Whether this host may run `label` (always, without leases).
    pub fn may_run(&self, label: &str) -> bool {
        self.leases
            .as_ref()
            .is_none_or(|l| l.held.contains_key(label))
    }

    /// When the next lease round is due (`None` without leases).
    pub fn next_lease_round(&self) -> Option<std::time::Duration> {
        let leases = self.leases.as_ref()?;
        let offered: std::collections::BTreeSet<String> =
            persona_files(&self.context.config.paths.plugins)
                .unwrap_or_default()
                .iter()
                .filter(|f| self.context.config.shadow_owner(f).is_none())
                .map(|f| crate::plugin::component::label_for(f))
                .collect();
        Some(leases.next_tick(&offered, std::time::Instant::now()))
    }

    /// One lease round (see [`crate::lease`]): renew; stop the bots of leases lost or
    /// no longer trusted; hand back a few over this host's share (bot stopped first);
    /// take free or expired personas up to the share and start their bots.
    pub async fn lease_round(&mut self) {
        use crate::lease::{Renewal, plan};
        let Some(leases) = self.leases.take() else {
            return;
        };
        let store = self.context.store.clone();
        let dir = self.context.config.paths.plugins.clone();
        let now = std::time::Instant::now();
        let (mut leases, renewal) = match tokio::task::spawn_blocking({
            let store = store.clone();
            move || {
                let mut leases = leases;
                let r = leases.renew(&store, now);
                (leases, r)
            }
        })
        .await
        {
            Ok(out) => out,
            Err(e) => {
                tracing::error!("lease round failed: {e}");
                return;
            }
        };
        let lost: Vec<String> = match renewal {
            Renewal::Ok { lost } => lost,
            Renewal::Failed => Vec::new(),
            Renewal::Expired => {
                tracing::error!(host = %leases.host, "the store has not answered for too long: stopping every bot before its lease expires");
                self.bots.keys().cloned().collect()
            }
        };
        for label in &lost {
            tracing::warn!(bot = %label, "lease lost: stopping the bot");
            self.stop_bot(label).await;
        }
        let mut files = persona_files(&dir).unwrap_or_default();
        files.retain(|f| self.context.config.shadow_owner(f).is_none());
        let offered: std::collections::BTreeSet<String> = files
            .iter()
            .map(|f| crate::plugin::component::label_for(f))
            .collect();
        let held: std::collections::BTreeSet<String> = leases.held.keys().cloned().collect();
        let plan = plan(
            &leases.host,
            &held,
            &offered,
            leases.live_hosts,
            leases.config.handover_per_tick,
        );
        for label in &plan.release {
            tracing::info!(bot = %label, live_hosts = leases.live_hosts, "handing a persona back to another host");
            self.stop_bot(label).await;
            let store = store.clone();
            let label = label.clone();
            leases = match tokio::task::spawn_blocking(move || {
                leases.release(&store, &label);
                leases
            })
            .await
            {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("lease release failed: {e}");
                    return;
                }
            };
        }
        let (leases, taken) = match tokio::task::spawn_blocking({
            let store = store.clone();
            move || {
                let mut leases = leases;
                let taken = leases.acquire(&store, &plan, now);
                leases.refresh_snapshot(&store);
                (leases, taken)
            }
        })
        .await
        {
            Ok(out) => out,
            Err(e) => {
                tracing::error!("lease acquisition failed: {e}");
                return;
            }
        };
        self.leases = Some(leases);
        if !taken.is_empty() {
            tracing::info!(personas = ?taken, "leases taken: starting the bots");
            let files: Vec<PathBuf> = files
                .into_iter()
                .filter(|f| taken.contains(&crate::plugin::component::label_for(f)))
                .collect();
            self.add_files(&files).await;
        }
    }

    /// Stops the bot of `label`, if one runs.
    async fn stop_bot(&mut self, label: &str) {
        self.reload.running.remove(label);
        if let Some(bot) = self.bots.remove(label) {
            bot.stop().await;
        }
        // Another host runs it next and spends from the same stored budget.
        self.context.llm.forget(label);
    }
}

/// `roost run`: start (through the compile cache), hot-reload the plugins folder
/// (unless `[reload] enabled = false`) until `shutdown`, stop.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let plugins = config.paths.plugins.clone();
    let reload = config.reload.enabled;
    let mut host = BotHost::start(config).await?;
    if host.leases.is_some() {
        tracing::info!(
            bots = host.bots.len(),
            "shared store: more personas start as their leases are taken"
        );
    } else if host.bots.is_empty() && reload {
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
        crate::status::serve(addr, host.context.probes.clone(), stopped).await?;
    }
    tracing::info!(bots = host.bots.len(), "roost is running; Ctrl-C to stop");
    if reload {
        host.serve_reloads(shutdown).await;
    } else if host.leases.is_some() {
        tokio::pin!(shutdown);
        loop {
            let wait = host
                .next_lease_round()
                .unwrap_or(std::time::Duration::from_secs(2));
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = tokio::time::sleep(wait) => host.lease_round().await,
            }
        }
    } else {
        shutdown.await;
    }
    let _ = metrics_stop.send(());
    tracing::info!("shutting down: finishing messages in flight and flushing outboxes");
    host.stop().await;
    Ok(())
}

// -- the host side --------------------------------------------------------------

impl BotHost {
    /// The host's load and reload counters (a shared handle: it stays current).
    pub fn reload_stats(&self) -> Arc<ReloadStats> {
        self.reload.stats.clone()
    }

    /// Watches the plugins folder and applies every change (see the module docs)
    /// until `shutdown` completes. If the folder cannot be watched, logs why and
    /// just waits for `shutdown`: the bots keep running without hot reload.
    pub async fn serve_reloads(&mut self, shutdown: impl Future<Output = ()>) {
        let dir = self.context.config.paths.plugins.clone();
        let debounce = Duration::from_millis(self.context.config.reload.debounce_ms.max(1));
        tokio::pin!(shutdown);
        let mut watcher = match FolderWatcher::start(&dir, debounce) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(dir = %dir.display(), "hot reload is off: cannot watch the plugins folder: {e}");
                shutdown.await;
                return;
            }
        };
        tracing::info!(dir = %dir.display(), "hot reload: watching the plugins folder");
        // Whatever changed between the start-up scan and the watch.
        self.rescan().await;
        // With leases: a lease round when due, and a rescan with it, so a change on a
        // shared volume whose events do not reach this host (NFS and other network
        // file systems) is still seen within a renewal. The deadline is kept across
        // folder events: a steady stream of them must not put the renewal off.
        let next_round = |host: &Self| {
            host.next_lease_round()
                .map(|d| tokio::time::Instant::now() + d)
        };
        let mut lease_at = next_round(self);
        loop {
            let lease_due = async {
                match lease_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                () = lease_due => {
                    self.lease_round().await;
                    self.rescan().await;
                    lease_at = next_round(self);
                }
                batch = watcher.next() => match batch {
                    Some(Batch::Paths(paths)) => self.reconcile(paths).await,
                    Some(Batch::Rescan) => self.rescan().await,
                    None => {
                        tracing::error!(dir = %dir.display(), "hot reload stopped: the folder watcher ended");
                        shutdown.await;
                        return;
                    }
                },
            }
        }
    }

    /// Loads and starts every persona file at start-up, in parallel: files are read
    /// and hashed, each distinct content is compiled once (distinct contents on all
    /// cores at once), the copies then load from the shared compiled code, and the
    /// bots start concurrently. A persona that fails is logged and counted; the others
    /// run. Bots whose manifests want the same network name: the first label wins.
    pub(crate) async fn add_files(&mut self, files: &[PathBuf]) {
        use futures_util::stream::{self, StreamExt};
        // With leases, only the personas this host holds.
        let files: Vec<PathBuf> = files
            .iter()
            .filter(|f| self.may_run(&label_for(f)))
            .cloned()
            .collect();
        let files = &files[..];
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
        // 1. Read and hash; keep the bytes of one file per distinct content only.
        let mut first_of: BTreeMap<ContentHash, PathBuf> = BTreeMap::new();
        let mut plan: Vec<Planned> = Vec::with_capacity(files.len());
        for file in files {
            match tokio::fs::read(file).await {
                Ok(bytes) => {
                    let hash = content_hash(&bytes);
                    let stamp = std::fs::metadata(file).ok().map(|m| FileStamp::of(&m));
                    self.reload
                        .seen
                        .insert(label_for(file), Seen { hash, stamp });
                    let keep = !first_of.contains_key(&hash);
                    if keep {
                        first_of.insert(hash, file.clone());
                    }
                    plan.push((file.clone(), hash, stamp, keep.then_some(bytes)));
                }
                Err(e) => {
                    ReloadStats::bump(&self.reload.stats.rejected);
                    let e = LoadError::Read {
                        path: file.display().to_string(),
                        reason: crate::plugin::component::io_reason(&e),
                    };
                    self.reload
                        .stats
                        .record(&label_for(file), "rejected", e.to_string());
                    tracing::error!(file = %file.display(), "persona not started: {e}");
                }
            }
        }
        // 2. Compile each distinct content once, then the copies.
        let (firsts, copies): (Vec<_>, Vec<_>) = plan.into_iter().partition(|p| p.3.is_some());
        let this = &*self;
        let compile_all = |batch: Vec<Planned>, width: usize| {
            stream::iter(batch)
                .map(move |(file, _hash, stamp, bytes)| async move {
                    let bytes = match bytes {
                        Some(b) => Ok(b),
                        None => tokio::fs::read(&file).await.map_err(anyhow::Error::from),
                    };
                    let out = match bytes {
                        Ok(b) => this.compile(&file, b, stamp).await,
                        Err(e) => Err(e),
                    };
                    (file, out)
                })
                .buffer_unordered(width)
                .collect::<Vec<_>>()
        };
        let mut compiled = compile_all(firsts, parallel).await;
        compiled.extend(compile_all(copies, parallel * 8).await);
        compiled.sort_by(|a, b| a.0.cmp(&b.0));
        let mut ready = Vec::with_capacity(compiled.len());
        for (file, out) in compiled {
            match out {
                Ok(c) => ready.push(c),
                Err(e) => {
                    ReloadStats::bump(&self.reload.stats.rejected);
                    self.reload
                        .stats
                        .record(&label_for(&file), "rejected", format!("{e:#}"));
                    tracing::error!(file = %file.display(), "persona not started: {e:#}");
                }
            }
        }
        // 3. Start the bots concurrently (describe, session); admit them in label order.
        let context = self.context.clone();
        let started: Vec<(Compiled, anyhow::Result<Bot>)> = stream::iter(ready)
            .map(|c| {
                let context = context.clone();
                async move {
                    let bot = Bot::start(&context, c.component.clone()).await;
                    (c, bot)
                }
            })
            .buffered(parallel * 32)
            .collect()
            .await;
        for (compiled, bot) in started {
            let label = compiled.component.label.clone();
            let file = compiled.component.path.clone().unwrap_or_default();
            match bot {
                Ok(bot) => {
                    if let Err(e) = self.admit(compiled, bot).await {
                        ReloadStats::bump(&self.reload.stats.rejected);
                        self.reload
                            .stats
                            .record(&label, "rejected", format!("{e:#}"));
                        tracing::error!(file = %file.display(), "persona not started: {e:#}");
                    }
                }
                Err(e) => {
                    ReloadStats::bump(&self.reload.stats.rejected);
                    self.reload
                        .stats
                        .record(&label, "rejected", format!("{e:#}"));
                    tracing::error!(file = %file.display(), bot = %label, "persona not started: {e:#}");
                }
            }
        }
    }

    /// Every persona file in the folder and every running bot's file, skipping
    /// files whose size and mtime match what was last seen.
    async fn rescan(&mut self) {
        let dir = self.context.config.paths.plugins.clone();
        let mut paths: BTreeSet<PathBuf> = match persona_files(&dir) {
            Ok(files) => files.into_iter().collect(),
            Err(e) => {
                tracing::warn!("hot reload rescan: {e:#}");
                BTreeSet::new()
            }
        };
        paths.extend(
            self.bots
                .keys()
                .map(|label| dir.join(format!("{label}.wasm"))),
        );
        let config = self.context.config.clone();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            paths.extend(
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| is_shadow_file(p)),
            );
        }
        paths.extend(self.bots.keys().map(|label| config.shadow_file(label)));
        paths.retain(|p| {
            let stamp = std::fs::metadata(p).ok().map(|m| FileStamp::of(&m));
            let seen = self.reload.seen.get(&label_for(p)).and_then(|s| s.stamp);
            stamp.is_none() || stamp != seen
        });
        self.reconcile(paths).await;
    }

    /// Brings each bot in line with its file: deletions first (so a rename frees
    /// the name before the new file starts its bot), then new and changed files.
    async fn reconcile(&mut self, paths: BTreeSet<PathBuf>) {
        let debounce = Duration::from_millis(self.context.config.reload.debounce_ms);
        let mut ready = Vec::new();
        for path in paths {
            let shadow_of = self.context.config.shadow_owner(&path);
            match settle(&path, debounce).await {
                Settled::Gone if shadow_of.is_some() => {
                    self.unshadow(shadow_of.as_deref().unwrap_or_default(), &path);
                }
                Settled::Gone => self.unload(&path).await,
                Settled::Busy => tracing::info!(
                    file = %path.display(),
                    "persona file still changing; waiting for the next change"
                ),
                Settled::Ready { bytes, stamp, at } => ready.push((path, bytes, stamp, at)),
            }
        }
        for (path, bytes, stamp, at) in ready {
            match self.context.config.shadow_owner(&path) {
                Some(owner) => self.apply_shadow(&owner, &path, bytes, stamp).await,
                None => self.apply_file(&path, bytes, stamp, at).await,
            }
        }
    }

    /// The file is gone: stop its bot.
    async fn unload(&mut self, path: &Path) {
        let label = label_for(path);
        self.reload.seen.remove(&label);
        self.reload.running.remove(&label);
        self.reload.shadows.remove(&label);
        if let Some(bot) = self.bots.remove(&label) {
            let name = bot.manifest.name.clone();
            bot.stop().await;
            ReloadStats::bump(&self.reload.stats.unloaded);
            self.reload
                .stats
                .record(&label, "unloaded", "its file is gone");
            tracing::info!(
                file = %path.display(),
                bot = %label,
                name = %name,
                "persona unloaded: its file is gone; the bot flushed its outbox and disconnected"
            );
        }
    }

    /// A settled file: load it, swap it in, or ignore it if nothing changed.
    async fn apply_file(
        &mut self,
        path: &Path,
        bytes: Vec<u8>,
        stamp: FileStamp,
        settled_at: Instant,
    ) {
        let label = label_for(path);
        let hash = content_hash(&bytes);
        let stamp = Some(stamp);
        let running = self.bots.contains_key(&label);
        if running && self.reload.running.get(&label) == Some(&hash) {
            self.reload.seen.insert(label.clone(), Seen { hash, stamp });
            ReloadStats::bump(&self.reload.stats.unchanged);
            tracing::debug!(file = %path.display(), "persona file unchanged (same content)");
            return;
        }
        if self.reload.seen.get(&label).is_some_and(|s| s.hash == hash) {
            // These bytes were already looked at (and refused): wait for a fix.
            self.reload.seen.insert(label, Seen { hash, stamp });
            return;
        }
        self.reload.seen.insert(label.clone(), Seen { hash, stamp });
        if !running && !self.may_run(&label) {
            // Another host runs it (or will): its lease decides, not this file event.
            return;
        }
        let result = match self.compile(path, bytes, stamp).await {
            Ok(compiled) if running => self.swap_in(compiled, settled_at).await,
            Ok(compiled) => self.start_compiled(compiled).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            ReloadStats::bump(&self.reload.stats.rejected);
            self.reload
                .stats
                .record(&label, "rejected", format!("{e:#}"));
            // (A renamed persona whose new bot failed to start has no bot left.)
            if running && self.bots.contains_key(&label) {
                tracing::warn!(
                    file = %path.display(),
                    "new version of persona `{label}` rejected, the running version keeps serving: {e:#}"
                );
            } else {
                tracing::warn!(file = %path.display(), "persona `{label}` rejected: {e:#}");
            }
        }
    }

    /// Compiles (through the cache) and checks a persona file's bytes off the async
    /// runtime.
    async fn compile(
        &self,
        path: &Path,
        bytes: Vec<u8>,
        stamp: Option<FileStamp>,
    ) -> anyhow::Result<Compiled> {
        let rt = self.context.runtime.clone();
        let cache = self.reload.cache.clone();
        let owned = path.to_path_buf();
        let hash = content_hash(&bytes);
        let started = Instant::now();
        let (mut component, outcome) = tokio::task::spawn_blocking(move || {
            rt.load_bytes_cached(
                &label_for(&owned),
                &owned.display().to_string(),
                &bytes,
                &cache,
            )
        })
        .await??;
        component.path = Some(path.to_path_buf());
        let record = LoadRecord {
            label: component.label.clone(),
            outcome,
            took: started.elapsed(),
        };
        tracing::debug!(file = %path.display(), cache = ?outcome, took_ms = record.took.as_secs_f64() * 1e3, "persona compiled");
        self.reload.stats.loaded_file(record);
        Ok(Compiled {
            component: Arc::new(component),
            hash,
            stamp,
        })
    }

    /// Starts a bot for a compiled persona whose label has none.
    async fn start_compiled(&mut self, compiled: Compiled) -> anyhow::Result<()> {
        let label = compiled.component.label.clone();
        if self.bots.contains_key(&label) {
            anyhow::bail!("a bot for `{label}` is already running");
        }
        let bot = Bot::start(&self.context, compiled.component.clone()).await?;
        self.admit(compiled, bot).await
    }

    /// Adds a started bot to the host, unless its label runs already or another bot
    /// has its network name (then it is stopped again).
    async fn admit(&mut self, compiled: Compiled, bot: Bot) -> anyhow::Result<()> {
        let Compiled {
            component,
            hash,
            stamp,
        } = compiled;
        let label = component.label.clone();
        let file = component.path.clone().unwrap_or_default();
        if self.bots.contains_key(&label) {
            bot.stop().await;
            anyhow::bail!("a bot for `{label}` is already running");
        }
        if let Some((other, _)) = self
            .bots
            .iter()
            .find(|(_, b)| b.manifest.name == bot.manifest.name)
        {
            let other = other.clone();
            bot.stop().await;
            anyhow::bail!(
                "persona `{label}` wants the network name of persona `{other}`; set personas.{label}.name in roost.toml"
            );
        }
        tracing::info!(file = %file.display(), bot = %label, name = %bot.manifest.name, "persona loaded");
        let detail = format!("version {}", bot.manifest.version);
        self.reload.stats.record(&label, "loaded", detail);
        self.bots.insert(label.clone(), bot);
        self.reload.running.insert(label.clone(), hash);
        self.reload.seen.insert(label.clone(), Seen { hash, stamp });
        ReloadStats::bump(&self.reload.stats.loaded);
        self.attach_shadow(&label).await;
        Ok(())
    }

    /// Starts the shadow of bot `label` if its file is there.
    async fn attach_shadow(&mut self, label: &str) {
        let path = self.context.config.shadow_file(label);
        let Ok(bytes) = tokio::fs::read(&path).await else {
            return;
        };
        let stamp = std::fs::metadata(&path).ok().map(|m| FileStamp::of(&m));
        self.reload.seen.remove(&label_for(&path));
        match stamp {
            Some(stamp) => self.apply_shadow(label, &path, bytes, stamp).await,
            None => {
                tracing::warn!(file = %path.display(), "shadow not started: cannot read its file")
            }
        }
    }

    /// A settled shadow file of bot `owner`: start it (or its new version), or
    /// ignore it if nothing changed. A refused shadow changes nothing.
    async fn apply_shadow(&mut self, owner: &str, path: &Path, bytes: Vec<u8>, stamp: FileStamp) {
        let key = label_for(path);
        let hash = content_hash(&bytes);
        let stamp = Some(stamp);
        if self.reload.shadows.get(owner) == Some(&hash) {
            self.reload.seen.insert(key, Seen { hash, stamp });
            ReloadStats::bump(&self.reload.stats.unchanged);
            return;
        }
        if self.reload.seen.get(&key).is_some_and(|s| s.hash == hash) {
            self.reload.seen.insert(key, Seen { hash, stamp });
            return;
        }
        self.reload.seen.insert(key.clone(), Seen { hash, stamp });
        if !self.bots.contains_key(owner) {
            tracing::info!(file = %path.display(), bot = %owner, "shadow waits for its bot: no `{owner}` is running");
            // Looked at again when the bot starts.
            self.reload.seen.remove(&key);
            return;
        }
        let started = match self.compile(path, bytes, stamp).await {
            Ok(c) => match self.bots.get(owner) {
                Some(bot) => bot
                    .start_shadow(&self.context, c.component.clone())
                    .await
                    .map(|()| bot.shadow()),
                None => Err(anyhow::anyhow!("no running bot for `{owner}`")),
            },
            Err(e) => Err(e),
        };
        match started {
            Ok(board) => {
                self.reload.shadows.insert(owner.to_string(), hash);
                let version = board.running.map(|r| r.version).unwrap_or_default();
                self.reload.stats.record(
                    &key,
                    "shadow",
                    format!("version {version} listens beside {owner} (never speaks)"),
                );
                tracing::info!(file = %path.display(), bot = %owner, version = %version, "shadow loaded");
            }
            Err(e) => {
                ReloadStats::bump(&self.reload.stats.rejected);
                self.reload.stats.record(&key, "rejected", format!("{e:#}"));
                tracing::warn!(file = %path.display(), bot = %owner, "shadow rejected: {e:#}");
            }
        }
    }

    /// The shadow file of bot `owner` is gone: stop its shadow.
    fn unshadow(&mut self, owner: &str, path: &Path) {
        self.reload.seen.remove(&label_for(path));
        if self.reload.shadows.remove(owner).is_none() {
            return;
        }
        if let Some(bot) = self.bots.get(owner) {
            bot.stop_shadow();
            self.reload
                .stats
                .record(&label_for(path), "shadow", "stopped: its file is gone");
            tracing::info!(file = %path.display(), bot = %owner, "shadow stopped: its file is gone");
        }
    }

    /// Describes the new version in a throwaway sandbox (no capability granted)
    /// and returns its manifest with the roost.toml overrides applied, validated.
    async fn describe_new(
        &self,
        component: &Arc<PersonaComponent>,
        bot_name: &str,
    ) -> anyhow::Result<Manifest> {
        let label = &component.label;
        let config = &self.context.config;
        let cfg = config.persona(label);
        let ctx = PersonaContext::new(label, bot_name, cfg.settings.clone(), Grants::default());
        let mut sandbox = Sandbox::new(
            self.context.runtime.clone(),
            component.clone(),
            ctx,
            config.limits_for(label),
        );
        let mut m = sandbox.describe().await?;
        if let Some(n) = &cfg.name {
            m.name = n.clone();
        }
        if let Some(d) = &cfg.description {
            m.description = d.clone();
        }
        if let Some(r) = &cfg.rooms {
            m.rooms = r.clone();
        }
        manifest::validate_with(&m, &self.context.scanner())?;
        Ok(m)
    }

    /// Installs a new version in the running bot of its label, or, if the new
    /// manifest names another bot, replaces the bot.
    async fn swap_in(&mut self, compiled: Compiled, settled_at: Instant) -> anyhow::Result<()> {
        let label = compiled.component.label.clone();
        let file = compiled.component.path.clone().unwrap_or_default();
        let component = compiled.component.clone();
        let Some(bot) = self.bots.get(&label) else {
            anyhow::bail!("no running bot for `{label}`");
        };
        let current = bot
            .status()
            .name
            .unwrap_or_else(|| bot.manifest.name.clone());
        let old_name = bot.manifest.name.clone();
        let m = self.describe_new(&component, &current).await?;

        if m.name != old_name {
            if let Some((other, _)) = self
                .bots
                .iter()
                .find(|(l, b)| **l != label && b.manifest.name == m.name)
            {
                anyhow::bail!(
                    "it wants the network name {:?} of persona `{other}`; set personas.{label}.name in roost.toml",
                    m.name
                );
            }
            // An identity belongs to its file: the network name was pinned at the
            // first registration, and a new manifest name does not change it.
            let server = self.context.server_base();
            self.context
                .names
                .claim(&self.context.store, &server, &label, &m.name)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            tracing::warn!(
                file = %file.display(),
                bot = %label,
                from = %old_name,
                to = %m.name,
                network_name = %current,
                "the new version names itself differently; the bot keeps its identity (it \
                 belongs to the file: use another file name for another identity)"
            );
        }

        let version = m.version.clone();
        let rooms = m.rooms.clone();
        let (swap, installed) = Swap::new(component, m.clone());
        let Some(bot) = self.bots.get_mut(&label) else {
            anyhow::bail!("no running bot for `{label}`");
        };
        if !bot.swap(swap) {
            anyhow::bail!("the bot's worker has stopped");
        }
        let old_rooms = std::mem::replace(&mut bot.manifest, m).rooms;
        self.reload.running.insert(label.clone(), compiled.hash);
        let stats = self.reload.stats.clone();
        // The worker installs it before its next message; report once it has.
        tokio::spawn(async move {
            if installed.await.is_ok() {
                let latency = stats.reloaded(settled_at);
                stats.record(&label, "reloaded", format!("version {version}"));
                tracing::info!(
                    file = %file.display(),
                    bot = %label,
                    version = %version,
                    latency_ms = latency.as_secs_f64() * 1e3,
                    "persona reloaded: new version installed"
                );
                if old_rooms != rooms {
                    tracing::info!(bot = %label, from = ?old_rooms, to = ?rooms, "rooms changed with the new version");
                }
            }
        });
        Ok(())
    }
}
