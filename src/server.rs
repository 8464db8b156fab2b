//! A whole gateway process in one value: bind from a configuration, then serve until told to
//! stop. `main` and the integration tests start the gateway the same way.

use crate::admin::AdminListener;
use crate::config::{Backend, Config, DnsBackends, Peer};
use crate::drain::Phase;
use crate::gateway::{CurrentGateway, Gateway, GatewayError};
use crate::handover::{self, Inherited};
use crate::health::HealthChecks;
use crate::listener::{BindError, BoundListener, ConnectionCounter, accept_loop};
use crate::metrics::Outcome;
use crate::rebalance::Rebalancer;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

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
    admin: Option<AdminListener>,
    counter: Arc<ConnectionCounter>,
    /// The active health checks of the current configuration.
    health: Arc<Mutex<Option<HealthChecks>>>,
    rebalancer: Arc<Rebalancer>,
    handed_over: Arc<Notify>,
    discovered: Arc<Discovered>,
}

/// What DNS last answered for each upstream with `dns`, so that a reload of the file (whose
/// DNS upstreams list no backends) keeps them.
///
/// Invariant: every configuration change (a reload, a new DNS answer) is made holding `found`,
/// so two changes never start from the same old configuration and undo each other.
#[derive(Debug, Default)]
struct Discovered {
    found: Mutex<Found>,
    /// Notified after every configuration change, for the lookups to follow it.
    changed: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Found {
    /// Each DNS upstream's question and its last good answer.
    upstreams: HashMap<String, (DnsBackends, Vec<Backend>)>,
    /// `cluster.peers_dns` and its last good answer.
    peers: Option<(DnsBackends, Vec<Peer>)>,
}

/// Applies new configurations to a running server (SIGHUP, a changed file, a new DNS answer,
/// tests).
#[derive(Debug, Clone)]
pub struct Reloader {
    current: Arc<CurrentGateway>,
    counter: Arc<ConnectionCounter>,
    health: Arc<Mutex<Option<HealthChecks>>>,
    rebalancer: Arc<Rebalancer>,
    discovered: Arc<Discovered>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "listeners and the admin listener cannot change while running (sockets stay bound): restart wsgate to apply them"
    )]
    ListenersChanged,
    #[error(
        "the instance name (sessions.instance, cluster.name) cannot change while running: its sessions' ids name it, and peers forward to it by that name; restart wsgate to rename it"
    )]
    InstanceChanged,
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

impl Reloader {
    /// Switches new connections to `config`. Connections already open keep the configuration
    /// they started with; the running one stays if this fails.
    pub fn reload(&self, mut config: Config) -> Result<(), ReloadError> {
        let found = self
            .discovered
            .found
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // An upstream that asks DNS the same question keeps what it last answered; a new or
        // changed one is empty until its first answer, which is asked for at once.
        for upstream in &mut config.upstreams {
            if let (Some(spec), Some((was, backends))) =
                (&upstream.dns, found.upstreams.get(&upstream.name))
                && spec.same_question(was)
            {
                upstream.backends = backends.clone();
            }
        }
        // The same for the cluster's peers; a changed name has none until it answers.
        if let Some(cluster) = &mut config.cluster
            && let (Some(spec), Some((was, peers))) = (&cluster.peers_dns, &found.peers)
            && spec.same_question(was)
        {
            cluster.peers = peers.clone();
            cluster.peers.retain(|peer| peer.name != cluster.name);
        }
        let old = self.current.get();
        let result = self.apply(&old, config);
        drop(found);
        self.count(if result.is_ok() { "applied" } else { "refused" });
        if result.is_ok() {
            old.metrics.config_applied();
            self.discovered.changed.notify_one();
        }
        result
    }

    /// Applies a DNS answer for `upstream`'s `spec`: `Ok(true)` when it changed the backends
    /// (applied like a reload that changed them), `Ok(false)` when it did not, or when the
    /// configuration no longer looks `upstream` up that way.
    pub fn discovered(
        &self,
        upstream: &str,
        spec: &DnsBackends,
        backends: Vec<Backend>,
    ) -> Result<bool, ReloadError> {
        let mut found = self
            .discovered
            .found
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let old = self.current.get();
        let Some(index) = old
            .config
            .upstreams
            .iter()
            .position(|u| u.name == upstream && u.dns.as_ref() == Some(spec))
        else {
            return Ok(false);
        };
        found
            .upstreams
            .insert(upstream.to_owned(), (spec.clone(), backends.clone()));
        if old.config.upstreams[index].backends == backends {
            return Ok(false);
        }
        let mut config = old.config.clone();
        config.upstreams[index].backends = backends;
        self.apply_discovered(&old, config, found)
    }

