//! Data-plane benchmark: prints ONE JSON document on stdout, progress on stderr.
//!
//! ```text
//! cargo bench --bench dataplane                     # full run: ~1.5 min here, 10 at most
//! cargo bench --bench dataplane -- --quick          # ~15 s (200 bots)
//! cargo bench --bench dataplane -- --bots 1000 --only fleet
//! ```
//!
//! Everything runs against `roost serve` (a child process on a free loopback port)
//! and, where roost hosts the bots, `roost run` children built from the same binary:
//!
//! 1. **`replies`** — answers per second and latency. A load generator (an agent on
//!    the server, written here) mentions a bot with `@BOT ping SEQ` and matches the
//!    answers by SEQ: one at a time (latency p50/p99) and then with 64 in flight for a
//!    fixed duration or count (answers/s, plus latency under load). Mentions without
//!    an answer after a grace period are `lost`. Run against (a) `bare`: an echo bot
//!    in plain tokio-tungstenite inside this process (TCP_NODELAY, one write per
//!    answer), the floor; (b) `roost`: `roost run` hosting the example `echo`
//!    persona (`roost build plugins/echo`), every rate limit and the loop guard
//!    raised in a generated roost.toml; (c) `roost_with_shadow`: the same with a copy
//!    of echo listening as its shadow (`NAME.shadow.wasm`), so every mention is also
//!    shown to the shadow and compared. `ratio_roost_over_bare` divides (b) by (a),
//!    `ratio_shadow_over_roost` (c) by (b): the live bot's cost of a shadow.
//! 2. **`fleet`** — N echo bots (`--bots`, default 5000) in one `roost run`, over 100
//!    rooms: `e0001.wasm`… hard links of echo.wasm, one `[personas.eNNNN]` each
//!    (name and room). A 1-bot run of the same configuration comes first (baseline
//!    memory; it also fills the compile cache, so the N-bot run starts warm). Reports
//!    the time until every bot joined (the server's join lines, seen live by the load
//!    generator) and is active (`/metrics`), the roost process's VmRSS after that,
//!    memory per bot ((RSS_N − RSS_1) / bots up), and a mention to 20 random bots,
//!    each to be answered within 1 s. Partial start-ups are reported, not fatal
//!    (`bots_active`, `error`).
//! 3. **`pyfleet`** — the same with N copies (`--py-bots`, default 200) of the Python
//!    quiz master (`plugins/py-persona`, built with `roost build`, which needs
//!    componentize-py): every bot starts and answers a mention (any answer counts: it
//!    does not echo). Reported as `error` when it cannot be built.
//! 4. **`policy`** — policy cost per message ([`policy::run`]).
//! 5. **`store`** — the outbox write path: the group commit against one transaction per
//!    row, with `synchronous = NORMAL` and `FULL` ([`store::run`]).
//!
//! Options (arguments after `--`, or environment variables):
//!
//! | argument | env | default (quick) | |
//! |---|---|---|---|
//! | `--quick` | `DATAPLANE_QUICK=1` | off | smaller everything |
//! | `--bots N` | `DATAPLANE_BOTS` | 5000 (200) | bots in the fleet |
//! | `--py-bots N` | `DATAPLANE_PY_BOTS` | 200 (20) | Python bots in the Python fleet |
//! | `--rooms N` | `DATAPLANE_ROOMS` | 100 | rooms they are spread over |
//! | `--duration S` | `DATAPLANE_DURATION` | 10 (3) | pipelined phase, seconds |
//! | `--count N` | `DATAPLANE_COUNT` | unset | pipelined phase: N mentions instead (duration caps it) |
//! | `--in-flight N` | `DATAPLANE_IN_FLIGHT` | 64 | mentions outstanding when pipelined |
//! | `--samples N` | `DATAPLANE_SAMPLES` | 1000 (200) | one-at-a-time latency samples |
//! | `--mentions N` | `DATAPLANE_MENTIONS` | 20 | fleet bots mentioned after start-up |
//! | `--fleet-limit S` | `DATAPLANE_FLEET_LIMIT` | 300 (90) | longest wait for the fleet to join |
//! | `--stall S` | `DATAPLANE_STALL` | 60 (30) | give up when no bot joined for this long |
//! | `--timeout S` | `DATAPLANE_TIMEOUT` | 900 (300) | watchdog for the whole run (after the build) |
//! | `--seed N` | `DATAPLANE_SEED` | 1 | which bots are mentioned |
//! | `--only LIST` | `DATAPLANE_ONLY` | all | comma-separated: `replies,fleet,pyfleet,policy,store` |
//!
//! Every wait is bounded; every child gets SIGKILL when the bench ends, however it
//! ends (a guard's `Drop`, and a parent-death signal); files live in a temporary
//! folder. Failures are reported in the JSON (`error` fields), never as a panic.
//! The exit code is 0 when the JSON was printed, 2 for bad arguments, 3 when the
//! watchdog fired (the JSON then holds what was measured so far).

