//! Room state shared by every connection of one room-service instance. No I/O: connections own
//! their sockets and exchange frames with the hub through per-connection queues, and events that
//! leave the instance (to the broker, to the history database) go into bounded [`Outlets`]
//! queues that background tasks drain.
//!
//! Invariants:
//! - a room changes only under its `DashMap` entry lock, and nothing awaits or touches another
//!   room while holding it. Every frame about a room (history, notices, messages, the sender's
//!   `sent` ack) is queued under that lock, so each member's queue holds a room's events in
//!   order, history before anything newer, and a `sent` ack is queued only after the message is
//!   in every other local member's queue. Events for the broker and the history writer are
//!   queued under the same lock, so they leave in the room's order too;
//! - a connection's replies to its own requests (history, `sent`, its own `left`) go into a
//!   queue slot it reserved before asking, so a client that sends faster than it reads is slowed
//!   down, not dropped;
//! - frames caused by others never wait: a member whose queue is full is dropped from the room,
//!   its connection is told to close with 1008, and the others get a `left` notice. One slow
//!   reader cannot stall a room. The outlets never wait either: an event they have no room for
//!   is counted as lost (see [`Stats`]), and local members still get it;
//! - an event reaches a local member once: the hub queues it for local members when it happens
//!   and publishes it with this process's origin, and [`Hub::deliver_remote`] is only called for
//!   events of other origins;
//! - a room left empty keeps its history and `seq` counter, so someone rejoining sees the
//!   conversation. The room count is bounded by `max_rooms`: creating one more evicts the empty
//!   room that was active least recently. Rooms with members are never evicted, so the bound is
//!   exceeded only while more than `max_rooms` rooms are in use at once;
//! - with a history database, a room's history is replaced by the stored one once
//!   ([`Hub::seed`]) before it is replayed, merged with what arrived meanwhile; after a broker
//!   outage every room is marked unseeded again ([`Hub::unseed_all`]), since messages from other
//!   instances may have been missed.

use super::events::{ChatMessage, ServerEvent};
use super::stats::Stats;
use bytes::Bytes;
use dashmap::DashMap;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokio::sync::mpsc::Permit;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Notify, mpsc};

pub(crate) type ConnId = u64;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Messages replayed to a joiner.
    pub(crate) history: usize,
    /// Frames queued for one connection before it counts as too slow.
    pub(crate) queue: usize,
    /// Rooms kept, members or not (see the module invariants).
    pub(crate) max_rooms: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            history: 50,
            queue: 256,
            max_rooms: 10_000,
        }
    }
}

/// An event for the other instances: the frame as local members got it.
#[derive(Debug)]
pub(crate) struct Published {
    pub(crate) room: Arc<str>,
    pub(crate) frame: Bytes,
}

/// Where events leave this instance. Both queues are bounded and offered to without waiting.
#[derive(Debug, Default)]
pub(crate) struct Outlets {
    /// Every room event (messages, `joined`, `left`), for the broker.
    pub(crate) broker: Option<mpsc::Sender<Published>>,
    /// Messages posted here, for the history database.
    pub(crate) store: Option<mpsc::Sender<Arc<ChatMessage>>>,
}

/// An event from another instance, already checked by the broker.
#[derive(Debug)]
pub(crate) enum Remote {
    /// A chat message (kept in history) and its frame.
    Message(Arc<ChatMessage>, Bytes),
    /// A `joined` or `left` notice.
    Notice(Bytes),
}

/// What a connection's writer sends, in queue order.
#[derive(Debug)]
pub(crate) enum Outbound {
    Text(Bytes),
    Pong(Bytes),
    /// Sent last: the writer stops after it.
    Close(u16, &'static str),
}

/// The hub's handle on one connection.
#[derive(Clone, Debug)]
pub(crate) struct Peer {
    pub(crate) id: ConnId,
    tx: mpsc::Sender<Outbound>,
    kick: Arc<Notify>,
}

impl Peer {
    /// Queues a frame the connection itself produced (errors, pongs); waits while the queue is
    /// full, which only slows down this connection's own reading. `false` once the writer is gone.
    pub(crate) async fn send(&self, out: Outbound) -> bool {
        self.tx.send(out).await.is_ok()
    }

