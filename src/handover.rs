//! Binary upgrades and listener changes without closing anything: a running wsgate hands its
//! listening sockets to its successor over a Unix socket (SCM_RIGHTS, as HAProxy's `-x` and
//! Envoy's hot restart do), then drains gradually while the successor accepts.
//!
//! The exchange, on one Unix stream connection from the successor to the predecessor:
//! 1. successor: `wsgate-handover 1\n`;
//! 2. predecessor: one line of JSON listing its listening sockets
//!    (`{"sockets":[{"role":"listener","address":"127.0.0.1:8080"},...]}`), with their
//!    descriptors attached in the same order;
//! 3. successor: keeps the sockets its configuration still lists (by address), binds the new
//!    ones, closes the others, starts accepting, then `ready\n`;
//! 4. predecessor: stops accepting (its copies close; the kernel's listen queues live on in the
//!    successor's), answers `draining\n`, and closes its connections spread over
//!    `drain.spread`, then exits.
//!
//! Invariants:
//! - a listening socket stays open in at least one process throughout, so no connection
//!   attempt is refused: one that arrives while neither accepts waits in the listen queue;
//! - a successor that fails before `ready` (bad configuration, crash, timeout) leaves the
//!   predecessor serving as before; each step has a deadline ([`STEP_TIMEOUT`]);
//! - descriptors are received close-on-exec and owned ([`OwnedFd`]) from the moment they
//!   arrive: one that is not used is closed, never leaked.

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

/// The longest any step of the exchange may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// More sockets than any configuration lists; bounds what a predecessor may send.
const MAX_SOCKETS: usize = 64;
const HELLO: &str = "wsgate-handover 1";
const READY: &str = "ready";
const DRAINING: &str = "draining";
/// Longer than any line of the exchange: the socket list of [`MAX_SOCKETS`] entries.
const MAX_LINE: usize = 16 * 1024;

/// What a handed-over socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Listener,
    Admin,
}

/// A listening socket, as handed over.
#[derive(Debug)]
pub struct Socket {
    pub role: Role,
    pub address: SocketAddr,
    pub fd: OwnedFd,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    role: Role,
    address: SocketAddr,
}

#[derive(Debug, Serialize, Deserialize)]
struct Listing {
    sockets: Vec<Entry>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("hand-over socket {path}: {what}")]
    Protocol { path: PathBuf, what: String },
    #[error("hand-over socket {path}: the other process did not answer within {STEP_TIMEOUT:?}")]
    TimedOut { path: PathBuf },
}

/// The sockets taken over from a predecessor, and the connection to tell it we are ready.
#[derive(Debug)]
pub struct Inherited {
    sockets: Vec<Socket>,
    connection: BufReader<UnixStream>,
    path: PathBuf,
}

impl Inherited {
    /// The socket for `role` at `address`, if the predecessor had one.
    pub fn take(&mut self, role: Role, address: SocketAddr) -> Option<std::net::TcpListener> {
        let at = self
            .sockets
            .iter()
            .position(|s| s.role == role && s.address == address)?;
        let socket = self.sockets.swap_remove(at);
        Some(std::net::TcpListener::from(socket.fd))
    }

    /// Addresses handed over but not taken: listeners the new configuration removed. They
    /// close when this is dropped.
    pub fn unused(&self) -> Vec<SocketAddr> {
        self.sockets.iter().map(|s| s.address).collect()
    }

    /// Tells the predecessor that we accept on everything, and waits for it to stop.
    pub async fn confirm(mut self) -> Result<(), HandoverError> {
        self.sockets.clear();
        let path = self.path.clone();
        step(&path, async {
            let stream = self.connection.get_mut();
            stream.write_all(format!("{READY}\n").as_bytes()).await?;
            let line = read_line(&mut self.connection).await?;
            Ok(line)
        })
        .await
        .and_then(|line| expect(&path, &line, DRAINING))
    }
}

/// Asks the wsgate serving hand-overs at `path` for its listening sockets. `None` when nobody
/// serves there (a first start): the caller binds everything itself.
pub async fn take_over(path: &Path) -> Result<Option<Inherited>, HandoverError> {
    let stream = match UnixStream::connect(path).await {
        Ok(stream) => stream,
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(source) => {
            return Err(HandoverError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut connection = BufReader::new(stream);
    let (listing, fds) = step(path, async {
        connection
            .get_mut()
            .write_all(format!("{HELLO}\n").as_bytes())
            .await?;
        receive_with_fds(&mut connection).await
    })
    .await?;
    let listing: Listing =
        serde_json::from_str(&listing).map_err(|error| HandoverError::Protocol {
            path: path.to_owned(),
            what: format!("unreadable socket list: {error}"),
        })?;
    if listing.sockets.len() != fds.len() {
        return Err(HandoverError::Protocol {
            path: path.to_owned(),
            what: format!(
                "{} sockets listed, {} descriptors received",
                listing.sockets.len(),
                fds.len()
            ),
        });
    }
    let mut sockets = Vec::with_capacity(fds.len());
    for (entry, fd) in listing.sockets.into_iter().zip(fds) {
        // What the peer says must be what the descriptor is.
        let listener = std::net::TcpListener::from(fd);
        let actual = listener.local_addr().ok();
        if actual != Some(entry.address) {
            return Err(HandoverError::Protocol {
                path: path.to_owned(),
                what: format!("socket listed as {} is bound to {actual:?}", entry.address),
            });
        }
        listener
            .set_nonblocking(true)
            .map_err(|source| HandoverError::Io {
                path: path.to_owned(),
                source,
            })?;
        sockets.push(Socket {
            role: entry.role,
            address: entry.address,
            fd: OwnedFd::from(listener),
        });
    }
    Ok(Some(Inherited {
        sockets,
        connection,
        path: path.to_owned(),
    }))
}

/// Serves one hand-over at `path` (owner-only permissions): sends `sockets` to a successor
/// and, once it is ready, notifies `handed_over` and returns. A successor that fails midway
/// is dropped and the next one is served.
pub async fn serve(
    path: PathBuf,
    sockets: Vec<Socket>,
    handed_over: Arc<Notify>,
) -> Result<(), HandoverError> {
    let io_error = |source| HandoverError::Io {
        path: path.clone(),
        source,
    };
    // A stale file from a process that is gone, or the one our predecessor listened on.
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(io_error(error)),
    }
    let listener = UnixListener::bind(&path).map_err(io_error)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_error)?;
    }
    tracing::info!("serving hand-overs on {}", path.display());
    loop {
        let (stream, _) = listener.accept().await.map_err(io_error)?;
        match hand_over(&path, stream, &sockets).await {
            Ok(mut connection) => {
                handed_over.notify_one();
                tracing::info!("listening sockets handed over; draining");
                // Best effort: the successor already knows it owns the sockets.
                let _ = connection
                    .write_all(format!("{DRAINING}\n").as_bytes())
                    .await;
                return Ok(());
            }
            Err(error) => tracing::warn!("hand-over failed, still serving: {error}"),
        }
    }
}

