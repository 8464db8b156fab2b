//! The end-to-end benchmark's echo backend: a WebSocket server on one thread that echoes every
//! frame as it arrives, answers pings and closes, and writes once per read.
//!
//! `cargo run --release --example bench_echo -- 127.0.0.1:9001`
//!
//! Hand-written rather than fastwebsockets or tokio-tungstenite: those write once per frame,
//! and with 64-byte pipelined messages the backend, which shares a core with the load
//! generator, would be the first thing to saturate. Frame-by-frame echo keeps each frame's
//! `FIN` and opcode, so a fragmented message comes back fragmented the same way.

// A test and benchmark tool, never deployed: failing loudly on a setup error is its report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "wire.rs"]
mod wire;

use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wire::{OP_CLOSE, OP_PING, OP_PONG};

/// The first read of a connection fits in this; larger frames grow the buffer.
const INITIAL_BUFFER: usize = 16 * 1024;
const MAX_HEAD: usize = 8 * 1024;

fn main() -> io::Result<()> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".to_owned());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind(&address).await?;
        eprintln!("bench echo listening on {}", listener.local_addr()?);
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(async move {
                        let _ = serve(stream).await;
                    });
                }
                // EMFILE while the idle scenario ramps up: wait rather than exit.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    })
}

async fn serve(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 2048];
    let mut filled = 0;
    let head_len = loop {
        if let Some(end) = wire::head_end(&buf[..filled]) {
            break end;
        }
        if filled == buf.len() {
            if buf.len() >= MAX_HEAD {
                return Ok(());
            }
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Ok(());
        }
        filled += n;
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let Some(key) = wire::header_value(&head, "sec-websocket-key") else {
        stream
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        wire::accept_key(key)
    );
    stream.write_all(response.as_bytes()).await?;

    buf.copy_within(head_len..filled, 0);
    filled -= head_len;
    buf.resize(INITIAL_BUFFER, 0);
    let mut out = Vec::with_capacity(INITIAL_BUFFER);
    loop {
        let mut start = 0;
        let mut closing = false;
        while let Some(header) = wire::parse_header(&buf[start..filled]) {
            let frame_len = header.header_len + header.len;
            if filled - start < frame_len {
                if frame_len > buf.len() {
                    buf.resize(frame_len, 0);
                }
                break;
            }
            let payload = &mut buf[start + header.header_len..start + frame_len];
            if let Some(key) = header.mask {
                wire::apply_mask(payload, key, 0);
            }
            match header.opcode {
                OP_PONG => {}
                OP_PING => {
                    wire::write_header(&mut out, true, OP_PONG, None, payload.len());
                    out.extend_from_slice(payload);
                }
                OP_CLOSE => {
                    wire::write_header(&mut out, true, OP_CLOSE, None, payload.len().min(2));
                    out.extend_from_slice(&payload[..payload.len().min(2)]);
                    closing = true;
                }
                opcode => {
                    wire::write_header(&mut out, header.fin, opcode, None, payload.len());
                    out.extend_from_slice(payload);
                }
            }
            start += frame_len;
            if closing {
                break;
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if closing {
            // The server closes TCP first (RFC 6455 §7.1.1).
            return stream.shutdown().await;
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Ok(());
        }
        filled += n;
    }
}
