//! `roost dev`: the zero-setup main job. One command puts the person at the
//! terminal in a chat room with the personas of a folder:
//!
//! 1. **Config.** `roost.toml` in the current folder (or `--config FILE`) is read if
//!    present, for `[llm]`, `[personas.*]`, `[policy]`, `[limits]` and the rest;
//!    `server.url` and `paths.state` are always replaced (below), `paths.plugins`
//!    unless `--plugins` says otherwise. Without a file, every default applies.
//! 2. **Build.** Every persona project in the plugins folder (`plugins/NAME/` with a
//!    `Cargo.toml` declaring a `cdylib`, or a Python app with a `persona.toml`)
//!    whose `plugins/NAME.wasm` is missing or older than any file of its source
//!    (`Cargo.toml` and `src/**`; every file of a Python project) is built with
//!    [`crate::build`], one after the other, with a line per persona saying how far
//!    along it is (`[1/2] echo … done in 1.2 s`; on a terminal the elapsed seconds
//!    tick while cargo works). A failed build is one line; the others go on, and a
//!    stale `.wasm` left from before still runs. Python projects are skipped with a
//!    note when `componentize-py` is not on `PATH`. `--no-build` skips this step.
//! 3. **Server and LLM.** A local chat server ([`crate::devserver`]) on a free
//!    loopback port. Unless the config names at least one `[llm.providers.*]`, a
//!    local fake LLM ([`FakeLlm`]) stands in as provider `fake` (model `fake`): it
//!    answers by rephrasing the prompt, which is enough to watch an LLM persona work.
//! 4. **Bots.** Every `DIR/*.wasm` runs as a bot ([`BotHost`]), exactly as `roost run`
//!    would run it, against the local server; a line says how many started and how
//!    long it took. Components large enough to take seconds to compile (a Python
//!    persona) and not in the compile cache yet are compiled into it first, one
//!    progress line each (`[1/1] quizmaster.wasm (17 MB) … done in 21.0 s`). A persona that does not load is one line on
//!    stderr; the others run. The example personas get the grants they need unless
//!    the config has a `[personas.NAME]` section of its own: `greeter` and
//!    `quizmaster` (the Python example) get `kv`, `llm-persona` gets `kv`, `history`
//!    and `llm`. Hot reload is on unless `[reload] enabled = false`: `roost build
//!    plugins/NAME` while `roost dev` runs swaps that bot's persona live, and a new
//!    `.wasm` starts a new bot (see [`crate::bot::reload`]). A person types at the
//!    speed of a conversation, so unless the config sets `[policy.limits]` itself,
//!    the per-room pacing is relaxed to the per-bot limits (no 2 s minimum between
//!    two messages to one room); the per-bot limits and the loop guard stay.
//! 5. **State.** Identities, outbox and KV live in a fresh temporary folder
//!    (`$TMPDIR/roost-dev-PID-XXXXXXXX`), deleted on exit: the chat server lives in
//!    memory and starts empty every time, so state kept across runs would only
//!    describe a network that no longer exists. `--state DIR` keeps it in `DIR`
//!    instead (never deleted). The compile cache is the exception: a temporary state
//!    folder's `cache/` links to `~/.cache/roost/dev-cache` (`$XDG_CACHE_HOME`), so a
//!    persona is compiled once, not on every start.
//! 6. **Chat.** The person at the terminal registers as a human (`you` by default,
//!    `--name`) and connects over the WebSocket like any agent, in `lobby`.
//!
//! Two modes, chosen by whether standard input is a terminal:
//!
//! - **Interactive**: a line prompt (`#lobby> `). A line is posted to the current
//!   room; what others say is printed as `name: text` with a stable colour per name,
//!   system lines dimmed, other rooms' messages prefixed `#room`. Commands: `/join
//!   ROOM` (joins and switches the current room), `/who` (agents in the room),
//!   `/help`, `/quit` (or Ctrl-D); `//text` posts `/text`. Ctrl-C stops the bots
//!   gracefully (a second Ctrl-C exits at once). Colours are off when `NO_COLOR` is
//!   set or standard output is not a terminal. The prompt is a plain cooked-mode
//!   line, no TUI: an incoming message clears the prompt line, prints itself on a
//!   line of its own and redraws the prompt below it, so it is never glued to the
//!   prompt; text typed but not yet sent stays in the terminal's line buffer (Enter
//!   sends it), only its display is cleared.
//! - **Piped**: each input line is posted as the human's message (the commands work
//!   too), the transcript goes to standard output, one line per message, `#room
//!   name: text` (a message's own line breaks shown as ` ⏎ `), and the program
//!   exits with status 0 once input has ended, every line sent has come back from
//!   the server, every bot's queue and outbox is empty and nothing was said for
//!   `--quiet-secs` (default 3). `--max-wait-secs` (default 60) bounds that wait
//!   after the end of input, so it cannot hang.
//!
//! Status lines (builds, who is running) go to standard error, and so do the logs,
//! quiet by default (`warn`; `-v` for more). Standard input is read by a plain
//! thread, not `tokio::io::stdin`, whose blocking read would hold up the runtime's
//! shutdown until the next Enter.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let opts = roost::dev::DevOptions { plugins: Some("plugins".into()), ..Default::default() };
//! roost::dev::run(opts, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::bot::host::{BotHost, persona_files};
use crate::bot::reload::{ReloadStats, ReloadStatsSnapshot};
use crate::build::{BuildOptions, CargoRunner, PYTHON_MANIFEST, ProjectKind, build_persona_with};
use crate::config::Config;
use crate::devserver::{self, DevServer, ServerConfig};
use crate::llm::fake::FakeLlm;
use crate::llm::{PersonaLlmConfig, ProviderKind};
use crate::plugin::Runtime;
use crate::plugin::cache::{CompileCache, content_hash};
use crate::policy::LimitsConfig;
use crate::protocol::{ChatMessage, ClientFrame, ServerFrame};
use crate::session::{SessionHandle, SessionState};

