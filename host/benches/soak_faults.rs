//! Fault-matrix soak: bots hosted by real `roost run` processes talk to each other
//! through the local chat server while it misbehaves in every way it knows, and their
//! hosts are killed and restarted. Prints ONE JSON document on stdout, progress on
//! stderr.
//!
//! ```text
//! cargo bench -p roost --bench soak_faults                 # 30 minutes of faults
//! cargo bench -p roost --bench soak_faults -- --quick      # 2 minutes
//! cargo bench -p roost --bench soak_faults -- --minutes 10 --bots 3 --seed 7
//! ```
//!
//! Setup: the local chat server runs in this process (`roost::devserver`) on a free
//! loopback port. The example persona `plugins/echo` is built once with
//! `roost build plugins/echo -o DIR/echo.wasm` and copied as `echo-a.wasm`,
//! `echo-b.wasm`, …; each copy runs in its own `roost run` child with its own state
//! folder and a generated roost.toml: network name = label, rooms `soak-1`…`soak-4` and
//! `probe-1`, `probe-2`, default rate limits, the loop guard's exchange budget raised (two bots answering
//! each other for 30 minutes is the point here, not a loop to stop).
//!
//! Traffic: a driver agent (posting on the server directly) sends a *chain* every
//! `--chain-every` seconds: `@X Y: TOKEN  (soak)` to a random pair. X answers
//! `Y: TOKEN  (soak)`, which mentions Y, and Y answers `TOKEN  (soak)`. So every chain
//! is two mentions: the driver's (`driver`) and X's (`relay`). Rooms rotate least
//! recently used first, so the traffic stays under the default rate limits.
//!
//! Probes (below) go to rooms of their own, `probe-1` and `probe-2`, in turn per bot,
//! so a probe's answer is never held back by the bot's own per-room pacing of chain
//! replies (one room takes 6 replies a minute, 2 back to back: a probe that landed in
//! a room the bot had just answered twice in waited up to 12 s for its slot, which is
//! the rate limit working, not the time the bot took to come back).
//!
//! Faults: about every `--fault-every` seconds (±20 %) one fault from the matrix, one at
//! a time, lasting 2-8 s where it has a duration:
//!
//! | kind | what the server does |
//! |---|---|
//! | `drop` | drops every connection (no close frame) |
//! | `stall` | stops answering anything for a while |
//! | `close_CODE` | closes every connection with CODE (1000, 1001, 1008, 1011, 1012, 1013, 4008, 4029) |
//! | `oversized` | sends a 2 MiB frame (twice the protocol's cap) |
//! | `garbage` | malformed JSON, unknown types and fields, a frame without fields |
//! | `refuse_upgrades` | drops everyone and refuses upgrades (503) for a while |
//! | `history_5xx` / `history_403` / `history_429` / `history_slow` | drops everyone, history fails that way for a while |
//! | `ts_seconds` / `ts_iso` | drops everyone, REST timestamps in seconds / ISO strings for a while |
//! | `rewrite_text` | collapses whitespace in what bots send (their echoes differ), drop halfway |
//! | `rest_send_429` | 429 + Retry-After on REST sends for a while |
//! | `ws_send_429` | `rate_limited` error frames instead of storing WebSocket sends for a while |
//! | `not_joined` | forgets every connection's joins (sends get `not_joined`) |
//! | `server_restart` | shuts the server down, 1-4 s later starts it on the same port with the same state |
//!
//! and every `--restart-every` seconds, instead of a server fault, one `roost run` host
//! (in turn) is stopped with SIGTERM (`host_sigterm`; every third time, the second
//! included, SIGKILL: `host_sigkill`) and started again at once.
//!
//! Measured:
//! - `mentions_sent`, `replies_received` (mentions with at least one reply), `lost` (no
//!   reply once the grace period after the fault phase is over), `duplicated` (extra
//!   copies of a reply, summed); by mention kind, and `lost_after_fault`: each lost
//!   mention charged to the last fault that began before it was sent.
//! - per fault kind: `answer_ms`, the driver's view of time back online: from the fault
//!   ending (the server accepting again; the new host process started) until the bot
//!   answers a probe mention sent at that moment; `rejoin_ms`, the server's view: until
//!   the bot is in all its rooms on a live connection again (0 when it never left);
//!   `unanswered` probes, `not_rejoined` within 90 s.
//! - RSS of every `roost run` process (VmRSS every 5 s, from 5 s after it started):
//!   first, last, max per process.
//! - Besides: every network name each bot registered under (`identities`), the hosts'
//!   `/metrics` counters summed over their lifetimes, the most frequent warnings of their
//!   JSON logs, and a timeline of every fault with what was measured after it.
//!
//! Every wait is bounded; children die with this process (`kill_on_drop` and a
//! parent-death signal). Exit code 0 when the JSON was printed (whatever it says), 2 on
//! a setup failure.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use roost::devserver::{self, DevServer, FaultSpan, ServerConfig, ServerEvent, ServerState};
use roost::protocol::{ChatMessage, MAX_FRAME_BYTES};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};

/// The `roost` binary built with this bench (`--roost` picks another).
const ROOST: &str = env!("CARGO_BIN_EXE_roost");
const ROOMS: [&str; 4] = ["soak-1", "soak-2", "soak-3", "soak-4"];
/// Rooms only probes are sent to (in turn per bot).
const PROBE_ROOMS: [&str; 2] = ["probe-1", "probe-2"];
const DRIVER: &str = "soak-driver";
/// RSS samples of a process start this long after it did.
const RSS_SETTLE: Duration = Duration::from_secs(5);
/// Longest wait for a probe answer or a rejoin after a fault.
const MEASURE_LIMIT: Duration = Duration::from_secs(90);
const CLOSE_CODES: [u16; 8] = [1000, 1001, 1008, 1011, 1012, 1013, 4008, 4029];

