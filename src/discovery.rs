//! Upstreams whose backends come from DNS (`upstreams.NAME.dns`): `A`/`AAAA` records with the
//! configured port, or `SRV` records, asked of the system's resolver or a configured one
//! (hickory-resolver), again and again. The cluster's peers (`cluster.peers_dns`) are looked
//! up the same way, with the same rules, and applied through [`Reloader::discovered_peers`].
//!
//! Invariants:
//! - a lookup that fails, times out or names no address changes nothing: the last good set
//!   stays, so DNS trouble never empties an upstream (it is logged and counted);
//! - a different answer is applied through [`Reloader::discovered`], the same path as a
//!   reload that adds or removes backends: health verdicts carried over, new connections
//!   follow the new set, keys whose owner changed move within the rebalance window, the
//!   others stay where they are;
//! - a name is looked up again after its answer's TTL, held within the upstream's
//!   `min_interval` and `max_interval` (and after `min_interval` when the lookup failed);
//! - backends are ordered by address and port, so the same answer is the same set whatever
//!   order the server gives it in.

use crate::config::{Backend, Config, DnsBackends, DnsLookup, Peer};
use crate::metrics::{DnsLookupLabel, PeerDnsLookup};
use crate::server::Reloader;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// A lookup, with its retries, not answered within this long failed.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// What a name resolved to.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub backends: Vec<Backend>,
    /// How long the answer may be kept.
    pub ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("the lookup of {name} failed: {why}")]
    Failed { name: String, why: String },
    #[error("{name} has no address")]
    Empty { name: String },
    #[error("the lookup of {name} took longer than {LOOKUP_TIMEOUT:?}")]
    TimedOut { name: String },
    #[error("no resolver: {0}")]
    Resolver(String),
}

impl LookupError {
    fn label(&self) -> &'static str {
        match self {
            Self::Empty { .. } => "empty",
            Self::Failed { .. } | Self::TimedOut { .. } | Self::Resolver(_) => "failed",
        }
    }
}

/// The wait before the next lookup after an answer valid for `ttl`.
pub fn next_lookup(ttl: Duration, spec: &DnsBackends) -> Duration {
    ttl.clamp(spec.min_interval, spec.max_interval)
}

/// The backends for resolved `(address, port, weight)` targets, ordered and without repeats.
pub fn backends_of(spec: &DnsBackends, targets: &[(IpAddr, u16, u32)]) -> Vec<Backend> {
    let scheme = if spec.secure { "wss" } else { "ws" };
    let mut backends: Vec<Backend> = targets
        .iter()
        .map(|&(ip, port, weight)| {
            let authority = SocketAddr::new(ip, port);
            Backend {
                url: format!("{scheme}://{authority}{}", spec.base_path),
                secure: spec.secure,
                host: ip.to_string(),
                port,
                base_path: spec.base_path.clone(),
                weight: weight.clamp(1, Backend::MAX_WEIGHT),
            }
        })
        .collect();
    backends.sort_by(|a, b| {
        (a.host.parse::<IpAddr>().ok(), a.port).cmp(&(b.host.parse().ok(), b.port))
    });
    backends.dedup_by(|a, b| a.url == b.url);
    backends
}

/// One resolver per configured name server (`None`: the system's), built when first needed.
#[derive(Default)]
pub struct Resolvers(HashMap<Option<SocketAddr>, TokioResolver>);

impl std::fmt::Debug for Resolvers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl Resolvers {
    pub fn get(&mut self, server: Option<SocketAddr>) -> Result<&TokioResolver, LookupError> {
        match self.0.entry(server) {
            std::collections::hash_map::Entry::Occupied(entry) => Ok(entry.into_mut()),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let resolver = build(server).map_err(LookupError::Resolver)?;
                Ok(entry.insert(resolver))
            }
        }
    }
}

fn build(server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let mut builder = match server {
        None => TokioResolver::builder_tokio().map_err(|e| e.to_string())?,
        Some(server) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = server.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = server.port();
            let name_server = NameServerConfig::new(server.ip(), true, vec![udp, tcp]);
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![name_server]),
                TokioRuntimeProvider::default(),
            )
        }
    };
    let options = builder.options_mut();
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    options.timeout = Duration::from_secs(2);
    options.attempts = 2;
    builder.build().map_err(|e| e.to_string())
}

