//! From the [`Raw`] tree to the typed [`Config`], collecting every problem on the way.
//!
//! Invariants:
//! - a problem is recorded whenever a converter returns `None`, so an empty problem list
//!   means every part converted and the `Config` is complete;
//! - each problem's path names the most specific key involved (the offending value, or
//!   for a missing key the key itself), which `lines.rs` maps back to a line;
//! - conversion never stops at the first problem: siblings are still checked, so a user
//!   fixing a file sees everything wrong in one run.

mod auth;
mod cluster;

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::lines::YamlPath;
use super::model::*;
use super::raw::Raw;
use super::units::{
    DURATION_FORM, SIZE_FORM, Timer, format_duration, format_size, parse_duration, parse_size,
};
use crate::client_addr::TrustedNetworks;

/// One thing wrong with the file, before line numbers are attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub(crate) path: YamlPath,
    pub(crate) message: String,
}

/// Bounds of every timer: long enough for any sane setting, short enough that deadline
/// arithmetic (`Instant + Duration`) can never overflow.
const MAX_TIMER: Duration = Duration::from_secs(24 * 3600);
/// Browsers cap cookie lifetimes at 400 days (RFC 6265bis).
const MAX_COOKIE_AGE: Duration = Duration::from_secs(400 * 24 * 3600);
const MAX_WEIGHT: i128 = Backend::MAX_WEIGHT as i128;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const TOP_KEYS: &[&str] = &[
    "listeners",
    "upstreams",
    "routes",
    "timeouts",
    "limits",
    "admin",
    "sessions",
    "drain",
    "rebalance",
    "cluster",
];
const LISTENER_KEYS: &[&str] = &[
    "name",
    "address",
    "tls",
    "proxy_protocol",
    "trusted_proxies",
];
const SERVER_TLS_KEYS: &[&str] = &["certificates"];
const CERTIFICATE_KEYS: &[&str] = &["cert", "key", "server_names"];
const UPSTREAM_KEYS: &[&str] = &[
    "backends",
    "dns",
    "connect_timeout",
    "tls",
    "health_check",
    "passive_health",
];
const DNS_KEYS: &[&str] = &["url", "srv", "resolver", "min_interval", "max_interval"];
/// The shortest wait between two lookups of a name, whatever its TTL: DNS answers of 0 s
/// (common for service discovery) must not turn into a lookup loop.
const MIN_DNS_INTERVAL: Duration = Duration::from_millis(100);
const DEFAULT_DNS_MIN_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_DNS_MAX_INTERVAL: Duration = Duration::from_secs(60);
const HEALTH_CHECK_KEYS: &[&str] = &[
    "kind",
    "path",
    "interval",
    "timeout",
    "healthy_threshold",
    "unhealthy_threshold",
];
const PASSIVE_HEALTH_KEYS: &[&str] = &["backoff", "max_backoff"];
/// Enough for any flapping filter; more would leave a dead backend in rotation for ages.
const MAX_THRESHOLD: i128 = 100;
const BACKEND_KEYS: &[&str] = &["url", "weight"];
const UPSTREAM_TLS_KEYS: &[&str] = &["ca_file", "server_name"];
const ROUTE_KEYS: &[&str] = &[
    "name",
    "match",
    "upstream",
    "sticky",
    "sticky_cookie",
    "allowed_origins",
    "compression",
    "ping_passthrough",
    "connect_retries",
    "timeouts",
    "limits",
    "auth",
];
const MATCH_KEYS: &[&str] = &["host", "path_prefix"];
const DEFLATE_KEYS: &[&str] = &[
    "mode",
    "server_no_context_takeover",
    "client_no_context_takeover",
    "server_max_window_bits",
    "client_max_window_bits",
    "min_size",
    "level",
];
const STICKY_KEYS: &[&str] = &["path", "query", "header", "cookie", "client_ip", "claim"];
const STICKY_COOKIE_KEYS: &[&str] = &["name", "max_age", "same_site", "secure"];
const TIMEOUT_KEYS: &[&str] = &[
    "handshake",
    "idle",
    "ping_interval",
    "pong_timeout",
    "close",
    "body",
    "body_total",
];
const LIMIT_KEYS: &[&str] = &[
    "max_frame",
    "max_message",
    "max_connections",
    "max_header_bytes",
    "max_connections_per_ip",
    "handshake_rate",
    "message_rate",
    "compression_memory",
];
/// Limits that only make sense for the whole gateway.
const TOP_LEVEL_ONLY_LIMITS: &[&str] = &[
    "max_connections_per_ip",
    "handshake_rate",
    "compression_memory",
];
const ADMIN_KEYS: &[&str] = &["address", "token", "token_env", "tls"];
const SESSION_KEYS: &[&str] = &[
    "enabled",
    "instance",
    "poll_timeout",
    "timeout",
    "buffer",
    "max_sessions",
    "max_batch",
    "max_sessions_per_ip",
    "open_rate",
    "body_timeout",
];
const DRAIN_KEYS: &[&str] = &["readiness_delay", "spread", "deadline"];
const REBALANCE_KEYS: &[&str] = &["enabled", "window", "on_health_change"];

const ADDRESS_FORM: &str = "an address such as 127.0.0.1:8080 or [::1]:8080";

pub(crate) fn validate(raw: &Raw, base_dir: Option<&Path>) -> Result<Config, Vec<Problem>> {
    let mut cx = Cx {
        problems: Vec::new(),
        base_dir,
        listener_addresses: Vec::new(),
    };
    let config = cx.config(raw);
    match config {
        Some(config) if cx.problems.is_empty() => Ok(config),
        _ => {
            if cx.problems.is_empty() {
                // Unreachable by the module invariant; kept so a bug cannot yield Ok(garbage).
                cx.err(
                    &YamlPath::root(),
                    "internal error: incomplete configuration",
                );
            }
            Err(cx.problems)
        }
    }
}

struct Cx<'a> {
    problems: Vec<Problem>,
    base_dir: Option<&'a Path>,
    /// Every valid listener address by position, for the admin address check, even when
    /// the listeners section as a whole has problems.
    listener_addresses: Vec<(usize, SocketAddr)>,
}

/// A mapping whose keys were already checked against the allowed ones.
struct Fields<'r> {
    path: YamlPath,
    entries: &'r [(String, Raw)],
}

impl<'r> Fields<'r> {
    fn get(&self, key: &str) -> Option<(&'r Raw, YamlPath)> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| (v, self.path.key(key)))
    }

    fn has(&self, key: &str) -> bool {
        self.entries.iter().any(|(k, _)| k == key)
    }

    fn required(&self, cx: &mut Cx<'_>, key: &str, what: &str) -> Option<(&'r Raw, YamlPath)> {
        let found = self.get(key);
        if found.is_none() {
            cx.err(
                &self.path.key(key),
                format!("required key is missing (expected {what})"),
            );
        }
        found
    }
}

/// Route-level overrides: `None` inherits the top-level value.
#[derive(Debug, Default)]
struct PartialTimeouts {
    handshake: Option<Duration>,
    idle: Option<Option<Duration>>,
    ping_interval: Option<Option<Duration>>,
    pong_timeout: Option<Duration>,
    close: Option<Duration>,
    body: Option<Duration>,
    body_total: Option<Option<Duration>>,
}

impl PartialTimeouts {
    fn over(&self, base: Timeouts) -> Timeouts {
        Timeouts {
            handshake: self.handshake.unwrap_or(base.handshake),
            idle: self.idle.unwrap_or(base.idle),
            ping_interval: self.ping_interval.unwrap_or(base.ping_interval),
            pong_timeout: self.pong_timeout.unwrap_or(base.pong_timeout),
            close: self.close.unwrap_or(base.close),
            body: self.body.unwrap_or(base.body),
            body_total: self.body_total.unwrap_or(base.body_total),
        }
    }
}

#[derive(Debug, Default)]
struct PartialLimits {
    max_frame: Option<u64>,
    max_message: Option<u64>,
    max_connections: Option<u32>,
    max_header_bytes: Option<usize>,
    max_connections_per_ip: Option<Option<u32>>,
    handshake_rate: Option<Option<u32>>,
    message_rate: Option<Option<u32>>,
    compression_memory: Option<u64>,
}

impl PartialLimits {
    fn over(&self, base: Limits) -> Limits {
        Limits {
            max_frame: self.max_frame.unwrap_or(base.max_frame),
            max_message: self.max_message.unwrap_or(base.max_message),
            max_connections: self.max_connections.unwrap_or(base.max_connections),
            max_header_bytes: self.max_header_bytes.unwrap_or(base.max_header_bytes),
            max_connections_per_ip: self
                .max_connections_per_ip
                .unwrap_or(base.max_connections_per_ip),
            handshake_rate: self.handshake_rate.unwrap_or(base.handshake_rate),
            message_rate: self.message_rate.unwrap_or(base.message_rate),
            compression_memory: self.compression_memory.unwrap_or(base.compression_memory),
        }
    }
}

/// How a duration key may be set.
#[derive(Debug, Clone, Copy)]
struct TimerRule {
    /// `off` and `0` mean "no timer".
    disableable: bool,
    /// `0` is a real value (act immediately) rather than a mistake.
    zero_ok: bool,
    max: Duration,
}

const TIMER: TimerRule = TimerRule {
    disableable: false,
    zero_ok: false,
    max: MAX_TIMER,
};
const OPTIONAL_TIMER: TimerRule = TimerRule {
    disableable: true,
    zero_ok: false,
    max: MAX_TIMER,
};

