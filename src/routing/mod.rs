//! Routing: which route a handshake matches, which key makes it sticky, and which backend of
//! the route's upstream serves it.
//!
//! This module is pure: no I/O, no tokio, no clock, no randomness. Everything here is a
//! function of the configuration, the request and the counters the caller maintains, which is
//! what makes the decisions testable and identical on every gateway instance.
//!
//! Invariants:
//! - [`RouteTable::route`] returns the index of the first matching route in configuration
//!   order and allocates nothing;
//! - [`extract_key`] returns `None` rather than an empty key, so key-less requests never pile
//!   onto the one backend an empty string would hash to;
//! - the backend for a key depends only on the key and the set of backend URLs and weights,
//!   never on configuration order, gateway instance or wsgate version (see [`hash`] for the
//!   frozen algorithm); removing a backend moves only its keys, adding one moves keys only
//!   onto it;
//! - a backend's connection count is exactly its number of live [`ConnectionSlot`]s.
//!
//! The per-request flow: `RouteTable::route` -> `extract_key` (or the sticky cookie via
//! [`UpstreamBalancer::backend_for_cookie`]) -> [`UpstreamBalancer::choose`] ->
//! [`UpstreamBalancer::acquire`], holding the slot for the life of the connection.

mod balancer;
pub mod hash;
pub mod path;
mod sticky;
mod table;

pub use balancer::{ConnectionSlot, UpstreamBalancer, cookie_value};
pub use hash::{pick, rank};
pub use sticky::{HeaderField, RequestParts, extract_key};
pub use table::RouteTable;
