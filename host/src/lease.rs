//! Leases: with a shared (PostgreSQL) store, each persona runs on exactly one host.
//!
//! A lease is a row per persona label: the holding host, an **epoch** (a fencing
//! token, one more with each new holder) and an expiry on the database's clock.
//!
//! - Every `renew_ms` (default 2 s) a host records itself alive and extends the
//!   leases it holds to `ttl_ms` (default 8 s) from now.
//! - It then takes its **fair share** — ⌈personas ÷ live hosts⌉ — of the personas
//!   that are free, released or expired, and, when it holds more than its share
//!   (another host joined), hands back at most `handover_per_tick` (default 2) per
//!   renewal: each such bot is stopped (its outbox flushed) before its lease is
//!   released, so the next holder starts from everything it committed. Shares use
//!   ⌈⌉ and only a host above its share gives anything back, so the split settles
//!   and bots do not flap. While it is under its share a host looks every quarter
//!   renewal, so an expired lease is taken within a fraction of a second.
//! - A host whose renewals fail stops all its bots once `ttl_ms - renew_ms` have
//!   passed since the last renewal that went through, before any lease can expire.
//!   Independently, each session refuses to write a frame once that same instant has
//!   passed ([`Store::may_send`]), measured on the monotonic clock, which keeps
//!   counting while the process is stopped: a host that wakes from SIGSTOP sends
//!   nothing before it has renewed.
//! - Every outbox row and kv write of a persona carries its epoch and the database
//!   refuses it unless this host still holds that epoch ([`Store::enable_leases`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{LeaseRow, Store, StoreError};

/// `[store]` lease settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseConfig {
    /// How often leases are renewed.
    pub renew: Duration,
    /// How long a lease lasts past its last renewal.
    pub ttl: Duration,
    /// Most personas handed back to other hosts per renewal.
    pub handover_per_tick: usize,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            renew: Duration::from_secs(2),
            ttl: Duration::from_secs(8),
            handover_per_tick: 2,
        }
    }
}

impl LeaseConfig {
    /// A configuration that can keep its promise: renewals well inside the ttl.
    pub fn validate(&self) -> Result<(), String> {
        if self.renew.is_zero() || self.ttl < self.renew * 2 {
            return Err(format!(
                "[store] lease_ttl_ms ({}) must be at least twice lease_renew_ms ({})",
                self.ttl.as_millis(),
                self.renew.as_millis()
            ));
        }
        if self.handover_per_tick == 0 {
            return Err("[store] handover_per_tick must be at least 1".into());
        }
        Ok(())
    }

    /// How long after a renewal was sent this host still trusts its leases: the ttl
    /// less one renewal period, so bots stop before the lease can expire.
    pub fn trust(&self) -> Duration {
        self.ttl.saturating_sub(self.renew)
    }
}

/// A host id unique to this process: `ROOST_HOST_ID`, else `hostname-pid-random`.
pub fn host_id() -> String {
    if let Ok(id) = std::env::var("ROOST_HOST_ID")
        && !id.trim().is_empty()
    {
        return id.trim().to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "roost".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// How long after a lease's expiry (by the last snapshot) a host looks at it again.
const EXPIRY_MARGIN: Duration = Duration::from_millis(50);

/// What to do this round.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Personas to try to take, best first; take at most `want`.
    pub candidates: Vec<String>,
    pub want: usize,
    /// Personas to hand back (stop the bot, then release).
    pub release: Vec<String>,
}

/// This host's fair share of `offered` personas among `live_hosts`.
pub fn fair_share(offered: usize, live_hosts: usize) -> usize {
    offered.div_ceil(live_hosts.max(1))
}

/// Rendezvous score of `persona` for `host`: each host prefers different personas,
/// so hosts starting together rarely contend, and a hand-back gives up the personas
/// this host cares least about.
fn score(host: &str, persona: &str) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(host.as_bytes());
    h.update([0]);
    h.update(persona.as_bytes());
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// Decides a round: take up to the fair share, hand back a few over it.
pub fn plan(
    me: &str,
    held: &BTreeSet<String>,
    offered: &BTreeSet<String>,
    live_hosts: usize,
    handover_per_tick: usize,
) -> Plan {
    let fair = fair_share(offered.len(), live_hosts);
    let mut candidates: Vec<String> = offered.difference(held).cloned().collect();
    candidates.sort_by_key(|p| score(me, p));
    let want = fair.saturating_sub(held.len());
    let mut release = Vec::new();
    if held.len() > fair && live_hosts > 1 {
        let mut mine: Vec<&String> = held.iter().collect();
        mine.sort_by_key(|p| std::cmp::Reverse(score(me, p)));
        release = mine
            .into_iter()
            .take((held.len() - fair).min(handover_per_tick))
            .cloned()
            .collect();
    }
    // A persona no longer offered here (its file is gone) is handed back too.
    release.extend(held.difference(offered).cloned());
    release.sort();
    release.dedup();
    Plan {
        candidates,
        want,
        release,
    }
}

/// The lease state of one host.
pub struct Leases {
    pub config: LeaseConfig,
    pub host: String,
    /// Persona → epoch held.
    pub held: BTreeMap<String, i64>,
    last_ok: Option<Instant>,
    /// The first heartbeat: acquiring waits one renewal after it, so hosts starting
    /// together see each other before they split the personas.
    first_seen: Option<Instant>,
    pub live_hosts: usize,
    /// The last view of every lease (for status and metrics).
    pub snapshot: std::sync::Arc<std::sync::Mutex<LeaseSnapshot>>,
    /// When [`Leases::snapshot`] was taken.
    snapshot_at: Option<Instant>,
}

/// What status pages and metrics show.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LeaseSnapshot {
    pub host: String,
    pub live_hosts: usize,
    pub leases: Vec<LeaseRow>,
}

