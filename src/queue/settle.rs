//! The calls that change a task after it was leased, each fenced by the
//! lease's token in the storage layer, and what a refusal means.

use uuid::Uuid;

use super::{QueueError, QueuePolicy, Refusal, retry};
use crate::{
    domain::{Completion, Failure, Renewal, StoredStatus, TaskRecord, canonical_json},
    storage::{StorageError, Store},
};

/// Extends a lease while its worker works (the heartbeat).
pub async fn renew_lease<S: Store>(store: &S, renewal: &Renewal) -> Result<TaskRecord, QueueError> {
    match store
        .renew_lease(renewal.lease, renewal.lease_duration)
        .await?
    {
        Some(task) => Ok(task),
        None => Err(refusal(store, renewal.lease.task_id.0).await?.into()),
    }
}

/// Completes a task. A repeat of a completion that succeeded, with the same
/// token and the same result, returns the task as it is (the worker lost
/// the first answer); any other completion of a finished task is refused.
pub async fn complete_task<S: Store>(
    store: &S,
    completion: &Completion,
) -> Result<TaskRecord, QueueError> {
    if let Some(task) = store.complete_task(completion).await? {
        return Ok(task);
    }
    let task_id = completion.lease.task_id.0;
    let task = store
        .get_task(task_id)
        .await?
        .ok_or(QueueError::Refused(Refusal::NotFound))?;
    let same_completion = task.status == StoredStatus::Succeeded.code()
        && task.lease_token == Some(completion.lease.token)
        && task
            .result
            .as_ref()
            .is_some_and(|r| canonical_json::object_to_string(r) == completion.result_json);
    if same_completion {
        return Ok(task);
    }
    Err(classify(&task).into())
}

/// Records a failed attempt: the task is queued again after a backoff, or
/// ends FAILED when the failure is permanent or the attempt was the last
/// ([`retry::after_failure`] decides, for the attempt the lease is on).
/// `read` is the task if the caller has just read it.
pub async fn fail_task<S: Store>(
    store: &S,
    failure: &Failure,
    policy: &QueuePolicy,
    read: Option<TaskRecord>,
) -> Result<TaskRecord, QueueError> {
    // The decision depends on the attempt, which the lease's token fixes:
    // read it (unless the caller just did), decide, and write fenced on
    // the token and that attempt.
    let task = match read {
        Some(task) => task,
        None => store
            .get_task(failure.lease.task_id.0)
            .await?
            .ok_or(QueueError::Refused(Refusal::NotFound))?,
    };
    if task.status != StoredStatus::Running.code() || task.lease_token != Some(failure.lease.token)
    {
        return Err(classify(&task).into());
    }
    let outcome = retry::after_failure(policy, task.attempt, failure, retry::random_fraction());
    match store.fail_task(failure, &outcome).await? {
        Some(task) => Ok(task),
        None => Err(refusal(store, failure.lease.task_id.0).await?.into()),
    }
}

/// Cancels a queued or running task; a finished one is returned unchanged.
pub async fn cancel_task<S: Store>(store: &S, task_id: Uuid) -> Result<TaskRecord, QueueError> {
    if let Some(task) = store.cancel_task(task_id).await? {
        return Ok(task);
    }
    store
        .get_task(task_id)
        .await?
        .ok_or(QueueError::Refused(Refusal::NotFound))
}

impl From<Refusal> for QueueError {
    fn from(refusal: Refusal) -> Self {
        Self::Refused(refusal)
    }
}

/// Why a fenced change to `task_id` found nothing to change.
async fn refusal<S: Store>(store: &S, task_id: Uuid) -> Result<Refusal, StorageError> {
    Ok(match store.get_task(task_id).await? {
        None => Refusal::NotFound,
        Some(task) => classify(&task),
    })
}

/// Why a task that exists refused a change fenced by a lease.
fn classify(task: &TaskRecord) -> Refusal {
    if task.status == StoredStatus::Cancelled.code() {
        Refusal::Cancelled
    } else if task.is_finished() {
        Refusal::Finished
    } else {
        // Queued again, or running under another lease.
        Refusal::LeaseLost
    }
}
