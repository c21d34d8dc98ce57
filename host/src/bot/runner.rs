//! A live bot: one persona, one session, one policy, a bounded inbound queue and
//! a worker that handles its messages in order.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::plugin::bindings::Manifest;
use crate::plugin::{Grants, PersonaComponent, PersonaContext, Sandbox, manifest};
use crate::policy::{BotIdentity, Clock, Policy};
use crate::session::{self, Membership, SessionEvent, SessionHandle, SessionStatus};

use super::caps::{HistoryCap, KvCap};
use super::compare::ShadowBoard;
use super::context::{HostContext, NameClaims};
use super::core::Swap;
use super::core::{BotCore, Effect};
use super::history::History;
use super::shadow::{Shadow, ShadowSeams};
use super::stats::BotCounters;

/// The error of a failed persona call among a message's effects.
fn failed_call(effects: &[Effect]) -> Option<String> {
    effects.iter().find_map(|e| match e {
        Effect::PluginError(e) => Some(e.clone()),
        _ => None,
    })
}

/// A running bot.
pub struct Bot {
    pub label: String,
    pub manifest: Manifest,
    pub session: SessionHandle,
    counters: Arc<Mutex<BotCounters>>,
    stop: watch::Sender<bool>,
    worker: JoinHandle<()>,
    probes: crate::telemetry::Probes,
    names: NameClaims,
    /// Hot reload: new persona versions (and shadows) for the worker to install
    /// between messages.
    swaps: tokio::sync::mpsc::UnboundedSender<WorkerCmd>,
    /// What a shadow of this bot borrows from it.
    seams: ShadowSeams,
}

/// What the worker installs between two messages.
enum WorkerCmd {
    /// A new version of the persona.
    Swap(Swap),
    /// A new shadow, or none.
    Shadow(Option<Shadow>),
}

