//! End to end through a real gateway on 127.0.0.1: the plain-HTTP reverse proxy that shares
//! the WebSocket listeners, routes and sticky choice ("Front a whole app").
//!
//! Backends are hyper servers (`support/http_backend.rs`) that also accept WebSocket upgrades
//! through fastwebsockets; clients are hyper's HTTP/1.1 client connection, raw sockets writing
//! hand-made requests and frames (for exact control of header fields and keep-alive), and
//! tokio-tungstenite.
//!
//! Every wait is bounded ([`WAIT`] unless said otherwise); readiness is never waited for with
//! sleeps; ports are chosen by the OS. Streaming is shown by lock-step, not by timing: the
//! client sends part of a body and waits for its echo before sending more, which cannot
//! complete if anything between buffers the body whole.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/http_backend.rs"]
mod http_backend;
mod support;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_backend::*;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::{Gateway, start_gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// The longest any single wait may take before the test fails: generous, for a busy machine.
const WAIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
}

// ---------------------------------------------------------------------------------------------
// Gateway configurations

/// One listener, one upstream `app` of `backends`, one route `/` with `route_extra` keys, and
/// `upstream_extra` keys on the upstream.
fn config(backends: &[String], upstream_extra: &str, route_extra: &str) -> String {
    let mut yaml =
        String::from("listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends:\n");
    for backend in backends {
        yaml.push_str(&format!("      - {backend}\n"));
    }
    for line in upstream_extra.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml.push_str("routes:\n  - name: app\n    upstream: app\n");
    for line in route_extra.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml
}

fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}")
}

async fn gateway_to(backends: &[&HttpBackend], route_extra: &str) -> Gateway {
    let urls: Vec<String> = backends.iter().map(|b| ws_url(b.addr)).collect();
    start_gateway(&config(&urls, "", route_extra)).await
}

/// Routes `/a/` to backend `a` and `/b/` to backend `b`.
async fn two_route_gateway(a: &HttpBackend, b: &HttpBackend) -> Gateway {
    start_gateway(&format!(
        "listeners:
  - address: 127.0.0.1:0
upstreams:
  a:
    backends: [ws://{}]
  b:
    backends: [ws://{}]
routes:
  - name: a
    match: {{path_prefix: /a/}}
    upstream: a
  - name: b
    match: {{path_prefix: /b/}}
    upstream: b
",
        a.addr, b.addr
    ))
    .await
}

// ---------------------------------------------------------------------------------------------
// hyper client

type ClientBody = BoxBody<Bytes, io::Error>;

/// A new HTTP/1.1 client connection to `addr`.
async fn open(addr: SocketAddr) -> SendRequest<ClientBody> {
    let stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect to the gateway");
    let (sender, connection) = within(
        "client handshake",
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await
    .expect("client handshake");
    tokio::spawn(connection);
    sender
}

fn empty() -> ClientBody {
    bytes_body(Bytes::new())
}

fn bytes_body(bytes: impl Into<Bytes>) -> ClientBody {
    Full::new(bytes.into())
        .map_err(|never: std::convert::Infallible| match never {})
        .boxed()
}

fn request(method: Method, path: &str, body: ClientBody) -> Request<ClientBody> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "app.example.test")
        .body(body)
        .unwrap()
}

/// A whole response.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The backend's description of the request; fails unless the status is 200.
    fn info(&self) -> Info {
        assert_eq!(self.status, StatusCode::OK, "body: {}", self.text());
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not an Info ({e}): {}", self.text()))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

async fn send(sender: &mut SendRequest<ClientBody>, request: Request<ClientBody>) -> Answer {
    within("connection ready", sender.ready())
        .await
        .expect("connection usable");
    let what = format!("response to {} {}", request.method(), request.uri());
    let response = within(&what, sender.send_request(request))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let (parts, body) = response.into_parts();
    let body = within(&what, body.collect())
        .await
        .unwrap_or_else(|e| panic!("{what}: body: {e}"))
        .to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// `GET path` on a new connection.
async fn get(addr: SocketAddr, path: &str) -> Answer {
    send(&mut open(addr).await, request(Method::GET, path, empty())).await
}

// ---------------------------------------------------------------------------------------------
// Raw client: hand-made requests and frames, and a small response parser

#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.values(name).first().copied()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn info(&self) -> Info {
        assert_eq!(self.status, 200, "body: {}", self.text());
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not an Info ({e}): {}", self.text()))
    }
}

async fn connect_raw(addr: SocketAddr) -> TcpStream {
    within("connect", TcpStream::connect(addr))
        .await
        .expect("connect to the gateway")
}

/// Reads more bytes into `buf`; fails the test at end of stream.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) {
    let n = stream.read_buf(buf).await.expect("read");
    assert!(
        n > 0,
        "connection closed early; got {:?}",
        String::from_utf8_lossy(buf)
    );
}

