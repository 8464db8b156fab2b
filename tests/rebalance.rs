//! Room-safe rebalancing under load: clients keep sending numbered messages through the
//! gateway (tokio-tungstenite clients and echo backends) while a reload or a health change
//! moves some sticky keys to another backend. Connections whose key moved get 1012, all of a
//! key at one instant, spread over the window; every other connection keeps echoing and loses
//! no message.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use wsgate::server::{Reloader, Server};

const ROOMS: usize = 24;
const PER_ROOM: usize = 2;

fn config(backends: &[SocketAddr], extra: &str) -> wsgate::config::Config {
    let mut yaml =
        String::from("listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends:\n");
    for backend in backends {
        yaml.push_str(&format!("      - ws://{backend}\n"));
    }
    yaml.push_str("routes:\n  - name: rooms\n    upstream: app\n    sticky:\n      query: room\n");
    yaml.push_str(extra);
    wsgate::config::from_yaml_str(&yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"))
}

struct Running {
    addr: SocketAddr,
    reloader: Reloader,
    gateway: Arc<wsgate::gateway::Gateway>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(config: wsgate::config::Config) -> Running {
    let server = Server::bind(config).await.unwrap();
    let addr = server.local_addrs()[0];
    let reloader = server.reloader();
    let gateway = server.gateway();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Running {
        addr,
        reloader,
        gateway,
        _stop: stop,
    }
}

/// What one client saw.
#[derive(Debug)]
struct Outcome {
    room: usize,
    /// The close code and when it arrived, if the gateway closed the connection.
    close: Option<(u16, Instant)>,
    /// Echoes verified, with when each arrived.
    echoes: Vec<Instant>,
    /// A lost, reordered or corrupted echo.
    error: Option<String>,
}

/// A client of `room` and the name of the backend it reached.
async fn client(addr: SocketAddr, room: usize) -> (String, Client) {
    let mut ws = connect(addr, &format!("/chat?room=r{room}")).await;
    ws.send(Message::text("whoami")).await.unwrap();
    let name = next_message(&mut ws).await.into_text().unwrap().to_string();
    (name, ws)
}

/// Sends numbered messages and checks each echo until the gateway closes the connection or
/// `stop` is set.
fn traffic(
    mut ws: Client,
    room: usize,
    index: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Outcome> {
    tokio::spawn(async move {
        let mut outcome = Outcome {
            room,
            close: None,
            echoes: Vec::new(),
            error: None,
        };
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let text = format!("r{room}/{index}/{seq}");
            if ws.send(Message::text(text.clone())).await.is_err() {
                // Only after a close frame, which the read below reports.
                outcome
                    .error
                    .get_or_insert_with(|| format!("send of {text} failed"));
                break;
            }
            let reply = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
            match reply {
                Ok(Some(Ok(Message::Text(echo)))) if echo.as_str() == text => {
                    outcome.echoes.push(Instant::now());
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    outcome.close = Some((code, Instant::now()));
                    return outcome;
                }
                other => {
                    outcome.error = Some(format!("sent {text}, got {other:?}"));
                    return outcome;
                }
            }
            seq += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = ws.close(None).await;
        outcome
    })
}

/// Opens `PER_ROOM` clients in each of `ROOMS` rooms; returns each room's backend name and the
/// running traffic.
async fn rooms_under_load(
    addr: SocketAddr,
    stop: &Arc<AtomicBool>,
) -> (
    HashMap<usize, String>,
    Vec<tokio::task::JoinHandle<Outcome>>,
) {
    let mut owners = HashMap::new();
    let mut tasks = Vec::new();
    for room in 0..ROOMS {
        for index in 0..PER_ROOM {
            let (name, ws) = client(addr, room).await;
            let owner = owners.entry(room).or_insert_with(|| name.clone());
            assert_eq!(*owner, name, "both clients of room r{room} on one backend");
            tasks.push(traffic(ws, room, index, Arc::clone(stop)));
        }
    }
    (owners, tasks)
}

async fn owner_now(addr: SocketAddr, room: usize) -> String {
    backend_name(addr, &format!("/chat?room=r{room}")).await
}

fn rebalanced_metric(gateway: &wsgate::gateway::Gateway) -> u64 {
    let text = gateway.metrics.encode();
    text.lines()
        .find(|l| l.starts_with(r#"wsgate_rebalanced_connections_total{route="rooms"}"#))
        .map_or(0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_moves_only_keys_whose_owner_changed_and_loses_no_message() {
    let (a, b, c) = (
        echo_backend("a").await,
        echo_backend("b").await,
        echo_backend("c").await,
    );
    let window = Duration::from_secs(3);
    let extra = "rebalance:\n  window: 3s\n";
    let running = start(config(&[a.addr, b.addr], extra)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (before, tasks) = rooms_under_load(running.addr, &stop).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let reloaded_at = Instant::now();
    running
        .reloader
        .reload(config(&[a.addr, b.addr, c.addr], extra))
        .unwrap();
    // The window, plus a wide margin for a loaded machine; then a stretch in which the rooms
    // that stayed must still be echoing.
    tokio::time::sleep(window + Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }

    let mut moved_rooms = Vec::new();
    for room in 0..ROOMS {
        let after = owner_now(running.addr, room).await;
        if after != before[&room] {
            assert_eq!(after, "c", "adding a backend moves keys only onto it");
            moved_rooms.push(room);
        }
    }
    assert!(
        !moved_rooms.is_empty() && moved_rooms.len() < ROOMS,
        "some rooms move, some stay: {moved_rooms:?}"
    );

    let mut first_closes = Vec::new();
    for room in 0..ROOMS {
        let members: Vec<&Outcome> = outcomes.iter().filter(|o| o.room == room).collect();
        assert_eq!(members.len(), PER_ROOM);
        if moved_rooms.contains(&room) {
            let closes: Vec<Instant> = members
                .iter()
                .map(|o| match o.close {
                    Some((1012, at)) => at,
                    _ => panic!("room r{room} moved: expected 1012, got {o:?}"),
                })
                .collect();
            let first = *closes.iter().min().unwrap();
            let last = *closes.iter().max().unwrap();
            assert!(first >= reloaded_at, "closed before the reload");
            assert!(
                last - reloaded_at <= window + Duration::from_secs(2),
                "room r{room} closed {:?} after the reload, window {window:?}",
                last - reloaded_at
            );
            // One instant per key: the clients see it within delivery jitter.
            assert!(
                last - first <= Duration::from_millis(700),
                "room r{room} split for {:?}",
                last - first
            );
            first_closes.push(first);
        } else {
            for o in members {
                assert!(
                    o.close.is_none() && o.error.is_none(),
                    "room r{room} did not move but: {o:?}"
                );
                let late = o
                    .echoes
                    .iter()
                    .filter(|at| **at > reloaded_at + window)
                    .count();
                assert!(late > 0, "room r{room} stopped echoing after the reload");
            }
        }
    }
    let echoes: usize = outcomes.iter().map(|o| o.echoes.len()).sum();
    let first = first_closes.iter().min().map(|at| *at - reloaded_at);
    let last = first_closes.iter().max().map(|at| *at - reloaded_at);
    eprintln!(
        "{} of {ROOMS} rooms moved; their closes {first:?}..{last:?} after the reload; {echoes} echoes verified",
        moved_rooms.len()
    );
    // Spread over the window, not all at once (several uniform instants in 3 s).
    if first_closes.len() >= 4 {
        let spread = *first_closes.iter().max().unwrap() - *first_closes.iter().min().unwrap();
        assert!(
            spread >= Duration::from_millis(300),
            "{} keys all closed within {spread:?}",
            first_closes.len()
        );
    }
    assert_eq!(
        rebalanced_metric(&running.gateway),
        (moved_rooms.len() * PER_ROOM) as u64
    );
}

#[tokio::test]
async fn rebalancing_disabled_leaves_every_connection_alone() {
    let (a, b) = (echo_backend("a").await, echo_backend("b").await);
    let extra = "rebalance:\n  enabled: false\n  window: 0\n";
    let running = start(config(&[a.addr], extra)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (_, tasks) = rooms_under_load(running.addr, &stop).await;
    running
        .reloader
        .reload(config(&[a.addr, b.addr], extra))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let outcome = task.await.unwrap();
        assert!(
            outcome.close.is_none() && outcome.error.is_none(),
            "{outcome:?}"
        );
    }
    // The reload did move keys: new connections of some rooms go to b.
    let mut on_b = 0;
    for room in 0..ROOMS {
        on_b += usize::from(owner_now(running.addr, room).await == "b");
    }
    assert!(on_b > 0);
    assert_eq!(rebalanced_metric(&running.gateway), 0);
}

/// An echo backend (tokio-tungstenite, answering `whoami` with its name) that refuses every
/// upgrade with 503 while `up` is false: its health checks fail, its open connections live.
async fn switchable_backend(name: &'static str) -> (SocketAddr, Arc<AtomicBool>) {
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    use tokio_tungstenite::tungstenite::http::StatusCode;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let up = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&up);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let up = flag.load(Ordering::Relaxed);
            tokio::spawn(async move {
                #[allow(clippy::result_large_err)] // tungstenite's callback contract
                let callback = |_: &Request, response: Response| {
                    if up {
                        Ok(response)
                    } else {
                        let mut refusal = ErrorResponse::new(Some("down".into()));
                        *refusal.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        Err(refusal)
                    }
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    let reply = match message {
                        Message::Text(text) if text.as_str() == "whoami" => Message::text(name),
                        Message::Text(_) | Message::Binary(_) => message,
                        _ => continue,
                    };
                    if ws.send(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_down_moves_a_backends_keys_away_and_up_brings_them_back() {
    let (a, a_up) = switchable_backend("a").await;
    let (b, _) = switchable_backend("b").await;
    // Websocket probes: a backend that refuses upgrades is down while its open connections
    // live on.
    let health = "    health_check:\n      kind: websocket\n      interval: 200ms\n      timeout: 1s\n      unhealthy_threshold: 1\n      healthy_threshold: 1\n";
    let mut yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends:\n      - ws://{a}\n      - ws://{b}\n{health}"
    );
    yaml.push_str("routes:\n  - name: rooms\n    upstream: app\n    sticky:\n      query: room\n");
    yaml.push_str("rebalance:\n  window: 1s\n");
    let running = start(wsgate::config::from_yaml_str(&yaml, "t.yaml").unwrap()).await;
    // A verdict, the poll and the window, with a wide margin for a loaded machine.
    let bound = Duration::from_secs(6);

    let stop = Arc::new(AtomicBool::new(false));
    let (owners, tasks) = rooms_under_load(running.addr, &stop).await;
    let on_a: Vec<usize> = (0..ROOMS).filter(|r| owners[r] == "a").collect();
    assert!(!on_a.is_empty() && on_a.len() < ROOMS, "{owners:?}");

    // Down: a's rooms get 1012 and reconnect to b; b's rooms are untouched.
    let down_at = Instant::now();
    a_up.store(false, Ordering::Relaxed);
    tokio::time::sleep(bound).await;
    let mut b_tasks = Vec::new();
    for task in tasks {
        if task.is_finished() {
            let outcome = task.await.unwrap();
            assert!(on_a.contains(&outcome.room), "{outcome:?}");
            let (code, at) = outcome.close.expect("closed by the gateway");
            assert_eq!(code, 1012);
            assert!(at >= down_at && at - down_at <= bound);
        } else {
            b_tasks.push(task);
        }
    }
    assert_eq!(b_tasks.len(), (ROOMS - on_a.len()) * PER_ROOM);
    let back_stop = Arc::new(AtomicBool::new(false));
    let mut moved_back = Vec::new();
    for &room in &on_a {
        for _ in 0..PER_ROOM {
            let (name, ws) = client(running.addr, room).await;
            assert_eq!(name, "b", "room r{room} while a is down");
            moved_back.push(traffic(ws, room, 9, Arc::clone(&back_stop)));
        }
    }

    // Up again: the keys return to a, and so do their connections.
    let up_at = Instant::now();
    a_up.store(true, Ordering::Relaxed);
    tokio::time::sleep(bound).await;
    for task in moved_back {
        let outcome = task.await.unwrap();
        let (code, at) = outcome.close.expect("moved back by the gateway");
        assert_eq!(code, 1012);
        assert!(at >= up_at && at - up_at <= bound);
    }
    for &room in &on_a {
        assert_eq!(owner_now(running.addr, room).await, "a");
    }
    stop.store(true, Ordering::Relaxed);
    for task in b_tasks {
        let outcome = task.await.unwrap();
        assert!(
            outcome.close.is_none() && outcome.error.is_none(),
            "room on b touched: {outcome:?}"
        );
    }
    assert_eq!(
        rebalanced_metric(&running.gateway),
        (on_a.len() * PER_ROOM * 2) as u64
    );
}
