//! A session WebSocket (`wsgate=socket` with a session id) forwarded to the instance owning the
//! session: the client's upgrade request goes to the owner with the peer headers added, the
//! owner's answer (its 101 with its own `Sec-WebSocket-Accept` for the client's key, or its
//! refusal) goes back unchanged, and after a 101 the bytes flow both ways untouched. The owner
//! terminates the WebSocket; this hop only carries it, so the frames the client sees are the
//! owner's.

use super::{connect, count, observe, peer_headers};
use crate::client_addr::ClientAddr;
use crate::config::Peer;
use crate::gateway::Gateway;
use crate::proto::handshake::RequestHead;
use crate::stream::Stream;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// The owner's answer head must arrive within this (it answers from memory).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer head accepted from the owner.
const MAX_ANSWER_HEAD: usize = 16 << 10;
/// Largest refusal body carried back.
pub const MAX_REFUSAL_BODY: usize = 16 << 10;
/// A carried WebSocket silent both ways this long is cut. The session socket acknowledges
/// every half second while data flows and the route's pings keep an idle one talking; a
/// cut only detaches the session, which the client resumes.
pub const SILENCE: Duration = Duration::from_secs(120);
const CHUNK: usize = 16 << 10;

/// The owner's answer to a forwarded upgrade.
#[derive(Debug)]
pub struct Answer {
    pub stream: Stream,
    pub status: u16,
    /// The answer head as the owner wrote it, blank line included.
    pub head: Vec<u8>,
    /// Bytes the owner sent after its head (the first frames, or a refusal's body).
    pub rest: Vec<u8>,
}

/// Sends the client's upgrade request to `peer` and reads its answer head. `None`: the hop
/// failed before the owner answered, nothing was sent to the client, and the caller answers
/// "session gone".
pub async fn open(
    gateway: &Gateway,
    peer: &Peer,
    head: &RequestHead<'_, '_>,
    early: &[u8],
    client: ClientAddr,
    tls: bool,
) -> Option<Answer> {
    let cluster = gateway.config.cluster.as_ref()?;
    let started = Instant::now();
    let mut stream = match connect(gateway, peer).await {
        Ok(stream) => stream,
        Err(result) => {
            count(gateway, &peer.name, "socket", result);
            tracing::info!(peer = %peer.name, address = %peer.address, "session owner {result}");
            return None;
        }
    };
    let mut request = format!("GET {} HTTP/1.1\r\n", head.target).into_bytes();
    for header in head.headers {
        if super::is_peer_header(header.name) {
            continue;
        }
        request.extend_from_slice(header.name.as_bytes());
        request.extend_from_slice(b": ");
        request.extend_from_slice(header.value);
        request.extend_from_slice(b"\r\n");
    }
    for (name, value) in peer_headers(cluster, client.addr(), tls) {
        request.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    request.extend_from_slice(early);
    let exchange = async {
        stream.write_all(&request).await.ok()?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 2048];
        loop {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Some((buf, end + 4));
            }
            if buf.len() > MAX_ANSWER_HEAD {
                return None;
            }
        }
    };
    let Ok(Some((mut buf, head_len))) = tokio::time::timeout(ANSWER_TIMEOUT, exchange).await else {
        count(gateway, &peer.name, "socket", "failed");
        tracing::info!(peer = %peer.name, "the session owner did not answer the upgrade");
        return None;
    };
    let mut fields = [httparse::EMPTY_HEADER; crate::proto::handshake::MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut fields);
    let status = match parsed.parse(&buf[..head_len]) {
        Ok(httparse::Status::Complete(_)) => parsed.code.unwrap_or(502),
        _ => {
            count(gateway, &peer.name, "socket", "failed");
            return None;
        }
    };
    observe(gateway, &peer.name, started.elapsed().as_secs_f64());
    count(gateway, &peer.name, "socket", "answered");
    let rest = buf.split_off(head_len);
    Some(Answer {
        stream,
        status,
        head: buf,
        rest,
    })
}

impl Answer {
    /// The header fields of the answer head.
    pub fn headers(&self) -> Vec<(String, Vec<u8>)> {
        let mut fields = [httparse::EMPTY_HEADER; crate::proto::handshake::MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut fields);
        if parsed.parse(&self.head).is_err() {
            return Vec::new();
        }
        parsed
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect()
    }

    /// A refusal's body: to the owner's end of the connection, at most [`MAX_REFUSAL_BODY`]
    /// within [`ANSWER_TIMEOUT`].
    pub async fn refusal_body(mut self) -> Vec<u8> {
        let mut body = std::mem::take(&mut self.rest);
        let read = async {
            let mut chunk = [0u8; 2048];
            while body.len() < MAX_REFUSAL_BODY {
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => body.extend_from_slice(&chunk[..n]),
                }
            }
        };
        let _ = tokio::time::timeout(ANSWER_TIMEOUT, read).await;
        body.truncate(MAX_REFUSAL_BODY);
        body
    }

    /// Carries the answer and, after a 101, the WebSocket to the client, until either end
    /// closes or both are silent for [`SILENCE`].
    pub async fn carry(self, mut client: Stream, head_written: bool) {
        if !head_written && client.write_all(&self.head).await.is_err() {
            return;
        }
        if !self.rest.is_empty() && client.write_all(&self.rest).await.is_err() {
            return;
        }
        if self.status != 101 {
            let body = Answer {
                rest: Vec::new(),
                ..self
            }
            .refusal_body()
            .await;
            let _ = client.write_all(&body).await;
            let _ = client.shutdown().await;
            return;
        }
        splice(client, self.stream).await;
    }
}

/// Copies bytes both ways; a side's end is passed on as a shutdown of the other's writing.
async fn splice(client: Stream, owner: Stream) {
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut owner_read, mut owner_write) = tokio::io::split(owner);
    let (mut up, mut down) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let (mut up_open, mut down_open) = (true, true);
    let silence = tokio::time::sleep(SILENCE);
    tokio::pin!(silence);
    while up_open || down_open {
        tokio::select! {
            read = client_read.read(&mut up), if up_open => match read {
                Ok(n) if n > 0 => {
                    if owner_write.write_all(&up[..n]).await.is_err() {
                        return;
                    }
                }
                _ => {
                    up_open = false;
                    let _ = owner_write.shutdown().await;
                }
            },
            read = owner_read.read(&mut down), if down_open => match read {
                Ok(n) if n > 0 => {
                    if client_write.write_all(&down[..n]).await.is_err() {
                        return;
                    }
                }
                _ => {
                    down_open = false;
                    let _ = client_write.shutdown().await;
                }
            },
            () = &mut silence => return,
        }
        silence.as_mut().reset(Instant::now() + SILENCE);
    }
}
