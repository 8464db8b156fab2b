//! Sticky key extraction: which part of a handshake request names the "room".
//!
//! Rules shared by every source:
//! - the first occurrence decides (first header, first query parameter, first cookie of that
//!   name); a later duplicate never overrides it, so a client cannot pick a different backend
//!   by appending a second value that an upstream proxy might ignore;
//! - a missing or empty key is `None`, and the caller falls back to least connections or the
//!   sticky cookie; an empty string would otherwise send every key-less client to one backend;
//! - bytes that are not UTF-8 are replaced (U+FFFD) rather than rejected: the key is only
//!   hashed, so a lossy key still routes consistently, at worst sharing a backend with another
//!   malformed key;
//! - nothing allocates unless the key has to be rewritten (percent-decoding, the IP's text).

use std::borrow::Cow;
use std::net::IpAddr;

use crate::config::StickyKey;

/// One request header as the handshake parser sees it. Implemented for `(name, value)` pairs
/// and for `httparse::Header`, so the handshake can pass its parsed headers without copying.
pub trait HeaderField<'a> {
    fn name(&self) -> &str;
    fn value(&self) -> &'a [u8];
}

impl<'a> HeaderField<'a> for (&'a str, &'a [u8]) {
    fn name(&self) -> &str {
        self.0
    }

    fn value(&self) -> &'a [u8] {
        self.1
    }
}

impl<'a> HeaderField<'a> for httparse::Header<'a> {
    fn name(&self) -> &str {
        self.name
    }

    fn value(&self) -> &'a [u8] {
        self.value
    }
}

/// The parts of a handshake request a sticky key can come from.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a, H = (&'a str, &'a [u8])> {
    /// The path, without the query (anything from a `?` on is ignored anyway).
    pub path: &'a str,
    /// The raw query, after the `?` and still percent-encoded.
    pub query: Option<&'a str>,
    pub headers: &'a [H],
    /// The client's address as the gateway sees it.
    pub client_ip: IpAddr,
}

/// The sticky key `sticky` designates in `request`, or `None` when it is absent or empty.
pub fn extract_key<'a, H: HeaderField<'a>>(
    sticky: &StickyKey,
    request: &RequestParts<'a, H>,
) -> Option<Cow<'a, str>> {
    let key = match sticky {
        StickyKey::PathSegment { index, .. } => path_segment(request.path, *index).map(Cow::from),
        StickyKey::Query(name) => request.query.and_then(|query| query_param(query, name)),
        StickyKey::Header(name) | StickyKey::Claim { header: name, .. } => {
            first_header(request.headers, name)
                .map(trim_http_whitespace)
                .map(String::from_utf8_lossy)
        }
        StickyKey::Cookie(name) => cookie(request.headers, name).map(String::from_utf8_lossy),
        // Dual-stack listeners report IPv4 clients as `::ffff:a.b.c.d`; canonicalising keeps a
        // client on the same backend whichever listener it reached.
        StickyKey::ClientIp => Some(Cow::Owned(request.client_ip.to_canonical().to_string())),
    };
    key.filter(|key| !key.is_empty())
}

/// The `index`-th segment after the leading `/`, as written (not percent-decoded).
fn path_segment(path: &str, index: usize) -> Option<&str> {
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    let path = path.strip_prefix('/').unwrap_or(path);
    path.split('/')
        .nth(index)
        .filter(|segment| !segment.is_empty())
}

/// The first value of the `name` parameter in an `application/x-www-form-urlencoded` query,
/// decoded as browsers encode it (`+` is a space, `%XX` a byte, malformed escapes kept).
fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(raw_name, _)| form_decode(raw_name.as_bytes()).as_ref() == name.as_bytes())
        .map(|(_, raw_value)| form_decode_to_str(raw_value.as_bytes()))
}

fn form_decode_to_str(raw: &[u8]) -> Cow<'_, str> {
    match form_decode(raw) {
        Cow::Borrowed(bytes) => String::from_utf8_lossy(bytes),
        Cow::Owned(bytes) => Cow::Owned(
            String::from_utf8(bytes)
                .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned()),
        ),
    }
}

fn form_decode(raw: &[u8]) -> Cow<'_, [u8]> {
    if !raw.iter().any(|&byte| byte == b'%' || byte == b'+') {
        return Cow::Borrowed(raw);
    }
    let mut decoded = Vec::with_capacity(raw.len());
    let mut rest = raw;
    while let Some((&byte, tail)) = rest.split_first() {
        rest = tail;
        match byte {
            b'+' => decoded.push(b' '),
            b'%' => match (
                tail.first().and_then(hex_value),
                tail.get(1).and_then(hex_value),
            ) {
                (Some(high), Some(low)) => {
                    decoded.push(high << 4 | low);
                    rest = &tail[2..];
                }
                _ => decoded.push(b'%'),
            },
            _ => decoded.push(byte),
        }
    }
    Cow::Owned(decoded)
}

