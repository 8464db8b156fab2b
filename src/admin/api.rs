//! The operator's API on the admin listener, under `/api/`: list upstreams and their backends,
//! say where sticky keys are placed now, drain a backend and put it back, set its weight,
//! start the gradual drain of the instance.
//!
//! Invariants:
//! - every request carries `Authorization: Bearer <admin.token>` (compared in constant time);
//!   without a configured token the API answers 404 and changes nothing;
//! - an action changes runtime state only (a backend's drained bit or weight, the drain
//!   phase), never the configuration: it lasts until undone or until a reload changes that
//!   backend's configuration;
//! - every action is logged (target `wsgate::admin`) and counted
//!   (`wsgate_admin_actions_total{action}`), refused ones included.

use crate::config::Backend;
use crate::gateway::{Gateway, UpstreamRuntime};
use crate::metrics::AdminAction;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use std::borrow::Cow;

#[derive(Serialize)]
struct Upstreams<'a> {
    /// The instance is draining (out of rotation, or closing its connections).
    draining: bool,
    upstreams: Vec<UpstreamState<'a>>,
}

#[derive(Serialize)]
struct UpstreamState<'a> {
    name: &'a str,
    backends: Vec<BackendState<'a>>,
}

#[derive(Serialize)]
struct BackendState<'a> {
    url: &'a str,
    weight: u32,
    /// "up", or what keeps it out: "drained", "down", "backoff" (comma-separated).
    state: String,
    drained: bool,
    /// Connections and requests open to it now.
    active: u32,
}

/// Answers a request under `/api/`.
pub fn respond<B>(gateway: &Gateway, request: &Request<B>) -> Response<Full<Bytes>> {
    let Some(token) = gateway.config.admin.as_ref().and_then(|a| a.token.as_ref()) else {
        return text(
            StatusCode::NOT_FOUND,
            "the admin API is off: set admin.token or admin.token_env",
        );
    };
    let offered = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "));
    if !offered.is_some_and(|offered| token.matches(offered)) {
        count(gateway, "unauthorized");
        tracing::warn!(target: "wsgate::admin", "admin API request refused: missing or wrong bearer token");
        let mut response = text(StatusCode::UNAUTHORIZED, "a valid bearer token is needed");
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"wsgate-admin\""),
        );
        return response;
    }
    let path = request.uri().path();
    let query = request.uri().query().unwrap_or("");
    match (request.method(), path) {
        (&Method::GET, "/api/upstreams") => list(gateway),
        (&Method::GET, "/api/placement") => placement(gateway, query),
        (&Method::POST, "/api/backends/drain") => set_drained(gateway, query, true),
        (&Method::POST, "/api/backends/restore") => set_drained(gateway, query, false),
        (&Method::POST, "/api/backends/weight") => set_weight(gateway, query),
        (&Method::POST, "/api/drain") => drain_instance(gateway),
        (_, "/api/upstreams" | "/api/placement") => not_allowed("GET"),
        (_, "/api/backends/drain" | "/api/backends/restore" | "/api/drain") => not_allowed("POST"),
        _ => text(
            StatusCode::NOT_FOUND,
            "unknown API path: GET /api/upstreams, GET /api/placement, POST /api/backends/drain, \
             POST /api/backends/restore, POST /api/backends/weight, POST /api/drain",
        ),
    }
}

fn list(gateway: &Gateway) -> Response<Full<Bytes>> {
    let upstreams = gateway
        .upstreams
        .iter()
        .map(|upstream| {
            let balancer = &upstream.balancer;
            let backends = balancer
                .backends()
                .iter()
                .enumerate()
                .map(|(index, backend)| BackendState {
                    url: &backend.url,
                    weight: balancer.weight(index),
                    state: balancer.state_label(index),
                    drained: balancer.is_drained(index),
                    active: balancer.active(index),
                })
                .collect();
            UpstreamState {
                name: &upstream.name,
                backends,
            }
        })
        .collect();
    json(
        StatusCode::OK,
        &Upstreams {
            draining: !gateway.drain.is_serving(),
            upstreams,
        },
    )
}

/// Keys answered per placement request; more are asked in several requests.
const MAX_PLACEMENT_KEYS: usize = 2000;

#[derive(Serialize)]
struct Placement<'a> {
    upstream: &'a str,
    /// Per key, in the order asked: the backend a new connection with that sticky key gets
    /// now, or `null` when none is available.
    placement: Vec<Placed<'a>>,
}

#[derive(Serialize)]
struct Placed<'a> {
    key: Cow<'a, str>,
    backend: Option<&'a str>,
}

/// `GET /api/placement?upstream=NAME&key=K1&key=K2...`: where each sticky key goes now on
/// this instance. Read-only; comparing the answers of every instance shows whether they
/// place rooms alike.
fn placement(gateway: &Gateway, query: &str) -> Answer {
    let Some(name) = param(query, "upstream") else {
        count(gateway, "bad_request");
        return text(
            StatusCode::BAD_REQUEST,
            "name the upstream and the keys: ?upstream=NAME&key=K1&key=K2",
        );
    };
    let Some(upstream) = gateway.upstreams.iter().find(|u| u.name == name) else {
        count(gateway, "bad_request");
        return text(
            StatusCode::NOT_FOUND,
            &format!("no upstream named {name:?}"),
        );
    };
    let keys: Vec<Cow<'_, str>> = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(name, _)| *name == "key")
        .filter_map(|(_, value)| {
            percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .ok()
        })
        .collect();
    if keys.len() > MAX_PLACEMENT_KEYS {
        count(gateway, "bad_request");
        return text(
            StatusCode::BAD_REQUEST,
            &format!("at most {MAX_PLACEMENT_KEYS} keys per request"),
        );
    }
    let balancer = &upstream.balancer;
    let placement = keys
        .into_iter()
        .map(|key| {
            let backend = balancer
                .choose(Some(&key))
                .map(|index| balancer.backends()[index].url.as_str());
            Placed { key, backend }
        })
        .collect();
    json(
        StatusCode::OK,
        &Placement {
            upstream: &upstream.name,
            placement,
        },
    )
}

