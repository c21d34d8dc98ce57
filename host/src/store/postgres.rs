//! The PostgreSQL backend: several roost hosts share one database.
//!
//! - Connections run on a small tokio runtime of this backend's own (one worker), so
//!   the synchronous [`Store`](super::Store) API works from async code and from plain
//!   threads alike. Reads and lease statements use one shared connection (statements
//!   are pipelined); writes go through one writer connection.
//! - **Group commit**, as with SQLite: writes are queued in order and everything
//!   queued while a transaction runs goes into the next one. Each writer is told
//!   when its row is committed. A batch that fails on a database error is retried
//!   write by write, so one bad write does not take the others down.
//! - **Fencing**: a write of a persona made while leases are on carries the lease's
//!   epoch; inside the transaction the lease row is read `FOR SHARE` and the write is
//!   refused ([`StoreError::Fenced`]) unless this host still holds that epoch. The
//!   share lock makes a takeover wait for a write in flight, so the new holder sees
//!   every row the old one committed.
//! - **Outbox ids** are allocated in blocks of 2^20 from a sequence (the id is known
//!   before the commit, as the session needs); taking a lease takes a fresh block,
//!   so a persona's new rows sort after those of its previous holder.
//! - **Migrations** are versioned in `roost_schema` and applied at start under an
//!   advisory lock, so hosts starting together migrate once.
//! - A lost connection is re-established on the next use (writes queued meanwhile
//!   fail and are logged, as a failed SQLite commit would be).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement, Transaction};

use super::{
    CommitStats, FenceToken, KvQuota, KvSetError, OutboxEntry, OutboxId, OutboxState, RoomPosition,
    StoreError, StoredCredentials,
};
use crate::protocol::ApiKey;

/// The schema version this build writes to PostgreSQL.
pub const PG_SCHEMA_VERSION: i64 = 3;

/// Migrations, index `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1
    r#"
    CREATE TABLE credentials (
        server     TEXT NOT NULL,
        persona    TEXT NOT NULL,
        name       TEXT NOT NULL,
        key        TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (server, persona)
    );
    CREATE TABLE registrations (
        server  TEXT NOT NULL,
        persona TEXT NOT NULL,
        at      BIGINT NOT NULL
    );
    CREATE INDEX registrations_server_persona_at ON registrations (server, persona, at);
    CREATE TABLE room_positions (
        bot     TEXT NOT NULL,
        room    TEXT NOT NULL,
        last_ts BIGINT NOT NULL,
        PRIMARY KEY (bot, room)
    );
    CREATE SEQUENCE outbox_blocks;
    CREATE TABLE outbox (
        id         BIGINT PRIMARY KEY,
        bot        TEXT NOT NULL,
        room       TEXT NOT NULL,
        text       TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        state      TEXT NOT NULL DEFAULT 'pending',
        attempts   INTEGER NOT NULL DEFAULT 0,
        sent_at    BIGINT,
        epoch      BIGINT
    );
    CREATE INDEX outbox_bot_state ON outbox (bot, state, id);
    CREATE TABLE kv (
        persona TEXT NOT NULL,
        key     TEXT COLLATE "C" NOT NULL,
        value   BYTEA NOT NULL,
        PRIMARY KEY (persona, key)
    );
    CREATE TABLE hosts (
        host       TEXT PRIMARY KEY,
        started_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
        expires_at TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE leases (
        persona     TEXT PRIMARY KEY,
        holder      TEXT NOT NULL,
        epoch       BIGINT NOT NULL,
        expires_at  TIMESTAMPTZ NOT NULL,
        acquired_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
    );
    "#,
    // 1 -> 2: each kv namespace's size is kept as a running total (a write costs O(1)
    // instead of summing the namespace; its row also serialises the namespace's
    // writers), and LLM token budgets survive a restart and follow a persona to
    // another host.
    r#"
    CREATE TABLE kv_usage (
        persona TEXT PRIMARY KEY,
        bytes   BIGINT NOT NULL
    );
    INSERT INTO kv_usage (persona, bytes)
        SELECT persona, SUM(octet_length(key) + octet_length(value)) FROM kv GROUP BY persona;
    CREATE TABLE llm_budget (
        persona   TEXT NOT NULL,
        bucket_ms BIGINT NOT NULL,
        tokens    BIGINT NOT NULL,
        PRIMARY KEY (persona, bucket_ms)
    );
    "#,
    // 2 -> 3: a position held back before a recovery that has not finished keeps the
    // run of messages the bot already heard live past it, so the next holder does not
    // hand them over again.
    r#"
    ALTER TABLE room_positions ADD COLUMN live_from BIGINT;
    ALTER TABLE room_positions ADD COLUMN live_until BIGINT;
    "#,
];

/// Ids per block of outbox ids.
const ID_BLOCK: i64 = 1 << 20;
/// Most writes in one group commit.
const MAX_BATCH: usize = 512;
/// Advisory lock key held while migrating ("roost" in ASCII).
const MIGRATION_LOCK: i64 = 0x0072_6f6f_7374;

/// PostgreSQL connection options beyond the URL.
#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    /// A schema (created if missing) to keep roost's tables in, instead of the
    /// connection's default search path. Letters, digits and `_` only.
    pub schema: Option<String>,
}

/// One lease as stored.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseRow {
    pub persona: String,
    /// The holding host (empty: released).
    pub holder: String,
    /// The fencing token: grows by one with each new holder.
    pub epoch: i64,
    /// Milliseconds until it expires (negative: expired).
    pub expires_in_ms: i64,
}

