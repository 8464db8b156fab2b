//! Header field helpers for the handshakes: lookups over httparse's borrowed headers and the
//! comma-separated list syntax of RFC 9110 §5.6.1 (with quoted strings, §5.6.4).

use httparse::Header;

/// Every value of header `name` (case-insensitive), in order, as bytes.
pub fn values<'h, 'b>(
    headers: &'h [Header<'b>],
    name: &'h str,
) -> impl Iterator<Item = &'b [u8]> + 'h {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// A header that must appear at most once appeared several times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepeatedHeader;

/// The only value of header `name`: `Ok(None)` if absent, an error if repeated.
pub fn single<'b>(headers: &[Header<'b>], name: &str) -> Result<Option<&'b [u8]>, RepeatedHeader> {
    let mut found = values(headers, name);
    let first = found.next();
    if found.next().is_some() {
        Err(RepeatedHeader)
    } else {
        Ok(first)
    }
}

/// The elements of a comma-separated list spread over every value of header `name`, trimmed,
/// empty elements skipped. Values that are not UTF-8 contribute nothing.
pub fn list_elements<'h, 'b>(
    headers: &'h [Header<'b>],
    name: &'h str,
) -> impl Iterator<Item = &'b str> + 'h {
    values(headers, name)
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(split_list)
}

/// Whether the list in header `name` contains `token` (case-insensitive), e.g. `Connection:
/// keep-alive, Upgrade`.
pub fn has_token(headers: &[Header<'_>], name: &str, token: &str) -> bool {
    // Nearly always the whole value is the token (`Upgrade: websocket`): no list to split.
    values(headers, name).any(|value| value.eq_ignore_ascii_case(token.as_bytes()))
        || list_elements(headers, name).any(|element| element.eq_ignore_ascii_case(token))
}

/// Splits a list on commas that are not inside a quoted string; trims and skips empty elements.
pub fn split_list(value: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(value);
    std::iter::from_fn(move || {
        loop {
            let current = rest?;
            let end = find_unquoted(current, b',').unwrap_or(current.len());
            let element = current[..end].trim();
            rest = current.get(end + 1..);
            if !element.is_empty() {
                return Some(element);
            }
        }
    })
}

/// The index of the first `needle` byte outside a quoted string (backslash escapes honoured).
pub fn find_unquoted(value: &str, needle: u8) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, byte) in value.bytes().enumerate() {
        match byte {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b if b == needle && !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// RFC 9110 §5.6.2 `token`: one or more tchar.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// One extension offer or response element: `permessage-deflate; client_max_window_bits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extension<'a> {
    pub name: &'a str,
    /// The raw parameter text after the first `;`, trimmed (may be empty).
    pub params: &'a str,
}

/// Parses one element of `Sec-WebSocket-Extensions` (RFC 6455 §9.1).
pub fn parse_extension(element: &str) -> Extension<'_> {
    match find_unquoted(element, b';') {
        Some(at) => Extension {
            name: element[..at].trim(),
            params: element[at + 1..].trim(),
        },
        None => Extension {
            name: element.trim(),
            params: "",
        },
    }
}

/// Whether a `Host` value is `host [ ":" port ]` (RFC 3986 §3.2.2-3.2.3): an IP literal in
/// brackets, or a name of unreserved characters and percent-escapes. RFC 3986 also allows
/// sub-delims (`!$&'()*+,;=`) in a reg-name; they are refused here because no DNS name has
/// them and `,`, `;` and `=` separate elements in the forwarding headers the value is copied
/// into, where they could forge a hop.
pub fn is_valid_host(value: &str) -> bool {
    let (host, port) = match value.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((literal, rest)) => {
                if literal.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                match rest {
                    "" => return true,
                    _ => match rest.strip_prefix(':') {
                        Some(port) => ("", port),
                        None => return false,
                    },
                }
            }
            None => return false,
        },
        None => match value.split_once(':') {
            Some((host, port)) => (host, port),
            None => (value, ""),
        },
    };
    let port_ok = port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    port_ok && (value.starts_with('[') || (!host.is_empty() && is_reg_name(host)))
}

fn is_reg_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let escaped = bytes.get(i + 1..i + 3);
                if !escaped.is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)) {
                    return false;
                }
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => i += 1,
            _ => return false,
        }
    }
    true
}

