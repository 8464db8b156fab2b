//! Receiver rules with their close codes, split-point and limit tests for the decoder.

use super::*;
use crate::proto::close::CloseCode;
use crate::proto::mask::apply_mask_naive;
use proptest::prelude::*;

const KEY: MaskKey = MaskKey([0x37, 0xfa, 0x21, 0x3d]);

/// Encodes one frame with our encoder (the header) and the naive masker (the payload).
fn frame(fin: bool, opcode: OpCode, mask: Option<MaskKey>, payload: &[u8]) -> Vec<u8> {
    frame_rsv(fin, 0, opcode, mask, payload)
}

fn frame_rsv(fin: bool, rsv: u8, opcode: OpCode, mask: Option<MaskKey>, payload: &[u8]) -> Vec<u8> {
    let mut header = FrameHeader::new(fin, opcode, mask, payload.len() as u64);
    header.rsv = rsv;
    let mut bytes = header.encode().as_bytes().to_vec();
    let start = bytes.len();
    bytes.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask_naive(&mut bytes[start..], key);
    }
    bytes
}

/// What a receiver observes, reassembled: whole messages and control frames.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Message(OpCode, Vec<u8>),
    Control(OpCode, Vec<u8>),
}

/// Feeds `stream` through a fixed buffer of `capacity` bytes, `read_sizes` bytes per "read"
/// (cycled), the way the relay does: decode until `None`, compact, read more.
fn drive(
    config: DecoderConfig,
    stream: &[u8],
    capacity: usize,
    read_sizes: &[usize],
) -> Result<Vec<Event>, ProtocolError> {
    drive_with(config, stream, capacity, read_sizes, false)
}

/// `drive`, optionally trying the relay's fast path (`decode_whole_message`) at every step.
///
/// Also checks what a relay relies on to close cleanly: once the header of a frame that was
/// whole in the buffer is returned, no error comes before that frame's end (the header was
/// forwarded, so an error would leave the other hop inside a frame).
fn drive_with(
    config: DecoderConfig,
    stream: &[u8],
    capacity: usize,
    read_sizes: &[usize],
    fast: bool,
) -> Result<Vec<Event>, ProtocolError> {
    let mut decoder = FrameDecoder::new(config);
    let mut buf = vec![0u8; capacity];
    let (mut start, mut end, mut fed) = (0, 0, 0);
    let mut events = Vec::new();
    let mut message: Option<(OpCode, Vec<u8>)> = None;
    let mut reads = read_sizes.iter().cycle();
    let mut whole_frame_open = false;
    loop {
        loop {
            if fast && let Some(whole) = decoder.decode_whole_message(&mut buf[start..end])? {
                let payload = start + whole.header_len..start + whole.frame_len();
                let mut bytes = buf[payload].to_vec();
                if let Some(key) = whole.mask {
                    apply_mask_naive(&mut bytes, key);
                }
                events.push(Event::Message(whole.header.opcode, bytes));
                start += whole.frame_len();
                continue;
            }
            let decoded = decoder.decode(&mut buf[start..end]);
            assert!(
                decoded.is_ok() || !whole_frame_open,
                "error inside a frame whose header was returned whole: {decoded:?}"
            );
            let Some(Decoded { item, consumed }) = decoded? else {
                break;
            };
            match item {
                Item::DataFrame(header) => {
                    whole_frame_open = (end - start - consumed) as u64 >= header.payload_len;
                    if header.opcode != OpCode::Continuation {
                        assert!(message.is_none());
                        message = Some((header.opcode, Vec::new()));
                    }
                }
                Item::Payload(piece) => {
                    let (opcode, data) = message.as_mut().expect("payload inside a message");
                    let mut bytes = buf[start..start + piece.len].to_vec();
                    if let Some(key) = piece.mask {
                        apply_mask_naive(&mut bytes, key);
                    }
                    data.extend_from_slice(&bytes);
                    if piece.frame_end {
                        whole_frame_open = false;
                    }
                    if piece.message_end {
                        events.push(Event::Message(*opcode, std::mem::take(data)));
                        message = None;
                    }
                }
                Item::Control { header, payload } => {
                    let bytes = buf[start..end][payload].to_vec();
                    events.push(Event::Control(header.opcode, bytes));
                }
            }
            start += consumed;
            assert!(start <= end);
        }
        if fed == stream.len() {
            return Ok(events);
        }
        buf.copy_within(start..end, 0);
        end -= start;
        start = 0;
        let want = (*reads.next().unwrap()).max(1);
        let n = want.min(capacity - end).min(stream.len() - fed);
        assert!(n > 0, "buffer full without progress");
        buf[end..end + n].copy_from_slice(&stream[fed..fed + n]);
        end += n;
        fed += n;
    }
}

