//! A route's `auth` applied to a request, for WebSocket clients, sessions and plain requests
//! alike: the token (or the auth service's verdict) checked (see [`crate::auth`]), refusals
//! counted per route and reason and recorded for the dashboard, the subject's connection slot
//! taken, and what the admitted request becomes on its way to the backend.
//!
//! Called by [`crate::admit::open_backend`] after the origin, handshake-rate and route-limit
//! checks (so a flood is refused before it costs a signature check or an auth-service call)
//! and before the sticky pick (which may route by a claim) and any backend connection. Never
//! logs a token: only fixed reasons are rendered.

use crate::auth::forward::{ForwardClient, Verdict};
use crate::auth::jwt::Rejection;
use crate::auth::remote::FetchError;
use crate::auth::{self, Failure, RouteAuth, SubjectSlot};
use crate::client_addr::ClientAddr;
use crate::gateway::Gateway;
use crate::proto::CloseCode;
use crate::proto::handshake::RequestHead;
use crate::recent_errors::{ErrorKind, RecentErrors};
use crate::relay::{Credentials, Refresh, VerifyRefresh};
use crate::upstream::Refusal;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::time::Instant;

/// An authenticated request: what the backend request becomes, and what the connection
/// holds while it lives.
#[derive(Debug)]
pub struct Authorized {
    /// The target the backend sees, when it differs from the client's (a token removed).
    pub target: Option<String>,
    /// The subprotocol offer the backend sees, when it differs from the client's.
    pub protocols: Option<Option<String>>,
    /// Headers the gateway sets for the backend (from claims or the auth service).
    pub identity: Vec<(String, String)>,
    /// Header names whose client copies never reach the backend.
    replaced: Vec<String>,
    /// The token's `sub`, which a session is bound to.
    pub subject: Option<String>,
    /// When the credentials stop being valid, in Unix seconds.
    valid_until: Option<u64>,
    expired_close_code: u16,
    /// Held against `max_connections_per_subject` until the connection ends.
    pub subject_slot: Option<SubjectSlot>,
}

/// When an authenticated connection is closed, and with which code for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    pub at: Instant,
    pub code: CloseCode,
}

impl Authorized {
    /// The instant the credentials stop being valid, on the runtime's clock; `None` for a
    /// token without `exp`, one valid for more than [`auth::MAX_ENFORCED_VALIDITY`], and for
    /// forward auth.
    pub fn expiry(&self) -> Option<Expiry> {
        let remaining = auth::remaining(self.valid_until?, SystemTime::now())?;
        Some(Expiry {
            at: Instant::now().checked_add(remaining)?,
            code: CloseCode(self.expired_close_code),
        })
    }

    /// What the relay enforces for the connection's life, on routes with `auth.jwt`: the
    /// expiry, and with `refresh`, how a token presented in-band is checked (valid, and for
    /// the same subject). `None` where there is nothing to enforce.
    pub fn relay_credentials(
        &self,
        gateway: &Arc<Gateway>,
        route: usize,
        peer: ClientAddr,
    ) -> Option<(Credentials, VerifyRefresh)> {
        let refresh = gateway
            .auth
            .get(route)
            .and_then(Option::as_ref)
            .is_some_and(|auth| auth.config.refresh);
        let expiry = self.expiry();
        if expiry.is_none() && !refresh {
            return None;
        }
        let credentials = Credentials {
            expires_at: expiry.map(|e| e.at.into_std()),
            expired_code: CloseCode(self.expired_close_code),
            refresh,
            presented: None,
            last_presented: None,
        };
        let (gateway, subject) = (Arc::clone(gateway), self.subject.clone());
        let verify = VerifyRefresh::new(move |token| {
            refreshed(&gateway, route, subject.as_deref(), token, peer)
        });
        Some((credentials, verify))
    }

