//! The route table: which configured route a request's host and path select.
//!
//! Invariants:
//! - routes are tried in configuration order and the first match wins, so an index returned
//!   by [`RouteTable::route`] is an index into the `routes` slice the table was built from;
//! - hosts compare ASCII case-insensitively, without the port, without brackets around an IPv6
//!   literal and without a trailing root dot (`Example.COM.:443` is `example.com`);
//! - `*.example.com` matches one or more labels below `example.com`, never `example.com`;
//! - a route with a host never matches a request without one (HTTP/1.0); a route without a
//!   host matches every request;
//! - the path prefix is a plain string prefix of the path without its query;
//! - matching allocates nothing: everything is normalised once in [`RouteTable::new`].

use crate::config::Route;

/// The compiled, ordered list of routes.
#[derive(Debug, Clone)]
pub struct RouteTable {
    rules: Box<[Rule]>,
}

#[derive(Debug, Clone)]
struct Rule {
    host: HostPattern,
    path_prefix: Box<str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    /// Lowercase, normalised like a request host.
    Exact(Box<str>),
    /// Lowercase, with its leading dot: `*.example.com` is stored as `.example.com`.
    Subdomains(Box<str>),
}

impl HostPattern {
    fn compile(host: Option<&str>) -> Self {
        let Some(host) = host else {
            return HostPattern::Any;
        };
        match host.strip_prefix('*') {
            Some(suffix) if suffix.starts_with('.') => {
                HostPattern::Subdomains(suffix.trim_end_matches('.').to_ascii_lowercase().into())
            }
            _ => HostPattern::Exact(hostname(host).to_ascii_lowercase().into()),
        }
    }

    /// `host` is already normalised by [`hostname`].
    fn matches(&self, host: Option<&str>) -> bool {
        match (self, host) {
            (HostPattern::Any, _) => true,
            (_, None) => false,
            (HostPattern::Exact(expected), Some(host)) => host.eq_ignore_ascii_case(expected),
            (HostPattern::Subdomains(suffix), Some(host)) => {
                // Compare bytes: slicing the str could split a (malformed) multibyte character.
                let host = host.as_bytes();
                host.len() > suffix.len()
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
            }
        }
    }
}

/// The host part of a `Host` header value: without `:port`, without the brackets of an IPv6
/// literal and without the trailing dot of a fully qualified name.
fn hostname(authority: &str) -> &str {
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        bracketed
            .split_once(']')
            .map_or(bracketed, |(literal, _)| literal)
    } else {
        match authority.split_once(':') {
            // Exactly one colon: `host:port`. More than one can only be a bare IPv6 literal.
            Some((host, port)) if !port.contains(':') => host,
            _ => authority,
        }
    };
    host.strip_suffix('.').unwrap_or(host)
}

impl RouteTable {
    pub fn new(routes: &[Route]) -> Self {
        let rules = routes
            .iter()
            .map(|route| Rule {
                host: HostPattern::compile(route.host.as_deref()),
                path_prefix: route.path_prefix.as_str().into(),
            })
            .collect();
        RouteTable { rules }
    }

    /// The index of the first route matching `host` (the `Host` header, port allowed) and
    /// `path` (a query, if still attached, is ignored).
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<usize> {
        let path = path.split_once('?').map_or(path, |(path, _)| path);
        let host = host.map(hostname);
        self.rules
            .iter()
            .position(|rule| path.starts_with(&*rule.path_prefix) && rule.host.matches(host))
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Compression, Limits, Timeouts};

    fn route(host: Option<&str>, path_prefix: &str) -> Route {
        Route {
            name: format!("{host:?}{path_prefix}"),
            host: host.map(str::to_owned),
            path_prefix: path_prefix.to_owned(),
            upstream: 0,
            sticky: None,
            sticky_cookie: None,
            allowed_origins: Vec::new(),
            compression: Compression::Strip,
            ping_passthrough: false,
            connect_retries: 0,
            timeouts: Timeouts::DEFAULT,
            limits: Limits::DEFAULT,
            auth: None,
        }
    }

