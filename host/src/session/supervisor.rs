//! The session task: owns the socket, drives the state machine of `machine.rs`.
//!
//! One task per bot. Per connection it spawns a writer task (so a socket that stops
//! draining can never block the loop that reads frames, answers commands and watches for
//! a dead peer) and a recovery task (the history fetch). Messages reach the bot through
//! its bounded event stream ([`super::events`]), which never makes this task wait: a slow
//! bot only loses its oldest unread messages (counted), never keepalive.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::dedupe::{MessageKey, SeenSet};
use super::http::{Endpoints, error_chain, excerpt, redact};
use super::identity::{self, Identity, Registration};
use super::machine::{Disconnect, Ended, RetryPolicy, SessionState, plan_retry};
use super::outbox::Outbox;
use super::recovery::{self, FetchError, FetchParams, Recovered, RoomFetch};
use super::{Backoff, Command, SessionConfig, SessionEvent, Shared, StateSnapshot};
use crate::policy::{LimitKind, RateLimited, RateLimits};
use crate::protocol::{ChatMessage, ClientFrame, ServerFrame};
use crate::store::{RoomPosition, Store, now_ms};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Frames queued for the writer task per connection.
const OUT_QUEUE: usize = 1024;
/// Period of outbox expiry, flush retries and the healthy check while connected.
const HOUSEKEEPING: Duration = Duration::from_millis(250);
/// Period of outbox expiry while disconnected.
const OFFLINE_HOUSEKEEPING: Duration = Duration::from_secs(1);
/// Live messages held during a recovery beyond this are delivered unmerged.
const MAX_HELD: usize = 10_000;
/// How long a graceful close waits for the close frame to be written.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Initial read buffer and write batch of one WebSocket.
const WS_BUFFER_BYTES: usize = 4 * 1024;
/// Recovery positions are saved at most this often while messages flow (and at stop).
const POSITIONS_EVERY: Duration = Duration::from_secs(1);
/// A room that delivered a message this recently needs no member-list check: we were
/// in it a moment ago.
const PROOF_OF_MEMBERSHIP: Duration = Duration::from_secs(1);
/// Retries of a history request within one connection.
const HISTORY_RETRIES: u32 = 2;
/// Commands handled together before the outbox is flushed once for all of them.
const COMMAND_BATCH: usize = 64;
/// Frames the session takes from the socket in one turn of its loop, after the one
/// that woke it, when they are already there.
const FRAMES_PER_TURN: usize = 16;

/// Everything `spawn` hands to the task.
pub(super) struct Parts {
    pub config: SessionConfig,
    pub endpoints: Endpoints,
    pub store: Store,
    pub http: reqwest::Client,
    pub shared: Arc<Shared>,
    pub cmds: mpsc::UnboundedReceiver<Command>,
    pub outbox: Outbox,
}

#[derive(Debug)]
struct RoomState {
    /// Unix ms when the room was first joined in this run: recovery never replays
    /// anything older (what was said before the bot arrived is not "missed").
    since_ms: u64,
    /// The newest timestamp delivered from this room.
    last_ts: Option<u64>,
    /// From when on this connection's recovered history of the room is complete (None:
    /// not recovered yet on this connection, or it could not be fetched). An unconfirmed
    /// entry is re-sent only if this reaches back to its creation.
    checked_from: Option<u64>,
    /// `last_ts` changed since it was last saved.
    dirty: bool,
    /// When (our clock) the room last delivered a message: proof we were in it then.
    heard_at: Option<Instant>,
    /// The (`after_ms`, `have_until_ms`) of this room's recovery while it has not
    /// finished (set when one starts, cleared when one finishes). Once the session goes
    /// active before the history arrives, live messages move `last_ts` past the gap:
    /// a recovery started meanwhile fetches from here again, and the saved position
    /// stays here.
    gap: Option<(u64, u64)>,
    /// The same for a recovery that failed (the session went on without it): the next
    /// recovery in this run tries that gap again, so a mention in it is answered once the
    /// history answers (the saved position is not held back for it: after a restart
    /// such a gap stays a counted gap).
    unfetched: Option<(u64, u64)>,
    /// While `gap` is open: the (connection, first, last timestamp) of the messages
    /// heard live past it on one connection, every one of them handed over. Saved
    /// with the position held back at the gap, so a restart fetches the gap again
    /// without handing this run over twice. (A new connection starts a new run: what
    /// was said between the two is part of the gap.)
    live_past_gap: Option<(u64, u64, u64)>,
    /// The same run as saved by the previous start (it is not in this run's dedupe
    /// set): recovered messages within it are not handed over again. One run is kept
    /// per room: if this start also stops before its recovery finishes, after having
    /// heard messages live, its own run is saved instead.
    heard_before_restart: Option<(u64, u64)>,
}

impl RoomState {
    fn new(since_ms: u64, last_ts: Option<u64>, heard_before_restart: Option<(u64, u64)>) -> Self {
        RoomState {
            since_ms,
            last_ts,
            checked_from: None,
            dirty: false,
            heard_at: None,
            gap: None,
            unfetched: None,
            live_past_gap: None,
            heard_before_restart,
        }
    }

    /// The position to save: the newest timestamp handed over, or, while a recovery
    /// has not finished and live messages went past its gap, the gap's start with the
    /// live run (see [`RoomPosition`]).
    fn position(&self, room: &str) -> Option<RoomPosition> {
        let ts = self.last_ts?;
        let (last_ts, newest_run) = match self.gap {
            Some((_, until)) if until < ts => (
                until,
                self.live_past_gap.map(|(_, first, last)| (first, last)),
            ),
            _ => (ts, None),
        };
        let earlier_run = self.heard_before_restart.filter(|r| r.1 > last_ts);
        Some(RoomPosition {
            room: room.to_string(),
            last_ts,
            live: newest_run.or(earlier_run),
        })
    }

    /// A message handed to the bot: the position moves on (and, past an open gap,
    /// the live run on connection `conn` grows).
    fn delivered(&mut self, ts: u64, live: bool, conn: u64) {
        if live
            && let Some((_, until)) = self.gap
            && ts > until
        {
            self.live_past_gap = match self.live_past_gap {
                Some((c, first, last)) if c == conn => Some((c, first, last.max(ts))),
                _ => Some((conn, ts, ts)),
            };
        }
        let newest = self.last_ts.map_or(ts, |t| t.max(ts));
        if self.last_ts != Some(newest) {
            self.last_ts = Some(newest);
            self.dirty = true;
        }
    }

    /// The room's gap is closed (recovered, or given up as a counted gap).
    fn gap_closed(&mut self) {
        if let Some((_, until)) = self.gap.take()
            && self.last_ts.is_some_and(|t| t > until)
        {
            self.dirty = true; // the position held back at the gap moves on
        }
        self.live_past_gap = None;
    }
}

/// The state of one connection (see [`Supervisor::serve`]).
struct Conn {
    /// Which connection of this session (outbox entries remember where they went).
    seq: u64,
    identity: Identity,
    /// Frames for the writer task.
    out_tx: mpsc::Sender<Message>,
    /// Rooms joined on this connection.
    joined: HashSet<String>,
    /// Joins the server has not confirmed yet (recovery waits for them).
    unacked: HashSet<String>,
    recovery: Option<AbortOnDrop<Result<Vec<Recovered>, FetchError>>>,
    /// When the last frame of any kind arrived.
    last_life: Instant,
    dead_after: Duration,
    /// No frame until then: the peer is dead.
    dead_at: Instant,
    /// Recover anyway at this point, confirmed joins or not.
    ack_deadline: Instant,
    /// Since when the connection is active (recovered, or its recovery overdue; sending).
    active_since: Option<Instant>,
    /// A recovery still running then no longer holds live messages and replies back:
    /// the connection goes active and the recovered messages follow when they arrive.
    hold_until: Option<Instant>,
    /// Rooms joined again on this connection (the server had dropped us): what was
    /// missed in each is fetched once its join is confirmed (any message from the
    /// room, normally our own "joined" line), or at `catch_up_at` at the latest.
    rejoined: BTreeSet<String>,
    catch_up_at: Option<Instant>,
    /// Rooms whose join is confirmed, waiting for the running recovery to finish.
    catch_up_ready: BTreeSet<String>,
    /// The running member-list check: the rooms that no longer list us.
    membership: Option<AbortOnDrop<Vec<String>>>,
    /// Whether the running check asks about every quiet room (after one room was found
    /// missing) rather than the next one in turn.
    membership_full: bool,
    /// When each room's member list was last asked about on this connection.
    member_checked: HashMap<String, Instant>,
    /// When this connection's joins were last confirmed (it went active, or a room
    /// joined again answered): a member list fetched before cannot name us.
    joins_confirmed: Instant,
}

impl Conn {
    fn up_for(&self) -> Option<Duration> {
        self.active_since.map(|t| t.elapsed())
    }
}