/// An outbox row to insert, with the recovery positions of its bot committed with it.
pub(crate) struct NewRow<'a> {
    pub(crate) bot: &'a str,
    pub(crate) room: &'a str,
    pub(crate) text: &'a str,
    pub(crate) created_at: i64,
    pub(crate) positions: Vec<RoomPosition>,
    /// Written as already handed to a connection (see [`super::ReplyRow`]).
    pub(crate) handed: bool,
}

/// The PostgreSQL backend (a cloneable handle).
#[derive(Clone)]
pub(crate) struct Postgres {
    inner: Arc<Inner>,
}

struct Inner {
    rt: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    shared: Arc<Shared>,
    writes: mpsc::UnboundedSender<Job>,
    /// The next outbox id and the end of its block.
    ids: Mutex<(i64, i64)>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.lock().unwrap_or_else(|p| p.into_inner()).take() {
            rt.shutdown_background();
        }
    }
}

/// What the connection tasks share.
struct Shared {
    config: tokio_postgres::Config,
    schema: Option<String>,
    location: String,
    reader: tokio::sync::Mutex<Option<Arc<Client>>>,
    batches: AtomicU64,
    writes: AtomicU64,
}

impl fmt::Debug for Postgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("postgres", &self.inner.shared.location)
            .finish()
    }
}

type Done = Box<dyn FnOnce(Result<u64, KvSetError>) + Send>;

struct Job {
    write: Write,
    done: Done,
}

/// One write, as data: the writer task runs it inside its batch's transaction.
enum Write {
    OutboxInsert {
        id: i64,
        bot: String,
        room: String,
        text: String,
        created_at: i64,
        /// Written as already handed to a connection: `sent`, one attempt.
        handed: bool,
        /// Recovery positions of `bot` committed with the row.
        positions: Vec<RoomPosition>,
        fence: Option<FenceToken>,
    },
    MarkSent {
        id: i64,
        sent_at: i64,
    },
    Finish {
        id: i64,
        state: &'static str,
    },
    Positions {
        bot: String,
        positions: Vec<RoomPosition>,
        fence: Option<FenceToken>,
    },
    ForgetPosition {
        bot: String,
        room: String,
        fence: Option<FenceToken>,
    },
    Credentials {
        server: String,
        persona: String,
        name: String,
        key: String,
    },
    DeleteCredentials {
        server: String,
        persona: String,
    },
    Registration {
        server: String,
        persona: String,
        at: i64,
    },
    Adopt {
        server: String,
        name: String,
        label: String,
    },
    KvSet {
        persona: String,
        key: String,
        value: Vec<u8>,
        quota: KvQuota,
        fence: Option<FenceToken>,
    },
    KvDelete {
        persona: String,
        key: String,
        fence: Option<FenceToken>,
    },
    BudgetSave {
        persona: String,
        bucket_ms: i64,
        tokens: i64,
        forget_before_ms: i64,
        fence: Option<FenceToken>,
    },
    Prune {
        before: i64,
    },
    Nothing,
}

fn pg_err(location: &str, e: &tokio_postgres::Error) -> StoreError {
    // The driver's Display is terse ("db error"); the source says what happened.
    let detail = match std::error::Error::source(e) {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    };
    StoreError::Postgres {
        location: location.to_string(),
        detail,
    }
}