    /// Rewrites a plain HTTP request as its backend gets it: the token out of its URL, the
    /// identity headers in place of any the client sent under those names.
    pub fn rewrite_http<B>(&self, request: &mut hyper::Request<B>) -> Result<(), Refusal> {
        let headers = request.headers_mut();
        for name in &self.replaced {
            headers.remove(name.as_str());
        }
        for (name, value) in &self.identity {
            // Names were checked as tokens by the configuration, values as free of control
            // characters by the verifier; anything else is refused rather than dropped.
            let name = hyper::header::HeaderName::from_bytes(name.as_bytes());
            let value = hyper::header::HeaderValue::from_bytes(value.as_bytes());
            let (Ok(name), Ok(value)) = (name, value) else {
                return Err(Failure::UnfitClaim.refusal());
            };
            headers.append(name, value);
        }
        if let Some(target) = &self.target {
            let uri = target
                .parse::<hyper::Uri>()
                .map_err(|_| Refusal::plain(400, "malformed request target", &[]))?;
            *request.uri_mut() = uri;
        }
        Ok(())
    }

    /// The client's headers as the backend gets them: the gateway's identity headers instead
    /// of any the client sent under those names.
    pub fn backend_headers<'a>(
        &'a self,
        client: &[httparse::Header<'a>],
    ) -> Vec<httparse::Header<'a>> {
        let mut headers: Vec<httparse::Header<'a>> = client
            .iter()
            .filter(|h| !self.replaced.iter().any(|r| h.name.eq_ignore_ascii_case(r)))
            .copied()
            .collect();
        headers.extend(self.identity.iter().map(|(name, value)| httparse::Header {
            name: name.as_str(),
            value: value.as_bytes(),
        }));
        headers
    }
}

/// The request the backend sees: `head` with the target and headers `authorized` replaced
/// (`headers` from [`Authorized::backend_headers`]); `head` itself on routes without auth.
pub fn backend_head<'a>(
    head: RequestHead<'a, 'a>,
    authorized: Option<&'a Authorized>,
    headers: Option<&'a [httparse::Header<'a>]>,
) -> RequestHead<'a, 'a> {
    match (authorized, headers) {
        (Some(authorized), Some(headers)) => RequestHead {
            method: head.method,
            target: authorized.target.as_deref().unwrap_or(head.target),
            version: head.version,
            headers,
        },
        _ => head,
    }
}

/// The subprotocol offer the backend sees: the client's, less a token carried in it.
pub fn backend_protocols<'a>(
    authorized: Option<&'a Authorized>,
    offered: Option<&'a str>,
) -> Option<&'a str> {
    match authorized.and_then(|a| a.protocols.as_ref()) {
        Some(without_token) => without_token.as_deref(),
        None => offered,
    }
}

/// Checks `head` against route `route`'s `auth`: `Ok(None)` for a route without one.
pub async fn authorize(
    gateway: &Gateway,
    route: usize,
    head: &RequestHead<'_, '_>,
    peer: ClientAddr,
    tls: bool,
) -> Result<Option<Authorized>, Refusal> {
    if let Some(forward) = gateway.forward_auth.get(route).and_then(Option::as_ref) {
        return forwarded(gateway, route, forward, head, peer, tls)
            .await
            .map(Some);
    }
    let Some(route_auth) = gateway.auth.get(route).and_then(Option::as_ref) else {
        return Ok(None);
    };
    let refuse = |failure: Failure| {
        record(gateway, route, peer, failure);
        failure.refusal()
    };
    refresh_stale(gateway, route, route_auth).await;
    let mut checked = route_auth.check(head, auth::unix_now());
    if matches!(checked, Err(Failure::Rejected(Rejection::UnknownKey)))
        && !route_auth.remote.is_empty()
    {
        // The issuer may have rotated keys: fetch again (at most once per cooldown) and retry.
        let mut renewed = false;
        for remote in &route_auth.remote {
            renewed |= fetched(gateway, route, remote.refresh().await);
        }
        if renewed {
            checked = route_auth.check(head, auth::unix_now());
        }
    }
    let admitted = checked.map_err(refuse)?;
    let config = &route_auth.config;
    let subject_slot = match config.max_connections_per_subject {
        None => None,
        Some(max) => {
            let Some(subject) = admitted.verified.subject.as_deref() else {
                // A per-subject limit cannot hold a token without a subject.
                return Err(refuse(Failure::Rejected(Rejection::MissingClaim)));
            };
            let name: Arc<str> = gateway.route(route).name.as_str().into();
            let slot = gateway.subjects.try_enter(&name, subject, max);
            Some(slot.ok_or_else(|| refuse(Failure::SubjectLimit))?)
        }
    };
    let target = (admitted.target != head.target).then_some(admitted.target);
    Ok(Some(Authorized {
        target,
        protocols: admitted.protocols,
        identity: admitted.identity,
        replaced: config
            .headers
            .iter()
            .map(|(name, _)| name.clone())
            .collect(),
        valid_until: admitted.verified.valid_until,
        expired_close_code: config.expired_close_code,
        subject: admitted.verified.subject,
        subject_slot,
    }))
}

