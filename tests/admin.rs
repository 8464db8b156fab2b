//! The admin listener: Prometheus metrics after real traffic, health and readiness.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use futures_util::SinkExt;
use std::net::SocketAddr;
use std::time::Duration;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use wsgate::server::Server;

/// Polls `/metrics` until `line` appears (connection ends are counted when the relay finishes).
async fn wait_for_metric(admin: SocketAddr, line: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_get(admin, "/metrics").await;
        assert_eq!(status, 200);
        if body.contains(line) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "missing {line:?} in:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_count_connections_messages_closes_and_handshake_failures() {
    let backend = echo_backend("b1").await;
    // The admin listener on another loopback address, so both can use port 0.
    let yaml = format!(
        "{}admin:\n  address: 127.0.0.2:0\n",
        simple_config(&[backend.addr], "")
    );
    let config = wsgate::config::from_yaml_str(&yaml, "test.yaml").unwrap();
    let server = Server::bind(config).await.unwrap();
    let gateway = server.local_addrs()[0];
    let admin = server.admin_addr().expect("admin bound");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));

    assert_eq!(http_get(admin, "/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(
        http_get(admin, "/readyz").await,
        (200, "ready\n".to_owned())
    );

    let mut ws = connect(gateway, "/chat").await;
    for text in ["one", "two", "three"] {
        ws.send(Message::text(text)).await.unwrap();
        assert_eq!(next_message(&mut ws).await, Message::text(text));
    }
    let url = format!("ws://{}", backend.addr);
    wait_for_metric(
        admin,
        &format!(r#"wsgate_connections_active{{route="app",backend="{url}"}} 1"#),
    )
    .await;
    ws.close(None).await.unwrap();
    let _ = close_frame(&mut ws).await;

    let body = wait_for_metric(
        admin,
        &format!(r#"wsgate_connections_active{{route="app",backend="{url}"}} 0"#),
    )
    .await;
    for line in [
        format!(r#"wsgate_connections_opened_total{{route="app",backend="{url}"}} 1"#),
        r#"wsgate_messages_total{route="app",direction="client_to_backend"} 3"#.to_owned(),
        r#"wsgate_messages_total{route="app",direction="backend_to_client"} 3"#.to_owned(),
        r#"wsgate_payload_bytes_total{route="app",direction="client_to_backend"} 11"#.to_owned(),
        format!(r#"wsgate_backend_healthy{{upstream="app",backend="{url}"}} 1"#),
    ] {
        assert!(body.contains(&line), "missing {line:?} in:\n{body}");
    }
    // The client closed with an empty close frame; the backend's echo went back to it.
    assert!(
        body.contains(&format!(
            r#"wsgate_connections_closed_total{{route="app",backend="{url}",side="backend",code="1005",initiator="client",cause="close_handshake"}} 1"#
        )),
        "{body}"
    );

    let bad_key = upgrade_request("/chat", "").replace("dGhlIHNhbXBsZSBub25jZQ==", "short");
    let response = raw_exchange(gateway, bad_key.as_bytes()).await;
    assert!(response.starts_with(b"HTTP/1.1 400"));
    wait_for_metric(admin, r#"wsgate_handshake_failures_total{reason="key"} 1"#).await;

    assert_eq!(http_get(admin, "/nope").await.0, 404);
    drop(stop);
}

/// Observed: the access log and the dashboard said `cause=close handshake` for protocol
/// violations and TCP drops. The ending is typed now: a violation, a vanished client and a
/// closing handshake are told apart in the metrics.
#[tokio::test]
async fn closed_connections_are_labelled_with_their_real_cause() {
    use tokio::io::AsyncWriteExt;
    let backend = echo_backend("b1").await;
    let yaml = format!(
        "{}admin:\n  address: 127.0.0.2:0\n",
        simple_config(&[backend.addr], "")
    );
    let config = wsgate::config::from_yaml_str(&yaml, "test.yaml").unwrap();
    let server = Server::bind(config).await.unwrap();
    let gateway = server.local_addrs()[0];
    let admin = server.admin_addr().expect("admin bound");
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let url = format!("ws://{}", backend.addr);

    // An unmasked frame: a protocol violation, 1002 to the client.
    let mut raw = tokio::net::TcpStream::connect(gateway).await.unwrap();
    raw.write_all(upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    raw.write_all(&[0x81, 0x01, b'x']).await.unwrap();
    wait_for_metric(
        admin,
        &format!(r#"wsgate_connections_closed_total{{route="app",backend="{url}",side="client",code="1002",initiator="gateway",cause="protocol_error"}} 1"#),
    )
    .await;
    drop(raw);

    // A client that drops TCP without a close frame.
    let ws = connect(gateway, "/").await;
    drop(ws);
    wait_for_metric(
        admin,
        &format!(r#"wsgate_connections_closed_total{{route="app",backend="{url}",side="backend",code="1001",initiator="client",cause="disconnected"}} 1"#),
    )
    .await;
}
