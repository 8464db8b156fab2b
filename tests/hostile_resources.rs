//! Hostile clients against the gateway's resources, end to end on 127.0.0.1: requests that
//! make backends look dead, floods of sockets from one address, a full gateway, slow and
//! silent request heads, handshake floods. Each test asserts what the victims see: other
//! clients keep being served, backends stay in rotation, descriptors stay bounded.
//!
//! Descriptors the gateway holds for clients are counted in `/proc/net/tcp`: an accepted
//! socket has the listener's address as its local end and a non-zero inode while a descriptor
//! refers to it (connections waiting in the backlog, and ones the gateway has closed, have
//! none). The gateway runs in this process, so `/proc/self/fd` would count the attackers too.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use support::{connect, echo_backend, upgrade_request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use wsgate::gateway::Gateway;
use wsgate::server::Server;

/// A gateway running in this test, with its compiled configuration for health checks.
struct Running {
    addr: SocketAddr,
    gateway: Arc<Gateway>,
    _stop: oneshot::Sender<()>,
}

impl Running {
    /// Whether every backend of the first upstream is in rotation (no active verdict and no
    /// passive back-off holds it out).
    fn all_backends_healthy(&self) -> bool {
        let balancer = &self.gateway.upstreams[0].balancer;
        (0..balancer.backends().len())
            .all(|i| balancer.is_healthy(i) && balancer.connect_failures(i) == 0)
    }
}

async fn start(yaml: &str) -> Running {
    let config =
        wsgate::config::from_yaml_str(yaml, "hostile.yaml").unwrap_or_else(|e| panic!("{e}"));
    let server = Server::bind(config).await.expect("gateway binds");
    let addr = server.local_addrs()[0];
    let gateway = server.gateway();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Running {
        addr,
        gateway,
        _stop: stop,
    }
}

/// One upstream `app` with `backends` and `upstream` keys, one route sticky on `?room=`, and
/// top-level `top` YAML (limits, timeouts, ...).
fn config(backends: &[SocketAddr], upstream: &str, top: &str) -> String {
    let mut yaml =
        String::from("listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends:\n");
    for backend in backends {
        yaml.push_str(&format!("      - ws://{backend}\n"));
    }
    for line in upstream.lines() {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml.push_str("routes:\n  - upstream: app\n    sticky: {query: room}\n");
    yaml.push_str(top);
    yaml
}

/// Sockets the gateway listening on `gateway` holds for clients (see the module comment).
fn gateway_sockets(gateway: SocketAddr) -> usize {
    let local = format!("0100007F:{:04X}", gateway.port());
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local, remote, state ... inode is the tenth field.
            fields.len() > 9 && fields[1] == local && fields[3] != "0A" && fields[9] != "0"
        })
        .count()
}

/// A TCP connection to `gateway` from the local address `from` (127.0.0.x).
async fn tcp_from(from: &str, gateway: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(gateway).await.unwrap()
}

/// Reads a response head (up to the blank line), failing after `wait`; `None` if the
/// connection ended first.
async fn response_head(stream: &mut TcpStream, wait: Duration) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    };
    let complete = tokio::time::timeout(wait, read)
        .await
        .expect("a response head or a close in time");
    complete.then(|| String::from_utf8_lossy(&head).into_owned())
}

fn status(head: &str) -> u16 {
    head[9..12].parse().unwrap()
}

/// A WebSocket client from `from` (tokio-tungstenite) that must be accepted and get its
/// message echoed: the victim that must keep being served.
async fn served_from(from: &str, gateway: SocketAddr) {
    let stream = tcp_from(from, gateway).await;
    let (mut ws, response) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::client_async("ws://localhost/?room=victim", stream),
    )
    .await
    .expect("an answer in time")
    .unwrap_or_else(|e| panic!("the victim from {from} was refused: {e}"));
    assert_eq!(response.status(), 101);
    echo(&mut ws, "still served").await;
}

async fn echo<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("an echo in time")
        .expect("open")
        .expect("no error");
    assert_eq!(echoed, Message::text(text));
}

