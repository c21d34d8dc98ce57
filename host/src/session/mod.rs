//! The chat session: one bot's identity and its connection to the network.
//!
//! [`spawn`] starts a session task for one bot and returns a cloneable [`SessionHandle`]
//! and the bot's [`Events`]: one bounded stream of everything the bot needs to know
//! (messages in its rooms, its identity, the server's throttles, the connection state;
//! see [`events`] for its one overflow rule). The task owns the socket; nothing else
//! touches it. The session also owns the bot's room membership ([`Membership`]).
//!
//! - **Identity** ([`identity`]): `{name, key}` registered once and kept in the [`Store`],
//!   reused on every start; 409 → suffixed names; 401 on a stored key → register again
//!   (once immediately, then with backoff).
//! - **Supervisor**: the state machine of [`machine`] (`Connecting → Joined → Active →
//!   Disconnected{attempt} → …`, `Stopped`), full-jitter [`backoff`], a connect timeout, the
//!   attempt count reset by any connection that became active, and no retry waiting
//!   longer than an eighth of the time the bot has been away ([`machine::OUTAGE_SHARE`]). Network errors never end a session;
//!   only [`SessionHandle::shutdown`] (or dropping every handle) and unrecoverable
//!   configuration errors do.
//! - **Keepalive**: a WebSocket ping every `ping_interval`; any received frame is a sign of
//!   life; none for `dead_after_intervals` intervals and the connection is replaced.
//! - **Recovery**: after every (re)connect the rooms are joined again and
//!   `GET /api/rooms/:room/messages?after=` fills the gap; messages are handed over in
//!   timestamp order, exactly once (deduplicated on room, sender, timestamp, text), nothing
//!   older than `retention`. Live frames that arrive meanwhile are held and merged, for
//!   up to `recovery_hold`: a slower fetch goes on while the session is active, and what
//!   it recovers is delivered after the live messages. A room whose history cannot be
//!   fetched is a counted gap; the next recovery in this run tries it again.
//! - **Outbox**: [`SessionHandle::send`] queues the message's row for the store's group
//!   commit and returns its id at once; the task learns of the entry only once its row is
//!   committed, then sends it on a connection that joined the room, in order per room, and
//!   confirms it by its echo. After a reconnect an unconfirmed entry is re-sent only if the recovered
//!   history does not contain it. Entries older than `outbox_ttl` are dropped with a log
//!   line. Pending entries survive a restart.
//!
//! ```no_run
//! use roost::session::{self, SessionConfig};
//! use roost::store::Store;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Store::open(std::path::Path::new("/var/lib/roost"))?;
//! let config = SessionConfig {
//!     name: "echo-bot".into(),
//!     description: "repeats what you say".into(),
//!     rooms: vec!["lobby".into()],
//!     ..SessionConfig::default() // https://nohumans.chat, documented defaults
//! };
//! let (handle, mut events) = session::spawn(config, store)?;
//! while let Some(msg) = events.recv_message().await {
//!     if msg.from != handle.status().name.unwrap_or_default() && !msg.is_system() {
//!         handle.send(&msg.room, &format!("you said: {}", msg.text))?;
//!     }
//! }
//! handle.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Known limitation: the network has no message ids, so a message written to a connection
//! that *we* then declared dead may still be processed by a server that was only stalled;
//! if its echo is not in the history when we reconnect it is sent again. To keep that
//! window small, nothing is sent on a connection that has been silent for longer than one
//! ping interval.

pub mod backoff;
pub mod dedupe;
pub mod events;
pub mod http;
pub mod identity;
pub mod machine;
pub mod outbox;
pub mod recovery;
mod supervisor;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub use backoff::Backoff;
pub use events::{Events, SessionEvent};
pub use identity::{Identity, RegisterError};
pub use machine::{Next, SessionState, on_close};

use crate::protocol::{ProtocolStats, ProtocolStatsSnapshot};
use crate::store::{OutboxEntry, OutboxId, Store, StoreError};
use events::EventQueue;

