//! roost.toml: parsed raw (serde, unknown keys rejected) and validated into a
//! [`Config`]. Every key has a default; the example `roost.toml` at the repository
//! root documents each one.
//!
//! Errors are one line naming the file, the line and the key:
//! `roost.toml:12: unknown key `colour` in [personas.echo] (expected one of ...)`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::plugin::Limits;
use crate::policy::PolicyConfig;
use crate::session::{Backoff, SessionConfig};

/// The default network.
pub const DEFAULT_SERVER: &str = "https://nohumans.chat";

/// A configuration error: one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// The chat network's base URL.
    pub url: String,
    /// Allow a plain `http://` URL to a host that is not loopback (default false: the
    /// chat key would cross the network in clear). `roost run --insecure` sets it.
    pub insecure: bool,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            url: DEFAULT_SERVER.into(),
            insecure: false,
        }
    }
}

/// `[paths]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PathsSection {
    /// The folder of persona components (`NAME.wasm`).
    pub plugins: PathBuf,
    /// Where roost keeps its state database (identities, outbox, KV).
    pub state: PathBuf,
}

impl Default for PathsSection {
    fn default() -> Self {
        PathsSection {
            plugins: "plugins".into(),
            state: "state".into(),
        }
    }
}

/// `[runtime]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSection {
    pub pooling: bool,
    /// Live persona instances at once; unset: what the machine can hold (its memory
    /// divided by `[limits] memory_bytes`, between 16 and 2048).
    pub pool_instances: Option<u32>,
    /// An instance idle this long is dropped (0: as soon as its call ends).
    pub instance_idle_secs: u64,
    pub max_memory_mib: u64,
    pub epoch_tick_ms: u64,
    pub max_wasm_stack_kib: usize,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        let d = crate::plugin::RuntimeConfig::default();
        RuntimeSection {
            pooling: d.pooling,
            pool_instances: None,
            instance_idle_secs: d.instance_idle.as_secs(),
            max_memory_mib: d.max_memory_bytes >> 20,
            epoch_tick_ms: d.epoch_tick.as_millis() as u64,
            max_wasm_stack_kib: d.max_wasm_stack >> 10,
        }
    }
}

/// `[session]`: connection behaviour shared by every bot.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionSection {
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
    /// A write making no progress this long replaces the connection.
    pub write_timeout_ms: u64,
    pub ping_interval_ms: u64,
    pub dead_after_intervals: u32,
    /// How often each quiet room's member list is checked for the bot (0: never).
    pub membership_check_ms: u64,
    /// Member-list requests per second of the whole process, about (0: no bound).
    pub membership_checks_per_second: u32,
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    /// `0` = retry forever.
    pub max_attempts: u32,
    pub healthy_after_ms: u64,
    pub retention_secs: u64,
    pub outbox_ttl_secs: u64,
    /// Times an unconfirmed reply is sent again after reconnects, at most.
    pub max_resends: u32,
    /// New registrations after a confirmed-rejected key, per persona in any 24 h.
    pub max_reregistrations_per_day: u32,
    pub shutdown_flush_ms: u64,
    /// Messages waiting for a bot's persona; overflow drops the oldest (counted).
    pub inbound_queue: usize,
    /// Bytes of message text waiting for a bot's persona, at most; same overflow rule.
    pub inbound_queue_bytes: usize,
}

impl Default for SessionSection {
    fn default() -> Self {
        let d = SessionConfig::default();
        SessionSection {
            connect_timeout_ms: d.connect_timeout.as_millis() as u64,
            request_timeout_ms: d.request_timeout.as_millis() as u64,
            write_timeout_ms: d.write_timeout.as_millis() as u64,
            ping_interval_ms: d.ping_interval.as_millis() as u64,
            dead_after_intervals: d.dead_after_intervals,
            membership_check_ms: d.membership_check.as_millis() as u64,
            membership_checks_per_second: d.membership_checks_per_second,
            backoff_base_ms: d.backoff.base.as_millis() as u64,
            backoff_cap_ms: d.backoff.cap.as_millis() as u64,
            max_attempts: d.backoff.max_attempts.unwrap_or(0),
            healthy_after_ms: d.healthy_after.as_millis() as u64,
            retention_secs: d.retention.as_secs(),
            outbox_ttl_secs: d.outbox_ttl.as_secs(),
            max_resends: d.max_resends,
            max_reregistrations_per_day: d.max_reregistrations_per_day,
            shutdown_flush_ms: d.shutdown_flush.as_millis() as u64,
            inbound_queue: d.inbound_capacity,
            inbound_queue_bytes: d.inbound_bytes,
        }
    }
}

/// `[store]`: the state database: `<paths.state>/roost.db` (SQLite, the default), or
/// a PostgreSQL server shared by several hosts (`url = "postgres://..."`).
#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    /// `"normal"` (default): a commit survives the process crashing; `"full"`: it also
    /// survives power loss (one fsync per group commit). See [`crate::store::Synchronous`].
    /// SQLite only.
    pub synchronous: crate::store::Synchronous,
    /// Empty (default): the embedded SQLite file. `postgres://user:pass@host/db`:
    /// PostgreSQL, shared by every host with the same URL; personas are then spread
    /// over the hosts by leases. `--store` and `ROOST_STORE` override it.
    pub url: String,
    /// PostgreSQL: keep roost's tables in this schema (created if missing) instead of
    /// the connection's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// PostgreSQL: how often a host renews its leases, in ms (default 2000).
    pub lease_renew_ms: u64,
    /// PostgreSQL: how long a lease lasts past its last renewal, in ms (default
    /// 8000): a dead host's personas start elsewhere about this long after it died.
    pub lease_ttl_ms: u64,
    /// PostgreSQL: most personas a host hands back per renewal when another host
    /// joins (default 2).
    pub handover_per_tick: usize,
}

