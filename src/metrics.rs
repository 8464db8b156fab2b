//! Counters and gauges for the admin listener's `/metrics` (Prometheus text format, via the
//! prometheus-client crate).
//!
//! One `Metrics` lives as long as the process and outlives configuration reloads, so counters
//! never reset while the gateway runs. Label values come from the configuration (route,
//! upstream and backend names) or from small fixed sets (side, direction, reason, close code),
//! never from client input, so the number of series stays bounded.
//!
//! Per-message counters are taken once per connection (`RelayCounters`) and bumped with a
//! relaxed atomic add: no label lookup and no lock on the frame path. They are kept per route
//! *and backend* ([`Flows`]), so the dashboard can show each backend's traffic, and summed per
//! route at scrape time for `wsgate_messages_total` and `wsgate_payload_bytes_total`, whose
//! series stay per route and direction.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, PoisonError, RwLock};

/// Bytes of relay buffers in memory, lent to connections or pooled for reuse. Process-wide
/// because buffers are allocated and freed on worker threads that hold no `Metrics`; it moves
/// only when the pool allocates or frees, never per message.
pub static RELAY_BUFFER_BYTES: LazyLock<Gauge> = LazyLock::new(Gauge::default);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteBackend {
    pub route: String,
    pub backend: String,
}

/// Labels of a connection's end, one series per hop. Built once per closed connection, so the
/// fixed-set labels are static strings and a number, not allocated text.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Closed {
    pub route: String,
    pub backend: String,
    /// "client" or "backend": the hop the close code was sent to.
    pub side: &'static str,
    pub code: CloseCodeLabel,
    /// "client", "backend" or "gateway": who started the end.
    pub initiator: &'static str,
    /// Why it ended (`relay::Cause::label`): close_handshake, disconnected, protocol_error, ...
    pub cause: &'static str,
}

/// A close code or HTTP status, or "none" when there was none.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub struct CloseCodeLabel(pub Option<u16>);

