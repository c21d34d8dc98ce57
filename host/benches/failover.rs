//! Failover benchmark: several `roost run` hosts share echo personas through
//! PostgreSQL while a driver keeps mentioning the bots; again and again a random host
//! is killed with SIGKILL (and a fresh host started in its place). Prints ONE JSON
//! document on stdout, progress on stderr.
//!
//! ```text
//! ROOST_TEST_POSTGRES=postgres://postgres@127.0.0.1:55432/postgres \
//!   cargo bench -p roost --bench failover                      # 3 hosts, 20 personas, 20 kills
//! cargo bench -p roost --bench failover -- --kills 5 --hosts 2 --postgres URL
//! ```
//!
//! Setup: the local chat server runs in this process (`roost::devserver`) on a free
//! loopback port; the example persona `plugins/echo` is built with `roost build` (or
//! taken from `--echo FILE`) and copied as `p00.wasm` … into one plugins folder every
//! host reads (the shared-volume model); each host has a state folder of its own and
//! the same `[store] url`, in a schema of its own (`bench_<pid>_<random>`). Leases
//! use the defaults (renewed every 2 s, expiring after 8 s) unless `--renew-ms` /
//! `--ttl-ms` say otherwise.
//!
//! Traffic: every `--mention-every-ms` a mention `@pNN mTOKEN` to a random persona in
//! its room; echo answers `mTOKEN`. Persona `pNN` is in room `room-(NN mod --rooms)`:
//! the network keeps only the last few dozen messages of a room (the local server: 50,
//! one history page), so what a host missed can be recovered only if its room saw
//! fewer than that during the move; the defaults keep a room at about 2 messages a
//! second.
//!
//! Each kill: once every persona has a live lease and the split is even, a few seconds
//! of traffic, then SIGKILL to a random host. At that instant a probe mention goes to
//! every persona the host held; **time to active** of a persona is from the kill until
//! its answer to that probe (so it includes the lease running out, the lease taken,
//! the bot started on another host and the probe recovered and answered). A new host
//! then starts in the killed one's place, and the personas spread out again.
//!
//! Measured: `time_to_active_ms` (p50, p99, max over every moved persona of every
//! kill), `all_active_ms` (per kill: until the last moved persona answered), and over
//! the whole run `mentions` sent, `lost` (never answered once the run is over and a
//! grace period passed) and `duplicated` (extra answers to a mention, summed).
//! Exit code 0 when the JSON was printed, 2 on a setup failure.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use roost::devserver::{self, ServerConfig, ServerEvent, ServerState};
use roost::store::{PgOptions, Store};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::time::Instant;

const ROOST: &str = env!("CARGO_BIN_EXE_roost");

#[derive(Parser, Debug)]
#[command(about = "failover benchmark: kill hosts sharing personas through PostgreSQL")]
struct Args {
    /// PostgreSQL URL [default: $ROOST_TEST_POSTGRES].
    #[arg(long)]
    postgres: Option<String>,
    /// `roost run` processes.
    #[arg(long, default_value_t = 3)]
    hosts: usize,
    /// Echo personas shared by the hosts.
    #[arg(long, default_value_t = 20)]
    personas: usize,
    /// Hosts killed, one after the other.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Lease renewal period.
    #[arg(long, default_value_t = 2000)]
    renew_ms: u64,
    /// Lease lifetime past its last renewal.
    #[arg(long, default_value_t = 8000)]
    ttl_ms: u64,
    /// A mention to a random persona this often.
    #[arg(long, default_value_t = 250)]
    mention_every_ms: u64,
    /// Rooms the personas are spread over.
    #[arg(long, default_value_t = 5)]
    rooms: usize,
    /// Seed of the random choices.
    #[arg(long)]
    seed: Option<u64>,
    /// A built echo persona (skips `roost build plugins/echo`).
    #[arg(long)]
    echo: Option<PathBuf>,
    /// Keep the temporary folder (hosts' logs and state) and print its path.
    #[arg(long)]
    keep: bool,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn say(text: &str) {
    eprintln!("[failover] {text}");
}

fn label(i: usize) -> String {
    format!("p{i:02}")
}

/// Every mention sent and every answer seen.
#[derive(Default)]
struct Ledger {
    /// token -> (persona, sent at)
    sent: BTreeMap<String, (String, Instant)>,
    /// token -> answers (time of each)
    answers: BTreeMap<String, Vec<Instant>>,
    /// Agents that joined a room at least once.
    joined: BTreeSet<String>,
}

impl Ledger {
    fn answered_at(&self, token: &str) -> Option<Instant> {
        self.answers.get(token).and_then(|a| a.first().copied())
    }
}

struct Driver {
    state: ServerState,
    ledger: Arc<Mutex<Ledger>>,
    next: AtomicU64,
    rooms: usize,
}

impl Driver {
    /// The room of persona `pNN`.
    fn room(&self, persona: &str) -> String {
        let n: usize = persona.trim_start_matches('p').parse().unwrap_or(0);
        format!("room-{}", n % self.rooms.max(1))
    }

