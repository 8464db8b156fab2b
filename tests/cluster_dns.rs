//! A cluster whose peers come from DNS (`cluster.peers_dns`), as a Deployment's pods behind a
//! headless Service: three gateways on 127.0.0.11-13 with one port, each named by its
//! address, find each other in a real dnsmasq's answer. A session opened on one is served
//! through the others; an instance taken out of the answer is no longer forwarded to (its
//! sessions are gone, 410, without a request reaching it); a reload, an answer without the
//! name and a dead resolver keep the set.
//!
//! Skips loudly without dnsmasq (fails under `CI=true`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/cluster.rs"]
mod cluster;
mod support;

use cluster::{RoomBackend, metric_sum, open_session, request};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use support::servers::Dnsmasq;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use wsgate::server::{Reloader, Server};

const NAME: &str = "peers.test";
const SECRET: &str = "cluster-dns-test-secret-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(10);
const MESSAGES: u64 = 20;

fn hosts(addresses: &[u8]) -> String {
    addresses
        .iter()
        .map(|last| format!("127.0.0.{last} {NAME}\n"))
        .collect()
}

struct Instance {
    addr: SocketAddr,
    reloader: Reloader,
    _stop: oneshot::Sender<()>,
}

impl Instance {
    fn name(&self) -> String {
        self.addr.ip().to_string()
    }

    /// The peers' names as this instance knows them now.
    fn peers(&self) -> Vec<String> {
        let gateway = self.reloader.current();
        let cluster = gateway.config.cluster.as_ref().unwrap();
        cluster.peers.iter().map(|p| p.name.clone()).collect()
    }

    fn metrics(&self) -> String {
        self.reloader.current().metrics.encode()
    }
}

/// A port free on all of 127.0.0.11-13 (checked by binding it; a parallel test may still
/// take it before the gateways do, so callers retry).
async fn common_port() -> u16 {
    'port: for _ in 0..20 {
        let first = TcpListener::bind("127.0.0.11:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        for last in [12, 13] {
            if TcpListener::bind(SocketAddr::from(([127, 0, 0, last], port)))
                .await
                .is_err()
            {
                continue 'port;
            }
        }
        return port;
    }
    panic!("no port free on all of 127.0.0.11-13");
}

fn config(ip: IpAddr, port: u16, dns: &Dnsmasq, backend: SocketAddr) -> wsgate::config::Config {
    let yaml = format!(
        "listeners:\n  - address: {ip}:{port}\nupstreams:\n  chat:\n    backends: [ws://{backend}]\n\
         routes:\n  - name: chat\n    upstream: chat\n    sticky: {{query: room}}\n\
         sessions:\n  poll_timeout: 500ms\n\
         cluster:\n  name: {ip}\n  secret: {SECRET}\n  peers_dns:\n    name: {NAME}\n    port: {port}\n    resolver: {}\n    min_interval: 100ms\n    max_interval: 300ms\n",
        dns.addr()
    );
    wsgate::config::from_yaml_str(&yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"))
}

async fn start(dns: &Dnsmasq, backend: SocketAddr) -> Vec<Instance> {
    'attempt: for _ in 0..5 {
        let port = common_port().await;
        let mut instances = Vec::new();
        for last in [11, 12, 13] {
            let ip = IpAddr::from([127, 0, 0, last]);
            let Ok(server) = Server::bind(config(ip, port, dns, backend)).await else {
                continue 'attempt;
            };
            let addr = server.local_addrs()[0];
            let reloader = server.reloader();
            let (stop, stopped) = oneshot::channel::<()>();
            tokio::spawn(server.run(async move {
                let _ = stopped.await;
            }));
            instances.push(Instance {
                addr,
                reloader,
                _stop: stop,
            });
        }
        return instances;
    }
    panic!("the gateways did not bind in five attempts");
}