fn hex_value(digit: &u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

fn first_header<'a, H: HeaderField<'a>>(headers: &[H], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|header| header.name().eq_ignore_ascii_case(name))
        .map(HeaderField::value)
}

/// The value of the first cookie named `name` (case-sensitive, as RFC 6265 compares names)
/// across every `Cookie` header: HTTP/2 clients and some proxies split cookies over several
/// header lines. Surrounding double quotes are part of the syntax, not of the value.
fn cookie<'a, H: HeaderField<'a>>(headers: &[H], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .filter(|header| header.name().eq_ignore_ascii_case("cookie"))
        .flat_map(|header| header.value().split(|&byte| byte == b';'))
        .filter_map(|pair| {
            let separator = pair.iter().position(|&byte| byte == b'=')?;
            let (cookie_name, value) = (&pair[..separator], &pair[separator + 1..]);
            (trim_http_whitespace(cookie_name) == name.as_bytes()).then_some(value)
        })
        .map(|value| {
            let value = trim_http_whitespace(value);
            value
                .strip_prefix(b"\"")
                .and_then(|inner| inner.strip_suffix(b"\""))
                .unwrap_or(value)
        })
        .next()
}

/// Strips the optional whitespace (space and tab) HTTP allows around values.
fn trim_http_whitespace(bytes: &[u8]) -> &[u8] {
    let is_space = |byte: &u8| *byte == b' ' || *byte == b'\t';
    let start = bytes
        .iter()
        .position(|b| !is_space(b))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_space(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn request<'a>(
        path: &'a str,
        query: Option<&'a str>,
        headers: &'a [(&'a str, &'a [u8])],
    ) -> RequestParts<'a> {
        RequestParts {
            path,
            query,
            headers,
            client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        }
    }

    fn segment(index: usize) -> StickyKey {
        StickyKey::PathSegment {
            pattern: String::new(),
            index,
        }
    }

    fn key(sticky: &StickyKey, request: &RequestParts<'_>) -> Option<String> {
        extract_key(sticky, request).map(Cow::into_owned)
    }

    #[test]
    fn path_segment_counts_after_the_leading_slash() {
        let req = request("/rooms/lobby/chat", None, &[]);
        assert_eq!(key(&segment(0), &req).as_deref(), Some("rooms"));
        assert_eq!(key(&segment(1), &req).as_deref(), Some("lobby"));
        assert_eq!(key(&segment(2), &req).as_deref(), Some("chat"));
        assert_eq!(key(&segment(3), &req), None);
        // Encoded segments are keys as written: the same room is always written the same way.
        let req = request("/rooms/a%20b", None, &[]);
        assert_eq!(key(&segment(1), &req).as_deref(), Some("a%20b"));
    }

    #[test]
    fn empty_path_segments_are_no_key() {
        assert_eq!(key(&segment(1), &request("/rooms//x", None, &[])), None);
        assert_eq!(key(&segment(1), &request("/rooms/", None, &[])), None);
        assert_eq!(key(&segment(0), &request("/", None, &[])), None);
        assert_eq!(key(&segment(0), &request("", None, &[])), None);
        // A query left on the path by mistake does not leak into the key.
        assert_eq!(
            key(&segment(1), &request("/rooms/a?x=1", None, &[])).as_deref(),
            Some("a")
        );
        assert_eq!(key(&segment(1), &request("/rooms/?x=1", None, &[])), None);
    }

    #[test]
    fn path_segment_borrows() {
        let req = request("/rooms/lobby", None, &[]);
        assert!(matches!(
            extract_key(&segment(1), &req),
            Some(Cow::Borrowed("lobby"))
        ));
    }

    #[test]
    fn query_takes_the_first_value_decoded() {
        let room = StickyKey::Query("room".to_owned());
        let cases = [
            ("room=lobby", Some("lobby")),
            ("a=1&room=lobby&room=other", Some("lobby")),
            ("room=caf%C3%A9+bar", Some("café bar")),
            ("r%6Fom=encoded-name", Some("encoded-name")),
            ("room=100%", Some("100%")),
            ("room=%zz%4", Some("%zz%4")),
            ("room=%FF", Some("\u{fffd}")),
            ("&&room=x&", Some("x")),
            ("room=a=b", Some("a=b")),
            ("room=", None),
            ("room", None),
            ("room=&room=later", None),
            ("rooms=x&xroom=y", None),
            ("", None),
        ];
        for (query, expected) in cases {
            let req = request("/", Some(query), &[]);
            assert_eq!(key(&room, &req).as_deref(), expected, "{query}");
        }
        assert_eq!(key(&room, &request("/", None, &[])), None);
    }

    #[test]
    fn query_borrows_unless_decoding() {
        let room = StickyKey::Query("room".to_owned());
        let req = request("/", Some("room=lobby"), &[]);
        assert!(matches!(
            extract_key(&room, &req),
            Some(Cow::Borrowed("lobby"))
        ));
    }

    #[test]
    fn header_is_case_insensitive_trimmed_and_first() {
        let sticky = StickyKey::Header("x-room".to_owned());
        let headers: &[(&str, &[u8])] = &[
            ("Host", b"chat.example.com"),
            ("X-Room", b" \tlobby  "),
            ("x-room", b"second"),
        ];
        assert_eq!(
            key(&sticky, &request("/", None, headers)).as_deref(),
            Some("lobby")
        );

        let headers: &[(&str, &[u8])] = &[("X-ROOM", b"upper")];
        assert_eq!(
            key(&sticky, &request("/", None, headers)).as_deref(),
            Some("upper")
        );
        let headers: &[(&str, &[u8])] = &[("x-room", b"  ")];
        assert_eq!(key(&sticky, &request("/", None, headers)), None);
        let headers: &[(&str, &[u8])] = &[("x-rooms", b"other")];
        assert_eq!(key(&sticky, &request("/", None, headers)), None);
        let headers: &[(&str, &[u8])] = &[("x-room", b"caf\xe9")];
        assert_eq!(
            key(&sticky, &request("/", None, headers)).as_deref(),
            Some("caf\u{fffd}")
        );
    }

    #[test]
    fn cookies_are_parsed_across_every_cookie_header() {
        let sticky = StickyKey::Cookie("session".to_owned());
        type Headers<'a> = &'a [(&'a str, &'a [u8])];
        let cases: &[(Headers<'_>, Option<&str>)] = &[
            (&[("Cookie", b"session=abc")], Some("abc")),
            (&[("cookie", b"a=1; session=abc; b=2")], Some("abc")),
            (
                &[("Cookie", b"a=1"), ("COOKIE", b"session=abc")],
                Some("abc"),
            ),
            (&[("Cookie", b"session=\"quoted\"")], Some("quoted")),
            (&[("Cookie", b"a=1;session=tight")], Some("tight")),
            (&[("Cookie", b"session=a=b")], Some("a=b")),
            (
                &[("Cookie", b"session=first; session=second")],
                Some("first"),
            ),
            (
                &[("Cookie", b"session=first"), ("Cookie", b"session=x")],
                Some("first"),
            ),
            (&[("Cookie", b"Session=wrong-case")], None),
            (&[("Cookie", b"sessionid=other; xsession=y")], None),
            (&[("Cookie", b"session")], None),
            (&[("Cookie", b"session=")], None),
            (&[("Cookie", b"session=\"\"")], None),
            (&[("Set-Cookie", b"session=not-a-request-cookie")], None),
            (&[], None),
        ];
        for (headers, expected) in cases {
            let req = request("/", None, headers);
            assert_eq!(key(&sticky, &req).as_deref(), *expected, "{headers:?}");
        }
    }

    #[test]
    fn client_ip_is_canonical_text() {
        let sticky = StickyKey::ClientIp;
        let mut req = request("/", None, &[]);
        assert_eq!(key(&sticky, &req).as_deref(), Some("192.0.2.7"));
        req.client_ip = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        assert_eq!(key(&sticky, &req).as_deref(), Some("192.0.2.7"));
        req.client_ip = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        assert_eq!(key(&sticky, &req).as_deref(), Some("2001:db8::1"));
    }

    #[test]
    fn httparse_headers_work_directly() {
        let headers = [
            httparse::Header {
                name: "X-Room",
                value: b"lobby",
            },
            httparse::Header {
                name: "Cookie",
                value: b"session=abc",
            },
        ];
        let req = RequestParts {
            path: "/",
            query: None,
            headers: &headers[..],
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let header = StickyKey::Header("x-room".to_owned());
        let cookie = StickyKey::Cookie("session".to_owned());
        assert_eq!(extract_key(&header, &req).as_deref(), Some("lobby"));
        assert_eq!(extract_key(&cookie, &req).as_deref(), Some("abc"));
    }

    #[test]
    fn trimming_handles_blank_and_clean_values() {
        assert_eq!(trim_http_whitespace(b""), b"");
        assert_eq!(trim_http_whitespace(b" \t "), b"");
        assert_eq!(trim_http_whitespace(b"a b"), b"a b");
        assert_eq!(trim_http_whitespace(b"\ta b "), b"a b");
    }
}
