//! The PROXY protocol (HAProxy's, versions 1 and 2) on a listener with `proxy_protocol: true`:
//! the load balancer in front writes the client's address before the connection's own bytes.
//!
//! Invariants:
//! - only a connection from the listener's `trusted_proxies` gets here (checked at accept);
//! - exactly the header's bytes are consumed, so TLS or HTTP starts on the next byte: bytes
//!   are only peeked until a header is known to continue past them (every byte of an
//!   incomplete header is the header's), and then read;
//! - the header arrives within the handshake deadline and is at most [`MAX_HEADER_BYTES`]
//!   long, or the connection is refused.
//!
//! Parsing is [`ppp`]'s; [`parse`] is pure and [`read_header`] is its driver.

use ppp::{PartialResult, v1, v2};
use std::io;
use std::net::SocketAddr;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Longest header accepted: a v1 header is at most 107 bytes; a v2 header's address block and
/// TLVs (which cloud balancers use for endpoint ids and TLS details) fit easily. Sized so
/// that holding one is cheap, and the v2 length field (up to 64 KiB) cannot make it more.
pub const MAX_HEADER_BYTES: usize = 1024;

/// The 12 bytes a v2 header starts with; its length field follows the version and family.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED: usize = 16;
/// A v1 header's longest form, line end included.
const V1_MAX: usize = 107;

/// What a complete header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client the balancer relayed.
    Client(SocketAddr),
    /// The balancer's own connection (v2 `LOCAL`, a health check) or one whose client has no
    /// IP address (v1 `UNKNOWN`, v2 unspecified or Unix): the connection's address stands.
    Connection,
}

/// The outcome of parsing what has arrived so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// Every byte so far is a valid beginning of a header.
    Incomplete,
    /// A header of `len` bytes.
    Complete { source: Source, len: usize },
    /// Not a PROXY header.
    Malformed(String),
    /// A header longer than [`MAX_HEADER_BYTES`].
    TooLarge,
}

/// Parses the start of a connection's bytes.
pub fn parse(buf: &[u8]) -> Parse {
    let v1_prefix = &b"PROXY "[..buf.len().min(6)];
    if buf.starts_with(v1_prefix) {
        parse_v1(buf)
    } else {
        parse_v2(buf)
    }
}

/// A v1 header is one line, judged whole at its first CRLF: ppp calls some prefixes cut at a
/// space invalid (an empty port) and takes a bare LF for a line end, while TCP may deliver
/// a header in pieces and `UNKNOWN` may carry anything up to the CRLF.
fn parse_v1(buf: &[u8]) -> Parse {
    let Some(end) = buf.windows(2).position(|pair| pair == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Parse::TooLarge
        } else {
            Parse::Incomplete
        };
    };
    let len = end + 2;
    if len > V1_MAX {
        return Parse::TooLarge;
    }
    match v1::Header::try_from(&buf[..len]) {
        // ppp ends the line at the first CR; one not followed by LF is not a line end.
        Ok(header) if header.header.len() != len => {
            Parse::Malformed("a carriage return inside the line".to_owned())
        }
        Ok(header) => {
            let source = match header.addresses {
                v1::Addresses::Tcp4(a) => {
                    Source::Client(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                v1::Addresses::Tcp6(a) => {
                    Source::Client(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                v1::Addresses::Unknown => Source::Connection,
            };
            Parse::Complete { source, len }
        }
        Err(error) => Parse::Malformed(error.to_string()),
    }
}

fn parse_v2(buf: &[u8]) -> Parse {
    if buf.len() >= V2_FIXED && buf.starts_with(V2_SIGNATURE) {
        let len = V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if len > MAX_HEADER_BYTES {
            return Parse::TooLarge;
        }
    }
    let result = v2::Header::try_from(buf);
    if result.is_incomplete() {
        // The length check above bounds a v2 header; this only guards the invariant.
        return if buf.len() >= MAX_HEADER_BYTES {
            Parse::TooLarge
        } else {
            Parse::Incomplete
        };
    }
    match result {
        Ok(header) => {
            let source = match (header.command, header.addresses) {
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Source::Client(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Source::Client(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                _ => Source::Connection,
            };
            Parse::Complete {
                source,
                len: header.len(),
            }
        }
        Err(error) => Parse::Malformed(error.to_string()),
    }
}

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("PROXY protocol header longer than {MAX_HEADER_BYTES} bytes")]
    TooLarge,
    #[error("PROXY protocol header not received in time")]
    TimedOut,
    #[error("connection closed before its PROXY protocol header")]
    Closed,
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] io::Error),
}

impl HeaderError {
    /// The `reason` label of `wsgate_refused_total`; `None` for a client that went away.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Self::Malformed(_) => Some("proxy_malformed"),
            Self::TooLarge => Some("proxy_too_large"),
            Self::TimedOut => Some("proxy_timeout"),
            Self::Closed | Self::Io(_) => None,
        }
    }
}