fn valid_schema(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

impl Postgres {
    /// Connects, migrates, and starts the writer.
    pub(crate) fn connect(url: &str, options: PgOptions) -> Result<Postgres, StoreError> {
        let location = super::redact_url(url);
        let bad = |detail: String| StoreError::Postgres {
            location: location.clone(),
            detail,
        };
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| bad(format!("{e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("roost");
        }
        if let Some(s) = &options.schema
            && !valid_schema(s)
        {
            return Err(bad(format!(
                "schema name {s:?}: letters, digits and _ only"
            )));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("roost-postgres")
            .enable_all()
            .build()
            .map_err(|e| bad(format!("cannot start the connection runtime: {e}")))?;
        let handle = rt.handle().clone();
        let shared = Arc::new(Shared {
            config,
            schema: options.schema,
            location,
            reader: tokio::sync::Mutex::new(None),
            batches: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let pg = Postgres {
            inner: Arc::new(Inner {
                rt: Mutex::new(Some(rt)),
                handle: handle.clone(),
                shared: shared.clone(),
                writes: tx,
                ids: Mutex::new((0, 0)),
            }),
        };
        let s = shared.clone();
        pg.block(async move { migrate(&s).await })?;
        handle.spawn(writer(shared, rx));
        Ok(pg)
    }

    pub(crate) fn location(&self) -> String {
        self.inner.shared.location.clone()
    }

    /// Runs `f` on the backend's runtime and waits for it (from any thread).
    fn block<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.inner.handle.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().unwrap_or(Err(StoreError::Gone))
    }

    /// Runs a read (or a single-statement write) on the shared connection.
    fn read<T: Send + 'static, F>(
        &self,
        f: impl FnOnce(Arc<Client>) -> F + Send + 'static,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, tokio_postgres::Error>> + Send + 'static,
    {
        let shared = self.inner.shared.clone();
        self.block(async move {
            let client = reader(&shared).await?;
            f(client).await.map_err(|e| pg_err(&shared.location, &e))
        })
    }

    fn submit(&self, write: Write, done: impl FnOnce(Result<u64, KvSetError>) + Send + 'static) {
        if let Err(mpsc::error::SendError(job)) = self.inner.writes.send(Job {
            write,
            done: Box::new(done),
        }) {
            (job.done)(Err(KvSetError::Store(StoreError::Gone)));
        }
    }

    /// Queues `write` and waits for its outcome.
    fn write_wait(&self, write: Write) -> Result<u64, KvSetError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(write, move |r| {
            let _ = tx.send(r);
        });
        rx.recv()
            .unwrap_or(Err(KvSetError::Store(StoreError::Gone)))
    }

    fn write_store(&self, write: Write) -> Result<u64, StoreError> {
        self.write_wait(write).map_err(store_only)
    }

    pub(crate) fn schema_version(&self) -> Result<i64, StoreError> {
        self.read(|c| async move {
            let row = c
                .query_one("SELECT COALESCE(MAX(version), 0) FROM roost_schema", &[])
                .await?;
            Ok(row.get::<_, i64>(0))
        })
    }

    pub(crate) fn ping(&self) -> Result<(), StoreError> {
        self.read(|c| async move { c.simple_query("SELECT 1").await.map(drop) })
    }

    // ---- leases --------------------------------------------------------------------

    pub(crate) fn heartbeat(&self, host: &str, ttl: Duration) -> Result<Vec<String>, StoreError> {
        let host = host.to_string();
        let ms = ttl.as_millis() as f64;
        self.read(move |c| async move {
            c.execute(
                "INSERT INTO hosts (host, expires_at)
                 VALUES ($1, clock_timestamp() + $2::float8 * interval '1 millisecond')
                 ON CONFLICT (host) DO UPDATE SET expires_at = excluded.expires_at",
                &[&host, &ms],
            )
            .await?;
            c.execute(
                "DELETE FROM hosts WHERE expires_at < clock_timestamp() - interval '1 hour'",
                &[],
            )
            .await?;
            let rows = c
                .query(
                    "SELECT host FROM hosts WHERE expires_at > clock_timestamp() ORDER BY host",
                    &[],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
        })
    }

    pub(crate) fn renew(
        &self,
        host: &str,
        ttl: Duration,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let host = host.to_string();
        let ms = ttl.as_millis() as f64;
        self.read(move |c| async move {
            let rows = c
                .query(
                    "UPDATE leases SET expires_at = clock_timestamp() + $2::float8 * interval '1 millisecond'
                     WHERE holder = $1 RETURNING persona, epoch",
                    &[&host, &ms],
                )
                .await?;
            let mut out: Vec<(String, i64)> =
                rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            out.sort();
            Ok(out)
        })
    }

    pub(crate) fn acquire(
        &self,
        host: &str,
        persona: &str,
        ttl: Duration,
    ) -> Result<Option<i64>, StoreError> {
        let (host, persona) = (host.to_string(), persona.to_string());
        let ms = ttl.as_millis() as f64;
        let epoch = self.read(move |c| async move {
            let row = c
                .query_opt(
                    "INSERT INTO leases (persona, holder, epoch, expires_at)
                     VALUES ($1, $2, 1, clock_timestamp() + $3::float8 * interval '1 millisecond')
                     ON CONFLICT (persona) DO UPDATE
                     SET holder = excluded.holder, epoch = leases.epoch + 1,
                         expires_at = excluded.expires_at, acquired_at = clock_timestamp()
                     WHERE leases.expires_at < clock_timestamp() OR leases.holder = ''
                     RETURNING epoch",
                    &[&persona, &host, &ms],
                )
                .await?;
            Ok(row.map(|r| r.get::<_, i64>(0)))
        })?;
        if epoch.is_some() {
            // New rows of this persona must sort after its previous holder's.
            self.fresh_id_block()?;
        }
        Ok(epoch)
    }

    pub(crate) fn release(&self, host: &str, persona: &str, epoch: i64) -> Result<(), StoreError> {
        let (host, persona) = (host.to_string(), persona.to_string());
        self.read(move |c| async move {
            c.execute(
                "UPDATE leases SET holder = '', expires_at = clock_timestamp()
                 WHERE persona = $1 AND holder = $2 AND epoch = $3",
                &[&persona, &host, &epoch],
            )
            .await
            .map(drop)
        })
    }

    pub(crate) fn leases(&self) -> Result<Vec<LeaseRow>, StoreError> {
        self.read(|c| async move {
            let rows = c
                .query(
                    "SELECT persona, holder, epoch,
                            (EXTRACT(EPOCH FROM (expires_at - clock_timestamp())) * 1000)::bigint
                     FROM leases ORDER BY persona",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| LeaseRow {
                    persona: r.get(0),
                    holder: r.get(1),
                    epoch: r.get(2),
                    expires_in_ms: r.get(3),
                })
                .collect())
        })
    }

    // ---- credentials ---------------------------------------------------------------

    pub(crate) fn credentials(
        &self,
        server: &str,
        persona: &str,
    ) -> Result<Option<StoredCredentials>, StoreError> {
        let (server, persona) = (server.to_string(), persona.to_string());
        self.read(move |c| async move {
            let row = c
                .query_opt(
                    "SELECT name, key FROM credentials WHERE server = $1 AND persona = $2",
                    &[&server, &persona],
                )
                .await?;
            Ok(row.map(|r| StoredCredentials {
                name: r.get(0),
                key: ApiKey::new(r.get::<_, String>(1)),
            }))
        })
    }

    pub(crate) fn save_credentials(
        &self,
        server: &str,
        persona: &str,
        name: &str,
        key: &ApiKey,
    ) -> Result<(), StoreError> {
        self.write_store(Write::Credentials {
            server: server.into(),
            persona: persona.into(),
            name: name.into(),
            key: key.expose().to_string(),
        })
        .map(drop)
    }

    pub(crate) fn identities_on(&self, server: &str) -> Result<Vec<(String, String)>, StoreError> {
        let server = server.to_string();
        self.read(move |c| async move {
            let rows = c
                .query(
                    "SELECT persona, name FROM credentials WHERE server = $1",
                    &[&server],
                )
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    pub(crate) fn adopt_legacy_identity(
        &self,
        server: &str,
        name: &str,
        label: &str,
    ) -> Result<bool, StoreError> {
        self.write_store(Write::Adopt {
            server: server.into(),
            name: name.into(),
            label: label.into(),
        })
        .map(|n| n > 0)
    }

    pub(crate) fn delete_credentials(&self, server: &str, persona: &str) -> Result<(), StoreError> {
        self.write_store(Write::DeleteCredentials {
            server: server.into(),
            persona: persona.into(),
        })
        .map(drop)
    }

    pub(crate) fn record_registration(
        &self,
        server: &str,
        persona: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        self.write_store(Write::Registration {
            server: server.into(),
            persona: persona.into(),
            at,
        })
        .map(drop)
    }

    pub(crate) fn registrations_since(
        &self,
        server: &str,
        persona: &str,
        since: i64,
    ) -> Result<u64, StoreError> {
        let (server, persona) = (server.to_string(), persona.to_string());
        self.read(move |c| async move {
            let row = c
                .query_one(
                    "SELECT COUNT(*) FROM registrations
                     WHERE server = $1 AND persona = $2 AND at >= $3",
                    &[&server, &persona, &since],
                )
                .await?;
            Ok(row.get::<_, i64>(0).max(0) as u64)
        })
    }

    // ---- recovery positions --------------------------------------------------------

    pub(crate) fn room_positions(&self, bot: &str) -> Result<Vec<RoomPosition>, StoreError> {
        let bot = bot.to_string();
        self.read(move |c| async move {
            let rows = c
                .query(
                    "SELECT room, last_ts, live_from, live_until FROM room_positions
                     WHERE bot = $1",
                    &[&bot],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| super::position_from_row(r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect())
        })
    }

    pub(crate) fn save_room_positions(
        &self,
        bot: &str,
        positions: Vec<RoomPosition>,
        fence: Option<FenceToken>,
    ) {
        self.submit(
            Write::Positions {
                bot: bot.into(),
                positions,
                fence,
            },
            |r| {
                if let Err(e) = r {
                    tracing::error!(error = %e, "cannot save recovery positions");
                }
            },
        );
    }

    pub(crate) fn forget_room_position(&self, bot: &str, room: &str, fence: Option<FenceToken>) {
        self.submit(
            Write::ForgetPosition {
                bot: bot.into(),
                room: room.into(),
                fence,
            },
            |_| {},
        );
    }

    // ---- outbox --------------------------------------------------------------------

    /// Takes a new block of outbox ids.
    fn fresh_id_block(&self) -> Result<(), StoreError> {
        let block = self.read(|c| async move {
            let row = c.query_one("SELECT nextval('outbox_blocks')", &[]).await?;
            Ok(row.get::<_, i64>(0))
        })?;
        let start = block.saturating_mul(ID_BLOCK);
        *self.inner.ids.lock().unwrap_or_else(|p| p.into_inner()) = (start, start + ID_BLOCK);
        Ok(())
    }

    fn next_id(&self) -> Result<i64, StoreError> {
        {
            let mut ids = self.inner.ids.lock().unwrap_or_else(|p| p.into_inner());
            if ids.0 < ids.1 {
                ids.0 += 1;
                return Ok(ids.0 - 1);
            }
        }
        self.fresh_id_block()?;
        self.next_id()
    }

    pub(crate) fn outbox_enqueue(
        &self,
        row: NewRow<'_>,
        fence: Result<Option<FenceToken>, StoreError>,
        durable: impl FnOnce(OutboxId, Result<(), StoreError>) + Send + 'static,
    ) -> OutboxId {
        let NewRow {
            bot,
            room,
            text,
            created_at,
            positions,
            handed,
        } = row;
        let id = match self.next_id() {
            Ok(id) => id,
            Err(e) => {
                durable(OutboxId(0), Err(e));
                return OutboxId(0);
            }
        };
        let fence = match fence {
            Ok(f) => f,
            Err(e) => {
                durable(OutboxId(id), Err(e));
                return OutboxId(id);
            }
        };
        self.submit(
            Write::OutboxInsert {
                id,
                bot: bot.into(),
                room: room.into(),
                text: text.into(),
                created_at,
                handed,
                positions,
                fence,
            },
            move |r| durable(OutboxId(id), r.map(drop).map_err(store_only)),
        );
        OutboxId(id)
    }

    pub(crate) fn outbox_pending(&self, bot: &str) -> Result<Vec<OutboxEntry>, StoreError> {
        let bot = bot.to_string();
        let location = self.location();
        let rows = self.read(move |c| async move {
            c.query(
                "SELECT id, bot, room, text, created_at, state, attempts, sent_at
                 FROM outbox WHERE bot = $1 AND state IN ('pending', 'sent') ORDER BY id",
                &[&bot],
            )
            .await
        })?;
        rows.iter().map(|r| entry(&location, r)).collect()
    }

    pub(crate) fn outbox_get(&self, id: OutboxId) -> Result<Option<OutboxEntry>, StoreError> {
        let location = self.location();
        let row = self.read(move |c| async move {
            c.query_opt(
                "SELECT id, bot, room, text, created_at, state, attempts, sent_at
                 FROM outbox WHERE id = $1",
                &[&id.0],
            )
            .await
        })?;
        row.map(|r| entry(&location, &r)).transpose()
    }

    pub(crate) fn outbox_mark_sent(&self, id: OutboxId, sent_at: i64) {
        self.submit(Write::MarkSent { id: id.0, sent_at }, move |r| {
            if let Err(e) = r {
                tracing::error!(%id, error = %e, "cannot record an outbox send");
            }
        });
    }

    pub(crate) fn outbox_finish(&self, id: OutboxId, state: OutboxState) {
        self.submit(
            Write::Finish {
                id: id.0,
                state: state.as_str(),
            },
            move |r| {
                if let Err(e) = r {
                    tracing::error!(%id, error = %e, "cannot finish an outbox entry");
                }
            },
        );
    }

    pub(crate) fn outbox_prune(&self, before: i64) -> Result<usize, StoreError> {
        self.write_store(Write::Prune { before })
            .map(|n| n as usize)
    }

    pub(crate) async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Write::Nothing, move |_| {
            let _ = tx.send(());
        });
        let _ = rx.await;
    }

    pub(crate) fn commit_stats(&self) -> CommitStats {
        CommitStats {
            batches: self.inner.shared.batches.load(Ordering::Relaxed),
            writes: self.inner.shared.writes.load(Ordering::Relaxed),
        }
    }

    // ---- kv ------------------------------------------------------------------------

    pub(crate) fn kv_get(&self, persona: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let (persona, key) = (persona.to_string(), key.to_string());
        self.read(move |c| async move {
            let row = c
                .query_opt(
                    "SELECT value FROM kv WHERE persona = $1 AND key = $2",
                    &[&persona, &key],
                )
                .await?;
            Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
        })
    }

    pub(crate) fn kv_set(
        &self,
        persona: &str,
        key: &str,
        value: &[u8],
        quota: KvQuota,
        fence: Option<FenceToken>,
    ) -> Result<(), KvSetError> {
        self.write_wait(Write::KvSet {
            persona: persona.into(),
            key: key.into(),
            value: value.to_vec(),
            quota,
            fence,
        })
        .map(drop)
    }

    pub(crate) fn kv_delete(
        &self,
        persona: &str,
        key: &str,
        fence: Option<FenceToken>,
    ) -> Result<bool, StoreError> {
        self.write_store(Write::KvDelete {
            persona: persona.into(),
            key: key.into(),
            fence,
        })
        .map(|n| n > 0)
    }

    pub(crate) fn kv_list(&self, persona: &str, prefix: &str) -> Result<Vec<String>, StoreError> {
        let (persona, prefix) = (persona.to_string(), prefix.to_string());
        self.read(move |c| async move {
            let rows = c
                .query(
                    "SELECT key FROM kv WHERE persona = $1 AND key >= $2 ORDER BY key",
                    &[&persona, &prefix],
                )
                .await?;
            let mut keys = Vec::new();
            for r in rows {
                let key: String = r.get(0);
                if !key.starts_with(&prefix) {
                    break;
                }
                keys.push(key);
            }
            Ok(keys)
        })
    }

    pub(crate) fn kv_usage(&self, persona: &str) -> Result<u64, StoreError> {
        let persona = persona.to_string();
        self.read(move |c| async move {
            let row = c
                .query_opt("SELECT bytes FROM kv_usage WHERE persona = $1", &[&persona])
                .await?;
            Ok(row.map_or(0, |r| r.get::<_, i64>(0).max(0) as u64))
        })
    }

    // ---- LLM token budgets ---------------------------------------------------------

    pub(crate) fn llm_budget_load(
        &self,
        persona: &str,
        since_ms: i64,
    ) -> Result<Vec<(i64, u64)>, StoreError> {
        let persona = persona.to_string();
        self.read(move |c| async move {
            let rows = c
                .query(
                    "SELECT bucket_ms, tokens FROM llm_budget
                     WHERE persona = $1 AND bucket_ms >= $2 ORDER BY bucket_ms",
                    &[&persona, &since_ms],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1).max(0) as u64))
                .collect())
        })
    }

    pub(crate) fn llm_budget_save(
        &self,
        persona: &str,
        bucket_ms: i64,
        tokens: u64,
        forget_before_ms: i64,
        fence: Option<FenceToken>,
    ) -> Result<(), StoreError> {
        self.write_store(Write::BudgetSave {
            persona: persona.into(),
            bucket_ms,
            tokens: tokens.min(i64::MAX as u64) as i64,
            forget_before_ms,
            fence,
        })
        .map(drop)
    }
}

fn store_only(e: KvSetError) -> StoreError {
    match e {
        KvSetError::Store(e) => e,
        other => StoreError::Postgres {
            location: String::new(),
            detail: other.to_string(),
        },
    }
}

fn entry(location: &str, r: &tokio_postgres::Row) -> Result<OutboxEntry, StoreError> {
    let state: String = r.get(5);
    let parsed = OutboxState::parse(&state).ok_or_else(|| StoreError::Invalid {
        path: location.into(),
        what: "outbox.state",
        value: state.clone(),
    })?;
    Ok(OutboxEntry {
        id: OutboxId(r.get(0)),
        bot: r.get(1),
        room: r.get(2),
        text: r.get(3),
        created_at: r.get(4),
        state: parsed,
        attempts: u32::try_from(r.get::<_, i32>(6)).unwrap_or(0),
        sent_at: r.get(7),
    })
}

/// A new connection (its driver task spawned), in the configured schema.
async fn connect(shared: &Shared) -> Result<Client, StoreError> {
    let (client, connection) = shared
        .config
        .connect(NoTls)
        .await
        .map_err(|e| pg_err(&shared.location, &e))?;
    let location = shared.location.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(store = %location, error = %e, "state database connection lost");
        }
    });
    if let Some(schema) = &shared.schema {
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS \"{schema}\"; SET search_path TO \"{schema}\""
            ))
            .await
            .map_err(|e| pg_err(&shared.location, &e))?;
    }
    Ok(client)
}

