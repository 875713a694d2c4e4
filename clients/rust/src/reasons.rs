//! The `ErrorInfo` reasons of the worker calls' refusals (all with code
//! `FAILED_PRECONDITION`), as the server sends them in the status details;
//! read them with `tonic_types::StatusExt::get_details_error_info`.

/// The lease's token is no longer the task's current one: the lease ran out
/// and the task went to another worker, or this worker already reported it.
pub const LEASE_LOST: &str = "LEASE_LOST";

/// The task was cancelled: stop working on it.
pub const TASK_CANCELLED: &str = "TASK_CANCELLED";

/// The task is already finished (SUCCEEDED or FAILED).
pub const TASK_FINISHED: &str = "TASK_FINISHED";
