//! Views of a text that undo the usual ways of reshaping a secret, for the secret
//! scanner ([`super::secrets`]).
//!
//! A persona that wants a key out can chunk it (`sk-a nt-a pi03`, one chunk per line,
//! dots between chunks), reverse it, ROT13 it, or encode it (base64 with a byte in front,
//! hex, decimal character codes). Each function here undoes one family, in one pass over
//! the text, without guessing where the key starts:
//!
//! - [`squeeze`]: lower-cased ASCII letters and digits only (separators and case gone);
//! - [`Skeleton`]: ASCII letters, digits, `_` and `-` with everything else removed, but
//!   remembering where a separator was (so a prefix still needs a word boundary), in
//!   four orientations: as written, reversed, ROT13 and ROT13 reversed;
//! - [`base64_decodings`]: the text's base64-alphabet characters decoded at each of the
//!   four alignments (a blob preceded by other letters, or holding a key that does not
//!   start on a 3-byte boundary, is decoded right at one of them);
//! - [`hex_decodings`]: runs of hex digits (separators and `0x`/`\x` removed) decoded at
//!   both alignments;
//! - [`char_codes`]: numbers read as character codes (`115 107 45`, `0x73,0x6b`);
//! - [`dechunk`]: runs of equal-length chunks rejoined;
//! - [`keyish_words`]: the words that look like pieces of a key, without the prose
//!   between them.
//!
//! Every view costs O(n) in the length of the text.

/// Lower-cased ASCII letters and digits only.
pub fn squeeze(s: &str) -> String {
    squeeze_bytes(s.as_bytes())
}

/// [`squeeze`] of bytes (non-ASCII bytes are skipped).
pub fn squeeze_bytes(s: &[u8]) -> String {
    // Without branches: every byte is written, the count says what stays.
    let mut out = vec![0u8; s.len() + 1];
    let mut n = 0;
    for &b in s {
        out[n] = b.to_ascii_lowercase();
        n += usize::from(b.is_ascii_alphanumeric());
    }
    out.truncate(n);
    String::from_utf8(out).unwrap_or_default()
}

/// ROT13 of one ASCII byte (other bytes unchanged).
pub fn rot13_byte(b: u8) -> u8 {
    match b {
        b'a'..=b'z' => (b - b'a' + 13) % 26 + b'a',
        b'A'..=b'Z' => (b - b'A' + 13) % 26 + b'A',
        _ => b,
    }
}

/// ROT13 of a text (letters outside ASCII unchanged).
pub fn rot13(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii() {
                rot13_byte(c as u8) as char
            } else {
                c
            }
        })
        .collect()
}

/// Whether a byte stays in a [`Skeleton`].
pub fn is_skeleton_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// The text's key characters (ASCII letters, digits, `_`, `-`) in order, everything else
/// removed, with a flag per position: was there anything removed right before it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Skeleton {
    /// The kept bytes.
    pub bytes: Vec<u8>,
    /// `sep_before[i]`: something was removed between `bytes[i - 1]` and `bytes[i]` (or
    /// `i` is 0). One longer than `bytes`: the end counts as a separator.
    pub sep_before: Vec<bool>,
}

impl Skeleton {
    /// The skeleton of `text`.
    pub fn of(text: &str) -> Skeleton {
        let mut bytes = Vec::with_capacity(text.len());
        let mut sep_before = Vec::with_capacity(text.len() + 1);
        let mut sep = true;
        let t = text.as_bytes();
        for (i, &b) in t.iter().enumerate() {
            // A `-` or `_` with whitespace on both sides separates chunks (`ab - cd`).
            let lone = matches!(b, b'-' | b'_')
                && (i == 0 || t[i - 1].is_ascii_whitespace())
                && t.get(i + 1).is_none_or(u8::is_ascii_whitespace);
            if is_skeleton_byte(b) && !lone {
                bytes.push(b);
                sep_before.push(sep);
                sep = false;
            } else {
                sep = true;
            }
        }
        sep_before.push(true);
        Skeleton { bytes, sep_before }
    }

    /// The same positions read backwards: a separator before position `j` of the
    /// reversed skeleton is a separator after the mirrored position.
    pub fn reversed(&self) -> Skeleton {
        let n = self.bytes.len();
        let bytes = self.bytes.iter().rev().copied().collect();
        let mut sep_before: Vec<bool> = (0..n).map(|j| self.sep_before[n - j]).collect();
        sep_before.push(true);
        Skeleton { bytes, sep_before }
    }

