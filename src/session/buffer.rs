//! A session's backend-to-client stream: events numbered from 1, kept until the client
//! acknowledges them, so an answer lost in flight is sent again. Free of I/O and clocks.
//!
//! Invariants:
//! - `events` holds exactly the events numbered `acked + 1 ..= last`, in order;
//! - `bytes` is the sum of their costs; an event is refused only when the buffer is over its
//!   limit already, so one event larger than the whole limit still passes (alone);
//! - after a `Close` event nothing more is accepted.

use super::protocol::Event;
use std::collections::VecDeque;

#[derive(Debug)]
pub struct Downstream {
    events: VecDeque<Event>,
    /// The highest number the client acknowledged; everything up to it is dropped.
    acked: u64,
    bytes: u64,
    limit: u64,
    closed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("acknowledged {ack}, but only {last} events were sent")]
pub struct AckBeyondSent {
    pub ack: u64,
    pub last: u64,
}

impl Downstream {
    pub fn new(limit: u64) -> Self {
        Self {
            events: VecDeque::new(),
            acked: 0,
            bytes: 0,
            limit,
            closed: false,
        }
    }

    /// The number of the newest event (0 before the first).
    pub fn last(&self) -> u64 {
        self.acked + self.events.len() as u64
    }

    #[cfg(test)]
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Whether the backend must wait before more is read from it.
    pub fn is_full(&self) -> bool {
        self.bytes >= self.limit
    }

    pub fn buffered_bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends an event and returns its number. The caller checks [`Self::is_full`] first;
    /// a close is always accepted (it ends the stream), anything after it is ignored.
    pub fn push(&mut self, event: Event) -> u64 {
        if self.closed {
            return self.last();
        }
        self.closed = matches!(event, Event::Close(_));
        self.bytes += event.cost();
        self.events.push_back(event);
        self.last()
    }

    /// Drops every event up to `ack`. An older acknowledgement than one seen before is a
    /// retry and changes nothing.
    pub fn ack(&mut self, ack: u64) -> Result<(), AckBeyondSent> {
        let last = self.last();
        if ack > last {
            return Err(AckBeyondSent { ack, last });
        }
        while self.acked < ack {
            if let Some(event) = self.events.pop_front() {
                self.bytes -= event.cost();
            }
            self.acked += 1;
        }
        Ok(())
    }

    /// The events after `after`, with their numbers, up to about `max_bytes` (always at
    /// least one when there is one).
    pub fn since(&self, after: u64, max_bytes: u64) -> impl Iterator<Item = (u64, &Event)> {
        let skip = after.saturating_sub(self.acked) as usize;
        let mut budget = max_bytes;
        let mut first = true;
        self.events
            .iter()
            .enumerate()
            .skip(skip)
            .take_while(move |(_, event)| {
                let cost = event.cost() + 32;
                let fits = first || cost <= budget;
                first = false;
                budget = budget.saturating_sub(cost);
                fits
            })
            .map(|(i, event)| (self.acked + i as u64 + 1, event))
    }

    /// Whether the client has acknowledged everything, the close included.
    pub fn is_finished(&self) -> bool {
        self.closed && self.events.is_empty()
    }
}

/// The client-to-backend direction: which client messages were delivered, so a retried batch
/// reaches the backend once.
#[derive(Debug, Default)]
pub struct Upstream {
    received: u64,
}

/// What to do with a client message numbered `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The next one: deliver it.
    Deliver,
    /// Delivered before (a retry): skip it.
    Duplicate,
    /// Messages before it are missing: refuse the batch.
    Gap { expected: u64 },
}

impl Upstream {
    pub fn received(&self) -> u64 {
        self.received
    }

    pub fn check(&self, seq: u64) -> Delivery {
        if seq <= self.received {
            Delivery::Duplicate
        } else if seq == self.received + 1 {
            Delivery::Deliver
        } else {
            Delivery::Gap {
                expected: self.received + 1,
            }
        }
    }

