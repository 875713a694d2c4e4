//! LeaseTasks: hand out available tasks, waiting for one when asked to.

use std::time::Duration;

use tokio::time::Instant;

use super::QueuePolicy;
use crate::{
    domain::{LeaseQuery, MAX_LEASED_BYTES, TaskRecord},
    storage::{LeaseOrder, LeasedTasks, StorageError, Store},
};

/// Leases up to `query.max_tasks` tasks. When none is available, waits up
/// to `wait` for one: woken when a task is created or queued again, and
/// re-reading at least every `policy.recheck` (for backoffs and leases that run
/// out, and wake-ups that were lost). Returns the leases, or none when the
/// wait ran out or the server began to shut down.
pub async fn lease_tasks<S: Store>(
    store: &S,
    query: &LeaseQuery,
    policy: &QueuePolicy,
    wait: Duration,
) -> Result<Vec<TaskRecord>, StorageError> {
    let order = LeaseOrder {
        worker_id: &query.worker_id,
        actions: &query.actions,
        max_tasks: i64::try_from(query.max_tasks).unwrap_or(1),
        max_bytes: MAX_LEASED_BYTES,
        lease_duration: query.lease_duration,
        max_attempts: policy.max_attempts,
    };
    let until = Instant::now() + wait;
    loop {
        // Listen before reading, so a task created in between still wakes us.
        let ready = store.events().ready().notified();
        tokio::pin!(ready);
        ready.as_mut().enable();

        let leased = store.lease_tasks(&order).await?;
        count_leases(&leased);
        let leased = leased.tasks;
        let left = until.saturating_duration_since(Instant::now());
        if !leased.is_empty() || left.is_zero() || store.events().is_draining() {
            return Ok(leased);
        }
        let waiting = Waiting::start();
        let _ = tokio::time::timeout(left.min(policy.recheck), ready).await;
        drop(waiting);
    }
}

/// Counts one lease call in the metrics: each lease granted and its
/// attempt number, and each lease it found run out.
fn count_leases(leased: &LeasedTasks) {
    let metrics = crate::metrics::metrics();
    for task in &leased.tasks {
        metrics.lease_grants.inc();
        metrics.lease_attempts.observe(f64::from(task.attempt));
    }
    metrics.lease_expiries.inc_by(leased.expired);
}

/// A long poll counted in `oncely_lease_polls_waiting` while it lives.
struct Waiting;

impl Waiting {
    fn start() -> Self {
        crate::metrics::metrics().lease_polls_waiting.inc();
        Self
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        crate::metrics::metrics().lease_polls_waiting.dec();
    }
}
