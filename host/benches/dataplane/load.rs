//! The load generator: an [`Agent`] that mentions a bot with `@BOT ping SEQ` and
//! matches the answers (`ping SEQ`) by sequence number, one at a time (latency) or
//! with a fixed number in flight (throughput).

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::chat::{Agent, Event};
use crate::proc::ms;

/// Who is mentioned, and where.
#[derive(Clone, Debug)]
pub struct Target {
    pub bot: String,
    pub room: String,
    /// The bot does not echo: any message from it in the room after a mention is
    /// taken as the answer (one mention at a time only).
    pub any_reply: bool,
}

/// The sequence number in an answer from `target`, if `ev` is one.
fn answer(ev: &Event, target: &Target) -> Option<(u64, Instant)> {
    let Event::Msg {
        room,
        from,
        text,
        at,
    } = ev
    else {
        return None;
    };
    if room != &target.room || !from.eq_ignore_ascii_case(&target.bot) {
        return None;
    }
    let seq = text.rsplit(' ').next()?.trim().parse().ok()?;
    Some((seq, *at))
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// p50/p90/p99/max/mean of latencies, in ms.
pub fn summary(mut samples_ms: Vec<f64>) -> Value {
    if samples_ms.is_empty() {
        return json!({"samples": 0});
    }
    samples_ms.sort_by(f64::total_cmp);
    let mean = samples_ms.iter().sum::<f64>() / samples_ms.len() as f64;
    json!({
        "samples": samples_ms.len(),
        "p50_ms": round3(percentile(&samples_ms, 0.50)),
        "p90_ms": round3(percentile(&samples_ms, 0.90)),
        "p99_ms": round3(percentile(&samples_ms, 0.99)),
        "max_ms": round3(*samples_ms.last().unwrap_or(&0.0)),
        "mean_ms": round3(mean),
    })
}

/// Sequence numbers are unique across phases, so a straggler from an earlier phase
/// is never taken for an answer.
pub struct Seqs(u64);

impl Seqs {
    pub fn new() -> Seqs {
        Seqs(1)
    }

    fn take(&mut self, n: u64) -> u64 {
        let base = self.0;
        self.0 += n + 1000;
        base
    }
}

/// How to run [`sequential`].
pub struct SeqPlan {
    pub samples: usize,
    /// An answer later than this counts as lost.
    pub answer_within: Duration,
    /// Stop sampling after this long, whatever the count.
    pub max_time: Duration,
    /// Stop after this many consecutive losses.
    pub max_consecutive_lost: usize,
}

/// What one mention got.
pub struct Once {
    /// Mention to answer, if the answer came within the limit.
    pub rtt_ms: Option<f64>,
    /// Answers from the target to other mentions seen meanwhile.
    pub stray: u64,
    pub server_errors: u64,
}

/// Mentions `target` once (`@BOT ping SEQ`) and waits up to `within` for its answer.
pub async fn mention_once(
    agent: &mut Agent,
    target: &Target,
    seq: u64,
    within: Duration,
) -> anyhow::Result<Once> {
    let t = Instant::now();
    agent
        .send(&target.room, &format!("@{} ping {seq}", target.bot))
        .await?;
    let deadline = t + within;
    let mut once = Once {
        rtt_ms: None,
        stray: 0,
        server_errors: 0,
    };
    loop {
        match tokio::time::timeout_at(deadline, agent.events.recv()).await {
            Err(_) => return Ok(once),
            Ok(None) => anyhow::bail!("the load generator's event stream ended"),
            Ok(Some(Event::Closed(why))) => anyhow::bail!("load generator: {why}"),
            Ok(Some(Event::Error(_))) => once.server_errors += 1,
            Ok(Some(Event::Msg { room, from, at, .. }))
                if target.any_reply
                    && room == target.room
                    && from.eq_ignore_ascii_case(&target.bot) =>
            {
                once.rtt_ms = Some(ms(at - t));
                return Ok(once);
            }
            Ok(Some(ev)) => match answer(&ev, target) {
                Some((s, at)) if s == seq => {
                    once.rtt_ms = Some(ms(at - t));
                    return Ok(once);
                }
                Some(_) => once.stray += 1,
                None => {}
            },
        }
    }
}

/// Takes a fresh sequence number for [`mention_once`].
pub fn next_seq(seqs: &mut Seqs) -> u64 {
    seqs.take(1)
}

/// One mention at a time: the latency of each answer.
pub async fn sequential(
    agent: &mut Agent,
    target: &Target,
    plan: &SeqPlan,
    seqs: &mut Seqs,
) -> anyhow::Result<Value> {
    let base = seqs.take(plan.samples as u64);
    let started = Instant::now();
    let mut rtts = Vec::with_capacity(plan.samples);
    let (mut lost, mut stray, mut consecutive_lost, mut server_errors) = (0u64, 0u64, 0, 0u64);
    let mut stopped = None;
    for i in 0..plan.samples {
        if started.elapsed() >= plan.max_time {
            stopped = Some(format!("time limit of {:?} reached", plan.max_time));
            break;
        }
        let once = mention_once(agent, target, base + i as u64, plan.answer_within).await?;
        stray += once.stray;
        server_errors += once.server_errors;
        match once.rtt_ms {
            Some(rtt) => {
                rtts.push(rtt);
                consecutive_lost = 0;
            }
            None => {
                lost += 1;
                consecutive_lost += 1;
            }
        }
        if consecutive_lost >= plan.max_consecutive_lost {
            stopped = Some(format!(
                "{consecutive_lost} mentions in a row went unanswered"
            ));
            break;
        }
    }
    let answered = rtts.len();
    let mut out = summary(rtts);
    out["asked"] = json!(answered as u64 + lost);
    out["answered"] = json!(answered);
    out["lost"] = json!(lost);
    out["late_or_stray"] = json!(stray);
    out["answer_within_ms"] = json!(plan.answer_within.as_millis() as u64);
    if server_errors > 0 {
        out["server_errors"] = json!(server_errors);
    }
    if let Some(why) = stopped {
        out["stopped_early"] = json!(why);
    }
    Ok(out)
}

/// How to run [`pipelined`].
pub struct PipePlan {
    pub in_flight: usize,
    /// Sending stops after this long...
    pub duration: Duration,
    /// ...or after this many mentions, if set (then `duration` is only a cap).
    pub count: Option<u64>,
    /// A mention unanswered this long frees its slot (an answer after that is `late`).
    pub expire_after: Duration,
    /// After sending stops, wait this long for the answers still due.
    pub grace: Duration,
}

#[derive(Clone, Copy, PartialEq)]
enum Slot {
    InFlight,
    Expired,
    Answered,
}

/// `in_flight` mentions outstanding at all times: answers per second.
pub async fn pipelined(
    agent: &mut Agent,
    target: &Target,
    plan: &PipePlan,
    seqs: &mut Seqs,
) -> anyhow::Result<Value> {
    let cap = plan.count.unwrap_or(50_000_000);
    let base = seqs.take(cap);
    let mut slots: Vec<Slot> = Vec::new();
    let mut sent_at: Vec<Instant> = Vec::new();
    let mut queue: VecDeque<usize> = VecDeque::new();
    let mut in_flight = 0usize;
    let mut rtts: Vec<f64> = Vec::new();
    let (mut late, mut dup, mut stray, mut server_errors) = (0u64, 0u64, 0u64, 0u64);
    let t0 = Instant::now();
    let end_send = t0 + plan.duration;
    let mut sending = true;
    let mut answered_in_window = 0u64;
    let mut last_answer = t0;
    let mut closed = None;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        // Top up the window.
        if sending && Instant::now() >= end_send {
            sending = false;
        }
        if sending {
            let mut fed = false;
            while in_flight < plan.in_flight && (slots.len() as u64) < cap {
                let seq = base + slots.len() as u64;
                agent
                    .feed(&target.room, &format!("@{} ping {seq}", target.bot))
                    .await?;
                queue.push_back(slots.len());
                slots.push(Slot::InFlight);
                sent_at.push(Instant::now());
                in_flight += 1;
                fed = true;
            }
            if fed {
                agent.flush().await?;
            }
            if slots.len() as u64 >= cap {
                sending = false;
            }
        }
        tokio::select! {
            ev = agent.events.recv() => {
                let Some(ev) = ev else {
                    closed = Some("event stream ended".to_owned());
                    break;
                };
                if let Event::Closed(why) = &ev {
                    closed = Some(why.clone());
                    break;
                }
                if matches!(ev, Event::Error(_)) {
                    server_errors += 1;
                    continue;
                }
                let Some((seq, at)) = answer(&ev, target) else { continue };
                let Some(i) = seq.checked_sub(base).map(|i| i as usize).filter(|&i| i < slots.len()) else {
                    stray += 1;
                    continue;
                };
                match slots[i] {
                    Slot::InFlight => {
                        slots[i] = Slot::Answered;
                        in_flight -= 1;
                        rtts.push(ms(at - sent_at[i]));
                        if at <= end_send {
                            answered_in_window += 1;
                        }
                        last_answer = at;
                    }
                    Slot::Expired => {
                        slots[i] = Slot::Answered;
                        late += 1;
                        last_answer = at;
                    }
                    Slot::Answered => dup += 1,
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                while let Some(&i) = queue.front() {
                    match slots[i] {
                        Slot::InFlight if now - sent_at[i] >= plan.expire_after => {
                            slots[i] = Slot::Expired;
                            in_flight -= 1;
                            queue.pop_front();
                        }
                        Slot::InFlight => break,
                        _ => { queue.pop_front(); }
                    }
                }
                if now >= end_send {
                    sending = false;
                }
                if !sending && (in_flight == 0 || now >= end_send.max(last_answer) + plan.grace) {
                    break;
                }
            }
        }
    }
    let sent = slots.len() as u64;
    let answered = slots.iter().filter(|s| **s == Slot::Answered).count() as u64;
    // Duration mode: answers that arrived while sending went on. Count mode: all
    // answers over the time to the last one.
    let (window, in_window) = if plan.count.is_some() {
        (last_answer - t0, answered)
    } else {
        (plan.duration, answered_in_window)
    };
    let per_s = in_window as f64 / window.as_secs_f64().max(1e-9);
    let mut out = json!({
        "in_flight": plan.in_flight,
        "window_s": round3(window.as_secs_f64()),
        "sent": sent,
        "answered": answered,
        "answers_per_s": per_s.round() as u64,
        "lost": sent - answered,
        "late": late,
        "duplicates": dup,
        "stray": stray,
        "latency_under_load": summary(rtts),
    });
    if server_errors > 0 {
        out["server_errors"] = json!(server_errors);
    }
    if let Some(why) = closed {
        out["error"] = json!(format!("load generator socket: {why}"));
    }
    Ok(out)
}
