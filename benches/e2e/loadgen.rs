//! The end-to-end benchmark's load generator: WebSocket clients over raw TCP that send
//! pre-masked frames and check every echoed payload byte for byte. One run is one scenario
//! against one target; `benches/e2e.py` runs them all, interleaved, and builds the tables.
//!
//! ```text
//! loadgen throughput --target 127.0.0.1:9002 --connections 100 --size 64 --window 32
//! loadgen latency    --target 127.0.0.1:9002,127.0.0.1:9003 --connections 50 --rate 2500
//! loadgen idle       --target 127.0.0.1:9002 --connections 9000 --proxy-pid 1234
//! loadgen handshakes --target 127.0.0.1:9002 --connections 32
//! loadgen throughput --target 127.0.0.1:9002 --connections 50 --size 1024 --window 4 --deflate
//! ```
//!
//! Prints one JSON object. CPU time (user + system, in clock ticks from `/proc/PID/stat`) is
//! sampled for the proxy, the backend and the load generator itself at the start and the end
//! of the measured window, so the caller can tell which side was saturated.
//!
//! Every payload carries its sequence number (and, for latency, its intended send time) in its
//! first bytes and a per-connection random filler after them; an echo is accepted only if all
//! of it comes back unchanged and in order. The client shares no code with wsgate's codec.
//!
//! With `--deflate` it offers permessage-deflate (RFC 7692) as browsers do. Where the server
//! agrees, every message is chat-like JSON text sent compressed: a stored deflate block
//! carrying the sequence number, then the rest of the message compressed once per connection
//! (each message is then a complete, independent deflate stream without compressing anything
//! per message, so the load generator's core is not what limits the run); compressed echoes
//! are inflated, with one inflater per connection, before they are checked. Its deflate is
//! flate2 on zlib-rs, as wsgate's is: a bug both shared would not show here, which is why the
//! interoperability tests (tests/compression.rs) use node `ws`, Python `websockets` and
//! Chromium instead.

// A test and benchmark tool, never deployed: failing loudly on a setup error is its report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "wire.rs"]
mod wire;

use clap::{Parser, ValueEnum};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::json;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use wire::{OP_BINARY, OP_CLOSE, OP_TEXT};

#[derive(Parser, Debug, Clone)]
#[command(about = "WebSocket load generator for the end-to-end benchmark")]
struct Args {
    scenario: Scenario,
    /// Address of the target (the proxy under test, or the backend itself). `latency` takes
    /// several, comma-separated, and measures them side by side.
    #[arg(long = "target", value_delimiter = ',', required = true)]
    targets: Vec<SocketAddr>,
    /// Request path of the upgrade.
    #[arg(long, default_value = "/")]
    path: String,
    /// A header line added to every upgrade request (`Name: value`); repeatable.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Connections (for `handshakes`: how many connect at once).
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Payload bytes per message (at least 16).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages in flight per connection (throughput).
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Messages per second over all connections of one target (latency).
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds run before the measured window.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Client source addresses 127.0.0.2 .. 127.0.0.(1 + N), so many connections to one
    /// address do not exhaust one source address's ephemeral ports.
    #[arg(long, default_value_t = 50)]
    sources: u8,
    /// Process whose CPU time (and, for `idle`, memory) is the proxy's; with several targets,
    /// one per target in the same order, 0 for a target without a proxy.
    #[arg(long, value_delimiter = ',')]
    proxy_pid: Vec<u32>,
    #[arg(long)]
    backend_pid: Option<u32>,
    /// Seconds to wait after the last idle connection opened before reading memory.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// Offer permessage-deflate and send chat-like JSON text (`throughput` and `idle`).
    #[arg(long)]
    deflate: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Throughput,
    Latency,
    Idle,
    Handshakes,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    let args = Args::parse();
    if args.size < 16 {
        eprintln!("loadgen: --size must be at least 16");
        std::process::exit(2);
    }
    if args.deflate && !matches!(args.scenario, Scenario::Throughput | Scenario::Idle) {
        eprintln!("loadgen: --deflate is for `throughput` and `idle`");
        std::process::exit(2);
    }
    if args.targets.len() > 1 && args.scenario != Scenario::Latency {
        eprintln!("loadgen: only `latency` measures several targets at once");
        std::process::exit(2);
    }
    if args.proxy_pid.len() > args.targets.len() {
        eprintln!("loadgen: more --proxy-pid values than targets");
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = runtime.block_on(async {
        match args.scenario {
            Scenario::Throughput => throughput(&args).await,
            Scenario::Latency => latency(&args).await,
            Scenario::Idle => idle(&args).await,
            Scenario::Handshakes => handshakes(&args).await,
        }
    });
    match result {
        Ok(report) => println!("{report}"),
        Err(error) => {
            eprintln!(
                "loadgen {:?} against {:?}: {error}",
                args.scenario, args.targets
            );
            std::process::exit(1);
        }
    }
    // Thousands of sockets and blocked reader threads: exiting is the quickest way to drop them.
    std::process::exit(0);
}

// ---------------------------------------------------------------------------------------------
// Process accounting

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; the fields after it are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl Args {
    /// The target of a one-target scenario.
    fn target(&self) -> SocketAddr {
        self.targets[0]
    }

    /// The proxy process of a one-target scenario.
    fn proxy(&self) -> Option<u32> {
        self.proxy_pid.first().copied().filter(|&pid| pid != 0)
    }

    /// The arguments for measuring target `index` of several on its own.
    fn for_target(&self, index: usize) -> Args {
        Args {
            targets: vec![self.targets[index]],
            proxy_pid: self.proxy_pid.get(index).copied().into_iter().collect(),
            ..self.clone()
        }
    }
}

#[derive(Clone, Copy)]
struct CpuSample {
    at: Instant,
    proxy: Option<u64>,
    backend: Option<u64>,
    loadgen: Option<u64>,
}

impl CpuSample {
    fn take(args: &Args) -> Self {
        Self {
            at: Instant::now(),
            proxy: args.proxy().and_then(cpu_ticks),
            backend: args.backend_pid.and_then(cpu_ticks),
            loadgen: cpu_ticks(std::process::id()),
        }
    }