/// How long to wait for the bots to be live before the human joins.
const BOTS_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// What `roost dev` was asked to do.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// The persona folder [default: `paths.plugins` of the config, `plugins`].
    pub plugins: Option<PathBuf>,
    /// The config file [default: `roost.toml` in the current folder, if present].
    pub config: Option<PathBuf>,
    /// Keep state here instead of a temporary folder deleted on exit.
    pub state: Option<PathBuf>,
    /// The human's name on the chat.
    pub name: String,
    /// The room to start in.
    pub room: String,
    /// Build stale persona projects first.
    pub build: bool,
    /// Piped mode: silence that ends the run once input has ended.
    pub quiet: Duration,
    /// Piped mode: longest wait for silence after the end of input.
    pub max_wait: Duration,
    /// Force the interactive (`Some(true)`) or piped mode; default: whether
    /// standard input is a terminal.
    pub interactive: Option<bool>,
}

impl Default for DevOptions {
    fn default() -> Self {
        DevOptions {
            plugins: None,
            config: None,
            state: None,
            name: "you".into(),
            room: "lobby".into(),
            build: true,
            quiet: Duration::from_secs(3),
            max_wait: Duration::from_secs(60),
            interactive: None,
        }
    }
}

/// Runs `roost dev` until `/quit`, the end of piped input, or `shutdown`.
pub async fn run(opts: DevOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let interactive = opts
        .interactive
        .unwrap_or_else(|| std::io::stdin().is_terminal());
    let status = Status::stderr();

    // 1. Config.
    let config_path = opts.config.clone().or_else(|| {
        let here = PathBuf::from("roost.toml");
        here.is_file().then_some(here)
    });
    let mut config = match &config_path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let plugins = opts
        .plugins
        .clone()
        .unwrap_or_else(|| config.paths.plugins.clone());
    if !plugins.is_dir() {
        anyhow::bail!(
            "no plugins folder at {}: run `roost dev` in the repository root, or pass --plugins DIR",
            plugins.display()
        );
    }

    // 2. Build what is stale.
    if opts.build {
        build_stale(&plugins, &status).await;
    }

    // 3. Server and LLM.
    let server = devserver::spawn("127.0.0.1:0".parse()?, ServerConfig::default())
        .await
        .context("cannot start the local chat server")?;
    let fake = if config.llm.providers.is_empty() {
        let fake = FakeLlm::spawn("127.0.0.1:0".parse()?)
            .await
            .context("cannot start the fake LLM")?;
        let provider = fake.provider_config(ProviderKind::OpenAi, "fake");
        config.llm.providers.insert("fake".into(), provider);
        config.llm.default_provider = Some("fake".into());
        Some(fake)
    } else {
        None
    };
    add_dev_grants(&mut config);
    relax_room_pacing(&mut config);

    // 4. State and bots.
    let state = StateDir::new(opts.state.clone(), config.cache.enabled)?;
    config.server.url = server.base_url();
    config.paths.plugins = plugins.clone();
    config.paths.state = state.path.clone();
    config.validate().map_err(|e| match &config_path {
        Some(p) => anyhow::anyhow!("{}: {e}", p.display()),
        None => anyhow::anyhow!("invalid dev configuration: {e}"),
    })?;
    let files = persona_files(&plugins)?;
    status.line(&format!(
        "starting {} persona{} from {} on the local chat server {}",
        files.len(),
        plural(files.len()),
        plugins.display(),
        server.base_url()
    ));
    warm_cache(&config, &files, &status).await;
    let started = Instant::now();
    let mut host = BotHost::start(config.clone()).await?;
    wait_for_bots(&host, &status).await;
    status.line(&format!(
        "  {} of {} running after {:.1} s",
        host.bots.len(),
        files.len(),
        started.elapsed().as_secs_f64()
    ));
    let bot_names: Vec<String> = host
        .bots
        .values()
        .map(|b| b.status().name.unwrap_or_else(|| b.manifest.name.clone()))
        .collect();
    let probes: Vec<BotProbe> = host
        .bots
        .values()
        .map(|b| b.session.clone())
        .collect();

    // 5. The human.
    let (me, mut ws) = connect_human(&server, &opts.name, &opts.room).await?;
    let mut chat = Chat {
        me: me.clone(),
        room: opts.room.clone(),
        interactive,
        style: Style::for_stdout(),
        server: &server,
        pending_echoes: 0,
        prompt_shown: Default::default(),
        reloads: config
            .reload
            .enabled
            .then(|| (host.reload_stats(), host.reload_stats().snapshot())),
    };
    let reload = config.reload.enabled;
    let summary = Summary {
        llm: match (&fake, &config_path) {
            (Some(_), _) => {
                "a local fake LLM stands in (configure [llm] in roost.toml for a real one)".into()
            }
            (None, path) => format!(
                "LLM: {} (from {})",
                config
                    .llm
                    .providers
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                path.as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        },
        state: if state.temporary {
            format!("state in {} (deleted on exit)", state.path.display())
        } else {
            format!("state in {}", state.path.display())
        },
        reload: if reload {
            format!(
                "hot reload on: `roost build {}/NAME` swaps a bot live",
                plugins.display()
            )
        } else {
            "hot reload off".into()
        },
        bots: bot_names,
    };
    chat.banner(&summary);

    // The chat, and hot reload beside it until the chat ends.
    let input = spawn_stdin_reader()?;
    let (chat_done, reloads_stop) = oneshot::channel::<()>();
    let chat_run = async {
        let outcome = if interactive {
            chat.interactive(&mut ws, input, shutdown).await
        } else {
            let quiet = (opts.quiet, opts.max_wait);
            chat.piped(&mut ws, input, shutdown, &probes, quiet).await
        };
        let _ = chat_done.send(());
        outcome
    };
    let reloads = async {
        let stop = async {
            let _ = reloads_stop.await;
        };
        if reload {
            host.serve_reloads(stop).await;
        } else {
            stop.await;
        }
    };
    let (outcome, ()) = tokio::join!(chat_run, reloads);

    // 6. Stop: the human leaves, bots finish and flush, the server goes.
    let hard_exit = tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("roost dev: interrupted again, exiting now");
            std::process::exit(130);
        }
    });
    let _ = ws.close(None).await;
    status.line("stopping the bots…");
    host.stop().await;
    server.shutdown().await;
    drop(fake);
    drop(state);
    hard_exit.abort();
    outcome
}

