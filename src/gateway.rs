//! The running gateway's shared state: the configuration compiled into what the per-connection
//! code consults (route table, one balancer and TLS client per upstream, counters).
//!
//! Built once per configuration; connections hold an `Arc` to the one they started with, so a
//! later reload never changes a connection in flight.

use crate::config::{Config, Route};
use crate::routing::{RouteTable, UpstreamBalancer};
use crate::tls::{self, TlsError};
use crate::upstream::{BackendTls, backend_tls};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug)]
pub struct UpstreamRuntime {
    pub name: String,
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
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("upstream {upstream}: {source}")]
    UpstreamTls { upstream: String, source: TlsError },
}

impl Gateway {
    pub fn new(config: Config) -> Result<Self, GatewayError> {
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
            upstreams.push(UpstreamRuntime {
                name: upstream.name.clone(),
                balancer: Arc::new(UpstreamBalancer::new(&upstream.backends)),
                tls,
            });
        }
        Ok(Self {
            routes: RouteTable::new(&config.routes),
            route_active: config.routes.iter().map(|_| AtomicU32::new(0)).collect(),
            upstreams,
            config,
        })
    }

    pub fn route(&self, index: usize) -> &Route {
        &self.config.routes[index]
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
