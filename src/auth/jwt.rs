//! Verifying a JSON Web Token against a route's keys and rules, without I/O: the time is an
//! argument, so every rule (expiry to the second, not-before, leeway) is testable exactly.
//!
//! Invariants:
//! - a token is accepted only with a signature made by a configured key, under an algorithm
//!   configured for that key (the token's `alg` never chooses the key's kind, and `none` does
//!   not parse);
//! - `exp` and `nbf` are checked here against the `now` passed in, with the route's leeway;
//!   the signature library's own clock is never consulted;
//! - every refusal is a [`Rejection`] with a fixed label and a fixed one-line description:
//!   nothing from the token is echoed back or logged.

use crate::config::JwtAlgorithm;
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::fmt;

/// A verification key and what it may verify.
pub struct Key {
    pub kid: Option<String>,
    /// Never empty; all of one family (validated with the configuration).
    pub algorithms: Vec<JwtAlgorithm>,
    pub decoding: DecodingKey,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Key material stays out of debug output.
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// The rules a token is checked by, besides the keys.
#[derive(Debug, Clone)]
pub struct Rules {
    pub issuer: Option<String>,
    pub audience: Vec<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    pub leeway: u64,
    /// Claims that must be present (403 without them).
    pub require: Vec<String>,
}

/// A token that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// `sub`, when it is a string.
    pub subject: Option<String>,
    /// When the token stops being accepted, in seconds since the Unix epoch: `exp` plus the
    /// leeway. `None` for a token without `exp`.
    pub valid_until: Option<u64>,
    pub claims: Map<String, Value>,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Not three base64url parts with JSON inside, an unknown `alg` (`none` included), or a
    /// registered claim of the wrong type.
    Malformed,
    /// The token names a `kid` no configured key has.
    UnknownKey,
    /// No key may verify the token's `alg`.
    Algorithm,
    /// No key's signature check passed.
    Signature,
    Expired,
    NotYetValid,
    Issuer,
    Audience,
    /// A claim in `require` is absent (403: the token is valid, the permission is not there).
    MissingClaim,
}

impl Rejection {
    /// A fixed label for metrics.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownKey => "unknown_key",
            Self::Algorithm => "algorithm",
            Self::Signature => "signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Issuer => "issuer",
            Self::Audience => "audience",
            Self::MissingClaim => "missing_claim",
        }
    }

    /// A fixed one-line description for `error_description` (RFC 6750 §3): quotes and
    /// backslashes never appear in it.
    pub const fn description(self) -> &'static str {
        match self {
            Self::Malformed => "the token is malformed",
            Self::UnknownKey => "the token's key id is unknown",
            Self::Algorithm => "the token's algorithm is not accepted",
            Self::Signature => "the token's signature is invalid",
            Self::Expired => "the token has expired",
            Self::NotYetValid => "the token is not valid yet",
            Self::Issuer => "the token's issuer is not accepted",
            Self::Audience => "the token's audience is not accepted",
            Self::MissingClaim => "the token lacks a required claim",
        }
    }

    /// 403 for a valid token without the required claims (RFC 6750 §3.1
    /// `insufficient_scope`), 401 for everything else.
    pub const fn status(self) -> u16 {
        match self {
            Self::MissingClaim => 403,
            _ => 401,
        }
    }
}

/// The jsonwebtoken algorithm for ours: the two enums name the same RFC 7518 algorithms.
pub const fn algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::HS256 => Algorithm::HS256,
        JwtAlgorithm::HS384 => Algorithm::HS384,
        JwtAlgorithm::HS512 => Algorithm::HS512,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::RS384 => Algorithm::RS384,
        JwtAlgorithm::RS512 => Algorithm::RS512,
        JwtAlgorithm::PS256 => Algorithm::PS256,
        JwtAlgorithm::PS384 => Algorithm::PS384,
        JwtAlgorithm::PS512 => Algorithm::PS512,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::ES384 => Algorithm::ES384,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

/// Ours for a jsonwebtoken algorithm.
pub fn from_algorithm(a: Algorithm) -> Option<JwtAlgorithm> {
    JwtAlgorithm::ALL
        .into_iter()
        .find(|ours| algorithm(*ours) == a)
}

