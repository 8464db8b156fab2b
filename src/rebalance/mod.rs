//! Room-safe rebalancing: when a reload or a health change gives a sticky key another owner,
//! the connections of that key still on the old backend are closed with 1012 (Service
//! Restart) so that their clients reconnect, and reach the new owner.
//!
//! Invariants:
//! - only connections that were routed by a sticky key are ever moved (client IP counts;
//!   least-connections and cookie-pinned connections are not registered at all), and only
//!   those whose key's owner, computed exactly as for a new connection
//!   ([`UpstreamBalancer::choose`](crate::routing::UpstreamBalancer::choose) with the key),
//!   is no longer their backend; every other connection is never touched;
//! - all the misplaced connections of a key are signalled at the same instant, one random
//!   instant within `rebalance.window` of the change, so a room is split between two
//!   backends for at most that window and the reconnects of many rooms are spread out;
//! - the decision is taken again at that instant against the configuration and health then
//!   in force: a change undone in the meantime (a backend back up, a reload reverted) moves
//!   nothing, and a later change never postpones an earlier one's instant;
//! - nothing moves while the gateway drains, when a key has no healthy backend to go to, or
//!   when the connection's route is gone or extracts its key differently since a reload (its
//!   key's new owner is unknown); such connections stay until they end by themselves.
//!
//! Health changes move keys both ways, by design. A backend taken out (checks failing, or a
//! passive back-off after a failed connect) hands its keys to their next choice; whatever
//! connections it still holds would otherwise split their rooms with the newcomers, and they
//! are probably broken anyway. When it is back, its keys return to it, and the connections
//! that moved away move back, reuniting rooms split by the newcomers. The active checks'
//! thresholds and the doubling passive back-off damp flapping; `on_health_change: false`
//! limits rebalancing to reloads, as HAProxy and Envoy do (they never move established
//! connections at all).
//!
//! An operator draining a backend or changing its weight (the admin API) moves keys the same
//! way, whatever `on_health_change` says: that is what those actions are for.
//!
//! Health is noticed by polling the balancers' health bits every [`HEALTH_POLL`]: changes
//! come from probes, back-off timers and the connection path, and a few loads four times a
//! second catch all of them without a notifier threaded through each.

pub mod registry;

use crate::drain::Phase;
use crate::gateway::{CurrentGateway, Gateway};
use crate::metrics::RouteLabel;
pub use registry::{ConnectionRegistry, Member, Registration, Room, Ticket};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

/// How often the health bits are compared with the last look.
pub const HEALTH_POLL: Duration = Duration::from_millis(250);

/// Watches the current configuration for reloads and health changes and moves keys.
#[derive(Debug)]
pub struct Rebalancer {
    current: Arc<CurrentGateway>,
    reloaded: Notify,
}

/// The running watcher; dropping it stops watching (moves already scheduled still happen).
#[derive(Debug)]
#[must_use = "the rebalancer stops when this is dropped"]
pub struct Watching(JoinHandle<()>);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a look at the current configuration saw, to compare with the next look.
struct Look {
    gateway: Arc<Gateway>,
    /// Per upstream, per backend: healthy.
    health: Vec<Vec<bool>>,
    /// Per upstream, per backend: taken out by an operator.
    drained: Vec<Vec<bool>>,
    /// Per upstream, per backend: the weight now (an operator may change it).
    weights: Vec<Vec<u32>>,
}

impl Look {
    fn of(gateway: Arc<Gateway>) -> Self {
        let bits = |bit: fn(&crate::routing::UpstreamBalancer, usize) -> bool| {
            gateway
                .upstreams
                .iter()
                .map(|upstream| {
                    let balancer = &upstream.balancer;
                    (0..balancer.backends().len())
                        .map(|index| bit(balancer, index))
                        .collect()
                })
                .collect()
        };
        let health = bits(crate::routing::UpstreamBalancer::is_healthy);
        let drained = bits(crate::routing::UpstreamBalancer::is_drained);
        let weights = gateway
            .upstreams
            .iter()
            .map(|upstream| {
                let balancer = &upstream.balancer;
                (0..balancer.backends().len())
                    .map(|index| balancer.weight(index))
                    .collect()
            })
            .collect();
        Self {
            gateway,
            health,
            drained,
            weights,
        }
    }
}

