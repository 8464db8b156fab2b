//! A plain-HTTP backend for the proxy tests: a hyper 1.x server (HTTP/1.1) that also accepts a
//! WebSocket upgrade through fastwebsockets, plus raw backends that misbehave at the TCP level.
//!
//! The action is chosen by the last segment of the request path, so the same backend serves
//! behind routes with any path prefix (`/a/echo` and `/echo` are both the echo):
//!
//! - `echo`: streams the request body back as it arrives, frame by frame (the response body
//!   *is* the request body; nothing is collected);
//! - `chunks?n=5&delay_ms=200`: a chunked response of `n` chunks `chunk <i>\n`, one every
//!   `delay_ms`; [`HttpBackend::chunks_sent`] counts the chunks handed to hyper;
//! - `hold?ms=3000`: answers `held <ms>ms` after `ms` milliseconds (a long-poll);
//! - `status?code=404`: answers that status with the body `<name>: status <code>\n`;
//! - `drop-before`: closes the connection without answering;
//! - `drop-mid?framing=chunked|length`: sends the head and part of the body, then closes
//!   100 ms later;
//! - `hop-response`: an answer carrying hop-by-hop header fields, and `x-end-to-end: kept`;
//! - `ws` with an upgrade (any path, in fact): a WebSocket that answers the text `whoami` with
//!   the backend's name and echoes everything else;
//! - anything else: a JSON description of the request (see [`Info`]).
//!
//! Every HTTP response carries `x-backend: <name>`.
#![allow(dead_code)] // each test uses a different part

use bytes::Bytes;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame as BodyFrame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

pub type BackendBody = BoxBody<Bytes, io::Error>;

/// A body fed through a channel: each `Ok` item is one data frame, an `Err` fails the body
/// (hyper then aborts the connection), and dropping the sender ends it.
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|result| result.map(BodyFrame::data)))
    }
}

/// A body and the sender that feeds it; `capacity` frames may wait in between.
pub fn channel_body(capacity: usize) -> (mpsc::Sender<io::Result<Bytes>>, ChannelBody) {
    let (tx, rx) = mpsc::channel(capacity);
    (tx, ChannelBody { rx })
}

/// What the default action answers: the request as the backend received it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Info {
    pub name: String,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Every field in order, names lowercase (as hyper gives them).
    pub headers: Vec<(String, String)>,
    /// The request body, lossily as UTF-8.
    pub body: String,
}

