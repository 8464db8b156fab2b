//! End to end through a real gateway on 127.0.0.1, with peers independent of wsgate's codec:
//! tokio-tungstenite and fastwebsockets clients, tokio-tungstenite backends, and raw sockets
//! writing hand-made frames for everything a real library refuses to do (protocol violations,
//! silence, dying mid-connection, refusing the upgrade).
//!
//! Every wait is bounded (`peers::WAIT`, or a longer explicit timeout for 16 MiB messages);
//! readiness is never waited for with sleeps; ports are chosen by the OS.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/peers.rs"]
mod peers;
mod support;

use futures_util::{SinkExt, StreamExt};
use peers::*;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// Tests that move tens of MiB (and the one that measures the process's memory) run one at a
/// time: on 2 cores they would otherwise starve each other, and the memory check would see the
/// others' buffers.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Short timers for the keepalive and close tests.
const FAST_TIMERS: &str = "timeouts: {ping_interval: 200ms, pong_timeout: 300ms, close: 500ms}";

async fn gateway_to(backend: std::net::SocketAddr, route_extra: &str) -> Gateway {
    start_gateway(&simple_config(&[backend], route_extra)).await
}

fn close_of(frame: Option<CloseFrame>) -> (u16, String) {
    let frame = frame.expect("a close frame");
    (frame.code.into(), frame.reason.to_string())
}

fn close_message(code: u16, reason: &str) -> Option<CloseFrame> {
    Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    })
}

/// Deterministic bytes that no accidental shift or truncation can reproduce (xorshift64).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `len` bytes of valid UTF-8 mixing 1- to 4-byte characters, so that characters straddle
/// every buffer boundary on the way.
fn text_pattern(len: usize) -> String {
    let unit = "ascii é ü ñ € ≠ 中文 𝄞 🎉 ";
    let mut text = String::with_capacity(len);
    while text.len() + unit.len() <= len {
        text.push_str(unit);
    }
    while text.len() < len {
        text.push('x');
    }
    text
}

/// Reads data messages from a tungstenite client with a long timeout (for 16 MiB messages).
async fn next_data(ws: &mut Client, wait: Duration) -> Message {
    loop {
        let message = tokio::time::timeout(wait, ws.next())
            .await
            .expect("message in time")
            .expect("open")
            .expect("no error");
        if message.is_text() || message.is_binary() {
            return message;
        }
    }
}

/// The first of `frames` with `opcode`.
fn find(frames: &[RawFrame], opcode: u8) -> Option<&RawFrame> {
    frames.iter().find(|f| f.opcode == opcode)
}

// ---------------------------------------------------------------------------------------------
// 1. Data messages.

#[tokio::test]
async fn messages_text_binary_empty_round_trip_unchanged() {
    let backend = echo_backend("b").await;
    let gateway = gateway_to(backend.addr, "").await;
    let mut ws = connect(gateway.addr, "/").await;
    let messages = [
        Message::text("hello"),
        Message::binary(vec![0u8, 1, 2, 0x80, 0xff]),
        Message::text(""),
        Message::binary(Vec::new()),
        Message::text("héllo wörld € 中文 𝄞"),
        Message::binary(pattern(125, 1)),
        Message::binary(pattern(126, 2)),
        Message::binary(pattern(65535, 3)),
        Message::binary(pattern(65536, 4)),
        Message::binary(pattern(100_000, 5)),
    ];
    for message in messages {
        ws.send(message.clone()).await.unwrap();
        assert_eq!(next_message(&mut ws).await, message);
    }
}

#[tokio::test]
async fn messages_fragmented_by_fastwebsockets_client_reassembled_by_backend_and_echoed() {
    use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket};
    let backend = echo_backend("b").await;
    let gateway = gateway_to(backend.addr, "").await;
    let mut tcp = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    tcp.write_all(upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    let head = read_head_exact(&mut tcp).await.expect("a response head");
    assert_eq!(status_of(&head), 101, "{head}");
    let mut ws = WebSocket::after_handshake(tcp, Role::Client);

    // A text message in three fragments, a character split between the second and the third,
    // and a ping between them (control frames may interleave with fragments).
    let pieces: [(bool, OpCode, &[u8]); 3] = [
        (false, OpCode::Text, b"frag"),
        (false, OpCode::Continuation, b"ment\xc3"),
        (true, OpCode::Continuation, b"\xa9 done"),
    ];
    for (i, (fin, opcode, bytes)) in pieces.into_iter().enumerate() {
        ws.write_frame(Frame::new(fin, opcode, None, Payload::Borrowed(bytes)))
            .await
            .unwrap();
        if i == 1 {
            ws.write_frame(Frame::new(
                true,
                OpCode::Ping,
                None,
                Payload::Borrowed(b"mid-message"),
            ))
            .await
            .unwrap();
        }
    }
    // A binary message with an empty middle fragment.
    let pieces: [(bool, OpCode, &[u8]); 3] = [
        (false, OpCode::Binary, &[1, 2, 3]),
        (false, OpCode::Continuation, &[]),
        (true, OpCode::Continuation, &[4, 5]),
    ];
    for (fin, opcode, bytes) in pieces {
        ws.write_frame(Frame::new(fin, opcode, None, Payload::Borrowed(bytes)))
            .await
            .unwrap();
    }

    let mut received = Vec::new();
    while received
        .iter()
        .filter(|(op, _, _)| matches!(op, OpCode::Text | OpCode::Binary))
        .count()
        < 2
    {
        let frame = tokio::time::timeout(WAIT, ws.read_frame())
            .await
            .expect("frame in time")
            .expect("frame");
        received.push((frame.opcode, frame.fin, frame.payload.to_vec()));
    }
    let data: Vec<_> = received
        .iter()
        .filter(|(op, _, _)| matches!(op, OpCode::Text | OpCode::Binary))
        .collect();
    assert!(
        matches!(data[0], (OpCode::Text, true, p) if p == "fragmenté done".as_bytes()),
        "{received:?}"
    );
    assert!(
        matches!(data[1], (OpCode::Binary, true, p) if p == &[1, 2, 3, 4, 5]),
        "{received:?}"
    );
    let pong = received
        .iter()
        .find(|(op, _, _)| *op == OpCode::Pong)
        .expect("the gateway answers the ping");
    assert_eq!(pong.2, b"mid-message");
}

