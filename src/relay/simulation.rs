//! A deterministic world around [`Connection`] for the close-sequence tests and the `relay`
//! fuzz target: two scripted peers with socket buffers of a fixed size, a virtual clock, and
//! checks of what each peer received.
//!
//! Properties checked after every event (a failed `assert!` is a finding):
//! - each event settles in a bounded number of driver rounds (no spin), holding at most
//!   [`Connection::MAX_BUFFERED_BYTES`] in buffers and queued control frames;
//! - every frame a peer receives is valid for its role (masked towards the backend, unmasked
//!   towards the client), nothing follows a close frame, and at most one close arrives; a
//!   stream may end half-way through a frame only where the gateway cut that hop's TCP;
//! - once the peers stop sending, the connection finishes within its timeouts, whether the
//!   peers keep reading or not.
// Compiled for tests and fuzzing only, where a panic is the finding being reported.
#![allow(clippy::panic)]

use super::compress::RelayCompression;
use super::connection::{Connection, RelaySettings, Stop};
use super::credentials::{Credentials, Refresh};
use super::hop::Side;
use crate::metrics::RelayCounters;
use crate::proto::{CloseCode, DecoderConfig, FrameDecoder, Item, OpCode, Role};
use std::time::{Duration, Instant};

/// Bytes a peer's socket takes before a write to it blocks (its receive buffer).
const SOCKET_BUFFER: usize = 4096;
/// Driver rounds an event may take before it counts as a spin.
const MAX_ROUNDS: usize = 10_000;

/// One peer as the gateway sees it through its socket.
#[derive(Debug, Default)]
pub struct Peer {
    /// Bytes the peer sent that the gateway has not read yet.
    outgoing: Vec<u8>,
    /// The peer closed its sending side once `outgoing` is read.
    eof: bool,
    /// The next read or write on this socket fails.
    fail: bool,
    /// Everything the gateway wrote to the peer, in order.
    pub received: Vec<u8>,
    /// Of `received`, what the peer has read out of its socket buffer.
    consumed: usize,
    /// The peer reads what arrives (otherwise its socket buffer fills and writes block).
    pub reading: bool,
    /// The gateway shut down (FIN) its side towards this peer.
    pub shut_down: bool,
}

impl Peer {
    fn new() -> Self {
        Self {
            reading: true,
            ..Self::default()
        }
    }

    fn room(&self) -> usize {
        SOCKET_BUFFER - (self.received.len() - self.consumed)
    }
}

/// A connection between two scripted peers, on a virtual clock.
#[derive(Debug)]
pub struct World {
    pub connection: Connection,
    pub client: Peer,
    pub backend: Peer,
    pub now: Instant,
    start: Instant,
    pub settings: RelaySettings,
    pub compression: RelayCompression,
    /// Read sizes cycled through by the driver (models short reads).
    read_sizes: Vec<usize>,
    read_turn: usize,
    /// When the client's credentials expire, as set and extended by the world: a connection
    /// may live until then, and must end within its timeouts after.
    credentials_until: Option<Instant>,
}

impl World {
    pub fn new(settings: RelaySettings, decoder: DecoderConfig, read_sizes: Vec<usize>) -> Self {
        Self::compressed(settings, RelayCompression::Off, decoder, read_sizes)
    }

    /// A world whose connection negotiated permessage-deflate as `compression` says.
    pub fn compressed(
        settings: RelaySettings,
        compression: RelayCompression,
        decoder: DecoderConfig,
        read_sizes: Vec<usize>,
    ) -> Self {
        let start = Instant::now();
        let decoders = (
            FrameDecoder::new(DecoderConfig {
                role: Role::Server,
                ..decoder
            }),
            FrameDecoder::new(DecoderConfig {
                role: Role::Client,
                // A terminating gateway never negotiates compression with the backend.
                compression: decoder.compression
                    && !matches!(compression, RelayCompression::Terminate(_)),
                ..decoder
            }),
        );
        Self {
            connection: Connection::new(
                decoders,
                settings,
                RelayCounters::default(),
                compression,
                true,
                start,
            ),
            client: Peer::new(),
            backend: Peer::new(),
            now: start,
            start,
            settings,
            compression,
            read_sizes: if read_sizes.is_empty() {
                vec![usize::MAX]
            } else {
                read_sizes
            },
            read_turn: 0,
            credentials_until: None,
        }
    }

    pub fn peer(&mut self, side: Side) -> &mut Peer {
        match side {
            Side::Client => &mut self.client,
            Side::Backend => &mut self.backend,
        }
    }

    /// `side` sends `bytes` (they reach the gateway on its next read).
    pub fn send(&mut self, side: Side, bytes: &[u8]) {
        let peer = self.peer(side);
        if !peer.eof {
            peer.outgoing.extend_from_slice(bytes);
        }
        self.settle();
    }

    /// `side` closes its sending side (FIN after what it sent).
    pub fn close_tcp(&mut self, side: Side) {
        self.peer(side).eof = true;
        self.settle();
    }

    /// `side`'s socket fails (reset).
    pub fn reset(&mut self, side: Side) {
        self.peer(side).fail = true;
        self.settle();
    }

    pub fn set_reading(&mut self, side: Side, reading: bool) {
        self.peer(side).reading = reading;
        self.settle();
    }

    pub fn stop(&mut self, stop: Stop) {
        self.connection.stop(stop, self.now);
        self.settle();
    }

