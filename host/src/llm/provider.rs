//! The provider trait: one normalised chat request in, the model's text out.
//!
//! A [`Provider`] knows one HTTP API ([`OpenAiProvider`](super::OpenAiProvider),
//! [`AnthropicProvider`](super::AnthropicProvider)) and nothing about personas: grants,
//! budgets, model allowlists and concurrency caps are applied above it by the
//! [`LlmHub`](super::LlmHub)'s per-persona backends. Providers own the wire format,
//! retries with backoff (see [`RetryPolicy`](super::RetryPolicy)) and their overall
//! timeout.
//!
//! Requests are normalised: every system turn of the persona's request is joined into
//! [`ChatRequest::system`] (blank line between them) and the remaining turns keep their
//! order. OpenAI-compatible servers get the system prompt as a leading `system`
//! message, Anthropic as its top-level `system` field.
//!
//! A provider never puts its key in an error, in `Debug` output or in a response: error
//! excerpts are redacted and clipped to [`EXCERPT_CHARS`] characters.
//!
//! ```
//! use roost::llm::{ChatRequest, ChatResponse, Provider, ProviderError, Role, Usage};
//! use roost::plugin::context::BoxFuture;
//!
//! /// A provider that answers every request with the number of turns it saw.
//! #[derive(Debug)]
//! struct Counter;
//!
//! impl Provider for Counter {
//!     fn default_model(&self) -> &str { "counter-1" }
//!     fn chat(&self, req: ChatRequest) -> BoxFuture<'_, Result<ChatResponse, ProviderError>> {
//!         Box::pin(async move {
//!             Ok(ChatResponse {
//!                 text: format!("{} turns", req.turns.len()),
//!                 model: req.model.unwrap_or_else(|| self.default_model().to_string()),
//!                 usage: Some(Usage { input: 1, output: 1 }),
//!             })
//!         })
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let req = ChatRequest::new(vec![(Role::User, "hi".into())]);
//! assert_eq!(Counter.chat(req).await.unwrap().text, "1 turns");
//! # });
//! ```

use std::fmt;
use std::time::Duration;

use reqwest::StatusCode;

use super::secret::SecretSet;
pub use crate::plugin::context::BoxFuture;

/// Error excerpts (from a provider's answer body) are clipped to this many characters.
pub const EXCERPT_CHARS: usize = 200;

/// Bodies of failed answers are read up to this many bytes (for the excerpt).
pub(crate) const ERROR_BODY_LIMIT: usize = 16 * 1024;

/// Successful answers larger than this are refused as [`ProviderError::Decode`].
pub(crate) const ANSWER_BODY_LIMIT: usize = 8 * 1024 * 1024;

/// Who speaks in a non-system turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    /// The role's name in both providers' wire formats.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// A chat request in the shape every provider accepts.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatRequest {
    /// The system prompt (all system turns, joined), if any.
    pub system: Option<String>,
    /// The conversation without system turns, oldest first.
    pub turns: Vec<(Role, String)>,
    /// Upper bound on generated tokens; `None` = the provider's default (Anthropic, which
    /// requires a value, gets [`DEFAULT_MAX_TOKENS`](super::anthropic::DEFAULT_MAX_TOKENS)).
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// The model; `None` = the provider's [`default_model`](Provider::default_model).
    pub model: Option<String>,
}

impl ChatRequest {
    /// A request with these turns and everything else left to the provider.
    pub fn new(turns: Vec<(Role, String)>) -> Self {
        ChatRequest {
            system: None,
            turns,
            max_tokens: None,
            temperature: None,
            model: None,
        }
    }

    /// Characters of input (system prompt and every turn), for estimates.
    pub fn input_chars(&self) -> usize {
        self.system.as_deref().map_or(0, |s| s.chars().count())
            + self
                .turns
                .iter()
                .map(|(_, t)| t.chars().count())
                .sum::<usize>()
    }

