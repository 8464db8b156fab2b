//! Masking keys for frames the gateway sends as a client (towards backends).
//!
//! RFC 6455 §5.3: "The masking key needs to be unpredictable; thus, the masking key MUST be
//! derived from a strong source of entropy". Keys come from `rand`'s thread-local CSPRNG
//! (ChaCha12, seeded from the operating system and reseeded from it every 64 KiB of output),
//! taken 4 KiB at a time per thread, so a key costs a copy. Fetching them from the kernel
//! (getrandom, 4 KiB per call) spent 1.6 % of the gateway's CPU time on the kernel's ChaCha20
//! with 64-byte messages. A client's own key is never reused: it is chosen by the client, who
//! could pick one that turns its payload into an attack on intermediaries between the gateway
//! and the backend.

use crate::proto::MaskKey;
use std::cell::RefCell;

const BATCH: usize = 4096;

struct KeyBytes {
    bytes: [u8; BATCH],
    used: usize,
}

thread_local! {
    static KEYS: RefCell<KeyBytes> = const { RefCell::new(KeyBytes { bytes: [0; BATCH], used: BATCH }) };
}

/// A fresh masking key.
#[inline]
pub fn next_mask_key() -> MaskKey {
    MaskKey(take())
}

/// 16 random bytes for a `Sec-WebSocket-Key` or an identifier, from the same batches as the
/// masking keys (a getrandom call per handshake was one of its 25 syscalls).
pub fn random_16() -> [u8; 16] {
    take()
}

/// The next `N` unused bytes of this thread's batch; no byte is handed out twice.
#[inline]
fn take<const N: usize>() -> [u8; N] {
    KEYS.with(|keys| {
        let mut keys = keys.borrow_mut();
        if keys.used + N > BATCH {
            refill(&mut keys.bytes);
            keys.used = 0;
        }
        let at = keys.used;
        keys.used += N;
        let mut out = [0u8; N];
        out.copy_from_slice(&keys.bytes[at..at + N]);
        out
    })
}

fn refill(bytes: &mut [u8]) {
    // `rand::rng()` panics if the operating system cannot seed it: keys never fall back to
    // something predictable.
    rand::RngCore::fill_bytes(&mut rand::rng(), bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_across_batches() {
        let keys: Vec<MaskKey> = (0..2 * BATCH / 4 + 3).map(|_| next_mask_key()).collect();
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        // 515 random 32-bit keys: a collision has probability ~3e-5.
        assert!(distinct.len() >= keys.len() - 1);
    }
}
