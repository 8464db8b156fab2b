//! permessage-deflate (RFC 7692) inside the relay: what a hop's data messages become on their
//! way to the other hop.
//!
//! - `Inflate` (a `terminate` route's client hop): compressed messages are inflated into plain
//!   frames for the backend; plain ones are copied.
//! - `Deflate` (a `terminate` route's backend hop): messages of at least `min_size` bytes are
//!   compressed for the client, smaller ones are copied.
//! - `Count` (a `passthrough` route where the backend agreed to deflate): frames are relayed
//!   in place as always, and compressed payload is also inflated into a scratch buffer only to
//!   count what it becomes.
//!
//! Rewritten output cannot be produced in place (lengths change), so `Inflate` and `Deflate`
//! write whole frames into a second pooled buffer, `out`, which replaces the hop buffer as what
//! is written to the other hop. Invariants:
//! - `out` holds only complete frames, so the other hop is always at a frame boundary: the
//!   gateway's control frames may follow any of them;
//! - at most one `out` buffer per direction, held only while it holds bytes; when it is full,
//!   the payload bytes the decoder accepted but the codec has not taken yet (`stalled`) wait in
//!   the hop buffer, and work resumes once `out` is written: memory per connection does not
//!   grow with what a message inflates to;
//! - what a message inflates to is counted against `max_frame` and `max_message` as it is
//!   produced, never more than one byte past the limit, so a bomb costs at most the limit in
//!   CPU and one buffer in memory;
//! - compression state is held between messages only under context takeover; otherwise it is
//!   taken from a per-thread pool for one message and given back.

use super::buffer::{BUFFER_LEN, HopBuffer};
use crate::proto::{CloseCode, FrameHeader, MaskKey, OpCode, Utf8Validator, apply_mask};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use prometheus_client::metrics::counter::Counter;
use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The four bytes a sync flush ends with, removed by the sender and put back by the receiver
/// (RFC 7692 §7.2.1, §7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Room kept for one output frame's header: a 16-bit length and a mask key. Output frames
/// carry at most `u16::MAX` payload bytes, so no header is longer.
const HEADER_ROOM: usize = 2 + 2 + 4;

/// Room a flush tail is given in `out`: whatever the inflater still owes from the last
/// symbols (at most one match, 258 bytes) fits, so the tail is always taken whole.
const TAIL_ROOM: usize = 300;

/// `out` takes no more work below this much free space: a forwarded control frame (at most
/// 131 bytes) always fits, and each output frame carries a useful amount.
const MIN_ROOM: usize = 512;

/// A compression window as agreed: its size, and whether its contents are kept from one
/// message to the next (context takeover).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub bits: u8,
    pub keep_context: bool,
}

/// What the relay does to compressed messages on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayCompression {
    #[default]
    Off,
    /// `passthrough` with deflate agreed between client and backend: count what each side's
    /// compressed messages inflate to, forward them unchanged.
    Count { client: Window, backend: Window },
    /// `terminate` with deflate agreed with the client.
    Terminate(Terminated),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terminated {
    /// What the client compresses with: what the gateway inflates with.
    pub client: Window,
    /// What the gateway compresses with.
    pub server: Window,
    /// zlib level, 1..=9.
    pub level: u8,
    /// Backend messages below this many bytes go to the client uncompressed.
    pub min_size: u32,
}

/// Why a rewritten or counted message ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The message or frame inflates past `max_message` / `max_frame`.
    TooBig,
    /// The compressed data is not valid deflate.
    BadDeflate,
    /// The inflated text is not UTF-8.
    InvalidUtf8,
    /// The codec failed on our own output (cannot happen with valid state): the connection
    /// ends rather than forwarding something wrong.
    Internal,
}

impl Refusal {
    pub fn violation(self) -> (CloseCode, &'static str) {
        match self {
            Self::TooBig => (CloseCode::TOO_BIG, "message too big once inflated"),
            Self::BadDeflate => (CloseCode::INVALID_PAYLOAD, "invalid compressed data"),
            Self::InvalidUtf8 => (CloseCode::INVALID_PAYLOAD, "invalid UTF-8 in text message"),
            Self::Internal => (CloseCode::INTERNAL_ERROR, "compression failed"),
        }
    }
}

