//! The session protocol over plain HTTP: open, long-poll, send, close and the Server-Sent
//! Events stream (docs/sessions.md). Every answer is JSON (`{"error": ...}` on failure) with
//! `Cache-Control: no-store`; cross-origin pages get `Access-Control-Allow-Origin` when the
//! route admits their origin.

use super::id::redact;
use super::open::{Lookup, OpenSpec, admit, find, open};
use super::protocol::{
    Close, ErrorBody, Event, Op, OpenRequest, Opened, PollAnswer, SendBatch, SessionQuery,
    backend_target, push_sse_record,
};
use super::state::{DeliverError, Session};
use crate::admit::origin_allowed;
use crate::client_addr::ClientAddr;
use crate::gateway::{Gateway, ListenerIndex};
use crate::metrics::{OpLabel, SessionRequest};
use crate::proto::handshake::RequestHead;
use crate::upstream::Refusal;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Bytes, Frame, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Largest `open` body: a list of subprotocol names, a few hundred bytes in practice. Read
/// before the session exists, so it is kept far below `max_batch`.
pub const OPEN_BODY_MAX: u64 = 4 << 10;
/// Largest `close` body: a code and a reason of at most 123 bytes, JSON-escaped.
const CLOSE_BODY_MAX: u64 = 4 << 10;

/// An event stream sends a comment this often, so intermediaries do not cut a quiet stream.
const SSE_HEARTBEAT: Duration = Duration::from_secs(15);