impl Bot {
    /// Describes the persona, registers/connects the session and starts the worker.
    pub async fn start(
        host: &HostContext,
        component: Arc<PersonaComponent>,
    ) -> anyhow::Result<Bot> {
        let label = component.label.clone();
        let cfg = host.config.persona(&label);
        let history = Arc::new(History::new(cfg.history.limit as usize));
        // The session owns the membership; the persona's `history` reads it.
        let membership = Membership::default();
        let mut grants = Grants::default();
        if cfg.history.allow {
            grants.history = Some(Arc::new(HistoryCap {
                history: history.clone(),
                rooms: membership.clone(),
                limit: cfg.history.limit,
            }));
        }
        if cfg.kv.allow {
            // The namespace is the label (file stem): the persona cannot choose it.
            grants.kv = Some(Arc::new(KvCap {
                store: host.store.clone(),
                persona: label.clone(),
                quota_bytes: cfg.kv.quota_bytes,
                value_bytes: cfg.kv.value_bytes,
            }));
        }
        // A grant naming a provider the hub lacks fails this bot's start (one line).
        grants.llm = host.llm.backend(&label, &cfg.llm)?;
        let wanted = cfg.name.clone().unwrap_or_else(|| label.clone());
        let ctx = PersonaContext::new(&label, &wanted, cfg.settings.clone(), grants);
        let mut sandbox = Sandbox::new(
            host.runtime.clone(),
            component,
            ctx,
            host.config.limits_for(&label),
        );
        // A start-up `describe` can lose its CPU budget to a machine busy starting
        // thousands of bots at once: one more try before the bot is given up.
        let mut m = match sandbox.describe().await {
            Ok(m) => m,
            Err(first) => {
                tracing::warn!(bot = %label, "{first}; trying once more");
                sandbox.describe().await?
            }
        };
        if let Some(n) = &cfg.name {
            m.name = n.clone();
        }
        if let Some(d) = &cfg.description {
            m.description = d.clone();
        }
        if let Some(r) = &cfg.rooms {
            m.rooms = r.clone();
        }
        manifest::validate_with(&m, &host.scanner())
            .map_err(|e| anyhow::anyhow!("persona `{label}`: {e}"))?;
        sandbox.context().set_bot_name(&m.name);
        let mut scfg = host.config.session_config();
        // The identity (key, outbox, recovery positions) belongs to the file label,
        // never to the name a manifest claims.
        let server = host.server_base();
        // An identity stored under the name by an older roost moves to the label,
        // unless a persona file of that name is here to own it.
        let name_has_a_file = host
            .config
            .paths
            .plugins
            .join(format!("{}.wasm", m.name))
            .exists();
        if let Err(e) = host.store.adopt_legacy_identity(
            &server,
            &m.name,
            &label,
            cfg.name.is_some() || !name_has_a_file,
        ) {
            tracing::warn!(bot = %label, error = %e, "cannot move a stored identity to this persona");
        }
        host.names.claim(&host.store, &server, &label, &m.name)?;
        scfg.persona = label.clone();
        scfg.name = m.name.clone();
        scfg.description = m.description.clone();
        scfg.rooms = m.rooms.clone();
        let seams = ShadowSeams {
            label: label.clone(),
            bot_name: m.name.clone(),
            history: history.clone(),
            rooms: membership.clone(),
            board: Arc::new(ShadowBoard::default()),
        };
        let (session, mut events) = match session::spawn_with(scfg, host.store.clone(), membership)
        {
            Ok(spawned) => spawned,
            Err(e) => {
                host.names.release(&label);
                return Err(e.into());
            }
        };

        let mut policy = Policy::new(
            &host.config.policy,
            BotIdentity::new(m.name.clone(), m.name.clone()),
            Clock::real(),
        )?;
        // Replies containing a piece of a key the host holds are blocked: every LLM
        // provider key, every bot's chat key once its session reports it. The persona's
        // log lines go through the same scanner.
        policy.share_known_secrets(host.known.clone());
        sandbox.context().log.set_scanner(policy.scanner().clone());
        let mut core = BotCore::new(
            sandbox,
            policy,
            m.clone(),
            history.clone(),
            session.membership().clone(),
        );

        let mut first = BotCounters::default();
        first.persona.installed(&core);
        let counters = Arc::new(Mutex::new(first));
        let (stop, mut stopped) = watch::channel(false);
        let (swaps, mut swap_rx) = tokio::sync::mpsc::unbounded_channel::<WorkerCmd>();
        let worker = {
            let session = session.clone();
            let counters = counters.clone();
            let label = label.clone();
            tokio::spawn(async move {
                let mut identity = IdentityTracker::default();
                let mut shadow: Option<Shadow> = None;
                loop {
                    tokio::select! {
                        biased;
                        _ = async { stopped.wait_for(|s| *s).await.is_ok() } => break,
                        // A new version is installed between two messages, never
                        // during one (see `reload`).
                        Some(cmd) = swap_rx.recv() => match cmd {
                            WorkerCmd::Swap(swap) => {
                                let effects = swap.install(&mut core);
                                apply(&label, &session, &history, effects);
                                let mut c = counters.lock().unwrap_or_else(|p| p.into_inner());
                                c.reloads += 1;
                                c.persona.installed(&core);
                            }
                            WorkerCmd::Shadow(new) => {
                                if let (Some(s), Some((name, key))) = (&new, &identity.known) {
                                    s.identity(name, key);
                                }
                                shadow = new;
                            }
                        },
                        event = events.recv() => {
                            let Some(event) = event else { break };
                            let SessionEvent::Message(msg) = event else {
                                identity.on_event(event, &mut core, shadow.as_ref());
                                continue;
                            };
                            let handled = core.handle_observed(&msg).await;
                            let effects = handled.effects;
                            let failed = failed_call(&effects);
                            // The shadow sees the message only once the live reply is
                            // in the outbox.
                            let for_shadow = match (&shadow, handled.delivered) {
                                (Some(_), Some(delivered)) => Some((delivered, effects.clone())),
                                _ => None,
                            };
                            apply(&label, &session, &history, effects);
                            if events.is_empty() {
                                session.commit_waiting();
                            }
                            if let (Some(s), Some((delivered, live))) = (&shadow, for_shadow) {
                                s.offer(delivered, live);
                            }
                            let mut c = counters.lock().unwrap_or_else(|p| p.into_inner());
                            // (A call refused during quarantine is not a new failure.)
                            let failed = failed
                                .filter(|_| core.sandbox.stats().failures > c.sandbox.failures);
                            c.core = core.counters();
                            c.policy = core.policy.counters();
                            c.sandbox = core.sandbox.stats().clone();
                            c.quarantined = core.sandbox.quarantined_for().is_some();
                            c.persona.handled(failed, core.sandbox.quarantined_for());
                        }
                    }
                }
                // Replies queued to be committed with a later one go now.
                session.commit_waiting();
            })
        };
        tracing::info!(bot = %label, name = %m.name, rooms = ?m.rooms, "bot started");
        let probes = host.probes.clone();
        probes.insert(
            &label,
            crate::telemetry::BotProbe {
                session: session.clone(),
                counters: counters.clone(),
                shadow: seams.board.clone(),
            },
        );
        Ok(Bot {
            label,
            manifest: m,
            session,
            counters,
            stop,
            worker,
            probes,
            names: host.names.clone(),
            swaps,
            seams,
        })
    }

