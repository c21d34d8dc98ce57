//! The in-memory view of a bot's persisted outbox.
//!
//! Every outbound message is a row in the store's `outbox` table before anything touches
//! the socket (see [`crate::store`]); this type keeps the open rows of one bot in id order
//! and makes the decisions:
//!
//! - which entries may go out now ([`Outbox::sendable`]): rooms joined on the current
//!   connection, in id order, each entry once per connection; an entry sent on an earlier
//!   connection goes out again only after the supervisor has checked the recovered history
//!   for its echo (it calls `sendable` only once the connection is active);
//! - which entry an echo confirms ([`Outbox::confirm_echo`]): the oldest sent entry of that
//!   room with the same text;
//! - which entries are stale ([`Outbox::expire`]).
//!
//! State changes go to the store's group commit without waiting (store failures are
//! logged there and do not stop the session: the in-memory state stays authoritative
//! for this run).

use std::collections::{BTreeMap, HashSet};

use crate::protocol::ChatMessage;
use crate::store::{OutboxEntry, OutboxId, OutboxState, Store};

#[derive(Debug)]
struct Open {
    entry: OutboxEntry,
    /// The connection it was last written to (None: never in this run).
    sent_conn: Option<u64>,
    /// The rate limits held it back at least once (it is being paced).
    paced: bool,
    /// Its row was written as handed to a connection (`sent`, one attempt) and it has
    /// not been written to one yet: its first send needs no write of its own.
    handed: bool,
}

/// Open (pending or sent-unconfirmed) entries of one bot, in id order.
#[derive(Debug)]
pub struct Outbox {
    store: Store,
    open: BTreeMap<OutboxId, Open>,
}

impl Outbox {
    /// Loads the bot's open entries (queued before a restart) from the store.
    pub fn load(store: Store, bot: &str) -> Result<Self, crate::store::StoreError> {
        // With a shared store the rows may come from another host that died between
        // writing an entry to its connection and recording that it did: an entry it
        // left pending may have been sent. Such entries count as sent once, so they
        // go out again only if the recovered history shows they never arrived.
        let maybe_sent = store.is_shared();
        let open = store
            .outbox_pending(bot)?
            .into_iter()
            .map(|mut entry| {
                if maybe_sent && entry.state == OutboxState::Pending {
                    entry.state = OutboxState::Sent;
                    entry.attempts = entry.attempts.max(1);
                }
                (
                    entry.id,
                    Open {
                        entry,
                        sent_conn: None,
                        paced: false,
                        handed: false,
                    },
                )
            })
            .collect();
        Ok(Outbox { store, open })
    }

    /// Adds an entry the handle already persisted.
    pub fn add(&mut self, entry: OutboxEntry) {
        self.add_handed(entry, false);
    }

    /// Adds an entry the handle already persisted; `handed`: its row was written as
    /// handed to a connection already (see [`crate::store::ReplyRow::handed`]), so
    /// its first send is recorded in memory only.
    pub fn add_handed(&mut self, entry: OutboxEntry, handed: bool) {
        if entry.state.is_open() {
            self.open.insert(
                entry.id,
                Open {
                    handed: handed && entry.attempts == 0,
                    entry,
                    sent_conn: None,
                    paced: false,
                },
            );
        }
    }

    /// Notes that the rate limits held `id` back; true the first time.
    pub fn mark_paced(&mut self, id: OutboxId) -> bool {
        self.open
            .get_mut(&id)
            .is_some_and(|o| !std::mem::replace(&mut o.paced, true))
    }

    /// Whether the rate limits held `id` back at some point.
    pub fn was_paced(&self, id: OutboxId) -> bool {
        self.open.get(&id).is_some_and(|o| o.paced)
    }

    /// The server refused what connection `conn` sent (not joined, rate limited): its
    /// unconfirmed entries count as not written to it, so they go out again on it.
    pub fn unsend(&mut self, conn: u64) -> usize {
        let mut n = 0;
        for o in self.open.values_mut() {
            if o.sent_conn == Some(conn) && o.entry.state == OutboxState::Sent {
                o.sent_conn = None;
                n += 1;
            }
        }
        n
    }