impl Cx<'_> {
    fn err(&mut self, path: &YamlPath, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.clone(),
            message: message.into(),
        });
    }

    fn expected(&mut self, path: &YamlPath, what: &str, found: &Raw) {
        self.err(path, format!("expected {what}, found {}", found.kind()));
    }

    // ----- generic converters -----

    fn fields<'r>(
        &mut self,
        raw: &'r Raw,
        path: &YamlPath,
        what: &str,
        allowed: &[&str],
    ) -> Option<Fields<'r>> {
        let Raw::Map(entries) = raw else {
            self.expected(path, what, raw);
            return None;
        };
        for (key, _) in entries {
            if !allowed.contains(&key.as_str()) {
                self.err(
                    &path.key(key),
                    format!(
                        "unknown key {key:?} (expected one of: {})",
                        allowed.join(", ")
                    ),
                );
            }
        }
        Some(Fields {
            path: path.clone(),
            entries,
        })
    }

    fn list<'r>(&mut self, raw: &'r Raw, path: &YamlPath, item: &str) -> Option<&'r [Raw]> {
        match raw {
            Raw::Seq(items) => Some(items),
            other => {
                self.expected(path, &format!("a list of {item}"), other);
                None
            }
        }
    }

    /// A list that must hold at least one item.
    fn nonempty_list<'r>(
        &mut self,
        raw: &'r Raw,
        path: &YamlPath,
        item: &str,
    ) -> Option<&'r [Raw]> {
        let items = self.list(raw, path, item)?;
        if items.is_empty() {
            self.err(
                path,
                format!("the list is empty (at least one of {item} is required)"),
            );
            return None;
        }
        Some(items)
    }

    fn string<'r>(&mut self, raw: &'r Raw, path: &YamlPath, what: &str) -> Option<&'r str> {
        match raw {
            Raw::Str(s) if !s.trim().is_empty() => Some(s),
            Raw::Str(_) => {
                self.err(path, format!("must not be empty (expected {what})"));
                None
            }
            other => {
                self.expected(path, what, other);
                None
            }
        }
    }

    fn boolean(&mut self, raw: &Raw, path: &YamlPath) -> Option<bool> {
        match raw {
            Raw::Bool(b) => Some(*b),
            other => {
                self.expected(path, "true or false", other);
                None
            }
        }
    }

    fn checked<T>(&mut self, path: &YamlPath, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.err(path, message)).ok()
    }

    fn name(&mut self, raw: &Raw, path: &YamlPath) -> Option<String> {
        let name = self.string(raw, path, "a name")?;
        let checked = check_name(name);
        self.checked(path, checked)
    }

    fn integer(&mut self, raw: &Raw, path: &YamlPath, min: i128, max: i128) -> Option<i128> {
        match raw {
            Raw::Int(n) if (min..=max).contains(n) => Some(*n),
            Raw::Int(n) => {
                self.err(path, format!("must be between {min} and {max}, found {n}"));
                None
            }
            other => {
                self.expected(path, &format!("a whole number from {min} to {max}"), other);
                None
            }
        }
    }

    /// A count that can be switched off: `off` (or 0) is `Some(None)`.
    fn optional_count(
        &mut self,
        raw: &Raw,
        path: &YamlPath,
        min: i128,
        max: i128,
    ) -> Option<Option<u32>> {
        match raw {
            Raw::Int(0) => Some(None),
            Raw::Str(text) if text.trim().eq_ignore_ascii_case("off") => Some(None),
            Raw::Int(_) => self
                .integer(raw, path, min, max)
                .and_then(|n| u32::try_from(n).ok())
                .map(Some),
            other => {
                self.expected(
                    path,
                    &format!("a whole number from {min} to {max}, or \"off\""),
                    other,
                );
                None
            }
        }
    }

    fn socket_addr(&mut self, raw: &Raw, path: &YamlPath) -> Option<SocketAddr> {
        let text = self.string(raw, path, ADDRESS_FORM)?;
        let parsed = text.trim().parse::<SocketAddr>().map_err(|_| {
            format!(
                "invalid address {text:?}: expected {ADDRESS_FORM} (host names are not resolved)"
            )
        });
        self.checked(path, parsed)
    }

    fn file(&mut self, raw: &Raw, path: &YamlPath) -> Option<PathBuf> {
        let text = self.string(raw, path, "a file path")?;
        let file = PathBuf::from(text);
        Some(match self.base_dir {
            Some(base) if file.is_relative() => base.join(file),
            _ => file,
        })
    }

    /// A duration key; `Some(None)` is a disabled timer.
    fn timer(&mut self, raw: &Raw, path: &YamlPath, rule: TimerRule) -> Option<Option<Duration>> {
        let parsed = match raw {
            Raw::Int(0) => Timer::After(Duration::ZERO),
            Raw::Int(n) => {
                self.err(
                    path,
                    format!("a duration needs a unit: write \"{n}s\" or \"{n}ms\""),
                );
                return None;
            }
            Raw::Str(text) => {
                let parsed = parse_duration(text);
                self.checked(path, parsed)?
            }
            other => {
                self.expected(path, DURATION_FORM, other);
                return None;
            }
        };
        let off_form = if rule.disableable {
            r#" (or "off")"#
        } else {
            ""
        };
        match parsed {
            Timer::Off if rule.disableable => Some(None),
            Timer::After(d) if d.is_zero() && rule.disableable => Some(None),
            Timer::After(d) if d.is_zero() && rule.zero_ok => Some(Some(d)),
            Timer::Off | Timer::After(Duration::ZERO) => {
                self.err(
                    path,
                    format!(
                        "this timer cannot be disabled (expected {DURATION_FORM} greater than 0)"
                    ),
                );
                None
            }
            Timer::After(d) if d > rule.max => {
                self.err(
                    path,
                    format!(
                        "must be at most {}{off_form}, found {}",
                        format_duration(rule.max),
                        format_duration(d)
                    ),
                );
                None
            }
            Timer::After(d) => Some(Some(d)),
        }
    }

    fn size(&mut self, raw: &Raw, path: &YamlPath, min: u64, max: u64) -> Option<u64> {
        let bytes = match raw {
            Raw::Int(n) => match u64::try_from(*n) {
                Ok(n) => n,
                Err(_) => {
                    self.err(path, format!("a size cannot be negative, found {n}"));
                    return None;
                }
            },
            Raw::Str(text) => {
                let parsed = parse_size(text);
                self.checked(path, parsed)?
            }
            other => {
                self.expected(path, SIZE_FORM, other);
                return None;
            }
        };
        if !(min..=max).contains(&bytes) {
            self.err(
                path,
                format!(
                    "must be between {} and {}, found {}",
                    format_size(min),
                    format_size(max),
                    format_size(bytes)
                ),
            );
            return None;
        }
        Some(bytes)
    }

    // ----- the schema -----

    fn config(&mut self, raw: &Raw) -> Option<Config> {
        let root = YamlPath::root();
        let top = self.fields(
            raw,
            &root,
            "a mapping with listeners, upstreams and routes",
            TOP_KEYS,
        )?;

        let listeners = top
            .required(self, "listeners", "a list of listeners")
            .and_then(|(raw, path)| self.listeners(raw, &path));
        let (upstream_names, upstreams) =
            match top.required(self, "upstreams", "a mapping of upstreams") {
                Some((raw, path)) => self.upstreams(raw, &path),
                None => (Vec::new(), None),
            };

        let timeouts = match top.get("timeouts") {
            None => Some(Timeouts::DEFAULT),
            Some((raw, path)) => self
                .partial_timeouts(raw, &path)
                .map(|t| t.over(Timeouts::DEFAULT)),
        };
        // `inherited` is what routes merge over: the top-level values even when they fail
        // the max_message check, so that route-level messages quote what the file says.
        let (limits, inherited) = match top.get("limits") {
            None => (Some(Limits::DEFAULT), Limits::DEFAULT),
            Some((raw, path)) => match self.partial_limits(raw, &path, false) {
                None => (None, Limits::DEFAULT),
                Some(partial) => {
                    let limits = partial.over(Limits::DEFAULT);
                    let checked = self.check_message_size(&path, &partial, limits, None);
                    (checked.then_some(limits), limits)
                }
            },
        };

        let routes = top
            .required(self, "routes", "a list of routes")
            .and_then(|(raw, path)| {
                // Routes are checked even when the top-level sections are broken, so that
                // their own problems are reported in the same run.
                let base = (timeouts.unwrap_or(Timeouts::DEFAULT), inherited);
                self.routes(raw, &path, &upstream_names, base)
            });

        let admin = match top.get("admin") {
            None => Some(None),
            Some((raw, path)) => self.admin(raw, &path).map(Some),
        };
        if let Some(Some(admin)) = &admin {
            let taken = self
                .listener_addresses
                .iter()
                .find(|(_, a)| *a == admin.address);
            if let Some(&(i, _)) = taken {
                self.err(
                    &YamlPath::root().key("admin").key("address"),
                    format!(
                        "address {} is already used by listeners[{i}]",
                        admin.address
                    ),
                );
            }
        }

        let sessions = match top.get("sessions") {
            None => Some(Sessions::with_defaults()),
            Some((raw, path)) => self.sessions(raw, &path),
        };

        let drain = match top.get("drain") {
            None => Some(Drain::DEFAULT),
            Some((raw, path)) => self.drain(raw, &path),
        };
        let rebalance = match top.get("rebalance") {
            None => Some(Rebalance::DEFAULT),
            Some((raw, path)) => self.rebalance(raw, &path),
        };

        let cluster = match top.get("cluster") {
            None => Some(None),
            Some((raw, path)) => self.cluster(raw, &path, listeners.as_deref()).map(Some),
        };
        // Session ids name their owner: with a cluster, the instance is the cluster name.
        let mut sessions = sessions;
        if let (Some(sessions), Some(Some(cluster))) = (&mut sessions, &cluster) {
            let explicit = top
                .get("sessions")
                .and_then(|(raw, _)| match raw {
                    Raw::Map(entries) => entries.iter().find(|(k, _)| k == "instance"),
                    _ => None,
                })
                .is_some();
            if explicit && sessions.instance != cluster.name {
                self.err(
                    &root.key("sessions").key("instance"),
                    format!(
                        "differs from cluster.name ({}): session ids must name the instance its peers know; remove sessions.instance",
                        cluster.name
                    ),
                );
            }
            sessions.instance = cluster.name.clone();
        }

        Some(Config {
            cluster: cluster?,
            sessions: sessions?,
            listeners: listeners?,
            upstreams: upstreams?,
            routes: routes?,
            timeouts: timeouts?,
            limits: limits?,
            admin: admin?,
            drain: drain?,
            rebalance: rebalance?,
        })
    }

    fn listeners(&mut self, raw: &Raw, path: &YamlPath) -> Option<Vec<Listener>> {
        let items = self.nonempty_list(raw, path, "listeners")?;
        let mut listeners = Vec::new();
        let mut ok = true;
        let mut seen_addr: HashMap<SocketAddr, usize> = HashMap::new();
        let mut seen_name: HashMap<String, usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let item_path = path.index(i);
            let Some(listener) = self.listener(item, &item_path, i) else {
                ok = false;
                continue;
            };
            if let Some(&first) = seen_addr.get(&listener.address) {
                ok = false;
                self.err(
                    &item_path.key("address"),
                    format!(
                        "address {} is already used by listeners[{first}]",
                        listener.address
                    ),
                );
            } else {
                seen_addr.insert(listener.address, i);
                self.listener_addresses.push((i, listener.address));
            }
            if let Some(&first) = seen_name.get(&listener.name) {
                ok = false;
                self.err(
                    &item_path.key("name"),
                    format!(
                        "listener name {:?} is already used by listeners[{first}]",
                        listener.name
                    ),
                );
            } else {
                seen_name.insert(listener.name.clone(), i);
            }
            listeners.push(listener);
        }
        ok.then_some(listeners)
    }

    fn listener(&mut self, raw: &Raw, path: &YamlPath, index: usize) -> Option<Listener> {
        let f = self.fields(
            raw,
            path,
            "a listener mapping with an address",
            LISTENER_KEYS,
        )?;
        let name = match f.get("name") {
            Some((raw, path)) => self.name(raw, &path),
            None => Some(format!("listener-{index}")),
        };
        let address = f
            .required(self, "address", ADDRESS_FORM)
            .and_then(|(raw, path)| self.socket_addr(raw, &path));
        let tls = match f.get("tls") {
            None => Some(None),
            Some((raw, path)) => self.server_tls(raw, &path).map(Some),
        };
        let trusted_proxies = match f.get("trusted_proxies") {
            None => Some(TrustedNetworks::default()),
            Some((raw, path)) => self.networks(raw, &path),
        };
        let proxy_protocol = match f.get("proxy_protocol") {
            None => Some(false),
            Some((raw, path)) => {
                let on = self.boolean(raw, &path);
                if on == Some(true)
                    && trusted_proxies
                        .as_ref()
                        .is_some_and(TrustedNetworks::is_empty)
                {
                    // A header believed from anyone would let any client claim any address.
                    self.err(
                        &path,
                        "proxy_protocol needs trusted_proxies: the networks of the load balancers allowed to send the header",
                    );
                    return None;
                }
                on
            }
        };
        Some(Listener {
            name: name?,
            address: address?,
            tls: tls?,
            proxy_protocol: proxy_protocol?,
            trusted_proxies: trusted_proxies?,
        })
    }

    /// A list of networks (`10.0.0.0/8`, `2001:db8::/32`) or single addresses.
    fn networks(&mut self, raw: &Raw, path: &YamlPath) -> Option<TrustedNetworks> {
        let items = self.nonempty_list(raw, path, "trusted_proxies")?;
        let mut networks = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let item_path = path.index(i);
            let what = "a network such as 10.0.0.0/8 or an address such as 192.0.2.1";
            let Some(text) = self.string(item, &item_path, what) else {
                ok = false;
                continue;
            };
            let parsed = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| format!("{text:?} is not {what}"));
            match self.checked(&item_path, parsed) {
                Some(net) => networks.push(net.trunc()),
                None => ok = false,
            }
        }
        ok.then(|| TrustedNetworks::new(networks))
    }

    fn server_tls(&mut self, raw: &Raw, path: &YamlPath) -> Option<ServerTls> {
        let f = self.fields(raw, path, "a mapping with certificates", SERVER_TLS_KEYS)?;
        let (raw, list_path) = f.required(
            self,
            "certificates",
            "a list of certificates with cert and key",
        )?;
        let items = self.nonempty_list(raw, &list_path, "certificates")?;
        let mut certificates = Vec::new();
        let mut ok = true;
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let item_path = list_path.index(i);
            let Some(cert) = self.certificate(item, &item_path) else {
                ok = false;
                continue;
            };
            for (j, name) in cert.server_names.iter().enumerate() {
                if let Some(&first) = seen.get(name) {
                    ok = false;
                    self.err(
                        &item_path.key("server_names").index(j),
                        format!("server name {name:?} is already listed by certificates[{first}]"),
                    );
                } else {
                    seen.insert(name.clone(), i);
                }
            }
            certificates.push(cert);
        }
        ok.then_some(ServerTls { certificates })
    }

    fn certificate(&mut self, raw: &Raw, path: &YamlPath) -> Option<CertificateFiles> {
        let f = self.fields(raw, path, "a mapping with cert and key", CERTIFICATE_KEYS)?;
        let cert = f
            .required(self, "cert", "the path of a PEM certificate chain")
            .and_then(|(raw, path)| self.file(raw, &path));
        let key = f
            .required(self, "key", "the path of a PEM private key")
            .and_then(|(raw, path)| self.file(raw, &path));
        let server_names = match f.get("server_names") {
            None => Some(Vec::new()),
            Some((raw, path)) => self.server_names(raw, &path),
        };
        Some(CertificateFiles {
            cert: cert?,
            key: key?,
            server_names: server_names?,
        })
    }

    fn server_names(&mut self, raw: &Raw, path: &YamlPath) -> Option<Vec<String>> {
        let items = self.list(raw, path, "server names")?;
        let mut names = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let item_path = path.index(i);
            let name = self
                .string(item, &item_path, "a server name such as example.com")
                .and_then(|s| {
                    let checked = check_host(s, true);
                    self.checked(&item_path, checked)
                });
            match name {
                Some(name) => names.push(name),
                None => ok = false,
            }
        }
        ok.then_some(names)
    }

    /// Returns every upstream name written in the file (even of broken upstreams, so that
    /// routes naming them are not reported as well) and the upstreams if all are valid.
    fn upstreams(&mut self, raw: &Raw, path: &YamlPath) -> (Vec<String>, Option<Vec<Upstream>>) {
        let Raw::Map(entries) = raw else {
            self.expected(path, "a mapping from upstream names to upstreams", raw);
            return (Vec::new(), None);
        };
        if entries.is_empty() {
            self.err(
                path,
                "the mapping is empty (at least one upstream is required)",
            );
            return (Vec::new(), None);
        }
        let names = entries.iter().map(|(k, _)| k.clone()).collect();
        let mut upstreams = Vec::new();
        let mut ok = true;
        for (name, raw) in entries {
            let item_path = path.key(name);
            let checked = check_name(name);
            let name = self.checked(&item_path, checked);
            let upstream = self.upstream(raw, &item_path, name.clone().unwrap_or_default());
            match (name, upstream) {
                (Some(_), Some(upstream)) => upstreams.push(upstream),
                _ => ok = false,
            }
        }
        (names, ok.then_some(upstreams))
    }

    fn upstream(&mut self, raw: &Raw, path: &YamlPath, name: String) -> Option<Upstream> {
        let f = self.fields(
            raw,
            path,
            "an upstream mapping with backends",
            UPSTREAM_KEYS,
        )?;
        let (backends, dns) = match (f.get("backends"), f.get("dns")) {
            (Some(_), Some((_, dns_path))) => {
                self.err(
                    &dns_path,
                    "an upstream takes its backends from backends or from dns, not both",
                );
                return None;
            }
            (None, Some((raw, path))) => {
                (Some(Vec::new()), self.dns_backends(raw, &path).map(Some))
            }
            _ => (
                f.required(
                    self,
                    "backends",
                    "a list of backend URLs such as ws://127.0.0.1:9001 (or dns)",
                )
                .and_then(|(raw, path)| self.backends(raw, &path)),
                Some(None),
            ),
        };
        let any_secure = match (&backends, &dns) {
            (_, Some(Some(dns))) => dns.secure,
            (Some(backends), _) => backends.iter().any(|b| b.secure),
            _ => false,
        };
        let connect_timeout = match f.get("connect_timeout") {
            None => Some(DEFAULT_CONNECT_TIMEOUT),
            Some((raw, path)) => self.timer(raw, &path, TIMER).flatten(),
        };
        let tls = match f.get("tls") {
            None => Some(UpstreamTls::default()),
            Some((raw, tls_path)) => {
                let tls = self.upstream_tls(raw, &tls_path);
                if backends.is_some() && tls.is_some() && !any_secure {
                    self.err(
                        &tls_path,
                        "tls applies only to wss:// backends, and this upstream has none",
                    );
                    return None;
                }
                tls
            }
        };
        let health_check = match f.get("health_check") {
            None => Some(None),
            Some((raw, path)) => self.health_check(raw, &path).map(Some),
        };
        let passive_health = match f.get("passive_health") {
            None => Some(Some(PassiveHealth::DEFAULT)),
            Some((raw, path)) => self.passive_health(raw, &path),
        };
        let mut tls = tls?;
        let dns = dns?;
        // Backends found by DNS are addresses: their certificates name the DNS name.
        if let Some(DnsBackends {
            secure: true,
            lookup: DnsLookup::Address { name, .. },
            ..
        }) = &dns
            && tls.server_name.is_none()
        {
            tls.server_name = Some(name.clone());
        }
        Some(Upstream {
            name,
            backends: backends?,
            dns,
            connect_timeout: connect_timeout?,
            tls,
            health_check: health_check?,
            passive_health: passive_health?,
        })
    }

    fn backends(&mut self, raw: &Raw, path: &YamlPath) -> Option<Vec<Backend>> {
        let items = self.nonempty_list(raw, path, "backends")?;
        let mut backends: Vec<Backend> = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let item_path = path.index(i);
            let Some(backend) = self.backend(item, &item_path) else {
                ok = false;
                continue;
            };
            let same = |b: &Backend| {
                (b.secure, &b.host, b.port, &b.base_path)
                    == (
                        backend.secure,
                        &backend.host,
                        backend.port,
                        &backend.base_path,
                    )
            };
            if let Some(first) = backends.iter().position(same) {
                ok = false;
                // Consistent hashing keys on the backend, so a duplicate would silently
                // double its share instead of acting as a weight.
                self.err(
                    &item_path,
                    format!(
                        "backend {} is already listed as backends[{first}] (use weight to give it a larger share)",
                        backend.url
                    ),
                );
            }
            backends.push(backend);
        }
        ok.then_some(backends)
    }

    fn backend(&mut self, raw: &Raw, path: &YamlPath) -> Option<Backend> {
        const WHAT: &str =
            "a backend URL such as ws://127.0.0.1:9001, or a mapping with url and weight";
        let (url, url_path, weight) = match raw {
            Raw::Str(url) => (url.as_str(), path.clone(), Some(1)),
            Raw::Map(_) => {
                let f = self.fields(raw, path, WHAT, BACKEND_KEYS)?;
                let weight = match f.get("weight") {
                    None => Some(1),
                    Some((raw, path)) => self
                        .integer(raw, &path, 1, MAX_WEIGHT)
                        .and_then(|w| u32::try_from(w).ok()),
                };
                let (raw, url_path) =
                    f.required(self, "url", "a URL such as ws://127.0.0.1:9001")?;
                let url = self.string(raw, &url_path, "a URL such as ws://127.0.0.1:9001")?;
                (url, url_path, weight)
            }
            other => {
                self.expected(path, WHAT, other);
                return None;
            }
        };
        let parsed = parse_backend_url(url);
        let parsed = self.checked(&url_path, parsed)?;
        Some(Backend {
            url: url.to_owned(),
            secure: parsed.secure,
            host: parsed.host,
            port: parsed.port,
            base_path: parsed.base_path,
            weight: weight?,
        })
    }

    fn dns_backends(&mut self, raw: &Raw, path: &YamlPath) -> Option<DnsBackends> {
        let f = self.fields(
            raw,
            path,
            "a mapping with url (A/AAAA) or srv, and optionally resolver, min_interval, max_interval",
            DNS_KEYS,
        )?;
        let lookup = match (f.get("url"), f.get("srv")) {
            (Some(_), Some((_, srv_path))) => {
                self.err(&srv_path, "use url (A/AAAA records) or srv, not both");
                None
            }
            (Some((raw, path)), None) => {
                let what = "a URL whose host is a DNS name, such as ws://rooms.internal:9001";
                self.string(raw, &path, what)
                    .and_then(|url| {
                        let parsed = parse_backend_url(url).and_then(|p| {
                            if p.host.parse::<std::net::IpAddr>().is_ok() {
                                Err(format!(
                                    "{url:?} names an address, not a DNS name (use backends)"
                                ))
                            } else {
                                Ok(p)
                            }
                        });
                        self.checked(&path, parsed)
                    })
                    .map(|p| {
                        (
                            DnsLookup::Address {
                                name: p.host,
                                port: p.port,
                            },
                            p.secure,
                            p.base_path,
                        )
                    })
            }
            (None, Some((raw, path))) => {
                let what = "a URL whose host is an SRV name, such as ws://_rooms._tcp.internal";
                self.string(raw, &path, what)
                    .and_then(|url| {
                        let parsed = parse_backend_url(url).and_then(|p| {
                            if url.rsplit_once(':').is_some_and(|(_, port)| {
                                port.split('/')
                                    .next()
                                    .is_some_and(|p| p.parse::<u16>().is_ok())
                            }) {
                                Err(format!(
                                    "{url:?}: an SRV answer gives the ports; remove the port"
                                ))
                            } else {
                                Ok(p)
                            }
                        });
                        self.checked(&path, parsed)
                    })
                    .map(|p| (DnsLookup::Srv { name: p.host }, p.secure, p.base_path))
            }
            (None, None) => {
                self.err(path, "url (A/AAAA records) or srv is required");
                None
            }
        };
        let schedule = self.dns_schedule(&f);
        let (lookup, secure, base_path) = lookup?;
        let (resolver, min_interval, max_interval) = schedule?;
        Some(DnsBackends {
            lookup,
            secure,
            base_path,
            resolver,
            min_interval,
            max_interval,
        })
    }

    /// A DNS lookup's `resolver`, `min_interval` and `max_interval` (upstreams' `dns`,
    /// `cluster.peers_dns`).
    fn dns_schedule(&mut self, f: &Fields<'_>) -> Option<(Option<SocketAddr>, Duration, Duration)> {
        let resolver = match f.get("resolver") {
            None => Some(None),
            Some((raw, path)) => self.socket_addr(raw, &path).map(Some),
        };
        let interval = |cx: &mut Self, key: &str, default: Duration| match f.get(key) {
            None => Some(default),
            Some((raw, path)) => {
                let value = cx.timer(raw, &path, TIMER).flatten()?;
                if value < MIN_DNS_INTERVAL {
                    cx.err(
                        &path,
                        format!("at least {}", format_duration(MIN_DNS_INTERVAL)),
                    );
                    return None;
                }
                Some(value)
            }
        };
        let min_interval = interval(self, "min_interval", DEFAULT_DNS_MIN_INTERVAL);
        let max_interval = interval(
            self,
            "max_interval",
            DEFAULT_DNS_MAX_INTERVAL.max(min_interval.unwrap_or_default()),
        );
        if let (Some(min), Some(max), Some((_, path))) =
            (min_interval, max_interval, f.get("max_interval"))
            && max < min
        {
            self.err(
                &path,
                format!("at least min_interval ({})", format_duration(min)),
            );
            return None;
        }
        Some((resolver?, min_interval?, max_interval?))
    }

    fn upstream_tls(&mut self, raw: &Raw, path: &YamlPath) -> Option<UpstreamTls> {
        let f = self.fields(
            raw,
            path,
            "a mapping with ca_file and/or server_name",
            UPSTREAM_TLS_KEYS,
        )?;
        let ca_file = match f.get("ca_file") {
            None => Some(None),
            Some((raw, path)) => self.file(raw, &path).map(Some),
        };
        let server_name = match f.get("server_name") {
            None => Some(None),
            Some((raw, path)) => self
                .string(raw, &path, "a server name such as backend.internal")
                .and_then(|s| {
                    let checked = check_host(s, false);
                    self.checked(&path, checked)
                })
                .map(Some),
        };
        Some(UpstreamTls {
            ca_file: ca_file?,
            server_name: server_name?,
        })
    }

    fn health_check(&mut self, raw: &Raw, path: &YamlPath) -> Option<HealthCheck> {
        let f = self.fields(
            raw,
            path,
            "a mapping with kind, path, interval, timeout, healthy_threshold and/or unhealthy_threshold",
            HEALTH_CHECK_KEYS,
        )?;
        let defaults = HealthCheck::DEFAULT;
        let websocket = match f.get("kind") {
            None => Some(false),
            Some((Raw::Str(s), _)) if s == "tcp" => Some(false),
            Some((Raw::Str(s), _)) if s == "websocket" => Some(true),
            Some((raw, path)) => {
                self.expected(&path, "tcp or websocket", raw);
                None
            }
        };
        let probe_path = match f.get("path") {
            None => Some("/".to_owned()),
            Some((_, path)) if websocket == Some(false) => {
                self.err(
                    &path,
                    "path applies only to kind: websocket (a tcp check only connects)",
                );
                None
            }
            Some((raw, path)) => self
                .string(raw, &path, "a request path such as /health")
                .and_then(|text| {
                    let checked = check_probe_path(text);
                    self.checked(&path, checked)
                }),
        };
        let timer = |cx: &mut Self, key: &str, default: Duration| match f.get(key) {
            None => Some(default),
            Some((raw, path)) => cx.timer(raw, &path, TIMER).flatten(),
        };
        let interval = timer(self, "interval", defaults.interval);
        let timeout = timer(self, "timeout", defaults.timeout);
        let threshold = |cx: &mut Self, key: &str, default: u32| match f.get(key) {
            None => Some(default),
            Some((raw, path)) => cx
                .integer(raw, &path, 1, MAX_THRESHOLD)
                .and_then(|n| u32::try_from(n).ok()),
        };
        let healthy_threshold = threshold(self, "healthy_threshold", defaults.healthy_threshold);
        let unhealthy_threshold =
            threshold(self, "unhealthy_threshold", defaults.unhealthy_threshold);
        let kind = if websocket? {
            HealthCheckKind::WebSocket { path: probe_path? }
        } else {
            HealthCheckKind::Tcp
        };
        Some(HealthCheck {
            kind,
            interval: interval?,
            timeout: timeout?,
            healthy_threshold: healthy_threshold?,
            unhealthy_threshold: unhealthy_threshold?,
        })
    }

    /// `off`, or a mapping; `Some(None)` is "passive checks disabled".
    fn passive_health(&mut self, raw: &Raw, path: &YamlPath) -> Option<Option<PassiveHealth>> {
        if matches!(raw, Raw::Str(s) if s == "off") {
            return Some(None);
        }
        let f = self.fields(
            raw,
            path,
            "\"off\" or a mapping with backoff and/or max_backoff",
            PASSIVE_HEALTH_KEYS,
        )?;
        let defaults = PassiveHealth::DEFAULT;
        let backoff = match f.get("backoff") {
            None => Some(defaults.backoff),
            Some((raw, path)) => self.timer(raw, &path, TIMER).flatten(),
        };
        let max_backoff = match f.get("max_backoff") {
            // Not below an explicit backoff: "backoff: 5m" alone must not be an error.
            None => backoff.map(|b| b.max(defaults.max_backoff)),
            Some((raw, max_path)) => {
                let max = self.timer(raw, &max_path, TIMER).flatten();
                if let (Some(backoff), Some(max)) = (backoff, max)
                    && max < backoff
                {
                    self.err(
                        &max_path,
                        format!(
                            "max_backoff ({}) is shorter than backoff ({}{})",
                            format_duration(max),
                            format_duration(backoff),
                            if f.has("backoff") {
                                ""
                            } else {
                                ", the default"
                            }
                        ),
                    );
                    return None;
                }
                max
            }
        };
        Some(Some(PassiveHealth {
            backoff: backoff?,
            max_backoff: max_backoff?,
        }))
    }

    fn partial_timeouts(&mut self, raw: &Raw, path: &YamlPath) -> Option<PartialTimeouts> {
        let f = self.fields(raw, path, "a mapping of timeouts", TIMEOUT_KEYS)?;
        let mut ok = true;
        let mut get = |cx: &mut Self, key: &str, rule: TimerRule| match f.get(key) {
            None => None,
            Some((raw, path)) => {
                let value = cx.timer(raw, &path, rule);
                ok &= value.is_some();
                value
            }
        };
        let close_rule = TimerRule {
            zero_ok: true,
            ..TIMER
        };
        let partial = PartialTimeouts {
            handshake: get(self, "handshake", TIMER).flatten(),
            idle: get(self, "idle", OPTIONAL_TIMER),
            ping_interval: get(self, "ping_interval", OPTIONAL_TIMER),
            pong_timeout: get(self, "pong_timeout", TIMER).flatten(),
            close: get(self, "close", close_rule).flatten(),
            body: get(self, "body", TIMER).flatten(),
            body_total: get(self, "body_total", OPTIONAL_TIMER),
        };
        ok.then_some(partial)
    }

    fn partial_limits(
        &mut self,
        raw: &Raw,
        path: &YamlPath,
        route_level: bool,
    ) -> Option<PartialLimits> {
        let f = self.fields(raw, path, "a mapping of limits", LIMIT_KEYS)?;
        let mut ok = true;
        if route_level {
            for key in TOP_LEVEL_ONLY_LIMITS {
                if let Some((_, key_path)) = f.get(key) {
                    self.err(
                        &key_path,
                        format!(
                            "{key} applies to the whole gateway: set it in the top-level limits"
                        ),
                    );
                    ok = false;
                }
            }
        }
        let mut rate = |cx: &mut Self, key: &str| match f.get(key) {
            None => None,
            Some((raw, path)) => {
                let value = cx.optional_count(raw, &path, 1, 1_000_000);
                ok &= value.is_some();
                value
            }
        };
        let max_connections_per_ip = rate(self, "max_connections_per_ip");
        let handshake_rate = rate(self, "handshake_rate");
        let message_rate = rate(self, "message_rate");
        let mut size = |cx: &mut Self, key: &str, min: u64, max: u64| match f.get(key) {
            None => None,
            Some((raw, path)) => {
                let value = cx.size(raw, &path, min, max);
                ok &= value.is_some();
                value
            }
        };
        let max_frame = size(self, "max_frame", 1, i64::MAX as u64);
        let max_message = size(self, "max_message", 1, i64::MAX as u64);
        let max_header_bytes =
            size(self, "max_header_bytes", 1 << 10, 1 << 20).and_then(|n| usize::try_from(n).ok());
        let compression_memory = size(self, "compression_memory", 0, i64::MAX as u64);
        let max_connections = match f.get("max_connections") {
            None => None,
            Some((raw, path)) => {
                let value = self
                    .integer(raw, &path, 1, u32::MAX.into())
                    .and_then(|n| u32::try_from(n).ok());
                ok &= value.is_some();
                value
            }
        };
        ok.then_some(PartialLimits {
            max_frame,
            max_message,
            max_connections,
            max_header_bytes,
            max_connections_per_ip,
            handshake_rate,
            message_rate,
            compression_memory,
        })
    }

    /// Checks `max_message >= max_frame` for a limits section; `inherited_from` names where
    /// values the section does not set come from. A section that sets neither key is not
    /// blamed for its parent's mistake.
    fn check_message_size(
        &mut self,
        path: &YamlPath,
        partial: &PartialLimits,
        limits: Limits,
        inherited_from: Option<&str>,
    ) -> bool {
        if limits.max_message >= limits.max_frame {
            return true;
        }
        if partial.max_frame.is_none() && partial.max_message.is_none() {
            return false;
        }
        let origin = |set: bool| match (set, inherited_from) {
            (false, Some(from)) => format!(", from {from}"),
            (false, None) => ", the default".to_owned(),
            (true, _) => String::new(),
        };
        let blamed = if partial.max_message.is_some() {
            "max_message"
        } else {
            "max_frame"
        };
        self.err(
            &path.key(blamed),
            format!(
                "max_message ({}{}) is smaller than max_frame ({}{}); a message must be able to hold a whole frame",
                format_size(limits.max_message),
                origin(partial.max_message.is_some()),
                format_size(limits.max_frame),
                origin(partial.max_frame.is_some()),
            ),
        );
        false
    }

    fn routes(
        &mut self,
        raw: &Raw,
        path: &YamlPath,
        upstream_names: &[String],
        base: (Timeouts, Limits),
    ) -> Option<Vec<Route>> {
        let items = self.nonempty_list(raw, path, "routes")?;
        let mut routes: Vec<Route> = Vec::new();
        let mut ok = true;
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let item_path = path.index(i);
            let Some(route) = self.route(item, &item_path, i, upstream_names, base) else {
                ok = false;
                continue;
            };
            if let Some(&first) = seen.get(&route.name) {
                ok = false;
                self.err(
                    &item_path.key("name"),
                    format!(
                        "route name {:?} is already used by routes[{first}]",
                        route.name
                    ),
                );
            } else {
                seen.insert(route.name.clone(), i);
            }
            // Only valid earlier routes are compared, which is enough: the user fixes those
            // first, and a second run reports any shadowing that remains.
            if let Some(earlier) = routes.iter().find(|r| shadows(r, &route)) {
                ok = false;
                self.err(
                    &item_path.key("match"),
                    format!(
                        "this route can never match: route {:?} comes earlier and matches every request it would (host {}, path_prefix {:?})",
                        earlier.name,
                        earlier.host.as_deref().unwrap_or("any"),
                        earlier.path_prefix
                    ),
                );
            }
            routes.push(route);
        }
        ok.then_some(routes)
    }

    fn route(
        &mut self,
        raw: &Raw,
        path: &YamlPath,
        index: usize,
        upstream_names: &[String],
        (base_timeouts, base_limits): (Timeouts, Limits),
    ) -> Option<Route> {
        let f = self.fields(raw, path, "a route mapping with an upstream", ROUTE_KEYS)?;
        let name = match f.get("name") {
            Some((raw, path)) => self.name(raw, &path),
            None => Some(format!("route-{index}")),
        };
        let (host, path_prefix) = match f.get("match") {
            None => (Some(None), Some("/".to_owned())),
            Some((raw, path)) => match self.route_match(raw, &path) {
                Some((host, prefix)) => (Some(host), Some(prefix)),
                None => (None, None),
            },
        };
        let upstream = f
            .required(self, "upstream", "the name of an upstream")
            .and_then(|(raw, path)| self.upstream_ref(raw, &path, upstream_names));
        let mut sticky = match f.get("sticky") {
            None => Some(None),
            Some((raw, path)) => self.sticky(raw, &path, path_prefix.as_deref()).map(Some),
        };
        let sticky_cookie = match f.get("sticky_cookie") {
            None => Some(None),
            Some((raw, cookie_path)) => {
                if f.has("sticky") {
                    self.err(
                        &cookie_path,
                        "a route takes either sticky (a key the client sends) or sticky_cookie (a key the gateway sets), not both",
                    );
                }
                self.sticky_cookie(raw, &cookie_path).map(Some)
            }
        };
        let allowed_origins = match f.get("allowed_origins") {
            None => Some(Vec::new()),
            Some((raw, path)) => self.origins(raw, &path),
        };
        let compression = match f.get("compression") {
            None => Some(Compression::default()),
            Some((raw, path)) => self.compression(raw, &path),
        };
        let ping_passthrough = match f.get("ping_passthrough") {
            None => Some(false),
            Some((raw, path)) => self.boolean(raw, &path),
        };
        let connect_retries = match f.get("connect_retries") {
            None => Some(Route::DEFAULT_CONNECT_RETRIES),
            Some((raw, path)) => self
                .integer(raw, &path, 0, i128::from(Route::MAX_CONNECT_RETRIES))
                .and_then(|n| u8::try_from(n).ok()),
        };
        let timeouts = match f.get("timeouts") {
            None => Some(base_timeouts),
            Some((raw, path)) => self
                .partial_timeouts(raw, &path)
                .map(|t| t.over(base_timeouts)),
        };
        let limits = match f.get("limits") {
            None => Some(base_limits),
            Some((raw, path)) => self.partial_limits(raw, &path, true).and_then(|partial| {
                let limits = partial.over(base_limits);
                let checked =
                    self.check_message_size(&path, &partial, limits, Some("the top-level limits"));
                checked.then_some(limits)
            }),
        };
        let auth = match f.get("auth") {
            None => Some(None),
            Some((raw, path)) => self.auth(raw, &path).map(Some),
        };
        if let (Some(sticky), Some(auth)) = (sticky.as_mut(), auth.as_ref())
            && !self.resolve_claim_sticky(sticky, auth.as_ref(), &path.key("sticky"))
        {
            return None;
        }
        // A refresh message is recognised as the plain text it is sent as; compressed, it
        // would pass to the backend as an ordinary message, token and all.
        if let (Some(Some(auth)), Some(compression)) = (auth.as_ref(), compression.as_ref())
            && auth.jwt().is_some_and(|jwt| jwt.refresh)
            && *compression != Compression::Strip
        {
            self.err(
                &path.key("auth").key("jwt").key("refresh"),
                "the in-band token refresh needs the route's compression: strip (a compressed refresh message would not be recognised)",
            );
            return None;
        }
        Some(Route {
            auth: auth?,
            name: name?,
            host: host?,
            path_prefix: path_prefix?,
            upstream: upstream?,
            sticky: sticky?,
            sticky_cookie: sticky_cookie?,
            allowed_origins: allowed_origins?,
            compression: compression?,
            ping_passthrough: ping_passthrough?,
            connect_retries: connect_retries?,
            timeouts: timeouts?,
            limits: limits?,
        })
    }

    /// `strip`, `passthrough`, `terminate`, or a mapping with `mode: terminate` and its options.
    fn compression(&mut self, raw: &Raw, path: &YamlPath) -> Option<Compression> {
        const MODES: &str = "strip, passthrough or terminate (or a mapping with mode: terminate)";
        match raw {
            Raw::Str(s) if s == "strip" => return Some(Compression::Strip),
            Raw::Str(s) if s == "passthrough" => return Some(Compression::Passthrough),
            Raw::Str(s) if s == "terminate" => {
                return Some(Compression::Terminate(Deflate::default()));
            }
            Raw::Map(_) => {}
            other => {
                self.expected(path, MODES, other);
                return None;
            }
        }
        let f = self.fields(raw, path, "a compression mapping", DEFLATE_KEYS)?;
        match f.get("mode") {
            Some((Raw::Str(s), _)) if s == "terminate" => {}
            Some((other, mode_path)) => {
                self.expected(&mode_path, "terminate (the only mode with options)", other);
                return None;
            }
            None => {
                self.err(path, "missing key \"mode\" (terminate)");
                return None;
            }
        }
        let defaults = Deflate::default();
        let flag = |cx: &mut Self, key: &str, default: bool| match f.get(key) {
            None => Some(default),
            Some((raw, path)) => cx.boolean(raw, &path),
        };
        let number =
            |cx: &mut Self, key: &str, (min, max): (i128, i128), default: i128| match f.get(key) {
                None => Some(default),
                Some((raw, path)) => cx.integer(raw, &path, min, max),
            };
        let server_no_context_takeover = flag(
            self,
            "server_no_context_takeover",
            defaults.server_no_context_takeover,
        );
        let client_no_context_takeover = flag(
            self,
            "client_no_context_takeover",
            defaults.client_no_context_takeover,
        );
        // zlib cannot keep an 8-bit window when compressing (it uses 9), so 9 is the least the
        // gateway promises for its own messages.
        let server_bits = number(
            self,
            "server_max_window_bits",
            (9, 15),
            i128::from(defaults.server_max_window_bits),
        );
        let client_bits = number(
            self,
            "client_max_window_bits",
            (8, 15),
            i128::from(defaults.client_max_window_bits),
        );
        let level = number(self, "level", (1, 9), i128::from(defaults.level));
        let min_size = match f.get("min_size") {
            None => Some(u64::from(defaults.min_size)),
            Some((raw, path)) => self.size(raw, &path, 0, u64::from(u32::MAX)),
        };
        Some(Compression::Terminate(Deflate {
            server_no_context_takeover: server_no_context_takeover?,
            client_no_context_takeover: client_no_context_takeover?,
            server_max_window_bits: u8::try_from(server_bits?).ok()?,
            client_max_window_bits: u8::try_from(client_bits?).ok()?,
            min_size: u32::try_from(min_size?).ok()?,
            level: u8::try_from(level?).ok()?,
        }))
    }

    fn route_match(&mut self, raw: &Raw, path: &YamlPath) -> Option<(Option<String>, String)> {
        let f = self.fields(
            raw,
            path,
            "a mapping with host and/or path_prefix",
            MATCH_KEYS,
        )?;
        let host = match f.get("host") {
            None => Some(None),
            Some((raw, path)) => self
                .string(
                    raw,
                    &path,
                    "a host such as chat.example.com or *.example.com",
                )
                .and_then(|s| {
                    let checked = check_route_host(s);
                    self.checked(&path, checked)
                })
                .map(Some),
        };
        let prefix = match f.get("path_prefix") {
            None => Some("/".to_owned()),
            Some((raw, path)) => self
                .string(raw, &path, "a path prefix such as /rooms/")
                .and_then(|s| {
                    let checked = check_path_prefix(s);
                    self.checked(&path, checked)
                }),
        };
        Some((host?, prefix?))
    }

    fn upstream_ref(&mut self, raw: &Raw, path: &YamlPath, names: &[String]) -> Option<usize> {
        let name = self.string(raw, path, "the name of an upstream")?;
        if let Some(i) = names.iter().position(|n| n == name) {
            return Some(i);
        }
        let known = if names.is_empty() {
            "no upstreams are defined".to_owned()
        } else {
            format!("expected one of: {}", names.join(", "))
        };
        self.err(path, format!("unknown upstream {name:?} ({known})"));
        None
    }

    fn sticky(&mut self, raw: &Raw, path: &YamlPath, prefix: Option<&str>) -> Option<StickyKey> {
        let what = "a mapping with one of: path, query, header, cookie, client_ip, claim";
        let f = self.fields(raw, path, what, STICKY_KEYS)?;
        let present: Vec<&str> = STICKY_KEYS.iter().copied().filter(|k| f.has(k)).collect();
        let mut keys = Vec::new();
        for key in &present {
            let Some((raw, key_path)) = f.get(key) else {
                continue;
            };
            keys.extend(self.sticky_source(key, raw, &key_path, prefix));
        }
        match present.as_slice() {
            [_] => keys.pop(),
            [] => {
                self.err(
                    path,
                    format!(
                        "expected exactly one of: {} (found none)",
                        STICKY_KEYS.join(", ")
                    ),
                );
                None
            }
            many => {
                self.err(
                    path,
                    format!(
                        "expected exactly one of: {} (found {})",
                        STICKY_KEYS.join(", "),
                        many.join(" and ")
                    ),
                );
                None
            }
        }
    }

    fn sticky_source(
        &mut self,
        key: &str,
        raw: &Raw,
        path: &YamlPath,
        prefix: Option<&str>,
    ) -> Option<StickyKey> {
        if key == "client_ip" {
            return match self.boolean(raw, path)? {
                true => Some(StickyKey::ClientIp),
                false => {
                    self.err(
                        path,
                        "client_ip: false selects no key (remove sticky instead)",
                    );
                    None
                }
            };
        }
        let text = self.string(raw, path, &format!("a {key} name"))?;
        let checked = match key {
            "path" => sticky_path(text, prefix),
            "query" => check_query_name(text).map(StickyKey::Query),
            // The header is filled in once the route's auth section is known.
            "claim" => Ok(StickyKey::Claim {
                claim: text.to_owned(),
                header: String::new(),
            }),
            "header" => {
                check_token(text, "header name").map(|h| StickyKey::Header(h.to_ascii_lowercase()))
            }
            _ => check_cookie_name(text).map(StickyKey::Cookie),
        };
        self.checked(path, checked)
    }

    fn sticky_cookie(&mut self, raw: &Raw, path: &YamlPath) -> Option<StickyCookie> {
        let f = self.fields(
            raw,
            path,
            "a mapping with name and optionally max_age, same_site and secure",
            STICKY_COOKIE_KEYS,
        )?;
        let name = f
            .required(self, "name", "a cookie name such as wsgate_affinity")
            .and_then(|(raw, path)| {
                let text = self.string(raw, &path, "a cookie name")?;
                let checked = check_cookie_name(text);
                self.checked(&path, checked)
            });
        let max_age = match f.get("max_age") {
            None => Some(None),
            Some((raw, path)) => self.timer(
                raw,
                &path,
                TimerRule {
                    disableable: true,
                    zero_ok: false,
                    max: MAX_COOKIE_AGE,
                },
            ),
        };
        let same_site = match f.get("same_site") {
            None => Some(SameSite::default()),
            Some((raw, path)) => {
                let text = self.string(raw, &path, "strict, lax or none")?;
                let parsed = match text.to_ascii_lowercase().as_str() {
                    "strict" => Ok(SameSite::Strict),
                    "lax" => Ok(SameSite::Lax),
                    "none" => Ok(SameSite::None),
                    _ => Err(format!("expected strict, lax or none, got {text:?}")),
                };
                self.checked(&path, parsed)
            }
        };
        let secure = match f.get("secure") {
            None => Some(None),
            Some((raw, path)) => {
                let secure = self.boolean(raw, &path)?;
                let checked = if !secure && same_site == Some(SameSite::None) {
                    Err(
                        "same_site: none needs secure: browsers refuse the cookie without it"
                            .to_owned(),
                    )
                } else {
                    Ok(Some(secure))
                };
                self.checked(&path, checked)
            }
        };
        Some(StickyCookie {
            name: name?,
            max_age: max_age?,
            same_site: same_site?,
            secure: secure?,
        })
    }

    fn origins(&mut self, raw: &Raw, path: &YamlPath) -> Option<Vec<String>> {
        let items = self.list(raw, path, "origins such as https://chat.example.com")?;
        let mut origins = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let item_path = path.index(i);
            let origin = self
                .string(
                    item,
                    &item_path,
                    "an origin such as https://chat.example.com",
                )
                .and_then(|s| {
                    let checked = check_origin(s);
                    self.checked(&item_path, checked)
                });
            match origin {
                Some(origin) => origins.push(origin),
                None => ok = false,
            }
        }
        ok.then_some(origins)
    }

    fn sessions(&mut self, raw: &Raw, path: &YamlPath) -> Option<Sessions> {
        let f = self.fields(raw, path, "a mapping of session settings", SESSION_KEYS)?;
        let mut sessions = Sessions::with_defaults();
        let mut ok = true;
        if let Some((raw, path)) = f.get("enabled") {
            match self.boolean(raw, &path) {
                Some(enabled) => sessions.enabled = enabled,
                None => ok = false,
            }
        }
        if let Some((raw, path)) = f.get("instance") {
            let checked = self
                .string(raw, &path, "an instance name such as gw-1")
                .map(|name| check_instance(name.trim()));
            match checked.and_then(|c| self.checked(&path, c)) {
                Some(name) => sessions.instance = name,
                None => ok = false,
            }
        }
        let mut timer = |cx: &mut Self, key: &str, slot: &mut Duration| {
            if let Some((raw, path)) = f.get(key) {
                match cx.timer(raw, &path, TIMER).flatten() {
                    Some(d) => *slot = d,
                    None => ok = false,
                }
            }
        };
        timer(self, "poll_timeout", &mut sessions.poll_timeout);
        timer(self, "timeout", &mut sessions.timeout);
        timer(self, "body_timeout", &mut sessions.body_timeout);
        if let Some((raw, path)) = f.get("buffer") {
            match self.size(raw, &path, 4 << 10, 1 << 30) {
                Some(bytes) => sessions.buffer = bytes,
                None => ok = false,
            }
        }
        if let Some((raw, path)) = f.get("max_batch") {
            match self.size(raw, &path, 4 << 10, 64 << 20) {
                Some(bytes) => sessions.max_batch = bytes,
                None => ok = false,
            }
        }
        if let Some((raw, path)) = f.get("max_sessions") {
            match self.integer(raw, &path, 1, 10_000_000) {
                Some(n) => sessions.max_sessions = n as u32,
                None => ok = false,
            }
        }
        if let Some((raw, path)) = f.get("max_sessions_per_ip") {
            match self.integer(raw, &path, 1, 10_000_000) {
                Some(n) => sessions.max_sessions_per_ip = n as u32,
                None => ok = false,
            }
        }
        if let Some((raw, path)) = f.get("open_rate") {
            match self.integer(raw, &path, 1, 1_000_000) {
                Some(n) => sessions.open_rate = n as u32,
                None => ok = false,
            }
        }
        ok.then_some(sessions)
    }

    fn admin(&mut self, raw: &Raw, path: &YamlPath) -> Option<Admin> {
        let f = self.fields(
            raw,
            path,
            "a mapping with an address, and token or token_env, tls",
            ADMIN_KEYS,
        )?;
        let address = f
            .required(self, "address", ADDRESS_FORM)
            .and_then(|(raw, path)| self.socket_addr(raw, &path));
        let token = match (f.get("token"), f.get("token_env")) {
            (None, None) => Some(None),
            (Some(_), Some((_, env_path))) => {
                self.err(&env_path, "give token or token_env, not both");
                None
            }
            (Some((raw, path)), None) => self
                .string(raw, &path, "the admin API's bearer token")
                .and_then(|token| {
                    let checked = AdminToken::new(token);
                    self.checked(&path, checked)
                })
                .map(Some),
            (None, Some((raw, path))) => self
                .string(raw, &path, "the name of an environment variable")
                .and_then(|name| {
                    let checked = match std::env::var(name) {
                        Ok(token) => AdminToken::new(&token),
                        Err(_) => Err(format!("environment variable {name} is not set")),
                    };
                    self.checked(&path, checked)
                })
                .map(Some),
        };
        let tls = match f.get("tls") {
            None => Some(None),
            Some((raw, path)) => self.server_tls(raw, &path).map(Some),
        };
        Some(Admin {
            address: address?,
            token: token?,
            tls: tls?,
        })
    }

    fn drain(&mut self, raw: &Raw, path: &YamlPath) -> Option<Drain> {
        let f = self.fields(
            raw,
            path,
            "a mapping with readiness_delay, spread and deadline",
            DRAIN_KEYS,
        )?;
        let mut drain = Drain::DEFAULT;
        let mut ok = true;
        let rule = TimerRule {
            disableable: false,
            zero_ok: true,
            max: MAX_TIMER,
        };
        for (key, field) in [
            ("readiness_delay", &mut drain.readiness_delay),
            ("spread", &mut drain.spread),
            ("deadline", &mut drain.deadline),
        ] {
            if let Some((raw, path)) = f.get(key) {
                match self.timer(raw, &path, rule) {
                    Some(Some(value)) => *field = value,
                    _ => ok = false,
                }
            }
        }
        if ok && drain.readiness_delay + drain.spread > drain.deadline {
            self.err(
                path,
                format!(
                    "readiness_delay ({}) plus spread ({}) exceed the deadline ({}): the last \
                     connections would be cut instead of closed; raise the deadline (and the \
                     orchestrator's grace period above it) or shorten the others",
                    format_duration(drain.readiness_delay),
                    format_duration(drain.spread),
                    format_duration(drain.deadline),
                ),
            );
            ok = false;
        }
        ok.then_some(drain)
    }

    fn rebalance(&mut self, raw: &Raw, path: &YamlPath) -> Option<Rebalance> {
        let f = self.fields(
            raw,
            path,
            "a mapping with enabled, window and on_health_change",
            REBALANCE_KEYS,
        )?;
        let mut rebalance = Rebalance::DEFAULT;
        let mut ok = true;
        if let Some((raw, path)) = f.get("enabled") {
            match self.boolean(raw, &path) {
                Some(enabled) => rebalance.enabled = enabled,
                None => ok = false,
            }
        }
        if let Some((raw, path)) = f.get("window") {
            let rule = TimerRule {
                disableable: false,
                zero_ok: true,
                max: MAX_TIMER,
            };
            match self.timer(raw, &path, rule) {
                Some(Some(window)) => rebalance.window = window,
                _ => ok = false,
            }
        }
        if let Some((raw, path)) = f.get("on_health_change") {
            match self.boolean(raw, &path) {
                Some(on) => rebalance.on_health_change = on,
                None => ok = false,
            }
        }
        ok.then_some(rebalance)
    }
}