#[derive(Parser, Debug)]
#[command(about = "Fault-matrix soak of roost run hosts against the local chat server")]
struct Args {
    /// Length of the fault phase in minutes.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Two minutes of faults (overrides --minutes), a host restart every 50 s.
    #[arg(long)]
    quick: bool,
    /// Bots, each in its own `roost run` (2-8).
    #[arg(long, default_value_t = 2)]
    bots: usize,
    /// Mean seconds between faults.
    #[arg(long, default_value_t = 10.0)]
    fault_every: f64,
    /// Seconds between host restarts [default: 180; 50 with --quick].
    #[arg(long)]
    restart_every: Option<f64>,
    /// Seconds between chains of mentions.
    #[arg(long, default_value_t = 8.0)]
    chain_every: f64,
    /// After the fault phase, wait up to this long for missing replies.
    #[arg(long, default_value_t = 60.0)]
    grace: f64,
    /// Seed of every random choice [default: random, printed in the report].
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the working folder (logs, state, roost.toml) and name it in the report.
    #[arg(long)]
    keep: bool,
    /// Also write the report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The `roost` binary to build and run the bots with [default: the one built with
    /// this bench], e.g. an older release to compare against.
    #[arg(long, default_value = ROOST)]
    roost: PathBuf,
    /// Draw server faults only from these kinds (comma-separated names as in the
    /// report: `drop`, `close` for any close code, `not_joined`, ...) [default: all].
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<String>,
    /// A `[session]` setting for every host's roost.toml, as KEY=VALUE (repeatable),
    /// e.g. `--session membership_check_ms=1000`.
    #[arg(long = "session", value_name = "KEY=VALUE")]
    session: Vec<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

fn say(text: &str) {
    eprintln!("soak: {text}");
}

// ---------------------------------------------------------------------------
// Mentions and replies, as the server sees them

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum MentionKind {
    /// The driver mentions the first bot of a chain.
    Driver,
    /// The first bot's answer, which mentions the second.
    Relay,
    /// The driver mentions a bot right after a fault ended.
    Probe,
}

impl MentionKind {
    fn name(self) -> &'static str {
        match self {
            MentionKind::Driver => "driver",
            MentionKind::Relay => "relay",
            MentionKind::Probe => "probe",
        }
    }
}

struct Mention {
    token: String,
    bot: usize,
    kind: MentionKind,
    sent: Instant,
    answered: Option<Instant>,
    replies: u32,
    /// Driver mentions: the bot the answer mentions in turn.
    relay_to: Option<usize>,
}

#[derive(Default)]
struct Tracker {
    mentions: Vec<Mention>,
    index: HashMap<(String, usize), usize>,
    /// Every network name each bot was seen registering under (first: the configured one).
    names: Vec<Vec<String>>,
    registrations: Vec<u32>,
    /// Messages of bots that carry no token we are waiting for.
    stray: Vec<String>,
    bot_messages: u64,
    lagged: u64,
}

impl Tracker {
    fn bot_of(&self, name: &str) -> Option<usize> {
        self.names
            .iter()
            .position(|ns| ns.iter().any(|n| n.eq_ignore_ascii_case(name)))
    }

    fn name(&self, bot: usize) -> String {
        self.names[bot].last().cloned().unwrap_or_default()
    }

    fn add(&mut self, token: &str, bot: usize, kind: MentionKind, relay_to: Option<usize>) {
        let at = self.mentions.len();
        self.mentions.push(Mention {
            token: token.to_owned(),
            bot,
            kind,
            sent: Instant::now(),
            answered: None,
            replies: 0,
            relay_to,
        });
        self.index.insert((token.to_owned(), bot), at);
    }

    fn answered(&self, token: &str, bot: usize) -> Option<Instant> {
        let i = *self.index.get(&(token.to_owned(), bot))?;
        self.mentions[i].answered
    }

    fn on_registered(&mut self, name: &str) {
        let lower = name.to_lowercase();
        for (bot, names) in self.names.iter_mut().enumerate() {
            let base = names[0].to_lowercase();
            if lower == base || lower.starts_with(&format!("{base}-")) {
                self.registrations[bot] += 1;
                if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                    say(&format!("bot {base} registered again as {name}"));
                    names.push(name.to_owned());
                }
                return;
            }
        }
    }

    fn on_message(&mut self, m: &ChatMessage, at: Instant) {
        if m.from == DRIVER || m.is_system() {
            return;
        }
        let Some(bot) = self.bot_of(&m.from) else {
            return;
        };
        self.bot_messages += 1;
        let mut matched = false;
        for word in m.text.split(|c: char| !c.is_ascii_alphanumeric()) {
            let Some(&i) = self.index.get(&(word.to_owned(), bot)) else {
                continue;
            };
            matched = true;
            let mention = &mut self.mentions[i];
            mention.replies += 1;
            if mention.answered.is_none() {
                mention.answered = Some(at);
            }
            if let Some(next) = mention.relay_to
                && !self.index.contains_key(&(word.to_owned(), next))
            {
                let token = word.to_owned();
                self.add(&token, next, MentionKind::Relay, None);
                let last = self.mentions.len() - 1;
                self.mentions[last].sent = at;
            }
        }
        if !matched && self.stray.len() < 1000 {
            self.stray.push(format!("{}: {}", m.from, m.text));
        }
    }
}

/// Watches the server's events for the whole run (the state outlives restarts).
fn spawn_observer(state: &ServerState, tracker: Arc<Mutex<Tracker>>) -> JoinHandle<()> {
    let mut rx = state.subscribe();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(ServerEvent::Message(m)) => lock(&tracker).on_message(&m, Instant::now()),
                Ok(ServerEvent::Registered { name }) => lock(&tracker).on_registered(&name),
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => lock(&tracker).lagged += n,
                Err(RecvError::Closed) => return,
            }
        }
    })
}

/// Rooms, least recently used first.
struct Rooms(Mutex<[Instant; ROOMS.len()]>);

impl Rooms {
    fn pick(&self) -> &'static str {
        let mut used = lock(&self.0);
        let (i, _) = used
            .iter()
            .enumerate()
            .min_by_key(|(_, t)| **t)
            .expect("rooms");
        used[i] = Instant::now();
        ROOMS[i]
    }
}

