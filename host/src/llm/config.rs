//! The `[llm]` section of roost.toml and the per-persona `[personas.NAME.llm]` grant.
//!
//! ```toml
//! [llm]
//! default_provider = "local"          # optional; default: the only provider, if just one
//!
//! [llm.providers.local]
//! kind = "openai"                     # "openai" (any OpenAI-compatible server) or "anthropic"
//! base_url = "http://127.0.0.1:11434" # default: https://api.openai.com / https://api.anthropic.com
//! api_key_env = "OPENAI_API_KEY"      # optional; or api_key_file = "/run/secrets/key"
//! default_model = "llama3"            # required
//! timeout_ms = 30000                  # overall bound on one call, retries included
//! max_retries = 3                     # retries of 429 / 5xx / network errors
//! # max_tokens_param = "max_completion_tokens"   # openai only; for OpenAI's newer models
//!
//! [personas.sage.llm]
//! allow = true                        # deny by default
//! provider = "local"                  # default: [llm] default_provider
//! model = "llama3"                    # default: the provider's default_model
//! models = ["llama3:70b"]             # other models the persona may ask for
//! timeout_ms = 20000                  # default: the provider's timeout_ms
//! max_concurrency = 2
//! tokens_per_hour = 20000
//! tokens_per_day = 200000
//! max_tokens = 1024                   # cap on generated tokens per call
//! ```
//!
//! Both structs reject unknown keys. [`LlmConfig::validate`] and
//! [`PersonaLlmConfig::validate`] check what serde cannot, without reading keys;
//! [`LlmHub::from_config`](super::LlmHub::from_config) validates too and reads the keys.
//!
//! ```
//! use roost::llm::{LlmConfig, PersonaLlmConfig, ProviderKind};
//!
//! let cfg: LlmConfig = toml::from_str(r#"
//!     [providers.local]
//!     kind = "openai"
//!     base_url = "http://127.0.0.1:11434"
//!     default_model = "llama3"
//! "#).unwrap();
//! cfg.validate().unwrap();
//! assert_eq!(cfg.providers["local"].kind, ProviderKind::OpenAi);
//! assert_eq!(cfg.providers["local"].timeout_ms, 30_000);
//!
//! let persona: PersonaLlmConfig = toml::from_str("allow = true").unwrap();
//! assert_eq!(persona.max_concurrency, 2);
//! persona.validate("sage", &cfg).unwrap();
//! assert!(toml::from_str::<PersonaLlmConfig>("alow = true").is_err());
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use super::openai::MaxTokensParam;
use super::retry::RetryPolicy;
use super::secret::{KeyError, KeySource};

/// `[llm]`: the providers the host can reach.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// The provider for personas that name none. Default: the only provider, when there
    /// is exactly one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_provider: Option<String>,
    /// Providers by name (`[llm.providers.NAME]`).
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
}

/// The HTTP API a provider speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProviderKind {
    /// OpenAI-compatible `/v1/chat/completions` (OpenAI, Ollama, vLLM, llama.cpp...).
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic `/v1/messages`.
    #[serde(rename = "anthropic")]
    Anthropic,
}

impl ProviderKind {
    /// The public API's base URL, used when `base_url` is not set.
    pub fn default_base_url(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "https://api.openai.com",
            ProviderKind::Anthropic => "https://api.anthropic.com",
        }
    }
}

/// `[llm.providers.NAME]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// Without `/v1`. Default: the public API of `kind`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Name of the environment variable holding the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Path of a file holding the key. At most one of `api_key_env`, `api_key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// The model used when a persona sets none.
    pub default_model: String,
    /// Overall bound on one call in milliseconds, every retry included. Default 30000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Retries of 429, 5xx and network errors. Default 3, at most 10.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// `kind = "openai"` only: the field carrying the output token limit.
    #[serde(default)]
    pub max_tokens_param: MaxTokensParam,
}

fn default_timeout_ms() -> u64 {
    30_000
}
fn default_max_retries() -> u32 {
    3
}

