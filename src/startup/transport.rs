//! The transport: the tonic server's bounds on what a connection may hold,
//! its TLS, the accepted sockets, and reflection.

use std::{pin::Pin, sync::Arc};

use tokio::net::TcpListener;
use tokio_rustls::rustls::ServerConfig;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Server, server::TcpIncoming};

use super::tls::{self, ServedIo};
use crate::{
    api::{ConnectionLimits, GuardedIo},
    proto::FILE_DESCRIPTOR_SET,
};

/// The most calls one connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// The largest header block (metadata) a call may send, in bytes.
const MAX_HEADER_BYTES: u32 = 16 * 1024;
/// How long a connection may be silent before the kernel probes whether its
/// peer is still there.
const TCP_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(60);

/// The server builder with the bounds on what a connection may hold and
/// each call's span (TLS is [`incoming`]'s).
pub(super) fn builder() -> Server {
    // Dead peers are found by keepalive pings; streams, headers and calls
    // are bounded.
    Server::builder()
        // The JSON API is served over HTTP/1.1 too (curl, fetch).
        .accept_http1(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // A client may give up on every call it has open at once (a batch
        // of calls cancelled together, all reset before the server took
        // them); h2's default of 20 closed such a connection with
        // ENHANCE_YOUR_CALM. A flood past what a connection may have open
        // still is.
        .http2_max_pending_accept_reset_streams(Some(MAX_STREAMS_PER_CONNECTION as usize))
        .http2_max_header_list_size(Some(MAX_HEADER_BYTES))
        // Each call's span: request id, method, trace context.
        .trace_fn(|request| {
            let (service, method) = crate::api::json::rpc_names(request)
                .unwrap_or_else(|| crate::api::asked(request.uri().path()));
            crate::telemetry::request_span(request, service, method)
        })
}

/// The connections `listener` accepts, over TLS when `tls` is given:
/// every socket answers without Nagle's delay (a small answer would
/// otherwise wait for the peer's delayed ACK), has the kernel probe a
/// silent peer, and is closed when idle or holding a call too long.
pub(super) fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    tls: Option<Arc<ServerConfig>>,
) -> Pin<Box<dyn Stream<Item = std::io::Result<ServedIo>> + Send>> {
    let plain = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE))
        .map(move |accepted| accepted.map(|io| GuardedIo::new(io, limits)));
    match tls {
        None => Box::pin(plain.map(|accepted| accepted.map(ServedIo::Plain))),
        Some(config) => Box::pin(tls::accept(plain, config)),
    }
}

/// Reflection over our protos, the health protocol, and the `google.rpc`
/// error details, so grpcurl can describe services and decode `ErrorInfo`.
pub(super) fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}
