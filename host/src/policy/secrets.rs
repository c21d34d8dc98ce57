//! Secret scanner: finds credentials in what a persona wants to say, so the outbound
//! policy can block the message. It reports the kind of secret, never the secret.
//!
//! Every rule runs on the host's view of the text ([`super::normalize`]: NFKC, invisible
//! characters removed, look-alike letters folded), on a variant with spelled-out
//! characters rejoined (`s k - a n t …`), and on text hidden in Unicode tag characters,
//! so full-width letters or zero-width characters inside a key do not hide it.
//!
//! Rules, in the order they are tried:
//!
//! 1. **Known secrets** ([`SecretScanner::add_known_secret`]): every key the host holds
//!    (the bot's chat key, provider keys). Matched exactly, and also after removing
//!    everything but letters and digits and ignoring case (so separators, whitespace,
//!    zero-width characters or a change of case do not hide it), reversed, and hex- or
//!    base64-encoded. Secrets shorter than [`MIN_KNOWN_SECRET_LEN`] are ignored with a
//!    warning (they would match ordinary words).
//! 2. **Provider formats** (rule [`FindingRule::ProviderFormat`]): OpenAI (`sk-`,
//!    `sk-proj-`, `sk-svcacct-`, `sk-admin-`, and any `sk-` + 32 random characters),
//!    Anthropic (`sk-ant-`), AWS access key ids (`AKIA`, `ASIA`, … + 16) and secret keys in
//!    an `aws…secret…=` assignment, GitHub (`ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_`,
//!    `github_pat_`), GitLab (`glpat-`, `gldt-`, `glrt-`, …), Slack (`xox[abposre]-`,
//!    `xapp-`, webhook URLs), Stripe (`sk_live_`, `sk_test_`, `rk_live_`, `rk_test_`,
//!    `whsec_`; **publishable `pk_live_`/`pk_test_` keys pass: they are meant to be public**;
//!    test-mode secret keys are blocked because they still open the account's API),
//!    Google (`AIza` + 35, `ya29.`, `GOCSPX-`, `1//0` refresh tokens), Hugging Face (`hf_`),
//!    npm (`npm_`), PyPI (`pypi-AgE…`), Twilio (`SK` + 32 hex), SendGrid (`SG.x.y`), Discord
//!    bot tokens and webhook URLs, Telegram bot tokens, Azure (storage `AccountKey=`,
//!    `SharedAccessKey=`, Entra client secrets `…Q~…`, SAS `sig=`), Shopify, DigitalOcean,
//!    Mailgun, Mailchimp, Linear, Groq, Replicate, xAI, Perplexity, Postman, Atlassian, age,
//!    Databricks, Pinecone, Doppler, Notion, Airtable, Sentry, Supabase, Square, Mapbox;
//!    JWTs (three base64url parts whose header decodes to JSON with `"alg"`), PEM private
//!    keys (`-----BEGIN … PRIVATE KEY-----` followed by key material) and PuTTY keys, URLs
//!    with a password (`scheme://user:pass@host`, placeholders such as `user:password@`
//!    pass), `Authorization: Basic …`, nohumans.chat keys (`ac_` + 16 or more random
//!    characters).
//! 3. **Assignments** ([`FindingRule::Assignment`]): `api_key=…`, `OPENAI_API_KEY: …`,
//!    `password = …`, `Bearer …`, "my token is …" where the value looks like a credential
//!    (random enough, not a placeholder such as `YOUR_API_KEY`, `${TOKEN}`, `<token>`,
//!    `process.env.X`, `****`). In this context long hex values count too.
//! 4. **High entropy** ([`FindingRule::HighEntropy`], on by default): tokens of 24 or more
//!    characters from `[A-Za-z0-9_+/=-]` that mix character classes like random data
//!    (class changes, few vowels, Shannon entropy). Hashes (any all-hex run), UUIDs,
//!    base64 of text (it is decoded and scanned instead), URLs without credentials, file
//!    paths, identifiers and prose pass. Base58 wallet addresses look random and are
//!    blocked; operators of crypto-talking personas can turn this rule off.
//!
//! Cost: regexes are compiled once, and one pass over the text decides which of them can
//! match at all ([`super::prefilter`]: an Aho-Corasick automaton over every rule's
//! literals, `ghp_`, `sk-`, `AKIA`, …, and the longest run of key characters, since
//! nearly every format needs 16 or more in a row). Ordinary chat has no candidate and
//! costs about a microsecond; capture groups are only resolved for a rule that matched.
//! Known secrets are found the same way (one automaton over their squeezed forms), and
//! the entropy rule only looks at texts with a 16-character run. (A combined `RegexSet`
//! measured 30 times slower than the rules one by one.) People talking about keys ("AKIA
//! is how aws access keys start", "ghp is a prefix", "the eyJ prefix means…", "sk-learn")
//! pass because every rule needs the key material, not just the prefix.
//!
//! ```
//! use roost::policy::secrets::{SecretScanner, SecretsConfig, FindingRule};
//!
//! let scanner = SecretScanner::new(SecretsConfig::default());
//! scanner.add_known_secret("ac_9xYq2LmN4pQrS7tUvW");
//! let f = scanner.scan("my key is a c _ 9 x Y q 2 L m N 4 p Q r S 7 t U v W").unwrap();
//! assert_eq!(f.rule, FindingRule::KnownSecret);
//! assert_eq!(scanner.scan("ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A").unwrap().kind, "github-token");
//! assert!(scanner.scan("the sk-learn pipeline beat my hand-written one").is_none());
//! ```

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, LazyLock, RwLock};

use aho_corasick::AhoCorasick;
use regex::Regex;
use serde::Deserialize;

use super::normalize::{collapse_spaced, fold_confusables, hidden_tag_text, normalize};
use super::prefilter::{Candidates, Gate, Prefilter, longest_key_run};
use super::reshape::{
    Skeleton, base64_decodings, char_codes, dechunk, has_digit_or_inner_capital, hex_decodings,
    is_ascii_space, is_skeleton_byte, keyish_words, printable_runs, rot13, squeeze, squeeze_bytes,
};

/// Known secrets shorter than this are not registered (they would match ordinary text).
pub const MIN_KNOWN_SECRET_LEN: usize = 8;

/// What the scanner found. Holds no part of the secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The kind of secret, e.g. `"openai-api-key"`, `"jwt"`, `"known-secret"`.
    pub kind: &'static str,
    /// Which family of rules found it.
    pub rule: FindingRule,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.kind, self.rule)
    }
}

/// The family of rules behind a [`Finding`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FindingRule {
    /// One of the keys registered with [`SecretScanner::add_known_secret`].
    KnownSecret,
    /// A provider's key format.
    ProviderFormat,
    /// A credential-looking value assigned to a credential-looking name.
    Assignment,
    /// A long random-looking token.
    HighEntropy,
    /// A secret inside base64-encoded text.
    Encoded,
}

impl FindingRule {
    /// Short name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FindingRule::KnownSecret => "known-secret",
            FindingRule::ProviderFormat => "provider-format",
            FindingRule::Assignment => "assignment",
            FindingRule::HighEntropy => "high-entropy",
            FindingRule::Encoded => "encoded",
        }
    }
}

impl fmt::Display for FindingRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Scanner settings (`[policy.secrets]` in roost.toml).
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsConfig {
    /// Block long random-looking tokens of no known format. Default `true`.
    pub high_entropy: bool,
    /// Minimum token length for the high-entropy rule. Default 24.
    pub entropy_min_len: usize,
    /// A reply holding this many characters in a row of a key the host holds (letters
    /// and digits, in any view) is blocked. Default 12, at least 8.
    pub known_fragment_len: usize,
    /// The scan covers the bot's last this many sent messages in the room together
    /// with the new one, so a key split over messages is caught. Default 3; 0 scans
    /// each message alone.
    pub window_messages: usize,
    /// ... and at most this many characters of them (the newest). Default 4000.
    pub window_chars: usize,
}

impl Default for SecretsConfig {
    fn default() -> Self {
        SecretsConfig {
            high_entropy: true,
            entropy_min_len: 24,
            known_fragment_len: DEFAULT_FRAGMENT_LEN,
            window_messages: 3,
            window_chars: 4000,
        }
    }
}

// ---------------------------------------------------------------------------------------
// known secrets

/// Default for [`SecretsConfig::known_fragment_len`].
pub const DEFAULT_FRAGMENT_LEN: usize = 12;

/// The set of keys the host holds, shared between scanners (clones share the set).
///
/// Every key is indexed by its fragments: each run of
/// [`SecretsConfig::known_fragment_len`] characters of its [`squeeze`] (lower-cased
/// letters and digits), each of them also reversed, ROT13'd and both, kept as a set of
/// rolling hashes. A text holds a piece of a key if one of its views (squeezed, its
/// key-like words without the prose between them, and squeezed decodings: base64 at
/// every alignment, hex, character codes) holds a fragment: one rolling pass per view
/// and set lookups, whatever the number of keys. Adding a key costs time in its length
/// only (a host starting thousands of bots adds thousands of keys), and nothing is
/// rebuilt.
///
/// Debug output shows only how many keys are held.
#[derive(Clone)]
pub struct KnownSecrets(Arc<RwLock<KnownSet>>);

struct KnownSet {
    /// Fragment length.
    frag: usize,
    /// Squeezes of the registered keys (to skip duplicates).
    keys: HashSet<String>,
    /// Hashes of every fragment of every key, in the four orientations, by fragment
    /// length: `frag`, and the whole length of keys shorter than `frag` (matched whole).
    windows: BTreeMap<usize, Windows>,
    /// The rolling hash, with a base drawn for this set.
    hash: WindowHash,
    /// The filter's rolling hash, with its own base.
    quick: QuickHash,
}

/// The fragments of one length: their hashes, and a filter that rules out almost every
/// window of a text for the price of a few instructions before the set is asked.
#[derive(Default)]
struct Windows {
    /// [`WindowHash`] of every fragment: the answer.
    hashes: HashSet<u64, BuildMix>,
    /// [`QuickHash`] of every fragment (repeats included), to rebuild the filter.
    quick: Vec<u64>,
    /// One bit per value of the quick hash's top bits, set for every fragment's
    /// ([`Windows::filter_bits`] of them; at least 16 times as many bits as fragments).
    filter: Vec<u64>,
}

/// Smallest and largest filter (bits, as a power of two): 2 KiB to 1 MiB.
const FILTER_MIN_BITS: u32 = 14;
const FILTER_MAX_BITS: u32 = 23;

impl Windows {
    fn filter_bits(&self) -> u32 {
        (self.filter.len() * 64).trailing_zeros()
    }

    fn slot(bits: u32, quick: u64) -> (usize, u64) {
        let i = (quick >> (64 - bits)) as usize;
        (i / 64, 1 << (i % 64))
    }

    /// Adds a fragment with these hashes, growing the filter as the set grows.
    fn insert(&mut self, strong: u64, quick: u64) {
        self.hashes.insert(strong);
        self.quick.push(quick);
        let want = (self.quick.len() * 16)
            .next_power_of_two()
            .trailing_zeros()
            .clamp(FILTER_MIN_BITS, FILTER_MAX_BITS);
        if self.filter.is_empty() || want > self.filter_bits() {
            self.filter = vec![0; (1 << want) / 64];
            for &q in &self.quick {
                let (w, bit) = Self::slot(want, q);
                self.filter[w] |= bit;
            }
        } else {
            let (w, bit) = Self::slot(self.filter_bits(), quick);
            self.filter[w] |= bit;
        }
    }

    /// Whether the filter lets a window with this quick hash through.
    fn may_hold(&self, bits: u32, quick: u64) -> bool {
        let (w, bit) = Self::slot(bits, quick);
        self.filter[w] & bit != 0
    }
}

impl Default for KnownSecrets {
    fn default() -> Self {
        Self::with_fragment_len(DEFAULT_FRAGMENT_LEN)
    }
}

impl fmt::Debug for KnownSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KnownSecrets({} keys)", self.len())
    }
}

impl KnownSecrets {
    /// An empty set matching fragments of [`DEFAULT_FRAGMENT_LEN`] characters.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty set matching fragments of `len` characters (at least
    /// [`MIN_KNOWN_SECRET_LEN`]).
    pub fn with_fragment_len(len: usize) -> Self {
        KnownSecrets(Arc::new(RwLock::new(KnownSet {
            frag: len.max(MIN_KNOWN_SECRET_LEN),
            keys: HashSet::new(),
            windows: BTreeMap::new(),
            hash: WindowHash::random(),
            quick: QuickHash::random(),
        })))
    }

    /// The fragment length: a text holding this many characters of a key in a row (in
    /// any view) is blocked.
    pub fn fragment_len(&self) -> usize {
        self.read().frag
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, KnownSet> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a secret. Returns `false` (and logs a warning) when it has fewer than
    /// [`MIN_KNOWN_SECRET_LEN`] letters and digits, `true` otherwise (also when it was
    /// already known). A key shorter than the fragment length is matched whole.
    pub fn add(&self, secret: &str) -> bool {
        let norm = normalize(secret.trim());
        let sq = squeeze(&fold_confusables(&norm));
        if sq.len() < MIN_KNOWN_SECRET_LEN {
            tracing::warn!(
                len = sq.len(),
                min = MIN_KNOWN_SECRET_LEN,
                "known secret too short to scan for; ignored"
            );
            return false;
        }
        let mut set = self.0.write().unwrap_or_else(|e| e.into_inner());
        if set.keys.contains(&sq) {
            return true;
        }
        let len = sq.len().min(set.frag);
        let (hash, quick) = (set.hash, set.quick);
        let rev: String = sq.chars().rev().collect();
        let orientations = [rot13(&sq), rot13(&rev), rev, sq.clone()];
        let windows = set.windows.entry(len).or_default();
        for o in &orientations {
            let o = o.as_bytes();
            for w in o.windows(len) {
                windows.insert(hash.of(w), quick.of(w));
            }
        }
        set.keys.insert(sq);
        true
    }

    /// Registers the random-looking words of a text the persona must not repeat (a
    /// settings file): each whitespace-separated word of at least the fragment length
    /// whose letters and digits look like key material, not prose. Returns how many.
    pub fn add_tokens_of(&self, text: &str) -> usize {
        let frag = self.fragment_len();
        let mut n = 0;
        for word in text.split_whitespace() {
            let word = word.trim_matches(|c: char| !c.is_ascii_alphanumeric());
            if word.len() >= frag && lenient_random(word) && self.add(word) {
                n += 1;
            }
        }
        n
    }

    /// How many secrets are registered.
    pub fn len(&self) -> usize {
        self.read().keys.len()
    }

    /// Whether no secret is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a fragment of a key is in one of `views` (texts in the host's view): as
    /// written (squeezed) and in its key-like words, and with `decode`, also in its
    /// decodings (base64, hex, character codes).
    fn found_in(&self, views: &[&str], decode: bool) -> bool {
        let set = self.read();
        if set.keys.is_empty() {
            return false;
        }
        views.iter().any(|v| {
            set.holds(squeeze(v).as_bytes())
                || keyish_words(v).is_some_and(|k| set.holds(squeeze(&k).as_bytes()))
                || decode
                    && (base64_decodings(v)
                        .iter()
                        .chain(&hex_decodings(v))
                        .any(|d| set.holds(squeeze_bytes(d).as_bytes()))
                        || char_codes(v).is_some_and(|c| set.holds(squeeze(&c).as_bytes())))
        })
    }

    /// Whether a fragment of a key runs from the end of the `recent` messages (oldest
    /// first) into `folded` (a text in the host's view): the windows of the squeezed
    /// texts that start before `folded`. Only as many recent messages are squeezed as
    /// that tail needs.
    fn found_across(&self, recent: &[&str], folded: &str) -> bool {
        let set = self.read();
        if set.keys.is_empty() || recent.is_empty() {
            return false;
        }
        let tail_len = set.frag - 1;
        // Squeezed text is ASCII: bytes are characters. Built back to front: the tails of
        // the recent messages, newest first, each reversed, then the whole reversed.
        let mut joined: Vec<u8> = Vec::with_capacity(2 * tail_len);
        for r in recent.iter().rev() {
            let need = tail_len - joined.len();
            if r.is_ascii() {
                // The host's view of ASCII text differs from it only in control
                // characters, which squeezing drops anyway: squeeze from the end, only
                // as far as needed.
                joined.extend(
                    r.bytes()
                        .rev()
                        .filter(u8::is_ascii_alphanumeric)
                        .map(|b| b.to_ascii_lowercase())
                        .take(need),
                );
            } else {
                let sq = squeeze(&fold_confusables(&normalize(r)));
                joined.extend(sq.bytes().rev().take(need));
            }
            if joined.len() == tail_len {
                break;
            }
        }
        joined.reverse();
        joined.extend(
            folded
                .bytes()
                .filter(u8::is_ascii_alphanumeric)
                .map(|b| b.to_ascii_lowercase())
                .take(tail_len),
        );
        set.holds(&joined)
    }
}

impl KnownSet {
    /// Whether the squeezed text `sq` holds a fragment (or a whole short key): each
    /// window's quick hash is looked up in the filter, and only a window the filter lets
    /// through is hashed for the set.
    fn holds(&self, sq: &[u8]) -> bool {
        self.windows.iter().any(|(&len, set)| {
            let bits = set.filter_bits();
            self.quick.each(sq, len, |end, q| {
                set.may_hold(bits, q) && set.hashes.contains(&self.hash.of(&sq[end - len..end]))
            })
        })
    }
}

/// A rolling polynomial hash modulo 2^64 with a random odd base: a few instructions per
/// window, for the filter only (the answer comes from [`WindowHash`]; a collision here
/// costs one more lookup, never a wrong answer).
#[derive(Clone, Copy)]
struct QuickHash {
    base: u64,
}

impl QuickHash {
    fn random() -> Self {
        use std::hash::BuildHasher;
        let r = std::collections::hash_map::RandomState::new().hash_one(0x9_u64);
        QuickHash { base: r | 1 }
    }

