//! Authentication at the edge: a route's `auth` (a JWT, or an auth service's verdict) checked
//! on the handshake, before any backend is contacted, and the identity it establishes carried
//! to the backend and, for a token's expiry, enforced for the life of the connection.
//!
//! - `jwt`: verifying a token (keys, algorithms, claims), pure, the time passed in;
//! - `token`: where a token is found in the request, and the request without it, pure;
//! - `keys`: key files (PEM, JWKS, HMAC secret) into verification keys, at build time;
//! - `remote`: a key set fetched over HTTPS, cached, refreshed, the last good one kept;
//! - `forward`: an auth service asked about each handshake, its verdicts cached briefly;
//! - `subjects`: connections open per subject, against `max_connections_per_subject`.
//!
//! Invariants:
//! - a request on a route with `auth` reaches a backend only with a verified token (or the auth
//!   service's 2xx); every refusal happens inside [`crate::admit::open_backend`] before the
//!   backend is picked or contacted;
//! - the backend never sees the token in the URL or in the subprotocol offer when it came
//!   from there, and never sees a client's own copy of a header the gateway sets from claims;
//! - tokens are never logged, nor echoed in a response: refusals carry fixed descriptions.

pub mod forward;
pub mod jwt;
pub mod keys;
pub mod remote;
pub mod subjects;
pub mod token;

use crate::config::{JwtAuth, TokenSource};
use crate::proto::handshake::RequestHead;
use crate::upstream::Refusal;
use jwt::{Key, Rejection, Rules, Verified};
use remote::RemoteKeys;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use keys::KeyError;
pub use subjects::{SubjectCounts, SubjectSlot};

/// A route's `auth.jwt`, compiled: keys loaded, header names lowercased.
#[derive(Debug)]
pub struct RouteAuth {
    pub config: JwtAuth,
    keys: Vec<Key>,
    /// `jwks_url` sources, each with its own cache.
    pub remote: Vec<Arc<RemoteKeys>>,
    rules: Rules,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No token in any configured place.
    Missing,
    /// A token that failed verification, or lacks a required claim.
    Rejected(Rejection),
    /// A claim mapped to a header holds a value no header can carry.
    UnfitClaim,
    /// The subject holds `max_connections_per_subject` connections already.
    SubjectLimit,
}

impl Failure {
    pub const fn status(self) -> u16 {
        match self {
            Self::Missing => 401,
            Self::Rejected(rejection) => rejection.status(),
            Self::UnfitClaim => 403,
            Self::SubjectLimit => 429,
        }
    }

    /// A fixed label for metrics.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Rejected(rejection) => rejection.label(),
            Self::UnfitClaim => "unfit_claim",
            Self::SubjectLimit => "subject_limit",
        }
    }

    /// A fixed one-line description, safe inside a quoted string.
    pub const fn description(self) -> &'static str {
        match self {
            Self::Missing => "no token",
            Self::Rejected(rejection) => rejection.description(),
            Self::UnfitClaim => "a claim cannot be passed on as a header",
            Self::SubjectLimit => "too many connections for this subject",
        }
    }

    /// The answer to the client: RFC 6750 §3 challenges on 401 and 403.
    pub fn refusal(self) -> Refusal {
        let description = self.description();
        let challenge = match self {
            // §3.1: a request without credentials gets no error code.
            Self::Missing => "Bearer".to_owned(),
            Self::Rejected(Rejection::MissingClaim) | Self::UnfitClaim => {
                format!("Bearer error=\"insufficient_scope\", error_description=\"{description}\"")
            }
            Self::Rejected(_) => {
                format!("Bearer error=\"invalid_token\", error_description=\"{description}\"")
            }
            Self::SubjectLimit => {
                return Refusal::plain(self.status(), description, &[]);
            }
        };
        Refusal::plain(
            self.status(),
            description,
            &[("WWW-Authenticate", challenge.as_str())],
        )
    }
}

