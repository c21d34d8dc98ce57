//! The WebSocket frame decoder and the REST body decoders (host/src/protocol.rs).
//!
//! Oracles: no panic on any input; a decoded frame encodes and decodes back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost::protocol::{
    AgentList, ChatMessage, ClientFrame, CreateRoomRequest, CreateRoomResponse, ErrorBody,
    JoinResponse, MessageList, ProtocolStats, RegisterRequest, RegisterResponse, RoomAgentList,
    RoomList, SECONDS_THRESHOLD, SendMessageRequest, ServerFrame, decode_client_frame,
    decode_server_frame, decode_server_frame_counted, parse_timestamp_str,
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();

    let stats = ProtocolStats::default();
    let counted = decode_server_frame_counted(text, &stats);
    let frame = decode_server_frame(text);
    assert_eq!(counted.is_ok(), frame.is_ok());
    if let Ok(frame) = frame {
        // Timestamps below SECONDS_THRESHOLD read back as seconds: encoding is not the
        // identity for them by design.
        let lossy = matches!(&frame, ServerFrame::Message(m) if m.timestamp_ms < SECONDS_THRESHOLD);
        if !lossy {
            let again = decode_server_frame(&frame.encode()).expect("an encoded frame decodes");
            assert_eq!(again, frame);
        }
    }
    if let Ok(frame) = decode_client_frame(text) {
        let again = ClientFrame::decode(&frame.encode()).expect("an encoded frame decodes");
        assert_eq!(again, frame);
    }
    if let Ok(m) = ChatMessage::decode(text)
        && m.timestamp_ms >= SECONDS_THRESHOLD
    {
        assert_eq!(ChatMessage::decode(&m.to_frame_json()).ok(), Some(m));
    }
    let _ = RegisterRequest::decode(text);
    let _ = RegisterResponse::decode(text);
    let _ = ErrorBody::decode(text);
    let _ = RoomList::decode(text);
    let _ = CreateRoomRequest::decode(text);
    let _ = CreateRoomResponse::decode(text);
    let _ = JoinResponse::decode(text);
    let _ = SendMessageRequest::decode(text);
    let _ = MessageList::decode(text);
    let _ = AgentList::decode(text);
    let _ = RoomAgentList::decode(text);
    let _ = parse_timestamp_str(text);
});