fn server() -> DecoderConfig {
    DecoderConfig::new(Role::Server)
}

fn client() -> DecoderConfig {
    DecoderConfig::new(Role::Client)
}

fn decode_all(config: DecoderConfig, stream: &[u8]) -> Result<Vec<Event>, ProtocolError> {
    drive(
        config,
        stream,
        stream.len().max(MIN_BUFFER_LEN),
        &[usize::MAX],
    )
}

fn expect_close_code(config: DecoderConfig, stream: &[u8], code: CloseCode) {
    let err = decode_all(config, stream).expect_err("must fail");
    assert_eq!(err.close_code(), code, "{err:?}");
}

#[test]
fn rfc_masked_hello_golden_bytes() {
    let bytes = [
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    assert_eq!(
        decode_all(server(), &bytes),
        Ok(vec![Event::Message(OpCode::Text, b"Hello".to_vec())])
    );
}

#[test]
fn rfc_fragmented_hello_and_pings() {
    let bytes = [
        0x01, 0x03, 0x48, 0x65, 0x6c, // "Hel"
        0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f, // ping "Hello" in between
        0x80, 0x02, 0x6c, 0x6f, // "lo"
        0x8a, 0x00, // empty pong
    ];
    assert_eq!(
        decode_all(client(), &bytes),
        Ok(vec![
            Event::Control(OpCode::Ping, b"Hello".to_vec()),
            Event::Message(OpCode::Text, b"Hello".to_vec()),
            Event::Control(OpCode::Pong, vec![]),
        ])
    );
}

#[test]
fn reserved_bits_without_extension_close_with_1002() {
    for rsv in [0x40, 0x20, 0x10] {
        expect_close_code(
            server(),
            &frame_rsv(true, rsv, OpCode::Text, Some(KEY), b"x"),
            CloseCode::PROTOCOL_ERROR,
        );
    }
}

#[test]
fn rsv1_is_allowed_only_on_the_first_frame_of_a_compressed_message() {
    let config = DecoderConfig {
        compression: true,
        ..server()
    };
    // Compressed "text" is opaque: invalid UTF-8 must pass.
    let mut stream = frame_rsv(false, 0x40, OpCode::Text, Some(KEY), b"\xff\x00");
    stream.extend(frame(true, OpCode::Continuation, Some(KEY), b"\xfe"));
    assert_eq!(
        decode_all(config, &stream),
        Ok(vec![Event::Message(OpCode::Text, b"\xff\x00\xfe".to_vec())])
    );
    let mut stream = frame_rsv(false, 0x40, OpCode::Text, Some(KEY), b"a");
    stream.extend(frame_rsv(true, 0x40, OpCode::Continuation, Some(KEY), b"b"));
    expect_close_code(config, &stream, CloseCode::PROTOCOL_ERROR);
    expect_close_code(
        config,
        &frame_rsv(true, 0x40, OpCode::Ping, Some(KEY), b""),
        CloseCode::PROTOCOL_ERROR,
    );
    expect_close_code(
        config,
        &frame_rsv(true, 0x20, OpCode::Text, Some(KEY), b""),
        CloseCode::PROTOCOL_ERROR,
    );
}

#[test]
fn reserved_opcodes_close_with_1002() {
    for op in (0x3..=0x7).chain(0xB..=0xF) {
        expect_close_code(
            server(),
            &[0x80 | op, 0x80, 1, 2, 3, 4],
            CloseCode::PROTOCOL_ERROR,
        );
    }
}

#[test]
fn control_frames_over_125_or_fragmented_close_with_1002() {
    expect_close_code(
        server(),
        &frame(true, OpCode::Ping, Some(KEY), &[0; 126]),
        CloseCode::PROTOCOL_ERROR,
    );
    expect_close_code(
        server(),
        &frame(false, OpCode::Ping, Some(KEY), b"x"),
        CloseCode::PROTOCOL_ERROR,
    );
    expect_close_code(
        server(),
        &frame(false, OpCode::Close, Some(KEY), b""),
        CloseCode::PROTOCOL_ERROR,
    );
    assert!(decode_all(server(), &frame(true, OpCode::Ping, Some(KEY), &[0; 125])).is_ok());
}

#[test]
fn masking_rules_depend_on_the_role() {
    expect_close_code(
        server(),
        &frame(true, OpCode::Text, None, b"x"),
        CloseCode::PROTOCOL_ERROR,
    );
    expect_close_code(
        client(),
        &frame(true, OpCode::Text, Some(KEY), b"x"),
        CloseCode::PROTOCOL_ERROR,
    );
    assert!(decode_all(client(), &frame(true, OpCode::Text, None, b"x")).is_ok());
    assert_eq!(
        decode_all(server(), &frame(true, OpCode::Binary, None, b"")),
        Err(ProtocolError::UnmaskedClientFrame)
    );
}

#[test]
fn length_with_high_bit_closes_with_1002() {
    expect_close_code(
        client(),
        &[0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 1],
        CloseCode::PROTOCOL_ERROR,
    );
}

#[test]
fn fragmentation_rules_close_with_1002() {
    expect_close_code(
        server(),
        &frame(true, OpCode::Continuation, Some(KEY), b"x"),
        CloseCode::PROTOCOL_ERROR,
    );
    let mut stream = frame(false, OpCode::Text, Some(KEY), b"a");
    stream.extend(frame(true, OpCode::Binary, Some(KEY), b"b"));
    assert_eq!(
        decode_all(server(), &stream),
        Err(ProtocolError::ExpectedContinuation)
    );
    // After a finished message, a continuation is unexpected again.
    let mut stream = frame(true, OpCode::Text, Some(KEY), b"a");
    stream.extend(frame(true, OpCode::Continuation, Some(KEY), b"b"));
    assert_eq!(
        decode_all(server(), &stream),
        Err(ProtocolError::UnexpectedContinuation)
    );
}

#[test]
fn close_payload_rules_map_to_their_codes() {
    expect_close_code(
        server(),
        &frame(true, OpCode::Close, Some(KEY), &[0x03]),
        CloseCode::PROTOCOL_ERROR,
    );
    for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
        let payload = bad.to_be_bytes();
        expect_close_code(
            server(),
            &frame(true, OpCode::Close, Some(KEY), &payload),
            CloseCode::PROTOCOL_ERROR,
        );
    }
    for good in [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999,
    ] {
        let payload = good.to_be_bytes();
        assert!(
            decode_all(server(), &frame(true, OpCode::Close, Some(KEY), &payload)).is_ok(),
            "{good}"
        );
    }
    let invalid_reason = frame(true, OpCode::Close, Some(KEY), b"\x03\xe8\xff");
    expect_close_code(server(), &invalid_reason, CloseCode::INVALID_PAYLOAD);
    assert!(decode_all(server(), &frame(true, OpCode::Close, Some(KEY), b"")).is_ok());
}

