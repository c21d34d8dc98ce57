//! Finding a bot's own name in text without a regex per bot.
//!
//! Each bot needs to know whether a message mentions it (`@name` anywhere, or the
//! name at the start) and whether its reply starts with its own name (`name:`),
//! which it strips. Compiled per bot as Unicode-aware, case-insensitive regexes
//! these cost about 400 KiB per bot (their automata and lazy-DFA caches), which at
//! thousands of bots per process is most of the host's memory. A [`NameSet`] is the
//! names' parts, a few bytes each, matched by hand; the character classes it needs
//! are shared by every bot.
//!
//! The rules are those the regexes had (a test keeps the two in step):
//! - a name's parts are separated by any run of whitespace, `_` or `-`;
//! - letters match case-insensitively (simple case folding);
//! - a mention ends where the name does, unless a letter, digit, `_` or `-` follows
//!   (a lone `-` may follow when no name character comes after it), so `@echo-9f3c`
//!   is not a mention of `echo`.

use std::sync::LazyLock;

use regex::Regex;

/// `\p{P}`: Unicode punctuation. One automaton for the process.
static PUNCTUATION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\p{P}$").expect("static pattern"));
/// `[\p{L}\p{N}_]`: a character that continues a name.
static NAME_CHAR: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[\p{L}\p{N}_]$").expect("static pattern"));

fn class(re: &Regex, c: char) -> bool {
    let mut buf = [0u8; 4];
    re.is_match(c.encode_utf8(&mut buf))
}

fn is_punctuation(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_punctuation()
            && !matches!(c, '$' | '+' | '<' | '=' | '>' | '^' | '`' | '|' | '~');
    }
    class(&PUNCTUATION, c)
}

fn is_name_char(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphanumeric() || c == '_';
    }
    class(&NAME_CHAR, c)
}

fn is_separator(c: char) -> bool {
    c.is_whitespace() || c == '_' || c == '-'
}

/// One case of `c` as simple case folding sees it: its lowercase when that is one
/// character.
fn fold(c: char) -> char {
    let mut lower = c.to_lowercase();
    match (lower.next(), lower.next()) {
        (Some(l), None) => l,
        _ => c,
    }
}

fn same_letter(a: char, b: char) -> bool {
    if a == b {
        return true;
    }
    if fold(a) == fold(b) {
        return true;
    }
    let mut ua = a.to_uppercase();
    let mut ub = b.to_uppercase();
    matches!((ua.next(), ua.next(), ub.next(), ub.next()), (Some(x), None, Some(y), None) if x == y)
}

/// A name as chat writes it: its parts, with any run of separators between them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Name {
    parts: Vec<Vec<char>>,
}

impl Name {
    fn of(name: &str) -> Option<Name> {
        let parts: Vec<Vec<char>> = name
            .split(is_separator)
            .filter(|p| !p.is_empty())
            .map(|p| p.chars().collect())
            .collect();
        (!parts.is_empty()).then_some(Name { parts })
    }

    /// How long the name is written without separators (the priority of the
    /// longest name first).
    fn weight(&self) -> usize {
        self.parts.iter().map(Vec::len).sum::<usize>() + self.parts.len()
    }

    /// Where the name ends if it is written at byte `at` of `text`.
    fn match_at(&self, text: &str, at: usize) -> Option<usize> {
        let mut rest = text.get(at..)?;
        let mut end = at;
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                let seps: usize = rest
                    .chars()
                    .take_while(|&c| is_separator(c))
                    .map(char::len_utf8)
                    .sum();
                if seps == 0 {
                    return None;
                }
                rest = &rest[seps..];
                end += seps;
            }
            let mut chars = rest.chars();
            for &want in part {
                let got = chars.next()?;
                if !same_letter(got, want) {
                    return None;
                }
                end += got.len_utf8();
            }
            rest = &text[end..];
        }
        Some(end)
    }
}

/// The names a bot answers to, longest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameSet {
    names: Vec<Name>,
}

