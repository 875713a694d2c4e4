//! A codec that passes bytes through, to send hand-encoded requests and see
//! responses exactly as they crossed the wire.

use bytes::{Buf, BufMut};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

/// The pass-through codec.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut bytes = vec![0; src.remaining()];
        src.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
    }
}

/// Sends already-encoded bytes to `path` on `channel` and returns the raw
/// response.
pub(crate) async fn raw_unary(
    channel: tonic::transport::Channel,
    path: &'static str,
    request: tonic::Request<Vec<u8>>,
) -> Result<tonic::Response<Vec<u8>>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
}

/// An HTTP/2 connection of its own to `addr`, ready for a request, and the
/// task that drives it (abort it to close the connection): for tests that
/// need what a gRPC client hides (frames, settings, resets).
pub(crate) async fn raw_h2(
    addr: std::net::SocketAddr,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, driver) = h2::client::handshake(socket).await.expect("h2 handshake");
    let driver = tokio::spawn(driver);
    (client.ready().await.expect("ready"), driver)
}
