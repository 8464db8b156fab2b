//! The running gateway's shared state: the configuration compiled into what the per-connection
//! code consults (route table, one balancer and TLS client per upstream, counters).
//!
//! Built once per configuration; connections hold an `Arc` to the one they started with, so a
//! later reload never changes a connection in flight.

use crate::auth::forward::ForwardClient;
use crate::auth::{KeyError, RouteAuth, SubjectCounts};
use crate::client_addr::ClientAddr;
use crate::config::{Auth, Config, Route};
use crate::config::{Backend, StickyCookie, StickyKey};
use crate::drain::Drain;
use crate::limits::TokenBucket;
use crate::metrics::{CloseCodeLabel, Metrics, Refused, RouteLabel, UpstreamLabel};
use crate::rebalance::ConnectionRegistry;
use crate::recent_errors::ErrorKind;
use crate::recent_errors::RecentErrors;
use crate::relay::compress::DeflateBudget;
use crate::routing::{
    HeaderField, RequestParts, RouteTable, UpstreamBalancer, cookie_value, extract_key,
};
use crate::session;
use crate::tls::{self, TlsError};
use crate::upstream::{BackendTls, Refusal, backend_tls};
use dashmap::DashMap;
use prometheus_client::metrics::histogram::Histogram;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A route's histograms (see [`Metrics`]).
#[derive(Debug)]
pub struct RouteTimings {
    /// From a client's complete head to its 101.
    pub handshake: Histogram,
    /// How long its relayed connections lived.
    pub duration: Histogram,
}

impl RouteTimings {
    fn new(metrics: &Metrics, route: &str) -> Self {
        let label = RouteLabel {
            route: route.to_owned(),
        };
        Self {
            handshake: metrics.handshake_seconds.get_or_create(&label).clone(),
            duration: metrics
                .connection_duration_seconds
                .get_or_create(&label)
                .clone(),
        }
    }
}

#[derive(Debug)]
pub struct UpstreamRuntime {
    pub name: String,
    /// `backend_connect_seconds` for this upstream.
    pub connect_seconds: Histogram,
    pub balancer: Arc<UpstreamBalancer>,
    /// Present when any backend is `wss://`.
    pub tls: Option<BackendTls>,
}

#[derive(Debug)]
pub struct Gateway {
    pub config: Config,
    pub routes: RouteTable,
    pub upstreams: Vec<UpstreamRuntime>,
    /// Client connections open per route.
    pub route_active: Vec<AtomicU32>,
    /// Each route's histogram handles, looked up once per configuration rather than per
    /// connection.
    pub route_timings: Vec<RouteTimings>,
    /// Each route's compiled `auth.jwt`, by route index.
    pub auth: Vec<Option<Arc<RouteAuth>>>,
    /// Each route's `auth.forward` client (with its cache), by route index.
    pub forward_auth: Vec<Option<Arc<ForwardClient>>>,
    /// Connections open per authenticated subject; shared by every generation.
    pub subjects: Arc<SubjectCounts>,
    /// The shutdown's phase; shared by every configuration generation, so connections opened
    /// before a reload drain too.
    pub drain: Arc<Drain>,
    /// Shared by every configuration the process runs, so counters survive reloads.
    pub metrics: Arc<Metrics>,
    /// Open sessions; shared by every configuration generation, so a reload keeps them.
    pub sessions: Arc<session::Registry>,
    /// The dashboard's recent errors; shared by every generation like the metrics.
    pub errors: Arc<RecentErrors>,
    /// Relayed connections with a sticky key, for rebalancing; shared by every generation.
    pub connections: Arc<ConnectionRegistry>,
    /// Client connections and sessions open per client address, against
    /// `limits.max_connections_per_ip`; shared by every generation.
    pub addresses: Arc<AddressCounts>,
    /// Compression state held between messages, against `limits.compression_memory`; shared
    /// by every generation.
    pub deflate_memory: Arc<DeflateBudget>,
    /// New WebSocket handshakes allowed now, when `limits.handshake_rate` is set.
    handshake_bucket: Option<Mutex<TokenBucket>>,
    /// Idle connections to the cluster's peers, for forwarded session requests.
    pub peer_pool: Arc<crate::cluster::pool::Pool>,
    /// How peers are reached over TLS (`cluster.tls`).
    pub peer_tls: Option<BackendTls>,
    /// Set when a reload replaced this generation (see [`CurrentGateway::replace`]).
    superseded: AtomicBool,
}

