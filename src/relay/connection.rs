//! The relay's connection logic as a state machine without I/O or clock: the driver
//! (`super::driver`) feeds it bytes read on a hop, end of stream, completed writes, I/O errors,
//! timer expiries and the stop signal, each with the current time; it answers with bytes to
//! write per hop, whether a hop's TCP is to be shut down, the next deadline, and, once both hops
//! are done, the connection's [`RelayReport`].
//!
//! Invariants:
//! - every input is handled in a bounded number of steps and either consumes what it was given
//!   or changes the state; nothing loops waiting for an output it cannot produce;
//! - a hop is read only after everything processed from it has been written to the other hop
//!   (one write batch per read; a slow reader stops the gateway reading from the other side:
//!   backpressure), so a connection holds at most one buffer per direction, none while idle;
//! - control frames the gateway originates (pongs, keepalive pings, closes) are written to a hop
//!   only at a frame boundary of the data forwarded to it;
//! - no frame follows a close frame on a hop; data from one hop is dropped once the other hop
//!   has been sent a close; nothing invalid is forwarded: a frame is forwarded only as far as
//!   the decoder has accepted it;
//! - a protocol violation is answered on the offending hop with its RFC close code and on the
//!   other hop with 1001 naming the cause; if the other hop is half-way through a frame, which a
//!   close frame cannot interrupt, that hop's TCP is shut down instead;
//! - at most one close frame is sent per hop;
//! - once neither peer sends anything, the connection finishes within the close timeout (plus
//!   the drain timeout for a client that keeps its TCP open): every wait has a deadline;
//! - the client hop is shut down first (RFC 6455 §7.1.1: the server closes TCP first); the
//!   backend is given the chance to close first, so TIME_WAIT stays off the gateway's ports.

use super::buffer::BUFFER_LEN;
use super::compress::{DeflateReservation, Progress, RelayCompression, Transform};
use super::credentials::{
    Credentials, MIN_REFRESH_INTERVAL, Refresh, refresh_candidate_len, refresh_token,
};
use super::ending::{Cause, HopReport, Initiator, RelayReport};
use super::hop::{CloseState, Hop, InFrame, Reading, Side, Writing};
use super::mask_keys;
use super::outbox::Outbox;
use crate::limits::TokenBucket;
use crate::metrics::RelayCounters;
use crate::proto::frame::RSV1;
use crate::proto::{
    CloseCode, ControlFrame, Decoded, FrameDecoder, FrameHeader, Item, Keepalive, KeepaliveDue,
    OpCode, PING_PAYLOAD, ProtocolError, apply_mask, parse_close_payload, remask,
};
use std::ops::Range;
use std::time::{Duration, Instant};

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

/// Why the gateway ends a connection that neither hop is closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The gateway shuts down: 1001 to both hops.
    Shutdown,
    /// The connection's sticky key now belongs to another backend: 1012 (Service Restart) to
    /// the client, so it reconnects to the new owner, and 1001 to the backend.
    Moved,
    /// The client's token expired: `code` (the route's `expired_close_code`, 1008 by default)
    /// to the client, 1001 to the backend.
    Expired { code: CloseCode },
}

/// One relayed connection's state between its two hops.
#[derive(Debug)]
pub struct Connection {
    client: Hop,
    backend: Hop,
    settings: RelaySettings,
    /// The last time a data message passed in either direction.
    last_data: Instant,
    /// The first event that started the connection's end.
    ending: Option<(Initiator, Cause)>,
    /// After a completed closing handshake the client's TCP is closed at once (RFC 6455
    /// §7.1.1) instead of drained until its FIN. Not for TLS: a TLS client may answer our
    /// close_notify with its own, and closing before it arrives would reset the connection.
    close_client_at_once: bool,
}

impl Connection {
    pub fn new(
        (client_decoder, backend_decoder): (FrameDecoder, FrameDecoder),
        settings: RelaySettings,
        counters: RelayCounters,
        // Not part of `settings`, which the connection keeps: the hops' transforms hold what
        // compression needs, and uncompressed connections pay nothing for it.
        compression: RelayCompression,
        client_is_plain_tcp: bool,
        now: Instant,
    ) -> Self {
        let RelayCounters {
            client_messages,
            client_bytes,
            backend_messages,
            backend_bytes,
            deflate,
        } = counters;
        let keepalive = Keepalive::new(settings.ping_interval, settings.pong_timeout, now);
        let mut client = Hop::new(
            Side::Client,
            client_decoder,
            keepalive,
            (client_messages, client_bytes),
        );
        let backend = Hop::new(
            Side::Backend,
            backend_decoder,
            keepalive,
            (backend_messages, backend_bytes),
        );
        client.message_rate = settings
            .message_rate
            .map(|rate| TokenBucket::new(rate, 2.0, now));
        let mut backend = backend;
        match compression {
            RelayCompression::Off => {}
            RelayCompression::Count {
                client: from_client,
                backend: from_backend,
            } => {
                client.transform = Some(Box::new(Transform::count(from_client)));
                backend.transform = Some(Box::new(Transform::count(from_backend)));
            }
            RelayCompression::Terminate(terminated) => {
                let mut inflate = Transform::inflate(terminated.client);
                let mut deflate_out =
                    Transform::deflate(terminated.server, terminated.level, terminated.min_size);
                if let Some(counters) = deflate {
                    inflate.counters = Some((
                        counters.from_client_compressed,
                        counters.from_client_uncompressed,
                    ));
                    deflate_out.counters = Some((
                        counters.to_client_compressed,
                        counters.to_client_uncompressed,
                    ));
                }
                client.transform = Some(Box::new(inflate));
                backend.transform = Some(Box::new(deflate_out));
            }
        }
        Self {
            client,
            backend,
            settings,
            last_data: now,
            ending: None,
            close_client_at_once: client_is_plain_tcp,
        }
    }

