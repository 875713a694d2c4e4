//! One lease, from the handler's start to the server hearing how it went:
//! heartbeats while the handler runs, then CompleteTask or FailTask with the
//! lease's token, or nothing at all once the lease is lost.

use std::{future::Future, sync::Arc, time::Duration};

use prost_types::Struct;
use serde_json::Value;
use tokio::{
    sync::watch,
    task::{JoinError, JoinHandle},
    time::{Instant, MissedTickBehavior},
};
use tonic::{Code, Status};
use tonic_types::StatusExt;
use tracing::Instrument;

use super::{CancelReason, TaskContext, TaskError, calls::Calls, task_error::from_panic};
use crate::{
    ClientError, RetryPolicy, json,
    proto::tasks_v1::{Lease, Task, TaskStatus},
    reasons,
};

/// The most time releasing a task at shutdown may take: the process is
/// about to end, and a task that could not be released comes back anyway
/// when its lease runs out.
pub(super) const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// The message of a task released at shutdown.
const RELEASED: &str = "the worker shut down before the handler finished";

/// What a handler's run ends with.
type Joined = Result<Result<Value, TaskError>, JoinError>;

/// How often to renew, and how long a handler may take to stop.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timing {
    pub(super) heartbeat: Duration,
    pub(super) grace: Duration,
}

