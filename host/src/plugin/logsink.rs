//! Persona log lines (the `log` interface and the guest's stdout/stderr) into the
//! host's `tracing` log: every line carries the persona's name, control characters
//! are escaped so a guest can't forge log lines, long lines are cut, and a token
//! bucket keeps a chatty persona from flooding the log (suppressed lines are counted
//! and reported once logging resumes). A line the secret scanner objects to (the
//! bot's scanner once it runs, so keys the host holds too) is replaced by a notice
//! naming only the kind of secret: logs are read by people and shown by `roost dev`.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::bindings::log::Level;
use crate::policy::{SecretScanner, SecretsConfig};

/// Longest line written to the host log; longer lines are cut with `…`.
pub const MAX_LINE_CHARS: usize = 2_000;
/// Lines a persona may log in a burst.
pub const BURST: f64 = 50.0;
/// Lines per second a persona may log on average.
pub const PER_SECOND: f64 = 10.0;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

/// One persona's log destination.
#[derive(Debug)]
pub struct LogSink {
    label: String,
    bucket: Mutex<Bucket>,
    /// Lines dropped by the rate limit since the sink was made.
    pub suppressed_total: AtomicU64,
    /// Lines withheld because they held a secret.
    pub withheld_total: AtomicU64,
    scanner: RwLock<SecretScanner>,
}

impl LogSink {
    pub fn new(label: &str) -> Self {
        LogSink {
            label: label.to_string(),
            bucket: Mutex::new(Bucket {
                tokens: BURST,
                last: Instant::now(),
                suppressed: 0,
            }),
            suppressed_total: AtomicU64::new(0),
            withheld_total: AtomicU64::new(0),
            scanner: RwLock::new(SecretScanner::new(SecretsConfig::default())),
        }
    }

    /// Scans lines with `scanner` from now on (the bot's, which knows the host's keys).
    pub fn set_scanner(&self, scanner: SecretScanner) {
        *self.scanner.write().unwrap_or_else(|p| p.into_inner()) = scanner;
    }

    /// Write one line at `level`, if the rate limit allows.
    pub fn line(&self, level: Level, text: &str) {
        let Some(resumed_after) = self.admit() else {
            self.suppressed_total.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let persona = self.label.as_str();
        if resumed_after > 0 {
            tracing::warn!(
                persona,
                suppressed = resumed_after,
                "persona log rate limit: {resumed_after} lines suppressed"
            );
        }
        let finding = self
            .scanner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .scan(text);
        let text = match finding {
            Some(f) => {
                self.withheld_total.fetch_add(1, Ordering::Relaxed);
                format!("[log line withheld: it holds a secret ({})]", f.kind)
            }
            None => sanitize(text),
        };
        tap(persona, level, &text);
        match level {
            Level::Trace => tracing::trace!(target: "persona", persona, "{text}"),
            Level::Debug => tracing::debug!(target: "persona", persona, "{text}"),
            Level::Info => tracing::info!(target: "persona", persona, "{text}"),
            Level::Warn => tracing::warn!(target: "persona", persona, "{text}"),
            Level::Error => tracing::error!(target: "persona", persona, "{text}"),
        }
    }

    /// Takes a token; `Some(n)` where n lines were suppressed just before this one.
    fn admit(&self) -> Option<u64> {
        let mut b = match self.bucket.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(b.last);
        b.last = now;
        b.tokens = (b.tokens + elapsed.as_secs_f64() * PER_SECOND).min(BURST);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Some(std::mem::take(&mut b.suppressed))
        } else {
            b.suppressed += 1;
            None
        }
    }

    /// A `wasi:cli` stdout/stderr stream writing lines into this sink.
    pub fn stream(self: &std::sync::Arc<Self>, level: Level) -> GuestOutput {
        GuestOutput {
            sink: self.clone(),
            level,
        }
    }
}

/// A persona's log line, for a watcher in the same process ([`subscribe`]).
#[derive(Debug, Clone)]
pub struct PersonaLine {
    /// The persona's label (its file stem).
    pub persona: String,
    pub level: Level,
    /// Escaped and cut as in the host log.
    pub text: String,
}

static TAP: OnceLock<broadcast::Sender<PersonaLine>> = OnceLock::new();