impl Info {
    /// Every value of `name` (case-insensitive), in order.
    pub fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The only value of `name`; fails the test if it is missing or repeated.
    pub fn one(&self, name: &str) -> &str {
        match self.values(name)[..] {
            [value] => value,
            ref other => panic!("expected one {name} field, got {other:?} in {self:#?}"),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        !self.values(name).is_empty()
    }
}

/// A running hyper backend.
#[derive(Debug)]
pub struct HttpBackend {
    pub addr: SocketAddr,
    pub name: String,
    /// Chunks handed to hyper by `chunks` responses so far.
    pub chunks_sent: Arc<AtomicUsize>,
    /// TCP connections accepted so far.
    pub connections: Arc<AtomicUsize>,
}

struct Shared {
    name: String,
    chunks_sent: Arc<AtomicUsize>,
}

pub async fn http_backend(name: &str) -> HttpBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let chunks_sent = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let shared = Arc::new(Shared {
        name: name.to_owned(),
        chunks_sent: Arc::clone(&chunks_sent),
    });
    let accepted = Arc::clone(&connections);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_connection(stream, Arc::clone(&shared)));
        }
    });
    HttpBackend {
        addr,
        name: name.to_owned(),
        chunks_sent,
        connections,
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |request| {
        let shared = Arc::clone(&shared);
        async move { handle(request, &shared).await }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
}

/// The value of query parameter `name` (no percent-decoding: tests use plain values).
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

fn number(query: Option<&str>, name: &str, default: u64) -> u64 {
    query_param(query, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn full(body: impl Into<Bytes>) -> BackendBody {
    Full::new(body.into())
        .map_err(|never: std::convert::Infallible| match never {})
        .boxed()
}

fn respond(shared: &Shared, status: StatusCode, body: BackendBody) -> Response<BackendBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("x-backend", shared.name.parse().unwrap());
    response
}

/// `Err` makes hyper close the connection without answering.
async fn handle(
    mut request: Request<Incoming>,
    shared: &Shared,
) -> Result<Response<BackendBody>, io::Error> {
    if fastwebsockets::upgrade::is_upgrade_request(&request) {
        return Ok(websocket(&mut request, shared));
    }
    let path = request.uri().path().to_owned();
    let query = request.uri().query().map(str::to_owned);
    let query = query.as_deref();
    let action = path.rsplit('/').next().unwrap_or("");
    let response = match action {
        "echo" => {
            let body = request.into_body().map_err(io::Error::other).boxed();
            respond(shared, StatusCode::OK, body)
        }
        "chunks" => {
            let n = number(query, "n", 5);
            let delay = Duration::from_millis(number(query, "delay_ms", 200));
            let (tx, body) = channel_body(1);
            let sent = Arc::clone(&shared.chunks_sent);
            tokio::spawn(async move {
                for i in 0..n {
                    if i > 0 {
                        tokio::time::sleep(delay).await;
                    }
                    if tx
                        .send(Ok(Bytes::from(format!("chunk {i}\n"))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                }
            });
            respond(shared, StatusCode::OK, body.boxed())
        }
        "hold" => {
            let ms = number(query, "ms", 3000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            respond(shared, StatusCode::OK, full(format!("held {ms}ms")))
        }
        "status" => {
            let code = number(query, "code", 200) as u16;
            let status = StatusCode::from_u16(code).expect("a valid status");
            let mut response = respond(
                shared,
                status,
                full(format!("{}: status {code}\n", shared.name)),
            );
            response
                .headers_mut()
                .insert("content-type", "text/plain; charset=utf-8".parse().unwrap());
            response
        }
        "drop-before" => {
            return Err(io::Error::other("dropping the connection before answering"));
        }
        "drop-mid" => {
            let (tx, body) = channel_body(2);
            tx.send(Ok(Bytes::from_static(b"partial "))).await.unwrap();
            // The error comes later: hyper writes out the head and the first part when the
            // body has nothing more for now; failing at once would drop them unsent.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let error = io::Error::other("dropping the connection mid-response");
                let _ = tx.send(Err(error)).await;
            });
            let mut response = respond(shared, StatusCode::OK, body.boxed());
            if query_param(query, "framing") == Some("length") {
                response
                    .headers_mut()
                    .insert("content-length", "1000".parse().unwrap());
            }
            response
        }
        "hop-response" => {
            let mut response = respond(shared, StatusCode::OK, full("hop"));
            let headers = response.headers_mut();
            for (name, value) in [
                ("connection", "x-backend-hop"),
                ("x-backend-hop", "listed in connection"),
                ("keep-alive", "timeout=5, max=100"),
                ("proxy-connection", "keep-alive"),
                ("upgrade", "h2c"),
                ("x-end-to-end", "kept"),
            ] {
                headers.append(name, value.parse().unwrap());
            }
            response
        }
        _ => {
            let method = request.method().to_string();
            let headers = request
                .headers()
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let body = request
                .into_body()
                .collect()
                .await
                .map_err(io::Error::other)?;
            let info = Info {
                name: shared.name.clone(),
                method,
                path,
                query: query.map(str::to_owned),
                headers,
                body: String::from_utf8_lossy(&body.to_bytes()).into_owned(),
            };
            let mut response = respond(
                shared,
                StatusCode::OK,
                full(serde_json::to_vec(&info).unwrap()),
            );
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            response
        }
    };
    Ok(response)
}

fn websocket(request: &mut Request<Incoming>, shared: &Shared) -> Response<BackendBody> {
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(request) {
        Ok(upgrade) => upgrade,
        Err(error) => return respond(shared, StatusCode::BAD_REQUEST, full(error.to_string())),
    };
    let name = shared.name.clone();
    tokio::spawn(async move {
        let Ok(ws) = upgrade.await else { return };
        let mut ws = FragmentCollector::new(ws);
        while let Ok(frame) = ws.read_frame().await {
            let reply = match frame.opcode {
                OpCode::Text if &frame.payload[..] == b"whoami" => {
                    Frame::text(Payload::Owned(name.clone().into_bytes()))
                }
                OpCode::Text => Frame::text(Payload::Owned(frame.payload.to_vec())),
                OpCode::Binary => Frame::binary(Payload::Owned(frame.payload.to_vec())),
                OpCode::Close => return,
                _ => continue,
            };
            if ws.write_frame(reply).await.is_err() {
                return;
            }
        }
    });
    let (parts, _) = response.into_parts();
    let mut response = Response::from_parts(parts, full(Bytes::new()));
    response
        .headers_mut()
        .insert("x-backend", shared.name.parse().unwrap());
    response
}

/// A backend that accepts TCP connections and never reads or answers; the connections stay
/// open for as long as the test runs. The watch counts the connections accepted.
pub async fn silent_backend() -> (SocketAddr, watch::Receiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (count, accepted) = watch::channel(0);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
            count.send_replace(held.len());
        }
    });
    (addr, accepted)
}

/// An address nothing listens on: a port the OS handed out and that was closed again.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}
