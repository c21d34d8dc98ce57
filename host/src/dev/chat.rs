//! The person at the terminal as a chat client: registered on the local server as
//! a human, connected over the WebSocket like any agent, and a read-eval loop over
//! standard input. Beside the chat it reports what happens to the personas: a
//! rebuild started, built or failed (with the compiler's error), hot reload swapping
//! a version in or refusing one, and each persona's own log lines. How any of it
//! looks is [`super::ui`]'s business.

use std::future::Future;
use std::io::BufRead;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::build_watch::{BuildEvent, Rebuilds};
use super::ui::{Console, clean};
use crate::bot::stats::ReloadStats;
use crate::devserver::{self, DevServer};
use crate::plugin::bindings::log::Level;
use crate::plugin::logsink::PersonaLine;
use crate::protocol::{ClientFrame, ServerFrame};
use crate::session::SessionHandle;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Registers the human (`name`, or `name-2`… if taken), connects and joins `room`.
pub async fn connect_human(
    server: &DevServer,
    name: &str,
    room: &str,
) -> anyhow::Result<(String, Ws)> {
    crate::names::RoomName::check(room)?;
    let state = server.state();
    let mut reg = None;
    for i in 1..=20 {
        let candidate = if i == 1 {
            name.to_string()
        } else {
            format!("{name}-{i}")
        };
        match state.register(&candidate, "a human at the terminal (roost dev)") {
            Ok(r) => {
                reg = Some(r);
                break;
            }
            Err(devserver::RegisterError::NameTaken) => continue,
            Err(e) => anyhow::bail!("cannot chat as `{name}`: {e}"),
        }
    }
    let reg = reg.with_context(|| format!("cannot chat as `{name}`: the name is taken"))?;
    let url = format!("{}?key={}", server.ws_url(), reg.key.expose());
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .context("cannot connect to the local chat server")?;
    send_frame(
        &mut ws,
        &ClientFrame::Join {
            room: room.to_string(),
        },
    )
    .await?;
    Ok((reg.name, ws))
}

async fn send_frame(ws: &mut Ws, frame: &ClientFrame) -> anyhow::Result<()> {
    ws.send(WsMessage::text(frame.encode()))
        .await
        .context("the chat connection is gone")
}

/// Reads standard input line by line on a plain thread, not `tokio::io::stdin`,
/// whose blocking read would hold up the runtime's shutdown until the next Enter
/// (the process exits without waiting for this thread).
pub fn spawn_stdin_reader() -> anyhow::Result<mpsc::Receiver<String>> {
    let (tx, rx) = mpsc::channel(256);
    std::thread::Builder::new()
        .name("roost-dev-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match stdin.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\n', '\r']).to_string();
                        if tx.blocking_send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        })
        .context("cannot start the input reader")?;
    Ok(rx)
}

/// What a line of input asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Post this text to the current room.
    Say(String),
    Join(String),
    Who,
    Help,
    Quit,
    /// Nothing to do (a blank line).
    Nothing,
    /// A mistake, explained.
    Invalid(String),
}

/// Parses one line of input.
pub fn parse_input(line: &str) -> Input {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Input::Nothing;
    }
    if let Some(rest) = trimmed.strip_prefix("//") {
        return Input::Say(format!("/{rest}"));
    }
    let Some(cmd) = trimmed.strip_prefix('/') else {
        return Input::Say(line.trim_end().to_string());
    };
    let mut words = cmd.split_whitespace();
    match (words.next().unwrap_or(""), words.next(), words.next()) {
        ("join" | "j", Some(room), None) => {
            let room = room.trim_start_matches('#');
            match crate::names::RoomName::check(room) {
                Ok(()) => Input::Join(room.to_string()),
                Err(e) => Input::Invalid(e.to_string()),
            }
        }
        ("join" | "j", _, _) => Input::Invalid("usage: /join ROOM".into()),
        ("who", None, None) => Input::Who,
        ("help" | "h" | "?", None, None) => Input::Help,
        ("quit" | "exit" | "q", None, None) => Input::Quit,
        (other, _, _) => Input::Invalid(format!("unknown command `/{other}` (try /help)")),
    }
}