#[tokio::test]
async fn messages_16mib_binary_and_text_round_trip_byte_for_byte() {
    let _heavy = HEAVY.lock().await;
    let backend = echo_backend("b").await;
    let gateway = gateway_to(backend.addr, "").await;
    let mut ws = connect(gateway.addr, "/").await;
    let wait = Duration::from_secs(120);

    let binary = pattern(16 << 20, 0x5eed);
    ws.send(Message::binary(binary.clone())).await.unwrap();
    let Message::Binary(echoed) = next_data(&mut ws, wait).await else {
        panic!("binary expected")
    };
    assert_eq!(echoed.len(), binary.len());
    let first_difference = echoed.iter().zip(&binary).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "16 MiB binary corrupted");
    drop((binary, echoed));

    let text = text_pattern(16 << 20);
    assert_eq!(text.len(), 16 << 20);
    ws.send(Message::text(text.clone())).await.unwrap();
    let Message::Text(echoed) = next_data(&mut ws, wait).await else {
        panic!("text expected")
    };
    assert_eq!(echoed.len(), text.len());
    assert!(echoed.as_str() == text, "16 MiB text corrupted");
}

// ---------------------------------------------------------------------------------------------
// 2. Subprotocols.

#[tokio::test]
async fn subprotocol_offered_chat_superchat_backend_picks_superchat_client_sees_it() {
    let backend = echo_backend_with("b", Some("superchat")).await;
    let gateway = gateway_to(backend.addr, "").await;
    let mut request = format!("ws://{}/", gateway.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "chat, superchat".parse().unwrap());
    let (mut ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
        .expect("handshake");
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("superchat")
    );
    let seen = backend.seen.lock().unwrap()[0].clone();
    let offered: Vec<&str> = seen
        .header("sec-websocket-protocol")
        .unwrap()
        .split(',')
        .map(str::trim)
        .collect();
    assert_eq!(offered, ["chat", "superchat"]);
    ws.send(Message::text("ping?")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("ping?"));
}

