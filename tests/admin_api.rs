//! The operator's API on the admin listener (`/api/`): refused without its bearer token, lists
//! backends, drains one (its rooms move with 1012, new connections go elsewhere) and puts it
//! back, starts the instance's drain; and the admin listener over TLS.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use futures_util::SinkExt;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use wsgate::server::Server;

const TOKEN: &str = "test-admin-token-0123456789";

struct Running {
    gateway: SocketAddr,
    admin: SocketAddr,
    server: tokio::task::JoinHandle<()>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(yaml: &str) -> Running {
    let config = wsgate::config::from_yaml_str(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
    let server = Server::bind(config).await.unwrap();
    let (gateway, admin) = (server.local_addrs()[0], server.admin_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Running {
        gateway,
        admin,
        server,
        _stop: stop,
    }
}

/// `method path` on the admin listener with an optional bearer token: status and body.
async fn call(admin: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    parse(&response)
}

fn parse(response: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(response).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

fn config(backends: &[SocketAddr], extra: &str) -> String {
    format!(
        "{}admin:\n  address: 127.0.0.2:0\n  token: {TOKEN}\n{extra}",
        simple_config(backends, "sticky:\n  query: room")
    )
}

#[tokio::test]
async fn the_api_is_refused_without_its_token_and_off_without_one() {
    let backend = echo_backend("a").await;
    let running = start(&config(&[backend.addr], "")).await;
    let (status, body) = call(running.admin, "GET", "/api/upstreams", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = call(
        running.admin,
        "GET",
        "/api/upstreams",
        Some("wrong-token-0123456789"),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = call(running.admin, "POST", "/api/drain", Some(&TOKEN[1..])).await;
    assert_eq!(status, 401);
    let (status, body) = call(running.admin, "GET", "/api/upstreams", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["draining"], false);
    assert_eq!(listed["upstreams"][0]["name"], "app");
    assert_eq!(
        listed["upstreams"][0]["backends"][0]["url"],
        format!("ws://{}", backend.addr)
    );
    assert_eq!(listed["upstreams"][0]["backends"][0]["state"], "up");
    let (status, _) = call(running.admin, "POST", "/api/upstreams", Some(TOKEN)).await;
    assert_eq!(status, 405);
    // The refused drain request changed nothing.
    assert_eq!(http_get(running.admin, "/readyz").await.0, 200);
    let (_, metrics) = http_get(running.admin, "/metrics").await;
    assert!(
        metrics.contains(r#"wsgate_admin_actions_total{action="unauthorized"} 3"#),
        "{metrics}"
    );

    // No token configured: no API at all.
    let plain = format!(
        "{}admin:\n  address: 127.0.0.2:0\n",
        simple_config(&[backend.addr], "")
    );
    let running = start(&plain).await;
    let (status, body) = call(running.admin, "GET", "/api/upstreams", Some(TOKEN)).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("admin.token"), "{body}");
}

/// A key of the `room` query whose owner among `backends` is backend `owner`.
fn room_owned_by(yaml: &str, owner: usize) -> String {
    let config = wsgate::config::from_yaml_str(yaml, "t.yaml").unwrap();
    let backends = &config.upstreams[0].backends;
    (0..)
        .map(|n| format!("room-{n}"))
        .find(|key| wsgate::routing::rank(backends, key)[0] == owner)
        .unwrap()
}

async fn whoami(gateway: SocketAddr, room: &str) -> (String, Client) {
    let mut ws = connect(gateway, &format!("/?room={room}")).await;
    ws.send(Message::text("whoami")).await.unwrap();
    let name = next_message(&mut ws)
        .await
        .into_text()
        .unwrap()
        .as_str()
        .to_owned();
    (name, ws)
}

/// Draining a backend is an operator's decision: its rooms move even with
/// `on_health_change: false`, new connections avoid it, and putting it back brings them back.
#[tokio::test]
async fn a_drained_backend_loses_its_rooms_with_1012_until_put_back() {
    let (a, b) = (echo_backend("a").await, echo_backend("b").await);
    let yaml = config(
        &[a.addr, b.addr],
        "rebalance:\n  window: 200ms\n  on_health_change: false\n",
    );
    let room = room_owned_by(&yaml, 0);
    let running = start(&yaml).await;
    let (name, mut on_a) = whoami(running.gateway, &room).await;
    assert_eq!(name, "a");

    let drain = format!(
        "/api/backends/drain?upstream=app&backend=ws%3A%2F%2F{}",
        a.addr
    );
    let (status, body) = call(running.admin, "POST", &drain, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let close = close_frame(&mut on_a).await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1012, "{close:?}");
    let (name, mut on_b) = whoami(running.gateway, &room).await;
    assert_eq!(name, "b", "new connections avoid the drained backend");
    let (_, body) = call(running.admin, "GET", "/api/upstreams", Some(TOKEN)).await;
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["upstreams"][0]["backends"][0]["state"], "drained");
    assert_eq!(listed["upstreams"][0]["backends"][0]["drained"], true);

    let restore = format!("/api/backends/restore?upstream=app&backend=ws://{}", a.addr);
    let (status, body) = call(running.admin, "POST", &restore, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    // The room goes home: the connection on b moves back, and newcomers reach a.
    let close = close_frame(&mut on_b).await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1012);
    assert_eq!(whoami(running.gateway, &room).await.0, "a");

    let unknown = "/api/backends/drain?upstream=app&backend=ws://127.0.0.1:1";
    assert_eq!(
        call(running.admin, "POST", unknown, Some(TOKEN)).await.0,
        404
    );
    let (_, metrics) = http_get(running.admin, "/metrics").await;
    for action in ["drain", "restore", "bad_request"] {
        let line = format!(r#"wsgate_admin_actions_total{{action="{action}"}} 1"#);
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
}

#[tokio::test]
async fn the_api_starts_the_instance_drain() {
    let backend = echo_backend("a").await;
    let running = start(&config(
        &[backend.addr],
        "drain:\n  readiness_delay: 300ms\n  spread: 0s\n  deadline: 5s\n",
    ))
    .await;
    let (_, mut ws) = whoami(running.gateway, "r").await;
    assert_eq!(http_get(running.admin, "/readyz").await.0, 200);
    let started = Instant::now();
    let (status, body) = call(running.admin, "POST", "/api/drain", Some(TOKEN)).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(http_get(running.admin, "/readyz").await.0, 503);
    let close = close_frame(&mut ws).await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1001);
    assert!(started.elapsed() >= Duration::from_millis(300));
    drop(ws);
    tokio::time::timeout(Duration::from_secs(10), running.server)
        .await
        .expect("the server stops by itself")
        .unwrap();
}

fn cert_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("certs")
        .join(name)
}

#[tokio::test]
async fn the_admin_listener_serves_over_tls() {
    let backend = echo_backend("a").await;
    let yaml = format!(
        "{}admin:\n  address: 127.0.0.2:0\n  token: {TOKEN}\n  tls:\n    certificates:\n      - cert: {:?}\n        key: {:?}\n",
        simple_config(&[backend.addr], ""),
        cert_path("localhost.crt"),
        cert_path("localhost.key"),
    );
    let running = start(&yaml).await;
    // Plain HTTP gets no answer from a TLS listener.
    let mut plain = TcpStream::connect(running.admin).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));

    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cert_path("ca.crt")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = TcpStream::connect(running.admin).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let request = format!(
        "GET /api/upstreams HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut response)).await;
    let (status, body) = parse(&response);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"upstreams\""), "{body}");
}

/// A weight set by an operator moves the keys it changes the owner of (with 1012, like a
/// reload would), and new connections follow it.
#[tokio::test]
async fn a_weight_set_at_run_time_moves_the_keys_it_gives_another_owner() {
    let (a, b) = (echo_backend("a").await, echo_backend("b").await);
    let yaml = config(&[a.addr, b.addr], "rebalance:\n  window: 200ms\n");
    let parsed = wsgate::config::from_yaml_str(&yaml, "t.yaml").unwrap();
    let mut heavy_b = parsed.upstreams[0].backends.clone();
    heavy_b[1].weight = 1000;
    let room = (0..)
        .map(|n| format!("room-{n}"))
        .find(|key| {
            wsgate::routing::rank(&parsed.upstreams[0].backends, key)[0] == 0
                && wsgate::routing::rank(&heavy_b, key)[0] == 1
        })
        .unwrap();
    let running = start(&yaml).await;
    let (name, mut on_a) = whoami(running.gateway, &room).await;
    assert_eq!(name, "a");

    let weight = format!(
        "/api/backends/weight?upstream=app&backend=ws://{}&weight=1000",
        b.addr
    );
    let (status, body) = call(running.admin, "POST", &weight, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let close = close_frame(&mut on_a).await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1012);
    assert_eq!(whoami(running.gateway, &room).await.0, "b");
    let (_, body) = call(running.admin, "GET", "/api/upstreams", Some(TOKEN)).await;
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["upstreams"][0]["backends"][1]["weight"], 1000);

    let zero = format!(
        "/api/backends/weight?upstream=app&backend=ws://{}&weight=0",
        b.addr
    );
    assert_eq!(call(running.admin, "POST", &zero, Some(TOKEN)).await.0, 400);
}