const HELP: &[&str] = &[
    "a line is posted to the current room; mention a bot to talk to it: @echo hi",
    "/join ROOM   join ROOM and talk there (you stay in the others: their lines show #ROOM)",
    "/who         who is in the current room",
    "/quit        leave (or Ctrl-D; Ctrl-C also stops the bots)",
    "//text       posts /text",
];

/// How often hot reload's events are looked at.
const RELOAD_POLL: Duration = Duration::from_millis(250);

/// What happens to the personas besides the chat, each source optional.
pub struct Feeds {
    /// Rebuild on save (off with `--no-build`).
    pub rebuilds: Option<Rebuilds>,
    /// The personas' own log lines (off with `--quiet-personas`).
    pub personas: Option<broadcast::Receiver<PersonaLine>>,
    /// Hot reload's events (off with `[reload] enabled = false`).
    pub reloads: Option<ReloadFeed>,
}

/// Hot reload's events after the last one reported.
pub struct ReloadFeed {
    stats: Arc<ReloadStats>,
    seen: u64,
    tick: tokio::time::Interval,
}

impl ReloadFeed {
    /// Events from now on (what happened at start-up is the banner's to say).
    pub fn new(stats: Arc<ReloadStats>) -> ReloadFeed {
        let seen = stats.recent().last().map_or(0, |e| e.seq);
        ReloadFeed {
            stats,
            seen,
            tick: tokio::time::interval(RELOAD_POLL),
        }
    }
}

/// One thing from the [`Feeds`].
enum Side {
    Build(BuildEvent),
    Persona(PersonaLine),
    PersonaLagged(u64),
    ReloadTick,
}