/// The shared read connection, re-established if it was lost.
async fn reader(shared: &Shared) -> Result<Arc<Client>, StoreError> {
    let mut slot = shared.reader.lock().await;
    if let Some(c) = slot.as_ref()
        && !c.is_closed()
    {
        return Ok(c.clone());
    }
    let client = Arc::new(connect(shared).await?);
    *slot = Some(client.clone());
    Ok(client)
}

async fn migrate(shared: &Shared) -> Result<(), StoreError> {
    let mut client = connect(shared).await?;
    let e = |e: tokio_postgres::Error| pg_err(&shared.location, &e);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(e)?;
    let result = async {
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS roost_schema (version BIGINT NOT NULL)")
            .await
            .map_err(e)?;
        let version: i64 = client
            .query_one("SELECT COALESCE(MAX(version), 0) FROM roost_schema", &[])
            .await
            .map_err(e)?
            .get(0);
        if version > PG_SCHEMA_VERSION {
            return Err(StoreError::PgTooNew {
                location: shared.location.clone(),
                found: version,
                supported: PG_SCHEMA_VERSION,
            });
        }
        for (from, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            let to = from as i64 + 1;
            let tx = client.transaction().await.map_err(e)?;
            tx.batch_execute(sql).await.map_err(e)?;
            tx.execute("DELETE FROM roost_schema", &[])
                .await
                .map_err(e)?;
            tx.execute("INSERT INTO roost_schema (version) VALUES ($1)", &[&to])
                .await
                .map_err(e)?;
            tx.commit().await.map_err(e)?;
            tracing::info!(store = %shared.location, to, "state database migrated");
        }
        Ok(())
    }
    .await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

/// Brings a fresh `schema` of the server at `url` to schema `version` only, then runs
/// `then` (SQL) in it: a database as an older build left it.
#[cfg(test)]
pub(crate) fn migrate_to_for_test(url: &str, schema: &str, version: usize, then: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, connection) = url
            .parse::<tokio_postgres::Config>()
            .unwrap()
            .connect(NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "CREATE SCHEMA \"{schema}\"; SET search_path TO \"{schema}\";
                 CREATE TABLE roost_schema (version BIGINT NOT NULL);
                 INSERT INTO roost_schema (version) VALUES ({version});"
            ))
            .await
            .unwrap();
        for sql in &MIGRATIONS[..version] {
            client.batch_execute(sql).await.unwrap();
        }
        client.batch_execute(then).await.unwrap();
    });
}

