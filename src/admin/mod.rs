//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the process is up),
//! `/readyz` (accepting, and every upstream has a healthy backend) and the live dashboard
//! (`/dashboard`, fed over the WebSocket `/dashboard/ws`). It is a separate socket so that it
//! can stay on a private address while the public listeners face the internet.

mod dashboard;
mod snapshot;

pub use dashboard::{Dashboard, PUSH_INTERVAL};
pub use snapshot::Snapshot;

use crate::gateway::{CurrentGateway, Gateway};
use crate::metrics::UpstreamBackend;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Serves the admin endpoints on `listener` until `stop` completes.
pub async fn serve(
    listener: TcpListener,
    current: Arc<CurrentGateway>,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    // Dropped when serving ends, which stops the pusher.
    let dashboard = Arc::new(Dashboard::start(Arc::clone(&current)));
    loop {
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
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = match request.uri().path() {
                    "/dashboard/ws" => dashboard.upgrade(request),
                    _ => respond(&current.get(), &request),
                };
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
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
            "not found: try /metrics, /healthz, /readyz or /dashboard",
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