    fn hop(&self, side: Side) -> &Hop {
        match side {
            Side::Client => &self.client,
            Side::Backend => &self.backend,
        }
    }

    /// Keeps the connection's share of the gateway's compression memory (released when the
    /// connection is dropped); kept in the compression state, which only compressed
    /// connections have.
    pub fn hold_deflate_memory(&mut self, reservation: DeflateReservation) {
        if let Some(t) = &mut self.client.transform {
            t.reservation = Some(reservation);
        }
    }

    // ---------------------------------------------------------------------------------------
    // Outputs.

    /// Where the next bytes from `side` go, or `None` when nothing is to be read from it now
    /// (it is done, or what was read from it is still waiting to be written).
    pub fn read_space(&mut self, side: Side) -> Option<&mut [u8]> {
        let (src, dst) = pair(&mut self.client, &mut self.backend, side);
        if src.reading == Reading::Done || src.has_pending() {
            return None;
        }
        // Control frames owed to the other hop go out before more is read from this one,
        // unless this hop is half-way through a frame to it (they wait for its end).
        if !src.mid_frame() && dst.can_write() && !dst.outbox.is_empty() {
            return None;
        }
        let space = src.buf.read_space();
        (!space.is_empty()).then_some(space)
    }

    /// The bytes to write to `side` next: forwarded frames first, then, at a frame boundary,
    /// the gateway's control frames.
    pub fn transmit(&mut self, side: Side) -> Option<&[u8]> {
        let (dst, src) = pair(&mut self.client, &mut self.backend, side);
        if !dst.can_write() {
            return None;
        }
        if src.has_pending() {
            return Some(src.pending());
        }
        if src.mid_frame() {
            return None;
        }
        dst.outbox.next_bytes()
    }

    /// Whether `side`'s TCP is to be shut down (FIN) now.
    pub fn wants_shutdown(&self, side: Side) -> bool {
        self.hop(side).writing == Writing::ShutdownDue
    }

