//! Authentication at the edge, end to end on 127.0.0.1: tokens signed here with the test keys
//! of tests/keys/, tokio-tungstenite clients and backends, and raw sockets for refusals.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/http_backend.rs"]
mod http_backend;
#[path = "support/peers.rs"]
mod peers;
mod support;

use futures_util::SinkExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::*;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token signed with the test Ed25519 key.
fn token(claims: Value) -> String {
    let key = EncodingKey::from_ed_pem(include_bytes!("keys/ed_private.pem")).unwrap();
    jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key).unwrap()
}

fn alice() -> String {
    token(json!({"sub": "alice", "role": "member", "exp": now() + 600}))
}

/// Route keys for `auth.jwt` with the Ed25519 public key, plus `extra` lines under `jwt:`.
fn auth(extra: &str) -> String {
    let mut yaml = format!(
        "auth:\n  jwt:\n    keys:\n      - pem: {KEYS}/ed_public.pem\n        algorithms: [EdDSA]\n"
    );
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml
}

/// A TCP listener that counts the connections made to it and never answers.
async fn counting_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&count);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    (addr, count)
}

/// The status line and head of the gateway's answer to an upgrade with `extra_headers`.
async fn answer(gateway: SocketAddr, path: &str, extra_headers: &str) -> (u16, String) {
    let response = raw_exchange(gateway, upgrade_request(path, extra_headers).as_bytes()).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// A client through the gateway with `headers` on its upgrade request.
async fn connect_with(
    gateway: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Client, tungstenite::handshake::client::Response), tungstenite::Error> {
    let mut request = format!("ws://{gateway}{path}")
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        request.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    tokio_tungstenite::connect_async(request).await
}

#[tokio::test]
async fn refusals_are_401_or_403_and_no_backend_is_contacted() {
    let (backend, connections) = counting_backend().await;
    let gateway = start_gateway(&simple_config(
        &[backend],
        &auth("require: [role]\nleeway: 0"),
    ))
    .await;

    let (_, head) = answer(gateway.addr, "/", "").await;
    assert!(head.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{head}");
    assert!(head.contains("WWW-Authenticate: Bearer\r\n"), "{head}");

    let expired = token(json!({"sub": "alice", "role": "x", "exp": now() - 1}));
    let (status, head) = answer(
        gateway.addr,
        "/",
        &format!("Authorization: Bearer {expired}\r\n"),
    )
    .await;
    assert_eq!(status, 401, "{head}");
    assert!(
        head.contains(
            "WWW-Authenticate: Bearer error=\"invalid_token\", error_description=\"the token has expired\""
        ),
        "{head}"
    );
    assert!(
        !head.contains(&expired),
        "the token is never echoed: {head}"
    );

    // Alice's signature on a payload that names someone else.
    let forged = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts: Vec<String> = alice().split('.').map(str::to_owned).collect();
        parts[1] =
            b64.encode(json!({"sub": "mallory", "role": "x", "exp": now() + 60}).to_string());
        parts.join(".")
    };
    let (status, head) = answer(
        gateway.addr,
        "/",
        &format!("Authorization: Bearer {forged}\r\n"),
    )
    .await;
    assert_eq!(status, 401, "{head}");
    assert!(head.contains("signature is invalid"), "{head}");

    let no_role = token(json!({"sub": "alice", "exp": now() + 60}));
    let (status, head) = answer(
        gateway.addr,
        "/",
        &format!("Authorization: Bearer {no_role}\r\n"),
    )
    .await;
    assert_eq!(status, 403, "{head}");
    assert!(head.contains("error=\"insufficient_scope\""), "{head}");

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "no backend connection"
    );
}

#[tokio::test]
async fn the_backend_gets_the_identity_and_never_the_token_in_the_url_or_a_spoofed_header() {
    let echo = echo_backend("b1").await;
    let config = simple_config(
        &[echo.addr],
        &auth(
            "from: [bearer, {query: access_token}]\nheaders: {X-User-Id: sub, X-User-Role: role}",
        ),
    );
    let gateway = start_gateway(&config).await;
    let path = format!("/rooms/1?x=1&access_token={}&y=2", alice());
    let (mut ws, _) = connect_with(
        gateway.addr,
        &path,
        &[("X-User-Id", "mallory"), ("x-user-role", "admin")],
    )
    .await
    .unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("hi"));
    let seen = echo.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.path, "/rooms/1?x=1&y=2");
    let values = |name: &str| -> Vec<&str> {
        seen.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(values("x-user-id"), ["alice"]);
    assert_eq!(values("x-user-role"), ["member"]);
}

