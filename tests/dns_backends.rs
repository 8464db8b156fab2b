//! Backends from DNS: a real dnsmasq serves a hosts file the test edits (SIGHUP re-reads it);
//! the room services (the demo's, on fastwebsockets) listen on distinct loopback addresses
//! with one port, as pods behind a headless Service do. Clients chat in 20 rooms while the
//! set scales from 2 to 3 to 2: rooms whose owner did not change lose nothing and are not
//! touched, moved rooms get 1012 and meet again on their new owner, and no room is split once
//! the rebalance window is over. A failing or empty lookup keeps the last good set.
//!
//! Skips loudly without dnsmasq (fails under `CI=true`).

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::servers::Dnsmasq;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use wsgate::server::{Reloader, Server};

const ROOMS: usize = 20;
const NAME: &str = "rooms.test";
/// The rebalance window: moved rooms close within it.
const WINDOW: Duration = Duration::from_secs(1);
const WAIT: Duration = Duration::from_secs(10);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Three room services on 127.0.0.11-13, one port, named by their address.
async fn room_services() -> (u16, Vec<oneshot::Sender<()>>) {
    'port: for _ in 0..20 {
        let first = TcpListener::bind("127.0.0.11:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for last in [12, 13] {
            match TcpListener::bind(SocketAddr::from(([127, 0, 0, last], port))).await {
                Ok(listener) => listeners.push(listener),
                Err(_) => continue 'port,
            }
        }
        let mut stops = Vec::new();
        for listener in listeners {
            let name = listener.local_addr().unwrap().ip().to_string();
            let (stop, stopped) = oneshot::channel::<()>();
            tokio::spawn(wsgate::demo::room_service::serve(listener, name, async {
                let _ = stopped.await;
            }));
            stops.push(stop);
        }
        return (port, stops);
    }
    panic!("no port free on all of 127.0.0.11-13");
}

fn hosts(addresses: &[u8]) -> String {
    addresses
        .iter()
        .map(|last| format!("127.0.0.{last} {NAME}\n"))
        .collect()
}

struct Running {
    addr: SocketAddr,
    reloader: Reloader,
    _stop: oneshot::Sender<()>,
}

async fn gateway(dns: &Dnsmasq, port: u16) -> Running {
    gateway_looking_up(dns, &format!("url: ws://{NAME}:{port}")).await
}

/// A configuration whose upstream `rooms` looks up `lookup` (`url: ...` or `srv: ...`) at
/// `dns`, at most every `max_interval`.
fn dns_config(dns: &Dnsmasq, lookup: &str, max_interval: &str) -> wsgate::config::Config {
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  rooms:\n    dns:\n      {lookup}\n      resolver: {}\n      min_interval: 100ms\n      max_interval: {max_interval}\n\
         routes:\n  - name: rooms\n    upstream: rooms\n    sticky:\n      path: /rooms/{{room}}\nrebalance:\n  window: {}ms\n",
        dns.addr(),
        WINDOW.as_millis()
    );
    wsgate::config::from_yaml_str(&yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"))
}

/// A gateway whose upstream `rooms` looks up `lookup` at `dns`.
async fn gateway_looking_up(dns: &Dnsmasq, lookup: &str) -> Running {
    let config = dns_config(dns, lookup, "500ms");
    let server = Server::bind(config).await.unwrap();
    let addr = server.local_addrs()[0];
    let reloader = server.reloader();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Running {
        addr,
        reloader,
        _stop: stop,
    }
}

/// The hosts (last octets) of the upstream's backends now.
fn backend_set(reloader: &Reloader) -> Vec<u8> {
    let gateway = reloader.current();
    let mut set: Vec<u8> = gateway.upstreams[0]
        .balancer
        .backends()
        .iter()
        .map(|b| match b.host.parse::<IpAddr>().unwrap() {
            IpAddr::V4(ip) => ip.octets()[3],
            IpAddr::V6(_) => panic!("an IPv6 backend"),
        })
        .collect();
    set.sort_unstable();
    set
}

