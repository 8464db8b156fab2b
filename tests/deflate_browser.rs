//! Chromium's native WebSocket through a `compression: terminate` route: the browser offers
//! permessage-deflate as browsers always do, the gateway answers it, and the backend (a
//! tokio-tungstenite echo without compression, which would fail on an RSV1 frame) sees plain
//! frames and no offer. Every message comes back as sent.
//!
//! Needs `chromium` and `chromedriver`: without them the test says SKIPPED loudly, except under
//! `CI=true`, where it fails.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use serde_json::Value;
use std::time::Duration;
use support::browser::Browser;
use support::{echo_backend, simple_config, start_gateway};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn chromium_negotiates_deflate_with_the_gateway_and_the_backend_sees_plain_frames() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let echo = echo_backend("plain").await;
    let gateway = start_gateway(&simple_config(&[echo.addr], "compression: terminate")).await;
    // A page on the gateway's own origin (it serves the session client library itself).
    browser
        .goto(&format!("http://{}/.wsgate/client.js", gateway.addr))
        .await;
    // Text with multi-byte characters, a large compressible text, a small one, binary.
    let script = format!(
        r#"(() => {{
            const prose = 'Größe: 10 €, naïve café, 寿司 and 🍣 — through a gateway. ';
            const sent = ['hello', prose.repeat(2000), '', JSON.stringify({{room: 'lobby', text: prose}})];
            const binary = new Uint8Array(70000).map((_, i) => i % 7);
            window.result = {{ done: false, echoes: [], extensions: null, error: null }};
            const ws = new WebSocket('ws://{addr}/');
            ws.binaryType = 'arraybuffer';
            ws.onopen = () => {{
                window.result.extensions = ws.extensions;
                for (const text of sent) ws.send(text);
                ws.send(binary);
            }};
            ws.onmessage = (event) => {{
                const echoes = window.result.echoes;
                if (typeof event.data === 'string') {{
                    echoes.push(event.data === sent[echoes.length]);
                }} else {{
                    const got = new Uint8Array(event.data);
                    echoes.push(got.length === binary.length && got.every((b, i) => b === binary[i]));
                }}
                if (echoes.length === sent.length + 1) {{
                    window.result.done = true;
                    ws.close(1000);
                }}
            }};
            ws.onerror = () => {{ window.result.error = 'error'; }};
            return true;
        }})()"#,
        addr = gateway.addr
    );
    browser.eval(&script).await;
    browser
        .wait_until("window.result.done || window.result.error", WAIT)
        .await;
    let result = browser.eval("window.result").await;
    assert_eq!(result["error"], Value::Null, "{result}");
    let extensions = result["extensions"].as_str().unwrap_or_default();
    assert!(
        extensions.starts_with("permessage-deflate"),
        "Chromium did not negotiate deflate with the gateway: {result}"
    );
    let echoes = result["echoes"].as_array().unwrap();
    assert_eq!(echoes.len(), 5, "{result}");
    assert!(echoes.iter().all(|ok| *ok == Value::Bool(true)), "{result}");
    let seen = echo.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("sec-websocket-extensions"), None, "{seen:?}");
    browser.close().await;
}
