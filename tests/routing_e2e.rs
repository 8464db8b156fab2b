//! Routing end to end: real gateways on 127.0.0.1:0 in front of tokio-tungstenite echo
//! backends that tell their name (`whoami`), reached by tokio-tungstenite clients.
//!
//! Covers sticky keys from every source (path, query, header, cookie, client IP), agreement
//! between independent gateway instances, minimal movement when a backend is removed, least
//! connections without a key, the gateway's own affinity cookie, route matching by host and
//! path prefix, 404 without a route and the origin allow-list.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/routing_client.rs"]
mod routing_client;
mod support;

use routing_client::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use support::{EchoBackend, echo_backend, start_gateway, upgrade_request};

/// Echo backends named `b1`, `b2`, ...
async fn fleet(count: usize) -> Vec<EchoBackend> {
    let mut backends = Vec::with_capacity(count);
    for n in 1..=count {
        backends.push(echo_backend(&format!("b{n}")).await);
    }
    backends
}

/// One listener, one upstream `app` with `backends` (`weight` per backend when given), one
/// route with `route` spliced in (YAML lines at route-key indentation).
fn one_route_yaml(backends: &[&EchoBackend], weights: Option<&[u32]>, route: &str) -> String {
    let mut yaml =
        String::from("listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends:\n");
    for (i, backend) in backends.iter().enumerate() {
        match weights {
            Some(weights) => yaml.push_str(&format!(
                "      - url: ws://{}\n        weight: {}\n",
                backend.addr, weights[i]
            )),
            None => yaml.push_str(&format!("      - ws://{}\n", backend.addr)),
        }
    }
    yaml.push_str("routes:\n  - name: app\n    upstream: app\n");
    for line in route.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml
}

const ROOMS_ROUTE: &str = "match:\n  path_prefix: /rooms/\nsticky:\n  path: \"/rooms/{room}\"";

/// The backend name wsgate's own rendezvous ranking predicts for `key` with this
/// configuration's backends: the end-to-end choice must be the documented algorithm's.
fn predicted(yaml: &str, backends: &[EchoBackend], key: &str) -> String {
    let config = wsgate::config::from_yaml_str(yaml, "test.yaml").unwrap();
    let upstream = &config.upstreams[0].backends;
    let first = &upstream[wsgate::routing::rank(upstream, key)[0]];
    let by_url: HashMap<String, &str> = backends
        .iter()
        .map(|b| (format!("ws://{}", b.addr), b.name.as_str()))
        .collect();
    by_url[&first.url].to_owned()
}

fn rooms(count: usize) -> Vec<String> {
    (0..count).map(|n| format!("room-{n}")).collect()
}

/// Room -> backend name as one gateway serves it (one connection per room).
async fn room_map(gateway: &support::Gateway, rooms: &[String]) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for room in rooms {
        let name = backend_via(gateway.addr, &format!("ws://localhost/rooms/{room}"), &[]).await;
        map.insert(room.clone(), name);
    }
    map
}

fn distinct(names: impl IntoIterator<Item = String>) -> HashSet<String> {
    names.into_iter().collect()
}

#[tokio::test]
async fn sticky_path_many_rooms_each_room_always_reaches_the_same_backend() {
    let backends = fleet(3).await;
    let yaml = one_route_yaml(&backends.iter().collect::<Vec<_>>(), None, ROOMS_ROUTE);
    let gateway = start_gateway(&yaml).await;
    let rooms = rooms(40);
    let first = room_map(&gateway, &rooms).await;
    for _ in 0..2 {
        assert_eq!(
            room_map(&gateway, &rooms).await,
            first,
            "a room changed backend between connections"
        );
    }
    // Concurrent connections to one room, while others are open elsewhere, still agree.
    let mut held = Vec::new();
    for _ in 0..3 {
        let (mut ws, _) = open(gateway.addr, "ws://localhost/rooms/room-0", &[]).await;
        assert_eq!(whoami(&mut ws).await, first["room-0"]);
        held.push(ws);
    }
    for (room, name) in &first {
        assert_eq!(
            *name,
            predicted(&yaml, &backends, room),
            "room {room} is not on its rendezvous backend"
        );
    }
    // Only the room segment counts: a query or deeper segments do not move the room.
    for room in ["room-1", "room-2", "room-3"] {
        for url in [
            format!("ws://localhost/rooms/{room}?token=abc"),
            format!("ws://localhost/rooms/{room}/thread/7"),
        ] {
            assert_eq!(
                backend_via(gateway.addr, &url, &[]).await,
                first[room],
                "{url}"
            );
        }
    }
    assert_eq!(
        distinct(first.into_values()).len(),
        3,
        "40 rooms should use all 3 backends"
    );
    for ws in held {
        close(ws).await;
    }
}

