//! Reloading the configuration: in-process through `Reloader`, and in the real binary on
//! SIGHUP and on a change of the file. Existing connections keep their configuration; new ones
//! follow the new routes; a broken file is refused and the running configuration stays.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use futures_util::SinkExt;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use wsgate::server::{ReloadError, Server};

fn config_for(listen: &str, backend: SocketAddr) -> String {
    format!(
        "listeners:\n  - address: {listen}\nupstreams:\n  app:\n    backends:\n      - ws://{backend}\nroutes:\n  - name: app\n    upstream: app\n"
    )
}

#[tokio::test]
async fn reload_sends_new_connections_to_new_routes_and_leaves_open_ones_alone() {
    let (a, b) = (echo_backend("a").await, echo_backend("b").await);
    let config =
        wsgate::config::from_yaml_str(&config_for("127.0.0.1:0", a.addr), "a.yaml").unwrap();
    let server = Server::bind(config).await.unwrap();
    let gateway = server.local_addrs()[0];
    let reloader = server.reloader();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));

    let mut open = connect(gateway, "/").await;
    open.send(Message::text("whoami")).await.unwrap();
    assert_eq!(next_message(&mut open).await, Message::text("a"));

    let reloaded =
        wsgate::config::from_yaml_str(&config_for("127.0.0.1:0", b.addr), "b.yaml").unwrap();
    reloader.reload(reloaded).expect("same listeners: applied");
    assert_eq!(
        backend_name(gateway, "/").await,
        "b",
        "new connections follow the new routes"
    );

    // The connection opened before the reload still talks to its backend, unharmed.
    for text in ["still here", "whoami"] {
        open.send(Message::text(text)).await.unwrap();
    }
    assert_eq!(next_message(&mut open).await, Message::text("still here"));
    assert_eq!(next_message(&mut open).await, Message::text("a"));

    let moved =
        wsgate::config::from_yaml_str(&config_for("127.0.0.1:1", b.addr), "c.yaml").unwrap();
    assert!(matches!(
        reloader.reload(moved),
        Err(ReloadError::ListenersChanged)
    ));
    assert_eq!(
        backend_name(gateway, "/").await,
        "b",
        "a refused reload changes nothing"
    );
    let renamed = wsgate::config::from_yaml_str(
        &format!(
            "{}sessions:\n  instance: another-name\n",
            config_for("127.0.0.1:0", b.addr)
        ),
        "d.yaml",
    )
    .unwrap();
    assert!(matches!(
        reloader.reload(renamed),
        Err(ReloadError::InstanceChanged)
    ));
    drop(stop);
}

struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Waits for a log line containing `needle`; returns it.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!("no log line with {needle:?}; saw:\n{}", seen.join("\n"));
    }
}

#[tokio::test]
async fn binary_reloads_on_sighup_and_on_file_change_and_refuses_a_broken_file() {
    let (a, b) = (echo_backend("a").await, echo_backend("b").await);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let gateway: SocketAddr = listen.parse().unwrap();
    let path =
        std::env::temp_dir().join(format!("wsgate-reload-{}-{port}.yaml", std::process::id()));
    std::fs::write(&path, config_for(&listen, a.addr)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["--log-format", "json", "run", "-c"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let running = Running { child, lines };
    running.wait_for("listening on");
    assert_eq!(backend_name(gateway, "/").await, "a");

    // A broken file: refused with file:line, and the gateway keeps serving the old routes.
    std::fs::write(
        &path,
        format!("{}bogus_key: 1\n", config_for(&listen, b.addr)),
    )
    .unwrap();
    let pid = running.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let refused = running.wait_for("reload refused");
    let file_line = format!("{}:10: bogus_key", path.display());
    assert!(refused.contains(&file_line), "{refused}");
    assert_eq!(backend_name(gateway, "/").await, "a");

    // A good file is picked up without a signal, by its modification time.
    tokio::time::sleep(Duration::from_millis(1100)).await; // a new mtime second on coarse clocks
    std::fs::write(&path, config_for(&listen, b.addr)).unwrap();
    running.wait_for("configuration reloaded");
    assert_eq!(backend_name(gateway, "/").await, "b");
    let _ = std::fs::remove_file(&path);
}
