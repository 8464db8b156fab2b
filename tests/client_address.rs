//! The client's address through a load balancer: PROXY protocol v1/v2 headers written by hand
//! here (not by the crate the gateway parses them with), trusted and untrusted sources, and
//! `X-Forwarded-For` from trusted and untrusted proxies, seen by real tokio-tungstenite
//! backends, per-IP limits and `client_ip` stickiness.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use futures_util::SinkExt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use wsgate::server::Server;

/// A running gateway with its listeners' and admin addresses.
struct Running {
    listeners: Vec<SocketAddr>,
    admin: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn run(yaml: &str) -> Running {
    let config = wsgate::config::from_yaml_str(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
    let server = Server::bind(config).await.unwrap();
    let listeners = server.local_addrs();
    let admin = server.admin_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Running {
        listeners,
        admin,
        _stop: stop,
    }
}

/// One upstream `app` of `backends`, a route with `route_extra`, the listeners given as YAML
/// list items, and an admin listener on 127.0.0.2.
fn config(listeners: &str, backends: &[SocketAddr], route_extra: &str, top: &str) -> String {
    let mut yaml = format!("listeners:\n{listeners}upstreams:\n  app:\n    backends:\n");
    for b in backends {
        yaml.push_str(&format!("      - ws://{b}\n"));
    }
    yaml.push_str("routes:\n  - name: app\n    upstream: app\n");
    for line in route_extra.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml.push_str("admin:\n  address: 127.0.0.2:0\n");
    yaml.push_str(top);
    yaml
}

const PROXY_LISTENER: &str = "  - name: lb\n    address: 127.0.0.1:0\n    proxy_protocol: true\n    trusted_proxies: [127.0.0.0/8]\n";

/// A v1 header, as text.
fn v1(source: SocketAddr) -> Vec<u8> {
    let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    let destination = if source.is_ipv4() {
        "198.51.100.1"
    } else {
        "2001:db8::1"
    };
    format!(
        "PROXY {family} {} {destination} {} 443\r\n",
        source.ip(),
        source.port()
    )
    .into_bytes()
}

/// A v2 header for a TCP connection from `source`, as the specification lays it out: the
/// 12-byte signature, version 2 + PROXY, family + STREAM, the length, the addresses and ports,
/// then one NOOP TLV as balancers add.
fn v2(source: SocketAddr) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.push(0x21);
    let mut addresses = Vec::new();
    match source.ip() {
        IpAddr::V4(ip) => {
            header.push(0x11);
            addresses.extend_from_slice(&ip.octets());
            addresses.extend_from_slice(&Ipv4Addr::new(198, 51, 100, 1).octets());
        }
        IpAddr::V6(ip) => {
            header.push(0x21);
            addresses.extend_from_slice(&ip.octets());
            addresses.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        }
    }
    addresses.extend_from_slice(&source.port().to_be_bytes());
    addresses.extend_from_slice(&443u16.to_be_bytes());
    addresses.extend_from_slice(&[0x04, 0x00, 0x02, 0xab, 0xcd]);
    header.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
    header.extend_from_slice(&addresses);
    header
}

/// A WebSocket through `gateway` on a connection that starts with `prefix`.
async fn ws_after(
    gateway: SocketAddr,
    prefix: &[u8],
    path: &str,
    extra: &[(&str, &str)],
) -> Client {
    try_ws_after(gateway, prefix, path, extra)
        .await
        .unwrap_or_else(|e| panic!("WebSocket after a PROXY header: {e}"))
}

async fn try_ws_after(
    gateway: SocketAddr,
    prefix: &[u8],
    path: &str,
    extra: &[(&str, &str)],
) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut tcp = TcpStream::connect(gateway).await.unwrap();
    tcp.write_all(prefix).await.unwrap();
    let mut request = format!("ws://{gateway}{path}")
        .into_client_request()
        .unwrap();
    for (name, value) in extra {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes());
        request
            .headers_mut()
            .insert(name.unwrap(), value.parse().unwrap());
    }
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    .expect("handshake within 10 s")?;
    Ok(ws)
}

