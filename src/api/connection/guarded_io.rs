//! The accepted socket, closed past its connection's deadline.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep},
};
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::watch::{ConnectionLimits, Watch};

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
            watch: Watch::new(limits),
            timer: Box::pin(tokio::time::sleep_until(now + limits.idle_timeout)),
            armed: None,
        }
    }

    /// An error once the deadline has passed; otherwise arms the timer to
    /// wake the connection's task at the deadline.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let deadline = self.watch.deadline_waking(cx.waker());
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
    /// The peer's and the socket's addresses.
    pub(super) tcp: TcpConnectInfo,
    /// The connection's calls.
    pub(super) watch: Arc<Watch>,
}

impl ConnectionInfo {
    /// The peer's address, when it could be told.
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        self.tcp.remote_addr
    }
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
