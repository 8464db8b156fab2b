//! Masking (RFC 6455 §5.3): XOR of the payload with a repeating 4-byte key.
//!
//! The fast path is safe code shaped for the compiler to vectorise: the key is widened to a
//! 32-byte block and the payload is processed in 32-byte blocks (two SSE2 XORs each on x86-64),
//! then one 8-byte word at a time, then at most 7 single bytes. There is no alignment
//! requirement: a chunk that starts at any offset into a frame is handled by rotating the key
//! first ([`MaskKey::rotated`]). [`apply_mask_naive`] is the byte-at-a-time reference that the
//! tests, the fuzz target and the benchmark compare against.

use super::frame::MaskKey;

const BLOCK: usize = 32;

/// XORs `buf` with `key`, key byte 0 applying to `buf[0]`. Masking and unmasking are the
/// same operation.
pub fn apply_mask(buf: &mut [u8], key: MaskKey) {
    let word = u64::from_ne_bytes([
        key.0[0], key.0[1], key.0[2], key.0[3], key.0[0], key.0[1], key.0[2], key.0[3],
    ]);
    let mut wide = [0u8; BLOCK];
    for (i, byte) in wide.iter_mut().enumerate() {
        *byte = key.0[i % 4];
    }

    let mut blocks = buf.chunks_exact_mut(BLOCK);
    for block in &mut blocks {
        for (byte, k) in block.iter_mut().zip(wide) {
            *byte ^= k;
        }
    }
    // Every block length is a multiple of 4, so the key phase is still 0 here and below.
    let (words, tail) = blocks.into_remainder().as_chunks_mut::<8>();
    for bytes in words {
        *bytes = (u64::from_ne_bytes(*bytes) ^ word).to_ne_bytes();
    }
    for (byte, k) in tail.iter_mut().zip(key.0.iter().cycle()) {
        *byte ^= k;
    }
}

/// Turns bytes masked with `from` into bytes masked with `to` in a single pass: what a proxy
/// does to a client frame it forwards as a client. Both keys must already be rotated to the
/// chunk's offset.
pub fn remask(buf: &mut [u8], from: MaskKey, to: MaskKey) {
    apply_mask(buf, from.xor(to));
}

/// The obvious byte-at-a-time implementation: the reference for tests, fuzzing and benches.
pub fn apply_mask_naive(buf: &mut [u8], key: MaskKey) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= key.0[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc_example_hello() {
        let mut payload = *b"Hello";
        apply_mask(&mut payload, MaskKey([0x37, 0xfa, 0x21, 0x3d]));
        assert_eq!(payload, [0x7f, 0x9f, 0x4d, 0x51, 0x58]);
    }

    #[test]
    fn fast_equals_naive_for_every_length_and_alignment() {
        let key = MaskKey([0x6d, 0xb6, 0xb2, 0x80]);
        let data: Vec<u8> = (0..600u32).map(|i| (i * 7 + 3) as u8).collect();
        for start in 0..16 {
            for len in 0..(data.len() - start) {
                let mut fast = data[start..start + len].to_vec();
                let mut naive = fast.clone();
                apply_mask(&mut fast, key);
                apply_mask_naive(&mut naive, key);
                assert_eq!(fast, naive, "start {start} len {len}");
            }
        }
    }

    proptest! {
        /// Unmasking a frame in arbitrary chunks, each with the key rotated to its offset,
        /// gives the same bytes as unmasking it whole.
        #[test]
        fn chunked_masking_equals_whole(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            key in any::<[u8; 4]>(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let key = MaskKey(key);
            let mut whole = data.clone();
            apply_mask_naive(&mut whole, key);
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
            points.push(0);
            points.push(data.len());
            points.sort_unstable();
            let mut chunked = data.clone();
            for pair in points.windows(2) {
                apply_mask(&mut chunked[pair[0]..pair[1]], key.rotated(pair[0] as u64));
            }
            prop_assert_eq!(chunked, whole);
        }

        /// Re-masking from one key to another in one pass equals unmask-then-mask, at any
        /// offset of either key.
        #[test]
        fn remask_equals_unmask_then_mask(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            from in any::<[u8; 4]>(),
            to in any::<[u8; 4]>(),
            from_offset in 0u64..8,
            to_offset in 0u64..8,
        ) {
            let (from, to) = (MaskKey(from).rotated(from_offset), MaskKey(to).rotated(to_offset));
            let mut two_pass = data.clone();
            apply_mask_naive(&mut two_pass, from);
            apply_mask_naive(&mut two_pass, to);
            let mut one_pass = data;
            remask(&mut one_pass, from, to);
            prop_assert_eq!(one_pass, two_pass);
        }
    }
}
