//! The human-readable summary printed by `wsgate check`.
//!
//! It shows the configuration as the gateway will run it: defaults filled in, route
//! overrides merged, paths resolved. Durations and sizes use the file notation, so a value
//! can be copied back into the file.

use std::fmt::Write;

use super::model::*;
use super::units::{format_duration, format_size, format_timer};

pub fn describe(config: &Config) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_config(&mut out, config);
    out
}

fn write_config(out: &mut String, config: &Config) -> std::fmt::Result {
    writeln!(out, "listeners:")?;
    for listener in &config.listeners {
        write!(out, "  {}: {}", listener.name, listener.address)?;
        match &listener.tls {
            None => writeln!(out, ", no TLS")?,
            Some(tls) => {
                let n = tls.certificates.len();
                let plural = if n == 1 { "" } else { "s" };
                writeln!(out, ", TLS ({n} certificate{plural})")?;
                for (i, cert) in tls.certificates.iter().enumerate() {
                    let names = if cert.server_names.is_empty() {
                        "no server names".to_owned()
                    } else {
                        cert.server_names.join(", ")
                    };
                    let default = if i == 0 { " [default]" } else { "" };
                    writeln!(
                        out,
                        "    {}{default}: {} + key {}",
                        names,
                        cert.cert.display(),
                        cert.key.display()
                    )?;
                }
            }
        }
        if listener.proxy_protocol {
            writeln!(out, "    PROXY protocol (v1, v2) required")?;
        }
        if !listener.trusted_proxies.is_empty() {
            let networks: Vec<String> = listener
                .trusted_proxies
                .networks()
                .iter()
                .map(ToString::to_string)
                .collect();
            writeln!(
                out,
                "    client addresses believed from {}",
                networks.join(", ")
            )?;
        }
    }

    writeln!(out, "upstreams:")?;
    for upstream in &config.upstreams {
        write!(
            out,
            "  {}: connect_timeout {}",
            upstream.name,
            format_duration(upstream.connect_timeout)
        )?;
        let secure = match &upstream.dns {
            Some(dns) => dns.secure,
            None => upstream.backends.iter().any(|b| b.secure),
        };
        if secure {
            let ca = upstream.tls.ca_file.as_ref().map_or_else(
                || "bundled web roots".to_owned(),
                |ca| format!("CA {}", ca.display()),
            );
            write!(out, ", TLS verified against {ca}")?;
            if let Some(name) = &upstream.tls.server_name {
                write!(out, " as {name}")?;
            }
        }
        writeln!(out)?;
        if let Some(dns) = &upstream.dns {
            let lookup = match &dns.lookup {
                DnsLookup::Address { name, port } => format!("A/AAAA {name}, port {port}"),
                DnsLookup::Srv { name } => format!("SRV {name}"),
            };
            let resolver = dns
                .resolver
                .map_or_else(|| "the system's resolver".to_owned(), |r| r.to_string());
            writeln!(
                out,
                "    backends from DNS: {lookup} via {resolver}, looked up after the TTL held within {} to {}; now:",
                format_duration(dns.min_interval),
                format_duration(dns.max_interval)
            )?;
        }
        let total: u64 = upstream.backends.iter().map(|b| u64::from(b.weight)).sum();
        for backend in &upstream.backends {
            writeln!(
                out,
                "    {} weight {} ({}%)",
                backend.url,
                backend.weight,
                u64::from(backend.weight) * 100 / total.max(1)
            )?;
        }
        writeln!(
            out,
            "    health check: {}",
            health_check(&upstream.health_check)
        )?;
        writeln!(
            out,
            "    passive health: {}",
            if upstream.backends.len() < 2 {
                "off (a single backend has nothing to hand its connections to)".to_owned()
            } else {
                passive_health(&upstream.passive_health)
            }
        )?;
    }

    writeln!(out, "routes (first match wins):")?;
    for (i, route) in config.routes.iter().enumerate() {
        let upstream = config
            .upstreams
            .get(route.upstream)
            .map_or("?", |u| u.name.as_str());
        writeln!(
            out,
            "  [{i}] {}: host {} path {}* -> {upstream}",
            route.name,
            route.host.as_deref().unwrap_or("any"),
            route.path_prefix
        )?;
        let sticky = match (&route.sticky, &route.sticky_cookie) {
            (Some(key), _) => sticky_key(key),
            (None, Some(cookie)) => format!(
                "cookie {} set by the gateway ({})",
                cookie.name,
                cookie.max_age.map_or_else(
                    || "session".to_owned(),
                    |d| format!("max_age {}", format_duration(d))
                )
            ),
            (None, None) => "none (least connections, by weight)".to_owned(),
        };
        writeln!(out, "      sticky: {sticky}")?;
        let origins = if route.allowed_origins.is_empty() {
            "any".to_owned()
        } else {
            route.allowed_origins.join(", ")
        };
        writeln!(out, "      origins: {origins}")?;
        writeln!(
            out,
            "      compression: {}, pings: {}",
            match route.compression {
                Compression::Strip => "strip".to_owned(),
                Compression::Passthrough => "passthrough".to_owned(),
                Compression::Terminate(d) => format!(
                    "terminate (windows {}/{} bits, context takeover {}/{}, level {}, from {} bytes)",
                    d.server_max_window_bits,
                    d.client_max_window_bits,
                    if d.server_no_context_takeover {
                        "off"
                    } else {
                        "on"
                    },
                    if d.client_no_context_takeover {
                        "off"
                    } else {
                        "on"
                    },
                    d.level,
                    d.min_size
                ),
            },
            if route.ping_passthrough {
                "passed through"
            } else {
                "answered per hop"
            }
        )?;
        writeln!(
            out,
            "      connect retries: {} (another backend when one cannot be reached)",
            route.connect_retries
        )?;
        writeln!(out, "      timeouts: {}", timeouts(&route.timeouts))?;
        writeln!(out, "      limits: {}", limits(&route.limits))?;
        writeln!(out, "      auth: {}", auth(route.auth.as_ref()))?;
    }

    writeln!(out, "defaults:")?;
    writeln!(out, "  timeouts: {}", timeouts(&config.timeouts))?;
    writeln!(
        out,
        "  limits: {}, compression_memory {}",
        limits(&config.limits),
        format_size(config.limits.compression_memory)
    )?;
    writeln!(
        out,
        "  drain: readiness_delay {}, spread {}, deadline {}",
        format_duration(config.drain.readiness_delay),
        format_duration(config.drain.spread),
        format_duration(config.drain.deadline)
    )?;
    let rebalance = &config.rebalance;
    if rebalance.enabled {
        let health = if rebalance.on_health_change {
            "reloads and health changes"
        } else {
            "reloads only"
        };
        writeln!(
            out,
            "  rebalance: moved sticky keys closed with 1012 over {} after {health}",
            format_duration(rebalance.window)
        )?;
    } else {
        writeln!(out, "  rebalance: off")?;
    }
    let sessions = &config.sessions;
    if sessions.enabled {
        writeln!(
            out,
            "  sessions: instance {}, poll_timeout {}, timeout {}, buffer {}, max_sessions {}, max_batch {}, max_sessions_per_ip {}, open_rate {}/s, body_timeout {}",
            sessions.instance,
            format_duration(sessions.poll_timeout),
            format_duration(sessions.timeout),
            format_size(sessions.buffer),
            sessions.max_sessions,
            format_size(sessions.max_batch),
            sessions.max_sessions_per_ip,
            sessions.open_rate,
            format_duration(sessions.body_timeout)
        )?;
    } else {
        writeln!(out, "  sessions: off")?;
    }
    if let Some(cluster) = &config.cluster {
        let peers: Vec<String> = cluster
            .peers
            .iter()
            .map(|peer| format!("{} at {}", peer.name, peer.address))
            .collect();
        let listener = match cluster.listener {
            Some(index) => format!("listener {}", config.listeners[index].name),
            None => "any listener".to_owned(),
        };
        writeln!(
            out,
            "cluster: instance {}, peers{} on {listener}: {}",
            cluster.name,
            if cluster.tls.is_some() {
                " over TLS"
            } else {
                ""
            },
            match (peers.is_empty(), &cluster.peers_dns) {
                (true, Some(_)) => "those DNS answers".to_owned(),
                (true, None) => "none".to_owned(),
                (false, _) => peers.join(", "),
            }
        )?;
        if let Some(dns) = &cluster.peers_dns {
            let resolver = dns
                .resolver
                .map_or_else(|| "the system's resolver".to_owned(), |r| r.to_string());
            let port = match &dns.lookup {
                DnsLookup::Address { port, .. } => format!(", port {port}"),
                DnsLookup::Srv { .. } => String::new(),
            };
            writeln!(
                out,
                "  peers from DNS: A/AAAA {}{port} via {resolver}, looked up after the TTL held within {} to {}",
                dns.lookup.name(),
                format_duration(dns.min_interval),
                format_duration(dns.max_interval)
            )?;
        }
    }
    match &config.admin {
        Some(admin) => writeln!(out, "admin: {}", admin.address),
        None => writeln!(out, "admin: none"),
    }
}