/// The writer: group commits in queue order until every handle is gone.
async fn writer(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut conn: Option<(Client, Stmts)> = None;
    let mut backoff = Duration::from_millis(100);
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        if conn.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            match connect(&shared).await {
                Ok(c) => {
                    conn = Some((c, Stmts::default()));
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::error!(store = %shared.location, error = %e, writes = jobs.len(), "group commit failed: no connection");
                    for job in jobs {
                        (job.done)(Err(KvSetError::Store(StoreError::Postgres {
                            location: shared.location.clone(),
                            detail: e.to_string(),
                        })));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
        }
        let Some((client, stmts)) = conn.as_mut() else {
            continue;
        };
        let n = jobs.len() as u64;
        let writes: Vec<&Write> = jobs.iter().map(|j| &j.write).collect();
        let outcome = batch(client, stmts, &writes).await;
        drop(writes);
        match outcome {
            Ok(outcomes) => {
                shared.batches.fetch_add(1, Ordering::Relaxed);
                shared.writes.fetch_add(n, Ordering::Relaxed);
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    (job.done)(outcome);
                }
            }
            Err(e) => {
                tracing::warn!(store = %shared.location, error = %e, writes = n, "group commit failed; retrying write by write");
                *stmts = Stmts::default();
                for job in jobs {
                    let outcome = match batch(client, stmts, &[&job.write]).await {
                        Ok(mut o) => o.pop().unwrap_or(Ok(0)),
                        Err(e) => Err(KvSetError::Store(pg_err(&shared.location, &e))),
                    };
                    (job.done)(outcome);
                }
            }
        }
    }
}

