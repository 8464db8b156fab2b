//! RFC 6455, sans I/O: frames, masking, UTF-8, close codes and the opening handshakes.
//!
//! Nothing in this module touches a socket, a clock or the gateway's configuration: it turns
//! bytes into values and values into bytes (time, where a rule needs it, is passed in), so the
//! relay, the sessions, the fuzz targets and the benchmarks all drive the same code. Sections covered: §4 (handshakes), §5.1-5.5 (framing, masking,
//! fragmentation, control frames), §7.4 (close codes), §8.1 (UTF-8), the RSV1 rule of
//! RFC 7692, and its negotiation (`deflate`).

pub mod close;
pub mod decoder;
pub mod deflate;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod keepalive;
pub mod mask;
pub mod utf8;

pub use close::{CloseCode, ClosePayload, close_frame, parse_close_payload};
pub use decoder::{
    Decoded, DecoderConfig, FrameDecoder, Item, MIN_BUFFER_LEN, Payload, Role, WholeMessage,
};
pub use error::ProtocolError;
pub use frame::{ControlFrame, FrameHeader, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, MaskKey, OpCode};
pub use keepalive::{Keepalive, KeepaliveDue, PING_PAYLOAD};
pub use mask::{apply_mask, remask};
pub use utf8::Utf8Validator;
