//! Hostile clients of the session layer (docs/sessions.md): one address trying to hold a
//! route's backends through sessions, floods of session opens, stalled and oversize request
//! bodies, a session WebSocket sending over its message rate. Every test runs a real gateway
//! on 127.0.0.1 against tokio-tungstenite backends, attacks it with raw sockets, hyper or
//! tokio-tungstenite clients, and asserts what the other clients see: they keep being served.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::{EchoBackend, echo_backend, next_message, simple_config, start_gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const ORIGIN: &str = "https://app.example";

/// One keep-alive HTTP/1.1 connection from the test, as an attacker would reuse it.
struct KeepAlive {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

/// An answer: status, headers, body as JSON (or the raw text as a JSON string).
struct Answer {
    status: u16,
    headers: hyper::HeaderMap,
    body: Value,
}

impl KeepAlive {
    async fn connect(addr: SocketAddr) -> KeepAlive {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        KeepAlive { sender }
    }

    async fn request(&mut self, method: &str, target: &str, body: &str) -> Answer {
        let request = Request::builder()
            .method(method)
            .uri(target)
            .header("host", "localhost")
            .header("origin", ORIGIN)
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        self.sender
            .ready()
            .await
            .expect("the connection stays open");
        let response =
            tokio::time::timeout(Duration::from_secs(10), self.sender.send_request(request))
                .await
                .expect("an answer within 10 s")
                .expect("an answer");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Answer {
            status,
            headers,
            body,
        }
    }
}

fn config(backend: &EchoBackend, route_extra: &str, top_extra: &str) -> String {
    let mut yaml = simple_config(&[backend.addr], route_extra);
    yaml.push_str(top_extra);
    yaml
}

/// A WebSocket client whose socket is bound to `local` (another loopback address than the
/// attacker's 127.0.0.1), echoing one message through the gateway.
async fn echo_from(local: &str, gateway: SocketAddr) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(gateway).await.unwrap();
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let mut request = format!("ws://{gateway}/").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", ORIGIN.parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap_or_else(|e| panic!("a WebSocket client from {local} is refused: {e}"));
    assert_eq!(response.status(), 101);
    ws.send(Message::text("still served")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("still served"));
    let _ = ws.close(None).await;
}

/// A long-polling session from the test's 127.0.0.1 that echoes one message (open, send,
/// poll): the session layer is still serving.
async fn session_echo(gateway: SocketAddr) {
    let mut http = KeepAlive::connect(gateway).await;
    let opened = http.request("POST", "/?wsgate=open", "").await;
    assert_eq!(opened.status, 200, "{}", opened.body);
    let sid = opened.body["session"].as_str().unwrap().to_owned();
    let sent = http
        .request(
            "POST",
            &format!("/?wsgate=send&wsgate_sid={sid}"),
            r#"{"seq":1,"messages":[{"text":"hello"}]}"#,
        )
        .await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    let polled = http
        .request(
            "GET",
            &format!("/?wsgate=poll&wsgate_sid={sid}&wsgate_ack=0"),
            "",
        )
        .await;
    assert_eq!(polled.status, 200, "{}", polled.body);
    assert_eq!(polled.body["events"][0]["text"], "hello", "{}", polled.body);
    let closed = http
        .request("POST", &format!("/?wsgate=close&wsgate_sid={sid}"), "")
        .await;
    assert_eq!(closed.status, 200, "{}", closed.body);
}

fn assert_cors(answer: &Answer) {
    assert_eq!(
        answer
            .headers
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap()),
        Some(ORIGIN),
        "status {} carries the CORS headers",
        answer.status
    );
    assert_eq!(
        answer.headers.get("vary").map(|v| v.to_str().unwrap()),
        Some("Origin")
    );
    assert_eq!(
        answer
            .headers
            .get("content-type")
            .map(|v| v.to_str().unwrap()),
        Some("application/json")
    );
    assert!(answer.body["error"].is_string(), "{}", answer.body);
}

