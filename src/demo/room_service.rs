//! The room service: a chat backend on `hyper` (HTTP/1.1) and `fastwebsockets`.
//!
//! HTTP surface:
//! - `GET /` and `GET /rooms/<room>` serve the chat page;
//! - `GET /health` answers `200 ok`;
//! - `GET /stats` answers the instance's counters as JSON (see [`super::stats`]);
//! - `GET /dashboard` serves a page of those numbers, pushed over a WebSocket on
//!   `/dashboard/ws` once per second at most: one ticker per instance takes a snapshot each
//!   second and every dashboard socket sends the latest one, so a slow viewer skips snapshots
//!   instead of queueing them;
//! - a WebSocket upgrade on `/rooms/<room>[?user=<name>]` joins `<room>` and speaks the chat
//!   protocol; an upgrade anywhere else is a 404.
//!
//! Chat protocol, JSON text messages (a missing `room` means the one in the URL):
//! - `{"type":"join","room":"r","user":"alice"}` joins another room (or renames the connection
//!   with `user`); the joiner gets `{"type":"history","room","messages":[...]}` with the last 50
//!   messages, the other members `{"type":"joined","room","user"}`;
//! - `{"type":"leave","room":"r"}`: everyone, the leaver included, gets `{"type":"left",...}`;
//! - `{"type":"message","room":"r","text":"hi"}`: the other members get
//!   `{"type":"message","room","user","text","seq"}`, the sender `{"type":"sent","room","seq"}`;
//! - anything else gets `{"type":"error","error":"..."}` and the connection stays open.
//!
//! Every event the service sends also carries `"server": <name>`. `seq` counts per room and
//! instance: with a broker, `(server, seq)` tells messages of several instances apart.
//!
//! Scaling out ([`Options`]): with a broker, rooms span instances (see [`super::broker`]); with
//! a history database, history is shared and survives restarts (see [`super::store`]). Without
//! them everything stays in this process.
//!
//! Invariants: nothing a peer sends can end the process or another connection; a connection
//! whose client does not read is closed with 1008 once its queue is full (see the hub), and a
//! write that makes no progress for [`WRITE_TIMEOUT`] ends it, so no connection is held forever
//! by a stalled peer once shutdown starts.

use super::broker::{self, BrokerUrl};
use super::events::{ClientEvent, MAX_TEXT_LEN, ServerEvent, clean_user, query_param, valid_room};
use super::halves::{ReadOnly, WriteOnly};
use super::hub::{Hub, Limits, Mailbox, Outbound, Outlets, Peer};
use super::stats::{Snapshot, Stats};
use super::store::{self, HistoryUrl, Store};
use super::{CHAT_HTML, DASHBOARD_HTML};
use bytes::Bytes;
use fastwebsockets::{CloseCode, Frame, OpCode, Payload, WebSocket, WebSocketError};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::Permit;
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;

/// Longest a single frame write may stall before the connection is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection waits for the other side of the close handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(3);
/// Largest message a client may send, fragments included; chat events are small.
const MAX_MESSAGE_SIZE: usize = 64 * 1024;
/// Rooms one connection may be in at once, so one client cannot grow the room map unboundedly.
const MAX_ROOMS_PER_CONNECTION: usize = 32;
/// Time allowed for a client to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The dashboard's window: one snapshot per second at most, however busy the rooms are.
pub const DASHBOARD_INTERVAL: Duration = Duration::from_secs(1);

/// How one instance runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Reported in every event (`"server"`).
    pub name: String,
    /// Share rooms with other instances through Redis; `None`: rooms are this process's.
    pub broker: Option<BrokerUrl>,
    /// Keep history in PostgreSQL; `None`: in memory.
    pub history: Option<HistoryUrl>,
}

impl Options {
    /// A stand-alone instance: in-process rooms, history in memory.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            broker: None,
            history: None,
        }
    }
}

type Upgraded = TokioIo<hyper::upgrade::Upgraded>;
type Body = Full<Bytes>;

