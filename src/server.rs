//! A whole gateway process in one value: bind from a configuration, then serve until told to
//! stop. `main` and the integration tests start the gateway the same way.

use crate::config::Config;
use crate::gateway::{CurrentGateway, Gateway, GatewayError};
use crate::health::HealthChecks;
use crate::listener::{BindError, BoundListener, ConnectionCounter, accept_loop};
use crate::metrics::Outcome;
use crate::rebalance::Rebalancer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error(transparent)]
    Bind(#[from] BindError),
}

#[derive(Debug)]
pub struct Server {
    current: Arc<CurrentGateway>,
    listeners: Vec<BoundListener>,
    admin: Option<TcpListener>,
    counter: Arc<ConnectionCounter>,
    /// The active health checks of the current configuration.
    health: Arc<Mutex<Option<HealthChecks>>>,
    rebalancer: Arc<Rebalancer>,
}

/// Applies new configurations to a running server (SIGHUP, a changed file, tests).
#[derive(Debug, Clone)]
pub struct Reloader {
    current: Arc<CurrentGateway>,
    health: Arc<Mutex<Option<HealthChecks>>>,
    rebalancer: Arc<Rebalancer>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "listeners and the admin listener cannot change while running (sockets stay bound): restart wsgate to apply them"
    )]
    ListenersChanged,
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

impl Reloader {
    /// Switches new connections to `config`. Connections already open keep the configuration
    /// they started with; the running one stays if this fails.
    pub fn reload(&self, config: Config) -> Result<(), ReloadError> {
        let old = self.current.get();
        let result = self.apply(&old, config);
        self.count(if result.is_ok() { "applied" } else { "refused" });
        result
    }

    /// Counts a reload refused before it got here (a file that does not load).
    pub fn refused(&self) {
        self.count("refused");
    }

    fn count(&self, outcome: &str) {
        self.current
            .get()
            .metrics
            .config_reloads
            .get_or_create(&Outcome {
                result: outcome.to_owned(),
            })
            .inc();
    }

    fn apply(&self, old: &Arc<Gateway>, config: Config) -> Result<(), ReloadError> {
        if config.listeners != old.config.listeners || config.admin != old.config.admin {
            return Err(ReloadError::ListenersChanged);
        }
        let gateway = Arc::new(Gateway::with_shared(config, old.shared())?);
        // Before anything routes with it: a backend the checks hold down must not look
        // healthy for a moment, or its keys would move back to it and away again.
        crate::health::carry_over(old, &gateway);
        let health = crate::health::start(&gateway);
        self.current.replace(gateway);
        // Dropping the old checks stops them; the new ones watch the new backends.
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) = Some(health);
        self.rebalancer.reloaded();
        Ok(())
    }
}

impl Server {
    /// Compiles the configuration and binds every listener; nothing is accepted yet.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for listener in &config.listeners {
            listeners.push(BoundListener::bind(listener).await?);
        }
        let admin =
            match &config.admin {
                Some(admin) => Some(TcpListener::bind(admin.address).await.map_err(|source| {
                    BindError::Bind {
                        name: "admin".to_owned(),
                        address: admin.address,
                        source,
                    }
                })?),
                None => None,
            };
        let gateway = Arc::new(Gateway::new(config)?);
        let current = Arc::new(CurrentGateway::new(gateway));
        Ok(Self {
            rebalancer: Rebalancer::new(Arc::clone(&current)),
            current,
            listeners,
            admin,
            counter: Arc::default(),
            health: Arc::default(),
        })
    }

    /// The admin listener's bound address, if one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound addresses, in configuration order (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The configuration new connections currently get.
    pub fn gateway(&self) -> Arc<Gateway> {
        self.current.get()
    }

    /// A handle that applies new configurations while the server runs.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            current: Arc::clone(&self.current),
            health: Arc::clone(&self.health),
            rebalancer: Arc::clone(&self.rebalancer),
        }
    }

    /// Accepts on every listener until `stop` completes, then drains: every open connection is
    /// closed gracefully (WebSockets with 1001), waiting at most `drain.deadline` of the
    /// configuration in force (the last one reloaded).
    pub async fn run(mut self, stop: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut loops = Vec::new();
        for bound in std::mem::take(&mut self.listeners) {
            let mut stop_rx = stop_rx.clone();
            let stopped = async move {
                let _ = stop_rx.wait_for(|stopped| *stopped).await;
            };
            loops.push(tokio::spawn(accept_loop(
                bound,
                Arc::clone(&self.current),
                Arc::clone(&self.counter),
                stopped,
            )));
        }
        // The admin listener outlives the public ones until the drain is over, so /readyz can
        // say "draining" to the load balancer while connections close.
        let admin = self.admin.take().map(|admin| {
            let current = Arc::clone(&self.current);
            tokio::spawn(crate::admin::serve(admin, current, std::future::pending()))
        });
        // Active health checks run while the server does; they also end when it drains.
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(crate::health::start(&self.current.get()));
        // Moves connections whose sticky key changed backend; ends when the drain starts.
        let _rebalancing = self.rebalancer.start();
        stop.await;
        let _ = stop_tx.send(true);
        for accept in loops {
            let _ = accept.await;
        }
        self.drain().await;
        self.health.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(admin) = admin {
            admin.abort();
        }
    }

    /// Asks every connection to close (1001 to WebSocket clients and backends, `Connection:
    /// close` to HTTP clients) and waits for them, at most `drain.deadline`.
    async fn drain(&self) {
        let gateway = self.current.get();
        // One signal reaches every configuration generation still holding connections.
        let _ = gateway.drain.send(true);
        let deadline = tokio::time::Instant::now() + gateway.config.drain.deadline;
        while self.counter.current() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.counter.current();
        if left > 0 {
            tracing::warn!("{left} connections still open after the drain deadline; closing them");
        }
    }
}
