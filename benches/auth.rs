//! What authentication costs a handshake: `RouteAuth::check` (find the token, verify it, build
//! the identity headers) for each kind of key, with the test keys of tests/keys/.
//!
//! Run with `cargo bench --bench auth` (add `-- --measurement-time 3 --warm-up-time 1` for a
//! quicker pass). Each timed call asserts that the token was accepted, so a benchmark that
//! silently started refusing would fail instead of getting faster.

// A benchmark's setup fails loudly: a panic on bad input here is the right report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use jsonwebtoken::{EncodingKey, Header};
use std::time::Duration;
use wsgate::auth::RouteAuth;
use wsgate::config::{JwtAlgorithm, JwtAuth, JwtKey, JwtKeySource, TokenSource};

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");
const NOW: u64 = 1_800_000_000;

fn route(source: JwtKeySource, algorithm: JwtAlgorithm) -> RouteAuth {
    RouteAuth::new(&JwtAuth {
        from: vec![TokenSource::Bearer],
        keys: vec![JwtKey {
            source,
            algorithms: vec![algorithm],
            kid: None,
        }],
        issuer: None,
        audience: Vec::new(),
        leeway: Duration::ZERO,
        require: vec!["sub".into()],
        headers: vec![("X-User-Id".into(), "sub".into())],
        expired_close_code: 1008,
        max_connections_per_subject: None,
        refresh: false,
    })
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let claims = serde_json::json!({"sub": "alice", "exp": NOW + 600, "role": "member"});
    let read = |name: &str| std::fs::read(format!("{KEYS}/{name}")).unwrap();
    let secret = read("hs_secret.key");
    let cases = [
        (
            "HS256",
            JwtAlgorithm::HS256,
            route(
                JwtKeySource::Secret(format!("{KEYS}/hs_secret.key").into()),
                JwtAlgorithm::HS256,
            ),
            EncodingKey::from_secret(secret.trim_ascii_end()),
        ),
        (
            "RS256 (2048)",
            JwtAlgorithm::RS256,
            route(
                JwtKeySource::Pem(format!("{KEYS}/rsa_public.pem").into()),
                JwtAlgorithm::RS256,
            ),
            EncodingKey::from_rsa_pem(&read("rsa_private.pem")).unwrap(),
        ),
        (
            "ES256",
            JwtAlgorithm::ES256,
            route(
                JwtKeySource::Pem(format!("{KEYS}/ec_public.pem").into()),
                JwtAlgorithm::ES256,
            ),
            EncodingKey::from_ec_pem(&read("ec_private.pem")).unwrap(),
        ),
        (
            "EdDSA",
            JwtAlgorithm::EdDSA,
            route(
                JwtKeySource::Pem(format!("{KEYS}/ed_public.pem").into()),
                JwtAlgorithm::EdDSA,
            ),
            EncodingKey::from_ed_pem(&read("ed_private.pem")).unwrap(),
        ),
    ];
    let mut group = c.benchmark_group("auth_check");
    for (name, algorithm, route, signer) in &cases {
        let header = Header::new(wsgate::auth::jwt::algorithm(*algorithm));
        let token = jsonwebtoken::encode(&header, &claims, signer).unwrap();
        let request = format!(
            "GET /chat HTTP/1.1\r\nHost: chat.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        );
        let mut storage = [httparse::EMPTY_HEADER; 32];
        let (head, _) = wsgate::proto::handshake::parse_request(request.as_bytes(), &mut storage)
            .unwrap()
            .unwrap();
        group.bench_function(*name, |b| {
            b.iter(|| {
                let admitted = route.check(black_box(&head), NOW).unwrap();
                assert_eq!(admitted.identity.len(), 1);
                admitted
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
