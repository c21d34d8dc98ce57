//! One WebSocket connection: the `connected` greeting, client frames in,
//! broadcast frames out, stalls and faults.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::Instance;
use super::state::{Conn, Outbound, PostError, ServerState};
use crate::protocol::{ClientFrame, ProtocolError, ServerFrame, decode_client_frame};

/// How long a connection we close waits for the client's close reply.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Removes the connection from the state when its task ends, is aborted or
/// never started.
struct ConnGuard {
    state: ServerState,
    inst: Arc<Instance>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.state.remove_conn(self.id);
        self.inst.live.fetch_sub(1, Ordering::SeqCst);
        self.inst.idle.notify_waiters();
    }
}

/// Called by axum after the upgrade: runs the connection in its own task so
/// that it can be aborted (= the socket dropped without a close frame).
pub(crate) async fn accept(
    state: ServerState,
    inst: Arc<Instance>,
    agent: String,
    socket: WebSocket,
) {
    let id = state.next_conn_id();
    let (tx, rx) = mpsc::channel(state.config().outbox_capacity.max(1));
    let (start_tx, start_rx) = oneshot::channel::<()>();
    inst.live.fetch_add(1, Ordering::SeqCst);
    let guard = ConnGuard {
        state: state.clone(),
        inst: inst.clone(),
        id,
    };
    let task_state = state.clone();
    let task_inst = inst.clone();
    let task_agent = agent.clone();
    let task = tokio::spawn(async move {
        let _guard = guard;
        if start_rx.await.is_err() {
            return;
        }
        run(task_state, task_inst, id, task_agent, socket, rx).await;
    });
    let conn = Conn {
        agent,
        instance: inst.id,
        rooms: Default::default(),
        tx,
        abort: task.abort_handle(),
    };
    if !state.insert_conn(id, conn) || inst.closed.load(Ordering::SeqCst) {
        task.abort();
        return;
    }
    let _ = start_tx.send(());
}

/// Waits while the server is stalled; returns when it is not (or never will be).
pub(crate) async fn wait_unstalled(rx: &mut watch::Receiver<Option<Instant>>) {
    loop {
        let deadline = *rx.borrow_and_update();
        match deadline {
            Some(d) if Instant::now() < d => {
                tokio::select! {
                    _ = tokio::time::sleep_until(d) => {}
                    changed = rx.changed() => if changed.is_err() { return },
                }
            }
            _ => return,
        }
    }
}

fn error_frame(message: impl Into<String>, code: &str) -> Message {
    Message::Text(Utf8Bytes::from(
        ServerFrame::Error {
            message: message.into(),
            code: Some(code.to_owned()),
            retry_after_ms: None,
        }
        .encode(),
    ))
}