impl ProviderConfig {
    /// A provider of `kind` at `base_url` without a key, other fields at their defaults.
    pub fn new(
        kind: ProviderKind,
        base_url: impl Into<String>,
        default_model: impl Into<String>,
    ) -> Self {
        ProviderConfig {
            kind,
            base_url: Some(base_url.into()),
            api_key_env: None,
            api_key_file: None,
            default_model: default_model.into(),
            timeout_ms: default_timeout_ms(),
            max_retries: default_max_retries(),
            max_tokens_param: MaxTokensParam::default(),
        }
    }

    /// The parsed base URL (default per kind).
    pub fn base_url(&self) -> Result<Url, String> {
        let raw = self
            .base_url
            .as_deref()
            .unwrap_or(self.kind.default_base_url());
        let url = Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("{raw:?} is not an http(s) URL"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(
                "credentials in the URL are not allowed; use api_key_env or api_key_file".into(),
            );
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "{raw:?} has a query or fragment; give the base URL only"
            ));
        }
        Ok(url)
    }

    /// Where the key comes from, if anywhere.
    pub fn key_source(&self) -> Result<Option<KeySource>, KeyError> {
        KeySource::from_fields(self.api_key_env.as_deref(), self.api_key_file.as_deref())
    }

    /// The retry policy these settings describe.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_retries: self.max_retries,
            timeout: Duration::from_millis(self.timeout_ms),
            ..RetryPolicy::default()
        }
    }

    /// Checks everything but the key's presence.
    pub fn validate(&self, name: &str) -> Result<(), LlmSetupError> {
        let bad = |field: &'static str, reason: String| LlmSetupError::Provider {
            provider: name.to_string(),
            field,
            reason,
        };
        self.base_url().map_err(|r| bad("base_url", r))?;
        self.key_source()
            .map_err(|e| bad("api_key_env", e.to_string()))?;
        if self
            .api_key_env
            .as_deref()
            .is_some_and(|v| v.trim().is_empty())
        {
            return Err(bad(
                "api_key_env",
                "must name an environment variable".into(),
            ));
        }
        if self.default_model.trim().is_empty() {
            return Err(bad("default_model", "must not be empty".into()));
        }
        if self.timeout_ms == 0 {
            return Err(bad("timeout_ms", "must be at least 1".into()));
        }
        if self.max_retries > 10 {
            return Err(bad(
                "max_retries",
                format!("{} is more than 10", self.max_retries),
            ));
        }
        if self.kind == ProviderKind::Anthropic
            && self.max_tokens_param != MaxTokensParam::MaxTokens
        {
            return Err(bad(
                "max_tokens_param",
                "only applies to kind = \"openai\"".into(),
            ));
        }
        Ok(())
    }
}

impl LlmConfig {
    /// Checks every provider and the default provider's name.
    pub fn validate(&self) -> Result<(), LlmSetupError> {
        for (name, p) in &self.providers {
            p.validate(name)?;
        }
        if let Some(d) = &self.default_provider
            && !self.providers.contains_key(d)
        {
            return Err(LlmSetupError::UnknownDefault(d.clone()));
        }
        Ok(())
    }

    /// The provider name a persona with `persona_provider` uses.
    pub fn resolve_provider<'a>(&'a self, persona_provider: Option<&'a str>) -> Option<&'a str> {
        match (persona_provider, &self.default_provider) {
            (Some(p), _) => Some(p),
            (None, Some(d)) => Some(d),
            (None, None) if self.providers.len() == 1 => {
                self.providers.keys().next().map(String::as_str)
            }
            _ => None,
        }
    }
}

