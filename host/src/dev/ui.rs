//! The terminal side of `roost dev`: ANSI styling, the status lines and progress
//! display on standard error, and the chat view on standard output (a cooked-mode
//! prompt that incoming lines are drawn above). Nothing here starts a process or
//! talks to the network; [`super`] and [`super::chat`] decide what to say, this
//! module decides how it looks.

use std::cell::{Cell, RefCell};
use std::io::{IsTerminal, Write};
use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::ChatMessage;

/// How lines are written: colours, and terminal line control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    /// ANSI colours (off with `NO_COLOR` or when stdout is not a terminal).
    pub color: bool,
    /// Standard output is a terminal (clear-line and prompt redraws).
    pub tty: bool,
}

/// Bold colours names are drawn in.
const PALETTE: [u8; 12] = [31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96];

impl Style {
    pub fn for_stdout() -> Style {
        let tty = std::io::stdout().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Style {
            color: tty && !no_color,
            tty,
        }
    }

    /// The palette colour of `name`: the same for a name every time.
    pub fn color_of(name: &str) -> u8 {
        // FNV-1a over the lowercased name.
        let mut h: u32 = 0x811c_9dc5;
        for b in name.to_lowercase().bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        PALETTE[h as usize % PALETTE.len()]
    }

    /// `name` in its colour (bold).
    pub fn name(&self, name: &str) -> String {
        if self.color {
            format!("\x1b[1;{}m{name}\x1b[0m", Style::color_of(name))
        } else {
            name.to_string()
        }
    }

