//! Metrics and health: Prometheus `/metrics` and `/healthz`, served with axum.
//!
//! Every number is read at scrape time from the running bots through their
//! [`BotProbe`]s (the session's status and the bot's counters), so nothing on the
//! message path waits for the metrics server. `/healthz` answers 200 while every bot
//! is connected or inside its reconnect backoff, otherwise 503 with a JSON reason.
//! The same address serves the status page and its JSON ([`crate::status`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::bot::compare::{BoardSnapshot, ShadowBoard};
use crate::bot::stats::{BotCounters, ReloadStats, ReloadStatsSnapshot};
use crate::plugin::sandbox::LATENCY_BUCKETS;
use crate::session::{SessionHandle, SessionState, SessionStatus};

/// What the metrics server reads of one bot.
#[derive(Clone)]
pub struct BotProbe {
    pub session: SessionHandle,
    pub counters: Arc<Mutex<BotCounters>>,
    /// The bot's shadow outcomes (see [`crate::bot::shadow`]).
    pub shadow: Arc<ShadowBoard>,
}

/// The probes of every running bot, by persona label (bots register on start and
/// leave on stop), and the host's hot-reload counters once it serves reloads.
#[derive(Clone, Default)]
pub struct Probes {
    bots: Arc<Mutex<BTreeMap<String, BotProbe>>>,
    reload: Arc<Mutex<Option<Arc<ReloadStats>>>>,
    store: Arc<Mutex<Option<crate::store::Store>>>,
    leases: Arc<Mutex<Option<Arc<Mutex<crate::lease::LeaseSnapshot>>>>>,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Probes").field(&self.labels()).finish()
    }
}

/// One bot's numbers at one moment.
#[derive(Debug, Clone)]
pub struct BotSnapshot {
    pub label: String,
    pub status: SessionStatus,
    pub counters: BotCounters,
    /// The bot's shadow, if it has or had one.
    pub shadow: Option<BoardSnapshot>,
}

impl Probes {
    pub fn insert(&self, label: &str, probe: BotProbe) {
        self.lock().insert(label.to_string(), probe);
    }

    pub fn remove(&self, label: &str) {
        self.lock().remove(label);
    }

