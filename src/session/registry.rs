//! Every open session, by id. One registry lives as long as the process: sessions opened
//! before a configuration reload stay reachable after it.

use super::state::Session;
use dashmap::DashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, Default)]
pub struct Registry {
    sessions: DashMap<String, Arc<Session>>,
    /// Sessions open or being opened; bounded by `sessions.max_sessions`.
    reserved: AtomicU32,
}

/// A place for one session, given back when dropped (held by the session's backend task).
#[derive(Debug)]
pub struct Reservation {
    registry: Arc<Registry>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.registry.reserved.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Registry {
    /// Takes a place if fewer than `max` sessions are open.
    pub fn reserve(self: &Arc<Self>, max: u32) -> Option<Reservation> {
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Reservation {
                registry: Arc::clone(self),
            })
    }

    pub fn insert(&self, session: Arc<Session>) {
        self.sessions
            .insert(session.id.as_str().to_owned(), session);
    }

    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.sessions.get(id).map(|entry| Arc::clone(entry.value()))
    }

    pub fn remove(&self, id: &str) {
        self.sessions.remove(id);
    }
}
