//! The gateway's drain: one value shared by every configuration generation and watched by
//! every connection, moving only forward through its phases.
//!
//! - [`Phase::Serving`]: normal service.
//! - [`Phase::Leaving`]: `/readyz` answers 503 so that load balancers stop sending new clients;
//!   everything is still accepted and served (`drain.readiness_delay`).
//! - [`Phase::Closing`]: the listeners are closed; each WebSocket connection and session ends
//!   with 1001 at its turn in the [`Spread`] (`drain.spread`), and plain HTTP connections
//!   close after their current request.
//!
//! Invariants:
//! - a room (route and sticky key) has one turn per spread: its members leave together, and
//!   their reconnections meet again on one instance;
//! - turns follow a low-discrepancy sequence (golden-ratio steps) over the spread, so every
//!   stretch of it holds its share of the rooms and unkeyed connections whatever their number
//!   (give or take one room's members), and no turn is past the spread's end;
//! - a later [`Drain::close`] (a second signal, an operator in a hurry) only brings turns
//!   forward: a [`Departure`] keeps the earliest turn it was given.

use crate::rebalance::Room;
use dashmap::DashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, Clone, Default)]
pub enum Phase {
    #[default]
    Serving,
    Leaving,
    Closing(Arc<Spread>),
}

/// When each connection closes, over `length` from `start`.
#[derive(Debug)]
pub struct Spread {
    start: Instant,
    length: Duration,
    next_turn: AtomicU64,
    rooms: DashMap<Room, Instant>,
}

/// The fractional part of the golden ratio: successive multiples of it, modulo 1, fill the unit
/// interval more evenly than random draws (each new point falls into one of the largest gaps).
const GOLDEN_STEP: f64 = 0.618_033_988_749_894_9;

impl Spread {
    fn new(start: Instant, length: Duration) -> Self {
        Self {
            start,
            length,
            next_turn: AtomicU64::new(0),
            rooms: DashMap::new(),
        }
    }

    /// The instant at which a connection of `room`, or one without a room, closes.
    pub fn turn(&self, room: Option<&Room>) -> Instant {
        match room {
            Some(room) => *self
                .rooms
                .entry(room.clone())
                .or_insert_with(|| self.take_turn()),
            None => self.take_turn(),
        }
    }

    fn take_turn(&self) -> Instant {
        let index = self.next_turn.fetch_add(1, Ordering::Relaxed);
        let fraction = (index as f64 * GOLDEN_STEP).fract();
        self.start + self.length.mul_f64(fraction)
    }

    /// When the last turn is due.
    pub fn end(&self) -> Instant {
        self.start + self.length
    }
}

#[derive(Debug, Default)]
pub struct Drain {
    phase: watch::Sender<Phase>,
}

impl Drain {
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    pub fn phase(&self) -> Phase {
        self.phase.borrow().clone()
    }

    /// Serving, not leaving: what `/readyz` reports.
    pub fn is_serving(&self) -> bool {
        matches!(*self.phase.borrow(), Phase::Serving)
    }

    pub fn is_closing(&self) -> bool {
        matches!(*self.phase.borrow(), Phase::Closing(_))
    }

    /// Starts the drain by leaving the load balancer's rotation; `false` if it had started.
    pub fn leave(&self) -> bool {
        self.phase.send_if_modified(|phase| match phase {
            Phase::Serving => {
                *phase = Phase::Leaving;
                true
            }
            Phase::Leaving | Phase::Closing(_) => false,
        })
    }

    /// Closes every connection within `spread` from now; when closing is under way already,
    /// only if that ends sooner than the spread in force.
    pub fn close(&self, spread: Duration) {
        let now = Instant::now();
        self.phase.send_if_modified(|phase| {
            if let Phase::Closing(current) = phase
                && current.end() <= now + spread
            {
                return false;
            }
            *phase = Phase::Closing(Arc::new(Spread::new(now, spread)));
            true
        });
    }
}

/// One connection's view of the drain: waits for its turn to close.
#[derive(Debug)]
pub struct Departure {
    phase: watch::Receiver<Phase>,
    turn: Option<Instant>,
}

impl Departure {
    pub fn new(drain: &Drain) -> Self {
        Self {
            phase: drain.subscribe(),
            turn: None,
        }
    }

    pub fn is_closing(&self) -> bool {
        matches!(*self.phase.borrow(), Phase::Closing(_))
    }

