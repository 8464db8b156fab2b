//! Every relayed connection that has a sticky key, grouped by room (route name and key), with
//! the backend it is on and a signal that asks its relay to move it.
//!
//! Invariants:
//! - a connection is listed exactly while its [`Registration`] lives: registering returns it,
//!   dropping it (the relay ended) removes the entry, and an emptied room is removed too;
//! - one registry lives as long as the process and is shared by every configuration
//!   generation, so connections opened before a reload are found after it;
//! - no map guard escapes a method: every method is synchronous and returns owned values, so
//!   no shard lock is ever held across an `.await`;
//! - a connection is signalled at most once; the signal is a stored permit, so a signal sent
//!   before its relay starts waiting is not lost;
//! - a connection whose backend was picked before a plan's scan but registered after it
//!   (its handshake was under way) is not missed: its room is queued as *late* when a plan
//!   started since its [`Ticket`] was taken, or its configuration generation was replaced,
//!   and the rebalancer plans late rooms at its next look.

use crate::config::StickyKey;
use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::Notify;

/// A room: the connections of one sticky key on one route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Room {
    pub route: Arc<str>,
    pub key: Arc<str>,
}

/// One connection of a room, as the planner sees it.
#[derive(Debug, Clone)]
pub struct Member {
    pub backend: Arc<str>,
    /// How the route extracted the key when the connection opened; a route whose sticky
    /// setting changed since cannot say where this key belongs now.
    pub sticky: Arc<StickyKey>,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    member: Member,
    signal: Arc<Notify>,
    signalled: bool,
}

#[derive(Debug, Default)]
pub struct ConnectionRegistry {
    rooms: DashMap<Room, Vec<Entry>>,
    next_id: AtomicU64,
    /// Plans started so far (see [`Ticket`]).
    plans: AtomicU64,
    /// Rooms of connections that may have registered after a plan scanned the rooms.
    late: Mutex<Vec<Room>>,
}

/// Taken before a connection's backend is picked, handed to [`ConnectionRegistry::register`].
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    plans: u64,
}

/// A connection's place in the registry; dropping it removes the connection.
#[derive(Debug)]
#[must_use = "the connection is only registered while this lives"]
pub struct Registration {
    registry: Arc<ConnectionRegistry>,
    room: Room,
    id: u64,
    signal: Arc<Notify>,
}

impl Registration {
    pub fn room(&self) -> &Room {
        &self.room
    }

    /// Completes when the connection's key has moved to another backend and the connection
    /// should end so that its client reconnects there.
    pub async fn moved(&self) {
        self.signal.notified().await;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.remove(&self.room, self.id);
    }
}