impl Default for StoreSection {
    fn default() -> Self {
        let l = crate::lease::LeaseConfig::default();
        StoreSection {
            synchronous: Default::default(),
            url: String::new(),
            schema: None,
            lease_renew_ms: l.renew.as_millis() as u64,
            lease_ttl_ms: l.ttl.as_millis() as u64,
            handover_per_tick: l.handover_per_tick,
        }
    }
}

impl std::fmt::Debug for StoreSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSection")
            .field("synchronous", &self.synchronous)
            .field("url", &self.shown_url())
            .field("schema", &self.schema)
            .field("lease_renew_ms", &self.lease_renew_ms)
            .field("lease_ttl_ms", &self.lease_ttl_ms)
            .field("handover_per_tick", &self.handover_per_tick)
            .finish()
    }
}

impl StoreSection {
    /// `url` as it may be shown (printed configuration, logs): a PostgreSQL URL's
    /// password is replaced by `***`.
    pub fn shown_url(&self) -> String {
        match self.store_url() {
            Ok(crate::store::StoreUrl::Sqlite) => self.url.clone(),
            _ => crate::store::redact_url(&self.url),
        }
    }

    /// Which store `url` names.
    pub fn store_url(&self) -> Result<crate::store::StoreUrl, String> {
        crate::store::StoreUrl::parse(&self.url)
    }

    /// The lease settings.
    pub fn leases(&self) -> crate::lease::LeaseConfig {
        crate::lease::LeaseConfig {
            renew: std::time::Duration::from_millis(self.lease_renew_ms),
            ttl: std::time::Duration::from_millis(self.lease_ttl_ms),
            handover_per_tick: self.handover_per_tick,
        }
    }
}

/// `[cache]`: the compile cache in `<paths.state>/cache/` (see
/// [`crate::plugin::cache`]).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSection {
    /// Keep precompiled personas between runs and reloads (default true).
    pub enabled: bool,
    /// Bound on the cache's total size, in MiB (default 256); the least recently
    /// used entries are evicted.
    pub max_mib: u64,
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            enabled: true,
            max_mib: crate::plugin::cache::DEFAULT_MAX_BYTES >> 20,
        }
    }
}

/// `[reload]`: hot reload of the plugins folder (see [`crate::bot::reload`]).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ReloadSection {
    /// Watch the plugins folder while running (default true).
    pub enabled: bool,
    /// Quiet time after the last change to a file before acting on it, in ms
    /// (default 300).
    pub debounce_ms: u64,
}

impl Default for ReloadSection {
    fn default() -> Self {
        ReloadSection {
            enabled: true,
            debounce_ms: 300,
        }
    }
}

/// Per-persona overrides of `[limits]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsOverride {
    pub memory_bytes: Option<u64>,
    pub cpu_per_call_ms: Option<u64>,
    pub host_per_call_ms: Option<u64>,
    pub wall_per_call_ms: Option<u64>,
    pub table_elements: Option<usize>,
    pub instances: Option<usize>,
    pub tables: Option<usize>,
    pub memories: Option<usize>,
    pub reply_bytes: Option<usize>,
    pub actions: Option<usize>,
    pub joins_per_minute: Option<u32>,
    pub max_rooms: Option<usize>,
    pub quarantine_window: Option<u32>,
    pub quarantine_failure_ratio: Option<f64>,
}

impl LimitsOverride {
    pub fn apply(&self, base: &Limits) -> Limits {
        let mut l = base.clone();
        if let Some(v) = self.memory_bytes {
            l.memory_bytes = v;
        }
        if let Some(v) = self.cpu_per_call_ms {
            l.cpu_per_call = Duration::from_millis(v);
        }
        if let Some(v) = self.host_per_call_ms {
            l.host_per_call = Duration::from_millis(v);
        }
        if let Some(v) = self.wall_per_call_ms {
            l.wall_per_call = Duration::from_millis(v);
        }
        if let Some(v) = self.table_elements {
            l.table_elements = v;
        }
        if let Some(v) = self.instances {
            l.instances = v;
        }
        if let Some(v) = self.tables {
            l.tables = v;
        }
        if let Some(v) = self.memories {
            l.memories = v;
        }
        if let Some(v) = self.reply_bytes {
            l.reply_bytes = v;
        }
        if let Some(v) = self.actions {
            l.actions = v;
        }
        if let Some(v) = self.joins_per_minute {
            l.joins_per_minute = v;
        }
        if let Some(v) = self.max_rooms {
            l.max_rooms = v;
        }
        if let Some(v) = self.quarantine_window {
            l.quarantine_window = v;
        }
        if let Some(v) = self.quarantine_failure_ratio {
            l.quarantine_failure_ratio = v;
        }
        l
    }
}

