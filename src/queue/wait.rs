//! WaitTask: the task once it is finished, or as it is when time runs out.

use std::time::Duration;

use tokio::{sync::broadcast::error::RecvError, time::Instant};
use uuid::Uuid;

use super::{QueueError, Refusal};
use crate::{domain::TaskRecord, storage::Store};

/// Returns the task as soon as it is finished, or after `wait` (or when the
/// server begins to shut down) as it is then. Woken when a task finishes on
/// any instance; re-reads at least every `recheck` in case a wake-up was
/// lost.
pub async fn wait_task<S: Store>(
    store: &S,
    task_id: Uuid,
    wait: Duration,
    recheck: Duration,
) -> Result<TaskRecord, QueueError> {
    let until = Instant::now() + wait;
    // Subscribe before reading, so a finish in between is not missed.
    let mut finished = store.events().finished();
    loop {
        let task = store
            .get_task(task_id)
            .await?
            .ok_or(QueueError::Refused(Refusal::NotFound))?;
        let left = until.saturating_duration_since(Instant::now());
        if task.is_finished() || left.is_zero() || store.events().is_draining() {
            return Ok(task);
        }
        let recheck = Instant::now() + left.min(recheck);
        loop {
            match tokio::time::timeout_at(recheck, finished.recv()).await {
                // Time to re-read.
                Err(_) => break,
                // This task, or "re-read everything".
                Ok(Ok(id)) if id == task_id || id.is_nil() => break,
                Ok(Ok(_)) => continue,
                // Too far behind to know: re-read.
                Ok(Err(RecvError::Lagged(_))) => break,
                // The store is gone; only the timer is left.
                Ok(Err(RecvError::Closed)) => {
                    tokio::time::sleep_until(recheck).await;
                    break;
                }
            }
        }
    }
}
