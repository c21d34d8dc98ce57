//! Several `roost run` processes sharing personas through PostgreSQL: leases split
//! the personas, a killed host's personas come back on another, a host paused past
//! its lease sends nothing when it wakes. These need a server: `ROOST_TEST_POSTGRES`
//! (a URL), run with `--ignored shared_store` (`.ci/run` starts one).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use roost::devserver::{DevServer, ServerEvent};
use roost::protocol::ChatMessage;
use roost::store::{PgOptions, Store};
use tokio::sync::broadcast;

use crate::guests::example;
use crate::support::{install, server};

const PERSONAS: usize = 20;
/// Generous bounds for a loaded machine; the measured times are printed.
const JOIN_WAIT: Duration = Duration::from_secs(90);
const MOVE_WAIT: Duration = Duration::from_secs(60);

fn pg_url() -> String {
    std::env::var("ROOST_TEST_POSTGRES")
        .expect("set ROOST_TEST_POSTGRES to a PostgreSQL URL (postgres://...)")
}

fn schema() -> String {
    format!("it_{}_{:08x}", std::process::id(), rand::random::<u32>())
}

fn label(i: usize) -> String {
    format!("p{i:02}")
}

/// A `roost run` child, killed when dropped.
struct Host {
    child: Child,
    log: PathBuf,
}

