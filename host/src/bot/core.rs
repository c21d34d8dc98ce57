//! The decision pipeline of one bot, shared by live bots and `roost replay`:
//! inbound policy → persona → outbound policy. No I/O: it returns [`Effect`]s for
//! the caller to carry out (a live bot hands them to its session; replay prints
//! them).

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::names::RoomName;
use crate::plugin::bindings::{self, Action, Manifest, MessageFlags as WitFlags, Subscriptions};
use crate::plugin::{PersonaComponent, Sandbox};
use crate::policy::{DropReason, InboundMsg, InboundVerdict, OutboundVerdict, Policy};
use crate::protocol::ChatMessage;

use super::history::History;
use super::rooms::{LogGate, RoomGuard};
use crate::session::Membership;

/// Refused actions are logged at most once per this long (per bot).
const REFUSAL_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// What the pipeline decided for one inbound message.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Post `text` in `room`.
    Say { room: String, text: String },
    /// Join a room.
    Join(RoomName),
    /// Leave a room.
    Leave(RoomName),
    /// A reply the persona wanted that outbound policy dropped.
    Dropped { room: String, reason: DropReason },
    /// An action the host refused before policy (e.g. an invalid room name).
    Refused { what: String },
    /// The persona call failed (trap, limit, timeout, quarantine).
    PluginError(String),
}

/// One message through the pipeline (see [`BotCore::handle_observed`]).
#[derive(Debug)]
pub struct Handled {
    pub verdict: InboundVerdict,
    /// The message as the persona received it, if inbound policy delivered it.
    pub delivered: Option<bindings::Message>,
    pub effects: Vec<Effect>,
}

/// Counters the pipeline keeps besides the policy's.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CoreCounters {
    pub persona_calls: u64,
    pub plugin_errors: u64,
    pub actions_refused: u64,
    /// Joins and leaves refused by the room limits (also in `actions_refused`).
    pub joins_refused: u64,
}

/// A persona, its policy, and the bot's recent history.
pub struct BotCore {
    pub label: String,
    pub sandbox: Sandbox,
    pub policy: Policy,
    pub manifest: Manifest,
    pub history: Arc<History>,
    /// The rooms the bot is in (the session's).
    rooms: Membership,
    room_guard: RoomGuard,
    refusal_log: LogGate,
    counters: CoreCounters,
}

impl BotCore {
    /// `rooms` is the bot's room membership, as its session keeps it.
    pub fn new(
        sandbox: Sandbox,
        policy: Policy,
        manifest: Manifest,
        history: Arc<History>,
        rooms: Membership,
    ) -> Self {
        let limits = sandbox.limits();
        let room_guard = RoomGuard::new(limits.joins_per_minute, limits.max_rooms);
        BotCore {
            label: sandbox.label().to_string(),
            sandbox,
            policy,
            manifest,
            history,
            rooms,
            room_guard,
            refusal_log: LogGate::new(REFUSAL_LOG_EVERY),
            counters: CoreCounters::default(),
        }
    }

    pub fn wants_system(&self) -> bool {
        self.manifest
            .subscriptions
            .contains(Subscriptions::SYSTEM_LINES)
    }

    /// The rooms the bot is in, as the pipeline counts them.
    pub fn rooms(&self) -> &Membership {
        &self.rooms
    }

    pub fn counters(&self) -> CoreCounters {
        self.counters
    }

    /// The bot's name on the network changed (registration settled, or a suffix).
    pub fn set_network_name(&mut self, name: &str) {
        self.policy.set_network_name(name);
        self.sandbox.context().set_bot_name(name);
    }

    /// Runs one message through the pipeline. The verdict says what inbound policy
    /// decided; the effects are what to do.
    pub async fn handle(&mut self, msg: &ChatMessage) -> (InboundVerdict, Vec<Effect>) {
        let h = self.handle_observed(msg).await;
        (h.verdict, h.effects)
    }

