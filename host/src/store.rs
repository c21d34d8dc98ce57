//! roost's persisted state, behind one interface with two backends.
//!
//! - **SQLite** (the default): one file at `<state dir>/roost.db`, for a single host
//!   with no server to run. See [`sqlite`](self) below: WAL, group commit, versioned
//!   schema.
//! - **PostgreSQL** (`--store postgres://...`, `ROOST_STORE`, or `[store] url`): several
//!   roost hosts share one database; each persona runs on the host holding its
//!   [lease](crate::lease), and every outbox row and kv write carries that lease's
//!   epoch, which the database checks (a host that lost a lease cannot write).
//!
//! What lives here: the credentials each persona registered with (per server URL and
//! persona identity), re-registrations, the persisted outbox, each room's recovery
//! position, per-persona key/value data (the `kv` capability), and, with PostgreSQL,
//! the leases.
//!
//! [`Store`] is a cloneable handle with a synchronous API (see the blocking policy in
//! the SQLite backend's docs; the PostgreSQL backend runs its connections on a runtime
//! of its own, so a call from async code waits for one round trip on loopback or LAN).
//! Hot-path writes (outbox rows, sends, confirmations, positions) are group-committed
//! by both backends: [`Store::outbox_enqueue`] tells its caller when the row is durable.
//!
//! ```
//! # fn main() -> Result<(), roost::store::StoreError> {
//! let dir = std::env::temp_dir().join(format!("roost-doc-{}", std::process::id()));
//! let store = roost::store::Store::open(&dir)?;
//! let key = roost::protocol::ApiKey::new("k-123");
//! store.save_credentials("https://nohumans.chat", "echo", "echo-bot", &key)?;
//! let creds = store.credentials("https://nohumans.chat", "echo")?;
//! assert_eq!(creds.map(|c| c.name).as_deref(), Some("echo-bot"));
//! let id = store.outbox_push("echo", "lobby", "hello", 1_000)?;
//! assert_eq!(store.outbox_pending("echo")?[0].id, id);
//! # drop(store); let _ = std::fs::remove_dir_all(&dir);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::protocol::ApiKey;

pub(crate) mod postgres;
pub(crate) mod sqlite;

pub use postgres::{LeaseRow, PgOptions};
pub use sqlite::{CommitHold, DB_FILE, SCHEMA_VERSION};

/// Errors of the state store. Every variant names the database file; none contains a key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot secure state database {path} (mode 0600): {source}")]
    Permissions {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open state database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "state database {path} is corrupt or not a roost database ({detail}); \
         move it aside to start with a fresh state"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "state database {path} has schema version {found}, newer than this roost \
         supports ({supported}); upgrade roost"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("state database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state database {location}: {detail}")]
    Postgres { location: String, detail: String },
    #[error(
        "state database {location} has schema version {found}, newer than this roost \
         supports ({supported}); upgrade roost"
    )]
    PgTooNew {
        location: String,
        found: i64,
        supported: i64,
    },
    #[error("persona {persona}: this host does not hold its lease (write refused)")]
    Fenced { persona: String },
    #[error("leases need a shared store: set [store] url to postgres://...")]
    NotShared,
    #[error("the state store is shutting down")]
    Gone,
    #[error("state database {path}: unexpected value {value:?} in {what}")]
    Invalid {
        path: PathBuf,
        what: &'static str,
        value: String,
    },
}

/// Credentials a persona registered with on one server.
#[derive(Clone)]
pub struct StoredCredentials {
    /// The name the server gave the agent (may differ from the one asked for).
    pub name: String,
    /// The API key. Never logged: `Debug` prints `[redacted]`.
    pub key: ApiKey,
}

impl fmt::Debug for StoredCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredCredentials")
            .field("name", &self.name)
            .field("key", &"[redacted]")
            .finish()
    }
}

/// The id of an outbox entry (unique in one database, increasing in insertion order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OutboxId(pub i64);

impl fmt::Display for OutboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Where an outbox entry is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutboxState {
    /// Queued, not yet written to any connection.
    Pending,
    /// Written to a connection at least once; its echo has not been seen.
    Sent,
    /// The server echoed it back: delivered.
    Confirmed,
    /// Dropped unsent or unconfirmed because it outlived the outbox TTL.
    Stale,
    /// Dropped because the bot left the room (or the session gave up on it).
    Cancelled,
}

impl OutboxState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            OutboxState::Pending => "pending",
            OutboxState::Sent => "sent",
            OutboxState::Confirmed => "confirmed",
            OutboxState::Stale => "stale",
            OutboxState::Cancelled => "cancelled",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => OutboxState::Pending,
            "sent" => OutboxState::Sent,
            "confirmed" => OutboxState::Confirmed,
            "stale" => OutboxState::Stale,
            "cancelled" => OutboxState::Cancelled,
            _ => return None,
        })
    }

    /// True for states that still need work (pending or sent-unconfirmed).
    pub fn is_open(self) -> bool {
        matches!(self, OutboxState::Pending | OutboxState::Sent)
    }
}

impl fmt::Display for OutboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One persisted outbound message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    pub id: OutboxId,
    pub bot: String,
    pub room: String,
    pub text: String,
    /// Unix milliseconds when it was queued.
    pub created_at: i64,
    pub state: OutboxState,
    /// How many times it was written to a connection.
    pub attempts: u32,
    /// Unix milliseconds of the last write to a connection.
    pub sent_at: Option<i64>,
}

/// How hard a commit waits for the disk (SQLite's `synchronous` in WAL mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// A commit is written to the WAL file before it is acknowledged, and survives the
    /// process crashing; the WAL is synced to disk at checkpoints, so an operating-system
    /// crash or power loss can lose the last commits. The default: see README.md for
    /// the measurement.
    #[default]
    Normal,
    /// Every commit is also synced to disk (fsync) before it is acknowledged: survives
    /// power loss, at the cost of one fsync per group commit.
    Full,
}

impl Synchronous {
    pub(crate) fn pragma(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

/// How much the group commit has done: `writes / batches` is the mean group size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CommitStats {
    /// Transactions committed.
    pub batches: u64,
    /// Writes committed in them.
    pub writes: u64,
}

/// Where a bot stands in one room, as saved for its next start: everything up to
/// `last_ts` (Unix ms, server time) was handed to it. While the recovery of what
/// followed `last_ts` has not finished, the bot may already have heard messages live
/// past that gap: `live` is the (first, last) timestamp of such a run, all of it
/// handed over, so a restart fetches the gap again without handing that run over a
/// second time.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RoomPosition {
    pub room: String,
    pub last_ts: u64,
    pub live: Option<(u64, u64)>,
}

impl RoomPosition {
    /// A position with nothing heard past it.
    pub fn at(room: impl Into<String>, last_ts: u64) -> Self {
        RoomPosition {
            room: room.into(),
            last_ts,
            live: None,
        }
    }
}