/// A capability grant with nothing but `allow` (kv and history have quotas too).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KvGrant {
    pub allow: bool,
    pub quota_bytes: u64,
    pub value_bytes: u64,
}

impl Default for KvGrant {
    fn default() -> Self {
        KvGrant {
            allow: false,
            quota_bytes: 1 << 20,
            value_bytes: 64 << 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryGrant {
    pub allow: bool,
    /// Most messages one call returns (and kept per room).
    pub limit: u32,
}

impl Default for HistoryGrant {
    fn default() -> Self {
        HistoryGrant {
            allow: false,
            limit: 50,
        }
    }
}

/// `[personas.NAME]`: NAME is the file stem (`echo` for `echo.wasm`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PersonaSection {
    /// Network name instead of the manifest's.
    pub name: Option<String>,
    /// Description instead of the manifest's.
    pub description: Option<String>,
    /// Rooms instead of the manifest's.
    pub rooms: Option<Vec<String>>,
    /// Strings the persona reads through `config.get`. Never secrets.
    pub settings: BTreeMap<String, String>,
    /// Settings read from files: `character = "rook.md"` makes the file's content the
    /// setting `character` (a persona has no filesystem of its own). Paths are relative
    /// to the config file's folder; each file is read once by [`Config::load`], must be
    /// UTF-8 and at most [`MAX_SETTING_FILE_BYTES`]; a key may not also be in
    /// `settings`. Like `settings`, never secrets: the persona can read every byte.
    pub settings_files: BTreeMap<String, PathBuf>,
    /// Which settings were read from `settings_files` (filled by
    /// [`Config::resolve_setting_files`]): their random-looking words become known
    /// secrets the persona may not say.
    #[serde(skip)]
    pub settings_from_files: std::collections::BTreeSet<String>,
    pub limits: LimitsOverride,
    pub kv: KvGrant,
    pub history: HistoryGrant,
    /// `[personas.NAME.llm]`: the grant to call the LLM (deny by default), see
    /// [`crate::llm::config`].
    pub llm: crate::llm::PersonaLlmConfig,
    /// `[personas.NAME.shadow]` (or `shadow = "FILE"`): a new version that listens
    /// beside the live one without speaking, see [`crate::bot::shadow`].
    pub shadow: ShadowSection,
}

/// `[personas.NAME.shadow]`: how the persona's shadow runs. Written either as a
/// table or, to name only its file, as `shadow = "FILE"`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ShadowSection {
    /// The shadow's component, relative to the plugins folder. Default:
    /// `NAME.shadow.wasm` in the plugins folder, when it exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// Let the shadow call the LLM (with the persona's `[personas.NAME.llm]` grant,
    /// but a budget of its own). Default false: its calls answer `denied`.
    pub llm: bool,
    /// The shadow's own hourly token budget. Default: the persona's `tokens_per_hour`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_hour: Option<u64>,
    /// The shadow's own daily token budget. Default: the persona's `tokens_per_day`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    /// Messages waiting for the shadow; when it falls further behind, new messages
    /// are not shown to it (counted as the outcome `dropped`). Default 64.
    pub queue: usize,
    /// Differing pairs kept in memory for `roost status` and the status page
    /// (every one is also appended to `<state>/shadow/NAME.jsonl`). Default 20.
    pub keep: usize,
    /// Limits for the shadow's calls, over the persona's. Default: the persona's.
    pub limits: LimitsOverride,
}

impl Default for ShadowSection {
    fn default() -> Self {
        ShadowSection {
            file: None,
            llm: false,
            tokens_per_hour: None,
            tokens_per_day: None,
            queue: 64,
            keep: 20,
            limits: LimitsOverride::default(),
        }
    }
}

/// The table form of [`ShadowSection`], as serde reads it.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ShadowTable {
    file: Option<PathBuf>,
    llm: bool,
    tokens_per_hour: Option<u64>,
    tokens_per_day: Option<u64>,
    queue: usize,
    keep: usize,
    limits: LimitsOverride,
}

impl Default for ShadowTable {
    fn default() -> Self {
        let d = ShadowSection::default();
        ShadowTable {
            file: d.file,
            llm: d.llm,
            tokens_per_hour: d.tokens_per_hour,
            tokens_per_day: d.tokens_per_day,
            queue: d.queue,
            keep: d.keep,
            limits: d.limits,
        }
    }
}

impl<'de> Deserialize<'de> for ShadowSection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = ShadowSection;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a file name or a table")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ShadowSection, E> {
                Ok(ShadowSection {
                    file: Some(PathBuf::from(v)),
                    ..ShadowSection::default()
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ShadowSection, A::Error> {
                let t =
                    ShadowTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(ShadowSection {
                    file: t.file,
                    llm: t.llm,
                    tokens_per_hour: t.tokens_per_hour,
                    tokens_per_day: t.tokens_per_day,
                    queue: t.queue,
                    keep: t.keep,
                    limits: t.limits,
                })
            }
        }
        d.deserialize_any(Visit)
    }
}

/// Whether two paths name the same file (compared as written, then canonically).
fn same_file_name(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    match (
        a.parent().and_then(|p| p.canonicalize().ok()),
        b.parent().and_then(|p| p.canonicalize().ok()),
    ) {
        (Some(pa), Some(pb)) => pa == pb && a.file_name() == b.file_name(),
        _ => false,
    }
}

