//! Chooses the deflate implementation of `compression: terminate`: flate2 on zlib-rs (what
//! wsgate uses) against miniz_oxide, both pure Rust, on what a gateway compresses: chat-like
//! JSON messages (1 KiB) and 64 KiB of binary (half compressible). Prints, per implementation,
//! messages per second compressed and inflated (one thread), the compressed size, and the
//! memory a compressor and a decompressor hold (peak heap while one message is processed, from
//! a counting allocator).
//!
//!     cargo run --release --example deflate_compare
//!
//! Each message is compressed the way permessage-deflate sends it: a sync flush, without
//! context takeover (a fresh or reset state per message), raw deflate.

// A benchmark reports a broken assumption by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::time::{Duration, Instant};

fn chat_json() -> Vec<u8> {
    let mut out = String::new();
    let mut i = 0;
    while out.len() < 1024 {
        out.push_str(&format!(
            "{{\"room\":\"lobby\",\"user\":\"user{}\",\"text\":\"message number {i}, how is it going?\",\"ts\":{}}},",
            i % 13,
            1_733_450_000_000u64 + i * 977
        ));
        i += 1;
    }
    out.truncate(1024);
    out.into_bytes()
}

fn binary_64k() -> Vec<u8> {
    // Half random, half a repeating record: like a binary game-state snapshot.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(65536);
    while out.len() < 32768 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    while out.len() < 65536 {
        out.extend_from_slice(&[1, 0, 0, 0, 42, 17, 0, 255]);
    }
    out
}

trait Codec {
    const NAME: &'static str;
    /// Compresses `data` as one message (sync flush, tail kept) with a reset state.
    fn compress(&mut self, data: &[u8], out: &mut Vec<u8>);
    fn inflate(&mut self, data: &[u8], out: &mut Vec<u8>);
}

struct ZlibRs {
    compress: flate2::Compress,
    inflate: flate2::Decompress,
}

impl ZlibRs {
    fn new(bits: u8) -> Self {
        Self::with(bits, bits.max(9))
    }

    /// A compressor with `bits` and an inflater with `inflate_bits` (a larger window reads
    /// any smaller one).
    fn with(bits: u8, inflate_bits: u8) -> Self {
        Self {
            compress: flate2::Compress::new_with_window_bits(
                flate2::Compression::new(6),
                false,
                bits,
            ),
            inflate: flate2::Decompress::new_with_window_bits(false, inflate_bits),
        }
    }
}

impl Codec for ZlibRs {
    const NAME: &'static str = "flate2 + zlib-rs";
    fn compress(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.compress.reset();
        out.clear();
        out.reserve(data.len() + 1024);
        self.compress
            .compress_vec(data, out, flate2::FlushCompress::Sync)
            .unwrap();
    }
    fn inflate(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.inflate.reset(false);
        out.clear();
        out.reserve(128 * 1024);
        self.inflate
            .decompress_vec(data, out, flate2::FlushDecompress::Sync)
            .unwrap();
    }
}

struct Miniz {
    compress: Box<miniz_oxide::deflate::core::CompressorOxide>,
    inflate: Box<miniz_oxide::inflate::stream::InflateState>,
}

impl Miniz {
    fn new() -> Self {
        let flags = miniz_oxide::deflate::core::create_comp_flags_from_zip_params(6, -15, 0);
        Self {
            compress: Box::new(miniz_oxide::deflate::core::CompressorOxide::new(flags)),
            inflate: miniz_oxide::inflate::stream::InflateState::new_boxed(
                miniz_oxide::DataFormat::Raw,
            ),
        }
    }
}

impl Codec for Miniz {
    const NAME: &'static str = "miniz_oxide";
    fn compress(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.compress.reset();
        out.clear();
        out.resize(data.len() + 1024, 0);
        let result = miniz_oxide::deflate::stream::deflate(
            &mut self.compress,
            data,
            out,
            miniz_oxide::MZFlush::Sync,
        );
        out.truncate(result.bytes_written);
    }
    fn inflate(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.inflate.reset(miniz_oxide::DataFormat::Raw);
        out.clear();
        out.resize(128 * 1024, 0);
        let result = miniz_oxide::inflate::stream::inflate(
            &mut self.inflate,
            data,
            out,
            miniz_oxide::MZFlush::Sync,
        );
        out.truncate(result.bytes_written);
    }
}

/// Messages per second for `f`, run for about `budget`.
fn rate(budget: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..16 {
            f();
        }
        n += 16;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn run<C: Codec>(make: impl Fn() -> C, data: &[u8], label: &str) {
    let mut codec = make();
    let mut packed = Vec::new();
    let mut plain = Vec::new();
    codec.compress(data, &mut packed);
    codec.inflate(&packed, &mut plain);
    assert_eq!(plain, data, "{} round trip", C::NAME);
    let compress_rate = rate(Duration::from_secs(2), || {
        codec.compress(black_box(data), &mut packed)
    });
    let inflate_rate = rate(Duration::from_secs(2), || {
        codec.inflate(black_box(&packed), &mut plain)
    });
    // Peak heap of a fresh codec pair processing one message (buffers excluded: they are
    // allocated before the measurement).
    let mut out = Vec::with_capacity(256 * 1024);
    let mut back = Vec::with_capacity(256 * 1024);
    let compressor = allocation_counter::measure(|| {
        let mut codec = make();
        codec.compress(data, &mut out);
        black_box(&codec);
    });
    let decompressor = allocation_counter::measure(|| {
        let mut codec = make();
        codec.inflate(&packed, &mut back);
        black_box(&codec);
    });
    println!(
        "| {} | {label} | {:.0} | {:.0} | {} -> {} | {} KiB |",
        C::NAME,
        compress_rate,
        inflate_rate,
        data.len(),
        packed.len(),
        // Both halves are built by `make`; the figure is the pair's peak.
        compressor.bytes_max.max(decompressor.bytes_max) / 1024,
    );
}

fn main() {
    let chat = chat_json();
    let binary = binary_64k();
    println!(
        "| implementation | message | compressed/s | inflated/s | bytes -> compressed | peak heap (compressor + decompressor) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (label, data) in [("chat JSON 1 KiB", &chat), ("binary 64 KiB", &binary)] {
        run(|| ZlibRs::new(15), data, &format!("{label}, 15-bit window"));
        run(|| ZlibRs::new(11), data, &format!("{label}, 11-bit window"));
        run(
            || ZlibRs::with(11, 15),
            data,
            &format!("{label}, 11-bit window, inflated with 15"),
        );
        run(Miniz::new, data, &format!("{label}, 15-bit window (fixed)"));
    }
}