    /// [`handle`](Self::handle), also returning the message as the persona received
    /// it (after inbound policy, with its flags), if it was delivered: what a shadow
    /// of this bot is shown.
    pub async fn handle_observed(&mut self, msg: &ChatMessage) -> Handled {
        let inbound = InboundMsg {
            room: &msg.room,
            from: &msg.from,
            text: &msg.text,
        };
        let verdict = self.policy.inbound(&inbound, self.wants_system());
        let flags = wit_flags(&verdict);
        let wit_msg = bindings::Message {
            room: msg.room.clone(),
            sender: msg.from.clone(),
            text: msg.text.clone(),
            timestamp_ms: msg.timestamp_ms,
            flags,
        };
        // History keeps what the host saw: delivered messages and the bot's own
        // confirmed ones (their echo), not system lines the persona did not ask for.
        if verdict.deliver || verdict.flags.from_self {
            self.history.record(wit_msg.clone());
        }
        if !verdict.deliver {
            return Handled {
                verdict,
                delivered: None,
                effects: Vec::new(),
            };
        }
        if let Some(rule) = verdict.injection_rule {
            tracing::info!(
                bot = %self.label,
                room = %msg.room,
                from = %msg.from,
                rule,
                "inbound message flagged suspicious (delivered with the flag)"
            );
        }
        let effects = self.respond(&wit_msg).await;
        Handled {
            verdict,
            delivered: Some(wit_msg),
            effects,
        }
    }

    /// The persona's part for a message inbound policy delivered: the call, then
    /// outbound policy on each action (no inbound policy, no history).
    pub async fn respond(&mut self, wit_msg: &bindings::Message) -> Vec<Effect> {
        let inbound = InboundMsg {
            room: &wit_msg.room,
            from: &wit_msg.sender,
            text: &wit_msg.text,
        };
        self.counters.persona_calls += 1;
        let actions = match self.sandbox.on_message(wit_msg).await {
            Ok(actions) => actions,
            Err(failure) => {
                self.counters.plugin_errors += 1;
                return vec![Effect::PluginError(failure.to_string())];
            }
        };
        let mut effects = Vec::with_capacity(actions.len());
        // Rooms joined and left by this message's earlier actions (the session
        // applies them after the message).
        let mut pending: Vec<(String, bool)> = Vec::new();
        for action in actions {
            let effect = self.decide(action, &inbound, &pending);
            match &effect {
                Effect::Join(room) => pending.push((room.as_str().to_string(), true)),
                Effect::Leave(room) => pending.push((room.as_str().to_string(), false)),
                _ => {}
            }
            effects.push(effect);
        }
        effects
    }

    fn decide(
        &mut self,
        action: Action,
        inbound: &InboundMsg<'_>,
        pending: &[(String, bool)],
    ) -> Effect {
        match action {
            Action::Say(out) => {
                if let Err(e) = RoomName::check(&out.room) {
                    return self.refuse(format!("say: {e}"));
                }
                if let Err(reason) = self.policy.check_room(&out.room) {
                    return self.refuse(format!("say: the room name contains a secret ({reason})"));
                }
                match self.policy.outbound(&out.room, &out.text, Some(inbound)) {
                    OutboundVerdict::Send(o) => {
                        if !o.delay.is_zero() {
                            tracing::debug!(
                                bot = %self.label,
                                room = %out.room,
                                wait_ms = o.delay.as_millis() as u64,
                                "reply paced by the rate limits"
                            );
                        }
                        if o.edits.notable() {
                            tracing::info!(
                                bot = %self.label,
                                room = %out.room,
                                edits = ?o.edits,
                                "outbound reply changed by normalisation"
                            );
                        }
                        Effect::Say {
                            room: out.room,
                            text: o.text,
                        }
                    }
                    OutboundVerdict::Drop(reason) => {
                        tracing::info!(
                            bot = %self.label,
                            room = %out.room,
                            reason = %reason,
                            "outbound reply dropped"
                        );
                        Effect::Dropped {
                            room: out.room,
                            reason,
                        }
                    }
                }
            }
            // Room names are public: scanned like replies (the name stays out of the log).
            Action::Join(room) => match RoomName::new(room) {
                Ok(room) => match self.policy.check_room(room.as_str()) {
                    Ok(()) => self.room_action(room, true, pending),
                    Err(reason) => {
                        self.refuse(format!("join: the room name contains a secret ({reason})"))
                    }
                },
                Err(e) => self.refuse(format!("join: {e}")),
            },
            Action::Leave(room) => match RoomName::new(room) {
                Ok(room) => match self.policy.check_room(room.as_str()) {
                    Ok(()) => self.room_action(room, false, pending),
                    Err(reason) => {
                        self.refuse(format!("leave: the room name contains a secret ({reason})"))
                    }
                },
                Err(e) => self.refuse(format!("leave: {e}")),
            },
        }
    }

