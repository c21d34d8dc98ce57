//! roost's embedded state: one SQLite database at `<state dir>/roost.db`.
//!
//! What lives here: the credentials each persona registered with (per server URL and
//! persona identity), the persisted outbox of messages waiting to be sent, and tables for
//! per-persona key/value data (the `kv` capability).
//!
//! - The state directory is created (mode 0700) if missing; the database file and its
//!   `-wal`/`-shm` companions are kept at mode 0600 because they hold API keys.
//! - WAL journal, `synchronous=NORMAL`, a busy timeout of 5 s. WAL checkpoints run
//!   in a background thread on a connection of their own (`PASSIVE`, every second),
//!   never inside a commit.
//! - Hot-path writes (outbox rows, their sends and confirmations) go through a
//!   **group commit**: everything queued while a commit runs is committed in the next
//!   single transaction, and each writer learns only then that its row is durable
//!   ([`Store::outbox_enqueue`]). A reply's row is committed before its frame is
//!   written; the session sends nothing it has not been told is committed.
//! - The schema is versioned with `PRAGMA user_version`; [`Store::open`] applies the
//!   migrations it knows, refuses a database newer than itself, and reports a corrupt or
//!   foreign file as [`StoreError::Corrupt`] naming the file (never a panic).
//!
//! # Blocking
//!
//! `Store` is a cloneable handle (`Arc<Mutex<Connection>>`) with a synchronous API. Every
//! call is one or a few indexed statements on a local WAL database and takes microseconds
//! to a few milliseconds, so async callers (the session task, `SessionHandle::send`) call it
//! directly and accept that brief lock, the way they would a `std::sync::Mutex`. roost is
//! the only process using the file, so the busy timeout is a safety net, not a normal wait.
//! Callers that do bulk work (imports, large history scans) should use
//! `tokio::task::spawn_blocking`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use crate::protocol::ApiKey;

use super::{
    CommitStats, KvQuota, KvSetError, OutboxEntry, OutboxId, OutboxState, RoomPosition, StoreError,
    StoredCredentials, Synchronous, now_ms,
};

/// The database file name inside the state directory.
pub const DB_FILE: &str = "roost.db";

