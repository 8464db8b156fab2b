//! Loader tests: defaults, merging, and every error with its line and path.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// The smallest valid file; tests append sections to it. Lines 1-9.
const MINIMAL: &str = "\
listeners:
  - address: 127.0.0.1:8080
upstreams:
  rooms:
    backends:
      - ws://127.0.0.1:9001
routes:
  - upstream: rooms
";

fn ok(source: &str) -> Config {
    from_yaml_str(source, "t.yaml").unwrap_or_else(|e| panic!("unexpected errors:\n{e}"))
}

fn errs(source: &str) -> Vec<ConfigError> {
    match from_yaml_str(source, "t.yaml") {
        Ok(config) => panic!("expected errors, got {config:#?}"),
        Err(errors) => {
            assert!(!errors.is_empty());
            errors.errors
        }
    }
}

/// Asserts that an error at `line` and `path` mentions every one of `needles`.
#[track_caller]
fn expect(errors: &[ConfigError], line: usize, path: &str, needles: &[&str]) {
    let found = errors.iter().any(|e| {
        e.line == Some(line) && e.path == path && needles.iter().all(|n| e.problem.contains(n))
    });
    assert!(
        found,
        "no error at line {line}, path {path}, mentioning {needles:?}; got:\n{}",
        ConfigErrors {
            errors: errors.to_vec()
        }
    );
}

/// The only error of a file.
#[track_caller]
fn single(source: &str, line: usize, path: &str, needles: &[&str]) {
    let errors = errs(source);
    expect(&errors, line, path, needles);
    assert_eq!(errors.len(), 1, "{errors:#?}");
}

// ----- valid files and defaults -----