    pub fn labels(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn snapshot(&self) -> Vec<BotSnapshot> {
        let probes: Vec<(String, BotProbe)> = self
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        probes
            .into_iter()
            .map(|(label, p)| BotSnapshot {
                label,
                status: p.session.status(),
                counters: p.counters.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                shadow: Some(p.shadow.snapshot()).filter(|s| s.ever),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BotProbe>> {
        self.bots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `/healthz` also checks this store's connection.
    pub fn set_store(&self, store: crate::store::Store) {
        *self.store.lock().unwrap_or_else(|e| e.into_inner()) = Some(store);
    }

    /// The store `/healthz` checks, if any.
    pub fn store(&self) -> Option<crate::store::Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// With a shared store: the lease view status and metrics show.
    pub fn set_leases(&self, leases: Arc<Mutex<crate::lease::LeaseSnapshot>>) {
        *self.leases.lock().unwrap_or_else(|e| e.into_inner()) = Some(leases);
    }

    /// The last lease view (which host holds which persona, at which epoch).
    pub fn leases(&self) -> Option<crate::lease::LeaseSnapshot> {
        let l = self
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        l.map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Reports the host's hot-reload and compile-cache counters too.
    pub fn set_reload_stats(&self, stats: Arc<ReloadStats>) {
        *self.reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
    }

    /// The host's hot-reload counters and events, once it serves reloads.
    pub fn reloads(&self) -> Option<Arc<ReloadStats>> {
        self.reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn reload_stats(&self) -> Option<ReloadStatsSnapshot> {
        let stats = self
            .reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        stats.map(|s| s.snapshot())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BotLabel {
    bot: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    bot: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    bot: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeaseLabel {
    persona: String,
    holder: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    bot: String,
    reason: &'static str,
}

/// The collector behind `/metrics`.
#[derive(Debug, Clone)]
struct BotCollector {
    probes: Probes,
}

const STATES: [&str; 5] = ["connecting", "joined", "active", "disconnected", "stopped"];

fn state_name(s: &SessionState) -> &'static str {
    match s {
        SessionState::Connecting => "connecting",
        SessionState::Joined => "joined",
        SessionState::Active => "active",
        SessionState::Disconnected { .. } => "disconnected",
        _ => "stopped",
    }
}

/// Writes one metric family with one sample per bot.
fn family<F>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    bots: &[BotSnapshot],
    mut sample: F,
) -> Result<(), std::fmt::Error>
where
    F: FnMut(&BotSnapshot, MetricEncoder<'_>) -> Result<(), std::fmt::Error>,
{
    let mut fam = enc.encode_descriptor(name, help, None, ty)?;
    for b in bots {
        let label = BotLabel {
            bot: b.label.clone(),
        };
        sample(b, fam.encode_family(&label)?)?;
    }
    Ok(())
}

fn counter(mut e: MetricEncoder<'_>, v: u64) -> Result<(), std::fmt::Error> {
    e.encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn gauge(mut e: MetricEncoder<'_>, v: i64) -> Result<(), std::fmt::Error> {
    e.encode_gauge(&v)
}

impl Collector for BotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let bots = self.probes.snapshot();
        if let Some(view) = self.probes.leases() {
            {
                let mut fam = enc.encode_descriptor(
                    "roost_lease_epoch",
                    "The fencing epoch of each persona's lease, by holding host (shared store)",
                    None,
                    MetricType::Gauge,
                )?;
                for l in &view.leases {
                    let label = LeaseLabel {
                        persona: l.persona.clone(),
                        holder: l.holder.clone(),
                    };
                    gauge(fam.encode_family(&label)?, l.epoch)?;
                }
            }
            {
                let mut mine = enc.encode_descriptor(
                    "roost_leases_held",
                    "Personas whose lease this host holds",
                    None,
                    MetricType::Gauge,
                )?;
                let held = view.leases.iter().filter(|l| l.holder == view.host).count();
                mine.encode_gauge(&(held as i64))?;
            }
            let mut hosts = enc.encode_descriptor(
                "roost_live_hosts",
                "Hosts renewing leases on the shared store",
                None,
                MetricType::Gauge,
            )?;
            hosts.encode_gauge(&(view.live_hosts as i64))?;
        }
        {
            let mut fam = enc.encode_descriptor(
                "roost_bot_connection_state",
                "1 for the bot's current connection state",
                None,
                MetricType::Gauge,
            )?;
            for b in &bots {
                let now = state_name(&b.status.state);
                for s in STATES {
                    let label = StateLabel {
                        bot: b.label.clone(),
                        state: s,
                    };
                    gauge(fam.encode_family(&label)?, i64::from(s == now))?;
                }
            }
        }
        family(
            &mut enc,
            "roost_bot_uptime_seconds",
            "Seconds since the bot started",
            MetricType::Gauge,
            &bots,
            |b, e| gauge(e, b.status.uptime.as_secs() as i64),
        )?;
        family(
            &mut enc,
            "roost_bot_reconnects",
            "Reconnections of the bot's session",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.status.reconnects),
        )?;
        family(
            &mut enc,
            "roost_bot_messages_in",
            "Messages received by the bot's session",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.status.messages_in),
        )?;
        family(
            &mut enc,
            "roost_bot_messages_out",
            "Send frames the bot wrote to its connection (re-sends included)",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.status.messages_out),
        )?;
        family(
            &mut enc,
            "roost_bot_outbox_depth",
            "Replies waiting in the outbox",
            MetricType::Gauge,
            &bots,
            |b, e| gauge(e, b.status.outbox_depth as i64),
        )?;
        family(
            &mut enc,
            "roost_bot_outbox_stale",
            "Outbox entries dropped as stale",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.status.outbox_stale),
        )?;
        family(
            &mut enc,
            "roost_bot_inbound_dropped",
            "Inbound messages dropped because the bot's queue was full",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.status.inbound_dropped),
        )?;
        family(
            &mut enc,
            "roost_bot_replies_paced",
            "Replies the rate limits held back and the session sent at their slot",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.status.paced),
        )?;
        family(
            &mut enc,
            "roost_bot_replies_stale",
            "Paced replies dropped because they waited longer than policy.limits.max_wait_secs",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.status.paced_stale),
        )?;
        family(
            &mut enc,
            "roost_bot_rejoins",
            "Times the server no longer counted the bot in a room (a not_joined error, or a member list without it) and it joined again",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.status.rejoins),
        )?;
        family(
            &mut enc,
            "roost_bot_history_gaps",
            "Rooms whose missed messages could not be fetched after a reconnect (fetched again on the next connection)",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.status.history_gaps),
        )?;
        family(
            &mut enc,
            "roost_bot_recoveries_overdue",
            "History fetches slower than the recovery hold: the session went active before they finished",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.status.recoveries_overdue),
        )?;
        family(
            &mut enc,
            "roost_bot_outbox_unconfirmed",
            "Sent replies never confirmed by their echo and not sent again (history too short, or max_resends reached)",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.status.outbox_unconfirmed),
        )?;
        family(
            &mut enc,
            "roost_bot_outbox_unsaved",
            "Replies never sent because their outbox row could not be saved",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.status.outbox_unsaved),
        )?;
        family(
            &mut enc,
            "roost_bot_reregistrations",
            "New registrations after the server confirmed the key rejected",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.status.reregistrations),
        )?;
        family(
            &mut enc,
            "roost_bot_reregistrations_refused",
            "Re-registrations refused by session.max_reregistrations_per_day",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.status.reregistrations_refused),
        )?;
        family(
            &mut enc,
            "roost_bot_server_throttles",
            "Times the server asked the bot to slow down (429, slow-down closes, rate_limited frames)",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.status.throttles),
        )?;
        family(
            &mut enc,
            "roost_bot_reply_pace_wait_seconds",
            "How long paced replies waited for their rate-limit slot",
            MetricType::Histogram,
            &bots,
            |b, mut e| {
                let s = &b.status;
                let mut buckets: Vec<(f64, u64)> = crate::session::PACE_WAIT_BUCKETS
                    .iter()
                    .copied()
                    .zip(s.pace_wait_buckets.iter().copied())
                    .collect();
                buckets.push((f64::MAX, s.pace_wait_buckets.last().copied().unwrap_or(0)));
                let count = s.pace_wait_buckets.iter().sum();
                e.encode_histogram::<NoLabelSet>(
                    s.pace_wait_sum_ms as f64 / 1000.0,
                    count,
                    &buckets,
                    None,
                )
            },
        )?;
        family(
            &mut enc,
            "roost_bot_blocked",
            "Replies blocked by the secret scanner or a leak phrase",
            MetricType::Counter,
            &bots,
            |b, e| {
                counter(
                    e,
                    b.counters.policy.blocked + b.counters.policy.leak_blocked,
                )
            },
        )?;
        family(
            &mut enc,
            "roost_bot_rate_limited",
            "Replies dropped by a rate limit",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.counters.policy.rate_limited),
        )?;
        family(
            &mut enc,
            "roost_bot_loop_guarded",
            "Replies dropped by the loop guard",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.counters.policy.loop_guarded),
        )?;
        family(
            &mut enc,
            "roost_bot_flagged_inbound",
            "Inbound messages flagged suspicious",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.counters.policy.flagged_inbound),
        )?;
        {
            let mut fam = enc.encode_descriptor(
                "roost_bot_dropped",
                "Replies and messages dropped, by reason",
                None,
                MetricType::Counter,
            )?;
            for b in &bots {
                for (reason, v) in b.counters.policy.drops() {
                    let label = ReasonLabel {
                        bot: b.label.clone(),
                        reason,
                    };
                    counter(fam.encode_family(&label)?, v)?;
                }
            }
        }
        family(
            &mut enc,
            "roost_bot_joins_refused",
            "Joins and leaves of the persona refused by the room limits (limits.joins_per_minute, limits.max_rooms)",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.counters.core.joins_refused),
        )?;
        family(
            &mut enc,
            "roost_persona_calls",
            "Calls into the persona",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.counters.sandbox.calls),
        )?;
        family(
            &mut enc,
            "roost_persona_errors",
            "Persona calls that trapped, hit a limit or timed out",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.counters.sandbox.failures),
        )?;
        family(
            &mut enc,
            "roost_persona_quarantines",
            "Times the persona was quarantined",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.counters.sandbox.quarantines),
        )?;
        family(
            &mut enc,
            "roost_persona_quarantined",
            "1 while the persona is quarantined",
            MetricType::Gauge,
            &bots,
            |b, e| gauge(e, i64::from(b.counters.quarantined)),
        )?;
        family(
            &mut enc,
            "roost_persona_reloads",
            "Versions of the persona swapped in by hot reload",
            MetricType::Counter,
            &bots,
            |b, e| counter(e, b.counters.reloads),
        )?;
        family(
            &mut enc,
            "roost_persona_call_seconds",
            "Latency of persona calls",
            MetricType::Histogram,
            &bots,
            |b, mut e| {
                let s = &b.counters.sandbox;
                let mut buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
                    .iter()
                    .copied()
                    .zip(s.latency_buckets.iter().copied())
                    .collect();
                // prometheus-client writes an upper bound of f64::MAX as `le="+Inf"`.
                buckets.push((f64::MAX, s.latency_buckets[LATENCY_BUCKETS.len()]));
                e.encode_histogram::<NoLabelSet>(s.latency_sum, s.calls, &buckets, None)
            },
        )?;
        if bots.iter().any(|b| b.shadow.is_some()) {
            let mut fam = enc.encode_descriptor(
                "roost_shadow_outcomes",
                "Messages compared between the live persona and its shadow, by outcome",
                None,
                MetricType::Counter,
            )?;
            for b in &bots {
                for (outcome, v) in b.shadow.iter().flat_map(|s| s.outcomes.iter()) {
                    let label = OutcomeLabel {
                        bot: b.label.clone(),
                        outcome: outcome.as_str(),
                    };
                    counter(fam.encode_family(&label)?, *v)?;
                }
            }
        }
        if let Some(r) = self.probes.reload_stats() {
            encode_reload(&mut enc, &r)?;
        }
        Ok(())
    }
}

