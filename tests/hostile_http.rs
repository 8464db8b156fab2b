//! Hostile clients against the HTTP side of the gateway: forged forwarding headers, paths that
//! escape their route, request smuggling, malformed and stalled bodies, and backends whose
//! answers a naive proxy would pass on malformed.
//!
//! Clients are raw TCP sockets writing hand-made bytes; backends are raw TCP listeners that
//! record exactly what the gateway sent them (heads and bodies, parsed here by hand, not by
//! the gateway's code). Each test asserts what the victim sees: the backend received nothing
//! forged, and the backend keeps serving another client afterwards.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{Gateway, start_gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// The longest a single wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(5);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
}

// ---------------------------------------------------------------------------------------------
// A backend that records what it receives

/// One request as the backend read it off the wire.
#[derive(Debug, Clone)]
struct Seen {
    head: String,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.head, name)
    }
}

/// A raw HTTP backend: for every request head it reads (and the body its framing announces),
/// it records the request and writes what `answer` returns for it.
struct Backend {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Connections the gateway closed (EOF read).
    closed: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

type Answer = Arc<dyn Fn(&str) -> Vec<u8> + Send + Sync>;

fn ok_answer(_: &str) -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()
}

async fn backend(answer: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let answer: Answer = Arc::new(answer);
    let (c, d, s) = (
        Arc::clone(&connections),
        Arc::clone(&closed),
        Arc::clone(&seen),
    );
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(
                stream,
                Arc::clone(&answer),
                Arc::clone(&s),
                Arc::clone(&d),
            ));
        }
    });
    Backend {
        addr,
        connections,
        closed,
        seen,
    }
}

async fn serve(
    mut stream: TcpStream,
    answer: Answer,
    seen: Arc<Mutex<Vec<Seen>>>,
    closed: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some((request, used)) = take_request(&buf) {
            buf.drain(..used);
            let response = answer(&request.head);
            seen.lock().unwrap().push(request);
            if stream.write_all(&response).await.is_err() {
                return;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A complete request at the start of `buf`, and its length.
fn take_request(buf: &[u8]) -> Option<(Seen, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let rest = &buf[end..];
    let body_len = if header_of(&head, "transfer-encoding").is_some() {
        rest.windows(5).position(|w| w == b"0\r\n\r\n")? + 5
    } else {
        header_of(&head, "content-length").map_or(0, |v| v.parse().unwrap())
    };
    let body = rest.get(..body_len)?.to_vec();
    Some((Seen { head, body }, end + body_len))
}

impl Backend {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn header_of<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

// ---------------------------------------------------------------------------------------------
// Gateways and clients

/// One route `prefix` to `backend`, with extra route keys.
async fn gateway(backend: &Backend, prefix: &str, route_extra: &str) -> Gateway {
    let mut yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends: [ws://{}]\n\
         routes:\n  - name: app\n    match: {{path_prefix: {prefix}}}\n    upstream: app\n",
        backend.addr
    );
    for line in route_extra.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str(&format!("    {line}\n"));
    }
    start_gateway(&yaml).await
}

/// Writes `request` on a new connection and returns the response head and whatever followed
/// it until the gateway closed the connection (or [`WAIT`]).
async fn exchange(addr: SocketAddr, request: &[u8]) -> (String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_response(&mut stream).await
}

async fn read_response(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&buf)))
        + 4;
    (
        String::from_utf8_lossy(&buf[..end]).into_owned(),
        buf[end..].to_vec(),
    )
}

fn status(head: &str) -> u16 {
    head[9..12].parse().unwrap()
}

/// The victim: an ordinary request from another client is still served by the backend.
async fn still_served(gateway: &Gateway, path: &str) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
    let (head, body) = exchange(gateway.addr, request.as_bytes()).await;
    assert_eq!(status(&head), 200, "{head}");
    assert_eq!(body, b"ok");
}

fn upgrade(path: &str, host: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A backend's 101 for the upgrade request `head`.
fn switching(head: &str) -> String {
    let key = header_of(head, "sec-websocket-key").expect("a key");
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    )
}

// ---------------------------------------------------------------------------------------------
// Item 6: Forwarded forged through Host

const FORGING_HOST: &str = "app.example.test:1\", for=6.6.6.6;proto=https;host=\"app.example.test";

