//! Provider API keys: where they come from and how the host holds them.
//!
//! A key is named in roost.toml only by *where* it lives, never by value:
//! `api_key_env = "OPENAI_API_KEY"` (an environment variable) or
//! `api_key_file = "/run/secrets/openai"` (a file, e.g. a container secret). It is read
//! once at start-up, trimmed of surrounding whitespace and held as a
//! [`SecretString`], whose `Debug` prints `[REDACTED]`. Errors name the variable or the
//! file, never the content.
//!
//! [`SecretSet`] is the list of every key the host holds. The LLM module uses it to
//! redact keys from anything it hands to a persona (completions, error reasons, model
//! names); the outbound secret scanner gets the same list from
//! [`LlmHub::known_secrets`](super::LlmHub::known_secrets) so a key can never be posted
//! to chat.
//!
//! ```
//! use roost::llm::secret::{KeySource, SecretSet};
//! use secrecy::ExposeSecret;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("key");
//! std::fs::write(&path, "sk-local-0123456789abcdef\n").unwrap();
//! let key = KeySource::File(path).load().unwrap();
//! assert_eq!(key.expose_secret(), "sk-local-0123456789abcdef");
//! assert!(!format!("{key:?}").contains("0123456789"));
//!
//! let set = SecretSet::new(vec![key]);
//! assert_eq!(set.redact("it is sk-local-0123456789abcdef!"), "it is [redacted]!");
//! ```

use std::borrow::Cow;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Keys shorter than this are never redacted from text (they would match ordinary
/// words); the same threshold the outbound secret scanner applies.
pub const MIN_REDACTED_LEN: usize = 8;

/// What replaces a key wherever the host redacts it.
pub const REDACTED: &str = "[redacted]";

/// Where a provider's API key is read from. In roost.toml this is spelled as one of the
/// provider's `api_key_env` / `api_key_file` fields; serialised on its own it is
/// `{ env = "NAME" }` or `{ file = "/path" }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KeySource {
    /// An environment variable of the host process, by name.
    Env(String),
    /// A file holding the key (surrounding whitespace is trimmed).
    File(PathBuf),
}

/// Why a key could not be loaded. Names the source, never the content.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("environment variable {var} is not set")]
    EnvMissing { var: String },
    #[error("environment variable {var} is not valid UTF-8")]
    EnvNotUnicode { var: String },
    #[error("cannot read key file {}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin} is empty")]
    Empty { origin: String },
    #[error(
        "{origin} holds a value with whitespace or control characters inside; expected one key"
    )]
    Malformed { origin: String },
    #[error("both api_key_env and api_key_file are set; choose one")]
    BothSet,
}

impl KeySource {
    /// The key source named by a provider's `api_key_env` / `api_key_file` fields, or
    /// `None` when neither is set (a local server that needs no key).
    pub fn from_fields(
        env: Option<&str>,
        file: Option<&Path>,
    ) -> Result<Option<KeySource>, KeyError> {
        match (env, file) {
            (Some(_), Some(_)) => Err(KeyError::BothSet),
            (Some(var), None) => Ok(Some(KeySource::Env(var.to_string()))),
            (None, Some(path)) => Ok(Some(KeySource::File(path.to_path_buf()))),
            (None, None) => Ok(None),
        }
    }

    /// Reads the key now: from the process environment or the file.
    pub fn load(&self) -> Result<SecretString, KeyError> {
        self.load_with(|var| std::env::var_os(var))
    }

