//! The frame relay: one task per proxied connection, moving frames both ways between the client
//! and the backend while enforcing RFC 6455 on each hop.
//!
//! Bytes are read into a hop's pooled buffer, decoded in place, transformed in place (client
//! frames get a fresh mask key written over theirs and their payload re-masked in one pass;
//! backend frames pass unchanged) and written to the other hop from the same buffer. Frame
//! headers keep their length through this, so no byte is ever moved to make room.
//!
//! Invariants:
//! - a direction reads only after everything it processed has been written (one write batched
//!   per read; a slow reader stops the gateway reading from the other side: backpressure), so a
//!   connection holds at most one buffer per direction, and none while idle;
//! - control frames the gateway originates (pongs, keepalive pings, closes) are written to a hop
//!   only at a frame boundary of the data forwarded to it;
//! - no frame follows a close frame on a hop; data from one hop is dropped once the other hop
//!   has been sent a close;
//! - a protocol violation is answered on the offending hop with its RFC close code and on the
//!   other hop with 1001 and a reason naming the cause; if the other hop is half-way through a
//!   frame, which a close frame cannot interrupt, that hop's TCP is shut down instead;
//! - every exit path ends with both sockets shut down or failed: the client hop is shut down
//!   first (RFC 6455 §7.1.1: the server closes TCP first), the backend is given the chance to
//!   close first so TIME_WAIT stays off the gateway's outgoing ports.

pub mod buffer;
pub mod hop;
pub mod mask_keys;
pub mod outbox;

use crate::limits::TokenBucket;
use crate::metrics::RelayCounters;
use crate::proto::{
    CloseCode, ControlFrame, Decoded, FrameDecoder, FrameHeader, Item, OpCode, ProtocolError,
    apply_mask, parse_close_payload, remask,
};
use crate::stream::Stream;
pub use hop::Side;
use hop::{Hop, Reading, Writing};
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How one relayed connection behaves; derived from the route's configuration.
#[derive(Debug, Clone, Copy)]
pub struct RelaySettings {
    pub ping_interval: Option<Duration>,
    pub pong_timeout: Duration,
    pub close_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub ping_passthrough: bool,
    /// Messages per second the client may send (a burst of two seconds' worth); more is 1008.
    pub message_rate: Option<u32>,
}

/// What happened on one hop, for the access log and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HopReport {
    pub bytes_in: u64,
    pub messages_in: u64,
    pub close_received: Option<u16>,
    pub close_sent: Option<u16>,
}

/// How a relayed connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayReport {
    pub client: HopReport,
    pub backend: HopReport,
    /// Who started the end: "client", "backend" or "gateway".
    pub initiator: &'static str,
    /// Why, in a few words (the close reason the gateway sent, or "close handshake").
    pub cause: String,
}

/// One hop as the handshake left it: its socket, the decoder for what it sends, and bytes it
/// sent right after its handshake head (read together with it: the start of its frames).
#[derive(Debug)]
pub struct HopStart<'a> {
    pub stream: Stream,
    pub decoder: FrameDecoder,
    pub early: &'a [u8],
}

/// A connection whose handshakes are done on both hops, ready to relay.
#[derive(Debug)]
pub struct Relay {
    client: Hop,
    backend: Hop,
    settings: RelaySettings,
    /// The last time a data message passed in either direction.
    last_data: Instant,
    initiator: Option<&'static str>,
    cause: String,
}

/// Why the gateway ends a connection that neither hop is closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The gateway shuts down: 1001 to both hops.
    Shutdown,
    /// The connection's sticky key now belongs to another backend: 1012 (Service Restart) to
    /// the client, so it reconnects to the new owner, and 1001 to the backend.
    Moved,
}

/// Ping payloads carry nothing the peer needs; a fixed tag makes them recognisable in captures.
const KEEPALIVE_PAYLOAD: &[u8] = b"wsgate";

