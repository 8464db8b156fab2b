//! One client connection, from its first byte to the start of the relay: read the request head
//! (bounded in time and size), route it, validate the upgrade, check the origin, pick and open
//! the backend, and only then answer 101. Every refusal is an HTTP status with a one-line
//! reason; a client never sees a 101 followed by a close for something known before the 101.

use crate::config::{Compression, Route};
use crate::gateway::{Gateway, RouteSlot};
use crate::proto::handshake::{self, HandshakeError, RequestHead};
use crate::proto::{DecoderConfig, FrameDecoder, Role};
use crate::relay::{Relay, RelayReport, RelaySettings};
use crate::routing::{ConnectionSlot, RequestParts, cookie_value, extract_key};
use crate::stream::Stream;
use crate::upstream::{self, UpstreamRequest};
use httparse::EMPTY_HEADER;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Header fields a request head may carry. More is refused with 431.
const MAX_HEADERS: usize = 96;
/// How long a refused client gets to read our answer before the socket is closed.
const LINGER: Duration = Duration::from_secs(2);

/// Everything about an accepted connection that the access log reports.
#[derive(Debug)]
struct Accepted {
    route: usize,
    backend: String,
    target: String,
    _route_slot: RouteSlot,
    _backend_slot: ConnectionSlot,
}

/// Serves one client connection to the end.
pub async fn serve(gateway: Arc<Gateway>, mut stream: Stream, peer: SocketAddr) {
    let started = Instant::now();
    // The handshake future is boxed so that its buffers and header table are freed before the
    // long relay phase: the task then holds only the relay's small state.
    let outcome = Box::pin(handshake_phase(&gateway, &mut stream, peer)).await;
    let Some((prepared, accepted)) = outcome else {
        return;
    };
    let report = prepared.run_with(stream).await;
    log_access(&gateway, peer, &accepted, &report, started.elapsed());
}

fn log_access(
    gateway: &Gateway,
    peer: SocketAddr,
    accepted: &Accepted,
    report: &RelayReport,
    duration: Duration,
) {
    let route = &gateway.route(accepted.route).name;
    let code = |c: Option<u16>| c.map_or_else(|| "-".to_owned(), |c| c.to_string());
    tracing::info!(
        target: "wsgate::access",
        client = %peer,
        route = %route,
        backend = %accepted.backend,
        target = %accepted.target,
        duration_ms = duration.as_millis() as u64,
        client_bytes = report.client.bytes_in,
        client_messages = report.client.messages_in,
        backend_bytes = report.backend.bytes_in,
        backend_messages = report.backend.messages_in,
        client_close_received = %code(report.client.close_received),
        client_close_sent = %code(report.client.close_sent),
        backend_close_received = %code(report.backend.close_received),
        backend_close_sent = %code(report.backend.close_sent),
        initiator = report.initiator,
        cause = %report.cause,
        "connection closed"
    );
}