    /// Records that the `count` messages after `received` were delivered.
    pub fn delivered(&mut self, count: u64) {
        self.received += count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::protocol::{Close, Message};

    fn text(s: &str) -> Event {
        Event::Message(Message::Text(s.to_owned()))
    }

    fn numbers(down: &Downstream, after: u64, max: u64) -> Vec<u64> {
        down.since(after, max).map(|(seq, _)| seq).collect()
    }

    #[test]
    fn events_stay_until_acknowledged_and_a_retried_poll_sees_them_again() {
        let mut down = Downstream::new(1 << 20);
        for s in ["a", "b", "c"] {
            down.push(text(s));
        }
        assert_eq!(numbers(&down, 0, u64::MAX), [1, 2, 3]);
        // The answer to that poll was lost: the client polls again with the same ack.
        down.ack(0).unwrap();
        assert_eq!(numbers(&down, 0, u64::MAX), [1, 2, 3]);
        down.ack(2).unwrap();
        assert_eq!(numbers(&down, 2, u64::MAX), [3]);
        // A late retry of an older poll acknowledges nothing new and breaks nothing.
        down.ack(1).unwrap();
        assert_eq!(down.acked(), 2);
        assert_eq!(down.ack(4), Err(AckBeyondSent { ack: 4, last: 3 }));
        down.push(text("d"));
        assert_eq!(numbers(&down, 3, u64::MAX), [4]);
        assert_eq!(
            down.since(3, u64::MAX).next().map(|(_, e)| e.clone()),
            Some(text("d"))
        );
    }

    #[test]
    fn the_byte_count_follows_pushes_and_acks() {
        let mut down = Downstream::new(10);
        down.push(text("12345"));
        assert!(!down.is_full());
        down.push(text("123456"));
        assert!(down.is_full());
        assert_eq!(down.buffered_bytes(), 11);
        down.ack(1).unwrap();
        assert_eq!(down.buffered_bytes(), 6);
        assert!(!down.is_full());
    }

    #[test]
    fn answers_are_cut_by_size_but_never_empty() {
        let mut down = Downstream::new(1 << 20);
        for _ in 0..4 {
            down.push(text(&"x".repeat(100)));
        }
        assert_eq!(numbers(&down, 0, 10), [1]);
        assert_eq!(numbers(&down, 0, 300), [1, 2]);
        assert_eq!(numbers(&down, 1, 300), [2, 3]);
    }

    #[test]
    fn the_close_ends_the_stream() {
        let mut down = Downstream::new(1 << 20);
        down.push(text("a"));
        let close = Event::Close(Close {
            code: 1000,
            reason: "done".into(),
        });
        assert_eq!(down.push(close.clone()), 2);
        assert_eq!(down.push(text("late")), 2);
        assert!(!down.is_finished());
        down.ack(2).unwrap();
        assert!(down.is_finished());
    }

    proptest::proptest! {
        /// Against a model (every event ever pushed, and the ack): whatever the order of
        /// pushes, acks and re-polls, a poll after `a` answers exactly the events after `a`
        /// still held, numbered consecutively, and the byte count matches what is held.
        #[test]
        fn polls_match_a_model_of_every_event(ops in proptest::collection::vec((0u8..3, 0usize..40), 1..200)) {
            let mut down = Downstream::new(u64::MAX);
            let mut all: Vec<String> = Vec::new();
            let mut acked = 0u64;
            for (op, n) in ops {
                match op {
                    0 => {
                        let body = "x".repeat(n);
                        proptest::prop_assert_eq!(down.push(text(&body)), all.len() as u64 + 1);
                        all.push(body);
                    }
                    1 => {
                        let ack = (n as u64).min(all.len() as u64);
                        down.ack(ack).unwrap();
                        acked = acked.max(ack);
                    }
                    _ => {
                        let after = acked + (n as u64 % 3);
                        let got: Vec<(u64, Event)> = down
                            .since(after, u64::MAX)
                            .map(|(seq, e)| (seq, e.clone()))
                            .collect();
                        let want: Vec<(u64, Event)> = all
                            .iter()
                            .enumerate()
                            .skip(after as usize)
                            .map(|(i, t)| (i as u64 + 1, text(t)))
                            .collect();
                        proptest::prop_assert_eq!(got, want);
                    }
                }
                let held: u64 = all.iter().skip(acked as usize).map(|t| t.len() as u64).sum();
                proptest::prop_assert_eq!(down.buffered_bytes(), held);
            }
        }
    }

    #[test]
    fn client_messages_are_delivered_once_and_in_order() {
        let mut up = Upstream::default();
        assert_eq!(up.check(1), Delivery::Deliver);
        up.delivered(1);
        assert_eq!(up.check(1), Delivery::Duplicate);
        assert_eq!(up.check(3), Delivery::Gap { expected: 2 });
        assert_eq!(up.check(2), Delivery::Deliver);
    }
}