    /// The earliest instant at which [`Connection::on_timeout`] has something to do. Deadlines
    /// that move later on every read (keepalive, idle) are checked lazily: the timer fires at
    /// the old instant and is set again, instead of being reset on every read.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut deadline: Option<Instant> = None;
        let mut consider = |d: Instant| deadline = Some(deadline.map_or(d, |e| e.min(d)));
        for hop in [&self.client, &self.backend] {
            if let CloseState::Sent { deadline, .. } = hop.close {
                consider(deadline);
            }
            if let Some(d) = hop.drain_deadline {
                consider(d);
            }
            if let Some(d) = hop.finish_deadline
                && !hop.finished()
            {
                consider(d);
            }
            if keepalive_applies(hop)
                && let Some(d) = hop.keepalive.poll_timeout()
            {
                consider(d);
            }
        }
        if let Some(idle) = self.settings.idle_timeout
            && self.ending.is_none()
        {
            consider(self.last_data + idle);
        }
        if let Some(at) = self.expires_at() {
            consider(at);
        }
        deadline
    }

    /// When the client's credentials expire, while nothing else is ending the connection.
    fn expires_at(&self) -> Option<Instant> {
        let credentials = self.client.credentials.as_deref()?;
        self.ending.is_none().then_some(credentials.expires_at)?
    }

    /// Memory the connection holds for bytes in flight: hop buffers and queued control
    /// frames. Bounded by [`Connection::MAX_BUFFERED_BYTES`] whatever the peers do.
    pub fn buffered_bytes(&self) -> usize {
        [&self.client, &self.backend]
            .into_iter()
            .map(|hop| {
                let buffer = if hop.buf.holds_buffer() {
                    BUFFER_LEN
                } else {
                    0
                };
                let out = match &hop.transform {
                    Some(t) if t.out.holds_buffer() => BUFFER_LEN,
                    _ => 0,
                };
                buffer + out + hop.outbox.held_bytes()
            })
            .sum()
    }

    /// Per hop: its read buffer, a rewriting transform's output buffer, its outbox.
    pub const MAX_BUFFERED_BYTES: usize = 2 * (2 * BUFFER_LEN + Outbox::MAX_HELD_BYTES);

    /// Something has started the connection's end; from here on it always has a deadline.
    pub fn is_ending(&self) -> bool {
        self.ending.is_some()
    }

    /// Both hops are done: nothing more will be read or written.
    pub fn is_finished(&self) -> bool {
        self.client.finished() && self.backend.finished()
    }

    pub fn report(&self) -> RelayReport {
        let hop = |h: &Hop| HopReport {
            bytes_in: h.bytes_in,
            messages_in: h.messages_in,
            close_received: h.close_received().map(|c| c.0),
            close_sent: h.close_sent().map(|c| c.0),
        };
        // Every path to a finished connection names its cause; a connection reported before
        // that is one the gateway is tearing down.
        let (initiator, cause) = self.ending.unwrap_or((Initiator::Gateway, Cause::Shutdown));
        RelayReport {
            client: hop(&self.client),
            backend: hop(&self.backend),
            initiator,
            cause,
        }
    }

    // ---------------------------------------------------------------------------------------
    // Inputs.

    /// Bytes `side` sent right after its handshake head (read together with it). They must fit
    /// one hop buffer, which a handshake head's limit guarantees; any excess is refused as if
    /// the hop had sent an oversized frame.
    pub fn receive_early(&mut self, side: Side, early: &[u8], now: Instant) {
        if early.is_empty() {
            return;
        }
        let Some(space) = self.read_space(side) else {
            return;
        };
        let n = early.len().min(space.len());
        space[..n].copy_from_slice(&early[..n]);
        self.on_read(side, n, now);
        if n < early.len() {
            let (src, dst) = pair(&mut self.client, &mut self.backend, side);
            on_violation(
                src,
                dst,
                (CloseCode::TOO_BIG, "handshake followed by too many bytes"),
                now,
                &self.settings,
                &mut self.ending,
            );
            self.after_event(now);
        }
    }

    /// The read into [`Connection::read_space`] found nothing to read yet. The buffer it
    /// offered goes back to the pool unless it holds bytes: an idle connection waits for data
    /// owning no buffer.
    pub fn on_read_blocked(&mut self, side: Side) {
        let (src, _) = pair(&mut self.client, &mut self.backend, side);
        src.buf.release_if_empty();
    }

    /// Whether a hop holds a buffer with no bytes in it: true only between
    /// [`Connection::read_space`] and the read's outcome.
    #[cfg(any(test, fuzzing))]
    pub fn holds_empty_buffer(&self) -> bool {
        [&self.client, &self.backend]
            .into_iter()
            .any(|hop| hop.buf.holds_buffer() && hop.buf.start == hop.buf.filled)
    }

    /// `n` bytes were read from `side` into [`Connection::read_space`]; 0 is end of stream.
    pub fn on_read(&mut self, side: Side, n: usize, now: Instant) {
        let settings = self.settings;
        let (src, dst) = pair(&mut self.client, &mut self.backend, side);
        if n == 0 {
            on_eof(src, dst, now, &settings, &mut self.ending);
        } else {
            src.buf.filled += n;
            src.keepalive.on_heard(now);
            match src.reading {
                Reading::Frames => {
                    decode(
                        src,
                        dst,
                        &settings,
                        now,
                        &mut self.last_data,
                        &mut self.ending,
                    );
                }
                Reading::Discard | Reading::Done => src.discard_unparsed(),
            }
        }
        self.after_event(now);
    }

    /// Reading from `side` failed.
    pub fn on_read_error(&mut self, side: Side, now: Instant) {
        let settings = self.settings;
        let (src, dst) = pair(&mut self.client, &mut self.backend, side);
        lose(src, dst, now, &settings, &mut self.ending);
        self.after_event(now);
    }

    /// `n` bytes of [`Connection::transmit`] were written to `side`.
    pub fn on_written(&mut self, side: Side, n: usize, now: Instant) {
        let settings = self.settings;
        let (dst, src) = pair(&mut self.client, &mut self.backend, side);
        if src.has_pending() {
            src.advance_written(n);
            // A rewriting hop whose output was full resumes once it is written.
            if !src.has_pending()
                && src.reading == Reading::Frames
                && src.rewriting().is_some()
                && (src.buf.has_unparsed() || src.rewriting().is_some_and(|t| t.busy()))
            {
                decode(
                    src,
                    dst,
                    &settings,
                    now,
                    &mut self.last_data,
                    &mut self.ending,
                );
            }
        } else {
            dst.outbox.advance(n);
        }
        self.after_event(now);
    }

    /// Writing to `side` failed (or wrote nothing).
    pub fn on_write_error(&mut self, side: Side, now: Instant) {
        let settings = self.settings;
        let (dst, src) = pair(&mut self.client, &mut self.backend, side);
        lose(dst, src, now, &settings, &mut self.ending);
        self.after_event(now);
    }

    /// `side`'s TCP was shut down (or shutting it down failed: either way nothing more is
    /// written to it).
    pub fn on_shutdown(&mut self, side: Side, now: Instant) {
        let close_timeout = self.settings.close_timeout;
        let at_once = self.close_client_at_once;
        let (hop, _) = pair(&mut self.client, &mut self.backend, side);
        if hop.writing == Writing::ShutdownDue {
            finish_writing(hop, at_once, close_timeout, now);
        }
        self.after_event(now);
    }

    /// The client's credentials: the connection is closed when they expire, and, with
    /// `refresh`, a token it presents in-band is handed out by
    /// [`Connection::take_presented_token`].
    pub fn set_credentials(&mut self, credentials: Credentials) {
        self.client.credentials = Some(Box::new(credentials));
    }

    /// A token the client presented in-band, to be checked and answered with
    /// [`Connection::on_refresh`].
    pub fn take_presented_token(&mut self) -> Option<Box<str>> {
        self.client.credentials.as_mut()?.presented.take()
    }

    /// The verdict on a presented token: a later expiry, or a 1008 close.
    pub fn on_refresh(&mut self, verdict: Refresh, now: Instant) {
        match verdict {
            Refresh::Extended(at) => {
                if let Some(credentials) = self.client.credentials.as_deref_mut() {
                    credentials.expires_at = at;
                }
            }
            Refresh::Refused => {
                let violation = (CloseCode::POLICY_VIOLATION, "token refresh refused");
                on_violation(
                    &mut self.client,
                    &mut self.backend,
                    violation,
                    now,
                    &self.settings,
                    &mut self.ending,
                );
            }
        }
        self.after_event(now);
    }

    /// The gateway ends the connection (see [`Stop`]); the closing handshakes follow.
    pub fn stop(&mut self, stop: Stop, now: Instant) {
        match stop {
            Stop::Shutdown => self.gateway_close(Cause::Shutdown, "gateway shutting down", now),
            Stop::Moved => self.gateway_close_with(
                Cause::Moved,
                (CloseCode::SERVICE_RESTART, "backend changed, reconnect"),
                (CloseCode::GOING_AWAY, "client moved to another backend"),
                now,
            ),
            Stop::Expired { code } => self.gateway_close_with(
                Cause::Expired,
                (code, "token expired"),
                (CloseCode::GOING_AWAY, "client token expired"),
                now,
            ),
        }
        self.after_event(now);
    }

    /// Acts on every deadline that has passed by `now`.
    pub fn on_timeout(&mut self, now: Instant) {
        let settings = self.settings;
        let close_deadline = now + settings.close_timeout;
        if let Some(idle) = settings.idle_timeout
            && self.ending.is_none()
            && now >= self.last_data + idle
        {
            self.gateway_close(Cause::IdleTimeout, "idle timeout", now);
        }
        if self.expires_at().is_some_and(|at| now >= at)
            && let Some(credentials) = self.client.credentials.as_deref()
        {
            let code = credentials.expired_code;
            self.stop(Stop::Expired { code }, now);
        }
        for side in [Side::Client, Side::Backend] {
            let (hop, other) = pair(&mut self.client, &mut self.backend, side);
            let due = if keepalive_applies(hop) {
                hop.keepalive.on_timeout(now)
            } else {
                None
            };
            match due {
                Some(KeepaliveDue::Ping) => {
                    let ping = ControlFrame::new(OpCode::Ping, PING_PAYLOAD, hop.outgoing_mask());
                    hop.send_control(ping);
                }
                Some(KeepaliveDue::Unresponsive) => {
                    let cause = Cause::PingTimeout(side);
                    note_ending(&mut self.ending, Initiator::Gateway, cause);
                    hop.send_close(CloseCode::GOING_AWAY, "ping timeout", close_deadline);
                    hop.give_up();
                    let reason = match side {
                        Side::Client => "client did not answer ping in time",
                        Side::Backend => "backend did not answer ping in time",
                    };
                    close_other(
                        other,
                        hop.mid_frame(),
                        CloseCode::GOING_AWAY,
                        reason,
                        close_deadline,
                    );
                }
                None => {}
            }
            if let CloseState::Sent { deadline, .. } = hop.close
                && now >= deadline
            {
                // The hop did not answer our close: give up on it, and answer the other
                // hop's close ourselves if it is waiting for the reply we were relaying.
                hop.give_up();
                hop.outbox.clear();
                other.discard_all();
                answer_waiting_close(other, close_deadline);
            }
            if hop.drain_deadline.is_some_and(|d| now >= d) {
                hop.drain_deadline = None;
                hop.reading = Reading::Done;
                hop.discard_unparsed();
                if hop.writing == Writing::Open {
                    hop.writing = Writing::Finished;
                }
            }
            if hop.finish_deadline.is_some_and(|d| now >= d) && !hop.finished() {
                // The hop neither completed its closing handshake nor let us write what it is
                // owed: it is dropped as it stands.
                if matches!(hop.close, CloseState::Sent { .. }) {
                    hop.give_up();
                    answer_waiting_close(other, close_deadline);
                }
                hop.reading = Reading::Done;
                hop.writing = Writing::Finished;
                hop.outbox.clear();
                other.discard_all();
            }
        }
        self.after_event(now);
    }

    // ---------------------------------------------------------------------------------------
    // Internal transitions.

    /// What follows from any input, applied once: data for a hop that can no longer be
    /// written is dropped, an owed close is delivered, hops whose handshake is settled have
    /// their TCP ended. Each step changes the state it tests, so none repeats.
    fn after_event(&mut self, now: Instant) {
        // Two close timeouts: one for the closing handshake, one to flush and drain.
        let finish_by = now + 2 * self.settings.close_timeout;
        for hop in [&mut self.client, &mut self.backend] {
            if hop.close != CloseState::Open && hop.finish_deadline.is_none() {
                hop.finish_deadline = Some(finish_by);
            }
        }
        for side in [Side::Client, Side::Backend] {
            let (src, dst) = pair(&mut self.client, &mut self.backend, side);
            if !dst.can_write() && src.has_pending() {
                src.discard_all();
            }
            if src.reading == Reading::Done {
                src.discard_unparsed();
            }
        }
        self.close_behind_settled_hop(now);
        self.deliver_owed_close(now);
        let (close_timeout, at_once) = (self.settings.close_timeout, self.close_client_at_once);
        settle(
            &mut self.client,
            self.backend.has_pending(),
            at_once,
            close_timeout,
            now,
        );
        settle(
            &mut self.backend,
            self.client.has_pending(),
            at_once,
            close_timeout,
            now,
        );
    }

    /// A hop whose closing handshake is settled relays nothing more: a close the other hop was
    /// to get from it (held back while it was half-way through a frame) never comes, and a
    /// frame it was forwarding never ends. The gateway ends the other hop itself, cutting it
    /// if that frame stays unfinished.
    fn close_behind_settled_hop(&mut self, now: Instant) {
        let deadline = now + self.settings.close_timeout;
        for side in [Side::Client, Side::Backend] {
            let (src, dst) = pair(&mut self.client, &mut self.backend, side);
            let settled = matches!(src.close, CloseState::Settled { .. });
            if settled && (dst.close == CloseState::Open || src.mid_frame()) {
                close_other(dst, src.mid_frame(), CloseCode::GOING_AWAY, "", deadline);
            }
        }
    }

    /// Sends a client its held-back error close once the backend is done sending.
    fn deliver_owed_close(&mut self, now: Instant) {
        let backend = &self.backend;
        let backend_done =
            backend.close_received().is_some() || backend.given_up() || backend.finished();
        if !matches!(self.client.close, CloseState::Owed(..))
            || !backend_done
            || backend.has_pending()
            || backend.mid_frame()
        {
            return;
        }
        self.client
            .send_close(CloseCode::NORMAL, "", now + self.settings.close_timeout);
    }

    /// The gateway ends the connection on both hops with 1001 (idle timeout, shutdown).
    fn gateway_close(&mut self, cause: Cause, reason: &str, now: Instant) {
        let going_away = (CloseCode::GOING_AWAY, reason);
        self.gateway_close_with(cause, going_away, going_away, now);
    }

    /// The gateway ends the connection: `client` and `backend` are the code and reason each
    /// hop is sent.
    fn gateway_close_with(
        &mut self,
        cause: Cause,
        client: (CloseCode, &str),
        backend: (CloseCode, &str),
        now: Instant,
    ) {
        note_ending(&mut self.ending, Initiator::Gateway, cause);
        let deadline = now + self.settings.close_timeout;
        // A hop half-way through receiving a frame cannot take a close frame; it is sent the
        // other hop's close reply when that is relayed.
        if !self.backend.mid_frame() {
            self.client.send_close(client.0, client.1, deadline);
        }
        if !self.client.mid_frame() {
            self.backend.send_close(backend.0, backend.1, deadline);
        }
    }
}

