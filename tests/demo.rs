//! The demo, started the way the README says (`wsgate demo`, here with the demo config moved to
//! free ports): the chat page is served through the gateway, two clients in one room talk
//! through it, a client in another room hears nothing. Clients are tokio-tungstenite.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use futures_util::{SinkExt, StreamExt};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

struct Demo {
    child: Child,
    gateway: SocketAddr,
    _config: tempfile_path::TempPath,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

mod tempfile_path {
    /// A file removed when dropped.
    pub struct TempPath(pub std::path::PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `wsgate demo` on config/wsgate.yaml with its three ports replaced by free ones.
fn start_demo() -> Demo {
    let config =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/wsgate.yaml"))
            .unwrap();
    let gateway_port = free_port();
    let config = config
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{gateway_port}"))
        .replace("127.0.0.1:9101", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:9102", &format!("127.0.0.1:{}", free_port()));
    let path = std::env::temp_dir().join(format!(
        "wsgate-demo-{}-{gateway_port}.yaml",
        std::process::id()
    ));
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["demo", "-c"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("wsgate demo starts");
    // Readiness: the line that tells the user which address to open.
    let stderr = child.stderr.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("demo chat: open http://") {
                let _ = ready_tx.send(Ok(()));
            }
            seen.push(line);
        }
        let _ = ready_tx.send(Err(seen.join("\n")));
    });
    match ready_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(())) => {}
        Ok(Err(output)) => panic!("wsgate demo exited before it was ready:\n{output}"),
        Err(_) => panic!("wsgate demo did not announce its address within 30 s"),
    }
    Demo {
        child,
        gateway: SocketAddr::from(([127, 0, 0, 1], gateway_port)),
        _config: tempfile_path::TempPath(path),
    }
}

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn join(demo: &Demo, room: &str, user: &str) -> Client {
    let url = format!("ws://{}/rooms/{room}?user={user}", demo.gateway);
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("the demo accepts a WebSocket");
    ws
}

/// The next chat event of `kind`, skipping others; `None` if none comes within `wait`.
async fn next_event(ws: &mut Client, kind: &str, wait: Duration) -> Option<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let message = tokio::time::timeout_at(deadline, ws.next())
            .await
            .ok()??
            .ok()?;
        if let Message::Text(text) = message {
            let event: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
            if event["type"] == kind {
                return Some(event);
            }
        }
    }
}

#[tokio::test]
async fn demo_serves_the_chat_page_through_the_gateway() {
    let demo = start_demo();
    let response = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(demo.gateway).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        drop(demo);
        response
    })
    .await
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("set-cookie: wsgate_affinity="),
        "{response}"
    );
    assert!(
        response.contains("/.wsgate/client.js") && response.contains("new WsgateSocket("),
        "the page uses the gateway's session client"
    );
}

#[tokio::test]
async fn demo_two_clients_in_a_room_talk_and_another_room_hears_nothing() {
    let demo = start_demo();
    let mut alice = join(&demo, "lobby", "alice").await;
    let mut bob = join(&demo, "lobby", "bob").await;
    let mut carol = join(&demo, "kitchen", "carol").await;
    // Alice sees Bob arrive, so both are in the room before anyone speaks.
    next_event(&mut alice, "joined", Duration::from_secs(10))
        .await
        .expect("bob's join notice");

    alice
        .send(Message::text(
            r#"{"type":"message","room":"lobby","text":"hello bob"}"#,
        ))
        .await
        .unwrap();
    let heard = next_event(&mut bob, "message", Duration::from_secs(10))
        .await
        .expect("bob hears alice");
    assert_eq!(heard["text"], "hello bob");
    assert_eq!(heard["user"], "alice");
    bob.send(Message::text(
        r#"{"type":"message","room":"lobby","text":"hi alice"}"#,
    ))
    .await
    .unwrap();
    let heard = next_event(&mut alice, "message", Duration::from_secs(10))
        .await
        .expect("alice hears bob");
    assert_eq!(heard["text"], "hi alice");

    assert!(
        next_event(&mut carol, "message", Duration::from_millis(500))
            .await
            .is_none(),
        "a client in another room must not see lobby messages"
    );
    // A late joiner gets the room's history, from the same backend instance.
    let mut dave = join(&demo, "lobby", "dave").await;
    let history = next_event(&mut dave, "history", Duration::from_secs(10))
        .await
        .expect("history on join");
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["hello bob", "hi alice"]);
    assert_eq!(history["server"], heard["server"], "one room, one backend");
}

#[test]
fn demo_without_a_config_file_runs_from_any_directory() {
    let dir = std::env::temp_dir().join(format!("wsgate-demo-cwd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .arg("demo")
        .current_dir(&dir)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("wsgate demo starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The built-in config's fixed ports may be taken on a shared machine: failing to bind them
    // still shows the configuration was loaded, which is what a missing file prevents.
    let mut seen = Vec::new();
    let verdict = loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains("demo chat: open http://127.0.0.1:8080/") => break Ok(()),
            Ok(line) if line.contains("cannot listen") || line.contains("in use") => {
                break Ok(());
            }
            Ok(line) => seen.push(line),
            Err(_) => break Err(seen.join("\n")),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir(&dir);
    if let Err(output) = verdict {
        panic!("wsgate demo did not start from another directory:\n{output}");
    }
}
