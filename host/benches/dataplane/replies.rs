//! Scenario 1: answers per second and latency through `roost serve`, for the bare
//! echo bot (the floor) and for `roost run` hosting the example `echo` persona.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::chat::{Agent, BareEcho, Event, Http, joined_agent};
use crate::children::{self, Metrics};
use crate::load::{self, PipePlan, SeqPlan, Seqs, Target};
use crate::proc::{Proc, link_or_copy, ms};
use crate::{err_json, progress};

pub struct Plan {
    /// Unreported mentions before measuring.
    pub warmup: usize,
    pub seq: SeqPlan,
    pub pipe: PipePlan,
}

pub async fn run(plan: &Plan, work: &Path, echo_wasm: &Path) -> Value {
    let (mut server, addr) = match children::serve("roost serve").await {
        Ok(s) => s,
        Err(e) => return err_json(&e),
    };
    progress(&format!("replies: roost serve on {addr}"));
    let mut out = json!({});
    match Http::new(addr) {
        Err(e) => out["error"] = err_json(&e)["error"].clone(),
        Ok(http) => {
            let mut seqs = Seqs::new();
            match Agent::connect(&http, "loadgen").await {
                Err(e) => out["error"] = json!(format!("load generator: {e:#}")),
                Ok(mut loadgen) => {
                    out["bare"] = bare(&http, &mut loadgen, plan, &mut seqs)
                        .await
                        .unwrap_or_else(|e| err_json(&e));
                    out["roost"] =
                        hosted(&http, &mut loadgen, plan, &mut seqs, work, echo_wasm, false)
                            .await
                            .unwrap_or_else(|e| err_json(&e));
                    out["roost_with_shadow"] =
                        hosted(&http, &mut loadgen, plan, &mut seqs, work, echo_wasm, true)
                            .await
                            .unwrap_or_else(|e| err_json(&e));
                }
            }
        }
    }
    out["ratio_roost_over_bare"] = ratios(&out, "roost", "bare");
    out["ratio_shadow_over_roost"] = ratios(&out, "roost_with_shadow", "roost");
    out["server"] = json!({
        "mem": server.mem().map(|m| m.to_json()),
        "log": server.log_json(),
        "stop": server.stop(Duration::from_secs(10)).await,
    });
    out
}

/// `measured / baseline` for throughput and latency, both runs of this process.
fn ratios(out: &Value, measured: &str, baseline: &str) -> Value {
    let ratio = |path: &[&str]| {
        let get = |who: &str| {
            let mut v = &out[who];
            for p in path {
                v = &v[*p];
            }
            v.as_f64()
        };
        match (get(measured), get(baseline)) {
            (Some(r), Some(b)) if b > 0.0 => json!((r / b * 1000.0).round() / 1000.0),
            _ => Value::Null,
        }
    };
    json!({
        "answers_per_s": ratio(&["throughput", "answers_per_s"]),
        "latency_p50": ratio(&["latency", "p50_ms"]),
        "latency_p99": ratio(&["latency", "p99_ms"]),
    })
}

/// Warm-up, one-at-a-time latency, then pipelined throughput against `target`.
async fn measure(
    loadgen: &mut Agent,
    target: &Target,
    plan: &Plan,
    seqs: &mut Seqs,
) -> anyhow::Result<Value> {
    let warm = SeqPlan {
        samples: plan.warmup,
        ..plan.seq
    };
    let warm = load::sequential(loadgen, target, &warm, seqs).await?;
    progress(&format!(
        "replies: {}: latency ({} mentions, one at a time)",
        target.bot, plan.seq.samples
    ));
    let latency = load::sequential(loadgen, target, &plan.seq, seqs).await?;
    progress(&format!(
        "replies: {}: throughput ({} in flight, {:?})",
        target.bot, plan.pipe.in_flight, plan.pipe.duration
    ));
    let throughput = load::pipelined(loadgen, target, &plan.pipe, seqs).await?;
    progress(&format!(
        "replies: {}: {} answers/s, p50 {} ms, lost {}",
        target.bot, throughput["answers_per_s"], latency["p50_ms"], throughput["lost"]
    ));
    Ok(json!({
        "warmup_answered": warm["answered"],
        "latency": latency,
        "throughput": throughput,
    }))
}