/// Whether work on `out` can go on or waits for it to be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Everything accepted so far is in `out`.
    Done,
    /// `out` is full: the rest waits until it is written.
    Stalled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Inflate,
    Deflate,
}

/// The message being rewritten.
#[derive(Debug)]
struct Message {
    opcode: OpCode,
    mode: Mode,
    /// An output frame of this message went out: later ones are continuations.
    started: bool,
    /// Bytes the message has inflated to, and the current input frame's share.
    inflated: u64,
    frame_inflated: u64,
    /// The input message has ended: the flush (and the final frame) remain.
    input_ended: bool,
    /// Inflated text is validated as it is produced.
    utf8: Option<Utf8Validator>,
    /// Deflate output held back from a non-final frame: the stream's last four bytes, which
    /// are removed if the message ends there.
    held: [u8; 4],
    held_len: usize,
}

/// How a hop's messages are rewritten (boxed in the hop: only compressed connections pay).
#[derive(Debug)]
pub struct Transform {
    kind: Kind,
    /// Complete frames for the other hop (see the module's invariants).
    pub out: HopBuffer,
    /// Payload bytes at the hop buffer's `parsed` that the decoder has accepted and the codec
    /// has not taken yet.
    pub stalled: usize,
    message: Option<Message>,
    /// Frames to the backend are masked by the gateway.
    masked: bool,
    /// The route's data bytes on the client's wire and on the backend's, for this direction
    /// (`terminate` only): added to once per batch.
    pub counters: Option<(Counter, Counter)>,
    /// The connection's share of the gateway's compression memory, held until it ends.
    pub reservation: Option<DeflateReservation>,
}

#[derive(Debug)]
enum Kind {
    Inflate {
        window: Window,
        state: Option<Box<Decompress>>,
    },
    Deflate {
        window: Window,
        level: u8,
        min_size: u32,
        state: Option<Box<Compress>>,
    },
    Count {
        window: Window,
        state: Option<Box<Decompress>>,
        /// Bytes the current compressed message has inflated to.
        inflated: u64,
        /// The current message is compressed.
        counting: bool,
    },
}

impl Transform {
    pub fn inflate(window: Window) -> Self {
        Self::with(
            Kind::Inflate {
                window,
                state: None,
            },
            true,
        )
    }

    pub fn deflate(window: Window, level: u8, min_size: u32) -> Self {
        Self::with(
            Kind::Deflate {
                window,
                level,
                min_size,
                state: None,
            },
            false,
        )
    }

    pub fn count(window: Window) -> Self {
        Self::with(
            Kind::Count {
                window,
                state: None,
                inflated: 0,
                counting: false,
            },
            false,
        )
    }

    fn with(kind: Kind, masked: bool) -> Self {
        Self {
            kind,
            out: HopBuffer::default(),
            stalled: 0,
            message: None,
            masked,
            counters: None,
            reservation: None,
        }
    }

    /// Whether this hop's frames go through `out` (rather than in place).
    pub fn rewrites(&self) -> bool {
        !matches!(self.kind, Kind::Count { .. })
    }

    /// Whether codec work waits for `out` to be written.
    pub fn busy(&self) -> bool {
        self.stalled > 0 || self.message.as_ref().is_some_and(|m| m.input_ended)
    }

    /// Room for more work in `out`.
    pub fn has_room(&mut self) -> bool {
        if self.out.start > 0 && BUFFER_LEN - self.out.filled < MIN_ROOM + HEADER_ROOM {
            compact(&mut self.out);
        }
        BUFFER_LEN - self.out.filled >= MIN_ROOM + HEADER_ROOM
    }

