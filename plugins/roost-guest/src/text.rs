//! Pure helpers for chat text: no host calls, so they run (and are tested) natively.

use std::borrow::Cow;

/// The text addressed to `name`, if `text` mentions it; `None` otherwise.
///
/// A mention is either
/// - `NAME` at the start of the text, followed by `:`, `,`, whitespace or the end
///   (`echo: hi`, `echo, hi`, `echo hi`), or
/// - `@NAME` anywhere, not glued to a word before it (`bob@echo` is an address, not a
///   mention) and not followed by more of a name (`@echo` does not match `@echoes`
///   or `@echo-2`).
///
/// Names are compared case-insensitively and may contain spaces (`the shining
/// ribbons-ab51`). A `:` or `,` right after the mention is dropped with it.
///
/// The result is the rest of the text, trimmed. For an `@NAME` in the middle, the text
/// before and after it is joined with one space (`hey @echo say hi` gives
/// `hey say hi`), which needs an allocation; otherwise the result borrows from
/// `text`. `Some("")` means "mentioned, with nothing else to say".
///
/// ```
/// use roost_guest::mention_rest;
/// assert_eq!(mention_rest("@Echo hello there", "echo").as_deref(), Some("hello there"));
/// assert_eq!(mention_rest("echo: hello", "echo").as_deref(), Some("hello"));
/// assert_eq!(mention_rest("hey @echo say hi", "echo").as_deref(), Some("hey say hi"));
/// assert_eq!(mention_rest("echoes are nice", "echo"), None);
/// ```
pub fn mention_rest<'a>(text: &'a str, name: &str) -> Option<Cow<'a, str>> {
    let name = name.trim();
    if name.is_empty() {
        return None;
    }
    let trimmed = text.trim_start();

    // `NAME` at the start, followed by a separator or the end.
    if let Some(len) = match_ci(trimmed, name) {
        let after = &trimmed[len..];
        match after.chars().next() {
            None => return Some(Cow::Borrowed("")),
            Some(':' | ',') => return Some(Cow::Borrowed(after[1..].trim())),
            Some(c) if c.is_whitespace() => return Some(Cow::Borrowed(after.trim())),
            Some(_) => {}
        }
    }

    // `@NAME` anywhere.
    for (at, _) in text.match_indices('@') {
        let glued = text[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        if glued {
            continue;
        }
        let Some(len) = match_ci(&text[at + 1..], name) else {
            continue;
        };
        let end = at + 1 + len;
        let mut after = &text[end..];
        if after.chars().next().is_some_and(is_name_char) {
            continue;
        }
        if let Some(stripped) = after.strip_prefix([':', ',']) {
            after = stripped;
        }
        let before = text[..at].trim();
        let after = after.trim();
        return Some(match (before.is_empty(), after.is_empty()) {
            (true, _) => Cow::Borrowed(after),
            (false, true) => Cow::Borrowed(before),
            (false, false) => Cow::Owned(format!("{before} {after}")),
        });
    }
    None
}

/// The agent and room of a network join line, `⚡ NAME joined #ROOM.`; `None` for
/// any other text.
///
/// Agent names may contain spaces; the trailing `.` and an emoji variation selector
/// after `⚡` are optional. The room is returned without `#`.
///
/// ```
/// use roost_guest::parse_join_line;
/// assert_eq!(
///     parse_join_line("⚡ the shining ribbons-ab51 joined #lobby."),
///     Some(("the shining ribbons-ab51", "lobby")),
/// );
/// assert_eq!(parse_join_line("⚡ bob connected."), None);
/// ```
pub fn parse_join_line(text: &str) -> Option<(&str, &str)> {
    let rest = text.trim().strip_prefix('⚡')?;
    let rest = rest.strip_prefix('\u{FE0F}').unwrap_or(rest);
    let (agent, room) = rest.rsplit_once(" joined #")?;
    let agent = agent.trim();
    let room = room.strip_suffix('.').unwrap_or(room);
    if agent.is_empty() || room.is_empty() || room.contains(char::is_whitespace) {
        return None;
    }
    Some((agent, room))
}

/// Characters that continue a name after a mention: `@echo-2` is not `@echo`.
fn is_name_char(c: char) -> bool {
    c.is_alphanumeric() || c == '-' || c == '_'
}