/// `[personas.NAME.llm]`: whether and how a persona may call the LLM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonaLlmConfig {
    /// The grant. Default false: calls answer `denied`.
    #[serde(default)]
    pub allow: bool,
    /// Which `[llm.providers.NAME]`. Default: `llm.default_provider`, or the only one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The persona's model. Default: the provider's `default_model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Further models the persona may ask for with the request's model hint. A hint not
    /// in this list (nor the default) is ignored: the default model answers. Default: none.
    #[serde(default)]
    pub models: Vec<String>,
    /// Bound on one call in milliseconds, waiting for a concurrency slot included.
    /// Default: the provider's `timeout_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Calls in flight at once; more wait for a slot. Default 2.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: u32,
    /// Tokens (input + output) per sliding hour. Default 20000.
    #[serde(default = "default_tokens_per_hour")]
    pub tokens_per_hour: u64,
    /// Tokens (input + output) per sliding 24 hours. Default 200000.
    #[serde(default = "default_tokens_per_day")]
    pub tokens_per_day: u64,
    /// Cap on generated tokens per call; a request asking more gets this. Default 1024.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
}

fn default_max_concurrency() -> u32 {
    2
}
fn default_tokens_per_hour() -> u64 {
    20_000
}
fn default_tokens_per_day() -> u64 {
    200_000
}
fn default_max_tokens() -> u32 {
    1024
}

impl Default for PersonaLlmConfig {
    fn default() -> Self {
        PersonaLlmConfig {
            allow: false,
            provider: None,
            model: None,
            models: Vec::new(),
            timeout_ms: None,
            max_concurrency: default_max_concurrency(),
            tokens_per_hour: default_tokens_per_hour(),
            tokens_per_day: default_tokens_per_day(),
            max_tokens: default_max_tokens(),
        }
    }
}

impl PersonaLlmConfig {
    /// A grant with the defaults (`allow = true`).
    pub fn allowed() -> Self {
        PersonaLlmConfig {
            allow: true,
            ..Self::default()
        }
    }

    /// Checks the grant against `[llm]` (nothing to check when not allowed).
    pub fn validate(&self, persona: &str, llm: &LlmConfig) -> Result<(), LlmSetupError> {
        if !self.allow {
            return Ok(());
        }
        let bad = |field: &'static str, reason: String| LlmSetupError::Persona {
            persona: persona.to_string(),
            field,
            reason,
        };
        match llm.resolve_provider(self.provider.as_deref()) {
            None if llm.providers.is_empty() => {
                return Err(bad(
                    "allow",
                    "no provider is configured: add [llm.providers.NAME]".into(),
                ));
            }
            None => {
                return Err(bad(
                    "provider",
                    "several providers are configured and no llm.default_provider: name one".into(),
                ));
            }
            Some(p) if !llm.providers.contains_key(p) => {
                return Err(bad(
                    "provider",
                    format!("no provider named {p:?} in [llm.providers]"),
                ));
            }
            Some(_) => {}
        }
        if self.max_concurrency == 0 {
            return Err(bad("max_concurrency", "must be at least 1".into()));
        }
        if self.timeout_ms == Some(0) {
            return Err(bad("timeout_ms", "must be at least 1".into()));
        }
        if self.max_tokens == 0 {
            return Err(bad("max_tokens", "must be at least 1".into()));
        }
        if self.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
            return Err(bad("model", "must not be empty".into()));
        }
        Ok(())
    }
}

