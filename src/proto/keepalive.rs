//! Keepalive for one WebSocket hop, sans I/O: after `interval` without a byte from the peer
//! it is pinged, and a peer whose pong does not come within `pong_timeout` is unresponsive.
//!
//! Every hop the gateway holds uses this one policy: both hops of a relayed connection, a
//! session's backend connection and a session client's WebSocket. Invariants: at most one
//! ping is outstanding; only a pong answers it (bytes that arrive meanwhile prove the peer
//! sends, not that it reads); without an interval nothing is ever due.

use std::time::{Duration, Instant};

/// The payload of the gateway's pings: the peer needs nothing from it, and a fixed tag makes
/// them recognisable in captures.
pub const PING_PAYLOAD: &[u8] = b"wsgate";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the peer to fall silent for an interval.
    Listening { last_heard: Instant },
    /// A ping is out; the peer has until `deadline` to answer it.
    AwaitingPong { deadline: Instant },
    /// The peer did not answer: nothing more is due.
    Unresponsive,
}

/// What the hop's driver must do when [`Keepalive::on_timeout`] fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepaliveDue {
    /// Send a ping (with [`PING_PAYLOAD`]).
    Ping,
    /// The peer did not answer the ping in time: it is gone.
    Unresponsive,
}

#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    interval: Option<Duration>,
    pong_timeout: Duration,
    state: State,
}

impl Keepalive {
    pub fn new(interval: Option<Duration>, pong_timeout: Duration, now: Instant) -> Self {
        Self {
            interval,
            pong_timeout,
            state: State::Listening { last_heard: now },
        }
    }

    /// Bytes arrived from the peer.
    pub fn on_heard(&mut self, now: Instant) {
        if let State::Listening { last_heard } = &mut self.state {
            *last_heard = now;
        }
    }

    /// A pong arrived: the outstanding ping (if any) is answered.
    pub fn on_pong(&mut self, now: Instant) {
        if matches!(self.state, State::AwaitingPong { .. }) {
            self.state = State::Listening { last_heard: now };
        }
    }

    /// Starts over as if the peer had just been heard: for a driver that stopped reading
    /// from the peer for a while (an answer may be waiting unread, so silence proves nothing).
    pub fn restart(&mut self, now: Instant) {
        self.state = State::Listening { last_heard: now };
    }

    pub fn awaiting_pong(&self) -> bool {
        matches!(self.state, State::AwaitingPong { .. })
    }

    /// When [`Keepalive::on_timeout`] has something to do next. The silence deadline moves on
    /// every read; a driver may fire at an older value and simply poll again.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Listening { last_heard } => self.interval.map(|interval| last_heard + interval),
            State::AwaitingPong { deadline } => Some(deadline),
            State::Unresponsive => None,
        }
    }

    pub fn on_timeout(&mut self, now: Instant) -> Option<KeepaliveDue> {
        match self.state {
            State::Listening { last_heard } => {
                let interval = self.interval?;
                if now < last_heard + interval {
                    return None;
                }
                self.state = State::AwaitingPong {
                    deadline: now + self.pong_timeout,
                };
                Some(KeepaliveDue::Ping)
            }
            State::AwaitingPong { deadline } if now >= deadline => {
                self.state = State::Unresponsive;
                Some(KeepaliveDue::Unresponsive)
            }
            State::AwaitingPong { .. } | State::Unresponsive => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn silent_peer_is_pinged_then_unresponsive() {
        let t0 = Instant::now();
        let mut keepalive = Keepalive::new(Some(10 * S), 2 * S, t0);
        assert_eq!(keepalive.poll_timeout(), Some(t0 + 10 * S));
        assert_eq!(keepalive.on_timeout(t0 + 9 * S), None);
        assert_eq!(keepalive.on_timeout(t0 + 10 * S), Some(KeepaliveDue::Ping));
        assert_eq!(keepalive.poll_timeout(), Some(t0 + 12 * S));
        // Data is not an answer: only a pong shows the peer reads.
        keepalive.on_heard(t0 + 11 * S);
        assert_eq!(keepalive.on_timeout(t0 + 11 * S), None);
        assert_eq!(
            keepalive.on_timeout(t0 + 12 * S),
            Some(KeepaliveDue::Unresponsive)
        );
        assert_eq!(keepalive.poll_timeout(), None);
        assert_eq!(keepalive.on_timeout(t0 + 100 * S), None);
    }

    #[test]
    fn traffic_postpones_the_ping_and_a_pong_answers_it() {
        let t0 = Instant::now();
        let mut keepalive = Keepalive::new(Some(10 * S), 2 * S, t0);
        keepalive.on_heard(t0 + 5 * S);
        assert_eq!(keepalive.on_timeout(t0 + 10 * S), None);
        assert_eq!(keepalive.poll_timeout(), Some(t0 + 15 * S));
        assert_eq!(keepalive.on_timeout(t0 + 15 * S), Some(KeepaliveDue::Ping));
        keepalive.on_pong(t0 + 16 * S);
        assert!(!keepalive.awaiting_pong());
        assert_eq!(keepalive.poll_timeout(), Some(t0 + 26 * S));
    }

    #[test]
    fn without_an_interval_nothing_is_due() {
        let t0 = Instant::now();
        let mut keepalive = Keepalive::new(None, 2 * S, t0);
        assert_eq!(keepalive.poll_timeout(), None);
        assert_eq!(keepalive.on_timeout(t0 + 1000 * S), None);
    }
}
