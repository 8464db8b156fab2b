//! Rooms shared by several room-service instances through Redis pub/sub (`--broker`).
//!
//! Every room event (messages, `joined`, `left`) an instance's hub produces is published on
//! `wsgate:room:<room>` as `<origin> <frame>`: the publishing process's origin in 16 hex digits,
//! a space, and the JSON frame exactly as its local members got it. Every instance subscribes to
//! the pattern `wsgate:room:*` on a connection of its own and hands events of other origins to
//! its hub, which delivers them to its local members of that room.
//!
//! Invariants:
//! - a member gets an event once: its own instance delivered it locally when it happened, and
//!   the subscriber drops events carrying this process's origin (Redis echoes them back);
//! - events leave in the hub's order through one publishing connection, and Redis delivers one
//!   connection's publications in order to every subscriber, which hands them to the hub one at
//!   a time: members see each sender's messages in the order they were sent;
//! - nothing waits on Redis while holding a room: the hub offers events to a bounded queue
//!   ([`QUEUE`]); the publisher and the subscriber reconnect by themselves with a capped
//!   back-off, and every publish and connect has a deadline; a quiet subscription is pinged
//!   ([`HEARTBEAT`]), so a Redis that stops answering is noticed like one that went away;
//! - input from Redis is checked like a client's: a payload over [`MAX_PAYLOAD`], from a
//!   channel that is not a valid room, or whose frame is not a well-formed event of that room
//!   is dropped and logged.
//!
//! What an outage loses (the README says the same): events published while Redis is
//! unreachable, or while this instance's subscription is down (the publishing connection is
//! renewed whenever the subscription is), never reach the other instances' members (they do reach this instance's members, and messages are still written to
//! the history database). After the subscription comes back, every room's history is read
//! again from the database on the next join, so late joiners see what live members missed.

use super::events::{ChatMessage, MAX_TEXT_LEN, clean_user, valid_room};
use super::hub::{Hub, Published, Remote};
use super::stats::Stats;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;

/// Events waiting to be published; beyond this they are counted lost instead of queued.
pub(crate) const QUEUE: usize = 4096;
/// Events sent to Redis in one pipelined round trip.
const BATCH: usize = 64;
/// Largest payload taken from Redis: a message frame is at most a few times
/// [`MAX_TEXT_LEN`] (JSON escapes), plus names.
const MAX_PAYLOAD: usize = 8 * MAX_TEXT_LEN + 1024;
/// Deadline of one connect, subscribe or publish round trip.
const DEADLINE: Duration = Duration::from_secs(2);
/// How often the subscription is checked with a PING while no event arrives: a Redis that
/// stops answering without closing the connection (a frozen process, a silently dropped
/// route) is noticed within this plus [`DEADLINE`].
const HEARTBEAT: Duration = Duration::from_secs(2);
/// First and longest pause between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

const CHANNEL_PREFIX: &str = "wsgate:room:";

/// A `redis://` URL that parsed; connections are made by [`spawn`].
#[derive(Clone, Debug)]
pub struct BrokerUrl(redis::Client);

impl BrokerUrl {
    /// Checks `url` without connecting.
    pub fn parse(url: &str) -> Result<Self, String> {
        redis::Client::open(url)
            .map(Self)
            .map_err(|error| format!("invalid broker URL {url:?}: {error}"))
    }
}

/// Starts the publisher (draining `events`) and the subscriber; both end when `stop` turns
/// `true`.
pub(crate) fn spawn(
    url: &BrokerUrl,
    hub: Arc<Hub>,
    events: mpsc::Receiver<Published>,
    stop: watch::Receiver<bool>,
) {
    hub.stats().broker_configured();
    tokio::spawn(publish(
        url.0.clone(),
        Arc::clone(&hub),
        events,
        stop.clone(),
    ));
    tokio::spawn(subscribe(url.0.clone(), hub, stop));
}

fn channel(room: &str) -> String {
    format!("{CHANNEL_PREFIX}{room}")
}

/// The wire form of an event: see the module docs.
fn envelope(origin: u64, frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(17 + frame.len());
    out.extend_from_slice(format!("{origin:016x} ").as_bytes());
    out.extend_from_slice(frame);
    out
}

/// A frame of another instance as it arrives; only what the hub needs is read.
#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    room: String,
    user: String,
    server: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
}