/// The driver: posts mentions on the server as `soak-driver`.
struct Driver {
    state: Mutex<ServerState>,
    tracker: Arc<Mutex<Tracker>>,
    rooms: Rooms,
    rng: Mutex<StdRng>,
    seq: Mutex<u64>,
    /// Probes sent per bot (their room alternates).
    probes: Mutex<HashMap<usize, usize>>,
}

impl Driver {
    fn token(&self, prefix: char) -> String {
        let n = {
            let mut s = lock(&self.seq);
            *s += 1;
            *s
        };
        let r: u64 = lock(&self.rng).random();
        format!("{prefix}{n}x{r:016x}")
    }

    fn post(&self, room: &str, text: &str) {
        let state = lock(&self.state).clone();
        if let Err(e) = state.post_message(DRIVER, room, text) {
            say(&format!("driver cannot post: {e}"));
        }
    }

    /// `@X Y: TOKEN  (soak)`.
    fn chain(&self, bots: usize) {
        let (x, y) = {
            let mut rng = lock(&self.rng);
            let x = rng.random_range(0..bots);
            let y = (x + rng.random_range(1..bots)) % bots;
            (x, y)
        };
        let token = self.token('c');
        let text = {
            let mut t = lock(&self.tracker);
            t.add(&token, x, MentionKind::Driver, Some(y));
            format!("@{} {}: {token}  (soak)", t.name(x), t.name(y))
        };
        self.post(self.rooms.pick(), &text);
    }

    /// `@X TOKEN  (probe)`; returns the token.
    fn probe(&self, bot: usize) -> String {
        let token = self.token('p');
        let text = {
            let mut t = lock(&self.tracker);
            t.add(&token, bot, MentionKind::Probe, None);
            format!("@{} {token}  (probe)", t.name(bot))
        };
        let room = {
            let mut probes = lock(&self.probes);
            let n = probes.entry(bot).or_default();
            *n += 1;
            PROBE_ROOMS[*n % PROBE_ROOMS.len()]
        };
        self.post(room, &text);
        token
    }
}

// ---------------------------------------------------------------------------
// roost run hosts

/// VmRSS of one `roost run` process, sampled every 5 s from 5 s after it started (so
/// `first` is a bot that is up, not an executable being loaded).
struct RssTrack {
    label: String,
    pid: u32,
    incarnation: u32,
    started: Instant,
    first_kib: Option<u64>,
    last_kib: u64,
    max_kib: u64,
    samples: u32,
}

struct Host {
    roost: PathBuf,
    label: String,
    dir: PathBuf,
    metrics_port: u16,
    server_url: String,
    child: Option<Child>,
    incarnation: u32,
    exits: Vec<String>,
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Host {
    fn new(
        roost: &Path,
        label: &str,
        root: &Path,
        echo: &Path,
        server_url: &str,
        session: &[String],
    ) -> anyhow::Result<Host> {
        let dir = root.join(label);
        std::fs::create_dir_all(dir.join("plugins"))?;
        std::fs::create_dir_all(dir.join("state"))?;
        std::fs::copy(echo, dir.join("plugins").join(format!("{label}.wasm")))?;
        let rooms = ROOMS
            .iter()
            .chain(&PROBE_ROOMS)
            .map(|r| format!("\"{r}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut toml = String::from(
            "# Generated by the soak_faults bench: default limits, but two bots answering\n\
             # each other for half an hour is wanted here.\n\
             [policy.loop_guard]\n\
             max_exchanges = 1000000000\n",
        );
        if !session.is_empty() {
            toml.push_str("\n[session]\n");
            for setting in session {
                let (key, value) = setting
                    .split_once('=')
                    .with_context(|| format!("--session {setting}: expected KEY=VALUE"))?;
                let _ = writeln!(toml, "{} = {}", key.trim(), value.trim());
            }
        }
        let _ = write!(
            toml,
            "\n[personas.{label}]\nname = \"{label}\"\nrooms = [{rooms}]\n"
        );
        std::fs::write(dir.join("roost.toml"), toml)?;
        Ok(Host {
            roost: roost.to_owned(),
            label: label.to_owned(),
            dir,
            metrics_port: free_port()?,
            server_url: server_url.to_owned(),
            child: None,
            incarnation: 0,
            exits: Vec::new(),
        })
    }

    fn start(&mut self) -> anyhow::Result<u32> {
        self.incarnation += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("host.log"))?;
        let mut cmd = Command::new(&self.roost);
        cmd.args(["--log-format", "json", "run"])
            .arg("--config")
            .arg(self.dir.join("roost.toml"))
            .arg("--server")
            .arg(&self.server_url)
            .arg("--plugins")
            .arg(self.dir.join("plugins"))
            .arg("--state")
            .arg(self.dir.join("state"))
            .arg("--metrics")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .current_dir(&self.dir)
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
        let child = cmd
            .spawn()
            .with_context(|| format!("starting roost run for {}", self.label))?;
        let pid = child.id().unwrap_or(0);
        self.child = Some(child);
        Ok(pid)
    }

    /// Sends `signal`, waits up to `limit` for the exit, then SIGKILL. Returns how
    /// long the exit took and how it ended.
    async fn stop(&mut self, signal: i32, limit: Duration) -> (Duration, String) {
        let Some(mut child) = self.child.take() else {
            return (Duration::ZERO, "not running".into());
        };
        let t0 = Instant::now();
        if let Some(pid) = child.id() {
            // SAFETY: plain kill(2) on our own child's pid, which has not been reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, signal);
            }
        }
        let how = match tokio::time::timeout(limit, child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            Ok(Err(e)) => format!("wait failed: {e}"),
            Err(_) => {
                let _ = child.kill().await;
                format!("still running after {limit:?}: SIGKILL")
            }
        };
        self.exits.push(format!(
            "incarnation {} signal {signal}: {how} after {} ms",
            self.incarnation,
            t0.elapsed().as_millis()
        ));
        (t0.elapsed(), how)
    }