/// Reads one response off `stream`. `buf` holds bytes read and not yet used, before and after.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> RawResponse {
    within("a response", async {
        let (status, headers) = loop {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut fields);
            if let httparse::Status::Complete(len) = parsed.parse(buf).expect("a valid response") {
                let status = parsed.code.unwrap();
                let headers: Vec<(String, String)> = parsed
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                buf.drain(..len);
                break (status, headers);
            }
            fill(stream, buf).await;
        };
        let mut response = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        response.body = read_body(stream, buf, &response).await;
        response
    })
    .await
}

async fn read_body(stream: &mut TcpStream, buf: &mut Vec<u8>, head: &RawResponse) -> Vec<u8> {
    if head.status < 200 || head.status == 204 || head.status == 304 {
        return Vec::new();
    }
    if let Some(length) = head.header("content-length") {
        let length: usize = length.parse().unwrap();
        while buf.len() < length {
            fill(stream, buf).await;
        }
        return buf.drain(..length).collect();
    }
    if head
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
                    break at;
                }
                fill(stream, buf).await;
            };
            let line = String::from_utf8(buf[..line_end].to_vec()).unwrap();
            let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("a chunk size line, got {line:?}"));
            buf.drain(..line_end + 2);
            if size == 0 {
                // No trailers in these tests: the last chunk is followed by an empty line.
                while buf.len() < 2 {
                    fill(stream, buf).await;
                }
                assert_eq!(&buf[..2], b"\r\n", "no trailers expected");
                buf.drain(..2);
                return body;
            }
            while buf.len() < size + 2 {
                fill(stream, buf).await;
            }
            body.extend(buf.drain(..size));
            assert_eq!(&buf[..2], b"\r\n", "chunk data ends with CRLF");
            buf.drain(..2);
        }
    }
    // Delimited by the end of the connection.
    stream.read_to_end(buf).await.expect("read");
    std::mem::take(buf)
}

/// Sends `request` on `stream` and reads the response.
async fn exchange(stream: &mut TcpStream, buf: &mut Vec<u8>, request: &str) -> RawResponse {
    within("write the request", stream.write_all(request.as_bytes()))
        .await
        .expect("write");
    read_response(stream, buf).await
}

fn raw_get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: app.example.test\r\n\r\n")
}

const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Upgrades `stream` to a WebSocket on `path` and checks the 101.
async fn upgrade_raw(stream: &mut TcpStream, buf: &mut Vec<u8>, path: &str) -> RawResponse {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: app.example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let response = exchange(stream, buf, &request).await;
    assert_eq!(response.status, 101, "body: {}", response.text());
    assert_eq!(
        response.header("sec-websocket-accept"),
        Some(derive_accept_key(WS_KEY.as_bytes()).as_str())
    );
    response
}

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;