/// Attack: a Host value that closes `host="…"` early so that the `Forwarded` element the
/// backend trusts reads `for=6.6.6.6;proto=https`. Victim: the backend never receives it.
#[tokio::test]
async fn a_host_that_would_forge_forwarded_is_refused_on_plain_http() {
    let backend = backend(ok_answer).await;
    let gateway = gateway(&backend, "/", "").await;
    let request = format!("GET / HTTP/1.1\r\nHost: {FORGING_HOST}\r\nConnection: close\r\n\r\n");
    let (head, body) = exchange(gateway.addr, request.as_bytes()).await;
    assert_eq!(status(&head), 400, "{head}");
    assert!(String::from_utf8_lossy(&body).contains("Host"));
    assert!(backend.seen().is_empty(), "{:?}", backend.seen());
    still_served(&gateway, "/").await;
    let seen = backend.seen();
    assert_eq!(
        seen[0].header("forwarded"),
        Some("for=127.0.0.1;proto=http;host=\"app.test\"")
    );
}

/// The same attack on a WebSocket upgrade: 400 before any backend is contacted.
#[tokio::test]
async fn a_host_that_would_forge_forwarded_is_refused_on_an_upgrade() {
    let backend = backend(|head: &str| switching(head).into_bytes()).await;
    let gateway = gateway(&backend, "/", "").await;
    let (head, _) = exchange(gateway.addr, upgrade("/", FORGING_HOST, "").as_bytes()).await;
    assert_eq!(status(&head), 400, "{head}");
    // The gateway's one connection attempt is never made.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(backend.connections(), 0);
}

// ---------------------------------------------------------------------------------------------
// Item 7: path_prefix on the raw path

/// Attack: `/chat/../admin` matches the `/chat/` prefix when compared raw and reaches a
/// normalising backend as `/admin`. Victim: the backend only ever sees paths under `/chat/`.
#[tokio::test]
async fn dot_segments_cannot_leave_the_routes_prefix() {
    let backend = backend(ok_answer).await;
    let gateway = gateway(&backend, "/chat/", "").await;
    for path in [
        "/chat/../admin",
        "/chat/../../admin?x=1",
        "/chat/./../admin",
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let (head, _) = exchange(gateway.addr, request.as_bytes()).await;
        assert_eq!(status(&head), 404, "{path}: {head}");
        let (head, _) = exchange(gateway.addr, upgrade(path, "a", "").as_bytes()).await;
        assert_eq!(status(&head), 404, "upgrade {path}: {head}");
    }
    assert_eq!(backend.connections(), 0, "{:?}", backend.seen());
}

/// Attack: percent-encoded dots and slashes that a decoding backend turns into the same
/// escape. Victim: refused with 400, the backend sees nothing.
#[tokio::test]
async fn encoded_dot_segments_and_slashes_are_refused() {
    let backend = backend(ok_answer).await;
    let gateway = gateway(&backend, "/chat/", "").await;
    for path in [
        "/chat/%2e%2e/admin",
        "/chat/.%2E/admin",
        "/chat/..%2fadmin",
        "/chat/..%5Cadmin",
        "/chat/..;/admin",
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let (head, _) = exchange(gateway.addr, request.as_bytes()).await;
        assert_eq!(status(&head), 400, "{path}: {head}");
        let (head, _) = exchange(gateway.addr, upgrade(path, "a", "").as_bytes()).await;
        assert_eq!(status(&head), 400, "upgrade {path}: {head}");
    }
    assert_eq!(backend.connections(), 0, "{:?}", backend.seen());
}

/// What was matched is what is forwarded: the backend receives the normalised path.
#[tokio::test]
async fn the_backend_receives_the_normalised_path() {
    let backend = backend(ok_answer).await;
    let gateway = gateway(&backend, "/chat/", "").await;
    let request = b"GET /chat/x/../room?a=/../b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let (head, _) = exchange(gateway.addr, request).await;
    assert_eq!(status(&head), 200, "{head}");
    assert!(
        backend.seen()[0]
            .head
            .starts_with("GET /chat/room?a=/../b HTTP/1.1\r\n"),
        "{:?}",
        backend.seen()
    );
}

// ---------------------------------------------------------------------------------------------
// Item 10: body headers, bodies and backend answers

/// A client's body fields on an upgrade (a session opened by a POST carries them) are not
/// copied onto the body-less GET to the backend, which servers such as Python's `websockets`
/// refuse.
#[tokio::test]
async fn the_backends_upgrade_get_carries_no_body_fields() {
    let backend = backend(|head: &str| switching(head).into_bytes()).await;
    let gateway = gateway(&backend, "/", "").await;
    let extra = "Content-Length: 0\r\nContent-Type: application/json\r\nCookie: c=1\r\n";
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(upgrade("/", "a", extra).as_bytes())
        .await
        .unwrap();
    let mut head = vec![0u8; 12];
    within("the 101", stream.read_exact(&mut head))
        .await
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    let seen = &backend.seen()[0];
    assert_eq!(seen.header("cookie"), Some("c=1"));
    assert_eq!(seen.header("content-length"), None, "{}", seen.head);
    assert_eq!(seen.header("content-type"), None, "{}", seen.head);
}

