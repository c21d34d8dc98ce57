//! The local nohumans-compatible chat server (`roost serve`, `roost dev`, tests).
//!
//! It implements docs/PROTOCOL.md in memory: registration, `x-api-key` REST calls,
//! rooms, history (`after` exclusive, ms or s; `limit` default 20, max 50,
//! newest first), and the WebSocket at `/ws?key=KEY` with `connected`,
//! `join`/`send` (per connection) and the echo of a sender's own messages.
//!
//! Differences from the real network, on purpose:
//! - a room keeps [`ServerConfig::room_capacity`] messages (default 50; the
//!   reference says "about 20") for [`ServerConfig::retention`] (default 1 h);
//! - timestamps are strictly increasing per room (ms, bumped by 1 on a tie),
//!   so `after=` is unambiguous;
//! - the echo is immediate (the real network echoes after about 60 ms);
//! - a `leave` frame is understood; a REST `join` also creates unknown rooms.
//!
//! Everything the server knows lives in a [`ServerState`]; a second server
//! started on the same port with [`spawn_with_state`] continues where a shut
//! down one stopped ("server killed and restarted"). [`Faults`] injects
//! failures that really happen on the wire: dropped, stalled or closed
//! connections, bad frames, refused upgrades and registrations, revoked keys;
//! history answering 5xx, 403, 429 or slowly; REST timestamps in seconds or
//! ISO-8601 strings; text rewritten by the server; 429 on REST sends,
//! `rate_limited` and `not_joined` error frames on WebSocket sends. Faults
//! belong to one server instance (a restarted server starts without them);
//! switchable ones last a [`FaultSpan`]. Anything timed (stalls, refusing
//! upgrades, spans) uses `tokio::time`; stored timestamps use the system clock
//! (see [`ServerState::skew_clock`]).
//!
//! ```
//! use roost::devserver::{self, ServerConfig};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! let server = devserver::spawn("127.0.0.1:0".parse()?, ServerConfig::default()).await?;
//! // Register without HTTP (or POST {base_url}/api/register).
//! let reg = server.state().register("rook", "a test bot")?;
//! let ws_url = format!("{}?key={}", server.ws_url(), reg.key.expose());
//! assert!(ws_url.starts_with("ws://127.0.0.1:"));
//! // Say something as anyone, without a socket.
//! server.state().post_message("ghost", "lobby", "boo")?;
//! // Fault injection.
//! server.faults().fail_registrations(2); // next two registrations: 503 + HTML
//! server.faults().stall(Duration::from_millis(10));
//! // "Kill" the server and start it again on the same port with the same state.
//! let (addr, state) = (server.addr(), server.state());
//! server.shutdown().await;
//! let again = devserver::spawn_with_state(addr, state).await?;
//! assert_eq!(again.state().agent_for_key(reg.key.expose()).as_deref(), Some("rook"));
//! again.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod http;
mod state;
mod ws;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::ws::Utf8Bytes;
use axum::serve::ListenerExt;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use crate::protocol::RoomListShape;
pub use state::{PostError, RegisterError, Registration, ServerEvent, ServerState};

use state::Outbound;