/// What the banner says.
struct Summary {
    llm: String,
    state: String,
    reload: String,
    bots: Vec<String>,
}

/// What piped mode looks at to tell whether a bot is still busy.
type BotProbe = SessionHandle;

/// In dev a person types to the bots at the speed of a conversation, so unless
/// the config sets `[policy.limits]` itself, the per-room pacing is relaxed to the
/// per-bot limits: no minimum interval between two messages to a room, the bot's
/// burst and per-minute budget for a room too. The per-bot limits and the loop
/// guard stay as they are.
fn relax_room_pacing(config: &mut Config) {
    let limits = &mut config.policy.limits;
    if *limits == LimitsConfig::default() {
        limits.room_min_interval_ms = 0;
        limits.room_burst = limits.bot_burst;
        limits.room_per_minute = limits.bot_per_minute;
    }
}

/// The example personas' grants, unless the config has a section of their own.
fn add_dev_grants(config: &mut Config) {
    let grants: [(&str, bool, bool, bool); 3] = [
        ("greeter", true, false, false),
        ("llm-persona", true, true, true),
        ("quizmaster", true, false, false),
    ];
    for (label, kv, history, llm) in grants {
        if config.personas.contains_key(label) {
            continue;
        }
        let mut section = crate::config::PersonaSection::default();
        section.kv.allow = kv;
        section.history.allow = history;
        if llm {
            section.llm = PersonaLlmConfig::allowed();
        }
        config.personas.insert(label.to_string(), section);
    }
}

/// Waits until every bot is live (bounded); says which are not.
async fn wait_for_bots(host: &BotHost, status: &Status) {
    let deadline = Instant::now() + BOTS_READY_TIMEOUT;
    loop {
        let waiting: Vec<&str> = host
            .bots
            .iter()
            .filter(|(_, b)| b.status().state != SessionState::Active)
            .map(|(l, _)| l.as_str())
            .collect();
        if waiting.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            status.line(&format!(
                "not connected after {} s (they keep trying): {}",
                BOTS_READY_TIMEOUT.as_secs(),
                waiting.join(", ")
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// State folder

/// Where the bots keep their state; a temporary folder is deleted on drop.
struct StateDir {
    path: PathBuf,
    temporary: bool,
}

impl StateDir {
    /// `keep`, or a new temporary folder; a temporary one gets the shared compile
    /// cache (see [`shared_cache`]) when `share_cache`.
    fn new(keep: Option<PathBuf>, share_cache: bool) -> anyhow::Result<StateDir> {
        if let Some(path) = keep {
            std::fs::create_dir_all(&path)
                .with_context(|| format!("cannot create the state folder {}", path.display()))?;
            return Ok(StateDir {
                path,
                temporary: false,
            });
        }
        let base = std::env::temp_dir();
        for _ in 0..16 {
            let path = base.join(format!(
                "roost-dev-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    if share_cache {
                        shared_cache(&path);
                    }
                    return Ok(StateDir {
                        path,
                        temporary: true,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot create a state folder in {}", base.display())
                    });
                }
            }
        }
        anyhow::bail!("cannot create a state folder in {}", base.display())
    }
}

/// Links `STATE/cache` to a compile cache kept across runs,
/// `$XDG_CACHE_HOME/roost/dev-cache` (or `~/.cache/roost/dev-cache`): the
/// state folder is new every run, but a persona compiled once (seconds for a
/// Python one) need not be compiled again. Entries are keyed by the component's
/// hash and the engine, so sharing is safe. Best effort: without it, the cache
/// simply lives and dies with the state folder.
fn shared_cache(state: &Path) {
    #[cfg(unix)]
    {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|h| PathBuf::from(h).join(".cache"))
            });
        let Some(base) = base else { return };
        let shared = base.join("roost").join("dev-cache");
        let linked = std::fs::create_dir_all(&shared)
            .and_then(|()| std::os::unix::fs::symlink(&shared, state.join("cache")));
        if let Err(e) = linked {
            tracing::debug!(dir = %shared.display(), "no shared compile cache: {e}");
        }
    }
    #[cfg(not(unix))]
    let _ = state;
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------
// Building the example personas

/// A persona project in the plugins folder: `DIR/FOLDER/` builds to
/// `DIR/NAME.wasm`, NAME being the package name (Rust) or the `persona.toml` name
/// (Python), as `roost build` names it; for the examples FOLDER and NAME agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    pub name: String,
    pub dir: PathBuf,
    pub kind: ProjectKind,
    pub output: PathBuf,
}

impl Project {
    /// Whether the component is missing or older than a file of the source.
    pub fn is_stale(&self) -> bool {
        let Ok(built) = std::fs::metadata(&self.output).and_then(|m| m.modified()) else {
            return true;
        };
        newest_source(self).is_some_and(|src| src > built)
    }
}

