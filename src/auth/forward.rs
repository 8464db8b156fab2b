//! Forward auth (`auth.forward`): the handshake's method, target and chosen headers are sent
//! to an auth service, whose answer decides: 2xx admits (chosen response headers go on to the
//! backend), 401 and 403 go back to the client with their body, anything else is a 503.
//!
//! Invariants:
//! - every call is bounded: the timeout covers connect, TLS, request and body, and a body is
//!   read up to [`MAX_BODY`] bytes;
//! - verdicts are cached per route by the exact values of the request headers sent (the
//!   credentials), for the configured TTLs only; 503s are never cached; the cache holds at most
//!   [`MAX_CACHE_ENTRIES`] entries, expired ones dropped first.

use crate::client_addr::ClientAddr;
use crate::config::{ForwardAuth, UpstreamTls};
use crate::proto::handshake::{self, RequestHead};
use crate::tls;
use crate::upstream::Refusal;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

/// A refusal body passed on to the client; more is cut off.
pub const MAX_BODY: usize = 64 * 1024;
/// Cached verdicts per route.
pub const MAX_CACHE_ENTRIES: usize = 10_000;
/// Auth service headers passed to a refused client besides the body.
const DENY_HEADERS: [&str; 2] = ["www-authenticate", "content-type"];

/// The auth service's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: who was admitted.
    Allow(Admission),
    /// 401 or 403, passed on to the client as it is.
    Deny(Refusal),
    /// No usable answer (refused, timed out, another status): the client gets 503.
    Unavailable(String),
}

/// What a 2xx from the auth service says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The configured response headers (names as configured), for the backend.
    pub identity: Vec<(String, String)>,
    /// The value of `subject_header`, when configured and present.
    pub subject: Option<String>,
}

/// A route's auth service client with its cache.
pub struct ForwardClient {
    pub config: ForwardAuth,
    tls: Option<(TlsConnector, rustls_pki_types::ServerName<'static>)>,
    cache: Mutex<HashMap<Vec<u8>, (Instant, Verdict)>>,
}

impl std::fmt::Debug for ForwardClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardClient")
            .field("url", &self.config.url)
            .finish_non_exhaustive()
    }
}