    /// Moves the clock by `by`, firing the timer as the driver would on the way.
    pub fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        let mut firings = 0;
        while let Some(deadline) = self.connection.poll_timeout() {
            if deadline > until {
                break;
            }
            self.now = self.now.max(deadline);
            self.connection.on_timeout(self.now);
            self.settle();
            firings += 1;
            assert!(firings < MAX_ROUNDS, "the timer fires without end");
        }
        self.now = until;
        self.settle();
    }

    /// Time since the connection started.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Runs driver rounds until nothing moves; asserts it ends and checks what peers hold.
    /// Reads can be as short as one byte, so the bound on rounds grows with what the peers
    /// had to send: only rounds beyond that count as a spin.
    pub fn settle(&mut self) {
        let mut rounds = 0;
        let allowance = MAX_ROUNDS + self.client.outgoing.len() + self.backend.outgoing.len();
        while self.round() {
            rounds += 1;
            assert!(rounds < allowance, "the connection does not settle (spin)");
            let buffered = self.connection.buffered_bytes();
            assert!(
                buffered <= Connection::MAX_BUFFERED_BYTES,
                "the connection holds {buffered} bytes, over its bound"
            );
        }
        assert!(
            !self.connection.holds_empty_buffer(),
            "a settled connection holds a buffer with nothing in it (idle memory)"
        );
        self.check_peer(Side::Client);
        self.check_peer(Side::Backend);
    }

    /// How long a refresh the world's verifier accepts extends the credentials.
    pub const REFRESH_EXTENSION: Duration = Duration::from_secs(10);

    /// One round of the driver over both hops: writes, shutdowns, reads; then the check of a
    /// token presented in-band, as the driver makes it: the world's verifier accepts tokens
    /// starting with `ok` (for [`World::REFRESH_EXTENSION`]) and refuses all others.
    fn round(&mut self) -> bool {
        let mut progress = false;
        if let Some(token) = self.connection.take_presented_token() {
            let verdict = if token.starts_with("ok") {
                let until = self.now + Self::REFRESH_EXTENSION;
                self.credentials_until = Some(until);
                Refresh::Extended(Some(until))
            } else {
                Refresh::Refused
            };
            self.connection.on_refresh(verdict, self.now);
            progress = true;
        }
        for side in [Side::Client, Side::Backend] {
            let now = self.now;
            let (connection, peer) = match side {
                Side::Client => (&mut self.connection, &mut self.client),
                Side::Backend => (&mut self.connection, &mut self.backend),
            };
            if peer.reading {
                peer.consumed = peer.received.len();
            }
            while let Some(bytes) = connection.transmit(side) {
                if peer.fail {
                    connection.on_write_error(side, now);
                    progress = true;
                    break;
                }
                let n = bytes.len().min(peer.room());
                if n == 0 {
                    break;
                }
                assert!(!peer.shut_down, "bytes written after the shutdown");
                peer.received.extend_from_slice(&bytes[..n]);
                connection.on_written(side, n, now);
                progress = true;
            }
            if connection.wants_shutdown(side) {
                peer.shut_down = true;
                connection.on_shutdown(side, now);
                progress = true;
            }
            let size = self.read_sizes[self.read_turn % self.read_sizes.len()];
            if let Some(space) = connection.read_space(side) {
                if peer.fail {
                    connection.on_read_error(side, now);
                    progress = true;
                } else if !peer.outgoing.is_empty() {
                    let n = space.len().min(peer.outgoing.len()).min(size.max(1));
                    space[..n].copy_from_slice(&peer.outgoing[..n]);
                    peer.outgoing.drain(..n);
                    connection.on_read(side, n, now);
                    self.read_turn += 1;
                    progress = true;
                } else if peer.eof {
                    connection.on_read(side, 0, now);
                    progress = true;
                } else {
                    connection.on_read_blocked(side);
                }
            }
        }
        progress
    }

    /// Everything `side` received is valid frames for its role, nothing after a close, at most
    /// one close. Returns the frames: (opcode, payload unmasked, fin).
    pub fn check_peer(&self, side: Side) -> Vec<(OpCode, Vec<u8>, bool)> {
        let (received, role) = match side {
            // The client receives what a server sends; the backend what a client sends.
            Side::Client => (&self.client.received, Role::Client),
            Side::Backend => (&self.backend.received, Role::Server),
        };
        let compression = match self.compression {
            RelayCompression::Off => false,
            RelayCompression::Count { .. } => true,
            RelayCompression::Terminate(_) => side == Side::Client,
        };
        let mut decoder = FrameDecoder::new(DecoderConfig {
            compression,
            ..DecoderConfig::new(role)
        });
        let mut bytes = received.clone();
        let mut at = 0;
        let mut frames = Vec::new();
        let mut current: Option<(OpCode, Vec<u8>, bool)> = None;
        let mut closes = 0;
        loop {
            let decoded = decoder.decode(&mut bytes[at..]);
            let decoded = match decoded {
                Ok(Some(decoded)) => decoded,
                Ok(None) => break,
                Err(error) => panic!(
                    "{side} received an invalid frame: {error:?} at byte {at}: {received:02x?}"
                ),
            };
            assert_eq!(closes, 0, "{side} received a frame after a close");
            match decoded.item {
                Item::DataFrame(header) => current = Some((header.opcode, Vec::new(), header.fin)),
                Item::Payload(piece) => {
                    if let Some(frame) = &mut current {
                        frame.1.extend_from_slice(&bytes[at..at + piece.len]);
                        if piece.frame_end {
                            frames.extend(current.take());
                        }
                    }
                }
                Item::Control { header, payload } => {
                    if header.opcode == OpCode::Close {
                        closes += 1;
                    }
                    let payload = bytes[at + payload.start..at + payload.end].to_vec();
                    frames.push((header.opcode, payload, true));
                }
            }
            at += decoded.consumed;
        }
        frames
    }

    /// The close code of the close frame `side` received, if any.
    pub fn close_received_by(&self, side: Side) -> Option<u16> {
        self.check_peer(side)
            .into_iter()
            .find(|(opcode, _, _)| *opcode == OpCode::Close)
            .map(|(_, payload, _)| match payload.get(..2) {
                Some(code) => u16::from_be_bytes([code[0], code[1]]),
                None => 1005,
            })
    }

    /// Gives the client credentials expiring at `expires_at`.
    pub fn set_credentials(&mut self, credentials: Credentials) {
        self.credentials_until = credentials.expires_at;
        self.connection.set_credentials(credentials);
    }

    /// Both peers go quiet (their sends end): the connection must finish within its timeouts.
    pub fn assert_finishes(&mut self) {
        let settings = self.settings;
        let bound = settings.ping_interval.unwrap_or_default()
            + settings.pong_timeout
            + settings.idle_timeout.unwrap_or_default()
            + 4 * settings.close_timeout;
        let deadline = self.credentials_until.map_or(self.now, |u| u.max(self.now)) + bound;
        while !self.connection.is_finished() {
            let Some(next) = self.connection.poll_timeout() else {
                // Without keepalive or an idle timeout a quiet open connection rightly lasts
                // for ever; its peers leaving is what must end it then.
                let unbounded = settings.ping_interval.is_none() && settings.idle_timeout.is_none();
                if unbounded
                    && !self.connection.is_ending()
                    && !(self.client.eof && self.backend.eof)
                {
                    self.close_tcp(Side::Client);
                    self.close_tcp(Side::Backend);
                    continue;
                }
                panic!(
                    "the connection waits with no deadline once the peers are quiet: {:#?}",
                    self.connection
                );
            };
            assert!(
                next <= deadline,
                "the connection outlives its timeouts: next deadline {:?} past the bound {bound:?}",
                next - self.now
            );
            self.advance(next.saturating_duration_since(self.now));
        }
    }
}

