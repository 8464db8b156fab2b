//! A session request (poll, send, close, events) forwarded to the instance owning the session
//! over HTTP/1.1: the client's method, target and end-to-end headers, its body streamed, the
//! owner's answer streamed back unchanged, on a pooled connection (`pool`) when one is idle.

use super::{Ingress, Owner, connect, count, observe, peer_headers};
use crate::client_addr::ClientAddr;
use crate::config::Peer;
use crate::forwarded::is_hop_by_hop_response;
use crate::gateway::Gateway;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body as _, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, Version};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

type Body = BoxBody<Bytes, hyper::Error>;

/// Beyond the owner's own deadlines (a held poll, a body's arrival), how long its answer head
/// may take: a live owner answers well within it, so only a hung one reaches it.
const ANSWER_MARGIN: Duration = Duration::from_secs(10);
/// An answer body silent this long is ended: an event stream sends a comment every 15 s, so
/// only a dead owner stays silent longer.
const BODY_SILENCE: Duration = Duration::from_secs(45);

/// Request headers that belong to one hop (RFC 9110 §7.6.1) and are not carried.
fn is_hop_by_hop_request(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
    ) || super::is_peer_header(name)
}

/// Forwards `request` to `peer`; `None` when the hop failed before the owner's answer (the
/// caller answers "session gone").
pub async fn http(
    gateway: &Gateway,
    peer: &Peer,
    op: &'static str,
    request: Request<Incoming>,
    client: SocketAddr,
    tls: bool,
) -> Option<Response<Body>> {
    let cluster = gateway.config.cluster.as_ref()?;
    let started = Instant::now();
    // What the owner may legitimately take before its answer head: a held poll its poll
    // timeout, a request with a body that body's arrival, an event stream nothing.
    let sessions = &gateway.config.sessions;
    let wait = match op {
        "poll" => sessions.poll_timeout,
        "send" | "close" => sessions.body_timeout,
        _ => Duration::ZERO,
    };
    let deadline = started + super::CONNECT_TIMEOUT + wait + ANSWER_MARGIN;
    let (parts, body) = request.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |target| target.as_str());
    let mut outgoing = Request::builder()
        .method(parts.method.clone())
        .uri(target)
        .version(Version::HTTP_11);
    for (name, value) in &parts.headers {
        if !is_hop_by_hop_request(name.as_str()) {
            outgoing = outgoing.header(name, value);
        }
    }
    for (name, value) in peer_headers(cluster, client, tls) {
        outgoing = outgoing.header(name, value);
    }
    if !body.is_end_stream() && body.size_hint().exact().is_none() {
        outgoing = outgoing.header(hyper::header::TRANSFER_ENCODING, "chunked");
    }
    let Ok(mut outgoing) = outgoing.body(body) else {
        count(gateway, &peer.name, op, "failed");
        return None;
    };
    // An idle connection first. One found closing before the request was written gives the
    // request back, and a new connection takes it.
    // The owner closes a keep-alive connection idle for its head timeout; half of it leaves
    // a request written on a pooled connection well clear of that.
    let max_idle = gateway.config.timeouts.handshake / 2;
    let mut pooled = gateway.peer_pool.take(&peer.address, max_idle);
    let (sender, sent) = loop {
        let (mut sender, reused) = match pooled.take() {
            Some(sender) => (sender, true),
            None => match open(gateway, peer, op, deadline).await {
                Some(sender) => (sender, false),
                None => return None,
            },
        };
        match tokio::time::timeout_at(deadline, sender.try_send_request(outgoing)).await {
            Ok(Ok(answer)) => break (sender, Ok(answer)),
            Ok(Err(mut error)) => match error.take_message() {
                Some(request) if reused => outgoing = request,
                _ => break (sender, Err(Some(error.into_error()))),
            },
            Err(_) => break (sender, Err(None)),
        }
    };
    let answer = match sent {
        Ok(answer) => answer,
        Err(Some(error)) => {
            count(gateway, &peer.name, op, "failed");
            tracing::info!(peer = %peer.name, op, "forward to the session owner failed: {error}");
            return None;
        }
        Err(None) => {
            count(gateway, &peer.name, op, "timed_out");
            tracing::info!(peer = %peer.name, op, "the session owner did not answer in time");
            return None;
        }
    };
    gateway.peer_pool.give_back(peer.address.clone(), sender);
    observe(gateway, &peer.name, started.elapsed().as_secs_f64());
    count(gateway, &peer.name, op, "answered");
    let (mut parts, body) = answer.into_parts();
    let dropped: Vec<_> = parts
        .headers
        .keys()
        .filter(|name| {
            is_hop_by_hop_response(name.as_str()) || super::is_peer_header(name.as_str())
        })
        .cloned()
        .collect();
    for name in dropped {
        parts.headers.remove(name);
    }
    Some(Response::from_parts(parts, Silence::new(body).boxed()))
}

/// A new connection to `peer`, its HTTP/1.1 handshake done; counted when it fails.
async fn open(
    gateway: &Gateway,
    peer: &Peer,
    op: &'static str,
    deadline: Instant,
) -> Option<SendRequest<Incoming>> {
    let stream = match connect(gateway, peer).await {
        Ok(stream) => stream,
        Err(result) => {
            count(gateway, &peer.name, op, result);
            tracing::info!(peer = %peer.name, address = %peer.address, op, "session owner {result}");
            return None;
        }
    };
    let handshake = hyper::client::conn::http1::handshake(TokioIo::new(stream));
    match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok((sender, connection))) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Some(sender)
        }
        _ => {
            count(gateway, &peer.name, op, "failed");
            None
        }
    }
}

/// The owner's answer body, ended when it stays silent for [`BODY_SILENCE`].
struct Silence {
    body: Incoming,
    timer: Pin<Box<Sleep>>,
}

impl Silence {
    fn new(body: Incoming) -> Self {
        Self {
            body,
            timer: Box::pin(tokio::time::sleep(BODY_SILENCE)),
        }
    }
}

impl hyper::body::Body for Silence {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = Instant::now() + BODY_SILENCE;
                self.timer.as_mut().reset(next);
                Poll::Ready(frame)
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                // Ending is all a body can do here; the client sees the stream end and resumes.
                Poll::Ready(()) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Where a session HTTP request went.
#[derive(Debug)]
pub enum Routed {
    /// Served here: the request given back, with the client's address and transport.
    Local(Request<Incoming>, ClientAddr, bool),
    /// The owner's answer.
    Answered(Response<Body>),
    /// The owner could not be reached: the caller answers "session gone".
    Gone,
}

/// Decides where a session request with id `sid` is served and forwards it if elsewhere.
pub async fn route(
    gateway: &Gateway,
    sid: &str,
    op: &'static str,
    ingress: Ingress,
    request: Request<Incoming>,
    peer: ClientAddr,
    tls: bool,
) -> Routed {
    let (client, tls) = match ingress {
        Ingress::Peer { client, tls } => (client, tls),
        Ingress::Client | Ingress::Refused(_) => (peer, tls),
    };
    match super::owner(gateway, sid, ingress, op) {
        Owner::Local => Routed::Local(request, client, tls),
        Owner::Peer(owner) => match http(gateway, owner, op, request, client.addr(), tls).await {
            Some(answer) => Routed::Answered(answer),
            None => Routed::Gone,
        },
    }
}
