//! Hostile peers against the relay, with real sockets: clients and backends that break the
//! protocol and vanish at the worst moment, flood control frames and fragments, or stop
//! reading. Each test asserts what the victims see: the gateway's CPU stays idle, the other
//! hop gets its close at once, memory stays bounded, other clients are still served.

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
use tokio_tungstenite::tungstenite::Message;

/// CPU time (user + system) this process has used: the gateway runs in it.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

/// CPU time used while `f` runs.
async fn cpu_during<F: std::future::Future>(f: F) -> (F::Output, Duration) {
    let before = process_cpu();
    let out = f.await;
    (out, process_cpu() - before)
}

/// Observed: a client that breaks the protocol (here an unmasked frame: 1002) and drops its
/// TCP connection before the backend has answered the gateway's 1001 left the connection's
/// task runnable forever, a worker thread at 100 % CPU; with as many such connections as
/// workers, nobody else was served. The victim: every other client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn violating_client_that_drops_tcp_before_the_backend_answers_leaves_the_cpu_idle() {
    let backend = RawBackend::bind().await;
    let gateway = start_gateway(&simple_config(&[backend.addr], "")).await;
    let mut backends = Vec::new();
    for _ in 0..2 {
        let request = upgrade_request("/", "");
        let (mut client, mut raw_backend) = tokio::join!(
            raw_client(gateway.addr, request.as_bytes()),
            backend.accept_ws()
        );
        client
            .send(&frame(true, 0, op::TEXT, None, b"unmasked"))
            .await;
        client.stream.shutdown().await.unwrap();
        drop(client);
        let close = raw_backend
            .close_frame()
            .await
            .expect("the backend gets 1001");
        assert_eq!(close.close_code(), Some(1001));
        backends.push(raw_backend);
    }
    // The backend answers its close late, after the client is gone.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for raw_backend in &mut backends {
        raw_backend
            .send(&server_frame(true, op::CLOSE, &close_payload(1001, b"")))
            .await;
    }
    let ((), cpu) = cpu_during(tokio::time::sleep(Duration::from_millis(800))).await;
    assert!(
        cpu < Duration::from_millis(300),
        "the gateway kept a core busy: {cpu:?} of CPU in 800 ms"
    );
    for raw_backend in &mut backends {
        assert!(
            raw_backend.eof_within(WAIT).await,
            "the gateway ends the backend connection"
        );
    }
    let echo = echo_backend("other").await;
    let other = start_gateway(&simple_config(&[echo.addr], "")).await;
    assert_eq!(backend_name(other.addr, "/").await, "other");
    // The same gateway still serves new clients.
    let (_ws, _raw) = tokio::join!(connect(gateway.addr, "/"), backend.accept_ws());
}

/// Observed: a client starts the closing handshake, the gateway relays it, and the backend
/// closes TCP without answering: the client got its close reply only after the close timeout
/// (5 s). The victim: the client, waiting for nothing.
#[tokio::test]
async fn client_close_is_answered_at_once_when_the_backend_vanishes_instead_of_replying() {
    let backend = RawBackend::bind().await;
    let gateway = start_gateway(&simple_config(&[backend.addr], "timeouts: {close: 5s}")).await;
    let request = upgrade_request("/", "");
    let (mut client, mut raw_backend) = tokio::join!(
        raw_client(gateway.addr, request.as_bytes()),
        backend.accept_ws()
    );
    client
        .send(&client_frame(true, op::CLOSE, &close_payload(4001, b"bye")))
        .await;
    let relayed = raw_backend
        .close_frame()
        .await
        .expect("the close is relayed");
    assert_eq!(relayed.close_code(), Some(4001));
    let started = Instant::now();
    drop(raw_backend);
    let reply = client
        .close_frame()
        .await
        .expect("the client gets a close reply");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the reply took {:?}",
        started.elapsed()
    );
    assert_eq!(reply.close_code(), Some(4001));
    assert!(client.eof_within(WAIT).await);
}

