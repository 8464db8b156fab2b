//! Plain HTTP on the same listeners: a connection whose first request is not a WebSocket
//! upgrade is served by hyper from then on. Each request is routed like a WebSocket (same
//! route table, same sticky choice, so a client's page loads, long-polls and WebSocket reach
//! one backend) and reverse-proxied with streaming bodies both ways; hop-by-hop headers are
//! removed and forwarding headers added. A WebSocket upgrade later on the same keep-alive
//! connection goes through [`super::websocket::decide`] and the relay like any other.

use super::body::{BodyFault, ClientBody, Tracked};
use super::websocket::{self, Acceptance, Decision};
use crate::client_addr::ClientAddr;
use crate::cluster::{self, Ingress, Owner, forward::Routed};
use crate::config::Route;
use crate::drain::Phase;
use crate::forwarded::{ForwardedHeaders, is_hop_by_hop_response};
use crate::gateway::{Gateway, ListenerIndex};
use crate::metrics::HttpRequest;
use crate::proto::handshake::{self, RequestHead};
use crate::routing::{self, RequestParts};
use crate::session::{
    self,
    websocket::{SessionSocket, UpgradeKind},
};
use crate::stream::{Rewind, Stream};
use crate::upstream::{self, Refusal};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
use tokio::time::Instant;

type Body = BoxBody<Bytes, hyper::Error>;

/// A WebSocket accepted on this connection, to serve once hyper hands the socket over.
type PendingUpgrade = Arc<Mutex<Option<(hyper::upgrade::OnUpgrade, Accepted)>>>;

#[derive(Debug)]
enum Accepted {
    Relay(Box<Acceptance>),
    Session(Box<SessionSocket>),
    /// A session WebSocket carried to the instance owning the session.
    Tunnel(Box<cluster::tunnel::Answer>),
}

/// Serves a plain-HTTP connection; `prefix` is what was read of it already. Returns when the
/// connection is over, including a WebSocket it was upgraded to, so the caller's connection
/// count covers the whole life of the socket.
pub async fn serve(
    gateway: Arc<Gateway>,
    stream: Stream,
    hop: SocketAddr,
    tls: bool,
    listener: usize,
    prefix: Vec<u8>,
) {
    let io = TokioIo::new(Rewind::new(prefix, stream));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(gateway.config.timeouts.handshake)
        // hyper's minimum buffer is 8 KiB; the configured head limit applies above that.
        .max_buf_size(gateway.config.limits.max_header_bytes.max(8192));
    let pending: PendingUpgrade = Arc::default();
    let service = hyper::service::service_fn({
        let gateway = Arc::clone(&gateway);
        let pending = Arc::clone(&pending);
        move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ListenerIndex(listener));
            // Each request of a trusted proxy's connection names its own client.
            let trusted = &gateway.config.listeners[listener].trusted_proxies;
            let peer = ClientAddr::of_header_map(hop, request.headers(), trusted);
            let gateway = Arc::clone(&gateway);
            let pending = Arc::clone(&pending);
            async move { Ok::<_, Infallible>(handle(gateway, peer, tls, request, pending).await) }
        }
    });
    let connection = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(connection);
    let mut drain = gateway.drain.subscribe();
    let result = tokio::select! {
        result = connection.as_mut() => result,
        true = async {
            drain.wait_for(|phase| matches!(phase, Phase::Closing(_))).await.is_ok()
        } => {
            // Finish the request in flight, then close instead of keeping the connection alive.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        let peer = ClientAddr::direct(hop);
        tracing::debug!(client = %peer, "HTTP connection ended: {error}");
        // A later request on the connection that hyper refused itself: counted like the
        // first request's refusals, so a slowloris on keep-alive requests shows too.
        let refused = if error.is_timeout() {
            Some((
                Some(408),
                "head_timeout",
                "request head not received in time",
            ))
        } else if error.is_parse_too_large() {
            Some((Some(431), "head_too_large", "request head too large"))
        } else if error.is_parse() {
            Some((Some(400), "malformed", "malformed request"))
        } else {
            None
        };
        if let Some((status, reason, line)) = refused {
            gateway.refused(listener, status, reason, peer, line);
        }
    }
    let upgrade = pending.lock().ok().and_then(|mut slot| slot.take());
    if let Some((on_upgrade, accepted)) = upgrade {
        let started = Instant::now();
        if let Ok(upgraded) = on_upgrade.await {
            let client = Stream::Upgraded(Box::new(TokioIo::new(upgraded)));
            match accepted {
                Accepted::Relay(acceptance) => acceptance.relay(client, &[], started).await,
                Accepted::Session(socket) => socket.serve(client, &[]).await,
                Accepted::Tunnel(answer) => answer.carry(client, true).await,
            }
        }
    }
}