    #[test]
    fn first_match_wins() {
        let table = RouteTable::new(&[
            route(Some("chat.example.com"), "/rooms"),
            route(Some("chat.example.com"), "/"),
            route(None, "/rooms"),
            route(None, "/"),
        ]);
        assert_eq!(table.route(Some("chat.example.com"), "/rooms/1"), Some(0));
        assert_eq!(table.route(Some("chat.example.com"), "/other"), Some(1));
        assert_eq!(table.route(Some("api.example.com"), "/rooms/1"), Some(2));
        assert_eq!(table.route(Some("api.example.com"), "/x"), Some(3));
        assert_eq!(table.route(None, "/rooms"), Some(2));
        assert_eq!(table.len(), 4);
    }

    #[test]
    fn a_broad_route_first_shadows_later_ones() {
        let table = RouteTable::new(&[route(None, "/"), route(Some("a.example"), "/")]);
        assert_eq!(table.route(Some("a.example"), "/"), Some(0));
    }

    #[test]
    fn exact_hosts_ignore_case_port_and_root_dot() {
        let table = RouteTable::new(&[route(Some("Chat.Example.com"), "/")]);
        for host in [
            "chat.example.com",
            "CHAT.EXAMPLE.COM",
            "chat.example.com:443",
            "chat.example.com.",
            "Chat.Example.Com.:8080",
        ] {
            assert_eq!(table.route(Some(host), "/"), Some(0), "{host}");
        }
        for host in [
            "example.com",
            "x.chat.example.com",
            "chat.example.co",
            "chat.example.com.evil",
        ] {
            assert_eq!(table.route(Some(host), "/"), None, "{host}");
        }
        assert_eq!(table.route(None, "/"), None);
        assert_eq!(table.route(Some(""), "/"), None);
    }

    #[test]
    fn ip_literal_hosts() {
        let table = RouteTable::new(&[
            route(Some("[2001:DB8::1]"), "/"),
            route(Some("192.0.2.1"), "/"),
        ]);
        assert_eq!(table.route(Some("[2001:db8::1]:8443"), "/"), Some(0));
        assert_eq!(table.route(Some("[2001:db8::1]"), "/"), Some(0));
        assert_eq!(table.route(Some("2001:db8::1"), "/"), Some(0));
        assert_eq!(table.route(Some("[2001:db8::2]:8443"), "/"), None);
        assert_eq!(table.route(Some("192.0.2.1:80"), "/"), Some(1));

        let bare = RouteTable::new(&[route(Some("::1"), "/")]);
        assert_eq!(bare.route(Some("[::1]:80"), "/"), Some(0));
        assert_eq!(bare.route(Some("[::1"), "/"), Some(0));
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        let table = RouteTable::new(&[route(Some("*.Example.com"), "/")]);
        for host in [
            "a.example.com",
            "a.b.example.com",
            "A.EXAMPLE.COM:443",
            "a.example.com.",
        ] {
            assert_eq!(table.route(Some(host), "/"), Some(0), "{host}");
        }
        for host in [
            "example.com",
            "example.com:443",
            "aexample.com",
            "a.example.org",
            "é.com",
        ] {
            assert_eq!(table.route(Some(host), "/"), None, "{host}");
        }
        assert_eq!(table.route(None, "/"), None);
    }

    #[test]
    fn path_prefixes_ignore_the_query() {
        let table = RouteTable::new(&[route(None, "/ws/chat"), route(None, "/ws")]);
        assert_eq!(table.route(None, "/ws/chat"), Some(0));
        assert_eq!(table.route(None, "/ws/chat/room"), Some(0));
        assert_eq!(
            table.route(None, "/ws/chatter"),
            Some(0),
            "a plain prefix, as configured"
        );
        assert_eq!(table.route(None, "/ws?x=/ws/chat"), Some(1));
        assert_eq!(table.route(None, "/ws/ch?at"), Some(1));
        assert_eq!(table.route(None, "/WS"), None, "paths are case-sensitive");
        assert_eq!(table.route(None, "/"), None);
        assert_eq!(table.route(None, ""), None);
    }

    #[test]
    fn an_empty_table_matches_nothing() {
        let table = RouteTable::new(&[]);
        assert!(table.is_empty());
        assert_eq!(table.route(Some("a"), "/"), None);
    }

    #[test]
    fn hostname_normalisation() {
        assert_eq!(hostname("a.b:1"), "a.b");
        assert_eq!(hostname("a.b"), "a.b");
        assert_eq!(hostname("a.b."), "a.b");
        assert_eq!(hostname("[::1]:1"), "::1");
        assert_eq!(hostname("::1"), "::1");
        assert_eq!(hostname(""), "");
        assert_eq!(hostname(":80"), "");
    }
}
