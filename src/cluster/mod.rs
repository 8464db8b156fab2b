//! Several instances as one gateway (`cluster:`): a session request that reaches an instance
//! which does not own the session is forwarded to the owner, named by the session id's
//! instance, over an internal hop (`forward` for the HTTP operations, `tunnel` for the session
//! WebSocket). The balancer in front needs no stickiness and the instances share no store.
//!
//! Invariants:
//! - an address to connect to comes only from `cluster.peers` (the configured list, or the
//!   latest `peers_dns` answer): a session id names an instance, and an instance missing
//!   from the list is "session gone", never a lookup nor a connection attempt;
//! - a request carrying any `wsgate-peer-*` header is a peer's or is refused: the secret must
//!   match (constant time), the sender must be a configured peer (with `peers_dns`, any
//!   other address: the answer may not list a new pod yet), and on a cluster with a peer
//!   listener it must arrive there; a client's request never reaches the session layer
//!   with a peer's identity;
//! - a forwarded request is served where it lands: it is never forwarded again, so a
//!   disagreement between instances ends in a 410, never a loop;
//! - every hop has a deadline (connect, answer head, silence), and a failed hop is the
//!   documented "session gone" (410 / 4410), which the client library answers with a new
//!   session.

pub mod forward;
pub mod pool;
pub mod tunnel;

use crate::client_addr::ClientAddr;
use crate::config::{Cluster, Peer};
use crate::gateway::Gateway;
use crate::metrics::{PeerForward, PeerLabel};
use crate::stream::Stream;
use rustls_pki_types::ServerName;
use std::net::SocketAddr;
use std::time::Duration;

/// The shared secret (`cluster.secret`).
pub const HEADER_SECRET: &str = "wsgate-peer-secret";
/// The forwarding instance's name.
pub const HEADER_FROM: &str = "wsgate-peer-from";
/// The client's address as the forwarding instance saw it.
pub const HEADER_CLIENT: &str = "wsgate-peer-client";
/// `1` when the client's connection to the forwarding instance was TLS.
pub const HEADER_TLS: &str = "wsgate-peer-tls";
const PREFIX: &str = "wsgate-peer-";

/// Reaching a peer on the same network takes milliseconds; seconds mean it is gone.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether a header belongs to the peer hop (and so is never taken from a client).
pub fn is_peer_header(name: &str) -> bool {
    name.len() >= PREFIX.len() && name[..PREFIX.len()].eq_ignore_ascii_case(PREFIX)
}

/// Who sent a request, as far as the cluster is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingress {
    /// A client, at the address of its connection.
    Client,
    /// A peer forwarding a client's request: that client's address and transport.
    Peer { client: ClientAddr, tls: bool },
    /// Refused with 403 and this line.
    Refused(&'static str),
}

/// Sorts a request by its headers and the listener it arrived on.
pub fn ingress(
    gateway: &Gateway,
    listener: Option<usize>,
    headers: &[httparse::Header<'_>],
) -> Ingress {
    let one = |name: &str| {
        let mut values = headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value);
        match (values.next(), values.next()) {
            (Some(value), None) => Some(value),
            _ => None,
        }
    };
    let claims_peer = headers.iter().any(|h| is_peer_header(h.name));
    let Some(cluster) = &gateway.config.cluster else {
        return if claims_peer {
            Ingress::Refused("wsgate-peer-* headers are reserved for the gateway's own peers")
        } else {
            Ingress::Client
        };
    };
    let on_peer_listener = cluster.listener.is_some() && cluster.listener == listener;
    if !claims_peer {
        return if on_peer_listener {
            Ingress::Refused("this listener serves the gateway's peers only")
        } else {
            Ingress::Client
        };
    }
    if !one(HEADER_SECRET).is_some_and(|offered| cluster.secret.matches(offered)) {
        return Ingress::Refused("peer authentication failed");
    }
    if cluster.listener.is_some() && !on_peer_listener {
        return Ingress::Refused("peer requests are accepted on the peer listener only");
    }
    let from = one(HEADER_FROM).and_then(|v| std::str::from_utf8(v).ok());
    // With peers from DNS, a peer that answers before this instance's next lookup has seen
    // it is still a peer (the secret proves it); it only cannot be forwarded to yet.
    let known = |from: &str| {
        cluster.peer(from).is_some()
            || (cluster.peers_dns.is_some()
                && from != cluster.name
                && from.parse::<std::net::IpAddr>().is_ok())
    };
    if !from.is_some_and(known) {
        return Ingress::Refused("the forwarding instance is not a configured peer");
    }
    let client = one(HEADER_CLIENT)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<SocketAddr>().ok());
    let Some(client) = client else {
        return Ingress::Refused("a forwarded request must carry the client's address");
    };
    let tls = one(HEADER_TLS) == Some(b"1");
    Ingress::Peer {
        client: ClientAddr::direct(client),
        tls,
    }
}