/// Serves the room service on `listener` as instance `name` until `shutdown` completes.
///
/// Then it stops accepting, closes every WebSocket with 1001 and returns once all connections
/// are gone (each is bounded by [`WRITE_TIMEOUT`] plus a short close handshake).
pub async fn serve(
    listener: TcpListener,
    name: impl Into<String>,
    shutdown: impl Future<Output = ()>,
) {
    serve_with(listener, Options::new(name), shutdown).await;
}

/// [`serve`] with a broker and a history database, as `options` say. Connecting to them
/// happens in the background and is retried: the service accepts clients at once, and its
/// rooms work within this instance while either is unreachable.
///
/// On shutdown, after the last connection is gone, queued history writes are flushed (at most
/// [`store::FLUSH_DEADLINE`]).
pub async fn serve_with(
    listener: TcpListener,
    options: Options,
    shutdown: impl Future<Output = ()>,
) {
    let name = options.name;
    let (drain_tx, mut drain_rx) = mpsc::channel::<()>(1);
    // Background tasks stop only after the connections, so their last messages are published
    // and written.
    let (background_stop, background) = watch::channel(false);
    let stats = Arc::new(Stats::default());
    let limits = Limits::default();
    let mut outlets = Outlets::default();
    let broker_rx = options.broker.as_ref().map(|_| {
        let (tx, rx) = mpsc::channel(broker::QUEUE);
        outlets.broker = Some(tx);
        rx
    });
    let store_rx = options.history.as_ref().map(|_| {
        let (tx, rx) = mpsc::channel(store::QUEUE);
        outlets.store = Some(tx);
        rx
    });
    let origin = rand::random::<u64>();
    let hub = Arc::new(Hub::with_outlets(
        &name,
        origin,
        limits,
        outlets,
        Arc::clone(&stats),
    ));
    let (store, writer) = match (&options.history, store_rx) {
        (Some(url), Some(rx)) => {
            let (store, writer) = store::spawn(url, Arc::clone(&stats), rx, background.clone());
            (Some(store), Some(writer))
        }
        _ => (None, None),
    };
    if let (Some(url), Some(rx)) = (&options.broker, broker_rx) {
        broker::spawn(url, Arc::clone(&hub), rx, background.clone());
    }
    let (dashboard_tx, dashboard) = watch::channel(Bytes::new());
    tokio::spawn(tick_dashboard(
        Arc::clone(&hub),
        dashboard_tx,
        background.clone(),
    ));
    let ctx = Arc::new(Context {
        hub,
        store,
        dashboard,
        stop: watch::channel(false).0,
        _drain: drain_tx,
    });
    match listener.local_addr() {
        Ok(addr) => tracing::info!(server = %name, %addr, "room service listening"),
        Err(_) => tracing::info!(server = %name, "room service listening"),
    }
    let mut shutdown = pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_http(stream, Arc::clone(&ctx)));
                }
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    tracing::info!(server = %name, "room service shutting down");
    ctx.stop.send_replace(true);
    drop(ctx);
    let _ = drain_rx.recv().await;
    background_stop.send_replace(true);
    if let Some(writer) = writer {
        let _ = timeout(store::FLUSH_DEADLINE + Duration::from_secs(1), writer).await;
    }
}

/// Takes a snapshot of the counters every [`DASHBOARD_INTERVAL`] for the dashboards.
async fn tick_dashboard(
    hub: Arc<Hub>,
    snapshots: watch::Sender<Bytes>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(DASHBOARD_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_messages = 0;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        let snapshot = hub.stats().snapshot(hub.server(), hub.room_count());
        let messages = snapshot.messages_posted + snapshot.broker_received;
        let frame = Dashboard {
            per_second: messages.saturating_sub(last_messages),
            window_ms: DASHBOARD_INTERVAL.as_millis(),
            stats: snapshot,
        }
        .encode();
        last_messages = messages;
        snapshots.send_replace(frame);
    }
}

/// One dashboard update: the counters and what happened in the last window.
#[derive(serde::Serialize)]
struct Dashboard<'a> {
    /// Chat messages seen by this instance (posted here or delivered from others).
    per_second: u64,
    window_ms: u128,
    #[serde(flatten)]
    stats: Snapshot<'a>,
}

