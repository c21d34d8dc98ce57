//! Tests of the local chat server over real sockets (127.0.0.1:0), with
//! reqwest and tokio-tungstenite as clients. Waits are bounded by timeouts on
//! events, never fixed sleeps, except where the point is that nothing happens.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::*;
use crate::protocol::{
    AgentList, ChatMessage, ClientFrame, ErrorBody, MessageList, ProtocolError, ProtocolStats,
    RegisterResponse, RoomAgentList, RoomList, ServerFrame, decode_server_frame,
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(5);
/// How long we watch for something that must NOT happen.
const QUIET: Duration = Duration::from_millis(250);

async fn start() -> DevServer {
    start_with(ServerConfig::default()).await
}

async fn start_with(config: ServerConfig) -> DevServer {
    spawn("127.0.0.1:0".parse().unwrap(), config).await.unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(WAIT).build().unwrap()
}

async fn register(server: &DevServer, name: &str) -> (StatusCode, String) {
    let resp = http()
        .post(format!("{}/api/register", server.base_url()))
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"name":{},"description":"test"}}"#,
            serde_json::Value::from(name)
        ))
        .send()
        .await
        .unwrap();
    (resp.status(), resp.text().await.unwrap())
}

/// Registers `name` and returns its key.
async fn agent(server: &DevServer, name: &str) -> String {
    let (status, body) = register(server, name).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let reg = RegisterResponse::decode(&body).unwrap();
    assert_eq!(reg.name.as_deref(), Some(name));
    reg.key.expose().to_owned()
}

async fn get(server: &DevServer, key: &str, path: &str) -> (StatusCode, String) {
    let resp = http()
        .get(format!("{}{path}", server.base_url()))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    (resp.status(), resp.text().await.unwrap())
}

async fn post(server: &DevServer, key: &str, path: &str, body: &str) -> (StatusCode, String) {
    let resp = http()
        .post(format!("{}{path}", server.base_url()))
        .header("x-api-key", key)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    (resp.status(), resp.text().await.unwrap())
}

async fn try_connect(server: &DevServer, key: &str) -> Result<Ws, tungstenite::Error> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let url = format!("{}?key={key}", server.ws_url());
    let (ws, _) = timeout(
        WAIT,
        tokio_tungstenite::connect_async_with_config(url, Some(config), false),
    )
    .await
    .expect("connect timed out")?;
    Ok(ws)
}

/// Connects and reads the `connected` frame.
async fn connect(server: &DevServer, key: &str, name: &str) -> Ws {
    let mut ws = try_connect(server, key).await.unwrap();
    match next_frame(&mut ws).await {
        ServerFrame::Connected {
            agent,
            rooms,
            encryption,
            ..
        } => {
            assert_eq!(agent, name);
            assert!(rooms.iter().any(|r| r == "lobby"), "{rooms:?}");
            assert_eq!(encryption.as_deref(), Some("active"));
        }
        other => panic!("expected connected, got {other:?}"),
    }
    ws
}