    fn mention(&self, persona: &str, prefix: &str) -> String {
        let token = format!("{prefix}{}", self.next.fetch_add(1, Ordering::Relaxed));
        lock(&self.ledger)
            .sent
            .insert(token.clone(), (persona.to_string(), Instant::now()));
        if let Err(e) = self.state.post_message(
            "driver",
            &self.room(persona),
            &format!("@{persona} {token}"),
        ) {
            say(&format!("post failed: {e}"));
        }
        token
    }
}

/// Records every answer (a message from the mentioned persona carrying the token).
fn spawn_observer(state: &ServerState, ledger: Arc<Mutex<Ledger>>) -> tokio::task::JoinHandle<()> {
    let mut events = state.subscribe();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(ServerEvent::Message(m)) => {
                    let at = Instant::now();
                    let mut l = lock(&ledger);
                    let token = m.text.trim().to_string();
                    if l.sent.get(&token).is_some_and(|(p, _)| *p == m.from) {
                        l.answers.entry(token).or_default().push(at);
                    }
                }
                Ok(ServerEvent::Joined { agent, .. }) => {
                    lock(&ledger).joined.insert(agent);
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    say(&format!("observer lagged by {n} events"));
                }
                Err(_) => return,
            }
        }
    })
}

struct Host {
    id: String,
    child: Child,
}

fn start_host(root: &Path, config: &Path, id: &str) -> anyhow::Result<Host> {
    let log = std::fs::File::create(root.join(format!("{id}.log")))?;
    let mut cmd = Command::new(ROOST);
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .arg("--state")
        .arg(root.join(format!("state-{id}")))
        .env("ROOST_HOST_ID", id)
        .env("RUST_LOG", "roost=info")
        .env_remove("ROOST_STORE")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("starting host {id}"))?;
    Ok(Host {
        id: id.to_string(),
        child,
    })
}

