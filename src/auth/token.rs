//! Where a client's token is found in its handshake, and the request as the backend sees it
//! once a token carried in the URL or the subprotocol offer is taken out. Pure functions over
//! the parsed head.

use crate::config::TokenSource;
use crate::proto::handshake::{self, RequestHead};
use percent_encoding::percent_decode_str;
use std::borrow::Cow;

/// A token found in a request, and the source it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found<'a> {
    pub token: Cow<'a, str>,
    pub source: &'a TokenSource,
}

/// The token of the first source in `sources` that the request carries.
pub fn find<'a>(sources: &'a [TokenSource], head: &RequestHead<'_, 'a>) -> Option<Found<'a>> {
    sources.iter().find_map(|source| {
        let token = match source {
            TokenSource::Bearer => bearer(head).map(Cow::Borrowed),
            TokenSource::Cookie(name) => cookie(head, name).map(Cow::Borrowed),
            TokenSource::Query(name) => query(head.query()?, name),
            TokenSource::Subprotocol(prefix) => subprotocol(head, prefix).map(Cow::Borrowed),
        }?;
        (!token.is_empty()).then_some(Found { token, source })
    })
}

/// `Authorization: Bearer <token>` (RFC 6750 §2.1; the scheme is case-insensitive).
fn bearer<'a>(head: &RequestHead<'_, 'a>) -> Option<&'a str> {
    handshake::headers::values(head.headers, "authorization")
        .filter_map(|v| std::str::from_utf8(v).ok())
        .find_map(|value| {
            let (scheme, token) = value.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
}

/// The value of cookie `name` (RFC 6265 §4.2.1), without surrounding quotes.
fn cookie<'a>(head: &RequestHead<'_, 'a>, name: &str) -> Option<&'a str> {
    handshake::headers::values(head.headers, "cookie")
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| {
            let (n, v) = pair.trim().split_once('=')?;
            (n.trim() == name).then(|| v.trim().trim_matches('"'))
        })
}

/// The value of query parameter `name`, percent-decoded.
fn query<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| percent_decode_str(v).decode_utf8().ok())
}

/// The rest of the first offered subprotocol starting with `prefix`.
fn subprotocol<'a>(head: &RequestHead<'_, 'a>, prefix: &str) -> Option<&'a str> {
    handshake::server::offered_protocols(head.headers).find_map(|p| p.strip_prefix(prefix))
}

/// `target` without query parameter `name` (every occurrence); the `?` goes too when nothing
/// is left of the query.
pub fn target_without(target: &str, name: &str) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_owned();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split_once('=').map_or(*pair, |(n, _)| n) != name)
        .collect();
    let kept = kept.join("&");
    if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{kept}")
    }
}

/// The client's subprotocol offer without the entries starting with `prefix`; `None` when
/// nothing else was offered.
pub fn protocols_without<'a>(
    offered: impl Iterator<Item = &'a str>,
    prefix: &str,
) -> Option<String> {
    let kept: Vec<&str> = offered.filter(|p| !p.starts_with(prefix)).collect();
    (!kept.is_empty()).then(|| kept.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use httparse::EMPTY_HEADER;

    fn with_head<R>(raw: &str, f: impl FnOnce(&RequestHead<'_, '_>) -> R) -> R {
        let mut storage = [EMPTY_HEADER; 16];
        let (head, _) = handshake::parse_request(raw.as_bytes(), &mut storage)
            .unwrap()
            .unwrap();
        f(&head)
    }

    fn found(sources: &[TokenSource], raw: &str) -> Option<String> {
        with_head(raw, |head| {
            find(sources, head).map(|f| f.token.into_owned())
        })
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_other_schemes_are_ignored() {
        let s = [TokenSource::Bearer];
        let req = |v: &str| format!("GET / HTTP/1.1\r\nHost: a\r\nAuthorization: {v}\r\n\r\n");
        assert_eq!(
            found(&s, &req("Bearer abc.def.ghi")).as_deref(),
            Some("abc.def.ghi")
        );
        assert_eq!(found(&s, &req("bearer  x.y.z ")).as_deref(), Some("x.y.z"));
        assert_eq!(found(&s, &req("Basic dXNlcjpwdw==")), None);
        assert_eq!(found(&s, &req("Bearer ")), None);
    }

    #[test]
    fn cookie_query_and_subprotocol_sources_are_read_in_order() {
        let s = [
            TokenSource::Cookie("jwt".into()),
            TokenSource::Query("access_token".into()),
            TokenSource::Subprotocol("bearer.".into()),
        ];
        let only_cookie = "GET / HTTP/1.1\r\nHost: a\r\nCookie: a=1; jwt=\"c.c.c\"\r\n\r\n";
        assert_eq!(found(&s, only_cookie).as_deref(), Some("c.c.c"));
        let query = "GET /x?room=1&access_token=q.q%2Eq HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(found(&s, query).as_deref(), Some("q.q.q"));
        let proto =
            "GET / HTTP/1.1\r\nHost: a\r\nSec-WebSocket-Protocol: chat, bearer.p.p.p\r\n\r\n";
        assert_eq!(found(&s, proto).as_deref(), Some("p.p.p"));
        let both = "GET /?access_token=q HTTP/1.1\r\nHost: a\r\nCookie: jwt=c\r\n\r\n";
        assert_eq!(
            found(&s, both).as_deref(),
            Some("c"),
            "the first source wins"
        );
        assert_eq!(found(&s, "GET / HTTP/1.1\r\nHost: a\r\n\r\n"), None);
    }

    #[test]
    fn the_token_parameter_is_taken_out_of_the_target() {
        assert_eq!(target_without("/a?t=1&room=2&t=3", "t"), "/a?room=2");
        assert_eq!(target_without("/a?t=1", "t"), "/a");
        assert_eq!(target_without("/a?tt=1", "t"), "/a?tt=1");
        assert_eq!(target_without("/a", "t"), "/a");
    }

    #[test]
    fn the_token_entry_is_taken_out_of_the_offer() {
        let offer = ["chat", "bearer.x.y.z", "v2"];
        assert_eq!(
            protocols_without(offer.into_iter(), "bearer.").as_deref(),
            Some("chat, v2")
        );
        assert_eq!(protocols_without(["bearer.x"].into_iter(), "bearer."), None);
    }
}
