//! The end-to-end benchmark's blind TCP relay on io_uring: the job of `benches/e2e/tcp_relay.rs`
//! (accept, connect to the backend, copy bytes both ways, no protocol work) without epoll and
//! without a system call per read or write. All submissions of one loop turn go to the kernel
//! in one `io_uring_enter`, which also waits for the next completions.
//!
//! It answers one question: can a different kernel interface make a proxy's work per small
//! message cheaper than a blind epoll relay's (and so nginx's)? `python3 benches/e2e.py
//! --targets tcp,uring,nginx,wsgate --scenarios small` compares it; every echo is still
//! checked byte for byte by the load generator, which is this program's test.
//!
//! `uring_relay 127.0.0.1:9002 127.0.0.1:9001`
//!
//! One thread, like the other targets. Each direction keeps one operation in flight: a receive
//! into its buffer, then sends of what arrived until all of it is written, then the next
//! receive (what nginx and the epoll relay do, one step each).

use io_uring::{IoUring, opcode, squeue, types};
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Per direction, as in the epoll relay: a 64 KiB message moves in one receive and one send.
const BUFFER: usize = 64 * 1024;
const RING_ENTRIES: u32 = 4096;
/// `user_data` of the accept; a connection's operations carry (slot, direction, is-send).
const ACCEPT: u64 = u64::MAX;

/// One direction of a connection: bytes received from `from` wait in `buffer[written..filled]`
/// until they are sent to the other socket.
struct Direction {
    buffer: Box<[u8]>,
    filled: usize,
    written: usize,
    finished: bool,
}

struct Connection {
    /// `sockets[d]` is the source of direction `d`: 0 client → backend, 1 backend → client.
    sockets: [TcpStream; 2],
    directions: [Direction; 2],
    /// Operations submitted and not completed: the slot (sockets and buffers) is kept until
    /// this is zero, because the kernel may use both until then.
    in_flight: u32,
    broken: bool,
}

fn user_data(slot: usize, direction: usize, send: bool) -> u64 {
    ((slot as u64) << 2) | ((direction as u64) << 1) | u64::from(send)
}

struct Relay {
    ring: IoUring,
    listener: TcpListener,
    backend: String,
    slots: Vec<Option<Connection>>,
}

impl Relay {
    /// Queues `entry`, flushing the submission queue to the kernel if it is full.
    ///
    /// # Safety
    /// Every buffer `entry` points into must stay allocated and untouched by us, and every file
    /// descriptor open, until the operation's completion has been reaped.
    unsafe fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller guarantees the buffers and descriptors outlive the operation.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn submit_accept(&mut self) -> io::Result<()> {
        let accept = opcode::Accept::new(
            types::Fd(self.listener.as_raw_fd()),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .build()
        .user_data(ACCEPT);
        // SAFETY: no buffer (the peer address is not asked for); the listener lives as long as
        // the relay.
        unsafe { self.push(accept) }
    }

    /// Submits the next step of `direction` of `slot`: the rest of a send, or a receive.
    fn submit_next(&mut self, slot: usize, direction: usize) -> io::Result<()> {
        let Some(connection) = self.slots[slot].as_mut() else {
            return Ok(());
        };
        let d = &mut connection.directions[direction];
        let entry = if d.written < d.filled {
            let to = connection.sockets[1 - direction].as_raw_fd();
            let pending = &d.buffer[d.written..d.filled];
            opcode::Send::new(types::Fd(to), pending.as_ptr(), pending.len() as u32)
                .build()
                .user_data(user_data(slot, direction, true))
        } else {
            d.filled = 0;
            d.written = 0;
            let from = connection.sockets[direction].as_raw_fd();
            opcode::Recv::new(types::Fd(from), d.buffer.as_mut_ptr(), BUFFER as u32)
                .build()
                .user_data(user_data(slot, direction, false))
        };
        connection.in_flight += 1;
        // SAFETY: the buffer and both sockets belong to the slot, which is emptied only when
        // `in_flight` is back to zero, i.e. after this operation's completion; while a
        // direction has an operation in flight nothing else reads or writes its buffer.
        unsafe { self.push(entry) }
    }

    fn on_accept(&mut self, result: i32) -> io::Result<()> {
        self.submit_accept()?;
        if result < 0 {
            return Ok(()); // EMFILE and the like: the next accept may succeed.
        }
        // SAFETY: the kernel just returned this descriptor for us alone; nothing else owns it.
        let client = TcpStream::from(unsafe { OwnedFd::from_raw_fd(result) });
        let Ok(backend) = TcpStream::connect(&self.backend) else {
            return Ok(()); // dropping `client` closes it
        };
        client.set_nodelay(true)?;
        backend.set_nodelay(true)?;
        let direction = || Direction {
            buffer: vec![0u8; BUFFER].into_boxed_slice(),
            filled: 0,
            written: 0,
            finished: false,
        };
        let connection = Connection {
            sockets: [client, backend],
            directions: [direction(), direction()],
            in_flight: 0,
            broken: false,
        };
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[slot] = Some(connection);
        self.submit_next(slot, 0)?;
        self.submit_next(slot, 1)
    }

    fn on_completion(&mut self, data: u64, result: i32) -> io::Result<()> {
        let (slot, direction, send) = (
            (data >> 2) as usize,
            ((data >> 1) & 1) as usize,
            data & 1 == 1,
        );
        let Some(connection) = self.slots[slot].as_mut() else {
            return Ok(());
        };
        connection.in_flight -= 1;
        let mut next = false;
        if connection.broken {
            connection.directions[direction].finished = true;
        } else if result < 0 || (send && result == 0) {
            // A reset or a failed send ends both directions: wake the other one's receive.
            connection.broken = true;
            connection.directions[direction].finished = true;
            for socket in &connection.sockets {
                let _ = socket.shutdown(Shutdown::Both);
            }
        } else if !send && result == 0 {
            // End of stream: pass it on, the other direction goes on.
            connection.directions[direction].finished = true;
            let _ = connection.sockets[1 - direction].shutdown(Shutdown::Write);
        } else {
            let d = &mut connection.directions[direction];
            if send {
                d.written += result as usize;
            } else {
                d.filled = result as usize;
            }
            next = true;
        }
        if next {
            return self.submit_next(slot, direction);
        }
        if connection.in_flight == 0 && connection.directions.iter().all(|d| d.finished) {
            self.slots[slot] = None; // closes both sockets; the kernel holds no buffer any more
        }
        Ok(())
    }

    fn run(&mut self) -> io::Result<()> {
        self.submit_accept()?;
        let mut completions = Vec::with_capacity(RING_ENTRIES as usize);
        loop {
            self.ring.submit_and_wait(1)?;
            completions.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for (data, result) in completions.drain(..) {
                if data == ACCEPT {
                    self.on_accept(result)?;
                } else {
                    self.on_completion(data, result)?;
                }
            }
        }
    }
}

fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:9002".to_owned());
    let backend = args.next().unwrap_or_else(|| "127.0.0.1:9001".to_owned());
    // One issuer and task work run only when we wait: completions are processed in batches
    // in this thread, never in interrupts of it.
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(RING_ENTRIES)?;
    let listener = TcpListener::bind(&listen)?;
    eprintln!("bench io_uring relay listening on {listen}, relaying to {backend}");
    Relay {
        ring,
        listener,
        backend,
        slots: Vec::new(),
    }
    .run()
}
