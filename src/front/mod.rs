//! One client connection. The first request head is read here, bounded in time and size. If
//! it is a WebSocket upgrade, the gateway takes the connection itself: `websocket::decide`,
//! then the relay on the raw socket. Anything else is plain HTTP, handed to hyper
//! (`http`), which proxies it, and any later request on the connection, with the same
//! routing and sticky choice.
//!
//! Every refusal is an HTTP status with a one-line reason; a client never sees a 101 followed
//! by a close for something known before the 101.

mod body;
mod http;
mod respond;
mod websocket;

use crate::client_addr::ClientAddr;
use crate::cluster::{self, Ingress, Owner};
use crate::gateway::{AddressSlot, Gateway};
use crate::proto::handshake::{self, HandshakeError, RequestHead};
use crate::routing;
use crate::session::{
    self,
    websocket::{SessionSocket, UpgradeKind},
};
use crate::stream::Stream;
use crate::upstream::Refusal;
use httparse::EMPTY_HEADER;
use respond::refuse;
use respond::{HeadRead, finish_with, read_head_bytes};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use websocket::{Acceptance, Decision};

use crate::proto::handshake::MAX_HEADERS;

/// Where a connection came from, as the listener knows it.
#[derive(Debug)]
pub struct Hop<'a> {
    /// The connection's source, or the client its PROXY header named.
    pub addr: SocketAddr,
    /// Index into the configuration's listeners.
    pub listener: usize,
    /// Set when the source is a trusted proxy and `max_connections_per_ip` is set: the
    /// connection is counted against the client its first request names, and the count is
    /// kept here (the connection's guard, which lasts as long as the connection).
    pub count_at_head: Option<&'a mut Option<AddressSlot>>,
}

/// Who is asking, for routing, forwarding and counting refusals.
#[derive(Debug, Clone, Copy)]
struct Client {
    peer: ClientAddr,
    /// Index into the configuration's listeners.
    listener: usize,
    tls: bool,
}

/// What follows the first request.
enum Next {
    /// The connection was answered and closed.
    Done,
    /// A WebSocket: relay, starting with the bytes the client sent after its head.
    Relay(Box<Acceptance>, Vec<u8>),
    /// A session WebSocket (the client library's `wsgate=socket`), served by the session layer.
    Session(Box<SessionSocket>, Vec<u8>),
    /// Plain HTTP: hyper takes over, re-reading the bytes read so far.
    Http(Vec<u8>),
    /// A session WebSocket of a session another instance owns: its answer, then its bytes.
    Tunnel(Box<cluster::tunnel::Answer>),
}

/// Serves one client connection to the end. `deadline` bounds the arrival of the first request
/// head; it was set at accept, so a TLS handshake counts against it too.
///
/// A plain function returning one `async move` block rather than an `async fn`: an `async fn`
/// keeps its arguments in the future beside the locals they move into, and this future lives
/// as long as the connection (measured: about 90 bytes less per idle connection).
#[allow(clippy::manual_async_fn)] // deliberately not an async fn: see above
pub fn serve(
    gateway: Arc<Gateway>,
    stream: Stream,
    hop: Hop<'_>,
    deadline: Instant,
) -> impl Future<Output = ()> {
    async move {
        let mut stream = stream;
        let started = Instant::now();
        let tls = stream.is_tls();
        // Boxed so that the head buffer and header table are freed before the long relay
        // phase: an idle WebSocket's task then holds only the relay's small state. The other
        // long phases are boxed for the same reason: this future is sized for its largest state.
        let client = Client {
            peer: ClientAddr::direct(hop.addr),
            listener: hop.listener,
            tls,
        };
        let counted = hop.count_at_head;
        let next = Box::pin(first_request(
            &gateway,
            &mut stream,
            client,
            counted,
            deadline,
        ))
        .await;
        match next {
            Next::Done => {}
            Next::Relay(acceptance, early) => acceptance.relay(stream, &early, started).await,
            Next::Session(socket, early) => Box::pin(socket.serve(stream, &early)).await,
            Next::Tunnel(answer) => Box::pin(answer.carry(stream, false)).await,
            Next::Http(prefix) => {
                let http = http::serve(gateway, stream, hop.addr, tls, hop.listener, prefix);
                Box::pin(http).await
            }
        }
    }
}