impl World {
    /// The data messages `side` received, reassembled, compressed ones inflated (each with
    /// the window the peer allows, 15 bits): (opcode, payload, whether it came compressed).
    pub fn messages(&self, side: Side) -> Vec<(OpCode, Vec<u8>, bool)> {
        let received = match side {
            Side::Client => &self.client.received,
            Side::Backend => &self.backend.received,
        };
        // Validated by `check_peer`; this only reads headers and unmasks.
        let _ = self.check_peer(side);
        let mut inflater = flate2::Decompress::new(false);
        let mut messages = Vec::new();
        let mut current: Option<(OpCode, Vec<u8>, bool)> = None;
        let mut at = 0;
        while at + 2 <= received.len() {
            let Ok(Some((header, len))) = crate::proto::FrameHeader::parse(&received[at..]) else {
                break;
            };
            let end = at + len + header.payload_len as usize;
            if end > received.len() {
                break;
            }
            let mut payload = received[at + len..end].to_vec();
            if let Some(key) = header.mask {
                crate::proto::apply_mask(&mut payload, key);
            }
            at = end;
            if header.opcode.is_control() {
                continue;
            }
            let message = current.get_or_insert((header.opcode, Vec::new(), header.rsv != 0));
            message.1.extend_from_slice(&payload);
            if header.fin
                && let Some((opcode, mut data, compressed)) = current.take()
            {
                if compressed {
                    data.extend_from_slice(&[0, 0, 0xff, 0xff]);
                    let mut out = Vec::with_capacity(1 << 20);
                    inflater
                        .decompress_vec(&data, &mut out, flate2::FlushDecompress::Sync)
                        .unwrap_or_else(|e| panic!("{side} received bad deflate data: {e}"));
                    data = out;
                }
                messages.push((opcode, data, compressed));
            }
        }
        messages
    }
}

/// Raw deflate of `data` as a permessage-deflate sender writes it: a sync flush, its tail
/// removed (RFC 7692 §7.2.1).
pub fn deflate(data: &[u8]) -> Vec<u8> {
    let mut compressor = flate2::Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::new();
    // Until the flush is complete: it is when the output was not filled.
    loop {
        out.reserve(data.len() + 1024);
        let spare = out.capacity() - out.len();
        let input = &data[compressor.total_in() as usize..];
        let before = out.len();
        let _ = compressor.compress_vec(input, &mut out, flate2::FlushCompress::Sync);
        if out.len() - before < spare {
            break;
        }
    }
    out.truncate(out.len().saturating_sub(4));
    out
}