    /// Memory this transform holds: its buffer and its codec state (an estimate for the
    /// latter, from zlib's documented sizes).
    pub fn held_bytes(&self) -> usize {
        let buffer = if self.out.holds_buffer() {
            BUFFER_LEN
        } else {
            0
        };
        let state = match &self.kind {
            Kind::Inflate { window, state } | Kind::Count { window, state, .. } => state
                .as_ref()
                .map_or(0, |_| inflate_state_bytes(window.bits)),
            Kind::Deflate { window, state, .. } => state
                .as_ref()
                .map_or(0, |_| deflate_state_bytes(window.bits)),
        };
        buffer + state
    }

    /// Appends a whole frame (a forwarded control frame) to `out`. The caller checked
    /// [`Transform::has_room`].
    pub fn push_frame(&mut self, frame: &[u8]) {
        let at = self.out.filled;
        let bytes = self.out.bytes_mut();
        if let Some(space) = bytes.get_mut(at..at + frame.len()) {
            space.copy_from_slice(frame);
            self.out.filled += frame.len();
            self.out.parsed = self.out.filled;
        }
    }

    /// A data frame's header arrived: a new message starts unless it continues one.
    pub fn start_frame(&mut self, header: &FrameHeader) {
        if header.opcode != OpCode::Continuation || self.message.is_none() {
            let compressed = header.rsv & crate::proto::frame::RSV1 != 0;
            let mode = match &mut self.kind {
                Kind::Inflate { window, state } if compressed => {
                    take_inflater(state, *window);
                    Mode::Inflate
                }
                Kind::Deflate {
                    window,
                    level,
                    min_size,
                    state,
                } if !header.fin || header.payload_len >= u64::from(*min_size) => {
                    take_deflater(state, *window, *level);
                    Mode::Deflate
                }
                _ => Mode::Plain,
            };
            let utf8 =
                (mode == Mode::Inflate && header.opcode == OpCode::Text).then(Utf8Validator::new);
            self.message = Some(Message {
                opcode: header.opcode,
                mode,
                started: false,
                inflated: 0,
                frame_inflated: 0,
                input_ended: false,
                utf8,
                held: [0; 4],
                held_len: 0,
            });
        } else if let Some(message) = &mut self.message {
            message.frame_inflated = 0;
        }
    }

    /// The payload piece just accepted by the decoder sits unmasked at `parsed`; it is taken
    /// by [`Transform::resume`].
    pub fn accept_piece(&mut self, len: usize, message_end: bool) {
        self.stalled = len;
        if message_end && let Some(message) = &mut self.message {
            message.input_ended = true;
        }
    }