#[tokio::test]
async fn sticky_path_two_gateways_same_backends_agree_on_every_room() {
    let backends = fleet(3).await;
    let refs: Vec<_> = backends.iter().collect();
    let one = start_gateway(&one_route_yaml(&refs, None, ROOMS_ROUTE)).await;
    // The second instance lists the same backends in another order: identity is the URL.
    let reversed: Vec<_> = refs.iter().rev().copied().collect();
    let two = start_gateway(&one_route_yaml(&reversed, None, ROOMS_ROUTE)).await;
    let rooms = rooms(40);
    let on_one = room_map(&one, &rooms).await;
    let on_two = room_map(&two, &rooms).await;
    assert_eq!(
        on_one, on_two,
        "two gateways with the same backends disagree on some rooms"
    );
    assert!(distinct(on_one.into_values()).len() >= 2);
}

#[tokio::test]
async fn sticky_path_backend_removed_only_its_rooms_move() {
    let backends = fleet(3).await;
    let all: Vec<_> = backends.iter().collect();
    let three = start_gateway(&one_route_yaml(&all, None, ROOMS_ROUTE)).await;
    let two = start_gateway(&one_route_yaml(&all[..2], None, ROOMS_ROUTE)).await;
    let rooms = rooms(60);
    let before = room_map(&three, &rooms).await;
    let after = room_map(&two, &rooms).await;
    let removed = &backends[2].name;
    let mut moved = 0;
    for room in &rooms {
        if before[room] == *removed {
            assert_ne!(after[room], *removed);
            moved += 1;
        } else {
            assert_eq!(
                after[room], before[room],
                "room {room} moved although its backend stayed"
            );
        }
    }
    assert!(
        moved > 0,
        "no room was on the removed backend: the comparison proves nothing"
    );
    // And back: adding the backend again moves rooms only onto it.
    let three_again = start_gateway(&one_route_yaml(&all, None, ROOMS_ROUTE)).await;
    assert_eq!(room_map(&three_again, &rooms).await, before);
}

#[tokio::test]
async fn sticky_query_same_value_same_backend_wherever_it_sits() {
    let backends = fleet(3).await;
    let yaml = one_route_yaml(
        &backends.iter().collect::<Vec<_>>(),
        None,
        "sticky:\n  query: room",
    );
    let gateway = start_gateway(&yaml).await;
    let mut seen = HashSet::new();
    for n in 0..24 {
        let key = format!("q{n}");
        let expected = predicted(&yaml, &backends, &key);
        for url in [
            format!("ws://localhost/chat?room={key}"),
            format!("ws://localhost/other?a=1&room={key}&b=2"),
            format!("ws://localhost/chat?room={key}&room=ignored-later-value"),
        ] {
            assert_eq!(
                backend_via(gateway.addr, &url, &[]).await,
                expected,
                "{url}"
            );
        }
        seen.insert(expected);
    }
    assert!(
        seen.len() >= 2,
        "24 keys all on one backend: the key is not used"
    );
    // The value is form-decoded before hashing: `+` and `%20` are the same room.
    let expected = predicted(&yaml, &backends, "a b");
    for url in [
        "ws://localhost/?room=a+b",
        "ws://localhost/?room=a%20b",
        "ws://localhost/?r%6Fom=a%20b",
    ] {
        assert_eq!(backend_via(gateway.addr, url, &[]).await, expected, "{url}");
    }
}

