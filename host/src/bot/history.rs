//! The recent messages of a bot's rooms as the host saw them (after inbound
//! policy, the bot's own confirmed messages included): what the `history`
//! capability serves. In memory, bounded per room.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::plugin::bindings::Message;

/// Default messages kept per room.
pub const DEFAULT_PER_ROOM: usize = 50;

#[derive(Debug)]
pub struct History {
    per_room: usize,
    rooms: Mutex<HashMap<String, VecDeque<Message>>>,
}

impl History {
    pub fn new(per_room: usize) -> Self {
        History {
            per_room: per_room.max(1),
            rooms: Mutex::new(HashMap::new()),
        }
    }

    pub fn record(&self, msg: Message) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        let q = rooms.entry(msg.room.clone()).or_default();
        q.push_back(msg);
        while q.len() > self.per_room {
            q.pop_front();
        }
    }

    /// Up to `limit` most recent messages of `room`, oldest first; `None` if the
    /// bot has seen nothing in that room.
    pub fn recent(&self, room: &str, limit: usize) -> Option<Vec<Message>> {
        let rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        let q = rooms.get(room)?;
        let skip = q.len().saturating_sub(limit);
        Some(q.iter().skip(skip).cloned().collect())
    }

    /// Forget a room (the bot left it).
    pub fn forget(&self, room: &str) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms.remove(room);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::bindings::MessageFlags;

    fn m(room: &str, n: u64) -> Message {
        Message {
            room: room.into(),
            sender: "a".into(),
            text: n.to_string(),
            timestamp_ms: n,
            flags: MessageFlags::empty(),
        }
    }

    #[test]
    fn keeps_the_last_n_per_room_oldest_first() {
        let h = History::new(3);
        for n in 0..5 {
            h.record(m("lobby", n));
        }
        h.record(m("debug", 9));
        let r = h.recent("lobby", 10).unwrap();
        assert_eq!(
            r.iter().map(|m| m.timestamp_ms).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert_eq!(h.recent("lobby", 1).unwrap()[0].timestamp_ms, 4);
        assert!(h.recent("nowhere", 5).is_none());
    }
}