impl NameSet {
    /// The names among `names` that have at least `min_chars` characters once
    /// separators are dropped (duplicates once); `None` if none does.
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>, min_chars: usize) -> Option<NameSet> {
        let mut out: Vec<Name> = Vec::new();
        for name in names {
            if let Some(n) = Name::of(name.trim())
                && n.parts.iter().map(Vec::len).sum::<usize>() >= min_chars
                && !out.contains(&n)
            {
                out.push(n);
            }
        }
        out.sort_by_key(|n| std::cmp::Reverse(n.weight()));
        (!out.is_empty()).then_some(NameSet { names: out })
    }

    /// Whether `text` mentions one of the names: `@NAME` anywhere, or `NAME` after at
    /// most three whitespace or punctuation characters at the start; either way not
    /// followed by a character that continues a name.
    pub fn mentioned_in(&self, text: &str) -> bool {
        self.mentioned_at_start(text)
            || text
                .match_indices('@')
                .any(|(i, _)| self.ends_a_mention_at(text, i + 1))
    }

    fn mentioned_at_start(&self, text: &str) -> bool {
        let mut starts = vec![0usize];
        for (i, c) in text.char_indices().take(3) {
            if !(c.is_whitespace() || is_punctuation(c)) {
                break;
            }
            starts.push(i + c.len_utf8());
        }
        starts
            .into_iter()
            .any(|at| self.ends_a_mention_at(text, at))
    }

    fn ends_a_mention_at(&self, text: &str, at: usize) -> bool {
        self.names.iter().any(|n| {
            n.match_at(text, at).is_some_and(|end| {
                let mut after = text[end..].chars();
                match after.next() {
                    None => true,
                    Some('-') => after.next().is_none_or(|c| !is_name_char(c)),
                    Some(c) => !is_name_char(c),
                }
            })
        })
    }

    /// Where a leading "own name" label ends: `NAME:` at the start, perhaps in
    /// markdown (`**NAME**:`, `> NAME:`, `[NAME]:`), perhaps as `@NAME`, perhaps with a
    /// registration suffix (`NAME-1a2b:`), the colon ASCII or full-width. Returns the
    /// byte just after the colon.
    pub fn label_end(&self, text: &str) -> Option<usize> {
        let lead = |c: char| c.is_whitespace() || matches!(c, '*' | '_' | '`' | '~' | '>' | '[');
        let trail = |c: char| c.is_whitespace() || matches!(c, '*' | '_' | '`' | '~' | ']');
        let mut starts = vec![0usize];
        for (i, c) in text.char_indices() {
            if !lead(c) {
                break;
            }
            starts.push(i + c.len_utf8());
        }
        // Greedy first, as a regex would try it.
        for &at in starts.iter().rev() {
            let ats: &[usize] = if text[at..].starts_with('@') {
                &[at + 1, at]
            } else {
                &[at]
            };
            for &at in ats {
                for name in &self.names {
                    let Some(end) = name.match_at(text, at) else {
                        continue;
                    };
                    for end in suffix_ends(text, end) {
                        let skip: usize = text[end..]
                            .chars()
                            .take_while(|&c| trail(c))
                            .map(char::len_utf8)
                            .sum();
                        let after = end + skip;
                        match text[after..].chars().next() {
                            Some(c @ (':' | '：')) => return Some(after + c.len_utf8()),
                            _ => continue,
                        }
                    }
                }
            }
        }
        None
    }
}