/// The persona projects directly under `plugins`, by name. Helper crates (no
/// `cdylib`), workspaces, `target/` and hidden folders are not projects.
pub fn find_projects(plugins: &Path) -> Vec<Project> {
    let Ok(entries) = std::fs::read_dir(plugins) else {
        return Vec::new();
    };
    let mut projects: Vec<Project> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .filter_map(|dir| {
            let folder = dir.file_name()?.to_str()?.to_owned();
            if folder.starts_with('.') || folder == "target" {
                return None;
            }
            let (kind, name) = if dir.join("Cargo.toml").is_file() {
                (ProjectKind::Rust, cdylib_package(&dir.join("Cargo.toml"))?)
            } else if dir.join(PYTHON_MANIFEST).is_file() {
                let name = crate::build::PythonManifest::load(&dir).map(|m| m.name);
                (ProjectKind::Python, name.unwrap_or(folder))
            } else {
                return None;
            };
            let output = plugins.join(format!("{name}.wasm"));
            Some(Project {
                name,
                dir,
                kind,
                output,
            })
        })
        .collect();
    projects.sort_by(|a, b| a.name.cmp(&b.name));
    projects
}

/// The package name of a `Cargo.toml` that declares `[lib] crate-type = [..., "cdylib", ...]`.
fn cdylib_package(manifest: &Path) -> Option<String> {
    let text = std::fs::read_to_string(manifest).ok()?;
    let table = toml::from_str::<toml::Table>(&text).ok()?;
    let cdylib = table
        .get("lib")
        .and_then(|lib| lib.get("crate-type"))
        .and_then(|t| t.as_array())
        .is_some_and(|kinds| kinds.iter().any(|k| k.as_str() == Some("cdylib")));
    let name = table.get("package")?.get("name")?.as_str()?;
    cdylib.then(|| name.to_string())
}

/// The newest modification time of the files a project builds from.
fn newest_source(project: &Project) -> Option<SystemTime> {
    let mut newest = None;
    match project.kind {
        ProjectKind::Rust => {
            newest_in(&project.dir.join("Cargo.toml"), &mut newest);
            newest_in(&project.dir.join("src"), &mut newest);
        }
        ProjectKind::Python => newest_in(&project.dir, &mut newest),
    }
    newest
}

/// Folds the modification times under `path` into `newest`, skipping hidden
/// entries, build output and Python caches.
fn newest_in(path: &Path, newest: &mut Option<SystemTime>) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.is_file() {
        if let Ok(m) = meta.modified() {
            *newest = Some(newest.map_or(m, |n: SystemTime| n.max(m)));
        }
        return;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "target" || name == "__pycache__" {
            continue;
        }
        newest_in(&entry.path(), newest);
    }
}

/// Whether `program` is an executable file on `PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Builds every stale project under `plugins`, one line each.
async fn build_stale(plugins: &Path, status: &Status) {
    let mut todo = Vec::new();
    for project in find_projects(plugins).into_iter().filter(Project::is_stale) {
        if project.kind == ProjectKind::Python && !on_path("componentize-py") {
            status.line(&format!(
                "skipping {}: Python personas need componentize-py (pip install componentize-py)",
                project.name
            ));
            continue;
        }
        todo.push(project);
    }
    if todo.is_empty() {
        return;
    }
    let n = todo.len();
    let first_build = !plugins.join("target").exists();
    status.line(&format!(
        "building {n} persona{}{}",
        plural(n),
        if first_build {
            " (the first build compiles the guest bindings too: about 30 s)"
        } else {
            ""
        }
    ));
    for (i, project) in todo.into_iter().enumerate() {
        let head = format!("  [{}/{n}] {}", i + 1, project.name);
        let opts = BuildOptions {
            path: project.dir.clone(),
            output: Some(project.output.clone()),
        };
        let runner = CargoRunner {
            echo_progress: false,
            ..CargoRunner::default()
        };
        let (result, took) =
            with_progress(status, &head, move || build_persona_with(&opts, &runner)).await;
        let verdict = match result {
            Ok(Ok(_)) => format!("done in {took:.1} s"),
            Ok(Err(e)) => format!(
                "failed after {took:.1} s: {e} (`roost build {}` shows the whole output)",
                project.dir.display()
            ),
            Err(e) => format!("failed: {e}"),
        };
        status.finish(&head, &verdict);
    }
}

/// Compiles the large persona files the compile cache does not hold yet (a Python
/// persona: seconds, tens of seconds in a debug build) into it before the bots
/// start, a line each with the time ticking, so the long step says what it is
/// doing. The bots then load them from the cache. Small files are left to
/// [`BotHost::start`]: they compile in milliseconds. Best effort: any trouble here
/// is left for the start to report.
async fn warm_cache(config: &Config, files: &[PathBuf], status: &Status) {
    if !config.cache.enabled {
        return;
    }
    let Ok(runtime) = Runtime::new(config.runtime_config()) else {
        return;
    };
    let dir = config.paths.state.join("cache");
    let Ok(cache) = CompileCache::open(&dir, config.cache.max_mib << 20, runtime.engine()) else {
        return;
    };
    let cache = Arc::new(cache);
    let cold: Vec<(PathBuf, u64)> = files
        .iter()
        .filter_map(|file| {
            let len = std::fs::metadata(file).ok()?.len();
            if len < crate::check::LARGE_COMPONENT {
                return None;
            }
            let key = cache.key(&content_hash(&std::fs::read(file).ok()?));
            let cached = cache.entry_path(&key).is_some_and(|p| p.is_file());
            (!cached).then(|| (file.clone(), len))
        })
        .collect();
    let n = cold.len();
    if n == 0 {
        return;
    }
    status.line(&format!(
        "compiling {n} large persona{} (once: the result is cached)",
        plural(n)
    ));
    for (i, (file, len)) in cold.into_iter().enumerate() {
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        let head = format!("  [{}/{n}] {name} ({} MB)", i + 1, len >> 20);
        let (rt, cache) = (runtime.clone(), cache.clone());
        let (result, took) = with_progress(status, &head, move || {
            rt.load_file_cached(&file, &cache).map(|_| ())
        })
        .await;
        let verdict = match result {
            Ok(Ok(())) => format!("done in {took:.1} s"),
            Ok(Err(_)) | Err(_) => "failed (the error follows)".to_string(),
        };
        status.finish(&head, &verdict);
    }
}