/// Every persona log line written from now on in this process, after the rate
/// limit: `roost dev` shows them in its chat view. A receiver more than 256 lines
/// behind loses the oldest.
pub fn subscribe() -> broadcast::Receiver<PersonaLine> {
    TAP.get_or_init(|| broadcast::channel(256).0).subscribe()
}

fn tap(persona: &str, level: Level, text: &str) {
    if let Some(tx) = TAP.get()
        && tx.receiver_count() > 0
    {
        let _ = tx.send(PersonaLine {
            persona: persona.to_string(),
            level,
            text: text.to_string(),
        });
    }
}

/// Escape control characters (newlines included) and cut to [`MAX_LINE_CHARS`].
fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_LINE_CHARS + 8));
    for (n, c) in text.chars().enumerate() {
        if n >= MAX_LINE_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The guest's stdout or stderr: bytes are split into lines, each logged.
#[derive(Clone)]
pub struct GuestOutput {
    sink: std::sync::Arc<LogSink>,
    level: Level,
}

impl wasmtime_wasi::cli::IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter {
            out: self.clone(),
            buf: Vec::new(),
        })
    }
}

/// Buffers a partial line; a line longer than the cap is flushed as it is.
struct LineWriter {
    out: GuestOutput,
    buf: Vec<u8>,
}

impl LineWriter {
    fn emit(&mut self, upto: usize) {
        let line: Vec<u8> = self.buf.drain(..upto).collect();
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        if !text.is_empty() {
            self.out.sink.line(self.out.level, text);
        }
    }
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.buf.extend_from_slice(data);
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            self.emit(pos + 1);
        }
        if self.buf.len() > MAX_LINE_CHARS * 4 {
            let n = self.buf.len();
            self.emit(n);
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let n = self.buf.len();
        self.emit(n);
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let n = self.buf.len();
        if n > 0 {
            self.emit(n);
        }
    }
}

/// How long the bucket takes to refill completely (for docs and tests).
pub fn refill_time() -> Duration {
    Duration::from_secs_f64(BURST / PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_lines_cut() {
        assert_eq!(sanitize("a\nb\x1b[31m"), "a\\nb\\u{1b}[31m");
        let long = "x".repeat(MAX_LINE_CHARS + 10);
        assert_eq!(sanitize(&long).chars().count(), MAX_LINE_CHARS + 1);
    }

    #[tokio::test]
    async fn subscribers_get_what_the_log_gets() {
        let mut lines = subscribe();
        let sink = LogSink::new("tapped-persona");
        sink.line(Level::Warn, "careful\nnow");
        // Other tests' personas log into the same tap.
        let line = loop {
            match lines.recv().await {
                Ok(line) if line.persona == "tapped-persona" => break line,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(line.level, Level::Warn);
        assert_eq!(line.text, "careful\\nnow");
    }

    #[tokio::test]
    async fn lines_holding_a_secret_are_withheld() {
        let mut lines = subscribe();
        let sink = LogSink::new("leaky-persona");
        let scanner = SecretScanner::new(SecretsConfig::default());
        scanner.add_known_secret("Zq8vP2rT9wLx4Kb7Nm3Q");
        sink.set_scanner(scanner);
        // A provider format, reshaped; a piece of a key the host holds; plain text.
        sink.line(
            Level::Info,
            "debug: 5c0Y aXMF Dysa ZhlluPWD mW5P y9FW KM6y uhnr _phg",
        );
        sink.line(Level::Info, "got T9wLx4Kb7Nm3 from the llm");
        sink.line(Level::Info, "all good");
        let mut got = Vec::new();
        while got.len() < 3 {
            match lines.recv().await {
                Ok(line) if line.persona == "leaky-persona" => got.push(line.text),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(
            got,
            [
                "[log line withheld: it holds a secret (github-token)]",
                "[log line withheld: it holds a secret (known-secret)]",
                "all good",
            ]
        );
        assert_eq!(sink.withheld_total.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_is_rate_limited_and_refills() {
        let sink = LogSink::new("chatty");
        for _ in 0..1_000 {
            sink.line(Level::Info, "spam");
        }
        let dropped = sink.suppressed_total.load(Ordering::Relaxed);
        assert_eq!(dropped, 1_000 - BURST as u64);
        tokio::time::advance(refill_time()).await;
        sink.line(Level::Info, "back");
        assert_eq!(sink.suppressed_total.load(Ordering::Relaxed), dropped);
    }
}