fn sticky_key(key: &StickyKey) -> String {
    match key {
        StickyKey::PathSegment { pattern, index } => {
            format!("path segment {index} of {pattern}")
        }
        StickyKey::Query(name) => format!("query parameter {name}"),
        StickyKey::Header(name) => format!("header {name}"),
        StickyKey::Cookie(name) => format!("cookie {name}"),
        StickyKey::ClientIp => "client IP".to_owned(),
        StickyKey::Claim { claim, .. } => format!("token claim {claim}"),
    }
}

fn auth(auth: Option<&Auth>) -> String {
    match auth {
        None => "none".to_owned(),
        Some(Auth::Jwt(jwt)) => {
            let from: Vec<String> = jwt
                .from
                .iter()
                .map(|source| match source {
                    TokenSource::Bearer => "bearer".to_owned(),
                    TokenSource::Cookie(name) => format!("cookie {name}"),
                    TokenSource::Query(name) => format!("query {name}"),
                    TokenSource::Subprotocol(prefix) => format!("subprotocol {prefix}*"),
                })
                .collect();
            let keys: Vec<String> = jwt
                .keys
                .iter()
                .map(|key| {
                    let algorithms: Vec<&str> = key.algorithms.iter().map(|a| a.name()).collect();
                    let source = match &key.source {
                        JwtKeySource::Pem(path) => format!("pem {}", path.display()),
                        JwtKeySource::Jwks(path) => format!("jwks {}", path.display()),
                        JwtKeySource::Secret(path) => format!("secret {}", path.display()),
                        JwtKeySource::JwksUrl(url) => format!(
                            "jwks_url {} (refresh {})",
                            url.url,
                            format_duration(url.refresh)
                        ),
                    };
                    if algorithms.is_empty() {
                        source
                    } else {
                        format!("{source} [{}]", algorithms.join(", "))
                    }
                })
                .collect();
            let mut text = format!(
                "jwt from {}; keys: {}; leeway {}; expiry closes with {}",
                from.join(", "),
                keys.join(", "),
                format_duration(jwt.leeway),
                jwt.expired_close_code
            );
            if let Some(issuer) = &jwt.issuer {
                let _ = write!(text, "; issuer {issuer}");
            }
            if !jwt.audience.is_empty() {
                let _ = write!(text, "; audience {}", jwt.audience.join(", "));
            }
            if !jwt.require.is_empty() {
                let _ = write!(text, "; require {}", jwt.require.join(", "));
            }
            for (header, claim) in &jwt.headers {
                let _ = write!(text, "; {header} from {claim}");
            }
            if let Some(max) = jwt.max_connections_per_subject {
                let _ = write!(text, "; at most {max} per subject");
            }
            text
        }
        Some(Auth::Forward(forward)) => {
            let ttl = |d: std::time::Duration| {
                if d.is_zero() {
                    "off".to_owned()
                } else {
                    format_duration(d)
                }
            };
            let mut text = format!(
                "forward to {} (timeout {}; cached: admissions {}, refusals {})",
                forward.url,
                format_duration(forward.timeout),
                ttl(forward.cache_ttl),
                ttl(forward.negative_cache_ttl)
            );
            if let Some(header) = &forward.subject_header {
                let _ = write!(text, "; sessions bound to {header}");
            }
            text
        }
    }
}