async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn poll_target(room: &str, sid: &str, ack: u64) -> String {
    format!("/chat?room={room}&wsgate=poll&wsgate_sid={sid}&wsgate_ack={ack}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_from_dns_forward_sessions_and_follow_the_answer() {
    let Some(mut dns) = Dnsmasq::start(&hosts(&[11, 12, 13])) else {
        return;
    };
    let backend = RoomBackend::start("b0").await;
    let instances = start(&dns, backend.addr).await;
    let names: Vec<String> = instances.iter().map(Instance::name).collect();
    for instance in &instances {
        let mut want: Vec<String> = names
            .iter()
            .filter(|n| **n != instance.name())
            .cloned()
            .collect();
        want.sort();
        until(&format!("{} finds its two peers", instance.name()), || {
            instance.peers() == want
        })
        .await;
    }

    // A long-polling session on .11, every send and poll through .12 or .13 in turn.
    let sid = open_session(instances[0].addr, "lp").await;
    assert!(sid.starts_with("127.0.0.11~"), "{sid}");
    let (mut received, mut ack) = (Vec::new(), 0u64);
    for seq in 1..=MESSAGES {
        let via = instances[1 + (seq as usize % 2)].addr;
        let body = serde_json::json!({"seq": seq, "messages": [{"text": format!("m{seq}")}]});
        let (status, answer) = request(
            via,
            "POST",
            &format!("/chat?room=lp&wsgate=send&wsgate_sid={sid}"),
            "",
            &body.to_string(),
        )
        .await;
        assert_eq!(status, 200, "send {seq}: {answer}");
        while received.len() < seq as usize {
            let via = instances[2 - (seq as usize % 2)].addr;
            let (status, body) = request(via, "GET", &poll_target("lp", &sid, ack), "", "").await;
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
    assert_eq!(received, expected);
    for instance in &instances[1..] {
        let forwarded = metric_sum(
            &instance.metrics(),
            "wsgate_peer_forwards_total{peer=\"127.0.0.11\",op=\"poll\",result=\"answered\"}",
        );
        assert!(forwarded > 0.0, "{} forwarded no poll", instance.name());
    }

    // A session of .13 is served through .11 while .13 is in the answer...
    let gone_sid = open_session(instances[2].addr, "gone").await;
    assert!(gone_sid.starts_with("127.0.0.13~"), "{gone_sid}");
    let (status, body) = request(
        instances[0].addr,
        "GET",
        &poll_target("gone", &gone_sid, 0),
        "",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // ... and is gone once .13 has left it, without a request reaching .13.
    dns.set_hosts(&hosts(&[11, 12]));
    dns.reload();
    until("the others drop .13", || {
        instances[0].peers() == ["127.0.0.12"] && instances[1].peers() == ["127.0.0.11"]
    })
    .await;
    let session_requests = |i: &Instance| metric_sum(&i.metrics(), "wsgate_session_requests_total");
    let reached_before = session_requests(&instances[2]);
    let unknown = |i: &Instance| {
        metric_sum(
            &i.metrics(),
            "wsgate_peer_forwards_total{peer=\"unknown\",op=\"poll\",result=\"unknown_peer\"}",
        )
    };
    let unknown_before = unknown(&instances[0]);
    let (status, body) = request(
        instances[0].addr,
        "GET",
        &poll_target("gone", &gone_sid, 0),
        "",
        "",
    )
    .await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(unknown(&instances[0]), unknown_before + 1.0);
    assert_eq!(
        session_requests(&instances[2]),
        reached_before,
        "a request reached the instance DNS no longer lists"
    );
    // .13 still names its peers by the answer it gets, and still owns its session.
    let (status, body) = request(
        instances[2].addr,
        "GET",
        &poll_target("gone", &gone_sid, 0),
        "",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // A reload of the same file keeps the peers DNS gave (it lists none itself).
    let port = instances[1].addr.port();
    instances[1]
        .reloader
        .reload(config(instances[1].addr.ip(), port, &dns, backend.addr))
        .unwrap();
    assert_eq!(instances[1].peers(), ["127.0.0.11"]);

    // The name gone from DNS changes nothing: the lookups are counted, the set stays.
    let lookups = |result: &str| {
        metric_sum(
            &instances[1].metrics(),
            &format!("wsgate_peer_dns_lookups_total{{result=\"{result}\"}}"),
        )
    };
    dns.set_hosts("127.0.0.13 other.test\n");
    dns.reload();
    until("an empty or failed peer lookup is counted", || {
        lookups("empty") + lookups("failed") > 0.0
    })
    .await;
    assert_eq!(instances[1].peers(), ["127.0.0.11"]);

    // A dead resolver changes nothing: the lookups fail, are counted, and .12 still forwards.
    dns.stop();
    let failed = lookups("failed");
    until("a failed peer lookup is counted", || {
        lookups("failed") > failed
    })
    .await;
    assert_eq!(instances[1].peers(), ["127.0.0.11"]);
    let (status, body) = request(
        instances[1].addr,
        "GET",
        &poll_target("lp", &sid, ack),
        "",
        "",
    )
    .await;
    // Nothing new to deliver: the owner holds the poll and answers it empty, through the peer.
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["events"].as_array().map(Vec::len), Some(0), "{body}");
}