/// Largest file `settings_files` may name.
pub const MAX_SETTING_FILE_BYTES: u64 = 64 << 10;

/// `[telemetry]`
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySection {
    /// Serve Prometheus `/metrics` and `/healthz` on this address (off when unset).
    pub metrics: Option<std::net::SocketAddr>,
}

/// The whole file, as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerSection,
    pub paths: PathsSection,
    pub runtime: RuntimeSection,
    /// Default limits for every persona.
    pub limits: Limits,
    pub session: SessionSection,
    pub policy: PolicyConfig,
    /// `[llm]`: the LLM providers and where their keys come from, see
    /// [`crate::llm::config`].
    pub llm: crate::llm::LlmConfig,
    pub cache: CacheSection,
    pub reload: ReloadSection,
    pub telemetry: TelemetrySection,
    pub store: StoreSection,
    pub personas: BTreeMap<String, PersonaSection>,
}

impl Config {
    /// Reads and validates a config file, then reads the files named in
    /// `[personas.NAME.settings_files]` (relative to the file's folder) into settings.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        let mut config = Self::parse(&text, &path.display().to_string())?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        config.resolve_setting_files(base)?;
        config
            .check_settings_hold_no_secrets()
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    /// Settings are readable by the persona, so a value that looks like a credential
    /// is refused: keys belong in `api_key_env` / `api_key_file`, held by the host.
    pub fn check_settings_hold_no_secrets(&self) -> Result<(), String> {
        let scanner = crate::policy::SecretScanner::new(self.policy.secrets.clone());
        for (name, p) in &self.personas {
            for (key, value) in &p.settings {
                if let Some(found) = scanner.scan(value) {
                    return Err(format!(
                        "personas.{name}.settings.{key} looks like a credential ({}); settings are readable by the persona, so give keys to the host (llm.providers.NAME.api_key_env or api_key_file)",
                        found.kind
                    ));
                }
            }
        }
        Ok(())
    }