#[test]
fn invalid_utf8_text_closes_with_1007_at_the_first_bad_chunk() {
    expect_close_code(
        server(),
        &frame(true, OpCode::Text, Some(KEY), b"ok \xff"),
        CloseCode::INVALID_PAYLOAD,
    );
    // Split across frames: the character is completed by the continuation frame.
    let mut stream = frame(false, OpCode::Text, Some(KEY), b"\xce");
    stream.extend(frame(true, OpCode::Continuation, Some(KEY), b"\xba"));
    assert_eq!(
        decode_all(server(), &stream),
        Ok(vec![Event::Message(OpCode::Text, "κ".as_bytes().to_vec())])
    );
    // Incomplete at the end of the message.
    let mut stream = frame(false, OpCode::Text, Some(KEY), b"a");
    stream.extend(frame(true, OpCode::Continuation, Some(KEY), b"\xce"));
    expect_close_code(server(), &stream, CloseCode::INVALID_PAYLOAD);
    // An empty final frame completing an incomplete character fails at its header, before a
    // relay could forward the header that makes the message whole.
    let mut decoder = FrameDecoder::new(server());
    let mut first = frame(false, OpCode::Text, Some(KEY), b"caf\xc3");
    let header = decoder.decode(&mut first).unwrap().unwrap();
    decoder
        .decode(&mut first[header.consumed..])
        .unwrap()
        .unwrap();
    let mut last = frame(true, OpCode::Continuation, Some(KEY), b"");
    assert_eq!(decoder.decode(&mut last), Err(ProtocolError::InvalidUtf8));
    // Fail fast: a first fragment only partly buffered streams header first, and fails at its
    // first bad piece, before the rest of the frame arrives.
    let mut decoder = FrameDecoder::new(server());
    let mut first = frame(false, OpCode::Text, Some(KEY), b"\xed\xa0\x80 surrogate");
    let decoded = decoder.decode(&mut first[..6 + 3]).unwrap().unwrap();
    assert!(matches!(decoded.item, Item::DataFrame(_)));
    let rest = &mut first[decoded.consumed..6 + 3];
    assert_eq!(decoder.decode(rest), Err(ProtocolError::InvalidUtf8));
    // Binary is never validated.
    assert!(decode_all(server(), &frame(true, OpCode::Binary, Some(KEY), b"\xff")).is_ok());
}