/// Resolved `(address, port, weight)` targets and how long they may be kept.
type Targets = (Vec<(IpAddr, u16, u32)>, Duration);

/// Resolves `spec` once.
pub async fn lookup(resolver: &TokioResolver, spec: &DnsBackends) -> Result<Answer, LookupError> {
    let (targets, ttl) = lookup_targets(resolver, spec).await?;
    Ok(Answer {
        backends: backends_of(spec, &targets),
        ttl,
    })
}

async fn lookup_targets(
    resolver: &TokioResolver,
    spec: &DnsBackends,
) -> Result<Targets, LookupError> {
    let name = spec.lookup.name().to_owned();
    match tokio::time::timeout(LOOKUP_TIMEOUT, resolve(resolver, spec)).await {
        Ok(result) => result,
        Err(_) => Err(LookupError::TimedOut { name }),
    }
}

/// Resolves `cluster.peers_dns` once: the peers in the answer (this instance's own address
/// left out, so a set of only this instance is a good, empty answer), and its TTL.
pub async fn lookup_peers(
    resolver: &TokioResolver,
    cluster: &crate::config::Cluster,
    spec: &DnsBackends,
) -> Result<(Vec<Peer>, Duration), LookupError> {
    let (targets, ttl) = lookup_targets(resolver, spec).await?;
    let addresses = targets
        .into_iter()
        .map(|(ip, port, _)| SocketAddr::new(ip, port));
    Ok((cluster.peers_at(addresses), ttl))
}

async fn resolve(resolver: &TokioResolver, spec: &DnsBackends) -> Result<Targets, LookupError> {
    let name = spec.lookup.name();
    let failed = |error: hickory_resolver::net::NetError| {
        if error.is_no_records_found() {
            LookupError::Empty {
                name: name.to_owned(),
            }
        } else {
            LookupError::Failed {
                name: name.to_owned(),
                why: error.to_string(),
            }
        }
    };
    let (targets, valid_until) = match &spec.lookup {
        DnsLookup::Address { port, .. } => {
            let answer = resolver.lookup_ip(name).await.map_err(failed)?;
            let targets: Vec<_> = answer.iter().map(|ip| (ip, *port, 1)).collect();
            (targets, answer.valid_until())
        }
        DnsLookup::Srv { .. } => {
            let answer = resolver.srv_lookup(name).await.map_err(failed)?;
            let records: Vec<_> = answer
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SRV(srv) => Some(srv.clone()),
                    _ => None,
                })
                .collect();
            // Only the most preferred priority is used; the others are fallbacks the
            // health checks and retries already provide within one set.
            let best = records.iter().map(|srv| srv.priority).min();
            let mut targets = Vec::new();
            let mut valid_until = answer.valid_until();
            for srv in records.iter().filter(|srv| Some(srv.priority) == best) {
                let mut ips: Vec<IpAddr> = answer
                    .additionals()
                    .iter()
                    .filter(|r| r.name == srv.target)
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                        _ => None,
                    })
                    .collect();
                if ips.is_empty() {
                    match resolver.lookup_ip(srv.target.clone()).await {
                        Ok(found) => {
                            valid_until = valid_until.min(found.valid_until());
                            ips.extend(found.iter());
                        }
                        // One target without an address is skipped; the others still serve.
                        Err(error) => {
                            tracing::debug!(target = %srv.target, "SRV target has no address: {error}");
                        }
                    }
                }
                let weight = u32::from(srv.weight);
                targets.extend(ips.into_iter().map(|ip| (ip, srv.port, weight)));
            }
            (targets, valid_until)
        }
    };
    if targets.is_empty() {
        return Err(LookupError::Empty {
            name: name.to_owned(),
        });
    }
    Ok((
        targets,
        valid_until.saturating_duration_since(Instant::now()),
    ))
}