/// The verdict on a token presented in-band on an open WebSocket of `subject`: the new
/// expiry, or refused (counted, recorded, and the connection closed with 1008).
fn refreshed(
    gateway: &Gateway,
    route: usize,
    subject: Option<&str>,
    token: &str,
    peer: ClientAddr,
) -> Refresh {
    let name = &gateway.route(route).name;
    let count = |result: &str| {
        gateway
            .metrics
            .auth_refreshes
            .get_or_create(&crate::metrics::RouteReason {
                route: name.clone(),
                reason: result.to_owned(),
            })
            .inc();
    };
    let Some(route_auth) = gateway.auth.get(route).and_then(Option::as_ref) else {
        return Refresh::Refused;
    };
    let refused = |label: &str, why: &str| {
        count(label);
        let detail = format!("{peer}: token refresh refused: {why}");
        gateway
            .errors
            .record(ErrorKind::Auth, Some(name), None, detail);
        tracing::info!(client = %peer, route = %name, reason = label, "token refresh refused");
        Refresh::Refused
    };
    let verified = match route_auth.verify(token, auth::unix_now()) {
        Ok(verified) => verified,
        Err(rejection) => return refused(rejection.label(), rejection.description()),
    };
    if verified.subject.as_deref() != subject {
        return refused("other_subject", "the token is for another subject");
    }
    count("ok");
    let at = verified.valid_until.and_then(|until| {
        let remaining = auth::remaining(until, SystemTime::now())?;
        Instant::now().checked_add(remaining)
    });
    Refresh::Extended(at.map(Instant::into_std))
}

/// Forward auth: the auth service's verdict.
async fn forwarded(
    gateway: &Gateway,
    route: usize,
    forward: &ForwardClient,
    head: &RequestHead<'_, '_>,
    peer: ClientAddr,
    tls: bool,
) -> Result<Authorized, Refusal> {
    let name = &gateway.route(route).name;
    let count = |reason: &str| {
        gateway
            .metrics
            .auth_failures
            .get_or_create(&crate::metrics::RouteReason {
                route: name.clone(),
                reason: reason.to_owned(),
            })
            .inc();
        gateway.metrics.handshake_failed("auth");
    };
    match forward.check(head, peer, tls).await {
        Verdict::Allow(admission) => Ok(Authorized {
            target: None,
            protocols: None,
            identity: admission.identity,
            replaced: forward.config.response_headers.clone(),
            valid_until: None,
            expired_close_code: 1008,
            subject: admission.subject,
            subject_slot: None,
        }),
        Verdict::Deny(refusal) => {
            count(if refusal.status == 401 {
                "forward_401"
            } else {
                "forward_403"
            });
            let detail = format!("{peer}: {} from the auth service", refusal.status);
            gateway
                .errors
                .record(ErrorKind::Auth, Some(name), None, detail);
            Err(refusal)
        }
        Verdict::Unavailable(why) => {
            count("forward_unavailable");
            tracing::warn!(client = %peer, route = %name, "{why}");
            let detail = format!("{peer}: 503 {why}");
            gateway
                .errors
                .record(ErrorKind::Auth, Some(name), None, detail);
            Err(Refusal::plain(
                503,
                "authentication is unavailable",
                &[("Retry-After", "1")],
            ))
        }
    }
}