async fn wait_for_set(reloader: &Reloader, want: &[u8]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while backend_set(reloader) != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backends {:?}, expected {want:?}",
            backend_set(reloader)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Where the gateway would place each room now.
fn owners(reloader: &Reloader) -> Vec<String> {
    let gateway = reloader.current();
    let balancer = &gateway.upstreams[0].balancer;
    (0..ROOMS)
        .map(|room| {
            let index = balancer.choose(Some(&format!("r{room}"))).unwrap();
            balancer.backends()[index].host.clone()
        })
        .collect()
}

/// What one room's pair of members saw.
#[derive(Debug, Default, Clone)]
struct RoomLog {
    /// Closes of a member's connection, by code (1006 for none).
    closes: Vec<u16>,
    /// The servers the two members reached at each (re)join.
    joins: Vec<(String, String)>,
    /// Messages bob missed or got out of order while both stayed connected.
    lost: Vec<String>,
    /// Messages alice sent and bob received on the current connections.
    sent: u64,
    received: u64,
}

async fn connect(gateway: SocketAddr, room: usize, user: &str) -> (Ws, String) {
    let url = format!("ws://{gateway}/rooms/r{room}?user={user}");
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("connect");
    let history = loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("history in time")
            .expect("open")
            .expect("read");
        if let Message::Text(text) = message {
            break serde_json::from_str::<Value>(&text).unwrap();
        }
    };
    assert_eq!(history["type"], "history", "{history}");
    (ws, history["server"].as_str().unwrap().to_owned())
}

fn close_code(frame: Option<CloseFrame>) -> u16 {
    frame.map_or(1005, |f| u16::from(f.code))
}

/// Alice sends a numbered message every 20 ms, bob checks each arrives once and in order;
/// when either connection is closed both rejoin. Until `stop`, then bob must have all.
async fn chat(
    gateway: SocketAddr,
    room: usize,
    mut stop: watch::Receiver<bool>,
    log: Arc<Mutex<RoomLog>>,
) {
    loop {
        let (mut alice, at_a) = connect(gateway, room, "alice").await;
        let (mut bob, at_b) = connect(gateway, room, "bob").await;
        {
            let mut log = log.lock().unwrap();
            log.joins.push((at_a, at_b));
            log.sent = 0;
            log.received = 0;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut stopping = false;
        let closed = loop {
            tokio::select! {
                _ = tick.tick(), if !stopping => {
                    let n = log.lock().unwrap().sent;
                    let text = json!({"type": "message", "text": n.to_string()}).to_string();
                    if alice.send(Message::text(text)).await.is_err() {
                        continue;
                    }
                    log.lock().unwrap().sent = n + 1;
                }
                _ = stop.changed(), if !stopping => {
                    stopping = true;
                    let log = log.lock().unwrap();
                    if log.received == log.sent {
                        return;
                    }
                }
                () = tokio::time::sleep(WAIT), if stopping => {
                    let mut log = log.lock().unwrap();
                    let missing = format!("{} of {} never arrived", log.sent - log.received, log.sent);
                    log.lost.push(missing);
                    return;
                }
                message = alice.next() => match message {
                    Some(Ok(Message::Close(frame))) => break close_code(frame),
                    Some(Ok(_)) => {}
                    _ => break 1006,
                },
                message = bob.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        let event: Value = serde_json::from_str(&text).unwrap();
                        if event["type"] != "message" || event["user"] != "alice" {
                            continue;
                        }
                        let mut log = log.lock().unwrap();
                        let expected = log.received.to_string();
                        if event["text"] != expected.as_str() {
                            let got = event["text"].clone();
                            log.lost.push(format!("expected {expected}, got {got}"));
                        }
                        log.received += 1;
                        if stopping && log.received == log.sent {
                            return;
                        }
                    }
                    Some(Ok(Message::Close(frame))) => break close_code(frame),
                    Some(Ok(_)) => {}
                    _ => break 1006,
                },
            }
        };
        log.lock().unwrap().closes.push(closed);
        if stopping {
            log.lock()
                .unwrap()
                .lost
                .push(format!("closed with {closed} while stopping"));
            return;
        }
    }
}

fn snapshot(logs: &[Arc<Mutex<RoomLog>>]) -> Vec<RoomLog> {
    logs.iter().map(|log| log.lock().unwrap().clone()).collect()
}

