//! One session: the buffered backend-to-client stream, delivery bookkeeping for the other
//! direction, and which client transport is attached.
//!
//! Invariants:
//! - only the backend task pushes events, and only [`Session::deliver`] hands client messages
//!   to it, one batch at a time (`upstream` is locked across the hand-over, so a retried batch
//!   racing its original cannot deliver a message twice);
//! - `epoch` grows each time a transport attaches; a transport whose epoch is no longer the
//!   current one has been replaced and must stop;
//! - `last_seen` is the last moment a transport was attached or a request was made: the
//!   session timeout counts from it while nothing is attached.

use super::buffer::{AckBeyondSent, Delivery, Downstream, Upstream};
use super::id::SessionId;
use super::protocol::{Close, Event, Message};
use crate::limits::TokenBucket;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

/// A client that has not been attached for this long is away: if the buffer fills meanwhile,
/// the session ends instead of holding the backend back for a client that may never return.
pub const AWAY_AFTER: Duration = Duration::from_secs(5);

/// What the backend task is asked to send.
#[derive(Debug)]
pub enum Outgoing {
    /// Consecutive client messages, written to the backend with one write.
    Messages(Vec<Message>),
    /// The client closed the session.
    Close(Close),
    /// The client sent faster than the route's `message_rate`: the session ends with 1008.
    RateExceeded,
}

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub poll_timeout: Duration,
    pub timeout: Duration,
    pub max_batch: u64,
}

/// What bounds one session: its timers, its buffer, and its clients' message rate.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timing: Timing,
    /// Unacknowledged event bytes kept.
    pub buffer: u64,
    /// The route's `message_rate` (messages per second from the client).
    pub message_rate: Option<u32>,
}

#[derive(Debug)]
pub struct Session {
    pub id: SessionId,
    /// The route's name: requests naming this session on another route are refused.
    pub route: String,
    /// The `Origin` the session was opened from, checked again on every request.
    pub origin: Option<String>,
    pub protocol: Option<String>,
    /// The subject of the token the session was opened with, on routes with `auth.jwt`.
    pub subject: Option<String>,
    pub timing: Timing,
    state: Mutex<State>,
    upstream: tokio::sync::Mutex<Upstream>,
    /// The route's `message_rate`, per session as it is per connection.
    rate: Option<Mutex<TokenBucket>>,
    to_backend: mpsc::Sender<Outgoing>,
    /// Woken when an event is pushed, a transport is replaced, or the session ends.
    pub changed: Notify,
    /// Woken when acknowledgements free buffer space.
    pub space: Notify,
}

#[derive(Debug)]
struct State {
    down: Downstream,
    attached: u32,
    epoch: u64,
    last_seen: Instant,
    /// The backend connection is gone: nothing more will be delivered to it.
    backend_gone: bool,
}

/// Why a batch of client messages was not (wholly) delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliverError {
    /// A message before the batch is missing; the client must resend from `expected`.
    Gap { expected: u64 },
    /// The backend connection ended; the session is over.
    Gone,
    /// Over the route's message rate; the session is being closed with 1008.
    RateExceeded,
}

/// A transport's hold on the session; detaches when dropped.
#[derive(Debug)]
pub struct Attachment {
    session: Arc<Session>,
    pub epoch: u64,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let mut state = self.session.lock();
        state.attached -= 1;
        state.last_seen = Instant::now();
    }
}

