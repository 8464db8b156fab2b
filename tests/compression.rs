//! permessage-deflate (RFC 7692) through the gateway, end to end on 127.0.0.1.
//!
//! A route's `compression` decides whether the client's `Sec-WebSocket-Extensions` offer
//! reaches the backend: `strip` (the default) removes it, so nothing is ever compressed and an
//! RSV1 frame is a protocol error; `passthrough` forwards it, passes the backend's answer to the
//! client, and relays compressed frames as opaque payload (RSV1 only on the first frame of a
//! message; compressed text is not checked as UTF-8, since it is deflate output).
//!
//! Two kinds of peers, neither of them wsgate's codec:
//! - raw sockets writing hand-made frames (`support/peers.rs`), for exact control of the RSV
//!   bits, of the handshake headers and of protocol violations;
//! - real compressing peers: node `ws` 8.23.0 (`tests/autobahn/compression-backend/`, the same
//!   echo server .ci/autobahn-compression.sh runs Autobahn 12.*/13.* against) as backend and as
//!   client. These need `node` and `npm ci --prefix tests/autobahn/compression-backend`; without
//!   them they print `SKIPPED` and pass, except under `CI=true`, where they fail.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/peers.rs"]
mod peers;
mod support;

use peers::*;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;
use support::{Gateway, simple_config, start_gateway, upgrade_request};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The offer a browser sends.
const OFFER: &str = "permessage-deflate; client_max_window_bits";
/// An answer a server may give to it.
const ANSWER: &str = "permessage-deflate; server_no_context_takeover";
const PASSTHROUGH: &str = "compression: passthrough";
const RSV1: u8 = 0x40;
const RSV2: u8 = 0x20;
const RSV3: u8 = 0x10;

/// "Hello" compressed with DEFLATE as RFC 7692 §7.2.3.1 shows it. Not valid UTF-8 (0xf2 starts
/// a 4-byte sequence that 0x48 does not continue), as compressed text usually is not.
const HELLO_DEFLATED: &[u8] = &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];

/// Bytes that are invalid UTF-8 in every way a validator checks: a lone continuation byte, an
/// overlong form, a surrogate, a byte that never occurs, and a truncated sequence at the end.
const NOT_UTF8: &[u8] = b"\x80 \xc0\xaf \xed\xa0\x80 \xff \xf0\x9f\x8d";

/// Deterministic bytes (xorshift64): whatever the gateway did to them would show.
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

fn extensions_header(value: Option<&str>) -> String {
    value.map_or_else(String::new, |v| {
        format!("Sec-WebSocket-Extensions: {v}\r\n")
    })
}

async fn gateway_to(backend: SocketAddr, route_extra: &str) -> Gateway {
    start_gateway(&simple_config(&[backend], route_extra)).await
}

/// A gateway with `route_extra` in front of a raw backend; a raw client that offers `offer`,
/// a backend that answers `answer`. Returns the client (whose `head` is the 101 it got) and the
/// backend (whose `head` is the upgrade request the gateway sent).
async fn connected(
    route_extra: &str,
    offer: Option<&str>,
    answer: Option<&str>,
) -> (Gateway, RawWs, RawWs) {
    let backend = RawBackend::bind().await;
    let gateway = gateway_to(backend.addr, route_extra).await;
    let request = upgrade_request("/", &extensions_header(offer));
    let answer = extensions_header(answer);
    let (client, raw) = tokio::join!(
        raw_client(gateway.addr, request.as_bytes()),
        backend.accept_ws_with(&answer, &[])
    );
    (gateway, client, raw)
}

/// Like `connected` with a passthrough route where the backend accepted the client's offer.
async fn negotiated() -> (Gateway, RawWs, RawWs) {
    let (gateway, client, backend) = connected(PASSTHROUGH, Some(OFFER), Some(ANSWER)).await;
    assert_eq!(
        header_of(&client.head, "sec-websocket-extensions"),
        Some(ANSWER),
        "{}",
        client.head
    );
    (gateway, client, backend)
}

/// The response head a client gets when the backend answers `answer` to its upgrade and the
/// gateway should refuse: checks that the backend was asked, and returns the head.
async fn refused_head(route_extra: &str, offer: Option<&str>, answer: &str) -> String {
    let backend = RawBackend::bind().await;
    let gateway = gateway_to(backend.addr, route_extra).await;
    let request = upgrade_request("/", &extensions_header(offer));
    let answer = extensions_header(Some(answer));
    let client = async {
        let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        read_head_exact(&mut stream).await.expect("a response head")
    };
    let (head, _backend) = tokio::join!(client, backend.accept_ws_with(&answer, &[]));
    head
}

/// Sends `bytes` from the client and checks the backend's 1001 naming the client's error, then
/// (once the backend has answered that close: the gateway lets the backend finish first) the
/// client's close with `code` and `reason`, and that the client's TCP is then closed.
async fn assert_client_violation(
    mut client: RawWs,
    mut backend: RawWs,
    bytes: &[u8],
    code: u16,
    reason: &str,
) {
    client.send(bytes).await;
    let close = backend
        .close_frame()
        .await
        .unwrap_or_else(|| panic!("backend gets a close for {reason:?}"));
    assert_eq!(
        (close.close_code(), close.close_reason()),
        (Some(1001), format!("client protocol error: {reason}"))
    );
    backend
        .try_send(&server_frame(true, op::CLOSE, &close_payload(1001, b"")))
        .await;
    let close = client
        .close_frame()
        .await
        .unwrap_or_else(|| panic!("client gets a close for {reason:?}"));
    assert_eq!(
        (close.close_code(), close.close_reason().as_str()),
        (Some(code), reason)
    );
    client
        .try_send(&client_frame(true, op::CLOSE, &close_payload(code, b"")))
        .await;
    assert!(
        client.eof_within(WAIT).await,
        "the gateway closes the client's TCP"
    );
}