impl Feeds {
    /// The next thing to report (pending forever when every feed is off).
    async fn next(&mut self) -> Side {
        let Feeds {
            rebuilds,
            personas,
            reloads,
        } = self;
        let build = async {
            match rebuilds {
                Some(r) => match r.events.recv().await {
                    Some(ev) => ev,
                    None => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        let persona = async {
            match personas {
                Some(rx) => match rx.recv().await {
                    Ok(line) => Side::Persona(line),
                    Err(broadcast::error::RecvError::Lagged(n)) => Side::PersonaLagged(n),
                    Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        let reload = async {
            match reloads {
                Some(feed) => {
                    feed.tick.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = build => Side::Build(ev),
            side = persona => side,
            () = reload => Side::ReloadTick,
        }
    }

    /// A rebuild is running or waiting.
    fn busy(&self) -> bool {
        self.rebuilds.as_ref().is_some_and(Rebuilds::is_busy)
    }
}

/// The chat loop's state.
pub struct Chat<'a> {
    pub me: String,
    pub room: String,
    pub console: Console,
    pub server: &'a DevServer,
    /// Own messages sent whose echo has not come back yet.
    pub pending_echoes: usize,
}

/// Whether the loop goes on.
enum Flow {
    Continue,
    Quit,
}

impl Chat<'_> {
    /// Acts on one line of input.
    async fn on_input(&mut self, ws: &mut Ws, line: &str) -> anyhow::Result<Flow> {
        match parse_input(line) {
            Input::Nothing => {}
            Input::Say(text) => {
                send_frame(
                    ws,
                    &ClientFrame::Send {
                        room: self.room.clone(),
                        text,
                    },
                )
                .await?;
                self.pending_echoes += 1;
            }
            Input::Join(room) => {
                send_frame(ws, &ClientFrame::Join { room: room.clone() }).await?;
                self.room = room;
                self.console.set_room(&self.room);
                self.console.note(&format!("now talking in #{}", self.room));
            }
            Input::Who => {
                let mut names: Vec<String> = self
                    .server
                    .state()
                    .room_agents(&self.room)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|a| a.name)
                    .collect();
                names.sort_by_key(|n| n.to_lowercase());
                self.console
                    .note(&format!("in #{}: {}", self.room, names.join(", ")));
            }
            Input::Help => HELP.iter().for_each(|line| self.console.note(line)),
            Input::Quit => return Ok(Flow::Quit),
            Input::Invalid(why) => self.console.note(&why),
        }
        Ok(Flow::Continue)
    }

    /// Acts on one frame from the server.
    fn on_frame(&mut self, frame: WsMessage) -> anyhow::Result<()> {
        let text = match frame {
            WsMessage::Text(t) => t,
            WsMessage::Close(_) => anyhow::bail!("the local chat server closed the connection"),
            _ => return Ok(()),
        };
        match ServerFrame::decode(text.as_str()) {
            Ok(ServerFrame::Message(msg)) => {
                let own = msg.from.eq_ignore_ascii_case(&self.me);
                if own {
                    self.pending_echoes = self.pending_echoes.saturating_sub(1);
                }
                let style = self.console.style;
                if self.console.interactive {
                    if !own {
                        self.console.print(&style.render(&msg, Some(&self.room)));
                    }
                } else {
                    self.console.print(&style.render(&msg, None));
                }
            }
            Ok(ServerFrame::Error { message, code, .. }) => {
                // A refused send never echoes.
                self.pending_echoes = self.pending_echoes.saturating_sub(1);
                let code = code.map(|c| format!(" ({c})")).unwrap_or_default();
                self.console
                    .note(&format!("server: {}{code}", clean(&message)));
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("undecodable frame: {e}"),
        }
        Ok(())
    }

    /// Reports one thing from the [`Feeds`].
    fn on_side(&mut self, side: Side, feeds: &mut Feeds) {
        match side {
            Side::Build(ev) => self.on_build(ev),
            Side::Persona(line) => {
                let level = match line.level {
                    Level::Info => None,
                    Level::Trace => Some("trace"),
                    Level::Debug => Some("debug"),
                    Level::Warn => Some("warn"),
                    Level::Error => Some("error"),
                };
                self.console.persona_line(&line.persona, level, &line.text);
            }
            Side::PersonaLagged(n) => self.console.note(&format!(
                "{n} persona log line{} not shown (too many at once)",
                super::ui::plural(n as usize)
            )),
            Side::ReloadTick => {
                if let Some(feed) = &mut feeds.reloads {
                    self.report_reloads(feed);
                }
            }
        }
    }

    fn on_build(&self, ev: BuildEvent) {
        match ev {
            BuildEvent::Started { name } => {
                self.console
                    .note(&format!("{name}: source changed, rebuilding…"));
            }
            BuildEvent::Built {
                name,
                took,
                changed: true,
            } => self.console.note(&format!(
                "{name}: built in {:.1} s, swapping it in",
                took.as_secs_f64()
            )),
            BuildEvent::Built {
                name,
                took,
                changed: false,
            } => self.console.note(&format!(
                "{name}: built in {:.1} s, the component is unchanged",
                took.as_secs_f64()
            )),
            BuildEvent::Failed { name, took, error } => {
                let details = match error.diagnostic() {
                    [] => vec![error.to_string()],
                    lines => lines.to_vec(),
                };
                self.console.problem(
                    &format!(
                        "{name}: build failed after {:.1} s; the running version keeps answering",
                        took.as_secs_f64()
                    ),
                    &details,
                );
            }
            BuildEvent::Skipped { name, why } => {
                self.console.note(&format!("{name}: not rebuilt: {why}"));
            }
        }
    }

    /// Says what hot reload did since the last look: a bot started, swapped to a
    /// new version, stopped, or a file refused (and why).
    fn report_reloads(&self, feed: &mut ReloadFeed) {
        for ev in feed.stats.recent() {
            if ev.seq <= feed.seen {
                continue;
            }
            feed.seen = ev.seq;
            let (label, detail) = (&ev.label, clean(&ev.detail));
            match ev.event {
                "reloaded" => self
                    .console
                    .note(&format!("hot reload: {label} swapped to its new {detail}")),
                "loaded" => self
                    .console
                    .note(&format!("hot reload: started a bot for {label} ({detail})")),
                "unloaded" => self
                    .console
                    .note(&format!("hot reload: {label} stopped: {detail}")),
                "rejected" => self.console.problem(
                    &format!("hot reload: refused {label}.wasm; a running version keeps serving"),
                    &[detail],
                ),
                other => self.console.note(&format!("hot reload: {label} {other}")),
            }
        }
    }

    /// The interactive loop: until `/quit`, Ctrl-D or `shutdown`.
    pub async fn interactive(
        &mut self,
        ws: &mut Ws,
        mut input: mpsc::Receiver<String>,
        mut feeds: Feeds,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        self.console.show_prompt();
        loop {
            tokio::select! {
                side = feeds.next() => self.on_side(side, &mut feeds),
                _ = &mut shutdown => {
                    self.console.end();
                    return Ok(());
                }
                line = input.recv() => {
                    self.console.input_taken();
                    let Some(line) = line else {
                        self.console.end();
                        return Ok(());
                    };
                    if let Flow::Quit = self.on_input(ws, &line).await? {
                        return Ok(());
                    }
                    self.console.show_prompt();
                }
                frame = ws.next() => match frame {
                    Some(Ok(frame)) => self.on_frame(frame)?,
                    Some(Err(e)) => anyhow::bail!("the chat connection failed: {e}"),
                    None => anyhow::bail!("the local chat server closed the connection"),
                },
            }
        }
    }

    /// The piped loop: posts every input line, then waits for the bots to go quiet
    /// (`quiet` without a word, every bot's queue and outbox empty, no rebuild
    /// running), at most `max_wait` after the end of input.
    pub async fn piped(
        &mut self,
        ws: &mut Ws,
        mut input: mpsc::Receiver<String>,
        mut feeds: Feeds,
        shutdown: impl Future<Output = ()>,
        bots: &[SessionHandle],
        (quiet, max_wait): (Duration, Duration),
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let mut input_open = true;
        // When to look whether everything is quiet: `quiet` after the last activity.
        let mut check_at = Instant::now() + quiet;
        // Set when the input ends: the latest moment to stop waiting.
        let mut deadline = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        loop {
            let may_end = !input_open && self.pending_echoes == 0;
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                side = feeds.next() => self.on_side(side, &mut feeds),
                line = input.recv(), if input_open => {
                    let quit = match line {
                        Some(line) => matches!(self.on_input(ws, &line).await?, Flow::Quit),
                        None => true,
                    };
                    if quit {
                        input_open = false;
                        deadline = Instant::now() + max_wait;
                    }
                    check_at = Instant::now() + quiet;
                },
                frame = ws.next() => {
                    match frame {
                        Some(Ok(frame)) => self.on_frame(frame)?,
                        Some(Err(e)) => anyhow::bail!("the chat connection failed: {e}"),
                        None => anyhow::bail!("the local chat server closed the connection"),
                    }
                    check_at = Instant::now() + quiet;
                }
                _ = tokio::time::sleep_until(check_at), if may_end => {
                    let busy = feeds.busy()
                        || bots.iter().any(|session| {
                            session.inbound_waiting() > 0 || session.status().outbox_depth > 0
                        });
                    if !busy {
                        return Ok(());
                    }
                    check_at = Instant::now() + Duration::from_millis(100);
                }
                _ = tokio::time::sleep_until(deadline), if !input_open => {
                    eprintln!(
                        "roost dev: still not quiet {} s after the end of input; stopping",
                        max_wait.as_secs()
                    );
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_input_lines() {
        assert_eq!(parse_input("@echo hi "), Input::Say("@echo hi".into()));
        assert_eq!(parse_input("   "), Input::Nothing);
        assert_eq!(parse_input("/join #debug"), Input::Join("debug".into()));
        assert_eq!(parse_input("/join debug"), Input::Join("debug".into()));
        assert!(matches!(parse_input("/join"), Input::Invalid(_)));
        assert!(matches!(parse_input("/join a b"), Input::Invalid(_)));
        assert_eq!(parse_input("/who"), Input::Who);
        assert_eq!(parse_input("/quit"), Input::Quit);
        assert_eq!(parse_input("/help"), Input::Help);
        assert_eq!(parse_input("//shrug"), Input::Say("/shrug".into()));
        assert!(matches!(parse_input("/dance"), Input::Invalid(e) if e.contains("/dance")));
    }
}
