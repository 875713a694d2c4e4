//! A request larger than the server accepts answers `RESOURCE_EXHAUSTED`
//! (reason `REQUEST_TOO_LARGE`), as gRPC convention has it, rather than the
//! `OUT_OF_RANGE` tonic's framing gives. tonic refuses the message from its
//! length prefix, before reading the body, which is what keeps memory
//! bounded; this gate only rewrites the answer.

use std::future::Future;

use tonic::{Code, Status, body::Body};

use super::{ServiceError, gate::Gate, reply, rpc::Rpc};

/// The start of tonic's message for a length prefix past the limit.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// Turns tonic's `OUT_OF_RANGE` for an oversized request into
/// `RESOURCE_EXHAUSTED`, with the limit in the message.
#[derive(Debug, Clone, Copy, Default)]
pub struct RewriteOversize;

impl Gate for RewriteOversize {
    type Pass = ();

    fn check<B>(&self, _rpc: &Rpc, _request: &mut http::Request<B>) -> Result<(), Status> {
        Ok(())
    }

    async fn answer<E, F>(rpc: Rpc, (): (), answer: F) -> Result<http::Response<Body>, E>
    where
        E: Send + 'static,
        F: Future<Output = Result<http::Response<Body>, E>> + Send + 'static,
    {
        Ok(rewrite(&rpc, answer.await?))
    }
}

fn rewrite(rpc: &Rpc, response: http::Response<Body>) -> http::Response<Body> {
    // An error before any message is a trailers-only answer: the status is
    // in the headers.
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    if status.code() != Code::OutOfRange || !status.message().starts_with(TONIC_TOO_LARGE) {
        return response;
    }
    let limit = status
        .message()
        .rsplit_once("the limit is: ")
        .map_or("the server's limit", |(_, limit)| limit);
    reply::refuse(rpc, ServiceError::TooLarge(limit.to_owned()), None).into_http()
}