/// Instance names travel in session ids and URLs: keep them to a URL- and log-safe alphabet,
/// or an IPv6 address (its colons are legal in a query, and clients percent-encode them), the
/// name of an instance on an IPv6 network when its peers come from DNS.
fn check_instance(name: &str) -> Result<String, String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && (name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            || name.parse::<Ipv6Addr>().is_ok());
    if valid {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "expected an instance name of 1 to 64 letters, digits, '-' or '.' (or an IPv6 address), found {name:?}"
        ))
    }
}

/// Whether every request `later` matches is taken by `earlier` first, with the router's
/// host semantics: no host matches every request, `*.example.com` matches names below
/// `example.com` (not `example.com` itself), hosts are already lowercase.
fn shadows(earlier: &Route, later: &Route) -> bool {
    let host_covers = match (&earlier.host, &later.host) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => match a.strip_prefix('*') {
            // `.example.com` covers `x.example.com` and `*.x.example.com`, and the same
            // wildcard; `b` ends with the suffix and is longer exactly in those cases.
            Some(suffix) => b == a || (b.ends_with(suffix) && b.len() > suffix.len()),
            None => a == b,
        },
    };
    host_covers && later.path_prefix.starts_with(&earlier.path_prefix)
}

/// Names of listeners, upstreams and routes end up in logs and metric labels.
fn check_name(name: &str) -> Result<String, String> {
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok && !name.is_empty() {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "invalid name {name:?}: use letters, digits, '-', '_' and '.' only"
        ))
    }
}

