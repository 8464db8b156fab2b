//! Several instances as one gateway (issue 14): three wsgate processes that know each other,
//! a test L4 spreader in front sending every new connection to a random instance, and real
//! backends. Placement agrees on every instance, rooms meet on one backend whatever instance
//! their members reach, session requests find the instance owning the session, a killed
//! instance costs its sessions (410) and nothing else, and behind a balancer speaking the
//! PROXY protocol every instance sees each client's own address.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/cluster.rs"]
mod cluster;
mod support;

use cluster::{
    Cluster, RoomBackend, Spec, exchange, metric_sum, open_session, placement, request, tcp_from,
};
use futures_util::{SinkExt, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const HEALTH: &str = "health_check: {kind: tcp, interval: 100ms, timeout: 1s, unhealthy_threshold: 2, healthy_threshold: 1}\npassive_health: off";
const REBALANCE: &str = "rebalance: {window: 500ms, on_health_change: true}\n";
/// How long instances may disagree after a health change with [`HEALTH`] and [`REBALANCE`]:
/// interval × threshold (the last check may take its timeout) + the rebalance window.
const DISAGREEMENT: Duration = Duration::from_millis(100 * 2 + 1000 + 500);

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("room-{i}")).collect()
}

async fn all_placements(cluster: &Cluster, keys: &[String]) -> Vec<Vec<Option<String>>> {
    let mut answers = Vec::new();
    for instance in cluster.instances.iter().filter(|i| i.alive()) {
        answers.push(placement(instance.admin, keys).await);
    }
    answers
}

fn assert_alike(answers: &[Vec<Option<String>>], keys: &[String], when: &str) {
    for (i, answer) in answers.iter().enumerate().skip(1) {
        let differing: Vec<_> = keys
            .iter()
            .zip(answer.iter().zip(&answers[0]))
            .filter(|(_, (a, b))| a != b)
            .take(5)
            .collect();
        assert!(
            differing.is_empty(),
            "{when}: instance {} places keys unlike instance 0: {differing:?}",
            i
        );
    }
}

