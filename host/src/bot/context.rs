//! What every bot of a host shares: the runtime, the store, the config, the probes,
//! the LLM hub, the names the host's personas hold, and the host's known secrets.

use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::plugin::Runtime;
use crate::policy::{KnownSecrets, SecretScanner};
use crate::session;
use crate::store::Store;

/// What every bot of a host shares.
#[derive(Clone)]
pub struct HostContext {
    pub runtime: Runtime,
    pub store: Store,
    pub config: Arc<Config>,
    /// Where running bots register for metrics and health.
    pub probes: crate::telemetry::Probes,
    /// The LLM providers (built once from `[llm]`) and every persona's token budget.
    pub llm: Arc<crate::llm::LlmHub>,
    /// Which persona (file label) holds which network name in this host.
    pub names: NameClaims,
    /// Every key the host holds, shared by every bot's secret scanner: the LLM
    /// provider keys, each bot's chat key (added when its session reports it), and the
    /// random-looking words of settings files.
    pub known: KnownSecrets,
}

impl HostContext {
    /// The known secrets of a host: every LLM provider key and the random-looking words
    /// of every persona's settings files.
    pub fn known_secrets_of(config: &Config, llm: &crate::llm::LlmHub) -> KnownSecrets {
        let known = KnownSecrets::with_fragment_len(config.policy.secrets.known_fragment_len);
        for key in llm.known_secrets() {
            known.add(secrecy::ExposeSecret::expose_secret(&key));
        }
        for p in config.personas.values() {
            for key in &p.settings_from_files {
                if let Some(v) = p.settings.get(key) {
                    known.add_tokens_of(v);
                }
            }
        }
        known
    }

    /// A scanner on the host's known secrets, with the configured settings.
    pub fn scanner(&self) -> SecretScanner {
        SecretScanner::with_known(self.config.policy.secrets.clone(), self.known.clone())
    }

    /// The server URL as identities are stored under it (normalised as the session
    /// normalises it).
    pub fn server_base(&self) -> String {
        session::http::Endpoints::parse(&self.config.server.url)
            .map(|e| e.base().to_string())
            .unwrap_or_else(|_| self.config.server.url.clone())
    }
}

/// The network names the running bots hold, by file label: a manifest cannot claim a
/// name another persona holds, here or in the store, and the check happens before
/// any session starts.
#[derive(Clone, Debug, Default)]
pub struct NameClaims(Arc<Mutex<std::collections::HashMap<String, String>>>);

impl NameClaims {
    /// Claims `name` for `label`, unless another running persona holds it or another
    /// persona's stored identity on `server` has that name (or that name with a
    /// registration suffix).
    pub fn claim(
        &self,
        store: &Store,
        server: &str,
        label: &str,
        name: &str,
    ) -> anyhow::Result<()> {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(other) = held.get(name).filter(|l| *l != label) {
            anyhow::bail!(
                "persona `{label}` wants the network name {name:?} of persona `{other}`; set personas.{label}.name in roost.toml"
            );
        }
        let owners = store.personas_named(server, name)?;
        if let Some(other) = owners.iter().find(|p| *p != label) {
            anyhow::bail!(
                "persona `{label}` wants the network name {name:?}, registered by persona `{other}`: \
                 an identity belongs to its file (rename the file to {other}.wasm to run that \
                 identity, or set personas.{label}.name in roost.toml)"
            );
        }
        held.insert(name.to_string(), label.to_string());
        Ok(())
    }

    /// Gives up the names `label` holds.
    pub fn release(&self, label: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, l| l != label);
    }
}