/// `side`'s hop and the other one.
fn pair<'a>(client: &'a mut Hop, backend: &'a mut Hop, side: Side) -> (&'a mut Hop, &'a mut Hop) {
    match side {
        Side::Client => (client, backend),
        Side::Backend => (backend, client),
    }
}

/// Keepalive runs while the hop is open both ways: an outstanding ping's deadline still
/// counts once the hop is closing, since that ends it sooner.
fn keepalive_applies(hop: &Hop) -> bool {
    hop.keepalive.awaiting_pong()
        || (hop.reading == Reading::Frames && hop.close == CloseState::Open && hop.can_write())
}

fn note_ending(ending: &mut Option<(Initiator, Cause)>, initiator: Initiator, cause: Cause) {
    if ending.is_none() {
        *ending = Some((initiator, cause));
    }
}

/// A hop whose close arrived and waits for the reply the gateway was relaying from the other
/// hop is answered by the gateway: that reply will not come.
fn answer_waiting_close(hop: &mut Hop, deadline: Instant) {
    if let CloseState::Received(code) = hop.close {
        hop.send_close(code.reply(), "", deadline);
    }
}

/// Tells `other` that the connection is ending because of its peer hop. A close frame cannot
/// interrupt a frame in progress, so a hop receiving one half-way gets its TCP cut instead.
fn close_other(
    other: &mut Hop,
    peer_mid_frame: bool,
    code: CloseCode,
    reason: &str,
    deadline: Instant,
) {
    if !other.can_write() {
        return;
    }
    if peer_mid_frame {
        // Whatever was queued for it, a close included, would land inside that frame.
        other.cut();
    } else if other.may_send_close() {
        other.send_close(code, reason, deadline);
    }
}

