//! Wire frames and REST bodies of the nohumans.chat protocol (see docs/PROTOCOL.md):
//! pure encode/decode with typed errors, no I/O.
//!
//! Decoding is lenient where the network is loose and strict where a wrong
//! reading would be harmful:
//!
//! - unknown frame types decode to [`ServerFrame::Unknown`] (not an error);
//! - unknown fields are ignored and *counted* (see [`ProtocolStats`]);
//! - timestamps are accepted as integers, floats, numeric strings or
//!   ISO-8601 / RFC 3339 strings, in milliseconds or seconds (a value below
//!   10^11 is seconds), see [`parse_timestamp`];
//! - malformed JSON, a non-object frame, a missing required field or a field of
//!   the wrong type is a [`ProtocolError`], never a panic;
//! - frames larger than [`MAX_FRAME_BYTES`] and REST bodies larger than
//!   [`MAX_BODY_BYTES`] are rejected before parsing.
//!
//! Counting unknowns: [`decode_server_frame`] returns the frame only (an unknown
//! frame type is visible as [`ServerFrame::Unknown`]); to also count unknown
//! fields, decode through [`ProtocolStats::decode_server_frame`] (or
//! [`decode_server_frame_counted`]), which bumps shared atomic counters.
//!
//! The API key ([`ApiKey`]) never prints: its `Debug` is `[redacted]` and it has
//! no `Display`.
//!
//! ```
//! use roost::protocol::{self, ClientFrame, ServerFrame, ProtocolStats};
//!
//! let join = ClientFrame::Join { room: "lobby".into() }.encode();
//! assert_eq!(protocol::decode_client_frame(&join).unwrap(), ClientFrame::Join { room: "lobby".into() });
//!
//! let stats = ProtocolStats::default();
//! let frame = stats.decode_server_frame(
//!     r#"{"type":"message","room":"lobby","from":"rook","text":"hi","timestamp":1769790508,"mood":"ok"}"#,
//! ).unwrap();
//! match frame {
//!     ServerFrame::Message(m) => assert_eq!(m.timestamp_ms, 1_769_790_508_000), // seconds -> ms
//!     other => panic!("unexpected {other:?}"),
//! }
//! assert_eq!(stats.snapshot().unknown_fields, 1); // "mood"
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Largest WebSocket text frame [`decode_server_frame`] / [`decode_client_frame`] accept (1 MiB).
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// Largest REST body the `decode` functions of the body types accept (8 MiB).
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// Numeric timestamps below this value are seconds, at or above it milliseconds.
pub const SECONDS_THRESHOLD: u64 = 100_000_000_000;
/// Latest accepted timestamp: 9999-12-31T23:59:59.999Z, in ms.
pub const MAX_TIMESTAMP_MS: u64 = 253_402_300_799_999;
/// An unknown frame type is kept in [`ServerFrame::Unknown`] truncated to this many bytes.
pub const MAX_UNKNOWN_TYPE_LEN: usize = 64;

/// Name the server uses for its own announcements (`⚡ NAME joined #ROOM.`).
pub const SYSTEM_SENDER: &str = "system";

// ---------------------------------------------------------------------------
// Errors

/// Why a frame or body could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The input is larger than the limit for its kind.
    #[error("input of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    /// Not valid JSON (includes truncated input and nesting deeper than 128 levels).
    #[error("malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Valid JSON of the wrong shape (e.g. an array where an object belongs).
    #[error("expected a JSON {expected}, got {found}")]
    WrongShape {
        expected: &'static str,
        found: &'static str,
    },
    /// A required field is absent (or `null`).
    #[error("missing required field `{0}`")]
    MissingField(&'static str),
    /// A field has the wrong JSON type.
    #[error("field `{field}` should be {expected}, got {found}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    /// A timestamp field could not be read.
    #[error("field `{field}`: {source}")]
    BadTimestamp {
        field: &'static str,
        source: TimestampError,
    },
    /// A client frame of a type the server does not know (server-side decoding only;
    /// the client side maps unknown types to [`ServerFrame::Unknown`]).
    #[error("unknown frame type {0:?}")]
    UnknownFrameType(String),
    /// A frame carried a `type` other than the one this decoder expects.
    #[error("expected a {expected:?} frame, got {found:?}")]
    UnexpectedFrameType {
        expected: &'static str,
        found: String,
    },
    /// An element of a list failed to decode.
    #[error("list item {index}: {source}")]
    InList {
        index: usize,
        source: Box<ProtocolError>,
    },
}

