//! A live bot: one persona, one session, one policy, a bounded inbound queue and
//! a worker that handles its messages in order.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::plugin::bindings::Manifest;
use crate::plugin::{Grants, PersonaComponent, PersonaContext, Runtime, Sandbox, manifest};
use crate::policy::{BotIdentity, Clock, Policy};
use crate::protocol::ChatMessage;
use crate::session::{self, SessionHandle, SessionStatus};
use crate::store::Store;

use super::caps::{HistoryCap, KvCap};
use super::core::{BotCore, CoreCounters, Effect};
use super::history::History;

/// What every bot of a host shares.
#[derive(Clone)]
pub struct HostContext {
    pub runtime: Runtime,
    pub store: Store,
    pub config: Arc<Config>,
    /// Where running bots register for metrics and health.
    pub probes: crate::telemetry::Probes,
    /// The LLM providers (built once from `[llm]`) and every persona's token budget.
    pub llm: Arc<crate::llm::LlmHub>,
}

/// Inbound messages waiting for the persona: bounded, the oldest dropped on overflow.
pub struct InboundQueue {
    capacity: usize,
    items: Mutex<VecDeque<ChatMessage>>,
    notify: Notify,
    pub dropped: AtomicU64,
}

impl InboundQueue {
    pub fn new(capacity: usize) -> Self {
        InboundQueue {
            capacity: capacity.max(1),
            items: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Adds a message; returns the message dropped to make room, if any.
    pub fn push(&self, msg: ChatMessage) -> Option<ChatMessage> {
        let mut q = self.items.lock().unwrap_or_else(|p| p.into_inner());
        let dropped = if q.len() >= self.capacity {
            q.pop_front()
        } else {
            None
        };
        q.push_back(msg);
        drop(q);
        if dropped.is_some() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.notify.notify_one();
        dropped
    }

    pub fn try_pop(&self) -> Option<ChatMessage> {
        self.items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    pub async fn pop(&self) -> ChatMessage {
        loop {
            if let Some(m) = self.try_pop() {
                return m;
            }
            self.notify.notified().await;
        }
    }

    pub fn len(&self) -> usize {
        self.items.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counters of one bot besides its session's.
#[derive(Debug, Clone, Default)]
pub struct BotCounters {
    pub queue_dropped: u64,
    pub core: CoreCounters,
    pub policy: crate::policy::PolicyCounters,
    /// The persona's sandbox: calls, failures, quarantines, call latency.
    pub sandbox: crate::plugin::sandbox::SandboxStats,
    /// Whether the persona is quarantined right now.
    pub quarantined: bool,
    /// Versions swapped in by hot reload.
    pub reloads: u64,
}

/// A running bot.
pub struct Bot {
    pub label: String,
    pub manifest: Manifest,
    pub session: SessionHandle,
    pub queue: Arc<InboundQueue>,
    counters: Arc<Mutex<BotCounters>>,
    stop: watch::Sender<bool>,
    worker: JoinHandle<()>,
    forwarder: JoinHandle<()>,
    probes: crate::telemetry::Probes,
    /// Hot reload: new persona versions for the worker to install between messages.
    swaps: tokio::sync::mpsc::UnboundedSender<super::reload::Swap>,
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
        let rooms_joined: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let mut grants = Grants::default();
        if cfg.history.allow {
            grants.history = Some(Arc::new(HistoryCap {
                history: history.clone(),
                rooms: rooms_joined.clone(),
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
        let mut m = sandbox.describe().await?;
        if let Some(n) = &cfg.name {
            m.name = n.clone();
        }
        if let Some(d) = &cfg.description {
            m.description = d.clone();
        }
        if let Some(r) = &cfg.rooms {
            m.rooms = r.clone();
        }
        manifest::validate(&m).map_err(|e| anyhow::anyhow!("persona `{label}`: {e}"))?;
        sandbox.context().set_bot_name(&m.name);
        *rooms_joined.lock().unwrap_or_else(|p| p.into_inner()) = m.rooms.iter().cloned().collect();

        let mut scfg = host.config.session_config();
        scfg.persona = m.name.clone();
        scfg.name = m.name.clone();
        scfg.description = m.description.clone();
        scfg.rooms = m.rooms.clone();
        let (session, mut inbound) = session::spawn(scfg, host.store.clone())?;

        let policy = Policy::new(
            &host.config.policy,
            BotIdentity::new(m.name.clone(), m.name.clone()),
            Clock::real(),
        )?;
        // Replies containing a key the host holds are blocked: every LLM provider key
        // here, the bot's own chat key once registration has stored it.
        for key in host.llm.known_secrets() {
            policy.add_known_secret(secrecy::ExposeSecret::expose_secret(&key));
        }
        let mut core = BotCore::new(sandbox, policy, m.clone(), history.clone());

        let queue = Arc::new(InboundQueue::new(host.config.session.inbound_queue));
        let forwarder = {
            let queue = queue.clone();
            let label = label.clone();
            tokio::spawn(async move {
                while let Some(msg) = inbound.recv().await {
                    if let Some(old) = queue.push(msg) {
                        tracing::warn!(
                            bot = %label,
                            room = %old.room,
                            dropped = queue.dropped.load(Ordering::Relaxed),
                            "inbound queue full: dropped the oldest message"
                        );
                    }
                }
            })
        };

        let counters = Arc::new(Mutex::new(BotCounters::default()));
        let (stop, mut stopped) = watch::channel(false);
        let (swaps, mut swap_rx) = tokio::sync::mpsc::unbounded_channel::<super::reload::Swap>();
        let worker = {
            let session = session.clone();
            let queue = queue.clone();
            let counters = counters.clone();
            let store = host.store.clone();
            let server = host.config.server.url.clone();
            let label = label.clone();
            let persona = m.name.clone();
            tokio::spawn(async move {
                let mut identity = IdentityTracker::new(&server, &persona);
                let mut state = Some(session.watch());
                loop {
                    identity.refresh(&session, &store, &mut core);
                    let state_changed = async {
                        match state.as_mut() {
                            Some(rx) => rx.changed().await.is_ok(),
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        biased;
                        _ = async { stopped.wait_for(|s| *s).await.is_ok() } => break,
                        alive = state_changed => {
                            if !alive {
                                state = None;
                            }
                        }
                        // A new version is installed between two messages, never
                        // during one (see `reload`).
                        Some(swap) = swap_rx.recv() => {
                            let effects = swap.install(&mut core);
                            apply(&label, &session, &rooms_joined, &history, effects);
                            counters.lock().unwrap_or_else(|p| p.into_inner()).reloads += 1;
                        }
                        msg = queue.pop() => {
                            identity.refresh(&session, &store, &mut core);
                            let (_verdict, effects) = core.handle(&msg).await;
                            apply(&label, &session, &rooms_joined, &history, effects);
                            let mut c = counters.lock().unwrap_or_else(|p| p.into_inner());
                            c.queue_dropped = queue.dropped.load(Ordering::Relaxed);
                            c.core = core.counters();
                            c.policy = core.policy.counters();
                            c.sandbox = core.sandbox.stats().clone();
                            c.quarantined = core.sandbox.quarantined_for().is_some();
                        }
                    }
                }
            })
        };
        tracing::info!(bot = %label, name = %m.name, rooms = ?m.rooms, "bot started");
        let probes = host.probes.clone();
        probes.insert(
            &label,
            crate::telemetry::BotProbe {
                session: session.clone(),
                counters: counters.clone(),
            },
        );
        Ok(Bot {
            label,
            manifest: m,
            session,
            queue,
            counters,
            stop,
            worker,
            forwarder,
            probes,
            swaps,
        })
    }

    pub fn status(&self) -> SessionStatus {
        self.session.status()
    }

    /// Hands a new persona version to the worker, which installs it before the next
    /// message (the one in flight, if any, finishes on the old version). False if the
    /// worker has stopped.
    #[must_use]
    pub fn swap(&self, swap: super::reload::Swap) -> bool {
        self.swaps.send(swap).is_ok()
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
        let _ = self.stop.send(true);
        let _ = self.worker.await;
        self.forwarder.abort();
        self.session.shutdown().await;
        tracing::info!(bot = %self.label, "bot stopped");
    }
}

/// Carries out the effects of one message on the session.
fn apply(
    label: &str,
    session: &SessionHandle,
    rooms: &Mutex<BTreeSet<String>>,
    history: &History,
    effects: Vec<Effect>,
) {
    for effect in effects {
        match effect {
            Effect::Say { room, text } => {
                if let Err(e) = session.send(&room, &text) {
                    tracing::warn!(bot = %label, room = %room, "reply not queued: {e}");
                }
            }
            Effect::Join(room) => match session.join(&room) {
                Ok(()) => {
                    rooms.lock().unwrap_or_else(|p| p.into_inner()).insert(room);
                }
                Err(e) => tracing::warn!(bot = %label, room = %room, "join refused: {e}"),
            },
            Effect::Leave(room) => match session.leave(&room) {
                Ok(()) => {
                    rooms
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&room);
                    history.forget(&room);
                }
                Err(e) => tracing::warn!(bot = %label, room = %room, "leave refused: {e}"),
            },
            Effect::Dropped { .. } | Effect::Refused { .. } | Effect::PluginError(_) => {}
        }
    }
}

/// Follows the name the network gave the bot and feeds its key to the secret
/// scanner once registration has stored it.
struct IdentityTracker {
    /// Server throttles already passed on to the outbound policy.
    throttles: u64,
    endpoints: Option<session::http::Endpoints>,
    persona: String,
    name: Option<String>,
    key_known: bool,
}

impl IdentityTracker {
    fn new(server: &str, persona: &str) -> Self {
        IdentityTracker {
            throttles: 0,
            endpoints: session::http::Endpoints::parse(server).ok(),
            persona: persona.to_string(),
            name: None,
            key_known: false,
        }
    }

    fn refresh(&mut self, session: &SessionHandle, store: &Store, core: &mut BotCore) {
        let status = session.status();
        // The server asked us to slow down: outbound replies back off too (dropped,
        // with a reason, rather than piling up in the outbox).
        if status.throttles > self.throttles {
            self.throttles = status.throttles;
            let pause = core.policy.on_server_throttle(None);
            tracing::warn!(
                bot = %core.label,
                pause_ms = pause.as_millis() as u64,
                "server throttled the bot; replies paused"
            );
        }
        let Some(name) = status.name else {
            return;
        };
        if self.name.as_deref() != Some(name.as_str()) {
            core.set_network_name(&name);
            self.name = Some(name);
            self.key_known = false;
        }
        if !self.key_known
            && let Some(ep) = &self.endpoints
            && let Ok(Some(id)) = session::identity::load(store, ep, &self.persona)
        {
            core.policy.add_known_secret(id.key.expose());
            self.key_known = true;
        }
    }
}