/// What a text frame told the connection.
enum Heard {
    /// A chat message in this room (proof that the join landed).
    Room(String),
    /// The server says we are not in a room we think we are in.
    NotJoined,
    /// The server asks us to slow down (perhaps saying for how long).
    Throttled(Option<Duration>),
    Nothing,
}

/// Reads a server error frame: "not joined" and rate-limit errors call for action,
/// the rest are only logged. Matches the code and, for servers without codes, the
/// message. A frame's own retry hint (`retry_after`) makes it a throttle whatever it
/// says, and wins over a delay read from the message.
fn classify_error(code: Option<&str>, message: &str, hint: Option<Duration>) -> Heard {
    let code = code.unwrap_or("").to_ascii_lowercase();
    let message = message.to_ascii_lowercase();
    let says = |words: &[&str]| {
        words
            .iter()
            .any(|w| code.contains(w) || message.contains(w))
    };
    if says(&[
        "not_joined",
        "not joined",
        "join the room",
        "join it first",
        "join first",
    ]) {
        Heard::NotJoined
    } else if hint.is_some() {
        Heard::Throttled(hint)
    } else if says(&[
        "rate_limit",
        "rate limit",
        "rate-limit",
        "too_many",
        "too many",
        "slow down",
        "slow_down",
        "throttl",
    ]) {
        // "retry after N" in seconds, when the message says so.
        let retry = message
            .split(|c: char| !c.is_ascii_alphanumeric() && c != '.')
            .skip_while(|w| *w != "after" && *w != "in")
            .nth(1)
            .and_then(|n| n.parse::<f64>().ok())
            .filter(|n| n.is_finite() && *n >= 0.0 && *n < 3600.0)
            .map(Duration::from_secs_f64);
        Heard::Throttled(retry)
    } else {
        Heard::Nothing
    }
}

enum ConnEnd {
    Shutdown,
    Fatal(String),
    Lost {
        cause: Disconnect,
        up_for: Option<Duration>,
    },
}

fn lost(cause: Disconnect, up_for: Option<Duration>) -> ConnEnd {
    ConnEnd::Lost { cause, up_for }
}

/// Aborts a task when dropped (every exit path of a connection cleans up its tasks).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Publishes `Stopped` however the task ends (return, panic, runtime shutdown).
struct StoppedGuard(Arc<Shared>);

impl Drop for StoppedGuard {
    fn drop(&mut self) {
        publish_state(&self.0, SessionState::Stopped);
        self.0.events.close();
    }
}

/// Records a state and notifies watchers; returns false if it was already the state.
fn publish_state(shared: &Shared, state: SessionState) -> bool {
    {
        let mut st = shared.status();
        if st.state == state {
            return false;
        }
        st.state = state;
        if state != SessionState::Active {
            st.active_since = None;
        }
    }
    shared.state_tx.send_replace(StateSnapshot {
        state,
        connections: shared.connections.load(Ordering::Relaxed),
    });
    shared.events.push(SessionEvent::State(state));
    true
}

pub(super) struct Supervisor {
    cfg: SessionConfig,
    endpoints: Endpoints,
    store: Store,
    http: reqwest::Client,
    shared: Arc<Shared>,
    cmds: mpsc::UnboundedReceiver<Command>,
    outbox: Outbox,
    rng: StdRng,
    identity: Option<Identity>,
    /// Names that are "us" in echoes (the registered name, the name in `connected`, and
    /// earlier names of this run after a re-registration).
    own_names: Vec<String>,
    previous_name: Option<String>,
    rooms: BTreeMap<String, RoomState>,
    seen: SeenSet,
    /// Live messages received while a recovery is running.
    held: Vec<ChatMessage>,
    /// Failed attempts since the last healthy connection.
    attempt: u32,
    /// Since when the bot has been without an active connection (meaningful while it
    /// is): the session's start, or when the last active connection ended.
    away_since: Instant,
    /// Re-registered since the last healthy connection.
    reregistered: bool,
    /// When the server last told us to slow down by ending a connection.
    last_slow_down: Option<Instant>,
    /// The stored key was rejected: register again before the next connect.
    force_register: bool,
    /// The key is in doubt: check it before the next connect.
    verify_key: bool,
    /// Shutdown requested; the flush deadline.
    stopping: Option<Instant>,
    conn_seq: u64,
    /// The rate limits sends are paced to (`SessionConfig::pacing`).
    limits: Option<RateLimits>,
    /// When the rate limits next let a held-back entry go.
    next_due: Option<Instant>,
    /// When the recovery positions were last saved.
    positions_saved: Instant,
}

