//! The outbox write path: the store's group commit against one transaction per row
//! (what roost did before), with `synchronous = NORMAL` and `FULL`, in one run.

use std::time::{Duration, Instant};

use roost::store::{Store, Synchronous};
use serde_json::{Value, json};

/// Rows written by each scenario.
const ROWS: usize = 4_000;
/// Concurrent writers in the pipelined scenario (like 64 replies in flight).
const WRITERS: usize = 64;

pub fn run(quick: bool) -> Value {
    let rows = if quick { ROWS / 4 } else { ROWS };
    let mut out = serde_json::Map::new();
    for (name, sync) in [("normal", Synchronous::Normal), ("full", Synchronous::Full)] {
        let baseline = one_transaction_per_row(sync, rows);
        let serial = group_commit_serial(sync, rows / 4);
        let pipelined = group_commit_pipelined(sync, rows);
        out.insert(
            name.to_string(),
            json!({
                "per_row_transactions": baseline,
                "group_commit_one_at_a_time": serial,
                "group_commit_64_writers": pipelined,
                "pipelined_speedup_vs_per_row": ratio(
                    pipelined["rows_per_s"].as_f64(),
                    baseline["rows_per_s"].as_f64()
                ),
            }),
        );
    }
    Value::Object(out)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Value {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => json!((a / b * 100.0).round() / 100.0),
        _ => Value::Null,
    }
}

fn pragma(sync: Synchronous) -> &'static str {
    match sync {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    }
}

/// The old path: an autocommitted INSERT per row on a WAL database.
fn one_transaction_per_row(sync: Synchronous, rows: usize) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let conn = rusqlite::Connection::open(dir.path().join("t.db")).expect("open");
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
        .expect("wal");
    conn.pragma_update(None, "synchronous", pragma(sync))
        .expect("sync");
    conn.execute_batch(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, bot TEXT, room TEXT,
         text TEXT, created_at INTEGER, state TEXT, attempts INTEGER)",
    )
    .expect("schema");
    let mut lat = Vec::with_capacity(rows);
    let started = Instant::now();
    for i in 0..rows {
        let t = Instant::now();
        conn.execute(
            "INSERT INTO outbox (bot, room, text, created_at, state, attempts)
             VALUES ('echo', 'lobby', ?1, ?2, 'pending', 0)",
            rusqlite::params![format!("reply number {i}"), i as i64],
        )
        .expect("insert");
        lat.push(t.elapsed());
    }
    summary(rows, started.elapsed(), &mut lat, None)
}

/// One writer: enqueue, wait until durable, repeat.
fn group_commit_serial(sync: Synchronous, rows: usize) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_with(dir.path(), sync).expect("store");
    let rt = runtime();
    rt.block_on(async {
        let mut lat = Vec::with_capacity(rows);
        let started = Instant::now();
        for i in 0..rows {
            let t = Instant::now();
            enqueue(&store, i).await;
            lat.push(t.elapsed());
        }
        summary(rows, started.elapsed(), &mut lat, Some(&store))
    })
}

/// 64 writers at once, each waiting for its own row before the next.
fn group_commit_pipelined(sync: Synchronous, rows: usize) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_with(dir.path(), sync).expect("store");
    let rt = runtime();
    rt.block_on(async {
        let per = rows / WRITERS;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for i in 0..per {
                    let t = Instant::now();
                    enqueue(&store, w * per + i).await;
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let mut lat = Vec::with_capacity(rows);
        for t in tasks {
            lat.extend(t.await.expect("writer"));
        }
        summary(per * WRITERS, started.elapsed(), &mut lat, Some(&store))
    })
}

async fn enqueue(store: &Store, i: usize) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    store.outbox_enqueue(
        "echo",
        "lobby",
        &format!("reply number {i}"),
        i as i64,
        move |_, r| {
            let _ = tx.send(r);
        },
    );
    rx.await.expect("answered").expect("committed");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn summary(rows: usize, took: Duration, lat: &mut [Duration], store: Option<&Store>) -> Value {
    lat.sort();
    let pct = |p: f64| {
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let mut v = json!({
        "rows": rows,
        "rows_per_s": (rows as f64 / took.as_secs_f64()).round(),
        "latency_us_p50": pct(0.5).round(),
        "latency_us_p99": pct(0.99).round(),
    });
    if let Some(store) = store {
        let stats = store.commit_stats();
        v["transactions"] = json!(stats.batches);
        v["rows_per_transaction"] =
            json!(((stats.writes as f64 / stats.batches.max(1) as f64) * 10.0).round() / 10.0);
    }
    v
}
