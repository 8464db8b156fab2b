//! Fuzz harnesses, one per target in `fuzz/fuzz_targets/`.
//!
//! They live in the library (compiled only under `--cfg fuzzing`, which cargo fuzz sets) so
//! that they can reach the same items the relay uses and so that a target file stays a one-line
//! call. Each harness asserts properties, not just the absence of panics: a failed `assert!` is
//! a finding.
//!
//! The byte-level harnesses read their parameters from the front of the input with [`Input`],
//! which yields zeros past the end: every input is meaningful, and a hand-written seed is
//! simply the parameter bytes followed by the payload.

// A harness reports a finding by panicking: its asserts, expects and panics are the properties
// fuzzing checks, not error handling.
#![allow(clippy::expect_used, clippy::panic)]

use crate::proto::close::{MAX_CLOSE_REASON, truncate_utf8};
use crate::proto::frame::RSV1;
use crate::proto::handshake::{
    self, ClientRequest, HandshakeError, key_from_random, parse_request, parse_response,
    validate_response, validate_upgrade, write_accept_response, write_error_response,
    write_request,
};
use crate::proto::mask::apply_mask_naive;
use crate::proto::{
    CloseCode, ControlFrame, Decoded, DecoderConfig, FrameDecoder, FrameHeader, Item,
    MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, MIN_BUFFER_LEN, MaskKey, OpCode, Payload, ProtocolError,
    Role, Utf8Validator, WholeMessage, apply_mask, close_frame, parse_close_payload, remask,
};
use httparse::EMPTY_HEADER;

/// Parameters taken from the front of a fuzz input.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&first, rest)) => {
                self.data = rest;
                first
            }
            None => 0,
        }
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        std::array::from_fn(|_| self.byte())
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    fn rest(self) -> &'a [u8] {
        self.data
    }
}

/// A read size byte: 0 means "whatever fits", so a single zero gives whole-buffer reads.
fn read_size(byte: u8) -> usize {
    if byte == 0 { usize::MAX } else { byte as usize }
}

/// Feeds `stream` to `decoder` through one fixed buffer of `capacity` bytes, reading
/// `read_size(reads[i])` bytes at a time (cycled), compacting whenever `decode` asks for more:
/// the relay's loop. `visit` sees each result with the unread part of the buffer as `decode`
/// left it, the stream offset of that part's first byte, and whether the decoder now says it is
/// between frames and between messages. Returns the error decoding stopped at, if any.
///
/// With `fast`, every step first tries [`FrameDecoder::decode_whole_message`], as the relay
/// does, and shows `visit` what it decoded as the two items `decode` would have returned (the
/// header, then one payload piece ending the message), so every check applies to both paths.
///
/// The buffer is the only allocation, so memory cannot follow a length claimed by the peer.
fn drive(
    decoder: &mut FrameDecoder,
    stream: &[u8],
    capacity: usize,
    reads: &[u8],
    fast: bool,
    mut visit: impl FnMut(&Result<Option<Decoded>, ProtocolError>, &[u8], usize, [bool; 2]),
) -> Option<ProtocolError> {
    assert!(capacity >= MIN_BUFFER_LEN);
    let mut buf = vec![0u8; capacity];
    let (mut start, mut end, mut fed) = (0, 0, 0);
    let mut read = 0;
    loop {
        // An item that consumes nothing must change the state so that the next one does:
        // two in a row would mean the loop can spin forever on the same bytes.
        let mut idle_items = 0;
        loop {
            let offset = fed - (end - start);
            if fast {
                let unread = buf[start..end].to_vec();
                match decoder.decode_whole_message(&mut buf[start..end]) {
                    Ok(Some(whole)) => {
                        visit_whole(decoder, &whole, &buf[start..end], offset, &mut visit);
                        start += whole.frame_len();
                        idle_items = 0;
                        continue;
                    }
                    Ok(None) => assert_eq!(buf[start..end], unread, "declined but changed bytes"),
                    Err(error) => {
                        // At the header, with nothing of the frame returned, as `decode` reports
                        // an error in a frame it holds whole.
                        assert!(
                            matches!(FrameHeader::parse(&unread), Ok(Some(_))),
                            "fast path failed without a header"
                        );
                        visit(&Err(error), &unread, offset, [false, false]);
                        return Some(error);
                    }
                }
            }
            let result = decoder.decode(&mut buf[start..end]);
            let between = [decoder.is_between_frames(), decoder.is_between_messages()];
            visit(&result, &buf[start..end], offset, between);
            match result {
                Ok(Some(Decoded { consumed, .. })) => {
                    assert!(consumed <= end - start, "consumed past the slice");
                    start += consumed;
                    idle_items = if consumed == 0 { idle_items + 1 } else { 0 };
                    assert!(idle_items <= 1, "no progress");
                }
                Ok(None) => break,
                Err(error) => return Some(error),
            }
        }
        if fed == stream.len() {
            return None;
        }
        buf.copy_within(start..end, 0);
        end -= start;
        start = 0;
        let want = reads
            .get(read % reads.len().max(1))
            .map_or(usize::MAX, |&b| read_size(b));
        read += 1;
        let n = want.min(capacity - end).min(stream.len() - fed);
        assert!(n > 0, "buffer full and the decoder still wants more");
        buf[end..end + n].copy_from_slice(&stream[fed..fed + n]);
        end += n;
        fed += n;
    }
}

