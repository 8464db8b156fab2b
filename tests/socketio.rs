//! A whole application through wsgate: a real Socket.IO v4 app from npm (`tests/socketio/`),
//! two server instances without any shared state, behind one in-process gateway that is
//! sticky by the `room` query parameter.
//!
//! Each scenario runs `tests/socketio/client.js` (real `socket.io-client`) against the gateway
//! with clients in two rooms, the rooms chosen so they land on different instances, and
//! checks that messages reach exactly the clients of the same room, that every client of a
//! room is acknowledged by the same instance, and that the transport is the one asked for:
//! long-polling only (over the gateway's HTTP reverse proxy), WebSocket only (over the relay),
//! polling upgraded to WebSocket (the upgrade request carries the polling session's `sid` and
//! must reach the instance that issued it), and a polling GET held ~2 s by the server.
//!
//! Needs `node` (v18 or later) and `npm ci --prefix tests/socketio`. Without them the tests
//! print `SKIPPED` and pass, except under `CI=true`, where they fail.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Once;
use std::time::Duration;
use support::{Gateway, start_gateway};
use tokio::sync::oneshot;

/// How long a node server may take to print "ready".
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// client.js cuts itself at 30 s; this is the backstop if node itself wedges.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// The delayed event of the long-poll scenario comes 2 s after it is asked for; the GET that
/// delivers it must have been held about that long (the margin absorbs a loaded machine).
const MIN_HELD_POLL_MS: u64 = 1500;

fn app_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/socketio")
}

/// Whether node and the npm packages are there. Missing prerequisites skip the test loudly,
/// or fail it under CI, where they must have been installed.
fn prerequisites_present() -> bool {
    let node = Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    let packages = node
        .then(|| support::npm::ensure_installed(&app_dir(), &["socket.io", "socket.io-client"]));
    let missing = match packages {
        Some(Ok(())) => return true,
        None => "`node` is not on PATH".to_owned(),
        Some(Err(why)) => format!("tests/socketio/node_modules is not installed: {why}"),
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "the Socket.IO tests need node and its packages: {missing}; \
             run `npm ci --prefix tests/socketio` (with node >= 18 installed)"
        );
    }
    // Written to the process's stderr, not through `eprintln!`, which the test harness
    // captures and shows only for failing tests: a skip must be seen. Once per test binary.
    static ANNOUNCED: Once = Once::new();
    ANNOUNCED.call_once(|| {
        let banner = format!(
            "\n==================================================================\n\
             SKIPPED: Socket.IO end-to-end tests (tests/socketio.rs): {missing}.\n\
             Install with: npm ci --prefix tests/socketio   (needs node >= 18)\n\
             ==================================================================\n"
        );
        let _ = std::io::stderr().write_all(banner.as_bytes());
    });
    false
}

/// A node process, killed (and reaped) when dropped. A server also exits by itself when its
/// stdin closes, so it cannot outlive a test process that is killed.
///
/// `std::process` rather than `tokio::process`: the crate does not enable tokio's `process`
/// feature. Pipes are read on plain threads, and exit is awaited by polling `try_wait`.
struct NodeProcess {
    name: String,
    child: Child,
}

impl NodeProcess {
    fn spawn(name: &str, args: &[&str], stdin: Stdio) -> NodeProcess {
        let child = Command::new("node")
            .args(args)
            .current_dir(app_dir())
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn node {}: {e}", args.join(" ")));
        NodeProcess {
            name: name.to_owned(),
            child,
        }
    }

    /// Copies the process's stderr to ours, line by line, prefixed with its name.
    fn forward_stderr(&mut self) {
        let stderr = self.child.stderr.take().expect("piped stderr");
        let name = self.name.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                eprintln!("[{name}] {line}");
            }
        });
    }

    /// Waits for the process to exit, for at most `limit`.
    async fn exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Err(error) = self.child.kill() {
            eprintln!("killing node process {}: {error}", self.name);
        }
        let _ = self.child.wait();
    }
}

