//! `wsgate::tls` against real sockets on 127.0.0.1: certificate choice by SNI, protocol
//! versions, ALPN, trust, and the load-time errors.
//!
//! The fixtures are the committed development certificates in `certs/`.

// A test reports a broken assumption by panicking: unwrap, expect and panic! are its asserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/tls_hello.rs"]
mod tls_hello;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tls_hello::raw_client_hello;

use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, DigitallySignedStruct, ProtocolVersion, RootCertStore, ServerConfig,
    SignatureScheme, SupportedProtocolVersion,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use wsgate::config::model::{CertificateFiles, ServerTls, UpstreamTls};
use wsgate::tls::{self, TlsError};

/// Generous: these are loopback handshakes, a stall means a bug.
const STEP: Duration = Duration::from_secs(10);

fn cert_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("certs")
        .join(name)
}

fn files(stem: &str, names: &[&str]) -> CertificateFiles {
    CertificateFiles {
        cert: cert_path(&format!("{stem}.crt")),
        key: cert_path(&format!("{stem}.key")),
        server_names: names.iter().map(|n| (*n).to_owned()).collect(),
    }
}

/// The listener under test: `localhost` first, so it is the default.
fn gateway_tls() -> ServerTls {
    ServerTls {
        certificates: vec![
            files("localhost", &["localhost"]),
            files("example-test", &["example.test", "*.example.test"]),
        ],
    }
}

fn chain(name: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(cert_path(name))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn leaf(name: &str) -> CertificateDer<'static> {
    chain(name).remove(0)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn dev_ca_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in chain("ca.crt") {
        roots.add(cert).unwrap();
    }
    roots
}

/// A client like a browser: trusts the dev CA and offers `h2` before `http/1.1`.
fn dev_client(versions: &[&'static SupportedProtocolVersion]) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(dev_ca_roots())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

fn dev_client_all_versions() -> Arc<ClientConfig> {
    dev_client(rustls::ALL_VERSIONS)
}

/// Accepts any certificate (still checking handshake signatures) so tests can see which
/// certificate the server picked for a name the certificate does not cover.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn any_cert_client() -> Arc<ClientConfig> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
        .with_no_client_auth();
    Arc::new(config)
}

/// Starts a TLS server on 127.0.0.1:0 that, after each handshake, writes one line saying
/// what it saw (`sni=... alpn=... version=...`) and closes cleanly.
async fn start_server(config: Arc<ServerConfig>) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // Refused handshakes are what several tests want; the client side asserts.
                let Ok(Ok(mut stream)) = timeout(STEP, acceptor.accept(tcp)).await else {
                    return;
                };
                let (_, conn) = stream.get_ref();
                let line = format!(
                    "sni={} alpn={} version={:?}\n",
                    conn.server_name().unwrap_or("-"),
                    conn.alpn_protocol()
                        .map_or("-".into(), String::from_utf8_lossy),
                    conn.protocol_version(),
                );
                let _ = stream.write_all(line.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

async fn start_gateway() -> SocketAddr {
    start_server(tls::server_config(&gateway_tls()).unwrap()).await
}

/// What a client saw of a completed handshake.
#[derive(Debug)]
struct Session {
    chain: Vec<CertificateDer<'static>>,
    alpn: Option<Vec<u8>>,
    version: ProtocolVersion,
    /// The server's line: what it saw.
    server_saw: String,
}

async fn connect(
    config: Arc<ClientConfig>,
    addr: SocketAddr,
    name: ServerName<'static>,
) -> io::Result<Session> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut stream = TlsConnector::from(config).connect(name, tcp).await?;
        let (_, conn) = stream.get_ref();
        let chain = conn.peer_certificates().unwrap_or_default().to_vec();
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let version = conn.protocol_version().unwrap();
        let mut server_saw = String::new();
        stream.read_to_string(&mut server_saw).await?;
        Ok(Session {
            chain,
            alpn,
            version,
            server_saw,
        })
    };
    timeout(STEP, attempt).await.expect("handshake stalled")
}

fn dns(name: &str) -> ServerName<'static> {
    ServerName::try_from(name.to_owned()).unwrap()
}

fn ip_localhost() -> ServerName<'static> {
    ServerName::IpAddress(std::net::IpAddr::from(Ipv4Addr::LOCALHOST).into())
}

