//! Shadow personas: a new version listens to the live conversation beside the live
//! one, decides what it would say, and is compared with it — without ever speaking.
//!
//! A file `NAME.shadow.wasm` beside `NAME.wasm` (or `[personas.NAME] shadow = "FILE"`)
//! runs as the shadow of bot `NAME`:
//!
//! - it is shown exactly what the live persona is shown: the message after inbound
//!   policy, with the same flags (a message the live bot's policy did not deliver
//!   does not reach the shadow either);
//! - its actions go through an outbound policy of its own (same settings, its own
//!   rate limits and loop guard) and are recorded, never sent: the shadow has no
//!   session, nothing it decides reaches the network;
//! - it has its own [`Sandbox`]: its own instance, limits
//!   (`[personas.NAME.shadow.limits]` over the persona's) and quarantine;
//! - its `kv` is a scratch copy-on-write view of the live namespace ([`ScratchKv`]):
//!   reads see the live state, writes and deletes stay in memory and are gone when
//!   the shadow stops; the live namespace never changes;
//! - its `llm` calls answer `denied` (naming `personas.NAME.shadow.llm`) unless
//!   `[personas.NAME.shadow] llm = true`; then they use the persona's grant with a
//!   budget of their own (the hub's budget of `NAME.shadow`, sized by the shadow's
//!   `tokens_per_hour` / `tokens_per_day`, by default the persona's);
//! - `history` reads the live bot's history.
//!
//! **Cost.** The live worker hands the shadow a message only after the live reply
//! went to the outbox ([`Shadow::offer`], a `try_send` on a bounded queue of
//! `[personas.NAME.shadow] queue` messages); the shadow runs on a task of its own. When
//! the queue is full the message is not shown to the shadow and is counted as the
//! outcome `dropped`: a slow shadow never holds the live bot back.
//!
//! **Comparison** ([`compare`]), per message: `same` (the same actions, silence
//! included), `different` (both replied, differently; with a [`similarity`] in 0..1),
//! `only-live`, `only-shadow`, `blocked` (outbound policy dropped a shadow reply),
//! `error` (the shadow's call failed), and `dropped` (the shadow fell behind). The
//! counts are `roost_shadow_outcomes_total{bot,outcome}` on `/metrics`; the last
//! `keep` pairs that were not `same` are in `roost status` and on the status page
//! ([`ShadowBoard`]), and every one is appended to `<state>/shadow/NAME.jsonl`.
//!
//! **Promotion.** Renaming `NAME.shadow.wasm` to `NAME.wasm` makes it the live
//! version through the hot-reload swap (no message lost or answered twice), and the
//! bot has no shadow any more.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::plugin::bindings::{Message, kv};
use crate::plugin::context::{BoxFuture, KvBackend};
use crate::plugin::{Grants, PersonaComponent, PersonaContext, Sandbox, manifest};
use crate::policy::{BotIdentity, Clock, Policy};
use crate::protocol::ApiKey;
use crate::session::Membership;

use super::caps::{HistoryCap, KvCap, check_key};
use super::compare::*;
use super::context::HostContext;
use super::core::{BotCore, Effect};
use super::history::History;

/// Largest JSONL file before it is rotated to `NAME.jsonl.1`.
pub const JOURNAL_ROTATE_BYTES: u64 = 16 << 20;

// -- kv: a scratch copy-on-write view ---------------------------------------------

/// `kv` for a shadow: reads fall through to the live namespace, writes and deletes
/// go to an in-memory overlay that only the shadow sees (gone when it stops). The
/// overlay holds at most the persona's `quota_bytes` (keys + values) and values of at
/// most `value_bytes`.
pub struct ScratchKv {
    live: KvCap,
    /// Key → value written by the shadow, or `None` for a key it deleted.
    overlay: Mutex<BTreeMap<String, Option<Vec<u8>>>>,
}

impl ScratchKv {
    pub fn new(live: KvCap) -> ScratchKv {
        ScratchKv {
            live,
            overlay: Mutex::default(),
        }
    }

