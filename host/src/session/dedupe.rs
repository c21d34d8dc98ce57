//! A bounded "seen" set of chat messages, keyed on (room, sender, timestamp, text).
//!
//! The network gives messages no id, so this tuple is the identity of a message. The set
//! forgets the oldest keys first once it holds `capacity` of them; the capacity only has
//! to cover the overlap between live traffic and a recovery fetch (seconds of traffic).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};

use crate::protocol::ChatMessage;

/// The identity of a message: a 128-bit digest of (room, sender, timestamp, text) built from
/// two independently keyed 64-bit hashes, so the set costs 16 bytes per message whatever
/// the text length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MessageKey(u64, u64);

impl MessageKey {
    pub fn of(msg: &ChatMessage) -> Self {
        let digest = |salt: u64| {
            let mut h = DefaultHasher::new();
            salt.hash(&mut h);
            msg.room.hash(&mut h);
            msg.from.hash(&mut h);
            msg.timestamp_ms.hash(&mut h);
            msg.text.hash(&mut h);
            h.finish()
        };
        MessageKey(digest(0x9e37_79b9_7f4a_7c15), digest(0xc2b2_ae3d_27d4_eb4f))
    }
}

/// Bounded FIFO set of [`MessageKey`]s.
#[derive(Debug)]
pub struct SeenSet {
    capacity: usize,
    order: VecDeque<MessageKey>,
    keys: HashSet<MessageKey>,
}

impl SeenSet {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        SeenSet {
            capacity,
            // Grown on use: most of thousands of bots see few messages (4,096 keys
            // allocated up front cost ~100 KB per bot).
            order: VecDeque::new(),
            keys: HashSet::new(),
        }
    }

    pub fn contains(&self, msg: &ChatMessage) -> bool {
        self.keys.contains(&MessageKey::of(msg))
    }

    /// Records `msg`; returns false if it was already there.
    pub fn insert(&mut self, msg: &ChatMessage) -> bool {
        let key = MessageKey::of(msg);
        if !self.keys.insert(key) {
            return false;
        }
        self.order.push_back(key);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
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
    fn forgets_oldest_beyond_capacity() {
        let mut s = SeenSet::new(3);
        for ts in 0..5 {
            s.insert(&msg("r", "a", ts, "x"));
        }
        assert_eq!(s.len(), 3);
        assert!(!s.contains(&msg("r", "a", 0, "x")));
        assert!(!s.contains(&msg("r", "a", 1, "x")));
        assert!(s.contains(&msg("r", "a", 4, "x")));
    }
}
