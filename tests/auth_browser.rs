//! The session client (`/.wsgate/client.js`) in headless Chromium on a route with `auth.jwt`:
//! it opens its session with a token (from a function, as an application refreshing tokens
//! would give it), over a session WebSocket and over long-polling, and is closed when the
//! token expires. The backend is a tokio-tungstenite echo server.
//!
//! Needs `chromium` and `chromedriver`: without them the test says SKIPPED loudly, except under
//! `CI=true`, where it fails.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::browser::{Browser, artifact};
use support::{echo_backend, start_gateway};

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");
const WAIT: Duration = Duration::from_secs(20);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(sub: &str, exp: u64) -> String {
    let key = EncodingKey::from_ed_pem(include_bytes!("keys/ed_private.pem")).unwrap();
    let claims = json!({"sub": sub, "exp": exp});
    jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key).unwrap()
}

#[tokio::test]
async fn a_browser_session_opens_with_its_token_and_closes_when_the_token_expires() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let echo = echo_backend("b1").await;
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends:\n      - ws://{}\nroutes:\n  - name: secure\n    match: {{path_prefix: /secure/}}\n    upstream: app\n    auth:\n      jwt:\n        from: [bearer, {{query: access_token}}]\n        keys:\n          - pem: {KEYS}/ed_public.pem\n            algorithms: [EdDSA]\n        leeway: 0\n        headers: {{X-User-Id: sub}}\n",
        echo.addr
    );
    let gateway = start_gateway(&yaml).await;
    let addr = gateway.addr;
    for (transport, user) in [("websocket", "ada"), ("polling", "grace")] {
        // The client library's own URL is a page on the gateway's origin that has the code.
        browser
            .goto(&format!("http://{addr}/.wsgate/client.js"))
            .await;
        browser
            .eval("((0, eval)(document.body.innerText), typeof WsgateSocket === 'function')")
            .await;
        let exp = now() + 4;
        let script = format!(
            "(window.log = [], window.socket = new WsgateSocket('ws://{addr}/secure/room', [], {{ transport: {transport}, token: () => Promise.resolve({token}) }}), socket.onopen = () => socket.send('hello'), socket.onmessage = (e) => log.push('message:' + e.data), socket.onclose = (e) => log.push('close:' + e.code + ':' + e.reason), true)",
            transport = json!(transport),
            token = json!(token(user, exp)),
        );
        browser.eval(&script).await;
        browser
            .wait_until("log.includes('message:hello')", WAIT)
            .await;
        browser
            .screenshot(&artifact(&format!("auth-session-{transport}.png")))
            .await;
        browser
            .wait_until("log.some((l) => l.startsWith('close:'))", WAIT)
            .await;
        let closed_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let log = browser.eval("log").await;
        assert_eq!(
            log.as_array().and_then(|l| l.last()),
            Some(&Value::from("close:1008:token expired")),
            "{transport}: {log}"
        );
        assert!(
            closed_at >= Duration::from_secs(exp),
            "{transport}: closed before exp"
        );
        let seen = echo.seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(seen.header("x-user-id"), Some(user), "{transport}");
        assert_eq!(
            seen.path, "/secure/room",
            "{transport}: no token in the backend's URL"
        );
    }

    // Without a token the session is refused and the client gives up.
    browser
        .eval(&format!(
            "(window.log = [], window.socket = new WsgateSocket('ws://{addr}/secure/room', [], {{ transport: 'polling' }}), socket.onclose = (e) => log.push('close:' + e.code + ':' + e.reason), true)"
        ))
        .await;
    browser
        .wait_until("log.some((l) => l.startsWith('close:'))", WAIT)
        .await;
    let log = browser.eval("log").await;
    assert!(
        log.to_string().contains("close:1006"),
        "refused without a token: {log}"
    );
    browser.close().await;
}