/// Decides how a hop whose closing handshake is settled and whose output is flushed ends its
/// TCP.
fn settle(
    hop: &mut Hop,
    other_pending: bool,
    at_once: bool,
    close_timeout: Duration,
    now: Instant,
) {
    if hop.writing != Writing::Open || !hop.handshake_settled() {
        return;
    }
    if !hop.outbox.is_empty() || other_pending {
        return;
    }
    // The server closes TCP first (RFC 6455 §7.1.1); as the backend's client the gateway lets
    // it close first, unless it gave up on it.
    if hop.side == Side::Client || hop.given_up() {
        hop.writing = Writing::ShutdownDue;
    } else {
        finish_writing(hop, at_once, close_timeout, now);
    }
}

/// Our side of a hop's TCP is done; what is still read from it is drained until its FIN or
/// the drain deadline.
fn finish_writing(hop: &mut Hop, close_at_once: bool, close_timeout: Duration, now: Instant) {
    hop.writing = Writing::Finished;
    if hop.reading == Reading::Done {
        return;
    }
    if hop.side == Side::Client && !hop.given_up() && close_at_once {
        // The closing handshake is complete: a client sends nothing after its close frame,
        // and the server closes TCP at once (RFC 6455 §7.1.1) rather than waiting for the
        // client's FIN, which cost a read and a wake-up per connection.
        hop.reading = Reading::Done;
        hop.discard_unparsed();
    } else {
        // After a protocol error or an unanswered close the client may still be sending,
        // and a TLS client may answer our close_notify with its own: read and drop until it
        // closes, so that closing does not reset the connection under it.
        hop.reading = Reading::Discard;
        hop.drain_deadline = Some(now + close_timeout);
    }
}