/// Polls every live instance until `done` holds for its placement.
async fn until_every_instance(
    cluster: &Cluster,
    keys: &[String],
    what: &str,
    done: impl Fn(&[Option<String>]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for instance in cluster.instances.iter().filter(|i| i.alive()) {
        loop {
            if done(&placement(instance.admin, keys).await) {
                break;
            }
            assert!(Instant::now() < deadline, "{}: {what}", instance.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn url(backend: &RoomBackend) -> String {
    format!("ws://{}", backend.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_places_10000_keys_alike_across_a_reload_and_a_health_change() {
    let mut backends = vec![
        RoomBackend::start("b0").await,
        RoomBackend::start("b1").await,
        RoomBackend::start("b2").await,
    ];
    let mut spec = Spec::new(&backends.iter().map(|b| b.addr).collect::<Vec<_>>());
    spec.upstream_extra = HEALTH.to_owned();
    spec.top_extra = REBALANCE.to_owned();
    let cluster = Cluster::start(spec.clone()).await;
    let keys = keys(10_000);

    // The placement API: the bearer token, a known upstream, a bounded number of keys.
    let admin = cluster.instances[0].admin;
    let (status, _) = support::http_get(admin, "/api/placement?upstream=chat&key=a").await;
    assert_eq!(status, 401);
    let (status, body) = cluster::admin_get(admin, "/api/placement?upstream=nope&key=a").await;
    assert_eq!(status, 404, "{body}");
    let too_many: String = (0..2001).map(|i| format!("&key=k{i}")).collect();
    let (status, body) =
        cluster::admin_get(admin, &format!("/api/placement?upstream=chat{too_many}")).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) =
        cluster::admin_get(admin, "/api/placement?upstream=chat&key=a%20b&key=room-1").await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["upstream"], "chat");
    assert_eq!(
        answer["placement"][0]["key"], "a b",
        "keys are percent-decoded"
    );
    assert!(
        answer["placement"][1]["backend"]
            .as_str()
            .unwrap()
            .starts_with("ws://")
    );

    let first = all_placements(&cluster, &keys).await;
    assert_eq!(first.len(), 3);
    assert_alike(&first, &keys, "at start");
    for backend in &backends {
        let share = first[0]
            .iter()
            .filter(|b| b.as_deref() == Some(&url(backend)))
            .count();
        assert!(share > 2000, "{} holds {share} of 10000 keys", backend.name);
    }

    // A reload that adds a backend: every instance moves the same keys, and only to it.
    backends.push(RoomBackend::start("b3").await);
    let mut grown = spec.clone();
    grown.backends.push(backends[3].addr);
    for (i, instance) in cluster.instances.iter().enumerate() {
        instance.reload(&cluster.config(&grown, i)).await;
    }
    let reloaded = all_placements(&cluster, &keys).await;
    assert_alike(&reloaded, &keys, "after the reload");
    let new = Some(url(&backends[3]));
    let mut moved = 0;
    for (before, after) in first[0].iter().zip(&reloaded[0]) {
        if before != after {
            assert_eq!(after, &new, "a key moved, but not to the new backend");
            moved += 1;
        }
    }
    assert!(
        (1500..3500).contains(&moved),
        "{moved} keys moved to the 4th backend"
    );

    // A backend goes down: once every instance's checks have seen it, all place alike again.
    let down = url(&backends[1]);
    backends[1].stop();
    until_every_instance(&cluster, &keys, "b1 seen down", |placed| {
        placed.iter().all(|b| b.as_deref() != Some(&down))
    })
    .await;
    let without = all_placements(&cluster, &keys).await;
    assert_alike(&without, &keys, "with b1 down");

    // And comes back: the same placement as before it went down, on every instance.
    backends[1].resume().await;
    until_every_instance(&cluster, &keys, "b1 seen up", |placed| {
        placed.iter().any(|b| b.as_deref() == Some(&down))
    })
    .await;
    let back = all_placements(&cluster, &keys).await;
    assert_alike(&back, &keys, "with b1 back");
    assert_eq!(back[0], reloaded[0], "b1's keys come back to it");
}

/// A WebSocket to the gateway at `addr` for `path`, with extra request headers.
async fn ws(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (support::Client, Option<String>) {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (name, value) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName = name.parse().unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    let (ws, response) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("a handshake within 10 s")
    .unwrap_or_else(|e| panic!("connect to {addr}{path}: {e}"));
    let cookie = response
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_owned());
    (ws, cookie)
}

async fn whoami(ws: &mut support::Client) -> String {
    ws.send(Message::text("whoami")).await.unwrap();
    support::next_message(ws)
        .await
        .into_text()
        .unwrap()
        .as_str()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_affinity_cookie_from_one_instance_is_honoured_by_every_instance() {
    let backends = [
        RoomBackend::start("b0").await,
        RoomBackend::start("b1").await,
        RoomBackend::start("b2").await,
    ];
    let mut spec = Spec::new(&backends.iter().map(|b| b.addr).collect::<Vec<_>>());
    spec.route_extra = "sticky_cookie: {name: affinity}".to_owned();
    let cluster = Cluster::start(spec).await;
    let mut pinned = BTreeMap::new();
    for round in 0..6 {
        let first = &cluster.instances[round % 3];
        let (mut ws, cookie) = ws(first.client, "/", &[]).await;
        let cookie = cookie.expect("the first connection gets the affinity cookie");
        let pair = cookie.split(';').next().unwrap().to_owned();
        let home = whoami(&mut ws).await;
        pinned.insert(home.clone(), ());
        for instance in &cluster.instances {
            let (mut ws, again) = ws_with_cookie(instance.client, &pair).await;
            assert_eq!(
                again, None,
                "{}: a valid cookie is not replaced",
                instance.name
            );
            assert_eq!(
                whoami(&mut ws).await,
                home,
                "{} honours {pair}",
                instance.name
            );
        }
    }
    assert!(!pinned.is_empty());
}

async fn ws_with_cookie(addr: SocketAddr, cookie: &str) -> (support::Client, Option<String>) {
    ws(addr, "/", &[("cookie", cookie)]).await
}

/// Each member's room and the backend it is on now (`None` while reconnecting).
type Members = Arc<Mutex<HashMap<usize, (String, Option<String>)>>>;

/// A room member that stays connected through the spreader: it reconnects whenever its
/// connection ends and reports the backend it is on (`None` while reconnecting).
fn member(
    spreader: SocketAddr,
    room: String,
    id: usize,
    on: Members,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let path = format!("/chat?room={room}");
            let connected =
                tokio_tungstenite::connect_async(format!("ws://{spreader}{path}")).await;
            let Ok((mut ws, _)) = connected else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            if ws.send(Message::text("whoami")).await.is_err() {
                continue;
            }
            let name = loop {
                match ws.next().await {
                    Some(Ok(Message::Text(name))) => break Some(name.as_str().to_owned()),
                    Some(Ok(_)) => continue,
                    _ => break None,
                }
            };
            let Some(name) = name else { continue };
            on.lock().unwrap().insert(id, (room.clone(), Some(name)));
            // Connected until the connection ends (the backend's loss, a 1012 move, the
            // instance's death).
            while let Some(Ok(_)) = ws.next().await {}
            on.lock().unwrap().insert(id, (room.clone(), None));
        }
    })
}

/// Whether every member is connected and each room's members share one backend.
fn rooms_whole(
    on: &HashMap<usize, (String, Option<String>)>,
    members: usize,
) -> Result<(), String> {
    if on.len() < members {
        return Err(format!("{} of {members} members connected", on.len()));
    }
    let mut rooms: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (room, backend) in on.values() {
        let Some(backend) = backend else {
            return Err(format!("a member of {room} is reconnecting"));
        };
        rooms.entry(room).or_default().push(backend);
    }
    for (room, backends) in rooms {
        if backends.iter().any(|b| *b != backends[0]) {
            return Err(format!("{room} is split: {backends:?}"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_meet_on_one_backend_and_are_whole_again_within_the_bound_after_a_health_change() {
    let mut backends = vec![
        RoomBackend::start("b0").await,
        RoomBackend::start("b1").await,
        RoomBackend::start("b2").await,
    ];
    let mut spec = Spec::new(&backends.iter().map(|b| b.addr).collect::<Vec<_>>());
    spec.upstream_extra = HEALTH.to_owned();
    spec.top_extra = REBALANCE.to_owned();
    let cluster = Cluster::start(spec).await;
    let on = Arc::new(Mutex::new(HashMap::new()));
    let (rooms, per_room) = (12, 6);
    let mut tasks = Vec::new();
    for id in 0..rooms * per_room {
        let room = format!("r{}", id % rooms);
        tasks.push(member(cluster.spreader.addr, room, id, Arc::clone(&on)));
    }
    let whole = |what: &str| {
        let on = Arc::clone(&on);
        let what = what.to_owned();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match rooms_whole(&on.lock().unwrap(), rooms * per_room) {
                    Ok(()) => return,
                    Err(why) => assert!(Instant::now() < deadline, "{what}: {why}"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    whole("at start").await;
    let carried = cluster.spreader.carried.lock().unwrap().clone();
    assert!(
        carried.iter().all(|&n| n > 0),
        "every instance took members: {carried:?}"
    );

    // A backend goes down and comes back. After the bound, every room is whole again.
    for step in ["down", "up"] {
        let changed = Instant::now();
        if step == "down" {
            backends[1].stop();
        } else {
            backends[1].resume().await;
        }
        tokio::time::sleep(DISAGREEMENT).await;
        whole(&format!("after b1 went {step}")).await;
        eprintln!(
            "rooms whole {} ms after b1 went {step} (bound {} ms)",
            changed.elapsed().as_millis(),
            DISAGREEMENT.as_millis()
        );
    }
    let names: Vec<String> = on
        .lock()
        .unwrap()
        .values()
        .filter_map(|(_, b)| b.clone())
        .collect();
    assert!(names.iter().any(|n| n == "b1"), "b1 has rooms again");
    for task in tasks {
        task.abort();
    }
    backends.clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_pose_as_peers_and_unknown_owners_are_gone() {
    let backend = RoomBackend::start("b0").await;
    let cluster = Cluster::start(Spec::new(&[backend.addr])).await;
    let gw1 = &cluster.instances[0];
    let (status, body) = request(gw1.client, "POST", "/chat?room=a&wsgate=open", "", "").await;
    assert_eq!(status, 200, "{body}");
    let opened: serde_json::Value = serde_json::from_str(&body).unwrap();
    let sid = opened["session"].as_str().unwrap().to_owned();
    assert!(sid.starts_with("gw-1~"), "{sid}");
    let poll = format!("/chat?room=a&wsgate=poll&wsgate_sid={sid}&wsgate_ack=0");

    // Peer headers from a client, on the client listener: refused, right secret or not.
    for headers in [
        "wsgate-peer-secret: wrong\r\nwsgate-peer-from: gw-2\r\nwsgate-peer-client: 10.0.0.1:1\r\n"
            .to_owned(),
        format!(
            "wsgate-peer-secret: {}\r\nwsgate-peer-from: gw-2\r\nwsgate-peer-client: 10.0.0.1:1\r\n",
            cluster::SECRET
        ),
    ] {
        let (status, body) = request(gw1.client, "GET", &poll, &headers, "").await;
        assert_eq!(status, 403, "{body}");
    }
    // The peer listener serves peers only, and only with the secret.
    let (status, body) = request(gw1.peer, "GET", &poll, "", "").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("peers only"), "{body}");
    let (status, body) = request(
        gw1.peer,
        "GET",
        &poll,
        "wsgate-peer-secret: wrong-secret-of-the-right-length-00\r\nwsgate-peer-from: gw-2\r\nwsgate-peer-client: 10.0.0.1:1\r\n",
        "",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    // A peer may not open sessions or reach anything but session requests.
    let peer_headers = format!(
        "wsgate-peer-secret: {}\r\nwsgate-peer-from: gw-2\r\nwsgate-peer-client: 10.0.0.1:1\r\n",
        cluster::SECRET
    );
    for (method, target) in [
        ("POST", "/chat?room=a&wsgate=open"),
        ("GET", "/chat?room=a"),
    ] {
        let (status, body) = request(gw1.peer, method, target, &peer_headers, "").await;
        assert_eq!(status, 403, "{target}: {body}");
    }

    // Through another instance, the session is found (its events come back)...
    let (status, body) = request(
        cluster.instances[1].client,
        "POST",
        &format!("/chat?room=a&wsgate=send&wsgate_sid={sid}"),
        "",
        r#"{"seq":1,"messages":[{"text":"hello"}]}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = request(cluster.instances[2].client, "GET", &poll, "", "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hello"), "{body}");
    // ...a forwarded request is served where it lands, never forwarded again: gw-2 asked
    // as a peer about gw-1's session says it is gone.
    let (status, body) = request(
        cluster.instances[1].peer,
        "GET",
        &poll,
        &peer_headers.replace("gw-2", "gw-3"),
        "",
    )
    .await;
    assert_eq!(status, 410, "{body}");
    // An instance nobody knows: gone, at once.
    let stranger = sid.replacen("gw-1", "gw-9", 1);
    let (status, body) = request(
        cluster.instances[2].client,
        "GET",
        &poll.replace(&sid, &stranger),
        "",
        "",
    )
    .await;
    assert_eq!(status, 410, "{body}");

    let (status, metrics) = cluster::admin_get(cluster.instances[1].admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics
            .contains(r#"wsgate_peer_forwards_total{peer="gw-1",op="send",result="answered"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("wsgate_peer_forward_seconds_count{peer=\"gw-1\"} 1"),
        "{metrics}"
    );
}

/// Forwards answered by every live instance for `op`.
async fn forwards(cluster: &Cluster, op: &str) -> f64 {
    let mut total = 0.0;
    for instance in cluster.instances.iter().filter(|i| i.alive()) {
        let (_, metrics) = cluster::admin_get(instance.admin, "/metrics").await;
        for line in metrics.lines().filter(|l| {
            l.starts_with("wsgate_peer_forwards_total{")
                && l.contains(&format!("op=\"{op}\""))
                && l.contains("result=\"answered\"")
        }) {
            total += metric_sum(line, "wsgate_peer_forwards_total");
        }
    }
    total
}

/// The client address of an instance that does not own session `sid`.
fn not_owner(cluster: &Cluster, sid: &str) -> SocketAddr {
    let owner = sid.split('~').next().unwrap();
    cluster
        .instances
        .iter()
        .find(|i| i.alive() && i.name != owner)
        .unwrap()
        .client
}

async fn send(spreader: SocketAddr, room: &str, sid: &str, seq: u64, text: &str) {
    let body = serde_json::json!({"seq": seq, "messages": [{"text": text}]}).to_string();
    let (status, answer) = request(
        spreader,
        "POST",
        &format!("/chat?room={room}&wsgate=send&wsgate_sid={sid}"),
        "",
        &body,
    )
    .await;
    assert_eq!(status, 200, "send {seq}: {answer}");
}

const MESSAGES: u64 = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_through_the_spreader_deliver_every_message_once_in_order() {
    let backends = [
        RoomBackend::start("b0").await,
        RoomBackend::start("b1").await,
    ];
    let cluster = Cluster::start(Spec::new(
        &backends.iter().map(|b| b.addr).collect::<Vec<_>>(),
    ))
    .await;
    let spreader = cluster.spreader.addr;

    // Long-polling: every send and every poll on a new connection to a random instance.
    let sid = open_session(spreader, "lp").await;
    let (mut received, mut ack) = (Vec::new(), 0u64);
    for seq in 1..=MESSAGES {
        send(spreader, "lp", &sid, seq, &format!("m{seq}")).await;
        while received.len() < seq as usize {
            let (status, body) = request(
                spreader,
                "GET",
                &format!("/chat?room=lp&wsgate=poll&wsgate_sid={sid}&wsgate_ack={ack}"),
                "",
                "",
            )
            .await;
            assert_eq!(status, 200, "poll: {body}");
            let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
            for event in answer["events"].as_array().unwrap() {
                let n = event["seq"].as_u64().unwrap();
                assert_eq!(
                    n,
                    ack + 1,
                    "events numbered without gaps or repeats: {body}"
                );
                ack = n;
                received.push(event["text"].as_str().unwrap().to_owned());
            }
        }
    }
    let expected: Vec<String> = (1..=MESSAGES).map(|n| format!("m{n}")).collect();
    assert_eq!(received, expected, "long-polling");

    // An event stream on one connection; sends each on a new one.
    // The first stream is opened on an instance that does not own the session, the second
    // (after half the messages) through the spreader.
    let sid = open_session(spreader, "sse").await;
    let events_at = |addr: SocketAddr, ack: usize| {
        let sid = sid.clone();
        async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(format!("GET /chat?room=sse&wsgate=events&wsgate_sid={sid}&wsgate_ack={ack} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
                .await
                .unwrap();
            stream
        }
    };
    let mut stream = events_at(not_owner(&cluster, &sid), 0).await;
    let (mut text, mut events) = (String::new(), Vec::new());
    let mut buf = [0u8; 4096];
    for seq in 1..=MESSAGES {
        if seq == MESSAGES / 2 {
            stream = events_at(spreader, events.len()).await;
            text.clear();
        }
        send(spreader, "sse", &sid, seq, &format!("e{seq}")).await;
        while events.len() < seq as usize {
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .expect("an event within 10 s")
                .unwrap();
            assert!(n > 0, "the event stream ended: {text}");
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            // Records: "id: N\nevent: text\ndata: \"...\"\n\n" (inside chunked framing).
            while let Some(at) = text.find("id: ") {
                let Some(end) = text[at..].find("\n\n") else {
                    break;
                };
                let record = text[at..at + end].to_owned();
                text.drain(..at + end + 2);
                let id: u64 = record.lines().next().unwrap()[4..].trim().parse().unwrap();
                let data = record
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap();
                assert_eq!(id, events.len() as u64 + 1, "ids in order, once each");
                events.push(serde_json::from_str::<String>(data).unwrap());
            }
        }
    }
    let expected: Vec<String> = (1..=MESSAGES).map(|n| format!("e{n}")).collect();
    assert_eq!(events, expected, "event stream");
    drop(stream);

    // A session WebSocket, resumed every 8 messages on a new connection to a random instance.
    let (mut socket, _) = ws(spreader, "/chat?room=ws&wsgate=socket", &[]).await;
    let open = support::next_message(&mut socket)
        .await
        .into_text()
        .unwrap();
    let open: serde_json::Value = serde_json::from_str(&open.as_str()[1..]).unwrap();
    let sid = open["session"].as_str().unwrap().to_owned();
    let mut echoes = Vec::new();
    for seq in 1..=MESSAGES {
        if seq % 8 == 0 {
            let _ = socket
                .send(Message::Close(Some(
                    tokio_tungstenite::tungstenite::protocol::CloseFrame {
                        code: 4100.into(),
                        reason: "detach".into(),
                    },
                )))
                .await;
            let path = format!(
                "/chat?room=ws&wsgate=socket&wsgate_sid={sid}&wsgate_ack={}",
                echoes.len()
            );
            // The first resume on an instance that does not own the session, then at random.
            let to = if seq == 8 {
                not_owner(&cluster, &sid)
            } else {
                spreader
            };
            socket = ws(to, &path, &[]).await.0;
            let open = support::next_message(&mut socket)
                .await
                .into_text()
                .unwrap();
            let open: serde_json::Value = serde_json::from_str(&open.as_str()[1..]).unwrap();
            assert_eq!(open["type"], "open", "{open}");
            assert_eq!(open["received"].as_u64(), Some(seq - 1), "{open}");
        }
        socket
            .send(Message::text(format!("dw{seq}")))
            .await
            .unwrap();
        loop {
            let message = support::next_message(&mut socket)
                .await
                .into_text()
                .unwrap();
            if let Some(data) = message.as_str().strip_prefix('d') {
                echoes.push(data.to_owned());
                break;
            }
        }
    }
    let expected: Vec<String> = (1..=MESSAGES).map(|n| format!("w{n}")).collect();
    assert_eq!(echoes, expected, "session WebSocket");

    // The requests did take the peer hop.
    for op in ["send", "poll", "events", "socket"] {
        assert!(forwards(&cluster, op).await > 0.0, "no {op} was forwarded");
    }
}

/// `node cluster.mjs <scenario> <spreader>`, its stdout lines on a channel; `None` (after a
/// loud skip) without node, a failure under `CI=true`.
fn node_client(
    scenario: &str,
    spreader: SocketAddr,
) -> Option<(std::process::Child, std::sync::mpsc::Receiver<String>)> {
    use std::io::{BufRead, BufReader};
    let spreader = spreader.to_string();
    let mut child = support::session_client(
        "cluster.mjs",
        &[scenario, &spreader],
        std::process::Stdio::piped(),
    )?;
    let stdout = child.stdout.take().unwrap();
    let (lines, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    Some((child, receiver))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_costs_its_sessions_and_nothing_else() {
    let backends = [
        RoomBackend::start("b0").await,
        RoomBackend::start("b1").await,
        RoomBackend::start("b2").await,
    ];
    let mut cluster = Cluster::start(Spec::new(
        &backends.iter().map(|b| b.addr).collect::<Vec<_>>(),
    ))
    .await;
    let spreader = cluster.spreader.addr;
    let on = Arc::new(Mutex::new(HashMap::new()));
    let (rooms, per_room) = (8, 6);
    let tasks: Vec<_> = (0..rooms * per_room)
        .map(|id| member(spreader, format!("r{}", id % rooms), id, Arc::clone(&on)))
        .collect();
    let whole = |what: &'static str| {
        let on = Arc::clone(&on);
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match rooms_whole(&on.lock().unwrap(), rooms * per_room) {
                    Ok(()) => return,
                    Err(why) => assert!(Instant::now() < deadline, "{what}: {why}"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    whole("at start").await;

    // The node client's session, or one of ours when node is missing, picks the victim.
    let mut node = node_client("owner-killed", spreader);
    let victim_sid = match &mut node {
        Some((child, lines)) => match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line.strip_prefix("session ").unwrap().to_owned(),
            Err(error) => {
                use std::io::Read;
                let _ = child.kill();
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                panic!("the node client did not open its sessions ({error}): {stderr}");
            }
        },
        None => open_session(spreader, "k").await,
    };
    let victim = victim_sid.split('~').next().unwrap().to_owned();
    // A long-polling session on the victim and one on a survivor.
    let (mut doomed, mut kept) = (None, None);
    while doomed.is_none() || kept.is_none() {
        let sid = open_session(spreader, "lp").await;
        if sid.starts_with(&format!("{victim}~")) {
            doomed.get_or_insert(sid);
        } else {
            kept.get_or_insert(sid);
        }
    }
    let (doomed, kept) = (doomed.unwrap(), kept.unwrap());
    let members_on_victim = cluster.spreader.carried.lock().unwrap().clone();

    let index = cluster
        .instances
        .iter()
        .position(|i| i.name == victim)
        .unwrap();
    cluster.instances[index].kill();

    // Its WebSocket clients reconnect through the others; every room is whole again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    whole("after the kill").await;
    // Its sessions are gone, through any instance; the others' live on.
    for _ in 0..4 {
        let (status, body) = request(
            spreader,
            "GET",
            &format!("/chat?room=lp&wsgate=poll&wsgate_sid={doomed}&wsgate_ack=0"),
            "",
            "",
        )
        .await;
        assert_eq!(status, 410, "{body}");
        send(spreader, "lp", &kept, 1, "still here").await;
    }
    let (status, body) = request(
        spreader,
        "GET",
        &format!("/chat?room=lp&wsgate=poll&wsgate_sid={kept}&wsgate_ack=0"),
        "",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("still here"), "{body}");

    if let Some((mut child, _)) = node {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the node client did not finish");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut stderr = String::new();
        use std::io::Read;
        let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
        assert!(status.success(), "node client: {stderr}");
    }
    assert!(
        members_on_victim[index] > 0,
        "the killed instance carried members: {members_on_victim:?}"
    );
    for task in tasks {
        task.abort();
    }
}

/// The wsgate configuration inside the Kubernetes example's ConfigMap.
fn kubernetes_config() -> String {
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes.yaml"
    ))
    .unwrap();
    let mut lines = manifest
        .lines()
        .skip_while(|l| l.trim() != "wsgate.yaml: |");
    lines.next().expect("the ConfigMap holds wsgate.yaml");
    let mut config = String::new();
    for line in lines.take_while(|l| l.is_empty() || l.starts_with("    ")) {
        config.push_str(line.get(4..).unwrap_or(""));
        config.push('\n');
    }
    config
}

#[test]
fn the_kubernetes_example_passes_wsgate_check() {
    let path = std::env::temp_dir().join(format!("wsgate-k8s-{}.yaml", std::process::id()));
    std::fs::write(&path, kubernetes_config()).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["check", "-c"])
        .arg(&path)
        .env("POD_IP", "10.244.1.7")
        .env(
            "WSGATE_CLUSTER_SECRET",
            "0123456789abcdef0123456789abcdef0123456789abcdef",
        )
        .env("WSGATE_ADMIN_TOKEN", "an-admin-token-long-enough")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for needle in [
        "cluster: instance 10.244.1.7, peers on listener peers: those DNS answers",
        "peers from DNS: A/AAAA wsgate-peers.default.svc.cluster.local, port 9100 via the system's resolver",
        "backends from DNS: A/AAAA rooms.default.svc.cluster.local, port 9001",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
}

/// A gateway (in this process) whose peers are `gw-2`, a listener that accepts and never
/// answers, and `gw-3`, a port nobody listens on.
async fn gateway_with_dead_peers() -> (
    support::Gateway,
    support::EchoBackend,
    tokio::net::TcpListener,
) {
    let backend = support::echo_backend("b0").await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let yaml = format!(
        "{}cluster:\n  name: gw-1\n  secret: {}\n  peers:\n    - {{name: gw-2, address: \"{}\"}}\n    - {{name: gw-3, address: \"{closed}\"}}\n",
        support::simple_config(&[backend.addr], ""),
        cluster::SECRET,
        silent.local_addr().unwrap(),
    );
    (support::start_gateway(&yaml).await, backend, silent)
}

#[tokio::test(start_paused = true)]
async fn a_silent_or_unreachable_owner_is_a_gone_session_not_a_hang() {
    let (gateway, _backend, _silent) = gateway_with_dead_peers().await;
    for owner in ["gw-2", "gw-3"] {
        let sid = format!("{owner}~AAAAAAAAAAAAAAAAAAAAAA");
        for (method, op, body) in [
            ("GET", "poll", ""),
            ("POST", "send", r#"{"seq":1,"messages":[]}"#),
            ("POST", "close", ""),
            ("GET", "events", ""),
        ] {
            let target = format!("/?wsgate={op}&wsgate_sid={sid}");
            let (status, answer) = request(gateway.addr, method, &target, "", body).await;
            assert_eq!(status, 410, "{owner} {op}: {answer}");
            assert!(answer.contains("cannot be reached"), "{answer}");
        }
        // The session WebSocket: accepted only to say the session is gone.
        let (mut socket, _) = ws(
            gateway.addr,
            &format!("/?wsgate=socket&wsgate_sid={sid}"),
            &[],
        )
        .await;
        let close = support::close_frame(&mut socket)
            .await
            .expect("a close frame");
        assert_eq!(u16::from(close.code), 4410, "{owner}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_websocket_upgraded_on_a_keep_alive_connection_is_carried_to_its_owner() {
    let backend = RoomBackend::start("b0").await;
    let cluster = Cluster::start(Spec::new(&[backend.addr])).await;
    let sid = open_session(cluster.instances[0].client, "ka").await;
    let (status, body) = request(
        cluster.instances[0].client,
        "POST",
        &format!("/chat?room=ka&wsgate=send&wsgate_sid={sid}"),
        "",
        r#"{"seq":1,"messages":[{"text":"before"}]}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // On gw-2: a plain request first (hyper serves the connection from then on), then the
    // upgrade of gw-1's session.
    let mut tcp = TcpStream::connect(cluster.instances[1].client)
        .await
        .unwrap();
    tcp.write_all(b"GET /.wsgate/client.js HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    let length = loop {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        if let Some((head, _)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .unwrap()
                .parse()
                .unwrap();
            break head.len() + 4 + length;
        }
    };
    while seen.len() < length {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    let upgrade = support::upgrade_request(
        &format!("/chat?room=ka&wsgate=socket&wsgate_sid={sid}&wsgate_ack=0"),
        "",
    );
    tcp.write_all(upgrade.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&answer).contains("before") {
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut buf))
            .await
            .expect("the owner's open and the buffered event within 10 s")
            .unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(
        text.contains("\"type\":\"open\"") && text.contains(&sid),
        "{text}"
    );
    assert!(forwards(&cluster, "socket").await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_reuse_their_connections_to_the_owner() {
    let backend = support::echo_backend("b0").await;
    let cluster_yaml = |name: &str, peer: &str, address: SocketAddr| {
        format!(
            "{}cluster:\n  name: {name}\n  secret: {}\n  peers:\n    - {{name: {peer}, address: \"{address}\"}}\n",
            support::simple_config(&[backend.addr], ""),
            cluster::SECRET,
        )
    };
    let nowhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let owner = support::start_gateway(&cluster_yaml("gw-2", "gw-1", nowhere)).await;
    // The hop to the owner through a counting TCP relay.
    let counter = cluster::Spreader::start(vec![owner.addr]).await;
    let forwarder = support::start_gateway(&cluster_yaml("gw-1", "gw-2", counter.addr)).await;
    let sid = open_session(owner.addr, "x").await;
    assert!(sid.starts_with("gw-2~"));
    let rounds = 20;
    for seq in 1..=rounds {
        let body =
            serde_json::json!({"seq": seq, "messages": [{"text": format!("m{seq}")}]}).to_string();
        let (status, answer) = request(
            forwarder.addr,
            "POST",
            &format!("/?wsgate=send&wsgate_sid={sid}"),
            "",
            &body,
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        let (status, answer) = request(
            forwarder.addr,
            "GET",
            &format!("/?wsgate=poll&wsgate_sid={sid}&wsgate_ack={}", seq - 1),
            "",
            "",
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        assert!(answer.contains(&format!("\"m{seq}\"")), "{answer}");
    }
    let connections = counter.carried.lock().unwrap()[0];
    assert!(
        connections < 5,
        "{} forwarded requests took {connections} connections to the owner",
        2 * rounds
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_carries_the_clients_headers_to_the_owner() {
    let backend = RoomBackend::start("b0").await;
    let mut spec = Spec::new(&[backend.addr]);
    spec.route_extra =
        "sticky: {query: room}\nallowed_origins: [\"https://a.example\", \"https://b.example\"]"
            .to_owned();
    // An empty poll answers after this.
    spec.top_extra = "sessions:\n  poll_timeout: 1s\n".to_owned();
    let cluster = Cluster::start(spec).await;
    let (owner, other) = (&cluster.instances[0], &cluster.instances[1]);
    let (status, body) = request(
        owner.client,
        "POST",
        "/chat?room=o&wsgate=open",
        "Origin: https://a.example\r\n",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let sid = serde_json::from_str::<serde_json::Value>(&body).unwrap()["session"]
        .as_str()
        .unwrap()
        .to_owned();
    let poll = format!("/chat?room=o&wsgate=poll&wsgate_sid={sid}&wsgate_ack=0");
    // The owner checks the session's origin on the client's Origin, carried over the hop,
    // and answers with CORS headers for it.
    let mut tcp = TcpStream::connect(other.client).await.unwrap();
    tcp.write_all(format!("GET {poll} HTTP/1.1\r\nHost: localhost\r\nOrigin: https://a.example\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(40), tcp.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(
        answer.contains("access-control-allow-origin: https://a.example"),
        "{answer}"
    );
    let (status, body) = request(
        other.client,
        "GET",
        &poll,
        "Origin: https://b.example\r\n",
        "",
    )
    .await;
    assert_eq!(status, 403, "another origin, refused by the owner: {body}");
    assert!(forwards(&cluster, "poll").await >= 2.0);
}

/// A WebSocket to `addr` from the local address `from`; refused: `Err` with the status, or
/// 0 when the connection ended without one.
async fn ws_from(
    from: &str,
    addr: SocketAddr,
    path: &str,
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, u16> {
    let tcp = tcp_from(from, addr).await;
    let handshake = tokio_tungstenite::client_async(format!("ws://{addr}{path}"), tcp);
    match tokio::time::timeout(Duration::from_secs(10), handshake)
        .await
        .expect("an answer within 10 s")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(answer)) => Err(answer.status().as_u16()),
        Err(_) => Err(0),
    }
}

/// Behind a balancer that speaks the PROXY protocol (the spreader, with v2 headers), every
/// instance takes each client's address from the header: backends get it in
/// `X-Forwarded-For`, and `max_connections_per_ip` counts it rather than the balancer's one
/// address, which every client shares. A client reaching an instance around the balancer is
/// not believed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_protocol_balancer_every_instance_sees_each_clients_own_address() {
    let backend = support::echo_backend("b0").await;
    let mut spec = Spec::new(&[backend.addr]);
    spec.client_listener_extra = "proxy_protocol: true\ntrusted_proxies: [127.0.0.1/32]".into();
    // Two: a session's opening request and the session itself.
    spec.top_extra = "limits:\n  max_connections_per_ip: 2\n".into();
    spec.spreader_proxy_v2 = true;
    let cluster = Cluster::start(spec).await;
    let spreader = cluster.spreader.addr;

    // Seven clients of seven addresses held open on three instances: at least one instance
    // holds three connections from the balancer, each counted by its own client.
    let mut held = Vec::new();
    for n in 2..=8 {
        let ws = ws_from(&format!("127.0.0.{n}"), spreader, "/?room=r").await;
        held.push(ws.unwrap_or_else(|status| panic!("127.0.0.{n} refused with {status}")));
    }
    let forwarded_for = |seen: &[support::SeenRequest]| -> Vec<String> {
        let mut addresses: Vec<String> = seen
            .iter()
            .map(|r| r.header("x-forwarded-for").unwrap_or("none").to_owned())
            .collect();
        addresses.sort();
        addresses
    };
    let clients: Vec<String> = (2..=8).map(|n| format!("127.0.0.{n}")).collect();
    assert_eq!(forwarded_for(&backend.seen.lock().unwrap()), clients);

    // Seven from one address: two per instance at most, so one at least is refused.
    let mut admitted = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..7 {
        match ws_from("127.0.0.9", spreader, "/?room=r").await {
            Ok(ws) => admitted.push(ws),
            Err(status) => refused.push(status),
        }
    }
    assert!(
        !refused.is_empty() && admitted.len() <= 2 * cluster.instances.len(),
        "{} admitted, refused: {refused:?}",
        admitted.len()
    );
    // Refused before any request is read: a 503 when the socket takes it at once.
    assert!(refused.iter().all(|&s| s == 503 || s == 0), "{refused:?}");

    // A session's backend connection carries its client's address too.
    let (status, body) = exchange(
        tcp_from("127.0.0.10", spreader).await,
        "POST",
        "/chat?room=s&wsgate=open",
        "",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen = backend.seen.lock().unwrap().clone();
    assert_eq!(
        seen.last().and_then(|r| r.header("x-forwarded-for")),
        Some("127.0.0.10")
    );

    // Around the balancer: closed unread, whatever the client claims.
    let direct = ws_from("127.0.0.11", cluster.instances[0].client, "/?room=r").await;
    assert_eq!(direct.err(), Some(0));
}

fn cert(name: &str) -> String {
    format!("{}/certs/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_can_be_reached_over_tls_and_an_unverified_peer_is_gone() {
    let backend = support::echo_backend("b0").await;
    let nowhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let routes = format!(
        "upstreams:\n  app:\n    backends:\n      - ws://{}\nroutes:\n  - name: app\n    upstream: app\n",
        backend.addr
    );
    // The owner: a client listener and a TLS peer listener (on a port found free).
    let peer_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let owner = support::start_gateway(&format!(
        "listeners:\n  - {{name: clients, address: 127.0.0.1:0}}\n  - {{name: peers, address: 127.0.0.1:{peer_port}, tls: {{certificates: [{{cert: {:?}, key: {:?}}}]}}}}\n{routes}cluster:\n  name: gw-2\n  secret: {}\n  listener: peers\n  peers:\n    - {{name: gw-1, address: \"{nowhere}\"}}\n",
        cert("localhost.crt"),
        cert("localhost.key"),
        cluster::SECRET,
    ))
    .await;
    let forwarder_with = |tls: &str| {
        format!(
            "listeners:\n  - address: 127.0.0.1:0\n{routes}cluster:\n  name: gw-1\n  secret: {}\n{tls}  peers:\n    - {{name: gw-2, address: \"localhost:{peer_port}\"}}\n",
            cluster::SECRET,
        )
    };
    let verified = support::start_gateway(&forwarder_with(&format!(
        "  tls: {{ca_file: {:?}}}\n",
        cert("ca.crt")
    )))
    .await;
    // The system's roots do not know the development CA; a plain hop meets a TLS listener.
    let unverified = support::start_gateway(&forwarder_with("  tls: {}\n")).await;
    let plain = support::start_gateway(&forwarder_with("")).await;

    let sid = open_session(owner.addr, "t").await;
    let send =
        |seq: u64| format!("{{\"seq\":{seq},\"messages\":[{{\"text\":\"over tls {seq}\"}}]}}");
    let target = format!("/?wsgate=send&wsgate_sid={sid}");
    let (status, body) = request(verified.addr, "POST", &target, "", &send(1)).await;
    assert_eq!(status, 200, "{body}");
    let poll = format!("/?wsgate=poll&wsgate_sid={sid}&wsgate_ack=0");
    let (status, body) = request(verified.addr, "GET", &poll, "", "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("over tls 1"), "{body}");
    // The session WebSocket too.
    let (mut socket, _) = ws(
        verified.addr,
        &format!("/?wsgate=socket&wsgate_sid={sid}&wsgate_ack=1"),
        &[],
    )
    .await;
    let open = support::next_message(&mut socket)
        .await
        .into_text()
        .unwrap();
    assert!(open.as_str().starts_with("c{\"type\":\"open\""), "{open}");
    drop(socket);
    for (forwarder, what) in [
        (&unverified, "an unverified certificate"),
        (&plain, "a plain hop"),
    ] {
        let (status, body) = request(forwarder.addr, "POST", &target, "", &send(2)).await;
        assert_eq!(status, 410, "{what}: {body}");
    }
}
