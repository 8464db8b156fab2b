//! A cluster of wsgate processes on 127.0.0.1 for tests: three instances (the real binary,
//! so one can be killed), each with a client listener, a peer listener and an admin listener
//! on free ports, every instance knowing the others; a test L4 spreader in front that sends
//! each new TCP connection to a random live instance, optionally announcing the client with a
//! PROXY protocol v2 header as a cloud balancer does; and room backends (tokio-tungstenite)
//! that can be stopped and started again on the same port.
//!
//! Instances are killed when dropped.
#![allow(dead_code)] // each test binary uses a different part of the harness

use futures_util::{SinkExt, StreamExt};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

pub const SECRET: &str = "cluster-test-secret-0123456789abcdef";
pub const ADMIN_TOKEN: &str = "cluster-test-admin-token";

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
}

/// What every instance's configuration has besides its listeners and cluster section.
#[derive(Debug, Clone)]
pub struct Spec {
    pub backends: Vec<SocketAddr>,
    /// Keys added to the upstream `chat` (indented by the harness).
    pub upstream_extra: String,
    /// Keys added to the route `chat` (path `/`).
    pub route_extra: String,
    /// Top-level sections added as they are.
    pub top_extra: String,
    /// Keys added to the listener `clients`.
    pub client_listener_extra: String,
    /// Whether the spreader starts each connection with a PROXY v2 header naming the client.
    pub spreader_proxy_v2: bool,
}

impl Spec {
    pub fn new(backends: &[SocketAddr]) -> Self {
        Self {
            backends: backends.to_vec(),
            upstream_extra: String::new(),
            route_extra: "sticky: {query: room}".to_owned(),
            top_extra: String::new(),
            client_listener_extra: String::new(),
            spreader_proxy_v2: false,
        }
    }
}