/// Reads a connection's PROXY header, and nothing after it, by `deadline`.
pub async fn read_header(tcp: &mut TcpStream, deadline: Instant) -> Result<Source, HeaderError> {
    match tokio::time::timeout_at(deadline, read(tcp)).await {
        Ok(result) => result,
        Err(_) => Err(HeaderError::TimedOut),
    }
}

async fn read(tcp: &mut TcpStream) -> Result<Source, HeaderError> {
    let mut buf = [0u8; MAX_HEADER_BYTES];
    // Bytes already taken off the socket, all of them the header's.
    let mut consumed = 0;
    loop {
        let peeked = tcp.peek(&mut buf[consumed..]).await?;
        if peeked == 0 {
            return Err(HeaderError::Closed);
        }
        let seen = consumed + peeked;
        match parse(&buf[..seen]) {
            Parse::Complete { source, len } => {
                tcp.read_exact(&mut buf[consumed..len]).await?;
                return Ok(source);
            }
            Parse::Incomplete => {
                // Taken off the socket so that the next peek waits for new bytes instead of
                // returning these again at once.
                tcp.read_exact(&mut buf[consumed..seen]).await?;
                consumed = seen;
            }
            Parse::Malformed(why) => return Err(HeaderError::Malformed(why)),
            Parse::TooLarge => return Err(HeaderError::TooLarge),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.push(0x20 | command);
        header.push(family);
        header.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        header.extend_from_slice(addresses);
        header
    }

    #[test]
    fn a_v1_header_names_the_client_and_its_length() {
        let bytes = b"PROXY TCP4 192.0.2.7 198.51.100.1 4000 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(bytes),
            Parse::Complete {
                source: Source::Client("192.0.2.7:4000".parse().unwrap()),
                len: 44,
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Parse::Complete {
                source: Source::Connection,
                len: 15
            }
        );
    }

    #[test]
    fn every_prefix_of_a_header_is_incomplete() {
        let v1 = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n";
        let mut addresses = [0u8; 36];
        addresses[..16].copy_from_slice(
            &"2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        addresses[32..34].copy_from_slice(&4000u16.to_be_bytes());
        let v2 = v2(1, 0x21, &addresses);
        for header in [&v1[..], &v2[..]] {
            for end in 1..header.len() {
                assert_eq!(parse(&header[..end]), Parse::Incomplete, "{end}");
            }
            assert!(
                matches!(parse(header), Parse::Complete { len, source: Source::Client(a) }
                    if len == header.len() && a == "[2001:db8::7]:4000".parse().unwrap())
            );
        }
    }

    #[test]
    fn a_v1_line_ends_at_its_first_crlf_only() {
        // Found by fuzzing: ppp takes a bare LF for the end of an UNKNOWN line, which would
        // end the header at a different byte depending on how much had arrived.
        let unknown = b"PROXY UNKNOWN \nmore\r\nGET";
        assert_eq!(parse(&unknown[..15]), Parse::Incomplete);
        assert_eq!(
            parse(unknown),
            Parse::Complete {
                source: Source::Connection,
                len: 21
            }
        );
        assert!(matches!(
            parse(b"PROXY TCP4 192.0.2.7\r198.51.100.1 4000 443\r\n"),
            Parse::Malformed(_)
        ));
        let endless = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(parse(&endless), Parse::TooLarge);
    }

    #[test]
    fn a_v2_local_header_keeps_the_connection_address() {
        let header = v2(0, 0x00, &[]);
        assert_eq!(
            parse(&header),
            Parse::Complete {
                source: Source::Connection,
                len: 16
            }
        );
    }

    #[test]
    fn bad_or_oversized_headers_are_refused() {
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n"), Parse::Malformed(_)));
        assert!(matches!(
            parse(b"PROXY TCP4 300.0.2.7 198.51.100.1 4000 443\r\n"),
            Parse::Malformed(_)
        ));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&huge), Parse::TooLarge);
        assert!(
            matches!(parse(&[0x16, 0x03, 0x01]), Parse::Malformed(_)),
            "a TLS hello"
        );
    }
}
