//! Opening the backend side of a connection: TCP (and TLS for `wss://`), the client handshake,
//! and the backend's answer. `connect_timeout` bounds each of the two phases: reaching the
//! backend, then its answer to the handshake.
//!
//! Every failure maps to what the client is told before any 101 is sent: the backend's own
//! refusal is passed on with its status, an unreachable or misbehaving backend is 502, a slow
//! one 504, and a gateway out of local resources (descriptors, ports, buffers) 503. Only a
//! failure to reach the backend ([`UpstreamError::is_reach_failure`]) says anything about the
//! backend's health: once the connection is up, a slow or wrong answer is that request's
//! problem (an HTTP long-poll endpoint that ignores `Upgrade` answers nothing, by design).

use crate::config::Backend;
use crate::proto::handshake::{self, ClientRequest};
use crate::relay::mask_keys::random_16;
use crate::resources;
use crate::stream::Stream;
use httparse::EMPTY_HEADER;
use rustls_pki_types::ServerName;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Largest backend response head accepted.
const MAX_RESPONSE_HEAD: usize = 16 << 10;
/// Largest refusal body passed on to the client; a longer one is replaced by our own line.
const MAX_REFUSAL_BODY: usize = 64 << 10;
const MAX_RESPONSE_HEADERS: usize = 64;

/// TLS settings for the `wss://` backends of one upstream.
#[derive(Clone)]
pub struct BackendTls {
    pub connector: TlsConnector,
    /// Overrides the URL's host as SNI and verified name.
    pub server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// What the gateway asks of the backend, on behalf of the client.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamRequest<'a> {
    /// `Host` as the client sent it: backends that check `Origin` against `Host` keep working.
    pub host: &'a str,
    /// The client's path and query (the backend's base path is prepended here).
    pub target: &'a str,
    pub protocols: Option<&'a str>,
    pub extensions: Option<&'a str>,
    pub extra: &'a [(&'a str, &'a [u8])],
}

/// A backend that accepted the upgrade.
#[derive(Debug)]
pub struct Upgraded {
    pub stream: Stream,
    pub protocol: Option<String>,
    pub extensions: Option<String>,
    /// Bytes the backend sent after its 101 head: the start of its frame stream.
    pub early: Vec<u8>,
    /// The 101's end-to-end headers (`Set-Cookie`, the application's), for the client's 101.
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to backend {backend}: {source}")]
    Connect { backend: String, source: io::Error },
    /// The gateway itself ran out of descriptors, local ports or buffers: nothing is known
    /// about the backend.
    #[error("gateway out of resources connecting to backend {backend}: {source}")]
    LocalResources { backend: String, source: io::Error },
    #[error("backend {backend} did not accept the connection within {timeout:?}")]
    ConnectTimeout { backend: String, timeout: Duration },
    #[error("TLS with backend {backend} failed: {source}")]
    Tls { backend: String, source: io::Error },
    #[error("backend {backend} did not answer the handshake within {timeout:?}")]
    AnswerTimeout { backend: String, timeout: Duration },
    /// Reading or writing failed on a connection that was up.
    #[error("connection to backend {backend} failed during the handshake: {source}")]
    Io { backend: String, source: io::Error },
    #[error("backend {backend} refused the upgrade with status {status}")]
    Refused {
        backend: String,
        status: u16,
        /// The backend's answer, to pass on to the client.
        response: Box<Refusal>,
    },
    #[error("backend {backend} answered the upgrade wrongly: {source}")]
    Handshake {
        backend: String,
        source: handshake::ClientHandshakeError,
    },
    #[error("backend {backend} closed the connection during the handshake")]
    Closed { backend: String },
}

impl UpstreamError {
    /// The status the client receives.
    pub fn status(&self) -> u16 {
        match self {
            Self::ConnectTimeout { .. } | Self::AnswerTimeout { .. } => 504,
            Self::LocalResources { .. } => 503,
            Self::Refused { status, .. } => *status,
            _ => 502,
        }
    }

    /// A short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::LocalResources { .. } => "local_resources",
            Self::ConnectTimeout { .. } => "connect_timeout",
            Self::Tls { .. } => "tls",
            Self::AnswerTimeout { .. } => "answer_timeout",
            Self::Io { .. } => "io",
            Self::Refused { .. } => "refused",
            Self::Handshake { .. } => "bad_handshake",
            Self::Closed { .. } => "closed",
        }
    }

    /// Whether the backend could not be reached (TCP refused or unreachable, TCP or TLS
    /// connect timeout, TLS handshake failure): the only failures passive health checks count.
    pub fn is_reach_failure(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. } | Self::ConnectTimeout { .. } | Self::Tls { .. }
        )
    }

    /// A failed TCP connect, told apart from the gateway's own exhaustion.
    fn connect(backend: String, source: io::Error) -> Self {
        if resources::is_exhaustion(&source) {
            Self::LocalResources { backend, source }
        } else {
            Self::Connect { backend, source }
        }
    }
}

