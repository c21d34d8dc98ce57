//! Soak test of the chat session: two bots talk through the local chat server while the
//! server forcibly drops every connection, again and again.
//!
//! Each bot sends numbered messages (`A#0`, `A#1`, … / `B#0`, …) through its session
//! handle at a steady rate. Between drops the soak waits until both bots are active again
//! and lets them talk for `--dwell-ms`. At the end it waits for both outboxes to drain and
//! prints one JSON object on stdout:
//!
//! ```json
//! {"drops":100,"forced_disconnects":200,"sent":1234,"received":1234,"lost":0,"duplicated":0,
//!  "rejoin_ms":{"p50":..,"p99":..,"max":..,"samples":200},"active_ms":{...},...}
//! ```
//!
//! `lost`: messages a bot sent that the other bot never received. `duplicated`: extra
//! copies of any numbered message received by either bot (own echoes included).
//! `rejoin_ms`: from the server accepting again (the drop itself, or the end of the
//! `--outage-ms` refusal) to the bot's rooms being joined on the new connection;
//! `active_ms`: to missed messages recovered and the outbox flowing again.
//!
//! Exits 1 if anything was lost or duplicated, 2 on a setup failure.
//!
//! ```text
//! cargo run --release -p roost --example soak -- --drops 100
//! ```

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use roost::devserver::{self, ServerConfig};
use roost::session::{self, SessionConfig, SessionHandle, SessionState, StateSnapshot};
use roost::store::Store;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

const ROOM: &str = "soak";

#[derive(Parser, Debug)]
#[command(about = "Two bots talking through the local chat server while it drops every connection")]
struct Args {
    /// Forced disconnects (every live connection dropped at once).
    #[arg(long, default_value_t = 100)]
    drops: u32,
    /// How long the bots talk between drops once both are active again (a connection
    /// that lasted half of this counts as healthy: the backoff starts over).
    #[arg(long, default_value_t = 250)]
    dwell_ms: u64,
    /// After each drop, refuse WebSocket upgrades for this long (0: accept at once).
    #[arg(long, default_value_t = 0)]
    outage_ms: u64,
    /// Each bot sends a message this often.
    #[arg(long, default_value_t = 100)]
    send_every_ms: u64,
    /// Give up waiting for a reconnect after this long (counts as a failure).
    #[arg(long, default_value_t = 60)]
    reconnect_timeout_s: u64,
    /// Seed for the sessions' jitter.
    #[arg(long)]
    seed: Option<u64>,
}