/// The rustls error inside a failed tokio-rustls handshake.
fn rustls_error(err: &io::Error) -> &rustls::Error {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {err:?}"))
}

#[tokio::test]
async fn sni_localhost_gets_the_localhost_chain() {
    let addr = start_gateway().await;
    let session = connect(dev_client_all_versions(), addr, dns("localhost"))
        .await
        .unwrap();
    assert_eq!(session.chain, chain("localhost.crt"), "leaf then CA");
    assert!(session.server_saw.starts_with("sni=localhost "));
}

#[tokio::test]
async fn sni_names_listed_for_the_second_certificate_get_it() {
    let addr = start_gateway().await;
    for name in ["chat.example.test", "example.test", "CHAT.Example.Test"] {
        let session = connect(dev_client_all_versions(), addr, dns(name))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(session.chain[0], leaf("example-test.crt"), "{name}");
    }
}

#[tokio::test]
async fn no_sni_gets_the_default_certificate() {
    let addr = start_gateway().await;
    // Connecting by IP address: rustls sends no SNI, and the leaf has a 127.0.0.1 SAN.
    let session = connect(dev_client_all_versions(), addr, ip_localhost())
        .await
        .unwrap();
    assert_eq!(session.chain[0], leaf("localhost.crt"));
    assert!(
        session.server_saw.starts_with("sni=- "),
        "{}",
        session.server_saw
    );
}

#[tokio::test]
async fn default_is_the_first_certificate_whatever_its_names() {
    let mut config = gateway_tls();
    config.certificates.reverse();
    let addr = start_server(tls::server_config(&config).unwrap()).await;
    let session = connect(any_cert_client(), addr, ip_localhost())
        .await
        .unwrap();
    assert_eq!(session.chain[0], leaf("example-test.crt"));
}

#[tokio::test]
async fn unknown_sni_gets_the_default_certificate() {
    let addr = start_gateway().await;
    // A wildcard covers one label only, so `a.b.example.test` is unknown too.
    for name in [
        "unknown.invalid",
        "a.b.example.test",
        "example.test.invalid",
    ] {
        let session = connect(any_cert_client(), addr, dns(name))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(session.chain[0], leaf("localhost.crt"), "{name}");
    }
}

#[tokio::test]
async fn tls13_is_preferred_and_a_tls12_only_client_succeeds() {
    let addr = start_gateway().await;
    let session = connect(dev_client_all_versions(), addr, dns("localhost"))
        .await
        .unwrap();
    assert_eq!(session.version, ProtocolVersion::TLSv1_3);

    let session = connect(
        dev_client(&[&rustls::version::TLS12]),
        addr,
        dns("localhost"),
    )
    .await
    .unwrap();
    assert_eq!(session.version, ProtocolVersion::TLSv1_2);
    assert!(session.server_saw.contains("version=Some(TLSv1_2)"));
    assert_eq!(session.alpn.as_deref(), Some(&b"http/1.1"[..]));
}