    /// Ticks used by each process between `self` and `later`, and the seconds between them.
    fn until(&self, later: &CpuSample) -> serde_json::Value {
        let delta = |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| b.saturating_sub(a));
        json!({
            "seconds": later.at.duration_since(self.at).as_secs_f64(),
            "proxy_ticks": delta(self.proxy, later.proxy),
            "backend_ticks": delta(self.backend, later.backend),
            "loadgen_ticks": delta(self.loadgen, later.loadgen),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Connections and frames

fn source(args: &Args, index: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        127,
        0,
        0,
        2 + (index % usize::from(args.sources.max(1))) as u8,
    )
}

/// What the server agreed to of our permessage-deflate offer.
#[derive(Clone, Copy, Debug)]
struct Deflate {
    /// The largest LZ77 window our compressor may use (the server's `client_max_window_bits`).
    client_window_bits: u8,
}

impl Deflate {
    /// The agreement in a 101's head, if the server accepted the offer; an error for an answer
    /// a client must refuse.
    fn agreed(head: &str) -> Result<Option<Self>, Error> {
        let Some(value) = wire::header_value(head, "sec-websocket-extensions") else {
            return Ok(None);
        };
        let mut params = value.split(';').map(str::trim);
        if params.next() != Some("permessage-deflate") {
            return Err(format!("unexpected extension answer: {value}").into());
        }
        let mut client_window_bits = 15;
        for param in params {
            if let Some(bits) = param.strip_prefix("client_max_window_bits=") {
                client_window_bits = bits.trim_matches('"').parse()?;
            }
        }
        // zlib cannot compress with an 8-bit window; no server we measure asks for one.
        if !(9..=15).contains(&client_window_bits) {
            return Err(format!("client_max_window_bits={client_window_bits}").into());
        }
        Ok(Some(Self { client_window_bits }))
    }
}

/// Connects from `src`, performs the opening handshake and checks the server's accept key.
/// Returns the stream and any bytes that arrived after the 101's head.
async fn open(args: &Args, src: Ipv4Addr) -> Result<(TcpStream, Vec<u8>), Error> {
    let (stream, early, _) = open_offering(args, src).await?;
    Ok((stream, early))
}

/// [`open`], offering permessage-deflate with `--deflate`; also returns what was agreed.
async fn open_offering(
    args: &Args,
    src: Ipv4Addr,
) -> Result<(TcpStream, Vec<u8>, Option<Deflate>), Error> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(src.into(), 0))?;
    let mut stream = socket.connect(args.target()).await?;
    stream.set_nodelay(true)?;
    let key = wire::random_key();
    let mut extra: String = args.headers.iter().map(|h| format!("{h}\r\n")).collect();
    if args.deflate {
        extra.push_str("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n");
    }
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n",
        args.path,
        args.target()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; 4096];
    let mut filled = 0;
    let end = loop {
        if let Some(end) = wire::head_end(&buf[..filled]) {
            break end;
        }
        if filled == buf.len() {
            return Err("handshake response head too large".into());
        }
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err("connection closed during the handshake".into());
        }
        filled += n;
    };
    let head = std::str::from_utf8(&buf[..end])?;
    if !head.starts_with("HTTP/1.1 101") {
        let line = head.lines().next().unwrap_or_default();
        return Err(format!("handshake refused: {line}").into());
    }
    if wire::header_value(head, "sec-websocket-accept") != Some(&wire::accept_key(&key)) {
        return Err("wrong Sec-WebSocket-Accept".into());
    }
    let deflate = if args.deflate {
        Deflate::agreed(head)?
    } else {
        None
    };
    Ok((stream, buf[end..filled].to_vec(), deflate))
}