impl Dashboard<'_> {
    /// String fields and integers only, so serialising does not fail; were it to, the page
    /// gets an empty snapshot rather than the service a panic.
    fn encode(&self) -> Bytes {
        serde_json::to_vec(self).map_or_else(|_| Bytes::from_static(b"{}"), Bytes::from)
    }
}

/// Completes once the service shuts down (or, which cannot happen while a connection holds the
/// `Context`, the sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here rather than across an await.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// What every connection of one instance shares.
struct Context {
    hub: Arc<Hub>,
    store: Option<Store>,
    /// The latest dashboard snapshot.
    dashboard: watch::Receiver<Bytes>,
    /// Becomes `true` when the service shuts down.
    stop: watch::Sender<bool>,
    /// Never sent on: every connection task holds the `Context`, so the receiver sees the
    /// channel close once the last one is gone.
    _drain: mpsc::Sender<()>,
}

async fn serve_http(stream: TcpStream, ctx: Arc<Context>) {
    let mut stop = ctx.stop.subscribe();
    let service = {
        let ctx = Arc::clone(&ctx);
        service_fn(move |request| {
            let ctx = Arc::clone(&ctx);
            async move { Ok::<_, Infallible>(route(request, &ctx)) }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let mut connection = pin!(
        builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades()
    );
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stopped(&mut stop) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "http connection ended with an error");
    }
}

fn route(mut request: Request<Incoming>, ctx: &Arc<Context>) -> Response<Body> {
    let path = request.uri().path();
    let room = path
        .strip_prefix("/rooms/")
        .filter(|room| valid_room(room))
        .map(str::to_owned);
    let page = path == "/" || room.is_some();
    if fastwebsockets::upgrade::is_upgrade_request(&request) {
        let target = match room {
            Some(room) => Socket::Chat(room),
            None if path == "/dashboard/ws" => Socket::Dashboard,
            None => return plain(StatusCode::NOT_FOUND, "not found\n"),
        };
        return if request.method() == Method::GET {
            upgrade(&mut request, target, ctx)
        } else {
            plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
        };
    }
    if !page && !matches!(path, "/health" | "/stats" | "/dashboard") {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/health" => plain(StatusCode::OK, "ok"),
        "/stats" => {
            let hub = &ctx.hub;
            let snapshot = hub.stats().snapshot(hub.server(), hub.room_count());
            match serde_json::to_vec(&snapshot) {
                Ok(json) => respond(StatusCode::OK, "application/json", json.into()),
                Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "no stats\n"),
            }
        }
        "/dashboard" => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            DASHBOARD_HTML.into(),
        ),
        _ => respond(StatusCode::OK, "text/html; charset=utf-8", CHAT_HTML.into()),
    }
}

/// What an upgraded connection is for.
enum Socket {
    Chat(String),
    Dashboard,
}

fn upgrade(request: &mut Request<Incoming>, target: Socket, ctx: &Arc<Context>) -> Response<Body> {
    let user = match request.uri().query().and_then(|q| query_param(q, "user")) {
        None => None,
        Some(user) => match clean_user(&user) {
            Some(user) => Some(Arc::<str>::from(user)),
            None => return plain(StatusCode::BAD_REQUEST, "invalid user name\n"),
        },
    };
    let (response, socket) = match fastwebsockets::upgrade::upgrade(request) {
        Ok(upgrade) => upgrade,
        Err(error) => return plain(StatusCode::BAD_REQUEST, format!("{error}\n")),
    };
    let ctx = Arc::clone(ctx);
    tokio::spawn(async move {
        match (socket.await, target) {
            (Ok(socket), Socket::Chat(room)) => run_socket(socket, &ctx, room, user).await,
            (Ok(socket), Socket::Dashboard) => run_dashboard(socket, &ctx).await,
            (Err(error), _) => tracing::debug!(%error, "websocket upgrade failed"),
        }
    });
    response.map(|_| Full::new(Bytes::new()))
}

fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body.into())
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    response
}

/// One connection's view: the name it goes by and the rooms it joined. The hub holds the same
/// membership; this copy lets the connection leave its rooms without scanning the hub.
struct Session {
    home: String,
    user: Arc<str>,
    rooms: BTreeSet<String>,
}

type Reader = WebSocket<ReadOnly<ReadHalf<Upgraded>>>;
type Writer = WebSocket<WriteOnly<WriteHalf<Upgraded>>>;

/// Splits an upgraded socket into a reader that never writes and a writer.
fn split(socket: WebSocket<Upgraded>) -> (Reader, Writer) {
    let (read, write) = tokio::io::split(socket.into_inner());
    let mut reader = WebSocket::after_handshake(ReadOnly(read), fastwebsockets::Role::Server);
    // The reader cannot write: pongs and close replies go through the writer's queue.
    reader.set_auto_pong(false);
    reader.set_auto_close(false);
    // fastwebsockets refuses frames of at least its limit; ours is inclusive.
    reader.set_max_message_size(MAX_MESSAGE_SIZE + 1);
    let writer = WebSocket::after_handshake(WriteOnly(write), fastwebsockets::Role::Server);
    (reader, writer)
}

/// Counts an open chat connection for as long as it lives.
struct Counted<'a>(&'a Stats);

impl<'a> Counted<'a> {
    fn new(stats: &'a Stats) -> Self {
        Stats::add(&stats.connections, 1);
        Self(stats)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        Stats::sub(&self.0.connections, 1);
    }
}

/// Reads `room`'s history from the database before its first join here (or the first after a
/// broker outage). A failure is counted and logged, and the joiner gets this instance's memory.
async fn load_history(ctx: &Context, room: &str) {
    let hub = &ctx.hub;
    let Some(store) = &ctx.store else { return };
    if !hub.needs_history(room) {
        return;
    }
    match store.recent(room, hub.limits().history).await {
        Ok(messages) => hub.seed(room, messages),
        Err(error) => {
            Stats::add(&hub.stats().history_read_failures, 1);
            tracing::warn!(room, %error, "history: read failed; replaying this instance's memory");
        }
    }
}

async fn run_socket(
    socket: WebSocket<Upgraded>,
    ctx: &Context,
    room: String,
    user: Option<Arc<str>>,
) {
    let (mut reader, writer) = split(socket);
    let hub = &ctx.hub;
    let _counted = Counted::new(hub.stats());
    let (peer, mailbox) = hub.connect();
    let user = user.unwrap_or_else(|| format!("guest-{}", peer.id).into());
    tracing::debug!(conn = peer.id, %room, %user, "websocket open");
    load_history(ctx, &room).await;
    // The queue is new and empty, so this does not wait.
    if let Some(reply) = peer.reserve().await {
        hub.join(&peer, reply, &room, &user);
    }
    let mut session = Session {
        home: room.clone(),
        user,
        rooms: BTreeSet::from([room]),
    };

    let mut write_loop = pin!(write_loop(writer, mailbox, ctx.stop.subscribe()));
    let writer_finished = {
        let mut read_loop = pin!(read_loop(&mut reader, &peer, ctx, &mut session));
        tokio::select! {
            () = read_loop.as_mut() => false,
            () = write_loop.as_mut() => {
                // We sent a close (or the write failed): give the client a moment to answer it.
                let _ = timeout(CLOSE_GRACE, read_loop).await;
                true
            }
        }
    };
    hub.disconnect(peer.id, session.rooms.iter().map(String::as_str));
    let id = peer.id;
    // With the hub's clones gone too, the writer sees the queue close after its last frame.
    drop(peer);
    if !writer_finished {
        let _ = timeout(CLOSE_GRACE, write_loop).await;
    }
    tracing::debug!(conn = id, "websocket closed");
}