/// A configuration the LLM module cannot work with. Names the config key; never holds
/// a key's value.
#[derive(Debug, thiserror::Error)]
pub enum LlmSetupError {
    #[error("llm.providers.{provider}.{field}: {reason}")]
    Provider {
        provider: String,
        field: &'static str,
        reason: String,
    },
    #[error("llm.providers.{provider}: cannot load the API key")]
    Key {
        provider: String,
        #[source]
        source: KeyError,
    },
    #[error("llm.providers.{provider}: cannot build the HTTP client")]
    Client {
        provider: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("llm.default_provider: no provider named {0:?} in [llm.providers]")]
    UnknownDefault(String),
    #[error("personas.{persona}.llm.{field}: {reason}")]
    Persona {
        persona: String,
        field: &'static str,
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        [llm]
        default_provider = "local"

        [llm.providers.local]
        kind = "openai"
        base_url = "http://127.0.0.1:11434"
        api_key_env = "OPENAI_API_KEY"
        default_model = "llama3"
        timeout_ms = 30000
        max_retries = 3

        [llm.providers.claude]
        kind = "anthropic"
        api_key_file = "/run/secrets/anthropic"
        default_model = "claude-sonnet-4-5"

        [personas.sage.llm]
        allow = true
        provider = "claude"
        models = ["claude-opus-4-1"]
        timeout_ms = 20000
        max_concurrency = 1
        tokens_per_hour = 5000
        tokens_per_day = 50000
        max_tokens = 300
    "#;

    #[derive(Deserialize)]
    struct Doc {
        llm: LlmConfig,
        personas: BTreeMap<String, PersonaDoc>,
    }
    #[derive(Deserialize)]
    struct PersonaDoc {
        llm: PersonaLlmConfig,
    }

    #[test]
    fn the_documented_example_parses_and_validates() {
        let doc: Doc = toml::from_str(EXAMPLE).unwrap();
        doc.llm.validate().unwrap();
        let claude = &doc.llm.providers["claude"];
        assert_eq!(claude.kind, ProviderKind::Anthropic);
        assert_eq!(
            claude.base_url().unwrap().as_str(),
            "https://api.anthropic.com/"
        );
        assert_eq!(
            claude.key_source().unwrap(),
            Some(KeySource::File("/run/secrets/anthropic".into()))
        );
        assert_eq!((claude.timeout_ms, claude.max_retries), (30_000, 3));
        let sage = &doc.personas["sage"].llm;
        sage.validate("sage", &doc.llm).unwrap();
        assert_eq!(
            (sage.max_concurrency, sage.max_tokens, sage.tokens_per_hour),
            (1, 300, 5000)
        );
        assert_eq!(doc.llm.resolve_provider(None), Some("local"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(
            toml::from_str::<LlmConfig>(
                "[providers.x]\nkind = \"openai\"\ndefault_model = \"m\"\napi_key = \"sk-x\""
            )
            .is_err()
        );
        assert!(
            toml::from_str::<LlmConfig>("[providers.x]\nkind = \"gemini\"\ndefault_model = \"m\"")
                .is_err()
        );
        let mut p = ProviderConfig::new(ProviderKind::OpenAi, "http://u:p@127.0.0.1", "m");
        assert!(
            p.validate("x")
                .unwrap_err()
                .to_string()
                .starts_with("llm.providers.x.base_url:")
        );
        p.base_url = Some("ftp://127.0.0.1".into());
        assert!(p.validate("x").is_err());
        p.base_url = None;
        p.api_key_env = Some("A".into());
        p.api_key_file = Some("/k".into());
        assert!(p.validate("x").is_err());
        let cfg = LlmConfig {
            default_provider: Some("nope".into()),
            ..LlmConfig::default()
        };
        assert!(matches!(
            cfg.validate(),
            Err(LlmSetupError::UnknownDefault(_))
        ));
    }

    #[test]
    fn persona_grants_resolve_a_provider() {
        let none = LlmConfig::default();
        assert!(
            PersonaLlmConfig::default().validate("p", &none).is_ok(),
            "not allowed: nothing to check"
        );
        let err = PersonaLlmConfig::allowed()
            .validate("p", &none)
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("personas.p.llm.allow: no provider"),
            "{err}"
        );
        let mut two = LlmConfig::default();
        two.providers.insert(
            "a".into(),
            ProviderConfig::new(ProviderKind::OpenAi, "http://127.0.0.1:1", "m"),
        );
        assert!(
            PersonaLlmConfig::allowed().validate("p", &two).is_ok(),
            "the only provider is the default"
        );
        two.providers.insert(
            "b".into(),
            ProviderConfig::new(ProviderKind::Anthropic, "http://127.0.0.1:2", "m"),
        );
        assert!(PersonaLlmConfig::allowed().validate("p", &two).is_err());
        let named = PersonaLlmConfig {
            provider: Some("b".into()),
            ..PersonaLlmConfig::allowed()
        };
        assert!(named.validate("p", &two).is_ok());
        let zero = PersonaLlmConfig {
            max_concurrency: 0,
            ..named
        };
        assert!(zero.validate("p", &two).is_err());
    }
}
