//! Counters of one room-service instance, read by `/stats` (JSON) and the live `/dashboard`.
//!
//! Plain relaxed atomics: each number is exact on its own, a snapshot is not a consistent cut
//! across them (nothing reads two counters expecting a relation between them).

use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Whether a backing service is configured and, if so, reachable right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Link {
    /// Not configured: in-process broker or in-memory history.
    Off,
    Up,
    Down,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Open chat WebSockets.
    pub(crate) connections: AtomicU64,
    /// Messages posted by this instance's clients.
    pub(crate) messages_posted: AtomicU64,
    /// Messages and notices of other instances received through the broker (delivered to the
    /// members of rooms this instance holds, ignored for the others).
    pub(crate) broker_received: AtomicU64,
    /// Events published to the broker.
    pub(crate) broker_published: AtomicU64,
    /// Events that never reached the broker: publish failures, or its queue was full.
    pub(crate) broker_lost: AtomicU64,
    /// Times the subscription was (re-)established.
    pub(crate) broker_subscriptions: AtomicU64,
    broker_configured: AtomicBool,
    broker_up: AtomicBool,
    /// Messages written to the history database.
    pub(crate) history_written: AtomicU64,
    /// Write attempts that failed (each is retried; see `history_lost`).
    pub(crate) history_write_failures: AtomicU64,
    /// Messages that will never be written: the write queue was full, or the service stopped
    /// with them still queued.
    pub(crate) history_lost: AtomicU64,
    /// Messages waiting to be written.
    pub(crate) history_pending: AtomicU64,
    /// History reads (on join) that failed, so the joiner got this instance's memory instead.
    pub(crate) history_read_failures: AtomicU64,
    history_configured: AtomicBool,
    history_up: AtomicBool,
}

/// What `/stats` and the dashboard show.
#[derive(Debug, Serialize)]
pub(crate) struct Snapshot<'a> {
    pub(crate) server: &'a str,
    pub(crate) rooms: usize,
    pub(crate) connections: u64,
    pub(crate) messages_posted: u64,
    pub(crate) broker: Link,
    pub(crate) broker_published: u64,
    pub(crate) broker_received: u64,
    pub(crate) broker_lost: u64,
    pub(crate) broker_subscriptions: u64,
    pub(crate) history: Link,
    pub(crate) history_written: u64,
    pub(crate) history_pending: u64,
    pub(crate) history_write_failures: u64,
    pub(crate) history_lost: u64,
    pub(crate) history_read_failures: u64,
}

fn link(configured: &AtomicBool, up: &AtomicBool) -> Link {
    match (
        configured.load(Ordering::Relaxed),
        up.load(Ordering::Relaxed),
    ) {
        (false, _) => Link::Off,
        (true, true) => Link::Up,
        (true, false) => Link::Down,
    }
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }

    pub(crate) fn broker_configured(&self) {
        self.broker_configured.store(true, Ordering::Relaxed);
    }

    /// Records the broker link's state; `true` if it changed, so the caller logs transitions
    /// only, not every failed attempt.
    pub(crate) fn set_broker_up(&self, up: bool) -> bool {
        self.broker_up.swap(up, Ordering::Relaxed) != up
    }

    pub(crate) fn history_configured(&self) {
        self.history_configured.store(true, Ordering::Relaxed);
    }

    /// As [`Stats::set_broker_up`], for the history database.
    pub(crate) fn set_history_up(&self, up: bool) -> bool {
        self.history_up.swap(up, Ordering::Relaxed) != up
    }

    pub(crate) fn snapshot<'a>(&self, server: &'a str, rooms: usize) -> Snapshot<'a> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            server,
            rooms,
            connections: get(&self.connections),
            messages_posted: get(&self.messages_posted),
            broker: link(&self.broker_configured, &self.broker_up),
            broker_published: get(&self.broker_published),
            broker_received: get(&self.broker_received),
            broker_lost: get(&self.broker_lost),
            broker_subscriptions: get(&self.broker_subscriptions),
            history: link(&self.history_configured, &self.history_up),
            history_written: get(&self.history_written),
            history_pending: get(&self.history_pending),
            history_write_failures: get(&self.history_write_failures),
            history_lost: get(&self.history_lost),
            history_read_failures: get(&self.history_read_failures),
        }
    }
}