fn health_check(check: &Option<HealthCheck>) -> String {
    let Some(check) = check else {
        return "none".to_owned();
    };
    let kind = match &check.kind {
        HealthCheckKind::Tcp => "tcp connect".to_owned(),
        HealthCheckKind::WebSocket { path } => format!("websocket handshake on {path}"),
    };
    let plural = |n: u32| if n == 1 { "" } else { "s" };
    format!(
        "{kind} every {} (timeout {}), out after {} failure{}, back after {} success{}",
        format_duration(check.interval),
        format_duration(check.timeout),
        check.unhealthy_threshold,
        plural(check.unhealthy_threshold),
        check.healthy_threshold,
        if check.healthy_threshold == 1 {
            ""
        } else {
            "es"
        },
    )
}

fn passive_health(passive: &Option<PassiveHealth>) -> String {
    match passive {
        None => "off".to_owned(),
        Some(passive) => format!(
            "out for {} after a failed connect, doubling up to {}",
            format_duration(passive.backoff),
            format_duration(passive.max_backoff)
        ),
    }
}

fn timeouts(t: &Timeouts) -> String {
    format!(
        "handshake {}, idle {}, ping_interval {}, pong_timeout {}, close {}, body {}, body_total {}",
        format_duration(t.handshake),
        format_timer(t.idle),
        format_timer(t.ping_interval),
        format_duration(t.pong_timeout),
        format_duration(t.close),
        format_duration(t.body),
        format_timer(t.body_total)
    )
}

fn limits(l: &Limits) -> String {
    let mut text = format!(
        "max_frame {}, max_message {}, max_connections {}, max_header_bytes {}",
        format_size(l.max_frame),
        format_size(l.max_message),
        l.max_connections,
        format_size(l.max_header_bytes as u64)
    );
    let optional = [
        ("max_connections_per_ip", l.max_connections_per_ip, ""),
        ("handshake_rate", l.handshake_rate, "/s"),
        ("message_rate", l.message_rate, "/s"),
    ];
    for (key, value, unit) in optional {
        if let Some(value) = value {
            text.push_str(&format!(", {key} {value}{unit}"));
        }
    }
    text
}
