//! The protocol hot path never touches the heap: decoding every kind of frame through a fixed
//! buffer, re-masking, encoding headers and close frames, and rejecting bad input.
//!
//! Its own test binary, because counting needs a global allocator. `allocation_counter`
//! provides one (wrapping the system allocator) and counts per thread, so the test harness's
//! own threads cannot disturb the measurement.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use wsgate::proto::{
    CloseCode, ControlFrame, Decoded, DecoderConfig, FrameDecoder, FrameHeader, Item, MaskKey,
    OpCode, ProtocolError, Role, apply_mask, close_frame, parse_close_payload, remask,
};

const BUFFER: usize = 4096;
/// Read sizes cycled by the simulated socket, so payloads arrive in uneven pieces and control
/// frames straddle reads.
const READS: [usize; 5] = [4096, 1, 700, 13, 2500];
const PASSES: usize = 50;
/// Longer than a close frame can carry: `close_frame` must cut it, in place.
const LONG_REASON: &str =
    "ééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééé";

fn frame(fin: bool, opcode: OpCode, key: MaskKey, payload: &[u8]) -> Vec<u8> {
    let header = FrameHeader::new(fin, opcode, Some(key), payload.len() as u64);
    let mut bytes = header.encode().as_bytes().to_vec();
    let start = bytes.len();
    bytes.extend_from_slice(payload);
    apply_mask(&mut bytes[start..], key);
    bytes
}

/// One of each kind a client sends, in an order that exercises interleaving.
fn client_stream() -> Vec<u8> {
    let key = |i: u8| MaskKey([i, 0x5a ^ i, 0xa5, i.wrapping_mul(7)]);
    let text = "κόσμε, 日本語, 🎉 and ASCII. ".repeat(40);
    let mut stream = Vec::new();
    stream.extend(frame(true, OpCode::Text, key(1), text.as_bytes()));
    stream.extend(frame(true, OpCode::Binary, key(2), &[0xAB; 10_000]));
    // A fragmented text message cut inside a character, with a ping between the fragments.
    let (head, tail) = text.as_bytes().split_at(101);
    stream.extend(frame(false, OpCode::Text, key(3), head));
    stream.extend(frame(true, OpCode::Ping, key(4), b"are you there?"));
    stream.extend(frame(true, OpCode::Continuation, key(5), tail));
    stream.extend(frame(false, OpCode::Binary, key(6), &[1; 300]));
    stream.extend(frame(true, OpCode::Continuation, key(7), &[2; 70_000]));
    stream.extend(frame(true, OpCode::Pong, key(8), &[9; 125]));
    stream.extend(frame(true, OpCode::Text, key(9), b""));
    let close = close_frame(CloseCode::GOING_AWAY, "server shutting down", Some(key(10)));
    stream.extend_from_slice(close.as_bytes());
    stream
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    messages: usize,
    controls: usize,
    payload_bytes: usize,
    checksum: u64,
    close_echoes: usize,
}

