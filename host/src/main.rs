//! The `roost` command line: parse, set up logging, call the library, map errors
//! to a one-line message and a non-zero exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// roost hosts chat bots whose behaviour lives in sandboxed WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "roost", version, about, long_about = None)]
struct Cli {
    /// Log format: human-readable (coloured only on a terminal, never with NO_COLOR),
    /// or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "ROOST_LOG_FORMAT")]
    log_format: LogFormat,
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, env = "ROOST_VERBOSE")]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The zero-setup main job: a local chat server, every persona in DIR as a bot
    /// (stale example personas built first), and a chat prompt in a room with them.
    Dev {
        /// Folder of personas: NAME.wasm, and NAME/ projects built when stale
        /// [default: plugins, or paths.plugins of roost.toml].
        #[arg(long, env = "ROOST_PLUGINS")]
        plugins: Option<PathBuf>,
        /// Configuration file for [llm], [personas.*], [policy]... [default: roost.toml here, if any].
        #[arg(long, env = "ROOST_CONFIG")]
        config: Option<PathBuf>,
        /// Keep the bots' state in DIR [default: a temporary folder, deleted on exit].
        #[arg(long, value_name = "DIR", env = "ROOST_STATE")]
        state: Option<PathBuf>,
        /// Your name in the chat.
        #[arg(long, default_value = "you", env = "ROOST_DEV_NAME")]
        name: String,
        /// The room to start in.
        #[arg(long, default_value = "lobby", env = "ROOST_DEV_ROOM")]
        room: String,
        /// Do not build persona projects, run the .wasm files as they are.
        #[arg(long, env = "ROOST_DEV_NO_BUILD", value_parser = clap::builder::FalseyValueParser::new())]
        no_build: bool,
        /// Keep the personas' own log lines out of the chat view.
        #[arg(long, env = "ROOST_DEV_QUIET_PERSONAS", value_parser = clap::builder::FalseyValueParser::new())]
        quiet_personas: bool,
        /// Piped input: exit once input has ended and nothing was said for this long.
        #[arg(
            long,
            value_name = "SECS",
            default_value_t = 3.0,
            env = "ROOST_DEV_QUIET_SECS"
        )]
        quiet_secs: f64,
        /// Piped input: stop waiting for quiet this long after input has ended.
        #[arg(
            long,
            value_name = "SECS",
            default_value_t = 60.0,
            env = "ROOST_DEV_MAX_WAIT_SECS"
        )]
        max_wait_secs: f64,
    },
    /// Run every persona in the plugins folder as a bot on the network.
    Run {
        /// Configuration file [default: roost.toml in the current folder, if any].
        #[arg(long, env = "ROOST_CONFIG")]
        config: Option<PathBuf>,
        /// Chat server base URL [default: https://nohumans.chat, or server.url].
        #[arg(long, env = "ROOST_SERVER")]
        server: Option<String>,
        /// Folder of persona components (NAME.wasm) [default: plugins, or paths.plugins].
        #[arg(long, env = "ROOST_PLUGINS")]
        plugins: Option<PathBuf>,
        /// State folder (identities, outbox, KV) [default: state, or paths.state].
        #[arg(long, env = "ROOST_STATE")]
        state: Option<PathBuf>,
        /// Serve Prometheus /metrics and /healthz on this address [default: telemetry.metrics].
        #[arg(long, value_name = "ADDR", env = "ROOST_METRICS")]
        metrics: Option<SocketAddr>,
        /// Allow a plain http:// server URL to a host that is not loopback (the chat key
        /// then crosses the network in clear) [default: server.insecure, false].
        #[arg(long, env = "ROOST_INSECURE", value_parser = clap::builder::FalseyValueParser::new())]
        insecure: bool,
        /// State store: postgres://... to share personas between several hosts
        /// [default: store.url, or the embedded SQLite file in the state folder].
        #[arg(long, value_name = "URL", env = "ROOST_STORE")]
        store: Option<String>,
        /// Print the effective configuration (defaults, file and flags merged) and exit.
        #[arg(long, env = "ROOST_PRINT_CONFIG", value_parser = clap::builder::FalseyValueParser::new())]
        print_config: bool,
        /// Threads running the bots' sessions and personas: 1 runs them all on one
        /// thread (no hand-over between a bot's tasks: on a small machine, more replies
        /// per second and lower latency); 0 picks 1 on a machine with 2 CPUs or fewer,
        /// one per CPU otherwise. Commits and compiles have threads of their own.
        #[arg(long, value_name = "N", default_value_t = 0, env = "ROOST_THREADS",
              value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=1024))]
        threads: usize,
    },
    /// Run recorded chat through a persona and the real policy layer, offline.
    Replay {
        /// The persona component.
        #[arg(long, env = "ROOST_REPLAY_PLUGIN")]
        plugin: PathBuf,
        /// Another version to compare with, run as the persona's shadow: prints, per
        /// message, whether it would have done the same.
        #[arg(long, value_name = "SHADOW.wasm", env = "ROOST_REPLAY_AGAINST")]
        against: Option<PathBuf>,
        /// The recorded chat: JSON lines (corpus format or raw server frames).
        log: PathBuf,
        /// Configuration file for the policy settings [default: roost.toml if present].
        #[arg(long, env = "ROOST_CONFIG")]
        config: Option<PathBuf>,
        /// Print one JSON object: counters and the list of replies (or the error).
        #[arg(long, env = "ROOST_JSON", value_parser = clap::builder::FalseyValueParser::new())]
        json: bool,
    },
    /// Run the local nohumans-compatible chat server alone.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8787", env = "ROOST_LISTEN")]
        listen: SocketAddr,
    },
    /// Build a persona project (a Rust crate or a Python app) into a component.
    Build {
        /// The persona project directory.
        path: PathBuf,
        /// Where to write the component [default: PATH/../NAME.wasm].
        #[arg(short, long, env = "ROOST_BUILD_OUTPUT")]
        output: Option<PathBuf>,
    },
    /// Create a persona project (Rust or Python) that builds and runs as is.
    New {
        /// The project folder to create; its name, lowercased, names the persona.
        name: PathBuf,
        /// The persona's language.
        #[arg(long, value_enum, default_value_t = roost::scaffold::Lang::Rust, env = "ROOST_NEW_LANG")]
        lang: roost::scaffold::Lang,
    },
    /// Check a component against the persona contract and print its manifest.
    Check {
        /// The component file.
        file: PathBuf,
        /// Configuration file whose limits for this persona (`[limits]`, then
        /// `[personas.NAME.limits]`, NAME the file stem) apply [default: roost.toml here,
        /// if any].
        #[arg(long, env = "ROOST_CONFIG")]
        config: Option<PathBuf>,
        /// Print the report as JSON (and an error as `{"error": "..."}`).
        #[arg(long, env = "ROOST_JSON", value_parser = clap::builder::FalseyValueParser::new())]
        json: bool,
    },
    /// Ask a running host (its metrics address) how its bots are: connection, persona
    /// version, calls and errors, quarantine, outbox, drops, recent reloads.
    Status {
        /// The host's metrics address (`roost run --metrics`) [default:
        /// telemetry.metrics of roost.toml, else 127.0.0.1:9090].
        #[arg(long, value_name = "ADDR", env = "ROOST_METRICS")]
        addr: Option<String>,
        /// Configuration file naming the metrics address [default: roost.toml here, if any].
        #[arg(long, env = "ROOST_CONFIG")]
        config: Option<PathBuf>,
        /// Print the status as JSON.
        #[arg(long, env = "ROOST_JSON", value_parser = clap::builder::FalseyValueParser::new())]
        json: bool,
        /// Only ask /healthz: print `healthy` and exit 0, or exit 1 with the reason.
        #[arg(long, env = "ROOST_STATUS_HEALTH", value_parser = clap::builder::FalseyValueParser::new())]
        health: bool,
    },
}

