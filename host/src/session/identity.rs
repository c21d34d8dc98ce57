//! A bot's identity on a network: registration, and keeping `{name, key}` in the store.
//!
//! - A persona registers once per server; the name and key the server returns are stored
//!   (keyed by server base URL and persona identity) and reused on every later start.
//! - A taken name (409) is retried with a short random suffix (`name-1a2b`, within the
//!   network's 2-30 character limit), a bounded number of times.
//! - 5xx, timeouts, connection errors and unreadable answers are transient: the caller
//!   retries with backoff (429 and exhausted name attempts with the longer rate-limit
//!   backoff). Only a short excerpt of a body (≤ 200 chars) ever reaches a log.
//! - 400/422 (the server refuses the name or description) is a configuration error.
//! - The key is an [`ApiKey`]: `[redacted]` in `Debug`, never in an error message.

use std::time::Duration;

use rand::Rng;

use super::http::{Endpoints, MAX_READ_BYTES, error_chain, excerpt, read_limited};
use crate::protocol::{ApiKey, RegisterRequest, RegisterResponse};
use crate::store::{Store, StoreError};

use crate::names::BOT_NAME_MAX as NAME_MAX_CHARS;
/// `-` and four hex digits.
const SUFFIX_CHARS: usize = 5;

/// Who a bot is on one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The name the server gave us.
    pub name: String,
    /// The API key (`Debug` prints `[redacted]`).
    pub key: ApiKey,
}

/// Why registration did not produce an identity. No variant contains the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    #[error(
        "cannot register as {base:?}: the name and its suffixed variants were taken \
         ({tries} tries, HTTP 409)"
    )]
    NameTaken { base: String, tries: u32 },
    #[error("the server refused the registration (HTTP {status}): {excerpt}")]
    Rejected { status: u16, excerpt: String },
    #[error("registration throttled by the server (HTTP {status})")]
    RateLimited { status: u16 },
    #[error("registration failed (HTTP {status}): {excerpt}")]
    Server { status: u16, excerpt: String },
    #[error("registration request failed: {0}")]
    Network(String),
    #[error("registration answer unreadable ({reason}): {excerpt}")]
    BadAnswer { reason: String, excerpt: String },
    #[error("cannot keep the credentials: {0}")]
    Store(#[from] StoreError),
}

impl RegisterError {
    /// A configuration problem retrying will not fix.
    pub fn is_fatal(&self) -> bool {
        matches!(self, RegisterError::Rejected { .. })
    }

    /// The server asked us to slow down.
    pub fn is_rate_limited(&self) -> bool {
        matches!(
            self,
            RegisterError::RateLimited { .. } | RegisterError::NameTaken { .. }
        )
    }
}

/// `base` with a random `-xxxx` suffix, truncated so the result has at most 30 characters.
pub fn with_suffix<R: Rng + ?Sized>(base: &str, rng: &mut R) -> String {
    let keep = NAME_MAX_CHARS - SUFFIX_CHARS;
    let stem: String = base.chars().take(keep).collect();
    let stem = stem.trim_end_matches(['-', ' ']);
    let stem = if stem.chars().count() < 1 {
        "bot"
    } else {
        stem
    };
    format!("{stem}-{:04x}", rng.random::<u16>())
}

/// The stored identity of `persona` on the server, if any.
pub fn load(
    store: &Store,
    endpoints: &Endpoints,
    persona: &str,
) -> Result<Option<Identity>, StoreError> {
    Ok(store
        .credentials(endpoints.base(), persona)?
        .map(|c| Identity {
            name: c.name,
            key: c.key,
        }))
}

/// What one authenticated request says about a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyCheck {
    /// The server answered 2xx: the key works.
    Accepted,
    /// The server answered 401: the key is rejected.
    Rejected,
    /// Anything else (5xx, 403, a timeout): nothing is known.
    Unknown(String),
}

/// Asks the server whether `key` is still valid: `GET /api/rooms` with the key. Only a
/// 401 counts as a rejection.
pub async fn check_key(
    http: &reqwest::Client,
    endpoints: &Endpoints,
    key: &ApiKey,
    timeout: Duration,
) -> KeyCheck {
    let resp = http
        .get(endpoints.rooms())
        .header("x-api-key", key.expose())
        .timeout(timeout)
        .send()
        .await;
    match resp {
        Ok(r) if r.status().is_success() => KeyCheck::Accepted,
        Ok(r) if r.status().as_u16() == 401 => KeyCheck::Rejected,
        Ok(r) => KeyCheck::Unknown(format!("HTTP {}", r.status().as_u16())),
        Err(e) => KeyCheck::Unknown(error_chain(&e)),
    }
}

/// Parameters of one registration.
#[derive(Clone, Debug)]
pub struct Registration {
    /// The configured name; suffixes are added to it.
    pub base_name: String,
    /// The first name to ask for (the configured name, or the name we had before).
    pub first_try: String,
    pub description: String,
    /// How many names to try in total before [`RegisterError::NameTaken`].
    pub max_tries: u32,
    pub timeout: Duration,
}

