//! The client's credentials as the relay enforces them, on routes with `auth.jwt`: the instant
//! they expire, and a new token the client may present in-band (`auth.jwt.refresh`).
//!
//! The refresh message is one unfragmented text message of at most [`MAX_REFRESH_MESSAGE`]
//! bytes, exactly `{"wsgate":"refresh","token":"<token>"}` (what `JSON.stringify` makes of
//! `{wsgate: "refresh", token}`). It is the one message the gateway consumes: the relay takes
//! it out of the client's stream, so the backend never sees it, and hands the token to the
//! driver, which checks it and answers with [`Refresh`].
//!
//! Invariants:
//! - a refresh message is recognised whatever the reads it arrives in: while refreshing is on,
//!   a text frame that could be one waits in the hop buffer until it is whole (it is small, so
//!   it always fits), and its header is never forwarded first;
//! - at most one token waits for its check, and a client presents at most one per
//!   [`MIN_REFRESH_INTERVAL`] (sooner is 1008): a flood of refreshes cannot buy signature
//!   checks at line rate;
//! - nothing else changes: other messages, and every message on routes without `refresh`, are
//!   relayed as before.

use crate::proto::CloseCode;
use std::time::{Duration, Instant};

/// The refresh message before the token.
const PREFIX: &[u8] = br#"{"wsgate":"refresh","token":""#;
/// The refresh message after the token.
const SUFFIX: &[u8] = br#""}"#;
/// The largest refresh message: a token of a few KiB is already a very large JWT.
pub const MAX_REFRESH_MESSAGE: usize = 8 * 1024;

/// A client presents at most one token per this long; a second one sooner is closed with 1008
/// (each costs a signature check: up to a few tens of microseconds for RSA).
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// The client hop's credentials (boxed on the hop: only routes with auth pay for them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// When the connection is closed for expiry (`None`: never).
    pub expires_at: Option<Instant>,
    /// The code the client gets then (the route's `expired_close_code`).
    pub expired_code: CloseCode,
    /// Whether the client may present a new token in-band.
    pub refresh: bool,
    /// A token presented and not yet checked.
    pub presented: Option<Box<str>>,
    /// When the last token was presented.
    pub last_presented: Option<Instant>,
}

/// The driver's verdict on a presented token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Valid, for the same subject: the connection now expires at this instant (`None`: a
    /// token whose expiry is not enforced).
    Extended(Option<Instant>),
    /// Invalid, expired, or another subject's: the connection is closed with 1008.
    Refused,
}

/// Checks a presented token (the route's keys and rules, the connection's subject): owned by
/// the driver, called outside the state machine.
pub struct VerifyRefresh(Box<dyn Fn(&str) -> Refresh + Send + Sync>);

impl VerifyRefresh {
    pub fn new(check: impl Fn(&str) -> Refresh + Send + Sync + 'static) -> Self {
        Self(Box::new(check))
    }

    pub fn check(&self, token: &str) -> Refresh {
        (self.0)(token)
    }
}

impl std::fmt::Debug for VerifyRefresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VerifyRefresh")
    }
}

/// The token of `payload` if it is a refresh message.
pub fn refresh_token(payload: &[u8]) -> Option<&str> {
    let token = payload.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    // A JWT is base64url segments joined by dots; anything else (a quote, an escape) is an
    // ordinary message that happens to start alike.
    let plain = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    if token.is_empty() || !token.iter().all(plain) {
        return None;
    }
    std::str::from_utf8(token).ok()
}

/// The length of the frame that starts `buf` (`None` while its header is incomplete) if that
/// frame may be a refresh message: a final, unfragmented text frame without reserved bits and
/// of at most [`MAX_REFRESH_MESSAGE`] payload bytes. Such a frame is kept until it is whole.
pub fn refresh_candidate_len(buf: &[u8]) -> Option<usize> {
    let (&b0, rest) = buf.split_first()?;
    let &b1 = rest.first()?;
    // FIN, no reserved bits, opcode text.
    if b0 != 0x81 {
        return None;
    }
    let mask_len = if b1 & 0x80 != 0 { 4 } else { 0 };
    let (payload_len, len_bytes) = match b1 & 0x7F {
        127 => return None,
        126 => {
            let &[hi, lo] = buf.get(2..4)? else {
                return None;
            };
            (usize::from(u16::from_be_bytes([hi, lo])), 2)
        }
        len => (usize::from(len), 0),
    };
    if payload_len < PREFIX.len() + SUFFIX.len() || payload_len > MAX_REFRESH_MESSAGE {
        return None;
    }
    Some(2 + len_bytes + mask_len + payload_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_message_with_a_plain_token_is_a_refresh() {
        assert_eq!(
            refresh_token(br#"{"wsgate":"refresh","token":"aGk.eW8.c2ln"}"#),
            Some("aGk.eW8.c2ln")
        );
        for other in [
            &br#"{"wsgate":"refresh","token":""}"#[..],
            br#"{"wsgate":"refresh","token":"a\"b"}"#,
            br#"{"wsgate": "refresh","token":"abc"}"#,
            br#"{"wsgate":"refresh","token":"abc"} "#,
            br#"{"wsgate":"refresh","token":"abc"#,
            b"hello",
        ] {
            assert_eq!(
                refresh_token(other),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn candidates_are_small_whole_text_frames() {
        let masked = |b0: u8, len: u8| {
            let mut frame = vec![b0, 0x80 | len, 1, 2, 3, 4];
            frame.resize(6 + usize::from(len), b'x');
            frame
        };
        assert_eq!(refresh_candidate_len(&masked(0x81, 40)), Some(46));
        assert_eq!(refresh_candidate_len(&masked(0x81, 40)[..1]), None);
        // Not final, binary, compressed, or too short to be one.
        for b0 in [0x01, 0x82, 0xC1] {
            assert_eq!(refresh_candidate_len(&masked(b0, 40)), None);
        }
        assert_eq!(refresh_candidate_len(&masked(0x81, 10)), None);
        // 16-bit lengths up to the limit, never a 64-bit one.
        let len = MAX_REFRESH_MESSAGE as u16;
        let [hi, lo] = len.to_be_bytes();
        assert_eq!(
            refresh_candidate_len(&[0x81, 0xFE, hi, lo, 1, 2, 3, 4]),
            Some(8 + MAX_REFRESH_MESSAGE)
        );
        let [hi, lo] = (len + 1).to_be_bytes();
        assert_eq!(refresh_candidate_len(&[0x81, 0xFE, hi, lo]), None);
        assert_eq!(refresh_candidate_len(&[0x81, 0xFF, 0, 0, 0, 0]), None);
    }
}
