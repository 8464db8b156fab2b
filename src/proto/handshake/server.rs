//! The server side of the opening handshake (RFC 6455 §4.2): parse the client's request head,
//! validate it as an upgrade, and write the 101 or the error response.

use super::headers::{self, Extension};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use httparse::Header;
use std::fmt;

/// The GUID of RFC 6455 §1.3, appended to the key before hashing.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The only version RFC 6455 defines (§4.1, §11.6).
pub const WEBSOCKET_VERSION: &str = "13";

/// A parsed HTTP/1.x request head; every field borrows from the read buffer.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'h, 'b> {
    pub method: &'b str,
    /// The request target as sent: origin-form `/path?query` in practice.
    pub target: &'b str,
    /// The minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: &'h [Header<'b>],
}

impl<'h, 'b> RequestHead<'h, 'b> {
    /// The path without the query.
    pub fn path(&self) -> &'b str {
        self.target
            .split_once('?')
            .map_or(self.target, |(path, _)| path)
    }

    /// The raw query, without `?`.
    pub fn query(&self) -> Option<&'b str> {
        self.target.split_once('?').map(|(_, query)| query)
    }

    /// The first value of a header, if it is UTF-8.
    pub fn header(&self, name: &str) -> Option<&'b str> {
        headers::values(self.headers, name)
            .next()
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Whether the client asks for a WebSocket (`Upgrade: websocket`). A request that does not
    /// is ordinary HTTP, not a failed handshake.
    pub fn wants_websocket(&self) -> bool {
        headers::has_token(self.headers, "upgrade", "websocket")
    }
}