/// Reads and answers the handshake. `None` when the connection ended with an HTTP answer.
async fn handshake_phase(
    gateway: &Arc<Gateway>,
    stream: &mut Stream,
    peer: SocketAddr,
) -> Option<(PreparedRelay, Accepted)> {
    let limits = gateway.config.limits;
    let deadline = Instant::now() + gateway.config.timeouts.handshake;
    let mut buf = Vec::with_capacity(2048);
    loop {
        match read_head_bytes(stream, &mut buf, limits.max_header_bytes, deadline).await {
            HeadRead::More => {}
            HeadRead::Closed => return None,
            HeadRead::TimedOut => {
                refuse(stream, 408, "request head not received in time", &[]).await;
                return None;
            }
            HeadRead::TooLarge => {
                let error = HandshakeError::HeadTooLarge {
                    max: limits.max_header_bytes,
                };
                refuse_handshake(stream, &error).await;
                return None;
            }
        }
        // Parsing restarts from the beginning each time: heads are small and usually arrive in
        // one read, and httparse needs the whole head in one slice anyway.
        let mut probe = [EMPTY_HEADER; MAX_HEADERS];
        match handshake::parse_request(&buf, &mut probe) {
            Ok(Some(_)) => break,
            Ok(None) => {}
            Err(error) => {
                refuse_handshake(stream, &error).await;
                return None;
            }
        }
    }
    let mut storage = [EMPTY_HEADER; MAX_HEADERS];
    let Ok(Some((head, head_len))) = handshake::parse_request(&buf, &mut storage) else {
        unreachable!("the same bytes parsed completely a moment ago");
    };

    let Some(route_index) = gateway.routes.route(head.header("host"), head.path()) else {
        refuse(stream, 404, "no route for this host and path", &[]).await;
        return None;
    };
    let route = gateway.route(route_index);
    if !head.wants_websocket() {
        let body = "this endpoint accepts only WebSocket upgrades";
        refuse(stream, 426, body, &[("Upgrade", "websocket")]).await;
        return None;
    }
    let upgrade = match handshake::validate_upgrade(&head) {
        Ok(upgrade) => upgrade,
        Err(error) => {
            refuse_handshake(stream, &error).await;
            return None;
        }
    };
    if !origin_allowed(route, upgrade.origin) {
        refuse(stream, 403, "origin not allowed", &[]).await;
        return None;
    }
    let Some(route_slot) = gateway.enter_route(route_index) else {
        refuse(
            stream,
            503,
            "route is at its connection limit",
            &[("Retry-After", "1")],
        )
        .await;
        return None;
    };

    let upstream = &gateway.upstreams[route.upstream];
    let balancer = &upstream.balancer;
    let parts = RequestParts {
        path: head.path(),
        query: head.query(),
        headers: head.headers,
        client_ip: peer.ip(),
    };
    let key = route
        .sticky
        .as_ref()
        .and_then(|sticky| extract_key(sticky, &parts));
    let cookie_choice = match (&key, &route.sticky_cookie) {
        (None, Some(cookie)) => {
            let by_cookie = crate::config::StickyKey::Cookie(cookie.name.clone());
            extract_key(&by_cookie, &parts)
                .and_then(|value| balancer.backend_for_cookie(&value))
                .filter(|&index| balancer.is_healthy(index))
        }
        _ => None,
    };
    let Some(backend_index) = cookie_choice.or_else(|| balancer.choose(key.as_deref())) else {
        refuse(
            stream,
            503,
            "no healthy backend for this route",
            &[("Retry-After", "1")],
        )
        .await;
        return None;
    };
    let backend_slot = balancer.acquire(backend_index);
    let backend = &balancer.backends()[backend_index];

    let protocols = join(handshake::server::offered_protocols(head.headers));
    let extensions = match route.compression {
        Compression::Passthrough => join(
            head.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"))
                .filter_map(|h| std::str::from_utf8(h.value).ok()),
        ),
        Compression::Strip => None,
    };
    let forwarded = ForwardedHeaders::new(&head, peer, stream.is_tls());
    let extra = forwarded.fields(&head);
    let request = UpstreamRequest {
        host: upgrade.host,
        target: head.target,
        protocols: protocols.as_deref(),
        extensions: extensions.as_deref(),
        extra: &extra,
    };
    let connect_timeout = gateway.config.upstreams[route.upstream].connect_timeout;
    let upgraded = match upstream::open(backend, upstream.tls.as_ref(), connect_timeout, &request)
        .await
    {
        Ok(upgraded) => upgraded,
        Err(error) => {
            tracing::warn!(client = %peer, route = %route.name, backend = %backend.url, kind = error.kind(), "{error}");
            match error {
                upstream::UpstreamError::Refused { response, .. } => {
                    finish_with(stream, &response).await
                }
                other => refuse(stream, other.status(), &other.to_string(), &[]).await,
            }
            return None;
        }
    };

    let set_cookie = route
        .sticky_cookie
        .as_ref()
        .filter(|_| key.is_none() && cookie_choice != Some(backend_index))
        .map(|cookie| {
            let mut value = format!(
                "{}={}; Path=/; HttpOnly; SameSite=Lax",
                cookie.name,
                cookie_value(backend)
            );
            if let Some(max_age) = cookie.max_age {
                value.push_str(&format!("; Max-Age={}", max_age.as_secs()));
            }
            value
        });
    let mut response = Vec::with_capacity(256);
    let extra_response: Vec<(&str, &str)> = set_cookie
        .iter()
        .map(|v| ("Set-Cookie", v.as_str()))
        .collect();
    handshake::write_accept_response(
        &mut response,
        upgrade.key,
        upgraded.protocol.as_deref(),
        upgraded.extensions.as_deref(),
        &extra_response,
    );
    if stream.write_all(&response).await.is_err() {
        return None;
    }

    let compression = upgraded
        .extensions
        .as_deref()
        .is_some_and(|e| e.to_ascii_lowercase().contains("permessage-deflate"));
    let decoder = |role| {
        FrameDecoder::new(DecoderConfig {
            role,
            max_frame: route.limits.max_frame,
            max_message: route.limits.max_message,
            compression,
            keep_opaque_masked: true,
        })
    };
    let settings = RelaySettings {
        ping_interval: route.timeouts.ping_interval,
        pong_timeout: route.timeouts.pong_timeout,
        close_timeout: route.timeouts.close,
        idle_timeout: route.timeouts.idle,
        ping_passthrough: route.ping_passthrough,
    };
    let prepared = PreparedRelay {
        client_decoder: decoder(Role::Server),
        client_early: buf[head_len..].to_vec(),
        backend: upgraded.stream,
        backend_decoder: decoder(Role::Client),
        backend_early: upgraded.early,
        settings,
    };
    let accepted = Accepted {
        route: route_index,
        backend: backend.url.clone(),
        target: head.path().to_owned(),
        _route_slot: route_slot,
        _backend_slot: backend_slot,
    };
    Some((prepared, accepted))
}

/// The relay's parts, minus the client stream that the caller owns.
#[derive(Debug)]
struct PreparedRelay {
    client_decoder: FrameDecoder,
    client_early: Vec<u8>,
    backend: Stream,
    backend_decoder: FrameDecoder,
    backend_early: Vec<u8>,
    settings: RelaySettings,
}

