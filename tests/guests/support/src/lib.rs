//! What roost's test guests share: a standard manifest, the `ping` probe that shows a
//! (fresh) instance still answers, and a tiny JSON writer for guests that report what
//! they found (no serde in the guests, to keep the test build small).

use roost_guest::types::{Action, Manifest, Message, Subscriptions};

/// A manifest for test guest `name`, in room `lobby`, no extra subscriptions.
pub fn manifest(name: &str, description: &str) -> Manifest {
    Manifest {
        name: name.into(),
        description: description.into(),
        rooms: vec!["lobby".into()],
        version: env!("CARGO_PKG_VERSION").into(),
        subscriptions: Subscriptions::empty(),
    }
}

/// Every test guest answers the text `ping` with `pong from NAME` in the same room
/// and does nothing hostile, so a test can see that it (or its fresh instance) works.
pub fn ping(msg: &Message, name: &str) -> Option<Vec<Action>> {
    (msg.text.trim() == "ping").then(|| {
        vec![roost_guest::say(
            msg.room.clone(),
            format!("pong from {name}"),
        )]
    })
}

/// `s` as a JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON array of already-encoded values.
pub fn json_array(items: impl IntoIterator<Item = String>) -> String {
    format!("[{}]", items.into_iter().collect::<Vec<_>>().join(","))
}

/// A JSON array of strings.
pub fn json_str_array<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> String {
    json_array(items.into_iter().map(|s| json_str(s.as_ref())))
}

/// Builds a JSON object field by field.
#[derive(Default)]
pub struct JsonObject {
    fields: Vec<String>,
}

impl JsonObject {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `key: value` where `value` is already JSON.
    pub fn raw(mut self, key: &str, value: impl Into<String>) -> Self {
        self.fields
            .push(format!("{}:{}", json_str(key), value.into()));
        self
    }

    /// Adds `key: "value"`.
    pub fn str(self, key: &str, value: &str) -> Self {
        let v = json_str(value);
        self.raw(key, v)
    }

    /// Adds `key: true|false`.
    pub fn bool(self, key: &str, value: bool) -> Self {
        self.raw(key, value.to_string())
    }

    pub fn finish(self) -> String {
        format!("{{{}}}", self.fields.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json() {
        assert_eq!(json_str("a\"b\\c\n\u{1}é"), r#""a\"b\\c\n\u0001é""#);
        let o = JsonObject::new()
            .str("k", "v")
            .bool("b", false)
            .raw("a", json_str_array(["x", "y"]))
            .finish();
        assert_eq!(o, r#"{"k":"v","b":false,"a":["x","y"]}"#);
    }
}