/// A final client frame, masked (RFC 6455 §5.2), payload under 64 KiB.
fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x5a, 0x13, 0xc4, 0x7e];
    let mut out = vec![0x80 | opcode];
    if payload.len() < 126 {
        out.push(0x80 | payload.len() as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

/// Reads one final, unmasked server frame: its opcode and payload.
async fn read_server_frame(stream: &mut TcpStream, buf: &mut Vec<u8>) -> (u8, Vec<u8>) {
    within("a frame", async {
        loop {
            if buf.len() >= 2 {
                assert_eq!(buf[0] & 0x80, 0x80, "a final frame");
                assert_eq!(buf[1] & 0x80, 0, "server frames are not masked");
                let (len, at) = match buf[1] & 0x7f {
                    126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                    126 => (usize::MAX, 4),
                    127 => panic!("no frames of 64 KiB or more in these tests"),
                    len => (len as usize, 2),
                };
                if len != usize::MAX && buf.len() >= at + len {
                    let opcode = buf[0] & 0x0f;
                    let payload = buf[at..at + len].to_vec();
                    buf.drain(..at + len);
                    return (opcode, payload);
                }
            }
            fill(stream, buf).await;
        }
    })
    .await
}

/// Sends a text message on a raw WebSocket and returns the text answered.
async fn ws_text(stream: &mut TcpStream, buf: &mut Vec<u8>, text: &str) -> String {
    stream
        .write_all(&masked_frame(OP_TEXT, text.as_bytes()))
        .await
        .expect("write a frame");
    let (opcode, payload) = read_server_frame(stream, buf).await;
    assert_eq!(opcode, OP_TEXT, "a text answer to {text:?}");
    String::from_utf8(payload).unwrap()
}

/// Closes a raw WebSocket cleanly: our close, then the echo of it.
async fn ws_close(stream: &mut TcpStream, buf: &mut Vec<u8>) {
    stream
        .write_all(&masked_frame(OP_CLOSE, &1000u16.to_be_bytes()))
        .await
        .expect("write the close");
    let (opcode, payload) = read_server_frame(stream, buf).await;
    assert_eq!(opcode, OP_CLOSE);
    assert_eq!(payload.get(..2), Some(&1000u16.to_be_bytes()[..]));
}

/// A tokio-tungstenite WebSocket through the gateway; `whoami` names the backend behind it.
async fn ws_whoami(addr: SocketAddr, path: &str, cookie: Option<&str>) -> (String, Option<String>) {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    if let Some(cookie) = cookie {
        request
            .headers_mut()
            .insert("cookie", cookie.parse().unwrap());
    }
    let (mut ws, response) = within(
        "WebSocket handshake",
        tokio_tungstenite::connect_async(request),
    )
    .await
    .unwrap_or_else(|e| panic!("WebSocket to {path}: {e}"));
    let set_cookie = response
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_owned());
    ws.send(Message::text("whoami")).await.unwrap();
    let name = loop {
        match within("whoami answer", ws.next()).await {
            Some(Ok(Message::Text(text))) => break text.as_str().to_owned(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected the backend's name, got {other:?}"),
        }
    };
    let _ = within("close", ws.close(None)).await;
    (name, set_cookie)
}

// ---------------------------------------------------------------------------------------------
// 1. Requests and streamed bodies

#[tokio::test]
async fn get_and_post_plain_requests_reach_backend_and_answer_comes_back() {
    let backend = http_backend("alpha").await;
    let gateway = gateway_to(&[&backend], "").await;
    let mut client = open(gateway.addr).await;

    let answer = send(
        &mut client,
        request(Method::GET, "/info?x=1&y=two", empty()),
    )
    .await;
    assert_eq!(answer.header("x-backend"), Some("alpha"));
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let info = answer.info();
    assert_eq!(info.name, "alpha");
    assert_eq!(info.method, "GET");
    assert_eq!(info.path, "/info");
    assert_eq!(info.query.as_deref(), Some("x=1&y=two"));
    assert_eq!(info.body, "");

    let answer = send(
        &mut client,
        request(Method::POST, "/info", bytes_body("hello, backend")),
    )
    .await;
    let info = answer.info();
    assert_eq!(info.method, "POST");
    assert_eq!(info.body, "hello, backend");
    assert_eq!(info.one("content-length"), "14");
    assert!(!info.has("transfer-encoding"), "{info:#?}");
}

/// Bytes that change with their offset, so a lost, repeated or reordered range shows.
fn pattern(offset: usize, len: usize) -> Bytes {
    (offset..offset + len)
        .map(|i| ((i % 251) ^ (i >> 16)) as u8)
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test]
async fn post_streamed_20mib_chunked_body_is_echoed_while_client_still_sends() {
    const TOTAL: usize = 20 << 20;
    const ROUND: usize = 1 << 20;
    const CHUNK: usize = 64 << 10;
    let backend = http_backend("alpha").await;
    let gateway = gateway_to(&[&backend], "").await;
    let mut client = open(gateway.addr).await;

    // No Content-Length: hyper's client sends the body chunked, one chunk per frame.
    let (tx, body) = channel_body(4);
    let response = client.send_request(request(Method::POST, "/echo", body.boxed()));
    let response = within("echo response head", response)
        .await
        .expect("echo response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers().get("x-backend").unwrap(),
        "alpha",
        "answered by the backend"
    );
    let mut echoed = response.into_body();

    // Lock-step: each 1 MiB round must come back whole before the next is sent. A gateway that
    // collected the request body (or the response body) before forwarding would stall here.
    let (mut sent, mut received, mut frames) = (0, 0, 0);
    while sent < TOTAL {
        for _ in 0..ROUND / CHUNK {
            within("send a chunk", tx.send(Ok(pattern(sent, CHUNK))))
                .await
                .expect("client connection takes the body");
            sent += CHUNK;
        }
        while received < sent {
            let frame = tokio::time::timeout(WAIT, echoed.frame())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "echo of bytes {received}..{sent} not back within {WAIT:?} while the \
                         request body is still open: something buffers the body"
                    )
                })
                .expect("echo continues")
                .expect("echo without error");
            let Ok(data) = frame.into_data() else {
                continue;
            };
            assert!(
                received + data.len() <= sent,
                "more echoed than sent ({} > {sent})",
                received + data.len()
            );
            assert!(
                data == pattern(received, data.len()),
                "echoed bytes differ in {received}..{}",
                received + data.len()
            );
            received += data.len();
            frames += 1;
        }
    }
    drop(tx);
    while let Some(frame) = within("end of echo", echoed.frame()).await {
        let data = frame.expect("echo ends without error").into_data();
        assert!(
            data.is_err() || data.unwrap().is_empty(),
            "nothing after the last byte"
        );
    }
    assert_eq!(received, TOTAL);
    assert!(frames >= TOTAL / ROUND, "echo came in {frames} pieces");
}

// ---------------------------------------------------------------------------------------------
// 2. Chunked responses

