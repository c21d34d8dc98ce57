//! Hot reload: drop a `NAME.wasm` into the plugins folder and the bot changes its
//! mind; nothing else moves.
//!
//! [`BotHost::serve_reloads`] watches the plugins folder (not recursively: it also
//! holds persona sources and their `target/`) with notify and a debouncer, and acts on
//! the `*.wasm` files directly in it (hidden files such as `.echo.wasm.tmp` are
//! ignored). Every event is turned into a look at what is on disk *now* for that file,
//! so a compiler or an editor that writes a temporary file and renames it, or writes
//! in several chunks, is handled like a plain write: after the debounce (`[reload]
//! debounce_ms`, default 300 ms) the file must also be *settled* — not written for
//! the debounce time, its size and modification time unchanged across a read, and a
//! WebAssembly component header in place — before anything happens. (A writer that
//! pauses for longer than the debounce time mid-file may get a half-written file
//! rejected first and loaded when it is complete.)
//!
//! - **New file**: compiled off the async runtime (through the [compile
//!   cache](crate::plugin::cache)), checked against the contract, and a new bot is
//!   started for it.
//! - **Changed file**: the new version is compiled, checked and described (in a
//!   throwaway sandbox) while the old one keeps serving; then a [`Swap`] is handed to
//!   the bot's worker, which installs it *between two messages*: a message already
//!   inside the old version finishes there, the next one goes to the new version. The
//!   session (socket, identity, rooms, outbox), the bot's history and its KV namespace
//!   are untouched; the persona's in-memory state is not carried over (it is a new
//!   instance of new code). If the new manifest lists other rooms, the bot leaves the
//!   rooms no longer listed and joins the new ones (rooms the persona joined by itself
//!   stay).
//! - **Renamed persona**: an identity (credentials, outbox, recovery positions, KV)
//!   belongs to the file's label, and the network name is pinned at its first
//!   registration. A new version whose manifest names itself differently is swapped in
//!   like any other, under the same identity, with a warning; a name another persona
//!   holds is refused. A new identity takes a new file name.
//! - **Deleted file**: the bot finishes its message in flight, flushes its outbox
//!   (bounded by `session.shutdown_flush_ms`), and disconnects with a normal close,
//!   which takes it out of its rooms.
//! - **Broken or incompatible new version** (not a component, truncated, built for
//!   another contract, a failing `describe`, an invalid manifest): nothing changes,
//!   the old version keeps serving; one warning names the file and the reason and the
//!   rejection is counted. The same bytes are not tried again; fixing the file loads it.
//! - **Unchanged file** (same SHA-256 as the running version, e.g. `touch`): nothing.
//!
//! **Why the swap is atomic.** A bot's worker task is the only code that ever calls
//! its sandbox, one message at a time. The new version reaches it as a [`Swap`] on a
//! channel that the worker's (biased) loop checks before taking the next message
//! from its queue, and never while a call is in flight; installing it is
//! [`Sandbox::replace_component`] plus the new manifest, in the worker, with no
//! `await` in between. So every message is handled by exactly one version, all
//! messages before the swap by the old one and all after it by the new one; the
//! inbound queue, the session and everything else are not touched, so nothing is
//! lost or handled twice. Compiling, checking and describing happen before, on the
//! reload task and a blocking thread, while the old version keeps serving.
//!
//! Every outcome is logged and counted in [`ReloadStats`] (with the latency of the
//! last reload: file settled → new version installed), which
//! [`BotHost::reload_stats`] hands out for metrics.
//!
//! ```no_run
//! use roost::bot::host::BotHost;
//! use roost::config::Config;
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let mut host = BotHost::start(Config::default()).await?; // start-up uses the cache
//! let stats = host.reload_stats();
//! host.serve_reloads(async { let _ = tokio::signal::ctrl_c().await; }).await;
//! println!("{:?}", stats.snapshot());
//! host.stop().await;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use notify_debouncer_full::notify::{RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::{mpsc, oneshot};

