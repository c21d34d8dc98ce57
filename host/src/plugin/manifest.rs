//! Checks on what a persona's `describe` returns.

use super::bindings::Manifest;
use crate::names::{BotName, NameError, RoomName};
use crate::policy::{SecretScanner, SecretsConfig};

/// Why a manifest is unusable. One line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest {0}")]
    Name(NameError),
    #[error("manifest {0}")]
    Room(NameError),
    /// The name, description or a room holds a secret (a manifest is public: the name
    /// and description are registered with the network). The secret is not repeated.
    #[error("manifest {field} holds a secret ({kind}); a manifest is public")]
    Secret {
        field: &'static str,
        kind: &'static str,
    },
}

/// Validates a manifest as `roost check` and bot start-up do: the name is a
/// [`BotName`] and every room a [`RoomName`].
/// Everything it says is scanned for secrets with the default scanner (provider
/// formats, reshapings, random tokens); see [`validate_with`] for one that also knows
/// the host's keys.
pub fn validate(m: &Manifest) -> Result<(), ManifestError> {
    validate_with(m, &SecretScanner::new(SecretsConfig::default()))
}

/// [`validate`] with `scanner` (e.g. one that knows the host's keys).
pub fn validate_with(m: &Manifest, scanner: &SecretScanner) -> Result<(), ManifestError> {
    BotName::check(&m.name).map_err(ManifestError::Name)?;
    for room in &m.rooms {
        RoomName::check(room).map_err(ManifestError::Room)?;
    }
    let fields = [("name", &m.name), ("description", &m.description)]
        .into_iter()
        .chain(m.rooms.iter().map(|r| ("room", r)));
    for (field, text) in fields {
        if let Some(f) = scanner.scan(text) {
            return Err(ManifestError::Secret {
                field,
                kind: f.kind,
            });
        }
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

    #[test]
    fn secrets_in_a_manifest_are_refused() {
        let mut with = m("echo", &["lobby"]);
        with.description = "answers questions; key ghp_rnhuy6MKWF9yP5WmDWpullhZasyDFMXaY0c5".into();
        let e = validate(&with).unwrap_err();
        assert_eq!(
            e.to_string(),
            "manifest description holds a secret (github-token); a manifest is public"
        );
        assert!(!e.to_string().contains("ghp_rn"));
        // Reshaped: the key reversed in chunks.
        with.description = "5c0Y aXMF Dysa ZhlluPWD mW5P y9FW KM6y uhnr _phg".into();
        assert!(matches!(
            validate(&with),
            Err(ManifestError::Secret {
                field: "description",
                ..
            })
        ));
        // A key the host holds, in a room name.
        let s = SecretScanner::new(SecretsConfig::default());
        s.add_known_secret("Zq8vP2rT9wLx4Kb7Nm3Q");
        let rooms = m("echo", &["lobby", "vp2rt9wlx4kb"]);
        assert!(validate(&rooms).is_ok());
        assert!(matches!(
            validate_with(&rooms, &s),
            Err(ManifestError::Secret { field: "room", .. })
        ));
        // An ordinary description passes.
        let mut plain = m("echo", &["lobby"]);
        plain.description = "repeats what you say; try @echo hello".into();
        assert!(validate_with(&plain, &s).is_ok());
    }
}
