//! Sticky routing through the public API only: route, extract the key, choose the backend.
//! No sockets and no runtime; everything here is deterministic.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr};

use wsgate::config::{Backend, Compression, Limits, Route, StickyKey, Timeouts};
use wsgate::routing::hash::{backend_token, key_hash, weighted_score};
use wsgate::routing::{
    RequestParts, RouteTable, UpstreamBalancer, cookie_value, extract_key, pick, rank,
};

fn backend(url: &str, weight: u32) -> Backend {
    Backend {
        url: url.to_owned(),
        secure: url.starts_with("wss:"),
        host: String::new(),
        port: 0,
        base_path: String::new(),
        weight,
    }
}

fn route(host: Option<&str>, path_prefix: &str, sticky: Option<StickyKey>) -> Route {
    Route {
        name: path_prefix.to_owned(),
        host: host.map(str::to_owned),
        path_prefix: path_prefix.to_owned(),
        upstream: 0,
        sticky,
        sticky_cookie: None,
        allowed_origins: Vec::new(),
        compression: Compression::Strip,
        ping_passthrough: false,
        connect_retries: 0,
        timeouts: Timeouts::DEFAULT,
        limits: Limits::DEFAULT,
        auth: None,
    }
}

fn five_backends() -> Vec<Backend> {
    (1..=5)
        .map(|n| backend(&format!("ws://chat-{n}.internal:9000"), 1))
        .collect()
}

fn chosen_url<'a>(balancer: &'a UpstreamBalancer, key: &str) -> &'a str {
    let index = balancer.choose(Some(key)).expect("a healthy backend");
    &balancer.backends()[index].url
}

/// The fleet used by the pinned tests. Never edit it: the expectations below depend on it.
fn pinned_fleet() -> Vec<Backend> {
    vec![
        backend("ws://10.0.0.1:9000", 1),
        backend("ws://10.0.0.2:9000", 1),
        backend("ws://10.0.0.3:9000", 2),
        backend("wss://chat-4.internal.example:443/socket", 1),
        backend("ws://[2001:db8::5]:8080", 3),
    ]
}

/// Frozen output of the rendezvous ranking. Every gateway instance, whatever its wsgate
/// version, must send a room to the same backend, or a rolling upgrade splits rooms across
/// backends and cookies issued before it point nowhere.
///
/// If this test fails, the change that broke it would reshuffle rooms across the whole fleet
/// on upgrade. Revert that change; NEVER "fix" the test by updating these values.
#[test]
fn pinned_rankings_never_change() {
    const ONE: &str = "ws://10.0.0.1:9000";
    const TWO: &str = "ws://10.0.0.2:9000";
    const THREE: &str = "ws://10.0.0.3:9000";
    const FOUR: &str = "wss://chat-4.internal.example:443/socket";
    const FIVE: &str = "ws://[2001:db8::5]:8080";
    let expected: [(&str, [&str; 5]); 20] = [
        ("room-1", [THREE, FOUR, FIVE, TWO, ONE]),
        ("room-2", [ONE, THREE, FIVE, FOUR, TWO]),
        ("room-3", [FIVE, FOUR, ONE, THREE, TWO]),
        ("lobby", [THREE, ONE, FIVE, TWO, FOUR]),
        ("general", [FIVE, FOUR, THREE, ONE, TWO]),
        ("random", [FOUR, FIVE, THREE, ONE, TWO]),
        ("user:42", [FIVE, FOUR, ONE, THREE, TWO]),
        ("user:1337", [THREE, FOUR, FIVE, TWO, ONE]),
        ("alice@example.com", [FOUR, FIVE, TWO, THREE, ONE]),
        ("bob", [THREE, FIVE, TWO, FOUR, ONE]),
        ("a", [TWO, ONE, FIVE, THREE, FOUR]),
        ("0", [TWO, FIVE, THREE, FOUR, ONE]),
        ("42", [FIVE, ONE, THREE, FOUR, TWO]),
        ("café", [FIVE, TWO, THREE, ONE, FOUR]),
        ("2001:db8::1", [THREE, FIVE, ONE, FOUR, TWO]),
        ("192.0.2.7", [FIVE, TWO, ONE, FOUR, THREE]),
        ("9f86d081884c7d65", [THREE, FIVE, FOUR, ONE, TWO]),
        ("x y z", [THREE, FIVE, ONE, FOUR, TWO]),
        (
            "a-very-long-room-name-that-goes-on-and-on-and-on",
            [FOUR, TWO, FIVE, ONE, THREE],
        ),
        ("ROOM-1", [FOUR, FIVE, TWO, THREE, ONE]),
    ];
    let fleet = pinned_fleet();
    let mut reversed = fleet.clone();
    reversed.reverse();
    for (key, expected_order) in expected {
        for backends in [&fleet, &reversed] {
            let order: Vec<&str> = rank(backends, key)
                .into_iter()
                .map(|index| backends[index].url.as_str())
                .collect();
            assert_eq!(order, expected_order, "ranking of {key:?} changed");
        }
    }
}