/// Shows `visit` a message from the fast path as the header and payload items of `decode`.
fn visit_whole(
    decoder: &FrameDecoder,
    whole: &WholeMessage,
    slice: &[u8],
    offset: usize,
    visit: &mut impl FnMut(&Result<Option<Decoded>, ProtocolError>, &[u8], usize, [bool; 2]),
) {
    assert!(
        decoder.is_between_messages(),
        "the fast path left a message open"
    );
    assert!(whole.frame_len() <= slice.len(), "consumed past the slice");
    let header = Ok(Some(Decoded {
        item: Item::DataFrame(whole.header),
        consumed: whole.header_len,
    }));
    visit(&header, slice, offset, [false, false]);
    let piece = Payload {
        len: whole.payload_len,
        mask: whole.mask,
        frame_end: true,
        message_end: true,
    };
    let payload = Ok(Some(Decoded {
        item: Item::Payload(piece),
        consumed: whole.payload_len,
    }));
    visit(
        &payload,
        &slice[whole.header_len..],
        offset + whole.header_len,
        [true, true],
    );
}

/// Whether `actual` is `original` XORed with `key` (or equal to it without a key).
fn is_masked_copy(actual: &[u8], original: &[u8], key: Option<MaskKey>) -> bool {
    let key = key.map_or([0; 4], |k| k.0);
    actual.len() == original.len()
        && actual
            .iter()
            .zip(original)
            .enumerate()
            .all(|(i, (a, o))| *a == o ^ key[i % 4])
}

/// The frame in progress, as the harness sees it.
struct OpenFrame {
    header: FrameHeader,
    received: u64,
}

/// The message in progress.
#[derive(Clone)]
struct OpenMessage {
    /// Uncompressed text: validated by the decoder, so checked here against std.
    text: bool,
    len: u64,
    /// The text so far (actual bytes received, bounded by the input), and how much of it std
    /// has already accepted.
    bytes: Vec<u8>,
    checked: usize,
}

impl OpenMessage {
    /// Appends a piece and checks the text so far with std: `Ok(true)` valid, `Ok(false)` a
    /// valid prefix ending in an incomplete character, `Err` an invalid sequence.
    fn push_text(&mut self, piece: &[u8]) -> Result<bool, ()> {
        self.bytes.extend_from_slice(piece);
        match std::str::from_utf8(&self.bytes[self.checked..]) {
            Ok(_) => {
                self.checked = self.bytes.len();
                Ok(true)
            }
            Err(e) if e.error_len().is_none() => {
                self.checked += e.valid_up_to();
                Ok(false)
            }
            Err(_) => Err(()),
        }
    }
}

/// Checks every decoder result against RFC 6455 and the decoder's documented contract.
struct Checker<'s> {
    config: DecoderConfig,
    stream: &'s [u8],
    frame: Option<OpenFrame>,
    message: Option<OpenMessage>,
}

