//! The demo room service, driven over real sockets by tokio-tungstenite clients (an
//! implementation independent of both wsgate's codec and the service's fastwebsockets).

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use wsgate::demo::room_service::serve;

const WAIT: Duration = Duration::from_secs(5);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct Service {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

async fn start(name: &str) -> Service {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, name.to_owned(), async {
        let _ = stopped.await;
    }));
    Service { addr, stop, task }
}

async fn connect(addr: SocketAddr, path: &str) -> Ws {
    let (ws, _) = timeout(WAIT, connect_async(format!("ws://{addr}{path}")))
        .await
        .expect("connect timed out")
        .expect("connect failed");
    ws
}

async fn next_message(ws: &mut Ws) -> Message {
    timeout(WAIT, ws.next())
        .await
        .expect("no message in time")
        .expect("stream ended")
        .expect("read failed")
}

async fn recv(ws: &mut Ws) -> Value {
    match next_message(ws).await {
        Message::Text(text) => serde_json::from_str(&text).expect("server sent invalid JSON"),
        other => panic!("expected a text message, got {other:?}"),
    }
}

async fn send(ws: &mut Ws, event: Value) {
    ws.send(Message::text(event.to_string())).await.unwrap();
}

/// Connects to `room` as `user` and consumes the history every joiner gets first.
async fn join(addr: SocketAddr, room: &str, user: &str) -> (Ws, Value) {
    let mut ws = connect(addr, &format!("/rooms/{room}?user={user}")).await;
    let history = recv(&mut ws).await;
    assert_eq!(history["type"], "history", "{history}");
    assert_eq!(history["room"], room);
    (ws, history)
}

/// A raw HTTP/1.1 GET; returns the status code, the head and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("response timed out")
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

#[tokio::test]
async fn members_of_a_room_hear_each_other_and_other_rooms_hear_nothing() {
    let service = start("a").await;
    let addr = service.addr;
    let (mut alice, history) = join(addr, "A", "alice").await;
    assert_eq!(
        history,
        json!({"type": "history", "room": "A", "messages": [], "server": "a"})
    );
    let (mut bob, _) = join(addr, "A", "bob").await;
    assert_eq!(
        recv(&mut alice).await,
        json!({"type": "joined", "room": "A", "user": "bob", "server": "a"})
    );
    let (mut carol, _) = join(addr, "B", "carol").await;

    send(
        &mut alice,
        json!({"type": "message", "room": "A", "text": "hi"}),
    )
    .await;
    assert_eq!(
        recv(&mut alice).await,
        json!({"type": "sent", "room": "A", "seq": 1, "server": "a"})
    );
    assert_eq!(
        recv(&mut bob).await,
        json!({"type": "message", "room": "A", "user": "alice", "text": "hi", "server": "a", "seq": 1})
    );

    // Without "room", a message goes to the room in the URL.
    send(&mut bob, json!({"type": "message", "text": "hello"})).await;
    assert_eq!(recv(&mut bob).await["type"], "sent");
    let message = recv(&mut alice).await;
    assert_eq!(
        (&message["user"], &message["text"], &message["seq"]),
        (&json!("bob"), &json!("hello"), &json!(2))
    );

    // The room's messages were queued for its members before the acks above, so had carol
    // been sent any, they would come before the ack of her own message.
    send(
        &mut carol,
        json!({"type": "message", "room": "B", "text": "anyone?"}),
    )
    .await;
    assert_eq!(
        recv(&mut carol).await,
        json!({"type": "sent", "room": "B", "seq": 1, "server": "a"})
    );
    send(
        &mut carol,
        json!({"type": "message", "room": "A", "text": "let me in"}),
    )
    .await;
    let refused = recv(&mut carol).await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["server"], "a");

    send(&mut bob, json!({"type": "leave", "room": "A"})).await;
    let left = json!({"type": "left", "room": "A", "user": "bob", "server": "a"});
    assert_eq!(recv(&mut bob).await, left);
    assert_eq!(recv(&mut alice).await, left);

    // A closed connection leaves its rooms too.
    drop(bob);
    carol.close(None).await.unwrap();
    send(&mut alice, json!({"type": "join", "room": "B"})).await;
    assert_eq!(recv(&mut alice).await["type"], "history");
    service.stop.send(()).unwrap();
}

