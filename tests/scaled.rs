//! The room service scaled out with real servers: `room-service` processes sharing rooms through
//! a real redis-server and history through a real PostgreSQL, one test behind a real wsgate.
//! Clients are tokio-tungstenite; the service speaks fastwebsockets.
//!
//! The servers are started by `support::servers` on free loopback ports; without the programs
//! the tests skip loudly, and fail under `CI=true`.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::servers::{Postgres, Redis, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

/// Bound on every wait for something that should happen.
const WAIT: Duration = Duration::from_secs(15);

type Ws = support::Client;

/// A `room-service` process.
struct Service {
    name: String,
    addr: SocketAddr,
    child: Child,
}

impl Service {
    async fn start(name: &str, broker: Option<&str>, history: Option<&str>) -> Service {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut command = Command::new(env!("CARGO_BIN_EXE_room-service"));
        command
            .args(["--listen", &addr.to_string(), "--name", name])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        if let Some(url) = broker {
            command.args(["--broker", url]);
        }
        if let Some(url) = history {
            command.args(["--history", url]);
        }
        let child = command.spawn().expect("room-service starts");
        let service = Service {
            name: name.to_owned(),
            addr,
            child,
        };
        // Ready once its links are: a room shared before the subscription is up would miss
        // events, which is the documented outage behaviour, not what these tests are about.
        service
            .wait_stats("the room service is ready", |stats| {
                (broker.is_none() || stats["broker"] == "up")
                    && (history.is_none() || stats["history"] == "up")
            })
            .await;
        service
    }

    /// The counters of `/stats`, or `None` while it does not answer.
    async fn stats(&self) -> Option<Value> {
        let mut stream = TcpStream::connect(self.addr).await.ok()?;
        let request = "GET /stats HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        timeout(WAIT, stream.read_to_string(&mut response))
            .await
            .ok()?
            .ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then_some(())?;
        serde_json::from_str(body).ok()
    }