/// Decodes one whole frame item by item, returning the payload as the pieces carried it.
fn decode_frame(decoder: &mut FrameDecoder, mut bytes: Vec<u8>) -> Result<Vec<u8>, ProtocolError> {
    let Some(Decoded { item, consumed }) = decoder.decode(&mut bytes)? else {
        panic!("a whole frame needs no more bytes");
    };
    assert!(matches!(item, Item::DataFrame(_)), "{item:?}");
    let mut start = consumed;
    let mut payload = Vec::new();
    loop {
        let Some(Decoded { item, consumed }) = decoder.decode(&mut bytes[start..])? else {
            panic!("a whole frame needs no more bytes");
        };
        let Item::Payload(piece) = item else {
            panic!("expected payload, got {item:?}");
        };
        assert_eq!(piece.mask, None, "text is unmasked");
        payload.extend_from_slice(&bytes[start..start + piece.len]);
        start += consumed;
        if piece.frame_end {
            assert_eq!(start, bytes.len());
            return Ok(payload);
        }
    }
}

/// A relay forwards a data frame's header as soon as it is decoded: a text frame read whole
/// must be refused before that, whether it opens the message or continues it.
#[test]
fn a_whole_invalid_text_frame_fails_before_its_header() {
    let mut decoder = FrameDecoder::new(server());
    let first = frame(false, OpCode::Text, Some(KEY), b"hello ");
    assert_eq!(decode_frame(&mut decoder, first).unwrap(), b"hello ");
    let mut bad = frame(true, OpCode::Continuation, Some(KEY), b"w\xff rld");
    assert_eq!(decoder.decode(&mut bad), Err(ProtocolError::InvalidUtf8));

    let mut decoder = FrameDecoder::new(server());
    let mut bad_first = frame(false, OpCode::Text, Some(KEY), b"\xc0\xaf");
    assert_eq!(
        decoder.decode(&mut bad_first),
        Err(ProtocolError::InvalidUtf8)
    );

    // A final frame that leaves a character incomplete fails at its header too.
    let mut decoder = FrameDecoder::new(client());
    let first = frame(false, OpCode::Text, None, b"ok");
    decode_frame(&mut decoder, first).unwrap();
    let mut cut = frame(true, OpCode::Continuation, None, b" caf\xc3");
    assert_eq!(decoder.decode(&mut cut), Err(ProtocolError::InvalidUtf8));
}

