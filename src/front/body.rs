//! Body wrappers for proxied HTTP: [`Tracked`] says when a body has been read to its end and
//! holds something (a backend's connection slot) for as long as the body is alive;
//! [`ClientBody`] does the same for a client's request body and bounds how long it may stall.

use hyper::body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

#[derive(Debug)]
pub struct Tracked<B, G> {
    inner: B,
    ended: Option<oneshot::Sender<()>>,
    _held: G,
}

impl<B: Body, G> Tracked<B, G> {
    /// Wraps `inner`; `ended` fires once it has been read to the end (at once for a body that
    /// is empty from the start, which hyper may never poll).
    pub fn new(inner: B, ended: Option<oneshot::Sender<()>>, held: G) -> Self {
        let mut body = Self {
            inner,
            ended,
            _held: held,
        };
        if body.inner.is_end_stream() {
            body.signal_end();
        }
        body
    }

    fn signal_end(&mut self) {
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(());
        }
    }
}

impl<B: Body + Unpin, G: Unpin> Body for Tracked<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        // A length-delimited body is complete with its last frame; hyper need not poll again.
        if matches!(polled, Poll::Ready(None)) || this.inner.is_end_stream() {
            this.signal_end();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a client's request body stopped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// The bytes are not a valid body (a malformed chunk, a connection closed mid-body).
    Malformed,
    /// Nothing arrived within the read deadline, or the body overran its total deadline.
    TimedOut,
}

/// The error a [`ClientBody`] hands to the backend request, which then fails: the client's
/// fault, never the backend's.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("client's request body is malformed: {0}")]
    Malformed(hyper::Error),
    #[error("client's request body stalled")]
    TimedOut,
}

/// A client's request body on its way to the backend, with a read deadline: when the backend
/// side wants more and the client sends nothing for `between` (or the body runs past `total`),
/// the body fails, which cancels the backend request. The fault is kept in `fault` so the
/// proxy can answer 408 or 400 instead of a 502.
#[derive(Debug)]
pub struct ClientBody {
    inner: hyper::body::Incoming,
    ended: Option<oneshot::Sender<()>>,
    fault: Arc<Mutex<Option<BodyFault>>>,
    between: Duration,
    total: Option<Instant>,
    /// Armed while the client keeps the backend side waiting; a backend that stops reading
    /// does not run the client's clock.
    timer: Option<Pin<Box<Sleep>>>,
}

impl ClientBody {
    pub fn new(
        inner: hyper::body::Incoming,
        ended: oneshot::Sender<()>,
        between: Duration,
        total: Option<Duration>,
    ) -> (Self, Arc<Mutex<Option<BodyFault>>>) {
        let fault = Arc::default();
        let mut body = Self {
            inner,
            ended: Some(ended),
            fault: Arc::clone(&fault),
            between,
            total: total.map(|total| Instant::now() + total),
            timer: None,
        };
        if body.inner.is_end_stream() {
            body.signal_end();
        }
        (body, fault)
    }

    fn signal_end(&mut self) {
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(());
        }
    }

    fn fail(&mut self, fault: BodyFault) {
        if let Ok(mut slot) = self.fault.lock() {
            slot.get_or_insert(fault);
        }
    }
}

impl Body for ClientBody {
    type Data = hyper::body::Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        // A client that always has the next bytes ready never leaves the timer armed.
        if this.total.is_some_and(|total| Instant::now() >= total) {
            this.fail(BodyFault::TimedOut);
            return Poll::Ready(Some(Err(ClientBodyError::TimedOut)));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.timer = None;
                if this.inner.is_end_stream() {
                    this.signal_end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                this.timer = None;
                this.fail(BodyFault::Malformed);
                Poll::Ready(Some(Err(ClientBodyError::Malformed(error))))
            }
            Poll::Ready(None) => {
                this.timer = None;
                this.signal_end();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let timer = this.timer.get_or_insert_with(|| {
                    let mut deadline = Instant::now() + this.between;
                    if let Some(total) = this.total {
                        deadline = deadline.min(total);
                    }
                    Box::pin(tokio::time::sleep_until(deadline))
                });
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.fail(BodyFault::TimedOut);
                        Poll::Ready(Some(Err(ClientBodyError::TimedOut)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