impl PreparedRelay {
    async fn run_with(self, client: Stream) -> RelayReport {
        let relay = Relay::new(
            client,
            self.client_decoder,
            &self.client_early,
            self.backend,
            self.backend_decoder,
            &self.backend_early,
            self.settings,
        );
        drop(self.client_early);
        drop(self.backend_early);
        relay.run().await
    }
}

fn join<'a>(items: impl Iterator<Item = &'a str>) -> Option<String> {
    let joined = items.collect::<Vec<_>>().join(", ");
    (!joined.is_empty()).then_some(joined)
}

fn origin_allowed(route: &Route, origin: Option<&str>) -> bool {
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

/// Request headers that describe the client's hop, not the request: never forwarded.
fn is_hop_by_hop(name: &str, connection_tokens: &[&str]) -> bool {
    const FIXED: [&str; 14] = [
        "host",
        "connection",
        "upgrade",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-accept",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
        "forwarded",
    ];
    FIXED
        .iter()
        .chain(["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"].iter())
        .any(|h| name.eq_ignore_ascii_case(h))
        || connection_tokens
            .iter()
            .any(|t| name.eq_ignore_ascii_case(t))
}

/// `X-Forwarded-For/-Proto/-Host` and `Forwarded` (RFC 7239) for the backend request; the
/// client's own `X-Forwarded-For` and `Forwarded` chains are extended, not replaced.
struct ForwardedHeaders {
    x_forwarded_for: String,
    x_forwarded_proto: &'static str,
    x_forwarded_host: String,
    forwarded: String,
}

impl ForwardedHeaders {
    fn new(head: &RequestHead<'_, '_>, peer: SocketAddr, tls: bool) -> Self {
        let ip = peer.ip();
        let prior = |name| {
            let values: Vec<&str> = handshake::headers::values(head.headers, name)
                .filter_map(|v| std::str::from_utf8(v).ok())
                .collect();
            values.join(", ")
        };
        let chain = |prior: String, item: String| {
            if prior.is_empty() {
                item
            } else {
                format!("{prior}, {item}")
            }
        };
        let node = if ip.is_ipv6() {
            format!("\"[{ip}]\"")
        } else {
            ip.to_string()
        };
        let proto = if tls { "https" } else { "http" };
        let host = head.header("host").unwrap_or("");
        Self {
            x_forwarded_for: chain(prior("x-forwarded-for"), ip.to_string()),
            x_forwarded_proto: proto,
            x_forwarded_host: host.to_owned(),
            forwarded: chain(
                prior("forwarded"),
                format!("for={node};proto={proto};host=\"{host}\""),
            ),
        }
    }

    fn fields<'a>(&'a self, head: &'a RequestHead<'_, 'a>) -> Vec<(&'a str, &'a [u8])> {
        let connection_tokens: Vec<&str> =
            handshake::headers::list_elements(head.headers, "connection").collect();
        let mut fields: Vec<(&str, &[u8])> = head
            .headers
            .iter()
            .filter(|h| !is_hop_by_hop(h.name, &connection_tokens))
            .map(|h| (h.name, h.value))
            .collect();
        fields.push(("X-Forwarded-For", self.x_forwarded_for.as_bytes()));
        fields.push(("X-Forwarded-Proto", self.x_forwarded_proto.as_bytes()));
        fields.push(("X-Forwarded-Host", self.x_forwarded_host.as_bytes()));
        fields.push(("Forwarded", self.forwarded.as_bytes()));
        fields
    }
}

enum HeadRead {
    More,
    Closed,
    TimedOut,
    TooLarge,
}

async fn read_head_bytes(
    stream: &mut Stream,
    buf: &mut Vec<u8>,
    max: usize,
    deadline: Instant,
) -> HeadRead {
    if buf.len() >= max {
        return HeadRead::TooLarge;
    }
    let start = buf.len();
    buf.resize((start + 4096).min(max), 0);
    let read = tokio::time::timeout_at(deadline, stream.read(&mut buf[start..])).await;
    let n = match read {
        Err(_) => {
            buf.truncate(start);
            return HeadRead::TimedOut;
        }
        Ok(Ok(n)) => n,
        Ok(Err(_)) => 0,
    };
    buf.truncate(start + n);
    if n == 0 {
        HeadRead::Closed
    } else {
        HeadRead::More
    }
}

async fn refuse_handshake(stream: &mut Stream, error: &HandshakeError) {
    let mut out = Vec::new();
    handshake::write_error_response(&mut out, error);
    finish_with(stream, &out).await;
}

/// Answers with `status` and a one-line body, then closes.
pub async fn refuse(stream: &mut Stream, status: u16, reason: &str, extra: &[(&str, &str)]) {
    let mut out = Vec::new();
    handshake::write_plain_response(&mut out, status, reason, extra);
    finish_with(stream, &out).await;
}

/// Writes a final response, shuts down our side and drains what the client still sends for a
/// moment, so the close does not turn into a reset that destroys the response in flight.
async fn finish_with(stream: &mut Stream, response: &[u8]) {
    let linger = async {
        stream.write_all(response).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(LINGER, linger).await;
}