/// A frame as a peer would write it (masked when `mask` is given).
pub fn frame(fin: bool, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::from(fin) << 7 | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// The refresh message carrying `token` (see [`super::credentials`]).
pub fn refresh_message(token: &str) -> Vec<u8> {
    format!(r#"{{"wsgate":"refresh","token":"{token}"}}"#).into_bytes()
}

/// A close frame's payload.
pub fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut out = code.to_be_bytes().to_vec();
    out.extend_from_slice(reason);
    out
}

/// Drives a world from fuzz bytes: settings first, then events until the input ends, then the
/// quiet peers. See the module docs for what is checked.
pub fn fuzz(data: &[u8]) {
    fuzz_with(data, RelayCompression::Off);
}

/// [`fuzz`] on a connection with permessage-deflate: the first byte chooses `terminate` or
/// `passthrough` counting and the context takeover of each side, the rest drives the world as
/// in [`fuzz`], with compressed messages, fragmented ones and bombs among the events.
pub fn fuzz_deflate(data: &[u8]) {
    use super::compress::{Terminated, Window};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let window = |keep: bool, bits: u8| Window {
        bits,
        keep_context: keep,
    };
    let compression = if mode & 1 == 0 {
        RelayCompression::Terminate(Terminated {
            client: window(mode & 2 != 0, 15),
            server: window(mode & 4 != 0, 9 + (mode >> 4) % 7),
            level: 1 + (mode >> 3) % 9,
            min_size: 16,
        })
    } else {
        RelayCompression::Count {
            client: window(mode & 2 != 0, 15),
            backend: window(mode & 4 != 0, 15),
        }
    };
    fuzz_with(rest, compression);
}

fn fuzz_with(data: &[u8], compression: RelayCompression) {
    let compressed = compression != RelayCompression::Off;
    let mut input = data.iter().copied();
    let mut next = move || input.next();
    let flags = next().unwrap_or(0);
    let ms = Duration::from_millis;
    let settings = RelaySettings {
        ping_interval: (flags & 1 != 0).then(|| ms(1000)),
        pong_timeout: ms(500),
        close_timeout: ms(1000),
        idle_timeout: (flags & 2 != 0).then(|| ms(3000)),
        ping_passthrough: flags & 4 != 0,
        message_rate: (flags & 8 != 0).then_some(5),
    };
    let decoder = DecoderConfig {
        max_frame: 1024,
        max_message: 4096,
        compression: compressed,
        // The gateway always keeps opaque payload masked on compressed connections.
        keep_opaque_masked: compressed || flags & 16 != 0,
        ..DecoderConfig::new(Role::Server)
    };
    let read_sizes = (0..(flags >> 5))
        .map(|_| usize::from(next().unwrap_or(0)) * 7 + 1)
        .collect();
    let mut world = World::compressed(settings, compression, decoder, read_sizes);
    while let Some(op) = next() {
        let side = if op & 1 == 0 {
            Side::Client
        } else {
            Side::Backend
        };
        let mask = (side == Side::Client).then_some([0x12, 0x34, 0x56, 0x78]);
        let arg = next().unwrap_or(0);
        let len = usize::from(arg);
        let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        match op >> 1 {
            0 => world.send(side, &frame(true, 0x1, mask, &payload)),
            1 => world.send(side, &frame(true, 0x2, mask, &payload.repeat(8))),
            2 => world.send(side, &frame(false, 0x1, mask, &payload)),
            3 => world.send(side, &frame(arg & 1 != 0, 0x0, mask, &payload)),
            4 => world.send(side, &frame(true, 0x9, mask, &payload[..len.min(125)])),
            5 => world.send(side, &frame(true, 0xA, mask, &payload[..len.min(125)])),
            6 => {
                let code = [1000, 1001, 4000, 1005, 999, 1015][usize::from(arg) % 6];
                world.send(side, &frame(true, 0x8, mask, &close_payload(code, b"bye")));
            }
            7 => world.send(side, &frame(true, 0x8, mask, &[])),
            // Invalid from either side: the other masking, a reserved opcode, bad UTF-8, an
            // oversized control frame, reserved bits.
            8 => world.send(side, &frame(true, 0x1, mask.xor(Some([1, 2, 3, 4])), b"x")),
            9 => world.send(side, &frame(true, 0x3 + arg % 5, mask, b"x")),
            10 => world.send(side, &frame(arg & 1 != 0, 0x1, mask, b"\xce\xff")),
            11 => world.send(side, &frame(true, 0x9, mask, &[0; 126])),
            12 => {
                let mut bytes = frame(true, 0x2, mask, b"rsv");
                bytes[0] |= 0x40;
                world.send(side, &bytes);
            }
            13 => {
                let raw: Vec<u8> = (0..len % 16).map(|_| next().unwrap_or(0)).collect();
                world.send(side, &raw);
            }
            14 => world.close_tcp(side),
            15 => world.reset(side),
            16 => world.set_reading(side, arg & 1 != 0),
            17 => world.advance(ms(u64::from(arg) * 20)),
            18 => world.stop(match arg % 4 {
                1 => Stop::Moved,
                3 => Stop::Expired {
                    code: CloseCode::POLICY_VIOLATION,
                },
                _ => Stop::Shutdown,
            }),
            // Compressed: a message, one in two fragments, a bomb.
            19 => {
                let mut bytes = frame(true, 0x1, mask, &deflate(&payload.repeat(16)));
                bytes[0] |= 0x40;
                world.send(side, &bytes);
            }
            20 => {
                let packed = deflate(&payload.repeat(64));
                let half = packed.len() / 2;
                let mut first = frame(false, 0x2, mask, &packed[..half]);
                first[0] |= 0x40;
                world.send(side, &first);
                world.send(side, &frame(true, 0x0, mask, &packed[half..]));
            }
            21 => {
                let mut bytes = frame(true, 0x2, mask, &deflate(&vec![0; 1 << 16]));
                bytes[0] |= 0x40;
                world.send(side, &bytes);
            }
            22 => world.set_credentials(Credentials {
                expires_at: Some(world.now + ms(u64::from(arg) * 20)),
                expired_code: CloseCode(4001),
                refresh: arg & 1 != 0,
                presented: None,
                last_presented: None,
            }),
            23 => {
                let verdict = if arg & 1 == 0 { "ok" } else { "no" };
                let token = format!("{verdict}.{}", String::from_utf8_lossy(&payload));
                world.send(side, &frame(true, 0x1, mask, &refresh_message(&token)));
            }
            _ => {}
        }
    }
    if data.last().is_some_and(|b| b & 1 == 0) {
        world.client.reading = true;
        world.backend.reading = true;
    }
    world.assert_finishes();
}

#[cfg(test)]
mod tests {
    //! The close sequences, on the virtual clock: who closes first, EOFs at each point, silent
    //! and vanishing peers, with the codes each peer receives and when the connection ends.
    use super::*;

    const CLIENT_MASK: Option<[u8; 4]> = Some([9, 8, 7, 6]);
    const MS: Duration = Duration::from_millis(1);

    fn world(settings: impl FnOnce(&mut RelaySettings)) -> World {
        let mut relay = RelaySettings {
            ping_interval: None,
            pong_timeout: 500 * MS,
            close_timeout: 1000 * MS,
            idle_timeout: None,
            ping_passthrough: false,
            message_rate: None,
        };
        settings(&mut relay);
        World::new(relay, DecoderConfig::new(Role::Server), Vec::new())
    }

    fn close(side: Side, code: u16) -> Vec<u8> {
        let mask = (side == Side::Client).then_some(CLIENT_MASK).flatten();
        frame(true, 0x8, mask, &close_payload(code, b""))
    }

    fn closes(world: &World) -> (Option<u16>, Option<u16>) {
        (
            world.close_received_by(Side::Client),
            world.close_received_by(Side::Backend),
        )
    }

    /// Every committed seed of the `relay` fuzz target (findings are kept there once fixed)
    /// passes the checks.
    #[test]
    fn fuzz_seeds_pass() {
        for (target, run) in [
            ("relay", fuzz as fn(&[u8])),
            ("relay_deflate", fuzz_deflate),
        ] {
            let dir = format!("{}/fuzz/seeds/{target}", env!("CARGO_MANIFEST_DIR"));
            let mut seeds: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|entry| entry.unwrap().path())
                .collect();
            seeds.sort();
            assert!(!seeds.is_empty());
            for seed in seeds {
                eprintln!("seed {}", seed.display());
                run(&std::fs::read(&seed).unwrap());
            }
        }
    }

    #[test]
    fn client_closes_first_backend_answers() {
        let mut w = world(|_| {});
        w.send(Side::Client, &close(Side::Client, 4001));
        assert_eq!(closes(&w), (None, Some(4001)));
        w.send(Side::Backend, &close(Side::Backend, 4001));
        assert_eq!(closes(&w), (Some(4001), Some(4001)));
        assert!(
            w.client.shut_down,
            "the server closes the client's TCP first"
        );
        w.close_tcp(Side::Backend);
        assert!(w.connection.is_finished());
        assert_eq!(w.elapsed(), Duration::ZERO);
    }

    #[test]
    fn backend_closes_first_client_answers() {
        let mut w = world(|_| {});
        w.send(Side::Backend, &close(Side::Backend, 4002));
        w.send(Side::Client, &close(Side::Client, 4002));
        assert_eq!(closes(&w), (Some(4002), Some(4002)));
        assert!(w.client.shut_down);
        assert!(!w.backend.shut_down, "the backend is let to close first");
        w.close_tcp(Side::Backend);
        assert!(w.connection.is_finished());
    }

    #[test]
    fn both_close_at_once_each_gets_exactly_one_close() {
        let mut w = world(|_| {});
        w.client.outgoing = close(Side::Client, 1000);
        w.backend.outgoing = close(Side::Backend, 1001);
        w.settle();
        assert_eq!(closes(&w), (Some(1001), Some(1000)));
        w.close_tcp(Side::Backend);
        assert!(w.connection.is_finished());
    }

    #[test]
    fn client_eof_without_close_backend_gets_1001() {
        let mut w = world(|_| {});
        w.close_tcp(Side::Client);
        assert_eq!(closes(&w), (None, Some(1001)));
        let report = w.connection.report();
        assert_eq!(
            report.cause,
            super::super::Cause::Disconnected(Side::Client)
        );
        w.send(Side::Backend, &close(Side::Backend, 1001));
        w.close_tcp(Side::Backend);
        assert!(w.connection.is_finished());
    }

    #[test]
    fn backend_eof_without_close_client_gets_1014() {
        let mut w = world(|_| {});
        w.close_tcp(Side::Backend);
        assert_eq!(closes(&w), (Some(1014), None));
        w.send(Side::Client, &close(Side::Client, 1014));
        w.close_tcp(Side::Client);
        assert!(w.connection.is_finished());
    }

    #[test]
    fn silent_backend_client_gets_its_reply_at_the_close_timeout() {
        let mut w = world(|_| {});
        w.send(Side::Client, &close(Side::Client, 1000));
        w.advance(999 * MS);
        assert_eq!(closes(&w), (None, Some(1000)));
        w.advance(MS);
        assert_eq!(closes(&w), (Some(1000), Some(1000)));
        w.assert_finishes();
    }

    #[test]
    fn idle_timeout_mid_frame_with_a_silent_backend_cuts_the_client_at_the_close_timeout() {
        let mut w = world(|s| s.idle_timeout = Some(3000 * MS));
        // Half of a 50-byte text frame: the client cannot be sent a close until it ends.
        let mut partial = frame(false, 0x1, None, &[b'a'; 50]);
        partial.truncate(8);
        w.send(Side::Backend, &partial);
        w.advance(3000 * MS);
        assert_eq!(closes(&w), (None, Some(1001)));
        w.advance(1000 * MS);
        assert!(
            w.client.shut_down,
            "the backend gave up on: the client's frame will never end, so its TCP is cut"
        );
        w.assert_finishes();
        assert_eq!(w.connection.report().client.close_sent, Some(1006));
    }

    #[test]
    fn backend_vanishing_instead_of_replying_is_answered_at_once() {
        let mut w = world(|_| {});
        w.send(Side::Client, &close(Side::Client, 4001));
        w.close_tcp(Side::Backend);
        assert_eq!(closes(&w), (Some(4001), Some(4001)));
        assert_eq!(w.elapsed(), Duration::ZERO);
    }

    #[test]
    fn violating_client_gone_before_the_backend_answers_settles() {
        let mut w = world(|_| {});
        w.send(Side::Client, &frame(true, 0x1, None, b"unmasked"));
        assert_eq!(closes(&w), (None, Some(1001)));
        w.close_tcp(Side::Client);
        w.advance(300 * MS);
        w.send(Side::Backend, &close(Side::Backend, 1001));
        w.close_tcp(Side::Backend);
        w.assert_finishes();
        let report = w.connection.report();
        assert!(matches!(
            report.cause,
            super::super::Cause::Violation {
                side: Side::Client,
                ..
            }
        ));
    }

    #[test]
    fn violating_client_gets_its_close_after_the_backends_answers() {
        let mut w = world(|_| {});
        w.send(Side::Client, &frame(true, 0x1, CLIENT_MASK, b"valid"));
        w.send(Side::Client, &frame(true, 0x1, CLIENT_MASK, b"\xff"));
        assert_eq!(closes(&w), (None, Some(1001)));
        w.send(Side::Backend, &frame(true, 0x1, None, b"echo"));
        w.send(Side::Backend, &close(Side::Backend, 1001));
        let frames = w.check_peer(Side::Client);
        assert_eq!(frames[0].1, b"echo");
        assert_eq!(w.close_received_by(Side::Client), Some(1007));
    }

    #[test]
    fn silent_client_gets_ping_then_1001_and_the_backend_is_told() {
        let mut w = world(|s| s.ping_interval = Some(1000 * MS));
        w.advance(1000 * MS);
        assert_eq!(w.check_peer(Side::Client)[0].0, OpCode::Ping);
        w.advance(500 * MS);
        assert_eq!(closes(&w), (Some(1001), Some(1001)));
        w.assert_finishes();
    }

    #[test]
    fn peers_that_close_and_stop_reading_are_let_go_within_two_close_timeouts() {
        let mut w = world(|_| {});
        w.client.reading = false;
        w.backend.reading = false;
        w.send(Side::Backend, &frame(true, 0x2, None, &[0; 8000]));
        w.send(Side::Client, &close(Side::Client, 1000));
        w.send(Side::Backend, &close(Side::Backend, 1000));
        w.advance(2000 * MS);
        assert!(w.connection.is_finished());
    }

    #[test]
    fn shutdown_and_move_send_their_codes() {
        let mut w = world(|_| {});
        w.stop(Stop::Moved);
        assert_eq!(closes(&w), (Some(1012), Some(1001)));
        w.assert_finishes();
        let mut w = world(|_| {});
        w.stop(Stop::Shutdown);
        assert_eq!(closes(&w), (Some(1001), Some(1001)));
        w.send(Side::Client, &close(Side::Client, 1001));
        w.send(Side::Backend, &close(Side::Backend, 1001));
        w.close_tcp(Side::Backend);
        w.close_tcp(Side::Client);
        assert!(w.connection.is_finished());
    }

    #[test]
    fn an_expired_token_sends_the_routes_code_to_the_client_and_1001_to_the_backend() {
        let mut w = world(|_| {});
        w.stop(Stop::Expired {
            code: CloseCode(4001),
        });
        assert_eq!(closes(&w), (Some(4001), Some(1001)));
        w.assert_finishes();
        assert_eq!(w.connection.report().cause, crate::relay::Cause::Expired);
    }

    fn with_credentials(refresh: bool) -> World {
        let mut w = world(|_| {});
        let expires_at = Some(w.now + 5000 * MS);
        w.set_credentials(Credentials {
            expires_at,
            expired_code: CloseCode(4001),
            refresh,
            presented: None,
            last_presented: None,
        });
        w
    }

    #[test]
    fn credentials_expire_with_the_routes_code_for_the_client_and_1001_for_the_backend() {
        let mut w = with_credentials(false);
        w.advance(4999 * MS);
        assert_eq!(closes(&w), (None, None));
        w.advance(MS);
        assert_eq!(closes(&w), (Some(4001), Some(1001)));
        w.assert_finishes();
        assert_eq!(w.connection.report().cause, crate::relay::Cause::Expired);
    }

    #[test]
    fn a_refresh_message_is_consumed_and_an_accepted_token_moves_the_expiry() {
        let mut w = with_credentials(true);
        w.advance(4000 * MS);
        w.send(
            Side::Client,
            &frame(true, 0x1, CLIENT_MASK, &refresh_message("ok.new")),
        );
        w.send(Side::Client, &frame(true, 0x1, CLIENT_MASK, b"after"));
        let frames = w.check_peer(Side::Backend);
        assert_eq!(frames.len(), 1, "the backend never sees the refresh");
        assert_eq!(frames[0].1, b"after");
        // Extended to 4 s + 10 s.
        w.advance(9999 * MS);
        assert_eq!(closes(&w), (None, None));
        w.advance(MS);
        assert_eq!(closes(&w), (Some(4001), Some(1001)));
    }

    #[test]
    fn a_refused_refresh_closes_the_client_with_1008() {
        let mut w = with_credentials(true);
        w.send(
            Side::Client,
            &frame(true, 0x1, CLIENT_MASK, &refresh_message("no.forged")),
        );
        assert_eq!(closes(&w), (None, Some(1001)));
        w.send(Side::Backend, &close(Side::Backend, 1001));
        assert_eq!(closes(&w), (Some(1008), Some(1001)));
        assert!(
            w.check_peer(Side::Backend)
                .iter()
                .all(|f| f.0 == OpCode::Close)
        );
    }

    #[test]
    fn a_refresh_message_split_over_many_reads_never_reaches_the_backend() {
        let mut w = World::new(
            RelaySettings {
                ping_interval: None,
                pong_timeout: 500 * MS,
                close_timeout: 1000 * MS,
                idle_timeout: None,
                ping_passthrough: false,
                message_rate: None,
            },
            DecoderConfig::new(Role::Server),
            vec![1, 3, 2],
        );
        w.set_credentials(Credentials {
            expires_at: None,
            expired_code: CloseCode(4001),
            refresh: true,
            presented: None,
            last_presented: None,
        });
        let refresh = frame(true, 0x1, CLIENT_MASK, &refresh_message("ok.split"));
        let text = frame(
            true,
            0x1,
            CLIENT_MASK,
            br#"{"wsgate":"refresh","token":"a b"}"#,
        );
        w.send(Side::Client, &[refresh, text].concat());
        let frames = w.check_peer(Side::Backend);
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0].1, br#"{"wsgate":"refresh","token":"a b"}"#);
        assert_eq!(closes(&w), (None, None));
    }

    #[test]
    fn without_refresh_the_message_is_an_ordinary_one() {
        let mut w = with_credentials(false);
        w.send(
            Side::Client,
            &frame(true, 0x1, CLIENT_MASK, &refresh_message("ok.new")),
        );
        assert_eq!(w.check_peer(Side::Backend)[0].1, refresh_message("ok.new"));
        assert!(w.connection.take_presented_token().is_none());
    }

    #[test]
    fn tokens_presented_faster_than_once_a_second_are_refused() {
        let mut w = with_credentials(true);
        let refresh = frame(true, 0x1, CLIENT_MASK, &refresh_message("ok.first"));
        w.send(Side::Client, &refresh);
        w.advance(999 * MS);
        assert_eq!(closes(&w), (None, None));
        w.send(Side::Client, &refresh);
        assert_eq!(closes(&w), (None, Some(1001)));
        w.send(Side::Backend, &close(Side::Backend, 1001));
        assert_eq!(closes(&w), (Some(1008), Some(1001)));
    }

    #[test]
    fn a_token_a_second_is_served() {
        let mut w = with_credentials(true);
        let refresh = frame(true, 0x1, CLIENT_MASK, &refresh_message("ok.again"));
        for _ in 0..5 {
            w.send(Side::Client, &refresh);
            w.advance(1000 * MS);
        }
        assert_eq!(closes(&w), (None, None));
    }
}