    /// Gives up on an entry that was sent but cannot be confirmed (it is finished as
    /// stale, never sent again). Returns it.
    pub fn give_up(&mut self, id: OutboxId) -> Option<OutboxEntry> {
        self.finish_all(&[id], OutboxState::Stale).pop()
    }

    /// Drops paced entries never sent and created before `now_ms - max_wait_ms`: they
    /// waited longer for their rate-limit slot than allowed. Returns them.
    pub fn expire_paced(&mut self, now_ms: i64, max_wait_ms: i64) -> Vec<OutboxEntry> {
        let cutoff = now_ms.saturating_sub(max_wait_ms);
        let stale: Vec<OutboxId> = self
            .open
            .values()
            .filter(|o| o.paced && o.entry.attempts == 0 && o.entry.created_at < cutoff)
            .map(|o| o.entry.id)
            .collect();
        self.finish_all(&stale, OutboxState::Stale)
    }

    /// Open entries.
    pub fn depth(&self) -> usize {
        self.open.len()
    }

    /// Open entries in the given rooms.
    pub fn depth_in(&self, rooms: &HashSet<String>) -> usize {
        self.open
            .values()
            .filter(|o| rooms.contains(&o.entry.room))
            .count()
    }

    pub fn get(&self, id: OutboxId) -> Option<&OutboxEntry> {
        self.open.get(&id).map(|o| &o.entry)
    }

    /// The oldest creation time (Unix ms) of a sent, unconfirmed entry in `room`.
    pub fn oldest_unconfirmed(&self, room: &str) -> Option<i64> {
        self.open
            .values()
            .filter(|o| o.entry.room == room && o.entry.state == OutboxState::Sent)
            .map(|o| o.entry.created_at)
            .min()
    }

    /// Entries to write on connection `conn` now, in id order: those in `joined` rooms not
    /// yet written to this connection.
    pub fn sendable(&self, conn: u64, joined: &HashSet<String>) -> Vec<OutboxId> {
        self.open
            .values()
            .filter(|o| o.sent_conn != Some(conn) && joined.contains(&o.entry.room))
            .map(|o| o.entry.id)
            .collect()
    }

    /// Records that `id` was written to connection `conn` at `now_ms` (in the store
    /// too, unless its row already says so: the first send of a handed entry).
    pub fn mark_sent(&mut self, id: OutboxId, conn: u64, now_ms: i64) {
        if let Some(o) = self.open.get_mut(&id) {
            o.sent_conn = Some(conn);
            o.entry.state = OutboxState::Sent;
            o.entry.attempts = o.entry.attempts.saturating_add(1);
            o.entry.sent_at = Some(now_ms);
            if !std::mem::take(&mut o.handed) {
                self.store.outbox_mark_sent(id, now_ms);
            }
        }
    }

    /// If `msg` (from us) is the echo of a sent entry, confirms the oldest such entry of
    /// that room and returns it. With `floor_ms`, only entries created at or after
    /// `msg.timestamp_ms - floor_ms` match (used for recovered history, where an identical
    /// older message must not confirm a newer entry).
    pub fn confirm_echo(
        &mut self,
        msg: &ChatMessage,
        floor_ms: Option<u64>,
    ) -> Option<OutboxEntry> {
        let ts = i64::try_from(msg.timestamp_ms).unwrap_or(i64::MAX);
        let id = self
            .open
            .values()
            .find(|o| {
                o.entry.state == OutboxState::Sent
                    && o.entry.room == msg.room
                    && same_text(&o.entry.text, &msg.text)
                    && floor_ms.is_none_or(|skew| {
                        ts.saturating_add(i64::try_from(skew).unwrap_or(i64::MAX))
                            >= o.entry.created_at
                    })
            })
            .map(|o| o.entry.id)?;
        let open = self.open.remove(&id)?;
        self.store.outbox_finish(id, OutboxState::Confirmed);
        let mut entry = open.entry;
        entry.state = OutboxState::Confirmed;
        Some(entry)
    }

