//! TLS for both sides of the gateway: termination on listeners (`server_config`) and
//! `wss://` connections to backends (`client_config`, `server_name_for`).
//!
//! Invariants of every configuration built here:
//! - **Protocol versions**: TLS 1.3 and TLS 1.2 only. rustls implements nothing older, so a
//!   TLS 1.0/1.1 ClientHello is answered with a fatal alert, never a ServerHello:
//!   `protocol_version`, or `handshake_failure` when the hello also lacks the TLS 1.2
//!   `signature_algorithms` extension (rustls checks that first; openssl's 1.1 client
//!   omits it).
//! - **ALPN**: `http/1.1` only, on both sides. A WebSocket upgrade is an HTTP/1.1 request;
//!   a peer that offers ALPN without `http/1.1` (say, `h2` alone) is refused with
//!   `no_application_protocol` rather than misread later. A peer that offers no ALPN at all
//!   is accepted.
//! - **Default certificate**: the first entry of `ServerTls::certificates`. It is served
//!   when the client sends no SNI (connections by IP address never carry SNI) or a name that
//!   no certificate lists. Names come from `server_names` only, never from the certificate:
//!   exact names win over `*.example.com` wildcards, and a wildcard covers exactly one
//!   label (`a.example.com`, not `example.com` nor `a.b.example.com`), as certificate
//!   name matching does.
//! - **Load-time checks**: every file is read when the configuration is built, so a missing
//!   file, a PEM without a certificate or key, or a key that does not belong to its
//!   certificate stops the gateway at startup with an error naming the file, instead of
//!   failing handshakes later.
//! - **Crypto provider**: always *ring*, passed explicitly, so the result does not depend on
//!   which process-wide default provider another crate may have installed.
//!
//! Loading reads files synchronously: it runs at startup or on reload, not per connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName};

use crate::config::model::{CertificateFiles, ServerTls, UpstreamTls};

/// The only ALPN protocol offered or accepted.
pub const ALPN_HTTP_1_1: &[u8] = b"http/1.1";

/// Newest first: the order is the preference.
static PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Why a TLS configuration could not be built. File problems name the file first.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: cannot read file: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: malformed PEM: {source}", path.display())]
    Pem {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{}: no certificate found in PEM file", path.display())]
    NoCertificate { path: PathBuf },
    #[error(
        "{}: no private key found in PEM file (expected PKCS#8 \"PRIVATE KEY\", PKCS#1 \"RSA PRIVATE KEY\" or SEC1 \"EC PRIVATE KEY\")",
        path.display()
    )]
    NoPrivateKey { path: PathBuf },
    #[error("{}: unusable private key: {source}", path.display())]
    UnsupportedKey {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{}: invalid certificate: {source}", path.display())]
    InvalidCertificate {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{}: private key does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: certificate #{index} in the file is not a usable CA certificate: {source}", path.display())]
    InvalidCa {
        path: PathBuf,
        /// 1-based position of the certificate in the file.
        index: usize,
        source: rustls::Error,
    },
    #[error("no certificates configured: a TLS listener needs at least one")]
    NoCertificates,
    #[error("{}: invalid server name {name:?}: {reason}", cert.display())]
    InvalidSniName {
        cert: PathBuf,
        name: String,
        reason: &'static str,
    },
    #[error("server name {name:?} is listed for both {} and {}", first.display(), second.display())]
    DuplicateSniName {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("invalid upstream TLS server name {name:?}: {reason}")]
    InvalidServerName { name: String, reason: String },
    #[error("building the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the TLS configuration of a listener. See the module documentation for what it
/// guarantees.
pub fn server_config(tls: &ServerTls) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let resolver = SniResolver::load(&tls.certificates, &provider)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
    Ok(Arc::new(config))
}

/// The operating system's trust store (what curl and the platform's other clients trust). A
/// system without one (a minimal container image) gets the Mozilla roots bundled with wsgate
/// instead, rather than a gateway that can reach no `wss://` backend at all.
pub fn system_roots() -> RootCertStore {
    let native = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _unparsable) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        tracing::warn!("no usable system root certificates; using the bundled Mozilla roots");
        roots.roots = webpki_roots::TLS_SERVER_ROOTS.to_vec();
    }
    roots
}

/// Builds the TLS configuration for connections to `wss://` backends: the system roots, or
/// only the certificates of `ca_file` when it is set (a private CA should not widen trust to
/// the public ones, nor the other way round).
pub fn client_config(tls: &UpstreamTls) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match &tls.ca_file {
        None => system_roots(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for (i, cert) in load_certificates(path)?.into_iter().enumerate() {
                roots.add(cert).map_err(|source| TlsError::InvalidCa {
                    path: path.clone(),
                    index: i + 1,
                    source,
                })?;
            }
            roots
        }
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
    Ok(Arc::new(config))
}