#[tokio::test]
async fn alpn_is_http11_only() {
    let addr = start_gateway().await;
    let session = connect(dev_client_all_versions(), addr, dns("localhost"))
        .await
        .unwrap();
    assert_eq!(session.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(session.server_saw.contains("alpn=http/1.1 "));

    // No ALPN offered at all: accepted, nothing negotiated.
    let mut config = (*dev_client_all_versions()).clone();
    config.alpn_protocols.clear();
    let session = connect(Arc::new(config), addr, dns("localhost"))
        .await
        .unwrap();
    assert_eq!(session.alpn, None);

    // Only h2 offered: refused rather than spoken to in the wrong protocol.
    let mut config = (*dev_client_all_versions()).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let err = connect(Arc::new(config), addr, dns("localhost"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_dev_ca_fails() {
    let addr = start_gateway().await;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
        .with_no_client_auth();
    let err = connect(Arc::new(config), addr, dns("localhost"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        ),
        "{err:?}"
    );
}

/// Sends a raw ClientHello and returns the first record header and up to 6 bytes of its
/// body, or `None` if the server closed without answering.
async fn first_answer(addr: SocketAddr, hello: &[u8]) -> Option<Vec<u8>> {
    let attempt = async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(hello).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0; 11];
        while answer.len() < buf.len() {
            match tcp.read(&mut buf[answer.len()..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[answer.len()..answer.len() + n]),
            }
        }
        (!answer.is_empty()).then_some(answer)
    };
    timeout(STEP, attempt)
        .await
        .expect("server neither answered nor closed")
}

/// Asserts that `answer` is a fatal alert and returns its description.
fn fatal_alert(answer: Option<Vec<u8>>) -> u8 {
    // Closing without a word would also refuse; rustls says why, and that is asserted.
    let answer = answer.expect("expected an alert, got a bare close");
    assert_ne!(
        answer[0], 0x16,
        "answered with a handshake record: {answer:02x?}"
    );
    assert_eq!(answer[0], 0x15, "not an alert record: {answer:02x?}");
    assert!(answer.len() >= 7, "truncated alert: {answer:02x?}");
    assert_eq!(answer[5], 2, "alert level should be fatal: {answer:02x?}");
    answer[6]
}

#[tokio::test]
async fn a_tls11_client_hello_is_refused_with_protocol_version() {
    let addr = start_gateway().await;
    let answer = first_answer(addr, &raw_client_hello([3, 2], true)).await;
    assert_eq!(fatal_alert(answer), 70, "protocol_version");
}

/// Without signature_algorithms (as openssl's TLS 1.1 client sends it) rustls stops at the
/// missing extension before looking at the version: handshake_failure rather than
/// protocol_version, still never a ServerHello.
#[tokio::test]
async fn a_tls11_client_hello_without_tls12_extensions_is_refused() {
    let addr = start_gateway().await;
    let answer = first_answer(addr, &raw_client_hello([3, 2], false)).await;
    let description = fatal_alert(answer);
    assert!(
        matches!(description, 40 | 70),
        "expected handshake_failure or protocol_version, got alert {description}"
    );
}

/// The same hand-made hello as TLS 1.2 gets a ServerHello: the refusal above is about the
/// version, not a malformed hello.
#[tokio::test]
async fn the_same_hello_as_tls12_gets_a_server_hello() {
    let addr = start_gateway().await;
    let answer = first_answer(addr, &raw_client_hello([3, 3], true))
        .await
        .expect("no answer");
    assert_eq!(answer[0], 0x16, "not a handshake record: {answer:02x?}");
    assert!(answer.len() >= 11, "truncated: {answer:02x?}");
    assert_eq!(answer[5], 2, "not a ServerHello: {answer:02x?}");
    assert_eq!(&answer[9..11], &[3, 3], "server_version: {answer:02x?}");
}

#[tokio::test]
async fn client_config_with_the_dev_ca_connects() {
    let addr = start_gateway().await;
    let upstream = UpstreamTls {
        ca_file: Some(cert_path("ca.crt")),
        server_name: None,
    };
    let config = tls::client_config(&upstream).unwrap();
    let name = tls::server_name_for("localhost", &upstream).unwrap();
    let session = connect(config.clone(), addr, name).await.unwrap();
    assert_eq!(session.chain[0], leaf("localhost.crt"));
    assert_eq!(session.alpn.as_deref(), Some(&b"http/1.1"[..]));

    // By IP: verified against the IP SAN, no SNI sent.
    let name = tls::server_name_for("127.0.0.1", &upstream).unwrap();
    let session = connect(config.clone(), addr, name).await.unwrap();
    assert!(session.server_saw.starts_with("sni=- "));

    // `server_name` overrides the URL's host for both SNI and verification.
    let upstream = UpstreamTls {
        server_name: Some("chat.example.test".into()),
        ..upstream
    };
    let name = tls::server_name_for("127.0.0.1", &upstream).unwrap();
    let session = connect(config, addr, name).await.unwrap();
    assert_eq!(session.chain[0], leaf("example-test.crt"));
    assert!(session.server_saw.starts_with("sni=chat.example.test "));
}

#[tokio::test]
async fn client_config_with_default_roots_rejects_the_dev_certificate() {
    let addr = start_gateway().await;
    let upstream = UpstreamTls::default();
    let config = tls::client_config(&upstream).unwrap();
    let name = tls::server_name_for("localhost", &upstream).unwrap();
    let err = connect(config, addr, name).await.unwrap_err();
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        ),
        "{err:?}"
    );
}

