//! The statements of the task lifecycle on SQLite: leases, renewals,
//! completions, failures and cancellations. Writes take the writer's
//! connection.

use std::time::Duration;

use sqlx::{SqliteConnection, SqliteExecutor};
use uuid::Uuid;

use super::{micros, parse_id, task_record};
use crate::{
    domain::{Completion, Failure, LeaseRef, TaskRecord},
    storage::{LeaseOrder, RetryRule, StorageError, expired_message_template},
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
    expired_message: String,
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
            expired_message: expired_message_template(order.max_attempts),
        }
    }
}

/// What a lease transaction did: the tasks it leased, and those whose
/// expired lease was their last allowed attempt, which it ended FAILED.
#[derive(Debug, Default)]
pub struct Leased {
    /// The leased tasks, RUNNING, oldest first.
    pub leased: Vec<TaskRecord>,
    /// The tasks ended FAILED.
    pub failed: Vec<Uuid>,
    /// The bytes of the leased tasks' parameters.
    pub bytes: i64,
}

/// Whether any task is leasable now, read without the writer: so idle
/// workers polling for work do not queue behind the creates.
pub async fn any_leasable(
    db: impl SqliteExecutor<'_>,
    order: &LeaseRow,
) -> Result<bool, StorageError> {
    let found: Option<i64> = sqlx::query_scalar(concat!(
        "SELECT 1 FROM tasks WHERE status IN (1, 2) AND available_at <= ",
        now!(),
        " AND (json_array_length(?1) = 0 OR action IN (SELECT value FROM json_each(?1))) LIMIT 1"
    ))
    .bind(&order.actions)
    .fetch_optional(db)
    .await?;
    Ok(found.is_some())
}

/// Leases up to `order.max_tasks` available tasks, oldest first, inside
/// the writer's transaction (the single writer's, so no two callers get
/// one task). Status numbers: 1 queued, 2 running, 4 failed.
pub async fn lease_in_transaction(
    connection: &mut SqliteConnection,
    order: &LeaseRow,
) -> Result<Leased, StorageError> {
    let mut done = Leased::default();
    // Tasks ended FAILED take places of the limit: pick again while any
    // were, so a poll is not answered empty while others wait.
    loop {
        let failed_before = done.failed.len();
        let wanted = order.max_tasks - done.leased.len() as i64;
        let full = lease_some(connection, order, wanted, &mut done).await?;
        if full || done.failed.len() == failed_before || done.leased.len() as i64 >= order.max_tasks
        {
            break;
        }
    }
    Ok(done)
}

/// One pick and lease of up to `wanted` tasks, inside the caller's
/// transaction; true once the leased parameters reach `max_bytes`.
async fn lease_some(
    connection: &mut SqliteConnection,
    order: &LeaseRow,
    wanted: i64,
    done: &mut Leased,
) -> Result<bool, StorageError> {
    let picked: Vec<(String, i64, i32, i64)> = sqlx::query_as(concat!(
        "SELECT task_id, status, attempt, length(CAST(parameters AS BLOB)) FROM tasks \
         WHERE status IN (1, 2) AND available_at <= ",
        now!(),
        " AND (json_array_length(?1) = 0 OR action IN (SELECT value FROM json_each(?1))) \
         ORDER BY available_at, seq LIMIT ?2"
    ))
    .bind(&order.actions)
    .bind(wanted)
    .fetch_all(&mut *connection)
    .await?;
    for (task_id, status, attempt, size) in picked {
        if !done.leased.is_empty() && done.bytes + size > order.max_bytes {
            return Ok(true);
        }
        if status == 2 && attempt >= order.max_attempts {
            sqlx::query(concat!(
                "UPDATE tasks SET status = 4, error_message = format(?2, attempt), update_time = ",
                now!(),
                " WHERE task_id = ?1"
            ))
            .bind(&task_id)
            .bind(&order.expired_message)
            .execute(&mut *connection)
            .await?;
            done.failed.push(parse_id(&task_id)?);
            continue;
        }
        let row = sqlx::query(concat!(
            "UPDATE tasks SET status = 2, \
                 error_message = CASE WHEN status = 2 THEN format(?2, attempt) ELSE error_message END, \
                 attempt = attempt + 1, lease_token = ?3, worker_id = ?4, \
                 available_at = ",
            now!(),
            " + ?5, update_time = ",
            now!(),
            " WHERE task_id = ?1 RETURNING ",
            task_columns!()
        ))
        .bind(&task_id)
        .bind(&order.expired_message)
        .bind(Uuid::new_v4().to_string())
        .bind(&order.worker_id)
        .bind(order.lease_duration)
        .fetch_one(&mut *connection)
        .await?;
        done.leased.push(task_record(&row)?);
        done.bytes += size;
    }
    Ok(false)
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
        " WHERE task_id = ?1 AND lease_token = ?2 AND status = 2 RETURNING ",
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
        "UPDATE tasks SET status = 3, result = ?3, error_message = '', update_time = ",
        now!(),
        " WHERE task_id = ?1 AND lease_token = ?2 AND status = 2 RETURNING ",
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

/// Records a failed attempt, if the lease is current: FAILED (4) when
/// permanent or on the last allowed attempt, else queued (1) again after
/// `retry_after` or a random delay up to the attempt's backoff ceiling.
pub async fn fail_task(
    connection: &mut SqliteConnection,
    failure: &Failure,
    retry: &RetryRule,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "UPDATE tasks SET \
             status = CASE WHEN ?4 OR attempt >= ?5 THEN 4 ELSE 1 END, \
             error_message = ?3, \
             available_at = CASE WHEN ?4 OR attempt >= ?5 THEN available_at ELSE ",
        now!(),
        " + CAST(COALESCE(?6, min(?8, ?7 * (1 << min(attempt - 1, 30))) \
                    * ((random() & 9007199254740991) / 9007199254740992.0)) AS INTEGER) END, \
             update_time = ",
        now!(),
        " WHERE task_id = ?1 AND lease_token = ?2 AND status = 2 RETURNING ",
        task_columns!()
    ))
    .bind(failure.lease.task_id.0.to_string())
    .bind(failure.lease.token.to_string())
    .bind(&failure.message)
    .bind(failure.permanent)
    .bind(retry.max_attempts)
    .bind(failure.retry_after.map(micros))
    .bind(micros(retry.backoff_base))
    .bind(micros(retry.backoff_max))
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
        "UPDATE tasks SET status = 5, update_time = ",
        now!(),
        " WHERE task_id = ?1 AND status IN (1, 2) RETURNING ",
        task_columns!()
    ))
    .bind(task_id.to_string())
    .fetch_optional(connection)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}