/// The name to send as SNI and to verify the backend's certificate against: the upstream's
/// `server_name` when set, else the backend URL's host. An IP address (IPv6 with or without
/// brackets) is verified against the certificate's IP SANs and sends no SNI.
pub fn server_name_for(host: &str, tls: &UpstreamTls) -> Result<ServerName<'static>, TlsError> {
    let name = tls.server_name.as_deref().unwrap_or(host);
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    ServerName::try_from(bare)
        .map(|n| n.to_owned())
        .map_err(|e| TlsError::InvalidServerName {
            name: name.to_owned(),
            reason: e.to_string(),
        })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Picks the certificate for a handshake from the client's SNI.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl SniResolver {
    fn load(files: &[CertificateFiles], provider: &CryptoProvider) -> Result<Self, TlsError> {
        let mut default = None;
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        // Which file claimed each name, to name both in a duplicate error.
        let mut claimed: HashMap<String, &Path> = HashMap::new();
        for files in files {
            let key = Arc::new(load_certified_key(files, provider)?);
            for raw in &files.server_names {
                let name = sni_pattern(raw).map_err(|reason| TlsError::InvalidSniName {
                    cert: files.cert.clone(),
                    name: raw.clone(),
                    reason,
                })?;
                if let Some(first) = claimed.insert(name.clone(), &files.cert) {
                    return Err(TlsError::DuplicateSniName {
                        name,
                        first: first.to_owned(),
                        second: files.cert.clone(),
                    });
                }
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.insert(parent.to_owned(), key.clone()),
                    None => exact.insert(name, key.clone()),
                };
            }
            default.get_or_insert(key);
        }
        Ok(Self {
            default: default.ok_or(TlsError::NoCertificates)?,
            exact,
            wildcard,
        })
    }

    fn lookup(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(sni) = sni else {
            return &self.default;
        };
        let name = sni.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return key;
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.lookup(client_hello.server_name()).clone())
    }
}

/// Normalises a `server_names` entry: lowercase, no trailing dot, `*.` only as a whole
/// first label.
fn sni_pattern(raw: &str) -> Result<String, &'static str> {
    let name = raw.trim().trim_end_matches('.').to_ascii_lowercase();
    let base = name.strip_prefix("*.").unwrap_or(&name);
    if base.parse::<IpAddr>().is_ok() {
        return Err(
            "SNI never carries an IP address; clients connecting by IP get the default (first) certificate",
        );
    }
    if base.contains('*') {
        return Err("a wildcard must be the whole first label, as in *.example.com");
    }
    if DnsName::try_from(base).is_err() {
        return Err("not a valid DNS name");
    }
    Ok(name)
}

fn load_certified_key(
    files: &CertificateFiles,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = load_certificates(&files.cert)?;
    let key_der = load_private_key(&files.key)?;
    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|source| TlsError::UnsupportedKey {
            path: files.key.clone(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    // Unlike `CertifiedKey::from_der`, an undecidable match is an error too: with ring every
    // key type exposes its public key, so "unknown" would mean something is badly off.
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        }),
        Err(source) => Err(TlsError::InvalidCertificate {
            path: files.cert.clone(),
            source,
        }),
    }
}

/// Every certificate in a PEM file, in file order (leaf first for a chain file).
fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file, in any of PKCS#8, PKCS#1 or SEC1.
fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_owned(),
        },
        source => TlsError::Pem {
            path: path.to_owned(),
            source,
        },
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lookup tests only compare which entry is returned; nothing is ever signed.
    #[derive(Debug)]
    struct NoKey;

    impl rustls::sign::SigningKey for NoKey {
        fn choose_scheme(
            &self,
            _: &[rustls::SignatureScheme],
        ) -> Option<Box<dyn rustls::sign::Signer>> {
            None
        }

        fn algorithm(&self) -> rustls::SignatureAlgorithm {
            rustls::SignatureAlgorithm::ECDSA
        }
    }

    #[test]
    fn system_roots_are_found() {
        // Debian and every CI image here ship ca-certificates; the fallback covers the rest.
        assert!(system_roots().len() > 10);
    }

    #[test]
    fn sni_patterns_are_normalised_and_checked() {
        assert_eq!(
            sni_pattern("Chat.Example.COM.").unwrap(),
            "chat.example.com"
        );
        assert_eq!(sni_pattern("*.example.com").unwrap(), "*.example.com");
        assert!(sni_pattern("a.*.example.com").is_err());
        assert!(sni_pattern("*example.com").is_err());
        assert!(sni_pattern("127.0.0.1").is_err());
        assert!(sni_pattern("::1").is_err());
        assert!(sni_pattern("exa mple.com").is_err());
    }

    #[test]
    fn lookup_prefers_exact_then_one_label_wildcard_then_default() {
        let key = |n: u8| {
            Arc::new(CertifiedKey::new(
                vec![CertificateDer::from(vec![n])],
                Arc::new(NoKey),
            ))
        };
        let resolver = SniResolver {
            default: key(0),
            exact: HashMap::from([("api.example.com".to_owned(), key(1))]),
            wildcard: HashMap::from([("example.com".to_owned(), key(2))]),
        };
        let served = |sni: Option<&str>| resolver.lookup(sni).cert[0].as_ref()[0];
        assert_eq!(served(None), 0);
        assert_eq!(served(Some("api.example.com")), 1);
        assert_eq!(served(Some("API.Example.com.")), 1);
        assert_eq!(served(Some("chat.example.com")), 2);
        assert_eq!(served(Some("example.com")), 0);
        assert_eq!(served(Some("a.b.example.com")), 0);
        assert_eq!(served(Some("other.test")), 0);
    }
}