#[tokio::test]
async fn a_token_in_the_subprotocol_offer_is_taken_out_of_it() {
    let echo = echo_backend_with("b1", Some("chat")).await;
    let config = simple_config(&[echo.addr], &auth("from: [{subprotocol: bearer.}]"));
    let gateway = start_gateway(&config).await;
    let offer = format!("chat, bearer.{}", alice());
    let (_ws, response) = connect_with(gateway.addr, "/", &[("Sec-WebSocket-Protocol", &offer)])
        .await
        .unwrap();
    let chosen = response.headers().get("sec-websocket-protocol").unwrap();
    assert_eq!(chosen, "chat");
    let seen = echo.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.header("sec-websocket-protocol"), Some("chat"));
    assert!(
        !seen.headers.iter().any(|(_, v)| v.contains("bearer.")),
        "{seen:?}"
    );
    // Without the token in the offer the same request is refused.
    let refused = connect_with(gateway.addr, "/", &[("Sec-WebSocket-Protocol", "chat")]).await;
    match refused {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("expected a 401, got {other:?}"),
    }
}

#[tokio::test]
async fn the_connection_is_closed_when_the_token_expires() {
    let mut backend = peers::recording_backend(peers::Script::Echo).await;
    let config = simple_config(
        &[backend.addr],
        &auth("leeway: 0\nexpired_close_code: 4401"),
    );
    let gateway = start_gateway(&config).await;
    let exp = now() + 2;
    let short = token(json!({"sub": "alice", "exp": exp}));
    let bearer = format!("Bearer {short}");
    let (mut ws, _) = connect_with(gateway.addr, "/", &[("Authorization", &bearer)])
        .await
        .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("before"));
    let started = Instant::now();
    let frame = close_frame(&mut ws).await.expect("a close frame");
    let unix_at_close = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    assert_eq!(u16::from(frame.code), 4401);
    assert_eq!(frame.reason.as_str(), "token expired");
    // Closed at exp: not before it, and not long after.
    assert!(
        unix_at_close >= Duration::from_secs(exp),
        "{unix_at_close:?} < {exp}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let (code, _) = backend.close_received().await.unwrap();
    assert_eq!(code, 1001);
}