    /// Drops entries created before `now_ms - ttl_ms` as stale and returns them.
    pub fn expire(&mut self, now_ms: i64, ttl_ms: i64) -> Vec<OutboxEntry> {
        let cutoff = now_ms.saturating_sub(ttl_ms);
        let stale: Vec<OutboxId> = self
            .open
            .values()
            .filter(|o| o.entry.created_at < cutoff)
            .map(|o| o.entry.id)
            .collect();
        self.finish_all(&stale, OutboxState::Stale)
    }

    /// Drops the open entries of `room` (the bot left it).
    pub fn cancel_room(&mut self, room: &str) -> Vec<OutboxEntry> {
        let ids: Vec<OutboxId> = self
            .open
            .values()
            .filter(|o| o.entry.room == room)
            .map(|o| o.entry.id)
            .collect();
        self.finish_all(&ids, OutboxState::Cancelled)
    }

    fn finish_all(&mut self, ids: &[OutboxId], state: OutboxState) -> Vec<OutboxEntry> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(o) = self.open.remove(id) {
                self.store.outbox_finish(*id, state);
                let mut entry = o.entry;
                entry.state = state;
                out.push(entry);
            }
        }
        out
    }
}

/// Echo matching: exact, or equal once runs of whitespace are collapsed and the ends
/// trimmed (a server may trim what it stores, or collapse its whitespace).
fn same_text(sent: &str, echoed: &str) -> bool {
    sent == echoed || sent.split_whitespace().eq(echoed.split_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Store, Outbox) {
        let store = Store::open_in_memory().unwrap();
        let ob = Outbox::load(store.clone(), "bot").unwrap();
        (store, ob)
    }

    fn push(store: &Store, ob: &mut Outbox, room: &str, text: &str, at: i64) -> OutboxId {
        let id = store.outbox_push("bot", room, text, at).unwrap();
        ob.add(store.outbox_get(id).unwrap().unwrap());
        id
    }

    fn echo(room: &str, text: &str, ts: u64) -> ChatMessage {
        ChatMessage {
            room: room.into(),
            from: "me".into(),
            text: text.into(),
            timestamp_ms: ts,
        }
    }

    fn joined(rooms: &[&str]) -> HashSet<String> {
        rooms.iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn sends_in_order_once_per_connection() {
        let (store, mut ob) = setup();
        let a = push(&store, &mut ob, "r1", "one", 1_000);
        let b = push(&store, &mut ob, "r2", "two", 1_001);
        let c = push(&store, &mut ob, "r1", "three", 1_002);
        assert_eq!(ob.sendable(1, &joined(&["r1"])), vec![a, c]);
        ob.mark_sent(a, 1, 2_000);
        assert_eq!(ob.sendable(1, &joined(&["r1", "r2"])), vec![b, c]);
        ob.mark_sent(b, 1, 2_000);
        ob.mark_sent(c, 1, 2_000);
        assert!(ob.sendable(1, &joined(&["r1", "r2"])).is_empty());
        // A new connection: everything unconfirmed is eligible again, in order.
        assert_eq!(ob.sendable(2, &joined(&["r1", "r2"])), vec![a, b, c]);
        assert_eq!(
            store.outbox_get(a).unwrap().unwrap().state,
            OutboxState::Sent
        );
    }

    #[test]
    fn echo_confirms_oldest_matching_sent_entry() {
        let (store, mut ob) = setup();
        let a = push(&store, &mut ob, "r", "same", 1_000);
        let b = push(&store, &mut ob, "r", "same", 1_001);
        let pending = push(&store, &mut ob, "r", "later", 1_002);
        // Unsent entries are never confirmed.
        assert!(ob.confirm_echo(&echo("r", "later", 5_000), None).is_none());
        ob.mark_sent(a, 1, 1_500);
        ob.mark_sent(b, 1, 1_500);
        assert!(
            ob.confirm_echo(&echo("other", "same", 5_000), None)
                .is_none()
        );
        assert_eq!(
            ob.confirm_echo(&echo("r", "same", 5_000), None).unwrap().id,
            a
        );
        assert_eq!(
            ob.confirm_echo(&echo("r", " same ", 5_001), None)
                .unwrap()
                .id,
            b
        );
        assert!(ob.confirm_echo(&echo("r", "same", 5_002), None).is_none());
        assert_eq!(
            store.outbox_get(a).unwrap().unwrap().state,
            OutboxState::Confirmed
        );
        assert_eq!(ob.depth(), 1);
        assert!(ob.get(pending).is_some());
    }

    #[test]
    fn floor_keeps_old_identical_messages_from_confirming() {
        let (store, mut ob) = setup();
        let a = push(&store, &mut ob, "r", "lol", 100_000);
        ob.mark_sent(a, 1, 100_000);
        assert!(
            ob.confirm_echo(&echo("r", "lol", 50_000), Some(5_000))
                .is_none()
        );
        assert_eq!(
            ob.confirm_echo(&echo("r", "lol", 99_000), Some(5_000))
                .unwrap()
                .id,
            a
        );
    }

    #[test]
    fn expiry_and_cancel() {
        let (store, mut ob) = setup();
        let old = push(&store, &mut ob, "r", "old", 1_000);
        let new = push(&store, &mut ob, "r", "new", 9_000);
        let other = push(&store, &mut ob, "x", "x", 9_000);
        let stale = ob.expire(10_000, 5_000);
        assert_eq!(stale.iter().map(|e| e.id).collect::<Vec<_>>(), vec![old]);
        assert_eq!(
            store.outbox_get(old).unwrap().unwrap().state,
            OutboxState::Stale
        );
        let cancelled = ob.cancel_room("x");
        assert_eq!(cancelled[0].id, other);
        assert_eq!(ob.depth(), 1);
        assert!(ob.get(new).is_some());
        assert_eq!(ob.depth_in(&joined(&["r"])), 1);
    }

    #[test]
    fn a_handed_entry_writes_its_first_send_with_its_row_and_later_ones_alone() {
        let (store, mut ob) = setup();
        let (tx, rx) = std::sync::mpsc::channel();
        let how = crate::store::ReplyRow {
            handed: true,
            here: true,
            ..Default::default()
        };
        let id =
            store.outbox_enqueue_reply("bot", "r", "hi", 1_000, Vec::new(), how, move |_, r| {
                tx.send(r).unwrap();
            });
        rx.recv().unwrap().unwrap();
        let mut entry = store.outbox_get(id).unwrap().unwrap();
        assert_eq!((entry.state, entry.attempts), (OutboxState::Sent, 1));
        // What the session holds: not written to any connection yet.
        entry.state = OutboxState::Pending;
        entry.attempts = 0;
        ob.add_handed(entry, true);
        let row = |store: &Store| {
            let e = store.outbox_get(id).unwrap().unwrap();
            (e.state, e.attempts)
        };
        ob.mark_sent(id, 1, 2_000);
        assert_eq!(ob.get(id).unwrap().attempts, 1);
        assert_eq!(row(&store), (OutboxState::Sent, 1), "no second count");
        // A re-send on the next connection is recorded on its own.
        ob.mark_sent(id, 2, 3_000);
        assert_eq!(ob.get(id).unwrap().attempts, 2);
        assert_eq!(row(&store), (OutboxState::Sent, 2));
        ob.confirm_echo(&echo("r", "hi", 3_500), None).unwrap();
        assert_eq!(row(&store), (OutboxState::Confirmed, 2));
    }

    #[test]
    fn survives_reload() {
        let (store, mut ob) = setup();
        let a = push(&store, &mut ob, "r", "one", 1_000);
        let b = push(&store, &mut ob, "r", "two", 1_001);
        ob.mark_sent(a, 7, 2_000);
        let reloaded = Outbox::load(store.clone(), "bot").unwrap();
        assert_eq!(reloaded.depth(), 2);
        assert_eq!(reloaded.oldest_unconfirmed("r"), Some(1_000));
        // After a restart nothing has been written to the new connection yet.
        assert_eq!(reloaded.sendable(1, &joined(&["r"])), vec![a, b]);
    }
}