/// Resolves `cluster.peers_dns` once before the gateway starts; on failure the instance
/// starts with no peers (sessions of others are gone until DNS answers).
pub async fn resolve_initial_peers(config: &mut Config) -> Option<(DnsBackends, Vec<Peer>)> {
    let cluster = config.cluster.as_mut()?;
    let spec = cluster.peers_dns.clone()?;
    let answer = match Resolvers::default().get(spec.resolver) {
        Ok(resolver) => lookup_peers(resolver, cluster, &spec).await,
        Err(error) => Err(error),
    };
    match answer {
        Ok((peers, _)) => {
            tracing::info!("DNS: {} peers from {}", peers.len(), spec.lookup.name());
            cluster.peers = peers.clone();
            Some((spec, peers))
        }
        Err(error) => {
            tracing::warn!("DNS: {error}; no peers until it answers");
            None
        }
    }
}

/// Resolves every DNS upstream of `config` once, before the gateway starts, so that it starts
/// with backends; an upstream whose lookup fails starts empty (503 until DNS answers).
pub async fn resolve_initial(config: &mut Config) -> Vec<(String, DnsBackends, Vec<Backend>)> {
    let mut resolvers = Resolvers::default();
    let mut found = Vec::new();
    for upstream in &mut config.upstreams {
        let Some(spec) = upstream.dns.clone() else {
            continue;
        };
        let answer = match resolvers.get(spec.resolver) {
            Ok(resolver) => lookup(resolver, &spec).await,
            Err(error) => Err(error),
        };
        match answer {
            Ok(answer) => {
                tracing::info!(upstream = %upstream.name, "DNS: {} backends from {}", answer.backends.len(), spec.lookup.name());
                upstream.backends = answer.backends.clone();
                found.push((upstream.name.clone(), spec, answer.backends));
            }
            Err(error) => {
                tracing::warn!(upstream = %upstream.name, "DNS: {error}; no backends until it answers");
            }
        }
    }
    found
}

/// Looks up every DNS upstream of the configuration in force, each when it is due, and
/// applies changed answers, until the task is dropped.
pub async fn run(reloader: Reloader) {
    let mut resolvers = Resolvers::default();
    // Each lookup and when it is due.
    let mut due: HashMap<Target, (DnsBackends, tokio::time::Instant)> = HashMap::new();
    loop {
        let gateway = reloader.current();
        let mut specs: Vec<(Target, DnsBackends)> = gateway
            .config
            .upstreams
            .iter()
            .filter_map(|u| {
                u.dns
                    .clone()
                    .map(|dns| (Target::Upstream(u.name.clone()), dns))
            })
            .collect();
        if let Some(spec) = gateway
            .config
            .cluster
            .as_ref()
            .and_then(|c| c.peers_dns.clone())
        {
            specs.push((Target::Peers, spec));
        }
        drop(gateway);
        due.retain(|name, (spec, _)| specs.iter().any(|(n, s)| n == name && s == spec));
        let now = tokio::time::Instant::now();
        for (name, spec) in specs {
            due.entry(name).or_insert((spec, now));
        }
        let ready: Vec<(Target, DnsBackends)> = due
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(name, (spec, _))| (name.clone(), spec.clone()))
            .collect();
        for (name, spec) in ready {
            let wait = match &name {
                Target::Upstream(upstream) => {
                    refresh(&reloader, &mut resolvers, upstream, &spec).await
                }
                Target::Peers => refresh_peers(&reloader, &mut resolvers, &spec).await,
            };
            if let Some(entry) = due.get_mut(&name) {
                entry.1 = tokio::time::Instant::now() + wait;
            }
        }
        let next = due.values().map(|(_, at)| *at).min();
        let changed = reloader.config_changed();
        tokio::select! {
            () = changed.notified() => {}
            () = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// What a lookup is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Target {
    Upstream(String),
    Peers,
}

/// One lookup of `cluster.peers_dns` and what it leads to; returns the wait until the next.
async fn refresh_peers(
    reloader: &Reloader,
    resolvers: &mut Resolvers,
    spec: &DnsBackends,
) -> Duration {
    let gateway = reloader.current();
    let count = |result: &'static str| {
        gateway
            .metrics
            .peer_dns_lookups
            .get_or_create(&PeerDnsLookup { result })
            .inc();
    };
    let Some(cluster) = &gateway.config.cluster else {
        return spec.min_interval;
    };
    let name = spec.lookup.name();
    let answer = match resolvers.get(spec.resolver) {
        Ok(resolver) => lookup_peers(resolver, cluster, spec).await,
        Err(error) => Err(error),
    };
    match answer {
        Ok((peers, ttl)) => {
            let found = peers.len();
            match reloader.discovered_peers(spec, peers) {
                Ok(true) => {
                    tracing::info!("DNS: {name} answered {found} peers; applied");
                    count("changed");
                }
                Ok(false) => count("unchanged"),
                Err(error) => {
                    tracing::warn!("DNS: the new peers could not be applied: {error}");
                    count("failed");
                }
            }
            next_lookup(ttl, spec)
        }
        Err(error) => {
            tracing::warn!("DNS: {error}; keeping the last good peers");
            count(error.label());
            spec.min_interval
        }
    }
}

