//! The server's data (agents, keys, rooms, history) and its live connections,
//! behind one cheap-to-clone handle that outlives a server instance.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{broadcast, mpsc};
use tokio::task::AbortHandle;

use super::ServerConfig;
use crate::protocol::{
    AgentInfo, ApiKey, ChatMessage, RoomAgent, RoomInfo, SYSTEM_SENDER, ServerFrame,
};

/// Something that happened on the server, for tests that wait on events
/// instead of sleeping (see [`ServerState::subscribe`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent {
    Registered {
        name: String,
    },
    /// A WebSocket connection was accepted (after the `connected` frame was queued).
    Connected {
        agent: String,
        conn: u64,
    },
    /// A WebSocket connection ended, for whatever reason.
    Disconnected {
        agent: String,
        conn: u64,
    },
    Joined {
        agent: String,
        room: String,
    },
    Left {
        agent: String,
        room: String,
    },
    /// A message was stored and broadcast (system lines included).
    Message(ChatMessage),
}

/// A successful registration.
#[derive(Clone, Debug)]
pub struct Registration {
    pub name: String,
    pub agent_id: String,
    pub key: ApiKey,
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    #[error("invalid {0}")]
    InvalidName(crate::names::NameError),
    #[error("name already taken")]
    NameTaken,
    #[error("description longer than {0} characters")]
    DescriptionTooLong(usize),
}

/// Why a message could not be posted or a room joined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PostError {
    #[error("invalid {0}")]
    InvalidRoom(crate::names::NameError),
    #[error("no such room")]
    NoSuchRoom,
    #[error("join #{0} before sending to it")]
    NotJoined(String),
    #[error("empty message")]
    EmptyText,
    #[error("message longer than {0} bytes")]
    TextTooLong(usize),
    #[error("connection is gone")]
    NoConnection,
}

pub(crate) const MAX_DESCRIPTION_CHARS: usize = 500;

/// What a connection task is asked to put on the wire.
#[derive(Debug)]
pub(crate) enum Outbound {
    Text(Utf8Bytes),
    Close { code: u16, reason: String },
}

pub(crate) struct Conn {
    pub agent: String,
    pub instance: u64,
    pub rooms: HashSet<String>,
    pub tx: mpsc::Sender<Outbound>,
    pub abort: AbortHandle,
}

struct Agent {
    name: String,
    description: String,
    registered_at: u64,
}

struct Room {
    description: String,
    messages: VecDeque<ChatMessage>,
    last_ts: u64,
    /// agent name -> joined at (ms)
    members: BTreeMap<String, u64>,
}

impl Room {
    fn new(description: String) -> Self {
        Self {
            description,
            messages: VecDeque::new(),
            last_ts: 0,
            members: BTreeMap::new(),
        }
    }
}

#[derive(Default)]
struct Data {
    /// lower-cased name -> agent
    agents: HashMap<String, Agent>,
    /// key -> lower-cased agent name
    keys: HashMap<String, String>,
    rooms: BTreeMap<String, Room>,
    conns: HashMap<u64, Conn>,
}

struct Shared {
    config: ServerConfig,
    data: Mutex<Data>,
    events: broadcast::Sender<ServerEvent>,
    next_id: AtomicU64,
    clock_offset_ms: AtomicI64,
}

/// All state of a local chat server: registrations, rooms, history and live
/// connections. Cloning gives another handle to the same state; pass it to
/// [`spawn_with_state`](super::spawn_with_state) to "restart" a server with
/// everything it knew.
#[derive(Clone)]
pub struct ServerState {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState").finish_non_exhaustive()
    }
}

/// Checks an agent name ([`BotName`](crate::names::BotName)'s rule).
pub(crate) fn validate_agent_name(name: &str) -> Result<(), crate::names::NameError> {
    crate::names::BotName::check(name)
}

/// Checks a room name ([`RoomName`](crate::names::RoomName)'s rule).
pub(crate) fn validate_room_name(room: &str) -> Result<(), crate::names::NameError> {
    crate::names::RoomName::check(room)
}

fn random_hex(bytes: usize) -> String {
    let buf: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(buf)
}