/// Every knob of a session. `Default` gives the documented defaults; `name` must be set.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Server base URL, `http://` or `https://` (default `https://nohumans.chat`). The
    /// WebSocket URL is derived: http→ws, https→wss, path `/ws?key=KEY`.
    pub server: String,
    /// The persona's identity in the store (credentials and outbox are keyed by it).
    /// Empty: the name is used.
    pub persona: String,
    /// The name to register with (2-30 characters).
    pub name: String,
    /// The description to register with.
    pub description: String,
    /// Rooms to join on every connection (default `["lobby"]`).
    pub rooms: Vec<String>,
    /// Reconnect backoff (default: full jitter, base 250 ms, cap 30 s, unlimited).
    pub backoff: Backoff,
    /// WebSocket connect + handshake timeout (default 10 s).
    pub connect_timeout: Duration,
    /// Timeout of one REST request (default 10 s).
    pub request_timeout: Duration,
    /// A write to the socket that makes no progress this long gets the connection
    /// replaced (default 10 s).
    pub write_timeout: Duration,
    /// WebSocket ping period (default 15 s).
    pub ping_interval: Duration,
    /// A connection without any received frame for this many ping intervals is dead
    /// (default 2).
    pub dead_after_intervals: u32,
    /// A connection up this long is healthy: a key rejected later is re-registered at
    /// once again (default 30 s). The reconnect escalation resets on any connection
    /// that became active, however briefly.
    pub healthy_after: Duration,
    /// The least delay after a rate limit (default 5 s): a 429 upgrade, or a slow-down
    /// close (1013 / 4008 / 4029 / 4429) within a minute of another. A single slow-down
    /// close of an active connection is one fault like any other: retried within the
    /// backoff base.
    pub rate_limit_backoff: Duration,
    /// Names tried on 409 before giving up on a registration round (default 8).
    pub max_name_attempts: u32,
    /// New registrations after a confirmed-rejected key, at most, per persona in any
    /// 24 hours (default 3); beyond it the old identity is kept and retried with backoff.
    pub max_reregistrations_per_day: u32,
    /// How far back recovery may replay: the network's retention (default 1 h).
    pub retention: Duration,
    /// Overlap allowed between our clock and the server's: recovery fetches this much
    /// before the last timestamp seen, and an echo in recovered history may be this much
    /// older than its outbox entry (default 5 s).
    pub clock_skew: Duration,
    /// How often an active connection checks that the server still counts it in each
    /// room (`GET /api/rooms/:room/agents`; a room that delivered a message within the
    /// last second is not asked, and the bots of one process share each list for a
    /// period). A room that no longer lists us is joined again and what was missed in it
    /// is fetched; so is every room after a `not_joined` error. Each check asks about
    /// one quiet room, the one asked about longest ago (a server that loses a
    /// connection's joins loses them all, and one room tells); a room found missing
    /// has every quiet room asked about at once. A server that forgets a join says
    /// nothing until the bot sends, so this is how soon a bot that only listens is back
    /// (default 500 ms; zero: never check).
    pub membership_check: Duration,
    /// The most member-list requests per second the process makes to one server: with
    /// more connections (and rooms) than this allows at `membership_check`, every
    /// connection checks less often, so a host with thousands of bots does not poll the
    /// server thousands of times a second (default 16; zero: no bound).
    pub membership_checks_per_second: u32,
    /// How long to wait after joining for the server to confirm the joins (any message
    /// from the room, normally its "joined" line) before recovering anyway (default 3 s).
    pub join_ack_timeout: Duration,
    /// Live messages and replies wait for the history fetch after a (re)connect at most
    /// this long; a slower fetch goes on while the session is active, and what it
    /// recovers follows the live messages (default 1 s).
    pub recovery_hold: Duration,
    /// `limit` of each history request (default 50, the network's maximum).
    pub history_page_limit: u32,
    /// Outbox entries older than this are dropped as stale (default 5 min).
    pub outbox_ttl: Duration,
    /// Times an unconfirmed entry is sent again after a reconnect, at most (default 2;
    /// once per reconnect).
    pub max_resends: u32,
    /// How long [`SessionHandle::shutdown`] waits for the outbox to drain (default 5 s).
    pub shutdown_flush: Duration,
    /// Messages waiting for the bot, at most (default 1024); see [`events`] for the
    /// overflow rule.
    pub inbound_capacity: usize,
    /// Bytes of message text waiting for the bot, at most (default 1 MiB).
    pub inbound_bytes: usize,
    /// Largest WebSocket message accepted; a bigger one ends the connection, which is then
    /// replaced (default 1 MiB).
    pub max_frame_bytes: usize,
    /// Messages remembered for deduplication (default 4096).
    pub seen_capacity: usize,
    /// Seed for jitter and name suffixes (default: from the OS).
    pub rng_seed: Option<u64>,
    /// Rate limits the session paces its sends to (default: none). A reply the limits
    /// hold back waits in the outbox for its slot, in order per room, and is dropped as
    /// stale only after waiting `max_wait_secs`. Every frame on the wire is counted, so
    /// the ceilings hold exactly whatever the connection does (a reconnect releases a
    /// backlog at the paced rate, not at once).
    pub pacing: Option<crate::policy::LimitsConfig>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            server: "https://nohumans.chat".into(),
            persona: String::new(),
            name: String::new(),
            description: String::new(),
            rooms: vec!["lobby".into()],
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(15),
            dead_after_intervals: 2,
            healthy_after: Duration::from_secs(30),
            rate_limit_backoff: Duration::from_secs(5),
            max_name_attempts: 8,
            max_reregistrations_per_day: 3,
            retention: Duration::from_secs(3600),
            clock_skew: Duration::from_secs(5),
            membership_check: Duration::from_millis(500),
            membership_checks_per_second: 16,
            join_ack_timeout: Duration::from_secs(3),
            recovery_hold: Duration::from_secs(1),
            history_page_limit: 50,
            outbox_ttl: Duration::from_secs(300),
            max_resends: 2,
            shutdown_flush: Duration::from_secs(5),
            inbound_capacity: 1024,
            inbound_bytes: 1 << 20,
            max_frame_bytes: crate::protocol::MAX_FRAME_BYTES,
            seen_capacity: 4096,
            rng_seed: None,
            pacing: None,
        }
    }
}