#[tokio::test]
async fn chunked_response_with_delays_arrives_chunk_by_chunk() {
    const N: usize = 5;
    let backend = http_backend("alpha").await;
    let gateway = gateway_to(&[&backend], "").await;
    let mut client = open(gateway.addr).await;

    let response = within(
        "chunks head",
        client.send_request(request(Method::GET, "/chunks?n=5&delay_ms=250", empty())),
    )
    .await
    .expect("chunks response");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers().get("content-length").is_none(),
        "a streamed response has no length"
    );
    let mut body = response.into_body();
    let mut arrivals = Vec::new(); // (data, chunks the backend had sent when it arrived)
    while let Some(frame) = within("a chunk", body.frame()).await {
        if let Ok(data) = frame.expect("no body error").into_data() {
            arrivals.push((data, backend.chunks_sent.load(Ordering::SeqCst)));
        }
    }
    let whole: Vec<u8> = arrivals.iter().flat_map(|(d, _)| d.to_vec()).collect();
    let expected: String = (0..N).map(|i| format!("chunk {i}\n")).collect();
    assert_eq!(String::from_utf8(whole).unwrap(), expected);
    let (first, sent_then) = &arrivals[0];
    assert!(first.starts_with(b"chunk 0\n"), "first piece: {first:?}");
    assert!(
        *sent_then < N,
        "the first chunk reached the client only after the backend had sent all {N}: buffered"
    );
    assert!(
        arrivals.len() >= 2,
        "the response arrived in one piece: {arrivals:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Long-polls and the idle timeout

#[tokio::test]
async fn long_poll_held_3s_without_idle_timeout_is_answered() {
    let backend = http_backend("alpha").await;
    let gateway = gateway_to(&[&backend], "").await;
    let started = Instant::now();
    let answer = get(gateway.addr, "/hold?ms=3000").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.text(), "held 3000ms");
    assert!(started.elapsed() >= Duration::from_millis(3000));
}

#[tokio::test]
async fn long_poll_held_past_route_idle_timeout_gets_504() {
    let backend = http_backend("alpha").await;
    let gateway = gateway_to(&[&backend], "timeouts: {idle: 500ms}").await;

    // Within the idle timeout: answered.
    let answer = get(gateway.addr, "/hold?ms=50").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());

    let started = Instant::now();
    let answer = get(gateway.addr, "/hold?ms=3000").await;
    let elapsed = started.elapsed();
    assert_eq!(
        answer.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        answer.text()
    );
    assert_generic(&answer, "the backend did not answer in time");
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_millis(2500),
        "504 after {elapsed:?}"
    );
}