async fn whoami(ws: &mut Client) -> String {
    ws.send(Message::text("whoami")).await.unwrap();
    next_message(ws)
        .await
        .into_text()
        .unwrap()
        .as_str()
        .to_owned()
}

/// The backend's view of the newest upgrade it accepted.
fn last_seen(backend: &EchoBackend, name: &str) -> Option<String> {
    let seen = backend.seen.lock().unwrap();
    seen.last().and_then(|r| r.header(name)).map(str::to_owned)
}

async fn wait_for_metric(admin: SocketAddr, line: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http_get(admin, "/metrics").await;
        if body.contains(line) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "missing {line:?} in:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Everything the gateway answers on a connection that sent `bytes`, until it closes.
async fn answer_to(gateway: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(gateway).await.unwrap();
    let _ = tcp.write_all(bytes).await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the gateway closes the connection");
    out
}

#[tokio::test]
async fn v1_and_v2_headers_name_the_client_the_backend_sees() {
    let backend = echo_backend("a").await;
    let gateway = run(&config(PROXY_LISTENER, &[backend.addr], "", "")).await;
    let lb = gateway.listeners[0];

    let mut ws = ws_after(lb, &v1("203.0.113.7:4000".parse().unwrap()), "/", &[]).await;
    assert_eq!(whoami(&mut ws).await, "a");
    assert_eq!(
        last_seen(&backend, "x-forwarded-for").as_deref(),
        Some("203.0.113.7")
    );

    let six: SocketAddr = "[2001:db8::7]:4000".parse().unwrap();
    let mut ws = ws_after(lb, &v2(six), "/", &[("X-Forwarded-For", "6.6.6.6")]).await;
    assert_eq!(whoami(&mut ws).await, "a");
    assert_eq!(
        last_seen(&backend, "x-forwarded-for").as_deref(),
        Some("2001:db8::7"),
        "the client's own X-Forwarded-For is replaced"
    );
    assert_eq!(
        last_seen(&backend, "forwarded").as_deref(),
        Some("for=\"[2001:db8::7]\";proto=http;host=\"".to_owned() + &lb.to_string() + "\"")
            .as_deref()
    );

    // A v2 LOCAL header (the balancer's own health check) keeps the connection's address.
    let local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
    let mut ws = ws_after(lb, local, "/", &[]).await;
    assert_eq!(whoami(&mut ws).await, "a");
    assert_eq!(
        last_seen(&backend, "x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
}

#[tokio::test]
async fn untrusted_sources_and_bad_headers_are_refused_and_counted() {
    let backend = echo_backend("a").await;
    // The second listener on another loopback address, so both can use port 0.
    let listeners = "  - name: ours\n    address: 127.0.0.1:0\n    proxy_protocol: true\n    trusted_proxies: [127.0.0.1]\n  - name: lb\n    address: 127.0.0.3:0\n    proxy_protocol: true\n    trusted_proxies: [10.0.0.0/8]\n";
    let top = "timeouts:\n  handshake: 300ms\n";
    let gateway = run(&config(listeners, &[backend.addr], "", top)).await;
    let (trusted, untrusted) = (gateway.listeners[0], gateway.listeners[1]);

    // A well-formed header from outside the trusted networks: closed, nothing answered.
    let header = v1("203.0.113.7:4000".parse().unwrap());
    let mut bytes = header.clone();
    bytes.extend_from_slice(upgrade_request("/", "").as_bytes());
    assert_eq!(answer_to(untrusted, &bytes).await, b"");
    // From a trusted source: a request with no header, a broken v1, an oversized v2, a
    // header that never ends.
    assert_eq!(
        answer_to(trusted, upgrade_request("/", "").as_bytes()).await,
        b""
    );
    assert_eq!(
        answer_to(trusted, b"PROXY TCP4 203.0.113.300 198.51.100.1 1 2\r\n").await,
        b""
    );
    let mut huge = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec();
    huge.extend_from_slice(&[0; 64]);
    assert_eq!(answer_to(trusted, &huge).await, b"");
    assert_eq!(answer_to(trusted, b"PROXY TCP4 203.0.113.7 ").await, b"");
    // The same header from the trusted source works.
    let mut ws = ws_after(trusted, &header, "/", &[]).await;
    assert_eq!(whoami(&mut ws).await, "a");

    for line in [
        r#"wsgate_refused_total{listener="lb",status="none",reason="proxy_untrusted"} 1"#,
        r#"wsgate_refused_total{listener="ours",status="none",reason="proxy_malformed"} 2"#,
        r#"wsgate_refused_total{listener="ours",status="none",reason="proxy_too_large"} 1"#,
        r#"wsgate_refused_total{listener="ours",status="none",reason="proxy_timeout"} 1"#,
    ] {
        wait_for_metric(gateway.admin, line).await;
    }
}

#[tokio::test]
async fn the_per_ip_limit_counts_the_address_the_header_names() {
    let backend = echo_backend("a").await;
    let top = "limits:\n  max_connections_per_ip: 2\n";
    let gateway = run(&config(PROXY_LISTENER, &[backend.addr], "", top)).await;
    let lb = gateway.listeners[0];
    let first: SocketAddr = "203.0.113.7:4000".parse().unwrap();
    let other: SocketAddr = "203.0.113.8:4000".parse().unwrap();

    let mut held = Vec::new();
    for _ in 0..2 {
        let mut ws = ws_after(lb, &v2(first), "/", &[]).await;
        assert_eq!(whoami(&mut ws).await, "a");
        held.push(ws);
    }
    // The third of the same client is turned away with its 503...
    let mut bytes = v1(first);
    bytes.extend_from_slice(upgrade_request("/", "").as_bytes());
    let answer = answer_to(lb, &bytes).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // ...while another client behind the same balancer is not.
    let mut ws = ws_after(lb, &v1(other), "/", &[]).await;
    assert_eq!(whoami(&mut ws).await, "a");
    // A slot frees when a connection of the first client ends.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut ws) = try_ws_after(lb, &v2(first), "/", &[]).await {
            assert_eq!(whoami(&mut ws).await, "a");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Backends chosen for each of `clients` on two connections each, named as `connect` does.
async fn owners<F, Fut>(clients: &[SocketAddr], connect: F) -> Vec<String>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = Client>,
{
    let mut owners = Vec::new();
    for &client in clients {
        let mut names = Vec::new();
        for _ in 0..2 {
            let mut ws = connect(client).await;
            names.push(whoami(&mut ws).await);
        }
        assert_eq!(names[0], names[1], "{client} moved between connections");
        owners.push(names.remove(0));
    }
    owners
}

#[tokio::test]
async fn client_ip_stickiness_follows_the_proxied_address() {
    let (a, b) = (echo_backend("a").await, echo_backend("b").await);
    let route = "sticky:\n  client_ip: true\n";
    let gateway = run(&config(PROXY_LISTENER, &[a.addr, b.addr], route, "")).await;
    let lb = gateway.listeners[0];
    let clients: Vec<SocketAddr> = (1..=16)
        .map(|i| SocketAddr::from(([203, 0, 113, i], 4000 + u16::from(i))))
        .collect();
    let by_v1 = owners(
        &clients,
        |c| async move { ws_after(lb, &v1(c), "/", &[]).await },
    )
    .await;
    let by_v2 = owners(
        &clients,
        |c| async move { ws_after(lb, &v2(c), "/", &[]).await },
    )
    .await;
    assert_eq!(
        by_v1, by_v2,
        "the same client is placed the same whatever the header version"
    );
    assert!(
        by_v1.iter().any(|o| o == "a") && by_v1.iter().any(|o| o == "b"),
        "sixteen clients behind one balancer spread over both backends: {by_v1:?}"
    );
}

const XFF_LISTENERS: &str = "  - name: behind-proxy\n    address: 127.0.0.1:0\n    trusted_proxies: [127.0.0.0/8]\n  - name: open\n    address: 127.0.0.3:0\n    trusted_proxies: [10.0.0.0/8]\n";

#[tokio::test]
async fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
    let (a, b) = (echo_backend("a").await, echo_backend("b").await);
    let route = "sticky:\n  client_ip: true\n";
    let gateway = run(&config(XFF_LISTENERS, &[a.addr, b.addr], route, "")).await;
    let (trusted, open) = (gateway.listeners[0], gateway.listeners[1]);
    let xff = |client: SocketAddr| format!("{}, 127.0.0.9", client.ip());
    let clients: Vec<SocketAddr> = (1..=16)
        .map(|i| SocketAddr::from(([198, 51, 100, i], 0)))
        .collect();
    let seen = |backend: &EchoBackend| last_seen(backend, "x-forwarded-for");

    // Through the trusted listener: the rightmost untrusted element is the client, and
    // stickiness follows it (127.0.0.9 is a trusted proxy and skipped).
    let placed = owners(&clients, |c| {
        let chain = xff(c);
        async move { ws_after(trusted, b"", "/", &[("X-Forwarded-For", &chain)]).await }
    })
    .await;
    assert!(
        placed.iter().any(|o| o == "a") && placed.iter().any(|o| o == "b"),
        "{placed:?}"
    );
    let mut ws = ws_after(trusted, b"", "/", &[("X-Forwarded-For", "198.51.100.1")]).await;
    let owner = if whoami(&mut ws).await == "a" { &a } else { &b };
    assert_eq!(
        seen(owner).as_deref(),
        Some("198.51.100.1, 127.0.0.1"),
        "a trusted proxy's chain is extended"
    );

    // Through the listener that trusts no one here: every client is 127.0.0.1, so one
    // backend, and the chain names only it.
    let names = owners(&clients[..4], |c| {
        let chain = xff(c);
        async move { ws_after(open, b"", "/", &[("X-Forwarded-For", &chain)]).await }
    })
    .await;
    assert!(names.iter().all(|n| n == &names[0]), "{names:?}");
    let owner = if names[0] == "a" { &a } else { &b };
    assert_eq!(seen(owner).as_deref(), Some("127.0.0.1"));
}

#[tokio::test]
async fn the_per_ip_limit_counts_the_forwarded_client() {
    let backend = echo_backend("a").await;
    let top = "limits:\n  max_connections_per_ip: 1\n";
    let gateway = run(&config(XFF_LISTENERS, &[backend.addr], "", top)).await;
    let (trusted, open) = (gateway.listeners[0], gateway.listeners[1]);
    let as_client = |ip: &'static str| [("X-Forwarded-For", ip)];

    let mut first = ws_after(trusted, b"", "/", &as_client("198.51.100.1")).await;
    whoami(&mut first).await;
    match try_ws_after(trusted, b"", "/", &as_client("198.51.100.1")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!("expected a 503, got {:?}", other.map(|_| "a WebSocket")),
    }
    // Another client behind the same proxy, and a direct client: each has its own allowance.
    let mut second = ws_after(trusted, b"", "/", &as_client("198.51.100.2")).await;
    whoami(&mut second).await;
    let mut direct = ws_after(open, b"", "/", &as_client("198.51.100.1")).await;
    whoami(&mut direct).await;
    // The direct client is 127.0.0.1 whatever it claims: its second connection is refused.
    assert!(
        try_ws_after(open, b"", "/", &as_client("198.51.100.9"))
            .await
            .is_err()
    );
}

/// The header comes before TLS: the handshake starts on the byte after it.
#[tokio::test]
async fn a_proxy_header_precedes_tls() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let certs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
    let backend = echo_backend("a").await;
    let listener = format!(
        "{PROXY_LISTENER}    tls:\n      certificates:\n        - cert: {:?}\n          key: {:?}\n",
        certs.join("localhost.crt"),
        certs.join("localhost.key")
    );
    let gateway = run(&config(&listener, &[backend.addr], "", "")).await;
    let lb = gateway.listeners[0];

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(certs.join("ca.crt")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut tcp = TcpStream::connect(lb).await.unwrap();
    tcp.write_all(&v2("203.0.113.50:5000".parse().unwrap()))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS after the PROXY header");
    let stream = tokio_tungstenite::MaybeTlsStream::Rustls(tls);
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("wss://localhost:{}/", lb.port()), stream)
            .await
            .unwrap();
    assert_eq!(whoami(&mut ws).await, "a");
    assert_eq!(
        last_seen(&backend, "x-forwarded-for").as_deref(),
        Some("203.0.113.50")
    );
    assert_eq!(
        last_seen(&backend, "x-forwarded-proto").as_deref(),
        Some("https")
    );
}
