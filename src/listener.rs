//! Listening sockets: bind every configured address up front (so a bad address fails at start,
//! before anything is served), then accept, enforce the global connection limit, terminate TLS
//! within the handshake timeout, and hand each connection to [`crate::front`].

use crate::config::Listener;
use crate::front;
use crate::gateway::{AddressCounts, AddressSlot, CurrentGateway};
use crate::stream::Stream;
use crate::tls::{self, TlsError};
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

/// Client connections open across all listeners, against `limits.max_connections`; per
/// client IP address (with the address's sessions) in the gateway's [`AddressCounts`] when
/// `limits.max_connections_per_ip` is set.
///
/// Invariant: every counted connection holds exactly one `ConnectionGuard`.
#[derive(Debug, Default)]
pub struct ConnectionCounter {
    total: AtomicU32,
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
        addresses: &Arc<AddressCounts>,
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
            _address: None,
        };
        if let Some(max_per_ip) = max_per_ip {
            guard._address = Some(
                addresses
                    .try_enter(ip, max_per_ip)
                    .ok_or(OverLimit::PerIp)?,
            );
        }
        Ok(guard)
    }

    pub fn current(&self) -> u32 {
        self.total.load(Ordering::Acquire)
    }
}

#[derive(Debug)]
struct ConnectionGuard {
    counter: Arc<ConnectionCounter>,
    _address: Option<AddressSlot>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.counter.total.fetch_sub(1, Ordering::AcqRel);
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
            &gateway.addresses,
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