/// Prepared statements of the writer connection, by their text.
#[derive(Default)]
struct Stmts(HashMap<&'static str, Statement>);

impl Stmts {
    async fn get(
        &mut self,
        tx: &Transaction<'_>,
        sql: &'static str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.0.get(sql) {
            return Ok(s.clone());
        }
        let s = tx.prepare(sql).await?;
        self.0.insert(sql, s.clone());
        Ok(s)
    }
    /// Runs `sql` (prepared once per connection) in `tx`; the rows it touched.
    async fn execute(
        &mut self,
        tx: &Transaction<'_>,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        let st = self.get(tx, sql).await?;
        tx.execute(&st, params).await
    }

    /// The one row `sql` (prepared once per connection) returns in `tx`.
    async fn query_one(
        &mut self,
        tx: &Transaction<'_>,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, tokio_postgres::Error> {
        let st = self.get(tx, sql).await?;
        tx.query_one(&st, params).await
    }

    /// The row, if any, `sql` (prepared once per connection) returns in `tx`.
    async fn query_opt(
        &mut self,
        tx: &Transaction<'_>,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        let st = self.get(tx, sql).await?;
        tx.query_opt(&st, params).await
    }
}

/// Moves the recovery positions of `bot` forward (never back; a live run is the one
/// saved with the newest position); the rows touched.
async fn save_positions(
    tx: &Transaction<'_>,
    stmts: &mut Stmts,
    bot: &String,
    positions: &[RoomPosition],
) -> Result<u64, tokio_postgres::Error> {
    let st = stmts
        .get(
            tx,
            "INSERT INTO room_positions (bot, room, last_ts, live_from, live_until)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (bot, room) DO UPDATE
             SET live_from = CASE WHEN excluded.last_ts >= room_positions.last_ts
                                  THEN excluded.live_from ELSE room_positions.live_from END,
                 live_until = CASE WHEN excluded.last_ts >= room_positions.last_ts
                                   THEN excluded.live_until ELSE room_positions.live_until END,
                 last_ts = GREATEST(room_positions.last_ts, excluded.last_ts)",
        )
        .await?;
    let mut n = 0;
    for p in positions {
        let (ts, from, until) = super::position_columns(p.last_ts, p.live);
        n += tx.execute(&st, &[bot, &p.room, &ts, &from, &until]).await?;
    }
    Ok(n)
}

