//! What the gateway adds to and removes from a client's request on its way to the backend.

use crate::proto::handshake::{self, RequestHead};
use std::net::SocketAddr;

/// Headers that describe one hop (RFC 9110 §7.6.1), plus those the gateway sets itself.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "host",
];
/// The client's forwarding headers are replaced (X-Forwarded-Proto/Host) or extended
/// (X-Forwarded-For, Forwarded) by fresh ones, never passed through as they are.
const REWRITTEN: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];
/// The WebSocket handshake fields the gateway negotiates itself with the backend.
const HANDSHAKE: [&str; 5] = [
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-accept",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
];

/// Whether a request header stays behind at the gateway. `connection_tokens` are the field
/// names the client listed in `Connection`, which are hop-by-hop too.
pub fn is_dropped(name: &str, connection_tokens: &[&str], websocket: bool) -> bool {
    let any = |list: &[&str]| list.iter().any(|h| name.eq_ignore_ascii_case(h));
    any(&HOP_BY_HOP)
        || any(&REWRITTEN)
        || (websocket && any(&HANDSHAKE))
        || connection_tokens
            .iter()
            .any(|t| name.eq_ignore_ascii_case(t))
}

/// Whether a response header stays behind (the hop-by-hop ones; Host never appears).
pub fn is_hop_by_hop_response(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// `X-Forwarded-For/-Proto/-Host` and `Forwarded` (RFC 7239) for the backend request; the
/// client's own `X-Forwarded-For` and `Forwarded` chains are extended, not replaced.
#[derive(Debug)]
pub struct ForwardedHeaders {
    x_forwarded_for: String,
    x_forwarded_proto: &'static str,
    x_forwarded_host: String,
    forwarded: String,
}

impl ForwardedHeaders {
    pub fn new(head: &RequestHead<'_, '_>, peer: SocketAddr, tls: bool) -> Self {
        let ip = peer.ip();
        let prior = |name| {
            let values: Vec<&str> = handshake::headers::values(head.headers, name)
                .filter_map(|v| std::str::from_utf8(v).ok())
                .collect();
            values.join(", ")
        };
        let chain = |prior: String, item: String| {
            if prior.is_empty() {
                item
            } else {
                format!("{prior}, {item}")
            }
        };
        let node = if ip.is_ipv6() {
            format!("\"[{ip}]\"")
        } else {
            ip.to_string()
        };
        let proto = if tls { "https" } else { "http" };
        let host = head.header("host").unwrap_or("");
        Self {
            x_forwarded_for: chain(prior("x-forwarded-for"), ip.to_string()),
            x_forwarded_proto: proto,
            x_forwarded_host: host.to_owned(),
            forwarded: chain(
                prior("forwarded"),
                format!("for={node};proto={proto};host=\"{host}\""),
            ),
        }
    }

    /// The client's end-to-end fields followed by the forwarding fields. `websocket` also
    /// drops the handshake fields the gateway negotiates itself.
    pub fn fields<'a>(
        &'a self,
        head: &'a RequestHead<'_, 'a>,
        websocket: bool,
    ) -> Vec<(&'a str, &'a [u8])> {
        let connection_tokens: Vec<&str> =
            handshake::headers::list_elements(head.headers, "connection").collect();
        let mut fields: Vec<(&str, &[u8])> = head
            .headers
            .iter()
            .filter(|h| !is_dropped(h.name, &connection_tokens, websocket))
            .map(|h| (h.name, h.value))
            .collect();
        fields.push(("X-Forwarded-For", self.x_forwarded_for.as_bytes()));
        fields.push(("X-Forwarded-Proto", self.x_forwarded_proto.as_bytes()));
        fields.push(("X-Forwarded-Host", self.x_forwarded_host.as_bytes()));
        fields.push(("Forwarded", self.forwarded.as_bytes()));
        fields
    }
}