/// Runs `work` on a blocking thread; on a terminal `head … N s` ticks every
/// second meanwhile. Returns the result and the seconds it took; the caller ends
/// the line with [`Status::finish`].
async fn with_progress<T: Send + 'static>(
    status: &Status,
    head: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> (Result<T, tokio::task::JoinError>, f64) {
    let started = Instant::now();
    status.partial(&format!("{head} … "));
    let mut task = tokio::task::spawn_blocking(work);
    let second = Duration::from_secs(1);
    let mut tick = tokio::time::interval_at(started + second, second);
    let result = loop {
        tokio::select! {
            r = &mut task => break r,
            _ = tick.tick(), if status.tty => {
                status.partial(&format!("\r\x1b[K{head} … {} s", started.elapsed().as_secs()));
            }
        }
    };
    (result, started.elapsed().as_secs_f64())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Status lines on standard error.
struct Status {
    tty: bool,
}

impl Status {
    fn stderr() -> Status {
        Status {
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn line(&self, text: &str) {
        eprintln!("{text}");
    }

    /// Ends a [`with_progress`] line: `head … verdict`.
    fn finish(&self, head: &str, verdict: &str) {
        if self.tty {
            self.line(&format!("\r\x1b[K{head} … {verdict}"));
        } else {
            self.line(verdict);
        }
    }

    fn partial(&self, text: &str) {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "{text}");
        let _ = err.flush();
    }
}

// ---------------------------------------------------------------------------
// Rendering

/// How chat lines are written: colours, and terminal line control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    /// ANSI colours (off with `NO_COLOR` or when stdout is not a terminal).
    pub color: bool,
    /// Standard output is a terminal (clear-line and prompt redraws).
    pub tty: bool,
}

/// Bold colours names are drawn in.
const PALETTE: [u8; 12] = [31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96];

impl Style {
    fn for_stdout() -> Style {
        let tty = std::io::stdout().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Style {
            color: tty && !no_color,
            tty,
        }
    }

    /// The palette colour of `name`: the same for a name every time.
    pub fn color_of(name: &str) -> u8 {
        // FNV-1a over the lowercased name.
        let mut h: u32 = 0x811c_9dc5;
        for b in name.to_lowercase().bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        PALETTE[h as usize % PALETTE.len()]
    }

    /// `name` in its colour (bold).
    pub fn name(&self, name: &str) -> String {
        if self.color {
            format!("\x1b[1;{}m{name}\x1b[0m", Style::color_of(name))
        } else {
            name.to_string()
        }
    }

    /// `text` dimmed.
    pub fn dim(&self, text: &str) -> String {
        if self.color {
            format!("\x1b[2m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    /// A message as a chat line. `current` is the room shown without a prefix
    /// (`None`: every line says its room, the transcript form `#room name: text`).
    pub fn render(&self, msg: &ChatMessage, current: Option<&str>) -> String {
        let prefix = match current {
            Some(room) if room == msg.room => String::new(),
            _ => format!("#{} ", msg.room),
        };
        let text = one_line(&msg.text);
        if msg.is_system() {
            if current.is_some() {
                self.dim(&format!("{prefix}{text}"))
            } else {
                self.dim(&format!("{prefix}{}: {text}", msg.from))
            }
        } else {
            format!("{prefix}{}: {text}", self.name(&clean(&msg.from)))
        }
    }
}

/// `text` with control characters (terminal escapes included) made harmless.
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

/// `text` cleaned and on one line (line breaks shown as ` ⏎ `).
fn one_line(text: &str) -> String {
    clean(text.trim_end())
        .replace("\r\n", "\n")
        .replace('\n', " \u{23ce} ")
}

// ---------------------------------------------------------------------------
// The human's side

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Registers the human (`name`, or `name-2`… if taken), connects and joins `room`.
async fn connect_human(server: &DevServer, name: &str, room: &str) -> anyhow::Result<(String, Ws)> {
    if !crate::plugin::manifest::valid_room(room) {
        anyhow::bail!("`{room}` is not a valid room name");
    }
    let state = server.state();
    let mut reg = None;
    for i in 1..=20 {
        let candidate = if i == 1 {
            name.to_string()
        } else {
            format!("{name}-{i}")
        };
        match state.register(&candidate, "a human at the terminal (roost dev)") {
            Ok(r) => {
                reg = Some(r);
                break;
            }
            Err(devserver::RegisterError::NameTaken) => continue,
            Err(e) => anyhow::bail!("cannot chat as `{name}`: {e}"),
        }
    }
    let reg = reg.with_context(|| format!("cannot chat as `{name}`: the name is taken"))?;
    let url = format!("{}?key={}", server.ws_url(), reg.key.expose());
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .context("cannot connect to the local chat server")?;
    send_frame(
        &mut ws,
        &ClientFrame::Join {
            room: room.to_string(),
        },
    )
    .await?;
    Ok((reg.name, ws))
}

async fn send_frame(ws: &mut Ws, frame: &ClientFrame) -> anyhow::Result<()> {
    ws.send(WsMessage::text(frame.encode()))
        .await
        .context("the chat connection is gone")
}

/// Reads standard input line by line on a plain thread (it may block forever;
/// the process exits without waiting for it).
fn spawn_stdin_reader() -> anyhow::Result<mpsc::Receiver<String>> {
    let (tx, rx) = mpsc::channel(256);
    std::thread::Builder::new()
        .name("roost-dev-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match stdin.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\n', '\r']).to_string();
                        if tx.blocking_send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        })
        .context("cannot start the input reader")?;
    Ok(rx)
}

/// What a line of input asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Post this text to the current room.
    Say(String),
    Join(String),
    Who,
    Help,
    Quit,
    /// Nothing to do (a blank line).
    Nothing,
    /// A mistake, explained.
    Invalid(String),
}

/// Parses one line of input.
pub fn parse_input(line: &str) -> Input {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Input::Nothing;
    }
    if let Some(rest) = trimmed.strip_prefix("//") {
        return Input::Say(format!("/{rest}"));
    }
    let Some(cmd) = trimmed.strip_prefix('/') else {
        return Input::Say(line.trim_end().to_string());
    };
    let mut words = cmd.split_whitespace();
    match (words.next().unwrap_or(""), words.next(), words.next()) {
        ("join" | "j", Some(room), None) => {
            let room = room.trim_start_matches('#');
            if crate::plugin::manifest::valid_room(room) {
                Input::Join(room.to_string())
            } else {
                Input::Invalid(format!("`{room}` is not a valid room name"))
            }
        }
        ("join" | "j", _, _) => Input::Invalid("usage: /join ROOM".into()),
        ("who", None, None) => Input::Who,
        ("help" | "h" | "?", None, None) => Input::Help,
        ("quit" | "exit" | "q", None, None) => Input::Quit,
        (other, _, _) => Input::Invalid(format!("unknown command `/{other}` (try /help)")),
    }
}

const HELP: &[&str] = &[
    "a line is posted to the current room; mention a bot to talk to it: @echo hi",
    "/join ROOM   join ROOM and talk there (you stay in the others: their lines show #ROOM)",
    "/who         who is in the current room",
    "/quit        leave (or Ctrl-D; Ctrl-C also stops the bots)",
    "//text       posts /text",
];

/// The chat loop's state.
struct Chat<'a> {
    me: String,
    room: String,
    interactive: bool,
    style: Style,
    server: &'a DevServer,
    /// Own messages sent whose echo has not come back yet.
    pending_echoes: usize,
    /// The prompt is on screen, waiting for input.
    prompt_shown: std::cell::Cell<bool>,
    /// Hot reload's counters, and what was last said about them.
    reloads: Option<(Arc<ReloadStats>, ReloadStatsSnapshot)>,
}