/// Serves one session request on `route`.
pub async fn handle(
    gateway: &Arc<Gateway>,
    route: usize,
    query: SessionQuery<'_>,
    request: Request<Incoming>,
    headers: &[httparse::Header<'_>],
    peer: ClientAddr,
    tls: bool,
) -> Response<Body> {
    let started = tokio::time::Instant::now();
    let op = query.op;
    let origin = header(&request, "origin").map(str::to_owned);
    let mut response = if request.method().as_str() != op.method() {
        let mut response = error(
            405,
            &format!("the {} operation needs {}", op.name(), op.method()),
        );
        if let Ok(allow) = HeaderValue::from_str(op.method()) {
            response.headers_mut().insert(hyper::header::ALLOW, allow);
        }
        response
    } else if op == Op::Open {
        open_session(gateway, route, &query, request, headers, peer, tls).await
    } else if op == Op::Socket {
        error(
            400,
            "the socket operation is a WebSocket upgrade (Upgrade: websocket)",
        )
    } else {
        let sid = query.sid.as_deref().unwrap_or_default();
        let head = RequestHead {
            method: request.method().as_str(),
            target: request.uri().path_and_query().map_or("/", |t| t.as_str()),
            version: 1,
            headers,
        };
        let subject = crate::authorize::presented_subject(gateway, route, &head, peer, tls).await;
        match find(gateway, route, sid, origin.as_deref(), subject.as_deref()) {
            Err(Lookup::Gone) => error(
                410,
                "session not found: it expired, was closed, or never existed; open a new one",
            ),
            Err(Lookup::Forbidden(why)) => error(403, why),
            Ok(session) => {
                session.touch();
                let timeout = gateway.config.sessions.body_timeout;
                let response = match op {
                    Op::Poll => poll(gateway, &session, query.ack).await,
                    Op::Events => events(&session, query.ack, &request),
                    Op::Send => send(&session, request, timeout).await,
                    Op::Close => close(&session, request, timeout).await,
                    // Answered above, before a session is looked up.
                    Op::Open | Op::Socket => error(400, "this operation does not name a session"),
                };
                session.touch();
                tracing::debug!(session = %redact(sid), op = op.name(), status = response.status().as_u16(), "session request");
                response
            }
        }
    };
    allow_origin(gateway.route(route), origin.as_deref(), &mut response);
    gateway
        .metrics
        .session_requests
        .get_or_create(&SessionRequest {
            op: op.name().to_owned(),
            status: response.status().as_u16().to_string(),
        })
        .inc();
    gateway
        .metrics
        .session_request_seconds
        .get_or_create(&OpLabel { op: op.name() })
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn open_session(
    gateway: &Arc<Gateway>,
    route: usize,
    query: &SessionQuery<'_>,
    request: Request<Incoming>,
    headers: &[httparse::Header<'_>],
    peer: ClientAddr,
    tls: bool,
) -> Response<Body> {
    let Some(host) = header(&request, "host").map(str::to_owned) else {
        return error(400, "exactly one Host header is required");
    };
    let origin = header(&request, "origin").map(str::to_owned);
    let target = backend_target(request.uri().path(), query.rest.as_deref());
    // Before a byte of the body is read: a refused open costs the gateway nothing.
    let listener = request.extensions().get::<ListenerIndex>().copied();
    let admission = match admit(gateway, route, origin.as_deref(), peer) {
        Ok(admission) => admission,
        Err(refusal) => {
            gateway.count_rule(listener.as_ref(), &refusal);
            return refusal_response(refusal);
        }
    };
    let timeout = gateway.config.sessions.body_timeout;
    let body = match read_limited(request, OPEN_BODY_MAX, timeout).await {
        Ok(body) => body,
        Err(response) => return *response,
    };
    let offer: OpenRequest = if body.iter().all(u8::is_ascii_whitespace) {
        OpenRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(offer) => offer,
            Err(e) => return error(400, &format!("the open request body is not valid: {e}")),
        }
    };
    if let Some(bad) = offer
        .protocols
        .iter()
        .find(|p| p.is_empty() || !p.bytes().all(is_token_byte))
    {
        return error(400, &format!("invalid subprotocol name {bad:?}"));
    }
    let protocols = (!offer.protocols.is_empty()).then(|| offer.protocols.join(", "));
    let head = RequestHead {
        method: "GET",
        target: &target,
        version: 1,
        headers,
    };
    let spec = OpenSpec {
        route,
        head: &head,
        host: &host,
        origin: origin.as_deref(),
        protocols: protocols.as_deref(),
    };
    match open(gateway, &spec, admission, peer, tls).await {
        Err(refusal) => {
            gateway.count_rule(listener.as_ref(), &refusal);
            refusal_response(refusal)
        }
        Ok(opened) => {
            let session = &opened.session;
            let mut response = json(
                200,
                &Opened {
                    session: session.id.as_str().to_owned(),
                    instance: gateway.config.sessions.instance.clone(),
                    protocol: session.protocol.clone(),
                    received: 0,
                    poll_timeout_ms: session.timing.poll_timeout.as_millis() as u64,
                    timeout_ms: session.timing.timeout.as_millis() as u64,
                    max_batch: session.timing.max_batch,
                },
            );
            if let Some(cookie) = opened.set_cookie
                && let Ok(value) = HeaderValue::from_str(&cookie)
            {
                response
                    .headers_mut()
                    .append(hyper::header::SET_COOKIE, value);
            }
            response
        }
    }
}

/// Holds the request until there are events after `ack`, the poll timeout passes, or a newer
/// poll of the same session takes over.
async fn poll(gateway: &Gateway, session: &Arc<Session>, ack: u64) -> Response<Body> {
    if let Err(error) = session.ack(ack) {
        return self::error(400, &error.to_string());
    }
    if session.is_finished() {
        return error(410, "session closed: its close was acknowledged");
    }
    let attachment = session.attach();
    let deadline = Instant::now() + session.timing.poll_timeout;
    let mut drain = gateway.drain.subscribe();
    loop {
        let changed = session.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let mut answer = PollAnswer::new();
        session.visit_since(ack, session.timing.max_batch, |seq, event| {
            answer.push(seq, event);
        });
        if !answer.is_empty() {
            return answered(answer);
        }
        if !session.is_current(&attachment) {
            return error(409, "superseded by a newer request of this session");
        }
        tokio::select! {
            () = changed => {}
            () = tokio::time::sleep_until(deadline) => return answered(PollAnswer::new()),
            // On shutdown the backend task pushes a close; until then, keep waiting.
            _ = drain.changed() => {}
        }
    }
}

fn answered(answer: PollAnswer) -> Response<Body> {
    uncached(200, full(answer.finish()), "application/json")
}

/// A Server-Sent Events stream of the session's events after `ack` (or `Last-Event-ID`).
/// The stream stays open while the client reads it; events are acknowledged by the next
/// stream's position or by `ack` in send requests.
fn events(session: &Arc<Session>, ack: u64, request: &Request<Incoming>) -> Response<Body> {
    let last_event_id = header(request, "last-event-id").and_then(|v| v.trim().parse::<u64>().ok());
    let ack = ack.max(last_event_id.unwrap_or(0));
    if let Err(error) = session.ack(ack) {
        return self::error(400, &error.to_string());
    }
    let (sender, receiver) = mpsc::channel::<Bytes>(8);
    let attachment = session.attach();
    let session = Arc::clone(session);
    tokio::spawn(async move {
        // A reader that stops reading (a dead connection without a FIN) must not keep the
        // session attached forever: a chunk not taken within the poll timeout ends the stream.
        let stall = session.timing.poll_timeout;
        let emit = |chunk: Bytes| {
            let sender = &sender;
            async move { sender.send_timeout(chunk, stall).await.is_ok() }
        };
        let mut cursor = ack;
        // Tells EventSource to reconnect at once after a cut, not after its default 3 s.
        if !emit(Bytes::from_static(b"retry: 500\n\n")).await {
            return;
        }
        loop {
            let changed = session.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // Encoded in one chunk while the buffer is locked; sent after.
            let (mut chunk, mut last, mut closed) = (String::new(), cursor, false);
            session.visit_since(cursor, session.timing.max_batch, |seq, event| {
                if !closed {
                    push_sse_record(&mut chunk, seq, event);
                    last = seq;
                    closed = matches!(event, Event::Close(_));
                }
            });
            if last != cursor {
                if !emit(Bytes::from(chunk)).await || closed {
                    return;
                }
                cursor = last;
                continue;
            }
            if !session.is_current(&attachment) {
                return;
            }
            let quiet = tokio::select! {
                () = changed => false,
                () = tokio::time::sleep(SSE_HEARTBEAT) => true,
            };
            if quiet && !emit(Bytes::from_static(b": keepalive\n\n")).await {
                return;
            }
        }
    });
    uncached(200, ChannelBody(receiver).boxed(), "text/event-stream")
}

async fn send(session: &Session, request: Request<Incoming>, timeout: Duration) -> Response<Body> {
    let body = match read_limited(request, session.timing.max_batch, timeout).await {
        Ok(body) => body,
        Err(response) => return *response,
    };
    let batch: SendBatch = match serde_json::from_slice(&body) {
        Ok(batch) => batch,
        Err(e) => return error(400, &format!("the send request body is not valid: {e}")),
    };
    let (first, messages, ack) = match batch.decode() {
        Ok(decoded) => decoded,
        Err(e) => return error(400, &e),
    };
    if let Some(ack) = ack
        && let Err(e) = session.ack(ack)
    {
        return error(400, &e.to_string());
    }
    match session.deliver(first, messages).await {
        Ok(received) => json(200, &serde_json::json!({ "received": received })),
        Err(DeliverError::Gap { expected }) => json(
            409,
            &serde_json::json!({
                "error": format!("messages are missing before seq {first}: resend from {expected}"),
                "received": expected - 1,
            }),
        ),
        Err(DeliverError::Gone) => error(410, "the backend connection of this session is closed"),
        Err(DeliverError::RateExceeded) => error(
            429,
            "message rate exceeded: the session is closed (its close event follows)",
        ),
    }
}

async fn close(session: &Session, request: Request<Incoming>, timeout: Duration) -> Response<Body> {
    let body = match read_limited(request, CLOSE_BODY_MAX, timeout).await {
        Ok(body) => body,
        Err(response) => return *response,
    };
    let close = if body.iter().all(u8::is_ascii_whitespace) {
        Close {
            code: 1000,
            reason: String::new(),
        }
    } else {
        match serde_json::from_slice::<Close>(&body) {
            Ok(close) => close,
            Err(e) => return error(400, &format!("the close request body is not valid: {e}")),
        }
    };
    // What a browser's WebSocket.close() accepts (WHATWG WebSockets §close()).
    if close.code != 1000 && !(3000..=4999).contains(&close.code) {
        return error(
            400,
            &format!("close code {} is not 1000 or 3000-4999", close.code),
        );
    }
    if close.reason.len() > crate::proto::close::MAX_CLOSE_REASON {
        return error(400, "the close reason is longer than 123 bytes");
    }
    session.close(close).await;
    json(200, &serde_json::json!({ "closed": true }))
}

/// Reads a request body of at most `max` bytes within `timeout`. A body announced larger is
/// refused before any of it is read; either refusal closes the connection, since the rest of
/// the body is never read.
async fn read_limited(
    request: Request<Incoming>,
    max: u64,
    timeout: Duration,
) -> Result<Bytes, Box<Response<Body>>> {
    let too_large = || {
        Box::new(closing(error(
            413,
            &format!("the request body is larger than {max} bytes"),
        )))
    };
    if request.body().size_hint().lower() > max {
        return Err(too_large());
    }
    let collect = Limited::new(request.into_body(), max as usize).collect();
    match tokio::time::timeout(timeout, collect).await {
        Err(_) => Err(Box::new(closing(error(
            408,
            &format!(
                "the request body did not arrive within {} ms",
                timeout.as_millis()
            ),
        )))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Ok(Err(e)) => Err(Box::new(closing(error(
            400,
            &format!("the request body could not be read: {e}"),
        )))),
    }
}

/// Marks an answer as the connection's last (the request's body was not read to its end).
fn closing(mut response: Response<Body>) -> Response<Body> {
    response
        .headers_mut()
        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The answer to a request of a session whose owner could not be reached: the session is
/// gone as far as the client can tell, and the client library opens a new one.
pub fn gone(
    gateway: &Gateway,
    route: usize,
    op: &'static str,
    origin: Option<&str>,
) -> Response<Body> {
    let mut response = error(
        410,
        "session not found: the instance holding it cannot be reached; open a new one",
    );
    allow_origin(gateway.route(route), origin, &mut response);
    gateway
        .metrics
        .session_requests
        .get_or_create(&SessionRequest {
            op: op.to_owned(),
            status: "410".to_owned(),
        })
        .inc();
    response
}

/// The answer to a request whose session parameters cannot be parsed: a 400 in the session
/// protocol's error format, readable by the route's admitted origins like every session answer.
pub fn malformed(
    gateway: &Gateway,
    route: usize,
    request: &Request<Incoming>,
    line: &str,
) -> Response<Body> {
    let mut response = error(400, line);
    allow_origin(
        gateway.route(route),
        header(request, "origin"),
        &mut response,
    );
    response
}

fn header<'r>(request: &'r Request<Incoming>, name: &str) -> Option<&'r str> {
    let mut values = request.headers().get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok()
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Lets a page on another origin read the answer when the route admits that origin.
fn allow_origin(route: &crate::config::Route, origin: Option<&str>, response: &mut Response<Body>) {
    if let Some(origin) = origin
        && origin_allowed(route, Some(origin))
        && let Ok(value) = HeaderValue::from_str(origin)
    {
        let headers = response.headers_mut();
        headers.insert(hyper::header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        headers.insert(hyper::header::VARY, HeaderValue::from_static("Origin"));
    }
}

fn json<T: serde::Serialize>(status: u16, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    uncached(status, full(body), "application/json")
}

/// Session answers are never cached: each reflects the session at that moment.
fn uncached(status: u16, body: Body, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    headers.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}

fn error(status: u16, line: &str) -> Response<Body> {
    json(status, &ErrorBody { error: line })
}

/// A refusal from opening the backend, as JSON with the same status and headers.
fn refusal_response(refusal: Refusal) -> Response<Body> {
    let text = String::from_utf8_lossy(&refusal.body);
    let text = text.trim();
    let line = if text.is_empty() || text.len() > 300 {
        format!("backend answered {} {}", refusal.status, refusal.reason)
    } else {
        text.to_owned()
    };
    let mut response = error(refusal.status, &line);
    for (name, value) in refusal.headers {
        let lower = name.to_ascii_lowercase();
        if matches!(
            lower.as_str(),
            "content-type" | "content-length" | "connection"
        ) {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(&value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response
}

fn full(body: Vec<u8>) -> Body {
    Full::new(Bytes::from(body))
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A response body fed by a channel: the event stream's writer task.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}
