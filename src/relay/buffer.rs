//! The read buffer of one hop, taken from a per-thread pool only while it holds bytes.
//!
//! Frames are transformed in place and forwarded straight from this buffer: there is no
//! second copy between reading and writing. The buffer is split by three indices:
//!
//! ```text
//! 0 <= start <= parsed <= filled <= BUFFER_LEN
//! [start..parsed)  processed bytes waiting to be written to the other hop
//! [parsed..filled) read but not yet decoded (a partial header or control frame)
//! ```
//!
//! When `start == filled` the buffer holds nothing and goes back to the pool, so an idle
//! connection owns no buffer at all; that is what keeps idle connections small.

use crate::metrics::RELAY_BUFFER_BYTES;
use std::cell::RefCell;

/// 64 KiB: four TLS records, and a 64 KiB message moves in one read and one write per hop
/// (at 32 KiB it took three of each: 16 % fewer 64 KiB messages per CPU-second).
/// A buffer is held only while bytes are in it, so the size costs nothing on idle connections.
pub const BUFFER_LEN: usize = 64 * 1024;

/// Buffers kept per worker thread for reuse: enough for the connections busy at one instant
/// on one thread, small enough (1 MiB) not to show in the memory of idle connections.
const POOL_LIMIT: usize = 16;

/// The buffers of one thread not lent to a connection. Every buffer in memory is either in a
/// pool or in a [`HopBuffer`], and [`RELAY_BUFFER_BYTES`] counts both: it goes up when
/// [`take_buffer`] allocates and down when a buffer is freed (pool full, or thread gone).
#[derive(Default)]
struct Pool(Vec<Block>);

/// One buffer. A fixed-size array behind a thin pointer: the hop holds 8 bytes for it, not a
/// slice's 16 (an idle connection's size is mostly fields like this one).
type Block = Box<[u8; BUFFER_LEN]>;

impl Drop for Pool {
    fn drop(&mut self) {
        RELAY_BUFFER_BYTES.dec_by((self.0.len() * BUFFER_LEN) as i64);
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::default();
}

fn take_buffer() -> Block {
    let pooled = POOL
        .try_with(|pool| pool.borrow_mut().0.pop())
        .ok()
        .flatten();
    pooled.unwrap_or_else(|| {
        RELAY_BUFFER_BYTES.inc_by(BUFFER_LEN as i64);
        // Zeroed on the heap directly (an array literal would be built on the stack first).
        let block: Box<[u8]> = vec![0u8; BUFFER_LEN].into_boxed_slice();
        block
            .try_into()
            .unwrap_or_else(|_| Box::new([0; BUFFER_LEN]))
    })
}

fn give_back(buffer: Block) {
    let mut spare = Some(buffer);
    // A thread being torn down has no pool left: its buffer is simply freed.
    let _ = POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.0.len() < POOL_LIMIT
            && let Some(buffer) = spare.take()
        {
            pool.0.push(buffer);
        }
    });
    if spare.is_some() {
        RELAY_BUFFER_BYTES.dec_by(BUFFER_LEN as i64);
    }
}

#[derive(Debug, Default)]
pub struct HopBuffer {
    bytes: Option<Block>,
    pub start: usize,
    pub parsed: usize,
    pub filled: usize,
}

impl HopBuffer {
    /// Processed bytes not yet written.
    #[inline]
    pub fn pending(&self) -> &[u8] {
        match &self.bytes {
            Some(bytes) => &bytes[self.start..self.parsed],
            None => &[],
        }
    }

    pub fn has_pending(&self) -> bool {
        self.start < self.parsed
    }

    pub fn has_unparsed(&self) -> bool {
        self.parsed < self.filled
    }