#[tokio::test]
async fn joiners_get_the_last_50_messages_in_order() {
    let service = start("h").await;
    let addr = service.addr;
    let (mut alice, _) = join(addr, "H", "alice").await;
    for i in 0..60 {
        send(
            &mut alice,
            json!({"type": "message", "room": "H", "text": format!("m{i}")}),
        )
        .await;
    }
    for seq in 1..=60 {
        assert_eq!(recv(&mut alice).await["seq"], seq);
    }

    let (_bob, history) = join(addr, "H", "bob").await;
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 50);
    for (i, message) in (10..60).zip(messages) {
        assert_eq!(
            message,
            &json!({"type": "message", "room": "H", "user": "alice", "text": format!("m{i}"),
                    "server": "h", "seq": i + 1})
        );
    }
    assert_eq!(recv(&mut alice).await["type"], "joined");

    // Joining by event, from a connection opened on another room, replays the same history.
    let (mut dave, _) = join(addr, "elsewhere", "guest").await;
    send(
        &mut dave,
        json!({"type": "join", "room": "H", "user": "dave"}),
    )
    .await;
    let history = recv(&mut dave).await;
    assert_eq!(history["room"], "H");
    assert_eq!(history["messages"].as_array().unwrap().len(), 50);
    assert_eq!(
        recv(&mut alice).await,
        json!({"type": "joined", "room": "H", "user": "dave", "server": "h"})
    );

    // History outlives the room's members.
    drop((alice, _bob, dave));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_erin, history) = join(addr, "H", "erin").await;
    assert_eq!(history["messages"][49]["text"], "m59");
    service.stop.send(()).unwrap();
}

#[tokio::test]
async fn bad_input_gets_an_error_and_the_connection_survives() {
    let service = start("e").await;
    let (mut ws, _) = join(service.addr, "lobby", "alice").await;
    for bad in [
        Message::text("not json"),
        Message::text(r#"{"type":"dance"}"#),
        Message::text(r#"{"type":"message"}"#),
        Message::text(r#"{"type":"join","room":"no/slashes"}"#),
        Message::text(r#"{"type":"join","user":"  "}"#),
        Message::text(r#"{"type":"leave","room":"never-joined"}"#),
        Message::binary(vec![1, 2, 3]),
    ] {
        ws.send(bad.clone()).await.unwrap();
        let reply = recv(&mut ws).await;
        assert_eq!(reply["type"], "error", "for {bad:?}: {reply}");
        assert_eq!(reply["server"], "e");
        assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut ws).await,
        Message::Pong(b"are you there".to_vec().into())
    );
    send(&mut ws, json!({"type": "message", "text": "still here"})).await;
    assert_eq!(recv(&mut ws).await["type"], "sent");
    service.stop.send(()).unwrap();
}

#[tokio::test]
async fn serves_the_page_and_health_over_plain_http() {
    let service = start("p").await;
    let addr = service.addr;
    for path in ["/", "/rooms/lobby"] {
        let (status, head, body) = http_get(addr, path).await;
        assert_eq!(status, 200, "{path}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/html"),
            "{head}"
        );
        assert_eq!(body, wsgate::demo::CHAT_HTML);
        // Behind wsgate the page uses its session client; served alone, the plain WebSocket.
        assert!(body.contains("new WsgateSocket(") && body.contains("new WebSocket("));
    }
    let (status, _, body) = http_get(addr, "/health").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    for path in ["/nope", "/rooms/", "/rooms/a/b"] {
        assert_eq!(http_get(addr, path).await.0, 404, "{path}");
    }
    service.stop.send(()).unwrap();
}

#[tokio::test]
async fn upgrades_outside_rooms_are_not_found() {
    let service = start("u").await;
    for path in ["/", "/health", "/chat", "/rooms/", "/rooms/a/b"] {
        match connect_async(format!("ws://{}{path}", service.addr)).await {
            Err(WsError::Http(response)) => assert_eq!(response.status(), 404, "{path}"),
            other => panic!("{path}: expected a 404, got {other:?}"),
        }
    }
    match connect_async(format!("ws://{}/rooms/x?user=%20", service.addr)).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 400),
        other => panic!("expected a 400 for a blank user name, got {other:?}"),
    }
    service.stop.send(()).unwrap();
}

#[tokio::test]
async fn closes_are_answered_and_shutdown_closes_with_1001() {
    let service = start("s").await;
    let addr = service.addr;
    let (mut leaving, _) = join(addr, "lobby", "alice").await;
    leaving
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        })))
        .await
        .unwrap();
    match next_message(&mut leaving).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the close echoed, got {other:?}"),
    }

    let (mut staying, _) = join(addr, "lobby", "bob").await;
    service.stop.send(()).unwrap();
    match next_message(&mut staying).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected a 1001 close, got {other:?}"),
    }
    // tungstenite answers the close; the service then finishes.
    assert!(timeout(WAIT, staying.next()).await.unwrap().is_none());
    timeout(WAIT, service.task)
        .await
        .expect("serve did not return after shutdown")
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}