/// Sends `bytes` from the backend and checks the backend's close (code and reason) and the
/// client's 1001 naming the backend's error.
async fn assert_backend_violation(
    mut client: RawWs,
    mut backend: RawWs,
    bytes: &[u8],
    code: u16,
    reason: &str,
) {
    backend.send(bytes).await;
    let close = backend
        .close_frame()
        .await
        .unwrap_or_else(|| panic!("backend gets a close for {reason:?}"));
    assert_eq!(
        (close.close_code(), close.close_reason().as_str()),
        (Some(code), reason)
    );
    let close = client.close_frame().await.expect("client gets a close");
    assert_eq!(
        (close.close_code(), close.close_reason()),
        (Some(1001), format!("backend protocol error: {reason}"))
    );
}

fn expect_frame(
    got: Option<RawFrame>,
    fin: bool,
    rsv: u8,
    opcode: u8,
    masked: bool,
    payload: &[u8],
) {
    let got = got.expect("a frame, not the end of the connection");
    let want = RawFrame {
        fin,
        rsv,
        opcode,
        masked,
        payload: payload.to_vec(),
    };
    if got != want {
        panic!(
            "frame changed on the way: got fin={} rsv={:#x} opcode={:#x} masked={} {} bytes, \
             want fin={fin} rsv={rsv:#x} opcode={opcode:#x} masked={masked} {} bytes (payload \
             equal: {})",
            got.fin,
            got.rsv,
            got.opcode,
            got.masked,
            got.payload.len(),
            payload.len(),
            got.payload == payload
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 1. `compression: strip` (the default).

#[tokio::test]
async fn strip_offer_never_reaches_backend_and_101_has_no_extension() {
    let (_gateway, client, backend) = connected("", Some(OFFER), None).await;
    assert_eq!(
        header_of(&backend.head, "sec-websocket-extensions"),
        None,
        "the backend saw the offer: {}",
        backend.head
    );
    assert_eq!(
        header_of(&client.head, "sec-websocket-extensions"),
        None,
        "{}",
        client.head
    );
}

#[tokio::test]
async fn strip_explicit_setting_is_the_default() {
    let (_gateway, client, backend) = connected("compression: strip", Some(OFFER), None).await;
    assert_eq!(header_of(&backend.head, "sec-websocket-extensions"), None);
    assert_eq!(header_of(&client.head, "sec-websocket-extensions"), None);
}

#[tokio::test]
async fn strip_rsv1_frame_from_client_gets_1002_backend_gets_1001() {
    let (_gateway, client, backend) = connected("", Some(OFFER), None).await;
    let bytes = frame(true, RSV1, op::TEXT, Some(CLIENT_KEY), HELLO_DEFLATED);
    assert_client_violation(
        client,
        backend,
        &bytes,
        1002,
        "reserved bits set without a negotiated extension",
    )
    .await;
}

#[tokio::test]
async fn strip_rsv1_frame_from_backend_gets_1002_client_gets_1001() {
    let (_gateway, client, backend) = connected("", Some(OFFER), None).await;
    let bytes = frame(true, RSV1, op::TEXT, None, HELLO_DEFLATED);
    assert_backend_violation(
        client,
        backend,
        &bytes,
        1002,
        "reserved bits set without a negotiated extension",
    )
    .await;
}

/// The gateway offered nothing, so a backend that answers permessage-deflate anyway breaks
/// RFC 6455 §4.1: the client gets 502, not a 101 with an extension it must then decode.
#[tokio::test]
async fn strip_backend_answering_deflate_anyway_gets_the_client_502() {
    let head = refused_head("", Some(OFFER), "permessage-deflate").await;
    assert_eq!(status_of(&head), 502, "{head}");
    assert_eq!(header_of(&head, "sec-websocket-extensions"), None, "{head}");
    assert_eq!(header_of(&head, "sec-websocket-accept"), None, "{head}");
}

// ---------------------------------------------------------------------------------------------
// 2. `compression: passthrough`: the handshake.

#[tokio::test]
async fn passthrough_offer_reaches_backend_and_its_answer_reaches_the_client() {
    let (_gateway, client, backend) = negotiated().await;
    assert_eq!(
        header_of(&backend.head, "sec-websocket-extensions"),
        Some(OFFER),
        "{}",
        backend.head
    );
    assert_eq!(status_of(&client.head), 101);
}

/// Offers on several header lines reach the backend as one list, in order (RFC 6455 §9.1).
#[tokio::test]
async fn passthrough_offers_on_several_lines_reach_backend_as_one_list() {
    let backend = RawBackend::bind().await;
    let gateway = gateway_to(backend.addr, PASSTHROUGH).await;
    let request = upgrade_request(
        "/",
        &format!(
            "Sec-WebSocket-Extensions: {OFFER}\r\nSec-WebSocket-Extensions: permessage-deflate\r\n"
        ),
    );
    let answer = extensions_header(Some("permessage-deflate"));
    let (client, raw) = tokio::join!(
        raw_client(gateway.addr, request.as_bytes()),
        backend.accept_ws_with(&answer, &[])
    );
    assert_eq!(
        header_of(&raw.head, "sec-websocket-extensions"),
        Some(format!("{OFFER}, permessage-deflate").as_str()),
        "{}",
        raw.head
    );
    assert_eq!(
        header_of(&client.head, "sec-websocket-extensions"),
        Some("permessage-deflate")
    );
}

/// The backend may decline the offer; then nothing is compressed and RSV1 is an error again.
#[tokio::test]
async fn passthrough_backend_declining_means_no_extension_and_rsv1_gets_1002() {
    let (_gateway, client, backend) = connected(PASSTHROUGH, Some(OFFER), None).await;
    assert_eq!(
        header_of(&backend.head, "sec-websocket-extensions"),
        Some(OFFER)
    );
    assert_eq!(header_of(&client.head, "sec-websocket-extensions"), None);
    let bytes = frame(true, RSV1, op::TEXT, Some(CLIENT_KEY), HELLO_DEFLATED);
    assert_client_violation(
        client,
        backend,
        &bytes,
        1002,
        "reserved bits set without a negotiated extension",
    )
    .await;
}

#[tokio::test]
async fn passthrough_backend_accepting_extension_nobody_offered_gets_the_client_502() {
    let head = refused_head(PASSTHROUGH, None, "permessage-deflate").await;
    assert_eq!(status_of(&head), 502, "{head}");
    assert_eq!(header_of(&head, "sec-websocket-extensions"), None, "{head}");
    assert_eq!(header_of(&head, "sec-websocket-accept"), None, "{head}");
}

#[tokio::test]
async fn passthrough_backend_choosing_another_extension_than_offered_gets_the_client_502() {
    let head = refused_head(
        PASSTHROUGH,
        Some("x-webkit-deflate-frame"),
        "permessage-deflate",
    )
    .await;
    assert_eq!(status_of(&head), 502, "{head}");
    assert_eq!(header_of(&head, "sec-websocket-extensions"), None, "{head}");
}

/// The hyper path (an upgrade after a plain request on a keep-alive connection) negotiates the
/// same way as a connection whose first request is the upgrade.
#[tokio::test]
async fn passthrough_upgrade_after_a_plain_request_on_keep_alive_negotiates_too() {
    use tokio::io::AsyncReadExt;
    let backend = RawBackend::bind().await;
    let gateway = gateway_to(backend.addr, PASSTHROUGH).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();

    // A plain GET, answered by the raw backend on its own connection.
    stream
        .write_all(b"GET /plain HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut plain = backend.accept().await;
    let request = read_head_exact(&mut plain)
        .await
        .expect("the plain request");
    assert!(request.starts_with("GET /plain "), "{request}");
    plain
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        .await
        .unwrap();
    let head = read_head_exact(&mut stream).await.expect("a response head");
    assert_eq!(status_of(&head), 200, "{head}");
    let mut body = [0u8; 2];
    tokio::time::timeout(WAIT, stream.read_exact(&mut body))
        .await
        .expect("body in time")
        .unwrap();
    assert_eq!(&body, b"ok");

    // Then the upgrade on the same client connection.
    let request = upgrade_request("/ws", &extensions_header(Some(OFFER)));
    let answer = extensions_header(Some(ANSWER));
    let (mut client, mut raw) = tokio::join!(
        raw_client_on(stream, request.as_bytes()),
        backend.accept_ws_with(&answer, &[])
    );
    assert_eq!(
        header_of(&raw.head, "sec-websocket-extensions"),
        Some(OFFER)
    );
    assert_eq!(
        header_of(&client.head, "sec-websocket-extensions"),
        Some(ANSWER),
        "{}",
        client.head
    );
    client
        .send(&frame(
            true,
            RSV1,
            op::TEXT,
            Some(CLIENT_KEY),
            HELLO_DEFLATED,
        ))
        .await;
    expect_frame(
        raw.read_frame().await,
        true,
        RSV1,
        op::TEXT,
        true,
        HELLO_DEFLATED,
    );
    raw.send(&frame(true, RSV1, op::TEXT, None, HELLO_DEFLATED))
        .await;
    expect_frame(
        client.read_frame().await,
        true,
        RSV1,
        op::TEXT,
        false,
        HELLO_DEFLATED,
    );
}

// ---------------------------------------------------------------------------------------------
// 3. `compression: passthrough`: frames.

#[tokio::test]
async fn passthrough_rsv1_frames_pass_client_to_backend_unchanged() {
    let (_gateway, mut client, mut backend) = negotiated().await;
    // Valid deflate: the gateway inflates what passes to hold the limits to it.
    let big = deflated(&pattern(200_000, 7));
    let not_utf8 = deflated(NOT_UTF8);
    for (opcode, payload) in [
        (op::TEXT, HELLO_DEFLATED),
        (op::TEXT, &not_utf8[..]),
        (op::BINARY, HELLO_DEFLATED),
        // Larger than the relay's buffers: the opaque payload is re-masked piece by piece.
        (op::BINARY, &big[..]),
        (op::TEXT, &big[..]),
    ] {
        client
            .send(&frame(true, RSV1, opcode, Some(CLIENT_KEY), payload))
            .await;
        expect_frame(
            backend.read_frame().await,
            true,
            RSV1,
            opcode,
            true,
            payload,
        );
    }
}

#[tokio::test]
async fn passthrough_rsv1_frames_pass_backend_to_client_unchanged() {
    let (_gateway, mut client, mut backend) = negotiated().await;
    // Valid deflate: the gateway inflates what passes to hold the limits to it.
    let big = deflated(&pattern(200_000, 9));
    let not_utf8 = deflated(NOT_UTF8);
    for (opcode, payload) in [
        (op::TEXT, HELLO_DEFLATED),
        (op::TEXT, &not_utf8[..]),
        (op::BINARY, HELLO_DEFLATED),
        (op::BINARY, &big[..]),
        (op::TEXT, &big[..]),
    ] {
        backend
            .send(&frame(true, RSV1, opcode, None, payload))
            .await;
        expect_frame(
            client.read_frame().await,
            true,
            RSV1,
            opcode,
            false,
            payload,
        );
    }
}

/// A compressed message in several frames: RSV1 on the first only (RFC 7692 §6.1). The
/// continuations belong to a compressed message, so their bytes are opaque too; a ping between
/// fragments is fine; the next, uncompressed, text message is checked as UTF-8 again.
#[tokio::test]
async fn passthrough_fragmented_compressed_messages_pass_both_ways() {
    let (_gateway, mut client, mut backend) = negotiated().await;
    // Valid deflate (the gateway inflates it to count it), cut anywhere.
    let packed = deflated(&[NOT_UTF8, "é".as_bytes(), NOT_UTF8].concat());
    let parts: [&[u8]; 3] = [&packed[..5], &packed[5..6], &packed[6..]];

    let mut bytes = frame(false, RSV1, op::TEXT, Some(CLIENT_KEY), parts[0]);
    bytes.extend(frame(
        false,
        0,
        op::CONTINUATION,
        Some(CLIENT_KEY),
        parts[1],
    ));
    bytes.extend(frame(true, 0, op::CONTINUATION, Some(CLIENT_KEY), parts[2]));
    bytes.extend(frame(
        true,
        0,
        op::TEXT,
        Some(CLIENT_KEY),
        "déjà vu".as_bytes(),
    ));
    client.send(&bytes).await;
    expect_frame(
        backend.read_frame().await,
        false,
        RSV1,
        op::TEXT,
        true,
        parts[0],
    );
    expect_frame(
        backend.read_frame().await,
        false,
        0,
        op::CONTINUATION,
        true,
        parts[1],
    );
    expect_frame(
        backend.read_frame().await,
        true,
        0,
        op::CONTINUATION,
        true,
        parts[2],
    );
    expect_frame(
        backend.read_frame().await,
        true,
        0,
        op::TEXT,
        true,
        "déjà vu".as_bytes(),
    );

    let mut bytes = frame(false, RSV1, op::TEXT, None, parts[0]);
    bytes.extend(frame(false, 0, op::CONTINUATION, None, parts[1]));
    bytes.extend(frame(true, 0, op::CONTINUATION, None, parts[2]));
    bytes.extend(frame(true, 0, op::TEXT, None, "déjà vu".as_bytes()));
    backend.send(&bytes).await;
    expect_frame(
        client.read_frame().await,
        false,
        RSV1,
        op::TEXT,
        false,
        parts[0],
    );
    expect_frame(
        client.read_frame().await,
        false,
        0,
        op::CONTINUATION,
        false,
        parts[1],
    );
    expect_frame(
        client.read_frame().await,
        true,
        0,
        op::CONTINUATION,
        false,
        parts[2],
    );
    expect_frame(
        client.read_frame().await,
        true,
        0,
        op::TEXT,
        false,
        "déjà vu".as_bytes(),
    );
}

/// Negotiating compression does not switch off UTF-8 checking of messages sent uncompressed:
/// the client gets 1007; the backend, whose copy of the frame is half-way through, has its TCP
/// cut (the relay's rule) and never sees the invalid byte.
#[tokio::test]
async fn passthrough_uncompressed_invalid_text_still_gets_1007() {
    let (_gateway, mut client, mut backend) = negotiated().await;
    client
        .send(&frame(
            true,
            0,
            op::TEXT,
            Some(CLIENT_KEY),
            b"ok \xff not ok",
        ))
        .await;
    let close = client.close_frame().await.expect("client gets a close");
    assert_eq!(
        (close.close_code(), close.close_reason().as_str()),
        (Some(1007), "invalid UTF-8 in text message")
    );
    let frames = backend.frames_until_eof().await;
    assert!(
        frames.iter().all(|f| f.opcode != op::TEXT),
        "the invalid text frame reached the backend whole: {frames:?}"
    );
}

#[tokio::test]
async fn passthrough_rsv1_on_client_continuation_gets_1002_backend_gets_1001() {
    for first_rsv in [RSV1, 0] {
        let (_gateway, client, backend) = negotiated().await;
        let mut bytes = frame(false, first_rsv, op::TEXT, Some(CLIENT_KEY), b"ab");
        bytes.extend(frame(true, RSV1, op::CONTINUATION, Some(CLIENT_KEY), b"cd"));
        assert_client_violation(
            client,
            backend,
            &bytes,
            1002,
            "RSV1 set on a continuation or control frame",
        )
        .await;
    }
}

#[tokio::test]
async fn passthrough_rsv1_on_backend_continuation_gets_1002_client_gets_1001() {
    let (_gateway, client, backend) = negotiated().await;
    let mut bytes = frame(false, RSV1, op::BINARY, None, b"ab");
    bytes.extend(frame(true, RSV1, op::CONTINUATION, None, b"cd"));
    assert_backend_violation(
        client,
        backend,
        &bytes,
        1002,
        "RSV1 set on a continuation or control frame",
    )
    .await;
}

/// permessage-deflate defines RSV1 only: RSV2 and RSV3 stay errors, alone or with RSV1.
#[tokio::test]
async fn passthrough_rsv2_and_rsv3_from_client_get_1002() {
    for rsv in [RSV2, RSV3, RSV1 | RSV2] {
        let (_gateway, client, backend) = negotiated().await;
        let bytes = frame(true, rsv, op::TEXT, Some(CLIENT_KEY), HELLO_DEFLATED);
        assert_client_violation(
            client,
            backend,
            &bytes,
            1002,
            "reserved bits set without a negotiated extension",
        )
        .await;
    }
}

#[tokio::test]
async fn passthrough_rsv2_and_rsv3_from_backend_get_1002() {
    for rsv in [RSV2, RSV3, RSV1 | RSV3] {
        let (_gateway, client, backend) = negotiated().await;
        let bytes = frame(true, rsv, op::BINARY, None, HELLO_DEFLATED);
        assert_backend_violation(
            client,
            backend,
            &bytes,
            1002,
            "reserved bits set without a negotiated extension",
        )
        .await;
    }
}

/// RSV1 means "compressed" on data frames only (RFC 7692 §6): a control frame with it is an
/// error even when permessage-deflate was negotiated.
#[tokio::test]
async fn passthrough_rsv1_on_a_ping_gets_1002() {
    let (_gateway, mut client, mut backend) = negotiated().await;
    client
        .send(&frame(true, RSV1, op::PING, Some(CLIENT_KEY), b"p"))
        .await;
    let close = backend.close_frame().await.expect("backend gets a close");
    assert_eq!(close.close_code(), Some(1001), "{}", close.close_reason());
    backend
        .try_send(&server_frame(true, op::CLOSE, &close_payload(1001, b"")))
        .await;
    let close = client.close_frame().await.expect("client gets a close");
    // Only the code: the reason names reserved bits or RSV1 on a control frame, both right.
    assert_eq!(close.close_code(), Some(1002), "{}", close.close_reason());
}

// ---------------------------------------------------------------------------------------------
// 4. Real compressing peers: node `ws` on both ends.

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/autobahn/compression-backend")
}

/// Whether node and the `ws` package are there. Missing prerequisites skip the test loudly,
/// or fail it under CI, where they must have been installed.
fn node_peers_present() -> bool {
    let node = Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    let ws = node.then(|| support::npm::ensure_installed(&peers_dir(), &["ws"]));
    let missing = match ws {
        Some(Ok(())) => return true,
        None => "`node` is not on PATH".to_owned(),
        Some(Err(why)) => {
            format!("tests/autobahn/compression-backend/node_modules is not installed: {why}")
        }
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "the permessage-deflate tests with real peers need node and `ws`: {missing}; run \
             `npm ci --prefix tests/autobahn/compression-backend` (with node >= 18 installed)"
        );
    }
    // Straight to the process's stderr: the harness captures `eprintln!` of passing tests.
    static ANNOUNCED: Once = Once::new();
    ANNOUNCED.call_once(|| {
        let banner = format!(
            "\n==================================================================\n\
             SKIPPED: permessage-deflate tests with real node `ws` peers \
             (tests/compression.rs): {missing}.\n\
             Install with: npm ci --prefix tests/autobahn/compression-backend   (node >= 18)\n\
             ==================================================================\n"
        );
        let _ = std::io::stderr().write_all(banner.as_bytes());
    });
    false
}

/// `server.js`: a ws echo server compressing every message. Killed when dropped; it also exits
/// when its stdin (held by this struct) closes, should the test process die.
struct NodeBackend {
    child: Child,
    addr: SocketAddr,
    /// One JSON line per accepted connection.
    connections: mpsc::UnboundedReceiver<String>,
}

impl Drop for NodeBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn node_backend() -> NodeBackend {
    let mut child = Command::new("node")
        .args(["server.js", "0", "--threshold", "0", "--exit-with-stdin"])
        .current_dir(peers_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start node server.js");
    let stdout = child.stdout.take().unwrap();
    let (tx, mut lines) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut backend = NodeBackend {
        child,
        addr: "127.0.0.1:0".parse().unwrap(),
        connections: mpsc::unbounded_channel().1,
    };
    let ready = tokio::time::timeout(Duration::from_secs(20), lines.recv())
        .await
        .expect("server.js ready within 20 s")
        .expect("server.js prints `listening PORT`");
    let port: u16 = ready
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("server.js said {ready:?}"));
    backend.addr = SocketAddr::from(([127, 0, 0, 1], port));
    backend.connections = lines;
    backend
}

impl NodeBackend {
    /// The next connection's line: the offer it saw and what it negotiated.
    async fn next_connection(&mut self) -> serde_json::Value {
        let line = tokio::time::timeout(WAIT, self.connections.recv())
            .await
            .expect("server.js reports the connection")
            .expect("server.js running");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }
}

/// Runs `client.js` against `url` and returns its report.
async fn node_client(url: String, deflate: bool) -> serde_json::Value {
    let output = tokio::task::spawn_blocking(move || {
        let mut command = Command::new("node");
        command.arg("client.js").arg(&url);
        if !deflate {
            command.arg("--no-deflate");
        }
        command
            .current_dir(peers_dir())
            .stdin(Stdio::null())
            .output()
            .expect("run node client.js")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| {
            panic!(
                "client.js ended with {} and no report\nstdout: {stdout}\nstderr: {stderr}",
                output.status
            )
        });
    let failed: Vec<_> = report["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter(|r| r["ok"] != true)
        .collect();
    assert!(
        failed.is_empty() && output.status.success(),
        "messages did not round-trip: {failed:?}\nstatus: {}\nstderr: {stderr}",
        output.status
    );
    assert_eq!(report["results"].as_array().unwrap().len(), 8, "{report}");
    assert_eq!(report["close"], 1000, "{report}");
    report
}

/// ws on both ends, compressing every message: text with multi-byte characters, 1 MiB of
/// compressible binary, incompressible binary, compressed messages fragmented into several
/// frames, context takeover across messages. Everything comes back intact, and the bytes on the
/// client's wire show the messages travelled compressed through the gateway.
#[tokio::test]
async fn passthrough_real_deflate_peers_round_trip_compressed() {
    if !node_peers_present() {
        return;
    }
    let mut backend = node_backend().await;
    let gateway = gateway_to(backend.addr, PASSTHROUGH).await;
    let report = node_client(format!("ws://{}/", gateway.addr), true).await;
    let connection = backend.next_connection().await;
    assert!(
        connection["offer"]
            .as_str()
            .is_some_and(|o| o.starts_with("permessage-deflate")),
        "the backend did not see the client's offer: {connection}"
    );
    assert_eq!(
        connection["negotiated"], "permessage-deflate",
        "{connection}"
    );
    assert!(
        report["extensions"]
            .as_str()
            .is_some_and(|e| e.starts_with("permessage-deflate")),
        "the client's 101 lacks the backend's answer: {report}"
    );
    let payload = report["payload_bytes"].as_u64().unwrap();
    let wire = report["wire_bytes"].as_u64().unwrap();
    assert!(
        wire * 4 < payload,
        "{wire} bytes on the client's wire for {payload} bytes of messages: not compressed?"
    );
}

/// The same peers behind a `strip` route: ws offers, the backend never sees it, both fall back
/// to uncompressed frames and everything still round-trips.
#[tokio::test]
async fn strip_real_deflate_peers_fall_back_to_uncompressed() {
    if !node_peers_present() {
        return;
    }
    let mut backend = node_backend().await;
    let gateway = gateway_to(backend.addr, "").await;
    let report = node_client(format!("ws://{}/", gateway.addr), true).await;
    let connection = backend.next_connection().await;
    assert_eq!(connection["offer"], serde_json::Value::Null, "{connection}");
    assert_eq!(connection["negotiated"], "", "{connection}");
    assert_eq!(report["extensions"], serde_json::Value::Null, "{report}");
    let payload = report["payload_bytes"].as_u64().unwrap();
    let wire = report["wire_bytes"].as_u64().unwrap();
    assert!(wire >= payload, "{wire} < {payload}: compressed after all?");
}

/// A passthrough route whose client does not offer compression: nothing is compressed.
#[tokio::test]
async fn passthrough_real_peers_without_offer_stay_uncompressed() {
    if !node_peers_present() {
        return;
    }
    let mut backend = node_backend().await;
    let gateway = gateway_to(backend.addr, PASSTHROUGH).await;
    let report = node_client(format!("ws://{}/", gateway.addr), false).await;
    let connection = backend.next_connection().await;
    assert_eq!(connection["offer"], serde_json::Value::Null, "{connection}");
    assert_eq!(report["extensions"], serde_json::Value::Null, "{report}");
}

// ---------------------------------------------------------------------------------------------
// `compression: terminate`: the gateway negotiates with the client and speaks plain frames to
// the backend (here tokio-tungstenite's echo, which has no compression at all).

const TERMINATE: &str = "compression: terminate";

/// node `ws` as the client, compressing every message, through a `terminate` route in front of
/// an echo backend without compression: the browser-style offer is answered by the gateway,
/// every message (fragmented, multi-byte text, 1 MiB, incompressible) comes back intact, the
/// backend never saw an offer, and the client's wire carried compressed bytes both ways.
#[tokio::test]
async fn terminate_real_deflate_client_through_a_plain_backend() {
    if !node_peers_present() {
        return;
    }
    let backend = support::echo_backend("plain").await;
    let gateway = gateway_to(backend.addr, TERMINATE).await;
    let report = node_client(format!("ws://{}/", gateway.addr), true).await;
    let extensions = report["extensions"].as_str().unwrap_or_default();
    assert!(
        extensions.starts_with("permessage-deflate")
            && extensions.contains("client_max_window_bits=11"),
        "the gateway's answer: {report}"
    );
    let seen = backend.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("sec-websocket-extensions"), None, "{seen:?}");
    let payload = report["payload_bytes"].as_u64().unwrap();
    let wire = report["wire_bytes"].as_u64().unwrap();
    assert!(
        wire * 4 < payload,
        "{wire} bytes on the client's wire for {payload} bytes of messages: not compressed?"
    );
}

/// The same with context takeover kept both ways and full windows.
#[tokio::test]
async fn terminate_with_context_takeover_round_trips_with_a_real_client() {
    if !node_peers_present() {
        return;
    }
    let backend = support::echo_backend("plain").await;
    let route = "compression:\n  mode: terminate\n  server_no_context_takeover: false\n  client_no_context_takeover: false\n  server_max_window_bits: 15\n  client_max_window_bits: 15";
    let gateway = gateway_to(backend.addr, route).await;
    let report = node_client(format!("ws://{}/", gateway.addr), true).await;
    let extensions = report["extensions"].as_str().unwrap_or_default();
    assert!(
        !extensions.contains("no_context_takeover"),
        "context takeover was configured: {extensions}"
    );
}

/// A client that does not offer gets no compression on a `terminate` route.
#[tokio::test]
async fn terminate_without_an_offer_stays_uncompressed() {
    let backend = support::echo_backend("plain").await;
    let gateway = gateway_to(backend.addr, TERMINATE).await;
    let mut client = raw_client(gateway.addr, upgrade_request("/", "").as_bytes()).await;
    assert_eq!(header_of(&client.head, "sec-websocket-extensions"), None);
    client.send(&client_frame(true, op::TEXT, b"plain")).await;
    expect_frame(
        client.read_frame().await,
        true,
        0,
        op::TEXT,
        false,
        b"plain",
    );
}

/// Raw deflate as a permessage-deflate sender writes it (sync flush, tail removed).
fn deflated(data: &[u8]) -> Vec<u8> {
    let mut compressor = flate2::Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::new();
    // Until the flush is complete: it is when the output was not filled.
    loop {
        out.reserve(data.len() + 1024);
        let spare = out.capacity() - out.len();
        let input = &data[compressor.total_in() as usize..];
        let before = out.len();
        compressor
            .compress_vec(input, &mut out, flate2::FlushCompress::Sync)
            .unwrap();
        if out.len() - before < spare {
            break;
        }
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// About 1 KiB of deflate that inflates to 1 GiB... would take a while to build: 1 MiB of zeros
/// is 1 KiB compressed, and the limit below is 64 KiB, so it is a bomb all the same.
fn bomb() -> Vec<u8> {
    let packed = deflated(&vec![0; 1 << 20]);
    assert!(packed.len() <= 1100, "{} bytes", packed.len());
    packed
}

const LIMIT_64K: &str = "limits:\n  max_message: 64KiB\n  max_frame: 64KiB";

/// The bomb as one frame, or spread over 16-byte fragments.
fn bomb_frames(fragmented: bool) -> Vec<u8> {
    let packed = bomb();
    if !fragmented {
        return frame(true, RSV1, op::BINARY, Some(CLIENT_KEY), &packed);
    }
    let pieces: Vec<_> = packed.chunks(16).collect();
    let mut bytes = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let fin = i + 1 == pieces.len();
        let (rsv, opcode) = if i == 0 {
            (RSV1, op::BINARY)
        } else {
            (0, op::CONTINUATION)
        };
        bytes.extend(frame(fin, rsv, opcode, Some(CLIENT_KEY), piece));
    }
    bytes
}

/// Whatever the backend gets, it answers a close (a raw backend) and the client gets 1009.
async fn assert_bomb_refused(mut client: RawWs, backend: Option<RawWs>, fragmented: bool) {
    client.send(&bomb_frames(fragmented)).await;
    let backend_side = async move {
        let Some(mut backend) = backend else { return 0 };
        let mut data = 0;
        while let Some(frame) = backend.read_frame().await {
            if frame.opcode == op::CLOSE {
                backend
                    .try_send(&server_frame(true, op::CLOSE, &close_payload(1001, b"")))
                    .await;
                break;
            }
            data += frame.payload.len();
        }
        data
    };
    let client_side = async {
        let started = std::time::Instant::now();
        let close = client.close_frame().await.expect("the client gets a close");
        (close.close_code(), started.elapsed())
    };
    let (forwarded, (code, _elapsed)) = tokio::join!(backend_side, client_side);
    assert_eq!(code, Some(1009));
    assert!(
        forwarded <= 64 * 1024 + 1100,
        "{forwarded} bytes reached the backend"
    );
}

#[tokio::test]
async fn terminate_bomb_in_one_frame_is_closed_with_1009() {
    let backend = support::echo_backend("plain").await;
    let gateway = gateway_to(backend.addr, &format!("{TERMINATE}\n{LIMIT_64K}")).await;
    let client = raw_client(
        gateway.addr,
        upgrade_request("/", &extensions_header(Some(OFFER))).as_bytes(),
    )
    .await;
    assert!(header_of(&client.head, "sec-websocket-extensions").is_some());
    assert_bomb_refused(client, None, false).await;
}

#[tokio::test]
async fn terminate_bomb_over_many_fragments_is_closed_with_1009() {
    let backend = support::echo_backend("plain").await;
    let gateway = gateway_to(backend.addr, &format!("{TERMINATE}\n{LIMIT_64K}")).await;
    let client = raw_client(
        gateway.addr,
        upgrade_request("/", &extensions_header(Some(OFFER))).as_bytes(),
    )
    .await;
    assert_bomb_refused(client, None, true).await;
}

#[tokio::test]
async fn passthrough_bomb_in_one_frame_is_closed_with_1009() {
    let (_gateway, client, backend) = connected(
        &format!("{PASSTHROUGH}\n{LIMIT_64K}"),
        Some(OFFER),
        Some(ANSWER),
    )
    .await;
    assert_bomb_refused(client, Some(backend), false).await;
}

#[tokio::test]
async fn passthrough_bomb_over_many_fragments_is_closed_with_1009() {
    let (_gateway, client, backend) = connected(
        &format!("{PASSTHROUGH}\n{LIMIT_64K}"),
        Some(OFFER),
        Some(ANSWER),
    )
    .await;
    assert_bomb_refused(client, Some(backend), true).await;
}

/// Under the limit, passthrough forwards the compressed bytes as they are.
#[tokio::test]
async fn passthrough_compressed_message_under_the_limit_passes_unchanged() {
    let (_gateway, mut client, mut backend) = connected(
        &format!("{PASSTHROUGH}\n{LIMIT_64K}"),
        Some(OFFER),
        Some(ANSWER),
    )
    .await;
    let packed = deflated(&vec![7; 60 * 1024]);
    client
        .send(&frame(true, RSV1, op::BINARY, Some(CLIENT_KEY), &packed))
        .await;
    expect_frame(
        backend.read_frame().await,
        true,
        RSV1,
        op::BINARY,
        true,
        &packed,
    );
}

/// The bytes before and after compression are counted per direction on `/metrics`: a 4000-byte
/// message each way, compressed on the client's wire.
#[tokio::test]
async fn terminate_counts_bytes_before_and_after_compression() {
    let backend = support::echo_backend("plain").await;
    let yaml = format!(
        "{}admin:\n  address: 127.0.0.2:0\n",
        simple_config(&[backend.addr], TERMINATE)
    );
    let config = wsgate::config::from_yaml_str(&yaml, "test.yaml").unwrap();
    let server = wsgate::server::Server::bind(config).await.unwrap();
    let gateway = server.local_addrs()[0];
    let admin = server.admin_addr().expect("admin bound");
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let mut client = raw_client(
        gateway,
        upgrade_request("/", &extensions_header(Some(OFFER))).as_bytes(),
    )
    .await;
    let text = "{\"user\":\"ada\",\"text\":\"hello again\"}".repeat(200);
    let text = &text.as_bytes()[..4000];
    let packed = deflated(text);
    client
        .send(&frame(true, RSV1, op::TEXT, Some(CLIENT_KEY), &packed))
        .await;
    let echo = client.read_frame().await.expect("the echo");
    assert_eq!((echo.rsv, echo.opcode), (RSV1, op::TEXT));
    let mut inflater = flate2::Decompress::new(false);
    let mut plain = Vec::with_capacity(8192);
    inflater
        .decompress_vec(
            &[&echo.payload[..], &[0, 0, 0xff, 0xff]].concat(),
            &mut plain,
            flate2::FlushDecompress::Sync,
        )
        .unwrap();
    assert_eq!(plain, text);
    let (_, body) = support::http_get(admin, "/metrics").await;
    let series = |direction: &str, form: &str| {
        let prefix = format!(
            "wsgate_deflate_bytes_total{{route=\"app\",direction=\"{direction}\",form=\"{form}\"}} "
        );
        body.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{body}"))
    };
    assert_eq!(series("from_client", "uncompressed"), 4000);
    assert_eq!(series("from_client", "compressed"), packed.len() as u64);
    assert_eq!(series("to_client", "uncompressed"), 4000);
    assert_eq!(series("to_client", "compressed"), echo.payload.len() as u64);
}

/// `limits.compression_memory` caps the state connections hold between messages: with room
/// for one connection with context takeover, a second one is accepted without compression,
/// and once the first has gone the next one gets compression again.
#[tokio::test]
async fn compression_memory_cap_answers_without_compression_never_refuses() {
    let backend = support::echo_backend("plain").await;
    let route = "compression:\n  mode: terminate\n  server_no_context_takeover: false\n  client_no_context_takeover: false";
    let yaml = format!(
        "{}limits:\n  compression_memory: 300KiB\n",
        simple_config(&[backend.addr], route)
    );
    let gateway = start_gateway(&yaml).await;
    let request = upgrade_request("/", &extensions_header(Some(OFFER)));
    let mut first = raw_client(gateway.addr, request.as_bytes()).await;
    assert!(
        header_of(&first.head, "sec-websocket-extensions").is_some(),
        "{}",
        first.head
    );
    let mut second = raw_client(gateway.addr, request.as_bytes()).await;
    assert_eq!(
        header_of(&second.head, "sec-websocket-extensions"),
        None,
        "over the cap: {}",
        second.head
    );
    second
        .send(&client_frame(true, op::TEXT, b"still served"))
        .await;
    expect_frame(
        second.read_frame().await,
        true,
        0,
        op::TEXT,
        false,
        b"still served",
    );
    first
        .send(&client_frame(true, op::CLOSE, &close_payload(1000, b"")))
        .await;
    assert!(first.close_frame().await.is_some());
    assert!(first.eof_within(WAIT).await);
    // The first connection's share comes back when its relay ends.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let third = raw_client(gateway.addr, request.as_bytes()).await;
        if header_of(&third.head, "sec-websocket-extensions").is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the share never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether python3 and its `websockets` package are there (skipped loudly, or failing under
/// CI, where `.ci/run` installs it).
fn python_websockets_present() -> bool {
    let present = Command::new("python3")
        .args(["-c", "import websockets.sync.client"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if present {
        return true;
    }
    let missing = "python3 with the `websockets` package (pip install websockets)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("the permessage-deflate test with Python websockets needs {missing}");
    }
    let banner = format!(
        "\n==================================================================\n\
         SKIPPED: permessage-deflate test with Python `websockets` (tests/compression.rs): \
         needs {missing}.\n\
         ==================================================================\n"
    );
    let _ = std::io::stderr().write_all(banner.as_bytes());
    false
}

/// Python `websockets` (its own permessage-deflate over the standard library's zlib) as the
/// client through a `terminate` route in front of the plain echo: it negotiates with the
/// gateway, and every message, 1 MiB binary and multi-byte text included, comes back intact.
#[tokio::test]
async fn terminate_python_websockets_client_round_trips() {
    if !python_websockets_present() {
        return;
    }
    let backend = support::echo_backend("plain").await;
    let gateway = gateway_to(backend.addr, TERMINATE).await;
    let url = format!("ws://{}/", gateway.addr);
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/deflate_peers/websockets_client.py");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(url)
            .stdin(Stdio::null())
            .output()
            .expect("run websockets_client.py")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "websockets_client.py: {}\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["extensions"][0], "PerMessageDeflate", "{report}");
    assert_eq!(report["close"], 1000, "{report}");
    let seen = backend.seen.lock().unwrap().clone();
    assert_eq!(seen[0].header("sec-websocket-extensions"), None, "{seen:?}");
}

/// Passthrough inflates a copy of what passes and may keep that state: with no room under
/// `limits.compression_memory` the client's offer does not reach the backend (the connection
/// is still served, uncompressed).
#[tokio::test]
async fn passthrough_without_compression_memory_left_strips_the_offer() {
    let backend = RawBackend::bind().await;
    let yaml = format!(
        "{}limits:\n  compression_memory: 0\n",
        simple_config(&[backend.addr], PASSTHROUGH)
    );
    let gateway = start_gateway(&yaml).await;
    let request = upgrade_request("/", &extensions_header(Some(OFFER)));
    let (client, raw) = tokio::join!(
        raw_client(gateway.addr, request.as_bytes()),
        backend.accept_ws_with("", &[])
    );
    assert_eq!(
        header_of(&raw.head, "sec-websocket-extensions"),
        None,
        "{}",
        raw.head
    );
    assert_eq!(header_of(&client.head, "sec-websocket-extensions"), None);
}
