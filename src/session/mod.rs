//! Sessions: the long-polling fallback and resumable connections (docs/sessions.md).
//!
//! A session is one backend WebSocket that outlives the client's connections. The gateway
//! opens it exactly as for a WebSocket client (same route, sticky pick, origin check and
//! limits), numbers every backend message, and keeps each until the client acknowledges it, so
//! the client may come and go, by long-polling, Server-Sent Events or a session WebSocket, and
//! resume on any of them without losing or repeating a message. The backend never knows: it
//! sees one ordinary WebSocket per session.
//!
//! Invariants: memory per session is bounded by `sessions.buffer` (a full buffer stops reading
//! from the backend: TCP backpressure, never dropped messages); a client message reaches the
//! backend at most once, in order; a session id appears in logs only redacted.

mod backend;
mod buffer;
pub mod http;
mod id;
mod open;
pub mod protocol;
mod registry;
mod socket;
mod state;
pub mod websocket;

pub use id::SessionId;

/// The browser client library (`client/wsgate.js`), served by every listener at
/// [`CLIENT_PATH`].
pub const CLIENT_JS: &str = include_str!("../../client/wsgate.js");
pub const CLIENT_PATH: &str = "/.wsgate/client.js";
pub use registry::Registry;

/// Completes at `deadline` (never without one): the timer of a sans-I/O deadline.
async fn until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}
