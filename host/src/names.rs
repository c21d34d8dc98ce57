//! The two kinds of names on the network, each with its one rule.
//!
//! A [`BotName`] is what an agent is called (`@name` mentions, `from` in frames);
//! a [`RoomName`] is where it talks (`#room`, a path segment in the REST API). The
//! manifest check, the session, the config loader and `roost serve` all validate
//! through these types, so a name one of them accepts is accepted by the others.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

/// Network names are 2-30 characters.
pub const BOT_NAME_MIN: usize = 2;
pub const BOT_NAME_MAX: usize = 30;
/// Room names are 1-64 characters.
pub const ROOM_NAME_MAX: usize = 64;

/// Why a name is not valid. One line; the offending name is quoted and shortened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name {0} must be {BOT_NAME_MIN}-{BOT_NAME_MAX} characters (has {1})")]
    BotLength(Shown, usize),
    #[error("name {0} contains control characters")]
    BotControl(Shown),
    #[error("name {0} has leading or trailing whitespace")]
    BotSpace(Shown),
    #[error("room name {0} must be 1-{ROOM_NAME_MAX} characters (has {1})")]
    RoomLength(Shown, usize),
    #[error(
        "room name {0} contains {1}: rooms have no whitespace, control characters, `#`, `/`, `?` or `%`"
    )]
    RoomChar(Shown, &'static str),
}

/// A name as an error message quotes it: debug-escaped and cut to 80 characters, so
/// a hostile name cannot flood or break a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown(String);

impl Shown {
    fn of(s: &str) -> Shown {
        let cut: String = s.chars().take(80).collect();
        let more = if cut.len() < s.len() { "…" } else { "" };
        Shown(format!("{cut:?}{more}"))
    }
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An agent's name on the network: 2-30 characters, no control characters, no
/// leading or trailing whitespace (inner spaces and any script are fine).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BotName(String);

impl BotName {
    /// Checks `name` against the rule.
    pub fn check(name: &str) -> Result<(), NameError> {
        let n = name.chars().count();
        if !(BOT_NAME_MIN..=BOT_NAME_MAX).contains(&n) {
            return Err(NameError::BotLength(Shown::of(name), n));
        }
        if name.chars().any(char::is_control) {
            return Err(NameError::BotControl(Shown::of(name)));
        }
        if name.trim() != name {
            return Err(NameError::BotSpace(Shown::of(name)));
        }
        Ok(())
    }

    /// A valid name, or why not.
    pub fn new(name: impl Into<String>) -> Result<BotName, NameError> {
        let name = name.into();
        Self::check(&name)?;
        Ok(BotName(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// A room: 1-64 characters with no whitespace, no control characters and none of
/// `#` (how rooms are written in chat), `/`, `?` or `%` (they would change the REST
/// path the room is a segment of).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RoomName(String);

impl RoomName {
    /// Checks `room` against the rule.
    pub fn check(room: &str) -> Result<(), NameError> {
        let n = room.chars().count();
        if !(1..=ROOM_NAME_MAX).contains(&n) {
            return Err(NameError::RoomLength(Shown::of(room), n));
        }
        for c in room.chars() {
            let what = match c {
                c if c.is_control() => "a control character",
                c if c.is_whitespace() => "whitespace",
                '#' => "`#`",
                '/' => "`/`",
                '?' => "`?`",
                '%' => "`%`",
                _ => continue,
            };
            return Err(NameError::RoomChar(Shown::of(room), what));
        }
        Ok(())
    }

    /// Whether `room` is a valid room name.
    pub fn is_valid(room: &str) -> bool {
        Self::check(room).is_ok()
    }

    /// A valid room name, or why not.
    pub fn new(room: impl Into<String>) -> Result<RoomName, NameError> {
        let room = room.into();
        Self::check(&room)?;
        Ok(RoomName(room))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

macro_rules! name_traits {
    ($t:ident) => {
        impl Deref for $t {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl Borrow<str> for $t {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl FromStr for $t {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                $t::new(s)
            }
        }
        impl TryFrom<String> for $t {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                $t::new(s)
            }
        }
        impl From<$t> for String {
            fn from(n: $t) -> String {
                n.0
            }
        }
        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }
        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $t::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_traits!(BotName);
name_traits!(RoomName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bot_names_follow_the_network_rule() {
        for ok in [
            "ab",
            "echo",
            "the shining ribbons",
            "ünï",
            "名前",
            &"x".repeat(30),
        ] {
            assert!(BotName::new(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "a", " ab", "ab ", "a\nb", "a\u{7}b", &"x".repeat(31)] {
            let e = BotName::new(bad).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn room_names_follow_one_rule() {
        for ok in [
            "lobby",
            "agent-creativity",
            "a",
            "é",
            "x.y_z",
            &"r".repeat(64),
        ] {
            assert!(RoomName::new(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            "#lobby",
            "two words",
            "a/b",
            "a?b",
            "a%2Fb",
            "tab\there",
            "nl\n",
            &"r".repeat(65),
        ] {
            assert!(!RoomName::is_valid(bad), "{bad:?}");
        }
    }

    #[test]
    fn errors_quote_a_shortened_escaped_name() {
        let long = format!("{}\n", "y".repeat(500));
        let e = RoomName::new(long).unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn serde_validates() {
        let r: Result<RoomName, _> = serde_json::from_str("\"lobby\"");
        assert_eq!(r.unwrap(), "lobby");
        let r: Result<RoomName, _> = serde_json::from_str("\"two words\"");
        assert!(r.is_err());
        let b: BotName = serde_json::from_str("\"echo\"").unwrap();
        assert_eq!(serde_json::to_string(&b).unwrap(), "\"echo\"");
    }
}
