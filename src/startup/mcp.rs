//! The MCP listener on `MCP_ADDR`: `/mcp` served by axum over the same
//! guarded sockets and TLS as the gRPC port, so the same connection limits
//! hold, and each tool call counts on its connection.

use std::{net::SocketAddr, pin::Pin, sync::Arc};

use axum::serve::{IncomingStream, Listener};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_rustls::rustls::ServerConfig;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use super::{StartupError, tls::ServedIo, transport};
use crate::{api::ConnectionInfo, config::Settings};

/// Binds `addr` for MCP.
pub(super) async fn bind(addr: SocketAddr) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind { addr, source })
}

/// The MCP listener being served, and how to stop it.
#[derive(Debug)]
pub(super) struct Serving {
    /// Cancelled when shutdown starts: no new connection is taken, and the
    /// requests in flight are finished.
    pub(super) stop_accepting: CancellationToken,
    /// Completes when the listener has stopped.
    pub(super) stopped: tokio::sync::oneshot::Receiver<()>,
}

/// Serves `app` on `listener` in `background` until `stop_accepting` is
/// cancelled and its connections have closed.
pub(super) fn start(
    listener: TcpListener,
    app: axum::Router,
    settings: &Settings,
    tls: Option<Arc<ServerConfig>>,
    background: &mut JoinSet<()>,
) -> Serving {
    let stop_accepting = CancellationToken::new();
    let (done, stopped) = tokio::sync::oneshot::channel();
    let local = listener.local_addr().ok();
    if let Some(addr) = local {
        tracing::info!(%addr, tls = tls.is_some(), "serving MCP (streamable HTTP) at {}", crate::mcp::MCP_PATH);
    }
    let incoming = McpListener {
        incoming: transport::incoming(listener, settings.connection, tls),
        local,
    };
    let service = app.into_make_service_with_connect_info::<ConnectionInfo>();
    let shutdown = stop_accepting.clone();
    background.spawn(async move {
        let served = axum::serve(incoming, service)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the MCP listener stopped");
        }
        let _ = done.send(());
    });
    Serving {
        stop_accepting,
        stopped,
    }
}

/// The guarded (and TLS) connections of the MCP listener, for axum.
struct McpListener {
    incoming: Pin<Box<dyn Stream<Item = std::io::Result<ServedIo>> + Send>>,
    local: Option<SocketAddr>,
}

impl Listener for McpListener {
    type Io = ServedIo;
    type Addr = Option<SocketAddr>;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(io)) => {
                    let peer = io.connect_info().peer();
                    return (io, peer);
                }
                // A socket that failed to open (or its handshake) is left out.
                Some(Err(error)) => tracing::debug!(%error, "an MCP connection failed to open"),
                // The accept loop never ends by itself.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, McpListener>> for ConnectionInfo {
    fn connect_info(stream: IncomingStream<'_, McpListener>) -> Self {
        stream.io().connect_info()
    }
}
