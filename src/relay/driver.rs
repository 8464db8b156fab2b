//! The thin I/O driver around [`Connection`]: moves bytes between the two sockets and the
//! state machine, arms one timer for its next deadline, and listens for the stop signal.
//!
//! A hop whose read or write returned `Pending` is not polled again until the task is woken:
//! the waker is registered, so asking again would only repeat the readiness check.

use super::compress::{DeflateReservation, RelayCompression};
use super::connection::{Connection, RelaySettings, Stop};
use super::credentials::{Credentials, VerifyRefresh};
use super::ending::RelayReport;
use super::hop::Side;
use crate::metrics::RelayCounters;
use crate::proto::FrameDecoder;
use crate::stream::Stream;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// One hop as the handshake left it: its socket, the decoder for what it sends, and bytes it
/// sent right after its handshake head (read together with it: the start of its frames).
#[derive(Debug)]
pub struct HopStart<'a> {
    pub stream: Stream,
    pub decoder: FrameDecoder,
    pub early: &'a [u8],
}

/// A connection whose handshakes are done on both hops, ready to relay.
#[derive(Debug)]
pub struct Relay {
    connection: Connection,
    client: Stream,
    backend: Stream,
    /// Boxed: only routes whose clients may refresh their token pay for it.
    verify_refresh: Option<Box<VerifyRefresh>>,
}

/// What returned `Pending` on one hop during the current wake-up.
#[derive(Debug, Default, Clone, Copy)]
struct Blocked {
    read: bool,
    write: bool,
}

impl Relay {
    pub fn new(
        client: HopStart<'_>,
        backend: HopStart<'_>,
        settings: RelaySettings,
        counters: RelayCounters,
        compression: RelayCompression,
    ) -> Self {
        let now = Instant::now().into_std();
        let mut connection = Connection::new(
            (client.decoder, backend.decoder),
            settings,
            counters,
            compression,
            client.stream.is_plain(),
            now,
        );
        connection.receive_early(Side::Client, client.early, now);
        connection.receive_early(Side::Backend, backend.early, now);
        Self {
            connection,
            client: client.stream,
            backend: backend.stream,
            verify_refresh: None,
        }
    }

    /// Enforces the client's credentials: closed at their expiry, and, when they allow it,
    /// extended by a token presented in-band and checked by `verify`.
    pub fn with_credentials(mut self, credentials: Credentials, verify: VerifyRefresh) -> Self {
        self.verify_refresh = credentials.refresh.then(|| Box::new(verify));
        self.connection.set_credentials(credentials);
        self
    }

    /// Keeps the connection's share of the gateway's compression memory until it ends.
    pub fn hold_deflate_memory(&mut self, reservation: DeflateReservation) {
        self.connection.hold_deflate_memory(reservation);
    }

    /// Relays until both hops are closed, then hands the report to `finish`. When the future
    /// `stop` makes completes, the gateway ends the connection as the [`Stop`] says and the
    /// relay finishes the closing handshakes.
    ///
    /// An idle connection's memory is mostly this future, so nothing in it is stored twice:
    /// it is an `async move` block rather than an `async fn` (whose arguments rustc stores
    /// both as arguments and as the bindings the body uses); `stop` is a closure, so its future
    /// is made where it is polled instead of being moved there from a captured copy; and
    /// `finish` runs inside, instead of in an outer future that would hold a second copy of
    /// the relay while awaiting this one.
    #[allow(clippy::manual_async_fn)] // deliberately not an async fn: see above
    pub fn run<S: Future<Output = Stop>, R>(
        mut self,
        stop: impl FnOnce() -> S,
        finish: impl FnOnce(RelayReport) -> R,
    ) -> impl Future<Output = R> {
        async move {
            let timer = tokio::time::sleep(Duration::from_secs(3600));
            tokio::pin!(timer);
            let stopped = tokio::select! {
                () = poll_fn(|cx| self.poll_relay(cx, timer.as_mut())) => None,
                stop = stop() => Some(stop),
            };
            if let Some(stop) = stopped {
                self.connection.stop(stop, Instant::now().into_std());
                poll_fn(|cx| self.poll_relay(cx, timer.as_mut())).await;
            }
            finish(self.connection.report())
        }
    }

    fn poll_relay(&mut self, cx: &mut Context<'_>, mut timer: Pin<&mut Sleep>) -> Poll<()> {
        let mut blocked = [Blocked::default(); 2];
        loop {
            let now = Instant::now();
            while self.pump(cx, &mut blocked, now.into_std()) {}
            if let Some(verify) = &self.verify_refresh
                && let Some(token) = self.connection.take_presented_token()
            {
                self.connection
                    .on_refresh(verify.check(&token), now.into_std());
                continue;
            }
            if self.connection.is_finished() {
                return Poll::Ready(());
            }
            let Some(deadline) = self.connection.poll_timeout() else {
                return Poll::Pending;
            };
            let deadline = Instant::from_std(deadline);
            if deadline <= now {
                self.connection.on_timeout(now.into_std());
                continue;
            }
            if timer.is_elapsed() || timer.deadline() > deadline {
                timer.as_mut().reset(deadline);
            }
            ready!(timer.as_mut().poll(cx));
            self.connection.on_timeout(Instant::now().into_std());
        }
    }

    /// One round of I/O on both hops: writes, shutdowns, reads. Returns whether anything
    /// moved.
    fn pump(
        &mut self,
        cx: &mut Context<'_>,
        blocked: &mut [Blocked; 2],
        now: std::time::Instant,
    ) -> bool {
        let mut progress = false;
        for (index, side) in [Side::Client, Side::Backend].into_iter().enumerate() {
            let blocked = &mut blocked[index];
            let stream = match side {
                Side::Client => &mut self.client,
                Side::Backend => &mut self.backend,
            };
            let connection = &mut self.connection;
            while !blocked.write
                && let Some(bytes) = connection.transmit(side)
            {
                match Pin::new(&mut *stream).poll_write(cx, bytes) {
                    Poll::Ready(Ok(n)) if n > 0 => connection.on_written(side, n, now),
                    Poll::Ready(_) => connection.on_write_error(side, now),
                    Poll::Pending => blocked.write = true,
                }
                progress |= !blocked.write;
            }
            if !blocked.write && connection.wants_shutdown(side) {
                match Pin::new(&mut *stream).poll_shutdown(cx) {
                    Poll::Ready(_) => {
                        connection.on_shutdown(side, now);
                        progress = true;
                    }
                    Poll::Pending => blocked.write = true,
                }
            }
            if !blocked.read
                && let Some(space) = connection.read_space(side)
            {
                let mut read_buf = ReadBuf::new(space);
                match Pin::new(&mut *stream).poll_read(cx, &mut read_buf) {
                    Poll::Ready(Ok(())) => {
                        let n = read_buf.filled().len();
                        connection.on_read(side, n, now);
                        progress = true;
                    }
                    Poll::Ready(Err(_)) => {
                        connection.on_read_error(side, now);
                        progress = true;
                    }
                    Poll::Pending => {
                        blocked.read = true;
                        connection.on_read_blocked(side);
                    }
                }
            }
        }
        progress
    }
}
