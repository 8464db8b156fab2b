//! Per-upstream backend choice: rendezvous for sticky keys, weighted least connections
//! otherwise, plus the live connection counts and health flags both depend on.
//!
//! Invariants:
//! - a backend's count is exactly the number of live [`ConnectionSlot`]s for it: slots are
//!   the only way to change it, incrementing on creation and decrementing on drop;
//! - every state change is a single atomic operation, so the balancer is shared through an
//!   `Arc` by every connection task without locks; decisions read counts that may be a moment
//!   stale, which only makes least connections approximate, never wrong;
//! - a backend is healthy (chosen for new connections) exactly when neither the active checks
//!   hold it down nor a passive back-off is in effect: two independent bits of one atomic, so
//!   the connection path reads health with one load and never locks;
//! - unhealthy backends are never chosen; with a key, the choice is the highest-ranked healthy
//!   backend, so a key goes back to its first choice as soon as that is healthy again;
//! - backend indices are indices into the slice the balancer was built from.
//!
//! The balancer only keeps health state; when to change it (probes, timers, logs) is decided by
//! `crate::health`, which is why nothing here reads a clock: times are handed in.

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use super::hash;
use crate::config::Backend;

/// Health bit: the active checks hold the backend down.
const CHECKS_DOWN: u8 = 1;
/// Health bit: a passive back-off is in effect after a failed connect.
const BACKOFF: u8 = 2;
/// Taken out by an operator (the admin API) until put back or a reload changes the backend.
const DRAINED: u8 = 4;

/// Live state for the backends of one upstream.
#[derive(Debug)]
pub struct UpstreamBalancer {
    backends: Box<[Backend]>,
    /// [`hash::backend_token`] of each backend, for sticky cookies.
    cookie_tokens: Box<[u64]>,
    /// Shared with the slots, which outlive any borrow of the balancer.
    active: Arc<[AtomicU32]>,
    /// Each backend's weight now: the configured one unless an operator changed it.
    weights: Box<[AtomicU32]>,
    health: Box<[BackendHealth]>,
    /// Where the next least-connections scan starts, so ties spread instead of piling onto
    /// the first backend (every backend ties at zero when traffic starts).
    next_start: AtomicUsize,
}

#[derive(Debug, Default)]
struct BackendHealth {
    /// [`CHECKS_DOWN`] | [`BACKOFF`] | [`DRAINED`]; zero is healthy.
    down: AtomicU8,
    /// Consecutive failed connects that started a back-off, since the last connect that
    /// worked: how many times the back-off has doubled, plus one.
    connect_failures: AtomicU32,
    /// When and why the health last changed. Written only on transitions, read only by
    /// reporting: never touched by the choice.
    last_change: Mutex<Option<(SystemTime, String)>>,
}

/// One live connection to a backend; dropping it releases the connection from the count.
#[derive(Debug)]
#[must_use = "the connection is only counted while the slot is alive"]
pub struct ConnectionSlot {
    active: Arc<[AtomicU32]>,
    backend: usize,
}

impl ConnectionSlot {
    /// The backend index this slot counts against.
    pub fn backend(&self) -> usize {
        self.backend
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.active[self.backend].fetch_sub(1, Ordering::Relaxed);
    }
}

/// The sticky-cookie value naming `backend`: 16 lowercase hex digits of its stable token (see
/// [`hash`]), the same on every gateway instance and version, and not revealing the address.
pub fn cookie_value(backend: &Backend) -> String {
    format!("{:016x}", hash::backend_token(&backend.url))
}

