//! Turning a route's configured key files into verification [`Key`]s. Files are read once,
//! when the gateway is built (start and reload), each capped in size.

use super::jwt::Key;
use crate::config::{JwtAlgorithm, JwtKey, JwtKeySource, KeyFamily};
use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Far above any real key file or key set (a JWKS of a hundred RSA-4096 keys is ~100 KiB);
/// a larger file is a mistake, not a key.
pub const MAX_KEY_FILE: u64 = 1024 * 1024;
/// Keys a key set may hold; issuers publish a handful.
pub const MAX_JWKS_KEYS: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} is larger than {MAX_KEY_FILE} bytes")]
    TooLarge { path: PathBuf },
    #[error("key file {path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("jwks_url {url}: {source}")]
    Tls {
        url: String,
        source: crate::tls::TlsError,
    },
}

/// Loads every configured key.
pub fn load(config: &[JwtKey]) -> Result<Vec<Key>, KeyError> {
    let mut keys = Vec::new();
    for key in config {
        match &key.source {
            JwtKeySource::Pem(path) => {
                let pem = read_capped(path)?;
                keys.push(
                    pem_key(&pem, &key.algorithms, key.kid.clone()).map_err(|why| {
                        KeyError::Invalid {
                            path: path.clone(),
                            why,
                        }
                    })?,
                );
            }
            JwtKeySource::Secret(path) => {
                let secret = read_capped(path)?;
                // A trailing newline is an editor's, not part of the secret.
                let secret = secret.trim_ascii_end();
                if secret.len() < 32 {
                    return Err(KeyError::Invalid {
                        path: path.clone(),
                        why: "an HMAC secret needs at least 32 bytes (RFC 7518 §3.2)".into(),
                    });
                }
                keys.push(Key {
                    kid: key.kid.clone(),
                    algorithms: key.algorithms.clone(),
                    decoding: DecodingKey::from_secret(secret),
                });
            }
            JwtKeySource::Jwks(path) => {
                let json = read_capped(path)?;
                let set = parse_jwks(&json, &key.algorithms).map_err(|why| KeyError::Invalid {
                    path: path.clone(),
                    why,
                })?;
                keys.extend(set);
            }
            // Fetched at run time (`super::remote`).
            JwtKeySource::JwksUrl(_) => {}
        }
    }
    Ok(keys)
}

fn read_capped(path: &Path) -> Result<Vec<u8>, KeyError> {
    let read = |source| KeyError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut bytes = Vec::new();
    file.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(KeyError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

/// A PEM public key of the family its algorithms name.
pub fn pem_key(
    pem: &[u8],
    algorithms: &[JwtAlgorithm],
    kid: Option<String>,
) -> Result<Key, String> {
    let first = algorithms.first().ok_or("no algorithms for this key")?;
    let family = first.family();
    let decoding = match family {
        KeyFamily::Rsa => DecodingKey::from_rsa_pem(pem),
        KeyFamily::Ec => DecodingKey::from_ec_pem(pem),
        KeyFamily::Ed => DecodingKey::from_ed_pem(pem),
        KeyFamily::Hmac => return Err("an HMAC secret is not a PEM key".into()),
    }
    .map_err(|e| format!("not a PEM public key for {}: {e}", first.name()))?;
    Ok(Key {
        kid,
        algorithms: algorithms.to_vec(),
        decoding,
    })
}

/// The signing keys of a JSON Web Key Set. A JWK with its own `alg` verifies that algorithm
/// only; one without verifies `default_algorithms` of its kind. Encryption keys, keys of
/// unknown kinds and keys no algorithm applies to are skipped, so that an issuer adding a new
/// kind of key does not break the set; a set with no usable key at all is an error.
pub fn parse_jwks(json: &[u8], default_algorithms: &[JwtAlgorithm]) -> Result<Vec<Key>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
    let entries = value
        .get("keys")
        .and_then(serde_json::Value::as_array)
        .ok_or("not a JWK set: no \"keys\" list")?;
    if entries.len() > MAX_JWKS_KEYS {
        return Err(format!("more than {MAX_JWKS_KEYS} keys"));
    }
    let keys: Vec<Key> = entries
        .iter()
        .filter_map(|entry| serde_json::from_value::<Jwk>(entry.clone()).ok())
        .filter_map(|jwk| jwk_key(&jwk, default_algorithms))
        .collect();
    if keys.is_empty() {
        return Err("no usable signature key in the set (each needs an alg, or algorithms configured for its kind)".into());
    }
    Ok(keys)
}

fn jwk_key(jwk: &Jwk, default_algorithms: &[JwtAlgorithm]) -> Option<Key> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyFamily::Rsa,
        AlgorithmParameters::EllipticCurve(_) => KeyFamily::Ec,
        AlgorithmParameters::OctetKeyPair(_) => KeyFamily::Ed,
        AlgorithmParameters::OctetKey(_) => KeyFamily::Hmac,
    };
    let algorithms: Vec<JwtAlgorithm> = match jwk.common.key_algorithm {
        Some(named) => {
            // Both enums spell RFC 7518's names; encryption algorithms match none of ours.
            let name = format!("{named:?}");
            let ours = JwtAlgorithm::ALL.into_iter().find(|a| a.name() == name)?;
            vec![ours]
        }
        None => default_algorithms
            .iter()
            .copied()
            .filter(|a| a.family() == family)
            .collect(),
    };
    if algorithms.is_empty() || algorithms.iter().any(|a| a.family() != family) {
        return None;
    }
    let decoding = DecodingKey::from_jwk(jwk).ok()?;
    Some(Key {
        kid: jwk.common.key_id.clone(),
        algorithms,
        decoding,
    })
}