impl Relay {
    pub fn new(
        client: HopStart<'_>,
        backend: HopStart<'_>,
        settings: RelaySettings,
        counters: RelayCounters,
    ) -> Self {
        let now = Instant::now();
        let RelayCounters {
            client_messages,
            client_bytes,
            backend_messages,
            backend_bytes,
        } = counters;
        let (client_early, backend_early) = (client.early, backend.early);
        let mut client = Hop::new(
            Side::Client,
            client.stream,
            client.decoder,
            now,
            (client_messages, client_bytes),
        );
        let mut backend = Hop::new(
            Side::Backend,
            backend.stream,
            backend.decoder,
            now,
            (backend_messages, backend_bytes),
        );
        client.message_rate = settings
            .message_rate
            .map(|rate| TokenBucket::new(rate, 2.0, now.into_std()));
        for (hop, early) in [(&mut client, client_early), (&mut backend, backend_early)] {
            if !early.is_empty() {
                hop.buf.read_space()[..early.len()].copy_from_slice(early);
                hop.buf.filled = early.len();
            }
        }
        Self {
            client,
            backend,
            settings,
            last_data: now,
            initiator: None,
            cause: String::new(),
        }
    }

    /// Relays until both hops are closed, then hands the report to `finish`. When the future
    /// `stop` makes completes, the gateway ends the connection as the [`Stop`] says and the
    /// relay finishes the closing handshakes.
    ///
    /// An idle connection's memory is mostly this future, so nothing in it is stored twice:
    /// it is an `async move` block rather than an `async fn` (whose arguments rustc stores
    /// both as arguments and as the bindings the body uses); `stop` is a closure, so its future
    /// is made where it is polled instead of being moved there from a captured copy; and
    /// `finish` runs inside, instead of in an outer future that would hold a second copy of
    /// the relay while awaiting this one.
    #[allow(clippy::manual_async_fn)] // deliberately not an async fn: see above
    pub fn run<S: Future<Output = Stop>, R>(
        mut self,
        stop: impl FnOnce() -> S,
        finish: impl FnOnce(RelayReport) -> R,
    ) -> impl Future<Output = R> {
        async move {
            let timer = tokio::time::sleep(Duration::from_secs(3600));
            tokio::pin!(timer);
            let stopped = tokio::select! {
                () = poll_fn(|cx| self.poll_relay(cx, timer.as_mut())) => None,
                stop = stop() => Some(stop),
            };
            if let Some(stop) = stopped {
                let now = Instant::now();
                match stop {
                    Stop::Shutdown => self.gateway_close("gateway shutting down", now),
                    Stop::Moved => self.gateway_close_with(
                        (CloseCode::SERVICE_RESTART, "backend changed, reconnect"),
                        (CloseCode::GOING_AWAY, "client moved to another backend"),
                        now,
                    ),
                }
                poll_fn(|cx| self.poll_relay(cx, timer.as_mut())).await;
            }
            finish(self.report())
        }
    }

    fn report(&self) -> RelayReport {
        let hop = |h: &Hop| HopReport {
            bytes_in: h.bytes_in,
            messages_in: h.messages_in,
            close_received: h.close_received.map(|c| c.0),
            close_sent: h.close_sent.map(|c| c.0),
        };
        RelayReport {
            client: hop(&self.client),
            backend: hop(&self.backend),
            initiator: self.initiator.unwrap_or("gateway"),
            cause: if self.cause.is_empty() {
                "close handshake".into()
            } else {
                self.cause.clone()
            },
        }
    }

    fn poll_relay(&mut self, cx: &mut Context<'_>, mut timer: Pin<&mut Sleep>) -> Poll<()> {
        for hop in [&mut self.client, &mut self.backend] {
            hop.read_blocked = false;
            hop.write_blocked = false;
        }
        loop {
            let now = Instant::now();
            let mut progress = true;
            while progress {
                let s = self.settings;
                progress = pump(
                    cx,
                    &mut self.client,
                    &mut self.backend,
                    &s,
                    now,
                    &mut self.last_data,
                    &mut self.initiator,
                );
                progress |= pump(
                    cx,
                    &mut self.backend,
                    &mut self.client,
                    &s,
                    now,
                    &mut self.last_data,
                    &mut self.initiator,
                );
                progress |= self.deliver_deferred_close(now);
                progress |= settle(cx, &mut self.client, &mut self.backend, &s, now);
                progress |= settle(cx, &mut self.backend, &mut self.client, &s, now);
            }
            if self.client.finished() && self.backend.finished() {
                return Poll::Ready(());
            }
            let deadline = self.next_deadline(now);
            if deadline <= now {
                self.on_timers(now);
                continue;
            }
            if timer.is_elapsed() || timer.deadline() > deadline {
                timer.as_mut().reset(deadline);
            }
            ready!(timer.as_mut().poll(cx));
            self.on_timers(Instant::now());
        }
    }