impl UpstreamBalancer {
    /// Every backend starts healthy with no connections.
    pub fn new(backends: &[Backend]) -> Self {
        UpstreamBalancer {
            backends: backends.into(),
            cookie_tokens: backends
                .iter()
                .map(|backend| hash::backend_token(&backend.url))
                .collect(),
            active: backends.iter().map(|_| AtomicU32::new(0)).collect(),
            weights: backends.iter().map(|b| AtomicU32::new(b.weight)).collect(),
            health: backends.iter().map(|_| BackendHealth::default()).collect(),
            next_start: AtomicUsize::new(0),
        }
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The backend for a new connection: with a sticky key, the highest-ranked healthy
    /// backend for it; without, the healthy backend with the fewest connections per unit of
    /// weight. `None` when no backend is healthy.
    pub fn choose(&self, key: Option<&str>) -> Option<usize> {
        self.choose_other(key, &[])
    }

    /// [`choose`](Self::choose) among the backends not in `tried`: for a key, its next choice
    /// in rendezvous order (where the key goes if the tried ones go down, so a retried
    /// connection lands where its room is about to move).
    pub fn choose_other(&self, key: Option<&str>, tried: &[usize]) -> Option<usize> {
        let available = |index: usize| self.is_healthy(index) && !tried.contains(&index);
        match key {
            Some(key) => {
                hash::pick_weighted(&self.backends, |index| self.weight(index), key, available)
            }
            None => self.least_connections(available),
        }
    }

    /// `backend`'s weight now.
    ///
    /// # Panics
    /// If `backend` is not an index into this balancer's backends.
    pub fn weight(&self, backend: usize) -> u32 {
        self.weights[backend].load(Ordering::Relaxed)
    }

    /// Sets `backend`'s weight (at least 1) on an operator's word; returns whether it changed.
    /// Keys move as they would after a reload with that weight.
    ///
    /// # Panics
    /// If `backend` is not an index into this balancer's backends.
    pub fn set_weight(&self, backend: usize, weight: u32) -> bool {
        self.weights[backend].swap(weight.max(1), Ordering::Relaxed) != weight.max(1)
    }

    /// [`choose`](Self::choose) and [`acquire`](Self::acquire) together, so the count goes up
    /// as soon as the choice is made.
    pub fn choose_and_acquire(&self, key: Option<&str>) -> Option<ConnectionSlot> {
        self.choose(key).map(|backend| self.acquire(backend))
    }

    /// Counts a connection to `backend` until the returned slot is dropped.
    ///
    /// # Panics
    /// If `backend` is not an index into this balancer's backends.
    pub fn acquire(&self, backend: usize) -> ConnectionSlot {
        self.active[backend].fetch_add(1, Ordering::Relaxed);
        ConnectionSlot {
            active: Arc::clone(&self.active),
            backend,
        }
    }

    /// The number of live connections to `backend`.
    ///
    /// # Panics
    /// If `backend` is not an index into this balancer's backends.
    pub fn active(&self, backend: usize) -> u32 {
        self.active[backend].load(Ordering::Relaxed)
    }

    /// Whether new connections may go to `backend`: neither the active checks hold it down
    /// nor a passive back-off is in effect. One atomic load.
    ///
    /// # Panics
    /// If `backend` is not an index into this balancer's backends.
    pub fn is_healthy(&self, backend: usize) -> bool {
        self.health[backend].down.load(Ordering::Relaxed) == 0
    }

    /// Records the active checks' verdict on `backend`. A backend the checks call healthy is
    /// still skipped while a passive back-off is in effect. Returns whether the verdict
    /// changed.
    ///
    /// # Panics
    /// If `backend` is not an index into this balancer's backends.
    pub fn set_healthy(&self, backend: usize, healthy: bool) -> bool {
        let down = &self.health[backend].down;
        let before = if healthy {
            down.fetch_and(!CHECKS_DOWN, Ordering::Relaxed)
        } else {
            down.fetch_or(CHECKS_DOWN, Ordering::Relaxed)
        };
        (before & CHECKS_DOWN == 0) != healthy
    }

    /// Takes `backend` out of (or puts it back into) every choice on an operator's word,
    /// whatever its health. Returns whether that changed anything.
    ///
    /// # Panics
    /// If `backend` is not an index into this balancer's backends.
    pub fn set_drained(&self, backend: usize, drained: bool) -> bool {
        let down = &self.health[backend].down;
        let before = if drained {
            down.fetch_or(DRAINED, Ordering::Relaxed)
        } else {
            down.fetch_and(!DRAINED, Ordering::Relaxed)
        };
        (before & DRAINED != 0) != drained
    }

    /// Whether an operator took `backend` out.
    ///
    /// # Panics
    /// If `backend` is not an index into this balancer's backends.
    pub fn is_drained(&self, backend: usize) -> bool {
        self.health[backend].down.load(Ordering::Relaxed) & DRAINED != 0
    }

    /// What keeps `backend` out of new connections, for people: "up", or the reasons among
    /// "drained" (an operator), "down" (active checks) and "backoff" (a failed connect).
    ///
    /// # Panics
    /// If `backend` is not an index into this balancer's backends.
    pub fn state_label(&self, backend: usize) -> String {
        let down = self.health[backend].down.load(Ordering::Relaxed);
        let reasons: Vec<&str> = [
            (DRAINED, "drained"),
            (CHECKS_DOWN, "down"),
            (BACKOFF, "backoff"),
        ]
        .into_iter()
        .filter(|(bit, _)| down & bit != 0)
        .map(|(_, name)| name)
        .collect();
        if reasons.is_empty() {
            "up".to_owned()
        } else {
            reasons.join(", ")
        }
    }

    /// Whether the active checks hold `backend` down (whatever the passive state).
    ///
    /// # Panics
    /// If `backend` is not an index into this balancer's backends.
    pub fn checks_down(&self, backend: usize) -> bool {
        self.health[backend].down.load(Ordering::Relaxed) & CHECKS_DOWN != 0
    }

    /// Whether a passive back-off keeps `backend` out (whatever the active checks say).
    ///
    /// # Panics
    /// If `backend` is not an index into this balancer's backends.
    pub fn in_backoff(&self, backend: usize) -> bool {
        self.health[backend].down.load(Ordering::Relaxed) & BACKOFF != 0
    }

    /// Passive check: a connect to `backend` failed. Starts a back-off unless one is already
    /// in effect (connections that were already under way when the first one failed do not
    /// lengthen it) and returns the number of consecutive back-offs including this one, which
    /// the caller turns into the back-off's length and ends with
    /// [`end_backoff`](Self::end_backoff). `None`: a back-off was already in effect.
    ///
    /// # Panics
    /// If `backend` is not an index into this balancer's backends.
    pub fn start_backoff(&self, backend: usize) -> Option<u32> {
        let health = &self.health[backend];
        let before = health.down.fetch_or(BACKOFF, Ordering::Relaxed);
        if before & BACKOFF != 0 {
            return None;
        }
        Some(
            health
                .connect_failures
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1),
        )
    }