mod chat;
mod children;
mod fleet;
mod load;
mod policy;
mod proc;
mod replies;
mod store;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::proc::lock;

static START: OnceLock<Instant> = OnceLock::new();

/// One progress line on stderr.
pub fn progress(msg: &str) {
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[dataplane {t:6.1}s] {msg}");
}

/// `{"error": "..."}` for a failed phase.
pub fn err_json(e: &anyhow::Error) -> Value {
    json!({"error": format!("{e:#}")})
}

const PHASES: [&str; 5] = ["replies", "fleet", "pyfleet", "policy", "store"];

struct Opts {
    quick: bool,
    bots: usize,
    py_bots: usize,
    rooms: usize,
    duration: Duration,
    count: Option<u64>,
    in_flight: usize,
    samples: usize,
    mentions: usize,
    fleet_limit: Duration,
    stall: Duration,
    timeout: Duration,
    seed: u64,
    only: Vec<String>,
}

const USAGE: &str = "usage: cargo bench --bench dataplane -- [--quick] [--bots N] [--py-bots N] [--rooms N] \
[--duration S] [--count N] [--in-flight N] [--samples N] [--mentions N] [--fleet-limit S] \
[--stall S] [--timeout S] [--seed N] [--only replies,fleet,pyfleet,policy,store]";

fn parse_opts() -> Result<Opts, String> {
    // (flag, env) pairs; flags win over the environment.
    let mut raw: std::collections::HashMap<&'static str, String> = Default::default();
    const KEYS: [(&str, &str); 14] = [
        ("--quick", "DATAPLANE_QUICK"),
        ("--bots", "DATAPLANE_BOTS"),
        ("--py-bots", "DATAPLANE_PY_BOTS"),
        ("--rooms", "DATAPLANE_ROOMS"),
        ("--duration", "DATAPLANE_DURATION"),
        ("--count", "DATAPLANE_COUNT"),
        ("--in-flight", "DATAPLANE_IN_FLIGHT"),
        ("--samples", "DATAPLANE_SAMPLES"),
        ("--mentions", "DATAPLANE_MENTIONS"),
        ("--fleet-limit", "DATAPLANE_FLEET_LIMIT"),
        ("--stall", "DATAPLANE_STALL"),
        ("--timeout", "DATAPLANE_TIMEOUT"),
        ("--seed", "DATAPLANE_SEED"),
        ("--only", "DATAPLANE_ONLY"),
    ];
    for (flag, env) in KEYS {
        if let Ok(v) = std::env::var(env)
            && !v.is_empty()
        {
            raw.insert(flag, v);
        }
    }
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        match flag.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "-h" | "--help" => return Err(String::new()),
            "--quick" => {
                raw.insert("--quick", "1".into());
            }
            f => {
                let Some((key, _)) = KEYS.iter().find(|(k, _)| *k == f) else {
                    if f.starts_with('-') {
                        return Err(format!("unknown option {f}"));
                    }
                    eprintln!("dataplane: ignoring the argument {f:?}");
                    continue;
                };
                let value = match inline {
                    Some(v) => v,
                    None => args.next().ok_or_else(|| format!("{f} needs a value"))?,
                };
                raw.insert(key, value);
            }
        }
    }
    let quick = raw.get("--quick").is_some_and(|v| v != "0");
    fn num<T: std::str::FromStr>(
        raw: &std::collections::HashMap<&'static str, String>,
        key: &str,
        default: T,
    ) -> Result<T, String> {
        match raw.get(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| format!("{key}: not a number: {v:?}")),
        }
    }
    let secs = |key: &str, full: f64, quick_v: f64| -> Result<Duration, String> {
        let v: f64 = num(&raw, key, if quick { quick_v } else { full })?;
        Duration::try_from_secs_f64(v).map_err(|_| format!("{key}: not a duration: {v}"))
    };
    let only = match raw.get("--only") {
        None => PHASES.iter().map(|s| (*s).to_owned()).collect(),
        Some(list) => {
            let v: Vec<String> = list.split(',').map(|s| s.trim().to_owned()).collect();
            if let Some(bad) = v.iter().find(|p| !PHASES.contains(&p.as_str())) {
                return Err(format!("--only: unknown phase {bad:?} (have {PHASES:?})"));
            }
            v
        }
    };
    let opts = Opts {
        quick,
        bots: num(&raw, "--bots", if quick { 200 } else { 5000 })?,
        py_bots: num(&raw, "--py-bots", if quick { 20 } else { 200 })?,
        rooms: num(&raw, "--rooms", 100)?,
        duration: secs("--duration", 10.0, 3.0)?,
        count: raw
            .get("--count")
            .map(|v| v.trim().parse().map_err(|_| format!("--count: {v:?}")))
            .transpose()?,
        in_flight: num(&raw, "--in-flight", 64)?,
        samples: num(&raw, "--samples", if quick { 200 } else { 1000 })?,
        mentions: num(&raw, "--mentions", 20)?,
        fleet_limit: secs("--fleet-limit", 300.0, 90.0)?,
        stall: secs("--stall", 60.0, 30.0)?,
        timeout: secs("--timeout", 900.0, 300.0)?,
        seed: num(&raw, "--seed", 1)?,
        only,
    };
    if opts.bots == 0 || opts.py_bots == 0 || opts.rooms == 0 || opts.in_flight == 0 {
        return Err("--bots, --py-bots, --rooms and --in-flight must be above zero".into());
    }
    Ok(opts)
}

