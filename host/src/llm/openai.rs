//! OpenAI-compatible chat completions: `POST {base}/v1/chat/completions`.
//!
//! The same shape is served by OpenAI and by local servers (Ollama, vLLM, llama.cpp's
//! server, LM Studio...), so the key is optional. Request:
//!
//! ```json
//! {"model": "llama3",
//!  "messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
//!  "max_tokens": 256, "temperature": 0.7}
//! ```
//!
//! with `Authorization: Bearer KEY` when a key is configured; `max_tokens` and
//! `temperature` are left out when unset. The answer's `choices[0].message.content` is
//! the text, `usage.prompt_tokens` / `usage.completion_tokens` the usage and `model` the
//! model. OpenAI's reasoning models refuse `max_tokens`; for them set
//! `max_tokens_param = "max_completion_tokens"` on the provider.
//!
//! ```
//! use roost::llm::{ChatRequest, HttpSettings, OpenAiProvider, Provider, Role};
//! use roost::llm::fake::FakeLlm;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let fake = FakeLlm::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
//! let settings = HttpSettings::new(fake.base_url().parse().unwrap(), "llama3");
//! let provider = OpenAiProvider::new(settings).unwrap();
//! let answer = provider.chat(ChatRequest::new(vec![(Role::User, "hello there".into())])).await.unwrap();
//! assert!(answer.text.contains("hello there"));
//! assert_eq!(fake.requests()[0].body["messages"][0]["role"], "user");
//! # });
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use url::Url;

use super::http::{self, HttpSettings};
use super::provider::{BoxFuture, ChatRequest, ChatResponse, Provider, ProviderError};
use super::retry::RetryPolicy;
use super::secret::SecretSet;
use secrecy::SecretString;

/// Which request field carries the output token limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxTokensParam {
    /// `max_tokens`: every OpenAI-compatible server (the default).
    #[default]
    MaxTokens,
    /// `max_completion_tokens`: OpenAI's newer models require it.
    MaxCompletionTokens,
}

/// A client for an OpenAI-compatible chat completions endpoint.
pub struct OpenAiProvider {
    client: reqwest::Client,
    endpoint: Url,
    key: Option<SecretString>,
    secrets: SecretSet,
    default_model: String,
    retry: RetryPolicy,
    max_tokens_param: MaxTokensParam,
}

impl OpenAiProvider {
    pub fn new(settings: HttpSettings) -> Result<Self, reqwest::Error> {
        Ok(OpenAiProvider {
            client: http::client()?,
            endpoint: http::endpoint(&settings.base_url, "chat/completions"),
            secrets: SecretSet::new(settings.api_key.iter().cloned().collect()),
            key: settings.api_key,
            default_model: settings.default_model,
            retry: settings.retry,
            max_tokens_param: MaxTokensParam::default(),
        })
    }

    /// Uses `param` for the output token limit.
    pub fn with_max_tokens_param(mut self, param: MaxTokensParam) -> Self {
        self.max_tokens_param = param;
        self
    }

    /// The JSON body for `req` (public for tests and `roost replay`-style dry runs).
    pub fn body(&self, req: &ChatRequest) -> Value {
        let mut messages = Vec::with_capacity(req.turns.len() + 1);
        if let Some(system) = &req.system {
            messages.push(json!({"role": "system", "content": system}));
        }
        for (role, content) in &req.turns {
            messages.push(json!({"role": role.as_str(), "content": content}));
        }
        let model = req.model.as_deref().unwrap_or(&self.default_model);
        let mut body = json!({"model": model, "messages": messages});
        if let Some(n) = req.max_tokens {
            let field = match self.max_tokens_param {
                MaxTokensParam::MaxTokens => "max_tokens",
                MaxTokensParam::MaxCompletionTokens => "max_completion_tokens",
            };
            body[field] = json!(n);
        }
        if let Some(t) = req.temperature {
            body["temperature"] = json!(t);
        }
        body
    }