/// The async threads of `roost run --threads N` (see its help); None: one per CPU.
fn run_threads(asked: usize) -> Option<usize> {
    match asked {
        0 => {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cpus <= 2).then_some(1)
        }
        n => Some(n),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A usage error under --json is JSON too; help and --version print as usual.
        Err(e) if e.use_stderr() && json_requested() => {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or_default();
            print_error_json(first.strip_prefix("error: ").unwrap_or(first));
            return ExitCode::from(e.exit_code().clamp(1, 255) as u8);
        }
        Err(e) => e.exit(),
    };
    let json = cli.command.json();
    // Commands that print a report stay quiet unless asked: their outcome is the
    // report or the one-line error.
    let quiet = matches!(
        cli.command,
        Command::Check { .. } | Command::Replay { .. } | Command::Status { .. }
    );
    let dev = matches!(cli.command, Command::Dev { .. });
    init_tracing(cli.log_format, cli.verbose, quiet, dev);
    roost::os::tune_allocator();
    match roost::os::raise_open_files_limit() {
        Ok(n) => tracing::debug!(open_files = n, "open-files limit"),
        Err(e) => tracing::warn!("cannot raise the open-files limit: {e}"),
    }
    let threads = match cli.command {
        Command::Run { threads, .. } => run_threads(threads),
        _ => None,
    };
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let e = anyhow::anyhow!("cannot start the async runtime: {e}");
            return fail(&e, json);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, json),
    }
}

impl Command {
    /// Whether the command was asked for JSON output (then its errors are JSON too).
    fn json(&self) -> bool {
        match self {
            Command::Check { json, .. }
            | Command::Replay { json, .. }
            | Command::Status { json, .. } => *json,
            _ => false,
        }
    }
}

/// Reports `e` in one line (`error: ...` on stderr, or `{"error": "..."}` on stdout
/// under --json) and returns the failure exit code.
fn fail(e: &anyhow::Error, json: bool) -> ExitCode {
    if json {
        print_error_json(&one_line(e));
    } else {
        eprintln!("error: {}", one_line(e));
    }
    ExitCode::FAILURE
}

