//! The opening handshake as a client sees it, over raw sockets: every refusal is a complete
//! HTTP response with the right status, the headers RFC 6455 / RFC 9110 ask for, and a
//! one-line plain-text body naming the problem; limits and timeouts on the head; connection
//! limits, gateway-wide and per route.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/routing_client.rs"]
mod routing_client;
mod support;

use routing_client::*;
use std::time::Duration;
use support::{EchoBackend, echo_backend, simple_config, start_gateway, upgrade_request};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A gateway with one catch-all route to one echo backend, plus top-level YAML `extra`.
async fn gateway_with(extra: &str) -> (support::Gateway, EchoBackend) {
    let backend = echo_backend("b1").await;
    let yaml = format!("{}{extra}", simple_config(&[backend.addr], ""));
    (start_gateway(&yaml).await, backend)
}

fn assert_backend_untouched(backend: &EchoBackend) {
    assert!(
        backend.seen.lock().unwrap().is_empty(),
        "a refused handshake reached the backend"
    );
}

const HOST: &str = "Host: localhost\r\n";

#[tokio::test]
async fn post_upgrade_405_allow_get() {
    let (gateway, backend) = gateway_with("").await;
    let request = upgrade_request("/chat", "").replacen("GET ", "POST ", 1);
    let response = exchange(gateway.addr, request.as_bytes()).await;
    response.assert_refusal(405, "GET");
    assert_eq!(response.header("allow"), Some("GET"), "{}", response.raw);
    assert_backend_untouched(&backend);
}

#[tokio::test]
async fn version_missing_or_8_426_with_version_13() {
    let (gateway, backend) = gateway_with("").await;
    let missing = upgrade_request("/chat", "").replace("Sec-WebSocket-Version: 13\r\n", "");
    let eight = upgrade_request("/chat", "")
        .replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let both = upgrade_request("/chat", "Sec-WebSocket-Version: 8\r\n");
    for request in [missing, eight, both] {
        let response = exchange(gateway.addr, request.as_bytes()).await;
        response.assert_refusal(426, "Sec-WebSocket-Version");
        assert_eq!(
            response.header("sec-websocket-version"),
            Some("13"),
            "{}",
            response.raw
        );
    }
    assert_backend_untouched(&backend);
}

#[tokio::test]
async fn key_bad_400() {
    let (gateway, backend) = gateway_with("").await;
    let valid = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    for replacement in [
        String::new(),
        "Sec-WebSocket-Key: short\r\n".to_owned(),
        // 18 bytes of base64, not 16.
        "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAAA\r\n".to_owned(),
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=!\r\n".to_owned(),
        format!("{valid}{valid}"),
    ] {
        let request = upgrade_request("/chat", "").replace(valid, &replacement);
        exchange(gateway.addr, request.as_bytes())
            .await
            .assert_refusal(400, "Sec-WebSocket-Key");
    }
    assert_backend_untouched(&backend);
}

#[tokio::test]
async fn connection_without_upgrade_token_400() {
    let (gateway, backend) = gateway_with("").await;
    for connection in ["", "Connection: keep-alive\r\n"] {
        let request = upgrade_request("/chat", "").replace("Connection: Upgrade\r\n", connection);
        exchange(gateway.addr, request.as_bytes())
            .await
            .assert_refusal(400, "Connection");
    }
    assert_backend_untouched(&backend);
}

#[tokio::test]
async fn subprotocol_offer_not_a_token_400() {
    let (gateway, backend) = gateway_with("").await;
    let request = upgrade_request("/chat", "Sec-WebSocket-Protocol: chat, bad/token\r\n");
    exchange(gateway.addr, request.as_bytes())
        .await
        .assert_refusal(400, "Sec-WebSocket-Protocol");
    assert_backend_untouched(&backend);
}