/// Reads a pipe to its end on a thread.
fn read_all(mut pipe: impl Read + Send + 'static) -> oneshot::Receiver<String> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        let _ = tx.send(String::from_utf8_lossy(&bytes).into_owned());
    });
    rx
}

/// One instance of `server.js`.
struct AppServer {
    name: String,
    addr: SocketAddr,
    _process: NodeProcess,
}

/// A free port on 127.0.0.1, by binding and dropping a listener. Another process may take it
/// before node binds it; [`start_server`] retries then.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

async fn start_server(name: &str) -> AppServer {
    for _attempt in 0..5 {
        let port = free_port();
        let port_arg = port.to_string();
        // stdin stays open (piped, never written) for as long as the process handle lives.
        let mut process = NodeProcess::spawn(name, &["server.js", &port_arg, name], Stdio::piped());
        process.forward_stderr();
        let stdout = process.child.stdout.take().expect("piped stdout");
        let (ready_tx, ready_rx) = oneshot::channel();
        // Reads until "ready", then keeps draining so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.trim() == "ready"
                    && let Some(tx) = ready_tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        match tokio::time::timeout(READY_TIMEOUT, ready_rx).await {
            Ok(Ok(())) => {
                return AppServer {
                    name: name.to_owned(),
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    _process: process,
                };
            }
            // Exited before "ready": most likely the port was taken in the meantime.
            Ok(Err(_)) => continue,
            Err(_) => panic!("server {name} not ready within {READY_TIMEOUT:?}"),
        }
    }
    panic!("server {name} did not start (see its stderr above)");
}

/// The gateway's configuration: one route to both instances, sticky by `?room=`.
fn gateway_yaml(servers: &[AppServer]) -> String {
    let mut yaml = String::from(
        "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  socketio:\n    backends:\n",
    );
    for server in servers {
        yaml.push_str(&format!("      - ws://{}\n", server.addr));
    }
    // Sticky by the room, a key the Socket.IO client sends on every request of a session: the
    // handshake GET, each long-poll GET and POST, and the WebSocket (the client repeats its
    // `query` on all of them). So a session's requests all reach the instance that holds the
    // session, and a room's clients all reach the instance that holds the room, without any
    // adapter or shared state between instances.
    //
    // The alternatives do not work without extra setup:
    // - `sticky: {cookie: ...}` and `sticky_cookie`: the first request (the handshake) carries
    //   no cookie, and the client only sends one back if it keeps cookies: a browser does for
    //   same-origin requests, but not cross-origin without `withCredentials: true`, and the
    //   Node client only with `withCredentials` and its cookie jar. Without it each poll is
    //   balanced on its own and lands on an instance that answers "Session ID unknown". And
    //   even when it works, a cookie pins a browser, not a room: two members of a room may be
    //   pinned to different instances and never see each other's messages.
    // - the session id (`sid` query parameter): the instance chooses it in its answer to the
    //   handshake, which carries no `sid` and is balanced by connection count, so the hash
    //   of the `sid` on later requests points to an instance unrelated to the one that issued
    //   it, unless the sid encodes its instance and the gateway can route on that.
    yaml.push_str(
        "routes:\n  - name: socketio\n    upstream: socketio\n    sticky:\n      query: room\n",
    );
    yaml
}

/// Two room names that wsgate's rendezvous hashing sends to different instances, with the
/// names of those instances: `((room_a, server_a), (room_b, server_b))`.
fn rooms_on_both(yaml: &str, servers: &[AppServer]) -> ((String, String), (String, String)) {
    let config = wsgate::config::from_yaml_str(yaml, "socketio.yaml").expect("valid config");
    let backends = &config.upstreams[0].backends;
    let server_of = |room: &str| {
        let url = &backends[wsgate::routing::rank(backends, room)[0]].url;
        servers
            .iter()
            .find(|s| format!("ws://{}", s.addr) == *url)
            .map(|s| s.name.clone())
            .expect("every backend is one of our servers")
    };
    let mut first: Option<(String, String)> = None;
    for n in 0..1000 {
        let room = format!("room-{n}");
        let server = server_of(&room);
        match &first {
            None => first = Some((room, server)),
            Some((_, first_server)) if *first_server != server => {
                return (first.expect("set"), (room, server));
            }
            Some(_) => {}
        }
    }
    panic!("no two rooms on different backends among 1000 names");
}