/// Reads client frames until the client closes, the connection fails, or the writer is gone.
async fn read_loop(reader: &mut Reader, peer: &Peer, ctx: &Context, session: &mut Session) {
    let hub = &ctx.hub;
    let mut reassembly = Reassembly::default();
    loop {
        let frame = match reader.read_frame().await {
            Ok(frame) => frame,
            Err(error) => {
                tracing::debug!(conn = peer.id, %error, "websocket read failed");
                if let Some(close) = close_for(&error) {
                    // Best effort: the client broke the protocol and may not be reading.
                    peer.try_send(close);
                }
                return;
            }
        };
        let (opcode, payload) = match frame.opcode {
            OpCode::Ping => {
                let payload = Bytes::copy_from_slice(&frame.payload);
                if peer.send(Outbound::Pong(payload)).await {
                    continue;
                }
                return;
            }
            OpCode::Pong => continue,
            OpCode::Close => {
                peer.send(Outbound::Close(close_reply(&frame.payload), ""))
                    .await;
                return;
            }
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                match reassembly.push(frame.opcode, frame.fin, &frame.payload) {
                    Ok(Some(message)) => message,
                    Ok(None) => continue,
                    Err(close) => {
                        peer.try_send(close);
                        return;
                    }
                }
            }
        };
        let replied = match opcode {
            OpCode::Text => match std::str::from_utf8(&payload) {
                Ok(text) => handle_event(text, peer, ctx, session).await,
                Err(_) => {
                    peer.try_send(Outbound::Close(1007, "invalid UTF-8"));
                    return;
                }
            },
            _ => error(peer, hub, "binary messages are not supported").await,
        };
        if !replied {
            return;
        }
    }
}

/// A whole data message: its opcode (text or binary) and payload.
type Message<'a> = (OpCode, Cow<'a, [u8]>);

/// Joins fragmented data messages, bounded by [`MAX_MESSAGE_SIZE`] in total: fastwebsockets
/// limits single frames only, and its `FragmentCollector` has no total limit at all.
#[derive(Default)]
struct Reassembly {
    partial: Option<(OpCode, Vec<u8>)>,
}

impl Reassembly {
    /// Takes a data frame; gives back the whole message once its last fragment is in, or the
    /// close frame to fail the connection with.
    fn push<'a>(
        &mut self,
        opcode: OpCode,
        fin: bool,
        payload: &'a [u8],
    ) -> Result<Option<Message<'a>>, Outbound> {
        let (opcode, mut data) = match (opcode, self.partial.take()) {
            (OpCode::Text | OpCode::Binary, None) if fin => {
                return Ok(Some((opcode, Cow::Borrowed(payload))));
            }
            (OpCode::Text | OpCode::Binary, None) => (opcode, Vec::new()),
            (OpCode::Continuation, Some(partial)) => partial,
            _ => return Err(Outbound::Close(1002, "unexpected continuation frame")),
        };
        if data.len() + payload.len() > MAX_MESSAGE_SIZE {
            return Err(Outbound::Close(1009, "message too big"));
        }
        data.extend_from_slice(payload);
        if fin {
            Ok(Some((opcode, Cow::Owned(data))))
        } else {
            self.partial = Some((opcode, data));
            Ok(None)
        }
    }
}

/// The close frame telling a client why its input ended the connection; `None` when the
/// connection itself failed and nobody would read one.
fn close_for(error: &WebSocketError) -> Option<Outbound> {
    match error {
        WebSocketError::UnexpectedEOF
        | WebSocketError::IoError(_)
        | WebSocketError::ConnectionClosed => None,
        WebSocketError::FrameTooLarge => Some(Outbound::Close(1009, "message too big")),
        WebSocketError::InvalidUTF8 => Some(Outbound::Close(1007, "invalid UTF-8")),
        _ => Some(Outbound::Close(1002, "protocol error")),
    }
}

/// The code answering a client's close frame (RFC 6455 §5.5.1, §7.4).
fn close_reply(payload: &[u8]) -> u16 {
    match payload {
        [] => 1000,
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if CloseCode::from(code).is_allowed() && std::str::from_utf8(reason).is_ok() {
                code
            } else {
                1002
            }
        }
        [_] => 1002,
    }
}