/// Why a handshake request was refused: an HTTP status and a one-line reason for the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The bytes are not an HTTP/1.x request head.
    Malformed(httparse::Error),
    /// More header fields than the parser has room for.
    TooManyHeaders,
    /// The head is larger than the configured limit.
    HeadTooLarge {
        max: usize,
    },
    MethodNotGet,
    NotHttp11,
    /// Host missing or repeated (RFC 9112 §3.2 requires exactly one).
    BadHost,
    /// Host is not `host [ ":" port ]` ([`headers::is_valid_host`]).
    InvalidHost,
    /// `Connection` lacks the `upgrade` token.
    ConnectionNotUpgrade,
    /// `Upgrade` lacks the `websocket` token.
    UpgradeNotWebSocket,
    /// `Sec-WebSocket-Version` missing or not 13: answered with 426 and the version we speak.
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` missing, repeated, or not the base64 of 16 bytes.
    BadKey,
    /// A `Sec-WebSocket-Protocol` offer that is not a token.
    BadSubprotocol,
    /// `Transfer-Encoding` or a non-zero `Content-Length`: the bytes after the head would
    /// otherwise be taken for the client's first frames.
    HasBody,
}

impl HandshakeError {
    pub fn status(&self) -> u16 {
        match self {
            Self::TooManyHeaders | Self::HeadTooLarge { .. } => 431,
            Self::MethodNotGet => 405,
            Self::UnsupportedVersion => 426,
            _ => 400,
        }
    }
}

impl HandshakeError {
    /// A one-word name for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::TooManyHeaders => "too_many_headers",
            Self::HeadTooLarge { .. } => "head_too_large",
            Self::MethodNotGet => "method",
            Self::NotHttp11 => "http_version",
            Self::BadHost | Self::InvalidHost => "host",
            Self::ConnectionNotUpgrade => "connection_header",
            Self::UpgradeNotWebSocket => "upgrade_header",
            Self::UnsupportedVersion => "websocket_version",
            Self::BadKey => "key",
            Self::BadSubprotocol => "subprotocol",
            Self::HasBody => "body",
        }
    }

    /// Headers the refusal must carry: the version we speak with 426 (§4.4), the allowed
    /// method with 405 (RFC 9110 §15.5.6).
    pub fn extra_headers(&self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::UnsupportedVersion => &[("Sec-WebSocket-Version", WEBSOCKET_VERSION)],
            Self::MethodNotGet => &[("Allow", "GET")],
            _ => &[],
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(e) => write!(f, "malformed HTTP request: {e}"),
            Self::TooManyHeaders => f.write_str("too many header fields"),
            Self::HeadTooLarge { max } => write!(f, "request head larger than {max} bytes"),
            Self::MethodNotGet => f.write_str("a WebSocket handshake must use GET"),
            Self::NotHttp11 => f.write_str("a WebSocket handshake requires HTTP/1.1"),
            Self::BadHost => f.write_str("exactly one Host header is required"),
            Self::InvalidHost => {
                f.write_str("Host must be a host name or an IP literal, with an optional port")
            }
            Self::ConnectionNotUpgrade => f.write_str("Connection header must contain \"upgrade\""),
            Self::UpgradeNotWebSocket => f.write_str("Upgrade header must contain \"websocket\""),
            Self::UnsupportedVersion => f.write_str("Sec-WebSocket-Version must be 13"),
            Self::BadKey => {
                f.write_str("Sec-WebSocket-Key must be the base64 encoding of 16 bytes")
            }
            Self::BadSubprotocol => f.write_str("Sec-WebSocket-Protocol offers must be tokens"),
            Self::HasBody => f.write_str("a WebSocket handshake carries no body"),
        }
    }
}

impl std::error::Error for HandshakeError {}

/// Parses a request head from the start of `buf` into `storage`.
///
/// `Ok(None)`: incomplete, read more. `Ok(Some((head, len)))`: the head is `buf[..len]`; what
/// follows is not part of the handshake.
pub fn parse_request<'h, 'b>(
    buf: &'b [u8],
    storage: &'h mut [Header<'b>],
) -> Result<Option<(RequestHead<'h, 'b>, usize)>, HandshakeError> {
    let mut request = httparse::Request::new(storage);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
        Err(e) => return Err(HandshakeError::Malformed(e)),
    };
    // httparse fills all three on Complete.
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Err(HandshakeError::Malformed(httparse::Error::Token));
    };
    Ok(Some((
        RequestHead {
            method,
            target,
            version,
            headers: request.headers,
        },
        len,
    )))
}

/// A request validated as a WebSocket upgrade (§4.2.1).
#[derive(Debug, Clone, Copy)]
pub struct Upgrade<'b> {
    pub host: &'b str,
    /// The client's `Sec-WebSocket-Key`, validated.
    pub key: &'b str,
    pub origin: Option<&'b str>,
}

/// Checks every requirement of §4.2.1 on a request head, in the order a client is most helped
/// by: method, version, Host, Upgrade/Connection, WebSocket version, key, subprotocol syntax.
pub fn validate_upgrade<'b>(request: &RequestHead<'_, 'b>) -> Result<Upgrade<'b>, HandshakeError> {
    if request.method != "GET" {
        return Err(HandshakeError::MethodNotGet);
    }
    if request.version < 1 {
        return Err(HandshakeError::NotHttp11);
    }
    let announces_body = |h: &httparse::Header<'_>| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("content-length")
                && !h.value.trim_ascii().iter().all(|&b| b == b'0'))
    };
    if request.headers.iter().any(announces_body) {
        return Err(HandshakeError::HasBody);
    }
    let host = match headers::single(request.headers, "host") {
        Ok(Some(host)) if !host.is_empty() => {
            std::str::from_utf8(host).map_err(|_| HandshakeError::BadHost)?
        }
        _ => return Err(HandshakeError::BadHost),
    };
    // The value is routed on and copied into the backend's request and forwarding headers.
    if !headers::is_valid_host(host) {
        return Err(HandshakeError::InvalidHost);
    }
    if !request.wants_websocket() {
        return Err(HandshakeError::UpgradeNotWebSocket);
    }
    if !headers::has_token(request.headers, "connection", "upgrade") {
        return Err(HandshakeError::ConnectionNotUpgrade);
    }
    match headers::single(request.headers, "sec-websocket-version") {
        Ok(Some(version)) if version.trim_ascii() == WEBSOCKET_VERSION.as_bytes() => {}
        _ => return Err(HandshakeError::UnsupportedVersion),
    }
    let key = match headers::single(request.headers, "sec-websocket-key") {
        Ok(Some(key)) => {
            std::str::from_utf8(key.trim_ascii()).map_err(|_| HandshakeError::BadKey)?
        }
        _ => return Err(HandshakeError::BadKey),
    };
    if !is_valid_key(key) {
        return Err(HandshakeError::BadKey);
    }
    if !offered_protocols(request.headers).all(headers::is_token) {
        return Err(HandshakeError::BadSubprotocol);
    }
    let origin = request.header("origin");
    Ok(Upgrade { host, key, origin })
}

/// §4.1: "a randomly selected 16-byte value that has been base64-encoded".
pub fn is_valid_key(key: &str) -> bool {
    let mut decoded = [0u8; 18];
    key.len() == 24 && matches!(BASE64.decode_slice(key, &mut decoded), Ok(16))
}

/// The subprotocols the client offers, in its order of preference.
pub fn offered_protocols<'h, 'b>(headers: &'h [Header<'b>]) -> impl Iterator<Item = &'b str> + 'h {
    headers::list_elements(headers, "sec-websocket-protocol")
}

/// The extensions the client offers.
pub fn offered_extensions<'h, 'b>(
    headers: &'h [Header<'b>],
) -> impl Iterator<Item = Extension<'b>> + 'h {
    headers::list_elements(headers, "sec-websocket-extensions").map(headers::parse_extension)
}

/// `Sec-WebSocket-Accept` for a key: base64(SHA-1(key + GUID)), always 28 bytes.
pub fn accept_key(key: &str) -> String {
    let mut sha1 = sha1_smol::Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(WEBSOCKET_GUID.as_bytes());
    BASE64.encode(sha1.digest().bytes())
}

/// Appends a `101 Switching Protocols` response for the client's `key`. `extra` headers are
/// written as given (e.g. `Set-Cookie` for sticky routing).
pub fn write_accept_response(
    out: &mut Vec<u8>,
    key: &str,
    protocol: Option<&str>,
    extensions: Option<&str>,
    extra: &[(&str, &str)],
) {
    write_switching_protocols(out, &accept_key(key), protocol, extensions, extra);
}

/// Appends a `101 Switching Protocols` response carrying an already computed `accept` value.
pub fn write_switching_protocols(
    out: &mut Vec<u8>,
    accept: &str,
    protocol: Option<&str>,
    extensions: Option<&str>,
    extra: &[(&str, &str)],
) {
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    out.extend_from_slice(accept.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(protocol) = protocol {
        write_header(out, "Sec-WebSocket-Protocol", protocol);
    }
    if let Some(extensions) = extensions {
        write_header(out, "Sec-WebSocket-Extensions", extensions);
    }
    for (name, value) in extra {
        write_header(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends the response for a refused handshake: the status, a one-line plain-text body naming
/// the problem, `Sec-WebSocket-Version: 13` with 426 (§4.4), `Allow: GET` with 405.
pub fn write_error_response(out: &mut Vec<u8>, error: &HandshakeError) {
    write_plain_response(
        out,
        error.status(),
        &error.to_string(),
        error.extra_headers(),
    );
}

/// Appends a complete `Connection: close` response with a one-line text body.
pub fn write_plain_response(out: &mut Vec<u8>, status: u16, body: &str, extra: &[(&str, &str)]) {
    use std::io::Write;
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", reason_phrase(status));
    for (name, value) in extra {
        write_header(out, name, value);
    }
    let _ = write!(
        out,
        "Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        body.len() + 1
    );
}

fn write_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The reason phrase for the statuses the gateway itself produces.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        501 => "Not Implemented",
        504 => "Gateway Timeout",
        _ => "",
    }
}