    async fn attempt(&self, body: &Value) -> Result<ChatResponse, ProviderError> {
        let req = self.client.post(self.endpoint.clone()).json(body);
        let req = http::with_key(req, "authorization", "Bearer ", self.key.as_ref());
        let bytes = http::send(req, &self.secrets).await?;
        parse_answer(&bytes, body["model"].as_str().unwrap_or_default())
    }
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    model: Option<String>,
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<AnswerUsage>,
}

#[derive(Deserialize)]
struct Choice {
    message: AnswerMessage,
}

#[derive(Deserialize)]
struct AnswerMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct AnswerUsage {
    #[serde(default)]
    prompt_tokens: Option<u32>,
    #[serde(default)]
    completion_tokens: Option<u32>,
}

fn parse_answer(bytes: &[u8], requested_model: &str) -> Result<ChatResponse, ProviderError> {
    let answer: Answer = http::decode(bytes)?;
    let choice = answer
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| ProviderError::Decode("no choices in the answer".into()))?;
    let text = choice
        .message
        .content
        .ok_or_else(|| ProviderError::Decode("the answer has no text content".into()))?;
    let tokens = answer.usage.map(|u| (u.prompt_tokens, u.completion_tokens));
    Ok(http::chat_response(
        text,
        answer.model,
        requested_model,
        tokens,
    ))
}

impl Provider for OpenAiProvider {
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

impl fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiProvider")
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
    use crate::llm::{Role, Usage};

    fn provider() -> OpenAiProvider {
        let mut s = HttpSettings::new("http://127.0.0.1:9".parse().unwrap(), "m0");
        s.api_key = Some("sk-openai-test-0123456789".into());
        OpenAiProvider::new(s).unwrap()
    }

    #[test]
    fn body_places_system_first_and_omits_unset_fields() {
        let p = provider();
        let mut req = ChatRequest::new(vec![
            (Role::User, "a".into()),
            (Role::Assistant, "b".into()),
        ]);
        req.system = Some("be brief".into());
        let body = p.body(&req);
        assert_eq!(
            body,
            json!({"model": "m0", "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}]})
        );
        req.max_tokens = Some(64);
        req.temperature = Some(0.5);
        req.model = Some("m1".into());
        let body = p.body(&req);
        assert_eq!(
            (
                body["max_tokens"].as_u64(),
                body["temperature"].as_f64(),
                body["model"].as_str()
            ),
            (Some(64), Some(0.5), Some("m1"))
        );
        let body = provider()
            .with_max_tokens_param(MaxTokensParam::MaxCompletionTokens)
            .body(&req);
        assert_eq!(body["max_completion_tokens"], 64);
        assert!(body.get("max_tokens").is_none());
    }

    #[test]
    fn answers_parse() {
        let ok = br#"{"model":"m2","choices":[{"message":{"role":"assistant","content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let r = parse_answer(ok, "m0").unwrap();
        assert_eq!(
            (r.text.as_str(), r.model.as_str(), r.usage),
            (
                "hi",
                "m2",
                Some(Usage {
                    input: 3,
                    output: 1
                })
            )
        );
        let bare = br#"{"choices":[{"message":{"content":"x"}}]}"#;
        let r = parse_answer(bare, "m0").unwrap();
        assert_eq!((r.model.as_str(), r.usage), ("m0", None));
        assert!(matches!(
            parse_answer(br#"{"choices":[]}"#, "m"),
            Err(ProviderError::Decode(_))
        ));
        assert!(matches!(
            parse_answer(br#"{"choices":[{"message":{"content":null}}]}"#, "m"),
            Err(ProviderError::Decode(_))
        ));
        assert!(matches!(
            parse_answer(b"<html>", "m"),
            Err(ProviderError::Decode(_))
        ));
    }

    #[test]
    fn debug_hides_the_key() {
        let d = format!("{:?}", provider());
        assert!(d.contains("[redacted]") && !d.contains("0123456789"), "{d}");
    }
}
