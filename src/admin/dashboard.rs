//! The live dashboard: `GET /dashboard` serves one self-contained page (no external assets);
//! the page opens a WebSocket on `/dashboard/ws`, over which the gateway pushes a JSON
//! [`Snapshot`](super::snapshot::Snapshot) once per second.
//!
//! Invariants:
//! - one pusher task samples the gateway for every dashboard client, once per
//!   [`PUSH_INTERVAL`] at most, and only while at least one client is connected;
//! - the latest snapshot sits in a `watch` channel: a client that falls behind skips to the
//!   newest snapshot instead of queueing old ones, so memory per client is one `Arc`, and a
//!   slow client never delays the pusher or the other clients; one whose socket takes longer
//!   than [`WRITE_TIMEOUT`] to accept a snapshot is dropped;
//! - a client receives at most one snapshot per pusher tick, hence at most one per second;
//! - the handshake is validated with `proto::handshake` and frames are written and read with
//!   `proto`, as on the public listeners; the client's frames are only read to answer pings
//!   and closes (the page sends no data).

use super::snapshot::Sampler;
use crate::gateway::CurrentGateway;
use crate::proto::handshake::{self, RequestHead};
use crate::proto::{
    CloseCode, ControlFrame, DecoderConfig, FrameDecoder, FrameHeader, Item, OpCode, Role,
    close_frame,
};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

/// How often the pusher samples: the "at most once per second".
pub const PUSH_INTERVAL: Duration = Duration::from_secs(1);

/// A client whose socket does not take a snapshot within this long is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The page; everything it needs is inline.
const PAGE: &str = include_str!("dashboard.html");

/// Client frames are pings, pongs and closes; nothing larger is expected.
const MAX_CLIENT_FRAME: u64 = 4096;

/// The latest snapshot as JSON; `None` until the first sample.
type Latest = Option<Arc<str>>;

/// Hands dashboard clients the pusher's snapshots; the pusher stops when this is dropped.
#[derive(Debug)]
pub struct Dashboard {
    snapshots: Arc<watch::Sender<Latest>>,
    pusher: JoinHandle<()>,
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        self.pusher.abort();
    }
}

impl Dashboard {
    /// Starts the pusher for the gateway `current` hands out (it follows reloads).
    pub fn start(current: Arc<CurrentGateway>) -> Self {
        let snapshots = Arc::new(watch::Sender::new(None));
        let pusher = tokio::spawn(push(current, Arc::clone(&snapshots)));
        Self { snapshots, pusher }
    }

    /// `GET /dashboard`.
    pub fn page() -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
        let headers = response.headers_mut();
        headers.insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/html; charset=utf-8"),
        );
        headers.insert(
            hyper::header::CACHE_CONTROL,
            hyper::header::HeaderValue::from_static("no-store"),
        );
        response
    }

    /// `GET /dashboard/ws`: the 101, and a task that pushes snapshots to this client once
    /// hyper hands over the connection.
    pub fn upgrade(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let accept = {
            let headers: Vec<httparse::Header<'_>> = request
                .headers()
                .iter()
                .map(|(name, value)| httparse::Header {
                    name: name.as_str(),
                    value: value.as_bytes(),
                })
                .collect();
            let head = RequestHead {
                method: request.method().as_str(),
                target: request.uri().path(),
                version: u8::from(request.version() != hyper::Version::HTTP_10),
                headers: &headers,
            };
            match handshake::validate_upgrade(&head) {
                Ok(upgrade) => handshake::accept_key(upgrade.key),
                Err(error) => {
                    let mut response = Response::new(Full::new(Bytes::from(format!("{error}\n"))));
                    *response.status_mut() =
                        StatusCode::from_u16(error.status()).unwrap_or(StatusCode::BAD_REQUEST);
                    for (name, value) in error.extra_headers() {
                        if let Ok(value) = hyper::header::HeaderValue::from_str(value) {
                            response.headers_mut().insert(*name, value);
                        }
                    }
                    return response;
                }
            }
        };
        let snapshots = self.snapshots.subscribe();
        tokio::spawn(async move {
            match hyper::upgrade::on(request).await {
                Ok(upgraded) => serve_client(TokioIo::new(upgraded), snapshots).await,
                Err(error) => tracing::debug!("dashboard upgrade failed: {error}"),
            }
        });
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(
            hyper::header::UPGRADE,
            hyper::header::HeaderValue::from_static("websocket"),
        );
        headers.insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("Upgrade"),
        );
        if let Ok(accept) = hyper::header::HeaderValue::from_str(&accept) {
            headers.insert(hyper::header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }
}

/// The one pusher: samples once per interval while anyone watches.
async fn push(current: Arc<CurrentGateway>, snapshots: Arc<watch::Sender<Latest>>) {
    let mut sampler = Sampler::default();
    let mut ticks = tokio::time::interval(PUSH_INTERVAL);
    // A late tick (a loaded machine) is followed by a full interval, never by a burst.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if snapshots.receiver_count() == 0 {
            sampler.reset();
            continue;
        }
        let snapshot = sampler.sample(&current.get(), Instant::now(), SystemTime::now());
        match serde_json::to_string(&snapshot) {
            Ok(json) => {
                snapshots.send_replace(Some(json.into()));
            }
            Err(error) => tracing::warn!("dashboard snapshot not encoded: {error}"),
        }
    }
}

