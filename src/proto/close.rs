//! Close codes (RFC 6455 §7.4) and close frame payloads (§5.5.1).

use super::error::ProtocolError;
use super::frame::{ControlFrame, MAX_CONTROL_PAYLOAD, MaskKey, OpCode};

/// A status code carried by a close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: Self = Self(1000);
    pub const GOING_AWAY: Self = Self(1001);
    pub const PROTOCOL_ERROR: Self = Self(1002);
    pub const UNSUPPORTED_DATA: Self = Self(1003);
    /// Never sent: "no status code was present" (§7.4.1).
    pub const NO_STATUS: Self = Self(1005);
    /// Never sent: "the connection was closed abnormally" (§7.4.1).
    pub const ABNORMAL: Self = Self(1006);
    pub const INVALID_PAYLOAD: Self = Self(1007);
    pub const POLICY_VIOLATION: Self = Self(1008);
    pub const TOO_BIG: Self = Self(1009);
    pub const MANDATORY_EXTENSION: Self = Self(1010);
    pub const INTERNAL_ERROR: Self = Self(1011);
    pub const SERVICE_RESTART: Self = Self(1012);
    pub const TRY_AGAIN_LATER: Self = Self(1013);
    pub const BAD_GATEWAY: Self = Self(1014);

    /// Whether the code may appear in a close frame on the wire (§7.4.1, §7.4.2, and the IANA
    /// registry, which added 1012-1014): 1000-1003, 1007-1014, 3000-4999.
    pub const fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }

    /// The code of the reply to a close that carried this one: echoed (§5.5.1), or 1000 for a
    /// close that carried none.
    pub const fn reply(self) -> CloseCode {
        if self.0 == Self::NO_STATUS.0 {
            Self::NORMAL
        } else {
            self
        }
    }

    /// This code if a close frame may carry it, else 1000 (1005, 1006 and 1015 only report
    /// what happened; they never go on the wire).
    pub const fn or_normal_on_wire(self) -> CloseCode {
        if self.is_valid_on_wire() {
            self
        } else {
            Self::NORMAL
        }
    }
}

/// Longest close reason: a control payload is at most 125 bytes and the code takes 2.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

/// A received close payload, validated: `None` code means an empty payload (reported as 1005).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClosePayload<'a> {
    pub code: Option<CloseCode>,
    pub reason: &'a str,
}

/// Validates a close frame's (unmasked) payload: empty, or a valid code followed by UTF-8.
pub fn parse_close_payload(payload: &[u8]) -> Result<ClosePayload<'_>, ProtocolError> {
    match payload {
        [] => Ok(ClosePayload {
            code: None,
            reason: "",
        }),
        [_] => Err(ProtocolError::CloseLengthOne),
        [hi, lo, reason @ ..] => {
            let code = CloseCode(u16::from_be_bytes([*hi, *lo]));
            if !code.is_valid_on_wire() {
                return Err(ProtocolError::InvalidCloseCode(code.0));
            }
            let reason = simdutf8::basic::from_utf8(reason)
                .map_err(|_| ProtocolError::InvalidCloseReason)?;
            Ok(ClosePayload {
                code: Some(code),
                reason,
            })
        }
    }
}

/// Cuts `reason` to at most `max` bytes without splitting a character.
pub fn truncate_utf8(reason: &str, max: usize) -> &str {
    if reason.len() <= max {
        return reason;
    }
    let mut end = max;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// A close frame with `code` and `reason`, the reason cut at a character boundary to fit in a
/// control frame. `mask` is required when the frame is sent by a client.
pub fn close_frame(code: CloseCode, reason: &str, mask: Option<MaskKey>) -> ControlFrame {
    let reason = truncate_utf8(reason, MAX_CLOSE_REASON);
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.0.to_be_bytes());
    payload[2..2 + reason.len()].copy_from_slice(reason.as_bytes());
    ControlFrame::new(OpCode::Close, &payload[..2 + reason.len()], mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::mask::apply_mask;

    #[test]
    fn wire_validity_of_every_code() {
        for code in 0..=u16::MAX {
            let expected = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            assert_eq!(CloseCode(code).is_valid_on_wire(), expected, "code {code}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            let payload = u16::to_be_bytes(bad);
            assert_eq!(
                parse_close_payload(&payload),
                Err(ProtocolError::InvalidCloseCode(bad))
            );
        }
    }

    #[test]
    fn close_payload_rules() {
        assert_eq!(parse_close_payload(&[]).unwrap().code, None);
        assert_eq!(
            parse_close_payload(&[3]).unwrap_err().close_code(),
            CloseCode::PROTOCOL_ERROR
        );
        let ok = parse_close_payload(b"\x03\xe8bye").unwrap();
        assert_eq!((ok.code, ok.reason), (Some(CloseCode::NORMAL), "bye"));
        let bad = parse_close_payload(
            b"\x03\xe8\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80",
        );
        assert_eq!(bad, Err(ProtocolError::InvalidCloseReason));
        assert_eq!(bad.unwrap_err().close_code(), CloseCode::INVALID_PAYLOAD);
    }

    #[test]
    fn reason_is_cut_at_a_character_boundary() {
        let reason = "é".repeat(100); // 200 bytes of 2-byte characters
        let frame = close_frame(CloseCode::GOING_AWAY, &reason, None);
        let payload = &frame.as_bytes()[2..];
        assert_eq!(frame.as_bytes()[1] as usize, payload.len());
        assert_eq!(payload.len(), 2 + 122, "123 would split a character");
        let parsed = parse_close_payload(payload).unwrap();
        assert_eq!(parsed.reason.len(), 122);
        let exact = "a".repeat(200);
        let frame = close_frame(CloseCode::NORMAL, &exact, None);
        assert_eq!(frame.as_bytes().len(), 2 + 125);
    }

    #[test]
    fn masked_close_frame_unmasks_to_the_payload() {
        let key = MaskKey([1, 2, 3, 4]);
        let frame = close_frame(CloseCode::NORMAL, "done", Some(key));
        let bytes = frame.as_bytes();
        assert_eq!(bytes[0], 0x88);
        assert_eq!(bytes[1], 0x80 | 6);
        assert_eq!(&bytes[2..6], &key.0);
        let mut payload = bytes[6..].to_vec();
        apply_mask(&mut payload, key);
        assert_eq!(payload, b"\x03\xe8done");
    }
}
