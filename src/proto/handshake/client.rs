//! The client side of the opening handshake (RFC 6455 §4.1), as the gateway speaks it towards
//! a backend: build the request, then validate the backend's response.

use super::headers;
use super::server::{WEBSOCKET_VERSION, accept_key};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use httparse::Header;
use std::fmt;

/// A fresh `Sec-WebSocket-Key` from 16 random bytes (the caller owns the randomness, so this
/// module stays free of I/O).
pub fn key_from_random(random: [u8; 16]) -> String {
    BASE64.encode(random)
}

/// What goes into the request towards the backend.
#[derive(Debug, Clone, Copy)]
pub struct ClientRequest<'a> {
    /// The `Host` header value (host, and port if not the default).
    pub host: &'a str,
    /// Origin-form target: `/path?query`.
    pub target: &'a str,
    pub key: &'a str,
    /// The subprotocol offers, comma-separated, as the client sent them.
    pub protocols: Option<&'a str>,
    /// The extension offers, comma-separated.
    pub extensions: Option<&'a str>,
    /// Further headers to carry (Origin, Cookie, Authorization, X-Forwarded-*...).
    pub extra: &'a [(&'a str, &'a [u8])],
}

/// Appends the upgrade request.
pub fn write_request(out: &mut Vec<u8>, request: &ClientRequest<'_>) {
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(request.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(request.host.as_bytes());
    out.extend_from_slice(
        b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: ",
    );
    out.extend_from_slice(WEBSOCKET_VERSION.as_bytes());
    out.extend_from_slice(b"\r\nSec-WebSocket-Key: ");
    out.extend_from_slice(request.key.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(protocols) = request.protocols {
        push_header(out, "Sec-WebSocket-Protocol", protocols.as_bytes());
    }
    if let Some(extensions) = request.extensions {
        push_header(out, "Sec-WebSocket-Extensions", extensions.as_bytes());
    }
    for (name, value) in request.extra {
        push_header(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head, borrowing from the read buffer.
#[derive(Debug, Clone, Copy)]
pub struct ResponseHead<'h, 'b> {
    pub status: u16,
    pub reason: &'b str,
    pub headers: &'h [Header<'b>],
}

/// Parses a response head; `Ok(None)` when incomplete.
pub fn parse_response<'h, 'b>(
    buf: &'b [u8],
    storage: &'h mut [Header<'b>],
) -> Result<Option<(ResponseHead<'h, 'b>, usize)>, ClientHandshakeError> {
    let mut response = httparse::Response::new(storage);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ClientHandshakeError::Malformed(e)),
    };
    let (Some(status), reason) = (response.code, response.reason.unwrap_or("")) else {
        return Err(ClientHandshakeError::Malformed(httparse::Error::Status));
    };
    Ok(Some((
        ResponseHead {
            status,
            reason,
            headers: response.headers,
        },
        len,
    )))
}

/// What the backend agreed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated<'b> {
    pub protocol: Option<&'b str>,
    /// The `Sec-WebSocket-Extensions` response value, if any.
    pub extensions: Option<&'b str>,
}

/// Why the backend's answer cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientHandshakeError {
    Malformed(httparse::Error),
    /// Any status but 101: the backend refused (its status is passed on to the client).
    Rejected {
        status: u16,
    },
    MissingUpgrade,
    BadAccept,
    /// The backend chose a subprotocol the client did not offer (§4.1 item 6).
    UnofferedProtocol,
    /// The backend chose an extension that was not offered (§4.1 item 5).
    UnofferedExtension,
}

impl fmt::Display for ClientHandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(e) => write!(f, "malformed HTTP response from backend: {e}"),
            Self::Rejected { status } => {
                write!(f, "backend refused the upgrade with status {status}")
            }
            Self::MissingUpgrade => {
                f.write_str("backend response lacks Upgrade: websocket / Connection: upgrade")
            }
            Self::BadAccept => f.write_str("backend sent a wrong Sec-WebSocket-Accept"),
            Self::UnofferedProtocol => {
                f.write_str("backend chose a subprotocol that was not offered")
            }
            Self::UnofferedExtension => {
                f.write_str("backend chose an extension that was not offered")
            }
        }
    }
}