/// Polls `done` every 20 ms until it holds, failing after `wait`.
async fn until(what: &str, wait: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + wait;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {wait:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A backend app: tokio-tungstenite echo on every path but `/poll`, an HTTP long-poll
/// endpoint that ignores `Upgrade` and holds the request without answering, as a healthy app
/// does until it has news. Counts the requests `/poll` got.
async fn app_with_long_poll() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let polls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&polls);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(app_connection(stream, Arc::clone(&counted)));
        }
    });
    (addr, polls)
}

async fn app_connection(mut stream: TcpStream, polls: Arc<AtomicUsize>) {
    // The head is peeked, not read, so tungstenite still finds it for a WebSocket.
    let mut buf = vec![0u8; 8192];
    loop {
        let Ok(n) = stream.peek(&mut buf).await else {
            return;
        };
        if n == 0 || n == buf.len() {
            return;
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            if buf.starts_with(b"GET /poll") {
                polls.fetch_add(1, Ordering::SeqCst);
                let mut sink = Vec::new();
                let _ = stream.read_to_end(&mut sink).await;
                return;
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    while let Some(Ok(message)) = ws.next().await {
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            return;
        }
    }
}

/// Attack: upgrade requests to an app's HTTP long-poll path, which ignores `Upgrade` and
/// answers nothing within `connect_timeout`, sent until every backend would have been ejected
/// if a slow answer counted as an unreachable backend.
/// Victims see: each such request is that request's 504; both backends stay in rotation, no
/// connected room is moved (1012), and a normal client afterwards gets its 101.
#[tokio::test]
async fn upgrades_to_a_path_that_never_answers_are_504_and_leave_backends_healthy() {
    let (first, polls_first) = app_with_long_poll().await;
    let (second, polls_second) = app_with_long_poll().await;
    let gateway = start(&config(
        &[first, second],
        "connect_timeout: 300ms\npassive_health: {backoff: 30s}",
        "rebalance: {window: 0s}\n",
    ))
    .await;
    let mut rooms = Vec::new();
    for room in 0..8 {
        rooms.push(connect(gateway.addr, &format!("/chat?room={room}")).await);
    }

    for attempt in 0..4 {
        let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
        let request = upgrade_request(&format!("/poll?room=r{attempt}"), "");
        stream.write_all(request.as_bytes()).await.unwrap();
        let head = response_head(&mut stream, Duration::from_secs(5))
            .await
            .expect("an answer");
        assert_eq!(status(&head), 504, "attempt {attempt}: {head}");
        assert!(gateway.all_backends_healthy(), "after attempt {attempt}");
    }
    let polls = polls_first.load(Ordering::SeqCst) + polls_second.load(Ordering::SeqCst);
    assert_eq!(polls, 4, "every attempt reached a backend");

    served_from("127.0.0.1", gateway.addr).await;
    // A back-off would have moved rooms at once (window 0): each still echoes.
    for (room, ws) in rooms.iter_mut().enumerate() {
        ws.send(Message::text(format!("room {room}")))
            .await
            .unwrap();
        let answer = support::next_message(ws).await;
        assert_eq!(answer, Message::text(format!("room {room}")), "room {room}");
    }
    assert!(gateway.all_backends_healthy());
}

/// Waits until the gateway has accepted every connection waiting in its backlog (none is
/// left without a descriptor in the ESTABLISHED state), then returns how many it holds.
async fn held_after_accepting(gateway: SocketAddr) -> usize {
    let local = format!("0100007F:{:04X}", gateway.port());
    until(
        "the gateway accepts its backlog",
        Duration::from_secs(5),
        || {
            let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
            !table.lines().skip(1).any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.len() > 9 && fields[1] == local && fields[3] == "01" && fields[9] == "0"
            })
        },
    )
    .await;
    gateway_sockets(gateway)
}

/// Attack: one address opens 500 idle TCP connections against `max_connections_per_ip: 50`.
/// Victims see: the gateway holds at most that address's 50 descriptors (the rest are closed
/// as they are accepted, not held while they are answered), and a client from another
/// address is served at once.
#[tokio::test]
async fn one_address_holds_no_more_sockets_than_its_allowance_and_others_are_served() {
    let backend = echo_backend("b").await;
    let gateway = start(&config(
        &[backend.addr],
        "",
        "limits:\n  max_connections_per_ip: 50\ntimeouts:\n  handshake: 5s\n",
    ))
    .await;
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(tcp_from("127.0.0.1", gateway.addr).await);
    }
    let held = held_after_accepting(gateway.addr).await;
    assert!(
        held <= 50,
        "the gateway holds {held} sockets for one address"
    );
    served_from("127.0.0.2", gateway.addr).await;
    assert!(gateway.all_backends_healthy());
}