/// Holder of each persona with a live lease.
fn holders(store: &Store) -> BTreeMap<String, String> {
    store
        .leases()
        .map(|rows| {
            rows.into_iter()
                .filter(|l| !l.holder.is_empty() && l.expires_in_ms > 0)
                .map(|l| (l.persona, l.holder))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (bounded) until every persona has a live lease on a live host and the split
/// is even (no host more than its share).
async fn wait_spread(store: &Store, hosts: &[Host], personas: usize, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let share = personas.div_ceil(hosts.len().max(1));
    while Instant::now() < deadline {
        let h = holders(store);
        let ids: BTreeSet<&str> = hosts.iter().map(|h| h.id.as_str()).collect();
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for holder in h.values() {
            *per.entry(holder.as_str()).or_default() += 1;
        }
        if h.len() == personas
            && h.values().all(|v| ids.contains(v.as_str()))
            && per.values().all(|&n| n <= share)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn summary(mut samples: Vec<f64>) -> Value {
    samples.sort_by(f64::total_cmp);
    json!({
        "n": samples.len(),
        "p50": percentile(&samples, 0.50),
        "p99": percentile(&samples, 0.99),
        "max": samples.last().copied().unwrap_or(f64::NAN),
    })
}

/// `roost build plugins/echo -o OUT`.
async fn build_echo(out: &Path) -> anyhow::Result<()> {
    let host = Path::new(env!("CARGO_MANIFEST_DIR"));
    let repo = host.parent().unwrap_or(host);
    let status = tokio::time::timeout(
        Duration::from_secs(900),
        Command::new(ROOST)
            .arg("build")
            .arg(repo.join("plugins/echo"))
            .arg("-o")
            .arg(out)
            .current_dir(repo)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .status(),
    )
    .await
    .context("roost build plugins/echo took over 15 minutes")??;
    anyhow::ensure!(status.success(), "roost build plugins/echo: {status}");
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<Value> {
    let url = args
        .postgres
        .clone()
        .or_else(|| std::env::var("ROOST_TEST_POSTGRES").ok())
        .context("no PostgreSQL: pass --postgres URL or set ROOST_TEST_POSTGRES")?;
    anyhow::ensure!(args.hosts >= 2, "--hosts must be at least 2");
    anyhow::ensure!(args.personas >= 1, "--personas must be at least 1");
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    let tmp = tempfile::Builder::new()
        .prefix("roost-failover-")
        .tempdir()?;
    let root = tmp.path().to_path_buf();
    let root = root.as_path();
    if args.keep {
        say(&format!("keeping {}", root.display()));
    }
    let echo = match &args.echo {
        Some(p) => p.clone(),
        None => {
            say("building plugins/echo");
            let out = root.join("echo.wasm");
            build_echo(&out).await?;
            out
        }
    };
    let server = devserver::spawn("127.0.0.1:0".parse()?, ServerConfig::default()).await?;
    let schema = format!("bench_{}_{:08x}", std::process::id(), rng.random::<u32>());
    let plugins = root.join("plugins");
    std::fs::create_dir_all(&plugins)?;
    let mut toml = format!(
        "[server]\nurl = {:?}\n\n[paths]\nplugins = {:?}\n\n[store]\nurl = {:?}\nschema = {:?}\n\
         lease_renew_ms = {}\nlease_ttl_ms = {}\n\n\
         [policy.limits]\nroom_per_minute = 100000\nroom_burst = 100000\nbot_per_minute = 100000\n\
         bot_burst = 100000\nroom_min_interval_ms = 0\n\n\
         # One driver mentions every bot all run long: no loop to stop here.\n\
         [policy.loop_guard]\nmax_exchanges = 1000000000\nrepeat_history = 0\n",
        server.base_url(),
        plugins.display().to_string(),
        url,
        schema,
        args.renew_ms,
        args.ttl_ms,
    );
    let all: Vec<String> = (0..args.personas).map(label).collect();
    let rooms = args.rooms.max(1);
    for (i, p) in all.iter().enumerate() {
        std::fs::copy(&echo, plugins.join(format!("{p}.wasm")))?;
        toml.push_str(&format!(
            "\n[personas.{p}]\nname = \"{p}\"\nrooms = [\"room-{}\"]\n",
            i % rooms
        ));
    }
    let config = root.join("roost.toml");
    std::fs::write(&config, toml)?;
    let observer = {
        let (url, schema) = (url.clone(), schema.clone());
        tokio::task::spawn_blocking(move || {
            Store::open_postgres(
                &url,
                PgOptions {
                    schema: Some(schema),
                },
            )
        })
        .await??
    };

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let watcher = spawn_observer(&server.state(), ledger.clone());
    let driver = Arc::new(Driver {
        state: server.state(),
        ledger: ledger.clone(),
        next: AtomicU64::new(0),
        rooms,
    });

    let mut generation = 0usize;
    let mut hosts: Vec<Host> = Vec::new();
    for i in 0..args.hosts {
        hosts.push(start_host(root, &config, &format!("h{i}-g0"))?);
    }
    say(&format!(
        "{} hosts, {} personas, schema {schema}, seed {seed}",
        args.hosts, args.personas
    ));
    let spread_wait = Duration::from_secs(180);
    anyhow::ensure!(
        wait_spread(&observer, &hosts, args.personas, spread_wait).await,
        "the personas never spread over the hosts: {:?}",
        holders(&observer)
    );
    // Every persona is in its room (a bot starting recovers nothing from before it
    // first joined) and answers, before the traffic starts.
    let join_deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < join_deadline {
        if all.iter().all(|p| lock(&ledger).joined.contains(p)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let warm: Vec<String> = all.iter().map(|p| driver.mention(p, "w")).collect();
    let warm_deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < warm_deadline {
        let done = {
            let l = lock(&ledger);
            warm.iter().all(|t| l.answered_at(t).is_some())
        };
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    {
        let l = lock(&ledger);
        let silent: Vec<&String> = warm.iter().filter(|t| l.answered_at(t).is_none()).collect();
        anyhow::ensure!(
            silent.is_empty(),
            "no answer to the first mentions {silent:?}"
        );
    }
    say("every persona answers; traffic and kills begin");

    let talking = Arc::new(AtomicBool::new(true));
    let traffic = {
        let (driver, talking, all) = (driver.clone(), talking.clone(), all.clone());
        let every = Duration::from_millis(args.mention_every_ms.max(10));
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        tokio::spawn(async move {
            while talking.load(Ordering::Relaxed) {
                let p = &all[rng.random_range(0..all.len())];
                driver.mention(p, "m");
                tokio::time::sleep(every).await;
            }
        })
    };

    let mut to_active: Vec<f64> = Vec::new();
    let mut all_active: Vec<f64> = Vec::new();
    let mut kills = Vec::new();
    let probe_wait = Duration::from_secs(60);
    for k in 0..args.kills {
        if !wait_spread(&observer, &hosts, args.personas, spread_wait).await {
            say(&format!(
                "kill {k}: the split did not settle: {:?}",
                holders(&observer)
            ));
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(2000..5000))).await;
        let victim = rng.random_range(0..hosts.len());
        let held: Vec<String> = holders(&observer)
            .into_iter()
            .filter(|(_, h)| *h == hosts[victim].id)
            .map(|(p, _)| p)
            .collect();
        let killed_at = Instant::now();
        let mut dead = hosts.remove(victim);
        let _ = dead.child.start_kill();
        let _ = dead.child.wait().await;
        let probes: Vec<(String, String)> = held
            .iter()
            .map(|p| (p.clone(), driver.mention(p, "probe")))
            .collect();
        let deadline = killed_at + probe_wait;
        let mut times: BTreeMap<String, f64> = BTreeMap::new();
        while Instant::now() < deadline && times.len() < probes.len() {
            {
                let l = lock(&ledger);
                for (p, t) in &probes {
                    if let Some(at) = l.answered_at(t) {
                        times
                            .entry(p.clone())
                            .or_insert_with(|| at.duration_since(killed_at).as_secs_f64() * 1e3);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let unanswered: Vec<&String> = held.iter().filter(|p| !times.contains_key(*p)).collect();
        let last = times.values().copied().fold(0.0, f64::max);
        say(&format!(
            "kill {k}: {} ({} personas) -> all active in {:.0} ms{}",
            dead.id,
            held.len(),
            last,
            if unanswered.is_empty() {
                String::new()
            } else {
                format!(", unanswered: {unanswered:?}")
            }
        ));
        to_active.extend(times.values().copied());
        if !held.is_empty() {
            all_active.push(last);
        }
        kills.push(json!({
            "host": dead.id,
            "personas": held.len(),
            "all_active_ms": last,
            "unanswered_probes": unanswered.len(),
        }));
        // A fresh host in its place.
        generation += 1;
        let id = format!("h{victim}-g{generation}");
        hosts.insert(victim, start_host(root, &config, &id)?);
    }
    talking.store(false, Ordering::Relaxed);
    let _ = traffic.await;
    // Grace: whatever is still in flight is answered (or counted lost).
    let grace_deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < grace_deadline {
        let done = {
            let l = lock(&ledger);
            l.sent.keys().all(|t| l.answers.contains_key(t))
        };
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (mentions, lost, duplicated, lost_tokens) = {
        let l = lock(&ledger);
        let lost: Vec<String> = l
            .sent
            .keys()
            .filter(|t| !l.answers.contains_key(*t))
            .cloned()
            .collect();
        let dup: usize = l.answers.values().map(|a| a.len().saturating_sub(1)).sum();
        (l.sent.len(), lost.len(), dup, lost)
    };
    for mut h in hosts {
        let _ = h.child.start_kill();
        let _ = h.child.wait().await;
    }
    watcher.abort();
    server.shutdown().await;
    if args.keep {
        let _ = tmp.keep();
    }
    Ok(json!({
        "bench": "failover",
        "hosts": args.hosts,
        "personas": args.personas,
        "kills": args.kills,
        "lease_renew_ms": args.renew_ms,
        "lease_ttl_ms": args.ttl_ms,
        "mention_every_ms": args.mention_every_ms,
        "rooms": rooms,
        "seed": seed,
        "time_to_active_ms": summary(to_active),
        "all_active_ms": summary(all_active),
        "mentions": mentions,
        "lost": lost,
        "duplicated": duplicated,
        "lost_tokens": lost_tokens.into_iter().take(20).collect::<Vec<_>>(),
        "per_kill": kills,
    }))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