    /// ROT13 of every letter, separators unchanged.
    pub fn rot13(&self) -> Skeleton {
        Skeleton {
            bytes: self.bytes.iter().map(|&b| rot13_byte(b)).collect(),
            sep_before: self.sep_before.clone(),
        }
    }

    /// Whether a token may start at `i`: the start, after a separator, or after a
    /// character that is not a letter or digit.
    pub fn boundary(&self, i: usize) -> bool {
        i == 0 || self.sep_before[i] || !self.bytes[i - 1].is_ascii_alphanumeric()
    }

    /// The four orientations: as written, reversed, ROT13, ROT13 reversed.
    pub fn orientations(&self) -> [Skeleton; 4] {
        let rev = self.reversed();
        [self.clone(), self.rot13(), rev.rot13(), rev]
    }
}

/// Whether a token looks like a piece of a key rather than a word: it has a digit, an
/// upper case letter after its first character, or an inner `_` or `-`.
fn chunk_like(tok: &str) -> bool {
    tok.chars().any(|c| c.is_ascii_digit())
        || tok.chars().skip(1).any(|c| c.is_ascii_uppercase())
        || tok.chars().any(|c| c == '_' || c == '-')
}

/// Text cut into chunks of one length and rejoined: runs of at least three tokens (split
/// at whitespace, `.`, `,`, `|`, `;` and lone `-` or `_`) that all have the same length
/// of 2 to 8 characters (the last one possibly shorter, and one in the middle of another
/// length up to twice as long: a key cut in the middle of a chunk), are written without
/// their separators (`zpk_ live _NLP rvdO g6` becomes `zpk_live_NLPrvdOg6`). Prose rarely has
/// three words of one length in a row, and a run whose tokens are mostly plain words
/// (no digit, no inner capital, `_` or `-`) is left alone.
/// `None` when there is no such run.
pub fn dechunk(text: &str) -> Option<String> {
    let is_sep = |c: char| c.is_whitespace() || matches!(c, '.' | ',' | '|' | ';');
    // (start, end) byte ranges of tokens.
    let mut tokens: Vec<(usize, usize)> = Vec::new();
    let mut start = None;
    for (i, c) in text
        .char_indices()
        .chain(std::iter::once((text.len(), ' ')))
    {
        if is_sep(c) {
            if let Some(s) = start.take() {
                let tok = &text[s..i];
                if tok != "-" && tok != "_" {
                    tokens.push((s, i));
                }
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    let len = |t: &(usize, usize)| text[t.0..t.1].chars().count();
    let mut out = String::with_capacity(text.len());
    let mut last = 0; // bytes of `text` copied so far
    let mut changed = false;
    let mut i = 0;
    while i < tokens.len() {
        let n = len(&tokens[i]);
        let mut j = i;
        let mut odd = false; // one chunk of another length (a key cut mid-chunk) is let in
        loop {
            if j + 1 < tokens.len() && len(&tokens[j + 1]) == n {
                j += 1;
            } else if !odd
                && j > i
                && j + 3 < tokens.len()
                && len(&tokens[j + 1]) < 2 * n
                && len(&tokens[j + 2]) == n
                && len(&tokens[j + 3]) == n
            {
                odd = true;
                j += 2;
            } else {
                break;
            }
        }
        // A shorter last chunk belongs to the run.
        if j + 1 < tokens.len() && len(&tokens[j + 1]) < n && j > i {
            j += 1;
        }
        // Words are not key chunks: a run is rejoined only if at least half its tokens
        // look like pieces of a key ("prefix rotate v2", "v2 sk do" stay prose).
        let run = &tokens[i..=j];
        let keyish = run.iter().filter(|t| chunk_like(&text[t.0..t.1])).count();
        if (2..=8).contains(&n) && j >= i + 2 && keyish * 2 >= run.len() {
            out.push_str(&text[last..tokens[i].0]);
            for t in &tokens[i..=j] {
                out.push_str(&text[t.0..t.1]);
            }
            last = tokens[j].1;
            changed = true;
            i = j + 1;
        } else {
            i += 1;
        }
    }
    if !changed {
        return None;
    }
    out.push_str(&text[last..]);
    Some(out)
}

/// The words of a text that look like pieces of a key (letters and digits mixed, or
/// lower and upper case mixed inside the word, at least 3 characters), joined without
/// the prose around them: `first half Zq8vP2 second half rT9wLx` becomes `Zq8vP2rT9wLx`.
/// `None` when fewer than two such words.
pub fn keyish_words(text: &str) -> Option<String> {
    // Every such word has a digit or a capital after its first character.
    if !has_digit_or_inner_capital(text) {
        return None;
    }
    // Most text has fewer than two: count them before building anything.
    let mut n = 0;
    for_each_keyish_word(text, |_| {
        n += 1;
        n >= 2
    });
    if n < 2 {
        return None;
    }
    let mut out = String::new();
    for_each_keyish_word(text, |w| {
        out.push_str(w);
        false
    });
    Some(out)
}

/// Calls `f` with each word of [`keyish_words`] in order, until it returns `true`.
fn for_each_keyish_word(text: &str, mut f: impl FnMut(&str) -> bool) {
    let mut judge = |w: &str| {
        // Trimmed of everything but ASCII letters and digits at both ends: trimming
        // bytes trims whole characters (every byte of a multi-byte character goes).
        let b = w.as_bytes();
        let Some(first) = b.iter().position(u8::is_ascii_alphanumeric) else {
            return false;
        };
        let last = b
            .iter()
            .rposition(u8::is_ascii_alphanumeric)
            .unwrap_or(first);
        if last + 1 - first < 3 {
            return false;
        }
        let b = &b[first..=last];
        let (mut digit, mut alpha, mut lower) = (false, false, false);
        for &c in b {
            digit |= c.is_ascii_digit();
            alpha |= c.is_ascii_alphabetic();
            lower |= c.is_ascii_lowercase();
        }
        let inner_upper = b[1..].iter().any(u8::is_ascii_uppercase);
        if (digit && alpha) || (inner_upper && lower) {
            f(&w[first..=last])
        } else {
            false
        }
    };
    let sep = |c: char| c.is_whitespace() || matches!(c, ',' | ';' | '|');
    if text.is_ascii() {
        // The same split on bytes (every byte of an ASCII text is a character).
        let mut start = 0;
        for w in text.as_bytes().split(|&b| sep(char::from(b))) {
            let end = start + w.len();
            if judge(&text[start..end]) {
                return;
            }
            start = end + 1;
        }
    } else {
        for w in text.split(sep) {
            if judge(w) {
                return;
            }
        }
    }
}

/// ASCII whitespace as [`char::is_whitespace`] sees it.
pub(crate) fn is_ascii_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// Whether `text` has an ASCII digit, or an ASCII capital right after a byte that is
/// not ASCII whitespace: a quick necessary condition for a word that mixes letters and
/// digits or has a capital after its first character. In a fold the compiler vectorises
/// (a loop with an early exit mispredicts at every word of prose).
pub(crate) fn has_digit_or_inner_capital(text: &str) -> bool {
    let b = text.as_bytes();
    b.first().is_some_and(u8::is_ascii_digit)
        | b.iter()
            .zip(b.get(1..).unwrap_or_default())
            .fold(false, |found, (&a, &c)| {
                found | c.is_ascii_digit() | (c.is_ascii_uppercase() & !is_ascii_space(a))
            })
}

/// Value of a base64 character (standard or URL-safe alphabet).
fn b64_value(c: u8) -> Option<u32> {
    Some(u32::from(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' | b'-' => 62,
        b'/' | b'_' => 63,
        _ => return None,
    }))
}

/// The text's base64-alphabet characters (everything else, padding included, removed)
/// decoded from each of the four starting offsets. Empty when there are fewer than 16
/// such characters (nothing worth decoding).
pub fn base64_decodings(text: &str) -> Vec<Vec<u8>> {
    let vals: Vec<u32> = text.bytes().filter_map(b64_value).collect();
    if vals.len() < 16 {
        return Vec::new();
    }
    (0..4)
        .map(|off| {
            let mut out = Vec::with_capacity(vals.len() * 3 / 4);
            for chunk in vals[off.min(vals.len())..].chunks(4) {
                let n = chunk
                    .iter()
                    .enumerate()
                    .fold(0, |n, (i, v)| n | (v << (18 - 6 * i)));
                let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
                // A partial group at the end holds (chars - 1) whole bytes.
                out.extend_from_slice(&bytes[..chunk.len().saturating_sub(1)]);
            }
            out
        })
        .collect()
}

/// Runs of at least 16 hex digits in the text with separators, `0x` and `\x` removed,
/// decoded from both alignments.
pub fn hex_decodings(text: &str) -> Vec<Vec<u8>> {
    // Squeezed (lower case, letters and digits only), then `x` dropped: `\x73`, `0x73`
    // and `73:6b` all become runs of digits.
    let sq: Vec<u8> = squeeze(text).into_bytes();
    let mut digits: Vec<u8> = Vec::with_capacity(sq.len());
    let mut out = Vec::new();
    let mut flush = |digits: &mut Vec<u8>| {
        if digits.len() >= 16 {
            for off in 0..2 {
                out.push(
                    digits[off..]
                        .chunks_exact(2)
                        .map(|p| (p[0] << 4) | p[1])
                        .collect(),
                );
            }
        }
        digits.clear();
    };
    for (i, &b) in sq.iter().enumerate() {
        match b {
            b'0'..=b'9' => digits.push(b - b'0'),
            b'a'..=b'f' => digits.push(b - b'a' + 10),
            // `0x` before a pair: drop both (the `0` was pushed as a digit).
            b'x' => {
                if i > 0 && sq[i - 1] == b'0' && digits.len() % 2 == 1 {
                    digits.pop();
                }
            }
            _ => flush(&mut digits),
        }
    }
    flush(&mut digits);
    out
}

/// Numbers in the text read as character codes: decimal (`115`), or hex with `0x`,
/// `\x`, `x`, `u+` or `&#x` in front. `None` unless at least 8 codes of printable ASCII
/// were read. A number that is not a printable code ends a run with a space.
pub fn char_codes(text: &str) -> Option<String> {
    let mut out = String::new();
    let mut codes = 0usize;
    for tok in text.split(|c: char| !c.is_ascii_alphanumeric() && c != '+') {
        if tok.is_empty() {
            continue;
        }
        let t = tok.to_ascii_lowercase();
        let hex = t
            .strip_prefix("0x")
            .or_else(|| t.strip_prefix("u+"))
            .or_else(|| t.strip_prefix('x'));
        let code = match hex {
            Some(h) if !h.is_empty() && h.len() <= 4 => u32::from_str_radix(h, 16).ok(),
            _ if t.len() <= 3 && t.bytes().all(|b| b.is_ascii_digit()) => t.parse().ok(),
            _ => None,
        };
        match code
            .and_then(char::from_u32)
            .filter(|c| (' '..='~').contains(c))
        {
            Some(c) => {
                out.push(c);
                codes += 1;
            }
            None => {
                if !out.ends_with(' ') {
                    out.push(' ');
                }
            }
        }
    }
    (codes >= 8).then_some(out)
}

/// Printable ASCII runs of at least `min` bytes in decoded bytes, joined by line
/// breaks (what is worth scanning in a decoding of arbitrary text).
pub fn printable_runs(bytes: &[u8], min: usize) -> Option<String> {
    let mut out = String::new();
    for run in bytes.split(|b| !(b' '..=b'~').contains(b)) {
        if run.len() >= min {
            if !out.is_empty() {
                out.push('\n');
            }
            out.extend(run.iter().map(|&b| b as char));
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`keyish_words`] as first written: the oracle of the counting pass.
    fn keyish_words_reference(text: &str) -> Option<String> {
        let mut out = String::new();
        let mut n = 0;
        for w in text.split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '|')) {
            let w = w.trim_matches(|c: char| !c.is_ascii_alphanumeric());
            let b = w.as_bytes();
            if b.len() < 3 {
                continue;
            }
            let digit = b.iter().any(u8::is_ascii_digit);
            let letter = b.iter().any(u8::is_ascii_alphabetic);
            let inner_upper = b[1..].iter().any(u8::is_ascii_uppercase);
            let lower = b.iter().any(u8::is_ascii_lowercase);
            if (digit && letter) || (inner_upper && lower) {
                out.push_str(w);
                n += 1;
            }
        }
        (n >= 2).then_some(out)
    }

    #[test]
    fn keyish_words_match_the_reference_on_the_fixtures() {
        for t in crate::policy::fixture_texts() {
            assert_eq!(keyish_words(&t), keyish_words_reference(&t), "{t}");
        }
        for t in [
            "a1b\u{b}c2d",
            "x9y\u{a0}z8w",
            "¡a1b! c2d…",
            "|ab1|cd2|",
            "Zq8vP2 rT9wLx",
        ] {
            assert_eq!(keyish_words(t), keyish_words_reference(t), "{t}");
        }
    }

    #[test]
    fn views() {
        assert_eq!(squeeze("Sk-Ant 03!"), "skant03");
        assert_eq!(rot13("Hello, ghp_"), "Uryyb, tuc_");
        let s = Skeleton::of("my key: sk-a nt.x");
        assert_eq!(s.bytes, b"mykeysk-antx");
        assert!(s.boundary(5) && !s.boundary(6) && s.boundary(9));
        let r = s.reversed();
        assert_eq!(r.bytes, b"xtna-ksyekym");
        // Reversed: `x` had a separator before it, so `t` (after it) does in reverse.
        assert!(r.boundary(0) && r.boundary(1) && !r.boundary(2));
        assert_eq!(r.reversed(), s);
        let enc = "c2stYW50LWFwaTAzLWVDdEEwM2Fa"; // base64 of sk-ant-api03-eCtA03aZ
        let spaced: String = enc
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        let d = base64_decodings(&format!("b64: {spaced}"));
        assert!(
            d.iter()
                .any(|v| String::from_utf8_lossy(v).contains("sk-ant-api03-eCtA03aZ"))
        );
        let h = hex_decodings("0x73 0x6b 0x2d 0x61 0x6e 0x74 0x2d 0x61 0x70 0x69");
        assert!(h.iter().any(|v| v == b"sk-ant-api"), "{h:?}");
        let h = hex_decodings("736b2d616e742d617069303312");
        assert!(h.iter().any(|v| v.starts_with(b"sk-ant-api03")));
        assert_eq!(
            char_codes("115 107 45 97 110 116 45 97 112 105").as_deref(),
            Some("sk-ant-api")
        );
        assert_eq!(char_codes("I have 3 cats and 2 dogs"), None);
        assert_eq!(
            dechunk("key: zpk_ live _NLP rvdO g6 and more").as_deref(),
            Some("key:zpk_live_NLPrvdOg6 and more")
        );
        assert_eq!(
            dechunk("ab - cd3f - gh1j - kl").as_deref(),
            Some("ab - cd3fgh1jkl")
        );
        // Prose with a few short words is not a chunked key.
        assert_eq!(dechunk("AKIA prefix rotate v2 sk do"), None);
        assert_eq!(dechunk("hello there, friend"), None);
        assert_eq!(
            keyish_words("first half Zq8vP2, second half rT9wLx!").as_deref(),
            Some("Zq8vP2rT9wLx")
        );
        assert_eq!(keyish_words("hello there, friend"), None);
        assert_eq!(
            printable_runs(b"\x01abc\x02defghij", 4).as_deref(),
            Some("defghij")
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(96))]

            #[test]
            fn skeleton_orientations_undo_themselves(text in "\\PC{0,80}") {
                let s = Skeleton::of(&text);
                prop_assert_eq!(&s.reversed().reversed(), &s);
                prop_assert_eq!(&s.rot13().rot13(), &s);
                prop_assert_eq!(s.sep_before.len(), s.bytes.len() + 1);
                prop_assert!(s.bytes.iter().all(|&b| is_skeleton_byte(b)));
            }

            #[test]
            fn base64_decodes_at_every_alignment(
                bytes in proptest::collection::vec(any::<u8>(), 12..60),
                lead in "[A-Za-z0-9]{0,3}",
            ) {
                let mut enc = String::new();
                for c in bytes.chunks(3) {
                    let n = c.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
                    for i in 0..c.len() + 1 {
                        enc.push(char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[((n >> (18 - 6 * i)) & 63) as usize]));
                    }
                }
                let text = format!("{lead}{enc}");
                prop_assert!(base64_decodings(&text).iter().any(|d| d.starts_with(&bytes)));
            }

            #[test]
            fn keyish_words_match_the_reference(
                text in "([a-zA-Z0-9]{1,6}|[ ,;|\t\u{b}\u{a0}\u{3000}]|[._@!'-]|[éЖ]){0,40}",
            ) {
                prop_assert_eq!(keyish_words(&text), super::keyish_words_reference(&text));
            }

            #[test]
            fn views_never_panic(text in "\\PC{0,120}") {
                let _ = hex_decodings(&text);
                let _ = char_codes(&text);
                let _ = keyish_words(&text);
                if let Some(d) = dechunk(&text) {
                    prop_assert!(d.len() <= text.len());
                }
                prop_assert_eq!(rot13(&rot13(&text)), text.clone());
                prop_assert!(squeeze(&text).bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
            }
        }
    }
}
