//! The task lifecycle after creation: workers lease tasks, renew, complete
//! and fail them; agents wait for them and cancel them. This layer decides
//! (what a failure comes to, what a refused change means) and the storage
//! layer writes each change in one statement fenced by the lease; it waits
//! without polling in a hot loop.
//!
//! - [`lease`]: LeaseTasks, with long polling.
//! - [`retry`]: what a failed attempt comes to (the retry policy).
//! - [`settle`]: RenewLease, CompleteTask, FailTask, CancelTask, and why a
//!   change was refused.
//! - [`wait`]: WaitTask, until a task is finished.

pub mod lease;
pub mod retry;
pub mod settle;
pub mod wait;

use std::time::Duration;

use crate::storage::StorageError;

pub use lease::lease_tasks;
pub use settle::{cancel_task, complete_task, fail_task, renew_lease};
pub use wait::wait_task;

/// How the queue treats tasks; from configuration.
#[derive(Debug, Clone, Copy)]
pub struct QueuePolicy {
    /// The lease a worker gets when it does not ask for a duration.
    pub default_lease: Duration,
    /// The most leases a task may have before it ends FAILED.
    pub max_attempts: i32,
    /// The backoff ceiling after a first failed attempt; it doubles with
    /// each attempt, and the delay is random up to it (full jitter).
    pub backoff_base: Duration,
    /// The largest backoff ceiling.
    pub backoff_max: Duration,
    /// How often a long poll or WaitTask re-reads the database without a
    /// wake-up: to notice backoffs and leases that ran out, and in case a
    /// wake-up was lost. One second; tests lengthen it to prove that the
    /// wake-ups work on their own.
    pub recheck: Duration,
    /// The server's request timeout: long polls answer before it.
    pub request_timeout: Duration,
}

impl Default for QueuePolicy {
    fn default() -> Self {
        Self {
            default_lease: Duration::from_secs(30),
            max_attempts: 5,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(600),
            recheck: Duration::from_secs(1),
            request_timeout: Duration::from_secs(90),
        }
    }
}

/// Why a change to a task was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No task has the id.
    NotFound,
    /// The token is not the task's current lease: it expired and the task
    /// was leased again, or it never was the current one.
    LeaseLost,
    /// The task has ended (succeeded or failed).
    Finished,
    /// The task was cancelled.
    Cancelled,
}

/// What a lifecycle call failed with.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The change was refused; nothing changed.
    #[error("refused: {0:?}")]
    Refused(Refusal),
    /// The database failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}
