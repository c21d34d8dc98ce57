//! What a running host says about itself, beside `/metrics` on the metrics address:
//!
//! - `GET /api/status`: JSON ([`HostStatus`]) — for each bot its connection state
//!   and uptime, the persona's version and content hash, calls and errors,
//!   quarantine, the last error, outbox depth and drops by reason; the host's health
//!   and the last hot-reload events.
//! - `GET /`: the same as a page for a person ([`page`]): server-rendered HTML, no
//!   script and nothing loaded from elsewhere, that reloads itself every
//!   [`REFRESH_SECS`] seconds.
//! - `roost status [--json] [--health] [--addr ADDR]` asks for either ([`client`]).
//!
//! The metrics address is loopback unless the operator binds it elsewhere; nothing
//! here changes anything, and no field holds a key (a session's last error never
//! contains one; persona errors are the host's own descriptions).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let status = roost::status::client::fetch("127.0.0.1:9090").await?;
//! print!("{}", roost::status::client::render(&status));
//! # Ok(()) }
//! ```

pub mod client;
pub mod page;

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::{Deserialize, Serialize};

use crate::session::SessionState;
use crate::telemetry::{BotSnapshot, Probes};

/// How often the page reloads itself.
pub const REFRESH_SECS: u32 = 5;

/// The JSON of `/api/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    /// The version of roost serving this.
    pub roost: String,
    /// Seconds since this address started serving.
    pub uptime_secs: u64,
    /// When this was put together, milliseconds since the Unix epoch.
    pub generated_at_ms: u64,
    /// What `/healthz` says: every bot connected or reconnecting.
    pub healthy: bool,
    /// Why not, when not.
    pub health_reason: Option<String>,
    /// The bots, by label.
    pub bots: Vec<BotStatus>,
    /// Hot reload, when the host serves it.
    pub reloads: Option<Reloads>,
    /// With a shared store: this host, the live hosts, and every persona's lease.
    #[serde(default)]
    pub leases: Option<crate::lease::LeaseSnapshot>,
}

/// One bot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BotStatus {
    /// The persona file's stem (`echo` for `echo.wasm`).
    pub label: String,
    /// The bot's name on the network, once known.
    pub name: Option<String>,
    /// `connecting`, `joined`, `active`, `disconnected (attempt N)` or `stopped`.
    pub state: String,
    /// Whether messages flow (`active`).
    pub connected: bool,
    /// Seconds since the bot started.
    pub uptime_secs: u64,
    /// Seconds the current connection has been active.
    pub connected_secs: Option<u64>,
    pub reconnects: u64,
    pub rooms: Vec<String>,
    pub persona: PersonaVersion,
    /// Calls into the persona, and how many failed (trap, limit, timeout).
    pub calls: u64,
    pub errors: u64,
    pub quarantine: Quarantine,
    /// The persona's last failed call.
    pub last_error: Option<LastError>,
    /// The connection's last trouble (it may have recovered since).
    pub connection_error: Option<String>,
    pub messages_in: u64,
    pub messages_out: u64,
    /// Replies waiting to be sent or confirmed.
    pub outbox_depth: u64,
    /// Messages and replies dropped, by reason (every reason, zeros included).
    pub dropped: BTreeMap<String, u64>,
    /// Versions swapped in by hot reload.
    pub reloads: u64,
    /// The bot's shadow, if it has or had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowStatus>,
}

/// A bot's shadow (see [`crate::bot::shadow`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowStatus {
    /// The shadow listening now; `None` once it stopped (promoted or removed).
    pub running: Option<crate::bot::compare::ShadowVersion>,
    /// Messages compared, by outcome (every outcome, zeros included).
    pub outcomes: BTreeMap<String, u64>,
    /// The shadow's calls and failed calls.
    pub calls: u64,
    pub errors: u64,
    pub quarantined: bool,
    /// The last pairs that were not `same`, newest first.
    pub recent: Vec<crate::bot::compare::ShadowPair>,
}

