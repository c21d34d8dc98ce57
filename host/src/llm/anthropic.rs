//! Anthropic messages: `POST {base}/v1/messages`.
//!
//! Headers `x-api-key: KEY`, `anthropic-version: 2023-06-01` and
//! `content-type: application/json`; body
//!
//! ```json
//! {"model": "claude-...", "max_tokens": 512, "system": "...",
//!  "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],
//!  "temperature": 0.7}
//! ```
//!
//! The API wants `max_tokens` (default [`DEFAULT_MAX_TOKENS`] when the request has
//! none), the system prompt in the top-level `system` field, user and assistant turns
//! alternating and starting with `user`, and non-empty content. The request is shaped to
//! fit ([`messages`]): empty turns are dropped, consecutive turns of one role are joined
//! with a blank line, and a conversation that starts with the assistant gets
//! [`OPENING_USER_TURN`] in front. Temperature is clamped to Anthropic's 0.0-1.0.
//! The answer's text is every `content` block of `type == "text"`, joined; usage comes
//! from `usage.input_tokens` / `usage.output_tokens`.
//!
//! ```
//! use roost::llm::{AnthropicProvider, ChatRequest, HttpSettings, Provider, Role};
//! use roost::llm::fake::FakeLlm;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let fake = FakeLlm::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
//! let mut settings = HttpSettings::new(fake.base_url().parse().unwrap(), "claude-test");
//! settings.api_key = Some("sk-ant-test-0123456789".into());
//! let provider = AnthropicProvider::new(settings).unwrap();
//! let mut req = ChatRequest::new(vec![(Role::User, "hello there".into())]);
//! req.system = Some("be brief".into());
//! let answer = provider.chat(req).await.unwrap();
//! assert!(answer.usage.is_some());
//! let seen = &fake.requests()[0];
//! assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
//! assert_eq!(seen.body["system"], "be brief");
//! # });
//! ```

use std::fmt;

use secrecy::SecretString;
use serde::Deserialize;
use serde_json::{Value, json};
use url::Url;

use super::http::{self, HttpSettings};
use super::provider::{BoxFuture, ChatRequest, ChatResponse, Provider, ProviderError, Role};
use super::retry::RetryPolicy;
use super::secret::SecretSet;

/// The API version roost speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// `max_tokens` when the request sets none (the API requires one).
pub const DEFAULT_MAX_TOKENS: u32 = 512;

/// Put in front of a conversation that would otherwise start with the assistant.
pub const OPENING_USER_TURN: &str = "(conversation start)";

/// A client for Anthropic's messages API.
pub struct AnthropicProvider {
    client: reqwest::Client,
    endpoint: Url,
    key: Option<SecretString>,
    secrets: SecretSet,
    default_model: String,
    retry: RetryPolicy,
}

impl AnthropicProvider {
    pub fn new(settings: HttpSettings) -> Result<Self, reqwest::Error> {
        Ok(AnthropicProvider {
            client: http::client()?,
            endpoint: http::endpoint(&settings.base_url, "messages"),
            secrets: SecretSet::new(settings.api_key.iter().cloned().collect()),
            key: settings.api_key,
            default_model: settings.default_model,
            retry: settings.retry,
        })
    }

    /// The JSON body for `req`.
    pub fn body(&self, req: &ChatRequest) -> Value {
        let messages: Vec<Value> = messages(&req.turns)
            .into_iter()
            .map(|(role, content)| json!({"role": role.as_str(), "content": content}))
            .collect();
        let model = req.model.as_deref().unwrap_or(&self.default_model);
        let mut body = json!({
            "model": model,
            "max_tokens": req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS).max(1),
            "messages": messages,
        });
        if let Some(system) = req.system.as_deref().filter(|s| !s.trim().is_empty()) {
            body["system"] = json!(system);
        }
        if let Some(t) = req.temperature {
            body["temperature"] = json!(t.clamp(0.0, 1.0));
        }
        body
    }

    async fn attempt(&self, body: &Value) -> Result<ChatResponse, ProviderError> {
        let req = self
            .client
            .post(self.endpoint.clone())
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(body);
        let req = http::with_key(req, "x-api-key", "", self.key.as_ref());
        let bytes = http::send(req, &self.secrets).await?;
        parse_answer(&bytes, body["model"].as_str().unwrap_or_default())
    }
}