/// A route's host: like [`check_host`], or an IPv6 literal, stored without brackets as the
/// router compares it.
fn check_route_host(host: &str) -> Result<String, String> {
    let trimmed = host.trim();
    let literal = trimmed
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(trimmed);
    match literal.parse::<Ipv6Addr>() {
        Ok(_) => Ok(literal.to_ascii_lowercase()),
        Err(_) => check_host(host, true),
    }
}

/// A DNS name (or IPv4 address), lowercased; `*.suffix` when `wildcard` is allowed.
fn check_host(host: &str, wildcard: bool) -> Result<String, String> {
    let lower = host.trim().to_ascii_lowercase();
    let bad = |why: &str| Err(format!("invalid host {host:?}: {why}"));
    if lower.contains(':') {
        return bad("hosts are matched without a port; remove the ':port'");
    }
    if lower.ends_with('.') {
        return bad("remove the trailing '.'");
    }
    let name = match lower.strip_prefix("*.") {
        Some(_) if !wildcard => return bad("a wildcard is not allowed here"),
        Some(rest) => rest,
        None => &lower,
    };
    if name.len() > 253 {
        return bad("longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return bad("empty label (two dots in a row, or a leading dot)");
        }
        if label.contains('*') {
            return bad("a wildcard must be a whole first label, as in *.example.com");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad("use letters, digits, '-' and '.' only");
        }
    }
    Ok(lower)
}