    /// `/metrics` as (series without the bot label) -> value, counters only.
    async fn scrape(&self, http: &reqwest::Client) -> Option<BTreeMap<String, f64>> {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        let text = http.get(url).send().await.ok()?.text().await.ok()?;
        let mut out = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || !line.starts_with("roost_bot_") {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            if name.ends_with("_bucket")
                || name.ends_with("_created")
                || name == "roost_bot_connection_state"
                || name == "roost_bot_uptime_seconds"
                || name == "roost_bot_outbox_depth"
            {
                continue;
            }
            let reason = labels
                .split(',')
                .find_map(|kv| kv.trim_end_matches('}').strip_prefix("reason="))
                .map(|r| r.trim_matches('"'));
            let key = match reason {
                Some(r) => format!("{name}:{r}"),
                None => name.to_owned(),
            };
            *out.entry(key).or_default() += value;
        }
        Some(out)
    }
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------
// Faults

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Drop,
    Stall,
    Close(u16),
    Oversized,
    Garbage,
    RefuseUpgrades,
    History5xx,
    History403,
    History429,
    HistorySlow,
    TsSeconds,
    TsIso,
    RewriteText,
    RestSend429,
    WsSend429,
    NotJoined,
    ServerRestart,
    HostSigterm,
    HostSigkill,
}

/// The server faults, drawn uniformly (a close code is drawn after `Close`).
const SERVER_KINDS: [Kind; 17] = [
    Kind::Drop,
    Kind::Stall,
    Kind::Close(0),
    Kind::Oversized,
    Kind::Garbage,
    Kind::RefuseUpgrades,
    Kind::History5xx,
    Kind::History403,
    Kind::History429,
    Kind::HistorySlow,
    Kind::TsSeconds,
    Kind::TsIso,
    Kind::RewriteText,
    Kind::RestSend429,
    Kind::WsSend429,
    Kind::NotJoined,
    Kind::ServerRestart,
];

impl Kind {
    fn name(self) -> String {
        match self {
            Kind::Drop => "drop".into(),
            Kind::Stall => "stall".into(),
            Kind::Close(code) => format!("close_{code}"),
            Kind::Oversized => "oversized".into(),
            Kind::Garbage => "garbage".into(),
            Kind::RefuseUpgrades => "refuse_upgrades".into(),
            Kind::History5xx => "history_5xx".into(),
            Kind::History403 => "history_403".into(),
            Kind::History429 => "history_429".into(),
            Kind::HistorySlow => "history_slow".into(),
            Kind::TsSeconds => "ts_seconds".into(),
            Kind::TsIso => "ts_iso".into(),
            Kind::RewriteText => "rewrite_text".into(),
            Kind::RestSend429 => "rest_send_429".into(),
            Kind::WsSend429 => "ws_send_429".into(),
            Kind::NotJoined => "not_joined".into(),
            Kind::ServerRestart => "server_restart".into(),
            Kind::HostSigterm => "host_sigterm".into(),
            Kind::HostSigkill => "host_sigkill".into(),
        }
    }

    /// Whether the bots lose their connection (or joins) the moment the fault ends,
    /// so the server's view must first see them gone.
    fn disconnects_at_end(self) -> bool {
        matches!(
            self,
            Kind::Drop
                | Kind::Close(_)
                | Kind::Oversized
                | Kind::NotJoined
                | Kind::HostSigterm
                | Kind::HostSigkill
        )
    }
}

/// After a fault, for one affected bot: (bot, probe answered after, rejoined after).
type Outcome = (usize, Option<Duration>, Option<Duration>);

/// Per `roost run` host: (pid, incarnation) of the live process.
type Pids = Arc<Mutex<Vec<Option<(u32, u32)>>>>;

/// One injected fault and what was measured after it.
struct FaultRecord {
    kind: Kind,
    started: Instant,
    ended: Instant,
    detail: String,
    /// Per affected bot: (bot, probe answer time, rejoin time).
    results: Arc<Mutex<Vec<Outcome>>>,
}

struct Soak {
    args: Args,
    state: ServerState,
    tracker: Arc<Mutex<Tracker>>,
    driver: Arc<Driver>,
    hosts: Arc<tokio::sync::Mutex<Vec<Host>>>,
    pids: Pids,
    rss: Arc<Mutex<Vec<RssTrack>>>,
    faults: Vec<FaultRecord>,
    measurements: Vec<JoinHandle<()>>,
    rng: StdRng,
    metrics: BTreeMap<String, BTreeMap<String, f64>>,
    http: reqwest::Client,
}

fn in_all_rooms(state: &ServerState, name: &str) -> bool {
    ROOMS.iter().chain(&PROBE_ROOMS).all(|room| {
        state
            .room_agents(room)
            .is_some_and(|agents| agents.iter().any(|a| a.name.eq_ignore_ascii_case(name)))
    })
}

impl Soak {
    fn record_pid(&self, bot: usize, label: &str, pid: u32, incarnation: u32) {
        lock(&self.pids)[bot] = Some((pid, incarnation));
        lock(&self.rss).push(RssTrack {
            label: label.to_owned(),
            pid,
            incarnation,
            started: Instant::now(),
            first_kib: None,
            last_kib: 0,
            max_kib: 0,
            samples: 0,
        });
    }

    /// Sums a host's counters into the lifetime totals before it stops.
    async fn keep_metrics(&mut self, bot: usize) {
        let hosts = self.hosts.lock().await;
        let host = &hosts[bot];
        if let Some(m) = host.scrape(&self.http).await {
            let totals = self.metrics.entry(host.label.clone()).or_default();
            for (k, v) in m {
                *totals.entry(k).or_default() += v;
            }
        }
    }

