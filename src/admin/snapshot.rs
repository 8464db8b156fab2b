//! The dashboard's snapshot: one JSON document describing the gateway now, with per-second
//! rates computed as differences of the process-lifetime counters between two samples.
//!
//! Invariants:
//! - only counters and gauges that already exist are read (no new work on the frame path):
//!   connections, messages and payload bytes per route, backend and direction, the
//!   balancers' health bits and the recent-errors ring;
//! - a rate is `(value now - value at the previous sample) / seconds between them`; a series
//!   seen for the first time, or a previous sample older than [`MAX_RATE_GAP`], reports 0
//!   rather than an average over a long unwatched stretch;
//! - the routes and backends listed are those of the configuration generation sampled; the
//!   counters behind them are shared by every generation, so a reload does not reset them; a
//!   route's message rates count every backend it used, listed or not (one removed by a
//!   reload may still hold connections).

use crate::config::Compression;
use crate::gateway::Gateway;
use crate::metrics::{FlowTotals, Metrics, RouteBackend};
use crate::recent_errors::ErrorEntry;
use serde::Serialize;
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Rates over a longer gap than this are not shown: nobody was watching in between.
pub const MAX_RATE_GAP: Duration = Duration::from_secs(5);

/// Recent errors sent per snapshot (the ring may keep more).
pub const ERRORS_SHOWN: usize = 20;

#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// Unix time of the sample, milliseconds.
    pub at_ms: u64,
    /// Seconds the rates cover (0 for a first sample).
    pub interval_s: f64,
    pub draining: bool,
    pub routes: Vec<RouteStats>,
    pub upstreams: Vec<UpstreamStats>,
    /// Newest first, at most `ERRORS_SHOWN`.
    pub errors: Vec<ErrorView>,
    /// Errors recorded since the process started.
    pub errors_total: u64,
}

#[derive(Debug, Serialize)]
pub struct RouteStats {
    pub name: String,
    pub upstream: String,
    pub active: i64,
    pub opened_per_s: f64,
    pub messages_per_s: Directions,
    pub bytes_per_s: Directions,
    pub backends: Vec<RouteBackendStats>,
    /// Bytes before and after permessage-deflate, since start (`terminate` routes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionStats>,
}

/// A compress-terminating route's data bytes: on the client's wire (`compressed`) and what
/// they stand for (`uncompressed`), each way, and the ratio of the two overall.
#[derive(Debug, Default, Serialize)]
pub struct CompressionStats {
    pub from_client_compressed: u64,
    pub from_client_uncompressed: u64,
    pub to_client_compressed: u64,
    pub to_client_uncompressed: u64,
    /// Uncompressed bytes per compressed byte, both ways (1 when nothing passed yet).
    pub ratio: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Directions {
    pub client_to_backend: f64,
    pub backend_to_client: f64,
}

#[derive(Debug, Serialize)]
pub struct RouteBackendStats {
    pub backend: String,
    pub active: i64,
    pub opened_per_s: f64,
    pub messages_per_s: Directions,
    pub bytes_per_s: Directions,
}

#[derive(Debug, Serialize)]
pub struct UpstreamStats {
    pub name: String,
    pub backends: Vec<BackendStats>,
}

#[derive(Debug, Serialize)]
pub struct BackendStats {
    pub url: String,
    pub weight: u32,
    /// New connections may go to it.
    pub healthy: bool,
    /// "up", or what keeps it out: "drained" (an operator), "down" (active checks),
    /// "backoff" (passive), comma-separated.
    pub state: String,
    /// Connections open to it over every route using its upstream.
    pub active: i64,
    pub opened_per_s: f64,
    /// Both directions, over every route using its upstream.
    pub messages_per_s: f64,
    pub last_change: Option<Change>,
}

#[derive(Debug, Serialize)]
pub struct Change {
    pub at_ms: u64,
    pub why: String,
}

#[derive(Debug, Serialize)]
pub struct ErrorView {
    pub seq: u64,
    pub at_ms: u64,
    pub kind: &'static str,
    pub route: Option<String>,
    pub backend: Option<String>,
    pub detail: String,
}

/// Remembers the previous sample's counter values, to turn the next one into rates.
#[derive(Debug, Default)]
pub struct Sampler {
    previous: HashMap<String, u64>,
    previous_at: Option<Instant>,
}

impl Sampler {
    /// Forgets the previous sample: the next rates are 0 (nobody watched in between).
    pub fn reset(&mut self) {
        self.previous.clear();
        self.previous_at = None;
    }

