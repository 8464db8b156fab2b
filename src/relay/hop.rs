//! One side of a relayed connection, without its socket: the decoder for what it sends, the
//! buffer those bytes wait in, the control frames queued for it, where its frames stand, and
//! its closing handshake as one state.

use super::buffer::HopBuffer;
use super::compress::Transform;
use super::credentials::Credentials;
use super::mask_keys::next_mask_key;
use super::outbox::Outbox;
use crate::limits::TokenBucket;
use crate::proto::{CloseCode, ControlFrame, FrameDecoder, Keepalive, MaskKey, close_frame};
use prometheus_client::metrics::counter::Counter;
use std::fmt;
use std::time::Instant;

/// Which peer a hop talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    pub const fn name(self) -> &'static str {
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
    /// Everything owed is written: our side of TCP is to be shut down (FIN) next.
    ShutdownDue,
    /// Our side of TCP is shut down (or deliberately left for the peer to close first).
    Finished,
    /// The socket failed or the peer is gone: nothing more is written.
    Dead,
}

/// Where the data frames this hop sends stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InFrame {
    /// At a frame boundary: the other hop may be sent a control frame.
    Boundary,
    /// A data frame is partly forwarded (nothing else may be written to the other hop until it
    /// ends), re-masked with `mask` (client frames), `offset` payload bytes into it.
    Forwarding { mask: MaskKey, offset: u64 },
    /// The current data frame is dropped (the other hop was sent a close).
    Dropping,
}

/// The closing handshake with one hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseState {
    /// No close frame either way.
    Open,
    /// The hop broke the protocol: its close is held back until the other hop is done, so
    /// everything sent in answer to its valid messages reaches it first. Its reply is not
    /// awaited.
    Owed(CloseCode, &'static str),
    /// Our close is queued or sent; the hop's reply is awaited until `deadline`.
    Sent { code: CloseCode, deadline: Instant },
    /// The hop's close arrived; ours (relayed from the other hop or the gateway's) is not sent.
    Received(CloseCode),
    /// Nothing more is exchanged: `sent` is our close (`ABNORMAL` when the hop's TCP was cut
    /// instead, `None` when it could not be written), `received` the hop's (`None` when we
    /// gave up waiting for it).
    Settled {
        sent: Option<CloseCode>,
        received: Option<CloseCode>,
    },
}

#[derive(Debug)]
pub struct Hop {
    pub side: Side,
    /// Decodes the frames this hop sends.
    pub decoder: FrameDecoder,
    /// What this hop sent, processed in place, on its way to the other hop.
    pub buf: HopBuffer,
    /// Control frames the gateway sends to this hop.
    pub outbox: Outbox,
    pub reading: Reading,
    pub writing: Writing,
    pub in_frame: InFrame,
    pub close: CloseState,
    /// When we stop waiting for this hop to close TCP.
    pub drain_deadline: Option<Instant>,
    /// Set when the hop's closing starts: by then it is finished whatever it does (a peer that
    /// stops reading cannot hold the connection by leaving our close or its reply unwritten).
    pub finish_deadline: Option<Instant>,

    pub keepalive: Keepalive,

    pub bytes_in: u64,
    pub messages_in: u64,
    /// The route's live counters for what this hop sends (shared, relaxed atomics).
    pub messages_counter: Counter,
    pub bytes_counter: Counter,
    /// Messages this hop may still send now (clients only, when the route limits them).
    pub message_rate: Option<TokenBucket>,
    /// The client's credentials, on routes with `auth.jwt` (boxed: other routes pay a pointer).
    pub credentials: Option<Box<Credentials>>,
    /// permessage-deflate work on what this hop sends (compressed connections only).
    pub transform: Option<Box<Transform>>,
}

impl Hop {
    pub fn new(
        side: Side,
        decoder: FrameDecoder,
        keepalive: Keepalive,
        (messages_counter, bytes_counter): (Counter, Counter),
    ) -> Self {
        Self {
            side,
            decoder,
            buf: HopBuffer::default(),
            outbox: Outbox::default(),
            reading: Reading::Frames,
            writing: Writing::Open,
            in_frame: InFrame::Boundary,
            close: CloseState::Open,
            drain_deadline: None,
            finish_deadline: None,
            keepalive,
            credentials: None,
            bytes_in: 0,
            messages_in: 0,
            messages_counter,
            bytes_counter,
            message_rate: None,
            transform: None,
        }
    }

    /// Counts what one batch of decoding took from this hop: the connection's totals and the
    /// route's shared counters, added to once per batch rather than once per frame.
    pub fn count_received(&mut self, bytes: u64, messages: u64) {
        if bytes > 0 || messages > 0 {
            self.bytes_in += bytes;
            self.messages_in += messages;
            self.bytes_counter.inc_by(bytes);
            self.messages_counter.inc_by(messages);
        }
    }

    /// The transform, when it rewrites this hop's frames into its own buffer.
    pub fn rewriting(&mut self) -> Option<&mut Transform> {
        self.transform.as_deref_mut().filter(|t| t.rewrites())
    }