/// Attack: a malformed chunked body. The client's fault: 400, not a 502 that blames (and
/// logs) the backend; the backend keeps serving.
#[tokio::test]
async fn a_malformed_chunked_body_is_the_clients_400() {
    let backend = backend(ok_answer).await;
    let gateway = gateway(&backend, "/", "").await;
    let request = b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
        5\r\nhello\r\nzz\r\n";
    let (head, _) = exchange(gateway.addr, request).await;
    assert_eq!(status(&head), 400, "{head}");
    assert!(backend.seen().is_empty(), "{:?}", backend.seen());
    still_served(&gateway, "/").await;
}

/// `Transfer-Encoding: gzip, chunked` is answered 501 (as nginx does) instead of the gzip
/// coding silently dropped on the way to the backend.
#[tokio::test]
async fn a_transfer_coding_other_than_chunked_is_501() {
    let backend = backend(ok_answer).await;
    let gateway = gateway(&backend, "/", "").await;
    let request = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
        5\r\nhello\r\n0\r\n\r\n";
    // As the first request (read by the gateway) and as a later one (read by hyper).
    let (head, _) = exchange(gateway.addr, request).await;
    assert_eq!(status(&head), 501, "{head}");
    let mut later = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
    later.extend_from_slice(request);
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(&later).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("HTTP/1.1 501"), "{text}");
    assert_eq!(backend.seen().len(), 1, "{:?}", backend.seen());
}

/// A GET's chunked body reaches the backend (as nginx forwards it) instead of being dropped.
#[tokio::test]
async fn a_gets_chunked_body_is_forwarded() {
    let backend = backend(ok_answer).await;
    let gateway = gateway(&backend, "/", "").await;
    let request =
        b"GET /q HTTP/1.1\r\nHost: a\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n\
        5\r\nhello\r\n0\r\n\r\n";
    let (head, _) = exchange(gateway.addr, request).await;
    assert_eq!(status(&head), 200, "{head}");
    let seen = &backend.seen()[0];
    assert_eq!(
        seen.header("transfer-encoding"),
        Some("chunked"),
        "{}",
        seen.head
    );
    assert_eq!(seen.body, b"5\r\nhello\r\n0\r\n\r\n");
}

/// A backend that answers a plain GET with 101: the client gets a 502, not a bare 101 after
/// which nothing it could speak follows.
#[tokio::test]
async fn a_backends_101_to_a_plain_get_is_a_502() {
    let backend = backend(|_: &str| {
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n".to_vec()
    })
    .await;
    let gateway = gateway(&backend, "/", "").await;
    let (head, _) = exchange(
        gateway.addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&head), 502, "{head}");
}

/// A backend that sends `100 Continue` before its 101: the interim answer is skipped and the
/// client gets the WebSocket.
#[tokio::test]
async fn an_interim_answer_before_the_backends_101_is_skipped() {
    let backend = backend(|head: &str| {
        let mut out =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n".to_vec();
        out.extend_from_slice(switching(head).as_bytes());
        out
    })
    .await;
    let gateway = gateway(&backend, "/", "").await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(upgrade("/", "a", "").as_bytes())
        .await
        .unwrap();
    let mut head = vec![0u8; 12];
    within("the answer", stream.read_exact(&mut head))
        .await
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
}