#[tokio::test]
async fn sticky_header_same_value_same_backend() {
    let backends = fleet(3).await;
    let yaml = one_route_yaml(
        &backends.iter().collect::<Vec<_>>(),
        None,
        "sticky:\n  header: X-Room",
    );
    let gateway = start_gateway(&yaml).await;
    let mut seen = HashSet::new();
    for n in 0..24 {
        let key = format!("h{n}");
        let expected = predicted(&yaml, &backends, &key);
        for _ in 0..2 {
            let name = backend_via(gateway.addr, "ws://localhost/chat", &[("x-room", &key)]).await;
            assert_eq!(name, expected, "header key {key}");
        }
        seen.insert(expected);
    }
    assert!(
        seen.len() >= 2,
        "24 keys all on one backend: the key is not used"
    );
}

#[tokio::test]
async fn sticky_cookie_key_same_value_same_backend() {
    let backends = fleet(3).await;
    let yaml = one_route_yaml(
        &backends.iter().collect::<Vec<_>>(),
        None,
        "sticky:\n  cookie: sid",
    );
    let gateway = start_gateway(&yaml).await;
    let mut seen = HashSet::new();
    for n in 0..24 {
        let key = format!("s{n}");
        let expected = predicted(&yaml, &backends, &key);
        for cookie in [
            format!("sid={key}"),
            format!("theme=dark; sid={key}; lang=en"),
            format!("sid=\"{key}\""),
        ] {
            let name =
                backend_via(gateway.addr, "ws://localhost/chat", &[("cookie", &cookie)]).await;
            assert_eq!(name, expected, "Cookie: {cookie}");
        }
        seen.insert(expected);
    }
    assert!(
        seen.len() >= 2,
        "24 keys all on one backend: the key is not used"
    );
}

#[tokio::test]
async fn sticky_client_ip_each_source_address_keeps_its_backend() {
    let backends = fleet(3).await;
    let yaml = one_route_yaml(
        &backends.iter().collect::<Vec<_>>(),
        None,
        "sticky:\n  client_ip: true",
    );
    let gateway = start_gateway(&yaml).await;
    let mut seen = HashSet::new();
    for last in 1..=24u8 {
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
        let expected = predicted(&yaml, &backends, &source.to_string());
        for _ in 0..2 {
            let (mut ws, _) = try_open_from(source, gateway.addr, "ws://localhost/chat")
                .await
                .unwrap_or_else(|e| panic!("from {source}: {e}"));
            assert_eq!(whoami(&mut ws).await, expected, "client {source}");
            close(ws).await;
        }
        seen.insert(expected);
    }
    assert!(
        seen.len() >= 2,
        "24 client addresses all on one backend: the address is not used"
    );
}

/// Opens `count` connections one after the other and keeps them open; returns how many
/// landed on each backend name.
async fn held_spread(
    gateway: &support::Gateway,
    url: &str,
    count: usize,
) -> (BTreeMap<String, usize>, Vec<Ws>) {
    let mut spread = BTreeMap::new();
    let mut held = Vec::new();
    for _ in 0..count {
        let (mut ws, _) = open(gateway.addr, url, &[]).await;
        *spread.entry(whoami(&mut ws).await).or_insert(0) += 1;
        held.push(ws);
    }
    (spread, held)
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs
        .iter()
        .map(|(name, n)| ((*name).to_owned(), *n))
        .collect()
}

#[tokio::test]
async fn no_sticky_key_least_connections_spreads_evenly() {
    let backends = fleet(3).await;
    let gateway = start_gateway(&one_route_yaml(
        &backends.iter().collect::<Vec<_>>(),
        None,
        "",
    ))
    .await;
    let (spread, held) = held_spread(&gateway, "ws://localhost/chat", 9).await;
    assert_eq!(spread, counts(&[("b1", 3), ("b2", 3), ("b3", 3)]));
    for ws in held {
        close(ws).await;
    }
}

