//! Listening sockets: bind every configured address up front (so a bad address fails at start,
//! before anything is served), then accept while a connection slot is free, count the client's
//! address before any other work, terminate TLS within the handshake timeout, and hand each
//! connection to [`crate::front`].
//!
//! The address counted against `max_connections_per_ip` is the client's. A connection from a
//! trusted proxy names its client later: a PROXY header (read here, before TLS, within the
//! handshake deadline and [`proxy_protocol::MAX_HEADER_BYTES`]) or a request's forwarding chain
//! (counted by `front` when the first head is read). Until then it holds only its connection
//! slot and its deadline, and only a trusted proxy can make one; on a PROXY listener a
//! connection from anywhere else is closed at accept.

use crate::client_addr::{ClientAddr, TrustedNetworks};
use crate::config::Listener;
use crate::front;
use crate::gateway::{AddressCounts, AddressSlot, CurrentGateway};
use crate::handover::{self, Inherited, Role};
use crate::proxy_protocol::{self, Source};
use crate::resources::{self, OpenFiles};
use crate::stream::Stream;
use crate::tls::{self, TlsError};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
    /// Position in the configuration's listeners (which a reload cannot change).
    index: usize,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    proxy_protocol: bool,
    trusted: TrustedNetworks,
}

impl std::fmt::Debug for BoundListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundListener")
            .field("name", &self.name)
            .field("address", &self.listener.local_addr().ok())
            .field("tls", &self.tls.is_some())
            .field("proxy_protocol", &self.proxy_protocol)
            .finish()
    }
}