/// One bot: its handle, what it sent, what it received, and when it came back.
struct Bot {
    label: &'static str,
    handle: SessionHandle,
    sent: Arc<AtomicU64>,
    received: Arc<Mutex<HashMap<String, u32>>>,
    /// (time, snapshot) of every state change observed.
    changes: Arc<Mutex<Vec<(Instant, StateSnapshot)>>>,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(mut samples: Vec<f64>) -> serde_json::Value {
    samples.sort_by(f64::total_cmp);
    let round = |v: f64| (v * 10.0).round() / 10.0;
    json!({
        "p50": round(percentile(&samples, 0.50)),
        "p99": round(percentile(&samples, 0.99)),
        "max": round(samples.last().copied().unwrap_or(0.0)),
        "samples": samples.len(),
    })
}

async fn wait_active(handle: &SessionHandle, connections: u64, limit: Duration) -> bool {
    let mut rx = handle.watch();
    tokio::time::timeout(
        limit,
        rx.wait_for(|s| s.state == SessionState::Active && s.connections >= connections),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

fn spawn_bot(
    label: &'static str,
    server: &str,
    store: &Store,
    seed: Option<u64>,
    dwell: Duration,
) -> anyhow::Result<(Bot, session::Events)> {
    // Connections here live for well under the default 30 s; count one that survived half
    // a dwell as healthy so every drop starts from the first backoff step, as a drop every
    // few minutes would in production (otherwise the backoff climbs to its 30 s cap).
    let cfg = SessionConfig {
        server: server.to_string(),
        name: format!("soak-{label}"),
        description: "soak test bot".into(),
        rooms: vec![ROOM.into()],
        healthy_after: (dwell / 2).max(Duration::from_millis(1)),
        rng_seed: seed.map(|s| s ^ u64::from(label.as_bytes()[0])),
        ..SessionConfig::default()
    };
    let (handle, rx) = session::spawn(cfg, store.clone()).context("spawning a session")?;
    let changes = Arc::new(Mutex::new(Vec::new()));
    let mut watch: watch::Receiver<StateSnapshot> = handle.watch();
    let log = changes.clone();
    tokio::spawn(async move {
        loop {
            let snap = *watch.borrow_and_update();
            log.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((Instant::now(), snap));
            if snap.state == SessionState::Stopped || watch.changed().await.is_err() {
                return;
            }
        }
    });
    Ok((
        Bot {
            label,
            handle,
            sent: Arc::new(AtomicU64::new(0)),
            received: Arc::new(Mutex::new(HashMap::new())),
            changes,
        },
        rx,
    ))
}

fn spawn_receiver(bot: &Bot, mut rx: session::Events) {
    let received = bot.received.clone();
    tokio::spawn(async move {
        while let Some(msg) = rx.recv_message().await {
            if msg.room == ROOM && (msg.text.starts_with("A#") || msg.text.starts_with("B#")) {
                *received
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(msg.text)
                    .or_insert(0) += 1;
            }
        }
    });
}

fn spawn_sender(bot: &Bot, every: Duration, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let (handle, sent, label) = (bot.handle.clone(), bot.sent.clone(), bot.label);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            match handle.send(ROOM, &format!("{label}#{n}")) {
                Ok(_) => {
                    sent.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
                Err(e) => eprintln!("soak: bot {label} cannot send: {e}"),
            }
        }
    })
}

/// Milliseconds from `t0` to the first observed snapshot of connection `conn` matching
/// `pred`.
fn time_to(bot: &Bot, t0: Instant, conn: u64, pred: impl Fn(SessionState) -> bool) -> Option<f64> {
    bot.changes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|(at, s)| *at >= t0 && s.connections >= conn && pred(s.state))
        .map(|(at, _)| at.duration_since(t0).as_secs_f64() * 1000.0)
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let started = Instant::now();
    let server = devserver::spawn("127.0.0.1:0".parse()?, ServerConfig::default())
        .await
        .context("starting the local chat server")?;
    let faults = server.faults();
    let dir = tempfile_dir()?;
    let store = Store::open(&dir)?;
    let dwell = Duration::from_millis(args.dwell_ms);
    let (a, a_rx) = spawn_bot("A", &server.base_url(), &store, args.seed, dwell)?;
    let (b, b_rx) = spawn_bot("B", &server.base_url(), &store, args.seed, dwell)?;
    spawn_receiver(&a, a_rx);
    spawn_receiver(&b, b_rx);
    let limit = Duration::from_secs(args.reconnect_timeout_s);
    for bot in [&a, &b] {
        anyhow::ensure!(
            wait_active(&bot.handle, 1, limit).await,
            "bot {} never connected: {:?}",
            bot.label,
            bot.handle.status()
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    let every = Duration::from_millis(args.send_every_ms.max(1));
    let senders = [
        spawn_sender(&a, every, stop.clone()),
        spawn_sender(&b, every, stop.clone()),
    ];

    let mut forced = 0usize;
    let mut marks: Vec<(usize, Instant, u64)> = Vec::new();
    let mut failures = Vec::new();
    for drop_no in 0..args.drops {
        tokio::time::sleep(dwell).await;
        let before = [&a, &b].map(|bot| bot.handle.watch().borrow().connections);
        if args.outage_ms > 0 {
            faults.reject_upgrades(Duration::from_secs(3600));
        }
        forced += faults.drop_connections();
        let t0 = if args.outage_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.outage_ms)).await;
            faults.accept_upgrades();
            Instant::now()
        } else {
            Instant::now()
        };
        for (i, (bot, before)) in [&a, &b].into_iter().zip(before).enumerate() {
            let conn = before + 1;
            if !wait_active(&bot.handle, conn, limit).await {
                failures.push(format!(
                    "drop {drop_no}: bot {} not back within {limit:?}: {:?}",
                    bot.label,
                    bot.handle.status()
                ));
                continue;
            }
            marks.push((i, t0, conn));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        let _ = s.await;
    }

