//! Backend health end to end: real gateways on 127.0.0.1 in front of tokio-tungstenite echo
//! backends that can be stopped and started again on the same port.
//!
//! Covers the active tcp check (a stopped backend is taken out, its sticky keys move to their
//! next choice while other keys stay, and come back with it), the active websocket check (a
//! backend that accepts TCP but refuses the upgrade is taken out; a healthy one sees the
//! probe's path and a 1000 close), and passive checks on both the WebSocket and the plain-HTTP
//! path (a failed connect takes the backend out at once, the back-off ends in a new try, and
//! a backend that is back gets its keys again).
//!
//! Every wait is bounded and polls with a deadline; nothing sleeps for readiness; ports come
//! from the OS (a comeback re-binds the port its backend had).

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/http_backend.rs"]
mod http_backend;
#[path = "support/routing_client.rs"]
mod routing_client;

use futures_util::{SinkExt, StreamExt};
use routing_client::*;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use wsgate::gateway::Gateway;
use wsgate::routing::{UpstreamBalancer, rank};
use wsgate::server::Server;

/// Bound on waiting for a health transition: many check intervals, for a busy machine.
const TRANSITION: Duration = Duration::from_secs(15);

/// What an echo backend saw: each upgrade's path and User-Agent, and each close code
/// received with the path of its connection.
#[derive(Debug, Default)]
struct Seen {
    requests: Vec<(String, Option<String>)>,
    closes: Vec<(String, u16)>,
}

/// A tokio-tungstenite echo backend answering `whoami` with its name, which can be stopped
/// (listener and every connection gone) and started again on the same address.
struct EchoBackend {
    addr: SocketAddr,
    name: String,
    seen: Arc<Mutex<Seen>>,
    task: Option<JoinHandle<()>>,
}