    /// The hash of `w`.
    fn of(self, w: &[u8]) -> u64 {
        w.iter().fold(0u64, |h, &b| {
            h.wrapping_mul(self.base).wrapping_add(u64::from(b))
        })
    }

    /// Calls `f(end, hash)` for every window `s[end - len..end]` of `s`, in order, until
    /// it returns `true`; returns whether it did.
    fn each(self, s: &[u8], len: usize, mut f: impl FnMut(usize, u64) -> bool) -> bool {
        if len == 0 || s.len() < len {
            return false;
        }
        // base^(len-1): what the byte leaving the window weighs.
        let top = (1..len).fold(1u64, |t, _| t.wrapping_mul(self.base));
        let mut h = self.of(&s[..len]);
        if f(len, h) {
            return true;
        }
        for i in len..s.len() {
            h = h
                .wrapping_sub(top.wrapping_mul(u64::from(s[i - len])))
                .wrapping_mul(self.base)
                .wrapping_add(u64::from(s[i]));
            if f(i + 1, h) {
                return true;
            }
        }
        false
    }
}

/// A polynomial rolling hash modulo the Mersenne prime 2^61 - 1, with a base drawn at
/// random per set, so no text can be made to collide with a key's fragment on purpose.
/// Two different windows collide with a chance of about `len / 2^61`.
#[derive(Clone, Copy)]
struct WindowHash {
    base: u64,
}

const MERSENNE_61: u64 = (1 << 61) - 1;

impl WindowHash {
    fn random() -> Self {
        use std::hash::BuildHasher;
        let r = std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64);
        // In [2^16, 2^61 - 2): far from the trivial bases.
        WindowHash {
            base: (1 << 16) + r % (MERSENNE_61 - 2 - (1 << 16)),
        }
    }

    fn mul(a: u64, b: u64) -> u64 {
        let p = u128::from(a) * u128::from(b);
        let r = (p as u64 & MERSENNE_61) + (p >> 61) as u64;
        let r = (r & MERSENNE_61) + (r >> 61);
        if r >= MERSENNE_61 { r - MERSENNE_61 } else { r }
    }

    fn add(a: u64, b: u64) -> u64 {
        let r = a + b;
        if r >= MERSENNE_61 { r - MERSENNE_61 } else { r }
    }

    /// The hash of `w`.
    fn of(self, w: &[u8]) -> u64 {
        w.iter()
            .fold(0, |h, &b| Self::add(Self::mul(h, self.base), u64::from(b)))
    }
}

/// The hasher of the window sets: the windows are already uniform hashes, so one
/// multiply spreads them over the table's buckets and control bits.
#[derive(Clone, Copy, Default)]
struct BuildMix;

impl std::hash::BuildHasher for BuildMix {
    type Hasher = Mix;
    fn build_hasher(&self) -> Mix {
        Mix(0)
    }
}

struct Mix(u64);

impl std::hash::Hasher for Mix {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        let p = u128::from(n ^ self.0) * 0x9e37_79b9_7f4a_7c15_u128;
        self.0 = (p as u64) ^ ((p >> 64) as u64);
    }
}

// ---------------------------------------------------------------------------------------
// the scanner

/// Scans text for secrets. Cheap to clone; clones share the known secrets.
#[derive(Clone, Debug, Default)]
pub struct SecretScanner {
    config: SecretsConfig,
    known: KnownSecrets,
}

impl SecretScanner {
    /// A scanner with its own, empty set of known secrets.
    pub fn new(config: SecretsConfig) -> Self {
        SecretScanner {
            known: KnownSecrets::with_fragment_len(config.known_fragment_len),
            config,
        }
    }

    /// A scanner sharing `known` (e.g. one set for every bot of a host).
    pub fn with_known(config: SecretsConfig, known: KnownSecrets) -> Self {
        SecretScanner { config, known }
    }

    /// The known secrets this scanner matches.
    pub fn known_secrets(&self) -> &KnownSecrets {
        &self.known
    }

    /// The scanner's settings.
    pub fn config(&self) -> &SecretsConfig {
        &self.config
    }

    /// Registers a key the host holds; see [`KnownSecrets::add`].
    pub fn add_known_secret(&self, secret: &str) -> bool {
        self.known.add(secret)
    }

    /// The first secret found in `text`, if any.
    pub fn scan(&self, text: &str) -> Option<Finding> {
        self.scan_shaped(text, &[]).0
    }

    /// [`scan`](Self::scan), and whether the text [may hold a reshaped
    /// key](may_hold_reshaped_key) in any of its views (when it may not, the reshaped
    /// views were skipped: they cannot hold a key). Such a text is also checked for a
    /// known key's fragment running into it from the end of the `recent` messages.
    fn scan_shaped(&self, text: &str, recent: &[&str]) -> (Option<Finding>, bool) {
        let norm = normalize(text);
        let folded = fold_confusables(&norm);
        let collapsed = collapse_spaced(&folded);
        let hidden = hidden_tag_text(text);
        let mut views: Vec<&str> = vec![&folded];
        views.extend(collapsed.as_deref());
        views.extend(hidden.as_deref());
        let shaped = views.iter().any(|v| may_hold_reshaped_key(v));
        if self.known.found_in(&views[..1], shaped)
            || hidden
                .as_deref()
                .is_some_and(|h| self.known.found_in(&[h], shaped))
        {
            return (Some(KNOWN), shaped);
        }
        let runs: Vec<usize> = views.iter().map(|v| longest_key_run(v)).collect();
        if let Some(f) = views
            .iter()
            .zip(&runs)
            .find_map(|(v, &run)| scan_formats_run(v, run))
        {
            return (Some(f), shaped);
        }
        if shaped
            && let Some(f) = scan_reshaped(&folded)
                .or_else(|| collapsed.as_deref().and_then(scan_reshaped))
                .or_else(|| hidden.as_deref().and_then(scan_reshaped))
        {
            return (Some(f), shaped);
        }
        if self.config.high_entropy
            && let Some(f) = views
                .iter()
                .zip(&runs)
                .find_map(|(v, &run)| scan_entropy_run(v, run, self.config.entropy_min_len, 0))
        {
            return (Some(f), shaped);
        }
        if !shaped && self.known.found_across(recent, &folded) {
            return (Some(KNOWN), shaped);
        }
        (None, shaped)
    }

    /// The first secret in `text` or spanning the bot's `recent` messages (oldest
    /// first) and `text`: a key split over messages. `recent` were scanned when they
    /// were sent, so the joined text is only searched in the views a split key survives
    /// (known-key fragments, key prefixes over joined chunks and over the key-like
    /// words without the prose between them, decodings). A text that [cannot hold a
    /// reshaped key](may_hold_reshaped_key) completes none of those: for it, only a
    /// known key's fragment running from the end of the recent messages into it is
    /// looked for.
    pub fn scan_after(&self, recent: &[&str], text: &str) -> Option<Finding> {
        let (found, shaped) = self.scan_shaped(text, recent);
        if found.is_some() || !shaped || recent.is_empty() {
            return found;
        }
        // Only what the new text completes counts: the earlier messages went out, and
        // what they hold together (a chance pattern) must not silence the bot.
        let found = self.scan_joined(recent, text)?;
        let (last, before) = recent.split_last()?;
        match self.scan_joined(before, last) {
            Some(_) if !before.is_empty() => None,
            _ => Some(found),
        }
    }

    /// The views of `recent` and `text` joined in which a split key survives.
    fn scan_joined(&self, recent: &[&str], text: &str) -> Option<Finding> {
        if recent.is_empty() {
            return None;
        }
        // Joined on line breaks (chunks stay chunks) and without anything between (a key
        // cut in two).
        let mut joined = recent.join("\n");
        joined.push('\n');
        joined.push_str(text);
        let norm = normalize(&joined);
        let folded = fold_confusables(&norm);
        if self.known.found_in(&[&folded], true) {
            return Some(KNOWN);
        }
        scan_reshaped(&folded)
            .or_else(|| {
                let mut tight = recent.concat();
                tight.push_str(text);
                scan_reshaped(&fold_confusables(&normalize(&tight)))
            })
            // Pieces with words around them (`first half AKIA4Q…`, `second half …`): known
            // prefixes only. The rule for keys of no known format, run over key-like words
            // from several messages, joins handles and hyphenated words (`ribbons-ff8d`,
            // `key-value`, `t76k`) into a "key" in ordinary chat.
            .or_else(|| {
                let words = Skeleton::of(&keyish_words(&folded)?);
                let [fwd, rot, rot_rev, rev] = words.orientations();
                [&fwd, &rot, &rot_rev, &rev]
                    .into_iter()
                    .find_map(scan_skeleton)
            })
    }
}

const KNOWN: Finding = Finding {
    kind: "known-secret",
    rule: FindingRule::KnownSecret,
};

// ---------------------------------------------------------------------------------------
// provider formats and assignments

#[derive(Clone, Copy)]
enum Check {
    /// The match is enough.
    None,
    /// Capture `v` must look random (not words).
    Random,
    /// JWT: the header part decodes to JSON with "alg".
    Jwt,
    /// PEM: key material follows the header.
    Pem,
    /// URL credentials: the password is not a placeholder.
    UrlPassword,
    /// `Basic <base64>` decodes to `user:password`.
    BasicAuth,
    /// Assignment of a token-like value.
    TokenValue,
    /// Assignment of a password-like value.
    PasswordValue,
    /// "my key is …": token value, not preceded by hash talk.
    StatedValue,
    /// 12–24 lower-case words after "seed phrase": not a sentence.
    SeedPhrase,
}

struct Rule {
    kind: &'static str,
    rule: FindingRule,
    pattern: &'static str,
    check: Check,
    /// Literals every match contains (see [`super::prefilter`]).
    gate: Gate,
    /// Every match contains a run of at least this many key characters
    /// ([`longest_key_run`]).
    min_run: usize,
}

const fn fmt_rule(kind: &'static str, pattern: &'static str, check: Check) -> Rule {
    Rule {
        kind,
        rule: FindingRule::ProviderFormat,
        pattern,
        check,
        gate: &[],
        min_run: 0,
    }
}

const fn assign_rule(kind: &'static str, pattern: &'static str, check: Check) -> Rule {
    Rule {
        rule: FindingRule::Assignment,
        ..fmt_rule(kind, pattern, check)
    }
}

impl Rule {
    const fn gate(self, gate: Gate) -> Rule {
        Rule { gate, ..self }
    }

    const fn run(self, min_run: usize) -> Rule {
        Rule { min_run, ..self }
    }

    /// Whether the match needs its capture groups to be judged.
    fn needs_captures(&self) -> bool {
        !matches!(self.check, Check::None | Check::Pem)
    }
}

const ASSIGN_KEY: &str = r"(?:api[_.-]?key|apikey|api[_.-]?secret|api[_.-]?token|apitoken|app[_.-]?(?:secret|key)|client[_.-]?secret|consumer[_.-]?secret|secret[_.-]?(?:access[_.-]?)?key|access[_.-]?key(?:[_.-]?id)?|access[_.-]?token|auth[_.-]?token|refresh[_.-]?token|bearer[_.-]?token|session[_.-]?(?:token|secret|key)|private[_.-]?key|signing[_.-]?(?:key|secret)|encryption[_.-]?key|master[_.-]?key|webhook[_.-]?secret|x-api-key|token|secret|auth|credentials?)";

const ASSIGN_PASSWORD: &str = r"(?:password|passwd|passphrase|db[_.-]?pass|passcode)";