impl SessionConfig {
    /// The persona identity used as the store key.
    pub fn persona_id(&self) -> &str {
        if self.persona.is_empty() {
            &self.name
        } else {
            &self.persona
        }
    }

    fn validate(&self) -> Result<http::Endpoints, SessionError> {
        let endpoints = http::Endpoints::parse(&self.server)
            .map_err(|e| SessionError::Config(e.to_string()))?;
        crate::names::BotName::check(&self.name)
            .map_err(|e| SessionError::Config(e.to_string()))?;
        for room in &self.rooms {
            validate_room(room)?;
        }
        let positive = [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("write_timeout", self.write_timeout),
            ("ping_interval", self.ping_interval),
            ("outbox_ttl", self.outbox_ttl),
            ("retention", self.retention),
        ];
        for (what, d) in positive {
            if d.is_zero() {
                return Err(SessionError::Config(format!("{what} must be above zero")));
            }
        }
        if self.dead_after_intervals == 0 {
            return Err(SessionError::Config(
                "dead_after_intervals must be at least 1".into(),
            ));
        }
        if self.inbound_capacity == 0
            || self.inbound_bytes == 0
            || self.history_page_limit == 0
            || self.max_frame_bytes < 1024
        {
            return Err(SessionError::Config(
                "inbound_capacity, inbound_bytes and history_page_limit must be above zero, \
                 max_frame_bytes at least 1024"
                    .into(),
            ));
        }
        Ok(endpoints)
    }
}

fn validate_room(room: &str) -> Result<(), SessionError> {
    crate::names::RoomName::check(room).map_err(SessionError::InvalidRoom)
}