    fn overlay(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Option<Vec<u8>>>> {
        self.overlay.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn scratch(&self, key: &str) -> Option<Option<Vec<u8>>> {
        self.overlay().get(key).cloned()
    }
}

impl KvBackend for ScratchKv {
    fn get(&self, key: String) -> BoxFuture<'_, Result<Option<Vec<u8>>, kv::Error>> {
        Box::pin(async move {
            check_key(&key)?;
            match self.scratch(&key) {
                Some(v) => Ok(v),
                None => self.live.get(key).await,
            }
        })
    }

    fn set(&self, key: String, value: Vec<u8>) -> BoxFuture<'_, Result<(), kv::Error>> {
        Box::pin(async move {
            check_key(&key)?;
            if value.len() as u64 > self.live.value_bytes {
                return Err(kv::Error::ValueTooLarge(format!(
                    "{} bytes; the limit is {} bytes per value",
                    value.len(),
                    self.live.value_bytes
                )));
            }
            let mut overlay = self.overlay();
            let used: u64 = overlay
                .iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| (k.len() + v.len()) as u64))
                .sum();
            let old = overlay
                .get(&key)
                .and_then(|v| v.as_ref())
                .map_or(0, |v| (key.len() + v.len()) as u64);
            let would_use = used - old + (key.len() + value.len()) as u64;
            if would_use > self.live.quota_bytes {
                return Err(kv::Error::QuotaExceeded(format!(
                    "{used} of {} bytes of the shadow's scratch space in use; this would make {would_use}",
                    self.live.quota_bytes
                )));
            }
            overlay.insert(key, Some(value));
            Ok(())
        })
    }

    fn delete(&self, key: String) -> BoxFuture<'_, Result<bool, kv::Error>> {
        Box::pin(async move {
            check_key(&key)?;
            let existed = match self.scratch(&key) {
                Some(v) => v.is_some(),
                None => self.live.get(key.clone()).await?.is_some(),
            };
            self.overlay().insert(key, None);
            Ok(existed)
        })
    }

    fn list(&self, prefix: String) -> BoxFuture<'_, Result<Vec<String>, kv::Error>> {
        Box::pin(async move {
            let live = self.live.list(prefix.clone()).await?;
            let mut keys: BTreeSet<String> = live.into_iter().collect();
            for (k, v) in self.overlay().iter() {
                if !k.starts_with(&prefix) {
                    continue;
                }
                match v {
                    Some(_) => keys.insert(k.clone()),
                    None => keys.remove(k),
                };
            }
            Ok(keys.into_iter().collect())
        })
    }
}

// -- the journal ------------------------------------------------------------------

/// `<state>/shadow/NAME.jsonl`: every pair that was not `same`, one JSON line each.
#[derive(Debug, Clone)]
pub struct Journal {
    path: PathBuf,
}

