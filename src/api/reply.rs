//! How every RPC ends, in one place: its outcome recorded in its span and
//! logged once, its error mapped to a `Status`, and the response metadata of
//! the idempotency contract (`idempotent-replayed`,
//! `idempotency-key-source`) attached.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use tonic::{Response, Status, body::Body, metadata::MetadataValue};

use super::{ServiceError, rpc::Rpc};
use crate::{idempotency::KeySource, metrics::metrics};
use oncely_client::metadata::{IDEMPOTENCY_KEY_SOURCE, IDEMPOTENT_REPLAYED};

/// A successful answer and what it was.
#[derive(Debug)]
pub(super) enum Success<T> {
    /// CreateTask created the task.
    Created(T),
    /// CreateTask answered with the first request's stored response: what
    /// the service read of it (the task's id, for the logs), and the bytes
    /// as stored, which are what is sent.
    Replayed(T, Vec<u8>),
    /// Any other RPC succeeded.
    Ok(T),
}

/// The encoded size of an answer, in the response's extensions, so that
/// the rate layer can count the bytes it holds until they are sent.
#[derive(Debug, Clone, Copy)]
pub(super) struct AnswerSize(pub(super) usize);

/// A replay's response exactly as stored, in the response's extensions:
/// the idempotency key gate sends these bytes as the message, in place of what tonic
/// encoded (the message as this build reads it), so that a replay is byte for byte the first
/// response even when another build wrote it with fields this one does not
/// know.
#[derive(Debug, Clone)]
pub(super) struct StoredReply(Bytes);

/// Sends the response's [`StoredReply`], if it has one, as its message:
/// one uncompressed gRPC frame, then the OK status in the trailers.
pub(super) fn send_stored(mut response: http::Response<Body>) -> http::Response<Body> {
    let Some(StoredReply(message)) = response.extensions_mut().remove::<StoredReply>() else {
        return response;
    };
    let (parts, _encoded) = response.into_parts();
    http::Response::from_parts(parts, Body::new(StoredBody::new(&message)))
}

/// The body of a stored reply: one data frame, then the trailers.
#[derive(Debug)]
struct StoredBody {
    frame: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl StoredBody {
    fn new(message: &[u8]) -> Self {
        // The gRPC length prefix: not compressed, then the length, big-endian.
        // A stored response is far below 4 GiB (the request limit bounds it).
        let length = u32::try_from(message.len()).unwrap_or(u32::MAX);
        let mut frame = Vec::with_capacity(5 + message.len());
        frame.push(0);
        frame.extend_from_slice(&length.to_be_bytes());
        frame.extend_from_slice(message);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        Self {
            frame: Some(frame.into()),
            trailers: Some(trailers),
        }
    }
}

impl http_body::Body for StoredBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        let next = match self.frame.take() {
            Some(data) => Some(http_body::Frame::data(data)),
            None => self.trailers.take().map(http_body::Frame::trailers),
        };
        Poll::Ready(next.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.frame.is_none() && self.trailers.is_none()
    }
}

/// Ends an RPC inside its span: records `outcome`, logs one line, maps the
/// error. `source` is set for CreateTask, whose answers (errors included)
/// say which rule deduplicated the request.
pub(super) fn finish<T: prost::Message>(
    result: Result<Success<T>, ServiceError>,
    source: Option<KeySource<'_>>,
) -> Result<Response<T>, Status> {
    let span = tracing::Span::current();
    match result {
        Ok(done) => {
            let (message, stored, outcome, replayed) = match done {
                Success::Created(message) => (message, None, "created", Some("false")),
                // The idempotency key gate, under which every service runs,
                // drops the message's encoding unread and sends the stored
                // bytes.
                Success::Replayed(message, stored) => {
                    (message, Some(stored), "replayed", Some("true"))
                }
                Success::Ok(message) => (message, None, "ok", None),
            };
            span.record("outcome", outcome);
            if let Some(source) = source {
                metrics().count_create(outcome, source.as_str());
            }
            tracing::info!("done");
            let size = AnswerSize(stored.as_ref().map_or(message.encoded_len(), Vec::len));
            let mut response = Response::new(message);
            response.extensions_mut().insert(size);
            if let Some(stored) = stored {
                response.extensions_mut().insert(StoredReply(stored.into()));
            }
            let metadata = response.metadata_mut();
            if let Some(replayed) = replayed {
                metadata.insert(IDEMPOTENT_REPLAYED, MetadataValue::from_static(replayed));
            }
            if let Some(source) = source {
                metadata.insert(
                    IDEMPOTENCY_KEY_SOURCE,
                    MetadataValue::from_static(source.as_str()),
                );
            }
            Ok(response)
        }
        Err(error) => {
            span.record("outcome", error.outcome());
            if let Some(source) = source {
                metrics().count_create(error.outcome(), source.as_str());
            }
            tracing::info!(error = %error, "failed");
            Err(status(error, source.map(|s| s.as_str())))
        }
    }
}

/// Refuses a request before it reaches its service (in a gate, outside
/// any RPC span): logs one line and maps the error. `source` names
/// the rule that applied, if any did.
pub(super) fn refuse(rpc: &Rpc, error: ServiceError, source: Option<&'static str>) -> Status {
    tracing::info!(
        rpc.method = rpc.path(),
        outcome = error.outcome(),
        error = %error,
        "request refused"
    );
    status(error, source)
}

fn status(error: ServiceError, source: Option<&'static str>) -> Status {
    let mut status = Status::from(error);
    if let Some(source) = source {
        status
            .metadata_mut()
            .insert(IDEMPOTENCY_KEY_SOURCE, MetadataValue::from_static(source));
    }
    status
}
