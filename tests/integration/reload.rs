//! Hot reload end to end: a `BotHost` serving reloads of its plugins folder against
//! the local chat server. `echo-v2` (a test guest) is a changed `echo`: same manifest
//! name, but its answers start with `v2: `, so every answer says which version gave it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use roost::bot::host::BotHost;
use roost::bot::stats::{ReloadStats, ReloadStatsSnapshot};
use roost::config::Config;
use roost::devserver::{self, DevServer, ServerConfig, ServerEvent};
use roost::plugin::CacheOutcome;
use roost::protocol::ChatMessage;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

use crate::guests::{example, guest};
use crate::support::{self, install, plugins, wait_event, wait_joined_within, wait_message};

/// Debounce used by these tests (the default is 300 ms).
const DEBOUNCE_MS: u64 = 100;

/// How long these tests wait for a server event (a bot joining, leaving, ...).
const EVENT_WAIT: Duration = Duration::from_secs(30);

async fn server() -> DevServer {
    let config = ServerConfig {
        room_capacity: 5_000,
        ..ServerConfig::default()
    };
    devserver::spawn("127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("server")
}

/// A config for `server` with plugins and state in `dir`, rate limits and the loop
/// guard out of the way (one agent mentions the bot hundreds of times).
fn config_for(server: &str, dir: &Path) -> Config {
    let mut c = support::config_for(server, dir);
    c.reload.debounce_ms = DEBOUNCE_MS;
    let l = &mut c.policy.limits;
    l.room_per_minute = 100_000;
    l.room_burst = 100_000;
    l.bot_per_minute = 100_000;
    l.bot_burst = 100_000;
    l.room_min_interval_ms = 0;
    c.policy.loop_guard.max_exchanges = 100_000;
    c.policy.loop_guard.repeat_history = 0;
    c
}

/// Writes `bytes` the way compilers do: to a hidden temporary file, then a rename.
fn write_atomically(to: &Path, bytes: &[u8]) {
    let tmp = to.with_file_name(format!(
        ".{}.tmp",
        to.file_name().and_then(|n| n.to_str()).expect("name")
    ));
    std::fs::write(&tmp, bytes).expect("write tmp");
    std::fs::rename(&tmp, to).expect("rename");
}

/// A host serving reloads in a task; `finish` stops serving and then the bots.
struct Running {
    stats: Arc<ReloadStats>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<BotHost>,
}

impl Running {
    async fn start(config: Config) -> Running {
        let mut host = BotHost::start(config).await.expect("start");
        let stats = host.reload_stats();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            host.serve_reloads(async {
                let _ = stopped.await;
            })
            .await;
            host
        });
        Running { stats, stop, task }
    }

    fn stats(&self) -> ReloadStatsSnapshot {
        self.stats.snapshot()
    }

    /// Waits (bounded) until `pred` holds for the stats.
    async fn wait_for(&self, what: &str, pred: impl Fn(&ReloadStatsSnapshot) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pred(&self.stats()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.stats()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> BotHost {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("reloader stopped")
            .expect("reloader task")
    }
}

/// Waits until `agent` has joined `room`, up to [`EVENT_WAIT`].
async fn wait_joined(events: &mut broadcast::Receiver<ServerEvent>, agent: &str, room: &str) {
    wait_joined_within(events, EVENT_WAIT, agent, room).await;
}

/// Mentions `echo` and returns its answer.
async fn ask_echo(
    server: &DevServer,
    events: &mut broadcast::Receiver<ServerEvent>,
    text: &str,
) -> String {
    server
        .state()
        .post_message("ada", "lobby", &format!("@echo {text}"))
        .expect("post");
    wait_message(events, Duration::from_secs(10), |m| {
        m.from == "echo" && m.text.ends_with(text)
    })
    .await
    .unwrap_or_else(|| panic!("echo did not answer {text:?}"))
    .text
}

/// The room's stored messages, oldest first.
fn stored(server: &DevServer, room: &str) -> Vec<ChatMessage> {
    let mut m = server.state().messages(room, None, 100_000).expect("room");
    m.reverse();
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_under_load_answers_every_message_exactly_once() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = install(dir.path(), &example("echo"), "echo");
    let v2 = std::fs::read(guest("echo-v2")).expect("echo-v2");
    let mut events = server.state().subscribe();
    let running = Running::start(config_for(&server.base_url(), dir.path())).await;
    wait_joined(&mut events, "echo", "lobby").await;

    // A stream of mentions; the changed echo lands in the middle of it.
    let total_min = 200;
    let mut sent = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut reloaded_at: Option<usize> = None;
    loop {
        server
            .state()
            .post_message("ada", "lobby", &format!("@echo m-{sent}"))
            .expect("post");
        sent += 1;
        if sent == total_min / 2 {
            write_atomically(&file, &v2);
        }
        if reloaded_at.is_none() && running.stats().reloaded > 0 {
            reloaded_at = Some(sent);
        }
        // At least 200, and at least 20 after the swap.
        if sent >= total_min && reloaded_at.is_some_and(|r| sent >= r + 20) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reload within the stream: {:?}",
            running.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Every mention answered: wait until the store holds `sent` answers, then a little
    // longer so that a doubled answer would show.
    let answers = |all: &[ChatMessage]| all.iter().filter(|m| m.from == "echo").count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while answers(&stored(&server, "lobby")) < sent {
        assert!(
            Instant::now() < deadline,
            "only {} of {sent} mentions answered",
            answers(&stored(&server, "lobby"))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let all = stored(&server, "lobby");
    let replies: Vec<&ChatMessage> = all.iter().filter(|m| m.from == "echo").collect();
    assert_eq!(replies.len(), sent, "answers: {}", replies.len());
    let mut answered = vec![0usize; sent];
    let mut first_new: Option<usize> = None;
    let (mut old, mut new) = (0, 0);
    for (i, r) in replies.iter().enumerate() {
        let (is_new, rest) = match r.text.strip_prefix("v2: ") {
            Some(rest) => (true, rest),
            None => (false, r.text.as_str()),
        };
        let n: usize = rest
            .strip_prefix("m-")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected answer {:?}", r.text));
        answered[n] += 1;
        if is_new {
            new += 1;
            first_new.get_or_insert(i);
        } else {
            old += 1;
            // Atomic: no old answer after the first new one.
            assert!(
                first_new.is_none(),
                "old version answered {:?} after the swap",
                r.text
            );
        }
    }
    let wrong: Vec<(usize, usize)> = answered
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, c)| *c != 1)
        .collect();
    assert!(
        wrong.is_empty(),
        "mentions not answered exactly once (index, answers): {wrong:?}"
    );
    assert!(
        old > 0 && new > 0,
        "both versions answered: old {old}, new {new}"
    );
    eprintln!(
        "swap under load: {sent} mentions, {old} answered by the old version, {new} by the new; reload latency {:?}",
        running.stats().last_reload_latency
    );

    let stats = running.stats();
    assert_eq!(stats.reloaded, 1, "{stats:?}");
    assert_eq!(stats.rejected, 0, "{stats:?}");
    assert!(stats.last_reload_latency.is_some());
    let host = running.finish().await;
    // The session was never replaced: one connection for the whole run.
    let bot = &host.bots["echo"];
    assert_eq!(bot.status().reconnects, 0);
    assert_eq!(bot.counters().reloads, 1);
    assert_eq!(bot.manifest.version, "2.0.0");
    host.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_keeps_the_old_version_until_it_is_fixed() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = install(dir.path(), &example("echo"), "echo");
    let v2 = std::fs::read(guest("echo-v2")).expect("echo-v2");
    let mut events = server.state().subscribe();
    let running = Running::start(config_for(&server.base_url(), dir.path())).await;
    wait_joined(&mut events, "echo", "lobby").await;
    assert_eq!(ask_echo(&server, &mut events, "one").await, "one");

    // Garbage: refused, counted, the old version answers.
    std::fs::write(&file, b"this is not a WebAssembly component at all").expect("write");
    running
        .wait_for("the garbage to be rejected", |s| s.rejected == 1)
        .await;
    assert_eq!(ask_echo(&server, &mut events, "two").await, "two");

    // A truncated component (right header, half the body): the same.
    std::fs::write(&file, &v2[..v2.len() / 2]).expect("write");
    running
        .wait_for("the truncated file to be rejected", |s| s.rejected == 2)
        .await;
    assert_eq!(ask_echo(&server, &mut events, "three").await, "three");

    // Fixed: the new version loads.
    std::fs::write(&file, &v2).expect("write");
    running
        .wait_for("the fix to load", |s| s.reloaded == 1)
        .await;
    assert_eq!(ask_echo(&server, &mut events, "four").await, "v2: four");
    let stats = running.stats();
    assert_eq!(
        (stats.rejected, stats.reloaded, stats.unloaded),
        (2, 1, 0),
        "{stats:?}"
    );

    // Touching the file (same content) changes nothing.
    let f = std::fs::File::options()
        .write(true)
        .open(&file)
        .expect("open");
    f.set_modified(std::time::SystemTime::now()).expect("touch");
    drop(f);
    running
        .wait_for("the touch to be seen", |s| s.unchanged >= 1)
        .await;
    assert_eq!(running.stats().reloaded, 1);
    running.finish().await.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_file_renames_and_chunked_writes_reload_once_each() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = install(dir.path(), &example("echo"), "echo");
    let v1 = std::fs::read(example("echo")).expect("echo");
    let v2 = std::fs::read(guest("echo-v2")).expect("echo-v2");
    let mut events = server.state().subscribe();
    let mut config = config_for(&server.base_url(), dir.path());
    // The default debounce: the pauses between chunks below are well within it.
    config.reload.debounce_ms = 300;
    let running = Running::start(config).await;
    wait_joined(&mut events, "echo", "lobby").await;

    // A compiler's write: a hidden temporary file renamed over the old one.
    write_atomically(&file, &v2);
    running
        .wait_for("the renamed file to load", |s| s.reloaded == 1)
        .await;
    assert_eq!(
        ask_echo(&server, &mut events, "renamed").await,
        "v2: renamed"
    );

    // An editor's write: the file truncated and written in several chunks, with
    // pauses shorter than the debounce time.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&file).expect("create");
        for chunk in v1.chunks(v1.len().div_ceil(4)) {
            f.write_all(chunk).expect("write");
            f.flush().expect("flush");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    running
        .wait_for("the chunked file to load", |s| s.reloaded == 2)
        .await;
    assert_eq!(ask_echo(&server, &mut events, "chunked").await, "chunked");
    let stats = running.stats();
    assert_eq!(
        stats.rejected, 0,
        "no half-written file was tried: {stats:?}"
    );
    assert_eq!(stats.reloaded, 2, "{stats:?}");
    running.finish().await.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_file_starts_a_bot_and_a_deleted_one_stops_it() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let echo = install(dir.path(), &example("echo"), "echo");
    let mut events = server.state().subscribe();
    let running = Running::start(config_for(&server.base_url(), dir.path())).await;
    wait_joined(&mut events, "echo", "lobby").await;

    // Add: a new bot appears and answers.
    write_atomically(
        &plugins(dir.path()).join("counter.wasm"),
        &std::fs::read(guest("counter")).unwrap(),
    );
    wait_joined(&mut events, "counter", "lobby").await;
    server
        .state()
        .post_message("ada", "lobby", "hello counter")
        .expect("post");
    let reply = wait_message(&mut events, Duration::from_secs(10), |m| {
        m.from == "counter"
    })
    .await
    .expect("counter answered");
    assert_eq!(reply.text, "1: hello counter");
    assert_eq!(running.stats().loaded, 2);

    // Delete: echo finishes, leaves and disconnects; counter keeps running.
    std::fs::remove_file(&echo).expect("rm");
    wait_event(
        &mut events,
        EVENT_WAIT,
        "echo to disconnect",
        |e| matches!(e, ServerEvent::Disconnected { agent, .. } if agent == "echo"),
    )
    .await;
    running
        .wait_for("the unload to be counted", |s| s.unloaded == 1)
        .await;
    let members = server.state().room_agents("lobby").expect("lobby");
    assert!(
        !members.iter().any(|a| a.name == "echo"),
        "echo still in the lobby: {members:?}"
    );
    assert_eq!(
        server.state().connection_count(),
        1,
        "only counter is connected"
    );
    server
        .state()
        .post_message("ada", "lobby", "@echo anyone?")
        .expect("post");
    let reply = wait_message(&mut events, Duration::from_secs(10), |m| {
        m.from == "counter" || m.from == "echo"
    })
    .await
    .expect("counter answered");
    assert_eq!(reply.from, "counter", "{reply:?}");

    // Back again: the same identity starts again.
    write_atomically(&echo, &std::fs::read(example("echo")).unwrap());
    wait_joined(&mut events, "echo", "lobby").await;
    assert_eq!(ask_echo(&server, &mut events, "back").await, "back");
    let host = running.finish().await;
    assert_eq!(host.bots.keys().collect::<Vec<_>>(), ["counter", "echo"]);
    host.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_with_other_rooms_moves_the_bot() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = install(dir.path(), &example("echo"), "echo");
    let mut events = server.state().subscribe();
    let running = Running::start(config_for(&server.base_url(), dir.path())).await;
    wait_joined(&mut events, "echo", "lobby").await;

    // echo-v2 is in `lobby` and `builders`: the bot joins `builders` and answers there.
    write_atomically(&file, &std::fs::read(guest("echo-v2")).unwrap());
    wait_joined(&mut events, "echo", "builders").await;
    server
        .state()
        .post_message("ada", "builders", "@echo up here")
        .expect("post");
    let reply = wait_message(&mut events, Duration::from_secs(10), |m| m.from == "echo")
        .await
        .expect("answered in builders");
    assert_eq!(
        (reply.room.as_str(), reply.text.as_str()),
        ("builders", "v2: up here")
    );

    // Back to echo (lobby only): it leaves `builders`, on the same connection.
    write_atomically(&file, &std::fs::read(example("echo")).unwrap());
    wait_event(
        &mut events,
        EVENT_WAIT,
        "echo to leave #builders",
        |e| matches!(e, ServerEvent::Left { agent, room } if agent == "echo" && room == "builders"),
    )
    .await;
    running.wait_for("two reloads", |s| s.reloaded == 2).await;
    assert_eq!(
        ask_echo(&server, &mut events, "down again").await,
        "down again"
    );
    let host = running.finish().await;
    let status = host.bots["echo"].status();
    assert_eq!(status.rooms, ["lobby"]);
    assert_eq!(status.reconnects, 0);
    host.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_manifest_name_keeps_the_files_identity() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = install(dir.path(), &guest("counter"), "count");
    let mut config = config_for(&server.base_url(), dir.path());
    config.personas.entry("count".into()).or_default().name = Some("counter".into());
    let mut events = server.state().subscribe();
    let running = Running::start(config).await;
    wait_joined(&mut events, "counter", "lobby").await;

    // echo-v2 under the same file: name "counter" still (roost.toml wins), a swap.
    write_atomically(&file, &std::fs::read(guest("echo-v2")).unwrap());
    running.wait_for("the swap", |s| s.reloaded == 1).await;
    server
        .state()
        .post_message("ada", "lobby", "@counter hi")
        .expect("post");
    let reply = wait_message(&mut events, Duration::from_secs(10), |m| {
        m.from == "counter"
    })
    .await
    .expect("answered");
    assert_eq!(reply.text, "v2: hi");
    let host = running.finish().await;
    host.stop().await;

    // Without the override the manifest name is `echo`, but the identity belongs to the
    // file: the bot comes back as `counter`, and a new version naming itself anything
    // is a swap under the same identity.
    let mut events = server.state().subscribe();
    let running = Running::start(config_for(&server.base_url(), dir.path())).await;
    wait_joined(&mut events, "counter", "lobby").await;
    write_atomically(&file, &std::fs::read(guest("counter")).unwrap());
    running.wait_for("the swap", |s| s.reloaded == 1).await;
    let stats = running.stats();
    assert_eq!((stats.unloaded, stats.reloaded), (0, 1), "{stats:?}");
    let host = running.finish().await;
    assert_eq!(host.bots["count"].manifest.name, "counter");
    assert_eq!(
        host.bots["count"].status().name.as_deref(),
        Some("counter"),
        "same identity"
    );
    assert_eq!(server.state().agents().len(), 1, "no second identity");
    host.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_survives_a_reload() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let greeter = std::fs::read(example("greeter")).expect("greeter");
    let file = plugins(dir.path()).join("greeter.wasm");
    std::fs::write(&file, &greeter).expect("install");
    let mut config = config_for(&server.base_url(), dir.path());
    config
        .personas
        .entry("greeter".into())
        .or_default()
        .kv
        .allow = true;
    let mut events = server.state().subscribe();
    let running = Running::start(config).await;
    wait_joined(&mut events, "greeter", "lobby").await;

    server.state().join_room("bob", "lobby").expect("join");
    let welcome = wait_message(&mut events, Duration::from_secs(10), |m| {
        m.from == "greeter"
    })
    .await
    .expect("greeted");
    assert!(welcome.text.contains("bob"), "{}", welcome.text);

    // The same persona with an extra custom section: other bytes, a real reload,
    // a fresh instance that has nothing in memory.
    write_atomically(&file, &with_custom_section(&greeter, "roost-test", b"v2"));
    running.wait_for("the reload", |s| s.reloaded == 1).await;

    // bob is announced again: remembered through kv, not greeted twice; carol is new.
    let system = roost::protocol::SYSTEM_SENDER;
    server
        .state()
        .post_message(system, "lobby", "\u{26a1} bob joined #lobby.")
        .expect("post");
    server
        .state()
        .post_message(system, "lobby", "\u{26a1} carol joined #lobby.")
        .expect("post");
    let next = wait_message(&mut events, Duration::from_secs(10), |m| {
        m.from == "greeter"
    })
    .await
    .expect("greeted carol");
    assert!(
        next.text.contains("carol"),
        "bob greeted twice: {}",
        next.text
    );
    running.finish().await.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loads_from_the_compile_cache() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    install(dir.path(), &example("echo"), "echo");
    let config = config_for(&server.base_url(), dir.path());

    let host = BotHost::start(config.clone()).await.expect("start");
    let cold = host.reload_stats().snapshot();
    host.stop().await;
    let host = BotHost::start(config.clone()).await.expect("restart");
    let warm = host.reload_stats().snapshot();
    host.stop().await;

    let (cold, warm) = (
        cold.last_load.expect("loaded"),
        warm.last_load.expect("loaded"),
    );
    assert_eq!(cold.outcome, CacheOutcome::Miss);
    assert_eq!(warm.outcome, CacheOutcome::Hit);
    assert!(
        warm.took < cold.took,
        "a hit ({:?}) is faster than compiling ({:?})",
        warm.took,
        cold.took
    );

    // A corrupt entry is rebuilt, not trusted.
    let cache = dir.path().join("state").join("cache");
    let entry = std::fs::read_dir(&cache)
        .expect("cache dir")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .expect("a cache entry");
    let mut bytes = std::fs::read(&entry).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&entry, &bytes).expect("corrupt");
    let host = BotHost::start(config.clone()).await.expect("restart");
    assert_eq!(last_outcome(&host), CacheOutcome::Rebuilt);
    host.stop().await;
    let host = BotHost::start(config).await.expect("restart");
    assert_eq!(last_outcome(&host), CacheOutcome::Hit);
    host.stop().await;
    server.shutdown().await;
}

/// Where the host's last load got its compiled code from.
fn last_outcome(host: &BotHost) -> CacheOutcome {
    host.reload_stats()
        .snapshot()
        .last_load
        .expect("loaded")
        .outcome
}

/// `component` with a custom section appended: other bytes, the same behaviour.
pub fn with_custom_section(component: &[u8], name: &str, data: &[u8]) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(data);
    let mut out = component.to_vec();
    out.push(0);
    leb(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}
