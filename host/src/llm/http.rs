//! HTTP plumbing shared by the providers: the client, endpoint URLs, bounded body
//! reads and the status → [`ProviderError`] mapping.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderValue;
use reqwest::{Client, RequestBuilder, redirect};
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::provider::{ANSWER_BODY_LIMIT, ChatResponse, ERROR_BODY_LIMIT, ProviderError, Usage};
use super::retry::{RetryPolicy, parse_retry_after};
use super::secret::SecretSet;

/// What every HTTP provider is built from.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// The server's base URL, without `/v1` (a trailing `/v1` is tolerated).
    pub base_url: Url,
    /// The API key, if the server needs one.
    pub api_key: Option<SecretString>,
    /// The model used when a request names none.
    pub default_model: String,
    pub retry: RetryPolicy,
}

impl HttpSettings {
    /// Settings for a server at `base_url` with no key and the default retry policy.
    pub fn new(base_url: Url, default_model: impl Into<String>) -> Self {
        HttpSettings {
            base_url,
            api_key: None,
            default_model: default_model.into(),
            retry: RetryPolicy::default(),
        }
    }
}

/// A client that never follows redirects (a redirect could carry a key header to
/// another host) and bounds connection set-up.
pub(crate) fn client() -> Result<Client, reqwest::Error> {
    Client::builder()
        .redirect(redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("roost/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// `{base}/v1/{path}`; a base that already ends in `/v1` is not doubled.
pub(crate) fn endpoint(base: &Url, path: &str) -> Url {
    let mut s = base.as_str().trim_end_matches('/').to_string();
    if !s.ends_with("/v1") {
        s.push_str("/v1");
    }
    s.push('/');
    s.push_str(path);
    Url::parse(&s).unwrap_or_else(|_| base.clone())
}

/// A header value holding a key: marked sensitive so `Debug` of the request hides it.
pub(crate) fn secret_header(value: String) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&value).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// Adds `name: prefix+key` when there is a key.
pub(crate) fn with_key(
    req: RequestBuilder,
    name: &str,
    prefix: &str,
    key: Option<&SecretString>,
) -> RequestBuilder {
    match key.and_then(|k| secret_header(format!("{prefix}{}", k.expose_secret()))) {
        Some(v) => req.header(name, v),
        None => req,
    }
}

/// Sends one attempt; a 2xx answer's body (bounded) or the typed error.
pub(crate) async fn send(
    req: RequestBuilder,
    secrets: &SecretSet,
) -> Result<Vec<u8>, ProviderError> {
    let resp = req
        .send()
        .await
        .map_err(|e| ProviderError::from_reqwest(e, secrets))?;
    let status = resp.status();
    if status.is_success() {
        return read_limited(resp, ANSWER_BODY_LIMIT, true, secrets).await;
    }
    let retry_after = parse_retry_after(resp.headers(), SystemTime::now());
    let body = read_limited(resp, ERROR_BODY_LIMIT, false, secrets)
        .await
        .unwrap_or_default();
    Err(ProviderError::from_status(
        status,
        &body,
        retry_after,
        secrets,
    ))
}

/// Reads at most `limit` bytes; past it, an error (`strict`) or the prefix.
async fn read_limited(
    mut resp: reqwest::Response,
    limit: usize,
    strict: bool,
    secrets: &SecretSet,
) -> Result<Vec<u8>, ProviderError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ProviderError::from_reqwest(e, secrets))?
    {
        if body.len() + chunk.len() > limit {
            if strict {
                return Err(ProviderError::Decode(format!(
                    "answer larger than {limit} bytes"
                )));
            }
            body.extend_from_slice(&chunk[..limit - body.len()]);
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A JSON body as `T`, or [`ProviderError::Decode`] with a short reason.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ProviderError> {
    serde_json::from_slice(body)
        .map_err(|e| ProviderError::Decode(format!("not the documented JSON shape: {e}")))
}

/// The normalised answer from its parts: `tokens` (input, output) become [`Usage`]
/// only when the provider reported both, and an answer that names no model (or an
/// empty one) is credited to `requested_model`.
pub(crate) fn chat_response(
    text: String,
    model: Option<String>,
    requested_model: &str,
    tokens: Option<(Option<u32>, Option<u32>)>,
) -> ChatResponse {
    ChatResponse {
        text,
        model: model
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| requested_model.to_string()),
        usage: tokens.and_then(|counts| match counts {
            (Some(input), Some(output)) => Some(Usage { input, output }),
            _ => None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_join_once() {
        let u = |s: &str| Url::parse(s).unwrap();
        assert_eq!(
            endpoint(&u("http://127.0.0.1:11434"), "chat/completions").as_str(),
            "http://127.0.0.1:11434/v1/chat/completions"
        );
        assert_eq!(
            endpoint(&u("https://api.openai.com/v1/"), "chat/completions").as_str(),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(
            endpoint(&u("https://gw.example/proxy/"), "messages").as_str(),
            "https://gw.example/proxy/v1/messages"
        );
    }

    #[test]
    fn key_headers_are_sensitive() {
        let v = secret_header("Bearer sk-hidden-123456".into()).unwrap();
        assert!(v.is_sensitive());
        assert!(!format!("{v:?}").contains("hidden"));
    }
}