    /// A join or leave within the room limits, or its refusal.
    fn room_action(&mut self, room: RoomName, join: bool, pending: &[(String, bool)]) -> Effect {
        let mut rooms = self.rooms.rooms();
        for (r, joined) in pending {
            if *joined {
                if !rooms.contains(r) {
                    rooms.push(r.clone());
                }
            } else {
                rooms.retain(|x| x != r);
            }
        }
        let already_in = rooms.iter().any(|r| r == room.as_str());
        let now = self.policy.clock().now();
        match self.room_guard.check(now, join, already_in, rooms.len()) {
            Ok(()) if join => Effect::Join(room),
            Ok(()) => Effect::Leave(room),
            Err(why) => {
                self.counters.joins_refused += 1;
                let verb = if join { "join" } else { "leave" };
                self.refuse(format!("{verb} of #{}: {why}", room.as_str()))
            }
        }
    }

    /// Counts a refused action; logs it unless refusals are being logged too often
    /// (the next line that gets through says how many were left out).
    fn refuse(&mut self, what: String) -> Effect {
        self.counters.actions_refused += 1;
        if let Some(held_back) = self.refusal_log.admit(self.policy.clock().now()) {
            if held_back > 0 {
                tracing::info!(bot = %self.label, held_back, "persona action refused: {what} ({held_back} more refusals not logged)");
            } else {
                tracing::info!(bot = %self.label, "persona action refused: {what}");
            }
        }
        Effect::Refused { what }
    }
}

/// The WIT flags for a verdict.
pub fn wit_flags(v: &InboundVerdict) -> WitFlags {
    let mut flags = WitFlags::empty();
    if v.flags.mentions_me {
        flags |= WitFlags::MENTIONS_ME;
    }
    if v.flags.from_self {
        flags |= WitFlags::FROM_SELF;
    }
    if v.flags.system {
        flags |= WitFlags::SYSTEM;
    }
    if v.flags.suspicious {
        flags |= WitFlags::SUSPICIOUS;
    }
    flags
}
// -- the swap -------------------------------------------------------------------

/// A new version of a running bot's persona, for its worker to install between two
/// messages (see [`Bot::swap`]).
pub struct Swap {
    component: Arc<PersonaComponent>,
    manifest: Manifest,
    done: Option<oneshot::Sender<()>>,
}

impl Swap {
    /// A swap to `component`, whose (effective, validated) manifest is `manifest`;
    /// the receiver completes once the worker has installed it.
    pub fn new(
        component: Arc<PersonaComponent>,
        manifest: Manifest,
    ) -> (Swap, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (
            Swap {
                component,
                manifest,
                done: Some(tx),
            },
            rx,
        )
    }

    /// Installs the new version in the worker's pipeline: the next call instantiates
    /// it. Returns the joins and leaves a change of the manifest's rooms calls for.
    pub(crate) fn install(self, core: &mut BotCore) -> Vec<Effect> {
        let Swap {
            component,
            manifest,
            done,
        } = self;
        // Manifests are validated before a swap; a room that isn't valid is no room.
        let rooms = |m: &Manifest| -> BTreeSet<RoomName> {
            m.rooms
                .iter()
                .filter_map(|r| RoomName::new(r.as_str()).ok())
                .collect()
        };
        let (old, new) = (rooms(&core.manifest), rooms(&manifest));
        core.sandbox.replace_component(component);
        core.manifest = manifest;
        let mut effects: Vec<Effect> = old.difference(&new).cloned().map(Effect::Leave).collect();
        effects.extend(new.difference(&old).cloned().map(Effect::Join));
        if let Some(done) = done {
            let _ = done.send(());
        }
        effects
    }
}