impl Supervisor {
    pub(super) fn new(parts: Parts) -> Self {
        let rng = match parts.config.rng_seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let now = now_u64();
        // Where each room was left at the last stop: messages posted while roost was
        // stopped (within the retention) are recovered once after this start.
        let retention = u64::try_from(parts.config.retention.as_millis()).unwrap_or(u64::MAX);
        // Positions are server timestamps: one a little ahead of our clock (the
        // server's runs ahead, or it stamps a burst one millisecond apart) is kept;
        // one further ahead than the allowed skew is not believed.
        let skew = u64::try_from(parts.config.clock_skew.as_millis()).unwrap_or(u64::MAX);
        let saved: HashMap<String, RoomPosition> = parts
            .store
            .room_positions(parts.config.persona_id())
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read recovery positions; starting from now");
                Vec::new()
            })
            .into_iter()
            .filter(|p| {
                p.last_ts >= now.saturating_sub(retention) && p.last_ts <= now.saturating_add(skew)
            })
            .map(|p| (p.room.clone(), p))
            .collect();
        let rooms = parts
            .config
            .rooms
            .iter()
            .map(|r| {
                let saved = saved.get(r);
                let last = saved.map(|p| p.last_ts);
                // Up to and including the saved position was delivered before the
                // stop, and so was its live run (this run's dedupe set knows neither).
                let state = RoomState::new(
                    last.map_or(now, |t| t.saturating_add(1)),
                    last,
                    saved.and_then(|p| p.live),
                );
                (r.clone(), state)
            })
            .collect();
        let seen = SeenSet::new(parts.config.seen_capacity);
        let limits = parts.config.pacing.as_ref().and_then(|cfg| {
            RateLimits::new(cfg, crate::policy::Clock::real())
                .map_err(|e| tracing::error!(error = %e, "pacing is off: invalid limits"))
                .ok()
        });
        Supervisor {
            limits,
            next_due: None,
            positions_saved: Instant::now(),
            cfg: parts.config,
            endpoints: parts.endpoints,
            store: parts.store,
            http: parts.http,
            shared: parts.shared,
            cmds: parts.cmds,
            outbox: parts.outbox,
            rng,
            identity: None,
            own_names: Vec::new(),
            previous_name: None,
            rooms,
            seen,
            held: Vec::new(),
            attempt: 0,
            away_since: Instant::now(),
            last_slow_down: None,
            reregistered: false,
            force_register: false,
            verify_key: false,
            stopping: None,
            conn_seq: 0,
        }
    }

    fn bot(&self) -> &str {
        &self.shared.bot
    }

    fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            backoff: self.cfg.backoff,
            rate_limit_backoff: self.cfg.rate_limit_backoff,
        }
    }

    fn redact(&self, text: &str) -> String {
        redact(text, self.identity.as_ref().map(|i| &i.key))
    }

    pub(super) async fn run(mut self) {
        let _stopped = StoppedGuard(self.shared.clone());
        tracing::info!(
            bot = self.bot(),
            server = self.endpoints.base(),
            rooms = ?self.rooms.keys().collect::<Vec<_>>(),
            outbox = self.outbox.depth(),
            "session starting"
        );
        self.update_depth();
        loop {
            if self.stopping.is_some() {
                break;
            }
            self.set_state(SessionState::Connecting);
            match self.connection().await {
                ConnEnd::Shutdown => break,
                ConnEnd::Fatal(msg) => {
                    tracing::error!(bot = self.bot(), error = %msg, "session stopped: unrecoverable configuration error");
                    self.set_error(msg);
                    break;
                }
                ConnEnd::Lost { cause, up_for } => {
                    if self.stopping.is_some() {
                        break;
                    }
                    if up_for.is_some() {
                        self.away_since = Instant::now();
                    }
                    let policy = self.policy();
                    let slow_down = cause.next() == super::machine::Next::SlowDown;
                    let slowed_recently = self
                        .last_slow_down
                        .is_some_and(|t| t.elapsed() < super::machine::SLOW_DOWN_MEMORY);
                    let ended = Ended {
                        attempt: self.attempt,
                        up_for,
                        away_for: self.away_since.elapsed(),
                        next: cause.next(),
                        reregistered: self.reregistered,
                        slowed_recently,
                    };
                    let retry = plan_retry(&policy, &ended, &mut self.rng);
                    if slow_down {
                        self.last_slow_down = Some(Instant::now());
                        self.shared.throttles.fetch_add(1, Ordering::Relaxed);
                        // A single slow-down close of an active connection is one fault:
                        // the reconnect is the pause. A repeated one (or a refusal before
                        // the connection became active) pauses replies too, for as long
                        // as we stay away at least.
                        if slowed_recently || up_for.is_none() {
                            if let Some(limits) = &mut self.limits {
                                limits.on_server_throttle(Some(retry.delay));
                            }
                            self.shared.events.push(SessionEvent::Throttled {
                                retry_after: Some(retry.delay),
                            });
                        }
                    }
                    if retry.reregister {
                        self.force_register = true;
                        self.reregistered = true;
                    }
                    if retry.verify_key {
                        self.verify_key = true;
                    }
                    self.attempt = retry.attempt;
                    let error = self.redact(&cause.to_string());
                    self.set_error(error.clone());
                    self.set_state(SessionState::Disconnected {
                        attempt: retry.attempt,
                    });
                    tracing::warn!(
                        bot = self.bot(),
                        error = %error,
                        attempt = retry.attempt,
                        delay_ms = retry.delay.as_millis() as u64,
                        reregister = retry.reregister,
                        "disconnected; will reconnect"
                    );
                    if self.race(tokio::time::sleep(retry.delay)).await.is_none() {
                        break;
                    }
                }
            }
        }
        self.save_positions();
        self.set_state(SessionState::Stopped);
        tracing::info!(
            bot = self.bot(),
            outbox = self.outbox.depth(),
            "session stopped"
        );
    }

    // ---- status ----------------------------------------------------------------------

    fn set_state(&self, state: SessionState) {
        if !publish_state(&self.shared, state) {
            return;
        }
        let s = &self.shared;
        let (name, last_error) = {
            let st = s.status();
            (st.name.clone(), st.last_error.clone())
        };
        tracing::info!(
            bot = self.bot(),
            state = %state,
            name = name.as_deref().unwrap_or(""),
            uptime_s = s.started.elapsed().as_secs(),
            reconnects = s.connections.load(Ordering::Relaxed).saturating_sub(1),
            last_error = last_error.as_deref().unwrap_or(""),
            messages_in = s.messages_in.load(Ordering::Relaxed),
            messages_out = s.messages_out.load(Ordering::Relaxed),
            outbox_depth = self.outbox.depth(),
            "session state"
        );
    }

    fn set_error(&self, error: String) {
        self.shared.status().last_error = Some(error);
    }

    fn update_depth(&self) {
        self.shared
            .outbox_depth
            .store(self.outbox.depth(), Ordering::Relaxed);
    }

    // ---- commands and waiting while not connected ------------------------------------

    /// Runs `fut` while answering commands. `None`: shutdown was requested.
    async fn race<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        let mut tick = tokio::time::interval(OFFLINE_HOUSEKEEPING);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return Some(out),
                cmd = self.cmds.recv() => {
                    if !self.command_offline(cmd) {
                        return None;
                    }
                }
                _ = tick.tick() => self.expire_outbox(),
            }
        }
    }

    /// Handles a command while there is no connection; false means stop.
    fn command_offline(&mut self, cmd: Option<Command>) -> bool {
        match cmd {
            None | Some(Command::Shutdown) => {
                self.stopping = Some(Instant::now());
                false
            }
            Some(Command::Enqueued { entry, handed }) => {
                self.enqueued(entry, handed);
                true
            }
            Some(Command::Join(room)) => {
                self.add_room(room);
                true
            }
            Some(Command::Leave(room)) => {
                self.remove_room(&room);
                true
            }
        }
    }

    fn add_room(&mut self, room: String) {
        self.rooms
            .entry(room)
            .or_insert_with(|| RoomState::new(now_u64(), None, None));
    }

    fn remove_room(&mut self, room: &str) {
        self.rooms.remove(room);
        self.store.forget_room_position(&self.shared.bot, room);
        for entry in self.outbox.cancel_room(room) {
            tracing::warn!(
                bot = self.bot(),
                room = %entry.room,
                id = %entry.id,
                reason = "left the room",
                "outbox entry dropped"
            );
        }
        self.update_depth();
    }

    /// A reply whose row is committed: into the outbox. What it answers is behind us,
    /// so the recovery position is saved with it: a host killed right after sending
    /// does not answer the same mention again after its restart.
    fn enqueued(&mut self, entry: crate::store::OutboxEntry, handed: bool) {
        self.outbox.add_handed(entry, handed);
        self.shared
            .outbox_committing
            .fetch_sub(1, Ordering::Relaxed);
        self.update_depth();
        self.save_positions();
    }

    /// Saves the recovery position of every room that moved (in the next group commit).
    fn save_positions(&mut self) {
        let moved: Vec<RoomPosition> = self
            .rooms
            .iter_mut()
            .filter(|(_, st)| st.dirty)
            .filter_map(|(room, st)| {
                let at = st.position(room)?;
                // Not past a gap still being recovered: its start (and the live run)
                // now, the rest once it is recovered.
                st.dirty = false;
                Some(at)
            })
            .collect();
        if !moved.is_empty() {
            self.store.save_room_positions(&self.shared.bot, moved);
        }
        self.positions_saved = Instant::now();
    }

    fn expire_outbox(&mut self) {
        let ttl = i64::try_from(self.cfg.outbox_ttl.as_millis()).unwrap_or(i64::MAX);
        let now = now_ms();
        if let Some(limits) = &self.limits {
            let max_wait = i64::try_from(limits.max_wait().as_millis()).unwrap_or(i64::MAX);
            let stale = self.outbox.expire_paced(now, max_wait);
            for entry in &stale {
                tracing::warn!(
                    bot = self.bot(),
                    room = %entry.room,
                    id = %entry.id,
                    waited_s = (now - entry.created_at) / 1000,
                    reason = "stale: waited too long for its rate-limit slot",
                    "outbox entry dropped"
                );
            }
            if !stale.is_empty() {
                self.shared
                    .pacing
                    .stale
                    .fetch_add(stale.len() as u64, Ordering::Relaxed);
                self.update_depth();
            }
        }
        let stale = self.outbox.expire(now, ttl);
        if stale.is_empty() {
            return;
        }
        for entry in &stale {
            tracing::warn!(
                bot = self.bot(),
                room = %entry.room,
                id = %entry.id,
                age_s = (now - entry.created_at) / 1000,
                attempts = entry.attempts,
                reason = if entry.attempts == 0 { "stale: never sent" } else { "stale: never confirmed" },
                "outbox entry dropped"
            );
        }
        self.shared
            .outbox_stale
            .fetch_add(stale.len() as u64, Ordering::Relaxed);
        self.update_depth();
    }

    // ---- one connection ------------------------------------------------------------------

    async fn connection(&mut self) -> ConnEnd {
        self.expire_outbox();
        let identity = match self.identity().await {
            Ok(identity) => identity,
            Err(end) => return end,
        };
        let url = self.endpoints.websocket(&identity.key).to_string();
        // Small buffers that grow only while a large frame is in flight: thousands of
        // mostly idle bots per process (tungstenite's defaults are 128 KiB each way).
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(self.cfg.max_frame_bytes))
            .max_frame_size(Some(self.cfg.max_frame_bytes))
            .read_buffer_size(WS_BUFFER_BYTES)
            .write_buffer_size(WS_BUFFER_BYTES);
        let connect = tokio::time::timeout(
            self.cfg.connect_timeout,
            tokio_tungstenite::connect_async_with_config(url, Some(ws_config), true),
        );
        let ws = match self.race(connect).await {
            None => return ConnEnd::Shutdown,
            Some(Err(_elapsed)) => return lost(Disconnect::ConnectTimeout, None),
            Some(Ok(Err(tungstenite::Error::Http(resp)))) => {
                return lost(Disconnect::HandshakeStatus(resp.status().as_u16()), None);
            }
            Some(Ok(Err(e))) => return lost(Disconnect::Io(self.redact(&error_chain(&e))), None),
            Some(Ok(Ok((ws, _response)))) => ws,
        };
        self.serve(ws, identity).await
    }

    /// The identity to connect with: in memory, else stored, else registered. A key in
    /// doubt is checked first; a confirmed-rejected key is replaced by a new
    /// registration, within the daily cap, and stays stored until the new one is.
    async fn identity(&mut self) -> Result<Identity, ConnEnd> {
        let persona = self.cfg.persona_id().to_string();
        if self.verify_key {
            self.verify_key = false;
            if let Some(current) = self.identity.clone() {
                let (http, endpoints, timeout) = (
                    self.http.clone(),
                    self.endpoints.clone(),
                    self.cfg.request_timeout,
                );
                let key = current.key.clone();
                let check =
                    async move { identity::check_key(&http, &endpoints, &key, timeout).await };
                match self.race(check).await {
                    None => return Err(ConnEnd::Shutdown),
                    Some(identity::KeyCheck::Rejected) => {
                        tracing::warn!(bot = self.bot(), name = %current.name, "the server confirmed the API key is rejected (401)");
                        self.force_register = true;
                    }
                    Some(other) => {
                        tracing::info!(bot = self.bot(), name = %current.name, check = ?other, "the API key was questioned but not confirmed rejected; keeping it");
                    }
                }
            }
        }
        if self.force_register {
            let day_ago = now_ms() - 86_400_000;
            let recent = self
                .store
                .registrations_since(self.endpoints.base(), &persona, day_ago)
                .unwrap_or(0);
            if recent >= u64::from(self.cfg.max_reregistrations_per_day) {
                self.shared
                    .reregistrations_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    bot = self.bot(),
                    recent,
                    cap = self.cfg.max_reregistrations_per_day,
                    "the API key is rejected, but this persona re-registered {recent} times in the last 24 h \
                     (cap session.max_reregistrations_per_day): keeping the old identity and retrying later"
                );
                return Err(lost(
                    Disconnect::Transient("re-registration cap reached".into()),
                    None,
                ));
            }
            if let Some(old) = &self.identity {
                tracing::warn!(bot = self.bot(), name = %old.name, "API key rejected; registering again");
                self.previous_name = Some(old.name.clone());
            }
        } else if let Some(identity) = &self.identity {
            return Ok(identity.clone());
        } else {
            match identity::load(&self.store, &self.endpoints, &persona) {
                Ok(Some(identity)) => {
                    tracing::info!(bot = self.bot(), name = %identity.name, "using stored identity");
                    self.adopt(identity.clone());
                    return Ok(identity);
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(lost(
                        Disconnect::Transient(format!("cannot read credentials: {e}")),
                        None,
                    ));
                }
            }
        }
        let reg = Registration {
            base_name: self.cfg.name.clone(),
            first_try: self
                .previous_name
                .clone()
                .unwrap_or_else(|| self.cfg.name.clone()),
            description: self.cfg.description.clone(),
            max_tries: self.cfg.max_name_attempts,
            timeout: self.cfg.request_timeout,
        };
        let (http, endpoints, store) = (
            self.http.clone(),
            self.endpoints.clone(),
            self.store.clone(),
        );
        let mut rng = StdRng::seed_from_u64(self.rng.random());
        let register = async move {
            identity::register(&http, &endpoints, &store, &persona, &reg, &mut rng).await
        };
        match self.race(register).await {
            None => Err(ConnEnd::Shutdown),
            Some(Ok(identity)) => {
                if self.force_register {
                    self.shared.reregistrations.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = self.store.record_registration(
                        self.endpoints.base(),
                        self.cfg.persona_id(),
                        now_ms(),
                    ) {
                        tracing::error!(bot = self.bot(), error = %e, "cannot record the re-registration");
                    }
                }
                self.force_register = false;
                self.adopt(identity.clone());
                Ok(identity)
            }
            Some(Err(e)) if e.is_fatal() => Err(ConnEnd::Fatal(e.to_string())),
            Some(Err(e)) if e.is_rate_limited() => {
                Err(lost(Disconnect::RateLimited(e.to_string()), None))
            }
            Some(Err(e)) => Err(lost(Disconnect::Transient(e.to_string()), None)),
        }
    }

    fn adopt(&mut self, identity: Identity) {
        if !self.own_names.contains(&identity.name) {
            self.own_names.push(identity.name.clone());
        }
        self.shared.status().name = Some(identity.name.clone());
        self.shared.events.push(SessionEvent::Identity {
            name: identity.name.clone(),
            key: identity.key.clone(),
        });
        self.identity = Some(identity);
    }

    /// What to fetch per room after a reconnect. `after` is the newest timestamp delivered
    /// (a server timestamp: exact, minus 1 ms for same-millisecond siblings); when it has
    /// to come from our own clock (the join time, an unconfirmed entry's creation time)
    /// it is moved back by `clock_skew`. Never before the retention.
    fn recovery_plan(&self) -> Vec<RoomFetch> {
        let skew = u64::try_from(self.cfg.clock_skew.as_millis()).unwrap_or(u64::MAX);
        let retention = u64::try_from(self.cfg.retention.as_millis()).unwrap_or(u64::MAX);
        let oldest_allowed = now_u64().saturating_sub(retention);
        self.rooms
            .iter()
            .map(|(room, st)| {
                let (mut after, have_until) = match st.last_ts {
                    Some(ts) if ts >= st.since_ms => (ts.saturating_sub(1), ts),
                    _ => (st.since_ms.saturating_sub(skew), st.since_ms),
                };
                if let Some(created) = self.outbox.oldest_unconfirmed(room) {
                    let created = u64::try_from(created).unwrap_or(0);
                    after = after.min(created.saturating_sub(skew));
                }
                // An unfinished or failed recovery's gap is still to be fetched.
                let mut have_until = have_until;
                for (gap_after, gap_until) in st.gap.into_iter().chain(st.unfetched) {
                    after = after.min(gap_after);
                    have_until = have_until.min(gap_until);
                }
                RoomFetch {
                    room: room.clone(),
                    after_ms: after.max(oldest_allowed),
                    have_until_ms: have_until,
                }
            })
            .collect()
    }

    /// Serves one connection until it ends: a select over the socket, the commands,
    /// the timers and the recovery, each handed to a method of [`Conn`]'s state.
    async fn serve(&mut self, ws: Ws, identity: Identity) -> ConnEnd {
        self.conn_seq += 1;
        let (sink, mut stream) = ws.split();
        let (out_tx, out_rx) = mpsc::channel::<Message>(OUT_QUEUE);
        let mut writer = AbortOnDrop(tokio::spawn(write_loop(
            sink,
            out_rx,
            self.cfg.write_timeout,
        )));
        let mut c = match self.open_conn(identity, out_tx) {
            Ok(c) => c,
            Err(end) => return end,
        };
        let mut ping = tokio::time::interval_at(
            Instant::now() + self.cfg.ping_interval,
            self.cfg.ping_interval,
        );
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(HOUSEKEEPING);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let check_every = self.cfg.membership_check;
        let _checking =
            (!check_every.is_zero()).then(|| recovery::Checker::register(&self.endpoints));
        // The first check comes at a random point of the second period, so bots that
        // connected together (a host starting thousands) do not all ask at once.
        let first_check = {
            let period = self.membership_period();
            period + period.mul_f64(self.rng.random::<f64>())
        };
        let mut membership_due = Box::pin(tokio::time::sleep(first_check));
        // One timer for the dead-peer deadline, moved on only when it fires (a fresh
        // one per frame cost a timer registration and removal each).
        let dead = tokio::time::sleep_until(c.dead_at);
        tokio::pin!(dead);

        loop {
            if self.shutdown_due(&c) {
                close_gracefully(c.out_tx.clone(), writer).await;
                return ConnEnd::Shutdown;
            }
            // Housekeeping only while there is something to keep: thousands of idle
            // bots must not wake four times a second each.
            let housekeeping = self.outbox.depth() > 0
                || (c.active_since.is_some() && (self.attempt != 0 || self.reregistered));
            let recovering = c.recovery.is_some();
            let awaiting_acks = !recovering && c.active_since.is_none();
            let step = tokio::select! {
                cmd = self.cmds.recv() => self.on_command(&mut c, cmd),
                frame = stream.next() => {
                    // The frames already read go in this turn (up to a bound), not
                    // one per pass over every branch.
                    let mut step = self.on_frame(&mut c, frame);
                    for _ in 0..FRAMES_PER_TURN {
                        if step.is_err() {
                            break;
                        }
                        let Some(frame) = stream.next().now_or_never() else {
                            break;
                        };
                        step = self.on_frame(&mut c, frame);
                    }
                    step
                }
                _ = ping.tick() => {
                    let _ = c.out_tx.try_send(Message::Ping(Default::default()));
                    Ok(())
                }
                () = &mut dead => {
                    if Instant::now() >= c.dead_at {
                        Err(lost(Disconnect::DeadPeer, c.up_for()))
                    } else {
                        // Frames came since it was set: wait for the newest deadline.
                        dead.as_mut().reset(c.dead_at);
                        Ok(())
                    }
                }
                () = tokio::time::sleep_until(c.ack_deadline), if awaiting_acks => {
                    tracing::debug!(
                        bot = self.bot(),
                        rooms = ?c.unacked,
                        "joins not confirmed by the server in time; recovering anyway"
                    );
                    self.start_recovery(&mut c);
                    Ok(())
                }
                result = wait_recovery(&mut c.recovery), if recovering => {
                    c.recovery = None;
                    c.hold_until = None;
                    self.on_recovered(&mut c, result).map(|()| self.catch_up(&mut c, None))
                }
                () = &mut membership_due, if !check_every.is_zero() => {
                    let period = self.membership_period();
                    self.check_membership(&mut c, Some(period));
                    membership_due.as_mut().reset(Instant::now() + period);
                    Ok(())
                }
                missing = wait_task(&mut c.membership), if c.membership.is_some() => {
                    c.membership = None;
                    self.on_membership(&mut c, missing.unwrap_or_default());
                    Ok(())
                }
                () = sleep_until_due(c.catch_up_at), if c.catch_up_at.is_some() => {
                    // Joins not confirmed in time: fetch anyway.
                    c.catch_up_at = None;
                    c.joins_confirmed = Instant::now();
                    let rooms = std::mem::take(&mut c.rejoined);
                    self.catch_up(&mut c, Some(rooms));
                    Ok(())
                }
                () = sleep_until_due(c.hold_until), if recovering && c.hold_until.is_some() => {
                    c.hold_until = None;
                    self.recovery_overdue(&mut c)
                }
                _ = tick.tick(), if housekeeping => self.on_tick(&mut c),
                () = sleep_until_due(self.next_due), if self.next_due.is_some() => {
                    self.next_due = None;
                    self.flush_if_active(&c)
                }
                result = &mut writer.0 => {
                    let why = match result {
                        Ok(Ok(())) => "writer stopped".to_string(),
                        Ok(Err(e)) => self.redact(&e),
                        Err(e) => format!("writer task failed: {e}"),
                    };
                    Err(lost(Disconnect::Io(why), c.up_for()))
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Joins every room again (joining is per connection) and sets up the state of a
    /// new connection.
    fn open_conn(
        &mut self,
        identity: Identity,
        out_tx: mpsc::Sender<Message>,
    ) -> Result<Conn, ConnEnd> {
        let mut joined: HashSet<String> = HashSet::new();
        for room in self.rooms.keys() {
            let frame = ClientFrame::Join { room: room.clone() }.encode();
            if out_tx.try_send(Message::Text(frame.into())).is_err() {
                return Err(lost(
                    Disconnect::Io("write queue full while joining".into()),
                    None,
                ));
            }
            joined.insert(room.clone());
        }
        for st in self.rooms.values_mut() {
            st.checked_from = None;
        }
        self.shared.connections.fetch_add(1, Ordering::Relaxed);
        self.set_state(SessionState::Joined);
        let now = Instant::now();
        let dead_after = self
            .cfg
            .ping_interval
            .saturating_mul(self.cfg.dead_after_intervals);
        let mut c = Conn {
            seq: self.conn_seq,
            identity,
            out_tx,
            // Recover what was missed once the server has processed our joins (the
            // history request travels on another connection and could otherwise overtake
            // them: a message posted in between would be in neither). Any message from
            // a room proves the join (the server announces it with a system line); after
            // `join_ack_timeout` we recover anyway. Live messages are held meanwhile.
            unacked: joined.clone(),
            joined,
            recovery: None,
            last_life: now,
            dead_after,
            dead_at: now + dead_after,
            ack_deadline: now + self.cfg.join_ack_timeout,
            active_since: None,
            hold_until: None,
            rejoined: BTreeSet::new(),
            catch_up_at: None,
            catch_up_ready: BTreeSet::new(),
            membership: None,
            membership_full: false,
            member_checked: HashMap::new(),
            joins_confirmed: now,
        };
        if c.unacked.is_empty() {
            self.start_recovery(&mut c);
        }
        Ok(c)
    }

    /// While shutting down: whether this connection ends now, the outbox drained (or
    /// the flush deadline passed).
    fn shutdown_due(&self, c: &Conn) -> bool {
        let Some(deadline) = self.stopping else {
            return false;
        };
        let left = self.outbox.depth_in(&c.joined);
        if left > 0 && Instant::now() < deadline {
            return false;
        }
        if left > 0 {
            tracing::info!(
                bot = self.bot(),
                left,
                "shutdown: outbox not drained in time; entries kept for the next start"
            );
        }
        true
    }

    /// A command from the handle (or the group commit), and those queued behind it
    /// (at most [`COMMAND_BATCH`]): one flush for all of them.
    fn on_command(&mut self, c: &mut Conn, cmd: Option<Command>) -> Result<(), ConnEnd> {
        let mut cmd = cmd;
        for _ in 0..COMMAND_BATCH {
            self.command(c, cmd);
            match self.cmds.try_recv() {
                Ok(next) => cmd = Some(next),
                Err(_) => break,
            }
        }
        let joined = &c.joined;
        c.unacked.retain(|r| joined.contains(r));
        if c.unacked.is_empty() && c.recovery.is_none() && c.active_since.is_none() {
            self.start_recovery(c);
        }
        self.flush_if_active(c)
    }

    fn command(&mut self, c: &mut Conn, cmd: Option<Command>) {
        match cmd {
            None | Some(Command::Shutdown) => {
                if self.stopping.is_none() {
                    self.stopping = Some(Instant::now() + self.cfg.shutdown_flush);
                }
            }
            Some(Command::Enqueued { entry, handed }) => self.enqueued(entry, handed),
            Some(Command::Join(room)) => {
                self.add_room(room.clone());
                if c.joined.insert(room.clone()) {
                    let frame = ClientFrame::Join { room }.encode();
                    let _ = c.out_tx.try_send(Message::Text(frame.into()));
                }
            }
            Some(Command::Leave(room)) => {
                self.remove_room(&room);
                if c.joined.remove(&room) {
                    let frame = ClientFrame::Leave { room }.encode();
                    let _ = c.out_tx.try_send(Message::Text(frame.into()));
                }
            }
        }
    }

    /// A frame (or the end of the stream) from the server.
    fn on_frame(
        &mut self,
        c: &mut Conn,
        frame: Option<Result<Message, tungstenite::Error>>,
    ) -> Result<(), ConnEnd> {
        c.last_life = Instant::now();
        c.dead_at = c.last_life + c.dead_after;
        match frame {
            None => Err(lost(
                Disconnect::Io("connection closed without a close frame".into()),
                c.up_for(),
            )),
            Some(Err(e)) => Err(lost(Disconnect::Io(self.describe_ws_error(&e)), c.up_for())),
            Some(Ok(Message::Text(text))) => {
                match self.on_text(text.as_str(), c.active_since.is_none()) {
                    Heard::Room(room) => {
                        if c.unacked.remove(&room)
                            && c.unacked.is_empty()
                            && c.recovery.is_none()
                            && c.active_since.is_none()
                        {
                            self.start_recovery(c);
                        }
                        if c.rejoined.remove(&room) {
                            c.joins_confirmed = Instant::now();
                            if c.rejoined.is_empty() {
                                c.catch_up_at = None;
                            }
                            self.catch_up(c, Some(BTreeSet::from([room])));
                        }
                    }
                    Heard::NotJoined => {
                        // The server forgot a join (or never saw it): join every room
                        // again (joins are idempotent), fetch what was missed in them,
                        // and what it refused goes out again behind the joins.
                        let rooms: Vec<String> = c.joined.iter().cloned().collect();
                        self.rejoin(c, rooms);
                        self.outbox.unsend(c.seq);
                        return self.flush_if_active(c);
                    }
                    Heard::Throttled(retry_after) => {
                        self.shared.throttles.fetch_add(1, Ordering::Relaxed);
                        let pause = match self.limits.as_mut() {
                            Some(l) => Some(l.on_server_throttle(retry_after)),
                            None => retry_after,
                        };
                        self.shared
                            .events
                            .push(SessionEvent::Throttled { retry_after: pause });
                        // The refused send goes out again once the pause is over.
                        self.outbox.unsend(c.seq);
                        let due = Instant::now() + pause.unwrap_or(Duration::from_secs(1));
                        self.next_due = Some(self.next_due.map_or(due, |d| d.max(due)));
                    }
                    Heard::Nothing => {}
                }
                Ok(())
            }
            Some(Ok(Message::Binary(bytes))) => {
                tracing::debug!(bot = self.bot(), len = bytes.len(), "binary frame ignored");
                Ok(())
            }
            Some(Ok(Message::Close(frame))) => {
                if let Some(f) = &frame {
                    tracing::info!(
                        bot = self.bot(),
                        code = u16::from(f.code),
                        reason = %excerpt(f.reason.as_bytes()),
                        "server closed the connection"
                    );
                }
                Err(lost(
                    Disconnect::Closed(frame.map(|f| u16::from(f.code))),
                    c.up_for(),
                ))
            }
            Some(Ok(_)) => Ok(()), // ping, pong: life, nothing else
        }
    }

    /// The history fetch after (re)connecting finished: deliver what was missed, go
    /// active, send what waits.
    fn on_recovered(
        &mut self,
        c: &mut Conn,
        result: Result<Vec<Recovered>, FetchError>,
    ) -> Result<(), ConnEnd> {
        match result {
            Ok(recovered) => {
                self.finish_recovery(recovered);
                if c.active_since.is_some() {
                    // Went active while this was running: what it recovered is
                    // delivered now, and unconfirmed entries may be checked.
                    return self.flush_if_active(c);
                }
                self.go_active(c)
            }
            Err(FetchError::Unauthorized) => Err(lost(Disconnect::Unauthorized, c.up_for())),
            Err(e @ FetchError::RateLimited(_)) => {
                Err(lost(Disconnect::RateLimited(e.to_string()), c.up_for()))
            }
            Err(e) => Err(lost(
                Disconnect::Transient(format!("recovering missed messages: {e}")),
                c.up_for(),
            )),
        }
    }

    fn go_active(&mut self, c: &mut Conn) -> Result<(), ConnEnd> {
        let now = Instant::now();
        c.active_since = Some(now);
        c.joins_confirmed = now;
        self.set_state(SessionState::Active);
        self.shared.status().active_since = Some(now);
        self.flush(c)
            .map_err(|cause| lost(cause, Some(Duration::ZERO)))
    }

    /// The history fetch is taking longer than `recovery_hold`: live messages and
    /// replies are not held back for it any longer. The session goes active (the live
    /// messages held so far are delivered, the outbox drains, except entries waiting for
    /// their room's history to be checked) and the fetch goes on; its messages are
    /// delivered when it finishes, once each. Until then each room's recovery
    /// position stays before the gap, so a connection lost meanwhile fetches it again.
    fn recovery_overdue(&mut self, c: &mut Conn) -> Result<(), ConnEnd> {
        if c.active_since.is_some() {
            return Ok(());
        }
        self.shared
            .recoveries_overdue
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            bot = self.bot(),
            hold_ms = self.cfg.recovery_hold.as_millis() as u64,
            "recovering missed messages is slow: going active, they follow when they arrive"
        );
        let mut held = std::mem::take(&mut self.held);
        held.sort_by_key(|m| m.timestamp_ms);
        for msg in held {
            self.accept(msg, true);
        }
        self.go_active(c)
    }

    /// Housekeeping: stale outbox entries, the healthy-connection reset, and another
    /// flush (entries held back while the connection was quiet).
    fn on_tick(&mut self, c: &mut Conn) -> Result<(), ConnEnd> {
        self.expire_outbox();
        if let Some(since) = c.active_since
            && since.elapsed() >= self.cfg.healthy_after
            && (self.attempt != 0 || self.reregistered)
        {
            self.attempt = 0;
            self.reregistered = false;
        }
        self.flush_if_active(c)
    }

    fn flush_if_active(&mut self, c: &Conn) -> Result<(), ConnEnd> {
        if c.active_since.is_none() {
            return Ok(());
        }
        self.flush(c).map_err(|cause| lost(cause, c.up_for()))
    }

    /// Starts the history fetch of every room on this connection; it holds live
    /// messages and replies back for at most `recovery_hold`.
    fn start_recovery(&mut self, c: &mut Conn) {
        let plan = self.recovery_plan();
        for fetch in &plan {
            if let Some(st) = self.rooms.get_mut(&fetch.room) {
                st.gap = Some((fetch.after_ms, fetch.have_until_ms));
            }
        }
        c.recovery = Some(self.spawn_recovery(&c.identity, plan));
        c.hold_until = Some(Instant::now() + self.cfg.recovery_hold);
    }

    /// Joins `rooms` again on this connection: the server no longer counts us in them.
    /// What was missed in each is fetched once the join is confirmed.
    fn rejoin(&mut self, c: &mut Conn, rooms: Vec<String>) {
        // The gap starts where each room stands now: the confirming "joined" line and
        // whatever follows it move the position on before the fetch is planned.
        for fetch in self.recovery_plan() {
            if rooms.contains(&fetch.room)
                && let Some(st) = self.rooms.get_mut(&fetch.room)
                && st.gap.is_none()
            {
                st.gap = Some((fetch.after_ms, fetch.have_until_ms));
            }
        }
        let mut sent = false;
        for room in rooms {
            if !c.joined.contains(&room) {
                continue;
            }
            let frame = ClientFrame::Join { room: room.clone() }.encode();
            let _ = c.out_tx.try_send(Message::Text(frame.into()));
            c.rejoined.insert(room);
            sent = true;
        }
        if sent {
            self.shared.rejoins.fetch_add(1, Ordering::Relaxed);
        }
        if c.catch_up_at.is_none() && !c.rejoined.is_empty() {
            c.catch_up_at = Some(Instant::now() + self.cfg.join_ack_timeout);
        }
    }

    /// Fetches what was missed in `rooms` (joined again) on an active connection, or
    /// queues them behind the recovery that is running (`None`: start what is queued).
    fn catch_up(&mut self, c: &mut Conn, rooms: Option<BTreeSet<String>>) {
        c.catch_up_ready.extend(rooms.into_iter().flatten());
        if c.catch_up_ready.is_empty() || c.recovery.is_some() || c.active_since.is_none() {
            // Before the connection is active, its own recovery still comes and covers
            // these rooms too.
            if c.active_since.is_none() {
                c.catch_up_ready.clear();
            }
            return;
        }
        let ready = std::mem::take(&mut c.catch_up_ready);
        let plan: Vec<RoomFetch> = self
            .recovery_plan()
            .into_iter()
            .filter(|f| ready.contains(&f.room))
            .collect();
        if plan.is_empty() {
            return;
        }
        tracing::info!(
            bot = self.bot(),
            rooms = ?ready,
            "joined again where the server had dropped us: fetching what was missed"
        );
        for fetch in &plan {
            if let Some(st) = self.rooms.get_mut(&fetch.room) {
                st.gap = Some((fetch.after_ms, fetch.have_until_ms));
            }
        }
        c.recovery = Some(self.spawn_recovery(&c.identity, plan));
    }

    /// The time to the next member-list check (see [`recovery::membership_period`]).
    fn membership_period(&self) -> Duration {
        recovery::membership_period(
            &self.endpoints,
            self.cfg.membership_check.max(HOUSEKEEPING),
            self.cfg.membership_checks_per_second,
        )
    }

    /// Asks the server whether it still counts us in a room that has not just
    /// delivered a message (one that did, within [`PROOF_OF_MEMBERSHIP`], did): the
    /// quiet room asked about longest ago, one per check (a server that loses a
    /// connection's joins loses them all, and one room tells), reusing a list another
    /// bot of the process fetched within `reuse_for`; or, with `None`, every quiet
    /// room with fresh lists (one was found missing: which others are? Lists fetched
    /// before the miss prove nothing).
    fn check_membership(&mut self, c: &mut Conn, reuse_for: Option<Duration>) {
        let full = reuse_for.is_none();
        if c.active_since.is_none() || c.membership.is_some() || !c.rejoined.is_empty() {
            return;
        }
        let quiet = c.joined.iter().filter(|room| {
            self.rooms.get(*room).is_none_or(|st| {
                st.heard_at
                    .is_none_or(|t| t.elapsed() >= PROOF_OF_MEMBERSHIP)
            })
        });
        let rooms: Vec<String> = if full {
            quiet.cloned().collect()
        } else {
            quiet
                .min_by_key(|room| c.member_checked.get(*room).copied())
                .into_iter()
                .cloned()
                .collect()
        };
        if rooms.is_empty() {
            return;
        }
        let now = Instant::now();
        for room in &rooms {
            c.member_checked.insert(room.clone(), now);
        }
        c.membership_full = full;
        c.membership = Some(AbortOnDrop(tokio::spawn(recovery::rooms_missing_us(
            self.http.clone(),
            self.endpoints.clone(),
            c.identity.key.clone(),
            rooms,
            self.own_names.clone(),
            self.cfg.request_timeout,
            reuse_for.unwrap_or(Duration::ZERO),
            c.joins_confirmed,
        ))));
    }

    fn on_membership(&mut self, c: &mut Conn, missing: Vec<String>) {
        if missing.is_empty() || c.active_since.is_none() {
            return;
        }
        if !c.membership_full && c.joined.len() > 1 {
            // One room no longer lists us: ask about the others at once, so every
            // forgotten room is joined again together.
            self.check_membership(c, None);
            if c.membership.is_some() {
                return;
            }
        }
        tracing::warn!(
            bot = self.bot(),
            rooms = ?missing,
            "the server no longer counts us in these rooms: joining again"
        );
        self.rejoin(c, missing);
    }

    fn spawn_recovery(
        &mut self,
        identity: &Identity,
        plan: Vec<RoomFetch>,
    ) -> AbortOnDrop<Result<Vec<Recovered>, FetchError>> {
        let params = FetchParams {
            limit: self.cfg.history_page_limit,
            max_pages: 20,
            timeout: self.cfg.request_timeout,
            retries: HISTORY_RETRIES,
            retry_backoff: Backoff {
                base: self.cfg.backoff.base,
                cap: self.cfg.backoff.cap.min(Duration::from_secs(2)),
                max_attempts: None,
            },
        };
        AbortOnDrop(tokio::spawn(recovery::recover_all(
            self.http.clone(),
            self.endpoints.clone(),
            identity.key.clone(),
            plan,
            params,
            self.rng.random(),
        )))
    }

    fn describe_ws_error(&self, e: &tungstenite::Error) -> String {
        match e {
            tungstenite::Error::Capacity(c) => format!(
                "oversized frame from the server (limit {} bytes): {c}",
                self.cfg.max_frame_bytes
            ),
            other => self.redact(&error_chain(other)),
        }
    }

    /// Writes every sendable outbox entry (in id order) to the connection, paced by
    /// the rate limits: an entry they hold back waits (and so do the later ones of its
    /// room, or of every room when the bot-wide or server gate holds), and a timer is
    /// set for when it may go. Holds back while the connection has been silent for more
    /// than a ping interval.
    fn flush(&mut self, c: &Conn) -> Result<(), Disconnect> {
        if c.last_life.elapsed() > self.cfg.ping_interval {
            return Ok(());
        }
        // With a shared store, only while this host's lease on the persona is trusted
        // (a host waking from a pause past its lease sends nothing).
        if !self.store.may_send(&self.shared.bot) {
            return Ok(());
        }
        self.next_due = None;
        let mut held: HashSet<String> = HashSet::new();
        for id in self.outbox.sendable(c.seq, &c.joined) {
            let Some(entry) = self.outbox.get(id) else {
                continue;
            };
            if held.contains(&entry.room) {
                continue;
            }
            if entry.attempts > 0 {
                // Written to an earlier connection and never confirmed: re-send only if
                // this connection's history of the room reaches back to its creation
                // (so the missing echo means it was lost), and only so often.
                let created = u64::try_from(entry.created_at).unwrap_or(0);
                let checked = self.rooms.get(&entry.room).and_then(|st| st.checked_from);
                match checked {
                    None => continue, // not recovered: wait (or expire)
                    Some(from) if from > created || entry.attempts > self.cfg.max_resends => {
                        let (room, attempts) = (entry.room.clone(), entry.attempts);
                        if let Some(gone) = self.outbox.give_up(id) {
                            self.shared
                                .outbox_unconfirmed
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                bot = self.bot(),
                                room = %room,
                                id = %gone.id,
                                attempts,
                                reason = if from > created {
                                    "the recovered history does not reach back to it"
                                } else {
                                    "re-sent as often as allowed"
                                },
                                "outbox entry unconfirmed: not sent again"
                            );
                            self.update_depth();
                        }
                        continue;
                    }
                    Some(_) => {}
                }
            }
            let permit = match c.out_tx.try_reserve() {
                Ok(permit) => permit,
                Err(TrySendError::Full(())) => break,
                Err(TrySendError::Closed(())) => {
                    return Err(Disconnect::Io("connection writer is gone".into()));
                }
            };
            if let Some(limits) = &mut self.limits
                && let Err(RateLimited { which, retry_after }) = limits.check(&entry.room)
            {
                let room = entry.room.clone();
                if self.outbox.mark_paced(id) {
                    self.shared.pacing.paced.fetch_add(1, Ordering::Relaxed);
                }
                let due = Instant::now() + retry_after;
                self.next_due = Some(self.next_due.map_or(due, |d| d.min(due)));
                if matches!(which, LimitKind::Bot | LimitKind::Server) {
                    break;
                }
                held.insert(room);
                continue;
            }
            let frame = ClientFrame::Send {
                room: entry.room.clone(),
                text: entry.text.clone(),
            }
            .encode();
            let now = now_ms();
            if entry.attempts == 0 && self.outbox.was_paced(id) {
                let waited = u64::try_from(now - entry.created_at).unwrap_or(0);
                self.shared.pacing.observe(Duration::from_millis(waited));
            }
            // Recorded as sent before it can reach the wire.
            self.outbox.mark_sent(id, c.seq, now);
            permit.send(Message::Text(frame.into()));
            self.shared.messages_out.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    // ---- inbound -------------------------------------------------------------------------

    /// Handles one text frame; returns the room of a chat message.
    fn on_text(&mut self, text: &str, recovering: bool) -> Heard {
        match self.shared.protocol.decode_server_frame(text) {
            Ok(ServerFrame::Message(msg)) => {
                let room = msg.room.clone();
                if recovering {
                    self.held.push(msg);
                    if self.held.len() > MAX_HELD {
                        let oldest = self.held.remove(0);
                        self.accept(oldest, true);
                    }
                } else {
                    self.accept(msg, true);
                }
                return Heard::Room(room);
            }
            Ok(ServerFrame::Connected { agent, .. }) => {
                if !agent.is_empty() && !self.own_names.contains(&agent) {
                    tracing::info!(bot = self.bot(), name = %agent, "the server knows us by another name");
                    self.own_names.push(agent.clone());
                    self.shared.status().name = Some(agent.clone());
                    if let Some(id) = &self.identity {
                        self.shared.events.push(SessionEvent::Identity {
                            name: agent,
                            key: id.key.clone(),
                        });
                    }
                }
            }
            Ok(ServerFrame::Error {
                message,
                code,
                retry_after_ms,
            }) => {
                let hint = retry_after_ms.map(Duration::from_millis);
                let heard = classify_error(code.as_deref(), &message, hint);
                tracing::warn!(
                    bot = self.bot(),
                    code = code.as_deref().unwrap_or(""),
                    message = %self.redact(&excerpt(message.as_bytes())),
                    action = match heard {
                        Heard::NotJoined => "join again",
                        Heard::Throttled(_) => "slow down",
                        _ => "none",
                    },
                    "server reported an error"
                );
                return heard;
            }
            Ok(other) => {
                tracing::debug!(bot = self.bot(), frame = ?other, "unknown frame ignored");
            }
            Err(e) => {
                tracing::debug!(bot = self.bot(), error = %e, len = text.len(), "undecodable frame ignored");
            }
        }
        Heard::Nothing
    }

    /// Merges recovered history with the live messages held meanwhile and hands them over
    /// in timestamp order (live copies first on ties). A room whose history could not be
    /// fetched is a gap: logged, counted, and its unconfirmed entries are not re-sent on
    /// this connection.
    fn finish_recovery(&mut self, recovered: Vec<Recovered>) {
        let mut batch: Vec<(ChatMessage, bool)> = Vec::new();
        let mut throttled = false;
        for r in recovered {
            if r.skipped > 0 {
                tracing::warn!(bot = self.bot(), room = %r.room, skipped = r.skipped, "unreadable history items skipped");
            }
            throttled |= r.throttled;
            if let Some(why) = &r.failed {
                self.shared.history_gaps.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    bot = self.bot(),
                    room = %r.room,
                    error = %why,
                    "missed messages of this room could not be recovered: going on without them (tried again on the next connection)"
                );
            }
            if let Some(st) = self.rooms.get_mut(&r.room) {
                st.checked_from = r.complete_since;
                let gap = st.gap;
                st.gap_closed();
                st.unfetched = if r.failed.is_some() { gap } else { None };
            }
            batch.extend(r.messages.into_iter().map(|m| (m, false)));
        }
        if throttled {
            self.shared.throttles.fetch_add(1, Ordering::Relaxed);
            let pause = self.limits.as_mut().map(|l| l.on_server_throttle(None));
            self.shared
                .events
                .push(SessionEvent::Throttled { retry_after: pause });
        }
        batch.extend(self.held.drain(..).map(|m| (m, true)));
        batch.sort_by_key(|(m, live)| (m.timestamp_ms, !*live));
        for (msg, live) in batch {
            self.accept(msg, live);
        }
    }

    /// Whether a recovered (not live) message may be handed to the bot.
    fn replayable(&self, msg: &ChatMessage) -> bool {
        let retention = u64::try_from(self.cfg.retention.as_millis()).unwrap_or(u64::MAX);
        let fresh = msg.timestamp_ms >= now_u64().saturating_sub(retention);
        let ts = msg.timestamp_ms;
        let after_join = self.rooms.get(&msg.room).is_some_and(|r| {
            ts >= r.since_ms
                && !r
                    .heard_before_restart
                    .is_some_and(|(first, last)| (first..=last).contains(&ts))
        });
        fresh && after_join
    }

    /// The one path every message takes: dedupe, confirm our own echoes, deliver.
    fn accept(&mut self, msg: ChatMessage, live: bool) {
        let key = MessageKey::of(&msg);
        if self.seen.contains_key(&key, msg.timestamp_ms) {
            return;
        }
        let own = self.own_names.contains(&msg.from);
        let skew = u64::try_from(self.cfg.clock_skew.as_millis()).unwrap_or(u64::MAX);
        if !live && !self.replayable(&msg) {
            // Not for the bot (older than its arrival or the retention), but it may still be
            // the echo of an entry sent before a restart.
            if own && let Some(entry) = self.outbox.confirm_echo(&msg, Some(skew)) {
                tracing::debug!(bot = self.bot(), id = %entry.id, "outbox entry confirmed by history");
                self.seen.insert_key(key, msg.timestamp_ms);
                self.update_depth();
            }
            return;
        }
        self.seen.insert_key(key, msg.timestamp_ms);
        if own {
            let floor = if live { None } else { Some(skew) };
            if let Some(entry) = self.outbox.confirm_echo(&msg, floor) {
                tracing::debug!(bot = self.bot(), id = %entry.id, live, "outbox entry confirmed");
                self.update_depth();
            }
        }
        if let Some(room) = self.rooms.get_mut(&msg.room) {
            if live {
                room.heard_at = Some(Instant::now());
            }
            room.delivered(msg.timestamp_ms, live, self.conn_seq);
            if room.dirty
                && self.store.is_shared()
                && let Some(at) = room.position(&msg.room)
            {
                self.shared
                    .delivered
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(msg.room.clone(), at);
            }
        }
        self.deliver(msg);
        if self.positions_saved.elapsed() >= POSITIONS_EVERY {
            self.save_positions();
        }
    }

    fn deliver(&mut self, msg: ChatMessage) {
        self.shared.messages_in.fetch_add(1, Ordering::Relaxed);
        if let Some(old) = self.shared.events.push(SessionEvent::Message(msg)) {
            let dropped = self.shared.events.dropped.load(Ordering::Relaxed);
            if dropped.is_power_of_two() {
                tracing::warn!(
                    bot = self.bot(),
                    room = %old.room,
                    dropped,
                    "bot is not keeping up with its messages; dropped the oldest"
                );
            }
        }
    }
}

async fn sleep_until_due(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn wait_task<T>(task: &mut Option<AbortOnDrop<T>>) -> Option<T> {
    match task {
        Some(t) => (&mut t.0).await.ok(),
        None => std::future::pending().await,
    }
}

async fn wait_recovery(
    recovery: &mut Option<AbortOnDrop<Result<Vec<Recovered>, FetchError>>>,
) -> Result<Vec<Recovered>, FetchError> {
    match recovery {
        Some(task) => match (&mut task.0).await {
            Ok(result) => result,
            Err(e) => Err(FetchError::Transient(format!("recovery task failed: {e}"))),
        },
        None => std::future::pending().await,
    }
}

/// Writes frames as they come, flushing when the queue is empty. A write that makes no
/// progress for `timeout` (the peer stopped reading, the kernel buffer is full) ends the
/// writer, and with it the connection, which is then replaced.
/// Writes what the connection queues. A write or flush that cannot finish within
/// `timeout` ends it with an error, and the connection is replaced.
async fn write_loop<S>(
    mut sink: S,
    mut rx: mpsc::Receiver<Message>,
    timeout: Duration,
) -> Result<(), String>
where
    S: futures_util::Sink<Message> + Unpin,
    S::Error: std::error::Error + 'static,
{
    let stuck = || {
        format!(
            "could not write to the connection for {} s",
            timeout.as_secs_f64()
        )
    };
    while let Some(msg) = rx.recv().await {
        let closing = matches!(msg, Message::Close(_));
        tokio::time::timeout(timeout, sink.feed(msg))
            .await
            .map_err(|_| stuck())?
            .map_err(|e| error_chain(&e))?;
        if closing || rx.is_empty() {
            tokio::time::timeout(timeout, sink.flush())
                .await
                .map_err(|_| stuck())?
                .map_err(|e| error_chain(&e))?;
        }
        if closing {
            return Ok(());
        }
    }
    Ok(())
}

async fn close_gracefully(
    out_tx: mpsc::Sender<Message>,
    mut writer: AbortOnDrop<Result<(), String>>,
) {
    let close = Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "shutting down".into(),
    }));
    if out_tx.try_send(close).is_ok() {
        let _ = tokio::time::timeout(CLOSE_GRACE, &mut writer.0).await;
    }
}

