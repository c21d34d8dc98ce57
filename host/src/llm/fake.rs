//! A local fake LLM server for tests and `roost dev`: both provider shapes, deterministic
//! answers, failures on request.
//!
//! [`FakeLlm::spawn`] serves, on loopback:
//!
//! - `POST /v1/chat/completions` in OpenAI's shape, and
//! - `POST /v1/messages` in Anthropic's shape,
//!
//! checking each request the way the real APIs document them (required fields, roles,
//! `anthropic-version`, Anthropic's alternating turns that start with `user`,
//! temperature ranges; a violation answers 400 in the API's error shape) and, when
//! [`set_required_key`](FakeLlm::set_required_key) is set, the key (`Authorization:
//! Bearer` / `x-api-key`; a wrong one answers 401). Every request is recorded with its
//! headers and body ([`requests`](FakeLlm::requests)).
//!
//! The answer is derived from the last user message only: an opener picked by a hash of
//! the message, the first words of it in quotes and the conversation's user-turn count,
//! e.g. `You said "what is a roost?" (turn 1)` ([`reply_for`]), so a conversation through
//! it is easy to follow. Usage is one token per four characters (input: the system prompt
//! and every message; output: the answer), rounded up.
//!
//! Behaviour on request, from a test through [`FakeMode`], or from a chat prompt through
//! magic words anywhere in the last user message (for trying things by hand in
//! `roost dev`):
//!
//! | magic word | effect |
//! |---|---|
//! | `fake:429` / `fake:429xN` | N answers of 429 with `retry-after: 1`, then success (counted per identical request, so retries see it) |
//! | `fake:500` / `fake:500xN` | always 500 / N answers of 500, then success |
//! | `fake:slow=MS` (also `=2s`) | answer after that long |
//! | `fake:no-usage` | leave out the usage fields |
//! | `fake:echo=TEXT` | answer exactly the rest of the message after `fake:echo=` |
//!
//! Delays use `tokio::time`, so a paused test clock skips them.
//!
//! ```
//! use std::time::Duration;
//! use roost::llm::fake::{FakeLlm, FakeMode};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let fake = FakeLlm::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
//! fake.set_mode(FakeMode { rate_limit: 1, retry_after: Some("0".into()), ..FakeMode::default() });
//! let client = reqwest::Client::new();
//! let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
//! let url = format!("{}/v1/chat/completions", fake.base_url());
//! assert_eq!(client.post(&url).json(&body).send().await.unwrap().status(), 429);
//! let ok: serde_json::Value = client.post(&url).json(&body).send().await.unwrap().json().await.unwrap();
//! assert_eq!(ok["choices"][0]["message"]["content"], roost::llm::fake::reply_for("hi", 1));
//! assert_eq!(fake.requests().len(), 2);
//! # });
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::config::{ProviderConfig, ProviderKind};
use super::provider::estimate_tokens;

/// Behaviour set from a test. Counters are consumed as requests arrive: first the
/// 429s, then the 500s. [`FakeLlm::set_mode`] replaces the whole mode.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeMode {
    /// Answer the next N requests with 429.
    pub rate_limit: u32,
    /// The `retry-after` header of those 429s (default `"1"`; `Some("")` sends none).
    pub retry_after: Option<String>,
    /// Answer the next N requests with 500 (`u32::MAX`: every request).
    pub server_errors: u32,
    /// Wait this long before every answer.
    pub delay: Duration,
    /// Leave the usage fields out of answers.
    pub omit_usage: bool,
    /// Answer this text instead of the derived reply.
    pub echo: Option<String>,
    /// Report this model instead of the requested one.
    pub model: Option<String>,
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// `/v1/chat/completions` or `/v1/messages`.
    pub path: String,
    /// Header names in lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body as JSON (`Value::Null` when it was not JSON).
    pub body: Value,
    /// The body as text.
    pub raw: String,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    OpenAi,
    Anthropic,
}

