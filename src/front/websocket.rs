//! Deciding a WebSocket upgrade: validate the request, check the origin and the route's
//! connection limit, choose the backend, and open the backend's WebSocket. Only when the
//! backend has accepted is the client told 101; every earlier failure becomes a [`Refusal`].
//!
//! The decision does no I/O on the client connection, so the raw path (a connection whose
//! first request is the upgrade) and the hyper path (an upgrade later on a keep-alive HTTP
//! connection) share it.

use crate::admit::{
    BackendOffer, OpenedBackend, open_backend, register_in_room, switching_protocols,
};
use crate::auth::SubjectSlot;
use crate::client_addr::ClientAddr;
use crate::config::{Compression, Deflate};
use crate::drain::depart;
use crate::gateway::{Gateway, RouteSlot};
use crate::metrics::{CloseCodeLabel, Closed, RouteBackend};
use crate::proto::deflate::negotiate::{
    ClientWindow, PERMESSAGE_DEFLATE, Preferences, negotiate, parse_offer,
};
use crate::proto::handshake::{self, RequestHead};
use crate::proto::{DecoderConfig, FrameDecoder, Role};
use crate::rebalance::Registration;
use crate::recent_errors::ErrorKind;
use crate::relay::compress::{DeflateReservation, inflate_state_bytes};
use crate::relay::{
    Cause, Credentials, HopStart, Relay, RelayCompression, RelayReport, RelaySettings, Side, Stop,
    Terminated, VerifyRefresh, Window,
};
use crate::routing::ConnectionSlot;
use crate::stream::Stream;
use crate::upstream::Refusal;
use prometheus_client::metrics::gauge::Gauge;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

pub enum Decision {
    Refuse(Refusal),
    Accept(Box<Acceptance>),
}

/// A backend that accepted; what to answer the client and how to relay afterwards.
#[derive(Debug)]
pub struct Acceptance {
    /// `Sec-WebSocket-Accept` for the client's key.
    pub accept: String,
    pub protocol: Option<String>,
    pub extensions: Option<String>,
    pub set_cookie: Option<String>,
    /// The backend's end-to-end 101 headers, repeated to the client.
    backend_headers: Vec<(String, String)>,
    backend: Stream,
    backend_early: Vec<u8>,
    decoders: (FrameDecoder, FrameDecoder),
    settings: RelaySettings,
    /// permessage-deflate as negotiated (with the client on `terminate`, between client and
    /// backend on `passthrough`).
    compression: RelayCompression,
    /// Compression state this connection holds between messages, against the gateway's cap;
    /// handed to the relay, which keeps it in its compression state (no field of an idle
    /// connection's future pays for it).
    deflate_slot: Option<DeflateReservation>,
    /// The client's token's expiry and in-band refresh, on routes with `auth.jwt` (boxed,
    /// like the subject's slot: an idle connection's future holds them, and only routes with
    /// auth pay for them).
    credentials: Option<Box<(Credentials, VerifyRefresh)>>,
    log: AccessContext,
}

/// What the access log reports about a connection, and the slots it holds until it ends.
#[derive(Debug)]
struct AccessContext {
    gateway: Arc<Gateway>,
    route: usize,
    backend: String,
    target: String,
    /// The client as believed (only its address: an idle connection keeps this).
    peer: SocketAddr,
    /// This connection's share of the active-connections gauge, given back when it ends.
    active: Gauge,
    /// Present for connections routed by a sticky key: they move when its owner changes.
    registration: Option<Registration>,
    _subject_slot: Option<Box<SubjectSlot>>,
    _route_slot: RouteSlot,
    _backend_slot: ConnectionSlot,
}