/// A request that passed: who it is, and what the backend request is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    pub verified: Verified,
    /// The target the backend sees (the token's query parameter removed).
    pub target: String,
    /// The subprotocol offer the backend sees, when the token came in it (`Some(None)`: the
    /// token was the only entry); `None` when the offer is unchanged.
    pub protocols: Option<Option<String>>,
    /// Headers set from claims, in configuration order.
    pub identity: Vec<(String, String)>,
}

impl RouteAuth {
    pub fn new(config: &JwtAuth) -> Result<Self, KeyError> {
        let keys = keys::load(&config.keys)?;
        let mut remote = Vec::new();
        for key in &config.keys {
            if let crate::config::JwtKeySource::JwksUrl(url) = &key.source {
                let source =
                    RemoteKeys::new(url, &key.algorithms).map_err(|source| KeyError::Tls {
                        url: url.url.clone(),
                        source,
                    })?;
                remote.push(Arc::new(source));
            }
        }
        let rules = Rules {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            leeway: config.leeway.as_secs(),
            require: config.require.clone(),
        };
        Ok(Self {
            config: config.clone(),
            keys,
            remote,
            rules,
        })
    }

    /// Verifies a token by itself at `now` (seconds since the Unix epoch), against the
    /// configured keys and the fetched sets as they are (a refresh waits for no fetch).
    pub fn verify(&self, token: &str, now: u64) -> Result<jwt::Verified, Rejection> {
        let fetched: Vec<Arc<Vec<Key>>> = self.remote.iter().map(|r| r.current()).collect();
        let keys = self
            .keys
            .iter()
            .chain(fetched.iter().flat_map(|set| set.iter()));
        jwt::verify(token, keys, &self.rules, now)
    }

    /// Checks the request's token at `now` (seconds since the Unix epoch).
    pub fn check(&self, head: &RequestHead<'_, '_>, now: u64) -> Result<Admitted, Failure> {
        let found = token::find(&self.config.from, head).ok_or(Failure::Missing)?;
        let verified = self.verify(&found.token, now).map_err(Failure::Rejected)?;
        let mut identity = Vec::with_capacity(self.config.headers.len());
        for (header, claim) in &self.config.headers {
            if let Some(value) = verified.claims.get(claim) {
                let value = jwt::header_value(value).ok_or(Failure::UnfitClaim)?;
                identity.push((header.clone(), value));
            }
        }
        let (target, protocols) = match found.source {
            TokenSource::Query(name) => (token::target_without(head.target, name), None),
            TokenSource::Subprotocol(prefix) => (
                head.target.to_owned(),
                Some(token::protocols_without(
                    crate::proto::handshake::server::offered_protocols(head.headers),
                    prefix,
                )),
            ),
            TokenSource::Bearer | TokenSource::Cookie(_) => (head.target.to_owned(), None),
        };
        Ok(Admitted {
            verified,
            target,
            protocols,
            identity,
        })
    }
}

/// Seconds since the Unix epoch now (0 for a clock set before 1970, which expires everything).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Tokens valid for longer than this are not closed at their expiry: a year is far beyond
/// any connection's life, and it keeps deadline arithmetic and timers within range whatever
/// `exp` an issuer signs.
pub const MAX_ENFORCED_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// How long from `now` until `until` (Unix seconds); zero once passed, `None` beyond
/// [`MAX_ENFORCED_VALIDITY`].
pub fn remaining(until: u64, now: SystemTime) -> Option<Duration> {
    let until = UNIX_EPOCH.checked_add(Duration::from_secs(until))?;
    let remaining = until.duration_since(now).unwrap_or(Duration::ZERO);
    (remaining <= MAX_ENFORCED_VALIDITY).then_some(remaining)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_validity_never_overflows() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(remaining(1_800_000_010, now), Some(Duration::from_secs(10)));
        assert_eq!(remaining(1_700_000_000, now), Some(Duration::ZERO));
        assert_eq!(remaining(u64::MAX, now), None);
        assert_eq!(remaining(1_800_000_000 + 2 * 365 * 24 * 3600, now), None);
    }
}