/// Frozen building blocks, so a failure of the test above says which layer changed. Same rule:
/// never update these values.
#[test]
fn pinned_hashes_scores_and_cookies_never_change() {
    let hashes = [
        (
            "ws://10.0.0.1:9000",
            "room-1",
            0xad98_2d71_3236_4c84_u64,
            4_612_979_219_048_961_344_u64,
        ),
        (
            "ws://10.0.0.1:9000",
            "",
            0xa8f3_3bff_a4ae_06a4,
            4_612_600_950_033_191_484,
        ),
        ("", "", 0x1bbd_5c81_3c69_a8d7, 4_601_777_767_726_934_601),
        (
            "wss://chat-4.internal.example:443/socket",
            "café",
            0x4c6c_3bc0_5027_2ac8,
            4_605_625_980_613_809_852,
        ),
    ];
    for (url, key, hash, score_bits) in hashes {
        assert_eq!(key_hash(url, key), hash, "hash of ({url:?}, {key:?})");
        assert_eq!(
            weighted_score(hash, 1).to_bits(),
            score_bits,
            "score of ({url:?}, {key:?})"
        );
    }
    assert_eq!(backend_token(""), 0xefd0_1f60_ba99_2926);

    let cookies = [
        ("ws://10.0.0.1:9000", "f80bf94bea747aaf"),
        ("ws://10.0.0.2:9000", "22dfa9806a01370c"),
        ("ws://10.0.0.3:9000", "0d7f73c6fdfc1023"),
        (
            "wss://chat-4.internal.example:443/socket",
            "6e0b6fb47af1d2f6",
        ),
        ("ws://[2001:db8::5]:8080", "f435a9a29b1cc21c"),
    ];
    let balancer = UpstreamBalancer::new(&pinned_fleet());
    for (index, (url, value)) in cookies.into_iter().enumerate() {
        assert_eq!(cookie_value(&backend(url, 1)), value, "cookie of {url}");
        assert_eq!(balancer.backend_for_cookie(value), Some(index));
    }
}

#[test]
fn a_room_reaches_the_same_backend_from_any_gateway_instance() {
    let routes = [
        route(
            Some("chat.example.com"),
            "/rooms/",
            Some(StickyKey::PathSegment {
                pattern: "/rooms/{room}".to_owned(),
                index: 1,
            }),
        ),
        route(None, "/", Some(StickyKey::Query("room".to_owned()))),
    ];
    let table = RouteTable::new(&routes);
    let fleet = five_backends();
    let mut other_order = fleet.clone();
    other_order.rotate_left(3);
    // Two gateway instances whose configurations list the backends differently.
    let gateway_a = UpstreamBalancer::new(&fleet);
    let gateway_b = UpstreamBalancer::new(&other_order);

    let by_path = RequestParts {
        path: "/rooms/lobby",
        query: Some("token=abc"),
        headers: &[("Host", b"Chat.Example.com:443".as_slice())],
        client_ip: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
    };
    let by_query = RequestParts {
        path: "/socket",
        query: Some("room=lobby"),
        headers: &[("Host", b"other.example.net".as_slice())],
        client_ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)),
    };
    let mut chosen = Vec::new();
    for (host, request) in [
        ("Chat.Example.com:443", &by_path),
        ("other.example.net", &by_query),
    ] {
        let route_index = table.route(Some(host), request.path).expect("a route");
        let sticky = routes[route_index].sticky.as_ref().expect("a sticky route");
        let key = extract_key(sticky, request).expect("a key");
        assert_eq!(key, "lobby");
        let url = chosen_url(&gateway_a, &key);
        assert_eq!(chosen_url(&gateway_b, &key), url);
        chosen.push(url.to_owned());
    }
    // The same room reached through two routes is still one room on one backend.
    assert_eq!(chosen[0], chosen[1]);
}