    /// Ends a passive back-off: new connections may try `backend` again (half-open: the
    /// failure count is kept, so the next failure backs off for longer). Returns whether a
    /// back-off was in effect.
    ///
    /// # Panics
    /// If `backend` is not an index into this balancer's backends.
    pub fn end_backoff(&self, backend: usize) -> bool {
        let before = self.health[backend]
            .down
            .fetch_and(!BACKOFF, Ordering::Relaxed);
        before & BACKOFF != 0
    }

    /// Passive check: a connect to `backend` worked. Resets the back-off doubling and returns
    /// the number of consecutive back-offs this success ended (0 for none). Costs one load
    /// when there were none, which is the connection path's common case.
    ///
    /// # Panics
    /// If `backend` is not an index into this balancer's backends.
    pub fn connect_succeeded(&self, backend: usize) -> u32 {
        let failures = &self.health[backend].connect_failures;
        if failures.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        failures.swap(0, Ordering::Relaxed)
    }

    /// Consecutive back-offs since the last connect to `backend` that worked.
    ///
    /// # Panics
    /// If `backend` is not an index into this balancer's backends.
    pub fn connect_failures(&self, backend: usize) -> u32 {
        self.health[backend]
            .connect_failures
            .load(Ordering::Relaxed)
    }

    /// Notes when and why `backend`'s health last changed, for reporting. Takes a lock: call
    /// it on transitions only.
    ///
    /// # Panics
    /// If `backend` is not an index into this balancer's backends.
    pub fn record_change(&self, backend: usize, at: SystemTime, why: String) {
        *self.health[backend]
            .last_change
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((at, why));
    }