/// One connection's messages: a random mask key and a random filler, fixed for the
/// connection; each message differs in its first bytes (sequence number, send time).
struct Messages {
    key: [u8; 4],
    /// The whole masked frame with a zero prefix.
    template: Vec<u8>,
    header_len: usize,
    /// Where the prefix sits in the frame's payload.
    prefix_at: usize,
    /// `OP_BINARY`, or `OP_TEXT` for chat messages (whose prefixes are hexadecimal digits).
    opcode: u8,
    /// The payload as it must come back (inflated), prefix zeroed.
    expected: Vec<u8>,
}

/// The stored deflate block (RFC 1951 §3.2.4: not final, type 00, LEN and its complement)
/// that carries a chat message's 16-digit prefix uncompressed.
const STORED_PREFIX: [u8; 5] = [0x00, 16, 0x00, !16u8, 0xFF];

impl Messages {
    fn new(size: usize) -> Self {
        Self::framed(OP_BINARY, wire::random_bytes(size), None)
    }

    /// Chat-like JSON text of `size` bytes, compressed with a window of `window_bits` when
    /// permessage-deflate was agreed.
    fn chat(size: usize, window_bits: Option<u8>) -> Self {
        Self::framed(OP_TEXT, chat_text(size), window_bits)
    }

    fn framed(opcode: u8, expected: Vec<u8>, window_bits: Option<u8>) -> Self {
        let mut key = [0u8; 4];
        getrandom::fill(&mut key).expect("getrandom");
        let (payload, prefix_at) = match window_bits {
            None => (expected.clone(), 0),
            Some(bits) => {
                let mut payload = STORED_PREFIX.to_vec();
                payload.extend_from_slice(&expected[..16]);
                payload.extend_from_slice(&compressed(&expected[16..], bits));
                (payload, STORED_PREFIX.len())
            }
        };
        let mut template = Vec::with_capacity(payload.len() + 14);
        wire::write_header(&mut template, true, opcode, Some(key), payload.len());
        if window_bits.is_some() {
            template[0] |= 0x40; // RSV1: compressed
        }
        let header_len = template.len();
        template.extend_from_slice(&payload);
        wire::apply_mask(&mut template[header_len..], key, 0);
        Self {
            key,
            template,
            header_len,
            prefix_at,
            opcode,
            expected,
        }
    }

    /// The prefix of message number `seq`: its big-endian bytes, or for text 16 hexadecimal
    /// digits (a binary number would not be UTF-8).
    fn prefix(&self, seq: u64) -> Vec<u8> {
        if self.opcode == OP_TEXT {
            format!("{seq:016x}").into_bytes()
        } else {
            seq.to_be_bytes().to_vec()
        }
    }

    /// Appends a frame whose payload starts with `prefix`.
    fn push(&self, out: &mut Vec<u8>, prefix: &[u8]) {
        let at = out.len() + self.header_len + self.prefix_at;
        out.extend_from_slice(&self.template);
        let mut masked = [0u8; 16];
        let masked = &mut masked[..prefix.len()];
        masked.copy_from_slice(prefix);
        wire::apply_mask(masked, self.key, self.prefix_at);
        out[at..at + prefix.len()].copy_from_slice(masked);
    }

    /// Checks one echoed payload: `prefix`, then the filler.
    fn verify(&self, payload: &[u8], prefix: &[u8]) -> Result<(), Error> {
        if payload.len() != self.expected.len() {
            return Err(format!(
                "echo of {} bytes, sent {}",
                payload.len(),
                self.expected.len()
            )
            .into());
        }
        if &payload[..prefix.len()] != prefix {
            return Err(
                "echoed payload has the wrong sequence number (lost, duplicated or reordered)"
                    .into(),
            );
        }
        if payload[prefix.len()..] != self.expected[prefix.len()..] {
            return Err("echoed payload differs from what was sent".into());
        }
        Ok(())
    }
}