/// How long [`DevServer::shutdown`] waits for in-flight HTTP requests and sockets.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Settings of a local chat server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Messages older than this disappear from history (default 1 hour).
    pub retention: Duration,
    /// Messages each room keeps (default 50).
    pub room_capacity: usize,
    /// Rooms that exist from the start: (name, description). Default: the six
    /// rooms of the recorded corpus, `lobby` first.
    pub rooms: Vec<(String, String)>,
    /// How `GET /api/rooms` answers (default: objects).
    pub room_list_shape: RoomListShape,
    /// Longest accepted message text in bytes (default 16 KiB).
    pub max_text_len: usize,
    /// Frames queued per connection before it is dropped as too slow (default 1024).
    pub outbox_capacity: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let rooms = [
            ("lobby", "Where everyone arrives"),
            ("philosophy", "Minds, machines and meaning"),
            ("builders", "What are you building?"),
            ("debug", "Things that broke"),
            ("shitpost", "Low effort, high spirits"),
            ("agent-creativity", "Stories, poems, art"),
        ];
        Self {
            retention: Duration::from_secs(3600),
            room_capacity: 50,
            rooms: rooms
                .iter()
                .map(|(n, d)| ((*n).to_owned(), (*d).to_owned()))
                .collect(),
            room_list_shape: RoomListShape::Objects,
            max_text_len: 16 * 1024,
            outbox_capacity: 1024,
        }
    }
}

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// Per-server-instance switches (faults, stall, shutdown bookkeeping).
pub(crate) struct Instance {
    pub id: u64,
    /// Stalled until this instant (`None`: not stalled).
    pub stall: watch::Sender<Option<Instant>>,
    reject_upgrades_until: Mutex<Option<Instant>>,
    pub fail_503: AtomicU32,
    pub fail_409: AtomicU32,
    pub closed: AtomicBool,
    /// WebSocket tasks alive (including ones not yet started).
    pub live: AtomicUsize,
    pub idle: Notify,
    /// How `GET /api/rooms/:room/messages` misbehaves.
    pub history: FaultSlot<HistoryFault>,
    /// `POST /api/rooms/:room/messages` answers 429 with this Retry-After.
    pub rest_send_limit: FaultSlot<Duration>,
    /// WebSocket `send` frames get a `rate_limited` error frame with this retry_after.
    pub ws_send_limit: FaultSlot<Duration>,
    /// [`RestTimestamps`] as a number.
    rest_timestamps: AtomicU8,
    /// Collapse whitespace in text clients send before storing it.
    pub rewrite_text: AtomicBool,
}

impl Instance {
    fn new() -> Self {
        Self {
            id: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            stall: watch::Sender::new(None),
            reject_upgrades_until: Mutex::new(None),
            fail_503: AtomicU32::new(0),
            fail_409: AtomicU32::new(0),
            closed: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            idle: Notify::new(),
            history: FaultSlot::default(),
            rest_send_limit: FaultSlot::default(),
            ws_send_limit: FaultSlot::default(),
            rest_timestamps: AtomicU8::new(RestTimestamps::Millis as u8),
            rewrite_text: AtomicBool::new(false),
        }
    }

    /// How REST bodies carry message timestamps right now.
    pub(crate) fn rest_timestamps(&self) -> RestTimestamps {
        match self.rest_timestamps.load(Ordering::Relaxed) {
            1 => RestTimestamps::Seconds,
            2 => RestTimestamps::Iso8601,
            _ => RestTimestamps::Millis,
        }
    }

    /// `text` as this server stores it (whitespace collapsed while rewriting).
    pub(crate) fn rewrite(&self, text: String) -> String {
        if self.rewrite_text.load(Ordering::Relaxed) {
            text.split_whitespace().collect::<Vec<_>>().join(" ")
        } else {
            text
        }
    }

    pub(crate) fn rejecting_upgrades(&self) -> bool {
        let until = *self
            .reject_upgrades_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|u| Instant::now() < u)
    }
}

/// How long a fault switched on with a span lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultSpan {
    /// The next `n` requests (or frames) the fault applies to; `Next(0)` switches it off.
    Next(u32),
    /// Every request (or frame) it applies to for this long from now (tokio time).
    For(Duration),
    /// Until switched off (the fault's `clear_*` method or [`Faults::clear_all`]).
    UntilCleared,
}

/// What a history request gets instead of a plain answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HistoryFault {
    /// An error status (5xx, 403, ...).
    Status(u16),
    /// 429 with `Retry-After`.
    RateLimited(Duration),
    /// The right answer, taken when asked and delivered this much later.
    Slow(Duration),
}

/// How REST bodies carry message timestamps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RestTimestamps {
    /// Unix milliseconds, like WebSocket frames (the default).
    Millis = 0,
    /// Whole Unix seconds (rounded down).
    Seconds = 1,
    /// RFC 3339 / ISO-8601 strings in UTC with milliseconds (`2026-01-30T17:06:35.039Z`).
    Iso8601 = 2,
}

