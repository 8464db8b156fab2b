//! Why a peer's bytes were rejected, and the close code that says so on the wire.

use super::close::CloseCode;
use std::fmt;

/// A violation of RFC 6455 (or of a configured limit) by the peer that sent the bytes.
///
/// `Copy` and allocation-free: the decoder returns it on the hot path and the relay turns it
/// into a close frame (`close_code`) with a short reason (`reason`, at most 123 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// RSV1-3 set without an extension that defines them (§5.2).
    ReservedBitsSet,
    /// Opcode 0x3-0x7 or 0xB-0xF (§5.2).
    ReservedOpcode(u8),
    /// A control frame with more than 125 bytes of payload (§5.5).
    ControlFrameTooLong,
    /// A control frame with FIN clear (§5.5).
    ControlFrameFragmented,
    /// A client frame without a mask (§5.1).
    UnmaskedClientFrame,
    /// A server frame with a mask (§5.1).
    MaskedServerFrame,
    /// A 64-bit length with the most significant bit set (§5.2).
    LengthOverflow,
    /// A continuation frame with no message in progress (§5.4).
    UnexpectedContinuation,
    /// A text or binary frame while a fragmented message is in progress (§5.4).
    ExpectedContinuation,
    /// A close frame with a 1-byte payload (§5.5.1).
    CloseLengthOne,
    /// A close code that must not appear on the wire (§7.4).
    InvalidCloseCode(u16),
    /// Invalid UTF-8 in a close reason (§5.5.1) — close code 1007.
    InvalidCloseReason,
    /// Invalid UTF-8 in a text message (§8.1) — close code 1007.
    InvalidUtf8,
    /// A compressed-bit (RSV1) on a continuation or control frame (RFC 7692 §6).
    CompressedContinuation,
    /// A frame payload above the configured limit — close code 1009.
    FrameTooLarge { len: u64, max: u64 },
    /// A message (sum of fragments) above the configured limit — close code 1009.
    MessageTooLarge { len: u64, max: u64 },
}

impl ProtocolError {
    /// The close code the receiver must send (RFC 6455 §7.4.1).
    pub const fn close_code(self) -> CloseCode {
        match self {
            Self::InvalidUtf8 | Self::InvalidCloseReason => CloseCode::INVALID_PAYLOAD,
            Self::FrameTooLarge { .. } | Self::MessageTooLarge { .. } => CloseCode::TOO_BIG,
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }

    /// A short, static reason for the close frame and the logs.
    pub const fn reason(self) -> &'static str {
        match self {
            Self::ReservedBitsSet => "reserved bits set without a negotiated extension",
            Self::ReservedOpcode(_) => "reserved opcode",
            Self::ControlFrameTooLong => "control frame payload over 125 bytes",
            Self::ControlFrameFragmented => "fragmented control frame",
            Self::UnmaskedClientFrame => "unmasked frame from client",
            Self::MaskedServerFrame => "masked frame from server",
            Self::LengthOverflow => "64-bit payload length with the high bit set",
            Self::UnexpectedContinuation => "continuation frame without a message in progress",
            Self::ExpectedContinuation => "new data frame inside a fragmented message",
            Self::CloseLengthOne => "close frame with a 1-byte payload",
            Self::InvalidCloseCode(_) => "invalid close code",
            Self::InvalidCloseReason => "invalid UTF-8 in close reason",
            Self::InvalidUtf8 => "invalid UTF-8 in text message",
            Self::CompressedContinuation => "RSV1 set on a continuation or control frame",
            Self::FrameTooLarge { .. } => "frame too large",
            Self::MessageTooLarge { .. } => "message too large",
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ReservedOpcode(op) => write!(f, "reserved opcode {op:#x}"),
            Self::InvalidCloseCode(code) => write!(f, "invalid close code {code}"),
            Self::FrameTooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the limit of {max}")
            }
            Self::MessageTooLarge { len, max } => {
                write!(
                    f,
                    "message of at least {len} bytes exceeds the limit of {max}"
                )
            }
            other => f.write_str(other.reason()),
        }
    }
}

impl std::error::Error for ProtocolError {}