    /// Completes at the turn to close of this connection, of `room` if it has one; never if
    /// the drain is never closing. Cancel-safe: the turn, once given, is kept, so waiting
    /// again resumes the same wait. (The room is borrowed, not kept: an idle connection's
    /// memory holds this value.)
    pub async fn wait(&mut self, room: Option<&Room>) {
        // Nobody can ask for a drain any more (the gateway is gone): only a turn already
        // given is still waited for.
        let mut sender_gone = false;
        loop {
            let latest = match &*self.phase.borrow_and_update() {
                Phase::Closing(spread) => Some(spread.turn(room)),
                Phase::Serving | Phase::Leaving => None,
            };
            if let Some(latest) = latest {
                self.turn = Some(self.turn.map_or(latest, |turn| turn.min(latest)));
            }
            if self.turn.is_some_and(|turn| turn <= Instant::now()) {
                return;
            }
            // Boxed: a connection's future carries a timer only while it is closing. One
            // await point, so the future stores one set of locals.
            let mut sleep = self
                .turn
                .map(|turn| Box::pin(tokio::time::sleep_until(turn)));
            let due = async {
                match sleep.as_mut() {
                    Some(sleep) => sleep.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = due => return,
                changed = self.phase.changed(), if !sender_gone => sender_gone = changed.is_err(),
            }
        }
    }
}

/// [`Departure::wait`] for a connection that waits once (a relay's stop): until the drain
/// closes, the future holds only the watch; the turn's state is boxed from then on. An idle
/// connection's memory is mostly its future, so this keeps the drain out of it.
pub async fn depart(mut phase: watch::Receiver<Phase>, room: Option<&Room>) {
    let closing = phase
        .wait_for(|phase| matches!(phase, Phase::Closing(_)))
        .await
        .is_ok();
    if !closing {
        // Nobody can ask for a drain any more.
        return std::future::pending().await;
    }
    let mut departure = Departure { phase, turn: None };
    Box::pin(async move { departure.wait(room).await }).await;
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

    #[tokio::test(start_paused = true)]
    async fn turns_are_even_over_the_spread_and_a_room_leaves_at_one_instant() {
        let drain = Drain::default();
        assert!(drain.is_serving());
        assert!(drain.leave());
        assert!(!drain.leave(), "once");
        assert!(!drain.is_serving() && !drain.is_closing());
        let spread = Duration::from_secs(10);
        drain.close(spread);
        let Phase::Closing(plan) = drain.phase() else {
            panic!("closing");
        };
        let start = plan.start;
        // 1,000 singles and 100 rooms: each tenth of the spread holds its share.
        let mut per_second = [0usize; 10];
        for _ in 0..1000 {
            let at = plan.turn(None) - start;
            per_second[(at.as_secs_f64() as usize).min(9)] += 1;
        }
        for i in 0..100 {
            let first = plan.turn(Some(&room(&i.to_string())));
            assert_eq!(first, plan.turn(Some(&room(&i.to_string()))), "one instant");
            assert!(first < plan.end());
        }
        for count in per_second {
            assert!((95..=105).contains(&count), "uneven: {per_second:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_departure_waits_for_its_turn_and_a_hurry_brings_it_forward() {
        let drain = Drain::default();
        let mut first = Departure::new(&drain);
        let mut second = Departure::new(&drain);
        drain.leave();
        // Leaving is not closing: nobody departs.
        let waited = tokio::time::timeout(Duration::from_secs(60), first.wait(None)).await;
        assert!(waited.is_err());
        let closing = Instant::now();
        drain.close(Duration::from_secs(100));
        // Turns are taken in order: 0 and 0.618 of the spread.
        first.wait(None).await;
        assert_eq!(Instant::now(), closing);
        let waited = tokio::time::timeout(Duration::from_secs(10), second.wait(None)).await;
        assert!(waited.is_err(), "61.8 s is not due at 10 s");
        // A hurry: the turn kept from the wait above comes forward to now.
        drain.close(Duration::ZERO);
        second.wait(None).await;
        assert_eq!(Instant::now() - closing, Duration::from_secs(10));
        // A longer spread never delays anyone.
        drain.close(Duration::from_secs(1000));
        assert!(matches!(drain.phase(), Phase::Closing(plan) if plan.length.is_zero()));
        assert!(first.is_closing());
    }
}