#[tokio::test]
async fn slow_upload_with_steady_data_under_route_idle_timeout_is_not_cut_with_504() {
    // The route's idle timeout is meant for silence. An upload whose chunks keep coming, 150 ms
    // apart, is never idle for 500 ms, even though the whole body takes longer than that and
    // the backend (like most) answers only once it has read all of it.
    let backend = http_backend("alpha").await;
    let gateway = gateway_to(&[&backend], "timeouts: {idle: 500ms}").await;
    let mut client = open(gateway.addr).await;
    let (tx, body) = channel_body(1);
    let uploader = tokio::spawn(async move {
        for i in 0..8 {
            if i > 0 {
                // Pacing the upload, which is the behaviour under test, not waiting for readiness.
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            if tx
                .send(Ok(Bytes::from(format!("part {i};"))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let answer = send(&mut client, request(Method::POST, "/info", body.boxed())).await;
    uploader.abort();
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "a steady 1.05 s upload was cut by the 500 ms idle timeout: {}",
        answer.text()
    );
    let expected: String = (0..8).map(|i| format!("part {i};")).collect();
    assert_eq!(answer.info().body, expected);
}

// ---------------------------------------------------------------------------------------------
// 4. Header fields

#[tokio::test]
async fn plain_request_hop_by_hop_fields_stay_at_gateway_and_forwarding_fields_are_added() {
    let backend = http_backend("alpha").await;
    let gateway = gateway_to(&[&backend], "").await;
    let mut stream = connect_raw(gateway.addr).await;
    let mut buf = Vec::new();
    let request = "GET /info?x=1&y=two%20words HTTP/1.1\r\n\
        Host: app.example.test\r\n\
        Connection: keep-alive, Upgrade, X-Hop-Custom\r\n\
        Keep-Alive: timeout=5\r\n\
        Proxy-Connection: keep-alive\r\n\
        TE: trailers\r\n\
        Upgrade: h2c\r\n\
        X-Hop-Custom: listed in connection\r\n\
        X-Forwarded-For: 203.0.113.7\r\n\
        X-Forwarded-Proto: https\r\n\
        X-Forwarded-Host: spoofed.example.test\r\n\
        Forwarded: for=203.0.113.7\r\n\
        Cookie: session=abc; theme=dark\r\n\
        Authorization: Bearer token-123\r\n\
        X-End-To-End: kept\r\n\
        \r\n";
    let response = exchange(&mut stream, &mut buf, request).await;
    let info = response.info();

    for hop in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "x-hop-custom",
        "transfer-encoding",
    ] {
        assert!(!info.has(hop), "backend saw {hop}: {:?}", info.values(hop));
    }
    assert_eq!(info.path, "/info");
    assert_eq!(info.query.as_deref(), Some("x=1&y=two%20words"));
    assert_eq!(info.one("host"), "app.example.test");
    assert_eq!(info.one("cookie"), "session=abc; theme=dark");
    assert_eq!(info.one("authorization"), "Bearer token-123");
    assert_eq!(info.one("x-end-to-end"), "kept");
    // Not from a trusted proxy: the client's chains are replaced, not extended.
    assert_eq!(info.one("x-forwarded-for"), "127.0.0.1");
    assert_eq!(info.one("x-forwarded-proto"), "http");
    assert_eq!(info.one("x-forwarded-host"), "app.example.test");
    assert_eq!(
        info.one("forwarded"),
        "for=127.0.0.1;proto=http;host=\"app.example.test\""
    );

    // The attempt to upgrade to h2c was not one: the connection still serves HTTP/1.1.
    let again = exchange(&mut stream, &mut buf, &raw_get("/info")).await;
    assert_eq!(again.info().name, "alpha");
}

#[tokio::test]
async fn chunked_post_transfer_encoding_is_reframed_not_copied() {
    let backend = http_backend("alpha").await;
    let gateway = gateway_to(&[&backend], "").await;
    let mut stream = connect_raw(gateway.addr).await;
    let mut buf = Vec::new();
    let request = "POST /info HTTP/1.1\r\n\
        Host: app.example.test\r\n\
        Transfer-Encoding: chunked\r\n\
        \r\n\
        5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let info = exchange(&mut stream, &mut buf, request).await.info();
    assert_eq!(info.body, "hello world");
    // The backend hop is framed by the gateway's own client: one Transfer-Encoding (or a
    // length), never the client's field copied next to the gateway's.
    let te = info.values("transfer-encoding");
    let length = info.values("content-length");
    assert!(
        (te == ["chunked"] && length.is_empty()) || (te.is_empty() && length == ["11"]),
        "framing seen by the backend: transfer-encoding {te:?}, content-length {length:?}"
    );
}

#[tokio::test]
async fn backend_hop_by_hop_response_fields_are_removed() {
    let backend = http_backend("alpha").await;
    let gateway = gateway_to(&[&backend], "").await;
    let mut stream = connect_raw(gateway.addr).await;
    let mut buf = Vec::new();
    let response = exchange(&mut stream, &mut buf, &raw_get("/hop-response")).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "hop");
    for hop in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "x-backend-hop",
    ] {
        assert!(
            response.values(hop).is_empty(),
            "client saw {hop}: {:?}",
            response.headers
        );
    }
    assert_eq!(response.values("x-end-to-end"), ["kept"]);
    assert_eq!(response.values("x-backend"), ["alpha"]);
    // The backend's `Connection` did not end the client's connection either.
    let again = exchange(&mut stream, &mut buf, &raw_get("/info")).await;
    assert_eq!(again.info().name, "alpha");
}

#[tokio::test]
async fn plain_http11_request_without_host_gets_400_not_forwarded() {
    // RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without Host. The gateway
    // does so for WebSocket upgrades (validated before routing); a plain request must not be
    // forwarded to a backend without one either.
    let backend = http_backend("alpha").await;
    let gateway = gateway_to(&[&backend], "").await;
    let mut stream = connect_raw(gateway.addr).await;
    let mut buf = Vec::new();
    let response = exchange(&mut stream, &mut buf, "GET /info HTTP/1.1\r\n\r\n").await;
    assert_eq!(
        response.status,
        400,
        "forwarded without Host: {}",
        response.text()
    );
    assert_eq!(backend.connections.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------------
// 5. Backend errors

/// A one-line plain-text body: exactly one line, ending in a newline.
/// A backend failure's answer: a generic `reason` and a request id (repeated in
/// `X-Request-Id`), and nothing else: not the backend's address, not an OS error.
fn assert_generic(answer: &Answer, reason: &str) {
    let id = answer.header("x-request-id").expect("a request id header");
    assert_eq!(id.len(), 16, "{id}");
    assert_eq!(answer.text(), format!("{reason} (request id {id})\n"));
}

fn assert_one_line(answer: &Answer) {
    let text = answer.text();
    assert!(
        text.ends_with('\n') && text.matches('\n').count() == 1,
        "one line expected: {text:?}"
    );
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
}

#[tokio::test]
async fn unreachable_backend_gets_502_naming_it() {
    let port = closed_port().await;
    let gateway = start_gateway(&config(&[ws_url(port)], "", "")).await;
    let answer = get(gateway.addr, "/info").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.text());
    assert_one_line(&answer);
    assert_generic(
        &answer,
        "the backend could not be reached or failed to answer",
    );
}

#[tokio::test]
async fn tls_backend_accepting_tcp_but_silent_gets_504_after_connect_timeout() {
    // A wss:// backend's TLS handshake is part of the connection, so a peer that accepts TCP
    // and never answers the ClientHello is cut off by connect_timeout.
    let (silent, accepted) = silent_backend().await;
    let gateway = start_gateway(&config(
        &[format!("wss://{silent}")],
        "connect_timeout: 300ms",
        "",
    ))
    .await;
    let started = Instant::now();
    let answer = get(gateway.addr, "/info").await;
    let elapsed = started.elapsed();
    assert_eq!(
        answer.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        answer.text()
    );
    assert_one_line(&answer);
    assert_generic(&answer, "the backend did not answer in time");
    assert!(*accepted.borrow() >= 1, "TCP was accepted");
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(5),
        "504 after {elapsed:?}"
    );
}

#[tokio::test]
async fn plain_backend_accepting_tcp_but_silent_is_waited_for_like_a_long_poll() {
    // For a ws:// backend the connection is complete once TCP is; connect_timeout bounds only
    // that (hyper's client handshake does no I/O). A backend that then never answers cannot be
    // told from one holding a long-poll: without an idle timeout the gateway keeps waiting.
    let (silent, mut accepted) = silent_backend().await;
    let gateway = start_gateway(&config(&[ws_url(silent)], "connect_timeout: 300ms", "")).await;
    let mut client = open(gateway.addr).await;
    let mut pending = Box::pin(client.send_request(request(Method::GET, "/info", empty())));
    let outcome = tokio::select! {
        outcome = &mut pending => Some(outcome),
        _ = within("the gateway connects", accepted.wait_for(|&n| n >= 1)) => None,
    };
    assert!(outcome.is_none(), "answered before connecting: {outcome:?}");
    // Connected: now four times connect_timeout pass without an answer.
    let outcome = tokio::time::timeout(Duration::from_millis(1200), pending).await;
    assert!(
        outcome.is_err(),
        "answered although the backend never spoke: {outcome:?}"
    );
    assert_eq!(*accepted.borrow(), 1);

    // With the route's idle timeout, the same silence is a 504.
    let gateway = start_gateway(&config(
        &[ws_url(silent)],
        "connect_timeout: 300ms",
        "timeouts: {idle: 500ms}",
    ))
    .await;
    let answer = get(gateway.addr, "/info").await;
    assert_eq!(
        answer.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        answer.text()
    );
    assert_generic(&answer, "the backend did not answer in time");
}

#[tokio::test]
async fn backend_dropping_connection_before_answering_gets_502() {
    let backend = http_backend("alpha").await;
    let gateway = gateway_to(&[&backend], "").await;
    let answer = get(gateway.addr, "/drop-before").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.text());
    assert_one_line(&answer);
    assert_generic(
        &answer,
        "the backend could not be reached or failed to answer",
    );
}

#[tokio::test]
async fn backend_dropping_connection_mid_response_truncates_client_response_with_error() {
    let backend = http_backend("alpha").await;
    let gateway = gateway_to(&[&backend], "").await;
    for framing in ["chunked", "length"] {
        let mut client = open(gateway.addr).await;
        let path = format!("/drop-mid?framing={framing}");
        let response = within(
            "head of the response",
            client.send_request(request(Method::GET, &path, empty())),
        )
        .await
        .expect("the head was sent before the backend dropped");
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut got = Vec::new();
        let error = loop {
            match within("the rest of the body", body.frame()).await {
                Some(Ok(frame)) => got.extend(frame.into_data().unwrap_or_default()),
                Some(Err(error)) => break Some(error),
                None => break None,
            }
        };
        assert!(
            error.is_some(),
            "{framing}: the client saw a complete response ({:?}) although the backend died",
            String::from_utf8_lossy(&got)
        );
        assert!(
            b"partial ".starts_with(&got),
            "{framing}: only what the backend sent: {got:?}"
        );
    }
}

#[tokio::test]
async fn backend_404_and_500_are_passed_through_with_body() {
    let backend = http_backend("alpha").await;
    let gateway = gateway_to(&[&backend], "").await;
    let mut client = open(gateway.addr).await;
    for code in [404, 500] {
        let answer = send(
            &mut client,
            request(Method::GET, &format!("/status?code={code}"), empty()),
        )
        .await;
        assert_eq!(answer.status.as_u16(), code);
        assert_eq!(answer.text(), format!("alpha: status {code}\n"));
        assert_eq!(answer.header("x-backend"), Some("alpha"));
        assert_eq!(
            answer.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Keep-alive

#[tokio::test]
async fn keep_alive_requests_on_one_connection_are_each_proxied_across_routes() {
    let a = http_backend("alpha").await;
    let b = http_backend("beta").await;
    let gateway = two_route_gateway(&a, &b).await;
    let mut client = open(gateway.addr).await;
    for round in 0..3 {
        let info = send(&mut client, request(Method::GET, "/a/info", empty()))
            .await
            .info();
        assert_eq!(
            (info.name.as_str(), info.path.as_str()),
            ("alpha", "/a/info")
        );
        let body = format!("round {round}");
        let info = send(
            &mut client,
            request(Method::POST, "/b/info", bytes_body(body.clone())),
        )
        .await
        .info();
        assert_eq!(
            (info.name.as_str(), info.body.as_str()),
            ("beta", body.as_str())
        );
        let answer = send(
            &mut client,
            request(Method::GET, "/b/status?code=404", empty()),
        )
        .await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        assert_eq!(answer.text(), "beta: status 404\n");
    }
}

#[tokio::test]
async fn keep_alive_plain_requests_then_websocket_upgrade_on_same_socket() {
    let a = http_backend("alpha").await;
    let b = http_backend("beta").await;
    let gateway = two_route_gateway(&a, &b).await;
    let mut stream = connect_raw(gateway.addr).await;
    let mut buf = Vec::new();

    let first = exchange(&mut stream, &mut buf, &raw_get("/a/info")).await;
    assert_eq!(first.info().name, "alpha");
    let post = "POST /b/info HTTP/1.1\r\nHost: app.example.test\r\nContent-Length: 5\r\n\r\nhello";
    let second = exchange(&mut stream, &mut buf, post).await.info();
    assert_eq!(
        (second.name.as_str(), second.body.as_str()),
        ("beta", "hello")
    );

    upgrade_raw(&mut stream, &mut buf, "/b/ws").await;
    assert_eq!(ws_text(&mut stream, &mut buf, "whoami").await, "beta");
    assert_eq!(ws_text(&mut stream, &mut buf, "echo me").await, "echo me");
    let long = "x".repeat(300);
    assert_eq!(ws_text(&mut stream, &mut buf, &long).await, long);
    ws_close(&mut stream, &mut buf).await;
}

// ---------------------------------------------------------------------------------------------
// 7. Sticky choice shared by HTTP and WebSocket

#[tokio::test]
async fn sticky_query_room_plain_requests_and_websockets_meet_on_same_backend() {
    let alpha = http_backend("alpha").await;
    let beta = http_backend("beta").await;
    let gateway = gateway_to(&[&alpha, &beta], "sticky: {query: room}").await;
    let mut used = BTreeSet::new();
    for i in 0..16 {
        let room = format!("room-{i}");
        let plain = get(gateway.addr, &format!("/info?room={room}"))
            .await
            .info()
            .name;
        let again = get(gateway.addr, &format!("/poll/info?room={room}&n=2"))
            .await
            .info()
            .name;
        assert_eq!(plain, again, "{room}: two plain requests");
        // A WebSocket as a connection's first request (the gateway's own handshake path)...
        let (ws, _) = ws_whoami(gateway.addr, &format!("/ws?room={room}"), None).await;
        assert_eq!(ws, plain, "{room}: WebSocket and plain request");
        // ... and as an upgrade after a plain request on a keep-alive connection (hyper's).
        let mut stream = connect_raw(gateway.addr).await;
        let mut buf = Vec::new();
        let info = exchange(
            &mut stream,
            &mut buf,
            &raw_get(&format!("/info?room={room}")),
        )
        .await
        .info();
        assert_eq!(info.name, plain, "{room}: raw plain request");
        upgrade_raw(&mut stream, &mut buf, &format!("/ws?room={room}")).await;
        assert_eq!(
            ws_text(&mut stream, &mut buf, "whoami").await,
            plain,
            "{room}: upgrade on a keep-alive connection"
        );
        used.insert(plain);
    }
    assert_eq!(
        used,
        BTreeSet::from(["alpha".to_owned(), "beta".to_owned()]),
        "16 rooms spread over both backends"
    );
}

#[tokio::test]
async fn sticky_cookie_set_by_first_plain_response_pins_websocket_to_same_backend() {
    const COOKIE: &str = "wsgate_affinity";
    let alpha = http_backend("alpha").await;
    let beta = http_backend("beta").await;
    let gateway = gateway_to(&[&alpha, &beta], "sticky_cookie: {name: wsgate_affinity}").await;
    let mut used = BTreeSet::new();
    for client in 0..4 {
        let first = get(gateway.addr, "/info").await;
        let set_cookie = first
            .header("set-cookie")
            .unwrap_or_else(|| panic!("client {client}: no cookie in {:?}", first.headers))
            .to_owned();
        let name = first.info().name;
        let pair = set_cookie.split(';').next().unwrap().trim().to_owned();
        let value = pair
            .strip_prefix(&format!("{COOKIE}="))
            .unwrap_or_else(|| panic!("client {client}: cookie {set_cookie}"));
        assert!(
            value.len() == 16 && value.bytes().all(|b| b.is_ascii_hexdigit()),
            "{set_cookie}"
        );
        assert!(set_cookie.contains("Path=/"), "{set_cookie}");

        // The cookie pins later plain requests, without setting it again...
        let mut sender = open(gateway.addr).await;
        let mut with_cookie = request(Method::GET, "/info", empty());
        with_cookie
            .headers_mut()
            .insert("cookie", format!("theme=dark; {pair}").parse().unwrap());
        let again = send(&mut sender, with_cookie).await;
        assert_eq!(again.header("set-cookie"), None);
        assert_eq!(
            again.info().name,
            name,
            "client {client}: plain with cookie"
        );

        // ... and the WebSocket.
        let (ws, ws_set_cookie) =
            ws_whoami(gateway.addr, "/ws", Some(&format!("{pair}; theme=dark"))).await;
        assert_eq!(ws, name, "client {client}: WebSocket with the cookie");
        assert_eq!(ws_set_cookie, None);
        used.insert(name);
    }
    assert_eq!(
        used,
        BTreeSet::from(["alpha".to_owned(), "beta".to_owned()]),
        "new clients spread over both backends"
    );

    // A cookie naming no backend is replaced.
    let mut sender = open(gateway.addr).await;
    let mut stale = request(Method::GET, "/info", empty());
    stale.headers_mut().insert(
        "cookie",
        format!("{COOKIE}=0000000000000000").parse().unwrap(),
    );
    let answer = send(&mut sender, stale).await;
    assert!(
        answer.header("set-cookie").is_some_and(
            |c| c.starts_with(&format!("{COOKIE}=")) && !c.contains("=0000000000000000")
        ),
        "{:?}",
        answer.headers
    );
}

// ---------------------------------------------------------------------------------------------
// 8. No route

#[tokio::test]
async fn plain_request_without_route_gets_404_and_connection_stays_usable() {
    let backend = http_backend("alpha").await;
    let gateway = start_gateway(&config(
        &[ws_url(backend.addr)],
        "",
        "match: {host: app.example.test}",
    ))
    .await;
    let mut stream = connect_raw(gateway.addr).await;
    let mut buf = Vec::new();
    let request = "GET /info HTTP/1.1\r\nHost: other.example.test\r\n\r\n";
    let response = exchange(&mut stream, &mut buf, request).await;
    assert_eq!(response.status, 404, "{}", response.text());
    assert_eq!(response.text(), "no route for this host and path\n");
    assert_eq!(backend.connections.load(Ordering::SeqCst), 0);

    let response = exchange(&mut stream, &mut buf, &raw_get("/info")).await;
    assert_eq!(response.info().name, "alpha");
}

// ---------------------------------------------------------------------------------------------
// Retry on another backend

/// A key of the route's sticky `room` query whose first choice among `backends` is the first.
fn key_first_on_the_first(yaml: &str, prefix: &str) -> String {
    let config = wsgate::config::from_yaml_str(yaml, "t.yaml").unwrap();
    let backends = &config.upstreams[0].backends;
    (0..)
        .map(|n| format!("{prefix}{n}"))
        .find(|key| wsgate::routing::rank(backends, key)[0] == 0)
        .unwrap()
}

/// A gateway with an admin listener, for reading its metrics.
async fn gateway_with_admin(
    yaml: &str,
) -> (SocketAddr, SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let yaml = format!("{yaml}admin:\n  address: 127.0.0.2:0\n");
    let config = wsgate::config::from_yaml_str(&yaml, "t.yaml").unwrap();
    let server = wsgate::server::Server::bind(config).await.unwrap();
    let (gateway, admin) = (server.local_addrs()[0], server.admin_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    (gateway, admin, stop)
}

/// Like HAProxy's `option redispatch`: a backend that cannot be reached costs the client
/// nothing when another one can take it. Passive health is off so that every request below
/// tries the dead backend first.
#[tokio::test]
async fn a_backend_that_cannot_be_reached_is_retried_on_the_keys_next_choice() {
    let dead = closed_port().await;
    let alive = http_backend("alive").await;
    let yaml = config(
        &[ws_url(dead), ws_url(alive.addr)],
        "passive_health: off",
        "sticky:\n  query: room",
    );
    let http_key = key_first_on_the_first(&yaml, "http-");
    let ws_key = key_first_on_the_first(&yaml, "ws-");
    let (gateway, admin, _stop) = gateway_with_admin(&yaml).await;

    let answer = get(gateway, &format!("/info?room={http_key}")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.header("x-backend"), Some("alive"));

    let (name, _) = ws_whoami(gateway, &format!("/ws?room={ws_key}"), None).await;
    assert_eq!(name, "alive");

    // Not idempotent: a POST is answered 502, never sent twice.
    let post = request(
        Method::POST,
        &format!("/echo?room={http_key}"),
        bytes_body("x"),
    );
    let answer = send(&mut open(gateway).await, post).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.text());

    let (_, metrics) = support::http_get(admin, "/metrics").await;
    assert!(
        metrics.contains(r#"wsgate_connect_retries_total{route="app",result="connected"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn connect_retries_0_answers_502_at_the_first_unreachable_backend() {
    let dead = closed_port().await;
    let alive = http_backend("alive").await;
    let yaml = config(
        &[ws_url(dead), ws_url(alive.addr)],
        "passive_health: off",
        "sticky:\n  query: room\nconnect_retries: 0",
    );
    let key = key_first_on_the_first(&yaml, "k");
    let gateway = start_gateway(&yaml).await;
    let answer = get(gateway.addr, &format!("/info?room={key}")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.text());
    assert_eq!(alive.connections.load(Ordering::SeqCst), 0);
}

/// A backend that answered, whatever it answered, has seen the request: never retried.
#[tokio::test]
async fn a_backend_that_answered_is_not_retried() {
    let answering = http_backend("answering").await;
    let other = http_backend("other").await;
    let yaml = config(
        &[ws_url(answering.addr), ws_url(other.addr)],
        "",
        "sticky:\n  query: room",
    );
    let key = key_first_on_the_first(&yaml, "k");
    let gateway = start_gateway(&yaml).await;
    let answer = get(gateway.addr, &format!("/status?code=503&room={key}")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.header("x-backend"), Some("answering"));
    assert_eq!(other.connections.load(Ordering::SeqCst), 0);
}