/// Verifies `token` with `keys` under `rules` at `now` (seconds since the Unix epoch).
pub fn verify<'k>(
    token: &str,
    keys: impl IntoIterator<Item = &'k Key>,
    rules: &Rules,
    now: u64,
) -> Result<Verified, Rejection> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| Rejection::Malformed)?;
    let alg = from_algorithm(header.alg).ok_or(Rejection::Algorithm)?;
    // A token naming a key id is checked against that key only; keys configured without an
    // id are tried for any token.
    let named: Vec<&Key> = keys
        .into_iter()
        .filter(|key| match (&header.kid, &key.kid) {
            (Some(wanted), Some(kid)) => wanted == kid,
            (_, None) => true,
            (None, Some(_)) => true,
        })
        .collect();
    if named.is_empty() {
        return Err(Rejection::UnknownKey);
    }
    let candidates: Vec<&Key> = named
        .into_iter()
        .filter(|key| key.algorithms.contains(&alg))
        .collect();
    if candidates.is_empty() {
        return Err(Rejection::Algorithm);
    }
    let validation = validation(alg, rules);
    let mut last = Rejection::Signature;
    for key in candidates {
        match jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &validation) {
            Ok(data) => return check_claims(data.claims, rules, now),
            Err(error) => {
                last = match error.kind() {
                    JwtErrorKind::InvalidSignature => Rejection::Signature,
                    JwtErrorKind::InvalidIssuer => return Err(Rejection::Issuer),
                    JwtErrorKind::InvalidAudience => return Err(Rejection::Audience),
                    // A key of another curve or size than the token's: try the next one.
                    JwtErrorKind::InvalidEcdsaKey
                    | JwtErrorKind::InvalidRsaKey(_)
                    | JwtErrorKind::InvalidKeyFormat
                    | JwtErrorKind::InvalidAlgorithm => Rejection::Signature,
                    JwtErrorKind::MissingRequiredClaim(_) => return Err(Rejection::MissingClaim),
                    _ => return Err(Rejection::Malformed),
                };
            }
        }
    }
    Err(last)
}

/// The library's checks: signature, algorithm, `iss`, `aud`. Time is checked by us.
fn validation(alg: JwtAlgorithm, rules: &Rules) -> Validation {
    let mut validation = Validation::new(algorithm(alg));
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.required_spec_claims = HashSet::new();
    validation.leeway = 0;
    if let Some(issuer) = &rules.issuer {
        validation.set_issuer(&[issuer]);
        validation.required_spec_claims.insert("iss".to_owned());
    }
    if rules.audience.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&rules.audience);
        validation.required_spec_claims.insert("aud".to_owned());
    }
    validation
}

fn check_claims(
    claims: Map<String, Value>,
    rules: &Rules,
    now: u64,
) -> Result<Verified, Rejection> {
    let exp = numeric_date(claims.get("exp"))?;
    let nbf = numeric_date(claims.get("nbf"))?;
    let valid_until = exp.map(|exp| exp.saturating_add(rules.leeway));
    // RFC 7519 §4.1.4: the token must not be accepted on or after `exp`.
    if valid_until.is_some_and(|until| now >= until) {
        return Err(Rejection::Expired);
    }
    if nbf.is_some_and(|nbf| now.saturating_add(rules.leeway) < nbf) {
        return Err(Rejection::NotYetValid);
    }
    if rules
        .require
        .iter()
        .any(|claim| !claims.contains_key(claim))
    {
        return Err(Rejection::MissingClaim);
    }
    let subject = claims.get("sub").and_then(Value::as_str).map(str::to_owned);
    Ok(Verified {
        subject,
        valid_until,
        claims,
    })
}

/// A NumericDate (RFC 7519 §2): seconds, possibly fractional; fractions are cut.
fn numeric_date(value: Option<&Value>) -> Result<Option<u64>, Rejection> {
    let Some(value) = value else {
        return Ok(None);
    };
    if let Some(seconds) = value.as_u64() {
        return Ok(Some(seconds));
    }
    match value.as_f64() {
        // Before 1970: long past (as an exp) or long reached (as an nbf).
        Some(seconds) if seconds.is_finite() && seconds < 0.0 => Ok(Some(0)),
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // finite, >= 0, cut
        Some(seconds) if seconds.is_finite() => Ok(Some(seconds as u64)),
        _ => Err(Rejection::Malformed),
    }
}

/// A claim's value as a request header value: strings as they are, numbers and booleans as
/// JSON text; `None` for other values and for anything a header cannot carry (control
/// characters would end the header and start another).
pub fn header_value(value: &Value) -> Option<String> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null | Value::Array(_) | Value::Object(_) => return None,
    };
    let clean = text
        .chars()
        .all(|c| c == '\t' || !(c.is_control() || c == '\u{7f}'));
    (clean && !text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests;
