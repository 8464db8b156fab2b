//! A session carried by one WebSocket between the client library and the gateway (the
//! `socket` operation). The gateway terminates this WebSocket: every message starts with a tag
//! byte, `d` for application data (the rest is the message, text or binary as sent) and `c` for
//! a control message (JSON). Sequence numbers are implicit: the n-th data message after the
//! gateway's `open` control message is number `ack + n` downstream (`ack` from the URL) and
//! `received + n` upstream (`received` from the `open` message). Both sides acknowledge with
//! `{"type":"ack","received":N}` at least once a second while data flows.
//!
//! A dropped connection only detaches the session: the client may resume it (with this or the
//! long-polling transport) within the session timeout and receive what it missed. A close
//! frame from the client ends the session (its code and reason go to the backend); a close
//! frame from the gateway carries the backend's close after every message before it.
//!
//! Plain WebSocket clients never come here: only requests with `wsgate=socket` do.

use super::open::{Lookup, OpenSpec, admit, find, open};
use super::protocol::{
    CLOSE_DETACH, CLOSE_FORBIDDEN, CLOSE_SESSION_GONE, CLOSE_SUPERSEDED, Close, Control, Event,
    Message, Op, Opened, SessionQuery, TAG_CONTROL, TAG_DATA, backend_target, parse_query,
};
use super::socket::{self, MessageWriter, ReadError, Received, encode_message};
use super::state::{DeliverError, Session};
use super::until;
use crate::admit::switching_protocols;
use crate::client_addr::ClientAddr;
use crate::gateway::Gateway;
use crate::proto::handshake::{self, RequestHead};
use crate::proto::{CloseCode, DecoderConfig, Keepalive, KeepaliveDue, Role};
use crate::stream::Stream;
use crate::upstream::Refusal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::{Instant, MissedTickBehavior};

/// How often acknowledgements go out while data flows, and the transport is checked.
const ACK_EVERY: Duration = Duration::from_millis(500);
/// Events written per wake-up before the writer looks at its other duties again.
const WRITE_BATCH: u64 = 256 << 10;

/// An accepted session WebSocket, to serve once the 101 is out.
#[derive(Debug)]
pub struct SessionSocket {
    pub accept: String,
    pub protocol: Option<String>,
    pub set_cookie: Option<String>,
    start: Start,
    ack: u64,
    instance: String,
    limits: (u64, u64),
    timers: Timers,
}

/// The route's keepalive and close timers, applied to the client's session WebSocket.
#[derive(Debug, Clone, Copy)]
struct Timers {
    ping_interval: Option<Duration>,
    pong_timeout: Duration,
    close: Duration,
}