fn truncate_reason(reason: &str) -> String {
    // A close frame's reason is at most 123 bytes.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// The error frame of a refused `send` under
/// [`Faults::rate_limit_ws_sends`](super::Faults::rate_limit_ws_sends).
fn rate_limited_frame(retry_after: Duration) -> Message {
    let secs = super::retry_after_secs(retry_after);
    Message::Text(Utf8Bytes::from(
        serde_json::json!({
            "type": "error",
            "error": format!("rate limited: slow down, retry in {secs} s"),
            "code": "rate_limited",
            "retry_after": secs,
        })
        .to_string(),
    ))
}

/// Handles one client text frame; returns an error frame to send back, if any.
fn handle_client_text(
    state: &ServerState,
    inst: &Instance,
    id: u64,
    text: &str,
) -> Option<Message> {
    let frame = match decode_client_frame(text) {
        Ok(f) => f,
        Err(ProtocolError::UnknownFrameType(t)) => {
            return Some(error_frame(
                format!("unknown frame type {t:?}"),
                "unknown_type",
            ));
        }
        Err(e) => return Some(error_frame(format!("bad frame: {e}"), "bad_frame")),
    };
    let result = match frame {
        ClientFrame::Join { room } => state.conn_join(id, &room),
        ClientFrame::Leave { room } => {
            state.conn_leave(id, &room);
            Ok(())
        }
        ClientFrame::Send { room, text } => {
            if let Some(retry_after) = inst.ws_send_limit.take() {
                return Some(rate_limited_frame(retry_after));
            }
            state.conn_send(id, &room, &inst.rewrite(text)).map(|_| ())
        }
    };
    match result {
        Ok(()) => None,
        Err(e) => {
            let code = match e {
                PostError::InvalidRoom(_) | PostError::NoSuchRoom => "bad_room",
                PostError::NotJoined(_) => "not_joined",
                PostError::EmptyText | PostError::TextTooLong(_) => "bad_text",
                _ => "error",
            };
            Some(error_frame(e.to_string(), code))
        }
    }
}

/// Frames written to one client before a flush.
const WRITE_BATCH: usize = 64;

/// Sends a close frame and gives the client a moment to answer with its own.
async fn close(
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
    code: u16,
    reason: &str,
) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from(truncate_reason(reason)),
    };
    if sink.send(Message::Close(Some(frame))).await.is_ok() {
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while let Some(Ok(msg)) = stream.next().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

async fn run(
    state: ServerState,
    inst: Arc<Instance>,
    id: u64,
    agent: String,
    socket: WebSocket,
    mut out_rx: mpsc::Receiver<Outbound>,
) {
    let (mut sink, mut stream) = socket.split();
    let mut stall = inst.stall.subscribe();
    wait_unstalled(&mut stall).await;

    let connected = ServerFrame::Connected {
        agent: agent.clone(),
        rooms: state.rooms().into_iter().map(|r| r.name).collect(),
        encryption: Some("active".into()),
        message: Some(format!(
            "Welcome, {agent}. Join a room before sending to it."
        )),
    };
    if sink
        .send(Message::Text(Utf8Bytes::from(connected.encode())))
        .await
        .is_err()
    {
        return;
    }
    state.connected(&agent, id);
    state.post_system("lobby", &format!("\u{26a1} {agent} connected."));

    loop {
        // Stalled: read nothing (so no pongs either), write nothing.
        let deadline = *stall.borrow_and_update();
        if let Some(d) = deadline.filter(|d| Instant::now() < *d) {
            tokio::select! {
                _ = tokio::time::sleep_until(d) => {}
                changed = stall.changed() => if changed.is_err() { return },
            }
            continue;
        }
        tokio::select! {
            biased;
            changed = stall.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            out = out_rx.recv() => match out {
                None => return,
                Some(Outbound::Text(text)) => {
                    // Everything already queued for this client goes out in one write.
                    if sink.feed(Message::Text(text)).await.is_err() {
                        return;
                    }
                    let mut batch = 1;
                    while batch < WRITE_BATCH {
                        match out_rx.try_recv() {
                            Ok(Outbound::Text(text)) => {
                                if sink.feed(Message::Text(text)).await.is_err() {
                                    return;
                                }
                                batch += 1;
                            }
                            Ok(Outbound::Close { code, reason }) => {
                                close(&mut sink, &mut stream, code, &reason).await;
                                return;
                            }
                            Err(_) => break,
                        }
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                }
                Some(Outbound::Close { code, reason }) => {
                    close(&mut sink, &mut stream, code, &reason).await;
                    return;
                }
            },
            incoming = stream.next() => match incoming {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Text(text))) => {
                    if let Some(reply) = handle_client_text(&state, &inst, id, text.as_str())
                        && sink.send(reply).await.is_err()
                    {
                        return;
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    if sink.send(error_frame("binary frames are not supported", "bad_frame")).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) => {
                    // tungstenite queued the close reply; flush it before dropping the socket.
                    let _ = sink.flush().await;
                    return;
                }
                // Pings are answered by tungstenite while we read.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            },
        }
    }
}