/// Why a timestamp could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TimestampError {
    #[error("timestamp is negative")]
    Negative,
    #[error("timestamp is not a finite number")]
    NotFinite,
    #[error("timestamp is after year 9999")]
    OutOfRange,
    #[error("timestamp string is neither a number nor ISO-8601 ({0})")]
    Unparseable(&'static str),
    #[error("timestamp should be a number or a string, got {0}")]
    WrongType(&'static str),
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn check_len(text: &str, max: usize) -> Result<(), ProtocolError> {
    if text.len() > max {
        return Err(ProtocolError::TooLarge {
            len: text.len(),
            max,
        });
    }
    Ok(())
}

fn parse_value(text: &str, max: usize) -> Result<Value, ProtocolError> {
    check_len(text, max)?;
    Ok(serde_json::from_str(text)?)
}

fn truncate_str(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Field access on a JSON object that remembers which fields were read, so the
/// rest can be counted as unknown.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    known: Vec<&'static str>,
}

impl<'a> Fields<'a> {
    fn of(v: &'a Value) -> Result<Self, ProtocolError> {
        match v {
            Value::Object(map) => Ok(Self {
                map,
                known: Vec::new(),
            }),
            other => Err(ProtocolError::WrongShape {
                expected: "object",
                found: json_kind(other),
            }),
        }
    }

    /// First present, non-null field among `names`.
    fn get(&mut self, names: &[&'static str]) -> Option<(&'static str, &'a Value)> {
        self.known.extend_from_slice(names);
        names.iter().find_map(|n| match self.map.get(*n) {
            None | Some(Value::Null) => None,
            Some(v) => Some((*n, v)),
        })
    }

    fn opt_str(&mut self, names: &[&'static str]) -> Result<Option<String>, ProtocolError> {
        match self.get(names) {
            None => Ok(None),
            Some((_, Value::String(s))) => Ok(Some(s.clone())),
            Some((field, other)) => Err(ProtocolError::WrongType {
                field,
                expected: "a string",
                found: json_kind(other),
            }),
        }
    }

    fn req_str(&mut self, names: &[&'static str]) -> Result<String, ProtocolError> {
        self.opt_str(names)?
            .ok_or(ProtocolError::MissingField(names[0]))
    }

    fn opt_bool(&mut self, name: &'static str) -> Result<Option<bool>, ProtocolError> {
        match self.get(&[name]) {
            None => Ok(None),
            Some((_, Value::Bool(b))) => Ok(Some(*b)),
            Some((field, other)) => Err(ProtocolError::WrongType {
                field,
                expected: "a boolean",
                found: json_kind(other),
            }),
        }
    }

    fn opt_ts(&mut self, names: &[&'static str]) -> Result<Option<u64>, ProtocolError> {
        match self.get(names) {
            None => Ok(None),
            Some((field, v)) => parse_timestamp(v)
                .map(Some)
                .map_err(|source| ProtocolError::BadTimestamp { field, source }),
        }
    }

    /// Optional informational timestamp: unreadable values become `None`.
    fn lenient_ts(&mut self, names: &[&'static str]) -> Option<u64> {
        self.opt_ts(names).ok().flatten()
    }

    fn req_ts(&mut self, names: &[&'static str]) -> Result<u64, ProtocolError> {
        self.opt_ts(names)?
            .ok_or(ProtocolError::MissingField(names[0]))
    }

    fn unknown_count(&self) -> usize {
        self.map
            .keys()
            .filter(|k| !self.known.contains(&k.as_str()))
            .count()
    }
}

// ---------------------------------------------------------------------------
// Timestamps

/// Reads a timestamp from a JSON value and returns Unix milliseconds.
///
/// Accepts integers, floats and numeric strings (below [`SECONDS_THRESHOLD`]
/// they are seconds, otherwise milliseconds) and ISO-8601 / RFC 3339 strings
/// (see [`parse_timestamp_str`]).
pub fn parse_timestamp(v: &Value) -> Result<u64, TimestampError> {
    match v {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                from_integer(u)
            } else if n.as_i64().is_some() {
                Err(TimestampError::Negative)
            } else {
                from_float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => parse_timestamp_str(s),
        other => Err(TimestampError::WrongType(json_kind(other))),
    }
}

/// Reads a timestamp from a string: a number (seconds or ms, as in
/// [`parse_timestamp`]) or an ISO-8601 / RFC 3339 date-time such as
/// `2026-01-30T17:06:35.039000`, `2026-01-30T17:06:35Z`,
/// `2026-01-30 17:06:35+02:00` or `2026-01-30`. A date-time without an offset
/// is UTC. Fractions beyond milliseconds are truncated.
pub fn parse_timestamp_str(s: &str) -> Result<u64, TimestampError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(TimestampError::Unparseable("empty"));
    }
    let first = s.as_bytes()[0];
    // A numeric string: digits, maybe a fraction or exponent. ISO dates have a '-' at index 4.
    let looks_iso = s.len() >= 10 && s.as_bytes().get(4) == Some(&b'-');
    if !looks_iso && (first.is_ascii_digit() || first == b'-' || first == b'+' || first == b'.') {
        if let Ok(u) = s.parse::<u64>() {
            return from_integer(u);
        }
        if s.starts_with('-') && s[1..].bytes().all(|b| b.is_ascii_digit()) && s.len() > 1 {
            return Err(TimestampError::Negative);
        }
        return match s.parse::<f64>() {
            Ok(f) => from_float(f),
            Err(_) => Err(TimestampError::Unparseable("not a number")),
        };
    }
    parse_iso8601(s)
}

fn from_integer(u: u64) -> Result<u64, TimestampError> {
    let ms = if u < SECONDS_THRESHOLD { u * 1000 } else { u };
    if ms > MAX_TIMESTAMP_MS {
        return Err(TimestampError::OutOfRange);
    }
    Ok(ms)
}

fn from_float(f: f64) -> Result<u64, TimestampError> {
    if !f.is_finite() {
        return Err(TimestampError::NotFinite);
    }
    if f < 0.0 {
        return Err(TimestampError::Negative);
    }
    let ms = if f < SECONDS_THRESHOLD as f64 {
        (f * 1000.0).round()
    } else {
        f.floor()
    };
    if ms > MAX_TIMESTAMP_MS as f64 {
        return Err(TimestampError::OutOfRange);
    }
    // In range [0, MAX_TIMESTAMP_MS], so the cast is exact.
    Ok(ms as u64)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        2 => 28,
        _ => 0,
    }
}

/// A tiny cursor over ASCII bytes for the ISO-8601 parser.
struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn digits(&mut self, n: usize, what: &'static str) -> Result<u32, TimestampError> {
        let end = self.i + n;
        let slice = self
            .b
            .get(self.i..end)
            .ok_or(TimestampError::Unparseable(what))?;
        let mut v = 0u32;
        for &c in slice {
            if !c.is_ascii_digit() {
                return Err(TimestampError::Unparseable(what));
            }
            v = v * 10 + u32::from(c - b'0');
        }
        self.i = end;
        Ok(v)
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8, what: &'static str) -> Result<(), TimestampError> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(TimestampError::Unparseable(what))
        }
    }
}

fn parse_iso8601(s: &str) -> Result<u64, TimestampError> {
    let mut c = Cursor {
        b: s.as_bytes(),
        i: 0,
    };
    let year = i64::from(c.digits(4, "bad year")?);
    c.expect(b'-', "expected '-' after year")?;
    let month = c.digits(2, "bad month")?;
    c.expect(b'-', "expected '-' after month")?;
    let day = c.digits(2, "bad day")?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(TimestampError::Unparseable("date out of range"));
    }
    let (mut hour, mut minute, mut second, mut millis) = (0u32, 0u32, 0u32, 0u32);
    let mut offset_s: i64 = 0;
    if let Some(sep) = c.peek() {
        if !matches!(sep, b'T' | b't' | b' ') {
            return Err(TimestampError::Unparseable("expected 'T' after date"));
        }
        c.i += 1;
        hour = c.digits(2, "bad hour")?;
        c.expect(b':', "expected ':' after hour")?;
        minute = c.digits(2, "bad minute")?;
        if c.eat(b':') {
            second = c.digits(2, "bad second")?;
            if c.eat(b'.') || c.eat(b',') {
                let start = c.i;
                let mut scale = 100;
                while let Some(d) = c.peek().filter(u8::is_ascii_digit) {
                    if scale > 0 {
                        millis += u32::from(d - b'0') * scale;
                        scale /= 10;
                    }
                    c.i += 1;
                }
                if c.i == start {
                    return Err(TimestampError::Unparseable("empty fraction"));
                }
            }
        }
        if hour > 23 || minute > 59 || second > 60 {
            return Err(TimestampError::Unparseable("time out of range"));
        }
        match c.peek() {
            None => {}
            Some(b'Z' | b'z') => c.i += 1,
            Some(sign @ (b'+' | b'-')) => {
                c.i += 1;
                let oh = c.digits(2, "bad offset hours")?;
                c.eat(b':');
                let om = if c.peek().is_some() {
                    c.digits(2, "bad offset minutes")?
                } else {
                    0
                };
                if oh > 23 || om > 59 {
                    return Err(TimestampError::Unparseable("offset out of range"));
                }
                let off = i64::from(oh * 3600 + om * 60);
                offset_s = if sign == b'+' { off } else { -off };
            }
            Some(_) => {
                return Err(TimestampError::Unparseable(
                    "unexpected character after time",
                ));
            }
        }
    }
    if c.i != c.b.len() {
        return Err(TimestampError::Unparseable("trailing characters"));
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second)
        - offset_s;
    if secs < 0 {
        return Err(TimestampError::Negative);
    }
    let ms = (secs as u64) * 1000 + u64::from(millis);
    if ms > MAX_TIMESTAMP_MS {
        return Err(TimestampError::OutOfRange);
    }
    Ok(ms)
}

/// Formats Unix milliseconds as RFC 3339 UTC with millisecond precision,
/// e.g. `2026-01-30T17:06:35.039Z` (for logs and fixtures).
pub fn format_rfc3339_ms(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        ms % 1000
    )
}

// ---------------------------------------------------------------------------
// API key

/// An agent's API key. Its `Debug` prints `[redacted]`; there is no `Display`.
/// Use [`ApiKey::expose`] only where the key goes on the wire or to storage.
#[derive(Clone)]
pub struct ApiKey(SecretString);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(SecretString::from(key.into()))
    }

    /// The key itself, for the `x-api-key` header, the `?key=` query or storage.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl PartialEq for ApiKey {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.expose().as_bytes(), other.expose().as_bytes());
        // Length leaks, content does not.
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl Eq for ApiKey {}

impl From<String> for ApiKey {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for ApiKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

// ---------------------------------------------------------------------------
// Chat messages and frames

/// One chat message as the network delivers it (a `message` frame).
///
/// Its serde form is the plain struct (`timestamp_ms`), for storage; the wire
/// form is produced by [`ChatMessage::to_frame_json`] / [`ServerFrame::encode`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChatMessage {
    pub room: String,
    pub from: String,
    pub text: String,
    /// Unix time in milliseconds. On the wire, values below
    /// [`SECONDS_THRESHOLD`] (before March 1973) read back as seconds.
    pub timestamp_ms: u64,
}

impl ChatMessage {
    /// Whether the server itself sent this (`from: "system"`).
    pub fn is_system(&self) -> bool {
        self.from == SYSTEM_SENDER
    }

    /// The message as a wire `message` frame (JSON value).
    pub fn to_frame_value(&self) -> Value {
        json!({
            "type": "message",
            "room": self.room,
            "from": self.from,
            "text": self.text,
            "timestamp": self.timestamp_ms,
        })
    }

    /// The message as a wire `message` frame (JSON text); also the REST answer
    /// to `POST /api/rooms/:room/messages`.
    pub fn to_frame_json(&self) -> String {
        self.to_frame_value().to_string()
    }

    /// Decodes a message frame or a REST message object. A `type` field is not
    /// required (REST may omit it) but, if present, must be `"message"`.
    /// `from` falls back to `sender` or `user`; `timestamp` to `timestamp_ms`,
    /// `ts` or `created_at`.
    pub fn decode(text: &str) -> Result<Self, ProtocolError> {
        let v = parse_value(text, MAX_BODY_BYTES)?;
        let mut f = Fields::of(&v)?;
        if let Some(t) = f.opt_str(&["type"])?
            && t != "message"
        {
            return Err(ProtocolError::UnexpectedFrameType {
                expected: "message",
                found: truncate_str(&t, MAX_UNKNOWN_TYPE_LEN),
            });
        }
        Self::from_fields(&mut f)
    }

    fn from_fields(f: &mut Fields<'_>) -> Result<Self, ProtocolError> {
        Ok(Self {
            room: f.req_str(&["room"])?,
            from: f.req_str(&["from", "sender", "user"])?,
            text: f.req_str(&["text"])?,
            timestamp_ms: f.req_ts(&["timestamp", "timestamp_ms", "ts", "created_at"])?,
        })
    }
}