/// Connects to `backend` (within `timeout`) and performs the WebSocket handshake (the answer
/// within `timeout` again, counted from the connection being up).
pub async fn open(
    backend: &Backend,
    tls: Option<&BackendTls>,
    timeout: Duration,
    request: &UpstreamRequest<'_>,
) -> Result<Upgraded, UpstreamError> {
    let stream = connect_within(backend, tls, timeout).await?;
    match tokio::time::timeout(timeout, ask_upgrade(backend, stream, request)).await {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::AnswerTimeout {
            backend: backend.url.clone(),
            timeout,
        }),
    }
}

/// [`connect`] within `timeout`; running out of time is a [`UpstreamError::ConnectTimeout`].
pub async fn connect_within(
    backend: &Backend,
    tls: Option<&BackendTls>,
    timeout: Duration,
) -> Result<Stream, UpstreamError> {
    match tokio::time::timeout(timeout, connect(backend, tls)).await {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::ConnectTimeout {
            backend: backend.url.clone(),
            timeout,
        }),
    }
}

/// Opens the transport to a backend: TCP, and TLS for `wss://`. No timeout of its own: callers
/// bound it together with what follows.
pub async fn connect(backend: &Backend, tls: Option<&BackendTls>) -> Result<Stream, UpstreamError> {
    let url = || backend.url.clone();
    let tcp = TcpStream::connect((backend.host.as_str(), backend.port))
        .await
        .map_err(|source| UpstreamError::connect(url(), source))?;
    // Frames are written whole, one write per batch: Nagle would only add latency.
    let _ = tcp.set_nodelay(true);
    if !backend.secure {
        return Ok(Stream::Plain(tcp));
    }
    let Some(tls) = tls else {
        let source = io::Error::other("no TLS settings for a wss:// backend");
        return Err(UpstreamError::Tls {
            backend: url(),
            source,
        });
    };
    let name = match &tls.server_name {
        Some(name) => name.clone(),
        None => ServerName::try_from(backend.host.clone()).map_err(|e| UpstreamError::Tls {
            backend: url(),
            source: io::Error::other(e),
        })?,
    };
    let tls_stream =
        tls.connector
            .connect(name, tcp)
            .await
            .map_err(|source| UpstreamError::Tls {
                backend: url(),
                source,
            })?;
    Ok(Stream::ClientTls(Box::new(tls_stream)))
}

