//! Opening a session: the backend WebSocket is opened exactly as for a WebSocket client (same
//! route, sticky key, subprotocol offer, origin check, limits), then the session is registered
//! and its backend task started.

use super::backend::{BackendTask, Tally};
use super::id::SessionId;
use super::registry::{AddressRefusal, AddressSession, Reservation};
use super::socket;
use super::state::{Limits, Session, Timing};
use crate::admit::{BackendOffer, OpenedBackend, open_backend, origin_allowed, register_in_room};
use crate::client_addr::ClientAddr;
use crate::drain::Departure;
use crate::gateway::{AddressSlot, Gateway};
use crate::proto::handshake::RequestHead;
use crate::proto::{DecoderConfig, Role};
use crate::upstream::Refusal;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// Client messages waiting for the backend connection's writer, per session: a short queue,
/// so a slow backend holds a sender back instead of filling memory.
const OUTGOING_QUEUE: usize = 64;

/// What a new session asks of the backend.
#[derive(Debug)]
pub struct OpenSpec<'a> {
    pub route: usize,
    /// The request as the backend should see it (session parameters removed).
    pub head: &'a RequestHead<'a, 'a>,
    pub host: &'a str,
    pub origin: Option<&'a str>,
    pub protocols: Option<&'a str>,
}

#[derive(Debug)]
pub struct OpenedSession {
    pub session: Arc<Session>,
    /// An affinity cookie chosen now, on routes that use one.
    pub set_cookie: Option<String>,
}

/// What a new session holds besides its backend connection, taken before any of the request's
/// body is read: a place among `sessions.max_sessions`, one of its address's sessions, and one
/// of its address's `limits.max_connections_per_ip` slots. Given back when the session ends.
#[derive(Debug)]
pub struct Admission {
    _reservation: Reservation,
    _address: AddressSession,
    _connection: Option<AddressSlot>,
}

/// The cheap checks a new session passes before anything is read or opened for it: origin,
/// the address's open rate and caps, the gateway's session limit and the route's connection
/// limit (taken for good when the backend is opened).
pub fn admit(
    gateway: &Arc<Gateway>,
    route: usize,
    origin: Option<&str>,
    peer: ClientAddr,
) -> Result<Admission, Refusal> {
    let settings = &gateway.config.sessions;
    let route_config = gateway.route(route);
    let refuse = |label: &'static str, status: u16, line: &str| {
        gateway.metrics.handshake_failed(label);
        Err(Refusal::plain(status, line, &[("Retry-After", "1")]).by_rule(label))
    };
    if !origin_allowed(route_config, origin) {
        gateway.metrics.handshake_failed("origin");
        return Err(Refusal::plain(403, "origin not allowed", &[]).by_rule("origin"));
    }
    let address = match gateway.sessions.enter_address(
        peer.ip(),
        settings.max_sessions_per_ip,
        settings.open_rate,
        Instant::now(),
    ) {
        Ok(address) => address,
        Err(AddressRefusal::TooFast) => {
            return refuse(
                "session_open_rate",
                429,
                "too many sessions opened from this address; retry shortly",
            );
        }
        Err(AddressRefusal::TooMany) => {
            return refuse(
                "session_per_ip_limit",
                429,
                "too many sessions open from this address",
            );
        }
    };
    // A session holds a backend connection like a WebSocket does, so it counts as one of its
    // address's connections.
    let connection = match gateway.config.limits.max_connections_per_ip {
        None => None,
        Some(max) => match gateway.addresses.try_enter(peer.ip(), max) {
            Some(slot) => Some(slot),
            None => {
                return refuse(
                    "per_ip_limit",
                    429,
                    "too many connections and sessions from this address",
                );
            }
        },
    };
    let Some(reservation) = gateway.sessions.reserve(settings.max_sessions) else {
        return refuse(
            "session_limit",
            503,
            "too many sessions open; retry shortly",
        );
    };
    if gateway.route_full(route) {
        return refuse("route_limit", 503, "route is at its connection limit");
    }
    Ok(Admission {
        _reservation: reservation,
        _address: address,
        _connection: connection,
    })
}