impl Checker<'_> {
    fn check(
        &mut self,
        result: &Result<Option<Decoded>, ProtocolError>,
        slice: &[u8],
        offset: usize,
        [between_frames, between_messages]: [bool; 2],
    ) {
        match result {
            Ok(None) => match &self.frame {
                // Anything longer holds a whole header and any whole control frame.
                None => assert!(slice.len() < MIN_BUFFER_LEN, "stalled on a full buffer"),
                Some(open) => {
                    assert!(slice.is_empty() && open.received < open.header.payload_len)
                }
            },
            Ok(Some(Decoded { item, consumed })) => {
                assert!(*consumed <= slice.len());
                match item {
                    Item::DataFrame(header) => self.data_frame(header, *consumed, slice, offset),
                    Item::Payload(piece) => {
                        assert_eq!(piece.len, *consumed);
                        self.payload(piece, slice, offset);
                    }
                    Item::Control { header, payload } => {
                        assert!(self.frame.is_none(), "control frame inside a data frame");
                        assert_eq!(payload.end, *consumed);
                        self.control(header, &slice[payload.clone()], payload.start, offset);
                    }
                }
                // The decoder's own view of its state must agree with the harness's.
                assert_eq!(between_frames, self.frame.is_none());
                assert_eq!(
                    between_messages,
                    self.frame.is_none() && self.message.is_none()
                );
            }
            Err(error) => self.error(*error, slice, offset),
        }
    }

    fn header_common(&self, header: &FrameHeader) {
        match self.config.role {
            Role::Server => assert!(header.mask.is_some(), "unmasked client frame accepted"),
            Role::Client => assert!(header.mask.is_none(), "masked server frame accepted"),
        }
        let rsv_ok = header.rsv == 0
            || (self.config.compression
                && header.rsv == RSV1
                && matches!(header.opcode, OpCode::Text | OpCode::Binary));
        assert!(rsv_ok, "reserved bits accepted: {header:?}");
    }

    /// The plain payload of the frame whose header starts at stream offset `offset`, if it is
    /// all within `slice` (what the decoder held when it decoded that header).
    fn whole_payload(
        &self,
        header: &FrameHeader,
        header_len: usize,
        slice: &[u8],
        offset: usize,
    ) -> Option<Vec<u8>> {
        let len = usize::try_from(header.payload_len).ok()?;
        if slice.len() - header_len < len {
            return None;
        }
        let start = offset + header_len;
        let mut payload = self.stream[start..start + len].to_vec();
        if let Some(key) = header.mask {
            apply_mask_naive(&mut payload, key);
        }
        Some(payload)
    }

    fn data_frame(&mut self, header: &FrameHeader, consumed: usize, slice: &[u8], offset: usize) {
        assert!(self.frame.is_none(), "a data frame began inside another");
        assert!(!header.opcode.is_control());
        self.header_common(header);
        assert!((header.encoded_len()..=MAX_HEADER_LEN).contains(&consumed));
        assert!(header.payload_len <= self.config.max_frame);
        if header.opcode == OpCode::Continuation {
            assert!(self.message.is_some(), "continuation without a message");
        } else {
            assert!(
                self.message.is_none(),
                "new message inside a fragmented one"
            );
            self.message = Some(OpenMessage {
                text: header.opcode == OpCode::Text && header.rsv & RSV1 == 0,
                len: 0,
                bytes: Vec::new(),
                checked: 0,
            });
        }
        if let Some(message) = &mut self.message {
            message.len = message.len.saturating_add(header.payload_len);
            assert!(
                message.len <= self.config.max_message,
                "message over the limit"
            );
        }
        // A relay forwards the header at once: a text frame held whole must already be known
        // valid (with the end of the message, if it ends it), or the relay could not refuse it
        // cleanly. This covers an empty final frame, whose header alone ends the message.
        let whole = self.whole_payload(header, consumed, slice, offset);
        if let (Some(message), Some(payload)) = (&self.message, whole)
            && message.text
        {
            let mut probe = message.clone();
            match probe.push_text(&payload) {
                Ok(complete) => assert!(complete || !header.fin, "incomplete text ended"),
                Err(()) => panic!("the header of a whole invalid text frame was returned"),
            }
        }
        self.frame = Some(OpenFrame {
            header: *header,
            received: 0,
        });
    }

    fn payload(&mut self, piece: &Payload, slice: &[u8], offset: usize) {
        let (Some(open), Some(message)) = (&mut self.frame, &mut self.message) else {
            panic!("payload outside a data frame");
        };
        assert!(piece.len <= slice.len(), "payload piece past the slice");
        let header = open.header;
        let key_here = header.mask.map(|k| k.rotated(open.received));
        let bytes = &slice[..piece.len];
        let original = &self.stream[offset..offset + piece.len];
        match piece.mask {
            Some(key) => {
                assert!(self.config.keep_opaque_masked && !message.text);
                assert_eq!(Some(key), key_here, "reported key not rotated to the piece");
                assert_eq!(bytes, original, "bytes kept masked were changed");
            }
            None => assert!(is_masked_copy(bytes, original, key_here), "wrong unmasking"),
        }
        open.received += piece.len as u64;
        assert!(
            open.received <= header.payload_len,
            "more payload than the header says"
        );
        assert_eq!(piece.frame_end, open.received == header.payload_len);
        assert_eq!(piece.message_end, piece.frame_end && header.fin);
        if message.text {
            let complete = message
                .push_text(bytes)
                .expect("invalid UTF-8 passed through");
            if piece.message_end {
                assert!(complete, "text message ended inside a character");
                assert!(std::str::from_utf8(&message.bytes).is_ok());
            }
        }
        if piece.frame_end {
            self.frame = None;
            if piece.message_end {
                self.message = None;
            }
        }
    }

    fn control(&mut self, header: &FrameHeader, payload: &[u8], at: usize, offset: usize) {
        assert!(header.opcode.is_control() && header.fin);
        self.header_common(header);
        assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
        assert_eq!(payload.len() as u64, header.payload_len);
        assert!((header.encoded_len()..=MAX_HEADER_LEN).contains(&at));
        let original = &self.stream[offset + at..offset + at + payload.len()];
        assert!(is_masked_copy(payload, original, header.mask));
        if header.opcode == OpCode::Close {
            assert!(parse_close_payload(payload).is_ok());
        }
    }

    /// InvalidUtf8 before a frame's header was returned: only for a text frame held whole that
    /// is invalid or ends the message inside a character. The slice may be unmasked already,
    /// so the stream's bytes are judged.
    fn invalid_utf8_at_header(&self, slice: &[u8], offset: usize) {
        let Ok(Some((header, header_len))) = FrameHeader::parse(slice) else {
            panic!("InvalidUtf8 without a header");
        };
        let Some(payload) = self.whole_payload(&header, header_len, slice, offset) else {
            panic!("InvalidUtf8 at the header of a frame not held whole");
        };
        let mut message = match (header.opcode, &self.message) {
            (OpCode::Continuation, Some(open)) => open.clone(),
            (OpCode::Text, None) if header.rsv & RSV1 == 0 => OpenMessage {
                text: true,
                len: 0,
                bytes: Vec::new(),
                checked: 0,
            },
            _ => panic!("InvalidUtf8 for {header:?} outside a text message"),
        };
        assert!(message.text, "opaque payload validated");
        match message.push_text(&payload) {
            Err(()) => {}
            Ok(complete) => assert!(!complete && header.fin, "valid text rejected"),
        }
    }

    /// An error must be one the bytes justify.
    fn error(&mut self, error: ProtocolError, slice: &[u8], offset: usize) {
        match error {
            ProtocolError::FrameTooLarge { len, max } => {
                assert!(max == self.config.max_frame && len > max)
            }
            ProtocolError::MessageTooLarge { len, max } => {
                assert!(max == self.config.max_message && len > max)
            }
            ProtocolError::UnmaskedClientFrame => assert_eq!(self.config.role, Role::Server),
            ProtocolError::MaskedServerFrame => assert_eq!(self.config.role, Role::Client),
            ProtocolError::InvalidUtf8 => {
                let Some(open) = &self.frame else {
                    self.invalid_utf8_at_header(slice, offset);
                    return;
                };
                let Some(message) = &mut self.message else {
                    panic!("InvalidUtf8 outside a message");
                };
                assert!(message.text, "opaque payload validated");
                let remaining = open.header.payload_len - open.received;
                let len = remaining.min(slice.len() as u64) as usize;
                let ends_message = remaining == len as u64 && open.header.fin;
                // Either a real invalid sequence, or a character cut off by the message end.
                match message.push_text(&slice[..len]) {
                    Err(()) => {}
                    Ok(complete) => assert!(!complete && ends_message, "valid text rejected"),
                }
            }
            _ => {}
        }
    }
}