/// A handler's tokio task, aborted when this is dropped, so that no path
/// out of [`work`] (an abort of the worker's own task included) leaves a
/// handler running unsupervised.
struct AbortOnDrop(JoinHandle<Result<Value, TaskError>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `handler` on the leased task, renewing the lease every
/// `timing.heartbeat`, then reports the outcome. When `stop` turns true (the
/// shutdown grace ran out), aborts the handler and releases the task.
pub(super) async fn work<H, Fut>(
    calls: Calls,
    lease: Lease,
    handler: Arc<H>,
    mut stop: watch::Receiver<bool>,
    timing: Timing,
) where
    H: Fn(Task, TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
{
    let Some(task) = lease.task else {
        tracing::warn!("the server sent a lease without a task; ignoring it");
        return;
    };
    let started = Instant::now();
    let task_id = task.task_id.clone();
    let mut token = lease.lease_token;
    let (context, cancel) = TaskContext::standalone(&task);
    // Calling the handler inside the tokio task catches a panic in the
    // call as well as in the future it returns.
    let mut running = AbortOnDrop(tokio::spawn(
        async move { handler(task, context).await }.instrument(tracing::Span::current()),
    ));
    let mut heartbeat =
        tokio::time::interval_at(Instant::now() + timing.heartbeat, timing.heartbeat);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let joined = loop {
        tokio::select! {
            biased;
            joined = &mut running.0 => break joined,
            () = stopped(&mut stop) => {
                running.0.abort();
                // The handler may have finished just now: then report it.
                match (&mut running.0).await {
                    Err(error) if error.is_cancelled() => {
                        release(&calls, &task_id, &token, started).await;
                        return;
                    }
                    joined => break joined,
                }
            }
            _ = heartbeat.tick() => {
                match calls.renew(&task_id, &token, timing.heartbeat).await {
                    Ok(renewed) if !renewed.lease_token.is_empty() => token = renewed.lease_token,
                    Ok(_) => {}
                    Err(error) => match lost(&error) {
                        Some(reason) => {
                            cancel.cancel(reason);
                            wind_down(running, &mut stop, timing.grace).await;
                            let outcome = outcome_of(reason);
                            tracing::info!(outcome, elapsed = ?started.elapsed(), "stopped working on the task");
                            return;
                        }
                        None => tracing::warn!(%error, "renewing the lease failed; trying again at the next heartbeat"),
                    },
                }
            }
        }
    };
    report(&calls, &task_id, &token, joined, started).await;
}

/// Tells the server how the handler's run went.
async fn report(calls: &Calls, task_id: &str, token: &str, joined: Joined, started: Instant) {
    let failure = match joined {
        Ok(Ok(value)) => match result_struct(value) {
            Ok(result) => match calls.complete(task_id, token, result).await {
                Ok(_) => {
                    tracing::info!(outcome = "succeeded", elapsed = ?started.elapsed(), "task done");
                    return;
                }
                Err(ClientError::Rejected(status)) if status.code() == Code::InvalidArgument => {
                    TaskError::permanent(format!(
                        "the server refused the handler's result: {}",
                        status.message()
                    ))
                }
                Err(error) => {
                    not_reported(&error, "completing");
                    return;
                }
            },
            Err(failure) => failure,
        },
        Ok(Err(failure)) => failure,
        Err(error) if error.is_panic() => from_panic(error.into_panic().as_ref()),
        Err(_) => TaskError::retryable("the handler was aborted"),
    };
    match calls.fail(task_id, token, &failure, &calls.policy).await {
        Ok(task) => {
            let outcome = if task.status() == TaskStatus::Failed {
                "failed"
            } else {
                "retrying"
            };
            let message = short(failure.message());
            tracing::warn!(outcome, permanent = failure.is_permanent(), error = message, elapsed = ?started.elapsed(), "task attempt failed");
        }
        Err(error) => not_reported(&error, "failing"),
    }
}

/// Gives the task back at once (a retryable failure with no delay), so
/// another worker can take it without waiting for the lease to run out.
async fn release(calls: &Calls, task_id: &str, token: &str, started: Instant) {
    let policy = RetryPolicy {
        total_timeout: calls.policy.total_timeout.min(RELEASE_TIMEOUT),
        ..calls.policy
    };
    let released = TaskError::retryable(RELEASED).retry_after(Duration::ZERO);
    match calls.fail(task_id, token, &released, &policy).await {
        Ok(_) => {
            tracing::info!(outcome = "released", elapsed = ?started.elapsed(), "handler aborted at shutdown; task released")
        }
        Err(error) => not_reported(&error, "releasing"),
    }
}

/// After the lease was lost: lets the handler see the signal and return,
/// for at most `grace`, then aborts it. Its result is not reported.
async fn wind_down(mut running: AbortOnDrop, stop: &mut watch::Receiver<bool>, grace: Duration) {
    tokio::select! {
        _ = &mut running.0 => {}
        () = tokio::time::sleep(grace) => {}
        () = stopped(stop) => {}
    }
}

/// Completes when `stop` turns true; never if the worker dropped it.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Logs a completion or failure the server did not take.
fn not_reported(error: &ClientError, what: &'static str) {
    match lost(error) {
        Some(reason) => {
            let outcome = outcome_of(reason);
            tracing::warn!(outcome, %error, "{what} the task was refused: the lease was no longer this worker's");
        }
        None => {
            tracing::error!(outcome = "unreported", %error, "{what} the task failed; it will be leased again when the lease runs out")
        }
    }
}

fn outcome_of(reason: CancelReason) -> &'static str {
    match reason {
        CancelReason::TaskCancelled => "cancelled",
        CancelReason::LeaseLost => "lease_lost",
    }
}

/// Whether an error means the task is no longer this lease's, and why.
pub(super) fn lost(error: &ClientError) -> Option<CancelReason> {
    let ClientError::Rejected(status) = error else {
        return None;
    };
    match status.code() {
        Code::FailedPrecondition if reason(status).as_deref() == Some(reasons::TASK_CANCELLED) => {
            Some(CancelReason::TaskCancelled)
        }
        // LEASE_LOST, TASK_FINISHED, or a reason this version does not know.
        Code::FailedPrecondition | Code::NotFound => Some(CancelReason::LeaseLost),
        _ => None,
    }
}

/// The `ErrorInfo` reason of a status, if it has one.
fn reason(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

/// A handler's result as the task's result: it must be a JSON object, and
/// anything else fails the task for good, since retrying returns the same.
pub(super) fn result_struct(value: Value) -> Result<Struct, TaskError> {
    json::to_struct(value).map_err(|error| {
        TaskError::permanent(format!(
            "the handler returned a result that cannot be stored: {error}"
        ))
    })
}

/// At most the first 256 bytes of a message, for a log line.
fn short(message: &str) -> &str {
    let mut end = message.len().min(256);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;
    use tonic_types::ErrorDetails;

    use super::*;

    fn refused(code: Code, reason: &str) -> ClientError {
        let details =
            ErrorDetails::with_error_info(reason, "oncely", HashMap::<String, String>::new());
        ClientError::Rejected(Status::with_error_details(code, "refused", details))
    }

    #[test]
    fn objects_are_results_and_anything_else_fails_for_good() {
        let result = result_struct(json!({"sent": true})).unwrap();
        assert_eq!(json::from_struct(&result)["sent"], json!(true));
        assert_eq!(result_struct(json!({})).unwrap(), Struct::default());
        for value in [json!(null), json!([1]), json!("done"), json!(3)] {
            let failure = result_struct(value).unwrap_err();
            assert!(failure.is_permanent());
            assert!(
                failure.message().contains("JSON object"),
                "{}",
                failure.message()
            );
        }
    }

    #[test]
    fn a_cancelled_task_and_a_lost_lease_stop_the_work() {
        let cancelled = refused(Code::FailedPrecondition, reasons::TASK_CANCELLED);
        assert_eq!(lost(&cancelled), Some(CancelReason::TaskCancelled));
        for reason in [reasons::LEASE_LOST, reasons::TASK_FINISHED, "SOMETHING_NEW"] {
            let error = refused(Code::FailedPrecondition, reason);
            assert_eq!(lost(&error), Some(CancelReason::LeaseLost));
        }
        let gone = ClientError::Rejected(Status::not_found("no such task"));
        assert_eq!(lost(&gone), Some(CancelReason::LeaseLost));
    }

    #[test]
    fn other_errors_do_not_stop_the_work() {
        assert_eq!(
            lost(&refused(Code::InvalidArgument, "INVALID_REQUEST")),
            None
        );
        let gave_up = ClientError::GaveUp {
            attempts: 3,
            last: Status::unavailable("down"),
        };
        assert_eq!(lost(&gave_up), None);
    }

    #[test]
    fn log_lines_keep_a_short_prefix_on_a_char_boundary() {
        assert_eq!(short("boom"), "boom");
        let long = "é".repeat(200);
        let cut = short(&long);
        assert!(cut.len() <= 256 && long.starts_with(cut));
    }
}