/// Opens the backend WebSocket of a session admitted by [`admit`] and starts its task.
pub async fn open(
    gateway: &Arc<Gateway>,
    spec: &OpenSpec<'_>,
    admission: Admission,
    peer: ClientAddr,
    tls: bool,
) -> Result<OpenedSession, Refusal> {
    let settings = &gateway.config.sessions;
    let offer = BackendOffer {
        route: spec.route,
        host: spec.host,
        origin: spec.origin,
        protocols: spec.protocols,
        // The gateway assembles session messages itself and does not inflate.
        extensions: None,
    };
    // Before the pick: lets the rebalancing registry tell whether a plan ran meanwhile.
    let ticket = gateway.connections.ticket();
    let OpenedBackend {
        upgraded,
        set_cookie,
        sticky_key,
        backend_url,
        route_slot,
        backend_slot,
        mut authorized,
    } = open_backend(gateway, spec.head, &offer, peer, tls).await?;
    // Authenticated like a WebSocket client (in `open_backend`): the session is bound to the
    // token's subject and ends when the token expires.
    let expiry = authorized.as_ref().and_then(|a| a.expiry());
    let subject = authorized.as_ref().and_then(|a| a.subject.clone());
    let subject_slot = authorized.as_mut().and_then(|a| a.subject_slot.take());
    let route = gateway.route(spec.route);
    // A session is a connection of its room like any other: when the room's owner changes,
    // it moves too (the client hears 1012 and opens a new session, on the new owner).
    let registration = register_in_room(gateway, spec.route, sticky_key, &backend_url, ticket);
    let (to_backend, outgoing) = mpsc::channel(OUTGOING_QUEUE);
    let mut session = Session::new(
        SessionId::generate(&settings.instance),
        route.name.clone(),
        spec.origin.map(str::to_owned),
        upgraded.protocol.clone(),
        Limits {
            timing: Timing {
                poll_timeout: settings.poll_timeout,
                timeout: settings.timeout,
                max_batch: settings.max_batch,
            },
            buffer: settings.buffer,
            message_rate: route.limits.message_rate,
        },
        to_backend,
    );
    session.subject = subject;
    let session = Arc::new(session);
    let (reader, writer) = socket::split(
        upgraded.stream,
        &upgraded.early,
        DecoderConfig {
            role: Role::Client,
            max_frame: route.limits.max_frame,
            max_message: route.limits.max_message,
            compression: false,
            keep_opaque_masked: false,
        },
    );
    gateway.sessions.insert(Arc::clone(&session));
    tracing::debug!(session = %session.id, route = %route.name, backend = %backend_url, client = %peer, "session opened");
    let task = BackendTask {
        session: Arc::clone(&session),
        reader,
        writer,
        outgoing,
        registry: Arc::clone(&gateway.sessions),
        departure: Departure::new(&gateway.drain),
        metrics: Arc::clone(&gateway.metrics),
        counters: gateway.metrics.relay_counters(&route.name, &backend_url),
        tally: Tally::default(),
        registration,
        backend_url,
        ping_interval: route.timeouts.ping_interval,
        pong_timeout: route.timeouts.pong_timeout,
        close_timeout: route.timeouts.close,
        expiry,
        _subject_slot: subject_slot,
        _route_slot: route_slot,
        _backend_slot: backend_slot,
        _admission: admission,
    };
    tokio::spawn(task.run());
    Ok(OpenedSession {
        session,
        set_cookie,
    })
}

/// Finds the session a request names and checks that it may use it here: same route, the
/// same origin where the route checks origins, and the same subject when the request carries
/// a valid token (`subject`, see [`crate::authorize::presented_subject`]).
pub fn find(
    gateway: &Gateway,
    route: usize,
    sid: &str,
    origin: Option<&str>,
    subject: Option<&str>,
) -> Result<Arc<Session>, Lookup> {
    let Some(session) = gateway.sessions.get(sid) else {
        return Err(Lookup::Gone);
    };
    let route = gateway.route(route);
    if session.route != route.name {
        return Err(Lookup::Forbidden("this session belongs to another route"));
    }
    if !route.allowed_origins.is_empty()
        && let Some(origin) = origin
        && session.origin.as_deref() != Some(origin)
    {
        return Err(Lookup::Forbidden(
            "this session was opened from another origin",
        ));
    }
    // A valid token of another subject does not open someone else's session.
    if let (Some(bound), Some(presented)) = (session.subject.as_deref(), subject)
        && bound != presented
    {
        return Err(Lookup::Forbidden("this session belongs to another subject"));
    }
    Ok(session)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Expired, closed, or never existed (indistinguishable on purpose).
    Gone,
    Forbidden(&'static str),
}