    /// Applies a DNS answer for `cluster.peers_dns` (`spec`): `Ok(true)` when it changed the
    /// peers, `Ok(false)` when it did not, or when the configuration no longer asks that.
    /// Sessions and connections are untouched: only where later forwards may go changes.
    pub fn discovered_peers(
        &self,
        spec: &DnsBackends,
        peers: Vec<Peer>,
    ) -> Result<bool, ReloadError> {
        let mut found = self
            .discovered
            .found
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let old = self.current.get();
        let Some(cluster) = old
            .config
            .cluster
            .as_ref()
            .filter(|c| c.peers_dns.as_ref() == Some(spec))
        else {
            return Ok(false);
        };
        found.peers = Some((spec.clone(), peers.clone()));
        if cluster.peers == peers {
            return Ok(false);
        }
        let mut config = old.config.clone();
        if let Some(cluster) = &mut config.cluster {
            cluster.peers = peers;
        }
        self.apply_discovered(&old, config, found)
    }

    /// Puts `config`, `old`'s with a DNS answer folded in, in place: `Ok(true)`. The answers'
    /// lock (`found`) is held until then, so a reload that starts meanwhile folds this answer
    /// into its own configuration.
    fn apply_discovered(
        &self,
        old: &Arc<Gateway>,
        config: Config,
        found: MutexGuard<'_, Found>,
    ) -> Result<bool, ReloadError> {
        self.apply(old, config)?;
        drop(found);
        // A new generation like a reload's, though not counted among the file's reloads.
        old.metrics.config_applied();
        self.discovered.changed.notify_one();
        Ok(true)
    }

    /// The configuration new connections get.
    pub fn current(&self) -> Arc<Gateway> {
        self.current.get()
    }

    /// Notified after every change of configuration.
    pub fn config_changed(&self) -> Arc<Notify> {
        Arc::clone(&self.discovered.changed)
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
        let admin_same = match (&config.admin, &old.config.admin) {
            (Some(new), Some(old)) => new.listener_eq(old),
            (None, None) => true,
            _ => false,
        };
        if config.listeners != old.config.listeners || !admin_same {
            return Err(ReloadError::ListenersChanged);
        }
        if config.sessions.instance != old.config.sessions.instance {
            return Err(ReloadError::InstanceChanged);
        }
        let gateway = Arc::new(Gateway::with_shared(config, old.shared())?);
        // Before anything routes with it: a backend the checks hold down must not look
        // healthy for a moment, or its keys would move back to it and away again.
        crate::health::carry_over(old, &gateway);
        let health = crate::health::start(&gateway);
        self.counter.follow(gateway.config.limits.max_connections);
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
        Self::bind_inheriting(config, None).await
    }

    /// [`bind`](Self::bind), taking the listening sockets a predecessor handed over where
    /// their addresses are still configured, and binding the others.
    pub async fn bind_inheriting(
        mut config: Config,
        mut inherited: Option<&mut Inherited>,
    ) -> Result<Self, StartError> {
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for (index, listener) in config.listeners.iter().enumerate() {
            listeners.push(BoundListener::bind(listener, index, inherited.as_deref_mut()).await?);
        }
        let admin = match &config.admin {
            Some(admin) => Some(AdminListener::bind(admin, inherited).await?),
            None => None,
        };
        // Raised once per process (it only ever goes up to the hard limit); the connection
        // limit is held to what it can carry.
        let open_files = crate::resources::raise_open_file_limit();
        let counter = ConnectionCounter::new(config.limits.max_connections, open_files);
        let upstreams = crate::discovery::resolve_initial(&mut config).await;
        let peers = crate::discovery::resolve_initial_peers(&mut config).await;
        let discovered = Discovered {
            found: Mutex::new(Found {
                upstreams: upstreams
                    .into_iter()
                    .map(|(name, spec, backends)| (name, (spec, backends)))
                    .collect(),
                peers,
            }),
            changed: Arc::default(),
        };
        let gateway = Arc::new(Gateway::new(config)?);
        gateway.metrics.config_applied();
        let current = Arc::new(CurrentGateway::new(gateway));
        Ok(Self {
            rebalancer: Rebalancer::new(Arc::clone(&current)),
            current,
            listeners,
            admin,
            counter: Arc::new(counter),
            health: Arc::default(),
            handed_over: Arc::default(),
            discovered: Arc::new(discovered),
        })
    }

