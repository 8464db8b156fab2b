//! The session layer end to end: long-polling, send batches, the event stream and the session
//! WebSocket, against a tokio-tungstenite backend through a real gateway on 127.0.0.1. Lost
//! answers, retried requests and cut connections are injected; every test checks order,
//! completeness and that nothing reaches either side twice.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::{echo_backend, simple_config, start_gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// One HTTP request on a fresh connection; the answer's status, headers and JSON body.
async fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, hyper::HeaderMap, Value) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(target)
        .header("host", "localhost");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = request.body(Full::new(Bytes::from(body))).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(40), sender.send_request(request))
        .await
        .expect("an answer within 40 s")
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, headers, value)
}

/// `path` with `query` added to whatever query it has.
fn join(path: &str, query: &str) -> String {
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("{path}{separator}{query}")
}

/// A long-polling client, numbering its sends and acknowledging what it has received.
struct Poller {
    addr: SocketAddr,
    path: String,
    sid: String,
    ack: u64,
    next_seq: u64,
}

impl Poller {
    async fn open(addr: SocketAddr, path: &str) -> Poller {
        let (status, _, body) = http(addr, "POST", &join(path, "wsgate=open"), None, &[]).await;
        assert_eq!(status, 200, "{body}");
        Poller {
            addr,
            path: path.to_owned(),
            sid: body["session"].as_str().unwrap().to_owned(),
            ack: 0,
            next_seq: 1,
        }
    }

    fn target(&self, op: &str, ack: u64) -> String {
        let query = format!("wsgate={op}&wsgate_sid={}&wsgate_ack={ack}", self.sid);
        join(&self.path, &query)
    }

    /// Polls with the current acknowledgement; returns the raw answer.
    async fn poll_raw(&self) -> (u16, Value) {
        let (status, _, body) =
            http(self.addr, "GET", &self.target("poll", self.ack), None, &[]).await;
        (status, body)
    }

    /// Polls until `count` events have arrived; returns them and acknowledges them.
    async fn receive(&mut self, count: usize) -> Vec<Value> {
        let mut events = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while events.len() < count {
            assert!(
                Instant::now() < deadline,
                "only {} of {count} events: {events:?}",
                events.len()
            );
            let (status, body) = self.poll_raw().await;
            assert_eq!(status, 200, "{body}");
            for event in body["events"].as_array().unwrap() {
                let seq = event["seq"].as_u64().unwrap();
                assert_eq!(seq, self.ack + 1, "events arrive numbered in order: {body}");
                self.ack = seq;
                events.push(event.clone());
            }
        }
        events
    }

    /// POSTs `body` to the session operation `op`; the status and JSON answer.
    async fn post(&self, op: &str, body: Value) -> (u16, Value) {
        let (status, _, answer) =
            http(self.addr, "POST", &self.target(op, 0), Some(body), &[]).await;
        (status, answer)
    }

    async fn send(&mut self, texts: &[&str]) -> (u16, Value) {
        let messages: Vec<Value> = texts.iter().map(|t| json!({ "text": t })).collect();
        let batch = json!({ "seq": self.next_seq, "messages": messages });
        let (status, _, body) =
            http(self.addr, "POST", &self.target("send", 0), Some(batch), &[]).await;
        if status == 200 {
            self.next_seq += texts.len() as u64;
        }
        (status, body)
    }
}

fn texts(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            e["text"]
                .as_str()
                .unwrap_or_else(|| panic!("a text event: {e}"))
                .to_owned()
        })
        .collect()
}

async fn gateway_with_echo(
    route_extra: &str,
    top_extra: &str,
) -> (support::Gateway, support::EchoBackend) {
    let backend = echo_backend("a").await;
    let yaml = format!("{}{top_extra}", simple_config(&[backend.addr], route_extra));
    (start_gateway(&yaml).await, backend)
}

