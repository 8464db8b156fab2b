//! Incremental UTF-8 validation of text messages (RFC 6455 §8.1), across frames and across
//! payload chunks, failing at the first chunk that contains an invalid sequence.
//!
//! Each chunk is split into a body, validated by simdutf8's SIMD validator, and an incomplete
//! trailing character of at most 3 bytes, which is kept (in 4 bytes of state) and completed by
//! the next chunk. A message is valid when every chunk was accepted and `finish` finds no
//! incomplete character left.

use super::error::ProtocolError;

/// Validator state for one text message: at most one incomplete character.
#[derive(Debug, Clone, Copy, Default)]
pub struct Utf8Validator {
    partial: [u8; 4],
    partial_len: u8,
}

/// The length of the sequence a lead byte starts, or `None` if it cannot start one.
const fn sequence_len(lead: u8) -> Option<usize> {
    match lead {
        0x00..=0x7F => Some(1),
        0xC2..=0xDF => Some(2),
        0xE0..=0xEF => Some(3),
        0xF0..=0xF4 => Some(4),
        _ => None,
    }
}

const fn is_continuation(byte: u8) -> bool {
    byte & 0xC0 == 0x80
}

/// Where the incomplete character at the end of `bytes` starts, if it ends with one.
fn incomplete_tail_start(bytes: &[u8]) -> Option<usize> {
    let len = bytes.len();
    for back in 1..=3.min(len) {
        let at = len - back;
        if is_continuation(bytes[at]) {
            continue;
        }
        return match sequence_len(bytes[at]) {
            Some(needed) if needed > back => Some(at),
            _ => None,
        };
    }
    None
}

impl Utf8Validator {
    pub const fn new() -> Self {
        Self {
            partial: [0; 4],
            partial_len: 0,
        }
    }

    /// Validates the next piece of the message.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), ProtocolError> {
        if self.partial_len > 0 {
            chunk = self.complete_partial(chunk)?;
            if self.partial_len > 0 {
                return Ok(()); // `chunk` was too short to finish the character
            }
        }
        let body_end = incomplete_tail_start(chunk).unwrap_or(chunk.len());
        let (body, tail) = chunk.split_at(body_end);
        simdutf8::basic::from_utf8(body).map_err(|_| ProtocolError::InvalidUtf8)?;
        if !tail.is_empty() {
            // The tail's lead byte is valid, but "E0 80" or "F4 90" can already be wrong.
            Self::check_prefix(tail)?;
            self.partial[..tail.len()].copy_from_slice(tail);
            self.partial_len = tail.len() as u8;
        }
        Ok(())
    }

    /// Ends the message: an incomplete character at the end is invalid.
    pub fn finish(&mut self) -> Result<(), ProtocolError> {
        let complete = self.partial_len == 0;
        *self = Self::new();
        if complete {
            Ok(())
        } else {
            Err(ProtocolError::InvalidUtf8)
        }
    }

    /// Feeds bytes from `chunk` into the held partial character; returns the rest of `chunk`.
    fn complete_partial<'c>(&mut self, chunk: &'c [u8]) -> Result<&'c [u8], ProtocolError> {
        let have = self.partial_len as usize;
        let needed = sequence_len(self.partial[0]).unwrap_or(1);
        let take = (needed - have).min(chunk.len());
        self.partial[have..have + take].copy_from_slice(&chunk[..take]);
        let filled = have + take;
        if filled == needed {
            std::str::from_utf8(&self.partial[..filled]).map_err(|_| ProtocolError::InvalidUtf8)?;
            self.partial_len = 0;
        } else {
            Self::check_prefix(&self.partial[..filled])?;
            self.partial_len = filled as u8;
        }
        Ok(&chunk[take..])
    }

    /// Accepts `bytes` only if they can start a valid character.
    fn check_prefix(bytes: &[u8]) -> Result<(), ProtocolError> {
        match std::str::from_utf8(bytes) {
            Err(e) if e.error_len().is_none() && e.valid_up_to() == 0 => Ok(()),
            _ => Err(ProtocolError::InvalidUtf8),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn validate_in_pieces(bytes: &[u8], cuts: &[usize]) -> Result<(), ProtocolError> {
        let mut validator = Utf8Validator::new();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            validator.feed(&bytes[start..cut])?;
            start = cut;
        }
        validator.finish()
    }

    /// Autobahn 6.x style inputs, at every single split point.
    #[test]
    fn every_split_point_agrees_with_std() {
        let cases: &[&[u8]] = &[
            "κόσμε".as_bytes(),
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80\x65\x64\x69\x74\x65\x64",
            b"\xf0\x90\x80\x80",
            b"\xf4\x8f\xbf\xbf",
            b"\xf4\x90\x80\x80",
            b"\xe0\x80\xaf",
            b"\xed\xa0\x80",
            b"\xc0\xaf",
            b"\xff",
            b"\x80",
            b"ab\xe2\x82",
            b"Hello-\xc2\xb5@\xc3\x9f\xc3\xb6\xc3\xa4\xc3\xbc\xc3\xa0\xc3\xa1-UTF-8!!",
        ];
        for &case in cases {
            let expected = std::str::from_utf8(case).is_ok();
            assert_eq!(validate_in_pieces(case, &[]).is_ok(), expected, "{case:x?}");
            for cut in 0..=case.len() {
                assert_eq!(
                    validate_in_pieces(case, &[cut]).is_ok(),
                    expected,
                    "{case:x?} @ {cut}"
                );
            }
            let every_byte: Vec<usize> = (1..case.len()).collect();
            assert_eq!(validate_in_pieces(case, &every_byte).is_ok(), expected);
        }
    }

    #[test]
    fn fails_fast_on_an_early_invalid_byte() {
        let mut validator = Utf8Validator::new();
        assert!(validator.feed(b"valid \xce").is_ok());
        assert_eq!(
            validator.feed(b"\x41 and more"),
            Err(ProtocolError::InvalidUtf8)
        );
        let mut validator = Utf8Validator::new();
        // "\xed\xa0" is a surrogate prefix: already invalid before the third byte arrives.
        assert_eq!(validator.feed(b"\xed\xa0"), Err(ProtocolError::InvalidUtf8));
    }

    #[test]
    fn incomplete_character_at_message_end_is_invalid() {
        let mut validator = Utf8Validator::new();
        validator.feed(b"abc\xe2\x82").unwrap();
        assert_eq!(validator.finish(), Err(ProtocolError::InvalidUtf8));
        // finish resets: the next message starts clean.
        validator.feed(b"ok").unwrap();
        assert_eq!(validator.finish(), Ok(()));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_and_splits_agree_with_std(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            points.sort_unstable();
            let expected = std::str::from_utf8(&bytes).is_ok();
            prop_assert_eq!(validate_in_pieces(&bytes, &points).is_ok(), expected);
        }

        #[test]
        fn valid_text_in_any_split_is_valid(
            text in "\\PC{0,40}",
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let bytes = text.as_bytes();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            points.sort_unstable();
            prop_assert!(validate_in_pieces(bytes, &points).is_ok());
        }
    }
}
