//! Hot-reload benchmark: prints one JSON object.
//!
//! - **Reload latency**: a host serving `echo` from a watched folder against the local
//!   chat server, with one agent mentioning it every 10 ms. Each round writes a new
//!   version (alternately `echo-v2`, whose answers start with `v2: `, and `echo`, each
//!   with a unique custom section so that it is new to the compile cache) through a
//!   temporary file and a rename, and waits for the first answer from the new
//!   version. Reported as medians over the rounds:
//!   `settled_to_answer_ms` (the host judged the file settled → the first answer from
//!   the new version reached the server: compile, check, describe, swap, one call and
//!   the reply's trip), `settled_to_installed_ms` (→ the worker installed it),
//!   `write_to_answer_ms` (the rename → the first answer; adds the debounce time,
//!   `debounce_ms`). The `cached_*` figures repeat the rounds with versions already
//!   in the cache (a file returning to an earlier version).
//! - **Start-up of 10 personas**: ten distinct copies of `echo` (unique custom
//!   sections), started by `BotHost::start` with an empty compile cache (`cold`) and
//!   again with the cache filled (`warm`), identities already registered in both, so
//!   the cache is the only difference. `startup_ms`: `BotHost::start` (load, check,
//!   describe and session start of every persona); `load_ms`: the loading part alone;
//!   `all_joined_ms`: until the server saw all ten join the lobby.
//!
//! Run with `cargo bench --bench reload` (builds plugins/echo and tests/guests/echo-v2
//! first).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use roost::bot::host::BotHost;
use roost::config::Config;
use roost::devserver::{self, DevServer, ServerConfig, ServerEvent};
use tokio::sync::{broadcast, oneshot};

const ROUNDS: usize = 8;
const PERSONAS: usize = 10;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn build(project: &str, out: &Path) -> Vec<u8> {
    let opts = roost::build::BuildOptions {
        path: root().join(project),
        output: Some(out.to_path_buf()),
    };
    let wasm =
        roost::build::build_persona(&opts).unwrap_or_else(|e| panic!("build {project}: {e}"));
    std::fs::read(wasm).expect("read component")
}