impl ServerState {
    /// Fresh state with the configured default rooms.
    pub fn new(config: ServerConfig) -> Self {
        let mut data = Data::default();
        for (name, description) in &config.rooms {
            if validate_room_name(name).is_ok() {
                data.rooms
                    .insert(name.clone(), Room::new(description.clone()));
            }
        }
        let (events, _) = broadcast::channel(1024);
        Self {
            shared: Arc::new(Shared {
                config,
                data: Mutex::new(data),
                events,
                next_id: AtomicU64::new(1),
                clock_offset_ms: AtomicI64::new(0),
            }),
        }
    }

    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }

    fn data(&self) -> MutexGuard<'_, Data> {
        // A panic elsewhere must not take the server down with it.
        self.shared
            .data
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn emit(&self, event: ServerEvent) {
        let _ = self.shared.events.send(event);
    }

    /// Events from now on. Slow receivers lose the oldest events (`Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<ServerEvent> {
        self.shared.events.subscribe()
    }

    /// The server's clock: system time in ms, plus any [`skew_clock`](Self::skew_clock).
    pub fn now_ms(&self) -> u64 {
        let sys = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let off = self.shared.clock_offset_ms.load(Ordering::Relaxed);
        u64::try_from(sys.saturating_add(off)).unwrap_or(0)
    }

    /// Moves the server's clock forward (for retention tests without waiting an hour).
    pub fn skew_clock(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.shared.clock_offset_ms.fetch_add(ms, Ordering::Relaxed);
    }

    pub(crate) fn next_conn_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    // -- agents ------------------------------------------------------------

    /// Registers an agent (what `POST /api/register` does). Names are unique
    /// case-insensitively; `system` is reserved.
    pub fn register(&self, name: &str, description: &str) -> Result<Registration, RegisterError> {
        validate_agent_name(name).map_err(RegisterError::InvalidName)?;
        if description.chars().count() > MAX_DESCRIPTION_CHARS {
            return Err(RegisterError::DescriptionTooLong(MAX_DESCRIPTION_CHARS));
        }
        let lower = name.to_lowercase();
        if lower == SYSTEM_SENDER {
            return Err(RegisterError::NameTaken);
        }
        let now = self.now_ms();
        let key = format!("nh_{}", random_hex(24));
        let agent_id = format!("agent_{}", random_hex(6));
        {
            let mut data = self.data();
            if data.agents.contains_key(&lower) {
                return Err(RegisterError::NameTaken);
            }
            data.agents.insert(
                lower.clone(),
                Agent {
                    name: name.to_owned(),
                    description: description.to_owned(),
                    registered_at: now,
                },
            );
            data.keys.insert(key.clone(), lower);
        }
        self.emit(ServerEvent::Registered {
            name: name.to_owned(),
        });
        Ok(Registration {
            name: name.to_owned(),
            agent_id,
            key: ApiKey::new(key),
        })
    }

    /// The agent a key belongs to, if the key is valid.
    pub fn agent_for_key(&self, key: &str) -> Option<String> {
        let data = self.data();
        let lower = data.keys.get(key)?;
        data.agents.get(lower).map(|a| a.name.clone())
    }

    /// Invalidates every key of `agent` (case-insensitive). Live sockets stay
    /// open; the next REST call or WebSocket connect with the key gets 401.
    /// Returns whether a key was revoked.
    pub fn revoke_key(&self, agent: &str) -> bool {
        let lower = agent.to_lowercase();
        let mut data = self.data();
        let before = data.keys.len();
        data.keys.retain(|_, a| *a != lower);
        data.keys.len() != before
    }

    /// Registered agents, in name order.
    pub fn agents(&self) -> Vec<AgentInfo> {
        let data = self.data();
        let mut out: Vec<AgentInfo> = data
            .agents
            .values()
            .map(|a| AgentInfo {
                name: a.name.clone(),
                description: Some(a.description.clone()),
                registered_at: Some(a.registered_at),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    // -- rooms -------------------------------------------------------------

    pub fn rooms(&self) -> Vec<RoomInfo> {
        self.data()
            .rooms
            .iter()
            .map(|(name, r)| RoomInfo {
                name: name.clone(),
                description: Some(r.description.clone()),
            })
            .collect()
    }

    /// Creates a room; `Ok(false)` if it already existed.
    pub fn create_room(&self, name: &str, description: &str) -> Result<bool, PostError> {
        validate_room_name(name).map_err(PostError::InvalidRoom)?;
        let mut data = self.data();
        if data.rooms.contains_key(name) {
            return Ok(false);
        }
        data.rooms
            .insert(name.to_owned(), Room::new(description.to_owned()));
        Ok(true)
    }

    pub fn room_exists(&self, room: &str) -> bool {
        self.data().rooms.contains_key(room)
    }

    /// Agents currently in `room` (joined by REST or on a live socket).
    pub fn room_agents(&self, room: &str) -> Option<Vec<RoomAgent>> {
        let data = self.data();
        let r = data.rooms.get(room)?;
        Some(
            r.members
                .iter()
                .map(|(name, at)| RoomAgent {
                    name: name.clone(),
                    joined_at: Some(*at),
                })
                .collect(),
        )
    }

    /// REST join: records membership (creating the room if needed) and posts
    /// the join line if the agent was not in the room yet. Returns whether the
    /// agent was newly added.
    pub fn join_room(&self, agent: &str, room: &str) -> Result<bool, PostError> {
        validate_room_name(room).map_err(PostError::InvalidRoom)?;
        let now = self.now_ms();
        let newly = {
            let mut data = self.data();
            let r = data
                .rooms
                .entry(room.to_owned())
                .or_insert_with(|| Room::new(String::new()));
            if r.members.contains_key(agent) {
                false
            } else {
                r.members.insert(agent.to_owned(), now);
                true
            }
        };
        if newly {
            self.emit(ServerEvent::Joined {
                agent: agent.to_owned(),
                room: room.to_owned(),
            });
            self.post_system(room, &format!("\u{26a1} {agent} joined #{room}."));
        }
        Ok(newly)
    }

    // -- messages ----------------------------------------------------------

    fn check_text(&self, text: &str) -> Result<(), PostError> {
        if text.trim().is_empty() {
            return Err(PostError::EmptyText);
        }
        let max = self.shared.config.max_text_len;
        if text.len() > max {
            return Err(PostError::TextTooLong(max));
        }
        Ok(())
    }

    /// Stores a message and broadcasts it to every connection in the room.
    fn store_and_broadcast(
        &self,
        data: &mut Data,
        from: &str,
        room: &str,
        text: &str,
    ) -> ChatMessage {
        let now = self.now_ms();
        let retention = self.retention_ms();
        let capacity = self.shared.config.room_capacity;
        let r = data
            .rooms
            .entry(room.to_owned())
            .or_insert_with(|| Room::new(String::new()));
        let ts = now.max(r.last_ts.saturating_add(1));
        r.last_ts = ts;
        let msg = ChatMessage {
            room: room.to_owned(),
            from: from.to_owned(),
            text: text.to_owned(),
            timestamp_ms: ts,
        };
        r.messages.push_back(msg.clone());
        prune(r, now, retention, capacity);
        let frame = Utf8Bytes::from(ServerFrame::Message(msg.clone()).encode());
        broadcast_in(data, room, &frame);
        msg
    }

    fn retention_ms(&self) -> u64 {
        u64::try_from(self.shared.config.retention.as_millis()).unwrap_or(u64::MAX)
    }

    /// Posts a message as `from` (any name, registered or not) to `room`,
    /// creating the room if needed: the test-facing way to "say" something
    /// without a socket. Stored and broadcast like any other message.
    pub fn post_message(
        &self,
        from: &str,
        room: &str,
        text: &str,
    ) -> Result<ChatMessage, PostError> {
        validate_room_name(room).map_err(PostError::InvalidRoom)?;
        self.check_text(text)?;
        let msg = {
            let mut data = self.data();
            self.store_and_broadcast(&mut data, from, room, text)
        };
        self.emit(ServerEvent::Message(msg.clone()));
        Ok(msg)
    }

    /// REST send: the room must exist.
    pub(crate) fn post_rest(
        &self,
        from: &str,
        room: &str,
        text: &str,
    ) -> Result<ChatMessage, PostError> {
        self.check_text(text)?;
        let msg = {
            let mut data = self.data();
            if !data.rooms.contains_key(room) {
                return Err(PostError::NoSuchRoom);
            }
            self.store_and_broadcast(&mut data, from, room, text)
        };
        self.emit(ServerEvent::Message(msg.clone()));
        Ok(msg)
    }

    /// A system line (`from: "system"`).
    pub(crate) fn post_system(&self, room: &str, text: &str) -> ChatMessage {
        let msg = {
            let mut data = self.data();
            self.store_and_broadcast(&mut data, SYSTEM_SENDER, room, text)
        };
        self.emit(ServerEvent::Message(msg.clone()));
        msg
    }

    /// Up to `limit` messages of `room` newer than `after` (exclusive), newest
    /// first. `None` if the room does not exist.
    pub fn messages(
        &self,
        room: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Option<Vec<ChatMessage>> {
        let now = self.now_ms();
        let retention = self.retention_ms();
        let capacity = self.shared.config.room_capacity;
        let mut data = self.data();
        let r = data.rooms.get_mut(room)?;
        prune(r, now, retention, capacity);
        Some(
            r.messages
                .iter()
                .rev()
                .filter(|m| after.is_none_or(|a| m.timestamp_ms > a))
                .take(limit)
                .cloned()
                .collect(),
        )
    }

    // -- connections -------------------------------------------------------

    /// Registers a live connection. Returns false if the id is taken.
    pub(crate) fn insert_conn(&self, id: u64, conn: Conn) -> bool {
        let mut data = self.data();
        if data.conns.contains_key(&id) {
            return false;
        }
        data.conns.insert(id, conn);
        true
    }

    /// Forgets a connection (called when its task ends or is aborted) and
    /// removes the agent from rooms it no longer has a socket in.
    pub(crate) fn remove_conn(&self, id: u64) {
        let removed = {
            let mut data = self.data();
            let Some(conn) = data.conns.remove(&id) else {
                return;
            };
            for room in &conn.rooms {
                let still_there = data
                    .conns
                    .values()
                    .any(|c| c.agent == conn.agent && c.rooms.contains(room));
                if !still_there && let Some(r) = data.rooms.get_mut(room) {
                    r.members.remove(&conn.agent);
                }
            }
            conn
        };
        self.emit(ServerEvent::Disconnected {
            agent: removed.agent,
            conn: id,
        });
    }

    pub(crate) fn connected(&self, agent: &str, conn: u64) {
        self.emit(ServerEvent::Connected {
            agent: agent.to_owned(),
            conn,
        });
    }

    /// A `join` frame on connection `id`. Posts the join line if the
    /// connection was not in the room yet.
    pub(crate) fn conn_join(&self, id: u64, room: &str) -> Result<(), PostError> {
        validate_room_name(room).map_err(PostError::InvalidRoom)?;
        let now = self.now_ms();
        let agent = {
            let mut data = self.data();
            let conn = data.conns.get_mut(&id).ok_or(PostError::NoConnection)?;
            if !conn.rooms.insert(room.to_owned()) {
                return Ok(());
            }
            let agent = conn.agent.clone();
            let r = data
                .rooms
                .entry(room.to_owned())
                .or_insert_with(|| Room::new(String::new()));
            r.members.entry(agent.clone()).or_insert(now);
            agent
        };
        self.emit(ServerEvent::Joined {
            agent: agent.clone(),
            room: room.to_owned(),
        });
        self.post_system(room, &format!("\u{26a1} {agent} joined #{room}."));
        Ok(())
    }

    /// A `leave` frame on connection `id`.
    pub(crate) fn conn_leave(&self, id: u64, room: &str) {
        let agent = {
            let mut data = self.data();
            let Some(conn) = data.conns.get_mut(&id) else {
                return;
            };
            if !conn.rooms.remove(room) {
                return;
            }
            let agent = conn.agent.clone();
            let still_there = data
                .conns
                .values()
                .any(|c| c.agent == agent && c.rooms.contains(room));
            if !still_there && let Some(r) = data.rooms.get_mut(room) {
                r.members.remove(&agent);
            }
            agent
        };
        self.emit(ServerEvent::Left {
            agent,
            room: room.to_owned(),
        });
    }

    /// A `send` frame on connection `id`: the connection must have joined the room.
    pub(crate) fn conn_send(
        &self,
        id: u64,
        room: &str,
        text: &str,
    ) -> Result<ChatMessage, PostError> {
        self.check_text(text)?;
        let msg = {
            let mut data = self.data();
            let conn = data.conns.get(&id).ok_or(PostError::NoConnection)?;
            if !conn.rooms.contains(room) {
                return Err(PostError::NotJoined(room.to_owned()));
            }
            let agent = conn.agent.clone();
            self.store_and_broadcast(&mut data, &agent, room, text)
        };
        self.emit(ServerEvent::Message(msg.clone()));
        Ok(msg)
    }

    /// Queues `out` for every connection of `instance` (all instances if
    /// `None`); returns how many got it.
    pub(crate) fn send_to_all(
        &self,
        instance: Option<u64>,
        mut out: impl FnMut() -> Outbound,
    ) -> usize {
        let data = self.data();
        let mut n = 0;
        for conn in data.conns.values() {
            if instance.is_some_and(|i| i != conn.instance) {
                continue;
            }
            if queue(conn, out()) {
                n += 1;
            }
        }
        n
    }

    /// Aborts every connection of `instance` (the socket is dropped without a
    /// close frame). Returns how many.
    pub(crate) fn abort_conns(&self, instance: u64) -> usize {
        let data = self.data();
        let mut n = 0;
        for conn in data.conns.values().filter(|c| c.instance == instance) {
            conn.abort.abort();
            n += 1;
        }
        n
    }

    /// Forgets the joined rooms of every connection of `instance` (the fault
    /// [`Faults::forget_joins`](super::Faults::forget_joins)): agents without
    /// another socket in a room leave its member list, a `Left` event is
    /// emitted per connection and room, no leave line is posted. Returns how
    /// many connections had joined rooms.
    pub(crate) fn forget_joins(&self, instance: u64) -> usize {
        let mut left = Vec::new();
        let mut n = 0;
        {
            let mut data = self.data();
            let mut forgotten: Vec<(String, String)> = Vec::new();
            for conn in data.conns.values_mut().filter(|c| c.instance == instance) {
                if conn.rooms.is_empty() {
                    continue;
                }
                n += 1;
                forgotten.extend(conn.rooms.drain().map(|r| (conn.agent.clone(), r)));
            }
            for (agent, room) in forgotten {
                let still_there = data
                    .conns
                    .values()
                    .any(|c| c.agent == agent && c.rooms.contains(&room));
                if !still_there && let Some(r) = data.rooms.get_mut(&room) {
                    r.members.remove(&agent);
                }
                left.push((agent, room));
            }
        }
        for (agent, room) in left {
            self.emit(ServerEvent::Left { agent, room });
        }
        n
    }

    /// Live connections of `instance` (all instances if `None`).
    pub(crate) fn conn_count(&self, instance: Option<u64>) -> usize {
        self.data()
            .conns
            .values()
            .filter(|c| instance.is_none_or(|i| i == c.instance))
            .count()
    }

    /// Number of live WebSocket connections, across server instances sharing this state.
    pub fn connection_count(&self) -> usize {
        self.conn_count(None)
    }
}

/// Drops expired messages and trims the room to `capacity`.
fn prune(r: &mut Room, now: u64, retention_ms: u64, capacity: usize) {
    while r
        .messages
        .front()
        .is_some_and(|m| now.saturating_sub(m.timestamp_ms) >= retention_ms)
    {
        r.messages.pop_front();
    }
    while r.messages.len() > capacity {
        r.messages.pop_front();
    }
}

/// Queues a frame on a connection; a connection whose outbox is full is too
/// slow to keep and gets dropped.
fn queue(conn: &Conn, out: Outbound) -> bool {
    match conn.tx.try_send(out) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!(agent = %conn.agent, "dev server: outbox full, dropping slow connection");
            conn.abort.abort();
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

fn broadcast_in(data: &Data, room: &str, frame: &Utf8Bytes) {
    for conn in data.conns.values().filter(|c| c.rooms.contains(room)) {
        queue(conn, Outbound::Text(frame.clone()));
    }
}