/// Two Socket.IO instances behind a gateway.
struct App {
    gateway: Gateway,
    /// (room, the instance it must be served by), for rooms A and B.
    room_a: (String, String),
    room_b: (String, String),
    _servers: Vec<AppServer>,
}

/// Starts the app, or returns `None` when the test is skipped.
async fn start_app() -> Option<App> {
    if !prerequisites_present() {
        return None;
    }
    let (s1, s2) = tokio::join!(start_server("s1"), start_server("s2"));
    let servers = vec![s1, s2];
    let yaml = gateway_yaml(&servers);
    let (room_a, room_b) = rooms_on_both(&yaml, &servers);
    let gateway = start_gateway(&yaml).await;
    Some(App {
        gateway,
        room_a,
        room_b,
        _servers: servers,
    })
}

/// Runs one scenario of client.js and returns its report; fails on a report with `ok: false`.
async fn run_scenario(app: &App, scenario: &str) -> Value {
    let url = format!("http://{}", app.gateway.addr);
    let args = ["client.js", &url, scenario, &app.room_a.0, &app.room_b.0];
    let mut process = NodeProcess::spawn("client", &args, Stdio::null());
    let stdout = read_all(process.child.stdout.take().expect("piped stdout"));
    let stderr = read_all(process.child.stderr.take().expect("piped stderr"));
    let status = process.exit(CLIENT_TIMEOUT).await;
    drop(process); // kills it if it is still running, which ends the pipes
    let stdout = stdout.await.unwrap_or_default();
    let stderr = stderr.await.unwrap_or_default();
    let Some(status) = status else {
        panic!(
            "client.js {scenario} still running after {CLIENT_TIMEOUT:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
    };
    let report: Value = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| {
            panic!(
                "client.js {scenario} printed no JSON report ({status}).\nstdout:\n{stdout}\nstderr:\n{stderr}"
            )
        });
    assert!(
        report["ok"] == Value::Bool(true) && status.success(),
        "client.js {scenario} failed ({status}): {}\nrooms: {:?} {:?}\nreport: {}\nstderr:\n{stderr}",
        report["error"].as_str().unwrap_or("?"),
        app.room_a,
        app.room_b,
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    report
}

fn clients(report: &Value) -> &Vec<Value> {
    report["clients"].as_array().expect("clients array")
}

fn str_of<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or("<missing>")
}

/// What every scenario must show: each client served by its room's instance, both instances
/// in use, every message of a room delivered to exactly the clients of that room, and every
/// client still in the session it opened.
fn check_rooms(app: &App, report: &Value, chat: bool) {
    let pretty = serde_json::to_string_pretty(report).unwrap_or_default();
    let mut servers_seen = BTreeSet::new();
    for client in clients(report) {
        let name = str_of(client, "name");
        let room = str_of(client, "room");
        let expected_server = if room == app.room_a.0 {
            &app.room_a.1
        } else {
            assert_eq!(room, app.room_b.0, "{name}: unknown room\n{pretty}");
            &app.room_b.1
        };
        let context = format!("client {name} in room {room}\n{pretty}");
        assert_eq!(client["errors"], Value::Array(vec![]), "{context}");
        assert_eq!(client["connectedAtEnd"], Value::Bool(true), "{context}");
        assert!(
            client["disconnects"]
                .as_array()
                .expect("disconnects")
                .iter()
                .all(|reason| reason == "io client disconnect"),
            "only the script's own disconnect at the end: {context}"
        );
        assert_eq!(str_of(&client["whoami"], "room"), room, "{context}");
        assert_eq!(
            str_of(&client["whoami"], "server"),
            expected_server,
            "served by its room's instance: {context}"
        );
        servers_seen.insert(str_of(&client["whoami"], "server").to_owned());
        if chat {
            assert_eq!(
                str_of(&client["ack"], "server"),
                expected_server,
                "the chat ack comes from its room's instance: {context}"
            );
            let members: BTreeSet<String> = clients(report)
                .iter()
                .filter(|other| str_of(other, "room") == room)
                .map(|other| format!("hello from {}", str_of(other, "name")))
                .collect();
            let received = client["received"].as_array().expect("received");
            let texts: Vec<&str> = received.iter().map(|m| str_of(m, "text")).collect();
            assert_eq!(
                texts.len(),
                members.len(),
                "exactly one copy of each message of the room: {context}"
            );
            assert_eq!(
                texts
                    .iter()
                    .map(|t| (*t).to_owned())
                    .collect::<BTreeSet<_>>(),
                members,
                "the messages of its room and no other: {context}"
            );
            for message in received {
                assert_eq!(str_of(message, "room"), room, "{context}");
                assert_eq!(str_of(message, "server"), expected_server, "{context}");
            }
        }
    }
    assert_eq!(
        servers_seen.len(),
        2,
        "the two rooms are served by the two instances: {pretty}"
    );
}

