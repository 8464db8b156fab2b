//! Control frames the gateway itself sends to one hop: pongs, keepalive pings, close frames.
//!
//! They are written only at a frame boundary of the forwarded stream to that hop, never inside
//! a data frame. The box is allocated while something is queued and dropped once written, so an
//! idle hop carries one null pointer. Order on the wire: pongs, ping, close; nothing is queued
//! after a close (RFC 6455 §5.5.1: no frames after a close). Every ping is answered while at
//! most `MAX_PONGS` answers wait; beyond that the oldest are dropped, which RFC 6455 §5.5.3
//! allows ("only the most recent"), so a peer that pings without reading costs bounded memory.

use crate::proto::{ControlFrame, OpCode};
use std::collections::VecDeque;

const MAX_PONGS: usize = 16;

#[derive(Debug, Default)]
struct Queue {
    /// The frame being written and how many of its bytes are out already.
    writing: Option<(ControlFrame, usize)>,
    pongs: VecDeque<ControlFrame>,
    ping: Option<ControlFrame>,
    close: Option<ControlFrame>,
}

#[derive(Debug, Default)]
pub struct Outbox {
    queue: Option<Box<Queue>>,
    /// A close frame has been queued (it may be written already).
    closed: bool,
}

impl Outbox {
    /// Queues a frame; anything after a close is dropped.
    pub fn push(&mut self, frame: ControlFrame) {
        if self.closed {
            return;
        }
        let queue = self.queue.get_or_insert_with(Default::default);
        match frame.opcode() {
            OpCode::Pong => {
                if queue.pongs.len() == MAX_PONGS {
                    queue.pongs.pop_front();
                }
                queue.pongs.push_back(frame);
            }
            OpCode::Ping => queue.ping = Some(frame),
            _ => {
                queue.close = Some(frame);
                self.closed = true;
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_none()
    }

    pub fn close_queued(&self) -> bool {
        self.closed
    }

    /// The bytes to write next, if any.
    pub fn next_bytes(&mut self) -> Option<&[u8]> {
        let queue = self.queue.as_mut()?;
        if queue.writing.is_none() {
            let next = queue
                .pongs
                .pop_front()
                .or_else(|| queue.ping.take())
                .or_else(|| queue.close.take());
            queue.writing = next.map(|frame| (frame, 0));
        }
        if queue.writing.is_none() {
            self.queue = None;
            return None;
        }
        let (frame, written) = self.queue.as_ref()?.writing.as_ref()?;
        Some(&frame.as_bytes()[*written..])
    }

    /// Records that `n` bytes of `next_bytes()` were written.
    pub fn advance(&mut self, n: usize) {
        let Some(queue) = self.queue.as_mut() else {
            return;
        };
        if let Some((frame, written)) = &mut queue.writing {
            *written += n;
            if *written >= frame.as_bytes().len() {
                queue.writing = None;
                if queue.pongs.is_empty() && queue.ping.is_none() && queue.close.is_none() {
                    self.queue = None;
                }
            }
        }
    }

    /// Memory the queued frames take; at most [`Outbox::MAX_HELD_BYTES`].
    pub fn held_bytes(&self) -> usize {
        self.queue.as_ref().map_or(0, |queue| {
            let frames = queue.pongs.capacity()
                + usize::from(queue.writing.is_some())
                + usize::from(queue.ping.is_some())
                + usize::from(queue.close.is_some());
            size_of::<Queue>() + frames * size_of::<ControlFrame>()
        })
    }

    /// The most an outbox holds: the pongs' ring grown to its limit plus the frame being
    /// written, a ping and a close.
    pub const MAX_HELD_BYTES: usize =
        size_of::<Queue>() + (MAX_PONGS.next_power_of_two() + 3) * size_of::<ControlFrame>();

    /// Drops whatever is queued (the hop is gone).
    pub fn clear(&mut self) {
        self.queue = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{CloseCode, close_frame};

    fn drain(outbox: &mut Outbox) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(bytes) = outbox.next_bytes() {
            // Write in two halves to exercise partial writes.
            let half = bytes.len().div_ceil(2);
            out.extend_from_slice(&bytes[..half]);
            outbox.advance(half);
        }
        out
    }

    #[test]
    fn order_is_pongs_ping_close_and_nothing_after_close() {
        let mut outbox = Outbox::default();
        outbox.push(close_frame(CloseCode::NORMAL, "", None));
        let mut outbox2 = Outbox::default();
        outbox2.push(ControlFrame::new(OpCode::Pong, b"1", None));
        outbox2.push(ControlFrame::new(OpCode::Ping, b"p", None));
        outbox2.push(ControlFrame::new(OpCode::Pong, b"2", None));
        outbox2.push(close_frame(CloseCode::NORMAL, "", None));
        outbox2.push(ControlFrame::new(OpCode::Pong, b"3", None));
        assert_eq!(
            drain(&mut outbox2),
            [
                &[0x8A, 1, b'1'][..],
                &[0x8A, 1, b'2'],
                &[0x89, 1, b'p'],
                &[0x88, 2, 3, 0xE8]
            ]
            .concat()
        );
        assert!(outbox2.is_empty());
        assert!(outbox2.close_queued());
        assert_eq!(drain(&mut outbox), [0x88, 2, 3, 0xE8]);
    }

    #[test]
    fn pending_pongs_are_bounded() {
        let mut outbox = Outbox::default();
        for i in 0..100u8 {
            outbox.push(ControlFrame::new(OpCode::Pong, &[i], None));
        }
        let out = drain(&mut outbox);
        assert_eq!(out.len(), 3 * MAX_PONGS);
        assert_eq!(
            out[2],
            100 - MAX_PONGS as u8,
            "the oldest answers were dropped"
        );
    }
}
