//! Frame headers (RFC 6455 §5.2): parsing from a borrowed slice and encoding into a fixed array.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-------+-+-------------+-------------------------------+
//! |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
//! |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
//! |N|V|V|V|       |S|             |   (if payload len==126/127)   |
//! | |1|2|3|       |K|             |                               |
//! +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
//! |     Extended payload length continued, if payload len == 127  |
//! + - - - - - - - - - - - - - - - +-------------------------------+
//! |                               |Masking-key, if MASK set to 1  |
//! +-------------------------------+-------------------------------+
//! ```
//!
//! `FrameHeader::parse` applies the rules that need no context (opcode, control frame shape,
//! length encoding). Rules that depend on the role, the negotiated extensions or the message in
//! progress live in [`super::decoder`].

use super::error::ProtocolError;

/// Largest control frame payload (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Longest header: 2 bytes, a 64-bit length and a mask key.
pub const MAX_HEADER_LEN: usize = 2 + 8 + 4;

pub(super) const FIN: u8 = 0x80;
/// RSV1, used by permessage-deflate (RFC 7692) to flag a compressed message.
pub const RSV1: u8 = 0x40;
pub(super) const RSV_ALL: u8 = 0x70;
pub(super) const MASKED: u8 = 0x80;

/// A frame opcode. Reserved opcodes never get this far: parsing rejects them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    /// Parses the low nibble of the first header byte.
    pub const fn from_bits(bits: u8) -> Result<Self, ProtocolError> {
        Ok(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            other => return Err(ProtocolError::ReservedOpcode(other)),
        })
    }

    pub const fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Control frames (close, ping, pong) may interleave with a fragmented message (§5.5).
    pub const fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// A 32-bit masking key (§5.3), as the four bytes that are XORed onto payload bytes 0, 1, 2, 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MaskKey(pub [u8; 4]);

impl MaskKey {
    /// The key as it applies to a payload piece that starts `offset` bytes into the frame,
    /// so that a chunk can be (un)masked on its own with phase 0.
    pub const fn rotated(self, offset: u64) -> Self {
        let word = u32::from_be_bytes(self.0).rotate_left(((offset % 4) * 8) as u32);
        Self(word.to_be_bytes())
    }

    /// The key that turns bytes masked with `self` into bytes masked with `other` in one pass.
    pub const fn xor(self, other: Self) -> Self {
        let [a, b, c, d] = self.0;
        let [e, f, g, h] = other.0;
        Self([a ^ e, b ^ f, c ^ g, d ^ h])
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// The RSV1-3 bits in their wire positions (`0x40`, `0x20`, `0x10`).
    pub rsv: u8,
    pub opcode: OpCode,
    pub mask: Option<MaskKey>,
    pub payload_len: u64,
}

impl FrameHeader {
    pub const fn new(fin: bool, opcode: OpCode, mask: Option<MaskKey>, payload_len: u64) -> Self {
        Self {
            fin,
            rsv: 0,
            opcode,
            mask,
            payload_len,
        }
    }

    /// Parses a header from the start of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` holds only part of a header (nothing is consumed: call again
    /// with more bytes), or the header and its length in bytes. Never allocates. Checks, in
    /// order: reserved opcode, control frame fragmented or over 125 bytes, and a 64-bit length
    /// with the high bit set (§5.2: "the most significant bit MUST be 0").
    pub fn parse(buf: &[u8]) -> Result<Option<(Self, usize)>, ProtocolError> {
        let [b0, b1, rest @ ..] = buf else {
            return Ok(None);
        };
        let fin = b0 & FIN != 0;
        let opcode = OpCode::from_bits(b0 & 0x0F)?;
        let short_len = b1 & 0x7F;
        if opcode.is_control() {
            if !fin {
                return Err(ProtocolError::ControlFrameFragmented);
            }
            if short_len as usize > MAX_CONTROL_PAYLOAD {
                return Err(ProtocolError::ControlFrameTooLong);
            }
        }
        let (payload_len, rest, len_bytes) = match short_len {
            126 => match rest {
                [a, b, rest @ ..] => (u16::from_be_bytes([*a, *b]) as u64, rest, 2),
                _ => return Ok(None),
            },
            127 => match rest.split_first_chunk::<8>() {
                Some((bytes, rest)) => {
                    let len = u64::from_be_bytes(*bytes);
                    if len >> 63 != 0 {
                        return Err(ProtocolError::LengthOverflow);
                    }
                    (len, rest, 8)
                }
                None => return Ok(None),
            },
            len => (len as u64, rest, 0),
        };
        let (mask, mask_bytes) = if b1 & MASKED != 0 {
            match rest.first_chunk::<4>() {
                Some(key) => (Some(MaskKey(*key)), 4),
                None => return Ok(None),
            }
        } else {
            (None, 0)
        };
        let header = Self {
            fin,
            rsv: b0 & RSV_ALL,
            opcode,
            mask,
            payload_len,
        };
        Ok(Some((header, 2 + len_bytes + mask_bytes)))
    }