#[tokio::test]
async fn sticky_route_request_without_key_falls_back_to_least_connections() {
    let backends = fleet(3).await;
    let yaml = one_route_yaml(
        &backends.iter().collect::<Vec<_>>(),
        None,
        "sticky:\n  query: room",
    );
    let gateway = start_gateway(&yaml).await;
    // No parameter, an empty value: no key, so no pile-up on the backend "" hashes to.
    let (spread, held) = held_spread(&gateway, "ws://localhost/chat?other=1&room=", 6).await;
    assert_eq!(spread, counts(&[("b1", 2), ("b2", 2), ("b3", 2)]));
    for ws in held {
        close(ws).await;
    }
}

#[tokio::test]
async fn no_sticky_key_least_connections_follows_weights() {
    let backends = fleet(2).await;
    let yaml = one_route_yaml(&backends.iter().collect::<Vec<_>>(), Some(&[1, 2]), "");
    let gateway = start_gateway(&yaml).await;
    let (spread, held) = held_spread(&gateway, "ws://localhost/chat", 9).await;
    assert_eq!(spread, counts(&[("b1", 3), ("b2", 6)]));
    for ws in held {
        close(ws).await;
    }
}

/// Closed connections give their backend slot back: connections pinned to one backend by
/// the affinity cookie, once closed, must not keep weighing on least connections.
#[tokio::test]
async fn least_connections_closed_connections_release_their_backend_slots() {
    let backends = fleet(3).await;
    let yaml = one_route_yaml(&backends.iter().collect::<Vec<_>>(), None, AFFINITY_ROUTE);
    let gateway = start_gateway(&yaml).await;
    let (mut ws, response) = open(gateway.addr, "ws://localhost/app", &[]).await;
    let pinned = whoami(&mut ws).await;
    let header = format!("wsgate_affinity={}", affinity_cookie(&response));
    close(ws).await;
    for _ in 0..4 {
        let (mut ws, _) = open(gateway.addr, "ws://localhost/app", &[("cookie", &header)]).await;
        assert_eq!(whoami(&mut ws).await, pinned);
        close(ws).await;
    }
    // Slots are released asynchronously after a close: measure until the counts settle.
    // A leak would leave the pinned backend out of every measurement.
    let even = counts(&[("b1", 2), ("b2", 2), ("b3", 2)]);
    eventually(
        "an even spread once closed connections are released",
        || async {
            let (spread, held) = held_spread(&gateway, "ws://localhost/app", 6).await;
            for ws in held {
                close(ws).await;
            }
            (spread == even).then_some(())
        },
    )
    .await;
}

const AFFINITY_ROUTE: &str = "sticky_cookie:\n  name: wsgate_affinity\n  max_age: 1h";

/// The affinity cookie's value from a 101, checking the attributes the gateway documents.
fn affinity_cookie(
    response: &tokio_tungstenite::tungstenite::handshake::client::Response,
) -> String {
    let values: Vec<&str> = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(
        values.len(),
        1,
        "exactly one Set-Cookie on a first connection: {values:?}"
    );
    let mut parts = values[0].split(';').map(str::trim);
    let (name, value) = parts.next().unwrap().split_once('=').unwrap();
    assert_eq!(name, "wsgate_affinity");
    assert!(
        value.len() == 16 && value.bytes().all(|b| b.is_ascii_hexdigit()),
        "cookie value {value:?}"
    );
    let attributes: HashSet<String> = parts.map(str::to_ascii_lowercase).collect();
    for expected in ["path=/", "httponly", "samesite=lax", "max-age=3600"] {
        assert!(
            attributes.contains(expected),
            "Set-Cookie {:?} lacks {expected}",
            values[0]
        );
    }
    value.to_owned()
}