/// Attack: one keep-alive connection opens 300 long-polling sessions (300 backend WebSockets)
/// from an address allowed 2 connections, to fill the route's connection limit. The victim,
/// a WebSocket client on another address, still gets 101: the attacker's sessions count
/// against its per-address allowance (here one socket and one session), and are refused with
/// 429 in the session error format.
#[tokio::test]
async fn sessions_count_against_the_per_address_limit() {
    let backend = echo_backend("a").await;
    let yaml = config(
        &backend,
        "limits:\n  max_connections: 20\nallowed_origins: [\"https://app.example\"]",
        "limits:\n  max_connections_per_ip: 2\nsessions:\n  open_rate: 100000\n",
    );
    let gateway = start_gateway(&yaml).await;
    let mut attacker = KeepAlive::connect(gateway.addr).await;
    let started = Instant::now();
    let mut opened = 0;
    for _ in 0..300 {
        let answer = attacker.request("POST", "/?wsgate=open", "").await;
        match answer.status {
            200 => opened += 1,
            429 => {
                assert_cors(&answer);
                assert!(
                    answer.body["error"].as_str().unwrap().contains("address"),
                    "{}",
                    answer.body
                );
            }
            other => panic!("unexpected {other}: {}", answer.body),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        opened, 1,
        "one socket and one session fill an allowance of 2"
    );
    assert_eq!(
        backend.seen.lock().unwrap().len(),
        1,
        "one backend WebSocket"
    );
    echo_from("127.0.0.2", gateway.addr).await;
}

/// Attack: a flood of session opens from one address (each on a new connection, closed at
/// once, so no per-connection limit applies). The open rate caps what reaches the backends
/// (a burst of two seconds' worth); the refused get 429 with `Retry-After`, and clients on
/// other addresses are served throughout.
#[tokio::test]
async fn a_flood_of_session_opens_is_held_to_the_open_rate() {
    let backend = echo_backend("a").await;
    let yaml = config(
        &backend,
        "allowed_origins: [\"https://app.example\"]",
        "sessions:\n  open_rate: 5\n  max_sessions_per_ip: 1000\nadmin:\n  address: 127.0.0.9:0\n",
    );
    let config = wsgate::config::from_yaml_str(&yaml, "test.yaml").unwrap();
    let server = wsgate::server::Server::bind(config).await.unwrap();
    let admin = server.admin_addr().unwrap();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let addr = server.local_addrs()[0];
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let mut statuses = Vec::new();
    let started = Instant::now();
    for _ in 0..200 {
        let mut attacker = KeepAlive::connect(addr).await;
        let answer = attacker.request("POST", "/?wsgate=open", "").await;
        if answer.status == 429 {
            assert_cors(&answer);
            assert_eq!(answer.headers.get("retry-after").unwrap(), "1");
        }
        statuses.push(answer.status);
    }
    let opened = statuses.iter().filter(|&&s| s == 200).count();
    let most = 10 + (5.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    assert!(
        (10..=most).contains(&opened),
        "a burst of 10 and the refill while the flood lasts (at most {most}): {opened} opened"
    );
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );
    assert_eq!(backend.seen.lock().unwrap().len(), opened);
    // Every refusal is visible per listener.
    let refused = statuses.iter().filter(|&&s| s == 429).count();
    let line = format!(
        r#"wsgate_refused_total{{listener="listener-0",status="429",reason="session_open_rate"}} {refused}"#
    );
    let (_, metrics) = support::http_get(admin, "/metrics").await;
    assert!(metrics.contains(&line), "{line} in {metrics}");
    echo_from("127.0.0.2", addr).await;
    echo_from("127.0.0.3", addr).await;
}

/// Sends a raw request head (and the start of a body), then reads the answer until the
/// gateway closes the connection; the status and how long it took. `None` if the gateway
/// neither answered nor closed within `wait`.
async fn raw_answer(
    addr: SocketAddr,
    head_and_body: &[u8],
    wait: Duration,
) -> Option<(u16, String, Duration)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head_and_body).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(wait, stream.read_to_end(&mut answer)).await;
    if read.is_err() {
        return None;
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.get(9..12)?.parse().ok()?;
    Some((status, text, started.elapsed()))
}