    // Drain: every outbox empty and every message seen by the other bot, or time out.
    let deadline = Instant::now() + Duration::from_secs(60);
    let complete = |from: &Bot, to: &Bot| {
        let got = to.received.lock().unwrap_or_else(|p| p.into_inner());
        (0..from.sent.load(Ordering::Relaxed))
            .all(|n| got.contains_key(&format!("{}#{n}", from.label)))
    };
    while Instant::now() < deadline
        && !(a.handle.status().outbox_depth == 0
            && b.handle.status().outbox_depth == 0
            && complete(&a, &b)
            && complete(&b, &a))
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A last look for late duplicates.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The watchers have seen every state change by now.
    let bots = [&a, &b];
    let joined = |s| matches!(s, SessionState::Joined | SessionState::Active);
    let rejoin: Vec<f64> = marks
        .iter()
        .filter_map(|&(i, t0, conn)| time_to(bots[i], t0, conn, joined))
        .collect();
    let active: Vec<f64> = marks
        .iter()
        .filter_map(|&(i, t0, conn)| time_to(bots[i], t0, conn, |s| s == SessionState::Active))
        .collect();

    let mut lost = 0u64;
    let mut duplicated = 0u64;
    let mut received = 0u64;
    let mut lost_examples = Vec::new();
    for (from, to) in [(&a, &b), (&b, &a)] {
        let got = to.received.lock().unwrap_or_else(|p| p.into_inner());
        for n in 0..from.sent.load(Ordering::Relaxed) {
            let text = format!("{}#{n}", from.label);
            match got.get(&text) {
                Some(_) => received += 1,
                None => {
                    lost += 1;
                    if lost_examples.len() < 10 {
                        lost_examples.push(format!("{text} (never reached {})", to.label));
                    }
                }
            }
        }
        duplicated += got
            .values()
            .map(|c| u64::from(c.saturating_sub(1)))
            .sum::<u64>();
    }
    let status = [&a, &b].map(|bot| bot.handle.status());
    for bot in [&a, &b] {
        bot.handle.shutdown().await;
    }
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);

    let sent = a.sent.load(Ordering::Relaxed) + b.sent.load(Ordering::Relaxed);
    let report = json!({
        "drops": args.drops,
        "forced_disconnects": forced,
        "outage_ms": args.outage_ms,
        "sent": sent,
        "received": received,
        "lost": lost,
        "duplicated": duplicated,
        "rejoin_ms": summary(rejoin),
        "active_ms": summary(active),
        "reconnects": status.iter().map(|s| s.reconnects).collect::<Vec<_>>(),
        "messages_out": status.iter().map(|s| s.messages_out).collect::<Vec<_>>(),
        "outbox_stale": status.iter().map(|s| s.outbox_stale).sum::<u64>(),
        "failures": failures,
        "lost_examples": lost_examples,
        "duration_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    });
    println!("{report}");
    Ok(lost == 0 && duplicated == 0 && report["failures"].as_array().is_some_and(Vec::is_empty))
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "roost-soak-{}-{}",
        std::process::id(),
        roost::store::now_ms()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("soak: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("soak: {e:#}");
            ExitCode::from(2)
        }
    }
}