/// Attack: more connections than `max_connections`.
/// Victims see: at the limit the gateway stops accepting; a new client waits in the backlog
/// (neither accepted-and-closed nor refused) and is served as soon as a slot frees.
#[tokio::test]
async fn at_max_connections_new_clients_wait_in_the_backlog_and_are_served_when_a_slot_frees() {
    let backend = echo_backend("b").await;
    let gateway = start(&config(
        &[backend.addr],
        "",
        "limits:\n  max_connections: 2\n",
    ))
    .await;
    let mut first = connect(gateway.addr, "/?room=a").await;
    let _second = connect(gateway.addr, "/?room=b").await;

    let mut waiting = TcpStream::connect(gateway.addr).await.unwrap();
    waiting
        .write_all(upgrade_request("/?room=c", "").as_bytes())
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(400), waiting.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "answered or closed while the gateway was full: {early:?}"
    );
    assert_eq!(
        gateway_sockets(gateway.addr),
        2,
        "the third waits in the backlog"
    );

    first.close(None).await.unwrap();
    while first.next().await.is_some() {}
    let head = response_head(&mut waiting, Duration::from_secs(5))
        .await
        .expect("an answer once a slot freed");
    assert_eq!(status(&head), 101, "{head}");
}

/// Slowloris: request heads trickled one byte every 50 ms, never finished.
/// Victims see: each slow head is answered 408 and closed at the handshake timeout, and a
/// client from another address is served meanwhile.
#[tokio::test]
async fn a_head_trickled_byte_by_byte_is_cut_at_the_handshake_timeout_while_others_are_served() {
    let backend = echo_backend("b").await;
    let gateway = start(&config(
        &[backend.addr],
        "",
        "timeouts:\n  handshake: 500ms\n",
    ))
    .await;
    let mut attackers = Vec::new();
    for _ in 0..20 {
        let stream = TcpStream::connect(gateway.addr).await.unwrap();
        attackers.push(tokio::spawn(trickle(stream)));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    served_from("127.0.0.2", gateway.addr).await;
    for attacker in attackers {
        let (answer, elapsed) = attacker.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            elapsed >= Duration::from_millis(450) && elapsed < Duration::from_millis(1500),
            "cut after {elapsed:?}"
        );
    }
    assert!(gateway.all_backends_healthy());
}

/// Writes an upgrade request one byte every 50 ms until the gateway answers; returns the
/// answer and when its first byte came.
async fn trickle(stream: TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        for byte in upgrade_request("/?room=slow", "").bytes().cycle() {
            if write.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), read.read(&mut first))
        .await
        .expect("an answer within 5 s")
        .unwrap_or(0);
    let elapsed = started.elapsed();
    let mut answer = first[..n].to_vec();
    let _ = tokio::time::timeout(Duration::from_secs(1), read.read_to_end(&mut answer)).await;
    writer.abort();
    (String::from_utf8_lossy(&answer).into_owned(), elapsed)
}

/// Attack: a flood of TCP connections that never send a byte.
/// Victims see: the gateway holds at most the address's allowance, answers each held one 408
/// at the handshake timeout and lets go of every descriptor soon after; another address is
/// served throughout.
#[tokio::test]
async fn silent_connections_are_cut_at_the_handshake_timeout_and_hold_bounded_descriptors() {
    let backend = echo_backend("b").await;
    let gateway = start(&config(
        &[backend.addr],
        "",
        "limits:\n  max_connections_per_ip: 50\ntimeouts:\n  handshake: 500ms\n",
    ))
    .await;
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(tcp_from("127.0.0.1", gateway.addr).await);
    }
    let held = held_after_accepting(gateway.addr).await;
    assert!(held <= 50, "the gateway holds {held} silent sockets");
    served_from("127.0.0.2", gateway.addr).await;

    let mut answered = 0;
    for stream in &mut silent {
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer)).await;
        if answer.starts_with(b"HTTP/1.1 408") {
            answered += 1;
        }
    }
    assert_eq!(answered, held, "every held connection is answered 408");
    // The answer is followed by a short linger for the client to read it, then nothing.
    until("every descriptor is let go", Duration::from_secs(4), || {
        gateway_sockets(gateway.addr) == 0
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(4));
}