#[cfg(test)]
mod deflate_tests {
    //! permessage-deflate in the relay: `terminate` inflates client messages into plain frames
    //! and deflates backend messages; both modes hold limits to inflated sizes.
    use super::*;
    use crate::relay::compress::{Terminated, Window};

    const CLIENT_MASK: Option<[u8; 4]> = Some([9, 8, 7, 6]);

    fn settings() -> RelaySettings {
        RelaySettings {
            ping_interval: None,
            pong_timeout: Duration::from_millis(500),
            close_timeout: Duration::from_millis(1000),
            idle_timeout: None,
            ping_passthrough: false,
            message_rate: None,
        }
    }

    fn terminated(client_keeps: bool) -> RelayCompression {
        RelayCompression::Terminate(Terminated {
            client: Window {
                bits: 15,
                keep_context: client_keeps,
            },
            server: Window {
                bits: 11,
                keep_context: false,
            },
            level: 6,
            min_size: 64,
        })
    }

    fn counted() -> RelayCompression {
        let full = Window {
            bits: 15,
            keep_context: true,
        };
        RelayCompression::Count {
            client: full,
            backend: full,
        }
    }

    fn world(compression: RelayCompression, max_message: u64) -> World {
        let decoder = DecoderConfig {
            max_frame: max_message,
            max_message,
            compression: true,
            keep_opaque_masked: true,
            ..DecoderConfig::new(Role::Server)
        };
        World::compressed(settings(), compression, decoder, Vec::new())
    }