/// Target `frame_decoder`: arbitrary bytes through the decoder, every result checked.
///
/// Input: a flags byte (role, compression, kept masks, limit mode), two limit bytes, a
/// capacity byte, a count byte and that many read-size bytes, then the stream.
pub fn frame_decoder(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.byte();
    let [frame_limit, message_limit] = input.array();
    let capacity = MIN_BUFFER_LEN + input.byte() as usize * 8;
    let read_count = (input.byte() % 8) as usize;
    let reads = input.take(read_count);
    let stream = input.rest();

    let role = if flags & 1 == 0 {
        Role::Server
    } else {
        Role::Client
    };
    let (max_frame, max_message) = match (flags >> 3) % 3 {
        0 => (frame_limit as u64, message_limit as u64 * 4),
        1 => {
            let defaults = DecoderConfig::new(role);
            (defaults.max_frame, defaults.max_message)
        }
        _ => (u64::MAX, u64::MAX),
    };
    let config = DecoderConfig {
        role,
        max_frame,
        max_message,
        compression: flags & 2 != 0,
        keep_opaque_masked: flags & 4 != 0,
    };
    // Decoded twice, by `decode` alone and with the relay's fast path first: each result is
    // checked, and both must stop at the same error (or at none).
    let outcomes = [false, true].map(|fast| {
        let mut decoder = FrameDecoder::new(config);
        let mut checker = Checker {
            config,
            stream,
            frame: None,
            message: None,
        };
        drive(
            &mut decoder,
            stream,
            capacity,
            reads,
            fast,
            |result, slice, offset, between| {
                checker.check(result, slice, offset, between);
            },
        )
    });
    assert_eq!(
        outcomes[0], outcomes[1],
        "the fast path changed the outcome"
    );
}