/// One wsgate process.
#[derive(Debug)]
pub struct Instance {
    pub name: String,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    pub admin: SocketAddr,
    config: PathBuf,
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Instance {
    pub fn alive(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: the process ends without a goodbye, its connections reset by the kernel.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Rewrites the configuration file and sends SIGHUP; waits for the reload to apply.
    pub async fn reload(&self, yaml: &str) {
        let before = self.count_lines("configuration reloaded");
        std::fs::write(&self.config, yaml).unwrap();
        let pid = self
            .child
            .as_ref()
            .expect("a live instance")
            .id()
            .to_string();
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.count_lines("configuration reloaded") == before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not reload: {:?}",
                self.name,
                self.lines.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn count_lines(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// The log so far, for failure messages.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Three instances and a spreader in front of them.
#[derive(Debug)]
pub struct Cluster {
    pub instances: Vec<Instance>,
    pub spreader: Spreader,
    pub spec: Spec,
}

/// The configuration of instance `me` among `all` (name, client, peer, admin addresses).
pub fn config_for(
    spec: &Spec,
    me: usize,
    all: &[(String, SocketAddr, SocketAddr, SocketAddr)],
) -> String {
    let (name, client, peer, admin) = &all[me];
    let mut yaml = format!("listeners:\n  - name: clients\n    address: {client}\n");
    for line in spec
        .client_listener_extra
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml.push_str(&format!(
        "  - name: peers\n    address: {peer}\nupstreams:\n  chat:\n    backends:\n"
    ));
    for backend in &spec.backends {
        yaml.push_str(&format!("      - ws://{backend}\n"));
    }
    for line in spec.upstream_extra.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml.push_str("routes:\n  - name: chat\n    upstream: chat\n");
    for line in spec.route_extra.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml.push_str(&format!(
        "admin:\n  address: {admin}\n  token: {ADMIN_TOKEN}\ncluster:\n  name: {name}\n  secret: {SECRET}\n  listener: peers\n  peers:\n"
    ));
    // The same list on every instance, this one included (it skips itself).
    for (name, _, peer, _) in all {
        yaml.push_str(&format!("    - name: {name}\n      address: {peer}\n"));
    }
    yaml.push_str(&spec.top_extra);
    yaml
}

impl Cluster {
    /// Starts three instances on free ports. A port found free can be taken by a parallel
    /// test before an instance binds it: an instance that exits before it is ready makes the
    /// whole cluster start again on other ports.
    pub async fn start(spec: Spec) -> Cluster {
        for _ in 0..3 {
            if let Some(instances) = Self::try_start(&spec).await {
                let targets = instances.iter().map(|i| i.client).collect();
                let spreader = if spec.spreader_proxy_v2 {
                    Spreader::start_proxy_v2(targets).await
                } else {
                    Spreader::start(targets).await
                };
                return Cluster {
                    instances,
                    spreader,
                    spec,
                };
            }
        }
        panic!("the cluster did not start in three attempts");
    }

    async fn try_start(spec: &Spec) -> Option<Vec<Instance>> {
        let all: Vec<_> = (1..=3)
            .map(|i| (format!("gw-{i}"), free_addr(), free_addr(), free_addr()))
            .collect();
        let mut instances = Vec::new();
        for (i, (name, client, peer, admin)) in all.iter().enumerate() {
            let config = std::env::temp_dir().join(format!(
                "wsgate-cluster-{}-{}.yaml",
                std::process::id(),
                client.port()
            ));
            std::fs::write(&config, config_for(spec, i, &all)).unwrap();
            let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
                .args(["run", "-c"])
                .arg(&config)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("wsgate starts");
            let lines = Arc::new(Mutex::new(Vec::new()));
            let stderr = child.stderr.take().unwrap();
            let sink = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
            instances.push(Instance {
                name: name.clone(),
                client: *client,
                peer: *peer,
                admin: *admin,
                config,
                child: Some(child),
                lines,
            });
        }
        for instance in &mut instances {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(child) = instance.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    eprintln!(
                        "{} exited ({status}), starting over: {}",
                        instance.name,
                        instance.log()
                    );
                    return None;
                }
                let ready = TcpStream::connect(instance.client).await.is_ok()
                    && TcpStream::connect(instance.peer).await.is_ok()
                    && TcpStream::connect(instance.admin).await.is_ok();
                if ready {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} did not start: {}",
                    instance.name,
                    instance.log()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Some(instances)
    }

    /// The configuration instance `index` runs with `spec`.
    pub fn config(&self, spec: &Spec, index: usize) -> String {
        let all: Vec<_> = self
            .instances
            .iter()
            .map(|i| (i.name.clone(), i.client, i.peer, i.admin))
            .collect();
        config_for(spec, index, &all)
    }

    pub fn instance_named(&self, name: &str) -> &Instance {
        self.instances
            .iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("no instance {name}"))
    }
}

/// A test L4 load balancer: each accepted TCP connection is carried to a random instance;
/// an instance that refuses the connection (killed) is skipped, like a balancer's failed
/// connect is retried on another target.
#[derive(Debug)]
pub struct Spreader {
    pub addr: SocketAddr,
    /// Connections carried to each target, by position.
    pub carried: Arc<Mutex<Vec<usize>>>,
}

impl Spreader {
    pub async fn start(targets: Vec<SocketAddr>) -> Spreader {
        Self::start_with(targets, false).await
    }

    /// A spreader that starts every connection it carries with a PROXY protocol v2 header
    /// naming the client's address and the address it reached.
    pub async fn start_proxy_v2(targets: Vec<SocketAddr>) -> Spreader {
        Self::start_with(targets, true).await
    }

    async fn start_with(targets: Vec<SocketAddr>, proxy_v2: bool) -> Spreader {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let carried = Arc::new(Mutex::new(vec![0; targets.len()]));
        let counts = Arc::clone(&carried);
        tokio::spawn(async move {
            loop {
                let Ok((mut client, from)) = listener.accept().await else {
                    return;
                };
                let targets = targets.clone();
                let counts = Arc::clone(&counts);
                tokio::spawn(async move {
                    let mut order: Vec<usize> = (0..targets.len()).collect();
                    // A random order: the first that accepts takes the connection.
                    for i in (1..order.len()).rev() {
                        order.swap(i, rand::random_range(0..=i));
                    }
                    for index in order {
                        if let Ok(mut upstream) = TcpStream::connect(targets[index]).await {
                            counts.lock().unwrap()[index] += 1;
                            if proxy_v2 {
                                let header = proxy_v2_header(from, addr);
                                if upstream.write_all(&header).await.is_err() {
                                    return;
                                }
                            }
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                            return;
                        }
                    }
                });
            }
        });
        Spreader { addr, carried }
    }
}

/// A PROXY protocol v2 header (haproxy's proxy-protocol.txt §2.2) for a TCP connection over
/// IPv4 from `source` to `destination`, written out here rather than by the crate the gateway
/// parses it with.
fn proxy_v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(source), SocketAddr::V4(destination)) = (source, destination) else {
        panic!("the spreader listens on IPv4 loopback");
    };
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    // Version 2, PROXY; TCP over IPv4; 12 bytes of addresses.
    header.extend_from_slice(&[0x21, 0x11, 0, 12]);
    header.extend_from_slice(&source.ip().octets());
    header.extend_from_slice(&destination.ip().octets());
    header.extend_from_slice(&source.port().to_be_bytes());
    header.extend_from_slice(&destination.port().to_be_bytes());
    header
}

/// A room backend: a tokio-tungstenite echo server that answers `whoami` with its name, on a
/// fixed address so it can be stopped (its connections cut) and started again.
#[derive(Debug)]
pub struct RoomBackend {
    pub addr: SocketAddr,
    pub name: String,
    stop: Option<watch::Sender<bool>>,
}

impl RoomBackend {
    pub async fn start(name: &str) -> RoomBackend {
        let mut backend = RoomBackend {
            addr: free_addr(),
            name: name.to_owned(),
            stop: None,
        };
        backend.resume().await;
        backend
    }

    /// Starts serving again on the same address.
    pub async fn resume(&mut self) {
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (stop, stopped) = watch::channel(false);
        self.stop = Some(stop);
        let name = self.name.clone();
        tokio::spawn(async move {
            let mut halt = stopped.clone();
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = halt.changed() => return,
                };
                let Ok((stream, _)) = accepted else { return };
                let name = name.clone();
                let mut halt = stopped.clone();
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    loop {
                        let message = tokio::select! {
                            message = ws.next() => message,
                            _ = halt.changed() => return,
                        };
                        let Some(Ok(message)) = message else { return };
                        let reply = match message {
                            Message::Text(text) if text.as_str() == "whoami" => {
                                Message::text(name.clone())
                            }
                            Message::Text(_) | Message::Binary(_) => message,
                            _ => continue,
                        };
                        if ws.send(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }

    /// Stops listening and cuts every connection (the sockets are dropped).
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
    }
}

impl Drop for RoomBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `GET path` on the admin listener with the bearer token: status and body.
pub async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(admin).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("an admin answer within 10 s")
        .unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Where `keys` go now on the instance with admin listener `admin`, in order (`None`: no
/// backend available), asked in batches.
pub async fn placement(admin: SocketAddr, keys: &[String]) -> Vec<Option<String>> {
    let mut placed = Vec::with_capacity(keys.len());
    for batch in keys.chunks(1000) {
        let mut path = String::from("/api/placement?upstream=chat");
        for key in batch {
            path.push_str("&key=");
            path.push_str(key);
        }
        let (status, body) = admin_get(admin, &path).await;
        assert_eq!(status, 200, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        for entry in answer["placement"].as_array().unwrap() {
            placed.push(entry["backend"].as_str().map(str::to_owned));
        }
    }
    assert_eq!(placed.len(), keys.len());
    placed
}

/// Writes one HTTP/1.1 request on a new connection and reads the answer to its end.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    exchange(tcp, method, target, headers, body).await
}

/// A TCP connection to `addr` from the local address `from` (127.0.0.x).
pub async fn tcp_from(from: &str, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Writes one HTTP/1.1 request on `tcp` and reads the answer to its end.
pub async fn exchange(
    mut tcp: TcpStream,
    method: &str,
    target: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(40), tcp.read_to_end(&mut answer))
        .await
        .expect("an answer within 40 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The number in a metrics exposition for the series starting with `prefix`, summed.
pub fn metric_sum(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Opens a long-polling session for `room` through `addr`; its id.
pub async fn open_session(addr: SocketAddr, room: &str) -> String {
    let (status, body) = request(
        addr,
        "POST",
        &format!("/chat?room={room}&wsgate=open"),
        "",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let opened: serde_json::Value = serde_json::from_str(&body).unwrap();
    opened["session"].as_str().unwrap().to_owned()
}