#[test]
fn server_name_for_accepts_dns_names_and_ip_addresses() {
    let plain = UpstreamTls::default();
    assert_eq!(
        tls::server_name_for("backend.internal", &plain).unwrap(),
        dns("backend.internal")
    );
    assert!(matches!(
        tls::server_name_for("[::1]", &plain).unwrap(),
        ServerName::IpAddress(_)
    ));
    assert!(matches!(
        tls::server_name_for("10.0.0.7", &plain).unwrap(),
        ServerName::IpAddress(_)
    ));
    let err = tls::server_name_for("not a host", &plain).unwrap_err();
    assert!(err.to_string().contains("\"not a host\""), "{err}");
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("wsgate-tls-test-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn server_error(cert: PathBuf, key: PathBuf) -> (TlsError, String) {
    let config = ServerTls {
        certificates: vec![CertificateFiles {
            cert,
            key,
            server_names: vec![],
        }],
    };
    let err = tls::server_config(&config).unwrap_err();
    let message = err.to_string();
    (err, message)
}

#[test]
fn missing_files_are_named() {
    let missing = cert_path("does-not-exist.crt");
    let (err, message) = server_error(missing.clone(), cert_path("localhost.key"));
    assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
    assert!(
        message.starts_with(&format!("{}: cannot read file: ", missing.display())),
        "{message}"
    );

    let missing = cert_path("does-not-exist.key");
    let (_, message) = server_error(cert_path("localhost.crt"), missing.clone());
    assert!(
        message.starts_with(&format!("{}: ", missing.display())),
        "{message}"
    );

    let upstream = UpstreamTls {
        ca_file: Some(cert_path("no-ca.crt")),
        server_name: None,
    };
    let message = tls::client_config(&upstream).unwrap_err().to_string();
    assert!(message.contains("no-ca.crt: cannot read file"), "{message}");
}

#[test]
fn empty_pem_files_are_named() {
    let scratch = Scratch::new("empty");
    let empty = scratch.file("empty.pem", b"");
    let (err, message) = server_error(empty.clone(), cert_path("localhost.key"));
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
    assert_eq!(
        message,
        format!("{}: no certificate found in PEM file", empty.display())
    );

    let (err, message) = server_error(cert_path("localhost.crt"), empty.clone());
    assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err:?}");
    assert!(
        message.starts_with(&format!(
            "{}: no private key found in PEM file",
            empty.display()
        )),
        "{message}"
    );

    // The certificate given where the key belongs: PEM, but no key in it.
    let (err, _) = server_error(cert_path("localhost.crt"), cert_path("localhost.crt"));
    assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err:?}");

    let upstream = UpstreamTls {
        ca_file: Some(empty.clone()),
        server_name: None,
    };
    let err = tls::client_config(&upstream).unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
}

#[test]
fn malformed_pem_is_named() {
    let scratch = Scratch::new("malformed");
    let broken = scratch.file(
        "broken.crt",
        b"-----BEGIN CERTIFICATE-----\nMIIB\n(no end marker)\n",
    );
    let (err, message) = server_error(broken.clone(), cert_path("localhost.key"));
    assert!(matches!(err, TlsError::Pem { .. }), "{err:?}");
    assert!(
        message.starts_with(&format!("{}: malformed PEM: ", broken.display())),
        "{message}"
    );
}

#[test]
fn a_key_that_does_not_match_its_certificate_is_named() {
    let (err, message) = server_error(cert_path("localhost.crt"), cert_path("example-test.key"));
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
    assert_eq!(
        message,
        format!(
            "{}: private key does not match the certificate in {}",
            cert_path("example-test.key").display(),
            cert_path("localhost.crt").display()
        )
    );
}

#[test]
fn an_unusable_key_is_named() {
    let scratch = Scratch::new("pkcs1");
    // A PKCS#1 section is recognised as a key; an empty RSA structure is then refused.
    let key = scratch.file(
        "rsa.key",
        b"-----BEGIN RSA PRIVATE KEY-----\nMAA=\n-----END RSA PRIVATE KEY-----\n",
    );
    let (err, message) = server_error(cert_path("localhost.crt"), key.clone());
    assert!(matches!(err, TlsError::UnsupportedKey { .. }), "{err:?}");
    assert!(
        message.starts_with(&format!("{}: unusable private key: ", key.display())),
        "{message}"
    );
}