/// The schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 5;

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Migrations, index `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1
    r#"
    CREATE TABLE credentials (
        server     TEXT NOT NULL,
        persona    TEXT NOT NULL,
        name       TEXT NOT NULL,
        key        TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (server, persona)
    );
    CREATE TABLE outbox (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        bot        TEXT NOT NULL,
        room       TEXT NOT NULL,
        text       TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        state      TEXT NOT NULL DEFAULT 'pending',
        attempts   INTEGER NOT NULL DEFAULT 0,
        sent_at    INTEGER
    );
    CREATE INDEX outbox_bot_state ON outbox (bot, state, id);
    CREATE TABLE kv (
        persona TEXT NOT NULL,
        key     TEXT NOT NULL,
        value   BLOB NOT NULL,
        PRIMARY KEY (persona, key)
    );
    CREATE TABLE history (
        id     INTEGER PRIMARY KEY AUTOINCREMENT,
        bot    TEXT NOT NULL,
        room   TEXT NOT NULL,
        sender TEXT NOT NULL,
        text   TEXT NOT NULL,
        ts     INTEGER NOT NULL,
        flags  INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX history_bot_room_ts ON history (bot, room, ts);
    "#,
    // 1 -> 2: the unused history table goes; re-registrations are counted (for their
    // daily cap) and each room's recovery position survives a restart.
    r#"
    DROP TABLE history;
    CREATE TABLE registrations (
        server  TEXT NOT NULL,
        persona TEXT NOT NULL,
        at      INTEGER NOT NULL
    );
    CREATE INDEX registrations_server_persona_at ON registrations (server, persona, at);
    CREATE TABLE room_positions (
        bot     TEXT NOT NULL,
        room    TEXT NOT NULL,
        last_ts INTEGER NOT NULL,
        PRIMARY KEY (bot, room)
    );
    "#,
    // 2 -> 3: each kv namespace's size is kept as a running total (a write costs O(1)
    // instead of summing the namespace), and LLM token budgets survive a restart.
    r#"
    CREATE TABLE kv_usage (
        persona TEXT PRIMARY KEY,
        bytes   INTEGER NOT NULL
    );
    INSERT INTO kv_usage (persona, bytes)
        SELECT persona, SUM(length(CAST(key AS BLOB)) + length(value)) FROM kv GROUP BY persona;
    CREATE TABLE llm_budget (
        persona   TEXT NOT NULL,
        bucket_ms INTEGER NOT NULL,
        tokens    INTEGER NOT NULL,
        PRIMARY KEY (persona, bucket_ms)
    );
    "#,
    // 3 -> 4: the outbox index holds the open rows only (what a start reads). Every
    // row used to stay in it, and each state change moved its entry: a reply's
    // confirmation wrote one more index page to the WAL in every group commit.
    r#"
    DROP INDEX outbox_bot_state;
    CREATE INDEX outbox_open ON outbox (bot, id) WHERE state IN ('pending', 'sent');
    "#,
    // 4 -> 5: a position held back before a recovery that has not finished keeps the
    // run of messages the bot already heard live past it, so a restart does not hand
    // them over again.
    r#"
    ALTER TABLE room_positions ADD COLUMN live_from INTEGER;
    ALTER TABLE room_positions ADD COLUMN live_until INTEGER;
    "#,
];

/// A cloneable handle on the state database. See the module docs for the blocking policy.
#[derive(Clone)]
pub(crate) struct Sqlite {
    conn: Arc<Mutex<Connection>>,
    path: Arc<PathBuf>,
    commits: Arc<Committer>,
}

impl fmt::Debug for Sqlite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// An `outbox` row as stored, its state still text.
struct OutboxRow {
    id: OutboxId,
    bot: String,
    room: String,
    text: String,
    created_at: i64,
    state: String,
    attempts: i64,
    sent_at: Option<i64>,
}

impl OutboxRow {
    /// Reads the columns `id, bot, room, text, created_at, state, attempts, sent_at`,
    /// in that order.
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxRow> {
        Ok(OutboxRow {
            id: OutboxId(row.get(0)?),
            bot: row.get(1)?,
            room: row.get(2)?,
            text: row.get(3)?,
            created_at: row.get(4)?,
            state: row.get(5)?,
            attempts: row.get(6)?,
            sent_at: row.get(7)?,
        })
    }
}

impl Sqlite {
    /// Opens (creating if needed) `<state_dir>/roost.db` and migrates it to the current
    /// schema, with `synchronous = NORMAL`.
    #[cfg(test)]
    pub fn open(state_dir: &Path) -> Result<Sqlite, StoreError> {
        Self::open_with(state_dir, Synchronous::default())
    }

    /// [`Store::open`] with a choice of [`Synchronous`].
    pub fn open_with(state_dir: &Path, synchronous: Synchronous) -> Result<Sqlite, StoreError> {
        create_state_dir(state_dir)?;
        let path = state_dir.join(DB_FILE);
        secure_file(&path, true)?;
        let conn = Connection::open(&path).map_err(|source| classify_open(&path, source))?;
        let store = Sqlite {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path),
            commits: Arc::default(),
        };
        store.init(true, synchronous)?;
        spawn_checkpointer(&store);
        // SQLite creates -wal/-shm with the main file's mode; make sure anyway.
        for suffix in ["-wal", "-shm"] {
            let companion = PathBuf::from(format!("{}{suffix}", store.path.display()));
            secure_file(&companion, false)?;
        }
        Ok(store)
    }

    /// An in-memory database (tests, `roost replay`). Nothing is persisted.
    pub fn open_in_memory() -> Result<Sqlite, StoreError> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        let store = Sqlite {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path),
            commits: Arc::default(),
        };
        store.init(false, Synchronous::Normal)?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave the connection half-updated (every
        // multi-statement change is a transaction), so a poisoned lock is still usable.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        classify(&self.path, source)
    }

    fn init(&self, on_disk: bool, synchronous: Synchronous) -> Result<(), StoreError> {
        let mut conn = self.lock();
        conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| self.err(e))?;
        // Reading the header is the first thing that notices a foreign or corrupt file.
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|e| self.err(e))?;
        if on_disk {
            // Checkpoints run in the background (see `spawn_checkpointer`), never inside
            // a commit on the sending path.
            conn.pragma_update(None, "wal_autocheckpoint", 0)
                .map_err(|e| self.err(e))?;
            let mode: String = conn
                .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
                .map_err(|e| self.err(e))?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(path = %self.path.display(), %mode, "state database is not in WAL mode");
            }
        }
        conn.pragma_update(None, "synchronous", synchronous.pragma())
            .map_err(|e| self.err(e))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(|e| self.err(e))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: self.path.to_path_buf(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version < 0 {
            return Err(StoreError::Corrupt {
                path: self.path.to_path_buf(),
                detail: format!("negative schema version {version}"),
            });
        }
        for (from, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let to = from as i64 + 1;
            let tx = conn.transaction().map_err(|e| self.err(e))?;
            tx.execute_batch(sql).map_err(|e| self.err(e))?;
            tx.pragma_update(None, "user_version", to)
                .map_err(|e| self.err(e))?;
            tx.commit().map_err(|e| self.err(e))?;
            tracing::debug!(path = %self.path.display(), to, "state database migrated");
        }
        let last_id: i64 = conn
            .query_row(
                "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0),
                            COALESCE((SELECT MAX(id) FROM outbox), 0))",
                [],
                |row| row.get(0),
            )
            .map_err(|e| self.err(e))?;
        self.commits
            .next_outbox_id
            .store(last_id + 1, Ordering::SeqCst);
        Ok(())
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.lock()
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|e| self.err(e))
    }

    // ---- credentials -------------------------------------------------------------

    /// The credentials `persona` registered with on `server`, if any.
    pub fn credentials(
        &self,
        server: &str,
        persona: &str,
    ) -> Result<Option<StoredCredentials>, StoreError> {
        self.lock()
            .query_row(
                "SELECT name, key FROM credentials WHERE server = ?1 AND persona = ?2",
                params![server, persona],
                |row| {
                    Ok(StoredCredentials {
                        name: row.get(0)?,
                        key: ApiKey::new(row.get::<_, String>(1)?),
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Stores (replacing) the credentials of `persona` on `server`.
    pub fn save_credentials(
        &self,
        server: &str,
        persona: &str,
        name: &str,
        key: &ApiKey,
    ) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "INSERT INTO credentials (server, persona, name, key, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (server, persona) DO UPDATE
                 SET name = excluded.name, key = excluded.key, created_at = excluded.created_at",
                params![server, persona, name, key.expose(), now_ms()],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Every `(persona, name)` stored for `server`.
    pub fn identities_on(&self, server: &str) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached("SELECT persona, name FROM credentials WHERE server = ?1")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![server], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
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
    ) -> Result<bool, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let has_own: bool = tx
            .query_row(
                "SELECT COUNT(*) FROM credentials WHERE server = ?1 AND persona = ?2",
                params![server, label],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .map_err(|e| self.err(e))?;
        if has_own {
            return Ok(false);
        }
        let moved = tx
            .execute(
                "UPDATE credentials SET persona = ?3 WHERE server = ?1 AND persona = ?2",
                params![server, name, label],
            )
            .map_err(|e| self.err(e))?;
        if moved > 0 {
            tx.execute(
                "UPDATE outbox SET bot = ?2 WHERE bot = ?1",
                params![name, label],
            )
            .map_err(|e| self.err(e))?;
            tx.execute(
                "UPDATE OR IGNORE room_positions SET bot = ?2 WHERE bot = ?1",
                params![name, label],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(moved > 0)
    }

    /// Forgets the credentials of `persona` on `server` (the server revoked the key).
    pub fn delete_credentials(&self, server: &str, persona: &str) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "DELETE FROM credentials WHERE server = ?1 AND persona = ?2",
                params![server, persona],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Records a re-registration of `persona` on `server` at `at` (Unix ms).
    pub fn record_registration(
        &self,
        server: &str,
        persona: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO registrations (server, persona, at) VALUES (?1, ?2, ?3)",
            params![server, persona, at],
        )
        .map_err(|e| self.err(e))?;
        // A week of history is plenty for a daily cap.
        conn.execute(
            "DELETE FROM registrations WHERE at < ?1",
            params![at - 7 * 86_400_000],
        )
        .map(drop)
        .map_err(|e| self.err(e))
    }

    /// Re-registrations of `persona` on `server` at or after `since` (Unix ms).
    pub fn registrations_since(
        &self,
        server: &str,
        persona: &str,
        since: i64,
    ) -> Result<u64, StoreError> {
        self.lock()
            .query_row(
                "SELECT COUNT(*) FROM registrations WHERE server = ?1 AND persona = ?2 AND at >= ?3",
                params![server, persona, since],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .map_err(|e| self.err(e))
    }

    // ---- recovery positions --------------------------------------------------------

    /// Where `bot` stands in each of its rooms, as last saved.
    pub fn room_positions(&self, bot: &str) -> Result<Vec<RoomPosition>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT room, last_ts, live_from, live_until FROM room_positions WHERE bot = ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![bot], |r| {
                Ok(super::position_from_row(
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    /// Saves the recovery position of `bot`'s rooms in the next group commit (never
    /// moving one back); a failure is logged. Positions saved again before that commit
    /// are merged into the ones waiting (one row per room and commit, the newest).
    pub fn save_room_positions(&self, bot: &str, positions: Vec<RoomPosition>) {
        if positions.is_empty() {
            return;
        }
        let mut q = self.queue();
        let rooms = match q.positions.get_mut(bot) {
            Some(rooms) => rooms,
            None => q.positions.entry(bot.to_string()).or_default(),
        };
        for p in positions {
            let at = rooms.entry(p.room).or_insert((p.last_ts, p.live));
            if p.last_ts >= at.0 {
                *at = (p.last_ts, p.live);
            }
        }
        self.queued(q, Urgency::Soon);
    }

    /// Forgets the recovery position of `bot` in `room` (it left the room).
    pub fn forget_room_position(&self, bot: &str, room: &str) {
        let mut q = self.queue();
        // A position of the room still waiting for its commit goes too (it would
        // otherwise be written after the delete).
        if let Some(rooms) = q.positions.get_mut(bot) {
            rooms.remove(room);
        }
        q.jobs.push(Job {
            work: Work::ForgetPosition {
                bot: bot.to_string(),
                room: room.to_string(),
            },
            done: Done::Log("forget a recovery position", None),
        });
        self.queued(q, Urgency::Soon);
    }

    // ---- outbox --------------------------------------------------------------------

    /// Queues a message for the next group commit and returns its id at once;
    /// `durable` is called with that id (on a blocking thread) once the row is
    /// committed, or with the error that kept it from being committed. Nothing may
    /// send the message before `durable` has said `Ok`.
    ///
    /// With `handed`, the row is written as already handed to a connection (state
    /// `sent`, one attempt): the caller is about to send it as soon as it is
    /// committed, and records no separate send for that first write (one write
    /// fewer per reply). A crash between the commit and the send then counts as a
    /// send: the entry goes out again only if the recovered history lacks it, and
    /// the crash costs it one of its re-sends, never a send beyond the cap.
    /// With `here`, the caller has nothing else to do: if no commit is running, the
    /// row is committed on the calling thread before this returns (no hand-over to
    /// another thread); otherwise it joins the next commit, as always.
    #[allow(clippy::too_many_arguments)]
    pub fn outbox_enqueue(
        &self,
        bot: &str,
        room: &str,
        text: &str,
        created_at: i64,
        how: super::ReplyRow,
        durable: impl FnOnce(OutboxId, Result<(), StoreError>) + Send + 'static,
    ) -> OutboxId {
        let handed = how.handed;
        let id = OutboxId(self.commits.next_outbox_id.fetch_add(1, Ordering::SeqCst));
        let mut q = self.queue();
        q.jobs.push(Job {
            work: Work::OutboxInsert {
                id,
                bot: bot.to_string(),
                room: room.to_string(),
                text: text.to_string(),
                created_at,
                handed,
            },
            done: Done::Call(Box::new(move |r| durable(id, r))),
        });
        let urgency = if how.here {
            Urgency::Here
        } else if how.later {
            Urgency::Soon
        } else {
            Urgency::Now
        };
        self.queued(q, urgency);
        id
    }

    /// Commits the writes someone waits for on this thread, if there are any and no
    /// commit is running (which would take them): the caller's last
    /// [`ReplyRow::later`] rows, when nothing else is coming.
    pub fn commit_waiting(&self) {
        let lead = {
            let mut q = self.queue();
            let lead = !q.running && !q.paused() && q.jobs.iter().any(Job::waited_for);
            if lead {
                q.running = true;
            }
            lead
        };
        if lead {
            self.drain_inline();
        }
    }

    /// The open (pending or sent, unconfirmed) entries of `bot`, oldest first.
    pub fn outbox_pending(&self, bot: &str) -> Result<Vec<OutboxEntry>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, bot, room, text, created_at, state, attempts, sent_at
                 FROM outbox WHERE bot = ?1 AND state IN ('pending', 'sent') ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![bot], OutboxRow::read)
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(self.outbox_entry(row.map_err(|e| self.err(e))?)?);
        }
        Ok(out)
    }

    /// One entry by id.
    pub fn outbox_get(&self, id: OutboxId) -> Result<Option<OutboxEntry>, StoreError> {
        let conn = self.lock();
        let row = conn
            .query_row(
                "SELECT id, bot, room, text, created_at, state, attempts, sent_at
                 FROM outbox WHERE id = ?1",
                params![id.0],
                OutboxRow::read,
            )
            .optional()
            .map_err(|e| self.err(e))?;
        row.map(|row| self.outbox_entry(row)).transpose()
    }

    /// The entry an outbox row holds; a state this version does not know is
    /// [`StoreError::Invalid`].
    fn outbox_entry(&self, row: OutboxRow) -> Result<OutboxEntry, StoreError> {
        let state = OutboxState::parse(&row.state).ok_or_else(|| StoreError::Invalid {
            path: self.path.to_path_buf(),
            what: "outbox.state",
            value: row.state.clone(),
        })?;
        Ok(OutboxEntry {
            id: row.id,
            bot: row.bot,
            room: row.room,
            text: row.text,
            created_at: row.created_at,
            state,
            attempts: u32::try_from(row.attempts).unwrap_or(u32::MAX),
            sent_at: row.sent_at,
        })
    }

    /// Records that the entry was written to a connection at `sent_at` (Unix ms), in
    /// the next group commit. A failure is logged: the in-memory outbox stays
    /// authoritative for this run.
    pub fn outbox_mark_sent(&self, id: OutboxId, sent_at: i64) {
        self.submit(
            Work::MarkSent { id, at: sent_at },
            Done::Log("record an outbox send", Some(id)),
            Urgency::Soon,
        );
    }

    /// Moves an entry to a final state (confirmed, stale, cancelled), in the next
    /// group commit; a failure is logged.
    pub fn outbox_finish(&self, id: OutboxId, state: OutboxState) {
        self.submit(
            Work::Finish { id, state },
            Done::Log("finish an outbox entry", Some(id)),
            Urgency::Soon,
        );
    }

    /// Deletes finished (confirmed, stale, cancelled) entries created before `before` (Unix ms).
    /// Returns how many rows went.
    pub fn outbox_prune(&self, before: i64) -> Result<usize, StoreError> {
        self.lock()
            .execute(
                "DELETE FROM outbox WHERE state NOT IN ('pending', 'sent') AND created_at < ?1",
                params![before],
            )
            .map_err(|e| self.err(e))
    }
}

// ---------------------------------------------------------------------------------------
// group commit

/// One write, as data. Each is one statement, atomic by itself: a failing statement
/// is undone by SQLite and leaves the transaction as it was, so no write needs a
/// savepoint (two more statements per write, which were a third of the commit's cost).
enum Work {
    OutboxInsert {
        id: OutboxId,
        bot: String,
        room: String,
        text: String,
        created_at: i64,
        /// Written as handed to a connection (see [`Sqlite::outbox_enqueue`]).
        handed: bool,
    },
    MarkSent {
        id: OutboxId,
        at: i64,
    },
    Finish {
        id: OutboxId,
        state: OutboxState,
    },
    ForgetPosition {
        bot: String,
        room: String,
    },
    /// Nothing: a flush waiting for the commit it rides in.
    Nothing,
}

impl Work {
    fn run(self, conn: &Connection) -> rusqlite::Result<()> {
        match self {
            Work::OutboxInsert {
                id,
                bot,
                room,
                text,
                created_at,
                handed,
            } => {
                let (state, attempts, sent_at) = if handed {
                    (OutboxState::Sent, 1, Some(created_at))
                } else {
                    (OutboxState::Pending, 0, None)
                };
                conn.prepare_cached(
                    "INSERT INTO outbox (id, bot, room, text, created_at, state, attempts, sent_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?
                .execute(params![
                    id.0,
                    bot,
                    room,
                    text,
                    created_at,
                    state.as_str(),
                    attempts,
                    sent_at
                ])
                .map(drop)
            }
            Work::MarkSent { id, at } => conn
                .prepare_cached(
                    "UPDATE outbox SET state = 'sent', attempts = attempts + 1, sent_at = ?2
                     WHERE id = ?1 AND state IN ('pending', 'sent')",
                )?
                .execute(params![id.0, at])
                .map(drop),
            Work::Finish { id, state } => conn
                .prepare_cached("UPDATE outbox SET state = ?2 WHERE id = ?1")?
                .execute(params![id.0, state.as_str()])
                .map(drop),
            Work::ForgetPosition { bot, room } => conn
                .prepare_cached("DELETE FROM room_positions WHERE bot = ?1 AND room = ?2")?
                .execute(params![bot, room])
                .map(drop),
            Work::Nothing => Ok(()),
        }
    }
}

/// Who to tell how a write went.
enum Done {
    /// A caller waits for the outcome.
    Call(Box<dyn FnOnce(Result<(), StoreError>) + Send>),
    /// Bookkeeping: a failure is logged (what was being done, and the outbox entry).
    Log(&'static str, Option<OutboxId>),
}

impl Done {
    fn tell(self, result: Result<(), StoreError>) {
        match self {
            Done::Call(f) => f(result),
            Done::Log(what, id) => {
                if let Err(e) = result {
                    match id {
                        Some(id) => tracing::error!(%id, error = %e, "cannot {what}"),
                        None => tracing::error!(error = %e, "cannot {what}"),
                    }
                }
            }
        }
    }
}

/// One write waiting for the next group commit: the statements, and who to tell.
struct Job {
    work: Work,
    done: Done,
}

impl Job {
    /// Someone waits for this write (a reply's row, a flush).
    fn waited_for(&self) -> bool {
        matches!(self.done, Done::Call(_))
    }
}

/// A batch with at least this many waited-for writes means load: the next one may
/// gather (see [`Sqlite::drain`]).
const GATHER_AFTER: usize = 2;
/// Waited-for writes that make a batch worth committing at once.
const GATHER_ENOUGH: usize = 16;
/// How long a batch under load gathers (well under the group commit's 2 ms).
const GATHER_WAIT: Duration = Duration::from_micros(150);
/// Batches a writer's thread commits before it hands the rest to the blocking pool
/// (see [`Sqlite::drain_inline`]).
const INLINE_BATCHES: usize = 4;

/// Recovery positions waiting for the next commit: bot -> room -> the newest
/// timestamp and its live run (see [`RoomPosition`]).
type Positions =
    std::collections::HashMap<String, std::collections::HashMap<String, (u64, Option<(u64, u64)>)>>;

#[derive(Default)]
struct CommitQueue {
    jobs: Vec<Job>,
    /// Recovery positions, merged per bot and room until they are committed.
    positions: Positions,
    /// A drain is running (or scheduled): new jobs join its next batch.
    running: bool,
    /// Commits are held back (tests: "nothing is sent before its row is committed").
    held: bool,
    /// Commits pause while the checkpointer starts the WAL over (see
    /// [`checkpoint_round`]).
    checkpointing: bool,
    /// A commit of bookkeeping writes is scheduled.
    flush_scheduled: bool,
}

impl CommitQueue {
    fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.positions.is_empty()
    }

    /// Commits may not start now.
    fn paused(&self) -> bool {
        self.held || self.checkpointing
    }
}

/// Whether someone waits for a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Urgency {
    /// A writer waits and has nothing else to do: when no commit is running, commit
    /// on its thread at once (no hand-over to another thread: the one-at-a-time
    /// latency); else join the next commit.
    Here,
    /// A writer waits (a reply is not sent before its row is committed): commit now,
    /// on the blocking pool, while the writer goes on.
    Now,
    /// Bookkeeping (a send, a confirmation, a recovery position), or a reply whose
    /// writer has more coming ([`super::ReplyRow::later`]): with the next
    /// commit, or within [`SOON`].
    Soon,
}

/// The longest a bookkeeping write waits for company before it is committed alone.
const SOON: Duration = Duration::from_millis(2);

/// The group-commit state shared by every clone of a [`Store`].
#[derive(Default)]
struct Committer {
    queue: Mutex<CommitQueue>,
    /// The id the next outbox row gets (assigned at enqueue time, so the caller knows
    /// it before the commit).
    next_outbox_id: AtomicI64,
    batches: AtomicU64,
    writes: AtomicU64,
}

/// Holds every group commit back until dropped; see [`Store::hold_commits`].
#[must_use = "commits resume when the hold is dropped"]
pub struct CommitHold {
    store: Sqlite,
}

impl Drop for CommitHold {
    fn drop(&mut self) {
        let lead = {
            let mut q = self.store.queue();
            q.held = false;
            let lead = !q.running && !q.paused() && !q.is_empty();
            if lead {
                q.running = true;
            }
            lead
        };
        if lead {
            self.store.start_drain();
        }
    }
}

/// Hot-path writes (outbox rows, their sends and confirmations, recovery positions)
/// are committed in groups: every write queued while a commit is running goes into
/// the next one, a single transaction, and each writer is told only once its own row
/// is committed. Under load one transaction carries many writes; alone, a write
/// commits at once. A writer with nothing else to do commits on its own thread
/// ([`Urgency::Here`], a few batches at most, as does the bookkeeping flush); the
/// rest runs on tokio's blocking pool (inline when there is no runtime).
///
/// Each write is one statement (no savepoint: SQLite undoes a failing statement by
/// itself); recovery positions are merged per room while they wait, so a commit
/// writes each room's position once.
impl Sqlite {
    fn queue(&self) -> MutexGuard<'_, CommitQueue> {
        self.commits.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `work` for the next group commit; `done` gets its outcome once the
    /// transaction holding it has committed (or failed).
    fn submit(&self, work: Work, done: Done, urgency: Urgency) {
        let mut q = self.queue();
        q.jobs.push(Job { work, done });
        self.queued(q, urgency);
    }

    /// After a write was queued in `q`: a write someone waits for starts a commit at
    /// once if none is running ([`Urgency::Here`]: on this thread); bookkeeping
    /// ([`Urgency::Soon`]) rides along with the next one, or is committed within
    /// [`SOON`] by itself.
    fn queued(&self, mut q: MutexGuard<'_, CommitQueue>, urgency: Urgency) {
        let idle = !q.running && !q.paused();
        enum Then {
            Nothing,
            DrainHere,
            Drain,
            Schedule,
        }
        let then = match urgency {
            Urgency::Here | Urgency::Now if idle => {
                q.running = true;
                if urgency == Urgency::Here {
                    Then::DrainHere
                } else {
                    Then::Drain
                }
            }
            Urgency::Soon if idle && !q.flush_scheduled => {
                q.flush_scheduled = true;
                Then::Schedule
            }
            _ => Then::Nothing,
        };
        drop(q);
        match then {
            Then::Nothing => {}
            Then::DrainHere => self.drain_inline(),
            Then::Drain => self.start_drain(),
            Then::Schedule => match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    let store = self.clone();
                    rt.spawn(async move {
                        tokio::time::sleep(SOON).await;
                        store.kick(true);
                    });
                }
                Err(_) => self.kick(false),
            },
        }
    }

    /// Starts a commit of whatever is queued, unless one is running or held; with
    /// `here`, on this thread ([`Sqlite::drain_inline`]).
    fn kick(&self, here: bool) {
        let lead = {
            let mut q = self.queue();
            q.flush_scheduled = false;
            let lead = !q.running && !q.paused() && !q.is_empty();
            if lead {
                q.running = true;
            }
            lead
        };
        if lead && here {
            self.drain_inline();
        } else if lead {
            self.start_drain();
        }
    }

    /// Runs the commits on tokio's blocking pool (inline when there is no runtime), so
    /// the async workers go on while a batch is written and the next one gathers.
    /// (Committing every batch on the calling thread instead was measured: one-at-a-time
    /// latency 106 -> 17 us per row, but replies per second through `roost serve` fell
    /// from 22,000 to 9,300, as batches shrank to one row and the workers did the
    /// writing. Hence [`Urgency::Here`] commits on the caller's thread only for a
    /// caller with nothing else to do, and a caller with more replies coming queues
    /// them with [`Urgency::Soon`] first: its batches stay large.)
    fn start_drain(&self) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let store = self.clone();
                rt.spawn_blocking(move || store.drain());
            }
            Err(_) => self.drain(),
        }
    }

    /// Commits what is queued on this thread, without gathering (the caller holds
    /// `running`): a few batches at most, then whatever still comes goes to the
    /// blocking pool (a steady stream from many writers must not hold one async
    /// worker). Handing small batches to another thread costs more than writing
    /// them: a wake-up and a context switch each way.
    fn drain_inline(&self) {
        for _ in 0..INLINE_BATCHES {
            let Some(batch) = self.take_batch() else {
                return;
            };
            self.commit_batch(batch);
        }
        let more = {
            let mut q = self.queue();
            let more = !q.is_empty() && !q.paused();
            if !more {
                q.running = false;
            }
            more
        };
        if more {
            self.start_drain();
        }
    }

    /// Commits batches until the queue is empty. Under load (the last batch carried
    /// several writes someone waits for, and fewer than [`GATHER_ENOUGH`] of them are
    /// queued now) it lets the next batch gather for [`GATHER_WAIT`] first: a commit's
    /// cost is mostly per transaction (its WAL frames), so a few more rows per commit
    /// cost less than another commit. A writer alone never waits for this.
    fn drain(&self) {
        let mut loaded = false;
        loop {
            if loaded && self.waiting_writers() < GATHER_ENOUGH {
                std::thread::sleep(GATHER_WAIT);
            }
            let Some(batch) = self.take_batch() else {
                return;
            };
            loaded = batch.0.iter().filter(|j| j.waited_for()).count() >= GATHER_AFTER;
            self.commit_batch(batch);
        }
    }

    /// Queued writes someone waits for.
    fn waiting_writers(&self) -> usize {
        self.queue().jobs.iter().filter(|j| j.waited_for()).count()
    }

    /// The queued writes, or None (and the drain ends) when there are none or commits
    /// are held.
    fn take_batch(&self) -> Option<(Vec<Job>, Positions)> {
        let mut q = self.queue();
        if q.is_empty() || q.paused() {
            q.running = false;
            return None;
        }
        q.flush_scheduled = false;
        Some((
            std::mem::take(&mut q.jobs),
            std::mem::take(&mut q.positions),
        ))
    }

    fn commit_batch(&self, (jobs, positions): (Vec<Job>, Positions)) {
        // Writes: the rows touched (a flush's empty write is none).
        let n = jobs
            .iter()
            .filter(|j| !matches!(j.work, Work::Nothing))
            .count() as u64
            + positions.values().map(|r| r.len() as u64).sum::<u64>();
        let mut outcomes: Vec<(Done, rusqlite::Result<()>)> = Vec::with_capacity(jobs.len());
        let mut positions_saved: rusqlite::Result<()> = Ok(());
        let committed = {
            let conn = self.lock();
            // The statements of every batch, prepared once (parsing them was 4 % of a
            // busy host's CPU).
            let run = |sql: &str| {
                conn.prepare_cached(sql)
                    .and_then(|mut stmt| stmt.execute([]).map(drop))
            };
            match run("BEGIN IMMEDIATE") {
                Err(e) => Err(e),
                Ok(()) => {
                    // A statement that failed badly enough (I/O, disk full) may have
                    // rolled the whole transaction back: nothing after it may run
                    // outside it.
                    let mut lost: Option<rusqlite::Error> = None;
                    for job in jobs {
                        let result = match &lost {
                            Some(e) => Err(clone_error(e)),
                            None => job.work.run(&conn),
                        };
                        if let Err(e) = &result
                            && lost.is_none()
                            && conn.is_autocommit()
                        {
                            lost = Some(clone_error(e));
                        }
                        outcomes.push((job.done, result));
                    }
                    if lost.is_none() && !positions.is_empty() {
                        positions_saved = save_positions(&conn, &positions);
                        if positions_saved.is_err() && conn.is_autocommit() {
                            lost = positions_saved.as_ref().err().map(clone_error);
                        }
                    }
                    match lost {
                        Some(e) => Err(e),
                        None => {
                            let commit = run("COMMIT");
                            if commit.is_err() {
                                let _ = conn.execute_batch("ROLLBACK");
                            }
                            commit
                        }
                    }
                }
            }
        };
        match committed {
            Ok(()) => {
                self.commits.batches.fetch_add(1, Ordering::Relaxed);
                self.commits.writes.fetch_add(n, Ordering::Relaxed);
                if let Err(e) = positions_saved {
                    tracing::error!(error = %e, "cannot save recovery positions");
                }
                for (done, result) in outcomes {
                    done.tell(result.map_err(|e| self.err(e)));
                }
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, writes = n, "group commit failed");
                for (done, _) in outcomes {
                    done.tell(Err(self.err(clone_error(&e))));
                }
            }
        }
    }

    /// Waits until every write queued before this call is committed.
    pub async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            Work::Nothing,
            Done::Call(Box::new(move |_| {
                let _ = tx.send(());
            })),
            Urgency::Now,
        );
        let _ = rx.await;
    }

    /// Holds every group commit back until the returned guard is dropped: queued
    /// writes stay uncommitted (and their writers unanswered). For tests of the
    /// promise that nothing is sent before its row is committed.
    #[doc(hidden)]
    pub fn hold_commits(&self) -> CommitHold {
        self.queue().held = true;
        CommitHold {
            store: self.clone(),
        }
    }

    /// Transactions and writes committed so far by the group commit.
    pub fn commit_stats(&self) -> CommitStats {
        CommitStats {
            batches: self.commits.batches.load(Ordering::Relaxed),
            writes: self.commits.writes.load(Ordering::Relaxed),
        }
    }
}

/// Writes the merged recovery positions of one commit (a position never moves back;
/// its live run is the one saved with the newest position).
fn save_positions(conn: &Connection, positions: &Positions) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO room_positions (bot, room, last_ts, live_from, live_until)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (bot, room) DO UPDATE
         SET live_from = CASE WHEN excluded.last_ts >= last_ts
                              THEN excluded.live_from ELSE live_from END,
             live_until = CASE WHEN excluded.last_ts >= last_ts
                               THEN excluded.live_until ELSE live_until END,
             last_ts = MAX(last_ts, excluded.last_ts)",
    )?;
    for (bot, rooms) in positions {
        for (room, (ts, live)) in rooms {
            let (ts, from, until) = super::position_columns(*ts, *live);
            stmt.execute(params![bot, room, ts, from, until])?;
        }
    }
    Ok(())
}

fn clone_error(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, msg) => {
            rusqlite::Error::SqliteFailure(*code, msg.clone())
        }
        other => rusqlite::Error::ToSqlConversionFailure(other.to_string().into()),
    }
}

/// How often the background checkpointer moves the WAL into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// A WAL longer than this many frames (4 KiB pages) after a passive checkpoint is
/// restarted: see [`spawn_checkpointer`].
const RESTART_WAL_FRAMES: i64 = 256;

/// The longest a restarting checkpoint holds new commits back.
const RESTART_WAIT: Duration = Duration::from_millis(20);

/// Runs WAL checkpoints on a connection of its own, in a thread of its own, so
/// that no commit on the sending path ever pays for one. `PASSIVE` never blocks
/// the writer or readers.
///
/// Under steady writes a passive checkpoint never catches up with the writer, so
/// SQLite never starts the WAL over and it grows without end (88 MB in 5 s of
/// pipelined replies): each new frame then extends the file, and the file system
/// allocates and zeroes blocks on the sending path (6.7 % of all CPU in that
/// benchmark). So when frames are left after the passive pass, a `RESTART`
/// checkpoint copies the few written meanwhile and has the next commit write the
/// WAL from its start again, over blocks already allocated. It holds commits back
/// for at most [`RESTART_WAIT`] (their busy handler waits), then gives up until the
/// next round. The thread ends when the last handle is dropped.
fn spawn_checkpointer(store: &Sqlite) {
    let path = store.path.clone();
    let weak: Weak<Committer> = Arc::downgrade(&store.commits);
    let weak_conn = Arc::downgrade(&store.conn);
    let spawned = std::thread::Builder::new()
        .name("roost-checkpoint".into())
        .spawn(move || {
            let conn = match Connection::open(path.as_path()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "no background WAL checkpoints");
                    return;
                }
            };
            let _ = conn.busy_timeout(BUSY_TIMEOUT);
            loop {
                std::thread::sleep(CHECKPOINT_EVERY);
                let (Some(commits), Some(db)) = (weak.upgrade(), weak_conn.upgrade()) else {
                    return;
                };
                let store = Sqlite {
                    conn: db,
                    path: path.clone(),
                    commits,
                };
                checkpoint_round(&conn, &store);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the WAL checkpointer");
    }
}

/// One round of [`spawn_checkpointer`]: a passive checkpoint, and a restarting one
/// when the WAL is still long. A restart needs a moment without commits, which a
/// steady stream of them never leaves a busy handler: so the group commit pauses
/// for it (the batch in progress finishes; new writes queue up meanwhile), for the
/// restart's few pages and syncs, once in a while, instead of the WAL growing (every
/// new WAL page a fresh page of the file: the kernel's page allocation and zeroing
/// were a tenth of a busy host's CPU).
fn checkpoint_round(conn: &Connection, store: &Sqlite) {
    let (path, commits) = (store.path(), &store.commits);
    // (frames in the WAL, frames checkpointed)
    let checkpoint = |mode: &str| {
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        })
    };
    match checkpoint("PASSIVE") {
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "WAL checkpoint failed");
        }
        Ok((frames, _)) if frames > RESTART_WAL_FRAMES => {
            let queue = || commits.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue().checkpointing = true;
            // The batch being committed finishes first (bounded: then the restart's
            // own busy wait applies).
            let deadline = std::time::Instant::now() + RESTART_WAIT;
            while queue().running && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(100));
            }
            let _ = conn.busy_timeout(RESTART_WAIT);
            if let Err(e) = checkpoint("RESTART") {
                tracing::debug!(path = %path.display(), error = %e, "WAL restart failed");
            }
            let _ = conn.busy_timeout(BUSY_TIMEOUT);
            let resume = {
                let mut q = queue();
                q.checkpointing = false;
                let resume = !q.running && !q.held && !q.is_empty();
                if resume {
                    q.running = true;
                }
                resume
            };
            if resume {
                // What queued up during the pause is committed now (on this thread,
                // which has no runtime to hand it to).
                store.start_drain();
            }
        }
        Ok(_) => {}
    }
}

fn create_state_dir(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| StoreError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })
}

/// Creates `path` with mode 0600 if `create`, or tightens an existing file to 0600.
fn secure_file(path: &Path, create: bool) -> Result<(), StoreError> {
    let perm_err = |source| StoreError::Permissions {
        path: path.to_path_buf(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        if create && !path.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(perm_err)?;
        }
        match std::fs::metadata(path) {
            Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(perm_err)?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => {}
            Err(e) => return Err(perm_err(e)),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, create, perm_err);
    }
    Ok(())
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

fn classify_open(path: &Path, source: rusqlite::Error) -> StoreError {
    if is_corruption(&source) {
        StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: source.to_string(),
        }
    } else {
        StoreError::Open {
            path: path.to_path_buf(),
            source,
        }
    }
}

fn classify(path: &Path, source: rusqlite::Error) -> StoreError {
    if is_corruption(&source) {
        StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: source.to_string(),
        }
    } else {
        StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    /// The texts of `bot`'s open outbox rows, oldest first.
    fn pending_texts(store: &Sqlite, bot: &str) -> Vec<String> {
        store
            .outbox_pending(bot)
            .unwrap()
            .into_iter()
            .map(|e| e.text)
            .collect()
    }

    /// Rows queued with `later` start no commit: the caller's `commit_waiting` commits
    /// them all in one transaction on its own thread, before it returns.
    #[tokio::test(start_paused = true)]
    async fn later_rows_wait_for_commit_waiting_and_go_in_one_transaction() {
        let tmp = tempdir();
        let store = Sqlite::open(tmp.path()).unwrap();
        let before = store.commit_stats();
        let told = Arc::new(Mutex::new(Vec::new()));
        let later = crate::store::ReplyRow {
            handed: true,
            later: true,
            ..Default::default()
        };
        for (i, text) in ["one", "two", "three"].into_iter().enumerate() {
            let told = told.clone();
            store.outbox_enqueue("b", "r", text, i as i64, later, move |id, r| {
                told.lock().unwrap().push((id, r.is_ok()));
            });
        }
        assert!(told.lock().unwrap().is_empty(), "no row committed yet");
        assert!(store.outbox_pending("b").unwrap().is_empty());
        store.commit_waiting();
        let told = told.lock().unwrap().clone();
        assert_eq!(told.len(), 3, "all told before commit_waiting returned");
        assert!(told.iter().all(|(_, ok)| *ok));
        assert!(told.windows(2).all(|w| w[0].0 < w[1].0), "in order");
        let after = store.commit_stats();
        assert_eq!(after.batches - before.batches, 1);
        assert_eq!(after.writes - before.writes, 3);
        let texts = pending_texts(&store, "b");
        assert_eq!(texts, ["one", "two", "three"]);
        // Nothing waits: a second call commits nothing.
        store.commit_waiting();
        assert_eq!(store.commit_stats().batches, after.batches);
    }

    /// A `later` row whose caller never calls `commit_waiting` (its last message
    /// had no reply) is committed by the bookkeeping flush within [`SOON`].
    #[tokio::test(start_paused = true)]
    async fn a_later_row_left_waiting_is_committed_within_soon() {
        let tmp = tempdir();
        let store = Sqlite::open(tmp.path()).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let later = crate::store::ReplyRow {
            later: true,
            ..Default::default()
        };
        store.outbox_enqueue("b", "r", "alone", 1, later, move |_, r| {
            let _ = tx.send(r.is_ok());
        });
        let ok = tokio::time::timeout(SOON * 2, rx).await;
        assert_eq!(ok.map(Result::ok), Ok(Some(true)));
        assert_eq!(store.outbox_pending("b").unwrap().len(), 1);
    }

    #[test]
    fn creates_dir_schema_and_modes() {
        let tmp = tempdir();
        let dir = tmp.path().join("nested/state");
        let store = Sqlite::open(&dir).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(store.path(), dir.join(DB_FILE));
        crate::store::Store::sqlite(store.clone())
            .outbox_push("b", "r", "t", 1)
            .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for name in ["roost.db", "roost.db-wal", "roost.db-shm"] {
                let p = dir.join(name);
                let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{name} has mode {mode:o}");
            }
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700);
        }
        let mode: String = store
            .lock()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn a_checkpoint_round_starts_a_long_wal_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(dir.path()).unwrap();
        let wal = dir.path().join(format!("{DB_FILE}-wal"));
        let text = "x".repeat(3000);
        // Each row in its own commit: about one page per row.
        let facade = crate::store::Store::sqlite(store.clone());
        let write = |n: i64| {
            for i in 0..n {
                facade.outbox_push("bot", "lobby", &text, i).unwrap();
            }
        };
        write(400);
        let first = std::fs::metadata(&wal).unwrap().len();
        let frames_first = first / 4096;
        assert!(
            frames_first > RESTART_WAL_FRAMES as u64,
            "{frames_first} frames"
        );
        let conn = Connection::open(store.path()).unwrap();
        checkpoint_round(&conn, &store);
        write(400);
        let second = std::fs::metadata(&wal).unwrap().len();
        // Started over: the second batch overwrote the first's frames instead of
        // growing the file to about twice its size.
        assert!(second <= first + first / 10, "{first} -> {second}");
    }

    #[test]
    fn positions_waiting_for_one_commit_are_merged_and_a_leave_wins() {
        let store = Sqlite::open_in_memory().unwrap();
        let hold = store.hold_commits();
        let live = RoomPosition {
            live: Some((60, 70)),
            ..RoomPosition::at("lobby", 50)
        };
        store.save_room_positions(
            "b",
            vec![RoomPosition::at("lobby", 50), RoomPosition::at("dev", 7)],
        );
        store.save_room_positions("b", vec![live.clone(), RoomPosition::at("dev", 9)]);
        store.save_room_positions("b", vec![RoomPosition::at("lobby", 40)]);
        store.save_room_positions("b", vec![RoomPosition::at("gone", 3)]);
        store.forget_room_position("b", "gone");
        let before = store.commit_stats();
        drop(hold);
        let after = store.commit_stats();
        assert_eq!(after.batches - before.batches, 1);
        // Two rooms' positions and one delete: one write each.
        assert_eq!(after.writes - before.writes, 3);
        let mut pos = store.room_positions("b").unwrap();
        pos.sort();
        // The newest position's live run is kept; an older position changes nothing.
        assert_eq!(pos, [RoomPosition::at("dev", 9), live]);
    }

    #[test]
    fn a_failing_write_fails_alone_and_its_commit_goes_on() {
        let store = Sqlite::open_in_memory().unwrap();
        let facade = crate::store::Store::sqlite(store.clone());
        let first = facade.outbox_push("b", "r", "one", 1).unwrap();
        let hold = store.hold_commits();
        let (tx, rx) = std::sync::mpsc::channel();
        // A row whose id is taken fails (primary key); the one queued after it is kept.
        store
            .commits
            .next_outbox_id
            .store(first.0, Ordering::SeqCst);
        let tx2 = tx.clone();
        store.outbox_enqueue("b", "r", "dup", 2, Default::default(), move |_, r| {
            tx2.send(r.is_ok()).unwrap();
        });
        store.outbox_enqueue("b", "r", "two", 3, Default::default(), move |_, r| {
            tx.send(r.is_ok()).unwrap();
        });
        drop(hold);
        assert!(!rx.recv().unwrap(), "the duplicate id fails");
        assert!(rx.recv().unwrap(), "the next write is committed");
        let texts = pending_texts(&store, "b");
        assert_eq!(texts, ["one", "two"]);
    }

    #[test]
    fn the_open_rows_are_read_through_their_partial_index() {
        let store = Sqlite::open_in_memory().unwrap();
        let plan: Vec<String> = {
            let conn = store.lock();
            let mut stmt = conn
                .prepare(
                    "EXPLAIN QUERY PLAN SELECT id, bot, room, text, created_at, state, attempts, sent_at
                     FROM outbox WHERE bot = ?1 AND state IN ('pending', 'sent') ORDER BY id",
                )
                .unwrap();
            stmt.query_map(["b"], |r| r.get::<_, String>(3))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        assert!(plan.iter().any(|d| d.contains("outbox_open")), "{plan:?}");
        // Rows leave the index as they are finished, and come back if reopened.
        let facade = crate::store::Store::sqlite(store.clone());
        let a = facade.outbox_push("b", "r", "one", 1).unwrap();
        let b = facade.outbox_push("b", "r", "two", 2).unwrap();
        store.outbox_finish(a, OutboxState::Confirmed);
        store.outbox_mark_sent(b, 3);
        let open: Vec<OutboxId> = store
            .outbox_pending("b")
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(open, [b]);
        let indexed: i64 = store
            .lock()
            .query_row(
                "SELECT COUNT(*) FROM outbox INDEXED BY outbox_open
                 WHERE bot = 'b' AND state IN ('pending', 'sent')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexed, 1);
    }

    #[test]
    fn migrating_from_version_3_keeps_open_rows_readable() {
        let tmp = tempdir();
        {
            let mut conn = Connection::open(tmp.path().join(DB_FILE)).unwrap();
            let tx = conn.transaction().unwrap();
            for sql in &MIGRATIONS[..3] {
                tx.execute_batch(sql).unwrap();
            }
            tx.pragma_update(None, "user_version", 3).unwrap();
            tx.execute(
                "INSERT INTO outbox (id, bot, room, text, created_at, state, attempts)
                 VALUES (1, 'b', 'r', 'done', 1, 'confirmed', 1),
                        (2, 'b', 'r', 'open', 2, 'sent', 1),
                        (3, 'b', 'r', 'new', 3, 'pending', 0)",
                [],
            )
            .unwrap();
            tx.execute(
                "INSERT INTO room_positions (bot, room, last_ts) VALUES ('b', 'r', 42)",
                [],
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let store = Sqlite::open(tmp.path()).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        // A position saved before live runs were kept has none.
        assert_eq!(
            store.room_positions("b").unwrap(),
            [RoomPosition::at("r", 42)]
        );
        assert_eq!(pending_texts(&store, "b"), ["open", "new"]);
        // New ids continue after the old ones.
        let id = crate::store::Store::sqlite(store.clone())
            .outbox_push("b", "r", "next", 4)
            .unwrap();
        assert_eq!(id, OutboxId(4));
    }

    #[test]
    fn tightens_existing_file_mode() {
        let tmp = tempdir();
        let path = tmp.path().join(DB_FILE);
        std::fs::write(&path, b"").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            Sqlite::open(tmp.path()).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let tmp = tempdir();
        let path = tmp.path().join(DB_FILE);
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let err = Sqlite::open(tmp.path()).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[test]
    fn newer_schema_is_refused() {
        let tmp = tempdir();
        {
            let store = Sqlite::open(tmp.path()).unwrap();
            store
                .lock()
                .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        let err = Sqlite::open(tmp.path()).unwrap_err();
        assert!(matches!(err, StoreError::TooNew { .. }), "{err:?}");
    }

    #[test]
    fn reopen_keeps_data_and_migrations_are_idempotent() {
        let tmp = tempdir();
        let key = ApiKey::new("secret-key-1");
        {
            let store = Sqlite::open(tmp.path()).unwrap();
            store
                .save_credentials("http://a", "p", "name-1", &key)
                .unwrap();
        }
        // Reopened: the same checks as on a store that stayed open.
        let store = crate::store::Store::open(tmp.path()).unwrap();
        crate::store::suite::credentials_read_replaced_and_deleted(&store);
    }
}

// ---------------------------------------------------------------------------------------
// per-persona key/value data (the `kv` capability)

/// Key/value data, one namespace per persona (its label). The caller scopes every call
/// to one persona; nothing here lets one namespace reach another. Quotas are checked
/// and the write made in one transaction, so concurrent writers cannot overshoot.
///
/// ```
/// use roost::store::{KvQuota, KvSetError, Store};
/// let store = Store::open_in_memory().unwrap();
/// let quota = KvQuota { total_bytes: 16, value_bytes: 8 };
/// store.kv_set("rook", "seen/ada", b"2", quota).unwrap();
/// assert_eq!(store.kv_get("rook", "seen/ada").unwrap().as_deref(), Some(&b"2"[..]));
/// assert_eq!(store.kv_get("sage", "seen/ada").unwrap(), None);
/// assert_eq!(store.kv_usage("rook").unwrap(), 9);
/// assert!(matches!(
///     store.kv_set("rook", "seen/bob", b"12345678", quota),
///     Err(KvSetError::QuotaExceeded { .. })
/// ));
/// assert_eq!(store.kv_list("rook", "seen/").unwrap(), ["seen/ada"]);
/// assert!(store.kv_delete("rook", "seen/ada").unwrap());
/// ```
impl Sqlite {
    /// The value of `key` in `persona`'s namespace.
    pub fn kv_get(&self, persona: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.lock()
            .query_row(
                "SELECT value FROM kv WHERE persona = ?1 AND key = ?2",
                params![persona, key],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Stores `value` under `key`, replacing an earlier value, if the value fits
    /// `quota.value_bytes` and the namespace stays within `quota.total_bytes` (the
    /// replaced entry no longer counts).
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
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        // Two primary-key lookups: the namespace's running size and the entry replaced.
        let used: i64 = tx
            .query_row(
                "SELECT bytes FROM kv_usage WHERE persona = ?1",
                params![persona],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?
            .unwrap_or(0);
        let replaced: i64 = tx
            .query_row(
                "SELECT length(CAST(key AS BLOB)) + length(value)
                 FROM kv WHERE persona = ?1 AND key = ?2",
                params![persona, key],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?
            .unwrap_or(0);
        let used = used.max(0) as u64;
        let would_use = used - (replaced.max(0) as u64).min(used) + key.len() as u64 + size;
        if would_use > quota.total_bytes {
            // Dropping `tx` rolls back (nothing was written).
            return Err(KvSetError::QuotaExceeded {
                used,
                would_use,
                quota: quota.total_bytes,
            });
        }
        tx.execute(
            "INSERT INTO kv (persona, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (persona, key) DO UPDATE SET value = excluded.value",
            params![persona, key, value],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO kv_usage (persona, bytes) VALUES (?1, ?2)
             ON CONFLICT (persona) DO UPDATE SET bytes = excluded.bytes",
            params![persona, would_use as i64],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Removes `key`; `true` if it existed.
    pub fn kv_delete(&self, persona: &str, key: &str) -> Result<bool, StoreError> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let freed: Option<i64> = tx
            .query_row(
                "DELETE FROM kv WHERE persona = ?1 AND key = ?2
                 RETURNING length(CAST(key AS BLOB)) + length(value)",
                params![persona, key],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        if let Some(freed) = freed {
            tx.execute(
                "UPDATE kv_usage SET bytes = MAX(bytes - ?2, 0) WHERE persona = ?1",
                params![persona, freed],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(freed.is_some())
    }

    /// The keys of `persona` starting with `prefix` (`""`: every key), in byte order.
    pub fn kv_list(&self, persona: &str, prefix: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.lock();
        // A range scan on the primary key: TEXT compares as UTF-8 bytes (BINARY), so
        // every key with the prefix sorts at or after it, and they come first.
        let mut stmt = conn
            .prepare_cached("SELECT key FROM kv WHERE persona = ?1 AND key >= ?2 ORDER BY key")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![persona, prefix], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        let mut keys = Vec::new();
        for key in rows {
            let key = key.map_err(|e| self.err(e))?;
            if !key.starts_with(prefix) {
                break;
            }
            keys.push(key);
        }
        Ok(keys)
    }

    /// Bytes (keys + values) `persona` holds (its running total: one lookup).
    pub fn kv_usage(&self, persona: &str) -> Result<u64, StoreError> {
        self.lock()
            .query_row(
                "SELECT bytes FROM kv_usage WHERE persona = ?1",
                params![persona],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|n| n.unwrap_or(0).max(0) as u64)
            .map_err(|e| self.err(e))
    }
}

// ---------------------------------------------------------------------------------------
// LLM token budgets (see `llm::budget`)

impl Sqlite {
    /// A persona's stored budget buckets `(wall-clock ms, tokens)` from `since_ms` on.
    pub fn llm_budget_load(
        &self,
        persona: &str,
        since_ms: i64,
    ) -> Result<Vec<(i64, u64)>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT bucket_ms, tokens FROM llm_budget
                 WHERE persona = ?1 AND bucket_ms >= ?2 ORDER BY bucket_ms",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![persona, since_ms], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Sets the tokens of one budget bucket (a bucket of 0 tokens is removed) and
    /// removes the persona's buckets older than `forget_before_ms`.
    pub fn llm_budget_save(
        &self,
        persona: &str,
        bucket_ms: i64,
        tokens: u64,
        forget_before_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        if tokens == 0 {
            tx.execute(
                "DELETE FROM llm_budget WHERE persona = ?1 AND bucket_ms = ?2",
                params![persona, bucket_ms],
            )
        } else {
            tx.execute(
                "INSERT INTO llm_budget (persona, bucket_ms, tokens) VALUES (?1, ?2, ?3)
                 ON CONFLICT (persona, bucket_ms) DO UPDATE SET tokens = excluded.tokens",
                params![persona, bucket_ms, tokens.min(i64::MAX as u64) as i64],
            )
        }
        .map_err(|e| self.err(e))?;
        tx.execute(
            "DELETE FROM llm_budget WHERE persona = ?1 AND bucket_ms < ?2",
            params![persona, forget_before_ms],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod kv_tests {
    use super::*;

    const Q: KvQuota = KvQuota {
        total_bytes: 100,
        value_bytes: 40,
    };

    #[test]
    fn data_survives_reopening() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let s = Sqlite::open(tmp.path()).unwrap();
            s.kv_set("p", "k", b"kept", Q).unwrap();
        }
        let s = Sqlite::open(tmp.path()).unwrap();
        assert_eq!(s.kv_get("p", "k").unwrap().unwrap(), b"kept");
    }

    /// The namespace's size as a full scan would count it.
    fn summed(s: &Sqlite, persona: &str) -> u64 {
        s.lock()
            .query_row(
                "SELECT COALESCE(SUM(length(CAST(key AS BLOB)) + length(value)), 0)
                 FROM kv WHERE persona = ?1",
                params![persona],
                |r| r.get::<_, i64>(0),
            )
            .unwrap() as u64
    }

    #[test]
    fn migrating_from_version_2_counts_existing_namespaces() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let mut conn = Connection::open(tmp.path().join(DB_FILE)).unwrap();
            let tx = conn.transaction().unwrap();
            for sql in &MIGRATIONS[..2] {
                tx.execute_batch(sql).unwrap();
            }
            tx.pragma_update(None, "user_version", 2).unwrap();
            tx.execute(
                "INSERT INTO kv (persona, key, value) VALUES ('p', 'ab', x'010203'), ('p', 'é', x''), ('q', 'k', x'00')",
                [],
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let s = Sqlite::open(tmp.path()).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(s.kv_usage("p").unwrap(), 5 + 2);
        assert_eq!(s.kv_usage("q").unwrap(), 2);
        s.kv_set("p", "ab", b"1", Q).unwrap();
        assert_eq!(s.kv_usage("p").unwrap(), summed(&s, "p"));
    }
}
