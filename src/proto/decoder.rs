//! The streaming frame decoder: RFC 6455 receiver rules over a caller-owned buffer.
//!
//! The decoder never owns or copies payload bytes. The caller reads from its socket into a
//! buffer and calls [`FrameDecoder::decode`] on the unread part; each call either returns
//! `Ok(None)` ("need more bytes", nothing consumed) or one [`Item`] and the number of bytes it
//! consumed from the front of the slice. Data frame payloads come out in whatever pieces are in
//! the buffer, so a 100 MiB frame passes through a 4 KiB buffer: memory never grows with the
//! frame or message size. Control frames (at most 125 bytes of payload) come out whole, so the
//! caller's buffer must hold at least [`MIN_BUFFER_LEN`] bytes and be compacted when `decode`
//! returns `Ok(None)`.
//!
//! Invariants:
//! - between two frames, `state` is `Header`; during a data frame's payload it records how far
//!   into the frame the next byte is (the mask phase) and how much is left;
//! - `message` is `Some` exactly while a fragmented message is unfinished (after a data frame
//!   with FIN clear and until the continuation with FIN set);
//! - `message_len` never exceeds `max_message`: the limit is checked from the header, before a
//!   single payload byte of the frame is accepted;
//! - text payload (of uncompressed messages) is validated as UTF-8 before it is returned, so a
//!   relay never forwards a byte of an invalid sequence;
//! - a text frame whose payload is entirely in the slice is validated (and unmasked in place)
//!   before its header is returned, so a relay never forwards the header of a frame it will
//!   refuse: the other hop stays between frames and can be sent a close frame. Only a frame
//!   larger than what is buffered streams with its header first.

use super::close::parse_close_payload;
use super::error::ProtocolError;
use super::frame::{FIN, FrameHeader, MASKED, MAX_CONTROL_PAYLOAD, MaskKey, OpCode, RSV_ALL, RSV1};
use super::mask::apply_mask;
use super::utf8::Utf8Validator;
use std::ops::Range;

/// The smallest buffer that can hold any complete control frame: a 2-byte header, a 4-byte mask
/// and 125 bytes of payload.
pub const MIN_BUFFER_LEN: usize = 2 + 4 + MAX_CONTROL_PAYLOAD;

/// Which end of the connection the decoder reads for. A server receives client frames, which
/// must be masked; a client receives server frames, which must not be (§5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// How a decoder enforces limits and extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderConfig {
    pub role: Role,
    /// Largest frame payload accepted, bytes.
    pub max_frame: u64,
    /// Largest message accepted (sum of its frames' payloads), bytes.
    pub max_message: u64,
    /// permessage-deflate was negotiated: RSV1 may be set on the first frame of a message, whose
    /// payload is then opaque (not validated as UTF-8).
    pub compression: bool,
    /// Leave binary and compressed payloads masked and report the key instead, so a relay can
    /// re-mask them with its own key in one pass. Text and control payloads are always unmasked,
    /// because the decoder must read them.
    pub keep_opaque_masked: bool,
}

impl DecoderConfig {
    pub const fn new(role: Role) -> Self {
        Self {
            role,
            max_frame: 16 << 20,
            max_message: 64 << 20,
            compression: false,
            keep_opaque_masked: false,
        }
    }
}

/// One step of decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A text, binary or continuation frame began; its payload follows as `Payload` items, ending
    /// with one whose `frame_end` is set (a single empty one for an empty frame).
    DataFrame(FrameHeader),
    /// The next piece of the current data frame's payload: the first `len` bytes of the slice
    /// passed to `decode`.
    Payload(Payload),
    /// A complete control frame. Its payload is `buf[payload]` of the slice passed to `decode`,
    /// unmasked; a close payload has been validated.
    Control {
        header: FrameHeader,
        payload: Range<usize>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    pub len: usize,
    /// `Some(key)` when the bytes are still masked, with the key rotated to this piece (apply
    /// it from the piece's first byte).
    pub mask: Option<MaskKey>,
    /// The last piece of the frame.
    pub frame_end: bool,
    /// The last piece of the message (the frame had FIN set).
    pub message_end: bool,
}

/// A complete single-frame text or binary message, decoded in one step by
/// [`FrameDecoder::decode_whole_message`]: the bytes `decode` would have returned as a
/// `DataFrame` item followed by one `Payload` item that ends the frame and the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WholeMessage {
    /// The frame's header as it arrived (its mask is the key the sender used).
    pub header: FrameHeader,
    /// Header bytes: the payload is `buf[header_len..header_len + payload_len]`.
    pub header_len: usize,
    pub payload_len: usize,
    /// `Some(key)` when the payload is still masked (see [`DecoderConfig::keep_opaque_masked`]).
    pub mask: Option<MaskKey>,
}

impl WholeMessage {
    /// Bytes of the slice the message occupies: header and payload.
    pub const fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub item: Item,
    pub consumed: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Payload {
        header: FrameHeader,
        received: u64,
        /// The rest of the payload was already in the caller's slice when the header was
        /// decoded, and was unmasked and validated there: it passes without a second pass.
        checked: bool,
    },
}