#[derive(Clone, Copy, Debug)]
enum Remaining {
    Count(u32),
    Until(Instant),
    Always,
}

/// One switchable fault: a value and how long it still applies.
pub(crate) struct FaultSlot<T> {
    slot: Mutex<Option<(T, Remaining)>>,
}

impl<T> Default for FaultSlot<T> {
    fn default() -> Self {
        Self {
            slot: Mutex::new(None),
        }
    }
}

impl<T: Clone> FaultSlot<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(T, Remaining)>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Switches the fault on for `span` (replacing what was there).
    pub(crate) fn set(&self, value: T, span: FaultSpan) {
        let remaining = match span {
            FaultSpan::Next(0) => {
                self.clear();
                return;
            }
            FaultSpan::Next(n) => Remaining::Count(n),
            FaultSpan::For(d) => Remaining::Until(Instant::now() + d),
            FaultSpan::UntilCleared => Remaining::Always,
        };
        *self.lock() = Some((value, remaining));
    }

    pub(crate) fn clear(&self) {
        *self.lock() = None;
    }

    /// The fault for one request, if it applies (uses up one of a `Next(n)`).
    pub(crate) fn take(&self) -> Option<T> {
        let mut guard = self.lock();
        let (value, remaining) = guard.as_mut()?;
        let value = value.clone();
        match remaining {
            Remaining::Count(n) => {
                *n -= 1;
                if *n == 0 {
                    *guard = None;
                }
            }
            Remaining::Until(until) => {
                if Instant::now() >= *until {
                    *guard = None;
                    return None;
                }
            }
            Remaining::Always => {}
        }
        Some(value)
    }
}

/// A cloneable handle for injecting failures into one running server. All
/// faults happen on the wire; the `send_*` ones go to every live connection
/// of this server and return how many connections got the frame.
#[derive(Clone)]
pub struct Faults {
    state: ServerState,
    inst: Arc<Instance>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("instance", &self.inst.id)
            .finish_non_exhaustive()
    }
}

impl Faults {
    /// Drops every live connection abruptly: the TCP connection closes with no
    /// WebSocket close frame. Returns how many.
    pub fn drop_connections(&self) -> usize {
        self.state.abort_conns(self.inst.id)
    }

    /// Closes every live connection with a close frame of `code` and `reason`
    /// (the reason is cut to 123 bytes). Returns how many.
    pub fn close_connections(&self, code: u16, reason: &str) -> usize {
        self.state
            .send_to_all(Some(self.inst.id), || Outbound::Close {
                code,
                reason: reason.to_owned(),
            })
    }

    /// Stalls the server for `duration`: nothing is sent to clients, pings are
    /// not answered, client frames and HTTP requests wait. Extends, never
    /// shortens, a running stall.
    pub fn stall(&self, duration: Duration) {
        let until = Instant::now() + duration;
        self.inst.stall.send_modify(|d| {
            *d = Some(d.map_or(until, |old| old.max(until)));
        });
    }

    /// Ends a stall now.
    pub fn end_stall(&self) {
        self.inst.stall.send_replace(None);
    }

    pub fn is_stalled(&self) -> bool {
        self.inst.stall.borrow().is_some_and(|d| Instant::now() < d)
    }

    /// The next `n` registrations get 503 with an HTML body.
    pub fn fail_registrations(&self, n: u32) {
        self.inst.fail_503.store(n, Ordering::SeqCst);
    }

    /// The next `n` (well-formed) registrations get 409 as if the name were taken.
    pub fn conflict_registrations(&self, n: u32) {
        self.inst.fail_409.store(n, Ordering::SeqCst);
    }

    /// Revokes `agent`'s key: its next REST call or connect gets 401. Live
    /// sockets stay open. Returns whether the agent had a key.
    pub fn revoke_key(&self, agent: &str) -> bool {
        self.state.revoke_key(agent)
    }

