//! The one error type of every call this crate makes.

use tonic::Status;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address is not a valid URI.
    #[error("invalid server address {0:?}")]
    Address(String),
    /// The idempotency key cannot be sent as metadata.
    #[error("the idempotency key must be 1 to 255 visible ASCII characters (0x21 to 0x7E)")]
    InvalidKey,
    /// The server refused the request; retrying it unchanged cannot help.
    #[error("the server refused the request: {code:?}: {message}", code = .0.code(), message = .0.message())]
    Rejected(Status),
    /// Every attempt failed transiently, or time ran out.
    #[error("gave up after {attempts} attempts: {code:?}: {message}", code = .last.code(), message = .last.message())]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last: Status,
    },
}