#[tokio::test]
async fn subprotocol_not_offered_no_protocol_header_either_way() {
    let backend = echo_backend_with("b", Some("superchat")).await;
    let gateway = gateway_to(backend.addr, "").await;
    let request = format!("ws://{}/", gateway.addr)
        .into_client_request()
        .unwrap();
    let (_ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
        .expect("handshake");
    assert!(
        response.headers().get("sec-websocket-protocol").is_none(),
        "{response:?}"
    );
    assert!(
        backend.seen.lock().unwrap()[0]
            .header("sec-websocket-protocol")
            .is_none()
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Protocol violations by the client.

/// Sends `bytes` from a raw client after a valid upgrade and checks that the client gets a
/// close with `code` and `reason`, that the backend gets 1001 naming the client's error, and
/// that the gateway then closes the client's TCP.
async fn client_violation(route_extra: &str, bytes: &[u8], code: u16, reason: &str) {
    let mut backend = recording_backend(Script::Echo).await;
    let gateway = gateway_to(backend.addr, route_extra).await;
    let mut client = raw_client(gateway.addr, upgrade_request("/", "").as_bytes()).await;
    client.send(bytes).await;
    let close = client
        .close_frame()
        .await
        .unwrap_or_else(|| panic!("client gets a close for {reason:?}"));
    assert!(!close.masked && close.fin, "{close:?}");
    assert_eq!(
        (close.close_code(), close.close_reason().as_str()),
        (Some(code), reason)
    );
    assert!(
        client.eof_within(WAIT).await,
        "the gateway closes the client's TCP after {reason:?}"
    );
    let backend_close = backend
        .close_received()
        .await
        .unwrap_or_else(|e| panic!("backend gets a close ({e})"));
    assert_eq!(
        backend_close,
        (1001, format!("client protocol error: {reason}"))
    );
}

#[tokio::test]
async fn client_violation_unmasked_frame_gets_1002_backend_gets_1001() {
    client_violation(
        "",
        &server_frame(true, op::TEXT, b"hello"),
        1002,
        "unmasked frame from client",
    )
    .await;
}

#[tokio::test]
async fn client_violation_reserved_bits_gets_1002_backend_gets_1001() {
    for rsv in [0x40, 0x20, 0x10] {
        let bytes = frame(true, rsv, op::TEXT, Some(CLIENT_KEY), b"hi");
        client_violation(
            "",
            &bytes,
            1002,
            "reserved bits set without a negotiated extension",
        )
        .await;
    }
}

#[tokio::test]
async fn client_violation_reserved_opcode_gets_1002_backend_gets_1001() {
    for opcode in [0x3, 0xB] {
        client_violation(
            "",
            &client_frame(true, opcode, b"?"),
            1002,
            "reserved opcode",
        )
        .await;
    }
}

#[tokio::test]
async fn client_violation_fragmented_ping_gets_1002_backend_gets_1001() {
    client_violation(
        "",
        &client_frame(false, op::PING, b"p"),
        1002,
        "fragmented control frame",
    )
    .await;
}

#[tokio::test]
async fn client_violation_ping_over_125_bytes_gets_1002_backend_gets_1001() {
    client_violation(
        "",
        &client_frame(true, op::PING, &[b'p'; 126]),
        1002,
        "control frame payload over 125 bytes",
    )
    .await;
}

#[tokio::test]
async fn client_violation_continuation_without_start_gets_1002_backend_gets_1001() {
    let bytes = client_frame(true, op::CONTINUATION, b"orphan");
    client_violation(
        "",
        &bytes,
        1002,
        "continuation frame without a message in progress",
    )
    .await;
}

#[tokio::test]
async fn client_violation_new_text_inside_fragmented_message_gets_1002_backend_gets_1001() {
    let mut bytes = client_frame(false, op::TEXT, b"ab");
    bytes.extend(client_frame(true, op::TEXT, b"cd"));
    client_violation(
        "",
        &bytes,
        1002,
        "new data frame inside a fragmented message",
    )
    .await;
}

#[tokio::test]
async fn client_violation_close_with_1_byte_payload_gets_1002_backend_gets_1001() {
    client_violation(
        "",
        &client_frame(true, op::CLOSE, &[0x03]),
        1002,
        "close frame with a 1-byte payload",
    )
    .await;
}

#[tokio::test]
async fn client_violation_close_codes_1005_999_5000_get_1002_backend_gets_1001() {
    for code in [1005, 999, 5000] {
        let bytes = client_frame(true, op::CLOSE, &close_payload(code, b""));
        client_violation("", &bytes, 1002, "invalid close code").await;
    }
}

#[tokio::test]
async fn client_violation_invalid_utf8_in_close_reason_gets_1007_backend_gets_1001() {
    let bytes = client_frame(true, op::CLOSE, &close_payload(1000, b"bad \xff\xfe"));
    client_violation("", &bytes, 1007, "invalid UTF-8 in close reason").await;
}

#[tokio::test]
async fn client_violation_frame_over_max_frame_gets_1009_backend_gets_1001() {
    let bytes = client_frame(true, op::BINARY, &[7u8; 2000]);
    client_violation("limits: {max_frame: 1KiB}", &bytes, 1009, "frame too large").await;
}

#[tokio::test]
async fn client_violation_message_over_max_message_gets_1009_backend_gets_1001() {
    let mut bytes = client_frame(false, op::BINARY, &[1u8; 1000]);
    bytes.extend(client_frame(false, op::CONTINUATION, &[2u8; 1000]));
    bytes.extend(client_frame(true, op::CONTINUATION, &[3u8; 1000]));
    client_violation(
        "limits: {max_frame: 1KiB, max_message: 2KiB}",
        &bytes,
        1009,
        "message too large",
    )
    .await;
}

/// A whole text frame with invalid UTF-8 is refused before any byte of it is forwarded, so
/// the backend gets a clean 1001 and never sees the frame.
#[tokio::test]
async fn client_violation_invalid_utf8_in_a_whole_text_frame_gets_1007_backend_gets_1001() {
    client_violation(
        "",
        &client_frame(true, op::TEXT, b"valid start \xff then junk"),
        1007,
        "invalid UTF-8 in text message",
    )
    .await;
}

/// Attack: a client opens a text message with a valid fragment and sends, in the same write, a
/// whole continuation frame holding invalid UTF-8, hoping the gateway forwards the frame's
/// header before it reads the payload and so leaves the backend inside a cut-off frame. The
/// frame was read whole, so it is refused before any byte of it goes out: the backend sees the
/// valid fragment, then a clean 1001 (never the bad frame's header), and the client gets 1007.
#[tokio::test]
async fn client_violation_invalid_utf8_in_a_whole_continuation_frame_backend_gets_clean_1001() {
    let backend = RawBackend::bind().await;
    let gateway = gateway_to(backend.addr, "").await;
    let request = upgrade_request("/", "");
    let (mut client, mut raw) = tokio::join!(
        raw_client(gateway.addr, request.as_bytes()),
        backend.accept_ws()
    );
    let mut bytes = client_frame(false, op::TEXT, b"hello ");
    bytes.extend(client_frame(true, op::CONTINUATION, b"w\xc3\x28rld"));
    client.send(&bytes).await;

    let close = client.close_frame().await.expect("client gets a close");
    assert_eq!(
        (close.close_code(), close.close_reason().as_str()),
        (Some(1007), "invalid UTF-8 in text message")
    );
    let first = raw
        .read_frame()
        .await
        .expect("the valid fragment reaches the backend");
    assert_eq!(
        (first.fin, first.opcode, first.payload.as_slice()),
        (false, op::TEXT, &b"hello "[..])
    );
    let next = raw
        .read_frame()
        .await
        .expect("the backend gets a frame after the fragment, not a cut connection");
    assert_eq!(
        (next.opcode, next.close_code(), next.close_reason().as_str()),
        (
            op::CLOSE,
            Some(1001),
            "client protocol error: invalid UTF-8 in text message"
        ),
        "the backend got {next:?} instead of a clean close"
    );
}

/// Invalid UTF-8 is found inside a frame whose header has already been forwarded (the frame
/// arrives in two reads); a close frame cannot interrupt a frame, so (relay invariant) the
/// backend's TCP is cut instead of being sent 1001, and the backend never sees the invalid byte.
#[tokio::test]
async fn client_violation_invalid_utf8_after_the_header_went_out_gets_1007_backend_cut_mid_frame() {
    let mut backend = recording_backend(Script::Echo).await;
    let gateway = gateway_to(backend.addr, "").await;
    let mut client = raw_client(gateway.addr, upgrade_request("/", "").as_bytes()).await;
    let frame = client_frame(true, op::TEXT, b"valid start \xff then junk");
    let (first, rest) = frame.split_at(2 + 4 + "valid start ".len());
    client.send(first).await;
    // Long enough for the gateway to forward the header before the rest arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.send(rest).await;
    let close = client.close_frame().await.expect("client gets a close");
    assert_eq!(
        (close.close_code(), close.close_reason().as_str()),
        (Some(1007), "invalid UTF-8 in text message")
    );
    assert!(client.eof_within(WAIT).await);
    let (messages, ended) = backend.messages_until_end().await;
    assert!(messages.is_empty(), "backend got {messages:?}");
    let ended = ended.expect("the backend's connection ends abnormally");
    assert!(
        !ended.to_lowercase().contains("utf"),
        "backend saw invalid UTF-8: {ended}"
    );
}

/// A fragmented text message whose last non-empty fragment ends half-way through a character,
/// completed by an empty final fragment: the message is invalid, and the backend must not
/// receive it as a complete message.
#[tokio::test]
async fn client_violation_truncated_utf8_ended_by_empty_fragment_gets_1007_never_reaches_backend_whole()
 {
    let mut backend = recording_backend(Script::Echo).await;
    let gateway = gateway_to(backend.addr, "").await;
    let mut client = raw_client(gateway.addr, upgrade_request("/", "").as_bytes()).await;
    let mut bytes = client_frame(false, op::TEXT, b"caf\xc3");
    bytes.extend(client_frame(true, op::CONTINUATION, b""));
    client.send(&bytes).await;
    let close = client.close_frame().await.expect("client gets a close");
    assert_eq!(
        (close.close_code(), close.close_reason().as_str()),
        (Some(1007), "invalid UTF-8 in text message")
    );
    let (messages, ended) = backend.messages_until_end().await;
    assert!(
        messages.iter().all(|m| !m.is_text()),
        "backend got {messages:?}"
    );
    let ended = ended.unwrap_or_default();
    assert!(
        !ended.to_lowercase().contains("utf"),
        "the gateway completed an invalid text message towards the backend, which reported: {ended}"
    );
}

/// The client learns of its error after the backend has closed, so the backend's answer to an
/// earlier valid message still reaches it first.
#[tokio::test]
async fn client_violation_after_valid_message_echo_arrives_before_close() {
    let mut backend = recording_backend(Script::Echo).await;
    let gateway = gateway_to(backend.addr, "").await;
    let mut client = raw_client(gateway.addr, upgrade_request("/", "").as_bytes()).await;
    let mut bytes = client_frame(true, op::TEXT, b"first, valid");
    bytes.extend(client_frame(true, 0x3, b"then a reserved opcode"));
    client.send(&bytes).await;
    let frames = client.frames_until_eof().await;
    let kinds: Vec<u8> = frames.iter().map(|f| f.opcode).collect();
    assert_eq!(kinds, [op::TEXT, op::CLOSE], "{frames:?}");
    assert_eq!(frames[0].payload, b"first, valid");
    assert_eq!(frames[1].close_code(), Some(1002));
    assert_eq!(
        backend.close_received().await,
        Ok((1001, "client protocol error: reserved opcode".into()))
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Protocol violations by the backend.

/// Connects a tungstenite client through the gateway to a raw backend.
async fn client_and_raw_backend(route_extra: &str) -> (Gateway, Client, RawWs, RawBackend) {
    let backend = RawBackend::bind().await;
    let gateway = gateway_to(backend.addr, route_extra).await;
    let (ws, raw) = tokio::join!(connect(gateway.addr, "/"), backend.accept_ws());
    (gateway, ws, raw, backend)
}

#[tokio::test]
async fn backend_violation_masked_frame_backend_gets_1002_client_gets_1001() {
    let (_gateway, mut ws, mut raw, _backend) = client_and_raw_backend("").await;
    raw.send(&frame(
        true,
        0,
        op::TEXT,
        Some([1, 2, 3, 4]),
        b"masked by a server",
    ))
    .await;
    let close = raw.close_frame().await.expect("backend gets a close");
    assert!(close.masked, "the gateway masks what it sends a backend");
    assert_eq!(
        (close.close_code(), close.close_reason().as_str()),
        (Some(1002), "masked frame from server")
    );
    assert_eq!(
        close_of(close_frame(&mut ws).await),
        (
            1001,
            "backend protocol error: masked frame from server".into()
        )
    );
}

#[tokio::test]
async fn backend_violation_invalid_utf8_close_reason_backend_gets_1007_client_gets_1001() {
    let (_gateway, mut ws, mut raw, _backend) = client_and_raw_backend("").await;
    raw.send(&server_frame(
        true,
        op::CLOSE,
        &close_payload(1000, b"\xc3\x28"),
    ))
    .await;
    let close = raw.close_frame().await.expect("backend gets a close");
    assert_eq!(
        (close.close_code(), close.close_reason().as_str()),
        (Some(1007), "invalid UTF-8 in close reason")
    );
    assert_eq!(
        close_of(close_frame(&mut ws).await),
        (
            1001,
            "backend protocol error: invalid UTF-8 in close reason".into()
        )
    );
}

#[tokio::test]
async fn backend_violation_reserved_opcode_backend_gets_1002_client_gets_1001() {
    let (_gateway, mut ws, mut raw, _backend) = client_and_raw_backend("").await;
    raw.send(&server_frame(true, 0x5, b"?")).await;
    let close = raw.close_frame().await.expect("backend gets a close");
    assert_eq!(
        (close.close_code(), close.close_reason().as_str()),
        (Some(1002), "reserved opcode")
    );
    assert_eq!(
        close_of(close_frame(&mut ws).await),
        (1001, "backend protocol error: reserved opcode".into())
    );
}

/// Invalid UTF-8 in a backend's whole text frame: the backend gets 1007 and the client a clean
/// 1001, without any byte of the frame.
#[tokio::test]
async fn backend_violation_invalid_utf8_in_a_whole_text_frame_backend_gets_1007_client_1001() {
    let backend = RawBackend::bind().await;
    let gateway = gateway_to(backend.addr, "").await;
    let request = upgrade_request("/", "");
    let (mut client, mut raw) = tokio::join!(
        raw_client(gateway.addr, request.as_bytes()),
        backend.accept_ws()
    );
    raw.send(&server_frame(true, op::TEXT, b"ok \xff not ok"))
        .await;
    let close = raw.close_frame().await.expect("backend gets a close");
    assert_eq!(
        (close.close_code(), close.close_reason().as_str()),
        (Some(1007), "invalid UTF-8 in text message")
    );
    let close = client.close_frame().await.expect("client gets a close");
    assert_eq!(
        (close.close_code(), close.close_reason().as_str()),
        (
            Some(1001),
            "backend protocol error: invalid UTF-8 in text message"
        )
    );
    assert!(
        !client.buf.contains(&0xff),
        "the invalid byte reached the client: {:?}",
        client.buf
    );
}

/// Invalid UTF-8 in a backend's text frame whose header already went out: the backend gets
/// 1007; the client, whose copy of the frame is half-way through, has its TCP cut (relay
/// invariant) and never sees the byte.
#[tokio::test]
async fn backend_violation_invalid_utf8_after_the_header_went_out_client_cut_mid_frame() {
    let backend = RawBackend::bind().await;
    let gateway = gateway_to(backend.addr, "").await;
    let request = upgrade_request("/", "");
    let (mut client, mut raw) = tokio::join!(
        raw_client(gateway.addr, request.as_bytes()),
        backend.accept_ws()
    );
    let frame = server_frame(true, op::TEXT, b"ok \xff not ok");
    let (first, rest) = frame.split_at(2 + "ok ".len());
    raw.send(first).await;
    // Long enough for the gateway to forward the header before the rest arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    raw.send(rest).await;
    let close = raw.close_frame().await.expect("backend gets a close");
    assert_eq!(
        (close.close_code(), close.close_reason().as_str()),
        (Some(1007), "invalid UTF-8 in text message")
    );
    let frames = client.frames_until_eof().await;
    assert!(frames.is_empty(), "client got {frames:?}");
    assert!(
        !client.buf.contains(&0xff),
        "the invalid byte reached the client: {:?}",
        client.buf
    );
}

/// The backend-to-client twin of the empty-final-fragment case: the client must not receive
/// the invalid text message whole.
#[tokio::test]
async fn backend_violation_truncated_utf8_ended_by_empty_fragment_gets_1007_never_reaches_client_whole()
 {
    let backend = RawBackend::bind().await;
    let gateway = gateway_to(backend.addr, "").await;
    let request = upgrade_request("/", "");
    let (mut client, mut raw) = tokio::join!(
        raw_client(gateway.addr, request.as_bytes()),
        backend.accept_ws()
    );
    let mut bytes = server_frame(false, op::TEXT, b"caf\xc3");
    bytes.extend(server_frame(true, op::CONTINUATION, b""));
    raw.send(&bytes).await;
    let close = raw.close_frame().await.expect("backend gets a close");
    assert_eq!(
        (close.close_code(), close.close_reason().as_str()),
        (Some(1007), "invalid UTF-8 in text message")
    );
    let frames = client.frames_until_eof().await;
    let completed = frames
        .iter()
        .any(|f| f.fin && matches!(f.opcode, op::TEXT | op::CONTINUATION));
    assert!(
        !completed,
        "the gateway completed an invalid text message towards the client: {frames:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Keepalive.

#[tokio::test]
async fn keepalive_silent_client_closed_backend_gets_1001_naming_client() {
    let mut backend = recording_backend(Script::Echo).await;
    let gateway = gateway_to(backend.addr, FAST_TIMERS).await;
    let mut client = raw_client(gateway.addr, upgrade_request("/", "").as_bytes()).await;
    // The raw client reads (so the kernel keeps ACKing) but never answers a ping.
    let frames = client.frames_until_eof().await;
    let ping = find(&frames, op::PING).expect("the gateway pings the silent client");
    assert!(!ping.masked);
    let close = find(&frames, op::CLOSE).expect("the silent client gets a close");
    assert_eq!(close.close_code(), Some(1001));
    assert_eq!(
        backend.close_received().await,
        Ok((1001, "client did not answer ping in time".into()))
    );
}

#[tokio::test]
async fn keepalive_silent_backend_closed_client_gets_1001_naming_backend() {
    let (_gateway, mut ws, mut raw, _backend) = client_and_raw_backend(FAST_TIMERS).await;
    // The raw backend neither reads nor answers until the client has its close.
    let started = Instant::now();
    assert_eq!(
        close_of(close_frame(&mut ws).await),
        (1001, "backend did not answer ping in time".into())
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed after {:?}",
        started.elapsed()
    );
    let frames = raw.frames_until_eof().await;
    assert!(
        find(&frames, op::PING).is_some_and(|p| p.masked),
        "{frames:?}"
    );
    assert_eq!(
        find(&frames, op::CLOSE).and_then(RawFrame::close_code),
        Some(1001),
        "{frames:?}"
    );
}

#[tokio::test]
async fn keepalive_tungstenite_client_answering_pings_stays_connected() {
    let backend = echo_backend("b").await;
    let gateway = gateway_to(backend.addr, FAST_TIMERS).await;
    let mut ws = connect(gateway.addr, "/").await;
    // Several keepalive rounds on both hops pass while the client reads (and so answers):
    // the client sees only the gateway's pings.
    let quiet = async {
        while let Some(message) = ws.next().await {
            match message {
                Ok(Message::Ping(payload)) => assert_eq!(payload, Bytes::from_static(b"wsgate")),
                other => panic!("only keepalive pings expected, got {other:?}"),
            }
        }
        panic!("the connection ended");
    };
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), quiet)
            .await
            .is_err()
    );
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("still here"));
}

/// The next message, which must be a pong: its payload.
async fn pong_payload(ws: &mut Client) -> Bytes {
    let message = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("pong in time");
    match message.expect("open").expect("no error") {
        Message::Pong(payload) => payload,
        other => panic!("expected a pong, got {other:?}"),
    }
}

#[tokio::test]
async fn keepalive_client_ping_answered_by_gateway_not_forwarded() {
    let mut backend = recording_backend(Script::Echo).await;
    let gateway = gateway_to(backend.addr, "").await;
    let mut ws = connect(gateway.addr, "/").await;
    ws.send(Message::Ping(Bytes::from_static(b"are you there?")))
        .await
        .unwrap();
    assert_eq!(
        pong_payload(&mut ws).await,
        Bytes::from_static(b"are you there?")
    );
    // A message sent after the ping arrives after it would have: the backend's record is
    // complete up to the ping once the echo is back.
    ws.send(Message::text("after the ping")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("after the ping"));
    let events = backend.events_so_far();
    assert!(
        events.contains(&Event::Message(Message::text("after the ping"))),
        "{events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Message(Message::Ping(_)))),
        "ping forwarded: {events:?}"
    );
}

#[tokio::test]
async fn keepalive_ping_passthrough_forwards_client_ping_to_backend() {
    let mut backend = recording_backend(Script::Echo).await;
    let gateway = gateway_to(backend.addr, "ping_passthrough: true").await;
    let mut ws = connect(gateway.addr, "/").await;
    ws.send(Message::Ping(Bytes::from_static(b"pass me")))
        .await
        .unwrap();
    match backend.next_event().await {
        Event::Message(Message::Ping(payload)) => {
            assert_eq!(payload, Bytes::from_static(b"pass me"))
        }
        other => panic!("expected the ping at the backend, got {other:?}"),
    }
    assert_eq!(pong_payload(&mut ws).await, Bytes::from_static(b"pass me"));
}

// ---------------------------------------------------------------------------------------------
// 6 and 7. Closing handshakes.

#[tokio::test]
async fn close_client_initiated_4001_bye_reaches_backend_and_echo_returns() {
    let mut backend = recording_backend(Script::Echo).await;
    let gateway = gateway_to(backend.addr, "").await;
    let mut ws = connect(gateway.addr, "/").await;
    ws.send(Message::text("before closing")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("before closing"));
    ws.close(close_message(4001, "bye")).await.unwrap();
    assert_eq!(close_of(close_frame(&mut ws).await), (4001, "bye".into()));
    assert_eq!(backend.close_received().await, Ok((4001, "bye".into())));
    assert_eq!(
        backend.next_event().await,
        Event::Ended(None),
        "the backend's connection ends cleanly"
    );
    let end = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("client connection ends");
    assert!(end.is_none(), "{end:?}");
}

#[tokio::test]
async fn close_backend_initiated_4002_server_bye_reaches_client() {
    let mut backend = recording_backend(Script::CloseAfterFirst(4002, "server bye")).await;
    let gateway = gateway_to(backend.addr, "").await;
    let mut ws = connect(gateway.addr, "/").await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("hi"));
    assert_eq!(
        close_of(close_frame(&mut ws).await),
        (4002, "server bye".into())
    );
    // Tungstenite sends its reply (an echo of the close) when next polled.
    let end = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("client connection ends");
    assert!(end.is_none(), "{end:?}");
    // The client's reply travels back to the backend, reason and all.
    assert_eq!(
        backend.close_received().await,
        Ok((4002, "server bye".into()))
    );
}

/// After a completed closing handshake the gateway closes the client's TCP at once (RFC 6455
/// §7.1.1): it does not wait, half-closed, for a client that never closes its side. Bytes the
/// client sends afterwards meet a closed socket (a reset), not a drain.
#[tokio::test]
async fn close_completed_handshake_gateway_closes_tcp_without_waiting_for_the_client() {
    let backend = recording_backend(Script::Echo).await;
    let gateway = gateway_to(backend.addr, "timeouts: {close: 30s}").await;
    let mut client = raw_client(gateway.addr, upgrade_request("/", "").as_bytes()).await;
    client
        .send(&client_frame(
            true,
            op::CLOSE,
            &close_payload(1000, b"done"),
        ))
        .await;
    let reply = client
        .close_frame()
        .await
        .expect("the backend's close reply");
    assert_eq!(reply.close_code(), Some(1000));
    assert!(
        client.eof_within(Duration::from_secs(5)).await,
        "the gateway closes TCP after the handshake"
    );
    // The client keeps its side open and writes: a socket the gateway still drained would
    // swallow this silently, well within the 30 s close timeout; a closed one resets.
    let garbage = client_frame(true, op::TEXT, b"after the close");
    let mut reset = false;
    for _ in 0..20 {
        if client.stream.write_all(&garbage).await.is_err() {
            reset = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        reset,
        "the gateway kept the socket open after the closing handshake"
    );
}

#[tokio::test]
async fn close_backend_never_answers_gateway_replies_to_client_within_close_timeout() {
    let (_gateway, mut ws, mut raw, _backend) =
        client_and_raw_backend("timeouts: {close: 500ms}").await;
    // The backend reads everything but never answers the close.
    let backend_frames = tokio::spawn(async move { raw.frames_until_eof().await });
    let started = Instant::now();
    ws.close(close_message(1000, "done")).await.unwrap();
    assert_eq!(close_of(close_frame(&mut ws).await).0, 1000);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "replied after {waited:?}, before the close timeout"
    );
    assert!(waited < Duration::from_secs(10), "replied after {waited:?}");
    let frames = backend_frames.await.unwrap();
    let close = find(&frames, op::CLOSE).expect("the close was relayed to the backend");
    assert_eq!(
        (close.close_code(), close.close_reason().as_str()),
        (Some(1000), "done")
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Backend refusals.

fn split_response(response: &[u8]) -> (String, Vec<u8>) {
    let at = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete HTTP head")
        + 4;
    (
        String::from_utf8_lossy(&response[..at]).into_owned(),
        response[at..].to_vec(),
    )
}

#[tokio::test]
async fn backend_refuses_403_client_gets_403_with_backend_body() {
    let backend = RawBackend::bind().await;
    let gateway = gateway_to(backend.addr, "").await;
    let body = "no WebSockets for you\n";
    let refuse = async {
        let mut stream = backend.accept().await;
        read_head_exact(&mut stream)
            .await
            .expect("an upgrade request");
        let response = format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nX-Refused-By: backend\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).await.unwrap();
        stream
    };
    let request = upgrade_request("/", "");
    let (response, _stream) = tokio::join!(raw_exchange(gateway.addr, request.as_bytes()), refuse);
    let (head, received_body) = split_response(&response);
    assert_eq!(status_of(&head), 403, "{head}");
    assert_eq!(String::from_utf8_lossy(&received_body), body);
    assert_eq!(header_of(&head, "x-refused-by"), Some("backend"), "{head}");
    assert_eq!(
        header_of(&head, "content-type"),
        Some("text/plain"),
        "{head}"
    );
}

#[tokio::test]
async fn backend_unreachable_client_gets_502_with_one_line_reason() {
    let gateway = gateway_to(unused_addr().await, "").await;
    let response = raw_exchange(gateway.addr, upgrade_request("/", "").as_bytes()).await;
    let (head, body) = split_response(&response);
    assert_eq!(status_of(&head), 502, "{head}");
    let body = String::from_utf8(body).unwrap();
    let line = body.strip_suffix('\n').unwrap_or(&body);
    assert!(
        !line.is_empty() && !line.contains('\n'),
        "one line expected: {body:?}"
    );
    assert!(line.contains("backend"), "{body:?}");
}

#[tokio::test]
async fn backend_never_answers_handshake_client_gets_504_after_connect_timeout() {
    // The listener's backlog completes TCP, but nobody ever reads the request.
    let backend = RawBackend::bind().await;
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends:\n      - ws://{}\n    connect_timeout: 300ms\nroutes:\n  - name: app\n    upstream: app\n",
        backend.addr
    );
    let gateway = start_gateway(&yaml).await;
    let started = Instant::now();
    let response = raw_exchange(gateway.addr, upgrade_request("/", "").as_bytes()).await;
    let waited = started.elapsed();
    let (head, body) = split_response(&response);
    assert_eq!(status_of(&head), 504, "{head}");
    assert!(
        waited >= Duration::from_millis(300),
        "answered after {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "answered after {waited:?}");
    assert!(!body.is_empty());
}

// ---------------------------------------------------------------------------------------------
// 9. Backend dying mid-connection.

#[tokio::test]
async fn backend_dies_after_handshake_client_gets_1014() {
    let backend = RawBackend::bind().await;
    let gateway = gateway_to(backend.addr, "").await;
    let request = upgrade_request("/", "");
    let (mut client, raw) = tokio::join!(
        raw_client(gateway.addr, request.as_bytes()),
        backend.accept_ws()
    );
    drop(raw);
    let close = client.close_frame().await.expect("client gets a close");
    assert_eq!(close.close_code(), Some(1014), "{close:?}");
    assert!(close.close_reason().contains("backend"), "{close:?}");
    assert!(client.eof_within(WAIT).await);
}

#[tokio::test]
async fn backend_dies_after_echoing_one_message_client_gets_echo_then_1014() {
    let backend = RawBackend::bind().await;
    let gateway = gateway_to(backend.addr, "").await;
    let mut request = upgrade_request("/", "").into_bytes();
    request.extend(client_frame(true, op::TEXT, b"one"));
    let (mut client, mut raw) =
        tokio::join!(raw_client(gateway.addr, &request), backend.accept_ws());
    let received = raw
        .read_frame()
        .await
        .expect("the backend gets the message");
    assert_eq!(
        (
            received.opcode,
            received.masked,
            received.payload.as_slice()
        ),
        (op::TEXT, true, &b"one"[..])
    );
    raw.send(&server_frame(true, op::TEXT, b"one")).await;
    drop(raw);
    let frames = client.frames_until_eof().await;
    let kinds: Vec<u8> = frames.iter().map(|f| f.opcode).collect();
    assert_eq!(kinds, [op::TEXT, op::CLOSE], "{frames:?}");
    assert_eq!(frames[0].payload, b"one");
    assert_eq!(frames[1].close_code(), Some(1014));
}

// ---------------------------------------------------------------------------------------------
// 10. Backpressure.

/// Kernel buffers on the raw ends of the backpressure tests.
const SMALL_BUFFER: u32 = 64 * 1024;
/// How long a write may block before the writer counts as stopped by backpressure.
const STALL: Duration = Duration::from_millis(1500);

/// What may be in flight once the writer is blocked: the gateway's own socket buffers at their
/// largest (one receive buffer on the writer's side, one send buffer on the reader's side), our
/// small ones, and 16 MiB for everything else. An unbounded gateway passes this easily.
fn in_flight_bound() -> u64 {
    let (rmem, wmem) = tcp_buffer_maxima();
    rmem + wmem + 4 * u64::from(SMALL_BUFFER) + (16 << 20)
}

/// Writes `frame` over and over until a write blocks for `STALL`. Returns how many bytes were
/// written; fails if the writer gets past `cap` without blocking.
async fn write_until_blocked(stream: &mut tokio::net::TcpStream, frame: &[u8], cap: u64) -> u64 {
    let mut sent = 0u64;
    loop {
        let at = (sent % frame.len() as u64) as usize;
        match tokio::time::timeout(STALL, stream.write(&frame[at..])).await {
            Ok(Ok(n)) => sent += n as u64,
            Ok(Err(error)) => panic!("write failed after {sent} bytes: {error}"),
            Err(_) => return sent,
        }
        assert!(
            sent < cap,
            "wrote {sent} bytes without being blocked: the gateway buffers without bound"
        );
    }
}

/// Counts the payload bytes of binary frames until a close frame; checks every byte.
async fn count_until_close(ws: &mut RawWs, byte: u8) -> u64 {
    let mut total = 0u64;
    loop {
        let frame = ws.read_frame().await.expect("a close before EOF");
        match frame.opcode {
            op::BINARY => {
                assert!(
                    frame.payload.iter().all(|&b| b == byte),
                    "payload corrupted"
                );
                total += frame.payload.len() as u64;
            }
            op::CLOSE => return total,
            other => panic!("unexpected opcode {other}"),
        }
    }
}

#[tokio::test]
async fn backpressure_backend_not_reading_blocks_client_writes_then_delivers_everything() {
    let _heavy = HEAVY.lock().await;
    let backend = RawBackend::bind_small_buffers(SMALL_BUFFER).await;
    let gateway = gateway_to(backend.addr, "").await;
    let stream = small_buffer_connect(gateway.addr, SMALL_BUFFER).await;
    let request = upgrade_request("/", "");
    let (mut client, mut raw) = tokio::join!(
        raw_client_on(stream, request.as_bytes()),
        backend.accept_ws()
    );

    let payload = vec![0x5a; 64 * 1024];
    let frame = client_frame(true, op::BINARY, &payload);
    let bound = in_flight_bound();
    let rss_before = rss_bytes();
    let sent = write_until_blocked(&mut client.stream, &frame, bound + (64 << 20)).await;
    let rss_growth = rss_bytes().saturating_sub(rss_before);
    eprintln!("blocked after {sent} bytes (bound {bound}); the process grew by {rss_growth} bytes");
    assert!(
        sent < bound,
        "{sent} bytes accepted while the backend read nothing (bound {bound})"
    );
    assert!(
        rss_growth < 64 << 20,
        "the process grew by {rss_growth} bytes while the backend read nothing"
    );

    // Nothing was lost: once the backend reads, every frame arrives intact.
    let reader = tokio::spawn(async move {
        let total = count_until_close(&mut raw, 0x5a).await;
        raw.send(&server_frame(true, op::CLOSE, &close_payload(1000, b"")))
            .await;
        total
    });
    let rest = frame.len() - (sent % frame.len() as u64) as usize;
    let frames_sent = sent.div_ceil(frame.len() as u64);
    if rest < frame.len() {
        client.send(&frame[frame.len() - rest..]).await;
    }
    client
        .send(&client_frame(true, op::CLOSE, &close_payload(1000, b"")))
        .await;
    let received = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("backend drained in time")
        .unwrap();
    assert_eq!(received, frames_sent * payload.len() as u64);
    assert_eq!(
        client.close_frame().await.and_then(|f| f.close_code()),
        Some(1000)
    );
}

#[tokio::test]
async fn backpressure_client_not_reading_blocks_backend_flood_then_delivers_everything() {
    let _heavy = HEAVY.lock().await;
    let backend = RawBackend::bind_small_buffers(SMALL_BUFFER).await;
    let gateway = gateway_to(backend.addr, "").await;
    let stream = small_buffer_connect(gateway.addr, SMALL_BUFFER).await;
    let request = upgrade_request("/", "");
    let (mut client, mut raw) = tokio::join!(
        raw_client_on(stream, request.as_bytes()),
        backend.accept_ws()
    );

    let payload = vec![0xa5; 64 * 1024];
    let frame = server_frame(true, op::BINARY, &payload);
    let bound = in_flight_bound();
    let rss_before = rss_bytes();
    let sent = write_until_blocked(&mut raw.stream, &frame, bound + (64 << 20)).await;
    let rss_growth = rss_bytes().saturating_sub(rss_before);
    eprintln!("blocked after {sent} bytes (bound {bound}); the process grew by {rss_growth} bytes");
    assert!(
        sent < bound,
        "{sent} bytes accepted while the client read nothing (bound {bound})"
    );
    assert!(
        rss_growth < 64 << 20,
        "the process grew by {rss_growth} bytes while the client read nothing"
    );

    let reader = tokio::spawn(async move {
        let total = count_until_close(&mut client, 0xa5).await;
        client
            .send(&client_frame(true, op::CLOSE, &close_payload(1000, b"")))
            .await;
        total
    });
    let rest = frame.len() - (sent % frame.len() as u64) as usize;
    let frames_sent = sent.div_ceil(frame.len() as u64);
    if rest < frame.len() {
        raw.send(&frame[frame.len() - rest..]).await;
    }
    raw.send(&server_frame(true, op::CLOSE, &close_payload(1000, b"")))
        .await;
    let received = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("client drained in time")
        .unwrap();
    assert_eq!(received, frames_sent * payload.len() as u64);
    assert_eq!(
        raw.close_frame().await.and_then(|f| f.close_code()),
        Some(1000)
    );
}

// ---------------------------------------------------------------------------------------------
// 11. Request headers.

#[tokio::test]
async fn handshake_headers_forwarded_added_and_hop_by_hop_dropped() {
    let backend = echo_backend("b").await;
    let gateway = gateway_to(backend.addr, "").await;
    let client_key = "dGhlIHNhbXBsZSBub25jZQ==";
    let request = format!(
        "GET /room/42?token=abc&x=1 HTTP/1.1\r\n\
         Host: chat.local:8080\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade, X-Hop-Secret\r\n\
         Sec-WebSocket-Key: {client_key}\r\n\
         Sec-WebSocket-Version: 13\r\n\
         Origin: https://app.example\r\n\
         Cookie: sid=abc123; theme=dark\r\n\
         Authorization: Bearer t0ken\r\n\
         X-Forwarded-For: 203.0.113.7\r\n\
         Forwarded: for=203.0.113.7\r\n\
         Keep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\n\
         TE: trailers\r\n\
         Trailer: X-Checksum\r\n\
         X-Hop-Secret: do-not-forward\r\n\
         X-Custom: kept\r\n\
         \r\n"
    );
    let mut client = raw_client(gateway.addr, request.as_bytes()).await;
    client.send(&client_frame(true, op::TEXT, b"hello")).await;
    assert_eq!(
        client.read_frame().await.map(|f| f.payload),
        Some(b"hello".to_vec())
    );

    let seen = backend.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.path, "/room/42?token=abc&x=1");
    for (name, value) in [
        ("host", "chat.local:8080"),
        ("origin", "https://app.example"),
        ("cookie", "sid=abc123; theme=dark"),
        ("authorization", "Bearer t0ken"),
        ("x-custom", "kept"),
        // The client is no trusted proxy: its chains are replaced, not extended.
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "chat.local:8080"),
        (
            "forwarded",
            "for=127.0.0.1;proto=http;host=\"chat.local:8080\"",
        ),
    ] {
        assert_eq!(
            seen.header(name),
            Some(value),
            "{name} in {:?}",
            seen.headers
        );
        let count = seen
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count();
        assert_eq!(
            count, 1,
            "{name} appears {count} times in {:?}",
            seen.headers
        );
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "x-hop-secret",
    ] {
        assert_eq!(
            seen.header(name),
            None,
            "hop-by-hop {name} forwarded: {:?}",
            seen.headers
        );
    }
    let connection = seen
        .header("connection")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(!connection.contains("x-hop-secret"), "{connection}");
    assert_ne!(
        seen.header("sec-websocket-key"),
        Some(client_key),
        "the backend hop has its own key"
    );
}

// ---------------------------------------------------------------------------------------------
// 12. Bytes that arrive together with a handshake.

#[tokio::test]
async fn early_client_frames_in_upgrade_write_are_relayed() {
    let backend = echo_backend("b").await;
    let gateway = gateway_to(backend.addr, "").await;
    let mut request = upgrade_request("/", "").into_bytes();
    request.extend(client_frame(true, op::TEXT, b"early bird"));
    request.extend(client_frame(true, op::BINARY, &[1, 2, 3]));
    let mut client = raw_client(gateway.addr, &request).await;
    let first = client
        .read_frame()
        .await
        .expect("echo of the first early frame");
    let second = client
        .read_frame()
        .await
        .expect("echo of the second early frame");
    assert_eq!(
        (first.opcode, first.payload.as_slice()),
        (op::TEXT, &b"early bird"[..])
    );
    assert_eq!(
        (second.opcode, second.payload.as_slice()),
        (op::BINARY, &[1u8, 2, 3][..])
    );
}

#[tokio::test]
async fn early_backend_frame_in_101_write_is_relayed() {
    let backend = RawBackend::bind().await;
    let gateway = gateway_to(backend.addr, "").await;
    let early = server_frame(true, op::TEXT, b"welcome");
    let (mut ws, _raw) = tokio::join!(
        connect(gateway.addr, "/"),
        backend.accept_ws_with("", &early)
    );
    assert_eq!(next_message(&mut ws).await, Message::text("welcome"));
}