    /// Samples `gateway` at `now` (`wall` is the same moment on the wall clock).
    pub fn sample(&mut self, gateway: &Gateway, now: Instant, wall: SystemTime) -> Snapshot {
        let interval = self
            .previous_at
            .map(|at| now.saturating_duration_since(at))
            .filter(|gap| *gap <= MAX_RATE_GAP && !gap.is_zero());
        let previous = if interval.is_some() {
            std::mem::take(&mut self.previous)
        } else {
            HashMap::new()
        };
        let mut rates = Rates {
            previous,
            current: HashMap::new(),
            seconds: interval.map_or(0.0, |gap| gap.as_secs_f64()),
        };
        let metrics = &gateway.metrics;
        // Per backend URL: connections, opened/s, messages/s, over every route.
        let mut backend_totals: HashMap<&str, (i64, f64, f64)> = HashMap::new();
        let mut routes = Vec::with_capacity(gateway.config.routes.len());
        let route_flows: HashMap<String, FlowTotals> =
            metrics.flows.per_route().into_iter().collect();
        for route in &gateway.config.routes {
            let upstream = &gateway.upstreams[route.upstream];
            let mut backends = Vec::new();
            for backend in upstream.balancer.backends() {
                let labels = RouteBackend {
                    route: route.name.clone(),
                    backend: backend.url.clone(),
                };
                let active = metrics
                    .connections_active
                    .get(&labels)
                    .map_or(0, |gauge| gauge.get());
                let opened = metrics
                    .connections_opened
                    .get(&labels)
                    .map_or(0, |counter| counter.get());
                let series = format!("{}\0{}", route.name, backend.url);
                let opened_per_s = rates.rate(format!("opened\0{series}"), opened);
                let flows = metrics
                    .flows
                    .totals(&route.name, &backend.url)
                    .unwrap_or_default();
                let (messages_per_s, bytes_per_s) = rates.flows(&series, flows);
                let total = backend_totals.entry(&backend.url).or_default();
                total.0 += active;
                total.1 += opened_per_s;
                total.2 += messages_per_s.client_to_backend + messages_per_s.backend_to_client;
                backends.push(RouteBackendStats {
                    backend: backend.url.clone(),
                    active,
                    opened_per_s,
                    messages_per_s,
                    bytes_per_s,
                });
            }
            let flows = route_flows.get(&route.name).copied().unwrap_or_default();
            let (messages_per_s, bytes_per_s) = rates.flows(&route.name, flows);
            routes.push(RouteStats {
                name: route.name.clone(),
                upstream: upstream.name.clone(),
                active: backends.iter().map(|b| b.active).sum(),
                opened_per_s: backends.iter().map(|b| b.opened_per_s).sum(),
                messages_per_s,
                bytes_per_s,
                backends,
                compression: matches!(route.compression, Compression::Terminate(_))
                    .then(|| compression_stats(metrics, &route.name)),
            });
        }
        let upstreams = gateway
            .upstreams
            .iter()
            .map(|upstream| {
                let balancer = &upstream.balancer;
                let backends = balancer
                    .backends()
                    .iter()
                    .enumerate()
                    .map(|(index, backend)| {
                        let (active, opened_per_s, messages_per_s) = backend_totals
                            .get(backend.url.as_str())
                            .copied()
                            .unwrap_or_default();
                        BackendStats {
                            url: backend.url.clone(),
                            weight: balancer.weight(index),
                            healthy: balancer.is_healthy(index),
                            state: balancer.state_label(index),
                            active,
                            opened_per_s,
                            messages_per_s: (messages_per_s * 100.0).round() / 100.0,
                            last_change: balancer.last_change(index).map(|(at, why)| Change {
                                at_ms: unix_ms(at),
                                why,
                            }),
                        }
                    })
                    .collect();
                UpstreamStats {
                    name: upstream.name.clone(),
                    backends,
                }
            })
            .collect();
        let errors = gateway
            .errors
            .newest_first()
            .into_iter()
            .take(ERRORS_SHOWN)
            .map(ErrorView::from)
            .collect();
        self.previous = rates.current;
        self.previous_at = Some(now);
        Snapshot {
            at_ms: unix_ms(wall),
            interval_s: rates.seconds,
            draining: !gateway.drain.is_serving(),
            routes,
            upstreams,
            errors,
            errors_total: gateway.errors.total(),
        }
    }
}

struct Rates {
    previous: HashMap<String, u64>,
    current: HashMap<String, u64>,
    seconds: f64,
}

impl Rates {
    /// Message and byte rates of one series of flows, `series` naming it.
    fn flows(&mut self, series: &str, totals: FlowTotals) -> (Directions, Directions) {
        let messages = Directions {
            client_to_backend: self.rate(format!("cm\0{series}"), totals.client_messages),
            backend_to_client: self.rate(format!("bm\0{series}"), totals.backend_messages),
        };
        let bytes = Directions {
            client_to_backend: self.rate(format!("cb\0{series}"), totals.client_bytes),
            backend_to_client: self.rate(format!("bb\0{series}"), totals.backend_bytes),
        };
        (messages, bytes)
    }

