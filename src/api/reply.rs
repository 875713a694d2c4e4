//! How every RPC ends, in one place: its outcome recorded in its span and
//! logged once, its error mapped to a `Status`, and the response metadata of
//! the idempotency contract (`idempotent-replayed`,
//! `idempotency-key-source`) attached.

use tonic::{Response, Status, metadata::MetadataValue};

use super::ServiceError;
use crate::idempotency::KeySource;
use oncely_client::metadata::{IDEMPOTENCY_KEY_SOURCE, IDEMPOTENT_REPLAYED};

/// A successful answer and what it was.
#[derive(Debug)]
pub(super) enum Done<T> {
    /// CreateTask created the task.
    Created(T),
    /// CreateTask answered with the first request's stored response.
    Replayed(T),
    /// Any other RPC succeeded.
    Ok(T),
}

/// The encoded size of an answer, in the response's extensions, so that
/// the rate layer can count the bytes it holds until they are sent.
#[derive(Debug, Clone, Copy)]
pub(super) struct AnswerSize(pub(super) usize);

/// Ends an RPC inside its span: records `outcome`, logs one line, maps the
/// error. `source` is set for CreateTask, whose answers (errors included)
/// say which rule deduplicated the request.
pub(super) fn finish<T: prost::Message>(
    result: Result<Done<T>, ServiceError>,
    source: Option<KeySource<'_>>,
) -> Result<Response<T>, Status> {
    let span = tracing::Span::current();
    match result {
        Ok(done) => {
            let (message, outcome, replayed) = match done {
                Done::Created(message) => (message, "created", Some("false")),
                Done::Replayed(message) => (message, "replayed", Some("true")),
                Done::Ok(message) => (message, "ok", None),
            };
            span.record("outcome", outcome);
            tracing::info!("done");
            let size = AnswerSize(message.encoded_len());
            let mut response = Response::new(message);
            response.extensions_mut().insert(size);
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
            tracing::info!(error = %error, "failed");
            Err(status(error, source.map(|s| s.as_str())))
        }
    }
}

/// Refuses a request before it reaches its service (in the key layer,
/// outside any RPC span): logs one line and maps the error. `source` names
/// the rule that applied, if any did.
pub(super) fn refuse(method: &str, error: ServiceError, source: Option<&'static str>) -> Status {
    tracing::info!(
        rpc.method = method,
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
