//! A body wrapper for proxied HTTP: it says when the body has been read to its end, and it
//! holds something (a backend's connection slot) for as long as the body is alive.

use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::oneshot;

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
