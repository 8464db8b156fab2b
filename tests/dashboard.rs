//! The admin listener's live dashboard: the page in headless Chromium while traffic flows (a
//! screenshot is kept in `target/test-artifacts/dashboard.png`), and the snapshot stream read
//! by tokio-tungstenite: its rate (at most one per second) and its fields.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::browser::{Browser, artifact};
use support::*;
use tokio_tungstenite::tungstenite::Message;
use wsgate::server::Server;

struct Running {
    gateway: SocketAddr,
    admin: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// A gateway with an admin listener on 127.0.0.2 (so both can use port 0) in front of
/// `backends`.
async fn start(backends: &[SocketAddr]) -> Running {
    let yaml = format!(
        "{}admin:\n  address: 127.0.0.2:0\n",
        simple_config(backends, "")
    );
    let config = wsgate::config::from_yaml_str(&yaml, "test.yaml").unwrap();
    let server = Server::bind(config).await.unwrap();
    let gateway = server.local_addrs()[0];
    let admin = server.admin_addr().expect("admin bound");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Running {
        gateway,
        admin,
        _stop: stop,
    }
}

/// `clients` connections, each sending a numbered message every 50 ms and reading its echo,
/// until `stop` turns true.
fn traffic(gateway: SocketAddr, clients: usize, stop: Arc<AtomicBool>) {
    for n in 0..clients {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut ws = connect(gateway, &format!("/client/{n}")).await;
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                ws.send(Message::text(format!("{n}:{seq}"))).await.unwrap();
                assert_eq!(
                    next_message(&mut ws).await,
                    Message::text(format!("{n}:{seq}"))
                );
                seq += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = ws.close(None).await;
        });
    }
}