/// Runs `writes` in one transaction: the outer error is a database error (nothing
/// committed), the inner results are each write's own outcome.
async fn batch(
    client: &mut Client,
    stmts: &mut Stmts,
    writes: &[&Write],
) -> Result<Vec<Result<u64, KvSetError>>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let mut out = Vec::with_capacity(writes.len());
    for write in writes {
        out.push(apply(&tx, stmts, write).await?);
    }
    tx.commit().await?;
    Ok(out)
}

/// Whether `fence` still holds: the lease row is read `FOR SHARE`, so a takeover
/// waits for this transaction.
async fn holds(
    tx: &Transaction<'_>,
    stmts: &mut Stmts,
    fence: &Option<FenceToken>,
) -> Result<bool, tokio_postgres::Error> {
    let Some(f) = fence else {
        return Ok(true);
    };
    Ok(stmts
        .query_opt(
            tx,
            "SELECT 1 FROM leases WHERE persona = $1 AND holder = $2 AND epoch = $3 FOR SHARE",
            &[&f.persona, &f.host, &f.epoch],
        )
        .await?
        .is_some())
}

fn fenced(fence: &Option<FenceToken>) -> Result<u64, KvSetError> {
    let persona = fence
        .as_ref()
        .map(|f| f.persona.clone())
        .unwrap_or_default();
    Err(KvSetError::Store(StoreError::Fenced { persona }))
}