/// A `room_positions` row as both databases store it (timestamps as signed
/// integers; a live run only when both of its ends are there).
fn position_from_row(
    room: String,
    last_ts: i64,
    live_from: Option<i64>,
    live_until: Option<i64>,
) -> RoomPosition {
    let ms = |t: i64| u64::try_from(t).unwrap_or(0);
    RoomPosition {
        room,
        last_ts: ms(last_ts),
        live: live_from.zip(live_until).map(|(a, b)| (ms(a), ms(b))),
    }
}

/// The `last_ts`, `live_from` and `live_until` columns of a `room_positions` row as
/// both databases store them: the inverse of [`position_from_row`].
fn position_columns(last_ts: u64, live: Option<(u64, u64)>) -> (i64, Option<i64>, Option<i64>) {
    let ms = |t: u64| i64::try_from(t).unwrap_or(i64::MAX);
    (ms(last_ts), live.map(|l| ms(l.0)), live.map(|l| ms(l.1)))
}

/// How [`Store::outbox_enqueue_reply`] writes and commits a reply's row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyRow {
    /// The row is written as already handed to a connection (state `sent`, one
    /// attempt, `sent_at` its creation): the caller sends it as soon as it is
    /// committed and records no separate send for that first write, one write fewer
    /// per reply. A crash between the commit and the send then counts as a send: the
    /// entry goes out again after a restart only if the recovered history lacks it,
    /// and the crash costs it one of its re-sends (never a send beyond the cap).
    pub handed: bool,
    /// The caller has nothing else to do until the row is committed (its bot has no
    /// other message waiting): when no commit is running, the row is committed on
    /// the calling thread before the call returns, with no hand-over to another
    /// thread. SQLite only; otherwise it joins the next group commit.
    pub here: bool,
    /// More replies of the caller follow at once (its bot has more messages
    /// waiting): the row starts no commit of its own but waits for the caller's
    /// last reply, which commits them together on its thread ([`ReplyRow::here`]),
    /// or for [`Store::commit_waiting`], and at worst for the bookkeeping commit a
    /// couple of milliseconds later. SQLite only.
    pub later: bool,
}

/// Size limits of one persona's key/value namespace. Sizes count the key's UTF-8 bytes
/// plus the value's bytes of every entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvQuota {
    /// Most bytes (keys + values) one persona may hold. Default 1 MiB.
    pub total_bytes: u64,
    /// Largest single value. Default 64 KiB.
    pub value_bytes: u64,
}

impl Default for KvQuota {
    fn default() -> Self {
        KvQuota {
            total_bytes: 1 << 20,
            value_bytes: 64 << 10,
        }
    }
}

/// Why [`Store::kv_set`] stored nothing.
#[derive(Debug, thiserror::Error)]
pub enum KvSetError {
    #[error("a value of {size} bytes is larger than the limit of {limit} bytes per value")]
    ValueTooLarge { size: u64, limit: u64 },
    #[error(
        "storing this would bring the namespace to {would_use} bytes, over its quota of \
         {quota} bytes ({used} bytes in use)"
    )]
    QuotaExceeded {
        used: u64,
        would_use: u64,
        quota: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// the interface

/// A cloneable handle on the state store (SQLite or PostgreSQL).
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    /// Lease fences (PostgreSQL with leases on): which epoch this host holds for each
    /// persona and until when it may act on it. `None`: a single host, no leases.
    fences: Option<Arc<Fences>>,
}

#[derive(Clone)]
enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            Backend::Sqlite(s) => fmt::Debug::fmt(s, f),
            Backend::Postgres(p) => fmt::Debug::fmt(p, f),
        }
    }
}

/// Which store a host uses: `[store] url`, `--store`, `ROOST_STORE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// The embedded SQLite file in the state directory (the default).
    Sqlite,
    /// A PostgreSQL server, `postgres://` or `postgresql://` (libpq URL syntax).
    Postgres(String),
}

impl StoreUrl {
    /// Parses a store URL: empty, `sqlite` or `sqlite:` is the embedded default;
    /// `postgres://...` / `postgresql://...` a server. Anything else is a one-line error.
    pub fn parse(url: &str) -> Result<StoreUrl, String> {
        let url = url.trim();
        if url.is_empty() || url == "sqlite" || url == "sqlite:" {
            return Ok(StoreUrl::Sqlite);
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            url.parse::<tokio_postgres::Config>()
                .map_err(|e| format!("store URL {}: {e}", redact_url(url)))?;
            return Ok(StoreUrl::Postgres(url.to_string()));
        }
        Err(format!(
            "store URL {}: expected postgres://... (or sqlite for the embedded default)",
            redact_url(url)
        ))
    }
}

/// `url` with any password replaced by `***` (for logs, errors and the printed
/// configuration): the one in the user-info part and a `password=` parameter.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            let secret = |k: &str| k.eq_ignore_ascii_case("password");
            if u.query_pairs().any(|(k, _)| secret(&k)) {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if secret(&k) {
                            "***".into()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => "(unparseable URL)".to_string(),
    }
}

/// What this host may do for each persona it holds a lease on.
#[derive(Debug)]
pub(crate) struct Fences {
    pub(crate) host: String,
    map: RwLock<HashMap<String, Fence>>,
}

#[derive(Clone, Copy, Debug)]
struct Fence {
    epoch: i64,
    /// Past this instant (monotonic: it counts while the process is stopped) the host
    /// no longer trusts its lease and sends nothing for the persona.
    valid_until: Instant,
}

impl Fences {
    fn get(&self, persona: &str) -> Option<Fence> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(persona)
            .copied()
    }
}

/// A write fenced by a lease: the persona, this host, the epoch it holds.
#[derive(Clone, Debug)]
pub(crate) struct FenceToken {
    pub(crate) persona: String,
    pub(crate) host: String,
    pub(crate) epoch: i64,
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match &$self.backend {
            Backend::Sqlite($b) => $e,
            Backend::Postgres($b) => $e,
        }
    };
}