/// Which persona a bot runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonaVersion {
    /// The manifest's version.
    pub version: String,
    /// SHA-256 of the component, hex.
    pub hash: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quarantine {
    /// Quarantined now.
    pub active: bool,
    /// Seconds until it ends.
    pub remaining_secs: Option<u64>,
    /// Times it has been quarantined.
    pub times: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastError {
    pub message: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// Hot reload's counters and last events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reloads {
    pub loaded: u64,
    pub reloaded: u64,
    pub rejected: u64,
    pub unloaded: u64,
    /// The last events, newest first.
    pub recent: Vec<ReloadEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadEntry {
    pub at_ms: u64,
    pub label: String,
    /// `loaded`, `reloaded`, `rejected` or `unloaded`.
    pub event: String,
    pub detail: String,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The status of the bots behind `probes` now; `started` is when the host began.
pub fn collect(probes: &Probes, started: Instant) -> HostStatus {
    let now = SystemTime::now();
    let bots = probes.snapshot();
    let leases = probes.leases();
    let health = if leases.is_some() && bots.is_empty() {
        // A host of several may rightly run no bot (its share is empty).
        Ok(())
    } else {
        crate::telemetry::health(&bots)
    };
    let health_reason = health.as_ref().err().map(|v| {
        v.get("reason")
            .and_then(|r| r.as_str())
            .unwrap_or("unhealthy")
            .to_string()
    });
    let reloads = probes.reloads().map(|stats| {
        let counts = stats.snapshot();
        Reloads {
            loaded: counts.loaded,
            reloaded: counts.reloaded,
            rejected: counts.rejected,
            unloaded: counts.unloaded,
            recent: stats
                .recent()
                .into_iter()
                .rev()
                .map(|e| ReloadEntry {
                    at_ms: e.at_ms,
                    label: e.label,
                    event: e.event.to_string(),
                    detail: e.detail,
                })
                .collect(),
        }
    });
    HostStatus {
        roost: env!("CARGO_PKG_VERSION").to_string(),
        uptime_secs: started.elapsed().as_secs(),
        generated_at_ms: unix_ms(now),
        healthy: health.is_ok(),
        health_reason,
        bots: bots.iter().map(|b| bot_status(b, now)).collect(),
        reloads,
        leases,
    }
}

fn bot_status(b: &BotSnapshot, now: SystemTime) -> BotStatus {
    let s = &b.status;
    let c = &b.counters;
    let p = &c.policy;
    let remaining = c
        .persona
        .quarantined_until
        .and_then(|until| until.duration_since(now).ok())
        .filter(|d| !d.is_zero());
    let dropped: BTreeMap<String, u64> = p
        .drops()
        .into_iter()
        .chain([
            ("queue-full", s.inbound_dropped),
            ("outbox-stale", s.outbox_stale),
            ("outbox-unsaved", s.outbox_unsaved),
        ])
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    BotStatus {
        label: b.label.clone(),
        name: s.name.clone(),
        state: s.state.to_string(),
        connected: s.state == SessionState::Active,
        uptime_secs: s.uptime.as_secs(),
        connected_secs: s.connected_for.map(|d| d.as_secs()),
        reconnects: s.reconnects,
        rooms: s.rooms.clone(),
        persona: PersonaVersion {
            version: c.persona.version.clone(),
            hash: c.persona.hash.clone(),
        },
        calls: c.sandbox.calls,
        errors: c.sandbox.failures,
        quarantine: Quarantine {
            active: remaining.is_some(),
            remaining_secs: remaining.map(|d| d.as_secs().max(1)),
            times: c.sandbox.quarantines,
        },
        last_error: c.persona.last_error.as_ref().map(|(at, m)| LastError {
            message: m.clone(),
            at_ms: unix_ms(*at),
        }),
        connection_error: s.last_error.clone(),
        messages_in: s.messages_in,
        messages_out: s.messages_out,
        outbox_depth: s.outbox_depth as u64,
        dropped,
        reloads: c.reloads,
        shadow: b.shadow.as_ref().map(|sh| ShadowStatus {
            running: sh.running.clone(),
            outcomes: sh
                .outcomes
                .iter()
                .map(|(o, n)| (o.as_str().to_string(), *n))
                .collect(),
            calls: sh.calls,
            errors: sh.errors,
            quarantined: sh.quarantined,
            recent: sh.recent.clone(),
        }),
    }
}

/// A shadow's counts worth showing: `same 12, different 3, ...` (zeros left out).
pub fn shadow_counts(s: &ShadowStatus) -> String {
    let counts: Vec<String> = crate::bot::compare::Outcome::ALL
        .iter()
        .filter_map(|o| {
            let n = s.outcomes.get(o.as_str()).copied().unwrap_or(0);
            (n > 0).then(|| format!("{o} {n}"))
        })
        .collect();
    if counts.is_empty() {
        "nothing compared yet".into()
    } else {
        counts.join(", ")
    }
}

/// `3 h 05 min`, `4 min 12 s`, `9 s`.
pub fn span(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d} d {h:02} h")
    } else if h > 0 {
        format!("{h} h {m:02} min")
    } else if m > 0 {
        format!("{m} min {s:02} s")
    } else {
        format!("{s} s")
    }
}

/// `HH:MM:SS` (UTC) of a time in milliseconds since the Unix epoch.
pub fn clock(at_ms: u64) -> String {
    let secs = at_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

/// How long before `now_ms` `at_ms` was: `12 s ago`.
pub fn ago(now_ms: u64, at_ms: u64) -> String {
    format!("{} ago", span(now_ms.saturating_sub(at_ms) / 1000))
}

/// What went wrong in a persona's failed call, without the preamble naming the
/// persona and the message (`persona `x` failed in on-message (message from ...):
/// trapped: ...` → `trapped: ...`): where it is shown, the persona is named already.
pub fn error_reason(message: &str) -> &str {
    match message.strip_prefix("persona `") {
        Some(rest) => rest.split_once("): ").map_or(message, |(_, why)| why),
        None => message,
    }
}

/// The drops worth showing: the reasons with a count, `reason N`, most first.
pub fn nonzero_drops(dropped: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let mut d: Vec<(String, u64)> = dropped
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| (k.clone(), *n))
        .collect();
    d.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    d
}

#[derive(Clone)]
struct StatusState {
    probes: Probes,
    started: Instant,
}

/// `/` (the page) and `/api/status` (JSON) for the bots behind `probes`.
/// Binds `addr` and serves `/metrics`, `/healthz` ([`crate::telemetry::router`]) and
/// the status page and API (`/`, `/api/status`) until `shutdown` resolves. Returns
/// the bound address (useful with port 0) once listening.
pub async fn serve(
    addr: std::net::SocketAddr,
    probes: Probes,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = crate::telemetry::router(probes.clone()).merge(router(probes));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!("metrics server failed: {e}");
        }
    });
    tracing::info!(%bound, "metrics on http://{bound}/metrics, health on http://{bound}/healthz");
    Ok(bound)
}