/// Attack: many connections start an `open` body and stall, each holding a buffer (and,
/// before, a promise of up to `max_batch` bytes) for as long as they like. Each is answered
/// 408 at `sessions.body_timeout` and closed, and a WebSocket client from another address is
/// served meanwhile.
#[tokio::test]
async fn stalled_open_bodies_are_cut_at_the_deadline() {
    let backend = echo_backend("a").await;
    let yaml = config(
        &backend,
        "allowed_origins: [\"https://app.example\"]",
        "sessions:\n  body_timeout: 300ms\n",
    );
    let gateway = start_gateway(&yaml).await;
    let stalled = b"POST /?wsgate=open HTTP/1.1\r\nHost: localhost\r\nOrigin: https://app.example\r\nContent-Length: 100\r\n\r\n{\"proto";
    let attackers: Vec<_> = (0..20)
        .map(|_| tokio::spawn(raw_answer(gateway.addr, stalled, Duration::from_secs(3))))
        .collect();
    echo_from("127.0.0.2", gateway.addr).await;
    for attacker in attackers {
        let (status, text, took) = attacker
            .await
            .unwrap()
            .expect("a stalled body is cut, not waited for");
        assert_eq!(status, 408, "{text}");
        assert!(
            text.contains("access-control-allow-origin: https://app.example"),
            "{text}"
        );
        assert!(took < Duration::from_secs(2), "cut after {took:?}");
    }
    assert!(
        backend.seen.lock().unwrap().len() <= 1,
        "no session was opened"
    );
}

/// Attack: an `open` announcing a body of a megabyte (the old `max_batch`), sent slowly or
/// never. It is refused with 413 at once, before any of it is read, and the connection is
/// closed; a chunked body is cut as soon as it passes the open cap.
#[tokio::test]
async fn oversize_open_bodies_are_refused_before_they_are_read() {
    let backend = echo_backend("a").await;
    let yaml = config(&backend, "", "sessions:\n  body_timeout: 10s\n");
    let gateway = start_gateway(&yaml).await;
    let announced =
        b"POST /?wsgate=open HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n{";
    let (status, text, took) = raw_answer(gateway.addr, announced, Duration::from_secs(3))
        .await
        .expect("refused without waiting for the body");
    assert_eq!(status, 413, "{text}");
    assert!(took < Duration::from_secs(2), "refused after {took:?}");

    let mut chunked =
        b"POST /?wsgate=open HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n2000\r\n"
            .to_vec();
    chunked.extend_from_slice(&[b' '; 0x2000]);
    chunked.extend_from_slice(b"\r\n");
    let (status, text, took) = raw_answer(gateway.addr, &chunked, Duration::from_secs(3))
        .await
        .expect("refused without waiting for the rest of the body");
    assert_eq!(status, 413, "{text}");
    assert!(took < Duration::from_secs(2), "refused after {took:?}");
    assert!(
        backend.seen.lock().unwrap().is_empty(),
        "no session was opened"
    );
    session_echo(gateway.addr).await;
}