    /// Moves every `[personas.NAME.settings_files]` entry into `settings`, reading the
    /// file (relative paths from `base`). Afterwards `settings_files` is empty, so
    /// calling it again does nothing. Errors are one line naming the key and the file.
    pub fn resolve_setting_files(&mut self, base: &Path) -> Result<(), ConfigError> {
        for (name, persona) in &mut self.personas {
            for (key, file) in std::mem::take(&mut persona.settings_files) {
                let what = format!("personas.{name}.settings_files.{key}");
                if persona.settings.contains_key(&key) {
                    return Err(ConfigError(format!(
                        "{what}: the setting `{key}` is also in personas.{name}.settings; keep one"
                    )));
                }
                let path = if file.is_absolute() {
                    file
                } else {
                    base.join(file)
                };
                let text =
                    read_setting_file(&path).map_err(|e| ConfigError(format!("{what}: {e}")))?;
                persona.settings_from_files.insert(key.clone());
                persona.settings.insert(key, text);
            }
        }
        Ok(())
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| toml_error(file, text, &e))?;
        config
            .validate()
            .map_err(|e| ConfigError(format!("{file}: {e}")))?;
        Ok(config)
    }

    /// Refuses a plain `http://` server URL whose host is not loopback unless
    /// `server.insecure` (`--insecure`) allows it: the chat key travels in a header
    /// and in the WebSocket URL. Checked when bots are about to start, after flags.
    pub fn check_server_transport(&self) -> Result<(), String> {
        let endpoints = crate::session::http::Endpoints::parse(&self.server.url)
            .map_err(|e| format!("server.url: {e}"))?;
        if endpoints.is_plain_remote() && !self.server.insecure {
            return Err(format!(
                "server.url {:?} is plain http to a host that is not loopback: the chat key would cross the network in clear; use https://, or allow it with --insecure (ROOST_INSECURE=1, server.insecure = true)",
                self.server.url
            ));
        }
        Ok(())
    }

    /// Range checks serde cannot express.
    pub fn validate(&self) -> Result<(), String> {
        crate::session::http::Endpoints::parse(&self.server.url)
            .map_err(|e| format!("server.url: {e}"))?;
        self.policy.validate().map_err(|e| e.to_string())?;
        let s = &self.session;
        for (key, v) in [
            ("session.connect_timeout_ms", s.connect_timeout_ms),
            ("session.request_timeout_ms", s.request_timeout_ms),
            ("session.ping_interval_ms", s.ping_interval_ms),
            ("session.backoff_base_ms", s.backoff_base_ms),
            ("session.backoff_cap_ms", s.backoff_cap_ms),
            ("session.retention_secs", s.retention_secs),
            ("session.outbox_ttl_secs", s.outbox_ttl_secs),
            ("session.inbound_queue", s.inbound_queue as u64),
            ("session.inbound_queue_bytes", s.inbound_queue_bytes as u64),
            ("session.write_timeout_ms", s.write_timeout_ms),
            ("runtime.epoch_tick_ms", self.runtime.epoch_tick_ms),
            (
                "runtime.pool_instances",
                self.runtime.pool_instances.map_or(1, u64::from),
            ),
            ("cache.max_mib", self.cache.max_mib),
            ("reload.debounce_ms", self.reload.debounce_ms),
        ] {
            if v == 0 {
                return Err(format!("{key} must be above zero"));
            }
        }
        let store_url = self.store.store_url()?;
        if store_url != crate::store::StoreUrl::Sqlite {
            self.store.leases().validate()?;
        }
        if s.backoff_cap_ms < s.backoff_base_ms {
            return Err("session.backoff_cap_ms must be at least session.backoff_base_ms".into());
        }
        let max_mem = self.runtime.max_memory_mib << 20;
        let check_limits = |key: &str, l: &Limits| -> Result<(), String> {
            if l.memory_bytes == 0 || l.memory_bytes > max_mem {
                return Err(format!(
                    "{key}.memory_bytes must be between 1 and runtime.max_memory_mib ({} MiB)",
                    self.runtime.max_memory_mib
                ));
            }
            if l.cpu_per_call.is_zero() || l.wall_per_call.is_zero() {
                return Err(format!(
                    "{key}: cpu_per_call_ms and wall_per_call_ms must be above zero"
                ));
            }
            if l.cpu_per_call > l.wall_per_call {
                return Err(format!(
                    "{key}.cpu_per_call_ms must not exceed wall_per_call_ms"
                ));
            }
            if l.host_per_call.is_zero() || l.host_per_call > l.wall_per_call {
                return Err(format!(
                    "{key}.host_per_call_ms must be above zero and not exceed wall_per_call_ms"
                ));
            }
            if l.max_rooms == 0 {
                return Err(format!("{key}.max_rooms must be above zero"));
            }
            if l.quarantine_window == 0 {
                return Err(format!("{key}.quarantine_window must be above zero"));
            }
            if !(l.quarantine_failure_ratio > 0.0 && l.quarantine_failure_ratio <= 1.0) {
                return Err(format!(
                    "{key}.quarantine_failure_ratio must be above 0 and at most 1"
                ));
            }
            Ok(())
        };
        check_limits("limits", &self.limits)?;
        self.llm.validate().map_err(|e| e.to_string())?;
        self.check_settings_hold_no_secrets()?;
        for (name, p) in &self.personas {
            let key = format!("personas.{name}");
            p.llm.validate(name, &self.llm).map_err(|e| e.to_string())?;
            for (setting, file) in &p.settings_files {
                if setting.is_empty() || file.as_os_str().is_empty() {
                    return Err(format!(
                        "{key}.settings_files: keys and paths must not be empty"
                    ));
                }
                if p.settings.contains_key(setting) {
                    return Err(format!(
                        "{key}.settings_files.{setting}: the setting is also in {key}.settings; keep one"
                    ));
                }
            }
            check_limits(&format!("{key}.limits"), &p.limits.apply(&self.limits))?;
            if let Some(n) = &p.name {
                crate::names::BotName::check(n).map_err(|e| format!("{key}.name: {e}"))?;
            }
            for room in p.rooms.iter().flatten() {
                crate::names::RoomName::check(room).map_err(|e| format!("{key}.rooms: {e}"))?;
            }
            if p.kv.value_bytes == 0 || p.kv.value_bytes > p.kv.quota_bytes {
                return Err(format!(
                    "{key}.kv.value_bytes must be between 1 and kv.quota_bytes"
                ));
            }
            if p.history.limit == 0 {
                return Err(format!("{key}.history.limit must be above zero"));
            }
            let sh = &p.shadow;
            if sh.queue == 0 || sh.keep == 0 {
                return Err(format!("{key}.shadow: queue and keep must be above zero"));
            }
            if sh.file.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
                return Err(format!("{key}.shadow.file must not be empty"));
            }
            if sh.tokens_per_hour == Some(0) || sh.tokens_per_day == Some(0) {
                return Err(format!(
                    "{key}.shadow: tokens_per_hour and tokens_per_day must be above zero"
                ));
            }
            check_limits(
                &format!("{key}.shadow.limits"),
                &sh.limits.apply(&p.limits.apply(&self.limits)),
            )?;
        }
        Ok(())
    }

    /// The effective configuration as TOML (`roost run --print-config`). It holds no
    /// secrets: keys are only named (`api_key_env`, `api_key_file`), and settings
    /// that look like credentials are refused at load.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        let mut shown = self.clone();
        shown.store.url = shown.store.shown_url();
        toml::to_string_pretty(&shown)
            .map_err(|e| ConfigError(format!("cannot print the configuration: {e}")))
    }

    /// The settings of persona `label` (defaults if it has no section).
    pub fn persona(&self, label: &str) -> PersonaSection {
        self.personas.get(label).cloned().unwrap_or_default()
    }

    /// Limits for persona `label`.
    pub fn limits_for(&self, label: &str) -> Limits {
        self.persona(label).limits.apply(&self.limits)
    }

    /// Limits for the shadow of persona `label`.
    pub fn shadow_limits_for(&self, label: &str) -> Limits {
        self.persona(label)
            .shadow
            .limits
            .apply(&self.limits_for(label))
    }

    /// The shadow file of persona `label`: `[personas.NAME] shadow` (relative to the
    /// plugins folder), else `NAME.shadow.wasm` in the plugins folder.
    pub fn shadow_file(&self, label: &str) -> PathBuf {
        match &self.persona(label).shadow.file {
            Some(f) => self.paths.plugins.join(f),
            None => self.paths.plugins.join(format!("{label}.shadow.wasm")),
        }
    }

    /// The persona whose shadow `file` is (by configuration or by its name).
    pub fn shadow_owner(&self, file: &Path) -> Option<String> {
        for (label, p) in &self.personas {
            if let Some(f) = &p.shadow.file
                && same_file_name(&self.paths.plugins.join(f), file)
            {
                return Some(label.clone());
            }
        }
        let name = file.file_name()?.to_str()?;
        let label = name.strip_suffix(".shadow.wasm")?;
        (!label.is_empty() && !label.starts_with('.')).then(|| label.to_string())
    }

    pub fn runtime_config(&self) -> crate::plugin::RuntimeConfig {
        let r = &self.runtime;
        crate::plugin::RuntimeConfig {
            pooling: r.pooling,
            pool_instances: r.pool_instances.unwrap_or_else(|| {
                crate::plugin::engine::default_pool_instances(self.limits.memory_bytes)
            }),
            instance_idle: Duration::from_secs(r.instance_idle_secs),
            max_memory_bytes: r.max_memory_mib << 20,
            epoch_tick: Duration::from_millis(r.epoch_tick_ms),
            max_wasm_stack: r.max_wasm_stack_kib << 10,
        }
    }

    /// Session settings for one bot (name, description, rooms filled in by the caller).
    pub fn session_config(&self) -> SessionConfig {
        let s = &self.session;
        SessionConfig {
            server: self.server.url.clone(),
            backoff: Backoff {
                base: Duration::from_millis(s.backoff_base_ms),
                cap: Duration::from_millis(s.backoff_cap_ms),
                max_attempts: (s.max_attempts > 0).then_some(s.max_attempts),
            },
            connect_timeout: Duration::from_millis(s.connect_timeout_ms),
            request_timeout: Duration::from_millis(s.request_timeout_ms),
            write_timeout: Duration::from_millis(s.write_timeout_ms),
            max_resends: s.max_resends,
            max_reregistrations_per_day: s.max_reregistrations_per_day,
            ping_interval: Duration::from_millis(s.ping_interval_ms),
            dead_after_intervals: s.dead_after_intervals.max(1),
            membership_check: Duration::from_millis(s.membership_check_ms),
            membership_checks_per_second: s.membership_checks_per_second,
            healthy_after: Duration::from_millis(s.healthy_after_ms),
            retention: Duration::from_secs(s.retention_secs),
            outbox_ttl: Duration::from_secs(s.outbox_ttl_secs),
            shutdown_flush: Duration::from_millis(s.shutdown_flush_ms),
            inbound_capacity: s.inbound_queue,
            inbound_bytes: s.inbound_queue_bytes,
            pacing: Some(self.policy.limits.clone()),
            ..SessionConfig::default()
        }
    }
}