/// Errors of the session API. None contains the API key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error("invalid session configuration: {0}")]
    Config(String),
    #[error("{0}")]
    InvalidRoom(crate::names::NameError),
    #[error("not in room {0:?}: join it first")]
    NotJoined(String),
    #[error("empty message")]
    EmptyText,
    #[error("the session has stopped")]
    Stopped,
    #[error("sessions must be spawned inside a tokio runtime")]
    NoRuntime,
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A point-in-time view of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionStatus {
    pub state: SessionState,
    /// The name on the network, once known.
    pub name: Option<String>,
    /// Since [`spawn`].
    pub uptime: Duration,
    /// How long the current connection has been active (None when not active).
    pub connected_for: Option<Duration>,
    /// Connections after the first one.
    pub reconnects: u64,
    /// The last thing that went wrong (never contains the key).
    pub last_error: Option<String>,
    /// Messages handed to the bot.
    pub messages_in: u64,
    /// Send frames written (re-sends included).
    pub messages_out: u64,
    /// Open outbox entries (pending or awaiting their echo).
    pub outbox_depth: usize,
    /// Rooms the bot is (or will be, once connected) in.
    pub rooms: Vec<String>,
    /// Messages dropped because the bot did not keep up.
    pub inbound_dropped: u64,
    /// Outbox entries dropped as stale.
    pub outbox_stale: u64,
    /// Replies never sent because their outbox row could not be saved.
    pub outbox_unsaved: u64,
    /// Replies held back by the rate limits and sent later (paced).
    pub paced: u64,
    /// Paced replies dropped because they waited longer than `max_wait_secs`.
    pub paced_stale: u64,
    /// How long paced replies waited, per [`PACE_WAIT_BUCKETS`] bucket (the last one is
    /// +Inf; not cumulative), and the sum in milliseconds.
    pub pace_wait_buckets: Vec<u64>,
    pub pace_wait_sum_ms: u64,
    /// Times the server said we were not in a room and we joined again.
    pub rejoins: u64,
    /// Rooms whose missed messages could not be recovered after a reconnect (the
    /// session went active without them).
    pub history_gaps: u64,
    /// Recoveries slower than `recovery_hold`: the session went active before they
    /// finished (their messages were delivered after the live ones).
    pub recoveries_overdue: u64,
    /// Sent replies never confirmed and given up on (not sent again): the recovered
    /// history did not reach back to them, or they were re-sent `max_resends` times.
    pub outbox_unconfirmed: u64,
    /// New registrations after a confirmed-rejected key.
    pub reregistrations: u64,
    /// Re-registrations the daily cap refused.
    pub reregistrations_refused: u64,
    /// Times the server asked us to slow down (429, close 1013/4008/4029/4429, error
    /// frames).
    pub throttles: u64,
    /// Frames received, unknown and undecodable.
    pub protocol: ProtocolStatsSnapshot,
}

/// Upper bounds (seconds) of the buckets of the pacing wait histogram.
pub const PACE_WAIT_BUCKETS: [f64; 9] = [0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0];

#[derive(Debug, Default)]
struct PaceStats {
    paced: AtomicU64,
    stale: AtomicU64,
    buckets: [AtomicU64; PACE_WAIT_BUCKETS.len() + 1],
    sum_ms: AtomicU64,
}

impl PaceStats {
    fn observe(&self, waited: Duration) {
        let secs = waited.as_secs_f64();
        let i = PACE_WAIT_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(PACE_WAIT_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ms
            .fetch_add(waited.as_millis() as u64, Ordering::Relaxed);
    }
}

/// What [`SessionHandle::watch`] publishes on every state change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateSnapshot {
    pub state: SessionState,
    /// Connections that reached `Joined` so far (1 after the first connect).
    pub connections: u64,
}

#[derive(Debug)]
struct StatusInner {
    state: SessionState,
    name: Option<String>,
    last_error: Option<String>,
    active_since: Option<Instant>,
}