impl EchoBackend {
    async fn start(name: &str) -> Self {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_on(name: &str, addr: SocketAddr) -> Self {
        let listener = bind(addr);
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let task = tokio::spawn(serve(listener, name.to_owned(), Arc::clone(&seen)));
        Self {
            addr,
            name: name.to_owned(),
            seen,
            task: Some(task),
        }
    }

    /// Closes the listener and every connection; returns once they are gone.
    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    async fn restart(&mut self) {
        self.stop().await;
        *self = Self::start_on(&self.name, self.addr).await;
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A listener on `addr`, with SO_REUSEADDR so a port whose last connections linger in
/// TIME_WAIT can be bound again.
fn bind(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket
        .bind(addr)
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    socket.listen(128).unwrap()
}

async fn serve(listener: TcpListener, name: String, seen: Arc<Mutex<Seen>>) {
    // Owned here, so aborting the accept task also ends every connection.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        connections.spawn(echo(stream, name.clone(), Arc::clone(&seen)));
        while connections.try_join_next().is_some() {}
    }
}

async fn echo(stream: TcpStream, name: String, seen: Arc<Mutex<Seen>>) {
    let mut path = String::new();
    #[allow(clippy::result_large_err)] // the signature is tungstenite's callback contract
    let record = |request: &Request, response: Response| {
        let agent = request
            .headers()
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        path = request.uri().to_string();
        seen.lock().unwrap().requests.push((path.clone(), agent));
        Ok(response)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await else {
        return;
    };
    while let Some(Ok(message)) = ws.next().await {
        let reply = match message {
            Message::Text(text) if text.as_str() == "whoami" => Message::text(name.clone()),
            Message::Text(_) | Message::Binary(_) => message,
            Message::Close(frame) => {
                let code = frame.map_or(1005, |f| u16::from(f.code));
                seen.lock().unwrap().closes.push((path.clone(), code));
                continue;
            }
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            return;
        }
    }
}

/// A backend that accepts TCP connections and answers every request with 503.
async fn refusing_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    addr
}

/// An address nothing listens on (yet): a port the OS handed out, closed again.
async fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A gateway that keeps a handle on its shared state, to read the balancer's health.
struct Running {
    addr: SocketAddr,
    gateway: Arc<Gateway>,
    _stop: oneshot::Sender<()>,
}

impl Running {
    fn balancer(&self) -> &UpstreamBalancer {
        &self.gateway.upstreams[0].balancer
    }
}

/// One upstream `app` with `backends` (and `upstream` spliced in at upstream-key
/// indentation), one route sticky on `?room=`.
async fn start(backends: &[SocketAddr], upstream: &str) -> Running {
    let mut yaml =
        String::from("listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends:\n");
    for backend in backends {
        yaml.push_str(&format!("      - ws://{backend}\n"));
    }
    for line in upstream.lines() {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml.push_str("routes:\n  - upstream: app\n    sticky: {query: room}\n");
    let config =
        wsgate::config::from_yaml_str(&yaml, "health.yaml").unwrap_or_else(|e| panic!("{e}"));
    let server = Server::bind(config).await.expect("gateway binds");
    let addr = server.local_addrs()[0];
    let gateway = server.gateway();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Running {
        addr,
        gateway,
        _stop: stop,
    }
}

/// Polls `condition` until it holds, failing after [`TRANSITION`]; returns the time taken.
async fn until(what: &str, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < TRANSITION,
            "{what}: not within {TRANSITION:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

fn url(room: &str) -> String {
    format!("ws://gateway.test/chat?room={room}")
}

/// The backend `room` reaches through the gateway.
async fn backend_of(gateway: &Running, room: &str) -> String {
    backend_via(gateway.addr, &url(room), &[]).await
}

/// Rooms and their backend preference order (best first), from the frozen ranking.
fn rooms(balancer: &UpstreamBalancer, count: usize) -> Vec<(String, Vec<usize>)> {
    (0..count)
        .map(|n| {
            let room = format!("room-{n}");
            let order = rank(balancer.backends(), &room);
            (room, order)
        })
        .collect()
}

#[tokio::test]
async fn active_tcp_check_moves_the_keys_of_a_stopped_backend_and_brings_them_back() {
    let mut backends = Vec::new();
    for n in 0..3 {
        backends.push(EchoBackend::start(&format!("b{n}")).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let gateway = start(
        &addrs,
        "health_check: {kind: tcp, interval: 100ms, timeout: 1s, unhealthy_threshold: 2, healthy_threshold: 1}\npassive_health: off",
    )
    .await;
    let balancer = gateway.balancer();
    let rooms = rooms(balancer, 24);
    let name = |index: usize| format!("b{index}");
    for (room, order) in &rooms {
        assert_eq!(backend_of(&gateway, room).await, name(order[0]), "{room}");
    }

    let victim = rooms[0].1[0];
    backends[victim].stop().await;
    let took = until("the stopped backend is marked down", || {
        !balancer.is_healthy(victim)
    })
    .await;
    // Two failed probes 100 ms apart; the bound is loose for a busy machine.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(balancer.checks_down(victim));
    let (_, why) = balancer.last_change(victim).expect("the change is noted");
    assert!(
        why.contains("down") && why.contains("cannot connect"),
        "{why}"
    );
    for index in (0..3).filter(|&i| i != victim) {
        assert!(balancer.is_healthy(index), "b{index} stays up");
    }
    let mut moved = 0;
    for (room, order) in &rooms {
        let expected = if order[0] == victim {
            moved += 1;
            order[1]
        } else {
            order[0]
        };
        assert_eq!(backend_of(&gateway, room).await, name(expected), "{room}");
    }
    assert!(moved > 0);

    backends[victim].restart().await;
    until("the restarted backend is marked up", || {
        balancer.is_healthy(victim)
    })
    .await;
    for (room, order) in &rooms {
        assert_eq!(backend_of(&gateway, room).await, name(order[0]), "{room}");
    }
}

#[tokio::test]
async fn websocket_check_takes_out_a_backend_that_refuses_the_upgrade() {
    let good = EchoBackend::start("good").await;
    let refusing = refusing_backend().await;
    let gateway = start(
        &[good.addr, refusing],
        "health_check: {kind: websocket, path: /health?probe=1, interval: 100ms, timeout: 1s}\npassive_health: off",
    )
    .await;
    let balancer = gateway.balancer();
    until("the refusing backend is marked down", || {
        !balancer.is_healthy(1)
    })
    .await;
    let (_, why) = balancer.last_change(1).expect("the change is noted");
    assert!(why.contains("503"), "{why}");
    assert!(balancer.is_healthy(0));

    // Key-less connections all go to the one healthy backend.
    for _ in 0..4 {
        let name = backend_via(gateway.addr, "ws://gateway.test/chat", &[]).await;
        assert_eq!(name, "good");
    }
    // The healthy backend saw the probe on its path, and each probe closed with 1000.
    let probe = "/health?probe=1";
    until("a probe closed", || {
        let seen = good.seen.lock().unwrap();
        seen.closes.iter().any(|(path, _)| path == probe)
    })
    .await;
    let seen = good.seen.lock().unwrap();
    assert!(
        seen.requests
            .iter()
            .any(|(path, agent)| path == probe && agent.as_deref() == Some("wsgate-health-check")),
        "{seen:?}"
    );
    let probe_codes: Vec<u16> = seen
        .closes
        .iter()
        .filter(|(path, _)| path == probe)
        .map(|&(_, code)| code)
        .collect();
    assert!(probe_codes.iter().all(|&code| code == 1000), "{seen:?}");
}

#[tokio::test]
async fn passive_check_moves_a_key_after_one_failed_connect_and_retries_after_the_backoff() {
    let live = [
        EchoBackend::start("live0").await,
        EchoBackend::start("live1").await,
    ];
    let dead = free_addr().await;
    let gateway = start(
        &[live[0].addr, live[1].addr, dead],
        "connect_timeout: 2s\npassive_health: {backoff: 1s, max_backoff: 4s}",
    )
    .await;
    let balancer = gateway.balancer();
    let name = |index: usize| format!("live{index}");
    let (room, order) = rooms(balancer, 64)
        .into_iter()
        .find(|(_, order)| order[0] == 2)
        .expect("some room prefers the dead backend");

    // The first connection finds the dead backend, is retried on the key's next choice,
    // and the dead one is taken out: the next connection does not try it at all.
    assert_eq!(backend_of(&gateway, &room).await, name(order[1]));
    assert!(balancer.in_backoff(2) && !balancer.is_healthy(2));
    assert_eq!(balancer.connect_failures(2), 1);
    assert_eq!(backend_of(&gateway, &room).await, name(order[1]));
    assert_eq!(balancer.connect_failures(2), 1);

    // After the back-off the dead backend is tried again, fails again, and backs off longer.
    until("the back-off ends", || balancer.is_healthy(2)).await;
    assert_eq!(backend_of(&gateway, &room).await, name(order[1]));
    assert_eq!(balancer.connect_failures(2), 2);
    assert!(!balancer.is_healthy(2));

    // Once it is back, the key returns at the end of the back-off and the doubling resets.
    let _back = EchoBackend::start_on("back", dead).await;
    eventually("the key returns to its first choice", || async {
        match try_open(gateway.addr, &url(&room), &[]).await {
            Ok((mut ws, _)) => {
                let name = whoami(&mut ws).await;
                close(ws).await;
                (name == "back").then_some(())
            }
            Err(_) => None,
        }
    })
    .await;
    assert_eq!(balancer.connect_failures(2), 0);
    assert!(balancer.is_healthy(2));
}

#[tokio::test]
async fn passive_check_covers_plain_http_requests() {
    let live = http_backend::http_backend("http-live").await;
    let dead = free_addr().await;
    let gateway = start(&[live.addr, dead], "passive_health: {backoff: 30s}").await;
    let balancer = gateway.balancer();
    let (room, order) = rooms(balancer, 64)
        .into_iter()
        .find(|(_, order)| order[0] == 1)
        .expect("some room prefers the dead backend");
    assert_eq!(order[1], 0);
    let request = format!(
        "GET /page?room={room} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n"
    );

    // The dead backend is found, taken out, and the request retried on the next choice.
    let retried = exchange(gateway.addr, request.as_bytes()).await;
    assert_eq!(retried.status, 200, "{}", retried.raw);
    assert_eq!(retried.header("x-backend"), Some("http-live"));
    assert!(!balancer.is_healthy(1));
    assert_eq!(balancer.connect_failures(1), 1);
    let served = exchange(gateway.addr, request.as_bytes()).await;
    assert_eq!(served.status, 200, "{}", served.raw);
    assert_eq!(served.header("x-backend"), Some("http-live"));
}