/// Why an event from Redis was dropped.
#[derive(Debug, PartialEq, Eq)]
enum Rejected {
    /// Published by this process: its members have it already.
    Own,
    Malformed(&'static str),
}

/// Reads one pub/sub message: the room and the event for the hub.
fn parse(own_origin: u64, channel: &str, payload: &[u8]) -> Result<(String, Remote), Rejected> {
    let room = channel
        .strip_prefix(CHANNEL_PREFIX)
        .filter(|room| valid_room(room))
        .ok_or(Rejected::Malformed("channel is not a room"))?;
    if payload.len() > MAX_PAYLOAD {
        return Err(Rejected::Malformed("payload too large"));
    }
    let (origin, frame) = payload
        .split_at_checked(17)
        .ok_or(Rejected::Malformed("no origin"))?;
    let origin = origin
        .strip_suffix(b" ")
        .and_then(|hex| std::str::from_utf8(hex).ok())
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .ok_or(Rejected::Malformed("no origin"))?;
    if origin == own_origin {
        return Err(Rejected::Own);
    }
    let parsed: Frame =
        serde_json::from_slice(frame).map_err(|_| Rejected::Malformed("frame is not an event"))?;
    if parsed.room != room {
        return Err(Rejected::Malformed("frame names another room"));
    }
    if clean_user(&parsed.user) != Some(parsed.user.as_str()) {
        return Err(Rejected::Malformed("invalid user name"));
    }
    let frame = Bytes::copy_from_slice(frame);
    let event = match (parsed.kind.as_str(), parsed.text, parsed.seq) {
        ("message", Some(text), Some(seq)) if text.len() <= MAX_TEXT_LEN => {
            let message = ChatMessage {
                room: room.into(),
                user: parsed.user.into(),
                text,
                server: parsed.server.into(),
                seq,
                origin,
            };
            Remote::Message(Arc::new(message), frame)
        }
        ("joined" | "left", None, None) => Remote::Notice(frame),
        _ => return Err(Rejected::Malformed("not a message or notice")),
    };
    Ok((room.to_owned(), event))
}

/// Waits `pause` unless the service stops first; `false` if it did.
async fn pause_unless_stopped(pause: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(pause) => true,
        _ = stop.wait_for(|stopped| *stopped) => false,
    }
}

fn next_backoff(backoff: Duration) -> Duration {
    (backoff * 2).min(BACKOFF_MAX)
}

/// Publishes the hub's events in order, in pipelined batches. A batch that fails is counted
/// lost rather than retried: a publish whose reply was lost may have been delivered, and a
/// retry would deliver it twice.
async fn publish(
    client: redis::Client,
    hub: Arc<Hub>,
    mut events: mpsc::Receiver<Published>,
    mut stop: watch::Receiver<bool>,
) {
    let stats = hub.stats();
    let origin = hub.origin();
    let mut connection: Option<redis::aio::MultiplexedConnection> = None;
    // `broker_subscriptions` when `connection` was made.
    let mut made_at = 0;
    let mut backoff = BACKOFF_MIN;
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        batch.clear();
        tokio::select! {
            received = events.recv_many(&mut batch, BATCH) => if received == 0 { return },
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        let count = batch.len() as u64;
        // The subscriber reconnected since this connection was made: Redis went away, and
        // this connection most likely with it. A fresh one keeps the first events after an
        // outage from failing on a dead socket.
        let subscriptions = stats.broker_subscriptions.load(Ordering::Relaxed);
        if subscriptions != made_at {
            connection = None;
        }
        if connection.is_none() {
            match timeout(DEADLINE, client.get_multiplexed_async_connection()).await {
                Ok(Ok(made)) => {
                    connection = Some(made);
                    made_at = subscriptions;
                }
                Ok(Err(error)) => tracing::debug!(%error, "broker: cannot connect to publish"),
                Err(_) => tracing::debug!("broker: connecting to publish timed out"),
            }
        }
        let Some(conn) = connection.as_mut() else {
            Stats::add(&stats.broker_lost, count);
            // Drop what queues meanwhile too, rather than publishing it late, but do not spin.
            if !pause_unless_stopped(backoff, &mut stop).await {
                return;
            }
            backoff = next_backoff(backoff);
            continue;
        };
        let mut pipe = redis::pipe();
        for event in &batch {
            pipe.cmd("PUBLISH")
                .arg(channel(&event.room))
                .arg(envelope(origin, &event.frame))
                .ignore();
        }
        match timeout(DEADLINE, pipe.query_async::<()>(conn)).await {
            Ok(Ok(())) => {
                Stats::add(&stats.broker_published, count);
                backoff = BACKOFF_MIN;
            }
            failed => {
                Stats::add(&stats.broker_lost, count);
                match failed {
                    Ok(Err(error)) => {
                        tracing::warn!(%error, lost = count, "broker: publish failed")
                    }
                    _ => tracing::warn!(lost = count, "broker: publish timed out"),
                }
                connection = None;
            }
        }
    }
}