    /// `text` dimmed.
    pub fn dim(&self, text: &str) -> String {
        if self.color {
            format!("\x1b[2m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    /// `text` in bold red, for what went wrong.
    pub fn error(&self, text: &str) -> String {
        if self.color {
            format!("\x1b[1;31m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    /// A message as a chat line. `current` is the room shown without a prefix
    /// (`None`: every line says its room, the transcript form `#room name: text`).
    pub fn render(&self, msg: &ChatMessage, current: Option<&str>) -> String {
        let prefix = match current {
            Some(room) if room == msg.room => String::new(),
            _ => format!("#{} ", msg.room),
        };
        let text = one_line(&msg.text);
        if msg.is_system() {
            if current.is_some() {
                self.dim(&format!("{prefix}{text}"))
            } else {
                self.dim(&format!("{prefix}{}: {text}", msg.from))
            }
        } else {
            format!("{prefix}{}: {text}", self.name(&clean(&msg.from)))
        }
    }

    /// A persona's own log line: `[persona] text`, dimmed; `level` (anything but
    /// `info`) goes after the prefix.
    pub fn persona_line(&self, persona: &str, level: Option<&str>, text: &str) -> String {
        let level = level.map(|l| format!("{l}: ")).unwrap_or_default();
        self.dim(&format!("[{}] {level}{}", clean(persona), one_line(text)))
    }
}

/// `text` with control characters (terminal escapes included) made harmless.
pub fn clean(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

/// `text` cleaned and on one line (line breaks shown as ` ⏎ `).
pub fn one_line(text: &str) -> String {
    clean(text.trim_end())
        .replace("\r\n", "\n")
        .replace('\n', " \u{23ce} ")
}

pub fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

// ---------------------------------------------------------------------------
// Status lines and progress (standard error)

/// Status lines on standard error.
pub struct Status {
    pub tty: bool,
}

impl Status {
    pub fn stderr() -> Status {
        Status {
            tty: std::io::stderr().is_terminal(),
        }
    }

    pub fn line(&self, text: &str) {
        eprintln!("{text}");
    }

    /// Ends a [`with_progress`] line: `head … verdict`.
    pub fn finish(&self, head: &str, verdict: &str) {
        if self.tty {
            self.line(&format!("\r\x1b[K{head} … {verdict}"));
        } else {
            self.line(verdict);
        }
    }

    fn partial(&self, text: &str) {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "{text}");
        let _ = err.flush();
    }
}

/// Runs `work` on a blocking thread; on a terminal `head … N s` ticks every
/// second meanwhile. Returns the result and the seconds it took; the caller ends
/// the line with [`Status::finish`].
pub async fn with_progress<T: Send + 'static>(
    status: &Status,
    head: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> (Result<T, tokio::task::JoinError>, f64) {
    let started = Instant::now();
    status.partial(&format!("{head} … "));
    let mut task = tokio::task::spawn_blocking(work);
    let second = Duration::from_secs(1);
    let mut tick = tokio::time::interval_at(started + second, second);
    let result = loop {
        tokio::select! {
            r = &mut task => break r,
            _ = tick.tick(), if status.tty => {
                status.partial(&format!("\r\x1b[K{head} … {} s", started.elapsed().as_secs()));
            }
        }
    };
    (result, started.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------
// The chat view (standard output)

/// Where the chat is drawn. Interactive on a terminal: a prompt (`#room> `) that
/// every incoming line is printed above (the line clears the prompt, prints itself
/// and redraws the prompt below), so a line is never glued to the prompt and text
/// typed but not yet sent stays in the terminal's line buffer. Piped: standard
/// output is the transcript, one line per message, and everything else (notes,
/// build results, persona logs) goes to standard error.
pub struct Console {
    pub style: Style,
    pub interactive: bool,
    prompt: RefCell<String>,
    /// The prompt is on screen, waiting for input.
    prompt_shown: Cell<bool>,
}

impl Console {
    pub fn new(style: Style, interactive: bool, room: &str) -> Console {
        Console {
            style,
            interactive,
            prompt: RefCell::new(prompt_for(room)),
            prompt_shown: Cell::new(false),
        }
    }

    /// The prompt names `room` from now on.
    pub fn set_room(&self, room: &str) {
        *self.prompt.borrow_mut() = prompt_for(room);
    }

    /// A line of the chat on standard output; in interactive mode on a terminal,
    /// over the prompt, which is redrawn after it.
    pub fn print(&self, line: &str) {
        let mut out = std::io::stdout().lock();
        if self.interactive && self.style.tty {
            let _ = write!(out, "\r\x1b[K{line}\n{}", self.prompt.borrow());
            self.prompt_shown.set(true);
        } else {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }

    /// A line that is not chat (roost dev's own, a build's, a persona's log):
    /// in the chat view when interactive, on stderr when piped (stdout is the
    /// transcript). `styled` is the interactive form of `plain`.
    fn aside(&self, plain: &str, styled: String) {
        if self.interactive {
            self.print(&styled);
        } else {
            eprintln!("{plain}");
        }
    }

    /// A note from roost dev itself, dimmed.
    pub fn note(&self, text: &str) {
        self.aside(text, self.style.dim(&format!("· {text}")));
    }

    /// Something that went wrong (a failed build), in red, and its details.
    pub fn problem(&self, text: &str, details: &[String]) {
        self.aside(text, self.style.error(&format!("✗ {text}")));
        for line in details {
            let line = clean(line);
            self.aside(&format!("  {line}"), format!("  {line}"));
        }
    }

    /// A persona's own log line (see [`Style::persona_line`]).
    pub fn persona_line(&self, persona: &str, level: Option<&str>, text: &str) {
        let plain = Style {
            color: false,
            tty: false,
        };
        self.aside(
            &plain.persona_line(persona, level, text),
            self.style.persona_line(persona, level, text),
        );
    }

    /// Draws the prompt unless it is already there.
    pub fn show_prompt(&self) {
        if self.interactive && self.style.tty && !self.prompt_shown.replace(true) {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "{}", self.prompt.borrow());
            let _ = out.flush();
        }
    }

    /// Enter was pressed: the cursor is on a fresh line, the prompt is gone.
    pub fn input_taken(&self) {
        self.prompt_shown.set(false);
    }

    /// Ends the chat view on a fresh line.
    pub fn end(&self) {
        if self.interactive {
            println!();
        }
    }

    /// Says where things are and how to talk (stdout when interactive, else stderr).
    pub fn banner(&self, s: &Banner, me: &str, room: &str) {
        let bots = if s.bots.is_empty() {
            format!("no bots are running yet: {}", s.no_bots_hint)
        } else if self.interactive {
            let names: Vec<String> = s.bots.iter().map(|n| self.style.name(n)).collect();
            format!("bots: {}", names.join(", "))
        } else {
            format!("bots: {}", s.bots.join(", "))
        };
        if self.interactive {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", self.style.dim(&format!("roost dev · {}", s.llm)));
            let _ = writeln!(out, "{}", self.style.dim(&s.plugins));
            let _ = writeln!(
                out,
                "{}",
                self.style.dim(&format!("{} · {}", s.state, s.reload))
            );
            let _ = writeln!(out, "{bots}");
            let _ = writeln!(
                out,
                "You are {} in #{room}. Mention a bot to talk to it (@{} hi). /help for commands.",
                self.style.name(me),
                s.bots.first().map(String::as_str).unwrap_or("echo")
            );
        } else {
            eprintln!("{}; {}", s.llm, s.plugins);
            eprintln!("{}; {}", s.state, s.reload);
            eprintln!("{bots}; posting standard input as `{me}` in #{room}");
        }
    }
}

fn prompt_for(room: &str) -> String {
    format!("#{room}> ")
}

/// What the banner says, worded by [`super::run`].
pub struct Banner {
    pub llm: String,
    /// Which folder the personas come from.
    pub plugins: String,
    pub state: String,
    pub reload: String,
    pub bots: Vec<String>,
    /// What to do when no bot runs.
    pub no_bots_hint: String,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn msg(room: &str, from: &str, text: &str) -> ChatMessage {
        ChatMessage {
            room: room.into(),
            from: from.into(),
            text: text.into(),
            timestamp_ms: 1,
        }
    }

    #[test]
    fn colours_are_stable_per_name() {
        assert_eq!(Style::color_of("echo"), Style::color_of("echo"));
        assert_eq!(Style::color_of("Echo"), Style::color_of("echo"));
        let distinct: BTreeSet<u8> = ["echo", "greeter", "you", "sage", "rook", "llm-persona"]
            .iter()
            .map(|n| Style::color_of(n))
            .collect();
        assert!(
            distinct.len() >= 3,
            "names spread over the palette: {distinct:?}"
        );
    }

    #[test]
    fn renders_transcript_and_chat_lines() {
        let plain = Style {
            color: false,
            tty: false,
        };
        let m = msg("lobby", "echo", "hello\nworld");
        assert_eq!(plain.render(&m, None), "#lobby echo: hello \u{23ce} world");
        assert_eq!(
            plain.render(&m, Some("lobby")),
            "echo: hello \u{23ce} world"
        );
        assert_eq!(
            plain.render(&m, Some("debug")),
            "#lobby echo: hello \u{23ce} world"
        );
        let sys = msg("lobby", "system", "\u{26a1} echo joined #lobby.");
        assert_eq!(
            plain.render(&sys, None),
            "#lobby system: \u{26a1} echo joined #lobby."
        );
        assert_eq!(
            plain.render(&sys, Some("lobby")),
            "\u{26a1} echo joined #lobby."
        );
        let evil = msg("lobby", "x\x1b[2J", "boo\x1b]0;pwned\x07");
        assert!(!plain.render(&evil, None).contains('\x1b'));

        let color = Style {
            color: true,
            tty: true,
        };
        let line = color.render(&m, Some("lobby"));
        assert!(
            line.starts_with(&format!("\x1b[1;{}mecho\x1b[0m: ", Style::color_of("echo"))),
            "{line:?}"
        );
        assert!(color.render(&sys, Some("lobby")).starts_with("\x1b[2m"));
    }

    #[test]
    fn persona_lines_are_prefixed_dimmed_and_harmless() {
        let plain = Style {
            color: false,
            tty: false,
        };
        assert_eq!(
            plain.persona_line("echo", None, "saw a mention"),
            "[echo] saw a mention"
        );
        assert_eq!(
            plain.persona_line("echo", Some("warn"), "two\nlines\x1b[2J"),
            "[echo] warn: two \u{23ce} lines\u{fffd}[2J"
        );
        let color = Style {
            color: true,
            tty: true,
        };
        assert_eq!(
            color.persona_line("echo", None, "hi"),
            "\x1b[2m[echo] hi\x1b[0m"
        );
    }
}
