//! A bounded "seen" set of chat messages, keyed on (room, sender, text) and timestamp.
//!
//! The network gives messages no id, so this tuple is the identity of a message. The
//! timestamp is compared with the precision the two copies share: the WebSocket carries
//! milliseconds, but REST history may carry whole seconds (or ISO strings without a
//! fraction), so a copy whose timestamp is a whole second matches any copy less than a
//! second from it; otherwise the milliseconds must be equal. The set forgets the oldest
//! keys first once it holds `capacity` of them; the capacity only has to cover the
//! overlap between live traffic and a recovery fetch (seconds of traffic).

use std::collections::hash_map::DefaultHasher;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use crate::protocol::ChatMessage;

/// The content of a message: a 128-bit digest of (room, sender, text) built from two
/// independently keyed 64-bit hashes, so the set costs a few dozen bytes per message
/// whatever the text length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MessageKey(u64, u64);

impl MessageKey {
    pub fn of(msg: &ChatMessage) -> Self {
        let digest = |salt: u64| {
            let mut h = DefaultHasher::new();
            salt.hash(&mut h);
            msg.room.hash(&mut h);
            msg.from.hash(&mut h);
            msg.text.hash(&mut h);
            h.finish()
        };
        MessageKey(digest(0x9e37_79b9_7f4a_7c15), digest(0xc2b2_ae3d_27d4_eb4f))
    }
}

/// Whether two timestamps of the same message content are the same message: equal, or
/// less than a second apart when one of them has only whole-second precision.
pub fn same_instant(a: u64, b: u64) -> bool {
    a == b || ((a.is_multiple_of(1000) || b.is_multiple_of(1000)) && a.abs_diff(b) < 1000)
}

/// The timestamps seen with one content: nearly always one, kept inline.
#[derive(Debug)]
struct Stamps {
    first: u64,
    more: Vec<u64>,
}

impl Stamps {
    fn any(&self, f: impl Fn(u64) -> bool) -> bool {
        f(self.first) || self.more.iter().any(|t| f(*t))
    }

    /// Removes `ts`; true if none is left.
    fn remove(&mut self, ts: u64) -> bool {
        if self.first == ts {
            match self.more.pop() {
                Some(next) => self.first = next,
                None => return true,
            }
        } else if let Some(i) = self.more.iter().position(|t| *t == ts) {
            self.more.swap_remove(i);
        }
        false
    }
}

/// Bounded FIFO set of messages.
#[derive(Debug)]
pub struct SeenSet {
    capacity: usize,
    order: VecDeque<(MessageKey, u64)>,
    keys: HashMap<MessageKey, Stamps>,
}

impl SeenSet {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        SeenSet {
            capacity,
            // Grown on use: most of thousands of bots see few messages (4,096 keys
            // allocated up front cost ~100 KB per bot).
            order: VecDeque::new(),
            keys: HashMap::new(),
        }
    }

    pub fn contains(&self, msg: &ChatMessage) -> bool {
        self.contains_key(&MessageKey::of(msg), msg.timestamp_ms)
    }

    /// [`SeenSet::contains`] for a message whose key the caller has computed (the
    /// digest hashes the whole text twice: a caller that also inserts computes it once).
    pub fn contains_key(&self, key: &MessageKey, timestamp_ms: u64) -> bool {
        self.keys
            .get(key)
            .is_some_and(|ts| ts.any(|t| same_instant(t, timestamp_ms)))
    }

    /// Records `msg`; returns false if it was already there.
    pub fn insert(&mut self, msg: &ChatMessage) -> bool {
        self.insert_key(MessageKey::of(msg), msg.timestamp_ms)
    }

    /// [`SeenSet::insert`] with the message's key computed by the caller.
    pub fn insert_key(&mut self, key: MessageKey, timestamp_ms: u64) -> bool {
        match self.keys.entry(key) {
            Entry::Occupied(mut e) => {
                if e.get().any(|t| same_instant(t, timestamp_ms)) {
                    return false;
                }
                e.get_mut().more.push(timestamp_ms);
            }
            Entry::Vacant(e) => {
                e.insert(Stamps {
                    first: timestamp_ms,
                    more: Vec::new(),
                });
            }
        }
        self.order.push_back((key, timestamp_ms));
        while self.order.len() > self.capacity {
            if let Some((old, ts)) = self.order.pop_front()
                && let Some(stamps) = self.keys.get_mut(&old)
                && stamps.remove(ts)
            {
                self.keys.remove(&old);
            }
        }
        true
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(room: &str, from: &str, ts: u64, text: &str) -> ChatMessage {
        ChatMessage {
            room: room.into(),
            from: from.into(),
            text: text.into(),
            timestamp_ms: ts,
        }
    }

    #[test]
    fn dedupes_on_all_four_fields() {
        let mut s = SeenSet::new(10);
        assert!(s.insert(&msg("r", "a", 1, "hi")));
        assert!(!s.insert(&msg("r", "a", 1, "hi")));
        assert!(s.insert(&msg("r2", "a", 1, "hi")));
        assert!(s.insert(&msg("r", "b", 1, "hi")));
        assert!(s.insert(&msg("r", "a", 2, "hi")));
        assert!(s.insert(&msg("r", "a", 1, "hi!")));
        // No ambiguity from concatenation.
        assert!(s.insert(&msg("ra", "", 1, "hi")));
        assert_eq!(s.len(), 6);
    }

    #[test]
    fn whole_seconds_from_rest_match_milliseconds_from_the_socket() {
        let mut s = SeenSet::new(10);
        assert!(s.insert(&msg("r", "a", 1_769_790_508_966, "hi")));
        // REST in whole seconds (truncated or rounded), ISO without a fraction.
        assert!(!s.insert(&msg("r", "a", 1_769_790_508_000, "hi")));
        assert!(!s.insert(&msg("r", "a", 1_769_790_509_000, "hi")));
        // Two real messages with the same text a second or more apart are two.
        assert!(s.insert(&msg("r", "a", 1_769_790_510_000, "hi")));
        // Millisecond timestamps must be equal.
        assert!(s.insert(&msg("r", "a", 1_769_790_508_967, "hi")));
        // And the other way round: seconds first, milliseconds later.
        let mut s = SeenSet::new(10);
        assert!(s.insert(&msg("r", "a", 1_769_790_508_000, "yo")));
        assert!(!s.insert(&msg("r", "a", 1_769_790_508_412, "yo")));
    }

    #[test]
    fn forgets_oldest_beyond_capacity() {
        // Millisecond timestamps (none a whole second, which would match its neighbours).
        let t = |i: u64| 1_769_790_508_001 + i;
        let mut s = SeenSet::new(3);
        for i in 0..5 {
            s.insert(&msg("r", "a", t(i), "x"));
        }
        assert_eq!(s.len(), 3);
        assert!(!s.contains(&msg("r", "a", t(0), "x")));
        assert!(!s.contains(&msg("r", "a", t(1), "x")));
        assert!(s.contains(&msg("r", "a", t(4), "x")));
    }
}