impl BoundListener {
    /// Binds `config.address`, or takes the socket a predecessor handed over for it.
    pub async fn bind(
        config: &Listener,
        index: usize,
        inherited: Option<&mut Inherited>,
    ) -> Result<Self, BindError> {
        let tls = match &config.tls {
            Some(tls) => Some(TlsAcceptor::from(tls::server_config(tls).map_err(
                |source| BindError::Tls {
                    name: config.name.clone(),
                    source,
                },
            )?)),
            None => None,
        };
        let bind_error = |source| BindError::Bind {
            name: config.name.clone(),
            address: config.address,
            source,
        };
        let listener = match inherited.and_then(|i| i.take(Role::Listener, config.address)) {
            Some(socket) => TcpListener::from_std(socket).map_err(bind_error)?,
            None => TcpListener::bind(config.address)
                .await
                .map_err(bind_error)?,
        };
        Ok(Self {
            name: config.name.clone(),
            index,
            listener,
            tls,
            proxy_protocol: config.proxy_protocol,
            trusted: config.trusted_proxies.clone(),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A second descriptor of the listening socket, for handing it to a successor.
    pub fn handover_socket(&self) -> io::Result<handover::Socket> {
        Ok(handover::Socket {
            role: Role::Listener,
            address: self.listener.local_addr()?,
            fd: self.listener.as_fd().try_clone_to_owned()?,
        })
    }
}

/// Client connections open across all listeners, against `limits.max_connections` (held to
/// what the open-file limit can carry), and per client IP address when
/// `limits.max_connections_per_ip` is set.
///
/// The total is a semaphore whose permit is taken before `accept`: at the limit the gateway
/// stops accepting (like HAProxy's `maxconn`), so new connections wait in the kernel's backlog
/// and are served once a slot frees, instead of being accepted and closed. Per address, the
/// connections count with the address's sessions in the gateway's [`AddressCounts`].
///
/// Invariant: every counted connection holds exactly one `ConnectionGuard` (which holds its
/// permit and its address slot).
#[derive(Debug)]
pub struct ConnectionCounter {
    total: AtomicU32,
    slots: Arc<Semaphore>,
    /// The open-file limit in force, which caps the slots.
    open_files: Option<OpenFiles>,
    /// `(configured, slots)`: the configured limit last followed, and the semaphore's size.
    capacity: Mutex<(u32, u32)>,
    /// Permits to forget as connections end, after a reload shrank the slots below the
    /// number in use.
    owed: AtomicU32,
}

impl ConnectionCounter {
    /// A counter for `max_connections`, held to what `open_files` can carry.
    pub fn new(max_connections: u32, open_files: Option<OpenFiles>) -> Self {
        let slots = resources::clamp_connections(max_connections, open_files);
        Self {
            total: AtomicU32::new(0),
            slots: Arc::new(Semaphore::new(slots as usize)),
            open_files,
            capacity: Mutex::new((max_connections, slots)),
            owed: AtomicU32::new(0),
        }
    }

    /// Resizes the slots to a reloaded `limits.max_connections`. Connections open are never
    /// cut: slots in use over a smaller limit are taken back as those connections end.
    pub fn follow(&self, configured: u32) {
        let mut capacity = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        if capacity.0 == configured {
            return;
        }
        let slots = resources::clamp_connections(configured, self.open_files);
        let before = capacity.1;
        *capacity = (configured, slots);
        if slots > before {
            let grow = slots - before;
            let owed = self
                .owed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| {
                    Some(o.saturating_sub(grow))
                })
                .unwrap_or(0);
            self.slots.add_permits((grow - owed.min(grow)) as usize);
        } else if slots < before {
            let shrink = before - slots;
            let forgotten = self.slots.forget_permits(shrink as usize) as u32;
            self.owed.fetch_add(shrink - forgotten, Ordering::AcqRel);
        }
    }

    /// Counts a connection accepted with `permit` against the limit of its address.
    fn try_enter(
        self: &Arc<Self>,
        permit: OwnedSemaphorePermit,
        addresses: &Arc<AddressCounts>,
        ip: IpAddr,
        max_per_ip: Option<u32>,
    ) -> Option<ConnectionGuard> {
        let address = match max_per_ip {
            Some(max_per_ip) => Some(addresses.try_enter(ip, max_per_ip)?),
            None => None,
        };
        self.total.fetch_add(1, Ordering::AcqRel);
        Some(ConnectionGuard {
            counter: Arc::clone(self),
            address,
            permit: Some(permit),
        })
    }

    pub fn current(&self) -> u32 {
        self.total.load(Ordering::Acquire)
    }
}

#[derive(Debug)]
struct ConnectionGuard {
    counter: Arc<ConnectionCounter>,
    address: Option<AddressSlot>,
    /// Always `Some` until dropped.
    permit: Option<OwnedSemaphorePermit>,
}

impl ConnectionGuard {
    /// Counts the connection against `ip`'s limit once a PROXY header named the client;
    /// `false` when that address holds its allowance already.
    fn enter_address(&mut self, addresses: &Arc<AddressCounts>, ip: IpAddr, max: u32) -> bool {
        match addresses.try_enter(ip, max) {
            Some(slot) => {
                self.address = Some(slot);
                true
            }
            None => false,
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let counter = &self.counter;
        counter.total.fetch_sub(1, Ordering::AcqRel);
        let owed = counter
            .owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| o.checked_sub(1));
        if let (Ok(_), Some(permit)) = (owed, self.permit.take()) {
            permit.forget();
        }
    }
}

/// How long accepting pauses after the gateway ran out of descriptors or memory: long enough
/// for connections to end and free some, short enough not to be noticed (tokio's and hyper's
/// servers wait the same).
const EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

/// The answer to a client over its address's connection limit, written without waiting.
const PER_IP_REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
Content-Type: text/plain; charset=utf-8\r\nContent-Length: 39\r\nConnection: close\r\n\r\n\
too many connections from this address\n";

/// Accepts on `bound` until `stop` completes.
pub async fn accept_loop(
    bound: BoundListener,
    current: Arc<CurrentGateway>,
    counter: Arc<ConnectionCounter>,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&counter.slots).acquire_owned() => permit,
            () = &mut stop => return,
        };
        // The semaphore is never closed.
        let Ok(permit) = permit else { return };
        let accepted = tokio::select! {
            accepted = bound.listener.accept() => accepted,
            () = &mut stop => return,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) if resources::is_exhaustion(&error) => {
                // Out of descriptors or memory: retrying at once would spin; established
                // connections go on and free some.
                tracing::warn!(listener = %bound.name, "accept failed: {error}; pausing accepts for {EXHAUSTED_PAUSE:?}");
                tokio::select! {
                    () = tokio::time::sleep(EXHAUSTED_PAUSE) => continue,
                    () = &mut stop => return,
                }
            }
            Err(error) => {
                // One connection's trouble (reset before it was accepted, ...).
                tracing::debug!(listener = %bound.name, "accept failed: {error}");
                continue;
            }
        };
        let gateway = current.get();
        let limits = gateway.config.limits;
        let from_proxy = bound.trusted.contains(peer.ip());
        if bound.proxy_protocol && !from_proxy {
            // Closed unread: whatever it sent is not ours to parse.
            let line = "connection from outside trusted_proxies on a PROXY protocol listener";
            gateway.refused(
                bound.index,
                None,
                "proxy_untrusted",
                ClientAddr::direct(peer),
                line,
            );
            continue;
        }
        // Before anything that costs: a TLS handshake, a task, a buffer. A trusted proxy's
        // connections are counted by the client it names, below or in `front`.
        let count_now = if from_proxy {
            None
        } else {
            limits.max_connections_per_ip
        };
        let Some(guard) = counter.try_enter(permit, &gateway.addresses, peer.ip(), count_now)
        else {
            gateway.metrics.handshake_failed("per_ip_limit");
            gateway.count_refused(bound.index, None, "per_ip_limit");
            turn_away(tcp, bound.tls.is_some());
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let tls = bound.tls.clone();
        let listener = bound.index;
        let proxy_protocol = bound.proxy_protocol;
        // The task lives as long as the connection, and its future is sized for its largest
        // state: the TLS handshake is boxed so an idle WebSocket's task carries only the relay.
        tokio::spawn(async move {
            let mut guard = guard;
            let mut tcp = tcp;
            let handshake_timeout = gateway.config.timeouts.handshake;
            let deadline = tokio::time::Instant::now() + handshake_timeout;
            let mut client = peer;
            // Listeners do not change on reload: the gateway's copy is this listener's.
            let trusted = &gateway.config.listeners[listener].trusted_proxies;
            if proxy_protocol {
                match Box::pin(proxy_protocol::read_header(&mut tcp, deadline)).await {
                    Ok(Source::Client(named)) => client = named,
                    Ok(Source::Connection) => {}
                    Err(error) => {
                        tracing::debug!(client = %peer, "{error}");
                        if let Some(reason) = error.reason() {
                            let line = error.to_string();
                            gateway.refused(
                                listener,
                                None,
                                reason,
                                ClientAddr::direct(peer),
                                &line,
                            );
                        }
                        return;
                    }
                }
                if let (Some(max), false) =
                    (limits.max_connections_per_ip, trusted.contains(client.ip()))
                    && !guard.enter_address(&gateway.addresses, client.ip(), max)
                {
                    gateway.metrics.handshake_failed("per_ip_limit");
                    gateway.count_refused(listener, None, "per_ip_limit");
                    turn_away(tcp, tls.is_some());
                    return;
                }
            }
            // A client that is itself a trusted proxy names its client in its request.
            let count_at_head =
                limits.max_connections_per_ip.is_some() && trusted.contains(client.ip());
            let stream = match tls {
                None => Stream::Plain(tcp),
                Some(acceptor) => {
                    let accept = tokio::time::timeout_at(deadline, acceptor.accept(tcp));
                    match Box::pin(accept).await {
                        Ok(Ok(tls)) => Stream::ServerTls(Box::new(tls)),
                        Ok(Err(error)) => {
                            tracing::debug!(client = %client, "TLS handshake failed: {error}");
                            let line = format!("TLS handshake failed: {error}");
                            let client = ClientAddr::direct(client);
                            gateway.refused(listener, None, "tls_handshake", client, &line);
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(client = %client, "TLS handshake timed out");
                            let line = "TLS handshake not done in time";
                            let client = ClientAddr::direct(client);
                            gateway.refused(listener, None, "tls_timeout", client, line);
                            return;
                        }
                    }
                }
            };
            let hop = front::Hop {
                addr: client,
                listener,
                count_at_head: count_at_head.then_some(&mut guard.address),
            };
            front::serve(gateway, stream, hop, deadline).await;
            drop(guard);
        });
    }
}