    /// Second descriptors of every listening socket, for a successor (see [`handover`]).
    pub fn handover_sockets(&self) -> std::io::Result<Vec<handover::Socket>> {
        let mut sockets = self
            .listeners
            .iter()
            .map(BoundListener::handover_socket)
            .collect::<std::io::Result<Vec<_>>>()?;
        if let Some(admin) = &self.admin {
            sockets.push(admin.handover_socket()?);
        }
        Ok(sockets)
    }

    /// Notified once a successor has taken the listening sockets: the server then stops
    /// accepting and drains without the readiness delay (the successor is in rotation).
    pub fn handed_over(&self) -> Arc<Notify> {
        Arc::clone(&self.handed_over)
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
            counter: Arc::clone(&self.counter),
            health: Arc::clone(&self.health),
            rebalancer: Arc::clone(&self.rebalancer),
            discovered: Arc::clone(&self.discovered),
        }
    }

    /// Accepts on every listener until `stop` completes (or something starts the gateway's
    /// [`Drain`](crate::drain::Drain): the admin API), then drains in phases, with the
    /// `drain` settings of the configuration in force (the last one reloaded):
    ///
    /// 1. for `readiness_delay`, `/readyz` answers 503 while everything is still accepted
    ///    and served, so load balancers stop sending clients before any is refused;
    /// 2. the listeners close and every connection is asked to close: WebSockets and sessions
    ///    with 1001, spread evenly over `spread` (a room's members at one instant), HTTP
    ///    clients after their current request;
    /// 3. it returns when none is left, or at `deadline` from the start of the drain.
    ///
    /// A hurry (`Drain::close` with a shorter spread, as a second shutdown signal does) skips
    /// what remains of the readiness delay and brings every close forward.
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
        // Follows the upstreams whose backends come from DNS; stopped when the server ends.
        let discovery = tokio::spawn(crate::discovery::run(self.reloader()));
        let drain = Arc::clone(&self.current.get().drain);
        let mut phase = drain.subscribe();
        let handed_over = tokio::select! {
            () = stop => false,
            // Started from elsewhere (the admin API); a dropped sender cannot happen while
            // `drain` is held here.
            _ = phase.wait_for(|phase| !matches!(phase, Phase::Serving)) => false,
            () = self.handed_over.notified() => true,
        };
        let started = Instant::now();
        let settings = self.current.get().config.drain;
        drain.leave();
        if handed_over {
            tracing::info!(
                "handed over: closing connections over {:?} (deadline {:?})",
                settings.spread,
                settings.deadline
            );
        } else {
            tracing::info!(
                "draining: out of rotation for {:?}, then closing connections over {:?} (deadline {:?})",
                settings.readiness_delay,
                settings.spread,
                settings.deadline
            );
            tokio::select! {
                () = tokio::time::sleep(settings.readiness_delay) => {}
                _ = phase.wait_for(|phase| matches!(phase, Phase::Closing(_))) => {}
            }
        }
        let _ = stop_tx.send(true);
        for accept in loops {
            let _ = accept.await;
        }
        // The successor answers on the admin address now; this process's copy closes.
        let admin = match admin {
            Some(admin) if handed_over => {
                admin.abort();
                None
            }
            admin => admin,
        };
        drain.close(settings.spread);
        self.wait_for_connections(started + settings.deadline).await;
        discovery.abort();
        self.health.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(admin) = admin {
            admin.abort();
        }
    }

    /// Waits until every connection and session has closed, at most until `deadline`.
    async fn wait_for_connections(&self, deadline: Instant) {
        let sessions = Arc::clone(&self.current.get().sessions);
        let open = || (self.counter.current(), sessions.open());
        while open() != (0, 0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (connections, sessions) = open();
        if connections + sessions > 0 {
            tracing::warn!(
                "{connections} connections and {sessions} sessions still open at the drain deadline; closing them"
            );
        }
    }
}