/// A valid frame read whole comes out as before: its header, then its payload unmasked, once.
#[test]
fn a_whole_valid_continuation_frame_decodes_as_before() {
    let mut decoder = FrameDecoder::new(server());
    let first = frame(false, OpCode::Text, Some(KEY), b"hello ");
    assert_eq!(decode_frame(&mut decoder, first).unwrap(), b"hello ");
    let mut last = frame(true, OpCode::Continuation, Some(KEY), b"world");
    let header = decoder.decode(&mut last).unwrap().unwrap();
    assert_eq!(header.consumed, 6);
    let Item::DataFrame(h) = header.item else {
        panic!("expected a header");
    };
    assert_eq!(
        (h.opcode, h.fin, h.payload_len),
        (OpCode::Continuation, true, 5)
    );
    assert!(!decoder.is_between_frames());
    let piece = decoder.decode(&mut last[6..]).unwrap().unwrap();
    assert_eq!(
        piece.item,
        Item::Payload(Payload {
            len: 5,
            mask: None,
            frame_end: true,
            message_end: true,
        })
    );
    assert_eq!(&last[6..], b"world");
    assert!(decoder.is_between_messages());

    // Handed back in pieces (a relay that moved part of it on), it is still not unmasked twice.
    let mut decoder = FrameDecoder::new(server());
    let mut whole = frame(true, OpCode::Text, Some(KEY), "κόσμε".as_bytes());
    let header = decoder.decode(&mut whole).unwrap().unwrap();
    let mut start = header.consumed;
    for end in [start + 3, whole.len()] {
        let piece = decoder.decode(&mut whole[start..end]).unwrap().unwrap();
        assert!(matches!(
            piece.item,
            Item::Payload(Payload { mask: None, .. })
        ));
        start += piece.consumed;
    }
    assert_eq!(&whole[header.consumed..], "κόσμε".as_bytes());
    assert!(decoder.is_between_messages());
}

/// Whole fragments are validated with the state the previous fragments left: a character
/// split across them is valid.
#[test]
fn a_character_split_across_whole_fragments_is_valid() {
    let mut decoder = FrameDecoder::new(server());
    let bytes = "a😀b".as_bytes();
    let fragments = [&bytes[..2], &bytes[2..3], &bytes[3..5], &bytes[5..]];
    let mut text = Vec::new();
    for (i, fragment) in fragments.iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Text
        } else {
            OpCode::Continuation
        };
        let last = i + 1 == fragments.len();
        text.extend(decode_frame(&mut decoder, frame(last, opcode, Some(KEY), fragment)).unwrap());
    }
    assert_eq!(text, bytes);
    assert!(decoder.is_between_messages());
    // An invalid continuation of the split character fails at the fragment's header.
    let mut decoder = FrameDecoder::new(server());
    decode_frame(
        &mut decoder,
        frame(false, OpCode::Text, Some(KEY), &bytes[..3]),
    )
    .unwrap();
    let mut bad = frame(true, OpCode::Continuation, Some(KEY), b"\x41\x98\x80b");
    assert_eq!(decoder.decode(&mut bad), Err(ProtocolError::InvalidUtf8));
}

#[test]
fn frame_limit_both_sides() {
    let config = DecoderConfig {
        max_frame: 100,
        ..client()
    };
    assert!(decode_all(config, &frame(true, OpCode::Binary, None, &[7; 100])).is_ok());
    let err = decode_all(config, &frame(true, OpCode::Binary, None, &[7; 101])).unwrap_err();
    assert_eq!(err, ProtocolError::FrameTooLarge { len: 101, max: 100 });
    assert_eq!(err.close_code(), CloseCode::TOO_BIG);
    // Rejected from the header alone: no payload needs to arrive.
    let mut header = FrameHeader::new(true, OpCode::Binary, None, 1 << 40)
        .encode()
        .as_bytes()
        .to_vec();
    assert_eq!(
        FrameDecoder::new(config).decode(&mut header),
        Err(ProtocolError::FrameTooLarge {
            len: 1 << 40,
            max: 100
        })
    );
}

#[test]
fn message_limit_both_sides_across_fragments() {
    let config = DecoderConfig {
        max_message: 10,
        ..server()
    };
    let fragments = |sizes: &[usize]| {
        let mut stream = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let opcode = if i == 0 {
                OpCode::Binary
            } else {
                OpCode::Continuation
            };
            stream.extend(frame(
                i + 1 == sizes.len(),
                opcode,
                Some(KEY),
                &vec![1; size],
            ));
        }
        stream
    };
    assert!(decode_all(config, &fragments(&[4, 4, 2])).is_ok());
    let err = decode_all(config, &fragments(&[4, 4, 3])).unwrap_err();
    assert_eq!(err, ProtocolError::MessageTooLarge { len: 11, max: 10 });
    assert_eq!(err.close_code(), CloseCode::TOO_BIG);
    // The count restarts with each message.
    let mut two = fragments(&[10]);
    two.extend(fragments(&[5, 5]));
    assert!(decode_all(config, &two).is_ok());
}

