//! Codec benchmarks: small-frame parsing against fastwebsockets, masking, UTF-8 validation.
//!
//! Run with `cargo bench --bench codec` (add `-- --measurement-time 3 --warm-up-time 1` for a
//! quicker pass). Each timed closure checks its result where that is cheap, so a benchmark that
//! silently stopped doing the work would fail instead of getting faster.

// A benchmark's setup fails loudly: a panic on bad input here is the right report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{
    BatchSize, BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main,
};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use wsgate::proto::mask::apply_mask_naive;
use wsgate::proto::{
    Decoded, DecoderConfig, FrameDecoder, FrameHeader, Item, MaskKey, OpCode, Role, apply_mask,
};

const FRAMES: usize = 1000;
const PAYLOAD: usize = 64;
const READ_BUFFER: usize = 64 << 10;

/// `FRAMES` client frames (masked, a different key each) with `PAYLOAD`-byte payloads.
fn small_frame_stream(opcode: OpCode) -> Vec<u8> {
    // 64 bytes of mixed ASCII and multibyte text: valid for both opcodes.
    let payload = "frame ακόμα 日本 🎉 text-frame-payload-0123456789abcdef";
    let payload = &payload.as_bytes()[..PAYLOAD];
    assert!(std::str::from_utf8(payload).is_ok());
    let mut stream = Vec::with_capacity(FRAMES * (PAYLOAD + 6));
    for i in 0..FRAMES {
        let key = MaskKey((i as u32).wrapping_mul(0x9E37_79B9).to_be_bytes());
        let header = FrameHeader::new(true, opcode, Some(key), PAYLOAD as u64);
        stream.extend_from_slice(header.encode().as_bytes());
        let start = stream.len();
        stream.extend_from_slice(payload);
        apply_mask(&mut stream[start..], key);
    }
    stream
}

/// Decodes `stream` as the relay does: copy a "read" into the fixed buffer, decode until the
/// decoder wants more, compact. Returns the number of complete messages.
fn wsgate_decode(stream: &[u8], buf: &mut [u8]) -> usize {
    let mut decoder = FrameDecoder::new(DecoderConfig::new(Role::Server));
    let (mut start, mut end, mut fed) = (0, 0, 0);
    let mut messages = 0;
    loop {
        while let Ok(Some(Decoded { item, consumed })) = decoder.decode(&mut buf[start..end]) {
            if let Item::Payload(piece) = item {
                messages += usize::from(piece.message_end);
            }
            start += consumed;
        }
        if fed == stream.len() {
            return messages;
        }
        buf.copy_within(start..end, 0);
        end -= start;
        start = 0;
        let n = (buf.len() - end).min(stream.len() - fed);
        buf[end..end + n].copy_from_slice(&stream[fed..fed + n]);
        end += n;
        fed += n;
    }
}

/// An in-memory socket for fastwebsockets: reads replay a recorded stream, writes vanish.
struct Replay {
    data: Arc<[u8]>,
    at: usize,
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = buf.remaining().min(self.data.len() - self.at);
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn fastwebsockets_server(data: &Arc<[u8]>) -> fastwebsockets::WebSocket<Replay> {
    let stream = Replay {
        data: Arc::clone(data),
        at: 0,
    };
    let mut ws = fastwebsockets::WebSocket::after_handshake(stream, fastwebsockets::Role::Server);
    ws.set_auto_close(false);
    ws.set_auto_pong(false);
    ws
}

fn parse_small_frames(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("parse_small_frames");
    group.throughput(Throughput::Elements(FRAMES as u64));
    for (name, opcode) in [("binary", OpCode::Binary), ("text", OpCode::Text)] {
        let stream = small_frame_stream(opcode);
        let mut buf = vec![0u8; READ_BUFFER];
        group.bench_function(BenchmarkId::new("wsgate", name), |b| {
            b.iter(|| assert_eq!(wsgate_decode(black_box(&stream), &mut buf), FRAMES));
        });

        let shared: Arc<[u8]> = stream.into();
        // Proves, outside the timing, that fastwebsockets really unmasks what it returns.
        runtime.block_on(async {
            let frame = fastwebsockets_server(&shared).read_frame().await.unwrap();
            assert!(frame.payload.starts_with(b"frame "));
        });
        group.bench_function(BenchmarkId::new("fastwebsockets", name), |b| {
            b.iter_batched(
                || fastwebsockets_server(&shared),
                |mut ws| {
                    runtime.block_on(async {
                        for _ in 0..FRAMES {
                            let frame = ws.read_frame().await.unwrap();
                            assert_eq!(frame.payload.len(), PAYLOAD);
                            black_box(&frame.payload);
                        }
                    });
                    ws
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

fn unmask(c: &mut Criterion) {
    let key = MaskKey([0x37, 0xfa, 0x21, 0x3d]);
    let mut group = c.benchmark_group("unmask");
    for size in [125, 4 << 10, 64 << 10, 1 << 20] {
        let mut buf: Vec<u8> = (0..size).map(|i| (i * 31) as u8).collect();
        let mut reference = buf.clone();
        apply_mask_naive(&mut reference, key);
        let mut fast = buf.clone();
        apply_mask(&mut fast, key);
        assert_eq!(fast, reference);
        fastwebsockets::unmask(&mut buf, key.0);
        assert_eq!(buf, reference);

        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("apply_mask", size), &size, |b, _| {
            b.iter(|| apply_mask(black_box(&mut buf), black_box(key)));
        });
        group.bench_with_input(BenchmarkId::new("naive", size), &size, |b, _| {
            b.iter(|| apply_mask_naive(black_box(&mut buf), black_box(key)));
        });
        group.bench_with_input(BenchmarkId::new("fastwebsockets", size), &size, |b, _| {
            b.iter(|| fastwebsockets::unmask(black_box(&mut buf), black_box(key.0)));
        });
    }
    group.finish();
}

/// 64 KiB of text mixing ASCII with 2-, 3- and 4-byte characters.
fn mixed_text(len: usize) -> Vec<u8> {
    let sample = "Hello, wörld! κόσμε — 日本語のテキスト 🎉🚀 plain ASCII runs are common too. ";
    let mut text = String::with_capacity(len + sample.len());
    while text.len() < len {
        text.push_str(sample);
    }
    let mut end = len;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.into_bytes()
}

fn utf8(c: &mut Criterion) {
    const CHUNK: usize = 4 << 10;
    let text = mixed_text(64 << 10);
    let mut group = c.benchmark_group("utf8");
    group.throughput(Throughput::Bytes(text.len() as u64));
    // Chunks of 4 KiB cut characters in half: the carried-over state is exercised.
    group.bench_function("wsgate_4k_chunks", |b| {
        b.iter(|| {
            let mut validator = wsgate::proto::Utf8Validator::new();
            for chunk in black_box(&text).chunks(CHUNK) {
                validator.feed(chunk).unwrap();
            }
            validator.finish().unwrap();
        });
    });
    group.bench_function("std_whole", |b| {
        b.iter(|| assert!(std::str::from_utf8(black_box(&text)).is_ok()));
    });
    group.bench_function("simdutf8_whole", |b| {
        b.iter(|| assert!(simdutf8::basic::from_utf8(black_box(&text)).is_ok()));
    });
    group.finish();
}

criterion_group!(benches, parse_small_frames, unmask, utf8);
criterion_main!(benches);
