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

/// A reload that removes a backend removes its `wsgate_backend_healthy` series too: an alert
/// on it clears instead of holding the last value forever.
#[tokio::test]
async fn a_backend_removed_by_a_reload_leaves_the_metrics() {
    let (a, b) = (echo_backend("a").await, echo_backend("b").await);
    let yaml = |backends: &[std::net::SocketAddr]| {
        format!(
            "{}admin:\n  address: 127.0.0.2:0\n",
            simple_config(backends, "")
        )
    };
    let config = wsgate::config::from_yaml_str(&yaml(&[a.addr, b.addr]), "t.yaml").unwrap();
    let server = Server::bind(config).await.unwrap();
    let admin = server.admin_addr().unwrap();
    let reloader = server.reloader();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let series =
        |addr| format!(r#"wsgate_backend_healthy{{upstream="app",backend="ws://{addr}"}} 1"#);
    let body = wait_for_metric(admin, &series(b.addr)).await;
    assert!(body.contains(&series(a.addr)), "{body}");

    let config = wsgate::config::from_yaml_str(&yaml(&[a.addr]), "t.yaml").unwrap();
    reloader.reload(config).unwrap();
    let (_, body) = http_get(admin, "/metrics").await;
    assert!(body.contains(&series(a.addr)), "{body}");
    let removed = format!(
        r#"wsgate_backend_healthy{{upstream="app",backend="ws://{}"}}"#,
        b.addr
    );
    assert!(!body.contains(&removed), "{body}");
}

/// A slowloris, a header flood and a broken upgrade are refused by the gateway itself: each is
/// counted per listener, status and reason, and shows among the recent errors.
#[tokio::test]
async fn refusals_are_counted_per_listener_and_kept_as_recent_errors() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = echo_backend("a").await;
    let yaml = format!(
        "listeners:\n  - name: public\n    address: 127.0.0.1:0\nupstreams:\n  app:\n    backends: [ws://{}]\n\
         routes:\n  - upstream: app\nadmin:\n  address: 127.0.0.2:0\ntimeouts:\n  handshake: 300ms\n",
        backend.addr
    );
    let config = wsgate::config::from_yaml_str(&yaml, "t.yaml").unwrap();
    let server = Server::bind(config).await.unwrap();
    let gateway = server.local_addrs()[0];
    let admin = server.admin_addr().unwrap();
    let errors = std::sync::Arc::clone(&server.gateway().errors);
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));

    // A slowloris: half a head, then silence.
    let mut slow = tokio::net::TcpStream::connect(gateway).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // A header flood.
    let flood = format!(
        "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
        "X-Junk: 1\r\n".repeat(200)
    );
    assert!(
        raw_exchange(gateway, flood.as_bytes())
            .await
            .starts_with(b"HTTP/1.1 431")
    );
    // An upgrade with a broken key.
    let bad_key = upgrade_request("/", "").replace("dGhlIHNhbXBsZSBub25jZQ==", "short");
    assert!(
        raw_exchange(gateway, bad_key.as_bytes())
            .await
            .starts_with(b"HTTP/1.1 400")
    );

    // A slowloris on the second request of a keep-alive connection, which hyper reads.
    let mut keep_alive = tokio::net::TcpStream::connect(gateway).await.unwrap();
    keep_alive
        .write_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), keep_alive.read_to_end(&mut answer)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 "),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    for line in [
        r#"wsgate_refused_total{listener="public",status="408",reason="head_timeout"} 2"#,
        r#"wsgate_refused_total{listener="public",status="431",reason="too_many_headers"} 1"#,
        r#"wsgate_refused_total{listener="public",status="400",reason="key"} 1"#,
    ] {
        wait_for_metric(admin, line).await;
    }
    let recent: Vec<String> = errors
        .newest_first()
        .into_iter()
        .map(|e| e.detail)
        .collect();
    assert!(
        recent
            .iter()
            .any(|d| d.contains("on public: 408 request head not received in time")),
        "{recent:?}"
    );
    assert!(
        recent.iter().any(|d| d.contains("on public: 431")),
        "{recent:?}"
    );
}

/// What an operator alerts on beyond counters: latency and lifetime histograms, and which
/// configuration is in force since when.
#[tokio::test]
async fn histograms_and_the_configuration_generation() {
    let backend = echo_backend("b1").await;
    let yaml = format!(
        "{}admin:\n  address: 127.0.0.2:0\n",
        simple_config(&[backend.addr], "")
    );
    let config = wsgate::config::from_yaml_str(&yaml, "test.yaml").unwrap();
    let server = Server::bind(config).await.unwrap();
    let gateway = server.local_addrs()[0];
    let admin = server.admin_addr().unwrap();
    let reloader = server.reloader();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let (_, body) = http_get(admin, "/metrics").await;
    assert!(body.contains("wsgate_config_generation 1\n"), "{body}");
    let applied = |body: &str| -> i64 {
        body.lines()
            .find_map(|l| l.strip_prefix("wsgate_config_applied_timestamp_seconds "))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(applied(&body) > 1_700_000_000, "{body}");

    let mut ws = connect(gateway, "/chat").await;
    ws.send(Message::text("one")).await.unwrap();
    next_message(&mut ws).await;
    ws.close(None).await.unwrap();
    let _ = close_frame(&mut ws).await;
    // A session request: a poll of a session that does not exist (410), timed all the same.
    let (status, _) = http_get(gateway, "/chat?wsgate=poll&wsgate_sid=gw~nope&wsgate_ack=0").await;
    assert_eq!(status, 410);
    for line in [
        r#"wsgate_handshake_seconds_count{route="app"} 1"#,
        r#"wsgate_backend_connect_seconds_count{upstream="app"} 1"#,
        r#"wsgate_connection_duration_seconds_count{route="app"} 1"#,
        r#"wsgate_session_request_seconds_count{op="poll"} 1"#,
    ] {
        wait_for_metric(admin, line).await;
    }
    reloader
        .reload(wsgate::config::from_yaml_str(&yaml, "test.yaml").unwrap())
        .unwrap();
    wait_for_metric(admin, "wsgate_config_generation 2\n").await;
}
