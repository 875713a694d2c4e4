//! The statements of the task lifecycle on PostgreSQL: leases, renewals,
//! completions, failures and cancellations, each one statement fenced by
//! the lease's token.

use std::time::Duration;

use sqlx::{PgExecutor, Row};
use uuid::Uuid;

use super::task_record;
use crate::{
    domain::{Completion, Failure, LeaseRef, TaskRecord, lease::Candidate},
    storage::{FailureOutcome, StorageError},
};

/// A task a lease statement was told to take: which order takes it, and
/// the state it was read in, which the write is fenced on.
#[derive(Debug, Clone)]
pub struct Chosen<'a> {
    /// The task, as read.
    pub candidate: &'a Candidate,
    /// The order that takes it, from 1, as the answer rows report it.
    pub order: i64,
    /// The worker the order is for.
    pub worker_id: &'a str,
    /// Whether it ends FAILED instead of being leased.
    pub ends: bool,
    /// The message it gets (an expired lease's); `None` keeps its own.
    pub message: Option<String>,
}

/// The oldest leasable tasks of `actions` (any, when empty), at most
/// `limit`, leaving out `excluded`: queued ones whose backoff is over and
/// running ones whose lease ran out. Read without a lock and without their
/// parameters: [`crate::domain::lease::cut`] decides which are taken, and
/// [`lease_chosen`] locks only those.
pub async fn lease_candidates(
    db: impl PgExecutor<'_>,
    actions: &[String],
    limit: i64,
    excluded: &[Uuid],
) -> Result<Vec<Candidate>, StorageError> {
    let rows = sqlx::query(concat!(
        "SELECT task_id, coalesce(parameters_bytes, octet_length(parameters::text))::int8 AS size, \
                status = ",
        status!(running),
        " AS running, attempt \
         FROM tasks \
         WHERE status IN ",
        status!(leasable),
        " AND available_at <= now() \
           AND (cardinality($1::text[]) = 0 OR action = ANY($1::text[])) \
           AND NOT EXISTS (SELECT 1 FROM unnest($3::uuid[]) AS x(id) WHERE x.id = task_id) \
         ORDER BY available_at, seq \
         LIMIT $2"
    ))
    .bind(actions)
    .bind(limit)
    .bind(excluded)
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Candidate {
                task_id: row.try_get("task_id")?,
                size: row.try_get("size")?,
                running: row.try_get("running")?,
                attempt: row.try_get("attempt")?,
            })
        })
        .collect()
}

/// Locks the chosen tasks that are still as they were read (`SKIP LOCKED`:
/// one another statement holds is left to it) and leases each to its
/// order's worker with a new token, or ends it FAILED, in one statement.
///
/// Each is locked by a lateral `LIMIT 1` probe of the primary key, which
/// the planner cannot turn into a join. The chosen tasks are read with a
/// `LIMIT` of their own count, which a generic plan takes for one row: so
/// the update, which joins the locked tasks to `tasks`, is a nested loop
/// over the primary key in the plan the pool keeps, even when it was made
/// while the table was small (without it, a hash of a scan of every task
/// was cheaper then, and stayed: `tests/api/plans.rs` checks).
/// Answers the changed tasks with their order, in the order chosen.
/// Notifies no one: the caller does, after the commit (see `notify.rs`),
/// for the tasks ended FAILED. A chosen task that is
/// not answered was taken by someone else first, or changed.
pub async fn lease_chosen(
    db: impl PgExecutor<'_>,
    chosen: &[Chosen<'_>],
    lease_duration: Duration,
) -> Result<Vec<(i64, TaskRecord)>, StorageError> {
    let rows = sqlx::query(concat!(
        "WITH chosen AS ( \
             SELECT * FROM unnest($1::uuid[], $2::bool[], $3::int[], $4::bool[], $5::text[], \
                                  $6::text[], $7::int8[]) \
                 WITH ORDINALITY AS c(task_id, running, attempt, ends, worker_id, message, \
                                      ord, rank) \
             LIMIT $9 \
         ), locked AS ( \
             SELECT t.task_id, c.ends, c.worker_id, c.message, c.ord, c.rank \
             FROM chosen AS c CROSS JOIN LATERAL ( \
                 SELECT task_id FROM tasks \
                 WHERE task_id = c.task_id AND status = CASE WHEN c.running THEN ",
        status!(running),
        " ELSE ",
        status!(queued),
        " END \
                   AND attempt = c.attempt AND available_at <= now() \
                 LIMIT 1 \
                 FOR UPDATE SKIP LOCKED \
             ) AS t \
         ), changed AS ( \
             UPDATE tasks AS t SET \
                 status = CASE WHEN l.ends THEN ",
        status!(failed),
        " ELSE ",
        status!(running),
        " END, \
                 error_message = coalesce(l.message, t.error_message), \
                 attempt = CASE WHEN l.ends THEN t.attempt ELSE t.attempt + 1 END, \
                 lease_token = CASE WHEN l.ends THEN t.lease_token ELSE gen_random_uuid() END, \
                 worker_id = CASE WHEN l.ends THEN t.worker_id ELSE l.worker_id END, \
                 available_at = CASE WHEN l.ends THEN t.available_at \
                                     ELSE now() + $8::interval END, \
                 update_time = now() \
             FROM locked AS l WHERE t.task_id = l.task_id \
             RETURNING l.ord, l.rank, t.* \
         ) \
         SELECT ord, ",
        task_columns!(),
        " FROM changed ORDER BY rank"
    ))
    .bind(
        chosen
            .iter()
            .map(|c| c.candidate.task_id)
            .collect::<Vec<_>>(),
    )
    .bind(
        chosen
            .iter()
            .map(|c| c.candidate.running)
            .collect::<Vec<_>>(),
    )
    .bind(
        chosen
            .iter()
            .map(|c| c.candidate.attempt)
            .collect::<Vec<_>>(),
    )
    .bind(chosen.iter().map(|c| c.ends).collect::<Vec<_>>())
    .bind(chosen.iter().map(|c| c.worker_id).collect::<Vec<_>>())
    .bind(
        chosen
            .iter()
            .map(|c| c.message.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(chosen.iter().map(|c| c.order).collect::<Vec<_>>())
    .bind(lease_duration)
    .bind(chosen.len() as i64)
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("ord")?, task_record(row)?)))
        .collect()
}