/// Handles one chat event; `false` once the connection's writer is gone.
async fn handle_event(text: &str, peer: &Peer, ctx: &Context, session: &mut Session) -> bool {
    let hub = &ctx.hub;
    let event = match ClientEvent::parse(text) {
        Ok(event) => event,
        Err(message) => return error(peer, hub, &message).await,
    };
    // Reserved before the hub is asked, so a client that outpaces its replies waits here.
    let Some(reply) = peer.reserve().await else {
        return false;
    };
    let result = match event {
        ClientEvent::Join { room, user } => join(peer, reply, ctx, session, room, user).await,
        ClientEvent::Leave { room } => {
            let room = room.unwrap_or_else(|| session.home.clone());
            session.rooms.remove(&room);
            hub.leave(peer.id, reply, &room)
                .map_err(|_| format!("not in room {room:?}"))
        }
        ClientEvent::Message { room, text } => {
            let room = room.unwrap_or_else(|| session.home.clone());
            if text.len() > MAX_TEXT_LEN {
                Err(format!("text longer than {MAX_TEXT_LEN} bytes"))
            } else {
                hub.post(peer.id, reply, &room, text)
                    .map(drop)
                    .map_err(|_| format!("not in room {room:?}"))
            }
        }
    };
    match result {
        Ok(()) => true,
        Err(message) => error(peer, hub, &message).await,
    }
}

async fn join(
    peer: &Peer,
    reply: Permit<'_, Outbound>,
    ctx: &Context,
    session: &mut Session,
    room: Option<String>,
    user: Option<String>,
) -> Result<(), String> {
    let hub = &ctx.hub;
    let room = room.unwrap_or_else(|| session.home.clone());
    if !valid_room(&room) {
        return Err("room names are 1 to 64 of A-Z a-z 0-9 - _ .".to_owned());
    }
    if let Some(user) = user {
        let user = clean_user(&user).ok_or("user names are 1 to 32 printable characters")?;
        if *user != *session.user {
            session.user = user.into();
            hub.rename(
                peer.id,
                session.rooms.iter().map(String::as_str),
                &session.user,
            );
        }
    }
    if !session.rooms.contains(&room) && session.rooms.len() >= MAX_ROOMS_PER_CONNECTION {
        return Err(format!(
            "at most {MAX_ROOMS_PER_CONNECTION} rooms per connection"
        ));
    }
    load_history(ctx, &room).await;
    hub.join(peer, reply, &room, &session.user);
    session.rooms.insert(room);
    Ok(())
}

async fn error(peer: &Peer, hub: &Hub, message: &str) -> bool {
    let frame = ServerEvent::Error {
        error: message,
        server: hub.server(),
    }
    .encode();
    peer.send(Outbound::Text(frame)).await
}

/// A dashboard viewer: gets the latest snapshot now and each new one (one per
/// [`DASHBOARD_INTERVAL`] at most); what it sends is ignored but pings and closes.
async fn run_dashboard(socket: WebSocket<Upgraded>, ctx: &Context) {
    let (mut reader, writer) = split(socket);
    let (peer, mailbox) = ctx.hub.connect();
    let mut snapshots = ctx.dashboard.clone();
    snapshots.mark_changed();
    let feed = async {
        while snapshots.changed().await.is_ok() {
            let snapshot = snapshots.borrow_and_update().clone();
            // A viewer that does not read misses snapshots; the next one supersedes them.
            if !snapshot.is_empty() {
                peer.try_send(Outbound::Text(snapshot));
            }
        }
    };
    let mut write_loop = pin!(write_loop(writer, mailbox, ctx.stop.subscribe()));
    let writer_finished = {
        let mut read_loop = pin!(read_control(&mut reader, &peer));
        tokio::select! {
            () = read_loop.as_mut() => false,
            () = feed => false,
            () = write_loop.as_mut() => {
                let _ = timeout(CLOSE_GRACE, read_loop).await;
                true
            }
        }
    };
    drop(peer);
    if !writer_finished {
        let _ = timeout(CLOSE_GRACE, write_loop).await;
    }
}

