//! TLS end to end, on both sides of a real gateway: a TLS listener with the development
//! certificate in front of a plain backend, refusal of a TLS 1.1 hello, and `wss://`
//! backends verified against the development CA (or not trusted without it).
//!
//! Fixtures: `certs/` (see certs/README.md); clients trust `certs/ca.crt` only.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/routing_client.rs"]
mod routing_client;
mod support;
#[path = "support/tls_hello.rs"]
mod tls_hello;

use futures_util::{SinkExt, StreamExt};
use routing_client::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use support::{echo_backend, simple_config, start_gateway, upgrade_request};
use tls_hello::raw_client_hello;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::Message;

fn cert_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("certs")
        .join(name)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client trusting only the development CA.
fn dev_client(versions: &[&'static SupportedProtocolVersion]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cert_path("ca.crt")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A gateway with a TLS listener serving certs/localhost.* (the default) and
/// certs/example-test.* (for example.test and *.example.test by SNI), one route to `backend` (plain
/// ws), plus top-level YAML `extra`.
async fn tls_gateway(backend: SocketAddr, extra: &str) -> support::Gateway {
    tls_gateway_with_route(backend, "", extra).await
}

/// [`tls_gateway`] with extra keys on its route.
async fn tls_gateway_with_route(
    backend: SocketAddr,
    route_extra: &str,
    extra: &str,
) -> support::Gateway {
    let plain = simple_config(&[backend], route_extra);
    let tls = format!(
        "listeners:
  - address: 127.0.0.1:0
    tls:
      certificates:
        - cert: {:?}
          key: {:?}
          server_names: [localhost]
        - cert: {:?}
          key: {:?}
          server_names: [example.test, \"*.example.test\"]
",
        cert_path("localhost.crt"),
        cert_path("localhost.key"),
        cert_path("example-test.crt"),
        cert_path("example-test.key")
    );
    let yaml = plain.replacen("listeners:\n  - address: 127.0.0.1:0\n", &tls, 1);
    assert_ne!(yaml, plain, "the harness's YAML shape changed");
    start_gateway(&format!("{yaml}{extra}")).await
}

async fn wss_connect(url: &str, client: Arc<ClientConfig>) -> Ws {
    let connecting = tokio_tungstenite::connect_async_tls_with_config(
        url,
        None,
        true,
        Some(Connector::Rustls(client)),
    );
    let (ws, response) = within(&format!("wss handshake with {url}"), connecting)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    assert_eq!(response.status().as_u16(), 101);
    ws
}

#[tokio::test]
async fn tls_listener_wss_client_echoes_through_a_plain_backend() {
    let backend = echo_backend("plain-backend").await;
    let gateway = tls_gateway(backend.addr, "").await;
    let port = gateway.addr.port();
    let cases: [(&str, &[&'static SupportedProtocolVersion]); 3] = [
        ("localhost", rustls::ALL_VERSIONS),
        ("localhost", &[&rustls::version::TLS12]),
        // The certificate also covers the address: a client connecting by IP verifies it.
        ("127.0.0.1", rustls::ALL_VERSIONS),
    ];
    for (host, versions) in cases {
        let mut ws = wss_connect(
            &format!("wss://{host}:{port}/chat?x=1"),
            dev_client(versions),
        )
        .await;
        echo(&mut ws, "over tls").await;
        within(
            "send binary",
            ws.send(Message::binary(vec![0u8, 1, 2, 255])),
        )
        .await
        .unwrap();
        let got = within("binary echo", ws.next()).await.unwrap().unwrap();
        assert_eq!(got, Message::binary(vec![0u8, 1, 2, 255]));
        assert_eq!(whoami(&mut ws).await, "plain-backend");
        close(ws).await;
    }
    let seen = backend.seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|r| r.path == "/chat?x=1"), "{seen:?}");
    assert!(
        seen.iter()
            .all(|r| r.header("x-forwarded-proto") == Some("https")),
        "{seen:?}"
    );
}

/// The closing handshake over TLS ends cleanly for the client: the gateway's close frame, its
/// close_notify and the end of TCP arrive in order, and the client's own close_notify (which
/// rustls sends when it shuts down) meets a gateway still reading, not a reset.
#[tokio::test]
async fn tls_listener_closing_handshake_ends_cleanly_for_the_client() {
    let backend = echo_backend("plain-backend").await;
    let gateway = tls_gateway(backend.addr, "").await;
    let port = gateway.addr.port();
    for _ in 0..20 {
        let mut ws = wss_connect(
            &format!("wss://localhost:{port}/"),
            dev_client(rustls::ALL_VERSIONS),
        )
        .await;
        echo(&mut ws, "before closing").await;
        within("close", ws.close(None)).await.unwrap();
        // Whatever follows the close reply must be the clean end of the stream.
        loop {
            match within("the end of the connection", ws.next()).await {
                None => break,
                Some(Ok(Message::Close(_))) => {}
                Some(other) => panic!("after the closing handshake: {other:?}"),
            }
        }
    }
}

/// SNI picks the certificate on the real listener: a client verifying `chat.example.test`
/// only succeeds if it got the example-test certificate; a name no certificate lists gets
/// the default (localhost) one, which that client rightly rejects.
#[tokio::test]
async fn tls_listener_sni_picks_the_certificate_for_the_name() {
    let backend = echo_backend("plain-backend").await;
    let gateway = tls_gateway(backend.addr, "").await;
    let port = gateway.addr.port();
    let connect = |host: &str| {
        let url = format!("wss://{host}:{port}/chat");
        async move {
            let tcp = within("TCP connect", TcpStream::connect(gateway.addr))
                .await
                .unwrap();
            let connector = Some(Connector::Rustls(dev_client(rustls::ALL_VERSIONS)));
            within(
                &format!("wss handshake for {url}"),
                tokio_tungstenite::client_async_tls_with_config(url.as_str(), tcp, None, connector),
            )
            .await
        }
    };
    for host in ["chat.example.test", "example.test", "localhost"] {
        let (mut ws, _) = connect(host)
            .await
            .unwrap_or_else(|e| panic!("{host}: {e}"));
        echo(&mut ws, host).await;
        let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
    }
    for host in ["other.test", "a.b.example.test"] {
        let error = connect(host)
            .await
            .err()
            .unwrap_or_else(|| panic!("{host}: accepted the default certificate"));
        assert!(
            error.to_string().to_lowercase().contains("certificate"),
            "{host}: {error}"
        );
    }
}

/// Sends `hello` and returns everything the gateway sends until it closes.
async fn answer_to(addr: SocketAddr, hello: &[u8]) -> Vec<u8> {
    let mut tcp = within("TCP connect", TcpStream::connect(addr))
        .await
        .unwrap();
    within("write hello", tcp.write_all(hello)).await.unwrap();
    read_to_close(&mut tcp).await
}

#[tokio::test]
async fn tls11_client_hello_refused_with_alert_never_server_hello() {
    let backend = echo_backend("b1").await;
    let gateway = tls_gateway(backend.addr, "").await;
    let answer = answer_to(gateway.addr, &raw_client_hello([3, 2], true)).await;
    assert!(
        answer.len() >= 7,
        "expected an alert record, got {answer:02x?}"
    );
    assert_ne!(
        answer[0], 0x16,
        "answered with a handshake record (ServerHello): {answer:02x?}"
    );
    assert_eq!(answer[0], 0x15, "not an alert record: {answer:02x?}");
    assert_eq!(answer[5], 2, "alert level should be fatal: {answer:02x?}");
    assert_eq!(
        answer[6], 70,
        "alert should be protocol_version: {answer:02x?}"
    );
    // Control: the same hand-made hello as TLS 1.2 gets a ServerHello, so the refusal is
    // about the version, not a malformed hello.
    let mut tcp = within("TCP connect", TcpStream::connect(gateway.addr))
        .await
        .unwrap();
    within(
        "write hello",
        tcp.write_all(&raw_client_hello([3, 3], true)),
    )
    .await
    .unwrap();
    let mut head = [0u8; 6];
    within("ServerHello", tcp.read_exact(&mut head))
        .await
        .unwrap();
    assert_eq!(
        (head[0], head[5]),
        (0x16, 2),
        "expected a ServerHello: {head:02x?}"
    );
    assert!(backend.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn tls_listener_plain_http_request_never_gets_an_upgrade() {
    let backend = echo_backend("b1").await;
    let gateway = tls_gateway(backend.addr, "").await;
    let answer = answer_to(gateway.addr, upgrade_request("/chat", "").as_bytes()).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP answered on a TLS listener: {answer:02x?}"
    );
    assert!(backend.seen.lock().unwrap().is_empty());
}

/// From accept to a complete request head, the TLS handshake included, a client has
/// `timeouts.handshake` (config/examples/full.yaml), not that long for TLS and again as long
/// for the head.
#[tokio::test]
async fn tls_listener_slow_tls_then_slow_head_handshake_timeout_covers_both() {
    let backend = echo_backend("b1").await;
    let gateway = tls_gateway(backend.addr, "timeouts:\n  handshake: 3s\n").await;
    let started = Instant::now();
    let tcp = within("TCP connect", TcpStream::connect(gateway.addr))
        .await
        .unwrap();
    // Silent for two thirds of the budget, then a quick TLS handshake and half a head.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let connector = TlsConnector::from(dev_client(rustls::ALL_VERSIONS));
    let name = ServerName::try_from("localhost").unwrap();
    let ended = match within("TLS handshake", connector.connect(name, tcp)).await {
        // Refusing the late handshake is within the contract too.
        Err(_) => started.elapsed(),
        Ok(mut tls) => {
            within(
                "write",
                tls.write_all(b"GET /chat HTTP/1.1\r\nHost: localhost\r\n"),
            )
            .await
            .unwrap();
            let mut answer = Vec::new();
            let _ = timeout(Duration::from_secs(8), tls.read_to_end(&mut answer)).await;
            let ended = started.elapsed();
            if !answer.is_empty() {
                parse_response(&answer).assert_refusal(408, "time");
            }
            ended
        }
    };
    assert!(
        ended >= Duration::from_millis(2_900),
        "gave up after {ended:?}, before the 3 s timeout"
    );
    assert!(
        ended < Duration::from_millis(4_200),
        "the 3 s handshake timeout let the connection live {ended:?} from accept: the TLS handshake and the request head each got a full timeout"
    );
}

/// A `wss://` echo backend presenting certs/localhost.crt; counts completed WebSocket
/// handshakes.
async fn wss_backend(name: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert_path("localhost.crt"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_file(cert_path("localhost.key")).unwrap();
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upgrades = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&upgrades);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let Ok(Ok(tls)) = timeout(STEP, acceptor.accept(tcp)).await else {
                    return;
                };
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                while let Some(Ok(message)) = ws.next().await {
                    let reply = match message {
                        Message::Text(text) if text.as_str() == "whoami" => Message::text(name),
                        Message::Text(_) | Message::Binary(_) => message,
                        _ => continue,
                    };
                    if ws.send(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, upgrades)
}

/// A plain listener in front of one `wss://` backend, with `tls` as the upstream's tls block.
fn wss_upstream_yaml(backend_url: &str, tls: &str) -> String {
    format!(
        "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  secure:\n    backends: [\"{backend_url}\"]\n{tls}routes:\n  - upstream: secure\n"
    )
}

#[tokio::test]
async fn wss_backend_with_ca_file_works() {
    let (backend, upgrades) = wss_backend("tls-backend").await;
    let ca = format!("    tls:\n      ca_file: {:?}\n", cert_path("ca.crt"));
    let port = backend.port();
    let cases = [
        (format!("wss://localhost:{port}"), ca.clone()),
        // By address: verified against the certificate's IP SAN.
        (format!("wss://127.0.0.1:{port}"), ca.clone()),
        // By address, verified as a name.
        (
            format!("wss://127.0.0.1:{port}"),
            format!("{ca}      server_name: localhost\n"),
        ),
    ];
    for (url, tls) in cases {
        let gateway = start_gateway(&wss_upstream_yaml(&url, &tls)).await;
        let (mut ws, _) = open(gateway.addr, "ws://localhost/secure", &[]).await;
        echo(&mut ws, "through wss").await;
        assert_eq!(whoami(&mut ws).await, "tls-backend", "{url}");
        close(ws).await;
    }
    assert_eq!(upgrades.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn wss_backend_untrusted_502() {
    let (backend, upgrades) = wss_backend("tls-backend").await;
    let url = format!("wss://localhost:{}", backend.port());
    let ca = format!("ca_file: {:?}", cert_path("ca.crt"));
    for tls in [
        // No ca_file: the bundled web roots do not know the development CA.
        String::new(),
        // The right CA, but a name the certificate does not cover.
        format!("    tls:\n      {ca}\n      server_name: example.test\n"),
    ] {
        let gateway = start_gateway(&wss_upstream_yaml(&url, &tls)).await;
        let response = exchange(gateway.addr, upgrade_request("/secure", "").as_bytes()).await;
        // Why (TLS) is in the log only.
        response.assert_refusal(502, "could not be reached");
    }
    assert_eq!(
        upgrades.load(Ordering::SeqCst),
        0,
        "an untrusted backend completed a WebSocket handshake"
    );
}

/// The affinity cookie's `Set-Cookie` on a 101 from `url`.
async fn affinity_set_cookie(url: &str, tls: Option<Arc<ClientConfig>>) -> String {
    let connecting = tokio_tungstenite::connect_async_tls_with_config(
        url,
        None,
        true,
        tls.map(Connector::Rustls),
    );
    let (_ws, response) = within(&format!("handshake with {url}"), connecting)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn the_affinity_cookie_is_secure_on_tls_listeners_only_unless_configured() {
    let backend = echo_backend("b").await;
    let route = "sticky_cookie:\n  name: aff";
    let tls = tls_gateway_with_route(backend.addr, route, "").await;
    let url = format!("wss://localhost:{}/", tls.addr.port());
    let cookie = affinity_set_cookie(&url, Some(dev_client(rustls::ALL_VERSIONS))).await;
    assert!(
        cookie.ends_with("; HttpOnly; SameSite=Lax; Secure"),
        "{cookie}"
    );

    let plain = start_gateway(&simple_config(&[backend.addr], route)).await;
    let cookie = affinity_set_cookie(&format!("ws://{}/", plain.addr), None).await;
    assert!(cookie.ends_with("; HttpOnly; SameSite=Lax"), "{cookie}");

    let configured = "sticky_cookie:\n  name: aff\n  same_site: strict\n  secure: true";
    let plain = start_gateway(&simple_config(&[backend.addr], configured)).await;
    let cookie = affinity_set_cookie(&format!("ws://{}/", plain.addr), None).await;
    assert!(cookie.ends_with("; SameSite=Strict; Secure"), "{cookie}");
}