    /// A compressed frame (RSV1 on the first frame of a message).
    fn compressed(fin: bool, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
        let mut bytes = frame(fin, opcode, mask, payload);
        if opcode != 0 {
            bytes[0] |= 0x40;
        }
        bytes
    }

    /// The code the client is refused with: the backend is told first (1001), and the client
    /// learns of its error once the backend has answered.
    fn refusal(w: &mut World) -> Option<u16> {
        assert_eq!(w.close_received_by(Side::Backend), Some(1001));
        w.send(
            Side::Backend,
            &frame(true, 0x8, None, &close_payload(1001, b"")),
        );
        w.close_received_by(Side::Client)
    }

    fn chat(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| format!("{{\"user\":\"u{}\",\"text\":\"hello number {i}\"}},", i % 7))
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn terminate_inflates_client_messages_into_plain_frames() {
        let mut w = world(terminated(false), 1 << 20);
        let text = chat(20);
        w.send(
            Side::Client,
            &compressed(true, 0x1, CLIENT_MASK, &deflate(&text)),
        );
        assert_eq!(
            w.messages(Side::Backend),
            [(OpCode::Text, text.clone(), false)]
        );
        // A plain message on a compressed connection passes as it is; so does an empty one.
        w.send(Side::Client, &frame(true, 0x2, CLIENT_MASK, b"plain"));
        w.send(
            Side::Client,
            &compressed(true, 0x1, CLIENT_MASK, &deflate(b"")),
        );
        assert_eq!(
            w.messages(Side::Backend)[2],
            (OpCode::Text, Vec::new(), false)
        );
        assert_eq!(
            w.messages(Side::Backend)[1],
            (OpCode::Binary, b"plain".to_vec(), false)
        );
    }

