//! Shared test harness: a real gateway and real backends on 127.0.0.1, ports chosen by the OS.
//!
//! Backends are tokio-tungstenite servers (an implementation independent of wsgate's codec);
//! clients in tests are tokio-tungstenite, fastwebsockets or raw sockets writing hand-made bytes.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod browser;
pub mod npm;
pub mod servers;

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use wsgate::server::Server;

/// A running gateway; stops accepting when dropped.
pub struct Gateway {
    pub addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

/// Starts a gateway from YAML. Use `127.0.0.1:0` as the listener address.
pub async fn start_gateway(yaml: &str) -> Gateway {
    let config = wsgate::config::from_yaml_str(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
    let server = Server::bind(config).await.expect("gateway binds");
    let addr = server.local_addrs()[0];
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Gateway { addr, _stop: stop }
}

/// The YAML of a gateway with one route `/` to the given backends, plus extra route keys.
pub fn simple_config(backends: &[SocketAddr], route_extra: &str) -> String {
    let mut yaml =
        String::from("listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends:\n");
    for b in backends {
        yaml.push_str(&format!("      - ws://{b}\n"));
    }
    yaml.push_str("routes:\n  - name: app\n    upstream: app\n");
    for line in route_extra.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml
}

/// What a backend saw of one upgrade request.
#[derive(Debug, Clone, Default)]
pub struct SeenRequest {
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A tokio-tungstenite echo backend. Text messages `whoami` are answered with the backend's
/// name instead of echoed, so tests can tell backends apart. Records every request it accepts.
pub struct EchoBackend {
    pub addr: SocketAddr,
    pub name: String,
    pub seen: Arc<Mutex<Vec<SeenRequest>>>,
}

pub async fn echo_backend(name: &str) -> EchoBackend {
    echo_backend_with(name, None).await
}

/// An echo backend that chooses `protocol` if the client offers it.
pub async fn echo_backend_with(name: &str, protocol: Option<&'static str>) -> EchoBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let backend = EchoBackend {
        addr,
        name: name.to_owned(),
        seen: Arc::clone(&seen),
    };
    let name = name.to_owned();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(echo_connection(
                stream,
                name.clone(),
                protocol,
                Arc::clone(&seen),
            ));
        }
    });
    backend
}

async fn echo_connection(
    stream: TcpStream,
    name: String,
    protocol: Option<&'static str>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
) {
    let config = WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    #[allow(clippy::result_large_err)] // the signature is tungstenite's callback contract
    let callback = |request: &Request, mut response: Response| {
        let headers = request
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let path = request.uri().to_string();
        seen.lock().unwrap().push(SeenRequest { path, headers });
        if let Some(protocol) = protocol {
            let offered = request
                .headers()
                .get_all("sec-websocket-protocol")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|p| p.trim() == protocol);
            if offered {
                response
                    .headers_mut()
                    .insert("sec-websocket-protocol", protocol.parse().unwrap());
            }
        }
        Ok(response)
    };
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await
    else {
        return;
    };
    while let Some(Ok(message)) = ws.next().await {
        let reply = match message {
            Message::Text(text) if text.as_str() == "whoami" => Message::text(name.clone()),
            Message::Text(_) | Message::Binary(_) => message,
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            return;
        }
    }
}

pub type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A tokio-tungstenite client connected through the gateway.
pub async fn connect(addr: SocketAddr, path: &str) -> Client {
    let url = format!("ws://{addr}{path}");
    let config = WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}{path}: {e}"));
    ws
}

/// Asks the backend behind a new connection for its name.
pub async fn backend_name(addr: SocketAddr, path: &str) -> String {
    let mut ws = connect(addr, path).await;
    ws.send(Message::text("whoami")).await.unwrap();
    let name = next_message(&mut ws)
        .await
        .into_text()
        .unwrap()
        .as_str()
        .to_owned();
    let _ = ws.close(None).await;
    name
}

/// The next data message, failing the test after 10 s.
pub async fn next_message(ws: &mut Client) -> Message {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")
            .expect("stream open")
            .expect("no error");
        if message.is_text() || message.is_binary() || message.is_close() {
            return message;
        }
    }
}

/// Reads until the connection closes; returns the close frame received, if any.
pub async fn close_frame(ws: &mut Client) -> Option<tungstenite::protocol::CloseFrame> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("closed within 10 s")
        {
            Some(Ok(Message::Close(frame))) => return frame,
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

/// Sends raw bytes as a client and returns everything the gateway answers until it closes
/// (at most 10 s).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    out
}

/// A minimal valid upgrade request for raw-socket tests.
pub fn upgrade_request(path: &str, extra_headers: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    )
}

/// A `GET` on a fresh connection (`Connection: close`): status and body, within 10 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("an answer within 10 s")
    .unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `node tests/session_client/SCRIPT ARGS...` (the browser client library under node), its
/// stdout as asked and its stderr piped; `None` after a loud skip when node is not on PATH (a
/// panic under `CI=true`).
pub fn session_client(
    script: &str,
    args: &[&str],
    stdout: std::process::Stdio,
) -> Option<std::process::Child> {
    let path = format!(
        "{}/tests/session_client/{script}",
        env!("CARGO_MANIFEST_DIR")
    );
    let spawned = std::process::Command::new("node")
        .arg(path)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .spawn();
    match spawned {
        Ok(child) => Some(child),
        Err(e) => {
            servers::missing("node (>= 18)", &format!("{script}: {e}"));
            None
        }
    }
}