    /// A conservative bound on the input's tokens, for reserving a budget before the
    /// call: one token per UTF-8 byte of every part, plus [`TURN_OVERHEAD`] per turn
    /// (the system prompt counts as one) and [`REQUEST_OVERHEAD`]. Byte-level BPE
    /// tokenisers never make more tokens than bytes, so CJK (3 bytes a character,
    /// often 1-2 tokens) and emoji (4 bytes and more, up to a token a byte) cannot
    /// exceed it the way they exceed a characters-per-token guess; English text
    /// (about 4 bytes a token) is over-reserved, and the call is charged its real
    /// usage afterwards.
    pub fn input_token_bound(&self) -> u64 {
        let parts = self.system.iter().chain(self.turns.iter().map(|(_, t)| t));
        parts.map(|t| t.len() as u64 + TURN_OVERHEAD).sum::<u64>() + REQUEST_OVERHEAD
    }
}

/// Tokens a provider's chat template adds per turn, at most (role markers).
pub const TURN_OVERHEAD: u64 = 4;
/// Tokens a provider's chat template adds per request, at most.
pub const REQUEST_OVERHEAD: u64 = 3;

/// A conservative bound on the tokens of `text` (one per UTF-8 byte), for output the
/// provider did not count.
pub fn token_bound(text: &str) -> u64 {
    text.len() as u64
}

/// Tokens the provider reported for one call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u32,
    pub output: u32,
}

impl Usage {
    pub fn total(&self) -> u64 {
        u64::from(self.input) + u64::from(self.output)
    }
}

/// A provider's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatResponse {
    /// The generated text.
    pub text: String,
    /// The model that answered (as the provider names it).
    pub model: String,
    /// Token counts, when the provider sent them.
    pub usage: Option<Usage>,
}

/// Rough token count for text the provider did not count: one token per four
/// characters, rounded up.
pub fn estimate_tokens(chars: usize) -> u32 {
    u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX)
}

/// Why a provider call failed. Holds no key: excerpts are redacted and clipped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// No answer within the provider's overall timeout (retries included).
    #[error("no answer within the timeout")]
    Timeout,
    /// 429, still after the retries (or the server asked to wait past the deadline).
    #[error("rate limited (HTTP 429){}", fmt_retry_after(.retry_after))]
    RateLimited { retry_after: Option<Duration> },
    /// A 5xx answer (or 408), still after the retries.
    #[error("server error (HTTP {status}): {excerpt}")]
    Server { status: u16, excerpt: String },
    /// The request did not get an HTTP answer (connection refused or reset, TLS...).
    #[error("network error: {0}")]
    Network(String),
    /// An answer that is not the provider's documented shape.
    #[error("unreadable answer: {0}")]
    Decode(String),
    /// 401 or 403: the host's key was refused.
    #[error("authentication refused (HTTP {status}): {excerpt}")]
    Auth { status: u16, excerpt: String },
    /// Another 4xx: the provider refused the request.
    #[error("request refused (HTTP {status}): {excerpt}")]
    BadRequest { status: u16, excerpt: String },
}

fn fmt_retry_after(d: &Option<Duration>) -> String {
    d.map(|d| format!("; retry after {} s", d.as_secs_f32()))
        .unwrap_or_default()
}

impl ProviderError {
    /// Whether another attempt may succeed: 429, 5xx, 408 and network errors.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProviderError::RateLimited { .. }
                | ProviderError::Server { .. }
                | ProviderError::Network(_)
        )
    }

    /// The error for an unsuccessful HTTP status and its (partial) body.
    pub(crate) fn from_status(
        status: StatusCode,
        body: &[u8],
        retry_after: Option<Duration>,
        secrets: &SecretSet,
    ) -> Self {
        let code = status.as_u16();
        let excerpt = || excerpt(&String::from_utf8_lossy(body), secrets);
        match code {
            429 => ProviderError::RateLimited { retry_after },
            401 | 403 => ProviderError::Auth {
                status: code,
                excerpt: excerpt(),
            },
            408 => ProviderError::Server {
                status: code,
                excerpt: excerpt(),
            },
            400..=499 => ProviderError::BadRequest {
                status: code,
                excerpt: excerpt(),
            },
            _ => ProviderError::Server {
                status: code,
                excerpt: excerpt(),
            },
        }
    }

    /// A transport error from reqwest, without its URL.
    pub(crate) fn from_reqwest(err: reqwest::Error, secrets: &SecretSet) -> Self {
        if err.is_timeout() {
            return ProviderError::Timeout;
        }
        let decode = err.is_decode();
        let err = err.without_url();
        let mut text = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        let text = excerpt(&text, secrets);
        if decode {
            ProviderError::Decode(text)
        } else {
            ProviderError::Network(text)
        }
    }
}

