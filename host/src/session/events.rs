//! The one stream from a session to its bot.
//!
//! The session task pushes [`SessionEvent`]s into an [`EventQueue`]; the bot reads them
//! from its [`Events`] in order. There is no other buffer and no relay task between
//! the socket and the bot, and the bot never polls the session or reads its storage:
//! what it needs to know (its network name and key, the server's throttles, the
//! connection state) arrives here.
//!
//! **One overflow rule.** The queue is bounded in count (`inbound_capacity`) and in
//! bytes of message text (`inbound_bytes`). Pushing a message into a full queue drops
//! the *oldest* message in it (the newest conversation matters most to a chat bot),
//! counts it in [`SessionStatus::inbound_dropped`](super::SessionStatus) and logs a
//! warning at each power of two. Control events (identity, throttle, state) are never
//! dropped and do not count against the bounds; consecutive state events collapse into
//! the latest. Pushing never waits, so a slow bot never stalls the socket.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use super::SessionState;
use crate::protocol::{ApiKey, ChatMessage};

/// Something the bot should know, in the order it happened.
#[derive(Clone, Debug)]
pub enum SessionEvent {
    /// A chat message in one of the bot's rooms (its own echoes included).
    Message(ChatMessage),
    /// The bot's identity on the network: on the first connect, after a new
    /// registration, or when the server names it differently.
    Identity { name: String, key: ApiKey },
    /// The server asked the bot to slow down (429, a rate-limit close code);
    /// `retry_after` is how long the server (or the session's backoff) says to wait.
    Throttled { retry_after: Option<Duration> },
    /// The connection changed state.
    State(SessionState),
}

impl SessionEvent {
    fn bytes(&self) -> usize {
        match self {
            SessionEvent::Message(m) => m.text.len() + m.room.len() + m.from.len(),
            _ => 0,
        }
    }
}

#[derive(Default)]
struct Inner {
    items: VecDeque<SessionEvent>,
    messages: usize,
    bytes: usize,
}

/// The bounded queue both ends share.
pub(super) struct EventQueue {
    inner: Mutex<Inner>,
    notify: Notify,
    capacity: usize,
    max_bytes: usize,
    /// Messages dropped by the overflow rule.
    pub(super) dropped: AtomicU64,
    /// The session has stopped: nothing more will come.
    closed: AtomicBool,
}

impl std::fmt::Debug for EventQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventQueue")
            .field("waiting", &self.len())
            .field("dropped", &self.dropped.load(Ordering::Relaxed))
            .finish()
    }
}

