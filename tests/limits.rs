//! Limits against overload and abuse, end to end: connections per client address, the
//! gateway-wide handshake rate, and the per-connection message rate.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn config_with(backend: std::net::SocketAddr, top_limits: &str, route: &str) -> String {
    format!("{}limits:\n{top_limits}", simple_config(&[backend], route))
}

/// An upgrade from a chosen local address; returns the status line's code.
async fn upgrade_status_from(
    local: &str,
    gateway: std::net::SocketAddr,
) -> (u16, tokio::net::TcpStream, String) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(gateway).await.unwrap();
    stream
        .write_all(upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before a response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    (head[9..12].parse().unwrap(), stream, head)
}

#[tokio::test]
async fn per_ip_limit_refuses_the_extra_connection_with_503_but_not_other_addresses() {
    let backend = echo_backend("b1").await;
    let gateway = start_gateway(&config_with(
        backend.addr,
        "  max_connections_per_ip: 2\n",
        "",
    ))
    .await;
    let (first, _a, _) = upgrade_status_from("127.0.0.1", gateway.addr).await;
    let (second, _b, _) = upgrade_status_from("127.0.0.1", gateway.addr).await;
    assert_eq!((first, second), (101, 101));
    let (third, _c, head) = upgrade_status_from("127.0.0.1", gateway.addr).await;
    assert_eq!(third, 503, "{head}");
    assert!(head.contains("Retry-After: 1"), "{head}");
    let (other, _d, _) = upgrade_status_from("127.0.0.3", gateway.addr).await;
    assert_eq!(other, 101, "another address has its own allowance");
    drop(_a);
    // The slot comes back once a connection ends.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _e, _) = upgrade_status_from("127.0.0.1", gateway.addr).await;
        if status == 101 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the freed slot was never reusable"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn handshake_rate_over_the_burst_is_503_with_retry_after() {
    let backend = echo_backend("b1").await;
    // One handshake a second: the second of two back-to-back handshakes is refused however
    // slow this machine is (it would have to take a whole second to get a new token).
    let gateway = start_gateway(&config_with(backend.addr, "  handshake_rate: 1\n", "")).await;
    let (first, _open, _) = upgrade_status_from("127.0.0.1", gateway.addr).await;
    assert_eq!(first, 101);
    let (second, _refused, head) = upgrade_status_from("127.0.0.1", gateway.addr).await;
    assert_eq!(second, 503, "{head}");
    assert!(head.contains("Retry-After: 1"), "{head}");
}

#[tokio::test]
async fn message_rate_excess_closes_the_client_with_1008_and_the_backend_with_1001() {
    let backend = recording_backend().await;
    let route = "limits:\n  message_rate: 5\n";
    let gateway = start_gateway(&config_with(backend.addr, "  max_frame: 1MiB\n", route)).await;
    let mut ws = connect(gateway.addr, "/").await;
    for i in 0..40 {
        if ws.send(Message::text(format!("m{i}"))).await.is_err() {
            break;
        }
    }
    let frame = close_frame(&mut ws).await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Policy);
    assert_eq!(frame.reason.as_str(), "message rate limit exceeded");
    let seen = backend.close_seen().await;
    assert_eq!(seen.0, 1001);
    assert!(
        seen.1
            .contains("client policy violation: message rate limit exceeded"),
        "{seen:?}"
    );
    let messages = backend.messages();
    assert!(
        (10..=12).contains(&messages),
        "a burst of 10 then refusal; the backend got {messages}"
    );
}

#[test]
fn whole_gateway_limits_are_refused_on_a_route_with_the_line() {
    let yaml = "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends: [ws://127.0.0.1:1]\nroutes:\n  - upstream: app\n    limits:\n      handshake_rate: 10\n";
    let errors = wsgate::config::from_yaml_str(yaml, "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains(
            "t.yaml:9: routes[0].limits.handshake_rate: handshake_rate applies to the whole gateway"
        ),
        "{errors}"
    );
}

/// Data messages received, and the close frame (code, reason) once it arrives.
type Recorded = std::sync::Arc<std::sync::Mutex<(usize, Option<(u16, String)>)>>;

/// A tokio-tungstenite backend that counts data messages and records the close it receives.
struct RecordingBackend {
    addr: std::net::SocketAddr,
    state: Recorded,
}

impl RecordingBackend {
    fn messages(&self) -> usize {
        self.state.lock().unwrap().0
    }

    async fn close_seen(&self) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(close) = self.state.lock().unwrap().1.clone() {
                return close;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the backend saw no close"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn recording_backend() -> RecordingBackend {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state: Recorded = std::sync::Arc::new(std::sync::Mutex::new((0, None)));
    let shared = std::sync::Arc::clone(&state);
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Close(frame) => {
                    let frame = frame.map(|f| (u16::from(f.code), f.reason.as_str().to_owned()));
                    shared.lock().unwrap().1 = Some(frame.unwrap_or((1005, String::new())));
                }
                Message::Text(_) | Message::Binary(_) => shared.lock().unwrap().0 += 1,
                _ => {}
            }
        }
    });
    RecordingBackend { addr, state }
}