async fn hand_over(
    path: &Path,
    stream: UnixStream,
    sockets: &[Socket],
) -> Result<UnixStream, HandoverError> {
    let mut connection = BufReader::new(stream);
    let hello = step(path, read_line(&mut connection)).await?;
    expect(path, &hello, HELLO)?;
    let listing = Listing {
        sockets: sockets
            .iter()
            .map(|s| Entry {
                role: s.role,
                address: s.address,
            })
            .collect(),
    };
    let mut line = serde_json::to_vec(&listing).map_err(|error| HandoverError::Protocol {
        path: path.to_owned(),
        what: error.to_string(),
    })?;
    line.push(b'\n');
    step(path, send_with_fds(connection.get_mut(), &line, sockets)).await?;
    // The successor binds, starts and answers; that may take a while on a busy machine.
    let ready = step(path, read_line(&mut connection)).await?;
    expect(path, &ready, READY)?;
    Ok(connection.into_inner())
}

async fn step<T>(
    path: &Path,
    work: impl Future<Output = io::Result<T>>,
) -> Result<T, HandoverError> {
    match tokio::time::timeout(STEP_TIMEOUT, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(HandoverError::Io {
            path: path.to_owned(),
            source,
        }),
        Err(_) => Err(HandoverError::TimedOut {
            path: path.to_owned(),
        }),
    }
}

fn expect(path: &Path, line: &str, wanted: &str) -> Result<(), HandoverError> {
    if line == wanted {
        Ok(())
    } else {
        Err(HandoverError::Protocol {
            path: path.to_owned(),
            what: format!("expected {wanted:?}, got {:?}", truncate(line)),
        })
    }
}

fn truncate(line: &str) -> &str {
    line.get(..80).unwrap_or(line)
}

/// One line, without its `\n`, at most [`MAX_LINE`] bytes.
async fn read_line(connection: &mut BufReader<UnixStream>) -> io::Result<String> {
    let mut line = Vec::new();
    let mut limited = (&mut *connection).take(MAX_LINE as u64);
    limited.read_until(b'\n', &mut line).await?;
    if line.pop() != Some(b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the connection ended mid-line",
        ));
    }
    String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

async fn send_with_fds(
    stream: &mut UnixStream,
    bytes: &[u8],
    sockets: &[Socket],
) -> io::Result<()> {
    let fds: Vec<_> = sockets.iter().map(|s| s.fd.as_fd()).collect();
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut sent = 0;
    while sent < bytes.len() {
        stream.writable().await?;
        let result = stream.try_io(Interest::WRITABLE, || {
            let mut control = SendAncillaryBuffer::new(&mut space);
            // The descriptors travel with the first bytes only.
            if sent == 0 && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(io::Error::other("descriptor buffer too small"));
            }
            let iov = [IoSlice::new(&bytes[sent..])];
            rustix::net::sendmsg(&*stream, &iov, &mut control, SendFlags::NOSIGNAL)
                .map_err(io::Error::from)
        });
        match result {
            Ok(n) => sent += n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// A line and the descriptors that came with it (at most [`MAX_SOCKETS`]).
async fn receive_with_fds(
    connection: &mut BufReader<UnixStream>,
) -> io::Result<(String, Vec<OwnedFd>)> {
    let stream = connection.get_mut();
    let mut fds = Vec::new();
    let mut line = Vec::new();
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut chunk = [0u8; 4096];
    while !line.ends_with(b"\n") {
        if line.len() > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "socket list too long",
            ));
        }
        stream.readable().await?;
        let result = stream.try_io(Interest::READABLE, || {
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [IoSliceMut::new(&mut chunk)];
            let received =
                rustix::net::recvmsg(&*stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)
                    .map_err(io::Error::from)?;
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received_fds) = message {
                    fds.extend(received_fds);
                }
            }
            Ok(received.bytes)
        });
        match result {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the other process closed the connection",
                ));
            }
            Ok(n) => line.extend_from_slice(&chunk[..n]),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    line.pop();
    let line = String::from_utf8(line)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))?;
    Ok((line, fds))
}
