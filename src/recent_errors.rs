//! A bounded ring of recent errors (refused handshakes, unreachable backends, protocol
//! violations) for the admin dashboard, which shows operators *what* went wrong a moment ago
//! where the metrics only count it.
//!
//! Invariants:
//! - at most [`CAPACITY`] entries are kept; recording the next one drops the oldest, so a
//!   flood of failures costs a fixed amount of memory;
//! - one `RecentErrors` lives as long as the process and is shared by every configuration
//!   generation, like the metrics, so a reload does not wipe the history;
//! - every entry has a sequence number, increasing by one per recorded error, so a reader
//!   can tell how many were dropped between two looks;
//! - details are built by the gateway from fixed phrases and configuration names, plus the
//!   client address; client-supplied text (paths, headers) is never copied in.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

/// Entries kept. Enough for a screen of context; small enough to copy once a second.
pub const CAPACITY: usize = 64;

/// What kind of failure an entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// An upgrade refused before the 101 (bad request, no route, limits, ...).
    Handshake,
    /// A client answered by the gateway itself before any routing: a head too slow or too
    /// large, a malformed request, an address over its limit, a failed TLS handshake.
    Refused,
    /// The backend could not be reached or did not complete its handshake in time.
    BackendConnect,
    /// A hop broke RFC 6455 (close 1002, 1007 or 1009 sent to it).
    Protocol,
    /// A hop broke a policy (close 1008: message rate).
    Policy,
    /// A backend dropped TCP without a closing handshake (1014 to the client).
    BackendDropped,
    /// A hop did not answer keepalive pings.
    PingTimeout,
    /// A request refused by a route's `auth` (no token, an invalid one, a missing claim).
    Auth,
}

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Handshake => "handshake",
            ErrorKind::Refused => "refused",
            ErrorKind::BackendConnect => "backend_connect",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Policy => "policy",
            ErrorKind::BackendDropped => "backend_dropped",
            ErrorKind::PingTimeout => "ping_timeout",
            ErrorKind::Auth => "auth",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorEntry {
    pub seq: u64,
    pub at: SystemTime,
    pub kind: ErrorKind,
    /// The route, when one was chosen.
    pub route: Option<String>,
    /// The backend URL, when one was chosen.
    pub backend: Option<String>,
    pub detail: String,
}

#[derive(Debug, Default)]
pub struct RecentErrors {
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    entries: VecDeque<ErrorEntry>,
    next_seq: u64,
}

impl RecentErrors {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one error now. Takes a short lock: called on failure paths only, never per
    /// frame.
    pub fn record(
        &self,
        kind: ErrorKind,
        route: Option<&str>,
        backend: Option<&str>,
        detail: impl Into<String>,
    ) {
        self.record_at(SystemTime::now(), kind, route, backend, detail.into());
    }

    fn record_at(
        &self,
        at: SystemTime,
        kind: ErrorKind,
        route: Option<&str>,
        backend: Option<&str>,
        detail: String,
    ) {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        if ring.entries.len() == CAPACITY {
            ring.entries.pop_front();
        }
        let seq = ring.next_seq;
        ring.next_seq += 1;
        ring.entries.push_back(ErrorEntry {
            seq,
            at,
            kind,
            route: route.map(str::to_owned),
            backend: backend.map(str::to_owned),
            detail,
        });
    }

    /// The kept entries, newest first.
    pub fn newest_first(&self) -> Vec<ErrorEntry> {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.entries.iter().rev().cloned().collect()
    }

    /// How many errors were recorded since the process started, kept or not.
    pub fn total(&self) -> u64 {
        self.ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_entries_up_to_capacity() {
        let errors = RecentErrors::new();
        for n in 0..CAPACITY + 10 {
            errors.record(ErrorKind::Handshake, Some("r"), None, format!("e{n}"));
        }
        let kept = errors.newest_first();
        assert_eq!(kept.len(), CAPACITY);
        assert_eq!(kept[0].detail, format!("e{}", CAPACITY + 9));
        assert_eq!(kept[0].seq, (CAPACITY + 9) as u64);
        assert_eq!(kept[CAPACITY - 1].detail, "e10");
        assert_eq!(errors.total(), (CAPACITY + 10) as u64);
    }
}
