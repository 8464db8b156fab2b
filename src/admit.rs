//! Admitting a client to a backend: everything between a routed request and an open backend
//! WebSocket. WebSocket clients and sessions (long-polling, resumable) both come through
//! here, so they are admitted, limited and routed by the same rules: origin allowlist,
//! handshake rate, the route's connection limit, the route's auth, the sticky pick, the
//! backend's handshake and the health bookkeeping of its outcome.

use crate::authorize::{Authorized, authorize, backend_head, backend_protocols};
use crate::client_addr::ClientAddr;
use crate::config::Route;
use crate::forwarded::ForwardedHeaders;
use crate::gateway::{Gateway, RouteSlot};
use crate::proto::handshake::{self, RequestHead};
use crate::rebalance::{Member, Registration, Room, Ticket};
use crate::recent_errors::ErrorKind;
use crate::routing::{ConnectionSlot, RequestParts};
use crate::upstream::{self, Refusal, UpstreamError, UpstreamRequest};
use std::sync::Arc;

/// What the backend WebSocket is asked for on a client's behalf.
#[derive(Debug)]
pub struct BackendOffer<'a> {
    pub route: usize,
    /// The `Host` the client asked for, passed on to the backend.
    pub host: &'a str,
    pub origin: Option<&'a str>,
    pub protocols: Option<&'a str>,
    pub extensions: Option<&'a str>,
}

/// A backend WebSocket opened for a client, with the route and backend slots it holds until
/// it is dropped.
#[derive(Debug)]
pub struct OpenedBackend {
    pub upgraded: upstream::Upgraded,
    pub set_cookie: Option<String>,
    /// The sticky key the backend was chosen by, if any.
    pub sticky_key: Option<String>,
    pub backend_url: String,
    pub route_slot: RouteSlot,
    pub backend_slot: ConnectionSlot,
    /// What the route's `auth` established (`None` on routes without one); boxed, as it is
    /// held across the backend's handshake.
    pub authorized: Option<Box<Authorized>>,
}