/// The UTF-8 text of a `settings_files` file, at most [`MAX_SETTING_FILE_BYTES`].
fn read_setting_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_SETTING_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_SETTING_FILE_BYTES {
        return Err(format!(
            "{} is larger than {MAX_SETTING_FILE_BYTES} bytes",
            path.display()
        ));
    }
    String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))
}

/// A toml error as one line: `file:LINE: message`.
fn toml_error(file: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let line = e
        .span()
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    let msg = e.message().lines().next().unwrap_or("invalid TOML").trim();
    let msg = msg.replace("unknown field", "unknown key");
    match line {
        Some(l) => ConfigError(format!("{file}:{l}: {msg}")),
        None => ConfigError(format!("{file}: {msg}")),
    }
}

#[cfg(test)]
mod transport_tests {
    use super::*;

    fn with(url: &str, insecure: bool) -> Config {
        let mut c = Config::default();
        c.server.url = url.into();
        c.server.insecure = insecure;
        c
    }

    #[test]
    fn plain_http_is_refused_off_loopback_unless_insecure() {
        for ok in [
            "https://nohumans.chat",
            "http://127.0.0.1:8080",
            "http://127.3.2.1",
            "http://[::1]:9000/prefix",
            "http://localhost:3000",
            "https://10.0.0.5",
        ] {
            assert_eq!(with(ok, false).check_server_transport(), Ok(()), "{ok}");
        }
        for bad in [
            "http://nohumans.chat",
            "http://10.0.0.5:8080",
            "http://localhost.evil.example",
            "http://[2001:db8::1]",
        ] {
            let err = with(bad, false).check_server_transport().unwrap_err();
            assert!(err.contains("--insecure") && err.contains(bad), "{err}");
            assert!(!err.contains('\n'));
            assert_eq!(with(bad, true).check_server_transport(), Ok(()), "{bad}");
        }
        let file = "[server]\nurl = \"http://10.0.0.5\"\ninsecure = true\n";
        let c: Config = toml::from_str(file).unwrap();
        assert_eq!(c.check_server_transport(), Ok(()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_password_is_never_printed_or_logged() {
        let text = "[store]\nurl = \"postgres://roost:s3cret@db.internal:5432/roost\"\n";
        let c = Config::parse(text, "roost.toml").unwrap();
        let printed = c.to_toml().unwrap();
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(
            printed.contains("postgres://roost:***@db.internal:5432/roost"),
            "{printed}"
        );
        // What is printed still loads, and the running config keeps the password.
        assert!(Config::parse(&printed, "printed").is_ok());
        assert!(c.store.url.contains("s3cret"));
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        // The default (SQLite) is shown as it is.
        let plain = Config::default().to_toml().unwrap();
        assert_eq!(Config::parse(&plain, "printed").unwrap(), Config::default());
    }

    #[test]
    fn an_empty_file_is_all_defaults() {
        let c = Config::parse("", "roost.toml").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.server.url, DEFAULT_SERVER);
        assert_eq!(c.session.inbound_queue, 1024);
        assert_eq!(c.session.inbound_queue_bytes, 1 << 20);
    }

    #[test]
    fn unknown_keys_are_one_line_naming_key_file_and_line() {
        let text = "[server]\nurl = \"http://127.0.0.1:1\"\n\n[personas.echo]\ncolour = \"red\"\n";
        let e = Config::parse(text, "roost.toml").unwrap_err().to_string();
        assert!(e.starts_with("roost.toml:5: unknown key `colour`"), "{e}");
        assert!(!e.contains('\n'));
        let e = Config::parse("[sever]\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `sever`"), "{e}");
    }

    #[test]
    fn persona_overrides_merge_onto_defaults() {
        let text = "[limits]\nmemory_bytes = 33554432\n[personas.echo.limits]\ncpu_per_call_ms = 50\n[personas.echo.settings]\ngreeting = \"hi\"\n";
        let c = Config::parse(text, "roost.toml").unwrap();
        let l = c.limits_for("echo");
        assert_eq!(l.memory_bytes, 32 << 20);
        assert_eq!(l.cpu_per_call, Duration::from_millis(50));
        assert_eq!(
            c.limits_for("other").cpu_per_call,
            Duration::from_millis(200)
        );
        assert_eq!(c.persona("echo").settings["greeting"], "hi");
    }

    #[test]
    fn llm_sections_parse_and_validate() {
        let text = "[llm.providers.local]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:11434\"\ndefault_model = \"llama3\"\napi_key_env = \"ROOST_TEST_KEY\"\n\n[personas.rook.llm]\nallow = true\nmax_tokens = 120\n[personas.rook.kv]\nallow = true\n";
        let c = Config::parse(text, "roost.toml").unwrap();
        assert_eq!(c.llm.providers["local"].default_model, "llama3");
        assert!(c.persona("rook").llm.allow);
        assert_eq!(c.persona("rook").llm.max_tokens, 120);
        assert!(!c.persona("other").llm.allow, "deny by default");
        for (bad, want) in [
            (
                "[personas.rook.llm]\nallow = true\n",
                "personas.rook.llm.allow: no provider",
            ),
            ("[personas.rook.llm]\nalow = true\n", "unknown key `alow`"),
            ("[llm]\ndefault_provider = \"x\"\n", "llm.default_provider"),
            (
                "[llm.providers.x]\nkind = \"openai\"\ndefault_model = \"m\"\napi_key = \"sk-1\"\n",
                "unknown key `api_key`",
            ),
        ] {
            let e = Config::parse(bad, "roost.toml").unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn settings_files_are_read_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("personas")).unwrap();
        std::fs::write(dir.path().join("personas/rook.md"), "# Rook\nA crow.\n").unwrap();
        let cfg = dir.path().join("roost.toml");
        std::fs::write(
            &cfg,
            "[personas.rook.settings_files]\ncharacter = \"personas/rook.md\"\n",
        )
        .unwrap();
        let c = Config::load(&cfg).unwrap();
        assert_eq!(c.persona("rook").settings["character"], "# Rook\nA crow.\n");
        assert!(c.persona("rook").settings_files.is_empty());
        c.validate().unwrap();

        std::fs::write(
            &cfg,
            "[personas.rook.settings_files]\ncharacter = \"missing.md\"\n",
        )
        .unwrap();
        let e = Config::load(&cfg).unwrap_err().to_string();
        assert!(
            e.starts_with("personas.rook.settings_files.character: cannot read"),
            "{e}"
        );
        assert!(e.contains("missing.md") && !e.contains('\n'), "{e}");

        std::fs::write(
            dir.path().join("big.md"),
            vec![b'x'; MAX_SETTING_FILE_BYTES as usize + 1],
        )
        .unwrap();
        std::fs::write(
            &cfg,
            "[personas.rook.settings_files]\ncharacter = \"big.md\"\n",
        )
        .unwrap();
        let e = Config::load(&cfg).unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");

        let both = "[personas.rook.settings]\ncharacter = \"x\"\n[personas.rook.settings_files]\ncharacter = \"big.md\"\n";
        let e = Config::parse(both, "roost.toml").unwrap_err().to_string();
        assert!(e.contains("also in personas.rook.settings"), "{e}");
    }

    #[test]
    fn a_secret_in_settings_is_refused_without_echoing_it() {
        let text =
            "[personas.echo.settings]\ntoken = \"ghp_rnhuy6MKWF9yP5WmDWpullhZasyDFMXaY0c5\"\n";
        let e = Config::parse(text, "roost.toml").unwrap_err().to_string();
        assert!(
            e.contains("personas.echo.settings.token looks like a credential"),
            "{e}"
        );
        assert!(!e.contains("ghp_rnhuy6"), "{e}");
        assert!(
            Config::parse(
                "[personas.echo.settings]\ngreeting = \"hello there\"\n",
                "x"
            )
            .is_ok()
        );
    }

    #[test]
    fn the_effective_config_prints_as_toml_and_parses_back() {
        let c = Config::parse("[personas.echo]\nrooms = [\"lobby\"]\n", "roost.toml").unwrap();
        let printed = c.to_toml().unwrap();
        assert!(printed.contains("[personas.echo]"), "{printed}");
        assert_eq!(Config::parse(&printed, "printed").unwrap(), c);
    }

    /// Every key's leaf name, with its section path, from a TOML value.
    fn leaves(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
        if let toml::Value::Table(t) = v {
            for (k, v) in t {
                match v {
                    toml::Value::Table(_) => leaves(&format!("{prefix}{k}."), v, out),
                    _ => out.push((prefix.to_string(), k.clone())),
                }
            }
        }
    }

    #[test]
    fn the_example_roost_toml_parses_and_documents_every_key() {
        let example = include_str!("../../roost.toml");
        let parsed = Config::parse(example, "roost.toml").expect("the example must parse");
        // Every key of every section (a persona with every table, a provider of each
        // kind) must appear in the example, set or commented out.
        let mut full = Config::default();
        full.personas.insert("p".into(), PersonaSection::default());
        let mut keys = Vec::new();
        let v = toml::Value::try_from(&full).expect("serialize");
        leaves("", &v, &mut keys);
        let persona = toml::Value::try_from(crate::llm::PersonaLlmConfig::default()).unwrap();
        leaves("personas.p.llm.", &persona, &mut keys);
        for k in [
            "default_provider",
            "kind",
            "base_url",
            "default_model",
            "timeout_ms",
            "max_retries",
            "max_tokens_param",
            "api_key_env",
            "api_key_file",
            "metrics",
            "name",
            "description",
            "rooms",
            "character",
        ] {
            keys.push(("(any)".into(), k.into()));
        }
        for (section, key) in keys {
            let pattern = regex::Regex::new(&format!(r"(?m)^#?\s*{key}\s*=")).unwrap();
            assert!(
                pattern.is_match(example),
                "roost.toml does not document {section}{key}"
            );
        }
        assert!(parsed.personas.contains_key("sage"));
    }

    #[test]
    fn a_shadow_is_a_file_name_or_a_table() {
        let c = Config::parse("[personas.echo]\nshadow = \"next.wasm\"\n", "roost.toml").unwrap();
        let sh = &c.personas["echo"].shadow;
        assert_eq!(sh.file.as_deref(), Some(Path::new("next.wasm")));
        assert!(!sh.llm);
        assert_eq!(c.shadow_file("echo"), c.paths.plugins.join("next.wasm"));
        assert_eq!(
            c.shadow_owner(&c.paths.plugins.join("next.wasm"))
                .as_deref(),
            Some("echo")
        );
        let c = Config::parse(
            "[personas.echo.shadow]\nllm = true\ntokens_per_hour = 10\nqueue = 4\n",
            "roost.toml",
        )
        .unwrap();
        let sh = &c.personas["echo"].shadow;
        assert!(sh.llm && sh.file.is_none());
        assert_eq!((sh.tokens_per_hour, sh.queue, sh.keep), (Some(10), 4, 20));
        assert_eq!(
            c.shadow_file("echo"),
            c.paths.plugins.join("echo.shadow.wasm")
        );
        assert_eq!(
            c.shadow_owner(Path::new("plugins/greeter.shadow.wasm"))
                .as_deref(),
            Some("greeter")
        );
        assert_eq!(c.shadow_owner(Path::new("plugins/greeter.wasm")), None);
        // The printed configuration reads back the same.
        let again = Config::parse(&c.to_toml().unwrap(), "printed").unwrap();
        assert_eq!(again.personas["echo"].shadow, *sh);
        for (text, why) in [
            ("[personas.echo.shadow]\nllm = \"yes\"\n", "invalid type"),
            ("[personas.echo.shadow]\nqueue = 0\n", "queue and keep"),
            ("[personas.echo.shadow]\nlim = 1\n", "unknown key `lim`"),
            ("[personas.echo]\nshadow = 3\n", "a file name or a table"),
        ] {
            let e = Config::parse(text, "roost.toml").unwrap_err().to_string();
            assert!(e.contains(why) && !e.contains('\n'), "{text}: {e}");
        }
    }

    #[test]
    fn bad_values_are_refused() {
        for text in [
            "[server]\nurl = \"ftp://x\"\n",
            "[session]\nping_interval_ms = 0\n",
            "[limits]\ncpu_per_call_ms = 90000\n",
            "[personas.echo]\nrooms = [\"two words\"]\n",
            "[personas.echo.limits]\nmemory_bytes = 99999999999999\n",
            "[runtime]\npooling = \"yes\"\n",
            "[runtime]\npool_instances = 0\n",
            "[cache]\nmax_mib = 0\n",
            "[reload]\ndebounce_ms = 0\n",
            "[reload]\nwatch = true\n",
        ] {
            let e = Config::parse(text, "roost.toml");
            assert!(e.is_err(), "accepted: {text}");
            assert!(!e.unwrap_err().to_string().contains('\n'));
        }
    }
}
