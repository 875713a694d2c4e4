//! Bounded time per connection, so that what a connection holds is bounded.
//!
//! HTTP/2 keepalive finds peers that vanished, but not peers that stay and
//! do nothing useful: a connection that never sends a request (or sends its
//! preface a byte at a time), a request whose body never finishes arriving,
//! an answer the peer never reads (its flow-control window stays shut, so
//! the answer sits in the server's memory). [`GuardedIo`] wraps each
//! accepted socket and [`ConnectionLayer`] tells it which calls are open on
//! it; the socket is closed when
//!
//! - no call has been open on it for the idle timeout (counted from the
//!   accept, so a connection that never starts a call is closed too), or
//! - a call has been open longer than the call limit (the request timeout
//!   plus time to send the answer), whatever it is waiting for.
//!
//! Closing the socket drops every stream on it and the memory they held.
//! Health `Watch` streams are endless by design: they keep a connection
//! from being idle and have a limit of their own (an hour by default), after
//! which the client opens a new connection and watches again.

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep},
};
use tonic::{
    body::Body,
    transport::server::{Connected, TcpConnectInfo, TlsConnectInfo},
};
use tower::{Layer, Service};

use super::{ServiceError, reply};

/// How long connections and calls may last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// How long a connection may stay open without a call.
    pub idle_timeout: Duration,
    /// How long a call may stay open, answer sent included.
    pub call_limit: Duration,
    /// How long an endless stream (health `Watch`) may stay open.
    pub stream_limit: Duration,
}

/// The calls open on one connection.
#[derive(Debug)]
struct Calls {
    /// Each open call's deadline, by the order it started; endless
    /// streams' deadlines are later than the order says.
    open: BTreeMap<u64, Instant>,
    next: u64,
    /// When the last call ended (or the connection was accepted).
    idle_since: Instant,
    /// The connection's task, to wake when a deadline moves earlier.
    waker: Option<Waker>,
}

/// What [`GuardedIo`] and [`ConnectionLayer`] share about one connection.
#[derive(Debug)]
pub(super) struct Watch {
    limits: ConnectionLimits,
    calls: Mutex<Calls>,
}

impl Watch {
    fn calls(&self) -> MutexGuard<'_, Calls> {
        // The lock guards plain bookkeeping that no panic leaves half-done.
        self.calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// When the connection must be closed, if nothing changes.
    fn deadline(calls: &Calls, limits: ConnectionLimits) -> Instant {
        match calls.open.values().min() {
            Some(first) => *first,
            None => calls.idle_since + limits.idle_timeout,
        }
    }

    /// Registers a call; it stays open until the returned guard drops.
    fn open(self: &Arc<Self>, endless: bool) -> CallGuard {
        let mut calls = self.calls();
        let before = Self::deadline(&calls, self.limits);
        let id = calls.next;
        calls.next += 1;
        let limit = if endless {
            self.limits.stream_limit
        } else {
            self.limits.call_limit
        };
        calls.open.insert(id, Instant::now() + limit);
        if Self::deadline(&calls, self.limits) < before
            && let Some(waker) = calls.waker.take()
        {
            waker.wake();
        }
        CallGuard {
            watch: Arc::clone(self),
            id,
        }
    }
}

/// Keeps a call registered on its connection while it lives.
#[derive(Debug)]
struct CallGuard {
    watch: Arc<Watch>,
    id: u64,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut calls = self.watch.calls();
        calls.open.remove(&self.id);
        if calls.open.is_empty() {
            calls.idle_since = Instant::now();
            if let Some(waker) = calls.waker.take() {
                waker.wake();
            }
        }
    }
}

/// An accepted socket that closes itself past its connection's deadline.
#[derive(Debug)]
pub struct GuardedIo {
    io: TcpStream,
    watch: Arc<Watch>,
    timer: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

impl GuardedIo {
    /// Wraps a socket just accepted.
    pub fn new(io: TcpStream, limits: ConnectionLimits) -> Self {
        let now = Instant::now();
        Self {
            io,
            watch: Arc::new(Watch {
                limits,
                calls: Mutex::new(Calls {
                    open: BTreeMap::new(),
                    next: 0,
                    idle_since: now,
                    waker: None,
                }),
            }),
            timer: Box::pin(tokio::time::sleep_until(now + limits.idle_timeout)),
            armed: None,
        }
    }

