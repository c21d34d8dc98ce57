//! Scenario 2: N echo bots in one `roost run` process, spread over rooms: time until
//! all are active, resident memory against a 1-bot baseline of the same process and
//! configuration, and a mention to random bots.
//!
//! The load generator joins every room before roost starts, so each bot's
//! `⚡ NAME joined #ROOM.` line reaches it the moment the server posts it: the join
//! times are exact and nothing polls roost during start-up. `/metrics` is read only
//! once every bot has joined (or the wait gave up), to confirm "active".
//!
//! The 1-bot run comes first and fills the compile cache in the state folder (every
//! bot is the same `echo.wasm`, hard-linked), so the N-bot run starts warm.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use rand::SeedableRng as _;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::chat::{Agent, Event, Http, joined_agent};
use crate::children::{self, Metrics};
use crate::load::{self, Seqs, Target};
use crate::proc::{Mem, Proc, link_or_copy};
use crate::{err_json, progress};

pub struct Plan {
    /// What the bots are (`echo`, `quizmaster`), for the progress lines.
    pub persona: &'static str,
    /// The persona does not echo `ping SEQ`: any answer counts.
    pub any_reply: bool,
    pub bots: usize,
    pub rooms: usize,
    /// Longest wait for every bot to join.
    pub wait_limit: Duration,
    /// Give up when no bot joined for this long.
    pub stall: Duration,
    /// Pause between "all active" and reading memory.
    pub settle: Duration,
    /// Bots mentioned once each after start-up.
    pub mentions: usize,
    /// An answer must come this fast...
    pub answer_within: Duration,
    /// ...and is waited for this long before it counts as lost.
    pub give_up_after: Duration,
    pub seed: u64,
    pub shutdown_grace: Duration,
}

fn bot_name(i: usize, width: usize) -> String {
    format!("e{i:0width$}")
}

fn room_of(i: usize, rooms: usize) -> String {
    format!("r{:02}", (i - 1) % rooms)
}

pub async fn run(plan: &Plan, work: &Path, wasm: &Path) -> Value {
    let (mut server, addr) = match children::serve("roost serve").await {
        Ok(s) => s,
        Err(e) => return err_json(&e),
    };
    progress(&format!("fleet of {}: roost serve on {addr}", plan.persona));
    let mut out = json!({
        "persona": plan.persona,
        "bots": plan.bots,
        "rooms": plan.rooms.min(plan.bots),
    });
    if let Err(e) = fleet(plan, work, wasm, addr, &server, &mut out).await {
        out["error"] = json!(format!("{e:#}"));
    }
    out["server"]["log"] = server.log_json();
    out["server"]["stop"] = server.stop(Duration::from_secs(10)).await;
    out
}

async fn fleet(
    plan: &Plan,
    work: &Path,
    wasm: &Path,
    addr: std::net::SocketAddr,
    server: &Proc,
    out: &mut Value,
) -> anyhow::Result<()> {
    let http = Http::new(addr)?;
    let rooms = plan.rooms.clamp(1, plan.bots.max(1));
    let width = plan.bots.to_string().len().max(4);
    let bots: Vec<(String, String)> = (1..=plan.bots)
        .map(|i| (bot_name(i, width), room_of(i, rooms)))
        .collect();

    let dir = work.join(format!("fleet-{}", plan.persona));
    let state = dir.join("state");
    let one = dir.join("plugins-1");
    let many = dir.join("plugins-n");
    for d in [&state, &one, &many] {
        std::fs::create_dir_all(d)?;
    }
    let t_files = Instant::now();
    for (i, (name, _)) in bots.iter().enumerate() {
        let file = format!("{name}.wasm");
        link_or_copy(wasm, &many.join(&file))?;
        if i == 0 {
            link_or_copy(wasm, &one.join(&file))?;
        }
    }
    let config = dir.join("roost.toml");
    std::fs::write(&config, children::config_toml(&bots))?;
    progress(&format!(
        "fleet: {} persona files and a roost.toml with {} [personas.*] in {:.1} s",
        plan.bots,
        plan.bots,
        t_files.elapsed().as_secs_f64()
    ));

    let mut loadgen = Agent::connect(&http, "loadgen").await?;
    let room_list: Vec<String> = (0..rooms).map(|r| format!("r{r:02}")).collect();
    loadgen.join(&room_list).await?;
    let room_by_name: HashMap<String, String> = bots.iter().cloned().collect();
    let mut seqs = Seqs::new();

    progress("fleet: 1-bot baseline (also fills the compile cache)");
    let first = vec![bots[0].0.clone()];
    let key = loadgen.key.clone();
    let ctx = Ctx {
        http: &http,
        key: &key,
        server_pid: server.pid(),
        dir: &dir,
        state: &state,
        config: &config,
        room_by_name: &room_by_name,
        room_list: &room_list,
    };
    let base = one_run(&ctx, &mut loadgen, &mut seqs, &one, &first, plan, 3).await;
    let cache_files = std::fs::read_dir(state.join("cache"))
        .map(|d| d.count())
        .unwrap_or(0);
    out["baseline"] = base.json;
    out["baseline"]["cache_files_after"] = json!(cache_files);

    progress(&format!("fleet: {} bots in one roost run", plan.bots));
    let names: Vec<String> = bots.iter().map(|(n, _)| n.clone()).collect();
    let n = one_run(
        &ctx,
        &mut loadgen,
        &mut seqs,
        &many,
        &names,
        plan,
        plan.mentions,
    )
    .await;
    out["all_bots"] = n.json;
    // Memory per bot: the N-bot process minus the 1-bot one, per bot that was up.
    let up = n.active.max(n.joined);
    if let (Some(b), Some(m)) = (base.mem, n.mem)
        && up > 0
    {
        let delta = m.rss_kib as f64 - b.rss_kib as f64;
        out["per_bot_kib"] = json!((delta / up as f64 * 10.0).round() / 10.0);
        out["per_bot_divided_by"] = json!(up);
    }
    out["bots_active"] = json!(n.active);
    let mut problems = Vec::new();
    for (what, v) in [
        ("baseline", &out["baseline"]),
        ("all_bots", &out["all_bots"]),
    ] {
        if let Some(e) = v["error"].as_str() {
            problems.push(format!("{what}: {e}"));
        }
    }
    if !problems.is_empty() {
        out["error"] = json!(problems.join("; "));
    }
    Ok(())
}