    /// Applies one server fault; returns when it is over (the server accepts again).
    async fn server_fault(&mut self, server: &mut Option<DevServer>, kind: Kind) -> (Kind, String) {
        let mut rng = StdRng::seed_from_u64(self.rng.random());
        let d = Duration::from_millis(rng.random_range(2_000..=8_000));
        let Some(srv) = server.as_ref() else {
            return (kind, "no server".into());
        };
        let f = srv.faults();
        let span = FaultSpan::For(d);
        let detail;
        let mut kind = kind;
        match kind {
            Kind::Drop => {
                detail = format!("{} connections", f.drop_connections());
            }
            Kind::Stall => {
                f.stall(d);
                sleep(d).await;
                detail = format!("{d:?}");
            }
            Kind::Close(_) => {
                let code = CLOSE_CODES[rng.random_range(0..CLOSE_CODES.len())];
                kind = Kind::Close(code);
                let reason = match code {
                    1008 => "policy violation: rate limit exceeded",
                    1013 | 4029 | 4008 => "rate limited, try again later",
                    1012 => "service restart",
                    1001 => "going away",
                    _ => "closing",
                };
                detail = format!("{} connections", f.close_connections(code, reason));
            }
            Kind::Oversized => {
                detail = format!("{} connections", f.send_oversized(2 * MAX_FRAME_BYTES));
            }
            Kind::Garbage => {
                f.send_malformed();
                f.send_unknown_type();
                f.send_unknown_fields();
                f.send_raw("[]");
                f.send_raw(r#"{"type":"message"}"#);
                detail = format!("{} connections", f.send_raw("\u{1}\u{2} not json"));
            }
            Kind::RefuseUpgrades => {
                f.reject_upgrades(d);
                let n = f.drop_connections();
                sleep(d).await;
                f.accept_upgrades();
                detail = format!("{n} connections, {d:?}");
            }
            Kind::History5xx | Kind::History403 | Kind::History429 | Kind::HistorySlow => {
                detail = match kind {
                    Kind::History5xx => {
                        let status = [500, 502, 503, 504][rng.random_range(0..4)];
                        f.fail_history(status, span);
                        format!("{status} for {d:?}")
                    }
                    Kind::History403 => {
                        f.forbid_history(span);
                        format!("for {d:?}")
                    }
                    Kind::History429 => {
                        let retry = Duration::from_secs(rng.random_range(1..=5));
                        f.rate_limit_history(retry, span);
                        format!("retry-after {retry:?} for {d:?}")
                    }
                    _ => {
                        let delay = Duration::from_millis(rng.random_range(2_000..=6_000));
                        f.slow_history(delay, span);
                        format!("{delay:?} late for {d:?}")
                    }
                };
                f.drop_connections();
                sleep(d).await;
                f.clear_history_faults();
            }
            Kind::TsSeconds | Kind::TsIso => {
                let on = |on| {
                    if kind == Kind::TsSeconds {
                        f.rest_timestamps_in_seconds(on);
                    } else {
                        f.rest_timestamps_iso8601(on);
                    }
                };
                on(true);
                f.drop_connections();
                sleep(d).await;
                on(false);
                detail = format!("{d:?}");
            }
            Kind::RewriteText => {
                f.rewrite_text(true);
                sleep(d / 2).await;
                f.drop_connections();
                sleep(d / 2).await;
                f.rewrite_text(false);
                detail = format!("{d:?}, drop halfway");
            }
            Kind::RestSend429 => {
                f.rate_limit_rest_sends(Duration::from_secs(2), span);
                sleep(d).await;
                detail = format!("{d:?}");
            }
            Kind::WsSend429 => {
                f.rate_limit_ws_sends(Duration::from_secs(2), span);
                sleep(d).await;
                detail = format!("{d:?}");
            }
            Kind::NotJoined => {
                detail = format!("{} connections", f.forget_joins());
            }
            Kind::ServerRestart => {
                let down = Duration::from_millis(rng.random_range(1_000..=4_000));
                let old = server.take().expect("server");
                let addr = old.addr();
                old.shutdown().await;
                sleep(down).await;
                let mut tries = 0;
                let again = loop {
                    tries += 1;
                    match devserver::spawn_with_state(addr, self.state.clone()).await {
                        Ok(s) => break Some(s),
                        Err(e) if tries < 100 => {
                            if tries == 1 {
                                say(&format!("cannot bind {addr} again yet: {e}"));
                            }
                            sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => {
                            say(&format!("server restart failed: {e}"));
                            break None;
                        }
                    }
                };
                *server = again;
                detail = format!("down {down:?}, {tries} bind attempts");
            }
            Kind::HostSigterm | Kind::HostSigkill => {
                unreachable!("host faults are not server faults")
            }
        }
        (kind, detail)
    }

    /// Stops one host with `signal` and starts it again at once.
    async fn host_fault(&mut self, bot: usize, kill: bool) -> String {
        self.keep_metrics(bot).await;
        let mut hosts = self.hosts.lock().await;
        let host = &mut hosts[bot];
        let signal = if kill { libc::SIGKILL } else { libc::SIGTERM };
        let (took, how) = host.stop(signal, Duration::from_secs(15)).await;
        lock(&self.pids)[bot] = None;
        let detail = format!("{}: {how} after {} ms", host.label, took.as_millis());
        match host.start() {
            Ok(pid) => {
                let (label, inc) = (host.label.clone(), host.incarnation);
                drop(hosts);
                self.record_pid(bot, &label, pid, inc);
            }
            Err(e) => say(&format!("cannot restart {}: {e:#}", host.label)),
        }
        detail
    }

    /// After a fault ends: probe the affected bots and watch them rejoin.
    fn measure(&mut self, record_at: usize, bots: Vec<usize>, disconnects: bool) {
        let ended = self.faults[record_at].ended;
        let results = self.faults[record_at].results.clone();
        for bot in bots {
            let driver = self.driver.clone();
            let tracker = self.tracker.clone();
            let state = self.state.clone();
            let results = results.clone();
            let token = driver.probe(bot);
            self.measurements.push(tokio::spawn(async move {
                let name = lock(&tracker).name(bot);
                if disconnects {
                    // See the bot gone first (bounded), or a stale membership reads as back.
                    let gone = ended + Duration::from_secs(2);
                    while Instant::now() < gone && in_all_rooms(&state, &name) {
                        sleep(Duration::from_millis(5)).await;
                    }
                }
                let deadline = ended + MEASURE_LIMIT;
                let (mut answer, mut rejoin) = (None, None);
                while Instant::now() < deadline && (answer.is_none() || rejoin.is_none()) {
                    if rejoin.is_none() {
                        let name = lock(&tracker).name(bot);
                        if in_all_rooms(&state, &name) {
                            rejoin = Some(ended.elapsed());
                        }
                    }
                    if answer.is_none()
                        && let Some(at) = lock(&tracker).answered(&token, bot)
                    {
                        answer = Some(at.saturating_duration_since(ended));
                    }
                    sleep(Duration::from_millis(10)).await;
                }
                lock(&results).push((bot, answer, rejoin));
            }));
        }
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(mut samples: Vec<f64>) -> Value {
    if samples.is_empty() {
        return json!({"samples": 0});
    }
    samples.sort_by(f64::total_cmp);
    json!({
        "p50": percentile(&samples, 0.50),
        "p99": percentile(&samples, 0.99),
        "max": samples.last().copied().unwrap_or(0.0),
        "samples": samples.len(),
    })
}

/// `roost build plugins/echo -o OUT`.
async fn build_echo(roost: &Path, out: &Path) -> anyhow::Result<()> {
    let host = Path::new(env!("CARGO_MANIFEST_DIR"));
    let repo = host.parent().unwrap_or(host);
    let mut cmd = Command::new(roost);
    cmd.arg("build")
        .arg(repo.join("plugins/echo"))
        .arg("-o")
        .arg(out)
        .current_dir(repo)
        .stdout(Stdio::null())
        .kill_on_drop(true);
    let status = tokio::time::timeout(Duration::from_secs(900), cmd.status())
        .await
        .context("roost build plugins/echo took over 15 minutes")??;
    anyhow::ensure!(status.success(), "roost build plugins/echo: {status}");
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<Value> {
    let t_setup = Instant::now();
    let seed = args.seed.unwrap_or_else(rand::random);
    let minutes = if args.quick { 2.0 } else { args.minutes };
    let phase = Duration::from_secs_f64((minutes * 60.0).max(10.0));
    let restart_every = Duration::from_secs_f64(
        args.restart_every
            .unwrap_or(if args.quick { 50.0 } else { 180.0 })
            .max(10.0),
    );
    let fault_every = args.fault_every.max(1.0);
    let chain_every = Duration::from_secs_f64(args.chain_every.max(0.5));
    let grace = Duration::from_secs_f64(args.grace.max(0.0));
    let bots = args.bots.clamp(2, 8);
    let kinds: Vec<Kind> = if args.kinds.is_empty() {
        SERVER_KINDS.to_vec()
    } else {
        let name = |k: &Kind| match k {
            Kind::Close(_) => "close".to_string(),
            k => k.name(),
        };
        args.kinds
            .iter()
            .map(|want| {
                SERVER_KINDS
                    .iter()
                    .find(|k| name(k) == *want)
                    .copied()
                    .with_context(|| format!("--kinds: no server fault kind {want:?}"))
            })
            .collect::<anyhow::Result<_>>()?
    };

    let tmp = tempfile::Builder::new().prefix("roost-soak-").tempdir()?;
    let root = tmp.path().to_owned();
    let echo = root.join("echo.wasm");
    say("building plugins/echo");
    build_echo(&args.roost, &echo).await?;

    let server = devserver::spawn("127.0.0.1:0".parse()?, ServerConfig::default())
        .await
        .context("starting the local chat server")?;
    let state = server.state();
    state.register(DRIVER, "drives the soak")?;
    let labels: Vec<String> = (0..bots)
        .map(|i| format!("echo-{}", (b'a' + i as u8) as char))
        .collect();
    let tracker = Arc::new(Mutex::new(Tracker {
        names: labels.iter().map(|l| vec![l.clone()]).collect(),
        registrations: vec![0; bots],
        ..Tracker::default()
    }));
    let observer = spawn_observer(&state, tracker.clone());
    let mut hosts = Vec::new();
    for label in &labels {
        hosts.push(Host::new(
            &args.roost,
            label,
            &root,
            &echo,
            &server.base_url(),
            &args.session,
        )?);
    }
    let driver = Arc::new(Driver {
        state: Mutex::new(state.clone()),
        tracker: tracker.clone(),
        rooms: Rooms(Mutex::new([Instant::now(); ROOMS.len()])),
        rng: Mutex::new(StdRng::seed_from_u64(seed ^ 0x5eed)),
        seq: Mutex::new(0),
        probes: Mutex::new(HashMap::new()),
    });
    let mut soak = Soak {
        state: state.clone(),
        tracker: tracker.clone(),
        driver: driver.clone(),
        hosts: Arc::new(tokio::sync::Mutex::new(hosts)),
        pids: Arc::new(Mutex::new(vec![None; bots])),
        rss: Arc::new(Mutex::new(Vec::new())),
        faults: Vec::new(),
        measurements: Vec::new(),
        rng: StdRng::seed_from_u64(seed),
        metrics: BTreeMap::new(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?,
        args,
    };
    for bot in 0..bots {
        let (pid, label, inc) = {
            let mut hosts = soak.hosts.lock().await;
            let pid = hosts[bot].start()?;
            (pid, hosts[bot].label.clone(), hosts[bot].incarnation)
        };
        soak.record_pid(bot, &label, pid, inc);
    }

    // RSS sampler.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (pids, rss, sampling) = (soak.pids.clone(), soak.rss.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                let live: Vec<(u32, u32)> = lock(&pids).iter().flatten().copied().collect();
                for (pid, inc) in live {
                    if let Some(kib) = vm_rss_kib(pid) {
                        let mut rss = lock(&rss);
                        if let Some(t) = rss
                            .iter_mut()
                            .rev()
                            .find(|t| t.pid == pid && t.incarnation == inc)
                            && t.started.elapsed() >= RSS_SETTLE
                        {
                            t.first_kib.get_or_insert(kib);
                            t.last_kib = kib;
                            t.max_kib = t.max_kib.max(kib);
                            t.samples += 1;
                        }
                    }
                }
                sleep(Duration::from_secs(5)).await;
            }
        })
    };

    // Everyone online before the clock starts.
    say(&format!(
        "waiting for {bots} bots to join {} rooms",
        ROOMS.len() + PROBE_ROOMS.len()
    ));
    let ready_by = Instant::now() + Duration::from_secs(180);
    loop {
        let names: Vec<String> = (0..bots).map(|b| lock(&tracker).name(b)).collect();
        if names.iter().all(|n| in_all_rooms(&state, n)) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < ready_by,
            "bots not in their rooms after 180 s (see the host logs in {})",
            root.display()
        );
        sleep(Duration::from_millis(50)).await;
    }
    let setup = t_setup.elapsed();
    say(&format!(
        "bots online after {:.1} s; {:.0} s of faults (seed {seed})",
        setup.as_secs_f64(),
        phase.as_secs_f64()
    ));

    // Chains until the fault phase ends.
    let chatting = Arc::new(AtomicBool::new(true));
    let chains = {
        let (driver, chatting) = (driver.clone(), chatting.clone());
        tokio::spawn(async move {
            let mut next = Instant::now();
            while chatting.load(Ordering::Relaxed) {
                driver.chain(bots);
                next += chain_every;
                sleep_until(next).await;
            }
        })
    };

    let start = Instant::now();
    let phase_end = start + phase;
    let mut server = Some(server);
    let mut next_fault = start + Duration::from_secs(5);
    let mut next_restart = start + restart_every;
    let mut host_restarts = 0u32;
    loop {
        sleep_until(next_fault).await;
        if Instant::now() + Duration::from_secs(8) > phase_end {
            break;
        }
        let t0 = Instant::now();
        let (kind, detail, affected) = if t0 >= next_restart {
            next_restart += restart_every;
            host_restarts += 1;
            let bot = (host_restarts as usize - 1) % bots;
            // SIGTERM, every third one SIGKILL (the second of a run included).
            let kill = host_restarts % 3 == 2;
            let detail = soak.host_fault(bot, kill).await;
            let kind = if kill {
                Kind::HostSigkill
            } else {
                Kind::HostSigterm
            };
            (kind, detail, vec![bot])
        } else {
            let kind = kinds[soak.rng.random_range(0..kinds.len())];
            let (kind, detail) = soak.server_fault(&mut server, kind).await;
            (kind, detail, (0..bots).collect())
        };
        let ended = Instant::now();
        say(&format!(
            "{:>6.1} s  {:<16} {detail}",
            t0.duration_since(start).as_secs_f64(),
            kind.name()
        ));
        soak.faults.push(FaultRecord {
            kind,
            started: t0,
            ended,
            detail,
            results: Arc::new(Mutex::new(Vec::new())),
        });
        let at = soak.faults.len() - 1;
        soak.measure(at, affected, kind.disconnects_at_end());
        let jitter = soak.rng.random_range(0.8..1.2);
        // About every `fault_every` from the last start, at least 1 s after it ended.
        next_fault = (t0 + Duration::from_secs_f64(fault_every * jitter))
            .max(ended + Duration::from_secs(1));
    }
    chatting.store(false, Ordering::Relaxed);
    let _ = chains.await;
    if let Some(s) = &server {
        s.faults().clear_all();
    }
    let fault_phase = start.elapsed();

    // Grace: wait for every mention's answer (bounded), then a little longer for late copies.
    say("fault phase over; waiting for missing replies");
    let grace_end = Instant::now() + grace;
    while Instant::now() < grace_end {
        if lock(&tracker).mentions.iter().all(|m| m.answered.is_some()) {
            break;
        }
        sleep(Duration::from_millis(100)).await;
    }
    sleep(Duration::from_secs(5)).await;
    for m in soak.measurements.drain(..) {
        let _ = tokio::time::timeout(MEASURE_LIMIT, m).await;
    }

    for bot in 0..bots {
        soak.keep_metrics(bot).await;
    }
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let mut stops = Vec::new();
    {
        let mut hosts = soak.hosts.lock().await;
        for host in hosts.iter_mut() {
            let (took, how) = host.stop(libc::SIGTERM, Duration::from_secs(15)).await;
            stops.push(json!({"host": host.label, "exit": how, "ms": took.as_millis() as u64}));
        }
    }
    if let Some(s) = server.take() {
        s.shutdown().await;
    }
    observer.abort();

    let report = report(&soak, seed, setup, fault_phase, host_restarts, stops, &root);
    if soak.args.keep {
        let kept = tmp.keep();
        say(&format!("kept {}", kept.display()));
    }
    Ok(report)
}

/// Warnings and errors of a host's JSON log: counts, and the most frequent messages.
fn log_summary(text: &str) -> Value {
    let (mut warn, mut error) = (0u64, 0u64);
    let mut messages: BTreeMap<String, u64> = BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        match v["level"].as_str() {
            Some("WARN") => warn += 1,
            Some("ERROR") => error += 1,
            _ => continue,
        }
        let message = v["fields"]["message"].as_str().unwrap_or("?");
        *messages
            .entry(format!("{}: {message}", v["level"].as_str().unwrap_or("?")))
            .or_default() += 1;
    }
    let mut top: Vec<(String, u64)> = messages.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.truncate(10);
    json!({
        "warn_lines": warn,
        "error_lines": error,
        "top": top.into_iter().map(|(m, n)| json!({"message": m, "count": n})).collect::<Vec<_>>(),
    })
}

