//! Shutdown: `drain.deadline` bounds how long the gateway waits for closing handshakes, and
//! the deadline in force is that of the last configuration reloaded.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/peers.rs"]
mod peers;
mod support;

use peers::{RawBackend, op, raw_client};
use std::net::SocketAddr;
use std::time::Duration;
use support::*;
use tokio::time::Instant;
use wsgate::server::Server;

/// A gateway in front of `backend` whose close timeout (30 s) is far longer than any drain
/// deadline below, so only the deadline can end the wait.
fn config(backend: SocketAddr, deadline: &str) -> wsgate::config::Config {
    let yaml = format!(
        "{}timeouts:\n  close: 30s\ndrain:\n  deadline: {deadline}\n",
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
