//! A session's backend connection: one task per session, for the session's whole life. It
//! reads backend messages into the session's buffer (and stops reading while the buffer is
//! full, so a flooding backend meets TCP backpressure, not unbounded memory), writes what the
//! client sends, keeps the hop alive with pings, and ends the session when the client is gone
//! for good, the client closes, the backend closes, or the gateway shuts down.
//!
//! After the backend connection ends, the task stays until the client has collected the close
//! (acknowledged it) or the session timeout passes, so a lost answer carrying the close is
//! sent again like any other.

use super::open::Admission;
use super::protocol::{Close, Event, Message};
use super::registry::Registry;
use super::socket::{MessageReader, MessageWriter, ReadError, Received};
use super::state::{Outgoing, Presence, Session};
use super::until;
use crate::auth::SubjectSlot;
use crate::authorize::Expiry;
use crate::drain::Departure;
use crate::gateway::RouteSlot;
use crate::metrics::{Metrics, RelayCounters, RouteBackend, RouteLabel, SessionEnd};
use crate::proto::{CloseCode, Keepalive, KeepaliveDue};
use crate::rebalance::Registration;
use crate::routing::ConnectionSlot;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

/// How often presence and expiry are checked.
const TICK: Duration = Duration::from_secs(1);

/// The backend side of a session, and what it holds until the session ends.
#[derive(Debug)]
pub struct BackendTask {
    pub session: Arc<Session>,
    pub reader: MessageReader,
    pub writer: MessageWriter,
    pub outgoing: mpsc::Receiver<Outgoing>,
    pub registry: Arc<Registry>,
    /// When the gateway drains: this session's turn to close.
    pub departure: Departure,
    pub metrics: Arc<Metrics>,
    /// The route's message and byte counters, shared with its relayed connections.
    pub counters: RelayCounters,
    /// This session's messages, for its access-log line.
    pub tally: Tally,
    /// The session's place in its room, for rebalancing (sticky routes only).
    pub registration: Option<Registration>,
    pub backend_url: String,
    pub ping_interval: Option<Duration>,
    pub pong_timeout: Duration,
    pub close_timeout: Duration,
    /// When the token the session was opened with expires (routes with `auth.jwt`).
    pub expiry: Option<Expiry>,
    /// The session's place under `max_connections_per_subject`.
    pub _subject_slot: Option<SubjectSlot>,
    /// Route and backend connection slots, held for the session's life.
    pub _route_slot: RouteSlot,
    pub _backend_slot: ConnectionSlot,
    /// This session's places under `sessions.max_sessions` and its address's limits.
    pub _admission: Admission,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub to_backend: u64,
    pub from_backend: u64,
}

/// How the backend connection ended, for metrics and the log.
#[derive(Debug, Clone, Copy)]
enum Ending {
    ClientClosed,
    BackendClosed,
    BackendLost,
    Expired,
    Overflow,
    RateExceeded,
    Moved,
    Shutdown,
    /// The token the session was opened with expired.
    TokenExpired,
}

impl Ending {
    fn label(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::BackendClosed => "backend_closed",
            Self::BackendLost => "backend_lost",
            Self::Expired => "expired",
            Self::Overflow => "overflow",
            Self::RateExceeded => "message_rate",
            Self::Moved => "moved",
            Self::Shutdown => "shutdown",
            Self::TokenExpired => "token_expired",
        }
    }
}

/// Completes when the session's token expires (never without an expiry).
async fn expired(expiry: Option<Expiry>) {
    match expiry {
        Some(expiry) => tokio::time::sleep_until(expiry.at).await,
        None => std::future::pending().await,
    }
}

/// Completes when the session's room moved to another backend (never without a registration).
async fn moved(registration: Option<&Registration>) {
    match registration {
        Some(registration) => registration.moved().await,
        None => std::future::pending().await,
    }
}