impl Host {
    fn start(dir: &Path, config: &Path, name: &str) -> Host {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_roost"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--state")
            .arg(dir.join(format!("state-{name}")))
            .env("ROOST_HOST_ID", name)
            .env("RUST_LOG", "roost=info")
            .env_remove("ROOST_STORE")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn roost run");
        Host { child, log }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plugins folder of `PERSONAS` echo bots and a roost.toml on the shared store.
fn setup(dir: &Path, server: &DevServer, schema: &str) -> PathBuf {
    let echo = example("echo");
    let mut toml = format!(
        "[server]\nurl = {:?}\n\n[paths]\nplugins = {:?}\n\n[store]\nurl = {:?}\nschema = {:?}\n\
         lease_renew_ms = 1000\nlease_ttl_ms = 4000\nhandover_per_tick = 2\n\n\
         [policy.limits]\nroom_per_minute = 10000\nroom_burst = 10000\nbot_per_minute = 10000\n\
         bot_burst = 10000\nroom_min_interval_ms = 0\n",
        server.base_url(),
        dir.join("plugins").display().to_string(),
        pg_url(),
        schema
    );
    for i in 0..PERSONAS {
        install(dir, &echo, &label(i));
        toml.push_str(&format!("\n[personas.{0}]\nname = \"{0}\"\n", label(i)));
    }
    let path = dir.join("roost.toml");
    std::fs::write(&path, toml).expect("write roost.toml");
    path
}

fn observer(schema: &str) -> Store {
    Store::open_postgres(
        &pg_url(),
        PgOptions {
            schema: Some(schema.into()),
        },
    )
    .expect("open the shared store")
}

/// Holder of each persona with a live lease.
fn holders(store: &Store) -> BTreeMap<String, String> {
    store
        .leases()
        .expect("leases")
        .into_iter()
        .filter(|l| !l.holder.is_empty() && l.expires_in_ms > 0)
        .map(|l| (l.persona, l.holder))
        .collect()
}

/// Waits until every agent in `agents` joined `lobby` (from the events seen).
async fn wait_joined(
    events: &mut broadcast::Receiver<ServerEvent>,
    agents: &BTreeSet<String>,
    within: Duration,
) -> Result<(), BTreeSet<String>> {
    let mut waiting = agents.clone();
    let _ = tokio::time::timeout(within, async {
        while !waiting.is_empty() {
            match events.recv().await {
                Ok(ServerEvent::Joined { agent, room }) if room == "lobby" => {
                    waiting.remove(&agent);
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
    })
    .await;
    if waiting.is_empty() {
        Ok(())
    } else {
        Err(waiting)
    }
}

/// Posts one mention to each of `personas` and collects every reply to them until
/// all were answered and `quiet` passed with nothing more (or `within` ran out).
async fn mentions_answered(
    server: &DevServer,
    events: &mut broadcast::Receiver<ServerEvent>,
    personas: &BTreeSet<String>,
    tag: &str,
    within: Duration,
    quiet: Duration,
) -> BTreeMap<String, usize> {
    let mut seen = Vec::new();
    mentions_answered_seeing(server, events, personas, tag, within, quiet, &mut seen).await
}

/// [`mentions_answered`], also keeping every chat message seen meanwhile in `seen`.
async fn mentions_answered_seeing(
    server: &DevServer,
    events: &mut broadcast::Receiver<ServerEvent>,
    personas: &BTreeSet<String>,
    tag: &str,
    within: Duration,
    quiet: Duration,
    seen: &mut Vec<ChatMessage>,
) -> BTreeMap<String, usize> {
    for p in personas {
        server
            .state()
            .post_message("ada", "lobby", &format!("@{p} {tag}-{p}"))
            .expect("post");
    }
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = Instant::now() + within;
    let mut last_needed: Option<Instant> = None;
    loop {
        let all = personas.iter().all(|p| answers.contains_key(p));
        let until = match (all, last_needed) {
            (true, Some(t)) => t + quiet,
            _ => deadline,
        };
        let now = Instant::now();
        if now >= until {
            break;
        }
        let event = tokio::time::timeout(until - now, events.recv()).await;
        if let Ok(Ok(ServerEvent::Message(m))) = &event {
            seen.push(m.clone());
        }
        match event {
            Ok(Ok(ServerEvent::Message(m))) if m.text.starts_with(&format!("{tag}-")) => {
                if personas.contains(&m.from) && m.text == format!("{tag}-{}", m.from) {
                    *answers.entry(m.from.clone()).or_default() += 1;
                    if personas.iter().all(|p| answers.contains_key(p)) && last_needed.is_none() {
                        last_needed = Some(Instant::now());
                    }
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                panic!("{n} server events missed: the counts would be wrong")
            }
            Ok(Err(_)) | Err(_) => break,
        }
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set ROOST_TEST_POSTGRES"]
async fn shared_store_kill_9_moves_personas_and_answers_each_mention_once() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let schema = schema();
    let config = setup(dir.path(), &server, &schema);
    let store = observer(&schema);
    let all: BTreeSet<String> = (0..PERSONAS).map(label).collect();
    let mut events = server.state().subscribe();

    let a = Host::start(dir.path(), &config, "host-a");
    let b = Host::start(dir.path(), &config, "host-b");
    if let Err(missing) = wait_joined(&mut events, &all, JOIN_WAIT).await {
        panic!(
            "not joined: {missing:?}\n--- a\n{}\n--- b\n{}",
            a.log(),
            b.log()
        );
    }
    // The split settles at 10/10, a few at a time.
    let settled = tokio::time::timeout(JOIN_WAIT, async {
        loop {
            let h = holders(&store);
            let on_a = h.values().filter(|v| *v == "host-a").count();
            if h.len() == PERSONAS && on_a == PERSONAS / 2 {
                return h;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no 10/10 split: {:?}", holders(&store)));
    let on_a: BTreeSet<String> = settled
        .iter()
        .filter(|(_, h)| *h == "host-a")
        .map(|(p, _)| p.clone())
        .collect();
    // Every persona answers once before anything happens.
    let before = mentions_answered(
        &server,
        &mut events,
        &all,
        "before",
        MOVE_WAIT,
        Duration::from_secs(1),
    )
    .await;
    assert!(
        before.values().all(|&n| n == 1) && before.len() == PERSONAS,
        "{before:?}"
    );

    // kill -9 host A, and mention its personas while they move.
    let killed = Instant::now();
    a.signal(libc::SIGKILL);
    let during = mentions_answered(
        &server,
        &mut events,
        &on_a,
        "during",
        MOVE_WAIT,
        Duration::from_secs(3),
    )
    .await;
    let moved_in = killed.elapsed();
    eprintln!(
        "failover: {} personas of the killed host answered on the other in {:.1}s (including 3s of quiet)",
        on_a.len(),
        moved_in.as_secs_f64()
    );
    let missing: Vec<&String> = on_a.iter().filter(|p| !during.contains_key(*p)).collect();
    assert!(
        missing.is_empty(),
        "not answered after the kill: {missing:?}\n--- b\n{}",
        b.log()
    );
    let twice: Vec<(&String, &usize)> = during.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "answered more than once: {twice:?}");
    let h = holders(&store);
    assert!(h.values().all(|v| v == "host-b"), "{h:?}");
    assert_eq!(h.len(), PERSONAS);
    drop(a);
    drop(b);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set ROOST_TEST_POSTGRES"]
async fn shared_store_a_host_paused_past_its_lease_sends_nothing_when_it_wakes() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let schema = schema();
    let config = setup(dir.path(), &server, &schema);
    let store = observer(&schema);
    let all: BTreeSet<String> = (0..PERSONAS).map(label).collect();
    let mut events = server.state().subscribe();

    let a = Host::start(dir.path(), &config, "host-a");
    if let Err(missing) = wait_joined(&mut events, &all, JOIN_WAIT).await {
        panic!("not joined: {missing:?}\n--- a\n{}", a.log());
    }
    let b = Host::start(dir.path(), &config, "host-b");
    // B joins; A hands some personas over, a few per renewal.
    let split = tokio::time::timeout(JOIN_WAIT, async {
        loop {
            let h = holders(&store);
            if h.values().filter(|v| *v == "host-b").count() == PERSONAS / 2 && h.len() == PERSONAS
            {
                return h;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no handover: {:?}\n--- a\n{}", holders(&store), a.log()));
    let on_a: BTreeSet<String> = split
        .iter()
        .filter(|(_, h)| *h == "host-a")
        .map(|(p, _)| p.clone())
        .collect();
    // Let the handed-over bots come up on B before pausing A.
    let _ = mentions_answered(
        &server,
        &mut events,
        &all,
        "warm",
        MOVE_WAIT,
        Duration::from_millis(500),
    )
    .await;

    // SIGSTOP A past its lease (ttl 4 s): B takes its personas.
    a.signal(libc::SIGSTOP);
    let moved = tokio::time::timeout(MOVE_WAIT, async {
        loop {
            let h = holders(&store);
            if on_a.iter().all(|p| h.get(p).is_some_and(|v| v == "host-b")) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        moved.is_ok(),
        "B did not take A's personas: {:?}",
        holders(&store)
    );
    // Mentions while A is stopped, then A continues: everything is answered once,
    // by B; A (whose sockets may still be open) writes nothing.
    let mut seen = Vec::new();
    let answered = {
        for p in &on_a {
            server
                .state()
                .post_message("ada", "lobby", &format!("@{p} paused-{p}"))
                .expect("post");
        }
        a.signal(libc::SIGCONT);
        mentions_answered_seeing(
            &server,
            &mut events,
            &on_a,
            "awake",
            MOVE_WAIT,
            Duration::from_secs(4),
            &mut seen,
        )
        .await
    };
    let twice: Vec<(&String, &usize)> = answered.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "answered more than once: {twice:?}");
    assert_eq!(
        answered.len(),
        on_a.len(),
        "{answered:?}\n--- b\n{}",
        b.log()
    );
    // The messages posted while A was stopped were answered exactly once too.
    let paused_replies = seen
        .iter()
        .filter(|m| m.text.starts_with("paused-") && m.text == format!("paused-{}", m.from))
        .fold(BTreeMap::<String, usize>::new(), |mut acc, m| {
            *acc.entry(m.text.clone()).or_default() += 1;
            acc
        });
    assert!(
        paused_replies.values().all(|&n| n == 1) && paused_replies.len() == on_a.len(),
        "{paused_replies:?} of {on_a:?}\n--- a\n{}\n--- b\n{}",
        a.log(),
        b.log()
    );
    // A noticed on waking that its leases were gone (it may take some back later,
    // under new epochs, as the split evens out again).
    let log_a = a.log();
    assert!(log_a.contains("lease lost"), "--- a\n{log_a}");
    drop(a);
    drop(b);
    server.shutdown().await;
}