fn check_path_prefix(prefix: &str) -> Result<String, String> {
    if !prefix.starts_with('/') {
        return Err(format!("path_prefix {prefix:?} must start with '/'"));
    }
    if let Some(c) = prefix
        .chars()
        .find(|c| matches!(c, '?' | '#') || c.is_whitespace())
    {
        return Err(format!(
            "path_prefix {prefix:?} must not contain {c:?} (it is matched against the path only)"
        ));
    }
    Ok(prefix.to_owned())
}

/// `"/rooms/{room}"`: the index of the only `{name}` segment. Literal segments up to the
/// placeholder must agree with the route's path_prefix, so the documented shape is the one
/// requests actually have.
fn sticky_path(pattern: &str, prefix: Option<&str>) -> Result<StickyKey, String> {
    let Some(rest) = pattern.strip_prefix('/') else {
        return Err(format!("path pattern {pattern:?} must start with '/'"));
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let mut placeholders = Vec::new();
    for (i, segment) in segments.iter().enumerate() {
        let inner = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}'));
        match inner {
            Some(name)
                if !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
            {
                placeholders.push(i);
            }
            _ if segment.contains(['{', '}']) => {
                return Err(format!(
                    "path pattern {pattern:?}: segment {segment:?} is not a placeholder; write a whole segment as {{name}}"
                ));
            }
            _ => {}
        }
    }
    let index = match placeholders.as_slice() {
        [index] => *index,
        [] => {
            return Err(format!(
                "path pattern {pattern:?} has no {{placeholder}}; mark the segment to stick on, as in /rooms/{{room}}"
            ));
        }
        _ => {
            return Err(format!(
                "path pattern {pattern:?} has {} placeholders; exactly one is allowed",
                placeholders.len()
            ));
        }
    };
    if let Some(prefix) = prefix {
        check_pattern_fits_prefix(pattern, &segments, index, prefix)?;
    }
    Ok(StickyKey::PathSegment {
        pattern: pattern.to_owned(),
        index,
    })
}

