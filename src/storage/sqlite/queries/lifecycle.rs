//! The statements of the task lifecycle on SQLite: leases, renewals,
//! completions, failures and cancellations. Writes take the writer's
//! connection.

use std::{collections::HashMap, time::Duration};

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

impl LeaseRow {
    /// Whether one read and one statement can serve both: the same actions
    /// on the same terms.
    pub fn same_shape(&self, other: &Self) -> bool {
        self.actions == other.actions
            && self.lease_duration == other.lease_duration
            && self.max_attempts == other.max_attempts
    }
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

/// Leases tasks for `orders` inside the writer's transaction (the single
/// writer's, so no two callers get one task), answered in their order.
/// The orders are of one shape ([`LeaseRow::same_shape`]): each round reads
/// the oldest leasable tasks once for all of them, lets [`cut`] decide
/// which each takes, as on PostgreSQL, and leases those (or ends them
/// FAILED) in one statement, reading again while tasks ended FAILED filled
/// the read.
pub async fn lease_in_transaction(
    connection: &mut SqliteConnection,
    orders: &[&LeaseRow],
) -> Result<Vec<TransactionLeases>, StorageError> {
    let mut done: Vec<TransactionLeases> = orders
        .iter()
        .map(|_| TransactionLeases::default())
        .collect();
    let Some(shape) = orders.first() else {
        return Ok(done);
    };
    let mut rooms: Vec<Room> = orders
        .iter()
        .map(|order| Room::new(order.max_tasks, order.max_bytes))
        .collect();
    let mut rounds = lease::Rounds::default();
    loop {
        let wanted = lease::candidates_wanted(&rooms);
        let candidates = lease_candidates(&mut *connection, shape, wanted).await?;
        let cut = cut(&rooms, &candidates, shape.max_attempts);
        if cut.left_behind {
            // Every order's caller wakes the pollers waiting: one that
            // gave up would not.
            for order in &mut done {
                order.left_behind = true;
            }
        }
        let picks: Vec<Picked<'_>> = cut
            .picks
            .iter()
            .map(|pick| Picked {
                candidate: &candidates[pick.candidate],
                worker_id: &orders[pick.order].worker_id,
                ends: pick.ends,
            })
            .collect();
        let mut changed = lease_picks(&mut *connection, shape, &picks).await?;
        for pick in &cut.picks {
            let candidate = &candidates[pick.candidate];
            let order = &mut done[pick.order];
            order.granted.expired += u64::from(candidate.running);
            let task = changed.remove(&candidate.task_id).ok_or_else(|| {
                StorageError::Corrupt(format!(
                    "task {} was read leasable but not updated",
                    candidate.task_id
                ))
            })?;
            if pick.ends {
                order.ended.push(task.task_id);
            } else {
                rooms[pick.order].take(candidate.size);
                order.granted.tasks.push(task);
            }
        }
        // One writer: no other statement takes picks first.
        match rounds.after(&rooms, &cut, false, candidates.len() as i64 >= wanted) {
            lease::AfterRound::Again => {}
            lease::AfterRound::Done => break,
            lease::AfterRound::GiveUp => {
                // Tasks may still wait for these orders: wake the polls to
                // read again.
                for order in &mut done {
                    order.left_behind = true;
                }
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

/// A candidate [`cut`] gave an order.
struct Picked<'a> {
    candidate: &'a Candidate,
    /// The worker of the order that takes it.
    worker_id: &'a str,
    /// Whether its last allowed lease ran out: it ends FAILED (4) instead
    /// of being leased (2).
    ends: bool,
}

/// Leases each of `picks` to its worker with a new token, or ends it
/// FAILED, in one statement; the changed tasks by id.
async fn lease_picks(
    connection: &mut SqliteConnection,
    shape: &LeaseRow,
    picks: &[Picked<'_>],
) -> Result<HashMap<Uuid, TaskRecord>, StorageError> {
    if picks.is_empty() {
        return Ok(HashMap::new());
    }
    // Each pick as [task id, ends, message or null, new token, worker].
    let picks = serde_json::Value::from(
        picks
            .iter()
            .map(|pick| {
                serde_json::json!([
                    pick.candidate.task_id.to_string(),
                    pick.ends,
                    pick.candidate.message(shape.max_attempts),
                    Uuid::new_v4().to_string(),
                    pick.worker_id,
                ])
            })
            .collect::<Vec<_>>(),
    );
    let rows = sqlx::query(concat!(
        "UPDATE tasks SET \
             status = CASE WHEN p.value ->> 1 THEN ",
        status!(failed),
        " ELSE ",
        status!(running),
        " END, \
             error_message = coalesce(p.value ->> 2, error_message), \
             attempt = CASE WHEN p.value ->> 1 THEN attempt ELSE attempt + 1 END, \
             lease_token = CASE WHEN p.value ->> 1 THEN lease_token ELSE p.value ->> 3 END, \
             worker_id = CASE WHEN p.value ->> 1 THEN worker_id ELSE p.value ->> 4 END, \
             available_at = CASE WHEN p.value ->> 1 THEN available_at ELSE ",
        now!(),
        " + ?2 END, \
             update_time = ",
        now!(),
        " FROM json_each(?1) AS p WHERE tasks.task_id = p.value ->> 0 \
         RETURNING ",
        task_columns!()
    ))
    .bind(picks.to_string())
    .bind(shape.lease_duration)
    .fetch_all(connection)
    .await?;
    rows.iter()
        .map(|row| task_record(row).map(|task| (task.task_id, task)))
        .collect()
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

/// [`complete_task`] for many completions of distinct tasks in one
/// statement, answered in their order: each task whose lease is current is
/// SUCCEEDED, the others are left alone and answer `None`.
pub async fn complete_tasks(
    connection: &mut SqliteConnection,
    completions: &[&Completion],
) -> Result<Vec<Option<TaskRecord>>, StorageError> {
    // Each completion as [task id, lease token, result].
    let input = serde_json::Value::from(
        completions
            .iter()
            .map(|c| {
                serde_json::json!([
                    c.lease.task_id.0.to_string(),
                    c.lease.token.to_string(),
                    c.result_json,
                ])
            })
            .collect::<Vec<_>>(),
    );
    let rows = sqlx::query(concat!(
        "UPDATE tasks SET status = ",
        status!(succeeded),
        ", result = c.value ->> 2, error_message = '', update_time = ",
        now!(),
        " FROM json_each(?1) AS c \
         WHERE tasks.task_id = c.value ->> 0 AND tasks.lease_token = c.value ->> 1 \
           AND tasks.status = ",
        status!(running),
        " RETURNING ",
        task_columns!()
    ))
    .bind(input.to_string())
    .fetch_all(connection)
    .await?;
    let mut done: HashMap<Uuid, TaskRecord> = rows
        .iter()
        .map(|row| task_record(row).map(|task| (task.task_id, task)))
        .collect::<Result<_, _>>()?;
    Ok(completions
        .iter()
        .map(|c| done.remove(&c.lease.task_id.0))
        .collect())
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