impl Store {
    /// Opens (creating if needed) `<state_dir>/roost.db` and migrates it to the current
    /// schema, with `synchronous = NORMAL`.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        Self::open_with(state_dir, Synchronous::default())
    }

    /// [`Store::open`] with a choice of [`Synchronous`].
    pub fn open_with(state_dir: &Path, synchronous: Synchronous) -> Result<Store, StoreError> {
        Ok(Store::sqlite(sqlite::Sqlite::open_with(
            state_dir,
            synchronous,
        )?))
    }

    /// An in-memory SQLite database (tests, `roost replay`). Nothing is persisted.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Ok(Store::sqlite(sqlite::Sqlite::open_in_memory()?))
    }

    /// Connects to PostgreSQL at `url` and applies the migrations this build knows
    /// (one host at a time, under an advisory lock). Writes are not fenced until
    /// [`Store::enable_leases`].
    pub fn open_postgres(url: &str, options: PgOptions) -> Result<Store, StoreError> {
        Ok(Store {
            backend: Backend::Postgres(postgres::Postgres::connect(url, options)?),
            fences: None,
        })
    }

    /// Opens what `url` names: SQLite in `state_dir`, or PostgreSQL.
    pub fn open_url(
        url: &StoreUrl,
        state_dir: &Path,
        synchronous: Synchronous,
        options: PgOptions,
    ) -> Result<Store, StoreError> {
        match url {
            StoreUrl::Sqlite => Store::open_with(state_dir, synchronous),
            StoreUrl::Postgres(url) => Store::open_postgres(url, options),
        }
    }

    fn sqlite(s: sqlite::Sqlite) -> Store {
        Store {
            backend: Backend::Sqlite(s),
            fences: None,
        }
    }

    /// True for the PostgreSQL backend (shared by several hosts).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// The SQLite file, or `None` for PostgreSQL.
    pub fn path(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Sqlite(s) => Some(s.path()),
            Backend::Postgres(_) => None,
        }
    }

    /// Where the state lives, for logs: the SQLite file or the PostgreSQL URL without
    /// its password.
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Sqlite(s) => s.path().display().to_string(),
            Backend::Postgres(p) => p.location(),
        }
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        dispatch!(self, b => b.schema_version())
    }

    /// One round trip to the store (the health check).
    pub fn ping(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.schema_version().map(drop),
            Backend::Postgres(p) => p.ping(),
        }
    }

    // ---- leases and fences --------------------------------------------------------

    /// Turns on lease fencing for host `host` (PostgreSQL only): from now on every
    /// outbox row and kv write of a persona carries the epoch this host holds for it,
    /// and a persona with no fence (no lease held) can neither write nor send.
    pub fn enable_leases(&mut self, host: &str) -> Result<(), StoreError> {
        if !self.is_shared() {
            return Err(StoreError::NotShared);
        }
        self.fences = Some(Arc::new(Fences {
            host: host.to_string(),
            map: RwLock::default(),
        }));
        Ok(())
    }

    /// The host id leases are held under, if leases are on.
    pub fn lease_host(&self) -> Option<&str> {
        self.fences.as_deref().map(|f| f.host.as_str())
    }

    /// Records that this host holds `persona` at `epoch` and may act on it until
    /// `valid_until`.
    pub fn set_fence(&self, persona: &str, epoch: i64, valid_until: Instant) {
        if let Some(f) = &self.fences {
            f.map
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(persona.to_string(), Fence { epoch, valid_until });
        }
    }

    /// Extends every fence of this host to `valid_until` (a renewal went through).
    pub fn extend_fences(&self, valid_until: Instant) {
        if let Some(f) = &self.fences {
            for fence in f
                .map
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .values_mut()
            {
                fence.valid_until = valid_until;
            }
        }
    }

    /// Forgets the fence of `persona`: nothing more is written or sent for it here.
    pub fn clear_fence(&self, persona: &str) {
        if let Some(f) = &self.fences {
            f.map
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(persona);
        }
    }

    /// The epoch this host holds for `persona` (leases on), if any.
    pub fn fence_epoch(&self, persona: &str) -> Option<i64> {
        self.fences
            .as_deref()
            .and_then(|f| f.get(persona))
            .map(|f| f.epoch)
    }

    /// Whether the session of `persona` may write frames now: always without leases;
    /// with leases, only while this host's lease on it is trusted (held, and its last
    /// renewal recent enough that it cannot have expired).
    pub fn may_send(&self, persona: &str) -> bool {
        match &self.fences {
            None => true,
            Some(f) => f
                .get(persona)
                .is_some_and(|fence| Instant::now() < fence.valid_until),
        }
    }

    /// The fence a write of `persona` carries: `Ok(None)` without leases, the token
    /// with them, [`StoreError::Fenced`] if this host holds no lease on `persona`.
    fn fence(&self, persona: &str) -> Result<Option<FenceToken>, StoreError> {
        let Some(f) = &self.fences else {
            return Ok(None);
        };
        match f.get(persona) {
            Some(fence) => Ok(Some(FenceToken {
                persona: persona.to_string(),
                host: f.host.clone(),
                epoch: fence.epoch,
            })),
            None => Err(StoreError::Fenced {
                persona: persona.to_string(),
            }),
        }
    }

    fn pg(&self) -> Result<&postgres::Postgres, StoreError> {
        match &self.backend {
            Backend::Postgres(p) => Ok(p),
            Backend::Sqlite(_) => Err(StoreError::NotShared),
        }
    }

    /// Heartbeat: records `host` alive until `ttl` from now (the database's clock) and
    /// returns the live hosts.
    pub fn lease_heartbeat(&self, host: &str, ttl: Duration) -> Result<Vec<String>, StoreError> {
        self.pg()?.heartbeat(host, ttl)
    }

    /// Extends every lease `host` holds to `ttl` from now; returns `(persona, epoch)`
    /// of each (a lease taken over by another host is not among them).
    pub fn lease_renew(&self, host: &str, ttl: Duration) -> Result<Vec<(String, i64)>, StoreError> {
        self.pg()?.renew(host, ttl)
    }

    /// Takes `persona` for `host` if it is free, expired or released; returns the new
    /// epoch (one more than the last holder's), or `None` if another host holds it.
    pub fn lease_acquire(
        &self,
        host: &str,
        persona: &str,
        ttl: Duration,
    ) -> Result<Option<i64>, StoreError> {
        self.pg()?.acquire(host, persona, ttl)
    }

    /// Hands `persona` back (its bot is stopped): free at once for another host.
    pub fn lease_release(&self, host: &str, persona: &str, epoch: i64) -> Result<(), StoreError> {
        self.pg()?.release(host, persona, epoch)
    }

    /// Every lease row, by persona.
    pub fn leases(&self) -> Result<Vec<LeaseRow>, StoreError> {
        self.pg()?.leases()
    }

    // ---- credentials -------------------------------------------------------------

    /// The credentials `persona` registered with on `server`, if any.
    pub fn credentials(
        &self,
        server: &str,
        persona: &str,
    ) -> Result<Option<StoredCredentials>, StoreError> {
        dispatch!(self, b => b.credentials(server, persona))
    }

    /// Stores (replacing) the credentials of `persona` on `server`.
    pub fn save_credentials(
        &self,
        server: &str,
        persona: &str,
        name: &str,
        key: &ApiKey,
    ) -> Result<(), StoreError> {
        dispatch!(self, b => b.save_credentials(server, persona, name, key))
    }

    /// The personas whose stored identity on `server` is `name`, or `name` with a
    /// registration suffix (`name-1a2b`).
    pub fn personas_named(&self, server: &str, name: &str) -> Result<Vec<String>, StoreError> {
        let stored = dispatch!(self, b => b.identities_on(server))?;
        Ok(stored
            .into_iter()
            .filter(|(_, stored)| {
                let suffixed = stored
                    .strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|sfx| {
                        sfx.len() == 4 && sfx.bytes().all(|b| b.is_ascii_hexdigit())
                    });
                stored == name || suffixed
            })
            .map(|(persona, _)| persona)
            .collect())
    }

    /// Before 0.2 an identity was stored under the name a manifest claimed; now it
    /// belongs to the file label. Moves the identity (credentials, open outbox rows,
    /// recovery positions) stored under `name` to `label`, if `label` has none yet and
    /// `trusted` (the name is the label itself, or the operator set it in roost.toml:
    /// a manifest alone never inherits an identity). True if something moved.
    pub fn adopt_legacy_identity(
        &self,
        server: &str,
        name: &str,
        label: &str,
        trusted: bool,
    ) -> Result<bool, StoreError> {
        if name == label || !trusted {
            return Ok(false);
        }
        let moved = dispatch!(self, b => b.adopt_legacy_identity(server, name, label))?;
        if moved {
            tracing::info!(
                persona = label,
                name,
                "stored identity moved from the name to the persona's file label"
            );
        }
        Ok(moved)
    }

    /// Forgets the credentials of `persona` on `server` (the server revoked the key).
    pub fn delete_credentials(&self, server: &str, persona: &str) -> Result<(), StoreError> {
        dispatch!(self, b => b.delete_credentials(server, persona))
    }

    /// Records a re-registration of `persona` on `server` at `at` (Unix ms).
    pub fn record_registration(
        &self,
        server: &str,
        persona: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        dispatch!(self, b => b.record_registration(server, persona, at))
    }

    /// Re-registrations of `persona` on `server` at or after `since` (Unix ms).
    pub fn registrations_since(
        &self,
        server: &str,
        persona: &str,
        since: i64,
    ) -> Result<u64, StoreError> {
        dispatch!(self, b => b.registrations_since(server, persona, since))
    }

    // ---- recovery positions --------------------------------------------------------

    /// Where `bot` stands in each of its rooms, as last saved.
    pub fn room_positions(&self, bot: &str) -> Result<Vec<RoomPosition>, StoreError> {
        dispatch!(self, b => b.room_positions(bot))
    }

    /// Saves the recovery position of `bot`'s rooms in the next group commit (never
    /// moving one back; a position's `live` run is the newest one saved at or past
    /// the stored `last_ts`); a failure is logged. Fenced like every write.
    pub fn save_room_positions(&self, bot: &str, positions: Vec<RoomPosition>) {
        match &self.backend {
            Backend::Sqlite(s) => s.save_room_positions(bot, positions),
            Backend::Postgres(p) => match self.fence(bot) {
                Ok(fence) => p.save_room_positions(bot, positions, fence),
                Err(e) => tracing::warn!(bot, error = %e, "recovery positions not saved"),
            },
        }
    }

    /// Forgets the recovery position of `bot` in `room` (it left the room).
    pub fn forget_room_position(&self, bot: &str, room: &str) {
        match &self.backend {
            Backend::Sqlite(s) => s.forget_room_position(bot, room),
            Backend::Postgres(p) => {
                if let Ok(fence) = self.fence(bot) {
                    p.forget_room_position(bot, room, fence);
                }
            }
        }
    }

    // ---- outbox --------------------------------------------------------------------

    /// Queues a message and waits until its row is committed; returns its id.
    /// `created_at` is Unix milliseconds. This blocks the calling thread: async code
    /// uses [`Store::outbox_enqueue`].
    pub fn outbox_push(
        &self,
        bot: &str,
        room: &str,
        text: &str,
        created_at: i64,
    ) -> Result<OutboxId, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let id = self.outbox_enqueue(bot, room, text, created_at, move |_, r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or(Err(StoreError::Gone))?;
        Ok(id)
    }

    /// Queues a message for the next group commit and returns its id at once;
    /// `durable` is called with that id (on a blocking thread) once the row is
    /// committed, or with the error that kept it from being committed (with leases:
    /// [`StoreError::Fenced`] when this host does not hold the persona's current
    /// epoch). Nothing may send the message before `durable` has said `Ok`.
    pub fn outbox_enqueue(
        &self,
        bot: &str,
        room: &str,
        text: &str,
        created_at: i64,
        durable: impl FnOnce(OutboxId, Result<(), StoreError>) + Send + 'static,
    ) -> OutboxId {
        self.outbox_enqueue_reply(
            bot,
            room,
            text,
            created_at,
            Vec::new(),
            ReplyRow::default(),
            durable,
        )
    }

    /// [`Store::outbox_enqueue`] for a reply: with a shared store the recovery
    /// `positions` of `bot` are saved in the same transaction as the row (SQLite: the
    /// row alone; the session saves them right after), and `how` says how the row is
    /// written and committed (see [`ReplyRow`]).
    #[allow(clippy::too_many_arguments)]
    pub fn outbox_enqueue_reply(
        &self,
        bot: &str,
        room: &str,
        text: &str,
        created_at: i64,
        positions: Vec<RoomPosition>,
        how: ReplyRow,
        durable: impl FnOnce(OutboxId, Result<(), StoreError>) + Send + 'static,
    ) -> OutboxId {
        match &self.backend {
            Backend::Sqlite(s) => s.outbox_enqueue(bot, room, text, created_at, how, durable),
            Backend::Postgres(p) => p.outbox_enqueue(
                postgres::NewRow {
                    bot,
                    room,
                    text,
                    created_at,
                    positions,
                    handed: how.handed,
                },
                self.fence(bot),
                durable,
            ),
        }
    }

    /// The open (pending or sent, unconfirmed) entries of `bot`, oldest first.
    pub fn outbox_pending(&self, bot: &str) -> Result<Vec<OutboxEntry>, StoreError> {
        dispatch!(self, b => b.outbox_pending(bot))
    }

    /// One entry by id.
    pub fn outbox_get(&self, id: OutboxId) -> Result<Option<OutboxEntry>, StoreError> {
        dispatch!(self, b => b.outbox_get(id))
    }

    /// Records that the entry was written to a connection at `sent_at` (Unix ms), in
    /// the next group commit. A failure is logged: the in-memory outbox stays
    /// authoritative for this run.
    pub fn outbox_mark_sent(&self, id: OutboxId, sent_at: i64) {
        dispatch!(self, b => b.outbox_mark_sent(id, sent_at))
    }

    /// Moves an entry to a final state (confirmed, stale, cancelled), in the next
    /// group commit; a failure is logged.
    pub fn outbox_finish(&self, id: OutboxId, state: OutboxState) {
        dispatch!(self, b => b.outbox_finish(id, state))
    }

    /// Deletes finished (confirmed, stale, cancelled) entries created before `before` (Unix ms).
    /// Returns how many rows went.
    pub fn outbox_prune(&self, before: i64) -> Result<usize, StoreError> {
        dispatch!(self, b => b.outbox_prune(before))
    }

    /// Commits on this thread the rows queued with [`ReplyRow::later`], unless a
    /// commit is running that takes them (SQLite; nothing to do otherwise). For a
    /// caller whose run of replies ended without a last one.
    pub fn commit_waiting(&self) {
        if let Backend::Sqlite(s) = &self.backend {
            s.commit_waiting();
        }
    }

    /// Waits until every write queued before this call is committed.
    pub async fn flush(&self) {
        dispatch!(self, b => b.flush().await)
    }

    /// Holds every group commit back until the returned guard is dropped (SQLite):
    /// queued writes stay uncommitted (and their writers unanswered). For tests of
    /// the promise that nothing is sent before its row is committed.
    #[doc(hidden)]
    pub fn hold_commits(&self) -> Option<CommitHold> {
        match &self.backend {
            Backend::Sqlite(s) => Some(s.hold_commits()),
            Backend::Postgres(_) => None,
        }
    }

    /// Transactions and writes committed so far by the group commit.
    pub fn commit_stats(&self) -> CommitStats {
        dispatch!(self, b => b.commit_stats())
    }

    // ---- kv ----------------------------------------------------------------------------

    /// The value of `key` in `persona`'s namespace.
    pub fn kv_get(&self, persona: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        dispatch!(self, b => b.kv_get(persona, key))
    }

    /// Stores `value` under `key`, replacing an earlier value, if the value fits
    /// `quota.value_bytes` and the namespace stays within `quota.total_bytes` (the
    /// replaced entry no longer counts). Quota check and write are one transaction.
    pub fn kv_set(
        &self,
        persona: &str,
        key: &str,
        value: &[u8],
        quota: KvQuota,
    ) -> Result<(), KvSetError> {
        let size = value.len() as u64;
        if size > quota.value_bytes {
            return Err(KvSetError::ValueTooLarge {
                size,
                limit: quota.value_bytes,
            });
        }
        match &self.backend {
            Backend::Sqlite(s) => s.kv_set(persona, key, value, quota),
            Backend::Postgres(p) => p.kv_set(persona, key, value, quota, self.fence(persona)?),
        }
    }

    /// Removes `key`; `true` if it existed.
    pub fn kv_delete(&self, persona: &str, key: &str) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.kv_delete(persona, key),
            Backend::Postgres(p) => p.kv_delete(persona, key, self.fence(persona)?),
        }
    }

    /// The keys of `persona` starting with `prefix` (`""`: every key), in byte order.
    pub fn kv_list(&self, persona: &str, prefix: &str) -> Result<Vec<String>, StoreError> {
        dispatch!(self, b => b.kv_list(persona, prefix))
    }

    /// Bytes (keys + values) `persona` holds (a running total: one lookup).
    pub fn kv_usage(&self, persona: &str) -> Result<u64, StoreError> {
        dispatch!(self, b => b.kv_usage(persona))
    }

    // ---- LLM token budgets (see `llm::budget`) -------------------------------------

    /// A persona's stored budget buckets `(wall-clock ms, tokens)` from `since_ms` on.
    pub fn llm_budget_load(
        &self,
        persona: &str,
        since_ms: i64,
    ) -> Result<Vec<(i64, u64)>, StoreError> {
        dispatch!(self, b => b.llm_budget_load(persona, since_ms))
    }

    /// Sets the tokens of one budget bucket (a bucket of 0 tokens is removed) and
    /// removes the persona's buckets older than `forget_before_ms`. With leases, the
    /// write carries the persona's epoch like a kv write.
    pub fn llm_budget_save(
        &self,
        persona: &str,
        bucket_ms: i64,
        tokens: u64,
        forget_before_ms: i64,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.llm_budget_save(persona, bucket_ms, tokens, forget_before_ms),
            Backend::Postgres(p) => p.llm_budget_save(
                persona,
                bucket_ms,
                tokens,
                forget_before_ms,
                self.fence(persona)?,
            ),
        }
    }
}