/// One frame of a [`RoundtripInput`]: kind selector, FIN, mask key, a cut point, payload.
pub type FrameSpec = (u8, bool, [u8; 4], u8, Vec<u8>);

/// Input of target `roundtrip`, as plain tuples so that the target can build it with
/// `arbitrary` without the library depending on it: a flags byte (role, compression, kept
/// masks, capacity), the frames, and the read sizes.
pub type RoundtripInput = (u8, Vec<FrameSpec>, Vec<u8>);

/// Close codes a valid sequence may carry.
const CLOSE_CODES: [u16; 6] = [1000, 1001, 1008, 1011, 3000, 4999];

/// Turns arbitrary frame specs into a valid frame sequence: its wire bytes, and each frame's
/// header with its plain payload.
fn valid_sequence(
    frames: &[FrameSpec],
    role: Role,
    compression: bool,
) -> (Vec<u8>, Vec<(FrameHeader, Vec<u8>)>) {
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    // The kind of the message in progress: Some(true) for text that must stay valid UTF-8.
    let mut open: Option<bool> = None;
    // Bytes of a text message held back so that fragments split characters.
    let mut carry: Vec<u8> = Vec::new();
    let mut push = |header: FrameHeader, payload: Vec<u8>, wire: &mut Vec<u8>| {
        wire.extend_from_slice(header.encode().as_bytes());
        let start = wire.len();
        wire.extend_from_slice(&payload);
        if let Some(key) = header.mask {
            apply_mask(&mut wire[start..], key);
        }
        expected.push((header, payload));
    };
    for &(selector, fin, key, cut, ref payload) in frames {
        let mask = (role == Role::Client).then_some(MaskKey(key));
        let control = |opcode| FrameHeader::new(true, opcode, mask, 0);
        match selector & 7 {
            kind @ (4 | 5) => {
                let opcode = if kind == 4 {
                    OpCode::Ping
                } else {
                    OpCode::Pong
                };
                let payload = payload[..payload.len().min(MAX_CONTROL_PAYLOAD)].to_vec();
                let header = FrameHeader {
                    payload_len: payload.len() as u64,
                    ..control(opcode)
                };
                let built = ControlFrame::new(opcode, &payload, mask);
                let start = wire.len();
                push(header, payload, &mut wire);
                assert_eq!(built.as_bytes(), &wire[start..], "ControlFrame differs");
                assert_eq!(built.opcode(), opcode);
            }
            6 => {
                let reason = String::from_utf8_lossy(payload);
                let code = CloseCode(CLOSE_CODES[cut as usize % CLOSE_CODES.len()]);
                let frame = close_frame(code, &reason, mask);
                let mut plain = code.0.to_be_bytes().to_vec();
                plain.extend_from_slice(truncate_utf8(&reason, MAX_CLOSE_REASON).as_bytes());
                let header = FrameHeader {
                    payload_len: plain.len() as u64,
                    ..control(OpCode::Close)
                };
                let start = wire.len();
                push(header, plain, &mut wire);
                assert_eq!(frame.as_bytes(), &wire[start..], "close_frame differs");
                // Nothing follows a close frame.
                return (wire, expected);
            }
            kind => {
                let (opcode, rsv) = match open {
                    Some(_) => (OpCode::Continuation, 0),
                    None => {
                        let text = kind < 2;
                        let compressed = compression && selector & 8 != 0;
                        open = Some(text && !compressed);
                        let opcode = if text { OpCode::Text } else { OpCode::Binary };
                        (opcode, if compressed { RSV1 } else { 0 })
                    }
                };
                let payload = if open == Some(true) {
                    carry.extend_from_slice(String::from_utf8_lossy(payload).as_bytes());
                    let at = if fin {
                        carry.len()
                    } else {
                        cut as usize % (carry.len() + 1)
                    };
                    carry.drain(..at).collect()
                } else {
                    payload.clone()
                };
                let mut header = FrameHeader::new(fin, opcode, mask, payload.len() as u64);
                header.rsv = rsv;
                push(header, payload, &mut wire);
                if fin {
                    open = None;
                }
            }
        }
    }
    if open.is_some() {
        let mask = (role == Role::Client).then_some(MaskKey([1, 2, 3, 4]));
        let rest = std::mem::take(&mut carry);
        let header = FrameHeader::new(true, OpCode::Continuation, mask, rest.len() as u64);
        push(header, rest, &mut wire);
    }
    (wire, expected)
}