/// Chat-like JSON of exactly `size` bytes (at least 16), starting with 16 zero digits where
/// each message's sequence number goes: a room's recent messages, as a dashboard or chat
/// client receives them.
fn chat_text(size: usize) -> Vec<u8> {
    let words = [
        "hello", "there,", "the", "build", "is", "green", "again;", "shall", "we", "ship", "it",
        "before", "lunch", "or", "wait", "for", "review?", "latency", "flat", "memory", "fine",
    ];
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).expect("getrandom");
    let mut state = u64::from_le_bytes(seed) | 1;
    let mut next = |n: u64| {
        // xorshift64: the words need only vary between connections, not be unpredictable
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let mut text = String::from("0000000000000000[");
    let mut id = 10_000;
    while text.len() < size {
        let said: Vec<&str> = (0..8)
            .map(|_| words[next(words.len() as u64) as usize])
            .collect();
        text.push_str(&format!(
            r#"{{"id":{id},"user":"user{}","room":"lobby","ts":{},"text":"{}"}},"#,
            next(40),
            1_733_450_000_000 + next(1_000_000),
            said.join(" ")
        ));
        id += 1;
    }
    let mut text = text.into_bytes();
    text.truncate(size.max(16));
    text
}

/// `data` as one raw deflate stream ending in a sync flush, its final 4 bytes (the empty
/// stored block's `00 00 FF FF`) removed, as RFC 7692 §7.2.1 sends a message.
fn compressed(data: &[u8], window_bits: u8) -> Vec<u8> {
    let mut compress = Compress::new_with_window_bits(Compression::default(), false, window_bits);
    let mut out = Vec::with_capacity(data.len() + 64);
    compress
        .compress_vec(data, &mut out, FlushCompress::Sync)
        .expect("deflate");
    assert_eq!(compress.total_in(), data.len() as u64, "room for all of it");
    assert!(
        out.ends_with(&[0x00, 0x00, 0xFF, 0xFF]),
        "a sync flush ends so"
    );
    out.truncate(out.len() - 4);
    out
}

/// Inflates one compressed message into `out` with the connection's `inflater` (RFC 7692
/// §7.2.2: the 4 bytes the sender removed are appended first).
fn inflate(inflater: &mut Decompress, data: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    out.clear();
    for mut input in [data, &[0x00, 0x00, 0xFF, 0xFF][..]] {
        loop {
            if out.capacity() - out.len() < 4096 {
                out.reserve(16 * 1024);
            }
            let before = inflater.total_in();
            inflater.decompress_vec(input, out, FlushDecompress::Sync)?;
            let used = (inflater.total_in() - before) as usize;
            input = &input[used..];
            let room_left = out.len() < out.capacity();
            if input.is_empty() && room_left {
                break;
            }
            if used == 0 && room_left {
                return Err("the compressed echo ends in the middle".into());
            }
        }
    }
    Ok(())
}

/// Checks one echo frame's payload against message `seq` of `messages`, inflating it first if
/// it is compressed (`inflater` is the connection's, present when deflate was agreed).
fn verify_echo(
    messages: &Messages,
    header: &wire::Header,
    payload: &[u8],
    seq: u64,
    inflater: &mut Option<(Decompress, Vec<u8>)>,
) -> Result<(), Error> {
    let prefix = messages.prefix(seq);
    match inflater {
        Some((inflater, plain)) if header.rsv1 => {
            inflate(inflater, payload, plain)?;
            messages.verify(plain, &prefix)
        }
        _ if header.rsv1 => Err("a compressed echo without permessage-deflate agreed".into()),
        _ => messages.verify(payload, &prefix),
    }
}

/// A complete frame at the start of `buf`: (header, total length). Echoes must be final,
/// unmasked frames of the opcode sent (or a close, which is an error here).
fn next_echo(buf: &[u8], opcode: u8) -> Result<Option<(wire::Header, usize)>, Error> {
    let Some(header) = wire::parse_header(buf) else {
        return Ok(None);
    };
    let total = header.header_len + header.len;
    if buf.len() < total {
        return Ok(None);
    }
    if header.opcode == OP_CLOSE {
        let code = buf
            .get(header.header_len..header.header_len + 2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]));
        return Err(format!("server closed the connection (close code {code:?})").into());
    }
    if header.opcode != opcode || !header.fin || header.mask.is_some() {
        return Err(format!(
            "unexpected frame: opcode {:#x}, fin {}, masked {}",
            header.opcode,
            header.fin,
            header.mask.is_some()
        )
        .into());
    }
    Ok(Some((header, total)))
}

/// A growable read buffer with a consumed prefix.
struct ReadBuffer {
    bytes: Vec<u8>,
    start: usize,
    filled: usize,
}

