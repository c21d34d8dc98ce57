//! `roost dev`: the zero-setup main job. One command puts the person at the
//! terminal in a chat room with the personas of a folder, and keeps those personas
//! current while they are being written:
//!
//! 1. **Config.** `roost.toml` in the current folder (or `--config FILE`) is read if
//!    present, for `[llm]`, `[personas.*]`, `[policy]`, `[limits]` and the rest;
//!    `server.url` and `paths.state` are always replaced (below), `paths.plugins`
//!    unless `--plugins` says otherwise. Without a file, every default applies.
//! 2. **Build.** Every persona project in the plugins folder (`DIR/NAME/` with a
//!    `Cargo.toml` declaring a `cdylib`, or a Python app with a `persona.toml`; see
//!    [`build_watch`]) whose `DIR/NAME.wasm` is missing or older than its source is
//!    built with [`crate::build`], one after the other, with a line per persona
//!    saying how far along it is (`[1/2] echo … done in 1.2 s`; on a terminal the
//!    elapsed seconds tick while cargo works). A failed build is one line; the others
//!    go on, and a stale `.wasm` left from before still runs. Python projects are
//!    skipped with a note when `componentize-py` is not on `PATH`. `--no-build`
//!    skips this step and the next.
//! 3. **Rebuild on save.** While the chat runs, saving a source file of a project
//!    rebuilds it ([`build_watch::watch`]); the new `.wasm` is picked up by hot
//!    reload and swapped into the running bot between two messages. The chat view
//!    says so (`echo: source changed, rebuilding…`, `hot reload: echo swapped to its
//!    new version 0.1.0`). A failed build shows the compiler's error in the chat
//!    view and writes nothing, so the old version keeps answering. A project created
//!    in the folder while dev runs (`roost new DIR/NAME`) is built and started.
//! 4. **Server and LLM.** A local chat server ([`crate::devserver`]) on a free
//!    loopback port. Unless the config names at least one `[llm.providers.*]`, a
//!    local fake LLM ([`FakeLlm`]) stands in as provider `fake` (model `fake`): it
//!    answers by rephrasing the prompt, which is enough to watch an LLM persona work.
//! 5. **Bots.** Every `DIR/*.wasm` runs as a bot ([`BotHost`]), exactly as `roost run`
//!    would run it, against the local server; a line says how many started and how
//!    long it took. Components large enough to take seconds to compile (a Python
//!    persona) and not in the compile cache yet are compiled into it first, one
//!    progress line each (`[1/1] quizmaster.wasm (17 MB) … done in 21.0 s`). A
//!    persona that does not load is one line on stderr; the others run. The example
//!    personas get the grants they need unless the config has a `[personas.NAME]`
//!    section of its own: `greeter` and `quizmaster` (the Python example) get `kv`,
//!    `llm-persona` gets `kv`, `history` and `llm`. Hot reload is on unless `[reload]
//!    enabled = false` (see [`crate::bot::reload`]). A person types at the speed of a
//!    conversation, so unless the config sets `[policy.limits]` itself, the per-room
//!    pacing is relaxed to the per-bot limits (no 2 s minimum between two messages
//!    to one room); the per-bot limits and the loop guard stay.
//! 6. **State.** Identities, outbox and KV live in a fresh temporary folder
//!    (`$TMPDIR/roost-dev-PID-XXXXXXXX`), deleted on exit: the chat server lives in
//!    memory and starts empty every time, so state kept across runs would only
//!    describe a network that no longer exists. `--state DIR` keeps it in `DIR`
//!    instead (never deleted). The compile cache is the exception: a temporary state
//!    folder's `cache/` links to `~/.cache/roost/dev-cache` (`$XDG_CACHE_HOME`), so a
//!    persona is compiled once, not on every start.
//! 7. **Chat.** The person at the terminal registers as a human (`you` by default,
//!    `--name`) and connects over the WebSocket like any agent, in `lobby`
//!    ([`chat`]). Each persona's own log lines (its `log` calls, its stdout and
//!    stderr) appear in the chat view, dimmed and prefixed with the persona
//!    (`[echo] text`); `--quiet-personas` hides them.
//!
//! Two modes, chosen by whether standard input is a terminal:
//!
//! - **Interactive**: a line prompt (`#lobby> `). A line is posted to the current
//!   room; what others say is printed as `name: text` with a stable colour per name,
//!   system lines dimmed, other rooms' messages prefixed `#room`. Commands: `/join
//!   ROOM` (joins and switches the current room), `/who` (agents in the room),
//!   `/help`, `/quit` (or Ctrl-D); `//text` posts `/text`. Ctrl-C stops the bots
//!   gracefully (a second Ctrl-C exits at once). Colours are off when `NO_COLOR` is
//!   set or standard output is not a terminal. See [`ui::Console`] for how lines and
//!   the prompt share the terminal.
//! - **Piped**: each input line is posted as the human's message (the commands work
//!   too), the transcript goes to standard output, one line per message, `#room
//!   name: text` (a message's own line breaks shown as ` ⏎ `), and everything else
//!   (notes, builds, persona log lines) to standard error. The program exits with
//!   status 0 once input has ended, every line sent has come back from the server,
//!   every bot's queue and outbox is empty, no rebuild is running and nothing was
//!   said for `--quiet-secs` (default 3). `--max-wait-secs` (default 60) bounds that
//!   wait after the end of input, so it cannot hang.
//!
//! Status lines (builds, who is running) go to standard error, and so do the host's
//! logs, quiet by default (`warn`; `-v` for more).
//!
//! This module orchestrates; [`build_watch`] knows projects and builds them,
//! [`chat`] is the chat client, [`ui`] draws.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let opts = roost::dev::DevOptions { plugins: Some("plugins".into()), ..Default::default() };
//! roost::dev::run(opts, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(())
//! # }
//! ```

