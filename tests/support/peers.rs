//! Peers for end-to-end relay tests that `support/mod.rs` does not provide: hand-made frame
//! bytes and a parser for them (for protocol violations that real libraries refuse to send),
//! raw-socket clients and backends (for peers that misbehave), and a tokio-tungstenite backend
//! that records every message it receives, control frames included.
//!
//! Nothing here uses wsgate's codec: frames are built and parsed from RFC 6455 §5.2 directly,
//! and handshake accept keys come from tungstenite.
#![allow(dead_code)] // each test uses a different part

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, handshake::derive_accept_key};

/// The longest any single wait in these tests may take before the test fails: generous, for a
/// busy machine; a correct gateway answers in milliseconds.
pub const WAIT: Duration = Duration::from_secs(20);

/// Opcodes (RFC 6455 §5.2).
pub mod op {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// The mask key of frames our raw clients send.
pub const CLIENT_KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// One frame's bytes. `rsv` is the three RSV bits as they sit in the first byte (0x70 mask).
pub fn frame(fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | (rsv & 0x70) | (opcode & 0x0f));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => out.push(mask_bit | len as u8),
        len @ 126..=0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A frame as a client sends it: masked.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(fin, 0, opcode, Some(CLIENT_KEY), payload)
}

/// A frame as a server sends it: unmasked.
pub fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(fin, 0, opcode, None, payload)
}

/// A close frame payload: the code, big-endian, then the reason bytes.
pub fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    payload
}

/// A frame parsed from raw bytes, payload unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl RawFrame {
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == op::CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    pub fn close_reason(&self) -> String {
        String::from_utf8_lossy(self.payload.get(2..).unwrap_or_default()).into_owned()
    }
}

/// Parses the frame at the front of `buf`: the frame and its length in bytes, or `None` while
/// it is incomplete.
pub fn parse_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    let [b0, b1, ..] = *buf else { return None };
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().unwrap()) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().unwrap()) as usize,
            10,
        ),
        len => (len as usize, 2),
    };
    let key = if masked {
        let key: [u8; 4] = buf.get(at..at + 4)?.try_into().unwrap();
        at += 4;
        Some(key)
    } else {
        None
    };
    let mut payload = buf.get(at..at + len)?.to_vec();
    if let Some(key) = key {
        payload
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b ^= key[i % 4]);
    }
    let frame = RawFrame {
        fin: b0 & 0x80 != 0,
        rsv: b0 & 0x70,
        opcode: b0 & 0x0f,
        masked,
        payload,
    };
    Some((frame, at + len))
}

/// One end of a WebSocket connection spoken with raw bytes.
#[derive(Debug)]
pub struct RawWs {
    pub stream: TcpStream,
    /// Read but not yet parsed.
    pub buf: Vec<u8>,
    /// The HTTP head this end received (the request for a backend, the response for a client).
    pub head: String,
}