    /// Sends a client its deferred error close once the backend is done sending.
    fn deliver_deferred_close(&mut self, now: Instant) -> bool {
        let backend_done = self.backend.close_received.is_some()
            || self.backend.given_up
            || self.backend.finished();
        if self.client.deferred_close.is_none()
            || !backend_done
            || self.backend.buf.has_pending()
            || self.backend.mid_frame
        {
            return false;
        }
        self.client
            .send_close(CloseCode::NORMAL, "", now + self.settings.close_timeout);
        true
    }

    /// The earliest instant at which a timer needs attention. Deadlines that move later on
    /// every read (keepalive, idle) are checked lazily: the timer fires at the old instant and
    /// is set again, instead of being reset on every read.
    fn next_deadline(&self, now: Instant) -> Instant {
        let far = now + Duration::from_secs(3600);
        let mut deadline = far;
        for hop in [&self.client, &self.backend] {
            for d in [hop.close_deadline, hop.drain_deadline, hop.pong_deadline]
                .into_iter()
                .flatten()
            {
                deadline = deadline.min(d);
            }
            if let Some(interval) = self.settings.ping_interval
                && self.keepalive_applies(hop)
            {
                deadline = deadline.min(hop.last_heard + interval);
            }
        }
        if let Some(idle) = self.settings.idle_timeout
            && self.initiator.is_none()
        {
            deadline = deadline.min(self.last_data + idle);
        }
        deadline
    }

    fn keepalive_applies(&self, hop: &Hop) -> bool {
        hop.pong_deadline.is_none()
            && hop.reading == Reading::Frames
            && hop.close_sent.is_none()
            && hop.can_write()
    }

    fn on_timers(&mut self, now: Instant) {
        let close_deadline = now + self.settings.close_timeout;
        if let Some(idle) = self.settings.idle_timeout
            && self.initiator.is_none()
            && now >= self.last_data + idle
        {
            self.gateway_close("idle timeout", now);
        }
        for side in [Side::Client, Side::Backend] {
            let (hop, other) = match side {
                Side::Client => (&mut self.client, &mut self.backend),
                Side::Backend => (&mut self.backend, &mut self.client),
            };
            if hop.pong_deadline.is_some_and(|d| now >= d) {
                hop.pong_deadline = None;
                let reason = match side {
                    Side::Client => "client did not answer ping in time",
                    Side::Backend => "backend did not answer ping in time",
                };
                note_cause(&mut self.initiator, &mut self.cause, "gateway", reason);
                hop.send_close(CloseCode::GOING_AWAY, "ping timeout", close_deadline);
                hop.given_up = true;
                close_other(
                    other,
                    hop.mid_frame,
                    CloseCode::GOING_AWAY,
                    reason,
                    close_deadline,
                );
            }
            if let Some(interval) = self.settings.ping_interval
                && hop.pong_deadline.is_none()
                && hop.reading == Reading::Frames
                && hop.close_sent.is_none()
                && hop.can_write()
                && now >= hop.last_heard + interval
            {
                let ping = ControlFrame::new(OpCode::Ping, KEEPALIVE_PAYLOAD, hop.outgoing_mask());
                hop.send_control(ping);
                hop.pong_deadline = Some(now + self.settings.pong_timeout);
            }
            if hop.close_deadline.is_some_and(|d| now >= d) {
                hop.close_deadline = None;
                if hop.close_received.is_none() {
                    // The hop did not answer our close: give up on it, and answer the other
                    // hop's close ourselves if it is waiting for the reply we were relaying.
                    hop.given_up = true;
                    hop.outbox.clear();
                    other.buf.discard_all();
                    if let Some(code) = other.close_received {
                        other.send_close(reply_code(code), "", close_deadline);
                    }
                }
            }
            if hop.drain_deadline.is_some_and(|d| now >= d) {
                hop.drain_deadline = None;
                hop.reading = Reading::Done;
                hop.writing = match hop.writing {
                    Writing::Open => Writing::Finished,
                    other => other,
                };
            }
        }
    }

    /// The gateway ends the connection on both hops with 1001 (idle timeout, shutdown).
    fn gateway_close(&mut self, reason: &str, now: Instant) {
        let going_away = (CloseCode::GOING_AWAY, reason);
        self.gateway_close_with(going_away, going_away, now);
    }