/// Extends a lease that is still the task's current one.
pub async fn renew_lease(
    db: impl PgExecutor<'_>,
    lease: LeaseRef,
    lease_duration: Duration,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "UPDATE tasks SET available_at = now() + $3::interval, update_time = now() \
         WHERE task_id = $1 AND lease_token = $2 AND status = ",
        status!(running),
        " RETURNING ",
        task_columns!()
    ))
    .bind(lease.task_id.0)
    .bind(lease.token)
    .bind(lease_duration)
    .fetch_optional(db)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}

/// Marks the task SUCCEEDED (3) with its result, if the lease is current.
/// Notifies no one: the caller does, after the commit (see `notify.rs`).
pub async fn complete_task(
    db: impl PgExecutor<'_>,
    completion: &Completion,
) -> Result<Option<TaskRecord>, StorageError> {
    Ok(complete_tasks(db, std::slice::from_ref(completion))
        .await?
        .pop()
        .flatten())
}

/// [`complete_task`] for many completions in one statement (one
/// transaction), answered in their order: each task whose lease is current
/// is SUCCEEDED, the others are left alone and answer `None`. The tasks
/// must be distinct; they are fed in `task_id` order, which the plan keeps
/// (a nested loop over the primary key), so two batches should not
/// deadlock; if they ever did, PostgreSQL ends one and its batch is retried
/// one completion at a time.
pub async fn complete_tasks(
    db: impl PgExecutor<'_>,
    completions: &[Completion],
) -> Result<Vec<Option<TaskRecord>>, StorageError> {
    let rows = sqlx::query(concat!(
        "WITH input AS ( \
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[]) \
                 WITH ORDINALITY AS c(task_id, token, result, ord) \
             ORDER BY task_id \
         ), done AS ( \
             UPDATE tasks AS t SET status = ",
        status!(succeeded),
        ", result = c.result::jsonb, error_message = '', \
                                   update_time = now() \
             FROM input AS c \
             WHERE t.task_id = c.task_id AND t.lease_token = c.token AND t.status = ",
        status!(running),
        " \
             RETURNING c.ord, t.* \
         ) \
         SELECT ord, ",
        task_columns!(),
        " FROM done"
    ))
    .bind(
        completions
            .iter()
            .map(|c| c.lease.task_id.0)
            .collect::<Vec<_>>(),
    )
    .bind(
        completions
            .iter()
            .map(|c| c.lease.token)
            .collect::<Vec<_>>(),
    )
    .bind(
        completions
            .iter()
            .map(|c| c.result_json.as_str())
            .collect::<Vec<_>>(),
    )
    .fetch_all(db)
    .await?;
    let mut done: Vec<Option<TaskRecord>> = completions.iter().map(|_| None).collect();
    for row in &rows {
        let ord: i64 = row.try_get("ord")?;
        let slot = usize::try_from(ord - 1)
            .ok()
            .and_then(|place| done.get_mut(place))
            .ok_or_else(|| StorageError::Corrupt(format!("a completion answered place {ord}")))?;
        *slot = Some(task_record(row)?);
    }
    Ok(done)
}

/// Writes a failed attempt's `outcome` (decided by `queue::retry`), if the
/// lease is current and on the attempt it was decided for: the task ends
/// FAILED, keeping its `available_at`, or is queued again to be leasable
/// after the outcome's delay.
pub async fn fail_task(
    db: impl PgExecutor<'_>,
    failure: &Failure,
    outcome: &FailureOutcome,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "UPDATE tasks AS t SET status = $4, error_message = $3, \
             available_at = coalesce(now() + interval '1 microsecond' * $6, t.available_at), \
             update_time = now() \
         WHERE task_id = $1 AND lease_token = $2 AND attempt = $5 AND status = ",
        status!(running),
        " RETURNING ",
        task_columns!()
    ))
    .bind(failure.lease.task_id.0)
    .bind(failure.lease.token)
    .bind(&failure.message)
    .bind(outcome.status().code() as i16)
    .bind(outcome.attempt)
    .bind(outcome.retry_in_micros())
    .fetch_optional(db)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}

/// Cancels (5) a queued or running task.
pub async fn cancel_task(
    db: impl PgExecutor<'_>,
    task_id: Uuid,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "UPDATE tasks SET status = ",
        status!(cancelled),
        ", update_time = now() WHERE task_id = $1 AND status IN ",
        status!(unfinished),
        " RETURNING ",
        task_columns!()
    ))
    .bind(task_id)
    .fetch_optional(db)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}