/// Decodes everything buffered from `src`, transforming forwarded frames in place.
fn decode(
    src: &mut Hop,
    dst: &mut Hop,
    settings: &RelaySettings,
    now: Instant,
    last_data: &mut Instant,
    ending: &mut Option<(Initiator, Cause)>,
) {
    if src.rewriting().is_some() {
        decode_rewriting(src, dst, settings, now, last_data, ending);
        return;
    }
    let remask_towards_backend = src.side == Side::Client;
    let (mut bytes_seen, mut messages_seen) = (0u64, 0u64);
    while src.reading == Reading::Frames {
        let (parsed, filled) = (src.buf.parsed, src.buf.filled);
        if parsed == filled && src.decoder.is_between_frames() {
            break;
        }
        let bytes = src.buf.bytes_mut();
        match src.decoder.decode_whole_message(&mut bytes[parsed..filled]) {
            Ok(Some(message)) => {
                if !within_message_rate(&mut src.message_rate, now) {
                    refuse_over_rate(src, dst, now, settings, ending);
                    break;
                }
                if let Some(credentials) = src.credentials.as_deref_mut()
                    && credentials.refresh
                    && message.header.opcode == OpCode::Text
                    && let Some(token) = refresh_token(
                        &bytes[parsed + message.header_len..parsed + message.frame_len()],
                    )
                {
                    // Each check costs a signature verification: a client presenting tokens
                    // faster than it could need to is cut off rather than served.
                    if credentials
                        .last_presented
                        .is_some_and(|at| now < at + MIN_REFRESH_INTERVAL)
                    {
                        let violation = (CloseCode::POLICY_VIOLATION, "token refresh too frequent");
                        on_violation(src, dst, violation, now, settings, ending);
                        break;
                    }
                    credentials.last_presented = Some(now);
                    credentials.presented = Some(token.into());
                    src.buf.remove_at_parsed(message.frame_len());
                    continue;
                }
                if message.header.rsv & RSV1 != 0
                    && let Some(t) = &mut src.transform
                {
                    let payload = parsed + message.header_len..parsed + message.frame_len();
                    let limits = limits_of(&src.decoder);
                    t.start_count(&message.header);
                    if let Err(refusal) = t.count_piece(&bytes[payload], message.mask, true, limits)
                    {
                        on_violation(src, dst, refusal.violation(), now, settings, ending);
                        break;
                    }
                }
                bytes_seen += message.payload_len as u64;
                messages_seen += 1;
                *last_data = now;
                if !dst.may_send_close() || !dst.can_write() {
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
                on_protocol_error(src, dst, error, now, settings, ending);
                break;
            }
        }
        // A frame that may be a refresh message is never forwarded in pieces: it waits until
        // it is whole, when the path above takes it.
        if src.credentials.as_deref().is_some_and(|c| c.refresh)
            && src.decoder.is_between_frames()
            && refresh_candidate_len(&bytes[parsed..filled])
                .is_some_and(|len| len > filled - parsed)
        {
            break;
        }
        let Decoded { item, consumed } = match src.decoder.decode(&mut bytes[parsed..filled]) {
            Ok(Some(decoded)) => decoded,
            Ok(None) => break,
            Err(error) => {
                on_protocol_error(src, dst, error, now, settings, ending);
                break;
            }
        };
        match item {
            Item::DataFrame(header) => {
                if header.opcode != OpCode::Continuation
                    && !within_message_rate(&mut src.message_rate, now)
                {
                    refuse_over_rate(src, dst, now, settings, ending);
                    break;
                }
                if let Some(t) = &mut src.transform {
                    t.start_count(&header);
                }
                if !dst.may_send_close() || !dst.can_write() {
                    src.in_frame = InFrame::Dropping;
                    src.buf.remove_at_parsed(consumed);
                    continue;
                }
                let mut mask = Default::default();
                if remask_towards_backend {
                    mask = mask_keys::next_mask_key();
                    bytes[parsed + consumed - 4..parsed + consumed].copy_from_slice(&mask.0);
                }
                src.in_frame = InFrame::Forwarding { mask, offset: 0 };
                src.buf.parsed += consumed;
            }
            Item::Payload(piece) => {
                if let Some(t) = &mut src.transform
                    && t.counting()
                {
                    let limits = limits_of(&src.decoder);
                    let data = &bytes[parsed..parsed + piece.len];
                    if let Err(refusal) = t.count_piece(data, piece.mask, piece.message_end, limits)
                    {
                        on_violation(src, dst, refusal.violation(), now, settings, ending);
                        break;
                    }
                }
                bytes_seen += piece.len as u64;
                *last_data = now;
                messages_seen += u64::from(piece.message_end);
                match &mut src.in_frame {
                    InFrame::Forwarding { mask, offset } => {
                        if remask_towards_backend {
                            let data = &mut bytes[parsed..parsed + piece.len];
                            let key = mask.rotated(*offset);
                            match piece.mask {
                                Some(received) => remask(data, received, key),
                                None => apply_mask(data, key),
                            }
                            *offset += piece.len as u64;
                        }
                        src.buf.parsed += piece.len;
                    }
                    InFrame::Dropping | InFrame::Boundary => {
                        src.buf.remove_at_parsed(piece.len);
                    }
                }
                if piece.frame_end {
                    src.in_frame = InFrame::Boundary;
                }
            }
            Item::Control { header, payload } => {
                let frame = parsed..parsed + consumed;
                let payload = parsed + payload.start..parsed + payload.end;
                on_control(src, dst, header, frame, payload, settings, now, ending);
            }
        }
    }
    src.count_received(bytes_seen, messages_seen);
    src.buf.release_if_empty();
}

/// A hop's decompressed-size limits: `max_frame` and `max_message` of its decoder.
fn limits_of(decoder: &FrameDecoder) -> (u64, u64) {
    let config = decoder.config();
    (config.max_frame, config.max_message)
}

/// [`decode`] for a hop whose transform rewrites its data frames (`terminate`): data frames go
/// through the codec into the transform's buffer instead of being forwarded in place, and the
/// control frames relayed to the other hop are copied there after them. Stops when that
/// buffer is full; [`Connection::on_written`] resumes it.
fn decode_rewriting(
    src: &mut Hop,
    dst: &mut Hop,
    settings: &RelaySettings,
    now: Instant,
    last_data: &mut Instant,
    ending: &mut Option<(Initiator, Cause)>,
) {
    let limits = limits_of(&src.decoder);
    let (mut bytes_seen, mut messages_seen) = (0u64, 0u64);
    while src.reading == Reading::Frames {
        let Some(t) = src.transform.as_deref_mut() else {
            break;
        };
        let (parsed, filled) = (src.buf.parsed, src.buf.filled);
        t.stalled = t.stalled.min(filled - parsed);
        let stalled = t.stalled;
        let bytes = src.buf.bytes_mut();
        match t.resume(&bytes[parsed..parsed + stalled], limits) {
            Ok((taken, progress)) => {
                src.buf.remove_at_parsed(taken);
                if progress == Progress::Stalled {
                    break;
                }
            }
            Err(refusal) => {
                on_violation(src, dst, refusal.violation(), now, settings, ending);
                break;
            }
        }
        if !t.has_room() {
            break;
        }
        let (parsed, filled) = (src.buf.parsed, src.buf.filled);
        // An empty frame's payload item comes with no bytes left.
        if parsed == filled && src.decoder.is_between_frames() {
            break;
        }
        let bytes = src.buf.bytes_mut();
        let Decoded { item, consumed } = match src.decoder.decode(&mut bytes[parsed..filled]) {
            Ok(Some(decoded)) => decoded,
            Ok(None) => break,
            Err(error) => {
                on_protocol_error(src, dst, error, now, settings, ending);
                break;
            }
        };
        match item {
            Item::DataFrame(header) => {
                if header.opcode != OpCode::Continuation
                    && !within_message_rate(&mut src.message_rate, now)
                {
                    refuse_over_rate(src, dst, now, settings, ending);
                    break;
                }
                src.buf.remove_at_parsed(consumed);
                if !dst.may_send_close() || !dst.can_write() {
                    src.in_frame = InFrame::Dropping;
                    t.drop_message();
                    continue;
                }
                src.in_frame = InFrame::Boundary;
                t.start_frame(&header);
            }
            Item::Payload(piece) => {
                bytes_seen += piece.len as u64;
                *last_data = now;
                messages_seen += u64::from(piece.message_end);
                if src.in_frame == InFrame::Dropping {
                    src.buf.remove_at_parsed(piece.len);
                    if piece.frame_end {
                        src.in_frame = InFrame::Boundary;
                    }
                    continue;
                }
                if let Some(key) = piece.mask {
                    apply_mask(&mut bytes[parsed..parsed + piece.len], key);
                }
                t.accept_piece(piece.len, piece.message_end);
            }
            Item::Control { header, payload } => {
                let frame = parsed..parsed + consumed;
                let payload = parsed + payload.start..parsed + payload.end;
                on_control(src, dst, header, frame, payload, settings, now, ending);
            }
        }
    }
    src.count_received(bytes_seen, messages_seen);
    src.buf.release_if_empty();
}

/// Counts a new message against a hop's message rate (if its route limits it).
fn within_message_rate(rate: &mut Option<TokenBucket>, now: Instant) -> bool {
    rate.as_mut().is_none_or(|bucket| bucket.try_take(now))
}

/// `src` sent a message over its route's rate: 1008, refused at the message's first header, so
/// no byte of it is forwarded.
fn refuse_over_rate(
    src: &mut Hop,
    dst: &mut Hop,
    now: Instant,
    settings: &RelaySettings,
    ending: &mut Option<(Initiator, Cause)>,
) {
    let violation = (CloseCode::POLICY_VIOLATION, "message rate limit exceeded");
    on_violation(src, dst, violation, now, settings, ending);
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename the list
fn on_control(
    src: &mut Hop,
    dst: &mut Hop,
    header: FrameHeader,
    frame: Range<usize>,
    payload: Range<usize>,
    settings: &RelaySettings,
    now: Instant,
    ending: &mut Option<(Initiator, Cause)>,
) {
    let forward = match header.opcode {
        OpCode::Ping | OpCode::Pong if settings.ping_passthrough => {
            dst.may_send_close() && dst.can_write()
        }
        OpCode::Ping => {
            let mask = src.outgoing_mask();
            let pong = ControlFrame::new(OpCode::Pong, &src.buf.bytes_mut()[payload.clone()], mask);
            if src.may_send_close() {
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
            src.note_close_received(code);
            src.reading = Reading::Discard;
            note_ending(
                ending,
                Initiator::of(src.side),
                Cause::CloseHandshake(src.side),
            );
            if matches!(dst.close, CloseState::Open | CloseState::Received(_)) && dst.can_write() {
                dst.note_close_sent(code, now + settings.close_timeout);
                true
            } else {
                // Nobody to relay the close to (or the other hop's own close crossed it):
                // the gateway answers it.
                if src.may_send_close() && src.can_write() {
                    let deadline = now + settings.close_timeout;
                    if code == CloseCode::NO_STATUS {
                        src.send_control(ControlFrame::new(
                            OpCode::Close,
                            &[],
                            src.outgoing_mask(),
                        ));
                        src.note_close_sent(CloseCode::NO_STATUS, deadline);
                    } else {
                        src.send_close(code, "", deadline);
                    }
                }
                false
            }
        }
    };
    if header.opcode == OpCode::Pong {
        src.keepalive.on_pong(now);
    }
    if forward {
        if src.side == Side::Client {
            let key = mask_keys::next_mask_key();
            let bytes = src.buf.bytes_mut();
            bytes[payload.start - 4..payload.start].copy_from_slice(&key.0);
            apply_mask(&mut bytes[payload], key);
        }
        if let Some(t) = src.transform.as_deref_mut().filter(|t| t.rewrites()) {
            // Behind the rewritten frames before it, in the same buffer.
            t.push_frame(&src.buf.bytes_mut()[frame.clone()]);
            src.buf.remove_at_parsed(frame.len());
        } else {
            src.buf.parsed += frame.len();
        }
    } else {
        src.buf.remove_at_parsed(frame.len());
    }
    if src.reading == Reading::Discard {
        // Nothing may follow a close frame (RFC 6455 §5.5.1); whatever did is dropped.
        src.discard_unparsed();
    }
}

fn on_protocol_error(
    src: &mut Hop,
    dst: &mut Hop,
    error: ProtocolError,
    now: Instant,
    settings: &RelaySettings,
    ending: &mut Option<(Initiator, Cause)>,
) {
    let violation = (error.close_code(), error.reason());
    on_violation(src, dst, violation, now, settings, ending);
}

/// `src` broke the protocol or a policy: it gets `code` and `reason`; the other hop gets 1001
/// naming the side and the cause.
fn on_violation(
    src: &mut Hop,
    dst: &mut Hop,
    (code, reason): (CloseCode, &'static str),
    now: Instant,
    settings: &RelaySettings,
    ending: &mut Option<(Initiator, Cause)>,
) {
    let deadline = now + settings.close_timeout;
    let cause = Cause::Violation {
        side: src.side,
        code,
        reason,
    };
    note_ending(ending, Initiator::Gateway, cause);
    src.reading = Reading::Discard;
    src.discard_unparsed();
    let backend_can_finish = src.side == Side::Client
        && !src.mid_frame()
        && dst.may_send_close()
        && dst.can_write()
        && src.may_send_close();
    if backend_can_finish {
        // The client learns of its error after the backend has closed, so everything the
        // backend sent in answer to the client's valid messages still reaches it first.
        src.close = CloseState::Owed(code, reason);
    } else {
        src.send_close(code, reason, deadline);
        src.give_up();
    }
    let other_reason = cause.to_string();
    close_other(
        dst,
        src.mid_frame(),
        CloseCode::GOING_AWAY,
        &other_reason,
        deadline,
    );
    src.in_frame = InFrame::Boundary;
}

/// `src` closed TCP.
fn on_eof(
    src: &mut Hop,
    dst: &mut Hop,
    now: Instant,
    settings: &RelaySettings,
    ending: &mut Option<(Initiator, Cause)>,
) {
    src.reading = Reading::Done;
    src.discard_unparsed();
    match src.close {
        CloseState::Open => abandoned(
            src,
            dst,
            Cause::Disconnected(src.side),
            now,
            settings,
            ending,
        ),
        CloseState::Sent { .. } => {
            // Our close's reply will not come: stop waiting, and answer the other hop's close
            // if it waits for the reply we were relaying.
            src.give_up();
            answer_waiting_close(dst, now + settings.close_timeout);
        }
        CloseState::Owed(..) | CloseState::Received(_) | CloseState::Settled { .. } => {}
    }
}

/// `hop` failed (I/O error): nothing more is exchanged with it.
fn lose(
    hop: &mut Hop,
    other: &mut Hop,
    now: Instant,
    settings: &RelaySettings,
    ending: &mut Option<(Initiator, Cause)>,
) {
    let was_open = hop.close == CloseState::Open;
    let waiting = matches!(hop.close, CloseState::Sent { .. });
    hop.lose();
    if was_open {
        abandoned(hop, other, Cause::IoError(hop.side), now, settings, ending);
        return;
    }
    hop.give_up();
    if waiting {
        answer_waiting_close(other, now + settings.close_timeout);
    }
    if let Some(code) = hop.close_received()
        && other.close == CloseState::Open
    {
        // The hop's close was received but not yet passed on.
        other.send_close(code.reply(), "", now + settings.close_timeout);
    }
}

/// `hop` went away without a closing handshake. RFC 6455 §7.4.1: 1014 tells the client that
/// the gateway's upstream failed; a backend is told the client went away (1001).
fn abandoned(
    hop: &mut Hop,
    other: &mut Hop,
    cause: Cause,
    now: Instant,
    settings: &RelaySettings,
    ending: &mut Option<(Initiator, Cause)>,
) {
    hop.writing = Writing::Dead;
    hop.outbox.clear();
    hop.close = CloseState::Settled {
        sent: None,
        received: None,
    };
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
    note_ending(ending, Initiator::of(hop.side), cause);
    close_other(
        other,
        hop.mid_frame(),
        code,
        reason,
        now + settings.close_timeout,
    );
    hop.in_frame = InFrame::Boundary;
}