impl ForwardClient {
    pub fn new(config: &ForwardAuth) -> Result<Self, tls::TlsError> {
        let tls = if config.secure {
            let upstream = UpstreamTls {
                ca_file: config.ca_file.clone(),
                server_name: None,
            };
            let connector = TlsConnector::from(tls::client_config(&upstream)?);
            Some((connector, tls::server_name_for(&config.host, &upstream)?))
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            tls,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `head` carries any of the headers sent to the auth service.
    pub fn carries_credentials(&self, head: &RequestHead<'_, '_>) -> bool {
        head.headers.iter().any(|h| {
            self.config
                .request_headers
                .iter()
                .any(|name| h.name.eq_ignore_ascii_case(name))
        })
    }

    /// Asks the auth service about `head` (or answers from the cache).
    pub async fn check(&self, head: &RequestHead<'_, '_>, peer: ClientAddr, tls: bool) -> Verdict {
        let sent: Vec<(&str, &[u8])> = head
            .headers
            .iter()
            .filter(|h| {
                self.config
                    .request_headers
                    .iter()
                    .any(|name| h.name.eq_ignore_ascii_case(name))
            })
            .map(|h| (h.name, h.value))
            .collect();
        let key = cache_key(&sent);
        if let Some(verdict) = self.cached(&key, Instant::now()) {
            return verdict;
        }
        let verdict =
            match tokio::time::timeout(self.config.timeout, self.ask(head, &sent, peer, tls)).await
            {
                Ok(verdict) => verdict,
                Err(_) => Verdict::Unavailable(format!(
                    "auth service did not answer within {} ms",
                    self.config.timeout.as_millis()
                )),
            };
        self.remember(key, &verdict, Instant::now());
        verdict
    }

    fn cached(&self, key: &[u8], now: Instant) -> Option<Verdict> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache
            .get(key)
            .filter(|(until, _)| now < *until)
            .map(|(_, verdict)| verdict.clone())
    }

    fn remember(&self, key: Vec<u8>, verdict: &Verdict, now: Instant) {
        let ttl = match verdict {
            Verdict::Allow(_) => self.config.cache_ttl,
            Verdict::Deny(_) => self.config.negative_cache_ttl,
            Verdict::Unavailable(_) => return,
        };
        if ttl.is_zero() {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MAX_CACHE_ENTRIES {
            cache.retain(|_, (until, _)| now < *until);
            if cache.len() >= MAX_CACHE_ENTRIES {
                // Still full of live entries: this verdict is simply not remembered.
                return;
            }
        }
        cache.insert(key, (now + ttl, verdict.clone()));
    }

    /// One request to the auth service over a fresh connection; the caller bounds its time.
    async fn ask(
        &self,
        head: &RequestHead<'_, '_>,
        sent: &[(&str, &[u8])],
        peer: ClientAddr,
        tls: bool,
    ) -> Verdict {
        match self.exchange(head, sent, peer, tls).await {
            Ok(verdict) => verdict,
            Err(why) => Verdict::Unavailable(why),
        }
    }

    async fn exchange(
        &self,
        head: &RequestHead<'_, '_>,
        sent: &[(&str, &[u8])],
        peer: ClientAddr,
        client_tls: bool,
    ) -> Result<Verdict, String> {
        let config = &self.config;
        let host = config
            .host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&config.host);
        let tcp = TcpStream::connect((host, config.port))
            .await
            .map_err(|e| format!("auth service: connect: {e}"))?;
        let mut request = hyper::Request::get(config.path.as_str());
        let default_port = if config.secure { 443 } else { 80 };
        let authority = if config.port == default_port {
            config.host.clone()
        } else {
            format!("{}:{}", config.host, config.port)
        };
        request = request
            .header(hyper::header::HOST, authority)
            .header("x-forwarded-method", head.method)
            .header("x-forwarded-uri", head.target)
            .header("x-forwarded-host", head.header("host").unwrap_or(""))
            .header(
                "x-forwarded-proto",
                if client_tls { "https" } else { "http" },
            )
            .header("x-forwarded-for", peer.ip().to_string());
        for (name, value) in sent {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("auth service: request: {e}"))?;
        let response = match &self.tls {
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("auth service: TLS: {e}"))?;
                send(TokioIo::new(stream), request).await?
            }
            None => send(TokioIo::new(tcp), request).await?,
        };
        let status = response.status().as_u16();
        let (parts, body) = response.into_parts();
        match status {
            200..=299 => {
                let copied = config
                    .response_headers
                    .iter()
                    .filter_map(|name| {
                        let value = parts.headers.get(name.as_str())?.to_str().ok()?;
                        Some((name.clone(), value.to_owned()))
                    })
                    .collect();
                let subject = config
                    .subject_header
                    .as_deref()
                    .and_then(|name| parts.headers.get(name)?.to_str().ok())
                    .filter(|subject| !subject.is_empty())
                    .map(str::to_owned);
                Ok(Verdict::Allow(Admission {
                    identity: copied,
                    subject,
                }))
            }
            401 | 403 => {
                // A body past the cap is cut, not refused: the client still learns the status.
                let body = match Limited::new(body, MAX_BODY).collect().await {
                    Ok(collected) => collected.to_bytes().to_vec(),
                    Err(_) => Vec::new(),
                };
                let headers = DENY_HEADERS
                    .iter()
                    .filter_map(|name| {
                        let value = parts.headers.get(*name)?;
                        Some(((*name).to_owned(), value.as_bytes().to_vec()))
                    })
                    .collect();
                Ok(Verdict::Deny(Refusal {
                    status,
                    reason: handshake::server::reason_phrase(status).to_owned(),
                    headers,
                    body,
                    rule: Some("forward_auth"),
                }))
            }
            other => Ok(Verdict::Unavailable(format!(
                "auth service answered {other}"
            ))),
        }
    }
}

async fn send<S>(
    io: TokioIo<S>,
    request: hyper::Request<Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("auth service: HTTP: {e}"))?;
    // The connection task ends with the response body or when the caller's timeout drops
    // the sender.
    tokio::spawn(connection);
    sender
        .send_request(request)
        .await
        .map_err(|e| format!("auth service: HTTP: {e}"))
}

/// The credentials as one byte string: each header's name and value, length-prefixed so
/// that no two different sets give the same key.
fn cache_key(sent: &[(&str, &[u8])]) -> Vec<u8> {
    let mut key = Vec::new();
    for (name, value) in sent {
        let name = name.to_ascii_lowercase();
        for part in [name.as_bytes(), value] {
            key.extend_from_slice(&(part.len() as u64).to_be_bytes());
            key.extend_from_slice(part);
        }
    }
    key
}