/// What browsers really send is accepted: Firefox's `Connection: keep-alive, Upgrade`, mixed
/// case tokens and names; the 101 carries the RFC 6455 accept value for the key.
#[tokio::test]
async fn browser_style_upgrade_101_with_the_rfc_accept_value() {
    let (gateway, backend) = gateway_with("").await;
    let firefox = upgrade_request("/chat", "")
        .replace("Connection: Upgrade", "Connection: keep-alive, Upgrade");
    let mixed_case = upgrade_request("/chat", "")
        .replace("Upgrade: websocket", "upgrade: WebSocket")
        .replace("Connection: Upgrade", "CONNECTION: upgrade")
        .replace("Sec-WebSocket-Version", "sec-websocket-version");
    for request in [firefox, mixed_case] {
        let head = upgrade_head(gateway.addr, &request).await;
        assert_eq!(head.status, 101, "{}", head.raw);
        // RFC 6455 §1.3's example key and accept value.
        assert_eq!(
            head.header("sec-websocket-accept"),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{}",
            head.raw
        );
        assert_eq!(
            head.header("upgrade")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("websocket")
        );
    }
    assert_eq!(backend.seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn host_missing_or_repeated_400() {
    let (gateway, backend) = gateway_with("").await;
    let missing = upgrade_request("/chat", "").replace(HOST, "");
    let repeated = upgrade_request("/chat", "Host: other.example\r\n");
    for request in [missing, repeated] {
        exchange(gateway.addr, request.as_bytes())
            .await
            .assert_refusal(400, "Host");
    }
    assert_backend_untouched(&backend);
}

/// RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without Host. The answer
/// must not depend on whether the routes happen to name hosts.
#[tokio::test]
async fn host_missing_with_only_host_routes_400_not_404() {
    let backend = echo_backend("b1").await;
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app: {{backends: [\"ws://{}\"]}}\nroutes:\n  - match: {{host: localhost}}\n    upstream: app\n",
        backend.addr
    );
    let gateway = start_gateway(&yaml).await;
    let missing = upgrade_request("/chat", "").replace(HOST, "");
    exchange(gateway.addr, missing.as_bytes())
        .await
        .assert_refusal(400, "Host");
    assert_backend_untouched(&backend);
}

#[tokio::test]
async fn get_without_upgrade_is_proxied_as_plain_http_not_refused() {
    // A request without `Upgrade: websocket` is plain HTTP: the gateway proxies it to the
    // route's backend instead of refusing it. This backend speaks only WebSocket and drops
    // the connection, so the gateway answers 502: the request got there.
    let (gateway, _backend) = gateway_with("").await;
    let request =
        format!("GET /chat HTTP/1.1\r\n{HOST}Connection: close\r\nAccept: text/html\r\n\r\n");
    let response = exchange(gateway.addr, request.as_bytes()).await;
    response.assert_refusal(502, "failed to answer");
}

#[tokio::test]
async fn http10_upgrade_400() {
    let (gateway, backend) = gateway_with("").await;
    let request = upgrade_request("/chat", "").replacen("HTTP/1.1", "HTTP/1.0", 1);
    exchange(gateway.addr, request.as_bytes())
        .await
        .assert_refusal(400, "HTTP/1.1");
    assert_backend_untouched(&backend);
}

#[tokio::test]
async fn garbage_bytes_400() {
    let (gateway, backend) = gateway_with("").await;
    let garbage: [&[u8]; 4] = [
        // A TLS ClientHello's first bytes, sent to a plain listener.
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x5a\x5a\x5a\x5a",
        b"\x00\x01\x02\x03\xff\xfe\r\n\r\n",
        b"HELLO THERE\r\n\r\n",
        b"GET /chat HTTP/1.1\r\nHost localhost\r\n\r\n",
    ];
    for bytes in garbage {
        let response = exchange(gateway.addr, bytes).await;
        response.assert_refusal(400, "malformed");
    }
    assert_backend_untouched(&backend);
}

#[tokio::test]
async fn head_larger_than_max_header_bytes_431() {
    let (gateway, backend) = gateway_with("limits:\n  max_header_bytes: 1KiB\n").await;
    // Complete but too large, and incomplete but already too large.
    let padding = format!("X-Padding: {}\r\n", "a".repeat(1100));
    let complete = upgrade_request("/chat", &padding);
    let endless = format!("GET /chat HTTP/1.1\r\n{HOST}{padding}{padding}");
    for request in [complete, endless] {
        exchange(gateway.addr, request.as_bytes())
            .await
            .assert_refusal(431, "1024 bytes");
    }
    assert_backend_untouched(&backend);
    // The limit is inclusive: a head of exactly 1 KiB is served, one byte more is not.
    assert_eq!(
        upgrade_head(gateway.addr, &head_of_size(1024)).await.status,
        101
    );
    let response = exchange(gateway.addr, head_of_size(1025).as_bytes()).await;
    response.assert_refusal(431, "1024 bytes");
}

/// A valid upgrade request of exactly `size` bytes, padded with a header.
fn head_of_size(size: usize) -> String {
    let bare = upgrade_request("/chat", "X-Padding: \r\n");
    let request = upgrade_request(
        "/chat",
        &format!("X-Padding: {}\r\n", "a".repeat(size - bare.len())),
    );
    assert_eq!(request.len(), size);
    request
}

/// The head of the gateway's answer to `request` (the connection stays open).
async fn upgrade_head(gateway: std::net::SocketAddr, request: &str) -> HttpResponse {
    use tokio::io::AsyncReadExt;
    let mut tcp = within("TCP connect", TcpStream::connect(gateway))
        .await
        .unwrap();
    within("write", tcp.write_all(request.as_bytes()))
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = within("response head", tcp.read(&mut byte)).await.unwrap();
        assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    parse_response(&head)
}

#[tokio::test]
async fn header_fields_too_many_431() {
    let (gateway, backend) = gateway_with("").await;
    let many: String = (0..120).map(|n| format!("X-{n}: 1\r\n")).collect();
    exchange(gateway.addr, upgrade_request("/chat", &many).as_bytes())
        .await
        .assert_refusal(431, "header");
    assert_backend_untouched(&backend);
}

/// Writes `head` one byte every `pace` until the gateway stops reading or closes; returns
/// what the gateway answered and when the connection ended, from connect.
async fn trickle(
    gateway: std::net::SocketAddr,
    head: &[u8],
    pace: Duration,
) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let tcp = within("TCP connect", TcpStream::connect(gateway))
        .await
        .unwrap();
    let (mut reader, mut writer) = tcp.into_split();
    let head = head.to_vec();
    let writing = tokio::spawn(async move {
        for byte in head {
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(pace).await;
        }
        // Then hold the connection open without finishing the head.
        tokio::time::sleep(STEP).await;
    });
    let mut answer = Vec::new();
    let read = within("the gateway to give up on a slow head", async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await;
    let elapsed = started.elapsed();
    writing.abort();
    (answer, elapsed)
}

fn assert_408_or_closed(answer: &[u8], elapsed: Duration, timeout: Duration) {
    if !answer.is_empty() {
        parse_response(answer).assert_refusal(408, "time");
    }
    assert!(
        elapsed >= timeout - Duration::from_millis(20),
        "gave up after {elapsed:?}, before the {timeout:?} timeout"
    );
    assert!(
        elapsed < timeout + Duration::from_secs(2),
        "gave up only after {elapsed:?} with a {timeout:?} timeout"
    );
}

#[tokio::test]
async fn head_trickled_slower_than_handshake_timeout_408() {
    let (gateway, backend) = gateway_with("timeouts:\n  handshake: 300ms\n").await;
    let head = upgrade_request("/chat", "");
    // About 50 ms a byte: the head would take ten seconds; every byte arrives well within
    // any per-read timeout, so only a deadline for the whole head stops it.
    let (answer, elapsed) = trickle(gateway.addr, head.as_bytes(), Duration::from_millis(50)).await;
    assert_408_or_closed(&answer, elapsed, Duration::from_millis(300));
    assert!(
        !answer.is_empty(),
        "expected a 408 answer, the connection closed silently"
    );
    assert_backend_untouched(&backend);
}

#[tokio::test]
async fn head_never_sent_408_after_handshake_timeout() {
    let (gateway, _backend) = gateway_with("timeouts:\n  handshake: 300ms\n").await;
    let (answer, elapsed) = trickle(gateway.addr, b"", Duration::ZERO).await;
    assert_408_or_closed(&answer, elapsed, Duration::from_millis(300));
}

#[tokio::test]
async fn head_within_handshake_timeout_is_served() {
    let (gateway, _backend) = gateway_with("timeouts:\n  handshake: 300ms\n").await;
    // A normal client sends its head at once and then idles: the handshake timeout ends
    // with the 101 and never cuts an established connection.
    let (mut ws, _) = open(gateway.addr, "ws://localhost/chat", &[]).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    echo(&mut ws, "still here").await;
    close(ws).await;
}

/// A handshake that fails at the backend gives the route's slot back: the next attempt gets
/// the backend's failure again, not "route is at its connection limit".
#[tokio::test]
async fn route_max_connections_failed_upstream_releases_the_slot() {
    let refused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app: {{backends: [\"ws://{refused}\"]}}\nroutes:\n  - upstream: app\n    limits: {{max_connections: 1}}\n"
    );
    let gateway = start_gateway(&yaml).await;
    let request = upgrade_request("/chat", "");
    let response = exchange(gateway.addr, request.as_bytes()).await;
    // A generic reason and a request id; where the backend is stays in the log.
    let body = response.assert_refusal(502, "could not be reached");
    let id = response.header("x-request-id").expect("a request id");
    assert!(
        body.trim_end().ends_with(&format!("(request id {id})")),
        "{body}"
    );
    assert!(!body.contains(&refused.port().to_string()), "{body}");
    // The slot may be held while the refusal lingers; it must come back.
    for _ in 0..2 {
        let response = eventually("the route slot back after a 502", || async {
            let response = exchange(gateway.addr, request.as_bytes()).await;
            (response.status != 503).then_some(response)
        })
        .await;
        response.assert_refusal(502, "could not be reached");
    }
}

#[tokio::test]
async fn route_max_connections_1_second_concurrent_503() {
    let backend = echo_backend("b1").await;
    let yaml = format!(
        "listeners:
  - address: 127.0.0.1:0
upstreams:
  app: {{backends: [\"ws://{}\"]}}
routes:
  - name: limited
    match: {{path_prefix: /limited}}
    upstream: app
    limits: {{max_connections: 1}}
  - name: open
    upstream: app
",
        backend.addr
    );
    let gateway = start_gateway(&yaml).await;
    let (mut first, _) = open(gateway.addr, "ws://localhost/limited", &[]).await;
    echo(&mut first, "first").await;
    let response = exchange(gateway.addr, upgrade_request("/limited", "").as_bytes()).await;
    response.assert_refusal(503, "route");
    assert_eq!(
        refused_status(gateway.addr, "ws://localhost/limited/again", &[]).await,
        503
    );
    // Other routes do not share the limit.
    let mut others = Vec::new();
    for _ in 0..3 {
        let (mut ws, _) = open(gateway.addr, "ws://localhost/elsewhere", &[]).await;
        echo(&mut ws, "other route").await;
        others.push(ws);
    }
    close(first).await;
    let (mut next, _) = eventually("the route's slot freed", || async {
        try_open(gateway.addr, "ws://localhost/limited", &[])
            .await
            .ok()
    })
    .await;
    echo(&mut next, "next").await;
    drop(others);
}

/// A tokio-tungstenite backend whose 101 carries a cookie, an application header and a
/// hop-by-hop header; it closes each WebSocket right after the handshake.
async fn backend_with_101_headers() -> std::net::SocketAddr {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            #[allow(clippy::result_large_err)] // tungstenite's callback contract
            let callback = |_: &Request, mut response: Response| {
                let headers = response.headers_mut();
                headers.append("set-cookie", "sid=abc; Path=/; HttpOnly".parse().unwrap());
                headers.append("x-app-version", "7".parse().unwrap());
                headers.append("keep-alive", "timeout=5".parse().unwrap());
                Ok(response)
            };
            if let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await {
                let _ = ws.close(None).await;
            }
        }
    });
    addr
}

#[tokio::test]
async fn the_backends_end_to_end_101_headers_reach_the_client() {
    let backend = backend_with_101_headers().await;
    let gateway = start_gateway(&simple_config(&[backend], "")).await;
    let (_ws, response) = tokio_tungstenite::connect_async(format!("ws://{}/", gateway.addr))
        .await
        .unwrap();
    let headers = response.headers();
    assert_eq!(headers["set-cookie"], "sid=abc; Path=/; HttpOnly");
    assert_eq!(headers["x-app-version"], "7");
    assert!(
        headers.get("keep-alive").is_none(),
        "hop-by-hop: {headers:?}"
    );
    assert_eq!(headers.get_all("sec-websocket-accept").iter().count(), 1);
    assert_eq!(headers.get_all("upgrade").iter().count(), 1);
}