    /// The gateway ends the connection: `client` and `backend` are the code and reason each
    /// hop is sent; the client's reason is the one reported.
    fn gateway_close_with(
        &mut self,
        client: (CloseCode, &str),
        backend: (CloseCode, &str),
        now: Instant,
    ) {
        note_cause(&mut self.initiator, &mut self.cause, "gateway", client.1);
        let deadline = now + self.settings.close_timeout;
        // A hop half-way through receiving a frame cannot take a close frame; it is sent the
        // other hop's close reply when that is relayed.
        if !self.backend.mid_frame {
            self.client.send_close(client.0, client.1, deadline);
        }
        if !self.client.mid_frame {
            self.backend.send_close(backend.0, backend.1, deadline);
        }
    }
}

/// The code of a close reply: the received one echoed (RFC 6455 §5.5.1), or 1000 for a close
/// that carried none.
fn reply_code(received: CloseCode) -> CloseCode {
    if received == CloseCode::NO_STATUS {
        CloseCode::NORMAL
    } else {
        received
    }
}

fn note_cause(
    initiator: &mut Option<&'static str>,
    cause: &mut String,
    who: &'static str,
    why: &str,
) {
    if initiator.is_none() {
        *initiator = Some(who);
        *cause = why.to_owned();
    }
}

/// Tells `other` that the connection is ending because of its peer hop. A close frame cannot
/// interrupt a frame in progress, so a hop receiving one half-way gets its TCP shut instead.
fn close_other(
    other: &mut Hop,
    peer_mid_frame: bool,
    code: CloseCode,
    reason: &str,
    deadline: Instant,
) {
    if other.close_sent.is_some() || !other.can_write() {
        return;
    }
    if peer_mid_frame {
        other.given_up = true;
        other.close_sent = Some(CloseCode::ABNORMAL);
        other.outbox.clear();
    } else {
        other.send_close(code, reason, deadline);
    }
}

/// Moves bytes from `src` to `dst`: flush what is processed, write control frames due to `dst`,
/// decode and transform what is buffered, read more. Returns whether anything happened.
fn pump(
    cx: &mut Context<'_>,
    src: &mut Hop,
    dst: &mut Hop,
    settings: &RelaySettings,
    now: Instant,
    last_data: &mut Instant,
    initiator: &mut Option<&'static str>,
) -> bool {
    let mut progress = false;
    loop {
        if src.buf.has_pending() {
            if !dst.can_write() {
                src.buf.discard_all();
                progress = true;
                continue;
            }
            if dst.write_blocked {
                return progress;
            }
            match Pin::new(&mut dst.stream).poll_write(cx, src.buf.pending()) {
                Poll::Ready(Ok(n)) if n > 0 => src.buf.advance_written(n),
                Poll::Ready(_) => lose(dst, src, now, settings, initiator),
                Poll::Pending => {
                    dst.write_blocked = true;
                    return progress;
                }
            }
            progress = true;
            continue;
        }
        if !src.mid_frame
            && dst.can_write()
            && !dst.write_blocked
            && let Some(bytes) = dst.outbox.next_bytes()
        {
            match Pin::new(&mut dst.stream).poll_write(cx, bytes) {
                Poll::Ready(Ok(n)) if n > 0 => dst.outbox.advance(n),
                Poll::Ready(_) => lose(dst, src, now, settings, initiator),
                Poll::Pending => {
                    dst.write_blocked = true;
                    return progress;
                }
            }
            progress = true;
            continue;
        }
        if src.reading == Reading::Frames && decode(src, dst, settings, now, last_data, initiator) {
            progress = true;
            if src.buf.has_pending() || !dst.outbox.is_empty() {
                continue;
            }
        }
        if src.reading == Reading::Done || src.read_blocked {
            src.buf.release_if_empty();
            return progress;
        }
        let space = src.buf.read_space();
        let mut read_buf = ReadBuf::new(space);
        match Pin::new(&mut src.stream).poll_read(cx, &mut read_buf) {
            Poll::Ready(Ok(())) => {
                let n = read_buf.filled().len();
                if n == 0 {
                    on_eof(src, dst, now, settings, initiator);
                } else {
                    src.buf.filled += n;
                    src.last_heard = now;
                    if src.reading == Reading::Discard {
                        src.buf.discard_unparsed();
                    }
                }
            }
            Poll::Ready(Err(_)) => lose(src, dst, now, settings, initiator),
            Poll::Pending => {
                src.read_blocked = true;
                src.buf.release_if_empty();
                return progress;
            }
        }
        progress = true;
    }
}

