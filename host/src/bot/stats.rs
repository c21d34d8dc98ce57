//! What bots and the reloader count, for metrics and the status page: the counters
//! of one bot, the persona it runs, and the host's load and reload statistics.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::plugin::cache::CacheOutcome;

use super::core::{BotCore, CoreCounters};

/// Counters of one bot besides its session's (messages the bot did not keep up with
/// are counted by the session: `SessionStatus::inbound_dropped`).
#[derive(Debug, Clone, Default)]
pub struct BotCounters {
    pub core: CoreCounters,
    pub policy: crate::policy::PolicyCounters,
    /// The persona's sandbox: calls, failures, quarantines, call latency.
    pub sandbox: crate::plugin::sandbox::SandboxStats,
    /// Whether the persona is quarantined right now.
    pub quarantined: bool,
    /// Versions swapped in by hot reload.
    pub reloads: u64,
    /// Which version runs, and its troubles, for the status page.
    pub persona: PersonaStatus,
}

/// What the status page says about the persona a bot runs.
#[derive(Debug, Clone, Default)]
pub struct PersonaStatus {
    /// The manifest's version.
    pub version: String,
    /// SHA-256 of the component, hex.
    pub hash: Option<String>,
    /// The last failed call (trap, limit, timeout, quarantine) and when.
    pub last_error: Option<(std::time::SystemTime, String)>,
    /// Until when the persona is quarantined, if it is.
    pub quarantined_until: Option<std::time::SystemTime>,
}

impl PersonaStatus {
    /// A version was installed (at start or by a swap).
    pub(crate) fn installed(&mut self, core: &BotCore) {
        self.version = core.manifest.version.clone();
        self.hash = core.sandbox.component().hash().map(hex::encode);
    }

    /// A message was handled: `failed` is the call's error, if it failed.
    pub(crate) fn handled(
        &mut self,
        failed: Option<String>,
        quarantine: Option<std::time::Duration>,
    ) {
        if failed.is_none() && quarantine.is_none() && self.quarantined_until.is_none() {
            return;
        }
        let now = std::time::SystemTime::now();
        if let Some(e) = failed {
            self.last_error = Some((now, e));
        }
        self.quarantined_until = quarantine.map(|d| now + d);
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
pub(crate) struct Last {
    reload_latency: Option<Duration>,
    reload_settled_at: Option<Instant>,
    load: Option<LoadRecord>,
}

/// Hot-reload and load counters of a host, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub(crate) loaded: AtomicU64,
    pub(crate) reloaded: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) unloaded: AtomicU64,
    pub(crate) unchanged: AtomicU64,
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) cache_rebuilt: AtomicU64,
    pub(crate) load_micros: AtomicU64,
    pub(crate) last: Mutex<Last>,
    /// The last [`RECENT_EVENTS`] things hot reload did, oldest first.
    pub(crate) recent: Mutex<std::collections::VecDeque<ReloadEvent>>,
    pub(crate) events: AtomicU64,
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

    pub(crate) fn bump(c: &AtomicU64) {
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

    pub(crate) fn loaded_file(&self, record: LoadRecord) {
        Self::bump(match record.outcome {
            CacheOutcome::Hit => &self.cache_hits,
            CacheOutcome::Miss => &self.cache_misses,
            CacheOutcome::Rebuilt => &self.cache_rebuilt,
        });
        self.load_micros
            .fetch_add(record.took.as_micros() as u64, Ordering::Relaxed);
        self.last.lock().unwrap_or_else(|p| p.into_inner()).load = Some(record);
    }

    pub(crate) fn reloaded(&self, settled_at: Instant) -> Duration {
        let latency = settled_at.elapsed();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.reload_latency = Some(latency);
        last.reload_settled_at = Some(settled_at);
        drop(last);
        Self::bump(&self.reloaded);
        latency
    }
}
