//! Listening sockets: bind every configured address up front (so a bad address fails at start,
//! before anything is served), then accept, enforce the global connection limit, terminate TLS
//! within the handshake timeout, and hand each connection to [`crate::front`].

use crate::config::Listener;
use crate::front;
use crate::gateway::CurrentGateway;
use crate::stream::Stream;
use crate::tls::{self, TlsError};
use dashmap::DashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("listener {name}: cannot listen on {address}: {source}")]
    Bind {
        name: String,
        address: SocketAddr,
        source: io::Error,
    },
    #[error("listener {name}: {source}")]
    Tls { name: String, source: TlsError },
}

/// A bound listening socket and how to accept on it.
pub struct BoundListener {
    pub name: String,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for BoundListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundListener")
            .field("name", &self.name)
            .field("address", &self.listener.local_addr().ok())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl BoundListener {
    pub async fn bind(config: &Listener) -> Result<Self, BindError> {
        let tls = match &config.tls {
            Some(tls) => Some(TlsAcceptor::from(tls::server_config(tls).map_err(
                |source| BindError::Tls {
                    name: config.name.clone(),
                    source,
                },
            )?)),
            None => None,
        };
        let listener =
            TcpListener::bind(config.address)
                .await
                .map_err(|source| BindError::Bind {
                    name: config.name.clone(),
                    address: config.address,
                    source,
                })?;
        Ok(Self {
            name: config.name.clone(),
            listener,
            tls,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Client connections open across all listeners, against `limits.max_connections`, and per
/// client IP address when `limits.max_connections_per_ip` is set.
///
/// Invariant: every counted connection (and session) holds exactly one `ConnectionGuard`, and
/// an address is in `per_ip` only while it has at least one counted connection or session.
#[derive(Debug, Default)]
pub struct ConnectionCounter {
    total: AtomicU32,
    per_ip: DashMap<IpAddr, u32>,
}

/// Why an accepted connection is turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OverLimit {
    Total,
    PerIp,
}

impl ConnectionCounter {
    fn try_enter(
        self: &Arc<Self>,
        ip: IpAddr,
        max: u32,
        max_per_ip: Option<u32>,
    ) -> Result<ConnectionGuard, OverLimit> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= max {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(OverLimit::Total);
        }
        let mut guard = ConnectionGuard {
            counter: Arc::clone(self),
            ip: None,
            socket: true,
        };
        if let Some(max_per_ip) = max_per_ip {
            // The map's shard lock makes the check and the increment one step.
            let mut count = self.per_ip.entry(ip).or_insert(0);
            if *count >= max_per_ip {
                drop(count);
                self.per_ip.remove_if(&ip, |_, count| *count == 0);
                return Err(OverLimit::PerIp);
            }
            *count += 1;
            guard.ip = Some(ip);
        }
        Ok(guard)
    }

    /// One more use of `ip`'s `max_per_ip` allowance that is not a socket: a session holds one
    /// for its whole life, so an address cannot hold more backend connections by sessions
    /// than by WebSockets. `None` when the address is at its limit.
    pub fn enter_address(
        self: &Arc<Self>,
        ip: IpAddr,
        max_per_ip: Option<u32>,
    ) -> Option<ConnectionGuard> {
        let mut guard = ConnectionGuard {
            counter: Arc::clone(self),
            ip: None,
            socket: false,
        };
        if let Some(max_per_ip) = max_per_ip {
            let mut count = self.per_ip.entry(ip).or_insert(0);
            if *count >= max_per_ip {
                drop(count);
                self.per_ip.remove_if(&ip, |_, count| *count == 0);
                return None;
            }
            *count += 1;
            guard.ip = Some(ip);
        }
        Some(guard)
    }

    pub fn current(&self) -> u32 {
        self.total.load(Ordering::Acquire)
    }
}

/// A counted connection or session, uncounted when dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    counter: Arc<ConnectionCounter>,
    ip: Option<IpAddr>,
    /// Counted in the total of sockets (sessions count per address only).
    socket: bool,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.socket {
            self.counter.total.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(ip) = self.ip {
            if let Some(mut count) = self.counter.per_ip.get_mut(&ip) {
                *count = count.saturating_sub(1);
            }
            self.counter.per_ip.remove_if(&ip, |_, count| *count == 0);
        }
    }
}

/// Accepts on `bound` until `stop` completes.
pub async fn accept_loop(
    bound: BoundListener,
    current: Arc<CurrentGateway>,
    counter: Arc<ConnectionCounter>,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = bound.listener.accept() => accepted,
            () = &mut stop => return,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning; established connections go on.
                tracing::warn!(listener = %bound.name, "accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let gateway = current.get();
        let limits = gateway.config.limits;
        let guard = counter.try_enter(
            peer.ip(),
            limits.max_connections,
            limits.max_connections_per_ip,
        );
        let tls = bound.tls.clone();
        // The task lives as long as the connection, and its future is sized for its largest
        // state: the TLS handshake and the refusal are boxed so an idle WebSocket's task
        // carries only the relay.
        tokio::spawn(async move {
            let handshake_timeout = gateway.config.timeouts.handshake;
            let deadline = tokio::time::Instant::now() + handshake_timeout;
            let mut stream = match tls {
                None => Stream::Plain(tcp),
                Some(acceptor) => {
                    let accept = tokio::time::timeout_at(deadline, acceptor.accept(tcp));
                    match Box::pin(accept).await {
                        Ok(Ok(tls)) => Stream::ServerTls(Box::new(tls)),
                        Ok(Err(error)) => {
                            tracing::debug!(client = %peer, "TLS handshake failed: {error}");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(client = %peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let over = match guard {
                Ok(_guard) => return front::serve(gateway, stream, peer, deadline).await,
                Err(over) => over,
            };
            let (label, reason) = match over {
                OverLimit::Total => ("connection_limit", "gateway is at its connection limit"),
                OverLimit::PerIp => ("per_ip_limit", "too many connections from this address"),
            };
            gateway.metrics.handshake_failed(label);
            Box::pin(front::refuse(
                &mut stream,
                503,
                reason,
                &[("Retry-After", "1")],
            ))
            .await;
        });
    }
}