impl Rebalancer {
    pub fn new(current: Arc<CurrentGateway>) -> Arc<Self> {
        Arc::new(Self {
            current,
            reloaded: Notify::new(),
        })
    }

    /// A reload was applied: look now rather than at the next poll.
    pub fn reloaded(&self) {
        self.reloaded.notify_one();
    }

    /// Starts watching; it ends when the gateway drains or the handle is dropped.
    pub fn start(self: &Arc<Self>) -> Watching {
        Watching(tokio::spawn(Arc::clone(self).watch()))
    }

    async fn watch(self: Arc<Self>) {
        let mut drain = self.current.get().drain.subscribe();
        let mut last = Look::of(self.current.get());
        let mut ticks = tokio::time::interval(HEALTH_POLL);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.reloaded.notified() => {}
                _ = ticks.tick() => {}
                // An error means the gateway is gone, which ends the watch just as well.
                _ = drain.wait_for(|phase| !matches!(phase, Phase::Serving)) => return,
            }
            let now = Look::of(self.current.get());
            let cause = if !Arc::ptr_eq(&now.gateway, &last.gateway) {
                Some("configuration reloaded")
            } else if now.drained != last.drained || now.weights != last.weights {
                // An operator's decision, not a health event: moves even where health
                // changes do not.
                Some("backend drained, put back or reweighted by an operator")
            } else if now.health != last.health && now.gateway.config.rebalance.on_health_change {
                Some("backend health changed")
            } else {
                None
            };
            let registry = &now.gateway.connections;
            if let Some(cause) = cause {
                registry.begin_plan();
                plan(&self.current, &now.gateway, cause, registry.rooms());
            }
            // Connections whose handshake was under way during an earlier plan.
            let late: Vec<_> = registry
                .take_late()
                .into_iter()
                .map(|room| {
                    let members = registry.members(&room);
                    (room, members)
                })
                .collect();
            if !late.is_empty() {
                plan(&self.current, &now.gateway, "late registrations", late);
            }
            last = now;
        }
    }
}

/// Finds the keys of `rooms` whose connections are misplaced in `gateway` and schedules
/// their moves.
fn plan(
    current: &Arc<CurrentGateway>,
    gateway: &Gateway,
    cause: &str,
    rooms: Vec<(Room, Vec<Member>)>,
) {
    let settings = gateway.config.rebalance;
    if !settings.enabled || !gateway.drain.is_serving() {
        return;
    }
    let mut schedule = Vec::new();
    let mut connections = 0;
    for (room, members) in rooms {
        let moving = members
            .iter()
            .filter(|member| misplaced(gateway, &room, member))
            .count();
        if moving > 0 {
            connections += moving;
            schedule.push((jitter(settings.window, random_u64()), room));
        }
    }
    if schedule.is_empty() {
        return;
    }
    tracing::info!(
        "{cause}: {} sticky keys ({connections} connections) now belong to another backend; closing them with 1012 over {:?}",
        schedule.len(),
        settings.window
    );
    schedule.sort_by_key(|(delay, _)| *delay);
    let start = Instant::now();
    let current = Arc::clone(current);
    tokio::spawn(async move {
        for (delay, room) in schedule {
            tokio::time::sleep_until(start + delay).await;
            let gateway = current.get();
            if !gateway.config.rebalance.enabled || !gateway.drain.is_serving() {
                return;
            }
            let moved = gateway
                .connections
                .signal_misplaced(&room, |member| misplaced(&gateway, &room, member));
            if moved > 0 {
                let label = RouteLabel {
                    route: room.route.to_string(),
                };
                gateway
                    .metrics
                    .rebalanced_connections
                    .get_or_create(&label)
                    .inc_by(moved as u64);
            }
        }
    });
}

/// Whether `member` of `room` sits on a backend other than its key's owner in `gateway`.
/// Unknown (route gone, key extracted differently, no healthy backend) is not misplaced.
fn misplaced(gateway: &Gateway, room: &Room, member: &Member) -> bool {
    let Some(route) = gateway
        .config
        .routes
        .iter()
        .find(|route| *route.name == *room.route)
    else {
        return false;
    };
    if route.sticky.as_ref() != Some(&*member.sticky) {
        return false;
    }
    let balancer = &gateway.upstreams[route.upstream].balancer;
    match balancer.choose(Some(&room.key)) {
        Some(owner) => *balancer.backends()[owner].url != *member.backend,
        None => false,
    }
}

