//! The frame relay: one task per proxied connection, moving frames both ways between the client
//! and the backend while enforcing RFC 6455 on each hop.
//!
//! Bytes are read into a hop's pooled buffer, decoded in place, transformed in place (client
//! frames get a fresh mask key written over theirs and their payload re-masked in one pass;
//! backend frames pass unchanged) and written to the other hop from the same buffer. Frame
//! headers keep their length through this, so no byte is ever moved to make room.
//!
//! Routes that terminate permessage-deflate are the exception: `compress` rewrites their data
//! frames into a second buffer per direction (see its invariants).
//!
//! The logic is [`Connection`], a state machine without I/O or clock (its invariants are
//! documented there); [`Relay`] is the driver that owns the sockets and the timer.

pub mod buffer;
pub mod compress;
pub mod connection;
pub mod credentials;
pub mod driver;
pub mod ending;
pub mod hop;
pub mod mask_keys;
pub mod outbox;
#[cfg(any(test, fuzzing))]
pub mod simulation;

pub use compress::{RelayCompression, Terminated, Window};
pub use connection::{Connection, RelaySettings, Stop};
pub use credentials::{Credentials, Refresh, VerifyRefresh};
pub use driver::{HopStart, Relay};
pub use ending::{Cause, HopReport, Initiator, RelayReport};
pub use hop::Side;