/// The answer to a client over its address's connection limit.
const PER_IP_LINE: &str = "too many connections from this address";

/// Whether `buf` holds the blank line that ends a request head. Empty lines before the request
/// line are skipped, as httparse skips them; a head ended by a bare `\n\n`, which httparse
/// also accepts, is recognised by parsing instead.
fn head_ended(buf: &[u8]) -> bool {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    buf[start..].windows(4).any(|w| w == b"\r\n\r\n")
}

/// Reads and answers the first request. With `count_at_head`, the connection is counted
/// against the client its head names.
async fn first_request(
    gateway: &Arc<Gateway>,
    stream: &mut Stream,
    client: Client,
    count_at_head: Option<&mut Option<AddressSlot>>,
    deadline: Instant,
) -> Next {
    let Client { tls, .. } = client;
    // Until the head names the client, refusals name the connection.
    let peer = client.peer;
    let refused = |status: u16, reason: &'static str, line: &str| {
        gateway.refused(client.listener, Some(status), reason, peer, line);
    };
    let limits = gateway.config.limits;
    let mut buf = Vec::new();
    loop {
        match read_head_bytes(stream, &mut buf, limits.max_header_bytes, deadline).await {
            HeadRead::More => {}
            HeadRead::Closed => return Next::Done,
            HeadRead::TimedOut => {
                let line = "request head not received in time";
                refused(408, "head_timeout", line);
                refuse(stream, 408, line, &[]).await;
                return Next::Done;
            }
            HeadRead::TooLarge => {
                let error = HandshakeError::HeadTooLarge {
                    max: limits.max_header_bytes,
                };
                refused(error.status(), "head_too_large", &error.to_string());
                refuse_handshake(stream, &error).await;
                return Next::Done;
            }
        }
        // A head that ended is parsed once, below. One still arriving is parsed as far as it
        // goes, so that a malformed request line is refused at once rather than at the head
        // timeout (parsing restarts from the beginning each time: heads are small and
        // httparse needs the whole head in one slice anyway).
        if head_ended(&buf) {
            break;
        }
        let mut probe = [EMPTY_HEADER; MAX_HEADERS];
        match handshake::parse_request(&buf, &mut probe) {
            Ok(Some(_)) => break,
            Ok(None) => {}
            Err(error) => {
                refused(error.status(), error.label(), &error.to_string());
                refuse_handshake(stream, &error).await;
                return Next::Done;
            }
        }
    }
    let head_complete = Instant::now();
    let mut storage = [EMPTY_HEADER; MAX_HEADERS];
    let (head, head_len) = match handshake::parse_request(&buf, &mut storage) {
        Ok(Some(parsed)) => parsed,
        // Not expected once the blank line is there; answered rather than trusted.
        Ok(None) => {
            refused(400, "malformed", "malformed request head");
            refuse(stream, 400, "malformed request head", &[]).await;
            return Next::Done;
        }
        Err(error) => {
            refused(error.status(), error.label(), &error.to_string());
            refuse_handshake(stream, &error).await;
            return Next::Done;
        }
    };
    let trusted = &gateway.config.listeners[client.listener].trusted_proxies;
    let peer = ClientAddr::of_head(peer.addr(), head.headers, trusted);
    if let (Some(counted), Some(max)) = (count_at_head, limits.max_connections_per_ip) {
        match gateway.addresses.try_enter(peer.ip(), max) {
            Some(slot) => *counted = Some(slot),
            None => {
                gateway.metrics.handshake_failed("per_ip_limit");
                gateway.refused(
                    client.listener,
                    Some(503),
                    "per_ip_limit",
                    peer,
                    PER_IP_LINE,
                );
                refuse(stream, 503, PER_IP_LINE, &[("Retry-After", "1")]).await;
                return Next::Done;
            }
        }
    }
    let refused = |status: u16, reason: &'static str, line: &str| {
        gateway.refused(client.listener, Some(status), reason, peer, line);
    };
    // Checked here for the first request because hyper, which reads the later ones, quietly
    // accepts Content-Length with Transfer-Encoding (dropping the length).
    if let Err((status, line)) = handshake::headers::check_framing(head.headers) {
        refused(status, "framing", line);
        refuse(stream, status, line, &[]).await;
        return Next::Done;
    }
    if !head.wants_websocket() {
        return Next::Http(buf);
    }
    let target = match routing::path::normalise_target(head.target) {
        Ok(target) => target,
        Err(error) => {
            refused(400, "path", &error.to_string());
            refuse(stream, 400, &error.to_string(), &[]).await;
            return Next::Done;
        }
    };
    // Routed, sticky-keyed, logged and forwarded by the normalised path.
    let head = RequestHead {
        target: &target,
        ..head
    };
    let ingress = cluster::ingress(gateway, Some(client.listener), head.headers);
    let kind = session::websocket::classify(gateway, &head);
    let forbidden = match (ingress, &kind) {
        (Ingress::Refused(line), _) => Some(line),
        // Peers forward resumed session sockets only.
        (Ingress::Peer { .. }, UpgradeKind::Session(_, query)) if query.sid.is_none() => {
            Some("peers forward requests of existing sessions only")
        }
        (Ingress::Peer { .. }, UpgradeKind::Plain | UpgradeKind::Invalid(_)) => {
            Some("peers forward session requests only")
        }
        _ => None,
    };
    if let Some(line) = forbidden {
        refused(403, "peer", line);
        refuse(stream, 403, line, &[]).await;
        return Next::Done;
    }
    let (peer, tls) = match ingress {
        Ingress::Peer { client, tls } => (client, tls),
        Ingress::Client | Ingress::Refused(_) => (peer, tls),
    };
    match kind {
        UpgradeKind::Plain => {}
        UpgradeKind::Invalid(line) => {
            refused(400, "session_request", &line);
            finish_with(stream, &Refusal::plain(400, &line, &[]).to_bytes()).await;
            return Next::Done;
        }
        UpgradeKind::Session(route, query) => {
            if let Some(sid) = query.sid.as_deref()
                && let Owner::Peer(owner) = cluster::owner(gateway, sid, ingress, "socket")
                && let Some(answer) =
                    cluster::tunnel::open(gateway, owner, &head, &buf[head_len..], peer, tls).await
            {
                return Next::Tunnel(Box::new(answer));
            }
            return match session::websocket::decide(gateway, route, &head, &query, peer, tls).await
            {
                Err(refusal) => {
                    if let Some(rule) = refusal.rule {
                        gateway.count_refused(client.listener, Some(refusal.status), rule);
                    }
                    finish_with(stream, &refusal.to_bytes()).await;
                    Next::Done
                }
                Ok(socket) => {
                    if stream.write_all(&socket.response_head()).await.is_err() {
                        return Next::Done;
                    }
                    Next::Session(Box::new(socket), buf[head_len..].to_vec())
                }
            };
        }
    }
    match websocket::decide(gateway, &head, peer, tls).await {
        Decision::Refuse(refusal) => {
            if let Some(rule) = refusal.rule {
                gateway.count_refused(client.listener, Some(refusal.status), rule);
            }
            finish_with(stream, &refusal.to_bytes()).await;
            Next::Done
        }
        Decision::Accept(acceptance) => {
            if stream.write_all(&acceptance.response_head()).await.is_err() {
                return Next::Done;
            }
            gateway.route_timings[acceptance.route()]
                .handshake
                .observe(head_complete.elapsed().as_secs_f64());
            Next::Relay(acceptance, buf[head_len..].to_vec())
        }
    }
}

async fn refuse_handshake(stream: &mut Stream, error: &HandshakeError) {
    let mut out = Vec::new();
    handshake::write_error_response(&mut out, error);
    finish_with(stream, &out).await;
}

#[cfg(test)]
mod tests {
    use super::head_ended;

    #[test]
    fn a_head_ends_at_its_first_blank_line() {
        assert!(head_ended(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(head_ended(b"GET / HTTP/1.1\r\n\r\nbody"));
        assert!(!head_ended(b"GET / HTTP/1.1\r\nHost: a\r\n"));
        assert!(!head_ended(b""));
    }

    #[test]
    fn empty_lines_before_the_request_line_do_not_end_it() {
        // httparse skips them, so the head has not ended: parsing it would say "partial".
        assert!(!head_ended(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n"));
        assert!(head_ended(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"));
    }
}
