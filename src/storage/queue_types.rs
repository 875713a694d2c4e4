//! What the stores take and give for the task queue: lease orders and
//! what they got, failure outcomes, pages of tasks, the queue's figures.

use std::time::Duration;

use super::{StorageError, micros};
use crate::domain::StoredStatus;
use crate::domain::TaskRecord;

/// What a worker asks to lease.
#[derive(Debug, Clone, Copy)]
pub struct LeaseOrder<'a> {
    /// Who asks.
    pub worker_id: &'a str,
    /// The actions wanted; empty for any.
    pub actions: &'a [String],
    /// How many tasks at most.
    pub max_tasks: i64,
    /// How many bytes of parameters (as JSON) at most; the first task is
    /// leased whatever its size.
    pub max_bytes: i64,
    /// How long each lease lasts.
    pub lease_duration: Duration,
    /// The most leases a task may have; an expired lease on the last one
    /// fails the task.
    pub max_attempts: i32,
}

/// What a lease call did.
#[derive(Debug, Default)]
pub struct LeasedTasks {
    /// The leased tasks, RUNNING, oldest first.
    pub tasks: Vec<TaskRecord>,
    /// How many leases it found run out: of tasks leased again (in
    /// `tasks`) and of tasks ended FAILED on their last allowed attempt
    /// (not in `tasks`).
    pub expired: u64,
}

impl LeasedTasks {
    /// Whether the call leased or ended any task (committed work that its
    /// caller must be told of).
    pub fn changed_any(&self) -> bool {
        !self.tasks.is_empty() || self.expired > 0
    }
}

/// What a failed attempt does to its task, as `queue::retry` decided it;
/// a store only writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureOutcome {
    /// The attempt the decision is for: the write is fenced on it (as well
    /// as on the lease's token).
    pub attempt: i32,
    /// `None`: the task ends FAILED. Otherwise it is queued again, to be
    /// leasable after this delay.
    pub retry_in: Option<Duration>,
}

impl FailureOutcome {
    /// The status the task is left in.
    pub fn status(&self) -> StoredStatus {
        match self.retry_in {
            None => StoredStatus::Failed,
            Some(_) => StoredStatus::Queued,
        }
    }

    /// The delay in whole microseconds, `None` when the task ends.
    pub fn retry_in_micros(&self) -> Option<i64> {
        self.retry_in.map(micros)
    }
}

/// A page of one agent's tasks.
#[derive(Debug, Clone, Default)]
pub struct TaskPage {
    /// The tasks, oldest first.
    pub tasks: Vec<TaskRecord>,
    /// Whether the page ended at the size bound (more may follow).
    pub cut_by_size: bool,
}

impl TaskPage {
    /// The page that `rows` make (oldest first, each with the `running`
    /// total of the bytes of the rows up to it): cut by size when the last
    /// row's total reached `max_bytes`.
    pub(crate) fn from_rows<R>(
        rows: &[R],
        max_bytes: i64,
        task_record: impl Fn(&R) -> Result<TaskRecord, StorageError>,
    ) -> Result<Self, StorageError>
    where
        R: sqlx::Row,
        i64: sqlx::Type<R::Database> + for<'r> sqlx::Decode<'r, R::Database>,
        for<'c> &'c str: sqlx::ColumnIndex<R>,
    {
        let cut_by_size = match rows.last() {
            Some(row) => row.try_get::<i64, _>("running")? >= max_bytes,
            None => false,
        };
        Ok(Self {
            tasks: rows.iter().map(task_record).collect::<Result<_, _>>()?,
            cut_by_size,
        })
    }
}

/// Tasks by status and the oldest wait, as
/// [`Store::queue_stats`](super::Store::queue_stats) reads them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QueueStats {
    /// Tasks of each status, in the order of [`StoredStatus::ALL`].
    pub by_status: [i64; 5],
    /// How long the oldest queued task that may be leased now has waited
    /// for a worker, in seconds; 0 when none.
    pub oldest_ready_seconds: f64,
}

impl QueueStats {
    /// Adds `count` tasks of stored status `code` (a number this build
    /// does not know is ignored).
    pub fn add(&mut self, code: i64, count: i64) {
        if let Some(place) = StoredStatus::from_code(code)
            .and_then(|status| StoredStatus::ALL.iter().position(|s| *s == status))
        {
            self.by_status[place] += count;
        }
    }

    /// How many tasks have `status`.
    pub fn count(&self, status: StoredStatus) -> i64 {
        StoredStatus::ALL
            .iter()
            .position(|s| *s == status)
            .map_or(0, |place| self.by_status[place])
    }
}

/// Group commits of one size, for the batch-size metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommits {
    /// What was batched: `claims`, `completions` or `leases`.
    pub job: &'static str,
    /// How many requests each batch held.
    pub size: usize,
    /// How many batches of that size were sent.
    pub batches: u64,
}
