//! The demo chat page in headless Chromium, through the gateway, on the session client
//! (`/.wsgate/client.js`): over WebSocket, over forced long-polling, over Server-Sent Events,
//! and across a forced drop and resume on each. A tokio-tungstenite client in the same room is
//! the other participant, so every exchange crosses two independent WebSocket implementations
//! and a real browser. Screenshots of each leg are kept in `target/test-artifacts/`.
//!
//! Needs `chromium` and `chromedriver`: without them the test says SKIPPED loudly, except under
//! `CI=true`, where it fails.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;
use support::browser::{Browser, artifact};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);

/// Two room services behind a gateway routed like the demo's config.
async fn demo() -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
    let (stop, _) = tokio::sync::watch::channel(false);
    let mut backends = Vec::new();
    for name in ["a", "b"] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        backends.push(listener.local_addr().unwrap());
        let mut stopped = stop.subscribe();
        tokio::spawn(wsgate::demo::room_service::serve(
            listener,
            name,
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        ));
    }
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  rooms:\n    backends:\n      - ws://{}\n      - ws://{}\nroutes:\n  - name: rooms\n    match: {{ path_prefix: /rooms/ }}\n    upstream: rooms\n    sticky:\n      path: \"/rooms/{{room}}\"\nsessions:\n  timeout: 30s\n",
        backends[0], backends[1]
    );
    let gateway = support::start_gateway(&yaml).await;
    let addr = gateway.addr;
    // The gateway stops when its handle drops; keep it for the whole test.
    std::mem::forget(gateway);
    (addr, stop)
}

/// The other participant: a plain WebSocket chat client (no session layer).
struct Peer {
    ws: support::Client,
}

impl Peer {
    async fn join(gateway: SocketAddr, room: &str) -> Peer {
        let ws = support::connect(gateway, &format!("/rooms/{room}?user=rusty")).await;
        Peer { ws }
    }

    async fn say(&mut self, room: &str, text: &str) {
        let event = json!({ "type": "message", "room": room, "text": text });
        self.ws
            .send(Message::text(event.to_string()))
            .await
            .unwrap();
    }

    /// Waits for a chat message with `text` from someone else.
    async fn hears(&mut self, text: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let message = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("the peer never heard {text:?}"))
                .unwrap()
                .unwrap();
            let Message::Text(body) = message else {
                continue;
            };
            let event: Value = serde_json::from_str(body.as_str()).unwrap();
            if event["type"] == "message" && event["text"] == text {
                return;
            }
        }
    }
}

/// How many chat lines on the page hold exactly `text` from `user`.
fn count_lines(user: &str, text: &str) -> String {
    format!(
        "[...document.querySelectorAll('#log li')].filter(li => li.children.length === 3 && li.children[1].textContent === {} && li.children[2].textContent === {}).length",
        json!(user),
        json!(text)
    )
}

async fn join_page(
    browser: &Browser,
    gateway: SocketAddr,
    room: &str,
    query: &str,
    transport: &str,
) {
    browser
        .goto(&format!("http://{gateway}/rooms/{room}{query}"))
        .await;
    browser
        .eval("(document.getElementById('user').value = 'browser', document.getElementById('connect').requestSubmit(), true)")
        .await;
    browser
        .wait_until(
            &format!("document.getElementById('transport').textContent === 'via {transport}' && document.getElementById('log').innerText.includes('You joined')"),
            WAIT,
        )
        .await;
}

async fn page_says(browser: &Browser, text: &str) {
    browser
        .eval(&format!(
            "(document.getElementById('text').value = {}, document.getElementById('compose').requestSubmit(), true)",
            json!(text)
        ))
        .await;
}

async fn exchange_and_resume(browser: &Browser, gateway: SocketAddr, room: &str, transport: &str) {
    let mut peer = Peer::join(gateway, room).await;
    // Page → peer and peer → page.
    page_says(browser, &format!("hello over {transport}")).await;
    peer.hears(&format!("hello over {transport}")).await;
    peer.say(room, &format!("welcome, {transport} user")).await;
    browser
        .wait_until(
            &format!(
                "{} === 1",
                count_lines("rusty", &format!("welcome, {transport} user"))
            ),
            WAIT,
        )
        .await;

    // A forced drop: the page's connection goes away for 1.5 s, and the session resumes on a
    // new one. What the peer says meanwhile arrives after the resume, exactly once, in order.
    browser.eval("(socket.reconnect(1500), true)").await;
    browser
        .wait_until(
            "document.getElementById('transport').textContent === 'reconnecting…'",
            WAIT,
        )
        .await;
    for i in 0..5 {
        peer.say(room, &format!("{transport} while away {i}")).await;
    }
    for i in 0..5 {
        browser
            .wait_until(
                &format!(
                    "{} === 1",
                    count_lines("rusty", &format!("{transport} while away {i}"))
                ),
                WAIT,
            )
            .await;
    }
    let order = browser
        .eval(&format!(
            "[...document.querySelectorAll('#log li')].map(li => li.innerText).filter(t => t.includes('{transport} while away')).map(t => t.slice(-1)).join('')"
        ))
        .await;
    assert_eq!(order, json!("01234"), "in order, once each");
    browser
        .wait_until(
            &format!("document.getElementById('transport').textContent === 'via {transport}'"),
            WAIT,
        )
        .await;
    page_says(browser, &format!("back on {transport}")).await;
    peer.hears(&format!("back on {transport}")).await;
    // Nothing was duplicated by the resume.
    let dupes = browser
        .eval(&count_lines("rusty", &format!("welcome, {transport} user")))
        .await;
    assert_eq!(dupes, json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_talks_over_websocket_long_polling_and_event_streams_and_resumes_after_a_drop()
 {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let (gateway, stop) = demo().await;

    join_page(&browser, gateway, "ws-room", "", "websocket").await;
    exchange_and_resume(&browser, gateway, "ws-room", "websocket").await;
    browser.screenshot(&artifact("session-websocket.png")).await;

    join_page(
        &browser,
        gateway,
        "poll-room",
        "?transport=polling",
        "polling",
    )
    .await;
    exchange_and_resume(&browser, gateway, "poll-room", "polling").await;
    browser.screenshot(&artifact("session-polling.png")).await;

    join_page(&browser, gateway, "sse-room", "?transport=sse", "sse").await;
    exchange_and_resume(&browser, gateway, "sse-room", "sse").await;
    browser.screenshot(&artifact("session-sse.png")).await;

    browser.close().await;
    let _ = stop.send(true);
}

/// A network that blocks WebSockets (a proxy stripping `Upgrade`): every WebSocket fails before
/// it opens. The client, on its default `auto` transport, falls back to long-polling by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_falls_back_to_long_polling_when_websockets_are_blocked() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let (gateway, stop) = demo().await;
    browser
        .goto(&format!("http://{gateway}/rooms/blocked"))
        .await;
    browser
        .eval(
            "(window.WebSocket = class { constructor() { setTimeout(() => this.onclose && \
             this.onclose({ code: 1006, reason: '', wasClean: false }), 20); } close() {} }, true)",
        )
        .await;
    browser
        .eval("(document.getElementById('user').value = 'browser', document.getElementById('connect').requestSubmit(), true)")
        .await;
    browser
        .wait_until(
            "document.getElementById('transport').textContent === 'via polling' && document.getElementById('log').innerText.includes('You joined')",
            WAIT,
        )
        .await;
    let mut peer = Peer::join(gateway, "blocked").await;
    page_says(&browser, "through the fallback").await;
    peer.hears("through the fallback").await;
    browser.close().await;
    let _ = stop.send(true);
}