    fn rate(&mut self, key: String, value: u64) -> f64 {
        let rate = match self.previous.get(&key) {
            Some(&before) if self.seconds > 0.0 => {
                value.saturating_sub(before) as f64 / self.seconds
            }
            _ => 0.0,
        };
        self.current.insert(key, value);
        // Two decimals are plenty on a screen and keep the JSON short.
        (rate * 100.0).round() / 100.0
    }
}

impl From<ErrorEntry> for ErrorView {
    fn from(entry: ErrorEntry) -> Self {
        ErrorView {
            seq: entry.seq,
            at_ms: unix_ms(entry.at),
            kind: entry.kind.name(),
            route: entry.route,
            backend: entry.backend,
            detail: entry.detail,
        }
    }
}

fn compression_stats(metrics: &Metrics, route: &str) -> CompressionStats {
    let counters = metrics.deflate_counters(route);
    let mut stats = CompressionStats {
        from_client_compressed: counters.from_client_compressed.get(),
        from_client_uncompressed: counters.from_client_uncompressed.get(),
        to_client_compressed: counters.to_client_compressed.get(),
        to_client_uncompressed: counters.to_client_uncompressed.get(),
        ratio: 1.0,
    };
    let wire = stats.from_client_compressed + stats.to_client_compressed;
    let plain = stats.from_client_uncompressed + stats.to_client_uncompressed;
    if wire > 0 {
        stats.ratio = ((plain as f64 / wire as f64) * 100.0).round() / 100.0;
    }
    stats
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recent_errors::ErrorKind;

    fn gateway() -> Gateway {
        let yaml = "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends:\n      - ws://127.0.0.1:9001\n      - ws://127.0.0.1:9002\nroutes:\n  - name: chat\n    upstream: app\n";
        Gateway::new(crate::config::from_yaml_str(yaml, "t.yaml").unwrap()).unwrap()
    }

    #[test]
    fn rates_are_differences_over_the_interval() {
        let gateway = gateway();
        let mut sampler = Sampler::default();
        let start = Instant::now();
        let first = sampler.sample(&gateway, start, SystemTime::now());
        assert_eq!(first.interval_s, 0.0);
        assert_eq!(first.routes[0].messages_per_s.client_to_backend, 0.0);

        let counters = gateway
            .metrics
            .relay_counters("chat", "ws://127.0.0.1:9002");
        counters.client_messages.inc_by(30);
        counters.backend_bytes.inc_by(1000);
        let labels = RouteBackend {
            route: "chat".into(),
            backend: "ws://127.0.0.1:9002".into(),
        };
        gateway
            .metrics
            .connections_opened
            .get_or_create(&labels)
            .inc_by(4);
        gateway
            .metrics
            .connections_active
            .get_or_create(&labels)
            .set(3);
        gateway.upstreams[0].balancer.set_healthy(0, false);
        gateway
            .errors
            .record(ErrorKind::BackendConnect, Some("chat"), None, "refused");

        let second = sampler.sample(&gateway, start + Duration::from_secs(2), SystemTime::now());
        assert_eq!(second.interval_s, 2.0);
        let route = &second.routes[0];
        assert_eq!(route.messages_per_s.client_to_backend, 15.0);
        assert_eq!(route.bytes_per_s.backend_to_client, 500.0);
        assert_eq!((route.active, route.opened_per_s), (3, 2.0));
        let backends = &second.upstreams[0].backends;
        assert_eq!(
            (backends[0].healthy, backends[0].state.as_str()),
            (false, "down")
        );
        assert_eq!((backends[1].active, backends[1].opened_per_s), (3, 2.0));
        assert_eq!(backends[1].messages_per_s, 15.0);
        let per_backend = &route.backends[1];
        assert_eq!(per_backend.messages_per_s.client_to_backend, 15.0);
        assert_eq!(per_backend.bytes_per_s.backend_to_client, 500.0);
        assert_eq!(route.backends[0].messages_per_s.client_to_backend, 0.0);
        assert_eq!(second.errors[0].kind, "backend_connect");

        // Nothing new: rates fall back to zero. After a long gap: zero, not an average.
        let third = sampler.sample(&gateway, start + Duration::from_secs(3), SystemTime::now());
        assert_eq!(third.routes[0].messages_per_s.client_to_backend, 0.0);
        counters.client_messages.inc_by(100);
        let late = sampler.sample(&gateway, start + Duration::from_secs(60), SystemTime::now());
        assert_eq!(late.routes[0].messages_per_s.client_to_backend, 0.0);
        assert_eq!(late.interval_s, 0.0);
    }

    #[test]
    fn terminate_routes_show_bytes_before_and_after_compression() {
        let yaml = "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends:\n      - ws://127.0.0.1:9001\nroutes:\n  - name: plain\n    match: {path_prefix: /p}\n    upstream: app\n  - name: chat\n    upstream: app\n    compression: terminate\n";
        let gateway = Gateway::new(crate::config::from_yaml_str(yaml, "t.yaml").unwrap()).unwrap();
        let counters = gateway.metrics.deflate_counters("chat");
        counters.from_client_compressed.inc_by(100);
        counters.from_client_uncompressed.inc_by(300);
        counters.to_client_uncompressed.inc_by(900);
        counters.to_client_compressed.inc_by(200);
        let snapshot = Sampler::default().sample(&gateway, Instant::now(), SystemTime::now());
        let chat = snapshot.routes.iter().find(|r| r.name == "chat").unwrap();
        let stats = chat.compression.as_ref().unwrap();
        assert_eq!(
            (stats.from_client_compressed, stats.to_client_compressed),
            (100, 200)
        );
        assert_eq!(stats.ratio, 4.0);
        let plain = snapshot.routes.iter().find(|r| r.name == "plain").unwrap();
        assert!(plain.compression.is_none());
    }
}