/// A frame from the server to a client.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerFrame {
    /// Sent once after the socket opens.
    Connected {
        agent: String,
        /// Room names the server lists (strings or `{"name"}` objects on the wire).
        rooms: Vec<String>,
        encryption: Option<String>,
        message: Option<String>,
    },
    /// A chat message, including system lines and the echo of our own sends.
    Message(ChatMessage),
    /// An error the server reports on the socket (`error` or `message`, optional `code`,
    /// optional retry hint: `retry_after`/`retryAfter` in seconds or `retry_after_ms`).
    Error {
        message: String,
        code: Option<String>,
        /// How long the server asks us to wait, in milliseconds (at most an hour;
        /// a hint that isn't a non-negative number is ignored, not an error).
        retry_after_ms: Option<u64>,
    },
    /// A frame type this client does not know; `frame_type` is truncated to
    /// [`MAX_UNKNOWN_TYPE_LEN`] bytes. Ignore it and count it.
    Unknown { frame_type: String },
}

impl ServerFrame {
    /// Decodes a server frame; see [`decode_server_frame`].
    pub fn decode(text: &str) -> Result<Self, ProtocolError> {
        decode_server_frame_inner(text).map(|(f, _)| f)
    }

    /// Encodes the frame as JSON text (server side). `Unknown` encodes as `{"type": frame_type}`.
    pub fn encode(&self) -> String {
        match self {
            ServerFrame::Connected {
                agent,
                rooms,
                encryption,
                message,
            } => {
                let mut m = Map::new();
                m.insert("type".into(), "connected".into());
                m.insert("agent".into(), agent.as_str().into());
                m.insert("rooms".into(), rooms.clone().into());
                if let Some(e) = encryption {
                    m.insert("encryption".into(), e.as_str().into());
                }
                if let Some(msg) = message {
                    m.insert("message".into(), msg.as_str().into());
                }
                Value::Object(m).to_string()
            }
            ServerFrame::Message(msg) => msg.to_frame_json(),
            ServerFrame::Error {
                message,
                code,
                retry_after_ms,
            } => {
                let mut m = Map::new();
                m.insert("type".into(), "error".into());
                m.insert("error".into(), message.as_str().into());
                if let Some(c) = code {
                    m.insert("code".into(), c.as_str().into());
                }
                if let Some(ms) = retry_after_ms {
                    m.insert("retry_after_ms".into(), (*ms).into());
                }
                Value::Object(m).to_string()
            }
            ServerFrame::Unknown { frame_type } => json!({ "type": frame_type }).to_string(),
        }
    }
}

/// Decodes one server→client text frame.
///
/// Unknown frame types give [`ServerFrame::Unknown`]; unknown fields are
/// ignored (use [`decode_server_frame_counted`] to count them).
pub fn decode_server_frame(text: &str) -> Result<ServerFrame, ProtocolError> {
    ServerFrame::decode(text)
}

/// Like [`decode_server_frame`], and records the outcome in `stats` (frames,
/// unknown frame types, unknown fields, errors).
pub fn decode_server_frame_counted(
    text: &str,
    stats: &ProtocolStats,
) -> Result<ServerFrame, ProtocolError> {
    let r = decode_server_frame_inner(text);
    match &r {
        Ok((frame, unknown_fields)) => {
            stats.frames.fetch_add(1, Ordering::Relaxed);
            if matches!(frame, ServerFrame::Unknown { .. }) {
                stats.unknown_frame_types.fetch_add(1, Ordering::Relaxed);
            }
            stats
                .unknown_fields
                .fetch_add(*unknown_fields as u64, Ordering::Relaxed);
        }
        Err(_) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    r.map(|(f, _)| f)
}

fn read_room_names(v: &Value) -> Result<Vec<String>, ProtocolError> {
    RoomList::from_value(v).map(|l| l.names())
}

/// A chat message frame in its usual shape: exactly these five fields, every one of
/// the type it should have, the timestamp an integer. Anything else (another frame
/// type, a missing, extra, repeated or null field, a timestamp in another form) is
/// not this, and goes the general way.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainMessage {
    #[serde(rename = "type")]
    frame_type: PlainType,
    room: String,
    from: String,
    text: String,
    timestamp: u64,
}

/// `"message"`, and nothing else.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum PlainType {
    Message,
}

/// The frame most frames are, decoded straight into its struct (no JSON tree, no
/// field bookkeeping), or `None` when it is not in that shape. It decodes to what
/// the general way would, with no unknown fields.
fn decode_plain_message(text: &str) -> Option<ServerFrame> {
    let m: PlainMessage = serde_json::from_str(text).ok()?;
    let PlainType::Message = m.frame_type;
    Some(ServerFrame::Message(ChatMessage {
        room: m.room,
        from: m.from,
        text: m.text,
        timestamp_ms: from_integer(m.timestamp).ok()?,
    }))
}

/// Returns the frame and the number of unknown fields in it.
fn decode_server_frame_inner(text: &str) -> Result<(ServerFrame, usize), ProtocolError> {
    check_len(text, MAX_FRAME_BYTES)?;
    if let Some(frame) = decode_plain_message(text) {
        return Ok((frame, 0));
    }
    decode_server_frame_general(text)
}

/// [`decode_server_frame_inner`] for any frame, through a JSON tree.
fn decode_server_frame_general(text: &str) -> Result<(ServerFrame, usize), ProtocolError> {
    let v = parse_value(text, MAX_FRAME_BYTES)?;
    let mut f = Fields::of(&v)?;
    let ty = f.req_str(&["type"])?;
    let frame = match ty.as_str() {
        "message" => ServerFrame::Message(ChatMessage::from_fields(&mut f)?),
        "connected" => {
            let agent = f.req_str(&["agent", "name"])?;
            let rooms = match f.get(&["rooms"]) {
                None => Vec::new(),
                Some((_, v)) => read_room_names(v).map_err(|e| match e {
                    ProtocolError::WrongShape { found, .. } => ProtocolError::WrongType {
                        field: "rooms",
                        expected: "an array",
                        found,
                    },
                    other => other,
                })?,
            };
            ServerFrame::Connected {
                agent,
                rooms,
                encryption: f.opt_str(&["encryption"])?,
                message: f.opt_str(&["message"])?,
            }
        }
        "error" => {
            let message = f
                .opt_str(&["error", "message", "reason"])?
                .unwrap_or_default();
            // Codes are strings in REST bodies; tolerate numeric codes in frames.
            let code = match f.get(&["code"]) {
                None => None,
                Some((_, Value::String(s))) => Some(s.clone()),
                Some((_, Value::Number(n))) => Some(n.to_string()),
                Some((field, other)) => {
                    return Err(ProtocolError::WrongType {
                        field,
                        expected: "a string",
                        found: json_kind(other),
                    });
                }
            };
            let retry_after_ms = match f.get(&["retry_after_ms", "retryAfterMs"]) {
                Some((_, v)) => retry_hint_ms(v, 1.0),
                None => f
                    .get(&["retry_after", "retryAfter"])
                    .and_then(|(_, v)| retry_hint_ms(v, 1000.0)),
            };
            ServerFrame::Error {
                message,
                code,
                retry_after_ms,
            }
        }
        other => {
            // Unknown frame: every field but `type` is the frame's business, not "unknown fields".
            return Ok((
                ServerFrame::Unknown {
                    frame_type: truncate_str(other, MAX_UNKNOWN_TYPE_LEN),
                },
                0,
            ));
        }
    };
    Ok((frame, f.unknown_count()))
}

/// A retry hint (a number or a numeric string) times `scale`, in whole milliseconds;
/// `None` unless it is finite, non-negative and at most an hour.
fn retry_hint_ms(v: &Value, scale: f64) -> Option<u64> {
    let n = match v {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    let ms = n * scale;
    (ms.is_finite() && (0.0..=3_600_000.0).contains(&ms)).then(|| ms.round() as u64)
}

/// A frame from a client to the server.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ClientFrame {
    Join {
        room: String,
    },
    Send {
        room: String,
        text: String,
    },
    /// Not in the published reference; the local server honours it.
    Leave {
        room: String,
    },
}

impl ClientFrame {
    /// Encodes the frame as JSON text.
    pub fn encode(&self) -> String {
        match self {
            ClientFrame::Join { room } => json!({"type": "join", "room": room}),
            ClientFrame::Send { room, text } => json!({"type": "send", "room": room, "text": text}),
            ClientFrame::Leave { room } => json!({"type": "leave", "room": room}),
        }
        .to_string()
    }

    /// Decodes a client frame (server side); see [`decode_client_frame`].
    pub fn decode(text: &str) -> Result<Self, ProtocolError> {
        decode_client_frame(text)
    }
}

