//! Listening sockets: bind every configured address up front (so a bad address fails at start,
//! before anything is served), then accept, enforce the global connection limit, terminate TLS
//! within the handshake timeout, and hand each connection to [`crate::front`].

use crate::config::Listener;
use crate::front;
use crate::gateway::Gateway;
use crate::stream::Stream;
use crate::tls::{self, TlsError};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
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

/// Client connections open across all listeners, against `limits.max_connections`.
#[derive(Debug, Default)]
pub struct ConnectionCounter(AtomicU32);

impl ConnectionCounter {
    fn try_enter(self: &Arc<Self>, max: u32) -> Option<ConnectionGuard> {
        let previous = self.0.fetch_add(1, Ordering::AcqRel);
        let guard = ConnectionGuard(Arc::clone(self));
        (previous < max).then_some(guard)
    }

    pub fn current(&self) -> u32 {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Debug)]
struct ConnectionGuard(Arc<ConnectionCounter>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts on `bound` until `stop` completes.
pub async fn accept_loop(
    bound: BoundListener,
    gateway: Arc<Gateway>,
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
        let gateway = Arc::clone(&gateway);
        let guard = counter.try_enter(gateway.config.limits.max_connections);
        let tls = bound.tls.clone();
        tokio::spawn(async move {
            let handshake_timeout = gateway.config.timeouts.handshake;
            let deadline = tokio::time::Instant::now() + handshake_timeout;
            let mut stream = match tls {
                None => Stream::Plain(tcp),
                Some(acceptor) => {
                    match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
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
            match guard {
                Some(_guard) => front::serve(gateway, stream, peer, deadline).await,
                None => {
                    front::refuse(
                        &mut stream,
                        503,
                        "gateway is at its connection limit",
                        &[("Retry-After", "1")],
                    )
                    .await
                }
            }
        });
    }
}