    /// The whole buffer, taken from the pool if this hop holds none.
    #[inline]
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes.get_or_insert_with(take_buffer)[..]
    }

    /// Room to read into, after moving the live bytes to the front if that makes room.
    #[inline]
    pub fn read_space(&mut self) -> &mut [u8] {
        if self.start > 0 && self.filled == BUFFER_LEN {
            self.compact();
        }
        let filled = self.filled;
        &mut self.bytes_mut()[filled..]
    }

    fn compact(&mut self) {
        let (start, filled) = (self.start, self.filled);
        if let Some(bytes) = &mut self.bytes {
            bytes.copy_within(start..filled, 0);
        }
        self.parsed -= start;
        self.filled -= start;
        self.start = 0;
    }

    /// Removes `len` processed-but-unforwarded bytes at `parsed` (a control frame the gateway
    /// answers itself), keeping what follows.
    pub fn remove_at_parsed(&mut self, len: usize) {
        let at = self.parsed;
        if self.start == at {
            self.start += len;
            self.parsed += len;
        } else if let Some(bytes) = &mut self.bytes {
            bytes.copy_within(at + len..self.filled, at);
            self.filled -= len;
        }
        self.release_if_empty();
    }

    /// Forgets everything not yet parsed (after the peer's close or a protocol error).
    pub fn discard_unparsed(&mut self) {
        self.filled = self.parsed;
        self.release_if_empty();
    }

    /// Forgets everything (the destination is gone).
    pub fn discard_all(&mut self) {
        self.start = self.filled;
        self.parsed = self.filled;
        self.release_if_empty();
    }

    #[inline]
    pub fn advance_written(&mut self, n: usize) {
        debug_assert!(self.start + n <= self.parsed);
        self.start += n;
        self.release_if_empty();
    }

    /// Returns the buffer to the pool when it holds no bytes.
    #[inline]
    pub fn release_if_empty(&mut self) {
        if self.start == self.filled {
            self.start = 0;
            self.parsed = 0;
            self.filled = 0;
            if let Some(bytes) = self.bytes.take() {
                give_back(bytes);
            }
        }
    }

    pub fn holds_buffer(&self) -> bool {
        self.bytes.is_some()
    }
}

impl Drop for HopBuffer {
    fn drop(&mut self) {
        if let Some(bytes) = self.bytes.take() {
            give_back(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_is_released_when_drained() {
        let mut buf = HopBuffer::default();
        buf.read_space()[..3].copy_from_slice(b"abc");
        buf.filled = 3;
        buf.parsed = 3;
        assert!(buf.holds_buffer());
        assert_eq!(buf.pending(), b"abc");
        buf.advance_written(3);
        assert!(!buf.holds_buffer());
        assert_eq!((buf.start, buf.parsed, buf.filled), (0, 0, 0));
    }

    #[test]
    fn removing_a_frame_keeps_pending_and_following_bytes() {
        let mut buf = HopBuffer::default();
        buf.read_space()[..9].copy_from_slice(b"aaPPPPbbb");
        buf.filled = 9;
        buf.parsed = 2; // "aa" processed, "PPPP" is the frame to drop
        buf.remove_at_parsed(4);
        assert_eq!(buf.pending(), b"aa");
        assert_eq!(&buf.bytes_mut()[2..5], b"bbb");
        assert_eq!(buf.filled, 5);
        // With nothing pending, dropping is just advancing.
        let mut buf = HopBuffer::default();
        buf.read_space()[..6].copy_from_slice(b"PPPPbb");
        buf.filled = 6;
        buf.remove_at_parsed(4);
        assert_eq!((buf.start, buf.parsed, buf.filled), (4, 4, 6));
    }

    #[test]
    fn full_buffer_compacts_before_reading() {
        let mut buf = HopBuffer::default();
        buf.bytes_mut();
        buf.filled = BUFFER_LEN;
        buf.parsed = BUFFER_LEN - 10;
        buf.start = BUFFER_LEN - 20;
        assert_eq!(buf.read_space().len(), BUFFER_LEN - 20);
        assert_eq!((buf.start, buf.parsed, buf.filled), (0, 10, 20));
    }
}