use crate::names::RoomName;
use crate::plugin::bindings::Manifest;
use crate::plugin::cache::{CacheOutcome, CompileCache, ContentHash, content_hash};
use crate::plugin::component::{LoadError, check_header, label_for};
use crate::plugin::{Grants, PersonaComponent, PersonaContext, Sandbox, manifest};

use super::core::{BotCore, Effect};
use super::host::BotHost;
use super::runner::{Bot, HostContext};

/// Polls while waiting for a file to settle.
const SETTLE_POLL: Duration = Duration::from_millis(50);
/// How long a file may keep changing (or stay empty / shorter than a header) after
/// its event before it is judged as it is (or, if still changing, left for the event
/// of its next change).
const SETTLE_MAX: Duration = Duration::from_secs(5);
/// The least quiet time: a file modified more recently is still being written.
const SETTLE_QUIET_MIN: Duration = Duration::from_millis(50);

/// Whether `path` names a persona file: `NAME.wasm`, not hidden.
pub fn is_persona_file(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "wasm")
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.starts_with('.'))
}

/// Whether `path` names a shadow by its name: `NAME.shadow.wasm`.
pub fn is_shadow_file(path: &Path) -> bool {
    is_persona_file(path)
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".shadow.wasm"))
}

// -- the swap -------------------------------------------------------------------

/// A new version of a running bot's persona, for its worker to install between two
/// messages (see [`Bot::swap`]).
pub struct Swap {
    component: Arc<PersonaComponent>,
    manifest: Manifest,
    done: Option<oneshot::Sender<()>>,
}

impl Swap {
    /// A swap to `component`, whose (effective, validated) manifest is `manifest`;
    /// the receiver completes once the worker has installed it.
    pub fn new(
        component: Arc<PersonaComponent>,
        manifest: Manifest,
    ) -> (Swap, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (
            Swap {
                component,
                manifest,
                done: Some(tx),
            },
            rx,
        )
    }

    /// Installs the new version in the worker's pipeline: the next call instantiates
    /// it. Returns the joins and leaves a change of the manifest's rooms calls for.
    pub(crate) fn install(self, core: &mut BotCore) -> Vec<Effect> {
        let Swap {
            component,
            manifest,
            done,
        } = self;
        // Manifests are validated before a swap; a room that isn't valid is no room.
        let rooms = |m: &Manifest| -> BTreeSet<RoomName> {
            m.rooms
                .iter()
                .filter_map(|r| RoomName::new(r.as_str()).ok())
                .collect()
        };
        let (old, new) = (rooms(&core.manifest), rooms(&manifest));
        core.sandbox.replace_component(component);
        core.manifest = manifest;
        let mut effects: Vec<Effect> = old.difference(&new).cloned().map(Effect::Leave).collect();
        effects.extend(new.difference(&old).cloned().map(Effect::Join));
        if let Some(done) = done {
            let _ = done.send(());
        }
        effects
    }
}

// -- statistics -----------------------------------------------------------------

/// One load of a persona file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadRecord {
    pub label: String,
    pub outcome: CacheOutcome,
    /// Compile (or deserialize from the cache) + contract check + pre-instantiation.
    pub took: Duration,
}

#[derive(Debug, Default)]
struct Last {
    reload_latency: Option<Duration>,
    reload_settled_at: Option<Instant>,
    load: Option<LoadRecord>,
}

/// Hot-reload and load counters of a host, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct ReloadStats {
    loaded: AtomicU64,
    reloaded: AtomicU64,
    rejected: AtomicU64,
    unloaded: AtomicU64,
    unchanged: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    cache_rebuilt: AtomicU64,
    load_micros: AtomicU64,
    last: Mutex<Last>,
    /// The last [`RECENT_EVENTS`] things hot reload did, oldest first.
    recent: Mutex<std::collections::VecDeque<ReloadEvent>>,
    events: AtomicU64,
}