/// The kind of the message in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Message {
    /// Validated as UTF-8 as it passes.
    Text,
    /// Binary, or compressed text: opaque.
    Opaque,
}

/// Decodes a stream of frames received by one side of one connection.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    config: DecoderConfig,
    state: State,
    message: Option<Message>,
    message_len: u64,
    utf8: Utf8Validator,
}

impl FrameDecoder {
    pub fn new(config: DecoderConfig) -> Self {
        Self {
            config,
            state: State::Header,
            message: None,
            message_len: 0,
            utf8: Utf8Validator::new(),
        }
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// True between frames: a control frame may be sent on the stream this decoder reads,
    /// because no data frame's payload is half-way through.
    pub fn is_between_frames(&self) -> bool {
        self.state == State::Header
    }

    /// True between messages: no frame or fragmented message is in progress.
    pub fn is_between_messages(&self) -> bool {
        self.state == State::Header && self.message.is_none()
    }

    /// Decodes the next item from the front of `buf`. Payload bytes are unmasked in place
    /// (unless kept masked, see [`DecoderConfig::keep_opaque_masked`]). The bytes past
    /// `consumed` must be passed to the next call as this one left them: when a text frame is
    /// whole in `buf`, its payload is unmasked and validated before its header is returned,
    /// and the decoder does not do either again.
    ///
    /// After an error the connection must be failed with `error.close_code()`; the decoder's
    /// state is unspecified.
    pub fn decode(&mut self, buf: &mut [u8]) -> Result<Option<Decoded>, ProtocolError> {
        match self.state {
            State::Header => self.decode_header(buf),
            State::Payload {
                header,
                received,
                checked,
            } => self.decode_payload(buf, header, received, checked),
        }
    }

    /// The fast path for what most traffic is: when `buf` starts with a complete text or
    /// binary message in a single frame (FIN set) with a 7- or 16-bit length, and no message is
    /// in progress, decodes it in one step, applying exactly the rules `decode` would (masking,
    /// limits, reserved bits, UTF-8 of text). Anything else (a partial frame, a control frame,
    /// a fragment, a 64-bit length, a header that breaks a rule) is left to `decode`: this
    /// returns `Ok(None)`, consuming and changing nothing, and `decode` then yields the items
    /// or the error. The only error returned here is invalid UTF-8 in a text message, which
    /// `decode` would report for the same frame.
    #[inline]
    pub fn decode_whole_message(
        &mut self,
        buf: &mut [u8],
    ) -> Result<Option<WholeMessage>, ProtocolError> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        if self.state != State::Header || self.message.is_some() || b0 & FIN == 0 {
            return Ok(None);
        }
        let opcode = match b0 & 0x0F {
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            _ => return Ok(None),
        };
        let rsv = b0 & RSV_ALL;
        let rsv_allowed = if self.config.compression { RSV1 } else { 0 };
        let masked = b1 & MASKED != 0;
        if rsv & !rsv_allowed != 0 || masked != (self.config.role == Role::Server) {
            return Ok(None);
        }
        let (payload_len, mut header_len) = match b1 & 0x7F {
            127 => return Ok(None),
            126 => match buf.get(2..4) {
                Some(&[hi, lo]) => (u16::from_be_bytes([hi, lo]) as usize, 4),
                _ => return Ok(None),
            },
            len => (len as usize, 2),
        };
        let mask = if masked {
            let Some(&[k0, k1, k2, k3]) = buf.get(header_len..header_len + 4) else {
                return Ok(None);
            };
            header_len += 4;
            Some(MaskKey([k0, k1, k2, k3]))
        } else {
            None
        };
        let len = payload_len as u64;
        if len > self.config.max_frame
            || len > self.config.max_message
            || buf.len() < header_len + payload_len
        {
            return Ok(None);
        }
        let is_text = opcode == OpCode::Text && rsv & RSV1 == 0;
        let payload = &mut buf[header_len..header_len + payload_len];
        let mut kept_mask = mask;
        if let Some(key) = mask
            && (is_text || !self.config.keep_opaque_masked)
        {
            apply_mask(payload, key);
            kept_mask = None;
        }
        if is_text {
            simdutf8::basic::from_utf8(payload).map_err(|_| ProtocolError::InvalidUtf8)?;
        }
        Ok(Some(WholeMessage {
            header: FrameHeader {
                fin: true,
                rsv,
                opcode,
                mask,
                payload_len: len,
            },
            header_len,
            payload_len,
            mask: kept_mask,
        }))
    }