/// Registers (trying suffixed names on 409) and stores the new credentials.
pub async fn register<R: Rng + Send>(
    http: &reqwest::Client,
    endpoints: &Endpoints,
    store: &Store,
    persona: &str,
    reg: &Registration,
    rng: &mut R,
) -> Result<Identity, RegisterError> {
    let tries = reg.max_tries.max(1);
    let mut candidate = reg.first_try.clone();
    for attempt in 1..=tries {
        match register_once(http, endpoints, &candidate, &reg.description, reg.timeout).await? {
            Some(identity) => {
                // The new key replaces the old one in one statement (the old one is never
                // deleted first). A key that cannot be stored is still used from memory:
                // registering again would only make another identity.
                if let Err(e) =
                    store.save_credentials(endpoints.base(), persona, &identity.name, &identity.key)
                {
                    tracing::error!(
                        persona,
                        name = %identity.name,
                        error = %e,
                        "registered, but the new key cannot be stored: using it from memory \
                         (a restart will register again)"
                    );
                }
                tracing::info!(
                    persona,
                    name = %identity.name,
                    server = endpoints.base(),
                    "registered"
                );
                return Ok(identity);
            }
            None => {
                let next = with_suffix(&reg.base_name, rng);
                tracing::info!(
                    persona,
                    taken = %candidate,
                    next = %next,
                    attempt,
                    "name taken (409); trying another"
                );
                candidate = next;
            }
        }
    }
    Err(RegisterError::NameTaken {
        base: reg.base_name.clone(),
        tries,
    })
}

/// One `POST /api/register`. `Ok(None)`: the name is taken (409).
async fn register_once(
    http: &reqwest::Client,
    endpoints: &Endpoints,
    name: &str,
    description: &str,
    timeout: Duration,
) -> Result<Option<Identity>, RegisterError> {
    let body = RegisterRequest {
        name: name.to_string(),
        description: description.to_string(),
    }
    .encode();
    let resp = http
        .post(endpoints.register())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .timeout(timeout)
        .body(body)
        .send()
        .await
        .map_err(|e| RegisterError::Network(error_chain(&e)))?;
    let status = resp.status().as_u16();
    let (bytes, _truncated) = read_limited(resp, MAX_READ_BYTES)
        .await
        .map_err(|e| RegisterError::Network(error_chain(&e)))?;
    match status {
        200..=299 => {
            let text = String::from_utf8_lossy(&bytes);
            match RegisterResponse::decode(&text) {
                Ok(r) => Ok(Some(Identity {
                    name: r
                        .name
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| name.to_string()),
                    key: r.key,
                })),
                Err(e) => Err(RegisterError::BadAnswer {
                    reason: e.to_string(),
                    excerpt: safe_success_excerpt(&bytes),
                }),
            }
        }
        409 => Ok(None),
        400 | 422 => Err(RegisterError::Rejected {
            status,
            excerpt: excerpt(&bytes),
        }),
        429 => Err(RegisterError::RateLimited { status }),
        _ => Err(RegisterError::Server {
            status,
            excerpt: excerpt(&bytes),
        }),
    }
}

/// A 2xx body we could not read may still hold a key: if it is JSON, show only its field
/// names; otherwise (an HTML page from a proxy) a short excerpt.
fn safe_success_excerpt(body: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(map)) => {
            let fields: Vec<&str> = map.keys().map(String::as_str).take(20).collect();
            excerpt(format!("JSON object with fields {fields:?}").as_bytes())
        }
        Ok(other) => format!("JSON {}", json_kind(&other)),
        Err(_) => excerpt(body),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::BotName;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn suffixes_stay_within_limits() {
        let mut rng = StdRng::seed_from_u64(5);
        for base in [
            "ab",
            "the shining ribbons",
            &"y".repeat(30),
            &"é".repeat(30),
            "ab-",
        ] {
            for _ in 0..20 {
                let n = with_suffix(base, &mut rng);
                assert!(BotName::check(&n).is_ok(), "{n:?}");
                let (stem, suffix) = n.rsplit_once('-').unwrap();
                assert_eq!(suffix.len(), 4);
                assert!(suffix.chars().all(|c| c.is_ascii_hexdigit()));
                assert!(base.starts_with(stem), "{stem:?} / {base:?}");
            }
        }
    }

    #[test]
    fn success_excerpt_never_shows_json_values() {
        let ex = safe_success_excerpt(br#"{"secret_key_field":"sk-123456"}"#);
        assert!(!ex.contains("sk-123456"));
        assert!(ex.contains("secret_key_field"));
        assert_eq!(
            safe_success_excerpt(b"<html>oops</html>"),
            "<html>oops</html>"
        );
    }
}
