//! wsgate: a protocol-level WebSocket gateway.
//!
//! See `ARCHITECTURE.md` for the module map and the dependency rule.

pub mod config;
pub mod proto;
pub mod routing;
pub mod tls;