impl ConnectionRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A ticket for a connection about to pick its backend.
    pub fn ticket(&self) -> Ticket {
        Ticket {
            plans: self.plans.load(Ordering::SeqCst),
        }
    }

    /// Marks the start of a plan, before it scans the rooms.
    pub fn begin_plan(&self) {
        self.plans.fetch_add(1, Ordering::SeqCst);
    }

    /// Lists a connection of `room` on `member.backend`. `superseded` says, once it is
    /// listed, whether the configuration generation that picked its backend has been
    /// replaced; then, or when a plan started since `ticket`, the room is queued as late.
    pub fn register(
        self: &Arc<Self>,
        room: Room,
        member: Member,
        ticket: Ticket,
        superseded: impl FnOnce() -> bool,
    ) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let signal = Arc::new(Notify::new());
        self.rooms.entry(room.clone()).or_default().push(Entry {
            id,
            member,
            signal: Arc::clone(&signal),
            signalled: false,
        });
        // After the insert: a plan that scans from now on sees this connection; one that
        // began before has moved the counter, and one about to begin after a reload follows
        // the generation switch, which `superseded` sees.
        if self.plans.load(Ordering::SeqCst) != ticket.plans || superseded() {
            self.late
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(room.clone());
        }
        Registration {
            registry: Arc::clone(self),
            room,
            id,
            signal,
        }
    }

    fn remove(&self, room: &Room, id: u64) {
        // `remove_if_mut` locks the shard once: the entry is taken out and, if that empties
        // the room, the room goes too, with no window for a concurrent register to be lost.
        self.rooms.remove_if_mut(room, |_, entries| {
            entries.retain(|entry| entry.id != id);
            entries.is_empty()
        });
    }

    /// The rooms queued as late since the last call, each once.
    pub fn take_late(&self) -> Vec<Room> {
        let mut late =
            std::mem::take(&mut *self.late.lock().unwrap_or_else(PoisonError::into_inner));
        late.sort_by(|a, b| (&a.route, &a.key).cmp(&(&b.route, &b.key)));
        late.dedup();
        late
    }

    /// The connections of `room` not yet signalled.
    pub fn members(&self, room: &Room) -> Vec<Member> {
        self.rooms
            .get(room)
            .map_or_else(Vec::new, |entries| unsignalled(&entries))
    }

    /// Every room with its connections not yet signalled.
    pub fn rooms(&self) -> Vec<(Room, Vec<Member>)> {
        self.rooms
            .iter()
            .map(|room| (room.key().clone(), unsignalled(room.value())))
            .collect()
    }

    /// Signals, all at once, every connection of `room` that `misplaced` says is on the wrong
    /// backend and was not signalled before. Returns how many were signalled.
    pub fn signal_misplaced(&self, room: &Room, misplaced: impl Fn(&Member) -> bool) -> usize {
        let Some(mut entries) = self.rooms.get_mut(room) else {
            return 0;
        };
        let mut count = 0;
        for entry in entries.iter_mut() {
            if !entry.signalled && misplaced(&entry.member) {
                entry.signalled = true;
                entry.signal.notify_one();
                count += 1;
            }
        }
        count
    }

    /// Connections listed.
    pub fn len(&self) -> usize {
        self.rooms.iter().map(|room| room.value().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

/// The members of a room's entries that have not been signalled yet.
fn unsignalled(entries: &[Entry]) -> Vec<Member> {
    entries
        .iter()
        .filter(|entry| !entry.signalled)
        .map(|entry| entry.member.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(key: &str) -> Room {
        Room {
            route: "r".into(),
            key: key.into(),
        }
    }

    fn member(backend: &str) -> Member {
        Member {
            backend: backend.into(),
            sticky: Arc::new(StickyKey::Query("room".into())),
        }
    }

    #[tokio::test]
    async fn registrations_list_signal_once_and_leave_on_drop() {
        let registry = Arc::new(ConnectionRegistry::new());
        let t = registry.ticket();
        let a1 = registry.register(room("a"), member("ws://x"), t, || false);
        let a2 = registry.register(room("a"), member("ws://y"), t, || false);
        let b = registry.register(room("b"), member("ws://x"), t, || false);
        assert!(registry.take_late().is_empty());
        assert_eq!(registry.len(), 3);
        let rooms = registry.rooms();
        assert_eq!(rooms.len(), 2);

        let on_x = |m: &Member| &*m.backend == "ws://x";
        assert_eq!(registry.signal_misplaced(&room("a"), on_x), 1);
        // The permit is stored: waiting after the signal still completes.
        tokio::time::timeout(std::time::Duration::from_secs(5), a1.moved())
            .await
            .expect("signalled");
        assert_eq!(registry.signal_misplaced(&room("a"), on_x), 0, "only once");
        let members: Vec<_> = registry
            .rooms()
            .into_iter()
            .find(|(r, _)| *r == room("a"))
            .unwrap()
            .1;
        assert_eq!(
            members.len(),
            1,
            "signalled connections are not planned again"
        );

        drop(a1);
        drop(a2);
        assert_eq!(registry.len(), 1);
        assert_eq!(registry.rooms().len(), 1, "an emptied room is removed");
        drop(b);
        assert!(registry.is_empty());
        assert_eq!(registry.signal_misplaced(&room("b"), on_x), 0);
    }

    #[test]
    fn registrations_racing_a_plan_are_queued_as_late() {
        let registry = Arc::new(ConnectionRegistry::new());
        let before = registry.ticket();
        registry.begin_plan();
        let _c = registry.register(room("c"), member("ws://x"), before, || false);
        let _d = registry.register(room("c"), member("ws://x"), before, || false);
        let _e = registry.register(room("e"), member("ws://x"), registry.ticket(), || true);
        let _f = registry.register(room("f"), member("ws://x"), registry.ticket(), || false);
        assert_eq!(registry.take_late(), [room("c"), room("e")]);
        assert!(registry.take_late().is_empty(), "each late room once");
        assert_eq!(registry.members(&room("c")).len(), 2);
        assert!(registry.members(&room("zz")).is_empty());
    }
}