#[derive(Debug)]
enum Start {
    Attach(Arc<Session>),
    /// The session cannot be used: the WebSocket is accepted only to say so with a close code
    /// (a browser cannot read the status of a refused handshake).
    Refuse(u16, &'static str),
}

/// What a WebSocket upgrade's query says about sessions.
#[derive(Debug)]
pub enum UpgradeKind<'q> {
    /// An ordinary WebSocket, relayed frame by frame (also when it has no route: the
    /// ordinary path refuses it with its 404).
    Plain,
    /// Session parameters that cannot be served on an upgrade: a 400 with this line.
    Invalid(String),
    /// The client library's session WebSocket, on this route.
    Session(usize, SessionQuery<'q>),
}

/// Sorts an upgrade request, for both ways a WebSocket arrives (first request on a raw
/// connection, or an upgrade on a keep-alive HTTP connection).
pub fn classify<'q>(gateway: &Gateway, head: &RequestHead<'_, 'q>) -> UpgradeKind<'q> {
    if !gateway.config.sessions.enabled {
        return UpgradeKind::Plain;
    }
    let query = match parse_query(head.query()) {
        Ok(Some(query)) => query,
        Ok(None) => return UpgradeKind::Plain,
        Err(line) => return UpgradeKind::Invalid(line),
    };
    if query.op != Op::Socket {
        return UpgradeKind::Invalid(format!(
            "the {} session operation is a plain HTTP request, not a WebSocket upgrade",
            query.op.name()
        ));
    }
    match gateway.routes.route(head.header("host"), head.path()) {
        Some(route) => UpgradeKind::Session(route, query),
        None => UpgradeKind::Plain,
    }
}

/// Decides a `wsgate=socket` upgrade on `route`: a new session (no `wsgate_sid`) or a resumed
/// one.
pub async fn decide(
    gateway: &Arc<Gateway>,
    route: usize,
    head: &RequestHead<'_, '_>,
    query: &SessionQuery<'_>,
    peer: ClientAddr,
    tls: bool,
) -> Result<SessionSocket, Refusal> {
    let upgrade = handshake::validate_upgrade(head).map_err(|error| {
        gateway.metrics.handshake_failed(error.label());
        Refusal::plain(error.status(), &error.to_string(), error.extra_headers())
            .by_rule(error.label())
    })?;
    let offered: Vec<&str> = handshake::server::offered_protocols(head.headers).collect();
    let (limits, timers) = {
        let route = gateway.route(route);
        let timers = Timers {
            ping_interval: route.timeouts.ping_interval,
            pong_timeout: route.timeouts.pong_timeout,
            close: route.timeouts.close,
        };
        ((route.limits.max_frame, route.limits.max_message), timers)
    };
    let mut socket = SessionSocket {
        accept: handshake::accept_key(upgrade.key),
        protocol: None,
        set_cookie: None,
        start: Start::Refuse(CLOSE_SESSION_GONE, ""),
        ack: query.ack,
        instance: gateway.config.sessions.instance.clone(),
        limits,
        timers,
    };
    match query.sid.as_deref() {
        Some(sid) => match find(
            gateway,
            route,
            sid,
            upgrade.origin,
            crate::authorize::presented_subject(gateway, route, head, peer, tls)
                .await
                .as_deref(),
        ) {
            Ok(session) => {
                // Echo the subprotocol only if this client offers it (RFC 6455 §4.1).
                socket.protocol = session
                    .protocol
                    .clone()
                    .filter(|p| offered.iter().any(|o| o == p));
                socket.start = Start::Attach(session);
            }
            Err(Lookup::Gone) => {
                socket.start = Start::Refuse(CLOSE_SESSION_GONE, "session not found");
            }
            Err(Lookup::Forbidden(why)) => socket.start = Start::Refuse(CLOSE_FORBIDDEN, why),
        },
        None => {
            let target = backend_target(head.path(), query.rest.as_deref());
            let backend_head = RequestHead {
                method: head.method,
                target: &target,
                version: head.version,
                headers: head.headers,
            };
            let protocols = (!offered.is_empty()).then(|| offered.join(", "));
            let spec = OpenSpec {
                route,
                head: &backend_head,
                host: upgrade.host,
                origin: upgrade.origin,
                protocols: protocols.as_deref(),
            };
            let admission = admit(gateway, route, upgrade.origin, peer)?;
            let opened = open(gateway, &spec, admission, peer, tls).await?;
            socket.protocol = opened.session.protocol.clone();
            socket.set_cookie = opened.set_cookie;
            socket.start = Start::Attach(opened.session);
        }
    }
    Ok(socket)
}

impl SessionSocket {
    pub fn response_head(&self) -> Vec<u8> {
        switching_protocols(
            &self.accept,
            self.protocol.as_deref(),
            None,
            self.set_cookie.as_deref(),
            // A session outlives its backend's handshake, which was not the client's.
            &[],
        )
    }