    fn decode_header(&mut self, buf: &mut [u8]) -> Result<Option<Decoded>, ProtocolError> {
        let Some((header, header_len)) = FrameHeader::parse(buf)? else {
            return Ok(None);
        };
        self.check_header(&header)?;
        if header.opcode.is_control() {
            // Checked by `FrameHeader::parse`: at most 125 bytes, so the cast cannot truncate.
            let end = header_len + header.payload_len as usize;
            if buf.len() < end {
                return Ok(None);
            }
            let payload = &mut buf[header_len..end];
            if let Some(key) = header.mask {
                apply_mask(payload, key);
            }
            if header.opcode == OpCode::Close {
                parse_close_payload(payload)?;
            }
            let item = Item::Control {
                header,
                payload: header_len..end,
            };
            return Ok(Some(Decoded {
                item,
                consumed: end,
            }));
        }
        self.start_data_frame(&header)?;
        let buffered = (buf.len() - header_len) as u64;
        let checked = self.message == Some(Message::Text) && buffered >= header.payload_len;
        if checked {
            // The whole frame is here: refuse it before its header goes anywhere, so that the
            // other hop of a relay is still between frames and gets a close frame instead of
            // a cut-off frame. This covers an empty final frame too, which completes the
            // message with its header alone. Bounded by `buffered`, so the cast cannot truncate.
            let payload = &mut buf[header_len..header_len + header.payload_len as usize];
            if let Some(key) = header.mask {
                apply_mask(payload, key);
            }
            self.utf8.feed(payload)?;
            if header.fin {
                self.utf8.finish()?;
            }
        }
        self.state = State::Payload {
            header,
            received: 0,
            checked,
        };
        Ok(Some(Decoded {
            item: Item::DataFrame(header),
            consumed: header_len,
        }))
    }

    /// Rules that depend on the role and the negotiated extensions (§5.1, §5.2, RFC 7692 §6).
    fn check_header(&self, header: &FrameHeader) -> Result<(), ProtocolError> {
        let rsv_allowed = if self.config.compression && !header.opcode.is_control() {
            RSV1
        } else {
            0
        };
        if header.rsv & !rsv_allowed != 0 {
            return Err(ProtocolError::ReservedBitsSet);
        }
        if header.rsv & RSV1 != 0 && header.opcode == OpCode::Continuation {
            return Err(ProtocolError::CompressedContinuation);
        }
        match (self.config.role, header.mask.is_some()) {
            (Role::Server, false) => return Err(ProtocolError::UnmaskedClientFrame),
            (Role::Client, true) => return Err(ProtocolError::MaskedServerFrame),
            _ => {}
        }
        if header.payload_len > self.config.max_frame {
            return Err(ProtocolError::FrameTooLarge {
                len: header.payload_len,
                max: self.config.max_frame,
            });
        }
        Ok(())
    }

    /// Fragmentation rules (§5.4) and the message size limit, before any payload is accepted.
    fn start_data_frame(&mut self, header: &FrameHeader) -> Result<(), ProtocolError> {
        match (header.opcode, self.message) {
            (OpCode::Continuation, None) => return Err(ProtocolError::UnexpectedContinuation),
            (OpCode::Continuation, Some(_)) => {}
            (_, Some(_)) => return Err(ProtocolError::ExpectedContinuation),
            (opcode, None) => {
                let compressed = header.rsv & RSV1 != 0;
                self.message = Some(if opcode == OpCode::Text && !compressed {
                    Message::Text
                } else {
                    Message::Opaque
                });
                self.message_len = 0;
            }
        }
        let total = self.message_len.saturating_add(header.payload_len);
        if total > self.config.max_message {
            return Err(ProtocolError::MessageTooLarge {
                len: total,
                max: self.config.max_message,
            });
        }
        self.message_len = total;
        Ok(())
    }

    fn decode_payload(
        &mut self,
        buf: &mut [u8],
        header: FrameHeader,
        received: u64,
        checked: bool,
    ) -> Result<Option<Decoded>, ProtocolError> {
        let remaining = header.payload_len - received;
        if buf.is_empty() && remaining > 0 {
            return Ok(None);
        }
        // `remaining` may exceed usize on 32-bit targets; `min` with the slice length keeps it
        // in range.
        let len = remaining.min(buf.len() as u64) as usize;
        let piece = &mut buf[..len];
        // Checked text was unmasked and validated with its header, and the message's end
        // (if this frame ends it) was checked then too.
        let is_text = self.message == Some(Message::Text) && !checked;
        let mut mask = header.mask.map(|key| key.rotated(received));
        if checked {
            mask = None;
        } else if let Some(key) = mask
            && (is_text || !self.config.keep_opaque_masked)
        {
            apply_mask(piece, key);
            mask = None;
        }
        if is_text {
            self.utf8.feed(piece)?;
        }
        let received = received + len as u64;
        let frame_end = received == header.payload_len;
        let message_end = frame_end && header.fin;
        if frame_end {
            self.state = State::Header;
            if message_end {
                if is_text {
                    self.utf8.finish()?;
                }
                self.message = None;
            }
        } else {
            self.state = State::Payload {
                header,
                received,
                checked,
            };
        }
        let item = Item::Payload(Payload {
            len,
            mask,
            frame_end,
            message_end,
        });
        Ok(Some(Decoded {
            item,
            consumed: len,
        }))
    }
}

#[cfg(test)]
mod tests;