    /// Moves what waits (`input`, the `stalled` bytes at the hop buffer's `parsed`) into `out`
    /// as frames, until it is all there or `out` is full. Returns how many input bytes were
    /// taken (the caller removes them from the hop buffer).
    pub fn resume(
        &mut self,
        input: &[u8],
        (max_frame, max_message): (u64, u64),
    ) -> Result<(usize, Progress), Refusal> {
        let mut taken = 0;
        while self.stalled > 0 || self.message.as_ref().is_some_and(|m| m.input_ended) {
            if !self.has_room() {
                return Ok((taken, Progress::Stalled));
            }
            let Some(message) = self.message.as_mut() else {
                self.stalled = 0;
                break;
            };
            let at = self.out.filled;
            // Frames to the client have no mask key: 4 bytes are enough for their header.
            let room = if self.masked {
                HEADER_ROOM
            } else {
                HEADER_ROOM - 4
            };
            let bytes = self.out.bytes_mut();
            let end = (at + room + usize::from(u16::MAX)).min(BUFFER_LEN);
            let payload = &mut bytes[at + room..end];
            let input_left = &input[taken..taken + self.stalled];
            let (consumed, produced, finished) = match message.mode {
                Mode::Plain => {
                    let n = input_left.len().min(payload.len());
                    payload[..n].copy_from_slice(&input_left[..n]);
                    (n, n, message.input_ended && n == input_left.len())
                }
                Mode::Inflate => {
                    let Kind::Inflate { state, .. } = &mut self.kind else {
                        return Err(Refusal::Internal);
                    };
                    let Some(inflater) = state.as_mut() else {
                        return Err(Refusal::Internal);
                    };
                    let allowed = (max_message.saturating_sub(message.inflated))
                        .min(max_frame.saturating_sub(message.frame_inflated));
                    let cap = payload
                        .len()
                        .min(usize::try_from(allowed.saturating_add(1)).unwrap_or(usize::MAX));
                    let step = inflate_step(
                        inflater,
                        input_left,
                        message.input_ended,
                        &mut payload[..cap],
                    )?;
                    if step.1 as u64 > allowed {
                        return Err(Refusal::TooBig);
                    }
                    message.inflated += step.1 as u64;
                    message.frame_inflated += step.1 as u64;
                    if let Some(utf8) = &mut message.utf8 {
                        utf8.feed(&payload[..step.1])
                            .map_err(|_| Refusal::InvalidUtf8)?;
                    }
                    step
                }
                Mode::Deflate => {
                    let Kind::Deflate { state, .. } = &mut self.kind else {
                        return Err(Refusal::Internal);
                    };
                    let Some(deflater) = state.as_mut() else {
                        return Err(Refusal::Internal);
                    };
                    // The bytes held back from the last frame lead this one.
                    let held = message.held_len;
                    payload[..held].copy_from_slice(&message.held[..held]);
                    message.held_len = 0;
                    let (consumed, produced, finished) = deflate_step(
                        deflater,
                        input_left,
                        message.input_ended,
                        &mut payload[held..],
                    )?;
                    (consumed, held + produced, finished)
                }
            };
            if consumed == 0 && produced == 0 && !finished && !input_left.is_empty() {
                // Nothing moves: the deflate stream ended (a final block) with data left.
                return Err(Refusal::BadDeflate);
            }
            taken += consumed;
            self.stalled -= consumed;
            let mut len = produced;
            if message.mode == Mode::Deflate {
                if finished {
                    // The flush's tail is not sent (§7.2.1).
                    if payload[..len].ends_with(&TAIL) {
                        len -= TAIL.len();
                    } else {
                        return Err(Refusal::Internal);
                    }
                } else {
                    let keep = len.min(4);
                    message.held[..keep].copy_from_slice(&payload[len - keep..len]);
                    message.held_len = keep;
                    len -= keep;
                }
            }
            if let Some((compressed, uncompressed)) = &self.counters {
                // `len` is what goes out in this frame, `consumed` what came in.
                let (wire, plain) = match message.mode {
                    Mode::Inflate => (consumed, len),
                    Mode::Deflate => (len, consumed),
                    Mode::Plain => (len, len),
                };
                compressed.inc_by(wire as u64);
                uncompressed.inc_by(plain as u64);
            }
            if finished && let Some(utf8) = &mut message.utf8 {
                utf8.finish().map_err(|_| Refusal::InvalidUtf8)?;
            }
            if len > 0 || finished {
                let opcode = if message.started {
                    OpCode::Continuation
                } else {
                    message.opcode
                };
                let rsv1 = message.mode == Mode::Deflate && !message.started;
                message.started = true;
                let mask = self.masked.then(super::mask_keys::next_mask_key);
                let frame_len = write_frame(bytes, at, room, len, (finished, rsv1, opcode, mask));
                self.out.filled += frame_len;
                self.out.parsed = self.out.filled;
            }
            if finished {
                self.end_message();
            }
        }
        Ok((taken, Progress::Done))
    }

    /// The message ended (or was dropped): state without context takeover goes back to the
    /// pool.
    fn end_message(&mut self) {
        self.message = None;
        match &mut self.kind {
            Kind::Inflate { window, state } => release_inflater(state, *window),
            Kind::Deflate {
                window,
                level,
                state,
                ..
            } => release_deflater(state, *window, *level),
            Kind::Count { .. } => {}
        }
    }

    /// The rest of the current message will not be forwarded (the other hop was sent a
    /// close): nothing of it is produced. A compressor keeping its context is now out of step
    /// with the peer, which no longer matters: nothing more is sent.
    pub fn drop_message(&mut self) {
        self.stalled = 0;
        if self.message.is_some() {
            self.end_message();
        }
    }