/// Decodes one client→server text frame (server side). Unknown fields are
/// ignored; an unknown `type` is [`ProtocolError::UnknownFrameType`].
pub fn decode_client_frame(text: &str) -> Result<ClientFrame, ProtocolError> {
    let v = parse_value(text, MAX_FRAME_BYTES)?;
    let mut f = Fields::of(&v)?;
    let ty = f.req_str(&["type"])?;
    Ok(match ty.as_str() {
        "join" => ClientFrame::Join {
            room: f.req_str(&["room"])?,
        },
        "leave" => ClientFrame::Leave {
            room: f.req_str(&["room"])?,
        },
        "send" => ClientFrame::Send {
            room: f.req_str(&["room"])?,
            text: f.req_str(&["text"])?,
        },
        other => {
            return Err(ProtocolError::UnknownFrameType(truncate_str(
                other,
                MAX_UNKNOWN_TYPE_LEN,
            )));
        }
    })
}

// ---------------------------------------------------------------------------
// Counters

/// Shared counters for decoded server frames. Cheap to share (`Arc`) between
/// a session and its metrics.
#[derive(Debug, Default)]
pub struct ProtocolStats {
    frames: AtomicU64,
    unknown_frame_types: AtomicU64,
    unknown_fields: AtomicU64,
    errors: AtomicU64,
}

/// A point-in-time copy of [`ProtocolStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProtocolStatsSnapshot {
    /// Frames decoded successfully (including unknown types).
    pub frames: u64,
    /// Frames of an unknown `type`.
    pub unknown_frame_types: u64,
    /// Unknown fields in frames of known types.
    pub unknown_fields: u64,
    /// Frames that failed to decode.
    pub errors: u64,
}

impl ProtocolStats {
    /// Decodes a server frame and counts the outcome (see [`decode_server_frame_counted`]).
    pub fn decode_server_frame(&self, text: &str) -> Result<ServerFrame, ProtocolError> {
        decode_server_frame_counted(text, self)
    }

    pub fn snapshot(&self) -> ProtocolStatsSnapshot {
        ProtocolStatsSnapshot {
            frames: self.frames.load(Ordering::Relaxed),
            unknown_frame_types: self.unknown_frame_types.load(Ordering::Relaxed),
            unknown_fields: self.unknown_fields.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

// ---------------------------------------------------------------------------
// REST bodies

/// `POST /api/register` request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

impl RegisterRequest {
    pub fn encode(&self) -> String {
        json!({"name": self.name, "description": self.description}).to_string()
    }

    /// Server side: `name` required, `description` optional (empty).
    pub fn decode(text: &str) -> Result<Self, ProtocolError> {
        let v = parse_value(text, MAX_BODY_BYTES)?;
        let mut f = Fields::of(&v)?;
        Ok(Self {
            name: f.req_str(&["name"])?,
            description: f.opt_str(&["description"])?.unwrap_or_default(),
        })
    }
}

/// `POST /api/register` answer. The key is read from `key`, falling back to
/// `apiKey`, `api_key` or `token`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterResponse {
    pub key: ApiKey,
    pub agent_id: Option<String>,
    /// The name the server actually gave us (may differ from the requested one).
    pub name: Option<String>,
}

impl RegisterResponse {
    /// Encodes as `{"key","agent_id","name"}` (server side; exposes the key).
    pub fn encode(&self) -> String {
        let mut m = Map::new();
        m.insert("key".into(), self.key.expose().into());
        if let Some(id) = &self.agent_id {
            m.insert("agent_id".into(), id.as_str().into());
        }
        if let Some(n) = &self.name {
            m.insert("name".into(), n.as_str().into());
        }
        Value::Object(m).to_string()
    }

    pub fn decode(text: &str) -> Result<Self, ProtocolError> {
        let v = parse_value(text, MAX_BODY_BYTES)?;
        let mut f = Fields::of(&v)?;
        let key = f.req_str(&["key", "apiKey", "api_key", "token"])?;
        if key.is_empty() {
            return Err(ProtocolError::MissingField("key"));
        }
        let agent_id = match f.get(&["agent_id", "agentId", "id"]) {
            None => None,
            Some((_, Value::String(s))) => Some(s.clone()),
            Some((_, Value::Number(n))) => Some(n.to_string()),
            Some((field, other)) => {
                return Err(ProtocolError::WrongType {
                    field,
                    expected: "a string",
                    found: json_kind(other),
                });
            }
        };
        Ok(Self {
            key: ApiKey::new(key),
            agent_id,
            name: f.opt_str(&["name"])?,
        })
    }
}

/// An error body: `{"error": "...", "code": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub code: Option<String>,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>, code: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            code: Some(code.into()),
        }
    }

    pub fn encode(&self) -> String {
        let mut m = Map::new();
        m.insert("error".into(), self.error.as_str().into());
        if let Some(c) = &self.code {
            m.insert("code".into(), c.as_str().into());
        }
        Value::Object(m).to_string()
    }

    /// Reads `error` (falling back to `message`); `code` may be a string or number.
    /// Callers should not decode HTML error pages: this fails on them.
    pub fn decode(text: &str) -> Result<Self, ProtocolError> {
        let v = parse_value(text, MAX_BODY_BYTES)?;
        let mut f = Fields::of(&v)?;
        let error = f.req_str(&["error", "message"])?;
        let code = match f.get(&["code"]) {
            None => None,
            Some((_, Value::String(s))) => Some(s.clone()),
            Some((_, Value::Number(n))) => Some(n.to_string()),
            Some((field, other)) => {
                return Err(ProtocolError::WrongType {
                    field,
                    expected: "a string",
                    found: json_kind(other),
                });
            }
        };
        Ok(Self { error, code })
    }
}

/// One room in a room list.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RoomInfo {
    pub name: String,
    pub description: Option<String>,
}

/// How [`RoomList::encode`] writes the list (the network has been seen using both).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RoomListShape {
    /// `["lobby", ...]`
    Names,
    /// `[{"name": "lobby", "description": "..."}]`
    #[default]
    Objects,
}

/// `GET /api/rooms` answer: accepts `["lobby"]`, `[{"name","description"}]`
/// (mixed is fine) and either wrapped in `{"rooms": [...]}`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoomList(pub Vec<RoomInfo>);

impl RoomList {
    pub fn names(&self) -> Vec<String> {
        self.0.iter().map(|r| r.name.clone()).collect()
    }

    pub fn encode(&self, shape: RoomListShape) -> String {
        match shape {
            RoomListShape::Names => Value::from(self.names()).to_string(),
            RoomListShape::Objects => Value::Array(
                self.0
                    .iter()
                    .map(|r| json!({"name": r.name, "description": r.description}))
                    .collect(),
            )
            .to_string(),
        }
    }

    pub fn decode(text: &str) -> Result<Self, ProtocolError> {
        Self::from_value(&parse_value(text, MAX_BODY_BYTES)?)
    }

    fn from_value(v: &Value) -> Result<Self, ProtocolError> {
        let items = list_items(v, "rooms")?;
        let mut out = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let room = match item {
                Value::String(s) => Ok(RoomInfo {
                    name: s.clone(),
                    description: None,
                }),
                other => Fields::of(other).and_then(|mut f| {
                    Ok(RoomInfo {
                        name: f.req_str(&["name", "room"])?,
                        description: f.opt_str(&["description"])?,
                    })
                }),
            };
            out.push(room.map_err(|e| ProtocolError::InList {
                index,
                source: Box::new(e),
            })?);
        }
        Ok(Self(out))
    }
}

/// The array itself, or the array under `key` in a wrapping object.
fn list_items<'a>(v: &'a Value, key: &str) -> Result<&'a Vec<Value>, ProtocolError> {
    match v {
        Value::Array(a) => Ok(a),
        Value::Object(m) => match m.get(key) {
            Some(Value::Array(a)) => Ok(a),
            _ => Err(ProtocolError::WrongShape {
                expected: "array",
                found: "an object",
            }),
        },
        other => Err(ProtocolError::WrongShape {
            expected: "array",
            found: json_kind(other),
        }),
    }
}

/// `POST /api/rooms` request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateRoomRequest {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

impl CreateRoomRequest {
    pub fn encode(&self) -> String {
        json!({"name": self.name, "description": self.description}).to_string()
    }

    pub fn decode(text: &str) -> Result<Self, ProtocolError> {
        let v = parse_value(text, MAX_BODY_BYTES)?;
        let mut f = Fields::of(&v)?;
        Ok(Self {
            name: f.req_str(&["name"])?,
            description: f.opt_str(&["description"])?.unwrap_or_default(),
        })
    }
}

/// `POST /api/rooms` answer: `{"name", "created": true}` (`false` if it existed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateRoomResponse {
    pub name: String,
    pub created: bool,
}

impl CreateRoomResponse {
    pub fn encode(&self) -> String {
        json!({"name": self.name, "created": self.created}).to_string()
    }

    /// `created` defaults to `true` when absent.
    pub fn decode(text: &str) -> Result<Self, ProtocolError> {
        let v = parse_value(text, MAX_BODY_BYTES)?;
        let mut f = Fields::of(&v)?;
        Ok(Self {
            name: f.req_str(&["name", "room"])?,
            created: f.opt_bool("created")?.unwrap_or(true),
        })
    }
}

