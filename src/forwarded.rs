//! What the gateway adds to and removes from a client's request on its way to the backend.

use crate::client_addr::ClientAddr;
use crate::proto::handshake::{self, RequestHead};

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

/// Fields that describe a request's body. The backend's upgrade GET has none, and servers
/// such as Python's `websockets` refuse a handshake that announces one; a session opened by a
/// POST would otherwise pass its `Content-Length` and `Content-Type` on.
const BODY: [&str; 9] = [
    "content-length",
    "content-type",
    "content-encoding",
    "content-language",
    "content-location",
    "content-range",
    "content-digest",
    "repr-digest",
    "expect",
];

/// Whether a request header stays behind at the gateway. `connection_tokens` are the field
/// names the client listed in `Connection`, which are hop-by-hop too.
pub fn is_dropped(name: &str, connection_tokens: &[&str], websocket: bool) -> bool {
    let any = |list: &[&str]| list.iter().any(|h| name.eq_ignore_ascii_case(h));
    any(&HOP_BY_HOP)
        || any(&REWRITTEN)
        || (websocket && (any(&HANDSHAKE) || any(&BODY)))
        || connection_tokens
            .iter()
            .any(|t| name.eq_ignore_ascii_case(t))
}

/// Whether a response header stays behind (the hop-by-hop ones; Host never appears).
pub fn is_hop_by_hop_response(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// The client's own values of a forwarding chain, joined as one list and followed by the
/// separator for the gateway's element; empty when the client sent none.
fn prior_chain(head: &RequestHead<'_, '_>, name: &str) -> String {
    // Room for the gateway's element too, so that appending it does not reallocate.
    let mut chain = String::with_capacity(96);
    let values = handshake::headers::values(head.headers, name);
    for (i, value) in values
        .filter_map(|v| std::str::from_utf8(v).ok())
        .enumerate()
    {
        if i > 0 {
            chain.push_str(", ");
        }
        chain.push_str(value);
    }
    if !chain.is_empty() {
        chain.push_str(", ");
    }
    chain
}

/// Appends `value` as an RFC 7239 / RFC 9110 §5.6.4 quoted-string, so that no byte of it can
/// end the element it belongs to. Clients' Host values are validated before they get here;
/// this keeps the header well-formed whatever a caller passes.
fn push_quoted(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// `X-Forwarded-For/-Proto/-Host` and `Forwarded` (RFC 7239) for the backend request. A
/// request from a trusted proxy ([`ClientAddr::via`]) has its chains extended by that proxy's
/// address; anyone else's are replaced by one naming the client, so a client cannot put words
/// in a trusted proxy's mouth.
#[derive(Debug)]
pub struct ForwardedHeaders {
    x_forwarded_for: String,
    x_forwarded_proto: &'static str,
    x_forwarded_host: String,
    forwarded: String,
}

impl ForwardedHeaders {
    pub fn new(head: &RequestHead<'_, '_>, peer: ClientAddr, tls: bool) -> Self {
        let (ip, believed) = match peer.via() {
            Some(hop) => (hop, true),
            None => (peer.ip(), false),
        };
        // Rendered once for both chains: formatting the address was most of this function.
        let address = ip.to_string();
        let proto = if tls { "https" } else { "http" };
        let host = head.header("host").unwrap_or("");
        let chain = |name| {
            if believed {
                prior_chain(head, name)
            } else {
                String::with_capacity(64)
            }
        };
        let mut x_forwarded_for = chain("x-forwarded-for");
        x_forwarded_for.push_str(&address);
        let mut forwarded = chain("forwarded");
        forwarded.push_str("for=");
        if ip.is_ipv6() {
            forwarded.push_str("\"[");
            forwarded.push_str(&address);
            forwarded.push_str("]\"");
        } else {
            forwarded.push_str(&address);
        }
        forwarded.push_str(";proto=");
        forwarded.push_str(proto);
        forwarded.push_str(";host=");
        push_quoted(&mut forwarded, host);
        Self {
            x_forwarded_for,
            x_forwarded_proto: proto,
            x_forwarded_host: host.to_owned(),
            forwarded,
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

#[cfg(test)]
mod tests {
    use super::ForwardedHeaders;
    use crate::client_addr::{ClientAddr, TrustedNetworks};
    use crate::proto::handshake;
    use httparse::EMPTY_HEADER;

    /// The headers for a request from `peer`, which is a trusted proxy when it is in
    /// 2001:db8::/32 or 10.0.0.0/8.
    fn forwarded(head: &[u8], peer: &str, tls: bool) -> ForwardedHeaders {
        let mut storage = [EMPTY_HEADER; 16];
        let (head, _) = handshake::parse_request(head, &mut storage)
            .unwrap()
            .unwrap();
        let trusted = TrustedNetworks::new(vec![
            "2001:db8::/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ]);
        let client = ClientAddr::of_head(peer.parse().unwrap(), head.headers, &trusted);
        ForwardedHeaders::new(&head, client, tls)
    }

    #[test]
    fn a_first_hop_starts_both_chains() {
        let f = forwarded(
            b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n",
            "192.0.2.7:4000",
            false,
        );
        assert_eq!(f.x_forwarded_for, "192.0.2.7");
        assert_eq!(f.x_forwarded_proto, "http");
        assert_eq!(f.x_forwarded_host, "app.test");
        assert_eq!(f.forwarded, "for=192.0.2.7;proto=http;host=\"app.test\"");
    }

    #[test]
    fn a_trusted_proxys_chains_are_extended_in_order() {
        let head = b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 203.0.113.1\r\n\
            X-Forwarded-For: 203.0.113.2, 203.0.113.3\r\nForwarded: for=203.0.113.1\r\n\r\n";
        let f = forwarded(head, "[2001:db8::1]:4000", true);
        assert_eq!(
            f.x_forwarded_for,
            "203.0.113.1, 203.0.113.2, 203.0.113.3, 2001:db8::1"
        );
        assert_eq!(
            f.forwarded,
            "for=203.0.113.1, for=\"[2001:db8::1]\";proto=https;host=\"app.test\""
        );
    }

    #[test]
    fn a_host_cannot_end_its_quoted_string() {
        let head = b"GET / HTTP/1.1\r\nHost: a\"; for=6.6.6.6\\\r\n\r\n";
        let f = forwarded(head, "192.0.2.7:1", false);
        assert_eq!(
            f.forwarded,
            r#"for=192.0.2.7;proto=http;host="a\"; for=6.6.6.6\\""#
        );
    }

    #[test]
    fn the_upgrade_carries_no_body_fields() {
        let head = b"POST /?wsgate=open HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\
            Content-Type: text/plain\r\nCookie: c=1\r\n\r\n";
        let mut storage = [EMPTY_HEADER; 16];
        let (head, _) = handshake::parse_request(head, &mut storage)
            .unwrap()
            .unwrap();
        let f = ForwardedHeaders::new(
            &head,
            ClientAddr::direct("192.0.2.7:1".parse().unwrap()),
            false,
        );
        let names = |websocket| -> Vec<&str> {
            f.fields(&head, websocket)
                .iter()
                .map(|(name, _)| *name)
                .collect()
        };
        assert!(names(false).contains(&"Content-Length"));
        let upgrade = names(true);
        assert!(upgrade.contains(&"Cookie"));
        assert!(!upgrade.contains(&"Content-Length"), "{upgrade:?}");
        assert!(!upgrade.contains(&"Content-Type"), "{upgrade:?}");
    }

    #[test]
    fn an_empty_prior_value_is_kept_as_an_empty_element() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: \r\nX-Forwarded-For: b\r\n\r\n";
        let f = forwarded(head, "10.0.0.1:1", false);
        assert_eq!(f.x_forwarded_for, ", b, 10.0.0.1");
    }

    #[test]
    fn anyone_elses_chains_are_replaced() {
        let head = b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 203.0.113.1\r\n\
            Forwarded: for=203.0.113.1\r\n\r\n";
        let f = forwarded(head, "192.0.2.7:4000", false);
        assert_eq!(f.x_forwarded_for, "192.0.2.7");
        assert_eq!(f.forwarded, "for=192.0.2.7;proto=http;host=\"app.test\"");
    }
}