    /// Processed bytes from this hop waiting to be written to the other hop.
    #[inline]
    pub fn has_pending(&self) -> bool {
        match &self.transform {
            Some(t) if t.rewrites() => t.out.has_pending(),
            _ => self.buf.has_pending(),
        }
    }

    #[inline]
    pub fn pending(&self) -> &[u8] {
        match &self.transform {
            Some(t) if t.rewrites() => t.out.pending(),
            _ => self.buf.pending(),
        }
    }

    pub fn advance_written(&mut self, n: usize) {
        match &mut self.transform {
            Some(t) if t.rewrites() => t.out.advance_written(n),
            _ => self.buf.advance_written(n),
        }
    }

    /// Forgets everything read from this hop and not yet written (the destination is gone).
    pub fn discard_all(&mut self) {
        self.buf.discard_all();
        if let Some(t) = &mut self.transform {
            t.discard_all();
        }
    }

    /// Forgets what is read and not yet decoded, and any message half-way through the codec.
    pub fn discard_unparsed(&mut self) {
        self.buf.discard_unparsed();
        if let Some(t) = &mut self.transform {
            t.drop_message();
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

    /// A data frame from this hop is partly forwarded to the other hop.
    pub fn mid_frame(&self) -> bool {
        matches!(self.in_frame, InFrame::Forwarding { .. })
    }

    pub fn close_sent(&self) -> Option<CloseCode> {
        match self.close {
            CloseState::Sent { code, .. } => Some(code),
            CloseState::Settled { sent, .. } => sent,
            _ => None,
        }
    }

    pub fn close_received(&self) -> Option<CloseCode> {
        match self.close {
            CloseState::Received(code) => Some(code),
            CloseState::Settled { received, .. } => received,
            _ => None,
        }
    }

    /// We do not wait for this hop's close reply (it misbehaved, vanished or timed out).
    pub fn given_up(&self) -> bool {
        matches!(
            self.close,
            CloseState::Owed(..) | CloseState::Settled { received: None, .. }
        )
    }

    /// No close has been sent to this hop yet (one may be owed).
    pub fn may_send_close(&self) -> bool {
        matches!(
            self.close,
            CloseState::Open | CloseState::Owed(..) | CloseState::Received(_)
        )
    }

    /// Queues a control frame for this hop (nothing after a close).
    pub fn send_control(&mut self, frame: ControlFrame) {
        if self.can_write() {
            self.outbox.push(frame);
        }
    }

    /// Starts (or completes) the closing handshake with this hop, unless our close went out
    /// already. An owed close takes precedence over `code` and `reason`.
    pub fn send_close(&mut self, code: CloseCode, reason: &str, deadline: Instant) {
        if !self.may_send_close() {
            return;
        }
        if !self.can_write() {
            self.close = CloseState::Settled {
                sent: None,
                received: self.close_received(),
            };
            return;
        }
        let (code, reason) = match self.close {
            CloseState::Owed(code, reason) => (code, reason),
            _ => (code, reason),
        };
        self.outbox
            .push(close_frame(code, reason, self.outgoing_mask()));
        self.note_close_sent(code, deadline);
    }

    /// Records that a close with `code` is on its way to this hop (queued by the gateway or
    /// relayed from the other hop).
    pub fn note_close_sent(&mut self, code: CloseCode, deadline: Instant) {
        self.close = match self.close {
            CloseState::Received(received) => CloseState::Settled {
                sent: Some(code),
                received: Some(received),
            },
            CloseState::Owed(..) => CloseState::Settled {
                sent: Some(code),
                received: None,
            },
            _ => CloseState::Sent { code, deadline },
        };
    }

    pub fn note_close_received(&mut self, code: CloseCode) {
        self.close = match self.close {
            CloseState::Sent { code: sent, .. } => CloseState::Settled {
                sent: Some(sent),
                received: Some(code),
            },
            _ => CloseState::Received(code),
        };
    }

    /// Stops waiting for this hop's close reply.
    pub fn give_up(&mut self) {
        self.close = match self.close {
            CloseState::Sent { code, .. } => CloseState::Settled {
                sent: Some(code),
                received: None,
            },
            other => other,
        };
    }

    /// The hop's TCP is cut half-way through a frame to it, which a close frame cannot
    /// interrupt: reported as 1006.
    pub fn cut(&mut self) {
        self.close = CloseState::Settled {
            sent: Some(CloseCode::ABNORMAL),
            received: self.close_received(),
        };
        self.outbox.clear();
    }

    /// The connection to this hop is gone: nothing more is read or written.
    pub fn lose(&mut self) {
        self.reading = Reading::Done;
        self.writing = Writing::Dead;
        self.outbox.clear();
        self.discard_all();
    }

    /// The closing handshake with this hop is over, or will not happen.
    pub fn handshake_settled(&self) -> bool {
        matches!(self.close, CloseState::Settled { sent: Some(_), .. })
    }

    pub fn finished(&self) -> bool {
        self.reading == Reading::Done
            && !matches!(self.writing, Writing::Open | Writing::ShutdownDue)
    }
}