struct Ctx<'a> {
    http: &'a Http,
    /// A key for REST calls (the first load generator's).
    key: &'a str,
    /// `roost serve`, whose memory is read beside roost's.
    server_pid: Option<u32>,
    dir: &'a Path,
    state: &'a Path,
    config: &'a Path,
    room_by_name: &'a HashMap<String, String>,
    room_list: &'a [String],
}

struct RunResult {
    json: Value,
    mem: Option<Mem>,
    joined: u64,
    active: u64,
}

/// One `roost run` over `plugins` (the bots `names`): start, wait for every join,
/// confirm active, settle, read memory, mention `mentions` random bots, stop.
async fn one_run(
    ctx: &Ctx<'_>,
    loadgen: &mut Agent,
    seqs: &mut Seqs,
    plugins: &Path,
    names: &[String],
    plan: &Plan,
    mentions: usize,
) -> RunResult {
    let mut out = json!({"expected": names.len()});
    let mut result = RunResult {
        json: Value::Null,
        mem: None,
        joined: 0,
        active: 0,
    };
    let port = match crate::proc::free_port() {
        Ok(p) => p,
        Err(e) => {
            result.json = err_json(&e);
            return result;
        }
    };
    let t0 = Instant::now();
    let mut p = match children::run(
        "roost run",
        ctx.http.addr,
        ctx.dir,
        plugins,
        ctx.state,
        ctx.config,
        port,
    ) {
        Ok(p) => p,
        Err(e) => {
            result.json = err_json(&e);
            return result;
        }
    };
    let mut errors: Vec<String> = Vec::new();

    // 1. Every join, as the server posts it.
    let waited = wait_all_joined(ctx, loadgen, &mut p, names, plan, t0).await;
    let joined_at = match waited {
        Ok((j, why)) => {
            if let Some(why) = why {
                errors.push(why);
            }
            j
        }
        Err(e) => {
            errors.push(format!("{e:#}"));
            HashMap::new()
        }
    };
    result.joined = joined_at.len() as u64;
    let mut times: Vec<f64> = joined_at.values().copied().collect();
    times.sort_by(f64::total_cmp);
    let at_fraction = |q: f64| {
        let k = ((q * names.len() as f64).ceil() as usize).max(1);
        times.get(k - 1).map(|s| (s * 100.0).round() / 100.0)
    };
    out["bots_joined"] = json!(joined_at.len());
    out["first_joined_s"] = json!(at_fraction(0.0));
    out["half_joined_s"] = json!(at_fraction(0.5));
    out["all_joined_s"] = json!(at_fraction(1.0));
    if let Some((_, line)) = p.watched(children::RUNNING) {
        out["bots_started_per_log"] = json!(started_count(&line));
    }
    if let Some((count, line)) = p.watched(children::NOT_STARTED) {
        out["personas_not_started"] = json!(count);
        out["first_not_started"] = json!(line.chars().take(400).collect::<String>());
    }

    // 2. Active according to roost itself (/metrics is up once every file was tried).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    loop {
        if p.exited().is_some() {
            break;
        }
        if let Ok(m) = Metrics::scrape(ctx.http, port).await {
            let done = m.active() >= joined_at.len() as u64 && m.active() > 0;
            last = Some(m);
            if done {
                break;
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    result.active = last.as_ref().map_or(0, Metrics::active);
    out["bots_active"] = json!(result.active);
    out["connection_states"] = json!(last.as_ref().map(|m| m.states.clone()));
    if result.active == names.len() as u64 {
        out["all_active_s"] = json!((t0.elapsed().as_secs_f64() * 100.0).round() / 100.0);
    } else {
        errors.push(format!(
            "{} of {} bots active (/metrics), {} joined (server)",
            result.active,
            names.len(),
            joined_at.len()
        ));
    }
    // Cross-check with the server's membership lists.
    match server_members(ctx, names).await {
        Ok(k) => out["bots_in_rooms_per_server"] = json!(k),
        Err(e) => out["bots_in_rooms_per_server"] = json!(format!("{e:#}")),
    }

    // 3. Memory after a settle.
    tokio::time::sleep(plan.settle).await;
    result.mem = p.mem();
    out["mem"] = json!(result.mem.map(|m| m.to_json()));
    out["server_mem"] = json!(ctx.server_pid.and_then(Mem::of).map(|m| m.to_json()));

    // 4. Mentions to random joined bots, one at a time; then the same bots again
    //    (the first message a bot and its room-mates handle may cost more).
    if let Some(e) = p.died() {
        errors.push(format!("{e:#}"));
    } else if !joined_at.is_empty() && mentions > 0 {
        let mut pool: Vec<&String> = joined_at.keys().collect();
        pool.sort();
        let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
        let picks = rand::seq::index::sample(&mut rng, pool.len(), mentions.min(pool.len()));
        // Fewer bots than mentions (the baseline): the same bots again, in turn.
        let picks: Vec<usize> = picks.into_vec();
        let bots: Vec<String> = (0..mentions)
            .map(|k| pool[picks[k % picks.len()]].clone())
            .collect();
        for key in ["mentions", "mentions_again"] {
            let (m, problem) = mention_round(ctx, loadgen, seqs, &bots, plan).await;
            out[key] = m;
            if let Some(problem) = problem {
                errors.push(format!("{key}: {problem}"));
            }
        }
    }

    // 5. Counters, stop, log.
    if let Ok(m) = Metrics::scrape(ctx.http, port).await {
        out["metrics_totals"] = json!(m.sums);
    }
    out["stop"] = p.stop(plan.shutdown_grace).await;
    out["log"] = p.log_json();
    if !errors.is_empty() {
        out["error"] = json!(errors.join("; "));
    }
    result.json = out;
    result
}

/// Mentions each of `bots` once, in turn: latency summary, and what went wrong.
async fn mention_round(
    ctx: &Ctx<'_>,
    loadgen: &mut Agent,
    seqs: &mut Seqs,
    bots: &[String],
    plan: &Plan,
) -> (Value, Option<String>) {
    let mut rtts = Vec::new();
    let (mut within, mut late, mut lost) = (0u64, 0u64, Vec::new());
    let mut failed = None;
    for bot in bots {
        let room = ctx.room_by_name.get(bot).cloned().unwrap_or_default();
        let target = Target {
            bot: bot.clone(),
            room,
            any_reply: plan.any_reply,
        };
        let seq = load::next_seq(seqs);
        match load::mention_once(loadgen, &target, seq, plan.give_up_after).await {
            Ok(once) => match once.rtt_ms {
                Some(rtt) => {
                    rtts.push(rtt);
                    if rtt <= plan.answer_within.as_secs_f64() * 1e3 {
                        within += 1;
                    } else {
                        late += 1;
                    }
                }
                None => lost.push(bot.clone()),
            },
            Err(e) => {
                failed = Some(format!("{e:#}"));
                break;
            }
        }
    }
    let mut m = load::summary(rtts);
    m["asked"] = json!(bots.len());
    m["answered_within_limit"] = json!(within);
    m["limit_ms"] = json!(plan.answer_within.as_millis() as u64);
    m["late"] = json!(late);
    m["lost"] = json!(lost.len());
    let problem = if failed.is_some() {
        failed
    } else if !lost.is_empty() {
        m["lost_bots"] = json!(lost);
        Some(format!(
            "{} of {} mentions got no answer within {:?}",
            lost.len(),
            bots.len(),
            plan.give_up_after
        ))
    } else if late > 0 {
        Some(format!(
            "{late} of {} mentions were answered later than {:?}",
            bots.len(),
            plan.answer_within
        ))
    } else {
        None
    };
    (m, problem)
}

/// The `bots=N` of roost's "roost is running" line.
fn started_count(line: &str) -> Option<u64> {
    let at = line.find("bots=").map(|i| i + 5).or_else(|| {
        // JSON log format: "bots":N
        line.find("\"bots\":").map(|i| i + 7)
    })?;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Waits until every bot of `names` has joined its room, the time limit passes, no bot
/// joins for `plan.stall`, roost exits, or roost said it started fewer bots and all of
/// those joined. Returns the join time (s since `t0`) of each bot that joined, and why
/// the wait ended early.
async fn wait_all_joined(
    ctx: &Ctx<'_>,
    loadgen: &mut Agent,
    p: &mut Proc,
    names: &[String],
    plan: &Plan,
    t0: Instant,
) -> anyhow::Result<(HashMap<String, f64>, Option<String>)> {
    let expected: HashSet<&str> = names.iter().map(String::as_str).collect();
    let mut joined: HashMap<String, f64> = HashMap::new();
    let mut last_progress = Instant::now();
    let mut last_report = Instant::now();
    let mut events_ok = true;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_poll = Instant::now();
    let why = loop {
        tokio::select! {
            ev = loadgen.events.recv(), if events_ok => match ev {
                Some(Event::Msg { from, text, .. }) if from == "system" => {
                    if let Some(name) = joined_agent(&text)
                        && expected.contains(name)
                        && !joined.contains_key(name)
                    {
                        joined.insert(name.to_owned(), t0.elapsed().as_secs_f64());
                        last_progress = Instant::now();
                    }
                }
                Some(Event::Closed(why)) => {
                    progress(&format!("fleet: load generator dropped ({why}); polling the server instead"));
                    events_ok = false;
                }
                None => events_ok = false,
                Some(_) => {}
            },
            _ = tick.tick() => {
                if joined.len() == expected.len() {
                    break None;
                }
                if let Some(e) = p.died() {
                    break Some(format!("{e:#}"));
                }
                if !events_ok && last_poll.elapsed() >= Duration::from_secs(2) {
                    last_poll = Instant::now();
                    for name in members(ctx).await.unwrap_or_default() {
                        if expected.contains(name.as_str()) && !joined.contains_key(&name) {
                            joined.insert(name, t0.elapsed().as_secs_f64());
                            last_progress = Instant::now();
                        }
                    }
                }
                let started = p.watched(children::RUNNING).and_then(|(_, l)| started_count(&l));
                if let Some(k) = started
                    && (k as usize) < expected.len()
                    && joined.len() >= k as usize
                    && last_progress.elapsed() >= Duration::from_secs(3)
                {
                    break Some(format!(
                        "roost started {k} of {} bots; all {k} joined",
                        expected.len()
                    ));
                }
                if t0.elapsed() >= plan.wait_limit {
                    break Some(format!(
                        "{} of {} bots joined within {:?}",
                        joined.len(),
                        expected.len(),
                        plan.wait_limit
                    ));
                }
                if last_progress.elapsed() >= plan.stall {
                    break Some(format!(
                        "{} of {} bots joined, then none for {:?}",
                        joined.len(),
                        expected.len(),
                        plan.stall
                    ));
                }
                if last_report.elapsed() >= Duration::from_secs(10) {
                    last_report = Instant::now();
                    progress(&format!(
                        "fleet: {} of {} joined after {:.0} s",
                        joined.len(),
                        expected.len(),
                        t0.elapsed().as_secs_f64()
                    ));
                }
            }
        }
    };
    if !events_ok {
        // The mentions need a working load generator.
        let mut fresh = Agent::connect(ctx.http, "loadgen").await?;
        fresh.join(ctx.room_list).await?;
        *loadgen = fresh;
    }
    Ok((joined, why))
}

/// Every agent in the bench's rooms, per the server.
async fn members(ctx: &Ctx<'_>) -> anyhow::Result<Vec<String>> {
    let mut all = Vec::new();
    for room in ctx.room_list {
        all.extend(ctx.http.room_agents(ctx.key, room).await?);
    }
    Ok(all)
}

/// How many of `names` the server lists as members of their rooms.
async fn server_members(ctx: &Ctx<'_>, names: &[String]) -> anyhow::Result<usize> {
    let want: HashSet<&str> = names.iter().map(String::as_str).collect();
    Ok(members(ctx)
        .await?
        .iter()
        .filter(|n| want.contains(n.as_str()))
        .count())
}