/// What each client address holds against `limits.max_connections_per_ip`: its connections
/// and its sessions, so an address cannot hold more backend connections by sessions than by
/// WebSockets.
///
/// Invariant: every count is held by exactly one [`AddressSlot`], and an address is in the map
/// only while it holds at least one.
#[derive(Debug, Default)]
pub struct AddressCounts {
    per_ip: DashMap<IpAddr, u32>,
}

impl AddressCounts {
    /// Counts one more connection or session of `ip`; `None` when it holds `max` already.
    pub fn try_enter(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<AddressSlot> {
        // The map's shard lock makes the check and the increment one step.
        let mut count = self.per_ip.entry(ip).or_insert(0);
        if *count >= max {
            drop(count);
            self.per_ip.remove_if(&ip, |_, count| *count == 0);
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            counts: Arc::clone(self),
            ip,
        })
    }
}

/// One connection or session of an address, uncounted when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    counts: Arc<AddressCounts>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Some(mut count) = self.counts.per_ip.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
        }
        self.counts
            .per_ip
            .remove_if(&self.ip, |_, count| *count == 0);
    }
}

/// What lives as long as the process and is handed from one configuration generation to the
/// next: the drain signal, the open sessions, and everything that counts or remembers.
#[derive(Debug, Clone, Default)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub drain: Arc<Drain>,
    pub sessions: Arc<session::Registry>,
    pub errors: Arc<RecentErrors>,
    pub connections: Arc<ConnectionRegistry>,
    pub addresses: Arc<AddressCounts>,
    pub subjects: Arc<SubjectCounts>,
    pub deflate_memory: Arc<DeflateBudget>,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("upstream {upstream}: {source}")]
    UpstreamTls { upstream: String, source: TlsError },
    #[error("route {route}: auth.jwt: {source}")]
    AuthKeys {
        route: String,
        source: Box<KeyError>,
    },
    #[error("cluster.tls: {source}")]
    PeerTls { source: TlsError },
    #[error("route {route}: auth.forward: {source}")]
    ForwardTls {
        route: String,
        source: Box<TlsError>,
    },
}

impl Gateway {
    pub fn new(config: Config) -> Result<Self, GatewayError> {
        Self::with_shared(config, Shared::default())
    }