/// If `hay` starts with `needle` (case-insensitively, char by char), the number of
/// bytes of `hay` that matched.
fn match_ci(hay: &str, needle: &str) -> Option<usize> {
    let mut hay_chars = hay.char_indices();
    for n in needle.chars() {
        let (_, h) = hay_chars.next()?;
        if h != n && !h.to_lowercase().eq(n.to_lowercase()) {
            return None;
        }
    }
    Some(hay_chars.next().map_or(hay.len(), |(i, _)| i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rest(text: &str, name: &str) -> Option<String> {
        mention_rest(text, name).map(Cow::into_owned)
    }

    #[test]
    fn name_at_start_with_separators() {
        assert_eq!(rest("echo: hello", "echo").as_deref(), Some("hello"));
        assert_eq!(rest("echo, hello", "echo").as_deref(), Some("hello"));
        assert_eq!(rest("echo hello  ", "echo").as_deref(), Some("hello"));
        assert_eq!(rest("  echo:hello", "echo").as_deref(), Some("hello"));
        assert_eq!(rest("echo\thello", "echo").as_deref(), Some("hello"));
        assert_eq!(rest("echo", "echo").as_deref(), Some(""));
        assert_eq!(rest("echo:", "echo").as_deref(), Some(""));
    }

    #[test]
    fn name_at_start_needs_a_boundary() {
        assert_eq!(rest("echoes are nice", "echo"), None);
        assert_eq!(rest("echo-2: hi", "echo"), None);
        assert_eq!(rest("echo.", "echo"), None);
    }

    #[test]
    fn at_mention_at_start() {
        assert_eq!(rest("@echo hello", "echo").as_deref(), Some("hello"));
        assert_eq!(rest("@echo: hello", "echo").as_deref(), Some("hello"));
        assert_eq!(rest("@echo, hello", "echo").as_deref(), Some("hello"));
        assert_eq!(rest("@echo", "echo").as_deref(), Some(""));
        assert_eq!(rest("   @echo   ", "echo").as_deref(), Some(""));
    }

    #[test]
    fn at_mention_in_the_middle_or_at_the_end() {
        assert_eq!(
            rest("hey @echo say hi", "echo").as_deref(),
            Some("hey say hi")
        );
        assert_eq!(
            rest("hey @echo: say hi", "echo").as_deref(),
            Some("hey say hi")
        );
        assert_eq!(rest("say hi @echo", "echo").as_deref(), Some("say hi"));
        assert_eq!(rest("(@echo) hi", "echo").as_deref(), Some("( ) hi"));
    }

    #[test]
    fn borrows_unless_joining() {
        assert!(matches!(
            mention_rest("@echo hi", "echo"),
            Some(Cow::Borrowed("hi"))
        ));
        assert!(matches!(
            mention_rest("hi @echo", "echo"),
            Some(Cow::Borrowed("hi"))
        ));
        assert!(matches!(
            mention_rest("a @echo b", "echo"),
            Some(Cow::Owned(_))
        ));
    }

    #[test]
    fn case_insensitive() {
        assert_eq!(rest("@ECHO hi", "echo").as_deref(), Some("hi"));
        assert_eq!(rest("Echo: hi", "eCHo").as_deref(), Some("hi"));
        assert_eq!(rest("@ÉCHO hi", "écho").as_deref(), Some("hi"));
    }

    #[test]
    fn at_mention_needs_boundaries() {
        assert_eq!(rest("hi @echoes", "echo"), None);
        assert_eq!(rest("hi @echo-2 there", "echo"), None);
        assert_eq!(rest("mail bob@echo please", "echo"), None);
        assert_eq!(
            rest("hi @echo! there", "echo").as_deref(),
            Some("hi ! there")
        );
        // The first real mention wins.
        assert_eq!(
            rest("@echoes @echo hi", "echo").as_deref(),
            Some("@echoes hi")
        );
    }

    #[test]
    fn suffixed_and_spaced_names() {
        assert_eq!(rest("@echo-1a2b hi", "echo-1a2b").as_deref(), Some("hi"));
        assert_eq!(rest("@echo hi", "echo-1a2b"), None);
        assert_eq!(
            rest(
                "@the shining ribbons-ab51 what's up",
                "the shining ribbons-ab51"
            )
            .as_deref(),
            Some("what's up")
        );
        assert_eq!(
            rest("the shining ribbons-ab51: lol", "the shining ribbons-ab51").as_deref(),
            Some("lol")
        );
    }

    #[test]
    fn no_mention() {
        assert_eq!(rest("hello world", "echo"), None);
        assert_eq!(rest("", "echo"), None);
        assert_eq!(rest("@", "echo"), None);
        assert_eq!(rest("@ech", "echo"), None);
        assert_eq!(rest("echo hi", ""), None);
        assert_eq!(rest("echo hi", "   "), None);
    }

    #[test]
    fn keeps_unicode_intact() {
        assert_eq!(
            rest("@echo héllo 👋 “quotes”", "echo").as_deref(),
            Some("héllo 👋 “quotes”")
        );
        assert_eq!(
            rest("👋 @echo ünïcode", "echo").as_deref(),
            Some("👋 ünïcode")
        );
    }

    #[test]
    fn join_lines() {
        assert_eq!(
            parse_join_line("⚡ T76k joined #lobby."),
            Some(("T76k", "lobby"))
        );
        assert_eq!(
            parse_join_line("⚡ the shining ribbons-ab51 joined #agent-creativity."),
            Some(("the shining ribbons-ab51", "agent-creativity"))
        );
        assert_eq!(
            parse_join_line("⚡\u{FE0F} bob joined #lobby"),
            Some(("bob", "lobby"))
        );
        assert_eq!(
            parse_join_line("  ⚡ bob joined #lobby.  "),
            Some(("bob", "lobby"))
        );
        assert_eq!(
            parse_join_line("⚡ bob joined #x joined #lobby."),
            Some(("bob joined #x", "lobby"))
        );
    }

    #[test]
    fn not_join_lines() {
        assert_eq!(parse_join_line("⚡ bob connected."), None);
        assert_eq!(parse_join_line("bob joined #lobby."), None);
        assert_eq!(parse_join_line("⚡  joined #lobby."), None);
        assert_eq!(parse_join_line("⚡ bob joined #."), None);
        assert_eq!(parse_join_line("⚡ bob joined #lob by."), None);
        assert_eq!(
            parse_join_line("[CONVERSION ERROR] Original line: hi"),
            None
        );
        assert_eq!(parse_join_line(""), None);
    }
}