/// Host-wide hot-reload and compile-cache counters.
fn encode_reload(
    enc: &mut DescriptorEncoder,
    r: &ReloadStatsSnapshot,
) -> Result<(), std::fmt::Error> {
    {
        let mut fam = enc.encode_descriptor(
            "roost_reload_events",
            "Persona files loaded, reloaded, rejected, unloaded, or seen unchanged",
            None,
            MetricType::Counter,
        )?;
        for (event, v) in [
            ("loaded", r.loaded),
            ("reloaded", r.reloaded),
            ("rejected", r.rejected),
            ("unloaded", r.unloaded),
            ("unchanged", r.unchanged),
        ] {
            counter(fam.encode_family(&EventLabel { event })?, v)?;
        }
    }
    {
        let mut fam = enc.encode_descriptor(
            "roost_compile_cache",
            "Persona loads by compile-cache outcome",
            None,
            MetricType::Counter,
        )?;
        for (event, v) in [
            ("hit", r.cache_hits),
            ("miss", r.cache_misses),
            ("rebuilt", r.cache_rebuilt),
        ] {
            counter(fam.encode_family(&EventLabel { event })?, v)?;
        }
    }
    let mut latency = enc.encode_descriptor(
        "roost_reload_last_latency_seconds",
        "File settled to new version installed, for the last reload",
        None,
        MetricType::Gauge,
    )?;
    latency.encode_gauge(&r.last_reload_latency.map_or(0.0, |d| d.as_secs_f64()))?;
    Ok(())
}