#[test]
fn configuration_mistakes_are_refused() {
    let err = tls::server_config(&ServerTls {
        certificates: vec![],
    })
    .unwrap_err();
    assert!(matches!(err, TlsError::NoCertificates), "{err:?}");

    let err = tls::server_config(&ServerTls {
        certificates: vec![
            files("localhost", &["shared.test"]),
            files("example-test", &["Shared.Test"]),
        ],
    })
    .unwrap_err();
    assert!(matches!(err, TlsError::DuplicateSniName { .. }), "{err:?}");

    let err = tls::server_config(&ServerTls {
        certificates: vec![files("localhost", &["127.0.0.1"])],
    })
    .unwrap_err();
    assert!(matches!(err, TlsError::InvalidSniName { .. }), "{err:?}");
    assert!(err.to_string().contains("localhost.crt"), "{err}");
}

/// Re-encodes the PKCS#8 P-256 dev key as a SEC1 "EC PRIVATE KEY", as
/// `openssl ecparam -genkey` writes it, so that format is covered without shipping
/// another key.
fn sec1_from_pkcs8(pkcs8: &[u8]) -> Vec<u8> {
    /// (tag, whole TLV, contents, rest) for definite lengths below 64 KiB.
    fn tlv(input: &[u8]) -> (u8, &[u8], &[u8], &[u8]) {
        let (len, header) = match input[1] {
            n if n < 0x80 => (usize::from(n), 2),
            0x81 => (usize::from(input[2]), 3),
            0x82 => (usize::from(u16::from_be_bytes([input[2], input[3]])), 4),
            other => panic!("unexpected DER length byte {other:#x}"),
        };
        let end = header + len;
        (input[0], &input[..end], &input[header..end], &input[end..])
    }
    let (_, _, pkcs8, _) = tlv(pkcs8);
    let (_, _, _, rest) = tlv(pkcs8); // version
    let (_, _, _, rest) = tlv(rest); // algorithm identifier
    let (tag, _, ec_private_key, _) = tlv(rest);
    assert_eq!(tag, 0x04, "privateKey OCTET STRING");
    let (tag, _, fields, _) = tlv(ec_private_key);
    assert_eq!(tag, 0x30, "ECPrivateKey SEQUENCE");
    let (_, version, _, rest) = tlv(fields);
    let (_, private_key, _, rest) = tlv(rest);
    assert!(rest.first() != Some(&0xa0), "parameters already present");
    // [0] namedCurve prime256v1, which PKCS#8 carries outside and SEC1 files inside.
    let parameters = [
        0xa0, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    let inner = [version, private_key, &parameters, rest].concat();
    let mut der = vec![0x30, u8::try_from(inner.len()).expect("short form")];
    der.extend(inner);
    der
}

#[tokio::test]
async fn a_sec1_key_is_accepted() {
    let pkcs8 = match PrivateKeyDer::from_pem_file(cert_path("localhost.key")).unwrap() {
        PrivateKeyDer::Pkcs8(key) => key.secret_pkcs8_der().to_vec(),
        other => panic!("dev key should be PKCS#8, is {other:?}"),
    };
    let sec1 = sec1_from_pkcs8(&pkcs8);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&sec1);
    let pem = format!("-----BEGIN EC PRIVATE KEY-----\n{b64}\n-----END EC PRIVATE KEY-----\n");
    assert!(matches!(
        PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap(),
        PrivateKeyDer::Sec1(_)
    ));

    let scratch = Scratch::new("sec1");
    let config = ServerTls {
        certificates: vec![CertificateFiles {
            cert: cert_path("localhost.crt"),
            key: scratch.file("localhost-sec1.key", pem.as_bytes()),
            server_names: vec![],
        }],
    };
    let addr = start_server(tls::server_config(&config).unwrap()).await;
    let session = connect(dev_client_all_versions(), addr, dns("localhost"))
        .await
        .unwrap();
    assert_eq!(session.chain[0], leaf("localhost.crt"));
}