async fn handle(
    gateway: Arc<Gateway>,
    peer: ClientAddr,
    tls: bool,
    mut request: Request<Incoming>,
    pending: PendingUpgrade,
) -> Response<Body> {
    if let Some(response) = sanitise(&mut request) {
        return response;
    }
    let listener = request.extensions().get::<ListenerIndex>().map(|l| l.0);
    let ingress = cluster::ingress(&gateway, listener, &fields(&request));
    if let Ingress::Refused(line) = ingress {
        if let Some(listener) = listener {
            gateway.refused(listener, Some(403), "peer", peer, line);
        }
        return plain(403, line);
    }
    let wants_websocket = request
        .headers()
        .get_all(hyper::header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(handshake::headers::split_list)
        .any(|token| token.eq_ignore_ascii_case("websocket"));
    if wants_websocket {
        return upgrade(&gateway, peer, tls, ingress, request, pending).await;
    }
    if request.uri().path() == session::CLIENT_PATH {
        return client_library(&request);
    }
    let hosts = request.headers().get_all(hyper::header::HOST);
    if request.version() == Version::HTTP_11 && hosts.iter().count() != 1 {
        // RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without exactly one Host.
        return plain(400, "exactly one Host header is required");
    }
    let host = hosts.iter().next().and_then(|v| v.to_str().ok());
    let from_peer = matches!(ingress, Ingress::Peer { .. });
    match gateway.routes.route(host, request.uri().path()) {
        Some(route) if gateway.config.sessions.enabled => {
            let query = request.uri().query().map(str::to_owned);
            match session::protocol::parse_query(query.as_deref()) {
                Ok(None) if from_peer => plain(403, "peers forward session requests only"),
                Ok(Some(query)) if from_peer && query.sid.is_none() => {
                    plain(403, "peers forward requests of existing sessions only")
                }
                Ok(None) => routed(&gateway, route, peer, tls, request).await,
                Ok(Some(query)) => {
                    let (request, peer, tls) = match query.sid.as_deref() {
                        None => (request, peer, tls),
                        Some(sid) => {
                            let op = query.op.name();
                            let origin = request
                                .headers()
                                .get(hyper::header::ORIGIN)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            match cluster::forward::route(
                                &gateway, sid, op, ingress, request, peer, tls,
                            )
                            .await
                            {
                                Routed::Local(request, peer, tls) => (request, peer, tls),
                                Routed::Answered(answer) => return answer,
                                Routed::Gone => {
                                    return session::http::gone(
                                        &gateway,
                                        route,
                                        op,
                                        origin.as_deref(),
                                    );
                                }
                            }
                        }
                    };
                    let owned = owned_fields(&request);
                    let headers: Vec<httparse::Header<'_>> = owned
                        .iter()
                        .map(|(name, value)| httparse::Header { name, value })
                        .collect();
                    session::http::handle(&gateway, route, query, request, &headers, peer, tls)
                        .await
                }
                Err(line) => session::http::malformed(&gateway, route, &request, &line),
            }
        }
        _ if from_peer => plain(403, "peers forward session requests only"),
        Some(route) => routed(&gateway, route, peer, tls, request).await,
        None => plain(404, "no route for this host and path"),
    }
}

/// The refusal for what must not be routed or forwarded as it is (body framing another parser
/// could read differently, a Host that is not a host, a path whose escapes hide its
/// structure); `None` once the target is replaced by its normalised form, which is what routes
/// match and backends get.
fn sanitise(request: &mut Request<Incoming>) -> Option<Response<Body>> {
    if let Err((status, line)) = handshake::headers::check_framing(&fields(request)) {
        return Some(closing(status, line));
    }
    let hosts = request.headers().get_all(hyper::header::HOST);
    if hosts
        .iter()
        .any(|host| !host.to_str().is_ok_and(handshake::headers::is_valid_host))
    {
        return Some(plain(
            400,
            "Host must be a host name or an IP literal, with an optional port",
        ));
    }
    let normalised = match routing::path::normalise_target(target(request)) {
        Ok(Cow::Borrowed(_)) => return None,
        Ok(Cow::Owned(normalised)) => normalised,
        Err(error) => return Some(plain(400, &error.to_string())),
    };
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = PathAndQuery::try_from(normalised).ok();
    match Uri::from_parts(parts) {
        Ok(uri) => {
            *request.uri_mut() = uri;
            None
        }
        Err(_) => Some(plain(400, "malformed request target")),
    }
}

/// The session client library, from the binary: the same version as the gateway speaking to it.
fn client_library(request: &Request<Incoming>) -> Response<Body> {
    if request.method() != hyper::Method::GET && request.method() != hyper::Method::HEAD {
        let mut response = plain(405, "the client library is read with GET");
        response
            .headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let mut response = Response::new(
        Full::new(Bytes::from_static(session::CLIENT_JS.as_bytes()))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    headers.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}

/// Proxies a routed plain-HTTP request and counts it.
async fn routed(
    gateway: &Arc<Gateway>,
    route: usize,
    peer: ClientAddr,
    tls: bool,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let response = match authorize_request(gateway, route, peer, tls, &mut request).await {
        // Held while the request is proxied (a subject's slot, on routes that count them).
        Ok(_authorized) => proxy(gateway, route, peer, tls, request).await,
        Err(refusal) => refusal_response(refusal),
    };
    let labels = HttpRequest {
        route: gateway.route(route).name.clone(),
        status: response.status().as_u16().to_string(),
    };
    gateway.metrics.http_requests.get_or_create(&labels).inc();
    response
}

/// The route's auth for a plain request, as for an upgrade: refused before any backend is
/// picked; an admitted request goes on with the token out of its URL and the identity headers
/// in place of any the client sent.
async fn authorize_request(
    gateway: &Arc<Gateway>,
    route: usize,
    peer: ClientAddr,
    tls: bool,
    request: &mut Request<Incoming>,
) -> Result<Option<crate::authorize::Authorized>, Refusal> {
    let authorized = {
        let headers = fields(request);
        let head = RequestHead {
            method: request.method().as_str(),
            target: target(request),
            version: minor_version(request),
            headers: &headers,
        };
        crate::authorize::authorize(gateway, route, &head, peer, tls).await?
    };
    if let Some(authorized) = &authorized {
        authorized.rewrite_http(request)?;
    }
    Ok(authorized)
}

/// The request's header fields, copied, for a request whose body is consumed while its head
/// is still needed (the session layer).
fn owned_fields(request: &Request<Incoming>) -> Vec<(String, Vec<u8>)> {
    request
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect()
}

/// The request's head in the form the handshake code reads.
fn fields(request: &Request<Incoming>) -> Vec<httparse::Header<'_>> {
    request
        .headers()
        .iter()
        .map(|(name, value)| httparse::Header {
            name: name.as_str(),
            value: value.as_bytes(),
        })
        .collect()
}

fn target(request: &Request<Incoming>) -> &str {
    request
        .uri()
        .path_and_query()
        .map_or("/", |target| target.as_str())
}

fn minor_version(request: &Request<Incoming>) -> u8 {
    u8::from(request.version() != Version::HTTP_10)
}

async fn upgrade(
    gateway: &Arc<Gateway>,
    peer: ClientAddr,
    tls: bool,
    ingress: Ingress,
    mut request: Request<Incoming>,
    pending: PendingUpgrade,
) -> Response<Body> {
    let on_upgrade = hyper::upgrade::on(&mut request);
    let headers = fields(&request);
    let head = RequestHead {
        method: request.method().as_str(),
        target: target(&request),
        version: minor_version(&request),
        headers: &headers,
    };
    let from_peer = matches!(ingress, Ingress::Peer { .. });
    let (peer, tls) = match ingress {
        Ingress::Peer { client, tls } => (client, tls),
        Ingress::Client | Ingress::Refused(_) => (peer, tls),
    };
    let session = session::websocket::classify(gateway, &head);
    match (&session, from_peer) {
        (UpgradeKind::Session(_, query), true) if query.sid.is_none() => {
            return plain(403, "peers forward requests of existing sessions only");
        }
        (UpgradeKind::Plain | UpgradeKind::Invalid(_), true) => {
            return plain(403, "peers forward session requests only");
        }
        _ => {}
    }
    if let Some(response) = session_upgrade(
        gateway,
        session,
        &head,
        (peer, tls, ingress),
        on_upgrade.clone(),
        &pending,
    )
    .await
    {
        return response;
    }
    let acceptance = match websocket::decide(gateway, &head, peer, tls).await {
        Decision::Refuse(refusal) => {
            gateway.count_rule(request.extensions().get::<ListenerIndex>(), &refusal);
            return refusal_response(refusal);
        }
        Decision::Accept(acceptance) => acceptance,
    };
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(hyper::header::UPGRADE, "websocket")
        .header(hyper::header::CONNECTION, "Upgrade")
        .header("sec-websocket-accept", acceptance.accept.as_str());
    if let Some(protocol) = &acceptance.protocol {
        response = response.header("sec-websocket-protocol", protocol.as_str());
    }
    if let Some(extensions) = &acceptance.extensions {
        response = response.header("sec-websocket-extensions", extensions.as_str());
    }
    if let Some(cookie) = &acceptance.set_cookie {
        response = response.header(hyper::header::SET_COOKIE, cookie.as_str());
    }
    if let Ok(mut slot) = pending.lock() {
        *slot = Some((on_upgrade, Accepted::Relay(acceptance)));
    }
    response
        .body(empty())
        .unwrap_or_else(|_| plain(500, "cannot build the 101 response"))
}

/// A `wsgate=socket` upgrade: the session layer's WebSocket. `None` for any other upgrade.
async fn session_upgrade(
    gateway: &Arc<Gateway>,
    kind: UpgradeKind<'_>,
    head: &RequestHead<'_, '_>,
    (peer, tls, ingress): (ClientAddr, bool, Ingress),
    on_upgrade: hyper::upgrade::OnUpgrade,
    pending: &PendingUpgrade,
) -> Option<Response<Body>> {
    let (route, query) = match kind {
        UpgradeKind::Plain => return None,
        UpgradeKind::Invalid(line) => return Some(plain(400, &line)),
        UpgradeKind::Session(route, query) => (route, query),
    };
    if let Some(sid) = query.sid.as_deref()
        && let Owner::Peer(owner) = cluster::owner(gateway, sid, ingress, "socket")
        && let Some(answer) = cluster::tunnel::open(gateway, owner, head, &[], peer, tls).await
    {
        return Some(tunnel_answer(answer, on_upgrade, pending).await);
    }
    let socket = match session::websocket::decide(gateway, route, head, &query, peer, tls).await {
        Ok(socket) => socket,
        Err(refusal) => return Some(refusal_response(refusal)),
    };
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(hyper::header::UPGRADE, "websocket")
        .header(hyper::header::CONNECTION, "Upgrade")
        .header("sec-websocket-accept", socket.accept.as_str());
    if let Some(protocol) = &socket.protocol {
        response = response.header("sec-websocket-protocol", protocol.as_str());
    }
    if let Some(cookie) = &socket.set_cookie {
        response = response.header(hyper::header::SET_COOKIE, cookie.as_str());
    }
    if let Ok(mut slot) = pending.lock() {
        *slot = Some((on_upgrade, Accepted::Session(Box::new(socket))));
    }
    Some(
        response
            .body(empty())
            .unwrap_or_else(|_| plain(500, "cannot build the 101 response")),
    )
}

/// The owner's answer to a forwarded session WebSocket, as hyper's response: a 101 whose
/// connection is carried to the owner once upgraded, or the owner's refusal.
async fn tunnel_answer(
    answer: cluster::tunnel::Answer,
    on_upgrade: hyper::upgrade::OnUpgrade,
    pending: &PendingUpgrade,
) -> Response<Body> {
    let mut response = Response::builder().status(answer.status);
    for (name, value) in answer.headers() {
        let lower = name.to_ascii_lowercase();
        if answer.status != 101
            && matches!(
                lower.as_str(),
                "content-length" | "transfer-encoding" | "connection"
            )
        {
            continue;
        }
        response = response.header(name, value);
    }
    if answer.status == 101 {
        if let Ok(mut slot) = pending.lock() {
            *slot = Some((on_upgrade, Accepted::Tunnel(Box::new(answer))));
        }
        return response
            .body(empty())
            .unwrap_or_else(|_| plain(502, "cannot carry the session owner's answer"));
    }
    let body = answer.refusal_body().await;
    response
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never: Infallible| match never {})
                .boxed(),
        )
        .unwrap_or_else(|_| plain(502, "cannot carry the session owner's answer"))
}