async fn ask_upgrade(
    backend: &Backend,
    mut stream: Stream,
    request: &UpstreamRequest<'_>,
) -> Result<Upgraded, UpstreamError> {
    let url = || backend.url.clone();

    let key = handshake::key_from_random(random_16());
    let target = if backend.base_path.is_empty() {
        request.target.to_owned()
    } else {
        format!("{}{}", backend.base_path, request.target)
    };
    let mut head = Vec::with_capacity(512);
    handshake::write_request(
        &mut head,
        &ClientRequest {
            host: request.host,
            target: &target,
            key: &key,
            protocols: request.protocols,
            extensions: request.extensions,
            extra: request.extra,
        },
    );
    stream
        .write_all(&head)
        .await
        .map_err(|source| UpstreamError::Io {
            backend: url(),
            source,
        })?;

    let mut buf = Vec::new();
    // Whether `buf` may hold a complete head not parsed yet (after an interim answer).
    let mut parse_first = false;
    loop {
        if !parse_first && buf.len() >= MAX_RESPONSE_HEAD {
            let source =
                handshake::ClientHandshakeError::Malformed(httparse::Error::TooManyHeaders);
            return Err(UpstreamError::Handshake {
                backend: url(),
                source,
            });
        }
        if !std::mem::take(&mut parse_first) {
            let n = stream.read_appending(&mut buf, MAX_RESPONSE_HEAD).await;
            let n = n.map_err(|source| UpstreamError::Io {
                backend: url(),
                source,
            })?;
            if n == 0 {
                return Err(UpstreamError::Closed { backend: url() });
            }
        }
        let mut storage = [EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let parsed = handshake::parse_response(&buf, &mut storage).map_err(|source| {
            UpstreamError::Handshake {
                backend: url(),
                source,
            }
        })?;
        let Some((response, head_len)) = parsed else {
            continue;
        };
        if is_interim(response.status) {
            // `100 Continue`, `103 Early Hints`...: the answer is the next head (RFC 9110
            // §15.2). Their number is bounded by the connect timeout around the handshake.
            buf.drain(..head_len);
            parse_first = !buf.is_empty();
            continue;
        }
        return match handshake::validate_response(
            &response,
            &key,
            request.protocols,
            request.extensions,
        ) {
            Ok(negotiated) => Ok(Upgraded {
                protocol: negotiated.protocol.map(str::to_owned),
                extensions: negotiated.extensions.map(str::to_owned),
                early: buf[head_len..].to_vec(),
                headers: handshake::end_to_end_headers(response.headers),
                stream,
            }),
            Err(handshake::ClientHandshakeError::Rejected { status }) => {
                let response = refusal_response(&response, &buf[head_len..], &mut stream).await;
                let response = Box::new(response);
                Err(UpstreamError::Refused {
                    backend: url(),
                    status,
                    response,
                })
            }
            Err(source) => Err(UpstreamError::Handshake {
                backend: url(),
                source,
            }),
        };
    }
}

/// An informational status other than 101, which is the answer to an upgrade.
fn is_interim(status: u16) -> bool {
    (100..200).contains(&status) && status != 101
}

/// Statuses whose responses have no body whatever their headers say (RFC 9110 §6.4.1).
fn is_bodyless(status: u16) -> bool {
    status == 204 || status == 304
}

/// Headers that describe one hop of the backend's connection, not the response.
fn is_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "te",
        "trailer",
        "content-length",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// The backend's refusal as the client will see it: the backend's status and end-to-end
/// headers, and its body when it is length-delimited and small; `Connection: close`.
async fn refusal_response(
    response: &handshake::ResponseHead<'_, '_>,
    already: &[u8],
    stream: &mut Stream,
) -> Refusal {
    let content_length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    let mut body = Vec::new();
    let bodyless = is_bodyless(response.status);
    if let Some(len) = content_length.filter(|&len| len <= MAX_REFUSAL_BODY && !bodyless) {
        body.extend_from_slice(&already[..already.len().min(len)]);
        if body.len() < len {
            let start = body.len();
            body.resize(len, 0);
            if stream.read_exact(&mut body[start..]).await.is_err() {
                body.clear();
            }
        }
    }
    // Without the backend's body, its Content-Type would describe the wrong bytes.
    let own_body = body.is_empty() && !bodyless;
    let mut headers: Vec<(String, Vec<u8>)> = response
        .headers
        .iter()
        .filter(|h| {
            let replaced_type = own_body && h.name.eq_ignore_ascii_case("content-type");
            !is_hop_by_hop(h.name) && !replaced_type
        })
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect();
    if own_body {
        body = format!(
            "backend refused the WebSocket upgrade with status {}\n",
            response.status
        )
        .into_bytes();
        headers.push((
            "Content-Type".to_owned(),
            b"text/plain; charset=utf-8".to_vec(),
        ));
    }
    Refusal {
        status: response.status,
        reason: response.reason.to_owned(),
        headers,
        body,
        rule: None,
    }
}

/// A final HTTP answer to a client that will not get a WebSocket: the gateway's own (a status
/// and a one-line reason) or a backend's refusal passed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
    /// End-to-end headers, without Content-Length and Connection (added when written).
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// The gateway's own rule that refused the client (a fixed label: origin, route_limit,
    /// key, ...); `None` when the answer is about the backend (its refusal passed on, or a
    /// failure to reach it).
    pub rule: Option<&'static str>,
}

impl Refusal {
    /// Marks this refusal as the gateway's own rule `rule`.
    pub fn by_rule(self, rule: &'static str) -> Self {
        Self {
            rule: Some(rule),
            ..self
        }
    }

    /// The gateway's own refusal: `status`, a one-line plain-text body, and `extra` headers.
    pub fn plain(status: u16, line: &str, extra: &[(&str, &str)]) -> Self {
        let mut headers: Vec<(String, Vec<u8>)> = extra
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
            .collect();
        headers.push((
            "Content-Type".to_owned(),
            b"text/plain; charset=utf-8".to_vec(),
        ));
        Self {
            status,
            reason: handshake::server::reason_phrase(status).to_owned(),
            headers,
            body: format!("{line}\n").into_bytes(),
            rule: None,
        }
    }

    /// The complete response, ending the connection.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.body.len());
        out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", self.status, self.reason).as_bytes());
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        if is_bodyless(self.status) {
            // A client reads no body after these, so any byte written would be taken for the
            // start of a next response.
            out.extend_from_slice(b"Connection: close\r\n\r\n");
            return out;
        }
        out.extend_from_slice(
            format!(
                "Content-Length: {}\r\nConnection: close\r\n\r\n",
                self.body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(&self.body);
        out
    }
}

/// Builds the TLS client side for an upstream's `wss://` backends.
pub fn backend_tls(
    config: Arc<rustls::ClientConfig>,
    server_name: Option<ServerName<'static>>,
) -> BackendTls {
    BackendTls {
        connector: TlsConnector::from(config),
        server_name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_the_gateways_problem_not_the_backends() {
        let local =
            UpstreamError::connect("ws://b".into(), io::Error::from_raw_os_error(libc::EMFILE));
        assert!(matches!(local, UpstreamError::LocalResources { .. }));
        assert_eq!((local.status(), local.is_reach_failure()), (503, false));
        let refused = UpstreamError::connect(
            "ws://b".into(),
            io::Error::from_raw_os_error(libc::ECONNREFUSED),
        );
        assert!(matches!(refused, UpstreamError::Connect { .. }));
        assert_eq!((refused.status(), refused.is_reach_failure()), (502, true));
    }
}