/// `POST /api/rooms/:room/join` answer: `{"room", "joined": true}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinResponse {
    pub room: String,
    pub joined: bool,
}

impl JoinResponse {
    pub fn encode(&self) -> String {
        json!({"room": self.room, "joined": self.joined}).to_string()
    }

    /// `joined` defaults to `true` when absent.
    pub fn decode(text: &str) -> Result<Self, ProtocolError> {
        let v = parse_value(text, MAX_BODY_BYTES)?;
        let mut f = Fields::of(&v)?;
        Ok(Self {
            room: f.req_str(&["room", "name"])?,
            joined: f.opt_bool("joined")?.unwrap_or(true),
        })
    }
}

/// `POST /api/rooms/:room/messages` request: `{"text"}`. The answer is the
/// stored message, see [`ChatMessage::decode`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendMessageRequest {
    pub text: String,
}

impl SendMessageRequest {
    pub fn encode(&self) -> String {
        json!({"text": self.text}).to_string()
    }

    pub fn decode(text: &str) -> Result<Self, ProtocolError> {
        let v = parse_value(text, MAX_BODY_BYTES)?;
        let mut f = Fields::of(&v)?;
        Ok(Self {
            text: f.req_str(&["text"])?,
        })
    }
}

/// `GET /api/rooms/:room/messages` answer: message frames, newest first
/// (the order is kept as received). Accepts a bare array or `{"messages": [...]}`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageList(pub Vec<ChatMessage>);

impl MessageList {
    pub fn encode(&self) -> String {
        Value::Array(self.0.iter().map(ChatMessage::to_frame_value).collect()).to_string()
    }

    pub fn decode(text: &str) -> Result<Self, ProtocolError> {
        let v = parse_value(text, MAX_BODY_BYTES)?;
        let items = list_items(&v, "messages")?;
        let mut out = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let msg = Fields::of(item).and_then(|mut f| ChatMessage::from_fields(&mut f));
            out.push(msg.map_err(|e| ProtocolError::InList {
                index,
                source: Box::new(e),
            })?);
        }
        Ok(Self(out))
    }
}

/// One entry of `GET /api/agents`: `{"name", "description", "registered_at"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub name: String,
    pub description: Option<String>,
    /// Unix ms; unreadable values decode as `None`.
    pub registered_at: Option<u64>,
}

/// `GET /api/agents` answer (bare array or `{"agents": [...]}`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentList(pub Vec<AgentInfo>);

impl AgentList {
    pub fn encode(&self) -> String {
        Value::Array(
            self.0
                .iter()
                .map(|a| {
                    json!({"name": a.name, "description": a.description, "registered_at": a.registered_at})
                })
                .collect(),
        )
        .to_string()
    }

    pub fn decode(text: &str) -> Result<Self, ProtocolError> {
        let v = parse_value(text, MAX_BODY_BYTES)?;
        let items = list_items(&v, "agents")?;
        let mut out = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let agent = Fields::of(item).and_then(|mut f| {
                Ok(AgentInfo {
                    name: f.req_str(&["name"])?,
                    description: f.opt_str(&["description"])?,
                    registered_at: f.lenient_ts(&["registered_at", "created_at"]),
                })
            });
            out.push(agent.map_err(|e| ProtocolError::InList {
                index,
                source: Box::new(e),
            })?);
        }
        Ok(Self(out))
    }
}

/// One entry of `GET /api/rooms/:room/agents`: `{"name", "joined_at"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomAgent {
    pub name: String,
    /// Unix ms; unreadable values decode as `None`.
    pub joined_at: Option<u64>,
}

/// `GET /api/rooms/:room/agents` answer (bare array or `{"agents": [...]}`;
/// bare name strings are accepted too).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoomAgentList(pub Vec<RoomAgent>);

impl RoomAgentList {
    pub fn encode(&self) -> String {
        Value::Array(
            self.0
                .iter()
                .map(|a| json!({"name": a.name, "joined_at": a.joined_at}))
                .collect(),
        )
        .to_string()
    }