/// Turns shaped for the messages API: empty turns dropped, consecutive turns of one
/// role joined with a blank line, and [`OPENING_USER_TURN`] in front when the first
/// turn is the assistant's.
pub fn messages(turns: &[(Role, String)]) -> Vec<(Role, String)> {
    let mut out: Vec<(Role, String)> = Vec::with_capacity(turns.len() + 1);
    for (role, content) in turns {
        if content.trim().is_empty() {
            continue;
        }
        match out.last_mut() {
            Some((last, text)) if last == role => {
                text.push_str("\n\n");
                text.push_str(content);
            }
            _ => out.push((*role, content.clone())),
        }
    }
    if out.first().is_some_and(|(r, _)| *r == Role::Assistant) {
        out.insert(0, (Role::User, OPENING_USER_TURN.to_string()));
    }
    out
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    model: Option<String>,
    content: Vec<Block>,
    #[serde(default)]
    usage: Option<AnswerUsage>,
}

#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct AnswerUsage {
    #[serde(default)]
    input_tokens: Option<u32>,
    #[serde(default)]
    output_tokens: Option<u32>,
}

fn parse_answer(bytes: &[u8], requested_model: &str) -> Result<ChatResponse, ProviderError> {
    let answer: Answer = http::decode(bytes)?;
    let text: String = answer
        .content
        .into_iter()
        .filter(|b| b.kind == "text")
        .filter_map(|b| b.text)
        .collect();
    let tokens = answer.usage.map(|u| (u.input_tokens, u.output_tokens));
    Ok(http::chat_response(
        text,
        answer.model,
        requested_model,
        tokens,
    ))
}

impl Provider for AnthropicProvider {
    fn default_model(&self) -> &str {
        &self.default_model
    }

    fn chat(&self, req: ChatRequest) -> BoxFuture<'_, Result<ChatResponse, ProviderError>> {
        Box::pin(async move {
            let body = self.body(&req);
            self.retry.run(|_| self.attempt(&body)).await
        })
    }
}

impl fmt::Debug for AnthropicProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicProvider")
            .field("endpoint", &self.endpoint.as_str())
            .field("key", &self.key.as_ref().map(|_| "[redacted]"))
            .field("default_model", &self.default_model)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Usage;
    use Role::{Assistant as A, User as U};

    fn t(v: &[(Role, &str)]) -> Vec<(Role, String)> {
        v.iter().map(|(r, s)| (*r, s.to_string())).collect()
    }

    #[test]
    fn turns_alternate_and_start_with_user() {
        assert_eq!(
            messages(&t(&[(U, "a"), (U, "b"), (A, "c"), (A, ""), (U, "d")])),
            t(&[(U, "a\n\nb"), (A, "c"), (U, "d")])
        );
        assert_eq!(
            messages(&t(&[(A, "hi"), (U, "yo")])),
            t(&[(U, OPENING_USER_TURN), (A, "hi"), (U, "yo")])
        );
        assert_eq!(
            messages(&t(&[(U, "  "), (A, "x")])),
            t(&[(U, OPENING_USER_TURN), (A, "x")])
        );
        assert!(messages(&t(&[(U, "")])).is_empty());
    }

    #[test]
    fn body_has_required_fields() {
        let p = AnthropicProvider::new(HttpSettings::new(
            "http://127.0.0.1:9".parse().unwrap(),
            "c1",
        ))
        .unwrap();
        let mut req = ChatRequest::new(t(&[(U, "q")]));
        let body = p.body(&req);
        assert_eq!(
            body,
            json!({"model": "c1", "max_tokens": DEFAULT_MAX_TOKENS, "messages": [{"role": "user", "content": "q"}]})
        );
        req.system = Some("sys".into());
        req.temperature = Some(1.7);
        req.max_tokens = Some(99);
        let body = p.body(&req);
        assert_eq!(
            (
                body["system"].as_str(),
                body["temperature"].as_f64(),
                body["max_tokens"].as_u64()
            ),
            (Some("sys"), Some(1.0), Some(99))
        );
    }

    #[test]
    fn answers_parse() {
        let ok = br#"{"id":"m","type":"message","role":"assistant","model":"c2","content":[{"type":"text","text":"he"},{"type":"thinking","thinking":"..."},{"type":"text","text":"llo"}],"usage":{"input_tokens":5,"output_tokens":2}}"#;
        let r = parse_answer(ok, "c1").unwrap();
        assert_eq!(
            (r.text.as_str(), r.model.as_str(), r.usage),
            (
                "hello",
                "c2",
                Some(Usage {
                    input: 5,
                    output: 2
                })
            )
        );
        let r = parse_answer(br#"{"content":[]}"#, "c1").unwrap();
        assert_eq!(
            (r.text.as_str(), r.model.as_str(), r.usage),
            ("", "c1", None)
        );
        assert!(matches!(
            parse_answer(br#"{"type":"error"}"#, "c"),
            Err(ProviderError::Decode(_))
        ));
    }
}