    /// When and why `backend`'s health last changed; `None` while it never has.
    ///
    /// # Panics
    /// If `backend` is not an index into this balancer's backends.
    pub fn last_change(&self, backend: usize) -> Option<(SystemTime, String)> {
        self.health[backend]
            .last_change
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The backend a sticky cookie from [`cookie_value`] names, healthy or not (the caller
    /// decides whether to honour it); `None` for a value naming no backend of this upstream.
    pub fn backend_for_cookie(&self, value: &str) -> Option<usize> {
        // Only the exact form we issue: `from_str_radix` alone would accept a leading `+`.
        if value.len() != 16 || !value.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return None;
        }
        let token = u64::from_str_radix(value, 16).ok()?;
        self.cookie_tokens.iter().position(|&known| known == token)
    }

    fn least_connections(&self, available: impl Fn(usize) -> bool) -> Option<usize> {
        let count = self.backends.len();
        if count == 0 {
            return None;
        }
        let start = self.next_start.fetch_add(1, Ordering::Relaxed) % count;
        let mut best: Option<(usize, u64, u64)> = None;
        for index in (start..count).chain(0..start) {
            if !available(index) {
                continue;
            }
            let connections = u64::from(self.active(index));
            let weight = u64::from(self.weight(index));
            // connections / weight < best_connections / best_weight, without division; in
            // u64 the products cannot overflow. Strictly less: ties go to the earlier index in
            // this rotation.
            let better = match best {
                None => true,
                Some((_, best_connections, best_weight)) => {
                    connections * best_weight < best_connections * weight
                }
            };
            if better {
                best = Some((index, connections, weight));
            }
        }
        best.map(|(index, _, _)| index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(url: &str, weight: u32) -> Backend {
        Backend {
            url: url.to_owned(),
            secure: false,
            host: "unused".to_owned(),
            port: 0,
            base_path: String::new(),
            weight,
        }
    }

    fn equal_backends(count: u32) -> Vec<Backend> {
        (0..count)
            .map(|n| backend(&format!("ws://10.1.0.{n}:80"), 1))
            .collect()
    }

    #[test]
    fn slots_count_while_alive() {
        let balancer = UpstreamBalancer::new(&equal_backends(2));
        let first = balancer.acquire(1);
        let second = balancer.acquire(1);
        assert_eq!((balancer.active(0), balancer.active(1)), (0, 2));
        assert_eq!(first.backend(), 1);
        drop(first);
        assert_eq!(balancer.active(1), 1);
        drop(second);
        assert_eq!(balancer.active(1), 0);
    }

    #[test]
    fn slots_outlive_the_balancer_borrow_and_cross_threads() {
        let balancer = Arc::new(UpstreamBalancer::new(&equal_backends(3)));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let balancer = Arc::clone(&balancer);
                std::thread::spawn(move || {
                    let slots: Vec<_> = (0..300)
                        .map(|_| balancer.choose_and_acquire(None).unwrap())
                        .collect();
                    slots.len()
                })
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 1_200);
        // Every thread dropped its slots on return.
        assert!((0..3).all(|index| balancer.active(index) == 0));
    }

    #[test]
    fn least_connections_spreads_evenly() {
        let balancer = UpstreamBalancer::new(&equal_backends(4));
        let slots: Vec<_> = (0..100)
            .map(|_| balancer.choose_and_acquire(None).unwrap())
            .collect();
        assert!((0..4).all(|index| balancer.active(index) == 25));
        drop(slots);
    }

    #[test]
    fn least_connections_fills_the_emptiest_backend() {
        let balancer = UpstreamBalancer::new(&equal_backends(3));
        let _held: Vec<_> = [0, 0, 1, 2, 2]
            .iter()
            .map(|&i| balancer.acquire(i))
            .collect();
        for _ in 0..5 {
            assert_eq!(balancer.choose(None), Some(1));
        }
    }

    #[test]
    fn ties_rotate_instead_of_piling_onto_the_first() {
        let balancer = UpstreamBalancer::new(&equal_backends(3));
        // Without holding slots every backend ties at zero on each call.
        let mut seen = [0; 3];
        for _ in 0..30 {
            seen[balancer.choose(None).unwrap()] += 1;
        }
        assert_eq!(seen, [10, 10, 10]);
    }

    #[test]
    fn least_connections_honours_weights() {
        let balancer = UpstreamBalancer::new(&[
            backend("ws://small:1", 1),
            backend("ws://big:1", 3),
            backend("ws://mid:1", 2),
        ]);
        let slots: Vec<_> = (0..600)
            .map(|_| balancer.choose_and_acquire(None).unwrap())
            .collect();
        assert_eq!(
            (balancer.active(0), balancer.active(1), balancer.active(2)),
            (100, 300, 200)
        );
        drop(slots);
    }

    #[test]
    fn another_choice_skips_the_tried_backends_in_rendezvous_order() {
        let balancer = UpstreamBalancer::new(&equal_backends(4));
        for n in 0..100 {
            let key = n.to_string();
            let order = hash::rank(balancer.backends(), &key);
            assert_eq!(
                balancer.choose_other(Some(&key), &order[..1]),
                Some(order[1])
            );
            assert_eq!(
                balancer.choose_other(Some(&key), &order[..3]),
                Some(order[3])
            );
            assert_eq!(balancer.choose_other(Some(&key), &order), None);
        }
        for _ in 0..10 {
            let other = balancer.choose_other(None, &[0, 2]);
            assert!(matches!(other, Some(1 | 3)), "{other:?}");
        }
    }

    #[test]
    fn a_drained_backend_is_skipped_whatever_its_health_until_put_back() {
        let balancer = UpstreamBalancer::new(&equal_backends(2));
        assert!(balancer.set_drained(0, true));
        assert!(!balancer.set_drained(0, true), "once");
        assert!(!balancer.is_healthy(0) && balancer.is_drained(0));
        // The checks' verdict does not put it back.
        balancer.set_healthy(0, true);
        balancer.end_backoff(0);
        assert_eq!(balancer.state_label(0), "drained");
        for n in 0..50 {
            assert_eq!(balancer.choose(Some(&n.to_string())), Some(1));
        }
        balancer.set_healthy(0, false);
        assert_eq!(balancer.state_label(0), "drained, down");
        assert!(balancer.set_drained(0, false));
        assert_eq!(balancer.state_label(0), "down");
        balancer.set_healthy(0, true);
        assert_eq!(balancer.state_label(0), "up");
        assert!(balancer.is_healthy(0));
    }

    #[test]
    fn a_weight_set_at_run_time_moves_keys_as_a_configured_one_would() {
        let balancer = UpstreamBalancer::new(&equal_backends(2));
        assert!(balancer.set_weight(1, 5));
        assert!(!balancer.set_weight(1, 5), "once");
        assert_eq!(balancer.weight(1), 5);
        let configured = [
            backend(&balancer.backends()[0].url, 1),
            backend(&balancer.backends()[1].url, 5),
        ];
        for n in 0..200 {
            let key = n.to_string();
            assert_eq!(
                balancer.choose(Some(&key)),
                hash::pick(&configured, &key, |_| true),
                "{key}"
            );
        }
    }

    #[test]
    fn unhealthy_backends_are_skipped() {
        let balancer = UpstreamBalancer::new(&equal_backends(3));
        balancer.set_healthy(0, false);
        assert!(!balancer.is_healthy(0));
        for _ in 0..10 {
            assert_ne!(balancer.choose(None), Some(0));
        }
        for n in 0..100 {
            assert_ne!(balancer.choose(Some(&n.to_string())), Some(0));
        }
        for index in 0..3 {
            balancer.set_healthy(index, false);
        }
        assert_eq!(balancer.choose(None), None);
        assert_eq!(balancer.choose(Some("k")), None);
        assert!(balancer.choose_and_acquire(None).is_none());
    }

    #[test]
    fn a_key_falls_back_and_returns_with_health() {
        let backends = equal_backends(5);
        let balancer = UpstreamBalancer::new(&backends);
        let order = hash::rank(&backends, "room-42");
        assert_eq!(balancer.choose(Some("room-42")), Some(order[0]));
        balancer.set_healthy(order[0], false);
        assert_eq!(balancer.choose(Some("room-42")), Some(order[1]));
        balancer.set_healthy(order[1], false);
        assert_eq!(balancer.choose(Some("room-42")), Some(order[2]));
        balancer.set_healthy(order[0], true);
        assert_eq!(balancer.choose(Some("room-42")), Some(order[0]));
    }

    #[test]
    fn checks_and_backoff_are_independent() {
        let backends = equal_backends(3);
        let balancer = UpstreamBalancer::new(&backends);
        assert!(balancer.set_healthy(1, false));
        assert!(!balancer.set_healthy(1, false), "no change the second time");
        assert_eq!(balancer.start_backoff(1), Some(1));
        assert!(balancer.checks_down(1) && balancer.in_backoff(1));
        // The checks say up again, but the back-off still holds it out.
        assert!(balancer.set_healthy(1, true));
        assert!(!balancer.is_healthy(1));
        assert!(balancer.end_backoff(1));
        assert!(!balancer.end_backoff(1));
        assert!(balancer.is_healthy(1));
        // And the other way round.
        assert_eq!(balancer.start_backoff(1), Some(2));
        balancer.set_healthy(1, false);
        balancer.end_backoff(1);
        assert!(!balancer.is_healthy(1));
        balancer.set_healthy(1, true);
        assert!(balancer.is_healthy(1));
    }

    #[test]
    fn backoffs_count_until_a_connect_works() {
        let balancer = UpstreamBalancer::new(&equal_backends(2));
        assert_eq!(balancer.connect_succeeded(0), 0);
        assert_eq!(balancer.start_backoff(0), Some(1));
        // Connections already under way that fail too do not count again.
        assert_eq!(balancer.start_backoff(0), None);
        assert_eq!(balancer.choose(None), Some(1));
        assert_eq!(balancer.choose(None), Some(1));
        balancer.end_backoff(0);
        assert_eq!(balancer.start_backoff(0), Some(2));
        balancer.end_backoff(0);
        assert_eq!(balancer.connect_failures(0), 2);
        assert_eq!(balancer.connect_succeeded(0), 2);
        assert_eq!(balancer.connect_failures(0), 0);
        assert_eq!(balancer.start_backoff(0), Some(1));
    }

    #[test]
    fn a_key_moves_during_a_backoff_and_comes_back() {
        let backends = equal_backends(4);
        let balancer = UpstreamBalancer::new(&backends);
        let order = hash::rank(&backends, "room-7");
        balancer.start_backoff(order[0]);
        assert_eq!(balancer.choose(Some("room-7")), Some(order[1]));
        balancer.end_backoff(order[0]);
        assert_eq!(balancer.choose(Some("room-7")), Some(order[0]));
    }

    #[test]
    fn the_last_change_is_kept_for_reporting() {
        let balancer = UpstreamBalancer::new(&equal_backends(1));
        assert_eq!(balancer.last_change(0), None);
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(5);
        balancer.record_change(0, at, "down: refused".to_owned());
        assert_eq!(
            balancer.last_change(0),
            Some((at, "down: refused".to_owned()))
        );
    }

    #[test]
    fn keyed_choice_ignores_load() {
        let backends = equal_backends(3);
        let balancer = UpstreamBalancer::new(&backends);
        let first = balancer.choose(Some("room")).unwrap();
        let _held: Vec<_> = (0..50).map(|_| balancer.acquire(first)).collect();
        assert_eq!(balancer.choose(Some("room")), Some(first));
    }

    #[test]
    fn cookies_round_trip_without_revealing_the_address() {
        let backends = equal_backends(4);
        let balancer = UpstreamBalancer::new(&backends);
        for (index, backend) in backends.iter().enumerate() {
            let value = cookie_value(backend);
            assert_eq!(value.len(), 16);
            assert!(
                value
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
            assert!(!value.contains("10.1.0"));
            assert_eq!(balancer.backend_for_cookie(&value), Some(index));
            assert_eq!(
                balancer.backend_for_cookie(&value.to_ascii_uppercase()),
                Some(index)
            );
        }
        let stranger = cookie_value(&backend("ws://elsewhere:80", 1));
        assert_eq!(balancer.backend_for_cookie(&stranger), None);
        for junk in [
            "",
            "0",
            "zzzzzzzzzzzzzzzz",
            "+123456789abcdef",
            "0123456789abcdef0",
        ] {
            assert_eq!(balancer.backend_for_cookie(junk), None, "{junk}");
        }
    }

    #[test]
    fn an_empty_upstream_chooses_nothing() {
        let balancer = UpstreamBalancer::new(&[]);
        assert_eq!(balancer.choose(None), None);
        assert_eq!(balancer.choose(Some("k")), None);
        assert_eq!(balancer.backend_for_cookie("0000000000000000"), None);
    }
}