impl BackendTask {
    pub async fn run(mut self) {
        let started = Instant::now();
        let labels = RouteBackend {
            route: self.session.route.clone(),
            backend: self.backend_url.clone(),
        };
        self.metrics.connections_opened.get_or_create(&labels).inc();
        let active = self
            .metrics
            .connections_active
            .get_or_create(&labels)
            .clone();
        active.inc();
        let sessions: Gauge = self
            .metrics
            .sessions_active
            .get_or_create(&RouteLabel {
                route: self.session.route.clone(),
            })
            .clone();
        sessions.inc();

        let ending = self.connected().await;
        active.dec();
        self.session.backend_gone();
        tracing::info!(
            target: "wsgate::access",
            session = %self.session.id,
            route = %self.session.route,
            backend = %self.backend_url,
            duration_ms = started.elapsed().as_millis() as u64,
            client_messages = self.tally.to_backend,
            backend_messages = self.tally.from_backend,
            ending = ending.label(),
            "session backend closed"
        );
        if matches!(
            ending,
            Ending::BackendClosed
                | Ending::BackendLost
                | Ending::RateExceeded
                | Ending::Moved
                | Ending::Shutdown
                | Ending::TokenExpired
        ) {
            self.await_collection().await;
        }
        self.registry.remove(self.session.id.as_str());
        sessions.dec();
        self.metrics
            .sessions_ended
            .get_or_create(&SessionEnd {
                route: self.session.route.clone(),
                reason: ending.label().to_owned(),
            })
            .inc();
    }

    /// Pumps until the backend connection ends.
    async fn connected(&mut self) -> Ending {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut keepalive = Keepalive::new(
            self.ping_interval,
            self.pong_timeout,
            Instant::now().into_std(),
        );
        let mut reading_paused = false;
        loop {
            let full = self.session.is_full();
            // While the buffer is full the backend is not read, so its silence (or its pong
            // waiting unread) proves nothing: keepalive pauses and starts over afterwards.
            if full != reading_paused {
                reading_paused = full;
                keepalive.restart(Instant::now().into_std());
            }
            tokio::select! {
                () = expired(self.expiry) => {
                    // As for a relayed connection: the route's code to the client, 1001 to
                    // the backend.
                    let code = self.expiry.map_or(CloseCode::POLICY_VIOLATION, |e| e.code);
                    let close = Close {
                        code: code.0,
                        reason: "token expired".to_owned(),
                    };
                    self.end_both(CloseCode::GOING_AWAY, "client token expired", close)
                        .await;
                    return Ending::TokenExpired;
                }
                () = moved(self.registration.as_ref()) => {
                    // As for a relayed connection: 1012 to the client (which reconnects, to
                    // the room's new owner), 1001 to the backend.
                    let close = Close {
                        code: CloseCode::SERVICE_RESTART.0,
                        reason: "backend changed, reconnect".to_owned(),
                    };
                    self.end_both(CloseCode::GOING_AWAY, "client moved to another backend", close)
                        .await;
                    return Ending::Moved;
                }
                () = self.departure.wait(self.registration.as_ref().map(Registration::room)) => {
                    let close = Close {
                        code: CloseCode::GOING_AWAY.0,
                        reason: "gateway shutting down".to_owned(),
                    };
                    self.end_both(CloseCode::GOING_AWAY, "gateway shutting down", close)
                        .await;
                    return Ending::Shutdown;
                }
                received = self.reader.next(), if !full => {
                    keepalive.on_heard(Instant::now().into_std());
                    match received {
                        Ok(Received::Message(message)) => {
                            self.counters.backend_messages.inc();
                            self.tally.from_backend += 1;
                            self.counters.backend_bytes.inc_by(message.len() as u64);
                            self.session.push(Event::Message(message));
                        }
                        Ok(Received::Ping(payload)) => {
                            if self.writer.pong(&payload).await.is_err() {
                                return self.lost("backend connection lost");
                            }
                        }
                        Ok(Received::Pong) => keepalive.on_pong(Instant::now().into_std()),
                        Ok(Received::Close(close)) => {
                            let close = close.unwrap_or(Close {
                                code: CloseCode::NO_STATUS.0,
                                reason: String::new(),
                            });
                            let _ = self.writer.close(CloseCode(close.code).reply(), "").await;
                            self.session.push(Event::Close(close));
                            return Ending::BackendClosed;
                        }
                        Err(ReadError::Protocol(error)) => {
                            let _ = self.writer.close(error.close_code(), error.reason()).await;
                            self.session.push(Event::Close(Close {
                                code: CloseCode::GOING_AWAY.0,
                                reason: format!("backend violated the protocol: {}", error.reason()),
                            }));
                            return Ending::BackendLost;
                        }
                        Err(_) => return self.lost("backend went away"),
                    }
                }
                () = self.session.space.notified(), if full => {}
                outgoing = self.outgoing.recv() => match outgoing {
                    Some(Outgoing::Messages(messages)) => {
                        if self.writer.send_all(&messages).await.is_err() {
                            return self.lost("backend connection lost");
                        }
                        let bytes: usize = messages.iter().map(Message::len).sum();
                        self.counters.client_messages.inc_by(messages.len() as u64);
                        self.counters.client_bytes.inc_by(bytes as u64);
                        self.tally.to_backend += messages.len() as u64;
                    }
                    Some(Outgoing::Close(close)) => {
                        self.forget();
                        self.close_backend(CloseCode(close.code), &close.reason, false).await;
                        return Ending::ClientClosed;
                    }
                    Some(Outgoing::RateExceeded) => {
                        // As on a relayed connection: 1008 to the client, 1001 to the backend.
                        let close = Close {
                            code: CloseCode::POLICY_VIOLATION.0,
                            reason: "message rate exceeded".to_owned(),
                        };
                        self.end_both(CloseCode::GOING_AWAY, "client exceeded its message rate", close)
                            .await;
                        return Ending::RateExceeded;
                    }
                    None => return Ending::ClientClosed,
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    match self.session.presence(now) {
                        Presence::Expired => {
                            self.forget();
                            self.close_backend(CloseCode::GOING_AWAY, "session expired", false).await;
                            return Ending::Expired;
                        }
                        Presence::Away if full => {
                            self.forget();
                            self.close_backend(
                                CloseCode::GOING_AWAY,
                                "session buffer full while the client was away",
                                false,
                            )
                            .await;
                            return Ending::Overflow;
                        }
                        _ => {}
                    }
                }
                () = until(keepalive.poll_timeout()), if !full => {
                    match keepalive.on_timeout(Instant::now().into_std()) {
                        Some(KeepaliveDue::Ping) if self.writer.ping().await.is_err() => {
                            return self.lost("backend connection lost");
                        }
                        Some(KeepaliveDue::Unresponsive) => {
                            let _ = self.writer.close(CloseCode::GOING_AWAY, "ping timeout").await;
                            self.session.push(Event::Close(Close {
                                code: CloseCode::GOING_AWAY.0,
                                reason: "backend did not answer ping in time".to_owned(),
                            }));
                            return Ending::BackendLost;
                        }
                        Some(KeepaliveDue::Ping) | None => {}
                    }
                }
            }
        }
    }

