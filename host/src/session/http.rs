//! Server addresses and small HTTP helpers shared by registration and recovery.

use std::error::Error as StdError;

use url::Url;

use crate::protocol::ApiKey;

/// The longest excerpt of a response body that may reach a log line or an error message.
pub const EXCERPT_CHARS: usize = 200;

/// Bodies read from the server are capped at this size (registration answers and message
/// lists are a few KiB; an HTML error page is not worth more).
pub const MAX_READ_BYTES: usize = 1 << 20;

/// The URLs of one chat server, derived from its base URL.
#[derive(Clone, Debug)]
pub struct Endpoints {
    base: Url,
}

/// Why a server URL is unusable (a configuration error: the session does not start).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlProblem {
    #[error("server URL {url:?} is not a valid URL: {reason}")]
    Invalid { url: String, reason: String },
    #[error("server URL {url:?} must start with http:// or https://")]
    Scheme { url: String },
}

impl Endpoints {
    /// Parses an `http(s)://host[:port][/prefix]` base URL. Query and fragment are dropped.
    pub fn parse(server: &str) -> Result<Self, UrlProblem> {
        let mut base = Url::parse(server.trim()).map_err(|e| UrlProblem::Invalid {
            url: server.to_string(),
            reason: e.to_string(),
        })?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(UrlProblem::Scheme {
                url: server.to_string(),
            });
        }
        if base.host_str().is_none_or(str::is_empty) || base.cannot_be_a_base() {
            return Err(UrlProblem::Invalid {
                url: server.to_string(),
                reason: "no host".into(),
            });
        }
        base.set_query(None);
        base.set_fragment(None);
        Ok(Endpoints { base })
    }

    /// Plain `http://` to a host that is not loopback (`127.0.0.0/8`, `::1`,
    /// `localhost`): the chat key would cross a network in clear.
    pub fn is_plain_remote(&self) -> bool {
        if self.base.scheme() != "http" {
            return false;
        }
        let loopback = match self.base.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            None => false,
        };
        !loopback
    }

    /// The base URL as configured (normalised), the key under which credentials are stored.
    pub fn base(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    fn with_segments<'a>(&self, segments: impl IntoIterator<Item = &'a str>) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// `POST /api/register`.
    pub fn register(&self) -> Url {
        self.with_segments(["api", "register"])
    }

    /// `GET /api/rooms`.
    pub fn rooms(&self) -> Url {
        self.with_segments(["api", "rooms"])
    }

    /// `GET /api/rooms/:room/messages?after=TS&limit=N`.
    pub fn messages(&self, room: &str, after_ms: u64, limit: u32) -> Url {
        let mut url = self.with_segments(["api", "rooms", room, "messages"]);
        url.query_pairs_mut()
            .append_pair("after", &after_ms.to_string())
            .append_pair("limit", &limit.to_string());
        url
    }

    /// `GET /api/rooms/:room/agents`.
    pub fn room_agents(&self, room: &str) -> Url {
        self.with_segments(["api", "rooms", room, "agents"])
    }

    /// The WebSocket URL: http→ws, https→wss, path `/ws`, `?key=KEY`. Contains the key:
    /// never log it.
    pub fn websocket(&self, key: &ApiKey) -> Url {
        let mut url = self.with_segments(["ws"]);
        let scheme = if self.base.scheme() == "https" {
            "wss"
        } else {
            "ws"
        };
        // http↔ws and https↔wss are all "special" schemes, so this cannot fail.
        let _ = url.set_scheme(scheme);
        url.query_pairs_mut().append_pair("key", key.expose());
        url
    }
}

/// Reads at most `limit` bytes of a response body. Returns the bytes and whether the body
/// was longer.
pub async fn read_limited(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = limit.saturating_sub(body.len());
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

/// A short, single-line, printable excerpt of a body (at most [`EXCERPT_CHARS`] chars).
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    let mut chars = 0;
    let mut last_space = true;
    for c in text.chars() {
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if c == ' ' && last_space {
            continue;
        }
        last_space = c == ' ';
        if chars == EXCERPT_CHARS {
            out.push('…');
            return out.trim_end().to_string();
        }
        out.push(c);
        chars += 1;
    }
    out.trim_end().to_string()
}

/// An error and its sources on one line (`a: b: c`), the way `{:#}` prints anyhow errors.
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        source = e.source();
    }
    out
}

/// Replaces every occurrence of the key (and its URL-encoded form) with `[redacted]`.
/// Applied to every error string that reaches a log line or the session status.
pub fn redact(text: &str, key: Option<&ApiKey>) -> String {
    let Some(key) = key else {
        return text.to_string();
    };
    let raw = key.expose();
    if raw.len() < 4 {
        return text.to_string();
    }
    let mut out = text.replace(raw, "[redacted]");
    let encoded: String = url::form_urlencoded::byte_serialize(raw.as_bytes()).collect();
    if encoded != raw {
        out = out.replace(&encoded, "[redacted]");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_from_base_urls() {
        let e = Endpoints::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(e.register().as_str(), "http://127.0.0.1:8080/api/register");
        assert_eq!(
            e.messages("lobby", 12, 50).as_str(),
            "http://127.0.0.1:8080/api/rooms/lobby/messages?after=12&limit=50"
        );
        let key = ApiKey::new("k y/+");
        assert_eq!(
            e.websocket(&key).as_str(),
            "ws://127.0.0.1:8080/ws?key=k+y%2F%2B"
        );
        assert_eq!(e.base(), "http://127.0.0.1:8080");

        let e = Endpoints::parse("https://example.org/chat/").unwrap();
        assert_eq!(
            e.register().as_str(),
            "https://example.org/chat/api/register"
        );
        assert_eq!(
            e.websocket(&ApiKey::new("abc")).as_str(),
            "wss://example.org/chat/ws?key=abc"
        );
        // Room names are path-escaped.
        let e = Endpoints::parse("https://example.org").unwrap();
        assert!(
            e.messages("a/b c", 0, 1)
                .as_str()
                .contains("/rooms/a%2Fb%20c/messages")
        );
    }

    #[test]
    fn bad_urls() {
        assert!(matches!(
            Endpoints::parse("ftp://x"),
            Err(UrlProblem::Scheme { .. })
        ));
        assert!(matches!(
            Endpoints::parse("not a url"),
            Err(UrlProblem::Invalid { .. })
        ));
        assert!(Endpoints::parse("wss://x").is_err());
    }

    #[test]
    fn excerpts_are_short_and_single_line() {
        let html = format!("<html>\n<body>{}</body></html>", "x".repeat(5000));
        let ex = excerpt(html.as_bytes());
        assert!(ex.chars().count() <= EXCERPT_CHARS + 1);
        assert!(!ex.contains('\n'));
        assert!(ex.starts_with("<html> <body>xxx"));
        assert_eq!(excerpt(b"  a \r\n\t b  "), "a b");
        assert_eq!(excerpt(&[0xff, 0xfe, b'o', b'k']), "\u{fffd}\u{fffd}ok");
    }

    #[test]
    fn redaction() {
        let key = ApiKey::new("sk-secret/1");
        let msg = "GET ws://h/ws?key=sk-secret%2F1 failed; key sk-secret/1";
        let r = redact(msg, Some(&key));
        assert!(!r.contains("sk-secret"), "{r}");
        assert_eq!(redact("x", None), "x");
    }
}