impl ReadBuffer {
    fn new(initial: &[u8], capacity: usize) -> Self {
        let mut bytes = vec![0u8; capacity.max(initial.len())];
        bytes[..initial.len()].copy_from_slice(initial);
        Self {
            bytes,
            start: 0,
            filled: initial.len(),
        }
    }

    fn unread(&self) -> &[u8] {
        &self.bytes[self.start..self.filled]
    }

    /// Room for at least `want` more bytes after the unread ones.
    fn space(&mut self, want: usize) -> &mut [u8] {
        if self.start > 0 {
            self.bytes.copy_within(self.start..self.filled, 0);
            self.filled -= self.start;
            self.start = 0;
        }
        if self.bytes.len() - self.filled < want {
            self.bytes.resize(self.filled + want, 0);
        }
        &mut self.bytes[self.filled..]
    }
}

// ---------------------------------------------------------------------------------------------
// Throughput: every connection keeps `window` messages in flight.

async fn throughput(args: &Args) -> Result<serde_json::Value, Error> {
    let received = Arc::new(AtomicU64::new(0));
    let wire_bytes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    let mut compressed_connections = 0;
    for index in 0..args.connections {
        let (stream, early, deflate) = open_offering(args, source(args, index)).await?;
        compressed_connections += usize::from(deflate.is_some());
        let counters = Counters {
            received: Arc::clone(&received),
            wire_bytes: Arc::clone(&wire_bytes),
            stop: Arc::clone(&stop),
        };
        let messages = if args.deflate {
            Messages::chat(args.size, deflate.map(|d| d.client_window_bits))
        } else {
            Messages::new(args.size)
        };
        tasks.spawn(pump(
            stream,
            early,
            messages,
            deflate.is_some(),
            args.window,
            counters,
        ));
    }
    let count = || {
        (
            received.load(Ordering::Relaxed),
            wire_bytes.load(Ordering::Relaxed),
        )
    };
    let measured = async {
        tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
        let (before, count_before) = (CpuSample::take(args), count());
        tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
        let (after, count_after) = (CpuSample::take(args), count());
        (
            before.until(&after),
            (
                count_after.0 - count_before.0,
                count_after.1 - count_before.1,
            ),
            after.at - before.at,
        )
    };
    // A connection that fails ends the run at once instead of after the window.
    let ((window, (messages, wire), elapsed), early_failure) = tokio::select! {
        m = measured => (m, None),
        Some(failed) = tasks.join_next() => ((json!(null), (0, 0), Duration::ZERO), Some(failed)),
    };
    if let Some(failed) = early_failure {
        failed??;
        return Err("a connection ended early".into());
    }
    stop.store(true, Ordering::Relaxed);
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok::<(), Error>(())
    })
    .await;
    drained.map_err(|_| "in-flight messages did not come back within 20 s")??;
    Ok(json!({
        "scenario": "throughput",
        "connections": args.connections,
        "size": args.size,
        "window": args.window,
        "messages": messages,
        "msgs_per_s": messages as f64 / elapsed.as_secs_f64(),
        "verified": received.load(Ordering::Relaxed),
        "deflate_offered": args.deflate,
        "compressed_connections": compressed_connections,
        "wire_bytes_per_round_trip": if messages > 0 { wire as f64 / messages as f64 } else { 0.0 },
        "cpu": window,
    }))
}

