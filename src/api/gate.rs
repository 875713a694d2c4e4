//! The one tower service of the stack: [`Gated`] runs a
//! [`Gate`] around the service under it. A gate's `check` runs when the
//! call arrives, before the service (outside the call's span, as tonic
//! enters it only when the answer is polled), and may refuse the call: the
//! refusal is answered at once and the service never sees it (API keys,
//! idempotency keys, rate limits). Its `answer` runs around the service's
//! answer: to count it, bound its time, rewrite it, or hold what the call
//! took until the answer has been sent. Gates that only watch (metrics,
//! connections, oversize) never refuse.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::{Status, body::Body};
use tower::Service;

use super::rpc::Rpc;

/// One step every call passes through; see the module.
pub trait Gate: Clone + Send + Sync + 'static {
    /// What a call that passes takes from `check` to `answer` (a place,
    /// a permit, a timer): given back when it is dropped.
    type Pass: Send + 'static;

    /// Lets the call pass, noting in its extensions what the layers under
    /// this one read, or refuses it with the status to answer.
    fn check<B>(&self, rpc: &Rpc, request: &mut http::Request<B>) -> Result<Self::Pass, Status>;

    /// The answer to a call that passed: by default the service's, with
    /// `pass` kept until it is made.
    fn answer<E, F>(
        rpc: Rpc,
        pass: Self::Pass,
        answer: F,
    ) -> impl Future<Output = Result<http::Response<Body>, E>> + Send + 'static
    where
        E: Send + 'static,
        F: Future<Output = Result<http::Response<Body>, E>> + Send + 'static,
    {
        let _ = rpc;
        async move {
            let response = answer.await;
            drop(pass);
            response
        }
    }
}

/// A service behind a [`Gate`].
#[derive(Debug, Clone)]
pub struct Gated<S, G> {
    inner: S,
    gate: G,
}

impl<S, G> Gated<S, G> {
    /// `inner` behind `gate`.
    pub fn new(inner: S, gate: G) -> Self {
        Self { inner, gate }
    }
}

impl<S, G, B> Service<http::Request<B>> for Gated<S, G>
where
    G: Gate,
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let rpc = Rpc::of(&mut request);
        match self.gate.check(&rpc, &mut request) {
            Ok(pass) => Box::pin(G::answer(rpc, pass, self.inner.call(request))),
            Err(refusal) => Box::pin(std::future::ready(Ok(refusal.into_http()))),
        }
    }
}

/// `response`, holding `held` until its body has been sent or dropped.
pub(super) fn hold_until_sent<T: Send + 'static>(
    response: http::Response<Body>,
    held: T,
) -> http::Response<Body> {
    response.map(|inner| Body::new(Holding { inner, _held: held }))
}

/// A body that keeps something alive as long as it lives.
struct Holding<T> {
    inner: Body,
    _held: T,
}

// `_held` is never pinned: nothing reaches it through a `Pin`.
impl<T> Unpin for Holding<T> {}

impl<T: Send + 'static> http_body::Body for Holding<T> {
    type Data = <Body as http_body::Body>::Data;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