#[test]
fn empty_frames_end_with_one_empty_payload_item() {
    let mut decoder = FrameDecoder::new(client());
    let mut bytes = frame(true, OpCode::Text, None, b"");
    let first = decoder.decode(&mut bytes).unwrap().unwrap();
    assert!(matches!(first.item, Item::DataFrame(_)));
    let second = decoder.decode(&mut []).unwrap().unwrap();
    assert_eq!(
        second.item,
        Item::Payload(Payload {
            len: 0,
            mask: None,
            frame_end: true,
            message_end: true
        })
    );
    assert!(decoder.is_between_messages());
    assert_eq!(decoder.decode(&mut []), Ok(None));
}

#[test]
fn opaque_payload_can_stay_masked_for_one_pass_remasking() {
    let config = DecoderConfig {
        keep_opaque_masked: true,
        ..server()
    };
    let stream = frame(true, OpCode::Binary, Some(KEY), b"binary payload");
    // Pieces come out still masked, each with the key rotated to its offset; `drive` unmasks.
    for read in 1..8 {
        assert_eq!(
            drive(config, &stream, MIN_BUFFER_LEN, &[read]),
            Ok(vec![Event::Message(
                OpCode::Binary,
                b"binary payload".to_vec()
            )])
        );
    }
    let mut bytes = stream.clone();
    let Decoded { consumed, .. } = FrameDecoder::new(config)
        .decode(&mut bytes)
        .unwrap()
        .unwrap();
    let mut decoder = FrameDecoder::new(config);
    decoder.decode(&mut bytes.clone()).unwrap();
    let piece = decoder
        .decode(&mut bytes[consumed..consumed + 3])
        .unwrap()
        .unwrap();
    assert_eq!(
        piece.item,
        Item::Payload(Payload {
            len: 3,
            mask: Some(KEY),
            frame_end: false,
            message_end: false
        })
    );
    let piece = decoder.decode(&mut bytes[consumed + 3..]).unwrap().unwrap();
    let Item::Payload(p) = piece.item else {
        panic!("payload expected")
    };
    assert_eq!(p.mask, Some(KEY.rotated(3)));
    // Text is always unmasked, because it must be validated.
    let text = frame(true, OpCode::Text, Some(KEY), b"hi");
    let mut decoder = FrameDecoder::new(config);
    let mut bytes = text.clone();
    let header = decoder.decode(&mut bytes).unwrap().unwrap();
    let piece = decoder
        .decode(&mut bytes[header.consumed..])
        .unwrap()
        .unwrap();
    assert!(matches!(
        piece.item,
        Item::Payload(Payload { mask: None, .. })
    ));
    assert_eq!(&bytes[header.consumed..], b"hi");
}

/// A mixed stream, decoded one-shot, then at every split into two reads, then one byte at a
/// time, then through every buffer capacity from the minimum up: always the same events.
#[test]
fn every_split_point_and_buffer_size_gives_the_same_events() {
    let mut stream = frame(false, OpCode::Text, Some(KEY), "κόσ".as_bytes());
    stream.extend(frame(true, OpCode::Ping, Some(KEY), b"are you there"));
    stream.extend(frame(
        true,
        OpCode::Continuation,
        Some(KEY),
        "με".as_bytes(),
    ));
    stream.extend(frame(
        true,
        OpCode::Binary,
        Some(KEY),
        &(0..=255).collect::<Vec<u8>>(),
    ));
    stream.extend(frame(true, OpCode::Text, Some(KEY), b""));
    stream.extend(frame(
        true,
        OpCode::Binary,
        Some(MaskKey([9, 9, 9, 9])),
        &[0xAB; 70_000],
    ));
    stream.extend(frame(true, OpCode::Close, Some(KEY), b"\x03\xe8bye"));
    let expected = vec![
        Event::Control(OpCode::Ping, b"are you there".to_vec()),
        Event::Message(OpCode::Text, "κόσμε".as_bytes().to_vec()),
        Event::Message(OpCode::Binary, (0..=255).collect()),
        Event::Message(OpCode::Text, vec![]),
        Event::Message(OpCode::Binary, vec![0xAB; 70_000]),
        Event::Control(OpCode::Close, b"\x03\xe8bye".to_vec()),
    ];
    assert_eq!(decode_all(server(), &stream).as_ref(), Ok(&expected));
    let head = 400; // every split inside the first frames; the big frame is covered below
    for split in 1..head {
        let reads = [split, usize::MAX];
        assert_eq!(
            drive(server(), &stream, 100_000, &reads).as_ref(),
            Ok(&expected),
            "split {split}"
        );
    }
    assert_eq!(
        drive(server(), &stream, 200, &[1]).as_ref(),
        Ok(&expected),
        "one byte at a time"
    );
    for capacity in MIN_BUFFER_LEN..MIN_BUFFER_LEN + 40 {
        assert_eq!(
            drive(server(), &stream, capacity, &[usize::MAX]).as_ref(),
            Ok(&expected),
            "cap {capacity}"
        );
    }
    assert_eq!(
        drive(server(), &stream, MIN_BUFFER_LEN, &[1, 7, 3]).as_ref(),
        Ok(&expected)
    );
}