#[tokio::test]
async fn long_polling_relays_text_and_binary_both_ways_in_order() {
    let (gateway, backend) = gateway_with_echo("", "").await;
    let mut poller = Poller::open(gateway.addr, "/chat?room=x").await;
    // The backend saw an ordinary WebSocket on the application's URL, session parameters gone.
    let seen = backend.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.path, "/chat?room=x");
    let (status, body) = poller.send(&["one", "two", "three"]).await;
    assert_eq!(
        (status, body["received"].as_u64()),
        (200, Some(3)),
        "{body}"
    );
    assert_eq!(texts(&poller.receive(3).await), ["one", "two", "three"]);

    let binary = base64::engine::general_purpose::STANDARD.encode([0u8, 1, 2, 255]);
    let batch = json!({ "seq": 4, "messages": [{ "binary": binary }] });
    let (status, _) = poller.post("send", batch).await;
    assert_eq!(status, 200);
    let events = poller.receive(1).await;
    assert_eq!(events[0]["binary"].as_str(), Some(binary.as_str()));
}

#[tokio::test]
async fn a_lost_poll_answer_is_sent_again_and_nothing_is_seen_twice() {
    let (gateway, _backend) = gateway_with_echo("", "").await;
    let mut poller = Poller::open(gateway.addr, "/").await;
    poller.send(&["a", "b"]).await;
    // The answer is "lost": the client never acknowledges it and polls again with the same ack.
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        let (_, body) = poller.poll_raw().await;
        if body["events"].as_array().unwrap().len() == 2 {
            break body;
        }
        assert!(Instant::now() < deadline);
    };
    let (_, again) = poller.poll_raw().await;
    assert_eq!(
        first, again,
        "the retried poll gets the same events with the same numbers"
    );
    assert_eq!(texts(&poller.receive(2).await), ["a", "b"]);
    poller.send(&["c"]).await;
    assert_eq!(
        texts(&poller.receive(1).await),
        ["c"],
        "only the new event follows"
    );
}

#[tokio::test]
async fn a_retried_send_reaches_the_backend_once() {
    let (gateway, _backend) = gateway_with_echo("", "").await;
    let mut poller = Poller::open(gateway.addr, "/").await;
    let batch = json!({ "seq": 1, "messages": [{ "text": "once" }, { "text": "twice?" }] });
    let target = poller.target("send", 0);
    // The first answer is "lost"; the client sends the same batch again.
    let (a, _, _) = http(gateway.addr, "POST", &target, Some(batch.clone()), &[]).await;
    let (b, _, body) = http(gateway.addr, "POST", &target, Some(batch), &[]).await;
    assert_eq!((a, b, body["received"].as_u64()), (200, 200, Some(2)));
    // An overlapping retry (the second batch repeats one message and adds one).
    let overlap = json!({ "seq": 2, "messages": [{ "text": "twice?" }, { "text": "third" }] });
    let (status, _, body) = http(gateway.addr, "POST", &target, Some(overlap), &[]).await;
    assert_eq!((status, body["received"].as_u64()), (200, Some(3)));
    assert_eq!(texts(&poller.receive(3).await), ["once", "twice?", "third"]);
    // Nothing more was echoed: each message reached the backend exactly once.
    let (status, body) = tokio::time::timeout(Duration::from_secs(40), poller.poll_raw())
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["events"], json!([]), "no duplicate echo: {body}");
    // A batch that skips messages is refused with where to resume.
    let gap = json!({ "seq": 9, "messages": [{ "text": "x" }] });
    let (status, _, body) = http(gateway.addr, "POST", &target, Some(gap), &[]).await;
    assert_eq!(
        (status, body["received"].as_u64()),
        (409, Some(3)),
        "{body}"
    );
}

#[tokio::test]
async fn a_poll_cut_mid_flight_loses_nothing() {
    let (gateway, _backend) = gateway_with_echo("", "").await;
    let mut poller = Poller::open(gateway.addr, "/").await;
    // A poll is held, then its connection dies before anything arrives.
    let mut cut = TcpStream::connect(gateway.addr).await.unwrap();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n",
        poller.target("poll", 0)
    );
    cut.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    poller.send(&["while", "away"]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(cut);
    assert_eq!(texts(&poller.receive(2).await), ["while", "away"]);
}

/// What a backend received as close frames: code and reason, `None` for an empty one.
type Closes = tokio::sync::mpsc::UnboundedReceiver<Option<(u16, String)>>;