/// Decodes everything buffered from `src`, transforming forwarded frames in place. Returns
/// whether anything was consumed.
fn decode(
    src: &mut Hop,
    dst: &mut Hop,
    settings: &RelaySettings,
    now: Instant,
    last_data: &mut Instant,
    initiator: &mut Option<&'static str>,
) -> bool {
    let remask_towards_backend = src.side == Side::Client;
    let mut consumed_any = false;
    // The shared route counters are atomics: added to once per batch, not once per frame.
    let (mut bytes_seen, mut messages_seen) = (0u64, 0u64);
    loop {
        let (parsed, filled) = (src.buf.parsed, src.buf.filled);
        if parsed == filled && src.decoder.is_between_frames() {
            break;
        }
        let bytes = src.buf.bytes_mut();
        match src.decoder.decode_whole_message(&mut bytes[parsed..filled]) {
            Ok(Some(message)) => {
                consumed_any = true;
                if !within_message_rate(&mut src.message_rate, now) {
                    refuse_over_rate(src, dst, now, settings, initiator);
                    break;
                }
                bytes_seen += message.payload_len as u64;
                messages_seen += 1;
                *last_data = now;
                if dst.close_sent.is_some() {
                    src.buf.remove_at_parsed(message.frame_len());
                    continue;
                }
                if remask_towards_backend {
                    let key = mask_keys::next_mask_key();
                    let payload_start = parsed + message.header_len;
                    bytes[payload_start - 4..payload_start].copy_from_slice(&key.0);
                    let payload = &mut bytes[payload_start..payload_start + message.payload_len];
                    match message.mask {
                        Some(received) => remask(payload, received, key),
                        None => apply_mask(payload, key),
                    }
                }
                src.buf.parsed += message.frame_len();
                continue;
            }
            Ok(None) => {}
            Err(error) => {
                on_protocol_error(src, dst, error, now, settings, initiator);
                consumed_any = true;
                break;
            }
        }
        let Decoded { item, consumed } = match src.decoder.decode(&mut bytes[parsed..filled]) {
            Ok(Some(decoded)) => decoded,
            Ok(None) => break,
            Err(error) => {
                on_protocol_error(src, dst, error, now, settings, initiator);
                consumed_any = true;
                break;
            }
        };
        consumed_any = true;
        match item {
            Item::DataFrame(header) => {
                if header.opcode != OpCode::Continuation
                    && !within_message_rate(&mut src.message_rate, now)
                {
                    refuse_over_rate(src, dst, now, settings, initiator);
                    break;
                }
                if dst.close_sent.is_some() {
                    src.swallowing_frame = true;
                    src.buf.remove_at_parsed(consumed);
                    continue;
                }
                if remask_towards_backend {
                    let key = mask_keys::next_mask_key();
                    bytes[parsed + consumed - 4..parsed + consumed].copy_from_slice(&key.0);
                    src.out_mask = key;
                    src.out_offset = 0;
                }
                src.mid_frame = true;
                src.buf.parsed += consumed;
            }
            Item::Payload(piece) => {
                bytes_seen += piece.len as u64;
                *last_data = now;
                messages_seen += u64::from(piece.message_end);
                if src.swallowing_frame {
                    src.swallowing_frame = !piece.frame_end;
                    src.buf.remove_at_parsed(piece.len);
                    continue;
                }
                if remask_towards_backend {
                    let data = &mut bytes[parsed..parsed + piece.len];
                    let key = src.out_mask.rotated(src.out_offset);
                    match piece.mask {
                        Some(received) => remask(data, received, key),
                        None => apply_mask(data, key),
                    }
                    src.out_offset += piece.len as u64;
                }
                src.buf.parsed += piece.len;
                if piece.frame_end {
                    src.mid_frame = false;
                }
            }
            Item::Control { header, payload } => {
                let frame = parsed..parsed + consumed;
                let payload = parsed + payload.start..parsed + payload.end;
                on_control(src, dst, header, frame, payload, settings, now, initiator);
                if src.reading != Reading::Frames {
                    break;
                }
            }
        }
    }
    if bytes_seen > 0 || messages_seen > 0 {
        src.bytes_in += bytes_seen;
        src.messages_in += messages_seen;
        src.bytes_counter.inc_by(bytes_seen);
        src.messages_counter.inc_by(messages_seen);
    }
    src.buf.release_if_empty();
    consumed_any
}

