//! Idle HTTP/1.1 connections to peers, reused by later forwards: a forward then costs one
//! request on an open connection instead of a TCP connect and a new connection on both
//! instances.
//!
//! Invariants: a connection is given back only once its previous answer was read to the end
//! (hyper's `ready`); it is used again only within [`IDLE_FOR`] and half the owner's
//! keep-alive head timeout (`timeouts.handshake`, the same on every instance of a cluster),
//! so a pooled connection is rarely one the owner is closing; at most [`MAX_IDLE`] are kept per peer address. The lock is never
//! held across an await.

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How long an idle connection is kept.
pub const IDLE_FOR: Duration = Duration::from_secs(4);
/// Idle connections kept per peer address: enough for the concurrency of a busy pair of
/// instances, few enough that the owner's connection slots are not held for nothing.
pub const MAX_IDLE: usize = 32;

type Sender = SendRequest<Incoming>;

#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<HashMap<String, Vec<(Sender, Instant)>>>,
}

impl Pool {
    /// The most recently used idle connection to `address` that is still open and idle for
    /// less than `max_idle`.
    pub fn take(&self, address: &str, max_idle: Duration) -> Option<Sender> {
        let mut idle = self.idle.lock().ok()?;
        let senders = idle.get_mut(address)?;
        let now = Instant::now();
        senders.retain(|(sender, since)| {
            !sender.is_closed() && now.saturating_duration_since(*since) < max_idle.min(IDLE_FOR)
        });
        while let Some((sender, _)) = senders.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    /// Gives `sender` back once its answer has been read to the end (or drops it if the
    /// connection closes first).
    pub fn give_back(self: &Arc<Self>, address: String, mut sender: Sender) {
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let Ok(mut idle) = pool.idle.lock() else {
                return;
            };
            let senders = idle.entry(address).or_default();
            if senders.len() < MAX_IDLE {
                senders.push((sender, Instant::now()));
            }
        });
    }

    /// Idle connections now, over every peer.
    pub fn idle(&self) -> usize {
        self.idle
            .lock()
            .map(|idle| idle.values().map(Vec::len).sum())
            .unwrap_or(0)
    }
}
