//! Binary upgrades with `wsgate run --handover PATH`: a second process takes the listening
//! sockets of the running one over a Unix socket, with clients connecting all along. Not one
//! connection attempt may be refused or reset; the old process's connections keep flowing
//! until its spread closes them, then it exits 0; listeners added or removed by the new
//! configuration take effect.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use futures_util::{SinkExt, StreamExt};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const WSGATE: &str = env!("CARGO_BIN_EXE_wsgate");
const WAIT: Duration = Duration::from_secs(20);

/// On an address of its own (127.0.0.7), so that the ports other tests bind meanwhile on
/// 127.0.0.1 cannot take it before the gateway does.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.7:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("wsgate-handover-{}-{name}", std::process::id()))
}

/// A spawned `wsgate run`, killed on drop; stderr in a file for failure messages.
struct Gateway {
    child: Child,
    log: PathBuf,
}

impl Gateway {
    fn start(tag: &str, yaml: &str, socket: &PathBuf) -> Self {
        let config = temp(&format!("{tag}.yaml"));
        std::fs::write(&config, yaml).unwrap();
        let log = temp(&format!("{tag}.log"));
        let child = Command::new(WSGATE)
            .args(["run", "-c", config.to_str().unwrap(), "--handover"])
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Gateway { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log().contains(text) {
            assert!(Instant::now() < deadline, "no {text:?} in:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "still running:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn yaml(listeners: &[SocketAddr], admin: SocketAddr, backend: SocketAddr) -> String {
    let mut yaml = String::from("listeners:\n");
    for listener in listeners {
        yaml.push_str(&format!("  - address: {listener}\n"));
    }
    yaml.push_str(&format!(
        "upstreams:\n  app:\n    backends: [ws://{backend}]\nroutes:\n  - upstream: app\n\
         admin:\n  address: {admin}\n\
         drain:\n  readiness_delay: 0s\n  spread: 2s\n  deadline: 10s\n"
    ));
    yaml
}

/// One whole client: handshake, one echo, close.
async fn one_client(addr: SocketAddr) -> Result<(), String> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    ws.send(Message::text("ping"))
        .await
        .map_err(|e| e.to_string())?;
    match ws.next().await {
        Some(Ok(Message::Text(text))) if text.as_str() == "ping" => {}
        other => return Err(format!("echo: {other:?}")),
    }
    ws.close(None).await.map_err(|e| e.to_string())?;
    while let Some(Ok(_)) = ws.next().await {}
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_takes_the_sockets_without_refusing_a_connection() {
    let backend = echo_backend("only").await;
    let (kept, removed, added, admin) = (free_port(), free_port(), free_port(), free_port());
    let socket = temp("control.sock");
    let old_yaml = yaml(&[kept, removed], admin, backend.addr);
    let new_yaml = yaml(&[kept, added], admin, backend.addr);

    let mut old = Gateway::start("old", &old_yaml, &socket);
    old.wait_for_log("serving hand-overs").await;
    let mut long_lived = Vec::new();
    for _ in 0..5 {
        let mut ws = connect(kept, "/").await;
        ws.send(Message::text("before")).await.unwrap();
        assert_eq!(
            next_message(&mut ws).await.into_text().unwrap().as_str(),
            "before"
        );
        long_lived.push(ws);
    }

    // Clients at a steady rate, from before the hand-over until after the old process is gone.
    let stop = Arc::new(AtomicBool::new(false));
    let (attempts, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, attempts, failures) = (stop.clone(), attempts.clone(), failures.clone());
        tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            let mut running = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                attempts.fetch_add(1, Ordering::SeqCst);
                running.push(tokio::spawn(one_client(kept)));
            }
            for client in running {
                if let Err(error) = client.await.unwrap() {
                    failures.fetch_add(1, Ordering::SeqCst);
                    errors.push(error);
                }
            }
            errors
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A successor that dies half-way (takes the list, never says ready) and one that speaks
    // nonsense change nothing: the old process goes on serving and awaits the next.
    {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let mut quitter = tokio::net::UnixStream::connect(&socket).await.unwrap();
        quitter.write_all(b"wsgate-handover 1\n").await.unwrap();
        let mut listing = String::new();
        BufReader::new(&mut quitter)
            .read_line(&mut listing)
            .await
            .unwrap();
        assert!(listing.contains(&kept.to_string()), "{listing}");
        drop(quitter);
        let mut stranger = tokio::net::UnixStream::connect(&socket).await.unwrap();
        stranger.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        drop(stranger);
        old.wait_for_log("hand-over failed, still serving").await;
        one_client(kept).await.unwrap();
    }

    let new = Gateway::start("new", &new_yaml, &socket);
    new.wait_for_log("took over the listening sockets").await;
    // The old process's connections still flow after the hand-over (but the first turns of
    // its spread, which start at once)...
    let handed_over = Instant::now();
    let mut flowing = 0;
    let mut closes = Vec::new();
    for mut ws in long_lived {
        ws.send(Message::text("after")).await.unwrap();
        let answer = next_message(&mut ws).await;
        flowing += usize::from(answer.is_text());
        closes.push(tokio::spawn(async move {
            let code = if answer.is_close() {
                answer_code(&answer)
            } else {
                close_frame(&mut ws).await.map(|f| u16::from(f.code))
            };
            let at = handed_over.elapsed();
            // Polling on sends tungstenite's close reply.
            while let Some(Ok(_)) = ws.next().await {}
            (code, at)
        }));
    }
    assert!(
        flowing >= 3,
        "only {flowing} of 5 old connections still flowed"
    );
    // ...until its turn in the old process's spread, and the old process exits 0.
    assert_eq!(old.wait_exit().await, Some(0), "{}", old.log());
    assert!(old.log().contains("handed over"), "{}", old.log());
    let mut at = Vec::new();
    for close in closes {
        let (code, when) = close.await.unwrap();
        assert_eq!(code, Some(1001));
        at.push(when);
    }
    let spread = *at.iter().max().unwrap() - *at.iter().min().unwrap();
    assert!(
        spread >= Duration::from_millis(800),
        "closes not spread: {at:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let errors = load.await.unwrap();

    let (attempts, failures) = (
        attempts.load(Ordering::SeqCst),
        failures.load(Ordering::SeqCst),
    );
    println!("{attempts} connection attempts during the hand-over, {failures} failed");
    assert!(attempts > 200, "only {attempts} attempts");
    assert_eq!(
        failures,
        0,
        "{errors:?}\nold:\n{}\nnew:\n{}",
        old.log(),
        new.log()
    );

    // The new configuration's listeners: added one serves, removed one is gone.
    one_client(added).await.unwrap();
    one_client(kept).await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(removed).await.is_err(),
        "{removed} still open"
    );
    let (status, _) = http_get(admin, "/readyz").await;
    assert_eq!(status, 200, "the admin listener moved to the new process");
    drop(new);
    let _ = std::fs::remove_file(&socket);
}

fn answer_code(message: &Message) -> Option<u16> {
    match message {
        Message::Close(frame) => frame.as_ref().map(|f| u16::from(f.code)),
        _ => None,
    }
}