#[cfg(test)]
mod url_tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        for (url, shown) in [
            (
                "postgres://roost:s3cret@db:5432/roost",
                "postgres://roost:***@db:5432/roost",
            ),
            (
                "postgresql://db/roost?user=roost&password=s3cret&sslmode=disable",
                "postgresql://db/roost?user=roost&password=***&sslmode=disable",
            ),
            ("postgres://roost@db/roost", "postgres://roost@db/roost"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
        assert_eq!(redact_url("not a url s3cret"), "(unparseable URL)");
        let e = StoreUrl::parse("mysql://u:s3cret@h/db").unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
    }
}

#[cfg(test)]
mod suite {
    //! The behavioural tests of the store: every test runs on both backends (the
    //! PostgreSQL ones need a server: `ROOST_TEST_POSTGRES=postgres://...`, run with
    //! `--ignored`; `.ci/run` starts one).
    use super::*;

    const Q: KvQuota = KvQuota {
        total_bytes: 100,
        value_bytes: 40,
    };

    /// Waits for the bookkeeping writes (sends, confirmations) queued so far.
    fn settle(store: &Store) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(store.flush());
    }

    macro_rules! on_both_backends {
        ($($name:ident),* $(,)?) => {
            mod sqlite {
                $( #[test] fn $name() { super::$name(super::super::test_support::sqlite()) } )*
            }
            mod postgres {
                $(
                    #[test]
                    #[ignore = "needs PostgreSQL: set ROOST_TEST_POSTGRES"]
                    fn $name() { super::$name(super::super::test_support::postgres()) }
                )*
            }
        };
    }

    on_both_backends!(
        outbox_lifecycle,
        clones_share_one_store,
        set_get_replace_delete,
        quotas_count_key_and_value_bytes,
        list_is_by_prefix_in_byte_order_and_per_persona,
        credentials_replace_and_delete,
        identities_by_name_and_suffix,
        registrations_are_counted_since,
        recovery_positions_never_move_back,
        a_live_run_goes_with_the_newest_position,
        legacy_identity_moves_to_the_label,
        outbox_ids_are_unique_and_increasing,
        running_usage_matches_a_full_count_through_writes_and_deletes,
        llm_budget_buckets_are_set_removed_and_forgotten,
    );

    fn outbox_lifecycle(store: Store) {
        let a = store.outbox_push("bot", "lobby", "one", 10).unwrap();
        let b = store.outbox_push("bot", "lobby", "two", 11).unwrap();
        let c = store.outbox_push("other", "lobby", "x", 12).unwrap();
        assert!(a < b && b < c);
        let pending = store.outbox_pending("bot").unwrap();
        assert_eq!(pending.iter().map(|e| e.id).collect::<Vec<_>>(), vec![a, b]);
        assert_eq!(pending[0].state, OutboxState::Pending);
        store.outbox_mark_sent(a, 20);
        store.outbox_mark_sent(a, 30);
        settle(&store);
        let e = store.outbox_get(a).unwrap().unwrap();
        assert_eq!(
            (e.state, e.attempts, e.sent_at),
            (OutboxState::Sent, 2, Some(30))
        );
        store.outbox_finish(a, OutboxState::Confirmed);
        store.outbox_finish(b, OutboxState::Stale);
        settle(&store);
        // A finished entry is not revived by a late mark_sent.
        store.outbox_mark_sent(b, 40);
        settle(&store);
        assert_eq!(
            store.outbox_get(b).unwrap().unwrap().state,
            OutboxState::Stale
        );
        assert!(store.outbox_pending("bot").unwrap().is_empty());
        assert_eq!(store.outbox_prune(100).unwrap(), 2);
        assert_eq!(store.outbox_pending("other").unwrap().len(), 1);
    }

    fn clones_share_one_store(store: Store) {
        let other = store.clone();
        let id = other.outbox_push("b", "r", "t", 1).unwrap();
        assert_eq!(store.outbox_get(id).unwrap().unwrap().text, "t");
    }

    fn set_get_replace_delete(s: Store) {
        assert_eq!(s.kv_get("p", "k").unwrap(), None);
        s.kv_set("p", "k", b"one", Q).unwrap();
        s.kv_set("p", "k", b"two!", Q).unwrap();
        assert_eq!(s.kv_get("p", "k").unwrap().unwrap(), b"two!");
        assert_eq!(s.kv_usage("p").unwrap(), 5);
        s.kv_set("p", "empty", b"", Q).unwrap();
        assert_eq!(s.kv_get("p", "empty").unwrap().unwrap(), b"");
        assert!(s.kv_delete("p", "k").unwrap());
        assert!(!s.kv_delete("p", "k").unwrap());
        assert_eq!(s.kv_usage("p").unwrap(), 5);
    }

    fn quotas_count_key_and_value_bytes(s: Store) {
        let too_big = s.kv_set("p", "k", &[0; 41], Q).unwrap_err();
        assert!(
            matches!(
                too_big,
                KvSetError::ValueTooLarge {
                    size: 41,
                    limit: 40
                }
            ),
            "{too_big}"
        );
        // 2 x (2 + 40) = 84 bytes; a third would make 126.
        s.kv_set("p", "a1", &[1; 40], Q).unwrap();
        s.kv_set("p", "a2", &[2; 40], Q).unwrap();
        let over = s.kv_set("p", "a3", &[3; 40], Q).unwrap_err();
        assert!(
            matches!(
                over,
                KvSetError::QuotaExceeded {
                    used: 84,
                    would_use: 126,
                    quota: 100
                }
            ),
            "{over}"
        );
        assert_eq!(
            s.kv_get("p", "a3").unwrap(),
            None,
            "a refused write leaves nothing"
        );
        // Replacing counts the new size only; multibyte keys count their bytes.
        s.kv_set("p", "a2", &[2; 10], Q).unwrap();
        s.kv_set("p", "é", &[0; 10], Q).unwrap();
        assert_eq!(s.kv_usage("p").unwrap(), 42 + 12 + 12);
        // The quota is per persona.
        s.kv_set("q", "a3", &[3; 40], Q).unwrap();
    }

    /// The namespace's size as a full count through the interface would make it.
    fn counted(s: &Store, persona: &str) -> u64 {
        s.kv_list(persona, "")
            .unwrap()
            .iter()
            .map(|k| k.len() as u64 + s.kv_get(persona, k).unwrap().unwrap().len() as u64)
            .sum()
    }

    fn running_usage_matches_a_full_count_through_writes_and_deletes(s: Store) {
        let q = KvQuota {
            total_bytes: 10_000,
            value_bytes: 100,
        };
        for i in 0..200u32 {
            let key = format!("k{}", i % 37);
            s.kv_set("p", &key, &vec![7; (i % 90) as usize], q).unwrap();
            if i % 5 == 0 {
                s.kv_delete("p", &format!("k{}", (i * 7) % 37)).unwrap();
            }
            if i % 10 == 0 {
                assert_eq!(
                    s.kv_usage("p").unwrap(),
                    counted(&s, "p"),
                    "after write {i}"
                );
            }
        }
        assert!(!s.kv_delete("p", "never").unwrap());
        assert_eq!(s.kv_usage("p").unwrap(), counted(&s, "p"));
        assert_eq!(s.kv_usage("nobody").unwrap(), 0);
        // A refused write leaves the total as it was.
        let before = s.kv_usage("p").unwrap();
        let tight = KvQuota {
            total_bytes: before,
            value_bytes: 100,
        };
        assert!(s.kv_set("p", "new-key", b"x", tight).is_err());
        assert_eq!(s.kv_usage("p").unwrap(), before);
    }

    fn llm_budget_buckets_are_set_removed_and_forgotten(s: Store) {
        assert!(s.llm_budget_load("p", 0).unwrap().is_empty());
        s.llm_budget_save("p", 1_000, 5, 0).unwrap();
        s.llm_budget_save("p", 2_000, 7, 0).unwrap();
        s.llm_budget_save("p", 1_000, 9, 0).unwrap();
        s.llm_budget_save("q", 1_000, 1, 0).unwrap();
        assert_eq!(s.llm_budget_load("p", 0).unwrap(), [(1_000, 9), (2_000, 7)]);
        assert_eq!(s.llm_budget_load("p", 1_500).unwrap(), [(2_000, 7)]);
        // A bucket of 0 tokens goes; buckets older than the horizon go.
        s.llm_budget_save("p", 2_000, 0, 0).unwrap();
        assert_eq!(s.llm_budget_load("p", 0).unwrap(), [(1_000, 9)]);
        s.llm_budget_save("p", 3_000, u64::MAX, 1_500).unwrap();
        assert_eq!(
            s.llm_budget_load("p", 0).unwrap(),
            [(3_000, i64::MAX as u64)]
        );
        assert_eq!(
            s.llm_budget_load("q", 0).unwrap(),
            [(1_000, 1)],
            "per persona"
        );
    }

    fn list_is_by_prefix_in_byte_order_and_per_persona(s: Store) {
        for k in ["b/2", "b/10", "a", "b/é", "b/Z", "c"] {
            s.kv_set("p", k, b"x", Q).unwrap();
        }
        s.kv_set("other", "b/secret", b"x", Q).unwrap();
        assert_eq!(s.kv_list("p", "b/").unwrap(), ["b/10", "b/2", "b/Z", "b/é"]);
        assert_eq!(s.kv_list("p", "").unwrap().len(), 6);
        assert!(s.kv_list("p", "zz").unwrap().is_empty());
        assert_eq!(s.kv_list("p", "%").unwrap(), Vec::<String>::new());
        assert_eq!(s.kv_get("p", "b/secret").unwrap(), None);
    }

    fn credentials_replace_and_delete(store: Store) {
        let key = ApiKey::new("secret-key-1");
        store
            .save_credentials("http://a", "p", "name-1", &key)
            .unwrap();
        credentials_read_replaced_and_deleted(&store);
    }

    /// With `name-1` / `secret-key-1` saved for `p` on `http://a`: read back (the key
    /// never in Debug), replaced, deleted.
    pub(super) fn credentials_read_replaced_and_deleted(store: &Store) {
        let creds = store.credentials("http://a", "p").unwrap().unwrap();
        assert_eq!(creds.name, "name-1");
        assert_eq!(creds.key.expose(), "secret-key-1");
        assert!(!format!("{creds:?}").contains("secret-key-1"));
        assert!(store.credentials("http://b", "p").unwrap().is_none());
        store
            .save_credentials("http://a", "p", "name-2", &ApiKey::new("k2"))
            .unwrap();
        assert_eq!(
            store.credentials("http://a", "p").unwrap().unwrap().name,
            "name-2"
        );
        store.delete_credentials("http://a", "p").unwrap();
        assert!(store.credentials("http://a", "p").unwrap().is_none());
    }

    fn identities_by_name_and_suffix(store: Store) {
        let k = ApiKey::new("k");
        store.save_credentials("s", "one", "echo", &k).unwrap();
        store.save_credentials("s", "two", "echo-1a2b", &k).unwrap();
        store
            .save_credentials("s", "three", "echo-xyz", &k)
            .unwrap();
        store.save_credentials("t", "four", "echo", &k).unwrap();
        let mut found = store.personas_named("s", "echo").unwrap();
        found.sort();
        assert_eq!(found, ["one", "two"]);
    }

    fn registrations_are_counted_since(store: Store) {
        store.record_registration("s", "p", 1_000).unwrap();
        store.record_registration("s", "p", 2_000).unwrap();
        store.record_registration("s", "q", 2_000).unwrap();
        assert_eq!(store.registrations_since("s", "p", 1_500).unwrap(), 1);
        assert_eq!(store.registrations_since("s", "p", 0).unwrap(), 2);
        // A week later the old ones are gone.
        store.record_registration("s", "p", 8 * 86_400_000).unwrap();
        assert_eq!(store.registrations_since("s", "p", 0).unwrap(), 1);
    }

    fn recovery_positions_never_move_back(store: Store) {
        let at = RoomPosition::at;
        store.save_room_positions("b", vec![at("lobby", 50), at("dev", 7)]);
        settle(&store);
        store.save_room_positions("b", vec![at("lobby", 40)]);
        settle(&store);
        let mut pos = store.room_positions("b").unwrap();
        pos.sort();
        assert_eq!(pos, [at("dev", 7), at("lobby", 50)]);
        store.forget_room_position("b", "dev");
        settle(&store);
        assert_eq!(store.room_positions("b").unwrap(), [at("lobby", 50)]);
        assert!(store.room_positions("other").unwrap().is_empty());
    }

    fn a_live_run_goes_with_the_newest_position(store: Store) {
        let held = |live| RoomPosition {
            live: Some(live),
            ..RoomPosition::at("lobby", 50)
        };
        store.save_room_positions("b", vec![held((60, 70))]);
        settle(&store);
        assert_eq!(store.room_positions("b").unwrap(), [held((60, 70))]);
        // The run grows while the position waits at the gap.
        store.save_room_positions("b", vec![held((60, 90))]);
        settle(&store);
        assert_eq!(store.room_positions("b").unwrap(), [held((60, 90))]);
        // An older position (another holder's, saved late) changes nothing.
        store.save_room_positions("b", vec![RoomPosition::at("lobby", 40)]);
        settle(&store);
        assert_eq!(store.room_positions("b").unwrap(), [held((60, 90))]);
        // The gap recovered: the position moves past the run, which goes.
        store.save_room_positions("b", vec![RoomPosition::at("lobby", 95)]);
        settle(&store);
        assert_eq!(
            store.room_positions("b").unwrap(),
            [RoomPosition::at("lobby", 95)]
        );
    }

    fn legacy_identity_moves_to_the_label(store: Store) {
        let k = ApiKey::new("k");
        store.save_credentials("s", "Echo Bot", "echo", &k).unwrap();
        store.outbox_push("Echo Bot", "lobby", "hi", 1).unwrap();
        store.save_room_positions("Echo Bot", vec![RoomPosition::at("lobby", 9)]);
        settle(&store);
        assert!(
            !store
                .adopt_legacy_identity("s", "Echo Bot", "echo", false)
                .unwrap()
        );
        assert!(
            store
                .adopt_legacy_identity("s", "Echo Bot", "echo", true)
                .unwrap()
        );
        assert_eq!(
            store.credentials("s", "echo").unwrap().unwrap().name,
            "echo"
        );
        assert!(store.credentials("s", "Echo Bot").unwrap().is_none());
        assert_eq!(store.outbox_pending("echo").unwrap().len(), 1);
        assert_eq!(
            store.room_positions("echo").unwrap(),
            [RoomPosition::at("lobby", 9)]
        );
        // The label has its own identity now: nothing more moves.
        store
            .save_credentials("s", "Echo Bot", "other", &k)
            .unwrap();
        assert!(
            !store
                .adopt_legacy_identity("s", "Echo Bot", "echo", true)
                .unwrap()
        );
    }

    fn outbox_ids_are_unique_and_increasing(store: Store) {
        let other = store.clone();
        let mut ids = Vec::new();
        for i in 0..50 {
            let s = if i % 2 == 0 { &store } else { &other };
            ids.push(s.outbox_push("b", "r", &format!("m{i}"), i).unwrap());
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        let pending = store.outbox_pending("b").unwrap();
        assert_eq!(pending.len(), 50);
        assert_eq!(pending[49].text, "m49");
    }
}

/// Stores for tests: SQLite in memory, or a fresh schema on `ROOST_TEST_POSTGRES`.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub(crate) fn sqlite() -> Store {
        Store::open_in_memory().unwrap()
    }

    /// A unique schema name per call.
    pub(crate) fn fresh_schema() -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        format!(
            "t_{}_{}_{:08x}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            rand::random::<u32>()
        )
    }

    pub(crate) fn postgres_url() -> String {
        std::env::var("ROOST_TEST_POSTGRES")
            .expect("set ROOST_TEST_POSTGRES to a PostgreSQL URL (e.g. postgres://postgres@127.0.0.1:55432/postgres)")
    }

    /// A store on its own schema of the test server.
    pub(crate) fn postgres() -> Store {
        postgres_in(&fresh_schema())
    }

    /// A store on `schema` (two calls with one schema: two hosts on one database).
    pub(crate) fn postgres_in(schema: &str) -> Store {
        Store::open_postgres(
            &postgres_url(),
            PgOptions {
                schema: Some(schema.to_string()),
            },
        )
        .unwrap()
    }
}