/// Attack: a flood of concurrent WebSocket handshakes from one address, above the gateway's
/// `handshake_rate`.
/// Victims see: handshakes beyond the burst are refused 503 with `Retry-After` before they
/// reach a backend, a client already connected keeps being served, the backend stays healthy.
#[tokio::test]
async fn a_handshake_flood_above_the_rate_is_refused_before_the_backends() {
    let backend = echo_backend("b").await;
    let gateway = start(&config(
        &[backend.addr],
        "",
        "limits:\n  handshake_rate: 5\n",
    ))
    .await;
    let mut established = connect(gateway.addr, "/?room=established").await;

    let mut flood = Vec::new();
    for i in 0..100 {
        let addr = gateway.addr;
        flood.push(tokio::spawn(async move {
            let mut stream = tcp_from("127.0.0.1", addr).await;
            let request = upgrade_request(&format!("/?room=flood{i}"), "");
            stream.write_all(request.as_bytes()).await.unwrap();
            let head = response_head(&mut stream, Duration::from_secs(5)).await;
            (head.unwrap_or_default(), stream)
        }));
    }
    let mut accepted = 0;
    let mut held = Vec::new();
    for attempt in flood {
        let (head, stream) = attempt.await.unwrap();
        match status(&head) {
            101 => accepted += 1,
            503 => assert!(head.contains("Retry-After: 1"), "{head}"),
            other => panic!("unexpected {other}: {head}"),
        }
        held.push(stream);
    }
    // A burst of five, less the established client's, plus what refills during the flood.
    assert!(
        accepted <= 8,
        "{accepted} handshakes of the flood were accepted"
    );
    let reached = backend.seen.lock().unwrap().len();
    assert_eq!(
        reached,
        1 + accepted,
        "only admitted handshakes reach the backend"
    );
    echo(&mut established, "still served").await;
    assert!(gateway.all_backends_healthy());
}