    #[test]
    fn terminate_deflates_backend_messages_from_the_minimum_size() {
        let mut w = world(terminated(false), 1 << 20);
        let text = chat(30);
        w.send(Side::Backend, &frame(true, 0x1, None, &text));
        w.send(Side::Backend, &frame(true, 0x1, None, b"short"));
        w.send(Side::Backend, &frame(true, 0x2, None, b""));
        let got = w.messages(Side::Client);
        assert_eq!(got[2], (OpCode::Binary, Vec::new(), false));
        assert_eq!(got[0], (OpCode::Text, text.clone(), true));
        assert_eq!(got[1], (OpCode::Text, b"short".to_vec(), false));
        let wire = w.client.received.len();
        assert!(wire < text.len() / 2, "{wire} bytes for {}", text.len());
    }

    #[test]
    fn terminate_moves_messages_larger_than_its_buffers_both_ways() {
        let mut w = world(terminated(true), 4 << 20);
        let big = chat(12_000); // ~400 KiB: several output buffers each way
        // Fragmented on input: three frames, the first compressed.
        let packed = deflate(&big);
        let third = packed.len() / 3;
        w.send(
            Side::Client,
            &compressed(false, 0x1, CLIENT_MASK, &packed[..third]),
        );
        w.send(
            Side::Client,
            &frame(false, 0x0, CLIENT_MASK, &packed[third..2 * third]),
        );
        w.send(
            Side::Client,
            &frame(true, 0x0, CLIENT_MASK, &packed[2 * third..]),
        );
        assert_eq!(
            w.messages(Side::Backend),
            [(OpCode::Text, big.clone(), false)]
        );
        w.send(Side::Backend, &frame(true, 0x2, None, &big));
        assert_eq!(w.messages(Side::Client), [(OpCode::Binary, big, true)]);
        assert!(w.connection.buffered_bytes() <= Connection::MAX_BUFFERED_BYTES);
    }

