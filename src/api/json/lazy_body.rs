//! A request body made only when the service first reads it.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use tonic::Status;

/// What makes a [`LazyBody`]'s one frame.
type MakeFrame = Pin<Box<dyn Future<Output = Result<Bytes, Status>> + Send>>;

/// A body made when it is first read: one frame from `make`, or its error.
pub(super) struct LazyBody {
    make: Option<MakeFrame>,
}

impl LazyBody {
    pub(super) fn new(make: impl Future<Output = Result<Bytes, Status>> + Send + 'static) -> Self {
        Self {
            make: Some(Box::pin(make)),
        }
    }
}

impl http_body::Body for LazyBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let Some(make) = self.make.as_mut() else {
            return Poll::Ready(None);
        };
        let made = std::task::ready!(make.as_mut().poll(cx));
        self.make = None;
        Poll::Ready(Some(made.map(http_body::Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.make.is_none()
    }
}

impl std::fmt::Debug for LazyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyBody")
            .field("made", &self.make.is_none())
            .finish()
    }
}