    /// A queue slot for the hub's reply to a request; `None` once the writer is gone.
    pub(crate) async fn reserve(&self) -> Option<Permit<'_, Outbound>> {
        self.tx.reserve().await.ok()
    }

    /// Queues a frame if there is room, never waiting; a best effort for final close frames.
    pub(crate) fn try_send(&self, out: Outbound) {
        let _ = self.tx.try_send(out);
    }

    /// Queues a room frame without waiting; on a full queue, tells the connection to close and
    /// returns `false` (the caller removes the member).
    fn offer(&self, frame: &Bytes) -> bool {
        match self.tx.try_send(Outbound::Text(frame.clone())) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.kick.notify_one();
                false
            }
            // The connection is shutting down and leaves its rooms by itself.
            Err(TrySendError::Closed(_)) => true,
        }
    }
}

/// The connection's end of its queue.
#[derive(Debug)]
pub(crate) struct Mailbox {
    pub(crate) rx: mpsc::Receiver<Outbound>,
    /// Notified when a room dropped the connection for being too slow.
    pub(crate) kick: Arc<Notify>,
}

struct Member {
    peer: Peer,
    user: Arc<str>,
}

struct Room {
    name: Arc<str>,
    members: HashMap<ConnId, Member>,
    history: VecDeque<Arc<ChatMessage>>,
    next_seq: u64,
    last_active: Instant,
    /// The history came from the database (see the module invariants).
    seeded: bool,
}

impl Room {
    fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            members: HashMap::new(),
            history: VecDeque::new(),
            next_seq: 1,
            last_active: Instant::now(),
            seeded: false,
        }
    }

    /// Queues `frame` for every member except `except`. Members too slow to take it are
    /// removed, and their `left` notices are broadcast in turn (which may drop more); those
    /// notices are returned, in order, for the other instances.
    #[must_use]
    fn broadcast(&mut self, server: &str, frame: Bytes, except: Option<ConnId>) -> Vec<Bytes> {
        let mut notices = Vec::new();
        // Notices about dropped members go to everyone, `except` included.
        let mut pending = vec![(frame, except)];
        while let Some((frame, except)) = pending.pop() {
            let slow: Vec<ConnId> = self
                .members
                .iter()
                .filter(|(id, _)| Some(**id) != except)
                .filter(|(_, member)| !member.peer.offer(&frame))
                .map(|(id, _)| *id)
                .collect();
            for id in slow {
                if let Some(member) = self.members.remove(&id) {
                    tracing::debug!(room = %self.name, user = %member.user, "dropping a member too slow to keep up");
                    let notice = self.left(server, &member.user);
                    notices.push(notice.clone());
                    pending.push((notice, None));
                }
            }
        }
        notices
    }

    fn remember(&mut self, message: Arc<ChatMessage>, limit: usize) {
        if limit == 0 {
            return;
        }
        if self.history.len() >= limit {
            self.history.pop_front();
        }
        self.history.push_back(message);
    }

    fn left(&self, server: &str, user: &str) -> Bytes {
        ServerEvent::Left {
            room: &self.name,
            user,
            server,
        }
        .encode()
    }
}

/// Why a request about a room was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NotAMember;

#[derive(Debug)]
pub(crate) struct Hub {
    server: Arc<str>,
    /// This process's origin: see [`ChatMessage::origin`].
    origin: u64,
    limits: Limits,
    rooms: DashMap<Arc<str>, Room>,
    next_id: AtomicU64,
    outlets: Outlets,
    stats: Arc<Stats>,
}

/// Summarised, so logging a hub does not print every queue.
impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Room")
            .field("name", &self.name)
            .field("members", &self.members.len())
            .field("history", &self.history.len())
            .finish()
    }
}

impl Hub {
    #[cfg(test)]
    pub(crate) fn new(server: &str, limits: Limits) -> Self {
        Self::with_outlets(server, 1, limits, Outlets::default(), Arc::default())
    }