/// Checks a change of the backend set: rooms whose owner changed were closed with 1012 (and
/// nothing else) and met again on their new owner; the others were not touched.
fn check_change(
    what: &str,
    before: &[RoomLog],
    after: &[RoomLog],
    owners_before: &[String],
    owners_after: &[String],
) {
    let mut moved = 0;
    for room in 0..ROOMS {
        let closes = &after[room].closes[before[room].closes.len()..];
        let (a, b) = after[room].joins.last().unwrap();
        if owners_before[room] == owners_after[room] {
            assert!(
                closes.is_empty(),
                "{what}: room r{room} did not move but was closed: {closes:?}"
            );
        } else {
            moved += 1;
            assert!(
                !closes.is_empty(),
                "{what}: room r{room} moved from {} to {} but was not closed",
                owners_before[room],
                owners_after[room]
            );
            assert!(
                closes.iter().all(|&c| c == 1012),
                "{what}: room r{room} closed with {closes:?}"
            );
        }
        assert_eq!(
            (a, b),
            (&owners_after[room], &owners_after[room]),
            "{what}: room r{room} is whole on its owner"
        );
        assert!(
            after[room].lost.is_empty(),
            "{what}: room r{room} lost messages: {:?}",
            after[room].lost
        );
    }
    println!("{what}: {moved} of {ROOMS} rooms moved");
    assert!(
        moved > 0,
        "{what}: some room moved (owners {owners_before:?} -> {owners_after:?})"
    );
}