/// `component` with a custom section appended: other bytes, the same behaviour.
fn with_custom_section(component: &[u8], name: &str, data: &[u8]) -> Vec<u8> {
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

fn write_atomically(to: &Path, bytes: &[u8]) {
    let tmp = to.with_file_name(".bench.tmp");
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::rename(&tmp, to).expect("rename");
}

fn config_for(server: &str, dir: &Path) -> Config {
    let mut c = Config::default();
    c.server.url = server.to_string();
    c.paths.plugins = dir.join("plugins");
    c.paths.state = dir.join("state");
    let l = &mut c.policy.limits;
    l.room_per_minute = 1_000_000;
    l.room_burst = 1_000_000;
    l.bot_per_minute = 1_000_000;
    l.bot_burst = 1_000_000;
    l.room_min_interval_ms = 0;
    c.policy.loop_guard.max_exchanges = 1_000_000;
    c.policy.loop_guard.repeat_history = 0;
    c
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = if v.is_empty() {
        f64::NAN
    } else if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (m * 100.0).round() / 100.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn wait_joined(events: &mut broadcast::Receiver<ServerEvent>, agents: &[String]) {
    let mut missing: std::collections::BTreeSet<&str> = agents.iter().map(String::as_str).collect();
    tokio::time::timeout(Duration::from_secs(60), async {
        while !missing.is_empty() {
            match events.recv().await {
                Ok(ServerEvent::Joined { agent, room }) if room == "lobby" => {
                    missing.remove(agent.as_str());
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("server gone"),
            }
        }
    })
    .await
    .expect("every persona joined");
}

/// One round: writes `bytes`, mentions echo every 10 ms until an answer with (or,
/// for `v2 == false`, without) the `v2: ` prefix arrives. Returns (settled → answer,
/// settled → installed, write → answer).
async fn reload_round(
    server: &DevServer,
    stats: &roost::bot::stats::ReloadStats,
    file: &Path,
    bytes: &[u8],
    v2: bool,
    round: usize,
) -> (f64, f64, f64) {
    let mut events = server.state().subscribe();
    let before = stats.snapshot().reloaded;
    write_atomically(file, bytes);
    let written = Instant::now();
    let deadline = written + Duration::from_secs(60);
    let mut k = 0;
    let answered = loop {
        let probe = format!("r{round}-{k}");
        server
            .state()
            .post_message("ada", "lobby", &format!("@echo {probe}"))
            .expect("post");
        k += 1;
        let tick = Instant::now() + Duration::from_millis(10);
        let mut found = None;
        while let Ok(Ok(ev)) = tokio::time::timeout_at(tick.into(), events.recv()).await {
            if let ServerEvent::Message(m) = ev
                && m.from == "echo"
                && m.text.starts_with("v2: ") == v2
                && m.text.contains(&format!("r{round}-"))
            {
                found = Some(Instant::now());
                break;
            }
        }
        if let Some(t) = found {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "round {round}: no answer from the new version"
        );
    };
    // The installed report is written right after the swap; wait for it.
    while stats.snapshot().reloaded <= before {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let s = stats.snapshot();
    let settled = s.last_reload_settled_at.expect("settled");
    (
        ms(answered.saturating_duration_since(settled)),
        ms(s.last_reload_latency.expect("latency")),
        ms(answered - written),
    )
}

async fn reload_latency(echo: &[u8], v2: &[u8]) -> serde_json::Value {
    let server = devserver::spawn("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .expect("server");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("plugins")).expect("mkdir");
    let file = dir.path().join("plugins/echo.wasm");
    std::fs::write(&file, echo).expect("install");
    let config = config_for(&server.base_url(), dir.path());
    let debounce_ms = config.reload.debounce_ms;
    let mut events = server.state().subscribe();
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
    wait_joined(&mut events, &["echo".to_string()]).await;

    let versions: Vec<(Vec<u8>, bool)> = (0..ROUNDS)
        .map(|i| {
            let (base, is_v2) = if i % 2 == 0 {
                (v2, true)
            } else {
                (echo, false)
            };
            (
                with_custom_section(base, "roost-bench", format!("round {i}").as_bytes()),
                is_v2,
            )
        })
        .collect();
    let (mut answer, mut installed, mut write) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (bytes, is_v2)) in versions.iter().enumerate() {
        let (a, s, w) = reload_round(&server, &stats, &file, bytes, *is_v2, i).await;
        answer.push(a);
        installed.push(s);
        write.push(w);
    }
    // Versions the cache has seen: the file returns to earlier versions. (The last
    // round installed versions[ROUNDS - 1]; start with one of the other kind.)
    let hits_before = stats.snapshot().cache_hits;
    let (mut c_answer, mut c_installed, mut c_write) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (bytes, is_v2)) in versions.iter().enumerate().take(ROUNDS - 1) {
        let (a, s, w) = reload_round(&server, &stats, &file, bytes, *is_v2, ROUNDS + i).await;
        c_answer.push(a);
        c_installed.push(s);
        c_write.push(w);
    }
    let cache_hits = stats.snapshot().cache_hits - hits_before;

    let _ = stop.send(());
    task.await.expect("reloader").stop().await;
    server.shutdown().await;
    serde_json::json!({
        "rounds": ROUNDS,
        "debounce_ms": debounce_ms,
        "settled_to_answer_ms": median(answer),
        "settled_to_installed_ms": median(installed),
        "write_to_answer_ms": median(write),
        "cached_rounds": ROUNDS - 1,
        "cached_cache_hits": cache_hits,
        "cached_settled_to_answer_ms": median(c_answer),
        "cached_settled_to_installed_ms": median(c_installed),
        "cached_write_to_answer_ms": median(c_write),
    })
}

/// One start of the ten personas: (startup, load, all joined) in ms, and the cache
/// hits.
async fn start_all(server: &DevServer, config: &Config, names: &[String]) -> (f64, f64, f64, u64) {
    let mut events = server.state().subscribe();
    let started = Instant::now();
    let host = BotHost::start(config.clone()).await.expect("start");
    let startup = started.elapsed();
    assert_eq!(host.bots.len(), names.len(), "every persona started");
    wait_joined(&mut events, names).await;
    let joined = started.elapsed();
    let s = host.reload_stats().snapshot();
    host.stop().await;
    (ms(startup), ms(s.load_time_total), ms(joined), s.cache_hits)
}

async fn startup(echo: &[u8]) -> serde_json::Value {
    let server = devserver::spawn("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .expect("server");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("plugins")).expect("mkdir");
    let mut config = config_for(&server.base_url(), dir.path());
    config.reload.enabled = false;
    let mut names = Vec::new();
    for i in 0..PERSONAS {
        let label = format!("p{i}");
        let bytes = with_custom_section(echo, "roost-bench", label.as_bytes());
        std::fs::write(dir.path().join(format!("plugins/{label}.wasm")), bytes).expect("write");
        let name = format!("echo-{label}");
        config.personas.entry(label).or_default().name = Some(name.clone());
        names.push(name);
    }
    // Register every identity once, then empty the cache: cold and warm differ only
    // in the cache.
    start_all(&server, &config, &names).await;
    let cache = dir.path().join("state/cache");
    std::fs::remove_dir_all(&cache).expect("empty the cache");
    let (cold_start, cold_load, cold_joined, cold_hits) = start_all(&server, &config, &names).await;
    let (warm_start, warm_load, warm_joined, warm_hits) = start_all(&server, &config, &names).await;
    server.shutdown().await;
    let round = |x: f64| (x * 100.0).round() / 100.0;
    serde_json::json!({
        "personas": PERSONAS,
        "cold": { "startup_ms": round(cold_start), "load_ms": round(cold_load), "all_joined_ms": round(cold_joined), "cache_hits": cold_hits },
        "warm": { "startup_ms": round(warm_start), "load_ms": round(warm_load), "all_joined_ms": round(warm_joined), "cache_hits": warm_hits },
        "startup_cold_over_warm": round(cold_start / warm_start),
        "load_cold_over_warm": round(cold_load / warm_load),
    })
}

fn main() {
    let out = tempfile::tempdir().expect("tempdir");
    let echo = build("plugins/echo", &out.path().join("echo.wasm"));
    let v2 = build("tests/guests/echo-v2", &out.path().join("echo-v2.wasm"));
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let report = tokio.block_on(async {
        let reload = reload_latency(&echo, &v2).await;
        let startup = startup(&echo).await;
        serde_json::json!({
            "bench": "reload",
            "component_bytes": echo.len(),
            "reload": reload,
            "startup_10_personas": startup,
        })
    });
    println!("{report}");
}