/// The prefix fixes the first segments of every request the route sees: they must be the
/// pattern's literal segments, and must stop before the placeholder (else every request
/// would get the same key).
fn check_pattern_fits_prefix(
    pattern: &str,
    segments: &[&str],
    index: usize,
    prefix: &str,
) -> Result<(), String> {
    let parts: Vec<&str> = prefix.trim_start_matches('/').split('/').collect();
    for (k, part) in parts.iter().enumerate() {
        // The last piece of the prefix may end mid-segment (`/rooms/a` matches `/rooms/ab`).
        let complete = k + 1 < parts.len();
        let fits = match k.cmp(&index) {
            std::cmp::Ordering::Less if complete => *part == segments[k],
            std::cmp::Ordering::Less => segments[k].starts_with(part),
            std::cmp::Ordering::Equal if complete => {
                return Err(format!(
                    "path pattern {pattern:?} takes its key from segment {index}, which match.path_prefix {prefix:?} fixes to {part:?}: every request would get the same key"
                ));
            }
            _ => true,
        };
        if !fits {
            return Err(format!(
                "path pattern {pattern:?} does not fit match.path_prefix {prefix:?}: requests under that prefix do not have {:?} as segment {k}",
                segments[k]
            ));
        }
    }
    Ok(())
}

/// The path of a WebSocket health probe: origin-form, as a request line carries it.
fn check_probe_path(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err(format!("health check path {path:?} must start with '/'"));
    }
    if let Some(c) = path
        .chars()
        .find(|c| *c == '#' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "health check path {path:?} must not contain {c:?} (it is sent as the request target)"
        ));
    }
    Ok(path.to_owned())
}