/// Target `roundtrip`: a valid frame sequence, encoded with `FrameHeader::encode` and
/// `apply_mask`, decodes to the same frames through any chunking.
pub fn roundtrip((flags, frames, reads): RoundtripInput) {
    // A client sends masked frames, which the server-role decoder reads.
    let (sender, receiver) = if flags & 1 == 0 {
        (Role::Client, Role::Server)
    } else {
        (Role::Server, Role::Client)
    };
    let compression = flags & 2 != 0;
    let (wire, expected) = valid_sequence(&frames, sender, compression);
    let config = DecoderConfig {
        compression,
        keep_opaque_masked: flags & 4 != 0,
        ..DecoderConfig::new(receiver)
    };
    let capacity = MIN_BUFFER_LEN + (flags >> 3) as usize * 16;
    for fast in [false, true] {
        let mut decoded: Vec<(FrameHeader, Vec<u8>)> = Vec::new();
        let mut decoder = FrameDecoder::new(config);
        let error = drive(
            &mut decoder,
            &wire,
            capacity,
            &reads,
            fast,
            |result, slice, _, _| {
                if let Ok(Some(Decoded { item, .. })) = result {
                    match item {
                        Item::DataFrame(header) => decoded.push((*header, Vec::new())),
                        Item::Payload(piece) => {
                            let (_, payload) = decoded.last_mut().expect("payload after a header");
                            let start = payload.len();
                            payload.extend_from_slice(&slice[..piece.len]);
                            if let Some(key) = piece.mask {
                                apply_mask_naive(&mut payload[start..], key);
                            }
                        }
                        Item::Control { header, payload } => {
                            decoded.push((*header, slice[payload.clone()].to_vec()));
                        }
                    }
                }
            },
        );
        assert_eq!(error, None, "valid sequence rejected (fast path: {fast})");
        assert_eq!(decoded, expected);
        // Only a close frame can leave a message unfinished: otherwise the sequence ends it.
        let ends_open = expected
            .iter()
            .rfind(|(h, _)| !h.opcode.is_control())
            .is_some_and(|(h, _)| !h.fin);
        assert_eq!(decoder.is_between_messages(), !ends_open);
    }
}

/// Target `utf8`: the incremental validator against std on the whole input, fed in arbitrary
/// pieces, and failing no later than the piece that shows the error.
///
/// Input: a count byte and that many piece-length bytes (cycled; 0 means an empty piece), then
/// the text.
pub fn utf8(data: &[u8]) {
    let mut input = Input::new(data);
    let count = (input.byte() % 16) as usize;
    let lengths = input.take(count);
    let text = input.rest();
    let expected = std::str::from_utf8(text);

    // All-zero lengths would never advance: treat them as "one piece".
    let lengths = if lengths.iter().all(|&len| len == 0) {
        &[][..]
    } else {
        lengths
    };

    let mut validator = Utf8Validator::new();
    let mut failed_at = None;
    let mut start = 0;
    let mut piece = 0;
    loop {
        let end = match lengths.get(piece % lengths.len().max(1)) {
            Some(&len) => (start + len as usize).min(text.len()),
            None => text.len(),
        };
        piece += 1;
        if validator.feed(&text[start..end]).is_err() {
            failed_at = Some((start, end));
            break;
        }
        start = end;
        if start == text.len() {
            break;
        }
    }
    match expected {
        Ok(_) => {
            assert_eq!(failed_at, None, "valid text rejected");
            assert_eq!(validator.finish(), Ok(()));
            // `finish` resets: the same validator takes the next message.
            assert_eq!(validator.feed(text), Ok(()));
            assert_eq!(validator.finish(), Ok(()));
        }
        Err(e) => match e.error_len() {
            None => {
                assert_eq!(failed_at, None, "a valid prefix rejected");
                assert_eq!(validator.finish(), Err(ProtocolError::InvalidUtf8));
            }
            Some(error_len) => {
                let Some((piece_start, piece_end)) = failed_at else {
                    panic!("invalid sequence not detected while feeding");
                };
                let shows_error = (e.valid_up_to() + error_len).min(text.len() - 1);
                assert!(piece_start <= shows_error, "failed late");
                assert!(piece_end > e.valid_up_to(), "failed on valid bytes");
            }
        },
    }
}