/// How many [`ReloadEvent`]s a host keeps.
pub const RECENT_EVENTS: usize = 50;

/// One thing hot reload did to one persona: for the status page and `roost dev`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadEvent {
    /// Numbers the events of a host from 1: a reader takes those after the last it saw.
    pub seq: u64,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The persona's label (file stem).
    pub label: String,
    /// `loaded`, `reloaded`, `rejected` or `unloaded`.
    pub event: &'static str,
    /// The version now running, or why the file was refused or the bot stopped.
    pub detail: String,
}

/// A point-in-time copy of [`ReloadStats`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadStatsSnapshot {
    /// Bots started from a file (at start-up or when a file appeared).
    pub loaded: u64,
    /// New versions installed in running bots.
    pub reloaded: u64,
    /// Files refused (broken, incompatible, invalid manifest, failed start).
    pub rejected: u64,
    /// Bots stopped because their file went away (or their persona was renamed).
    pub unloaded: u64,
    /// Events on a file whose content had not changed.
    pub unchanged: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_rebuilt: u64,
    /// Time spent loading persona files (read, compile or deserialize, check).
    pub load_time_total: Duration,
    /// File settled → new version installed, for the last reload.
    pub last_reload_latency: Option<Duration>,
    /// When the file of the last reload settled (for measurements).
    #[serde(skip)]
    pub last_reload_settled_at: Option<Instant>,
    /// The last file loaded.
    pub last_load: Option<LoadRecord>,
}

impl ReloadStats {
    pub fn snapshot(&self) -> ReloadStatsSnapshot {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ReloadStatsSnapshot {
            loaded: n(&self.loaded),
            reloaded: n(&self.reloaded),
            rejected: n(&self.rejected),
            unloaded: n(&self.unloaded),
            unchanged: n(&self.unchanged),
            cache_hits: n(&self.cache_hits),
            cache_misses: n(&self.cache_misses),
            cache_rebuilt: n(&self.cache_rebuilt),
            load_time_total: Duration::from_micros(n(&self.load_micros)),
            last_reload_latency: last.reload_latency,
            last_reload_settled_at: last.reload_settled_at,
            last_load: last.load.clone(),
        }
    }

    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Remembers an event (see [`ReloadEvent`]).
    pub fn record(&self, label: &str, event: &'static str, detail: impl Into<String>) {
        let at_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let seq = self.events.fetch_add(1, Ordering::Relaxed) + 1;
        if recent.len() == RECENT_EVENTS {
            recent.pop_front();
        }
        recent.push_back(ReloadEvent {
            seq,
            at_ms,
            label: label.to_string(),
            event,
            detail: detail.into(),
        });
    }

    /// The kept events, oldest first.
    pub fn recent(&self) -> Vec<ReloadEvent> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().cloned().collect()
    }

    fn loaded_file(&self, record: LoadRecord) {
        Self::bump(match record.outcome {
            CacheOutcome::Hit => &self.cache_hits,
            CacheOutcome::Miss => &self.cache_misses,
            CacheOutcome::Rebuilt => &self.cache_rebuilt,
        });
        self.load_micros
            .fetch_add(record.took.as_micros() as u64, Ordering::Relaxed);
        self.last.lock().unwrap_or_else(|p| p.into_inner()).load = Some(record);
    }

    fn reloaded(&self, settled_at: Instant) -> Duration {
        let latency = settled_at.elapsed();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.reload_latency = Some(latency);
        last.reload_settled_at = Some(settled_at);
        drop(last);
        Self::bump(&self.reloaded);
        latency
    }
}

// -- per-host state -------------------------------------------------------------

/// Size and modification time: a cheap "has it changed?" for rescans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
}

impl FileStamp {
    fn of(m: &std::fs::Metadata) -> Self {
        FileStamp {
            len: m.len(),
            modified: m.modified().ok(),
        }
    }
}