fn now_u64() -> u64 {
    u64::try_from(now_ms()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_waits_at_an_open_gap_with_the_live_run_of_one_connection() {
        let mut st = RoomState::new(100, Some(100), None);
        st.delivered(105, true, 1);
        assert_eq!(st.position("r"), Some(RoomPosition::at("r", 105)));
        // A recovery of what followed 105 starts; live messages go past it.
        st.gap = Some((104, 105));
        st.delivered(120, true, 1);
        st.delivered(121, true, 1);
        let held = |last, live| RoomPosition {
            live,
            ..RoomPosition::at("r", last)
        };
        assert_eq!(st.position("r"), Some(held(105, Some((120, 121)))));
        // Recovered (not live) messages are not part of the run.
        st.delivered(110, false, 1);
        assert_eq!(st.position("r"), Some(held(105, Some((120, 121)))));
        // A new connection: what was said between the two is in the gap, so the run
        // starts again rather than claiming it.
        st.delivered(130, true, 2);
        assert_eq!(st.position("r"), Some(held(105, Some((130, 130)))));
        // The gap recovered: the position moves past everything.
        st.gap_closed();
        assert!(st.dirty);
        assert_eq!(st.position("r"), Some(RoomPosition::at("r", 130)));
    }

    #[test]
    fn a_run_saved_before_a_restart_is_kept_until_the_position_passes_it() {
        let mut st = RoomState::new(101, Some(100), Some((120, 130)));
        let held = |last, live| RoomPosition {
            live,
            ..RoomPosition::at("r", last)
        };
        assert_eq!(st.position("r"), Some(held(100, Some((120, 130)))));
        // This start's recovery is slow too: still the old run (nothing new went past).
        st.gap = Some((99, 100));
        assert_eq!(st.position("r"), Some(held(100, Some((120, 130)))));
        // A live run of its own replaces it: one run is kept, so after yet another
        // restart the old one would be handed over again (a duplicate, never a loss).
        st.delivered(140, true, 1);
        assert_eq!(st.position("r"), Some(held(100, Some((140, 140)))));
        st.gap_closed();
        assert_eq!(st.position("r"), Some(RoomPosition::at("r", 140)));
    }

    #[test]
    fn error_frames_are_classified_by_code_message_and_retry_hint() {
        let t = |code, msg, hint| classify_error(code, msg, hint);
        assert!(matches!(t(Some("not_joined"), "", None), Heard::NotJoined));
        assert!(matches!(
            t(None, "Join the room first", None),
            Heard::NotJoined
        ));
        // The message's delay, when the frame has no hint.
        assert!(matches!(
            t(Some("rate_limited"), "slow down, retry in 2.5 s", None),
            Heard::Throttled(Some(d)) if d == Duration::from_millis(2500)
        ));
        assert!(matches!(
            t(None, "too many requests", None),
            Heard::Throttled(None)
        ));
        // The frame's hint wins, and makes any error a throttle.
        let hint = Some(Duration::from_secs(4));
        assert!(matches!(
            t(Some("rate_limited"), "retry in 1 s", hint),
            Heard::Throttled(Some(d)) if d == Duration::from_secs(4)
        ));
        assert!(matches!(
            t(Some("busy"), "try later", hint),
            Heard::Throttled(Some(d)) if d == Duration::from_secs(4)
        ));
        assert!(matches!(t(Some("bad_frame"), "boom", None), Heard::Nothing));
    }

    /// A sink that accepts `room` messages, then never has room again.
    struct Clogged {
        room: usize,
        written: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl futures_util::Sink<Message> for Clogged {
        type Error = std::io::Error;
        fn poll_ready(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            if self.room > 0 {
                std::task::Poll::Ready(Ok(()))
            } else {
                std::task::Poll::Pending
            }
        }
        fn start_send(mut self: std::pin::Pin<&mut Self>, _: Message) -> Result<(), Self::Error> {
            self.room -= 1;
            self.written.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_that_cannot_write_for_the_timeout_gives_up() {
        let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sink = Clogged {
            room: 2,
            written: written.clone(),
        };
        let (tx, rx) = mpsc::channel(8);
        let timeout = Duration::from_secs(10);
        let started = Instant::now();
        let writer = tokio::spawn(write_loop(sink, rx, timeout));
        for _ in 0..3 {
            tx.send(Message::Text("x".into())).await.unwrap();
        }
        let result = writer.await.unwrap();
        let err = result.expect_err("a clogged writer must fail");
        assert!(err.contains("10 s"), "{err}");
        assert_eq!(written.load(Ordering::SeqCst), 2);
        // It waited the whole timeout, not less, and not for ever.
        let waited = started.elapsed();
        assert!(waited >= timeout && waited < timeout * 2, "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_that_keeps_writing_never_times_out() {
        let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sink = Clogged {
            room: usize::MAX,
            written: written.clone(),
        };
        let (tx, rx) = mpsc::channel(8);
        let writer = tokio::spawn(write_loop(sink, rx, Duration::from_secs(1)));
        // Writes spread over far more than the timeout, each one prompt.
        for _ in 0..30 {
            tx.send(Message::Text("x".into())).await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tx.send(Message::Close(None)).await.unwrap();
        assert_eq!(writer.await.unwrap(), Ok(()));
        assert_eq!(written.load(Ordering::SeqCst), 31);
    }
}
