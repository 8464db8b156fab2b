//! wsgate: a protocol-level WebSocket gateway.
//!
//! Layers, lowest first; a module uses only its own layer or lower ones (see
//! `ARCHITECTURE.md` for the byte flow):
//! - pure, no I/O: [`proto`] (RFC 6455 codec and handshakes), [`config`] (YAML → typed,
//!   validated), [`routing`] (route table, sticky keys, consistent hashing, balancing),
//!   [`limits`] (token buckets), [`forwarded`] (the headers a request carries to its backend),
//!   [`client_addr`] (the client's address behind trusted proxies);
//! - runtime: [`auth`] (JWT on the handshake: verification is pure, the time passed in; key
//!   files read at build time), [`stream`], [`tls`], [`upstream`] (backend connect + client
//!   handshake),
//!   [`relay`] (the frame pump), [`metrics`] (counters for the admin listener),
//!   [`recent_errors`] (the dashboard's ring of recent failures), [`resources`] (the
//!   open-file limit and the gateway's own exhaustion), [`proxy_protocol`] (a connection's
//!   PROXY header);
//! - wiring: [`gateway`] (compiled config), [`admit`] (origin, limits, sticky pick, backend
//!   handshake), [`authorize`] (a route's auth applied to a request, refusals counted), [`front`] (one client connection up to the relay, or plain HTTP),
//!   [`session`] (long-polling and resumable sessions), [`health`] (active and passive backend
//!   checks), [`rebalance`] (moving connections whose sticky key changed backend),
//!   [`discovery`] (backends from DNS, applied like reloads), [`admin`]
//!   (metrics, health endpoints and the live dashboard), [`listener`] (accept), [`server`] (the
//!   whole process);
//! - beside the gateway: [`demo`], the chat-room backend the demo runs behind it, built on
//!   fastwebsockets rather than on [`proto`].

pub mod client_addr;
pub mod config;
pub mod forwarded;
pub mod limits;
pub mod proto;
pub mod routing;

pub mod auth;
pub mod handover;
pub mod metrics;
pub mod proxy_protocol;
pub mod recent_errors;
pub mod relay;
pub mod resources;
pub mod stream;
pub mod tls;
pub mod upstream;

pub mod admin;
pub mod admit;
pub mod authorize;
pub mod cluster;
pub mod discovery;
pub mod drain;
pub mod front;
pub mod gateway;
pub mod health;
pub mod incident;
pub mod listener;
pub mod rebalance;
pub mod server;
pub mod session;

pub mod demo;

#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