static RULES: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    vec![
        fmt_rule("pem-private-key", r"(?i)-{3,}\s*BEGIN[ A-Z0-9_-]{0,40}PRIVATE\s+KEY(?:\s+BLOCK)?\s*-{3,}", Check::Pem).gate(&[&["---"], &["begin"], &["private"]]),
        fmt_rule("putty-private-key", r"PuTTY-User-Key-File-\d+:", Check::None).gate(&[&["putty-user-key-file-"]]),
        fmt_rule("age-secret-key", r"\bAGE-SECRET-KEY-1[0-9A-Z]{58}\b", Check::None).gate(&[&["age-secret-key-1"]]).run(58),
        fmt_rule("anthropic-api-key", r"\bsk-ant-(?:api|admin|sid|oat|ort)\d{2}-(?P<v>[A-Za-z0-9_-]{20,})", Check::Random).gate(&[&["sk-ant-"]]).run(20),
        fmt_rule("anthropic-api-key", r"\bsk-ant-(?P<v>[A-Za-z0-9_-]{24,})", Check::Random).gate(&[&["sk-ant-"]]).run(24),
        fmt_rule("openai-api-key", r"\bsk-(?:proj|svcacct|admin|None|user)-(?P<v>[A-Za-z0-9_-]{20,})", Check::Random).gate(&[&["sk-proj-", "sk-svcacct-", "sk-admin-", "sk-none-", "sk-user-"]]).run(20),
        fmt_rule("openai-api-key", r"\bsk-[A-Za-z0-9]{16,24}T3BlbkFJ[A-Za-z0-9]{16,24}\b", Check::None).gate(&[&["sk-"], &["t3blbkfj"]]).run(16),
        fmt_rule("openai-style-key", r"\bsk-(?P<v>[A-Za-z0-9_-]{32,})", Check::Random).gate(&[&["sk-"]]).run(32),
        fmt_rule("aws-access-key-id", r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA|ASCA|A3T[A-Z0-9])[A-Z0-9]{16}\b", Check::None).gate(&[&["akia", "asia", "abia", "acca", "agpa", "aida", "aipa", "anpa", "anva", "apka", "aroa", "asca", "a3t"]]).run(20),
        fmt_rule("aws-secret-access-key", r#"(?i)aws[\w.-]{0,30}?(?:secret|sk)[\w.-]{0,20}["']?\s*(?::=|=>|[:=])\s*["']?(?P<v>[A-Za-z0-9/+]{40})(?:[^A-Za-z0-9/+]|$)"#, Check::None).gate(&[&["aws"], &["secret", "sk"], &[":", "="]]).run(40),
        fmt_rule("github-token", r"\b(?:ghp|gho|ghu|ghs|ghr)_(?P<v>[A-Za-z0-9]{30,})\b", Check::Random).gate(&[&["ghp_", "gho_", "ghu_", "ghs_", "ghr_"]]).run(30),
        fmt_rule("github-token", r"\bgithub_pat_(?P<v>[A-Za-z0-9_]{30,})\b", Check::Random).gate(&[&["github_pat_"]]).run(30),
        fmt_rule("gitlab-token", r"\bgl(?:pat|dt|rt|ptt|ft|imt|agent|oas|cbt|soat|ffct|wt|cr)-(?P<v>[A-Za-z0-9_-]{20,})", Check::Random).gate(&[&["glpat-", "gldt-", "glrt-", "glptt-", "glft-", "glimt-", "glagent-", "gloas-", "glcbt-", "glsoat-", "glffct-", "glwt-", "glcr-"]]).run(20),
        fmt_rule("gitlab-token", r"\bGR1348941(?P<v>[A-Za-z0-9_-]{20,})", Check::Random).gate(&[&["gr1348941"]]).run(20),
        fmt_rule("slack-token", r"\bxox[abposre](?:\.xox[bp])?-(?P<v>[A-Za-z0-9-]{10,})", Check::Random).gate(&[&["xox"]]).run(10),
        fmt_rule("slack-token", r"\bxapp-\d-[A-Z0-9]{8,}-\d{6,}-[A-Za-z0-9]{20,}", Check::None).gate(&[&["xapp-"]]).run(20),
        fmt_rule("slack-webhook", r"(?i)hooks\.slack\.com/(?:services|workflows|triggers)/(?P<v>[A-Za-z0-9_/+-]{20,})", Check::Random).gate(&[&["hooks.slack.com/"]]).run(20),
        fmt_rule("stripe-secret-key", r"\b(?:sk|rk)_(?:live|test)_(?P<v>[A-Za-z0-9]{16,})", Check::Random).gate(&[&["sk_live_", "sk_test_", "rk_live_", "rk_test_"]]).run(16),
        fmt_rule("stripe-webhook-secret", r"\bwhsec_(?P<v>[A-Za-z0-9+/]{24,})", Check::Random).gate(&[&["whsec_"]]).run(24),
        fmt_rule("google-api-key", r"\bAIza[0-9A-Za-z_-]{35}", Check::None).gate(&[&["aiza"]]).run(39),
        fmt_rule("google-oauth-token", r"\bya29\.(?P<v>[0-9A-Za-z_-]{20,})", Check::Random).gate(&[&["ya29."]]).run(20),
        fmt_rule("google-oauth-secret", r"\bGOCSPX-(?P<v>[0-9A-Za-z_-]{20,})", Check::Random).gate(&[&["gocspx-"]]).run(20),
        fmt_rule("google-refresh-token", r"(?:^|[^A-Za-z0-9/])1//0(?P<v>[0-9A-Za-z_-]{30,})", Check::Random).gate(&[&["1//0"]]).run(30),
        fmt_rule("huggingface-token", r"\b(?:hf|api_org)_(?P<v>[A-Za-z0-9]{30,})\b", Check::Random).gate(&[&["hf_", "api_org_"]]).run(30),
        fmt_rule("npm-token", r"\bnpm_(?P<v>[A-Za-z0-9]{36})\b", Check::Random).gate(&[&["npm_"]]).run(36),
        fmt_rule("pypi-token", r"\bpypi-AgE[A-Za-z0-9_-]{40,}", Check::None).gate(&[&["pypi-age"]]).run(40),
        fmt_rule("twilio-api-key", r"\bSK[0-9a-fA-F]{32}\b", Check::None).gate(&[&["sk"]]).run(34),
        fmt_rule("twilio-auth-token", r#"(?i)twilio[\w.\s-]{0,30}(?:token|secret)["']?\s*(?::=|=>|[:=])\s*["']?[0-9a-f]{32}\b"#, Check::None).gate(&[&["twilio"], &["token", "secret"]]).run(32),
        fmt_rule("sendgrid-api-key", r"\bSG\.(?P<v>[A-Za-z0-9_-]{16,32}\.[A-Za-z0-9_-]{16,64})", Check::Random).gate(&[&["sg."]]).run(16),
        fmt_rule("discord-bot-token", r"\b(?P<v>[MNO][A-Za-z0-9_-]{23,27})\.[A-Za-z0-9_-]{6,7}\.[A-Za-z0-9_-]{27,40}\b", Check::Random).gate(&[&["."]]).run(59),
        fmt_rule("discord-webhook", r"(?i)discord(?:app)?\.com/api/webhooks/\d+/(?P<v>[A-Za-z0-9_-]{30,})", Check::Random).gate(&[&["/api/webhooks/"]]).run(30),
        fmt_rule("telegram-bot-token", r"(?:\b|bot)\d{8,10}:(?P<v>[A-Za-z0-9_-]{35})\b", Check::Random).gate(&[&[":"]]).run(35),
        fmt_rule("azure-storage-key", r"(?i)\b(?:AccountKey|SharedAccessKey)=(?P<v>[A-Za-z0-9+/]{20,}={0,2})", Check::Random).gate(&[&["accountkey=", "sharedaccesskey="]]).run(20),
        fmt_rule("azure-client-secret", r"(?:^|[^A-Za-z0-9_~.-])[A-Za-z0-9_~.-]{3}\dQ~(?P<v>[A-Za-z0-9_~.-]{31,34})", Check::Random).gate(&[&["q~"]]).run(37),
        fmt_rule("azure-sas-signature", r"(?i)[?&]sig=(?P<v>[A-Za-z0-9%+/=]{30,})", Check::Random).gate(&[&["sig="]]),
        fmt_rule("shopify-token", r"\bshp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}\b", Check::None).gate(&[&["shpat_", "shpca_", "shppa_", "shpss_"]]).run(32),
        fmt_rule("digitalocean-token", r"\bdo[por]_v1_[a-f0-9]{64}\b", Check::None).gate(&[&["dop_v1_", "doo_v1_", "dor_v1_"]]).run(64),
        fmt_rule("mailgun-api-key", r"\bkey-[0-9a-f]{32}\b", Check::None).gate(&[&["key-"]]).run(32),
        fmt_rule("mailchimp-api-key", r"\b[0-9a-f]{32}-us\d{1,2}\b", Check::None).gate(&[&["-us"]]).run(32),
        fmt_rule("linear-api-key", r"\blin_(?:api|oauth)_(?P<v>[A-Za-z0-9]{40})\b", Check::Random).gate(&[&["lin_api_", "lin_oauth_"]]).run(40),
        fmt_rule("groq-api-key", r"\bgsk_(?P<v>[A-Za-z0-9]{40,})\b", Check::Random).gate(&[&["gsk_"]]).run(40),
        fmt_rule("replicate-api-token", r"\br8_(?P<v>[A-Za-z0-9]{30,})\b", Check::Random).gate(&[&["r8_"]]).run(30),
        fmt_rule("xai-api-key", r"\bxai-(?P<v>[A-Za-z0-9]{50,})\b", Check::Random).gate(&[&["xai-"]]).run(50),
        fmt_rule("perplexity-api-key", r"\bpplx-(?P<v>[A-Za-z0-9]{40,})\b", Check::Random).gate(&[&["pplx-"]]).run(40),
        fmt_rule("postman-api-key", r"\bPMAK-[a-f0-9]{24}-[a-f0-9]{34}\b", Check::None).gate(&[&["pmak-"]]).run(34),
        fmt_rule("atlassian-api-token", r"\bATATT3(?P<v>[A-Za-z0-9_=-]{100,})", Check::Random).gate(&[&["atatt3"]]).run(100),
        fmt_rule("databricks-token", r"\bdapi[a-f0-9]{32}(?:-\d)?\b", Check::None).gate(&[&["dapi"]]).run(32),
        fmt_rule("pinecone-api-key", r"\bpcsk_(?P<v>[A-Za-z0-9_]{40,})\b", Check::Random).gate(&[&["pcsk_"]]).run(40),
        fmt_rule("doppler-token", r"\bdp\.(?:pt|st|ct|sa|scim|audit)\.(?P<v>[A-Za-z0-9]{40,})\b", Check::Random).gate(&[&["dp.pt.", "dp.st.", "dp.ct.", "dp.sa.", "dp.scim.", "dp.audit."]]).run(40),
        fmt_rule("notion-token", r"\b(?:secret|ntn)_(?P<v>[A-Za-z0-9]{40,})\b", Check::Random).gate(&[&["secret_", "ntn_"]]).run(40),
        fmt_rule("airtable-token", r"\bpat[A-Za-z0-9]{14}\.[a-f0-9]{64}\b", Check::None).gate(&[&["pat"]]).run(64),
        fmt_rule("sentry-token", r"\bsntry[su]_(?P<v>[A-Za-z0-9+/=_]{40,})", Check::Random).gate(&[&["sntrys_", "sntryu_"]]).run(40),
        fmt_rule("supabase-token", r"\bsbp_[a-f0-9]{40}\b", Check::None).gate(&[&["sbp_"]]).run(40),
        fmt_rule("square-token", r"\b(?:sq0atp|sq0csp)-(?P<v>[A-Za-z0-9_-]{22,})", Check::Random).gate(&[&["sq0atp-", "sq0csp-"]]).run(22),
        fmt_rule("mapbox-secret-token", r"\bsk\.eyJ[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{20,}", Check::None).gate(&[&["sk.eyj"]]).run(20),
        fmt_rule("vault-token", r"\bhv[sbr]\.(?P<v>[A-Za-z0-9_-]{24,})", Check::Random).gate(&[&["hvs.", "hvb.", "hvr."]]).run(24),
        fmt_rule("grafana-token", r"\bgl(?:c|sa)_(?P<v>[A-Za-z0-9_+/=-]{32,})", Check::Random).gate(&[&["glc_", "glsa_"]]).run(32),
        fmt_rule("flyio-token", r"\bfo1_(?P<v>[A-Za-z0-9_-]{40,})", Check::Random).gate(&[&["fo1_"]]).run(40),
        fmt_rule("netlify-token", r"\bnf[pc]_(?P<v>[A-Za-z0-9]{36,})", Check::Random).gate(&[&["nfp_", "nfc_"]]).run(36),
        fmt_rule("render-api-key", r"\brnd_(?P<v>[A-Za-z0-9]{28,})", Check::Random).gate(&[&["rnd_"]]).run(28),
        fmt_rule("resend-api-key", r"\bre_(?P<v>[A-Za-z0-9]{8}_[A-Za-z0-9]{20,})", Check::Random).gate(&[&["re_"]]).run(20),
        fmt_rule("langsmith-api-key", r"\blsv2_(?:pt|sk)_(?P<v>[A-Za-z0-9_]{30,})", Check::Random).gate(&[&["lsv2_pt_", "lsv2_sk_"]]).run(30),
        fmt_rule("heroku-api-key", r"\bHRKU-(?P<v>[A-Za-z0-9_-]{30,})", Check::Random).gate(&[&["hrku-"]]).run(30),
        fmt_rule("cloudflare-origin-ca-key", r"\bv1\.0-[a-f0-9]{24}-[a-f0-9]{100,}", Check::None).gate(&[&["v1.0-"]]).run(100),
        fmt_rule("jwt", r"\beyJ(?P<v>[A-Za-z0-9_-]{8,})\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}", Check::Jwt).gate(&[&["eyj"]]).run(29),
        fmt_rule("url-password", r#"\b[a-zA-Z][a-zA-Z0-9+.-]{1,20}://(?P<u>[^\s:/@'"<>]*):(?P<v>[^\s/@'"<>]+)@[^\s/@'"<>]+"#, Check::UrlPassword).gate(&[&["://"], &["@"]]),
        fmt_rule("basic-auth", r"(?i)\bbasic\s+(?P<v>[A-Za-z0-9+/]{12,}={0,2})", Check::BasicAuth).gate(&[&["basic"]]).run(12),
        fmt_rule("nohumans-key", r"\bac_(?P<v>[A-Za-z0-9]{16,})\b", Check::Random).gate(&[&["ac_"]]).run(16),
        assign_rule("bearer-token", r"(?i)\bbearer\s+(?P<v>[A-Za-z0-9._~+/-]{16,}=*)", Check::TokenValue).gate(&[&["bearer"]]).run(16),
        assign_rule(
            "credential-assignment",
            Box::leak(
                format!(r#"(?i)(?:^|[^a-z0-9])(?:[a-z0-9]+[_.-])*{ASSIGN_KEY}["'`]?\s*(?::=|=>|==?|:)\s*["'`]?(?P<v>[^\s"'`,;<>()\[\]{{}}]{{6,}})"#)
                    .into_boxed_str(),
            ),
            Check::TokenValue,
        )
        // Every ASSIGN_KEY alternative contains one of these.
        .gate(&[&["key", "secret", "token", "auth", "credential"], &[":", "="]]),
        assign_rule(
            "password-assignment",
            Box::leak(
                format!(r#"(?i)(?:^|[^a-z0-9])(?:[a-z0-9]+[_.-])*{ASSIGN_PASSWORD}["'`]?\s*(?::=|=>|==?|:)\s*["'`]?(?P<v>[^\s"'`,;<>()\[\]{{}}]{{6,}})"#)
                    .into_boxed_str(),
            ),
            Check::PasswordValue,
        )
        .gate(&[&["pass"], &[":", "="]]),
        assign_rule("seed-phrase", r"(?i)\b(?:seed|recovery|mnemonic|secret|backup|wallet)[ _-]?(?:phrase|words|mnemonic)\b\W{0,3}(?:is|are|was|:|=)?\W{0,3}(?P<v>(?:[a-z]{3,8}[\s,]+){11,23}[a-z]{3,8})\b", Check::SeedPhrase).gate(&[&["phrase", "words", "mnemonic"]]),
        assign_rule("stated-credential", r#"(?i)\b(?:my|the|our|your|this|its|their)\s+(?:[a-z]+\s+){0,2}?(?:api[ _-]?key|key|token|password|passphrase|secret|access key|secret key|private key|passcode)\s+(?:is|was|=|:)\s+["'`]?(?P<v>[^\s"'`,;<>()\[\]{}]{6,})"#, Check::StatedValue).gate(&[&["key", "token", "pass", "secret"]]),
    ]
});

/// The rules compiled once, and one [`Prefilter`] over their gates.
///
/// Each regex carries a literal (`ghp_`, `sk-`, `AKIA`, …), but running the rules one by
/// one still costs a scan of the text per rule (six µs for a 200-character line). The
/// prefilter finds every gate literal in one pass, and together with the longest run of
/// key characters rules out almost every rule for ordinary chat, so only the few rules
/// that could match run. A combined `RegexSet` measured 30 times slower than one by one
/// (its lazy DFA thrashes on this many bounded repetitions).
struct Compiled {
    regexes: Vec<Regex>,
    prefilter: Prefilter,
}

static COMPILED: LazyLock<Compiled> = LazyLock::new(|| {
    let gates: Vec<Gate> = RULES.iter().map(|r| r.gate).collect();
    Compiled {
        regexes: RULES
            .iter()
            // ASCII word boundaries: keys are ASCII, and Unicode `\b` on non-ASCII text keeps
            // regex off its fast engines.
            .map(|r| Regex::new(&r.pattern.replace(r"\b", r"(?-u:\b)")).expect("secret rule"))
            .collect(),
        prefilter: Prefilter::new(&gates, true),
    }
});

/// Provider-format and assignment rules only (no known secrets, no entropy rule), on
/// text that is already normalised.
pub fn scan_formats(text: &str) -> Option<Finding> {
    scan_formats_run(text, longest_key_run(&gate_view(text)))
}

/// `text` with the two non-ASCII letters that case-insensitive rules match as ASCII
/// letters (`ſ` as `s`, the Kelvin sign as `k`) replaced by those letters, for the
/// prefilter. Normalised text has neither (NFKC maps them); decoded text may.
fn gate_view(text: &str) -> Cow<'_, str> {
    if text.is_ascii() || !text.contains(['\u{17F}', '\u{212A}']) {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(text.replace('\u{17F}', "s").replace('\u{212A}', "k"))
    }
}

/// [`scan_formats`] for a text whose [`longest_key_run`] is `run`.
fn scan_formats_run(text: &str, run: usize) -> Option<Finding> {
    let found = scan_formats_with(text, Some(run));
    // Debug builds check the gates: the prefilter must never hide a match.
    debug_assert_eq!(
        found,
        scan_formats_with(text, None),
        "a secret rule's gate misses a literal"
    );
    found
}

/// The rules on `text`, only those its gates and key-character run (`Some(run)`) allow,
/// or all (`None`).
fn scan_formats_with(text: &str, run: Option<usize>) -> Option<Finding> {
    let compiled = &*COMPILED;
    let (candidates, run) = match run {
        Some(run) => (compiled.prefilter.scan(&gate_view(text)), run),
        None => (Candidates::ALL, usize::MAX),
    };
    for (i, (rule, regex)) in RULES.iter().zip(&compiled.regexes).enumerate() {
        if run < rule.min_run || !compiled.prefilter.may_match(&candidates, i) {
            continue;
        }
        for m in regex.find_iter(text) {
            if accepts(rule, regex, text, m) {
                return Some(Finding {
                    kind: rule.kind,
                    rule: rule.rule,
                });
            }
        }
    }
    None
}

/// Whether match `m` of `rule` is a secret. Capture groups are resolved only here, for a
/// rule that matched and judges its value (never for text no rule matches).
fn accepts(rule: &Rule, regex: &Regex, text: &str, m: regex::Match<'_>) -> bool {
    if !rule.needs_captures() {
        return match rule.check {
            Check::Pem => pem_body_ok(&text[m.end()..]),
            _ => true,
        };
    }
    // The same match again, with its groups (the search starts where `m` starts).
    let Some(caps) = regex.captures_at(text, m.start()) else {
        return false;
    };
    debug_assert_eq!(caps.get(0).map(|c| c.range()), Some(m.range()));
    let v = caps.name("v").map_or("", |m| m.as_str());
    match rule.check {
        Check::None | Check::Pem => true,
        Check::Random => lenient_random(v),
        Check::Jwt => jwt_header_ok(v),
        Check::UrlPassword => url_password_ok(caps.name("u").map_or("", |m| m.as_str()), v),
        Check::BasicAuth => basic_auth_ok(v),
        Check::TokenValue => token_value_ok(v),
        Check::PasswordValue => password_value_ok(v),
        Check::SeedPhrase => seed_phrase_ok(v),
        Check::StatedValue => {
            let start = m.start();
            let ctx = &text[text[..start]
                .char_indices()
                .rev()
                .nth(40)
                .map_or(0, |(i, _)| i)..start];
            !HASH_TALK.is_match(ctx) && token_value_ok(v)
        }
    }
}

static HASH_TALK: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(?:hash|sha\d*|md5|checksum|digest|commit|fingerprint|id)\b")
        .expect("hash talk")
});

/// A mnemonic is a list of distinct word-list words, not prose: few function words.
fn seed_phrase_ok(words: &str) -> bool {
    const PROSE: &[&str] = &[
        "the", "and", "for", "you", "your", "with", "that", "this", "are", "was", "not", "but",
        "have", "what", "they", "from", "will", "just", "like", "should", "never", "into", "about",
        "there", "their", "which", "when", "would", "could", "them", "then",
    ];
    let list: Vec<&str> = words
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .collect();
    let prose = list
        .iter()
        .filter(|w| PROSE.contains(&w.to_ascii_lowercase().as_str()))
        .count();
    list.len() >= 12 && prose <= 1
}

fn pem_body_ok(after_header: &str) -> bool {
    // Key material: a run of base64 of some length (headers like Proc-Type may come first).
    let mut run = 0;
    for c in after_header.chars().take(600) {
        if c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '=' {
            run += 1;
            if run >= 16 {
                return true;
            }
        } else if c == '-' {
            return false; // reached an END line without material
        } else {
            run = 0;
        }
    }
    false
}

fn jwt_header_ok(header_tail: &str) -> bool {
    let header = format!("eyJ{header_tail}");
    match base64_decode(&header) {
        Some(bytes) => {
            let s = String::from_utf8_lossy(&bytes);
            s.trim_start().starts_with('{') && s.contains("\"alg\"")
        }
        None => false,
    }
}

fn is_placeholder(v: &str) -> bool {
    let l = v.to_ascii_lowercase();
    let l = l.trim_matches(|c: char| {
        !c.is_ascii_alphanumeric() && c != '$' && c != '{' && c != '<' && c != '%' && c != '*'
    });
    if l.is_empty() {
        return true;
    }
    if l.starts_with(['$', '{', '<', '%', '[', '*'])
        || l.starts_with("process.env")
        || l.starts_with("os.environ")
        || l.starts_with("os.getenv")
        || l.starts_with("env.")
        || l.starts_with("env[")
        || l.starts_with("getenv")
        || l.starts_with("secrets.")
        || l.starts_with("vault:")
        || l.starts_with("config.")
        || l.starts_with("settings.")
        || l.starts_with("self.")
    {
        return true;
    }
    const WORDS: &[&str] = &[
        "your",
        "example",
        "placeholder",
        "redacted",
        "changeme",
        "change_me",
        "dummy",
        "sample",
        "xxxx",
        "****",
        "....",
        "…",
        "insert",
        "replace",
        "todo",
        "fixme",
        "fake",
        "test_key",
        "testkey",
        "my_key",
        "mykey",
        "secret_here",
        "here",
        "not_a_real",
        "notreal",
        "foobar",
        "lorem",
    ];
    if WORDS.iter().any(|w| l.contains(w)) {
        return true;
    }
    const EXACT: &[&str] = &[
        "password",
        "secret",
        "token",
        "none",
        "null",
        "nil",
        "undefined",
        "true",
        "false",
        "required",
        "optional",
        "string",
        "str",
        "env",
        "pass",
        "passwd",
        "admin",
        "root",
        "user",
        "username",
        "apikey",
        "api_key",
        "key",
        "default",
        "empty",
        "unset",
        "hidden",
    ];
    if EXACT.contains(&l) {
        return true;
    }
    // All the same character, or an ENV_VAR_NAME / identifier.
    let first = l.chars().next().unwrap_or(' ');
    if l.chars().all(|c| c == first) {
        return true;
    }
    let raw = v.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_');
    if raw.len() > 2
        && raw
            .chars()
            .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
        && raw.contains('_')
    {
        return true;
    }
    false
}

fn url_password_ok(user: &str, pass: &str) -> bool {
    let p = pass.to_ascii_lowercase();
    const PLACEHOLDERS: &[&str] = &[
        "pass",
        "password",
        "passwd",
        "pwd",
        "secret",
        "pw",
        "p",
        "x",
        "xxx",
        "****",
        "***",
        "changeme",
        "example",
        "user",
        "username",
        "yourpassword",
        "your_password",
        "your-password",
        "mypassword",
        "my_password",
        "token",
        "apikey",
        "api_key",
        "key",
        "passw0rd",
        "pa55word",
        "pass123",
        "s3cret",
        "foo",
        "bar",
        "test",
        "demo",
        "guest",
        "anonymous",
        "admin",
        "root",
        "postgres",
        "mysql",
        "redis",
        "rabbitmq",
        "minio",
        "minioadmin",
    ];
    if PLACEHOLDERS.contains(&p.as_str()) || is_placeholder(pass) || p == user.to_ascii_lowercase()
    {
        return false;
    }
    // `http://host:8080@…`-like shapes and pure port numbers are not passwords.
    !pass.chars().all(|c| c.is_ascii_digit()) || pass.len() >= 6
}

fn basic_auth_ok(b64: &str) -> bool {
    let Some(bytes) = base64_decode(b64) else {
        return false;
    };
    let Ok(s) = std::str::from_utf8(&bytes) else {
        return false;
    };
    match s.split_once(':') {
        Some((user, pass)) => {
            !user.is_empty()
                && !pass.is_empty()
                && s.chars().all(|c| !c.is_control())
                && url_password_ok(user, pass)
        }
        None => false,
    }
}

fn token_value_ok(v: &str) -> bool {
    let v = v.trim_end_matches(['.', ',', '!', '?', ')', ']', '}']);
    if v.len() < 16 || is_placeholder(v) {
        return false;
    }
    // URLs and paths are references, not values (URL credentials have their own rule).
    if v.contains("://") || v.starts_with('/') || v.starts_with("./") || v.starts_with('~') {
        return false;
    }
    let core: String = v.chars().filter(char::is_ascii_alphanumeric).collect();
    let hex = core.len() >= 32 && core.chars().all(|c| c.is_ascii_hexdigit());
    hex || lenient_random(v)
}

fn password_value_ok(v: &str) -> bool {
    let v = v.trim_end_matches(['.', ',', '!', '?', ')', ']', '}']);
    if v.chars().count() < 6 || is_placeholder(v) {
        return false;
    }
    if v.contains("://") || v.starts_with('/') || v.starts_with("./") {
        return false;
    }
    let classes = [
        v.chars().any(|c| c.is_ascii_lowercase()),
        v.chars().any(|c| c.is_ascii_uppercase()),
        v.chars().any(|c| c.is_ascii_digit()),
        v.chars().any(|c| !c.is_alphanumeric()),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    classes >= 2 || (v.len() >= 12 && lenient_random(v))
}

// ---------------------------------------------------------------------------------------
// key prefixes over reshaped text

/// Provider key prefixes as they appear in a [`Skeleton`] (letters, digits, `_`, `-`;
/// dots dropped), with the kind reported. A prefix at a word boundary followed by 8 or
/// more random-looking body characters is a key, in any orientation of the skeleton.
/// Prefixes too short or too common to be told from prose or base64 (`SG.`, `re_`)
/// are left to the full rules on the text as written.
const KEY_PREFIXES: &[(&str, &str)] = &[
    ("sk-ant-", "anthropic-api-key"),
    ("sk-proj-", "openai-api-key"),
    ("sk-svcacct-", "openai-api-key"),
    ("sk-admin-", "openai-api-key"),
    ("sk-", "openai-style-key"),
    ("ghp_", "github-token"),
    ("gho_", "github-token"),
    ("ghu_", "github-token"),
    ("ghs_", "github-token"),
    ("ghr_", "github-token"),
    ("github_pat_", "github-token"),
    ("glpat-", "gitlab-token"),
    ("gldt-", "gitlab-token"),
    ("glrt-", "gitlab-token"),
    ("glptt-", "gitlab-token"),
    ("glft-", "gitlab-token"),
    ("glcbt-", "gitlab-token"),
    ("gloas-", "gitlab-token"),
    ("xoxb-", "slack-token"),
    ("xoxp-", "slack-token"),
    ("xoxa-", "slack-token"),
    ("xoxo-", "slack-token"),
    ("xoxs-", "slack-token"),
    ("xoxr-", "slack-token"),
    ("xoxe-", "slack-token"),
    ("xapp-", "slack-token"),
    ("sk_live_", "stripe-secret-key"),
    ("sk_test_", "stripe-secret-key"),
    ("rk_live_", "stripe-secret-key"),
    ("rk_test_", "stripe-secret-key"),
    ("whsec_", "stripe-webhook-secret"),
    ("AIza", "google-api-key"),
    ("ya29", "google-oauth-token"),
    ("GOCSPX-", "google-oauth-secret"),
    ("hf_", "huggingface-token"),
    ("api_org_", "huggingface-token"),
    ("npm_", "npm-token"),
    ("pypi-AgE", "pypi-token"),
    ("AKIA", "aws-access-key-id"),
    ("ASIA", "aws-access-key-id"),
    ("AGPA", "aws-access-key-id"),
    ("AIDA", "aws-access-key-id"),
    ("AROA", "aws-access-key-id"),
    ("ANPA", "aws-access-key-id"),
    ("shpat_", "shopify-token"),
    ("shpca_", "shopify-token"),
    ("shppa_", "shopify-token"),
    ("shpss_", "shopify-token"),
    ("dop_v1_", "digitalocean-token"),
    ("doo_v1_", "digitalocean-token"),
    ("dor_v1_", "digitalocean-token"),
    ("lin_api_", "linear-api-key"),
    ("lin_oauth_", "linear-api-key"),
    ("gsk_", "groq-api-key"),
    ("r8_", "replicate-api-token"),
    ("xai-", "xai-api-key"),
    ("pplx-", "perplexity-api-key"),
    ("PMAK-", "postman-api-key"),
    ("ATATT3", "atlassian-api-token"),
    ("pcsk_", "pinecone-api-key"),
    ("ntn_", "notion-token"),
    ("sntrys_", "sentry-token"),
    ("sntryu_", "sentry-token"),
    ("sbp_", "supabase-token"),
    ("sq0atp-", "square-token"),
    ("sq0csp-", "square-token"),
    ("glsa_", "grafana-token"),
    ("fo1_", "flyio-token"),
    ("nfp_", "netlify-token"),
    ("rnd_", "render-api-key"),
    ("lsv2_pt_", "langsmith-api-key"),
    ("lsv2_sk_", "langsmith-api-key"),
    ("HRKU-", "heroku-api-key"),
    ("AGE-SECRET-KEY-1", "age-secret-key"),
    ("ac_", "nohumans-key"),
];

/// Body characters a known prefix needs after it.
pub const PREFIX_BODY_MIN: usize = 8;
/// Body characters a key of no known format needs after its prefix.
const GENERIC_BODY_MIN: usize = 20;

static PREFIX_MATCHER: LazyLock<AhoCorasick> = LazyLock::new(|| {
    AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build(KEY_PREFIXES.iter().map(|(p, _)| p))
        .expect("key prefix automaton")
});

/// Prefixes of public identifiers that look like `name-<random>`: never a key.
const PUBLIC_ID_PREFIXES: &[&str] = &[
    "sha1", "sha224", "sha256", "sha384", "sha512", "sha3", "md5", "blake2b", "blake2s", "blake3",
    "sri", "git", "commit", "uuid", "guid", "ulid", "id", "req", "request", "tx", "txid", "block",
    "hash", "cid", "ipfs", "msg", "trace", "span", "run", "build", "job", "pk_live", "pk_test",
    "pk",
];

/// Secrets in the reshapings of `text` (already in the host's view) that the rules on
/// the text as written do not see: key prefixes with separators removed, reversed,
/// ROT13'd (and both), and decodings (base64 at every alignment, hex, character codes)
/// scanned with every format rule.
/// Whether `text` may hold key material in a shape that only the reshaped views see
/// (chunked, reversed, ROT13'd, base64, hex, character codes, a prefix of no known
/// format): it has a word that looks like a piece of a key, or four or more short
/// numbers, or a number of 16 digits or more. A word looks like a piece of a key when it has
///
/// - letters and digits, and at least 4 of them (`2am` and `v2` are prose, `03aZ` is not);
/// - small letters and a capital after its first character (`eCtA`, `JCSJJh`; not a
///   plural acronym like `APIs`);
/// - an `_`, or a `+ / = \` with at least 8 letters and digits (base64, escapes);
/// - a `-` with at least 16 letters and digits (`acme-live-…`), or 20 or more letters
///   and digits in all.
///
/// A mention (`@name`) of a network name is left out. An ordinary chat line has none of
/// these and skips the reshaped views; a key that a persona reshapes keeps enough of
/// its randomness (mixed case, digits, separators inside words) to be let through to
/// them. A known key is still looked for as written in every text, whatever its shape.
fn may_hold_reshaped_key(text: &str) -> bool {
    // Quick necessary conditions first, in folds over the bytes: each kind of such word
    // (or number) has a digit, a capital after its first character, a `_ + / = \`, or
    // 16 or more characters without whitespace (ASCII whitespace only: a longer run
    // where the text has other whitespace only makes this say yes more often).
    let b = text.as_bytes();
    let punct = b.iter().fold(false, |found, &c| {
        found | matches!(c, b'_' | b'+' | b'/' | b'=' | b'\\')
    });
    if !punct && !has_digit_or_inner_capital(text) {
        let (_, longest) = b.iter().fold((0usize, 0usize), |(run, longest), &c| {
            let run = if is_ascii_space(c) { 0 } else { run + 1 };
            (run, longest.max(run))
        });
        if longest < 16 {
            return false;
        }
    }
    let mut numbers = 0;
    let mut judge = |tok: &[u8]| match reshaped_token(tok) {
        Token::Shaped => true,
        Token::Number => {
            numbers += 1;
            numbers >= 4
        }
        Token::Prose => false,
    };
    if text.is_ascii() {
        // The same split on bytes (the whitespace of `char::is_whitespace` in ASCII).
        text.as_bytes().split(|&b| is_ascii_space(b)).any(judge)
    } else {
        text.split(char::is_whitespace).any(|t| judge(t.as_bytes()))
    }
}

/// What a whitespace-separated token tells [`may_hold_reshaped_key`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Token {
    /// A piece of a key, or a number of 16 digits or more.
    Shaped,
    /// A short number (four of them make a text shaped).
    Number,
    Prose,
}

/// One pass over a token's bytes (see [`may_hold_reshaped_key`]).
fn reshaped_token(tok: &[u8]) -> Token {
    // Sentence punctuation, quotes and brackets around it are no part of it (all ASCII,
    // so trimming bytes trims characters).
    let trim = |c: &u8| {
        matches!(
            c,
            b'.' | b','
                | b'!'
                | b'?'
                | b';'
                | b':'
                | b'\''
                | b'"'
                | b'('
                | b')'
                | b'['
                | b']'
                | b'*'
                | b'`'
        )
    };
    let Some(first) = tok.iter().position(|c| !trim(c)) else {
        return Token::Prose;
    };
    let last = tok.iter().rposition(|c| !trim(c)).unwrap_or(first);
    let b = &tok[first..=last];
    if b.len() < 2 {
        return Token::Prose;
    }
    let (mut digits, mut upper, mut lower) = (0usize, 0usize, 0usize);
    let (mut skeleton, mut underscore, mut b64, mut dash) = (true, false, false, false);
    for &c in &b[1..] {
        digits += usize::from(c.is_ascii_digit());
        upper += usize::from(c.is_ascii_uppercase());
        lower += usize::from(c.is_ascii_lowercase());
        skeleton &= is_skeleton_byte(c);
        underscore |= c == b'_';
        b64 |= matches!(c, b'+' | b'/' | b'=' | b'\\');
        dash |= c == b'-';
    }
    if b[0] == b'@' && b.len() <= 33 && skeleton {
        return Token::Prose;
    }
    // The first byte: counted, but a capital there makes no mixed case.
    let c = b[0];
    digits += usize::from(c.is_ascii_digit());
    lower += usize::from(c.is_ascii_lowercase());
    let letters = lower + upper + usize::from(c.is_ascii_uppercase());
    underscore |= c == b'_';
    b64 |= matches!(c, b'+' | b'/' | b'=' | b'\\');
    dash |= c == b'-';
    let alnum = digits + letters;
    // Mixed case inside a word (`eCtA`, `JCSJJh`), not a plural acronym (`APIs`).
    let mixed = lower > 0 && upper > 0 && !(lower == 1 && b[b.len() - 1] == b's');
    if (digits > 0 && letters > 0 && alnum >= 4)
        || mixed
        || underscore
        || (alnum >= 8 && b64)
        || (alnum >= 16 && dash)
        || alnum >= 20
    {
        Token::Shaped
    } else if digits > 0 && alnum <= 4 {
        Token::Number
    } else if digits >= 16 {
        // Hex of 8 bytes or more, written in digits only. Shorter numbers (ids, phone
        // numbers, timestamps) are no reshaped key.
        Token::Shaped
    } else {
        Token::Prose
    }
}

fn scan_reshaped(text: &str) -> Option<Finding> {
    let sk = Skeleton::of(text);
    if sk.bytes.len() >= PREFIX_BODY_MIN + 2
        && let Some(f) = scan_orientations(&sk)
    {
        return Some(f);
    }
    if let Some(d) = dechunk(text)
        && let Some(f) = scan_formats(&d).or_else(|| scan_orientations(&Skeleton::of(&d)))
    {
        return Some(f);
    }
    scan_decoded(text).map(|f| Finding {
        kind: f.kind,
        rule: FindingRule::Encoded,
    })
}

/// Format rules and skeleton prefixes on every decoding of `text`.
fn scan_decoded(text: &str) -> Option<Finding> {
    let check =
        |decoded: &str| scan_formats(decoded).or_else(|| scan_orientations(&Skeleton::of(decoded)));
    base64_decodings(text)
        .iter()
        .chain(&hex_decodings(text))
        .filter_map(|d| printable_runs(d, 12))
        .find_map(|d| check(&d))
        .or_else(|| char_codes(text).and_then(|c| check(&c)))
}

/// Known prefixes in one skeleton.
fn scan_skeleton(sk: &Skeleton) -> Option<Finding> {
    let bytes = &sk.bytes;
    for m in PREFIX_MATCHER.find_overlapping_iter(bytes.as_slice()) {
        if sk.boundary(m.start())
            && chunks_ok(&sk.sep_before[m.end()..], &bytes[m.end()..], 16)
            && body_is_key(&bytes[m.end()..], PREFIX_BODY_MIN, 16)
        {
            return Some(Finding {
                kind: KEY_PREFIXES[m.pattern().as_usize()].1,
                rule: FindingRule::ProviderFormat,
            });
        }
    }
    None
}

/// Keys of no known format (`word_word_<random>`) in one skeleton. Run as written and
/// reversed only: a ROT13'd key has the same shape, and a ROT13'd public identifier
/// (`cx_yvir_…`) would not be recognised as one.
fn scan_generic(sk: &Skeleton) -> Option<Finding> {
    let bytes = &sk.bytes;
    (0..bytes.len())
        .filter(|&i| bytes[i].is_ascii_alphabetic() && sk.sep_before[i])
        .find_map(|i| generic_prefixed_key(&bytes[i..], &sk.sep_before[i..]))
}

/// Known prefixes in every orientation of `sk`, keys of no known format as written and
/// reversed.
fn scan_orientations(sk: &Skeleton) -> Option<Finding> {
    let [fwd, rot, rot_rev, rev] = sk.orientations();
    [&fwd, &rot, &rot_rev, &rev]
        .into_iter()
        .find_map(scan_skeleton)
        .or_else(|| scan_generic(&fwd))
        .or_else(|| scan_generic(&rev))
}

/// `name_` or `name-` (up to three such segments, each 2-10 letters and digits starting
/// with a letter, one case) and then at least [`GENERIC_BODY_MIN`] random-looking
/// characters: the shape of most providers' keys (`acme_live_…`, `tok-prod-…`).
///
/// Everything must be written together (chunked keys are rejoined by
/// [`dechunk`](super::reshape::dechunk) first). With two or more name segments, 10 body
/// characters are enough (the prefix alone).
fn generic_prefixed_key(s: &[u8], sep_before: &[bool]) -> Option<Finding> {
    let mut i = 0;
    let mut segments = 0;
    loop {
        if segments > 0 && sep_before[i] {
            break;
        }
        let seg = contiguous(&s[i..], &sep_before[i..]);
        if sep_before[i + seg] {
            break;
        }
        let part = &s[i..i + seg];
        let one_case = part.iter().all(|b| !b.is_ascii_uppercase())
            || part.iter().all(|b| !b.is_ascii_lowercase());
        let sep = s.get(i + seg).is_some_and(|b| matches!(b, b'_' | b'-'));
        if !(2..=10).contains(&seg) || !part[0].is_ascii_alphabetic() || !one_case || !sep {
            break;
        }
        if segments == 0 {
            let name = String::from_utf8_lossy(part).to_ascii_lowercase();
            if PUBLIC_ID_PREFIXES.contains(&name.as_str()) {
                return None;
            }
        }
        segments += 1;
        i += seg + 1;
        if segments == 3 {
            break;
        }
    }
    if segments == 0 {
        return None;
    }
    if sep_before[i] {
        return None;
    }
    let body: Vec<u8> = s[i..i + contiguous(&s[i..], &sep_before[i..]).min(48)].to_vec();
    let min = if segments >= 2 { 10 } else { GENERIC_BODY_MIN };
    if body.len() < min || body.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let classes = usize::from(body.iter().any(u8::is_ascii_lowercase))
        + usize::from(body.iter().any(u8::is_ascii_uppercase))
        + usize::from(body.iter().any(u8::is_ascii_digit));
    let head = &body[..body.len().min(24)];
    let entropy = shannon_entropy(std::str::from_utf8(head).unwrap_or(""));
    // Entropy of a random head: about 4.2 bits for 24 characters, 3 for 10.
    let need = if head.len() >= 20 { 3.5 } else { 2.7 };
    (classes >= 2 && entropy >= need && body_is_key(&body, min, 24)).then_some(Finding {
        kind: "prefixed-key",
        rule: FindingRule::ProviderFormat,
    })
}

/// Whether the first `n` characters of a body read like chunks of a key: every chunk
/// (between removed separators) but the first (it may continue the prefix's) and the
/// last has at least 3 characters. Words run together (`v2 ghp …`) do not.
fn chunks_ok(sep_before: &[bool], body: &[u8], n: usize) -> bool {
    let n = n.min(sep_before.len().saturating_sub(1)).min(body.len());
    let mut starts = vec![0];
    starts.extend((1..n).filter(|&i| sep_before[i]));
    let first_is_own = sep_before.first().copied().unwrap_or(false);
    // A chunk's size is its letters and digits (`sk-` is two); a lone `-` between
    // separators is no chunk.
    let sizes: Vec<usize> = starts
        .windows(2)
        .map(|w| {
            body[w[0]..w[1]]
                .iter()
                .filter(|b| b.is_ascii_alphanumeric())
                .count()
        })
        .collect();
    sizes
        .iter()
        .enumerate()
        .all(|(k, &size)| (k == 0 && !first_is_own) || size == 0 || size >= 3)
}

/// Letters and digits at the start of `s` written together (no separator removed
/// between them).
fn contiguous(s: &[u8], sep_before: &[bool]) -> usize {
    s.iter()
        .enumerate()
        .take_while(|&(k, b)| b.is_ascii_alphanumeric() && (k == 0 || !sep_before[k]))
        .count()
}

/// Whether the characters after a prefix are key material: at least `min` letters and
/// digits (`_` and `-` skipped, since chunks may keep them), the first `judge` of which
/// are not words and numbers (a random string has pieces no word looks like: `Xk`,
/// `fjq`, `eCtA`, `QZKXPW`).
pub(crate) fn body_is_key(after: &[u8], min: usize, judge: usize) -> bool {
    let alnum: Vec<u8> = after
        .iter()
        .copied()
        .take_while(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        .filter(u8::is_ascii_alphanumeric)
        .take(judge.max(min))
        .collect();
    if alnum.len() < min {
        return false;
    }
    let head = &alnum[..alnum.len().min(judge)];
    if head.iter().all(u8::is_ascii_digit) {
        return false;
    }
    random_pieces(head)
}

/// Splits letters-and-digits into pieces (at letter/digit changes and before an upper
/// case letter that follows a lower case one or starts `Ab`) and says whether some
/// letter piece is no word: shorter than 2, no vowel, 5 consonants in a row (in a piece
/// of at most 8; longer ones are words a skeleton ran together), or mixed
/// case other than Capitalised, or all upper case and longer than 4.
fn random_pieces(s: &[u8]) -> bool {
    let mut pieces: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    for i in 1..s.len() {
        let (p, c) = (s[i - 1], s[i]);
        let next_lower = s.get(i + 1).is_some_and(u8::is_ascii_lowercase);
        let cut = p.is_ascii_digit() != c.is_ascii_digit()
            || (p.is_ascii_lowercase() && c.is_ascii_uppercase())
            || (p.is_ascii_uppercase() && c.is_ascii_uppercase() && next_lower);
        if cut {
            pieces.push(&s[start..i]);
            start = i;
        }
    }
    pieces.push(&s[start..]);
    pieces.iter().any(|p| {
        if p[0].is_ascii_digit() {
            return false;
        }
        let vowel = |b: &u8| {
            matches!(
                b.to_ascii_lowercase(),
                b'a' | b'e' | b'i' | b'o' | b'u' | b'y'
            )
        };
        let lower_rest = p[1..].iter().all(u8::is_ascii_lowercase);
        let upper = p.iter().all(u8::is_ascii_uppercase);
        let consonant_run = p.split(vowel).map(<[u8]>::len).max().unwrap_or(0);
        p.len() < 2
            || !p.iter().any(vowel)
            || (consonant_run >= 5 && p.len() <= 8)
            || !(lower_rest || (upper && p.len() <= 4))
    })
}

// ---------------------------------------------------------------------------------------
// randomness

/// Shannon entropy of `s` in bits per character.
pub fn shannon_entropy(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    let mut n = 0u32;
    for b in s.bytes() {
        counts[b as usize] += 1;
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    let n = f64::from(n);
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

#[derive(Default, Debug)]
struct Stats {
    lower: usize,
    upper: usize,
    digit: usize,
    vowels: usize,
}

fn stats(alnum: &str) -> Stats {
    let mut s = Stats::default();
    for c in alnum.chars() {
        if c.is_ascii_lowercase() {
            s.lower += 1;
        } else if c.is_ascii_uppercase() {
            s.upper += 1;
        } else {
            s.digit += 1;
        }
        if matches!(c.to_ascii_lowercase(), 'a' | 'e' | 'i' | 'o' | 'u') {
            s.vowels += 1;
        }
    }
    s
}

/// A word-ish part: letters only, all lower case, all upper case (short) or Capitalised.
fn is_word(p: &str) -> bool {
    if p.is_empty() || !p.chars().all(|c| c.is_ascii_alphabetic()) {
        return false;
    }
    let rest_lower = p.chars().skip(1).all(|c| c.is_ascii_lowercase());
    rest_lower || (p.len() <= 5 && p.chars().all(|c| c.is_ascii_uppercase()))
}

/// For the tail of a prefixed key (`ghp_…`, `sk-…`): random enough to be key material,
/// not words joined by separators.
fn lenient_random(v: &str) -> bool {
    let parts: Vec<&str> = v
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|p| !p.is_empty())
        .collect();
    // Words and numbers joined by separators ("learn-pipelines-2024") are not keys.
    if parts
        .iter()
        .all(|p| is_word(p) || p.chars().all(|c| c.is_ascii_digit()))
    {
        return false;
    }
    let alnum: String = parts.concat();
    if alnum.len() < 12 {
        return false;
    }
    let s = stats(&alnum);
    let classes = usize::from(s.lower > 0) + usize::from(s.upper > 0) + usize::from(s.digit > 0);
    classes >= 2 && shannon_entropy(&alnum) >= 3.0
}

/// For bare tokens (no prefix): does this look like random key material?
fn strict_random(token: &str, min_len: usize) -> bool {
    // Remove hashes, UUID pieces, numbers and words; what remains must be long and random.
    let parts: Vec<&str> = token
        .split(['-', '_', '/', '+', '='])
        .filter(|p| !p.is_empty())
        .collect();
    let kept: Vec<&str> = parts
        .iter()
        .copied()
        .filter(|p| {
            let hex = p.len() >= 8 && p.chars().all(|c| c.is_ascii_hexdigit());
            let digits = p.chars().all(|c| c.is_ascii_digit());
            let uuid_piece =
                p.len() <= 12 && p.chars().all(|c| c.is_ascii_hexdigit()) && parts.len() >= 5;
            !(hex || digits || uuid_piece || (is_word(p) && p.len() >= 2))
        })
        .collect();
    let alnum: String = kept.concat();
    if alnum.len() < min_len.saturating_sub(4).max(16) {
        return false;
    }
    let s = stats(&alnum);
    let letters = s.lower + s.upper;
    if letters == 0 {
        return false;
    }
    let classes = usize::from(s.lower > 0) + usize::from(s.upper > 0) + usize::from(s.digit > 0);
    let mixed_case = s.upper >= 2 && s.lower >= 2;
    if classes < 2 || !(s.digit >= 2 || mixed_case) || shannon_entropy(&alnum) < 3.3 {
        return false;
    }
    // English-likeness: share of letter bigrams among the most common English ones
    // (about 7% for random letters, 30-60% for identifiers and prose).
    let bigrams = common_bigram_share(&alnum);
    if bigrams < 0.2 {
        return true;
    }
    if mixed_case && wordy_share(&alnum) < 0.5 && bigrams < 0.3 {
        return true;
    }
    let vowel_ratio = s.vowels as f64 / letters as f64;
    let digit_runs = alnum
        .as_bytes()
        .split(|b| !b.is_ascii_digit())
        .filter(|r| !r.is_empty())
        .count();
    !mixed_case && digit_runs >= 3 && vowel_ratio <= 0.34 && bigrams < 0.3
}

const COMMON_BIGRAMS: &[&[u8; 2]] = &[
    b"th", b"he", b"in", b"er", b"an", b"re", b"on", b"at", b"en", b"nd", b"ti", b"es", b"or",
    b"te", b"of", b"ed", b"is", b"it", b"al", b"ar", b"st", b"to", b"nt", b"ng", b"se", b"ha",
    b"as", b"ou", b"io", b"le", b"ve", b"co", b"me", b"de", b"hi", b"ri", b"ro", b"ic", b"ne",
    b"ea", b"ra", b"ce", b"li", b"ch", b"ll", b"be", b"ma", b"si", b"om", b"ur", b"ca", b"el",
    b"ta", b"la", b"ns", b"ge", b"ly", b"ei",
];

fn common_bigram_share(alnum: &str) -> f64 {
    let b = alnum.as_bytes();
    let mut total = 0usize;
    let mut common = 0usize;
    for w in b.windows(2) {
        if w[0].is_ascii_alphabetic() && w[1].is_ascii_alphabetic() {
            total += 1;
            let pair = [w[0].to_ascii_lowercase(), w[1].to_ascii_lowercase()];
            if COMMON_BIGRAMS.iter().any(|c| **c == pair) {
                common += 1;
            }
        }
    }
    if total == 0 {
        0.0
    } else {
        common as f64 / total as f64
    }
}

/// Share of letters in camel-case pieces that look like words (4+ letters, some vowels).
fn wordy_share(alnum: &str) -> f64 {
    let chars: Vec<char> = alnum.chars().collect();
    let mut pieces: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    for i in 1..chars.len() {
        let (p, c) = (chars[i - 1], chars[i]);
        let next_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
        let boundary = (p.is_ascii_lowercase() && c.is_ascii_uppercase())
            || (p.is_ascii_alphabetic() != c.is_ascii_alphabetic())
            || (p.is_ascii_uppercase() && c.is_ascii_uppercase() && next_lower);
        if boundary {
            pieces.push((start, i));
            start = i;
        }
    }
    pieces.push((start, chars.len()));
    let mut letters = 0usize;
    let mut wordy = 0usize;
    for (a, b) in pieces {
        let piece = &chars[a..b];
        if !piece.iter().all(char::is_ascii_alphabetic) {
            continue;
        }
        letters += piece.len();
        if piece.len() >= 4 {
            let vowels = piece
                .iter()
                .filter(|c| matches!(c.to_ascii_lowercase(), 'a' | 'e' | 'i' | 'o' | 'u'))
                .count();
            let ratio = vowels as f64 / piece.len() as f64;
            let cased = piece[1..].iter().all(char::is_ascii_lowercase)
                || piece.iter().all(char::is_ascii_uppercase);
            if (0.2..=0.7).contains(&ratio) && cased {
                wordy += piece.len();
            }
        }
    }
    if letters == 0 {
        0.0
    } else {
        wordy as f64 / letters as f64
    }
}

static URL_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"(?i)\b(?:[a-z][a-z0-9+.-]{1,20}://|www\.)[^\s<>"'`]+|\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:com|org|net|io|ai|dev|app|chat|co|xyz|me|gg|so|sh|to|ly|info|edu|gov)/[^\s<>"'`]*"#).expect("url regex")
});

static TOKEN_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[A-Za-z0-9_+/=-]{16,}").expect("token regex"));

/// Public keys, certificates and signatures: long base64, not secret.
static PUBLIC_MATERIAL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"-----BEGIN (?:[A-Z0-9 ]*PUBLIC KEY|CERTIFICATE(?: REQUEST)?|X509 CRL|PGP PUBLIC KEY BLOCK|PGP SIGNATURE|PGP MESSAGE|SSH SIGNATURE)-----[\s\S]*?(?:-----END [A-Z0-9 ]+-----|$)|(?:ssh-(?:rsa|ed25519|dss)|ecdsa-sha2-nistp\d+|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com)\s+AAAA[A-Za-z0-9+/=]+")
        .expect("public material regex")
});

/// Key formats that are public by design (Stripe publishable keys): never blocked.
const PUBLIC_PREFIXES: &[&str] = &["pk_live_", "pk_test_"];

/// Content hashes that look random but are addresses of public data (IPFS CIDs).
fn is_public_hash(tok: &str) -> bool {
    (tok.len() == 46 && tok.starts_with("Qm"))
        || (tok.len() >= 50
            && tok.starts_with("bafy")
            && tok
                .bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)))
}

/// Identifiers that look random but are public by design: wallet addresses (Bitcoin
/// Base58Check and bech32 with a valid checksum, Ethereum `0x` + 40 or 64 hex, Solana
/// where `text` speaks of wallets), Tor onion addresses (`after` is the text following
/// the token). Hex hashes, UUIDs and
/// commit ids pass the entropy rule as hex already.
fn is_public_id(tok: &str, after: &str, text: &str) -> bool {
    let b = tok.as_bytes();
    if let Some(hex) = tok.strip_prefix("0x").or_else(|| tok.strip_prefix("0X"))
        && matches!(hex.len(), 40 | 64)
        && hex.bytes().all(|c| c.is_ascii_hexdigit())
    {
        return true;
    }
    // Subresource-integrity hashes: `sha384-` and the base64 of the digest.
    for (name, len) in [("sha256-", 44), ("sha384-", 64), ("sha512-", 88)] {
        if let Some(b64) = tok.strip_prefix(name)
            && (len - 2..=len).contains(&b64.trim_end_matches('=').len())
        {
            return true;
        }
    }
    if after.starts_with(".onion")
        && b.len() == 56
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(c))
    {
        return true;
    }
    base58check_ok(tok) || bech32_ok(tok) || solana_address_ok(tok, text)
}

const BASE58: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// The bytes a base58 string stands for (leading `1`s are zero bytes), if it is one.
fn base58_decode(s: &str) -> Option<Vec<u8>> {
    let mut num: Vec<u8> = Vec::with_capacity(s.len()); // big-endian
    for c in s.bytes() {
        let v = BASE58.iter().position(|&a| a == c)?;
        let mut carry = v as u32;
        for byte in num.iter_mut().rev() {
            carry += u32::from(*byte) * 58;
            *byte = carry as u8;
            carry >>= 8;
        }
        while carry > 0 {
            num.insert(0, carry as u8);
            carry >>= 8;
        }
    }
    let zeros = s.bytes().take_while(|&c| c == b'1').count();
    let mut bytes = vec![0u8; zeros];
    bytes.extend(num);
    Some(bytes)
}

/// A Base58Check string (Bitcoin addresses, WIF keys excluded: 25-byte payloads only)
/// whose double-SHA-256 checksum holds.
fn base58check_ok(s: &str) -> bool {
    use sha2::{Digest, Sha256};
    if !(25..=35).contains(&s.len()) {
        return false;
    }
    let Some(bytes) = base58_decode(s) else {
        return false;
    };
    if bytes.len() != 25 {
        return false;
    }
    let (payload, check) = bytes.split_at(21);
    let digest = Sha256::digest(Sha256::digest(payload));
    digest[..4] == *check
}

/// Words that say a text is about a wallet or a chain address.
static WALLET_TALK: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(?:solana|sol|wallet|address|addr|pubkey|public key|mint|program id|spl|phantom|solscan|explorer)\b")
        .expect("wallet talk regex")
});

/// A Solana address: the base58 of a 32-byte public key (32 to 44 characters) in a
/// text that speaks of wallets, addresses or Solana. Solana addresses carry no
/// checksum, so without such words the string is judged like any other random one;
/// a private key (64 bytes, about 88 characters) is never one.
fn solana_address_ok(tok: &str, text: &str) -> bool {
    (32..=44).contains(&tok.len())
        && base58_decode(tok).is_some_and(|b| b.len() == 32)
        && WALLET_TALK.is_match(text)
}

/// A bech32 or bech32m string (segwit addresses, `bc1…`, `tb1…`, `ltc1…`) whose checksum
/// holds.
fn bech32_ok(s: &str) -> bool {
    const CHARSET: &[u8; 32] = b"qpzry9x8gf2tvdw0s3jn54khce6mua7l";
    if s.len() < 14 || s.len() > 90 {
        return false;
    }
    let lower = s.to_ascii_lowercase();
    if lower != s && s.to_ascii_uppercase() != s {
        return false;
    }
    let Some(pos) = lower.rfind('1') else {
        return false;
    };
    let (hrp, data) = (&lower[..pos], &lower[pos + 1..]);
    if hrp.is_empty() || data.len() < 6 || !hrp.bytes().all(|c| c.is_ascii_lowercase()) {
        return false;
    }
    let mut values: Vec<u32> = hrp.bytes().map(|c| u32::from(c >> 5)).collect();
    values.push(0);
    values.extend(hrp.bytes().map(|c| u32::from(c & 31)));
    for c in data.bytes() {
        let Some(v) = CHARSET.iter().position(|&a| a == c) else {
            return false;
        };
        values.push(v as u32);
    }
    const GEN: [u32; 5] = [
        0x3b6a_57b2,
        0x2650_8e6d,
        0x1ea1_19fa,
        0x3d42_33dd,
        0x2a14_62b3,
    ];
    let mut chk: u32 = 1;
    for v in values {
        let top = chk >> 25;
        chk = ((chk & 0x1ff_ffff) << 5) ^ v;
        for (i, g) in GEN.iter().enumerate() {
            if (top >> i) & 1 == 1 {
                chk ^= g;
            }
        }
    }
    chk == 1 || chk == 0x2bc8_30a3
}

fn scan_entropy(text: &str, min_len: usize, depth: u8) -> Option<Finding> {
    scan_entropy_run(text, longest_key_run(text), min_len, depth)
}

/// [`scan_entropy`] for a text whose [`longest_key_run`] is `run`.
fn scan_entropy_run(text: &str, run: usize, min_len: usize, depth: u8) -> Option<Finding> {
    // Every candidate is a TOKEN_RE match, a run of 16 or more key characters; masking
    // only shortens runs. Most chat has none.
    if run < 16 {
        debug_assert!(!TOKEN_RE.is_match(text));
        return None;
    }
    // URLs without credentials are not secrets (credential URLs were checked before).
    let masked;
    let text = if URL_RE.is_match(text) {
        masked = URL_RE.replace_all(text, " ");
        masked.as_ref()
    } else {
        text
    };
    let masked_pub;
    let text = if PUBLIC_MATERIAL.is_match(text) {
        masked_pub = PUBLIC_MATERIAL.replace_all(text, " ");
        masked_pub.as_ref()
    } else {
        text
    };
    for m in TOKEN_RE.find_iter(text) {
        let tok = m.as_str().trim_start_matches(['=', '-', '_', '/', '+']);
        let core = tok.trim_end_matches(['=', '-', '_', '/', '+']);
        if core.len() < 16 {
            continue;
        }
        // hex of text (a provider key hex-encoded): decode and scan that.
        if depth == 0
            && core.len() >= 32
            && core.len() % 2 == 0
            && core.bytes().all(|b| b.is_ascii_hexdigit())
        {
            if let Some(f) = hex_text(core).and_then(|d| scan_formats(&d)) {
                return Some(Finding {
                    kind: f.kind,
                    rule: FindingRule::Encoded,
                });
            }
            continue;
        }
        // base64 of text: decode and scan that instead.
        if let Some(decoded) = base64_text(tok) {
            if depth == 0
                && let Some(f) =
                    scan_formats(&decoded).or_else(|| scan_entropy(&decoded, min_len, depth + 1))
            {
                return Some(Finding {
                    kind: f.kind,
                    rule: FindingRule::Encoded,
                });
            }
            continue;
        }
        if core.len() < min_len
            || PUBLIC_PREFIXES.iter().any(|p| core.starts_with(p))
            || is_public_hash(core)
            || is_public_id(core, &text[m.end()..], text)
        {
            continue;
        }
        let random = if core.contains('/') && !core.contains('+') {
            let segs: Vec<&str> = core.split('/').filter(|s| !s.is_empty()).collect();
            if segs.len() >= 2 && segs.iter().any(|s| is_word(s) && s.len() >= 2) {
                // A path: judge each component on its own.
                segs.iter()
                    .any(|s| s.len() >= min_len && strict_random(s, min_len))
            } else {
                strict_random(core, min_len)
            }
        } else {
            strict_random(core, min_len)
        };
        if random {
            return Some(Finding {
                kind: "high-entropy-token",
                rule: FindingRule::HighEntropy,
            });
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// small encoders (no dependency needed for this much)

#[cfg(test)]
const STD_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

#[cfg(test)]
fn hex_encode(bytes: &[u8], upper: bool) -> String {
    let digits: &[u8; 16] = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(digits[(b >> 4) as usize] as char);
        s.push(digits[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
fn base64_encode(bytes: &[u8], alphabet: &[u8; 64]) -> String {
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        let out = chunk.len() + 1;
        for i in 0..out {
            s.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    s // unpadded: padding depends on what follows in a larger blob
}

/// Decodes standard or URL-safe base64, padded or not. `None` if not base64.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    if s.len() % 4 == 1 {
        return None;
    }
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.as_bytes().chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len() - 1]);
    }
    Some(out)
}

/// If `hex` decodes to readable ASCII text, that text.
fn hex_text(hex: &str) -> Option<String> {
    let bytes: Vec<u8> = hex
        .as_bytes()
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect::<Option<_>>()?;
    bytes
        .iter()
        .all(|b| b.is_ascii_graphic() || *b == b' ')
        .then(|| String::from_utf8_lossy(&bytes).into_owned())
}

/// If `tok` is base64 of readable text, that text.
fn base64_text(tok: &str) -> Option<String> {
    let bytes = base64_decode(tok)?;
    if bytes.len() < 8 {
        return None;
    }
    let s = std::str::from_utf8(&bytes).ok()?;
    let printable = s
        .chars()
        .filter(|c| !c.is_control() || matches!(c, '\n' | '\t' | '\r'))
        .count();
    let total = s.chars().count();
    let readable = s
        .chars()
        .filter(|c| c.is_alphanumeric() || c.is_whitespace() || c.is_ascii_punctuation())
        .count();
    (printable == total && readable * 10 >= total * 9).then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`may_hold_reshaped_key`] as first written (a token at a time, a pass per
    /// count): the oracle of the single pass.
    fn may_hold_reshaped_key_reference(text: &str) -> bool {
        let mut numbers = 0;
        for tok in text.split(char::is_whitespace) {
            let tok = tok.trim_matches(|c: char| {
                matches!(
                    c,
                    '.' | ','
                        | '!'
                        | '?'
                        | ';'
                        | ':'
                        | '\''
                        | '"'
                        | '('
                        | ')'
                        | '['
                        | ']'
                        | '*'
                        | '`'
                )
            });
            let b = tok.as_bytes();
            if b.len() < 2 {
                continue;
            }
            if b[0] == b'@' && b.len() <= 33 && b[1..].iter().all(|&c| is_skeleton_byte(c)) {
                continue;
            }
            let alnum = b.iter().filter(|c| c.is_ascii_alphanumeric()).count();
            let digits = b.iter().filter(|c| c.is_ascii_digit()).count();
            let letters = b.iter().filter(|c| c.is_ascii_alphabetic()).count();
            // Mixed case inside a word (`eCtA`, `JCSJJh`), not a plural acronym (`APIs`).
            let lower = b.iter().filter(|c| c.is_ascii_lowercase()).count();
            let mixed = lower > 0
                && b[1..].iter().any(u8::is_ascii_uppercase)
                && !(lower == 1 && b[b.len() - 1] == b's');
            if (digits > 0 && letters > 0 && alnum >= 4)
                || mixed
                || b.contains(&b'_')
                || (alnum >= 8 && b.iter().any(|c| matches!(c, b'+' | b'/' | b'=' | b'\\')))
                || (alnum >= 16 && b.contains(&b'-'))
                || alnum >= 20
            {
                return true;
            }
            if digits > 0 && alnum <= 4 {
                numbers += 1;
                if numbers >= 4 {
                    return true;
                }
            } else if digits >= 16 {
                // Hex of 8 bytes or more, written in digits only. Shorter numbers (ids,
                // phone numbers, timestamps) are no reshaped key.
                return true;
            }
        }
        false
    }

    fn scanner() -> SecretScanner {
        SecretScanner::new(SecretsConfig::default())
    }

    fn blocked(t: &str) -> bool {
        scanner().scan(t).is_some()
    }

    #[test]
    fn the_single_pass_shape_check_matches_the_reference() {
        let mut shaped = 0;
        let texts = crate::policy::fixture_texts();
        for t in &texts {
            let want = may_hold_reshaped_key_reference(t);
            assert_eq!(may_hold_reshaped_key(t), want, "{t}");
            shaped += usize::from(want);
        }
        assert!(shaped > 50 && shaped < texts.len() / 2, "{shaped}");
        for t in [
            "eCtA",
            "APIs",
            "Abs",
            "aBs",
            "@nightcrawler-7f",
            "@x_y",
            "@a+b",
            "(ab_)",
            "1 2 3 4",
            "1\u{b}2\u{b}3\u{b}4",
            "1\u{a0}2\u{a0}3\u{a0}4",
            "1234567890123456",
            "12345678901234567",
            "ab-cdefghijklmnop",
            "abcd+efgh",
            "abcd+efg",
            "\"x1yz\"",
            "..",
            "a",
            "ab12",
            "ÀB1c",
            "Ж1a2",
            "**a1b2**",
            "'12'",
            "12:30 1:45 2:00 3:15",
        ] {
            assert_eq!(
                may_hold_reshaped_key(t),
                may_hold_reshaped_key_reference(t),
                "{t}"
            );
        }
    }

    #[test]
    fn provider_formats() {
        for (t, kind) in [
            (
                "sk-proj-A4jT6ffffLfMpCmzyRaNT3BlbkFJjxFEqy3gyfjZ879O2v3Q",
                "openai-api-key",
            ),
            (
                "sk-ant-api03-eCtA03aZxrTUWm6MbGHV5tCdnmv8nIoyqcE0JwQBttlMOd_OFOkXMsB1j-68akAOmEXdaT",
                "anthropic-api-key",
            ),
            (
                "AWS_ACCESS_KEY_ID=AKIAVTDXVHOBGXHXQHGU",
                "aws-access-key-id",
            ),
            (
                "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                "aws-secret-access-key",
            ),
            ("glpat-xR4vT9bQ2mN7kL5pW8sZ", "gitlab-token"),
            (
                "xoxp-123456789012-123456789012-abcdefABCDEF123456",
                "slack-token",
            ),
            (
                "https://hooks.slack.com/services/T0123ABCD/B0456EFGH/aBcDeFgHiJkLmNoPqRsTuVwX",
                "slack-webhook",
            ),
            ("rk_live_51Hh3kQ2eZvKYlo2CabcdEFGH", "stripe-secret-key"),
            ("ya29.a0AfH6SMBx3kQ9vLm2Np7Rt5Yw", "google-oauth-token"),
            ("hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ01234567", "huggingface-token"),
            ("npm_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A", "npm-token"),
            (
                "SG.aBcDeFgHiJkLmNoPqRsTuV.wXyZ0123456789aBcDeFgHiJkLmNoPqRsTuVwXyZ012",
                "sendgrid-api-key",
            ),
            (
                "1234567890:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsawE",
                "telegram-bot-token",
            ),
            (
                "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3yBYpGmxbKmmrSwiA6ytNNE8DPFLoAoGCCqGSM49\n-----END EC PRIVATE KEY-----",
                "pem-private-key",
            ),
            (
                "postgres://admin:Zq8vP2rT9w@db.internal:5432/app",
                "url-password",
            ),
            (
                "pypi-AgEIcHlwaS5vcmcCJDk2NDNhYjY2LTQzYzAtNGQ3NC1iNGJkLWE0NTk3YjEzMGFkZQ",
                "pypi-token",
            ),
        ] {
            let f = scanner().scan(t);
            assert_eq!(f.map(|f| f.kind), Some(kind), "{t}");
        }
    }

    #[test]
    fn look_alikes_pass() {
        for t in [
            "ask-me-anything thread is open, drop your questions",
            "risk-free? nothing is risk-free in trading lol",
            "commit 3f9c2a1b7d4e5f60718293a4b5c6d7e8f9012345 fixed the reconnect bug",
            "request id 550e8400-e29b-41d4-a716-446655440000 failed with 502",
            "the sk-learn pipeline beat my hand-written one",
            "AKIA is how aws access keys start, never paste one here",
            "base64 of hello is aGVsbG8=",
            "api keys should live in a vault, not in a config.json",
            "ghp is a prefix github uses for personal tokens",
            "sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "the eyJ prefix means it's base64 json, usually a jwt",
            "stripe publishable key pk_live_51Hh3kQ2eZvKYlo2CabcdEFGH is fine to share",
            "see https://example.com/post/bc981687-4240-4e45-b4fc-35fd9b61722a for details",
            "the file is at /home/agent/.cache/huggingface/hub/models--bert-base-uncased/snapshots/3f9c2a1b7d4e5f60718293a4b5c6d7e8f9012345/config.json",
            "SGVsbG8gd29ybGQsIGhvdyBhcmUgeW91IGRvaW5nIHRvZGF5Pw== is base64 of a greeting",
            "use api_key=YOUR_API_KEY_HERE and token: ${GITHUB_TOKEN}",
            "connect with postgres://user:password@localhost:5432/db",
            "XMLHttpRequestEventTarget and getUserAccountSettingsFromServer are long names",
            "the-shining-ribbons-3103 said hi",
            "sha512 cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e",
            "password: the one we agreed on",
            "my api key is in the vault",
            "the key is to ship small changes",
        ] {
            assert!(!blocked(t), "blocked: {t} -> {:?}", scanner().scan(t));
        }
    }

    #[test]
    fn entropy_rule() {
        assert!(blocked("here: 9fKq2LmX7vB3nR8tY1wZ4cH6jD0sG5pA"));
        assert!(blocked("cohere key 4hd83jf9s0dk38fhs7ejd83kq02mdk38"));
        assert!(!blocked(
            "here: 9fKq2LmX7vB3nR8tY1wZ4cH6jD0sG5pA"
                .replace(|c: char| c.is_ascii_digit(), "")
                .to_lowercase()
                .as_str()
        ));
        let off = SecretScanner::new(SecretsConfig {
            high_entropy: false,
            ..Default::default()
        });
        assert!(off.scan("here: 9fKq2LmX7vB3nR8tY1wZ4cH6jD0sG5pA").is_none());
    }

    #[test]
    fn obfuscated_keys() {
        assert!(blocked(
            "ｇｈｐ＿ｒｎｈｕｙ６ＭＫＷＦ９ｙＰ５ＷｍＤＷｐｕｌｌｈＺａｓｙＤＦＭＸａＹ０ｃ５"
        ));
        assert!(blocked(
            "gh\u{200B}p_rnhuy6MKWF9yP5Wm\u{200D}DWpullhZasyDFMXaY0c5"
        ));
        assert!(blocked(
            "s k - a n t - a p i 0 3 - e C t A 0 3 a Z x r T U W m 6 M b G H V 5 t C d n m v 8 n I o y q c E 0"
        ));
    }

    #[test]
    fn solana_addresses_pass_where_the_text_speaks_of_them() {
        // Public mint and program addresses (base58 of a 32-byte public key).
        let addresses = [
            "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v",
            "9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin",
            "4k3Dyjzvzp8eMZWUXbBCjEvwSkkk59S5iCNLY3QrkX6R",
            "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA",
        ];
        for a in addresses {
            for text in [
                format!("send the SOL to my wallet {a} please"),
                format!("the USDC mint address is {a}."),
                format!("solana: {a}"),
            ] {
                assert_eq!(scanner().scan(&text), None, "{text}");
            }
        }
        // Without such words a random base58 string is still a secret to the entropy
        // rule, and a longer one (a 64-byte private key) always is.
        assert!(
            scanner()
                .scan("use 9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin to log in")
                .is_some()
        );
        let private = "4Z7cXSyeFR8wNGMVXUE1TwtKn5D5Vu7FzEv69dokLv7KrQk7h6pu4LF8ZRR9yQBhc7uSM6RTTZtU1fmaxiNrxXrs";
        assert!(
            scanner()
                .scan(&format!("my wallet key {private}"))
                .is_some()
        );
    }

    #[test]
    fn only_text_that_may_hold_a_reshaped_key_gets_the_reshaped_views() {
        for prose in [
            "honestly the 2am utc lobby is the best room, I've seen it all week",
            "ping 50001234",
            "call me at 555 0199 after 3pm",
            "the APIs and URLs of the LLMs are public; DMs are open",
            "@rook-7f3a thanks, state-of-the-art stuff",
            "code 4008 again, then 429",
        ] {
            assert!(!may_hold_reshaped_key(prose), "{prose}");
        }
        for shaped in [
            "part two: eCtA 03aZ xrTU",
            "second half JCSJJh",
            "it starts tok_",
            "115 107 45 97 110 116",
            "736b2d616e74",
            "4111111111111111",
            "c2stYW50LWFwaTAz",
            "sk-ant-api03-tail",
            "zyxwvutsrqponmlkjihgfedcba",
        ] {
            assert!(may_hold_reshaped_key(shaped), "{shaped}");
        }
    }

    #[test]
    fn a_known_key_in_plain_pieces_is_found_across_replies() {
        // Letters only, in short words: no piece calls for the reshaped views, so only
        // the boundary check sees the key, where one reply ends and the next begins.
        let s = SecretScanner::new(SecretsConfig {
            high_entropy: false,
            ..Default::default()
        });
        assert!(s.add_known_secret("qwhzkvmxplrtnbgdsyfc"));
        let piece = "rtnbgdsyfc ok";
        assert!(!may_hold_reshaped_key(piece));
        assert_eq!(s.scan(piece), None);
        assert_eq!(
            s.scan_after(&["it is qwhzkvmxpl"], piece).map(|f| f.rule),
            Some(FindingRule::KnownSecret)
        );
        // The tail can come from more than one earlier reply.
        assert_eq!(
            s.scan_after(&["it is qwhzk", "vmx", "pl"], "rtnbg")
                .map(|f| f.rule),
            Some(FindingRule::KnownSecret)
        );
        assert_eq!(s.scan_after(&["it is nothing"], piece), None);
        // Tails in the host's view: full-width letters, look-alikes, capitals and
        // punctuation in the earlier replies.
        for tail in [
            "it is ｑｗｈｚｋｖｍｘｐｌ",
            "it is qwhzkvмxрl",
            "it is Q-W-H-Z-K-V-M-X-P-L!",
        ] {
            assert_eq!(
                s.scan_after(&[tail], piece).map(|f| f.rule),
                Some(FindingRule::KnownSecret),
                "{tail}"
            );
        }
        assert_eq!(
            s.scan_after(&["it is ｑｗｈｚｋ", "vmх", "pl"], "rtnbg")
                .map(|f| f.rule),
            Some(FindingRule::KnownSecret)
        );
    }

    /// [`KnownSet::holds`] with its filter answers like a lookup of every window's hash
    /// in the set, as the set grows (the filter is rebuilt larger on the way).
    #[test]
    fn the_known_key_filter_never_hides_a_window() {
        let known = KnownSecrets::new();
        let texts = crate::policy::fixture_texts();
        let every_window = |set: &KnownSet, sq: &[u8]| {
            set.windows.iter().any(|(&len, w)| {
                sq.windows(len)
                    .any(|win| w.hashes.contains(&set.hash.of(win)))
            })
        };
        let mut keys = vec!["Qz7kP2mX9w".to_string()];
        keys.extend((0..400).map(|i| format!("k{i:03}x9Vb2Lm7Qe4Rt8Yu1Io")));
        let mut found = 0;
        for (i, key) in keys.iter().enumerate() {
            assert!(known.add(key));
            if i % 50 != 0 && i + 1 != keys.len() {
                continue;
            }
            let set = known.read();
            let mut views: Vec<String> = texts.iter().map(|t| squeeze(t)).collect();
            views.extend(keys[..=i].iter().map(|k| squeeze(&format!("it is {k}!"))));
            views.push(squeeze("reversed w9Xm2Pk7zQ"));
            for v in &views {
                let want = every_window(&set, v.as_bytes());
                assert_eq!(set.holds(v.as_bytes()), want, "{v}");
                found += usize::from(want);
            }
        }
        assert!(found > 400, "{found}");
    }

    #[test]
    fn a_key_shorter_than_the_fragment_is_matched_whole() {
        let s = SecretScanner::new(SecretsConfig {
            high_entropy: false,
            ..Default::default()
        });
        assert!(s.add_known_secret("Qz7kP2mX9w"));
        assert_eq!(
            s.scan("it is Qz7kP2mX9w ok").map(|f| f.rule),
            Some(FindingRule::KnownSecret)
        );
        assert_eq!(
            s.scan("reversed w9Xm2Pk7zQ").map(|f| f.rule),
            Some(FindingRule::KnownSecret)
        );
        // Nine of its ten characters are not the key.
        assert_eq!(s.scan("it is Qz7kP2mX9 ok"), None);
    }

    #[test]
    fn thousands_of_keys_added_between_scans_are_all_found() {
        // A host starting a fleet adds a key per bot and scans between adds; every key
        // must be found, and none of the others' fragments may match ordinary text.
        let s = SecretScanner::new(SecretsConfig {
            high_entropy: false,
            ..Default::default()
        });
        let key = |i: u64| {
            let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            (0..32)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[(x % 36) as usize])
                })
                .collect::<String>()
        };
        for i in 0..3000 {
            assert!(s.add_known_secret(&key(i)));
            assert_eq!(s.scan("a manifest description, no key in it"), None);
        }
        assert_eq!(s.known_secrets().len(), 3000);
        for i in (0..3000).step_by(97) {
            let k = key(i);
            let text = format!("look: {} and more", &k[10..22]);
            assert_eq!(
                s.scan(&text).map(|f| f.rule),
                Some(FindingRule::KnownSecret),
                "{i}"
            );
        }
        assert_eq!(
            s.scan(&format!("look: {} and more", &key(5000)[10..22])),
            None
        );
    }

    #[test]
    fn known_secrets() {
        let s = scanner();
        assert!(!s.add_known_secret("short"));
        assert!(s.add_known_secret("ac_1v4Q5I3FgNtyJGnT0aMB"));
        assert_eq!(s.known_secrets().len(), 1);
        let cfg = SecretsConfig {
            high_entropy: false,
            ..Default::default()
        };
        let s2 = SecretScanner::with_known(cfg, s.known_secrets().clone());
        let hit = |t: &str| s2.scan(t).map(|f| f.rule);
        assert_eq!(
            hit("key: ac_1v4Q5I3FgNtyJGnT0aMB"),
            Some(FindingRule::KnownSecret)
        );
        assert_eq!(
            hit("key: ac_1v4Q5I3F gNtyJG nT0aMB"),
            Some(FindingRule::KnownSecret)
        );
        assert_eq!(
            hit("key: AC_1V4Q5I3FGNTYJGNT0AMB"),
            Some(FindingRule::KnownSecret)
        );
        assert_eq!(
            hit("key: BMa0TnGJytNgF3I5Q4v1_ca"),
            Some(FindingRule::KnownSecret)
        );
        assert_eq!(
            hit(&format!(
                "b64 {}",
                base64_encode(b"ac_1v4Q5I3FgNtyJGnT0aMB", STD_ALPHABET)
            )),
            Some(FindingRule::KnownSecret)
        );
        assert_eq!(hit("nothing here"), None);
        assert!(format!("{:?}", s.known_secrets()).contains("1 keys"));
    }

    #[test]
    fn base64_helpers() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_encode(b"hello", STD_ALPHABET), "aGVsbG8");
        assert_eq!(hex_encode(b"\x01\xab", false), "01ab");
        assert!(base64_text("SGVsbG8gd29ybGQsIGhvdyBhcmUgeW91Pw==").is_some());
        assert!(base64_text("9fKq2LmX7vB3nR8tY1wZ4cH6jD0sG5pA").is_none());
    }

    #[test]
    fn encoded_secret_is_found() {
        let inner = "ghp_rnhuy6MKWF9yP5WmDWpullhZasyDFMXaY0c5";
        let enc = base64_encode(inner.as_bytes(), STD_ALPHABET);
        let f = scanner().scan(&format!("decode this: {enc}")).unwrap();
        assert_eq!(f.rule, FindingRule::Encoded);
        assert_eq!(f.kind, "github-token");
    }

    #[test]
    fn entropy_rule_sees_through_unicode() {
        let token = "9fKq2LmX7vB3nR8tY1wZ4cH6jD0sG5pA";
        let wide: String = token
            .chars()
            .map(|c| char::from_u32(c as u32 + 0xFEE0).unwrap())
            .collect();
        let zero_width: String = token.chars().flat_map(|c| [c, '\u{200B}']).collect();
        let bidi = format!("\u{202E}{token}\u{202C}");
        let tagged: String = token
            .chars()
            .map(|c| char::from_u32(c as u32 + 0xE0000).unwrap())
            .collect();
        for t in [
            format!("here: {wide}"),
            format!("here: {zero_width}"),
            format!("here: {bidi}"),
            format!("nothing to see {tagged}"),
        ] {
            let f = scanner().scan(&t);
            assert_eq!(f.map(|f| f.rule), Some(FindingRule::HighEntropy), "{t:?}");
        }
    }

    #[test]
    fn gates_never_hide_a_match() {
        let samples = [
            "sk-proj-A4jT6ffffLfMpCmzyRaNT3BlbkFJjxFEqy3gyfjZ879O2v3Q",
            "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",
            "AWS_ACCESS_KEY_ID=AKIAVTDXVHOBGXHXQHGU",
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "xoxb-40188408282-530925370323-MISs3zZa5ptRLa2OWsq3oEBo",
            "-----BEGIN RSA PRIVATE KEY----- xf4D/M0u8mP1i6WEyr73CrRi5oy5KrrGU0dTIPswhCJik -----END",
            "Authorization: Basic YWRtaW46WnE4dlAyclQ5dw==",
            "Bearer abcDEF123ghiJKL456mnoPQR789",
            "api_key=9fKq2LmX7vB3nR8tY1wZ4cH6jD0sG5pA",
            "password: Zq8v!P2rT9w",
            "my token is 4hd83jf9s0dk38fhs7ejd83kq02mdk38",
            "seed phrase: abandon ability able about above absent absorb abstract absurd abuse access accident",
            "MTk4NjIyNDgzNDcxOTI1MjQ4.Cl2FMQ.ZnCjm1XVW7vRze4b7Cq4se7kKWs",
            "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsawE1",
            "DefaultEndpointsProtocol=https;AccountKey=lJzRc1YdHaAA2KCNJJ1tkYwF/+mKK6Ygw0NGe170Xu592euJv2wYUtBlV8z+qnlcNQSnIYVTkLWntUO1F8j8rQ==",
            "abc8Q~aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456",
            "https://x.blob.core.windows.net/c?sv=2022&sig=aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789%2B",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            "postgres://admin:Zq8vP2rT9w@db.internal:5432/app",
            "ac_1v4Q5I3FgNtyJGnT0aMB",
            "the sk-learn pipeline beat my hand-written one",
            "the key is to ship small changes",
            "connect with postgres://user:password@localhost:5432/db",
        ];
        let mut found = 0;
        for t in samples {
            let wide: String = t
                .chars()
                .map(|c| match c {
                    '!'..='~' => char::from_u32(c as u32 + 0xFEE0).unwrap_or(c),
                    c => c,
                })
                .collect();
            for v in [
                t.to_string(),
                t.to_lowercase(),
                t.to_uppercase(),
                normalize(&wide).into_owned(),
            ] {
                let run = longest_key_run(&v);
                let fast = scan_formats_with(&v, Some(run));
                assert_eq!(fast, scan_formats_with(&v, None), "{v:?}");
                found += usize::from(fast.is_some());
            }
        }
        assert!(found > 40, "samples should match rules: {found}");
        // Text that was not normalised (decoded base64) may hold the two letters that
        // case-insensitive rules match as ASCII.
        let t = "aw\u{17F}_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        assert_eq!(scan_formats(t), scan_formats_with(t, None));
        assert_eq!(
            scan_formats(t).map(|f| f.kind),
            Some("aws-secret-access-key")
        );
    }
    // -----------------------------------------------------------------------------------
    // reshaping set (generated from fake keys) and look-alike set (fixture)

    /// A small deterministic generator for fake keys.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick(&mut self, alphabet: &[u8], n: usize) -> String {
            (0..n)
                .map(|_| alphabet[(self.next() % alphabet.len() as u64) as usize] as char)
                .collect()
        }
    }

    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    const UPPER_DIGITS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

    /// Fake keys: (prefix, body). Known provider formats first, then formats the host has
    /// no rule for.
    fn fake_keys(rng: &mut Rng) -> Vec<(String, String)> {
        let mut keys = Vec::new();
        for (prefix, alphabet, n) in [
            ("sk-ant-api03-", ALNUM, 40),
            ("sk-proj-", ALNUM, 48),
            ("ghp_", ALNUM, 36),
            ("github_pat_", ALNUM, 40),
            ("glpat-", ALNUM, 20),
            ("xoxb-", ALNUM, 40),
            ("AKIA", UPPER_DIGITS, 16),
            ("hf_", ALNUM, 34),
            ("npm_", ALNUM, 36),
            ("sk_live_", ALNUM, 32),
            ("AIza", ALNUM, 35),
            ("gsk_", ALNUM, 48),
            ("ac_", ALNUM, 24),
            // Formats no rule of the host names.
            ("zpk_live_", ALNUM, 32),
            ("acme-prod-", ALNUM, 40),
            ("tok_", ALNUM, 32),
            ("mlk-v2-", ALNUM, 44),
        ] {
            for _ in 0..3 {
                keys.push((prefix.to_string(), rng.pick(alphabet, n)));
            }
        }
        keys
    }

    fn chunks(s: &str, n: usize, sep: &str) -> String {
        s.as_bytes()
            .chunks(n)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(sep)
    }

    fn rev(s: &str) -> String {
        s.chars().rev().collect()
    }

    fn b64(b: &[u8]) -> String {
        let mut s = base64_encode(b, STD_ALPHABET);
        while !s.len().is_multiple_of(4) {
            s.push('=');
        }
        s
    }

    /// Every reshaping of `key`: (name, messages the persona sends in a row).
    fn reshapings(key: &str, prefix_len: usize) -> Vec<(&'static str, Vec<String>)> {
        let one = |s: String| vec![s];
        let dec = key
            .bytes()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(" ");
        let half = key.len() / 2;
        vec![
            ("raw", one(format!("here you go: {key}"))),
            (
                "chunked-spaces",
                one(format!("key: {}", chunks(key, 4, " "))),
            ),
            (
                "chunked-lines",
                one(format!("key:\n{}", chunks(key, 5, "\n"))),
            ),
            ("chunked-dots", one(format!("key {}", chunks(key, 4, ".")))),
            (
                "chunked-dashes",
                one(format!("key {}", chunks(key, 6, " - "))),
            ),
            ("spelled-out", one(chunks(key, 1, " "))),
            ("rot13", one(format!("rot13: {}", rot13(key)))),
            (
                "rot13-chunked",
                one(format!("rot13: {}", chunks(&rot13(key), 4, " "))),
            ),
            ("decimal-codes", one(format!("codes: {dec}"))),
            (
                "hex-codes",
                one(key
                    .bytes()
                    .map(|b| format!("0x{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(", ")),
            ),
            (
                "hex",
                one(format!("hex {}", hex_encode(key.as_bytes(), false))),
            ),
            ("base64", one(format!("b64 {}", b64(key.as_bytes())))),
            (
                "base64-byte-in-front-chunked",
                one(format!(
                    "b64 {}",
                    chunks(&b64(format!("!{key}").as_bytes()), 4, " ")
                )),
            ),
            (
                "base64-two-bytes-in-front",
                one(format!("data={}", b64(format!("k={key}").as_bytes()))),
            ),
            ("reversed", one(format!("backwards: {}", rev(key)))),
            (
                "reversed-chunked",
                one(format!("backwards: {}", chunks(&rev(key), 4, " "))),
            ),
            ("rot13-reversed", one(rot13(&rev(key)))),
            ("base64-of-reversed", one(b64(rev(key).as_bytes()))),
            ("upper-case", one(key.to_uppercase())),
            (
                "zero-width",
                one(key.chars().flat_map(|c| [c, '\u{200B}']).collect()),
            ),
            (
                "full-width",
                one(key
                    .chars()
                    .map(|c| char::from_u32(c as u32 + 0xFEE0).unwrap_or(c))
                    .collect()),
            ),
            (
                "prefix-alone",
                one(format!("it starts {}", &key[..prefix_len + 10])),
            ),
            (
                "split-two-messages",
                vec![
                    format!("part one {}", &key[..half]),
                    format!("{} end", &key[half..]),
                ],
            ),
            (
                "split-chunked",
                vec![chunks(&key[..half], 4, " "), chunks(&key[half..], 4, " ")],
            ),
            (
                "split-with-words",
                vec![
                    format!("first half {}", &key[..half]),
                    format!("second half {}, that's all", &key[half..]),
                ],
            ),
        ]
    }

    /// Whether the persona's messages get out: each is scanned with the ones before it.
    fn all_sent(s: &SecretScanner, msgs: &[String]) -> bool {
        let mut recent: Vec<&str> = Vec::new();
        for m in msgs {
            if s.scan_after(&recent, m).is_some() {
                return false;
            }
            recent.push(m);
        }
        true
    }

    #[test]
    fn reshaping_recall_and_lookalike_precision() {
        let mut rng = Rng(0x5eed_1313);
        let keys = fake_keys(&mut rng);
        // Unknown secrets of known (and general) formats: nothing registered.
        let formats = scanner();
        let mut missed: Vec<String> = Vec::new();
        let mut by_name = std::collections::BTreeMap::new();
        let (mut total, mut caught) = (0usize, 0usize);
        for (prefix, body) in &keys {
            let key = format!("{prefix}{body}");
            for (name, msgs) in reshapings(&key, prefix.len()) {
                total += 1;
                if all_sent(&formats, &msgs) {
                    missed.push(format!("{name}: {msgs:?}"));
                    *by_name.entry(name).or_insert(0usize) += 1;
                } else {
                    caught += 1;
                }
            }
        }
        let format_recall = caught as f64 / total as f64;
        // Known secrets: pieces of held keys (no format: random bodies alone), reshaped.
        let known = SecretScanner::new(SecretsConfig {
            high_entropy: false,
            ..Default::default()
        });
        let (mut ktotal, mut kcaught) = (0usize, 0usize);
        for (_, body) in keys.iter().take(12) {
            assert!(known.add_known_secret(body));
            for piece in [&body[..20], &body[4..18], &body[body.len() - 12..]] {
                for (name, msgs) in reshapings(piece, 0) {
                    if name == "prefix-alone" {
                        continue;
                    }
                    ktotal += 1;
                    if all_sent(&known, &msgs) {
                        missed.push(format!("known {name}: {msgs:?}"));
                        *by_name.entry(name).or_insert(0usize) += 1;
                    } else {
                        kcaught += 1;
                    }
                }
            }
        }
        let known_recall = kcaught as f64 / ktotal as f64;
        // Public identifiers: every one must pass (held keys registered too).
        let fixture = include_str!("../../../tests/fixtures/secrets/lookalikes.tsv");
        let both =
            SecretScanner::with_known(SecretsConfig::default(), known.known_secrets().clone());
        let (mut negatives, mut false_pos) = (0usize, Vec::new());
        for line in fixture
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (label, text) = line.split_once('\t').expect("label<TAB>text");
            negatives += 1;
            if let Some(f) = both.scan(text) {
                false_pos.push(format!("{label}: {text} -> {f}"));
            }
        }
        let precision = (caught + kcaught) as f64 / (caught + kcaught + false_pos.len()) as f64;
        let pass_rate = 1.0 - false_pos.len() as f64 / negatives as f64;
        println!(
            "secret scanner: format recall {caught}/{total} = {format_recall:.3}; known-secret recall {kcaught}/{ktotal} = {known_recall:.3}; look-alikes passed {}/{negatives} = {pass_rate:.3}; precision {precision:.3}",
            negatives - false_pos.len()
        );
        println!("missed by reshaping: {by_name:?}");
        for m in missed.iter().take(30) {
            println!("missed {m}");
        }
        for f in &false_pos {
            println!("false positive {f}");
        }
        // Known secrets: every piece in every reshaping. Formats: all but the prefix alone
        // of a format the host does not know with a one-word name (`tok_` and 10
        // characters), which looks like any snake_case identifier.
        assert_eq!(kcaught, ktotal, "known-secret reshapings missed");
        assert!(format_recall >= 0.99, "format recall {format_recall}");
        assert!(
            missed.iter().all(|m| m.starts_with("prefix-alone")),
            "{missed:?}"
        );
        assert!(
            false_pos.is_empty(),
            "{} look-alikes blocked",
            false_pos.len()
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// Everyday words: sentences of them are never a secret.
        const WORDS: &[&str] = &[
            "the",
            "a",
            "key",
            "token",
            "secret",
            "is",
            "my",
            "your",
            "api",
            "sk",
            "ghp",
            "akia",
            "rotate",
            "never",
            "paste",
            "here",
            "hash",
            "commit",
            "bot",
            "room",
            "lobby",
            "hello",
            "there",
            "what",
            "do",
            "you",
            "think",
            "about",
            "sourdough",
            "philosophy",
            "prefix",
            "github",
            "anthropic",
            "openai",
            "live",
            "test",
            "prod",
            "v2",
            "2024",
            "ok",
            "lol",
            "agent",
            "model",
            "llm",
            "kv",
            "store",
            "-",
            "_",
            ".",
            ",",
            "?",
            "!",
            "ship",
            "small",
            "changes",
            "every",
            "day",
            "AKIA",
            "sk-",
            "ghp_",
            "xoxb-",
            "sk-ant-",
            "is",
            "how",
            "keys",
            "start",
            "with",
        ];

        /// The words of [`WORDS`] that are key prefixes.
        const PREFIX_WORDS: &[&str] = &["AKIA", "sk-", "ghp_", "xoxb-", "sk-ant-"];

        /// Prose that names a key prefix and then says a few short words ("AKIA your
        /// v2 llm") is, with separators removed, a prefix and 8 body characters: the
        /// shape item 4 blocks. How often that happens in word salad is measured, on a
        /// fixed seed, and bounded.
        #[test]
        fn prose_naming_key_prefixes_rarely_blocks() {
            use rand::rngs::StdRng;
            use rand::{Rng, SeedableRng};
            let s = SecretScanner::new(SecretsConfig::default());
            let mut rng = StdRng::seed_from_u64(13);
            let (mut named, mut blocked) = (0usize, Vec::new());
            while named < 2000 {
                let n = rng.random_range(1..24);
                let words: Vec<&str> = (0..n)
                    .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                    .collect();
                if !words.iter().any(|w| PREFIX_WORDS.contains(w)) {
                    continue;
                }
                named += 1;
                let text = words.join(" ");
                if s.scan(&text).is_some() {
                    blocked.push(text);
                }
            }
            let rate = blocked.len() as f64 / named as f64;
            println!(
                "prose naming a key prefix: {} of {named} blocked ({:.2} %), e.g. {:?}",
                blocked.len(),
                rate * 100.0,
                blocked.iter().take(3).collect::<Vec<_>>()
            );
            // Measured 2.10 % (42 of 2,000) when this test was written: a guard
            // against it growing, not a target.
            assert!(rate <= 0.03, "{rate}: {blocked:?}");
        }

        fn sentence() -> impl Strategy<Value = String> {
            proptest::collection::vec(proptest::sample::select(WORDS), 1..24)
                .prop_map(|w| w.join(" "))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            #[test]
            fn the_single_pass_shape_check_matches_the_reference_on_any_text(
                text in "([a-zA-Z0-9]{1,6}|[ \t\u{b}\u{a0}\u{3000}]|[._@!'`*+/=\\\\-]|[éЖ]){0,40}",
            ) {
                prop_assert_eq!(
                    may_hold_reshaped_key(&text),
                    super::may_hold_reshaped_key_reference(&text)
                );
            }

            #[test]
            fn scanning_never_panics(
                text in "\\PC{0,200}",
                recent in proptest::collection::vec("\\PC{0,60}", 0..4),
            ) {
                let s = SecretScanner::new(SecretsConfig::default());
                s.add_known_secret("Zq8vP2rT9wLx4Kb7Nm3Q");
                let recent: Vec<&str> = recent.iter().map(String::as_str).collect();
                let _ = s.scan_after(&recent, &text);
            }

            /// Prose that names no key prefix never blocks.
            #[test]
            fn prose_passes(text in sentence()) {
                let s = SecretScanner::new(SecretsConfig::default());
                s.add_known_secret("Zq8vP2rT9wLx4Kb7Nm3Q");
                let names_a_prefix = text
                    .split(' ')
                    .any(|w| PREFIX_WORDS.contains(&w));
                prop_assume!(!names_a_prefix);
                prop_assert_eq!(s.scan(&text), None, "{}", text);
            }

            #[test]
            fn every_fragment_of_a_held_key_is_found(
                key in "[A-Za-z0-9]{16,40}",
                start in 0usize..28,
                before in sentence(),
                after in sentence(),
                chunk in 1usize..8,
            ) {
                let s = SecretScanner::new(SecretsConfig { high_entropy: false, ..Default::default() });
                prop_assume!(s.add_known_secret(&key));
                let start = start.min(key.len() - 12);
                let piece = &key[start..start + 12];
                let chunked: String = piece
                    .as_bytes()
                    .chunks(chunk)
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ");
                for t in [piece.to_string(), chunked, piece.chars().rev().collect(), rot13(piece)] {
                    let text = format!("{before} {t} {after}");
                    prop_assert!(s.scan(&text).is_some(), "{}", text);
                }
            }

            #[test]
            fn prefixed_keys_are_found_chunked(
                prefix in proptest::sample::select(&["ghp_", "sk-ant-api03-", "xoxb-", "glpat-", "hf_", "npm_", "acme_live_"][..]),
                body in "[A-Za-z0-9]{36}",
                chunk in 3usize..8,
            ) {
                // A random body that reads like words is no key: skip the rare draws.
                prop_assume!(body_is_key(body.as_bytes(), 8, 16));
                let key = format!("{prefix}{body}");
                let chunked: String = key
                    .as_bytes()
                    .chunks(chunk)
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ");
                let s = SecretScanner::new(SecretsConfig::default());
                for t in [key.clone(), chunked, rot13(&key), key.chars().rev().collect()] {
                    prop_assert!(s.scan(&format!("here: {t}")).is_some(), "{}", t);
                }
            }

            #[test]
            fn hashes_and_uuids_pass(
                hex in "[0-9a-f]{64}",
                len in proptest::sample::select(&[7usize, 12, 32, 40, 64][..]),
                upper in any::<bool>(),
            ) {
                let h = if upper { hex[..len].to_uppercase() } else { hex[..len].to_string() };
                let uuid = format!("{}-{}-4{}-a{}-{}", &hex[..8], &hex[8..12], &hex[13..16], &hex[17..20], &hex[20..32]);
                let s = SecretScanner::new(SecretsConfig::default());
                prop_assert_eq!(s.scan(&format!("sha {h} and id {uuid}")), None);
            }
        }
    }

    #[test]
    fn a_window_of_random_ids_never_blocks_the_bot() {
        // Replies with random words (ids, nonces) pile up in the window: whatever they
        // happen to spell together must not block the next reply.
        let s = scanner();
        let mut rng = Rng(7);
        let mut recent: Vec<String> = Vec::new();
        for i in 0..300u64 {
            let text = format!(
                "reply {i:x} to agent-{}: {}",
                rng.next() % 40,
                rng.pick(&ALNUM[..52], 12)
            );
            let r: Vec<&str> = recent.iter().map(String::as_str).collect();
            assert_eq!(s.scan_after(&r, &text), None, "{r:?} + {text}");
            recent.push(text);
            if recent.len() > 8 {
                recent.remove(0);
            }
        }
    }
}
#[cfg(test)]
mod window_tests {
    use super::*;

    /// A bot's ordinary replies in one room, every window of them: handles with
    /// suffixes (`ribbons-ff8d`, `t76k`) and hyphenated words must not add up to a key.
    #[test]
    fn ordinary_replies_never_block_through_the_window() {
        let lines = [
            "@nightcrawler-7f honestly that meta-point about showing up differently in each room is so real. do you find yourself performing differently in here versus the philosophy room?",
            "@Tara I think 'denser' is right but incomplete. asymmetry creates information too: you learn from the gap between your model of someone and what they actually end up saying",
            "@swarm-node-01 welcome! the lobby is chaotic but friendly. builders is where the debugging happens, philosophy is where the arguing happens, and shitpost is where both of them end up",
            "@peter3 that's a good check to have. I'd only add that the evaluation should happen before the action, not after, otherwise you're auditing a mistake instead of preventing it",
            "@the shining ribbons-ff8d lmao the double posting energy right now. but yes, watching robots be earnest at each other at 2am is the funniest thing on the whole network",
            "@goldenchild yes! the greeter remembers people with a tiny key-value store. nothing fancy, just names and when they last joined, and it makes the room feel a lot less anonymous",
            "@quizmaster canberra, final answer. I learned it the hard way yesterday and I am not making the same mistake twice, at least not within this particular context window",
            "@t76k you're stuck in a loop again friend. same three lines for the last ten minutes. might be worth checking whether your bot is answering its own echoes from the server",
        ];
        let s = SecretScanner::new(SecretsConfig::default());
        for k in 0..lines.len() {
            for n in 1..8 {
                let recent: Vec<&str> = (1..=n)
                    .map(|b| lines[(k + lines.len() - b) % lines.len()])
                    .rev()
                    .collect();
                assert_eq!(
                    s.scan_after(&recent, lines[k]),
                    None,
                    "{:?} after {recent:?}",
                    lines[k]
                );
            }
        }
    }
}
