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

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use notify_debouncer_full::notify::{RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::mpsc;

use super::stats::ReloadStats;
use crate::plugin::PersonaComponent;
use crate::plugin::cache::{CompileCache, ContentHash};
use crate::plugin::component::{LoadError, check_header};

use super::context::HostContext;

/// Polls while waiting for a file to settle.
pub(crate) const SETTLE_POLL: Duration = Duration::from_millis(50);
/// How long a file may keep changing (or stay empty / shorter than a header) after
/// its event before it is judged as it is (or, if still changing, left for the event
/// of its next change).
pub(crate) const SETTLE_MAX: Duration = Duration::from_secs(5);
/// The least quiet time: a file modified more recently is still being written.
pub(crate) const SETTLE_QUIET_MIN: Duration = Duration::from_millis(50);

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

// -- per-host state -------------------------------------------------------------

/// Size and modification time: a cheap "has it changed?" for rescans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    pub(crate) len: u64,
    pub(crate) modified: Option<SystemTime>,
}

impl FileStamp {
    pub(crate) fn of(m: &std::fs::Metadata) -> Self {
        FileStamp {
            len: m.len(),
            modified: m.modified().ok(),
        }
    }
}

/// What the host last saw of one persona file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seen {
    pub(crate) hash: ContentHash,
    pub(crate) stamp: Option<FileStamp>,
}

/// The compile cache, the counters and what is known of each persona file.
pub struct ReloadState {
    pub(crate) cache: Arc<CompileCache>,
    pub(crate) stats: Arc<ReloadStats>,
    /// Content hash of the version each bot runs, by label.
    pub(crate) running: HashMap<String, ContentHash>,
    /// The last content looked at, by label, accepted or not (rejected bytes are
    /// not tried twice).
    pub(crate) seen: HashMap<String, Seen>,
    /// Content hash of the shadow each bot runs, by the bot's label.
    pub(crate) shadows: HashMap<String, ContentHash>,
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
    pub(crate) component: Arc<PersonaComponent>,
    pub(crate) hash: ContentHash,
    pub(crate) stamp: Option<FileStamp>,
}

// -- the folder watcher ---------------------------------------------------------

/// What changed in the folder.
pub(crate) enum Batch {
    /// These persona files (present or gone).
    Paths(BTreeSet<PathBuf>),
    /// Events were lost: look at everything.
    Rescan,
}

/// notify + the debouncer on one folder, delivering batches to async code.
pub(crate) struct FolderWatcher {
    pub(crate) dir: PathBuf,
    pub(crate) rx: mpsc::UnboundedReceiver<DebounceEventResult>,
    pub(crate) _debouncer: Debouncer<RecommendedWatcher, RecommendedCache>,
}

impl FolderWatcher {
    pub(crate) fn start(
        dir: &Path,
        debounce: Duration,
    ) -> notify_debouncer_full::notify::Result<Self> {
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
    pub(crate) async fn next(&mut self) -> Option<Batch> {
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
    pub(crate) fn absorb(
        &self,
        result: DebounceEventResult,
        paths: &mut BTreeSet<PathBuf>,
    ) -> bool {
        match result {
            Ok(events) => {
                let mut rescan = false;
                for event in events {
                    rescan |= event.need_rescan();
                    if is_read_only(&event.kind) {
                        // roost reading the folder or a file (each round of leases
                        // lists it, loading reads it): nothing changed.
                        continue;
                    }
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

/// Whether a folder event only says something was opened or read (not written).
/// A file closed after writing (`Close(Write)`) is a change.
pub(crate) fn is_read_only(kind: &notify_debouncer_full::notify::EventKind) -> bool {
    use notify_debouncer_full::notify::event::{AccessKind, AccessMode, EventKind};
    matches!(
        kind,
        EventKind::Access(
            AccessKind::Open(_) | AccessKind::Read | AccessKind::Close(AccessMode::Read)
        )
    )
}

/// A file as found after waiting for it to settle.
pub(crate) enum Settled {
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
pub(crate) async fn settle(path: &Path, quiet: Duration) -> Settled {
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
pub(crate) type Planned = (PathBuf, ContentHash, Option<FileStamp>, Option<Vec<u8>>);

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

    #[test]
    fn reading_the_folder_is_not_a_change() {
        use notify_debouncer_full::DebouncedEvent;
        use notify_debouncer_full::notify::Event;
        use notify_debouncer_full::notify::event::{AccessKind, AccessMode, CreateKind, EventKind};
        let dir = tempfile::tempdir().unwrap();
        let watcher = FolderWatcher::start(dir.path(), Duration::from_millis(50)).unwrap();
        let file = dir.path().join("echo.wasm");
        let batch = |kind: EventKind, path: &Path| {
            let mut paths = BTreeSet::new();
            let event = DebouncedEvent::new(Event::new(kind).add_path(path.into()), Instant::now());
            assert!(!watcher.absorb(Ok(vec![event]), &mut paths));
            paths
        };
        for read in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
        ] {
            assert!(batch(read, &file).is_empty(), "{read:?}");
            assert!(batch(read, dir.path()).is_empty(), "{read:?}");
        }
        // Written and closed, or created: a change.
        let written = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert_eq!(batch(written, &file), BTreeSet::from([file.clone()]));
        let created = EventKind::Create(CreateKind::File);
        assert_eq!(batch(created, &file), BTreeSet::from([file.clone()]));
    }

    /// Listing the folder and reading its files (as every lease round and every load
    /// do) brings no batch naming those files: only a real change does.
    #[tokio::test]
    async fn the_watcher_ignores_roost_reading_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let read = dir.path().join("a.wasm");
        std::fs::write(&read, b"\0asm").unwrap();
        let mut watcher = FolderWatcher::start(dir.path(), Duration::from_millis(20)).unwrap();
        for _ in 0..5 {
            let _ = std::fs::read(&read).unwrap();
            let _ = super::super::host::persona_files(dir.path()).unwrap();
        }
        let changed = dir.path().join("b.wasm");
        std::fs::write(&changed, b"\0asm").unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(30), async {
            let mut seen = BTreeSet::new();
            while !seen.contains(&changed) {
                match watcher.next().await {
                    Some(Batch::Paths(p)) => seen.extend(p),
                    Some(Batch::Rescan) => panic!("a rescan"),
                    None => panic!("the watcher ended"),
                }
            }
            seen
        })
        .await
        .expect("the change is seen");
        assert_eq!(seen, BTreeSet::from([changed]), "reads are not changes");
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