    /// Makes the session unreachable at once, for endings the client will not collect: its
    /// next request learns the session is gone while the backend's close completes.
    fn forget(&self) {
        self.registry.remove(self.session.id.as_str());
    }

    fn lost(&self, reason: &str) -> Ending {
        self.session.push(Event::Close(Close {
            code: CloseCode::BAD_GATEWAY.0,
            reason: reason.to_owned(),
        }));
        Ending::BackendLost
    }

    /// Closes the backend with `code` and waits (at most the close timeout) for its reply.
    /// What the backend still sends meanwhile is kept for the client when `keep` (it is still
    /// there to collect it), dropped otherwise (it has closed or is gone).
    async fn close_backend(&mut self, code: CloseCode, reason: &str, keep: bool) {
        if self.writer.close(code, reason).await.is_err() {
            return;
        }
        let session = Arc::clone(&self.session);
        let reply = async {
            loop {
                match self.reader.next().await {
                    Ok(Received::Message(message)) if keep => {
                        session.push(Event::Message(message));
                        // Teardown does not grow the buffer past its bound.
                        if session.is_full() {
                            break;
                        }
                    }
                    Ok(Received::Close(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(self.close_timeout, reply).await;
        self.writer.shutdown().await;
    }

    /// Ends the session from the gateway's side while the client is still there: the backend
    /// gets `backend_code`; the client gets what the backend sent until its close reply, then
    /// `client_close`.
    async fn end_both(
        &mut self,
        backend_code: CloseCode,
        backend_reason: &str,
        client_close: Close,
    ) {
        self.close_backend(backend_code, backend_reason, true).await;
        self.session.push(Event::Close(client_close));
    }

    /// After the backend is gone: waits until the client has acknowledged the close, or is
    /// gone too. On shutdown, only briefly: the process is about to exit.
    async fn await_collection(&mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let give_up = if self.departure.is_closing() {
            Instant::now() + Duration::from_secs(2)
        } else {
            Instant::now() + self.session.timing.timeout + self.session.timing.poll_timeout
        };
        loop {
            tick.tick().await;
            let now = Instant::now();
            match self.session.presence(now) {
                Presence::Finished | Presence::Expired => return,
                _ if now >= give_up => return,
                _ => {}
            }
        }
    }
}