impl EventQueue {
    pub(super) fn new(capacity: usize, max_bytes: usize) -> Arc<Self> {
        Arc::new(EventQueue {
            inner: Mutex::default(),
            notify: Notify::new(),
            capacity: capacity.max(1),
            max_bytes: max_bytes.max(1),
            dropped: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an event; returns the message dropped to make room, if any.
    pub(super) fn push(&self, event: SessionEvent) -> Option<ChatMessage> {
        let mut q = self.lock();
        let mut dropped = None;
        match &event {
            SessionEvent::Message(_) => {
                let size = event.bytes();
                while q.messages > 0
                    && (q.messages >= self.capacity || q.bytes + size > self.max_bytes)
                {
                    let Some(i) = q
                        .items
                        .iter()
                        .position(|e| matches!(e, SessionEvent::Message(_)))
                    else {
                        break;
                    };
                    if let Some(SessionEvent::Message(m)) = q.items.remove(i) {
                        q.messages -= 1;
                        q.bytes -= m.text.len() + m.room.len() + m.from.len();
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                        dropped = Some(m);
                    }
                }
                q.messages += 1;
                q.bytes += size;
                q.items.push_back(event);
            }
            SessionEvent::State(_) => {
                if let Some(SessionEvent::State(last)) = q.items.back_mut() {
                    if let SessionEvent::State(s) = event {
                        *last = s;
                    }
                } else {
                    q.items.push_back(event);
                }
            }
            _ => q.items.push_back(event),
        }
        drop(q);
        self.notify.notify_one();
        dropped
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    fn try_pop(&self) -> Option<SessionEvent> {
        let mut q = self.lock();
        let event = q.items.pop_front()?;
        if let SessionEvent::Message(m) = &event {
            q.messages -= 1;
            q.bytes -= m.text.len() + m.room.len() + m.from.len();
        }
        Some(event)
    }

    /// Messages waiting.
    pub(super) fn len(&self) -> usize {
        self.lock().messages
    }
}

/// The bot's end of its session's event stream. Not cloneable: one reader.
pub struct Events {
    queue: Arc<EventQueue>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("waiting", &self.queue.len())
            .finish()
    }
}

impl Events {
    pub(super) fn new(queue: Arc<EventQueue>) -> Self {
        Events { queue }
    }

    /// The next event; `None` once the session has stopped and everything queued
    /// before has been read.
    pub async fn recv(&mut self) -> Option<SessionEvent> {
        loop {
            if let Some(event) = self.queue.try_pop() {
                return Some(event);
            }
            if self.queue.closed.load(Ordering::SeqCst) {
                return self.queue.try_pop();
            }
            self.queue.notify.notified().await;
        }
    }

    /// The next chat message, skipping other events (for callers that need only
    /// the conversation).
    pub async fn recv_message(&mut self) -> Option<ChatMessage> {
        loop {
            if let SessionEvent::Message(m) = self.recv().await? {
                return Some(m);
            }
        }
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<SessionEvent> {
        self.queue.try_pop()
    }

    /// Messages waiting to be read.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: usize) -> SessionEvent {
        SessionEvent::Message(ChatMessage {
            room: "lobby".into(),
            from: "ada".into(),
            text: format!("m{i}"),
            timestamp_ms: i as u64,
        })
    }

    fn texts(events: &mut Events) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(e) = events.try_recv() {
            match e {
                SessionEvent::Message(m) => out.push(m.text),
                SessionEvent::State(s) => out.push(format!("state {s}")),
                other => out.push(format!("{other:?}")),
            }
        }
        out
    }

    #[test]
    fn overflow_drops_the_oldest_message_and_counts_it() {
        let q = EventQueue::new(3, 1 << 20);
        let mut ev = Events::new(q.clone());
        q.push(SessionEvent::Throttled { retry_after: None });
        for i in 0..5 {
            q.push(msg(i));
        }
        assert_eq!(q.dropped.load(Ordering::Relaxed), 2);
        let got = texts(&mut ev);
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(got[0].starts_with("Throttled"), "control events are kept");
        assert_eq!(&got[1..], ["m2", "m3", "m4"]);
    }

    #[test]
    fn the_byte_bound_holds_too() {
        // Each message is 5 + 3 + 2 = 10 bytes ("lobby", "ada", "mN").
        let q = EventQueue::new(100, 25);
        let mut ev = Events::new(q.clone());
        for i in 0..4 {
            q.push(msg(i));
        }
        assert_eq!(texts(&mut ev), ["m2", "m3"]);
        assert_eq!(q.dropped.load(Ordering::Relaxed), 2);
        // A message larger than the whole bound is still delivered alone.
        q.push(SessionEvent::Message(ChatMessage {
            room: "lobby".into(),
            from: "ada".into(),
            text: "x".repeat(100),
            timestamp_ms: 9,
        }));
        assert_eq!(texts(&mut ev).len(), 1);
    }

    #[test]
    fn consecutive_states_collapse() {
        let q = EventQueue::new(4, 1 << 20);
        let mut ev = Events::new(q.clone());
        q.push(SessionEvent::State(SessionState::Connecting));
        q.push(SessionEvent::State(SessionState::Joined));
        q.push(msg(1));
        q.push(SessionEvent::State(SessionState::Active));
        assert_eq!(texts(&mut ev), ["state joined", "m1", "state active"]);
    }

    #[tokio::test]
    async fn recv_ends_after_close_once_drained() {
        let q = EventQueue::new(4, 1 << 20);
        let mut ev = Events::new(q.clone());
        q.push(msg(1));
        q.close();
        assert!(matches!(ev.recv().await, Some(SessionEvent::Message(_))));
        assert!(ev.recv().await.is_none());
    }
}