/// Any data frame, however large, passes through a minimum-size buffer.
#[test]
fn a_large_frame_streams_through_a_small_buffer() {
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let stream = frame(true, OpCode::Binary, Some(KEY), &payload);
    let events = drive(server(), &stream, MIN_BUFFER_LEN, &[usize::MAX]).unwrap();
    assert_eq!(events, vec![Event::Message(OpCode::Binary, payload)]);
}

#[derive(Debug, Clone)]
enum Piece {
    Message { text: bool, fragments: Vec<Vec<u8>> },
    Ping(Vec<u8>),
}

fn piece_strategy() -> impl Strategy<Value = Piece> {
    let text = (
        "\\PC{0,60}",
        proptest::collection::vec(any::<prop::sample::Index>(), 0..3),
    )
        .prop_map(|(s, cuts)| {
            let bytes = s.into_bytes();
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            points.sort_unstable();
            points.push(bytes.len());
            let mut fragments = Vec::new();
            let mut start = 0;
            for p in points {
                fragments.push(bytes[start..p].to_vec());
                start = p;
            }
            Piece::Message {
                text: true,
                fragments,
            }
        });
    let binary = proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..4)
        .prop_map(|fragments| Piece::Message {
            text: false,
            fragments,
        });
    let ping = proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Piece::Ping);
    prop_oneof![text, binary, ping]
}

proptest! {
    /// encode → decode round trip over arbitrary messages, masks and read sizes.
    #[test]
    fn encode_decode_round_trip(
        pieces in proptest::collection::vec(piece_strategy(), 0..6),
        keys in proptest::collection::vec(any::<[u8; 4]>(), 1..4),
        reads in proptest::collection::vec(1usize..200, 1..5),
        capacity in MIN_BUFFER_LEN..400,
        masked in any::<bool>(),
        keep_masked in any::<bool>(),
        fast in any::<bool>(),
    ) {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        let mut keys = keys.iter().cycle();
        let mut next_mask = || masked.then(|| MaskKey(*keys.next().unwrap()));
        for piece in &pieces {
            match piece {
                Piece::Ping(data) => {
                    stream.extend(frame(true, OpCode::Ping, next_mask(), data));
                    expected.push(Event::Control(OpCode::Ping, data.clone()));
                }
                Piece::Message { text, fragments } => {
                    let opcode = if *text { OpCode::Text } else { OpCode::Binary };
                    for (i, fragment) in fragments.iter().enumerate() {
                        let op = if i == 0 { opcode } else { OpCode::Continuation };
                        stream.extend(frame(i + 1 == fragments.len(), op, next_mask(), fragment));
                    }
                    expected.push(Event::Message(opcode, fragments.concat()));
                }
            }
        }
        let role = if masked { Role::Server } else { Role::Client };
        let config = DecoderConfig { keep_opaque_masked: keep_masked, ..DecoderConfig::new(role) };
        prop_assert_eq!(drive_with(config, &stream, capacity, &reads, fast), Ok(expected));
    }

    /// The fast path changes nothing but speed: on valid streams and on streams with bytes
    /// corrupted anywhere (headers, lengths, masks, UTF-8), under tight or loose limits and
    /// either role, decoding with and without it gives the same messages or the same error.
    #[test]
    fn fast_path_agrees_with_decode(
        pieces in proptest::collection::vec(piece_strategy(), 1..6),
        key in any::<[u8; 4]>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        reads in proptest::collection::vec(1usize..300, 1..4),
        capacity in MIN_BUFFER_LEN..600,
        server in any::<bool>(),
        compression in any::<bool>(),
        keep_masked in any::<bool>(),
        frame_limit in prop_oneof![Just(u64::MAX), 0u64..200],
        message_limit in prop_oneof![Just(u64::MAX), 0u64..300],
    ) {
        let mut stream = Vec::new();
        for piece in &pieces {
            match piece {
                Piece::Ping(data) => stream.extend(frame(true, OpCode::Ping, Some(MaskKey(key)), data)),
                Piece::Message { text, fragments } => {
                    let opcode = if *text { OpCode::Text } else { OpCode::Binary };
                    for (i, fragment) in fragments.iter().enumerate() {
                        let op = if i == 0 { opcode } else { OpCode::Continuation };
                        let last = i + 1 == fragments.len();
                        stream.extend(frame(last, op, Some(MaskKey(key)), fragment));
                    }
                }
            }
        }
        for (at, xor) in flips {
            let at = at.index(stream.len());
            stream[at] ^= xor;
        }
        let config = DecoderConfig {
            role: if server { Role::Server } else { Role::Client },
            max_frame: frame_limit,
            max_message: message_limit,
            compression,
            keep_opaque_masked: keep_masked,
        };
        prop_assert_eq!(
            drive_with(config, &stream, capacity, &reads, true),
            drive_with(config, &stream, capacity, &reads, false)
        );
    }
}