    async fn wait_stats(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(stats) = self.stats().await
                && check(&stats)
            {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {what}: last stats {:?}",
                self.name,
                self.stats().await
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, as a process manager stops it, and waits for it to exit.
    async fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + WAIT;
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            assert!(Instant::now() < deadline, "{} did not stop", self.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn recv(ws: &mut Ws) -> Value {
    match support::next_message(ws).await {
        Message::Text(text) => serde_json::from_str(&text).expect("JSON"),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// The next event of one of `kinds`, skipping others.
async fn next_of(ws: &mut Ws, kinds: &[&str]) -> Value {
    loop {
        let event = recv(ws).await;
        if kinds.contains(&event["type"].as_str().unwrap_or_default()) {
            return event;
        }
    }
}

/// Nothing but notices arrive on `ws` for `quiet`.
async fn assert_no_message(ws: &mut Ws, quiet: Duration) {
    let deadline = Instant::now() + quiet;
    while let Ok(next) = tokio::time::timeout_at(deadline, ws.next()).await {
        if let Some(Ok(Message::Text(text))) = next {
            let event: Value = serde_json::from_str(&text).unwrap();
            assert!(
                matches!(event["type"].as_str(), Some("joined" | "left")),
                "unexpected {event}"
            );
        } else {
            panic!("connection ended: {next:?}");
        }
    }
}

async fn say(ws: &mut Ws, text: &str) {
    let event = json!({"type": "message", "text": text}).to_string();
    ws.send(Message::text(event)).await.unwrap();
}

/// Joins `room` as `user` at `addr`; returns the socket and its history event.
async fn join(addr: SocketAddr, room: &str, user: &str) -> (Ws, Value) {
    let mut ws = support::connect(addr, &format!("/rooms/{room}?user={user}")).await;
    let history = recv(&mut ws).await;
    assert_eq!(history["type"], "history", "{history}");
    (ws, history)
}

fn texts(history: &Value) -> Vec<String> {
    history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_room_services_behind_wsgate_share_a_room_through_redis() {
    let Some(redis) = Redis::start() else { return };
    let url = redis.url();
    let a = Service::start("a", Some(&url), None).await;
    let b = Service::start("b", Some(&url), None).await;
    // No sticky key: the gateway spreads the room's members over both instances.
    let gateway = support::start_gateway(&support::simple_config(&[a.addr, b.addr], "")).await;

    const CLIENTS: usize = 4;
    const MESSAGES: usize = 25;
    let mut clients = Vec::new();
    let mut placed = BTreeSet::new();
    for i in 0..CLIENTS {
        let (ws, history) = join(gateway.addr, "lobby", &format!("u{i}")).await;
        placed.insert(history["server"].as_str().unwrap().to_owned());
        clients.push(ws);
    }
    assert_eq!(
        placed,
        BTreeSet::from(["a".to_owned(), "b".to_owned()]),
        "members on both instances"
    );

    // Everyone talks at once; each reads until it has every other member's messages and
    // their closing "done", checking order per sender and that nothing comes twice.
    let mut tasks = Vec::new();
    for (i, mut ws) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for k in 0..MESSAGES {
                say(&mut ws, &format!("u{i}:{k}")).await;
            }
            say(&mut ws, &format!("u{i}:done")).await;
            let mut next = BTreeMap::new();
            let mut acks = 0;
            let mut done = 0;
            while done < CLIENTS - 1 || acks < MESSAGES + 1 {
                let event = next_of(&mut ws, &["message", "sent"]).await;
                if event["type"] == "sent" {
                    acks += 1;
                    continue;
                }
                let text = event["text"].as_str().unwrap();
                let (sender, k) = text.split_once(':').unwrap();
                assert_ne!(sender, format!("u{i}"), "u{i} got its own message back");
                let expected = next.entry(sender.to_owned()).or_insert(0);
                if k == "done" {
                    assert_eq!(*expected, MESSAGES, "u{i}: {sender} done early");
                    done += 1;
                    *expected = usize::MAX;
                } else {
                    assert_eq!(k.parse::<usize>().unwrap(), *expected, "u{i}: {text}");
                    *expected += 1;
                }
            }
            // A duplicate, had there been one, would follow its original closely.
            assert_no_message(&mut ws, Duration::from_millis(300)).await;
            ws
        }));
    }
    let mut members = Vec::new();
    for task in tasks {
        // Kept open: a member leaving now would publish a notice while the counters are read.
        members.push(
            timeout(WAIT * 2, task)
                .await
                .expect("every member got every message")
                .unwrap(),
        );
    }
    // Each instance delivered exactly what the other published: no echo of its own.
    let a_stats = a.stats().await.unwrap();
    let b_stats = b.stats().await.unwrap();
    assert_eq!(a_stats["broker_received"], b_stats["broker_published"]);
    assert_eq!(b_stats["broker_received"], a_stats["broker_published"]);
    assert_eq!(a_stats["broker_lost"], 0);
    assert_eq!(b_stats["broker_lost"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_comes_from_postgres_after_every_room_service_restarts() {
    let Some(pg) = Postgres::start() else { return };
    let url = pg.url();
    let a = Service::start("a", None, Some(&url)).await;
    let b = Service::start("b", None, Some(&url)).await;

    let (mut alice, _) = join(a.addr, "H", "alice").await;
    for k in 0..30 {
        say(&mut alice, &format!("a{k}")).await;
    }
    for _ in 0..30 {
        next_of(&mut alice, &["sent"]).await;
    }
    a.wait_stats("alice's messages written", |s| s["history_written"] == 30)
        .await;
    let (mut bob, history) = join(b.addr, "H", "bob").await;
    assert_eq!(texts(&history).len(), 30, "b reads what a wrote");
    for k in 0..30 {
        say(&mut bob, &format!("b{k}")).await;
    }
    for _ in 0..30 {
        next_of(&mut bob, &["sent"]).await;
    }
    // No waiting for b's writes: stopping flushes them.
    drop((alice, bob));
    a.stop().await;
    b.stop().await;

    let expected: Vec<String> = (10..30)
        .map(|k| format!("a{k}"))
        .chain((0..30).map(|k| format!("b{k}")))
        .collect();
    let a = Service::start("a2", None, Some(&url)).await;
    let b = Service::start("b2", None, Some(&url)).await;
    for service in [&a, &b] {
        let (_ws, history) = join(service.addr, "H", "carol").await;
        assert_eq!(texts(&history), expected, "on {}", service.name);
        let first = &history["messages"][0];
        assert_eq!(
            (&first["user"], &first["server"]),
            (&json!("alice"), &json!("a"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_during_chat_loses_only_what_was_sent_while_it_was_down() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let url = redis.url();
    let mut a = Service::start("a", Some(&url), None).await;
    let mut b = Service::start("b", Some(&url), None).await;
    let (mut alice, _) = join(a.addr, "R", "alice").await;
    let (mut carol, _) = join(a.addr, "R", "carol").await;
    let (mut bob, _) = join(b.addr, "R", "bob").await;

    say(&mut alice, "before").await;
    assert_eq!(next_of(&mut bob, &["message"]).await["text"], "before");
    assert_eq!(next_of(&mut carol, &["message"]).await["text"], "before");

    redis.stop();
    for service in [&a, &b] {
        service
            .wait_stats("the broker is seen down", |s| s["broker"] == "down")
            .await;
    }
    say(&mut alice, "during").await;
    // Members on the sender's instance still get it; bob, on the other one, does not (below).
    assert_eq!(next_of(&mut carol, &["message"]).await["text"], "during");
    a.wait_stats("the lost event is counted", |s| s["broker_lost"] != 0)
        .await;
    assert!(a.alive() && b.alive(), "no crash");

    redis.resume();
    for service in [&a, &b] {
        service
            .wait_stats("resubscribed by itself", |s| {
                s["broker"] == "up" && s["broker_subscriptions"] == 2
            })
            .await;
    }
    say(&mut alice, "after").await;
    assert_eq!(next_of(&mut bob, &["message"]).await["text"], "after");
    assert_eq!(next_of(&mut carol, &["message"]).await["text"], "after");
    say(&mut bob, "welcome back").await;
    assert_eq!(
        next_of(&mut alice, &["message"]).await["text"],
        "welcome back"
    );
    assert!(a.alive() && b.alive(), "no crash");
}

/// A Redis that stops answering without closing its connections (frozen) is noticed by the
/// subscription's ping, and the instances resubscribe once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_redis_is_noticed_and_the_subscription_renewed() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let url = redis.url();
    let a = Service::start("a", Some(&url), None).await;
    let b = Service::start("b", Some(&url), None).await;
    let (mut alice, _) = join(a.addr, "S", "alice").await;
    let (mut bob, _) = join(b.addr, "S", "bob").await;

    redis.freeze();
    for service in [&a, &b] {
        service
            .wait_stats("the silent broker is seen down", |s| s["broker"] == "down")
            .await;
    }
    redis.thaw();
    for service in [&a, &b] {
        service
            .wait_stats("resubscribed", |s| {
                s["broker"] == "up" && s["broker_subscriptions"] == 2
            })
            .await;
    }
    say(&mut alice, "after the freeze").await;
    assert_eq!(
        next_of(&mut bob, &["message"]).await["text"],
        "after the freeze"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_during_chat_keeps_messages_flowing_and_writes_resume() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let url = pg.url();
    let mut a = Service::start("a", None, Some(&url)).await;
    let (mut alice, _) = join(a.addr, "P", "alice").await;
    let (mut bob, _) = join(a.addr, "P", "bob").await;
    say(&mut alice, "m1").await;
    assert_eq!(next_of(&mut bob, &["message"]).await["text"], "m1");
    a.wait_stats("m1 written", |s| s["history_written"] == 1)
        .await;

    pg.stop();
    a.wait_stats("the database is seen down", |s| s["history"] == "down")
        .await;
    for text in ["m2", "m3"] {
        say(&mut alice, text).await;
        assert_eq!(next_of(&mut bob, &["message"]).await["text"], text);
    }
    a.wait_stats("failed writes are counted", |s| {
        s["history_write_failures"] != 0 && s["history_pending"] == 2
    })
    .await;
    // A join that cannot read the history gets this instance's memory, and is counted.
    let (_dave, history) = join(a.addr, "elsewhere", "dave").await;
    assert_eq!(texts(&history), Vec::<String>::new());
    a.wait_stats("the failed read is counted", |s| {
        s["history_read_failures"] == 1
    })
    .await;
    assert!(a.alive(), "no crash");

    pg.resume();
    a.wait_stats("writes resume", |s| {
        s["history"] == "up" && s["history_written"] == 3 && s["history_pending"] == 0
    })
    .await;
    assert_eq!(a.stats().await.unwrap()["history_lost"], 0);
    drop((alice, bob));
    a.stop().await;
    let a = Service::start("a2", None, Some(&url)).await;
    let (_erin, history) = join(a.addr, "P", "erin").await;
    assert_eq!(texts(&history), ["m1", "m2", "m3"], "nothing lost");
}