/// What the host last saw of one persona file.
#[derive(Debug, Clone, Copy)]
struct Seen {
    hash: ContentHash,
    stamp: Option<FileStamp>,
}

/// The compile cache, the counters and what is known of each persona file.
pub struct ReloadState {
    cache: Arc<CompileCache>,
    stats: Arc<ReloadStats>,
    /// Content hash of the version each bot runs, by label.
    running: HashMap<String, ContentHash>,
    /// The last content looked at, by label, accepted or not (rejected bytes are
    /// not tried twice).
    seen: HashMap<String, Seen>,
    /// Content hash of the shadow each bot runs, by the bot's label.
    shadows: HashMap<String, ContentHash>,
}

impl ReloadState {
    /// Opens the compile cache in `<paths.state>/cache` as `[cache]` says (a cache
    /// that cannot be opened is logged and disabled: loading still works).
    pub fn new(context: &HostContext) -> ReloadState {
        let config = &context.config;
        let engine = context.runtime.engine();
        let cache = if config.cache.enabled {
            let dir = config.paths.state.join("cache");
            match CompileCache::open(&dir, config.cache.max_mib << 20, engine) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), "compile cache disabled: cannot open it: {e}");
                    CompileCache::disabled(engine)
                }
            }
        } else {
            CompileCache::disabled(engine)
        };
        ReloadState {
            cache: Arc::new(cache),
            stats: Arc::default(),
            running: HashMap::new(),
            seen: HashMap::new(),
            shadows: HashMap::new(),
        }
    }

    pub fn cache(&self) -> &CompileCache {
        &self.cache
    }
}

/// A compiled, checked persona file.
pub(crate) struct Compiled {
    component: Arc<PersonaComponent>,
    hash: ContentHash,
    stamp: Option<FileStamp>,
}

// -- the folder watcher ---------------------------------------------------------

/// What changed in the folder.
enum Batch {
    /// These persona files (present or gone).
    Paths(BTreeSet<PathBuf>),
    /// Events were lost: look at everything.
    Rescan,
}

/// notify + the debouncer on one folder, delivering batches to async code.
struct FolderWatcher {
    dir: PathBuf,
    rx: mpsc::UnboundedReceiver<DebounceEventResult>,
    _debouncer: Debouncer<RecommendedWatcher, RecommendedCache>,
}

impl FolderWatcher {
    fn start(dir: &Path, debounce: Duration) -> notify_debouncer_full::notify::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut debouncer = new_debouncer(debounce, None, move |res: DebounceEventResult| {
            let _ = tx.send(res);
        })?;
        debouncer.watch(dir, RecursiveMode::NonRecursive)?;
        Ok(FolderWatcher {
            dir: dir.to_path_buf(),
            rx,
            _debouncer: debouncer,
        })
    }

    /// The next batch (everything already delivered merged into one); `None` if the
    /// watcher died.
    async fn next(&mut self) -> Option<Batch> {
        let first = self.rx.recv().await?;
        let mut paths = BTreeSet::new();
        let mut rescan = self.absorb(first, &mut paths);
        while let Ok(more) = self.rx.try_recv() {
            rescan |= self.absorb(more, &mut paths);
        }
        Some(if rescan {
            Batch::Rescan
        } else {
            Batch::Paths(paths)
        })
    }

    /// Adds the persona files an event names; true if a rescan is needed.
    fn absorb(&self, result: DebounceEventResult, paths: &mut BTreeSet<PathBuf>) -> bool {
        match result {
            Ok(events) => {
                let mut rescan = false;
                for event in events {
                    rescan |= event.need_rescan();
                    for p in &event.paths {
                        if is_persona_file(p)
                            && let Some(name) = p.file_name()
                        {
                            paths.insert(self.dir.join(name));
                        }
                    }
                }
                rescan
            }
            Err(errors) => {
                for e in errors {
                    tracing::warn!(dir = %self.dir.display(), "plugins folder watch error: {e}");
                }
                true
            }
        }
    }
}