/// The ends after an optional `-` and 2-8 hex digits at `end`, longest first, then
/// `end` itself.
fn suffix_ends(text: &str, end: usize) -> Vec<usize> {
    let mut out = Vec::new();
    if let Some(rest) = text[end..].strip_prefix('-') {
        let hex = rest
            .bytes()
            .take(8)
            .take_while(u8::is_ascii_hexdigit)
            .count();
        for n in (2..=hex).rev() {
            out.push(end + 1 + n);
        }
    }
    out.push(end);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The regexes this module replaces, as the oracle.
    fn pattern(name: &str) -> String {
        let parts: Vec<String> = name
            .split(is_separator)
            .filter(|p| !p.is_empty())
            .map(regex::escape)
            .collect();
        parts.join(r"[\s_-]+")
    }

    fn alternation(names: &[&str]) -> String {
        let mut alts: Vec<String> = Vec::new();
        for n in names {
            let p = pattern(n.trim());
            if !p.is_empty() && !alts.contains(&p) {
                alts.push(p);
            }
        }
        alts.sort_by_key(|a| std::cmp::Reverse(a.len()));
        alts.join("|")
    }

    fn mention_oracle(names: &[&str], text: &str) -> bool {
        let names = alternation(names);
        let end = r"(?:$|[^\p{L}\p{N}_-]|-(?:$|[^\p{L}\p{N}_]))";
        let at = Regex::new(&format!(r"(?i)@(?:{names}){end}")).unwrap();
        let start = Regex::new(&format!(r"(?i)^[\s\p{{P}}]{{0,3}}(?:{names}){end}")).unwrap();
        at.is_match(text) || start.is_match(text)
    }

    fn label_oracle(names: &[&str], text: &str) -> Option<usize> {
        let re = Regex::new(&format!(
            r"(?i)^[\s*_`~>\[]*@?(?:{})(?:-[0-9a-f]{{2,8}})?[\s*_`~\]]*[:：]",
            alternation(names)
        ))
        .unwrap();
        re.find(text).map(|m| m.end())
    }

    fn set(names: &[&str]) -> NameSet {
        NameSet::new(names.iter().copied(), 1).unwrap()
    }

    #[test]
    fn mentions() {
        let s = set(&["echo-1a2b", "echo", "Echo Bot"]);
        for yes in [
            "@echo hi",
            "hi @ECHO",
            "echo, hi",
            "  echo: hi",
            "¿echo?",
            "@echo_1a2b x",
            "@echo   bot!",
            "@echo-",
            "@echo- x",
            "@echo-1a2b",
            "@Echo-Bot",
        ] {
            assert!(s.mentioned_in(yes), "{yes:?}");
        }
        for no in [
            "@echo-9f3c hi",
            "@echoes",
            "hi echo",
            "....echo",
            "@echo_x",
            "@echo-x",
            "mail@echox",
            "",
        ] {
            assert!(!s.mentioned_in(no), "{no:?}");
        }
    }

    #[test]
    fn labels() {
        let s = set(&["rook-1a2b", "rook"]);
        assert_eq!(s.label_end("rook: hi"), Some(5));
        assert_eq!(s.label_end("**Rook**: hi"), Some(9));
        assert_eq!(s.label_end("> @rook-77aa : hi"), Some(14));
        assert_eq!(s.label_end("[rook]：hi"), Some(9));
        assert_eq!(s.label_end("rook says: hi"), None);
        assert_eq!(s.label_end("hi rook:"), None);
    }

    #[test]
    fn short_names_are_left_out() {
        assert!(NameSet::new(["a", " "], 2).is_none());
        assert!(NameSet::new(["a", "ab"], 2).is_some());
    }

    fn text_strategy() -> impl Strategy<Value = String> {
        let pieces = prop::sample::select(vec![
            "echo",
            "ECHO",
            "Echo",
            "bot",
            "1a2b",
            "9f",
            "-",
            "_",
            " ",
            "  ",
            "@",
            ":",
            "：",
            "**",
            "*",
            ">",
            "[",
            "]",
            "`",
            "~",
            ",",
            "!",
            "¿",
            "…",
            "x",
            "é",
            "É",
            "名",
            "7",
            "\n",
            "\t",
            "-1a2b",
            "-abcdef12",
            "s",
            "ß",
        ]);
        prop::collection::vec(pieces, 0..10).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn matches_what_the_regexes_matched(text in text_strategy()) {
            let names: &[&str] = &["echo-1a2b", "echo", "echo bot", "É名"];
            let s = NameSet::new(names.iter().copied(), 1).unwrap();
            prop_assert_eq!(s.mentioned_in(&text), mention_oracle(names, &text), "mention {:?}", text);
            prop_assert_eq!(s.label_end(&text), label_oracle(names, &text), "label {:?}", text);
        }
    }
}