/// Answers pings and closes, ignoring data, until the client closes or the connection fails.
async fn read_control(reader: &mut Reader, peer: &Peer) {
    loop {
        let frame = match reader.read_frame().await {
            Ok(frame) => frame,
            Err(error) => {
                if let Some(close) = close_for(&error) {
                    peer.try_send(close);
                }
                return;
            }
        };
        match frame.opcode {
            OpCode::Ping
                if !peer
                    .send(Outbound::Pong(Bytes::copy_from_slice(&frame.payload)))
                    .await =>
            {
                return;
            }
            OpCode::Close => {
                peer.send(Outbound::Close(close_reply(&frame.payload), ""))
                    .await;
                return;
            }
            _ => {}
        }
    }
}

/// Writes queued frames until a close frame has been sent, the queue closes, or a write fails.
async fn write_loop(mut writer: Writer, mut mailbox: Mailbox, mut stop: watch::Receiver<bool>) {
    loop {
        let out = tokio::select! {
            biased;
            () = mailbox.kick.notified() => Outbound::Close(1008, "too slow"),
            () = stopped(&mut stop) => Outbound::Close(1001, "server shutting down"),
            out = mailbox.rx.recv() => match out {
                Some(out) => out,
                None => return,
            },
        };
        let (frame, last) = match &out {
            Outbound::Text(text) => (Frame::text(Payload::Borrowed(text)), false),
            Outbound::Pong(payload) => (Frame::pong(Payload::Borrowed(payload)), false),
            Outbound::Close(code, reason) => (Frame::close(*code, reason.as_bytes()), true),
        };
        if !matches!(
            timeout(WRITE_TIMEOUT, writer.write_frame(frame)).await,
            Ok(Ok(()))
        ) {
            return;
        }
        // Flush once per burst rather than per frame.
        if (last || mailbox.rx.is_empty())
            && !matches!(timeout(WRITE_TIMEOUT, writer.flush()).await, Ok(Ok(())))
        {
            return;
        }
        if last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close_code(result: Result<Option<Message<'_>>, Outbound>) -> u16 {
        match result {
            Err(Outbound::Close(code, _)) => code,
            other => panic!("expected a close, got {other:?}"),
        }
    }

    #[test]
    fn reassembly_joins_fragments_and_rejects_strays() {
        let mut r = Reassembly::default();
        assert!(matches!(
            r.push(OpCode::Text, true, b"whole"),
            Ok(Some((OpCode::Text, Cow::Borrowed(b"whole"))))
        ));
        assert!(matches!(r.push(OpCode::Binary, false, b"ab"), Ok(None)));
        let Ok(Some((OpCode::Binary, data))) = r.push(OpCode::Continuation, true, b"cd") else {
            panic!("expected the joined message");
        };
        assert_eq!(&*data, b"abcd");

        assert_eq!(close_code(r.push(OpCode::Continuation, true, b"x")), 1002);
        assert!(matches!(r.push(OpCode::Text, false, b"a"), Ok(None)));
        assert_eq!(close_code(r.push(OpCode::Text, true, b"b")), 1002);

        let mut r = Reassembly::default();
        let half = vec![0; MAX_MESSAGE_SIZE / 2];
        assert!(matches!(r.push(OpCode::Text, false, &half), Ok(None)));
        assert!(matches!(
            r.push(OpCode::Continuation, false, &half),
            Ok(None)
        ));
        assert_eq!(close_code(r.push(OpCode::Continuation, true, b"!")), 1009);
    }

    #[test]
    fn close_replies_echo_valid_codes_only() {
        assert_eq!(close_reply(b""), 1000);
        assert_eq!(close_reply(&[0x03, 0xe8, b'o', b'k']), 1000);
        assert_eq!(close_reply(&4000u16.to_be_bytes()), 4000);
        assert_eq!(close_reply(&[0x03]), 1002);
        assert_eq!(close_reply(&1005u16.to_be_bytes()), 1002);
        assert_eq!(close_reply(&[0x03, 0xe8, 0xff]), 1002);
    }
}
