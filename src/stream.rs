//! One type for every socket the gateway relays: plain TCP or TLS over TCP, on either side.
//!
//! An enum rather than generics keeps one copy of the relay in the binary; the TLS variants
//! are boxed so an idle plain connection pays only for a `TcpStream`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    /// A client connection whose TLS we terminated.
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// A `wss://` backend.
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(tcp) => tcp,
            Self::ServerTls(tls) => tls.get_ref().0,
            Self::ClientTls(tls) => tls.get_ref().0,
        }
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, Self::Plain(_))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::ServerTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::ServerTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Self::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::ServerTls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Self::ClientTls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::ServerTls(s) => s.is_write_vectored(),
            Self::ClientTls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::ServerTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::ServerTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Self::ClientTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