/// Where a session request is served.
#[derive(Debug, Clone, Copy)]
pub enum Owner<'g> {
    /// Here: the session is this instance's, or is gone (the session layer says which).
    Local,
    /// Forwarded to this peer.
    Peer(&'g Peer),
}

/// The owner of session `sid`, for a request that arrived as `ingress`.
pub fn owner<'g>(gateway: &'g Gateway, sid: &str, ingress: Ingress, op: &'static str) -> Owner<'g> {
    let Some(cluster) = &gateway.config.cluster else {
        return Owner::Local;
    };
    let Some((instance, _)) = sid.split_once('~') else {
        return Owner::Local;
    };
    if instance == cluster.name || matches!(ingress, Ingress::Peer { .. }) {
        return Owner::Local;
    }
    match cluster.peer(instance) {
        Some(peer) => Owner::Peer(peer),
        None => {
            count(gateway, "unknown", op, "unknown_peer");
            Owner::Local
        }
    }
}

/// The headers a forwarded request carries for the owner, after the client's own.
pub fn peer_headers(
    cluster: &Cluster,
    client: SocketAddr,
    tls: bool,
) -> [(&'static str, String); 4] {
    [
        (HEADER_SECRET, cluster.secret.as_str().to_owned()),
        (HEADER_FROM, cluster.name.clone()),
        (HEADER_CLIENT, client.to_string()),
        (HEADER_TLS, if tls { "1" } else { "0" }.to_owned()),
    ]
}

/// A forward's outcome, counted by peer, operation and result.
pub fn count(gateway: &Gateway, peer: &str, op: &'static str, result: &'static str) {
    gateway
        .metrics
        .peer_forwards
        .get_or_create(&PeerForward {
            peer: peer.to_owned(),
            op,
            result,
        })
        .inc();
}

/// The time to the owner's answer head.
pub fn observe(gateway: &Gateway, peer: &str, seconds: f64) {
    gateway
        .metrics
        .peer_forward_seconds
        .get_or_create(&PeerLabel {
            peer: peer.to_owned(),
        })
        .observe(seconds);
}

/// Connects to a peer within [`CONNECT_TIMEOUT`], over TLS when `cluster.tls` says so (the
/// certificate verified for `server_name`, or for the host of the peer's address).
pub async fn connect(gateway: &Gateway, peer: &Peer) -> Result<Stream, &'static str> {
    let connecting = async {
        let tcp = tokio::net::TcpStream::connect(&peer.address)
            .await
            .map_err(|_| "unreachable")?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &gateway.peer_tls else {
            return Ok(Stream::Plain(tcp));
        };
        let name = match &tls.server_name {
            Some(name) => name.clone(),
            None => {
                let host = peer
                    .address
                    .rsplit_once(':')
                    .map_or(peer.address.as_str(), |(host, _)| host)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                ServerName::try_from(host.to_owned()).map_err(|_| "failed")?
            }
        };
        let stream = tls.connector.connect(name, tcp).await.map_err(|error| {
            tracing::warn!(peer = %peer.name, "TLS to the peer failed: {error}");
            "failed"
        })?;
        Ok(Stream::ClientTls(Box::new(stream)))
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(result) => result,
        Err(_) => Err("timed_out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn gateway(cluster: &str) -> Gateway {
        let yaml = format!(
            "listeners:\n  - {{name: clients, address: 127.0.0.1:8080}}\n  - {{name: peers, address: 127.0.0.1:9100}}\nupstreams:\n  u:\n    backends: [ws://127.0.0.1:9001]\nroutes:\n  - upstream: u\n{cluster}"
        );
        let config = crate::config::from_yaml_str(&yaml, "t.yaml").unwrap();
        Gateway::new(config).unwrap()
    }

    fn headers<'h>(pairs: &'h [(&'h str, &'h str)]) -> Vec<httparse::Header<'h>> {
        pairs
            .iter()
            .map(|(name, value)| httparse::Header {
                name,
                value: value.as_bytes(),
            })
            .collect()
    }

    #[test]
    fn only_a_configured_peer_with_the_secret_and_a_client_address_is_a_peer() {
        let gateway = gateway(&format!(
            "cluster:\n  name: gw-1\n  secret: {SECRET}\n  peers:\n    - {{name: gw-2, address: 10.0.0.2:9100}}\n"
        ));
        let good = [
            ("Wsgate-Peer-Secret", SECRET),
            ("wsgate-peer-from", "gw-2"),
            ("wsgate-peer-client", "[2001:db8::1]:4000"),
            ("wsgate-peer-tls", "1"),
        ];
        assert_eq!(
            ingress(&gateway, Some(0), &headers(&good)),
            Ingress::Peer {
                client: ClientAddr::direct("[2001:db8::1]:4000".parse().unwrap()),
                tls: true
            }
        );
        let mut cases: Vec<Vec<(&str, &str)>> = Vec::new();
        // An unknown sender, this instance itself, no client address, a bad one, the secret twice.
        for (index, value) in [(1, "gw-9"), (1, "gw-1"), (2, "nowhere"), (0, "x")] {
            let mut case = good.to_vec();
            case[index].1 = value;
            cases.push(case);
        }
        cases.push(good[..3].iter().chain(&good[..1]).copied().collect());
        cases.push(good[..2].to_vec());
        for case in cases {
            assert!(
                matches!(
                    ingress(&gateway, Some(0), &headers(&case)),
                    Ingress::Refused(_)
                ),
                "{case:?}"
            );
        }
        assert_eq!(
            ingress(&gateway, Some(1), &headers(&[("host", "x")])),
            Ingress::Client
        );
    }

    #[test]
    fn without_a_cluster_peer_headers_are_refused_and_owners_are_local() {
        let gateway = gateway("");
        assert!(matches!(
            ingress(&gateway, Some(0), &headers(&[("wsgate-peer-from", "gw-2")])),
            Ingress::Refused(_)
        ));
        assert_eq!(
            ingress(&gateway, Some(0), &headers(&[("x-wsgate-peer", "1")])),
            Ingress::Client
        );
        assert!(matches!(
            owner(&gateway, "gw-2~AAAA", Ingress::Client, "poll"),
            Owner::Local
        ));
    }

    #[test]
    fn a_session_id_names_a_peer_only_by_the_list() {
        let gateway = gateway(&format!(
            "cluster:\n  name: gw-1\n  secret: {SECRET}\n  peers:\n    - {{name: gw-2, address: 10.0.0.2:9100}}\n"
        ));
        let peer = Ingress::Peer {
            client: ClientAddr::direct("10.1.1.1:1".parse().unwrap()),
            tls: false,
        };
        assert!(
            matches!(owner(&gateway, "gw-2~AAAA", Ingress::Client, "poll"), Owner::Peer(p) if p.address == "10.0.0.2:9100")
        );
        assert!(matches!(
            owner(&gateway, "gw-2~AAAA", peer, "poll"),
            Owner::Local
        ));
        for sid in [
            "gw-1~AAAA",
            "10.0.0.9:80~AAAA",
            "gw-2",
            "~AAAA",
            "gw-3~AAAA",
        ] {
            assert!(
                matches!(owner(&gateway, sid, Ingress::Client, "poll"), Owner::Local),
                "{sid}"
            );
        }
    }

    /// A gateway named `name` with peers from DNS, which answered `.1` and `.2` of its network.
    fn gateway_named(name: &str) -> Gateway {
        let gateway = gateway(&format!(
            "cluster:\n  name: \"{name}\"\n  secret: {SECRET}\n  peers_dns: {{name: peers.internal, port: 9100}}\n"
        ));
        let answer = if name.contains(':') {
            ["[fd00::1]:9100", "[fd00::2]:9100"]
        } else {
            ["10.0.0.1:9100", "10.0.0.2:9100"]
        };
        let mut config = gateway.config.clone();
        let cluster = config.cluster.as_mut().unwrap();
        cluster.peers = cluster.peers_at(answer.map(|a| a.parse().unwrap()));
        Gateway::new(config).unwrap()
    }

    #[test]
    fn with_peers_from_dns_a_session_id_names_an_address_of_the_latest_answer() {
        let gateway = gateway_named("10.0.0.1");
        assert!(
            matches!(owner(&gateway, "10.0.0.2~AAAA", Ingress::Client, "poll"), Owner::Peer(p) if p.address == "10.0.0.2:9100")
        );
        let v6 = gateway_named("fd00::1");
        assert!(
            matches!(owner(&v6, "fd00::2~AAAA", Ingress::Client, "poll"), Owner::Peer(p) if p.address == "[fd00::2]:9100")
        );
        // Not in the answer (any more): served here, where the session is gone; no address
        // is made from the id.
        for sid in ["10.0.0.3~AAAA", "10.0.0.1~AAAA"] {
            assert!(
                matches!(owner(&gateway, sid, Ingress::Client, "poll"), Owner::Local),
                "{sid}"
            );
        }
        // A peer this instance has not seen in DNS yet is still a peer if it has the secret.
        let from = |name: &'static str| {
            [
                (HEADER_SECRET, SECRET),
                (HEADER_FROM, name),
                (HEADER_CLIENT, "10.9.9.9:1"),
            ]
        };
        assert!(matches!(
            ingress(&gateway, Some(0), &headers(&from("10.0.0.3"))),
            Ingress::Peer { .. }
        ));
        for name in ["10.0.0.1", "gw-2"] {
            assert!(
                matches!(
                    ingress(&gateway, Some(0), &headers(&from(name))),
                    Ingress::Refused(_)
                ),
                "{name}"
            );
        }
    }
}