/// RFC 9110 §9.2.2: a request that may be sent twice. Only these are retried, although a
/// backend that could not be reached has seen nothing of any request.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

async fn proxy(
    gateway: &Arc<Gateway>,
    route_index: usize,
    peer: ClientAddr,
    tls: bool,
    request: Request<Incoming>,
) -> Response<Body> {
    let route = gateway.route(route_index);
    let upstream = &gateway.upstreams[route.upstream];
    let headers = fields(&request);
    let head = RequestHead {
        method: request.method().as_str(),
        target: target(&request),
        version: minor_version(&request),
        headers: &headers,
    };
    let parts = RequestParts {
        path: head.path(),
        query: head.query(),
        headers: head.headers,
        client_ip: peer.ip(),
    };
    let Some(mut pick) = gateway.pick_backend(route_index, &parts, tls) else {
        return plain(503, "no healthy backend for this route");
    };
    // Connected before the request is built: nothing of it, body included, is consumed until
    // a backend is reached, so another backend can be tried.
    let retries = if is_idempotent(request.method()) {
        usize::from(route.connect_retries)
    } else {
        0
    };
    let connect_timeout = gateway.config.upstreams[route.upstream].connect_timeout;
    let mut tried = [0usize; Route::MAX_CONNECT_RETRIES as usize + 1];
    let mut attempts = 0;
    let (mut sender, backend_slot) = loop {
        // Held until the client has read the whole response, so least-connections counts
        // long downloads and held long-polls as the busy connections they are.
        let backend_slot = upstream.balancer.acquire(pick.index);
        let backend = &upstream.balancer.backends()[pick.index];
        let connecting = Instant::now();
        let connected = tokio::time::timeout(connect_timeout, async {
            let stream = upstream::connect(backend, upstream.tls.as_ref()).await?;
            hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|error| upstream::UpstreamError::Io {
                    backend: backend.url.clone(),
                    source: std::io::Error::other(error),
                })
        })
        .await;
        let failure = match connected {
            Ok(Ok((sender, connection))) => {
                crate::health::observe_connect(gateway, route.upstream, pick.index, None);
                upstream
                    .connect_seconds
                    .observe(connecting.elapsed().as_secs_f64());
                if attempts > 0 {
                    gateway.metrics.retried(&route.name, true);
                }
                tokio::spawn(connection);
                break (sender, backend_slot);
            }
            Ok(Err(error)) => {
                crate::health::observe_connect(gateway, route.upstream, pick.index, Some(&error));
                let reach = error.is_reach_failure();
                let answer = backend_failure(error.status(), peer, route, &backend.url, &error);
                (reach, answer)
            }
            Err(_) => {
                crate::health::observe_connect_timeout(
                    gateway,
                    route.upstream,
                    pick.index,
                    connect_timeout,
                );
                let why = "did not accept the connection in time";
                (true, backend_failure(504, peer, route, &backend.url, &why))
            }
        };
        if attempts > 0 {
            gateway.metrics.retried(&route.name, false);
        }
        let (reach_failure, answer) = failure;
        tried[attempts] = pick.index;
        attempts += 1;
        let next = (reach_failure && attempts <= retries)
            .then(|| gateway.repick_backend(route_index, &pick, &tried[..attempts], tls))
            .flatten();
        match next {
            Some(next) => {
                tracing::info!(client = %peer, route = %route.name, from = %backend.url, "retrying on another backend");
                pick = next;
            }
            None => return answer,
        }
    };
    let backend = &upstream.balancer.backends()[pick.index];

    // Everything the outgoing request needs is copied out, so the body can be moved.
    let forwarded = ForwardedHeaders::new(&head, peer, tls);
    let mut outgoing = Request::builder()
        .method(request.method().clone())
        .uri(format!("{}{}", backend.base_path, head.target))
        .version(Version::HTTP_11);
    if let Some(host) = head.header("host") {
        outgoing = outgoing.header(hyper::header::HOST, host);
    }
    for (name, value) in forwarded.fields(&head, false) {
        outgoing = outgoing.header(name, value);
    }
    let body = hyper::body::Body::size_hint(request.body());
    if !hyper::body::Body::is_end_stream(request.body()) && body.exact().is_none() {
        // A chunked body: hyper's client sends none for a GET, HEAD or CONNECT unless told,
        // and the client's body would be lost. It is forwarded, as nginx does.
        outgoing = outgoing.header(hyper::header::TRANSFER_ENCODING, "chunked");
    }
    let (body_sent, body_done) = oneshot::channel();
    let (body, body_fault) = ClientBody::new(
        request.into_body(),
        body_sent,
        route.timeouts.body,
        route.timeouts.body_total,
    );
    let outgoing = match outgoing.body(body) {
        Ok(outgoing) => outgoing,
        Err(error) => return plain(400, &format!("cannot forward this request: {error}")),
    };

    // A long-poll may legitimately be held by the backend; only the route's idle timeout, when
    // set, bounds the wait for the response head, counted from the end of the request body so
    // a slow upload is not mistaken for a silent backend.
    let sent = sender.send_request(outgoing);
    let response = match route.timeouts.idle {
        Some(idle) => {
            let silence = async {
                let _ = body_done.await;
                tokio::time::sleep(idle).await;
            };
            tokio::select! {
                result = sent => result,
                () = silence => {
                    let why = "did not answer in time";
                    return backend_failure(504, peer, route, &backend.url, &why);
                }
            }
        }
        None => sent.await,
    };
    let response = match response {
        Ok(response) => response,
        Err(error) => {
            let fault = body_fault.lock().ok().and_then(|fault| *fault);
            return match fault {
                // The client's doing: answered as such, and not logged as the backend's.
                Some(BodyFault::TimedOut) => {
                    tracing::debug!(client = %peer, route = %route.name, "request body stalled");
                    closing(408, "request body not received in time")
                }
                Some(BodyFault::Malformed) => {
                    tracing::debug!(client = %peer, route = %route.name, "{error}");
                    closing(400, "malformed request body")
                }
                None => {
                    let why = format!("request failed: {error}");
                    backend_failure(502, peer, route, &backend.url, &why)
                }
            };
        }
    };
    if response.status().is_informational() {
        // hyper passes a 101 on as a final answer; this request asked for no upgrade.
        let why = format!(
            "answered {} to a request that asked for no upgrade",
            response.status().as_u16()
        );
        return backend_failure(502, peer, route, &backend.url, &why);
    }
    let (mut parts, body) = response.into_parts();
    let listed: Vec<String> = parts
        .headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(handshake::headers::split_list)
        .map(str::to_ascii_lowercase)
        .collect();
    let dropped: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|name| {
            is_hop_by_hop_response(name.as_str()) || listed.iter().any(|l| l == name.as_str())
        })
        .cloned()
        .collect();
    for name in dropped {
        parts.headers.remove(name);
    }
    if let Some(cookie) = pick.set_cookie
        && let Ok(value) = HeaderValue::from_str(&cookie)
    {
        parts.headers.append(hyper::header::SET_COOKIE, value);
    }
    Response::from_parts(parts, Tracked::new(body, None, backend_slot).boxed())
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A refusal after which the connection is closed: the rest of the request cannot be trusted
/// to be where its framing says.
fn closing(status: u16, line: &str) -> Response<Body> {
    let mut response = plain(status, line);
    response
        .headers_mut()
        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A backend's failure: the details to the log, a generic answer with the same request id to
/// the client (see [`crate::incident`]).
fn backend_failure(
    status: u16,
    peer: ClientAddr,
    route: &crate::config::Route,
    backend: &str,
    why: &dyn std::fmt::Display,
) -> Response<Body> {
    let request_id = crate::incident::request_id();
    tracing::warn!(client = %peer, route = %route.name, %backend, %request_id, "backend: {why}");
    refusal_response(crate::incident::refusal(status, &request_id))
}

fn plain(status: u16, line: &str) -> Response<Body> {
    refusal_response(Refusal::plain(status, line, &[]))
}

fn refusal_response(refusal: Refusal) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(refusal.body))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *response.status_mut() =
        StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_GATEWAY);
    for (name, value) in refusal.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(&value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response
}