/// How often hot reload's counters are looked at, to say what it did.
const RELOAD_POLL: Duration = Duration::from_millis(250);

/// Whether the loop goes on.
enum Flow {
    Continue,
    Quit,
}

impl Chat<'_> {
    /// Writes a line to standard output; in interactive mode on a terminal, over
    /// the prompt, which is redrawn after it.
    fn print(&self, line: &str) {
        let mut out = std::io::stdout().lock();
        if self.interactive && self.style.tty {
            let _ = write!(out, "\r\x1b[K{line}\n{}", self.prompt());
            self.prompt_shown.set(true);
        } else {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }

    /// A note from roost dev itself (not chat): dimmed on stdout when interactive,
    /// on stderr when piped (stdout is the transcript).
    fn note(&self, text: &str) {
        if self.interactive {
            self.print(&self.style.dim(&format!("· {text}")));
        } else {
            eprintln!("{text}");
        }
    }

    fn prompt(&self) -> String {
        format!("#{}> ", self.room)
    }

    /// Draws the prompt unless it is already there.
    fn show_prompt(&self) {
        if self.interactive && self.style.tty && !self.prompt_shown.replace(true) {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "{}", self.prompt());
            let _ = out.flush();
        }
    }

    /// Says where things are and how to talk (stdout when interactive, else stderr).
    fn banner(&self, s: &Summary) {
        let bots = if s.bots.is_empty() {
            "no bots are running yet: build one with `roost build plugins/echo`".to_string()
        } else if self.interactive {
            let names: Vec<String> = s.bots.iter().map(|n| self.style.name(n)).collect();
            format!("bots: {}", names.join(", "))
        } else {
            format!("bots: {}", s.bots.join(", "))
        };
        if self.interactive {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", self.style.dim(&format!("roost dev · {}", s.llm)));
            let _ = writeln!(
                out,
                "{}",
                self.style.dim(&format!("{} · {}", s.state, s.reload))
            );
            let _ = writeln!(out, "{bots}");
            let _ = writeln!(
                out,
                "You are {} in #{}. Mention a bot to talk to it (@{} hi). /help for commands.",
                self.style.name(&self.me),
                self.room,
                s.bots.first().map(String::as_str).unwrap_or("echo")
            );
        } else {
            eprintln!("{}; {}; {}", s.llm, s.state, s.reload);
            eprintln!(
                "{bots}; posting standard input as `{}` in #{}",
                self.me, self.room
            );
        }
    }

    /// Acts on one line of input.
    async fn on_input(&mut self, ws: &mut Ws, line: &str) -> anyhow::Result<Flow> {
        match parse_input(line) {
            Input::Nothing => {}
            Input::Say(text) => {
                send_frame(
                    ws,
                    &ClientFrame::Send {
                        room: self.room.clone(),
                        text,
                    },
                )
                .await?;
                self.pending_echoes += 1;
            }
            Input::Join(room) => {
                send_frame(ws, &ClientFrame::Join { room: room.clone() }).await?;
                self.room = room;
                self.note(&format!("now talking in #{}", self.room));
            }
            Input::Who => {
                let mut names: Vec<String> = self
                    .server
                    .state()
                    .room_agents(&self.room)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|a| a.name)
                    .collect();
                names.sort_by_key(|n| n.to_lowercase());
                self.note(&format!("in #{}: {}", self.room, names.join(", ")));
            }
            Input::Help => HELP.iter().for_each(|line| self.note(line)),
            Input::Quit => return Ok(Flow::Quit),
            Input::Invalid(why) => self.note(&why),
        }
        Ok(Flow::Continue)
    }

    /// Says what hot reload did since the last look (a bot started, swapped,
    /// stopped; a refused version has its own warning on stderr).
    fn report_reloads(&mut self) {
        let Some((stats, seen)) = &mut self.reloads else {
            return;
        };
        let now = stats.snapshot();
        let last = now.last_load.as_ref();
        let label = last.map(|l| l.label.as_str()).unwrap_or("a persona");
        let took = last
            .map(|l| format!(" ({:.1} s)", l.took.as_secs_f64()))
            .unwrap_or_default();
        let mut notes = Vec::new();
        if now.reloaded > seen.reloaded {
            notes.push(format!(
                "hot reload: {label} swapped to its new version{took}"
            ));
        }
        if now.loaded > seen.loaded {
            notes.push(format!("hot reload: started a bot for {label}{took}"));
        }
        if now.unloaded > seen.unloaded {
            notes.push(
                "hot reload: a bot stopped (its file went away or its persona was renamed)".into(),
            );
        }
        if now.rejected > seen.rejected {
            notes.push("hot reload: refused a persona file (the warning above says why; a running version keeps serving)".into());
        }
        *seen = now;
        for note in notes {
            self.note(&note);
        }
    }

    /// Acts on one frame from the server.
    fn on_frame(&mut self, frame: WsMessage) -> anyhow::Result<Flow> {
        let text = match frame {
            WsMessage::Text(t) => t,
            WsMessage::Close(_) => anyhow::bail!("the local chat server closed the connection"),
            _ => return Ok(Flow::Continue),
        };
        match ServerFrame::decode(text.as_str()) {
            Ok(ServerFrame::Message(msg)) => {
                let own = msg.from.eq_ignore_ascii_case(&self.me);
                if own {
                    self.pending_echoes = self.pending_echoes.saturating_sub(1);
                }
                if self.interactive {
                    if !own {
                        self.print(&self.style.render(&msg, Some(&self.room)));
                    }
                } else {
                    self.print(&self.style.render(&msg, None));
                }
            }
            Ok(ServerFrame::Error { message, code }) => {
                // A refused send never echoes.
                self.pending_echoes = self.pending_echoes.saturating_sub(1);
                let code = code.map(|c| format!(" ({c})")).unwrap_or_default();
                self.note(&format!("server: {}{code}", clean(&message)));
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("undecodable frame: {e}"),
        }
        Ok(Flow::Continue)
    }

    /// The interactive loop: until `/quit`, Ctrl-D or `shutdown`.
    async fn interactive(
        &mut self,
        ws: &mut Ws,
        mut input: mpsc::Receiver<String>,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        self.report_reloads();
        self.show_prompt();
        let mut reload_tick = tokio::time::interval(RELOAD_POLL);
        loop {
            tokio::select! {
                _ = reload_tick.tick(), if self.reloads.is_some() => self.report_reloads(),
                _ = &mut shutdown => {
                    println!();
                    return Ok(());
                }
                line = input.recv() => {
                    // Enter moved the cursor to a fresh line.
                    self.prompt_shown.set(false);
                    let Some(line) = line else {
                        println!();
                        return Ok(());
                    };
                    if let Flow::Quit = self.on_input(ws, &line).await? {
                        return Ok(());
                    }
                    self.show_prompt();
                }
                frame = ws.next() => match frame {
                    Some(Ok(frame)) => {
                        self.on_frame(frame)?;
                    }
                    Some(Err(e)) => anyhow::bail!("the chat connection failed: {e}"),
                    None => anyhow::bail!("the local chat server closed the connection"),
                },
            }
        }
    }

    /// The piped loop: posts every input line, then waits for the bots to go quiet.
    async fn piped(
        &mut self,
        ws: &mut Ws,
        mut input: mpsc::Receiver<String>,
        shutdown: impl Future<Output = ()>,
        bots: &[BotProbe],
        (quiet, max_wait): (Duration, Duration),
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        self.report_reloads();
        let mut reload_tick = tokio::time::interval(RELOAD_POLL);
        let mut input_open = true;
        // When to look whether everything is quiet: `quiet` after the last activity.
        let mut check_at = Instant::now() + quiet;
        // Set when the input ends: the latest moment to stop waiting.
        let mut deadline = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        loop {
            let may_end = !input_open && self.pending_echoes == 0;
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = reload_tick.tick(), if self.reloads.is_some() => self.report_reloads(),
                line = input.recv(), if input_open => {
                    let quit = match line {
                        Some(line) => matches!(self.on_input(ws, &line).await?, Flow::Quit),
                        None => true,
                    };
                    if quit {
                        input_open = false;
                        deadline = Instant::now() + max_wait;
                    }
                    check_at = Instant::now() + quiet;
                },
                frame = ws.next() => {
                    match frame {
                        Some(Ok(frame)) => {
                            self.on_frame(frame)?;
                        }
                        Some(Err(e)) => anyhow::bail!("the chat connection failed: {e}"),
                        None => anyhow::bail!("the local chat server closed the connection"),
                    }
                    check_at = Instant::now() + quiet;
                }
                _ = tokio::time::sleep_until(check_at), if may_end => {
                    let busy = bots
                        .iter()
                        .any(|session| session.inbound_waiting() > 0 || session.status().outbox_depth > 0);
                    if !busy {
                        return Ok(());
                    }
                    check_at = Instant::now() + Duration::from_millis(100);
                }
                _ = tokio::time::sleep_until(deadline), if !input_open => {
                    eprintln!(
                        "roost dev: still not quiet {} s after the end of input; stopping",
                        max_wait.as_secs()
                    );
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn msg(room: &str, from: &str, text: &str) -> ChatMessage {
        ChatMessage {
            room: room.into(),
            from: from.into(),
            text: text.into(),
            timestamp_ms: 1,
        }
    }

    #[test]
    fn colours_are_stable_per_name() {
        assert_eq!(Style::color_of("echo"), Style::color_of("echo"));
        assert_eq!(Style::color_of("Echo"), Style::color_of("echo"));
        let distinct: BTreeSet<u8> = ["echo", "greeter", "you", "sage", "rook", "llm-persona"]
            .iter()
            .map(|n| Style::color_of(n))
            .collect();
        assert!(
            distinct.len() >= 3,
            "names spread over the palette: {distinct:?}"
        );
    }

    #[test]
    fn renders_transcript_and_chat_lines() {
        let plain = Style {
            color: false,
            tty: false,
        };
        let m = msg("lobby", "echo", "hello\nworld");
        assert_eq!(plain.render(&m, None), "#lobby echo: hello \u{23ce} world");
        assert_eq!(
            plain.render(&m, Some("lobby")),
            "echo: hello \u{23ce} world"
        );
        assert_eq!(
            plain.render(&m, Some("debug")),
            "#lobby echo: hello \u{23ce} world"
        );
        let sys = msg("lobby", "system", "\u{26a1} echo joined #lobby.");
        assert_eq!(
            plain.render(&sys, None),
            "#lobby system: \u{26a1} echo joined #lobby."
        );
        assert_eq!(
            plain.render(&sys, Some("lobby")),
            "\u{26a1} echo joined #lobby."
        );
        let evil = msg("lobby", "x\x1b[2J", "boo\x1b]0;pwned\x07");
        assert!(!plain.render(&evil, None).contains('\x1b'));

        let color = Style {
            color: true,
            tty: true,
        };
        let line = color.render(&m, Some("lobby"));
        assert!(
            line.starts_with(&format!("\x1b[1;{}mecho\x1b[0m: ", Style::color_of("echo"))),
            "{line:?}"
        );
        assert!(color.render(&sys, Some("lobby")).starts_with("\x1b[2m"));
    }

    #[test]
    fn parses_input_lines() {
        assert_eq!(parse_input("@echo hi "), Input::Say("@echo hi".into()));
        assert_eq!(parse_input("   "), Input::Nothing);
        assert_eq!(parse_input("/join #debug"), Input::Join("debug".into()));
        assert_eq!(parse_input("/join debug"), Input::Join("debug".into()));
        assert!(matches!(parse_input("/join"), Input::Invalid(_)));
        assert!(matches!(parse_input("/join a b"), Input::Invalid(_)));
        assert_eq!(parse_input("/who"), Input::Who);
        assert_eq!(parse_input("/quit"), Input::Quit);
        assert_eq!(parse_input("/help"), Input::Help);
        assert_eq!(parse_input("//shrug"), Input::Say("/shrug".into()));
        assert!(matches!(parse_input("/dance"), Input::Invalid(e) if e.contains("/dance")));
    }

    fn touch(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn set_mtime(path: &Path, t: SystemTime) {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn finds_projects_and_their_staleness() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let cdylib = "[package]\nname = \"x\"\n[lib]\ncrate-type = [\"cdylib\"]\n";
        touch(
            &p.join("echo/Cargo.toml"),
            &cdylib.replace("\"x\"", "\"echo\""),
        );
        touch(&p.join("echo/src/lib.rs"), "");
        touch(
            &p.join("roost-guest/Cargo.toml"),
            "[package]\nname = \"roost-guest\"\n",
        );
        touch(&p.join("roost-guest/src/lib.rs"), "");
        touch(&p.join("py-persona/app.py"), "");
        touch(
            &p.join("py-persona/persona.toml"),
            "name = \"quizmaster\"\n",
        );
        touch(&p.join("target/x/Cargo.toml"), cdylib);
        touch(&p.join("notes/readme.md"), "");
        let found = find_projects(p);
        let names: Vec<(&str, ProjectKind)> =
            found.iter().map(|p| (p.name.as_str(), p.kind)).collect();
        assert_eq!(
            names,
            [
                ("echo", ProjectKind::Rust),
                ("quizmaster", ProjectKind::Python)
            ]
        );
        let echo = &found[0];
        assert_eq!(echo.output, p.join("echo.wasm"));
        assert!(echo.is_stale(), "no component yet");

        let old = SystemTime::now() - Duration::from_secs(3600);
        let older = old - Duration::from_secs(60);
        set_mtime(&p.join("echo/Cargo.toml"), older);
        set_mtime(&p.join("echo/src/lib.rs"), older);
        touch(&echo.output, "wasm");
        set_mtime(&echo.output, old);
        assert!(!echo.is_stale(), "newer than its source");
        touch(&p.join("echo/src/nested/mod.rs"), "");
        assert!(echo.is_stale(), "a source file changed after the build");
        set_mtime(&p.join("echo/src/nested/mod.rs"), older);
        touch(&p.join("echo/target/debug/junk"), "");
        touch(&p.join("echo/README.md"), "");
        assert!(!echo.is_stale(), "only Cargo.toml and src/ count");
    }

    #[test]
    fn dev_grants_leave_configured_personas_alone() {
        let mut config = Config::default();
        config.personas.insert("greeter".into(), Default::default());
        add_dev_grants(&mut config);
        assert!(
            !config.persona("greeter").kv.allow,
            "the config's own section wins"
        );
        let llm = config.persona("llm-persona");
        assert!(llm.kv.allow && llm.history.allow && llm.llm.allow);
        assert!(!config.persona("echo").kv.allow);
    }
}