    /// An error once the deadline has passed; otherwise arms the timer to
    /// wake the connection's task at the deadline.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let deadline = {
            let mut calls = self.watch.calls();
            calls.waker = Some(cx.waker().clone());
            Watch::deadline(&calls, self.watch.limits)
        };
        if Instant::now() >= deadline {
            tracing::debug!("closing a connection past its idle timeout or call limit");
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle or call open too long",
            ));
        }
        if self.armed != Some(deadline) {
            self.timer.as_mut().reset(deadline);
            self.armed = Some(deadline);
        }
        // Registers the waker; the deadline is checked above.
        let _ = self.timer.as_mut().poll(cx);
        Ok(())
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// What each request on a guarded connection carries in its extensions.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    tcp: TcpConnectInfo,
    watch: Arc<Watch>,
}

impl Connected for GuardedIo {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnectionInfo {
            tcp: self.io.connect_info(),
            watch: Arc::clone(&self.watch),
        }
    }
}

/// Registers each call with its connection's [`Watch`] until its answer
/// has been sent (or abandoned), gives the call the plain
/// [`TcpConnectInfo`] the layers after it read the peer from, and answers
/// `DEADLINE_EXCEEDED` for a call that runs past the request timeout.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLayer {
    request_timeout: Duration,
}

impl ConnectionLayer {
    /// Calls are cut after `request_timeout`.
    pub fn new(request_timeout: Duration) -> Self {
        Self { request_timeout }
    }
}

impl<S> Layer<S> for ConnectionLayer {
    type Service = TrackCalls<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TrackCalls {
            inner,
            request_timeout: self.request_timeout,
        }
    }
}

/// See [`ConnectionLayer`].
#[derive(Debug, Clone)]
pub struct TrackCalls<S> {
    inner: S,
    request_timeout: Duration,
}

/// The address of the peer that sent `request`, from the
/// [`TcpConnectInfo`] that [`ConnectionLayer`] gives each call.
pub(super) fn peer_ip<B>(request: &http::Request<B>) -> Option<std::net::IpAddr> {
    request
        .extensions()
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .map(|addr| addr.ip())
}

/// Whether a call on `path` is an endless stream by design.
fn endless(path: &str) -> bool {
    path == "/grpc.health.v1.Health/Watch"
}

impl<S, B> Service<http::Request<B>> for TrackCalls<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let extensions = request.extensions();
        let info = extensions.get::<ConnectionInfo>().cloned().or_else(|| {
            extensions
                .get::<TlsConnectInfo<ConnectionInfo>>()
                .map(|tls| tls.get_ref().clone())
        });
        let path = request.uri().path().to_owned();
        let guard = info.map(|info| {
            request.extensions_mut().insert(info.tcp);
            info.watch.open(endless(&path))
        });
        let answer = self.inner.call(request);
        let timeout = self.request_timeout;
        Box::pin(async move {
            let Ok(response) = tokio::time::timeout(timeout, answer).await else {
                return Ok(reply::refuse(&path, ServiceError::TimedOut(timeout), None).into_http());
            };
            let response = response?;
            Ok(match guard {
                Some(guard) => hold_until_sent(response, guard),
                None => response,
            })
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            idle_timeout: Duration::from_secs(60),
            call_limit: Duration::from_secs(10),
            stream_limit: Duration::from_secs(3600),
        }
    }

    fn watch() -> Arc<Watch> {
        Arc::new(Watch {
            limits: limits(),
            calls: Mutex::new(Calls {
                open: BTreeMap::new(),
                next: 0,
                idle_since: Instant::now(),
                waker: None,
            }),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_follows_the_oldest_open_call_then_idleness() {
        let watch = watch();
        let start = Instant::now();
        let deadline = || Watch::deadline(&watch.calls(), watch.limits);
        assert_eq!(deadline(), start + limits().idle_timeout);

        let first = watch.open(false);
        tokio::time::advance(Duration::from_secs(1)).await;
        let second = watch.open(false);
        assert_eq!(deadline(), start + limits().call_limit);
        drop(first);
        assert_eq!(
            deadline(),
            start + Duration::from_secs(1) + limits().call_limit
        );
        drop(second);
        assert_eq!(
            deadline(),
            start + Duration::from_secs(1) + limits().idle_timeout
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_endless_stream_has_a_limit_of_its_own() {
        let watch = watch();
        let start = Instant::now();
        let stream = watch.open(true);
        assert_eq!(
            Watch::deadline(&watch.calls(), watch.limits),
            start + limits().stream_limit
        );
        let call = watch.open(false);
        assert_eq!(
            Watch::deadline(&watch.calls(), watch.limits),
            start + limits().call_limit
        );
        drop(call);
        drop(stream);
    }
}
