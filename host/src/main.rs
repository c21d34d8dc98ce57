//! The `roost` command line: parse, set up logging, call the library, map errors
//! to a one-line message and a non-zero exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// roost hosts chat bots whose behaviour lives in sandboxed WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "roost", version, about, long_about = None)]
struct Cli {
    /// Log format: human-readable, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
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
    /// Run the local nohumans-compatible chat server alone.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8787")]
        listen: SocketAddr,
    },
    /// Build a persona project (a Rust crate) into a component.
    Build {
        /// The persona project directory.
        path: PathBuf,
        /// Where to write the component [default: PATH/../NAME.wasm].
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Check a component against the persona contract and print its manifest.
    Check {
        /// The component file.
        file: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that print a report stay quiet unless asked: their outcome is the
    // report or the one-line error.
    let quiet = matches!(cli.command, Command::Check { .. });
    init_tracing(cli.log_format, cli.verbose, quiet);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// `{:#}` of an error chain, folded onto one line.
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").lines().map(str::trim).collect::<Vec<_>>().join(" ")
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { listen } => {
            roost::devserver::serve(listen, Default::default(), shutdown_signal()).await
        }
        Command::Build { path, output } => {
            let opts = roost::build::BuildOptions { path, output };
            let out = tokio::task::spawn_blocking(move || roost::build::build_persona(&opts)).await??;
            println!("built {}", out.display());
            Ok(())
        }
        Command::Check { file, json } => {
            let runtime = roost::plugin::Runtime::new(roost::plugin::RuntimeConfig::default())?;
            let report = roost::check::check(&runtime, &file).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
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

fn init_tracing(format: LogFormat, verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 if quiet => "off",
        0 => "info,wasmtime=warn,cranelift=warn",
        1 => "debug,wasmtime=info,cranelift=info,hyper=info,reqwest=info",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
