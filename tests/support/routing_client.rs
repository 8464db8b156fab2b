//! Client-side helpers shared by the routing, handshake, TLS and CLI end-to-end tests:
//! WebSocket clients with a chosen `Host`, extra headers or source address, raw HTTP
//! exchanges and a small response parser. Every wait is bounded.
//!
//! Used as `#[path = "support/routing_client.rs"] mod routing_client;` next to `mod support;`.
#![allow(dead_code)] // each test binary uses a different part of the helpers

use futures_util::{SinkExt, StreamExt};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Bound on any single step (connect, handshake, one message): loopback, so a stall is a bug.
pub const STEP: Duration = Duration::from_secs(10);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Awaits `future` for at most [`STEP`], failing the test with `what` otherwise.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {STEP:?}"))
}

/// Builds the upgrade request for `url` (which gives `Host` and the target) plus `headers`;
/// a `Host` in `headers` replaces the URL's.
fn request(url: &str, headers: &[(&str, &str)]) -> tungstenite::handshake::client::Request {
    let mut request = url
        .into_client_request()
        .unwrap_or_else(|e| panic!("bad url {url}: {e}"));
    for (name, value) in headers {
        let name: tungstenite::http::HeaderName = name.parse().unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    request
}

/// Opens a WebSocket through the gateway at `gateway`: the TCP connection goes to `gateway`
/// whatever host `url` names, so `url` chooses `Host` and path freely.
pub async fn try_open(
    gateway: SocketAddr,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, Response), tungstenite::Error> {
    let tcp = within("TCP connect", TcpStream::connect(gateway))
        .await
        .expect("TCP connect");
    handshake(tcp, url, headers).await
}

/// [`try_open`] from a chosen local address (any `127.0.0.0/8` address works on Linux), for
/// client_ip stickiness.
pub async fn try_open_from(
    source: IpAddr,
    gateway: SocketAddr,
    url: &str,
) -> Result<(Ws, Response), tungstenite::Error> {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source, 0))
        .unwrap_or_else(|e| panic!("bind {source}: {e}"));
    let tcp = within("TCP connect", socket.connect(gateway))
        .await
        .expect("TCP connect");
    handshake(tcp, url, &[]).await
}

async fn handshake(
    tcp: TcpStream,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, Response), tungstenite::Error> {
    tcp.set_nodelay(true).unwrap();
    let config = WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    let request = request(url, headers);
    within(
        &format!("WebSocket handshake for {url}"),
        tokio_tungstenite::client_async_with_config(
            request,
            MaybeTlsStream::Plain(tcp),
            Some(config),
        ),
    )
    .await
}

/// [`try_open`], failing the test on error.
pub async fn open(gateway: SocketAddr, url: &str, headers: &[(&str, &str)]) -> (Ws, Response) {
    try_open(gateway, url, headers)
        .await
        .unwrap_or_else(|e| panic!("open {url} {headers:?}: {e}"))
}

/// The name of the echo backend behind `ws` (the harness backends answer `whoami`).
pub async fn whoami(ws: &mut Ws) -> String {
    within("send whoami", ws.send(Message::text("whoami")))
        .await
        .expect("send whoami");
    loop {
        let message = within("whoami answer", ws.next())
            .await
            .expect("stream open")
            .expect("no error");
        match message {
            Message::Text(text) => return text.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            other => panic!("expected the backend's name, got {other:?}"),
        }
    }
}

/// Sends `text` and expects it back unchanged.
pub async fn echo(ws: &mut Ws, text: &str) {
    within("send", ws.send(Message::text(text)))
        .await
        .expect("send");
    loop {
        let message = within("echo", ws.next())
            .await
            .expect("stream open")
            .expect("no error");
        match message {
            Message::Text(got) => {
                assert_eq!(got.as_str(), text);
                return;
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            other => panic!("expected the echo of {text:?}, got {other:?}"),
        }
    }
}

/// Closes politely without waiting long for the other side.
pub async fn close(mut ws: Ws) {
    let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
}

/// Opens a connection, asks which backend serves it and closes it.
pub async fn backend_via(gateway: SocketAddr, url: &str, headers: &[(&str, &str)]) -> String {
    let (mut ws, _) = open(gateway, url, headers).await;
    let name = whoami(&mut ws).await;
    close(ws).await;
    name
}

/// The HTTP status of a refused upgrade, as tokio-tungstenite reports it; panics on success.
pub async fn refused_status(gateway: SocketAddr, url: &str, headers: &[(&str, &str)]) -> u16 {
    match try_open(gateway, url, headers).await {
        Ok(_) => panic!("{url} {headers:?}: expected a refusal, got a WebSocket"),
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("{url} {headers:?}: expected an HTTP refusal, got {other}"),
    }
}

/// A response head and body as read off the wire.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Everything received, for failure messages.
    pub raw: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts a complete `Connection: close` refusal with `status` and a one-line plain-text
    /// body that contains `mentions` (case-insensitively); returns the line.
    pub fn assert_refusal(&self, status: u16, mentions: &str) -> &str {
        assert_eq!(self.status, status, "status; whole response:\n{}", self.raw);
        assert_eq!(
            self.header("connection")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("close"),
            "{}",
            self.raw
        );
        assert!(
            self.header("content-type")
                .is_some_and(|v| v.starts_with("text/plain")),
            "plain-text body expected:\n{}",
            self.raw
        );
        let length: usize = self
            .header("content-length")
            .expect("Content-Length")
            .parse()
            .unwrap();
        assert_eq!(
            length,
            self.body.len(),
            "Content-Length matches the body:\n{}",
            self.raw
        );
        let line = self
            .body
            .strip_suffix('\n')
            .unwrap_or_else(|| panic!("body ends with a newline:\n{}", self.raw));
        assert!(
            !line.is_empty() && !line.contains('\n') && !line.contains('\r'),
            "one-line body:\n{}",
            self.raw
        );
        assert!(
            line.to_ascii_lowercase()
                .contains(&mentions.to_ascii_lowercase()),
            "body {line:?} should mention {mentions:?}"
        );
        line
    }
}

/// Parses a complete HTTP/1.1 response; panics with the bytes when it is not one.
pub fn parse_response(bytes: &[u8]) -> HttpResponse {
    let raw = String::from_utf8_lossy(bytes).into_owned();
    let Some((head, body)) = raw.split_once("\r\n\r\n") else {
        panic!("no complete response head in {raw:?}");
    };
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?} in {raw:?}"));
    let headers = lines
        .map(|line| {
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {line:?}"));
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_owned(),
        raw: raw.clone(),
    }
}

/// Writes `request` on a new connection and reads until the gateway closes (bounded).
pub async fn exchange(gateway: SocketAddr, request: &[u8]) -> HttpResponse {
    let mut tcp = within("TCP connect", TcpStream::connect(gateway))
        .await
        .expect("TCP connect");
    within("write request", tcp.write_all(request))
        .await
        .expect("write request");
    parse_response(&read_to_close(&mut tcp).await)
}

/// Reads until EOF or a reset, at most [`STEP`]; returns what arrived.
pub async fn read_to_close(tcp: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + STEP;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => panic!(
                "connection not closed within {STEP:?}; got {:?}",
                String::from_utf8_lossy(&out)
            ),
            Ok(Ok(0) | Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Retries `attempt` until it returns `Some`, failing after [`STEP`]. For conditions that
/// become true asynchronously (a slot released when the gateway notices a close).
pub async fn eventually<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {STEP:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
