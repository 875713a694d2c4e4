//! The `ErrorInfo` domain and reasons oncely sends in its status details
//! (read them with `tonic_types::StatusExt::get_details_error_info`): those
//! of the worker calls' refusals (all `FAILED_PRECONDITION`), those of API
//! keys, and those of requests the server cannot take at all.

/// The lease's token is no longer the task's current one: the lease ran out
/// and the task went to another worker, or this worker already reported it.
pub const LEASE_LOST: &str = "LEASE_LOST";

/// The task was cancelled: stop working on it.
pub const TASK_CANCELLED: &str = "TASK_CANCELLED";

/// The task is already finished (SUCCEEDED or FAILED).
pub const TASK_FINISHED: &str = "TASK_FINISHED";

/// The `domain` of every `ErrorInfo` oncely sends.
pub const DOMAIN: &str = "oncely";

/// The request's bytes are not a valid message of the method's type
/// (`INVALID_ARGUMENT`).
pub const UNDECODABLE_REQUEST: &str = "UNDECODABLE_REQUEST";

/// The request is larger than the server accepts (`RESOURCE_EXHAUSTED`).
pub const REQUEST_TOO_LARGE: &str = "REQUEST_TOO_LARGE";

/// The call carried no API key, or one the server does not know or that
/// was revoked (`UNAUTHENTICATED`). Never retried: fix the key.
pub const API_KEY_INVALID: &str = "API_KEY_INVALID";

/// The API key is valid but its role may not call this service, or its
/// scope does not cover the request's agent id or action
/// (`PERMISSION_DENIED`). Never retried.
pub const PERMISSION_DENIED: &str = "PERMISSION_DENIED";