/// Counts a new message against a hop's message rate (if its route limits it).
fn within_message_rate(rate: &mut Option<TokenBucket>, now: Instant) -> bool {
    rate.as_mut()
        .is_none_or(|bucket| bucket.try_take(now.into_std()))
}

/// `src` sent a message over its route's rate: 1008, refused at the message's first header, so
/// no byte of it is forwarded.
fn refuse_over_rate(
    src: &mut Hop,
    dst: &mut Hop,
    now: Instant,
    settings: &RelaySettings,
    initiator: &mut Option<&'static str>,
) {
    let violation = (CloseCode::POLICY_VIOLATION, "message rate limit exceeded");
    on_violation(
        src,
        dst,
        violation,
        "policy violation",
        now,
        settings,
        initiator,
    );
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename the list
fn on_control(
    src: &mut Hop,
    dst: &mut Hop,
    header: FrameHeader,
    frame: std::ops::Range<usize>,
    payload: std::ops::Range<usize>,
    settings: &RelaySettings,
    now: Instant,
    initiator: &mut Option<&'static str>,
) {
    let frame_len = frame.len();
    let forward = match header.opcode {
        OpCode::Ping | OpCode::Pong if settings.ping_passthrough => dst.close_sent.is_none(),
        OpCode::Ping => {
            let mask = src.outgoing_mask();
            let pong = ControlFrame::new(OpCode::Pong, &src.buf.bytes_mut()[payload.clone()], mask);
            if src.close_sent.is_none() {
                src.send_control(pong);
            }
            false
        }
        OpCode::Pong => false,
        _ => {
            let bytes = src.buf.bytes_mut();
            let code = match parse_close_payload(&bytes[payload.clone()]) {
                Ok(close) => close.code.unwrap_or(CloseCode::NO_STATUS),
                Err(_) => CloseCode::NO_STATUS, // validated by the decoder already
            };
            src.close_received = Some(code);
            src.reading = Reading::Discard;
            if initiator.is_none() {
                *initiator = Some(src.side.name());
            }
            if dst.close_sent.is_none() && dst.deferred_close.is_none() && dst.can_write() {
                dst.close_sent = Some(code);
                dst.close_deadline = Some(now + settings.close_timeout);
                true
            } else {
                if src.close_sent.is_none() {
                    // Nobody to relay the close to: the gateway answers it.
                    let deadline = now + settings.close_timeout;
                    if code == CloseCode::NO_STATUS {
                        src.send_control(ControlFrame::new(
                            OpCode::Close,
                            &[],
                            src.outgoing_mask(),
                        ));
                        src.close_sent = Some(CloseCode::NO_STATUS);
                    } else {
                        src.send_close(code, "", deadline);
                    }
                }
                false
            }
        }
    };
    if header.opcode == OpCode::Pong {
        src.pong_deadline = None;
    }
    let after_close = src.reading == Reading::Discard;
    if forward {
        if src.side == Side::Client {
            let key = mask_keys::next_mask_key();
            let bytes = src.buf.bytes_mut();
            bytes[payload.start - 4..payload.start].copy_from_slice(&key.0);
            apply_mask(&mut bytes[payload], key);
        }
        src.buf.parsed += frame_len;
    } else {
        src.buf.remove_at_parsed(frame_len);
    }
    if after_close {
        // Nothing may follow a close frame (RFC 6455 §5.5.1); whatever did is dropped.
        src.buf.discard_unparsed();
    }
}

fn on_protocol_error(
    src: &mut Hop,
    dst: &mut Hop,
    error: ProtocolError,
    now: Instant,
    settings: &RelaySettings,
    initiator: &mut Option<&'static str>,
) {
    let violation = (error.close_code(), error.reason());
    on_violation(
        src,
        dst,
        violation,
        "protocol error",
        now,
        settings,
        initiator,
    );
}

/// `src` broke the protocol or a policy: it gets `code` and `reason`; the other hop gets 1001
/// naming the side and the cause.
fn on_violation(
    src: &mut Hop,
    dst: &mut Hop,
    (code, reason): (CloseCode, &'static str),
    kind: &str,
    now: Instant,
    settings: &RelaySettings,
    initiator: &mut Option<&'static str>,
) {
    let deadline = now + settings.close_timeout;
    src.reading = Reading::Discard;
    src.buf.discard_unparsed();
    src.given_up = true;
    let other_reason = format!("{} {kind}: {reason}", src.side);
    if initiator.is_none() {
        *initiator = Some("gateway");
    }
    let backend_can_finish =
        src.side == Side::Client && !src.mid_frame && dst.close_sent.is_none() && dst.can_write();
    if backend_can_finish {
        // The client learns of its error after the backend has closed, so everything the
        // backend sent in answer to the client's valid messages still reaches it first.
        src.deferred_close = Some((code, reason));
    } else {
        src.send_close(code, reason, deadline);
    }
    close_other(
        dst,
        src.mid_frame,
        CloseCode::GOING_AWAY,
        &other_reason,
        deadline,
    );
    src.mid_frame = false;
}

/// `src` closed TCP.
fn on_eof(
    src: &mut Hop,
    dst: &mut Hop,
    now: Instant,
    settings: &RelaySettings,
    initiator: &mut Option<&'static str>,
) {
    src.reading = Reading::Done;
    src.buf.discard_unparsed();
    if src.close_received.is_none() && src.close_sent.is_none() {
        abandoned(src, dst, now, settings, initiator);
    }
}

/// `hop` failed (I/O error) or vanished: nothing more is exchanged with it.
fn lose(
    hop: &mut Hop,
    other: &mut Hop,
    now: Instant,
    settings: &RelaySettings,
    initiator: &mut Option<&'static str>,
) {
    let was_closing = hop.close_received.is_some() || hop.close_sent.is_some();
    hop.lose();
    if !was_closing {
        abandoned(hop, other, now, settings, initiator);
    } else if let Some(code) = hop.close_received
        && other.close_sent.is_none()
    {
        // The hop's close was received but not yet passed on.
        other.send_close(reply_code(code), "", now + settings.close_timeout);
    }
}

/// `hop` went away without a closing handshake. RFC 6455 §7.4.1: 1014 tells the client that
/// the gateway's upstream failed; a backend is told the client went away (1001).
fn abandoned(
    hop: &mut Hop,
    other: &mut Hop,
    now: Instant,
    settings: &RelaySettings,
    initiator: &mut Option<&'static str>,
) {
    hop.writing = Writing::Dead;
    hop.outbox.clear();
    let (code, reason) = match hop.side {
        Side::Backend => (
            CloseCode::BAD_GATEWAY,
            "backend closed the connection without a close frame",
        ),
        Side::Client => (
            CloseCode::GOING_AWAY,
            "client closed the connection without a close frame",
        ),
    };
    if initiator.is_none() {
        *initiator = Some(hop.side.name());
    }
    close_other(
        other,
        hop.mid_frame,
        code,
        reason,
        now + settings.close_timeout,
    );
    hop.mid_frame = false;
}

/// Ends TCP on a hop whose closing handshake is settled and whose output is flushed.
fn settle(
    cx: &mut Context<'_>,
    hop: &mut Hop,
    other: &mut Hop,
    settings: &RelaySettings,
    now: Instant,
) -> bool {
    if hop.writing != Writing::Open || !hop.handshake_settled() {
        return false;
    }
    let owed = !hop.outbox.is_empty() || other.buf.has_pending();
    if owed {
        return false;
    }
    // The server closes TCP first (RFC 6455 §7.1.1); as the backend's client the gateway lets
    // it close first, unless it gave up on it.
    if (hop.side == Side::Client || hop.given_up)
        && Pin::new(&mut hop.stream).poll_shutdown(cx).is_pending()
    {
        return false;
    }
    hop.writing = Writing::Finished;
    if hop.reading != Reading::Done {
        if hop.side == Side::Client && !hop.given_up && hop.stream.is_plain() {
            // The closing handshake is complete: a client sends nothing after its close frame,
            // and the server closes TCP at once (RFC 6455 §7.1.1) rather than waiting for the
            // client's FIN, which cost a read and a wake-up per connection.
            hop.reading = Reading::Done;
        } else {
            // After a protocol error or an unanswered close the client may still be sending,
            // and a TLS client (or an upgraded connection, which may be one) may answer our
            // close_notify with its own: read and drop until it closes, so that closing does
            // not reset the connection under it.
            hop.reading = Reading::Discard;
            hop.drain_deadline = Some(now + settings.close_timeout);
        }
    }
    true
}