pub mod build_watch;
pub mod chat;
pub mod ui;

use std::future::Future;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::oneshot;
use tokio::time::Instant;

pub use build_watch::{Project, find_projects};
pub use chat::{Input, parse_input};
pub use ui::Style;

use crate::bot::host::{BotHost, persona_files};
use crate::config::Config;
use crate::devserver::{self, ServerConfig};
use crate::llm::fake::FakeLlm;
use crate::llm::{PersonaLlmConfig, ProviderKind};
use crate::plugin::Runtime;
use crate::plugin::cache::{CompileCache, content_hash};
use crate::policy::LimitsConfig;
use crate::session::SessionState;
use chat::{Chat, Feeds, ReloadFeed};
use ui::{Banner, Console, Status, plural, with_progress};

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
    /// Build stale persona projects first, and rebuild them when their source is
    /// saved.
    pub build: bool,
    /// Leave the personas' own log lines out of the chat view.
    pub quiet_personas: bool,
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
            quiet_personas: false,
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

    // 4. Server and LLM.
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

    // 5, 6. State and bots.
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
    // Subscribed before the start, so what personas log while starting is shown.
    let persona_lines = (!opts.quiet_personas).then(crate::plugin::logsink::subscribe);
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
    let sessions: Vec<_> = host.bots.values().map(|b| b.session.clone()).collect();
    let reload = config.reload.enabled;
    let watch = opts.build && reload;

    // 7. The human.
    let (me, mut ws) = chat::connect_human(&server, &opts.name, &opts.room).await?;
    let console = Console::new(Style::for_stdout(), interactive, &opts.room);
    console.banner(
        &banner(
            &config,
            config_path.as_deref(),
            fake.is_some(),
            &state,
            &plugins,
            watch,
            bot_names,
        ),
        &me,
        &opts.room,
    );
    let feeds = Feeds {
        rebuilds: watch.then(|| build_watch::watch(plugins.clone())),
        personas: persona_lines,
        reloads: reload.then(|| ReloadFeed::new(host.reload_stats())),
    };
    let mut chat = Chat {
        me,
        room: opts.room.clone(),
        console,
        server: &server,
        pending_echoes: 0,
    };

    // The chat, and hot reload beside it until the chat ends.
    let input = chat::spawn_stdin_reader()?;
    let (chat_done, reloads_stop) = oneshot::channel::<()>();
    let chat_run = async {
        let outcome = if interactive {
            chat.interactive(&mut ws, input, feeds, shutdown).await
        } else {
            let quiet = (opts.quiet, opts.max_wait);
            chat.piped(&mut ws, input, feeds, shutdown, &sessions, quiet)
                .await
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

    // Stop: the human leaves, bots finish and flush, the server goes.
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

/// What the banner says about this run.
fn banner(
    config: &Config,
    config_path: Option<&Path>,
    fake_llm: bool,
    state: &StateDir,
    plugins: &Path,
    watch: bool,
    bots: Vec<String>,
) -> Banner {
    let folder = std::fs::canonicalize(plugins).unwrap_or_else(|_| plugins.to_owned());
    let dir = plugins.display();
    let llm = if fake_llm {
        "a local fake LLM stands in (configure [llm] in roost.toml for a real one)".into()
    } else {
        format!(
            "LLM: {} (from {})",
            config
                .llm
                .providers
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            config_path
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        )
    };
    let state = if state.temporary {
        format!("state in {} (deleted on exit)", state.path.display())
    } else {
        format!("state in {}", state.path.display())
    };
    let reload = if watch {
        "saving a persona's source rebuilds it and swaps it in live".to_string()
    } else if config.reload.enabled {
        format!("hot reload on: `roost build {dir}/NAME` swaps a bot live")
    } else {
        "hot reload off".into()
    };
    let no_bots_hint = match (find_projects(plugins).first(), watch) {
        (_, true) => format!("`roost new {dir}/NAME` creates one, and it starts here once built"),
        (Some(p), false) => format!("build one with `roost build {}`", p.dir.display()),
        (None, false) => format!("create one with `roost new {dir}/NAME`, then `roost build` it"),
    };
    Banner {
        llm,
        plugins: format!("personas from {}", folder.display()),
        state,
        reload,
        bots,
        no_bots_hint,
    }
}

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
// Start-up: build and compile what is stale

/// Builds every stale project under `plugins`, one line each.
async fn build_stale(plugins: &Path, status: &Status) {
    let mut todo = Vec::new();
    for project in find_projects(plugins).into_iter().filter(Project::is_stale) {
        if let Some(why) = project.unbuildable() {
            status.line(&format!("skipping {}: {why}", project.name));
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
        let dir = project.dir.clone();
        let (result, took) = with_progress(status, &head, move || project.build()).await;
        let verdict = match result {
            Ok(Ok(_)) => format!("done in {took:.1} s"),
            Ok(Err(e)) => format!(
                "failed after {took:.1} s: {e} (`roost build {}` shows the whole output)",
                dir.display()
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn the_banner_names_the_real_folder() {
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("mine");
        std::fs::create_dir(&plugins).unwrap();
        let state = StateDir {
            path: dir.path().join("state"),
            temporary: false,
        };
        let config = Config::default();
        let b = banner(&config, None, true, &state, &plugins, true, vec![]);
        let real = std::fs::canonicalize(&plugins).unwrap();
        assert_eq!(b.plugins, format!("personas from {}", real.display()));
        assert!(
            b.no_bots_hint
                .contains(&format!("roost new {}/NAME", plugins.display()))
        );
        let b = banner(&config, None, true, &state, &plugins, false, vec![]);
        assert!(
            b.reload
                .contains(&format!("roost build {}/NAME", plugins.display()))
        );
        assert!(!b.reload.contains("plugins/"), "{}", b.reload);
    }
}
