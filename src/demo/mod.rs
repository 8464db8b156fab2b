//! Demo backends for trying the gateway end to end.
//!
//! [`room_service`] is a small chat-room server in the style of a Socket.IO chat. It speaks
//! WebSocket through `fastwebsockets` and HTTP through `hyper`, never through wsgate's own codec,
//! so whenever the gateway fronts it, both ends of every relayed frame were produced by
//! independent implementations. Every event it sends names the instance (`"server"`), which is
//! what makes sticky routing visible: all members of a room must see the same server name.

pub mod room_service;

mod events;
mod halves;
mod hub;

/// The chat page the room service serves on `/` and `/rooms/<room>`; dependency-free, it opens
/// a browser `WebSocket` to the host it was loaded from, so it works directly against a room
/// service or through the gateway.
pub const CHAT_HTML: &str = include_str!("chat.html");
