//! Checks on what a persona's `describe` returns.

use super::bindings::Manifest;

/// Network names are 2-30 characters.
pub const NAME_MIN: usize = 2;
pub const NAME_MAX: usize = 30;
/// Longest room name accepted.
pub const ROOM_MAX: usize = 64;

/// Why a manifest is unusable. One line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest name {0:?} must be {NAME_MIN}-{NAME_MAX} characters")]
    NameLength(String),
    #[error("manifest name {0:?} contains control characters or only spaces")]
    NameChars(String),
    #[error(
        "manifest room {0:?} is not a valid room name (1-{ROOM_MAX} characters, no spaces, no `#`)"
    )]
    Room(String),
}

/// Validates a manifest as `roost check` and bot start-up do.
pub fn validate(m: &Manifest) -> Result<(), ManifestError> {
    let n = m.name.chars().count();
    if !(NAME_MIN..=NAME_MAX).contains(&n) {
        return Err(ManifestError::NameLength(m.name.clone()));
    }
    if m.name.chars().any(char::is_control) || m.name.trim().is_empty() {
        return Err(ManifestError::NameChars(m.name.clone()));
    }
    for room in &m.rooms {
        if !valid_room(room) {
            return Err(ManifestError::Room(room.clone()));
        }
    }
    Ok(())
}

/// A room name: 1-64 characters, no whitespace, control characters, `#` or `/`.
pub fn valid_room(room: &str) -> bool {
    let n = room.chars().count();
    (1..=ROOM_MAX).contains(&n)
        && !room
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '#' || c == '/' || c == '?')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::bindings::Subscriptions;

    fn m(name: &str, rooms: &[&str]) -> Manifest {
        Manifest {
            name: name.into(),
            description: String::new(),
            rooms: rooms.iter().map(|r| r.to_string()).collect(),
            version: "1".into(),
            subscriptions: Subscriptions::empty(),
        }
    }

    #[test]
    fn names_and_rooms_are_checked() {
        assert!(validate(&m("echo", &["lobby"])).is_ok());
        assert!(validate(&m("the shining ribbons", &[])).is_ok());
        assert!(validate(&m("e", &[])).is_err());
        assert!(validate(&m(&"x".repeat(31), &[])).is_err());
        assert!(validate(&m("a\nb", &[])).is_err());
        assert!(validate(&m("echo", &["#lobby"])).is_err());
        assert!(validate(&m("echo", &["two words"])).is_err());
        assert!(validate(&m("echo", &[""])).is_err());
    }
}
