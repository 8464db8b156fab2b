//! The memory an idle connection costs is mostly the size of its task's future: the gateway
//! promises at most 4 KiB of RSS per idle proxied connection (README, Performance), and the
//! measured figure is close to it. This test fails when the connection future grows, so a
//! change that adds per-connection state is noticed here, with a number, rather than in the
//! next benchmark run. (The bound depends on the compiler's layout; CI uses one toolchain.)

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use wsgate::gateway::Gateway;
use wsgate::stream::Stream;

/// The connection future measured when this test was written: 1,864 bytes in a debug build,
/// 1,832 in release (Rust 1.95). The bound leaves room for small changes, not for a second
/// copy of a stream or a buffer.
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
    let future = wsgate::front::serve(
        gateway,
        Stream::Plain(server),
        peer,
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
