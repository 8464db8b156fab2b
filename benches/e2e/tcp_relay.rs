//! The end-to-end benchmark's blind TCP relay: accept, connect to the backend, copy bytes both
//! ways until both directions end. No HTTP, no WebSocket: the least work any proxy can do,
//! so its figures are the physical limit a proxy on one core is measured against.
//!
//! `cargo run --release --example bench_tcp_relay -- 127.0.0.1:9002 127.0.0.1:9001`
//!
//! One thread (a current-thread runtime), like wsgate with `--threads 1` and nginx with one
//! worker. Each direction has a buffer of BUFFER bytes for the connection's life (tokio's default
//! of 8 KiB would make 64 KiB messages cost eight reads and writes each; the baseline should be
//! as fast as a relay can be, not as small).

// A test and benchmark tool, never deployed: failing loudly on a setup error is its report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io;
use tokio::net::{TcpListener, TcpStream};

const BUFFER: usize = 64 * 1024;

fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:9002".to_owned());
    let backend = args.next().unwrap_or_else(|| "127.0.0.1:9001".to_owned());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(&listen).await?;
        eprintln!("bench tcp relay listening on {listen}, relaying to {backend}");
        loop {
            let (mut client, _) = match listener.accept().await {
                Ok(pair) => pair,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let backend = backend.clone();
            tokio::spawn(async move {
                let Ok(mut upstream) = TcpStream::connect(&backend).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut client,
                    &mut upstream,
                    BUFFER,
                    BUFFER,
                )
                .await;
            });
        }
    })
}