/// The outcome of renewing.
#[derive(Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed; these personas were lost to another host (stop them, no writes).
    Ok { lost: Vec<String> },
    /// The store did not answer, but the leases are still trusted.
    Failed,
    /// The store has not answered for too long: stop every bot now.
    Expired,
}

impl Leases {
    pub fn new(config: LeaseConfig, host: String) -> Leases {
        let snapshot = LeaseSnapshot {
            host: host.clone(),
            ..Default::default()
        };
        Leases {
            config,
            host,
            held: BTreeMap::new(),
            last_ok: None,
            first_seen: None,
            live_hosts: 1,
            snapshot: std::sync::Arc::new(std::sync::Mutex::new(snapshot)),
            snapshot_at: None,
        }
    }

    /// When to run the next round, `now`: a renewal period; a quarter of it while
    /// this host is under its share or an offered persona has no live lease (so a
    /// free lease is taken soon); and no later than just after the next expiry of
    /// another host's lease seen in the last snapshot (a dead host's personas are
    /// taken as soon as they expire, not up to a renewal later).
    pub fn next_tick(&self, offered: &BTreeSet<String>, now: Instant) -> Duration {
        let quick = self.config.renew / 4;
        if self.held.len() < fair_share(offered.len(), self.live_hosts) {
            return quick;
        }
        let snapshot = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        let live: BTreeMap<&str, &LeaseRow> = snapshot
            .leases
            .iter()
            .filter(|l| !l.holder.is_empty())
            .map(|l| (l.persona.as_str(), l))
            .collect();
        if offered.iter().any(|p| !live.contains_key(p.as_str())) {
            return quick;
        }
        let age = self
            .snapshot_at
            .map_or(Duration::ZERO, |t| now.duration_since(t));
        let next_expiry = live
            .values()
            .filter(|l| l.holder != self.host && offered.contains(&l.persona))
            .map(|l| Duration::from_millis(l.expires_in_ms.max(0) as u64))
            .min();
        match next_expiry {
            // Just after it expires (its holder may still renew it before).
            Some(d) => (d.saturating_sub(age) + EXPIRY_MARGIN).clamp(quick, self.config.renew),
            None => self.config.renew,
        }
    }

    /// Heartbeat and renewal (blocking store calls: run on a blocking thread).
    pub fn renew(&mut self, store: &Store, now: Instant) -> Renewal {
        type Answers = (Vec<String>, Vec<(String, i64)>);
        let result: Result<Answers, StoreError> = (|| {
            let live = store.lease_heartbeat(&self.host, self.config.ttl)?;
            let renewed = store.lease_renew(&self.host, self.config.ttl)?;
            Ok((live, renewed))
        })();
        match result {
            Ok((live, renewed)) => {
                self.live_hosts = live.len().max(1);
                self.first_seen.get_or_insert(now);
                self.last_ok = Some(now);
                store.extend_fences(now + self.config.trust());
                let renewed: BTreeMap<String, i64> = renewed.into_iter().collect();
                // Held under this host id but not by this process (an earlier process
                // with the same id died): nothing runs them here, hand them back.
                for (persona, epoch) in &renewed {
                    if !self.held.contains_key(persona) {
                        tracing::info!(host = %self.host, persona, "releasing a lease an earlier process of this host held");
                        if let Err(e) = store.lease_release(&self.host, persona, *epoch) {
                            tracing::warn!(host = %self.host, persona, error = %e, "cannot release a lease (it will expire)");
                        }
                    }
                }
                let mut lost = Vec::new();
                for (persona, epoch) in &self.held {
                    if renewed.get(persona) != Some(epoch) {
                        lost.push(persona.clone());
                    }
                }
                for p in &lost {
                    store.clear_fence(p);
                    self.held.remove(p);
                }
                Renewal::Ok { lost }
            }
            Err(e) => {
                tracing::warn!(host = %self.host, error = %e, "lease renewal failed");
                if self.expired(now) {
                    for p in self.held.keys() {
                        store.clear_fence(p);
                    }
                    self.held.clear();
                    Renewal::Expired
                } else {
                    Renewal::Failed
                }
            }
        }
    }