/// Target `mask`: the fast masker against the byte-at-a-time reference.
///
/// Input: two keys, a phase byte, a start byte, two cut bytes, then the payload.
pub fn mask(data: &[u8]) {
    let mut input = Input::new(data);
    let key = MaskKey(input.array());
    let other = MaskKey(input.array());
    let phase = input.byte() as u64;
    let start = input.byte() as usize % 64;
    let cut = u16::from_le_bytes(input.array()) as usize;
    let payload = input.rest();

    // Start the slice at an arbitrary address offset: the fast path must not assume alignment.
    let mut padded = vec![0u8; start];
    padded.extend_from_slice(payload);
    let key = key.rotated(phase);
    let mut naive = payload.to_vec();
    apply_mask_naive(&mut naive, key);

    let mut fast = padded.clone();
    apply_mask(&mut fast[start..], key);
    assert_eq!(&fast[start..], &naive[..]);
    assert!(
        fast[..start].iter().all(|&b| b == 0),
        "wrote before the slice"
    );

    let mut chunked = payload.to_vec();
    let cut = cut % (payload.len() + 1);
    let (head, tail) = chunked.split_at_mut(cut);
    apply_mask(head, key);
    apply_mask(tail, key.rotated(cut as u64));
    assert_eq!(chunked, naive);

    let mut one_pass = payload.to_vec();
    remask(&mut one_pass, key, other);
    let mut two_pass = payload.to_vec();
    apply_mask_naive(&mut two_pass, key);
    apply_mask_naive(&mut two_pass, other);
    assert_eq!(one_pass, two_pass);
}

const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Target `handshake`: arbitrary bytes as a request and as a response; whatever the server
/// side accepts, the client side must accept the answer to.
pub fn handshake(data: &[u8]) {
    let mut storage = [EMPTY_HEADER; 32];
    match parse_request(data, &mut storage) {
        Ok(Some((head, len))) => {
            assert!(len <= data.len());
            let _ = (head.path(), head.query(), head.header("origin"));
            let _ = handshake::server::offered_extensions(head.headers).count();
            match validate_upgrade(&head) {
                Ok(upgrade) => {
                    assert_eq!(upgrade.key.len(), 24);
                    accept_round_trip(&head, upgrade.key);
                }
                Err(error) => error_round_trip(&error),
            }
        }
        Ok(None) => {}
        Err(error) => error_round_trip(&error),
    }

    let mut storage = [EMPTY_HEADER; 32];
    if let Ok(Some((head, len))) = parse_response(data, &mut storage) {
        assert!(len <= data.len());
        let _ = validate_response(&head, RFC_KEY, Some("chat, v2"), Some("permessage-deflate"));
        let _ = validate_response(&head, RFC_KEY, None, None);
    }

    // The request we send to a backend passes our own server-side checks.
    let mut random = [0u8; 16];
    let take = data.len().min(16);
    random[..take].copy_from_slice(&data[..take]);
    let key = key_from_random(random);
    let mut request = Vec::new();
    write_request(
        &mut request,
        &ClientRequest {
            host: "backend:8080",
            target: "/ws?x=1",
            key: &key,
            protocols: Some("chat"),
            extensions: None,
            extra: &[("Origin", b"https://example.com")],
        },
    );
    let mut storage = [EMPTY_HEADER; 32];
    let (head, _) = parse_request(&request, &mut storage)
        .expect("our request parses")
        .expect("our request is complete");
    assert_eq!(validate_upgrade(&head).map(|u| u.key), Ok(key.as_str()));
}

/// Our 101 for an accepted request, read back by our client side, must validate.
fn accept_round_trip(head: &handshake::RequestHead<'_, '_>, key: &str) {
    let offered: Vec<&str> = handshake::server::offered_protocols(head.headers).collect();
    let offered = offered.join(", ");
    let chosen = handshake::server::offered_protocols(head.headers).next();
    let mut response = Vec::new();
    write_accept_response(&mut response, key, chosen, None, &[("X-Test", "1")]);
    let mut storage = [EMPTY_HEADER; 16];
    let (parsed, len) = parse_response(&response, &mut storage)
        .expect("our 101 parses")
        .expect("our 101 is complete");
    assert_eq!(len, response.len());
    let offered = (!offered.is_empty()).then_some(offered.as_str());
    let negotiated = validate_response(&parsed, key, offered, None).expect("our 101 validates");
    assert_eq!(negotiated.protocol, chosen);
}

