//! One side of a relayed connection: its socket, the decoder for what it sends, the buffer
//! those bytes wait in, the control frames queued for it, and its close-handshake state.

use super::buffer::HopBuffer;
use super::mask_keys::next_mask_key;
use super::outbox::Outbox;
use crate::limits::TokenBucket;
use crate::proto::{CloseCode, ControlFrame, FrameDecoder, MaskKey, close_frame};
use crate::stream::Stream;
use prometheus_client::metrics::counter::Counter;
use std::fmt;
use tokio::time::Instant;

/// Which peer a hop talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Backend => "backend",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// Decoding frames.
    Frames,
    /// Reading and dropping bytes: after the hop's close frame, after a protocol error, or
    /// while waiting for the hop to close TCP.
    Discard,
    /// End of stream, a read error, or we stopped waiting.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writing {
    Open,
    /// Our side of TCP is shut down (or deliberately left for the peer to close first).
    Finished,
    /// The socket failed or the peer is gone: nothing more is written.
    Dead,
}

#[derive(Debug)]
pub struct Hop {
    pub side: Side,
    pub stream: Stream,
    /// Decodes the frames this hop sends.
    pub decoder: FrameDecoder,
    /// What this hop sent, processed in place, on its way to the other hop.
    pub buf: HopBuffer,
    /// Control frames the gateway sends to this hop.
    pub outbox: Outbox,
    pub reading: Reading,
    pub writing: Writing,

    /// The key this hop's current data frame is re-masked with (client frames only) and how far
    /// into that frame the next payload byte is.
    pub out_mask: MaskKey,
    pub out_offset: u64,
    /// A data frame from this hop is partly forwarded: nothing else may be written to the other
    /// hop until it ends.
    pub mid_frame: bool,
    /// The current data frame from this hop is being dropped (the other hop was sent a close).
    pub swallowing_frame: bool,
    /// Reading from / writing to this hop returned `Pending` during the current poll of the
    /// connection's task: the waker is registered, so asking again before the next wake-up
    /// would only repeat the readiness check (the relay loops until nothing moves).
    pub read_blocked: bool,
    pub write_blocked: bool,

    /// The hop's close frame arrived (its code; 1005 for an empty one).
    pub close_received: Option<CloseCode>,
    /// A close frame was queued to this hop (its code).
    pub close_sent: Option<CloseCode>,
    /// When we stop waiting for this hop's close reply.
    pub close_deadline: Option<Instant>,
    /// When we stop waiting for this hop to close TCP.
    pub drain_deadline: Option<Instant>,
    /// We will not wait for this hop's close reply (it misbehaved or timed out).
    pub given_up: bool,
    /// The close this hop gets once the other hop has finished: a client that broke the
    /// protocol still receives what the backend sent before it learned of the failure.
    pub deferred_close: Option<(CloseCode, &'static str)>,

    /// The last time any byte arrived from this hop.
    pub last_heard: Instant,
    /// A keepalive ping is outstanding and must be answered by then.
    pub pong_deadline: Option<Instant>,

    pub bytes_in: u64,
    pub messages_in: u64,
    /// The route's live counters for what this hop sends (shared, relaxed atomics).
    pub messages_counter: Counter,
    pub bytes_counter: Counter,
    /// Messages this hop may still send now (clients only, when the route limits them).
    pub message_rate: Option<TokenBucket>,
}

impl Hop {
    pub fn new(
        side: Side,
        stream: Stream,
        decoder: FrameDecoder,
        now: Instant,
        (messages_counter, bytes_counter): (Counter, Counter),
    ) -> Self {
        Self {
            side,
            stream,
            decoder,
            buf: HopBuffer::default(),
            outbox: Outbox::default(),
            reading: Reading::Frames,
            writing: Writing::Open,
            out_mask: MaskKey::default(),
            out_offset: 0,
            mid_frame: false,
            swallowing_frame: false,
            read_blocked: false,
            write_blocked: false,
            close_received: None,
            close_sent: None,
            close_deadline: None,
            drain_deadline: None,
            given_up: false,
            deferred_close: None,
            last_heard: now,
            pong_deadline: None,
            bytes_in: 0,
            messages_in: 0,
            messages_counter,
            bytes_counter,
            message_rate: None,
        }
    }

    /// Frames the gateway writes to a backend are masked, as RFC 6455 requires of a client.
    pub fn outgoing_mask(&self) -> Option<MaskKey> {
        match self.side {
            Side::Client => None,
            Side::Backend => Some(next_mask_key()),
        }
    }

    pub fn can_write(&self) -> bool {
        self.writing == Writing::Open
    }

    /// Queues a control frame for this hop (nothing after a close).
    pub fn send_control(&mut self, frame: ControlFrame) {
        if self.can_write() {
            self.outbox.push(frame);
        }
    }

    /// Starts the closing handshake with this hop, unless it has started already. A deferred
    /// close takes precedence over `code` and `reason`.
    pub fn send_close(&mut self, code: CloseCode, reason: &str, deadline: Instant) {
        if self.close_sent.is_some() || !self.can_write() {
            return;
        }
        let (code, reason) = self.deferred_close.take().unwrap_or((code, reason));
        let frame = close_frame(code, reason, self.outgoing_mask());
        self.outbox.push(frame);
        self.close_sent = Some(code);
        self.close_deadline = Some(deadline);
    }

    /// The connection to this hop is gone: nothing more is read or written.
    pub fn lose(&mut self) {
        self.reading = Reading::Done;
        self.writing = Writing::Dead;
        self.outbox.clear();
        self.buf.discard_all();
    }

    /// The closing handshake with this hop is over, or will not happen.
    pub fn handshake_settled(&self) -> bool {
        self.close_sent.is_some() && (self.close_received.is_some() || self.given_up)
    }

    pub fn finished(&self) -> bool {
        self.reading == Reading::Done && self.writing != Writing::Open
    }
}