impl std::error::Error for ClientHandshakeError {}

/// Headers of a backend's 101 that belong to the client too, in order: everything but the
/// hop-by-hop headers (RFC 9110 §7.6.1: `Connection`, those it names, and the classic list),
/// the WebSocket handshake's own (the gateway answers the client's handshake itself), and
/// framing headers. Values that are not UTF-8 are dropped rather than altered.
pub fn end_to_end_headers(headers: &[Header<'_>]) -> Vec<(String, String)> {
    const NOT_END_TO_END: &[&str] = &[
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    ];
    let named_by_connection = |name: &str| {
        headers::values(headers, "connection")
            .filter_map(|value| std::str::from_utf8(value).ok())
            .flat_map(headers::split_list)
            .any(|token| token.eq_ignore_ascii_case(name))
    };
    headers
        .iter()
        .filter(|header| {
            let name = header.name;
            !NOT_END_TO_END.iter().any(|n| n.eq_ignore_ascii_case(name))
                && !name
                    .get(..14)
                    .is_some_and(|prefix| prefix.eq_ignore_ascii_case("sec-websocket-"))
                && !named_by_connection(name)
        })
        .filter_map(|header| {
            let value = std::str::from_utf8(header.value).ok()?;
            Some((header.name.to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// Validates a backend's response to a request sent with `key` (§4.1, the client's checks).
pub fn validate_response<'b>(
    response: &ResponseHead<'_, 'b>,
    key: &str,
    offered_protocols: Option<&str>,
    offered_extensions: Option<&str>,
) -> Result<Negotiated<'b>, ClientHandshakeError> {
    if response.status != 101 {
        return Err(ClientHandshakeError::Rejected {
            status: response.status,
        });
    }
    if !headers::has_token(response.headers, "upgrade", "websocket")
        || !headers::has_token(response.headers, "connection", "upgrade")
    {
        return Err(ClientHandshakeError::MissingUpgrade);
    }
    match headers::single(response.headers, "sec-websocket-accept") {
        Ok(Some(accept)) if accept.trim_ascii() == accept_key(key).as_bytes() => {}
        _ => return Err(ClientHandshakeError::BadAccept),
    }
    let protocol = match headers::single(response.headers, "sec-websocket-protocol") {
        Ok(None) => None,
        Ok(Some(value)) => {
            let chosen = std::str::from_utf8(value)
                .map_err(|_| ClientHandshakeError::UnofferedProtocol)?
                .trim();
            let offered = offered_protocols
                .into_iter()
                .flat_map(headers::split_list)
                .any(|p| p == chosen);
            if !offered {
                return Err(ClientHandshakeError::UnofferedProtocol);
            }
            Some(chosen)
        }
        Err(headers::RepeatedHeader) => return Err(ClientHandshakeError::UnofferedProtocol),
    };
    let mut extensions = None;
    for value in headers::values(response.headers, "sec-websocket-extensions") {
        let value =
            std::str::from_utf8(value).map_err(|_| ClientHandshakeError::UnofferedExtension)?;
        for element in headers::split_list(value) {
            let name = headers::parse_extension(element).name;
            let offered = offered_extensions
                .into_iter()
                .flat_map(headers::split_list)
                .any(|offer| {
                    headers::parse_extension(offer)
                        .name
                        .eq_ignore_ascii_case(name)
                });
            if !offered {
                return Err(ClientHandshakeError::UnofferedExtension);
            }
        }
        if extensions.is_some() {
            // Several lines would have to be joined; no real server sends that for one extension.
            return Err(ClientHandshakeError::UnofferedExtension);
        }
        extensions = Some(value.trim());
    }
    Ok(Negotiated {
        protocol,
        extensions,
    })
}