/// Keeps a pattern subscription open, reconnecting after any failure, and hands other
/// instances' events to the hub in the order they arrive.
async fn subscribe(client: redis::Client, hub: Arc<Hub>, mut stop: watch::Receiver<bool>) {
    let stats = hub.stats();
    let pattern = format!("{CHANNEL_PREFIX}*");
    let mut backoff = BACKOFF_MIN;
    let mut ever_subscribed = false;
    loop {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.psubscribe(&pattern).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match timeout(DEADLINE, subscribed).await {
            Ok(Ok(pubsub)) => {
                backoff = BACKOFF_MIN;
                if ever_subscribed {
                    // Events of other instances may have been missed while we were away.
                    hub.unseed_all();
                }
                ever_subscribed = true;
                Stats::add(&stats.broker_subscriptions, 1);
                if stats.set_broker_up(true) {
                    tracing::info!("broker: subscribed to {pattern}");
                }
                let (mut sink, mut messages) = pubsub.split();
                let mut heartbeat = tokio::time::interval(HEARTBEAT);
                heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    let message = tokio::select! {
                        message = messages.next() => Some(message),
                        _ = heartbeat.tick() => None,
                        _ = stop.wait_for(|stopped| *stopped) => return,
                    };
                    let Some(message) = message else {
                        match timeout(DEADLINE, sink.ping::<()>()).await {
                            Ok(Ok(())) => continue,
                            Ok(Err(error)) => tracing::warn!(%error, "broker: ping failed"),
                            Err(_) => tracing::warn!("broker: no answer to ping"),
                        }
                        break;
                    };
                    let Some(message) = message else { break };
                    heartbeat.reset();
                    let channel = message.get_channel_name();
                    match parse(hub.origin(), channel, message.get_payload_bytes()) {
                        Ok((room, event)) => {
                            Stats::add(&stats.broker_received, 1);
                            hub.deliver_remote(&room, event);
                        }
                        Err(Rejected::Own) => {}
                        Err(Rejected::Malformed(why)) => {
                            tracing::warn!(%channel, why, "broker: dropped an event");
                        }
                    }
                }
                if stats.set_broker_up(false) {
                    tracing::warn!("broker: subscription lost; reconnecting");
                }
            }
            Ok(Err(error)) => {
                if stats.set_broker_up(false) || !ever_subscribed {
                    tracing::warn!(%error, "broker: cannot subscribe; retrying");
                }
            }
            Err(_) => {
                if stats.set_broker_up(false) || !ever_subscribed {
                    tracing::warn!("broker: subscribing timed out; retrying");
                }
            }
        }
        if !pause_unless_stopped(backoff, &mut stop).await {
            return;
        }
        backoff = next_backoff(backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(origin: u64, frame: &str) -> Vec<u8> {
        envelope(origin, frame.as_bytes())
    }

    const MESSAGE: &str =
        r#"{"type":"message","room":"r","user":"alice","text":"hi","server":"a","seq":3}"#;

    #[test]
    fn events_round_trip_and_own_events_are_dropped() {
        let (room, event) = parse(1, "wsgate:room:r", &payload(0xabc, MESSAGE)).unwrap();
        assert_eq!(room, "r");
        let Remote::Message(message, frame) = event else {
            panic!("expected a message");
        };
        assert_eq!(
            (
                &*message.user,
                message.text.as_str(),
                message.seq,
                message.origin
            ),
            ("alice", "hi", 3, 0xabc)
        );
        assert_eq!(&frame[..], MESSAGE.as_bytes());
        assert_eq!(
            parse(0xabc, "wsgate:room:r", &payload(0xabc, MESSAGE)).unwrap_err(),
            Rejected::Own
        );
        let notice = r#"{"type":"left","room":"r","user":"bob","server":"b"}"#;
        assert!(matches!(
            parse(1, "wsgate:room:r", &payload(2, notice)),
            Ok((_, Remote::Notice(_)))
        ));
    }

    #[test]
    fn malformed_events_are_rejected() {
        let long_text = format!(
            r#"{{"type":"message","room":"r","user":"a","text":"{}","server":"a","seq":1}}"#,
            "x".repeat(MAX_TEXT_LEN + 1)
        );
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("other:r", payload(2, MESSAGE)),
            ("wsgate:room:a/b", payload(2, MESSAGE)),
            ("wsgate:room:other", payload(2, MESSAGE)),
            ("wsgate:room:r", b"short".to_vec()),
            ("wsgate:room:r", b"zzzzzzzzzzzzzzzz {}".to_vec()),
            ("wsgate:room:r", payload(2, "not json")),
            ("wsgate:room:r", payload(2, &MESSAGE.replace("alice", "  "))),
            (
                "wsgate:room:r",
                payload(2, &MESSAGE.replace("message", "history")),
            ),
            ("wsgate:room:r", payload(2, &long_text)),
            ("wsgate:room:r", vec![b'0'; MAX_PAYLOAD + 1]),
        ];
        for (channel, payload) in cases {
            assert!(
                matches!(parse(1, channel, &payload), Err(Rejected::Malformed(_))),
                "{channel} {:?}",
                String::from_utf8_lossy(&payload[..payload.len().min(80)])
            );
        }
    }
}
