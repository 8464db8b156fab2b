//! The memory an idle connection costs is mostly the size of its task's future: the gateway
//! promises at most 4 KiB of RSS per idle proxied connection (README, Performance), and the
//! measured figure is close to it. This test fails when the connection future grows, so a
//! change that adds per-connection state is noticed here, with a number, rather than in the
//! next benchmark run. (The bound depends on the compiler's layout; CI uses one toolchain.)
//!
//! The other part is what a connection holds while it waits: no read buffer (64 KiB each).
//! That is checked through `wsgate_relay_buffer_bytes`, which is process-wide, so this binary
//! runs nothing else through a relay.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use wsgate::gateway::Gateway;
use wsgate::stream::Stream;

/// The connection future measured last: 2,040 bytes in a debug build (Rust 1.95; 1,968 before
/// the client address behind trusted proxies, 1,864 before per-hop keepalive state and the
/// drain's turn). The bound leaves room for small changes, not for a second copy of a stream
/// or a buffer.
const MAX_CONNECTION_FUTURE: usize = 2048;

#[tokio::test]
async fn a_connection_future_stays_small() {
    let yaml = "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends:\n      - ws://127.0.0.1:9\nroutes:\n  - upstream: app\n";
    let config = wsgate::config::from_yaml_str(yaml, "test.yaml").unwrap();
    let gateway = Arc::new(Gateway::new(config).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, peer) = listener.accept().await.unwrap();
    let hop = wsgate::front::Hop {
        addr: peer,
        listener: 0,
        count_at_head: None,
    };
    let future = wsgate::front::serve(
        gateway,
        Stream::Plain(server),
        hop,
        tokio::time::Instant::now(),
    );
    let size = std::mem::size_of_val(&future);
    println!("connection future: {size} bytes");
    assert!(
        size <= MAX_CONNECTION_FUTURE,
        "a connection's future is {size} bytes (bound {MAX_CONNECTION_FUTURE}): every idle \
         connection pays for it; box the new state or keep it out of the long-lived phases"
    );
    drop(future);
    drop(client);
}

/// Relay buffers every worker thread may keep pooled (`relay::buffer`): 16 of 64 KiB.
const POOLED_PER_THREAD: i64 = 16 * 64 * 1024;
const WORKERS: usize = 2;

/// Connections that exchanged a message and then wait hold no read buffer: the relay's buffer
/// memory stays within what the worker threads pool, however many connections there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_hold_no_read_buffer() {
    const CONNECTIONS: usize = 150;
    let backend = echo_backend("only").await;
    let gateway = start_gateway(&simple_config(&[backend.addr], "")).await;
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let mut ws = connect(gateway.addr, "/").await;
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        assert_eq!(
            next_message(&mut ws).await.into_text().unwrap().as_str(),
            format!("hello {i}")
        );
        clients.push(ws);
    }
    // The block_on thread runs no relay, but allow it a pool too: the bound stays far below
    // the 2 x 64 KiB that each idle connection would hold if it kept its buffers.
    let bound = POOLED_PER_THREAD * (WORKERS as i64 + 1);
    let held = || wsgate::metrics::RELAY_BUFFER_BYTES.get();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while held() > bound && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let idle = held();
    println!("relay buffers with {CONNECTIONS} idle connections: {idle} bytes");
    assert!(
        idle <= bound,
        "{CONNECTIONS} idle connections keep {idle} bytes of relay buffers (bound {bound}): \
         a connection waiting for data must not hold a read buffer"
    );
    // Still relaying after the wait.
    let ws = &mut clients[0];
    ws.send(Message::text("again")).await.unwrap();
    assert_eq!(
        next_message(ws).await.into_text().unwrap().as_str(),
        "again"
    );
    for mut ws in clients {
        let _ = ws.close(None).await;
        let _ = ws.next().await;
    }
}