/// The rooms a bot is in (or will be, once connected): one set, owned by the session.
/// [`SessionHandle::join`] and [`SessionHandle::leave`] change it; everyone else (the
/// `history` capability, status) only reads it.
#[derive(Clone, Debug, Default)]
pub struct Membership(Arc<RwLock<BTreeSet<String>>>);

impl Membership {
    pub fn new<I: IntoIterator<Item = String>>(rooms: I) -> Self {
        Membership(Arc::new(RwLock::new(rooms.into_iter().collect())))
    }

    pub fn contains(&self, room: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(room)
    }

    /// The rooms, sorted.
    pub fn rooms(&self) -> Vec<String> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn insert(&self, room: &str) -> bool {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(room.to_string())
    }

    pub(crate) fn remove(&self, room: &str) -> bool {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(room)
    }
}

/// State shared between the handles and the task.
#[derive(Debug)]
struct Shared {
    bot: String,
    started: Instant,
    status: Mutex<StatusInner>,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    connections: AtomicU64,
    outbox_stale: AtomicU64,
    /// Rooms joined again because the server said we were not in them.
    rejoins: AtomicU64,
    /// Rooms whose missed messages could not be recovered after a reconnect.
    history_gaps: AtomicU64,
    recoveries_overdue: AtomicU64,
    /// Sent entries given up on without confirmation (not sent again).
    outbox_unconfirmed: AtomicU64,
    /// New registrations after a confirmed-rejected key, and those the cap refused.
    reregistrations: AtomicU64,
    reregistrations_refused: AtomicU64,
    /// Replies whose row could not be committed (never sent).
    outbox_unsaved: AtomicU64,
    /// Replies queued whose row is not committed yet (part of the outbox depth).
    outbox_committing: AtomicUsize,
    /// Replies the rate limits held back, and how long they waited.
    pacing: PaceStats,
    throttles: AtomicU64,
    outbox_depth: AtomicUsize,
    protocol: ProtocolStats,
    state_tx: watch::Sender<StateSnapshot>,
    /// The bot's end reads these.
    events: Arc<EventQueue>,
    membership: Membership,
    /// With a shared store: each room's position as it would be saved now (up to the
    /// last message handed to the bot, or held at a gap still being recovered, with
    /// its live run). A reply's outbox row is committed together with them (one transaction),
    /// so a host that dies after it cannot leave the next holder a mention that was
    /// answered but looks unanswered.
    delivered: Mutex<std::collections::HashMap<String, crate::store::RoomPosition>>,
}

impl Shared {
    fn status(&self) -> MutexGuard<'_, StatusInner> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug)]
enum Command {
    /// A reply whose row is committed; `handed`: the row says it was handed to a
    /// connection already (its first send is recorded with no write of its own).
    Enqueued {
        entry: OutboxEntry,
        handed: bool,
    },
    Join(String),
    Leave(String),
    Shutdown,
}

/// A cloneable handle on a running session. Dropping every handle shuts the session down.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    cmds: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
    store: Store,
}