/// A file as found after waiting for it to settle.
enum Settled {
    Gone,
    /// Still changing after [`SETTLE_MAX`]; a later event will bring it back.
    Busy,
    Ready {
        bytes: Vec<u8>,
        stamp: FileStamp,
        at: Instant,
    },
}

/// Waits until `path` stops changing: same size and mtime before and after reading
/// it, not modified for `quiet` (the debounce time: the debouncer reports a burst of
/// writes `quiet` after its *first* event, this makes it `quiet` after the last), and
/// (unless it stays that way for [`SETTLE_MAX`]) long enough to hold a component
/// header.
async fn settle(path: &Path, quiet: Duration) -> Settled {
    let quiet = quiet.max(SETTLE_QUIET_MIN);
    let deadline = Instant::now() + SETTLE_MAX;
    loop {
        let before = match tokio::fs::metadata(path).await {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Settled::Gone,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Settled::Gone,
            Err(_) => {
                if Instant::now() >= deadline {
                    return Settled::Busy;
                }
                tokio::time::sleep(SETTLE_POLL).await;
                continue;
            }
        };
        let age = before.modified().ok().and_then(|t| t.elapsed().ok());
        if age.is_none_or(|age| age >= quiet) {
            let bytes = match tokio::fs::read(path).await {
                Ok(b) => Some(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Settled::Gone,
                Err(_) => None,
            };
            let after = tokio::fs::metadata(path).await.ok();
            if let (Some(bytes), Some(after)) = (bytes, after) {
                let stamp = FileStamp::of(&before);
                let stable = stamp == FileStamp::of(&after) && bytes.len() as u64 == stamp.len;
                // Empty or shorter than a header: most likely mid-write.
                let partial = matches!(
                    check_header("", &bytes),
                    Err(LoadError::Empty { .. } | LoadError::TooShort { .. })
                );
                if stable && (!partial || Instant::now() >= deadline) {
                    return Settled::Ready {
                        bytes,
                        stamp,
                        at: Instant::now(),
                    };
                }
            }
        }
        if Instant::now() >= deadline {
            return Settled::Busy;
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// A persona file at start-up: its path, content hash, stamp, and its bytes if it is
/// the first file with that content.
type Planned = (PathBuf, ContentHash, Option<FileStamp>, Option<Vec<u8>>);

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
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return,
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
        let mut paths: BTreeSet<PathBuf> = match super::host::persona_files(&dir) {
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
                    format!("version {version} listens beside `{owner}` (never speaks)"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_visible_wasm_files_are_personas() {
        assert!(is_persona_file(Path::new("plugins/echo.wasm")));
        assert!(!is_persona_file(Path::new("plugins/.echo.wasm")));
        assert!(!is_persona_file(Path::new("plugins/echo.wasm.tmp")));
        assert!(!is_persona_file(Path::new("plugins/echo.wasm~")));
        assert!(!is_persona_file(Path::new("plugins/echo")));
        assert!(!is_persona_file(Path::new("plugins/Cargo.toml")));
    }

    #[tokio::test]
    async fn settle_waits_for_a_header_and_reports_gone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.wasm");
        let quiet = SETTLE_QUIET_MIN;
        assert!(matches!(settle(&p, quiet).await, Settled::Gone));
        std::fs::write(&p, b"\0asm\x0d\0\x01\0rest").unwrap();
        match settle(&p, quiet).await {
            Settled::Ready { bytes, stamp, .. } => {
                assert_eq!(bytes.len(), 12);
                assert_eq!(stamp.len, 12);
            }
            _ => panic!("not ready"),
        }
        // Garbage that is long enough is judged at once (and refused later).
        std::fs::write(&p, b"definitely not wasm").unwrap();
        let t = Instant::now();
        assert!(matches!(settle(&p, quiet).await, Settled::Ready { .. }));
        assert!(t.elapsed() < SETTLE_MAX);
    }
}