/// Why a client's session ended, and what to tell it.
enum End {
    /// It closed or vanished: reply to its close if it sent one, nothing more.
    ByClient(Option<CloseCode>),
    /// The gateway ends it with this close.
    ByGateway(CloseCode, &'static str),
}

/// Pushes snapshots to one client until it closes, breaks the protocol, stalls, or the
/// pusher stops.
async fn serve_client<S>(mut io: S, mut snapshots: watch::Receiver<Latest>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut decoder = FrameDecoder::new(DecoderConfig {
        role: Role::Server,
        max_frame: MAX_CLIENT_FRAME,
        max_message: MAX_CLIENT_FRAME,
        compression: false,
        keep_opaque_masked: false,
    });
    // Only changes are sent: a snapshot already sampled before this client arrived could be
    // followed by the next one at once, two within a second.
    snapshots.borrow_and_update();
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    let end = loop {
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break End::ByGateway(CloseCode::GOING_AWAY, "dashboard stopped");
                }
                let Some(json) = snapshots.borrow_and_update().clone() else {
                    continue;
                };
                if !send(&mut io, &text_frame(&json)).await {
                    break End::ByClient(None);
                }
            }
            read = io.read(&mut chunk) => {
                let n = match read {
                    Ok(0) | Err(_) => break End::ByClient(None),
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                match handle_client_frames(&mut decoder, &mut buf) {
                    Ok(ClientSaid::Nothing) => {}
                    Ok(ClientSaid::Ping(payload)) => {
                        let pong = ControlFrame::new(OpCode::Pong, &payload, None);
                        if !send(&mut io, pong.as_bytes()).await {
                            break End::ByClient(None);
                        }
                    }
                    Ok(ClientSaid::Close(code)) => break End::ByClient(Some(code)),
                    Err(code) => break End::ByGateway(code, "protocol error"),
                }
            }
        }
    };
    let close = match end {
        End::ByClient(None) => None,
        End::ByClient(Some(code)) => Some(close_frame(reply_code(code), "", None)),
        End::ByGateway(code, reason) => Some(close_frame(code, reason, None)),
    };
    if let Some(close) = close {
        let _ = send(&mut io, close.as_bytes()).await;
    }
    // The server closes TCP first (RFC 6455 §7.1.1).
    let _ = tokio::time::timeout(WRITE_TIMEOUT, io.shutdown()).await;
}

/// What a client's frames asked for.
enum ClientSaid {
    Nothing,
    Ping(Vec<u8>),
    Close(CloseCode),
}

/// Consumes every complete frame in `buf`; returns the first ping or close, or the close
/// code for a protocol violation.
fn handle_client_frames(
    decoder: &mut FrameDecoder,
    buf: &mut Vec<u8>,
) -> Result<ClientSaid, CloseCode> {
    let mut said = ClientSaid::Nothing;
    loop {
        let decoded = match decoder.decode(buf) {
            Ok(Some(decoded)) => decoded,
            Ok(None) => return Ok(said),
            Err(error) => return Err(error.close_code()),
        };
        if let Item::Control { header, payload } = &decoded.item {
            match header.opcode {
                OpCode::Close => {
                    let code = crate::proto::parse_close_payload(&buf[payload.clone()])
                        .ok()
                        .and_then(|close| close.code)
                        .unwrap_or(CloseCode::NO_STATUS);
                    return Ok(ClientSaid::Close(code));
                }
                OpCode::Ping if matches!(said, ClientSaid::Nothing) => {
                    said = ClientSaid::Ping(buf[payload.clone()].to_vec());
                }
                _ => {}
            }
        }
        buf.drain(..decoded.consumed);
    }
}

/// The close reply: the client's code echoed (RFC 6455 §5.5.1), 1000 for a close without one.
fn reply_code(received: CloseCode) -> CloseCode {
    if received == CloseCode::NO_STATUS {
        CloseCode::NORMAL
    } else {
        received
    }
}

/// One unmasked, unfragmented text frame (a server's frames are never masked, §5.1).
fn text_frame(text: &str) -> Vec<u8> {
    let header = FrameHeader::new(true, OpCode::Text, None, text.len() as u64).encode();
    let mut frame = Vec::with_capacity(header.as_bytes().len() + text.len());
    frame.extend_from_slice(header.as_bytes());
    frame.extend_from_slice(text.as_bytes());
    frame
}

/// Writes `bytes`; false when the client is gone or too slow.
async fn send<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, io.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_frames_use_the_shortest_length() {
        assert_eq!(text_frame("hi"), [0x81, 2, b'h', b'i']);
        let long = "x".repeat(300);
        let frame = text_frame(&long);
        assert_eq!(&frame[..4], &[0x81, 126, 1, 44]);
        assert_eq!(frame.len(), 304);
    }
}
