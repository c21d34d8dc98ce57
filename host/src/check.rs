//! `roost check FILE.wasm [--config roost.toml]`: load a component, check it against
//! the contract, instantiate it in the sandbox (nothing granted) under the limits the
//! configuration gives that persona, call `describe`, validate the manifest, and
//! report.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::config::Config;
use crate::plugin::bindings::{Manifest, WIT_PACKAGE, WIT_VERSION};
use crate::plugin::{ContractInfo, PersonaContext, Runtime, Sandbox, manifest};

/// What `roost check` prints.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub file: String,
    pub name: String,
    pub description: String,
    pub version: String,
    pub rooms: Vec<String>,
    pub system_lines: bool,
    /// The contract version the component was built for.
    pub wit: String,
    pub contract: ContractInfo,
}

impl CheckReport {
    fn new(file: &Path, m: Manifest, contract: ContractInfo) -> Self {
        let wit = format!(
            "{WIT_PACKAGE}@{}",
            contract
                .wit_version
                .clone()
                .unwrap_or_else(|| WIT_VERSION.to_string())
        );
        CheckReport {
            file: file.display().to_string(),
            name: m.name,
            description: m.description,
            version: m.version,
            rooms: m.rooms,
            system_lines: m
                .subscriptions
                .contains(crate::plugin::bindings::Subscriptions::SYSTEM_LINES),
            wit,
            contract,
        }
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        let caps = if self.contract.capabilities.is_empty() {
            "none".to_string()
        } else {
            self.contract.capabilities.join(", ")
        };
        let mut out = String::new();
        out.push_str(&format!("ok: {} would run\n", self.file));
        out.push_str(&format!("  name:         {}\n", self.name));
        out.push_str(&format!("  description:  {}\n", self.description));
        out.push_str(&format!("  version:      {}\n", self.version));
        out.push_str(&format!("  rooms:        {}\n", self.rooms.join(", ")));
        out.push_str(&format!(
            "  system lines: {}\n",
            if self.system_lines { "yes" } else { "no" }
        ));
        out.push_str(&format!("  contract:     {}\n", self.wit));
        out.push_str(&format!("  capabilities: {caps}\n"));
        out.push_str(&format!(
            "  size:         {}\n",
            crate::plugin::limits::human_bytes(self.contract.size_bytes as u64)
        ));
        out.push_str("  imports:\n");
        for i in &self.contract.imports {
            out.push_str(&format!("    {i}\n"));
        }
        out
    }
}

/// Components from this size up take seconds to compile (a Python persona: ~18 MB);
/// `roost check`, `roost replay` and `roost dev` say so before compiling one.
pub const LARGE_COMPONENT: u64 = 4 << 20;

/// On a terminal, says that a large component is being compiled, since that can take
/// seconds (nothing is printed when stderr is not a terminal, so scripts see only the
/// result or the one-line error).
pub fn announce_compile(path: &Path) {
    use std::io::IsTerminal;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.len() >= LARGE_COMPONENT && std::io::stderr().is_terminal() {
        eprintln!(
            "compiling {} ({}), this takes a few seconds…",
            path.display(),
            crate::plugin::limits::human_bytes(meta.len())
        );
    }
}

/// Runs every check under `config`'s limits for the persona (`[limits]`, overridden
/// by `[personas.NAME.limits]`, NAME the file stem), as `roost run` would run it; the
/// error is one line saying why the file would not run.
pub async fn check(runtime: &Runtime, path: &Path, config: &Config) -> anyhow::Result<CheckReport> {
    announce_compile(path);
    let rt = runtime.clone();
    let p = path.to_path_buf();
    let component = tokio::task::spawn_blocking(move || rt.load_file(&p)).await??;
    let component = Arc::new(component);
    let ctx = PersonaContext::sandbox(&component.label);
    let contract = component.info.clone();
    let limits = config.limits_for(&component.label);
    let mut sandbox = Sandbox::new(runtime.clone(), component, ctx, limits);
    let m = sandbox.describe().await?;
    manifest::validate(&m).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(CheckReport::new(path, m, contract))
}