impl RawWs {
    pub async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(WAIT, self.stream.write_all(bytes))
            .await
            .expect("write within the wait")
            .expect("write");
    }

    /// Like `send`, for a peer that may already have closed: whether the bytes were written.
    pub async fn try_send(&mut self, bytes: &[u8]) -> bool {
        matches!(
            tokio::time::timeout(WAIT, self.stream.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

    /// The next frame; `None` once the peer closed TCP (or reset it). Fails the test after
    /// `WAIT`.
    pub async fn read_frame(&mut self) -> Option<RawFrame> {
        tokio::time::timeout(WAIT, self.read_frame_untimed())
            .await
            .expect("a frame or EOF within the wait")
    }

    /// The next frame if one arrives within `wait`: `Err(())` if none did.
    pub async fn read_frame_within(&mut self, wait: Duration) -> Result<Option<RawFrame>, ()> {
        tokio::time::timeout(wait, self.read_frame_untimed())
            .await
            .map_err(|_| ())
    }

    async fn read_frame_untimed(&mut self) -> Option<RawFrame> {
        loop {
            if let Some((frame, len)) = parse_frame(&self.buf) {
                self.buf.drain(..len);
                return Some(frame);
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Every frame until the peer closes TCP.
    pub async fn frames_until_eof(&mut self) -> Vec<RawFrame> {
        let mut frames = Vec::new();
        while let Some(frame) = self.read_frame().await {
            frames.push(frame);
        }
        frames
    }

    /// Reads until a close frame (returned) or the end of the connection (`None`).
    pub async fn close_frame(&mut self) -> Option<RawFrame> {
        while let Some(frame) = self.read_frame().await {
            if frame.opcode == op::CLOSE {
                return Some(frame);
            }
        }
        None
    }

    /// Whether the peer closes TCP, reading and dropping everything up to it.
    pub async fn eof_within(&mut self, wait: Duration) -> bool {
        let mut sink = vec![0u8; 64 * 1024];
        let drain = async {
            loop {
                match self.stream.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(wait, drain).await.is_ok()
    }
}

/// Reads an HTTP head (up to the blank line) one byte at a time, so nothing after it is
/// consumed. `None` if the connection ends first.
pub async fn read_head_exact(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    };
    let complete = tokio::time::timeout(WAIT, read)
        .await
        .expect("HTTP head within the wait");
    complete.then(|| String::from_utf8_lossy(&head).into_owned())
}

/// The status code of an HTTP response head.
pub fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"))
}

/// A header's value in an HTTP head (first occurrence, case-insensitive name).
pub fn header_of<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

/// Connects to `addr`, writes `request` (an upgrade request, possibly followed by frames in the
/// same write) and reads the response head, which must be a 101.
pub async fn raw_client(addr: SocketAddr, request: &[u8]) -> RawWs {
    let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    raw_client_on(stream, request).await
}

/// `raw_client` over a socket the caller prepared (for example with small buffers).
pub async fn raw_client_on(mut stream: TcpStream, request: &[u8]) -> RawWs {
    stream.set_nodelay(true).unwrap();
    stream.write_all(request).await.unwrap();
    let head = read_head_exact(&mut stream).await.expect("a response head");
    assert_eq!(status_of(&head), 101, "upgrade refused: {head}");
    RawWs {
        stream,
        buf: Vec::new(),
        head,
    }
}

/// A TCP connection to `addr` whose kernel buffers are kept small (`size` bytes each way).
pub async fn small_buffer_connect(addr: SocketAddr, size: u32) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(size).unwrap();
    socket.set_recv_buffer_size(size).unwrap();
    tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// A listener for backends written by hand: the test accepts and speaks on each connection.
#[derive(Debug)]
pub struct RawBackend {
    pub addr: SocketAddr,
    listener: TcpListener,
}

impl RawBackend {
    pub async fn bind() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self {
            addr: listener.local_addr().unwrap(),
            listener,
        }
    }

    /// A listener whose accepted sockets have `size`-byte kernel buffers each way.
    pub async fn bind_small_buffers(size: u32) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(size).unwrap();
        socket.set_recv_buffer_size(size).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(16).unwrap();
        Self {
            addr: listener.local_addr().unwrap(),
            listener,
        }
    }

    /// The next TCP connection, without any handshake.
    pub async fn accept(&self) -> TcpStream {
        let (stream, _) = tokio::time::timeout(WAIT, self.listener.accept())
            .await
            .expect("the gateway connects in time")
            .unwrap();
        stream.set_nodelay(true).unwrap();
        stream
    }

    /// The next connection, its upgrade accepted.
    pub async fn accept_ws(&self) -> RawWs {
        self.accept_ws_with("", &[]).await
    }

    /// The next connection, its upgrade accepted with `extra_headers` (each ending in CRLF)
    /// and `early` bytes written in the same write as the 101 head.
    pub async fn accept_ws_with(&self, extra_headers: &str, early: &[u8]) -> RawWs {
        let mut stream = self.accept().await;
        let head = read_head_exact(&mut stream)
            .await
            .expect("an upgrade request");
        let key = header_of(&head, "sec-websocket-key").expect("Sec-WebSocket-Key in the request");
        let accept = derive_accept_key(key.as_bytes());
        let mut response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{extra_headers}\r\n"
        )
        .into_bytes();
        response.extend_from_slice(early);
        stream.write_all(&response).await.unwrap();
        RawWs {
            stream,
            buf: Vec::new(),
            head,
        }
    }
}

/// An address where nothing listens: a listener is bound for a free port, then dropped.
pub async fn unused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// What a recording backend does with the messages it receives.
#[derive(Debug, Clone, Copy)]
pub enum Script {
    /// Echo text and binary messages.
    Echo,
    /// Echo the first data message, then close with this code and reason.
    CloseAfterFirst(u16, &'static str),
}

/// What a recording backend saw, in order, over all its connections.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Message(Message),
    /// The connection ended: `None` cleanly, or the error tungstenite reported.
    Ended(Option<String>),
}

/// A tokio-tungstenite backend that reports every message it receives, control frames
/// included. Tungstenite answers pings and closes on its own.
#[derive(Debug)]
pub struct RecordingBackend {
    pub addr: SocketAddr,
    pub events: mpsc::UnboundedReceiver<Event>,
}

pub async fn recording_backend(script: Script) -> RecordingBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(recording_connection(stream, script, tx.clone()));
        }
    });
    RecordingBackend { addr, events }
}