    /// Like [`load`](Self::load) with the environment looked up through `env`
    /// (tests, or a host that keeps its own environment map).
    pub fn load_with(
        &self,
        env: impl Fn(&str) -> Option<OsString>,
    ) -> Result<SecretString, KeyError> {
        let raw = match self {
            KeySource::Env(var) => env(var)
                .ok_or_else(|| KeyError::EnvMissing { var: var.clone() })?
                .into_string()
                .map_err(|_| KeyError::EnvNotUnicode { var: var.clone() })?,
            KeySource::File(path) => {
                warn_if_readable_by_others(path);
                std::fs::read_to_string(path).map_err(|source| KeyError::File {
                    path: path.clone(),
                    source,
                })?
            }
        };
        let key = raw.trim();
        if key.is_empty() {
            return Err(KeyError::Empty {
                origin: self.describe(),
            });
        }
        if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(KeyError::Malformed {
                origin: self.describe(),
            });
        }
        Ok(SecretString::from(key))
    }

    /// "environment variable NAME" or "key file PATH", for messages.
    pub fn describe(&self) -> String {
        match self {
            KeySource::Env(var) => format!("environment variable {var}"),
            KeySource::File(path) => format!("key file {}", path.display()),
        }
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o007 != 0
    {
        tracing::warn!(path = %path.display(), "API key file is accessible to every user; chmod o-rwx it");
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

/// Every key the host holds, shared cheaply. `Debug` prints only how many.
#[derive(Clone, Default)]
pub struct SecretSet {
    keys: Arc<[SecretString]>,
}

impl SecretSet {
    pub fn new(keys: Vec<SecretString>) -> Self {
        SecretSet { keys: keys.into() }
    }

    /// Copies of every key, for the outbound secret scanner.
    pub fn to_vec(&self) -> Vec<SecretString> {
        self.keys.to_vec()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `text` contains any key (of at least [`MIN_REDACTED_LEN`] characters).
    pub fn contains_any(&self, text: &str) -> bool {
        self.redactable().any(|k| text.contains(k))
    }

    /// `text` with every key replaced by [`REDACTED`]. Exact matches only: the outbound
    /// secret scanner catches disguised copies before anything reaches chat.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for key in self.redactable() {
            if out.contains(key) {
                out = Cow::Owned(out.replace(key, REDACTED));
            }
        }
        out
    }

    fn redactable(&self) -> impl Iterator<Item = &str> {
        self.keys
            .iter()
            .map(|k| k.expose_secret())
            .filter(|k| k.len() >= MIN_REDACTED_LEN)
    }
}

impl fmt::Debug for SecretSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretSet({} keys)", self.keys.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_source_is_trimmed_and_checked() {
        let env = |v: &str| (v == "K").then(|| OsString::from("  sk-abcdefgh12345678 \n"));
        let key = KeySource::Env("K".into()).load_with(env).unwrap();
        assert_eq!(key.expose_secret(), "sk-abcdefgh12345678");
        let err = KeySource::Env("MISSING".into()).load_with(env).unwrap_err();
        assert_eq!(err.to_string(), "environment variable MISSING is not set");
        let blank = |_: &str| Some(OsString::from("   "));
        assert!(matches!(
            KeySource::Env("K".into()).load_with(blank),
            Err(KeyError::Empty { .. })
        ));
        let two = |_: &str| Some(OsString::from("sk-one sk-two-secret"));
        let err = KeySource::Env("K".into()).load_with(two).unwrap_err();
        assert!(matches!(err, KeyError::Malformed { .. }));
        assert!(!err.to_string().contains("sk-two"));
    }

    #[test]
    fn file_source_errors_name_the_file() {
        let err = KeySource::File("/nonexistent/roost-key".into())
            .load()
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/roost-key"), "{err}");
    }

    #[test]
    fn fields_pick_one_source() {
        assert_eq!(KeySource::from_fields(None, None).unwrap(), None);
        assert_eq!(
            KeySource::from_fields(Some("A"), None).unwrap(),
            Some(KeySource::Env("A".into()))
        );
        assert!(matches!(
            KeySource::from_fields(Some("A"), Some(Path::new("/k"))),
            Err(KeyError::BothSet)
        ));
        let parsed: KeySource = toml::from_str::<toml::Value>("env = \"X\"")
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(parsed, KeySource::Env("X".into()));
    }

    #[test]
    fn redaction_skips_short_keys_and_hides_long_ones() {
        let set = SecretSet::new(vec!["short".into(), "sk-long-secret-value".into()]);
        assert_eq!(
            set.redact("short and sk-long-secret-value"),
            "short and [redacted]"
        );
        assert!(set.contains_any("xx sk-long-secret-value"));
        assert!(!set.contains_any("short"));
        assert_eq!(format!("{set:?}"), "SecretSet(2 keys)");
        assert!(matches!(set.redact("nothing here"), Cow::Borrowed(_)));
    }
}