/// Closes a connection over its address's limit at once, so one address cannot hold more
/// descriptors than its allowance however many connections it opens. A plain-TCP client gets
/// its 503 if the socket takes it without waiting; a TLS client cannot be told anything before
/// a handshake, which is the expensive work the limit exists to avoid.
fn turn_away(tcp: TcpStream, tls: bool) {
    // tokio takes an accepted stream as readable and writable until the socket says
    // otherwise, so these non-blocking calls reach the socket without a driver turn.
    if !tls {
        let _ = tcp.try_write(PER_IP_REFUSAL);
    }
    // What the client already sent is read off, so the close is a FIN after our answer rather
    // than a reset that could destroy it.
    let mut sink = [0u8; 2048];
    for _ in 0..4 {
        match tcp.try_read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enter(counter: &Arc<ConnectionCounter>) -> Option<ConnectionGuard> {
        let permit = Arc::clone(&counter.slots).try_acquire_owned().ok()?;
        counter.try_enter(permit, &Arc::default(), IpAddr::from([127, 0, 0, 1]), None)
    }

    #[test]
    fn a_reload_resizes_the_slots_without_cutting_open_connections() {
        let counter = Arc::new(ConnectionCounter::new(3, None));
        let mut open: Vec<_> = (0..3).map(|_| enter(&counter).unwrap()).collect();
        assert!(enter(&counter).is_none(), "full at 3");

        counter.follow(1);
        assert_eq!(counter.current(), 3, "nothing is cut");
        open.pop();
        open.pop();
        assert!(
            enter(&counter).is_none(),
            "two ended, one still open: full at 1"
        );
        open.pop();
        let one = enter(&counter).expect("a slot once all ended");
        assert!(enter(&counter).is_none());

        counter.follow(2);
        let two = enter(&counter).expect("grown to 2");
        assert!(enter(&counter).is_none());
        drop((one, two));
        assert_eq!(counter.slots.available_permits(), 2);
    }

    #[test]
    fn growing_again_before_the_debt_is_paid_nets_out() {
        let counter = Arc::new(ConnectionCounter::new(4, None));
        let open: Vec<_> = (0..4).map(|_| enter(&counter).unwrap()).collect();
        counter.follow(1);
        counter.follow(4);
        drop(open);
        assert_eq!(counter.slots.available_permits(), 4);
    }
}