/// A backend that answers an upgrade with a 204 "with a body": the client gets a 204 and
/// nothing after it (bytes after a 204 would be read as the next response).
#[tokio::test]
async fn a_backends_204_to_an_upgrade_reaches_the_client_without_a_body() {
    let backend = backend(|_: &str| {
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-App: 1\r\n\r\nhello".to_vec()
    })
    .await;
    let gateway = gateway(&backend, "/", "").await;
    let (head, rest) = exchange(gateway.addr, upgrade("/", "a", "").as_bytes()).await;
    assert_eq!(status(&head), 204, "{head}");
    assert_eq!(header_of(&head, "x-app"), Some("1"), "{head}");
    assert_eq!(header_of(&head, "content-length"), None, "{head}");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

/// A backend that answers an upgrade with `100 Continue` and then closes: a 502, never the
/// 100 passed on as a final answer.
#[tokio::test]
async fn a_backend_that_only_sends_100_to_an_upgrade_is_a_502() {
    let backend = backend(|_: &str| b"HTTP/1.1 100 Continue\r\n\r\n".to_vec()).await;
    let gateway = start_gateway(&format!(
        "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends: [ws://{}]\n    \
         connect_timeout: 300ms\nroutes:\n  - name: app\n    upstream: app\n",
        backend.addr
    ))
    .await;
    let (head, _) = exchange(gateway.addr, upgrade("/", "a", "").as_bytes()).await;
    assert!(matches!(status(&head), 502 | 504), "{head}");
}

// ---------------------------------------------------------------------------------------------
// Item 5: a proxied upload trickled forever

/// Attack: an upload that stalls after a few bytes holds a client slot and a backend request.
/// With `timeouts.body` the client gets 408, the backend's request is cancelled (its
/// connection closed), and the backend keeps serving others.
#[tokio::test]
async fn a_stalled_upload_is_408_and_its_backend_request_is_cancelled() {
    let backend = backend(ok_answer).await;
    let gateway = gateway(&backend, "/", "timeouts: {body: 300ms}").await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let (head, _) = within("the 408", read_response(&mut stream)).await;
    assert_eq!(status(&head), 408, "{head}");
    within("the backend request cancelled", async {
        while backend.closed.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(backend.seen().is_empty(), "{:?}", backend.seen());
    still_served(&gateway, "/").await;
}

/// A slow but steady upload (a chunk every 100 ms, under the 300 ms deadline) is not cut.
#[tokio::test]
async fn a_slow_steady_upload_is_not_cut() {
    let backend = backend(ok_answer).await;
    let gateway = gateway(&backend, "/", "timeouts: {body: 300ms}").await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 8\r\n\r\n",
        )
        .await
        .unwrap();
    for byte in b"abcdefgh" {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream.write_all(&[*byte]).await.unwrap();
    }
    let (head, _) = read_response(&mut stream).await;
    assert_eq!(status(&head), 200, "{head}");
    assert_eq!(backend.seen()[0].body, b"abcdefgh");
}

/// Attack: an upload that never stalls long enough for `timeouts.body` but never ends either.
/// `timeouts.body_total` answers it with 408 too.
#[tokio::test]
async fn an_endless_trickle_is_cut_by_the_total_body_deadline() {
    let backend = backend(ok_answer).await;
    let gateway = gateway(&backend, "/", "timeouts: {body: 10s, body_total: 400ms}").await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n")
        .await
        .unwrap();
    // Reads the answer while trickling: once the gateway has answered, bytes written to it
    // could turn its close into a reset that destroys the answer.
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if writer.write_all(b"x").await.is_err() {
                break;
            }
        }
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    within("the 408", async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = reader.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed without an answer");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    trickle.abort();
    let head = String::from_utf8_lossy(&buf).into_owned();
    assert_eq!(status(&head), 408, "{head}");
    assert!(backend.seen().is_empty(), "{:?}", backend.seen());
}

// ---------------------------------------------------------------------------------------------
// Request smuggling: each variant is refused before anything reaches the backend

/// Refuses `request` with 400 (or `expected`), the backend sees nothing, another client is
/// still served.
async fn refused_without_reaching_the_backend(request: &[u8], expected: u16) {
    let backend = backend(ok_answer).await;
    let gateway = gateway(&backend, "/", "").await;
    let (head, _) = exchange(gateway.addr, request).await;
    assert_eq!(status(&head), expected, "{head}");
    assert!(backend.seen().is_empty(), "{:?}", backend.seen());
    still_served(&gateway, "/").await;
    assert_eq!(backend.seen().len(), 1, "{:?}", backend.seen());
}

const SMUGGLED: &str = "GET /admin HTTP/1.1\r\nHost: a\r\n\r\n";

/// CL.TE: `Content-Length` and `Transfer-Encoding` together, a body that hides a request for
/// whichever parser reads the other framing.
#[tokio::test]
async fn smuggling_with_content_length_and_transfer_encoding_is_refused() {
    let request = format!(
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
         0\r\n\r\n{SMUGGLED}"
    );
    refused_without_reaching_the_backend(request.as_bytes(), 400).await;
}

/// CL.TE on a later request of a keep-alive connection, which hyper reads: the chunked framing
/// wins (RFC 9112 §6.3), the body is empty, and the connection is closed after the answer, so
/// the request hidden behind it is never read, let alone forwarded.
#[tokio::test]
async fn smuggling_with_content_length_and_transfer_encoding_later_on_a_connection_goes_nowhere() {
    let backend = backend(ok_answer).await;
    let gateway = gateway(&backend, "/", "").await;
    let request = format!(
        "GET /first HTTP/1.1\r\nHost: a\r\n\r\n\
         POST /second HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
         0\r\n\r\n{SMUGGLED}"
    );
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    // Read until the gateway closes: it must, and before answering a third request.
    let mut answers = Vec::new();
    within("the gateway to close", stream.read_to_end(&mut answers))
        .await
        .unwrap();
    let answers = String::from_utf8_lossy(&answers);
    assert_eq!(answers.matches("HTTP/1.1 ").count(), 2, "{answers}");
    let paths: Vec<String> = backend
        .seen()
        .iter()
        .map(|seen| seen.head.split(' ').nth(1).unwrap_or_default().to_owned())
        .collect();
    assert_eq!(paths, ["/first", "/second"], "{:?}", backend.seen());
    still_served(&gateway, "/").await;
}

/// An upgrade that announces a body: the body would be taken for the client's first frames
/// (and a request hidden in it would reach the backend inside a WebSocket), so it is refused.
#[tokio::test]
async fn an_upgrade_with_a_body_is_refused() {
    for framing in [
        format!("Content-Length: {}\r\n", SMUGGLED.len()),
        "Transfer-Encoding: chunked\r\n".to_owned(),
    ] {
        let request = upgrade("/", "a", &framing) + SMUGGLED;
        refused_without_reaching_the_backend(request.as_bytes(), 400).await;
    }
}

/// Two different `Content-Length` values.
#[tokio::test]
async fn smuggling_with_two_content_lengths_is_refused() {
    let request = format!(
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
        SMUGGLED.len()
    );
    refused_without_reaching_the_backend(request.as_bytes(), 400).await;
}

/// An obs-fold line continuing `Transfer-Encoding`.
#[tokio::test]
async fn smuggling_with_an_obs_fold_is_refused() {
    let request = format!(
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX: y\r\n Transfer-Encoding: chunked\r\n\r\n\
         0\r\n\r\n{SMUGGLED}"
    );
    refused_without_reaching_the_backend(request.as_bytes(), 400).await;
}

/// Whitespace between a field name and its colon (`Transfer-Encoding : chunked`).
#[tokio::test]
async fn smuggling_with_whitespace_before_the_colon_is_refused() {
    let request = format!(
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding : chunked\r\n\r\n\
         0\r\n\r\n{SMUGGLED}"
    );
    refused_without_reaching_the_backend(request.as_bytes(), 400).await;
}

/// A chunk size that overflows 64 bits, which a parser that wraps reads as a small chunk.
#[tokio::test]
async fn smuggling_with_a_chunk_size_overflow_is_refused() {
    let backend = backend(ok_answer).await;
    let gateway = gateway(&backend, "/", "").await;
    let request = format!(
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
         10000000000000005\r\nhello\r\n0\r\n\r\n{SMUGGLED}"
    );
    let (head, _) = exchange(gateway.addr, request.as_bytes()).await;
    assert_eq!(status(&head), 400, "{head}");
    // Whatever part of the request reached the backend, no request for /admin did.
    assert!(
        backend.seen().iter().all(|s| !s.head.contains("/admin")),
        "{:?}",
        backend.seen()
    );
    still_served(&gateway, "/").await;
}

/// Bare LF line endings, which httparse accepts: the gateway writes its own CRLF head, so the
/// backend receives exactly the one request, well-formed, and nothing smuggled after it.
#[tokio::test]
async fn bare_lf_line_endings_reach_the_backend_as_one_crlf_request() {
    let backend = backend(ok_answer).await;
    let gateway = gateway(&backend, "/", "").await;
    let request = b"GET /lf HTTP/1.1\nHost: a\nConnection: close\n\n";
    let (head, _) = exchange(gateway.addr, request).await;
    assert_eq!(status(&head), 200, "{head}");
    let seen = backend.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].head.starts_with("GET /lf HTTP/1.1\r\n"), "{seen:?}");
    assert!(!seen[0].head.replace("\r\n", "").contains('\n'), "{seen:?}");
}

/// A plain-HTTP request head larger than `max_header_bytes` is 431, and the backend neither
/// sees it nor stops serving others.
#[tokio::test]
async fn an_oversized_plain_http_head_is_431() {
    let request = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "x".repeat(32 << 10)
    );
    refused_without_reaching_the_backend(request.as_bytes(), 431).await;
}