    #[test]
    fn client_context_takeover_is_kept_when_agreed() {
        let mut w = world(terminated(true), 1 << 20);
        let mut compressor = flate2::Compress::new(flate2::Compression::default(), false);
        let text = chat(10);
        for _ in 0..3 {
            let mut out = Vec::with_capacity(text.len() + 64);
            compressor
                .compress_vec(&text, &mut out, flate2::FlushCompress::Sync)
                .unwrap();
            out.truncate(out.len() - 4);
            w.send(Side::Client, &compressed(true, 0x1, CLIENT_MASK, &out));
        }
        let got = w.messages(Side::Backend);
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|(_, data, _)| *data == text));
    }

    /// 1 KiB of deflate that inflates to 1 MiB, against a 64 KiB limit.
    fn bomb() -> Vec<u8> {
        let packed = deflate(&vec![b'a'; 1 << 20]);
        assert!(packed.len() < 2048, "{}", packed.len());
        packed
    }

    #[test]
    fn terminate_closes_a_bomb_with_1009_once_it_inflates_past_max_message() {
        let mut w = world(terminated(false), 64 * 1024);
        w.send(Side::Client, &compressed(true, 0x2, CLIENT_MASK, &bomb()));
        assert_eq!(refusal(&mut w), Some(1009));
        // What reached the backend stopped at the limit.
        let forwarded: usize = w
            .check_peer(Side::Backend)
            .iter()
            .filter(|(op, _, _)| !op.is_control())
            .map(|(_, data, _)| data.len())
            .sum();
        assert!(forwarded <= 64 * 1024, "{forwarded}");
    }

    #[test]
    fn terminate_closes_a_fragmented_bomb_with_1009() {
        let mut w = world(terminated(false), 64 * 1024);
        let packed = bomb();
        let pieces: Vec<_> = packed.chunks(16).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let fin = i + 1 == pieces.len();
            let bytes = if i == 0 {
                compressed(fin, 0x2, CLIENT_MASK, piece)
            } else {
                frame(fin, 0x0, CLIENT_MASK, piece)
            };
            w.send(Side::Client, &bytes);
        }
        assert_eq!(refusal(&mut w), Some(1009));
    }

    #[test]
    fn passthrough_forwards_compressed_bytes_unchanged_and_counts_them_inflated() {
        let mut w = world(counted(), 64 * 1024);
        let text = chat(20);
        let packed = deflate(&text);
        w.send(Side::Client, &compressed(true, 0x1, CLIENT_MASK, &packed));
        let frames = w.check_peer(Side::Backend);
        assert_eq!(
            frames[0].1, packed,
            "the compressed payload passes unchanged"
        );
        w.send(Side::Client, &compressed(true, 0x2, CLIENT_MASK, &bomb()));
        assert_eq!(refusal(&mut w), Some(1009));
    }

    #[test]
    fn passthrough_closes_a_fragmented_bomb_with_1009() {
        let mut w = world(counted(), 64 * 1024);
        let packed = bomb();
        let pieces: Vec<_> = packed.chunks(16).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let fin = i + 1 == pieces.len();
            let bytes = if i == 0 {
                compressed(fin, 0x2, CLIENT_MASK, piece)
            } else {
                frame(fin, 0x0, CLIENT_MASK, piece)
            };
            w.send(Side::Client, &bytes);
        }
        // The frame that crossed the limit was half-way to the backend: its TCP is cut, and the
        // client is told at once.
        assert_eq!(w.close_received_by(Side::Client), Some(1009));
        assert!(w.backend.shut_down);
    }

    #[test]
    fn invalid_deflate_and_invalid_inflated_utf8_are_1007() {
        let mut w = world(terminated(false), 1 << 20);
        w.send(
            Side::Client,
            &compressed(true, 0x1, CLIENT_MASK, &[0xff; 40]),
        );
        assert_eq!(refusal(&mut w), Some(1007));
        let mut w = world(terminated(false), 1 << 20);
        w.send(
            Side::Client,
            &compressed(true, 0x1, CLIENT_MASK, &deflate(b"ok \xce\xff")),
        );
        assert_eq!(refusal(&mut w), Some(1007));
    }
}