    /// Forgets all output and pending work (the other hop is gone).
    pub fn discard_all(&mut self) {
        self.out.discard_all();
        self.drop_message();
    }

    /// `Count`: a data frame's header arrived; a message with RSV1 is counted.
    pub fn start_count(&mut self, header: &FrameHeader) {
        if let Kind::Count {
            counting, inflated, ..
        } = &mut self.kind
            && header.opcode != OpCode::Continuation
        {
            *counting = header.rsv & crate::proto::frame::RSV1 != 0;
            *inflated = 0;
        }
    }

    /// `Count`: the current message is compressed and counted.
    pub fn counting(&self) -> bool {
        matches!(self.kind, Kind::Count { counting: true, .. })
    }

    /// `Count`: a piece of a compressed message (unmasked in `scratch` by the caller when it
    /// arrived masked) is inflated to count it against the limits.
    pub fn count_piece(
        &mut self,
        piece: &[u8],
        mask: Option<MaskKey>,
        message_end: bool,
        (max_frame, max_message): (u64, u64),
    ) -> Result<(), Refusal> {
        let Kind::Count {
            window,
            state,
            inflated,
            counting,
        } = &mut self.kind
        else {
            return Ok(());
        };
        if message_end {
            *counting = false;
        }
        take_inflater(state, *window);
        let Some(inflater) = state.as_mut() else {
            return Err(Refusal::Internal);
        };
        // The per-frame limit applies to what the whole message inflates to: a frame cannot
        // inflate to more than its message, and a sender could spread its message over
        // frames.
        let limit = max_message.max(max_frame);
        let mut input = [0u8; 4096];
        let mut sink = [0u8; 16 * 1024];
        let mut offset = 0u64;
        for chunk in piece.chunks(input.len()) {
            let input = &mut input[..chunk.len()];
            input.copy_from_slice(chunk);
            if let Some(key) = mask {
                apply_mask(input, key.rotated(offset));
            }
            offset += chunk.len() as u64;
            let mut rest: &[u8] = input;
            loop {
                let (consumed, produced, _) = inflate_step(inflater, rest, false, &mut sink)?;
                *inflated += produced as u64;
                if *inflated > limit {
                    return Err(Refusal::TooBig);
                }
                rest = &rest[consumed..];
                if rest.is_empty() && produced < sink.len() {
                    break;
                }
            }
        }
        if message_end {
            let mut tail: &[u8] = &TAIL;
            loop {
                let (consumed, produced, _) = inflate_step(inflater, tail, false, &mut sink)?;
                *inflated += produced as u64;
                if *inflated > limit {
                    return Err(Refusal::TooBig);
                }
                tail = &tail[consumed..];
                if tail.is_empty() && produced < sink.len() {
                    break;
                }
            }
            *inflated = 0;
            release_inflater(state, *window);
        }
        Ok(())
    }
}

/// Writes the header of an output frame whose `len` payload bytes start `room` bytes after
/// `at`, masks the payload if `mask` is set, and closes the gap a short header leaves (only
/// below 126 bytes of payload). Returns the frame's length.
fn write_frame(
    bytes: &mut [u8],
    at: usize,
    room: usize,
    len: usize,
    (fin, rsv1, opcode, mask): (bool, bool, OpCode, Option<MaskKey>),
) -> usize {
    let payload = at + room..at + room + len;
    if let Some(key) = mask {
        apply_mask(&mut bytes[payload.clone()], key);
    }
    let mut header = FrameHeader::new(fin, opcode, mask, len as u64);
    if rsv1 {
        header.rsv = crate::proto::frame::RSV1;
    }
    let header_len = header.encoded_len();
    let header_at = payload.start - header_len;
    header.encode_into(&mut bytes[header_at..payload.start]);
    if header_at > at {
        bytes.copy_within(header_at..payload.end, at);
    }
    header_len + len
}