type Answer = Response<Full<Bytes>>;
/// An upstream, a backend's index in it, and the backend's URL.
type NamedBackend<'g> = (&'g UpstreamRuntime, usize, String);

/// The backend named by `?upstream=NAME&backend=URL` (the URL as in the configuration,
/// percent-encoded or not): its balancer and index, or the answer saying what is wrong.
fn named_backend<'g>(gateway: &'g Gateway, query: &str) -> Result<NamedBackend<'g>, Box<Answer>> {
    let (upstream_name, backend_url) = (param(query, "upstream"), param(query, "backend"));
    let (Some(upstream_name), Some(backend_url)) = (upstream_name, backend_url) else {
        count(gateway, "bad_request");
        return Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            "name the backend: ?upstream=NAME&backend=URL",
        )));
    };
    let Some(upstream) = gateway.upstreams.iter().find(|u| u.name == upstream_name) else {
        count(gateway, "bad_request");
        return Err(Box::new(text(
            StatusCode::NOT_FOUND,
            &format!("no upstream named {upstream_name:?}"),
        )));
    };
    let Some(index) = upstream
        .balancer
        .backends()
        .iter()
        .position(|backend| backend.url == backend_url)
    else {
        count(gateway, "bad_request");
        return Err(Box::new(text(
            StatusCode::NOT_FOUND,
            &format!("upstream {upstream_name} has no backend {backend_url:?}"),
        )));
    };
    Ok((upstream, index, backend_url.into_owned()))
}

fn set_drained(gateway: &Gateway, query: &str, drained: bool) -> Response<Full<Bytes>> {
    let action = if drained { "drain" } else { "restore" };
    let (upstream, index, backend_url) = match named_backend(gateway, query) {
        Ok(found) => found,
        Err(answer) => return *answer,
    };
    let balancer = &upstream.balancer;
    let changed = balancer.set_drained(index, drained);
    if changed {
        let why = if drained {
            "drained by an operator"
        } else {
            "put back by an operator"
        };
        balancer.record_change(index, std::time::SystemTime::now(), why.to_owned());
    }
    count(gateway, action);
    tracing::warn!(
        target: "wsgate::admin",
        upstream = %upstream.name,
        backend = %backend_url,
        changed,
        "admin API: {action} backend"
    );
    let state = if drained {
        "drained: no new connections; its sticky keys move within the rebalance window"
    } else {
        "back in service"
    };
    let line = if changed {
        format!("{backend_url} {state}")
    } else {
        format!(
            "{backend_url} was already {}",
            if drained { "drained" } else { "in service" }
        )
    };
    text(StatusCode::OK, &line)
}

/// `?upstream=NAME&backend=URL&weight=N`, N from 1 to [`Backend::MAX_WEIGHT`].
fn set_weight(gateway: &Gateway, query: &str) -> Response<Full<Bytes>> {
    let (upstream, index, backend_url) = match named_backend(gateway, query) {
        Ok(found) => found,
        Err(answer) => return *answer,
    };
    let weight = param(query, "weight").and_then(|w| w.parse::<u32>().ok());
    let Some(weight) = weight.filter(|w| (1..=Backend::MAX_WEIGHT).contains(w)) else {
        count(gateway, "bad_request");
        return text(
            StatusCode::BAD_REQUEST,
            &format!("give a weight from 1 to {}: &weight=N", Backend::MAX_WEIGHT),
        );
    };
    let changed = upstream.balancer.set_weight(index, weight);
    count(gateway, "weight");
    tracing::warn!(
        target: "wsgate::admin",
        upstream = %upstream.name,
        backend = %backend_url,
        weight,
        changed,
        "admin API: set backend weight"
    );
    text(
        StatusCode::OK,
        &format!(
            "{backend_url} weight {weight}; sticky keys that move go within the rebalance window"
        ),
    )
}

fn drain_instance(gateway: &Gateway) -> Response<Full<Bytes>> {
    let started = gateway.drain.leave();
    count(gateway, "drain_instance");
    tracing::warn!(target: "wsgate::admin", started, "admin API: drain the instance");
    let line = if started {
        "draining: out of rotation now, then connections close spread over drain.spread"
    } else {
        "already draining"
    };
    text(StatusCode::ACCEPTED, line)
}

fn param<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| {
            percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .ok()
        })
}

fn count(gateway: &Gateway, action: &'static str) {
    gateway
        .metrics
        .admin_actions
        .get_or_create(&AdminAction { action })
        .inc();
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, &format!("use {allow}"));
    response
        .headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
    response
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(error) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode the answer: {error}"),
        ),
    }
}

fn text(status: StatusCode, line: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{line}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