/// The relay's receive loop over `stream`: fixed buffer, uneven reads, binary payload re-masked
/// for the backend in one pass, the close frame echoed.
fn relay_pass(stream: &[u8], buf: &mut [u8; BUFFER], tally: &mut Tally) {
    let config = DecoderConfig {
        keep_opaque_masked: true,
        ..DecoderConfig::new(Role::Server)
    };
    let outgoing = MaskKey([0xde, 0xad, 0xbe, 0xef]);
    let mut decoder = FrameDecoder::new(config);
    let (mut start, mut end, mut fed) = (0, 0, 0);
    let mut reads = READS.iter().cycle();
    loop {
        loop {
            let Decoded { item, consumed } = match decoder.decode(&mut buf[start..end]) {
                Ok(Some(decoded)) => decoded,
                Ok(None) => break,
                Err(error) => panic!("valid stream rejected: {error}"),
            };
            match item {
                Item::DataFrame(header) => {
                    // What the relay writes towards the backend.
                    let out = FrameHeader::new(
                        header.fin,
                        header.opcode,
                        Some(outgoing),
                        header.payload_len,
                    );
                    tally.checksum += u64::from(out.encode().as_bytes()[1]);
                }
                Item::Payload(piece) => {
                    let bytes = &mut buf[start..start + piece.len];
                    if let Some(key) = piece.mask {
                        remask(bytes, key, outgoing);
                    }
                    tally.payload_bytes += piece.len;
                    tally.checksum += bytes.iter().map(|&b| u64::from(b)).sum::<u64>();
                    tally.messages += usize::from(piece.message_end);
                }
                Item::Control { header, payload } => {
                    tally.controls += 1;
                    let payload = &buf[start..end][payload];
                    if header.opcode == OpCode::Close {
                        let close = parse_close_payload(payload).expect("validated");
                        assert_eq!(close.code, Some(CloseCode::GOING_AWAY));
                        let echo = ControlFrame::new(OpCode::Close, payload, None);
                        tally.close_echoes += usize::from(echo.as_bytes().len() > 2);
                    }
                }
            }
            start += consumed;
        }
        if fed == stream.len() {
            return;
        }
        buf.copy_within(start..end, 0);
        end -= start;
        start = 0;
        let n = reads
            .next()
            .copied()
            .unwrap_or(BUFFER)
            .min(BUFFER - end)
            .min(stream.len() - fed);
        buf[end..end + n].copy_from_slice(&stream[fed..fed + n]);
        end += n;
        fed += n;
    }
}

/// Bad input is rejected, with its close frame built, without allocating either.
fn reject(bytes: &mut [u8]) -> ProtocolError {
    let mut decoder = FrameDecoder::new(DecoderConfig::new(Role::Server));
    let mut at = 0;
    loop {
        match decoder.decode(&mut bytes[at..]) {
            Ok(Some(Decoded { consumed, .. })) => at += consumed,
            Ok(None) => panic!("bad input accepted"),
            Err(error) => {
                let close = close_frame(error.close_code(), error.reason(), None);
                assert!(close.as_bytes().len() > 4);
                return error;
            }
        }
    }
}

#[test]
fn decoding_and_encoding_do_not_allocate() {
    let stream = client_stream();
    let key = MaskKey([1, 2, 3, 4]);
    let mut bad_inputs = [
        frame(true, OpCode::Text, key, b"ok \xed\xa0\x80"),
        frame(true, OpCode::Close, key, b"\x03\xe8\xff"),
        frame(true, OpCode::Close, key, &1005u16.to_be_bytes()),
        frame(true, OpCode::Continuation, key, b"x"),
        vec![0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0],
    ];
    let pristine = bad_inputs.clone();
    let mut buf = Box::new([0u8; BUFFER]);

    let mut warm_up = Tally::default();
    relay_pass(&stream, &mut buf, &mut warm_up);
    assert_eq!((warm_up.messages, warm_up.controls), (5, 3));
    assert_eq!(warm_up.close_echoes, 1);

    let mut tally = Tally::default();
    let mut errors = 0;
    let info = allocation_counter::measure(|| {
        for _ in 0..PASSES {
            relay_pass(&stream, &mut buf, &mut tally);
            for (bad, original) in bad_inputs.iter_mut().zip(&pristine) {
                // Decoding unmasks in place: restore the masked bytes for the next pass.
                bad.copy_from_slice(original);
                reject(bad);
                errors += 1;
            }
            for len in [0, 125, 126, 65_535, 65_536, 1 << 40] {
                let header = FrameHeader::new(true, OpCode::Binary, Some(key), len);
                tally.checksum += header.encode().as_bytes().len() as u64;
            }
            let close = close_frame(CloseCode::NORMAL, LONG_REASON, Some(key));
            tally.checksum += close.as_bytes().len() as u64;
        }
    });

    assert_eq!(tally.messages, PASSES * warm_up.messages);
    assert_eq!(tally.payload_bytes, PASSES * warm_up.payload_bytes);
    assert_eq!(errors, PASSES * bad_inputs.len());
    assert_eq!(info.count_total, 0, "the hot path allocated: {info:?}");
}

/// The counter is live: a zero above is a measurement, not a silent no-op.
#[test]
fn the_counter_sees_allocations() {
    let info = allocation_counter::measure(|| {
        std::hint::black_box(vec![0u8; 64]);
    });
    assert_eq!(info.count_total, 1);
}
