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
}
