//! The bench's own chat clients, written against the wire protocol only (no roost
//! code): REST calls, a WebSocket agent whose frames a reader task turns into
//! [`Event`]s, and the bare echo bot that is the floor of the comparison.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// Every network wait of the bench's clients is bounded by this.
pub const NET_TIMEOUT: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<TcpStream>;

/// REST calls to one server.
#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
    pub addr: SocketAddr,
}

impl Http {
    pub fn new(addr: SocketAddr) -> anyhow::Result<Http> {
        let client = reqwest::Client::builder()
            .timeout(NET_TIMEOUT)
            .no_proxy()
            .build()?;
        Ok(Http { client, addr })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Registers `name` (a suffix is added if it is taken); returns (name, key).
    pub async fn register(&self, name: &str) -> anyhow::Result<(String, String)> {
        for attempt in 0..5u32 {
            let try_name = if attempt == 0 {
                name.to_owned()
            } else {
                format!("{name}-{:04x}", rand::random::<u16>())
            };
            let resp = self
                .client
                .post(self.url("/api/register"))
                .json(&json!({"name": try_name, "description": "dataplane bench client"}))
                .send()
                .await
                .context("POST /api/register")?;
            let status = resp.status();
            if status.as_u16() == 409 {
                continue;
            }
            anyhow::ensure!(status.is_success(), "POST /api/register: {status}");
            let body: serde_json::Value = resp.json().await.context("register body")?;
            let key = body["key"]
                .as_str()
                .context("register: no `key` in the answer")?;
            let got = body["name"].as_str().unwrap_or(&try_name);
            return Ok((got.to_owned(), key.to_owned()));
        }
        anyhow::bail!("POST /api/register: the name {name} and 4 variants are taken")
    }

    /// `GET /api/rooms/:room/agents`: the names in the room.
    pub async fn room_agents(&self, key: &str, room: &str) -> anyhow::Result<Vec<String>> {
        let resp = self
            .client
            .get(self.url(&format!("/api/rooms/{room}/agents")))
            .header("x-api-key", key)
            .send()
            .await
            .with_context(|| format!("GET /api/rooms/{room}/agents"))?;
        let status = resp.status();
        anyhow::ensure!(
            status.is_success(),
            "GET /api/rooms/{room}/agents: {status}"
        );
        let body: Vec<serde_json::Value> = resp.json().await?;
        Ok(body
            .iter()
            .filter_map(|a| a["name"].as_str().map(str::to_owned))
            .collect())
    }

    /// A plain GET of any URL (the metrics endpoint), as text.
    pub async fn get_text(&self, url: &str) -> anyhow::Result<String> {
        let resp = self.client.get(url).send().await?;
        let status = resp.status();
        anyhow::ensure!(status.is_success(), "GET {url}: {status}");
        Ok(resp.text().await?)
    }
}

/// What an agent's socket delivered, stamped when it was read.
#[derive(Debug)]
pub enum Event {
    Msg {
        room: String,
        from: String,
        text: String,
        at: Instant,
    },
    /// An `error` frame from the server.
    Error(String),
    /// The socket ended.
    Closed(String),
}

#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    room: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    message: String,
}

/// Opens `/ws?key=` over a TCP connection with TCP_NODELAY set.
async fn connect_ws(addr: SocketAddr, key: &str) -> anyhow::Result<Ws> {
    let tcp = tokio::time::timeout(NET_TIMEOUT, TcpStream::connect(addr))
        .await
        .context("TCP connect timed out")??;
    tcp.set_nodelay(true)?;
    let url = format!("ws://{addr}/ws?key={key}");
    let (ws, _) = tokio::time::timeout(NET_TIMEOUT, tokio_tungstenite::client_async(url, tcp))
        .await
        .context("WebSocket handshake timed out")?
        .context("WebSocket handshake")?;
    Ok(ws)
}

fn send_frame(room: &str, text: &str) -> Message {
    Message::Text(
        json!({"type": "send", "room": room, "text": text})
            .to_string()
            .into(),
    )
}

fn join_frame(room: &str) -> Message {
    Message::Text(json!({"type": "join", "room": room}).to_string().into())
}

/// The system line the server posts when `agent` joins `room`.
pub fn join_line(agent: &str, room: &str) -> String {
    format!("\u{26a1} {agent} joined #{room}.")
}

/// The agent named by a join line (`⚡ NAME joined #ROOM.`), if `text` is one.
pub fn joined_agent(text: &str) -> Option<&str> {
    let rest = text.strip_prefix("\u{26a1} ")?;
    let (name, room) = rest.split_once(" joined #")?;
    room.ends_with('.').then_some(name)
}

