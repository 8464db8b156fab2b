//! The end-to-end benchmark's load generator: WebSocket clients over raw TCP that send
//! pre-masked frames and check every echoed payload byte for byte. One run is one scenario
//! against one target; `benches/e2e.py` runs them all, interleaved, and builds the tables.
//!
//! ```text
//! loadgen throughput --target 127.0.0.1:9002 --connections 100 --size 64 --window 32
//! loadgen latency    --target 127.0.0.1:9002,127.0.0.1:9003 --connections 50 --rate 2500
//! loadgen idle       --target 127.0.0.1:9002 --connections 9000 --proxy-pid 1234
//! loadgen handshakes --target 127.0.0.1:9002 --connections 32
//! ```
//!
//! Prints one JSON object. CPU time (user + system, in clock ticks from `/proc/PID/stat`) is
//! sampled for the proxy, the backend and the load generator itself at the start and the end
//! of the measured window, so the caller can tell which side was saturated.
//!
//! Every payload carries its sequence number (and, for latency, its intended send time) in its
//! first bytes and a per-connection random filler after them; an echo is accepted only if all
//! of it comes back unchanged and in order. The client shares no code with wsgate's codec.

// A test and benchmark tool, never deployed: failing loudly on a setup error is its report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "wire.rs"]
mod wire;

use clap::{Parser, ValueEnum};
use serde_json::json;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use wire::{OP_BINARY, OP_CLOSE};

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

/// Connects from `src`, performs the opening handshake and checks the server's accept key.
/// Returns the stream and any bytes that arrived after the 101's head.
async fn open(args: &Args, src: Ipv4Addr) -> Result<(TcpStream, Vec<u8>), Error> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(src.into(), 0))?;
    let mut stream = socket.connect(args.target()).await?;
    stream.set_nodelay(true)?;
    let key = wire::random_key();
    let extra: String = args.headers.iter().map(|h| format!("{h}\r\n")).collect();
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
    Ok((stream, buf[end..filled].to_vec()))
}

/// One connection's messages: a random mask key and a random filler, fixed for the
/// connection; each message differs in its first bytes (sequence number, send time).
struct Messages {
    key: [u8; 4],
    /// The whole masked frame with a zero prefix.
    template: Vec<u8>,
    header_len: usize,
    /// The payload as it must come back, prefix zeroed.
    expected: Vec<u8>,
}

impl Messages {
    fn new(size: usize) -> Self {
        let mut key = [0u8; 4];
        getrandom::fill(&mut key).expect("getrandom");
        let expected = wire::random_bytes(size);
        let mut template = Vec::with_capacity(size + 14);
        wire::write_header(&mut template, true, OP_BINARY, Some(key), size);
        let header_len = template.len();
        template.extend_from_slice(&expected);
        wire::apply_mask(&mut template[header_len..], key, 0);
        Self {
            key,
            template,
            header_len,
            expected,
        }
    }

    /// Appends a frame whose payload starts with `prefix`.
    fn push(&self, out: &mut Vec<u8>, prefix: &[u8]) {
        let at = out.len() + self.header_len;
        out.extend_from_slice(&self.template);
        let mut masked = [0u8; 16];
        let masked = &mut masked[..prefix.len()];
        masked.copy_from_slice(prefix);
        wire::apply_mask(masked, self.key, 0);
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

/// A complete frame at the start of `buf`: (header, total length). Echoes must be final,
/// unmasked binary frames (or a close, which is an error here).
fn next_echo(buf: &[u8]) -> Result<Option<(wire::Header, usize)>, Error> {
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
    if header.opcode != OP_BINARY || !header.fin || header.mask.is_some() {
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
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..args.connections {
        let (stream, early) = open(args, source(args, index)).await?;
        let (received, stop) = (Arc::clone(&received), Arc::clone(&stop));
        let (size, window) = (args.size, args.window);
        tasks.spawn(pump(stream, early, size, window, received, stop));
    }
    let measured = async {
        tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
        let (before, count_before) = (CpuSample::take(args), received.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
        let (after, count_after) = (CpuSample::take(args), received.load(Ordering::Relaxed));
        (
            before.until(&after),
            count_after - count_before,
            after.at - before.at,
        )
    };
    // A connection that fails ends the run at once instead of after the window.
    let ((window, messages, elapsed), early_failure) = tokio::select! {
        m = measured => (m, None),
        Some(failed) = tasks.join_next() => ((json!(null), 0, Duration::ZERO), Some(failed)),
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
        "cpu": window,
    }))
}

async fn pump(
    mut stream: TcpStream,
    early: Vec<u8>,
    size: usize,
    window: usize,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<(), Error> {
    let messages = Messages::new(size);
    let mut input = ReadBuffer::new(&early, (size + 14) * window.min(8) + 64 * 1024);
    let mut out = Vec::with_capacity((size + 14) * window);
    let (mut sent, mut echoed) = (0u64, 0u64);
    for _ in 0..window {
        messages.push(&mut out, &sent.to_be_bytes());
        sent += 1;
    }
    stream.write_all(&out).await?;
    loop {
        let mut got = 0;
        while let Some((header, total)) = next_echo(input.unread())? {
            let frame = &input.unread()[..total];
            messages.verify(&frame[header.header_len..], &echoed.to_be_bytes())?;
            input.start += total;
            echoed += 1;
            got += 1;
        }
        if got > 0 {
            received.fetch_add(got, Ordering::Relaxed);
        }
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && echoed == sent {
            return Ok(());
        }
        if !stopping && got > 0 {
            out.clear();
            while sent - echoed < window as u64 {
                messages.push(&mut out, &sent.to_be_bytes());
                sent += 1;
            }
            stream.write_all(&out).await?;
        }
        let space = input.space(size + 14);
        let n = stream.read(space).await?;
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
        while let Some((header, frame_len)) = next_echo(input.unread())? {
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
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = 0;
    while open_streams.len() < args.connections {
        while next < args.connections && tasks.len() < RAMP_CONCURRENCY {
            let src = source(args, next);
            let args_target = (args.target(), args.path.clone(), args.sources);
            tasks.spawn(open_and_echo(args_target, src, args.size));
            next += 1;
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        open_streams.push(done??);
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
) -> Result<TcpStream, Error> {
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
    };
    let (mut stream, early) = open(&args, src).await?;
    let messages = Messages::new(size);
    let mut out = Vec::new();
    messages.push(&mut out, &0u64.to_be_bytes());
    stream.write_all(&out).await?;
    let mut input = ReadBuffer::new(&early, size + 64);
    loop {
        if let Some((header, total)) = next_echo(input.unread())? {
            messages.verify(
                &input.unread()[header.header_len..total],
                &0u64.to_be_bytes(),
            )?;
            return Ok(stream);
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
