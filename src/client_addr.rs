//! Who the client is: the address a connection came from, or, when it came through a proxy the
//! listener trusts, the address that proxy vouches for (nginx's `real_ip` with
//! `real_ip_recursive on`).
//!
//! Invariants:
//! - a forwarding chain (`X-Forwarded-For`, else `Forwarded`) is read only when the address it
//!   reached us from is in the listener's `trusted_proxies`; otherwise the client is that
//!   address, and the chain is replaced for the backend ([`ClientAddr::via`] is `None`);
//! - the chain is walked from the right, skipping trusted addresses, and the first untrusted
//!   one is the client; when every element is trusted the leftmost is; an element that is not
//!   an address ends the walk at the last address believed (a proxy we trust), so garbage a
//!   client wrote in front of a trusted proxy's entries never becomes the address.

use crate::proto::handshake;
use ipnet::IpNet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The networks whose word about a client's address is believed (a listener's
/// `trusted_proxies`): a PROXY protocol header, and `X-Forwarded-For` / `Forwarded`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrustedNetworks(Vec<IpNet>);

impl TrustedNetworks {
    pub fn new(networks: Vec<IpNet>) -> Self {
        Self(networks)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn networks(&self) -> &[IpNet] {
        &self.0
    }

    /// Whether `ip` is in one of the networks; an IPv4-mapped IPv6 address (a dual-stack
    /// socket's view of an IPv4 peer) counts as the IPv4 address it maps.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// The client of one request: its address as believed, and the trusted proxy whose forwarding
/// chain was believed to find it, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr {
    addr: SocketAddr,
    via: Option<IpAddr>,
}

impl ClientAddr {
    /// A client that reached the gateway itself (or through a PROXY protocol header, which
    /// names the client's own connection).
    pub fn direct(addr: SocketAddr) -> Self {
        Self { addr, via: None }
    }

    /// The client as believed. The port is 0 when a forwarding chain named only an address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }

    /// The trusted proxy the request came from, when its forwarding chain was believed: the
    /// backend then gets that chain extended by this proxy's address, and otherwise a chain
    /// that starts with the client.
    pub fn via(&self) -> Option<IpAddr> {
        self.via
    }

    /// The client of a request that arrived from `hop` with `headers`.
    pub fn of_request<'h>(
        hop: SocketAddr,
        headers: impl Fn(&str) -> Vec<&'h [u8]>,
        trusted: &TrustedNetworks,
    ) -> Self {
        if trusted.is_empty() || !trusted.contains(hop.ip()) {
            return Self::direct(hop);
        }
        let xff = headers("x-forwarded-for");
        let found = if xff.is_empty() {
            walk(&headers("forwarded"), forwarded_for, trusted)
        } else {
            walk(&xff, plain_element, trusted)
        };
        Self {
            addr: found.unwrap_or(hop),
            via: Some(hop.ip()),
        }
    }

    /// [`of_request`](Self::of_request) for a parsed request head.
    pub fn of_head<'h>(
        hop: SocketAddr,
        headers: &[httparse::Header<'h>],
        trusted: &TrustedNetworks,
    ) -> Self {
        Self::of_request(
            hop,
            |name| handshake::headers::values(headers, name).collect(),
            trusted,
        )
    }

    /// [`of_request`](Self::of_request) for a request hyper parsed.
    pub fn of_header_map(
        hop: SocketAddr,
        headers: &http::HeaderMap,
        trusted: &TrustedNetworks,
    ) -> Self {
        Self::of_request(
            hop,
            |name| {
                headers
                    .get_all(name)
                    .iter()
                    .map(http::HeaderValue::as_bytes)
                    .collect()
            },
            trusted,
        )
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.addr.port() == 0 {
            fmt::Display::fmt(&self.addr.ip(), f)
        } else {
            fmt::Display::fmt(&self.addr, f)
        }
    }
}

/// The client named by a chain whose `values` are its header lines in order: the rightmost
/// untrusted element, or the leftmost when all are trusted. `None` when the chain names no
/// address at all.
fn walk(
    values: &[&[u8]],
    element: fn(&str) -> Option<SocketAddr>,
    trusted: &TrustedNetworks,
) -> Option<SocketAddr> {
    let mut believed = None;
    for value in values.iter().rev() {
        let Ok(value) = std::str::from_utf8(value) else {
            return believed;
        };
        for item in value.rsplit(',') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let Some(addr) = element(item) else {
                return believed;
            };
            believed = Some(addr);
            if !trusted.contains(addr.ip()) {
                return believed;
            }
        }
    }
    believed
}