    /// Whether the leases can no longer be trusted at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.last_ok
            .is_none_or(|ok| now.duration_since(ok) >= self.config.trust())
    }

    /// Whether this host may take personas yet (one renewal after its first heartbeat).
    pub fn settled(&self, now: Instant) -> bool {
        self.first_seen
            .is_some_and(|t| now.duration_since(t) >= self.config.renew)
    }

    /// Tries the plan's candidates until `want` are taken; returns them.
    pub fn acquire(&mut self, store: &Store, plan: &Plan, now: Instant) -> Vec<String> {
        let mut taken = Vec::new();
        if plan.want == 0 || !self.settled(now) || self.expired(now) {
            return taken;
        }
        let valid_until = self.last_ok.map_or(now, |ok| ok + self.config.trust());
        for persona in &plan.candidates {
            if taken.len() >= plan.want {
                break;
            }
            match store.lease_acquire(&self.host, persona, self.config.ttl) {
                Ok(Some(epoch)) => {
                    store.set_fence(persona, epoch, valid_until);
                    self.held.insert(persona.clone(), epoch);
                    taken.push(persona.clone());
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(host = %self.host, persona, error = %e, "cannot take a lease");
                    break;
                }
            }
        }
        taken
    }

    /// Releases `persona` (its bot is already stopped).
    pub fn release(&mut self, store: &Store, persona: &str) {
        store.clear_fence(persona);
        if let Some(epoch) = self.held.remove(persona)
            && let Err(e) = store.lease_release(&self.host, persona, epoch)
        {
            tracing::warn!(host = %self.host, persona, error = %e, "cannot release a lease (it will expire)");
        }
    }

    /// Refreshes the status snapshot from the store.
    pub fn refresh_snapshot(&mut self, store: &Store) {
        let at = Instant::now();
        if let Ok(leases) = store.leases() {
            let mut s = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
            s.live_hosts = self.live_hosts;
            s.leases = leases;
            self.snapshot_at = Some(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn personas(n: usize) -> BTreeSet<String> {
        (0..n).map(|i| format!("p{i:02}")).collect()
    }

    #[test]
    fn fair_share_rounds_up() {
        assert_eq!(fair_share(20, 1), 20);
        assert_eq!(fair_share(20, 2), 10);
        assert_eq!(fair_share(20, 3), 7);
        assert_eq!(fair_share(0, 3), 0);
        assert_eq!(fair_share(5, 0), 5);
    }

    #[test]
    fn a_lone_host_takes_everything_and_gives_nothing_back() {
        let p = plan("a", &set(&[]), &personas(20), 1, 2);
        assert_eq!(p.want, 20);
        assert_eq!(p.candidates.len(), 20);
        assert!(p.release.is_empty());
    }

    #[test]
    fn hosts_prefer_different_personas() {
        let all = personas(20);
        let a = plan("host-a", &set(&[]), &all, 2, 2);
        let b = plan("host-b", &set(&[]), &all, 2, 2);
        let first_a: BTreeSet<_> = a.candidates[..10].iter().collect();
        let first_b: BTreeSet<_> = b.candidates[..10].iter().collect();
        assert!(first_a.intersection(&first_b).count() < 10);
    }

    /// Simulates hosts taking turns against one lease table: a second host joining
    /// gets half, a few per round, and then nothing moves any more.
    #[test]
    fn a_joining_host_gets_its_share_a_few_at_a_time_without_flapping() {
        let all = personas(20);
        let mut owner: BTreeMap<String, String> = BTreeMap::new();
        for p in &all {
            owner.insert(p.clone(), "a".into());
        }
        let held = |owner: &BTreeMap<String, String>, h: &str| -> BTreeSet<String> {
            owner
                .iter()
                .filter(|(_, o)| o.as_str() == h)
                .map(|(p, _)| p.clone())
                .collect()
        };
        let mut moves_per_round = Vec::new();
        for _round in 0..20 {
            let mut moved = 0;
            for h in ["a", "b"] {
                let p = plan(h, &held(&owner, h), &all, 2, 2);
                assert!(p.release.len() <= 2, "{p:?}");
                for r in &p.release {
                    owner.insert(r.clone(), String::new());
                    moved += 1;
                }
                let mut taken = 0;
                for c in &p.candidates {
                    if taken >= p.want {
                        break;
                    }
                    if owner.get(c).is_some_and(|o| o.is_empty()) {
                        owner.insert(c.clone(), h.into());
                        taken += 1;
                        moved += 1;
                    }
                }
            }
            moves_per_round.push(moved);
        }
        assert_eq!(held(&owner, "a").len(), 10);
        assert_eq!(held(&owner, "b").len(), 10);
        // Settled: the last rounds move nothing.
        assert!(
            moves_per_round[10..].iter().all(|&m| m == 0),
            "{moves_per_round:?}"
        );
    }

    #[test]
    fn three_hosts_split_twenty_as_seven_seven_six() {
        let all = personas(20);
        let a: BTreeSet<String> = all.iter().take(7).cloned().collect();
        let b: BTreeSet<String> = all.iter().skip(7).take(7).cloned().collect();
        let c: BTreeSet<String> = all.iter().skip(14).cloned().collect();
        for (h, held) in [("a", &a), ("b", &b), ("c", &c)] {
            let p = plan(h, held, &all, 3, 2);
            assert!(p.release.is_empty(), "{h}: {p:?}");
        }
        assert_eq!(plan("c", &c, &all, 3, 2).want, 1);
    }

    #[test]
    fn a_persona_whose_file_is_gone_is_handed_back() {
        let p = plan("a", &set(&["x", "y"]), &set(&["x"]), 1, 2);
        assert_eq!(p.release, vec!["y".to_string()]);
    }

    #[test]
    fn trust_ends_one_renewal_before_expiry() {
        let c = LeaseConfig::default();
        assert_eq!(c.trust(), Duration::from_secs(6));
        assert!(c.validate().is_ok());
        let bad = LeaseConfig {
            renew: Duration::from_secs(5),
            ttl: Duration::from_secs(8),
            handover_per_tick: 2,
        };
        assert!(bad.validate().is_err());
    }

    fn row(persona: &str, holder: &str, expires_in_ms: i64) -> LeaseRow {
        LeaseRow {
            persona: persona.into(),
            holder: holder.into(),
            epoch: 1,
            expires_in_ms,
        }
    }

    #[test]
    fn rounds_come_sooner_when_a_lease_is_free_or_about_to_expire() {
        let mut l = Leases::new(LeaseConfig::default(), "a".into());
        let t0 = Instant::now();
        let offered = set(&["x", "y"]);
        l.live_hosts = 2;
        l.held.insert("x".into(), 1);
        l.snapshot_at = Some(t0);
        let renew = l.config.renew;
        let quick = renew / 4;
        // y has no lease at all: look again soon.
        l.snapshot.lock().unwrap().leases = vec![row("x", "a", 8000)];
        assert_eq!(l.next_tick(&offered, t0), quick);
        // y is held by a live host renewing it: a normal round.
        l.snapshot.lock().unwrap().leases = vec![row("x", "a", 8000), row("y", "b", 7000)];
        assert_eq!(l.next_tick(&offered, t0), renew);
        // y's holder stopped renewing: just after it expires.
        l.snapshot.lock().unwrap().leases = vec![row("x", "a", 8000), row("y", "b", 1000)];
        assert_eq!(l.next_tick(&offered, t0), Duration::from_millis(1050));
        assert_eq!(
            l.next_tick(&offered, t0 + Duration::from_millis(900)),
            quick,
            "never sooner than a quarter round"
        );
        // Under its share: quick.
        l.held.clear();
        assert_eq!(l.next_tick(&offered, t0), quick);
    }

    #[test]
    fn unrenewed_leases_stop_being_trusted_before_they_expire() {
        let mut l = Leases::new(LeaseConfig::default(), "a".into());
        let t0 = Instant::now();
        assert!(l.expired(t0), "never renewed: not trusted");
        l.last_ok = Some(t0);
        assert!(!l.expired(t0 + Duration::from_millis(5_999)));
        assert!(l.expired(t0 + Duration::from_secs(6)));
    }
}