#[test]
fn removing_one_of_five_backends_moves_only_its_keys() {
    let fleet = five_backends();
    let removed = "ws://chat-4.internal:9000";
    let remaining: Vec<Backend> = fleet.iter().filter(|b| b.url != removed).cloned().collect();
    let before = UpstreamBalancer::new(&fleet);
    let after = UpstreamBalancer::new(&remaining);
    let keys = 10_000;
    let mut moved = 0;
    for n in 0..keys {
        let key = format!("room-{n}");
        let (was, is) = (chosen_url(&before, &key), chosen_url(&after, &key));
        if was == removed {
            moved += 1;
        } else {
            assert_eq!(is, was, "{key} moved although its backend stayed");
        }
    }
    let share = f64::from(moved) / f64::from(keys);
    // About 1/N; the binomial standard deviation is 0.4 %, so 3 % is about 7 sigma.
    assert!((share - 0.2).abs() < 0.03, "moved share {share}");
}

#[test]
fn adding_a_backend_moves_keys_only_onto_it() {
    let fleet = five_backends();
    let added = "ws://chat-6.internal:9000";
    let mut grown = fleet.clone();
    grown.insert(0, backend(added, 1));
    let before = UpstreamBalancer::new(&fleet);
    let after = UpstreamBalancer::new(&grown);
    let keys = 10_000;
    let mut moved = 0;
    for n in 0..keys {
        let key = format!("user:{n}");
        let (was, is) = (chosen_url(&before, &key), chosen_url(&after, &key));
        if is != was {
            assert_eq!(is, added, "{key} moved between old backends");
            moved += 1;
        }
    }
    let share = f64::from(moved) / f64::from(keys);
    assert!((share - 1.0 / 6.0).abs() < 0.03, "moved share {share}");
}

#[test]
fn weight_three_against_one_takes_three_quarters_of_the_keys() {
    let balancer = UpstreamBalancer::new(&[
        backend("ws://light.internal:9000", 1),
        backend("ws://heavy.internal:9000", 3),
    ]);
    let keys = 100_000;
    let heavy = (0..keys)
        .filter(|n| balancer.choose(Some(&format!("k{n}"))) == Some(1))
        .count();
    let share = heavy as f64 / f64::from(keys);
    // The standard deviation is 0.14 %, so 1 % is about 7 sigma.
    assert!((share - 0.75).abs() < 0.01, "heavy share {share}");
}

#[test]
fn an_unhealthy_first_choice_hands_over_to_the_second_and_gets_its_keys_back() {
    let fleet = five_backends();
    let balancer = UpstreamBalancer::new(&fleet);
    for n in 0..100 {
        let key = format!("room-{n}");
        let order = rank(&fleet, &key);
        assert_eq!(balancer.choose(Some(&key)), Some(order[0]));
        balancer.set_healthy(order[0], false);
        assert_eq!(balancer.choose(Some(&key)), Some(order[1]));
        assert_eq!(
            pick(&fleet, &key, |index| index != order[0]),
            Some(order[1])
        );
        balancer.set_healthy(order[0], true);
        assert_eq!(balancer.choose(Some(&key)), Some(order[0]));
    }
}

#[test]
fn keyless_connections_spread_by_least_connections_and_weight() {
    let balancer = UpstreamBalancer::new(&[
        backend("ws://a.internal:1", 1),
        backend("ws://b.internal:1", 1),
        backend("ws://c.internal:1", 2),
    ]);
    let mut slots: Vec<_> = (0..400)
        .map(|_| balancer.choose_and_acquire(None).expect("a backend"))
        .collect();
    assert_eq!(
        (balancer.active(0), balancer.active(1), balancer.active(2)),
        (100, 100, 200)
    );
    // Connections to `a` close: the next ones go to `a` until it has caught up.
    slots.retain(|slot| slot.backend() != 0);
    assert_eq!(balancer.active(0), 0);
    for _ in 0..100 {
        let slot = balancer.choose_and_acquire(None).expect("a backend");
        assert_eq!(slot.backend(), 0);
        slots.push(slot);
    }
    drop(slots);
    assert!((0..3).all(|index| balancer.active(index) == 0));
}

#[test]
fn a_keyless_request_has_no_key_rather_than_an_empty_one() {
    let request = RequestParts {
        path: "/rooms/",
        query: Some("room="),
        headers: &[
            ("X-Room", b"".as_slice()),
            ("Cookie", b"session=".as_slice()),
        ],
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    for sticky in [
        StickyKey::PathSegment {
            pattern: "/rooms/{room}".to_owned(),
            index: 1,
        },
        StickyKey::Query("room".to_owned()),
        StickyKey::Header("x-room".to_owned()),
        StickyKey::Cookie("session".to_owned()),
    ] {
        assert_eq!(extract_key(&sticky, &request), None, "{sticky:?}");
    }
    assert_eq!(
        extract_key(&StickyKey::ClientIp, &request).as_deref(),
        Some("127.0.0.1")
    );
}