    /// Serves the session over `stream` until either side closes or the connection drops.
    pub async fn serve(self, stream: Stream, early: &[u8]) {
        let (mut reader, writer) = socket::split(
            stream,
            early,
            DecoderConfig {
                role: Role::Server,
                max_frame: self.limits.0,
                // One more byte than the route allows: the tag.
                max_message: self.limits.1.saturating_add(1),
                compression: false,
                keep_opaque_masked: false,
            },
        );
        let writer = Mutex::new(writer);
        let session = match self.start {
            Start::Refuse(code, reason) => {
                refuse(&writer, &mut reader, code, reason).await;
                return;
            }
            Start::Attach(session) => session,
        };
        if let Err(error) = session.ack(self.ack) {
            let reason = error.to_string();
            refuse(&writer, &mut reader, CloseCode::POLICY_VIOLATION.0, &reason).await;
            return;
        }
        let attachment = session.attach();
        let received = session.received().await;
        let opened = Control::Open(Opened {
            session: session.id.as_str().to_owned(),
            instance: self.instance,
            protocol: session.protocol.clone(),
            received,
            poll_timeout_ms: session.timing.poll_timeout.as_millis() as u64,
            timeout_ms: session.timing.timeout.as_millis() as u64,
            max_batch: session.timing.max_batch,
        });
        if send_control(&writer, &opened).await.is_err() {
            return;
        }
        let close_sent = AtomicBool::new(false);
        let keepalive = std::sync::Mutex::new(Keepalive::new(
            self.timers.ping_interval,
            self.timers.pong_timeout,
            Instant::now().into_std(),
        ));
        let keepalive = || keepalive.lock().unwrap_or_else(|p| p.into_inner());
        let downstream = async {
            let mut sent = self.ack;
            let mut acked_to_client = received;
            let mut tick = tokio::time::interval(ACK_EVERY);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                let changed = session.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if !session.is_current(&attachment) {
                    let mut writer = writer.lock().await;
                    let _ = writer
                        .close(
                            CloseCode(CLOSE_SUPERSEDED),
                            "superseded by a newer connection",
                        )
                        .await;
                    return;
                }
                // Encoded while the buffer is locked, written with one write after: a batch of
                // small messages costs one system call, and no event is copied out first.
                let (mut frames, mut last, mut close) = (Vec::new(), sent, None);
                session.visit_since(sent, WRITE_BATCH, |seq, event| {
                    if close.is_some() {
                        return;
                    }
                    match event {
                        Event::Message(message) => {
                            encode_message(&mut frames, false, message, Some(TAG_DATA));
                        }
                        Event::Close(closing) => close = Some(closing.clone()),
                    }
                    last = seq;
                });
                if !frames.is_empty() && writer.lock().await.write_encoded(&frames).await.is_err() {
                    return;
                }
                if let Some(close) = close {
                    close_sent.store(true, Ordering::Release);
                    let code = CloseCode(close.code).or_normal_on_wire();
                    if writer
                        .lock()
                        .await
                        .close(code, &close.reason)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    // The client's close reply (read by the upstream half) ends the transport;
                    // a client that never replies is let go after the close timeout.
                    tokio::time::sleep(self.timers.close).await;
                    return;
                }
                if last != sent {
                    sent = last;
                    continue;
                }
                tokio::select! {
                    () = changed => {}
                    _ = tick.tick() => {
                        let received = session.received().await;
                        if received != acked_to_client {
                            let ack = Control::Ack { received };
                            if send_control(&writer, &ack).await.is_err() {
                                return;
                            }
                            acked_to_client = received;
                        }
                    }
                }
            }
        };
        let upstream = async {
            let mut next = received + 1;
            loop {
                let received = reader.next().await;
                keepalive().on_heard(Instant::now().into_std());
                match received {
                    Ok(Received::Message(message)) => match split_tag(message) {
                        Some((TAG_DATA, message)) => {
                            // Only a delivered message takes a number: the session's
                            // `received` moves only then.
                            match session.deliver(next, vec![message]).await {
                                Ok(_) => next += 1,
                                // The session's close is on its way downstream; what the
                                // client sends meanwhile goes nowhere.
                                Err(DeliverError::Gone) => {}
                                Err(DeliverError::RateExceeded) => {
                                    let why = "message rate exceeded";
                                    return policy_close(&writer, why).await;
                                }
                                // Another connection of this session delivered meanwhile:
                                // this one's numbering no longer holds.
                                Err(DeliverError::Gap { .. }) => {
                                    let why = "session messages out of order";
                                    return policy_close(&writer, why).await;
                                }
                            }
                        }
                        Some((TAG_CONTROL, Message::Text(json))) => {
                            match serde_json::from_str::<Control>(&json) {
                                Ok(Control::Ack { received }) => {
                                    if session.ack(received).is_err() {
                                        let why = "acknowledged more than was sent";
                                        return policy_close(&writer, why).await;
                                    }
                                }
                                _ => {
                                    let why = "unknown session control message";
                                    return policy_close(&writer, why).await;
                                }
                            }
                        }
                        _ => {
                            let why = "session messages start with 'd' or 'c'";
                            return policy_close(&writer, why).await;
                        }
                    },
                    Ok(Received::Ping(payload)) => {
                        let _ = writer.lock().await.pong(&payload).await;
                    }
                    Ok(Received::Pong) => keepalive().on_pong(Instant::now().into_std()),
                    Ok(Received::Close(Some(close))) if close.code == CLOSE_DETACH => {
                        // This connection ends; the session waits for a resume.
                        let _ = writer.lock().await.close(CloseCode(CLOSE_DETACH), "").await;
                        return;
                    }
                    Ok(Received::Close(close)) => {
                        if close_sent.load(Ordering::Acquire) {
                            // The reply to the backend's close: the client has every event.
                            let _ = session.ack(session.last_event());
                        } else {
                            let close = close.unwrap_or(Close {
                                code: CloseCode::NORMAL.0,
                                reason: String::new(),
                            });
                            let code = close.code;
                            session.close(close).await;
                            let _ = writer.lock().await.close(CloseCode(code), "").await;
                        }
                        return;
                    }
                    Err(ReadError::Protocol(error)) => {
                        let _ = writer
                            .lock()
                            .await
                            .close(error.close_code(), error.reason())
                            .await;
                        return;
                    }
                    // A dropped connection: the session waits for a resume.
                    Err(_) => return,
                }
            }
        };
        // A client that vanished without a FIN must not keep the session attached (and its
        // buffer filling) forever: ping it, and let it go when it stays silent. This runs beside
        // the two halves, so it also frees a writer stuck on a dead socket.
        let watchdog = async {
            loop {
                let deadline = keepalive().poll_timeout();
                until(deadline).await;
                let due = keepalive().on_timeout(Instant::now().into_std());
                match due {
                    Some(KeepaliveDue::Ping) => {
                        let ping = async { writer.lock().await.ping().await };
                        if tokio::time::timeout(self.timers.pong_timeout, ping)
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Some(KeepaliveDue::Unresponsive) => return,
                    None => {}
                }
            }
        };
        tokio::select! {
            () = downstream => {}
            () = upstream => {}
            () = watchdog => {
                tracing::debug!(session = %session.id, "session WebSocket silent; detached");
            }
        }
        // Detached before the shutdown, which a dead socket may stall.
        drop(attachment);
        let _ = tokio::time::timeout(self.timers.close, async {
            writer.lock().await.shutdown().await;
        })
        .await;
    }
}

fn split_tag(message: Message) -> Option<(u8, Message)> {
    match message {
        Message::Text(mut text) => {
            let tag = *text.as_bytes().first()?;
            if !tag.is_ascii() {
                return None;
            }
            text.remove(0);
            Some((tag, Message::Text(text)))
        }
        Message::Binary(mut bytes) => {
            let tag = *bytes.first()?;
            bytes.remove(0);
            Some((tag, Message::Binary(bytes)))
        }
    }
}

/// Ends the connection (not the session) over a malformed session message.
async fn policy_close(writer: &Mutex<MessageWriter>, reason: &str) {
    let _ = writer
        .lock()
        .await
        .close(CloseCode::POLICY_VIOLATION, reason)
        .await;
}

async fn send_control(writer: &Mutex<MessageWriter>, control: &Control) -> std::io::Result<()> {
    let json = serde_json::to_string(control).unwrap_or_default();
    writer.lock().await.send_text(TAG_CONTROL, &json).await
}

/// Closes with `code` and waits briefly for the client's reply.
async fn refuse(
    writer: &Mutex<MessageWriter>,
    reader: &mut socket::MessageReader,
    code: u16,
    reason: &str,
) {
    let mut writer = writer.lock().await;
    if writer.close(CloseCode(code), reason).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while !matches!(reader.next().await, Ok(Received::Close(_)) | Err(_)) {}
    })
    .await;
    writer.shutdown().await;
}