fn check_query_name(name: &str) -> Result<String, String> {
    if name
        .chars()
        .any(|c| matches!(c, '&' | '=' | '#' | '?') || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "invalid query parameter name {name:?}: it must not contain '&', '=', '?', '#' or spaces"
        ));
    }
    Ok(name.to_owned())
}

/// An HTTP token (RFC 9110 `tchar`), the syntax of header and cookie names.
fn check_token(token: &str, what: &str) -> Result<String, String> {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !token.is_empty() && token.bytes().all(tchar) {
        Ok(token.to_owned())
    } else {
        Err(format!(
            "invalid {what} {token:?}: use letters, digits and !#$%&'*+-.^_`|~ only"
        ))
    }
}

fn check_cookie_name(name: &str) -> Result<String, String> {
    check_token(name, "cookie name")
}

/// `scheme://host[:port]`, lowercased, as browsers send it in `Origin`.
fn check_origin(origin: &str) -> Result<String, String> {
    let lower = origin.trim().to_ascii_lowercase();
    let bad = |why: &str| Err(format!("invalid origin {origin:?}: {why}"));
    if lower == "*" {
        return bad("leave allowed_origins out to allow any origin");
    }
    let Some((scheme, rest)) = lower.split_once("://") else {
        return bad("expected scheme://host[:port], such as https://chat.example.com");
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return bad("invalid scheme");
    }
    if rest.contains(['/', '?', '#']) {
        return bad(
            "an origin has no path (browsers send scheme://host[:port] only; remove the trailing part)",
        );
    }
    if rest.is_empty() {
        return bad("missing host");
    }
    split_host_port(rest)
        .and_then(|(host, _)| {
            if host.starts_with('[') {
                Ok(String::new())
            } else {
                check_host(host, false)
            }
        })
        .map_err(|why| format!("invalid origin {origin:?}: {why}"))?;
    Ok(lower)
}

