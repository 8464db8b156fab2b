//! Every open session, by id. One registry lives as long as the process: sessions opened
//! before a configuration reload stay reachable after it.

use super::state::Session;
use crate::limits::TokenBucket;
use dashmap::DashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Instant;

/// Addresses remembered before the map is swept of idle ones; it then waits for twice as many.
const SWEEP_AT_LEAST: usize = 1024;

#[derive(Debug, Default)]
pub struct Registry {
    sessions: DashMap<String, Arc<Session>>,
    /// Sessions open or being opened; bounded by `sessions.max_sessions`.
    reserved: AtomicU32,
    /// Per client address: sessions open and the open-rate bucket. An address with no session
    /// and a full bucket carries no information and is swept.
    addresses: DashMap<IpAddr, Address>,
    sweep_at: AtomicUsize,
}

#[derive(Debug)]
struct Address {
    open: u32,
    bucket: TokenBucket,
}

/// Why an address may not open a session now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressRefusal {
    TooMany,
    TooFast,
}

/// One of an address's sessions, given back when dropped.
#[derive(Debug)]
pub struct AddressSession {
    registry: Arc<Registry>,
    ip: IpAddr,
}

impl Drop for AddressSession {
    fn drop(&mut self) {
        if let Some(mut address) = self.registry.addresses.get_mut(&self.ip) {
            address.open = address.open.saturating_sub(1);
        }
    }
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

    /// Counts a new session of `ip` against its open rate (`per_second`, bursts of two
    /// seconds' worth) and its cap of `max_open` sessions at once.
    pub fn enter_address(
        self: &Arc<Self>,
        ip: IpAddr,
        max_open: u32,
        per_second: u32,
        now: Instant,
    ) -> Result<AddressSession, AddressRefusal> {
        self.sweep(now);
        // The entry's shard lock makes the checks and the count one step.
        let mut address = self.addresses.entry(ip).or_insert_with(|| Address {
            open: 0,
            bucket: TokenBucket::new(per_second, 2.0, now),
        });
        if !address.bucket.try_take(now) {
            return Err(AddressRefusal::TooFast);
        }
        if address.open >= max_open {
            return Err(AddressRefusal::TooMany);
        }
        address.open += 1;
        Ok(AddressSession {
            registry: Arc::clone(self),
            ip,
        })
    }

    /// Forgets idle addresses once there are many, so the map is bounded by the addresses
    /// active in the last few seconds rather than every address ever seen.
    fn sweep(&self, now: Instant) {
        let at = self.sweep_at.load(Ordering::Relaxed).max(SWEEP_AT_LEAST);
        if self.addresses.len() < at {
            return;
        }
        self.addresses
            .retain(|_, address| address.open > 0 || !address.bucket.is_full(now));
        self.sweep_at.store(
            (self.addresses.len() * 2).max(SWEEP_AT_LEAST),
            Ordering::Relaxed,
        );
    }

    /// Sessions open or being opened.
    pub fn open(&self) -> u32 {
        self.reserved.load(Ordering::Relaxed)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    #[test]
    fn an_address_is_held_to_its_cap_and_rate() {
        let registry = Arc::new(Registry::default());
        let (a, b) = (
            IpAddr::from(Ipv4Addr::new(10, 0, 0, 1)),
            IpAddr::from(Ipv4Addr::LOCALHOST),
        );
        let now = Instant::now();
        let first = registry.enter_address(a, 2, 100, now).unwrap();
        let _second = registry.enter_address(a, 2, 100, now).unwrap();
        assert_eq!(
            registry.enter_address(a, 2, 100, now).unwrap_err(),
            AddressRefusal::TooMany
        );
        assert!(
            registry.enter_address(b, 2, 100, now).is_ok(),
            "other addresses are not affected"
        );
        drop(first);
        assert!(
            registry.enter_address(a, 2, 100, now).is_ok(),
            "a slot comes back when dropped"
        );

        let c = IpAddr::from(Ipv4Addr::new(10, 0, 0, 3));
        let held: Vec<AddressSession> = (0..10)
            .filter_map(|_| registry.enter_address(c, 100, 2, now).ok())
            .collect();
        assert_eq!(held.len(), 4, "bursts of two seconds' worth");
        assert!(
            registry
                .enter_address(c, 100, 2, now + Duration::from_millis(500))
                .is_ok()
        );
    }
}