/// A client that closes and then never reads again, with the backend's answer stuck behind a
/// full socket, must not hold the connection past the close timeouts.
#[tokio::test]
async fn client_that_closes_and_stops_reading_is_dropped_after_the_close_timeouts() {
    let backend = RawBackend::bind().await;
    let gateway = start_gateway(&simple_config(&[backend.addr], "timeouts: {close: 300ms}")).await;
    let socket = small_buffer_connect(gateway.addr, 4096).await;
    let request = upgrade_request("/", "");
    let (mut client, mut raw_backend) = tokio::join!(
        raw_client_on(socket, request.as_bytes()),
        backend.accept_ws()
    );
    // The backend fills the client's socket; the client reads nothing.
    let big = vec![b'x'; 60_000];
    for _ in 0..20 {
        if !raw_backend
            .try_send(&server_frame(true, op::BINARY, &big))
            .await
        {
            break;
        }
        if raw_backend
            .read_frame_within(Duration::from_millis(10))
            .await
            .is_ok()
        {
            break;
        }
    }
    client
        .send(&client_frame(true, op::CLOSE, &close_payload(1000, b"")))
        .await;
    // Whatever the backend does, the gateway lets go of it within the close timeouts.
    let started = Instant::now();
    let mut saw_close = false;
    loop {
        match raw_backend.read_frame_within(Duration::from_secs(5)).await {
            Ok(Some(f)) if f.opcode == op::CLOSE && !saw_close => {
                saw_close = true;
                raw_backend
                    .try_send(&server_frame(true, op::CLOSE, &close_payload(1000, b"")))
                    .await;
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(()) => panic!("the backend connection is still open after 5 s"),
        }
    }
    let mut client_side = client.stream;
    let mut sink = vec![0u8; 1 << 16];
    let client_ended = tokio::time::timeout(Duration::from_secs(5), async {
        use tokio::io::AsyncReadExt;
        loop {
            match client_side.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(client_ended.is_ok(), "the client connection is still open");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// A client pings as fast as it can and never reads the pongs: the answers waiting for it are
/// bounded, so memory stays flat, and other clients are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_from_a_client_that_never_reads_costs_bounded_memory() {
    let echo = echo_backend("b").await;
    let gateway = start_gateway(&simple_config(&[echo.addr], "")).await;
    let socket = small_buffer_connect(gateway.addr, 4096).await;
    let mut client = raw_client_on(socket, upgrade_request("/", "").as_bytes()).await;
    let ping = client_frame(true, op::PING, &[7u8; 125]);
    let batch: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 1000)
        .collect();
    let rss_before = rss_bytes();
    // 100,000 pings (13 MB of them); the writes complete because the gateway keeps reading.
    let flood = async {
        for _ in 0..100 {
            if !client.try_send(&batch).await {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), flood)
        .await
        .expect("the gateway keeps reading the pings");
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < 16 << 20, "RSS grew by {} KiB", grown >> 10);
    assert_eq!(backend_name(gateway.addr, "/").await, "b");
}

/// A message sent as endless one-byte fragments is cut at `max_message` (1009) with no byte of
/// it reaching the backend beyond the limit, and the backend is told 1001.
#[tokio::test]
async fn fragment_flood_is_cut_at_max_message_with_1009() {
    let mut backend = recording_backend(Script::Echo).await;
    let gateway = start_gateway(&simple_config(
        &[backend.addr],
        "limits: {max_frame: 1KiB, max_message: 4KiB}",
    ))
    .await;
    let mut client = raw_client(gateway.addr, upgrade_request("/", "").as_bytes()).await;
    let mut bytes = client_frame(false, op::BINARY, b"x");
    for _ in 0..10_000 {
        bytes.extend_from_slice(&client_frame(false, op::CONTINUATION, b"x"));
    }
    let _ = client.try_send(&bytes).await;
    let close = client.close_frame().await.expect("a close frame");
    assert_eq!(close.close_code(), Some(1009));
    let (messages, _) = backend.messages_until_end().await;
    assert!(
        messages.iter().all(|m| !m.is_binary()),
        "no partial message is delivered: {messages:?}"
    );
}

/// Clients that break the protocol in every way, one after another, leave the backend healthy
/// and other clients unaffected.
#[tokio::test]
async fn violations_by_many_clients_leave_other_clients_served() {
    let echo = echo_backend("b").await;
    let gateway = start_gateway(&simple_config(&[echo.addr], "")).await;
    let mut ws = connect(gateway.addr, "/").await;
    let bad: [&[u8]; 4] = [
        &frame(true, 0, op::TEXT, None, b"unmasked"),
        &frame(true, 0x40, op::TEXT, Some(CLIENT_KEY), b"rsv1"),
        &frame(true, 0, 0x3, Some(CLIENT_KEY), b"reserved opcode"),
        &client_frame(true, op::TEXT, b"\xff\xfe"),
    ];
    for _ in 0..25 {
        for bytes in bad {
            let mut client = raw_client(gateway.addr, upgrade_request("/", "").as_bytes()).await;
            let _ = client.try_send(bytes).await;
            drop(client);
        }
    }
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("still here"));
    let _ = ws.close(None).await;
    let _ = ws.next().await;
}