/// One lookup of `upstream` and what it leads to; returns the wait until the next.
async fn refresh(
    reloader: &Reloader,
    resolvers: &mut Resolvers,
    upstream: &str,
    spec: &DnsBackends,
) -> Duration {
    let metrics = std::sync::Arc::clone(&reloader.current().metrics);
    let count = |result: &'static str| {
        metrics
            .dns_lookups
            .get_or_create(&DnsLookupLabel {
                upstream: upstream.to_owned(),
                result,
            })
            .inc();
    };
    let answer = match resolvers.get(spec.resolver) {
        Ok(resolver) => lookup(resolver, spec).await,
        Err(error) => Err(error),
    };
    match answer {
        Ok(answer) => {
            let count_now = answer.backends.len();
            match reloader.discovered(upstream, spec, answer.backends) {
                Ok(true) => {
                    tracing::info!(
                        upstream,
                        "DNS: {} answered {count_now} backends; applied",
                        spec.lookup.name()
                    );
                    count("changed");
                }
                Ok(false) => count("unchanged"),
                Err(error) => {
                    tracing::warn!(
                        upstream,
                        "DNS: the new backends could not be applied: {error}"
                    );
                    count("failed");
                }
            }
            next_lookup(answer.ttl, spec)
        }
        Err(error) => {
            tracing::warn!(upstream, "DNS: {error}; keeping the last good backends");
            count(error.label());
            spec.min_interval
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(secure: bool) -> DnsBackends {
        DnsBackends {
            lookup: DnsLookup::Address {
                name: "rooms.internal".into(),
                port: 9001,
            },
            secure,
            base_path: "/ws".into(),
            resolver: None,
            min_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(30),
        }
    }

    #[test]
    fn the_same_answer_in_another_order_is_the_same_set() {
        let a: IpAddr = "10.0.0.2".parse().unwrap();
        let b: IpAddr = "10.0.0.10".parse().unwrap();
        let c: IpAddr = "2001:db8::1".parse().unwrap();
        let one = backends_of(
            &spec(false),
            &[(b, 9001, 1), (c, 9001, 1), (a, 9001, 1), (a, 9001, 1)],
        );
        let two = backends_of(&spec(false), &[(c, 9001, 1), (a, 9001, 1), (b, 9001, 1)]);
        assert_eq!(one, two);
        let urls: Vec<_> = one.iter().map(|b| b.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "ws://10.0.0.2:9001/ws",
                "ws://10.0.0.10:9001/ws",
                "ws://[2001:db8::1]:9001/ws"
            ]
        );
        let secure = backends_of(&spec(true), &[(a, 443, 0), (b, 443, 5000)]);
        assert_eq!(secure[0].url, "wss://10.0.0.2:443/ws");
        assert_eq!(
            (secure[0].weight, secure[1].weight),
            (1, Backend::MAX_WEIGHT)
        );
    }

    #[test]
    fn the_ttl_is_held_within_the_intervals() {
        let spec = spec(false);
        assert_eq!(next_lookup(Duration::ZERO, &spec), Duration::from_secs(1));
        assert_eq!(
            next_lookup(Duration::from_secs(7), &spec),
            Duration::from_secs(7)
        );
        assert_eq!(
            next_lookup(Duration::from_secs(86400), &spec),
            Duration::from_secs(30)
        );
    }
}