async fn read_frames(mut stream: SplitStream<Ws>, tx: mpsc::UnboundedSender<Event>) {
    let why = loop {
        let Some(msg) = stream.next().await else {
            break "the server closed the connection".to_owned();
        };
        let at = Instant::now();
        let text = match msg {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(c)) => break format!("close frame {c:?}"),
            Ok(_) => continue,
            Err(e) => break format!("socket error: {e}"),
        };
        let Ok(f) = serde_json::from_str::<Frame>(text.as_str()) else {
            continue;
        };
        let ev = match f.kind.as_str() {
            "message" => Event::Msg {
                room: f.room,
                from: f.from,
                text: f.text,
                at,
            },
            "error" => Event::Error(f.message),
            _ => continue,
        };
        if tx.send(ev).is_err() {
            return;
        }
    };
    let _ = tx.send(Event::Closed(why));
}

/// A chat participant driven by the bench: it writes frames itself and reads
/// [`Event`]s that its reader task produces.
pub struct Agent {
    pub name: String,
    pub key: String,
    sink: SplitSink<Ws, Message>,
    pub events: mpsc::UnboundedReceiver<Event>,
    reader: JoinHandle<()>,
}

impl Agent {
    pub async fn connect(http: &Http, name: &str) -> anyhow::Result<Agent> {
        let (name, key) = http.register(name).await?;
        let ws = connect_ws(http.addr, &key).await?;
        let (sink, stream) = ws.split();
        let (tx, events) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_frames(stream, tx));
        Ok(Agent {
            name,
            key,
            sink,
            events,
            reader,
        })
    }

    /// Queues a `send` frame without flushing.
    pub async fn feed(&mut self, room: &str, text: &str) -> anyhow::Result<()> {
        self.sink.feed(send_frame(room, text)).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.sink.flush().await?;
        Ok(())
    }

    pub async fn send(&mut self, room: &str, text: &str) -> anyhow::Result<()> {
        self.sink.send(send_frame(room, text)).await?;
        Ok(())
    }

    /// Joins every room of `rooms` and waits for the server's join line in each.
    pub async fn join(&mut self, rooms: &[String]) -> anyhow::Result<()> {
        for room in rooms {
            self.sink.feed(join_frame(room)).await?;
        }
        self.sink.flush().await?;
        let mut missing: std::collections::HashSet<String> =
            rooms.iter().map(|r| join_line(&self.name, r)).collect();
        let deadline = Instant::now() + NET_TIMEOUT + Duration::from_millis(rooms.len() as u64);
        while !missing.is_empty() {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => anyhow::bail!(
                    "{} joined {} of {} rooms within the time limit",
                    self.name,
                    rooms.len() - missing.len(),
                    rooms.len()
                ),
                Ok(None) => anyhow::bail!("{}: event stream ended", self.name),
                Ok(Some(Event::Msg { from, text, .. })) if from == "system" => {
                    missing.remove(&text);
                }
                Ok(Some(Event::Closed(why))) => anyhow::bail!("{}: {why}", self.name),
                Ok(Some(Event::Error(e))) => anyhow::bail!("{}: server error {e}", self.name),
                Ok(Some(_)) => {}
            }
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The floor: an echo bot in plain tokio-tungstenite. For every message mentioning it
/// (`@NAME rest`) it sends `rest` back to the same room, one write per reply.
pub struct BareEcho {
    pub name: String,
    task: JoinHandle<anyhow::Result<u64>>,
}

impl BareEcho {
    /// Registers, connects and joins `room`; returns once the join is confirmed.
    pub async fn start(http: &Http, name: &str, room: &str) -> anyhow::Result<BareEcho> {
        let (name, key) = http.register(name).await?;
        let mut ws = connect_ws(http.addr, &key).await?;
        ws.send(join_frame(room)).await?;
        let want = join_line(&name, room);
        tokio::time::timeout(NET_TIMEOUT, async {
            while let Some(msg) = ws.next().await {
                if let Message::Text(t) = msg?
                    && let Ok(f) = serde_json::from_str::<Frame>(t.as_str())
                    && f.kind == "message"
                    && f.from == "system"
                    && f.text == want
                {
                    return Ok(());
                }
            }
            anyhow::bail!("socket closed before the join was confirmed")
        })
        .await
        .context("bare echo: join not confirmed in time")??;
        let me = name.clone();
        let task = tokio::spawn(async move {
            let mention = format!("@{me}");
            let mut replies = 0u64;
            while let Some(msg) = ws.next().await {
                let Message::Text(t) = msg? else { continue };
                let Ok(f) = serde_json::from_str::<Frame>(t.as_str()) else {
                    continue;
                };
                if f.kind != "message" || f.from == "system" || f.from == me {
                    continue;
                }
                let Some(at) = f.text.find(&mention) else {
                    continue;
                };
                let rest = f.text[at + mention.len()..].trim();
                if rest.is_empty() {
                    continue;
                }
                ws.send(send_frame(&f.room, rest)).await?;
                replies += 1;
            }
            Ok(replies)
        });
        Ok(BareEcho { name, task })
    }
}

impl Drop for BareEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}