    /// Builds the gateway for `config` around `shared`: the parts that live as long as the
    /// process, across reloads.
    pub fn with_shared(config: Config, shared: Shared) -> Result<Self, GatewayError> {
        let Shared {
            metrics,
            drain,
            sessions,
            errors,
            connections,
            addresses,
            subjects,
            deflate_memory,
        } = shared;
        let handshake_bucket = config
            .limits
            .handshake_rate
            .map(|rate| Mutex::new(TokenBucket::new(rate, 1.0, Instant::now())));
        let peer_tls = match config.cluster.as_ref().and_then(|c| c.tls.as_ref()) {
            None => None,
            Some(settings) => {
                let wrap = |source| GatewayError::PeerTls { source };
                let client = tls::client_config(settings).map_err(wrap)?;
                let server_name = match &settings.server_name {
                    Some(name) => Some(tls::server_name_for(name, settings).map_err(wrap)?),
                    None => None,
                };
                Some(backend_tls(client, server_name))
            }
        };
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        for upstream in &config.upstreams {
            let tls = if upstream.backends.iter().any(|b| b.secure) {
                let wrap = |source| GatewayError::UpstreamTls {
                    upstream: upstream.name.clone(),
                    source,
                };
                let client = tls::client_config(&upstream.tls).map_err(wrap)?;
                let server_name = match &upstream.tls.server_name {
                    Some(name) => Some(tls::server_name_for(name, &upstream.tls).map_err(wrap)?),
                    None => None,
                };
                Some(backend_tls(client, server_name))
            } else {
                None
            };
            let connect_seconds = metrics
                .backend_connect_seconds
                .get_or_create(&UpstreamLabel {
                    upstream: upstream.name.clone(),
                })
                .clone();
            upstreams.push(UpstreamRuntime {
                name: upstream.name.clone(),
                connect_seconds,
                balancer: Arc::new(UpstreamBalancer::new(&upstream.backends)),
                tls,
            });
        }
        let mut auth = Vec::with_capacity(config.routes.len());
        let mut forward_auth = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            let (jwt, forward) = match &route.auth {
                Some(Auth::Jwt(jwt)) => {
                    let compiled =
                        RouteAuth::new(jwt).map_err(|source| GatewayError::AuthKeys {
                            route: route.name.clone(),
                            source: Box::new(source),
                        })?;
                    (Some(Arc::new(compiled)), None)
                }
                Some(Auth::Forward(forward)) => {
                    let client =
                        ForwardClient::new(forward).map_err(|source| GatewayError::ForwardTls {
                            route: route.name.clone(),
                            source: Box::new(source),
                        })?;
                    (None, Some(Arc::new(client)))
                }
                None => (None, None),
            };
            auth.push(jwt);
            forward_auth.push(forward);
        }
        Ok(Self {
            auth,
            forward_auth,
            subjects,
            routes: RouteTable::new(&config.routes),
            route_active: config.routes.iter().map(|_| AtomicU32::new(0)).collect(),
            route_timings: config
                .routes
                .iter()
                .map(|route| RouteTimings::new(&metrics, &route.name))
                .collect(),
            upstreams,
            config,
            drain,
            metrics,
            sessions,
            errors,
            connections,
            addresses,
            deflate_memory,
            handshake_bucket,
            peer_pool: Arc::default(),
            peer_tls,
            superseded: AtomicBool::new(false),
        })
    }

    /// The process-lifetime parts, for building the next generation.
    pub fn shared(&self) -> Shared {
        Shared {
            metrics: Arc::clone(&self.metrics),
            drain: Arc::clone(&self.drain),
            sessions: Arc::clone(&self.sessions),
            errors: Arc::clone(&self.errors),
            connections: Arc::clone(&self.connections),
            addresses: Arc::clone(&self.addresses),
            subjects: Arc::clone(&self.subjects),
            deflate_memory: Arc::clone(&self.deflate_memory),
        }
    }

    pub fn route(&self, index: usize) -> &Route {
        &self.config.routes[index]
    }

    /// Chooses the backend for a request on `route`, the same way for a WebSocket and for a
    /// plain HTTP request, so a client's page loads, long-polls and WebSocket meet on one
    /// backend: the sticky key if the route has one and the request carries it; otherwise a
    /// valid affinity cookie naming a healthy backend; otherwise least connections (and then a
    /// cookie is set, on routes that use one).
    pub fn pick_backend<'a, H: HeaderField<'a>>(
        &self,
        route: usize,
        request: &RequestParts<'a, H>,
        tls: bool,
    ) -> Option<BackendPick> {
        let route = &self.config.routes[route];
        let balancer = &self.upstreams[route.upstream].balancer;
        let key = route
            .sticky
            .as_ref()
            .and_then(|sticky| extract_key(sticky, request));
        if let Some(key) = key {
            let index = balancer.choose(Some(&key))?;
            return Some(BackendPick {
                index,
                set_cookie: None,
                key: Some(key.into_owned()),
            });
        }
        let Some(cookie) = &route.sticky_cookie else {
            let index = balancer.choose(None)?;
            return Some(BackendPick {
                index,
                set_cookie: None,
                key: None,
            });
        };
        let pinned = extract_key(&StickyKey::Cookie(cookie.name.clone()), request)
            .and_then(|value| balancer.backend_for_cookie(&value))
            .filter(|&index| balancer.is_healthy(index));
        if let Some(index) = pinned {
            return Some(BackendPick {
                index,
                set_cookie: None,
                key: None,
            });
        }
        let index = balancer.choose(None)?;
        Some(BackendPick {
            index,
            set_cookie: Some(affinity_cookie(cookie, &balancer.backends()[index], tls)),
            key: None,
        })
    }

    /// Another backend for a connection whose `tried` backends could not be reached: the
    /// key's next choice, or the least busy other backend (with a new affinity cookie when
    /// the route pins clients by cookie). `None` when no other backend is healthy.
    pub fn repick_backend(
        &self,
        route: usize,
        previous: &BackendPick,
        tried: &[usize],
        tls: bool,
    ) -> Option<BackendPick> {
        let route = &self.config.routes[route];
        let balancer = &self.upstreams[route.upstream].balancer;
        let index = balancer.choose_other(previous.key.as_deref(), tried)?;
        let set_cookie = match (&previous.key, &route.sticky_cookie) {
            (None, Some(cookie)) => Some(affinity_cookie(cookie, &balancer.backends()[index], tls)),
            _ => None,
        };
        Some(BackendPick {
            index,
            set_cookie,
            key: previous.key.clone(),
        })
    }

    /// A client answered by the gateway itself before any backend was involved: counted per
    /// listener, status and reason, and kept among the recent errors, so a slowloris or a
    /// header flood is visible.
    pub fn refused(
        &self,
        listener: usize,
        status: Option<u16>,
        reason: &'static str,
        peer: ClientAddr,
        line: &str,
    ) {
        let name = self.count_refused(listener, status, reason);
        let status = status.map_or_else(|| "closed".to_owned(), |s| s.to_string());
        self.errors.record(
            ErrorKind::Refused,
            None,
            None,
            format!("{peer} on {name}: {status} {line}"),
        );
    }

    /// Counts `refusal` in `wsgate_refused_total` when the gateway's own rule made it, for a
    /// request that came in on `listener` (unknown for requests made up in tests).
    pub fn count_rule(&self, listener: Option<&ListenerIndex>, refusal: &Refusal) {
        if let (Some(listener), Some(rule)) = (listener, refusal.rule) {
            self.count_refused(listener.0, Some(refusal.status), rule);
        }
    }

    /// Counts a refusal in `wsgate_refused_total` only (for those already among the recent
    /// errors); returns the listener's name.
    pub fn count_refused(
        &self,
        listener: usize,
        status: Option<u16>,
        reason: &'static str,
    ) -> &str {
        let name = self
            .config
            .listeners
            .get(listener)
            .map_or("unknown", |l| l.name.as_str());
        self.metrics
            .refused
            .get_or_create(&Refused {
                listener: name.to_owned(),
                status: CloseCodeLabel(status),
                reason,
            })
            .inc();
        name
    }

    /// Whether a reload has replaced this generation: connections still being set up with it
    /// pick backends by rules no longer in force.
    pub fn is_superseded(&self) -> bool {
        self.superseded.load(Ordering::SeqCst)
    }

    /// Whether one more WebSocket handshake fits in `limits.handshake_rate` now.
    pub fn admit_handshake(&self) -> bool {
        let Some(bucket) = &self.handshake_bucket else {
            return true;
        };
        // A poisoned lock only means another thread panicked mid-update; the bucket is plain
        // numbers and still usable.
        let mut bucket = bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        bucket.try_take(Instant::now())
    }

    /// Whether the route has no connection slot free right now.
    pub fn route_full(&self, route: usize) -> bool {
        self.route_active[route].load(Ordering::Relaxed)
            >= self.config.routes[route].limits.max_connections
    }

    /// Takes one of the route's connection slots, if it has one free.
    pub fn enter_route(self: &Arc<Self>, route: usize) -> Option<RouteSlot> {
        let max = self.config.routes[route].limits.max_connections;
        let counter = &self.route_active[route];
        let mut current = counter.load(Ordering::Relaxed);
        loop {
            if current >= max {
                return None;
            }
            match counter.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(RouteSlot {
                        gateway: Arc::clone(self),
                        route,
                    });
                }
                Err(now) => current = now,
            }
        }
    }
}