/// The status page (`/`) and its JSON (`/api/status`).
pub fn router(probes: Probes) -> Router {
    let state = StatusState {
        probes,
        started: Instant::now(),
    };
    Router::new()
        .route("/", get(html))
        .route("/api/status", get(json))
        .with_state(state)
}

async fn json(State(s): State<StatusState>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(collect(&s.probes, s.started)),
    )
}

async fn html(State(s): State<StatusState>) -> impl IntoResponse {
    let body = page::render(&collect(&s.probes, s.started));
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // Bot names and errors come from the network: nothing may run or load.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_clocks_read_well() {
        assert_eq!(span(9), "9 s");
        assert_eq!(span(252), "4 min 12 s");
        assert_eq!(span(3 * 3600 + 5 * 60 + 1), "3 h 05 min");
        assert_eq!(span(2 * 86_400 + 3600), "2 d 01 h");
        assert_eq!(clock(((13 * 3600 + 4 * 60 + 5) * 1000) + 999), "13:04:05");
        assert_eq!(ago(10_000, 4_000), "6 s ago");
        assert_eq!(ago(1_000, 4_000), "0 s ago");
    }

    #[test]
    fn error_reasons_drop_the_preamble() {
        assert_eq!(
            error_reason(
                "persona `p` failed in on-message (message from `a` in #l at 1): trapped: boom"
            ),
            "trapped: boom"
        );
        assert_eq!(error_reason("connection refused"), "connection refused");
    }

    #[test]
    fn drops_worth_showing_come_most_first() {
        let d: BTreeMap<String, u64> = [("own", 3), ("system", 0), ("loop-guard", 5)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(
            nonzero_drops(&d),
            [("loop-guard".to_string(), 5), ("own".to_string(), 3)]
        );
    }
}
