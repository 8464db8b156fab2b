//! Demo backends for trying the gateway end to end.
//!
//! [`room_service`] is a small chat-room server in the style of a Socket.IO chat. It speaks
//! WebSocket through `fastwebsockets` and HTTP through `hyper`, never through wsgate's own codec,
//! so whenever the gateway fronts it, both ends of every relayed frame were produced by
//! independent implementations. Every event it sends names the instance (`"server"`), which is
//! what makes sticky routing visible: all members of a room must see the same server name.
//!
//! Like the apps wsgate fronts, it scales out: [`broker`] shares rooms between instances through
//! Redis pub/sub, [`store`] keeps history in PostgreSQL. Both are optional; without them an
//! instance is self-contained.

pub mod broker;
pub mod room_service;
pub mod store;

mod events;
mod halves;
mod hub;
mod stats;

/// The chat page the room service serves on `/` and `/rooms/<room>`; dependency-free, it opens
/// a browser `WebSocket` to the host it was loaded from, so it works directly against a room
/// service or through the gateway.
pub const CHAT_HTML: &str = include_str!("chat.html");

/// The numbers page on `/dashboard`: the instance's counters, pushed once per second at most
/// over `/dashboard/ws`.
pub const DASHBOARD_HTML: &str = include_str!("dashboard.html");