/// A uniformly random instant in `[0, window]`, from 64 random bits.
fn jitter(window: Duration, random: u64) -> Duration {
    // The top 53 bits make an exact f64 fraction in [0, 1).
    let fraction = (random >> 11) as f64 / (1u64 << 53) as f64;
    window.mul_f64(fraction)
}

fn random_u64() -> u64 {
    let bytes = crate::relay::mask_keys::random_16();
    u64::from_le_bytes([
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StickyKey;

    #[test]
    fn jitter_stays_within_the_window() {
        let window = Duration::from_secs(10);
        assert_eq!(jitter(window, 0), Duration::ZERO);
        assert!(jitter(window, u64::MAX) <= window);
        assert!(jitter(window, u64::MAX) > Duration::from_millis(9_999));
        let half = jitter(window, 1 << 63);
        assert_eq!(half, Duration::from_secs(5));
        assert_eq!(jitter(Duration::ZERO, u64::MAX), Duration::ZERO);
    }

    fn gateway(backends: &[&str], sticky: &str) -> Gateway {
        let mut yaml = String::from(
            "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends:\n",
        );
        for backend in backends {
            yaml.push_str(&format!("      - {backend}\n"));
        }
        yaml.push_str(&format!(
            "routes:\n  - name: rooms\n    upstream: app\n{sticky}"
        ));
        Gateway::new(crate::config::from_yaml_str(&yaml, "t.yaml").unwrap()).unwrap()
    }

    #[test]
    fn only_keys_whose_owner_changed_are_misplaced() {
        let sticky = "    sticky:\n      query: room\n";
        let before = gateway(&["ws://10.0.0.1:1", "ws://10.0.0.2:1"], sticky);
        let after = gateway(
            &["ws://10.0.0.1:1", "ws://10.0.0.2:1", "ws://10.0.0.3:1"],
            sticky,
        );
        let spec = Arc::new(StickyKey::Query("room".into()));
        let (mut moved, mut stayed) = (0, 0);
        for n in 0..300 {
            let room = Room {
                route: "rooms".into(),
                key: format!("room-{n}").into(),
            };
            let balancer = &before.upstreams[0].balancer;
            let owner = balancer.choose(Some(&room.key)).unwrap();
            let member = Member {
                backend: balancer.backends()[owner].url.as_str().into(),
                sticky: Arc::clone(&spec),
            };
            assert!(
                !misplaced(&before, &room, &member),
                "nothing moves without a change"
            );
            if misplaced(&after, &room, &member) {
                moved += 1;
                let new_balancer = &after.upstreams[0].balancer;
                let new_owner = new_balancer.choose(Some(&room.key)).unwrap();
                // Adding a backend moves keys only onto it.
                assert_eq!(new_balancer.backends()[new_owner].url, "ws://10.0.0.3:1");
            } else {
                stayed += 1;
            }
        }
        // About a third of the keys move to the new backend.
        assert!(
            (60..=140).contains(&moved),
            "{moved} moved, {stayed} stayed"
        );

        // A key whose owner is down moves; with no healthy backend at all, nothing moves.
        let room = Room {
            route: "rooms".into(),
            key: "room-1".into(),
        };
        let balancer = &before.upstreams[0].balancer;
        let owner = balancer.choose(Some("room-1")).unwrap();
        let member = Member {
            backend: balancer.backends()[owner].url.as_str().into(),
            sticky: Arc::clone(&spec),
        };
        balancer.set_healthy(owner, false);
        assert!(misplaced(&before, &room, &member));
        balancer.set_healthy(1 - owner, false);
        assert!(!misplaced(&before, &room, &member));

        // A route that now extracts its key differently, or no longer exists: unknown, stays.
        let header = gateway(&["ws://10.0.0.9:1"], "    sticky:\n      header: X-Room\n");
        assert!(!misplaced(&header, &room, &member));
        let renamed = Room {
            route: "gone".into(),
            key: "room-1".into(),
        };
        assert!(!misplaced(&after, &renamed, &member));
    }
}