/// An `X-Forwarded-For` element: `192.0.2.1`, `2001:db8::1`, `192.0.2.1:4000` or
/// `[2001:db8::1]:4000`.
fn plain_element(item: &str) -> Option<SocketAddr> {
    let item = item.trim_matches('"');
    if let Ok(ip) = item.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 0));
    }
    if let Ok(addr) = item.parse::<SocketAddr>() {
        return Some(addr);
    }
    // `[2001:db8::1]` without a port.
    item.strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 0))
}

/// The `for=` parameter of a `Forwarded` element (RFC 7239 §5.2); `unknown` and obfuscated
/// identifiers name no address.
fn forwarded_for(item: &str) -> Option<SocketAddr> {
    let value = item.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then(|| value.trim())
    })?;
    plain_element(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(list: &[&str]) -> TrustedNetworks {
        TrustedNetworks::new(list.iter().map(|n| n.parse().unwrap()).collect())
    }

    fn client(hop: &str, fields: &[(&str, &str)], nets: &[&str]) -> ClientAddr {
        let headers: Vec<httparse::Header<'_>> = fields
            .iter()
            .map(|(name, value)| httparse::Header {
                name,
                value: value.as_bytes(),
            })
            .collect();
        ClientAddr::of_head(hop.parse().unwrap(), &headers, &trusted(nets))
    }

    #[test]
    fn an_untrusted_hop_is_the_client_whatever_it_claims() {
        let c = client(
            "198.51.100.9:5000",
            &[("X-Forwarded-For", "203.0.113.1")],
            &["10.0.0.0/8"],
        );
        assert_eq!(c.addr(), "198.51.100.9:5000".parse().unwrap());
        assert_eq!(c.via(), None);
        let none = client("10.0.0.1:5000", &[("X-Forwarded-For", "203.0.113.1")], &[]);
        assert_eq!(none.via(), None, "nothing is trusted by default");
    }

    #[test]
    fn the_walk_skips_trusted_addresses_from_the_right() {
        let c = client(
            "10.0.0.1:5000",
            &[
                ("X-Forwarded-For", "6.6.6.6, 203.0.113.1"),
                ("X-Forwarded-For", "10.0.0.7"),
            ],
            &["10.0.0.0/8"],
        );
        assert_eq!(c.ip(), "203.0.113.1".parse::<IpAddr>().unwrap());
        assert_eq!(c.via(), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(c.to_string(), "203.0.113.1");
    }

    #[test]
    fn all_trusted_gives_the_leftmost_and_garbage_stops_the_walk() {
        let all = client(
            "10.0.0.1:5000",
            &[("X-Forwarded-For", "10.0.0.3, 10.0.0.2")],
            &["10.0.0.0/8"],
        );
        assert_eq!(all.ip(), "10.0.0.3".parse::<IpAddr>().unwrap());
        let garbage = client(
            "10.0.0.1:5000",
            &[("X-Forwarded-For", "1.2.3.4, nonsense, 10.0.0.2")],
            &["10.0.0.0/8"],
        );
        assert_eq!(garbage.ip(), "10.0.0.2".parse::<IpAddr>().unwrap());
        let empty = client(
            "10.0.0.1:5000",
            &[("X-Forwarded-For", "x")],
            &["10.0.0.0/8"],
        );
        assert_eq!(empty.addr(), "10.0.0.1:5000".parse().unwrap());
    }

    #[test]
    fn forwarded_is_read_when_there_is_no_x_forwarded_for() {
        let c = client(
            "[2001:db8::1]:5000",
            &[(
                "Forwarded",
                "for=192.0.2.60;proto=http, for=\"[2001:db8:cafe::17]:4711\", for=\"[2001:db8::2]\"",
            )],
            &["2001:db8::/64"],
        );
        assert_eq!(c.addr(), "[2001:db8:cafe::17]:4711".parse().unwrap());
    }

    #[test]
    fn an_ipv4_mapped_hop_matches_an_ipv4_network() {
        let c = client(
            "[::ffff:10.0.0.1]:5000",
            &[("X-Forwarded-For", "203.0.113.1")],
            &["10.0.0.0/8"],
        );
        assert_eq!(c.ip(), "203.0.113.1".parse::<IpAddr>().unwrap());
    }
}