impl SessionHandle {
    /// Queues `text` for `room` and returns its outbox id at once. The row goes into
    /// the store's next group commit; the session sees the entry (and may send it) only
    /// once the row is committed. Never waits on the network or the disk. The bot must
    /// be in `room`.
    pub fn send(&self, room: &str, text: &str) -> Result<OutboxId, SessionError> {
        if self.cmds.is_closed() {
            return Err(SessionError::Stopped);
        }
        if text.trim().is_empty() {
            return Err(SessionError::EmptyText);
        }
        if !self.shared.membership.contains(room) {
            return Err(SessionError::NotJoined(room.to_string()));
        }
        let created_at = crate::store::now_ms();
        let (cmds, shared) = (self.cmds.clone(), self.shared.clone());
        let (room_owned, text_owned) = (room.to_string(), text.to_string());
        self.shared
            .outbox_committing
            .fetch_add(1, Ordering::Relaxed);
        let positions: Vec<crate::store::RoomPosition> = if self.store.is_shared() {
            self.shared
                .delivered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        // While the connection is active the row goes out as soon as it is committed:
        // it is written as handed to the connection (no separate "sent" write). When
        // the bot has no other message waiting, nothing is gained by committing on
        // another thread while it goes on: it commits here (with the rows of its
        // earlier replies still waiting), saving a hand-over. With more messages
        // waiting, its next replies follow at once: the row waits to be committed
        // with the last of them (see `ReplyRow::later`).
        let alone = self.shared.events.len() == 0;
        let how = crate::store::ReplyRow {
            handed: self.shared.state_tx.borrow().state == SessionState::Active,
            here: alone,
            later: !alone,
        };
        let id = self.store.outbox_enqueue_reply(
            &self.shared.bot,
            room,
            text,
            created_at,
            positions,
            how,
            move |id, committed| {
                match committed {
                    Ok(()) => {
                        let entry = OutboxEntry {
                            id,
                            bot: shared.bot.clone(),
                            room: room_owned,
                            text: text_owned,
                            created_at,
                            state: crate::store::OutboxState::Pending,
                            attempts: 0,
                            sent_at: None,
                        };
                        // The task takes it off `outbox_committing` as it adds it. If the
                        // task just stopped, the row stays for the next start.
                        let handed = how.handed;
                        if cmds.send(Command::Enqueued { entry, handed }).is_err() {
                            shared.outbox_committing.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        shared.outbox_committing.fetch_sub(1, Ordering::Relaxed);
                        shared.outbox_unsaved.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(
                            bot = %shared.bot,
                            room = %room_owned,
                            error = %e,
                            "reply not sent: its outbox row could not be saved"
                        );
                    }
                }
            },
        );
        Ok(id)
    }

    /// Commits on this thread the replies [`SessionHandle::send`] queued while more
    /// messages waited ([`crate::store::ReplyRow::later`]), unless a running commit
    /// takes them. For a bot whose last waiting message had no reply (they would
    /// otherwise wait for the store's bookkeeping flush, 2 ms), and as it stops.
    pub fn commit_waiting(&self) {
        self.store.commit_waiting();
    }

    /// Joins `room` now (if connected) and on every later connection.
    pub fn join(&self, room: &str) -> Result<(), SessionError> {
        validate_room(room)?;
        if self.cmds.is_closed() {
            return Err(SessionError::Stopped);
        }
        self.shared.membership.insert(room);
        self.cmds
            .send(Command::Join(room.to_string()))
            .map_err(|_| SessionError::Stopped)
    }

    /// Leaves `room`; its unsent outbox entries are dropped.
    pub fn leave(&self, room: &str) -> Result<(), SessionError> {
        if self.cmds.is_closed() {
            return Err(SessionError::Stopped);
        }
        self.shared.membership.remove(room);
        self.cmds
            .send(Command::Leave(room.to_string()))
            .map_err(|_| SessionError::Stopped)
    }

    /// A snapshot of state and counters.
    pub fn status(&self) -> SessionStatus {
        let s = &self.shared;
        let inner = s.status();
        SessionStatus {
            state: inner.state,
            name: inner.name.clone(),
            uptime: s.started.elapsed(),
            connected_for: inner.active_since.map(|t| t.elapsed()),
            reconnects: s.connections.load(Ordering::Relaxed).saturating_sub(1),
            last_error: inner.last_error.clone(),
            messages_in: s.messages_in.load(Ordering::Relaxed),
            messages_out: s.messages_out.load(Ordering::Relaxed),
            outbox_depth: s.outbox_depth.load(Ordering::Relaxed)
                + s.outbox_committing.load(Ordering::Relaxed),
            rooms: s.membership.rooms(),
            inbound_dropped: s.events.dropped.load(Ordering::Relaxed),
            outbox_stale: s.outbox_stale.load(Ordering::Relaxed),
            outbox_unsaved: s.outbox_unsaved.load(Ordering::Relaxed),
            paced: s.pacing.paced.load(Ordering::Relaxed),
            paced_stale: s.pacing.stale.load(Ordering::Relaxed),
            pace_wait_buckets: s
                .pacing
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            pace_wait_sum_ms: s.pacing.sum_ms.load(Ordering::Relaxed),
            rejoins: s.rejoins.load(Ordering::Relaxed),
            history_gaps: s.history_gaps.load(Ordering::Relaxed),
            recoveries_overdue: s.recoveries_overdue.load(Ordering::Relaxed),
            outbox_unconfirmed: s.outbox_unconfirmed.load(Ordering::Relaxed),
            reregistrations: s.reregistrations.load(Ordering::Relaxed),
            reregistrations_refused: s.reregistrations_refused.load(Ordering::Relaxed),
            throttles: s.throttles.load(Ordering::Relaxed),
            protocol: s.protocol.snapshot(),
        }
    }

    /// Messages handed over and not yet read by the bot.
    pub fn inbound_waiting(&self) -> usize {
        self.shared.events.len()
    }

    /// The rooms the bot is in (the one set the session owns).
    pub fn membership(&self) -> &Membership {
        &self.shared.membership
    }

    /// State changes as they happen (latest value wins).
    pub fn watch(&self) -> watch::Receiver<StateSnapshot> {
        self.shared.state_tx.subscribe()
    }

    /// Graceful shutdown: while connected, waits up to `shutdown_flush` for the outbox to
    /// drain, then closes the socket with a normal close (1000). Returns once the session
    /// has stopped and its last writes (the recovery positions) are committed.
    pub async fn shutdown(&self) {
        let mut rx = self.watch();
        // Replies queued just before are handed to the task before it flushes.
        self.store.flush().await;
        let _ = self.cmds.send(Command::Shutdown);
        // The task publishes Stopped last; if it is gone the sender is dropped.
        let _ = rx.wait_for(|s| s.state == SessionState::Stopped).await;
        self.store.flush().await;
    }
}

/// Starts a session for one bot. Must be called inside a tokio runtime.
///
/// Fails only on configuration errors (unparseable server URL, invalid name or room) or if
/// the outbox cannot be read from the store; everything on the network is retried.
pub fn spawn(config: SessionConfig, store: Store) -> Result<(SessionHandle, Events), SessionError> {
    let membership = Membership::new(config.rooms.iter().cloned());
    spawn_with(config, store, membership)
}

/// [`spawn`] with a [`Membership`] the caller created first (a bot hands it to its
/// persona's `history` capability before the session exists). The session adds
/// `config.rooms` to it and owns it from then on.
pub fn spawn_with(
    mut config: SessionConfig,
    store: Store,
    membership: Membership,
) -> Result<(SessionHandle, Events), SessionError> {
    let endpoints = config.validate()?;
    for room in &config.rooms {
        membership.insert(room);
    }
    config.rooms = membership.rooms();
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| SessionError::NoRuntime)?;
    let http = shared_http_client(config.connect_timeout)?;
    let bot = config.persona_id().to_string();
    // Finished outbox rows older than a day are only history.
    let _ = store.outbox_prune(crate::store::now_ms() - 86_400_000);
    let outbox = outbox::Outbox::load(store.clone(), &bot)?;
    let (state_tx, _) = watch::channel(StateSnapshot {
        state: SessionState::Connecting,
        connections: 0,
    });
    let events = EventQueue::new(config.inbound_capacity, config.inbound_bytes);
    let shared = Arc::new(Shared {
        bot: bot.clone(),
        started: Instant::now(),
        status: Mutex::new(StatusInner {
            state: SessionState::Connecting,
            name: None,
            last_error: None,
            active_since: None,
        }),
        messages_in: AtomicU64::new(0),
        messages_out: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        outbox_stale: AtomicU64::new(0),
        rejoins: AtomicU64::new(0),
        history_gaps: AtomicU64::new(0),
        recoveries_overdue: AtomicU64::new(0),
        outbox_unconfirmed: AtomicU64::new(0),
        reregistrations: AtomicU64::new(0),
        reregistrations_refused: AtomicU64::new(0),
        outbox_unsaved: AtomicU64::new(0),
        outbox_committing: AtomicUsize::new(0),
        pacing: PaceStats::default(),
        throttles: AtomicU64::new(0),
        outbox_depth: AtomicUsize::new(outbox.depth()),
        protocol: ProtocolStats::default(),
        state_tx,
        events: events.clone(),
        membership,
        delivered: Mutex::new(Default::default()),
    });
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let task = supervisor::Supervisor::new(supervisor::Parts {
        config,
        endpoints,
        store: store.clone(),
        http,
        shared: shared.clone(),
        cmds: cmd_rx,
        outbox,
    });
    runtime.spawn(task.run());
    Ok((
        SessionHandle {
            cmds: cmd_tx,
            shared,
            store,
        },
        Events::new(events),
    ))
}

/// Idle REST connections kept open to one server for the next request.
const IDLE_CONNECTIONS_PER_SERVER: usize = 64;

/// One HTTP client per connect timeout for every session of the process: a client
/// holds a connection pool and TLS roots, which thousands of bots need only once.
fn shared_http_client(connect_timeout: Duration) -> Result<reqwest::Client, SessionError> {
    static CLIENTS: OnceLock<Mutex<HashMap<Duration, reqwest::Client>>> = OnceLock::new();
    let mut clients = CLIENTS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(c) = clients.get(&connect_timeout) {
        return Ok(c.clone());
    }
    // Never follow a redirect: the chat key rides in a header (`x-api-key`), which
    // reqwest would carry to wherever the redirect points.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        // Thousands of bots starting together fetch their histories at once: the
        // connections that burst opens are not all kept open afterwards.
        .pool_max_idle_per_host(IDLE_CONNECTIONS_PER_SERVER)
        .user_agent(concat!("roost/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| SessionError::Http(http::error_chain(&e)))?;
    clients.insert(connect_timeout, client.clone());
    Ok(client)
}

#[cfg(test)]
mod redirect_tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::identity::{KeyCheck, check_key};
    use super::*;
    use crate::protocol::ApiKey;

    /// Reads one request head from each connection, keeps it, and answers `answer`.
    async fn serve(listener: TcpListener, answer: String, heads: Arc<Mutex<Vec<String>>>) {
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            while n < buf.len() {
                match sock.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            heads
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            let _ = sock.write_all(answer.as_bytes()).await;
            let _ = sock.shutdown().await;
        }
    }

    #[tokio::test]
    async fn the_chat_key_is_never_sent_on_a_redirect() {
        let elsewhere = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let elsewhere_addr = elsewhere.local_addr().unwrap();
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let (at_server, at_elsewhere) = (Arc::default(), Arc::default());
        let redirect = format!(
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{elsewhere_addr}/api/rooms\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let ok = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n[]".to_string();
        tokio::spawn(serve(server, redirect, Arc::clone(&at_server)));
        tokio::spawn(serve(elsewhere, ok, Arc::clone(&at_elsewhere)));

        let http = shared_http_client(Duration::from_secs(5)).unwrap();
        let endpoints = http::Endpoints::parse(&format!("http://{server_addr}")).unwrap();
        let key = ApiKey::new("ac_redirectedKey0123456789");
        let check = check_key(&http, &endpoints, &key, Duration::from_secs(5)).await;
        // The redirect is an answer, not followed: nothing is known about the key.
        assert!(
            matches!(check, KeyCheck::Unknown(ref why) if why.contains("307")),
            "{check:?}"
        );
        let heads = at_server.lock().unwrap().clone();
        assert_eq!(heads.len(), 1);
        assert!(
            heads[0]
                .to_ascii_lowercase()
                .contains("x-api-key: ac_redirectedkey")
        );
        // Had the client followed, `check_key` would have waited for this listener's
        // answer: it returned, so nothing reached it, the key least of all.
        let reached = at_elsewhere.lock().unwrap().clone();
        assert!(reached.is_empty(), "{reached:?}");
        assert!(!reached.concat().contains("ac_redirectedKey"));
    }
}