async fn apply(
    tx: &Transaction<'_>,
    stmts: &mut Stmts,
    write: &Write,
) -> Result<Result<u64, KvSetError>, tokio_postgres::Error> {
    Ok(match write {
        Write::Nothing => Ok(0),
        Write::OutboxInsert {
            id,
            bot,
            room,
            text,
            created_at,
            handed,
            positions,
            fence,
        } => {
            if !holds(tx, stmts, fence).await? {
                return Ok(fenced(fence));
            }
            let epoch = fence.as_ref().map(|f| f.epoch);
            let (state, attempts, sent_at) = if *handed {
                ("sent", 1i32, Some(*created_at))
            } else {
                ("pending", 0i32, None)
            };
            let n = stmts
                .execute(
                    tx,
                    "INSERT INTO outbox (id, bot, room, text, created_at, state, attempts, sent_at, epoch)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    &[id, bot, room, text, created_at, &state, &attempts, &sent_at, &epoch],
                )
                .await?;
            save_positions(tx, stmts, bot, positions).await?;
            Ok(n)
        }
        Write::MarkSent { id, sent_at } => {
            Ok(stmts
                .execute(
                    tx,
                    "UPDATE outbox SET state = 'sent', attempts = attempts + 1, sent_at = $2
                     WHERE id = $1 AND state IN ('pending', 'sent')",
                    &[id, sent_at],
                )
                .await?)
        }
        Write::Finish { id, state } => {
            Ok(stmts
                .execute(
                    tx,
                    "UPDATE outbox SET state = $2 WHERE id = $1",
                    &[id, state],
                )
                .await?)
        }
        Write::Positions {
            bot,
            positions,
            fence,
        } => {
            if !holds(tx, stmts, fence).await? {
                return Ok(fenced(fence));
            }
            Ok(save_positions(tx, stmts, bot, positions).await?)
        }
        Write::ForgetPosition { bot, room, fence } => {
            if !holds(tx, stmts, fence).await? {
                return Ok(fenced(fence));
            }
            Ok(stmts
                .execute(
                    tx,
                    "DELETE FROM room_positions WHERE bot = $1 AND room = $2",
                    &[bot, room],
                )
                .await?)
        }
        Write::Credentials {
            server,
            persona,
            name,
            key,
        } => {
            Ok(stmts
                .execute(
                    tx,
                    "INSERT INTO credentials (server, persona, name, key, created_at)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (server, persona) DO UPDATE
                     SET name = excluded.name, key = excluded.key, created_at = excluded.created_at",
                    &[server, persona, name, key, &super::now_ms()],
                )
                .await?)
        }
        Write::DeleteCredentials { server, persona } => {
            Ok(stmts
                .execute(
                    tx,
                    "DELETE FROM credentials WHERE server = $1 AND persona = $2",
                    &[server, persona],
                )
                .await?)
        }
        Write::Registration {
            server,
            persona,
            at,
        } => {
            stmts
                .execute(
                    tx,
                    "INSERT INTO registrations (server, persona, at) VALUES ($1, $2, $3)",
                    &[server, persona, at],
                )
                .await?;
            stmts
                .execute(
                    tx,
                    "DELETE FROM registrations WHERE at < $1",
                    &[&(at - 7 * 86_400_000)],
                )
                .await?;
            Ok(1)
        }
        Write::Adopt {
            server,
            name,
            label,
        } => {
            let has_own = tx
                .query_one(
                    "SELECT COUNT(*) FROM credentials WHERE server = $1 AND persona = $2",
                    &[server, label],
                )
                .await?
                .get::<_, i64>(0)
                > 0;
            if has_own {
                return Ok(Ok(0));
            }
            let moved = tx
                .execute(
                    "UPDATE credentials SET persona = $3 WHERE server = $1 AND persona = $2",
                    &[server, name, label],
                )
                .await?;
            if moved > 0 {
                tx.execute("UPDATE outbox SET bot = $2 WHERE bot = $1", &[name, label])
                    .await?;
                tx.execute(
                    "UPDATE room_positions SET bot = $2 WHERE bot = $1
                     AND NOT EXISTS (SELECT 1 FROM room_positions p
                                     WHERE p.bot = $2 AND p.room = room_positions.room)",
                    &[name, label],
                )
                .await?;
            }
            Ok(moved)
        }
        Write::KvSet {
            persona,
            key,
            value,
            quota,
            fence,
        } => {
            if !holds(tx, stmts, fence).await? {
                return Ok(fenced(fence));
            }
            // The namespace's running size, its row locked so that writers of one
            // namespace (on any host) take turns, and the entry replaced: two
            // primary-key lookups.
            let used = stmts
                .query_one(
                    tx,
                    "INSERT INTO kv_usage (persona, bytes) VALUES ($1, 0)
                     ON CONFLICT (persona) DO UPDATE SET bytes = kv_usage.bytes
                     RETURNING bytes",
                    &[persona],
                )
                .await?
                .get::<_, i64>(0)
                .max(0) as u64;
            let replaced = stmts
                .query_opt(
                    tx,
                    "SELECT (octet_length(key) + octet_length(value))::bigint
                     FROM kv WHERE persona = $1 AND key = $2",
                    &[persona, key],
                )
                .await?
                .map_or(0, |r| r.get::<_, i64>(0).max(0) as u64)
                .min(used);
            let would_use = used - replaced + key.len() as u64 + value.len() as u64;
            if would_use > quota.total_bytes {
                return Ok(Err(KvSetError::QuotaExceeded {
                    used,
                    would_use,
                    quota: quota.total_bytes,
                }));
            }
            let n = stmts
                .execute(
                    tx,
                    "INSERT INTO kv (persona, key, value) VALUES ($1, $2, $3)
                     ON CONFLICT (persona, key) DO UPDATE SET value = excluded.value",
                    &[persona, key, value],
                )
                .await?;
            stmts
                .execute(
                    tx,
                    "UPDATE kv_usage SET bytes = $2 WHERE persona = $1",
                    &[persona, &(would_use as i64)],
                )
                .await?;
            Ok(n)
        }
        Write::KvDelete {
            persona,
            key,
            fence,
        } => {
            if !holds(tx, stmts, fence).await? {
                return Ok(fenced(fence));
            }
            let Some(freed) = stmts
                .query_opt(
                    tx,
                    "DELETE FROM kv WHERE persona = $1 AND key = $2
                     RETURNING (octet_length(key) + octet_length(value))::bigint",
                    &[persona, key],
                )
                .await?
            else {
                return Ok(Ok(0));
            };
            stmts
                .execute(
                    tx,
                    "UPDATE kv_usage SET bytes = GREATEST(bytes - $2, 0) WHERE persona = $1",
                    &[persona, &freed.get::<_, i64>(0)],
                )
                .await?;
            Ok(1)
        }
        Write::BudgetSave {
            persona,
            bucket_ms,
            tokens,
            forget_before_ms,
            fence,
        } => {
            if !holds(tx, stmts, fence).await? {
                return Ok(fenced(fence));
            }
            if *tokens == 0 {
                stmts
                    .execute(
                        tx,
                        "DELETE FROM llm_budget WHERE persona = $1 AND bucket_ms = $2",
                        &[persona, bucket_ms],
                    )
                    .await?;
            } else {
                stmts
                    .execute(
                        tx,
                        "INSERT INTO llm_budget (persona, bucket_ms, tokens) VALUES ($1, $2, $3)
                         ON CONFLICT (persona, bucket_ms) DO UPDATE SET tokens = excluded.tokens",
                        &[persona, bucket_ms, tokens],
                    )
                    .await?;
            }
            stmts
                .execute(
                    tx,
                    "DELETE FROM llm_budget WHERE persona = $1 AND bucket_ms < $2",
                    &[persona, forget_before_ms],
                )
                .await?;
            Ok(1)
        }
        Write::Prune { before } => {
            Ok(stmts
                .execute(
                    tx,
                    "DELETE FROM outbox WHERE state NOT IN ('pending', 'sent') AND created_at < $1",
                    &[before],
                )
                .await?)
        }
    })
}