/// A tokio-tungstenite backend that reports every close frame it receives, and closes with
/// 4001 "bye" when a client says "close me".
async fn recording_backend() -> (SocketAddr, Closes) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                while let Some(Ok(message)) = ws.next().await {
                    match message {
                        Message::Text(t) if t.as_str() == "close me" => {
                            let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
                                code: 4001.into(),
                                reason: "bye".into(),
                            };
                            let _ = ws.close(Some(frame)).await;
                        }
                        Message::Close(frame) => {
                            let _ = closed_tx
                                .send(frame.map(|f| (u16::from(f.code), f.reason.to_string())));
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, closed_rx)
}

#[tokio::test]
async fn the_backend_close_reaches_the_client_and_the_client_close_reaches_the_backend() {
    let (addr, mut closed_rx) = recording_backend().await;
    let gateway = start_gateway(&simple_config(&[addr], "")).await;
    let mut poller = Poller::open(gateway.addr, "/").await;
    poller.send(&["close me"]).await;
    let events = poller.receive(1).await;
    assert_eq!(events[0]["close"], json!({ "code": 4001, "reason": "bye" }));
    // The poll acknowledging the close is answered 410 at once, and so is any later request.
    let (status, body) = poller.poll_raw().await;
    assert_eq!(status, 410, "{body}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, body) = poller.poll_raw().await;
    assert_eq!(status, 410, "{body}");

    let other = Poller::open(gateway.addr, "/").await;
    let close = json!({ "code": 4000, "reason": "leaving" });
    let (status, _) = other.post("close", close).await;
    assert_eq!(status, 200);
    // The first session's backend reports its own close (4001) first.
    let seen = loop {
        let seen = tokio::time::timeout(Duration::from_secs(10), closed_rx.recv())
            .await
            .unwrap();
        if seen != Some(Some((4001, String::new()))) {
            break seen;
        }
    };
    assert_eq!(seen, Some(Some((4000, "leaving".to_owned()))));
    let bad = json!({ "code": 1006 });
    let third = Poller::open(gateway.addr, "/").await;
    let (status, body) = third.post("close", bad).await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn an_abandoned_session_expires_and_the_backend_gets_1001() {
    let (addr, mut closed_rx) = recording_backend().await;
    let yaml = format!("{}sessions:\n  timeout: 2s\n", simple_config(&[addr], ""));
    let gateway = start_gateway(&yaml).await;
    let poller = Poller::open(gateway.addr, "/").await;
    let started = Instant::now();
    let seen = tokio::time::timeout(Duration::from_secs(15), closed_rx.recv())
        .await
        .unwrap();
    assert_eq!(seen, Some(Some((1001, "session expired".to_owned()))));
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "not before the timeout"
    );
    let (status, _) = poller.poll_raw().await;
    assert_eq!(status, 410);
}

/// A backend that answers "flood N" with N numbered 1 KiB messages and counts what it sent.
async fn flood_backend() -> (
    SocketAddr,
    Arc<AtomicU64>,
    tokio::sync::mpsc::UnboundedReceiver<Option<(u16, String)>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
    let counter = Arc::clone(&sent);
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        let (mut write, mut read) = ws.split();
        let (flood_tx, mut flood_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        tokio::spawn(async move {
            while let Some(n) = flood_rx.recv().await {
                for i in 0..n {
                    let text = format!("{i:08}{}", "x".repeat(1016));
                    if write.send(Message::text(text)).await.is_err() {
                        return;
                    }
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        while let Some(Ok(message)) = read.next().await {
            match message {
                Message::Text(t) => {
                    if let Some(n) = t.as_str().strip_prefix("flood ") {
                        let _ = flood_tx.send(n.parse().unwrap());
                    }
                }
                Message::Close(frame) => {
                    let _ =
                        closed_tx.send(frame.map(|f| (u16::from(f.code), f.reason.to_string())));
                }
                _ => {}
            }
        }
    });
    (addr, sent, closed_rx)
}

#[tokio::test]
async fn a_flooding_backend_meets_backpressure_and_a_slow_poller_still_gets_everything_in_order() {
    let (addr, sent, _closed) = flood_backend().await;
    let yaml = format!(
        "{}sessions:\n  buffer: 64KiB\n  max_batch: 32KiB\n",
        simple_config(&[addr], "")
    );
    let gateway = start_gateway(&yaml).await;
    let mut poller = Poller::open(gateway.addr, "/").await;
    let total = 3000u64;
    poller.send(&[&format!("flood {total}")]).await;
    let mut next = 0u64;
    let mut peak_ahead = 0u64;
    while next < total {
        let events = poller.receive(1).await;
        for event in events {
            let text = event["text"].as_str().unwrap();
            assert_eq!(
                text[..8].parse::<u64>().unwrap(),
                next,
                "in order, none lost, none twice"
            );
            next += 1;
        }
        peak_ahead = peak_ahead.max(sent.load(Ordering::Relaxed).saturating_sub(next));
    }
    // The backend could run ahead of the client only by the session buffer plus socket
    // buffers, never by the whole flood.
    assert!(
        peak_ahead < total,
        "backend ran {peak_ahead} messages ahead"
    );
}

#[tokio::test]
async fn memory_stays_bounded_when_the_client_never_polls() {
    let (addr, sent, mut closed) = flood_backend().await;
    let yaml = format!("{}sessions:\n  buffer: 64KiB\n", simple_config(&[addr], ""));
    let gateway = start_gateway(&yaml).await;
    let mut poller = Poller::open(gateway.addr, "/").await;
    let total = 200_000u64; // 200 MiB if it were buffered
    poller.send(&[&format!("flood {total}")]).await;
    // The client never polls: once it has been away 5 s with a full buffer, the session ends.
    let seen = tokio::time::timeout(Duration::from_secs(30), closed.recv())
        .await
        .unwrap();
    assert_eq!(
        seen,
        Some(Some((
            1001,
            "session buffer full while the client was away".to_owned()
        )))
    );
    let stalled_at = sent.load(Ordering::Relaxed);
    assert!(
        stalled_at < total / 4,
        "the backend was held back by TCP backpressure (sent {stalled_at} of {total})"
    );
    let (status, _) = poller.poll_raw().await;
    assert_eq!(status, 410, "the client is told the session is gone");
}

#[tokio::test]
async fn wrong_route_origin_or_session_id_is_refused_with_a_clear_status() {
    let backend = echo_backend("a").await;
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends:\n      - ws://{}\nroutes:\n  - name: open\n    match: {{ path_prefix: /open }}\n    upstream: app\n  - name: guarded\n    match: {{ path_prefix: /guarded }}\n    upstream: app\n    allowed_origins: [\"https://good.example\", \"https://other.example\"]\n",
        backend.addr
    );
    let gateway = start_gateway(&yaml).await;
    let poller = Poller::open(gateway.addr, "/open").await;
    // Unknown id.
    let (status, _, body) = http(
        gateway.addr,
        "GET",
        "/open?wsgate=poll&wsgate_sid=gw~nope",
        None,
        &[],
    )
    .await;
    assert_eq!(status, 410, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("session not found")
    );
    // Right id, wrong route.
    let target = format!("/guarded?wsgate=poll&wsgate_sid={}", poller.sid);
    let (status, _, body) = http(gateway.addr, "GET", &target, None, &[]).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("another route"),
        "{body}"
    );
    // A session opened from a bad origin is refused like a WebSocket would be.
    let (status, _, _) = http(
        gateway.addr,
        "POST",
        "/guarded?wsgate=open",
        None,
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(status, 403);
    // A session opened from a good origin is not usable from another (allowed) origin.
    let (status, headers, body) = http(
        gateway.addr,
        "POST",
        "/guarded?wsgate=open",
        None,
        &[("origin", "https://good.example")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        headers.get("access-control-allow-origin").unwrap(),
        "https://good.example"
    );
    let sid = body["session"].as_str().unwrap();
    let target = format!("/guarded?wsgate=poll&wsgate_sid={sid}");
    let (status, _, body) = http(
        gateway.addr,
        "GET",
        &target,
        None,
        &[("origin", "https://other.example")],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    // Malformed requests.
    let (status, _, body) = http(gateway.addr, "GET", "/open?wsgate=poll", None, &[]).await;
    assert_eq!(status, 400, "{body}");
    let (status, headers, _) = http(gateway.addr, "GET", "/open?wsgate=open", None, &[]).await;
    assert_eq!(
        (status, headers.get("allow").map(|v| v.to_str().unwrap())),
        (405, Some("POST"))
    );
    let target = format!("/open?wsgate=send&wsgate_sid={}", poller.sid);
    let (status, _, body) = http(
        gateway.addr,
        "POST",
        &target,
        Some(json!({ "messages": 1 })),
        &[],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let target = format!("/open?wsgate=poll&wsgate_sid={}&wsgate_ack=99", poller.sid);
    let (status, _, body) = http(gateway.addr, "GET", &target, None, &[]).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("acknowledged 99"),
        "{body}"
    );
}

#[tokio::test]
async fn the_session_limit_is_a_503() {
    let (gateway, _backend) = gateway_with_echo("", "sessions:\n  max_sessions: 1\n").await;
    let _first = Poller::open(gateway.addr, "/").await;
    let (status, headers, body) = http(gateway.addr, "POST", "/?wsgate=open", None, &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers.get("retry-after").unwrap(), "1");
}

/// The client library's WebSocket transport, spoken by hand with tokio-tungstenite.
struct SessionWs {
    ws: support::Client,
    sid: String,
    received_by_gateway: u64,
}

async fn session_ws(addr: SocketAddr, path_and_query: &str) -> SessionWs {
    let request = format!("ws://{addr}{path_and_query}")
        .into_client_request()
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let first = support::next_message(&mut ws).await.into_text().unwrap();
    let control: Value = serde_json::from_str(first.as_str().strip_prefix('c').unwrap()).unwrap();
    assert_eq!(control["type"], "open", "{control}");
    SessionWs {
        ws,
        sid: control["session"].as_str().unwrap().to_owned(),
        received_by_gateway: control["received"].as_u64().unwrap(),
    }
}

impl SessionWs {
    async fn send(&mut self, text: &str) {
        self.ws
            .send(Message::text(format!("d{text}")))
            .await
            .unwrap();
    }

    /// The next data message (control messages skipped), without its tag.
    async fn next_data(&mut self) -> String {
        loop {
            let message = support::next_message(&mut self.ws)
                .await
                .into_text()
                .unwrap();
            if let Some(data) = message.as_str().strip_prefix('d') {
                return data.to_owned();
            }
        }
    }
}

#[tokio::test]
async fn a_session_websocket_resumes_after_a_cut_and_gets_exactly_what_it_missed() {
    let (gateway, _backend) = gateway_with_echo("", "").await;
    let mut first = session_ws(gateway.addr, "/?wsgate=socket").await;
    assert_eq!(first.received_by_gateway, 0);
    first.send("1").await;
    first.send("2").await;
    assert_eq!(first.next_data().await, "1");
    assert_eq!(first.next_data().await, "2");
    // Two more are sent; the connection is cut (no close frame) after "3" arrived but
    // before "4" was read.
    first.send("3").await;
    assert_eq!(first.next_data().await, "3");
    first.send("4").await;
    let sid = first.sid.clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(first);
    // Resume on a new WebSocket, saying 3 events were received.
    let mut second = session_ws(
        gateway.addr,
        &format!("/?wsgate=socket&wsgate_sid={sid}&wsgate_ack=3"),
    )
    .await;
    assert_eq!(second.sid, sid);
    assert_eq!(
        second.received_by_gateway, 4,
        "the gateway delivered all four client messages"
    );
    assert_eq!(
        second.next_data().await,
        "4",
        "exactly the missed one, once"
    );
    second.send("5").await;
    assert_eq!(second.next_data().await, "5");
}

#[tokio::test]
async fn a_session_moves_from_websocket_to_long_polling_and_back() {
    let (gateway, _backend) = gateway_with_echo("", "").await;
    let mut ws = session_ws(gateway.addr, "/?wsgate=socket").await;
    ws.send("over ws").await;
    assert_eq!(ws.next_data().await, "over ws");
    let sid = ws.sid.clone();
    drop(ws);
    let mut poller = Poller {
        addr: gateway.addr,
        path: "/".to_owned(),
        sid: sid.clone(),
        ack: 1,
        next_seq: 2,
    };
    poller.send(&["over polling"]).await;
    assert_eq!(texts(&poller.receive(1).await), ["over polling"]);
    let mut back = session_ws(
        gateway.addr,
        &format!("/?wsgate=socket&wsgate_sid={sid}&wsgate_ack=2"),
    )
    .await;
    assert_eq!(back.received_by_gateway, 2);
    back.send("ws again").await;
    assert_eq!(back.next_data().await, "ws again");
}

#[tokio::test]
async fn a_session_websocket_for_an_unknown_session_is_closed_with_4410() {
    let (gateway, _backend) = gateway_with_echo("", "").await;
    let url = format!("ws://{}/?wsgate=socket&wsgate_sid=x~unknown", gateway.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let frame = support::close_frame(&mut ws).await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 4410);
}

#[tokio::test]
async fn the_client_library_is_served_at_its_fixed_path() {
    let (gateway, _backend) = gateway_with_echo("", "").await;
    let (status, headers, body) = http(gateway.addr, "GET", "/.wsgate/client.js", None, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("content-type").unwrap(),
        "text/javascript; charset=utf-8"
    );
    assert!(body.as_str().unwrap().contains("class WsgateSocket"));
    let (status, _, _) = http(gateway.addr, "POST", "/.wsgate/client.js", None, &[]).await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn a_session_websocket_detached_with_4100_can_be_resumed() {
    let (gateway, _backend) = gateway_with_echo("", "").await;
    let mut ws = session_ws(gateway.addr, "/?wsgate=socket").await;
    ws.send("before").await;
    assert_eq!(ws.next_data().await, "before");
    let sid = ws.sid.clone();
    let detach = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: 4100.into(),
        reason: "switching".into(),
    };
    ws.ws.close(Some(detach)).await.unwrap();
    let mut again = session_ws(
        gateway.addr,
        &format!("/?wsgate=socket&wsgate_sid={sid}&wsgate_ack=1"),
    )
    .await;
    again.send("after").await;
    assert_eq!(again.next_data().await, "after");
}

#[tokio::test]
async fn a_session_websocket_client_that_falls_silent_is_detached_and_its_session_expires() {
    let (addr, mut closed_rx) = recording_backend().await;
    let yaml = format!(
        "{}sessions:\n  timeout: 2s\n",
        simple_config(
            &[addr],
            "timeouts:\n  ping_interval: 1s\n  pong_timeout: 1s\n"
        )
    );
    let gateway = start_gateway(&yaml).await;
    // The client reads the open message, then never reads again: it answers no ping, as a
    // peer that vanished without a FIN would not.
    let silent = session_ws(gateway.addr, "/?wsgate=socket").await;
    let seen = tokio::time::timeout(Duration::from_secs(20), closed_rx.recv())
        .await
        .expect("the session expired although its WebSocket was still open");
    assert_eq!(seen, Some(Some((1001, "session expired".to_owned()))));
    drop(silent);
}

#[tokio::test]
async fn a_send_whose_connection_is_cut_mid_flight_is_retried_and_delivered_once() {
    let (gateway, _backend) = gateway_with_echo("", "").await;
    let mut poller = Poller::open(gateway.addr, "/").await;
    let batch = json!({ "seq": 1, "messages": [{ "text": "cut" }] }).to_string();
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{batch}",
        poller.target("send", 0),
        batch.len()
    );
    // The request goes out and the connection dies before the answer is read.
    let mut cut = TcpStream::connect(gateway.addr).await.unwrap();
    cut.write_all(request.as_bytes()).await.unwrap();
    drop(cut);
    // The client cannot know whether it arrived, so it sends the same batch again.
    let (status, body) = poller.send(&["cut"]).await;
    assert_eq!(
        (status, body["received"].as_u64()),
        (200, Some(1)),
        "{body}"
    );
    assert_eq!(texts(&poller.receive(1).await), ["cut"]);
    let (_, body) = tokio::time::timeout(Duration::from_secs(40), poller.poll_raw())
        .await
        .unwrap();
    assert_eq!(body["events"], json!([]), "delivered once: {body}");
}

#[tokio::test]
async fn the_route_message_rate_applies_to_sessions() {
    let (gateway, _backend) = gateway_with_echo("limits:\n  message_rate: 2\n", "").await;
    let mut poller = Poller::open(gateway.addr, "/").await;
    // The burst is two seconds' worth (4); the fifth message in a row is over the rate.
    let (status, body) = poller.send(&["1", "2", "3", "4", "5", "6"]).await;
    assert_eq!(status, 429, "{body}");
    let events = poller.receive(5).await;
    assert_eq!(texts(&events[..4]), ["1", "2", "3", "4"]);
    assert_eq!(
        events[4]["close"],
        json!({ "code": 1008, "reason": "message rate exceeded" })
    );
}

#[tokio::test]
async fn plain_websocket_clients_see_no_session_framing() {
    let (gateway, _backend) = gateway_with_echo("", "").await;
    let mut ws = support::connect(gateway.addr, "/plain").await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(support::next_message(&mut ws).await, Message::text("hello"));
}

#[tokio::test]
async fn the_event_stream_delivers_events_and_resumes_from_last_event_id() {
    let (gateway, _backend) = gateway_with_echo("", "").await;
    let mut poller = Poller::open(gateway.addr, "/").await;
    poller.send(&["e1", "e2"]).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n",
        poller.target("events", 0)
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains("data: \"e2\"") {
        assert!(Instant::now() < deadline, "{seen}");
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
    assert!(seen.contains("content-type: text/event-stream"), "{seen}");
    assert!(
        seen.contains("id: 1\nevent: text\ndata: \"e1\"\n\n"),
        "{seen}"
    );
    drop(stream);
    // Reconnect as EventSource does, with Last-Event-ID: only what follows.
    poller.send(&["e3"]).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: localhost\r\nLast-Event-ID: 2\r\n\r\n",
        poller.target("events", 0)
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = String::new();
    while !seen.contains("data: \"e3\"") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
    assert!(
        !seen.contains("\"e1\"") && !seen.contains("\"e2\""),
        "{seen}"
    );
    assert!(seen.contains("id: 3\n"), "{seen}");
}

#[tokio::test]
async fn sessions_whose_room_moves_on_a_reload_are_closed_with_1012_and_the_others_keep_working() {
    let a = echo_backend("a").await;
    let b = echo_backend("b").await;
    let yaml = |backends: &[SocketAddr]| {
        let mut yaml = simple_config(backends, "sticky:\n  query: room\n");
        yaml.push_str("rebalance:\n  window: 1s\nsessions:\n  poll_timeout: 2s\n");
        wsgate::config::from_yaml_str(&yaml, "test.yaml").unwrap()
    };
    let server = wsgate::server::Server::bind(yaml(&[a.addr])).await.unwrap();
    let addr = server.local_addrs()[0];
    let reloader = server.reloader();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));

    let mut pollers = Vec::new();
    for room in 0..12 {
        let mut poller = Poller::open(addr, &format!("/?room=r{room}")).await;
        poller.send(&["whoami"]).await;
        assert_eq!(texts(&poller.receive(1).await), ["a"]);
        pollers.push(poller);
    }
    reloader.reload(yaml(&[a.addr, b.addr])).unwrap();

    let mut moved = 0;
    for (room, poller) in pollers.iter_mut().enumerate() {
        // Where the room lives now: ask through a new session.
        let mut probe = Poller::open(addr, &format!("/?room=r{room}")).await;
        probe.send(&["whoami"]).await;
        let owner = texts(&probe.receive(1).await).remove(0);
        if owner == "b" {
            let events = poller.receive(1).await;
            assert_eq!(
                events[0]["close"],
                json!({ "code": 1012, "reason": "backend changed, reconnect" }),
                "room r{room} moved to b"
            );
            moved += 1;
        } else {
            // Untouched: still open, still on a, nothing lost.
            poller.send(&["still here"]).await;
            assert_eq!(
                texts(&poller.receive(1).await),
                ["still here"],
                "room r{room}"
            );
        }
    }
    assert!(moved > 0, "with two backends some of 12 rooms move");
}

#[tokio::test]
async fn a_session_backend_that_stops_answering_pings_ends_the_session_with_1001() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        // Holds the connection and never reads from it again: no ping is answered.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(ws);
    });
    let yaml = simple_config(
        &[addr],
        "timeouts:\n  ping_interval: 1s\n  pong_timeout: 1s\n",
    );
    let gateway = start_gateway(&yaml).await;
    let mut poller = Poller::open(gateway.addr, "/").await;
    let started = Instant::now();
    let events = poller.receive(1).await;
    assert_eq!(
        events[0]["close"],
        json!({ "code": 1001, "reason": "backend did not answer ping in time" })
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "ended by keepalive, not by a later timeout"
    );
}