    /// The number of bytes `encode_into` writes.
    pub const fn encoded_len(&self) -> usize {
        let len_bytes = match self.payload_len {
            0..=125 => 0,
            126..=0xFFFF => 2,
            _ => 8,
        };
        2 + len_bytes + if self.mask.is_some() { 4 } else { 0 }
    }

    /// Writes the header (shortest length encoding, as §5.2 requires) to the start of `out` and
    /// returns the number of bytes written.
    ///
    /// # Panics
    /// If `out` is shorter than `encoded_len()` (at most [`MAX_HEADER_LEN`]): a caller bug.
    pub fn encode_into(&self, out: &mut [u8]) -> usize {
        let b0 = (if self.fin { FIN } else { 0 }) | (self.rsv & RSV_ALL) | self.opcode.bits();
        let mask_bit = if self.mask.is_some() { MASKED } else { 0 };
        out[0] = b0;
        let mut at = 2;
        match self.payload_len {
            len @ 0..=125 => out[1] = mask_bit | len as u8,
            len @ 126..=0xFFFF => {
                out[1] = mask_bit | 126;
                out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                at = 4;
            }
            len => {
                out[1] = mask_bit | 127;
                out[2..10].copy_from_slice(&len.to_be_bytes());
                at = 10;
            }
        }
        if let Some(key) = self.mask {
            out[at..at + 4].copy_from_slice(&key.0);
            at += 4;
        }
        at
    }

    /// Encodes into a fixed array; no allocation.
    pub fn encode(&self) -> EncodedHeader {
        let mut bytes = [0u8; MAX_HEADER_LEN];
        let len = self.encode_into(&mut bytes);
        EncodedHeader {
            bytes,
            len: len as u8,
        }
    }
}

/// An encoded header, at most [`MAX_HEADER_LEN`] bytes, held by value.
#[derive(Debug, Clone, Copy)]
pub struct EncodedHeader {
    bytes: [u8; MAX_HEADER_LEN],
    len: u8,
}

impl EncodedHeader {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// A complete control frame (header and at most 125 bytes of payload) held by value, so that
/// building a ping, pong or close frame never allocates.
#[derive(Clone, Copy)]
pub struct ControlFrame {
    bytes: [u8; Self::CAPACITY],
    len: u8,
    opcode: OpCode,
}

impl ControlFrame {
    /// 2-byte header, 4-byte mask, 125-byte payload.
    pub const CAPACITY: usize = 2 + 4 + MAX_CONTROL_PAYLOAD;