    pub(crate) fn with_outlets(
        server: &str,
        origin: u64,
        limits: Limits,
        outlets: Outlets,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            server: server.into(),
            origin,
            limits,
            rooms: DashMap::new(),
            next_id: AtomicU64::new(1),
            outlets,
            stats,
        }
    }

    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    pub(crate) fn origin(&self) -> u64 {
        self.origin
    }

    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    pub(crate) fn stats(&self) -> &Stats {
        &self.stats
    }

    pub(crate) fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Offers room events to the broker, never waiting; what it cannot take is counted lost.
    fn publish(&self, room: &Arc<str>, frames: impl IntoIterator<Item = Bytes>) {
        let Some(broker) = &self.outlets.broker else {
            return;
        };
        for frame in frames {
            let event = Published {
                room: Arc::clone(room),
                frame,
            };
            if broker.try_send(event).is_err() {
                Stats::add(&self.stats.broker_lost, 1);
            }
        }
    }

    /// Queues `frame` for the local members but `except`, and publishes it with whatever
    /// `left` notices that caused.
    fn spread(&self, room: &mut Room, frame: Bytes, except: Option<ConnId>) {
        let notices = room.broadcast(&self.server, frame.clone(), except);
        self.publish(&room.name, std::iter::once(frame).chain(notices));
    }

    /// Whether `room`'s history must be read from the database before someone joins it.
    pub(crate) fn needs_history(&self, room: &str) -> bool {
        self.outlets.store.is_some() && self.rooms.get(room).is_none_or(|room| !room.seeded)
    }

    /// Replaces `room`'s history with `stored` (oldest first) unless another joiner did so
    /// already; messages that arrived since the read and are not in it are kept after it.
    pub(crate) fn seed(&self, room: &str, stored: Vec<ChatMessage>) {
        if !self.rooms.contains_key(room) {
            self.evict_for_one_more();
        }
        let mut room = self
            .rooms
            .entry(Arc::from(room))
            .or_insert_with(|| Room::new(room));
        if room.seeded {
            return;
        }
        let mut history: VecDeque<Arc<ChatMessage>> = stored.into_iter().map(Arc::new).collect();
        let newer: Vec<_> = room
            .history
            .drain(..)
            .filter(|m| {
                !history
                    .iter()
                    .any(|s| s.origin == m.origin && s.seq == m.seq)
            })
            .collect();
        history.extend(newer);
        while history.len() > self.limits.history {
            history.pop_front();
        }
        room.history = history;
        room.seeded = true;
    }

    /// Marks every room's history as possibly incomplete, so the next join reads it again.
    pub(crate) fn unseed_all(&self) {
        for mut room in self.rooms.iter_mut() {
            room.seeded = false;
        }
    }

    /// Delivers an event from another instance to `room`'s local members. Rooms nobody joined
    /// here are not created: their history, when someone joins, comes from the database.
    pub(crate) fn deliver_remote(&self, room: &str, event: Remote) {
        let Some(mut room) = self.rooms.get_mut(room) else {
            return;
        };
        let frame = match event {
            Remote::Message(message, frame) => {
                room.last_active = Instant::now();
                room.remember(message, self.limits.history);
                frame
            }
            Remote::Notice(frame) => frame,
        };
        let notices = room.broadcast(&self.server, frame, None);
        self.publish(&room.name, notices);
    }

    /// A new connection's queue, not yet in any room.
    pub(crate) fn connect(&self) -> (Peer, Mailbox) {
        let (tx, rx) = mpsc::channel(self.limits.queue);
        let kick = Arc::new(Notify::new());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let peer = Peer {
            id,
            tx,
            kick: Arc::clone(&kick),
        };
        (peer, Mailbox { rx, kick })
    }

    /// Adds `peer` to `room` as `user` (or renames it there if it is a member already), replies
    /// with the room's history and, for a new member, queues a `joined` notice for the others.
    pub(crate) fn join(
        &self,
        peer: &Peer,
        reply: Permit<'_, Outbound>,
        room: &str,
        user: &Arc<str>,
    ) {
        if !self.rooms.contains_key(room) {
            self.evict_for_one_more();
        }
        let mut room = self
            .rooms
            .entry(Arc::from(room))
            .or_insert_with(|| Room::new(room));
        room.last_active = Instant::now();
        let new_member = match room.members.entry(peer.id) {
            Entry::Vacant(slot) => {
                slot.insert(Member {
                    peer: peer.clone(),
                    user: Arc::clone(user),
                });
                true
            }
            Entry::Occupied(mut slot) => {
                slot.get_mut().user = Arc::clone(user);
                false
            }
        };
        if new_member {
            let notice = ServerEvent::Joined {
                room: &room.name,
                user,
                server: &self.server,
            }
            .encode();
            self.spread(&mut room, notice, Some(peer.id));
        }
        let history = ServerEvent::History {
            room: &room.name,
            messages: room
                .history
                .iter()
                .map(|m| ServerEvent::Message(m))
                .collect(),
            server: &self.server,
        }
        .encode();
        reply.send(Outbound::Text(history));
    }

    /// Removes `id` from `room`; the others and the leaver get a `left` notice.
    pub(crate) fn leave(
        &self,
        id: ConnId,
        reply: Permit<'_, Outbound>,
        room: &str,
    ) -> Result<(), NotAMember> {
        let mut room = self.rooms.get_mut(room).ok_or(NotAMember)?;
        let member = room.members.remove(&id).ok_or(NotAMember)?;
        room.last_active = Instant::now();
        let notice = room.left(&self.server, &member.user);
        self.spread(&mut room, notice.clone(), None);
        reply.send(Outbound::Text(notice));
        Ok(())
    }

    /// Removes `id` from each of `rooms` without acknowledging: the connection is gone.
    pub(crate) fn disconnect<'a>(&self, id: ConnId, rooms: impl IntoIterator<Item = &'a str>) {
        for name in rooms {
            if let Some(mut room) = self.rooms.get_mut(name)
                && let Some(member) = room.members.remove(&id)
            {
                room.last_active = Instant::now();
                let notice = room.left(&self.server, &member.user);
                self.spread(&mut room, notice, None);
            }
        }
    }

    /// Changes the name `id` goes by in each of `rooms` it is a member of, without notices.
    pub(crate) fn rename<'a>(
        &self,
        id: ConnId,
        rooms: impl IntoIterator<Item = &'a str>,
        user: &Arc<str>,
    ) {
        for name in rooms {
            if let Some(mut room) = self.rooms.get_mut(name)
                && let Some(member) = room.members.get_mut(&id)
            {
                member.user = Arc::clone(user);
            }
        }
    }

    /// Records a message from member `id`, broadcasts it to the other members and acks it to
    /// the sender with `sent`. Returns its `seq`.
    pub(crate) fn post(
        &self,
        id: ConnId,
        reply: Permit<'_, Outbound>,
        room: &str,
        text: String,
    ) -> Result<u64, NotAMember> {
        let mut room = self.rooms.get_mut(room).ok_or(NotAMember)?;
        let user = Arc::clone(&room.members.get(&id).ok_or(NotAMember)?.user);
        let seq = room.next_seq;
        room.next_seq += 1;
        room.last_active = Instant::now();
        let message = Arc::new(ChatMessage {
            room: Arc::clone(&room.name),
            user,
            text,
            server: Arc::clone(&self.server),
            seq,
            origin: self.origin,
        });
        let frame = ServerEvent::Message(&message).encode();
        Stats::add(&self.stats.messages_posted, 1);
        if let Some(store) = &self.outlets.store {
            if store.try_send(Arc::clone(&message)).is_ok() {
                Stats::add(&self.stats.history_pending, 1);
            } else {
                Stats::add(&self.stats.history_lost, 1);
            }
        }
        room.remember(message, self.limits.history);
        self.spread(&mut room, frame, Some(id));
        let ack = ServerEvent::Sent {
            room: &room.name,
            seq,
            server: &self.server,
        }
        .encode();
        reply.send(Outbound::Text(ack));
        Ok(seq)
    }

    /// Makes space for a new room by evicting the least recently active empty one, if the map
    /// is full. A linear scan, but only when the map is full and a new room is created.
    fn evict_for_one_more(&self) {
        if self.rooms.len() < self.limits.max_rooms {
            return;
        }
        let oldest = self
            .rooms
            .iter()
            .filter(|room| room.members.is_empty())
            .min_by_key(|room| room.last_active)
            .map(|room| Arc::clone(room.key()));
        if let Some(name) = oldest {
            // Someone may have joined it since the scan.
            self.rooms
                .remove_if(&name, |_, room| room.members.is_empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use serde_json::{Value, json};

    fn hub(limits: Limits) -> Hub {
        Hub::new("a", limits)
    }

    fn slot(peer: &Peer) -> Permit<'_, Outbound> {
        peer.tx.try_reserve().expect("a free queue slot")
    }

    fn drain(mailbox: &mut Mailbox) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(frame) = mailbox.rx.try_recv() {
            match frame {
                Outbound::Text(bytes) => out.push(serde_json::from_slice(&bytes).unwrap()),
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    fn types(events: &[Value]) -> Vec<&str> {
        events.iter().map(|e| e["type"].as_str().unwrap()).collect()
    }

    #[test]
    fn members_see_each_other_and_outsiders_see_nothing() {
        let hub = hub(Limits::default());
        let (alice, mut alice_box) = hub.connect();
        let (bob, mut bob_box) = hub.connect();
        let (carol, mut carol_box) = hub.connect();
        hub.join(&alice, slot(&alice), "r", &"alice".into());
        hub.join(&bob, slot(&bob), "r", &"bob".into());
        hub.join(&carol, slot(&carol), "other", &"carol".into());
        assert_eq!(types(&drain(&mut alice_box)), ["history", "joined"]);
        assert_eq!(types(&drain(&mut bob_box)), ["history"]);

        assert_eq!(hub.post(alice.id, slot(&alice), "r", "hi".into()), Ok(1));
        assert_eq!(
            drain(&mut alice_box),
            [json!({"type": "sent", "room": "r", "seq": 1, "server": "a"})]
        );
        assert_eq!(
            drain(&mut bob_box),
            [
                json!({"type": "message", "room": "r", "user": "alice", "text": "hi", "server": "a", "seq": 1})
            ]
        );
        assert_eq!(types(&drain(&mut carol_box)), ["history"]);
        assert_eq!(
            hub.post(carol.id, slot(&carol), "r", "x".into()),
            Err(NotAMember)
        );
    }

    #[test]
    fn history_keeps_the_latest_messages_and_outlives_the_members() {
        let hub = hub(Limits {
            history: 3,
            ..Limits::default()
        });
        let (alice, _alice_box) = hub.connect();
        hub.join(&alice, slot(&alice), "r", &"alice".into());
        for i in 0..5 {
            hub.post(alice.id, slot(&alice), "r", format!("m{i}"))
                .unwrap();
        }
        hub.disconnect(alice.id, ["r"]);
        let (bob, mut bob_box) = hub.connect();
        hub.join(&bob, slot(&bob), "r", &"bob".into());
        let events = drain(&mut bob_box);
        let texts: Vec<_> = events[0]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["text"].as_str().unwrap())
            .collect();
        assert_eq!(texts, ["m2", "m3", "m4"]);
        assert_eq!(hub.post(bob.id, slot(&bob), "r", "next".into()), Ok(6));
    }

    #[test]
    fn a_full_queue_drops_the_member_not_the_room() {
        let hub = hub(Limits {
            queue: 4,
            ..Limits::default()
        });
        let (alice, mut alice_box) = hub.connect();
        let (slow, slow_box) = hub.connect();
        hub.join(&slow, slot(&slow), "r", &"slow".into());
        hub.join(&alice, slot(&alice), "r", &"alice".into());
        let mut seen = drain(&mut alice_box);
        for i in 0..10 {
            // Alice keeps reading; the slow member never does.
            hub.post(alice.id, slot(&alice), "r", format!("m{i}"))
                .unwrap();
            seen.extend(drain(&mut alice_box));
        }
        let left: Vec<_> = seen.iter().filter(|e| e["type"] == "left").collect();
        assert_eq!(
            left,
            [&json!({"type": "left", "room": "r", "user": "slow", "server": "a"})]
        );
        assert_eq!(seen.iter().filter(|e| e["type"] == "sent").count(), 10);
        assert!(
            slow_box.kick.notified().now_or_never().is_some(),
            "the slow member was told to close"
        );
        assert!(!hub.rooms.get("r").unwrap().members.contains_key(&slow.id));
    }

    #[test]
    fn leaving_notifies_everyone_including_the_leaver() {
        let hub = hub(Limits::default());
        let (alice, mut alice_box) = hub.connect();
        let (bob, mut bob_box) = hub.connect();
        hub.join(&alice, slot(&alice), "r", &"alice".into());
        hub.join(&bob, slot(&bob), "r", &"bob".into());
        drain(&mut alice_box);
        drain(&mut bob_box);
        hub.leave(bob.id, slot(&bob), "r").unwrap();
        let notice = json!({"type": "left", "room": "r", "user": "bob", "server": "a"});
        assert_eq!(drain(&mut alice_box), vec![notice.clone()]);
        assert_eq!(drain(&mut bob_box), vec![notice]);
        assert_eq!(hub.leave(bob.id, slot(&bob), "r"), Err(NotAMember));
    }

    fn outlets(
        broker: usize,
        store: usize,
    ) -> (
        Outlets,
        mpsc::Receiver<Published>,
        mpsc::Receiver<Arc<ChatMessage>>,
    ) {
        let (broker_tx, broker_rx) = mpsc::channel(broker);
        let (store_tx, store_rx) = mpsc::channel(store);
        let outlets = Outlets {
            broker: Some(broker_tx),
            store: Some(store_tx),
        };
        (outlets, broker_rx, store_rx)
    }

    fn published(rx: &mut mpsc::Receiver<Published>) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        while let Ok(event) = rx.try_recv() {
            out.push((
                event.room.to_string(),
                serde_json::from_slice(&event.frame).unwrap(),
            ));
        }
        out
    }

    fn stored(text: &str, origin: u64, seq: u64) -> ChatMessage {
        ChatMessage {
            room: "r".into(),
            user: "u".into(),
            text: text.into(),
            server: "x".into(),
            seq,
            origin,
        }
    }

    #[test]
    fn room_events_leave_through_the_outlets_in_room_order() {
        let (outlets, mut broker, mut store) = outlets(16, 16);
        let hub = Hub::with_outlets("a", 7, Limits::default(), outlets, Arc::default());
        let (alice, _alice_box) = hub.connect();
        let (bob, _bob_box) = hub.connect();
        hub.join(&alice, slot(&alice), "r", &"alice".into());
        hub.join(&bob, slot(&bob), "r", &"bob".into());
        hub.post(alice.id, slot(&alice), "r", "hi".into()).unwrap();
        hub.leave(bob.id, slot(&bob), "r").unwrap();
        let kinds: Vec<_> = published(&mut broker)
            .into_iter()
            .map(|(room, event)| (room, event["type"].as_str().unwrap().to_owned()))
            .collect();
        let expected = [
            ("r", "joined"),
            ("r", "joined"),
            ("r", "message"),
            ("r", "left"),
        ];
        assert_eq!(kinds, expected.map(|(r, k)| (r.to_owned(), k.to_owned())));
        let message = store.try_recv().unwrap();
        assert_eq!(
            (message.text.as_str(), message.origin, message.seq),
            ("hi", 7, 1)
        );
        assert!(store.try_recv().is_err(), "notices are not history");
        assert_eq!(hub.stats().history_pending.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn full_outlets_count_losses_and_members_still_get_everything() {
        let (outlets, _broker, _store) = outlets(1, 1);
        let hub = Hub::with_outlets("a", 7, Limits::default(), outlets, Arc::default());
        let (alice, _alice_box) = hub.connect();
        let (bob, mut bob_box) = hub.connect();
        hub.join(&alice, slot(&alice), "r", &"alice".into());
        hub.join(&bob, slot(&bob), "r", &"bob".into());
        for i in 0..3 {
            hub.post(alice.id, slot(&alice), "r", format!("m{i}"))
                .unwrap();
        }
        let stats = hub.stats();
        // Four events after the first filled the broker's queue; two messages after the first.
        assert_eq!(stats.broker_lost.load(Ordering::Relaxed), 4);
        assert_eq!(stats.history_lost.load(Ordering::Relaxed), 2);
        let got = drain(&mut bob_box);
        assert_eq!(types(&got), ["history", "message", "message", "message"]);
    }

    #[test]
    fn remote_events_reach_local_members_and_history_but_create_no_rooms() {
        let hub = hub(Limits::default());
        let (alice, mut alice_box) = hub.connect();
        hub.join(&alice, slot(&alice), "r", &"alice".into());
        drain(&mut alice_box);
        let message = Arc::new(stored("from b", 9, 4));
        let frame = ServerEvent::Message(&message).encode();
        hub.deliver_remote("r", Remote::Message(message, frame));
        hub.deliver_remote("nowhere", Remote::Notice(Bytes::from_static(b"{}")));
        assert_eq!(types(&drain(&mut alice_box)), ["message"]);
        assert_eq!(hub.room_count(), 1);
        let (bob, mut bob_box) = hub.connect();
        hub.join(&bob, slot(&bob), "r", &"bob".into());
        let history = drain(&mut bob_box);
        assert_eq!(history[0]["messages"][0]["text"], "from b");
        // The remote message does not take a local seq.
        assert_eq!(hub.post(bob.id, slot(&bob), "r", "x".into()), Ok(1));
    }

    #[test]
    fn seeding_puts_stored_history_first_without_duplicates() {
        let (outlets, _broker, _store) = outlets(16, 16);
        let hub = Hub::with_outlets(
            "a",
            1,
            Limits {
                history: 3,
                ..Limits::default()
            },
            outlets,
            Arc::default(),
        );
        assert!(hub.needs_history("r"));
        let (alice, _alice_box) = hub.connect();
        // A message arrives between the read and the seed: once stored, once not yet.
        hub.join(&alice, slot(&alice), "r", &"alice".into());
        hub.post(alice.id, slot(&alice), "r", "live".into())
            .unwrap();
        hub.post(alice.id, slot(&alice), "r", "newer".into())
            .unwrap();
        hub.seed(
            "r",
            vec![
                stored("old1", 9, 1),
                stored("old2", 9, 2),
                stored("live", 1, 1),
            ],
        );
        assert!(!hub.needs_history("r"));
        // Seeded once: a second read that raced the first changes nothing.
        hub.seed("r", vec![stored("stale", 9, 9)]);
        let (bob, mut bob_box) = hub.connect();
        hub.join(&bob, slot(&bob), "r", &"bob".into());
        let texts: Vec<_> = drain(&mut bob_box)[0]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["text"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(texts, ["old2", "live", "newer"]);
        hub.unseed_all();
        assert!(hub.needs_history("r"));
        assert!(
            !Hub::new("b", Limits::default()).needs_history("r"),
            "no store"
        );
    }

    #[test]
    fn empty_rooms_are_evicted_least_recent_first_at_the_cap() {
        let hub = hub(Limits {
            max_rooms: 2,
            ..Limits::default()
        });
        let (alice, _alice_box) = hub.connect();
        hub.join(&alice, slot(&alice), "busy", &"alice".into());
        let (bob, _bob_box) = hub.connect();
        hub.join(&bob, slot(&bob), "idle", &"bob".into());
        hub.disconnect(bob.id, ["idle"]);
        hub.join(&bob, slot(&bob), "new", &"bob".into());
        assert_eq!(hub.room_count(), 2);
        assert!(hub.rooms.contains_key("busy"));
        assert!(!hub.rooms.contains_key("idle"));
        // Nothing is evictable: rooms in use are kept over the cap.
        hub.join(&bob, slot(&bob), "third", &"bob".into());
        assert_eq!(hub.room_count(), 3);
    }
}