impl Journal {
    pub fn new(state: &Path, bot: &str) -> Journal {
        Journal {
            path: state.join("shadow").join(format!("{bot}.jsonl")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `pair` (rotating a file grown past [`JOURNAL_ROTATE_BYTES`]).
    pub fn append(&self, pair: &ShadowPair) -> std::io::Result<()> {
        use std::io::Write as _;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if std::fs::metadata(&self.path).is_ok_and(|m| m.len() >= JOURNAL_ROTATE_BYTES) {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            std::fs::rename(&self.path, old)?;
        }
        let mut line = serde_json::to_vec(pair).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(&line)
    }
}

// -- the running shadow -----------------------------------------------------------

/// A message for the shadow: as the live persona received it, and what the live
/// version did with it.
struct Job {
    msg: Message,
    live: Vec<Effect>,
}

enum Control {
    /// The bot's network name and chat key (the key is added to the secret scanner).
    Identity { name: String, key: ApiKey },
}

/// The live bot's end of a running shadow: owned by the bot's worker. Dropping it
/// stops the shadow (after the message it is on).
pub struct Shadow {
    jobs: mpsc::Sender<Job>,
    control: mpsc::UnboundedSender<Control>,
    board: Arc<ShadowBoard>,
}

impl Shadow {
    /// Shows the shadow a message the live persona handled, with the live effects;
    /// `false` (counted as `dropped`) when the shadow is too far behind.
    pub fn offer(&self, msg: Message, live: Vec<Effect>) -> bool {
        match self.jobs.try_send(Job { msg, live }) {
            Ok(()) => true,
            Err(_) => {
                self.board.count(Outcome::Dropped);
                false
            }
        }
    }

    /// The bot's network name and chat key, as the session reported them.
    pub fn identity(&self, name: &str, key: &ApiKey) {
        let _ = self.control.send(Control::Identity {
            name: name.to_string(),
            key: key.clone(),
        });
    }
}

/// What a bot lends a shadow of its own state.
#[derive(Clone)]
pub struct ShadowSeams {
    /// The bot's label (the live persona's file stem).
    pub label: String,
    /// The bot's name on the network.
    pub bot_name: String,
    pub history: Arc<History>,
    pub rooms: Membership,
    pub board: Arc<ShadowBoard>,
}

/// Starts the shadow `component` of the bot described by `seams`: describes it
/// (a failing `describe` or an invalid manifest refuses it), builds its sandbox,
/// grants and policy, and spawns its task.
pub async fn start(
    host: &HostContext,
    seams: &ShadowSeams,
    component: Arc<PersonaComponent>,
) -> anyhow::Result<Shadow> {
    let label = &seams.label;
    let cfg = host.config.persona(label);
    let shadow_cfg = &cfg.shadow;
    let shadow_label = format!("{label}.shadow");
    let mut grants = Grants::default();
    if cfg.history.allow {
        grants.history = Some(Arc::new(HistoryCap {
            history: seams.history.clone(),
            rooms: seams.rooms.clone(),
            limit: cfg.history.limit,
        }));
    }
    if cfg.kv.allow {
        grants.kv = Some(Arc::new(ScratchKv::new(KvCap {
            store: host.store.clone(),
            persona: label.clone(),
            quota_bytes: cfg.kv.quota_bytes,
            value_bytes: cfg.kv.value_bytes,
        })));
    }
    if shadow_cfg.llm {
        let mut llm = cfg.llm.clone();
        if let Some(n) = shadow_cfg.tokens_per_hour {
            llm.tokens_per_hour = n;
        }
        if let Some(n) = shadow_cfg.tokens_per_day {
            llm.tokens_per_day = n;
        }
        // The budget is the hub's for `NAME.shadow`: never the live persona's.
        grants.llm = host.llm.backend(&shadow_label, &llm)?;
    }
    let ctx = PersonaContext::new_shadow(
        &shadow_label,
        label,
        &seams.bot_name,
        cfg.settings.clone(),
        grants,
    );
    let mut sandbox = Sandbox::new(
        host.runtime.clone(),
        component.clone(),
        ctx,
        host.config.shadow_limits_for(label),
    );
    let m = sandbox.describe().await?;
    manifest::validate(&m).map_err(|e| anyhow::anyhow!("shadow of `{label}`: {e}"))?;
    let policy = Policy::new(
        &host.config.policy,
        BotIdentity::new(seams.bot_name.clone(), seams.bot_name.clone()),
        Clock::real(),
    )?;
    for key in host.llm.known_secrets() {
        policy.add_known_secret(secrecy::ExposeSecret::expose_secret(&key));
    }
    let version = ShadowVersion {
        version: m.version.clone(),
        hash: component.hash().map(hex::encode),
        file: component
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    };
    // The shadow's history is never written: it reads the live bot's through `history`.
    // Its joins and leaves are never carried out: it counts against limits of its own.
    let rooms = crate::session::Membership::new(m.rooms.iter().cloned());
    let core = BotCore::new(sandbox, policy, m, Arc::new(History::new(1)), rooms);
    let (jobs, job_rx) = mpsc::channel(shadow_cfg.queue.max(1));
    let (control, control_rx) = mpsc::unbounded_channel();
    seams.board.started(version.clone(), shadow_cfg.keep);
    let journal = Journal::new(&host.config.paths.state, label);
    tracing::info!(bot = %label, version = %version.version, file = %version.file, "shadow started");
    tokio::spawn(run(
        label.clone(),
        core,
        job_rx,
        control_rx,
        seams.board.clone(),
        journal,
    ));
    Ok(Shadow {
        jobs,
        control,
        board: seams.board.clone(),
    })
}

/// The shadow's task: one message at a time, until the live end is dropped.
async fn run(
    bot: String,
    mut core: BotCore,
    mut jobs: mpsc::Receiver<Job>,
    mut control: mpsc::UnboundedReceiver<Control>,
    board: Arc<ShadowBoard>,
    journal: Journal,
) {
    loop {
        tokio::select! {
            biased;
            Some(c) = control.recv() => match c {
                Control::Identity { name, key } => {
                    core.set_network_name(&name);
                    core.policy.add_known_secret(key.expose());
                }
            },
            job = jobs.recv() => {
                let Some(job) = job else { break };
                // Let the tasks the live reply woke (the session's writer) go first.
                tokio::task::yield_now().await;
                let effects = core.respond(&job.msg).await;
                board.sandbox(&core.sandbox);
                let cmp = compare(&job.live, &effects);
                board.count(cmp.outcome);
                if cmp.outcome == Outcome::Same {
                    continue;
                }
                let pair = ShadowPair::new(&bot, &job.msg, &job.live, &effects, cmp, &core.manifest.version);
                board.record(pair.clone());
                let journal = journal.clone();
                let written = tokio::task::spawn_blocking(move || journal.append(&pair)).await;
                if let Ok(Err(e)) | Err(e) = written.map_err(std::io::Error::other) {
                    tracing::warn!(bot = %bot, "cannot append to the shadow journal: {e}");
                }
            }
        }
    }
    tracing::debug!(bot = %bot, "shadow stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::DropReason;
    use crate::store::Store;

    fn say(text: &str) -> Effect {
        Effect::Say {
            room: "lobby".into(),
            text: text.into(),
        }
    }

    #[test]
    fn each_comparison_outcome() {
        assert_eq!(compare(&[], &[]).outcome, Outcome::Same);
        assert_eq!(compare(&[say("a")], &[say("a")]).outcome, Outcome::Same);
        let d = compare(&[say("hello there")], &[say("hello where")]);
        assert_eq!(d.outcome, Outcome::Different);
        let s = d.similarity.unwrap();
        assert!(s > 0.5 && s < 1.0, "{s}");
        assert_eq!(compare(&[say("a")], &[]).outcome, Outcome::OnlyLive);
        assert_eq!(compare(&[], &[say("a")]).outcome, Outcome::OnlyShadow);
        let blocked = Effect::Dropped {
            room: "lobby".into(),
            reason: DropReason::Empty,
        };
        let b = compare(&[say("a")], &[blocked]);
        assert_eq!(b.outcome, Outcome::Blocked);
        assert!(b.detail.unwrap().starts_with("#lobby: "));
        let e = compare(&[], &[Effect::PluginError("boom".into())]);
        assert_eq!(
            (e.outcome, e.detail.as_deref()),
            (Outcome::Error, Some("boom"))
        );
        // A live reply that policy dropped is no reply.
        let live_dropped = Effect::Dropped {
            room: "lobby".into(),
            reason: DropReason::Empty,
        };
        assert_eq!(compare(&[live_dropped], &[]).outcome, Outcome::Same);
        assert_eq!(
            compare(
                &[Effect::Join(crate::names::RoomName::new("x").unwrap())],
                &[]
            )
            .outcome,
            Outcome::OnlyLive
        );
    }

    #[test]
    fn similarity_is_symmetric_and_bounded() {
        assert_eq!(similarity("same", "same"), 1.0);
        assert_eq!(similarity("ab", "cd"), 0.0);
        assert_eq!(similarity("", "x"), 0.0);
        let (a, b) = ("the quick brown fox", "the quick brown cat");
        assert_eq!(similarity(a, b), similarity(b, a));
        assert!(similarity(a, b) > similarity(a, "zzzz yyyy"));
    }

    #[test]
    fn the_board_keeps_the_last_pairs_newest_first() {
        let board = ShadowBoard::default();
        board.started(
            ShadowVersion {
                version: "2".into(),
                hash: None,
                file: "x".into(),
            },
            2,
        );
        let msg = Message {
            room: "lobby".into(),
            sender: "ada".into(),
            text: "hi".into(),
            timestamp_ms: 1,
            flags: Default::default(),
        };
        for t in ["a", "b", "c"] {
            let cmp = compare(&[say(t)], &[]);
            board.count(cmp.outcome);
            board.record(ShadowPair::new("x", &msg, &[say(t)], &[], cmp, "2"));
        }
        let snap = board.snapshot();
        assert_eq!(snap.count(Outcome::OnlyLive), 3);
        let kept: Vec<&str> = snap
            .recent
            .iter()
            .map(|p| p.live[0].text.as_str())
            .collect();
        assert_eq!(kept, ["c", "b"]);
    }

    #[tokio::test]
    async fn scratch_kv_reads_live_state_and_never_changes_it() {
        let store = Store::open_in_memory().unwrap();
        let live = KvCap {
            store: store.clone(),
            persona: "p".into(),
            quota_bytes: 64,
            value_bytes: 16,
        };
        live.set("a".into(), b"live".to_vec()).await.unwrap();
        live.set("b".into(), b"gone".to_vec()).await.unwrap();
        let scratch = ScratchKv::new(KvCap {
            store: store.clone(),
            persona: "p".into(),
            quota_bytes: 64,
            value_bytes: 16,
        });
        assert_eq!(
            scratch.get("a".into()).await.unwrap(),
            Some(b"live".to_vec())
        );
        scratch.set("a".into(), b"shadow".to_vec()).await.unwrap();
        scratch.set("c".into(), b"new".to_vec()).await.unwrap();
        assert!(scratch.delete("b".into()).await.unwrap());
        assert!(!scratch.delete("b".into()).await.unwrap());
        assert_eq!(
            scratch.get("a".into()).await.unwrap(),
            Some(b"shadow".to_vec())
        );
        assert_eq!(scratch.get("b".into()).await.unwrap(), None);
        assert_eq!(scratch.list(String::new()).await.unwrap(), ["a", "c"]);
        // The live namespace is as it was.
        assert_eq!(store.kv_get("p", "a").unwrap(), Some(b"live".to_vec()));
        assert_eq!(store.kv_get("p", "b").unwrap(), Some(b"gone".to_vec()));
        assert_eq!(store.kv_get("p", "c").unwrap(), None);
        assert_eq!(live.list(String::new()).await.unwrap(), ["a", "b"]);
        assert!(matches!(
            scratch.set("d".into(), vec![0; 17]).await,
            Err(kv::Error::ValueTooLarge(_))
        ));
        for i in 0..3 {
            scratch.set(format!("q{i}"), vec![0; 15]).await.unwrap();
        }
        assert!(matches!(
            scratch.set("q3".into(), vec![0; 15]).await,
            Err(kv::Error::QuotaExceeded(_))
        ));
    }

    #[test]
    fn the_journal_appends_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path(), "echo");
        let msg = Message {
            room: "lobby".into(),
            sender: "ada".into(),
            text: "hi".into(),
            timestamp_ms: 1,
            flags: Default::default(),
        };
        for _ in 0..2 {
            let cmp = compare(&[], &[say("x")]);
            j.append(&ShadowPair::new("echo", &msg, &[], &[say("x")], cmp, "2"))
                .unwrap();
        }
        let text = std::fs::read_to_string(dir.path().join("shadow/echo.jsonl")).unwrap();
        let lines: Vec<ShadowPair> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].outcome, Outcome::OnlyShadow);
        assert_eq!(lines[0].shadow[0].text, "x");
    }
}