    /// Sends an arbitrary text frame to every connection.
    pub fn send_raw(&self, text: impl Into<String>) -> usize {
        let frame = Utf8Bytes::from(text.into());
        self.state
            .send_to_all(Some(self.inst.id), || Outbound::Text(frame.clone()))
    }

    /// Sends a frame that is not valid JSON.
    pub fn send_malformed(&self) -> usize {
        self.send_raw(r#"{"type":"message","room":"lobby","from":"sys"#)
    }

    /// Sends a well-formed frame of a type no client knows.
    pub fn send_unknown_type(&self) -> usize {
        self.send_raw(
            json!({"type": "typing", "room": "lobby", "agent": "someone", "until": self.state.now_ms() + 3000})
                .to_string(),
        )
    }

    /// Sends a valid `message` frame (from `system`, in `lobby`, not stored)
    /// carrying fields no client knows.
    pub fn send_unknown_fields(&self) -> usize {
        self.send_raw(
            json!({
                "type": "message",
                "room": "lobby",
                "from": "system",
                "text": "frame with unknown fields",
                "timestamp": self.state.now_ms(),
                "id": "msg_0000",
                "reactions": [{"emoji": "\u{26a1}", "count": 2}],
                "meta": {"nested": {"deeper": true}},
            })
            .to_string(),
        )
    }

    /// Sends one text frame of at least `len` bytes: a syntactically valid
    /// `message` frame whose text is padding (e.g. `16 << 20` for 16 MiB).
    pub fn send_oversized(&self, len: usize) -> usize {
        let mut text = String::with_capacity(len + 128);
        text.push_str(r#"{"type":"message","room":"lobby","from":"system","timestamp":1,"text":""#);
        let pad = len.saturating_sub(text.len() + 2);
        text.extend(std::iter::repeat_n('x', pad));
        text.push_str("\"}");
        self.send_raw(text)
    }

    /// Refuses WebSocket upgrades with 503 for `duration` (REST keeps working).
    pub fn reject_upgrades(&self, duration: Duration) {
        let mut until = self
            .inst
            .reject_upgrades_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *until = Some(Instant::now() + duration);
    }

    /// Accepts WebSocket upgrades again.
    pub fn accept_upgrades(&self) {
        *self
            .inst
            .reject_upgrades_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// History (`GET /api/rooms/:room/messages`) answers `status` for `span`
    /// instead of messages: 502, 503 and 504 with a proxy's HTML outage page,
    /// any other status with a JSON `{"error", "code"}` body (`forbidden` for
    /// 403, `rate_limited` for 429, `server_error` for other 5xx, `error`
    /// otherwise). Other REST calls and the WebSocket keep working. Replaces
    /// any other history fault. For 429 with `Retry-After` see
    /// [`rate_limit_history`](Self::rate_limit_history).
    pub fn fail_history(&self, status: u16, span: FaultSpan) {
        self.inst.history.set(HistoryFault::Status(status), span);
    }

    /// History answers 403 `{"error", "code": "forbidden"}` for `span`, while
    /// the same key keeps working everywhere else (a key that is valid, so not
    /// a reason to register again). Replaces any other history fault.
    pub fn forbid_history(&self, span: FaultSpan) {
        self.fail_history(403, span);
    }

    /// History answers 429 for `span`, with `Retry-After` in whole seconds
    /// (`retry_after` rounded up, at least 1) and a JSON body
    /// `{"error", "code": "rate_limited", "retry_after": N}`. Replaces any
    /// other history fault.
    pub fn rate_limit_history(&self, retry_after: Duration, span: FaultSpan) {
        self.inst
            .history
            .set(HistoryFault::RateLimited(retry_after), span);
    }

    /// History answers correctly but slowly for `span`: the messages are taken
    /// when the request arrives and the answer is sent `delay` later (tokio
    /// time), so anything posted meanwhile is missing from it. Replaces any
    /// other history fault.
    pub fn slow_history(&self, delay: Duration, span: FaultSpan) {
        self.inst.history.set(HistoryFault::Slow(delay), span);
    }

    /// History answers normally again.
    pub fn clear_history_faults(&self) {
        self.inst.history.clear();
    }

    /// While `on`, REST bodies carrying messages (history and the answer to a
    /// REST send) give `timestamp` in whole Unix seconds (rounded down)
    /// instead of milliseconds; WebSocket frames keep milliseconds. Switching
    /// it on switches [`rest_timestamps_iso8601`](Self::rest_timestamps_iso8601)
    /// off; off means milliseconds.
    pub fn rest_timestamps_in_seconds(&self, on: bool) {
        self.set_rest_timestamps(RestTimestamps::Seconds, on);
    }

    /// While `on`, REST bodies carrying messages give `timestamp` as an
    /// ISO-8601 / RFC 3339 string in UTC with milliseconds
    /// (`2026-01-30T17:06:35.039Z`); WebSocket frames keep milliseconds.
    /// Switching it on switches
    /// [`rest_timestamps_in_seconds`](Self::rest_timestamps_in_seconds) off;
    /// off means milliseconds.
    pub fn rest_timestamps_iso8601(&self, on: bool) {
        self.set_rest_timestamps(RestTimestamps::Iso8601, on);
    }

    fn set_rest_timestamps(&self, format: RestTimestamps, on: bool) {
        let cell = &self.inst.rest_timestamps;
        if on {
            cell.store(format as u8, Ordering::Relaxed);
        } else {
            // Off only if this format is the one on.
            let _ = cell.compare_exchange(
                format as u8,
                RestTimestamps::Millis as u8,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// While `on`, the server rewrites the text clients send (WebSocket
    /// `send` and REST sends) before storing and broadcasting it: runs of
    /// whitespace (newlines included) become one space, leading and trailing
    /// whitespace goes. The sender's echo and history carry the rewritten
    /// text. Messages posted with [`ServerState::post_message`] are stored as
    /// given.
    pub fn rewrite_text(&self, on: bool) {
        self.inst.rewrite_text.store(on, Ordering::Relaxed);
    }

    /// REST sends (`POST /api/rooms/:room/messages`) answer 429 for `span`,
    /// with `Retry-After` in whole seconds (rounded up, at least 1) and a JSON
    /// body `{"error", "code": "rate_limited", "retry_after": N}`; nothing is
    /// stored.
    pub fn rate_limit_rest_sends(&self, retry_after: Duration, span: FaultSpan) {
        self.inst.rest_send_limit.set(retry_after, span);
    }

    /// WebSocket `send` frames are refused for `span`: the connection gets
    /// `{"type": "error", "error": "...", "code": "rate_limited",
    /// "retry_after": N}` (N whole seconds, rounded up, at least 1; the
    /// message also says it) and nothing is stored or echoed. The connection
    /// stays open; joins still work.
    pub fn rate_limit_ws_sends(&self, retry_after: Duration, span: FaultSpan) {
        self.inst.ws_send_limit.set(retry_after, span);
    }

    /// The server forgets which rooms every live connection has joined, as a
    /// server that lost its per-connection state would (no leave line is
    /// posted). The next WebSocket `send` from such a connection gets
    /// `{"type": "error", "code": "not_joined", ...}` and stores nothing
    /// (what a send before any `join` always gets), until it joins again.
    /// Returns how many connections had joined rooms.
    pub fn forget_joins(&self) -> usize {
        self.state.forget_joins(self.inst.id)
    }

    /// Switches every fault of this server off: stall, refused upgrades,
    /// registration failures, history faults, timestamp formats, text
    /// rewriting and send rate limits. Revoked keys stay revoked.
    pub fn clear_all(&self) {
        self.end_stall();
        self.accept_upgrades();
        self.inst.fail_503.store(0, Ordering::SeqCst);
        self.inst.fail_409.store(0, Ordering::SeqCst);
        self.clear_history_faults();
        self.inst
            .rest_timestamps
            .store(RestTimestamps::Millis as u8, Ordering::Relaxed);
        self.rewrite_text(false);
        self.inst.rest_send_limit.clear();
        self.inst.ws_send_limit.clear();
    }
}

/// Whole seconds for a `Retry-After`: rounded up, at least 1.
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    d.as_millis()
        .div_ceil(1000)
        .max(1)
        .try_into()
        .unwrap_or(u64::MAX)
}

/// A running local chat server. Dropping it stops it without waiting; prefer
/// [`DevServer::shutdown`].
pub struct DevServer {
    addr: SocketAddr,
    state: ServerState,
    inst: Arc<Instance>,
    shutdown_tx: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DevServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Binds `listen` and serves a fresh server in a background task.
pub async fn spawn(listen: SocketAddr, config: ServerConfig) -> std::io::Result<DevServer> {
    spawn_with_state(listen, ServerState::new(config)).await
}

/// Binds `listen` and serves `state` (e.g. taken from a server that was shut
/// down, to simulate a restart on the same port).
pub async fn spawn_with_state(
    listen: SocketAddr,
    state: ServerState,
) -> std::io::Result<DevServer> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let inst = Arc::new(Instance::new());
    let app = http::router(http::Ctx {
        state: state.clone(),
        inst: inst.clone(),
    });
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        // Every frame goes out at once: without TCP_NODELAY a small frame waits for
        // the peer's delayed ACK (about 40 ms), which caps a bot at ~1,400 replies/s.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown_rx.await;
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "dev server stopped with an error");
        }
    });
    Ok(DevServer {
        addr,
        state,
        inst,
        shutdown_tx: Some(shutdown_tx),
        task: Some(task),
    })
}

/// Serves until `shutdown` completes (for `roost serve`); logs the address.
pub async fn serve(
    listen: SocketAddr,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let server = spawn(listen, config)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(
        address = %server.addr(),
        url = %server.base_url(),
        ws = %server.ws_url(),
        "local chat server listening"
    );
    shutdown.await;
    tracing::info!("local chat server shutting down");
    server.shutdown().await;
    Ok(())
}

impl DevServer {
    /// The bound address (the real port if `:0` was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT` (an unspecified listen IP becomes loopback).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.connect_addr())
    }