#[tokio::test]
async fn a_token_refreshed_in_band_keeps_the_connection_and_never_reaches_the_backend() {
    let mut backend = peers::recording_backend(peers::Script::Echo).await;
    let config = simple_config(
        &[backend.addr],
        &auth("leeway: 0\nrefresh: true\nexpired_close_code: 4401"),
    );
    let gateway = start_gateway(&config).await;
    let exp = now() + 2;
    let bearer = format!("Bearer {}", token(json!({"sub": "alice", "exp": exp})));
    let (mut ws, _) = connect_with(gateway.addr, "/", &[("Authorization", &bearer)])
        .await
        .unwrap();
    let refresh =
        |token: String| Message::text(format!(r#"{{"wsgate":"refresh","token":"{token}"}}"#));
    let later = token(json!({"sub": "alice", "exp": now() + 600}));
    ws.send(refresh(later)).await.unwrap();
    ws.send(Message::text("after the refresh")).await.unwrap();
    // The echo backend would have sent the refresh back first had it seen it.
    assert_eq!(
        next_message(&mut ws).await,
        Message::text("after the refresh")
    );

    // Past the first token's expiry, the connection still relays.
    while now() <= exp {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("still here"));

    // Another subject's valid token is refused: 1008 to the client, 1001 to the backend.
    let bob = token(json!({"sub": "bob", "exp": now() + 600}));
    ws.send(refresh(bob)).await.unwrap();
    let frame = close_frame(&mut ws).await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1008);
    assert_eq!(frame.reason.as_str(), "token refresh refused");
    let (messages, _) = backend.messages_until_end().await;
    let texts: Vec<&str> = messages
        .iter()
        .filter(|m| m.is_text())
        .filter_map(|m| m.to_text().ok())
        .collect();
    assert_eq!(
        texts,
        ["after the refresh", "still here"],
        "no refresh seen"
    );
    assert!(
        matches!(messages.last(), Some(Message::Close(Some(f))) if u16::from(f.code) == 1001),
        "{messages:?}"
    );
}

#[tokio::test]
async fn a_subject_holds_at_most_its_connections() {
    let echo = echo_backend("b1").await;
    let config = simple_config(&[echo.addr], &auth("max_connections_per_subject: 1"));
    let gateway = start_gateway(&config).await;
    let bearer = format!("Bearer {}", alice());
    let (mut first, _) = connect_with(gateway.addr, "/", &[("Authorization", &bearer)])
        .await
        .unwrap();
    let (status, head) = answer(gateway.addr, "/", &format!("Authorization: {bearer}\r\n")).await;
    assert_eq!(status, 429, "{head}");
    let bob = token(json!({"sub": "bob", "exp": now() + 60}));
    let bob = format!("Bearer {bob}");
    assert!(
        connect_with(gateway.addr, "/", &[("Authorization", &bob)])
            .await
            .is_ok(),
        "another subject is not held back"
    );
    first.close(None).await.unwrap();
    let _ = close_frame(&mut first).await;
    // The slot is given back when the relay ends, shortly after the close handshake.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if connect_with(gateway.addr, "/", &[("Authorization", &bearer)])
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn one_subjects_connections_meet_on_one_backend() {
    let backends = [
        echo_backend("b1").await,
        echo_backend("b2").await,
        echo_backend("b3").await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let config = simple_config(
        &addrs,
        &format!(
            "sticky: {{claim: sub}}\n{}",
            auth("headers: {X-User-Id: sub}")
        ),
    );
    let gateway = start_gateway(&config).await;
    let mut names = std::collections::HashSet::new();
    for user in ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"] {
        let bearer = format!("Bearer {}", token(json!({"sub": user, "exp": now() + 60})));
        let mut seen = std::collections::HashSet::new();
        for spoof in ["a", "b", "c", "d"] {
            // A client's own X-User-Id neither reaches the backend nor moves the key.
            let headers = [("Authorization", bearer.as_str()), ("X-User-Id", spoof)];
            let (mut ws, _) = connect_with(gateway.addr, "/", &headers).await.unwrap();
            ws.send(Message::text("whoami")).await.unwrap();
            let name = next_message(&mut ws).await.into_text().unwrap().to_string();
            let _ = ws.close(None).await;
            seen.insert(name.clone());
            names.insert(name);
        }
        assert_eq!(seen.len(), 1, "{user} met on {seen:?}");
    }
    assert!(names.len() > 1, "users spread over backends: {names:?}");
}

#[tokio::test]
async fn refusals_are_counted_per_route_and_reason() {
    let (backend, _) = counting_backend().await;
    let config = simple_config(&[backend], &auth(""));
    let config = wsgate::config::from_yaml_str(&config, "test.yaml").unwrap();
    let gateway = wsgate::gateway::Gateway::new(config).unwrap();
    let expired = token(json!({"sub": "alice", "exp": now() - 60}));
    let request = upgrade_request("/", &format!("Authorization: Bearer {expired}\r\n"));
    let mut storage = [httparse::EMPTY_HEADER; 32];
    let (head, _) = wsgate::proto::handshake::parse_request(request.as_bytes(), &mut storage)
        .unwrap()
        .unwrap();
    let peer = wsgate::client_addr::ClientAddr::direct("127.0.0.1:1".parse().unwrap());
    let refused = wsgate::authorize::authorize(&gateway, 0, &head, peer, false)
        .await
        .unwrap_err();
    assert_eq!(refused.status, 401);
    let text = gateway.metrics.encode();
    assert!(
        text.contains(r#"wsgate_auth_failures_total{route="app",reason="expired"} 1"#),
        "{text}"
    );
    let recent = gateway.errors.newest_first();
    assert!(
        recent
            .iter()
            .any(|e| e.kind.name() == "auth" && e.detail.contains("401 the token has expired")),
        "{recent:?}"
    );
    assert!(!format!("{recent:?}").contains(&expired));
}

#[tokio::test]
async fn an_unreadable_key_file_stops_the_gateway_from_starting() {
    let (backend, _) = counting_backend().await;
    let yaml = simple_config(
        &[backend],
        "auth:\n  jwt:\n    keys:\n      - pem: /nonexistent/key.pem\n        algorithms: [ES256]\n",
    );
    let config = wsgate::config::from_yaml_str(&yaml, "test.yaml").unwrap();
    let error = wsgate::server::Server::bind(config).await.err().unwrap();
    let text = error.to_string();
    assert!(
        text.contains("route app") && text.contains("/nonexistent/key.pem"),
        "{text}"
    );
}

#[tokio::test]
async fn plain_http_requests_are_authenticated_like_upgrades() {
    let backend = http_backend::http_backend("h1").await;
    let config = simple_config(
        &[backend.addr],
        &auth("from: [bearer, {query: access_token}]\nheaders: {X-User-Id: sub}"),
    );
    let gateway = start_gateway(&config).await;
    let (status, body) = http(gateway.addr, "GET", "/info?x=1", None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        backend.connections.load(Ordering::SeqCst),
        0,
        "no backend connection"
    );

    let target = format!("/info?access_token={}&x=1", alice());
    let spoof = [("X-User-Id", "mallory")];
    let (status, body) = http_with(gateway.addr, "GET", &target, None, &spoof).await;
    assert_eq!(status, 200, "{body}");
    let info: http_backend::Info = serde_json::from_value(body).unwrap();
    assert_eq!(info.query.as_deref(), Some("x=1"), "the token left the URL");
    assert_eq!(info.one("x-user-id"), "alice");
}

/// One HTTP request on a fresh connection: status and JSON (or text) body.
async fn http(addr: SocketAddr, method: &str, target: &str, bearer: Option<&str>) -> (u16, Value) {
    http_with(addr, method, target, bearer, &[]).await
}

/// [`http`] with extra request headers.
async fn http_with(
    addr: SocketAddr,
    method: &str,
    target: &str,
    bearer: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(target)
        .header("host", "localhost");
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(bytes::Bytes::new())).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body)
}

#[tokio::test]
async fn a_session_is_authenticated_on_open_bound_to_its_subject_and_ends_at_expiry() {
    let echo = echo_backend("b1").await;
    let mut config = simple_config(&[echo.addr], &auth("leeway: 0\nheaders: {X-User-Id: sub}"));
    config.push_str("sessions:\n  poll_timeout: 1s\n");
    let gateway = start_gateway(&config).await;

    let (status, body) = http(gateway.addr, "POST", "/?wsgate=open", None).await;
    assert_eq!(status, 401, "{body}");
    assert!(echo.seen.lock().unwrap().is_empty());

    let exp = now() + 3;
    let token = token(json!({"sub": "alice", "exp": exp}));
    let (status, body) = http(gateway.addr, "POST", "/?wsgate=open", Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    let sid = body["session"].as_str().unwrap().to_owned();
    assert_eq!(
        echo.seen.lock().unwrap()[0].header("x-user-id"),
        Some("alice")
    );

    let poll = format!("/?wsgate=poll&wsgate_sid={sid}&wsgate_ack=0");
    let bob = self::token(json!({"sub": "bob", "exp": now() + 60}));
    let (status, body) = http(gateway.addr, "GET", &poll, Some(&bob)).await;
    assert_eq!(status, 403, "another subject's token: {body}");

    // Alice's session ends when her token does, with the route's code.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let close = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the session never ended"
        );
        let (status, body) = http(gateway.addr, "GET", &poll, Some(&token)).await;
        assert_eq!(status, 200, "{body}");
        if let Some(close) = body["events"]
            .as_array()
            .and_then(|events| events.iter().find_map(|e| e.get("close").cloned()))
        {
            break close;
        }
    };
    let unix_at_close = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    assert_eq!(close, json!({"code": 1008, "reason": "token expired"}));
    assert!(
        unix_at_close >= Duration::from_secs(exp),
        "{unix_at_close:?} < {exp}"
    );
}