/// A `wsgate run` process (the gateway in its own process, so its open-file limit can be
/// changed without touching this test's), killed on drop.
struct Process {
    child: std::process::Child,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Process {
    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The lowest descriptor number the process does not use: the next one it would get.
    fn lowest_free_descriptor(&self) -> u64 {
        let used: std::collections::HashSet<u64> =
            std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
        (0..).find(|fd| !used.contains(fd)).unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A port nothing listens on right now.
async fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `wsgate run` with `yaml` and waits until it accepts on `listen`; `Err` with its log
/// if it exited first.
async fn spawn_gateway(yaml: &str, listen: SocketAddr) -> Result<Process, String> {
    let tag = format!("wsgate-hostile-{}-{}", std::process::id(), listen.port());
    let config = std::env::temp_dir().join(format!("{tag}.yaml"));
    let log = std::env::temp_dir().join(format!("{tag}.log"));
    std::fs::write(&config, yaml).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["run", "-c", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn wsgate");
    let mut process = Process { child, config, log };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(listen).await.is_err() {
        if let Some(status) = process.child.try_wait().unwrap() {
            return Err(format!("wsgate exited with {status}:\n{}", process.log()));
        }
        assert!(
            Instant::now() < deadline,
            "not listening:\n{}",
            process.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(process)
}

/// `wsgate run` in front of `backends`, on a listener and an admin port found free, with the
/// listener's and the admin's addresses.
async fn spawn_on_free_ports(
    backends: &[support::EchoBackend],
) -> (Process, SocketAddr, SocketAddr) {
    // A port found free may be taken by a parallel test before the gateway binds it: then
    // try other ports.
    let mut attempts = 0;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    loop {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port().await).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port().await).parse().unwrap();
        let yaml = config(&addrs, "", "").replace("127.0.0.1:0", &listen.to_string())
            + &format!("admin:\n  address: {admin}\n");
        match spawn_gateway(&yaml, listen).await {
            Ok(gateway) => return (gateway, listen, admin),
            Err(log) if log.contains("Address already in use") && attempts < 5 => attempts += 1,
            Err(log) => panic!("{log}"),
        }
    }
}

impl Process {
    /// The lowest free descriptor once the readiness probes of [`spawn_gateway`] have ended
    /// (the numbers stop changing).
    async fn settled_lowest_free_descriptor(&self) -> u64 {
        let mut lowest = self.lowest_free_descriptor();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.lowest_free_descriptor();
            if now == lowest {
                return lowest;
            }
            lowest = now;
        }
    }

    /// The process's open-file limit (soft, hard).
    fn open_file_limit(&self) -> (u64, u64) {
        let (mut soft, mut hard) = (0, 0);
        rlimit::prlimit(
            self.pid(),
            rlimit::Resource::NOFILE,
            None,
            Some((&mut soft, &mut hard)),
        )
        .unwrap();
        (soft, hard)
    }

    fn set_open_file_limit(&self, soft: u64, hard: u64) {
        rlimit::prlimit(
            self.pid(),
            rlimit::Resource::NOFILE,
            Some((soft, hard)),
            None,
        )
        .unwrap();
    }

    /// CPU time the process has used, in clock ticks (`utime + stime` of `/proc/PID/stat`).
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // The fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }
}

/// Overload: the gateway has no descriptor left to accept with, and clients keep arriving
/// (they wait in the kernel's backlog, so the listener stays readable).
/// Victims see: the gateway does not spin retrying `accept` (which fails at once, again and
/// again) and eat a core its established connections need; it retries a few times a second,
/// and serves the waiting client once descriptors are free again.
#[tokio::test]
async fn out_of_descriptors_to_accept_with_the_gateway_pauses_instead_of_spinning() {
    let backends = [echo_backend("b1").await];
    let (gateway, listen, _admin) = spawn_on_free_ports(&backends).await;
    let lowest = gateway.settled_lowest_free_descriptor().await;
    let (soft, hard) = gateway.open_file_limit();
    // No descriptor left at all: `accept` fails with EMFILE.
    gateway.set_open_file_limit(lowest, hard);

    let mut waiting = TcpStream::connect(listen).await.unwrap();
    waiting
        .write_all(upgrade_request("/?room=waiting", "").as_bytes())
        .await
        .unwrap();
    let until_log = Instant::now() + Duration::from_secs(5);
    while !gateway.log().contains("pausing accepts") {
        assert!(
            Instant::now() < until_log,
            "no accept failed:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = gateway.cpu_ticks();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = gateway.cpu_ticks() - before;
    gateway.set_open_file_limit(soft, hard);
    // Spinning on the failing accept takes a whole core: about 100 ticks a second.
    assert!(used < 30, "{used} ticks of CPU in 1 s without a descriptor");

    let head = response_head(&mut waiting, Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("no answer once descriptors were free:\n{}", gateway.log()));
    assert_eq!(status(&head), 101, "{head}");
}

/// Attack (or plain overload): the gateway runs out of descriptors while connecting to a
/// backend (its open-file limit is lowered from outside so that a client's socket is the
/// last descriptor it can open).
/// Victims see: that client gets 503 "gateway out of resources" with `Retry-After`, the
/// backends stay healthy (`wsgate_backend_healthy` 1 for both), and once descriptors are
/// available again the next client is served.
#[tokio::test]
async fn running_out_of_descriptors_is_503_and_never_counts_against_backends() {
    let backends = [echo_backend("b1").await, echo_backend("b2").await];
    let (gateway, listen, admin) = spawn_on_free_ports(&backends).await;
    let lowest = gateway.settled_lowest_free_descriptor().await;
    let (soft, hard) = gateway.open_file_limit();
    // One descriptor left: the client's accepted socket takes it.
    gateway.set_open_file_limit(lowest + 1, hard);

    let mut stream = TcpStream::connect(listen).await.unwrap();
    stream
        .write_all(upgrade_request("/?room=starved", "").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    drop(stream);
    gateway.set_open_file_limit(soft, hard);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 503"),
        "{answer}\n{}",
        gateway.log()
    );
    assert!(answer.contains("out of resources"), "{answer}");
    assert!(answer.contains("Retry-After: 1"), "{answer}");

    let (status, metrics) = support::http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let health: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("wsgate_backend_healthy{"))
        .collect();
    assert_eq!(health.len(), 2, "{metrics}");
    assert!(health.iter().all(|l| l.ends_with(" 1")), "{health:?}");

    let mut ws = connect(listen, "/?room=starved").await;
    echo(&mut ws, "served again").await;
}