/// Decides an upgrade request. The request is validated before it is routed, so a request
/// without `Host` is a 400 (RFC 9112 §3.2), not a 404 from routes that name hosts.
pub async fn decide(
    gateway: &Arc<Gateway>,
    head: &RequestHead<'_, '_>,
    peer: ClientAddr,
    tls: bool,
) -> Decision {
    // `reason` labels the handshake-failure metric; it is one of a fixed set of words.
    let refuse = |reason: &'static str, status, line: &str, extra: &[(&str, &str)]| {
        gateway.metrics.handshake_failed(reason);
        let detail = format!("{peer}: {status} {line}");
        gateway
            .errors
            .record(ErrorKind::Handshake, None, None, detail);
        Decision::Refuse(Refusal::plain(status, line, extra).by_rule(reason))
    };
    let upgrade = match handshake::validate_upgrade(head) {
        Ok(upgrade) => upgrade,
        Err(error) => {
            let (status, line) = (error.status(), error.to_string());
            return refuse(error.label(), status, &line, error.extra_headers());
        }
    };
    let Some(route_index) = gateway.routes.route(Some(upgrade.host), head.path()) else {
        return refuse("no_route", 404, "no route for this host and path", &[]);
    };
    let route = gateway.route(route_index);
    let protocols = join(handshake::server::offered_protocols(head.headers));
    // Passthrough inflates a copy of what passes to count it, and may have to keep that
    // state between messages: the worst case is reserved before the offer goes out, and with
    // no room under `limits.compression_memory` the offer is stripped instead.
    let passthrough_slot = match route.compression {
        Compression::Passthrough => {
            let cap = gateway.config.limits.compression_memory;
            gateway
                .deflate_memory
                .reserve(2 * inflate_state_bytes(15) as u64, cap)
        }
        Compression::Strip | Compression::Terminate(_) => None,
    };
    let extensions = match route.compression {
        Compression::Passthrough if passthrough_slot.is_some() => join(
            handshake::headers::values(head.headers, "sec-websocket-extensions")
                .filter_map(|v| std::str::from_utf8(v).ok()),
        ),
        // A terminating gateway answers the client itself; the backend sees no offer.
        Compression::Passthrough | Compression::Strip | Compression::Terminate(_) => None,
    };
    let offer = BackendOffer {
        route: route_index,
        host: upgrade.host,
        origin: upgrade.origin,
        protocols: protocols.as_deref(),
        extensions: extensions.as_deref(),
    };
    // Before the pick: lets the registry tell whether a rebalancing plan ran meanwhile.
    let ticket = gateway.connections.ticket();
    let opened = match open_backend(gateway, head, &offer, peer, tls).await {
        Ok(opened) => opened,
        Err(refusal) => return Decision::Refuse(refusal),
    };
    let OpenedBackend {
        upgraded,
        set_cookie,
        sticky_key,
        backend_url,
        route_slot,
        backend_slot,
        mut authorized,
    } = opened;
    // A token's expiry ends the connection (unless refreshed in-band); its subject's slot is
    // held until then.
    let credentials = authorized
        .as_ref()
        .and_then(|a| a.relay_credentials(gateway, route_index, peer))
        .map(Box::new);
    let subject_slot = authorized
        .as_mut()
        .and_then(|a| a.subject_slot.take())
        .map(Box::new);
    // Listed while it lives, so that it can be moved when its key's owner changes.
    let registration = register_in_room(gateway, route_index, sticky_key, &backend_url, ticket);

    let labels = RouteBackend {
        route: route.name.clone(),
        backend: backend_url.clone(),
    };
    gateway
        .metrics
        .connections_opened
        .get_or_create(&labels)
        .inc();
    let active = gateway
        .metrics
        .connections_active
        .get_or_create(&labels)
        .clone();
    active.inc();
    let (extensions, relay_compression, deflate_slot) = match route.compression {
        Compression::Terminate(deflate) => terminate(gateway, head, &deflate),
        Compression::Strip | Compression::Passthrough => {
            let counted = upgraded.extensions.as_deref().and_then(passthrough);
            // Kept only while a side keeps its context (its inflater then lives as long).
            let keeps = matches!(counted, Some(RelayCompression::Count { client, backend })
                if client.keep_context || backend.keep_context);
            let slot = passthrough_slot.filter(|_| keeps);
            (upgraded.extensions, counted.unwrap_or_default(), slot)
        }
    };
    // RSV1 means "compressed" only under permessage-deflate (RFC 7692), whatever else the
    // backend may have agreed to; a terminating gateway never agrees to it with the backend.
    let (client_compressed, backend_compressed) = match relay_compression {
        RelayCompression::Off => (false, false),
        RelayCompression::Count { .. } => (true, true),
        RelayCompression::Terminate(_) => (true, false),
    };
    let decoder = |role, compression| {
        FrameDecoder::new(DecoderConfig {
            role,
            max_frame: route.limits.max_frame,
            max_message: route.limits.max_message,
            compression,
            keep_opaque_masked: true,
        })
    };
    Decision::Accept(Box::new(Acceptance {
        accept: handshake::accept_key(upgrade.key),
        protocol: upgraded.protocol,
        extensions,
        set_cookie,
        backend_headers: upgraded.headers,
        backend: upgraded.stream,
        backend_early: upgraded.early,
        decoders: (
            decoder(Role::Server, client_compressed),
            decoder(Role::Client, backend_compressed),
        ),
        settings: RelaySettings {
            ping_interval: route.timeouts.ping_interval,
            pong_timeout: route.timeouts.pong_timeout,
            close_timeout: route.timeouts.close,
            idle_timeout: route.timeouts.idle,
            ping_passthrough: route.ping_passthrough,
            message_rate: route.limits.message_rate,
        },
        compression: relay_compression,
        credentials,
        deflate_slot,
        log: AccessContext {
            gateway: Arc::clone(gateway),
            route: route_index,
            backend: backend_url,
            target: head.path().to_owned(),
            peer: peer.addr(),
            active,
            registration,
            _subject_slot: subject_slot,
            _route_slot: route_slot,
            _backend_slot: backend_slot,
        },
    }))
}

