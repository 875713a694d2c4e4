//! The statements of the task lifecycle on SQLite: leases, renewals,
//! completions, failures and cancellations. Writes take the writer's
//! connection.

use std::time::Duration;

use sqlx::{SqliteConnection, SqliteExecutor};
use uuid::Uuid;

use super::{micros, parse_id, task_record};
use crate::{
    domain::{
        Completion, Failure, LeaseRef, TaskRecord,
        lease::{self, Candidate, Room, cut},
    },
    storage::{FailureOutcome, LeaseOrder, LeasedTasks, StorageError},
};

/// An owned [`LeaseOrder`], to cross into the writer task.
#[derive(Debug)]
pub struct LeaseRow {
    worker_id: String,
    /// The actions as a JSON array, for `json_each`.
    actions: String,
    max_tasks: i64,
    max_bytes: i64,
    lease_duration: i64,
    max_attempts: i32,
}

impl From<&LeaseOrder<'_>> for LeaseRow {
    fn from(order: &LeaseOrder<'_>) -> Self {
        Self {
            worker_id: order.worker_id.to_owned(),
            actions: serde_json::Value::from(order.actions.to_vec()).to_string(),
            max_tasks: order.max_tasks,
            max_bytes: order.max_bytes,
            lease_duration: micros(order.lease_duration),
            max_attempts: order.max_attempts,
        }
    }
}

/// What a lease transaction did: the tasks it leased, and those whose
/// expired lease was their last allowed attempt, which it ended FAILED.
#[derive(Debug, Default)]
pub struct TransactionLeases {
    /// The leased tasks and the run-out leases found.
    pub granted: LeasedTasks,
    /// The tasks ended FAILED (counted in `granted.expired` too).
    pub ended: Vec<Uuid>,
    /// Whether leasable tasks were left behind, past the order's limits.
    pub left_behind: bool,
}

/// Whether any task is leasable now, read without the writer: so idle
/// workers polling for work do not queue behind the creates.
pub async fn any_leasable(
    db: impl SqliteExecutor<'_>,
    order: &LeaseRow,
) -> Result<bool, StorageError> {
    let found: Option<i64> = sqlx::query_scalar(concat!(
        "SELECT 1 FROM tasks WHERE status IN ",
        status!(leasable),
        " AND available_at <= ",
        now!(),
        " AND (json_array_length(?1) = 0 OR action IN (SELECT value FROM json_each(?1))) LIMIT 1"
    ))
    .bind(&order.actions)
    .fetch_optional(db)
    .await?;
    Ok(found.is_some())
}

/// Leases tasks for one order inside the writer's transaction (the single
/// writer's, so no two callers get one task): reads the oldest leasable
/// tasks, lets [`cut`] decide which the order takes, as on PostgreSQL, and
/// leases those (or ends them FAILED), reading again while tasks ended
/// FAILED filled the read.
pub async fn lease_in_transaction(
    connection: &mut SqliteConnection,
    order: &LeaseRow,
) -> Result<TransactionLeases, StorageError> {
    let mut done = TransactionLeases::default();
    let mut rooms = [Room::new(order.max_tasks, order.max_bytes)];
    let mut rounds = lease::Rounds::default();
    loop {
        let wanted = lease::candidates_wanted(&rooms);
        let candidates = lease_candidates(&mut *connection, order, wanted).await?;
        let cut = cut(&rooms, &candidates, order.max_attempts);
        done.left_behind |= cut.left_behind;
        for pick in &cut.picks {
            let candidate = &candidates[pick.candidate];
            let message = candidate.message(order.max_attempts);
            done.granted.expired += u64::from(candidate.running);
            if pick.ends {
                end_expired(&mut *connection, candidate, message).await?;
                done.ended.push(candidate.task_id);
            } else {
                let task = lease_one(&mut *connection, order, candidate, message).await?;
                rooms[0].take(candidate.size);
                done.granted.tasks.push(task);
            }
        }
        // One writer: no other statement takes picks first.
        match rounds.after(&rooms, &cut, false, candidates.len() as i64 >= wanted) {
            lease::AfterRound::Again => {}
            lease::AfterRound::Done => break,
            lease::AfterRound::GiveUp => {
                // Tasks may still wait for this order: wake the poll to
                // read again.
                done.left_behind = true;
                break;
            }
        }
    }
    Ok(done)
}