/// Everything between a routed request and an open backend WebSocket: origin allowlist,
/// handshake rate, the route's connection limit, the sticky pick and the backend's handshake.
/// `head` supplies the target, the sticky key and the headers forwarded to the backend. Shared
/// by WebSocket clients and sessions, so both are admitted and routed by the same rules.
pub async fn open_backend(
    gateway: &Arc<Gateway>,
    head: &RequestHead<'_, '_>,
    offer: &BackendOffer<'_>,
    peer: ClientAddr,
    tls: bool,
) -> Result<OpenedBackend, Refusal> {
    let route = gateway.route(offer.route);
    let refuse = |reason: &'static str, status, line: &str, extra: &[(&str, &str)]| {
        gateway.metrics.handshake_failed(reason);
        let detail = format!("{peer}: {status} {line}");
        gateway
            .errors
            .record(ErrorKind::Handshake, Some(&route.name), None, detail);
        Refusal::plain(status, line, extra).by_rule(reason)
    };
    if !origin_allowed(route, offer.origin) {
        return Err(refuse("origin", 403, "origin not allowed", &[]));
    }
    if !gateway.admit_handshake() {
        return Err(refuse(
            "handshake_rate",
            503,
            "too many new connections right now; retry shortly",
            &[("Retry-After", "1")],
        ));
    }
    let Some(route_slot) = gateway.enter_route(offer.route) else {
        return Err(refuse(
            "route_limit",
            503,
            "route is at its connection limit",
            &[("Retry-After", "1")],
        ));
    };
    // The route's auth, after the cheap limits and before anything is spent on a backend:
    // from here on the request is the one the backend sees (token out, identity headers in).
    // Boxed, and only on routes with auth: the handshake future of every connection would
    // otherwise carry the auth future's size (tests/footprint.rs).
    let authorized = match route.auth {
        Some(_) => Box::pin(authorize(gateway, offer.route, head, peer, tls))
            .await?
            .map(Box::new),
        None => None,
    };
    let identity_headers = authorized.as_ref().map(|a| a.backend_headers(head.headers));
    let head = &backend_head(*head, authorized.as_deref(), identity_headers.as_deref());
    let offer = &BackendOffer {
        protocols: backend_protocols(authorized.as_deref(), offer.protocols),
        ..*offer
    };
    let parts = RequestParts {
        path: head.path(),
        query: head.query(),
        headers: head.headers,
        client_ip: peer.ip(),
    };
    let Some(mut pick) = gateway.pick_backend(offer.route, &parts, tls) else {
        return Err(refuse(
            "no_healthy_backend",
            503,
            "no healthy backend for this route",
            &[("Retry-After", "1")],
        ));
    };
    let upstream = &gateway.upstreams[route.upstream];
    let forwarded = ForwardedHeaders::new(head, peer, tls);
    let extra = forwarded.fields(head, true);
    let request = UpstreamRequest {
        host: offer.host,
        target: head.target,
        protocols: offer.protocols,
        extensions: offer.extensions,
        extra: &extra,
    };
    let connect_timeout = gateway.config.upstreams[route.upstream].connect_timeout;
    let mut tried = [0usize; Route::MAX_CONNECT_RETRIES as usize + 1];
    let mut attempts = 0;
    loop {
        let backend_slot = upstream.balancer.acquire(pick.index);
        let backend = &upstream.balancer.backends()[pick.index];
        let connecting = std::time::Instant::now();
        let opened =
            upstream::open(backend, upstream.tls.as_ref(), connect_timeout, &request).await;
        if opened.is_ok() {
            upstream
                .connect_seconds
                .observe(connecting.elapsed().as_secs_f64());
        }
        crate::health::observe_connect(gateway, route.upstream, pick.index, opened.as_ref().err());
        if attempts > 0 {
            gateway.metrics.retried(&route.name, opened.is_ok());
        }
        let error = match opened {
            Ok(upgraded) => {
                return Ok(OpenedBackend {
                    upgraded,
                    set_cookie: pick.set_cookie,
                    sticky_key: pick.key,
                    backend_url: backend.url.clone(),
                    route_slot,
                    backend_slot,
                    authorized,
                });
            }
            Err(error) => error,
        };
        let request_id = crate::incident::request_id();
        tracing::warn!(client = %peer, route = %route.name, backend = %backend.url, kind = error.kind(), %request_id, "{error}");
        gateway.metrics.handshake_failed(error.kind());
        let kind = if error.is_reach_failure() {
            ErrorKind::BackendConnect
        } else {
            ErrorKind::Handshake
        };
        let detail = format!("{peer}: {error}");
        gateway
            .errors
            .record(kind, Some(&route.name), Some(&backend.url), detail);
        tried[attempts] = pick.index;
        attempts += 1;
        // Only a backend that could not be reached: one that answered has seen the request.
        let retry = error.is_reach_failure() && attempts <= usize::from(route.connect_retries);
        if let Some(next) = retry
            .then(|| gateway.repick_backend(offer.route, &pick, &tried[..attempts], tls))
            .flatten()
        {
            tracing::info!(client = %peer, route = %route.name, from = %backend.url, "retrying on another backend");
            pick = next;
            continue;
        }
        return Err(match error {
            UpstreamError::Refused { response, .. } => *response,
            other => crate::incident::refusal(other.status(), &request_id),
        });
    }
}

/// An empty allowlist admits every origin; otherwise the `Origin` header must be listed.
pub fn origin_allowed(route: &Route, origin: Option<&str>) -> bool {
    if route.allowed_origins.is_empty() {
        return true;
    }
    origin.is_some_and(|origin| {
        route
            .allowed_origins
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(origin.trim_end_matches('/')))
    })
}

/// Lists a connection (or session) routed by a sticky key in its room, so that rebalancing can
/// move it when the key's owner changes; `None` for connections routed otherwise. `ticket` was
/// taken before the backend was picked.
pub fn register_in_room(
    gateway: &Gateway,
    route: usize,
    sticky_key: Option<String>,
    backend_url: &str,
    ticket: Ticket,
) -> Option<Registration> {
    let route = gateway.route(route);
    let (key, sticky) = (sticky_key?, route.sticky.as_ref()?);
    Some(gateway.connections.register(
        Room {
            route: route.name.as_str().into(),
            key: key.into(),
        },
        Member {
            backend: backend_url.into(),
            sticky: Arc::new(sticky.clone()),
        },
        ticket,
        || gateway.is_superseded(),
    ))
}

/// The 101 answer to a client whose backend (or session) accepted.
pub fn switching_protocols(
    accept: &str,
    protocol: Option<&str>,
    extensions: Option<&str>,
    set_cookie: Option<&str>,
    backend_headers: &[(String, String)],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let extra: Vec<(&str, &str)> = backend_headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .chain(set_cookie.iter().map(|v| ("Set-Cookie", *v)))
        .collect();
    handshake::server::write_switching_protocols(&mut out, accept, protocol, extensions, &extra);
    out
}