/// Attack: a session WebSocket sends faster than the route's `message_rate`. It is closed
/// with 1008 like a relayed WebSocket over its rate (the task does not die on a numbering
/// gap), and another session and a plain WebSocket client are served after it.
#[tokio::test]
async fn a_session_websocket_over_its_rate_gets_1008() {
    let backend = echo_backend("a").await;
    let yaml = config(&backend, "limits:\n  message_rate: 5", "");
    let gateway = start_gateway(&yaml).await;
    let url = format!("ws://{}/?wsgate=socket", gateway.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let Message::Text(open) = next_message(&mut ws).await else {
        panic!("the session opens with a control message");
    };
    assert!(open.as_str().starts_with("c{\"type\":\"open\""), "{open}");
    for n in 0..100 {
        if ws
            .send(Message::text(format!("dmessage {n}")))
            .await
            .is_err()
        {
            break;
        }
    }
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("closed within 5 s")
        {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("the connection ended without a close frame: {other:?}"),
        }
    };
    let close = close.expect("a close code");
    assert_eq!(u16::from(close.code), 1008, "{close:?}");
    assert!(close.reason.contains("rate"), "{close:?}");
    session_echo(gateway.addr).await;
    echo_from("127.0.0.2", gateway.addr).await;
}

/// Malformed session parameters answered the way every session error is: JSON with the CORS
/// headers for an admitted origin, so the page's client library can read why it was refused.
#[tokio::test]
async fn malformed_session_parameters_are_answered_with_cors() {
    let backend = echo_backend("a").await;
    let yaml = config(&backend, "allowed_origins: [\"https://app.example\"]", "");
    let gateway = start_gateway(&yaml).await;
    let mut client = KeepAlive::connect(gateway.addr).await;
    for target in [
        "/?wsgate=poll",
        "/?wsgate=teleport",
        "/?wsgate=poll&wsgate_sid=x&wsgate_ack=-1",
    ] {
        let answer = client.request("GET", target, "").await;
        assert_eq!(answer.status, 400, "{target}: {}", answer.body);
        assert_cors(&answer);
    }
}

/// Runs a scenario of `tests/session_client/resume.mjs` (the browser client, as the gateway
/// serves it, under node) against `gateway`; its stderr on failure. Skips loudly without
/// node, and fails under `CI=true`, where node must be installed.
async fn client_scenario(scenario: &str, gateway: SocketAddr) -> Option<Result<(), String>> {
    let gateway = gateway.to_string();
    let mut child = support::session_client(
        "resume.mjs",
        &[scenario, &gateway],
        std::process::Stdio::null(),
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Some(Err(format!("{scenario}: node did not finish within 20 s")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        use std::io::Read;
        let _ = pipe.read_to_string(&mut stderr);
    }
    Some(if status.success() {
        Ok(())
    } else {
        Err(format!("{scenario} ({status}): {stderr}"))
    })
}

/// The browser client's messages sent right after `reconnect()` on the long-polling transport,
/// while a send is still in flight, all reach the backend in order (the send pump of the
/// abandoned transport no longer blocks the next one), and later ones too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_delivers_messages_sent_during_a_resume() {
    let backend = echo_backend("a").await;
    let gateway = start_gateway(&config(&backend, "", "")).await;
    if let Some(outcome) = client_scenario("send-after-reconnect", gateway.addr).await {
        outcome.unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A browser client whose every new session is lost at once (a 410 on its first poll) opens
/// the next ones with a growing backoff, not a few times a second: a fleet of such clients
/// would otherwise storm the gateways it is meant to spare. A working session resets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_backs_off_while_every_new_session_is_lost() {
    let backend = echo_backend("a").await;
    let gateway = start_gateway(&config(&backend, "", "")).await;
    if let Some(outcome) = client_scenario("lost-sessions-backoff", gateway.addr).await {
        outcome.unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A browser client whose network is down retries with capped exponential backoff and jitter
/// (a fleet of offline clients does not hammer the gateway every 125-250 ms), resumes when the
/// network is back, and starts the backoff over after a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_backs_off_exponentially_while_offline() {
    let backend = echo_backend("a").await;
    let gateway = start_gateway(&config(&backend, "", "")).await;
    if let Some(outcome) = client_scenario("offline-backoff", gateway.addr).await {
        outcome.unwrap_or_else(|e| panic!("{e}"));
    }
}