/// The listener (index into the configuration's) a plain HTTP request came in on, carried as a
/// request extension to wherever it may be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerIndex(pub usize);

/// Which backend a request goes to, and the affinity cookie to set if one was chosen now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendPick {
    pub index: usize,
    pub set_cookie: Option<String>,
    /// The sticky key the choice was made by, if any: such a connection moves when the key's
    /// owner changes (see `rebalance`).
    pub key: Option<String>,
}

/// A connection counted against its route's limit until dropped.
#[derive(Debug)]
pub struct RouteSlot {
    gateway: Arc<Gateway>,
    route: usize,
}

impl Drop for RouteSlot {
    fn drop(&mut self) {
        self.gateway.route_active[self.route].fetch_sub(1, Ordering::AcqRel);
    }
}

/// The configuration generation new connections use. A reload swaps it; connections keep the
/// `Arc<Gateway>` they started with, so they finish under the rules they began with.
#[derive(Debug)]
pub struct CurrentGateway(std::sync::RwLock<Arc<Gateway>>);

impl CurrentGateway {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self(std::sync::RwLock::new(gateway))
    }

    pub fn get(&self) -> Arc<Gateway> {
        // A poisoned lock only means a panic elsewhere while swapping an `Arc`; the value is
        // still a complete gateway.
        let current = self
            .0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(&current)
    }

    pub fn replace(&self, gateway: Arc<Gateway>) -> Arc<Gateway> {
        let mut current = self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let old = std::mem::replace(&mut *current, gateway);
        old.superseded.store(true, Ordering::SeqCst);
        old
    }
}

/// The `Set-Cookie` value pinning a client to `backend`.
fn affinity_cookie(cookie: &StickyCookie, backend: &Backend, tls: bool) -> String {
    let mut value = format!(
        "{}={}; Path=/; HttpOnly; SameSite={}",
        cookie.name,
        cookie_value(backend),
        cookie.same_site.as_str()
    );
    if cookie.is_secure(tls) {
        value.push_str("; Secure");
    }
    if let Some(max_age) = cookie.max_age {
        value.push_str(&format!("; Max-Age={}", max_age.as_secs()));
    }
    value
}
