//! What a persona's host functions may reach: its identity, its settings and the
//! capabilities the operator granted. Built once per bot from config, shared by every
//! instance of that bot (an instance discarded after a trap gets the same context).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use super::bindings::{Denied, Message, history, kv, llm};
use super::logsink::LogSink;

/// A boxed `Send` future, the return type of capability backends.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The host side of `llm`: completes a request for one persona, with its budgets,
/// allowed models and keys applied. Implemented by the LLM module.
pub trait LlmBackend: Send + Sync {
    fn complete(&self, req: llm::Request) -> BoxFuture<'_, Result<llm::Completion, llm::Error>>;
}

/// The host side of `kv`, already scoped to one persona's namespace: a persona can
/// only ever reach the backend built for it.
pub trait KvBackend: Send + Sync {
    fn get(&self, key: String) -> BoxFuture<'_, Result<Option<Vec<u8>>, kv::Error>>;
    fn set(&self, key: String, value: Vec<u8>) -> BoxFuture<'_, Result<(), kv::Error>>;
    fn delete(&self, key: String) -> BoxFuture<'_, Result<bool, kv::Error>>;
    fn list(&self, prefix: String) -> BoxFuture<'_, Result<Vec<String>, kv::Error>>;
    /// The largest value `set` accepts (sizes the call's hostcall fuel).
    fn max_value_bytes(&self) -> u64 {
        0
    }
}

/// The host side of `history`, scoped to one bot's rooms.
pub trait HistoryBackend: Send + Sync {
    fn recent(
        &self,
        room: String,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<Message>, history::Error>>;
}

/// Capabilities granted to one persona. `None` means not granted: the call answers
/// a typed `denied` error naming the capability and the config key that grants it.
#[derive(Clone, Default)]
pub struct Grants {
    pub llm: Option<Arc<dyn LlmBackend>>,
    pub kv: Option<Arc<dyn KvBackend>>,
    pub history: Option<Arc<dyn HistoryBackend>>,
}

impl std::fmt::Debug for Grants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grants")
            .field("llm", &self.llm.is_some())
            .field("kv", &self.kv.is_some())
            .field("history", &self.history.is_some())
            .finish()
    }
}

/// Everything host functions know about the persona they serve.
#[derive(Debug)]
pub struct PersonaContext {
    /// The persona's name for logs and config keys (the file stem, e.g. `echo`).
    pub label: String,
    /// The bot's name on the network; updated once registration settles it.
    pub bot_name: RwLock<String>,
    /// `[personas.NAME.settings]`: plain strings, never secrets.
    pub settings: BTreeMap<String, String>,
    pub grants: Grants,
    /// Where the persona's log lines and its stdout/stderr go.
    pub log: Arc<LogSink>,
    /// For a shadow: the label of the persona it shadows (its grants are that
    /// persona's, and its LLM grant is `personas.NAME.shadow.llm`).
    pub shadow_of: Option<String>,
}

impl PersonaContext {
    /// A context with nothing granted and no settings: what `roost check` uses.
    pub fn sandbox(label: &str) -> Arc<Self> {
        Self::new(label, label, BTreeMap::new(), Grants::default())
    }

    pub fn new(
        label: &str,
        bot_name: &str,
        settings: BTreeMap<String, String>,
        grants: Grants,
    ) -> Arc<Self> {
        Self::build(label, bot_name, settings, grants, None)
    }

    /// The context of the shadow `label` of persona `live` (see [`crate::bot::shadow`]).
    pub fn new_shadow(
        label: &str,
        live: &str,
        bot_name: &str,
        settings: BTreeMap<String, String>,
        grants: Grants,
    ) -> Arc<Self> {
        Self::build(label, bot_name, settings, grants, Some(live.to_string()))
    }

    fn build(
        label: &str,
        bot_name: &str,
        settings: BTreeMap<String, String>,
        grants: Grants,
        shadow_of: Option<String>,
    ) -> Arc<Self> {
        Arc::new(PersonaContext {
            label: label.to_string(),
            bot_name: RwLock::new(bot_name.to_string()),
            settings,
            grants,
            log: Arc::new(LogSink::new(label)),
            shadow_of,
        })
    }

    pub fn bot_name(&self) -> String {
        match self.bot_name.read() {
            Ok(n) => n.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set_bot_name(&self, name: &str) {
        match self.bot_name.write() {
            Ok(mut n) => *n = name.to_string(),
            Err(poisoned) => *poisoned.into_inner() = name.to_string(),
        }
    }

    /// The typed refusal for an ungranted capability.
    pub fn denied(&self, capability: &str) -> Denied {
        let config_key = match &self.shadow_of {
            Some(live) if capability == "llm" => format!("personas.{live}.shadow.llm"),
            Some(live) => format!("personas.{live}.{capability}.allow"),
            None => format!("personas.{}.{capability}.allow", self.label),
        };
        Denied {
            capability: capability.to_string(),
            config_key,
        }
    }
}