/// The oldest leasable tasks of the order's actions, at most `limit`.
async fn lease_candidates(
    connection: &mut SqliteConnection,
    order: &LeaseRow,
    limit: i64,
) -> Result<Vec<Candidate>, StorageError> {
    let rows: Vec<(String, i64, bool, i32)> = sqlx::query_as(concat!(
        "SELECT task_id, parameters_bytes, status = ",
        status!(running),
        ", attempt FROM tasks WHERE status IN ",
        status!(leasable),
        " AND available_at <= ",
        now!(),
        " AND (json_array_length(?1) = 0 OR action IN (SELECT value FROM json_each(?1))) \
         ORDER BY available_at, seq LIMIT ?2"
    ))
    .bind(&order.actions)
    .bind(limit)
    .fetch_all(connection)
    .await?;
    rows.into_iter()
        .map(|(task_id, size, running, attempt)| {
            Ok(Candidate {
                task_id: parse_id(&task_id)?,
                size,
                running,
                attempt,
            })
        })
        .collect()
}

/// Ends FAILED (4) a task whose last allowed lease ran out.
async fn end_expired(
    connection: &mut SqliteConnection,
    candidate: &Candidate,
    message: Option<String>,
) -> Result<(), StorageError> {
    sqlx::query(concat!(
        "UPDATE tasks SET status = ",
        status!(failed),
        ", error_message = coalesce(?2, error_message), update_time = ",
        now!(),
        " WHERE task_id = ?1"
    ))
    .bind(candidate.task_id.to_string())
    .bind(message)
    .execute(connection)
    .await?;
    Ok(())
}

/// Leases (2) one task to the order's worker with a new token.
async fn lease_one(
    connection: &mut SqliteConnection,
    order: &LeaseRow,
    candidate: &Candidate,
    message: Option<String>,
) -> Result<TaskRecord, StorageError> {
    let row = sqlx::query(concat!(
        "UPDATE tasks SET status = ",
        status!(running),
        ", error_message = coalesce(?2, error_message), \
             attempt = attempt + 1, lease_token = ?3, worker_id = ?4, \
             available_at = ",
        now!(),
        " + ?5, update_time = ",
        now!(),
        " WHERE task_id = ?1 RETURNING ",
        task_columns!()
    ))
    .bind(candidate.task_id.to_string())
    .bind(message)
    .bind(Uuid::new_v4().to_string())
    .bind(&order.worker_id)
    .bind(order.lease_duration)
    .fetch_one(connection)
    .await?;
    task_record(&row)
}

/// Extends a lease that is still the task's current one.
pub async fn renew_lease(
    connection: &mut SqliteConnection,
    lease: LeaseRef,
    lease_duration: Duration,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "UPDATE tasks SET available_at = ",
        now!(),
        " + ?3, update_time = ",
        now!(),
        " WHERE task_id = ?1 AND lease_token = ?2 AND status = ",
        status!(running),
        " RETURNING ",
        task_columns!()
    ))
    .bind(lease.task_id.0.to_string())
    .bind(lease.token.to_string())
    .bind(micros(lease_duration))
    .fetch_optional(connection)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}

/// Marks the task SUCCEEDED (3) with its result, if the lease is current.
pub async fn complete_task(
    connection: &mut SqliteConnection,
    completion: &Completion,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "UPDATE tasks SET status = ",
        status!(succeeded),
        ", result = ?3, error_message = '', update_time = ",
        now!(),
        " WHERE task_id = ?1 AND lease_token = ?2 AND status = ",
        status!(running),
        " RETURNING ",
        task_columns!()
    ))
    .bind(completion.lease.task_id.0.to_string())
    .bind(completion.lease.token.to_string())
    .bind(&completion.result_json)
    .fetch_optional(connection)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}

/// Writes a failed attempt's `outcome` (decided by `queue::retry`), if the
/// lease is current and on the attempt it was decided for: the task ends
/// FAILED, keeping its `available_at`, or is queued again to be leasable
/// after the outcome's delay.
pub async fn fail_task(
    connection: &mut SqliteConnection,
    failure: &Failure,
    outcome: &FailureOutcome,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "UPDATE tasks SET status = ?4, error_message = ?3, available_at = coalesce(",
        now!(),
        " + ?6, available_at), update_time = ",
        now!(),
        " WHERE task_id = ?1 AND lease_token = ?2 AND attempt = ?5 AND status = ",
        status!(running),
        " RETURNING ",
        task_columns!()
    ))
    .bind(failure.lease.task_id.0.to_string())
    .bind(failure.lease.token.to_string())
    .bind(&failure.message)
    .bind(outcome.status().code())
    .bind(outcome.attempt)
    .bind(outcome.retry_in_micros())
    .fetch_optional(connection)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}

/// Cancels (5) a queued or running task.
pub async fn cancel_task(
    connection: &mut SqliteConnection,
    task_id: Uuid,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "UPDATE tasks SET status = ",
        status!(cancelled),
        ", update_time = ",
        now!(),
        " WHERE task_id = ?1 AND status IN ",
        status!(unfinished),
        " RETURNING ",
        task_columns!()
    ))
    .bind(task_id.to_string())
    .fetch_optional(connection)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}