/// `text` redacted, whitespace collapsed and clipped to [`EXCERPT_CHARS`] characters.
pub(crate) fn excerpt(text: &str, secrets: &SecretSet) -> String {
    let redacted = secrets.redact(text);
    let mut out = String::new();
    for (i, word) in redacted.split_whitespace().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(word);
        if out.chars().count() > EXCERPT_CHARS {
            break;
        }
    }
    if out.chars().count() > EXCERPT_CHARS {
        out = out.chars().take(EXCERPT_CHARS - 1).collect();
        out.push('…');
    }
    out
}

/// One HTTP API that completes chats.
pub trait Provider: Send + Sync + fmt::Debug {
    /// The model used when a request names none.
    fn default_model(&self) -> &str;

    /// Completes one request, retrying 429/5xx as the provider's policy allows.
    fn chat(&self, req: ChatRequest) -> BoxFuture<'_, Result<ChatResponse, ProviderError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_clipped_and_redacted() {
        let secrets = SecretSet::new(vec!["sk-secret-0123456789".into()]);
        let body = format!(
            "{{\"error\": \"bad key sk-secret-0123456789\"}}  {}",
            "x ".repeat(500)
        );
        let e = excerpt(&body, &secrets);
        assert!(e.chars().count() <= EXCERPT_CHARS);
        assert!(e.ends_with('…'));
        assert!(e.contains("[redacted]") && !e.contains("0123456789"));
        assert_eq!(excerpt("  short\n\nbody ", &secrets), "short body");
    }

    #[test]
    fn status_classification() {
        let s = SecretSet::default();
        let e =
            |c: u16| ProviderError::from_status(StatusCode::from_u16(c).unwrap(), b"x", None, &s);
        assert!(matches!(
            e(429),
            ProviderError::RateLimited { retry_after: None }
        ));
        assert!(matches!(e(401), ProviderError::Auth { status: 401, .. }));
        assert!(matches!(e(403), ProviderError::Auth { status: 403, .. }));
        assert!(matches!(
            e(400),
            ProviderError::BadRequest { status: 400, .. }
        ));
        assert!(matches!(
            e(404),
            ProviderError::BadRequest { status: 404, .. }
        ));
        assert!(matches!(e(500), ProviderError::Server { status: 500, .. }));
        assert!(matches!(e(529), ProviderError::Server { status: 529, .. }));
        assert!(e(408).is_retryable() && e(503).is_retryable() && e(429).is_retryable());
        assert!(!e(400).is_retryable() && !e(401).is_retryable());
    }

    #[test]
    fn input_bounds_count_bytes_so_cjk_and_emoji_are_covered() {
        let ascii = ChatRequest::new(vec![(Role::User, "hello".into())]);
        assert_eq!(
            ascii.input_token_bound(),
            5 + TURN_OVERHEAD + REQUEST_OVERHEAD
        );
        // 20 CJK characters: 60 bytes; a tokenizer makes at most 60 tokens of them
        // (typically 20-40), where characters / 4 guessed 5.
        let cjk = ChatRequest::new(vec![(
            Role::User,
            "東京の天気はどうですか今日は晴れですね。".to_string(),
        )]);
        assert_eq!(cjk.input_chars(), 20);
        assert_eq!(
            cjk.input_token_bound(),
            60 + TURN_OVERHEAD + REQUEST_OVERHEAD
        );
        // A family emoji: 1 grapheme, 7 characters, 25 bytes.
        let mut emoji = ChatRequest::new(vec![(Role::User, "👨‍👩‍👧‍👦".into())]);
        emoji.system = Some("be brief".into());
        assert_eq!(
            emoji.input_token_bound(),
            25 + 8 + 2 * TURN_OVERHEAD + REQUEST_OVERHEAD
        );
        assert_eq!(token_bound("日本"), 6);
    }

    #[test]
    fn estimates_round_up() {
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(1), 1);
        assert_eq!(estimate_tokens(8), 2);
        assert_eq!(estimate_tokens(9), 3);
    }
}
