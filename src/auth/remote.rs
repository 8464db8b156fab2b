//! A JSON Web Key Set fetched over HTTPS (`jwks_url`), cached, and fetched again when it is
//! older than `refresh` or when a token names a key it does not have.
//!
//! Invariants:
//! - the last set fetched successfully stays in use until another fetch succeeds: a failing
//!   issuer never empties the keys;
//! - at most one fetch runs at a time per set, and fetches for unknown key ids start at most
//!   once per `cooldown`, whatever clients send;
//! - every fetch is bounded: `timeout` for all of it (connect, TLS, request, body) and
//!   [`MAX_KEY_FILE`] bytes of body.

use super::jwt::Key;
use super::keys::{MAX_KEY_FILE, parse_jwks};
use crate::config::{JwksUrl, JwtAlgorithm, UpstreamTls};
use crate::tls;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use std::sync::{Arc, PoisonError, RwLock};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

/// Why a fetch did not give a new set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: not done within {timeout_ms} ms")]
    Timeout { url: String, timeout_ms: u128 },
    #[error("{url}: {why}")]
    Failed { url: String, why: String },
}

#[derive(Debug)]
struct State {
    keys: Arc<Vec<Key>>,
    /// The last successful fetch.
    fetched: Option<Instant>,
    /// The last fetch started, successful or not.
    attempted: Option<Instant>,
}

/// One `jwks_url` key source.
pub struct RemoteKeys {
    source: JwksUrl,
    default_algorithms: Vec<JwtAlgorithm>,
    connector: TlsConnector,
    server_name: rustls_pki_types::ServerName<'static>,
    state: RwLock<State>,
    /// Held while a fetch runs: concurrent callers wait for it instead of fetching too.
    fetching: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for RemoteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKeys")
            .field("url", &self.source.url)
            .finish_non_exhaustive()
    }
}

impl RemoteKeys {
    pub fn new(
        source: &JwksUrl,
        default_algorithms: &[JwtAlgorithm],
    ) -> Result<Self, tls::TlsError> {
        let upstream = UpstreamTls {
            ca_file: source.ca_file.clone(),
            server_name: None,
        };
        let config = tls::client_config(&upstream)?;
        let server_name = tls::server_name_for(&source.host, &upstream)?;
        Ok(Self {
            source: source.clone(),
            default_algorithms: default_algorithms.to_vec(),
            connector: TlsConnector::from(config),
            server_name,
            state: RwLock::new(State {
                keys: Arc::new(Vec::new()),
                fetched: None,
                attempted: None,
            }),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// The keys in use now (empty before the first successful fetch).
    pub fn current(&self) -> Arc<Vec<Key>> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&state.keys)
    }

    /// Whether the set was never fetched.
    pub fn is_empty(&self) -> bool {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state.fetched.is_none()
    }

    /// Whether the set is older than `refresh` at `now` (or was never fetched), and no fetch
    /// was attempted within the cooldown.
    pub fn wants_refresh(&self, now: Instant) -> bool {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let stale = state
            .fetched
            .is_none_or(|at| now.duration_since(at) >= self.source.refresh);
        stale && !self.cooling_down(&state, now)
    }

    fn cooling_down(&self, state: &State, now: Instant) -> bool {
        state
            .attempted
            .is_some_and(|at| now.duration_since(at) < self.source.cooldown)
    }

    /// Fetches the set again unless another fetch started within the cooldown. `Ok(true)`
    /// when a new set is in place, `Ok(false)` when no fetch was due.
    pub async fn refresh(&self) -> Result<bool, FetchError> {
        let asked = Instant::now();
        let _single = self.fetching.lock().await;
        {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            // Someone else fetched while we waited for the lock: their set is as new as ours
            // would be.
            if state.fetched.is_some_and(|at| at >= asked) {
                return Ok(true);
            }
            let now = Instant::now();
            if self.cooling_down(&state, now) {
                return Ok(false);
            }
            state.attempted = Some(now);
        }
        let body = self.fetch().await?;
        let keys =
            parse_jwks(&body, &self.default_algorithms).map_err(|why| FetchError::Failed {
                url: self.source.url.clone(),
                why,
            })?;
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        state.keys = Arc::new(keys);
        state.fetched = Some(Instant::now());
        Ok(true)
    }

    async fn fetch(&self) -> Result<Vec<u8>, FetchError> {
        let timeout = self.source.timeout;
        match tokio::time::timeout(timeout, self.fetch_unbounded()).await {
            Ok(result) => result.map_err(|why| FetchError::Failed {
                url: self.source.url.clone(),
                why,
            }),
            Err(_) => Err(FetchError::Timeout {
                url: self.source.url.clone(),
                timeout_ms: timeout.as_millis(),
            }),
        }
    }

    /// One GET over a fresh connection; the caller bounds its time.
    async fn fetch_unbounded(&self) -> Result<Vec<u8>, String> {
        let source = &self.source;
        let host = source
            .host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&source.host);
        let tcp = TcpStream::connect((host, source.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let driver = tokio::spawn(connection);
        let authority = if source.port == 443 {
            source.host.clone()
        } else {
            format!("{}:{}", source.host, source.port)
        };
        let request = hyper::Request::get(source.path.as_str())
            .header(hyper::header::HOST, authority)
            .header(
                hyper::header::ACCEPT,
                "application/json, application/jwk-set+json",
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
            if response.status() != hyper::StatusCode::OK {
                return Err(format!("answered {}", response.status().as_u16()));
            }
            let limit = usize::try_from(MAX_KEY_FILE).unwrap_or(usize::MAX);
            let body = Limited::new(response.into_body(), limit)
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?;
            Ok(body.to_bytes().to_vec())
        }
        .await;
        driver.abort();
        result
    }
}