#[tokio::test]
async fn a_member_that_stops_reading_is_dropped_with_1008() {
    let service = start("slow").await;
    let addr = service.addr;
    let (mut slow, _) = join(addr, "busy", "slow").await;
    let (flooder, _) = join(addr, "busy", "flooder").await;
    assert_eq!(recv(&mut slow).await["type"], "joined");
    let (mut sink, mut stream) = flooder.split();
    // Enough to fill the kernel's socket buffers and then the service's queue; stopped early.
    let text = "x".repeat(4000);
    let flood = tokio::spawn(async move {
        for _ in 0..20_000 {
            let event = json!({"type": "message", "text": text});
            if sink.send(Message::text(event.to_string())).await.is_err() {
                break;
            }
            // This test runs on one thread: let the flooder's own reader keep up with its
            // acks, or the service would rightly drop the flooder as a stalled reader too.
            tokio::task::yield_now().await;
        }
    });
    let left = timeout(Duration::from_secs(60), async {
        loop {
            let Message::Text(text) = stream.next().await.unwrap().unwrap() else {
                continue;
            };
            let event: Value = serde_json::from_str(&text).unwrap();
            if event["type"] != "sent" {
                break event;
            }
        }
    })
    .await
    .expect("the slow member was never dropped");
    flood.abort();
    assert_eq!(
        left,
        json!({"type": "left", "room": "busy", "user": "slow", "server": "slow"})
    );
    // Whatever was already on the wire arrives, then the close that says why.
    let close = timeout(Duration::from_secs(30), async {
        loop {
            match slow.next().await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("no close frame");
    let close = close.expect("a close code");
    assert_eq!(
        (close.code, close.reason.as_str()),
        (CloseCode::Policy, "too slow")
    );
    service.stop.send(()).unwrap();
}

#[tokio::test]
async fn fragmented_messages_are_joined_and_bounded() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let service = start("f").await;
    let (mut ws, _) = join(service.addr, "lobby", "alice").await;
    let event = json!({"type": "message", "text": "in pieces"}).to_string();
    let (head, tail) = event.split_at(10);
    let (middle, tail) = tail.split_at(10);
    for (part, opcode, fin) in [
        (head, Data::Text, false),
        (middle, Data::Continue, false),
        (tail, Data::Continue, true),
    ] {
        let frame = Frame::message(part.as_bytes().to_vec(), OpCode::Data(opcode), fin);
        ws.send(Message::Frame(frame)).await.unwrap();
    }
    assert_eq!(recv(&mut ws).await["type"], "sent");

    // 64 KiB per message in total, however it is cut up.
    let chunk = vec![b' '; 16 * 1024];
    let first = Frame::message(chunk.clone(), OpCode::Data(Data::Text), false);
    ws.send(Message::Frame(first)).await.unwrap();
    for _ in 0..4 {
        let more = Frame::message(chunk.clone(), OpCode::Data(Data::Continue), false);
        if ws.send(Message::Frame(more)).await.is_err() {
            break;
        }
    }
    match next_message(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Size),
        other => panic!("expected a 1009 close, got {other:?}"),
    }
    service.stop.send(()).unwrap();
}

#[tokio::test]
async fn the_dashboard_pushes_batched_counters_once_per_second_at_most() {
    let service = start("d").await;
    let addr = service.addr;
    let (status, head, body) = http_get(addr, "/dashboard").await;
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("text/html"), "{head}");
    assert_eq!(body, wsgate::demo::DASHBOARD_HTML);

    let mut dashboard = connect(addr, "/dashboard/ws").await;
    let first = recv(&mut dashboard).await;
    assert_eq!(first["server"], "d");
    assert_eq!(first["broker"], "off");
    assert_eq!(first["history"], "off");
    let mut last_at = tokio::time::Instant::now();

    let (mut alice, _) = join(addr, "A", "alice").await;
    for i in 0..20 {
        send(
            &mut alice,
            json!({"type": "message", "text": format!("m{i}")}),
        )
        .await;
    }
    for _ in 0..20 {
        assert_eq!(recv(&mut alice).await["type"], "sent");
    }
    // Twenty messages reach the viewer as totals in a frame or two, a window apart.
    let mut snapshots = 0;
    let latest = loop {
        let snapshot = recv(&mut dashboard).await;
        let gap = last_at.elapsed();
        last_at = tokio::time::Instant::now();
        snapshots += 1;
        assert!(gap >= Duration::from_millis(500), "snapshots {gap:?} apart");
        if snapshot["messages_posted"] == 20 {
            break snapshot;
        }
    };
    assert!(snapshots <= 3, "{snapshots} snapshots for one burst");
    assert_eq!(latest["connections"], 1);
    assert_eq!(latest["rooms"], 1);
    assert_eq!(latest["window_ms"], 1000);

    let (status, _, body) = http_get(addr, "/stats").await;
    assert_eq!(status, 200);
    let stats: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["messages_posted"], 20);
    assert_eq!(stats["connections"], 1);
    service.stop.send(()).unwrap();
}