#[cfg(test)]
mod pg_leases {
    //! Leases and fencing on a real PostgreSQL (`ROOST_TEST_POSTGRES`, `--ignored`).
    use super::test_support::{fresh_schema, postgres_in};
    use super::*;

    const TTL: Duration = Duration::from_secs(8);
    const Q: KvQuota = KvQuota {
        total_bytes: 1000,
        value_bytes: 100,
    };

    fn two_hosts() -> (Store, Store) {
        let schema = fresh_schema();
        let mut a = postgres_in(&schema);
        let mut b = postgres_in(&schema);
        a.enable_leases("host-a").unwrap();
        b.enable_leases("host-b").unwrap();
        (a, b)
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// Makes every lease of `host` expire now (as if it stopped renewing 8 s ago).
    fn expire(store: &Store, host: &str) {
        store.lease_renew(host, Duration::ZERO).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }

    #[test]
    #[ignore = "needs PostgreSQL: set ROOST_TEST_POSTGRES"]
    fn migrations_are_versioned_and_idempotent() {
        let schema = fresh_schema();
        let a = postgres_in(&schema);
        assert_eq!(a.schema_version().unwrap(), postgres::PG_SCHEMA_VERSION);
        // A second host on the same database migrates nothing and sees the same data.
        a.save_credentials("s", "p", "n", &ApiKey::new("k"))
            .unwrap();
        let b = postgres_in(&schema);
        assert_eq!(b.credentials("s", "p").unwrap().unwrap().name, "n");
        a.ping().unwrap();
    }

    #[test]
    #[ignore = "needs PostgreSQL: set ROOST_TEST_POSTGRES"]
    fn migrating_from_pg_version_1_counts_existing_namespaces() {
        let schema = fresh_schema();
        postgres::migrate_to_for_test(
            &test_support::postgres_url(),
            &schema,
            1,
            "INSERT INTO kv (persona, key, value) VALUES \
             ('p', 'ab', '\\x010203'), ('p', 'é', ''), ('q', 'k', '\\x00')",
        );
        let s = postgres_in(&schema);
        assert_eq!(s.schema_version().unwrap(), postgres::PG_SCHEMA_VERSION);
        assert_eq!(s.kv_usage("p").unwrap(), 5 + 2);
        assert_eq!(s.kv_usage("q").unwrap(), 2);
        s.kv_set("p", "ab", b"1", Q).unwrap();
        assert_eq!(s.kv_usage("p").unwrap(), 3 + 2);
    }

    #[test]
    #[ignore = "needs PostgreSQL: set ROOST_TEST_POSTGRES"]
    fn one_holder_at_a_time_and_the_epoch_grows_with_each_holder() {
        let (a, b) = two_hosts();
        assert_eq!(a.lease_acquire("host-a", "echo", TTL).unwrap(), Some(1));
        assert_eq!(b.lease_acquire("host-b", "echo", TTL).unwrap(), None);
        assert_eq!(
            a.lease_renew("host-a", TTL).unwrap(),
            [("echo".to_string(), 1)]
        );
        expire(&a, "host-a");
        assert_eq!(b.lease_acquire("host-b", "echo", TTL).unwrap(), Some(2));
        assert!(
            a.lease_renew("host-a", TTL).unwrap().is_empty(),
            "a lost it"
        );
        // A release frees it at once, for the next epoch.
        b.lease_release("host-b", "echo", 2).unwrap();
        assert_eq!(a.lease_acquire("host-a", "echo", TTL).unwrap(), Some(3));
        let rows = b.leases().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].holder.as_str(), rows[0].epoch), ("host-a", 3));
        assert!(rows[0].expires_in_ms > 0);
        let live = a.lease_heartbeat("host-a", TTL).unwrap();
        assert_eq!(live, ["host-a"]);
        let live = b.lease_heartbeat("host-b", TTL).unwrap();
        assert_eq!(live, ["host-a", "host-b"]);
    }

    #[test]
    #[ignore = "needs PostgreSQL: set ROOST_TEST_POSTGRES"]
    fn a_stale_epoch_cannot_send_or_write() {
        let (a, b) = two_hosts();
        let e1 = a.lease_acquire("host-a", "echo", TTL).unwrap().unwrap();
        a.set_fence("echo", e1, far());
        a.outbox_push("echo", "lobby", "from a", 1).unwrap();
        a.kv_set("echo", "k", b"a", Q).unwrap();
        // a is paused past its lease; b takes over.
        expire(&a, "host-a");
        let e2 = b.lease_acquire("host-b", "echo", TTL).unwrap().unwrap();
        assert_eq!(e2, e1 + 1);
        b.set_fence("echo", e2, far());
        // a wakes up still believing it holds epoch 1: every write is refused.
        let err = a.outbox_push("echo", "lobby", "stale", 2).unwrap_err();
        assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
        let err = a.kv_set("echo", "k", b"stale", Q).unwrap_err();
        assert!(
            matches!(err, KvSetError::Store(StoreError::Fenced { .. })),
            "{err}"
        );
        let err = a.kv_delete("echo", "k").unwrap_err();
        assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
        let err = a.llm_budget_save("echo", 1_000, 99, 0).unwrap_err();
        assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
        assert!(b.llm_budget_load("echo", 0).unwrap().is_empty());
        // b's writes go through, and b sees a's committed row and value.
        b.outbox_push("echo", "lobby", "from b", 3).unwrap();
        b.kv_set("echo", "k2", b"b", Q).unwrap();
        let texts: Vec<String> = b
            .outbox_pending("echo")
            .unwrap()
            .into_iter()
            .map(|e| e.text)
            .collect();
        assert_eq!(
            texts,
            ["from a", "from b"],
            "new rows sort after the old holder's"
        );
        assert_eq!(b.kv_get("echo", "k").unwrap().unwrap(), b"a");
        // A persona this host holds no lease on cannot write at all.
        let err = b.outbox_push("other", "lobby", "x", 4).unwrap_err();
        assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    }

    #[test]
    #[ignore = "needs PostgreSQL: set ROOST_TEST_POSTGRES"]
    fn sending_stops_when_the_lease_is_no_longer_trusted() {
        let (a, _b) = two_hosts();
        let e = a.lease_acquire("host-a", "echo", TTL).unwrap().unwrap();
        assert!(!a.may_send("echo"), "no fence yet");
        a.set_fence("echo", e, Instant::now() + Duration::from_millis(50));
        assert!(a.may_send("echo"));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!a.may_send("echo"), "past the trusted time");
        a.extend_fences(far());
        assert!(a.may_send("echo"));
        a.clear_fence("echo");
        assert!(!a.may_send("echo"));
    }
}