/// The fleet phase's plan for `bots` copies of `persona`: `echo` answers `ping SEQ`
/// with it; any other persona's answer counts as one, and gets longer to come.
fn fleet_plan(opts: &Opts, persona: &'static str, bots: usize) -> fleet::Plan {
    let echo = persona == "echo";
    fleet::Plan {
        persona,
        any_reply: !echo,
        bots,
        rooms: opts.rooms,
        wait_limit: opts.fleet_limit,
        stall: opts.stall,
        settle: Duration::from_secs(if opts.quick { 1 } else { 3 }),
        mentions: opts.mentions,
        answer_within: Duration::from_secs(1),
        give_up_after: Duration::from_secs(if echo { 3 } else { 5 }),
        seed: opts.seed,
        shutdown_grace: Duration::from_secs(30),
    }
}

/// Prints the report once (the watchdog and the normal end race for it).
fn print_once(report: &Mutex<Value>, printed: &AtomicBool) -> bool {
    if printed.swap(true, Ordering::SeqCst) {
        return false;
    }
    let text = serde_json::to_string_pretty(&*lock(report)).unwrap_or_else(|e| {
        json!({"bench": "dataplane", "error": format!("cannot encode the report: {e}")}).to_string()
    });
    println!("{text}");
    true
}

fn main() -> ExitCode {
    START.get_or_init(Instant::now);
    let opts = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("dataplane: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let open_files = proc::raise_open_files();
    let report = Arc::new(Mutex::new(json!({
        "bench": "dataplane",
        "mode": if opts.quick { "quick" } else { "full" },
        "params": {
            "bots": opts.bots,
            "py_bots": opts.py_bots,
            "rooms": opts.rooms,
            "pipelined_duration_s": opts.duration.as_secs_f64(),
            "pipelined_count": opts.count,
            "in_flight": opts.in_flight,
            "latency_samples": opts.samples,
            "fleet_mentions": opts.mentions,
            "phases": opts.only,
        },
        "machine": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
            "open_files_limit": open_files,
            "loadavg_1m_start": proc::loadavg(),
        },
    })));
    let printed = Arc::new(AtomicBool::new(false));
    let work = match tempfile::Builder::new()
        .prefix("roost-dataplane-")
        .tempdir()
    {
        Ok(w) => w,
        Err(e) => {
            lock(&report)["error"] = json!(format!("cannot make a temporary folder: {e}"));
            print_once(&report, &printed);
            return ExitCode::SUCCESS;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            lock(&report)["error"] = json!(format!("cannot start tokio: {e}"));
            print_once(&report, &printed);
            return ExitCode::SUCCESS;
        }
    };
    let wants = |phase: &str| opts.only.iter().any(|p| p == phase);

    // The echo persona, through the binary as a user would build it.
    let echo = work.path().join("echo.wasm");
    let built = if wants("replies") || wants("fleet") {
        progress("building plugins/echo with `roost build` (first time: a minute or two)");
        let b = rt.block_on(children::build_echo(&echo, Duration::from_secs(900)));
        let v = b.as_ref().map_or_else(err_json, Clone::clone);
        lock(&report)["build"] = v;
        b.is_ok()
    } else {
        false
    };

    // Watchdog: past the limit, print what there is and exit; the children die with
    // us (parent-death signal).
    {
        let (report, printed) = (report.clone(), printed.clone());
        let limit = opts.timeout;
        let dir = work.path().to_owned();
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            lock(&report)["error"] =
                json!(format!("watchdog: the bench ran longer than {limit:?}"));
            if print_once(&report, &printed) {
                let _ = std::fs::remove_dir_all(&dir);
                std::process::exit(3);
            }
        });
    }

    if wants("replies") {
        let v = if built {
            let plan = replies::Plan {
                warmup: if opts.quick { 20 } else { 100 },
                seq: load::SeqPlan {
                    samples: opts.samples,
                    answer_within: Duration::from_secs(2),
                    max_time: Duration::from_secs(if opts.quick { 20 } else { 60 }),
                    max_consecutive_lost: 5,
                },
                pipe: load::PipePlan {
                    in_flight: opts.in_flight,
                    duration: opts.duration,
                    count: opts.count,
                    expire_after: Duration::from_secs(5),
                    grace: Duration::from_secs(3),
                },
            };
            rt.block_on(replies::run(&plan, work.path(), &echo))
        } else {
            json!({"error": "skipped: echo.wasm was not built"})
        };
        lock(&report)["replies"] = v;
    }

    if wants("fleet") {
        let v = if built {
            let plan = fleet_plan(&opts, "echo", opts.bots);
            rt.block_on(fleet::run(&plan, work.path(), &echo))
        } else {
            json!({"error": "skipped: echo.wasm was not built"})
        };
        lock(&report)["fleet"] = v;
    }

    if wants("pyfleet") {
        progress("pyfleet: building plugins/py-persona with `roost build` (needs componentize-py)");
        let quiz = work.path().join("quizmaster.wasm");
        let v = match rt.block_on(children::build_persona(
            "plugins/py-persona",
            "quizmaster",
            &quiz,
            Duration::from_secs(900),
        )) {
            Err(e) => json!({"error": format!("skipped: the quiz master was not built: {e:#}")}),
            Ok(build) => {
                let plan = fleet_plan(&opts, "quizmaster", opts.py_bots);
                let mut v = rt.block_on(fleet::run(&plan, work.path(), &quiz));
                v["build"] = build;
                v
            }
        };
        lock(&report)["pyfleet"] = v;
    }
    rt.shutdown_timeout(Duration::from_secs(5));

    if wants("policy") {
        progress("policy: cost per message");
        let v = match std::panic::catch_unwind(policy::run) {
            Ok(v) => v,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned());
                json!({"error": format!("policy::run panicked: {msg}")})
            }
        };
        lock(&report)["policy"] = v;
    }

    if wants("store") {
        progress("store: group commit against a transaction per row");
        let quick = opts.quick;
        let v = match std::panic::catch_unwind(move || store::run(quick)) {
            Ok(v) => v,
            Err(_) => json!({"error": "store::run panicked"}),
        };
        lock(&report)["store"] = v;
    }

    {
        let mut r = lock(&report);
        r["machine"]["loadavg_1m_end"] = json!(proc::loadavg());
        r["duration_s"] = json!((started.elapsed().as_secs_f64() * 10.0).round() / 10.0);
    }
    print_once(&report, &printed);
    progress("done");
    ExitCode::SUCCESS
}