#[tokio::test]
async fn sticky_cookie_route_first_response_sets_cookie_and_reconnect_keeps_backend() {
    let backends = fleet(3).await;
    let yaml = one_route_yaml(&backends.iter().collect::<Vec<_>>(), None, AFFINITY_ROUTE);
    let gateway = start_gateway(&yaml).await;
    // Three cookie-less clients held open: least connections puts them on three backends,
    // each with its own cookie.
    let mut held = Vec::new();
    let mut cookies = BTreeMap::new();
    for _ in 0..3 {
        let (mut ws, response) = open(gateway.addr, "ws://localhost/app", &[]).await;
        let cookie = affinity_cookie(&response);
        let name = whoami(&mut ws).await;
        assert!(
            cookies.insert(name.clone(), cookie).is_none(),
            "two fresh clients on {name}"
        );
        held.push(ws);
    }
    let distinct_values: HashSet<&String> = cookies.values().collect();
    assert_eq!(
        distinct_values.len(),
        3,
        "one cookie value per backend: {cookies:?}"
    );
    // Reconnecting with a cookie reaches its backend whatever the load, and sets nothing.
    for (name, value) in &cookies {
        for _ in 0..3 {
            let header = format!("theme=dark; wsgate_affinity={value}");
            let (mut ws, response) =
                open(gateway.addr, "ws://localhost/app", &[("cookie", &header)]).await;
            assert_eq!(
                whoami(&mut ws).await,
                *name,
                "cookie {value} should lead to {name}"
            );
            assert!(
                response.headers().get("set-cookie").is_none(),
                "no new cookie when the old one is honoured"
            );
            held.push(ws);
        }
    }
    // Another gateway instance with the same backends honours the same cookies.
    let other = start_gateway(&yaml).await;
    for (name, value) in &cookies {
        let header = format!("wsgate_affinity={value}");
        assert_eq!(
            backend_via(other.addr, "ws://localhost/app", &[("cookie", &header)]).await,
            *name
        );
    }
    for ws in held {
        close(ws).await;
    }
}

#[tokio::test]
async fn sticky_cookie_route_unknown_cookie_value_gets_a_fresh_cookie() {
    let backends = fleet(2).await;
    let yaml = one_route_yaml(&backends.iter().collect::<Vec<_>>(), None, AFFINITY_ROUTE);
    let gateway = start_gateway(&yaml).await;
    for stale in ["0123456789abcdef", "not-a-token", ""] {
        let header = format!("wsgate_affinity={stale}");
        let (mut ws, response) =
            open(gateway.addr, "ws://localhost/app", &[("cookie", &header)]).await;
        let fresh = affinity_cookie(&response);
        let name = whoami(&mut ws).await;
        close(ws).await;
        let again = format!("wsgate_affinity={fresh}");
        assert_eq!(
            backend_via(gateway.addr, "ws://localhost/app", &[("cookie", &again)]).await,
            name
        );
    }
}

/// Four upstreams of one backend each, so the backend's name tells the route.
async fn routed_gateway() -> (support::Gateway, Vec<EchoBackend>) {
    let names = ["chat-api", "any-api", "chat-site", "fallback"];
    let mut backends = Vec::new();
    for name in names {
        backends.push(echo_backend(name).await);
    }
    let mut yaml = String::from("listeners:\n  - address: 127.0.0.1:0\nupstreams:\n");
    for backend in &backends {
        yaml.push_str(&format!(
            "  {}:\n    backends: [\"ws://{}\"]\n",
            backend.name, backend.addr
        ));
    }
    yaml.push_str(
        "routes:
  - name: chat-api
    match: {host: chat.example.test, path_prefix: /api/}
    upstream: chat-api
  - name: any-api
    match: {path_prefix: /api/}
    upstream: any-api
  - name: chat-site
    match: {host: chat.example.test}
    upstream: chat-site
  - name: fallback
    upstream: fallback
",
    );
    (start_gateway(&yaml).await, backends)
}

#[tokio::test]
async fn route_match_host_and_path_prefix_first_match_wins() {
    let (gateway, _backends) = routed_gateway().await;
    let cases = [
        // Matches all four routes: the first one wins.
        ("ws://chat.example.test/api/v1", "chat-api"),
        ("ws://CHAT.Example.TEST:8443/api/v1?x=/", "chat-api"),
        ("ws://other.test/api/v1", "any-api"),
        ("ws://127.0.0.1/api/", "any-api"),
        // A plain prefix: "/api" and "/apiv1" are not under "/api/".
        ("ws://chat.example.test/apiv1", "chat-site"),
        ("ws://chat.example.test/api", "chat-site"),
        ("ws://chat.example.test/", "chat-site"),
        ("ws://other.test/x", "fallback"),
        ("ws://sub.chat.example.test/api/v1", "any-api"),
        ("ws://sub.chat.example.test/", "fallback"),
    ];
    for (url, expected) in cases {
        assert_eq!(backend_via(gateway.addr, url, &[]).await, expected, "{url}");
    }
}