impl Acceptance {
    /// The index of the route the connection took.
    pub fn route(&self) -> usize {
        self.log.route
    }

    /// The 101 response head for the client.
    pub fn response_head(&self) -> Vec<u8> {
        switching_protocols(
            &self.accept,
            self.protocol.as_deref(),
            self.extensions.as_deref(),
            self.set_cookie.as_deref(),
            &self.backend_headers,
        )
    }

    /// Relays until both sides have closed, then writes the access log line.
    /// `client_early` are bytes the client sent after its request head.
    ///
    /// Everything the relay does not need is dropped before it starts (the handshake's
    /// strings, the backend's early bytes): the returned future is what an idle connection
    /// costs, so it holds only the relay and the access-log context.
    pub fn relay(
        self,
        client: Stream,
        client_early: &[u8],
        started: Instant,
    ) -> impl Future<Output = ()> + use<> {
        let Acceptance {
            backend,
            backend_early,
            decoders: (client_decoder, backend_decoder),
            settings,
            compression,
            credentials,
            deflate_slot,
            mut log,
            ..
        } = self;
        let route = &log.gateway.route(log.route).name;
        let mut counters = log.gateway.metrics.relay_counters(route, &log.backend);
        if matches!(compression, RelayCompression::Terminate(_)) {
            counters.deflate = Some(log.gateway.metrics.deflate_counters(route));
        }
        let relay = Relay::new(
            HopStart {
                stream: client,
                decoder: client_decoder,
                early: client_early,
            },
            HopStart {
                stream: backend,
                decoder: backend_decoder,
                early: &backend_early,
            },
            settings,
            counters,
            compression,
        );
        let mut relay = match credentials {
            Some(credentials) => {
                let (credentials, verify) = *credentials;
                relay.with_credentials(credentials, verify)
            }
            None => relay,
        };
        drop(backend_early);
        if let Some(slot) = deflate_slot {
            relay.hold_deflate_memory(slot);
        }
        // The stop future owns the registration: the connection leaves the rebalancing
        // registry when the relay stops listening for moves (at its end, or once told to stop).
        let registration = log.registration.take();
        let drain = log.gateway.drain.subscribe();
        let stop = move || async move {
            let moved = async {
                match &registration {
                    Some(registration) => registration.moved().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = depart(drain, registration.as_ref().map(Registration::room)) => Stop::Shutdown,
                () = moved => Stop::Moved,
            }
        };
        relay.run(stop, move |report| log.write(&report, started.elapsed()))
    }
}

impl AccessContext {
    fn write(&self, report: &RelayReport, duration: Duration) {
        let route = &self.gateway.route(self.route).name;
        self.active.dec();
        self.gateway.route_timings[self.route]
            .duration
            .observe(duration.as_secs_f64());
        for (side, hop) in [("client", &report.client), ("backend", &report.backend)] {
            let closed = Closed {
                route: route.clone(),
                backend: self.backend.clone(),
                side,
                code: CloseCodeLabel(hop.close_sent),
                initiator: report.initiator.name(),
                cause: report.cause.label(),
            };
            self.gateway
                .metrics
                .connections_closed
                .get_or_create(&closed)
                .inc();
        }
        if let Some((kind, why)) = failure(report) {
            let detail = format!("{}: {why}", ClientAddr::direct(self.peer));
            self.gateway
                .errors
                .record(kind, Some(route), Some(&self.backend), detail);
        }
        let code = |c: Option<u16>| c.map_or_else(|| "-".to_owned(), |c| c.to_string());
        tracing::info!(
            target: "wsgate::access",
            client = %ClientAddr::direct(self.peer),
            route = %route,
            backend = %self.backend,
            target = %self.target,
            duration_ms = duration.as_millis() as u64,
            client_bytes = report.client.bytes_in,
            client_messages = report.client.messages_in,
            backend_bytes = report.backend.bytes_in,
            backend_messages = report.backend.messages_in,
            client_close_received = %code(report.client.close_received),
            client_close_sent = %code(report.client.close_sent),
            backend_close_received = %code(report.backend.close_received),
            backend_close_sent = %code(report.backend.close_sent),
            initiator = report.initiator.name(),
            cause = %report.cause,
            "connection closed"
        );
    }
}

/// Whether a relayed connection ended in a failure worth showing on the dashboard: normal
/// ends, shutdowns, moves and idle timeouts are not.
fn failure(report: &RelayReport) -> Option<(ErrorKind, String)> {
    let kind = match report.cause {
        Cause::Violation { .. } if report.cause.is_policy() => ErrorKind::Policy,
        Cause::Violation { .. } => ErrorKind::Protocol,
        Cause::Disconnected(Side::Backend) | Cause::IoError(Side::Backend) => {
            ErrorKind::BackendDropped
        }
        Cause::PingTimeout(_) => ErrorKind::PingTimeout,
        Cause::CloseHandshake(_)
        | Cause::Disconnected(Side::Client)
        | Cause::IoError(Side::Client)
        | Cause::IdleTimeout
        | Cause::Shutdown
        | Cause::Moved
        | Cause::Expired => return None,
    };
    Some((kind, report.cause.to_string()))
}

/// A `terminate` route's answer to the client's permessage-deflate offers (the `Sec-WebSocket-
/// Extensions` value of the 101), what the relay does, and the connection's share of the
/// gateway's compression memory. No acceptable offer, or no room left under
/// `limits.compression_memory`: no compression (the connection is still accepted).
fn terminate(
    gateway: &Gateway,
    head: &RequestHead<'_, '_>,
    deflate: &Deflate,
) -> (Option<String>, RelayCompression, Option<DeflateReservation>) {
    let preferences = Preferences {
        server_no_context_takeover: deflate.server_no_context_takeover,
        client_no_context_takeover: deflate.client_no_context_takeover,
        server_max_window_bits: deflate.server_max_window_bits,
        client_max_window_bits: deflate.client_max_window_bits,
    };
    let offers = handshake::headers::list_elements(head.headers, "sec-websocket-extensions");
    let Some(agreed) = negotiate(offers, &preferences) else {
        return (None, RelayCompression::Off, None);
    };
    let terminated = Terminated {
        client: Window {
            bits: agreed.client_max_window_bits,
            keep_context: !agreed.client_no_context_takeover,
        },
        server: Window {
            bits: agreed.server_max_window_bits,
            keep_context: !agreed.server_no_context_takeover,
        },
        level: deflate.level,
        min_size: deflate.min_size,
    };
    let cap = gateway.config.limits.compression_memory;
    let held = terminated.held_between_messages();
    let Some(reservation) = gateway.deflate_memory.reserve(held, cap) else {
        return (None, RelayCompression::Off, None);
    };
    (
        Some(agreed.response()),
        RelayCompression::Terminate(terminated),
        Some(reservation),
    )
}

/// A `passthrough` route whose backend agreed to permessage-deflate: the windows each side
/// compresses with, so the relay can inflate what passes to count it. A response it cannot
/// read is counted with the largest window, kept between messages (always correct, only
/// larger).
fn passthrough(response: &str) -> Option<RelayCompression> {
    let element = handshake::headers::split_list(response)
        .map(handshake::headers::parse_extension)
        .find(|e| e.name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE))?;
    let full = Window {
        bits: 15,
        keep_context: true,
    };
    let (client, backend) = match parse_offer(element.params) {
        Ok(agreed) => (
            Window {
                bits: match agreed.client_max_window_bits {
                    ClientWindow::AtMost(bits) => bits,
                    _ => 15,
                },
                keep_context: !agreed.client_no_context_takeover,
            },
            Window {
                bits: agreed.server_max_window_bits.unwrap_or(15),
                keep_context: !agreed.server_no_context_takeover,
            },
        ),
        Err(_) => (full, full),
    };
    Some(RelayCompression::Count { client, backend })
}

fn join<'a>(items: impl Iterator<Item = &'a str>) -> Option<String> {
    let joined = items.collect::<Vec<_>>().join(", ");
    (!joined.is_empty()).then_some(joined)
}