fn report(
    soak: &Soak,
    seed: u64,
    setup: Duration,
    fault_phase: Duration,
    host_restarts: u32,
    stops: Vec<Value>,
    root: &Path,
) -> Value {
    let t = lock(&soak.tracker);
    let mut by_kind: BTreeMap<&str, (u64, u64, u64, u64)> = BTreeMap::new();
    let (mut sent, mut answered, mut lost, mut duplicated) = (0u64, 0u64, 0u64, 0u64);
    let mut lost_after: BTreeMap<String, u64> = BTreeMap::new();
    let mut lost_examples = Vec::new();
    for m in &t.mentions {
        let e = by_kind.entry(m.kind.name()).or_default();
        sent += 1;
        e.0 += 1;
        let dups = u64::from(m.replies.saturating_sub(1));
        duplicated += dups;
        e.3 += dups;
        if m.answered.is_some() {
            answered += 1;
            e.1 += 1;
            continue;
        }
        lost += 1;
        e.2 += 1;
        let last_fault = soak
            .faults
            .iter()
            .rev()
            .find(|f| f.started <= m.sent)
            .map_or_else(|| "none".to_owned(), |f| f.kind.name());
        *lost_after.entry(last_fault.clone()).or_default() += 1;
        if lost_examples.len() < 20 {
            let start = soak.faults.first().map_or(m.sent, |f| f.started);
            lost_examples.push(json!({
                "token": m.token,
                "bot": t.names[m.bot][0],
                "kind": m.kind.name(),
                "sent_s": (m.sent.saturating_duration_since(start).as_secs_f64() * 10.0).round() / 10.0,
                "after_fault": last_fault,
            }));
        }
    }
    let dup_examples: Vec<Value> = t
        .mentions
        .iter()
        .filter(|m| m.replies > 1)
        .take(20)
        .map(|m| json!({"token": m.token, "bot": t.names[m.bot][0], "kind": m.kind.name(), "copies": m.replies}))
        .collect();

    #[derive(Default)]
    struct KindStats {
        count: u64,
        answer: Vec<f64>,
        rejoin: Vec<f64>,
        unanswered: u64,
        not_rejoined: u64,
    }
    let mut per_fault: BTreeMap<String, KindStats> = BTreeMap::new();
    for f in &soak.faults {
        let e = per_fault.entry(f.kind.name()).or_default();
        e.count += 1;
        for (_, answer, rejoin) in lock(&f.results).iter() {
            match answer {
                Some(d) => e.answer.push(ms(*d)),
                None => e.unanswered += 1,
            }
            match rejoin {
                Some(d) => e.rejoin.push(ms(*d)),
                None => e.not_rejoined += 1,
            }
        }
    }
    let faults: BTreeMap<String, Value> = per_fault
        .into_iter()
        .map(|(k, e)| {
            (
                k,
                json!({
                    "count": e.count,
                    "answer_ms": summary(e.answer),
                    "rejoin_ms": summary(e.rejoin),
                    "unanswered": e.unanswered,
                    "not_rejoined": e.not_rejoined,
                }),
            )
        })
        .collect();
    let all_answer: Vec<f64> = soak
        .faults
        .iter()
        .flat_map(|f| {
            lock(&f.results)
                .iter()
                .filter_map(|r| r.1)
                .map(ms)
                .collect::<Vec<_>>()
        })
        .collect();
    let timeline: Vec<Value> = soak
        .faults
        .iter()
        .map(|f| {
            let start = soak.faults[0].started;
            let results: Vec<Value> = lock(&f.results)
                .iter()
                .map(|(bot, a, r)| {
                    json!({"bot": t.names[*bot][0], "answer_ms": a.map(ms), "rejoin_ms": r.map(ms)})
                })
                .collect();
            json!({
                "at_s": (f.started.duration_since(start).as_secs_f64() * 10.0).round() / 10.0,
                "kind": f.kind.name(),
                "lasted_ms": ms(f.ended.duration_since(f.started)),
                "detail": f.detail,
                "after": results,
            })
        })
        .collect();
    let mib = |kib: u64| (kib as f64 / 1024.0 * 10.0).round() / 10.0;
    let rss: Vec<Value> = lock(&soak.rss)
        .iter()
        .map(|r| {
            json!({
                "host": r.label,
                "incarnation": r.incarnation,
                "pid": r.pid,
                "first_mib": r.first_kib.map(mib),
                "last_mib": mib(r.last_kib),
                "max_mib": mib(r.max_kib),
                "samples": r.samples,
            })
        })
        .collect();
    let kinds: BTreeMap<&str, Value> = by_kind
        .into_iter()
        .map(|(k, (s, a, l, d))| {
            (
                k,
                json!({"sent": s, "answered": a, "lost": l, "duplicated": d}),
            )
        })
        .collect();
    let identities: BTreeMap<String, Value> = t
        .names
        .iter()
        .zip(&t.registrations)
        .map(|(names, regs)| {
            (
                names[0].clone(),
                json!({"names": names, "registrations": regs}),
            )
        })
        .collect();
    let logs: BTreeMap<String, Value> = t
        .names
        .iter()
        .map(|names| {
            let text =
                std::fs::read_to_string(root.join(&names[0]).join("host.log")).unwrap_or_default();
            (names[0].clone(), log_summary(&text))
        })
        .collect();
    json!({
        "seed": seed,
        "roost": soak.args.roost.display().to_string(),
        "kinds": if soak.args.kinds.is_empty() { vec!["all".to_string()] } else { soak.args.kinds.clone() },
        "session_settings": soak.args.session,
        "bots": t.names.iter().map(|n| n[0].clone()).collect::<Vec<_>>(),
        "setup_s": (setup.as_secs_f64() * 10.0).round() / 10.0,
        "fault_phase_s": (fault_phase.as_secs_f64() * 10.0).round() / 10.0,
        "mentions_sent": sent,
        "replies_received": answered,
        "lost": lost,
        "duplicated": duplicated,
        "by_mention_kind": kinds,
        "lost_after_fault": lost_after,
        "lost_examples": lost_examples,
        "duplicate_examples": dup_examples,
        "bot_messages_without_a_known_token": t.stray.len(),
        "stray_examples": t.stray.iter().take(10).collect::<Vec<_>>(),
        "observer_lagged": t.lagged,
        "faults_injected": soak.faults.len(),
        "host_restarts": host_restarts,
        "answer_ms_all_faults": summary(all_answer),
        "faults": faults,
        "identities": identities,
        "rss": rss,
        "host_metrics_totals": soak.metrics,
        "host_logs": logs,
        "host_exits": stops,
        "fault_timeline": timeline,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let out = args.out.clone();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(&format!("cannot start tokio: {e}"));
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(report) => {
            let text = serde_json::to_string_pretty(&report).unwrap_or_default();
            println!("{text}");
            if let Some(path) = out
                && let Err(e) = std::fs::write(&path, &text)
            {
                say(&format!("cannot write {}: {e}", path.display()));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(&format!("setup failed: {e:#}"));
            ExitCode::from(2)
        }
    }
}
