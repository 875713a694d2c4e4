//! The one error type of every call this crate makes.

use tonic::Status;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address is not a valid URI.
    #[error("invalid server address {0:?}")]
    Address(String),
    /// The TLS settings cannot be used (a CA or identity that is not PEM,
    /// TLS options for an `http://` address).
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    /// The idempotency key cannot be sent as metadata.
    #[error("the idempotency key must be 1 to 255 visible ASCII characters (0x21 to 0x7E)")]
    InvalidKey,
    /// The API key cannot be sent as metadata. The message never holds
    /// the key.
    #[error(
        "the API key must be one or more visible ASCII characters (0x21 to 0x7E): the token alone, without `Bearer `"
    )]
    InvalidApiKey,
    /// The server refused the request; retrying it unchanged cannot help.
    /// `UNAUTHENTICATED` (reason [`API_KEY_INVALID`](crate::reasons::API_KEY_INVALID))
    /// means no key, or one the server does not know or revoked;
    /// `PERMISSION_DENIED` (reason [`PERMISSION_DENIED`](crate::reasons::PERMISSION_DENIED))
    /// means the key's role or scope does not allow the call.
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
