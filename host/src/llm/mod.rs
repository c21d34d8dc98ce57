//! The host side of the `llm` capability: language-model calls made on a persona's
//! behalf, with the keys, budgets and limits kept in the host.
//!
//! - [`config`]: the `[llm]` section (named providers) and the per-persona grant
//!   `[personas.NAME.llm]` ([`PersonaLlmConfig`], deny by default).
//! - [`secret`]: API keys, read once from an environment variable or a file named in
//!   config and held as [`SecretString`](secrecy::SecretString).
//! - [`provider`]: the [`Provider`] trait and its normalised [`ChatRequest`] /
//!   [`ChatResponse`] / [`ProviderError`].
//! - [`openai`] (OpenAI-compatible `/v1/chat/completions`: OpenAI, Ollama, vLLM,
//!   llama.cpp) and [`anthropic`] (`/v1/messages`): the two HTTP providers, with
//!   [`retry`] (backoff, `retry-after`, overall timeout).
//! - [`hub`]: [`LlmHub`], built once from config, hands each persona an
//!   `Arc<dyn LlmBackend>` that applies its grant: allowed models, concurrency cap,
//!   timeout, hourly and daily token [`budget`]s, typed errors, keys redacted.
//! - [`fake`]: a local fake server speaking both shapes, for tests and `roost dev`.
//!
//! Wiring it up at start-up:
//!
//! ```
//! use roost::llm::{LlmConfig, LlmHub, PersonaLlmConfig, ProviderKind};
//! use roost::llm::fake::FakeLlm;
//! use roost::plugin::context::Grants;
//! use roost::plugin::bindings::llm::{Request, Role, Turn};
//! use secrecy::ExposeSecret;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! // `roost dev` points the config at the fake; production reads roost.toml's [llm].
//! let fake = FakeLlm::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
//! let mut cfg = LlmConfig::default();
//! cfg.providers.insert("local".into(), fake.provider_config(ProviderKind::OpenAi, "llama3"));
//! let hub = LlmHub::from_config(&cfg).unwrap();
//!
//! // The outbound secret scanner learns every key the hub holds.
//! for key in hub.known_secrets() {
//!     let _ = key.expose_secret(); // scanner.add_known_secret(key.expose_secret())
//! }
//!
//! // One backend per persona, from its [personas.NAME.llm] grant.
//! let grant: PersonaLlmConfig = toml::from_str("allow = true\ntokens_per_hour = 5000").unwrap();
//! let grants = Grants { llm: hub.backend("sage", &grant).unwrap(), ..Grants::default() };
//! let backend = grants.llm.unwrap();
//! let turns = vec![Turn { role: Role::User, content: "hello, sage".into() }];
//! let answer = backend
//!     .complete(Request { turns, max_tokens: None, temperature: None, model: None })
//!     .await
//!     .unwrap();
//! assert_eq!(answer.model, "llama3");
//! assert!(answer.text.contains("hello, sage"));
//! # });
//! ```

pub mod anthropic;
pub mod budget;
pub mod config;
pub mod fake;
mod http;
pub mod hub;
pub mod openai;
pub mod provider;
pub mod retry;
pub mod secret;

pub use anthropic::AnthropicProvider;
pub use budget::BudgetUsage;
pub use config::{LlmConfig, LlmSetupError, PersonaLlmConfig, ProviderConfig, ProviderKind};
pub use http::HttpSettings;
pub use hub::LlmHub;
pub use openai::{MaxTokensParam, OpenAiProvider};
pub use provider::{
    ChatRequest, ChatResponse, Provider, ProviderError, Role, Usage, estimate_tokens, token_bound,
};
pub use retry::RetryPolicy;
pub use secret::{KeySource, SecretSet};