/// Moves `out`'s unwritten bytes to the front.
fn compact(out: &mut HopBuffer) {
    let (start, filled) = (out.start, out.filled);
    out.bytes_mut().copy_within(start..filled, 0);
    out.start = 0;
    out.parsed = filled - start;
    out.filled = filled - start;
}

/// One inflate call: `input`, then (once it is all taken and the message has ended) the
/// flush tail. Returns bytes of `input` taken, bytes produced, and whether the message is
/// completely inflated (its tail taken and no output left in the inflater).
fn inflate_step(
    inflater: &mut Decompress,
    input: &[u8],
    ended: bool,
    out: &mut [u8],
) -> Result<(usize, usize, bool), Refusal> {
    let (in_before, out_before) = (inflater.total_in(), inflater.total_out());
    inflater
        .decompress(input, out, FlushDecompress::None)
        .map_err(|_| Refusal::BadDeflate)?;
    let consumed = (inflater.total_in() - in_before) as usize;
    let mut produced = (inflater.total_out() - out_before) as usize;
    let left = out.len() - produced;
    if !ended || consumed < input.len() || left == 0 || (left < TAIL_ROOM && out.len() >= TAIL_ROOM)
    {
        return Ok((consumed, produced, false));
    }
    // All the message is in: the tail makes the inflater emit everything it holds. With
    // `TAIL_ROOM` free it is taken whole; an `out` smaller than that is cut by the caller's
    // limit, so filling it refuses the message.
    let out_before = inflater.total_out();
    inflater
        .decompress(&TAIL, &mut out[produced..], FlushDecompress::Sync)
        .map_err(|_| Refusal::BadDeflate)?;
    let tail_out = (inflater.total_out() - out_before) as usize;
    produced += tail_out;
    let finished = produced < out.len();
    Ok((consumed, produced, finished))
}

/// One deflate call: `input` without flushing, then (once it is all taken and the message has
/// ended) a sync flush. Returns bytes taken, bytes produced, and whether the flush completed.
fn deflate_step(
    deflater: &mut Compress,
    input: &[u8],
    ended: bool,
    out: &mut [u8],
) -> Result<(usize, usize, bool), Refusal> {
    let (in_before, out_before) = (deflater.total_in(), deflater.total_out());
    let flush = if ended {
        FlushCompress::Sync
    } else {
        FlushCompress::None
    };
    deflater
        .compress(input, out, flush)
        .map_err(|_| Refusal::Internal)?;
    let consumed = (deflater.total_in() - in_before) as usize;
    let produced = (deflater.total_out() - out_before) as usize;
    // zlib: a flush is complete when it returns with output space left.
    let finished = ended && consumed == input.len() && produced < out.len();
    Ok((consumed, produced, finished))
}

/// An inflate state kept between messages: tables and bookkeeping plus the window. Together
/// with [`deflate_state_bytes`] this matches the RSS measured per idle connection with context
/// takeover both ways (README, Compression: 218 KiB at 11-bit windows).
pub const fn inflate_state_bytes(bits: u8) -> usize {
    16 * 1024 + (1 << bits)
}

/// A deflate state kept between messages: zlib-rs's fixed 128 KiB hash table and 64 KiB
/// pending buffer, plus twice the window (zlib.h documents `(1 << (windowBits + 2)) +
/// (1 << (memLevel + 9))` for zlib, whose hash is smaller).
pub const fn deflate_state_bytes(bits: u8) -> usize {
    (1 << (bits + 2)) + (192 << 10)
}

/// Codec states kept per thread for messages without context takeover.
#[derive(Default)]
struct Pool {
    inflaters: Vec<(u8, Box<Decompress>)>,
    deflaters: Vec<(u8, u8, Box<Compress>)>,
}

/// A few per thread: enough for the messages one thread has in flight at one instant.
const POOL_LIMIT: usize = 4;

thread_local! {
    static POOL: RefCell<Pool> = RefCell::default();
}