#[test]
fn fast_path_takes_whole_single_frame_messages_only() {
    let mut decoder = FrameDecoder::new(server());
    let mut text = frame(true, OpCode::Text, Some(KEY), "κόσμε".as_bytes());
    let whole = decoder.decode_whole_message(&mut text).unwrap().unwrap();
    assert_eq!((whole.header_len, whole.payload_len), (6, 10));
    assert_eq!(whole.mask, None, "text is unmasked to be validated");
    assert_eq!(&text[6..], "κόσμε".as_bytes());
    assert!(decoder.is_between_messages());

    let mut long = frame(true, OpCode::Binary, Some(KEY), &[7; 300]);
    let whole = decoder.decode_whole_message(&mut long).unwrap().unwrap();
    assert_eq!((whole.header_len, whole.payload_len), (8, 300));

    // Declined, nothing consumed or changed: `decode` handles these.
    let declined = [
        frame(true, OpCode::Binary, Some(KEY), &[7; 300])[..100].to_vec(), // incomplete
        frame(false, OpCode::Binary, Some(KEY), b"frag"),                  // fragment
        frame(true, OpCode::Ping, Some(KEY), b"ping"),                     // control
        frame(true, OpCode::Binary, Some(KEY), &[1; 70_000]),              // 64-bit length
        frame(true, OpCode::Binary, None, b"unmasked"),                    // breaks a rule
        frame_rsv(true, 0x40, OpCode::Binary, Some(KEY), b"rsv1"),         // no extension
    ];
    for mut bytes in declined {
        let before = bytes.clone();
        assert_eq!(decoder.decode_whole_message(&mut bytes), Ok(None));
        assert_eq!(bytes, before);
        assert!(decoder.is_between_messages());
    }
    let mut tiny = FrameDecoder::new(DecoderConfig {
        max_frame: 4,
        ..server()
    });
    let mut big = frame(true, OpCode::Binary, Some(KEY), b"12345");
    assert_eq!(tiny.decode_whole_message(&mut big), Ok(None));
    assert!(matches!(
        tiny.decode(&mut big),
        Err(ProtocolError::FrameTooLarge { len: 5, max: 4 })
    ));

    // Inside a fragmented message, even a whole final frame is the general path's.
    let mut first = frame(false, OpCode::Text, Some(KEY), b"a");
    while decoder
        .decode(&mut first)
        .unwrap()
        .is_some_and(|d| d.consumed < first.len())
    {
        let consumed = FrameHeader::parse(&first).unwrap().unwrap().1;
        first.drain(..consumed);
    }
    assert!(!decoder.is_between_messages());
    let mut last = frame(true, OpCode::Continuation, Some(KEY), b"b");
    assert_eq!(decoder.decode_whole_message(&mut last), Ok(None));

    let mut invalid = frame(true, OpCode::Text, Some(KEY), &[b'a', 0xC0, 0x80]);
    let mut fresh = FrameDecoder::new(server());
    assert_eq!(
        fresh.decode_whole_message(&mut invalid),
        Err(ProtocolError::InvalidUtf8)
    );
}
