//! Shutdown: out of the load balancer's rotation first, then WebSockets closed spread over
//! `drain.spread` (a room at one instant), and `drain.deadline` bounds the whole drain; the
//! settings in force are those of the last configuration reloaded.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/peers.rs"]
mod peers;
mod support;

use futures_util::StreamExt;
use peers::{RawBackend, op, raw_client};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use support::*;
use tokio::time::Instant;
use wsgate::server::Server;

/// A gateway in front of `backend` whose close timeout (30 s) is far longer than any drain
/// deadline below, so only the deadline can end the wait.
fn config(backend: SocketAddr, deadline: &str) -> wsgate::config::Config {
    let yaml = format!(
        "{}timeouts:\n  close: 30s\ndrain:\n  readiness_delay: 0s\n  spread: 0s\n  deadline: {deadline}\n",
        simple_config(&[backend], "")
    );
    wsgate::config::from_yaml_str(&yaml, "test.yaml").unwrap()
}

#[tokio::test]
async fn drain_gives_up_on_silent_peers_at_the_deadline_of_the_reloaded_config() {
    let backend = RawBackend::bind().await;
    let server = Server::bind(config(backend.addr, "1m")).await.unwrap();
    let gateway = server.local_addrs()[0];
    let reloader = server.reloader();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));

    // A client and a backend that never answer a close: the connection can only end when the
    // gateway stops waiting for them.
    let request = upgrade_request("/", "");
    let (mut client, _backend_side) =
        tokio::join!(raw_client(gateway, request.as_bytes()), backend.accept_ws());
    reloader
        .reload(config(backend.addr, "1s"))
        .expect("only the drain deadline changed");

    let started = Instant::now();
    drop(stop);
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the server stops")
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "stopped after {waited:?}, before the 1 s deadline"
    );
    // Below the first configuration's 1 min, the 30 s close timeout and the 10 s default.
    assert!(waited < Duration::from_secs(8), "stopped after {waited:?}");

    let close = client.read_frame().await.expect("a close frame first");
    assert_eq!(close.opcode, op::CLOSE);
    assert_eq!(close.close_code(), Some(1001));
}

#[tokio::test]
async fn drain_deadline_zero_does_not_wait() {
    let backend = RawBackend::bind().await;
    let server = Server::bind(config(backend.addr, "0")).await.unwrap();
    let gateway = server.local_addrs()[0];
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let request = upgrade_request("/", "");
    let (_client, _backend_side) =
        tokio::join!(raw_client(gateway, request.as_bytes()), backend.accept_ws());

    let started = Instant::now();
    drop(stop);
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the server stops")
        .unwrap();
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "stopped after {waited:?}");
}

/// The scenario: 1,000 connections in 200 rooms, spread 5 s. The instance leaves the
/// rotation first (`/readyz` 503 while new clients are still served), then the closes come
/// spread over the 5 s, no second with more than its share plus a margin, and each room's
/// connections at one instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_leaves_rotation_then_closes_rooms_spread_evenly() {
    const CONNECTIONS: usize = 1000;
    const ROOMS: usize = 200;
    const DELAY: Duration = Duration::from_secs(1);
    const SPREAD: Duration = Duration::from_secs(5);
    let backend = echo_backend("only").await;
    let yaml = format!(
        "{}admin:\n  address: 127.0.0.2:0\ndrain:\n  readiness_delay: 1s\n  spread: 5s\n  deadline: 20s\n",
        simple_config(&[backend.addr], "sticky:\n  query: room")
    );
    let config = wsgate::config::from_yaml_str(&yaml, "test.yaml").unwrap();
    let server = Server::bind(config).await.unwrap();
    let gateway = server.local_addrs()[0];
    let admin = server.admin_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    assert_eq!(http_get(admin, "/readyz").await.0, 200);

    let mut clients = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        clients.push((
            i % ROOMS,
            connect(gateway, &format!("/?room={}", i % ROOMS)).await,
        ));
    }
    let started = Instant::now();
    let closes: Vec<_> = clients
        .into_iter()
        .map(|(room, mut ws)| {
            tokio::spawn(async move {
                let code = close_frame(&mut ws)
                    .await
                    .map(|frame| u16::from(frame.code));
                let at = started.elapsed();
                // Polling on sends tungstenite's close reply and reads to the end.
                while let Some(Ok(_)) = ws.next().await {}
                (room, code, at)
            })
        })
        .collect();
    drop(stop);

    // Out of rotation at once, still serving during the readiness delay.
    let deadline = Instant::now() + Duration::from_secs(5);
    while http_get(admin, "/readyz").await.0 != 503 {
        assert!(Instant::now() < deadline, "/readyz never said 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut late = connect(gateway, "/?room=late").await;
    futures_util::SinkExt::send(&mut late, "still served".into())
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut late).await.into_text().unwrap().as_str(),
        "still served"
    );
    assert!(
        started.elapsed() < DELAY,
        "the check ran after the readiness delay"
    );

    let mut per_second = [0usize; 5];
    let mut rooms: HashMap<usize, Vec<Duration>> = HashMap::new();
    for close in closes {
        let (room, code, at) = close.await.unwrap();
        assert_eq!(code, Some(1001), "room {room} at {at:?}");
        assert!(at >= DELAY, "closed at {at:?}, inside the readiness delay");
        assert!(
            at < DELAY + SPREAD + Duration::from_secs(1),
            "closed at {at:?}"
        );
        let second = ((at - DELAY).as_secs() as usize).min(per_second.len() - 1);
        per_second[second] += 1;
        rooms.entry(room).or_default().push(at);
    }
    println!("closes per second of the spread: {per_second:?}");
    let share = CONNECTIONS / per_second.len();
    for count in per_second {
        assert!(
            count <= share + share / 4,
            "closes per second over the spread: {per_second:?} (share {share})"
        );
    }
    for (room, times) in rooms {
        let (first, last) = (times.iter().min().unwrap(), times.iter().max().unwrap());
        assert!(
            *last - *first < Duration::from_millis(250),
            "room {room} closed from {first:?} to {last:?}"
        );
    }
    while let Some(Ok(_)) = late.next().await {}
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the server stops once every connection is closed")
        .unwrap();
    println!(
        "drained {CONNECTIONS} connections in {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