fn take_inflater(state: &mut Option<Box<Decompress>>, window: Window) {
    if state.is_some() {
        return;
    }
    let pooled = POOL
        .try_with(|pool| {
            let mut pool = pool.borrow_mut();
            let at = pool
                .inflaters
                .iter()
                .position(|(bits, _)| *bits == window.bits)?;
            Some(pool.inflaters.swap_remove(at).1)
        })
        .ok()
        .flatten();
    // zlib inflates raw deflate with 8..=15 window bits; a larger window reads any smaller
    // one, and 9 avoids zlib's special case for 8.
    *state =
        Some(pooled.unwrap_or_else(|| {
            Box::new(Decompress::new_with_window_bits(false, window.bits.max(9)))
        }));
}

fn release_inflater(state: &mut Option<Box<Decompress>>, window: Window) {
    if window.keep_context {
        return;
    }
    if let Some(mut inflater) = state.take() {
        inflater.reset(false);
        let _ = POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.inflaters.len() < POOL_LIMIT {
                pool.inflaters.push((window.bits, inflater));
            }
        });
    }
}

fn take_deflater(state: &mut Option<Box<Compress>>, window: Window, level: u8) {
    if state.is_some() {
        return;
    }
    let pooled = POOL
        .try_with(|pool| {
            let mut pool = pool.borrow_mut();
            let at = pool
                .deflaters
                .iter()
                .position(|(bits, lvl, _)| *bits == window.bits && *lvl == level)?;
            Some(pool.deflaters.swap_remove(at).2)
        })
        .ok()
        .flatten();
    *state = Some(pooled.unwrap_or_else(|| {
        Box::new(Compress::new_with_window_bits(
            Compression::new(u32::from(level)),
            false,
            window.bits,
        ))
    }));
}

fn release_deflater(state: &mut Option<Box<Compress>>, window: Window, level: u8) {
    if window.keep_context {
        return;
    }
    if let Some(mut deflater) = state.take() {
        deflater.reset();
        let _ = POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.deflaters.len() < POOL_LIMIT {
                pool.deflaters.push((window.bits, level, deflater));
            }
        });
    }
}

/// Compression state held between messages (context takeover) by every connection of the
/// gateway, against `limits.compression_memory`: a connection that would go over it is
/// answered without compression. State used for one message at a time comes from per-thread
/// pools and is not counted here: it does not grow with connections.
#[derive(Debug, Default)]
pub struct DeflateBudget {
    held: AtomicU64,
}

impl DeflateBudget {
    /// Reserves `bytes` if that keeps the total within `cap`; released when the reservation
    /// is dropped (the connection's end).
    pub fn reserve(self: &Arc<Self>, bytes: u64, cap: u64) -> Option<DeflateReservation> {
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(bytes).filter(|total| *total <= cap)
            })
            .ok()?;
        Some(DeflateReservation {
            budget: Arc::clone(self),
            bytes,
        })
    }

    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

/// One connection's share of the [`DeflateBudget`].
#[derive(Debug)]
pub struct DeflateReservation {
    budget: Arc<DeflateBudget>,
    bytes: u64,
}

impl Drop for DeflateReservation {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Terminated {
    /// What the connection holds between messages: the state of each side that keeps its
    /// context (an estimate from zlib's documented sizes).
    pub fn held_between_messages(&self) -> u64 {
        let inflate = if self.client.keep_context {
            inflate_state_bytes(self.client.bits.max(9))
        } else {
            0
        };
        let deflate = if self.server.keep_context {
            deflate_state_bytes(self.server.bits)
        } else {
            0
        };
        (inflate + deflate) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_refuses_past_its_cap_and_frees_on_drop() {
        let budget = Arc::new(DeflateBudget::default());
        let first = budget.reserve(600, 1000).unwrap();
        assert!(budget.reserve(500, 1000).is_none());
        let second = budget.reserve(400, 1000).unwrap();
        assert_eq!(budget.held(), 1000);
        drop(first);
        drop(second);
        assert_eq!(budget.held(), 0);
        // Nothing held between messages costs nothing.
        assert!(budget.reserve(0, 0).is_some());
    }
}