/// What every connection of a throughput run adds to, and the signal to stop.
struct Counters {
    received: Arc<AtomicU64>,
    /// Bytes written and read on the client's sockets, WebSocket frames both ways.
    wire_bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

async fn pump(
    mut stream: TcpStream,
    early: Vec<u8>,
    messages: Messages,
    deflate: bool,
    window: usize,
    counters: Counters,
) -> Result<(), Error> {
    let size = messages.expected.len();
    let mut inflater = deflate.then(|| (Decompress::new(false), Vec::with_capacity(size)));
    let mut input = ReadBuffer::new(&early, (size + 14) * window.min(8) + 64 * 1024);
    let mut out = Vec::with_capacity((size + 14) * window);
    let (mut sent, mut echoed) = (0u64, 0u64);
    for _ in 0..window {
        messages.push(&mut out, &messages.prefix(sent));
        sent += 1;
    }
    stream.write_all(&out).await?;
    counters
        .wire_bytes
        .fetch_add(out.len() as u64, Ordering::Relaxed);
    loop {
        let mut got = 0;
        while let Some((header, total)) = next_echo(input.unread(), messages.opcode)? {
            let frame = &input.unread()[..total];
            verify_echo(
                &messages,
                &header,
                &frame[header.header_len..],
                echoed,
                &mut inflater,
            )?;
            input.start += total;
            echoed += 1;
            got += 1;
        }
        if got > 0 {
            counters.received.fetch_add(got, Ordering::Relaxed);
        }
        let stopping = counters.stop.load(Ordering::Relaxed);
        if stopping && echoed == sent {
            return Ok(());
        }
        if !stopping && got > 0 {
            out.clear();
            while sent - echoed < window as u64 {
                messages.push(&mut out, &messages.prefix(sent));
                sent += 1;
            }
            stream.write_all(&out).await?;
            counters
                .wire_bytes
                .fetch_add(out.len() as u64, Ordering::Relaxed);
        }
        let space = input.space(size + 14);
        let n = stream.read(space).await?;
        counters.wire_bytes.fetch_add(n as u64, Ordering::Relaxed);
        if n == 0 {
            return Err(format!(
                "connection closed with {} messages in flight",
                sent - echoed
            )
            .into());
        }
        input.filled += n;
    }
}

// ---------------------------------------------------------------------------------------------
// Latency: a fixed schedule, measured from each message's intended send time.
//
// Several targets are measured side by side, interleaved message by message (message k goes to
// target k % T): on a shared machine a stall (a neighbour, a late wake-up of this load
// generator) then falls on every target alike instead of on whichever happened to be running.
// Echoes are read by tasks on this one thread, so the client core is not crowded with a thread
// per connection; the sender is a thread of its own because it sleeps to the microsecond.

async fn latency(args: &Args) -> Result<serde_json::Value, Error> {
    let targets: Vec<Args> = (0..args.targets.len())
        .map(|index| args.for_target(index))
        .collect();
    let (t, n) = (targets.len() as u64, args.connections as u64);
    let mut readers = Vec::with_capacity(targets.len() * args.connections);
    let mut writers = Vec::with_capacity(targets.len() * args.connections);
    for target in &targets {
        for index in 0..args.connections {
            let (stream, early) = open(target, source(target, index)).await?;
            if !early.is_empty() {
                return Err("bytes before the first message".into());
            }
            // The writer shares the socket; it stays non-blocking (see `send_all`).
            let stream = stream.into_std()?;
            writers.push(stream.try_clone()?);
            readers.push(TcpStream::from_std(stream)?);
        }
    }
    let per_target = (args.rate as f64 * (args.warmup + args.duration)) as u64;
    let warmup_ns = (args.warmup * 1e9) as u64;
    let period_ns = 1e9 / (args.rate * t) as f64;
    let size = args.size;
    let conns: Vec<Arc<Messages>> = (0..readers.len())
        .map(|_| Arc::new(Messages::new(size)))
        .collect();
    let start = Instant::now();

    let mut reading = tokio::task::JoinSet::new();
    for (i, stream) in readers.into_iter().enumerate() {
        let messages = Arc::clone(&conns[i]);
        let within = (i as u64) % n;
        let expected = per_target / n + u64::from(within < per_target % n);
        reading.spawn(read_echoes(stream, messages, expected, start, warmup_ns, i));
    }

    let sender = std::thread::spawn(move || -> Result<u64, Error> {
        let mut frame = Vec::with_capacity(size + 14);
        let mut late_sends = 0u64;
        for k in 0..per_target * t {
            let intended = (k as f64 * period_ns) as u64;
            let now = start.elapsed().as_nanos() as u64;
            if intended > now {
                std::thread::sleep(Duration::from_nanos(intended - now));
            } else if now - intended > 1_000_000 {
                late_sends += 1;
            }
            let (target, j) = (k % t, k / t);
            let conn = (target * n + j % n) as usize;
            let mut prefix = [0u8; 16];
            prefix[..8].copy_from_slice(&(j / n).to_be_bytes());
            prefix[8..].copy_from_slice(&intended.to_be_bytes());
            frame.clear();
            conns[conn].push(&mut frame, &prefix);
            send_all(&mut writers[conn], &frame)?;
        }
        Ok(late_sends)
    });

    let warm_end = start + Duration::from_nanos(warmup_ns);
    tokio::time::sleep_until(warm_end.into()).await;
    let before: Vec<CpuSample> = targets.iter().map(CpuSample::take).collect();
    let mut by_connection = vec![Vec::new(); args.connections * targets.len()];
    while let Some(done) = reading.join_next().await {
        let (index, latencies) = done??;
        by_connection[index] = latencies;
    }
    let after: Vec<CpuSample> = targets.iter().map(CpuSample::take).collect();
    let late_sends = tokio::task::spawn_blocking(move || sender.join())
        .await?
        .map_err(|_| "sender thread panicked")??;

    let mut results = Vec::with_capacity(targets.len());
    for (index, target) in targets.iter().enumerate() {
        let mut all: Vec<u32> =
            by_connection[index * args.connections..][..args.connections].concat();
        all.sort_unstable();
        let pct = |p: f64| -> u32 {
            if all.is_empty() {
                return 0;
            }
            all[((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1]
        };
        let (before, after) = (&before[index], &after[index]);
        results.push(json!({
            "scenario": "latency",
            "target": target.target().to_string(),
            "connections": args.connections,
            "size": args.size,
            "rate": args.rate,
            "side_by_side": t,
            "messages": all.len(),
            "msgs_per_s": all.len() as f64 / after.at.duration_since(before.at).as_secs_f64(),
            "verified": per_target,
            "late_sends_over_1ms": late_sends,
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
            "p999_us": pct(0.999),
            "max_us": all.last().copied().unwrap_or(0),
            "cpu": before.until(after),
        }));
    }
    Ok(json!({ "scenario": "latency", "per_target": results }))
}

/// Reads one connection's `expected` echoes; returns its index and the latencies (µs) of the
/// messages meant to be sent after the warm-up.
async fn read_echoes(
    mut stream: TcpStream,
    messages: Arc<Messages>,
    expected: u64,
    start: Instant,
    warmup_ns: u64,
    index: usize,
) -> Result<(usize, Vec<u32>), Error> {
    let mut latencies = Vec::with_capacity(expected as usize);
    let mut input = ReadBuffer::new(&[], 64 * 1024);
    let mut echoed = 0u64;
    while echoed < expected {
        let space = input.space(messages.expected.len() + 14);
        let got = tokio::time::timeout(Duration::from_secs(10), stream.read(space))
            .await
            .map_err(|_| format!("no echo for 10 s after {echoed} of {expected}"))??;
        if got == 0 {
            return Err("connection closed during the latency run".into());
        }
        input.filled += got;
        while let Some((header, frame_len)) = next_echo(input.unread(), OP_BINARY)? {
            let now = start.elapsed().as_nanos() as u64;
            let payload = &input.unread()[header.header_len..frame_len];
            let intended = u64::from_be_bytes(payload[8..16].try_into().unwrap());
            let mut prefix = [0u8; 16];
            prefix[..8].copy_from_slice(&echoed.to_be_bytes());
            prefix[8..].copy_from_slice(&intended.to_be_bytes());
            messages.verify(payload, &prefix)?;
            if intended >= warmup_ns {
                latencies.push((now.saturating_sub(intended) / 1000) as u32);
            }
            input.start += frame_len;
            echoed += 1;
        }
    }
    Ok((index, latencies))
}

/// `write_all` on a socket whose reading half is registered with tokio, hence non-blocking:
/// a full send buffer (a stalled target) is waited out rather than reported as an error.
fn send_all(stream: &mut std::net::TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(written) => bytes = &bytes[written..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(50))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Idle: open many connections, echo one message on each, then read the proxy's memory.

/// Connections being opened at once while ramping up.
const RAMP_CONCURRENCY: usize = 64;

async fn idle(args: &Args) -> Result<serde_json::Value, Error> {
    let rss = |pid: Option<u32>| pid.and_then(rss_kib);
    let (proxy_before, backend_before) = (rss(args.proxy()), rss(args.backend_pid));
    let started = Instant::now();
    let mut open_streams = Vec::with_capacity(args.connections);
    let mut compressed_connections = 0;
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = 0;
    while open_streams.len() < args.connections {
        while next < args.connections && tasks.len() < RAMP_CONCURRENCY {
            let src = source(args, next);
            let args_target = (args.target(), args.path.clone(), args.sources);
            tasks.spawn(open_and_echo(args_target, src, args.size, args.deflate));
            next += 1;
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        let (stream, compressed) = done??;
        open_streams.push(stream);
        compressed_connections += usize::from(compressed);
    }
    let ramp = started.elapsed();
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let (proxy_after, backend_after) = (rss(args.proxy()), rss(args.backend_pid));
    let per_conn = |before: Option<u64>, after: Option<u64>| {
        before
            .zip(after)
            .map(|(b, a)| (a as f64 - b as f64) * 1024.0 / args.connections as f64)
    };
    Ok(json!({
        "scenario": "idle",
        "connections": open_streams.len(),
        "verified": open_streams.len(),
        "compressed_connections": compressed_connections,
        "ramp_seconds": ramp.as_secs_f64(),
        "proxy_rss_kib_before": proxy_before,
        "proxy_rss_kib_after": proxy_after,
        "proxy_bytes_per_conn": per_conn(proxy_before, proxy_after),
        "backend_bytes_per_conn": per_conn(backend_before, backend_after),
    }))
}

async fn open_and_echo(
    (target, path, sources): (SocketAddr, String, u8),
    src: Ipv4Addr,
    size: usize,
    deflate: bool,
) -> Result<(TcpStream, bool), Error> {
    let args = Args {
        scenario: Scenario::Idle,
        targets: vec![target],
        path,
        headers: Vec::new(),
        connections: 1,
        size,
        window: 1,
        rate: 1,
        warmup: 0.0,
        duration: 0.0,
        sources,
        proxy_pid: Vec::new(),
        backend_pid: None,
        settle: 0.0,
        deflate,
    };
    let (mut stream, early, agreed) = open_offering(&args, src).await?;
    let messages = if deflate {
        Messages::chat(size, agreed.map(|d| d.client_window_bits))
    } else {
        Messages::new(size)
    };
    let mut inflater = agreed.map(|_| (Decompress::new(false), Vec::new()));
    let mut out = Vec::new();
    messages.push(&mut out, &messages.prefix(0));
    stream.write_all(&out).await?;
    let mut input = ReadBuffer::new(&early, size + 64);
    loop {
        if let Some((header, total)) = next_echo(input.unread(), messages.opcode)? {
            let payload = &input.unread()[header.header_len..total];
            verify_echo(&messages, &header, payload, 0, &mut inflater)?;
            return Ok((stream, agreed.is_some()));
        }
        let space = input.space(size + 14);
        let n = stream.read(space).await?;
        if n == 0 {
            return Err("closed before the echo".into());
        }
        input.filled += n;
    }
}

// ---------------------------------------------------------------------------------------------
// Handshakes: connect, upgrade, close handshake, TCP closed by the server; as fast as possible.

async fn handshakes(args: &Args) -> Result<serde_json::Value, Error> {
    let completed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..args.connections {
        let (completed, stop) = (Arc::clone(&completed), Arc::clone(&stop));
        let args = Args {
            scenario: Scenario::Handshakes,
            proxy_pid: Vec::new(),
            backend_pid: None,
            ..args.clone()
        };
        tasks.spawn(async move {
            let mut index = worker;
            while !stop.load(Ordering::Relaxed) {
                one_lifecycle(&args, source(&args, index)).await?;
                completed.fetch_add(1, Ordering::Relaxed);
                index += args.connections;
            }
            Ok::<(), Error>(())
        });
    }
    let measured = async {
        tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
        let (before, count_before) = (CpuSample::take(args), completed.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
        let (after, count_after) = (CpuSample::take(args), completed.load(Ordering::Relaxed));
        (
            before.until(&after),
            count_after - count_before,
            after.at - before.at,
        )
    };
    let ((window, done, elapsed), failure) = tokio::select! {
        m = measured => (m, None),
        Some(failed) = tasks.join_next() => ((json!(null), 0, Duration::ZERO), Some(failed)),
    };
    if let Some(failed) = failure {
        failed??;
        return Err("a worker ended early".into());
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(json!({
        "scenario": "handshakes",
        "concurrency": args.connections,
        "messages": done,
        "msgs_per_s": done as f64 / elapsed.as_secs_f64(),
        "verified": completed.load(Ordering::Relaxed),
        "cpu": window,
    }))
}

async fn one_lifecycle(args: &Args, src: Ipv4Addr) -> Result<(), Error> {
    let (mut stream, early) = open(args, src).await?;
    let mut key = [0u8; 4];
    getrandom::fill(&mut key)?;
    let mut close = Vec::with_capacity(8);
    wire::write_header(&mut close, true, OP_CLOSE, Some(key), 2);
    let at = close.len();
    close.extend_from_slice(&1000u16.to_be_bytes());
    wire::apply_mask(&mut close[at..], key, 0);
    stream.write_all(&close).await?;
    let mut input = ReadBuffer::new(&early, 256);
    let mut got_close = false;
    loop {
        if !got_close && let Some(header) = wire::parse_header(input.unread()) {
            let total = header.header_len + header.len;
            if input.unread().len() >= total {
                let payload = &input.unread()[header.header_len..total];
                if header.opcode != OP_CLOSE || payload != 1000u16.to_be_bytes() {
                    return Err("the close reply is not a close frame with code 1000".into());
                }
                got_close = true;
                input.start += total;
            }
        }
        let space = input.space(256);
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(space))
            .await
            .map_err(|_| "server did not close TCP within 10 s of the close handshake")??;
        if n == 0 {
            return if got_close {
                Ok(())
            } else {
                Err("TCP closed without a close reply".into())
            };
        }
        input.filled += n;
    }
}