/// Why a request's body framing (RFC 9112 §6) is refused: a status and a one-line reason.
pub type FramingError = (u16, &'static str);

/// Checks the body framing of a request head the way a front proxy must to keep it from
/// being read differently by the next hop (request smuggling): `Transfer-Encoding` and
/// `Content-Length` together, several different or malformed lengths, and a transfer coding
/// whose final coding is not `chunked` are refused with 400; codings other than `chunked`
/// (`gzip, chunked`) with 501, as nginx does, since the gateway does not decode them.
pub fn check_framing(headers: &[Header<'_>]) -> Result<(), FramingError> {
    let has_te = values(headers, "transfer-encoding").next().is_some();
    let mut length = None;
    for value in values(headers, "content-length") {
        for element in value.split(|&b| b == b',') {
            let element = element.trim_ascii();
            let valid = !element.is_empty() && element.iter().all(u8::is_ascii_digit);
            let parsed = std::str::from_utf8(element)
                .ok()
                .filter(|_| valid)
                .and_then(|e| e.parse::<u64>().ok());
            let Some(parsed) = parsed else {
                return Err((400, "malformed Content-Length"));
            };
            if length.is_some_and(|seen| seen != parsed) {
                return Err((400, "several different Content-Length values"));
            }
            length = Some(parsed);
        }
    }
    if !has_te {
        return Ok(());
    }
    if length.is_some() {
        return Err((400, "Content-Length and Transfer-Encoding together"));
    }
    let codings: Vec<&str> = values(headers, "transfer-encoding")
        .map(|v| std::str::from_utf8(v).unwrap_or("\u{fffd}"))
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    match codings.split_last() {
        Some((last, [])) if last.eq_ignore_ascii_case("chunked") => Ok(()),
        Some((last, _)) if last.eq_ignore_ascii_case("chunked") => {
            Err((501, "transfer codings other than chunked are not supported"))
        }
        _ => Err((400, "the final transfer coding must be chunked")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h<'a>(name: &'a str, value: &'a str) -> Header<'a> {
        Header {
            name,
            value: value.as_bytes(),
        }
    }

    #[test]
    fn token_lists_span_header_lines_and_ignore_case() {
        let headers = [
            h("Connection", "keep-alive"),
            h("connection", " Upgrade ,"),
            h("X", "y"),
        ];
        assert!(has_token(&headers, "Connection", "upgrade"));
        assert!(!has_token(&headers, "Connection", "close"));
        let elements: Vec<_> = list_elements(&headers, "CONNECTION").collect();
        assert_eq!(elements, ["keep-alive", "Upgrade"]);
    }

    #[test]
    fn quoted_commas_do_not_split() {
        let items: Vec<_> = split_list(r#"a; p="x,y", b, , c; q="\",""#).collect();
        assert_eq!(items, [r#"a; p="x,y""#, "b", r#"c; q="\",""#]);
        let ext = parse_extension(r#"permessage-deflate ; client_max_window_bits; x="a;b""#);
        assert_eq!(ext.name, "permessage-deflate");
        assert_eq!(ext.params, r#"client_max_window_bits; x="a;b""#);
    }

    #[test]
    fn single_rejects_repeats() {
        let headers = [h("Host", "a"), h("host", "b")];
        assert_eq!(single(&headers, "Host"), Err(RepeatedHeader));
        assert_eq!(single(&headers[..1], "host"), Ok(Some(&b"a"[..])));
        assert_eq!(single(&headers, "Origin"), Ok(None));
    }

    #[test]
    fn tokens() {
        assert!(is_token("chat.v2+json"));
        assert!(!is_token("a b"));
        assert!(!is_token(""));
        assert!(!is_token("a,b"));
    }

    #[test]
    fn hosts_are_names_or_ip_literals_with_an_optional_port() {
        for host in [
            "app.example.test",
            "app.example.test:8080",
            "localhost:",
            "192.0.2.1:80",
            "[2001:db8::1]",
            "[::1]:443",
            "xn--bcher-kva.example",
            "a%41b",
        ] {
            assert!(is_valid_host(host), "{host}");
        }
        for host in [
            "",
            ":80",
            "app.example.test:1\", for=6.6.6.6;proto=https;host=\"app.example.test",
            "a\"b",
            "a b",
            "a,b",
            "a;b",
            "a=b",
            "a\\b",
            "a:b:c",
            "a:123456",
            "a:8o",
            "[::1",
            "[::1]x",
            "[not-ip]",
            "[fe80::1%25eth0]",
            "a%4",
            "a%zz",
            "é.example",
        ] {
            assert!(!is_valid_host(host), "{host}");
        }
    }

    #[test]
    fn body_framing_that_two_parsers_could_read_differently_is_refused() {
        let ok = |headers: &[Header<'_>]| check_framing(headers).map_err(|(status, _)| status);
        assert_eq!(ok(&[]), Ok(()));
        assert_eq!(ok(&[h("Content-Length", "5")]), Ok(()));
        assert_eq!(
            ok(&[h("Content-Length", "5"), h("content-length", "5")]),
            Ok(())
        );
        assert_eq!(ok(&[h("Content-Length", "5, 5")]), Ok(()));
        assert_eq!(ok(&[h("Transfer-Encoding", "Chunked")]), Ok(()));
        assert_eq!(
            ok(&[h("Content-Length", "5"), h("Content-Length", "6")]),
            Err(400)
        );
        assert_eq!(ok(&[h("Content-Length", "5, 6")]), Err(400));
        assert_eq!(ok(&[h("Content-Length", "+5")]), Err(400));
        assert_eq!(ok(&[h("Content-Length", "")]), Err(400));
        assert_eq!(
            ok(&[h("Content-Length", "5"), h("Transfer-Encoding", "chunked")]),
            Err(400)
        );
        assert_eq!(ok(&[h("Transfer-Encoding", "chunked, gzip")]), Err(400));
        assert_eq!(ok(&[h("Transfer-Encoding", "gzip")]), Err(400));
        assert_eq!(ok(&[h("Transfer-Encoding", "gzip, chunked")]), Err(501));
        assert_eq!(
            ok(&[
                h("Transfer-Encoding", "gzip"),
                h("Transfer-Encoding", "chunked")
            ]),
            Err(501)
        );
        assert_eq!(ok(&[h("Transfer-Encoding", "chunked, chunked")]), Err(501));
    }
}