    /// A control frame carrying `payload` (cut to 125 bytes: callers pass validated payloads),
    /// masked with `mask` when sent by a client.
    pub fn new(opcode: OpCode, payload: &[u8], mask: Option<MaskKey>) -> Self {
        debug_assert!(opcode.is_control() && payload.len() <= MAX_CONTROL_PAYLOAD);
        let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
        let header = FrameHeader::new(true, opcode, mask, payload.len() as u64);
        let mut bytes = [0u8; Self::CAPACITY];
        let header_len = header.encode_into(&mut bytes);
        let end = header_len + payload.len();
        bytes[header_len..end].copy_from_slice(payload);
        if let Some(key) = mask {
            super::mask::apply_mask(&mut bytes[header_len..end], key);
        }
        Self {
            bytes,
            len: end as u8,
            opcode,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    pub fn opcode(&self) -> OpCode {
        self.opcode
    }
}

impl std::fmt::Debug for ControlFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ControlFrame")
            .field(&self.as_bytes())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6455 §5.7 examples: header bytes → expected header.
    #[test]
    fn rfc_examples_parse() {
        // A single-frame unmasked text message "Hello".
        let (h, n) = FrameHeader::parse(&[0x81, 0x05, 0x48, 0x65])
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.mask, h.payload_len, n),
            (true, OpCode::Text, None, 5, 2)
        );
        // A single-frame masked text message "Hello".
        let (h, n) = FrameHeader::parse(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d])
            .unwrap()
            .unwrap();
        assert_eq!(h.mask, Some(MaskKey([0x37, 0xfa, 0x21, 0x3d])));
        assert_eq!((h.payload_len, n), (5, 6));
        // A fragmented unmasked text message: "Hel" then "lo".
        let (h, _) = FrameHeader::parse(&[0x01, 0x03]).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode), (false, OpCode::Text));
        let (h, _) = FrameHeader::parse(&[0x80, 0x02]).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode), (true, OpCode::Continuation));
        // Unmasked ping and masked pong with "Hello".
        let (h, _) = FrameHeader::parse(&[0x89, 0x05]).unwrap().unwrap();
        assert_eq!(h.opcode, OpCode::Ping);
        let (h, _) = FrameHeader::parse(&[0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d])
            .unwrap()
            .unwrap();
        assert_eq!(h.opcode, OpCode::Pong);
        // 256 bytes binary message in a single unmasked frame.
        let (h, n) = FrameHeader::parse(&[0x82, 0x7E, 0x01, 0x00])
            .unwrap()
            .unwrap();
        assert_eq!((h.opcode, h.payload_len, n), (OpCode::Binary, 256, 4));
        // 64KiB binary message in a single unmasked frame.
        let bytes = [0x82, 0x7F, 0, 0, 0, 0, 0, 0x01, 0, 0];
        let (h, n) = FrameHeader::parse(&bytes).unwrap().unwrap();
        assert_eq!((h.payload_len, n), (65536, 10));
    }

    #[test]
    fn every_prefix_of_a_header_is_incomplete() {
        for header in [
            FrameHeader::new(true, OpCode::Text, Some(MaskKey([9, 8, 7, 6])), 5),
            FrameHeader::new(false, OpCode::Binary, Some(MaskKey([1, 2, 3, 4])), 300),
            FrameHeader::new(true, OpCode::Binary, None, 1 << 40),
        ] {
            let encoded = header.encode();
            let bytes = encoded.as_bytes();
            for cut in 0..bytes.len() {
                assert_eq!(FrameHeader::parse(&bytes[..cut]), Ok(None), "prefix {cut}");
            }
            assert_eq!(FrameHeader::parse(bytes), Ok(Some((header, bytes.len()))));
        }
    }

    #[test]
    fn length_encodings_are_minimal_at_every_boundary() {
        for (len, expected) in [(0, 2), (125, 2), (126, 4), (0xFFFF, 4), (0x1_0000, 10)] {
            let header = FrameHeader::new(true, OpCode::Binary, None, len);
            assert_eq!(header.encode().as_bytes().len(), expected, "len {len}");
            assert_eq!(header.encoded_len(), expected);
            let (parsed, _) = FrameHeader::parse(header.encode().as_bytes())
                .unwrap()
                .unwrap();
            assert_eq!(parsed.payload_len, len);
        }
    }

    #[test]
    fn length_with_high_bit_is_rejected() {
        let bytes = [0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            FrameHeader::parse(&bytes),
            Err(ProtocolError::LengthOverflow)
        );
        let max = [0x82, 0x7F, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        let (h, _) = FrameHeader::parse(&max).unwrap().unwrap();
        assert_eq!(h.payload_len, i64::MAX as u64);
    }

    #[test]
    fn reserved_opcodes_are_rejected() {
        for op in (0x3..=0x7).chain(0xB..=0xF) {
            assert_eq!(
                FrameHeader::parse(&[0x80 | op, 0]),
                Err(ProtocolError::ReservedOpcode(op))
            );
        }
    }

    #[test]
    fn control_frame_shape_is_checked() {
        assert_eq!(
            FrameHeader::parse(&[0x09, 0]),
            Err(ProtocolError::ControlFrameFragmented)
        );
        assert_eq!(
            FrameHeader::parse(&[0x89, 126]),
            Err(ProtocolError::ControlFrameTooLong)
        );
        assert!(FrameHeader::parse(&[0x89, 125]).unwrap().is_some());
    }

    #[test]
    fn rotated_key_matches_offset_masking() {
        let key = MaskKey([1, 2, 3, 4]);
        assert_eq!(key.rotated(0), key);
        assert_eq!(key.rotated(1), MaskKey([2, 3, 4, 1]));
        assert_eq!(key.rotated(6), MaskKey([3, 4, 1, 2]));
    }
}