/// Health of the bots: `Ok` while each is connected or inside its reconnect backoff.
pub fn health(bots: &[BotSnapshot]) -> Result<(), serde_json::Value> {
    if bots.is_empty() {
        return Err(serde_json::json!({"status": "unhealthy", "reason": "no bots are running"}));
    }
    let failing: Vec<serde_json::Value> = bots
        .iter()
        .filter(|b| matches!(b.status.state, SessionState::Stopped))
        .map(|b| {
            serde_json::json!({
                "bot": b.label,
                "state": b.status.state.to_string(),
                "last_error": b.status.last_error,
            })
        })
        .collect();
    if failing.is_empty() {
        Ok(())
    } else {
        Err(serde_json::json!({
            "status": "unhealthy",
            "reason": "some bots are neither connected nor reconnecting",
            "bots": failing,
        }))
    }
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    probes: Probes,
}

/// The `/metrics` text for a set of probes (also used by tests).
pub fn render(probes: &Probes) -> String {
    let registry = registry(probes);
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

fn registry(probes: &Probes) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(BotCollector {
        probes: probes.clone(),
    }));
    registry
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "metrics encoding failed\n".to_string(),
        ),
    }
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    if let Some(store) = s.probes.store() {
        let ping = tokio::task::spawn_blocking(move || store.ping().map_err(|e| e.to_string()))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(e) = ping {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(serde_json::json!({
                    "status": "unhealthy",
                    "reason": "the state store does not answer",
                    "store": e,
                })),
            );
        }
        // A host of several may rightly run no bot (its share is empty).
        if s.probes.leases().is_some() && s.probes.snapshot().is_empty() {
            return (
                StatusCode::OK,
                axum::Json(serde_json::json!({"status": "ok", "bots": 0})),
            );
        }
    }
    match health(&s.probes.snapshot()) {
        Ok(()) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ok"})),
        ),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(reason)),
    }
}

/// `/metrics` and `/healthz` over `probes`; [`crate::status::serve`] serves them
/// with the status page and API.
pub fn router(probes: Probes) -> Router {
    let state = AppState {
        registry: Arc::new(registry(&probes)),
        probes,
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
}