fn print_error_json(message: &str) {
    println!("{}", serde_json::json!({ "error": message }));
}

/// `--json` among the arguments (before any `--`), or a true `ROOST_JSON`: for usage
/// errors, which come before the command line is understood.
fn json_requested() -> bool {
    let flag = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    let env = std::env::var("ROOST_JSON").is_ok_and(|v| {
        !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "" | "0" | "n" | "no" | "f" | "false" | "off"
        )
    });
    flag || env
}

/// `{:#}` of an error chain, folded onto one line.
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The config file to use: the one named, else `roost.toml` here if it exists.
fn load_config(path: Option<PathBuf>) -> anyhow::Result<roost::config::Config> {
    let path = path.or_else(|| {
        let here = PathBuf::from("roost.toml");
        here.is_file().then_some(here)
    });
    Ok(match path {
        Some(p) => roost::config::Config::load(&p)?,
        None => roost::config::Config::default(),
    })
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Dev {
            plugins,
            config,
            state,
            name,
            room,
            no_build,
            quiet_personas,
            quiet_secs,
            max_wait_secs,
        } => {
            let secs = |what: &str, s: f64| {
                Duration::try_from_secs_f64(s)
                    .map_err(|_| anyhow::anyhow!("--{what} must be a number of seconds, not {s}"))
            };
            let opts = roost::dev::DevOptions {
                plugins,
                config,
                state,
                name,
                room,
                build: !no_build,
                quiet_personas,
                quiet: secs("quiet-secs", quiet_secs)?,
                max_wait: secs("max-wait-secs", max_wait_secs)?,
                interactive: None,
            };
            roost::dev::run(opts, shutdown_signal()).await
        }
        Command::Run {
            config,
            server,
            plugins,
            state,
            metrics,
            insecure,
            store,
            print_config,
            threads: _,
        } => {
            let mut config = load_config(config)?;
            if let Some(url) = store {
                config.store.url = url;
            }
            if let Some(s) = server {
                config.server.url = s;
            }
            if insecure {
                config.server.insecure = true;
            }
            if let Some(p) = plugins {
                config.paths.plugins = p;
            }
            if let Some(s) = state {
                config.paths.state = s;
            }
            if metrics.is_some() {
                config.telemetry.metrics = metrics;
            }
            config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
            config
                .check_server_transport()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if print_config {
                print!("{}", config.to_toml()?);
                return Ok(());
            }
            roost::bot::host::run(config, shutdown_signal()).await
        }
        Command::Replay {
            plugin,
            against,
            log,
            config,
            json,
        } => {
            let config = load_config(config)?;
            let runtime = roost::plugin::Runtime::new(config.runtime_config())?;
            if let Some(against) = against {
                let report =
                    roost::bot::replay::compare(&runtime, &plugin, &against, &log, &config.policy)
                        .await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", report.render());
                }
                return Ok(());
            }
            let report =
                roost::bot::replay::replay(&runtime, &plugin, &log, &config.policy).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report.to_json())?);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
        Command::Serve { listen } => {
            roost::devserver::serve(listen, Default::default(), shutdown_signal()).await
        }
        Command::Build { path, output } => {
            let opts = roost::build::BuildOptions { path, output };
            let out =
                tokio::task::spawn_blocking(move || roost::build::build_persona(&opts)).await??;
            println!("built {}", out.display());
            Ok(())
        }
        Command::New { name, lang } => {
            let opts = roost::scaffold::NewOptions { path: name, lang };
            let made =
                tokio::task::spawn_blocking(move || roost::scaffold::new_persona(&opts)).await??;
            print!("{}", made.next_steps());
            Ok(())
        }
        Command::Status {
            addr,
            config,
            json,
            health,
        } => {
            let addr = match addr {
                Some(a) => a,
                None => load_config(config)?.telemetry.metrics.map_or_else(
                    || roost::status::client::DEFAULT_ADDR.into(),
                    |a| a.to_string(),
                ),
            };
            roost::status::client::run(&addr, json, health).await
        }
        Command::Check { file, config, json } => {
            let config = load_config(config)?;
            config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
            let runtime = roost::plugin::Runtime::new(config.runtime_config())?;
            let report = roost::check::check(&runtime, &file, &config).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
    }
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits at once.
async fn shutdown_signal() {
    one_signal().await;
    tracing::info!("shutting down gracefully; send the signal again to exit at once");
    tokio::spawn(async {
        one_signal().await;
        eprintln!("second signal: exiting at once");
        std::process::exit(130);
    });
}

/// Resolves on SIGINT or SIGTERM.
async fn one_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn init_tracing(format: LogFormat, verbose: u8, quiet: bool, dev: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 if quiet => "off",
        // `roost dev`: the chat is on the same terminal; only what needs attention.
        // Persona log lines and refused reloads are shown in the chat view instead.
        0 if dev => "warn,persona=off,roost::bot::reload=error",
        0 => "info,wasmtime=warn,cranelift=warn",
        1 => "debug,wasmtime=info,cranelift=info,hyper=info,reqwest=info",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(roost::os::colour(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
