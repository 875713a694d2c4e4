//! The service error and its one mapping to `tonic::Status`.

use std::{collections::HashMap, time::Duration};

use oncely_client::reasons;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    domain::{FieldViolation, TaskId},
    idempotency::IdempotencyKeyError,
    queue::{QueueError, Refusal},
    storage::StorageError,
    telemetry::chain,
};

/// The `domain` of every `ErrorInfo` oncely returns.
pub const ERROR_DOMAIN: &str = reasons::DOMAIN;

/// How long a caller is asked to wait before retrying a request whose key is
/// still in use.
pub const IN_PROGRESS_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Everything an RPC can fail with. Each variant has one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// CreateTask without `idempotency-key` metadata.
    #[error(
        "the idempotency-key request metadata is required: generate a UUID v4 before the first attempt and send it on every retry"
    )]
    KeyMissing,
    /// A malformed key.
    #[error("{0}")]
    KeyInvalid(#[from] IdempotencyKeyError),
    /// A request that breaks the field rules.
    #[error("the request is invalid: {}", summary(.0))]
    InvalidRequest(Vec<FieldViolation>),
    /// The key was used before with a different request.
    #[error(
        "this idempotency-key was already used with a different request; use a new key for a new request"
    )]
    KeyReused,
    /// Another request with the same key is still running.
    #[error(
        "a request with this idempotency-key is still in progress; retry with the same key shortly"
    )]
    InProgress,
    /// The thing asked for does not exist (or is not the caller's to see).
    #[error("{0}")]
    NotFound(String),
    /// No valid API key.
    #[error("{0}")]
    Unauthenticated(#[from] crate::auth::AuthError),
    /// The key's role or scope does not allow the call.
    #[error("{0}")]
    PermissionDenied(String),
    /// The request is larger than the server accepts (the limit, as tonic
    /// states it).
    #[error(
        "the request is larger than the server accepts ({0}); send a smaller request (parameters are limited by MAX_PARAMETERS_BYTES, the whole message by MAX_REQUEST_BYTES)"
    )]
    TooLarge(String),
    /// The caller sent more calls than its rate allows.
    #[error("too many calls from this caller; retry after {}", humantime::format_duration(*.0))]
    RateLimited(Duration),
    /// The server works on as many calls as it takes.
    #[error("the server is at capacity; retry after {}", humantime::format_duration(*.0))]
    Overloaded(Duration),
    /// This caller has as many calls open as one caller may.
    #[error("you have {0} calls open, as many as one caller may; retry after {wait} or open fewer at once (long polls count)", wait = humantime::format_duration(*.1))]
    CallerBusy(usize, Duration),
    /// The call ran past the server's request timeout.
    #[error("the call took longer than the server's request timeout of {}; retry it (with the same idempotency key, a create is safe to retry)", humantime::format_duration(*.0))]
    TimedOut(Duration),
    /// The lease shown is not the task's current one.
    #[error(
        "this lease is no longer the task's current one (it expired and the task was leased again, or the token is not the latest); stop working on the task"
    )]
    LeaseLost,
    /// The task has ended; it cannot be changed.
    #[error("the task has already finished (succeeded or failed); it cannot change any more")]
    TaskFinished,
    /// The task was cancelled.
    #[error("the task was cancelled; stop working on it")]
    TaskCancelled,
    /// The database cannot be reached or is failing. The call may still
    /// have taken effect (a commit the database made but could not confirm,
    /// as when a failover cuts a commit that waits for its standby), so the
    /// answer says the outcome is unknown, never that nothing happened.
    #[error(
        "the service is temporarily unavailable, and whether this call took effect is unknown; retry shortly with the same idempotency-key (a CreateTask that did take effect is then answered as a replay)"
    )]
    Unavailable(#[source] StorageError),
    /// A bug or corrupt data.
    #[error("internal error")]
    Internal(#[source] StorageError),
}

/// The gRPC code's name, as the gRPC status codes document spells it
/// (`NOT_FOUND`), for the HTTP problems and MCP's tool errors.
pub fn code_name(code: Code) -> String {
    format!("{code:?}")
        .chars()
        .enumerate()
        .flat_map(|(i, c)| {
            let split = i > 0 && c.is_ascii_uppercase();
            split.then_some('_').into_iter().chain(c.to_uppercase())
        })
        .collect()
}

fn summary(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ServiceError {
    /// The outcome recorded in the RPC's span.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::KeyMissing | Self::KeyInvalid(_) | Self::InvalidRequest(_) => "invalid",
            Self::KeyReused => "mismatch",
            Self::InProgress => "in_progress",
            Self::NotFound(_) => "not_found",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::PermissionDenied(_) => "permission_denied",
            Self::TooLarge(_) => "too_large",
            Self::RateLimited(_) => "rate_limited",
            Self::Overloaded(_) => "overloaded",
            Self::CallerBusy(..) => "caller_busy",
            Self::TimedOut(_) => "timed_out",
            Self::LeaseLost => "lease_lost",
            Self::TaskFinished => "finished",
            Self::TaskCancelled => "cancelled",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<StorageError> for ServiceError {
    fn from(error: StorageError) -> Self {
        match error {
            // Only a claim's lock wait means "a request with this key is in
            // flight"; idempotency::create_task maps that one itself.
            StorageError::LockTimeout(_)
            | StorageError::LockWait(_)
            | StorageError::WriterBusy(_)
            | StorageError::WriteLocked(_)
            | StorageError::ReadOnly
            | StorageError::Unavailable(_) => Self::Unavailable(error),
            StorageError::Internal(_) | StorageError::Corrupt(_) | StorageError::Config(_) => {
                Self::Internal(error)
            }
        }
    }
}

impl ServiceError {
    /// A lifecycle call on `task_id` that failed.
    pub fn from_queue(error: QueueError, task_id: TaskId) -> Self {
        match error {
            QueueError::Refused(Refusal::NotFound) => {
                Self::NotFound(format!("no task has id {task_id}"))
            }
            QueueError::Refused(Refusal::LeaseLost) => Self::LeaseLost,
            QueueError::Refused(Refusal::Finished) => Self::TaskFinished,
            QueueError::Refused(Refusal::Cancelled) => Self::TaskCancelled,
            QueueError::Storage(error) => error.into(),
        }
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        let message = error.to_string();
        let info = |reason: &str| {
            ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::<String, String>::new())
        };
        match error {
            ServiceError::KeyMissing => Status::with_error_details(
                Code::InvalidArgument,
                message,
                info("IDEMPOTENCY_KEY_MISSING"),
            ),
            ServiceError::KeyInvalid(_) => {
                let mut details = info("IDEMPOTENCY_KEY_INVALID");
                details.add_bad_request_violation("idempotency-key", message.clone());
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            ServiceError::InvalidRequest(violations) => {
                let mut details = info("INVALID_REQUEST");
                for v in violations {
                    details.add_bad_request_violation(v.field, v.description);
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            ServiceError::KeyReused => Status::with_error_details(
                Code::FailedPrecondition,
                message,
                info("IDEMPOTENCY_KEY_REUSED"),
            ),
            ServiceError::InProgress => {
                let mut details = info("IDEMPOTENCY_REQUEST_IN_PROGRESS");
                details.set_retry_info(Some(IN_PROGRESS_RETRY_DELAY));
                Status::with_error_details(Code::Aborted, message, details)
            }
            ServiceError::NotFound(_) => Status::not_found(message),
            ServiceError::Unauthenticated(_) => {
                Status::with_error_details(Code::Unauthenticated, message, info("API_KEY_INVALID"))
            }
            ServiceError::PermissionDenied(_) => Status::with_error_details(
                Code::PermissionDenied,
                message,
                info("PERMISSION_DENIED"),
            ),
            ServiceError::TooLarge(_) => Status::with_error_details(
                Code::ResourceExhausted,
                message,
                info(reasons::REQUEST_TOO_LARGE),
            ),
            ServiceError::RateLimited(wait) => {
                let mut details = info("RATE_LIMITED");
                details.set_retry_info(Some(wait));
                Status::with_error_details(Code::ResourceExhausted, message, details)
            }
            ServiceError::Overloaded(wait) => {
                let mut details = info("OVERLOADED");
                details.set_retry_info(Some(wait));
                Status::with_error_details(Code::ResourceExhausted, message, details)
            }
            ServiceError::TimedOut(_) => Status::deadline_exceeded(message),
            ServiceError::CallerBusy(_, wait) => {
                let mut details = info("CALLER_BUSY");
                details.set_retry_info(Some(wait));
                Status::with_error_details(Code::ResourceExhausted, message, details)
            }
            ServiceError::LeaseLost => Status::with_error_details(
                Code::FailedPrecondition,
                message,
                info(reasons::LEASE_LOST),
            ),
            ServiceError::TaskFinished => Status::with_error_details(
                Code::FailedPrecondition,
                message,
                info(reasons::TASK_FINISHED),
            ),
            ServiceError::TaskCancelled => Status::with_error_details(
                Code::FailedPrecondition,
                message,
                info(reasons::TASK_CANCELLED),
            ),
            ServiceError::Unavailable(source) => {
                tracing::warn!(error = %chain(&source), "database unavailable");
                let mut details = info("DATABASE_UNAVAILABLE");
                details.set_retry_info(Some(IN_PROGRESS_RETRY_DELAY));
                Status::with_error_details(Code::Unavailable, message, details)
            }
            ServiceError::Internal(source) => {
                tracing::error!(error = %chain(&source), "internal error");
                Status::internal(message)
            }
        }
    }
}
