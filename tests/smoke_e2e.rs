// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;
use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn text_round_trip_through_the_gateway() {
    let backend = echo_backend("b1").await;
    let gateway = start_gateway(&simple_config(&[backend.addr], "")).await;
    let mut ws = connect(gateway.addr, "/chat").await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("hello"));
    assert_eq!(backend_name(gateway.addr, "/").await, "b1");
}