/// Key sets never fetched are fetched now (the request waits, at most the fetch timeout);
/// sets older than their `refresh` are fetched in the background while the old set serves.
async fn refresh_stale(gateway: &Gateway, route: usize, route_auth: &RouteAuth) {
    let now = Instant::now();
    for remote in &route_auth.remote {
        if !remote.wants_refresh(now) {
            continue;
        }
        if remote.is_empty() {
            fetched(gateway, route, remote.refresh().await);
        } else {
            let remote = Arc::clone(remote);
            let errors = Arc::clone(&gateway.errors);
            let name = gateway.route(route).name.clone();
            tokio::spawn(async move {
                if let Err(error) = remote.refresh().await {
                    fetch_failed(&errors, &name, &error);
                }
            });
        }
    }
}

/// Whether a fetch put a new set in place; a failure is logged and recorded.
fn fetched(gateway: &Gateway, route: usize, result: Result<bool, FetchError>) -> bool {
    match result {
        Ok(renewed) => renewed,
        Err(error) => {
            fetch_failed(&gateway.errors, &gateway.route(route).name, &error);
            false
        }
    }
}

fn fetch_failed(errors: &RecentErrors, route: &str, error: &FetchError) {
    tracing::warn!(route = %route, "key set fetch failed, keeping the last good set: {error}");
    errors.record(
        ErrorKind::Auth,
        Some(route),
        None,
        format!("key set fetch failed: {error}"),
    );
}

/// Counts a refusal per route and reason and shows it on the dashboard.
pub fn record(gateway: &Gateway, route: usize, peer: ClientAddr, failure: Failure) {
    let name = &gateway.route(route).name;
    gateway
        .metrics
        .auth_failures
        .get_or_create(&crate::metrics::RouteReason {
            route: name.clone(),
            reason: failure.label().to_owned(),
        })
        .inc();
    gateway.metrics.handshake_failed("auth");
    let detail = format!("{peer}: {} {}", failure.status(), failure.description());
    gateway
        .errors
        .record(ErrorKind::Auth, Some(name), None, detail);
    tracing::info!(client = %peer, route = %name, reason = failure.label(), "auth refused");
}

/// The subject `head`'s credentials name, if any: a valid token's `sub` on a route with
/// `auth.jwt`, the auth service's `subject_header` for credentials it admits on a route with
/// `auth.forward`. A session bound to another subject refuses the request.
pub async fn presented_subject(
    gateway: &Gateway,
    route: usize,
    head: &RequestHead<'_, '_>,
    peer: ClientAddr,
    tls: bool,
) -> Option<String> {
    if let Some(forward) = gateway.forward_auth.get(route).and_then(Option::as_ref) {
        forward.config.subject_header.as_ref()?;
        // Without credentials the session id alone is the capability, as for tokens; the
        // auth service is asked (or its cached verdict used) only about credentials.
        if !forward.carries_credentials(head) {
            return None;
        }
        return match forward.check(head, peer, tls).await {
            Verdict::Allow(admission) => admission.subject,
            Verdict::Deny(_) | Verdict::Unavailable(_) => None,
        };
    }
    let route_auth = gateway.auth.get(route)?.as_ref()?;
    route_auth
        .check(head, auth::unix_now())
        .ok()?
        .verified
        .subject
}