impl Session {
    pub fn new(
        id: SessionId,
        route: String,
        origin: Option<String>,
        protocol: Option<String>,
        limits: Limits,
        to_backend: mpsc::Sender<Outgoing>,
    ) -> Self {
        let Limits {
            timing,
            buffer,
            message_rate,
        } = limits;
        Self {
            id,
            route,
            origin,
            protocol,
            subject: None,
            timing,
            state: Mutex::new(State {
                down: Downstream::new(buffer),
                attached: 0,
                epoch: 0,
                last_seen: Instant::now(),
                backend_gone: false,
            }),
            upstream: tokio::sync::Mutex::new(Upstream::default()),
            // The relay's burst: two seconds' worth.
            rate: message_rate
                .map(|rate| Mutex::new(TokenBucket::new(rate, 2.0, Instant::now().into_std()))),
            to_backend,
            changed: Notify::new(),
            space: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain numbers and a queue, consistent after every statement that
        // could panic; a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches a transport, replacing (waking) any other.
    pub fn attach(self: &Arc<Self>) -> Attachment {
        let epoch = {
            let mut state = self.lock();
            state.attached += 1;
            state.epoch += 1;
            state.last_seen = Instant::now();
            state.epoch
        };
        self.changed.notify_waiters();
        Attachment {
            session: Arc::clone(self),
            epoch,
        }
    }

    pub fn is_current(&self, attachment: &Attachment) -> bool {
        self.lock().epoch == attachment.epoch
    }

    /// Counts a request as a sign of life.
    pub fn touch(&self) {
        self.lock().last_seen = Instant::now();
    }

    /// Drops the events the client has received.
    pub fn ack(&self, ack: u64) -> Result<(), AckBeyondSent> {
        let freed = {
            let mut state = self.lock();
            let before = state.down.buffered_bytes();
            state.down.ack(ack)?;
            state.down.buffered_bytes() < before
        };
        if freed {
            self.space.notify_one();
        }
        Ok(())
    }

    /// Calls `visit` with each event after `after`, cut at about `max_bytes`, while the buffer
    /// is locked: callers encode the events where they are instead of copying them out.
    pub fn visit_since(&self, after: u64, max_bytes: u64, mut visit: impl FnMut(u64, &Event)) {
        let state = self.lock();
        for (seq, event) in state.down.since(after, max_bytes) {
            visit(seq, event);
        }
    }

    /// Whether the client has acknowledged the final close.
    pub fn is_finished(&self) -> bool {
        self.lock().down.is_finished()
    }

    /// The number of the newest event.
    pub fn last_event(&self) -> u64 {
        self.lock().down.last()
    }

    /// Called by the backend task: appends a backend event and wakes the attached transport.
    pub fn push(&self, event: Event) {
        self.lock().down.push(event);
        self.changed.notify_waiters();
    }

    pub fn is_full(&self) -> bool {
        self.lock().down.is_full()
    }

    /// The backend is gone; pending and future deliveries fail.
    pub fn backend_gone(&self) {
        self.lock().backend_gone = true;
        self.changed.notify_waiters();
    }

    /// What the backend task should do about the client's absence, now.
    pub fn presence(&self, now: Instant) -> Presence {
        let state = self.lock();
        if state.down.is_finished() {
            return Presence::Finished;
        }
        if state.attached > 0 {
            return Presence::Attached;
        }
        let idle = now.saturating_duration_since(state.last_seen);
        if idle >= self.timing.timeout {
            Presence::Expired
        } else if idle >= AWAY_AFTER {
            Presence::Away
        } else {
            Presence::Between
        }
    }

    /// The highest client message number delivered to the backend.
    pub async fn received(&self) -> u64 {
        self.upstream.lock().await.received()
    }

    /// Delivers messages numbered `first`, `first + 1`, ... to the backend, skipping those
    /// delivered before; waits while the backend is slow to take them. Returns the highest
    /// number delivered.
    pub async fn deliver(&self, first: u64, messages: Vec<Message>) -> Result<u64, DeliverError> {
        let mut upstream = self.upstream.lock().await;
        let mut fresh = Vec::with_capacity(messages.len());
        for (offset, message) in messages.into_iter().enumerate() {
            // A batch is numbered consecutively: once one message is new, so are the rest.
            if fresh.is_empty() {
                match upstream.check(first + offset as u64) {
                    Delivery::Duplicate => continue,
                    Delivery::Gap { expected } => return Err(DeliverError::Gap { expected }),
                    Delivery::Deliver => {}
                }
            }
            fresh.push(message);
        }
        let admitted = fresh.iter().take_while(|_| self.admit_message()).count();
        let over_rate = admitted < fresh.len();
        fresh.truncate(admitted);
        if !fresh.is_empty() {
            if self.lock().backend_gone
                || self
                    .to_backend
                    .send(Outgoing::Messages(fresh))
                    .await
                    .is_err()
            {
                return Err(DeliverError::Gone);
            }
            upstream.delivered(admitted as u64);
        }
        if over_rate {
            let _ = self.to_backend.send(Outgoing::RateExceeded).await;
            return Err(DeliverError::RateExceeded);
        }
        Ok(upstream.received())
    }

    fn admit_message(&self) -> bool {
        let Some(rate) = &self.rate else {
            return true;
        };
        let mut bucket = rate.lock().unwrap_or_else(|p| p.into_inner());
        bucket.try_take(Instant::now().into_std())
    }

    /// Asks the backend task to close the backend connection with the client's code.
    pub async fn close(&self, close: Close) {
        let _ = self.to_backend.send(Outgoing::Close(close)).await;
    }
}

/// Where the client stands, for expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Attached,
    /// Not attached, but recently (a long-poll between two requests).
    Between,
    /// Not attached for [`AWAY_AFTER`].
    Away,
    /// Not attached for the session timeout: the session ends.
    Expired,
    /// The backend closed and the client acknowledged the close: the session is over.
    Finished,
}
