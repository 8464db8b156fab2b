//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the process is up),
//! `/readyz` (accepting, and every upstream has a healthy backend), the live dashboard
//! (`/dashboard`, fed over the WebSocket `/dashboard/ws`) and the operator's API (`/api/`,
//! bearer token). It is a separate socket, optionally TLS, so that it can stay on a private
//! address while the public listeners face the internet; it still bounds its connections and
//! their heads, like any listener.

mod api;
mod dashboard;
mod snapshot;

pub use dashboard::{Dashboard, PUSH_INTERVAL};
pub use snapshot::Snapshot;

use crate::config::Admin;
use crate::gateway::{CurrentGateway, Gateway};
use crate::handover::{self, Inherited, Role};
use crate::listener::BindError;
use crate::metrics::UpstreamBackend;
use crate::stream::Stream;
use crate::tls;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// Admin connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// For a head, and for a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin socket, bound at start like the public listeners.
pub struct AdminListener {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for AdminListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminListener")
            .field("address", &self.listener.local_addr().ok())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl AdminListener {
    /// Binds `config.address`, or takes the socket a predecessor handed over for it.
    pub async fn bind(
        config: &Admin,
        inherited: Option<&mut Inherited>,
    ) -> Result<Self, BindError> {
        let tls = match &config.tls {
            Some(tls) => Some(TlsAcceptor::from(tls::server_config(tls).map_err(
                |source| BindError::Tls {
                    name: "admin".to_owned(),
                    source,
                },
            )?)),
            None => None,
        };
        let bind_error = |source| BindError::Bind {
            name: "admin".to_owned(),
            address: config.address,
            source,
        };
        let listener = match inherited.and_then(|i| i.take(Role::Admin, config.address)) {
            Some(socket) => TcpListener::from_std(socket).map_err(bind_error)?,
            None => TcpListener::bind(config.address)
                .await
                .map_err(bind_error)?,
        };
        Ok(Self { listener, tls })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A second descriptor of the listening socket, for handing it to a successor.
    pub fn handover_socket(&self) -> std::io::Result<handover::Socket> {
        Ok(handover::Socket {
            role: Role::Admin,
            address: self.listener.local_addr()?,
            fd: self.listener.as_fd().try_clone_to_owned()?,
        })
    }
}

/// Serves the admin endpoints on `admin` until `stop` completes.
pub async fn serve(
    admin: AdminListener,
    current: Arc<CurrentGateway>,
    stop: impl Future<Output = ()>,
) {
    let AdminListener { listener, tls } = admin;
    if let Ok(address) = listener.local_addr() {
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(
            "admin listener on {scheme}://{address}: /metrics, /readyz, /dashboard, /api/"
        );
    }
    tokio::pin!(stop);
    // Dropped when serving ends, which stops the pusher.
    let dashboard = Arc::new(Dashboard::start(Arc::clone(&current)));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => permit,
            () = &mut stop => return,
        };
        // The semaphore is never closed.
        let Ok(permit) = permit else { return };
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!("admin accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => return,
        };
        let current = Arc::clone(&current);
        let dashboard = Arc::clone(&dashboard);
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tls {
                None => Stream::Plain(tcp),
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => Stream::ServerTls(Box::new(tls)),
                        _ => return,
                    }
                }
            };
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let path = request.uri().path();
                let response = if path == "/dashboard/ws" {
                    dashboard.upgrade(request)
                } else if path.starts_with("/api/") {
                    api::respond(&current.get(), &request)
                } else {
                    respond(&current.get(), &request)
                };
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

fn respond(gateway: &Gateway, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/metrics" => {
            refresh_backend_health(gateway);
            let mut response = Response::new(Full::new(Bytes::from(gateway.metrics.encode())));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        "/dashboard" => Dashboard::page(),
        "/healthz" => text(StatusCode::OK, "ok"),
        "/readyz" => {
            if !gateway.drain.is_serving() {
                return text(StatusCode::SERVICE_UNAVAILABLE, "draining");
            }
            let empty: Vec<&str> = gateway
                .upstreams
                .iter()
                .filter(|u| (0..u.balancer.backends().len()).all(|i| !u.balancer.is_healthy(i)))
                .map(|u| u.name.as_str())
                .collect();
            if empty.is_empty() {
                text(StatusCode::OK, "ready")
            } else {
                let line = format!("no healthy backend in: {}", empty.join(", "));
                text(StatusCode::SERVICE_UNAVAILABLE, &line)
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz, /dashboard or /api/upstreams",
        ),
    }
}

/// Health is state, not an event: the gauge is set from the balancers at every scrape.
fn refresh_backend_health(gateway: &Gateway) {
    for upstream in &gateway.upstreams {
        for (index, backend) in upstream.balancer.backends().iter().enumerate() {
            let labels = UpstreamBackend {
                upstream: upstream.name.clone(),
                backend: backend.url.clone(),
            };
            let healthy = i64::from(upstream.balancer.is_healthy(index));
            gateway
                .metrics
                .backend_healthy
                .get_or_create(&labels)
                .set(healthy);
        }
    }
}

fn text(status: StatusCode, line: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{line}\n"))));
    *response.status_mut() = status;
    response
}