/// `host`, `host:port` or `[v6]:port`; the host keeps its brackets.
fn split_host_port(authority: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if authority.starts_with('[') {
        let end = authority
            .find(']')
            .ok_or_else(|| "unclosed '[' in IPv6 address".to_owned())?;
        let host = &authority[..=end];
        if host[1..end].parse::<Ipv6Addr>().is_err() {
            return Err(format!("invalid IPv6 address {host:?}"));
        }
        let after = &authority[end + 1..];
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return Err(format!("unexpected {after:?} after the IPv6 address")),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => None,
        Some(text) => match text.parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => return Err(format!("invalid port {text:?} (expected 1 to 65535)")),
        },
    };
    Ok((host, port))
}

pub(crate) struct BackendUrl {
    pub(crate) secure: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) base_path: String,
}

pub(crate) fn parse_backend_url(url: &str) -> Result<BackendUrl, String> {
    let bad = |why: String| Err(format!("invalid backend URL {url:?}: {why}"));
    let Some((scheme, rest)) = url.split_once("://") else {
        return bad("expected ws://host[:port][/path] or wss://host[:port][/path]".into());
    };
    let secure = match scheme.to_ascii_lowercase().as_str() {
        "ws" => false,
        "wss" => true,
        "http" | "https" => {
            return bad(format!(
                "the scheme must be ws:// or wss:// (use {}:// for {scheme}://)",
                if scheme.eq_ignore_ascii_case("https") {
                    "wss"
                } else {
                    "ws"
                }
            ));
        }
        _ => {
            return bad(format!(
                "the scheme must be ws:// or wss://, found {scheme}://"
            ));
        }
    };
    if rest.contains('?') {
        return bad("a backend URL cannot have a query (?...)".into());
    }
    if rest.contains('#') {
        return bad("a backend URL cannot have a fragment (#...)".into());
    }
    if let Some(c) = rest.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return bad(format!("contains {c:?}"));
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.contains('@') {
        return bad("credentials (user@host) are not supported".into());
    }
    if authority.is_empty() {
        return bad("missing host".into());
    }
    let (host, port) = match split_host_port(authority) {
        Ok(parts) => parts,
        Err(why) => return bad(why),
    };
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        // Kept without brackets: what a socket connect and a certificate check take.
        Some(v6) => v6.to_owned(),
        None => match check_host(host, false) {
            Ok(host) => host,
            Err(why) => return bad(why),
        },
    };
    Ok(BackendUrl {
        secure,
        host,
        port: port.unwrap_or(if secure { 443 } else { 80 }),
        base_path: path.trim_end_matches('/').to_owned(),
    })
}