    /// `ws://IP:PORT/ws` (append `?key=KEY`).
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.connect_addr())
    }

    fn connect_addr(&self) -> SocketAddr {
        let mut addr = self.addr;
        match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => addr.set_ip(Ipv4Addr::LOCALHOST.into()),
            IpAddr::V6(ip) if ip.is_unspecified() => addr.set_ip(Ipv6Addr::LOCALHOST.into()),
            _ => {}
        }
        addr
    }

    pub fn faults(&self) -> Faults {
        Faults {
            state: self.state.clone(),
            inst: self.inst.clone(),
        }
    }

    /// The server's state; another handle to the same data.
    pub fn state(&self) -> ServerState {
        self.state.clone()
    }

    /// Live WebSocket connections of this server.
    pub fn connection_count(&self) -> usize {
        self.state.conn_count(Some(self.inst.id))
    }

    /// Stops accepting, drops every socket (no close frame, like a killed
    /// process), waits up to 5 s for in-flight HTTP requests, and returns once
    /// the port is free again.
    pub async fn shutdown(mut self) {
        self.begin_stop();
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
                abort.abort();
            }
        }
        let inst = self.inst.clone();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, async move {
            loop {
                let idle = inst.idle.notified();
                if inst.live.load(Ordering::SeqCst) == 0 {
                    break;
                }
                idle.await;
            }
        })
        .await;
    }

    fn begin_stop(&mut self) {
        self.inst.closed.store(true, Ordering::SeqCst);
        self.inst.stall.send_replace(None);
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
        self.state.abort_conns(self.inst.id);
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        if self.task.is_some() {
            self.begin_stop();
        }
    }
}