#[tokio::test]
async fn route_match_wildcard_host_matches_subdomains_only() {
    let sub = echo_backend("sub").await;
    let apex = echo_backend("apex").await;
    let yaml = format!(
        "listeners:
  - address: 127.0.0.1:0
upstreams:
  sub: {{backends: [\"ws://{}\"]}}
  apex: {{backends: [\"ws://{}\"]}}
routes:
  - name: sub
    match: {{host: \"*.example.test\"}}
    upstream: sub
  - name: apex
    match: {{host: example.test}}
    upstream: apex
",
        sub.addr, apex.addr
    );
    let gateway = start_gateway(&yaml).await;
    for (url, expected) in [
        ("ws://a.example.test/", "sub"),
        ("ws://a.b.example.test:9000/", "sub"),
        ("ws://example.test/", "apex"),
        ("ws://EXAMPLE.test./", "apex"),
    ] {
        assert_eq!(backend_via(gateway.addr, url, &[]).await, expected, "{url}");
    }
    for url in [
        "ws://example.test.evil/",
        "ws://aexample.test/",
        "ws://other.test/",
    ] {
        assert_eq!(refused_status(gateway.addr, url, &[]).await, 404, "{url}");
    }
}

#[tokio::test]
async fn route_no_match_404_with_a_one_line_reason() {
    let backend = echo_backend("b1").await;
    let yaml = format!(
        "listeners:
  - address: 127.0.0.1:0
upstreams:
  app: {{backends: [\"ws://{}\"]}}
routes:
  - match: {{host: chat.example.test, path_prefix: /ws}}
    upstream: app
",
        backend.addr
    );
    let gateway = start_gateway(&yaml).await;
    // Wrong host (upgrade_request sends Host: localhost), then wrong path.
    let response = exchange(gateway.addr, upgrade_request("/ws", "").as_bytes()).await;
    response.assert_refusal(404, "no route");
    let request =
        upgrade_request("/other", "").replace("Host: localhost", "Host: chat.example.test");
    exchange(gateway.addr, request.as_bytes())
        .await
        .assert_refusal(404, "no route");
    assert_eq!(
        refused_status(gateway.addr, "ws://chat.example.test/other", &[]).await,
        404
    );
    assert_eq!(
        backend_via(gateway.addr, "ws://chat.example.test/ws/1", &[]).await,
        "b1"
    );
    assert!(
        backend.seen.lock().unwrap().len() == 1,
        "refused requests never reach a backend"
    );
}

#[tokio::test]
async fn allowed_origins_wrong_origin_403_right_origin_connects() {
    let backend = echo_backend("b1").await;
    let route = "allowed_origins:\n  - https://chat.example.test\n  - http://localhost:3000";
    let gateway = start_gateway(&one_route_yaml(&[&backend], None, route)).await;
    for origin in [
        "https://evil.example",
        "http://chat.example.test",
        "https://chat.example.test.evil.example",
        "https://chat.example.test:8443",
        "http://localhost:3001",
        "null",
    ] {
        let request = upgrade_request("/chat", &format!("Origin: {origin}\r\n"));
        exchange(gateway.addr, request.as_bytes())
            .await
            .assert_refusal(403, "origin");
        assert_eq!(
            refused_status(gateway.addr, "ws://localhost/chat", &[("origin", origin)]).await,
            403,
            "{origin}"
        );
    }
    // A browser always sends Origin; a request without one is not from an allowed page.
    exchange(gateway.addr, upgrade_request("/chat", "").as_bytes())
        .await
        .assert_refusal(403, "origin");
    for origin in [
        "https://chat.example.test",
        "HTTPS://Chat.Example.Test",
        "http://localhost:3000",
    ] {
        let (mut ws, _) = open(gateway.addr, "ws://localhost/chat", &[("origin", origin)]).await;
        echo(&mut ws, "hello").await;
        close(ws).await;
    }
    assert_eq!(
        backend.seen.lock().unwrap().len(),
        3,
        "refused requests never reach the backend"
    );
}
