//! Checks on what a persona's `describe` returns.

use super::bindings::Manifest;
use crate::names::{BotName, NameError, RoomName};

/// Why a manifest is unusable. One line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest {0}")]
    Name(NameError),
    #[error("manifest {0}")]
    Room(NameError),
}

/// Validates a manifest as `roost check` and bot start-up do: the name is a
/// [`BotName`] and every room a [`RoomName`].
pub fn validate(m: &Manifest) -> Result<(), ManifestError> {
    BotName::check(&m.name).map_err(ManifestError::Name)?;
    for room in &m.rooms {
        RoomName::check(room).map_err(ManifestError::Room)?;
    }
    Ok(())
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
