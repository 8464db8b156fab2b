//! The `cluster:` section: this instance's name, its peers, the shared secret and the
//! listener kept for peer traffic. Peer addresses are `host:port` text resolved when
//! connecting, so a StatefulSet's pod names work; only this list ever supplies an address
//! to connect to. With `peers_dns` the list is a DNS answer instead, and an instance is
//! named by its IP, so a session id names an address that the latest answer must hold.

use super::{Cx, check_instance, split_host_port};
use crate::config::lines::YamlPath;
use crate::config::model::{Cluster, DnsBackends, DnsLookup, Listener, Peer, PeerSecret};
use crate::config::raw::Raw;
use std::collections::HashMap;

const CLUSTER_KEYS: &[&str] = &[
    "name",
    "name_env",
    "address",
    "peers",
    "peers_dns",
    "secret",
    "secret_env",
    "listener",
    "tls",
];
const PEER_KEYS: &[&str] = &["name", "address"];
const PEERS_DNS_KEYS: &[&str] = &["name", "port", "resolver", "min_interval", "max_interval"];
/// Far more than any cluster forwarding by a static list; a typo'd generator is caught.
const MAX_PEERS: usize = 256;

impl Cx<'_> {
    pub(super) fn cluster(
        &mut self,
        raw: &Raw,
        path: &YamlPath,
        listeners: Option<&[Listener]>,
    ) -> Option<Cluster> {
        let f = self.fields(
            raw,
            path,
            "a mapping with name, peers and secret (or secret_env)",
            CLUSTER_KEYS,
        )?;
        let name = match (f.get("name"), f.get("name_env")) {
            (None, None) => {
                self.err(
                    &path.key("name"),
                    "required key is missing (expected this instance's name, or name_env)",
                );
                None
            }
            (Some(_), Some((_, env_path))) => {
                self.err(&env_path, "give name or name_env, not both");
                None
            }
            (Some((raw, path)), None) => self
                .string(raw, &path, "an instance name such as gw-1")
                .and_then(|name| {
                    let checked = check_instance(name.trim());
                    self.checked(&path, checked)
                }),
            (None, Some((raw, path))) => self
                .string(raw, &path, "the name of an environment variable")
                .and_then(|var| {
                    let checked = match std::env::var(var) {
                        Ok(name) => check_instance(name.trim())
                            .map_err(|e| format!("environment variable {var}: {e}")),
                        Err(_) => Err(format!("environment variable {var} is not set")),
                    };
                    self.checked(&path, checked)
                }),
        };
        let address = match f.get("address") {
            None => Some(None),
            Some((raw, path)) => self.peer_address(raw, &path).map(Some),
        };
        let (peers, peers_dns) = match (f.get("peers"), f.get("peers_dns")) {
            (None, None) => {
                self.err(
                    &path.key("peers"),
                    "required key is missing (expected a list of peers, each with a name and an address, or peers_dns)",
                );
                (None, None)
            }
            (Some(_), Some((_, dns_path))) => {
                self.err(&dns_path, "give peers or peers_dns, not both");
                (None, None)
            }
            (Some((raw, path)), None) => (self.peers(raw, &path), Some(None)),
            (None, Some((raw, path))) => (Some(Vec::new()), self.peers_dns(raw, &path).map(Some)),
        };
        let secret = match (f.get("secret"), f.get("secret_env")) {
            (None, None) => {
                self.err(
                    &path.key("secret"),
                    "required key is missing (expected the secret shared by every instance, or secret_env)",
                );
                None
            }
            (Some(_), Some((_, env_path))) => {
                self.err(&env_path, "give secret or secret_env, not both");
                None
            }
            (Some((raw, path)), None) => self
                .string(raw, &path, "the secret shared by every instance")
                .and_then(|secret| {
                    let checked = PeerSecret::new(secret);
                    self.checked(&path, checked)
                }),
            (None, Some((raw, path))) => self
                .string(raw, &path, "the name of an environment variable")
                .and_then(|var| {
                    let checked = match std::env::var(var) {
                        Ok(secret) => PeerSecret::new(&secret),
                        Err(_) => Err(format!("environment variable {var} is not set")),
                    };
                    self.checked(&path, checked)
                }),
        };
        let listener = match f.get("listener") {
            None => Some(None),
            Some((raw, path)) => {
                let named = self.string(raw, &path, "the name of a listener")?;
                match listeners {
                    // The listeners' own problems are reported already.
                    None => None,
                    Some(listeners) => match listeners.iter().position(|l| l.name == named) {
                        Some(index) if listeners.len() > 1 => Some(Some(index)),
                        Some(_) => {
                            self.err(
                                &path,
                                "the peer listener would leave no listener for clients: add another listener",
                            );
                            None
                        }
                        None => {
                            let names: Vec<&str> =
                                listeners.iter().map(|l| l.name.as_str()).collect();
                            self.err(
                                &path,
                                format!(
                                    "no listener named {named:?} (listeners: {})",
                                    names.join(", ")
                                ),
                            );
                            None
                        }
                    },
                }
            }
        };
        let tls = match f.get("tls") {
            None => Some(None),
            Some((raw, path)) => self.upstream_tls(raw, &path).map(Some),
        };
        let (name, address, peers, peers_dns) = (name?, address?, peers?, peers_dns?);
        if peers_dns.is_some() {
            let name_path = match f.get("name_env") {
                Some((_, env_path)) => env_path,
                None => path.key("name"),
            };
            if let Err(e) = check_address_name(&name) {
                self.err(&name_path, e);
                return None;
            }
            if let Some((_, address_path)) = f.get("address") {
                self.err(
                    &address_path,
                    "with peers_dns, peers reach this instance at its name and peers_dns.port: remove address",
                );
                return None;
            }
        }
        if let (Some(own), Some(listed)) = (&address, peers.iter().find(|p| p.name == name))
            && *own != listed.address
        {
            self.err(
                &path.key("address"),
                format!(
                    "{own} differs from this instance's entry in peers ({}): peers would reach it elsewhere",
                    listed.address
                ),
            );
            return None;
        }
        let peers = peers.into_iter().filter(|peer| peer.name != name).collect();
        Some(Cluster {
            name,
            address,
            peers,
            peers_dns,
            secret: secret?,
            listener: listener?,
            tls: tls?,
        })
    }

    fn peers(&mut self, raw: &Raw, path: &YamlPath) -> Option<Vec<Peer>> {
        let items = self.list(raw, path, "peers")?;
        if items.len() > MAX_PEERS {
            self.err(path, format!("{} peers; at most {MAX_PEERS}", items.len()));
            return None;
        }
        let mut peers = Vec::new();
        let mut ok = true;
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let item_path = path.index(i);
            let Some(f) = self.fields(
                item,
                &item_path,
                "a mapping with name and address",
                PEER_KEYS,
            ) else {
                ok = false;
                continue;
            };
            let name = f
                .required(self, "name", "the peer's instance name")
                .and_then(|(raw, path)| {
                    let name = self.string(raw, &path, "an instance name such as gw-2")?;
                    let checked = check_instance(name.trim());
                    self.checked(&path, checked)
                });
            let address = f
                .required(self, "address", "host:port where the peer listens")
                .and_then(|(raw, path)| self.peer_address(raw, &path));
            let (Some(name), Some(address)) = (name, address) else {
                ok = false;
                continue;
            };
            if let Some(first) = seen.insert(name.clone(), i) {
                self.err(
                    &item_path.key("name"),
                    format!("peer {name:?} is already listed at peers[{first}]"),
                );
                ok = false;
                continue;
            }
            peers.push(Peer { name, address });
        }
        ok.then_some(peers)
    }

    fn peers_dns(&mut self, raw: &Raw, path: &YamlPath) -> Option<DnsBackends> {
        let f = self.fields(
            raw,
            path,
            "a mapping with name and port, and optionally resolver, min_interval, max_interval",
            PEERS_DNS_KEYS,
        )?;
        let name = f
            .required(
                self,
                "name",
                "the DNS name of the peers, such as a headless Service's",
            )
            .and_then(|(raw, path)| {
                let name =
                    self.string(raw, &path, "a DNS name such as wsgate-peers.default.svc")?;
                let name = name.trim();
                let checked = if name.parse::<std::net::IpAddr>().is_ok() {
                    Err(format!(
                        "{name:?} is an address, not a DNS name (use peers)"
                    ))
                } else if name.is_empty() || name.contains(['/', '@', ' ', ':']) {
                    Err(format!("{name:?} is not a DNS name"))
                } else {
                    Ok(name.to_owned())
                };
                self.checked(&path, checked)
            });
        let port = f
            .required(
                self,
                "port",
                "the port every peer listens on for peer traffic",
            )
            .and_then(|(raw, path)| self.integer(raw, &path, 1, 65535))
            .and_then(|port| u16::try_from(port).ok());
        let schedule = self.dns_schedule(&f);
        let (name, port, (resolver, min_interval, max_interval)) = (name?, port?, schedule?);
        Some(DnsBackends {
            lookup: DnsLookup::Address { name, port },
            secure: false,
            base_path: String::new(),
            resolver,
            min_interval,
            max_interval,
        })
    }

    fn peer_address(&mut self, raw: &Raw, path: &YamlPath) -> Option<String> {
        let text = self.string(raw, path, "host:port, such as gw-2.peers:9100")?;
        let checked = match split_host_port(text.trim()) {
            Ok((host, Some(_))) if !host.is_empty() && !host.contains(['/', '@', ' ']) => {
                Ok(text.trim().to_owned())
            }
            Ok((_, None)) => Err(format!("{text:?} has no port (expected host:port)")),
            Ok(_) => Err(format!("{text:?} is not host:port")),
            Err(e) => Err(e),
        };
        self.checked(path, checked)
    }
}

/// With `peers_dns` an instance's name is the address its peers reach it on, written as the
/// DNS answer writes it, so that the answer's addresses and the session ids' names compare
/// as text.
pub(super) fn check_address_name(name: &str) -> Result<(), String> {
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.to_string() == name => Ok(()),
        Ok(ip) => Err(format!(
            "with peers_dns the name must be written as {ip} (the form DNS answers are compared in), found {name:?}"
        )),
        Err(_) => Err(format!(
            "with peers_dns the name must be the IP address peers reach this instance on (such as name_env: POD_IP), found {name:?}"
        )),
    }
}