#[test]
fn minimal_file_gets_every_default() {
    let config = ok(MINIMAL);
    assert_eq!(config.listeners.len(), 1);
    let listener = &config.listeners[0];
    assert_eq!(listener.name, "listener-0");
    assert_eq!(listener.address, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(listener.tls, None);

    let upstream = &config.upstreams[0];
    assert_eq!(upstream.name, "rooms");
    assert_eq!(upstream.connect_timeout, Duration::from_secs(5));
    assert_eq!(upstream.tls, UpstreamTls::default());
    assert_eq!(upstream.health_check, None);
    assert_eq!(upstream.passive_health, Some(PassiveHealth::DEFAULT));
    assert_eq!(
        upstream.backends,
        [Backend {
            url: "ws://127.0.0.1:9001".into(),
            secure: false,
            host: "127.0.0.1".into(),
            port: 9001,
            base_path: String::new(),
            weight: 1,
        }]
    );

    let route = &config.routes[0];
    assert_eq!(route.name, "route-0");
    assert_eq!(route.host, None);
    assert_eq!(route.path_prefix, "/");
    assert_eq!(route.upstream, 0);
    assert_eq!(route.sticky, None);
    assert_eq!(route.sticky_cookie, None);
    assert!(route.allowed_origins.is_empty());
    assert_eq!(route.compression, Compression::Strip);
    assert!(!route.ping_passthrough);
    assert_eq!(route.timeouts, Timeouts::DEFAULT);
    assert_eq!(route.limits, Limits::DEFAULT);

    assert_eq!(config.timeouts, Timeouts::DEFAULT);
    assert_eq!(config.limits, Limits::DEFAULT);
    assert_eq!(config.admin, None);
    assert_eq!(config.drain, Drain::DEFAULT);
    assert_eq!(config.rebalance, Rebalance::DEFAULT);
    assert!(config.rebalance.enabled && config.rebalance.on_health_change);
    assert_eq!(config.rebalance.window, Duration::from_secs(10));
    assert_eq!(config.drain.deadline, Duration::from_secs(25));
}

#[test]
fn every_key_is_converted() {
    let config = ok("\
listeners:
  - name: secure
    address: \"[::1]:8443\"
    tls:
      certificates:
        - cert: a.crt
          key: /abs/a.key
          server_names: [LocalHost, \"*.example.com\"]
upstreams:
  chat.v2:
    backends:
      - url: wss://Backend.Internal/base/
        weight: 1000
      - wss://[::1]:9443
    connect_timeout: 1500ms
    tls:
      ca_file: ca.pem
      server_name: chat.internal
routes:
  - name: r
    match:
      host: Chat.Example.com
      path_prefix: /a/
    upstream: chat.v2
    sticky:
      header: X-Room
    allowed_origins: [HTTPS://Chat.Example.com:8443, http://localhost]
    compression: passthrough
    ping_passthrough: true
  - upstream: chat.v2
    match: {path_prefix: /q}
    sticky: {query: room}
  - upstream: chat.v2
    match: {path_prefix: /c}
    sticky: {cookie: sid}
  - upstream: chat.v2
    match: {path_prefix: /ip}
    sticky: {client_ip: true}
  - upstream: chat.v2
    sticky_cookie:
      name: aff
admin:
  address: 127.0.0.1:9090
");
    let tls = config.listeners[0].tls.as_ref().unwrap();
    assert_eq!(
        tls.certificates[0],
        CertificateFiles {
            cert: PathBuf::from("a.crt"),
            key: PathBuf::from("/abs/a.key"),
            server_names: vec!["localhost".into(), "*.example.com".into()],
        }
    );
    let upstream = &config.upstreams[0];
    assert_eq!(upstream.name, "chat.v2");
    assert_eq!(upstream.connect_timeout, Duration::from_millis(1500));
    let b0 = &upstream.backends[0];
    assert_eq!(
        (
            b0.url.as_str(),
            b0.secure,
            b0.host.as_str(),
            b0.port,
            b0.base_path.as_str(),
            b0.weight
        ),
        (
            "wss://Backend.Internal/base/",
            true,
            "backend.internal",
            443,
            "/base",
            1000
        )
    );
    let b1 = &upstream.backends[1];
    assert_eq!((b1.host.as_str(), b1.port), ("::1", 9443));
    assert_eq!(upstream.tls.ca_file, Some(PathBuf::from("ca.pem")));
    assert_eq!(upstream.tls.server_name.as_deref(), Some("chat.internal"));

    let r = &config.routes;
    assert_eq!(r[0].host.as_deref(), Some("chat.example.com"));
    assert_eq!(r[0].path_prefix, "/a/");
    assert_eq!(r[0].sticky, Some(StickyKey::Header("x-room".into())));
    assert_eq!(
        r[0].allowed_origins,
        ["https://chat.example.com:8443", "http://localhost"]
    );
    assert_eq!(r[0].compression, Compression::Passthrough);
    assert!(r[0].ping_passthrough);
    assert_eq!(r[1].sticky, Some(StickyKey::Query("room".into())));
    assert_eq!(r[2].sticky, Some(StickyKey::Cookie("sid".into())));
    assert_eq!(r[3].sticky, Some(StickyKey::ClientIp));
    assert_eq!(
        r[4].sticky_cookie,
        Some(StickyCookie {
            name: "aff".into(),
            max_age: None,
            same_site: SameSite::Lax,
            secure: None,
        })
    );
    assert_eq!(
        config.admin,
        Some(Admin {
            address: "127.0.0.1:9090".parse().unwrap(),
            token: None,
            tls: None,
        })
    );
}

#[test]
fn sticky_path_pattern_gives_the_segment_index() {
    let config = ok(&format!(
        "{MINIMAL}    match: {{path_prefix: /rooms/}}\n    sticky:\n      path: \"/rooms/{{room}}/ws\"\n"
    ));
    assert_eq!(
        config.routes[0].sticky,
        Some(StickyKey::PathSegment {
            pattern: "/rooms/{room}/ws".into(),
            index: 1
        })
    );
    // A prefix that stops inside the placeholder's segment still fits.
    let config = ok(&format!(
        "{MINIMAL}    match: {{path_prefix: /r}}\n    sticky: {{path: \"/{{room}}\"}}\n"
    ));
    assert!(matches!(
        config.routes[0].sticky,
        Some(StickyKey::PathSegment { index: 0, .. })
    ));
}

#[test]
fn timeouts_and_limits_merge_key_by_key() {
    let config = ok("\
listeners:
  - address: 127.0.0.1:8080
upstreams:
  u:
    backends: [ws://h]
routes:
  - name: a
    match: {path_prefix: /a}
    upstream: u
    timeouts:
      idle: 10m
      ping_interval: off
    limits:
      max_message: 2MiB
  - name: b
    upstream: u
timeouts:
  handshake: 3s
  close: 0
limits:
  max_frame: 1MiB
  max_connections: 10
  max_header_bytes: 8192
");
    let top_t = Timeouts {
        handshake: Duration::from_secs(3),
        close: Duration::ZERO,
        ..Timeouts::DEFAULT
    };
    let top_l = Limits {
        max_frame: 1 << 20,
        max_connections: 10,
        max_header_bytes: 8192,
        ..Limits::DEFAULT
    };
    assert_eq!(config.timeouts, top_t);
    assert_eq!(config.limits, top_l);
    let a = &config.routes[0];
    assert_eq!(
        a.timeouts,
        Timeouts {
            idle: Some(Duration::from_secs(600)),
            ping_interval: None,
            ..top_t
        }
    );
    assert_eq!(
        a.limits,
        Limits {
            max_message: 2 << 20,
            ..top_l
        }
    );
    assert_eq!(config.routes[1].timeouts, top_t);
    assert_eq!(config.routes[1].limits, top_l);
}

#[test]
fn disabled_timers() {
    let config = ok(&format!(
        "{MINIMAL}timeouts:\n  idle: 0\n  ping_interval: \"0s\"\n"
    ));
    assert_eq!(config.timeouts.idle, None);
    assert_eq!(config.timeouts.ping_interval, None);
    let config = ok(&format!(
        "{MINIMAL}timeouts:\n  idle: 24h\n  ping_interval: 1ms\n"
    ));
    assert_eq!(config.timeouts.idle, Some(Duration::from_secs(86_400)));
    assert_eq!(
        config.timeouts.ping_interval,
        Some(Duration::from_millis(1))
    );
}

#[test]
fn load_resolves_relative_paths_against_the_file() {
    let dir = temp_dir("resolve");
    let file = dir.join("gw.yaml");
    std::fs::write(
        &file,
        "\
listeners:
  - address: 127.0.0.1:8443
    tls:
      certificates:
        - {cert: ../certs/a.crt, key: /etc/a.key}
upstreams:
  u:
    backends: [wss://h]
    tls: {ca_file: ca.crt}
routes:
  - upstream: u
",
    )
    .unwrap();
    let config = load(&file).unwrap_or_else(|e| panic!("{e}"));
    let cert = &config.listeners[0].tls.as_ref().unwrap().certificates[0];
    assert_eq!(cert.cert, dir.join("../certs/a.crt"));
    assert_eq!(cert.key, Path::new("/etc/a.key"));
    assert_eq!(config.upstreams[0].tls.ca_file, Some(dir.join("ca.crt")));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn load_names_an_unreadable_file() {
    let missing = temp_dir("missing").join("nope.yaml");
    let errors = load(&missing).unwrap_err();
    assert_eq!(errors.len(), 1);
    let text = errors.to_string();
    assert!(text.starts_with(&missing.display().to_string()), "{text}");
    assert!(text.contains("cannot read"), "{text}");
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "wsgate-config-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ----- display -----

#[test]
fn errors_display_as_file_line_path_problem() {
    let error = ConfigError {
        file: "config/wsgate.yaml".into(),
        line: Some(14),
        path: "routes[1].upstream".into(),
        problem: "unknown upstream \"room\" (expected one of: rooms, echo)".into(),
    };
    assert_eq!(
        error.to_string(),
        "config/wsgate.yaml:14: routes[1].upstream: unknown upstream \"room\" (expected one of: rooms, echo)"
    );
    let no_line = ConfigError {
        line: None,
        path: String::new(),
        ..error.clone()
    };
    assert_eq!(
        no_line.to_string(),
        "config/wsgate.yaml: unknown upstream \"room\" (expected one of: rooms, echo)"
    );
    let both = ConfigErrors {
        errors: vec![error.clone(), error],
    };
    assert_eq!(both.to_string().lines().count(), 2);
    assert!(!both.to_string().ends_with('\n'));
}

#[test]
fn the_documented_example_error() {
    let source = "\
listeners:
  - address: 127.0.0.1:8080
upstreams:
  rooms:
    backends: [ws://a]
  echo:
    backends: [ws://b]
routes:
  - name: a
    match: {path_prefix: /a}
    upstream: rooms
  - name: b
    match:
      path_prefix: /b
    upstream: room
";
    let errors = from_yaml_str(source, "config/wsgate.yaml").unwrap_err();
    assert_eq!(
        errors.to_string(),
        "config/wsgate.yaml:15: routes[1].upstream: unknown upstream \"room\" (expected one of: rooms, echo)"
    );
}

// ----- syntax and shape -----

#[test]
fn yaml_syntax_error_has_a_line() {
    let errors = errs("listeners:\n  - address: 127.0.0.1:8080\n  bad: [1, 2\nroutes: []\n");
    assert_eq!(errors.len(), 1);
    let e = &errors[0];
    assert_eq!(e.line, Some(3), "{e}");
    assert!(e.problem.starts_with("invalid YAML"), "{e}");
    // Tabs: the line is the parser's; the scanner does not guess a path for it.
    let errors = errs("listeners:\n  - address: 127.0.0.1:8080\n\tname: x\n");
    assert_eq!((errors[0].line, errors[0].path.as_str()), (Some(3), ""));
    assert!(errors[0].problem.contains("tab"), "{errors:?}");
}

#[test]
fn duplicate_keys_point_at_the_repeat() {
    let errors = errs(
        "\
listeners:
  - address: 127.0.0.1:8080
upstreams:
  u:
    backends: [ws://a]
    connect_timeout: 1s
    backends: [ws://b]
routes: [{upstream: u}]
",
    );
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors[0].to_string(),
        "t.yaml:7: upstreams.u.backends: duplicate key \"backends\" (first set on line 5)"
    );
}

fn errors_of(source: &str) -> String {
    ConfigErrors {
        errors: errs(source),
    }
    .to_string()
}

#[test]
fn top_level_shape_errors_have_no_line() {
    for source in ["", "# only a comment\n", "- a\n- b\n", "just a string\n"] {
        let errors = errs(source);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_eq!(errors[0].path, "(top level)");
        assert!(
            errors[0].problem.starts_with("expected a mapping"),
            "{errors:?}"
        );
    }
}

#[test]
fn missing_required_sections_are_all_reported() {
    let errors = errs("admin:\n  address: 127.0.0.1:9090\n");
    assert_eq!(errors.len(), 3, "{errors:#?}");
    for key in ["listeners", "upstreams", "routes"] {
        assert!(
            errors.iter().any(|e| e.path == key
                && e.line.is_none()
                && e.problem.contains("required key is missing")),
            "{key}: {errors:#?}"
        );
    }
}

#[test]
fn empty_lists_and_maps_where_one_is_required() {
    let errors = errs("listeners: []\nupstreams: {}\nroutes: []\n");
    expect(
        &errors,
        1,
        "listeners",
        &["empty", "at least one of listeners"],
    );
    expect(&errors, 2, "upstreams", &["empty", "at least one upstream"]);
    expect(&errors, 3, "routes", &["empty", "at least one of routes"]);
    assert_eq!(errors.len(), 3);
    single(
        "listeners: [{address: 127.0.0.1:1}]\nupstreams:\n  u:\n    backends: []\nroutes: [{upstream: u}]\n",
        4,
        "upstreams.u.backends",
        &["empty", "backends"],
    );
}

#[test]
fn unknown_keys_at_every_level() {
    let errors = errs(
        "\
listeners:
  - address: 127.0.0.1:8080
    adress: 1
upstreams:
  rooms:
    backends:
      - url: ws://a
        wieght: 2
routes:
  - upstream: rooms
    sticky:
      query: room
      qurey: x
    timeouts:
      idel: 1s
lmits: {}
",
    );
    expect(
        &errors,
        3,
        "listeners[0].adress",
        &["unknown key \"adress\"", "name, address, tls"],
    );
    expect(
        &errors,
        8,
        "upstreams.rooms.backends[0].wieght",
        &["unknown key", "url, weight"],
    );
    expect(
        &errors,
        13,
        "routes[0].sticky.qurey",
        &["unknown key", "path, query, header, cookie, client_ip"],
    );
    expect(
        &errors,
        15,
        "routes[0].timeouts.idel",
        &["unknown key", "handshake, idle"],
    );
    expect(
        &errors,
        16,
        "lmits",
        &[
            "unknown key \"lmits\"",
            "listeners, upstreams, routes, timeouts, limits, admin",
        ],
    );
    assert_eq!(errors.len(), 5, "{errors:#?}");
}

#[test]
fn missing_required_keys_point_at_their_parent() {
    let errors = errs(
        "\
listeners:
  - name: a
upstreams:
  u:
    connect_timeout: 1s
routes:
  - name: r
    sticky_cookie:
      max_age: 1h
",
    );
    expect(
        &errors,
        2,
        "listeners[0].address",
        &["required key is missing", "127.0.0.1:8080"],
    );
    expect(
        &errors,
        4,
        "upstreams.u.backends",
        &["required key is missing"],
    );
    expect(
        &errors,
        7,
        "routes[0].upstream",
        &["required key is missing"],
    );
    expect(
        &errors,
        8,
        "routes[0].sticky_cookie.name",
        &["required key is missing"],
    );
    assert_eq!(errors.len(), 4, "{errors:#?}");
}

#[test]
fn wrong_types_say_what_was_expected() {
    let errors = errs(
        "\
listeners:
  address: 127.0.0.1:8080
upstreams:
  u:
    backends:
      - 42
      - url: ws://a
        weight: heavy
routes:
  - upstream: [u]
    ping_passthrough: \"yes\"
    compression: gzip
    allowed_origins: https://a.com
timeouts: 10s
admin:
  address: 9090
",
    );
    expect(
        &errors,
        1,
        "listeners",
        &["expected a list of listeners", "found a mapping"],
    );
    expect(
        &errors,
        6,
        "upstreams.u.backends[0]",
        &["expected a backend URL", "found the number 42"],
    );
    expect(
        &errors,
        8,
        "upstreams.u.backends[1].weight",
        &["expected a whole number from 1 to 1000", "\"heavy\""],
    );
    expect(
        &errors,
        10,
        "routes[0].upstream",
        &["expected the name of an upstream", "found a list"],
    );
    expect(
        &errors,
        11,
        "routes[0].ping_passthrough",
        &["expected true or false", "\"yes\""],
    );
    expect(
        &errors,
        12,
        "routes[0].compression",
        &["expected strip, passthrough or terminate", "\"gzip\""],
    );
    expect(
        &errors,
        13,
        "routes[0].allowed_origins",
        &["expected a list of origins"],
    );
    expect(
        &errors,
        14,
        "timeouts",
        &["expected a mapping of timeouts", "\"10s\""],
    );
    expect(
        &errors,
        16,
        "admin.address",
        &["expected an address", "the number 9090"],
    );
    assert_eq!(errors.len(), 9, "{errors:#?}");
}

#[test]
fn empty_values_are_not_defaults() {
    let errors = errs(&format!("{MINIMAL}    sticky:\n    name:\n"));
    expect(&errors, 9, "routes[0].sticky", &["empty value"]);
    expect(
        &errors,
        10,
        "routes[0].name",
        &["expected a name", "empty value"],
    );
}

#[test]
fn errors_come_in_file_order() {
    let errors = errs(
        "\
routes:
  - upstream: nope
listeners:
  - address: bad
upstreams:
  u:
    backends: [ftp://x]
",
    );
    let lines: Vec<_> = errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, [Some(2), Some(4), Some(7)], "{errors:#?}");
}

// ----- semantic checks -----

#[test]
fn duplicate_listener_addresses_and_names() {
    let errors = errs(
        "\
listeners:
  - name: a
    address: 127.0.0.1:8080
  - name: a
    address: 127.0.0.1:8080
upstreams: {u: {backends: [ws://h]}}
routes: [{upstream: u}]
admin:
  address: 127.0.0.1:8080
",
    );
    expect(
        &errors,
        5,
        "listeners[1].address",
        &["127.0.0.1:8080 is already used by listeners[0]"],
    );
    expect(
        &errors,
        4,
        "listeners[1].name",
        &["\"a\" is already used by listeners[0]"],
    );
    expect(
        &errors,
        9,
        "admin.address",
        &["already used by listeners[0]"],
    );
    assert_eq!(errors.len(), 3, "{errors:#?}");
}

#[test]
fn invalid_listener_address() {
    single(
        "listeners:\n  - address: localhost:8080\nupstreams: {u: {backends: [ws://h]}}\nroutes: [{upstream: u}]\n",
        2,
        "listeners[0].address",
        &[
            "invalid address \"localhost:8080\"",
            "127.0.0.1:8080",
            "not resolved",
        ],
    );
}

#[test]
fn duplicate_route_names() {
    let errors = errs(&format!(
        "{MINIMAL}    name: x\n    match: {{path_prefix: /a}}\n  - name: x\n    upstream: rooms\n"
    ));
    expect(
        &errors,
        11,
        "routes[1].name",
        &["route name \"x\" is already used by routes[0]"],
    );
    assert_eq!(errors.len(), 1);
}

#[test]
fn unknown_upstream_lists_the_known_ones() {
    single(
        "\
listeners: [{address: 127.0.0.1:1}]
upstreams:
  rooms: {backends: [ws://a]}
  echo: {backends: [ws://b]}
routes:
  - upstream: room
",
        6,
        "routes[0].upstream",
        &["unknown upstream \"room\" (expected one of: rooms, echo)"],
    );
}

#[test]
fn broken_upstream_is_still_a_known_name() {
    let errors = errs(
        "listeners: [{address: 127.0.0.1:1}]\nupstreams:\n  u:\n    backends: [nope]\nroutes: [{upstream: u}]\n",
    );
    expect(
        &errors,
        4,
        "upstreams.u.backends[0]",
        &["invalid backend URL"],
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");
}

#[test]
fn sticky_needs_exactly_one_source() {
    let errors = errs(&format!(
        "{MINIMAL}    sticky: {{}}\n  - upstream: rooms\n    match: {{path_prefix: /x}}\n    sticky:\n      query: a\n      header: b\n"
    ));
    expect(
        &errors,
        9,
        "routes[0].sticky",
        &["exactly one of: path, query, header, cookie, client_ip, claim (found none)"],
    );
    expect(
        &errors,
        12,
        "routes[1].sticky",
        &["(found query and header)"],
    );
    assert_eq!(errors.len(), 2, "{errors:#?}");
}

#[test]
fn sticky_values_are_checked() {
    let source = [
        MINIMAL,
        "    sticky: {client_ip: false}\n",
        "  - upstream: rooms\n    match: {path_prefix: /h}\n    sticky: {header: \"X Room\"}\n",
        "  - upstream: rooms\n    match: {path_prefix: /c}\n    sticky: {cookie: \"a;b\"}\n",
        "  - upstream: rooms\n    match: {path_prefix: /q}\n    sticky: {query: \"a=b\"}\n",
    ]
    .concat();
    let errors = errs(&source);
    expect(
        &errors,
        9,
        "routes[0].sticky.client_ip",
        &["selects no key"],
    );
    expect(
        &errors,
        12,
        "routes[1].sticky.header",
        &["invalid header name"],
    );
    expect(
        &errors,
        15,
        "routes[2].sticky.cookie",
        &["invalid cookie name"],
    );
    expect(
        &errors,
        18,
        "routes[3].sticky.query",
        &["invalid query parameter name"],
    );
    assert_eq!(errors.len(), 4, "{errors:#?}");
}

#[test]
fn sticky_path_placeholder_rules() {
    let cases: &[(&str, &str, &[&str])] = &[
        ("/rooms/room", "/", &["no {placeholder}"]),
        ("/{a}/{b}", "/", &["2 placeholders", "exactly one"]),
        ("/rooms/x{room}", "/", &["\"x{room}\" is not a placeholder"]),
        ("/rooms/{}", "/", &["is not a placeholder"]),
        ("rooms/{room}", "/", &["must start with '/'"]),
        (
            "/rooms/{room}",
            "/chat/",
            &[
                "does not fit match.path_prefix \"/chat/\"",
                "\"rooms\" as segment 0",
            ],
        ),
        (
            "/{room}",
            "/rooms/",
            &["segment 0", "fixes to \"rooms\"", "same key"],
        ),
        ("/rooms/{room}", "/ro/", &["does not fit"]),
    ];
    for (pattern, prefix, needles) in cases {
        let source = format!(
            "{MINIMAL}    match:\n      path_prefix: {prefix}\n    sticky:\n      path: \"{pattern}\"\n"
        );
        let errors = errs(&source);
        expect(&errors, 12, "routes[0].sticky.path", needles);
        assert_eq!(errors.len(), 1, "{pattern}: {errors:#?}");
    }
    // Prefixes that agree with the pattern, fully or partly.
    for prefix in ["/", "/ro", "/rooms", "/rooms/", "/rooms/a"] {
        ok(&format!(
            "{MINIMAL}    match:\n      path_prefix: {prefix}\n    sticky:\n      path: \"/rooms/{{room}}\"\n"
        ));
    }
}

#[test]
fn sticky_and_sticky_cookie_exclude_each_other() {
    single(
        &format!("{MINIMAL}    sticky: {{query: r}}\n    sticky_cookie:\n      name: c\n"),
        10,
        "routes[0].sticky_cookie",
        &["either sticky", "not both"],
    );
}

#[test]
fn sticky_cookie_checks() {
    single(
        &format!("{MINIMAL}    sticky_cookie:\n      name: \"bad name\"\n"),
        10,
        "routes[0].sticky_cookie.name",
        &["invalid cookie name \"bad name\""],
    );
    let errors = errors_of(&format!(
        "{MINIMAL}    sticky_cookie: {{name: c, max_age: 401d}}\n"
    ));
    assert!(
        errors.contains("must be at most 400d (or \"off\"), found 401d"),
        "{errors}"
    );
    let config = ok(&format!(
        "{MINIMAL}    sticky_cookie: {{name: c, max_age: 400d}}\n"
    ));
    assert_eq!(
        config.routes[0].sticky_cookie.as_ref().unwrap().max_age,
        Some(Duration::from_secs(400 * 86_400))
    );
    // Like every timer, 0 means off: a session cookie, not an already expired one.
    for off in ["off", "0"] {
        let config = ok(&format!(
            "{MINIMAL}    sticky_cookie: {{name: c, max_age: {off}}}\n"
        ));
        assert_eq!(
            config.routes[0].sticky_cookie.as_ref().unwrap().max_age,
            None
        );
    }
}

#[test]
fn sticky_cookie_same_site_and_secure() {
    let cookie = |extra: &str| {
        ok(&format!("{MINIMAL}    sticky_cookie: {{name: c{extra}}}\n")).routes[0]
            .sticky_cookie
            .clone()
            .unwrap()
    };
    let default = cookie("");
    assert_eq!((default.same_site, default.secure), (SameSite::Lax, None));
    assert!(
        default.is_secure(true) && !default.is_secure(false),
        "Secure on TLS only"
    );
    let strict = cookie(", same_site: Strict, secure: true");
    assert_eq!(strict.same_site, SameSite::Strict);
    assert!(strict.is_secure(false));
    assert!(!cookie(", secure: false").is_secure(true));
    let none = cookie(", same_site: none");
    assert!(none.is_secure(false), "SameSite=None always has Secure");
    let errors = errors_of(&format!(
        "{MINIMAL}    sticky_cookie: {{name: c, same_site: none, secure: false}}\n"
    ));
    assert!(errors.contains("same_site: none needs secure"), "{errors}");
    let errors = errors_of(&format!(
        "{MINIMAL}    sticky_cookie: {{name: c, same_site: loose}}\n"
    ));
    assert!(
        errors.contains("expected strict, lax or none, got \"loose\""),
        "{errors}"
    );
}

#[test]
fn weight_bounds() {
    let source = |w: &str| {
        format!(
            "listeners: [{{address: 127.0.0.1:1}}]\nupstreams:\n  u:\n    backends:\n      - url: ws://a\n        weight: {w}\nroutes: [{{upstream: u}}]\n"
        )
    };
    for bad in ["0", "1001", "-1"] {
        single(
            &source(bad),
            6,
            "upstreams.u.backends[0].weight",
            &["between 1 and 1000", bad],
        );
    }
    single(
        &source("1.5"),
        6,
        "upstreams.u.backends[0].weight",
        &["whole number"],
    );
    assert_eq!(ok(&source("1")).upstreams[0].backends[0].weight, 1);
    assert_eq!(ok(&source("1000")).upstreams[0].backends[0].weight, 1000);
}

#[test]
fn backend_url_problems() {
    let cases: &[(&str, &str)] = &[
        ("http://a", "use ws:// for http://"),
        ("https://a", "use wss:// for https://"),
        ("tcp://a", "must be ws:// or wss://, found tcp://"),
        ("127.0.0.1:9001", "expected ws://host[:port][/path]"),
        ("ws://", "missing host"),
        ("ws://:80", "invalid host"),
        ("ws://a:0", "invalid port \"0\""),
        ("ws://a:99999", "invalid port"),
        ("ws://a:", "invalid port \"\""),
        ("ws://a/x?y=1", "cannot have a query"),
        ("ws://a/#f", "cannot have a fragment"),
        ("ws://u:p@a", "credentials"),
        ("ws://[::1", "unclosed '['"),
        ("ws://[zz]:1", "invalid IPv6 address"),
        ("ws://a b", "contains ' '"),
        ("ws://a..b", "empty label"),
    ];
    for (url, needle) in cases {
        let source = format!(
            "listeners: [{{address: 127.0.0.1:1}}]\nupstreams:\n  u:\n    backends:\n      - \"{url}\"\nroutes: [{{upstream: u}}]\n"
        );
        single(
            &source,
            5,
            "upstreams.u.backends[0]",
            &["invalid backend URL", needle],
        );
    }
}

#[test]
fn backend_url_parts() {
    let config = ok("\
listeners: [{address: 127.0.0.1:1}]
upstreams:
  u:
    backends:
      - ws://a.example
      - WSS://b.example:8443/
      - ws://c/x/y//
      - ws://[2001:db8::1]:81/p
routes: [{upstream: u}]
");
    let parts: Vec<_> = config.upstreams[0]
        .backends
        .iter()
        .map(|b| (b.secure, b.host.as_str(), b.port, b.base_path.as_str()))
        .collect();
    assert_eq!(
        parts,
        [
            (false, "a.example", 80, ""),
            (true, "b.example", 8443, ""),
            (false, "c", 80, "/x/y"),
            (false, "2001:db8::1", 81, "/p"),
        ]
    );
}

#[test]
fn duplicate_backends() {
    single(
        "listeners: [{address: 127.0.0.1:1}]\nupstreams:\n  u:\n    backends:\n      - ws://a:80\n      - ws://A/\nroutes: [{upstream: u}]\n",
        6,
        "upstreams.u.backends[1]",
        &["already listed as backends[0]", "weight"],
    );
}

// ----- health checks -----

/// MINIMAL with `upstream` (YAML at upstream-key indentation) added to upstream `rooms`,
/// starting at line 7.
fn with_upstream_keys(upstream: &str) -> String {
    let mut yaml = String::from(
        "listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  rooms:\n    backends:\n      - ws://127.0.0.1:9001\n",
    );
    for line in upstream.lines() {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml.push_str("routes:\n  - upstream: rooms\n");
    yaml
}

#[test]
fn health_check_keys_and_defaults() {
    let config = ok(&with_upstream_keys("health_check: {}"));
    assert_eq!(config.upstreams[0].health_check, Some(HealthCheck::DEFAULT));
    assert_eq!(
        HealthCheck::DEFAULT,
        HealthCheck {
            kind: HealthCheckKind::Tcp,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            healthy_threshold: 1,
            unhealthy_threshold: 2,
        }
    );
    let config = ok(&with_upstream_keys(
        "\
health_check:
  kind: websocket
  path: /health?probe=1
  interval: 250ms
  timeout: 1s
  healthy_threshold: 3
  unhealthy_threshold: 100
passive_health:
  backoff: 1s
  max_backoff: 30s",
    ));
    let upstream = &config.upstreams[0];
    assert_eq!(
        upstream.health_check,
        Some(HealthCheck {
            kind: HealthCheckKind::WebSocket {
                path: "/health?probe=1".into()
            },
            interval: Duration::from_millis(250),
            timeout: Duration::from_secs(1),
            healthy_threshold: 3,
            unhealthy_threshold: 100,
        })
    );
    assert_eq!(
        upstream.passive_health,
        Some(PassiveHealth {
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        })
    );
    let websocket = ok(&with_upstream_keys("health_check: {kind: websocket}"));
    assert_eq!(
        websocket.upstreams[0].health_check.as_ref().unwrap().kind,
        HealthCheckKind::WebSocket { path: "/".into() }
    );
}

#[test]
fn passive_health_can_be_turned_off_or_tuned_alone() {
    let off = ok(&with_upstream_keys("passive_health: off"));
    assert_eq!(off.upstreams[0].passive_health, None);
    // A long first back-off raises the default maximum instead of contradicting it.
    let long = ok(&with_upstream_keys("passive_health: {backoff: 5m}"));
    assert_eq!(
        long.upstreams[0].passive_health,
        Some(PassiveHealth {
            backoff: Duration::from_secs(300),
            max_backoff: Duration::from_secs(300),
        })
    );
    let short_max = ok(&with_upstream_keys("passive_health: {max_backoff: 30s}"));
    assert_eq!(
        short_max.upstreams[0].passive_health.unwrap().max_backoff,
        Duration::from_secs(30)
    );
}

#[test]
fn health_check_errors_point_at_their_key() {
    let errors = errs(&with_upstream_keys(
        "\
health_check:
  kind: http
  intervall: 5s
  interval: 5
  timeout: off
  healthy_threshold: 0
  unhealthy_threshold: 101",
    ));
    expect(
        &errors,
        8,
        "upstreams.rooms.health_check.kind",
        &["tcp or websocket", "\"http\""],
    );
    expect(
        &errors,
        9,
        "upstreams.rooms.health_check.intervall",
        &["unknown key", "kind, path, interval, timeout"],
    );
    expect(
        &errors,
        10,
        "upstreams.rooms.health_check.interval",
        &["\"5s\""],
    );
    expect(
        &errors,
        11,
        "upstreams.rooms.health_check.timeout",
        &["cannot be disabled"],
    );
    expect(
        &errors,
        12,
        "upstreams.rooms.health_check.healthy_threshold",
        &["between 1 and 100, found 0"],
    );
    expect(
        &errors,
        13,
        "upstreams.rooms.health_check.unhealthy_threshold",
        &["between 1 and 100, found 101"],
    );
    assert_eq!(errors.len(), 6, "{errors:#?}");

    single(
        &with_upstream_keys("health_check:\n  path: /health"),
        8,
        "upstreams.rooms.health_check.path",
        &["only to kind: websocket"],
    );
    single(
        &with_upstream_keys("health_check:\n  kind: tcp\n  path: /health"),
        9,
        "upstreams.rooms.health_check.path",
        &["only to kind: websocket"],
    );
    for bad in ["health", "\"/a b\"", "\"/a#b\""] {
        single(
            &with_upstream_keys(&format!("health_check:\n  kind: websocket\n  path: {bad}")),
            9,
            "upstreams.rooms.health_check.path",
            &["health check path"],
        );
    }
    single(
        &with_upstream_keys("health_check: yes"),
        7,
        "upstreams.rooms.health_check",
        &["expected a mapping with kind"],
    );
}

#[test]
fn passive_health_errors_point_at_their_key() {
    single(
        &with_upstream_keys("passive_health:\n  backoff: 1m\n  max_backoff: 30s"),
        9,
        "upstreams.rooms.passive_health.max_backoff",
        &["max_backoff (30s) is shorter than backoff (1m)"],
    );
    single(
        &with_upstream_keys("passive_health:\n  max_backoff: 5s"),
        8,
        "upstreams.rooms.passive_health.max_backoff",
        &["shorter than backoff (10s, the default)"],
    );
    single(
        &with_upstream_keys("passive_health:\n  backoff: 0"),
        8,
        "upstreams.rooms.passive_health.backoff",
        &["cannot be disabled"],
    );
    single(
        &with_upstream_keys("passive_health:\n  backof: 1s"),
        8,
        "upstreams.rooms.passive_health.backof",
        &["unknown key", "backoff, max_backoff"],
    );
    single(
        &with_upstream_keys("passive_health: false"),
        7,
        "upstreams.rooms.passive_health",
        &["\"off\" or a mapping", "the boolean false"],
    );
}

#[test]
fn describe_shows_health_checks() {
    let text = describe(&ok(&with_upstream_keys(
        "health_check: {kind: websocket, path: /h, interval: 1s}\npassive_health: off",
    )));
    assert!(
        text.contains(
            "health check: websocket handshake on /h every 1s (timeout 2s), out after 2 failures, back after 1 success"
        ),
        "{text}"
    );
    assert!(text.contains("passive health: off"), "{text}");
    let text = describe(&ok(MINIMAL));
    assert!(text.contains("health check: none"), "{text}");
    assert!(
        text.contains("passive health: off (a single backend"),
        "{text}"
    );
    let two = MINIMAL.replace(
        "      - ws://127.0.0.1:9001\n",
        "      - ws://127.0.0.1:9001\n      - ws://127.0.0.1:9002\n",
    );
    let text = describe(&ok(&two));
    assert!(
        text.contains("passive health: out for 10s after a failed connect, doubling up to 2m"),
        "{text}"
    );
}

#[test]
fn upstream_tls_needs_a_wss_backend() {
    single(
        "listeners: [{address: 127.0.0.1:1}]\nupstreams:\n  u:\n    backends: [ws://a]\n    tls:\n      server_name: a\nroutes: [{upstream: u}]\n",
        5,
        "upstreams.u.tls",
        &["only to wss:// backends"],
    );
}

#[test]
fn invalid_names() {
    let errors = errs(
        "listeners: [{name: \"a b\", address: 127.0.0.1:1}]\nupstreams:\n  \"u/1\": {backends: [ws://a]}\nroutes: [{upstream: \"u/1\", name: \"\"}]\n",
    );
    expect(&errors, 1, "listeners[0].name", &["invalid name \"a b\""]);
    expect(&errors, 3, "upstreams[\"u/1\"]", &["invalid name \"u/1\""]);
    expect(&errors, 4, "routes[0].name", &["must not be empty"]);
    assert_eq!(errors.len(), 3, "{errors:#?}");
}

#[test]
fn tls_without_certificates() {
    let base = "upstreams: {u: {backends: [ws://h]}}\nroutes: [{upstream: u}]\n";
    single(
        &format!("listeners:\n  - address: 127.0.0.1:1\n    tls:\n      certificates: []\n{base}"),
        4,
        "listeners[0].tls.certificates",
        &["empty", "certificates"],
    );
    single(
        &format!("listeners:\n  - address: 127.0.0.1:1\n    tls: {{}}\n{base}"),
        3,
        "listeners[0].tls.certificates",
        &["required key is missing"],
    );
    single(
        &format!("listeners:\n  - address: 127.0.0.1:1\n    tls:\n{base}"),
        3,
        "listeners[0].tls",
        &["expected a mapping with certificates", "empty value"],
    );
}

#[test]
fn certificate_checks() {
    let errors = errs(
        "\
listeners:
  - address: 127.0.0.1:1
    tls:
      certificates:
        - cert: a.crt
          server_names:
            - a.example
            - \"bad host:443\"
            - \"a.*.example\"
        - cert: b.crt
          key: b.key
          server_names: [A.example]
upstreams: {u: {backends: [ws://h]}}
routes: [{upstream: u}]
",
    );
    expect(
        &errors,
        5,
        "listeners[0].tls.certificates[0].key",
        &["required key is missing", "private key"],
    );
    expect(
        &errors,
        8,
        "listeners[0].tls.certificates[0].server_names[1]",
        &["without a port"],
    );
    expect(
        &errors,
        9,
        "listeners[0].tls.certificates[0].server_names[2]",
        &["wildcard must be a whole first label"],
    );
    assert_eq!(errors.len(), 3, "{errors:#?}");
    // The same name on two certificates: the second could never be chosen by SNI.
    single(
        "listeners:\n  - address: 127.0.0.1:1\n    tls:\n      certificates:\n        - {cert: a, key: a, server_names: [x.example]}\n        - cert: b\n          key: b\n          server_names: [X.example]\nroutes: [{upstream: u}]\nupstreams: {u: {backends: [ws://h]}}\n",
        8,
        "listeners[0].tls.certificates[1].server_names[0]",
        &["\"x.example\" is already listed by certificates[0]"],
    );
}

#[test]
fn route_match_checks() {
    let errors = errs(&format!(
        "{MINIMAL}    match:\n      host: chat.example.com:443\n      path_prefix: rooms\n  - upstream: rooms\n    match: {{path_prefix: \"/a?b\"}}\n"
    ));
    expect(&errors, 10, "routes[0].match.host", &["without a port"]);
    expect(
        &errors,
        11,
        "routes[0].match.path_prefix",
        &["must start with '/'"],
    );
    expect(
        &errors,
        13,
        "routes[1].match.path_prefix",
        &["must not contain '?'"],
    );
    assert_eq!(errors.len(), 3, "{errors:#?}");
}

#[test]
fn shadowed_routes_are_errors() {
    let errors = errs(
        "\
listeners: [{address: 127.0.0.1:1}]
upstreams: {u: {backends: [ws://h]}}
routes:
  - name: all
    upstream: u
  - name: rooms
    match:
      path_prefix: /rooms/
    upstream: u
",
    );
    expect(
        &errors,
        7,
        "routes[1].match",
        &["can never match", "route \"all\"", "host any", "\"/\""],
    );
    assert_eq!(errors.len(), 1);
    // Different hosts, or a more specific route first, are fine.
    ok("\
listeners: [{address: 127.0.0.1:1}]
upstreams: {u: {backends: [ws://h]}}
routes:
  - {name: a, upstream: u, match: {host: a.example, path_prefix: /}}
  - {name: b, upstream: u, match: {host: b.example}}
  - {name: c, upstream: u, match: {path_prefix: /x/}}
  - {name: d, upstream: u, match: {path_prefix: /x}}
  - {name: e, upstream: u}
");
    single(
        "\
listeners: [{address: 127.0.0.1:1}]
upstreams: {u: {backends: [ws://h]}}
routes:
  - {name: a, upstream: u, match: {host: a.example, path_prefix: /x}}
  - {name: b, upstream: u, match: {host: a.example, path_prefix: /x/y}}
",
        5,
        "routes[1].match",
        &["route \"a\"", "host a.example"],
    );
}

#[test]
fn wildcard_hosts_shadow_their_subdomains_only() {
    let table = |hosts: &[&str]| {
        let routes: String = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| format!("  - {{name: r{i}, upstream: u, match: {{host: \"{h}\"}}}}\n"))
            .collect();
        format!(
            "listeners: [{{address: 127.0.0.1:1}}]\nupstreams: {{u: {{backends: [ws://h]}}}}\nroutes:\n{routes}"
        )
    };
    for later in [
        "a.example.com",
        "*.a.example.com",
        "*.example.com",
        "A.Example.com",
    ] {
        single(
            &table(&["*.example.com", later]),
            5,
            "routes[1].match",
            &["can never match", "route \"r0\"", "host *.example.com"],
        );
    }
    // The wildcard does not cover the bare domain, nor a name that only ends alike.
    ok(&table(&[
        "*.example.com",
        "example.com",
        "badexample.com",
        "*.other.com",
    ]));
    ok(&table(&["a.example.com", "*.example.com"]));
}

#[test]
fn ipv6_route_hosts_are_stored_without_brackets() {
    let config = ok(&format!(
        "{MINIMAL}    match: {{host: \"[::1]\"}}\n  - upstream: rooms\n    match: {{host: \"FE80::1\"}}\n"
    ));
    assert_eq!(config.routes[0].host.as_deref(), Some("::1"));
    assert_eq!(config.routes[1].host.as_deref(), Some("fe80::1"));
}

#[test]
fn origins() {
    let errors = errs(&format!(
        "{MINIMAL}    allowed_origins:\n      - https://ok.example\n      - https://a.example/\n      - a.example\n      - \"*\"\n      - https://a.example:99999\n"
    ));
    expect(
        &errors,
        11,
        "routes[0].allowed_origins[1]",
        &["has no path"],
    );
    expect(
        &errors,
        12,
        "routes[0].allowed_origins[2]",
        &["scheme://host[:port]"],
    );
    expect(
        &errors,
        13,
        "routes[0].allowed_origins[3]",
        &["leave allowed_origins out"],
    );
    expect(
        &errors,
        14,
        "routes[0].allowed_origins[4]",
        &["invalid port"],
    );
    assert_eq!(errors.len(), 4, "{errors:#?}");
    let config = ok(&format!(
        "{MINIMAL}    allowed_origins: [\"http://[::1]:3000\", null://x]\n"
    ));
    assert_eq!(
        config.routes[0].allowed_origins,
        ["http://[::1]:3000", "null://x"]
    );
}

// ----- durations and sizes: both sides of every bound -----

#[test]
fn timer_bounds() {
    let source = |key: &str, value: &str| format!("{MINIMAL}timeouts:\n  {key}: {value}\n");
    for key in ["handshake", "pong_timeout", "body"] {
        for zero in ["0", "\"0s\"", "off"] {
            single(
                &source(key, zero),
                10,
                &format!("timeouts.{key}"),
                &["cannot be disabled"],
            );
        }
        ok(&source(key, "1ms"));
        ok(&source(key, "24h"));
        single(
            &source(key, "1441m"),
            10,
            &format!("timeouts.{key}"),
            &["at most 1d, found 1441m"],
        );
    }
    ok(&source("body_total", "off"));
    ok(&source("body_total", "10m"));
    for key in ["idle", "ping_interval", "body_total"] {
        single(
            &source(key, "25h"),
            10,
            &format!("timeouts.{key}"),
            &["at most 1d", "or \"off\""],
        );
    }
    ok(&source("close", "0"));
    single(
        &source("close", "off"),
        10,
        "timeouts.close",
        &["cannot be disabled"],
    );
    single(
        &source("handshake", "10"),
        10,
        "timeouts.handshake",
        &["needs a unit", "\"10s\""],
    );
    single(
        &source("handshake", "ten"),
        10,
        "timeouts.handshake",
        &["invalid duration \"ten\"", "\"500ms\""],
    );
    single(
        &source("handshake", "1.5s"),
        10,
        "timeouts.handshake",
        &["unknown unit"],
    );
    single(
        &source("handshake", "true"),
        10,
        "timeouts.handshake",
        &["expected a duration", "boolean true"],
    );
}

#[test]
fn connect_timeout_cannot_be_disabled() {
    let source = |v: &str| {
        format!(
            "listeners: [{{address: 127.0.0.1:1}}]\nupstreams:\n  u:\n    backends: [ws://h]\n    connect_timeout: {v}\nroutes: [{{upstream: u}}]\n"
        )
    };
    single(
        &source("0"),
        5,
        "upstreams.u.connect_timeout",
        &["cannot be disabled"],
    );
    single(
        &source("off"),
        5,
        "upstreams.u.connect_timeout",
        &["cannot be disabled"],
    );
    assert_eq!(
        ok(&source("1ms")).upstreams[0].connect_timeout,
        Duration::from_millis(1)
    );
}

#[test]
fn size_bounds() {
    let source = |key: &str, value: &str| format!("{MINIMAL}limits:\n  {key}: {value}\n");
    single(
        &source("max_header_bytes", "1023"),
        10,
        "limits.max_header_bytes",
        &["between 1KiB and 1MiB, found 1023B"],
    );
    single(
        &source("max_header_bytes", "1025KiB"),
        10,
        "limits.max_header_bytes",
        &["found 1025KiB"],
    );
    assert_eq!(
        ok(&source("max_header_bytes", "1KiB"))
            .limits
            .max_header_bytes,
        1024
    );
    assert_eq!(
        ok(&source("max_header_bytes", "1MiB"))
            .limits
            .max_header_bytes,
        1 << 20
    );

    single(
        &source("max_frame", "0"),
        10,
        "limits.max_frame",
        &["between 1B and"],
    );
    assert_eq!(ok(&source("max_frame", "1")).limits.max_frame, 1);
    let max = i64::MAX as u64;
    let config = ok(&format!(
        "{MINIMAL}limits:\n  max_frame: {max}\n  max_message: {max}\n"
    ));
    assert_eq!(config.limits.max_message, max);
    single(
        &source("max_message", "8388608TiB"),
        10,
        "limits.max_message",
        &["between", "found 8388608TiB"],
    );
    single(
        &source("max_frame", "-5"),
        10,
        "limits.max_frame",
        &["cannot be negative"],
    );
    single(
        &source("max_frame", "16MB"),
        10,
        "limits.max_frame",
        &["unknown unit \"MB\""],
    );
    single(
        &source("max_frame", "[1]"),
        10,
        "limits.max_frame",
        &["expected a size in bytes", "found a list"],
    );

    single(
        &source("max_connections", "0"),
        10,
        "limits.max_connections",
        &["between 1 and 4294967295, found 0"],
    );
    single(
        &source("max_connections", "4294967296"),
        10,
        "limits.max_connections",
        &["between 1"],
    );
    assert_eq!(
        ok(&source("max_connections", "4294967295"))
            .limits
            .max_connections,
        u32::MAX
    );
}

#[test]
fn max_message_below_max_frame_names_both() {
    single(
        &format!("{MINIMAL}limits:\n  max_frame: 1MiB\n  max_message: 512KiB\n"),
        11,
        "limits.max_message",
        &["max_message (512KiB)", "max_frame (1MiB)"],
    );
    // Only max_frame set, above the default max_message: max_frame is to blame.
    single(
        &format!("{MINIMAL}limits:\n  max_frame: 128MiB\n"),
        10,
        "limits.max_frame",
        &["max_message (64MiB, the default)", "max_frame (128MiB)"],
    );
    // A route inheriting the other value says where it comes from.
    let errors = errs(&format!(
        "{MINIMAL}    limits:\n      max_message: 1KiB\nlimits:\n  max_frame: 4KiB\n"
    ));
    expect(
        &errors,
        10,
        "routes[0].limits.max_message",
        &[
            "max_message (1KiB)",
            "max_frame (4KiB, from the top-level limits)",
        ],
    );
    assert_eq!(errors.len(), 1);
    // A broken top level is reported once, not again for every route inheriting it.
    let errors = errs(&format!(
        "{MINIMAL}    limits:\n      max_connections: 5\nlimits:\n  max_message: 1KiB\n"
    ));
    expect(
        &errors,
        12,
        "limits.max_message",
        &["smaller than max_frame"],
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");
    // Routes merge over the top-level values as written, even when those are rejected.
    let errors = errs(&format!(
        "{MINIMAL}    limits:\n      max_frame: 512KiB\nlimits:\n  max_frame: 2MiB\n  max_message: 1MiB\n"
    ));
    expect(
        &errors,
        13,
        "limits.max_message",
        &["smaller than max_frame"],
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");
}
#[test]
fn route_level_timer_errors() {
    single(
        &format!("{MINIMAL}    timeouts:\n      pong_timeout: 0\n"),
        10,
        "routes[0].timeouts.pong_timeout",
        &["cannot be disabled"],
    );
}

#[test]
fn many_errors_are_reported_together() {
    let source = "\
listeners:
  - address: 127.0.0.1:8080
  - address: 127.0.0.1:8080
upstreams:
  rooms:
    backends:
      - url: ws://127.0.0.1:9001
        weight: 0
routes:
  - name: a
    upstream: room
    sticky:
      path: /rooms/
timeouts:
  handshake: 0
limits:
  max_frame: 2MiB
  max_message: 1MiB
  extra: 1
";
    let errors = errs(source);
    expect(&errors, 3, "listeners[1].address", &["already used"]);
    expect(
        &errors,
        8,
        "upstreams.rooms.backends[0].weight",
        &["between 1 and 1000"],
    );
    expect(
        &errors,
        11,
        "routes[0].upstream",
        &["unknown upstream \"room\" (expected one of: rooms)"],
    );
    expect(&errors, 13, "routes[0].sticky.path", &["no {placeholder}"]);
    expect(&errors, 15, "timeouts.handshake", &["cannot be disabled"]);
    expect(
        &errors,
        18,
        "limits.max_message",
        &["smaller than max_frame"],
    );
    expect(&errors, 19, "limits.extra", &["unknown key"]);
    assert_eq!(errors.len(), 7, "{errors:#?}");
    let text = ConfigErrors { errors }.to_string();
    assert_eq!(text.lines().count(), 7);
    assert!(text.lines().all(|l| l.starts_with("t.yaml:")), "{text}");
}

#[test]
fn flow_style_falls_back_to_the_nearest_line() {
    let errors = errs(
        "listeners: [{address: 127.0.0.1:1}]\nupstreams: {u: {backends: [{url: ws://h, weight: 0}]}}\nroutes: [{upstream: u}]\n",
    );
    expect(
        &errors,
        2,
        "upstreams.u.backends[0].weight",
        &["between 1 and 1000"],
    );
}

// ----- describe -----

#[test]
fn describe_shows_the_resolved_config() {
    let config = ok("\
listeners:
  - name: public
    address: 127.0.0.1:8080
  - name: secure
    address: 127.0.0.1:8443
    tls:
      certificates:
        - {cert: a.crt, key: a.key, server_names: [localhost]}
upstreams:
  rooms:
    backends:
      - {url: ws://127.0.0.1:9101, weight: 3}
      - ws://127.0.0.1:9102
routes:
  - name: rooms
    match: {host: chat.example.com, path_prefix: /rooms/}
    upstream: rooms
    sticky: {path: \"/rooms/{room}\"}
    allowed_origins: [https://chat.example.com]
    limits: {max_message: 1MiB, max_frame: 1MiB}
  - name: app
    upstream: rooms
    sticky_cookie: {name: aff, max_age: 1h}
admin: {address: 127.0.0.1:9090}
");
    let text = describe(&config);
    for needle in [
        "public: 127.0.0.1:8080, no TLS",
        "secure: 127.0.0.1:8443, TLS (1 certificate)",
        "localhost [default]: a.crt + key a.key",
        "rooms: connect_timeout 5s",
        "ws://127.0.0.1:9101 weight 3 (75%)",
        "ws://127.0.0.1:9102 weight 1 (25%)",
        "[0] rooms: host chat.example.com path /rooms/* -> rooms",
        "sticky: path segment 1 of /rooms/{room}",
        "origins: https://chat.example.com",
        "max_frame 1MiB, max_message 1MiB, max_connections 9000",
        "[1] app: host any path /* -> rooms",
        "sticky: cookie aff set by the gateway (max_age 1h)",
        "origins: any",
        "compression: strip, pings: answered per hop",
        "handshake 10s, idle off, ping_interval 30s, pong_timeout 10s, close 5s, body 1m, body_total off",
        "limits: max_frame 16MiB, max_message 64MiB, max_connections 9000, max_header_bytes 16KiB",
        "compression_memory 256MiB",
        "admin: 127.0.0.1:9090",
        "drain: readiness_delay 5s, spread 15s, deadline 25s",
        "rebalance: moved sticky keys closed with 1012 over 10s after reloads and health changes",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

/// Breaks one value at a time in the fully commented example and checks that the error
/// lands on that value's line: the line index against a realistic file.
#[test]
fn errors_in_the_full_example_land_on_the_right_line() {
    let full = include_str!("../../config/examples/full.yaml");
    let cases = [
        ("name: public", "name: \"pub lic\"", "listeners[0].name"),
        (
            "address: \"[::]:8443\"",
            "address: \"[::]:x\"",
            "listeners[1].address",
        ),
        (
            "cert: ../../certs/localhost.crt",
            "cert: \"\"",
            "listeners[1].tls.certificates[0].cert",
        ),
        (
            "- \"*.example.test\"",
            "- \"*.example.test:1\"",
            "listeners[1].tls.certificates[1].server_names[1]",
        ),
        (
            "weight: 2",
            "weight: 2000",
            "upstreams.rooms.backends[0].weight",
        ),
        (
            "- ws://10.0.0.23:9101",
            "- ws://10.0.0.23:9101?x",
            "upstreams.rooms.backends[2]",
        ),
        (
            "connect_timeout: 3s",
            "connect_timeout: 3",
            "upstreams.rooms.connect_timeout",
        ),
        (
            "kind: websocket",
            "kind: ws",
            "upstreams.rooms.health_check.kind",
        ),
        (
            "path: /health",
            "path: health",
            "upstreams.rooms.health_check.path",
        ),
        (
            "interval: 5s",
            "interval: 5",
            "upstreams.rooms.health_check.interval",
        ),
        (
            "      timeout: 2s",
            "      timeout: 2",
            "upstreams.rooms.health_check.timeout",
        ),
        (
            "unhealthy_threshold: 2",
            "unhealthy_threshold: 0",
            "upstreams.rooms.health_check.unhealthy_threshold",
        ),
        (
            "healthy_threshold: 1",
            "healthy_threshold: x",
            "upstreams.rooms.health_check.healthy_threshold",
        ),
        (
            "backoff: 10s",
            "backoff: 10",
            "upstreams.rooms.passive_health.backoff",
        ),
        (
            "max_backoff: 2m",
            "max_backoff: 1s",
            "upstreams.rooms.passive_health.max_backoff",
        ),
        (
            "server_name: echo.internal",
            "server_name: \"echo internal\"",
            "upstreams.secure-echo.tls.server_name",
        ),
        (
            "host: chat.example.test",
            "host: chat.example.test:80",
            "routes[0].match.host",
        ),
        (
            "      path: \"/rooms/{room}\"",
            "      path: \"/rooms/room\"",
            "routes[0].sticky.path",
        ),
        (
            "- http://localhost:3000",
            "- http://localhost:3000/",
            "routes[0].allowed_origins[1]",
        ),
        ("idle: 10m", "idle: 10x", "routes[0].timeouts.idle"),
        (
            "max_frame: 256KiB",
            "max_frame: 0",
            "routes[0].limits.max_frame",
        ),
        (
            "header: X-Tenant",
            "header: \"X Tenant\"",
            "routes[1].sticky.header",
        ),
        (
            "upstream: secure-echo",
            "upstream: echo",
            "routes[2].upstream",
        ),
        (
            "ping_passthrough: true",
            "ping_passthrough: 1",
            "routes[2].ping_passthrough",
        ),
        (
            "max_age: 12h",
            "max_age: 12",
            "routes[3].sticky_cookie.max_age",
        ),
        (
            "pong_timeout: 10s",
            "pong_timeout: off",
            "timeouts.pong_timeout",
        ),
        (
            "max_header_bytes: 16KiB",
            "max_header_bytes: 2MiB",
            "limits.max_header_bytes",
        ),
        (
            "address: 127.0.0.1:9090",
            "address: 0.0.0.0:8080",
            "admin.address",
        ),
        ("deadline: 25s", "deadline: 25", "drain.deadline"),
        (
            "enabled: true\n  # Optional: moved keys",
            "enabled: yes please\n  # Optional: moved keys",
            "rebalance.enabled",
        ),
        ("window: 10s", "window: 10", "rebalance.window"),
        (
            "on_health_change: true",
            "on_health_change: 1",
            "rebalance.on_health_change",
        ),
    ];
    for (original, broken, path) in cases {
        assert_eq!(
            full.matches(original).count(),
            1,
            "{original:?} must be unique"
        );
        let line = full[..full.find(original).unwrap()].matches('\n').count() + 1;
        let errors = errs(&full.replace(original, broken));
        expect(&errors, line, path, &[]);
        assert_eq!(errors.len(), 1, "{broken}: {errors:#?}");
    }
}

// ----- sessions -----

#[test]
fn sessions_default_on_with_documented_limits() {
    let sessions = ok(MINIMAL).sessions;
    assert!(sessions.enabled);
    assert!(!sessions.instance.is_empty());
    assert_eq!(sessions.poll_timeout, Duration::from_secs(25));
    assert_eq!(sessions.timeout, Duration::from_secs(30));
    assert_eq!(sessions.buffer, 1 << 20);
    assert_eq!(sessions.max_sessions, 10_000);
    assert_eq!(sessions.max_batch, 1 << 20);
    assert_eq!(sessions.max_sessions_per_ip, 32);
    assert_eq!(sessions.open_rate, 10);
    assert_eq!(sessions.body_timeout, Duration::from_secs(10));
}

#[test]
fn sessions_are_configurable() {
    let source = format!(
        "{MINIMAL}sessions:\n  enabled: false\n  instance: gw-2.eu\n  poll_timeout: 10s\n  timeout: 1m\n  buffer: 64KiB\n  max_sessions: 5\n  max_batch: 8KiB\n  max_sessions_per_ip: 3\n  open_rate: 7\n  body_timeout: 2s\n"
    );
    let sessions = ok(&source).sessions;
    assert_eq!(
        (
            sessions.max_sessions_per_ip,
            sessions.open_rate,
            sessions.body_timeout
        ),
        (3, 7, Duration::from_secs(2))
    );
    assert!(!sessions.enabled);
    assert_eq!(sessions.instance, "gw-2.eu");
    assert_eq!(sessions.poll_timeout, Duration::from_secs(10));
    assert_eq!(sessions.timeout, Duration::from_secs(60));
    assert_eq!(
        (sessions.buffer, sessions.max_sessions, sessions.max_batch),
        (64 << 10, 5, 8 << 10)
    );
}

#[test]
fn bad_session_settings_are_reported_on_their_lines() {
    let base_lines = MINIMAL.lines().count();
    let source = format!(
        "{MINIMAL}sessions:\n  instance: \"gw 1\"\n  poll_timeout: off\n  buffer: 1KiB\n  max_sessions: 0\n  colour: blue\n  max_sessions_per_ip: 0\n  open_rate: 0\n  body_timeout: off\n"
    );
    let errors = errs(&source);
    expect(
        &errors,
        base_lines + 2,
        "sessions.instance",
        &["instance name", "\"gw 1\""],
    );
    expect(
        &errors,
        base_lines + 3,
        "sessions.poll_timeout",
        &["cannot be disabled"],
    );
    expect(&errors, base_lines + 4, "sessions.buffer", &["4KiB"]);
    expect(
        &errors,
        base_lines + 5,
        "sessions.max_sessions",
        &["between 1 and"],
    );
    expect(&errors, base_lines + 6, "sessions.colour", &[]);
    expect(
        &errors,
        base_lines + 7,
        "sessions.max_sessions_per_ip",
        &["between 1 and"],
    );
    expect(
        &errors,
        base_lines + 8,
        "sessions.open_rate",
        &["between 1 and"],
    );
    expect(
        &errors,
        base_lines + 9,
        "sessions.body_timeout",
        &["cannot be disabled"],
    );
}

#[test]
fn drain_settings_parse_and_must_fit_the_deadline() {
    let with = |value: &str| {
        format!("{MINIMAL}drain:\n  readiness_delay: 0s\n  spread: 0s\n  deadline: {value}\n")
    };
    assert_eq!(ok(&with("30s")).drain.deadline, Duration::from_secs(30));
    assert_eq!(ok(&with("0")).drain.deadline, Duration::ZERO);
    assert_eq!(ok(&with("\"0s\"")).drain.deadline, Duration::ZERO);
    assert_eq!(ok(&format!("{MINIMAL}drain: {{}}\n")).drain, Drain::DEFAULT);
    let drain = ok(&format!(
        "{MINIMAL}drain:\n  readiness_delay: 10s\n  spread: 1m\n  deadline: 90s\n"
    ))
    .drain;
    assert_eq!(
        (drain.readiness_delay, drain.spread, drain.deadline),
        (
            Duration::from_secs(10),
            Duration::from_secs(60),
            Duration::from_secs(90)
        )
    );
    single(&with("off"), 12, "drain.deadline", &["cannot be disabled"]);
    single(&with("25h"), 12, "drain.deadline", &["at most 1d"]);
    single(&with("10"), 12, "drain.deadline", &["needs a unit"]);
    single(
        &format!("{MINIMAL}drain:\n  spread: 5m\n"),
        9,
        "drain",
        &["readiness_delay (5s) plus spread (5m) exceed the deadline (25s)"],
    );
    single(
        &format!("{MINIMAL}drain:\n  deadlin: 5s\n"),
        10,
        "drain.deadlin",
        &["unknown key"],
    );
    single(
        &format!("{MINIMAL}drain: 5s\n"),
        9,
        "drain",
        &["expected a mapping with readiness_delay, spread and deadline"],
    );
}

#[test]
fn rebalance_settings_parse_and_errors_name_their_key() {
    let config = ok(&format!(
        "{MINIMAL}rebalance:\n  enabled: false\n  window: 0\n  on_health_change: false\n"
    ));
    assert_eq!(
        config.rebalance,
        Rebalance {
            enabled: false,
            window: Duration::ZERO,
            on_health_change: false,
        }
    );
    assert_eq!(
        ok(&format!("{MINIMAL}rebalance:\n  window: 2m\n"))
            .rebalance
            .window,
        Duration::from_secs(120)
    );
    let errors = errs(&format!(
        "{MINIMAL}rebalance:\n  enabled: 1\n  window: off\n  jitter: 5s\n"
    ));
    expect(&errors, 10, "rebalance.enabled", &["true or false"]);
    expect(&errors, 11, "rebalance.window", &["cannot be disabled"]);
    expect(&errors, 12, "rebalance.jitter", &["unknown key"]);
    assert_eq!(errors.len(), 3, "{errors:#?}");
}

#[test]
fn connect_retries_default_to_one_and_are_bounded() {
    let with = |extra: &str| {
        format!(
            "listeners:\n  - address: 127.0.0.1:8080\nupstreams:\n  app:\n    backends: [ws://127.0.0.1:9000]\nroutes:\n  - upstream: app\n{extra}"
        )
    };
    assert_eq!(ok(&with("")).routes[0].connect_retries, 1);
    assert_eq!(
        ok(&with("    connect_retries: 0\n")).routes[0].connect_retries,
        0
    );
    assert_eq!(
        ok(&with("    connect_retries: 3\n")).routes[0].connect_retries,
        3
    );
    single(
        &with("    connect_retries: 4\n"),
        8,
        "routes[0].connect_retries",
        &["between 0 and 3"],
    );
}

// ----- auth -----

#[test]
fn auth_jwt_is_converted_with_defaults_and_every_key() {
    let config = ok(&format!(
        "{MINIMAL}    match: {{path_prefix: /a}}
    auth:
      jwt:
        keys:
          - pem: keys/ec.pem
            algorithms: [ES256, ES384]
            kid: k1
  - name: strict
    match: {{path_prefix: /strict}}
    upstream: rooms
    sticky: {{claim: sub}}
    auth:
      jwt:
        from: [bearer, {{cookie: jwt}}, {{query: access_token}}, {{subprotocol: bearer.}}]
        keys:
          - jwks: keys/set.json
          - secret_file: keys/hs.key
            algorithms: [HS256]
        issuer: https://id.test
        audience: chat
        leeway: 0
        require: [sub, role]
        headers: {{X-User-Id: sub, X-Role: role}}
        expired_close_code: 4001
        max_connections_per_subject: 3
"
    ));
    let first = &config.routes[0].auth.as_ref().unwrap().jwt().unwrap();
    assert_eq!(first.from, [TokenSource::Bearer]);
    assert_eq!(first.leeway, Duration::from_secs(5));
    assert_eq!(first.expired_close_code, 1008);
    assert_eq!(
        first.keys,
        [JwtKey {
            source: JwtKeySource::Pem("keys/ec.pem".into()),
            algorithms: vec![JwtAlgorithm::ES256, JwtAlgorithm::ES384],
            kid: Some("k1".into()),
        }]
    );
    let strict = &config.routes[1];
    let jwt = &strict.auth.as_ref().unwrap().jwt().unwrap();
    assert_eq!(
        jwt.from,
        [
            TokenSource::Bearer,
            TokenSource::Cookie("jwt".into()),
            TokenSource::Query("access_token".into()),
            TokenSource::Subprotocol("bearer.".into()),
        ]
    );
    assert_eq!(
        jwt.keys[0].source,
        JwtKeySource::Jwks("keys/set.json".into())
    );
    assert!(jwt.keys[0].algorithms.is_empty());
    assert_eq!(jwt.issuer.as_deref(), Some("https://id.test"));
    assert_eq!(jwt.audience, ["chat"]);
    assert_eq!(jwt.leeway, Duration::ZERO);
    assert_eq!(jwt.require, ["sub", "role"]);
    assert_eq!(
        jwt.headers,
        [
            ("X-User-Id".to_owned(), "sub".to_owned()),
            ("X-Role".to_owned(), "role".to_owned())
        ]
    );
    assert_eq!(jwt.expired_close_code, 4001);
    assert_eq!(jwt.max_connections_per_subject, Some(3));
    assert_eq!(
        strict.sticky,
        Some(StickyKey::Claim {
            claim: "sub".into(),
            header: "x-user-id".into()
        })
    );
}

#[test]
fn auth_errors_name_their_line() {
    let errors = errs(&format!(
        "{MINIMAL}    sticky: {{claim: sub}}
    auth:
      jwt:
        keys:
          - pem: a.pem
            algorithms: [none]
          - pem: b.pem
          - pem: c.pem
            secret_file: d.key
            algorithms: [HS256]
          - secret_file: e.key
            algorithms: [RS256]
          - pem: f.pem
            algorithms: [RS256, ES256]
        expired_close_code: 1005
        headers: {{Host: sub}}
"
    ));
    expect(
        &errors,
        14,
        "routes[0].auth.jwt.keys[0].algorithms[0]",
        &["one of HS256", "the string \"none\""],
    );
    expect(
        &errors,
        15,
        "routes[0].auth.jwt.keys[1].algorithms",
        &["required key is missing"],
    );
    expect(
        &errors,
        16,
        "routes[0].auth.jwt.keys[2]",
        &["exactly one of", "pem and secret_file"],
    );
    expect(
        &errors,
        20,
        "routes[0].auth.jwt.keys[3].algorithms",
        &["HS256, HS384 or HS512 only"],
    );
    expect(
        &errors,
        22,
        "routes[0].auth.jwt.keys[4].algorithms",
        &["one kind only"],
    );
    expect(
        &errors,
        23,
        "routes[0].auth.jwt.expired_close_code",
        &["1005 cannot be sent"],
    );
    expect(
        &errors,
        24,
        "routes[0].auth.jwt.headers.Host",
        &["the gateway sets or removes itself"],
    );
    assert_eq!(errors.len(), 7, "{errors:#?}");
}

#[test]
fn a_claim_sticky_key_needs_the_claim_mapped_to_a_header() {
    single(
        &format!(
            "{MINIMAL}    sticky: {{claim: sub}}
    auth:
      jwt:
        keys:
          - pem: a.pem
            algorithms: [EdDSA]
"
        ),
        9,
        "routes[0].sticky.claim",
        &["needs auth.jwt", "X-User-Id: sub"],
    );
    single(
        &format!("{MINIMAL}    sticky: {{claim: sub}}\n"),
        9,
        "routes[0].sticky.claim",
        &["needs auth.jwt"],
    );
}

#[test]
fn a_jwks_url_is_https_with_bounded_timers() {
    let config = ok(&format!(
        "{MINIMAL}    auth:
      jwt:
        keys:
          - jwks_url: https://id.test:8443/keys?v=1
            ca_file: ca.pem
            refresh: 1m
          - jwks_url: https://id.test
            algorithms: [RS256]
"
    ));
    let keys = &config.routes[0].auth.as_ref().unwrap().jwt().unwrap().keys;
    let JwtKeySource::JwksUrl(first) = &keys[0].source else {
        panic!("{keys:?}")
    };
    assert_eq!(
        (first.host.as_str(), first.port, first.path.as_str()),
        ("id.test", 8443, "/keys?v=1")
    );
    assert_eq!(first.ca_file.as_deref(), Some(Path::new("ca.pem")));
    assert_eq!(first.refresh, Duration::from_secs(60));
    assert_eq!(first.cooldown, Duration::from_secs(5));
    assert_eq!(first.timeout, Duration::from_secs(5));
    let JwtKeySource::JwksUrl(second) = &keys[1].source else {
        panic!("{keys:?}")
    };
    assert_eq!((second.port, second.path.as_str()), (443, "/"));
    assert_eq!(keys[1].algorithms, [JwtAlgorithm::RS256]);

    let errors = errs(&format!(
        "{MINIMAL}    auth:
      jwt:
        keys:
          - jwks_url: http://id.test/keys
          - jwks_url: https://id.test/keys
            cooldown: 10ms
          - pem: a.pem
            algorithms: [ES256]
            refresh: 1m
"
    ));
    expect(
        &errors,
        12,
        "routes[0].auth.jwt.keys[0].jwks_url",
        &["https:// only"],
    );
    expect(
        &errors,
        14,
        "routes[0].auth.jwt.keys[1].cooldown",
        &["at least 100ms"],
    );
    expect(
        &errors,
        17,
        "routes[0].auth.jwt.keys[2].refresh",
        &["jwks_url only"],
    );
    assert_eq!(errors.len(), 3, "{errors:#?}");
}

#[test]
fn auth_forward_is_converted_and_takes_no_jwt_beside_it() {
    let config = ok(&format!(
        "{MINIMAL}    auth:
      forward:
        url: http://127.0.0.1:9000/check?app=chat
        request_headers: [Authorization, X-Api-Key]
        response_headers: [X-User-Id]
        subject_header: X-User-Id
        cache_ttl: 30s
"
    ));
    let Some(Auth::Forward(forward)) = &config.routes[0].auth else {
        panic!("{:?}", config.routes[0].auth)
    };
    assert!(!forward.secure);
    assert_eq!(
        (forward.host.as_str(), forward.port, forward.path.as_str()),
        ("127.0.0.1", 9000, "/check?app=chat")
    );
    assert_eq!(forward.request_headers, ["authorization", "x-api-key"]);
    assert_eq!(forward.response_headers, ["X-User-Id"]);
    assert_eq!(forward.timeout, Duration::from_secs(5));
    assert_eq!(forward.cache_ttl, Duration::from_secs(30));
    assert_eq!(forward.negative_cache_ttl, Duration::ZERO);
    assert_eq!(forward.subject_header.as_deref(), Some("x-user-id"));

    let errors = errs(&format!(
        "{MINIMAL}    auth:
      forward:
        url: ftp://auth
      jwt:
        keys: []
"
    ));
    expect(
        &errors,
        10,
        "routes[0].auth.forward",
        &["either jwt or forward"],
    );
}

#[test]
fn admin_token_is_long_enough_from_the_file_or_the_environment() {
    let with = |admin: &str| format!("{MINIMAL}admin:\n  address: 127.0.0.1:9090\n{admin}");
    let config = ok(&with("  token: abcdefghijklmnop\n"));
    let admin = config.admin.unwrap();
    assert!(admin.token.unwrap().matches(b"abcdefghijklmnop"));
    assert!(ok(&with("")).admin.unwrap().token.is_none());
    single(
        &with("  token: short\n"),
        11,
        "admin.token",
        &["at least 16 characters"],
    );
    single(
        &with("  token: abcdefghijklmnop\n  token_env: HOME\n"),
        12,
        "admin.token_env",
        &["not both"],
    );
    single(
        &with("  token_env: WSGATE_TEST_UNSET_VARIABLE_7c1\n"),
        11,
        "admin.token_env",
        &["WSGATE_TEST_UNSET_VARIABLE_7c1 is not set"],
    );
    // The token never shows in a printed configuration.
    let printed = format!("{:?}", ok(&with("  token: abcdefghijklmnop\n")));
    assert!(!printed.contains("abcdefghijklmnop"), "{printed}");
}

#[test]
fn describe_shows_each_routes_auth() {
    let config = ok(&format!(
        "{MINIMAL}    match: {{path_prefix: /a}}
    auth:
      jwt:
        from: [bearer, {{query: t}}]
        keys:
          - pem: k.pem
            algorithms: [EdDSA]
        headers: {{X-User-Id: sub}}
        max_connections_per_subject: 2
  - upstream: rooms
    auth:
      forward:
        url: http://127.0.0.1:9/check
"
    ));
    let text = describe(&config);
    for needle in [
        "auth: jwt from bearer, query t; keys: pem k.pem [EdDSA]; leeway 5s; expiry closes with 1008; X-User-Id from sub; at most 2 per subject",
        "auth: forward to http://127.0.0.1:9/check (timeout 5s; cached: admissions off, refusals off)",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

// ----- cluster -----

const SECRET: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn a_cluster_names_the_session_instance_and_skips_itself_among_its_peers() {
    let config = ok(&format!(
        "listeners:\n  - name: clients\n    address: 127.0.0.1:8080\n  - name: peers\n    address: 127.0.0.1:9100\nupstreams:\n  rooms:\n    backends:\n      - ws://127.0.0.1:9001\nroutes:\n  - upstream: rooms\ncluster:\n  name: gw-2\n  address: gw-2.peers:9100\n  secret: {SECRET}\n  listener: peers\n  tls: {{server_name: peers.internal}}\n  peers:\n    - {{name: gw-1, address: gw-1.peers:9100}}\n    - {{name: gw-2, address: gw-2.peers:9100}}\n    - {{name: gw-3, address: \"[::1]:9100\"}}\n"
    ));
    let cluster = config.cluster.as_ref().unwrap();
    assert_eq!(config.sessions.instance, "gw-2");
    assert_eq!(cluster.listener, Some(1));
    let names: Vec<&str> = cluster.peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["gw-1", "gw-3"]);
    assert_eq!(cluster.peer("gw-3").unwrap().address, "[::1]:9100");
    assert!(cluster.peer("gw-2").is_none());
    assert_eq!(
        cluster.tls.as_ref().unwrap().server_name.as_deref(),
        Some("peers.internal")
    );
    assert!(cluster.secret.matches(SECRET.as_bytes()));
    assert!(!cluster.secret.matches(&SECRET.as_bytes()[1..]));
    assert!(!format!("{cluster:?}").contains(SECRET));
    let described = crate::config::describe(&config);
    assert!(
        described.contains("cluster: instance gw-2, peers over TLS on listener peers: gw-1 at gw-1.peers:9100, gw-3 at [::1]:9100"),
        "{described}"
    );
}

#[test]
fn peers_from_dns_name_every_instance_by_its_address() {
    let config = ok(&format!(
        "{MINIMAL}cluster:\n  name: 10.1.0.7\n  secret: {SECRET}\n  peers_dns:\n    name: wsgate-peers.default.svc\n    port: 9100\n    resolver: 127.0.0.1:5353\n    min_interval: 2s\n    max_interval: 20s\n"
    ));
    let cluster = config.cluster.as_ref().unwrap();
    assert_eq!(config.sessions.instance, "10.1.0.7");
    assert!(cluster.peers.is_empty(), "no peers before DNS answers");
    let dns = cluster.peers_dns.as_ref().unwrap();
    assert_eq!(
        dns.lookup,
        DnsLookup::Address {
            name: "wsgate-peers.default.svc".into(),
            port: 9100
        }
    );
    assert_eq!(dns.resolver, Some("127.0.0.1:5353".parse().unwrap()));
    assert_eq!(
        (dns.min_interval, dns.max_interval),
        (Duration::from_secs(2), Duration::from_secs(20))
    );
    // An answer becomes peers named by their IPs, ordered, once each, this instance left out.
    let answer = [
        "10.1.0.9:9100",
        "10.1.0.7:9100",
        "10.1.0.10:9100",
        "10.1.0.9:9100",
    ]
    .map(|a| a.parse().unwrap());
    let peers = cluster.peers_at(answer);
    let named: Vec<(&str, &str)> = peers
        .iter()
        .map(|p| (p.name.as_str(), p.address.as_str()))
        .collect();
    assert_eq!(
        named,
        [
            ("10.1.0.9", "10.1.0.9:9100"),
            ("10.1.0.10", "10.1.0.10:9100")
        ]
    );
    // On an IPv6 network the names are IPv6 addresses.
    let v6 = ok(&format!(
        "{MINIMAL}cluster:\n  name: \"fd00::7\"\n  secret: {SECRET}\n  peers_dns: {{name: peers.internal, port: 9100}}\n"
    ));
    let v6 = v6.cluster.as_ref().unwrap();
    let peers = v6.peers_at(["[fd00::9]:9100", "[fd00::7]:9100"].map(|a| a.parse().unwrap()));
    assert_eq!(
        (
            peers.len(),
            peers[0].name.as_str(),
            peers[0].address.as_str()
        ),
        (1, "fd00::9", "[fd00::9]:9100")
    );
    let described = crate::config::describe(&config);
    assert!(
        described.contains("peers from DNS: A/AAAA wsgate-peers.default.svc, port 9100 via 127.0.0.1:5353, looked up after the TTL held within 2s to 20s"),
        "{described}"
    );
}

#[test]
fn peers_from_dns_need_an_address_as_the_name_and_no_static_list() {
    let base_lines = MINIMAL.lines().count();
    let dns = "  peers_dns: {name: peers.internal, port: 9100}\n";
    for (name, needle) in [
        ("gw-1", "must be the IP address"),
        ("010.1.0.7", "must be the IP address"),
        ("\"FD00::7\"", "must be written as fd00::7"),
    ] {
        single(
            &format!("{MINIMAL}cluster:\n  name: {name}\n  secret: {SECRET}\n{dns}"),
            base_lines + 2,
            "cluster.name",
            &[needle],
        );
    }
    single(
        &format!(
            "{MINIMAL}cluster:\n  name: 10.0.0.1\n  secret: {SECRET}\n{dns}  peers:\n    - {{name: gw-2, address: 10.0.0.2:9100}}\n"
        ),
        base_lines + 4,
        "cluster.peers_dns",
        &["not both"],
    );
    single(
        &format!(
            "{MINIMAL}cluster:\n  name: 10.0.0.1\n  address: 10.0.0.1:9100\n  secret: {SECRET}\n{dns}"
        ),
        base_lines + 3,
        "cluster.address",
        &["remove address"],
    );
    single(
        &format!(
            "{MINIMAL}cluster:\n  name: 10.0.0.1\n  secret: {SECRET}\n  peers_dns: {{name: 10.0.0.2, port: 9100}}\n"
        ),
        base_lines + 4,
        "cluster.peers_dns.name",
        &["not a DNS name"],
    );
    single(
        &format!(
            "{MINIMAL}cluster:\n  name: 10.0.0.1\n  secret: {SECRET}\n  peers_dns: {{name: peers.internal, port: 0}}\n"
        ),
        base_lines + 4,
        "cluster.peers_dns.port",
        &[],
    );
    single(
        &format!(
            "{MINIMAL}cluster:\n  name: 10.0.0.1\n  secret: {SECRET}\n  peers_dns: {{name: peers.internal, port: 9100, min_interval: 10s, max_interval: 1s}}\n"
        ),
        base_lines + 4,
        "cluster.peers_dns.max_interval",
        &["at least min_interval"],
    );
}

#[test]
fn bad_cluster_settings_are_reported_on_their_lines() {
    let base_lines = MINIMAL.lines().count();
    let source = format!(
        "{MINIMAL}sessions:\n  instance: gw-9\ncluster:\n  name: gw-1\n  secret: short\n  listener: nowhere\n  peers:\n    - {{name: gw-2, address: gw-2.peers}}\n    - {{name: gw-3, address: 10.0.0.3:9100}}\n    - {{name: gw-3, address: 10.0.0.4:9100}}\n    - {{name: \"gw 4\", address: 10.0.0.5:9100, port: 1}}\n"
    );
    let errors = errs(&source);
    expect(&errors, base_lines + 5, "cluster.secret", &["at least 32"]);
    expect(
        &errors,
        base_lines + 6,
        "cluster.listener",
        &["no listener named \"nowhere\""],
    );
    expect(
        &errors,
        base_lines + 8,
        "cluster.peers[0].address",
        &["no port"],
    );
    expect(
        &errors,
        base_lines + 10,
        "cluster.peers[2].name",
        &["already listed at peers[1]"],
    );
    expect(
        &errors,
        base_lines + 11,
        "cluster.peers[3].name",
        &["instance name"],
    );
    expect(
        &errors,
        base_lines + 11,
        "cluster.peers[3].port",
        &["unknown key"],
    );

    single(
        &format!(
            "{MINIMAL}cluster:\n  name: gw-1\n  secret: {SECRET}\n  secret_env: X\n  peers: []\n"
        ),
        base_lines + 4,
        "cluster.secret_env",
        &["not both"],
    );
    single(
        &format!("{MINIMAL}cluster:\n  name: gw-1\n  secret: {SECRET}\n"),
        base_lines + 1,
        "cluster.peers",
        &["required key is missing"],
    );
    single(
        &format!(
            "{MINIMAL}cluster:\n  name: gw-1\n  address: 10.0.0.1:9100\n  secret: {SECRET}\n  peers:\n    - {{name: gw-1, address: 10.0.0.9:9100}}\n"
        ),
        base_lines + 3,
        "cluster.address",
        &["differs from this instance's entry"],
    );
    single(
        &format!(
            "{MINIMAL}sessions:\n  instance: gw-9\ncluster:\n  name: gw-1\n  secret: {SECRET}\n  peers: []\n"
        ),
        base_lines + 2,
        "sessions.instance",
        &["cluster.name", "gw-1"],
    );
    // The only listener cannot be kept for peers.
    single(
        &format!(
            "{MINIMAL}cluster:\n  name: gw-1\n  secret: {SECRET}\n  listener: listener-0\n  peers: []\n"
        ),
        base_lines + 4,
        "cluster.listener",
        &["no listener for clients"],
    );
}

#[test]
fn trusted_proxies_are_networks_and_proxy_protocol_needs_them() {
    let listener = |extra: &str| {
        format!(
            "listeners:\n  - address: 127.0.0.1:1\n{extra}upstreams:\n  u:\n    backends: [ws://127.0.0.1:2]\nroutes:\n  - upstream: u\n"
        )
    };
    let config = crate::config::from_yaml_str(
        &listener("    proxy_protocol: true\n    trusted_proxies: [10.0.0.0/8, 192.0.2.1, \"2001:db8::/32\"]\n"),
        "t.yaml",
    )
    .unwrap();
    let l = &config.listeners[0];
    assert!(l.proxy_protocol);
    assert!(l.trusted_proxies.contains("10.1.2.3".parse().unwrap()));
    assert!(l.trusted_proxies.contains("192.0.2.1".parse().unwrap()));
    assert!(!l.trusted_proxies.contains("192.0.2.2".parse().unwrap()));
    assert!(l.trusted_proxies.contains("2001:db8::9".parse().unwrap()));

    assert_eq!(
        errors_of(&listener("    proxy_protocol: true\n")),
        "t.yaml:3: listeners[0].proxy_protocol: proxy_protocol needs trusted_proxies: the networks of the load balancers allowed to send the header"
    );
    assert_eq!(
        errors_of(&listener("    trusted_proxies: [10.0.0.0/33]\n")),
        "t.yaml:3: listeners[0].trusted_proxies[0]: \"10.0.0.0/33\" is not a network such as 10.0.0.0/8 or an address such as 192.0.2.1"
    );
}

#[test]
fn dns_upstreams_take_a_name_and_bounded_intervals() {
    let upstream = |body: &str| {
        format!(
            "listeners:\n  - address: 127.0.0.1:1\nupstreams:\n  u:\n{body}routes:\n  - upstream: u\n"
        )
    };
    let config = crate::config::from_yaml_str(
        &upstream("    dns:\n      url: wss://rooms.internal:9001/ws\n      resolver: 127.0.0.1:5353\n      min_interval: 2s\n"),
        "t.yaml",
    )
    .unwrap();
    let u = &config.upstreams[0];
    let dns = u.dns.as_ref().unwrap();
    assert_eq!(
        dns.lookup,
        DnsLookup::Address {
            name: "rooms.internal".into(),
            port: 9001
        }
    );
    assert!(dns.secure);
    assert_eq!(dns.base_path, "/ws");
    assert_eq!(dns.resolver, Some("127.0.0.1:5353".parse().unwrap()));
    assert_eq!(
        (dns.min_interval, dns.max_interval),
        (Duration::from_secs(2), Duration::from_secs(60))
    );
    assert!(u.backends.is_empty(), "filled by the first lookup");
    assert_eq!(
        u.tls.server_name.as_deref(),
        Some("rooms.internal"),
        "certificates name the DNS name"
    );
    let srv = crate::config::from_yaml_str(
        &upstream("    dns:\n      srv: ws://_ws._tcp.rooms.internal\n"),
        "t.yaml",
    )
    .unwrap();
    assert_eq!(
        srv.upstreams[0].dns.as_ref().unwrap().lookup,
        DnsLookup::Srv {
            name: "_ws._tcp.rooms.internal".into()
        }
    );

    for (body, error) in [
        (
            "    backends: [ws://127.0.0.1:2]\n    dns:\n      url: ws://a.test:1\n",
            "t.yaml:6: upstreams.u.dns: an upstream takes its backends from backends or from dns, not both",
        ),
        (
            "    dns:\n      resolver: 127.0.0.1:53\n",
            "t.yaml:5: upstreams.u.dns: url (A/AAAA records) or srv is required",
        ),
        (
            "    dns:\n      url: ws://10.0.0.1:9001\n",
            "t.yaml:6: upstreams.u.dns.url: \"ws://10.0.0.1:9001\" names an address, not a DNS name (use backends)",
        ),
        (
            "    dns:\n      srv: ws://_ws._tcp.a.test:9001\n",
            "t.yaml:6: upstreams.u.dns.srv: \"ws://_ws._tcp.a.test:9001\": an SRV answer gives the ports; remove the port",
        ),
        (
            "    dns:\n      url: ws://a.test:1\n      min_interval: 10ms\n",
            "t.yaml:7: upstreams.u.dns.min_interval: at least 100ms",
        ),
        (
            "    dns:\n      url: ws://a.test:1\n      min_interval: 10s\n      max_interval: 5s\n",
            "t.yaml:8: upstreams.u.dns.max_interval: at least min_interval (10s)",
        ),
    ] {
        assert_eq!(errors_of(&upstream(body)), error, "{body}");
    }
}

#[test]
fn terminate_compression_parses_with_defaults_and_options() {
    let config = ok("\
listeners:
  - address: 127.0.0.1:8080
upstreams:
  u:
    backends: [ws://127.0.0.1:9001]
routes:
  - upstream: u
    match: {path_prefix: /a}
    compression: terminate
  - upstream: u
    match: {path_prefix: /b}
    compression:
      mode: terminate
      server_no_context_takeover: false
      client_max_window_bits: 8
      server_max_window_bits: 15
      min_size: 1KiB
      level: 1
");
    assert_eq!(
        config.routes[0].compression,
        Compression::Terminate(Deflate::default())
    );
    assert_eq!(
        config.routes[1].compression,
        Compression::Terminate(Deflate {
            server_no_context_takeover: false,
            client_no_context_takeover: true,
            server_max_window_bits: 15,
            client_max_window_bits: 8,
            min_size: 1024,
            level: 1,
        })
    );
}

#[test]
fn terminate_compression_errors_name_their_line() {
    let errors = errs(
        "\
listeners:
  - address: 127.0.0.1:8080
upstreams:
  u:
    backends: [ws://127.0.0.1:9001]
routes:
  - upstream: u
    compression:
      mode: terminate
      server_max_window_bits: 8
      level: 10
      window: 12
  - upstream: u
    match: {path_prefix: /b}
    compression: {mode: passthrough}
",
    );
    expect(
        &errors,
        10,
        "routes[0].compression.server_max_window_bits",
        &["between 9 and 15", "8"],
    );
    expect(
        &errors,
        11,
        "routes[0].compression.level",
        &["between 1 and 9"],
    );
    expect(
        &errors,
        12,
        "routes[0].compression.window",
        &["unknown key"],
    );
    expect(
        &errors,
        15,
        "routes[1].compression.mode",
        &["expected terminate"],
    );
}

#[test]
fn compression_memory_is_a_top_level_limit() {
    let config = ok("\
listeners:
  - address: 127.0.0.1:8080
upstreams:
  u:
    backends: [ws://127.0.0.1:9001]
routes:
  - upstream: u
limits:
  compression_memory: 64MiB
");
    assert_eq!(config.limits.compression_memory, 64 << 20);
    let errors = errs(
        "\
listeners:
  - address: 127.0.0.1:8080
upstreams:
  u:
    backends: [ws://127.0.0.1:9001]
routes:
  - upstream: u
    limits:
      compression_memory: 1MiB
",
    );
    expect(
        &errors,
        9,
        "routes[0].limits.compression_memory",
        &["applies to the whole gateway"],
    );
}

#[test]
fn an_in_band_token_refresh_needs_an_uncompressed_route() {
    let route = |compression: &str| {
        format!(
            "{MINIMAL}    compression: {compression}\n    auth:\n      jwt:\n        keys: [{{secret_file: k, algorithms: [HS256]}}]\n        refresh: true\n"
        )
    };
    assert!(
        ok(&route("strip")).routes[0]
            .auth
            .as_ref()
            .unwrap()
            .jwt()
            .unwrap()
            .refresh
    );
    for compression in ["passthrough", "terminate"] {
        single(
            &route(compression),
            13,
            "routes[0].auth.jwt.refresh",
            &["compression: strip"],
        );
    }
}
