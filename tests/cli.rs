//! The `wsgate` binary as a user runs it: `check`, `--version`, and `proxy` in front of a
//! real backend. Spawned gateways are killed when their guard drops, even on failure.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/routing_client.rs"]
mod routing_client;
mod support;

use routing_client::*;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;
use support::echo_backend;
use tokio::time::Instant;

const WSGATE: &str = env!("CARGO_BIN_EXE_wsgate");

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `wsgate args` from the crate root to completion.
fn run(args: &[&str]) -> Output {
    Command::new(WSGATE)
        .args(args)
        .current_dir(crate_root())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run wsgate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A file in the system temp directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, contents: &str) -> Self {
        let path = std::env::temp_dir().join(format!("wsgate-cli-{}-{tag}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn check_demo_config_exits_0_and_prints_routes() {
    let output = run(&["check", "-c", "config/wsgate.yaml"]);
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        text(&output.stderr)
    );
    assert!(stdout.contains("routes (first match wins):"), "{stdout}");
    for line in [
        "[0] rooms: host any path /rooms/* -> rooms",
        "[1] app: host any path /* -> rooms",
        "ws://127.0.0.1:9101",
        "ws://127.0.0.1:9102",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}

#[test]
fn check_full_example_config_exits_0() {
    let output = run(&["check", "--config", "config/examples/full.yaml"]);
    assert!(output.status.success(), "stderr:\n{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    for route in ["rooms", "api", "echo", "app"] {
        assert!(
            stdout.contains(&format!("] {route}: ")),
            "route {route} missing in:\n{stdout}"
        );
    }
}

#[test]
fn check_broken_config_exits_1_listing_every_problem_with_file_and_line() {
    let source = "\
listeners:
  - address: 127.0.0.1:0
    colour: blue
upstreams:
  app:
    backends: [ws://127.0.0.1:9]
    connect_timeout: 5 parsecs
routes:
  - name: main
    upstream: nowhere
";
    let file = TempFile::new("broken.yaml", source);
    let output = run(&["check", "-c", file.path()]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr:\n{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with(file.path()))
        .collect();
    let expect = [
        (3, "listeners[0].colour", "colour"),
        (7, "upstreams.app.connect_timeout", "5 parsecs"),
        (10, "routes[0].upstream", "nowhere"),
    ];
    for (line, path, mentions) in expect {
        let prefix = format!("{}:{line}: {path}: ", file.path());
        let found = lines.iter().find(|l| l.starts_with(&prefix));
        let found = found.unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{stderr}"));
        let problem = &found[prefix.len()..];
        assert!(
            problem.contains(mentions),
            "{found:?} should mention {mentions:?}"
        );
    }
    assert_eq!(
        lines.len(),
        expect.len(),
        "exactly one line per problem:\n{stderr}"
    );
    assert!(
        output.stdout.is_empty(),
        "nothing on stdout for a broken config"
    );
}

#[test]
fn check_missing_file_exits_1_naming_it() {
    let output = run(&["check", "-c", "config/does-not-exist.yaml"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("config/does-not-exist.yaml"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn version_flag_prints_the_crate_version() {
    let output = run(&["--version"]);
    assert!(output.status.success());
    assert_eq!(
        text(&output.stdout).trim(),
        format!("wsgate {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn proxy_sticky_bogus_exits_1_with_a_clear_message() {
    for bogus in ["bogus", "query:", "client_ip:yes", "path"] {
        let output = run(&[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--to",
            "ws://127.0.0.1:9",
            "--sticky",
            bogus,
        ]);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "--sticky {bogus}: {stderr}");
        assert!(stderr.contains("--sticky"), "{stderr}");
        assert!(
            stderr.contains(bogus),
            "the message should quote {bogus:?}: {stderr}"
        );
        assert!(
            stderr.contains("query:NAME") && stderr.contains("client_ip"),
            "the message should list the forms: {stderr}"
        );
    }
}

#[test]
fn proxy_bad_backend_url_exits_1_naming_it() {
    let output = run(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--to",
        "http://127.0.0.1:9",
    ]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("http://127.0.0.1:9"), "{stderr}");
}

#[test]
fn run_broken_config_exits_1_without_serving() {
    let file = TempFile::new("run-broken.yaml", "listeners: []\n");
    let output = run(&["run", "-c", file.path()]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(file.path()),
        "errors name the file: {stderr}"
    );
}

#[test]
fn proxy_listen_address_in_use_exits_1_naming_it() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = run(&["proxy", "--listen", &addr, "--to", "ws://127.0.0.1:9"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&addr) && stderr.contains("cannot listen"),
        "{stderr}"
    );
}

/// A spawned `wsgate`, killed and reaped on drop; its stderr goes to a temp file shown on
/// failure.
struct Spawned {
    child: Child,
    log: TempFile,
}

impl Spawned {
    fn start(args: &[&str], tag: &str) -> Self {
        let log = TempFile::new(tag, "");
        let stderr = std::fs::File::create(&log.0).unwrap();
        let child = Command::new(WSGATE)
            .args(args)
            .current_dir(crate_root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn wsgate");
        Spawned { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log.0).unwrap_or_default()
    }

    /// Polls `addr` until the gateway accepts, failing if it exits or takes over 10 s.
    async fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "wsgate exited with {status} before listening:\n{}",
                    self.log()
                );
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "wsgate not listening on {addr} within {STEP:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test]
async fn proxy_listen_to_backend_relays_a_websocket_client() {
    let backend = echo_backend("proxied").await;
    let listen = free_port();
    let to = format!("ws://{}", backend.addr);
    let mut gateway = Spawned::start(
        &["proxy", "--listen", &listen.to_string(), "--to", &to],
        "proxy.log",
    );
    gateway.wait_listening(listen).await;
    let (mut ws, _) = open(listen, "ws://localhost/anything?x=1", &[]).await;
    echo(&mut ws, "via the proxy command").await;
    assert_eq!(whoami(&mut ws).await, "proxied");
    close(ws).await;
    assert_eq!(backend.seen.lock().unwrap()[0].path, "/anything?x=1");
    drop(gateway);
}

/// `--threads 1` (how the benchmark runs wsgate) is a current-thread runtime: everything,
/// including the relay and the backend connection, must work on that one thread.
#[tokio::test]
async fn proxy_on_one_thread_relays_a_websocket_client() {
    let backend = echo_backend("one-thread").await;
    let listen = free_port();
    let to = format!("ws://{}", backend.addr);
    let mut gateway = Spawned::start(
        &[
            "--threads",
            "1",
            "proxy",
            "--listen",
            &listen.to_string(),
            "--to",
            &to,
        ],
        "proxy-threads.log",
    );
    gateway.wait_listening(listen).await;
    let (mut ws, _) = open(listen, "ws://localhost/one", &[]).await;
    echo(&mut ws, "on one worker thread").await;
    assert_eq!(whoami(&mut ws).await, "one-thread");
    close(ws).await;
    drop(gateway);
}

#[tokio::test]
async fn proxy_sticky_path_keeps_each_room_on_one_backend() {
    let one = echo_backend("one").await;
    let two = echo_backend("two").await;
    let listen = free_port();
    let (to_one, to_two) = (format!("ws://{}", one.addr), format!("ws://{}", two.addr));
    let args = [
        "proxy",
        "--listen",
        &listen.to_string(),
        "--to",
        &to_one,
        "--to",
        &to_two,
        "--sticky",
        "path:/rooms/{room}",
    ];
    let mut gateway = Spawned::start(&args, "proxy-sticky.log");
    gateway.wait_listening(listen).await;
    let mut names = std::collections::HashSet::new();
    for room in 0..16 {
        let url = format!("ws://localhost/rooms/r{room}");
        let first = backend_via(listen, &url, &[]).await;
        assert_eq!(
            backend_via(listen, &url, &[]).await,
            first,
            "room r{room} moved"
        );
        names.insert(first);
    }
    assert_eq!(names.len(), 2, "16 rooms should use both backends");
}

/// SIGTERM starts a spread drain (the first turn is at once, the second 61.8 % into the
/// spread); a second SIGTERM closes what is left at once, and the process exits 0.
#[tokio::test]
async fn a_second_sigterm_hurries_the_drain_and_the_exit_code_is_0() {
    use futures_util::StreamExt;
    let backend = echo_backend("drained").await;
    let listen = free_port();
    let config = TempFile::new(
        "drain.yaml",
        &format!(
            "listeners:\n  - address: {listen}\nupstreams:\n  app:\n    backends:\n      - ws://{}\n\
             routes:\n  - upstream: app\ndrain:\n  readiness_delay: 0s\n  spread: 60s\n  deadline: 2m\n",
            backend.addr
        ),
    );
    let mut gateway = Spawned::start(&["run", "-c", config.path()], "drain.log");
    gateway.wait_listening(listen).await;
    let (mut first, _) = open(listen, "ws://localhost/", &[]).await;
    let (mut second, _) = open(listen, "ws://localhost/", &[]).await;
    echo(&mut first, "one").await;
    echo(&mut second, "two").await;
    let sigterm = || {
        let status = Command::new("kill")
            .args(["-TERM", &gateway.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    sigterm();
    let started = Instant::now();
    // One of the two has the first turn, at once; the other's is 37 s away.
    let (closed, mut closed_one, mut open_one) = tokio::select! {
        frame = first.next() => (frame, first, second),
        frame = second.next() => (frame, second, first),
    };
    assert!(
        matches!(closed, Some(Ok(ref message)) if message.is_close()),
        "{closed:?}"
    );
    // Polling on sends tungstenite's close reply, so the gateway need not wait for it.
    while let Some(Ok(_)) = closed_one.next().await {}
    let still_open = tokio::time::timeout(Duration::from_millis(500), open_one.next()).await;
    assert!(still_open.is_err(), "both closed at once: {still_open:?}");
    sigterm();
    let hurried = tokio::time::timeout(STEP, open_one.next())
        .await
        .expect("closed after the second signal");
    assert!(
        matches!(hurried, Some(Ok(ref message)) if message.is_close()),
        "{hurried:?}"
    );
    while let Some(Ok(_)) = open_one.next().await {}
    let deadline = Instant::now() + STEP;
    let status = loop {
        if let Some(status) = gateway.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(status.code(), Some(0), "{}", gateway.log());
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        gateway.log().contains("second shutdown signal"),
        "{}",
        gateway.log()
    );
}