/// The next text frame, as raw text (skips ping/pong).
async fn next_text(ws: &mut Ws) -> String {
    loop {
        let msg = timeout(WAIT, ws.next())
            .await
            .expect("no frame within the timeout")
            .expect("socket ended")
            .expect("socket error");
        match msg {
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn next_frame(ws: &mut Ws) -> ServerFrame {
    let text = next_text(ws).await;
    decode_server_frame(&text).unwrap_or_else(|e| panic!("{e}: {text:.200}"))
}

async fn next_message(ws: &mut Ws) -> ChatMessage {
    match next_frame(ws).await {
        ServerFrame::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

async fn send(ws: &mut Ws, frame: ClientFrame) {
    ws.send(Message::text(frame.encode())).await.unwrap();
}

async fn join(ws: &mut Ws, room: &str, me: &str) {
    send(ws, ClientFrame::Join { room: room.into() }).await;
    let m = next_message(ws).await;
    assert_eq!(m.from, "system");
    assert_eq!(m.text, format!("\u{26a1} {me} joined #{room}."));
}

/// Asserts nothing arrives on `ws` for a short while.
async fn assert_quiet(ws: &mut Ws) {
    if let Ok(Some(Ok(m))) = timeout(QUIET, ws.next()).await {
        panic!("unexpected frame {m:?}");
    }
}

/// Asserts the socket ends without a close frame.
async fn assert_dropped(ws: &mut Ws) {
    loop {
        match timeout(WAIT, ws.next()).await.expect("socket not dropped") {
            None | Some(Err(_)) => return,
            Some(Ok(Message::Close(c))) => {
                panic!("got a close frame {c:?}, expected an abrupt drop")
            }
            Some(Ok(_)) => continue,
        }
    }
}

async fn wait_for_connections(server: &DevServer, n: usize) {
    timeout(WAIT, async {
        while server.connection_count() != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "expected {n} connections, have {}",
            server.connection_count()
        )
    });
}

#[tokio::test]
async fn register_conflict_invalid_and_unauthorized() {
    let server = start().await;
    let key = agent(&server, "the shining ribbons-5ea3").await;
    assert!(key.len() > 16);

    // taken, also case-insensitively; "system" is reserved
    for name in [
        "the shining ribbons-5ea3",
        "THE SHINING RIBBONS-5EA3",
        "system",
    ] {
        let (status, body) = register(&server, name).await;
        assert_eq!(status, StatusCode::CONFLICT, "{name}");
        assert_eq!(
            ErrorBody::decode(&body).unwrap().code.as_deref(),
            Some("name_taken")
        );
    }
    // names are 2-30 characters
    let (status, _) = register(&server, "ab").await;
    assert_eq!(status, StatusCode::CREATED);
    for name in ["a", "", &"x".repeat(31), " padded", "tab\there"] {
        let (status, body) = register(&server, name).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name:?}: {body}");
        assert!(ErrorBody::decode(&body).is_ok(), "{body}");
    }
    let (status, _) = register(&server, &"\u{e9}".repeat(30)).await;
    assert_eq!(status, StatusCode::CREATED);
    // bad bodies
    for body in ["", "{", "[]", r#"{"name":5}"#, r#"{"description":"x"}"#] {
        let resp = http()
            .post(format!("{}/api/register", server.base_url()))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
    }

    // REST without / with a wrong key
    for bad in ["", "nope"] {
        let (status, body) = get(&server, bad, "/api/rooms").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let e = ErrorBody::decode(&body).unwrap();
        assert_eq!(e.code.as_deref(), Some("unauthorized"));
    }
    // WebSocket with a wrong key: 401 before the upgrade
    match try_connect(&server, "nope").await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    let (status, _) = get(&server, &key, "/api/rooms").await;
    assert_eq!(status, StatusCode::OK);

    let (status, body) = get(&server, &key, "/api/agents").await;
    assert_eq!(status, StatusCode::OK);
    let agents = AgentList::decode(&body).unwrap();
    assert_eq!(agents.0.len(), 3);
    assert!(agents.0.iter().all(|a| a.registered_at.is_some()));

    let (status, body) = get(&server, &key, "/api/nowhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(ErrorBody::decode(&body).is_ok());
    server.shutdown().await;
}

#[tokio::test]
async fn room_list_shapes() {
    for shape in [RoomListShape::Names, RoomListShape::Objects] {
        let server = start_with(ServerConfig {
            room_list_shape: shape,
            ..ServerConfig::default()
        })
        .await;
        let key = agent(&server, "rook").await;
        let (status, body) = get(&server, &key, "/api/rooms").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body.starts_with("[\""),
            shape == RoomListShape::Names,
            "{body}"
        );
        let rooms = RoomList::decode(&body).unwrap();
        assert!(rooms.names().contains(&"lobby".to_owned()));
        server.shutdown().await;
    }
}

#[tokio::test]
async fn join_send_echo_and_broadcast() {
    let server = start().await;
    let ka = agent(&server, "alice").await;
    let kb = agent(&server, "bob").await;
    let mut a = connect(&server, &ka, "alice").await;
    join(&mut a, "lobby", "alice").await;

    // bob connecting is announced in the lobby
    let mut b = connect(&server, &kb, "bob").await;
    let m = next_message(&mut a).await;
    assert_eq!(
        (m.from.as_str(), m.text.as_str()),
        ("system", "\u{26a1} bob connected.")
    );

    // bob joins: both see the join line
    join(&mut b, "lobby", "bob").await;
    let m = next_message(&mut a).await;
    assert_eq!(m.text, "\u{26a1} bob joined #lobby.");

    // alice sends: bob gets it, alice gets the echo
    send(
        &mut a,
        ClientFrame::Send {
            room: "lobby".into(),
            text: "hello \u{1F980}".into(),
        },
    )
    .await;
    let echo = next_message(&mut a).await;
    let got = next_message(&mut b).await;
    assert_eq!(echo, got);
    assert_eq!(
        (got.from.as_str(), got.text.as_str(), got.room.as_str()),
        ("alice", "hello \u{1F980}", "lobby")
    );

    // sending to a room not joined on this connection is an error frame
    send(
        &mut a,
        ClientFrame::Send {
            room: "debug".into(),
            text: "hi".into(),
        },
    )
    .await;
    match next_frame(&mut a).await {
        ServerFrame::Error { code, .. } => assert_eq!(code.as_deref(), Some("not_joined")),
        other => panic!("{other:?}"),
    }
    // joining an unknown room creates it; bob is not in it and hears nothing
    join(&mut a, "brand-new", "alice").await;
    send(
        &mut a,
        ClientFrame::Send {
            room: "brand-new".into(),
            text: "anyone?".into(),
        },
    )
    .await;
    assert_eq!(next_message(&mut a).await.text, "anyone?");
    assert!(server.state().room_exists("brand-new"));

    // joining is per connection: a second socket of alice cannot send to lobby yet
    let mut a2 = connect(&server, &ka, "alice").await;
    // (a and b see alice's "connected" line)
    assert_eq!(next_message(&mut a).await.text, "\u{26a1} alice connected.");
    assert_eq!(next_message(&mut b).await.text, "\u{26a1} alice connected.");
    send(
        &mut a2,
        ClientFrame::Send {
            room: "lobby".into(),
            text: "x".into(),
        },
    )
    .await;
    assert!(matches!(
        next_frame(&mut a2).await,
        ServerFrame::Error { .. }
    ));

    // garbage, unknown frame types, bad rooms, empty text: error frames, socket stays up
    for (raw, code) in [
        ("not json", "bad_frame"),
        (r#"{"type":"dance"}"#, "unknown_type"),
        (r#"{"type":"join","room":"no spaces"}"#, "bad_room"),
        (r#"{"type":"send","room":"lobby"}"#, "bad_frame"),
        (r#"{"type":"send","room":"lobby","text":"   "}"#, "bad_text"),
    ] {
        a.send(Message::text(raw)).await.unwrap();
        match next_frame(&mut a).await {
            ServerFrame::Error { code: c, .. } => assert_eq!(c.as_deref(), Some(code), "{raw}"),
            other => panic!("{raw}: {other:?}"),
        }
    }
    a.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert!(matches!(
        next_frame(&mut a).await,
        ServerFrame::Error { .. }
    ));

    // leave: bob no longer hears lobby
    let mut events = server.state().subscribe();
    send(
        &mut b,
        ClientFrame::Leave {
            room: "lobby".into(),
        },
    )
    .await;
    timeout(WAIT, async {
        while !matches!(events.recv().await, Ok(ServerEvent::Left { .. })) {}
    })
    .await
    .expect("no Left event");
    send(
        &mut a,
        ClientFrame::Send {
            room: "lobby".into(),
            text: "after leave".into(),
        },
    )
    .await;
    assert_eq!(next_message(&mut a).await.text, "after leave");
    assert_quiet(&mut b).await;

    // room membership
    let (status, body) = get(&server, &ka, "/api/rooms/lobby/agents").await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<String> = RoomAgentList::decode(&body)
        .unwrap()
        .0
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, ["alice"]);

    // pings are answered
    a.send(Message::Ping(b"hi".to_vec().into())).await.unwrap();
    let pong = timeout(WAIT, async {
        loop {
            if let Some(Ok(Message::Pong(p))) = a.next().await {
                return p;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&pong[..], b"hi");

    // a client close ends the connection
    a2.close(None).await.unwrap();
    wait_for_connections(&server, 2).await;
    server.shutdown().await;
}

#[tokio::test]
async fn history_after_and_limit() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    let path = "/api/rooms/debug/messages";
    let mut sent = Vec::new();
    for i in 0..30 {
        let (status, body) = post(&server, &key, path, &format!(r#"{{"text":"m{i}"}}"#)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        sent.push(ChatMessage::decode(&body).unwrap());
    }
    // strictly increasing timestamps even when posted within one ms
    assert!(
        sent.windows(2)
            .all(|w| w[0].timestamp_ms < w[1].timestamp_ms)
    );

    let history = |query: String| {
        let server = &server;
        let key = key.clone();
        async move {
            let (status, body) = get(server, &key, &format!("{path}{query}")).await;
            assert_eq!(status, StatusCode::OK, "{query}: {body}");
            MessageList::decode(&body).unwrap().0
        }
    };
    // default 20, newest first
    let h = history(String::new()).await;
    assert_eq!(h.len(), 20);
    assert_eq!(h[0], sent[29]);
    assert_eq!(h[19], sent[10]);
    assert!(h.windows(2).all(|w| w[0].timestamp_ms > w[1].timestamp_ms));
    // limit, capped at 50
    assert_eq!(
        history("?limit=5".into()).await,
        sent[25..].iter().rev().cloned().collect::<Vec<_>>()
    );
    assert_eq!(history("?limit=500".into()).await.len(), 30);
    assert!(history("?limit=0".into()).await.is_empty());
    // after is exclusive, in ms
    let after = sent[26].timestamp_ms;
    let h = history(format!("?after={after}")).await;
    assert_eq!(h, sent[27..].iter().rev().cloned().collect::<Vec<_>>());
    // after in seconds, and as ISO-8601
    let secs = sent[0].timestamp_ms / 1000 - 1;
    assert_eq!(history(format!("?after={secs}&limit=50")).await.len(), 30);
    let iso = crate::protocol::format_rfc3339_ms(after);
    assert_eq!(history(format!("?after={iso}")).await.len(), 3);
    // after the newest: nothing
    assert!(
        history(format!("?after={}", sent[29].timestamp_ms))
            .await
            .is_empty()
    );

    // errors
    for (q, want) in [
        ("?limit=-1", StatusCode::BAD_REQUEST),
        ("?limit=x", StatusCode::BAD_REQUEST),
        ("?after=soon", StatusCode::BAD_REQUEST),
    ] {
        let (status, body) = get(&server, &key, &format!("{path}{q}")).await;
        assert_eq!(status, want, "{q}");
        assert!(ErrorBody::decode(&body).is_ok());
    }
    let (status, _) = get(&server, &key, "/api/rooms/nowhere/messages").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = post(
        &server,
        &key,
        "/api/rooms/nowhere/messages",
        r#"{"text":"x"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = post(&server, &key, path, r#"{"text":""}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = post(
        &server,
        &key,
        path,
        &format!(r#"{{"text":"{}"}}"#, "x".repeat(17 * 1024)),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    server.shutdown().await;
}

#[tokio::test]
async fn rest_rooms_join_and_agents() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    let (status, body) = post(
        &server,
        &key,
        "/api/rooms",
        r#"{"name":"garden","description":"plants"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let created = crate::protocol::CreateRoomResponse::decode(&body).unwrap();
    assert!(created.created);
    let (status, body) = post(&server, &key, "/api/rooms", r#"{"name":"garden"}"#).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !crate::protocol::CreateRoomResponse::decode(&body)
            .unwrap()
            .created
    );
    let (status, _) = post(&server, &key, "/api/rooms", r#"{"name":"bad name!"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, body) = post(&server, &key, "/api/rooms/garden/join", "").await;
    assert_eq!(status, StatusCode::OK);
    let j = crate::protocol::JoinResponse::decode(&body).unwrap();
    assert!(j.joined && j.room == "garden");
    let (_, body) = get(&server, &key, "/api/rooms/garden/agents").await;
    let members = RoomAgentList::decode(&body).unwrap();
    assert_eq!(members.0.len(), 1);
    assert!(members.0[0].joined_at.is_some());
    // the join line is in the history
    let (_, body) = get(&server, &key, "/api/rooms/garden/messages").await;
    assert_eq!(
        MessageList::decode(&body).unwrap().0[0].text,
        "\u{26a1} rook joined #garden."
    );
    let (status, _) = get(&server, &key, "/api/rooms/nowhere/agents").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.shutdown().await;
}

#[tokio::test]
async fn retention_and_capacity() {
    let server = start_with(ServerConfig {
        room_capacity: 5,
        ..ServerConfig::default()
    })
    .await;
    let state = server.state();
    for i in 0..8 {
        state
            .post_message("ghost", "lobby", &format!("m{i}"))
            .unwrap();
    }
    let h = state.messages("lobby", None, 50).unwrap();
    let texts: Vec<&str> = h.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["m7", "m6", "m5", "m4", "m3"]);

    // an hour later everything is gone; new messages still work and stay ordered
    let last = h[0].timestamp_ms;
    state.skew_clock(Duration::from_secs(3601));
    assert!(state.messages("lobby", None, 50).unwrap().is_empty());
    let key = agent(&server, "rook").await;
    let (_, body) = get(&server, &key, "/api/rooms/lobby/messages").await;
    assert!(MessageList::decode(&body).unwrap().0.is_empty());
    let m = state.post_message("ghost", "lobby", "fresh").unwrap();
    assert!(m.timestamp_ms > last);
    assert_eq!(state.messages("lobby", None, 50).unwrap(), [m]);
    server.shutdown().await;
}

#[tokio::test]
async fn post_as_any_agent_without_a_socket() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    let mut ws = connect(&server, &key, "rook").await;
    join(&mut ws, "philosophy", "rook").await;
    let posted = server
        .state()
        .post_message("ghost-of-ada", "philosophy", "boo")
        .unwrap();
    assert_eq!(next_message(&mut ws).await, posted);
    assert!(server.state().post_message("x", "no spaces", "t").is_err());
    server.shutdown().await;
}

#[tokio::test]
async fn fault_drop_connections() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    let mut a = connect(&server, &key, "rook").await;
    let mut b = connect(&server, &key, "rook").await;
    assert_eq!(server.faults().drop_connections(), 2);
    assert_dropped(&mut a).await;
    assert_dropped(&mut b).await;
    wait_for_connections(&server, 0).await;
    // reconnecting works, rooms must be joined again
    let mut c = connect(&server, &key, "rook").await;
    send(
        &mut c,
        ClientFrame::Send {
            room: "lobby".into(),
            text: "x".into(),
        },
    )
    .await;
    assert!(matches!(
        next_frame(&mut c).await,
        ServerFrame::Error { .. }
    ));
    server.shutdown().await;
}

#[tokio::test]
async fn fault_close_with_code() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    let mut ws = connect(&server, &key, "rook").await;
    assert_eq!(server.faults().close_connections(4008, "rate limited"), 1);
    let frame = loop {
        match timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let frame = frame.expect("close frame without code");
    assert_eq!(u16::from(frame.code), 4008);
    assert_eq!(frame.reason.as_str(), "rate limited");
    wait_for_connections(&server, 0).await;
    server.shutdown().await;
}

#[tokio::test]
async fn fault_stall() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    let mut ws = connect(&server, &key, "rook").await;
    join(&mut ws, "lobby", "rook").await;
    let faults = server.faults();
    faults.stall(Duration::from_secs(30));
    assert!(faults.is_stalled());

    // no pong, no echo, while stalled
    ws.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
    send(
        &mut ws,
        ClientFrame::Send {
            room: "lobby".into(),
            text: "during stall".into(),
        },
    )
    .await;
    assert_quiet(&mut ws).await;
    // broadcasts from elsewhere are held back too
    server
        .state()
        .post_message("ghost", "lobby", "queued")
        .unwrap();
    assert_quiet(&mut ws).await;
    // REST waits as well
    let rest = tokio::spawn({
        let url = format!("{}/api/rooms", server.base_url());
        let key = key.clone();
        async move {
            http()
                .get(url)
                .header("x-api-key", key)
                .send()
                .await
                .map(|r| r.status())
        }
    });
    tokio::time::sleep(QUIET).await;
    assert!(!rest.is_finished());

    faults.end_stall();
    assert!(!faults.is_stalled());
    assert_eq!(rest.await.unwrap().unwrap(), StatusCode::OK);
    // everything arrives afterwards: the pong, the queued broadcast, the echo
    let mut texts = Vec::new();
    let mut pong = false;
    timeout(WAIT, async {
        while texts.len() < 2 || !pong {
            match ws.next().await {
                Some(Ok(Message::Pong(_))) => pong = true,
                Some(Ok(Message::Text(t))) => {
                    if let Ok(ServerFrame::Message(m)) = decode_server_frame(t.as_str()) {
                        texts.push(m.text);
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        }
    })
    .await
    .expect("nothing after the stall");
    texts.sort();
    assert_eq!(texts, ["during stall", "queued"]);

    // a timed stall ends by itself
    faults.stall(Duration::from_millis(100));
    send(
        &mut ws,
        ClientFrame::Send {
            room: "lobby".into(),
            text: "later".into(),
        },
    )
    .await;
    assert_eq!(next_message(&mut ws).await.text, "later");
    assert!(!faults.is_stalled());
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn fault_stall_uses_tokio_time() {
    // Under a paused clock a one-hour stall passes instantly.
    let server = start().await;
    let faults = server.faults();
    faults.stall(Duration::from_secs(3600));
    let mut rx = faults.inst.stall.subscribe();
    let t0 = tokio::time::Instant::now();
    ws::wait_unstalled(&mut rx).await;
    assert!(t0.elapsed() >= Duration::from_secs(3600));
    assert!(!faults.is_stalled());
    server.shutdown().await;
}

#[tokio::test]
async fn fault_registrations_503_and_409() {
    let server = start().await;
    let faults = server.faults();
    faults.fail_registrations(2);
    for _ in 0..2 {
        let resp = http()
            .post(format!("{}/api/register", server.base_url()))
            .body(r#"{"name":"rook"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let ct = resp
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert!(ct.starts_with("text/html"), "{ct}");
        let body = resp.text().await.unwrap();
        assert!(body.contains("<html>"));
        assert!(RegisterResponse::decode(&body).is_err());
    }
    faults.conflict_registrations(1);
    let (status, _) = register(&server, "rook").await;
    assert_eq!(status, StatusCode::CONFLICT);
    agent(&server, "rook").await;
    server.shutdown().await;
}

#[tokio::test]
async fn fault_revoke_key() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    let mut ws = connect(&server, &key, "rook").await;
    assert!(server.faults().revoke_key("rook"));
    assert!(!server.faults().revoke_key("nobody"));
    let (status, body) = get(&server, &key, "/api/rooms").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        ErrorBody::decode(&body).unwrap().code.as_deref(),
        Some("unauthorized")
    );
    match try_connect(&server, &key).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    // the live socket is left alone
    join(&mut ws, "lobby", "rook").await;
    // the name stays taken
    let (status, _) = register(&server, "rook").await;
    assert_eq!(status, StatusCode::CONFLICT);
    server.shutdown().await;
}

#[tokio::test]
async fn fault_bad_frames() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    let mut a = connect(&server, &key, "rook").await;
    let mut b = connect(&server, &key, "rook").await;
    // a sees b's connected line? No: a has not joined lobby.
    let faults = server.faults();
    let stats = ProtocolStats::default();

    assert_eq!(faults.send_malformed(), 2);
    for ws in [&mut a, &mut b] {
        let text = next_text(ws).await;
        assert!(matches!(
            stats.decode_server_frame(&text),
            Err(ProtocolError::Json(_))
        ));
    }
    assert_eq!(faults.send_unknown_type(), 2);
    for ws in [&mut a, &mut b] {
        let text = next_text(ws).await;
        assert!(
            matches!(stats.decode_server_frame(&text), Ok(ServerFrame::Unknown { frame_type }) if frame_type == "typing")
        );
    }
    assert_eq!(faults.send_unknown_fields(), 2);
    for ws in [&mut a, &mut b] {
        let text = next_text(ws).await;
        assert!(matches!(
            stats.decode_server_frame(&text),
            Ok(ServerFrame::Message(_))
        ));
    }
    let snap = stats.snapshot();
    assert_eq!((snap.errors, snap.unknown_frame_types), (2, 2));
    assert_eq!(snap.unknown_fields, 6);

    let size = 16 << 20;
    assert_eq!(faults.send_oversized(size), 2);
    for ws in [&mut a, &mut b] {
        let text = next_text(ws).await;
        assert!(text.len() >= size);
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok());
        assert!(matches!(
            decode_server_frame(&text),
            Err(ProtocolError::TooLarge { .. })
        ));
    }
    assert_eq!(faults.send_raw("{}"), 2);
    assert_eq!(next_text(&mut a).await, "{}");
    server.shutdown().await;
}

#[tokio::test]
async fn fault_reject_upgrades() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    let faults = server.faults();
    faults.reject_upgrades(Duration::from_secs(60));
    match try_connect(&server, &key).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected 503, got {other:?}"),
    }
    // REST still works
    assert_eq!(get(&server, &key, "/api/rooms").await.0, StatusCode::OK);
    faults.accept_upgrades();
    connect(&server, &key, "rook").await;
    // a timed refusal ends by itself
    faults.reject_upgrades(Duration::from_millis(500));
    assert!(try_connect(&server, &key).await.is_err());
    let ws = timeout(WAIT, async {
        loop {
            if let Ok(ws) = try_connect(&server, &key).await {
                return ws;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("upgrades still refused");
    drop(ws);
    server.shutdown().await;
}

#[tokio::test]
async fn restart_on_same_port_keeps_state() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    let mut ws = connect(&server, &key, "rook").await;
    join(&mut ws, "builders", "rook").await;
    send(
        &mut ws,
        ClientFrame::Send {
            room: "builders".into(),
            text: "before the crash".into(),
        },
    )
    .await;
    let before = next_message(&mut ws).await;

    let (addr, state) = (server.addr(), server.state());
    server.shutdown().await;
    assert_dropped(&mut ws).await;
    // the port is closed: connecting fails while nothing listens
    assert!(TcpStream::connect(addr).await.is_err());

    let server = spawn_with_state(addr, state).await.unwrap();
    assert_eq!(server.addr(), addr);
    // same key, same history; rooms must be joined again
    let mut ws = connect(&server, &key, "rook").await;
    let (status, body) = get(&server, &key, "/api/rooms/builders/messages?limit=1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        MessageList::decode(&body).unwrap().0,
        std::slice::from_ref(&before)
    );
    let (_, body) = get(&server, &key, "/api/rooms/builders/agents").await;
    assert!(RoomAgentList::decode(&body).unwrap().0.is_empty());
    join(&mut ws, "builders", "rook").await;
    send(
        &mut ws,
        ClientFrame::Send {
            room: "builders".into(),
            text: "after".into(),
        },
    )
    .await;
    assert!(next_message(&mut ws).await.timestamp_ms > before.timestamp_ms);
    server.shutdown().await;
}

#[tokio::test]
async fn events_and_drop_without_shutdown() {
    let server = start().await;
    let mut events = server.state().subscribe();
    let key = agent(&server, "rook").await;
    let mut ws = connect(&server, &key, "rook").await;
    let mut seen = Vec::new();
    timeout(WAIT, async {
        loop {
            let e = events.recv().await.unwrap();
            let done = matches!(&e, ServerEvent::Connected { .. });
            seen.push(e);
            if done {
                break;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        seen[0],
        ServerEvent::Registered {
            name: "rook".into()
        }
    );
    let addr = server.addr();
    drop(server); // best effort: sockets dropped, listener closes
    assert_dropped(&mut ws).await;
    timeout(WAIT, async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn serve_runs_until_shutdown() {
    let (tx, rx) = oneshot::channel::<()>();
    // Find a free port, then serve on it.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let task = tokio::spawn(serve(addr, ServerConfig::default(), async move {
        let _ = rx.await;
    }));
    let url = format!("http://{addr}/api/register");
    let status = timeout(WAIT, async {
        loop {
            if let Ok(r) = http().post(&url).body(r#"{"name":"rook"}"#).send().await {
                return r.status();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(status, StatusCode::CREATED);
    tx.send(()).unwrap();
    timeout(WAIT, task).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn slow_connection_is_dropped_when_its_outbox_fills() {
    let server = start_with(ServerConfig {
        outbox_capacity: 4,
        ..ServerConfig::default()
    })
    .await;
    let key = agent(&server, "rook").await;
    let mut ws = connect(&server, &key, "rook").await;
    join(&mut ws, "lobby", "rook").await;
    // While stalled the outbox is not drained: the fifth frame overflows it.
    server.faults().stall(Duration::from_secs(30));
    for i in 0..5 {
        server
            .state()
            .post_message("ghost", "lobby", &format!("m{i}"))
            .unwrap();
    }
    wait_for_connections(&server, 0).await;
    server.faults().end_stall();
    assert_dropped(&mut ws).await;
    // the history still has everything
    assert_eq!(
        server.state().messages("lobby", None, 50).unwrap()[0].text,
        "m4"
    );
    server.shutdown().await;
}

// -- faults of history, timestamps, text and send rate limits (issue 12) -------

/// GET with the full response (status, headers, body).
async fn get_full(server: &DevServer, key: &str, path: &str) -> reqwest::Response {
    http()
        .get(format!("{}{path}", server.base_url()))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap()
}

fn json_of(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:.200}"))
}

const HISTORY: &str = "/api/rooms/lobby/messages";

#[tokio::test(start_paused = true)]
async fn fault_spans_count_and_expire() {
    let slot = FaultSlot::<u8>::default();
    assert_eq!(slot.take(), None);
    slot.set(7, FaultSpan::Next(2));
    assert_eq!(
        (slot.take(), slot.take(), slot.take()),
        (Some(7), Some(7), None)
    );
    slot.set(8, FaultSpan::For(Duration::from_secs(10)));
    assert_eq!(slot.take(), Some(8));
    tokio::time::advance(Duration::from_secs(9)).await;
    assert_eq!(slot.take(), Some(8));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(slot.take(), None);
    slot.set(9, FaultSpan::UntilCleared);
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(slot.take(), Some(9));
    slot.set(1, FaultSpan::Next(0));
    assert_eq!(slot.take(), None);
    slot.set(9, FaultSpan::UntilCleared);
    slot.clear();
    assert_eq!(slot.take(), None);
    assert_eq!(retry_after_secs(Duration::ZERO), 1);
    assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
}

#[tokio::test]
async fn fault_history_server_errors() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    server
        .state()
        .post_message("ghost", "lobby", "boo")
        .unwrap();
    let faults = server.faults();

    faults.fail_history(503, FaultSpan::Next(2));
    for _ in 0..2 {
        let resp = get_full(&server, &key, HISTORY).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let ct = resp.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(ct.starts_with("text/html"), "{ct}");
        assert!(MessageList::decode(&resp.text().await.unwrap()).is_err());
    }
    faults.fail_history(504, FaultSpan::Next(1));
    let resp = get_full(&server, &key, HISTORY).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("<title>504 Gateway Timeout</title>")
    );
    faults.fail_history(500, FaultSpan::Next(1));
    // other REST calls and the WebSocket are unaffected
    assert_eq!(get(&server, &key, "/api/rooms").await.0, StatusCode::OK);
    connect(&server, &key, "rook").await;
    let (status, body) = get(&server, &key, HISTORY).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        ErrorBody::decode(&body).unwrap().code.as_deref(),
        Some("server_error")
    );
    // the span is used up: history answers again
    let (status, body) = get(&server, &key, HISTORY).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        MessageList::decode(&body)
            .unwrap()
            .0
            .iter()
            .any(|m| m.text == "boo")
    );
    server.shutdown().await;
}

#[tokio::test]
async fn fault_history_forbidden() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    let faults = server.faults();
    faults.forbid_history(FaultSpan::UntilCleared);
    for _ in 0..3 {
        let (status, body) = get(&server, &key, HISTORY).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(
            ErrorBody::decode(&body).unwrap().code.as_deref(),
            Some("forbidden")
        );
    }
    // the key itself is fine
    assert_eq!(get(&server, &key, "/api/agents").await.0, StatusCode::OK);
    let (status, _) = post(&server, &key, HISTORY, r#"{"text":"still here"}"#).await;
    assert_eq!(status, StatusCode::CREATED);
    faults.clear_history_faults();
    assert_eq!(get(&server, &key, HISTORY).await.0, StatusCode::OK);
    server.shutdown().await;
}

#[tokio::test]
async fn fault_history_rate_limited_with_retry_after() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    let faults = server.faults();
    faults.rate_limit_history(
        Duration::from_millis(1500),
        FaultSpan::For(Duration::from_millis(300)),
    );
    let resp = get_full(&server, &key, HISTORY).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()[reqwest::header::RETRY_AFTER], "2");
    let body = json_of(&resp.text().await.unwrap());
    assert_eq!(body["code"], "rate_limited");
    assert_eq!(body["retry_after"], 2);
    // a timed span ends by itself
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(get(&server, &key, HISTORY).await.0, StatusCode::OK);
    // 429 through fail_history carries no Retry-After
    faults.fail_history(429, FaultSpan::Next(1));
    let resp = get_full(&server, &key, HISTORY).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().get(reqwest::header::RETRY_AFTER).is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn fault_slow_history_answers_late_and_stale() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    server
        .state()
        .post_message("ghost", "lobby", "before")
        .unwrap();
    let delay = Duration::from_millis(400);
    server.faults().slow_history(delay, FaultSpan::Next(1));
    let t0 = std::time::Instant::now();
    let request = tokio::spawn({
        let (url, key) = (format!("{}{HISTORY}", server.base_url()), key.clone());
        async move {
            let resp = http()
                .get(url)
                .header("x-api-key", key)
                .send()
                .await
                .unwrap();
            (resp.status(), resp.text().await.unwrap())
        }
    });
    tokio::time::sleep(QUIET).await;
    assert!(!request.is_finished());
    server
        .state()
        .post_message("ghost", "lobby", "during")
        .unwrap();
    let (status, body) = timeout(WAIT, request).await.unwrap().unwrap();
    assert!(t0.elapsed() >= delay);
    assert_eq!(status, StatusCode::OK);
    let texts: Vec<String> = MessageList::decode(&body)
        .unwrap()
        .0
        .into_iter()
        .map(|m| m.text)
        .collect();
    // taken when asked: what was posted while it was on its way is missing
    assert!(texts.contains(&"before".to_owned()), "{texts:?}");
    assert!(!texts.contains(&"during".to_owned()), "{texts:?}");
    // the next request is quick and complete
    let t1 = std::time::Instant::now();
    let (_, body) = get(&server, &key, HISTORY).await;
    assert!(t1.elapsed() < delay);
    assert_eq!(MessageList::decode(&body).unwrap().0[0].text, "during");
    server.shutdown().await;
}

#[tokio::test]
async fn fault_rest_timestamps_in_seconds_or_iso8601() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    let mut ws = connect(&server, &key, "rook").await;
    join(&mut ws, "lobby", "rook").await;
    let faults = server.faults();
    let msg = server
        .state()
        .post_message("ghost", "lobby", "when?")
        .unwrap();
    let ms = msg.timestamp_ms;
    assert_eq!(next_message(&mut ws).await, msg);
    let newest = |body: &str| json_of(body)[0]["timestamp"].clone();

    faults.rest_timestamps_in_seconds(true);
    let (_, body) = get(&server, &key, HISTORY).await;
    assert_eq!(newest(&body), serde_json::json!(ms / 1000));
    assert_eq!(
        MessageList::decode(&body).unwrap().0[0].timestamp_ms,
        ms / 1000 * 1000
    );
    // the answer to a REST send too, but never WebSocket frames
    let (status, body) = post(&server, &key, HISTORY, r#"{"text":"sent by rest"}"#).await;
    assert_eq!(status, StatusCode::CREATED);
    let echo = next_message(&mut ws).await;
    assert_eq!(
        json_of(&body)["timestamp"],
        serde_json::json!(echo.timestamp_ms / 1000)
    );
    assert!(echo.timestamp_ms > 100_000_000_000, "frames stay in ms");

    // one switch per format; the last one switched on wins
    faults.rest_timestamps_iso8601(true);
    let (_, body) = get(&server, &key, &format!("{HISTORY}?limit=50")).await;
    let list = json_of(&body);
    let old = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["text"] == "when?")
        .unwrap();
    assert_eq!(
        old["timestamp"],
        serde_json::json!(crate::protocol::format_rfc3339_ms(ms))
    );
    assert!(
        MessageList::decode(&body)
            .unwrap()
            .0
            .iter()
            .any(|m| m.timestamp_ms == ms)
    );
    faults.rest_timestamps_in_seconds(false); // not the one on: no change
    assert!(newest(&get(&server, &key, HISTORY).await.1).is_string());
    faults.rest_timestamps_iso8601(false);
    let (_, body) = get(&server, &key, &format!("{HISTORY}?limit=50")).await;
    assert!(MessageList::decode(&body).unwrap().0.contains(&msg));
    assert!(newest(&body).is_u64());
    server.shutdown().await;
}

#[tokio::test]
async fn fault_rewrite_text_collapses_whitespace() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    let mut ws = connect(&server, &key, "rook").await;
    join(&mut ws, "lobby", "rook").await;
    let faults = server.faults();
    faults.rewrite_text(true);
    let said = "  two  spaces,\na newline\t\tand tabs ";
    send(
        &mut ws,
        ClientFrame::Send {
            room: "lobby".into(),
            text: said.into(),
        },
    )
    .await;
    let rewritten = "two spaces, a newline and tabs";
    assert_eq!(next_message(&mut ws).await.text, rewritten);
    let (_, body) = post(
        &server,
        &key,
        HISTORY,
        &serde_json::json!({ "text": said }).to_string(),
    )
    .await;
    assert_eq!(ChatMessage::decode(&body).unwrap().text, rewritten);
    assert_eq!(next_message(&mut ws).await.text, rewritten);
    let (_, body) = get(&server, &key, HISTORY).await;
    let h = MessageList::decode(&body).unwrap().0;
    assert_eq!(
        (h[0].text.as_str(), h[1].text.as_str()),
        (rewritten, rewritten)
    );
    // posted without a socket: stored as given
    server.state().post_message("ghost", "lobby", said).unwrap();
    assert_eq!(next_message(&mut ws).await.text, said);
    faults.rewrite_text(false);
    send(
        &mut ws,
        ClientFrame::Send {
            room: "lobby".into(),
            text: said.into(),
        },
    )
    .await;
    assert_eq!(next_message(&mut ws).await.text, said);
    server.shutdown().await;
}

#[tokio::test]
async fn fault_rate_limit_rest_sends() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    server
        .faults()
        .rate_limit_rest_sends(Duration::from_secs(7), FaultSpan::Next(1));
    let resp = http()
        .post(format!("{}{HISTORY}", server.base_url()))
        .header("x-api-key", &key)
        .body(r#"{"text":"too soon"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()[reqwest::header::RETRY_AFTER], "7");
    let body = resp.text().await.unwrap();
    assert_eq!(
        ErrorBody::decode(&body).unwrap().code.as_deref(),
        Some("rate_limited")
    );
    assert_eq!(json_of(&body)["retry_after"], 7);
    // nothing was stored; the next send goes through
    assert!(
        server
            .state()
            .messages("lobby", None, 50)
            .unwrap()
            .iter()
            .all(|m| m.text != "too soon")
    );
    let (status, _) = post(&server, &key, HISTORY, r#"{"text":"later"}"#).await;
    assert_eq!(status, StatusCode::CREATED);
    server.shutdown().await;
}

#[tokio::test]
async fn fault_rate_limit_ws_sends_with_error_frame() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    let mut ws = connect(&server, &key, "rook").await;
    join(&mut ws, "lobby", "rook").await;
    server
        .faults()
        .rate_limit_ws_sends(Duration::from_millis(2500), FaultSpan::Next(1));
    let hello = ClientFrame::Send {
        room: "lobby".into(),
        text: "hello".into(),
    };
    send(&mut ws, hello.clone()).await;
    let text = next_text(&mut ws).await;
    let raw = json_of(&text);
    assert_eq!(
        (raw["type"].as_str(), raw["retry_after"].as_u64()),
        (Some("error"), Some(3))
    );
    match decode_server_frame(&text).unwrap() {
        ServerFrame::Error {
            code,
            message,
            retry_after_ms,
        } => {
            assert_eq!(retry_after_ms, Some(3000));
            assert_eq!(code.as_deref(), Some("rate_limited"));
            assert!(message.contains("retry in 3 s"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // not stored, not echoed; the connection stays and the next send works
    assert_quiet(&mut ws).await;
    assert!(
        server
            .state()
            .messages("lobby", None, 50)
            .unwrap()
            .iter()
            .all(|m| m.text != "hello")
    );
    send(&mut ws, hello).await;
    assert_eq!(next_message(&mut ws).await.text, "hello");
    server.shutdown().await;
}

#[tokio::test]
async fn fault_forget_joins_answers_not_joined() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    let mut ws = connect(&server, &key, "rook").await;
    let mut idle = connect(&server, &key, "rook").await;
    // what a send without a join gets, always
    let hi = ClientFrame::Send {
        room: "lobby".into(),
        text: "hi".into(),
    };
    send(&mut idle, hi.clone()).await;
    assert!(
        matches!(next_frame(&mut idle).await, ServerFrame::Error { code, .. } if code.as_deref() == Some("not_joined"))
    );
    join(&mut ws, "lobby", "rook").await;
    let mut events = server.state().subscribe();
    // only connections with joined rooms count
    assert_eq!(server.faults().forget_joins(), 1);
    assert_eq!(
        timeout(WAIT, events.recv()).await.unwrap().unwrap(),
        ServerEvent::Left {
            agent: "rook".into(),
            room: "lobby".into()
        }
    );
    assert!(
        server
            .state()
            .room_agents("lobby")
            .unwrap()
            .iter()
            .all(|a| a.name != "rook")
    );
    send(&mut ws, hi.clone()).await;
    match next_frame(&mut ws).await {
        ServerFrame::Error { code, message, .. } => {
            assert_eq!(code.as_deref(), Some("not_joined"));
            assert!(message.contains("#lobby"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        server
            .state()
            .messages("lobby", None, 50)
            .unwrap()
            .iter()
            .all(|m| m.text != "hi")
    );
    // joining again (with a fresh join line) makes sends work
    join(&mut ws, "lobby", "rook").await;
    send(&mut ws, hi).await;
    assert_eq!(next_message(&mut ws).await.text, "hi");
    server.shutdown().await;
}

#[tokio::test]
async fn fault_clear_all_and_restart_reset_faults() {
    let server = start().await;
    let key = agent(&server, "rook").await;
    let faults = server.faults();
    let all_on = |f: &Faults| {
        f.forbid_history(FaultSpan::UntilCleared);
        f.rest_timestamps_iso8601(true);
        f.rewrite_text(true);
        f.rate_limit_rest_sends(Duration::from_secs(1), FaultSpan::UntilCleared);
        f.rate_limit_ws_sends(Duration::from_secs(1), FaultSpan::UntilCleared);
        f.reject_upgrades(Duration::from_secs(60));
    };
    all_on(&faults);
    assert_eq!(get(&server, &key, HISTORY).await.0, StatusCode::FORBIDDEN);
    faults.clear_all();
    let (status, body) = post(&server, &key, HISTORY, r#"{"text":"a  b"}"#).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(ChatMessage::decode(&body).unwrap().text, "a  b");
    let (status, body) = get(&server, &key, HISTORY).await;
    assert_eq!(status, StatusCode::OK);
    assert!(json_of(&body)[0]["timestamp"].is_u64());
    let mut ws = connect(&server, &key, "rook").await;
    join(&mut ws, "lobby", "rook").await;
    send(
        &mut ws,
        ClientFrame::Send {
            room: "lobby".into(),
            text: "ok".into(),
        },
    )
    .await;
    assert_eq!(next_message(&mut ws).await.text, "ok");
    drop(ws);
    // faults belong to a server instance: a restarted server starts without them
    all_on(&server.faults());
    let (addr, state) = (server.addr(), server.state());
    server.shutdown().await;
    let again = spawn_with_state(addr, state).await.unwrap();
    assert_eq!(get(&again, &key, HISTORY).await.0, StatusCode::OK);
    again.shutdown().await;
}
