//! Helpers shared by the integration tests: a local chat server, a folder of
//! plugins, a host configuration, and waits on the server's events.

use std::path::{Path, PathBuf};
use std::time::Duration;

use roost::config::Config;
use roost::devserver::{self, DevServer, ServerConfig, ServerEvent};
use roost::llm::fake::FakeLlm;
use roost::plugin::bindings::Action;
use roost::plugin::{Runtime, RuntimeConfig};
use roost::protocol::ChatMessage;
use tokio::sync::broadcast;

/// How long [`wait_joined`] waits for a bot to join a room.
const JOIN_WAIT: Duration = Duration::from_secs(20);

/// A chat server with the default configuration on a free local port.
pub async fn server() -> DevServer {
    devserver::spawn("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .expect("server")
}

/// A fake LLM provider on a free local port.
pub async fn fake() -> FakeLlm {
    FakeLlm::spawn("127.0.0.1:0".parse().unwrap())
        .await
        .expect("fake llm")
}

pub fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig::default()).expect("runtime")
}

/// The texts a persona said, in order.
pub fn said(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Say(o) => Some(o.text.clone()),
            _ => None,
        })
        .collect()
}

/// A config pointing at `server`, with plugins and state in `dir`.
pub fn config_for(server: &str, dir: &Path) -> Config {
    let mut c = Config::default();
    c.server.url = server.to_string();
    c.paths.plugins = dir.join("plugins");
    c.paths.state = dir.join("state");
    c
}

/// The plugins folder in `dir` (the one [`config_for`] names), created if missing.
pub fn plugins(dir: &Path) -> PathBuf {
    let p = dir.join("plugins");
    std::fs::create_dir_all(&p).expect("mkdir plugins");
    p
}

/// Copies `wasm` into the plugins folder in `dir` as `{as_name}.wasm`; returns the copy.
pub fn install(dir: &Path, wasm: &Path, as_name: &str) -> PathBuf {
    let to = plugins(dir).join(format!("{as_name}.wasm"));
    std::fs::copy(wasm, &to).expect("copy");
    to
}

/// Waits for a message event matching `pred`, up to `within`.
pub async fn wait_message(
    events: &mut broadcast::Receiver<ServerEvent>,
    within: Duration,
    pred: impl Fn(&ChatMessage) -> bool,
) -> Option<ChatMessage> {
    wait_message_recording(events, &mut Vec::new(), within, pred).await
}

/// [`wait_message`], also appending every message seen (the match included) to `seen`.
pub async fn wait_message_recording(
    events: &mut broadcast::Receiver<ServerEvent>,
    seen: &mut Vec<ChatMessage>,
    within: Duration,
    pred: impl Fn(&ChatMessage) -> bool,
) -> Option<ChatMessage> {
    tokio::time::timeout(within, async {
        loop {
            match events.recv().await {
                Ok(ServerEvent::Message(m)) => {
                    seen.push(m.clone());
                    if pred(&m) {
                        return Some(m);
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Waits up to `within` until `pred` matches a server event; panics naming `what`
/// if it does not, or if the server goes away.
pub async fn wait_event(
    events: &mut broadcast::Receiver<ServerEvent>,
    within: Duration,
    what: &str,
    pred: impl Fn(&ServerEvent) -> bool,
) {
    tokio::time::timeout(within, async {
        loop {
            match events.recv().await {
                Ok(e) if pred(&e) => return,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => panic!("server gone"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// Waits (up to 20 s) until `agent` has joined `room`.
pub async fn wait_joined(events: &mut broadcast::Receiver<ServerEvent>, agent: &str, room: &str) {
    wait_joined_within(events, JOIN_WAIT, agent, room).await;
}

/// Waits (up to 20 s) until every one of `agents` has joined `room`, in any order (bots
/// of one host start concurrently).
pub async fn wait_all_joined(
    events: &mut broadcast::Receiver<ServerEvent>,
    agents: &[&str],
    room: &str,
) {
    let mut waiting: Vec<&str> = agents.to_vec();
    let what = format!("{agents:?} to join #{room}");
    tokio::time::timeout(JOIN_WAIT, async {
        while !waiting.is_empty() {
            match events.recv().await {
                Ok(ServerEvent::Joined { agent, room: r }) if r == room => {
                    waiting.retain(|a| *a != agent);
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => panic!("server gone"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// Waits up to `within` until `agent` has joined `room`.
pub async fn wait_joined_within(
    events: &mut broadcast::Receiver<ServerEvent>,
    within: Duration,
    agent: &str,
    room: &str,
) {
    wait_event(
        events,
        within,
        &format!("{agent} to join #{room}"),
        |e| matches!(e, ServerEvent::Joined { agent: a, room: r } if a == agent && r == room),
    )
    .await;
}
