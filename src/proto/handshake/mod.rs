//! The opening handshake (RFC 6455 §4): the server side towards clients, the client side
//! towards backends. Parsing borrows from the caller's buffer (httparse); nothing here does I/O.

pub mod client;
pub mod headers;
pub mod server;

pub use client::{
    ClientHandshakeError, ClientRequest, Negotiated, ResponseHead, end_to_end_headers,
    key_from_random, parse_response, validate_response, write_request,
};
pub use headers::Extension;

/// Header fields a request head may carry. More is refused with 431.
pub const MAX_HEADERS: usize = 96;
pub use server::{
    HandshakeError, RequestHead, Upgrade, accept_key, parse_request, validate_upgrade,
    write_accept_response, write_error_response, write_plain_response,
};

#[cfg(test)]
mod tests;