async fn bare(
    http: &Http,
    loadgen: &mut Agent,
    plan: &Plan,
    seqs: &mut Seqs,
) -> anyhow::Result<Value> {
    let room = "floor".to_owned();
    let bot = BareEcho::start(http, "bare-echo", &room).await?;
    loadgen.join(std::slice::from_ref(&room)).await?;
    let target = Target {
        bot: bot.name.clone(),
        room,
        any_reply: false,
    };
    let out = measure(loadgen, &target, plan, seqs).await;
    drop(bot);
    out
}

/// Waits until the server has posted `NAME joined #room` for a name starting with
/// `prefix`, watching `proc` for an early exit. Returns the name.
pub async fn wait_joined(
    loadgen: &mut Agent,
    proc: &mut Proc,
    prefix: &str,
    room: &str,
    limit: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + limit;
    let suffix = format!(" joined #{room}.");
    loop {
        if let Some(e) = proc.died() {
            return Err(e);
        }
        let tick = (Instant::now() + Duration::from_millis(200)).min(deadline);
        match tokio::time::timeout_at(tick, loadgen.events.recv()).await {
            Err(_) if Instant::now() >= deadline => {
                anyhow::bail!("{prefix} did not join #{room} within {limit:?}")
            }
            Err(_) => {}
            Ok(None) => anyhow::bail!("the load generator's event stream ended"),
            Ok(Some(Event::Closed(why))) => anyhow::bail!("load generator: {why}"),
            Ok(Some(Event::Msg { from, text, .. })) if from == "system" => {
                if text.ends_with(&suffix)
                    && let Some(name) = joined_agent(&text)
                    && name.starts_with(prefix)
                {
                    return Ok(name.to_owned());
                }
            }
            Ok(Some(_)) => {}
        }
    }
}

/// `roost run` hosting the echo persona; with `shadow`, a copy of it listens beside it
/// as its shadow (`LABEL.shadow.wasm`), so every mention is also compared.
async fn hosted(
    http: &Http,
    loadgen: &mut Agent,
    plan: &Plan,
    seqs: &mut Seqs,
    work: &Path,
    echo_wasm: &Path,
    shadow: bool,
) -> anyhow::Result<Value> {
    let (label, room, dir) = if shadow {
        (
            "roost-shadowed",
            "bench-shadow",
            work.join("replies-shadow"),
        )
    } else {
        ("roost-echo", "bench", work.join("replies"))
    };
    let room = room.to_owned();
    let (plugins, state) = (dir.join("plugins"), dir.join("state"));
    std::fs::create_dir_all(&plugins)?;
    std::fs::create_dir_all(&state)?;
    link_or_copy(echo_wasm, &plugins.join(format!("{label}.wasm")))?;
    if shadow {
        link_or_copy(echo_wasm, &plugins.join(format!("{label}.shadow.wasm")))?;
    }
    let config = dir.join("roost.toml");
    std::fs::write(
        &config,
        children::config_toml(&[(label.to_owned(), room.clone())]),
    )?;
    loadgen.join(std::slice::from_ref(&room)).await?;

    let port = crate::proc::free_port()?;
    let t0 = Instant::now();
    let mut p = children::run(
        "roost run",
        http.addr,
        &dir,
        &plugins,
        &state,
        &config,
        port,
    )?;
    progress("replies: roost run started, waiting for the echo bot to join");
    let name = wait_joined(loadgen, &mut p, label, &room, Duration::from_secs(60)).await?;
    let joined_ms = ms(t0.elapsed());
    // Joined is not yet active (missed messages are recovered first): wait for the
    // session to say so.
    let deadline = Instant::now() + Duration::from_secs(20);
    let active_ms = loop {
        if let Ok(m) = Metrics::scrape(http, port).await
            && m.active() >= 1
        {
            break Some(ms(t0.elapsed()));
        }
        if Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let target = Target {
        bot: name,
        room,
        any_reply: false,
    };
    let measured = measure(loadgen, &target, plan, seqs).await;
    let metrics = Metrics::scrape(http, port).await;
    let mut out = match measured {
        Ok(v) => v,
        Err(e) => err_json(&e),
    };
    out["startup"] = json!({"joined_ms": joined_ms, "active_ms": active_ms});
    out["metrics"] = match metrics {
        Ok(m) => m.to_json(),
        Err(e) => json!(format!("cannot read /metrics: {e:#}")),
    };
    out["mem"] = json!(p.mem().map(|m| m.to_json()));
    out["stop"] = p.stop(Duration::from_secs(15)).await;
    out["log"] = p.log_json();
    Ok(out)
}
