//! The shipped configuration files stay loadable, and a broken file on disk is reported
//! the way `wsgate check` users see it.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use wsgate::config::{self, StickyKey};

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_config_file_loads() {
    let mut checked = 0;
    for dir in ["config", "config/examples"] {
        for file in yaml_files(&manifest_dir().join(dir)) {
            let config = config::load(&file).unwrap_or_else(|e| panic!("{e}"));
            assert!(!config::describe(&config).is_empty());
            checked += 1;
        }
    }
    // wsgate.yaml, full.yaml and tls.yaml at least: a renamed directory must not make
    // this test pass vacuously.
    assert!(checked >= 3, "only {checked} files found");
}

#[test]
fn demo_config_matches_its_description() {
    let config =
        config::load(&manifest_dir().join("config/wsgate.yaml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.listeners.len(), 1);
    assert_eq!(
        config.listeners[0].address,
        "127.0.0.1:8080".parse().unwrap()
    );
    assert!(config.listeners[0].tls.is_none());

    let names: Vec<_> = config.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["rooms", "app"]);
    let upstream = |i: usize| config.upstreams[config.routes[i].upstream].name.as_str();
    assert_eq!([upstream(0), upstream(1)], ["rooms", "rooms"]);
    assert_eq!(config.routes[0].path_prefix, "/rooms/");
    assert_eq!(
        config.routes[0].sticky,
        Some(StickyKey::PathSegment {
            pattern: "/rooms/{room}".into(),
            index: 1
        })
    );
    assert_eq!(config.routes[1].path_prefix, "/");
    assert!(config.routes[1].sticky_cookie.is_some());

    let rooms = &config.upstreams[config.routes[0].upstream];
    let urls: Vec<_> = rooms.backends.iter().map(|b| b.url.as_str()).collect();
    assert_eq!(urls, ["ws://127.0.0.1:9101", "ws://127.0.0.1:9102"]);
}

#[test]
fn tls_example_resolves_certificates_next_to_the_file() {
    let file = manifest_dir().join("config/examples/tls.yaml");
    let config = config::load(&file).unwrap_or_else(|e| panic!("{e}"));
    let tls = config.listeners[0].tls.as_ref().expect("a TLS listener");
    assert_eq!(tls.certificates.len(), 2);
    assert_eq!(
        tls.certificates[0].cert,
        manifest_dir().join("config/examples/../../certs/localhost.crt")
    );
    assert_eq!(
        tls.certificates[1].server_names,
        ["example.test", "*.example.test"]
    );
}

#[test]
fn broken_file_reports_every_problem_as_file_line_path_problem() {
    let dir = std::env::temp_dir().join(format!("wsgate-config-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("broken.yaml");
    std::fs::write(
        &file,
        "\
# A file with one mistake per section.
listeners:
  - address: 127.0.0.1:8080
    tsl: {}
upstreams:
  rooms:
    backends:
      - http://127.0.0.1:9101
routes:
  - name: rooms
    upstream: room
    sticky:
      path: /rooms/{room}
      query: room
limits:
  max_frame: 2MiB
  max_message: 1MiB
",
    )
    .unwrap();
    let errors = config::load(&file).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();

    let name = file.display().to_string();
    let lines: Vec<String> = errors.to_string().lines().map(str::to_owned).collect();
    let expected = [
        (4, "listeners[0].tsl", "unknown key \"tsl\""),
        (8, "upstreams.rooms.backends[0]", "use ws:// for http://"),
        (
            11,
            "routes[0].upstream",
            "unknown upstream \"room\" (expected one of: rooms)",
        ),
        (12, "routes[0].sticky", "found path and query"),
        (17, "limits.max_message", "smaller than max_frame"),
    ];
    assert_eq!(lines.len(), expected.len(), "{lines:#?}");
    for ((line, path, problem), text) in expected.iter().zip(&lines) {
        let prefix = format!("{name}:{line}: {path}: ");
        assert!(
            text.starts_with(&prefix),
            "{text:?} should start with {prefix:?}"
        );
        assert!(
            text.contains(problem),
            "{text:?} should mention {problem:?}"
        );
    }
    for (error, (line, path, _)) in errors.iter().zip(&expected) {
        assert_eq!(
            (error.file.as_str(), error.line, error.path.as_str()),
            (name.as_str(), Some(*line), *path)
        );
    }
}