/// An HTTPS server (certs/localhost.crt) answering every request with the status and body
/// in `answer` at that moment; counts requests.
async fn jwks_server(
    answer: Arc<std::sync::Mutex<(u16, String)>>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = concat!(env!("CARGO_MANIFEST_DIR"), "/certs");
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(format!("{certs}/localhost.crt"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_file(format!("{certs}/localhost.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, answer, counted) =
                (acceptor.clone(), Arc::clone(&answer), Arc::clone(&counted));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |_request| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = answer.lock().unwrap().clone();
                    async move {
                        hyper::Response::builder()
                            .status(status)
                            .body(Full::new(bytes::Bytes::from(body)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, requests)
}

/// A P-256 key pair: its signer and its JWK.
fn ec_key(kid: &str) -> (EncodingKey, Value) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = pair.public_key_raw();
    let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
        "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..65])});
    (
        EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
        jwk,
    )
}

fn ec_token(kid: &str, key: &EncodingKey) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    let claims = json!({"sub": "alice", "exp": now() + 600});
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

#[tokio::test]
async fn a_jwks_url_is_fetched_over_https_rotated_by_kid_and_kept_when_the_issuer_fails() {
    let (old_key, old_jwk) = ec_key("old");
    let (new_key, new_jwk) = ec_key("new");
    let answer = Arc::new(std::sync::Mutex::new((
        200,
        json!({"keys": [old_jwk.clone()]}).to_string(),
    )));
    let (issuer, fetches) = jwks_server(Arc::clone(&answer)).await;
    let echo = echo_backend("b1").await;
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/certs/ca.crt");
    let route = format!(
        "auth:\n  jwt:\n    keys:\n      - jwks_url: https://{issuer}/jwks.json\n        ca_file: {ca}\n        refresh: 1s\n        cooldown: 100ms\n"
    );
    let gateway = start_gateway(&simple_config(&[echo.addr], &route)).await;
    let admitted = |token: String| {
        let addr = gateway.addr;
        async move {
            let bearer = format!("Bearer {token}");
            connect_with(addr, "/", &[("Authorization", &bearer)])
                .await
                .is_ok()
        }
    };

    assert!(admitted(ec_token("old", &old_key)).await, "first fetch");
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    assert!(admitted(ec_token("old", &old_key)).await);
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "cached");

    // Rotation: the issuer publishes a new key beside the old one (after the cooldown).
    tokio::time::sleep(Duration::from_millis(150)).await;
    answer.lock().unwrap().1 = json!({"keys": [old_jwk, new_jwk.clone()]}).to_string();
    assert!(
        admitted(ec_token("new", &new_key)).await,
        "unknown kid fetches again"
    );
    assert!(
        admitted(ec_token("old", &old_key)).await,
        "old key valid until removed"
    );
    let after_rotation = fetches.load(Ordering::SeqCst);
    assert_eq!(after_rotation, 2);

    // Made-up key ids fetch at most once per cooldown (100 ms).
    let started = Instant::now();
    for _ in 0..10 {
        assert!(!admitted(ec_token("made-up", &new_key)).await);
    }
    let allowed = 1 + started.elapsed().as_millis() / 100;
    let made_up = fetches.load(Ordering::SeqCst) - after_rotation;
    assert!(
        made_up as u128 <= allowed,
        "{made_up} fetches, {allowed} allowed"
    );

    // The issuer fails: the last good set stays in use.
    *answer.lock().unwrap() = (500, "down".to_owned());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..3 {
        assert!(
            admitted(ec_token("new", &new_key)).await,
            "last good set kept"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    // The old key is removed: once the set is refreshed, its tokens are refused.
    *answer.lock().unwrap() = (200, json!({"keys": [new_jwk]}).to_string());
    let deadline = Instant::now() + Duration::from_secs(5);
    while admitted(ec_token("old", &old_key)).await {
        assert!(
            Instant::now() < deadline,
            "the removed key was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admitted(ec_token("new", &new_key)).await);
}

/// A plain-HTTP auth service: `Bearer good` is admitted as user 7 (`Bearer other` as user 8),
/// `Bearer broken` is a 500,
/// `Bearer slow` answers after 3 s, anything else is a 401 with a body. Counts calls and
/// keeps the last request's headers.
async fn auth_service() -> (
    SocketAddr,
    Arc<AtomicUsize>,
    Arc<std::sync::Mutex<Vec<(String, String)>>>,
) {
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let last = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (counted, kept) = (Arc::clone(&calls), Arc::clone(&last));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (counted, kept) = (Arc::clone(&counted), Arc::clone(&kept));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    *kept.lock().unwrap() = request
                        .headers()
                        .iter()
                        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_owned()))
                        .collect();
                    let auth = request
                        .headers()
                        .get("authorization")
                        .map(|v| v.to_str().unwrap_or("").to_owned());
                    async move {
                        let response = hyper::Response::builder();
                        let response = match auth.as_deref() {
                            Some("Bearer good") => response
                                .status(204)
                                .header("X-User-Id", "7")
                                .header("X-Secret", "not for the backend"),
                            Some("Bearer other") => response.status(204).header("X-User-Id", "8"),
                            Some("Bearer broken") => response.status(500),
                            Some("Bearer slow") => {
                                tokio::time::sleep(Duration::from_secs(3)).await;
                                response.status(204)
                            }
                            _ => response
                                .status(401)
                                .header("WWW-Authenticate", "Bearer realm=\"test\"")
                                .header("Content-Type", "text/plain"),
                        };
                        response.body(Full::new(bytes::Bytes::from_static(b"please log in")))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, calls, last)
}

#[tokio::test]
async fn forward_auth_admits_refuses_and_caches_by_credentials() {
    let (service, calls, last) = auth_service().await;
    let echo = echo_backend("b1").await;
    let route = format!(
        "auth:\n  forward:\n    url: http://{service}/check\n    timeout: 500ms\n    response_headers: [X-User-Id]\n    cache_ttl: 30s\n    negative_cache_ttl: 30s\n"
    );
    let gateway = start_gateway(&simple_config(&[echo.addr], &route)).await;

    // Admitted: the service's X-User-Id replaces the client's; other service headers stay.
    let headers = [("Authorization", "Bearer good"), ("X-User-Id", "spoofed")];
    let (mut ws, _) = connect_with(gateway.addr, "/room?x=1", &headers)
        .await
        .unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("hi"));
    let seen = echo.seen.lock().unwrap()[0].clone();
    let ids: Vec<&str> = seen
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("x-user-id"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(ids, ["7"]);
    assert_eq!(seen.header("x-secret"), None);
    let asked = last.lock().unwrap().clone();
    let asked_for = |name: &str| {
        asked
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(asked_for("x-forwarded-uri").as_deref(), Some("/room?x=1"));
    assert_eq!(asked_for("x-forwarded-method").as_deref(), Some("GET"));
    assert_eq!(asked_for("authorization").as_deref(), Some("Bearer good"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // The same credentials again: answered from the cache.
    assert!(connect_with(gateway.addr, "/", &headers).await.is_ok());
    assert_eq!(calls.load(Ordering::SeqCst), 1, "positive cache");

    // Refused: the service's 401, its challenge and body reach the client; cached too.
    for _ in 0..2 {
        let (status, head) = answer(gateway.addr, "/", "Authorization: Bearer bad\r\n").await;
        assert_eq!(status, 401, "{head}");
        assert!(head.contains("Bearer realm=\"test\""), "{head}");
        assert!(head.ends_with("please log in"), "{head}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "negative cache");

    // A failing or slow service is a 503, never an admission, and is not cached.
    for token in ["broken", "broken", "slow"] {
        let started = Instant::now();
        let (status, head) = answer(
            gateway.addr,
            "/",
            &format!("Authorization: Bearer {token}\r\n"),
        )
        .await;
        assert_eq!(status, 503, "{token}: {head}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "bounded by the timeout"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    assert_eq!(
        echo.seen.lock().unwrap().len(),
        2,
        "refusals never reach the backend"
    );
}

#[tokio::test]
async fn a_forward_auth_session_is_bound_to_the_subject_the_auth_service_names() {
    let (service, calls, _) = auth_service().await;
    let echo = echo_backend("b1").await;
    let route = format!(
        "auth:\n  forward:\n    url: http://{service}/check\n    response_headers: [X-User-Id]\n    subject_header: X-User-Id\n"
    );
    let mut config = simple_config(&[echo.addr], &route);
    config.push_str("sessions:\n  poll_timeout: 1s\n");
    let gateway = start_gateway(&config).await;

    let (status, body) = http(gateway.addr, "POST", "/?wsgate=open", Some("bad")).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = http(gateway.addr, "POST", "/?wsgate=open", Some("good")).await;
    assert_eq!(status, 200, "{body}");
    let sid = body["session"].as_str().unwrap().to_owned();
    let poll = format!("/?wsgate=poll&wsgate_sid={sid}&wsgate_ack=0");

    let (status, body) = http(gateway.addr, "GET", &poll, Some("other")).await;
    assert_eq!(
        status, 403,
        "user 8's credentials on user 7's session: {body}"
    );
    let (status, body) = http(gateway.addr, "GET", &poll, Some("good")).await;
    assert_eq!(status, 200, "{body}");
    // No credentials: the session id alone is the capability, as on a JWT route, and the
    // auth service is not asked.
    let before = calls.load(Ordering::SeqCst);
    let (status, body) = http(gateway.addr, "GET", &poll, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(calls.load(Ordering::SeqCst), before);
}