fn check_transports(report: &Value, server_side: &str, upgraded: bool) {
    let pretty = serde_json::to_string_pretty(report).unwrap_or_default();
    for client in clients(report) {
        let context = format!("client {}\n{pretty}", str_of(client, "name"));
        assert_eq!(str_of(client, "transport"), server_side, "{context}");
        assert_eq!(
            str_of(&client["whoami"], "transport"),
            server_side,
            "the transport the server sees: {context}"
        );
        assert_eq!(client["upgraded"], Value::Bool(upgraded), "{context}");
        if upgraded {
            assert_eq!(
                str_of(client, "transportAfterUpgrade"),
                "websocket",
                "socket.io.engine.transport.name after the `upgrade` event: {context}"
            );
        }
    }
}

#[tokio::test]
async fn socketio_rooms_over_long_polling() {
    let Some(app) = start_app().await else { return };
    let report = run_scenario(&app, "polling").await;
    check_rooms(&app, &report, true);
    check_transports(&report, "polling", false);
}

#[tokio::test]
async fn socketio_rooms_over_websocket() {
    let Some(app) = start_app().await else { return };
    let report = run_scenario(&app, "websocket").await;
    check_rooms(&app, &report, true);
    check_transports(&report, "websocket", false);
    for client in clients(&report) {
        assert_eq!(str_of(client, "transportAtConnect"), "websocket");
    }
}

#[tokio::test]
async fn socketio_rooms_over_polling_upgraded_to_websocket() {
    let Some(app) = start_app().await else { return };
    let report = run_scenario(&app, "upgrade").await;
    check_rooms(&app, &report, true);
    check_transports(&report, "websocket", true);
}

#[tokio::test]
async fn socketio_long_poll_held_by_the_server_returns_through_the_gateway() {
    let Some(app) = start_app().await else { return };
    let report = run_scenario(&app, "longpoll").await;
    check_rooms(&app, &report, false);
    check_transports(&report, "polling", false);
    let pretty = serde_json::to_string_pretty(&report).unwrap_or_default();
    for client in clients(&report) {
        let name = str_of(client, "name");
        let context = format!("client {name}\n{pretty}");
        let later = client["later"].as_array().expect("later");
        if str_of(client, "room") != app.room_a.0 {
            assert!(later.is_empty(), "not for another room: {context}");
            continue;
        }
        assert_eq!(later.len(), 1, "the delayed event, once: {context}");
        assert_eq!(str_of(&later[0], "server"), app.room_a.1, "{context}");
        let held = later[0]["heldMs"].as_u64().expect("heldMs");
        assert!(
            held >= MIN_HELD_POLL_MS,
            "the GET that delivered it was held {held} ms, expected about 2000: {context}"
        );
    }
}