/// A bad handshake, so the recent-errors list has an entry.
async fn provoke_handshake_error(gateway: SocketAddr) {
    let bad_key = upgrade_request("/chat", "").replace("dGhlIHNhbXBsZSBub25jZQ==", "short");
    let response = raw_exchange(gateway, bad_key.as_bytes()).await;
    assert!(response.starts_with(b"HTTP/1.1 400"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_chromium_shows_live_traffic_health_and_errors() {
    let (a, b) = (echo_backend("a").await, echo_backend("b").await);
    let running = start(&[a.addr, b.addr]).await;
    let stop = Arc::new(AtomicBool::new(false));
    traffic(running.gateway, 4, Arc::clone(&stop));
    provoke_handshake_error(running.gateway).await;

    let Some(browser) = Browser::start().await else {
        return;
    };
    browser
        .goto(&format!("http://{}/dashboard", running.admin))
        .await;
    // Live numbers, as rendered: four connections on the route, messages both ways, both
    // backends up, and the refused handshake in the error list.
    let ready = r#"
        document.querySelector('tr[data-route="app"]:not(.sub) .active')?.textContent === "4"
        && Number(document.querySelector('tr[data-route="app"]:not(.sub) .msgs-in')?.textContent) > 0
        && Number(document.querySelector('tr[data-route="app"]:not(.sub) .msgs-out')?.textContent) > 0
        && document.querySelectorAll('#backends .health.up').length === 2
        && [...document.querySelectorAll('#routes tr.sub[data-route="app"] .msgs-in')].every(c => Number(c.textContent) > 0)
        && document.querySelector('#errors li[data-kind="handshake"]') !== null
    "#;
    browser.wait_until(ready, Duration::from_secs(30)).await;
    let path = artifact("dashboard.png");
    browser.screenshot(&path).await;
    let png = std::fs::read(&path).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");

    assert_eq!(
        browser
            .eval("document.getElementById('status').textContent")
            .await,
        "live"
    );
    let backend_rows = browser
        .eval(r#"[...document.querySelectorAll('#backends tr[data-backend]')].map(r => r.dataset.backend)"#)
        .await;
    let expected: Vec<Value> = [a.addr, b.addr]
        .iter()
        .map(|addr| Value::from(format!("ws://{addr}")))
        .collect();
    assert_eq!(backend_rows, Value::from(expected));
    // Per backend, the route's connections add up to the route's total.
    let per_backend = browser
        .eval(r#"[...document.querySelectorAll('#routes tr.sub[data-route="app"] .active')].reduce((sum, c) => sum + Number(c.textContent), 0)"#)
        .await;
    assert_eq!(per_backend, 4);
    let error_text = browser
        .eval(r#"document.querySelector('#errors li[data-kind="handshake"]').textContent"#)
        .await;
    assert!(error_text.as_str().unwrap().contains("400"), "{error_text}");
    // The page counted its own snapshots; at most one per second since it opened.
    let count = browser.eval("window.snapshotCount").await;
    assert!(count.as_u64().unwrap() >= 1, "{count}");
    stop.store(true, Ordering::Relaxed);
    browser.close().await;
}

#[tokio::test]
async fn snapshots_arrive_at_most_once_per_second_with_the_documented_fields() {
    let backend = echo_backend("a").await;
    let running = start(&[backend.addr]).await;
    let stop = Arc::new(AtomicBool::new(false));
    traffic(running.gateway, 2, Arc::clone(&stop));
    provoke_handshake_error(running.gateway).await;

    let (status, page) = http_get(running.admin, "/dashboard").await;
    assert_eq!(status, 200);
    assert!(page.contains("/dashboard/ws"), "the page opens the feed");
    // Self-contained: no script, style or font from elsewhere.
    for external in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(!page.contains(external), "page refers to {external}");
    }

    let url = format!("ws://{}/dashboard/ws", running.admin);
    let (mut feed, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    // Count what arrives over a fixed window, after the first snapshot.
    let first = tokio::time::timeout(Duration::from_secs(10), feed.next())
        .await
        .expect("a first snapshot within 10 s")
        .unwrap()
        .unwrap();
    let window = Duration::from_secs(5);
    let started = tokio::time::Instant::now();
    let mut snapshots = vec![first];
    while let Ok(Some(message)) = tokio::time::timeout_at(started + window, feed.next()).await {
        snapshots.push(message.unwrap());
    }
    // One per second: 5 in 5 s after the first. Allow one extra for a tick landing on the
    // window's edge, and far fewer on a loaded machine, but never a flood.
    let after_first = snapshots.len() - 1;
    assert!(
        (2..=6).contains(&after_first),
        "{after_first} snapshots in {window:?}"
    );

    let last: Value = serde_json::from_str(snapshots.last().unwrap().to_text().unwrap()).unwrap();
    for key in [
        "at_ms",
        "interval_s",
        "draining",
        "routes",
        "upstreams",
        "errors",
        "errors_total",
    ] {
        assert!(last.get(key).is_some(), "no {key} in {last}");
    }
    let route = &last["routes"][0];
    assert_eq!(route["name"], "app");
    assert_eq!(route["active"], 2);
    assert!(
        route["messages_per_s"]["client_to_backend"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(
        route["messages_per_s"]["backend_to_client"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(route["bytes_per_s"]["client_to_backend"].as_f64().unwrap() > 0.0);
    assert!(route["opened_per_s"].is_number());
    assert_eq!(
        route["backends"][0]["backend"],
        format!("ws://{}", backend.addr)
    );
    let per_backend = &route["backends"][0];
    assert_eq!(per_backend["active"], 2);
    assert!(
        per_backend["messages_per_s"]["client_to_backend"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(
        per_backend["bytes_per_s"]["backend_to_client"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let backend_stats = &last["upstreams"][0]["backends"][0];
    assert_eq!(backend_stats["healthy"], true);
    assert_eq!(backend_stats["state"], "up");
    assert_eq!(backend_stats["active"], 2);
    assert!(backend_stats["messages_per_s"].as_f64().unwrap() > 0.0);
    let error = &last["errors"][0];
    assert_eq!(error["kind"], "handshake");
    assert!(error["at_ms"].as_u64().unwrap() > 0);
    assert!(error["detail"].as_str().unwrap().contains("400"), "{error}");

    // A close from the page is answered, as RFC 6455 asks.
    feed.close(None).await.unwrap();
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_secs(10), feed.next()).await
    {
        if message.is_close() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
}