fn error_round_trip(error: &HandshakeError) {
    let mut response = Vec::new();
    write_error_response(&mut response, error);
    let mut storage = [EMPTY_HEADER; 16];
    let (parsed, _) = parse_response(&response, &mut storage)
        .expect("our error response parses")
        .expect("our error response is complete");
    assert_eq!(parsed.status, error.status());
}

/// Target `session`: the session protocol's parsers on untrusted input.
///
/// Input: a selector byte, then a query string (parameters parsed; the query the backend would
/// see must carry none of them) or a JSON body (send batch, open and close bodies decoded).
pub fn session(data: &[u8]) {
    use crate::session::protocol::{
        Close, OpenRequest, PARAM_ACK, PARAM_OP, PARAM_SID, SendBatch, parse_query,
    };
    let mut input = Input::new(data);
    let selector = input.byte();
    let rest = input.rest();
    if selector.is_multiple_of(2) {
        let Ok(query) = std::str::from_utf8(rest) else {
            return;
        };
        if let Ok(Some(parsed)) = parse_query(Some(query)) {
            let left = parsed.rest.as_deref().unwrap_or("");
            for pair in left.split('&') {
                let name = pair.split_once('=').map_or(pair, |(name, _)| name);
                assert!(
                    ![PARAM_OP, PARAM_SID, PARAM_ACK].contains(&name),
                    "{name} reached the backend's query: {left:?}"
                );
            }
            assert_eq!(parse_query(parsed.rest.as_deref()), Ok(None));
            assert!(parsed.ack <= crate::session::protocol::MAX_SEQ);
        }
    } else {
        if let Ok(batch) = serde_json::from_slice::<SendBatch>(rest)
            && let Ok((seq, messages, _)) = batch.decode()
        {
            assert!(seq >= 1);
            let _ = messages.len();
        }
        let _ = serde_json::from_slice::<OpenRequest>(rest);
        let _ = serde_json::from_slice::<Close>(rest);
    }
}

/// The relay's connection state machine between two scripted peers: arbitrary interleavings of
/// both peers' frames (valid and invalid), EOFs, resets, stalled readers, timer firings and
/// stop signals. The checks are in [`crate::relay::simulation`].
pub fn relay(data: &[u8]) {
    crate::relay::simulation::fuzz(data);
}

/// Target `client_address`: a connection's PROXY header and a trusted proxy's forwarding
/// chain, both untrusted bytes until proven otherwise.
///
/// Input: a selector byte, then the bytes a connection starts with (even) or an
/// `X-Forwarded-For` value (odd).
pub fn client_address(data: &[u8]) {
    use crate::client_addr::{ClientAddr, TrustedNetworks};
    use crate::proxy_protocol::{MAX_HEADER_BYTES, Parse, parse};
    let mut input = Input::new(data);
    let selector = input.byte();
    let rest = input.rest();
    if selector.is_multiple_of(2) {
        match parse(rest) {
            Parse::Complete { source, len } => {
                assert!(len <= rest.len() && len <= MAX_HEADER_BYTES, "{len}");
                // The header is judged the same on its own bytes, and no shorter prefix of it
                // is taken for a header: reading stops exactly at its end.
                assert_eq!(parse(&rest[..len]), Parse::Complete { source, len });
                for end in 0..len {
                    assert_eq!(parse(&rest[..end]), Parse::Incomplete, "prefix of {end}");
                }
            }
            Parse::Incomplete => assert!(rest.len() < MAX_HEADER_BYTES),
            Parse::Malformed(_) | Parse::TooLarge => {}
        }
    } else {
        let hop: std::net::SocketAddr = ([10, 0, 0, 1], 4000).into();
        let network = "10.0.0.0/8".parse().expect("a network");
        let trusted = TrustedNetworks::new(vec![network]);
        let headers = [httparse::Header {
            name: "X-Forwarded-For",
            value: rest,
        }];
        let client = ClientAddr::of_head(hop, &headers, &trusted);
        assert_eq!(
            client.via(),
            Some(hop.ip()),
            "a trusted hop's chain is read"
        );
        // The walk stops at the first address outside the trusted network, so a trusted
        // address is the client only when nothing else was named to its right.
        let _ = client.to_string();
    }
}

/// [`relay`] with permessage-deflate negotiated (terminated or counted): compressed messages,
/// fragmented ones and bombs among the events. The checks are in [`crate::relay::simulation`].
pub fn relay_deflate(data: &[u8]) {
    crate::relay::simulation::fuzz_deflate(data);
}