impl EncodeLabelValue for CloseCodeLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        match self.0 {
            Some(code) => EncodeLabelValue::encode(&code, encoder),
            None => EncodeLabelValue::encode(&"none", encoder),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteReason {
    pub route: String,
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Flow {
    pub route: String,
    /// "client_to_backend" or "backend_to_client".
    pub direction: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamBackend {
    pub upstream: String,
    pub backend: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub result: String,
}

/// A DNS lookup of an upstream's backends and what came of it: `changed` (applied like a
/// reload), `unchanged`, `failed` or `empty` (the last good set kept).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLookupLabel {
    pub upstream: String,
    pub result: &'static str,
}

/// A lookup of `cluster.peers_dns`, by result (as [`DnsLookupLabel`]).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerDnsLookup {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpRequest {
    pub route: String,
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionEnd {
    pub route: String,
    /// One of a fixed set: client_closed, backend_closed, backend_lost, expired, overflow,
    /// shutdown.
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionRequest {
    /// The session operation (open, poll, send, close, events, socket).
    pub op: String,
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Retry {
    pub route: String,
    /// "connected": the other backend took the connection; "failed": it could not be reached
    /// either.
    pub result: &'static str,
}

/// A client the gateway answered itself before any backend was involved.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refused {
    pub listener: String,
    /// The HTTP status answered, or "none" when the connection was closed without one (a
    /// failed TLS handshake, an address over its limit).
    pub status: CloseCodeLabel,
    /// One of a fixed set: head_timeout, head_too_large, malformed, framing, path, the
    /// handshake error labels,
    /// per_ip_limit, tls_handshake, tls_timeout, peer (a peer header that fails its checks, a
    /// client on the peer listener), and the rules of `handshake_failures`
    /// (origin, route_limit, no_route, key, ...) for upgrades the gateway refused itself.
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// The session operation (open, poll, send, close, events).
    pub op: &'static str,
}

/// Histograms per label set, with the buckets of their quantity.
pub type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// From 1 ms to about 16 s: connects, handshakes, request latencies.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// From 1 s to about 1.5 days: how long WebSocket connections live.
fn duration_buckets() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 4.0, 10))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerForward {
    /// The owner instance's name, as configured in `cluster.peers`, or "unknown".
    pub peer: String,
    pub op: &'static str,
    /// answered (the owner's answer, whatever its status, reached the client), unknown_peer,
    /// unreachable, timed_out, failed (the hop broke before the answer's head).
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdminAction {
    /// drain, restore, weight, drain_instance, unauthorized or bad_request.
    pub action: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub connections_active: Family<RouteBackend, Gauge>,
    pub connections_opened: Family<RouteBackend, Counter>,
    pub connections_closed: Family<Closed, Counter>,
    pub handshake_failures: Family<Reason, Counter>,
    /// Requests refused by a route's `auth`, per route and reason (fixed labels).
    pub auth_failures: Family<RouteReason, Counter>,
    /// Tokens presented in-band on open WebSockets, per route and result (`ok` or the reason
    /// they were refused).
    pub auth_refreshes: Family<RouteReason, Counter>,
    /// Messages and payload bytes per route, backend and direction.
    pub flows: Arc<Flows>,
    pub backend_healthy: Family<UpstreamBackend, Gauge>,
    /// The `backend_healthy` series set at the last scrape, to drop those of removed backends.
    pub backend_health_series: std::sync::Mutex<Vec<UpstreamBackend>>,
    pub config_reloads: Family<Outcome, Counter>,
    pub http_requests: Family<HttpRequest, Counter>,
    pub sessions_active: Family<RouteLabel, Gauge>,
    pub sessions_ended: Family<SessionEnd, Counter>,
    pub session_requests: Family<SessionRequest, Counter>,
    pub rebalanced_connections: Family<RouteLabel, Counter>,
    pub dns_lookups: Family<DnsLookupLabel, Counter>,
    pub peer_dns_lookups: Family<PeerDnsLookup, Counter>,
    pub connect_retries: Family<Retry, Counter>,
    /// Data bytes before and after permessage-deflate on `terminate` routes.
    pub deflate_bytes: Family<DeflateLabel, Counter>,
    pub admin_actions: Family<AdminAction, Counter>,
    /// Session requests forwarded to the instance owning the session.
    pub peer_forwards: Family<PeerForward, Counter>,
    /// From the forward's start to the owner's response head (connect included), per peer.
    pub peer_forward_seconds: Histograms<PeerLabel>,
    pub refused: Family<Refused, Counter>,
    /// Opening a backend connection: TCP, TLS and the backend's handshake (or, for plain
    /// HTTP, its connection), per upstream.
    pub backend_connect_seconds: Histograms<UpstreamLabel>,
    /// From a client's complete request head to the 101 sent, per route.
    pub handshake_seconds: Histograms<RouteLabel>,
    pub session_request_seconds: Histograms<OpLabel>,
    /// How long relayed WebSocket connections lived, per route.
    pub connection_duration_seconds: Histograms<RouteLabel>,
    /// 1 for the configuration loaded at start, one more per applied reload.
    pub config_generation: Gauge,
    /// When the configuration in force was applied (start or reload), Unix seconds.
    pub config_applied_timestamp_seconds: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wsgate");
        let metrics = Self {
            connections_active: Family::default(),
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            handshake_failures: Family::default(),
            auth_failures: Family::default(),
            auth_refreshes: Family::default(),
            flows: Arc::default(),
            backend_healthy: Family::default(),
            backend_health_series: std::sync::Mutex::default(),
            config_reloads: Family::default(),
            http_requests: Family::default(),
            sessions_active: Family::default(),
            sessions_ended: Family::default(),
            session_requests: Family::default(),
            rebalanced_connections: Family::default(),
            dns_lookups: Family::default(),
            peer_dns_lookups: Family::default(),
            connect_retries: Family::default(),
            deflate_bytes: Family::default(),
            admin_actions: Family::default(),
            peer_forwards: Family::default(),
            peer_forward_seconds: Family::new_with_constructor(latency_buckets),
            refused: Family::default(),
            backend_connect_seconds: Family::new_with_constructor(latency_buckets),
            handshake_seconds: Family::new_with_constructor(latency_buckets),
            session_request_seconds: Family::new_with_constructor(latency_buckets),
            connection_duration_seconds: Family::new_with_constructor(duration_buckets),
            config_generation: Gauge::default(),
            config_applied_timestamp_seconds: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections_active",
            "WebSocket connections open, per route and backend",
            metrics.connections_active.clone(),
        );
        registry.register(
            "connections_opened",
            "WebSocket connections accepted, per route and backend",
            metrics.connections_opened.clone(),
        );
        registry.register(
            "connections_closed",
            "WebSocket hops closed, by the close code sent to the hop, who started the end and why",
            metrics.connections_closed.clone(),
        );
        registry.register(
            "handshake_failures",
            "Upgrades refused before a 101, by reason",
            metrics.handshake_failures.clone(),
        );
        registry.register(
            "auth_failures",
            "Requests refused by a route's auth (401, 403, 429), per route and reason",
            metrics.auth_failures.clone(),
        );
        registry.register(
            "auth_refreshes",
            "Tokens presented in-band on open WebSockets, per route and result (ok, or why refused: the connection is then closed with 1008)",
            metrics.auth_refreshes.clone(),
        );
        // `messages` and `payload_bytes`, summed over backends at each scrape.
        registry.register_collector(Box::new(Arc::clone(&metrics.flows)));
        registry.register(
            "backend_healthy",
            "1 while a backend is considered healthy, 0 while it is skipped",
            metrics.backend_healthy.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads, by result (applied or refused)",
            metrics.config_reloads.clone(),
        );
        registry.register(
            "http_requests",
            "Plain HTTP requests proxied, per route and response status",
            metrics.http_requests.clone(),
        );
        registry.register(
            "sessions_active",
            "Sessions open (long-polling, event-stream or resumable WebSocket clients), per route",
            metrics.sessions_active.clone(),
        );
        registry.register(
            "sessions_ended",
            "Sessions ended, per route and reason",
            metrics.sessions_ended.clone(),
        );
        registry.register(
            "session_requests",
            "Session protocol requests, by operation and response status",
            metrics.session_requests.clone(),
        );
        registry.register(
            "rebalanced_connections",
            "WebSocket connections closed with 1012 because their sticky key moved to another backend, per route",
            metrics.rebalanced_connections.clone(),
        );
        registry.register(
            "dns_lookups",
            "DNS lookups of upstreams' backends, per upstream and result (changed, unchanged, failed, empty)",
            metrics.dns_lookups.clone(),
        );
        registry.register(
            "peer_dns_lookups",
            "DNS lookups of the cluster's peers (cluster.peers_dns), per result (changed, unchanged, failed, empty)",
            metrics.peer_dns_lookups.clone(),
        );
        registry.register(
            "connect_retries",
            "Connections and requests retried on another backend after theirs could not be reached, per route and result",
            metrics.connect_retries.clone(),
        );
        registry.register(
            "deflate_bytes",
            "Data bytes on compress-terminating routes, per route, direction (from_client, to_client) and form (compressed on the client's wire, uncompressed on the backend's)",
            metrics.deflate_bytes.clone(),
        );
        registry.register(
            "backend_connect_seconds",
            "Time to open a backend connection (TCP, TLS, the backend's handshake), per upstream",
            metrics.backend_connect_seconds.clone(),
        );
        registry.register(
            "handshake_seconds",
            "Time from a client's complete request head to its 101, per route",
            metrics.handshake_seconds.clone(),
        );
        registry.register(
            "peer_forwards",
            "Session requests forwarded to the instance owning the session, by peer, operation and result",
            metrics.peer_forwards.clone(),
        );
        registry.register(
            "peer_forward_seconds",
            "Time from a forward's start to the owner's response head, per peer (a held poll counts its wait)",
            metrics.peer_forward_seconds.clone(),
        );
        registry.register(
            "session_request_seconds",
            "Session request latency, per operation (a poll is held until events or its timeout)",
            metrics.session_request_seconds.clone(),
        );
        registry.register(
            "connection_duration_seconds",
            "How long relayed WebSocket connections lived, per route",
            metrics.connection_duration_seconds.clone(),
        );
        registry.register(
            "config_generation",
            "1 for the configuration loaded at start, one more per applied reload",
            metrics.config_generation.clone(),
        );
        registry.register(
            "config_applied_timestamp_seconds",
            "When the configuration in force was applied (start or last successful reload)",
            metrics.config_applied_timestamp_seconds.clone(),
        );
        registry.register(
            "refused",
            "Clients answered by the gateway itself before any backend was involved (a slowloris shows as head_timeout), per listener, status and reason",
            metrics.refused.clone(),
        );
        registry.register(
            "admin_actions",
            "Admin API requests, by action (refused ones as unauthorized or bad_request)",
            metrics.admin_actions.clone(),
        );
        registry.register(
            "relay_buffer_bytes",
            "Memory of the relay's read buffers, held by busy connections or pooled per worker thread",
            RELAY_BUFFER_BYTES.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The exposition text for `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The per-message counters of one connection on `route` to `backend`.
    pub fn relay_counters(&self, route: &str, backend: &str) -> RelayCounters {
        self.flows.counters(route, backend)
    }

    /// The compression counters of one connection on `route` (looked up once per connection).
    pub fn deflate_counters(&self, route: &str) -> DeflateCounters {
        let counter = |direction, form| {
            self.deflate_bytes
                .get_or_create(&DeflateLabel {
                    route: route.to_owned(),
                    direction,
                    form,
                })
                .clone()
        };
        DeflateCounters {
            from_client_compressed: counter("from_client", "compressed"),
            from_client_uncompressed: counter("from_client", "uncompressed"),
            to_client_compressed: counter("to_client", "compressed"),
            to_client_uncompressed: counter("to_client", "uncompressed"),
        }
    }

    /// The configuration in force changed (start, or an applied reload).
    pub fn config_applied(&self) {
        self.config_generation.inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        self.config_applied_timestamp_seconds
            .set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    pub fn retried(&self, route: &str, connected: bool) {
        self.connect_retries
            .get_or_create(&Retry {
                route: route.to_owned(),
                result: if connected { "connected" } else { "failed" },
            })
            .inc();
    }

    pub fn handshake_failed(&self, reason: &str) {
        self.handshake_failures
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

pub const CLIENT_TO_BACKEND: &str = "client_to_backend";
pub const BACKEND_TO_CLIENT: &str = "backend_to_client";

/// Message and payload byte counters per route and backend, both directions. A handful of
/// series per backend, looked up once per connection; the frame path only bumps the handles.
#[derive(Debug, Default)]
pub struct Flows {
    /// Route name → backend URL → counters: nested so that a lookup borrows the names.
    counters: RwLock<HashMap<String, HashMap<String, RelayCounters>>>,
}

impl Flows {
    /// The counters of `route` to `backend`, created at zero the first time.
    pub fn counters(&self, route: &str, backend: &str) -> RelayCounters {
        if let Some(counters) = self
            .counters
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(route)
            .and_then(|backends| backends.get(backend))
        {
            return counters.clone();
        }
        self.counters
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(route.to_owned())
            .or_default()
            .entry(backend.to_owned())
            .or_default()
            .clone()
    }

    /// Totals so far of `route` to `backend`, `None` before its first connection.
    pub fn totals(&self, route: &str, backend: &str) -> Option<FlowTotals> {
        let counters = self.counters.read().unwrap_or_else(PoisonError::into_inner);
        counters
            .get(route)
            .and_then(|backends| backends.get(backend))
            .map(FlowTotals::of)
    }

    /// Totals per route, over every backend it ever used (one removed by a reload may still
    /// hold connections), sorted by route.
    pub fn per_route(&self) -> Vec<(String, FlowTotals)> {
        let counters = self.counters.read().unwrap_or_else(PoisonError::into_inner);
        let mut routes: Vec<(String, FlowTotals)> = counters
            .iter()
            .map(|(route, backends)| {
                let mut totals = FlowTotals::default();
                for counters in backends.values() {
                    totals.add(FlowTotals::of(counters));
                }
                (route.clone(), totals)
            })
            .collect();
        routes.sort_by(|a, b| a.0.cmp(&b.0));
        routes
    }
}

/// Counter values at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowTotals {
    pub client_messages: u64,
    pub client_bytes: u64,
    pub backend_messages: u64,
    pub backend_bytes: u64,
}

impl FlowTotals {
    fn of(counters: &RelayCounters) -> Self {
        Self {
            client_messages: counters.client_messages.get(),
            client_bytes: counters.client_bytes.get(),
            backend_messages: counters.backend_messages.get(),
            backend_bytes: counters.backend_bytes.get(),
        }
    }

    pub fn add(&mut self, other: FlowTotals) {
        self.client_messages += other.client_messages;
        self.client_bytes += other.client_bytes;
        self.backend_messages += other.backend_messages;
        self.backend_bytes += other.backend_bytes;
    }
}

impl Collector for Flows {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let messages: Family<Flow, Counter> = Family::default();
        let bytes: Family<Flow, Counter> = Family::default();
        for (route, totals) in self.per_route() {
            let flow = |direction: &str| Flow {
                route: route.clone(),
                direction: direction.to_owned(),
            };
            let pairs = [
                (
                    CLIENT_TO_BACKEND,
                    totals.client_messages,
                    totals.client_bytes,
                ),
                (
                    BACKEND_TO_CLIENT,
                    totals.backend_messages,
                    totals.backend_bytes,
                ),
            ];
            for (direction, message_count, byte_count) in pairs {
                messages
                    .get_or_create(&flow(direction))
                    .inc_by(message_count);
                bytes.get_or_create(&flow(direction)).inc_by(byte_count);
            }
        }
        for (name, help, family) in [
            (
                "messages",
                "WebSocket messages relayed, per route and direction",
                &messages,
            ),
            (
                "payload_bytes",
                "WebSocket payload bytes relayed, per route and direction",
                &bytes,
            ),
        ] {
            family.encode(encoder.encode_descriptor(name, help, None, family.metric_type())?)?;
        }
        Ok(())
    }
}

/// Handles on one route's message and byte counters, held by a relay for its lifetime.
#[derive(Debug, Clone, Default)]
pub struct RelayCounters {
    pub client_messages: Counter,
    pub client_bytes: Counter,
    pub backend_messages: Counter,
    pub backend_bytes: Counter,
    /// Set on connections whose route compresses (`terminate`), none otherwise.
    pub deflate: Option<DeflateCounters>,
}

/// Data bytes of a `terminate` route before and after compression, per direction: what
/// crossed the client's wire (`compressed`, frame payloads as sent) and what it stands for
/// (`uncompressed`). Messages sent uncompressed count the same on both.
#[derive(Debug, Clone, Default)]
pub struct DeflateCounters {
    pub from_client_compressed: Counter,
    pub from_client_uncompressed: Counter,
    pub to_client_compressed: Counter,
    pub to_client_uncompressed: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeflateLabel {
    pub route: String,
    /// "from_client" (inflated by the gateway) or "to_client" (deflated by it).
    pub direction: &'static str,
    /// "compressed" (on the client's wire) or "uncompressed" (on the backend's).
    pub form: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_carry_the_prefix_and_labels() {
        let metrics = Metrics::new();
        let counters = metrics.relay_counters("rooms", "ws://a");
        metrics
            .relay_counters("rooms", "ws://b")
            .client_messages
            .inc_by(2);
        counters.client_messages.inc();
        counters.client_bytes.inc_by(5);
        metrics.handshake_failed("bad_key");
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"wsgate_messages_total{route="rooms",direction="client_to_backend"} 3"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"wsgate_payload_bytes_total{route="rooms",direction="client_to_backend"} 5"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"wsgate_handshake_failures_total{reason="bad_key"} 1"#));
        assert!(text.ends_with("# EOF\n"));
        let totals = metrics.flows.totals("rooms", "ws://a").unwrap();
        assert_eq!((totals.client_messages, totals.client_bytes), (1, 5));
        assert_eq!(metrics.flows.totals("rooms", "ws://c"), None);
    }
}