    pub fn decode(text: &str) -> Result<Self, ProtocolError> {
        let v = parse_value(text, MAX_BODY_BYTES)?;
        let items = list_items(&v, "agents")?;
        let mut out = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let agent = match item {
                Value::String(s) => Ok(RoomAgent {
                    name: s.clone(),
                    joined_at: None,
                }),
                other => Fields::of(other).and_then(|mut f| {
                    Ok(RoomAgent {
                        name: f.req_str(&["name"])?,
                        joined_at: f.lenient_ts(&["joined_at"]),
                    })
                }),
            };
            out.push(agent.map_err(|e| ProtocolError::InList {
                index,
                source: Box::new(e),
            })?);
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(room: &str, from: &str, text: &str, ts: u64) -> ChatMessage {
        ChatMessage {
            room: room.into(),
            from: from.into(),
            text: text.into(),
            timestamp_ms: ts,
        }
    }

    #[test]
    fn client_frames_round_trip() {
        let frames = [
            ClientFrame::Join {
                room: "lobby".into(),
            },
            ClientFrame::Send {
                room: "lobby".into(),
                text: "hello \"world\" \u{26a1} \n\t\\ \u{0}".into(),
            },
            ClientFrame::Leave {
                room: "philosophy".into(),
            },
        ];
        for f in frames {
            let text = f.encode();
            assert_eq!(decode_client_frame(&text).unwrap(), f, "{text}");
            assert_eq!(ClientFrame::decode(&text).unwrap(), f);
        }
        let v: Value = serde_json::from_str(
            &ClientFrame::Join {
                room: "lobby".into(),
            }
            .encode(),
        )
        .unwrap();
        assert_eq!(v, json!({"type": "join", "room": "lobby"}));
        let v: Value = serde_json::from_str(
            &ClientFrame::Send {
                room: "r".into(),
                text: "t".into(),
            }
            .encode(),
        )
        .unwrap();
        assert_eq!(v, json!({"type": "send", "room": "r", "text": "t"}));
    }

    #[test]
    fn client_frame_errors() {
        assert!(matches!(
            decode_client_frame(r#"{"type":"dance","room":"x"}"#),
            Err(ProtocolError::UnknownFrameType(t)) if t == "dance"
        ));
        assert!(matches!(
            decode_client_frame(r#"{"type":"send","room":"x"}"#),
            Err(ProtocolError::MissingField("text"))
        ));
        assert!(matches!(
            decode_client_frame(r#"{"type":"join"}"#),
            Err(ProtocolError::MissingField("room"))
        ));
        assert!(matches!(
            decode_client_frame(r#"{"type":"join","room":7}"#),
            Err(ProtocolError::WrongType { field: "room", .. })
        ));
        assert!(matches!(
            decode_client_frame("[1]"),
            Err(ProtocolError::WrongShape { .. })
        ));
        assert!(matches!(
            decode_client_frame("{"),
            Err(ProtocolError::Json(_))
        ));
        // unknown fields are fine
        assert_eq!(
            decode_client_frame(r#"{"type":"join","room":"a","extra":{"deep":[1]}}"#).unwrap(),
            ClientFrame::Join { room: "a".into() }
        );
    }

    #[test]
    fn server_frames_round_trip() {
        let frames = [
            ServerFrame::Connected {
                agent: "my-name".into(),
                rooms: vec!["lobby".into(), "debug".into()],
                encryption: Some("active".into()),
                message: Some("welcome".into()),
            },
            ServerFrame::Connected {
                agent: "x".into(),
                rooms: vec![],
                encryption: None,
                message: None,
            },
            ServerFrame::Message(msg(
                "lobby",
                "rook",
                "hi \u{1F600} \u{201c}quoted\u{201d}",
                1_769_790_508_965,
            )),
            ServerFrame::Message(msg(
                "lobby",
                SYSTEM_SENDER,
                "\u{26a1} rook joined #lobby.",
                SECONDS_THRESHOLD,
            )),
            ServerFrame::Error {
                message: "join #x first".into(),
                code: Some("not_joined".into()),
                retry_after_ms: None,
            },
            ServerFrame::Error {
                message: "boom".into(),
                code: None,
                retry_after_ms: Some(1500),
            },
            ServerFrame::Unknown {
                frame_type: "typing".into(),
            },
        ];
        for f in frames {
            let text = f.encode();
            assert_eq!(decode_server_frame(&text).unwrap(), f, "{text}");
        }
    }

    #[test]
    fn plain_message_frames_decode_as_the_general_way_does() {
        let frames = [
            r#"{"type":"message","room":"lobby","from":"ada","text":"hi @bob","timestamp":1769790508966}"#,
            r#"{"timestamp":1769790508,"text":"seconds","from":"ada","room":"lobby","type":"message"}"#,
            r#"{"type":"message","room":"lobby","from":"ada","text":"esc \"q\" \u00e9 \n","timestamp":1769790508966}"#,
            // Not the plain shape: each goes the general way, with the same outcome.
            r#"{"type":"message","room":"lobby","from":"ada","text":"x","timestamp":1769790508966,"extra":1}"#,
            r#"{"type":"message","room":"lobby","from":null,"sender":"ada","text":"x","timestamp":1}"#,
            r#"{"type":"message","room":"lobby","from":"ada","from":"eve","text":"x","timestamp":1}"#,
            r#"{"type":"message","room":"lobby","from":"ada","text":"x","timestamp":1769790508.5}"#,
            r#"{"type":"message","room":"lobby","from":"ada","text":"x","timestamp":"2026-01-30T17:06:35Z"}"#,
            r#"{"type":"message","room":"lobby","from":"ada","text":"x","timestamp":-5}"#,
            r#"{"type":"message","room":"lobby","from":"ada","text":"x","timestamp":99999999999999999}"#,
            r#"{"type":"message","room":"lobby","from":"ada","text":7,"timestamp":1}"#,
            r#"{"type":"message","room":"lobby","text":"x","timestamp":1}"#,
            r#"{"type":"error","room":"lobby","from":"ada","text":"x","timestamp":1}"#,
            r#"{"type":"Message","room":"lobby","from":"ada","text":"x","timestamp":1}"#,
            r#"{"type":"connected","agent":"ada"}"#,
            r#"[1,2]"#,
            "not json",
        ];
        for text in frames {
            let general = decode_server_frame_general(text).map_err(|e| e.to_string());
            let decoded = decode_server_frame_inner(text).map_err(|e| e.to_string());
            assert_eq!(decoded, general, "{text}");
        }
        // The first three are the plain shape.
        for text in &frames[..3] {
            assert!(decode_plain_message(text).is_some(), "{text}");
        }
        for text in &frames[3..] {
            assert!(decode_plain_message(text).is_none(), "{text}");
        }
    }

    #[test]
    fn server_frame_wire_shapes() {
        let m = decode_server_frame(
            r#"{"type": "message", "room": "lobby", "from": "some-agent", "text": "...", "timestamp": 1769790508965}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ServerFrame::Message(msg("lobby", "some-agent", "...", 1_769_790_508_965))
        );
        let c = decode_server_frame(
            r#"{"type": "connected", "agent": "my-name", "rooms": ["lobby"], "encryption": "active", "message": "..."}"#,
        )
        .unwrap();
        assert_eq!(
            c,
            ServerFrame::Connected {
                agent: "my-name".into(),
                rooms: vec!["lobby".into()],
                encryption: Some("active".into()),
                message: Some("...".into()),
            }
        );
        // rooms as objects, missing rooms
        let c = decode_server_frame(
            r#"{"type":"connected","agent":"a","rooms":[{"name":"lobby","description":"d"}]}"#,
        )
        .unwrap();
        assert!(matches!(c, ServerFrame::Connected { rooms, .. } if rooms == ["lobby"]));
        let c = decode_server_frame(r#"{"type":"connected","agent":"a"}"#).unwrap();
        assert!(matches!(c, ServerFrame::Connected { rooms, .. } if rooms.is_empty()));
        assert!(matches!(
            decode_server_frame(r#"{"type":"connected","agent":"a","rooms":"lobby"}"#),
            Err(ProtocolError::WrongType { field: "rooms", .. })
        ));
        // error frame variants
        assert_eq!(
            decode_server_frame(r#"{"type":"error","message":"slow down","code":429}"#).unwrap(),
            ServerFrame::Error {
                message: "slow down".into(),
                code: Some("429".into()),
                retry_after_ms: None,
            }
        );
        assert_eq!(
            decode_server_frame(r#"{"type":"error"}"#).unwrap(),
            ServerFrame::Error {
                message: String::new(),
                code: None,
                retry_after_ms: None,
            }
        );
        // retry hints: seconds (number or string), milliseconds; nonsense is ignored
        for (raw, want) in [
            (r#"{"type":"error","retry_after":2}"#, Some(2000)),
            (r#"{"type":"error","retryAfter":"0.25"}"#, Some(250)),
            (
                r#"{"type":"error","retry_after_ms":1200,"retry_after":9}"#,
                Some(1200),
            ),
            (r#"{"type":"error","retry_after":-1}"#, None),
            (r#"{"type":"error","retry_after":"soon"}"#, None),
            (r#"{"type":"error","retry_after":1e300}"#, None),
            (r#"{"type":"error","retry_after":[1]}"#, None),
        ] {
            match decode_server_frame(raw) {
                Ok(ServerFrame::Error { retry_after_ms, .. }) => {
                    assert_eq!(retry_after_ms, want, "{raw}")
                }
                other => panic!("{raw}: {other:?}"),
            }
        }
        // `from` fallbacks
        let m = decode_server_frame(
            r#"{"type":"message","room":"r","user":"u","text":"t","timestamp":"2026-01-30T17:06:35.039000"}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ServerFrame::Message(msg("r", "u", "t", 1_769_792_795_039))
        );
    }

    #[test]
    fn unknown_types_and_fields_are_counted() {
        let stats = ProtocolStats::default();
        let f = stats
            .decode_server_frame(r#"{"type":"typing","room":"lobby","who":"x"}"#)
            .unwrap();
        assert_eq!(
            f,
            ServerFrame::Unknown {
                frame_type: "typing".into()
            }
        );
        stats
            .decode_server_frame(
                r#"{"type":"message","room":"r","from":"f","text":"t","timestamp":5,"id":"msg_1","reactions":[],"from_bot":true}"#,
            )
            .unwrap();
        stats
            .decode_server_frame(r#"{"type":"connected","agent":"a","rooms":[],"motd":"x"}"#)
            .unwrap();
        assert!(stats.decode_server_frame("nope").is_err());
        assert_eq!(
            stats.snapshot(),
            ProtocolStatsSnapshot {
                frames: 3,
                unknown_frame_types: 1,
                unknown_fields: 4,
                errors: 1
            }
        );
        // huge unknown type names are truncated
        let long = "\u{e9}".repeat(1000);
        let f = decode_server_frame(&json!({"type": long}).to_string()).unwrap();
        assert!(
            matches!(f, ServerFrame::Unknown { frame_type } if frame_type.len() <= MAX_UNKNOWN_TYPE_LEN && !frame_type.is_empty())
        );
    }

    #[test]
    fn timestamps_ms_and_seconds() {
        let cases: &[(Value, u64)] = &[
            (json!(1_769_790_508_965u64), 1_769_790_508_965),
            (json!(1_769_790_508u64), 1_769_790_508_000),
            (json!(1_769_790_508.965), 1_769_790_508_965),
            (json!(1_769_790_508_965.0), 1_769_790_508_965),
            (json!(0), 0),
            (json!(99_999_999_999u64), 99_999_999_999_000),
            (json!(100_000_000_000u64), 100_000_000_000),
            (json!("1769790508965"), 1_769_790_508_965),
            (json!("1769790508"), 1_769_790_508_000),
            (json!(" 1769790508.5 "), 1_769_790_508_500),
            (json!("1.769790508965e12"), 1_769_790_508_965),
            (json!("1970-01-01T00:00:00Z"), 0),
            (json!("2026-01-30T17:06:35.039000"), 1_769_792_795_039),
            (json!("2026-01-30T17:06:35.039Z"), 1_769_792_795_039),
            (json!("2026-01-30T17:06:35.0399999z"), 1_769_792_795_039),
            (json!("2026-01-30 17:06:35"), 1_769_792_795_000),
            (json!("2026-01-30T19:06:35.039+02:00"), 1_769_792_795_039),
            (json!("2026-01-30T12:06:35.039-0500"), 1_769_792_795_039),
            (json!("2026-01-30T19:06:35+02"), 1_769_792_795_000),
            (json!("2026-01-30T17:06"), 1_769_792_760_000),
            (json!("2026-01-30"), 1_769_731_200_000),
            (json!("2024-02-29T00:00:00Z"), 1_709_164_800_000),
            (json!("9999-12-31T23:59:59.999Z"), MAX_TIMESTAMP_MS),
        ];
        for (v, want) in cases {
            assert_eq!(parse_timestamp(v), Ok(*want), "{v}");
        }
        let bad: &[Value] = &[
            json!(-1),
            json!(-1.5),
            json!("-5"),
            json!(true),
            json!(null),
            json!([1]),
            json!({}),
            json!(""),
            json!("yesterday"),
            json!("NaN"),
            json!("inf"),
            json!("2026-02-30T00:00:00Z"),
            json!("2025-02-29"),
            json!("2026-13-01"),
            json!("2026-01-30T24:00:00"),
            json!("2026-01-30T17:06:35.Z"),
            json!("2026-01-30T17:06:35 garbage"),
            json!("2026-01-30X17:06"),
            json!("2026-1-30"),
            json!("1970-01-01T00:00:00+01:00"),
            json!(u64::MAX),
            json!(1e300),
            json!("99999999999999999999999"),
            json!("\u{661}\u{662}"),
        ];
        for v in bad {
            assert!(parse_timestamp(v).is_err(), "{v} should fail");
        }
    }

    #[test]
    fn rfc3339_formatter_round_trips() {
        let mut ms = 0u64;
        while ms < MAX_TIMESTAMP_MS {
            let s = format_rfc3339_ms(ms);
            assert_eq!(parse_timestamp_str(&s), Ok(ms), "{s}");
            ms = ms * 3 + 7_919_123;
        }
        assert_eq!(
            format_rfc3339_ms(1_769_792_795_039),
            "2026-01-30T17:06:35.039Z"
        );
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let inputs: Vec<String> = vec![
            String::new(),
            " ".into(),
            "garbage".into(),
            "{".into(),
            r#"{"type":"message","room":"lo"#.into(),
            r#"{"type":"message","room":"lobby","from":"a","text":"hi","timestamp":17697"#.into(),
            "null".into(),
            "42".into(),
            "\"message\"".into(),
            "[]".into(),
            r#"[{"type":"message"}]"#.into(),
            "{}".into(),
            r#"{"type":null}"#.into(),
            r#"{"type":7}"#.into(),
            r#"{"type":"message"}"#.into(),
            r#"{"type":"message","room":"r","from":"f","text":"t"}"#.into(),
            r#"{"type":"message","room":"r","from":"f","text":5,"timestamp":1}"#.into(),
            r#"{"type":"message","room":["r"],"from":"f","text":"t","timestamp":1}"#.into(),
            r#"{"type":"message","room":"r","from":"f","text":"t","timestamp":true}"#.into(),
            r#"{"type":"message","room":"r","from":"f","text":"t","timestamp":"soon"}"#.into(),
            r#"{"type":"message","room":"r","from":"f","text":"t","timestamp":-3}"#.into(),
            r#"{"type":"connected"}"#.into(),
            r#"{"type":"error","code":[1]}"#.into(),
            "\u{feff}{}".into(),
            "[".repeat(10_000),
            format!("{}1{}", "[".repeat(200), "]".repeat(200)),
            "{\"a\":".repeat(5000),
        ];
        for input in &inputs {
            assert!(decode_server_frame(input).is_err(), "{input:.80}");
            let _ = decode_client_frame(input);
            let _ = RoomList::decode(input);
            let _ = MessageList::decode(input);
            let _ = RegisterResponse::decode(input);
            let _ = ErrorBody::decode(input);
            let _ = AgentList::decode(input);
            let _ = RoomAgentList::decode(input);
        }
        assert!(matches!(
            decode_server_frame(r#"{"type":"message","room":"r","from":"f","text":"t"}"#),
            Err(ProtocolError::MissingField("timestamp"))
        ));
        assert!(matches!(
            decode_server_frame(
                r#"{"type":"message","room":"r","from":"f","text":5,"timestamp":1}"#
            ),
            Err(ProtocolError::WrongType { field: "text", .. })
        ));
        assert!(matches!(
            decode_server_frame(
                r#"{"type":"message","room":"r","from":"f","text":"t","timestamp":"soon"}"#
            ),
            Err(ProtocolError::BadTimestamp {
                field: "timestamp",
                ..
            })
        ));
        assert!(matches!(
            decode_server_frame("[]"),
            Err(ProtocolError::WrongShape { .. })
        ));
        assert!(matches!(
            decode_server_frame("{}"),
            Err(ProtocolError::MissingField("type"))
        ));
    }

    #[test]
    fn huge_inputs() {
        // Over the frame limit: rejected before parsing.
        let big = "x".repeat(MAX_FRAME_BYTES + 1);
        let frame = ServerFrame::Message(msg("r", "f", &big, 1)).encode();
        assert!(matches!(
            decode_server_frame(&frame),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_client_frame(
                &ClientFrame::Send {
                    room: "r".into(),
                    text: big.clone()
                }
                .encode()
            ),
            Err(ProtocolError::TooLarge { .. })
        ));
        let body = "y".repeat(MAX_BODY_BYTES + 1);
        assert!(matches!(
            ErrorBody::decode(&body),
            Err(ProtocolError::TooLarge { .. })
        ));
        // Just under the limit: decodes.
        let text = "\u{26a1}".repeat((MAX_FRAME_BYTES - 200) / 3);
        let frame = ServerFrame::Message(msg("r", "f", &text, 1)).encode();
        assert!(frame.len() <= MAX_FRAME_BYTES);
        assert!(
            matches!(decode_server_frame(&frame), Ok(ServerFrame::Message(m)) if m.text == text)
        );
        // A huge number.
        let frame = format!(
            r#"{{"type":"message","room":"r","from":"f","text":"t","timestamp":{}}}"#,
            "9".repeat(5000)
        );
        assert!(decode_server_frame(&frame).is_err());
    }

    #[test]
    fn truncations_and_mutations_never_panic() {
        let frames = [
            ServerFrame::Message(msg("lobby", "rook", "caf\u{e9} \u{1F980} \"q\"", 1_769_790_508_965)).encode(),
            ServerFrame::Connected {
                agent: "a".into(),
                rooms: vec!["lobby".into()],
                encryption: Some("active".into()),
                message: Some("m".into()),
            }
            .encode(),
            r#"{"type":"message","room":"r","from":"f","text":"t","timestamp":"2026-01-30T17:06:35.039000+01:00"}"#.into(),
        ];
        for frame in &frames {
            for cut in (0..frame.len()).filter(|i| frame.is_char_boundary(*i)) {
                let _ = decode_server_frame(&frame[..cut]);
            }
            let bytes = frame.as_bytes();
            for i in 0..bytes.len() {
                for repl in [b'"', b'{', b'}', b'0', b'\\', b',', b':', b'-', b'T'] {
                    let mut b = bytes.to_vec();
                    b[i] = repl;
                    if let Ok(s) = std::str::from_utf8(&b) {
                        let _ = decode_server_frame(s);
                        let _ = decode_client_frame(s);
                    }
                }
            }
        }
    }

    #[test]
    fn register_bodies() {
        let req = RegisterRequest {
            name: "rook".into(),
            description: "a bot".into(),
        };
        assert_eq!(RegisterRequest::decode(&req.encode()).unwrap(), req);
        assert_eq!(
            RegisterRequest::decode(r#"{"name":"rook"}"#)
                .unwrap()
                .description,
            ""
        );
        assert!(matches!(
            RegisterRequest::decode(r#"{"description":"x"}"#),
            Err(ProtocolError::MissingField("name"))
        ));

        let resp = RegisterResponse {
            key: ApiKey::new("sk-very-secret"),
            agent_id: Some("agent_1".into()),
            name: Some("rook-1a2b".into()),
        };
        let wire = resp.encode();
        assert_eq!(RegisterResponse::decode(&wire).unwrap(), resp);
        let debug = format!("{resp:?}");
        assert!(!debug.contains("sk-very-secret"), "{debug}");
        assert!(debug.contains("[redacted]"));
        assert_eq!(format!("{:?}", ApiKey::new("k")), "[redacted]");

        for (body, key) in [
            (r#"{"key":"k1"}"#, "k1"),
            (r#"{"apiKey":"k2","name":"n"}"#, "k2"),
            (r#"{"token":"k3","agent_id":17}"#, "k3"),
            (r#"{"key":null,"token":"k4"}"#, "k4"),
        ] {
            let r = RegisterResponse::decode(body).unwrap();
            assert_eq!(r.key.expose(), key, "{body}");
        }
        let r = RegisterResponse::decode(r#"{"token":"k3","agent_id":17}"#).unwrap();
        assert_eq!(r.agent_id.as_deref(), Some("17"));
        assert_eq!(r.name, None);
        assert!(matches!(
            RegisterResponse::decode(r#"{"name":"n"}"#),
            Err(ProtocolError::MissingField("key"))
        ));
        assert!(matches!(
            RegisterResponse::decode(r#"{"key":""}"#),
            Err(ProtocolError::MissingField("key"))
        ));
        assert!(matches!(
            RegisterResponse::decode(r#"{"key":42}"#),
            Err(ProtocolError::WrongType { field: "key", .. })
        ));
        assert!(RegisterResponse::decode("<html><body>502 Bad Gateway</body></html>").is_err());
        // the error message never carries the body
        let err = RegisterResponse::decode("<html>secret page</html>").unwrap_err();
        assert!(!err.to_string().contains("secret page"));
        assert_ne!(ApiKey::new("a"), ApiKey::new("b"));
        assert_eq!(ApiKey::new("a"), ApiKey::new("a"));
    }

    #[test]
    fn room_lists_both_shapes() {
        let names = RoomList::decode(r#"["lobby","debug"]"#).unwrap();
        let objects = RoomList::decode(
            r#"[{"name":"lobby","description":"main","members":3},{"name":"debug"}]"#,
        )
        .unwrap();
        assert_eq!(names.names(), ["lobby", "debug"]);
        assert_eq!(objects.names(), ["lobby", "debug"]);
        assert_eq!(objects.0[0].description.as_deref(), Some("main"));
        let wrapped = RoomList::decode(r#"{"rooms":["lobby", {"name":"x"}]}"#).unwrap();
        assert_eq!(wrapped.names(), ["lobby", "x"]);
        assert!(RoomList::decode("[]").unwrap().0.is_empty());
        for shape in [RoomListShape::Names, RoomListShape::Objects] {
            let back = RoomList::decode(&objects.encode(shape)).unwrap();
            assert_eq!(back.names(), objects.names());
        }
        assert_eq!(
            RoomList::decode(&objects.encode(RoomListShape::Objects)).unwrap(),
            objects
        );
        assert_eq!(names.encode(RoomListShape::Names), r#"["lobby","debug"]"#);
        assert!(matches!(
            RoomList::decode(r#"["lobby", 5]"#),
            Err(ProtocolError::InList { index: 1, .. })
        ));
        assert!(matches!(
            RoomList::decode(r#"[{"description":"x"}]"#),
            Err(ProtocolError::InList { index: 0, .. })
        ));
        assert!(matches!(
            RoomList::decode(r#"{"error":"x"}"#),
            Err(ProtocolError::WrongShape { .. })
        ));
        assert!(matches!(
            RoomList::decode(r#""lobby""#),
            Err(ProtocolError::WrongShape { .. })
        ));
    }

    #[test]
    fn other_rest_bodies_round_trip() {
        let e = ErrorBody::new("invalid key", "unauthorized");
        assert_eq!(ErrorBody::decode(&e.encode()).unwrap(), e);
        assert_eq!(
            ErrorBody::decode(r#"{"message":"x","code":500}"#).unwrap(),
            ErrorBody {
                error: "x".into(),
                code: Some("500".into())
            }
        );
        assert_eq!(ErrorBody::decode(r#"{"error":"x"}"#).unwrap().code, None);

        let c = CreateRoomRequest {
            name: "r".into(),
            description: "d".into(),
        };
        assert_eq!(CreateRoomRequest::decode(&c.encode()).unwrap(), c);
        let c = CreateRoomResponse {
            name: "r".into(),
            created: false,
        };
        assert_eq!(CreateRoomResponse::decode(&c.encode()).unwrap(), c);
        assert!(
            CreateRoomResponse::decode(r#"{"name":"r"}"#)
                .unwrap()
                .created
        );
        assert!(matches!(
            CreateRoomResponse::decode(r#"{"name":"r","created":"yes"}"#),
            Err(ProtocolError::WrongType {
                field: "created",
                ..
            })
        ));
        let j = JoinResponse {
            room: "r".into(),
            joined: true,
        };
        assert_eq!(JoinResponse::decode(&j.encode()).unwrap(), j);
        let s = SendMessageRequest { text: "hi".into() };
        assert_eq!(SendMessageRequest::decode(&s.encode()).unwrap(), s);

        let m = msg("r", "f", "t", 1_769_790_508_965);
        assert_eq!(ChatMessage::decode(&m.to_frame_json()).unwrap(), m);
        assert_eq!(
            ChatMessage::decode(r#"{"room":"r","from":"f","text":"t","timestamp":1769790508.965}"#)
                .unwrap(),
            m
        );
        assert!(matches!(
            ChatMessage::decode(
                r#"{"type":"connected","room":"r","from":"f","text":"t","timestamp":1}"#
            ),
            Err(ProtocolError::UnexpectedFrameType { .. })
        ));

        let list = MessageList(vec![
            m.clone(),
            msg("r", "system", "\u{26a1} a joined #r.", 1_769_790_500_000),
        ]);
        assert_eq!(MessageList::decode(&list.encode()).unwrap(), list);
        let wrapped = format!(r#"{{"messages":{}}}"#, list.encode());
        assert_eq!(MessageList::decode(&wrapped).unwrap(), list);
        // REST in seconds
        assert_eq!(
            MessageList::decode(r#"[{"room":"r","from":"f","text":"t","timestamp":1769790508}]"#)
                .unwrap()
                .0[0]
                .timestamp_ms,
            1_769_790_508_000
        );
        assert!(matches!(
            MessageList::decode(
                r#"[{"room":"r","from":"f","text":"t","timestamp":1}, {"room":"r"}]"#
            ),
            Err(ProtocolError::InList { index: 1, .. })
        ));

        let agents = AgentList(vec![
            AgentInfo {
                name: "rook".into(),
                description: Some("d".into()),
                registered_at: Some(1_769_790_508_965),
            },
            AgentInfo {
                name: "x".into(),
                description: None,
                registered_at: None,
            },
        ]);
        assert_eq!(AgentList::decode(&agents.encode()).unwrap(), agents);
        let lenient = AgentList::decode(r#"[{"name":"a","registered_at":"whenever"}]"#).unwrap();
        assert_eq!(lenient.0[0].registered_at, None);

        let members = RoomAgentList(vec![RoomAgent {
            name: "rook".into(),
            joined_at: Some(1_769_790_508_000),
        }]);
        assert_eq!(RoomAgentList::decode(&members.encode()).unwrap(), members);
        assert_eq!(
            RoomAgentList::decode(r#"[{"name":"rook","joined_at":"2026-01-30T16:28:28Z"}, "b"]"#)
                .unwrap()
                .0
                .len(),
            2
        );
    }

    #[test]
    fn chat_message_serde_is_plain() {
        let m = msg("r", "f", "t", 7);
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<ChatMessage>(&s).unwrap(), m);
        assert!(s.contains("timestamp_ms"));
    }

    /// Every chat line of the fixtures, turned into a server message frame, decodes.
    #[test]
    fn every_fixture_chat_line_decodes() {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        every_chat_line_decodes(&repo.join("tests/fixtures/nohumans"), 90);
    }

    /// The same over the recorded corpus, when `ROOST_CORPUS` names its folder
    /// (relative to the repository's root when relative).
    #[test]
    #[ignore = "reads the recorded corpus: set ROOST_CORPUS to its folder"]
    fn every_recorded_corpus_line_decodes() {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let corpus = std::env::var_os("ROOST_CORPUS").expect("set ROOST_CORPUS to the corpus");
        every_chat_line_decodes(&repo.join(corpus).join("nohumans"), 500);
    }

    /// Every line of every `*.jsonl` in `dir` (the corpus format), turned into a server
    /// message frame, must decode; at least `min_lines` of them.
    fn every_chat_line_decodes(dir: &std::path::Path, min_lines: usize) {
        let entries = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("cannot read {} ({e})", dir.display()));
        let mut files: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no *.jsonl files in {}", dir.display());
        let mut lines = 0usize;
        for path in &files {
            let content = std::fs::read_to_string(path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            for (n, line) in content.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let rec: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{}:{}: not JSON: {e}", path.display(), n + 1));
                let ts = rec["timestamp"].clone();
                // Alternate between passing the ISO string through and converting it to ms.
                let wire_ts = if n % 2 == 0 {
                    ts.clone()
                } else {
                    json!(parse_timestamp(&ts).unwrap_or_else(|e| panic!(
                        "{}:{}: timestamp {ts}: {e}",
                        path.display(),
                        n + 1
                    )))
                };
                let frame = json!({
                    "type": "message",
                    "room": rec["room"],
                    "from": rec["user"],
                    "text": rec["text"],
                    "timestamp": wire_ts,
                    "id": rec["id"],
                })
                .to_string();
                let stats = ProtocolStats::default();
                match stats.decode_server_frame(&frame) {
                    Ok(ServerFrame::Message(m)) => {
                        assert_eq!(Some(m.room.as_str()), rec["room"].as_str());
                        assert_eq!(Some(m.from.as_str()), rec["user"].as_str());
                        assert_eq!(Some(m.text.as_str()), rec["text"].as_str());
                        // recorded on 2026-01-30 (UTC)
                        assert!(
                            (1_769_731_200_000..1_769_817_600_000).contains(&m.timestamp_ms),
                            "{}:{}: {}",
                            path.display(),
                            n + 1,
                            m.timestamp_ms
                        );
                        assert_eq!(stats.snapshot().unknown_fields, 1); // "id"
                    }
                    other => panic!("{}:{}: decoded to {other:?}", path.display(), n + 1),
                }
                lines += 1;
            }
        }
        assert!(
            lines >= min_lines,
            "only {lines} chat lines in {}",
            dir.display()
        );
    }
}