    pub fn status(&self) -> SessionStatus {
        self.session.status()
    }

    /// Hands a new persona version to the worker, which installs it before the next
    /// message (the one in flight, if any, finishes on the old version). False if the
    /// worker has stopped.
    #[must_use]
    pub fn swap(&self, swap: Swap) -> bool {
        self.swaps.send(WorkerCmd::Swap(swap)).is_ok()
    }

    /// Starts `component` as this bot's shadow (see [`super::shadow`]), replacing
    /// the one it has, if any (which stops after the message it is on).
    pub async fn start_shadow(
        &self,
        host: &HostContext,
        component: Arc<PersonaComponent>,
    ) -> anyhow::Result<()> {
        let mut seams = self.seams.clone();
        if let Some(name) = self.session.status().name {
            seams.bot_name = name;
        }
        let shadow = super::shadow::start(host, &seams, component).await?;
        if self.swaps.send(WorkerCmd::Shadow(Some(shadow))).is_err() {
            self.seams.board.stopped();
            anyhow::bail!("the bot's worker has stopped");
        }
        Ok(())
    }

    /// Stops this bot's shadow, if it has one.
    pub fn stop_shadow(&self) {
        let _ = self.swaps.send(WorkerCmd::Shadow(None));
        self.seams.board.stopped();
    }

    /// The bot's shadow outcomes and last differing pairs.
    pub fn shadow(&self) -> super::compare::BoardSnapshot {
        self.seams.board.snapshot()
    }

    pub fn counters(&self) -> BotCounters {
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops taking messages, lets the one in flight finish, flushes the outbox
    /// (bounded by the session's `shutdown_flush`) and closes the socket normally.
    pub async fn stop(self) {
        self.probes.remove(&self.label);
        self.names.release(&self.label);
        let _ = self.stop.send(true);
        let _ = self.worker.await;
        self.session.shutdown().await;
        tracing::info!(bot = %self.label, "bot stopped");
    }
}

/// Carries out the effects of one message on the session.
fn apply(label: &str, session: &SessionHandle, history: &History, effects: Vec<Effect>) {
    for effect in effects {
        match effect {
            Effect::Say { room, text } => {
                if let Err(e) = session.send(&room, &text) {
                    tracing::warn!(bot = %label, room = %room, "reply not queued: {e}");
                }
            }
            Effect::Join(room) => {
                if let Err(e) = session.join(&room) {
                    tracing::warn!(bot = %label, room = %room, "join refused: {e}");
                }
            }
            Effect::Leave(room) => match session.leave(&room) {
                Ok(()) => history.forget(&room),
                Err(e) => tracing::warn!(bot = %label, room = %room, "leave refused: {e}"),
            },
            Effect::Dropped { .. } | Effect::Refused { .. } | Effect::PluginError(_) => {}
        }
    }
}

/// What the session tells the bot besides messages: the name the network knows it
/// by (followed into the policy and the persona's `config.bot-name`), its chat key
/// (added to the secret scanner), and the server's throttles (outbound replies
/// pause for the Retry-After).
#[derive(Default)]
struct IdentityTracker {
    name: Option<String>,
    /// The last name and key, for a shadow started later.
    known: Option<(String, crate::protocol::ApiKey)>,
}

impl IdentityTracker {
    fn on_event(&mut self, event: SessionEvent, core: &mut BotCore, shadow: Option<&Shadow>) {
        match event {
            SessionEvent::Identity { name, key } => {
                if self.name.as_deref() != Some(name.as_str()) {
                    core.set_network_name(&name);
                    self.name = Some(name.clone());
                }
                core.policy.add_known_secret(key.expose());
                if let Some(s) = shadow {
                    s.identity(&name, &key);
                }
                self.known = Some((name, key));
            }
            SessionEvent::Throttled { retry_after } => {
                let pause = core.policy.on_server_throttle(retry_after);
                tracing::warn!(
                    bot = %core.label,
                    pause_ms = pause.as_millis() as u64,
                    "server throttled the bot; replies paused"
                );
            }
            SessionEvent::State(_) | SessionEvent::Message(_) => {}
        }
    }
}