async fn recording_connection(stream: TcpStream, script: Script, tx: mpsc::UnboundedSender<Event>) {
    let config = WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let mut closing = false;
    loop {
        let message = match ws.next().await {
            Some(Ok(message)) => message,
            Some(Err(error)) => {
                let _ = tx.send(Event::Ended(Some(error.to_string())));
                return;
            }
            None => {
                let _ = tx.send(Event::Ended(None));
                return;
            }
        };
        let _ = tx.send(Event::Message(message.clone()));
        if closing || !(message.is_text() || message.is_binary()) {
            continue;
        }
        if ws.send(message).await.is_err() {
            continue; // the read side reports how the connection ended
        }
        if let Script::CloseAfterFirst(code, reason) = script {
            closing = true;
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            };
            let _ = ws.close(Some(frame)).await;
        }
    }
}

impl RecordingBackend {
    /// The next event; fails the test after `WAIT`.
    pub async fn next_event(&mut self) -> Event {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("a backend event within the wait")
            .expect("backend running")
    }

    /// Waits for the close frame the backend receives, skipping other messages: its code and
    /// reason (1005 for an empty close), or how the connection ended without one.
    pub async fn close_received(&mut self) -> Result<(u16, String), String> {
        loop {
            match self.next_event().await {
                Event::Message(Message::Close(Some(frame))) => {
                    return Ok((frame.code.into(), frame.reason.to_string()));
                }
                Event::Message(Message::Close(None)) => return Ok((1005, String::new())),
                Event::Message(_) => {}
                Event::Ended(how) => {
                    return Err(how.unwrap_or_else(|| "ended cleanly without a close frame".into()));
                }
            }
        }
    }

    /// Waits for the connection to end; returns every message received until then.
    pub async fn messages_until_end(&mut self) -> (Vec<Message>, Option<String>) {
        let mut messages = Vec::new();
        loop {
            match self.next_event().await {
                Event::Message(message) => messages.push(message),
                Event::Ended(how) => return (messages, how),
            }
        }
    }

    /// Events already reported, without waiting.
    pub fn events_so_far(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            events.push(event);
        }
        events
    }
}

/// The resident set size of this process (the gateway runs in it), in bytes.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The largest kernel receive and send buffers TCP autotuning may give a socket, in bytes.
pub fn tcp_buffer_maxima() -> (u64, u64) {
    let max = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
            .unwrap_or(6 << 20)
    };
    (
        max("/proc/sys/net/ipv4/tcp_rmem"),
        max("/proc/sys/net/ipv4/tcp_wmem"),
    )
}