/// Waits for the rebalance window and the rejoins after it.
async fn settle() {
    tokio::time::sleep(WINDOW + Duration::from_millis(1500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_the_dns_answer_moves_only_rooms_whose_owner_changed() {
    let Some(dns) = Dnsmasq::start(&hosts(&[11, 12])) else {
        return;
    };
    let (port, _services) = room_services().await;
    let gateway = gateway(&dns, port).await;
    let reloader = &gateway.reloader;
    assert_eq!(backend_set(reloader), [11, 12], "resolved before serving");

    let (stop, stopped) = watch::channel(false);
    let logs: Vec<Arc<Mutex<RoomLog>>> = (0..ROOMS).map(|_| Arc::default()).collect();
    let chats: Vec<_> = logs
        .iter()
        .enumerate()
        .map(|(room, log)| tokio::spawn(chat(gateway.addr, room, stopped.clone(), Arc::clone(log))))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = snapshot(&logs);
    let owners_two = owners(reloader);
    for (room, log) in start.iter().enumerate() {
        assert_eq!(
            log.joins,
            [(owners_two[room].clone(), owners_two[room].clone())]
        );
    }

    // 2 -> 3.
    dns.set_hosts(&hosts(&[11, 12, 13]));
    dns.reload();
    wait_for_set(reloader, &[11, 12, 13]).await;
    let owners_three = owners(reloader);
    settle().await;
    let grown = snapshot(&logs);
    check_change("2 -> 3", &start, &grown, &owners_two, &owners_three);

    // 3 -> 2, another one leaving than the one that came.
    dns.set_hosts(&hosts(&[12, 13]));
    dns.reload();
    wait_for_set(reloader, &[12, 13]).await;
    let owners_back = owners(reloader);
    settle().await;
    let shrunk = snapshot(&logs);
    check_change("3 -> 2", &grown, &shrunk, &owners_three, &owners_back);

    stop.send(true).unwrap();
    for chat in chats {
        tokio::time::timeout(WAIT * 2, chat)
            .await
            .expect("chat ends")
            .unwrap();
    }
    for (room, log) in snapshot(&logs).iter().enumerate() {
        assert!(log.lost.is_empty(), "room r{room}: {:?}", log.lost);
        assert!(log.received > 0, "room r{room} chatted to the end");
    }
}

fn lookups(reloader: &Reloader, result: &str) -> u64 {
    let text = reloader.current().metrics.encode();
    let prefix = format!(r#"wsgate_dns_lookups_total{{upstream="rooms",result="{result}"}}"#);
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .map_or(0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

async fn wait_for_lookups(reloader: &Reloader, results: &[&str]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while results.iter().map(|r| lookups(reloader, r)).sum::<u64>() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no lookup counted as {results:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_failing_or_empty_lookup_keeps_the_last_good_set() {
    let Some(mut dns) = Dnsmasq::start(&hosts(&[11, 12])) else {
        return;
    };
    let (port, _services) = room_services().await;
    let gateway = gateway(&dns, port).await;
    let reloader = &gateway.reloader;
    assert_eq!(backend_set(reloader), [11, 12]);
    let (mut member, at) = connect(gateway.addr, 0, "alice").await;
    let owner = owners(reloader)[0].clone();
    assert_eq!(at, owner);

    // The name disappears from DNS: nothing changes.
    dns.set_hosts("127.0.0.13 other.test\n");
    dns.reload();
    wait_for_lookups(reloader, &["empty", "failed"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        backend_set(reloader),
        [11, 12],
        "an empty answer keeps the set"
    );

    // The DNS server is gone: nothing changes either.
    dns.stop();
    let before = lookups(reloader, "failed");
    let deadline = tokio::time::Instant::now() + WAIT;
    while lookups(reloader, "failed") == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a failed lookup is counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        backend_set(reloader),
        [11, 12],
        "a failed lookup keeps the set"
    );
    assert_eq!(lookups(reloader, "changed"), 0);

    // The member was never moved and new members still meet it.
    let (mut other, at) = connect(gateway.addr, 0, "bob").await;
    assert_eq!(at, owner);
    member
        .send(Message::text(
            json!({"type": "message", "text": "still here"}).to_string(),
        ))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let message = tokio::time::timeout_at(deadline, other.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(text) = message {
            let event: Value = serde_json::from_str(&text).unwrap();
            if event["type"] == "message" {
                assert_eq!(event["text"], "still here");
                break;
            }
        }
    }
}

#[tokio::test]
async fn an_upstream_unresolved_at_start_is_filled_by_the_first_answer() {
    let Some(dns) = Dnsmasq::start("127.0.0.13 other.test\n") else {
        return;
    };
    let (port, _services) = room_services().await;
    let gateway = gateway(&dns, port).await;
    let reloader = &gateway.reloader;
    assert_eq!(
        backend_set(reloader),
        Vec::<u8>::new(),
        "nothing to start with"
    );
    let refused = support::raw_exchange(
        gateway.addr,
        support::upgrade_request("/rooms/r0?user=alice", "").as_bytes(),
    )
    .await;
    assert!(
        refused.starts_with(b"HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&refused)
    );

    dns.set_hosts(&hosts(&[12]));
    dns.reload();
    wait_for_set(reloader, &[12]).await;
    let (_member, at) = connect(gateway.addr, 0, "alice").await;
    assert_eq!(at, "127.0.0.12");
}

#[tokio::test]
async fn srv_records_give_ports_weights_and_the_preferred_priority() {
    let (port, _services) = room_services().await;
    // _rooms._tcp.rooms.test: a and b at priority 0 (weights 1 and 3), c at priority 1 (a
    // fallback, not used while the others are in the answer).
    let srv = |target: &str, priority: u16, weight: u16| {
        format!("--srv-host=_rooms._tcp.{NAME},{target}.{NAME},{port},{priority},{weight}")
    };
    let options = [srv("a", 0, 1), srv("b", 0, 3), srv("c", 1, 1)];
    let records = format!("127.0.0.11 a.{NAME}\n127.0.0.12 b.{NAME}\n127.0.0.13 c.{NAME}\n");
    let Some(dns) = Dnsmasq::start_with(&records, &options) else {
        return;
    };
    let gateway = gateway_looking_up(&dns, &format!("srv: ws://_rooms._tcp.{NAME}")).await;
    let reloader = &gateway.reloader;
    assert_eq!(backend_set(reloader), [11, 12]);
    let current = reloader.current();
    let backends = current.upstreams[0].balancer.backends();
    let found: Vec<(&str, u16, u32)> = backends
        .iter()
        .map(|b| (b.host.as_str(), b.port, b.weight))
        .collect();
    assert_eq!(found, [("127.0.0.11", port, 1), ("127.0.0.12", port, 3)]);
    assert_eq!(backends[0].url, format!("ws://127.0.0.11:{port}"));
    let (_member, at) = connect(gateway.addr, 0, "alice").await;
    assert_eq!(at, owners(reloader)[0]);
}

#[tokio::test]
async fn a_reload_of_the_file_keeps_what_dns_answered() {
    let Some(dns) = Dnsmasq::start(&hosts(&[11, 12])) else {
        return;
    };
    let (port, _services) = room_services().await;
    let gateway = gateway(&dns, port).await;
    let reloader = &gateway.reloader;
    assert_eq!(backend_set(reloader), [11, 12]);
    let lookup = format!("url: ws://{NAME}:{port}");
    // The same question with other intervals: the answer stays, from the first instant.
    reloader.reload(dns_config(&dns, &lookup, "2s")).unwrap();
    assert_eq!(backend_set(reloader), [11, 12]);
    // Another question (another port): empty until its own answer, which comes at once.
    let other_port = port.checked_add(1).unwrap_or(port - 1);
    let other = format!("url: ws://{NAME}:{other_port}");
    reloader.reload(dns_config(&dns, &other, "2s")).unwrap();
    assert_eq!(backend_set(reloader), Vec::<u8>::new());
    wait_for_set(reloader, &[11, 12]).await;
    let ports: Vec<u16> = reloader.current().upstreams[0]
        .balancer
        .backends()
        .iter()
        .map(|b| b.port)
        .collect();
    assert_eq!(ports, [other_port, other_port]);
}