#[derive(Default)]
struct Shared {
    mode: Mutex<FakeMode>,
    required_key: Mutex<Option<String>>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Failures served so far per identical request body, for `fake:429xN`/`fake:500xN`.
    magic_failures: Mutex<HashMap<u64, u32>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    ids: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running fake server; stops when dropped.
pub struct FakeLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl fmt::Debug for FakeLlm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeLlm")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeLlm {
    /// Binds `addr` (use `127.0.0.1:0`) and serves until dropped.
    pub async fn spawn(addr: SocketAddr) -> std::io::Result<FakeLlm> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(openai))
            .route("/v1/messages", post(anthropic))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "fake LLM server stopped");
            }
        });
        tracing::info!(%addr, "fake LLM server listening");
        Ok(FakeLlm { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`: the `base_url` for either provider kind.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A provider config of `kind` pointing here, without a key.
    pub fn provider_config(&self, kind: ProviderKind, default_model: &str) -> ProviderConfig {
        ProviderConfig::new(kind, self.base_url(), default_model)
    }

    /// Replaces the behaviour (counters included).
    pub fn set_mode(&self, mode: FakeMode) {
        *lock(&self.shared.mode) = mode;
    }

    /// The current behaviour, with counters as consumed so far.
    pub fn mode(&self) -> FakeMode {
        lock(&self.shared.mode).clone()
    }

    /// Require this key (`Authorization: Bearer KEY` / `x-api-key: KEY`); `None`
    /// accepts any or none. A wrong key answers 401, quoting what was sent.
    pub fn set_required_key(&self, key: Option<&str>) {
        *lock(&self.shared.required_key) = key.map(str::to_string);
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// The most requests that were ever being answered at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn openai(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(s, Api::OpenAi, "/v1/chat/completions", headers, body).await
}

async fn anthropic(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(s, Api::Anthropic, "/v1/messages", headers, body).await
}

/// Counts a request in flight until dropped (also when the client goes away).
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(s: &'a Shared) -> Self {
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(s)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The parts of a request the answer depends on.
#[derive(Debug)]
struct Parsed {
    model: String,
    /// Every text of the request (system prompt and messages), for usage.
    input_chars: usize,
    last_user: String,
    user_turns: usize,
}

async fn handle(s: Arc<Shared>, api: Api, path: &str, headers: HeaderMap, body: Bytes) -> Response {
    let _guard = InFlight::enter(&s);
    let raw = String::from_utf8_lossy(&body).into_owned();
    let json: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
    lock(&s.requests).push(RecordedRequest {
        path: path.to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: json.clone(),
        raw: raw.clone(),
    });

    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(required) = lock(&s.required_key).clone() {
        let sent = match api {
            Api::OpenAi => header("authorization").and_then(|v| v.strip_prefix("Bearer ")),
            Api::Anthropic => header("x-api-key"),
        };
        if sent != Some(required.as_str()) {
            let msg = match sent {
                Some(k) => format!("invalid API key provided: {k}"),
                None => "no API key provided".to_string(),
            };
            return error(
                api,
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                &msg,
                None,
            );
        }
    }
    if api == Api::Anthropic {
        if header("anthropic-version").is_none() {
            return bad(api, "anthropic-version: header is required");
        }
        if !header("content-type").is_some_and(|c| c.starts_with("application/json")) {
            return bad(api, "content-type: must be application/json");
        }
    }
    if json.is_null() {
        return bad(api, "the body is not valid JSON");
    }
    let parsed = match api {
        Api::OpenAi => check_openai(&json),
        Api::Anthropic => check_anthropic(&json),
    };
    let parsed = match parsed {
        Ok(p) => p,
        Err(msg) => return bad(api, &msg),
    };

    let magic = Magic::parse(&parsed.last_user);
    let (failure, mode) = {
        let mut mode = lock(&s.mode);
        let failure = if mode.rate_limit > 0 {
            mode.rate_limit -= 1;
            Some(Failure::RateLimited(
                mode.retry_after.clone().unwrap_or_else(|| "1".into()),
            ))
        } else if mode.server_errors > 0 {
            if mode.server_errors != u32::MAX {
                mode.server_errors -= 1;
            }
            Some(Failure::Server)
        } else {
            magic.failure(&s, &raw)
        };
        (failure, mode.clone())
    };
    let delay = magic.slow.unwrap_or(mode.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match failure {
        Some(Failure::RateLimited(retry_after)) => {
            let retry_after = (!retry_after.is_empty()).then_some(retry_after);
            return error(
                api,
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate limited by the fake",
                retry_after,
            );
        }
        Some(Failure::Server) => {
            return error(
                api,
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "the fake failed on purpose",
                None,
            );
        }
        None => {}
    }

    let text = magic
        .echo
        .or(mode.echo)
        .unwrap_or_else(|| reply_for(&parsed.last_user, parsed.user_turns));
    let model = mode.model.unwrap_or(parsed.model);
    let input = estimate_tokens(parsed.input_chars).max(1);
    let output = estimate_tokens(text.chars().count());
    let usage = !(mode.omit_usage || magic.no_usage);
    let id = s.ids.fetch_add(1, Ordering::SeqCst) + 1;
    let mut answer = match api {
        Api::OpenAi => json!({
            "id": format!("chatcmpl-fake-{id}"),
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop"
            }]
        }),
        Api::Anthropic => json!({
            "id": format!("msg_fake_{id}"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": null
        }),
    };
    if usage {
        answer["usage"] = match api {
            Api::OpenAi => {
                json!({"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output})
            }
            Api::Anthropic => json!({"input_tokens": input, "output_tokens": output}),
        };
    }
    (StatusCode::OK, axum::Json(answer)).into_response()
}

enum Failure {
    RateLimited(String),
    Server,
}

fn bad(api: Api, msg: &str) -> Response {
    error(
        api,
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        msg,
        None,
    )
}

/// An error answer in the API's documented shape.
fn error(
    api: Api,
    status: StatusCode,
    kind: &str,
    msg: &str,
    retry_after: Option<String>,
) -> Response {
    let body = match api {
        Api::OpenAi => {
            json!({"error": {"message": msg, "type": kind, "param": null, "code": null}})
        }
        Api::Anthropic => json!({"type": "error", "error": {"type": kind, "message": msg}}),
    };
    let mut resp = (status, axum::Json(body)).into_response();
    if let Some(v) = retry_after.and_then(|v| v.parse().ok()) {
        resp.headers_mut().insert("retry-after", v);
    }
    resp
}

/// The text of a message's `content`: a string, or an array of `{"type": "text"}` parts.
fn content_text(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                (Some("text"), Some(t)) => Ok(t.to_string()),
                _ => Err("content parts must be {\"type\": \"text\", \"text\": ...}".to_string()),
            })
            .collect(),
        _ => Err("content must be a string or an array of text parts".into()),
    }
}

fn check_fields(body: &Value, allowed: &[&str]) -> Result<(), String> {
    let obj = body.as_object().ok_or("the body must be a JSON object")?;
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("{k}: unrecognized request argument"));
    }
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err("stream: the fake does not stream".into());
    }
    match body.get("model").and_then(Value::as_str) {
        Some(m) if !m.is_empty() => Ok(()),
        _ => Err("model: a non-empty string is required".into()),
    }
}

fn check_positive(body: &Value, field: &str, required: bool) -> Result<(), String> {
    match body.get(field) {
        None if !required => Ok(()),
        Some(v) if v.as_u64().is_some_and(|n| n >= 1) => Ok(()),
        _ => Err(format!("{field}: a positive integer is required")),
    }
}

fn check_temperature(body: &Value, max: f64) -> Result<(), String> {
    match body.get("temperature") {
        None => Ok(()),
        Some(v) if v.as_f64().is_some_and(|t| (0.0..=max).contains(&t)) => Ok(()),
        _ => Err(format!("temperature: must be a number from 0 to {max}")),
    }
}

fn check_openai(body: &Value) -> Result<Parsed, String> {
    check_fields(
        body,
        &[
            "model",
            "messages",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "stop",
            "n",
            "seed",
            "user",
            "stream",
            "presence_penalty",
            "frequency_penalty",
        ],
    )?;
    check_positive(body, "max_tokens", false)?;
    check_positive(body, "max_completion_tokens", false)?;
    check_temperature(body, 2.0)?;
    let messages = body["messages"]
        .as_array()
        .filter(|m| !m.is_empty())
        .ok_or("messages: a non-empty array is required")?;
    let mut parsed = Parsed {
        model: body["model"].as_str().unwrap_or_default().into(),
        input_chars: 0,
        last_user: String::new(),
        user_turns: 0,
    };
    for (i, m) in messages.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or_default();
        if !["system", "developer", "user", "assistant"].contains(&role) {
            return Err(format!(
                "messages[{i}].role: {role:?} is not one of system, developer, user, assistant"
            ));
        }
        let text = content_text(&m["content"]).map_err(|e| format!("messages[{i}].{e}"))?;
        parsed.input_chars += text.chars().count();
        if role == "user" {
            parsed.user_turns += 1;
            parsed.last_user = text;
        }
    }
    Ok(parsed)
}

fn check_anthropic(body: &Value) -> Result<Parsed, String> {
    check_fields(
        body,
        &[
            "model",
            "messages",
            "max_tokens",
            "system",
            "temperature",
            "top_p",
            "top_k",
            "stop_sequences",
            "stream",
            "metadata",
        ],
    )?;
    check_positive(body, "max_tokens", true)?;
    check_temperature(body, 1.0)?;
    let mut parsed = Parsed {
        model: body["model"].as_str().unwrap_or_default().into(),
        input_chars: 0,
        last_user: String::new(),
        user_turns: 0,
    };
    if let Some(system) = body.get("system") {
        parsed.input_chars += content_text(system)
            .map_err(|e| format!("system: {e}"))?
            .chars()
            .count();
    }
    let messages = body["messages"]
        .as_array()
        .filter(|m| !m.is_empty())
        .ok_or("messages: a non-empty array is required")?;
    let mut previous = "";
    for (i, m) in messages.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or_default();
        match role {
            "user" | "assistant" => {}
            "system" => {
                return Err(format!(
                    "messages[{i}].role: \"system\" is not a message role; use the top-level system parameter"
                ));
            }
            other => {
                return Err(format!(
                    "messages[{i}].role: {other:?} is not user or assistant"
                ));
            }
        }
        if i == 0 && role != "user" {
            return Err("messages: the first message must use the \"user\" role".into());
        }
        if role == previous {
            return Err(format!(
                "messages[{i}]: roles must alternate between \"user\" and \"assistant\""
            ));
        }
        previous = role;
        let text = content_text(&m["content"]).map_err(|e| format!("messages[{i}].{e}"))?;
        if text.trim().is_empty() {
            return Err(format!(
                "messages[{i}]: text content blocks must be non-empty"
            ));
        }
        parsed.input_chars += text.chars().count();
        if role == "user" {
            parsed.user_turns += 1;
            parsed.last_user = text;
        }
    }
    Ok(parsed)
}

/// The fake's answer to a conversation whose last user message is `last_user` and
/// which has `user_turns` user turns: `OPENER "first words…" (turn N)`. Magic words are
/// left out of the quote.
pub fn reply_for(last_user: &str, user_turns: usize) -> String {
    const OPENERS: [&str; 4] = ["You said", "I heard", "Noted:", "So,"];
    const QUOTED_WORDS: usize = 8;
    let words: Vec<&str> = last_user
        .split_whitespace()
        .filter(|w| !w.starts_with("fake:"))
        .collect();
    let mut quote = words
        .iter()
        .take(QUOTED_WORDS)
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    if words.len() > QUOTED_WORDS {
        quote.push('…');
    }
    let opener = OPENERS[(fnv1a(last_user.as_bytes()) % OPENERS.len() as u64) as usize];
    format!("{opener} \"{quote}\" (turn {user_turns})")
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Behaviour asked for by magic words in the last user message.
#[derive(Debug, Default, PartialEq)]
struct Magic {
    rate_limit: Option<u32>,
    /// `Some(None)`: always.
    server_errors: Option<Option<u32>>,
    slow: Option<Duration>,
    no_usage: bool,
    echo: Option<String>,
}

impl Magic {
    fn parse(text: &str) -> Magic {
        let mut m = Magic::default();
        if let Some(i) = text.find("fake:echo=") {
            m.echo = Some(text[i + "fake:echo=".len()..].to_string());
        }
        let head = text.find("fake:echo=").map_or(text, |i| &text[..i]);
        for word in head.split_whitespace() {
            let Some(cmd) = word.strip_prefix("fake:") else {
                continue;
            };
            let count = |rest: &str| rest.strip_prefix('x').and_then(|n| n.parse::<u32>().ok());
            if let Some(rest) = cmd.strip_prefix("429") {
                m.rate_limit = if rest.is_empty() {
                    Some(1)
                } else {
                    count(rest)
                };
            } else if let Some(rest) = cmd.strip_prefix("500") {
                m.server_errors = if rest.is_empty() {
                    Some(None)
                } else {
                    count(rest).map(Some)
                };
            } else if let Some(v) = cmd.strip_prefix("slow=") {
                m.slow = parse_delay(v);
            } else if cmd == "slow" {
                m.slow = Some(Duration::from_secs(5));
            } else if cmd == "no-usage" {
                m.no_usage = true;
            }
        }
        m
    }

    /// The failure to serve now for this request body, counting per identical body.
    fn failure(&self, s: &Shared, raw: &str) -> Option<Failure> {
        let (limit, failure) = match (self.rate_limit, self.server_errors) {
            (Some(n), _) => (Some(n), Failure::RateLimited("1".into())),
            (None, Some(n)) => (n, Failure::Server),
            (None, None) => return None,
        };
        let Some(limit) = limit else {
            return Some(failure);
        };
        let key = fnv1a(raw.as_bytes());
        let mut served = lock(&s.magic_failures);
        let count = served.entry(key).or_insert(0);
        if *count < limit {
            *count += 1;
            Some(failure)
        } else {
            served.remove(&key);
            None
        }
    }
}

fn parse_delay(v: &str) -> Option<Duration> {
    if let Some(ms) = v.strip_suffix("ms") {
        ms.parse().ok().map(Duration::from_millis)
    } else if let Some(s) = v.strip_suffix('s') {
        s.parse().ok().map(Duration::from_secs)
    } else {
        v.parse().ok().map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_deterministic_and_quote_the_message() {
        let a = reply_for("what is a roost, and why do bots need one at all?", 3);
        assert_eq!(
            a,
            reply_for("what is a roost, and why do bots need one at all?", 3)
        );
        assert!(
            a.contains("\"what is a roost, and why do bots…\" (turn 3)"),
            "{a}"
        );
        assert!(!reply_for("fake:no-usage hi", 1).contains("fake:"));
    }

    #[test]
    fn magic_words() {
        assert_eq!(Magic::parse("hello"), Magic::default());
        let m = Magic::parse("fake:429x3 fake:slow=250ms fake:no-usage hi");
        assert_eq!(
            (m.rate_limit, m.slow, m.no_usage),
            (Some(3), Some(Duration::from_millis(250)), true)
        );
        assert_eq!(Magic::parse("fake:500").server_errors, Some(None));
        assert_eq!(Magic::parse("fake:500x2").server_errors, Some(Some(2)));
        assert_eq!(
            Magic::parse("fake:slow=2s").slow,
            Some(Duration::from_secs(2))
        );
        let m = Magic::parse("say fake:echo=exactly this fake:500");
        assert_eq!(
            (m.echo.as_deref(), m.server_errors),
            (Some("exactly this fake:500"), None)
        );
    }

    #[test]
    fn request_checks_follow_the_documented_formats() {
        let ok = json!({"model": "c", "max_tokens": 10, "system": "s", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text", "text": "b"}]}, {"role": "user", "content": "c"}]});
        let p = check_anthropic(&ok).unwrap();
        assert_eq!(
            (p.last_user.as_str(), p.user_turns, p.input_chars),
            ("c", 2, 4)
        );
        let mut no_max = ok.clone();
        no_max.as_object_mut().unwrap().remove("max_tokens");
        assert!(
            check_anthropic(&no_max)
                .unwrap_err()
                .starts_with("max_tokens")
        );
        let first_assistant = json!({"model": "c", "max_tokens": 1, "messages": [{"role": "assistant", "content": "a"}]});
        assert!(check_anthropic(&first_assistant).is_err());
        let repeated = json!({"model": "c", "max_tokens": 1, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]});
        assert!(
            check_anthropic(&repeated)
                .unwrap_err()
                .contains("alternate")
        );
        let system_role = json!({"model": "c", "max_tokens": 1, "messages": [{"role": "system", "content": "a"}]});
        assert!(
            check_anthropic(&system_role)
                .unwrap_err()
                .contains("top-level system")
        );
        let hot = json!({"model": "c", "max_tokens": 1, "temperature": 1.5, "messages": [{"role": "user", "content": "a"}]});
        assert!(check_anthropic(&hot).is_err());

        let ok = json!({"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 1.5});
        assert_eq!(check_openai(&ok).unwrap().last_user, "hi");
        assert!(check_openai(&json!({"messages": [{"role": "user", "content": "x"}]})).is_err());
        assert!(check_openai(&json!({"model": "m", "messages": []})).is_err());
        assert!(
            check_openai(&json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]}))
                .is_err()
        );
        assert!(check_openai(&json!({"model": "m", "api_key": "x", "messages": [{"role": "user", "content": "x"}]})).is_err());
    }
}
